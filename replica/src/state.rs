//! The state of one disk as its commit records describe it, and the fold that builds it.
//! Folding is pure so it can be tested without a store: a checkpoint replaces the whole
//! state, an append adds segments and points after validating their order.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::meta::{Base, Commit, CommitKind, Point, SegmentRef};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiskState {
    /// Number of the newest commit folded in; None for a disk with no commit yet.
    pub head: Option<u64>,
    /// Every sequence number below this is accounted for.
    pub next_seq: u64,
    pub base: Option<Base>,
    /// Live log segments, in sequence order, ranges disjoint.
    pub segments: Vec<SegmentRef>,
    /// Live recovery points, in commit order (sequence order).
    pub points: Vec<Point>,
    /// The writer epoch: raised by one by each process server's claim, never lowered
    /// (0 for a disk no process server has claimed).
    pub epoch: u64,
    /// The process server that claimed `epoch` (from the newest record that named
    /// one); None before any claim.
    pub writer: Option<String>,
}

impl DiskState {
    /// Number the next commit must take.
    pub fn next_commit(&self) -> u64 {
        self.head.map_or(0, |h| h + 1)
    }

    /// Applies one commit record read from `object`.
    pub fn fold(&mut self, object: &str, c: &Commit, disk_id: &str) -> Result<()> {
        let bad = |reason: String| Error::corrupt(object, reason);
        if c.format != crate::meta::COMMIT_FORMAT {
            return Err(bad(format!("unsupported format {}", c.format)));
        }
        if c.disk_id != disk_id {
            return Err(bad("belongs to another disk".into()));
        }
        if c.commit == u64::MAX {
            return Err(bad("its number leaves no number for the next commit".into()));
        }
        if let Some(n) = crate::layout::number_of(object) {
            if n != c.commit {
                return Err(bad(format!(
                    "names commit {} but is stored as {n}",
                    c.commit
                )));
            }
        }
        // A reader may start at a checkpoint of any number; after that, numbers are
        // consecutive.
        let starts_here = self.head.is_none() && c.kind == CommitKind::Checkpoint;
        if c.commit != self.next_commit() && !starts_here {
            return Err(bad(format!("commit {} follows {:?}", c.commit, self.head)));
        }
        if c.next_seq < self.next_seq && c.kind == CommitKind::Append {
            return Err(bad("sequence numbers go backwards".into()));
        }
        let writer = self.writer_after(c).map_err(bad)?;
        let mut next = match c.kind {
            CommitKind::Checkpoint => DiskState {
                head: Some(c.commit),
                next_seq: c.next_seq,
                base: c.base.clone(),
                segments: Vec::new(),
                points: Vec::new(),
                epoch: c.epoch,
                writer,
            },
            CommitKind::Append => {
                if c.base.is_some() {
                    return Err(bad("an append commit carries a base".into()));
                }
                let mut s = self.clone();
                s.head = Some(c.commit);
                s.next_seq = c.next_seq;
                s.epoch = c.epoch;
                s.writer = writer;
                s
            }
        };
        // Checked before `floor`: a base below next_seq has a sequence number after it.
        if let Some(b) = &next.base {
            if b.seq >= c.next_seq || b.extent_bytes == 0 {
                return Err(bad("base is not below next_seq".into()));
            }
        }
        let floor = next.base.as_ref().map_or(0, |b| b.seq + 1);
        for seg in &c.segments {
            let after = next.segments.last().map_or(0, |l| l.last_seq + 1);
            if seg.first_seq > seg.last_seq || seg.last_seq >= c.next_seq || seg.first_seq < after {
                return Err(bad(format!(
                    "segment {} is out of sequence order",
                    seg.object
                )));
            }
            if seg.last_seq < floor {
                return Err(bad(format!(
                    "segment {} lies wholly inside the base",
                    seg.object
                )));
            }
            next.segments.push(seg.clone());
        }
        for p in &c.points {
            if p.seq >= c.next_seq || next.points.iter().any(|q| q.id == p.id) {
                return Err(bad(format!("point {} is invalid or repeated", p.id)));
            }
            if next.base.as_ref().is_some_and(|b| p.seq < b.seq) {
                return Err(bad(format!("point {} lies before the base", p.id)));
            }
            next.points.push(p.clone());
        }
        *self = next;
        Ok(())
    }

