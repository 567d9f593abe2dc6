//! Checksum maps for an agent's checksum resync: the block checksums of the replica
//! holding every write below a sequence number, so the agent sends only the blocks
//! that differ (docs/protocol.md, Checksum resync).
//!
//! The map is made off the shard: once the upload stage has committed everything
//! below the sequence asked for, a thread of its own rebuilds that state into a sparse
//! scratch file in the cache directory and hashes it (or reads a seed's checksum map
//! when one describes that state). One map is made at a time per server, so memory
//! (16 bytes per block) and scratch space are bounded by the largest disk.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_replica::sums::BlockSums;
use ferry_replica::{Disk, Store, VaultKey};

use super::registry::{DiskEntry, Registry};
use crate::protocol::SUM_BYTES;

/// The largest map made (and held while it is sent): 16 bytes per block.
pub const MAX_MAP_BYTES: u64 = 1 << 30;

/// Serialises map making across the server.
pub static GATE: Mutex<()> = Mutex::new(());

/// A finished map, being sent in chunks.
pub struct Outgoing {
    pub seq: u64,
    pub map: BlockSums,
    /// Index of the next block to send.
    pub next: usize,
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
) -> Result<BlockSums, String> {
    while entry.uploaded.load(Ordering::SeqCst) < seq {
        if !alive() {
            return Err("the session ended".into());
        }
        compio::time::sleep(Duration::from_millis(20)).await;
    }
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
        .name("ferry-sums".into())
        .spawn(move || {
            let _one = GATE.lock().unwrap_or_else(|p| p.into_inner());
            let _ = tx.send(make(
                &entry,
                &registry.store,
                &registry.vault,
                &scratch,
                seq,
                disk_bytes,
            ));
        })
        .map_err(|e| format!("starting the checksum thread: {e}"))?;
    rx.await
        .unwrap_or_else(|_| Err("the checksum thread died".into()))
}

fn make(
    entry: &DiskEntry,
    store: &Store,
    vault: &VaultKey,
    scratch: &std::path::Path,
    seq: u64,
    disk_bytes: u64,
) -> Result<BlockSums, String> {
    let state = entry
        .uploader
        .lock()
        .map_err(|_| "the disk's uploader failed".to_string())?
        .as_ref()
        .map(|u| u.state().clone())
        .ok_or("the disk is not open")?;
    let disk = store
        .block(Disk::open(store, &entry.machine, &entry.disk, Some(vault)))
        .map_err(|e| e.to_string())?;
    let blocks = BlockSums::blocks_for(disk_bytes, disk.info.block_bytes) as u64;
    if blocks * SUM_BYTES as u64 > MAX_MAP_BYTES {
        return Err(format!(
            "a checksum map of {blocks} blocks exceeds the {MAX_MAP_BYTES}-byte limit (disks up to 4 TiB at 64 KiB blocks)"
        ));
    }
    let started = std::time::Instant::now();
    let map = BlockSums::of_replica(&disk, &state, seq, disk_bytes, scratch)
        .map_err(|e| e.to_string())?;
    tracing::info!(disk = %entry.key, seq, blocks = map.sums.len(), seconds = started.elapsed().as_secs_f64(), "checksum map made for a resync");
    Ok(map)
}
