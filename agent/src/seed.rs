//! Seeding and checksum resync of one disk from an image.
//!
//! The first seed of a disk writes a base generation: one extent object per extent
//! that holds any non-zero block. Every later seed is a checksum resync: it hashes each
//! block of the image (xxh3-128) and compares with the checksum map of the replica's
//! latest point, sending only differing blocks as log segments. Either way it ends
//! with a checksum map of the image and a recovery point of kind seed.
//!
//! Extents are processed by a small pool of threads, each reading, hashing, sealing and
//! uploading one extent at a time, so memory is bounded by the pool size times about
//! two extents.
//!
//! A resync commits within the orphan grace of what it put (`ferry_replica::grace`):
//! before the commit, every object put longer ago than the grace less its margin is
//! made again under a fresh name (its extent read, hashed and sealed again), so the
//! commit references only objects compaction cannot have collected. A first seed onto
//! a disk without recovery points is exempt: compaction sweeps only disks that have a
//! point, and the commit that would add one takes the seed's number first, turning its
//! commit into a conflict.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ferry_replica::disk::new_point_id;
use ferry_replica::grace::PutClock;
use ferry_replica::keys::random_hex;
use ferry_replica::meta::{Base, CommitKind, ExtentRef, SegmentRef};
use ferry_replica::object::{ObjectKind, SealContext, CHUNK_TARGET};
use ferry_replica::record::ObjectBuilder;
use ferry_replica::scan::{scan_region_holes, Run, Sum, ZERO_SUM};
use ferry_replica::sums::BlockSums;
use ferry_replica::{Disk, DiskState, Error, Point, PointKind, Result, Store, VaultKey};

use crate::image::Image;

pub struct SeedOptions<'a> {
    pub machine: &'a str,
    pub disk: &'a str,
    pub image: &'a Path,
    pub label: Option<String>,
    pub time: DateTime<Utc>,
    /// Extents in flight at once; 0 picks cores + 1.
    pub workers: usize,
    /// The grace compaction gives unreferenced objects (`ORPHAN_GRACE`; tests shorten
    /// it together with compaction's).
    pub orphan_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct SeedReport {
    pub point: Point,
    /// True for a first full copy, false for a checksum resync.
    pub full_copy: bool,
    pub disk_bytes: u64,
    /// Bytes of block data sent (zero blocks and unchanged blocks excluded).
    pub sent_bytes: u64,
    /// Bytes uploaded, sealed and compressed, checksum map included.
    pub stored_bytes: u64,
    pub blocks: u64,
    pub blocks_sent: u64,
    /// Objects made again because they were put too long before the commit.
    pub redone: u64,
}

/// What one extent job produced.
#[derive(Default)]
struct JobOut {
    extent: Option<ExtentRef>,
    segment: Option<SegmentRef>,
    sums: Vec<Sum>,
    /// When its object's put began (None: nothing was put).
    put: Option<Instant>,
}

/// A worker's read buffer and the holes found in it, reused from extent to extent.
#[derive(Default)]
struct WorkerBufs {
    buf: Vec<u8>,
    holes: Vec<bool>,
}

#[derive(Clone)]
struct Plan<'a> {
    disk: &'a Disk,
    image: &'a Image,
    old: Option<&'a BlockSums>,
    first_seq: u64,
    generation: String,
    extent_bytes: u64,
    block_bytes: usize,
}

