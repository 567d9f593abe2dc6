//! The operators' dashboard at `/`: machines with health, RPO, state and recovery;
//! process servers with their load; the recovery section (each machine's failover,
//! its recovery job's progress, disks and prompt), recovery hosts and plans; jobs
//! running, waiting or queued with their progress; the latest events. Rendered on
//! the server (`page`), reloaded by the browser every `page::REFRESH_S`; no script,
//! no build step. Any API token signs in (`session`): a viewer's reads; an
//! operator's also gets the buttons (`actions`), forms the server turns into the
//! API's own requests.
//!
//! The page is bounded like the API: at most `ROWS` machines and process servers,
//! `JOBS` jobs and `EVENTS` events, each read in one query.

pub mod actions;
pub mod forms;
pub mod page;
pub mod recovery;
pub mod recovery_html;
pub mod session;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::AppState;
use crate::db::Db;
use crate::health;
use crate::jobs::{queue, JobState, TaskState};
use crate::registry::{events, machines, process_servers};
use page::{EventLine, JobLine, MachineLine, PsLine, View};

/// Machines, and process servers, shown at most.
pub const ROWS: u32 = 500;
/// Jobs running, and queued, shown at most.
pub const JOBS: u32 = 50;
/// Latest events shown.
pub const EVENTS: u32 = 25;

/// `/`, `/sign-in` and `/sign-out`: HTML, not part of the `/v1` API.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(show))
        .route("/sign-in", post(sign_in))
        .route("/sign-out", post(sign_out))
        .merge(actions::routes())
}

