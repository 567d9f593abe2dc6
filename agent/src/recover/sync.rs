//! Making a disk equal to a recovery point by checksum: failback's master target
//! (issue 16). The home disk is read locally and hashed block by block; only the
//! blocks whose checksum differs from the point's are fetched and rewritten.
//!
//! Why checksums and no full read of the point: the home disk usually holds the
//! failover point already, give or take the writes made after it, so nearly every
//! block matches. The point's checksum map is made without reading the disk from the
//! store either (`point_sums`): a seed's map describes the base, and only the blocks
//! the log wrote after it are re-hashed, read through a `ServedDisk`, which fetches
//! only the objects that cover them. What is fetched is counted in bytes, exactly,
//! on a store handle of the sync's own.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_replica::scan::{block_sum, Sum, ZERO_SUM};
use ferry_replica::sums::BlockSums;
use ferry_replica::{Disk, DiskState, Point, Store, VaultKey};

use super::served::ServedDisk;
use super::{io_err, Error, Result};
use crate::nbd::Device;

/// Bytes of the target read at once: the compare streams, whatever the disk's size.
pub const READ_BYTES: u64 = 1 << 20;

/// Decoded base extents a sync keeps in memory (it reads the disk in order, so one
/// or two would do; a few more cost little).
pub const CACHE_EXTENTS: usize = 4;

#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Re-read the target after the writes and compare it with the point's map.
    pub verify: bool,
    /// Where the point's decoded log goes while the sync runs (about the size of the
    /// log up to the point); None: a temporary directory, removed on return.
    pub work_dir: Option<PathBuf>,
}

/// Which pass a progress report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Making the point's checksum map: bytes of the blocks hashed so far.
    Map,
    /// Comparing (and rewriting) the target: bytes of it compared so far.
    Compare,
    /// Re-reading the target after the writes.
    Verify,
    /// Hashing the home disk (a sync across the sites, `sync_exchange`).
    Home,
    /// Writing the blocks a point-diff stored (`sync_exchange`): bytes written of the
    /// disk's size.
    Write,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncProgress {
    pub phase: Phase,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// How the point's checksum map was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapSource {
    /// A seed's map (of point `point`), with the `log_blocks` blocks the log wrote
    /// after it re-hashed.
    Seed { point: String, log_blocks: u64 },
    /// No map describes a state at or before the point: every block that is not a
    /// hole (neither in a base extent nor written by the log) was read and hashed.
    Whole { blocks_hashed: u64 },
    /// Made at the recovery site and stored for this sync (`sync_exchange`).
    Stored { object: String },
}

impl std::fmt::Display for MapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapSource::Seed { log_blocks, .. } => write!(f, "seed map + {log_blocks} log blocks"),
            MapSource::Whole { .. } => f.write_str("hashed whole"),
            MapSource::Stored { .. } => f.write_str("stored by the recovery site"),
        }
    }
}

/// The checksum map of a disk at a point, and how it was made.
#[derive(Debug, Clone)]
pub struct PointSums {
    pub map: BlockSums,
    pub from: MapSource,
}

#[derive(Debug, Clone)]
pub struct SyncReport {
    pub point: String,
    pub disk_bytes: u64,
    pub block_bytes: u64,
    /// Blocks of the disk compared (the target's bytes past the disk are not).
    pub blocks: u64,
    pub blocks_differing: u64,
    pub bytes_written: u64,
    /// Bytes of objects fetched from the store: metadata, the map, log segments and
    /// the base extents of the blocks rewritten.
    pub bytes_fetched: u64,
    pub map_from: MapSource,
    /// With `verify`: whether the target read back equal to the point.
    pub identical: Option<bool>,
    pub seconds: f64,
}

