//! Failback's reverse rounds by checksum map (issue 16): for a recovered disk that is
//! a plain file (a built disk), which keeps no journal of its writes. Each round
//! hashes the file block by block and sends the blocks whose checksum differs from
//! the previous round's map (the first round's: the forward point P's map,
//! `sync::point_sums`), then keeps the new map locally for the next round.
//!
//! Also here: the checksum map of a served disk as it stands (`served_map`, the
//! final map failback verifies against) and the comparison of a home disk with a
//! map (`first_differing_block`).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_replica::scan::{block_sum, ZERO_SUM};
use ferry_replica::sums::BlockSums;
use ferry_replica::{
    Disk, DiskState, Point, Store, VaultKey, DEFAULT_BLOCK_BYTES, DEFAULT_EXTENT_BYTES,
};

use super::reverse::{
    check_over, forward_machine, over_json, DeltaReport, Over, Round, PIECE_BYTES,
};
use super::saved::replace;
use super::served::ServedDisk;
use super::sync::{point_sums, READ_BYTES};
use super::{io_err, Error, Result};
use crate::nbd::Device;

/// Where a file-sourced disk's last map lives in `state_dir`.
pub fn map_path(state_dir: &Path, disk: &str) -> PathBuf {
    state_dir.join(format!("{disk}.reverse-map"))
}

/// Where a round's new map waits while its point is committed: renamed to
/// `map_path` after the commit.
pub fn pending_map_path(state_dir: &Path, disk: &str) -> PathBuf {
    state_dir.join(format!("{disk}.reverse-map.pending"))
}

/// A map file `save_map` wrote, when it belongs to this reverse disk over this
/// point, with the point seq its header names; None when absent or of another
/// reverse disk.
fn read_map(
    path: &Path,
    over: &Over,
    reverse_disk_id: &str,
) -> Result<Option<(BlockSums, Option<u64>)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let bad = |why: String| Error::Overlay {
        path: path.display().to_string(),
        why,
    };
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| bad("holds no header line".into()))?;
    let head: serde_json::Value =
        serde_json::from_slice(&bytes[..nl]).map_err(|e| bad(format!("header: {e}")))?;
    if head["over"] != over_json(over) {
        return Err(bad(format!("is a map over something else than {over}")));
    }
    if head["reverse_disk_id"].as_str() != Some(reverse_disk_id) {
        return Ok(None);
    }
    let map = BlockSums::parse(&path.display().to_string(), &bytes[nl + 1..])?;
    Ok(Some((map, head["point_seq"].as_u64())))
}

/// The map of the last round committed, when it belongs to this reverse disk over
/// this point; None otherwise (the first round, or a reverse replica made anew: the
/// round then compares with P's map and sends everything since failover). A pending
/// map (a round killed between its commit and the rename) is that map when its
/// point is in `state` (the commit landed), and is dropped when not.
fn load_map(
    state_dir: &Path,
    disk: &str,
    over: &Over,
    reverse_disk_id: &str,
    state: &DiskState,
) -> Result<Option<BlockSums>> {
    let saved = map_path(state_dir, disk);
    let pending = pending_map_path(state_dir, disk);
    if let Some((map, seq)) = read_map(&pending, over, reverse_disk_id)? {
        if seq.is_some_and(|s| state.points.iter().any(|p| p.seq == s)) {
            std::fs::rename(&pending, &saved).map_err(io_err("rename", &pending))?;
            return Ok(Some(map));
        }
    }
    match std::fs::remove_file(&pending) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err("remove", &pending)(e))
        }
        _ => {}
    }
    Ok(read_map(&saved, over, reverse_disk_id)?.map(|(m, _)| m))
}

/// Writes a map file (aside, then renamed), with the seq of the point it describes
/// when that point is still to be committed.
fn save_map(
    path: &Path,
    over: &Over,
    reverse_disk_id: &str,
    map: &BlockSums,
    point_seq: Option<u64>,
) -> Result<()> {
    let head = serde_json::json!({
        "over": over_json(over),
        "reverse_disk_id": reverse_disk_id,
        "point_seq": point_seq,
    });
    let mut bytes = head.to_string().into_bytes();
    bytes.push(b'\n');
    bytes.extend_from_slice(&map.header());
    bytes.extend_from_slice(map.sums.as_flattened());
    replace(path, &bytes)
}

