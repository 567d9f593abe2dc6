//! How the agent's last run ended, told by a marker it keeps in the journal directory
//! while it runs: the boot it runs in.
//!
//! The agent journals each write, then applies it to the disk; both stay in the page
//! cache until the guest flushes. A killed agent loses neither: the kernel still
//! writes them out, and `Capture::reconcile` covers a write journaled but not yet
//! applied. A host that goes down (power cut, kernel crash) may keep any part of
//! either: a write the guest never flushed can be on the disk while its journal record
//! is lost, and the replica would then never learn of it. So a marker from another
//! boot means every disk is compared with its replica by checksum (reading the disk,
//! sending only blocks that differ); a marker from this boot means the agent was
//! killed; none means it stopped in order (`Agent::shutdown`) or never ran.
//!
//! The comparison owed is recorded per disk (`compare-owed` in its journal directory)
//! before the marker is replaced, and cleared only once a whole comparison is done and
//! journaled: an agent restarted before then, or one that could not reach its process
//! server, still owes it.

use std::fs::{self, File};
use std::io;
use std::path::Path;

const NAME: &str = "running";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastStop {
    /// Stopped in order, every disk flushed, or never ran here.
    Clean,
    /// Killed in this boot: the page cache kept everything.
    Killed,
    /// The host went down under it (the marker names another boot).
    HostDown { boot: String },
}

/// This boot's id; empty where the system does not tell (then any marker left over
/// counts as a host that went down: the safe reading).
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// How the last run in `dir` ended, seen from boot `boot`.
pub fn last(dir: &Path, boot: &str) -> io::Result<LastStop> {
    // The journal directory: the journals in it hold disk data in the clear.
    ferry_replica::local::create_private_dir(dir)?;
    Ok(match fs::read_to_string(dir.join(NAME)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => LastStop::Clean,
        Err(e) => return Err(e),
        Ok(b) if !boot.is_empty() && b.trim() == boot => LastStop::Killed,
        Ok(b) => LastStop::HostDown {
            boot: b.trim().to_string(),
        },
    })
}

/// Marks this run as running in `boot`: durable before the first write is accepted,
/// so that a power cut from here on finds it. Record the comparisons a host that went
/// down owes first (`owe_compare`).
pub fn mark(dir: &Path, boot: &str) -> io::Result<()> {
    let path = dir.join(NAME);
    let tmp = dir.join(format!("{NAME}.tmp"));
    fs::write(&tmp, boot)?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()
}

const OWED: &str = "compare-owed";

/// Records, durably, that the disk whose journal is `journal` must be compared with
/// its replica.
pub fn owe_compare(journal: &Path) -> io::Result<()> {
    fs::write(journal.join(OWED), b"")?;
    File::open(journal.join(OWED))?.sync_all()?;
    File::open(journal)?.sync_all()
}

pub fn owes_compare(journal: &Path) -> bool {
    journal.join(OWED).exists()
}

/// What `compare-owed` holds when a re-enable owes the comparison: a restart before
/// it is done resumes it as a re-enable's (the control plane waits for that one).
const REENABLE: &[u8] = b"re-enable";

/// Records, durably, that a re-enable owes a comparison of the disk whose journal is
/// `journal` (its journal from before the failover was dropped).
pub fn owe_reenable(journal: &Path) -> io::Result<()> {
    let tmp = journal.join(format!("{OWED}.tmp"));
    fs::write(&tmp, REENABLE)?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, journal.join(OWED))?;
    File::open(journal)?.sync_all()
}

/// Whether the comparison owed is a re-enable's.
pub fn owed_by_reenable(journal: &Path) -> bool {
    fs::read(journal.join(OWED)).is_ok_and(|b| b == REENABLE)
}

/// A whole comparison is done and journaled (the journal synced): nothing is owed.
pub fn compared(journal: &Path) -> io::Result<()> {
    match fs::remove_file(journal.join(OWED)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    File::open(journal)?.sync_all()
}

/// Marks the run as ended in order: call only once every disk is flushed.
pub fn end(dir: &Path) -> io::Result<()> {
    match fs::remove_file(dir.join(NAME)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_an_ordered_stop_a_kill_and_a_host_that_went_down_apart() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("journal");
        let begin = |boot: &str| {
            let l = last(&d, boot).unwrap();
            mark(&d, boot).unwrap();
            l
        };
        assert_eq!(begin("boot-1"), LastStop::Clean);
        assert_eq!(begin("boot-1"), LastStop::Killed);
        assert_eq!(
            begin("boot-2"),
            LastStop::HostDown {
                boot: "boot-1".into()
            }
        );
        end(&d).unwrap();
        assert_eq!(begin("boot-3"), LastStop::Clean);
        // Without a boot id, a marker left over is read the safe way.
        assert!(matches!(begin(""), LastStop::HostDown { .. }));
    }

    #[test]
    fn a_comparison_owed_stays_owed_until_done() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!owes_compare(dir.path()));
        owe_compare(dir.path()).unwrap();
        assert!(owes_compare(dir.path()));
        compared(dir.path()).unwrap();
        assert!(!owes_compare(dir.path()));
        compared(dir.path()).unwrap();
        // A re-enable's is told apart, and cleared the same way.
        owe_compare(dir.path()).unwrap();
        assert!(!owed_by_reenable(dir.path()));
        owe_reenable(dir.path()).unwrap();
        assert!(owes_compare(dir.path()) && owed_by_reenable(dir.path()));
        compared(dir.path()).unwrap();
        assert!(!owes_compare(dir.path()) && !owed_by_reenable(dir.path()));
    }
}
