//! Every disk the process server has seen: its watermarks, its uploader, and which
//! connection holds it. Shared by all shards, touched once per session start and once
//! per upload batch, never per frame.
//!
//! A disk has at most one live session. A new session for a disk asks the old one to
//! stop and waits for it to end. If the disk's cached, not yet uploaded writes sit in
//! another shard's cache log, the new session also waits until they are uploaded, so
//! each disk's pending writes live in one log and upload in order.
//!
//! Fencing (docs/storage-format.md 3): a session claims the disk in the replica unless
//! this server owns it already; once the replica's writer epoch is past this server's
//! claim, the disk is fenced here: its cached writes are dropped, never uploaded, its
//! session (if any) is ended, and the fencing is queued for the control plane.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_link::control::wire::FencedDisk;
use ferry_link::log::Position;
use ferry_replica::{Store, VaultKey};
use tokio::sync::Notify;

use crate::upload::DiskUploader;
use ferry_link::protocol::ErrorCode;

use super::claims::{ClaimRecord, Claims};
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
    /// Which cached frames of the disk are from an older claim (never uploaded).
    stale: Mutex<Stale>,
}

/// What of a disk's cache is stale: `claim`'s view (see `claims::ClaimRecord`), or,
/// once fenced, everything cached so far.
#[derive(Default)]
struct Stale {
    /// Read from the claims dir on first use; kept here from then on.
    loaded: bool,
    /// This server's claim on record, as last written.
    claim: Option<ClaimRecord>,
    /// Fenced and not claimed since: every cached frame of the disk is stale.
    fenced: bool,
    /// The epoch of the last fencing reported, so one is reported once.
    reported: Option<u64>,
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
    /// This server's claim on record, read once.
    fn claim_on_record(&self, reg: &Registry) -> ferry_replica::Result<Option<ClaimRecord>> {
        let mut st = self.stale.lock().expect("stale lock");
        if !st.loaded {
            st.claim = reg.claims.get(&self.machine, &self.disk)?;
            st.loaded = true;
        }
        Ok(st.claim.clone())
    }

    /// Opens the uploader if needed, under the claim on record (blocking: call off
    /// the event loop). Returns whether this server may still commit to the disk; if
    /// not, the disk is fenced here (`fence`).
    pub fn open(&self, reg: &Registry) -> ferry_replica::Result<bool> {
        let claim = self.claim_on_record(reg)?;
        let mut up = self.uploader.lock().expect("uploader lock");
        if up.is_none() {
            let u = DiskUploader::open(
                &reg.store,
                &reg.vault,
                &self.machine,
                &self.disk,
                claim.as_ref(),
            )?
            .with_orphan_grace(self.orphan_grace);
            if u.owns() {
                self.uploaded.fetch_max(u.uploaded(), Ordering::SeqCst);
                self.durable.fetch_max(u.uploaded(), Ordering::SeqCst);
            }
            *up = Some(u);
        }
        let u = up.as_ref().expect("opened above");
        if u.owns() {
            return Ok(true);
        }
        self.fence(reg, u);
        Ok(false)
    }

    /// Opens the disk for a session: folds the replica again and, unless this server
    /// owns the disk under its own claim, claims it. Returns the replica's `next_seq`
    /// when the claim dropped what this server had cached (it did not own the disk):
    /// the session's watermarks start there.
    pub fn open_for_session(&self, reg: &Registry) -> ferry_replica::Result<Option<u64>> {
        let claim = self.claim_on_record(reg)?;
        let mut up = self.uploader.lock().expect("uploader lock");
        match up.as_mut() {
            Some(u) => {
                if let Err(e) = u.reload() {
                    if !(u.owns() && claim.is_some()) {
                        return Err(e);
                    }
                    // Owned as last folded: served from that, so sessions go on while
                    // the store is down (the cache takes the writes). Should another
                    // server have claimed the disk meanwhile, the next commit is a
                    // conflict and fences this one; the agent's resync refills.
                    tracing::warn!(disk = %self.key, error = %e, "the replica cannot be read: serving the session under this server's claim as last folded");
                }
            }
            None => {
                *up = Some(
                    DiskUploader::open(
                        &reg.store,
                        &reg.vault,
                        &self.machine,
                        &self.disk,
                        claim.as_ref(),
                    )?
                    .with_orphan_grace(self.orphan_grace),
                )
            }
        }
        let u = up.as_mut().expect("opened above");
        let owned = u.owns();
        if owned && claim.is_some() {
            self.uploaded.fetch_max(u.uploaded(), Ordering::SeqCst);
            self.durable.fetch_max(u.uploaded(), Ordering::SeqCst);
            return Ok(None);
        }
        if !owned {
            self.fence(reg, u);
        }
        let rec = u.claim(&reg.claims, owned)?;
        tracing::info!(disk = %self.key, epoch = rec.epoch, kept_cache = rec.kept_cache, "claimed the disk in the replica");
        let mut st = self.stale.lock().expect("stale lock");
        st.claim = Some(rec);
        st.fenced = false;
        if owned {
            self.uploaded.fetch_max(u.uploaded(), Ordering::SeqCst);
            self.durable.fetch_max(u.uploaded(), Ordering::SeqCst);
            return Ok(None);
        }
        let n = u.uploaded();
        self.uploaded.store(n, Ordering::SeqCst);
        self.durable.store(n, Ordering::SeqCst);
        Ok(Some(n))
    }