impl Plan<'_> {
    fn full(&self) -> bool {
        self.old.is_none()
    }

    /// Sequence number of extent job `j`. A full copy is one base at `first_seq`; a
    /// resync gives each extent its own number after `first_seq`, which it keeps for
    /// the hole that clears a grown tail.
    fn seq_of(&self, j: u64) -> u64 {
        if self.full() {
            self.first_seq
        } else {
            self.first_seq + 1 + j
        }
    }

    fn run_job(
        &self,
        j: u64,
        bufs: &mut WorkerBufs,
        ctx: &mut SealContext,
        sent: &AtomicU64,
        stored: &AtomicU64,
        blocks_sent: &AtomicU64,
    ) -> Result<JobOut> {
        let start = j * self.extent_bytes;
        let len = self.extent_bytes.min(self.image.size - start) as usize;
        let WorkerBufs { buf, holes } = bufs;
        // Holes cost nothing to read: blocks wholly in one are zero blocks to the scan,
        // neither filled nor tested. The rest comes straight from the image's map.
        let view = self
            .image
            .view_holes_at(buf, start, len, self.block_bytes, holes)?;
        let key = self.disk.key()?;
        let seq = self.seq_of(j);
        let (kind, object) = if self.full() {
            (
                ObjectKind::Extent,
                self.disk.paths.extent(&self.generation, j),
            )
        } else {
            (
                ObjectKind::Segment,
                self.disk.paths.segment(seq, &random_hex(8)),
            )
        };
        let mut b = ObjectBuilder::new(ctx, key, &self.disk.disk_id, kind, &object);
        let first_block = (start / self.block_bytes as u64) as usize;
        let mut sums = vec![ZERO_SUM; len.div_ceil(self.block_bytes)];
        let old = self.old.map(|o| {
            let end = (first_block + sums.len()).min(o.sums.len());
            &o.sums[first_block.min(end)..end]
        });
        let mut n_sent = 0u64;
        let bs = self.block_bytes as u64;
        scan_region_holes(
            view,
            start,
            self.block_bytes,
            old,
            &mut sums,
            CHUNK_TARGET,
            holes,
            |run| match run {
                Run::Data { offset, data } => {
                    n_sent += (data.len() as u64).div_ceil(bs);
                    b.data(seq, offset, data);
                }
                Run::Zero { offset, len } => {
                    n_sent += len.div_ceil(bs);
                    b.zero(seq, offset, len);
                }
            },
        );
        let mut out = JobOut {
            sums,
            ..Default::default()
        };
        if b.is_empty() {
            // The sums say "all zero": true only if the image did not shrink under us.
            self.image.check_whole()?;
            self.image.release(start, len);
            return Ok(out);
        }
        sent.fetch_add(b.data_bytes(), Ordering::Relaxed);
        blocks_sent.fetch_add(n_sent, Ordering::Relaxed);
        let bytes = b.finish();
        // Everything read of the extent is sealed now: if the image shrank meanwhile,
        // part of it read as zeros, and the object must not be kept.
        self.image.check_whole()?;
        self.image.release(start, len);
        let stored_bytes = bytes.len() as u64;
        stored.fetch_add(stored_bytes, Ordering::Relaxed);
        let store = &self.disk.store;
        out.put = Some(Instant::now());
        // The upload shares the buffer; once it is done the worker's next object takes
        // it back (fresh memory for every object cost a page fault per 4 KiB).
        let shared = bytes.into();
        store.block(self.disk.upload(&object, Clone::clone(&shared)))?;
        ctx.recycle(shared);
        if self.full() {
            out.extent = Some(ExtentRef {
                index: j,
                object,
                stored_bytes,
            });
        } else {
            out.segment = Some(SegmentRef {
                object,
                first_seq: seq,
                last_seq: seq,
                stored_bytes,
            });
        }
        Ok(out)
    }
}

/// Checksums of the replica at its latest point (its checksum map when it has one).
fn replica_sums(disk: &Disk, state: &DiskState) -> Result<BlockSums> {
    let (seq, size) = match state.latest_point() {
        Some(p) => (p.seq, p.disk_bytes),
        None => (
            state.next_seq.saturating_sub(1),
            state.base.as_ref().map_or(0, |b| b.disk_bytes),
        ),
    };
    BlockSums::of_replica(disk, state, seq, size, &std::env::temp_dir())
}

