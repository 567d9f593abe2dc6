//! Checksum maps for an agent's checksum resync: the block checksums of the replica
//! holding every write below a sequence number, so the agent sends only the blocks
//! that differ (docs/protocol.md, Checksum resync).
//!
//! The map is made off the shard: once the upload stage has committed everything
//! below the sequence asked for, a thread of its own rebuilds that state into a sparse
//! scratch file in the cache directory and hashes it (or reads a seed's checksum map
//! when one describes that state). One map is made at a time per server, so scratch
//! space is bounded by the largest disk; and the maps held at once, made or being
//! sent (16 bytes per block each), by a budget of 1 GiB: after a site-wide power cut
//! every agent asks for one, and each stays in memory until its agent has it all.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ferry_replica::sums::BlockSums;
use ferry_replica::{Disk, Store, VaultKey};

use super::registry::{DiskEntry, Registry};
use crate::error::{Error, Result};
use ferry_link::protocol::SUM_BYTES;

/// The largest map made (and held while it is sent): 16 bytes per block.
pub const MAX_MAP_BYTES: u64 = 1 << 30;

/// Serialises map making across the server.
pub static GATE: Mutex<()> = Mutex::new(());

/// Bounds the bytes of all maps held at once.
pub static BUDGET: Budget = Budget::new(MAX_MAP_BYTES);

/// A counting bound on bytes, waited for on a thread of its own (never a shard's).
pub struct Budget {
    held: Mutex<u64>,
    freed: Condvar,
    max: u64,
}

/// Bytes taken from a budget, given back when dropped.
pub struct Permit {
    budget: &'static Budget,
    bytes: u64,
}

impl Budget {
    pub const fn new(max: u64) -> Budget {
        Budget {
            held: Mutex::new(0),
            freed: Condvar::new(),
            max,
        }
    }

    /// Waits until `bytes` (at most the whole budget) fit, and holds them.
    pub fn take(&'static self, bytes: u64) -> Permit {
        let bytes = bytes.min(self.max);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while *held + bytes > self.max {
            held = self.freed.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        *held += bytes;
        Permit {
            budget: self,
            bytes,
        }
    }

    pub fn held(&self) -> u64 {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        *self.budget.held.lock().unwrap_or_else(|p| p.into_inner()) -= self.bytes;
        self.budget.freed.notify_all();
    }
}

/// A finished map, being sent in chunks; its bytes count against `BUDGET` until the
/// last chunk is sent or the session ends.
pub struct Outgoing {
    pub seq: u64,
    pub map: BlockSums,
    /// Index of the next block to send.
    pub next: usize,
    pub permit: Permit,
}

/// Waits (polling) until every write below `seq` is uploaded, then makes the map.
/// `alive` says whether the session still wants it.
pub async fn prepare(
    entry: Arc<DiskEntry>,
    registry: Arc<Registry>,
    scratch: PathBuf,
    seq: u64,
    disk_bytes: u64,
    alive: impl Fn() -> bool,
) -> Result<(BlockSums, Permit)> {
    while entry.uploaded.load(Ordering::SeqCst) < seq {
        if !alive() {
            return Err(Error::SessionEnded);
        }
        compio::time::sleep(Duration::from_millis(20)).await;
    }
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
        .name("ferry-sums".into())
        .spawn(move || {
            let _one = GATE.lock().unwrap_or_else(|p| p.into_inner());
            let made = make(
                &entry,
                &registry.store,
                &registry.vault,
                &scratch,
                seq,
                disk_bytes,
                &|| tx.is_canceled(),
            );
            let _ = tx.send(made);
        })
        .map_err(|source| Error::Thread {
            what: "the checksum thread".into(),
            source,
        })?;
    rx.await
        .unwrap_or(Err(Error::ThreadDied { what: "checksum" }))
}

fn make(
    entry: &DiskEntry,
    store: &Store,
    vault: &VaultKey,
    scratch: &std::path::Path,
    seq: u64,
    disk_bytes: u64,
    gone: &dyn Fn() -> bool,
) -> Result<(BlockSums, Permit)> {
    let replica = |source| Error::Replica {
        disk: entry.key.clone(),
        source,
    };
    let disk = store
        .block(Disk::open(store, &entry.machine, &entry.disk, Some(vault)))
        .map_err(replica)?;
    let blocks = BlockSums::blocks_for(disk_bytes, disk.info.block_bytes) as u64;
    if blocks * SUM_BYTES as u64 > MAX_MAP_BYTES {
        return Err(Error::MapTooLarge {
            disk: entry.key.clone(),
            blocks,
            max: MAX_MAP_BYTES,
        });
    }
    // Waits, holding the gate, while other sessions still send theirs: they need no
    // gate to finish, so the wait ends.
    let permit = BUDGET.take(blocks * SUM_BYTES as u64);
    // The session may have ended meanwhile; and the replica's state is read only now,
    // fresh, after what may have been a long wait.
    if gone() {
        return Err(Error::SessionEnded);
    }
    let not_open = |why| Error::NotOpen {
        disk: entry.key.clone(),
        why,
    };
    let state = entry
        .uploader
        .lock()
        .map_err(|_| not_open("its uploader failed"))?
        .as_ref()
        .map(|u| u.state().clone())
        .ok_or_else(|| not_open("it is not open"))?;
    let started = std::time::Instant::now();
    let map = BlockSums::of_replica(&disk, &state, seq, disk_bytes, scratch).map_err(replica)?;
    tracing::info!(disk = %entry.key, seq, blocks = map.sums.len(), seconds = started.elapsed().as_secs_f64(), "checksum map made for a resync");
    Ok((map, permit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_wait_for_the_budget_and_free_it_when_dropped() {
        static B: Budget = Budget::new(1000);
        let first = B.take(600);
        assert_eq!(B.held(), 600);
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let p = B.take(600);
            tx.send(()).unwrap();
            p
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "600 more do not fit beside 600 in 1000"
        );
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("taken once the first is given back");
        let second = waiter.join().unwrap();
        assert_eq!(B.held(), 600);
        drop(second);
        assert_eq!(B.held(), 0);
        // One larger than the whole budget takes all of it, not forever.
        let all = B.take(5000);
        assert_eq!(B.held(), 1000);
        drop(all);
    }
}
