//! Syncing a home disk to a point across the sites (failback's reprotect, issue 16):
//! what `sync::sync_disk` does on one host, split so that neither the point's log
//! nor its base crosses the sites. Making the point's checksum map needs the blocks
//! the log wrote since the newest seed map, on a full disk the whole disk: that is
//! done at the recovery site, beside the store, and only maps and the differing
//! blocks travel, sealed under the reverse replica's key in its exchange area
//! (`machines/M.reverse/disks/D/sync/`, docs/storage-format.md).
//!
//! 1. `home_map`, at home: the home disk hashed block by block at the point's size;
//!    its map stored.
//! 2. `point_diff`, at the recovery site: the point's map (`sync::point_sums`: a seed
//!    map patched with the log's blocks, read through a `ServedDisk`), compared with
//!    the home map; the point's map stored, and the point's bytes of every block that
//!    differs sealed as segments (a block zero at the point as a zero record).
//! 3. `write_diff`, at home: the segments written onto the home disk, then the disk
//!    read back against the point's map.
//!
//! What crosses: two maps (16 bytes a block each) and the blocks that differ. The
//! home disk is held exclusively within each step, not between them: whatever wrote
//! it in between is caught by step 3's read-back, which fails the sync (run again, it
//! starts from step 1).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use ferry_replica::keys::random_hex;
use ferry_replica::object::{open_object, Expect, ObjectKind, OpenContext, SealContext};
use ferry_replica::rebuild::zero_range;
use ferry_replica::record::decode_records;
use ferry_replica::scan::{block_sum, ZERO_SUM};
use ferry_replica::sums::BlockSums;
use ferry_replica::writer::{seal_segment_as, Payload, Write};
use ferry_replica::{
    Disk, DiskState, Point, Store, VaultKey, DEFAULT_BLOCK_BYTES, DEFAULT_EXTENT_BYTES,
};

use super::reverse::{reverse_machine, PIECE_BYTES, SEGMENT_DATA_BYTES, SEGMENT_RECORDS};
use super::served::ServedDisk;
use super::sync::{
    check_size, hash_block, open_at, open_target, point_sums, seed_map, verify, MapSource, Phase,
    SyncProgress, SyncReport, CACHE_EXTENTS, READ_BYTES,
};
use super::{io_err, Error, Result};

/// The disk and point a sync across the sites is of: forward disk `disk` of
/// `machine` at point `point` (an id), read with `vault` from `store`.
#[derive(Clone, Copy)]
pub struct At<'a> {
    pub store: &'a Store,
    pub vault: &'a VaultKey,
    pub machine: &'a str,
    pub disk: &'a str,
    pub point: &'a str,
}

impl At<'_> {
    /// A store handle of the step's own (its fetched bytes are exactly the step's).
    fn counted(&self) -> Store {
        self.store.counted()
    }

    /// The forward disk opened on `store`, its state, and the point.
    fn open(&self, store: &Store) -> Result<(Disk, DiskState, Point)> {
        open_at(store, self.vault, self.machine, self.disk, self.point)
    }

    /// The reverse replica's disk on `store`, made when absent: the exchange area
    /// lives in it, and a failback's commit deletes it whole.
    fn reverse(&self, store: &Store) -> Result<Disk> {
        let rev = reverse_machine(self.machine)?;
        Ok(store.block(Disk::open_or_create(
            store,
            &rev,
            self.disk,
            self.vault,
            DEFAULT_BLOCK_BYTES,
            DEFAULT_EXTENT_BYTES,
        ))?)
    }
}

/// What a step stored for the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchanged {
    /// The checksum map stored: the home disk's (`home_map`), the point's (`point_diff`).
    pub map: String,
    /// `point_diff`: how many segments of the point's bytes of the blocks that differ
    /// it stored (`segment_name`).
    pub segments: u64,
    pub blocks: u64,
    /// `point_diff`: blocks whose checksums differ (data and zero).
    pub blocks_differing: u64,
    /// `point_diff`: bytes of the point's data sent, and of zero records.
    pub bytes_data: u64,
    pub bytes_zero: u64,
    pub bytes_fetched: u64,
    pub bytes_stored: u64,
}