/// Seeds (first time) or resyncs (afterwards) one disk from an image, then commits a
/// recovery point of kind seed.
pub fn seed(
    store: &Store,
    vault: &VaultKey,
    opts: &SeedOptions<'_>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<SeedReport> {
    // Names first: a bad name is the mistake to report, whatever the image is.
    ferry_replica::layout::check_name("machine", opts.machine)?;
    ferry_replica::layout::check_name("disk", opts.disk)?;
    let image = Image::open(opts.image)?;
    let disk = store.block(Disk::open_or_create(
        store,
        opts.machine,
        opts.disk,
        vault,
        ferry_replica::DEFAULT_BLOCK_BYTES,
        ferry_replica::DEFAULT_EXTENT_BYTES,
    ))?;
    let mut state = store.block(disk.load_state())?;
    let first_time = state.base.is_none() && state.segments.is_empty() && state.points.is_empty();
    let old = if first_time {
        None
    } else {
        Some(replica_sums(&disk, &state)?)
    };
    let extent_bytes = disk.info.extent_bytes;
    let plan = Plan {
        disk: &disk,
        image: &image,
        old: old.as_ref(),
        first_seq: state.next_seq,
        generation: random_hex(8),
        extent_bytes,
        block_bytes: disk.info.block_bytes as usize,
    };
    let jobs = image.size.div_ceil(extent_bytes);
    let workers = if opts.workers == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get()) + 1
    } else {
        opts.workers
    };
    let (sent, stored, blocks_sent) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let counters = Counters {
        sent: &sent,
        stored: &stored,
        blocks_sent: &blocks_sent,
    };
    let all: Vec<u64> = (0..jobs).collect();
    let mut results: Vec<Option<JobOut>> = (0..jobs).map(|_| None).collect();
    for (j, out) in run_pool(&plan, &all, workers, &counters, &|j| {
        progress(extent_bytes.min(image.size - j * extent_bytes))
    })? {
        results[j as usize] = Some(out);
    }
    let mut sums = Vec::with_capacity(BlockSums::blocks_for(image.size, plan.block_bytes as u64));
    for out in results.iter().flatten() {
        sums.extend_from_slice(&out.sums);
    }

    // A resync onto a grown disk first clears the new tail, so nothing the replica
    // held there before an earlier shrink can show through.
    let old_size = old.as_ref().map_or(image.size, |o| o.disk_bytes);
    let map = BlockSums {
        block_bytes: plan.block_bytes as u64,
        disk_bytes: image.size,
        sums,
    };
    let mut ctx = SealContext::default();
    // Bytes of the tail and the checksum map; the jobs count theirs in `stored`.
    let mut stored_bytes = 0u64;
    let clock = PutClock::new(if state.points.is_empty() {
        // Exempt: see the module note.
        Duration::ZERO
    } else {
        opts.orphan_grace
    });
    let needs_tail = !first_time && image.size > old_size;
    let mut tail: Option<(SegmentRef, Instant)> = None;
    let mut map_object: Option<(String, Instant)> = None;
    let mut redone = 0u64;
    let mut passes = 0;
    loop {
        // Jobs whose object may be collected before the commit: made again, in a pool,
        // under fresh names (a new generation for extents; segments draw a new uid).
        let stale: Vec<u64> = (0..jobs)
            .filter(|j| {
                results[*j as usize]
                    .as_ref()
                    .and_then(|o| o.put)
                    .is_some_and(|t| clock.expired(t))
            })
            .collect();
        let stale_tail = tail.as_ref().is_none_or(|(_, t)| clock.expired(*t)) && needs_tail;
        let stale_map = map_object.as_ref().is_none_or(|(_, t)| clock.expired(*t));
        if stale.is_empty() && !stale_tail && !stale_map {
            break;
        }
        if tail.is_some() || map_object.is_some() {
            passes += 1;
            if passes >= ferry_replica::writer::UPLOAD_ATTEMPTS {
                // Give up: the error says how old the oldest object is.
                let mut c = PutClock::new(opts.orphan_grace);
                let jobs_put = results.iter().flatten().filter_map(|o| o.put);
                let others = tail
                    .iter()
                    .map(|t| t.1)
                    .chain(map_object.iter().map(|m| m.1));
                jobs_put.chain(others).for_each(|t| c.merge(t));
                return Err(c.check(&disk.paths.label()).err().unwrap_or_else(|| {
                    Error::Invalid(format!(
                        "disk {}: the store is too slow to commit the seed within the orphan grace",
                        disk.paths.label()
                    ))
                }));
            }
        }
        if !stale.is_empty() {
            let again = Plan {
                generation: random_hex(8),
                ..plan.clone()
            };
            redone += stale.len() as u64;
            for (j, out) in run_pool(&again, &stale, workers, &counters, &|_| {})? {
                results[j as usize] = Some(out);
            }
        }
        if stale_tail {
            let object = disk.paths.segment(plan.first_seq, &random_hex(8));
            let mut b = ObjectBuilder::new(
                &mut ctx,
                disk.key()?,
                &disk.disk_id,
                ObjectKind::Segment,
                &object,
            );
            b.zero(plan.first_seq, old_size, image.size - old_size);
            let bytes = b.finish();
            let tail_bytes = bytes.len() as u64;
            stored_bytes += tail_bytes;
            redone += u64::from(tail.is_some());
            let put = Instant::now();
            store.block(disk.upload(&object, bytes.into()))?;
            let seg = SegmentRef {
                object,
                first_seq: plan.first_seq,
                last_seq: plan.first_seq,
                stored_bytes: tail_bytes,
            };
            tail = Some((seg, put));
        }
        if stale_map {
            let (object, bytes) = map.seal(&disk, &mut ctx)?;
            stored_bytes += bytes.len() as u64;
            redone += u64::from(map_object.is_some());
            let put = Instant::now();
            store.block(disk.upload(&object, bytes.into()))?;
            map_object = Some((object, put));
        }
    }
    let (mut extents, mut segments) = (Vec::new(), Vec::new());
    segments.extend(tail.map(|(seg, _)| seg));
    for out in results.into_iter().flatten() {
        extents.extend(out.extent);
        segments.extend(out.segment);
    }
    let sums_object = map_object.map(|(o, _)| o).unwrap_or_default();

    let (point_seq, next_seq) = if first_time {
        (plan.first_seq, plan.first_seq + 1)
    } else {
        (plan.first_seq + jobs, plan.first_seq + jobs + 1)
    };
    let point = Point {
        id: new_point_id(opts.time),
        kind: PointKind::Seed,
        time: opts.time,
        seq: point_seq,
        disk_bytes: image.size,
        label: opts.label.clone(),
        group: None,
        sums: Some(sums_object),
    };
    let kind = if first_time {
        CommitKind::Checkpoint
    } else {
        CommitKind::Append
    };
    let mut c = disk.new_commit(&state, kind, next_seq);
    if first_time {
        c.base = Some(Base {
            generation: plan.generation.clone(),
            seq: plan.first_seq,
            disk_bytes: image.size,
            extent_bytes,
            extents,
        });
    }
    c.segments = segments;
    c.points = vec![point.clone()];
    store.block(disk.commit(&mut state, c))?;
    Ok(SeedReport {
        point,
        full_copy: first_time,
        disk_bytes: image.size,
        sent_bytes: sent.load(Ordering::Relaxed),
        stored_bytes: stored_bytes + stored.load(Ordering::Relaxed),
        blocks: BlockSums::blocks_for(image.size, plan.block_bytes as u64) as u64,
        blocks_sent: blocks_sent.load(Ordering::Relaxed),
        redone,
    })
}

