//! A list the control plane's heartbeat answer replaces whole (revoked certificates,
//! failed-over machines), read by every session: a set behind a lock, and a
//! generation bumped at every change so that a session looks again only then (one
//! atomic load a frame, no lock on the data path).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

#[derive(Debug, Default)]
pub struct Listed {
    items: RwLock<HashSet<String>>,
    generation: AtomicU64,
}

impl Listed {
    /// Replaces the list; returns whether it changed.
    pub fn replace(&self, items: impl IntoIterator<Item = String>) -> bool {
        let new: HashSet<String> = items.into_iter().collect();
        let mut cur = self.items.write().expect("listed lock");
        if *cur == new {
            return false;
        }
        *cur = new;
        // Under the write lock: a session that sees the new generation reads the new
        // list.
        self.generation.fetch_add(1, Ordering::SeqCst);
        true
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn len(&self) -> usize {
        self.items.read().expect("listed lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, item: &str) -> bool {
        self.items.read().expect("listed lock").contains(item)
    }
}
