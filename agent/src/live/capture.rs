//! Write capture: the NBD device of a protected disk. Each write is applied to the
//! disk file and appended to the disk's journal under one lock, before the NBD reply,
//! so the journal's order is the order the disk saw. Bookmarks (recovery points) go
//! into the same stream under the same lock: a point holds exactly the writes that
//! completed before it. FLUSH and FUA make the journal durable as well as the disk.
//!
//! The initial copy goes through the same lock too: each region is read from the disk
//! and journaled in one step, so a live write that follows it has a later sequence
//! number and the replica can never see older copied data over a newer write.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use ferry_replica::scan::{scan_region, Run, ZERO_SUM};
use ferry_replica::sums::BlockSums;

use ferry_link::log::{DurableLog, Position};
use ferry_link::protocol::{encode, Bookmark, Decoded, Frame, PointKindWire};

use super::checksum::Resync;
use super::last_stop;
use crate::nbd::{Device, FileDevice};

pub struct Capture {
    pub disk: String,
    dir: std::path::PathBuf,
    dev: FileDevice,
    state: Mutex<State>,
    /// Checksum resync against the replica (see `checksum`).
    pub resync: Resync,
    /// The durable watermark the process server first answered with (NO_CONTACT
    /// until then): zero means it holds nothing of this disk yet.
    pub contact: AtomicU64,
    /// Set by an ordered stop, after the last flush: later writes are refused, or one
    /// could reach the disk without a journal record that a power cut keeps.
    closed: AtomicBool,
    /// Writes held or refused while the machine fails over (`failover::Switch`).
    gate: super::failover::Gate,
    /// Set when the journal was dropped outside the sender (a re-enable): where the
    /// journal and the numbering start now. The sender takes it and reads from there.
    reset: Mutex<Option<(Position, u64)>>,
}

pub const NO_CONTACT: u64 = u64::MAX;

/// Granularity of the dirty bitmap used after the journal overflows.
pub const REGION_BYTES: u64 = 1 << 20;

/// Why the disk owes a comparison with its replica, recorded durably
/// (`last_stop::owe_compare`) so that a restart cannot forget it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owed {
    None,
    /// The journal overflowed: its dirty regions, in memory only, are owed; once they
    /// are journaled again nothing is. A restart before that compares in full.
    Overflow,
    /// A whole comparison: the host went down, or numbers or the journal were lost.
    Full,
}

pub struct State {
    /// The journal overflowed: writes only mark their regions here, and the resync
    /// journals those regions again from the disk before any point is allowed.
    pub dirty: std::collections::BTreeSet<u64>,
    pub overflowed: bool,
    pub owed: Owed,
    /// The newest write the journal held when opened: after a kill it may be
    /// journaled but not applied to the disk (see `reconcile`).
    pub last_write: Option<(u64, u64)>,
    pub next_seq: u64,
    pub journal: DurableLog,
    /// The newest point: (id, sequence).
    pub last_point: Option<(String, u64)>,
    /// Points not yet seen uploaded, for the control plane's heartbeat.
    pub points: super::points::PointLog,
    buf: Vec<u8>,
    /// The sequence number of the first frame in the journal as opened: the oldest
    /// it held, or (empty) the next to be assigned.
    pub first_seq: u64,
}

fn journal_err(e: ferry_link::log::LogError) -> io::Error {
    io::Error::other(e.to_string())
}

impl Capture {
    /// Opens the disk and its journal; the next sequence number continues after the
    /// newest journaled frame, or from `seq_floor` (what the replica already holds).
    pub fn open(
        disk: &str,
        path: &Path,
        journal_dir: &Path,
        journal_bytes: u64,
        seq_floor: u64,
    ) -> io::Result<Capture> {
        let dev = FileDevice::open(path)?;
        let mut next_seq = seq_floor.max(read_seq(journal_dir));
        let mut first_seq = None;
        let mut last_write = None;
        let (journal, _) = DurableLog::open_each(
            journal_dir,
            (journal_bytes / 8).clamp(64 << 10, 64 << 20),
            journal_bytes,
            // The sender reads appends before they are synced: every file must be
            // under its own name from the start.
            false,
            |e| {
                if let Ok(Decoded::Frame(f, _)) = ferry_link::protocol::decode(e.payload, u32::MAX)
                {
                    if let Some(s) = seq_of(&f) {
                        next_seq = next_seq.max(s + 1);
                        first_seq.get_or_insert(s);
                    }
                    match f {
                        Frame::Write { offset, data, .. } => {
                            last_write = Some((offset, data.len() as u64))
                        }
                        Frame::Zero { offset, len, .. } => last_write = Some((offset, len)),
                        _ => {}
                    }
                }
            },
        )
        .map_err(journal_err)?;
        Ok(Capture {
            disk: disk.to_string(),
            dir: journal_dir.to_path_buf(),
            dev,
            state: Mutex::new(State {
                dirty: std::collections::BTreeSet::new(),
                overflowed: false,
                owed: match last_stop::owes_compare(journal_dir) {
                    true => Owed::Full,
                    false => Owed::None,
                },
                next_seq,
                journal,
                last_point: None,
                points: Default::default(),
                buf: Vec::new(),
                first_seq: first_seq.unwrap_or(next_seq),
                last_write,
            }),
            resync: Resync::default(),
            contact: AtomicU64::new(NO_CONTACT),
            closed: AtomicBool::new(false),
            gate: Default::default(),
            reset: Mutex::new(None),
        })
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("capture lock")
    }