/// Byte counters the extent jobs add to.
struct Counters<'a> {
    sent: &'a AtomicU64,
    stored: &'a AtomicU64,
    blocks_sent: &'a AtomicU64,
}

/// Runs extent jobs `todo` on a pool of `workers` threads; `done(j)` after each.
fn run_pool(
    plan: &Plan<'_>,
    todo: &[u64],
    workers: usize,
    counters: &Counters<'_>,
    done: &(dyn Fn(u64) + Sync),
) -> Result<Vec<(u64, JobOut)>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(u64, JobOut)>> = Mutex::new(Vec::with_capacity(todo.len()));
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.min(todo.len().max(1)) {
            s.spawn(|| {
                let mut bufs = WorkerBufs::default();
                let mut ctx = SealContext::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= todo.len() || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        break;
                    }
                    let j = todo[i];
                    let r = plan.run_job(
                        j,
                        &mut bufs,
                        &mut ctx,
                        counters.sent,
                        counters.stored,
                        counters.blocks_sent,
                    );
                    match r {
                        Ok(out) => {
                            done(j);
                            if let Ok(mut r) = results.lock() {
                                r.push((j, out));
                            }
                        }
                        Err(e) => {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(results.into_inner().unwrap_or_else(|p| p.into_inner()))
}
