//! Reads a shard's cache log from behind, up to what the shard has made durable: the
//! upload stage's input. Reading the files (from the page cache, normally) instead of
//! holding frames in memory keeps memory bounded however far uploads fall behind, and
//! makes restart recovery the same path as normal running.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{
    file_name, io_err, parse_name, parse_spans, record_at, LogError, Position, RecordRef, Span,
    RECORD_PAYLOAD_MAX,
};

pub struct Tailer {
    dir: PathBuf,
    pos: Position,
    open: Option<(u64, File)>,
    /// Reused between reads (zero-filled once, not per batch); a batch borrows it.
    buf: Vec<u8>,
    /// The records of the last batch: file, where its read began in `buf` and the
    /// file offset of that, and the record's span.
    spans: Vec<(u64, usize, u64, Span)>,
}

/// Records read by one `Tailer::read`, borrowing the tailer's buffer: no copy of the
/// payloads is made.
pub struct Batch<'a> {
    buf: &'a [u8],
    spans: &'a [(u64, usize, u64, Span)],
    end: Position,
}

impl<'a> Batch<'a> {
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The tailer's position after this batch.
    pub fn end(&self) -> Position {
        self.end
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = RecordRef<'a>> + '_ {
        self.spans
            .iter()
            .map(|(file, start, base, s)| record_at(&self.buf[*start..], *file, *base, s))
    }
}

impl Tailer {
    pub fn new(dir: &Path, start: Position) -> Tailer {
        Tailer {
            dir: dir.to_path_buf(),
            pos: start,
            open: None,
            buf: Vec::new(),
            spans: Vec::new(),
        }
    }

    /// Everything before this position has been returned.
    pub fn position(&self) -> Position {
        self.pos
    }

    /// Returns the records between the current position and `upto` (a record boundary
    /// the shard made durable), about `max_bytes` of them at most. An error after some
    /// records were read returns those (the position is just past them), and the next
    /// call meets the error again: records read are never dropped with the error.
    pub fn read(&mut self, upto: Position, max_bytes: usize) -> Result<Batch<'_>, LogError> {
        self.spans.clear();
        let mut used = 0usize;
        if let Err(e) = self.read_into(upto, max_bytes, &mut used) {
            if self.spans.is_empty() {
                return Err(e);
            }
        }
        Ok(Batch {
            buf: &self.buf[..used],
            spans: &self.spans,
            end: self.pos,
        })
    }

    /// Reads records into `buf` from `*used` on and their spans into `spans`,
    /// advancing the position past each whole one.
    fn read_into(
        &mut self,
        upto: Position,
        max_bytes: usize,
        used: &mut usize,
    ) -> Result<(), LogError> {
        let mut taken = 0usize;
        while self.pos < upto && taken < max_bytes {
            let path = file_name(&self.dir, self.pos.file);
            if self.open.as_ref().map(|(n, _)| *n) != Some(self.pos.file) {
                let f = match File::open(&path) {
                    Ok(f) => f,
                    // A file read to its end and then released as a whole (the log
                    // rolls a drained current file), or a number skipped at a restart:
                    // go on with the next file there is.
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound
                            && self.pos.file < upto.file =>
                    {
                        self.pos = Position {
                            file: next_file(&self.dir, self.pos.file)?.unwrap_or(upto.file),
                            offset: 0,
                        };
                        continue;
                    }
                    Err(e) => return Err(io_err("open", &path, e)),
                };
                self.open = Some((self.pos.file, f));
            }
            let end = if self.pos.file < upto.file {
                // A rolled file ends at its last record. Its size by name, not by the
                // handle: a file released whole (the log keeps a drained current file
                // as a spare, to reuse) is no longer this number's, and the size of
                // the handle's inode may then be another file's.
                match std::fs::metadata(&path) {
                    Ok(m) => m.len(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        self.open = None;
                        self.pos = Position {
                            file: next_file(&self.dir, self.pos.file)?.unwrap_or(upto.file),
                            offset: 0,
                        };
                        continue;
                    }
                    Err(e) => return Err(io_err("stat", &path, e)),
                }
            } else {
                upto.offset
            };
            let (_, f) = self.open.as_ref().expect("opened above");
            if self.pos.offset >= end {
                if self.pos.file < upto.file {
                    // A rolled file is complete; the next number is the next file
                    // (but after a restart, which skips numbers: see above).
                    self.pos = Position {
                        file: self.pos.file + 1,
                        offset: 0,
                    };
                    continue;
                }
                break;
            }
            let want = (end - self.pos.offset)
                .min((max_bytes - taken + RECORD_PAYLOAD_MAX + 512) as u64)
                as usize;
            let at = *used;
            if self.buf.len() < at + want {
                self.buf.resize(at + want, 0);
            }
            let buf = &mut self.buf[at..at + want];
            f.read_exact_at(buf, self.pos.offset)
                .map_err(|e| io_err("read", &path, e))?;
            let (file, base) = (self.pos.file, self.pos.offset);
            let spans = &mut self.spans;
            let (valid, problem) = parse_spans(buf, file, |s| {
                taken += s.payload.len();
                spans.push((file, at, base, s));
            });
            if valid == 0 {
                return Err(LogError::Corrupt {
                    path: path.display().to_string(),
                    offset: self.pos.offset,
                    reason: problem.unwrap_or("no whole record where one was durable"),
                });
            }
            *used += valid;
            self.pos.offset += valid as u64;
        }
        Ok(())
    }
}

