//! This process server's claims on disks, kept in its cache directory
//! (docs/storage-format.md 3, "Fencing"): `claims/<machine>/<disk>.json`, one small
//! file per disk, written with fsync and rename.
//!
//! A claim is the writer epoch this server's claim commit created, with its own name.
//! It owns a disk while the replica's folded state is in exactly that epoch of that
//! writer. The file is written BEFORE the claim commit is created: a crash between the
//! two leaves a claim on record that the replica does not show (or shows for another
//! writer of the same epoch, which the name tells apart), so it owns nothing it never
//! claimed.
//!
//! The file also says where in the cache the claim's writes begin: everything of the
//! disk cached before, under an older claim, is stale and is never uploaded under this
//! one (an A -> B -> A move). Cached frames of the disk in shard `s` before
//! `starts[s]` are stale; in a shard without a start, all are, unless the claim kept the
//! cache (made while the server already owned the disk: nothing stale).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use ferry_link::log::Position;
use ferry_replica::{Error, Result};
use serde::{Deserialize, Serialize};

/// Where in a shard's cache log a claim's writes begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    pub file: u64,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRecord {
    pub epoch: u64,
    pub writer: String,
    /// The claim was made while this server owned the disk already: what it cached
    /// before stays valid.
    #[serde(default)]
    pub kept_cache: bool,
    /// Shard -> where the claim's first session cached its Hello in that shard.
    #[serde(default)]
    pub starts: BTreeMap<usize, Start>,
}

impl ClaimRecord {
    /// Whether a cached frame of the disk at `at` in `shard` is from an older claim.
    pub fn stale(&self, shard: usize, at: Position) -> bool {
        if self.kept_cache {
            return false;
        }
        match self.starts.get(&shard) {
            Some(s) => {
                at < Position {
                    file: s.file,
                    offset: s.offset,
                }
            }
            None => true,
        }
    }

    /// A session under this claim caches its Hello at `at` in `shard`: the first in
    /// that shard marks where the claim's writes begin there. True if it changed.
    pub fn note_start(&mut self, shard: usize, at: Position) -> bool {
        if self.kept_cache || self.starts.contains_key(&shard) {
            return false;
        }
        self.starts.insert(
            shard,
            Start {
                file: at.file,
                offset: at.offset,
            },
        );
        true
    }
}

/// The claims directory and this server's name (the writer its commits carry).
#[derive(Debug, Clone)]
pub struct Claims {
    dir: PathBuf,
    pub me: String,
}

impl Claims {
    pub fn new(cache_dir: &Path, me: &str) -> Claims {
        Claims {
            dir: cache_dir.join("claims"),
            me: me.to_string(),
        }
    }

    fn path(&self, machine: &str, disk: &str) -> PathBuf {
        self.dir.join(machine).join(format!("{disk}.json"))
    }

    /// This server's claim on record for the disk, if any (a record naming another
    /// writer, left by a renamed server, is none of its own).
    pub fn get(&self, machine: &str, disk: &str) -> Result<Option<ClaimRecord>> {
        let path = self.path(machine, disk);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::io(
                    "reading the claim",
                    path.display().to_string(),
                    e,
                ))
            }
        };
        let rec: ClaimRecord = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Invalid(format!(
                "claim file {}: {e}; remove it to give up the claim",
                path.display()
            ))
        })?;
        Ok((rec.writer == self.me).then_some(rec))
    }

    /// Replaces the disk's claim on record durably: a temporary file, fsync, rename,
    /// fsync of the directory.
    pub fn put(&self, machine: &str, disk: &str, rec: &ClaimRecord) -> Result<()> {
        let path = self.path(machine, disk);
        let dir = path.parent().unwrap_or(&self.dir).to_path_buf();
        let io = |op: &'static str, p: &Path| {
            let p = p.display().to_string();
            move |e| Error::io(op, p, e)
        };
        ferry_replica::local::create_private_dir(&dir)
            .map_err(io("creating the claims dir", &dir))?;
        let tmp = dir.join(format!("{disk}.json.tmp"));
        let body = serde_json::to_vec(rec).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut f = std::fs::File::create(&tmp).map_err(io("creating the claim", &tmp))?;
        f.write_all(&body).map_err(io("writing the claim", &tmp))?;
        f.sync_all().map_err(io("syncing the claim", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("renaming the claim", &path))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing the claims dir", &dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(file: u64, offset: u64) -> Position {
        Position { file, offset }
    }

    #[test]
    fn a_claim_round_trips_and_marks_what_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let claims = Claims::new(dir.path(), "ps-a");
        assert_eq!(claims.get("m", "d").unwrap(), None);
        let mut rec = ClaimRecord {
            epoch: 3,
            writer: "ps-a".into(),
            kept_cache: false,
            starts: BTreeMap::new(),
        };
        // Before any session cached under it, everything cached is older.
        assert!(rec.stale(0, pos(9, 9)));
        assert!(rec.note_start(1, pos(2, 100)));
        assert!(!rec.note_start(1, pos(5, 0)), "the first start stays");
        assert!(rec.stale(1, pos(2, 99)) && !rec.stale(1, pos(2, 100)));
        assert!(rec.stale(0, pos(9, 9)), "another shard: still all stale");
        claims.put("m", "d", &rec).unwrap();
        assert_eq!(claims.get("m", "d").unwrap(), Some(rec.clone()));
        // A server of another name does not take this claim for its own.
        assert_eq!(Claims::new(dir.path(), "ps-b").get("m", "d").unwrap(), None);
        let kept = ClaimRecord {
            kept_cache: true,
            ..rec
        };
        assert!(!kept.stale(0, pos(0, 0)));
    }
}
