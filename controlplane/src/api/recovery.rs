//! `/v1/machines/{name}/...`: the recovery jobs of one machine (operator): test
//! failover and its cleanup, failover (and failback), change-point, commit, cancel,
//! reprotect, re-enable. Each POST
//! answers the job it queued (then `GET /v1/jobs/{id}` follows it); what can be
//! refused is refused before a job exists (`recovery::jobs::enqueue`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::{AppState, Body};
use crate::jobs::queue::{self, Outcome};
use crate::jobs::{Job, JobState};
use crate::recovery::jobs::enqueue::{
    busy, ChangePointRequest, FailoverRequest, NoParams, ReprotectRequest, TestFailoverRequest,
};
use crate::recovery::jobs::{self, state, Verdict};

async fn queue_job(
    state: &AppState,
    caller: &Caller,
    kind: &str,
    machine: &str,
    request: serde_json::Value,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    caller.require(Role::Operator)?;
    let job = jobs::enqueue_machine_job(
        &state.db,
        state.jobs.store.as_ref(),
        kind,
        machine,
        &request,
    )
    .await?;
    state.jobs.wake.notify_one();
    let msg = format!("{kind} job {} queued by {}", job.id, caller.token);
    // The job is queued either way: a lost event is logged, not answered as a failure
    // that would make the caller queue it again.
    if let Err(e) = crate::registry::events::add(
        &state.db,
        kind,
        &format!("machine {machine}"),
        &msg,
        crate::db::now_s(),
    )
    .await
    {
        tracing::warn!("machine {machine}: recording that {msg}: {e}");
    }
    Ok((StatusCode::ACCEPTED, Json(job)))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::Internal(Box::new(e)))
}

#[utoipa::path(post, path = "/v1/machines/{name}/test-failover", tag = "recovery",
    params(("name" = String, Path)), request_body = TestFailoverRequest,
    security(("bearer" = [])),
    responses((status = 202, body = Job, description = "queued; it waits for its cleanup once up"),
        (status = 400, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 503, body = Problem)))]
pub async fn test_failover(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(req): Body<TestFailoverRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    queue_job(&state, &caller, jobs::TEST_FAILOVER, &name, to_json(&req)?).await
}

#[utoipa::path(post, path = "/v1/machines/{name}/test-failover-cleanup", tag = "recovery",
    params(("name" = String, Path)), request_body = Verdict, security(("bearer" = [])),
    responses((status = 200, body = Job, description = "the waiting test failover, resumed: it cleans up and records the verdict"),
        (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn test_failover_cleanup(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Job>, ApiError> {
    caller.require(Role::Operator)?;
    super::machines::checked("machine", &name)?;
    let input: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the cleanup's body is not JSON: {e}")))?;
    Verdict::parse(&input).map_err(ApiError::BadRequest)?;
    let waiting = state::active_job(&state.db, &name)
        .await?
        .filter(|(_, kind, st)| {
            kind == jobs::TEST_FAILOVER && st == JobState::WaitingForInput.as_str()
        });
    let Some((id, _, _)) = waiting else {
        return Err(ApiError::Conflict(format!(
            "machine {name} has no test failover waiting for its cleanup"
        )));
    };
    let out = match queue::resume_with(&state.db, &id, Some(&input)).await? {
        Outcome::Done(job) => job,
        Outcome::NotFound => return Err(ApiError::NotFound(format!("no job {id}"))),
        Outcome::Busy(_) => return Err(busy(&state.db, &name).await),
        Outcome::NotAllowed(job) => {
            return Err(ApiError::Conflict(format!(
                "test failover job {id} of machine {name} is {}: not waiting for its cleanup",
                job.state.as_str()
            )))
        }
    };
    state.jobs.wake.notify_one();
    Ok(Json(out))
}

#[utoipa::path(post, path = "/v1/machines/{name}/failover", tag = "recovery",
    params(("name" = String, Path)),
    request_body(content = FailoverRequest, description = "a failover; with `\"direction\": \"home\"` a failback (FailbackRequest: `planned`, default true)"),
    security(("bearer" = [])),
    responses((status = 202, body = Job), (status = 400, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 503, body = Problem)))]
pub async fn failover(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(req): Body<serde_json::Value>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    // The direction picks the job: home is a failback (docs/failback.md), with a body
    // of its own; anything else is checked as a failover's.
    let kind = match req.get("direction") {
        Some(serde_json::Value::String(d)) if d == "home" => jobs::FAILBACK,
        None => jobs::FAILOVER,
        Some(serde_json::Value::String(d)) if d == "recovery" => jobs::FAILOVER,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "direction {other} must be recovery (a failover) or home (a failback)"
            )))
        }
    };
    queue_job(&state, &caller, kind, &name, req).await
}

#[utoipa::path(post, path = "/v1/machines/{name}/re-enable", tag = "recovery",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 202, body = Job, description = "queued: the failed-back machine's agent resumes forward protection; the job waits until it resynced and uploaded a point"),
        (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn re_enable(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    queue_job(&state, &caller, jobs::RE_ENABLE, &name, no_params(&body)?).await
}

#[utoipa::path(post, path = "/v1/machines/{name}/change-point", tag = "recovery",
    params(("name" = String, Path)), request_body = ChangePointRequest,
    security(("bearer" = [])),
    responses((status = 202, body = Job), (status = 400, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 503, body = Problem)))]
pub async fn change_point(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(req): Body<ChangePointRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    queue_job(&state, &caller, jobs::CHANGE_POINT, &name, to_json(&req)?).await
}

#[utoipa::path(post, path = "/v1/machines/{name}/reprotect", tag = "recovery",
    params(("name" = String, Path)), request_body = ReprotectRequest,
    security(("bearer" = [])),
    responses((status = 202, body = Job, description = "queued: the master target makes each home disk equal to the failover point, then the machine replicates in reverse"),
        (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn reprotect(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(req): Body<ReprotectRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    queue_job(&state, &caller, jobs::REPROTECT, &name, to_json(&req)?).await
}

/// An empty body or `{}`.
fn no_params(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::json!({}));
    }
    let v: NoParams = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("this request takes no parameters: {e}")))?;
    to_json(&v)
}

#[utoipa::path(post, path = "/v1/machines/{name}/commit", tag = "recovery",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 202, body = Job), (status = 400, body = Problem),
        (status = 409, body = Problem)))]
pub async fn commit(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    queue_job(&state, &caller, jobs::COMMIT, &name, no_params(&body)?).await
}

#[utoipa::path(post, path = "/v1/machines/{name}/cancel", tag = "recovery",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 202, body = Job, description = "queued: removes the recovery disks, then the source resumes"),
        (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    queue_job(
        &state,
        &caller,
        jobs::CANCEL_FAILOVER,
        &name,
        no_params(&body)?,
    )
    .await
}
