//! `/v1/jobs`: durable jobs, their tasks and progress (viewer), and the operator's
//! cancel, resume and restart. See `crate::jobs`.

use axum::extract::{Path, State};
use axum::Json;
use ferry_link::control::wire::DiskProgress;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::{AppState, Page, Query};
use crate::jobs::queue::{self, Outcome};
use crate::jobs::{Job, JobState};
use crate::recovery::work;

/// A job with what its recovery work made, for the recovery kinds.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    /// The disks its build and serve work items made ready (recovery jobs), until
    /// removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<JobDisk>,
    /// Its work items on recovery hosts, with their progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub work: Vec<JobWork>,
}

/// A recovered disk, ready.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobDisk {
    pub machine: String,
    pub disk: String,
    pub point: String,
    /// The image file on the recovery host (a `dir` target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `nbd://ADDR/MACHINE/DISK` (an `nbd` target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_url: Option<String>,
    pub bytes: u64,
}

/// One work item a job gave a recovery host.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobWork {
    pub id: String,
    pub host: String,
    pub machine: String,
    /// build, serve, start, script or remove.
    pub kind: String,
    /// pending, running, succeeded, failed or removed.
    pub state: String,
    /// 0.0 to 1.0.
    pub progress: f64,
    pub bytes_per_s: f64,
    pub error: Option<String>,
    /// build, serve: each disk's progress, as the recovery host last reported it
    /// (empty from a host that does not report it).
    #[serde(default)]
    pub disks: Vec<JobWorkDisk>,
}

/// One disk of a work item: how far it is.
#[derive(Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobWorkDisk {
    pub disk: String,
    /// 0.0 to 100.0, one decimal.
    pub percent: f64,
    /// Its own rate while it was worked on, MB/s (10^6 bytes).
    pub mb_per_s: f64,
    pub bytes_done: u64,
    /// A build: the stored bytes its point reads; a serve: the disk's size.
    pub bytes: u64,
}

impl JobWorkDisk {
    pub fn of(d: &DiskProgress) -> JobWorkDisk {
        // Stored figures are checked (`work::record_reports`); NaN would still not
        // be JSON.
        let finite = |x: f64| if x.is_finite() { x.max(0.0) } else { 0.0 };
        JobWorkDisk {
            disk: d.disk.clone(),
            percent: (finite(d.progress).min(1.0) * 1000.0).round() / 10.0,
            mb_per_s: (finite(d.bytes_per_s) / 1e5).round() / 10.0,
            bytes_done: d.bytes_done,
            bytes: d.bytes,
        }
    }
}

/// `job` with its disks and work items when it is a recovery job.
pub async fn view(db: &crate::db::Db, job: Job) -> Result<JobView, ApiError> {
    if !crate::recovery::jobs::KINDS.contains(&job.kind.as_str()) {
        return Ok(JobView {
            job,
            disks: Vec::new(),
            work: Vec::new(),
        });
    }
    let disks = work::ready_disks(db, &job.id)
        .await?
        .into_iter()
        .map(|(machine, d)| JobDisk {
            machine,
            disk: d.disk,
            point: d.point,
            path: d.path,
            nbd_url: d.nbd_url,
            bytes: d.bytes,
        })
        .collect();
    let work = work::for_job(db, &job.id)
        .await?
        .into_iter()
        .map(|w| JobWork {
            kind: w.op.kind().to_string(),
            id: w.id,
            host: w.host,
            machine: w.machine,
            state: w.state,
            progress: w.progress,
            bytes_per_s: w.bytes_per_s,
            error: w.error,
            disks: w.disks.iter().map(JobWorkDisk::of).collect(),
        })
        .collect();
    Ok(JobView { job, disks, work })
}

/// One page of jobs, oldest first.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub items: Vec<JobView>,
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
    let jobs = queue::list(&state.db, wanted, page.after.as_deref(), limit).await?;
    let mut items = Vec::with_capacity(jobs.len());
    for j in jobs {
        items.push(view(&state.db, j).await?);
    }
    let next_after = page.next_after(&items, |j| &j.job.id, limit);
    Ok(Json(JobList { items, next_after }))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, body = JobView), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    checked_id(&id)?;
    let job = queue::get(&state.db, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    Ok(Json(view(&state.db, job).await?))
}

/// A test failover that made work items still live is not cancelled: that would
/// leave its disks (and started machine) on the recovery host with nothing to remove
/// them. Its cleanup removes them (and a failed one resumes).
async fn refuse_leaking_cancel(state: &AppState, id: &str) -> Result<(), ApiError> {
    let Some(job) = queue::get(&state.db, id).await? else {
        return Ok(());
    };
    if job.kind == crate::recovery::jobs::FAILBACK && !job.state.is_ended() {
        return refuse_frozen_cancel(state, &job).await;
    }
    if job.kind != crate::recovery::jobs::TEST_FAILOVER || job.state.is_ended() {
        return Ok(());
    }
    let live = work::for_job(&state.db, id)
        .await?
        .into_iter()
        .filter(|w| w.state != "removed" && w.op.kind() != "remove")
        .count();
    if live == 0 {
        return Ok(());
    }
    Err(ApiError::Conflict(format!(
        "test failover job {id} made {live} work items still on its recovery host: clean it up          instead (POST /v1/machines/{}/test-failover-cleanup with a verdict, once it waits)",
        job.subject
    )))
}

/// A failback that gave its last reverse item froze the recovery-site machine (its
/// exports read-only): nothing unfreezes it, so it is not cancelled from then on.
async fn refuse_frozen_cancel(state: &AppState, job: &Job) -> Result<(), ApiError> {
    let frozen = work::for_job(&state.db, &job.id)
        .await?
        .into_iter()
        .any(|w| {
            matches!(
                w.op,
                ferry_link::control::wire::WorkOp::Reverse { last: true, .. }
            )
        });
    if !frozen {
        return Ok(());
    }
    Err(ApiError::Conflict(format!(
        "failback job {} froze machine {}'s recovery-site copy (its last reverse round): \
         no unfreeze exists, so it cannot be cancelled; resume it if it failed, then commit",
        job.id, job.subject
    )))
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
    refuse_leaking_cancel(&state, &id).await?;
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
