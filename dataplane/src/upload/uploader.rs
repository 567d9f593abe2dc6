//! The upload stage of one shard, on its own thread, off the acknowledgement path: it
//! reads the shard's cache log behind the durable position, groups frames by disk,
//! seals each disk's run into one segment (zstd + AES-256-GCM) and commits it with
//! its recovery points. Once a batch is committed, the cache files before it are freed.
//!
//! A failed upload holds back its own disk only: the others go on, and the failing
//! disks are retried together with backoff, in one pass that reads the cache again
//! from the oldest place one of them stopped (the replica's watermark skips what is
//! already in), while the cache keeps everything from there on (decision 0011).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_link::log::{Position, Tailer};
use ferry_link::protocol::{decode, payload_bytes, Decoded, Frame};

use crate::server::options::Options;
use crate::server::registry::Registry;
use crate::server::shard::ShardShared;

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
/// by reading the cache again from there, and the cache is not freed past `from` until
/// they are in.
struct Stuck {
    /// Every frame of the disk before this position is uploaded.
    from: Position,
    /// Since when its oldest waiting write has waited (for the upload lag).
    since: Instant,
}

/// When the stuck disks are retried next: all of them in one pass over the cache, so
/// an outage of many disks costs one pass per retry, not one per disk.
struct Retry {
    next: Instant,
    backoff: Duration,
}

/// Where each batch of the main reader began and since when its data had waited:
/// what a stuck disk's lag is reckoned from once a catch-up has moved it on.
#[derive(Default)]
struct Marks(VecDeque<(Position, Instant)>);

impl Marks {
    fn push(&mut self, at: Position, since: Instant) {
        self.0.push_back((at, since));
    }

    /// Since when the data at `pos` has waited, at the latest: the wait of the batch
    /// holding it (its data became durable no earlier than its batch's first).
    fn since_at(&self, pos: Position) -> Option<Instant> {
        self.0
            .iter()
            .take_while(|(at, _)| *at <= pos)
            .last()
            .map(|(_, since)| *since)
    }

