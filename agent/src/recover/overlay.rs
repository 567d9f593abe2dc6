//! The overlay: every write made to a served point, kept locally and never sent to the
//! replica. Data goes into a sparse file addressed like the disk; each write's range
//! is appended to a journal, in the order the writes were applied, so the writes made
//! after failover are known exactly (failback sends only them) and survive a restart.
//!
//! Journal record (32 bytes): offset u64 LE | len u64 LE | kind u8 (1 data, 2 zero) |
//! 7 zero bytes | xxh3 of the first 24 bytes, u64 LE. A record torn by a crash fails
//! its check and ends the journal there; NBD promises nothing about writes that were
//! not flushed, and a flush syncs the data before the journal, so every range the
//! journal holds after a flush has its data on disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::ranges::{RangeMap, Src};
use super::{io_err, Result};

const RECORD: usize = 32;
/// Bytes of one journal record: a journal position (failback's cursor) is a multiple.
pub const JOURNAL_RECORD_BYTES: u64 = RECORD as u64;
/// Journal bytes read at once when the journal is walked from a position.
const JOURNAL_READ: usize = 2048 * RECORD;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;

fn record(offset: u64, len: u64, kind: u8) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0..8].copy_from_slice(&offset.to_le_bytes());
    r[8..16].copy_from_slice(&len.to_le_bytes());
    r[16] = kind;
    let check = xxhash_rust::xxh3::xxh3_64(&r[..24]);
    r[24..32].copy_from_slice(&check.to_le_bytes());
    r
}

/// A journal record, if it is whole and one this code wrote.
fn parse(r: &[u8]) -> Option<(u64, u64, u8)> {
    let u = |at: usize| u64::from_le_bytes(r[at..at + 8].try_into().unwrap_or_default());
    let (offset, len, kind) = (u(0), u(8), r[16]);
    let whole = xxhash_rust::xxh3::xxh3_64(&r[..24]) == u(24);
    let known = kind == KIND_DATA || kind == KIND_ZERO;
    (whole && known && r[17..24].iter().all(|b| *b == 0) && offset.checked_add(len).is_some())
        .then_some((offset, len, kind))
}

struct Journal {
    file: File,
    written: RangeMap,
}

pub struct Overlay {
    data: File,
    data_path: PathBuf,
    journal_path: PathBuf,
    /// One lock for data and journal: writes are applied and journaled in one order.
    journal: Mutex<Journal>,
}

