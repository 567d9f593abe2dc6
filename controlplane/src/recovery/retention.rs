//! Retention: compaction of every disk of a machine by age.

use chrono::{Duration, Utc};
use ferry_replica::compact::{compact, CompactOptions, CompactReport};
use ferry_replica::{Disk, Store, VaultKey};

use crate::error::Result;

use super::points::open_machine;

/// Unreferenced objects younger than this may be a writer's uncommitted upload. The
/// replica's constant, which the writers are held to as well.
pub use ferry_replica::grace::ORPHAN_GRACE;

fn options(keep: Duration) -> Result<CompactOptions> {
    Ok(CompactOptions {
        keep,
        now: Utc::now(),
        orphan_grace: Duration::from_std(ORPHAN_GRACE)
            .map_err(|e| ferry_replica::Error::Invalid(format!("orphan grace: {e}")))?,
    })
}

pub fn compact_machine(
    store: &Store,
    vault: &VaultKey,
    machine: &str,
    keep: Duration,
) -> Result<Vec<(String, CompactReport)>> {
    let disks = open_machine(store, machine, Some(vault))?;
    let opts = options(keep)?;
    disks
        .into_iter()
        .map(|d| Ok((d.name.clone(), compact(&d.disk, &opts)?)))
        .collect()
}

/// One disk of a machine: the retention job's task, one per disk so that a job
/// interrupted between disks resumes at the next one.
pub fn compact_disk(
    store: &Store,
    vault: &VaultKey,
    machine: &str,
    disk: &str,
    keep: Duration,
) -> Result<CompactReport> {
    let d = store.block(Disk::open(store, machine, disk, Some(vault)))?;
    Ok(compact(&d, &options(keep)?)?)
}
