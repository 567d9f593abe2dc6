//! Plan jobs: one job per plan operation, keyed `plan/PLAN` (one active per plan).
//!
//! Kinds and their tasks, built from the plan as it was when the job was queued (a
//! copy in the job's params, so that editing the plan never changes a running job):
//! - `plan-test-failover`: for each group in order, `group G: before: A` for each
//!   action that runs for a test, `group G: machines` (a `test-failover` machine job
//!   per machine, up once it waits for its cleanup), `group G: after: A`; then
//!   `wait for cleanup` (waits for `{"verdict", "notes"}`), then `group G: clean up`
//!   for each group in reverse order (each machine's test failover resumed with the
//!   verdict, done once it succeeded).
//! - `plan-failover` (planned or unplanned): the groups as above with `failover`
//!   machine jobs, done once they succeeded.
//! - `plan-commit`: `group G: machines` in order (`commit` jobs).
//! - `plan-cancel`: `group G: machines` in reverse order (`cancel-failover` jobs).
//! - `plan-reprotect`: `group G: machines` in order (`reprotect` jobs, each machine's
//!   home disks as the plan job was given them); no actions.
//! - `plan-failback` (planned or unplanned): the groups in order with `failback`
//!   machine jobs and the actions of the failover type whose `directions` hold
//!   `reverse` (`FERRY_DIRECTION=reverse`).
//!
//! The job's params also record what it decided while it ran (each machine's child
//! job, the verdict), written under its lease, so that a task run again after a kill
//! -9 finds them instead of doing the work twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::children::ChildKind;
use super::spec::{Action, Direction, FailoverType, Plan};
use super::{actions, machines};
use crate::db::{q, Db};
use crate::jobs::runner::{Context, StoreAccess};
use crate::jobs::{queue, Job, Step, TaskState};
use crate::recovery::points::PointSpec;

pub const TEST_FAILOVER: &str = "plan-test-failover";
pub const FAILOVER: &str = "plan-failover";
pub const COMMIT: &str = "plan-commit";
pub const CANCEL: &str = "plan-cancel";
pub const REPROTECT: &str = "plan-reprotect";
pub const FAILBACK: &str = "plan-failback";
pub const KINDS: [&str; 6] = [TEST_FAILOVER, FAILOVER, COMMIT, CANCEL, REPROTECT, FAILBACK];

/// The task of a test failover that waits for the operator's verdict.
pub const WAIT_FOR_CLEANUP: &str = "wait for cleanup";

/// The key that keeps one active job per plan.
pub fn plan_key(plan: &str) -> String {
    format!("plan/{plan}")
}

/// Where a machine's disks come up: built files, or NBD exports (instant recovery).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Target {
    Dir { format: DiskFormat },
    Nbd,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFormat {
    Raw,
    Vhd,
}

/// What a plan job does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Operation {
    TestFailover {
        point: String,
        target: Target,
        host: Option<String>,
    },
    Failover {
        planned: bool,
        /// None for a planned failover: the source's final point.
        point: Option<String>,
        target: Target,
        host: Option<String>,
    },
    Commit,
    Cancel,
    /// Failback's first step (docs/failback.md): each machine's home disks on the
    /// master target.
    Reprotect {
        master_target: String,
        /// `{machine: {disk: path on the master target}}`.
        disks: BTreeMap<String, BTreeMap<String, String>>,
    },
    /// The machines home (direction reverse).
    Failback {
        planned: bool,
    },
}

