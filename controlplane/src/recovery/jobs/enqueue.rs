//! Queueing a machine job: everything that can be refused is refused here, before a
//! job exists (unknown machine 404; bad point, target or host 400; a job already
//! active on the machine, a machine in the wrong failover state, no live recovery
//! host 409; no store 503), so that a queued job fails only on what happens later.

use std::sync::Arc;

use ferry_link::control::wire::DiskPoint;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::error::ApiError;
use crate::db::Db;
use crate::error::Error;
use crate::jobs::runner::StoreAccess;
use crate::jobs::{queue, Job};
use crate::recovery::points::{choose, open_machine, PointSpec};
use crate::recovery::{group, work};

use super::state::{self, RecoveryRow, COMMITTED, FAILED_OVER, PREPARING};
use super::*;

/// `POST /v1/machines/{name}/test-failover`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestFailoverRequest {
    /// `latest`, `latest-app`, `latest-group`, a point id, or an RFC 3339 time.
    pub point: String,
    pub target: Target,
    /// A recovery host's name; default: the least loaded live one.
    #[serde(default)]
    pub host: Option<String>,
}

/// `POST /v1/machines/{name}/failover`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// true: the source stops writing and takes a final point, failed over to once
    /// uploaded (no acknowledged write lost). false: from what the replica holds.
    pub planned: bool,
    /// Unplanned only (default `latest`).
    #[serde(default)]
    pub point: Option<String>,
    pub target: Target,
    #[serde(default)]
    pub host: Option<String>,
    /// `recovery` (the default): to the recovery site. `home` is a failback and takes
    /// a `FailbackRequest` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
}

/// `POST /v1/machines/{name}/failover` with `"direction": "home"`: failback
/// (docs/failback.md).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailbackRequest {
    /// `home`.
    pub direction: String,
    /// true (default): the recovery-site machine is frozen and its final point
    /// applied and verified at home. false (the recovery site is lost): the newest
    /// reverse point in the store, or applied so far.
    #[serde(default = "yes")]
    pub planned: bool,
}

fn yes() -> bool {
    true
}

/// `POST /v1/machines/{name}/change-point`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePointRequest {
    pub point: String,
    /// Default: the target the failover used.
    #[serde(default)]
    pub target: Option<Target>,
}

/// `POST /v1/machines/{name}/reprotect` (docs/failback.md).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReprotectRequest {
    /// The recovery host at the home site that writes the home disks.
    pub master_target: String,
    /// Every disk of the machine: its path on the master target (the original disk,
    /// or a new one at least the disk's size).
    pub disks: std::collections::BTreeMap<String, String>,
}

/// The longest home disk path taken.
pub const MAX_HOME_PATH_BYTES: usize = 1024;

/// `commit` and `cancel` take no parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

fn parse<T: serde::de::DeserializeOwned>(kind: &str, v: &serde_json::Value) -> Result<T, ApiError> {
    let v = if v.is_null() {
        serde_json::json!({})
    } else {
        v.clone()
    };
    serde_json::from_value(v).map_err(|e| ApiError::BadRequest(format!("a {kind} job: {e}")))
}

fn conflict_state(machine: &str, row: &Option<RecoveryRow>, want: &str) -> ApiError {
    let is = match row {
        None => "protected at home (not failed over)".to_string(),
        Some(r) => format!(
            "{} (job {})",
            r.state,
            r.job_id.as_deref().unwrap_or("none")
        ),
    };
    ApiError::Conflict(format!("machine {machine} is {is}: {want}"))
}

