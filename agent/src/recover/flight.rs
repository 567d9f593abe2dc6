//! One fetch per extent at a time: concurrent reads of an extent that is not cached
//! (a guest's parallel requests, hydration beside a read) wait for the one fetch in
//! flight and share its result instead of each fetching and decoding the same object.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Why a shared call failed: the caller's own error, or the text of the error the call
/// it waited for ended with.
#[derive(Debug)]
pub enum Flight<E> {
    Own(E),
    Shared(String),
}

struct Slot<V> {
    result: Mutex<Option<Result<V, String>>>,
    done: Condvar,
}

/// Calls in flight by key; each waiter holds the slot, so the map keeps only running
/// calls (at most one per reading thread).
pub struct SingleFlight<V> {
    running: Mutex<HashMap<u64, Arc<Slot<V>>>>,
}

impl<V> Default for SingleFlight<V> {
    fn default() -> Self {
        SingleFlight {
            running: Mutex::new(HashMap::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends the leader's call whatever happens to it (a panic included): the slot gets a
/// result and leaves the map, so no waiter waits forever.
struct Finish<'a, V> {
    flight: &'a SingleFlight<V>,
    key: u64,
    slot: Arc<Slot<V>>,
    result: Option<Result<V, String>>,
}

impl<V> Drop for Finish<'_, V> {
    fn drop(&mut self) {
        let result = self
            .result
            .take()
            .unwrap_or_else(|| Err("the fetch in flight panicked".into()));
        lock(&self.flight.running).remove(&self.key);
        *lock(&self.slot.result) = Some(result);
        self.slot.done.notify_all();
    }
}

impl<V: Clone> SingleFlight<V> {
    /// Runs `f` for `key` unless a call for it is running already, in which case waits
    /// for that call and returns its result.
    pub fn run<E: Display>(
        &self,
        key: u64,
        f: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, Flight<E>> {
        let (slot, leader) = {
            let mut running = lock(&self.running);
            match running.get(&key) {
                Some(s) => (s.clone(), false),
                None => {
                    let s = Arc::new(Slot {
                        result: Mutex::new(None),
                        done: Condvar::new(),
                    });
                    running.insert(key, s.clone());
                    (s, true)
                }
            }
        };
        if !leader {
            let mut r = lock(&slot.result);
            while r.is_none() {
                r = slot.done.wait(r).unwrap_or_else(|p| p.into_inner());
            }
            return match r.as_ref() {
                Some(Ok(v)) => Ok(v.clone()),
                Some(Err(why)) => Err(Flight::Shared(why.clone())),
                None => Err(Flight::Shared("no result".into())),
            };
        }
        let mut finish = Finish {
            flight: self,
            key,
            slot,
            result: None,
        };
        let out = f();
        finish.result = Some(match &out {
            Ok(v) => Ok(v.clone()),
            Err(e) => Err(e.to_string()),
        });
        drop(finish);
        out.map_err(Flight::Own)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;
    use std::time::Duration;

    use super::*;

    #[test]
    fn concurrent_calls_for_one_key_run_once_and_share_the_result() {
        let flight = SingleFlight::<u64>::default();
        let calls = AtomicUsize::new(0);
        let start = Barrier::new(8);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        flight.run(7, || {
                            calls.fetch_add(1, Ordering::SeqCst);
                            // Long enough for every other thread to arrive meanwhile.
                            std::thread::sleep(Duration::from_millis(300));
                            Ok::<_, String>(42)
                        })
                    })
                })
                .collect();
            for h in handles {
                assert_eq!(h.join().unwrap().unwrap(), 42);
            }
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Done calls leave nothing behind; the next call runs again, and an error
        // reaches its waiters as text.
        assert!(lock(&flight.running).is_empty());
        let r = flight.run(7, || Err::<u64, _>("store down"));
        assert!(matches!(r, Err(Flight::Own("store down"))));
        let r = std::thread::scope(|s| {
            let leader = s.spawn(|| {
                flight.run(9, || {
                    std::thread::sleep(Duration::from_millis(300));
                    Err::<u64, _>("store down")
                })
            });
            std::thread::sleep(Duration::from_millis(100));
            let waiter = flight.run(9, || Ok::<_, String>(1));
            let _ = leader.join();
            waiter
        });
        assert!(
            matches!(r, Err(Flight::Shared(ref w)) if w == "store down"),
            "{r:?}"
        );
    }
}