impl Operation {
    pub fn kind(&self) -> &'static str {
        match self {
            Operation::TestFailover { .. } => TEST_FAILOVER,
            Operation::Failover { .. } => FAILOVER,
            Operation::Commit => COMMIT,
            Operation::Cancel => CANCEL,
            Operation::Reprotect { .. } => REPROTECT,
            Operation::Failback { .. } => FAILBACK,
        }
    }

    /// The direction its actions are chosen by (`FERRY_DIRECTION`): reverse for a
    /// failback, forward for everything else.
    pub fn direction(&self) -> Direction {
        match self {
            Operation::Failback { .. } => Direction::Reverse,
            _ => Direction::Forward,
        }
    }

    /// The failover type its actions are chosen by; None: it runs no actions.
    pub fn failover_type(&self) -> Option<FailoverType> {
        match self {
            Operation::TestFailover { .. } => Some(FailoverType::Test),
            Operation::Failover { planned: true, .. } => Some(FailoverType::Planned),
            Operation::Failover { planned: false, .. } => Some(FailoverType::Unplanned),
            Operation::Failback { planned: true } => Some(FailoverType::Planned),
            Operation::Failback { planned: false } => Some(FailoverType::Unplanned),
            Operation::Commit | Operation::Cancel | Operation::Reprotect { .. } => None,
        }
    }

    pub fn child(&self) -> ChildKind {
        match self {
            Operation::TestFailover { .. } => ChildKind::TestFailover,
            Operation::Failover { planned, .. } => ChildKind::Failover { planned: *planned },
            Operation::Commit => ChildKind::Commit,
            Operation::Cancel => ChildKind::CancelFailover,
            Operation::Reprotect { .. } => ChildKind::Reprotect,
            Operation::Failback { planned } => ChildKind::Failback { planned: *planned },
        }
    }

    /// The body of machine `m`'s job (its POST's), given its point.
    pub fn child_params(&self, m: &str, point: Option<&str>) -> Value {
        let with_host = |mut v: Value, host: &Option<String>| {
            if let Some(h) = host {
                v["host"] = json!(h);
            }
            v
        };
        match self {
            Operation::TestFailover { target, host, .. } => {
                with_host(json!({"point": point, "target": target}), host)
            }
            Operation::Failover {
                planned,
                target,
                host,
                ..
            } => {
                let mut v = json!({"planned": planned, "target": target});
                if let Some(p) = point.filter(|_| !planned) {
                    v["point"] = json!(p);
                }
                with_host(v, host)
            }
            Operation::Commit | Operation::Cancel => json!({}),
            Operation::Reprotect {
                master_target,
                disks,
            } => json!({
                "master_target": master_target,
                "disks": disks.get(m).cloned().unwrap_or_default(),
            }),
            Operation::Failback { planned } => json!({"direction": "home", "planned": planned}),
        }
    }
}

/// A plan job's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The plan as it was when the job was queued.
    pub plan: Plan,
    pub operation: Operation,
    /// `forward`, or `reverse` for a failback.
    pub direction: Direction,
    /// The point each machine's job is given: a replication group's members share
    /// one group point, resolved once when the job was queued.
    #[serde(default)]
    pub points: BTreeMap<String, String>,
    /// Each machine's machine job, recorded as it is queued.
    #[serde(default)]
    pub children: BTreeMap<String, String>,
    /// `{"verdict", "notes"}`, once the operator gave it (test failover).
    #[serde(default)]
    pub verdict: Option<Value>,
    /// The manual actions (task indexes) that have shown their text and wait: run
    /// again (the job resumed, with or without input), they go on.
    #[serde(default)]
    pub waited: BTreeSet<usize>,
}

/// What one task of a plan job does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PlanStep {
    /// `plan.groups[group]`'s action `index` of `before` (or `after`).
    Action {
        group: usize,
        after: bool,
        index: usize,
    },
    Machines {
        group: usize,
    },
    WaitForCleanup,
    CleanUp {
        group: usize,
    },
}

/// The tasks of a job with `params`, and their names.
pub fn steps(params: &Params) -> Vec<(PlanStep, String)> {
    let plan = &params.plan;
    let mut out = Vec::new();
    let order: Vec<usize> = match params.operation {
        Operation::Cancel => (0..plan.groups.len()).rev().collect(),
        _ => (0..plan.groups.len()).collect(),
    };
    let ftype = params.operation.failover_type();
    for g in order {
        let group = &plan.groups[g];
        let side = |after: bool, list: &[Action], out: &mut Vec<(PlanStep, String)>| {
            let Some(t) = ftype else { return };
            for (index, a) in list.iter().enumerate() {
                if a.runs_for(t, params.direction) {
                    let which = if after { "after" } else { "before" };
                    out.push((
                        PlanStep::Action {
                            group: g,
                            after,
                            index,
                        },
                        format!("group {}: {which}: {}", group.name, a.name()),
                    ));
                }
            }
        };
        side(false, &group.before, &mut out);
        out.push((
            PlanStep::Machines { group: g },
            format!("group {}: machines", group.name),
        ));
        side(true, &group.after, &mut out);
    }
    if matches!(params.operation, Operation::TestFailover { .. }) {
        out.push((PlanStep::WaitForCleanup, WAIT_FOR_CLEANUP.to_string()));
        for g in (0..plan.groups.len()).rev() {
            out.push((
                PlanStep::CleanUp { group: g },
                format!("group {}: clean up", plan.groups[g].name),
            ));
        }
    }
    out
}

