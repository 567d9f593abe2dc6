//! The upload stage of one shard, on its own thread, off the acknowledgement path: it
//! reads the shard's cache log behind the durable position, groups frames by disk,
//! seals each disk's run into one segment (zstd + AES-256-GCM) and commits it with
//! its recovery points. Once a batch is committed, the cache files before it are freed.
//!
//! A failed upload holds back its own disk only: the others go on, and the failing
//! disk is retried with backoff by reading the cache again from where it stopped (the
//! replica's watermark skips what is already in), while the cache keeps everything
//! from there on. When every upload of a batch fails, storage is down for all: the
//! stage stops reading on and only retries, so an outage costs no re-reading.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cache::{Position, Tailer};
use crate::protocol::{decode, Decoded, Frame};

use super::options::Options;
use super::registry::Registry;
use super::shard::ShardShared;

/// What the upload stage publishes for metrics and health.
#[derive(Default)]
pub struct UploadStatus {
    /// Since when durable data has been waiting for blob storage.
    pub behind_since: Mutex<Option<Instant>>,
    pub failing: AtomicBool,
    /// Disks held back by failing uploads.
    pub failing_disks: AtomicU64,
    pub plain_bytes: AtomicU64,
    pub sealed_bytes: AtomicU64,
}

impl UploadStatus {
    pub fn lag_s(&self) -> f64 {
        self.behind_since
            .lock()
            .expect("status lock")
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
    }
}

/// A disk whose upload failed. The others go on; its frames from `from` on are retried
/// by reading the cache again from there, with backoff, and the cache is not freed
/// past `from` until they are in.
struct Stuck {
    /// Every frame of the disk before this position is uploaded.
    from: Position,
    /// Since when its oldest waiting write has waited (for the upload lag).
    since: Instant,
    next_try: Instant,
    backoff: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub fn run(
    shard: Arc<ShardShared>,
    registry: Arc<Registry>,
    opts: Arc<Options>,
    status: Arc<UploadStatus>,
    stop: Arc<AtomicBool>,
) {
    // Sealing is bulk work that may wait; acknowledgements may not. SCHED_IDLE: the
    // thread runs only on CPU time nothing else wants, so a batch being compressed
    // never delays a shard or a cache sync (at half load on two cores, nice +10 still
    // left the server's ack p99 at 7 ms, SCHED_IDLE 3.9 ms). A saturated host starves
    // it, the cache fills and agents are throttled: the backpressure that is wanted.
    // SAFETY: sched_setscheduler on this thread (0) with a valid parameter; failure
    // only leaves the default policy.
    unsafe {
        let p = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &p);
    }
    let read_max = opts.batch_bytes.max(1 << 20);
    let mut tail = Tailer::new(&shard.dir, shard.first);
    let mut stuck: BTreeMap<String, Stuck> = BTreeMap::new();
    // False after a batch in which every upload tried failed: storage is down for all,
    // and reading on would only pile up disks to retry one by one.
    let mut flowing = true;
    let mut noticed: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let upto = tail.position();
        if catch_up(
            &shard, &registry, &status, &mut stuck, upto, read_max, &stop,
        ) {
            flowing = true;
        }
        publish(&shard, &status, &stuck, tail.position(), None);
        if !flowing && !stuck.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let durable = *shard.durable.lock().expect("durable lock");
        if tail.position() >= durable {
            noticed = None;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let since = *noticed.get_or_insert_with(Instant::now);
        publish(&shard, &status, &stuck, tail.position(), Some(since));
        let backlog = shard.backlog.load(Ordering::Relaxed) as usize;
        if backlog < opts.batch_bytes && since.elapsed() < opts.batch_delay {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let at = tail.position();
        let batch = match tail.read(durable, read_max) {
            Ok(b) => b,
            Err(e) => {
                status.failing.store(true, Ordering::Relaxed);
                tracing::error!(shard = shard.id, error = %e, "cannot read the cache for upload");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let mut read = 0u64;
        // Group by disk, keeping each disk's frames in log order; the payloads stay
        // where the tail read them.
        let mut order: Vec<&str> = Vec::new();
        let mut groups: HashMap<&str, Vec<&[u8]>> = HashMap::new();
        for e in batch.iter() {
            read += e.payload.len() as u64;
            groups
                .entry(e.disk)
                .or_insert_with(|| {
                    order.push(e.disk);
                    Vec::new()
                })
                .push(e.payload);
        }
        let (mut ok, mut failed) = (0, 0);
        for key in order {
            // A stuck disk's frames here are read again when it is retried.
            if stuck.contains_key(key) {
                continue;
            }
            match upload_once(&shard, &registry, &status, key, &groups[key]) {
                Ok(()) => ok += 1,
                Err(e) => {
                    failed += 1;
                    tracing::warn!(shard = shard.id, disk = key, error = %e, retry_in = ?FIRST_BACKOFF, "upload failed; the cache keeps the data, the disk's other writes wait, other disks go on");
                    stuck.insert(
                        key.to_string(),
                        Stuck {
                            from: at,
                            since,
                            next_try: Instant::now() + FIRST_BACKOFF,
                            backoff: FIRST_BACKOFF,
                        },
                    );
                }
            }
        }
        flowing = failed == 0 || ok > 0;
        if failed == 0 && stuck.is_empty() {
            status.failing.store(false, Ordering::Relaxed);
        }
        let _ = shard
            .backlog
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(read))
            });
        // Lag is the age of the oldest write still waiting: this batch is in, but for
        // the disks that are stuck.
        noticed = None;
        publish(&shard, &status, &stuck, tail.position(), None);
    }
}

