//! An append-only cache log in numbered files (`{n:016}.log`), each record checksummed:
//!
//! ```text
//! record = magic u16 0xFC01 | payload length u32 | crc32c u32 of (disk, payload)
//!          | disk name length u8 | disk name ("machine/disk") | payload (one protocol frame)
//! ```
//! Appends go to the newest file and become durable with `sync` (one fdatasync for a
//! whole group of appends: group commit). Recovery reads every file in order; a record
//! that is incomplete or fails its checksum at the end of the newest file is a write
//! torn by a crash, which was never acknowledged: the file is cut there. Anywhere else
//! it is corruption and recovery stops with an error naming the file and offset rather
//! than silently dropping acknowledged writes. Files whose records are all uploaded are
//! deleted. The total size is bounded: an append that would pass the bound is refused,
//! which the server turns into withheld credit (backpressure), never into lost data.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: u16 = 0xFC01;
const HEADER_BYTES: usize = 2 + 4 + 4 + 1;
/// Largest payload a record may hold (a protocol frame with its header).
pub const RECORD_PAYLOAD_MAX: usize = (4 << 20) + 4096;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cache file {path} is corrupt at byte {offset}: {reason}")]
    Corrupt {
        path: String,
        offset: u64,
        reason: &'static str,
    },
    #[error("cache full: {used} of {max} bytes in use")]
    Full { used: u64, max: u64 },
    #[error("a record for {disk} of {bytes} bytes exceeds the record limit")]
    TooLarge { disk: String, bytes: usize },
}

pub(crate) fn io_err(op: &'static str, path: &Path, source: io::Error) -> CacheError {
    CacheError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// Where a record lives: file number and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub file: u64,
    pub offset: u64,
}

/// One record read back at recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub at: Position,
    pub disk: String,
    pub payload: Vec<u8>,
}

/// What recovery found.
#[derive(Debug)]
pub struct Recovered {
    pub entries: Vec<Entry>,
    /// Bytes cut from the end of the newest file (a torn, never-acknowledged append).
    pub torn_bytes: u64,
}

/// The files (and directory) one group commit must sync, in a form that can run on
/// another thread.
#[derive(Debug, Default)]
pub struct SyncJob {
    files: Vec<File>,
    dir: Option<File>,
}

impl SyncJob {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dir.is_none()
    }

    /// fdatasync of every file, fsync of the directory.
    pub fn run(&self) -> io::Result<()> {
        for f in &self.files {
            f.sync_data()?;
        }
        if let Some(d) = &self.dir {
            d.sync_all()?;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct CacheLog {
    dir: PathBuf,
    /// Files in order, with their sizes.
    files: Vec<(u64, u64)>,
    current: File,
    file_bytes_max: u64,
    total_bytes_max: u64,
    /// Appended since the last sync.
    dirty: bool,
    /// Files rolled over since the last sync, still to be synced with the next one.
    rolled: Vec<File>,
    /// A file was created since the last sync: the directory needs syncing too.
    dir_unsynced: bool,
    /// After a failed sync nothing may be acknowledged from this log again.
    poisoned: bool,
}

/// Writes `a` then `b` with as few system calls as the kernel allows.
fn write_both(f: &mut File, a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut skip = 0usize;
    let total = a.len() + b.len();
    while skip < total {
        let bufs: [io::IoSlice<'_>; 2] = if skip < a.len() {
            [io::IoSlice::new(&a[skip..]), io::IoSlice::new(b)]
        } else {
            [
                io::IoSlice::new(&b[skip - a.len()..]),
                io::IoSlice::new(&[]),
            ]
        };
        match f.write_vectored(&bufs) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote nothing")),
            Ok(n) => skip += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(crate) fn file_name(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016}.log"))
}

fn checksum(disk: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(disk), payload)
}

/// One record where it lies in a buffer: its offset, its disk name and payload ranges.
pub(crate) struct Span {
    pub offset: usize,
    pub disk: std::ops::Range<usize>,
    pub payload: std::ops::Range<usize>,
}

/// One record read back, borrowing the buffer it was read into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub at: Position,
    pub disk: &'a str,
    pub payload: &'a [u8],
}

impl RecordRef<'_> {
    pub fn to_entry(&self) -> Entry {
        Entry {
            at: self.at,
            disk: self.disk.to_string(),
            payload: self.payload.to_vec(),
        }
    }
}