    /// Keeps only what the stuck disks may still need.
    fn trim(&mut self, stuck: &BTreeMap<String, Stuck>) {
        match stuck.values().map(|s| s.from).min() {
            None => self.0.clear(),
            Some(oldest) => {
                while self.0.get(1).is_some_and(|(at, _)| *at <= oldest) {
                    self.0.pop_front();
                }
            }
        }
    }
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
    ferry_replica::store::idle_thread();
    let read_max = opts.batch_bytes.max(1 << 20);
    let mut tail = Tailer::new(&shard.dir, shard.first);
    let mut stuck: BTreeMap<String, Stuck> = BTreeMap::new();
    let mut retry = Retry {
        next: Instant::now(),
        backoff: FIRST_BACKOFF,
    };
    let mut noticed: Option<Instant> = None;
    let mut marks = Marks::default();
    while !stop.load(Ordering::Relaxed) {
        let upto = tail.position();
        let pass = Pass {
            shard: &shard,
            registry: &registry,
            status: &status,
            upto,
            read_max,
            stop: &stop,
        };
        pass.catch_up(&mut stuck, &mut retry, &marks);
        marks.trim(&stuck);
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
        let read: u64 = batch.iter().map(|e| e.payload.len() as u64).sum();
        marks.push(at, since);
        let mut all_in = true;
        for (key, frames) in by_disk(&batch) {
            // A stuck disk's frames here are read again when it is retried.
            if stuck.contains_key(key) {
                continue;
            }
            if let Err(e) = upload_once(&shard, &registry, &status, key, &frames) {
                all_in = false;
                if stuck.is_empty() {
                    retry = Retry {
                        next: Instant::now() + FIRST_BACKOFF,
                        backoff: FIRST_BACKOFF,
                    };
                }
                tracing::warn!(shard = shard.id, disk = key, error = %e, "upload failed; the cache keeps the data, the disk's other writes wait, other disks go on");
                stuck.insert(key.to_string(), Stuck { from: at, since });
            }
        }
        if all_in && stuck.is_empty() {
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

/// One cached record: where it lies in the log, and its frame.
type Cached<'a> = (Position, &'a [u8]);

/// A batch's frames by disk, each disk's in log order, disks in order of first
/// appearance; the payloads stay where the tail read them.
fn by_disk<'a>(batch: &ferry_link::log::Batch<'a>) -> Vec<(&'a str, Vec<Cached<'a>>)> {
    let mut out: Vec<(&'a str, Vec<Cached<'a>>)> = Vec::new();
    let mut index: HashMap<&'a str, usize> = HashMap::new();
    for e in batch.iter() {
        let i = *index.entry(e.disk).or_insert_with(|| {
            out.push((e.disk, Vec::new()));
            out.len() - 1
        });
        out[i].1.push((e.at, e.payload));
    }
    out
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

/// One retry of the stuck disks.
struct Pass<'a> {
    shard: &'a ShardShared,
    registry: &'a Registry,
    status: &'a UploadStatus,
    /// Where the main reader is: later frames come through it.
    upto: Position,
    read_max: usize,
    stop: &'a AtomicBool,
}

impl Pass<'_> {
    /// If it is time: reads the cache once from the oldest stuck position up to
    /// `upto`, offering each stuck disk its frames. A disk that fails is not offered
    /// more in this pass; the pass ends early once every stuck disk has failed (an
    /// outage: one batch read). Disks that reach `upto` are stuck no more.
    fn catch_up(&self, stuck: &mut BTreeMap<String, Stuck>, retry: &mut Retry, marks: &Marks) {
        if stuck.is_empty() || Instant::now() < retry.next {
            return;
        }
        let start = stuck.values().map(|s| s.from).min().expect("not empty");
        let mut side = Tailer::new(&self.shard.dir, start);
        let mut failed: HashSet<String> = HashSet::new();
        let mut whole = true;
        while side.position() < self.upto && failed.len() < stuck.len() {
            // Far behind, this reads for a while: a stopping server does not wait.
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let batch = match side.read(self.upto, self.read_max) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(shard = self.shard.id, error = %e, "cannot read the cache to retry stuck disks");
                    whole = false;
                    break;
                }
            };
            let end = batch.end();
            for (key, frames) in by_disk(&batch) {
                let Some(s) = stuck.get(key) else { continue };
                if s.from >= end || failed.contains(key) {
                    continue;
                }
                // Frames before `from` are offered too; the replica skips them.
                if let Err(e) = upload_once(self.shard, self.registry, self.status, key, &frames) {
                    tracing::debug!(shard = self.shard.id, disk = key, error = %e, "upload failed again; the cache keeps the data");
                    failed.insert(key.to_string());
                }
            }
            // Whatever did not fail here has everything before `end` in; what it
            // still waits for is younger.
            for (key, s) in stuck.iter_mut() {
                if !failed.contains(key) && s.from < end {
                    s.from = end;
                    if let Some(t) = marks.since_at(end) {
                        s.since = s.since.max(t);
                    }
                }
            }
            // A long catch-up frees the cache as it goes.
            publish(self.shard, self.status, stuck, self.upto, None);
        }
        if whole && side.position() >= self.upto {
            stuck.retain(|key, _| {
                let back = !failed.contains(key);
                if back {
                    tracing::info!(
                        shard = self.shard.id,
                        disk = key,
                        "uploads work again for this disk"
                    );
                }
                !back
            });
        }
        if stuck.is_empty() {
            self.status.failing.store(false, Ordering::Relaxed);
            *retry = Retry {
                next: Instant::now(),
                backoff: FIRST_BACKOFF,
            };
        } else {
            // Progress for all that was tried: soon again; a failure: back off.
            retry.backoff = match failed.is_empty() && whole {
                true => FIRST_BACKOFF,
                false => (retry.backoff * 2).min(MAX_BACKOFF),
            };
            retry.next = Instant::now() + retry.backoff;
            self.status.failing.store(true, Ordering::Relaxed);
        }
        publish(self.shard, self.status, stuck, self.upto, None);
    }
}

