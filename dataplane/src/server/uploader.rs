//! The upload stage of one shard, on its own thread, off the acknowledgement path: it
//! reads the shard's cache log behind the durable position, groups frames by disk,
//! seals each disk's run into one segment (zstd + AES-256-GCM) and commits it with
//! its recovery points. A failing store is retried with backoff while the cache holds
//! the data; once a batch is committed, the cache files before it are freed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cache::Tailer;
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
    let mut tail = Tailer::new(&shard.dir, shard.first);
    let mut noticed: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let durable = *shard.durable.lock().expect("durable lock");
        if tail.position() >= durable {
            *status.behind_since.lock().expect("status lock") = None;
            noticed = None;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let since = *noticed.get_or_insert_with(Instant::now);
        status
            .behind_since
            .lock()
            .expect("status lock")
            .get_or_insert(since);
        let backlog = shard.backlog.load(Ordering::Relaxed) as usize;
        if backlog < opts.batch_bytes && since.elapsed() < opts.batch_delay {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let batch = match tail.read(durable, opts.batch_bytes.max(1 << 20)) {
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
        for key in order {
            if !upload_disk(&shard, &registry, &status, &stop, key, &groups[key]) {
                return;
            }
        }
        *shard.released.lock().expect("released lock") = tail.position();
        // Lag is the age of the oldest write still waiting: this batch is in.
        *status.behind_since.lock().expect("status lock") = None;
        let _ = shard
            .backlog
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(read))
            });
        noticed = None;
    }
}

/// Uploads one disk's frames, retrying until it works or the server stops. Returns
/// false when stopped.
fn upload_disk(
    shard: &ShardShared,
    registry: &Registry,
    status: &UploadStatus,
    stop: &AtomicBool,
    key: &str,
    payloads: &[&[u8]],
) -> bool {
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
    let mut backoff = Duration::from_millis(100);
    loop {
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
                if status.failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!(shard = shard.id, disk = key, "blob storage works again");
                }
                return true;
            }
            Err(e) => {
                // The commit may have landed with its reply lost: reopen from the
                // store next time, so the retry starts from what is really there.
                *entry.uploader.lock().expect("uploader lock") = None;
                status.failing.store(true, Ordering::Relaxed);
                tracing::warn!(shard = shard.id, disk = key, error = %e, retry_in = ?backoff, "upload failed; the cache keeps the data");
                let until = Instant::now() + backoff;
                while Instant::now() < until {
                    if stop.load(Ordering::Relaxed) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
