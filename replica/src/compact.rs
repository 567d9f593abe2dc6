//! Compaction: folds the log segments that no retained point needs on their own into a
//! new base generation, then deletes what no retained point needs.
//!
//! The oldest retained point (seq s0) becomes the new base. Only extents that folded
//! writes touch are rebuilt (in a sparse temporary file) and re-sealed; untouched
//! extents keep their objects. Crash safety comes from the order of steps:
//! 1. upload the new extents under a fresh generation name (orphans if we stop here);
//! 2. create the checkpoint commit (the switch: readers now fold from it);
//! 3. create the checkpoint hint so readers can skip older commits;
//! 4. delete objects only the old state referenced, older commits and hints;
//! 5. sweep orphans older than a grace period (left by crashed writers).
//!
//! Every committed point stays rebuildable after a stop at any step. A compaction is a
//! writer too: its new extents are orphans until the checkpoint lands, so it holds
//! itself to the same commit deadline as every writer (`crate::grace`).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;

use chrono::{DateTime, Duration, Utc};

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::grace::PutClock;
use crate::keys::random_hex;
use crate::meta::{self, Base, CheckpointHint, CommitKind, ExtentRef, Point};
use crate::object::{open_object, Expect, ObjectKind, OpenContext, SealContext};
use crate::rebuild::{DiskSink, FileSink};
use crate::record::{decode_records, ObjectBuilder};
use crate::scan::{scan_region, Run, ZERO_SUM};
use crate::state::DiskState;

#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Points younger than this are kept (and the newest point always).
    pub keep: Duration,
    pub now: DateTime<Utc>,
    /// Unreferenced objects younger than this may belong to a writer that has not
    /// committed yet; they are left alone. `crate::grace::ORPHAN_GRACE` in production;
    /// writers must be held to the same grace (zero: no writer runs beside this one).
    pub orphan_grace: Duration,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CompactReport {
    pub points_dropped: usize,
    pub segments_folded: usize,
    pub extents_rewritten: usize,
    pub objects_deleted: usize,
    pub base_seq: Option<u64>,
}

/// Commit retries when a writer appends concurrently.
const COMMIT_ATTEMPTS: usize = 5;

impl CompactOptions {
    /// The grace as the writers' clock takes it.
    fn writer_grace(&self) -> std::time::Duration {
        self.orphan_grace.to_std().unwrap_or_default()
    }
}

pub fn compact(disk: &Disk, opts: &CompactOptions) -> Result<CompactReport> {
    let store = &disk.store;
    let state = store.block(disk.load_state())?;
    let mut report = CompactReport::default();
    // A disk without a recovery point is never swept: a first seed, which may take
    // longer than the grace, relies on this (see the seed's module note).
    let Some(latest) = state.latest_point().cloned() else {
        return Ok(report);
    };
    let cutoff = opts.now - opts.keep;
    let retained: Vec<Point> = state
        .points
        .iter()
        .filter(|p| p.time >= cutoff || p.id == latest.id)
        .cloned()
        .collect();
    let dropped: BTreeSet<String> = state
        .points
        .iter()
        .filter(|p| !retained.iter().any(|r| r.id == p.id))
        .map(|p| p.id.clone())
        .collect();
    let oldest = retained
        .iter()
        .min_by_key(|p| p.seq)
        .cloned()
        .unwrap_or(latest);
    let floor = state.base.as_ref().map_or(0, |b| b.seq + 1);
    let folding: Vec<_> = state.segments_up_to(oldest.seq).cloned().collect();
    if folding.is_empty() && dropped.is_empty() {
        report.objects_deleted = sweep(disk, &state, opts)?;
        return Ok(report);
    }

    let build = |report: &mut CompactReport| {
        report.extents_rewritten = 0;
        build_base(disk, &state, &oldest, floor, &folding, opts, report)
    };
    let (mut new_base, mut clock) = build(&mut report)?;
    let mut redone = 0;
    let fully_folded: BTreeSet<String> = folding
        .iter()
        .filter(|s| s.last_seq <= oldest.seq)
        .map(|s| s.object.clone())
        .collect();

    // Commit, re-merging with anything appended meanwhile.
    let mut current = state.clone();
    let mut committed = None;
    let mut attempts = 0;
    while attempts < COMMIT_ATTEMPTS {
        // Extents put longer ago than the grace allows may be gone: build them again.
        if let Err(e) = clock.check(&disk.paths.label()) {
            redone += 1;
            if redone >= crate::writer::UPLOAD_ATTEMPTS {
                return Err(e);
            }
            (new_base, clock) = build(&mut report)?;
            continue;
        }
        attempts += 1;
        if current.base != state.base {
            return Err(Error::Conflict {
                disk: disk.paths.label(),
                commit: "a concurrent compaction".into(),
            });
        }
        let mut c = disk.new_commit(&current, CommitKind::Checkpoint, current.next_seq);
        c.base = Some(new_base.clone());
        c.segments = current
            .segments
            .iter()
            .filter(|s| !fully_folded.contains(&s.object))
            .cloned()
            .collect();
        c.points = current
            .points
            .iter()
            .filter(|p| !dropped.contains(&p.id))
            .cloned()
            .collect();
        let mut next = current.clone();
        match store.block(disk.commit(&mut next, c.clone())) {
            Ok(()) => {
                committed = Some((c.commit, next));
                break;
            }
            Err(Error::Conflict { .. }) => current = store.block(disk.load_state())?,
            Err(e) => return Err(e),
        }
    }
    let Some((number, new_state)) = committed else {
        return Err(Error::Conflict {
            disk: disk.paths.label(),
            commit: "every retry of the checkpoint".into(),
        });
    };
    let hint = CheckpointHint {
        format: crate::meta::FORMAT,
        checkpoint: number,
    };
    store.block(store.put_new(&disk.paths.checkpoint(number), meta::encode(&hint).into()))?;

    // Delete what only the old state referenced, then older commits and hints.
    let keep = new_state.referenced();
    let mut doomed: Vec<String> = current
        .referenced()
        .into_iter()
        .filter(|o| !keep.contains(o))
        .collect();
    for dir in [disk.paths.commits_dir(), disk.paths.checkpoints_dir()] {
        for l in store.block(store.list(&dir))? {
            if crate::layout::number_of(&l.path).is_some_and(|n| n < number) {
                doomed.push(l.path);
            }
        }
    }
    for o in &doomed {
        store.block(store.delete(o))?;
    }
    report.objects_deleted = doomed.len() + sweep(disk, &new_state, opts)?;
    report.points_dropped = dropped.len();
    report.segments_folded = fully_folded.len();
    report.base_seq = Some(new_base.seq);
    Ok(report)
}

