//! `/v1/jobs`: durable jobs, their tasks and progress (viewer), and the operator's
//! cancel, resume and restart. See `crate::jobs`.

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::{AppState, Page, Query};
use crate::jobs::queue::{self, Outcome};
use crate::jobs::{Job, JobState};

/// One page of jobs, oldest first.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub items: Vec<Job>,
    /// Pass as `after` for the next page; null once a page comes back short.
    pub next_after: Option<String>,
}

/// `?state=&limit=&after=`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    /// Only jobs in this state: queued, running, waiting-for-input, succeeded,
    /// failed or cancelled.
    pub state: Option<String>,
    /// 1 to 1000; default 100.
    pub limit: Option<u32>,
    /// The `next_after` of the previous page.
    pub after: Option<String>,
}

/// `ferry_cp_jobs{kind,state}` for `/metrics`: a failed retention job is something to
/// page on. Empty (and logged) when the database does not answer: the scrape still
/// gets the other figures.
pub async fn metrics_text(state: &AppState) -> String {
    use std::fmt::Write;
    let counts = match queue::count_by_state(&state.db).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("/metrics: {e}");
            return String::new();
        }
    };
    let mut out = String::from(
        "# HELP ferry_cp_jobs Jobs in the control plane's database, by kind and state.\n\
         # TYPE ferry_cp_jobs gauge\n",
    );
    for (kind, job_state, n) in counts {
        let _ = writeln!(
            out,
            "ferry_cp_jobs{{kind=\"{kind}\",state=\"{job_state}\"}} {n}"
        );
    }
    out
}

/// Job ids are `j` + digits + `-` + hex; anything else is refused before a query.
fn checked_id(id: &str) -> Result<(), ApiError> {
    let ok =
        (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "job id {id:?} must be 1 to 64 letters, digits or '-'"
        )))
    }
}

#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(JobQuery),
    security(("bearer" = [])),
    responses((status = 200, body = JobList), (status = 400, body = Problem),
        (status = 401, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<JobQuery>,
) -> Result<Json<JobList>, ApiError> {
    let page = Page {
        limit: query.limit,
        after: query.after,
    };
    let limit = page.limit()?;
    let wanted = match query.state.as_deref() {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "state {s:?} must be one of {}",
                JobState::ALL.map(JobState::as_str).join(", ")
            ))
        })?),
    };
    if let Some(after) = &page.after {
        checked_id(after)?;
    }
    let items = queue::list(&state.db, wanted, page.after.as_deref(), limit).await?;
    let next_after = page.next_after(&items, |j| &j.id, limit);
    Ok(Json(JobList { items, next_after }))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, body = Job), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    checked_id(&id)?;
    queue::get(&state.db, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))
}

/// The answer to an action: the job as it is now, or why not.
fn answer(id: &str, action: &str, outcome: Outcome) -> Result<Json<Job>, ApiError> {
    match outcome {
        Outcome::Done(job) => Ok(Json(job)),
        Outcome::NotFound => Err(ApiError::NotFound(format!("no job {id}"))),
        Outcome::Busy(job) => Err(ApiError::Conflict(format!(
            "job {id} cannot {action}: another {} job of {} is queued or running",
            job.kind, job.subject
        ))),
        Outcome::NotAllowed(job) => {
            let allowed: Vec<&str> = job.actions.iter().map(|a| a.as_str()).collect();
            Err(ApiError::Conflict(format!(
                "job {id} is {}{}: it cannot {action}; allowed now: {}",
                job.state.as_str(),
                if job.cancel_requested {
                    " (cancel requested)"
                } else {
                    ""
                },
                if allowed.is_empty() {
                    "nothing".to_string()
                } else {
                    allowed.join(", ")
                }
            )))
        }
    }
}

#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = Job, description = "cancelled, or (running) asked to stop before its next task"),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    caller.require(Role::Operator)?;
    checked_id(&id)?;
    answer(&id, "cancel", queue::cancel(&state.db, &id).await?)
}

#[utoipa::path(post, path = "/v1/jobs/{id}/resume", tag = "jobs",
    params(("id" = String, Path)), security(("bearer" = [])),
    request_body(content = Object, description = "optional: the input a waiting job asks for (its `prompt` says what)"),
    responses((status = 200, body = Job, description = "queued again from its first unfinished task"),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Job>, ApiError> {
    caller.require(Role::Operator)?;
    checked_id(&id)?;
    // No body, or an empty one, is a plain resume; anything else must be a JSON object.
    let input = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v @ serde_json::Value::Object(_)) => Some(v),
            Ok(_) => {
                return Err(ApiError::BadRequest(
                    "a resume's body must be a JSON object (the input the job asks for)".into(),
                ))
            }
            Err(e) => {
                return Err(ApiError::BadRequest(format!(
                    "a resume's body is not JSON: {e}"
                )))
            }
        }
    };
    if let Some(v) = &input {
        if let Some(job) = queue::get(&state.db, &id).await? {
            crate::jobs::check_input(&job, v).map_err(ApiError::BadRequest)?;
        }
    }
    let out = answer(
        &id,
        "resume",
        queue::resume_with(&state.db, &id, input.as_ref()).await?,
    )?;
    state.jobs.wake.notify_one();
    Ok(out)
}

#[utoipa::path(post, path = "/v1/jobs/{id}/restart", tag = "jobs",
    params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = Job, description = "queued again from its first task"),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn restart(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    caller.require(Role::Operator)?;
    checked_id(&id)?;
    let out = answer(&id, "restart", queue::restart(&state.db, &id).await?)?;
    state.jobs.wake.notify_one();
    Ok(out)
}
