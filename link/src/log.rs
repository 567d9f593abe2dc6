//! The ordered durable log both ends keep: the agent's journal (writes not yet made
//! durable by its process server) and the process server's cache (what agents sent,
//! kept on local disk until it is committed in blob storage; an agent's write is
//! acknowledged only once it is there and synced, and on restart what was not yet
//! uploaded is uploaded).
//!
//! An ordered durable log, append-only in numbered files (`{n:016}.log`), each record checksummed
//! together with the number of the file it belongs to:
//!
//! ```text
//! record = magic u16 0xFC02 | payload length u32 | crc32c u32 of (file number u64 LE,
//!          disk, payload) | disk name length u8 | disk name ("machine/disk")
//!          | payload (one protocol frame)
//! ```
//! Appends go to the newest file and become durable with `sync` (one fdatasync for a
//! whole group of appends: group commit). Recovery reads every file in order; a record
//! that is incomplete or fails its checksum at the end of the newest file is a write
//! torn by a crash (never acknowledged) or a recycled file's old contents: the file is
//! cut there. Anywhere else it is corruption and recovery stops with an error naming
//! the file and offset rather than silently dropping acknowledged writes.
//!
//! Files whose records are all uploaded are not deleted but kept as spares
//! (`{n:016}.spare`) and renamed into the next file number when the log rolls over.
//! Appending then overwrites blocks the file system has already allocated and written,
//! so a group commit's fdatasync flushes data only: no block allocation, no size change,
//! no journal commit, which on ext4 made one sync in a few hundred take 50 to 120 ms
//! (decision 0010). A spare's old records fail the checksum under its new number, so
//! they can never be read as new ones. A spare is reused only once its rename is
//! durable: a crash can never show a reused file under its old, live name. A rolled
//! file is cut to its records' end and fsynced, so every file but the newest ends
//! exactly at its last record. Without recycling (the agent's journal) a file is synced
//! before the next is created. `powercut.rs` tests all this against a model of what a
//! power cut may leave. The total size is bounded: an append that would pass the
//! bound is refused, which the server turns into withheld credit (backpressure), never
//! into lost data.

#[cfg(test)]
mod powercut;
mod tail;

pub use tail::{Batch, Tailer};

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[cfg(test)]
use self::powercut::Op;

/// Tells a test's model of the file system what was just done to it, so the test can
/// work out every state a power cut could leave (`powercut.rs`). Nothing in a build
/// that is not a test.
macro_rules! note {
    ($op:expr) => {
        #[cfg(test)]
        self::powercut::note($op);
    };
}

const MAGIC: u16 = 0xFC02;
const HEADER_BYTES: usize = 2 + 4 + 4 + 1;
/// Largest payload a record may hold (a protocol frame with its header).
pub const RECORD_PAYLOAD_MAX: usize = (4 << 20) + 4096;

/// What went wrong in a durable log. The wording is the log's own: the caller says
/// whose log it is (the agent's journal, the process server's cache).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("log file {path} is corrupt at byte {offset}: {reason}")]
    Corrupt {
        path: String,
        offset: u64,
        reason: &'static str,
    },
    #[error("log full: {used} of {max} bytes in use")]
    Full { used: u64, max: u64 },
    #[error("a record for {disk} of {bytes} bytes exceeds the record limit")]
    TooLarge { disk: String, bytes: usize },
}

