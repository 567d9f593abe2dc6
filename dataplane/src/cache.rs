//! The process server's cache: one `ferry_link::log::DurableLog` per shard, in
//! `<cache-dir>/shard-<i>/`. This module holds what concerns the cache directory as a
//! whole, used by the server's start and by health alike.
//!
//! Room on the cache's file system: the cache's bound (`--cache-gib`) is a promise
//! that agents' writes up to it can be made durable; a file system with less room would
//! break it with a failed append when the cache fills, long after the start. So the
//! start checks it and refuses, naming the numbers. It also refuses a cache that holds
//! writes of more shards than it will run, since nobody would upload them.

use std::path::Path;

use crate::error::{Error, Result};

/// Bytes the file system holding `path` has free for an unprivileged writer.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a path with a NUL byte"))?;
    // SAFETY: statvfs fills `st`, a plain C struct, from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes of the files under `dir` (one level of shard directories deep).
pub fn held_bytes(dir: &Path) -> u64 {
    let files = |d: &Path| -> u64 {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| files(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes in GiB, for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Refuses a bound the file system cannot hold: what the cache holds already plus
/// what is free must reach it.
pub fn check(dir: &Path, bound: u64) -> Result<()> {
    let free = free_bytes(dir).map_err(|source| Error::Io {
        op: "statvfs of cache dir",
        path: dir.display().to_string(),
        source,
    })?;
    let held = held_bytes(dir);
    if bound > free.saturating_add(held) {
        return Err(Error::NoRoom {
            dir: dir.display().to_string(),
            bound,
            free,
            held,
        });
    }
    Ok(())
}

/// A cache written with more shards than now would leave writes nobody uploads.
pub fn refuse_stray_shards(dir: &Path, shards: usize) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|source| Error::Io {
        op: "cache dir",
        path: dir.display().to_string(),
        source,
    })?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(n) = name
            .strip_prefix("shard-")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let holds = std::fs::read_dir(e.path())
            .map(|d| d.flatten().any(|f| f.metadata().is_ok_and(|m| m.len() > 0)))
            .unwrap_or(false);
        if n >= shards && holds {
            return Err(Error::StrayShard {
                dir: dir.display().to_string(),
                shard: n,
                shards,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_beyond_the_file_system_is_refused_with_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("shard-0");
        std::fs::create_dir_all(&shard).unwrap();
        std::fs::write(shard.join("0000000000000000.log"), vec![1u8; 5000]).unwrap();
        assert_eq!(held_bytes(dir.path()), 5000);
        // Other tests write meanwhile: bounds far from the edge either way.
        let free = free_bytes(dir.path()).unwrap();
        assert!(check(dir.path(), 1 << 20).is_ok());
        assert!(check(dir.path(), free / 2).is_ok());
        let e = check(dir.path(), free.saturating_mul(2) + (1 << 40))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lower --cache-gib or free space"), "{e}");
        assert!(e.contains("the cache holds 0.00 GiB"), "{e}");
    }

    #[test]
    fn a_cache_holding_a_shard_beyond_the_count_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("shard-3");
        std::fs::create_dir_all(&shard).unwrap();
        // An empty shard directory holds nothing to upload.
        assert!(refuse_stray_shards(dir.path(), 2).is_ok());
        std::fs::write(shard.join("0000000000000000.log"), b"x").unwrap();
        let e = refuse_stray_shards(dir.path(), 2).unwrap_err();
        assert!(
            matches!(
                e,
                Error::StrayShard {
                    shard: 3,
                    shards: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("start with --shards 4"), "{e}");
        assert!(refuse_stray_shards(dir.path(), 4).is_ok());
    }

    #[test]
    fn a_missing_cache_dir_keeps_the_cause() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let e = refuse_stray_shards(&gone, 1).unwrap_err();
        assert!(e.to_string().starts_with("cache dir "), "{e}");
        let cause = e.source().and_then(|c| c.downcast_ref::<std::io::Error>());
        assert_eq!(cause.map(|c| c.kind()), Some(std::io::ErrorKind::NotFound));
    }
}
