//! Rebuilding a disk at a sequence number: the base extents, then the log segments in
//! sequence order, applied onto a zeroed sink.
//!
//! A fetch thread keeps a bounded window of objects downloading; a pool of decoder
//! threads authenticates and decompresses them in parallel. Base extents are disjoint,
//! so decoders write them as they finish; log segments may overlap, so a decoder holds
//! its decoded segment until every earlier one has been applied (a turn counter), which
//! keeps decryption parallel and application ordered.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Condvar, Mutex};

use bytes::Bytes;
use futures::StreamExt;

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::meta::Point;
use crate::object::{open_object, Expect, ObjectKind, OpenContext};
use crate::record::decode_records;
use crate::state::DiskState;

/// Where a rebuilt disk goes: a file, a block device, a buffer in a test.
pub trait DiskSink: Sync {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zero.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()>;
    /// How errors name the sink.
    fn name(&self) -> &str {
        "rebuilt disk"
    }
}

/// A sink writing into a file that starts out as a hole of the disk's size.
pub struct FileSink<'a> {
    pub file: &'a File,
    pub path: String,
}

static ZEROES: [u8; 1 << 16] = [0u8; 1 << 16];

impl DiskSink for FileSink<'_> {
    fn name(&self) -> &str {
        &self.path
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        zero_range(self.file, offset, len)
    }
}

/// Makes `len` bytes at `offset` of `file` read as zero: a punched hole keeps the file
/// sparse; file systems without hole punching get zeroes written.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor the caller owns; it only changes that range.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(ZEROES.len() as u64) as usize;
        file.write_all_at(&ZEROES[..n], offset + at)?;
        at += n as u64;
    }
    Ok(())
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RebuildStats {
    pub disk_bytes: u64,
    /// Bytes of data written (holes excluded).
    pub data_bytes: u64,
    /// Bytes fetched from the store.
    pub stored_bytes: u64,
    pub objects: u64,
}

struct Job {
    object: String,
    kind: ObjectKind,
    /// Position among the segments (ordered application); None for extents.
    turn: Option<u64>,
    /// For extents: the disk range the records must lie in.
    range: (u64, u64),
}

struct Shared<'a> {
    disk: &'a Disk,
    sink: &'a dyn DiskSink,
    progress: &'a (dyn Fn(u64) + Sync),
    floor: u64,
    seq: u64,
    disk_bytes: u64,
    abort: AtomicBool,
    error: Mutex<Option<Error>>,
    /// (next segment to apply, base extents not yet applied): a segment applies only
    /// after the whole base and every earlier segment.
    turn: Mutex<(u64, u64)>,
    turn_changed: Condvar,
    data_bytes: AtomicU64,
    stored_bytes: AtomicU64,
}

impl Shared<'_> {
    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.abort.store(true, Ordering::SeqCst);
        // Wake turn waiters so they see the abort.
        let _guard = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        self.turn_changed.notify_all();
    }

    fn apply(&self, job: &Job, plain: &[u8]) -> Result<()> {
        decode_records(
            plain,
            |r| {
                if let Some(_turn) = job.turn {
                    if r.seq < self.floor || r.seq > self.seq {
                        return Ok(());
                    }
                } else if r.offset < job.range.0 || r.offset + r.len > job.range.1 {
                    return Err(Error::corrupt(&job.object, "record outside its extent"));
                }
                if r.offset >= self.disk_bytes {
                    return Ok(());
                }
                let len = r.len.min(self.disk_bytes - r.offset);
                let res = match r.data {
                    Some(d) => self
                        .sink
                        .write_at(&d[..len as usize], r.offset)
                        .map(|_| self.data_bytes.fetch_add(len, Ordering::Relaxed)),
                    None => self.sink.zero(r.offset, len).map(|_| 0),
                };
                res.map(|_| ())
                    .map_err(|e| Error::io("write", self.sink.name(), e))
            },
            &job.object,
        )
    }

    fn expect<'b>(&'b self, job: &'b Job) -> Result<Expect<'b>> {
        Ok(Expect {
            key: self.disk.key()?,
            disk_id: &self.disk.disk_id,
            kind: job.kind,
            name: &job.object,
        })
    }

    fn decode(
        &self,
        job: &Job,
        bytes: Bytes,
        ctx: &mut OpenContext,
        held: &mut Vec<u8>,
    ) -> Result<()> {
        let stored = bytes.len() as u64;
        let mut buf: Vec<u8> = bytes.into();
        let expect = self.expect(job)?;
        match job.turn {
            None => {
                open_object(&expect, &mut buf, ctx, |chunk| self.apply(job, chunk))?;
                self.turn.lock().unwrap_or_else(|p| p.into_inner()).1 -= 1;
                self.turn_changed.notify_all();
            }
            Some(turn) => {
                held.clear();
                open_object(&expect, &mut buf, ctx, |chunk| {
                    held.extend_from_slice(chunk);
                    Ok(())
                })?;
                let mut current = self.turn.lock().unwrap_or_else(|p| p.into_inner());
                while *current != (turn, 0) && !self.abort.load(Ordering::SeqCst) {
                    current = self
                        .turn_changed
                        .wait(current)
                        .unwrap_or_else(|p| p.into_inner());
                }
                if self.abort.load(Ordering::SeqCst) {
                    return Ok(());
                }
                drop(current);
                self.apply(job, held)?;
                self.turn.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
                self.turn_changed.notify_all();
            }
        }
        self.stored_bytes.fetch_add(stored, Ordering::Relaxed);
        (self.progress)(stored);
        Ok(())
    }
}

