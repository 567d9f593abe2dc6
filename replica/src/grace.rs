//! The orphan grace, seen from both sides. Compaction deletes data objects that no
//! commit references once they are older than the grace (orphans of crashed writers).
//! A writer's objects are exactly such objects from their put until its commit lands,
//! so a writer may commit only while every object it put is still well inside the
//! grace; later, it abandons the upload and redoes it under fresh names, never commits
//! (docs/storage-format.md, "Commit protocol").
//!
//! Every sweeper and every writer of a store must use the same grace: `ORPHAN_GRACE`,
//! or a shorter one that a test passes to both. A zero grace means no writer runs
//! beside the sweeper (tests of one actor): it sweeps every orphan at once, and a
//! writer under it is held to no deadline.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long compaction leaves an unreferenced object alone.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3600);

/// The part of the grace a writer does not use: it must start its commit at least this
/// long before the grace runs out. It covers what the writer's own clock cannot see:
/// compaction compares the store's modification times with its own clock, so skew
/// between the compaction host and the store moves the moment an object looks old; and
/// the commit record's put lands some time after the writer's check (request latency,
/// the client's retries). A sixth (10 minutes of an hour) is far above both.
pub fn commit_margin(grace: Duration) -> Duration {
    grace / 6
}

/// When the objects of one pending commit were put. `before_put` is called before
/// every put, so the first call is the earliest possible modification time of any of
/// the objects (the store stamps an object no earlier than the request that made it).
#[derive(Debug, Clone, Copy)]
pub struct PutClock {
    grace: Duration,
    first: Option<Instant>,
}

impl PutClock {
    pub fn new(grace: Duration) -> Self {
        PutClock { grace, first: None }
    }

    /// Notes a put about to start; returns its start.
    pub fn before_put(&mut self) -> Instant {
        let now = Instant::now();
        self.first.get_or_insert(now);
        now
    }

    /// Takes in the earliest put of objects another clock tracked (a pool of uploads).
    pub fn merge(&mut self, put: Instant) {
        self.first = Some(self.first.map_or(put, |f| f.min(put)));
    }

    pub fn first_put(&self) -> Option<Instant> {
        self.first
    }

    /// True when an object put at `put` may no longer be committed.
    pub fn expired(&self, put: Instant) -> bool {
        !self.grace.is_zero() && put.elapsed() + commit_margin(self.grace) > self.grace
    }

    /// Called right before the commit: an error when the earliest put is too old, so
    /// the caller abandons the upload and redoes it with fresh objects.
    pub fn check(&self, disk: &str) -> Result<()> {
        match self.first {
            Some(put) if self.expired(put) => Err(Error::UploadExpired {
                disk: disk.to_string(),
                age_ms: put.elapsed().as_millis() as u64,
                grace_ms: self.grace.as_millis() as u64,
                margin_ms: commit_margin(self.grace).as_millis() as u64,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_is_grace_less_margin_from_the_first_put() {
        let mut c = PutClock::new(Duration::from_millis(600));
        assert!(c.check("m/d").is_ok(), "nothing put yet");
        c.before_put();
        std::thread::sleep(Duration::from_millis(50));
        c.before_put();
        assert!(c.check("m/d").is_ok());
        // The margin is 100 ms: past 500 ms from the first put the upload is stale.
        std::thread::sleep(Duration::from_millis(460));
        let e = c.check("m/d").unwrap_err().to_string();
        assert!(e.contains("disk m/d") && e.contains("redone"), "{e}");
        // A later, fresh put does not make the old one younger.
        c.before_put();
        assert!(c.check("m/d").is_err());
        let mut fresh = PutClock::new(Duration::from_millis(600));
        fresh.before_put();
        assert!(fresh.check("m/d").is_ok());
        fresh.merge(c.first_put().unwrap());
        assert!(fresh.check("m/d").is_err(), "merged: the earliest counts");
        // A zero grace holds writers to no deadline.
        let mut z = PutClock::new(Duration::ZERO);
        z.before_put();
        assert!(z.check("m/d").is_ok());
    }
}