impl Overlay {
    /// Opens (or creates) the overlay of one disk in `dir`, replaying its journal.
    pub fn open(dir: &Path, disk: &str, size: u64) -> Result<Overlay> {
        let data_path = dir.join(format!("{disk}.overlay"));
        let journal_path = dir.join(format!("{disk}.journal"));
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io_err("open", &data_path))?;
        data.set_len(size).map_err(io_err("size", &data_path))?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&journal_path)
            .map_err(io_err("open", &journal_path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_err("read", &journal_path))?;
        let mut written = RangeMap::default();
        let mut good = 0usize;
        for r in bytes.chunks_exact(RECORD) {
            let Some((offset, len, _kind)) = parse(r) else {
                break;
            };
            // Data and zero ranges both read from the overlay file: a zeroed range
            // is a hole there.
            written.insert(
                offset,
                offset.saturating_add(len).min(size),
                Src::At(offset),
            );
            good += RECORD;
        }
        if good < bytes.len() {
            tracing::warn!(journal = %journal_path.display(), kept = good / RECORD,
                dropped_bytes = bytes.len() - good, "overlay journal ends in a torn record; cut there");
            file.set_len(good as u64)
                .and_then(|_| file.sync_data())
                .map_err(io_err("truncate", &journal_path))?;
        }
        Ok(Overlay {
            data,
            data_path,
            journal_path,
            journal: Mutex::new(Journal { file, written }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn journaled(&self, j: &mut Journal, offset: u64, len: u64, kind: u8) -> io::Result<()> {
        j.file.write_all(&record(offset, len, kind)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("append to {}: {e}", self.journal_path.display()),
            )
        })?;
        j.written.insert(offset, offset + len, Src::At(offset));
        Ok(())
    }

    fn sync(&self, j: &Journal) -> io::Result<()> {
        self.data.sync_data().map_err(|e| {
            io::Error::new(e.kind(), format!("sync {}: {e}", self.data_path.display()))
        })?;
        j.file.sync_data().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("sync {}: {e}", self.journal_path.display()),
            )
        })
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let mut j = self.lock();
        self.data.write_all_at(data, offset).map_err(|e| {
            io::Error::new(e.kind(), format!("write {}: {e}", self.data_path.display()))
        })?;
        self.journaled(&mut j, offset, data.len() as u64, KIND_DATA)?;
        if fua {
            self.sync(&j)?;
        }
        Ok(())
    }

    pub fn zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let mut j = self.lock();
        ferry_replica::rebuild::zero_range(&self.data, offset, len).map_err(|e| {
            io::Error::new(e.kind(), format!("zero {}: {e}", self.data_path.display()))
        })?;
        self.journaled(&mut j, offset, len, KIND_ZERO)?;
        if fua {
            self.sync(&j)?;
        }
        Ok(())
    }

    pub fn flush(&self) -> io::Result<()> {
        let j = self.lock();
        self.sync(&j)
    }

    /// Copies what the overlay holds of `[offset, offset + buf.len())` over `buf`.
    pub fn read_over(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let j = self.lock();
        for (s, e, _) in j.written.overlapping(offset, offset + buf.len() as u64) {
            let at = (s - offset) as usize;
            let n = (e - s) as usize;
            self.data
                .read_exact_at(&mut buf[at..at + n], s)
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("read {}: {e}", self.data_path.display()))
                })?;
        }
        Ok(())
    }

    /// Whether any write since the point was first served touches `[start, end)`.
    pub fn touches(&self, start: u64, end: u64) -> bool {
        !self.lock().written.overlapping(start, end).is_empty()
    }

    /// The byte ranges written since the point was first served, merged where they
    /// touch: exactly what failback must send.
    pub fn written(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, e) in self.lock().written.ranges() {
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        out
    }

    pub fn written_bytes(&self) -> u64 {
        self.lock().written.bytes()
    }

    /// Syncs the overlay and returns the journal's length in bytes: every record
    /// below it is durable, so a position saved at it (failback's cursor) can never
    /// lie past the journal that a restart replays.
    pub fn synced_journal_bytes(&self) -> io::Result<u64> {
        let j = self.lock();
        self.sync(&j)?;
        j.file.metadata().map(|m| m.len()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("stat {}: {e}", self.journal_path.display()),
            )
        })
    }

    /// Hands the journal records in bytes `[from, to)` (record boundaries, below
    /// `synced_journal_bytes`) to `f` as (offset, length, whether a zero write), in
    /// the order the writes were applied; reads a bounded piece at a time, taking
    /// the lock only for each read (records below the end are never rewritten).
    pub fn journal_records(
        &self,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, u64, bool),
    ) -> Result<()> {
        let bad = |why: String| super::Error::Overlay {
            path: self.journal_path.display().to_string(),
            why,
        };
        if !from.is_multiple_of(JOURNAL_RECORD_BYTES)
            || !to.is_multiple_of(JOURNAL_RECORD_BYTES)
            || from > to
        {
            return Err(bad(format!("bytes {from}..{to} are not whole records")));
        }
        let mut buf = vec![0u8; JOURNAL_READ];
        let mut at = from;
        while at < to {
            let n = (to - at).min(JOURNAL_READ as u64) as usize;
            self.lock()
                .file
                .read_exact_at(&mut buf[..n], at)
                .map_err(io_err("read", &self.journal_path))?;
            for (i, r) in buf[..n].chunks_exact(RECORD).enumerate() {
                let (offset, len, kind) = parse(r).ok_or_else(|| {
                    bad(format!(
                        "record at byte {} is torn or foreign, below the synced end {to}",
                        at + (i * RECORD) as u64
                    ))
                })?;
                f(offset, len, kind == KIND_ZERO);
            }
            at += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replay_after_reopen_and_a_torn_record_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let o = Overlay::open(dir.path(), "d", 1 << 20).unwrap();
            o.write(4096, &[7u8; 100], false).unwrap();
            o.zero(4100, 10, false).unwrap();
            o.write(8000, &[9u8; 10], true).unwrap();
            o.flush().unwrap();
        }
        // A crash in the middle of appending a record.
        let jp = dir.path().join("d.journal");
        let mut f = OpenOptions::new().append(true).open(&jp).unwrap();
        f.write_all(&record(0, 5, KIND_DATA)[..20]).unwrap();
        drop(f);
        let o = Overlay::open(dir.path(), "d", 1 << 20).unwrap();
        assert_eq!(o.written(), vec![(4096, 4196), (8000, 8010)]);
        assert_eq!(std::fs::metadata(&jp).unwrap().len(), 3 * RECORD as u64);
        let mut buf = vec![1u8; 200];
        o.read_over(4050, &mut buf).unwrap();
        let mut want = vec![1u8; 200];
        want[46..146].fill(7);
        want[50..60].fill(0);
        assert_eq!(buf, want);
        // The journal walked from its second record: what came after, kinds kept.
        let end = o.synced_journal_bytes().unwrap();
        assert_eq!(end, 3 * JOURNAL_RECORD_BYTES);
        let mut seen = Vec::new();
        o.journal_records(JOURNAL_RECORD_BYTES, end, |s, n, z| seen.push((s, n, z)))
            .unwrap();
        assert_eq!(seen, vec![(4100, 10, true), (8000, 10, false)]);
        assert!(o.journal_records(5, end, |_, _, _| {}).is_err());
    }
}