/// What an exchange object is, the end of its name: the home disk's map, the
/// point's map, and the segments of the point's blocks (named after the point's map).
pub const HOME_MAP: &str = "home.sum";
pub const POINT_MAP: &str = "point.sum";
const SEGMENT: &str = "seg";

/// Refuses an object that is not an exchange object of `rev` for `point` of kind
/// `ext` (`HOME_MAP`, `POINT_MAP`): the name is sealed into the object, so this binds
/// what is read to the point and its role (a home map given as the point's would
/// verify the home disk against itself).
fn check_exchange(rev: &Disk, point: &str, object: &str, ext: &str) -> Result<()> {
    let ok = object
        .strip_prefix(&rev.paths.exchange_dir())
        .and_then(|rest| rest.strip_prefix(point))
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|rest| rest.strip_suffix(&format!(".{ext}")))
        .is_some_and(|uid| !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        return Ok(());
    }
    Err(Error::Reverse {
        disk: rev.paths.label(),
        why: format!("{object} is not an exchange object ({ext}) of a sync to point {point}"),
    })
}

/// The name of segment `n` (from 1) of the point's blocks stored with the point's
/// map `point_map`: a report then carries a count, not a list as long as the data.
pub fn segment_name(point_map: &str, n: u64) -> String {
    let base = point_map
        .strip_suffix(&format!(".{POINT_MAP}"))
        .unwrap_or(point_map);
    format!("{base}-{n:08}.{SEGMENT}")
}

/// Step 1, at home: hashes `target` at the size of `disk` of `machine` at `point`,
/// held exclusively, and stores the map. Refuses a target smaller than the disk.
pub fn home_map(at: &At, target: &Path, progress: &dyn Fn(&SyncProgress)) -> Result<Exchanged> {
    let store = at.counted();
    let (fwd, _, p) = at.open(&store)?;
    let (file, target_bytes) = open_target(target)?;
    check_size(target, target_bytes, at.machine, at.disk, &p)?;
    let map = hash_target(&file, target, p.disk_bytes, fwd.info.block_bytes, progress)?;
    drop(file);
    let rev = at.reverse(&store)?;
    let object = rev.paths.exchange(&p.id, &random_hex(8), HOME_MAP);
    let bytes = map.seal_as(&rev, &mut SealContext::new(1), &object)?;
    let stored = bytes.len() as u64;
    store.block(rev.upload(&object, bytes.into()))?;
    Ok(Exchanged {
        map: object,
        segments: 0,
        blocks: map.sums.len() as u64,
        blocks_differing: 0,
        bytes_data: 0,
        bytes_zero: 0,
        bytes_fetched: store.fetched_bytes(),
        bytes_stored: stored,
    })
}

/// The checksum map of the first `size` bytes of `file`, read in `READ_BYTES` pieces.
fn hash_target(
    file: &File,
    path: &Path,
    size: u64,
    bs: u64,
    progress: &dyn Fn(&SyncProgress),
) -> Result<BlockSums> {
    let chunk = (READ_BYTES / bs).max(1) * bs;
    let mut buf = vec![0u8; chunk as usize];
    let mut sums = Vec::with_capacity(BlockSums::blocks_for(size, bs));
    let mut at = 0u64;
    while at < size {
        let n = chunk.min(size - at);
        file.read_exact_at(&mut buf[..n as usize], at)
            .map_err(io_err("read target", path))?;
        sums.extend(buf[..n as usize].chunks(bs as usize).map(block_sum));
        at += n;
        progress(&SyncProgress {
            phase: Phase::Home,
            done_bytes: at,
            total_bytes: size,
        });
    }
    Ok(BlockSums {
        block_bytes: bs,
        disk_bytes: size,
        sums,
    })
}

/// Seals writes into exchange segments as they come, one segment in memory at a
/// time (`SEGMENT_DATA_BYTES`, `SEGMENT_RECORDS`), each uploaded when full and
/// named after the point's map (`segment_name`).
struct Segments<'a> {
    rev: &'a Disk,
    map: &'a str,
    ctx: SealContext,
    seq: u64,
    writes: Vec<(u64, Option<Vec<u8>>, u64)>,
    data_bytes: u64,
    count: u64,
    stored: u64,
}