fn target_err(path: &Path, why: impl Into<String>) -> Error {
    Error::Target {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// Opens the target for reading and writing, held exclusively for the sync: a
/// regular file under flock(LOCK_EX|LOCK_NB) and a whole-file write lock (fcntl
/// F_OFD_SETLK), a block device with O_EXCL (which the
/// kernel refuses while the device is mounted or held by another exclusive open).
/// Returns the file and its size.
pub fn open_target(path: &Path) -> Result<(File, u64)> {
    let meta = std::fs::metadata(path).map_err(io_err("open target", path))?;
    let kind = meta.file_type();
    if kind.is_block_device() {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => target_err(
                    path,
                    "in use (mounted, or opened exclusively by another program)",
                ),
                _ => io_err("open target", path)(e),
            })?;
        let size = f
            .seek(SeekFrom::End(0))
            .map_err(io_err("size of target", path))?;
        return Ok((f, size));
    }
    if !kind.is_file() {
        return Err(target_err(
            path,
            "is neither a regular file nor a block device",
        ));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open target", path))?;
    // SAFETY: flock on a descriptor this function owns, for as long as `f` lives.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => target_err(path, "in use (locked by another open)"),
            _ => io_err("lock target", path)(e),
        });
    }
    // QEMU (and others) lock image files with byte-range open file description
    // locks, which flock does not see: a write lock on the whole file conflicts with
    // any of them.
    let whole = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK with a valid lock description on a descriptor owned here;
    // the lock lasts as long as `f`'s open file description.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &whole) } != 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => target_err(
                path,
                "in use (a byte-range lock is held on it, as QEMU holds its images)",
            ),
            _ => io_err("lock target", path)(e),
        });
    }
    Ok((f, meta.len()))
}

/// The blocks (of `block_bytes`) that `ranges` touch, in order, each once.
fn touched_blocks(ranges: &[(u64, u64)], block_bytes: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &(s, e) in ranges {
        if s >= e {
            continue;
        }
        let first = s / block_bytes;
        let first = match out.last() {
            Some(&last) if last >= first => last + 1,
            _ => first,
        };
        out.extend(first..=(e - 1) / block_bytes);
    }
    out
}

/// Reads block `b` of the point through `served` and hashes it.
pub(super) fn hash_block(
    served: &ServedDisk,
    b: u64,
    bs: u64,
    size: u64,
    buf: &mut [u8],
) -> Result<Sum> {
    let at = b * bs;
    let n = bs.min(size - at) as usize;
    served.read(at, &mut buf[..n]).map_err(|e| Error::Fetch {
        what: format!(
            "block {b} of {} at point {}",
            served.name(),
            served.point().id
        ),
        why: e.to_string(),
    })?;
    Ok(block_sum(&buf[..n]))
}

/// The newest seed map that describes a state this point's log builds on: at or
/// before the point, not before the base (whose log is all a `ServedDisk` decodes),
/// of the same size; with the id of its point. Loaded before the served disk is
/// opened (which takes the disk handle).
pub fn seed_map(
    disk: &Disk,
    state: &DiskState,
    point: &Point,
) -> Result<Option<(String, BlockSums)>> {
    let base_seq = state.base.as_ref().map_or(0, |b| b.seq);
    let candidate = state
        .points
        .iter()
        .filter(|p| {
            p.seq <= point.seq
                && p.seq >= base_seq
                && p.disk_bytes == point.disk_bytes
                && p.sums.as_deref().is_some_and(|s| !s.is_empty())
        })
        .max_by_key(|p| p.seq);
    let Some(p) = candidate else {
        return Ok(None);
    };
    let Some(object) = p.sums.as_deref() else {
        return Ok(None);
    };
    let map = disk.store.block(BlockSums::load(disk, object))?;
    // A map of another block size or disk size cannot be patched: hash whole then.
    if map.block_bytes != disk.info.block_bytes || map.disk_bytes != point.disk_bytes {
        return Ok(None);
    }
    Ok(Some((p.id.clone(), map)))
}

