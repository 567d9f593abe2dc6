//! The log of a served point, decoded at start: every record of the segments up to
//! the point is written into one local file and indexed by the disk range it covers.
//!
//! Why at start and whole: a segment's records are sealed, so which disk ranges a
//! segment touches is known only once it is decrypted, and a read anywhere may be
//! overridden by any segment; no read can be answered before every segment is.
//! Start-up therefore costs what decoding the log costs, and that is split over
//! `workers` threads: each takes the next segment, fetches and opens it, and writes
//! its data records straight into the log file at places it reserves (one atomic
//! add per record: the file's layout does not matter, only the index). The index is
//! built after, in segment order, since later records override earlier ones. Memory
//! is bounded by one segment per worker; the index holds a few words per record.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use ferry_replica::object::{open_object, Expect, ObjectKind, OpenContext};
use ferry_replica::record::decode_records;
use ferry_replica::Disk;

use super::ranges::{RangeMap, Src};
use super::{Error, Result};

/// Decoding threads when the caller does not say: one per core, at most this many
/// (each holds one segment in memory; the store's own fetch concurrency is bounded
/// separately).
pub const MAX_WORKERS: usize = 8;

/// Threads to decode a log with on this machine.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, MAX_WORKERS))
}

/// What decoding one segment gives: the ranges it writes, in record order.
type Pieces = Vec<(u64, u64, Src)>;

/// The log of one disk at one point, as written into `file`.
pub struct LogSpec<'a> {
    pub disk: &'a Disk,
    /// Segment objects, in sequence order.
    pub segments: &'a [String],
    /// Records below this sequence number are in the base already.
    pub floor: u64,
    /// The point's sequence number: later records are not part of it.
    pub seq: u64,
    /// The point's disk size: records past it are cut off.
    pub size: u64,
}

/// Decodes `spec`'s segments with up to `workers` threads into `file` (which must be
/// empty) and returns the interval index of what they write.
pub fn decode_log(
    spec: &LogSpec<'_>,
    workers: usize,
    file: &File,
    path: &Path,
) -> Result<RangeMap> {
    let n = spec.segments.len();
    let next = AtomicUsize::new(0);
    let pos = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let slots: Vec<Mutex<Option<Result<Pieces>>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let workers = workers.clamp(1, n.max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut ctx = OpenContext::default();
                // Stop taking segments once one failed: the start fails anyway.
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(object) = spec.segments.get(i) else {
                        break;
                    };
                    let r = decode_segment(spec, object, &mut ctx, &pos, file, path);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                }
            });
        }
    });
    let mut log = RangeMap::default();
    for (i, slot) in slots.into_iter().enumerate() {
        let pieces = slot
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or_else(|| {
                // Segments are taken in order, so one is left untaken only after an
                // earlier one failed, whose error this loop has returned already.
                Err(Error::Overlay {
                    path: path.display().to_string(),
                    why: format!("log segment {} was not decoded", spec.segments[i]),
                })
            })?;
        for (start, end, src) in pieces {
            log.insert(start, end, src);
        }
    }
    Ok(log)
}