    /// Journals one frame built by `make` from the next sequence number.
    fn try_journal(
        &self,
        st: &mut State,
        make: impl FnOnce(u64, &mut Vec<u8>),
    ) -> Result<u64, ferry_link::log::LogError> {
        let seq = st.next_seq;
        let mut buf = std::mem::take(&mut st.buf);
        buf.clear();
        make(seq, &mut buf);
        let r = st.journal.append(&self.disk, &buf);
        st.buf = buf;
        r?;
        st.next_seq += 1;
        Ok(seq)
    }

    fn journal(&self, st: &mut State, make: impl FnOnce(u64, &mut Vec<u8>)) -> io::Result<u64> {
        self.try_journal(st, make).map_err(journal_err)
    }

    /// Journals a write, or once the journal is full, marks its regions dirty instead
    /// (bitmap mode): the application's write never fails for want of journal.
    fn capture(
        &self,
        st: &mut State,
        offset: u64,
        len: u64,
        make: impl FnOnce(u64, &mut Vec<u8>),
    ) -> io::Result<()> {
        if !st.overflowed {
            match self.try_journal(st, make) {
                Ok(_) => return Ok(()),
                Err(ferry_link::log::LogError::Full { .. }) => {
                    tracing::warn!(disk = %self.disk, "journal full: tracking dirty regions until it drains, then resyncing them");
                    st.overflowed = true;
                    if let Err(e) = self.owe(st, Owed::Overflow) {
                        tracing::error!(disk = %self.disk, error = %e, "could not record the dirty regions as owed: a restart before they are resynced would not compare the disk");
                    }
                }
                Err(e) => return Err(journal_err(e)),
            }
        }
        let first = offset / REGION_BYTES;
        let last = (offset + len.max(1) - 1) / REGION_BYTES;
        st.dirty.extend(first..=last);
        Ok(())
    }

    /// Bitmap mode: journals one dirty region again from the disk (zeroes as a Zero
    /// frame: the replica may hold data there). Returns false when none is left, and
    /// then the capture is back to journaling every write.
    pub fn resync_one(&self, buf: &mut Vec<u8>) -> io::Result<bool> {
        let mut st = self.state();
        let Some(&region) = st.dirty.iter().next() else {
            if st.overflowed {
                st.overflowed = false;
                tracing::info!(disk = %self.disk, "dirty regions resynced: journaling every write again");
                if st.owed == Owed::Overflow {
                    // What they held is journaled; durable, nothing is owed.
                    st.journal.sync().map_err(journal_err)?;
                    last_stop::compared(&self.dir)?;
                    st.owed = Owed::None;
                }
            }
            return Ok(false);
        };
        let offset = region * REGION_BYTES;
        let len = REGION_BYTES.min(self.dev.size() - offset);
        self.journal_from_disk(&mut st, offset, len, buf, true)?;
        st.dirty.remove(&region);
        Ok(true)
    }

    /// The process server holds sequence numbers this agent was about to reuse (its
    /// own record of them was lost): continue numbering above `floor`, and compare the
    /// disk with the replica, since what those numbers carried is unknown here.
    pub fn renumber(&self, floor: u64) {
        let mut st = self.state();
        st.next_seq = st.next_seq.max(floor);
        if let Err(e) = self.owe(&mut st, Owed::Full) {
            tracing::error!(disk = %self.disk, error = %e, "could not record the comparison as owed");
        }
        drop(st);
        // From the start even if a resync was under way: its frames below `floor`
        // would be ignored as resends.
        self.resync
            .restart("the agent's journal and sequence numbers were lost");
        tracing::error!(disk = %self.disk, floor, "sequence numbers were lost: numbering on from the process server's and resyncing by checksum");
    }

