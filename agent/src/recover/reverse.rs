//! Failback's reverse deltas (issue 16): the writes a served disk's overlay journaled
//! since failover, carried home as a reverse replica and applied onto the home disk.
//!
//! The reverse replica of machine `M` is machine `{M}.reverse` in the same store
//! (`REVERSE_SUFFIX`; '.' is a legal name character, and the suffix keeps it beside
//! `M` in a listing). Its disks have the forward disks' names and sizes and no base:
//! only log segments, the deltas over the forward failover point P. Every point of it
//! carries the label `over M/D at P seq N` (`Over`): commit records are MAC'd under
//! the disk's key, so the label is as authentic as the point itself, and no existing
//! object of docs/storage-format.md changes. An applier refuses a reverse disk whose
//! points are over anything but the point its target was synced to.
//!
//! One round (`send_delta`): the overlay is synced and its journal read from the
//! saved cursor to its end; the ranges written since are coalesced (a later write
//! wins), their CURRENT bytes read through the served disk and sealed as segments,
//! zero writes as zero records; a point is committed; then the cursor is saved
//! (written aside and renamed). A crash between the commit and the cursor save
//! sends the same ranges again as a new point: applying both gives the same disk,
//! since every record overwrites its whole range and later ones win.
//!
//! Applying (`apply_deltas`): the home disk, made equal to P first (`sync`), gets
//! every record of the reverse log above the last point applied to it, in sequence
//! order, then a sync, then the "applied" marker. A crash before the marker applies
//! the same records again from the old marker, which ends in the same bytes.

use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use chrono::Utc;
use ferry_replica::meta::PointKind;
use ferry_replica::object::{open_object, Expect, ObjectKind, OpenContext, SealContext};
use ferry_replica::rebuild::zero_range;
use ferry_replica::record::decode_records;
use ferry_replica::sums::BlockSums;
use ferry_replica::writer::{append, seal_segment, Payload, Sealed, Write};
use ferry_replica::{
    Disk, DiskState, Point, Store, VaultKey, DEFAULT_BLOCK_BYTES, DEFAULT_EXTENT_BYTES,
};

use super::ranges::{RangeMap, Src};
use super::saved::replace;
use super::served::ServedDisk;
use super::sync::open_target;
use super::{io_err, Error, Result};
use crate::nbd::Device;

pub use ferry_replica::layout::REVERSE_SUFFIX;
/// Data bytes sealed into one segment: a round's memory is a few of these.
pub const SEGMENT_DATA_BYTES: u64 = 4 << 20;
/// Records of one segment at most (zero records hold no data, so bytes alone would
/// not bound a segment of many small zero writes).
pub const SEGMENT_RECORDS: usize = 4096;
/// Bytes of a range read through the served disk at once.
pub const PIECE_BYTES: u64 = 1 << 20;
/// Sealed segments held before they are uploaded and committed (without a point:
/// only the round's last commit carries one).
pub const SEGMENTS_PER_COMMIT: usize = 4;

/// The reverse replica's machine name for forward machine `machine`.
pub fn reverse_machine(machine: &str) -> Result<String> {
    Ok(ferry_replica::layout::reverse_machine(machine)?)
}

/// The forward machine of reverse machine `reverse`, which must end in the suffix.
pub fn forward_machine(reverse: &str) -> Result<&str> {
    reverse
        .strip_suffix(REVERSE_SUFFIX)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Error::Reverse {
            disk: reverse.to_string(),
            why: format!("a reverse replica's machine name ends in {REVERSE_SUFFIX}"),
        })
}

/// What a reverse point lies over: forward disk `machine/disk` at point `point`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Over {
    pub machine: String,
    pub disk: String,
    pub point: String,
    pub seq: u64,
}

impl Over {
    /// The label every reverse point carries.
    pub fn label(&self) -> String {
        format!(
            "over {}/{} at {} seq {}",
            self.machine, self.disk, self.point, self.seq
        )
    }