/// One round of reverse replication for `file` (a recovered disk as a raw file,
/// equal to forward point `over_point` of `disk` at failover): hashes it, sends the
/// blocks whose checksum differs from the last round's map (saved in `state_dir`;
/// without one, `first_map()`, P's map) as the next point of `reverse_machine`.
/// The new map is written (pending, naming the point's seq) before the commit and
/// renamed into place after it: a round killed in between finds its point committed
/// and takes that map, where the older map would miss a block changed in the lost
/// round and back again since; killed before the commit, it drops the map. With
/// `last` the new map is stored and named by the point (failback's final map).
#[allow(clippy::too_many_arguments)]
pub fn send_file_delta(
    file: &Path,
    disk: &str,
    over_point: &Point,
    store: &Store,
    vault: &VaultKey,
    reverse_machine: &str,
    state_dir: &Path,
    first_map: &dyn Fn() -> Result<BlockSums>,
    last: bool,
) -> Result<DeltaReport> {
    let over = Over {
        machine: forward_machine(reverse_machine)?.to_string(),
        disk: disk.to_string(),
        point: over_point.id.clone(),
        seq: over_point.seq,
    };
    let size = over_point.disk_bytes;
    let f = std::fs::File::open(file).map_err(io_err("open", file))?;
    let file_bytes = f.metadata().map_err(io_err("stat", file))?.len();
    if file_bytes < size {
        return Err(Error::Target {
            path: file.display().to_string(),
            why: format!("is {file_bytes} bytes, smaller than {over} ({size} bytes)"),
        });
    }
    let d = store.block(Disk::open_or_create(
        store,
        reverse_machine,
        disk,
        vault,
        DEFAULT_BLOCK_BYTES,
        DEFAULT_EXTENT_BYTES,
    ))?;
    let state = store.block(d.load_state())?;
    check_over(&d, &state, &over)?;
    ferry_replica::local::create_private_dir(state_dir).map_err(io_err("create", state_dir))?;
    let saved = map_path(state_dir, disk);
    let prev = match load_map(state_dir, disk, &over, &d.info.disk_id, &state)? {
        Some(m) => m,
        None => first_map()?,
    };
    if prev.disk_bytes != size {
        return Err(Error::Overlay {
            path: saved.display().to_string(),
            why: format!("the map is of {} bytes, the disk {size}", prev.disk_bytes),
        });
    }
    let bs = prev.block_bytes;
    let mut report = DeltaReport {
        ranges: 0,
        bytes_data: 0,
        bytes_zero: 0,
        bytes_sent: 0,
        point_id: String::new(),
        cursor: 0,
        at: 0,
    };
    let mut next = BlockSums {
        block_bytes: bs,
        disk_bytes: size,
        sums: Vec::with_capacity(prev.sums.len()),
    };
    let mut round = Round::new(&d, state);
    // A run of differing blocks becomes one record (up to PIECE_BYTES): the bytes
    // read are the bytes hashed, so the map saved describes exactly what was sent.
    let mut pending: Option<(u64, Option<Vec<u8>>, u64)> = None;
    let chunk = (READ_BYTES / bs).max(1) * bs;
    let mut buf = vec![0u8; chunk as usize];
    let mut at = 0u64;
    while at < size {
        let n = chunk.min(size - at);
        f.read_exact_at(&mut buf[..n as usize], at)
            .map_err(io_err("read", file))?;
        for (i, have) in buf[..n as usize].chunks(bs as usize).enumerate() {
            let off = at + i as u64 * bs;
            let sum = block_sum(have);
            let b = (off / bs) as usize;
            next.sums.push(sum);
            if prev.sums[b] == sum {
                continue;
            }
            let zero = sum == ZERO_SUM;
            let len = have.len() as u64;
            let extends = match &pending {
                Some((o, data, l)) => {
                    o + l == off && data.is_none() == zero && (zero || l + len <= PIECE_BYTES)
                }
                None => false,
            };
            if extends {
                if let Some((_, data, l)) = pending.as_mut() {
                    if let Some(bytes) = data {
                        bytes.extend_from_slice(have);
                    }
                    *l += len;
                }
                continue;
            }
            if let Some(w) = pending.take() {
                count(&mut report, &w);
                round.push(w)?;
            }
            pending = Some((off, (!zero).then(|| have.to_vec()), len));
        }
        at += n;
    }
    if let Some(w) = pending.take() {
        count(&mut report, &w);
        round.push(w)?;
    }
    let pending_map = pending_map_path(state_dir, disk);
    save_map(
        &pending_map,
        &over,
        &d.info.disk_id,
        &next,
        Some(round.point_seq()),
    )?;
    let (point_id, when) = round.finish(&over, size, last.then_some(&next))?;
    report.point_id = point_id;
    report.at = when;
    report.bytes_sent = round.sent;
    std::fs::rename(&pending_map, &saved).map_err(io_err("rename", &pending_map))?;
    Ok(report)
}