/// Why a plan job was not queued, by the status the API answers.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Db(#[from] crate::db::Error),
}

/// The point each machine of `plan` is given for `point` (`latest`, `latest-app`,
/// `latest-group`, an id or a time): `latest` and `latest-group` become, for the
/// members of one replication group (`machines.group_name`), the newest group point
/// they all hold, found once per group; a machine in no group keeps `latest`.
pub async fn resolve_points(
    db: &Db,
    store: Option<&Arc<StoreAccess>>,
    plan: &Plan,
    point: &str,
) -> Result<BTreeMap<String, String>, PlanError> {
    let group_point = matches!(point, "latest" | "latest-group");
    if !group_point {
        point
            .parse::<PointSpec>()
            .map_err(|e| PlanError::BadRequest(e.to_string()))?;
    }
    let mut by_group: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for m in plan.machines() {
        let row = crate::registry::machines::get(db, m)
            .await?
            .filter(|r| !r.removed)
            .ok_or_else(|| PlanError::BadRequest(format!("plan {}: no machine {m}", plan.name)))?;
        let chosen = match (&row.group, group_point) {
            (Some(g), true) => {
                if let Some(p) = by_group.get(g) {
                    p.clone()
                } else {
                    let p = latest_group_point(store, g).await?;
                    by_group.insert(g.clone(), p.clone());
                    p
                }
            }
            (None, true) => "latest".to_string(),
            (_, false) => point.to_string(),
        };
        out.insert(m.to_string(), chosen);
    }
    Ok(out)
}

async fn latest_group_point(
    store: Option<&Arc<StoreAccess>>,
    group: &str,
) -> Result<String, PlanError> {
    let Some(access) = store.cloned() else {
        return Err(PlanError::Conflict(format!(
            "the control plane has no --store: the group point of replication group {group} \
             cannot be found"
        )));
    };
    let g = group.to_string();
    // The store's calls block their thread (`Store::block`).
    tokio::task::spawn_blocking(move || {
        crate::recovery::group::latest_group_point(&access.store, &g)
    })
    .await
    .map_err(|e| PlanError::Conflict(format!("finding the point of group {group}: {e}")))?
    .map(|(_, id)| id)
    .map_err(|e| PlanError::BadRequest(format!("replication group {group}: {e}")))
}

/// Whether every machine of `plan` exists and has no recovery job active (but, for a
/// commit, a failback waiting for its commit: the commit resumes it); the first that
/// breaks this is the error.
pub async fn check_machines(db: &Db, plan: &Plan, commit: bool) -> Result<(), PlanError> {
    for m in plan.machines() {
        let exists = crate::registry::machines::get(db, m)
            .await?
            .is_some_and(|r| !r.removed);
        if !exists {
            return Err(PlanError::BadRequest(format!(
                "plan {}: no machine {m}",
                plan.name
            )));
        }
        let active = crate::recovery::jobs::state::active_job(db, m).await?;
        let resumed_by_commit = |kind: &str, st: &str| {
            commit
                && kind == crate::recovery::jobs::FAILBACK
                && st == crate::jobs::JobState::WaitingForInput.as_str()
        };
        if let Some((id, kind, _)) = active.filter(|(_, k, st)| !resumed_by_commit(k, st)) {
            return Err(PlanError::Conflict(format!(
                "machine {m} of plan {} has a {kind} job active: {id}",
                plan.name
            )));
        }
    }
    Ok(())
}