    /// The replica's writer epoch is past this server's claim: from now on every
    /// cached frame of the disk is stale, its session (if any) is asked to end, and
    /// the fencing is logged and queued for the control plane once per epoch.
    fn fence(&self, reg: &Registry, u: &DiskUploader) {
        let state = u.state();
        let n = u.uploaded();
        // A server that never claimed the disk and holds nothing of it (a first
        // session here) has nothing to report.
        let cached = self.durable.load(Ordering::SeqCst) > n;
        // Nothing cached here counts any more: a session elsewhere must not wait for
        // it to upload (`claim`), and the watermarks are the replica's.
        self.uploaded.store(n, Ordering::SeqCst);
        self.durable.store(n, Ordering::SeqCst);
        {
            let slot = self.slot.lock().expect("slot lock");
            if let Some(s) = &slot.stop {
                s.notify_one();
            }
        }
        let mut st = self.stale.lock().expect("stale lock");
        st.fenced = true;
        if st.reported == Some(state.epoch) || !(cached || st.claim.is_some()) {
            return;
        }
        st.reported = Some(state.epoch);
        let new_writer = state.writer.clone().unwrap_or_default();
        tracing::warn!(
            disk = %self.key,
            held_epoch = u.held_epoch(),
            epoch = state.epoch,
            new_writer = %new_writer,
            "fenced: another process server claimed the disk; its cached writes here are dropped, never uploaded"
        );
        reg.queue_fencing(FencedDisk {
            machine: self.machine.clone(),
            disk: self.disk.clone(),
            epoch: state.epoch,
            new_writer,
            dropped_bytes: 0,
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
    }

    /// Whether a cached frame of the disk at `at` in `shard` is from an older claim
    /// (or this server is fenced): the upload stage drops it.
    pub fn is_stale(&self, shard: usize, at: Position) -> bool {
        let st = self.stale.lock().expect("stale lock");
        st.fenced || st.claim.as_ref().is_some_and(|c| c.stale(shard, at))
    }

    /// A session cached its Hello at `at` in `shard`. Returns the claim to write on
    /// record when this marks where the claim's writes begin in that shard.
    pub fn cached_hello(&self, shard: usize, at: Position) -> Option<ClaimRecord> {
        let mut st = self.stale.lock().expect("stale lock");
        let c = st.claim.as_mut()?;
        c.note_start(shard, at).then(|| c.clone())
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
    /// This server's claims on disks and its name.
    pub claims: Claims,
    /// Fencings not yet answered by the control plane, oldest first, numbered.
    fencings: Mutex<Fencings>,
}

/// The most fencings kept for the control plane; older ones are only logged.
const MAX_QUEUED_FENCINGS: usize = 1024;

#[derive(Default)]
struct Fencings {
    next: u64,
    queue: VecDeque<(u64, FencedDisk)>,
}

impl Registry {
    pub fn new(store: Store, vault: VaultKey, claims: Claims) -> Registry {
        Registry {
            disks: Mutex::new(HashMap::new()),
            store,
            vault,
            orphan_grace: ferry_replica::grace::ORPHAN_GRACE,
            claims,
            fencings: Mutex::new(Fencings::default()),
        }
    }

    fn queue_fencing(&self, f: FencedDisk) {
        let mut q = self.fencings.lock().expect("fencings lock");
        if q.queue.len() >= MAX_QUEUED_FENCINGS {
            if let Some((_, old)) = q.queue.pop_front() {
                tracing::warn!(machine = %old.machine, disk = %old.disk, "too many fencings waiting for the control plane: the oldest is only logged");
            }
        }
        let n = q.next;
        q.next += 1;
        q.queue.push_back((n, f));
    }

    /// Counts cached bytes of `key` dropped as stale into its newest waiting fencing.
    pub fn note_dropped(&self, key: &str, bytes: u64) {
        let mut q = self.fencings.lock().expect("fencings lock");
        let Some((machine, disk)) = key.split_once('/') else {
            return;
        };
        if let Some((_, f)) = q
            .queue
            .iter_mut()
            .rev()
            .find(|(_, f)| f.machine == machine && f.disk == disk)
        {
            f.dropped_bytes = f.dropped_bytes.saturating_add(bytes);
        }
    }

    /// The oldest `max` fencings waiting, and the number to pass to `answered` once a
    /// heartbeat carrying them is answered.
    pub fn fencings(&self, max: usize) -> (Vec<FencedDisk>, Option<u64>) {
        let q = self.fencings.lock().expect("fencings lock");
        let sent: Vec<_> = q.queue.iter().take(max).collect();
        let last = sent.last().map(|(n, _)| *n);
        (sent.into_iter().map(|(_, f)| f.clone()).collect(), last)
    }

    /// The control plane answered a heartbeat carrying the fencings up to `last`.
    pub fn fencings_answered(&self, last: u64) {
        let mut q = self.fencings.lock().expect("fencings lock");
        while q.queue.front().is_some_and(|(n, _)| *n <= last) {
            q.queue.pop_front();
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
                    stale: Mutex::new(Stale::default()),
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
