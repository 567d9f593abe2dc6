//! Every disk the process server has seen: its watermarks, its uploader, and which
//! connection holds it. Shared by all shards, touched once per session start and once
//! per upload batch, never per frame.
//!
//! A disk has at most one live session. A new session for a disk asks the old one to
//! stop and waits for it to end. If the disk's cached, not yet uploaded writes sit in
//! another shard's cache log, the new session also waits until they are uploaded, so
//! each disk's pending writes live in one log and upload in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_replica::{Store, VaultKey};
use tokio::sync::Notify;

use crate::upload::DiskUploader;
use ferry_link::protocol::ErrorCode;

use super::session::Reject;

pub struct DiskEntry {
    /// "machine/disk", the cache log's name for it.
    pub key: String,
    pub machine: String,
    pub disk: String,
    /// Every write below this is durable in some shard's cache (or uploaded).
    pub durable: AtomicU64,
    /// Every write below this is committed in blob storage.
    pub uploaded: AtomicU64,
    slot: Mutex<Slot>,
    /// Opened on first use (it reads the replica's state from the store).
    pub uploader: Mutex<Option<DiskUploader>>,
    /// The orphan grace its uploads are held to (the registry's).
    orphan_grace: Duration,
}

#[derive(Default)]
struct Slot {
    live: Option<u64>,
    stop: Option<Arc<Notify>>,
    /// The shard whose cache log holds this disk's newest writes.
    home: Option<usize>,
}

/// A session's hold on a disk; give it back with `DiskEntry::release`.
pub struct Claim {
    pub conn: u64,
}

impl DiskEntry {
    /// Opens the uploader if needed (blocking: call off the event loop) and returns
    /// the uploaded watermark.
    pub fn open(&self, store: &Store, vault: &VaultKey) -> ferry_replica::Result<u64> {
        let mut up = self.uploader.lock().expect("uploader lock");
        if up.is_none() {
            let u = DiskUploader::open(store, vault, &self.machine, &self.disk)?
                .with_orphan_grace(self.orphan_grace);
            self.uploaded.fetch_max(u.uploaded(), Ordering::SeqCst);
            self.durable.fetch_max(u.uploaded(), Ordering::SeqCst);
            *up = Some(u);
        }
        Ok(self.uploaded.load(Ordering::SeqCst))
    }

    /// Whether a session holds the disk now.
    pub fn is_live(&self) -> bool {
        self.slot.lock().expect("slot lock").live.is_some()
    }

    pub fn is_open(&self) -> bool {
        self.uploader.lock().expect("uploader lock").is_some()
    }

    /// Records that `shard`'s log holds writes of this disk (recovery).
    pub fn set_home(&self, shard: usize) {
        self.slot.lock().expect("slot lock").home = Some(shard);
    }

    /// Takes the disk for connection `conn` on `shard`; waits up to `limit` for an
    /// earlier session to end and, if its writes are in another shard, to upload.
    pub async fn claim(
        &self,
        shard: usize,
        conn: u64,
        stop: Arc<Notify>,
        limit: Duration,
    ) -> Result<Claim, Reject> {
        let deadline = Instant::now() + limit;
        loop {
            {
                let mut slot = self.slot.lock().expect("slot lock");
                match &slot.live {
                    Some(_) => {
                        if let Some(s) = &slot.stop {
                            s.notify_one();
                        }
                    }
                    None => {
                        let drained = self.uploaded.load(Ordering::SeqCst)
                            >= self.durable.load(Ordering::SeqCst);
                        if slot.home.is_none_or(|h| h == shard) || drained {
                            slot.live = Some(conn);
                            slot.stop = Some(stop);
                            slot.home = Some(shard);
                            return Ok(Claim { conn });
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(Reject {
                    code: ErrorCode::Unavailable,
                    reason: format!(
                        "disk {} is still held by an earlier session or its writes are still uploading; retry",
                        self.key
                    ),
                });
            }
            compio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn release(&self, claim: Claim) {
        let mut slot = self.slot.lock().expect("slot lock");
        if slot.live == Some(claim.conn) {
            slot.live = None;
            slot.stop = None;
        }
    }
}

pub struct Registry {
    disks: Mutex<HashMap<String, Arc<DiskEntry>>>,
    pub store: Store,
    pub vault: VaultKey,
    /// The grace compaction of this store gives unreferenced objects; every upload
    /// commits well within it (`ferry_replica::grace`).
    orphan_grace: Duration,
}

impl Registry {
    pub fn new(store: Store, vault: VaultKey) -> Registry {
        Registry {
            disks: Mutex::new(HashMap::new()),
            store,
            vault,
            orphan_grace: ferry_replica::grace::ORPHAN_GRACE,
        }
    }

    /// Holds uploads to another orphan grace (tests shorten compaction's and this).
    pub fn with_orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// The entry for `key` ("machine/disk"), created on first use.
    pub fn entry(&self, key: &str) -> Arc<DiskEntry> {
        let mut disks = self.disks.lock().expect("registry lock");
        disks
            .entry(key.to_string())
            .or_insert_with(|| {
                let (machine, disk) = key.split_once('/').unwrap_or((key, ""));
                Arc::new(DiskEntry {
                    key: key.to_string(),
                    machine: machine.to_string(),
                    disk: disk.to_string(),
                    durable: AtomicU64::new(0),
                    uploaded: AtomicU64::new(0),
                    slot: Mutex::new(Slot::default()),
                    uploader: Mutex::new(None),
                    orphan_grace: self.orphan_grace,
                })
            })
            .clone()
    }

    /// The machines with at least one disk in a session now, sorted, each once.
    pub fn connected_machines(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .all()
            .iter()
            .filter(|e| e.is_live())
            .map(|e| e.machine.clone())
            .collect();
        m.sort();
        m.dedup();
        m
    }

    pub fn all(&self) -> Vec<Arc<DiskEntry>> {
        self.disks
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }
}