/// Parses the records at the start of `buf`, calling `f` for each, without copying
/// them; returns the length of the valid prefix and, if it ends early, why.
pub(crate) fn parse_spans(buf: &[u8], mut f: impl FnMut(Span)) -> (usize, Option<&'static str>) {
    let mut at = 0usize;
    loop {
        let rest = &buf[at..];
        if rest.is_empty() {
            return (at, None);
        }
        if rest.len() < HEADER_BYTES {
            return (at, Some("incomplete record header"));
        }
        if u16::from_le_bytes([rest[0], rest[1]]) != MAGIC {
            return (at, Some("bad record magic"));
        }
        let len = u32::from_le_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
        let crc = u32::from_le_bytes([rest[6], rest[7], rest[8], rest[9]]);
        let disk_len = rest[10] as usize;
        if len > RECORD_PAYLOAD_MAX {
            return (at, Some("record length beyond the limit"));
        }
        let total = HEADER_BYTES + disk_len + len;
        if rest.len() < total {
            return (at, Some("incomplete record"));
        }
        let disk = &rest[HEADER_BYTES..HEADER_BYTES + disk_len];
        let payload = &rest[HEADER_BYTES + disk_len..total];
        if checksum(disk, payload) != crc {
            return (at, Some("checksum mismatch"));
        }
        if std::str::from_utf8(disk).is_err() {
            return (at, Some("disk name is not UTF-8"));
        }
        f(Span {
            offset: at,
            disk: at + HEADER_BYTES..at + HEADER_BYTES + disk_len,
            payload: at + HEADER_BYTES + disk_len..at + total,
        });
        at += total;
    }
}

/// The record a span of `buf` (read from `file` at `base`) holds.
pub(crate) fn record_at<'a>(buf: &'a [u8], file: u64, base: u64, s: &Span) -> RecordRef<'a> {
    RecordRef {
        at: Position {
            file,
            offset: base + s.offset as u64,
        },
        // Checked by `parse_spans`.
        disk: std::str::from_utf8(&buf[s.disk.clone()]).unwrap_or_default(),
        payload: &buf[s.payload.clone()],
    }
}

impl CacheLog {
    /// Opens the cache in `dir`, reading back every record into memory (small logs and
    /// tests; a server's cache uses `open_each`).
    pub fn open(
        dir: &Path,
        file_bytes_max: u64,
        total_bytes_max: u64,
    ) -> Result<(CacheLog, Recovered), CacheError> {
        let mut entries = Vec::new();
        let (log, torn_bytes) = Self::open_each(dir, file_bytes_max, total_bytes_max, |r| {
            entries.push(r.to_entry())
        })?;
        Ok((
            log,
            Recovered {
                entries,
                torn_bytes,
            },
        ))
    }

