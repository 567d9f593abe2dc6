//! One disk of a recovery point, served without rebuilding it: see the module doc of
//! `recover` for the layers. Files in the overlay directory, per disk:
//! `{disk}.point.json` (which disk and point the directory holds; a restart at another
//! point is refused rather than mixing overlays), `{disk}.overlay` and
//! `{disk}.journal` (the overlay), `{disk}.log` and `{disk}.log-index` (log data
//! decoded at the first start and its index, reused by later starts: `log`, `saved`),
//! `{disk}.base.json` (the point and its base extents, for a start without the
//! store), `{disk}.hydrated` and `{disk}.hydrated-map` (the base copied locally, one
//! byte per extent, set once the extent's data is synced).

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_replica::meta::ExtentRef;
use ferry_replica::object::{open_object, Expect, ObjectKind, OpenContext};
use ferry_replica::rebuild::zero_range;
use ferry_replica::record::decode_records;
use ferry_replica::{Disk, DiskState, Point};

use super::flight::{Flight, SingleFlight};
use super::log::{decode_log, default_workers, LogSpec};
use super::overlay::Overlay;
use super::ranges::{RangeMap, Src};
use super::saved::{
    base_path, index_path, load_base, load_index, save_base, save_index, SavedBase,
};
use super::{io_err, Error, Result};
use crate::nbd::{Device, Piece};

/// What a served disk has done, for progress lines and the status file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStatus {
    pub disk: String,
    pub point: String,
    pub disk_bytes: u64,
    /// Base extents the point has (absent extents are zero and need no copy).
    pub extents: u64,
    pub hydrated_extents: u64,
    /// Objects fetched from the store since start (extents for reads and hydration).
    pub fetched_objects: u64,
    /// Bytes written through the export since the point was first served.
    pub overlay_bytes: u64,
}

/// Decoded extents kept in memory, least recently used first out.
struct Lru {
    cap: usize,
    map: HashMap<u64, Arc<Vec<u8>>>,
    order: VecDeque<u64>,
}

impl Lru {
    fn get(&mut self, idx: u64) -> Option<Arc<Vec<u8>>> {
        let hit = self.map.get(&idx).cloned()?;
        self.order.retain(|i| *i != idx);
        self.order.push_back(idx);
        Some(hit)
    }

    fn put(&mut self, idx: u64, data: Arc<Vec<u8>>) {
        if self.cap == 0 || self.map.contains_key(&idx) {
            return;
        }
        while self.map.len() >= self.cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
        }
        self.map.insert(idx, data);
        self.order.push_back(idx);
    }
}

pub struct ServedDisk {
    name: String,
    /// None when reopened from the directory alone (`open_local`): every extent is
    /// hydrated then, so nothing is fetched.
    disk: Option<Disk>,
    point: Point,
    extent_bytes: u64,
    /// Base extents by index.
    extents: HashMap<u64, ExtentRef>,
    log: RangeMap,
    log_file: File,
    log_path: PathBuf,
    cache: Mutex<Lru>,
    /// Extent fetches in flight, so that concurrent readers of one share it.
    fetching: SingleFlight<Arc<Vec<u8>>>,
    hydrated: Vec<AtomicBool>,
    hydrated_file: File,
    hydrated_path: PathBuf,
    map_file: File,
    map_path: PathBuf,
    overlay: Overlay,
    fetched: AtomicU64,
}

fn other(e: Error) -> io::Error {
    io::Error::other(e.to_string())
}

fn open_rw(path: &Path, truncate: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)
        .map_err(io_err("open", path))
}

