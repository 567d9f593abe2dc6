//! Appending writes to a disk's log: seal a batch of writes into a segment, upload it
//! under a fresh name, then commit it with any recovery points that follow it. The
//! process server's upload stage and the tests' reference workloads use this.
//!
//! The commit must start within the orphan grace of the first put, less a margin
//! (`grace`); an upload that would commit later is abandoned and redone under fresh
//! names, since compaction may already have collected its objects.

use std::time::Duration;

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::grace::{PutClock, ORPHAN_GRACE};
use crate::keys::random_hex;
use crate::meta::{CommitKind, Point, SegmentRef};
use crate::object::{ObjectKind, SealContext};
use crate::record::ObjectBuilder;
use crate::state::DiskState;

/// One write: data, or a range that now reads as zero (TRIM, WRITE_ZEROES).
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    Data(&'a [u8]),
    Zero(u64),
}

#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    pub seq: u64,
    pub offset: u64,
    pub payload: Payload<'a>,
}

/// A sealed segment ready to upload.
pub struct Sealed {
    pub segment: SegmentRef,
    pub bytes: Vec<u8>,
}

/// Seals writes (ascending sequence numbers) into one segment.
pub fn seal_segment(disk: &Disk, ctx: &mut SealContext, writes: &[Write<'_>]) -> Result<Sealed> {
    let first = writes
        .first()
        .ok_or_else(|| Error::Invalid("a segment needs at least one write".into()))?;
    let object = disk.paths.segment(first.seq, &random_hex(8));
    seal_segment_as(disk, ctx, writes, object)
}

/// `seal_segment` under the name `object` (of `disk`'s paths).
pub fn seal_segment_as(
    disk: &Disk,
    ctx: &mut SealContext,
    writes: &[Write<'_>],
    object: String,
) -> Result<Sealed> {
    let first = writes
        .first()
        .ok_or_else(|| Error::Invalid("a segment needs at least one write".into()))?;
    if writes.windows(2).any(|w| w[1].seq < w[0].seq) {
        return Err(Error::Invalid(
            "writes of a segment must be in sequence order".into(),
        ));
    }
    let mut b = ObjectBuilder::new(
        ctx,
        disk.key()?,
        &disk.disk_id,
        ObjectKind::Segment,
        &object,
    );
    for w in writes {
        match w.payload {
            Payload::Data(d) => b.data(w.seq, w.offset, d),
            Payload::Zero(len) => b.zero(w.seq, w.offset, len),
        }
    }
    let (first_seq, last_seq) = b.seq_range().unwrap_or((first.seq, first.seq));
    let bytes = b.finish();
    Ok(Sealed {
        segment: SegmentRef {
            object,
            first_seq,
            last_seq,
            stored_bytes: bytes.len() as u64,
        },
        bytes,
    })
}

/// Uploads the segments, then commits them with `points` in one append commit. Only
/// after this returns are the writes durable in the replica. Held to `ORPHAN_GRACE`.
pub async fn append(
    disk: &Disk,
    state: &mut DiskState,
    sealed: Vec<Sealed>,
    points: Vec<Point>,
    next_seq: u64,
) -> Result<()> {
    append_within(disk, state, sealed, points, next_seq, ORPHAN_GRACE).await
}

/// `append` under the orphan grace `grace`: when the commit would start later than the
/// first put plus the grace less its margin, nothing is committed and the result is
/// `Error::UploadExpired`; what was put is left to compaction as orphans.
pub async fn append_within(
    disk: &Disk,
    state: &mut DiskState,
    sealed: Vec<Sealed>,
    points: Vec<Point>,
    next_seq: u64,
    grace: Duration,
) -> Result<()> {
    let mut clock = PutClock::new(grace);
    let mut segments = Vec::with_capacity(sealed.len());
    for s in sealed {
        clock.before_put();
        disk.upload(&s.segment.object, s.bytes.into()).await?;
        segments.push(s.segment);
    }
    clock.check(&disk.paths.label())?;
    let mut c = disk.new_commit(state, CommitKind::Append, next_seq);
    c.segments = segments;
    c.points = points;
    disk.commit(state, c).await
}

/// Upload attempts of one append before `append_writes` gives up: a store so slow that
/// three attempts in a row outlive the grace is failing, and the caller's own retry
/// (with backoff) takes over.
pub const UPLOAD_ATTEMPTS: usize = 3;

/// What `append_writes` committed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Sealed bytes of the committed segment (0 without writes).
    pub sealed_bytes: u64,
    /// Uploads abandoned because they outlived the commit deadline.
    pub redone: usize,
}

/// Seals `writes` (if any) into a segment, uploads it and commits it with `points`.
/// An upload that outlives its commit deadline is abandoned and redone: sealed again
/// under a fresh name and uploaded again, so the commit references only objects put
/// within the grace. After `UPLOAD_ATTEMPTS` such attempts the error is returned.
pub async fn append_writes(
    disk: &Disk,
    state: &mut DiskState,
    ctx: &mut SealContext,
    writes: &[Write<'_>],
    points: Vec<Point>,
    next_seq: u64,
    grace: Duration,
) -> Result<Appended> {
    let mut redone = 0;
    loop {
        let sealed = match writes.is_empty() {
            true => Vec::new(),
            false => vec![seal_segment(disk, ctx, writes)?],
        };
        let sealed_bytes = sealed.iter().map(|s| s.bytes.len() as u64).sum();
        match append_within(disk, state, sealed, points.clone(), next_seq, grace).await {
            Ok(()) => {
                return Ok(Appended {
                    sealed_bytes,
                    redone,
                })
            }
            Err(Error::UploadExpired { .. }) if redone + 1 < UPLOAD_ATTEMPTS => redone += 1,
            Err(e) => return Err(e),
        }
    }
}
