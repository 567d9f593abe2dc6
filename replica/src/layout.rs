//! Where things live in a store. All paths are relative to the store's root (the
//! directory, container or bucket the URL names) and are bound into sealed objects, so
//! a store can be moved whole but objects cannot be moved within it.
//!
//! ```text
//! machines/{machine}/disks/{disk}/disk.json
//!                                 commits/{n:020}.json
//!                                 checkpoints/{n:020}.json
//!                                 log/{first_seq:020}-{uid}.seg
//!                                 base/{uid}/{extent:010}.ext
//!                                 sums/{uid}.sum
//!                                 sync/{point}-{uid}.home.sum
//!                                 sync/{point}-{uid}.point.sum
//!                                 sync/{point}-{uid}-{n:08}.seg
//! ```
//!
//! `sync/` holds a failback sync's exchange between the sites (docs/failback.md,
//! "Syncing the home disks"), in a reverse replica only: checksum maps and the
//! blocks that differ, sealed like the others, referenced by no commit, deleted once
//! the sync is done.

use crate::error::{Error, Result};

/// The rule for machine and disk names, as said to whoever broke it.
pub const NAME_RULE: &str =
    "1 to 64 characters of letters, digits, '.', '_' and '-', not starting with '.' or '-'";

/// What a forward machine's name becomes for its failback reverse replica, beside
/// it in the same store (docs/failback.md). Reserved: no machine of its own may end
/// in it, or a failback's commit, which deletes the reverse replica whole, would
/// delete that machine's replica.
pub const REVERSE_SUFFIX: &str = ".reverse";

/// Whether `machine` names a reverse replica.
pub fn is_reverse(machine: &str) -> bool {
    machine.ends_with(REVERSE_SUFFIX)
}

/// The reverse replica's machine name for forward machine `machine`; an error when
/// it would not be a valid name (too long).
pub fn reverse_machine(machine: &str) -> Result<String> {
    let name = format!("{machine}{REVERSE_SUFFIX}");
    check_name("reverse machine", &name)?;
    Ok(name)
}

/// Machine and disk names become path segments (in the store, and on the agent and
/// the process server under their journal and cache directories): keep them portable
/// across stores, and never `.`, `..` or anything that could read as an option. THE
/// rule: the protocol's Hello, the process server, the store and the agent's
/// `--disk NAME=PATH` all check names with this function.
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidName {
            what,
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("must not start with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

pub fn machines() -> String {
    "machines/".to_string()
}

pub fn disks_of(machine: &str) -> String {
    format!("machines/{machine}/disks/")
}

#[derive(Debug, Clone)]
pub struct DiskPaths {
    pub machine: String,
    pub disk: String,
    root: String,
}

impl DiskPaths {
    pub fn new(machine: &str, disk: &str) -> Result<Self> {
        check_name("machine", machine)?;
        check_name("disk", disk)?;
        Ok(DiskPaths {
            machine: machine.into(),
            disk: disk.into(),
            root: format!("machines/{machine}/disks/{disk}"),
        })
    }

    /// "machine/disk", for messages.
    pub fn label(&self) -> String {
        format!("{}/{}", self.machine, self.disk)
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn info(&self) -> String {
        format!("{}/disk.json", self.root)
    }

    pub fn commits_dir(&self) -> String {
        format!("{}/commits/", self.root)
    }

    pub fn commit(&self, n: u64) -> String {
        format!("{}/commits/{n:020}.json", self.root)
    }

    pub fn checkpoints_dir(&self) -> String {
        format!("{}/checkpoints/", self.root)
    }

    pub fn checkpoint(&self, n: u64) -> String {
        format!("{}/checkpoints/{n:020}.json", self.root)
    }

    pub fn segment(&self, first_seq: u64, uid: &str) -> String {
        format!("{}/log/{first_seq:020}-{uid}.seg", self.root)
    }

    pub fn base_dir(&self) -> String {
        format!("{}/base/", self.root)
    }

    pub fn log_dir(&self) -> String {
        format!("{}/log/", self.root)
    }

    pub fn sums_dir(&self) -> String {
        format!("{}/sums/", self.root)
    }

    pub fn extent(&self, generation: &str, index: u64) -> String {
        format!("{}/base/{generation}/{index:010}.ext", self.root)
    }

    pub fn sums(&self, uid: &str) -> String {
        format!("{}/sums/{uid}.sum", self.root)
    }

    pub fn exchange_dir(&self) -> String {
        format!("{}/sync/", self.root)
    }

    /// An exchange object of a sync to point `point`: `ext` says what it is
    /// (`home.sum`, `point.sum`: checksum maps; `seg`: a segment of the point's
    /// blocks). The point and the role are in the name, which is sealed into the
    /// object, so a reader can check what point it is of and what it holds.
    pub fn exchange(&self, point: &str, uid: &str, ext: &str) -> String {
        format!("{}/sync/{point}-{uid}.{ext}", self.root)
    }
}

/// The commit number in a `commits/` or `checkpoints/` object name.
pub fn number_of(path: &str) -> Option<u64> {
    let file = path.rsplit('/').next()?;
    file.strip_suffix(".json")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("disk", "sda-1.x_y").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "../x",
            ".x",
            "a/b",
            "-x",
            "a b",
            &"x".repeat(65),
        ] {
            let e = check_name("disk", bad).unwrap_err().to_string();
            assert!(e.contains(NAME_RULE), "{e}");
        }
        let p = DiskPaths::new("m", "d").unwrap();
        assert_eq!(number_of(&p.commit(42)), Some(42));
        assert_eq!(
            p.commit(7),
            "machines/m/disks/d/commits/00000000000000000007.json"
        );
    }
}