/// Frees the cache up to what every disk has uploaded, and publishes the lag (the
/// age of the oldest write waiting: `waiting`, or a stuck disk's) and the alert.
fn publish(
    shard: &ShardShared,
    status: &UploadStatus,
    stuck: &BTreeMap<String, Stuck>,
    read: Position,
    waiting: Option<Instant>,
) {
    let released = stuck.values().map(|s| s.from).fold(read, Position::min);
    *shard.released.lock().expect("released lock") = released;
    let oldest = stuck.values().map(|s| s.since).chain(waiting).min();
    *status.behind_since.lock().expect("status lock") = oldest;
    status
        .failing_disks
        .store(stuck.len() as u64, Ordering::Relaxed);
}

/// Retries every stuck disk whose time has come: reads the cache from where the disk
/// stopped up to `upto` (where the main read is; later frames come through it) and
/// uploads that disk's frames only. Returns whether a disk got further.
fn catch_up(
    shard: &ShardShared,
    registry: &Registry,
    status: &UploadStatus,
    stuck: &mut BTreeMap<String, Stuck>,
    upto: Position,
    read_max: usize,
    stop: &AtomicBool,
) -> bool {
    /// Why a retry stopped short.
    enum Short {
        Stopped,
        Cache(String),
        Upload(String),
    }
    let now = Instant::now();
    let due: Vec<String> = stuck
        .iter()
        .filter(|(_, s)| s.next_try <= now)
        .map(|(k, _)| k.clone())
        .collect();
    let mut progressed = false;
    for key in due {
        let s = stuck.get_mut(&key).expect("listed above");
        let mut side = Tailer::new(&shard.dir, s.from);
        let result = loop {
            if side.position() >= upto {
                break Ok(());
            }
            // Far behind, this reads for a while: a stopping server does not wait.
            if stop.load(Ordering::Relaxed) {
                break Err(Short::Stopped);
            }
            let batch = match side.read(upto, read_max) {
                Ok(b) => b,
                Err(e) => break Err(Short::Cache(e.to_string())),
            };
            let mine: Vec<&[u8]> = batch
                .iter()
                .filter(|e| e.disk == key)
                .map(|e| e.payload)
                .collect();
            if !mine.is_empty() {
                if let Err(e) = upload_once(shard, registry, status, &key, &mine) {
                    break Err(Short::Upload(e));
                }
                progressed = true;
            }
            s.from = side.position();
        };
        let error = match result {
            Ok(()) => {
                stuck.remove(&key);
                progressed = true;
                if stuck.is_empty() {
                    status.failing.store(false, Ordering::Relaxed);
                }
                tracing::info!(
                    shard = shard.id,
                    disk = key,
                    "uploads work again for this disk"
                );
                continue;
            }
            Err(Short::Stopped) => return progressed,
            Err(Short::Cache(e)) => {
                tracing::error!(shard = shard.id, disk = key, error = %e, "cannot read the cache to retry a disk's uploads");
                e
            }
            // Warned when it first failed; an outage of many disks would otherwise
            // log each of them every few seconds.
            Err(Short::Upload(e)) => e,
        };
        s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
        s.next_try = Instant::now() + s.backoff;
        status.failing.store(true, Ordering::Relaxed);
        tracing::debug!(shard = shard.id, disk = key, error = %error, retry_in = ?s.backoff, "upload failed again; the cache keeps the data");
    }
    progressed
}

/// Uploads one disk's frames, once.
fn upload_once(
    shard: &ShardShared,
    registry: &Registry,
    status: &UploadStatus,
    key: &str,
    payloads: &[&[u8]],
) -> Result<(), String> {
    let frames: Vec<Frame<'_>> = payloads
        .iter()
        .filter_map(|p| match decode(p, u32::MAX) {
            Ok(Decoded::Frame(f, _)) => Some(f),
            _ => {
                tracing::error!(
                    shard = shard.id,
                    disk = key,
                    "a cached frame does not decode; skipped"
                );
                None
            }
        })
        .collect();
    let entry = registry.entry(key);
    let result = entry.open(&registry.store, &registry.vault).and_then(|_| {
        let mut guard = entry.uploader.lock().expect("uploader lock");
        let up = guard.as_mut().expect("opened above");
        let (p0, s0) = (up.plain_bytes, up.sealed_bytes);
        let w = up.upload(&frames)?;
        status
            .plain_bytes
            .fetch_add(up.plain_bytes - p0, Ordering::Relaxed);
        status
            .sealed_bytes
            .fetch_add(up.sealed_bytes - s0, Ordering::Relaxed);
        Ok(w)
    });
    match result {
        Ok(w) => {
            entry.uploaded.fetch_max(w, Ordering::SeqCst);
            Ok(())
        }
        Err(e) => {
            // The commit may have landed with its reply lost: reopen from the store
            // next time, so the retry starts from what is really there.
            *entry.uploader.lock().expect("uploader lock") = None;
            status.failing.store(true, Ordering::Relaxed);
            Err(e.to_string())
        }
    }
}
