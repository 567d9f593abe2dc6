//! The tasks of a reprotect job (docs/failback.md): the first step of failback. The
//! master target (a recovery host at the home site) makes each home disk equal to
//! the failover point by checksum, writing only the blocks that differ (the points'
//! maps and blocks made at the recovery site, beside the store); then the
//! machine's direction is `reverse`, with its master target and home disks recorded.

use ferry_link::control::wire::{ExchangeDisk, PointDiffDisk, SyncDisk, SyncFrom, WorkOp};

use super::failback::{record, reverse_machine};
use super::reverse::row_of;
use super::state::{self, COMMITTED, FORWARD, REVERSE};
use super::wait::Waiter;
use super::Params;
use crate::recovery::work::WorkRow;

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

/// Each disk's failover point onto its home disk.
pub fn sync_disks(p: &Params) -> Result<Vec<SyncDisk>, String> {
    p.points
        .iter()
        .map(|d| {
            let target = p.home_disks.get(&d.disk).cloned().ok_or_else(|| {
                format!("machine {}: disk {} has no home disk", p.machine, d.disk)
            })?;
            Ok(SyncDisk {
                disk: d.disk.clone(),
                point: d.point.clone(),
                target,
                from: None,
            })
        })
        .collect()
}

/// The items of `sync home disks`, in order (docs/failback.md, "Syncing the home
/// disks"): the master target hashes the home disks, the recovery-site host compares
/// the points' maps with them and stores the differing blocks, the master target
/// writes those and reads every disk back.
pub const SYNC_PARTS: [&str; 3] = ["home-map", "point-diff", "sync"];

/// What item `row` stored for each of `disks`, in their order.
fn exchange_of(row: &WorkRow, disks: &[SyncDisk]) -> Result<Vec<ExchangeDisk>, String> {
    let got = row.result.as_ref().map_or(&[][..], |r| &r.exchange[..]);
    disks
        .iter()
        .map(|d| {
            got.iter()
                .find(|x| x.disk == d.disk)
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "{} item {} reported nothing of disk {}",
                        row.op.kind(),
                        row.id,
                        d.disk
                    )
                })
        })
        .collect()
}

/// `sync home disks`: the chain of `SYNC_PARTS`, a round of it given anew when the
/// task runs again after one failed. Then what each disk took over the wire goes
/// into the job's params (`synced`): fetched by the master target (the points' maps
/// and blocks) and put by it (its home maps). The items are not the failover's: what
/// they wrote is the user's disk, never removed.
pub async fn sync_home(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    let master = p.master()?.to_string();
    let site = row_of(w, m)
        .await?
        .host
        .ok_or_else(|| format!("machine {m}: its failover names no recovery host"))?;
    let disks = sync_disks(p)?;
    let round = w.chain_round(m, &SYNC_PARTS).await?;
    let [home_map, point_diff, sync] = SYNC_PARTS;
    let op = WorkOp::HomeMap {
        disks: disks.clone(),
    };
    let homes = w
        .submit_part_and_wait(&master, m, home_map, round, &op)
        .await?;
    let homes = exchange_of(&homes, &disks)?;
    let op = WorkOp::PointDiff {
        disks: disks
            .iter()
            .zip(&homes)
            .map(|(d, h)| PointDiffDisk {
                disk: d.disk.clone(),
                point: d.point.clone(),
                home_map: h.map.clone(),
            })
            .collect(),
    };
    let diffs = w
        .submit_part_and_wait(&site, m, point_diff, round, &op)
        .await?;
    let diffs = exchange_of(&diffs, &disks)?;
    let op = WorkOp::Sync {
        disks: disks
            .iter()
            .zip(diffs)
            .map(|(d, x)| SyncDisk {
                from: Some(SyncFrom {
                    map: x.map,
                    segments: x.segments,
                }),
                ..d.clone()
            })
            .collect(),
    };
    let done = w.submit_part_and_wait(&master, m, sync, round, &op).await?;
    let mut synced = done.result.map(|r| r.synced).unwrap_or_default();
    for s in &mut synced {
        if let Some(h) = homes.iter().find(|h| h.disk == s.disk) {
            s.bytes_fetched += h.bytes_fetched;
            s.bytes_stored += h.bytes_stored;
        }
    }
    record(w, p, |q| q.synced = synced).await
}

/// `mark reverse`: every disk read back equal to its point (the job's `synced`),
/// the exchange objects of the sync are deleted (when this control plane reaches the
/// store; else a failback's commit deletes them with the reverse replica), and the
/// machine goes `reverse`.
pub async fn mark_reverse(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    let db = &w.ctx.db;
    for d in &p.points {
        match p.synced.iter().find(|s| s.disk == d.disk) {
            None => return Err(format!("the sync reported nothing of disk {}", d.disk)),
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
    delete_exchange(w, p).await?;
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

/// Deletes the objects of every disk's exchange area in the reverse replica
/// (`machines/M.reverse/disks/D/sync/`): what this sync and any earlier round left.
async fn delete_exchange(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let Some(access) = w.ctx.store.clone() else {
        return Ok(());
    };
    let rev = reverse_machine(&p.machine)?;
    for d in &p.points {
        let prefix = ferry_replica::layout::DiskPaths::new(&rev, &d.disk)
            .map_err(|e| e.to_string())?
            .exchange_dir();
        let listed = access
            .store
            .list(&prefix)
            .await
            .map_err(|e| format!("listing the sync's exchange {prefix}: {e}"))?;
        for l in listed {
            access
                .store
                .delete(&l.path)
                .await
                .map_err(|e| format!("deleting {} of the sync's exchange: {e}", l.path))?;
        }
    }
    Ok(())
}