/// Uploads one disk's frames, once. Frames cached under an older claim of this
/// server, or after it was fenced from the disk, are dropped (docs/storage-format.md 3,
/// "Fencing"): they count as handled, so the cache is freed past them.
fn upload_once(
    shard: &ShardShared,
    registry: &Registry,
    status: &UploadStatus,
    key: &str,
    records: &[Cached<'_>],
) -> ferry_replica::Result<()> {
    let entry = registry.entry(key);
    let reopen = |e: ferry_replica::Error| {
        // The commit may have landed with its reply lost: reopen from the store
        // next time, so the retry starts from what is really there.
        *entry.uploader.lock().expect("uploader lock") = None;
        status.failing.store(true, Ordering::Relaxed);
        e
    };
    entry.open(registry).map_err(reopen)?;
    let mut dropped = 0u64;
    let frames: Vec<Frame<'_>> = records
        .iter()
        .filter_map(|(at, p)| match decode(p, u32::MAX) {
            Ok(Decoded::Frame(f, _)) => Some((*at, f)),
            _ => {
                tracing::error!(
                    shard = shard.id,
                    disk = key,
                    "a cached frame does not decode; skipped"
                );
                None
            }
        })
        .filter_map(|(at, f)| {
            if entry.is_stale(shard.id, at) {
                dropped += payload_bytes(&f);
                return None;
            }
            Some(f)
        })
        .collect();
    let result = {
        let mut guard = entry.uploader.lock().expect("uploader lock");
        let up = guard.as_mut().expect("opened above");
        let (p0, s0) = (up.plain_bytes, up.sealed_bytes);
        let w = up.upload(&frames);
        status
            .plain_bytes
            .fetch_add(up.plain_bytes - p0, Ordering::Relaxed);
        status
            .sealed_bytes
            .fetch_add(up.sealed_bytes - s0, Ordering::Relaxed);
        w
    };
    match result {
        Ok(w) => {
            entry.uploaded.fetch_max(w, Ordering::SeqCst);
        }
        // Another server claimed the disk: these writes are dropped, never retried.
        Err(ferry_replica::Error::Fenced { .. }) => {
            entry.open(registry).map_err(reopen)?;
            dropped += frames.iter().map(payload_bytes).sum::<u64>();
        }
        Err(e) => return Err(reopen(e)),
    }
    if dropped > 0 {
        registry.note_dropped(key, dropped);
        tracing::debug!(
            shard = shard.id,
            disk = key,
            dropped,
            "dropped cached writes of an older claim"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(file: u64, offset: u64) -> Position {
        Position { file, offset }
    }

    #[test]
    fn a_stuck_disk_moved_on_waits_since_its_batch_not_since_it_stuck() {
        let t0 = Instant::now();
        let t = |ms| t0 + Duration::from_millis(ms);
        let mut m = Marks::default();
        m.push(pos(1, 0), t(0));
        m.push(pos(1, 500), t(100));
        m.push(pos(2, 0), t(200));
        assert_eq!(m.since_at(pos(0, 9)), None);
        assert_eq!(m.since_at(pos(1, 499)), Some(t(0)));
        assert_eq!(m.since_at(pos(1, 500)), Some(t(100)));
        assert_eq!(m.since_at(pos(3, 0)), Some(t(200)));
        // Only what the oldest stuck position may still need is kept.
        let mut stuck = BTreeMap::new();
        stuck.insert(
            "m/d".to_string(),
            Stuck {
                from: pos(1, 700),
                since: t(0),
            },
        );
        m.trim(&stuck);
        assert_eq!(m.since_at(pos(1, 700)), Some(t(100)));
        assert_eq!(m.0.len(), 2);
        m.trim(&BTreeMap::new());
        assert_eq!(m.since_at(pos(9, 0)), None);
    }
}
