//! The tasks of a failback job (docs/failback.md, `POST /v1/machines/M/failover`
//! with `"direction": "home"`): the reprotected machine comes home.
//!
//! Planned: the running reverse item is stopped and a last one freezes the
//! recovery-site machine (its start process stopped, its exports read-only), sends
//! one last round and ends with the final point of each disk; the running apply
//! item is stopped and a new one applies up to exactly those points and checks every
//! block of each home disk against the final checksum map; then the machine is
//! active at home, waiting for the failback's commit.
//!
//! Unplanned (the recovery site is lost): the apply stops and a new one applies up
//! to the newest reverse point in the store (or the newest applied so far), verified
//! where the host can (it says `verified: false` otherwise).
//!
//! The continuous items are stopped (removed) before the last ones start: the home
//! disk and the reverse replica each have one writer at a time.

use ferry_link::control::wire::{AppliedDisk, DiskPoint, WorkOp};

use super::reverse::{self, live_items, row_of};
use super::state::{self, RecoveryRow, COMMITTED, REVERSE};
use super::wait::Waiter;
use super::Params;
use crate::recovery::points::open_machine;

/// The reverse replica of `machine` in the store (the replica layout's rule).
pub fn reverse_machine(machine: &str) -> Result<String, String> {
    ferry_replica::layout::reverse_machine(machine).map_err(|e| e.to_string())
}

fn host_of(row: &RecoveryRow) -> Result<String, String> {
    row.host.clone().ok_or_else(|| {
        format!(
            "machine {}: its failover names no recovery host",
            row.machine
        )
    })
}

/// What a failback needs of the row, at the POST and when the job runs: committed,
/// reverse, still active at the recovery site (or at home by this very job).
pub fn check_row(row: &RecoveryRow, job_id: Option<&str>) -> Result<(), String> {
    let m = &row.machine;
    if row.state != COMMITTED || row.direction != REVERSE {
        return Err(format!(
            "machine {m} is {} and {}: failback needs a reprotected machine (committed, \
             reverse; `ferry cp machines reprotect`)",
            row.state, row.direction
        ));
    }
    let ours = job_id.is_some() && row.job_id.as_deref() == job_id;
    if row.active_site != "recovery" && !ours {
        return Err(format!(
            "machine {m} is already active at {}: commit its failback",
            row.active_site
        ));
    }
    Ok(())
}

/// The running apply item of a reprotected machine, if any (its master target's).
pub fn running_apply<'a>(
    items: &'a [crate::recovery::work::WorkRow],
    master: &str,
) -> Option<&'a crate::recovery::work::WorkRow> {
    items
        .iter()
        .find(|i| i.op.kind() == "apply" && i.host == master && !i.is_ended())
}

/// `check failback`: the machine is still reprotected, and the master target is
/// heartbeating (a planned failback needs the recovery-site host too).
pub async fn check(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let row = row_of(w, &p.machine).await?;
    check_row(&row, Some(&w.job.id))?;
    w.host_working(p.master()?, "a failback").await?;
    if p.planned != Some(false) {
        w.host_working(&host_of(&row)?, "a planned failback")
            .await?;
    }
    Ok(())
}

/// Gives `host` a remove item for the failover's live items of `kind` there, waits
/// for it, and takes them out of the failover's items.
async fn stop_items(w: &mut Waiter<'_>, p: &Params, host: &str, kind: &str) -> Result<(), String> {
    let m = &p.machine;
    let row = row_of(w, m).await?;
    let items: Vec<String> = live_items(&w.ctx.db, &row)
        .await?
        .into_iter()
        .filter(|i| i.op.kind() == kind && i.host == host && !is_ours(w, i))
        .map(|i| i.id)
        .collect();
    if items.is_empty() {
        return Ok(());
    }
    super::tasks::remove(w, p, host, items.clone()).await?;
    if !state::drop_items(&w.ctx.db, m, &w.job.id, &items)
        .await
        .map_err(|e| format!("recording machine {m}'s stopped {kind} items: {e}"))?
    {
        return Err(format!(
            "machine {m}: its failover changed while its {kind} items were stopped"
        ));
    }
    Ok(())
}

/// An item this job gave (the last round, the final apply): never stopped by it.
fn is_ours(w: &Waiter<'_>, i: &crate::recovery::work::WorkRow) -> bool {
    i.job_id == w.job.id
}

/// `stop reverse replication` (planned): the continuous reverse item goes.
pub async fn stop_reverse(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let row = row_of(w, &p.machine).await?;
    let host = host_of(&row)?;
    stop_items(w, p, &host, "reverse").await
}

/// `take final point` (planned): a last reverse item freezes the machine at the
/// recovery site and ends with the final point of each disk, recorded in the job.
pub async fn final_round(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = p.machine.clone();
    let row = row_of(w, &m).await?;
    let host = host_of(&row)?;
    let items = live_items(&w.ctx.db, &row).await?;
    let op = WorkOp::Reverse {
        disks: reverse::reverse_disks(p, &row, &items)?,
        interval_s: reverse::interval_s(&w.ctx.db, &m).await?,
        last: true,
    };
    let item = w
        .submit_and_wait(&host, &m, &op, Some(&[COMMITTED]))
        .await?;
    let rounds = item.result.map(|r| r.rounds).unwrap_or_default();
    let mut finals = Vec::with_capacity(p.points.len());
    for d in &p.points {
        let r = rounds.iter().find(|r| r.disk == d.disk).ok_or_else(|| {
            format!(
                "the last reverse item {} reported no final point of disk {}",
                item.id, d.disk
            )
        })?;
        finals.push(DiskPoint {
            disk: d.disk.clone(),
            point: r.point.clone(),
        });
    }
    record(w, p, |q| q.final_points = finals).await
}