/// The checksum map of `served`'s disk at its point, without reading the disk from
/// the store: `seed` (from `seed_map`) patched with the blocks the log wrote since
/// (read through `served`), or, when there is none, every non-hole block read and
/// hashed. `block_bytes` is the disk's.
pub fn point_sums(
    seed: Option<(String, BlockSums)>,
    served: &ServedDisk,
    block_bytes: u64,
    progress: &dyn Fn(&SyncProgress),
) -> Result<PointSums> {
    let point = served.point().clone();
    let bs = block_bytes;
    let size = point.disk_bytes;
    let blocks = BlockSums::blocks_for(size, bs);
    let logged = touched_blocks(&served.log_ranges(), bs);
    let mut buf = vec![0u8; bs as usize];
    let report = |done: u64| {
        progress(&SyncProgress {
            phase: Phase::Map,
            done_bytes: done,
            total_bytes: size,
        })
    };
    if let Some((seed, mut map)) = seed {
        // The log's blocks since the base, a superset of those written since the
        // seed's map when the map is newer than the base: the others are re-hashed
        // to what they were.
        for (i, &b) in logged.iter().enumerate() {
            map.sums[b as usize] = hash_block(served, b, bs, size, &mut buf)?;
            report((i as u64 + 1) * bs);
        }
        return Ok(PointSums {
            map,
            from: MapSource::Seed {
                point: seed,
                log_blocks: logged.len() as u64,
            },
        });
    }
    let extent_bytes = served.extent_bytes();
    let mut sums = Vec::with_capacity(blocks);
    let mut next_logged = logged.iter().peekable();
    let mut hashed = 0u64;
    for b in 0..blocks as u64 {
        let at = b * bs;
        let end = (at + bs).min(size);
        let in_log = next_logged.next_if_eq(&&b).is_some();
        let in_base = (at / extent_bytes..=(end - 1) / extent_bytes).any(|e| served.has_extent(e));
        if in_log || in_base {
            sums.push(hash_block(served, b, bs, size, &mut buf)?);
            hashed += 1;
        } else {
            sums.push(ZERO_SUM);
        }
        report(end);
    }
    Ok(PointSums {
        map: BlockSums {
            block_bytes: bs,
            disk_bytes: size,
            sums,
        },
        from: MapSource::Whole {
            blocks_hashed: hashed,
        },
    })
}

