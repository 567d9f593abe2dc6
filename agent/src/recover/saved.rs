//! What a served disk keeps in its directory so that a restart needs neither the log
//! decoded again nor, once hydration has finished, the store at all:
//! `{disk}.base.json` (the point and the base extents it reads: written at every
//! open) and `{disk}.log-index` (the log's interval index over `{disk}.log`, written
//! once the log file is synced).
//!
//! Log index: "FERRYLX1" | point seq u64 LE | disk bytes u64 LE | entries u64 LE |
//! entries x (start u64 LE | end u64 LE | kind u8 (0 zero, 1 data) | log file offset
//! u64 LE) | point id bytes | xxh3 of all that precedes, u64 LE. Each file is written
//! aside, synced and renamed, so a crash leaves the old one or the new one; a torn,
//! foreign or mismatched index is ignored and the log decoded again.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_replica::meta::ExtentRef;
use ferry_replica::Point;

use super::ranges::{RangeMap, Src};
use super::{io_err, Error, Result};

const MAGIC: &[u8; 8] = b"FERRYLX1";
const ENTRY: usize = 25;

/// The point a directory serves and the base extents it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedBase {
    pub point: Point,
    pub extent_bytes: u64,
    pub extents: Vec<ExtentRef>,
}

pub fn base_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.base.json"))
}

pub fn index_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log-index"))
}

/// Replaces `path` with `bytes`: written aside, synced, renamed, the directory synced.
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    // Beside it, named after the whole file name: two disks' files never share one.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

pub fn save_base(path: &Path, base: &SavedBase) -> Result<()> {
    let json = serde_json::json!({
        "point": base.point,
        "extent_bytes": base.extent_bytes,
        "extents": base.extents,
    });
    replace(path, json.to_string().as_bytes())
}

pub fn load_base(path: &Path) -> Result<SavedBase> {
    let bytes = std::fs::read(path).map_err(io_err("read", path))?;
    let bad = |e: serde_json::Error| Error::Overlay {
        path: path.display().to_string(),
        why: format!("unreadable: {e}"),
    };
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).map_err(bad)?;
    Ok(SavedBase {
        point: serde_json::from_value(v["point"].take()).map_err(bad)?,
        extent_bytes: serde_json::from_value(v["extent_bytes"].take()).map_err(bad)?,
        extents: serde_json::from_value(v["extents"].take()).map_err(bad)?,
    })
}

/// Saves the index of a log whose file has been synced.
pub fn save_index(path: &Path, point: &Point, log: &RangeMap) -> Result<()> {
    let entries = log.overlapping(0, u64::MAX);
    let mut b = Vec::with_capacity(40 + entries.len() * ENTRY + point.id.len());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&point.seq.to_le_bytes());
    b.extend_from_slice(&point.disk_bytes.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (s, e, src) in entries {
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&e.to_le_bytes());
        let (kind, at) = match src {
            Src::Zero => (0u8, 0u64),
            Src::At(p) => (1, p),
        };
        b.push(kind);
        b.extend_from_slice(&at.to_le_bytes());
    }
    b.extend_from_slice(point.id.as_bytes());
    let check = xxhash_rust::xxh3::xxh3_64(&b);
    b.extend_from_slice(&check.to_le_bytes());
    replace(path, &b)
}

/// The saved index, if `path` holds a whole one of exactly this point whose data
/// fits in a log file of `log_len` bytes; None otherwise (decode again).
pub fn load_index(path: &Path, point: &Point, log_len: u64) -> Option<RangeMap> {
    let b = std::fs::read(path).ok()?;
    let body = b.len().checked_sub(8)?;
    let u = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    if b.get(..8)? != MAGIC || xxhash_rust::xxh3::xxh3_64(&b[..body]) != u(body)? {
        return None;
    }
    let (seq, size, n) = (u(8)?, u(16)?, usize::try_from(u(24)?).ok()?);
    let ids_at = 32usize.checked_add(n.checked_mul(ENTRY)?)?;
    if seq != point.seq || size != point.disk_bytes || b.get(ids_at..body)? != point.id.as_bytes() {
        return None;
    }
    let mut log = RangeMap::default();
    for i in 0..n {
        let at = 32 + i * ENTRY;
        let (s, e, kind, pos) = (u(at)?, u(at + 8)?, b[at + 16], u(at + 17)?);
        if s >= e || e > size {
            return None;
        }
        let src = match kind {
            0 => Src::Zero,
            1 if pos.checked_add(e - s)? <= log_len => Src::At(pos),
            _ => return None,
        };
        log.insert(s, e, src);
    }
    Some(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: &str, seq: u64) -> Point {
        Point {
            id: id.into(),
            kind: ferry_replica::PointKind::Crash,
            time: chrono::Utc::now(),
            seq,
            disk_bytes: 1 << 20,
            label: None,
            group: None,
            sums: None,
        }
    }

    #[test]
    fn an_index_loads_back_only_for_its_point_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = index_path(dir.path(), "sda");
        let mut log = RangeMap::default();
        log.insert(10, 500, Src::At(0));
        log.insert(100, 200, Src::Zero);
        log.insert(4096, 8192, Src::At(490));
        let p = point("p1", 42);
        save_index(&path, &p, &log).unwrap();
        let back = load_index(&path, &p, 490 + 4096).unwrap();
        assert_eq!(back.overlapping(0, u64::MAX), log.overlapping(0, u64::MAX));
        // Another point, a log file shorter than the index says, a flipped byte.
        assert!(load_index(&path, &point("p2", 42), 1 << 20).is_none());
        assert!(load_index(&path, &point("p1", 43), 1 << 20).is_none());
        assert!(load_index(&path, &p, 490 + 4095).is_none());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(load_index(&path, &p, 1 << 20).is_none());
        std::fs::write(&path, &bytes[..30]).unwrap();
        assert!(load_index(&path, &p, 1 << 20).is_none());
    }

    #[test]
    fn a_base_loads_back_as_saved() {
        let dir = tempfile::tempdir().unwrap();
        let path = base_path(dir.path(), "sda");
        let base = SavedBase {
            point: point("p1", 7),
            extent_bytes: 16 << 20,
            extents: vec![ExtentRef {
                index: 3,
                object: "machines/m/disks/sda/base/x/3".into(),
                stored_bytes: 1234,
            }],
        };
        save_base(&path, &base).unwrap();
        assert_eq!(load_base(&path).unwrap(), base);
        std::fs::write(&path, b"{").unwrap();
        assert!(load_base(&path)
            .unwrap_err()
            .to_string()
            .contains("unreadable"));
    }
}