/// The lowest file number above `n` in `dir`.
fn next_file(dir: &Path, n: u64) -> Result<Option<u64>, LogError> {
    let mut next = None;
    for e in std::fs::read_dir(dir).map_err(|e| io_err("list", dir, e))? {
        let name = e.map_err(|e| io_err("list", dir, e))?.file_name();
        if let Some((m, false)) = parse_name(&name).filter(|(m, _)| *m > n) {
            next = Some(next.map_or(m, |x: u64| x.min(m)));
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::DurableLog;

    /// Every payload up to `end`, read in batches of about `batch` bytes.
    fn read_all(t: &mut Tailer, end: Position, batch: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        loop {
            let b = t.read(end, batch).unwrap();
            if b.is_empty() {
                return got;
            }
            got.extend(b.iter().map(|r| r.payload.to_vec()));
        }
    }

    #[test]
    fn follows_the_durable_position_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = DurableLog::open(dir.path(), 1000, 1 << 20, true).unwrap();
        let mut t = Tailer::new(dir.path(), log.first_position());
        let mut want = Vec::new();
        for i in 0..50u32 {
            let payload = vec![i as u8; 100 + i as usize];
            log.append("m/d", &payload).unwrap();
            want.push(payload);
        }
        log.sync().unwrap();
        let end = log.end_position();
        assert!(end.file > 2, "the log rolled over several files");
        assert_eq!(read_all(&mut t, end, 700), want);
        assert_eq!(t.position(), end);
        // More appends are picked up from where it stopped.
        log.append("m/d", b"late").unwrap();
        log.sync().unwrap();
        let end = log.end_position();
        let batch = t.read(end, 1 << 20).unwrap();
        assert_eq!(batch.len(), 1);
        let late = batch.iter().next().unwrap();
        assert_eq!(late.payload, b"late");
        assert_eq!(late.disk, "m/d");
    }

    #[test]
    fn crosses_the_numbers_a_restart_skips() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = DurableLog::open(dir.path(), 1000, 1 << 20, true).unwrap();
        let first = log.first_position();
        log.append("m/d", b"before").unwrap();
        log.sync().unwrap();
        drop(log);
        let (mut log, _) = DurableLog::open(dir.path(), 1000, 1 << 20, true).unwrap();
        log.append("m/d", b"after").unwrap();
        log.sync().unwrap();
        let mut t = Tailer::new(dir.path(), first);
        let end = log.end_position();
        let got: Vec<Vec<u8>> = t
            .read(end, 1 << 20)
            .unwrap()
            .iter()
            .map(|r| r.payload.to_vec())
            .collect();
        assert_eq!(got, [b"before".to_vec(), b"after".to_vec()]);
        assert_eq!(t.position(), end);
    }

    #[test]
    fn records_read_before_an_error_are_returned_and_the_error_comes_next() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = DurableLog::open(dir.path(), 1000, 1 << 20, true).unwrap();
        let mut t = Tailer::new(dir.path(), log.first_position());
        for i in 0..5u8 {
            log.append("m/d", &[i; 300]).unwrap();
        }
        log.sync().unwrap();
        let end = log.end_position();
        // The second file's first record goes bad on disk.
        let second = log.first_position().file + 1;
        std::fs::OpenOptions::new()
            .write(true)
            .open(file_name(dir.path(), second))
            .unwrap()
            .write_all_at(&[0xFF; 16], 0)
            .unwrap();
        let got: Vec<u8> = t
            .read(end, 1 << 20)
            .unwrap()
            .iter()
            .map(|r| r.payload[0])
            .collect();
        assert_eq!(
            got,
            [0, 1, 2],
            "the first file's records, not lost with the error"
        );
        assert!(matches!(
            t.read(end, 1 << 20),
            Err(LogError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_drained_file_kept_and_reused_is_never_read_under_its_old_number() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = DurableLog::open(dir.path(), 1000, 1 << 20, true).unwrap();
        let mut t = Tailer::new(dir.path(), log.first_position());
        for i in 0..3u8 {
            log.append("m/d", &[i; 50]).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(t.read(log.end_position(), 1 << 20).unwrap().len(), 3);
        // All uploaded: the drained file becomes a spare, durable with the next sync.
        let drained = log.end_position().file;
        log.release_before(log.end_position()).unwrap();
        log.sync().unwrap();
        // The next file fills and rolls, and the one after reuses the spare: its inode
        // (which the tailer still holds) now holds new records, past the old size.
        let mut want = Vec::new();
        for i in 0..10u8 {
            let payload = vec![100 + i; 300];
            log.append("m/d", &payload).unwrap();
            want.push(payload);
        }
        log.sync().unwrap();
        let end = log.end_position();
        assert_eq!(end.file, drained + 4, "three files rolled past it");
        assert_eq!(read_all(&mut t, end, 1 << 20), want);
    }
}