    /// The process server holds less than this agent's journal starts from (it lost
    /// its cache): nothing can fill the gap, so the journal is given up, numbering
    /// continues at `seq` (what the server expects next) and the disk is compared
    /// with the replica. Returns where the sender reads from now.
    pub fn restart_at(&self, seq: u64) -> Position {
        let mut st = self.state();
        // The number first, as in `trim`: a kill must not leave an empty journal with
        // a stale number.
        if let Err(e) = write_seq(&self.dir, seq) {
            tracing::warn!(disk = %self.disk, error = %e, "could not record the next sequence number");
        }
        let end = st.journal.end_position();
        if let Err(e) = st.journal.release_before(end) {
            tracing::warn!(disk = %self.disk, error = %e, "could not drop the journal");
        }
        st.next_seq = seq;
        // Their bookmarks went with the journal, and their numbers go to new frames.
        st.points.forget_from(seq);
        if st.last_point.as_ref().is_some_and(|p| p.1 >= seq) {
            st.last_point = None;
        }
        let at = st.journal.end_position();
        if let Err(e) = self.owe(&mut st, Owed::Full) {
            tracing::error!(disk = %self.disk, error = %e, "could not record the comparison as owed");
        }
        drop(st);
        if self.resync.reenabling() {
            // Expected after a re-enable: the journal from before the failover was
            // dropped, and its numbers past what the server holds never reached it.
            tracing::info!(disk = %self.disk, seq, "re-enabled after a failover: numbering on from the process server's watermark");
        } else {
            tracing::error!(disk = %self.disk, seq, "the process server lost writes: dropping the journal and resyncing by checksum");
        }
        // From the start even if a resync was under way: what it journaled is gone.
        self.resync
            .restart("the process server lost writes this agent no longer holds");
        at
    }

    /// The failover was lifted (re-enable): the disk may have been rewritten
    /// underneath (a failback's master target), and the journal may hold writes from
    /// before the failover that never reached the replica, which must never be sent
    /// over what the disk holds now. So, under the capture lock and before writes
    /// open: the comparison is owed durably (a restart resumes it as a re-enable's),
    /// the journal is dropped (numbering goes on; a process server holding less says
    /// where to number from) and a checksum resync of the whole disk is wanted. A
    /// write accepted after this is journaled after the drop and is either in what
    /// the resync reads or after it, as in any resync.
    pub fn reenable(&self) -> io::Result<()> {
        let mut st = self.state();
        last_stop::owe_reenable(&self.dir)?;
        st.owed = Owed::Full;
        // The number first, as in `trim`: a kill must not leave an empty journal with
        // a stale number.
        write_seq(&self.dir, st.next_seq)?;
        let end = st.journal.end_position();
        st.journal.release_before(end).map_err(journal_err)?;
        // The whole disk is compared: the dirty regions of an overflow are in it.
        st.overflowed = false;
        st.dirty.clear();
        let at = st.journal.end_position();
        *self.reset.lock().expect("reset lock") = Some((at, st.next_seq));
        self.resync.reenable(
            "re-enabled after a failover: the disk may have been rewritten by a failback",
        );
        Ok(())
    }

    /// Where the sender reads from after a journal dropped outside it, once.
    pub fn take_reset(&self) -> Option<(Position, u64)> {
        self.reset.lock().expect("reset lock").take()
    }