/// Writes `change` into the job's params while this runner holds the job.
pub(super) async fn record(
    w: &Waiter<'_>,
    p: &Params,
    change: impl FnOnce(&mut Params),
) -> Result<(), String> {
    let mut params = p.clone();
    change(&mut params);
    if params == *p {
        return Ok(());
    }
    let json = serde_json::to_value(&params).map_err(|e| e.to_string())?;
    let owner = w.job.lease_owner.clone().unwrap_or_default();
    if !state::record_params(&w.ctx.db, &w.job.id, &owner, &json)
        .await
        .map_err(|e| format!("recording job {}'s params: {e}", w.job.id))?
    {
        return Err(format!("job {} is no longer held by {owner}", w.job.id));
    }
    Ok(())
}

/// `stop applying`: the continuous apply item goes (unplanned: its newest applied
/// points are kept in the job first, as the fallback for the points to apply).
pub async fn stop_apply(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let master = p.master()?.to_string();
    if p.planned == Some(false) && p.final_points.is_empty() {
        let row = row_of(w, &p.machine).await?;
        let items = live_items(&w.ctx.db, &row).await?;
        let applied = running_apply(&items, &master)
            .and_then(|i| i.result.as_ref())
            .map(|r| r.applied.clone())
            .unwrap_or_default();
        let newest = newest_points(w, p, &applied).await?;
        record(w, p, |q| q.final_points = newest).await?;
    }
    stop_items(w, p, &master, "apply").await
}

/// Unplanned: per disk, the newest point of the reverse replica in the store, else
/// the newest the apply reported applied; a disk with neither fails the job (its
/// home disk holds no round to fail back to).
async fn newest_points(
    w: &Waiter<'_>,
    p: &Params,
    applied: &[AppliedDisk],
) -> Result<Vec<DiskPoint>, String> {
    let in_store = match w.ctx.store.clone() {
        None => Vec::new(),
        Some(access) => {
            let name = reverse_machine(&p.machine)?;
            tokio::task::spawn_blocking(move || match open_machine(&access.store, &name, None) {
                Ok(disks) => Ok(disks
                    .iter()
                    .filter_map(|d| Some((d.name.clone(), d.state.latest_point()?.id.clone())))
                    .collect()),
                Err(crate::error::Error::NoMachine { .. }) => Ok(Vec::new()),
                Err(e) => Err(e.to_string()),
            })
            .await
            .map_err(|e| format!("reading the store: {e}"))?
            .map_err(|e| format!("reading machine {}'s reverse points: {e}", p.machine))?
        }
    };
    p.points
        .iter()
        .map(|d| {
            let point = in_store
                .iter()
                .find(|(disk, _)| *disk == d.disk)
                .map(|(_, pt)| pt.clone())
                .or_else(|| {
                    applied
                        .iter()
                        .find(|a| a.disk == d.disk)
                        .map(|a| a.point.clone())
                })
                .ok_or_else(|| {
                    format!(
                        "disk {} of machine {} has no reverse point in the store nor applied: \
                         nothing to fail back to",
                        d.disk, p.machine
                    )
                })?;
            Ok(DiskPoint {
                disk: d.disk.clone(),
                point,
            })
        })
        .collect()
}

/// `apply final point`: an apply item up to exactly the job's final points, with
/// verify, waited for; a planned failback needs every disk verified.
pub async fn apply_final(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = p.machine.clone();
    let master = p.master()?.to_string();
    if p.final_points.is_empty() {
        return Err(format!("job {}: no final point was chosen", w.job.id));
    }
    let op = WorkOp::Apply {
        disks: reverse::apply_disks(p)?,
        interval_s: reverse::interval_s(&w.ctx.db, &m).await?,
        until: p.final_points.clone(),
        verify: true,
    };
    let item = w
        .submit_and_wait(&master, &m, &op, Some(&[COMMITTED]))
        .await?;
    let applied = item.result.map(|r| r.applied).unwrap_or_default();
    for d in &p.final_points {
        let a = applied
            .iter()
            .find(|a| a.disk == d.disk)
            .ok_or_else(|| format!("apply item {} reported nothing of disk {}", item.id, d.disk))?;
        if a.point != d.point {
            return Err(format!(
                "apply item {} applied disk {} up to point {}, not {}",
                item.id, d.disk, a.point, d.point
            ));
        }
        if p.planned != Some(false) && a.verified != Some(true) {
            return Err(format!(
                "home disk {} of disk {} was not verified against final point {}",
                p.home_disks.get(&d.disk).map_or("?", String::as_str),
                d.disk,
                d.point
            ));
        }
    }
    record(w, p, |q| q.applied = applied).await
}

/// `wait for commit`: the machine is active at home; the job waits until
/// `POST /v1/machines/M/commit` resumes it (`{"commit": true}`), then removes the
/// recovery-site copies itself (`failed_back`).
pub fn wait_commit(w: &Waiter<'_>, p: &Params) -> crate::jobs::Step {
    let m = &p.machine;
    if w.job.input.is_some() {
        return crate::jobs::Step::Done;
    }
    crate::jobs::Step::Wait(format!(
        "machine {m} is active at home: commit its failback with POST \
         /v1/machines/{m}/commit (`ferry cp machines commit {m}`), which removes the \
         recovery-site copies and the reverse replica; it is not cancelled (the \
         recovery-site copy is frozen)"
    ))
}

/// `mark active at home`.
pub async fn mark_home(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    if state::set_active_home(&w.ctx.db, m, &w.job.id)
        .await
        .map_err(|e| format!("marking machine {m} active at home: {e}"))?
    {
        return Ok(());
    }
    Err(format!(
        "machine {m} is no longer committed and reverse: its home disks hold the final \
         point but it was not marked active at home"
    ))
}