/// Checks and queues a `kind` job on `machine` with `request` (the POST's body):
/// the job as queued, or the error its POST answers. Recovery plans queue their
/// machines' jobs through here too. The caller wakes the runner.
pub async fn enqueue_machine_job(
    db: &Db,
    store: Option<&Arc<StoreAccess>>,
    kind: &str,
    machine: &str,
    request: &serde_json::Value,
) -> Result<Job, ApiError> {
    crate::api::machines::checked("machine", machine)?;
    if !KINDS.contains(&kind) {
        return Err(ApiError::BadRequest(format!(
            "no machine job of kind {kind:?}: one of {}",
            KINDS.join(", ")
        )));
    }
    // A failback waits for its commit: the commit resumes it (the recovery-site
    // copy is frozen: it is never cancelled).
    if let Some((id, k, st)) = state::active_job(db, machine).await? {
        let waiting = k == FAILBACK && st == crate::jobs::JobState::WaitingForInput.as_str();
        if waiting && kind == COMMIT {
            let _: NoParams = parse(kind, request)?;
            let input = serde_json::json!({"commit": true});
            return match queue::resume_with(db, &id, Some(&input)).await? {
                queue::Outcome::Done(job) => Ok(job),
                _ => Err(busy(db, machine).await),
            };
        }
        if waiting && kind == CANCEL_FAILOVER {
            return Err(ApiError::Conflict(format!(
                "machine {machine}'s failback job {id} froze its recovery-site copy (its \
                 exports read-only) and nothing unfreezes it: commit it \
                 (`ferry cp machines commit {machine}`)"
            )));
        }
        // The job in the way first: the failover state it is changing says less.
        return Err(busy(db, machine).await);
    }
    let row = state::get(db, machine).await?;
    let failed_over = row
        .as_ref()
        .is_some_and(|r| r.state == FAILED_OVER || r.state == COMMITTED);
    let mut p = Params {
        machine: machine.to_string(),
        point: None,
        points: Vec::new(),
        target: None,
        host: None,
        planned: None,
        note: None,
        verdict: None,
        notes: None,
        verdict_at: None,
        master_target: None,
        home_disks: Default::default(),
        ..Params::default()
    };
    let tasks: Vec<&str> = match kind {
        TEST_FAILOVER => {
            let r: TestFailoverRequest = parse(kind, request)?;
            if row.is_some() {
                return Err(conflict_state(
                    machine,
                    &row,
                    "a test failover tests the replica of a machine protected at home",
                ));
            }
            p.target = Some(checked_target(r.target)?);
            resolve(db, store, &mut p, &r.point).await?;
            p.host = Some(choose_host(db, r.host.as_deref()).await?);
            vec![BRING_UP, START, WAIT_CLEANUP, CLEAN_UP, RECORD_VERDICT]
        }
        FAILOVER => {
            let r: FailoverRequest = parse(kind, request)?;
            if let Some(d) = r.direction.as_deref().filter(|d| *d != "recovery") {
                return Err(ApiError::BadRequest(format!(
                    "direction {d:?} must be recovery (a failover) or home (a failback)"
                )));
            }
            if failed_over {
                return Err(conflict_state(machine, &row, "it is already failed over"));
            }
            p.target = Some(checked_target(r.target)?);
            p.planned = Some(r.planned);
            if r.planned {
                if r.point.is_some() {
                    return Err(ApiError::BadRequest(
                        "a planned failover fails over to the final point its source takes: \
                         it takes no point"
                            .into(),
                    ));
                }
                in_store(store, machine).await?;
                let registered = crate::registry::machines::get(db, machine)
                    .await?
                    .is_some_and(|m| !m.removed);
                if !registered {
                    return Err(ApiError::Conflict(format!(
                        "machine {machine} has no registered agent to stop and take a final \
                         point: fail it over with planned false"
                    )));
                }
                p.host = Some(choose_host(db, r.host.as_deref()).await?);
                vec![STOP_WRITES, FINAL_UPLOAD, BRING_UP, MARK_FAILED_OVER, START]
            } else {
                let point = r.point.unwrap_or_else(|| "latest".into());
                resolve(db, store, &mut p, &point).await?;
                p.host = Some(choose_host(db, r.host.as_deref()).await?);
                vec![FENCE, BRING_UP, START]
            }
        }
        CHANGE_POINT => {
            let r: ChangePointRequest = parse(kind, request)?;
            let Some(current) = row.as_ref().filter(|r| r.state == FAILED_OVER) else {
                return Err(conflict_state(
                    machine,
                    &row,
                    "change-point needs a failover not committed",
                ));
            };
            let target = match r.target {
                Some(t) => t,
                None => current_target(db, current).await?.ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "machine {machine}'s failover has no disks up: give a target"
                    ))
                })?,
            };
            p.target = Some(checked_target(target)?);
            resolve(db, store, &mut p, &r.point).await?;
            p.host = Some(failover_host(db, machine, current).await?);
            vec![REMOVE_PREVIOUS, BRING_UP, START]
        }
        COMMIT if row.as_ref().is_some_and(failed_back_waiting) => {
            let _: NoParams = parse(kind, request)?;
            p.host = row.as_ref().and_then(|r| r.host.clone());
            p.master_target = row.as_ref().and_then(|r| r.master_target.clone());
            vec![REMOVE_SITE, REMOVE_APPLY, DELETE_REVERSE, MARK_FAILED_BACK]
        }
        COMMIT => {
            let _: NoParams = parse(kind, request)?;
            if row.as_ref().is_none_or(|r| r.state != FAILED_OVER) {
                return Err(conflict_state(
                    machine,
                    &row,
                    "only a failover not committed commits",
                ));
            }
            vec![MARK_COMMITTED]
        }
        CANCEL_FAILOVER if row.as_ref().is_some_and(failed_back_waiting) => {
            return Err(ApiError::Conflict(format!(
                "machine {machine} failed back: its recovery-site machine is frozen (its \
                 exports read-only) and nothing unfreezes it: commit the failback \
                 (`ferry cp machines commit {machine}`)"
            )));
        }
        CANCEL_FAILOVER => {
            let _: NoParams = parse(kind, request)?;
            let Some(current) = row
                .as_ref()
                .filter(|r| r.state == PREPARING || r.state == FAILED_OVER)
            else {
                return Err(conflict_state(
                    machine,
                    &row,
                    "only a failover preparing or not committed is cancelled",
                ));
            };
            if !current.items.is_empty() {
                p.host = Some(failover_host(db, machine, current).await?);
            }
            vec![REMOVE_RECOVERY, RESUME_SOURCE]
        }
        REPROTECT => {
            let r: ReprotectRequest = parse(kind, request)?;
            // Its reverse replica needs a valid name of its own.
            ferry_replica::layout::reverse_machine(machine)
                .map_err(|e| ApiError::BadRequest(format!("reprotect of {machine}: {e}")))?;
            reprotect(db, machine, &row, r, &mut p).await?;
            vec![
                CHECK_REPROTECT,
                SYNC_HOME,
                START_REVERSE,
                START_APPLY,
                MARK_REVERSE,
            ]
        }
        FAILBACK => {
            let r: FailbackRequest = parse(kind, request)?;
            if r.direction != "home" {
                return Err(ApiError::BadRequest(format!(
                    "a failback's direction is home, not {:?}",
                    r.direction
                )));
            }
            failback(db, machine, &row, r.planned, &mut p).await?;
            let mut tasks = if r.planned {
                vec![
                    CHECK_FAILBACK,
                    STOP_REVERSE,
                    FINAL_ROUND,
                    STOP_APPLY,
                    APPLY_FINAL,
                    MARK_HOME,
                ]
            } else {
                vec![CHECK_FAILBACK, STOP_APPLY, APPLY_FINAL, MARK_HOME]
            };
            // Then it waits for its commit, which this job does itself.
            tasks.extend([
                WAIT_COMMIT,
                REMOVE_SITE,
                REMOVE_APPLY,
                DELETE_REVERSE,
                MARK_FAILED_BACK,
            ]);
            tasks
        }
        RE_ENABLE => {
            let _: NoParams = parse(kind, request)?;
            if row.as_ref().is_none_or(|r| r.state != state::FAILED_BACK) {
                return Err(conflict_state(
                    machine,
                    &row,
                    "re-enable needs a failback committed (`ferry cp machines commit`)",
                ));
            }
            vec![RESUME_HOME, WAIT_RESYNC]
        }
        other => {
            return Err(ApiError::BadRequest(format!(
                "no machine job of kind {other:?}: one of {}",
                KINDS.join(", ")
            )))
        }
    };
    let params = serde_json::to_value(&p).map_err(|e| ApiError::Internal(Box::new(e)))?;
    let tasks: Vec<String> = tasks.into_iter().map(str::to_string).collect();
    let key = job_key(machine);
    let Some(id) = queue::enqueue_keyed(db, kind, machine, Some(&key), &params, &tasks).await?
    else {
        return Err(busy(db, machine).await);
    };
    queue::get(db, &id)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("job {id} vanished once queued").into()))
}

