//! Failover of a replication group: every machine of the group at the newest group
//! point that all of them hold on every disk. A group point some member lacks (its
//! cut was skipped or has not uploaded yet) is never chosen.

use std::collections::BTreeSet;

use ferry_replica::{layout, Store};

use crate::error::{Error, Result};

use super::points::open_machine;

/// The machines whose points carry `group`, and the newest point id they all hold.
pub fn latest_group_point(store: &Store, group: &str) -> Result<(Vec<String>, String)> {
    let machines = store.block(store.list_dirs(&layout::machines()))?;
    let mut members = Vec::new();
    let mut common: Option<BTreeSet<String>> = None;
    // (time, seq) of each candidate, from the first member that has it.
    let mut when = std::collections::HashMap::new();
    for m in machines {
        let disks = open_machine(store, &m, None)?;
        let in_group = disks.iter().any(|d| {
            d.state
                .points
                .iter()
                .any(|p| p.group.as_deref() == Some(group))
        });
        if !in_group {
            continue;
        }
        // Ids of this group's points that every disk of the machine holds.
        let mut ids: Option<BTreeSet<String>> = None;
        for d in &disks {
            let here: BTreeSet<String> = d
                .state
                .points
                .iter()
                .filter(|p| p.group.as_deref() == Some(group))
                .map(|p| {
                    when.entry(p.id.clone()).or_insert(p.time);
                    p.id.clone()
                })
                .collect();
            ids = Some(match ids {
                None => here,
                Some(i) => i.intersection(&here).cloned().collect(),
            });
        }
        let ids = ids.unwrap_or_default();
        common = Some(match common {
            None => ids,
            Some(c) => c.intersection(&ids).cloned().collect(),
        });
        members.push(m);
    }
    if members.is_empty() {
        return Err(Error::NoGroup {
            group: group.to_string(),
            store: store.name().to_string(),
        });
    }
    let newest = common
        .unwrap_or_default()
        .into_iter()
        .max_by_key(|id| (when.get(id).copied(), id.clone()))
        .ok_or_else(|| Error::NoGroupPoint {
            group: group.to_string(),
            members: members.join(", "),
        })?;
    Ok((members, newest))
}
