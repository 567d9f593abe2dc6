//! Scheduled work that must run on one control plane at a time, of several on one
//! database: the health sweep, the retention schedule and the pruning of old jobs
//! and events. Each loop keeps its own timer and, at each tick, does its work only
//! while this control plane holds the named lease (`db::leases`). A task beside them
//! takes or renews the lease every third of its length; a killed holder's work is
//! taken over by another control plane once its lease runs out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db::{leases, Db};

/// The lease of the scheduled work above: one holder does all of it.
pub const SCHEDULER: &str = "scheduler";

/// One named lease as this control plane sees it.
#[derive(Clone)]
pub struct Singleton {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    owner: String,
    lease: Duration,
    /// Until when this control plane may act as the holder: two thirds of a lease
    /// after the moment it asked for the lease it got. The last third is a margin
    /// for clock skew and a slow answer, so that this one stops acting before
    /// another may take the lease over.
    acts_until: Mutex<Option<Instant>>,
    /// The task that takes and renews the lease.
    renewer: Mutex<Option<tokio::task::AbortHandle>>,
    /// Counts the times this control plane gained the lease: work that runs rarely
    /// (hourly retention) runs at once when it takes over, not an hour later.
    gains: tokio::sync::watch::Sender<u64>,
}

impl Singleton {
    /// Tries the lease once (so that loops started next see whether they hold it),
    /// then keeps trying or renewing it every third of `lease` until the process ends.
    pub async fn start(db: Db, name: &str, owner: &str, lease: Duration) -> Singleton {
        let s = Singleton {
            inner: Arc::new(Inner {
                name: name.to_string(),
                owner: owner.to_string(),
                lease,
                acts_until: Mutex::new(None),
                renewer: Mutex::new(None),
                gains: tokio::sync::watch::Sender::new(0),
            }),
        };
        s.try_hold(&db).await;
        let s2 = s.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(s2.inner.lease / 3).await;
                s2.try_hold(&db).await;
            }
        });
        *lock(&s.inner.renewer) = Some(task.abort_handle());
        s
    }

    /// Stops renewing (tests: as if this control plane were killed); `held` turns
    /// false within two thirds of a lease, and another takes the lease after it.
    pub fn stop_renewing(&self) {
        if let Some(task) = lock(&self.inner.renewer).take() {
            task.abort();
        }
    }

    /// Whether this control plane holds the lease now and may do the work.
    pub fn held(&self) -> bool {
        self.acts_until()
            .is_some_and(|until| Instant::now() < until)
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Changes each time this control plane gains the lease after subscribing.
    pub fn gains(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.gains.subscribe()
    }

    fn acts_until(&self) -> Option<Instant> {
        *lock(&self.inner.acts_until)
    }

    fn set_acts_until(&self, until: Option<Instant>) {
        *lock(&self.inner.acts_until) = until;
    }

    /// One attempt to take or renew the lease; logs when this control plane gains or
    /// loses it.
    async fn try_hold(&self, db: &Db) {
        let i = &self.inner;
        let asked = Instant::now();
        let was = self.held();
        let lease_ms = i64::try_from(i.lease.as_millis()).unwrap_or(i64::MAX / 2);
        match leases::hold(
            db,
            &i.name,
            &i.owner,
            crate::jobs::queue::now_ms(),
            lease_ms,
        )
        .await
        {
            Ok(true) => {
                self.set_acts_until(Some(asked + i.lease * 2 / 3));
                if !was {
                    i.gains.send_modify(|n| *n += 1);
                    tracing::info!(lease = %i.name, owner = %i.owner, "this control plane holds the lease now: it does that work");
                }
            }
            Ok(false) => {
                self.set_acts_until(None);
                if was {
                    tracing::warn!(lease = %i.name, owner = %i.owner, "lost the lease to another control plane");
                }
            }
            // Keep acting until the margin runs out: the lease holds to its deadline
            // even when this renewal failed.
            Err(e) => tracing::warn!(lease = %i.name, "renewing the lease: {e}"),
        }
    }
}

/// A poisoned lock still holds a valid `Option`: a panic elsewhere must not stop the
/// lease from being read.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn held_within(s: &Singleton, limit: Duration) {
        let until = std::time::Instant::now() + limit;
        while !s.held() {
            assert!(
                std::time::Instant::now() < until,
                "not held within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn one_holder_of_two_and_a_takeover_after_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
        let lease = Duration::from_millis(600);
        let a = Singleton::start(db.clone(), "work", "cp-a", lease).await;
        let b = Singleton::start(db.clone(), "work", "cp-b", lease).await;
        assert!(a.held(), "the first to ask holds it");
        assert!(!b.held(), "the second does not while it is renewed");
        let b_gains = b.gains();
        tokio::time::sleep(lease * 2).await;
        // `held` is a margin that each renewal extends: a renewal late on a busy
        // machine can lapse it for a moment, so cp-a's is polled, not sampled.
        assert!(!b.held(), "renewed, still one holder");
        held_within(&a, lease).await;
        assert_eq!(
            leases::holder(&db, "work").await.unwrap().map(|h| h.0),
            Some("cp-a".to_string())
        );
        // cp-a stops renewing (as if killed): it stops acting first, then the
        // deadline passes and cp-b takes the work over.
        a.stop_renewing();
        tokio::time::sleep(lease * 2 / 3).await;
        assert!(!a.held(), "past its margin it no longer acts");
        // Taken over within a lease and a renewal, or a few more on a busy machine.
        held_within(&b, lease * 5).await;
        assert!(b_gains.has_changed().unwrap(), "the takeover is told");
        assert_eq!(
            leases::holder(&db, "work").await.unwrap().map(|h| h.0),
            Some("cp-b".to_string())
        );
        b.stop_renewing();
    }

    #[tokio::test]
    async fn the_lease_statement_admits_one_owner_until_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
        assert!(leases::hold(&db, "n", "a", 1_000, 500).await.unwrap());
        assert!(!leases::hold(&db, "n", "b", 1_200, 500).await.unwrap());
        assert!(
            leases::hold(&db, "n", "a", 1_300, 500).await.unwrap(),
            "renewed"
        );
        assert!(
            !leases::hold(&db, "n", "b", 1_700, 500).await.unwrap(),
            "to 1800 now"
        );
        assert!(
            leases::hold(&db, "n", "b", 1_801, 500).await.unwrap(),
            "expired: taken"
        );
        assert!(!leases::hold(&db, "n", "a", 1_900, 500).await.unwrap());
        assert_eq!(
            leases::holder(&db, "n").await.unwrap(),
            Some(("b".to_string(), 2_301))
        );
        assert!(
            leases::hold(&db, "other", "a", 1_900, 500).await.unwrap(),
            "names apart"
        );
    }
}
