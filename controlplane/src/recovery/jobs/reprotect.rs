//! The tasks of a reprotect job (docs/failback.md): the first step of failback. The
//! master target (a recovery host at the home site) makes each home disk equal to
//! the failover point by checksum, writing only the blocks that differ; then the
//! machine's direction is `reverse`, with its master target and home disks recorded.

use ferry_link::control::wire::{SyncDisk, WorkOp};

use super::state::{self, COMMITTED, FORWARD, REVERSE};
use super::wait::Waiter;
use super::Params;
use crate::recovery::work;

/// `check reprotect`: what the POST checked still holds when the job runs (a job
/// queued behind another may find the machine changed): a committed failover, not
/// reprotected elsewhere, and a master target that is heartbeating.
pub async fn check(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    let row = state::get(&w.ctx.db, m)
        .await
        .map_err(|e| format!("reading machine {m}'s failover: {e}"))?
        .ok_or_else(|| format!("machine {m} is not failed over"))?;
    if row.state != COMMITTED {
        return Err(format!(
            "machine {m} is {}: reprotect needs a committed failover",
            row.state
        ));
    }
    let master = p.master()?;
    let ours = row.direction == REVERSE
        && row.master_target.as_deref() == Some(master)
        && row.home_disks == p.home_disks;
    if row.direction != FORWARD && !ours {
        return Err(format!(
            "machine {m} is already {} to master target {}",
            row.direction,
            row.master_target.as_deref().unwrap_or("?")
        ));
    }
    w.host_working(master, "a reprotect").await
}

/// The sync item's disks: each disk's failover point onto its home disk.
pub fn sync_op(p: &Params) -> Result<WorkOp, String> {
    let disks = p
        .points
        .iter()
        .map(|d| {
            let target = p.home_disks.get(&d.disk).cloned().ok_or_else(|| {
                format!("machine {}: disk {} has no home disk", p.machine, d.disk)
            })?;
            Ok(SyncDisk {
                disk: d.disk.clone(),
                point: d.point.clone(),
                target,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(WorkOp::Sync { disks })
}

/// `sync home disks`: one sync item for the machine, given to the master target and
/// waited for. It is not one of the failover's items: what it wrote is the user's
/// disk, never removed.
pub async fn sync_home(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let op = sync_op(p)?;
    let master = p.master()?.to_string();
    w.submit_and_wait(&master, &p.machine, &op, None).await?;
    Ok(())
}

/// `mark reverse`: what the sync took goes into the job's params (bytes per disk),
/// and the machine goes `reverse`.
pub async fn mark_reverse(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    let db = &w.ctx.db;
    let item = work::for_job(db, &w.job.id)
        .await
        .map_err(|e| format!("reading the work items of job {}: {e}", w.job.id))?
        .into_iter()
        .filter(|r| r.op.kind() == "sync" && r.state == "succeeded")
        .max_by_key(|r| r.created_at)
        .ok_or_else(|| format!("job {}: no sync item succeeded", w.job.id))?;
    let synced = item.result.map(|r| r.synced).unwrap_or_default();
    for d in &p.points {
        match synced.iter().find(|s| s.disk == d.disk) {
            None => {
                return Err(format!(
                    "sync item {} reported nothing of disk {}",
                    item.id, d.disk
                ))
            }
            Some(s) if !s.identical => {
                return Err(format!(
                    "home disk {} of disk {} did not read back equal to point {}",
                    p.home_disks.get(&d.disk).map_or("?", String::as_str),
                    d.disk,
                    d.point
                ))
            }
            Some(_) => {}
        }
    }
    if p.synced != synced {
        let mut params = p.clone();
        params.synced = synced;
        let json = serde_json::to_value(&params).map_err(|e| e.to_string())?;
        let owner = w.job.lease_owner.clone().unwrap_or_default();
        if !state::record_params(db, &w.job.id, &owner, &json)
            .await
            .map_err(|e| format!("recording what the sync took: {e}"))?
        {
            return Err(format!("job {} is no longer held by {owner}", w.job.id));
        }
    }
    let master = p.master()?;
    if state::set_reverse(db, m, &w.job.id, master, &p.home_disks)
        .await
        .map_err(|e| format!("marking machine {m} reverse: {e}"))?
    {
        return Ok(());
    }
    Err(format!(
        "machine {m} is no longer committed and forward: its home disks are synced but it \
         was not marked reverse"
    ))
}
