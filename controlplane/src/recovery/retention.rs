//! Retention: compaction of every disk of a machine by age.

use chrono::{Duration, Utc};
use ferry_replica::compact::{compact, CompactOptions, CompactReport};
use ferry_replica::{Store, VaultKey};

use crate::error::Result;

use super::points::open_machine;

/// Unreferenced objects younger than this may be a writer's uncommitted upload. The
/// replica's constant, which the writers are held to as well.
pub use ferry_replica::grace::ORPHAN_GRACE;

pub fn compact_machine(
    store: &Store,
    vault: &VaultKey,
    machine: &str,
    keep: Duration,
) -> Result<Vec<(String, CompactReport)>> {
    let disks = open_machine(store, machine, Some(vault))?;
    let opts = CompactOptions {
        keep,
        now: Utc::now(),
        orphan_grace: Duration::from_std(ORPHAN_GRACE)
            .map_err(|e| ferry_replica::Error::Invalid(format!("orphan grace: {e}")))?,
    };
    disks
        .into_iter()
        .map(|d| Ok((d.name.clone(), compact(&d.disk, &opts)?)))
        .collect()
}