    /// The state's writer after `c`, or why `c` breaks the fencing rules: an epoch
    /// never goes down, and within one epoch only its claimant names itself. A reader
    /// that starts at a checkpoint takes the checkpoint's epoch as it is.
    fn writer_after(&self, c: &Commit) -> std::result::Result<Option<String>, String> {
        if self.head.is_none() {
            return Ok(c.writer.clone());
        }
        if c.epoch < self.epoch {
            return Err(format!(
                "writer epoch {} follows epoch {} of {}: a fenced writer committed",
                c.epoch,
                self.epoch,
                self.writer.as_deref().unwrap_or("no process server")
            ));
        }
        if c.epoch > self.epoch {
            return Ok(c.writer.clone());
        }
        match &c.writer {
            None => Ok(self.writer.clone()),
            Some(w) if Some(w) == self.writer.as_ref() => Ok(self.writer.clone()),
            Some(w) => Err(format!(
                "writer {w} commits in epoch {}, which {} holds",
                c.epoch,
                self.writer.as_deref().unwrap_or("no process server")
            )),
        }
    }

    /// Whether the state is in epoch `epoch` of `writer`: a process server commits
    /// only then.
    pub fn held_by(&self, epoch: u64, writer: Option<&str>) -> bool {
        self.epoch == epoch && self.writer.as_deref() == writer
    }

    pub fn latest_point(&self) -> Option<&Point> {
        self.points.iter().max_by_key(|p| (p.seq, p.time))
    }

    pub fn point(&self, id: &str) -> Option<&Point> {
        self.points.iter().find(|p| p.id == id)
    }

    /// Every data object the state needs.
    pub fn referenced(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if let Some(b) = &self.base {
            out.extend(b.extents.iter().map(|e| e.object.clone()));
        }
        out.extend(self.segments.iter().map(|s| s.object.clone()));
        out.extend(self.points.iter().filter_map(|p| p.sums.clone()));
        out
    }

    /// Segments holding writes in (base.seq, seq], in order.
    pub fn segments_up_to(&self, seq: u64) -> impl Iterator<Item = &SegmentRef> {
        let floor = self.base.as_ref().map_or(0, |b| b.seq + 1);
        self.segments
            .iter()
            .filter(move |s| s.first_seq <= seq && s.last_seq >= floor)
    }