/// The 409 for a machine with an active recovery job, naming it.
pub async fn busy(db: &Db, machine: &str) -> ApiError {
    match state::active_job(db, machine).await {
        Ok(Some((id, kind, st))) => ApiError::Conflict(format!(
            "machine {machine} has a {kind} job {id} that is {st}: one recovery job per \
             machine at a time"
        )),
        _ => ApiError::Conflict(format!("machine {machine} has another recovery job active")),
    }
}

fn checked_target(t: Target) -> Result<Target, ApiError> {
    t.check().map_err(ApiError::BadRequest)?;
    Ok(t)
}

fn store_of(store: Option<&Arc<StoreAccess>>) -> Result<Arc<StoreAccess>, ApiError> {
    store.cloned().ok_or_else(|| {
        ApiError::Unavailable(
            "this control plane has no store (start it with --store and --key-file): recovery \
             reads the replica"
                .into(),
        )
    })
}

fn from_recovery_error(machine: &str, e: Error) -> ApiError {
    match e {
        Error::NoMachine { .. } => ApiError::NotFound(format!("no machine {machine}: {e}")),
        Error::BadPointSpec { .. }
        | Error::NotAPoint { .. }
        | Error::NoPoint { .. }
        | Error::NoGroup { .. }
        | Error::NoGroupPoint { .. } => ApiError::BadRequest(e.to_string()),
        other => ApiError::Internal(Box::new(other)),
    }
}

