//! Reprotect's second phase (docs/failback.md): once the master target synced the
//! home disks to the failover point, the recovery-site host sends the machine's
//! writes as rounds of the reverse replica `M.reverse` (a reverse item) and the
//! master target applies them onto the home disks (an apply item). Both keep
//! running, recorded among the failover's live items (`machine_recovery.items`), until
//! failback stops them; the reprotect job ends once every disk has a round applied.

use ferry_link::control::wire::{ApplyDisk, ReverseDisk, WorkOp};

use super::state::{self, RecoveryRow, COMMITTED};
use super::wait::Waiter;
use super::Params;
use crate::db::Db;
use crate::recovery::work::{self, WorkRow};

/// The interval of reverse rounds when the machine's policy is not found.
pub const DEFAULT_INTERVAL_S: u64 = 5;

/// Reverse rounds come as often as the machine's policy makes forward points (its
/// RPO target), at least every second.
pub async fn interval_s(db: &Db, machine: &str) -> Result<u64, String> {
    let m = crate::registry::machines::get(db, machine)
        .await
        .map_err(|e| format!("reading machine {machine}: {e}"))?;
    let Some(m) = m else {
        return Ok(DEFAULT_INTERVAL_S);
    };
    let policy = crate::db::policies::get(db, &m.policy)
        .await
        .map_err(|e| format!("reading policy {} of machine {machine}: {e}", m.policy))?;
    Ok(policy.map_or(DEFAULT_INTERVAL_S, |p| {
        // A finite positive interval (the policy checks it); rounded up to whole seconds.
        (p.crash_point_interval_s.ceil() as u64).max(1)
    }))
}

pub async fn row_of(w: &Waiter<'_>, machine: &str) -> Result<RecoveryRow, String> {
    state::get(&w.ctx.db, machine)
        .await
        .map_err(|e| format!("reading machine {machine}'s failover: {e}"))?
        .ok_or_else(|| format!("machine {machine} is not failed over"))
}

/// The live items of the failover, as stored.
pub async fn live_items(db: &Db, row: &RecoveryRow) -> Result<Vec<WorkRow>, String> {
    let items = work::get_in_order(db, &row.items)
        .await
        .map_err(|e| format!("reading the work items of machine {}: {e}", row.machine))?;
    Ok(items.into_iter().filter(|i| i.state != "removed").collect())
}

/// What each recovery-site disk is read from: the serve item's export
/// (`item:ID`), or the file a build item made.
pub fn reverse_disks(
    p: &Params,
    row: &RecoveryRow,
    items: &[WorkRow],
) -> Result<Vec<ReverseDisk>, String> {
    p.points
        .iter()
        .map(|d| {
            let source = items.iter().find_map(|i| match &i.op {
                WorkOp::Serve { disks } if disks.iter().any(|x| x.disk == d.disk) => {
                    Some(format!("item:{}", i.id))
                }
                WorkOp::Build { .. } => i
                    .result
                    .as_ref()?
                    .disks
                    .iter()
                    .find(|x| x.disk == d.disk)?
                    .path
                    .clone(),
                _ => None,
            });
            let source = source.ok_or_else(|| {
                format!(
                    "machine {}: disk {} is neither served nor built on recovery host {}",
                    p.machine,
                    d.disk,
                    row.host.as_deref().unwrap_or("?")
                )
            })?;
            Ok(ReverseDisk {
                disk: d.disk.clone(),
                over: d.point.clone(),
                source,
            })
        })
        .collect()
}

/// The apply item's disks: each reverse disk over the failover point onto its home
/// disk.
pub fn apply_disks(p: &Params) -> Result<Vec<ApplyDisk>, String> {
    p.points
        .iter()
        .map(|d| {
            let target = p.home_disks.get(&d.disk).cloned().ok_or_else(|| {
                format!("machine {}: disk {} has no home disk", p.machine, d.disk)
            })?;
            Ok(ApplyDisk {
                disk: d.disk.clone(),
                over: d.point.clone(),
                target,
            })
        })
        .collect()
}

/// `start reverse replication`: a reverse item on the recovery-site host, recorded
/// among the failover's items at once (a commit of the failback removes it).
pub async fn start_reverse(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    let row = row_of(w, m).await?;
    let host = row
        .host
        .clone()
        .ok_or_else(|| format!("machine {m}: its failover names no recovery host"))?;
    let items = live_items(&w.ctx.db, &row).await?;
    let op = WorkOp::Reverse {
        disks: reverse_disks(p, &row, &items)?,
        interval_s: interval_s(&w.ctx.db, m).await?,
        last: false,
    };
    let item = w.submit(&host, m, &op, Some(&[COMMITTED])).await?;
    if item.state == "failed" {
        return Err(format!(
            "reverse item {} on recovery host {host} failed: {}",
            item.id,
            item.error.as_deref().unwrap_or("the host gave no reason")
        ));
    }
    Ok(())
}

/// `apply at home`: an apply item on the master target, recorded like the reverse
/// one, waited for until every disk has a round applied (or either item fails).
pub async fn start_apply(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = p.machine.clone();
    let master = p.master()?.to_string();
    let op = WorkOp::Apply {
        disks: apply_disks(p)?,
        interval_s: interval_s(&w.ctx.db, &m).await?,
        until: Vec::new(),
        verify: false,
    };
    let apply = w.submit(&master, &m, &op, Some(&[COMMITTED])).await?;
    let what = format!(
        "the first reverse round of every disk of machine {m} applied by master target {master}"
    );
    loop {
        let items = work::for_job(&w.ctx.db, &w.job.id)
            .await
            .map_err(|e| format!("reading the work items of job {}: {e}", w.job.id))?;
        // This task's apply, and the newest reverse item of the task before (an
        // earlier attempt that failed is not this one).
        let reverse = items.iter().rev().find(|i| i.op.kind() == "reverse");
        let ended = items
            .iter()
            .filter(|i| i.id == apply.id)
            .chain(reverse)
            .find(|i| i.is_ended());
        if let Some(i) = ended {
            return Err(format!(
                "{} item {} on host {} {} while reverse replication started: {}",
                i.op.kind(),
                i.id,
                i.host,
                i.state,
                i.error.as_deref().unwrap_or("it gave no reason")
            ));
        }
        let now = items.iter().find(|i| i.id == apply.id);
        let applied = now
            .and_then(|i| i.result.as_ref())
            .map(|r| r.applied.clone())
            .unwrap_or_default();
        let done = p
            .points
            .iter()
            .filter(|d| applied.iter().any(|a| a.disk == d.disk))
            .count();
        if done == p.points.len() {
            return Ok(());
        }
        w.host_alive(&master, &what).await?;
        let progress = done as f64 / p.points.len().max(1) as f64;
        w.tick(progress, &what).await?;
    }
}
