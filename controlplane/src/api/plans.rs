//! `/v1/recovery-plans`: recovery plans (list, create, get, replace, delete) and the
//! plan jobs that run them (test failover and its cleanup, failover, commit, cancel).
//! Reading needs a viewer token, changing a plan an admin one, running one an
//! operator one. See docs/recovery-plans.md.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::{AppState, Body, Page, Query};
use crate::jobs::Job;
use crate::plans::job::{self, Operation, PlanError, Target};
use crate::plans::spec::Plan;
use crate::plans::store;

/// A plan as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PlanView {
    #[serde(flatten)]
    pub plan: Plan,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// The plan job queued, running or waiting now, if any.
    pub active_job: Option<String>,
}

/// One page of plans, in name order.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct PlanList {
    pub items: Vec<PlanView>,
    /// Pass as `after` for the next page; null once a page comes back short.
    pub next_after: Option<String>,
}

/// `POST .../test-failover`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestFailoverRequest {
    /// `latest` (default), `latest-app`, `latest-group`, a point id or an RFC 3339
    /// time; `latest` and `latest-group` give a replication group's members one group
    /// point.
    pub point: Option<String>,
    pub target: Target,
    /// A recovery host's name; default: the least loaded live one, per machine.
    pub host: Option<String>,
}

/// `POST .../failover`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// Planned: each source stops writing and takes a final point, which is the one
    /// failed over to (no `point`). Unplanned: `point`, default `latest`.
    pub planned: bool,
    pub point: Option<String>,
    pub target: Target,
    pub host: Option<String>,
    /// `recovery` (default); `home` is a failback of every machine and takes
    /// `{"direction": "home", "planned": true|false}` only (docs/failback.md).
    pub direction: Option<String>,
}

/// `POST .../reprotect` (docs/failback.md).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReprotectRequest {
    /// The recovery host at the home site that writes the home disks.
    pub master_target: String,
    /// `{machine: {disk: path on the master target}}`, every machine of the plan.
    pub disks: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
}

/// `POST .../test-failover-cleanup`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CleanupRequest {
    /// `passed` or `failed`.
    pub verdict: String,
    pub notes: Option<String>,
}

impl From<PlanError> for ApiError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::BadRequest(s) => ApiError::BadRequest(s),
            PlanError::NotFound(s) => ApiError::NotFound(s),
            PlanError::Conflict(s) => ApiError::Conflict(s),
            PlanError::Db(e) => e.into(),
        }
    }
}

fn checked_name(name: &str) -> Result<(), ApiError> {
    ferry_replica::layout::check_name("plan", name).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("no recovery plan {name}"))
}

async fn view(state: &AppState, row: store::PlanRow) -> Result<PlanView, ApiError> {
    let active_job = store::active_job(&state.db, &job::plan_key(&row.plan.name))
        .await?
        .map(|(id, _)| id);
    Ok(PlanView {
        plan: row.plan,
        created_at: row.created_at,
        updated_at: row.updated_at,
        active_job,
    })
}

/// The plan's rules, and every machine it names registered.
async fn checked_plan(state: &AppState, plan: &Plan) -> Result<(), ApiError> {
    plan.check().map_err(ApiError::BadRequest)?;
    for m in plan.machines() {
        let known = crate::registry::machines::get(&state.db, m)
            .await?
            .is_some_and(|r| !r.removed);
        if !known {
            return Err(ApiError::BadRequest(format!(
                "plan {}: no machine {m}",
                plan.name
            )));
        }
    }
    Ok(())
}

fn checked_host(host: &Option<String>) -> Result<(), ApiError> {
    if let Some(h) = host {
        ferry_replica::layout::check_name("recovery host", h)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/recovery-plans", tag = "recovery-plans", params(Page),
    security(("bearer" = [])),
    responses((status = 200, body = PlanList), (status = 401, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Json<PlanList>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = page.limit()?;
    let rows = store::list(&state.db, page.after.as_deref(), limit).await?;
    let mut items = Vec::with_capacity(rows.len());
    for r in rows {
        items.push(view(&state, r).await?);
    }
    let next_after = page.next_after(&items, |p| &p.plan.name, limit);
    Ok(Json(PlanList { items, next_after }))
}

#[utoipa::path(post, path = "/v1/recovery-plans", tag = "recovery-plans", request_body = Plan,
    security(("bearer" = [])),
    responses((status = 201, body = PlanView), (status = 400, body = Problem),
        (status = 409, body = Problem)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(plan): Body<Plan>,
) -> Result<(StatusCode, Json<PlanView>), ApiError> {
    caller.require(Role::Admin)?;
    checked_plan(&state, &plan).await?;
    if !store::create(&state.db, &plan).await? {
        return Err(ApiError::Conflict(format!(
            "recovery plan {} exists",
            plan.name
        )));
    }
    let row = store::get(&state.db, &plan.name)
        .await?
        .ok_or_else(|| not_found(&plan.name))?;
    Ok((StatusCode::CREATED, Json(view(&state, row).await?)))
}

#[utoipa::path(get, path = "/v1/recovery-plans/{name}", tag = "recovery-plans",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = PlanView), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<PlanView>, ApiError> {
    caller.require(Role::Viewer)?;
    checked_name(&name)?;
    let row = store::get(&state.db, &name)
        .await?
        .ok_or_else(|| not_found(&name))?;
    Ok(Json(view(&state, row).await?))
}

#[utoipa::path(patch, path = "/v1/recovery-plans/{name}", tag = "recovery-plans",
    params(("name" = String, Path)), request_body(content = Plan,
        description = "the whole plan: it replaces the one stored (a running plan job keeps the plan it started with)"),
    security(("bearer" = [])),
    responses((status = 200, body = PlanView), (status = 400, body = Problem),
        (status = 404, body = Problem)))]