    /// Checksum resync: compares `len` bytes at `offset` (whole blocks of the map)
    /// with the replica's checksums and journals the blocks that differ, all under
    /// the capture lock. Returns the bytes journaled.
    pub fn compare_range(
        &self,
        map: &BlockSums,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<u64> {
        let mut st = self.state();
        buf.resize(len as usize, 0);
        self.dev.read(offset, buf)?;
        let bs = map.block_bytes as usize;
        let first = (offset / map.block_bytes) as usize;
        let blocks = buf.len().div_ceil(bs);
        let old = &map.sums[first.min(map.sums.len())..(first + blocks).min(map.sums.len())];
        let mut sums = vec![ZERO_SUM; blocks];
        let mut sent = 0;
        let mut failed = None;
        scan_region(buf, offset, bs, Some(old), &mut sums, 1 << 20, |run| {
            if failed.is_some() {
                return;
            }
            let r = match run {
                Run::Data { offset, data } => {
                    sent += data.len() as u64;
                    self.journal(&mut st, |seq, out| {
                        encode(&Frame::Write { seq, offset, data }, out)
                    })
                }
                Run::Zero { offset, len } => {
                    sent += len;
                    self.journal(&mut st, |seq, out| {
                        encode(&Frame::Zero { seq, offset, len }, out)
                    })
                }
            };
            if let Err(e) = r {
                failed = Some(e);
            }
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(sent),
        }
    }

    /// Takes a recovery point now; returns its id.
    pub fn bookmark(
        &self,
        kind: PointKindWire,
        label: &str,
        group: &str,
        id: Option<&str>,
    ) -> io::Result<String> {
        let mut st = self.state();
        let id = id.map_or_else(
            || {
                format!(
                    "{}-{:x}",
                    chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
                    rand::random::<u32>()
                )
            },
            str::to_string,
        );
        self.bookmark_locked(&mut st, kind, label, group, &id)?;
        Ok(id)
    }

    /// Journals a point while the caller holds the capture lock (a group cut holds
    /// every disk's lock across the two phases).
    pub fn bookmark_locked(
        &self,
        st: &mut State,
        kind: PointKindWire,
        label: &str,
        group: &str,
        id: &str,
    ) -> io::Result<()> {
        let time_ms = chrono::Utc::now().timestamp_millis();
        let seq = self.journal(st, |seq, buf| {
            encode(
                &Frame::Bookmark(Bookmark {
                    seq,
                    kind,
                    time_ms,
                    id,
                    group,
                    label,
                    disk_bytes: Some(self.dev.size()),
                }),
                buf,
            )
        })?;
        st.last_point = Some((id.to_string(), seq));
        st.points.push(super::points::PointMark {
            id: id.to_string(),
            kind,
            time_ms,
            seq,
        });
        Ok(())
    }

    /// Copies `len` bytes at `offset` from the disk into the journal as one write
    /// (skipped when all zero: a fresh replica reads zero there already).
    pub fn copy_region(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<bool> {
        let mut st = self.state();
        self.journal_from_disk(&mut st, offset, len as u64, buf, false)
    }

    /// Reads a region from the disk and journals it as it is: a Write, or for an
    /// all-zero region a Zero frame (`zeroes`) or nothing. Returns whether it journaled.
    fn journal_from_disk(
        &self,
        st: &mut State,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
        zeroes: bool,
    ) -> io::Result<bool> {
        buf.resize(len as usize, 0);
        self.dev.read(offset, buf)?;
        if ferry_replica::scan::is_zero(buf) {
            if zeroes {
                self.journal(st, |seq, out| {
                    encode(&Frame::Zero { seq, offset, len }, out)
                })?;
            }
            return Ok(zeroes);
        }
        self.journal(st, |seq, out| {
            encode(
                &Frame::Write {
                    seq,
                    offset,
                    data: buf,
                },
                out,
            )
        })?;
        Ok(true)
    }

    /// Records, durably, that the disk must be compared with its replica in full.
    pub fn owe_compare(&self) -> io::Result<()> {
        self.owe(&mut self.state(), Owed::Full)
    }

    fn owe(&self, st: &mut State, why: Owed) -> io::Result<()> {
        if st.owed == Owed::None {
            last_stop::owe_compare(&self.dir)?;
        }
        if st.owed != Owed::Full {
            st.owed = why;
        }
        Ok(())
    }

    pub fn owes_compare(&self) -> bool {
        self.state().owed != Owed::None
    }

    /// A whole comparison is done: what it journaled is made durable, and nothing is
    /// owed but an overflow's dirty regions, if the journal overflowed meanwhile.
    pub fn compared(&self) -> io::Result<()> {
        let mut st = self.state();
        st.journal.sync().map_err(journal_err)?;
        if st.overflowed {
            st.owed = Owed::Overflow;
            return Ok(());
        }
        last_stop::compared(&self.dir)?;
        st.owed = Owed::None;
        Ok(())
    }

    /// The last flush of an ordered stop: the disk and the journal made durable, and,
    /// under the same lock, every later write refused.
    pub fn close(&self) -> io::Result<()> {
        let mut st = self.state();
        self.dev.flush()?;
        st.journal.sync().map_err(journal_err)?;
        self.closed.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Checked under the capture lock, as `close` and `set_writes` set them.
    fn refuse_if_closed(&self) -> io::Result<()> {
        match self.closed.load(Ordering::SeqCst) {
            true => Err(io::Error::other("the agent is stopping")),
            false => self.gate.refusal(&self.disk),
        }
    }

    /// Opens, holds or refuses writes from now on; under the capture lock, so that a
    /// write in progress ends first and every later one sees the change.
    pub fn set_writes(&self, w: super::failover::Writes) {
        let _st = self.state();
        self.gate.set(w);
    }

    pub fn writes(&self) -> super::failover::Writes {
        self.gate.get()
    }

    /// Makes the journal durable.
    pub fn sync_journal(&self) -> io::Result<()> {
        self.state().journal.sync().map_err(journal_err)
    }

    pub fn journal_max(&self) -> u64 {
        self.state().journal.max_bytes()
    }

    /// After an unclean stop the journal's newest write may never have reached the
    /// disk (the agent journals first, then applies). Journal that region again as the
    /// disk holds it now, so the replica ends up equal to the disk. Returns the bytes.
    pub fn reconcile(&self) -> io::Result<u64> {
        let Some((offset, len)) = self.state().last_write.take() else {
            return Ok(0);
        };
        let mut st = self.state();
        self.journal_from_disk(&mut st, offset, len, &mut Vec::new(), true)?;
        Ok(len)
    }

    /// Bytes held in the journal.
    pub fn journal_bytes(&self) -> u64 {
        self.state().journal.used_bytes()
    }

    /// Drops journal files wholly before `upto` (acknowledged durable upstream). A
    /// journal drained empty keeps the next sequence number in `next_seq`, so a
    /// restart continues the numbering the process server knows.
    pub fn trim(&self, upto: Position) {
        let mut st = self.state();
        if upto < st.journal.first_position() || st.journal.used_bytes() == 0 {
            return;
        }
        // Record the next sequence number before deleting anything: a kill between the
        // two must never leave a journal that lacks frames and a stale number, or a
        // restarted agent would reuse numbers the process server already holds.
        let end = st.journal.end_position();
        let deletes =
            upto.file > st.journal.first_position().file || (upto >= end && end.offset > 0);
        if deletes {
            if let Err(e) = write_seq(&self.dir, st.next_seq) {
                tracing::warn!(disk = %self.disk, error = %e, "could not record the next sequence number; keeping the journal");
                return;
            }
        }
        if let Err(e) = st.journal.release_before(upto) {
            tracing::warn!(disk = %self.disk, error = %e, "could not trim the journal");
        }
    }
}

fn write_seq(dir: &Path, seq: u64) -> io::Result<()> {
    let tmp = dir.join("next_seq.tmp");
    std::fs::write(&tmp, seq.to_string())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join("next_seq"))?;
    // The journal files deleted next must not outlive, in a power cut, the number
    // that replaces them.
    std::fs::File::open(dir)?.sync_all()
}

fn read_seq(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("next_seq"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

pub fn seq_of(f: &Frame<'_>) -> Option<u64> {
    match f {
        Frame::Write { seq, .. } | Frame::Zero { seq, .. } => Some(*seq),
        Frame::Bookmark(b) => Some(b.seq),
        _ => None,
    }
}

impl Device for Capture {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.dev.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let mut st = self.state();
        self.refuse_if_closed()?;
        // Journal first: the journal, not the disk, is what must never miss a write.
        self.capture(&mut st, offset, data.len() as u64, |seq, buf| {
            encode(&Frame::Write { seq, offset, data }, buf)
        })?;
        self.dev.write(offset, data, false)?;
        if fua {
            self.dev.flush()?;
            st.journal.sync().map_err(journal_err)?;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let mut st = self.state();
        self.refuse_if_closed()?;
        self.capture(&mut st, offset, len, |seq, buf| {
            encode(&Frame::Zero { seq, offset, len }, buf)
        })?;
        self.dev.zero(offset, len, false)?;
        if fua {
            self.dev.flush()?;
            st.journal.sync().map_err(journal_err)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.dev.flush()?;
        self.state().journal.sync().map_err(journal_err)
    }
}

/// The journal's end, for the sender to read up to.
pub fn journal_end(c: &Capture) -> Position {
    c.state().journal.end_position()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::checksum::Phase;
    use ferry_replica::scan::block_sum;

    fn capture(dir: &Path) -> Capture {
        let disk = dir.join("disk.img");
        let mut content = vec![0u8; 4 << 20];
        for (i, b) in content.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        std::fs::write(&disk, &content).unwrap();
        Capture::open("sda", &disk, &dir.join("journal"), 64 << 20, 0).unwrap()
    }

    #[test]
    fn an_ordered_stop_refuses_writes_after_its_last_flush() {
        let dir = tempfile::tempdir().unwrap();
        let c = capture(dir.path());
        c.write(0, &[1; 512], false).unwrap();
        c.close().unwrap();
        let next = c.state().next_seq;
        assert!(c.write(512, &[2; 512], false).is_err());
        assert!(c.zero(0, 4096, true).is_err());
        assert_eq!(
            c.state().next_seq,
            next,
            "nothing journaled after the close"
        );
    }

    #[test]
    fn an_overflow_is_owed_durably_until_its_regions_are_journaled_again() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![5u8; 4 << 20]).unwrap();
        let journal = dir.path().join("journal");
        let c = Capture::open("sda", &disk, &journal, 4 << 20, 0).unwrap();
        let mut n = 0;
        while !c.state().overflowed {
            c.write((n % 64) * (64 << 10), &[n as u8; 64 << 10], false)
                .unwrap();
            n += 1;
            assert!(n < 1000, "the journal never overflowed");
        }
        assert!(c.owes_compare());
        assert!(
            last_stop::owes_compare(&journal),
            "durably: a restart compares"
        );
        // The process server acknowledges everything; the dirty regions are journaled
        // again from the disk, and then nothing is owed.
        let mut buf = Vec::new();
        loop {
            let end = c.state().journal.end_position();
            c.trim(end);
            if !c.resync_one(&mut buf).unwrap() {
                break;
            }
        }
        assert!(!c.state().overflowed);
        assert!(!c.owes_compare());
        assert!(!last_stop::owes_compare(&journal));
        // A whole comparison owed outlives an overflow's end.
        c.owe_compare().unwrap();
        assert!(last_stop::owes_compare(&journal));
        c.compared().unwrap();
        assert!(!last_stop::owes_compare(&journal));
    }

    /// A map saying the replica is all zero: every block differs.
    fn zero_map() -> BlockSums {
        BlockSums {
            block_bytes: 64 << 10,
            disk_bytes: 4 << 20,
            sums: vec![ZERO_SUM; 64],
        }
    }

    #[test]
    fn a_comparison_journals_only_differing_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let c = capture(dir.path());
        let mut buf = Vec::new();
        // The replica matches block 1 and no other of the first MiB.
        let mut map = zero_map();
        let mut block = vec![0u8; 64 << 10];
        c.read(64 << 10, &mut block).unwrap();
        map.sums[1] = block_sum(&block);
        let sent = c.compare_range(&map, 0, 1 << 20, &mut buf).unwrap();
        assert_eq!(sent, 15 * (64 << 10));
        assert_eq!(c.state().next_seq, 2, "two runs around the equal block");
    }

    #[test]
    fn losing_the_journal_mid_resync_starts_the_resync_over() {
        let dir = tempfile::tempdir().unwrap();
        let c = capture(dir.path());
        let mut buf = Vec::new();
        assert!(c.resync.want("test"));
        assert!(c.resync.take_wanted());
        c.resync.got_map(zero_map(), 4 << 20);
        let (map, at, len) = c.resync.next_range(1 << 20).unwrap();
        let sent = c.compare_range(&map, at, len, &mut buf).unwrap();
        c.resync.advance(len, sent);
        assert!(c.journal_bytes() > 0);
        // The process server lost what it had: the journal goes, and the first MiB
        // (journaled only there) must be compared again.
        c.restart_at(0);
        assert_eq!(c.journal_bytes(), 0);
        assert_eq!(c.state().next_seq, 0);
        assert_eq!(c.resync.phase(), Phase::Wanted);
        assert_eq!(c.resync.figures().1.compared, 0);
        // Likewise when the numbering was lost.
        assert!(c.resync.take_wanted());
        c.resync.got_map(zero_map(), 4 << 20);
        let (map, at, len) = c.resync.next_range(1 << 20).unwrap();
        c.compare_range(&map, at, len, &mut buf).unwrap();
        c.resync.advance(len, 0);
        c.renumber(100);
        assert_eq!(c.state().next_seq, 100);
        assert_eq!(c.resync.phase(), Phase::Wanted);
        assert_eq!(c.resync.figures().1.compared, 0);
    }
}