    /// Reads a label `label` wrote; None for any other.
    pub fn parse(label: &str) -> Option<Over> {
        let words: Vec<&str> = label.split(' ').collect();
        let ["over", md, "at", point, "seq", seq] = words.as_slice() else {
            return None;
        };
        let (machine, disk) = md.split_once('/')?;
        Some(Over {
            machine: machine.to_string(),
            disk: disk.to_string(),
            point: point.to_string(),
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Over {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} at point {}", self.machine, self.disk, self.point)
    }
}

/// Refuses a reverse disk with a point over anything but `over`, naming both.
pub(super) fn check_over(d: &Disk, state: &DiskState, over: &Over) -> Result<()> {
    for p in &state.points {
        let theirs = p.label.as_deref().and_then(Over::parse);
        if theirs.as_ref() != Some(over) {
            return Err(Error::Reverse {
                disk: d.paths.label(),
                why: format!(
                    "its point {} is over {}, not over {over}",
                    p.id,
                    theirs.map_or("nothing this code wrote (no 'over' label)".into(), |t| {
                        t.to_string()
                    })
                ),
            });
        }
    }
    Ok(())
}

pub(super) fn over_json(over: &Over) -> serde_json::Value {
    serde_json::json!({
        "machine": over.machine,
        "disk": over.disk,
        "point": over.point,
        "seq": over.seq,
    })
}

/// Reads a small JSON state file; None when it does not exist.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Overlay {
                path: path.display().to_string(),
                why: format!("unreadable: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Where a disk's cursor lives in `cursor_dir`.
pub fn cursor_path(cursor_dir: &Path, disk: &str) -> PathBuf {
    cursor_dir.join(format!("{disk}.reverse-cursor.json"))
}

/// What one round sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaReport {
    /// Coalesced ranges sent (a later write over an earlier one counts once).
    pub ranges: u64,
    /// Bytes of those ranges sent as data.
    pub bytes_data: u64,
    /// Bytes of those ranges sent as zero records (no data).
    pub bytes_zero: u64,
    /// Sealed segment bytes put to the store.
    pub bytes_sent: u64,
    /// The reverse point committed.
    pub point_id: String,
    /// The journal position saved: the next round starts there (a file round: 0).
    pub cursor: u64,
    /// The point's time, unix seconds.
    pub at: i64,
}

/// The journal position a round starts at: the cursor saved by the last round of
/// this reverse disk over this point, or 0 (everything since failover) without one.
fn load_cursor(path: &Path, over: &Over, reverse_disk_id: &str) -> Result<u64> {
    let Some(v) = read_json(path)? else {
        return Ok(0);
    };
    let bad = |why: String| Error::Overlay {
        path: path.display().to_string(),
        why,
    };
    if v["over"] != over_json(over) {
        return Err(bad(format!(
            "is a cursor over {}/{} at point {}, not over {over}: use another cursor directory",
            v["over"]["machine"], v["over"]["disk"], v["over"]["point"]
        )));
    }
    if v["reverse_disk_id"].as_str() != Some(reverse_disk_id) {
        // The reverse replica was made anew: it holds none of what the cursor
        // counts as sent, so everything since failover goes again.
        tracing::warn!(cursor = %path.display(), "cursor of another reverse replica; sending from the start");
        return Ok(0);
    }
    v["journal_bytes"]
        .as_u64()
        .ok_or_else(|| bad("holds no journal_bytes".into()))
}

/// The round being sealed: writes accumulate for one segment (bounded by data bytes
/// and count), sealed segments for one commit; the replica's state follows each
/// commit.
pub(super) struct Round<'a> {
    d: &'a Disk,
    state: DiskState,
    ctx: SealContext,
    /// Sequence number of the next record.
    seq: u64,
    writes: Vec<(u64, Option<Vec<u8>>, u64)>,
    data_bytes: u64,
    sealed: Vec<Sealed>,
    /// Sealed bytes committed so far.
    pub(super) sent: u64,
}

impl<'a> Round<'a> {
    pub(super) fn new(d: &'a Disk, state: DiskState) -> Round<'a> {
        Round {
            d,
            seq: state.next_seq,
            state,
            ctx: SealContext::new(1),
            writes: Vec::new(),
            data_bytes: 0,
            sealed: Vec::new(),
            sent: 0,
        }
    }

    /// The seq the round's point will have when `finish` is called with nothing more
    /// pushed: every pending write takes the next number when sealed.
    pub(super) fn point_seq(&self) -> u64 {
        self.seq + self.writes.len() as u64
    }

    /// Seals what is pending and commits it with the round's point, labelled over
    /// `over`; with `final_map` (the disk's checksum map at this point, failback's
    /// last round) the map is stored first and the point references it, as a seed's
    /// point references its map (docs/storage-format.md 4.2). Returns the point's id
    /// and its time (unix seconds).
    pub(super) fn finish(
        &mut self,
        over: &Over,
        size: u64,
        final_map: Option<&BlockSums>,
    ) -> Result<(String, i64)> {
        if !self.writes.is_empty() {
            self.seal()?;
        }
        let sums = match final_map {
            Some(map) => {
                let (object, bytes) = map.seal(self.d, &mut self.ctx)?;
                self.sent += bytes.len() as u64;
                self.d.store.block(self.d.upload(&object, bytes.into()))?;
                Some(object)
            }
            None => None,
        };
        let now = Utc::now();
        let p = Point {
            id: ferry_replica::disk::new_point_id(now),
            kind: PointKind::Crash,
            time: now,
            seq: self.seq,
            disk_bytes: size,
            label: Some(over.label()),
            group: None,
            sums,
        };
        let id = p.id.clone();
        self.commit(vec![p], self.seq + 1)?;
        Ok((id, now.timestamp()))
    }

    /// Adds a write (offset, data or None for zero, length), sealing the segment
    /// before it when it would overflow, and committing full batches of segments.
    pub(super) fn push(&mut self, w: (u64, Option<Vec<u8>>, u64)) -> Result<()> {
        let more = w.1.as_ref().map_or(0, |b| b.len() as u64);
        let full =
            self.data_bytes + more > SEGMENT_DATA_BYTES || self.writes.len() >= SEGMENT_RECORDS;
        if !self.writes.is_empty() && full {
            self.seal()?;
            if self.sealed.len() >= SEGMENTS_PER_COMMIT {
                self.commit(Vec::new(), self.seq)?;
            }
        }
        self.data_bytes += more;
        self.writes.push(w);
        Ok(())
    }

    /// Seals the pending writes with consecutive sequence numbers.
    fn seal(&mut self) -> Result<()> {
        let mut writes = Vec::with_capacity(self.writes.len());
        for (offset, data, len) in &self.writes {
            writes.push(Write {
                seq: self.seq,
                offset: *offset,
                payload: match data {
                    Some(b) => Payload::Data(b),
                    None => Payload::Zero(*len),
                },
            });
            self.seq += 1;
        }
        let sealed = seal_segment(self.d, &mut self.ctx, &writes)?;
        self.sealed.push(sealed);
        self.writes.clear();
        self.data_bytes = 0;
        Ok(())
    }

    /// Uploads the sealed segments and commits them with `points`.
    fn commit(&mut self, points: Vec<Point>, next_seq: u64) -> Result<()> {
        let sealed = std::mem::take(&mut self.sealed);
        let bytes: u64 = sealed.iter().map(|s| s.bytes.len() as u64).sum();
        let d = self.d;
        d.store
            .block(append(d, &mut self.state, sealed, points, next_seq))?;
        self.sent += bytes;
        Ok(())
    }
}

/// One round of reverse replication for `served` (the disk at the recovery site):
/// sends the ranges its overlay journaled since the cursor in `cursor_dir` to
/// reverse machine `reverse_machine` (`reverse_machine()` of the forward one), as
/// one new point, then saves the cursor. A round with nothing written still commits
/// a point, so that failback always has a newest point to apply.
pub fn send_delta(
    served: &ServedDisk,
    store: &Store,
    vault: &VaultKey,
    reverse_machine: &str,
    cursor_dir: &Path,
) -> Result<DeltaReport> {
    send_round(served, store, vault, reverse_machine, cursor_dir, None)
}

/// Failback's last round of `served` (which no longer takes writes): `send_delta`,
/// with the disk's checksum map at the new point (`served_map`) stored and named by
/// the point, for the home disk to be verified against.
pub fn send_final_delta(
    served: &ServedDisk,
    store: &Store,
    vault: &VaultKey,
    reverse_machine: &str,
    cursor_dir: &Path,
    final_map: &BlockSums,
) -> Result<DeltaReport> {
    send_round(
        served,
        store,
        vault,
        reverse_machine,
        cursor_dir,
        Some(final_map),
    )
}

fn send_round(
    served: &ServedDisk,
    store: &Store,
    vault: &VaultKey,
    reverse_machine: &str,
    cursor_dir: &Path,
    final_map: Option<&BlockSums>,
) -> Result<DeltaReport> {
    let forward = forward_machine(reverse_machine)?;
    let name = served.name();
    let point = served.point().clone();
    let size = point.disk_bytes;
    let over = Over {
        machine: forward.to_string(),
        disk: name.to_string(),
        point: point.id.clone(),
        seq: point.seq,
    };
    let d = store.block(Disk::open_or_create(
        store,
        reverse_machine,
        name,
        vault,
        DEFAULT_BLOCK_BYTES,
        DEFAULT_EXTENT_BYTES,
    ))?;
    let state = store.block(d.load_state())?;
    check_over(&d, &state, &over)?;

    ferry_replica::local::create_private_dir(cursor_dir).map_err(io_err("create", cursor_dir))?;
    let cursor_file = cursor_path(cursor_dir, name);
    let from = load_cursor(&cursor_file, &over, &d.info.disk_id)?;
    let overlay = served.overlay();
    let to = overlay.synced_journal_bytes().map_err(|e| Error::Io {
        op: "sync the overlay of",
        path: name.to_string(),
        source: e,
    })?;
    if from > to {
        return Err(Error::Overlay {
            path: cursor_file.display().to_string(),
            why: format!(
                "its cursor (journal byte {from}) lies past the end of {name}'s journal ({to}): it belongs to another overlay"
            ),
        });
    }
    // Coalesced: later writes win, and only data versus zero matters here.
    let mut changed = RangeMap::default();
    overlay.journal_records(from, to, |offset, len, zero| {
        let end = offset.saturating_add(len).min(size);
        changed.insert(offset, end, if zero { Src::Zero } else { Src::At(0) });
    })?;

    let mut report = DeltaReport {
        ranges: 0,
        bytes_data: 0,
        bytes_zero: 0,
        bytes_sent: 0,
        point_id: String::new(),
        cursor: to,
        at: 0,
    };
    let mut round = Round::new(&d, state);
    for (s, e, src) in changed.overlapping(0, size) {
        report.ranges += 1;
        if src == Src::Zero {
            report.bytes_zero += e - s;
            round.push((s, None, e - s))?;
            continue;
        }
        let mut at = s;
        while at < e {
            let n = PIECE_BYTES.min(e - at);
            let mut buf = vec![0u8; n as usize];
            // The current bytes, whatever wrote them: a write racing this round is
            // sent now or, being journaled after `to`, again next round.
            served.read(at, &mut buf).map_err(|e| Error::Io {
                op: "read the served disk",
                path: format!("{name} at {at}"),
                source: e,
            })?;
            report.bytes_data += n;
            round.push((at, Some(buf), n))?;
            at += n;
        }
    }
    let (point_id, at) = round.finish(&over, size, final_map)?;
    report.point_id = point_id;
    report.at = at;
    report.bytes_sent = round.sent;

    // Only now: a crash before this line sends the same ranges again next round.
    let cursor = serde_json::json!({
        "reverse_machine": reverse_machine,
        "reverse_disk_id": d.info.disk_id,
        "over": over_json(&over),
        "journal_bytes": to,
        "point": report.point_id,
    });
    replace(&cursor_file, cursor.to_string().as_bytes())?;
    Ok(report)
}

#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// The reverse point to apply up to (an id); None: the newest.
    pub up_to: Option<String>,
    /// Where the "applied" marker is kept; None: beside the target (a regular file
    /// only: a block device's directory, /dev, is no place for it).
    pub state_dir: Option<PathBuf>,
}

/// What `apply_deltas` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Reverse points newly applied.
    pub points: u64,
    /// Log records written.
    pub records: u64,
    /// Bytes of the target written (data and zeros).
    pub bytes_written: u64,
    /// Bytes of objects fetched from the store (metadata and segments).
    pub bytes_fetched: u64,
    /// The reverse point the target now holds; None while none was applied.
    pub applied: Option<String>,
}

