//! The retention job: compaction of one machine's points older than its policy's
//! window (`retention_hours`), one task per disk. Queued for every machine in the
//! store at start and every hour after (`schedule_loop`); a machine that already has
//! an active retention job gets no second one.

use ferry_replica::layout::is_reverse;
use std::sync::Arc;
use std::time::Duration;

use ferry_replica::disk::list_disks;
use ferry_replica::layout;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::queue;
use super::runner::{Context, StoreAccess};
use super::singleton::Singleton;
use super::Job;
use crate::db::{self, Db};
use crate::policy::{Policy, DEFAULT_NAME};

pub const KIND: &str = "retention";

/// How often every machine's retention is queued.
pub const EVERY: Duration = Duration::from_secs(3600);

/// A retention job's parameters, fixed when it is queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub machine: String,
    /// The policy the window came from.
    pub policy: String,
    pub retention_hours: u32,
    /// Task i compacts `disks[i]`.
    pub disks: Vec<String>,
}

/// The machines in the store and their disks.
async fn machines_in_store(
    access: &Arc<StoreAccess>,
) -> Result<Vec<(String, Vec<String>)>, String> {
    let access = access.clone();
    // The store's calls block their thread (`Store::block`).
    tokio::task::spawn_blocking(move || {
        let store = &access.store;
        let machines = store
            .block(store.list_dirs(&layout::machines()))
            .map_err(|e| format!("listing the machines in store {}: {e}", store.name()))?;
        machines
            .into_iter()
            .map(|m| {
                let disks = store
                    .block(list_disks(store, &m))
                    .map_err(|e| format!("listing the disks of machine {m}: {e}"))?;
                Ok((m, disks))
            })
            .collect()
    })
    .await
    .map_err(|e| format!("listing the store: {e}"))?
}

/// The policy of `machine`: the machines table's `policy` column where the registry
/// has a row for it, else `default`. A database without the registry's table (or a
/// machine it does not list) is not an error: every machine in the store is kept for
/// some window.
async fn policy_of(db: &Db, machine: &str) -> crate::db::Result<Policy> {
    let named = sqlx::query("SELECT policy FROM machines WHERE name = $1")
        .bind(machine.to_string())
        .fetch_optional(db.pool())
        .await
        .ok()
        .flatten()
        .and_then(|row| row.try_get::<String, _>("policy").ok())
        .unwrap_or_else(|| DEFAULT_NAME.to_string());
    if let Some(p) = db::policies::get(db, &named).await? {
        return Ok(p);
    }
    Ok(db::policies::get(db, DEFAULT_NAME)
        .await?
        .unwrap_or_else(Policy::default_policy))
}

/// Queues one retention job per machine in the store (none for a machine with an
/// active one); the ids queued.
pub async fn schedule(db: &Db, access: &Arc<StoreAccess>) -> Result<Vec<String>, String> {
    let mut queued = Vec::new();
    for (machine, disks) in machines_in_store(access).await? {
        // A failback's reverse replica (`M.reverse`, docs/failback.md): its points
        // are applied at home in order and the failback's commit deletes it whole,
        // so retention never compacts or prunes it (a compaction would fold points
        // the master target has not applied yet).
        if disks.is_empty() || is_reverse(&machine) {
            continue;
        }
        let policy = policy_of(db, &machine).await.map_err(|e| e.to_string())?;
        let params = Params {
            machine: machine.clone(),
            policy: policy.name.clone(),
            retention_hours: policy.retention_hours,
            disks: disks.clone(),
        };
        let tasks: Vec<String> = disks.iter().map(|d| format!("compact disk {d}")).collect();
        let json = serde_json::to_value(&params).map_err(|e| e.to_string())?;
        if let Some(id) = queue::enqueue(db, KIND, &machine, &json, &tasks)
            .await
            .map_err(|e| e.to_string())?
        {
            queued.push(id);
        }
    }
    Ok(queued)
}

/// At start, every `every` after and whenever this control plane takes `lease` over,
/// while it holds it (of several on one database, one schedules): `schedule`, then
/// wakes the runner.
pub async fn schedule_loop(ctx: Context, every: Duration, lease: Singleton) {
    let Some(access) = ctx.store.clone() else {
        // A warning, so that the default log level shows it: points then pile up.
        tracing::warn!("no --store: no retention jobs are scheduled (points are never compacted by this control plane)");
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gains = lease.gains();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // Taken over (from another control plane, or from this one's previous
            // process after a kill): schedule now, as a start would, rather than
            // at this one's next tick up to `every` later.
            Ok(()) = gains.changed() => {}
        }
        if !lease.held() {
            continue;
        }
        match schedule(&ctx.db, &access).await {
            Ok(ids) => {
                tracing::info!("retention: {} jobs queued", ids.len());
                if !ids.is_empty() {
                    ctx.wake.notify_one();
                }
            }
            Err(e) => tracing::warn!("retention: scheduling: {e}"),
        }
    }
}

/// Task `seq`: compacts disk `disks[seq]`. Compaction is idempotent (a second run
/// over the same window finds nothing to drop), as a task must be.
pub async fn run_task(ctx: &Context, job: &Job, seq: usize) -> Result<(), String> {
    let access = ctx
        .store
        .clone()
        .ok_or("this control plane has no --store; start it with --store and --key-file")?;
    let params: Params =
        serde_json::from_value(job.params.clone()).map_err(|e| format!("the job's params: {e}"))?;
    let disk = params
        .disks
        .get(seq)
        .cloned()
        .ok_or_else(|| format!("no disk for task {seq}"))?;
    if is_reverse(&params.machine) {
        // A job queued by hand or by an older control plane: nothing is compacted.
        tracing::info!(
            "retention of {}: a reverse replica is never compacted",
            params.machine
        );
        return Ok(());
    }
    let keep = chrono::Duration::hours(i64::from(params.retention_hours));
    let machine = params.machine.clone();
    let report = tokio::task::spawn_blocking(move || {
        crate::recovery::retention::compact_disk(
            &access.store,
            &access.vault,
            &machine,
            &disk,
            keep,
        )
        .map(|r| (disk, r))
    })
    .await
    .map_err(|e| format!("compaction task: {e}"))?;
    let (disk, r) = report.map_err(|e| e.to_string())?;
    tracing::info!(
        "retention of {}/{disk} ({} h): dropped {} points, folded {} segments, deleted {} objects",
        params.machine,
        params.retention_hours,
        r.points_dropped,
        r.segments_folded,
        r.objects_deleted
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_replica::{Disk, Store, VaultKey};

    #[tokio::test]
    async fn schedule_skips_reverse_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
        let store = Store::open(&format!("file://{}/store", dir.path().display())).unwrap();
        let vault = VaultKey::generate();
        for m in ["m1", "m1.reverse"] {
            Disk::open_or_create(&store, m, "sda", &vault, 4096, 256 << 10)
                .await
                .unwrap();
        }
        let access = Arc::new(StoreAccess { store, vault });
        let queued = schedule(&db, &access).await.unwrap();
        assert_eq!(queued.len(), 1, "{queued:?}");
        let job = queue::get(&db, &queued[0]).await.unwrap().unwrap();
        assert_eq!(job.subject, "m1");
        assert!(is_reverse("m1.reverse") && !is_reverse("m1"));
    }
}