impl ServedDisk {
    /// Prepares disk `name` at `point` with its files in `dir`: decodes the log
    /// segments up to the point (the base is fetched only as reads need it), replays
    /// the overlay and the hydration map. `cache_extents` bounds the in-memory cache.
    pub fn open(
        name: &str,
        disk: Disk,
        state: &DiskState,
        point: &Point,
        dir: &Path,
        cache_extents: usize,
    ) -> Result<ServedDisk> {
        disk.key()?;
        let label = disk.paths.label();
        if let Some(b) = &state.base {
            if point.seq < b.seq {
                return Err(ferry_replica::Error::Invalid(format!(
                    "point {} of disk {label} was compacted away (base is at {})",
                    point.id, b.seq
                ))
                .into());
            }
        }
        ferry_replica::local::create_private_dir(dir).map_err(io_err("create", dir))?;
        check_identity(dir, name, &disk, point)?;
        let extent_bytes = state
            .base
            .as_ref()
            .map_or(disk.info.extent_bytes, |b| b.extent_bytes);
        let size = point.disk_bytes;
        let count = size.div_ceil(extent_bytes) as usize;
        // Extents past the point's size (the disk shrank after the base) are never read.
        let extents: HashMap<u64, ExtentRef> = state
            .base
            .iter()
            .flat_map(|b| &b.extents)
            .filter(|e| e.index < count as u64)
            .map(|e| (e.index, e.clone()))
            .collect();

        save_base(
            &base_path(dir, name),
            &SavedBase {
                point: point.clone(),
                extent_bytes,
                extents: extents.values().cloned().collect(),
            },
        )?;

        // The log as an earlier start at this point left it, or decoded now (and its
        // index saved once the data is synced, so a crash leaves no index to trust).
        let log_path = dir.join(format!("{name}.log"));
        let index = index_path(dir, name);
        let log_file = open_rw(&log_path, false)?;
        let log_len = log_file
            .metadata()
            .map_err(io_err("stat", &log_path))?
            .len();
        let log = match load_index(&index, point, log_len) {
            Some(log) => log,
            None => {
                match std::fs::remove_file(&index) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io_err("remove", &index)(e))
                    }
                    _ => {}
                }
                log_file.set_len(0).map_err(io_err("truncate", &log_path))?;
                let floor = state.base.as_ref().map_or(0, |b| b.seq + 1);
                let segments: Vec<String> = state
                    .segments_up_to(point.seq)
                    .map(|s| s.object.clone())
                    .collect();
                let spec = LogSpec {
                    disk: &disk,
                    segments: &segments,
                    floor,
                    seq: point.seq,
                    size,
                };
                let log = decode_log(&spec, default_workers(), &log_file, &log_path)?;
                log_file.sync_data().map_err(io_err("sync", &log_path))?;
                save_index(&index, point, &log)?;
                log
            }
        };
        let parts = Parts {
            name,
            disk: Some(disk),
            point,
            dir,
            extent_bytes,
            extents,
            log,
            log_file,
            log_path,
            cache_extents,
        };
        parts.assemble()
    }

    /// Reopens disk `name` from what `dir` holds alone, without the store: only once
    /// an earlier start saved its log index and hydration copied every base extent.
    /// For a restart while the store is unreachable.
    pub fn open_local(name: &str, dir: &Path, cache_extents: usize) -> Result<ServedDisk> {
        let SavedBase {
            point,
            extent_bytes,
            extents,
        } = load_base(&base_path(dir, name))?;
        let log_path = dir.join(format!("{name}.log"));
        let log_file = open_rw(&log_path, false)?;
        let log_len = log_file
            .metadata()
            .map_err(io_err("stat", &log_path))?
            .len();
        let index = index_path(dir, name);
        let log = load_index(&index, &point, log_len).ok_or_else(|| Error::Overlay {
            path: index.display().to_string(),
            why: format!(
                "no whole log index of point {}: the store is needed",
                point.id
            ),
        })?;
        let served = Parts {
            name,
            disk: None,
            point: &point,
            dir,
            extent_bytes,
            extents: extents.into_iter().map(|e| (e.index, e)).collect(),
            log,
            log_file,
            log_path,
            cache_extents,
        }
        .assemble()?;
        let left = served.to_hydrate();
        if let Some(first) = left.first() {
            return Err(Error::Overlay {
                path: served.map_path.display().to_string(),
                why: format!(
                    "{} extents of {name} (the first: {first}) are not hydrated yet: the store is needed",
                    left.len()
                ),
            });
        }
        Ok(served)
    }
}

/// What both ways of opening a served disk have found, put together with the local
/// files every served disk has (the hydrated copy and its map, the overlay).
struct Parts<'a> {
    name: &'a str,
    disk: Option<Disk>,
    point: &'a Point,
    dir: &'a Path,
    extent_bytes: u64,
    extents: HashMap<u64, ExtentRef>,
    log: RangeMap,
    log_file: File,
    log_path: PathBuf,
    cache_extents: usize,
}