/// Queues the plan job doing `operation` on plan `name`, after checking the plan and
/// its machines; the job as queued.
pub async fn enqueue(
    ctx: &Context,
    name: &str,
    operation: Operation,
    point: Option<&str>,
) -> Result<Job, PlanError> {
    let db = &ctx.db;
    let plan = super::store::get(db, name)
        .await?
        .ok_or_else(|| PlanError::NotFound(format!("no recovery plan {name}")))?
        .plan;
    if let Some((id, kind)) = super::store::active_job(db, &plan_key(name)).await? {
        return Err(PlanError::Conflict(format!(
            "plan {name} has a {kind} job active: {id}"
        )));
    }
    check_machines(db, &plan, matches!(operation, Operation::Commit)).await?;
    let points = match point {
        Some(p) => resolve_points(db, ctx.store.as_ref(), &plan, p).await?,
        None => BTreeMap::new(),
    };
    if let Operation::Reprotect { disks, .. } = &operation {
        if let Some(m) = plan.machines().find(|m| !disks.contains_key(*m)) {
            return Err(PlanError::BadRequest(format!(
                "plan {name}: machine {m} has no home disks: give each machine's disks"
            )));
        }
        if let Some(m) = disks
            .keys()
            .find(|m| !plan.machines().any(|p| p == m.as_str()))
        {
            return Err(PlanError::BadRequest(format!(
                "plan {name} has no machine {m}"
            )));
        }
    }
    let params = Params {
        plan,
        direction: operation.direction(),
        operation,
        points,
        children: BTreeMap::new(),
        verdict: None,
        waited: BTreeSet::new(),
    };
    let tasks: Vec<String> = steps(&params).into_iter().map(|(_, n)| n).collect();
    let json = serde_json::to_value(&params)
        .map_err(|e| PlanError::BadRequest(format!("plan {name}: {e}")))?;
    let kind = params.operation.kind();
    let Some(id) =
        queue::enqueue_keyed(db, kind, name, Some(&plan_key(name)), &json, &tasks).await?
    else {
        return Err(PlanError::Conflict(format!(
            "plan {name} has another job active"
        )));
    };
    ctx.wake.notify_one();
    queue::get(db, &id)
        .await?
        .ok_or_else(|| PlanError::NotFound(format!("job {id} vanished")))
}

/// The plan's test failover waiting for its cleanup, resumed with `verdict`
/// (`{"verdict": "passed"|"failed", "notes": ...}`).
pub async fn clean_up(ctx: &Context, name: &str, verdict: &Value) -> Result<Job, PlanError> {
    let db = &ctx.db;
    if super::store::get(db, name).await?.is_none() {
        return Err(PlanError::NotFound(format!("no recovery plan {name}")));
    }
    let none = || {
        PlanError::Conflict(format!(
            "plan {name} has no test failover waiting for its cleanup"
        ))
    };
    let Some((id, _)) = super::store::active_job(db, &plan_key(name)).await? else {
        return Err(none());
    };
    let job = queue::get(db, &id).await?.ok_or_else(none)?;
    if job.kind != TEST_FAILOVER
        || job.state != crate::jobs::JobState::WaitingForInput
        || current_step(&job).map(|(s, _)| s) != Some(PlanStep::WaitForCleanup)
    {
        return Err(none());
    }
    check_verdict(verdict).map_err(PlanError::BadRequest)?;
    match queue::resume_with(db, &id, Some(verdict)).await? {
        queue::Outcome::Done(job) => {
            ctx.wake.notify_one();
            Ok(job)
        }
        _ => Err(none()),
    }
}

/// The job's first task not succeeded: what it does and its index.
fn current_step(job: &Job) -> Option<(PlanStep, usize)> {
    let params: Params = serde_json::from_value(job.params.clone()).ok()?;
    let seq = job
        .tasks
        .iter()
        .position(|t| t.state != TaskState::Succeeded)?;
    steps(&params).get(seq).map(|(s, _)| (*s, seq))
}

fn check_verdict(input: &Value) -> Result<(), String> {
    let Some(obj) = input.as_object() else {
        return Err("the cleanup's input must be a JSON object".into());
    };
    for k in obj.keys() {
        if k != "verdict" && k != "notes" {
            return Err(format!(
                "the cleanup's input has an unknown field {k:?}: it takes verdict and notes"
            ));
        }
    }
    match obj.get("verdict").and_then(Value::as_str) {
        Some("passed" | "failed") => {}
        _ => return Err("the cleanup's input needs \"verdict\": \"passed\" or \"failed\"".into()),
    }
    match obj.get("notes") {
        None | Some(Value::String(_)) => Ok(()),
        Some(_) => Err("the cleanup's \"notes\" must be a string".into()),
    }
}

/// The input a plan job may be resumed with: at `wait for cleanup` the verdict; at a
/// script or manual action `{}` or `{"skip": true}`; elsewhere `{}`.
pub fn check_input(job: &Job, input: &Value) -> Result<(), String> {
    let Some(obj) = input.as_object() else {
        return Err(format!("job {}: its input must be a JSON object", job.id));
    };
    match current_step(job) {
        Some((PlanStep::WaitForCleanup, _)) => check_verdict(input),
        Some((PlanStep::Action { .. }, _)) => {
            for (k, v) in obj {
                if k != "skip" || !v.is_boolean() {
                    return Err(format!(
                        "job {}: an action takes {{}} (go on, or retry) or {{\"skip\": true}}, \
                         not {k:?}",
                        job.id
                    ));
                }
            }
            Ok(())
        }
        _ if obj.is_empty() => Ok(()),
        _ => Err(format!(
            "job {}: its current task takes no input (only a script or manual action can be \
             skipped, and only `wait for cleanup` takes a verdict)",
            job.id
        )),
    }
}

