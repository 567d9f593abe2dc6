//! After a failback (docs/failback.md): its commit removes what the failover left
//! at the recovery site (serve, build, start and reverse items), the master target's
//! apply item and the reverse replica `M.reverse`, listing everything deleted in the
//! job, and leaves the machine `failed-back` (its agent still read-only); re-enable
//! then deletes the failover row and waits until the home agent resynced and made a
//! point.

use ferry_link::control::wire::DiskReport;

use super::failback::{record, reverse_machine};
use super::reverse::{live_items, row_of};
use super::state::{self, RecoveryRow};
use super::wait::Waiter;
use super::Params;
use crate::recovery::work;

/// Adds what is not listed yet (a task run again lists the same things once).
fn add_new(list: &mut Vec<String>, more: impl IntoIterator<Item = String>) {
    for x in more {
        if !list.contains(&x) {
            list.push(x);
        }
    }
}

/// Removes the failover's live items on `host`, records what the host deleted, and
/// takes them out of the failover's items. A recovery-site host that is not live (an
/// unplanned failback: the site is lost) cannot delete anything: its items are listed
/// as left instead, so that the failback can still be committed.
async fn remove_on(
    w: &mut Waiter<'_>,
    p: &Params,
    row: &RecoveryRow,
    host: &str,
    may_be_lost: bool,
) -> Result<(), String> {
    let m = &p.machine;
    let items: Vec<String> = live_items(&w.ctx.db, row)
        .await?
        .into_iter()
        .filter(|i| i.host == host)
        .map(|i| i.id)
        .collect();
    if items.is_empty() {
        return Ok(());
    }
    let live = work::hosts(&w.ctx.db)
        .await
        .map_err(|e| format!("reading recovery hosts: {e}"))?
        .iter()
        .any(|h| h.name == host && crate::db::now_s() - h.last_seen <= work::HOST_LIVE_S);
    if !live && may_be_lost {
        let left = items
            .iter()
            .map(|i| format!("{host}: work item {i} (host not live)"));
        record(w, p, |q| add_new(&mut q.left, left)).await?;
    } else {
        super::tasks::remove(w, p, host, items.clone()).await?;
        let deleted: Vec<String> = work::for_job(&w.ctx.db, &w.job.id)
            .await
            .map_err(|e| format!("reading the work items of job {}: {e}", w.job.id))?
            .into_iter()
            .filter(|r| r.host == host && r.op.kind() == "remove")
            .filter_map(|r| r.result)
            .flat_map(|r| r.deleted)
            .map(|d| format!("{host}: {d}"))
            .collect();
        record(w, p, |q| add_new(&mut q.deleted, deleted)).await?;
    }
    if !state::drop_items(&w.ctx.db, m, &w.job.id, &items)
        .await
        .map_err(|e| format!("recording machine {m}'s removed items: {e}"))?
    {
        return Err(format!(
            "machine {m}: its failover changed while its items were removed"
        ));
    }
    Ok(())
}

/// `remove recovery-site copies`: serve, build, start and reverse items on the
/// recovery-site host.
pub async fn remove_site(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let row = row_of(w, &p.machine).await?;
    let Some(host) = row.host.clone() else {
        return Ok(());
    };
    remove_on(w, p, &row, &host, true).await
}

/// `remove master target's apply`.
pub async fn remove_apply(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let row = row_of(w, &p.machine).await?;
    let Some(master) = row.master_target.clone() else {
        return Ok(());
    };
    remove_on(w, p, &row, &master, false).await
}

/// `delete reverse replica`: every object of `M.reverse` in the store, listed in the
/// job before it is deleted (a run again after a kill lists nothing new and deletes
/// what is left).
pub async fn delete_reverse(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let access = w.ctx.store.clone().ok_or_else(|| {
        "this control plane has no store (--store, --key-file): it cannot delete the \
         reverse replica"
            .to_string()
    })?;
    let prefix = format!("machines/{}/", reverse_machine(&p.machine)?);
    let listed = access
        .store
        .list(&prefix)
        .await
        .map_err(|e| format!("listing the reverse replica {prefix}: {e}"))?;
    let paths: Vec<String> = listed.into_iter().map(|l| l.path).collect();
    record(w, p, |q| {
        add_new(&mut q.deleted, paths.iter().map(|x| format!("store: {x}")))
    })
    .await?;
    for path in &paths {
        access
            .store
            .delete(path)
            .await
            .map_err(|e| format!("deleting {path} of the reverse replica: {e}"))?;
    }
    Ok(())
}

/// `mark failed back`.
pub async fn mark_failed_back(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    if state::mark_failed_back(&w.ctx.db, m, &w.job.id)
        .await
        .map_err(|e| format!("marking machine {m} failed back: {e}"))?
    {
        return Ok(());
    }
    Err(format!(
        "machine {m} is no longer committed, reverse and active at home: not marked failed back"
    ))
}

/// `resume home agent`: the time is taken first (a point newer than it is what the
/// next task waits for), then the failover row goes.
pub async fn resume_home(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    if p.since.is_none() {
        record(w, p, |q| q.since = Some(crate::db::now_s())).await?;
    }
    if state::re_enable(&w.ctx.db, m)
        .await
        .map_err(|e| format!("re-enabling machine {m}: {e}"))?
    {
        return Ok(());
    }
    Err(format!("machine {m} is not failed back: it stays as it is"))
}

/// True when every disk reported finished the resync of its re-enable (its
/// `resync` says `re-enable`, `done`: the agent dropped its journal from before the
/// failover and compared the disk with the replica), is `protected`, and has a point
/// uploaded after `since` (the re-enable's start).
pub fn resynced(disks: &[DiskReport], since: i64) -> bool {
    !disks.is_empty()
        && disks.iter().all(|d| {
            let newer = d
                .newest_uploaded_point
                .as_ref()
                .and_then(|pt| chrono::DateTime::parse_from_rfc3339(&pt.time).ok())
                .is_some_and(|t| t.timestamp() > since);
            let done = d
                .resync
                .as_ref()
                .is_some_and(|r| r.reason == "re-enable" && r.phase == "done");
            newer && done && d.state == "protected"
        })
}

/// `wait for home resync`: until the home agent's heartbeat shows every disk
/// resynced for the re-enable and protected with a point uploaded since it started;
/// its disks as reported (with the resync's compared and sent bytes) go into the job.
pub async fn wait_resync(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = p.machine.clone();
    let since = p
        .since
        .ok_or_else(|| format!("job {}: no start time was recorded", w.job.id))?;
    let what =
        format!("machine {m}'s home agent to finish its re-enable resync and upload a point newer than the re-enable");
    loop {
        let row = crate::registry::machines::get(&w.ctx.db, &m)
            .await
            .map_err(|e| format!("reading machine {m}: {e}"))?;
        let disks = row.map(|r| r.disks).unwrap_or_default();
        if resynced(&disks, since) {
            let sent = disks
                .iter()
                .filter_map(|d| d.resync.as_ref())
                .map(|r| r.sent_bytes)
                .sum();
            return record(w, p, |q| {
                q.resynced = disks;
                q.resync_sent_bytes = Some(sent);
            })
            .await;
        }
        w.tick(0.0, &what).await?;
    }
}