pub(crate) fn io_err(op: &'static str, path: &Path, source: io::Error) -> LogError {
    LogError::Io {
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
    /// Files rolled over, with their records' end: cut there (a recycled file holds
    /// old bytes past it) and fsynced (the size is metadata).
    rolled: Vec<(File, u64)>,
    /// Files started since the last sync, from their spare name to their number's:
    /// only after the files before them are synced, so a crash can never show file
    /// n+1 beside a file n whose last appends were lost.
    renames: Vec<(PathBuf, PathBuf)>,
    /// The file appended to: fdatasync.
    current: Option<File>,
    dir: Option<File>,
}

impl SyncJob {
    pub fn is_empty(&self) -> bool {
        self.rolled.is_empty()
            && self.renames.is_empty()
            && self.current.is_none()
            && self.dir.is_none()
    }

    /// In order: cut and fsync the rolled files, rename the new ones, fdatasync the
    /// current one, fsync the directory.
    pub fn run(&self) -> io::Result<()> {
        for (f, len) in &self.rolled {
            f.set_len(*len)?;
            note!(Op::SetLen(f, *len));
            f.sync_all()?;
            note!(Op::Sync(f));
        }
        for (from, to) in &self.renames {
            fs::rename(from, to)?;
            note!(Op::Rename(from, to));
        }
        if let Some(f) = &self.current {
            f.sync_data()?;
            note!(Op::Sync(f));
        }
        if let Some(d) = &self.dir {
            d.sync_all()?;
            note!(Op::SyncDir);
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct DurableLog {
    dir: PathBuf,
    /// Files in order, with their sizes.
    files: Vec<(u64, u64)>,
    /// The file appended to (None only while opening).
    current: Option<File>,
    file_bytes_max: u64,
    total_bytes_max: u64,
    /// Appended since the last sync.
    dirty: bool,
    /// Files rolled over since the last sync, with their ends, still to be cut and
    /// synced with the next one.
    rolled: Vec<(File, u64)>,
    /// Files started since the last sync, still under their spare names.
    renames: Vec<(PathBuf, PathBuf)>,
    /// A file was created since the last sync: the directory needs syncing too.
    dir_unsynced: bool,
    /// After a failed sync nothing may be acknowledged from this log again.
    poisoned: bool,
    /// Released files kept for reuse, by their last number: those whose rename is
    /// durable (reusable), renamed since the last `take_sync`, and in the sync taken
    /// but not yet reported done.
    spares: Vec<u64>,
    spares_unsynced: Vec<u64>,
    spares_syncing: Vec<u64>,
    /// Keep released files as spares (else delete them).
    recycle: bool,
}

/// Writes `a` then `b` at `offset` with as few system calls as the kernel allows.
fn pwrite_both(f: &File, offset: u64, a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut skip = 0usize;
    let total = a.len() + b.len();
    while skip < total {
        let (first, second): (&[u8], &[u8]) = if skip < a.len() {
            (&a[skip..], b)
        } else {
            (&b[skip - a.len()..], &[])
        };
        let iov = [
            libc::iovec {
                iov_base: first.as_ptr() as *mut libc::c_void,
                iov_len: first.len(),
            },
            libc::iovec {
                iov_base: second.as_ptr() as *mut libc::c_void,
                iov_len: second.len(),
            },
        ];
        // SAFETY: both iovecs point into slices alive for the call; pwritev only
        // reads them.
        let n = unsafe {
            libc::pwritev(
                f.as_raw_fd(),
                iov.as_ptr(),
                2,
                (offset + skip as u64) as libc::off_t,
            )
        };
        match n {
            0 => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote nothing")),
            n if n > 0 => skip += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn file_name(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016}.log"))
}

fn spare_name(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016}.spare"))
}

/// A cache file's number from its name, and whether it is a spare. Only the names
/// `file_name` and `spare_name` write: `5.log` or `+5.log` would parse to the number
/// of `0000000000000005.log`, and recovery would read that file twice or not at all.
pub(crate) fn parse_name(name: &std::ffi::OsStr) -> Option<(u64, bool)> {
    let name = name.to_str()?;
    let (digits, spare) = match name.strip_suffix(".log") {
        Some(d) => (d, false),
        None => (name.strip_suffix(".spare")?, true),
    };
    let n: u64 = digits.parse().ok()?;
    (format!("{n:016}") == digits).then_some((n, spare))
}

/// Above any file number a log writes (it starts at 0 and skips at most 2^20 numbers
/// per restart), so that every `n + 1` stays in range; recovery refuses a file that
/// names one.
const NUMBER_MAX: u64 = 1 << 62;

/// The record's checksum, stamped with its file's number: a recycled file's old
/// records fail it.
fn checksum(file: u64, disk: &[u8], payload: &[u8]) -> u32 {
    let c = crc32c::crc32c(&file.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c_append(c, disk), payload)
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

/// Parses the records of file `file` at the start of `buf`, calling `f` for each,
/// without copying them; returns the length of the valid prefix and, if it ends
/// early, why.
pub(crate) fn parse_spans(
    buf: &[u8],
    file: u64,
    mut f: impl FnMut(Span),
) -> (usize, Option<&'static str>) {
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
        if checksum(file, disk, payload) != crc {
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

impl DurableLog {
    /// Opens the cache in `dir`, reading back every record into memory (small logs and
    /// tests; a server's cache uses `open_each`).
    pub fn open(
        dir: &Path,
        file_bytes_max: u64,
        total_bytes_max: u64,
        recycle: bool,
    ) -> Result<(DurableLog, Recovered), LogError> {
        let mut entries = Vec::new();
        let (log, torn_bytes) =
            Self::open_each(dir, file_bytes_max, total_bytes_max, recycle, |r| {
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
    /// memory at a time; returns the log and the bytes cut from the end of the newest
    /// file (a torn append, or a recycled file's old records). With `recycle`,
    /// released files are kept as spares and reused; without, they are deleted and
    /// every file is created under its own name (a reader may then follow appends
    /// before they are synced, as the agent's sender does).
    pub fn open_each(
        dir: &Path,
        file_bytes_max: u64,
        total_bytes_max: u64,
        recycle: bool,
        mut visit: impl FnMut(RecordRef<'_>),
    ) -> Result<(DurableLog, u64), LogError> {
        // It holds disk data in the clear: only its owner may enter it.
        ferry_replica::local::create_private_dir(dir).map_err(|e| io_err("create", dir, e))?;
        let mut numbers = Vec::new();
        let mut spares = Vec::new();
        for e in fs::read_dir(dir).map_err(|e| io_err("list", dir, e))? {
            let name = e.map_err(|e| io_err("list", dir, e))?.file_name();
            match parse_name(&name) {
                Some((n, _)) if n > NUMBER_MAX => {
                    return Err(LogError::Corrupt {
                        path: dir.join(name).display().to_string(),
                        offset: 0,
                        reason: "a file number beyond any this log writes",
                    })
                }
                Some((n, false)) => numbers.push(n),
                Some((n, true)) => spares.push(n),
                None => {}
            }
        }
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
            let (valid, problem) = parse_spans(&buf, n, |s| spans.push(s));
            if let Some(reason) = problem {
                if i + 1 != numbers.len() {
                    return Err(LogError::Corrupt {
                        path: path.display().to_string(),
                        offset: valid as u64,
                        reason,
                    });
                }
                // The end of the newest file: an append a crash cut short, or what a
                // recycled file held before.
                torn_bytes = (buf.len() - valid) as u64;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_err("open", &path, e))?;
                f.set_len(valid as u64)
                    .map_err(|e| io_err("truncate", &path, e))?;
                note!(Op::SetLen(&f, valid as u64));
                tracing::info!(file = %path.display(), bytes = torn_bytes, reason, "cut the cache's newest file after its last whole record");
            }
            // A killed process leaves its unsynced appends in the page cache, where
            // they read back fine: sync them before calling them durable, or a power
            // cut after this restart could lose writes acknowledged from here on.
            let f = File::open(&path).map_err(|e| io_err("open", &path, e))?;
            f.sync_all().map_err(|e| io_err("sync", &path, e))?;
            note!(Op::Sync(&f));
            for s in &spans {
                visit(record_at(&buf, n, 0, s));
            }
            files.push((n, valid as u64));
        }
        spares.sort_unstable();
        let mut log = DurableLog {
            dir: dir.to_path_buf(),
            current: None,
            files,
            file_bytes_max,
            total_bytes_max,
            dirty: false,
            rolled: Vec::new(),
            renames: Vec::new(),
            dir_unsynced: false,
            poisoned: false,
            spares,
            spares_unsynced: Vec::new(),
            spares_syncing: Vec::new(),
            recycle,
        };

        // Records are stamped with their file's number, so a number must never be used
        // twice: files started before a crash, but never named, may hold records
        // stamped with the numbers just above the newest named one (at most one per
        // file the bound allows). Skip past them.
        let newest = log.files.last().map(|f| f.0).into_iter();
        let seen = newest.chain(log.spares.iter().copied()).max();
        let gap = if log.recycle || !log.spares.is_empty() {
            (log.files_max() as u64).max(1 << 20)
        } else {
            0
        };
        let next = seen.map_or(0, |n| n + 1 + gap);
        if !recycle {
            // Spares left by a recycling run: not used here.
            for n in std::mem::take(&mut log.spares) {
                let path = spare_name(dir, n);
                fs::remove_file(&path).map_err(|e| io_err("delete", &path, e))?;
                note!(Op::Remove(&path));
            }
        }
        log.start_file(next)?;
        for (from, to) in std::mem::take(&mut log.renames) {
            fs::rename(&from, &to).map_err(|e| io_err("rename", &from, e))?;
            note!(Op::Rename(&from, &to));
        }
        // The new file's name, and every spare's, durable before anything is appended.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("sync", dir, e))?;
        note!(Op::SyncDir);
        log.dir_unsynced = false;
        log.trim_spares()?;
        Ok((log, torn_bytes))
    }

    /// Makes file `n` the one appended to: a spare reused, or a new file. It keeps its
    /// spare name until the next sync has synced the files before it; its number's
    /// name is durable once the directory is synced with that sync.
    fn start_file(&mut self, n: u64) -> Result<(), LogError> {
        let (path, f) = match self.spares.pop() {
            Some(old) => {
                let spare = spare_name(&self.dir, old);
                match OpenOptions::new().write(true).open(&spare) {
                    Ok(f) => (spare, f),
                    Err(e) => {
                        // Still a spare: kept for the next try.
                        self.spares.push(old);
                        return Err(io_err("open", &spare, e));
                    }
                }
            }
            None => {
                // Without recycling, nothing stale can be in it to be confused with:
                // its own name at once.
                let path = match self.recycle {
                    true => spare_name(&self.dir, n),
                    false => file_name(&self.dir, n),
                };
                let f = ferry_replica::local::private_options()
                    .create_new(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_err("create", &path, e))?;
                note!(Op::Create(&path));
                (path, f)
            }
        };
        if self.recycle {
            self.renames.push((path, file_name(&self.dir, n)));
        }
        self.dir_unsynced = true;
        if let Some(old) = self.current.replace(f) {
            let end = self.files.last().map_or(0, |f| f.1);
            self.rolled.push((old, end));
        }
        self.files.push((n, 0));
        Ok(())
    }

    /// Files the bound leaves room for, live and spare together.
    fn files_max(&self) -> usize {
        (self.total_bytes_max.div_ceil(self.file_bytes_max.max(1)) + 1) as usize
    }

    /// Deletes spares beyond what the bound leaves room for.
    fn trim_spares(&mut self) -> Result<(), LogError> {
        while self.files.len() + self.spares.len() > self.files_max() && !self.spares.is_empty() {
            let n = self.spares.remove(0);
            let path = spare_name(&self.dir, n);
            fs::remove_file(&path).map_err(|e| io_err("delete", &path, e))?;
            note!(Op::Remove(&path));
        }
        Ok(())
    }

    /// Bytes held in all files.
    pub fn used_bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b).sum()
    }

    pub fn max_bytes(&self) -> u64 {
        self.total_bytes_max
    }

    /// Appends one record; durable only after the next `sync`.
    pub fn append(&mut self, disk: &str, payload: &[u8]) -> Result<Position, LogError> {
        if disk.len() > u8::MAX as usize || payload.len() > RECORD_PAYLOAD_MAX {
            return Err(LogError::TooLarge {
                disk: disk.into(),
                bytes: payload.len(),
            });
        }
        let size = (HEADER_BYTES + disk.len() + payload.len()) as u64;
        if self.used_bytes() + size > self.total_bytes_max {
            return Err(LogError::Full {
                used: self.used_bytes(),
                max: self.total_bytes_max,
            });
        }
        let (n, offset) = *self.files.last().expect("a current file always exists");
        if offset > 0 && offset + size > self.file_bytes_max {
            if !self.recycle {
                // Without recycling the next file is named at once, and the file
                // system may make that name durable before this file's last appends:
                // a power cut would then leave a torn file before a newer one, which
                // recovery must call corruption. Sync this one first (the agent's
                // journal: one sync per file).
                let f = self.current.as_ref().expect("a current file always exists");
                if let Err(e) = f.sync_data() {
                    self.sync_failed();
                    return Err(io_err("sync", &file_name(&self.dir, n), e));
                }
                note!(Op::Sync(f));
            }
            // With recycling the full file is cut and synced with the next group, not
            // here (a sync on the append path would stall every connection of the
            // shard): the next file keeps its spare name until then.
            self.start_file(n + 1)?;
        }
        let (n, offset) = *self.files.last().expect("a current file always exists");
        // Header and name in one small buffer, the payload written from where it lies:
        // no copy of the frame in user space.
        let mut head = Vec::with_capacity(HEADER_BYTES + disk.len());
        head.extend_from_slice(&MAGIC.to_le_bytes());
        head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        head.extend_from_slice(&checksum(n, disk.as_bytes(), payload).to_le_bytes());
        head.push(disk.len() as u8);
        head.extend_from_slice(disk.as_bytes());
        let path = file_name(&self.dir, n);
        let f = self.current.as_ref().expect("a current file always exists");
        pwrite_both(f, offset, &head, payload).map_err(|e| io_err("append", &path, e))?;
        note!(Op::Write(f, offset, &head, payload));
        if let Some(last) = self.files.last_mut() {
            last.1 += size;
        }
        self.dirty = true;
        Ok(Position { file: n, offset })
    }

    /// Makes every append so far durable: one fdatasync for the whole group. After a
    /// failed sync the log refuses to sync again (the kernel may have dropped the dirty
    /// pages and cleared the error; acknowledging after that could lose writes).
    pub fn sync(&mut self) -> Result<(), LogError> {
        let job = self.take_sync()?;
        if let Err(e) = job.run() {
            self.sync_failed();
            let path = file_name(&self.dir, self.files.last().map_or(0, |f| f.0));
            return Err(io_err("sync", &path, e));
        }
        self.sync_done();
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
    /// Call `sync_done` when it succeeded, `sync_failed` if it failed.
    pub fn take_sync(&mut self) -> Result<SyncJob, LogError> {
        let path = file_name(&self.dir, self.files.last().map_or(0, |f| f.0));
        if self.poisoned {
            return Err(io_err(
                "sync",
                &path,
                io::Error::other("an earlier sync failed; the cache must be reopened"),
            ));
        }
        // Starting a file and keeping a spare both set `dir_unsynced`.
        if !self.dirty && !self.dir_unsynced {
            return Ok(SyncJob::default());
        }
        let current = match self.dirty {
            true => Some(
                self.current
                    .as_ref()
                    .expect("a current file always exists")
                    .try_clone()
                    .map_err(|e| io_err("sync", &path, e))?,
            ),
            false => None,
        };
        let dir = if std::mem::take(&mut self.dir_unsynced) {
            Some(File::open(&self.dir).map_err(|e| io_err("open", &self.dir, e))?)
        } else {
            None
        };
        self.spares_syncing
            .extend(std::mem::take(&mut self.spares_unsynced));
        self.dirty = false;
        Ok(SyncJob {
            rolled: std::mem::take(&mut self.rolled),
            renames: std::mem::take(&mut self.renames),
            current,
            dir,
        })
    }

    /// The sync handed out by `take_sync` succeeded: spares renamed before it may be
    /// reused.
    pub fn sync_done(&mut self) {
        self.spares.append(&mut self.spares_syncing);
    }

    /// A sync handed out by `take_sync` failed: nothing may be acknowledged again.
    pub fn sync_failed(&mut self) {
        self.poisoned = true;
    }

    /// Frees every file wholly before `upto` (all of whose records are uploaded),
    /// keeping it as a spare where the bound leaves room.
    pub fn release_before(&mut self, upto: Position) -> Result<u64, LogError> {
        let mut freed = 0;
        while self.files.len() > 1 && self.files[0].0 < upto.file {
            let (n, bytes) = self.files.remove(0);
            self.retire(n)?;
            freed += bytes;
        }
        // Everything released, the current file included: start a fresh one, so a
        // drained log holds nothing (a small log would otherwise stay full of its
        // last, already released file). Every record in it is uploaded: no sync.
        let end = self.end_position();
        if upto >= end && end.offset > 0 {
            // With recycling the next file keeps its spare name until the next sync,
            // so it is made first (a failure changes nothing) and the drained one
            // retired after (the tailer sizes a rolled file by name, so it never reads
            // a reused one as this number). Without, the next file is named at once,
            // so the drained one goes first: the agent releases journal records the
            // process server acknowledged before they were synced here, and a newer
            // name durable beside this file's torn, unsynced end would make recovery
            // call it corruption.
            if !self.recycle {
                self.retire(end.file)?;
            }
            if let Err(e) = self.start_file(end.file + 1) {
                if !self.recycle {
                    // Appends would go to a deleted file: nothing may be acknowledged.
                    self.sync_failed();
                }
                return Err(e);
            }
            // start_file took the old file as rolled: it needs no cut and no sync.
            self.rolled.pop();
            let (_, bytes) = self.files.remove(0);
            freed += bytes;
            self.dirty = true;
            if self.recycle {
                self.retire(end.file)?;
            }
        }
        Ok(freed)
    }

    /// A released file, no longer in `files`: kept as a spare while recycling leaves
    /// room for one, else deleted.
    fn retire(&mut self, n: u64) -> Result<(), LogError> {
        let path = file_name(&self.dir, n);
        if self.recycle && self.files.len() + self.spares_count() < self.files_max() {
            let spare = spare_name(&self.dir, n);
            fs::rename(&path, &spare).map_err(|e| io_err("rename", &path, e))?;
            note!(Op::Rename(&path, &spare));
            self.spares_unsynced.push(n);
            self.dir_unsynced = true;
        } else {
            fs::remove_file(&path).map_err(|e| io_err("delete", &path, e))?;
            note!(Op::Remove(&path));
        }
        Ok(())
    }

    fn spares_count(&self) -> usize {
        self.spares.len() + self.spares_unsynced.len() + self.spares_syncing.len()
    }
}

#[cfg(test)]
mod tests;