    /// Opens the cache in `dir`, showing every record to `visit` in order, one file in
    /// memory at a time; returns the log and the bytes cut from a torn tail.
    pub fn open_each(
        dir: &Path,
        file_bytes_max: u64,
        total_bytes_max: u64,
        mut visit: impl FnMut(RecordRef<'_>),
    ) -> Result<(CacheLog, u64), CacheError> {
        fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        let mut numbers: Vec<u64> = fs::read_dir(dir)
            .map_err(|e| io_err("list", dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
            .collect();
        numbers.sort_unstable();
        let mut files = Vec::new();
        let mut torn_bytes = 0;
        let mut buf = Vec::new();
        for (i, &n) in numbers.iter().enumerate() {
            let path = file_name(dir, n);
            buf.clear();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .map_err(|e| io_err("read", &path, e))?;
            let mut spans = Vec::new();
            let (valid, problem) = parse_spans(&buf, |s| spans.push(s));
            if let Some(reason) = problem {
                if i + 1 != numbers.len() {
                    return Err(CacheError::Corrupt {
                        path: path.display().to_string(),
                        offset: valid as u64,
                        reason,
                    });
                }
                // The tail of the newest file: an append a crash cut short.
                torn_bytes = (buf.len() - valid) as u64;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_err("open", &path, e))?;
                f.set_len(valid as u64)
                    .map_err(|e| io_err("truncate", &path, e))?;
                f.sync_all().map_err(|e| io_err("sync", &path, e))?;
                tracing::warn!(file = %path.display(), torn_bytes, reason, "cut a torn record from the cache");
            }
            // A killed process leaves its unsynced appends in the page cache, where
            // they read back fine: sync them before calling them durable, or a power
            // cut after this restart could lose writes acknowledged from here on.
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err("sync", &path, e))?;
            for s in &spans {
                visit(record_at(&buf, n, 0, s));
            }
            files.push((n, valid as u64));
        }
        let next = files.last().map_or(0, |(n, _)| n + 1);
        let (current, files) = Self::new_file(dir, next, files, true)?;
        let log = CacheLog {
            dir: dir.to_path_buf(),
            files,
            current,
            file_bytes_max,
            total_bytes_max,
            dirty: false,
            rolled: Vec::new(),
            dir_unsynced: false,
            poisoned: false,
        };
        Ok((log, torn_bytes))
    }

    /// Creates file `n`. Its name is durable only once the directory is synced: at
    /// start-up here, on the append path with the next group commit.
    fn new_file(
        dir: &Path,
        n: u64,
        mut files: Vec<(u64, u64)>,
        sync_dir: bool,
    ) -> Result<(File, Vec<(u64, u64)>), CacheError> {
        let path = file_name(dir, n);
        let f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err("create", &path, e))?;
        if sync_dir {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err("sync", dir, e))?;
        }
        files.push((n, 0));
        Ok((f, files))
    }

    /// Bytes held in all files.
    pub fn used_bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b).sum()
    }

    pub fn max_bytes(&self) -> u64 {
        self.total_bytes_max
    }

    /// Appends one record; durable only after the next `sync`.
    pub fn append(&mut self, disk: &str, payload: &[u8]) -> Result<Position, CacheError> {
        if disk.len() > u8::MAX as usize || payload.len() > RECORD_PAYLOAD_MAX {
            return Err(CacheError::TooLarge {
                disk: disk.into(),
                bytes: payload.len(),
            });
        }
        let size = (HEADER_BYTES + disk.len() + payload.len()) as u64;
        if self.used_bytes() + size > self.total_bytes_max {
            return Err(CacheError::Full {
                used: self.used_bytes(),
                max: self.total_bytes_max,
            });
        }
        if self
            .files
            .last()
            .is_some_and(|(_, b)| *b > 0 && b + size > self.file_bytes_max)
        {
            // The full file is synced with the next group, not here: a sync on the
            // append path would stall every connection of the shard.
            let n = self.files.last().map_or(0, |(n, _)| n + 1);
            let (f, files) = Self::new_file(&self.dir, n, std::mem::take(&mut self.files), false)?;
            self.rolled.push(std::mem::replace(&mut self.current, f));
            self.dir_unsynced = true;
            self.files = files;
        }
        let (n, offset) = *self.files.last().expect("a current file always exists");
        // Header and name in one small buffer, the payload written from where it lies:
        // no copy of the frame in user space.
        let mut head = Vec::with_capacity(HEADER_BYTES + disk.len());
        head.extend_from_slice(&MAGIC.to_le_bytes());
        head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        head.extend_from_slice(&checksum(disk.as_bytes(), payload).to_le_bytes());
        head.push(disk.len() as u8);
        head.extend_from_slice(disk.as_bytes());
        let path = file_name(&self.dir, n);
        write_both(&mut self.current, &head, payload).map_err(|e| io_err("append", &path, e))?;
        if let Some(last) = self.files.last_mut() {
            last.1 += size;
        }
        self.dirty = true;
        Ok(Position { file: n, offset })
    }

    /// Makes every append so far durable: one fdatasync for the whole group. After a
    /// failed sync the log refuses to sync again (the kernel may have dropped the dirty
    /// pages and cleared the error; acknowledging after that could lose writes).
    pub fn sync(&mut self) -> Result<(), CacheError> {
        let job = self.take_sync()?;
        if let Err(e) = job.run() {
            self.sync_failed();
            let path = file_name(&self.dir, self.files.last().map_or(0, |f| f.0));
            return Err(io_err("sync", &path, e));
        }
        Ok(())
    }

    /// Where the oldest record still held starts.
    pub fn first_position(&self) -> Position {
        Position {
            file: self.files.first().map_or(0, |f| f.0),
            offset: 0,
        }
    }

    /// Just past the newest record.
    pub fn end_position(&self) -> Position {
        let (file, offset) = *self.files.last().expect("a current file always exists");
        Position { file, offset }
    }

    /// For a sync run off the event loop: handles on the files with appends to make
    /// durable (any rolled over since the last sync, and the current one), in order.
    /// Call `sync_failed` if syncing any fails.
    pub fn take_sync(&mut self) -> Result<SyncJob, CacheError> {
        let path = file_name(&self.dir, self.files.last().map_or(0, |f| f.0));
        if self.poisoned {
            return Err(io_err(
                "sync",
                &path,
                io::Error::other("an earlier sync failed; the cache must be reopened"),
            ));
        }
        if !self.dirty {
            return Ok(SyncJob::default());
        }
        let current = self
            .current
            .try_clone()
            .map_err(|e| io_err("sync", &path, e))?;
        let mut files = std::mem::take(&mut self.rolled);
        files.push(current);
        let dir = if std::mem::take(&mut self.dir_unsynced) {
            Some(File::open(&self.dir).map_err(|e| io_err("open", &self.dir, e))?)
        } else {
            None
        };
        self.dirty = false;
        Ok(SyncJob { files, dir })
    }

    /// A sync handed out by `take_sync` failed: nothing may be acknowledged again.
    pub fn sync_failed(&mut self) {
        self.poisoned = true;
    }

    /// Deletes every file wholly before `upto` (all of whose records are uploaded).
    pub fn release_before(&mut self, upto: Position) -> Result<u64, CacheError> {
        let mut freed = 0;
        while self.files.len() > 1 && self.files[0].0 < upto.file {
            let (n, bytes) = self.files.remove(0);
            let path = file_name(&self.dir, n);
            fs::remove_file(&path).map_err(|e| io_err("delete", &path, e))?;
            freed += bytes;
        }
        // Everything released, the current file included: start a fresh one, so a
        // drained log holds nothing (a small log would otherwise stay full of its
        // last, already released file).
        let end = self.end_position();
        if upto >= end && end.offset > 0 {
            let (f, files) = Self::new_file(
                &self.dir,
                end.file + 1,
                std::mem::take(&mut self.files),
                false,
            )?;
            self.files = files;
            self.dir_unsynced = true;
            self.dirty = true;
            drop(std::mem::replace(&mut self.current, f));
            let (n, bytes) = self.files.remove(0);
            let path = file_name(&self.dir, n);
            fs::remove_file(&path).map_err(|e| io_err("delete", &path, e))?;
            freed += bytes;
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: usize) -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| {
                (
                    format!("m/d{}", i % 3),
                    (0..(i * 37 % 500 + 1)).map(|b| (b + i) as u8).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn appends_survive_reopen_and_files_roll_and_release() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, rec) = CacheLog::open(dir.path(), 4096, 1 << 20).unwrap();
        assert!(rec.entries.is_empty());
        let data = frames(100);
        let mut positions = Vec::new();
        for (d, p) in &data {
            positions.push(log.append(d, p).unwrap());
        }
        log.sync().unwrap();
        assert!(log.files.len() > 3, "rolled into several files");
        drop(log);
        let (mut log, rec) = CacheLog::open(dir.path(), 4096, 1 << 20).unwrap();
        assert_eq!(rec.torn_bytes, 0);
        let got: Vec<(String, Vec<u8>)> = rec
            .entries
            .iter()
            .map(|e| (e.disk.clone(), e.payload.clone()))
            .collect();
        assert_eq!(got, data);
        let before = log.used_bytes();
        let freed = log.release_before(positions[60]).unwrap();
        assert!(freed > 0 && log.used_bytes() == before - freed);
        drop(log);
        let (_, rec) = CacheLog::open(dir.path(), 4096, 1 << 20).unwrap();
        assert!(rec.entries.first().unwrap().at.file <= positions[60].file);
        assert_eq!(rec.entries.last().unwrap().payload, data[99].1);
    }

    #[test]
    fn a_torn_tail_is_cut_and_corruption_elsewhere_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = CacheLog::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let data = frames(20);
        for (d, p) in &data {
            log.append(d, p).unwrap();
        }
        log.sync().unwrap();
        drop(log);
        let newest = |dir: &Path| {
            let mut v: Vec<PathBuf> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            v.sort();
            v
        };
        // A crash in the middle of the last append: cut its bytes short.
        let files = newest(dir.path());
        let full = files
            .iter()
            .rev()
            .find(|f| fs::metadata(f).unwrap().len() > 0)
            .unwrap();
        assert_eq!(
            full,
            files.last().unwrap(),
            "appends went to the newest file"
        );
        let len = fs::metadata(full).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(full)
            .unwrap()
            .set_len(len - 7)
            .unwrap();
        let (log, rec) = CacheLog::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        drop(log);
        assert_eq!(rec.entries.len(), 19);
        assert!(rec.torn_bytes > 0);
        // A flipped byte in an older file is corruption, named with its offset.
        let files = newest(dir.path());
        let mut bytes = fs::read(&files[0]).unwrap();
        bytes[40] ^= 1;
        fs::write(&files[0], bytes).unwrap();
        let e = CacheLog::open(dir.path(), 1 << 20, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("is corrupt at byte"), "{e}");
    }

    #[test]
    fn the_bound_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = CacheLog::open(dir.path(), 1 << 20, 1000).unwrap();
        log.append("m/d", &[1u8; 600]).unwrap();
        assert!(matches!(
            log.append("m/d", &[1u8; 600]),
            Err(CacheError::Full { .. })
        ));
        assert!(matches!(
            log.append("m/d", &vec![0u8; RECORD_PAYLOAD_MAX + 1]),
            Err(CacheError::TooLarge { .. })
        ));
    }
}