/// Deletes data objects no commit references, once they are older than the grace.
/// `known` is a state this compaction has seen; the state is read again after listing.
fn sweep(disk: &Disk, known: &DiskState, opts: &CompactOptions) -> Result<usize> {
    let store = &disk.store;
    // Upload times are the store's wall clock, not the retention clock in `opts.now`.
    let limit = Utc::now() - opts.orphan_grace;
    let mut old = Vec::new();
    for dir in [
        disk.paths.log_dir(),
        disk.paths.base_dir(),
        disk.paths.sums_dir(),
    ] {
        for l in store.block(store.list(&dir))? {
            if l.modified <= limit {
                old.push(l.path);
            }
        }
    }
    if old.is_empty() {
        return Ok(0);
    }
    // List first, then read the state: an object already past the grace when listed
    // can only be committed later by a writer that broke its deadline. Read the other
    // way round, a commit landing between the read and the listing (deletes of step 4
    // can take long) would be missed, its objects swept although committed in time.
    let mut keep = known.referenced();
    keep.extend(store.block(disk.load_state())?.referenced());
    let mut n = 0;
    for path in old.iter().filter(|p| !keep.contains(*p)) {
        store.block(store.delete(path))?;
        n += 1;
    }
    Ok(n)
}

/// Builds and uploads the base at `point`: touched extents re-sealed (under a fresh
/// generation), others kept. The clock tells when the first new extent was put.
fn build_base(
    disk: &Disk,
    state: &DiskState,
    point: &Point,
    floor: u64,
    folding: &[crate::meta::SegmentRef],
    opts: &CompactOptions,
    report: &mut CompactReport,
) -> Result<(Base, PutClock)> {
    let mut clock = PutClock::new(opts.writer_grace());
    let store = &disk.store;
    let key = disk.key()?;
    let extent_bytes = state
        .base
        .as_ref()
        .map_or(disk.info.extent_bytes, |b| b.extent_bytes);
    let size = point.disk_bytes;
    let old: BTreeMap<u64, ExtentRef> = state
        .base
        .as_ref()
        .map(|b| b.extents.iter().map(|e| (e.index, e.clone())).collect())
        .unwrap_or_default();
    let tmp =
        tempfile::tempfile().map_err(|e| Error::io("create", "compaction scratch file", e))?;
    tmp.set_len(size)
        .map_err(|e| Error::io("size", "compaction scratch file", e))?;
    let sink = FileSink {
        file: &tmp,
        path: "compaction scratch file".into(),
    };
    let mut touched: BTreeSet<u64> = BTreeSet::new();
    // A shrink must not leave stale bytes past the new end in a kept extent.
    if state.base.as_ref().is_some_and(|b| b.disk_bytes > size)
        && !size.is_multiple_of(extent_bytes)
    {
        materialize(
            disk,
            &old,
            size / extent_bytes,
            extent_bytes,
            size,
            &sink,
            &mut touched,
        )?;
    }
    let mut ctx = OpenContext::default();
    for seg in folding {
        let mut buf: Vec<u8> = store.block(store.get(&seg.object))?.into();
        let expect = Expect {
            key,
            disk_id: &disk.disk_id,
            kind: ObjectKind::Segment,
            name: &seg.object,
        };
        open_object(&expect, &mut buf, &mut ctx, |chunk| {
            decode_records(
                chunk,
                |r| {
                    if r.seq < floor || r.seq > point.seq || r.offset >= size {
                        return Ok(());
                    }
                    let len = r.len.min(size - r.offset);
                    let last = (r.offset + len.max(1) - 1) / extent_bytes;
                    for idx in r.offset / extent_bytes..=last {
                        materialize(disk, &old, idx, extent_bytes, size, &sink, &mut touched)?;
                    }
                    match r.data {
                        Some(d) => sink.write_at(&d[..len as usize], r.offset),
                        None => sink.zero(r.offset, len),
                    }
                    .map_err(|e| Error::io("write", "compaction scratch file", e))
                },
                &seg.object,
            )
        })?;
    }
    let generation = random_hex(8);
    let mut extents: BTreeMap<u64, ExtentRef> = old
        .into_iter()
        .filter(|(i, _)| !touched.contains(i) && i * extent_bytes < size)
        .collect();
    let mut seal = SealContext::default();
    let mut region = vec![0u8; extent_bytes as usize];
    for &idx in &touched {
        let start = idx * extent_bytes;
        let len = extent_bytes.min(size - start) as usize;
        tmp.read_exact_at(&mut region[..len], start)
            .map_err(|e| Error::io("read", "compaction scratch file", e))?;
        let object = disk.paths.extent(&generation, idx);
        let mut b = ObjectBuilder::new(&mut seal, key, &disk.disk_id, ObjectKind::Extent, &object);
        let block = disk.info.block_bytes as usize;
        let mut sums = vec![ZERO_SUM; len.div_ceil(block)];
        scan_region(
            &region[..len],
            start,
            block,
            None,
            &mut sums,
            crate::object::CHUNK_TARGET,
            |run| {
                if let Run::Data { offset, data } = run {
                    b.data(point.seq, offset, data);
                }
            },
        );
        if b.data_bytes() == 0 {
            continue;
        }
        let bytes = b.finish();
        let stored_bytes = bytes.len() as u64;
        clock.before_put();
        store.block(disk.upload(&object, bytes.into()))?;
        extents.insert(
            idx,
            ExtentRef {
                index: idx,
                object,
                stored_bytes,
            },
        );
        report.extents_rewritten += 1;
    }
    let base = Base {
        generation,
        seq: point.seq,
        disk_bytes: size,
        extent_bytes,
        extents: extents.into_values().collect(),
    };
    Ok((base, clock))
}