impl Segments<'_> {
    fn push(&mut self, at: u64, data: Option<Vec<u8>>, len: u64) -> Result<()> {
        let more = data.as_ref().map_or(0, |d| d.len() as u64);
        if !self.writes.is_empty()
            && (self.data_bytes + more > SEGMENT_DATA_BYTES || self.writes.len() >= SEGMENT_RECORDS)
        {
            self.flush()?;
        }
        self.data_bytes += more;
        self.writes.push((at, data, len));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.writes.is_empty() {
            return Ok(());
        }
        let mut writes = Vec::with_capacity(self.writes.len());
        for (offset, data, len) in &self.writes {
            self.seq += 1;
            writes.push(Write {
                seq: self.seq,
                offset: *offset,
                payload: match data {
                    Some(d) => Payload::Data(d),
                    None => Payload::Zero(*len),
                },
            });
        }
        let object = segment_name(self.map, self.count + 1);
        let sealed = seal_segment_as(self.rev, &mut self.ctx, &writes, object.clone())?;
        self.stored += sealed.bytes.len() as u64;
        let rev = self.rev;
        rev.store.block(rev.upload(&object, sealed.bytes.into()))?;
        self.count += 1;
        self.writes.clear();
        self.data_bytes = 0;
        Ok(())
    }
}

/// Step 2, at the recovery site: makes the map of `disk` of `machine` at `point`
/// (decoding its log into `scratch`), compares it with the home map `home_map`, and
/// stores the point's map and the point's bytes of every block that differs.
pub fn point_diff(
    at: &At,
    home_map: &str,
    scratch: &Path,
    progress: &dyn Fn(&SyncProgress),
) -> Result<Exchanged> {
    let store = at.counted();
    let (fwd, state, p) = at.open(&store)?;
    let rev = at.reverse(&store)?;
    let disk = at.disk;
    check_exchange(&rev, &p.id, home_map, HOME_MAP)?;
    let home = store.block(BlockSums::load(&rev, home_map))?;
    let (size, bs) = (p.disk_bytes, fwd.info.block_bytes);
    if home.block_bytes != bs || home.disk_bytes != size {
        return Err(Error::Reverse {
            disk: rev.paths.label(),
            why: format!(
                "home map {home_map} is of {} bytes in blocks of {}, the point of {size} in blocks of {bs}",
                home.disk_bytes, home.block_bytes
            ),
        });
    }
    let seed = seed_map(&fwd, &state, &p)?;
    let served = ServedDisk::open(disk, fwd, &state, &p, scratch, CACHE_EXTENTS)?;
    let map = point_sums(seed, &served, bs, progress)?.map;

    let mut ctx = SealContext::new(1);
    let map_object = rev.paths.exchange(&p.id, &random_hex(8), POINT_MAP);
    let bytes = map.seal_as(&rev, &mut ctx, &map_object)?;
    let map_stored = bytes.len() as u64;
    store.block(rev.upload(&map_object, bytes.into()))?;

    let mut out = Segments {
        rev: &rev,
        map: &map_object,
        ctx,
        seq: 0,
        writes: Vec::new(),
        data_bytes: 0,
        count: 0,
        stored: map_stored,
    };
    let (mut differing, mut bytes_data, mut bytes_zero) = (0u64, 0u64, 0u64);
    let blocks = map.sums.len();
    let differs = |b: usize| map.sums[b] != home.sums[b];
    let mut block = vec![0u8; bs as usize];
    let mut b = 0usize;
    while b < blocks {
        if !differs(b) {
            b += 1;
            continue;
        }
        // A run of differing blocks of one kind; a data run at most a piece long.
        let zero = map.sums[b] == ZERO_SUM;
        let start = b;
        let most = (PIECE_BYTES / bs).max(1) as usize;
        while b < blocks
            && differs(b)
            && (map.sums[b] == ZERO_SUM) == zero
            && (zero || b - start < most)
        {
            b += 1;
        }
        differing += (b - start) as u64;
        let at = start as u64 * bs;
        let end = (b as u64 * bs).min(size);
        if zero {
            bytes_zero += end - at;
            out.push(at, None, end - at)?;
        } else {
            let mut data = Vec::with_capacity((end - at) as usize);
            for i in start..b {
                let got = hash_block(&served, i as u64, bs, size, &mut block)?;
                // The seed map and the base are different objects: one that
                // disagrees with the other is a fault to report, not to send.
                if got != map.sums[i] {
                    return Err(Error::Fetch {
                        what: format!("block {i} of {disk} at point {}", p.id),
                        why: "its content does not match the point's checksum map".into(),
                    });
                }
                let n = bs.min(size - i as u64 * bs) as usize;
                data.extend_from_slice(&block[..n]);
            }
            bytes_data += end - at;
            out.push(at, Some(data), end - at)?;
        }
        progress(&SyncProgress {
            phase: Phase::Compare,
            done_bytes: end,
            total_bytes: size,
        });
    }
    out.flush()?;
    let (segments, stored) = (out.count, out.stored);
    Ok(Exchanged {
        map: map_object,
        segments,
        blocks: blocks as u64,
        blocks_differing: differing,
        bytes_data,
        bytes_zero,
        bytes_fetched: store.fetched_bytes(),
        bytes_stored: stored,
    })
}