/// 404 unless the store holds the machine.
async fn in_store(store: Option<&Arc<StoreAccess>>, machine: &str) -> Result<(), ApiError> {
    let access = store_of(store)?;
    let m = machine.to_string();
    tokio::task::spawn_blocking(move || open_machine(&access.store, &m, None).map(|_| ()))
        .await
        .map_err(|e| ApiError::Internal(Box::new(e)))?
        .map_err(|e| from_recovery_error(machine, e))
}

/// Resolves `spec` to a point of every disk of the machine, in the store.
async fn resolve(
    db: &Db,
    store: Option<&Arc<StoreAccess>>,
    p: &mut Params,
    spec: &str,
) -> Result<(), ApiError> {
    let access = store_of(store)?;
    let machine = p.machine.clone();
    // latest-group: the newest point every member of the machine's group holds.
    let want = if spec == "latest-group" {
        let m = crate::registry::machines::get(db, &machine).await?;
        let g = m.and_then(|m| m.group).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "point latest-group: machine {machine} is in no replication group"
            ))
        })?;
        Err(g)
    } else {
        Ok(spec
            .parse::<PointSpec>()
            .map_err(|e| ApiError::BadRequest(e.to_string()))?)
    };
    let m = machine.clone();
    let chosen = tokio::task::spawn_blocking(move || {
        let spec = match want {
            Ok(s) => s,
            Err(g) => {
                let (members, id) = group::latest_group_point(&access.store, &g)?;
                if !members.contains(&m) {
                    return Err(Error::NoGroupPoint {
                        group: g,
                        members: format!("{} (not {m})", members.join(", ")),
                    });
                }
                PointSpec::Id(id)
            }
        };
        let disks = open_machine(&access.store, &m, None)?;
        let (points, note) = choose(&m, &disks, &spec)?;
        Ok(disks
            .iter()
            .zip(points)
            .map(|(d, pt)| DiskPoint {
                disk: d.name.clone(),
                point: pt.id,
            })
            .collect::<Vec<_>>())
        .map(|v| (v, note))
    })
    .await
    .map_err(|e| ApiError::Internal(Box::new(e)))?
    .map_err(|e| from_recovery_error(&machine, e))?;
    p.point = Some(spec.to_string());
    p.points = chosen.0;
    p.note = chosen.1;
    Ok(())
}

