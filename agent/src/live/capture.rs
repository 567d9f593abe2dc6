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
use std::sync::{Condvar, Mutex};

use ferry_dataplane::cache::{CacheLog, Position};
use ferry_dataplane::protocol::{encode, Bookmark, Decoded, Frame, PointKindWire};

use crate::nbd::{Device, FileDevice};

pub struct Capture {
    pub disk: String,
    dev: FileDevice,
    state: Mutex<State>,
    /// Signalled whenever the journal grows.
    pub grew: Condvar,
}

pub struct State {
    /// The newest write the journal held when opened: after a kill it may be
    /// journaled but not applied to the disk (see `reconcile`).
    pub last_write: Option<(u64, u64)>,
    pub next_seq: u64,
    pub journal: CacheLog,
    /// The newest point: (id, sequence).
    pub last_point: Option<(String, u64)>,
    buf: Vec<u8>,
    /// The sequence number of the first frame in the journal as opened: the oldest
    /// it held, or (empty) the next to be assigned.
    pub first_seq: u64,
}

fn journal_err(e: ferry_dataplane::cache::CacheError) -> io::Error {
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
        let (journal, rec) = CacheLog::open(
            journal_dir,
            (journal_bytes / 8).clamp(1 << 20, 64 << 20),
            journal_bytes,
        )
        .map_err(journal_err)?;
        let mut next_seq = seq_floor;
        let mut first_seq = None;
        let mut last_write = None;
        for e in &rec.entries {
            if let Ok(Decoded::Frame(f, _)) =
                ferry_dataplane::protocol::decode(&e.payload, u32::MAX)
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
        }
        Ok(Capture {
            disk: disk.to_string(),
            dev,
            state: Mutex::new(State {
                next_seq,
                journal,
                last_point: None,
                buf: Vec::new(),
                first_seq: first_seq.unwrap_or(next_seq),
                last_write,
            }),
            grew: Condvar::new(),
        })
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("capture lock")
    }

    /// Journals one frame built by `make` from the next sequence number.
    fn journal(&self, st: &mut State, make: impl FnOnce(u64, &mut Vec<u8>)) -> io::Result<u64> {
        let seq = st.next_seq;
        let mut buf = std::mem::take(&mut st.buf);
        buf.clear();
        make(seq, &mut buf);
        let r = st.journal.append(&self.disk, &buf);
        st.buf = buf;
        r.map_err(journal_err)?;
        st.next_seq += 1;
        self.grew.notify_all();
        Ok(seq)
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
        let time_ms = chrono::Utc::now().timestamp_millis();
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
        let seq = self.journal(&mut st, |seq, buf| {
            encode(
                &Frame::Bookmark(Bookmark {
                    seq,
                    kind,
                    time_ms,
                    id: &id,
                    group,
                    label,
                }),
                buf,
            )
        })?;
        st.last_point = Some((id.clone(), seq));
        Ok(id)
    }

    /// Copies `len` bytes at `offset` from the disk into the journal as one write
    /// (skipped when all zero: a fresh replica reads zero there already).
    pub fn copy_region(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<bool> {
        let mut st = self.state();
        buf.resize(len, 0);
        self.dev.read(offset, buf)?;
        if ferry_replica::scan::is_zero(buf) {
            return Ok(false);
        }
        self.journal(&mut st, |seq, out| {
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
        let mut buf = vec![0u8; len as usize];
        self.dev.read(offset, &mut buf)?;
        if ferry_replica::scan::is_zero(&buf) {
            self.journal(&mut st, |seq, out| {
                encode(&Frame::Zero { seq, offset, len }, out)
            })?;
        } else {
            self.journal(&mut st, |seq, out| {
                encode(
                    &Frame::Write {
                        seq,
                        offset,
                        data: &buf,
                    },
                    out,
                )
            })?;
        }
        Ok(len)
    }

    /// Bytes held in the journal.
    pub fn journal_bytes(&self) -> u64 {
        self.state().journal.used_bytes()
    }

    /// Drops journal files wholly before `upto` (acknowledged durable upstream).
    pub fn trim(&self, upto: Position) {
        if let Err(e) = self.state().journal.release_before(upto) {
            tracing::warn!(disk = %self.disk, error = %e, "could not trim the journal");
        }
    }
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
        // Journal first: a full journal fails the write before the disk changes, so
        // the disk and its replica never disagree about a write the application saw fail.
        self.journal(&mut st, |seq, buf| {
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
        self.journal(&mut st, |seq, buf| {
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