fn jobs_for(state: &DiskState, seq: u64) -> Vec<Job> {
    let mut jobs = Vec::new();
    if let Some(b) = &state.base {
        for e in &b.extents {
            let start = e.index * b.extent_bytes;
            jobs.push(Job {
                object: e.object.clone(),
                kind: ObjectKind::Extent,
                turn: None,
                range: (start, start + b.extent_bytes),
            });
        }
    }
    for (i, s) in state.segments_up_to(seq).enumerate() {
        jobs.push(Job {
            object: s.object.clone(),
            kind: ObjectKind::Segment,
            turn: Some(i as u64),
            range: (0, u64::MAX),
        });
    }
    jobs
}

/// Rebuilds the disk as of `point` into `sink`, which must read as zeroes initially.
pub fn rebuild_point(
    disk: &Disk,
    state: &DiskState,
    point: &Point,
    sink: &dyn DiskSink,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<RebuildStats> {
    rebuild(disk, state, point.seq, point.disk_bytes, sink, progress)
}

/// Rebuilds the disk as of sequence `seq` with size `disk_bytes`.
pub fn rebuild(
    disk: &Disk,
    state: &DiskState,
    seq: u64,
    disk_bytes: u64,
    sink: &dyn DiskSink,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<RebuildStats> {
    disk.key()?;
    if let Some(b) = &state.base {
        if seq < b.seq {
            return Err(Error::Invalid(format!(
                "sequence {seq} of disk {} was compacted away (base is at {})",
                disk.paths.label(),
                b.seq
            )));
        }
    }
    let jobs = jobs_for(state, seq);
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let window = workers * 2;
    let shared = Shared {
        disk,
        sink,
        progress,
        floor: state.base.as_ref().map_or(0, |b| b.seq + 1),
        seq,
        disk_bytes,
        abort: AtomicBool::new(false),
        error: Mutex::new(None),
        turn: Mutex::new((0, jobs.iter().filter(|j| j.turn.is_none()).count() as u64)),
        turn_changed: Condvar::new(),
        data_bytes: AtomicU64::new(0),
        stored_bytes: AtomicU64::new(0),
    };
    let (tx, rx) = sync_channel::<(usize, Result<Bytes>)>(window);
    let rx: Mutex<Receiver<(usize, Result<Bytes>)>> = Mutex::new(rx);
    let objects = jobs.len() as u64;
    std::thread::scope(|scope| {
        let shared = &shared;
        let jobs = &jobs;
        scope.spawn(move || {
            let store = &shared.disk.store;
            store.block(
                futures::stream::iter(jobs.iter().enumerate())
                    .map(|(i, j)| async move { (i, store.get(&j.object).await) })
                    .buffered(window)
                    .take_while(|_| std::future::ready(!shared.abort.load(Ordering::SeqCst)))
                    .for_each(|item| {
                        let _ = tx.send(item);
                        std::future::ready(())
                    }),
            );
        });
        for _ in 0..workers {
            let rx = &rx;
            scope.spawn(move || {
                let mut ctx = OpenContext::default();
                let mut held = Vec::new();
                loop {
                    let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((i, fetched)) = next else { break };
                    if shared.abort.load(Ordering::SeqCst) {
                        continue;
                    }
                    let r = fetched.and_then(|b| shared.decode(&jobs[i], b, &mut ctx, &mut held));
                    if let Err(e) = r {
                        shared.fail(e);
                    }
                }
            });
        }
    });
    if let Some(e) = shared.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(RebuildStats {
        disk_bytes,
        data_bytes: shared.data_bytes.into_inner(),
        stored_bytes: shared.stored_bytes.into_inner(),
        objects,
    })
}