pub async fn replace(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(plan): Body<Plan>,
) -> Result<Json<PlanView>, ApiError> {
    caller.require(Role::Admin)?;
    checked_name(&name)?;
    if plan.name != name {
        return Err(ApiError::BadRequest(format!(
            "the body names plan {}, the path {name}: a plan cannot be renamed",
            plan.name
        )));
    }
    checked_plan(&state, &plan).await?;
    if !store::replace(&state.db, &plan).await? {
        return Err(not_found(&name));
    }
    let row = store::get(&state.db, &name)
        .await?
        .ok_or_else(|| not_found(&name))?;
    Ok(Json(view(&state, row).await?))
}

#[utoipa::path(delete, path = "/v1/recovery-plans/{name}", tag = "recovery-plans",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    checked_name(&name)?;
    if let Some((id, kind)) = store::active_job(&state.db, &job::plan_key(&name)).await? {
        return Err(ApiError::Conflict(format!(
            "recovery plan {name} has a {kind} job active ({id}): it cannot be deleted until \
             that ends"
        )));
    }
    if !store::delete(&state.db, &name).await? {
        return Err(not_found(&name));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/recovery-plans/{name}/test-failover", tag = "recovery-plans",
    params(("name" = String, Path)), request_body = TestFailoverRequest, security(("bearer" = [])),
    responses((status = 202, body = Job, description = "the plan job, queued"),
        (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn test_failover(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(req): Body<TestFailoverRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    caller.require(Role::Operator)?;
    checked_name(&name)?;
    checked_host(&req.host)?;
    let point = req.point.unwrap_or_else(|| "latest".into());
    let op = Operation::TestFailover {
        point: point.clone(),
        target: req.target,
        host: req.host,
    };
    let job = job::enqueue(&state.jobs, &name, op, Some(&point)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[utoipa::path(post, path = "/v1/recovery-plans/{name}/test-failover-cleanup",
    tag = "recovery-plans", params(("name" = String, Path)), request_body = CleanupRequest,
    security(("bearer" = [])),
    responses((status = 200, body = Job, description = "the plan's test failover, resumed to clean up"),
        (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn test_failover_cleanup(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(req): Body<CleanupRequest>,
) -> Result<Json<Job>, ApiError> {
    caller.require(Role::Operator)?;
    checked_name(&name)?;
    let input = serde_json::to_value(&req).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    // `notes: null` is no notes.
    let input = match input {
        serde_json::Value::Object(mut m) => {
            m.retain(|_, v| !v.is_null());
            serde_json::Value::Object(m)
        }
        other => other,
    };
    Ok(Json(job::clean_up(&state.jobs, &name, &input).await?))
}

#[utoipa::path(post, path = "/v1/recovery-plans/{name}/failover", tag = "recovery-plans",
    params(("name" = String, Path)), request_body = FailoverRequest, security(("bearer" = [])),
    responses((status = 202, body = Job, description = "the plan job, queued"),
        (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn failover(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(body): Body<serde_json::Value>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    caller.require(Role::Operator)?;
    checked_name(&name)?;
    // The direction picks the operation, as on one machine's failover.
    if body.get("direction").and_then(|d| d.as_str()) == Some("home") {
        let r: crate::recovery::jobs::enqueue::FailbackRequest = serde_json::from_value(body)
            .map_err(|e| ApiError::BadRequest(format!("a plan's failback: {e}")))?;
        let op = Operation::Failback { planned: r.planned };
        let job = job::enqueue(&state.jobs, &name, op, None).await?;
        return Ok((StatusCode::ACCEPTED, Json(job)));
    }
    let req: FailoverRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::BadRequest(format!("a plan's failover: {e}")))?;
    if let Some(d) = req.direction.as_deref().filter(|d| *d != "recovery") {
        return Err(ApiError::BadRequest(format!(
            "direction {d:?} must be recovery (a failover) or home (a failback)"
        )));
    }
    checked_host(&req.host)?;
    if req.planned && req.point.is_some() {
        return Err(ApiError::BadRequest(
            "a planned failover goes to each source's final point: it takes no point".into(),
        ));
    }
    let point = if req.planned {
        None
    } else {
        Some(req.point.unwrap_or_else(|| "latest".into()))
    };
    let op = Operation::Failover {
        planned: req.planned,
        point: point.clone(),
        target: req.target,
        host: req.host,
    };
    let job = job::enqueue(&state.jobs, &name, op, point.as_deref()).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[utoipa::path(post, path = "/v1/recovery-plans/{name}/reprotect", tag = "recovery-plans",
    params(("name" = String, Path)), request_body = ReprotectRequest, security(("bearer" = [])),
    responses((status = 202, body = Job, description = "the plan job, queued: each machine's reprotect, group by group"),
        (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn reprotect(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(req): Body<ReprotectRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    caller.require(Role::Operator)?;
    checked_name(&name)?;
    super::machines::checked("master target", &req.master_target)?;
    let op = Operation::Reprotect {
        master_target: req.master_target,
        disks: req.disks,
    };
    let job = job::enqueue(&state.jobs, &name, op, None).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[utoipa::path(post, path = "/v1/recovery-plans/{name}/commit", tag = "recovery-plans",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 202, body = Job, description = "the plan job, queued"),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn commit(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    caller.require(Role::Operator)?;
    checked_name(&name)?;
    let job = job::enqueue(&state.jobs, &name, Operation::Commit, None).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[utoipa::path(post, path = "/v1/recovery-plans/{name}/cancel", tag = "recovery-plans",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 202, body = Job, description = "the plan job, queued"),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    caller.require(Role::Operator)?;
    checked_name(&name)?;
    let job = job::enqueue(&state.jobs, &name, Operation::Cancel, None).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}