fn count(report: &mut DeltaReport, w: &(u64, Option<Vec<u8>>, u64)) {
    report.ranges += 1;
    match w.1 {
        Some(_) => report.bytes_data += w.2,
        None => report.bytes_zero += w.2,
    }
}

/// The checksum map of `served` as it reads now (a frozen disk: failback's final
/// map): the forward point's map (`seed`, from `sync::seed_map`, patched with its
/// log's blocks read through `served`, as `point_sums` does), then every block the
/// overlay ever wrote re-hashed from `served`. Reads only what the log and the
/// overlay touched, locally but for log blocks not yet hydrated.
pub fn served_map(
    served: &ServedDisk,
    seed: Option<(String, BlockSums)>,
    block_bytes: u64,
) -> Result<BlockSums> {
    let mut map = point_sums(seed, served, block_bytes, &|_| {})?.map;
    let size = map.disk_bytes;
    let overlay = served.overlay();
    let end = overlay.synced_journal_bytes().map_err(|e| Error::Io {
        op: "sync the overlay of",
        path: served.name().to_string(),
        source: e,
    })?;
    // One bit per block: bounded by the disk, however long the journal grew.
    let blocks = map.sums.len() as u64;
    let mut touched = vec![0u64; blocks.div_ceil(64) as usize];
    overlay.journal_records(0, end, |offset, len, _| {
        let e = offset.saturating_add(len).min(size);
        if offset < e {
            for b in offset / block_bytes..=(e - 1) / block_bytes {
                touched[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
    })?;
    let mut buf = vec![0u8; block_bytes as usize];
    for b in (0..blocks).filter(|b| touched[(b / 64) as usize] & (1 << (b % 64)) != 0) {
        let at = b * block_bytes;
        let n = block_bytes.min(size - at) as usize;
        served.read(at, &mut buf[..n]).map_err(|e| Error::Io {
            op: "read the served disk",
            path: format!("{} at {at}", served.name()),
            source: e,
        })?;
        map.sums[b as usize] = block_sum(&buf[..n]);
    }
    Ok(map)
}

/// The first block of `target` (its first `map.disk_bytes` bytes, read from the
/// device: cached pages are dropped first) whose checksum differs from `map`'s;
/// None when all match.
pub fn first_differing_block(target: &Path, map: &BlockSums) -> Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(target).map_err(io_err("open", target))?;
    let (size, bs) = (map.disk_bytes, map.block_bytes);
    // SAFETY: advice on a descriptor held open; failure only leaves the cache.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            0,
            size as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
    let chunk = (READ_BYTES / bs).max(1) * bs;
    let mut buf = vec![0u8; chunk as usize];
    let mut at = 0u64;
    while at < size {
        let n = chunk.min(size - at);
        f.read_exact_at(&mut buf[..n as usize], at)
            .map_err(io_err("read", target))?;
        for (i, have) in buf[..n as usize].chunks(bs as usize).enumerate() {
            let b = at / bs + i as u64;
            if block_sum(have) != map.sums[b as usize] {
                return Ok(Some(b));
            }
        }
        at += n;
    }
    Ok(None)
}

/// The final map that point `point` of reverse disk `disk` names (failback's last
/// round); None when the point names none (a round that was not the last: the
/// recovery site was lost before it).
pub fn final_map(
    store: &Store,
    vault: &VaultKey,
    reverse_machine: &str,
    disk: &str,
    point: &str,
) -> Result<Option<BlockSums>> {
    let d = store.block(Disk::open(store, reverse_machine, disk, Some(vault)))?;
    let state = store.block(d.load_state())?;
    let p = state.point(point).ok_or_else(|| Error::Reverse {
        disk: d.paths.label(),
        why: format!("has no point {point}"),
    })?;
    match p.sums.as_deref() {
        Some(object) => Ok(Some(store.block(BlockSums::load(&d, object))?)),
        None => Ok(None),
    }
}