/// Point `point` (an id) of `state`, or an error listing the points there are.
pub fn find_point(state: &DiskState, machine: &str, disk: &str, point: &str) -> Result<Point> {
    Ok(state.point(point).cloned().ok_or_else(|| {
        let known: Vec<&str> = state.points.iter().map(|p| p.id.as_str()).collect();
        ferry_replica::Error::NotFound(format!(
            "no point {point} of disk {disk} of machine {machine} (its points: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })?)
}

/// Disk `disk` of `machine` opened on `store`, its state, and point `point` of it.
pub fn open_at(
    store: &Store,
    vault: &VaultKey,
    machine: &str,
    disk: &str,
    point: &str,
) -> Result<(Disk, DiskState, Point)> {
    let d = store.block(Disk::open(store, machine, disk, Some(vault)))?;
    let state = store.block(d.load_state())?;
    let p = find_point(&state, machine, disk, point)?;
    Ok((d, state, p))
}

/// Refuses a target of `target_bytes` smaller than `disk` of `machine` at `point`.
pub fn check_size(
    target: &Path,
    target_bytes: u64,
    machine: &str,
    disk: &str,
    point: &Point,
) -> Result<()> {
    let size = point.disk_bytes;
    if target_bytes < size {
        return Err(target_err(
            target,
            format!(
                "is {target_bytes} bytes, smaller than disk {disk} of {machine} at point {} ({size} bytes)",
                point.id
            ),
        ));
    }
    Ok(())
}

/// Makes `target` equal to disk `disk` of `machine` at point `point` (an id): see
/// `sync_disk`. The bytes fetched include opening the disk and reading its state.
#[allow(clippy::too_many_arguments)]
pub fn sync_to_point(
    store: &Store,
    vault: &VaultKey,
    machine: &str,
    disk: &str,
    point: &str,
    target: &Path,
    opts: &SyncOptions,
    progress: &dyn Fn(&SyncProgress),
) -> Result<SyncReport> {
    // A store handle of the sync's own, so that its fetched bytes are exactly ours.
    let store = store.counted();
    let (d, state, p) = open_at(&store, vault, machine, disk, point)?;
    let before = store.fetched_bytes();
    let mut report = sync_disk(d, &state, &p, target, opts, progress)?;
    report.bytes_fetched += before;
    Ok(report)
}

/// Makes `target` (a regular file or a block device at least the disk's size) equal
/// to `disk` at `point`: reads it in `READ_BYTES` pieces, hashes each block as the
/// checksum maps do, and rewrites every block whose checksum differs from the
/// point's (zeros for a zero block, else the block read at the point); then syncs,
/// and with `opts.verify` reads it all back. The target is held exclusively
/// throughout. `state` is the disk's state, holding `point`.
pub fn sync_disk(
    mut disk: Disk,
    state: &DiskState,
    point: &Point,
    target: &Path,
    opts: &SyncOptions,
    progress: &dyn Fn(&SyncProgress),
) -> Result<SyncReport> {
    let started = Instant::now();
    let size = point.disk_bytes;
    let bs = disk.info.block_bytes;
    // The target first: a wrong one is refused before anything is fetched.
    let (file, target_bytes) = open_target(target)?;
    check_size(
        target,
        target_bytes,
        &disk.info.machine,
        &disk.info.disk,
        point,
    )?;
    disk.store = disk.store.counted();
    let store = disk.store.clone();
    let temp;
    let dir: &Path = match &opts.work_dir {
        Some(d) => d,
        None => {
            temp = tempfile::Builder::new()
                .prefix("ferry-sync-")
                .tempdir()
                .map_err(io_err("create", Path::new("a temporary directory")))?;
            temp.path()
        }
    };
    let name = disk.info.disk.clone();
    let seed = seed_map(&disk, state, point)?;
    let served = ServedDisk::open(&name, disk, state, point, dir, CACHE_EXTENTS)?;
    let sums = point_sums(seed, &served, bs, progress)?;
    let map = &sums.map;

    let chunk = (READ_BYTES / bs).max(1) * bs;
    let mut buf = vec![0u8; chunk as usize];
    let mut block = vec![0u8; bs as usize];
    let zeros = vec![0u8; bs as usize];
    let (mut differing, mut written) = (0u64, 0u64);
    let mut at = 0u64;
    while at < size {
        let n = chunk.min(size - at);
        file.read_exact_at(&mut buf[..n as usize], at)
            .map_err(io_err("read target", target))?;
        for (i, have) in buf[..n as usize].chunks(bs as usize).enumerate() {
            let off = at + i as u64 * bs;
            let b = off / bs;
            let want = map.sums[b as usize];
            if block_sum(have) == want {
                continue;
            }
            differing += 1;
            let len = have.len();
            let data: &[u8] = if want == ZERO_SUM {
                &zeros[..len]
            } else {
                let got = hash_block(&served, b, bs, size, &mut block)?;
                // The map and the blocks come from different objects: one that
                // disagrees with the other is a fault to report, not to write.
                if got != want {
                    return Err(Error::Fetch {
                        what: format!("block {b} of {name} at point {}", point.id),
                        why: "its content does not match the point's checksum map".into(),
                    });
                }
                &block[..len]
            };
            file.write_all_at(data, off)
                .map_err(io_err("write target", target))?;
            written += len as u64;
        }
        at += n;
        progress(&SyncProgress {
            phase: Phase::Compare,
            done_bytes: at,
            total_bytes: size,
        });
    }
    file.sync_all().map_err(io_err("sync target", target))?;
    let identical = if opts.verify {
        Some(verify(&file, target, map, &mut buf, progress)?)
    } else {
        None
    };
    Ok(SyncReport {
        point: point.id.clone(),
        disk_bytes: size,
        block_bytes: bs,
        blocks: map.sums.len() as u64,
        blocks_differing: differing,
        bytes_written: written,
        bytes_fetched: store.fetched_bytes(),
        map_from: sums.from,
        identical,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Reads the target back (from the device: its cached pages are dropped first) and
/// says whether every block has the map's checksum.
pub(super) fn verify(
    file: &File,
    path: &Path,
    map: &BlockSums,
    buf: &mut [u8],
    progress: &dyn Fn(&SyncProgress),
) -> Result<bool> {
    let (size, bs) = (map.disk_bytes, map.block_bytes);
    // SAFETY: advice on a descriptor held open; failure only leaves the cache.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            0,
            size as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
    let chunk = buf.len() as u64;
    let mut at = 0u64;
    let mut same = true;
    while at < size {
        let n = chunk.min(size - at);
        file.read_exact_at(&mut buf[..n as usize], at)
            .map_err(io_err("read target", path))?;
        for (i, have) in buf[..n as usize].chunks(bs as usize).enumerate() {
            let b = (at / bs) as usize + i;
            same &= block_sum(have) == map.sums[b];
        }
        at += n;
        progress(&SyncProgress {
            phase: Phase::Verify,
            done_bytes: at,
            total_bytes: size,
        });
    }
    Ok(same)
}

#[cfg(test)]
mod tests {
    use super::touched_blocks;

    #[test]
    fn touched_blocks_are_each_block_a_range_reaches_once_in_order() {
        let r = [
            (0, 1),
            (10, 4096),
            (4096, 4097),
            (8191, 8193),
            (20000, 20000),
        ];
        assert_eq!(touched_blocks(&r, 4096), vec![0, 1, 2]);
        assert_eq!(touched_blocks(&[(5000, 3 * 4096 + 1)], 4096), vec![1, 2, 3]);
        assert!(touched_blocks(&[], 4096).is_empty());
    }
}