/// Writes `params` into the job's row, while `owner` holds its lease.
pub(super) async fn save_params(
    db: &Db,
    job: &Job,
    owner: &str,
    params: &Params,
) -> Result<(), String> {
    let json = serde_json::to_string(params).map_err(|e| format!("job {}: {e}", job.id))?;
    let done = sqlx::query(
        "UPDATE jobs SET params = $1 WHERE id = $2 AND lease_owner = $3 AND state = 'running'",
    )
    .bind(json)
    .bind(job.id.clone())
    .bind(owner.to_string())
    .execute(db.pool())
    .await
    .map_err(q("recording a plan job's progress"))
    .map_err(|e| e.to_string())?;
    if done.rows_affected() != 1 {
        return Err(format!("job {}: its lease was lost", job.id));
    }
    Ok(())
}

/// One task of a plan job.
pub async fn run_task(ctx: &Context, job: &Job, seq: usize) -> Result<Step, String> {
    let mut params: Params = serde_json::from_value(job.params.clone())
        .map_err(|e| format!("job {}: its params: {e}", job.id))?;
    let owner = job
        .lease_owner
        .clone()
        .ok_or_else(|| format!("job {}: runs without a lease", job.id))?;
    let all = steps(&params);
    let Some((step, _)) = all.get(seq).cloned() else {
        return Err(format!("job {}: no task {seq}", job.id));
    };
    // A task before a manual action that waited runs again only when the job was
    // restarted: that action must wait anew.
    if params.waited.iter().any(|&w| w > seq) {
        params.waited.retain(|&w| w <= seq);
        save_params(&ctx.db, job, &owner, &params).await?;
    }
    let skip = job
        .input
        .as_ref()
        .and_then(|i| i.get("skip"))
        .and_then(Value::as_bool)
        == Some(true);
    match step {
        PlanStep::Action {
            group,
            after,
            index,
        } => {
            let g = &params.plan.groups[group];
            let action = if after {
                &g.after[index]
            } else {
                &g.before[index]
            };
            if skip {
                tracing::info!(
                    "job {}: action {} skipped by its operator",
                    job.id,
                    action.name()
                );
                return Ok(Step::Done);
            }
            match action {
                Action::Manual { text, .. } => {
                    let prompt = format!(
                        "group {}: {}: {text} (resume the job to go on)",
                        g.name,
                        action.name()
                    );
                    // The operator's resume is the go-ahead: the task runs again only
                    // then, having recorded that it waited.
                    if job.input.is_some() || params.waited.contains(&seq) {
                        if params.waited.remove(&seq) {
                            save_params(&ctx.db, job, &owner, &params).await?;
                        }
                        return Ok(Step::Done);
                    }
                    params.waited.insert(seq);
                    save_params(&ctx.db, job, &owner, &params).await?;
                    Ok(Step::Wait(prompt))
                }
                Action::Script { .. } => {
                    actions::run_script(ctx, job, seq, &params, group, action).await?;
                    Ok(Step::Done)
                }
            }
        }
        PlanStep::Machines { group } => {
            machines::bring_up(ctx, job, &owner, seq, &mut params, group).await?;
            Ok(Step::Done)
        }
        PlanStep::WaitForCleanup => {
            if let Some(input) = job.input.as_ref().filter(|i| check_verdict(i).is_ok()) {
                params.verdict = Some(input.clone());
                save_params(&ctx.db, job, &owner, &params).await?;
                return Ok(Step::Done);
            }
            let machines: BTreeSet<&str> = params.plan.machines().collect();
            Ok(Step::Wait(format!(
                "test failover of plan {} is up ({} machines): clean up with \
                 POST /v1/recovery-plans/{}/test-failover-cleanup {{\"verdict\": \
                 \"passed\"|\"failed\", \"notes\": \"...\"}}",
                params.plan.name,
                machines.len(),
                params.plan.name
            )))
        }
        PlanStep::CleanUp { group } => {
            machines::clean_up(ctx, job, &owner, seq, &params, group).await?;
            Ok(Step::Done)
        }
    }
}