/// `host` if it is a live recovery host, else the least loaded live one.
async fn choose_host(db: &Db, host: Option<&str>) -> Result<String, ApiError> {
    let now = crate::db::now_s();
    let Some(name) = host else {
        return work::least_loaded_host(db, now).await?.ok_or_else(|| {
            ApiError::Conflict(format!(
                "no live recovery host (none seen within {} s): start `ferry recovery-host` \
                 or name one with host",
                work::HOST_LIVE_S
            ))
        });
    };
    crate::api::machines::checked("recovery host", name)?;
    working_host(db, name).await.map(|()| name.to_string())
}

/// A live host that reaches the store (409 saying why not): one that builds,
/// serves, sends or applies from the store. A removal needs only a live host.
async fn working_host(db: &Db, name: &str) -> Result<(), ApiError> {
    match live_host(db, name).await?.store_refusal() {
        Some(e) => Err(ApiError::Conflict(e)),
        None => Ok(()),
    }
}

/// The host's row, if it is live.
async fn live_host(db: &Db, name: &str) -> Result<work::HostRow, ApiError> {
    let now = crate::db::now_s();
    let h = work::hosts(db)
        .await?
        .into_iter()
        .find(|h| h.name == name)
        .ok_or_else(|| ApiError::BadRequest(format!("no recovery host {name}")))?;
    if now - h.last_seen > work::HOST_LIVE_S {
        return Err(ApiError::Conflict(format!(
            "recovery host {name} is not live: last seen {} s ago",
            now - h.last_seen
        )));
    }
    Ok(h)
}

/// The host of a failover, which must be live to remove or bring up its disks.
async fn failover_host(db: &Db, machine: &str, row: &RecoveryRow) -> Result<String, ApiError> {
    let host = row.host.clone().ok_or_else(|| {
        ApiError::Conflict(format!(
            "machine {machine}'s failover names no recovery host"
        ))
    })?;
    live_host(db, &host).await?;
    Ok(host)
}

/// The target the failover's disks were brought up on (its first build or serve
/// item).
async fn current_target(db: &Db, row: &RecoveryRow) -> Result<Option<Target>, ApiError> {
    let items = work::get_in_order(db, &row.items).await?;
    Ok(items.iter().find_map(|i| Target::of_op(&i.op)))
}