/// Copies extent `idx` of the old base into the scratch file the first time it is touched.
fn materialize(
    disk: &Disk,
    old: &BTreeMap<u64, ExtentRef>,
    idx: u64,
    extent_bytes: u64,
    size: u64,
    sink: &FileSink<'_>,
    touched: &mut BTreeSet<u64>,
) -> Result<()> {
    if !touched.insert(idx) {
        return Ok(());
    }
    let Some(e) = old.get(&idx) else {
        return Ok(());
    };
    let store = &disk.store;
    let mut buf: Vec<u8> = store.block(store.get(&e.object))?.into();
    let expect = Expect {
        key: disk.key()?,
        disk_id: &disk.disk_id,
        kind: ObjectKind::Extent,
        name: &e.object,
    };
    let (lo, hi) = (idx * extent_bytes, (idx + 1) * extent_bytes);
    open_object(&expect, &mut buf, &mut OpenContext::default(), |chunk| {
        decode_records(
            chunk,
            |r| {
                if r.offset < lo || r.offset + r.len > hi {
                    return Err(Error::corrupt(&e.object, "record outside its extent"));
                }
                if r.offset >= size {
                    return Ok(());
                }
                let len = r.len.min(size - r.offset) as usize;
                if let Some(d) = r.data {
                    sink.write_at(&d[..len], r.offset)
                        .map_err(|err| Error::io("write", "compaction scratch file", err))?;
                }
                Ok(())
            },
            &e.object,
        )
    })
}