/// The marker file of `disk` for `target`.
pub fn marker_path(target: &Path, disk: &str, state_dir: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = state_dir {
        return Ok(dir.join(format!("{disk}.reverse-applied.json")));
    }
    let kind = std::fs::metadata(target)
        .map_err(io_err("open target", target))?
        .file_type();
    let file = target.file_name().filter(|_| !kind.is_block_device());
    let Some(file) = file else {
        return Err(Error::Target {
            path: target.display().to_string(),
            why: "a block device's applied marker needs a state directory".into(),
        });
    };
    let mut name = file.to_owned();
    name.push(".reverse-applied.json");
    Ok(target.with_file_name(name))
}

/// Applies the reverse replica's records of `disk` of `reverse_machine` onto
/// `target`, which must hold forward point `over_point` (made equal to it by
/// `sync_to_point`, then given the earlier rounds by this function): every record
/// above the last reverse point applied (its marker) up to `opts.up_to`, in sequence
/// order, then a sync, then the marker. The target is held exclusively throughout.
/// Refuses a reverse disk whose points are over another point, and a marker of
/// another point or reverse replica, naming both.
pub fn apply_deltas(
    store: &Store,
    vault: &VaultKey,
    reverse_machine: &str,
    disk: &str,
    over_point: &Point,
    target: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    let over = Over {
        machine: forward_machine(reverse_machine)?.to_string(),
        disk: disk.to_string(),
        point: over_point.id.clone(),
        seq: over_point.seq,
    };
    let (file, target_bytes) = open_target(target)?;
    let size = over_point.disk_bytes;
    if target_bytes < size {
        return Err(Error::Target {
            path: target.display().to_string(),
            why: format!("is {target_bytes} bytes, smaller than {over} ({size} bytes)"),
        });
    }
    let marker_file = marker_path(target, disk, opts.state_dir.as_deref())?;
    let store = store.counted();
    let d = store.block(Disk::open(&store, reverse_machine, disk, Some(vault)))?;
    let state = store.block(d.load_state())?;
    check_over(&d, &state, &over)?;
    let refuse = |why: String| Error::Reverse {
        disk: d.paths.label(),
        why,
    };

    // Above what the marker says the target holds.
    let marker = read_json(&marker_file)?;
    let mut from: Option<(u64, String)> = None;
    if let Some(m) = &marker {
        if m["over"] != over_json(&over) {
            return Err(refuse(format!(
                "{} says {} holds deltas over {}/{} at point {}, not over {over}: sync it to the point again and remove the marker",
                marker_file.display(),
                target.display(),
                m["over"]["machine"],
                m["over"]["disk"],
                m["over"]["point"]
            )));
        }
        if m["reverse_disk_id"].as_str() != Some(d.info.disk_id.as_str()) {
            return Err(refuse(format!(
                "{} names reverse disk {}, this one is {}: sync {} to the point again and remove the marker",
                marker_file.display(),
                m["reverse_disk_id"],
                d.info.disk_id,
                target.display()
            )));
        }
        let seq = m["seq"].as_u64().ok_or_else(|| Error::Overlay {
            path: marker_file.display().to_string(),
            why: "holds no seq".into(),
        })?;
        from = Some((seq, m["point"].as_str().unwrap_or_default().to_string()));
    }
    let to = match &opts.up_to {
        Some(id) => state.point(id).ok_or_else(|| {
            let known: Vec<&str> = state.points.iter().map(|p| p.id.as_str()).collect();
            refuse(format!(
                "has no point {id} (its points: {})",
                known.join(", ")
            ))
        })?,
        None => match state.points.iter().max_by_key(|p| p.seq) {
            Some(p) => p,
            None => {
                return Ok(ApplyReport {
                    points: 0,
                    records: 0,
                    bytes_written: 0,
                    bytes_fetched: store.fetched_bytes(),
                    applied: from.map(|f| f.1),
                })
            }
        },
    };
    let from_seq = from.as_ref().map(|f| f.0);
    // A compaction folds records into a base, which this applier does not read.
    if let Some(b) = &state.base {
        if from_seq.is_none_or(|f| f < b.seq) {
            return Err(refuse(format!(
                "was compacted to a base at seq {} past what {} holds: sync it to the point again",
                b.seq,
                target.display()
            )));
        }
    }
    let above = |seq: u64| from_seq.is_none_or(|f| seq > f);
    if !above(to.seq) {
        return Ok(ApplyReport {
            points: 0,
            records: 0,
            bytes_written: 0,
            bytes_fetched: store.fetched_bytes(),
            applied: from.map(|f| f.1),
        });
    }
    let points = state
        .points
        .iter()
        .filter(|p| above(p.seq) && p.seq <= to.seq)
        .count() as u64;

    let (mut records, mut written) = (0u64, 0u64);
    let shown = target.display().to_string();
    let key = d.key()?;
    let mut ctx = OpenContext::default();
    for seg in state
        .segments
        .iter()
        .filter(|s| above(s.last_seq) && s.first_seq <= to.seq)
    {
        let mut buf: Vec<u8> = store.block(store.get(&seg.object))?.into();
        let expect = Expect {
            key,
            disk_id: &d.disk_id,
            kind: ObjectKind::Segment,
            name: &seg.object,
        };
        open_object(&expect, &mut buf, &mut ctx, |chunk| {
            decode_records(
                chunk,
                |r| {
                    if !above(r.seq) || r.seq > to.seq {
                        return Ok(());
                    }
                    if r.offset.checked_add(r.len).is_none_or(|end| end > size) {
                        return Err(ferry_replica::Error::corrupt(
                            &seg.object,
                            format!("record past the disk's {size} bytes"),
                        ));
                    }
                    match r.data {
                        Some(b) => file.write_all_at(b, r.offset),
                        None => zero_range(&file, r.offset, r.len),
                    }
                    .map_err(|e| ferry_replica::Error::io("write target", shown.clone(), e))?;
                    records += 1;
                    written += r.len;
                    Ok(())
                },
                &seg.object,
            )
        })?;
    }
    file.sync_all().map_err(io_err("sync target", target))?;
    let m = serde_json::json!({
        "reverse_machine": reverse_machine,
        "reverse_disk_id": d.info.disk_id,
        "over": over_json(&over),
        "point": to.id,
        "seq": to.seq,
    });
    if let Some(dir) = &opts.state_dir {
        ferry_replica::local::create_private_dir(dir).map_err(io_err("create", dir))?;
    }
    replace(&marker_file, m.to_string().as_bytes())?;
    drop(file);
    Ok(ApplyReport {
        points,
        records,
        bytes_written: written,
        bytes_fetched: store.fetched_bytes(),
        applied: Some(to.id.clone()),
    })
}

