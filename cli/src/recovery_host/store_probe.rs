//! The recovery host's look at the store (docs/recovery-hosts.md): every
//! `PROBE_EVERY` it reads one object that is never written, and says in its heartbeat
//! whether the store answered. A missing object is the answer of a store that was
//! reached; anything else (a refused connection, a denied credential, a missing
//! bucket) is the reason the control plane shows, and why it gives the host no new
//! work and refuses it as a failback's master target.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferry_link::control::limits::{trimmed, MAX_TEXT_BYTES};
use ferry_replica::Store;

/// How often the store is looked at.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// The object read: under the store's `probe/` prefix, which nothing writes.
pub const PROBE_KEY: &str = "probe/recovery-host";

/// The newest look's verdict: None while the store answers.
#[derive(Default)]
pub struct StoreHealth(Mutex<Option<String>>);

impl StoreHealth {
    pub fn error(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, e: Option<String>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = e;
    }
}

/// One look: Err says why the store did not answer, fit for a heartbeat.
pub fn probe(store: &Store) -> Result<(), String> {
    match store.block(store.get_opt(PROBE_KEY)) {
        Ok(_) => Ok(()),
        Err(e) => Err(trimmed(&without_queries(&e.to_string()), MAX_TEXT_BYTES)),
    }
}

/// The message with every URL's query cut off: a store's request URL may carry a
/// shared access signature, which is a secret.
pub fn without_queries(msg: &str) -> String {
    msg.split(' ')
        .map(|w| match (w.contains("://"), w.find('?')) {
            (true, Some(q)) => format!("{}?…", &w[..q]),
            _ => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Looks at the store now, then every `PROBE_EVERY`, on a thread of its own for the
/// life of the process (a look may take the store's whole retry time).
pub fn spawn(store: Store, health: Arc<StoreHealth>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ferry-store-probe".into())
        .spawn(move || loop {
            let r = probe(&store);
            match (&r, health.error()) {
                (Err(e), None) => tracing::warn!(error = %e, "cannot reach the store"),
                (Ok(()), Some(_)) => tracing::info!("the store answers again"),
                _ => {}
            }
            health.set(r.err());
            std::thread::sleep(PROBE_EVERY);
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reached_store_is_healthy_and_an_unreachable_one_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let ok = Store::open(&format!("file://{}", tmp.path().display())).unwrap();
        assert_eq!(probe(&ok), Ok(()));

        // A file store whose folder became a file: every read fails, not "missing".
        let gone = tmp.path().join("gone");
        let store = Store::open(&format!("file://{}", gone.display())).unwrap();
        std::fs::remove_dir(&gone).unwrap();
        std::fs::write(&gone, b"not a folder").unwrap();
        let e = probe(&store).unwrap_err();
        assert!(e.contains(PROBE_KEY), "{e}");
    }

    #[test]
    fn queries_are_cut_from_urls_only() {
        assert_eq!(
            without_queries("GET https://a.blob/c/probe?sv=1&sig=SECRET failed: why?"),
            "GET https://a.blob/c/probe?… failed: why?"
        );
    }
}