/// Fetches, authenticates and decodes one segment, writing its data records into the
/// log file at places reserved from `pos`.
fn decode_segment(
    spec: &LogSpec<'_>,
    object: &str,
    ctx: &mut OpenContext,
    pos: &AtomicU64,
    file: &File,
    path: &Path,
) -> Result<Pieces> {
    let disk = spec.disk;
    let mut buf: Vec<u8> = disk.store.block(disk.store.get(object))?.into();
    let expect = Expect {
        key: disk.key()?,
        disk_id: &disk.disk_id,
        kind: ObjectKind::Segment,
        name: object,
    };
    let mut pieces = Vec::new();
    open_object(&expect, &mut buf, ctx, |chunk| {
        decode_records(
            chunk,
            |r| {
                if r.seq < spec.floor || r.seq > spec.seq || r.offset >= spec.size {
                    return Ok(());
                }
                let len = r.len.min(spec.size - r.offset);
                match r.data {
                    Some(d) => {
                        let at = pos.fetch_add(len, Ordering::Relaxed);
                        file.write_all_at(&d[..len as usize], at).map_err(|e| {
                            ferry_replica::Error::io("write", path.display().to_string(), e)
                        })?;
                        pieces.push((r.offset, r.offset + len, Src::At(at)));
                    }
                    None => pieces.push((r.offset, r.offset + len, Src::Zero)),
                }
                Ok(())
            },
            object,
        )
    })?;
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use ferry_replica::object::SealContext;
    use ferry_replica::writer::{seal_segment, Payload, Write};
    use ferry_replica::{Store, VaultKey};
    use rand::{Rng, SeedableRng};

    use super::*;

    const SIZE: u64 = 1 << 20;

    /// The log as bytes: None where it writes nothing (the base shows through).
    fn view(log: &RangeMap, file: &File, size: u64) -> Vec<Option<u8>> {
        let mut out = vec![None; size as usize];
        for (s, e, src) in log.overlapping(0, size) {
            let mut buf = vec![0u8; (e - s) as usize];
            if let Src::At(p) = src {
                file.read_exact_at(&mut buf, p).unwrap();
            }
            for (i, b) in buf.into_iter().enumerate() {
                out[s as usize + i] = Some(b);
            }
        }
        out
    }

    /// Segments of overlapping data and zero writes, decoded on one thread and on
    /// several: both equal a byte model that applies every write in sequence order,
    /// leaving out those below the floor and above the point, cut at the point's size.
    #[test]
    fn parallel_decoding_applies_records_in_sequence_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
        let vault = VaultKey::generate();
        let disk = store
            .block(Disk::open_or_create(
                &store,
                "m",
                "d0",
                &vault,
                4096,
                256 << 10,
            ))
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let mut ctx = SealContext::default();
        let (floor, point, size) = (5u64, 150u64, SIZE - 3000);
        let mut model: Vec<Option<u8>> = vec![None; size as usize];
        let mut segments = Vec::new();
        let mut seq = 0u64;
        for _ in 0..12 {
            let mut owned = Vec::new();
            for _ in 0..rng.gen_range(5..20) {
                let len = rng.gen_range(1..40_000u64);
                let off = rng.gen_range(0..SIZE - len);
                let data = match rng.gen_range(0..3) {
                    0 => None,
                    // Compressible: stored zstd.
                    1 => Some(vec![rng.gen::<u8>(); len as usize]),
                    _ => Some((0..len).map(|_| rng.gen()).collect::<Vec<u8>>()),
                };
                if (floor..=point).contains(&seq) {
                    for i in off..(off + len).min(size) {
                        model[i as usize] =
                            Some(data.as_ref().map_or(0, |d| d[(i - off) as usize]));
                    }
                }
                owned.push((seq, off, len, data));
                seq += 1;
            }
            let writes: Vec<Write<'_>> = owned
                .iter()
                .map(|(seq, off, len, data)| Write {
                    seq: *seq,
                    offset: *off,
                    payload: match data {
                        Some(d) => Payload::Data(d),
                        None => Payload::Zero(*len),
                    },
                })
                .collect();
            let sealed = seal_segment(&disk, &mut ctx, &writes).unwrap();
            store
                .block(disk.upload(&sealed.segment.object, sealed.bytes.into()))
                .unwrap();
            segments.push(sealed.segment.object);
        }
        assert!(seq > point, "the point cuts the log");
        let spec = LogSpec {
            disk: &disk,
            segments: &segments,
            floor,
            seq: point,
            size,
        };
        for workers in [1, 4] {
            let path = dir.path().join(format!("log-{workers}"));
            let file = rw(&path);
            let log = decode_log(&spec, workers, &file, &path).unwrap();
            assert!(view(&log, &file, size) == model, "{workers} workers");
        }
        // A segment that is not there fails the decoding, naming it.
        let mut missing = segments.clone();
        missing.insert(3, "machines/m/disks/d0/log/nope".into());
        let spec = LogSpec {
            segments: &missing,
            ..spec
        };
        let path = dir.path().join("log-missing");
        let e = decode_log(&spec, 4, &rw(&path), &path).err().unwrap();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    fn rw(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap()
    }
}