/// Opens disk `disk` of `machine` as served from `dir` (serve-point's overlay
/// directory) without serving it, for a round of `send_delta`: from the directory
/// alone once hydration finished, else with the store (the log index is reused).
pub fn open_served(
    store: &Store,
    vault: &VaultKey,
    machine: &str,
    disk: &str,
    dir: &Path,
) -> Result<ServedDisk> {
    if let Ok(s) = ServedDisk::open_local(disk, dir, super::sync::CACHE_EXTENTS) {
        return Ok(s);
    }
    let saved = super::saved::load_base(&super::saved::base_path(dir, disk))?;
    let d = store.block(Disk::open(store, machine, disk, Some(vault)))?;
    let state = store.block(d.load_state())?;
    let point = state.point(&saved.point.id).cloned().ok_or_else(|| {
        ferry_replica::Error::NotFound(format!(
            "disk {disk} of machine {machine} has no point {} any more (served from {})",
            saved.point.id,
            dir.display()
        ))
    })?;
    ServedDisk::open(disk, d, &state, &point, dir, super::sync::CACHE_EXTENTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_back_and_names_round_trip() {
        let o = Over {
            machine: "m1".into(),
            disk: "sda".into(),
            point: "20260101T000000.000Z-0a1b2c3d".into(),
            seq: 42,
        };
        assert_eq!(Over::parse(&o.label()), Some(o));
        assert_eq!(Over::parse("nightly"), None);
        assert_eq!(Over::parse("over m/d at p seq x"), None);
        assert_eq!(reverse_machine("m1").unwrap(), "m1.reverse");
        assert_eq!(forward_machine("m1.reverse").unwrap(), "m1");
        assert!(forward_machine("m1").is_err());
        assert!(forward_machine(".reverse").is_err());
        assert!(reverse_machine(&"m".repeat(60)).is_err());
    }
}