/// Step 3, at home: writes the records of the `segments` segments stored with the
/// point's map `map_object` onto `target` (held exclusively), syncs it, and reads it
/// back against that map.
pub fn write_diff(
    at: &At,
    target: &Path,
    map_object: &str,
    segments: u64,
    progress: &dyn Fn(&SyncProgress),
) -> Result<SyncReport> {
    let At {
        vault,
        machine,
        disk,
        point,
        ..
    } = *at;
    let started = Instant::now();
    let store = at.counted();
    let rev = store.block(Disk::open(
        &store,
        &reverse_machine(machine)?,
        disk,
        Some(vault),
    ))?;
    check_exchange(&rev, point, map_object, POINT_MAP)?;
    let map = store.block(BlockSums::load(&rev, map_object))?;
    let (size, bs) = (map.disk_bytes, map.block_bytes);
    let (file, target_bytes) = open_target(target)?;
    if target_bytes < size {
        return Err(Error::Target {
            path: target.display().to_string(),
            why: format!(
                "is {target_bytes} bytes, smaller than disk {disk} of {machine} at point {point} ({size} bytes)"
            ),
        });
    }
    let shown = target.display().to_string();
    let key = rev.key()?;
    let mut ctx = OpenContext::default();
    let (mut blocks_differing, mut written) = (0u64, 0u64);
    for n in 1..=segments {
        let seg = &segment_name(map_object, n);
        let mut buf: Vec<u8> = store.block(store.get(seg))?.into();
        let expect = Expect {
            key,
            disk_id: &rev.disk_id,
            kind: ObjectKind::Segment,
            name: seg,
        };
        open_object(&expect, &mut buf, &mut ctx, |chunk| {
            decode_records(
                chunk,
                |r| {
                    if r.offset.checked_add(r.len).is_none_or(|end| end > size) {
                        return Err(ferry_replica::Error::corrupt(
                            seg,
                            format!("record past the disk's {size} bytes"),
                        ));
                    }
                    match r.data {
                        Some(b) => file.write_all_at(b, r.offset),
                        None => zero_range(&file, r.offset, r.len),
                    }
                    .map_err(|e| ferry_replica::Error::io("write target", shown.clone(), e))?;
                    blocks_differing += r.len.div_ceil(bs);
                    written += r.len;
                    Ok(())
                },
                seg,
            )
        })?;
        // Bytes written of the disk's: the pass reads as far as the disk is rewritten.
        progress(&SyncProgress {
            phase: Phase::Write,
            done_bytes: written,
            total_bytes: size,
        });
    }
    file.sync_all().map_err(io_err("sync target", target))?;
    let chunk = (READ_BYTES / bs).max(1) * bs;
    let mut buf = vec![0u8; chunk as usize];
    let identical = verify(&file, target, &map, &mut buf, progress)?;
    Ok(SyncReport {
        point: point.to_string(),
        disk_bytes: size,
        block_bytes: bs,
        blocks: map.sums.len() as u64,
        blocks_differing,
        bytes_written: written,
        bytes_fetched: store.fetched_bytes(),
        map_from: MapSource::Stored {
            object: map_object.to_string(),
        },
        identical: Some(identical),
        seconds: started.elapsed().as_secs_f64(),
    })
}
