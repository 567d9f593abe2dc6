//! Appending writes to a disk's log: seal a batch of writes into a segment, upload it
//! under a fresh name, then commit it with any recovery points that follow it. The
//! process server's upload stage and the tests' reference workloads use this.

use crate::disk::Disk;
use crate::error::{Error, Result};
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
    if writes.windows(2).any(|w| w[1].seq < w[0].seq) {
        return Err(Error::Invalid(
            "writes of a segment must be in sequence order".into(),
        ));
    }
    let object = disk.paths.segment(first.seq, &random_hex(8));
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
/// after this returns are the writes durable in the replica.
pub async fn append(
    disk: &Disk,
    state: &mut DiskState,
    sealed: Vec<Sealed>,
    points: Vec<Point>,
    next_seq: u64,
) -> Result<()> {
    let mut segments = Vec::with_capacity(sealed.len());
    for s in sealed {
        disk.upload(&s.segment.object, s.bytes.into()).await?;
        segments.push(s.segment);
    }
    let mut c = disk.new_commit(state, CommitKind::Append, next_seq);
    c.segments = segments;
    c.points = points;
    disk.commit(state, c).await
}