    /// Stored bytes a rebuild at `seq` reads. The sizes come from commit records, so
    /// the sum saturates rather than overflow on a hostile one.
    pub fn stored_bytes_up_to(&self, seq: u64) -> u64 {
        let base = self
            .base
            .iter()
            .flat_map(|b| &b.extents)
            .map(|e| e.stored_bytes);
        base.chain(self.segments_up_to(seq).map(|s| s.stored_bytes))
            .fold(0, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{decode, CommitKind};

    const DISK: &str = "00112233445566778899aabbccddeeff";

    fn commit(n: u64, kind: CommitKind, next_seq: u64) -> Commit {
        Commit {
            format: crate::meta::COMMIT_FORMAT,
            commit: n,
            disk_id: DISK.into(),
            kind,
            time: chrono::Utc::now(),
            next_seq,
            base: None,
            segments: Vec::new(),
            points: Vec::new(),
            epoch: 0,
            writer: None,
        }
    }

    fn segment(first_seq: u64, last_seq: u64, stored_bytes: u64) -> SegmentRef {
        SegmentRef {
            object: format!("seg/{first_seq}"),
            first_seq,
            last_seq,
            stored_bytes,
        }
    }

    // Hostile records of the kind the metadata fuzz target folds: a checkpoint
    // numbered u64::MAX was taken, and the next commit's number then overflowed.
    #[test]
    fn the_last_commit_number_is_refused() {
        let mut s = DiskState::default();
        let e = s
            .fold("c", &commit(u64::MAX, CommitKind::Checkpoint, 1), DISK)
            .unwrap_err();
        assert!(e.to_string().contains("no number for the next"), "{e}");
        assert_eq!(s.next_commit(), 0);
        s.fold("c", &commit(u64::MAX - 1, CommitKind::Checkpoint, 1), DISK)
            .unwrap();
        assert_eq!(s.next_commit(), u64::MAX);
    }

    // A base at sequence u64::MAX overflowed before it was checked against next_seq.
    #[test]
    fn a_base_at_the_last_sequence_number_is_refused() {
        let json = format!(
            r#"{{"format":2,"commit":0,"disk_id":"{DISK}","kind":"checkpoint","time":"2026-01-01T00:00:00Z","next_seq":5,"base":{{"generation":"g","seq":18446744073709551615,"disk_bytes":0,"extent_bytes":1,"extents":[]}}}}"#
        );
        let c: Commit = decode(
            "c",
            &crate::meta::encode(&serde_json::from_str::<Commit>(&json).unwrap()),
        )
        .unwrap();
        let e = DiskState::default().fold("c", &c, DISK).unwrap_err();
        assert!(e.to_string().contains("base is not below next_seq"), "{e}");
    }

    // Stored sizes that sum past u64::MAX.
    #[test]
    fn stored_bytes_saturate() {
        let mut c = commit(0, CommitKind::Checkpoint, 10);
        c.segments = vec![segment(0, 3, u64::MAX), segment(4, 9, 2)];
        let mut s = DiskState::default();
        s.fold("c", &c, DISK).unwrap();
        assert_eq!(s.stored_bytes_up_to(9), u64::MAX);
    }

    fn in_epoch(mut c: Commit, epoch: u64, writer: Option<&str>) -> Commit {
        c.epoch = epoch;
        c.writer = writer.map(str::to_string);
        c
    }

    #[test]
    fn an_epoch_never_goes_down_and_belongs_to_its_claimant() {
        let mut s = DiskState::default();
        s.fold("c0", &commit(0, CommitKind::Checkpoint, 1), DISK)
            .unwrap();
        assert!(s.held_by(0, None));
        // A claim: the next epoch, its writer, nothing else.
        let claim = in_epoch(commit(1, CommitKind::Append, 1), 1, Some("ps-a"));
        s.fold("c1", &claim, DISK).unwrap();
        assert!(s.held_by(1, Some("ps-a")));
        s.fold(
            "c2",
            &in_epoch(commit(2, CommitKind::Append, 3), 1, Some("ps-a")),
            DISK,
        )
        .unwrap();
        // A writer that is no process server (a seed's append) keeps the claimant.
        s.fold(
            "c3",
            &in_epoch(commit(3, CommitKind::Append, 4), 1, None),
            DISK,
        )
        .unwrap();
        assert!(s.held_by(1, Some("ps-a")));
        // Another process server in ps-a's epoch, and any writer in an older one.
        for (c, why) in [
            (
                in_epoch(commit(4, CommitKind::Append, 5), 1, Some("ps-b")),
                "writer ps-b commits in epoch 1, which ps-a holds",
            ),
            (
                in_epoch(commit(4, CommitKind::Append, 5), 0, Some("ps-a")),
                "writer epoch 0 follows epoch 1 of ps-a",
            ),
            (
                commit(4, CommitKind::Append, 5),
                "writer epoch 0 follows epoch 1",
            ),
        ] {
            let e = s.clone().fold("c4", &c, DISK).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("c4"), "{e}");
        }
        // ps-b claims epoch 2: from then on ps-a is fenced.
        s.fold(
            "c4",
            &in_epoch(commit(4, CommitKind::Append, 4), 2, Some("ps-b")),
            DISK,
        )
        .unwrap();
        assert!(s.held_by(2, Some("ps-b")) && !s.held_by(1, Some("ps-a")));
        let e = s
            .clone()
            .fold(
                "c5",
                &in_epoch(commit(5, CommitKind::Append, 6), 1, Some("ps-a")),
                DISK,
            )
            .unwrap_err();
        assert!(e.to_string().contains("a fenced writer committed"), "{e}");
    }

    #[test]
    fn a_checkpoint_carries_the_epoch_and_a_reader_starts_from_it() {
        let mut s = DiskState::default();
        s.fold("c0", &commit(0, CommitKind::Checkpoint, 1), DISK)
            .unwrap();
        s.fold(
            "c1",
            &in_epoch(commit(1, CommitKind::Append, 1), 3, Some("ps-a")),
            DISK,
        )
        .unwrap();
        let cp = in_epoch(commit(2, CommitKind::Checkpoint, 1), 3, Some("ps-a"));
        s.fold("c2", &cp, DISK).unwrap();
        assert!(s.held_by(3, Some("ps-a")));
        // A checkpoint may not lower the epoch either.
        let low = in_epoch(commit(3, CommitKind::Checkpoint, 1), 2, Some("ps-a"));
        assert!(s.clone().fold("c3", &low, DISK).is_err());
        // A reader that starts at the checkpoint takes its epoch and writer.
        let mut r = DiskState::default();
        r.fold("c2", &cp, DISK).unwrap();
        assert!(r.held_by(3, Some("ps-a")));
    }

    // Records written before fencing carry neither field: they fold in epoch 0, and
    // records without the fields serialise exactly as before (so their MACs hold).
    #[test]
    fn records_without_an_epoch_fold_as_before() {
        let json = format!(
            r#"{{"format":2,"commit":0,"disk_id":"{DISK}","kind":"checkpoint","time":"2026-01-01T00:00:00Z","next_seq":5}}"#
        );
        let c: Commit = serde_json::from_str(&json).unwrap();
        assert_eq!((c.epoch, c.writer.as_deref()), (0, None));
        assert!(!serde_json::to_string(&c).unwrap().contains("epoch"));
        let mut s = DiskState::default();
        s.fold("c0", &c, DISK).unwrap();
        assert!(s.held_by(0, None));
        let claim = in_epoch(commit(1, CommitKind::Append, 5), 1, Some("ps-a"));
        let text = serde_json::to_string(&claim).unwrap();
        assert!(text.contains(r#""epoch":1,"writer":"ps-a""#), "{text}");
        s.fold("c1", &serde_json::from_str(&text).unwrap(), DISK)
            .unwrap();
        assert!(s.held_by(1, Some("ps-a")));
    }
}