/// Checks a reprotect of `machine` and fills its params: the machine is failed over
/// and committed, not reprotected yet (409); the master target is a live recovery
/// host (400 unknown, 409 not live); `disks` names every disk of the failover point
/// and no other, each at an absolute path (400) that no other machine's reprotect,
/// done or queued, uses on that host (409).
async fn reprotect(
    db: &Db,
    machine: &str,
    row: &Option<RecoveryRow>,
    r: ReprotectRequest,
    p: &mut Params,
) -> Result<(), ApiError> {
    let Some(current) = row.as_ref().filter(|r| r.state == COMMITTED) else {
        return Err(conflict_state(
            machine,
            row,
            "reprotect needs a failover committed (`ferry cp machines commit`)",
        ));
    };
    if current.direction != state::FORWARD {
        return Err(ApiError::Conflict(format!(
            "machine {machine} is already reprotected ({} to master target {})",
            current.direction,
            current.master_target.as_deref().unwrap_or("?")
        )));
    }
    let points = current
        .point
        .clone()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "machine {machine}'s failover records no point: nothing to reprotect from"
            ))
        })?;
    crate::api::machines::checked("master target", &r.master_target)?;
    working_host(db, &r.master_target).await?;
    if let Some(d) = r.disks.keys().find(|d| !points.contains_key(*d)) {
        return Err(ApiError::BadRequest(format!(
            "machine {machine} has no disk {d} (its disks: {})",
            points.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    if let Some(d) = points.keys().find(|d| !r.disks.contains_key(*d)) {
        return Err(ApiError::BadRequest(format!(
            "disk {d} of machine {machine} has no home disk: give each disk's path \
             (--disk {d}=PATH)"
        )));
    }
    let mut seen = std::collections::BTreeMap::new();
    for (disk, path) in &r.disks {
        if !path.starts_with('/') || path.contains('\0') || path.len() > MAX_HOME_PATH_BYTES {
            return Err(ApiError::BadRequest(format!(
                "disk {disk}: home disk path {path:?} must be absolute, without NUL, at most \
                 {MAX_HOME_PATH_BYTES} bytes"
            )));
        }
        if let Some(other) = seen.insert(path.as_str(), disk.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "disks {other} and {disk} of machine {machine} both name home disk {path}"
            )));
        }
    }
    for (m, host, disk, path) in state::home_disks(db).await? {
        if m != machine && host == r.master_target && seen.contains_key(path.as_str()) {
            return Err(ApiError::Conflict(format!(
                "home disk {path} on {host} is disk {disk} of machine {m}, reprotected: \
                 one machine's disk per path"
            )));
        }
    }
    for (job, m, params) in state::active_reprotects(db).await? {
        let Ok(other) = serde_json::from_value::<Params>(params) else {
            continue;
        };
        if m == machine || other.master_target.as_deref() != Some(r.master_target.as_str()) {
            continue;
        }
        if let Some((disk, path)) = other
            .home_disks
            .iter()
            .find(|(_, path)| seen.contains_key(path.as_str()))
        {
            return Err(ApiError::Conflict(format!(
                "home disk {path} on {} is disk {disk} of machine {m}, whose reprotect job \
                 {job} is active: one machine's disk per path",
                r.master_target
            )));
        }
    }
    p.points = points
        .into_iter()
        .map(|(disk, point)| DiskPoint { disk, point })
        .collect();
    p.host = current.host.clone();
    p.master_target = Some(r.master_target);
    p.home_disks = r.disks;
    Ok(())
}

/// A failback done and waiting for its commit: committed, reverse, active at home.
fn failed_back_waiting(r: &RecoveryRow) -> bool {
    r.state == COMMITTED && r.direction == state::REVERSE && r.active_site == "home"
}

/// Checks a failback of `machine` and fills its params: reprotected (committed,
/// reverse, active at the recovery site) with its apply item running on the master
/// target (409); the master target live (409), and for a planned failback the
/// recovery-site host too.
async fn failback(
    db: &Db,
    machine: &str,
    row: &Option<RecoveryRow>,
    planned: bool,
    p: &mut Params,
) -> Result<(), ApiError> {
    let Some(current) = row else {
        return Err(conflict_state(
            machine,
            row,
            "failback needs a reprotected machine",
        ));
    };
    super::failback::check_row(current, None).map_err(ApiError::Conflict)?;
    let master = current
        .master_target
        .clone()
        .ok_or_else(|| ApiError::Conflict(format!("machine {machine} names no master target")))?;
    let items = super::reverse::live_items(db, current)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    if super::failback::running_apply(&items, &master).is_none() {
        return Err(ApiError::Conflict(format!(
            "machine {machine} has no apply item running on master target {master}: its \
             reverse replication is not running (reprotect it first)"
        )));
    }
    working_host(db, &master).await?;
    if planned {
        // Its last round puts the final points in the store.
        let host = failover_host(db, machine, current).await?;
        working_host(db, &host).await?;
        p.host = Some(host);
    } else {
        p.host = current.host.clone();
    }
    p.planned = Some(planned);
    p.master_target = Some(master);
    p.home_disks = current.home_disks.clone();
    p.points = current
        .point
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(disk, point)| DiskPoint { disk, point })
        .collect();
    Ok(())
}