/// An HTML answer that no cache keeps, no other site frames, and that may load
/// nothing but its own inline style.
fn html(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// The failure page: the cause goes to the log, never to the browser.
fn failed(e: crate::db::Error) -> Response {
    tracing::error!("dashboard: {e}");
    failed_text()
}

/// The failure page, once its cause is logged.
fn failed_text() -> Response {
    html(
        StatusCode::INTERNAL_SERVER_ERROR,
        page::sign_in(Some("The control plane failed; its log says why.")),
    )
}

/// 303 to `/`, setting `cookie` when given.
fn redirect_home(cookie: Option<String>) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/"));
    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `GET /`: the dashboard when signed in, the sign-in form otherwise.
pub async fn show(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(value) = session::from_headers(&headers) else {
        return html(StatusCode::OK, page::sign_in(None));
    };
    let who = match session::find(&state.db, &value).await {
        Ok(Some(who)) => who,
        Ok(None) => {
            return html(
                StatusCode::OK,
                page::sign_in(Some("Your session ended; sign in again.")),
            )
        }
        Err(e) => return failed(e),
    };
    // Buttons for those whose token may use them; the API checks again at each.
    let form_token = (who.role != "viewer").then(|| actions::form_token(&value));
    match view(&state.db, &who.token_name, form_token).await {
        Ok(v) => html(StatusCode::OK, page::dashboard(&v)),
        Err(e) => failed(e),
    }
}

/// `POST /sign-in`, form field `token`: a session cookie and back to `/`, or the form
/// again (401) for a token the control plane does not know.
pub async fn sign_in(State(state): State<AppState>, body: Bytes) -> Response {
    let token = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    if token.is_empty() {
        return html(
            StatusCode::BAD_REQUEST,
            page::sign_in(Some("Give an API token.")),
        );
    }
    match session::sign_in(&state.db, &token).await {
        Ok(Some((value, _))) => redirect_home(Some(session::set_cookie(&value))),
        Ok(None) => html(
            StatusCode::UNAUTHORIZED,
            page::sign_in(Some("Unknown or deleted token.")),
        ),
        Err(e) => failed(e),
    }
}

/// `POST /sign-out`: ends the session here and in the browser.
pub async fn sign_out(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(value) = session::from_headers(&headers) {
        if let Err(e) = session::end(&state.db, &value).await {
            return failed(e);
        }
    }
    redirect_home(Some(session::clear_cookie()))
}

/// A job's progress over all its tasks, 0.0 to 1.0.
pub fn progress(job: &crate::jobs::Job) -> f64 {
    if job.tasks.is_empty() {
        return 0.0;
    }
    let done: f64 = job
        .tasks
        .iter()
        .map(|t| match t.state {
            TaskState::Succeeded => 1.0,
            TaskState::Running => t.progress.clamp(0.0, 1.0),
            TaskState::Pending | TaskState::Failed => 0.0,
        })
        .sum();
    done / job.tasks.len() as f64
}

/// `2026-12-06 09:48:46`: UTC, as the page's headings say.
fn when(s: i64) -> String {
    chrono::DateTime::from_timestamp(s, 0).map_or_else(
        || s.to_string(),
        |d| d.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

/// Reads what the page shows; `form_token` for a session that gets the buttons.
pub async fn view(
    db: &Db,
    signed_in_as: &str,
    form_token: Option<String>,
) -> crate::db::Result<View> {
    let now = health::now_f();
    let policies = health::policies(db).await?;
    let mut ms = machines::list(db, None, ROWS + 1).await?;
    let machines_more = ms.len() > ROWS as usize;
    ms.truncate(ROWS as usize);
    let names: Vec<String> = ms.iter().map(|m| m.name.clone()).collect();
    let (mut actions_of, recovery) = recovery::machines(db, &names).await?;
    // The machines table's short word: where it runs, or the test it has up.
    let failovers: std::collections::HashMap<String, String> = recovery
        .iter()
        .filter_map(|r| {
            let text = match (&r.state, &r.job_kind) {
                (Some(state), _) => {
                    format!(
                        "{state} ({} site), {}",
                        r.active_site.as_deref().unwrap_or("?"),
                        r.direction.as_deref().unwrap_or("?")
                    )
                }
                (None, Some(kind)) => {
                    format!("at home; {kind} {}", r.job_state.as_deref().unwrap_or(""))
                }
                (None, None) => return None,
            };
            Some((r.machine.clone(), text))
        })
        .collect();
    let machines = ms
        .into_iter()
        .map(|m| {
            let v = health::policy_of(&policies, &m.policy).map(|p| health::machine(&m, p, now));
            let (health, reasons) = match v {
                Some(v) => (v.health.as_str().to_string(), v.reasons),
                None => (
                    "warning".to_string(),
                    vec![format!("policy {} is gone", m.policy)],
                ),
            };
            MachineLine {
                recovery: failovers.get(&m.name).cloned(),
                actions: actions_of.remove(&m.name).unwrap_or_default(),
                rpo_s: health::rpo_seconds(&m, now),
                last_seen_ago_s: (now as i64 - m.last_seen).max(0),
                name: m.name,
                state: m.state,
                health,
                reasons,
                process_server: m.process_server,
            }
        })
        .collect();
    let loads = process_servers::loads(db).await?;
    let mut ps = process_servers::list(db, None, ROWS + 1).await?;
    let process_servers_more = ps.len() > ROWS as usize;
    ps.truncate(ROWS as usize);
    let process_servers = ps
        .into_iter()
        .map(|p| {
            let v = health::process_server(&p, now);
            PsLine {
                assigned: loads.get(&p.name).copied().unwrap_or(0),
                connected: p.connected.len(),
                last_seen_ago_s: (now as i64 - p.last_seen).max(0),
                health: v.health.as_str().to_string(),
                reasons: v.reasons,
                name: p.name,
                address: p.address,
                cache_used_bytes: p.cache_used_bytes,
                cache_free_bytes: p.cache_free_bytes,
                ingest_bytes_per_s: p.ingest_bytes_per_s,
                upload_lag_s: p.upload_lag_s,
                cpu_percent: p.cpu_percent,
            }
        })
        .collect();
    let mut jobs = Vec::new();
    // Those waiting for an operator first: they need one.
    for st in [
        JobState::WaitingForInput,
        JobState::Running,
        JobState::Queued,
    ] {
        for j in queue::list(db, Some(st), None, JOBS).await? {
            jobs.push(JobLine {
                cancellable: j.actions.contains(&crate::jobs::Action::Cancel),
                resumable: j.state == JobState::WaitingForInput
                    && j.actions.contains(&crate::jobs::Action::Resume),
                prompt: j.prompt.clone(),
                progress: progress(&j),
                task: j
                    .tasks
                    .iter()
                    .find(|t| t.state != TaskState::Succeeded)
                    .map(|t| t.name.clone()),
                id: j.id,
                kind: j.kind,
                subject: j.subject,
                state: j.state.as_str().to_string(),
            });
        }
    }
    jobs.truncate(JOBS as usize);
    let events = events::latest(db, EVENTS)
        .await?
        .into_iter()
        .map(|e| EventLine {
            time: when(e.time),
            kind: e.kind,
            subject: e.subject,
            message: e.message,
        })
        .collect();
    let recovery_hosts = recovery::hosts(db, now as i64).await?;
    let plans = recovery::plans(db).await?;
    Ok(View {
        form_token,
        recovery,
        recovery_hosts,
        plans,
        signed_in_as: signed_in_as.to_string(),
        now: format!("{} UTC", when(now as i64)),
        machines,
        machines_more,
        process_servers,
        process_servers_more,
        jobs,
        events,
    })
}

#[cfg(test)]
mod tests;