impl Parts<'_> {
    fn assemble(self) -> Result<ServedDisk> {
        let Parts {
            name,
            disk,
            point,
            dir,
            extent_bytes,
            extents,
            log,
            log_file,
            log_path,
            cache_extents,
        } = self;
        let size = point.disk_bytes;
        let count = size.div_ceil(extent_bytes) as usize;
        let hydrated_path = dir.join(format!("{name}.hydrated"));
        let hydrated_file = open_rw(&hydrated_path, false)?;
        hydrated_file
            .set_len(size)
            .map_err(io_err("size", &hydrated_path))?;
        let map_path = dir.join(format!("{name}.hydrated-map"));
        let map_file = open_rw(&map_path, false)?;
        let mut map = vec![0u8; count];
        let have = map_file
            .metadata()
            .map_err(io_err("stat", &map_path))?
            .len() as usize;
        map_file
            .read_exact_at(&mut map[..have.min(count)], 0)
            .map_err(io_err("read", &map_path))?;
        let hydrated = map.iter().map(|b| AtomicBool::new(*b == 1)).collect();
        let overlay = Overlay::open(dir, name, size)?;
        Ok(ServedDisk {
            name: name.to_string(),
            disk,
            point: point.clone(),
            extent_bytes,
            extents,
            log,
            log_file,
            log_path,
            cache: Mutex::new(Lru {
                cap: cache_extents,
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            fetching: SingleFlight::default(),
            hydrated,
            hydrated_file,
            hydrated_path,
            map_file,
            map_path,
            overlay,
            fetched: AtomicU64::new(0),
        })
    }
}

impl ServedDisk {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    pub fn status(&self) -> DiskStatus {
        DiskStatus {
            disk: self.name.clone(),
            point: self.point.id.clone(),
            disk_bytes: self.point.disk_bytes,
            extents: self.extents.len() as u64,
            hydrated_extents: self
                .extents
                .keys()
                .filter(|i| self.is_hydrated(**i))
                .count() as u64,
            fetched_objects: self.fetched.load(Ordering::Relaxed),
            overlay_bytes: self.overlay.written_bytes(),
        }
    }

    fn is_hydrated(&self, idx: u64) -> bool {
        self.hydrated
            .get(idx as usize)
            .is_some_and(|h| h.load(Ordering::Acquire))
    }

    /// Fetches base extent `idx` and hands each record to `f` as (offset within the
    /// extent, length, data or None for zero).
    fn decode_extent(
        &self,
        e: &ExtentRef,
        mut f: impl FnMut(u64, u64, Option<&[u8]>) -> Result<()>,
    ) -> Result<()> {
        let Some(disk) = &self.disk else {
            return Err(Error::Overlay {
                path: self.map_path.display().to_string(),
                why: format!(
                    "extent {} of {} is not hydrated and the store is not open",
                    e.index, self.name
                ),
            });
        };
        let store = &disk.store;
        let mut buf: Vec<u8> = store.block(store.get(&e.object))?.into();
        self.fetched.fetch_add(1, Ordering::Relaxed);
        let start = e.index * self.extent_bytes;
        let end = start + self.extent_bytes;
        let expect = Expect {
            key: disk.key()?,
            disk_id: &disk.disk_id,
            kind: ObjectKind::Extent,
            name: &e.object,
        };
        let mut ctx = OpenContext::default();
        open_object(&expect, &mut buf, &mut ctx, |chunk| {
            decode_records(
                chunk,
                |r| {
                    if r.offset < start || r.offset + r.len > end {
                        return Err(ferry_replica::Error::corrupt(
                            &e.object,
                            "record outside its extent",
                        ));
                    }
                    f(r.offset - start, r.len, r.data).map_err(|e| match e {
                        Error::Replica(r) => r,
                        other => ferry_replica::Error::Invalid(other.to_string()),
                    })
                },
                &e.object,
            )
        })?;
        Ok(())
    }

    /// Extent `idx` decoded, from the cache or the store.
    fn extent(&self, e: &ExtentRef) -> Result<Arc<Vec<u8>>> {
        if let Some(hit) = self.cache_lock().get(e.index) {
            return Ok(hit);
        }
        let fetched = self.fetching.run(e.index, || {
            // A fetch that ended while this one waited for the lock left it cached.
            if let Some(hit) = self.cache_lock().get(e.index) {
                return Ok(hit);
            }
            let mut data = vec![0u8; self.extent_bytes as usize];
            self.decode_extent(e, |at, len, bytes| {
                if let Some(b) = bytes {
                    data[at as usize..(at + len) as usize].copy_from_slice(b);
                }
                Ok(())
            })?;
            let data = Arc::new(data);
            self.cache_lock().put(e.index, data.clone());
            Ok(data)
        });
        fetched.map_err(|f| match f {
            Flight::Own(e) => e,
            Flight::Shared(why) => Error::Fetch {
                what: format!("extent {} of {} ({})", e.index, self.name, e.object),
                why,
            },
        })
    }

    fn cache_lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The point's bytes (base, then log) at `offset`, without the overlay.
    fn read_point(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let idx = at / self.extent_bytes;
            let ext_end = ((idx + 1) * self.extent_bytes).min(end);
            let piece = &mut buf[(at - offset) as usize..(ext_end - offset) as usize];
            // The log overrides the base below, byte by byte: where it covers the
            // whole piece the base extent is not fetched at all (a sync to a point
            // reads the blocks the log wrote at the cost of the log alone).
            let logged: u64 = self
                .log
                .overlapping(at, ext_end)
                .iter()
                .map(|(s, e, _)| e - s)
                .sum();
            if logged == ext_end - at {
                at = ext_end;
                continue;
            }
            if self.is_hydrated(idx) {
                self.hydrated_file
                    .read_exact_at(piece, at)
                    .map_err(io_err("read", &self.hydrated_path))?;
            } else if let Some(e) = self.extents.get(&idx) {
                let data = self.extent(e)?;
                let from = (at - idx * self.extent_bytes) as usize;
                piece.copy_from_slice(&data[from..from + piece.len()]);
            } else {
                piece.fill(0);
            }
            at = ext_end;
        }
        for (s, e, src) in self.log.overlapping(offset, end) {
            let piece = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match src {
                Src::Zero => piece.fill(0),
                Src::At(p) => self
                    .log_file
                    .read_exact_at(piece, p)
                    .map_err(io_err("read", &self.log_path))?,
            }
        }
        Ok(())
    }

    /// The disk ranges the point's log (its records above the base) writes, data or
    /// zero, in order: every byte outside them is the base's.
    pub fn log_ranges(&self) -> Vec<(u64, u64)> {
        self.log.ranges()
    }

    /// Whether base extent `idx` holds data at the point (an absent one reads as zero).
    pub fn has_extent(&self, idx: u64) -> bool {
        self.extents.contains_key(&idx)
    }

    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }

    /// The point this disk serves.
    pub fn point(&self) -> &Point {
        &self.point
    }

    /// Extents not yet copied locally.
    pub fn to_hydrate(&self) -> Vec<u64> {
        let mut left: Vec<u64> = self
            .extents
            .keys()
            .copied()
            .filter(|i| !self.is_hydrated(*i))
            .collect();
        left.sort_unstable();
        left
    }

    /// Copies base extent `idx` into the local copy, synced before it is marked, so a
    /// restart trusts exactly the extents marked.
    pub fn hydrate_extent(&self, idx: u64) -> Result<()> {
        let Some(e) = self.extents.get(&idx) else {
            return Ok(());
        };
        if self.is_hydrated(idx) {
            return Ok(());
        }
        let start = idx * self.extent_bytes;
        let size = self.point.disk_bytes;
        // A copy an earlier run left half done may hold anything: start from zero.
        let len = self.extent_bytes.min(size - start);
        zero_range(&self.hydrated_file, start, len).map_err(io_err("zero", &self.hydrated_path))?;
        self.decode_extent(e, |at, n, bytes| {
            let off = start + at;
            if off >= size {
                return Ok(());
            }
            let n = n.min(size - off);
            match bytes {
                Some(b) => self
                    .hydrated_file
                    .write_all_at(&b[..n as usize], off)
                    .map_err(io_err("write", &self.hydrated_path)),
                None => Ok(()),
            }
        })?;
        self.hydrated_file
            .sync_data()
            .map_err(io_err("sync", &self.hydrated_path))?;
        self.map_file
            .write_all_at(&[1], idx)
            .and_then(|_| self.map_file.sync_data())
            .map_err(io_err("write", &self.map_path))?;
        if let Some(h) = self.hydrated.get(idx as usize) {
            h.store(true, Ordering::Release);
        }
        Ok(())
    }
}

/// Records which disk and point `dir` serves, or checks that it is the same one.
fn check_identity(dir: &Path, name: &str, disk: &Disk, point: &Point) -> Result<()> {
    let path = dir.join(format!("{name}.point.json"));
    let want = serde_json::json!({
        "machine": disk.info.machine,
        "disk": disk.info.disk,
        "disk_id": disk.info.disk_id,
        "point": point.id,
        "seq": point.seq,
    });
    match std::fs::read(&path) {
        Ok(bytes) => {
            let have: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| Error::Overlay {
                    path: path.display().to_string(),
                    why: format!("unreadable: {e}"),
                })?;
            if have != want {
                return Err(Error::Overlay {
                    path: path.display().to_string(),
                    why: format!(
                        "holds {} {}/{} at point {}, not point {} of {}: use another overlay directory",
                        have["disk_id"], have["machine"], have["disk"], have["point"], point.id,
                        disk.paths.label()
                    ),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let f = File::create(&path).map_err(io_err("create", &path))?;
            f.write_all_at(want.to_string().as_bytes(), 0)
                .and_then(|_| f.sync_all())
                .map_err(io_err("write", &path))
        }
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

impl Device for ServedDisk {
    fn size(&self) -> u64 {
        self.point.disk_bytes
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_point(offset, buf).map_err(other)?;
        self.overlay.read_over(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.overlay.write(offset, data, fua)
    }

    fn zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.overlay.zero(offset, len, fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.overlay.flush()
    }

    /// Hydrated base extents, absent ones (zero) and the decoded log, in order: all
    /// local. A range the overlay touches, or one in an extent not yet hydrated, is
    /// read the usual way.
    fn pieces(&self, offset: u64, len: u64) -> Option<Vec<Piece<'_>>> {
        let end = offset.checked_add(len)?;
        if self.overlay.touches(offset, end) {
            return None;
        }
        let mut out = Vec::new();
        let mut at = offset;
        for (s, e, src) in self.log.overlapping(offset, end) {
            self.base_pieces(at, s, &mut out)?;
            out.push(match src {
                Src::Zero => Piece::Zero(e - s),
                Src::At(p) => Piece::File {
                    file: &self.log_file,
                    offset: p,
                    len: e - s,
                },
            });
            at = e;
        }
        self.base_pieces(at, end, &mut out)?;
        Some(out)
    }
}

impl ServedDisk {
    /// The base's bytes of `[start, end)` as pieces, if every extent it spans is
    /// hydrated or absent.
    fn base_pieces<'a>(&'a self, start: u64, end: u64, out: &mut Vec<Piece<'a>>) -> Option<()> {
        let mut at = start;
        while at < end {
            let idx = at / self.extent_bytes;
            let ext_end = ((idx + 1) * self.extent_bytes).min(end);
            let len = ext_end - at;
            if self.is_hydrated(idx) {
                out.push(Piece::File {
                    file: &self.hydrated_file,
                    offset: at,
                    len,
                });
            } else if self.extents.contains_key(&idx) {
                return None;
            } else {
                out.push(Piece::Zero(len));
            }
            at = ext_end;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_at_most_its_bound_least_recently_used_out() {
        let mut lru = Lru {
            cap: 2,
            map: HashMap::new(),
            order: VecDeque::new(),
        };
        for i in 0..3 {
            lru.put(i, Arc::new(vec![i as u8]));
            // 0 is used again after 1 was put: 1 is the one to go.
            if i == 1 {
                assert!(lru.get(0).is_some());
            }
        }
        assert_eq!(lru.map.len(), 2);
        assert!(lru.get(1).is_none());
        assert_eq!(lru.get(0).as_deref(), Some(&vec![0u8]));
        assert_eq!(lru.get(2).as_deref(), Some(&vec![2u8]));
        let mut off = Lru {
            cap: 0,
            map: HashMap::new(),
            order: VecDeque::new(),
        };
        off.put(0, Arc::new(vec![0]));
        assert!(off.map.is_empty());
    }
}
