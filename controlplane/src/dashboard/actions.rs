//! The dashboard's buttons: HTML forms POSTed to `/act/...`, each turned into the
//! API request it stands for (`/v1/machines/{name}/test-failover`, ...) and served
//! in-process by the API's own router, as the signed-in session's token
//! (`auth::Delegated`): the same handlers, checks, roles and answers as `ferry cp`,
//! with no second implementation to drift. A success goes back to `/` (303); a
//! refusal shows the API's problem detail.
//!
//! Cross-site requests: the session cookie is SameSite=Strict, so another site's
//! page cannot make the browser send it; each form also carries a token derived
//! from the session (`form_token`), which a page of another origin cannot read.
//! Failover, change-point, commit and cancel ask for a confirmation first (a second
//! form, carrying the first's fields), since the page has no script for a `confirm()`.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use tower_service::Service;

use super::{forms, html, session};
use crate::api::auth::{Caller, Delegated, Role};
use crate::api::AppState;
use crate::enroll::tokens::hash;

/// The largest answer of the API read back (a job, a problem): far more than either.
const ANSWER_MAX_BYTES: usize = 256 * 1024;
/// The longest notes a cleanup form takes: within the API's 4096 bytes whatever
/// the script.
pub const NOTES_MAX_CHARS: usize = 1000;
/// The longest point a change-point form takes: a point id or an RFC 3339 time is
/// far shorter.
pub const POINT_MAX_CHARS: usize = 128;

/// `/act/...`: the forms' targets.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/act/machines/{name}/{action}", post(machine))
        .route("/act/jobs/{id}/cancel", post(cancel_job))
        .route("/act/jobs/{id}/resume", post(resume_job))
}

/// What a machine's buttons do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineAction {
    /// Test failover to the latest point, served over NBD.
    TestFailover,
    /// The waiting test failover's cleanup, with the verdict and notes of the form.
    Cleanup,
    FailoverPlanned,
    FailoverUnplanned,
    /// The failed-over machine's disks brought up again at the form's point.
    ChangePoint,
    Commit,
    Cancel,
    /// A reprotected machine home (docs/failback.md).
    FailbackPlanned,
    FailbackUnplanned,
    /// A failback's commit: the recovery-site copies go.
    CommitFailback,
    /// A failed-back machine's forward protection resumed.
    ReEnable,
}

impl MachineAction {
    pub const ALL: [MachineAction; 11] = [
        MachineAction::TestFailover,
        MachineAction::Cleanup,
        MachineAction::FailoverPlanned,
        MachineAction::FailoverUnplanned,
        MachineAction::ChangePoint,
        MachineAction::Commit,
        MachineAction::Cancel,
        MachineAction::FailbackPlanned,
        MachineAction::FailbackUnplanned,
        MachineAction::CommitFailback,
        MachineAction::ReEnable,
    ];

    /// Its part of the form's URL.
    pub fn slug(self) -> &'static str {
        match self {
            MachineAction::TestFailover => "test-failover",
            MachineAction::Cleanup => "test-failover-cleanup",
            MachineAction::FailoverPlanned => "failover-planned",
            MachineAction::FailoverUnplanned => "failover-unplanned",
            MachineAction::ChangePoint => "change-point",
            MachineAction::Commit => "commit",
            MachineAction::Cancel => "cancel",
            MachineAction::FailbackPlanned => "failback-planned",
            MachineAction::FailbackUnplanned => "failback-unplanned",
            MachineAction::CommitFailback => "commit-failback",
            MachineAction::ReEnable => "re-enable",
        }
    }

    pub fn parse(slug: &str) -> Option<MachineAction> {
        MachineAction::ALL.into_iter().find(|a| a.slug() == slug)
    }

    /// Its button, as people read it.
    pub fn label(self) -> &'static str {
        match self {
            MachineAction::TestFailover => "Test failover",
            MachineAction::Cleanup => "Clean up",
            MachineAction::FailoverPlanned => "Fail over (planned)",
            MachineAction::FailoverUnplanned => "Fail over (unplanned)",
            MachineAction::ChangePoint => "Change point",
            MachineAction::Commit => "Commit",
            MachineAction::Cancel => "Cancel failover",
            MachineAction::FailbackPlanned => "Fail back (planned)",
            MachineAction::FailbackUnplanned => "Fail back (unplanned)",
            MachineAction::CommitFailback => "Commit failback",
            MachineAction::ReEnable => "Re-enable protection",
        }
    }

    /// Whether it changes where the machine runs: asked again before it is sent.
    pub fn needs_confirmation(self) -> bool {
        !matches!(self, MachineAction::TestFailover | MachineAction::Cleanup)
    }

    /// What the confirmation page says it will do.
    pub fn consequence(self) -> &'static str {
        match self {
            MachineAction::FailoverPlanned => {
                "The source stops accepting writes and takes a final point; once it is \
                 uploaded, the machine comes up on a recovery host (NBD) and runs there."
            }
            MachineAction::FailoverUnplanned => {
                "The source is fenced at once (refused from now on, its export turns \
                 read-only) and the machine comes up on a recovery host (NBD) from its \
                 latest point. Writes after that point are lost."
            }
            MachineAction::ChangePoint => {
                "The machine's recovery disks are removed (with any writes made to them), \
                 then brought up again at the point given, on the same target, and the \
                 machine is started on them."
            }
            MachineAction::Commit => {
                "The failover becomes final: the machine runs at the recovery site from \
                 now on, and cancel is no longer possible."
            }
            MachineAction::Cancel => {
                "The recovery disks are removed (with any writes made to them) and the \
                 source resumes replicating."
            }
            MachineAction::FailbackPlanned => {
                "The machine at the recovery site is frozen (stopped, its disks read-only), \
                 a final point is applied to the home disks and checked block by block; \
                 then the machine is active at home. This cannot be cancelled."
            }
            MachineAction::FailbackUnplanned => {
                "The home disks get the newest reverse point there is (the recovery site \
                 is taken as lost); writes at the recovery site after it are lost."
            }
            MachineAction::CommitFailback => {
                "The failback becomes final: the recovery-site copies (disks, started \
                 machine, reverse replication) and the reverse replica are deleted."
            }
            MachineAction::ReEnable => {
                "The machine's agent at home writes again and resyncs with the recovery \
                 site by checksum; the recovery-site failover is forgotten."
            }
            MachineAction::TestFailover | MachineAction::Cleanup => "",
        }
    }

    /// The API request it stands for: path and JSON body. `form` gives a cleanup's
    /// verdict and notes, a change of point its point.
    pub fn request(self, machine: &str, form: &Form) -> Result<(String, Value), String> {
        ferry_replica::layout::check_name("machine", machine).map_err(|e| e.to_string())?;
        let nbd = json!({"kind": "nbd"});
        let (verb, body) = match self {
            MachineAction::TestFailover => {
                ("test-failover", json!({"point": "latest", "target": nbd}))
            }
            MachineAction::Cleanup => {
                let verdict = match form.verdict.as_deref() {
                    Some(v @ ("passed" | "failed")) => v,
                    other => {
                        return Err(format!(
                            "the cleanup's verdict must be passed or failed, not {other:?}"
                        ))
                    }
                };
                let notes = form.notes.as_deref().unwrap_or("").trim();
                if notes.chars().count() > NOTES_MAX_CHARS {
                    return Err(format!(
                        "the notes must be at most {NOTES_MAX_CHARS} characters"
                    ));
                }
                (
                    "test-failover-cleanup",
                    json!({"verdict": verdict, "notes": notes}),
                )
            }
            MachineAction::FailoverPlanned => ("failover", json!({"planned": true, "target": nbd})),
            MachineAction::FailoverUnplanned => (
                "failover",
                json!({"planned": false, "point": "latest", "target": nbd}),
            ),
            MachineAction::ChangePoint => {
                // `latest`, an id or a time: the API resolves it (and says what is
                // wrong with it); the target stays the failover's.
                let point = form.point.as_deref().unwrap_or("").trim();
                if point.is_empty() || point.chars().count() > POINT_MAX_CHARS {
                    return Err(format!(
                        "the point must be latest, a point id or an RFC 3339 time (at most \
                         {POINT_MAX_CHARS} characters), not {point:?}"
                    ));
                }
                ("change-point", json!({"point": point}))
            }
            MachineAction::Commit => ("commit", json!({})),
            MachineAction::Cancel => ("cancel", json!({})),
            MachineAction::FailbackPlanned => {
                ("failover", json!({"direction": "home", "planned": true}))
            }
            MachineAction::FailbackUnplanned => {
                ("failover", json!({"direction": "home", "planned": false}))
            }
            MachineAction::CommitFailback => ("commit", json!({})),
            MachineAction::ReEnable => ("re-enable", json!({})),
        };
        Ok((format!("/v1/machines/{machine}/{verb}"), body))
    }
}

/// The fields a form may send.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Form {
    pub form_token: Option<String>,
    pub confirm: bool,
    pub verdict: Option<String>,
    pub notes: Option<String>,
    pub point: Option<String>,
}

impl Form {
    pub fn parse(body: &[u8]) -> Form {
        let mut f = Form::default();
        for (k, v) in url::form_urlencoded::parse(body) {
            match k.as_ref() {
                "form_token" => f.form_token = Some(v.into_owned()),
                "confirm" => f.confirm = v == "yes",
                "verdict" => f.verdict = Some(v.into_owned()),
                "notes" => f.notes = Some(v.into_owned()),
                "point" => f.point = Some(v.into_owned()),
                _ => {}
            }
        }
        f
    }
}

/// The token every form of a session carries: derived from the session's secret
/// cookie value (which no page can read), distinct from the hash the database keys
/// sessions by.
pub fn form_token(session_value: &str) -> String {
    hash(&format!("ferry-dashboard-form:{session_value}"))
}

/// Equal strings, compared in a time that does not tell where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The signed-in caller of a form post whose token matches its session, or the
/// answer to give instead.
async fn caller(state: &AppState, headers: &HeaderMap, form: &Form) -> Result<Caller, Response> {
    let Some(value) = session::from_headers(headers) else {
        return Err(super::redirect_home(None));
    };
    let who = match session::find(&state.db, &value).await {
        Ok(Some(who)) => who,
        Ok(None) => return Err(super::redirect_home(None)),
        Err(e) => return Err(super::failed(e)),
    };
    let want = form_token(&value);
    let given = form.form_token.as_deref().unwrap_or("");
    if !same(&want, given) {
        return Err(html(
            StatusCode::FORBIDDEN,
            forms::message(
                "Not sent",
                "This form is not one of your session's (a stale page, or another site's). \
                 Nothing was done; reload the dashboard and try again.",
            ),
        ));
    }
    let Some(role) = Role::parse(&who.role) else {
        tracing::error!(
            "dashboard: token {} has an unknown role {:?}",
            who.token_name,
            who.role
        );
        return Err(super::failed_text());
    };
    Ok(Caller {
        token: who.token_name,
        role,
    })
}

/// Sends one API request through the API's router, as `caller`: its status and
/// body.
async fn call_api(
    state: &AppState,
    caller: Caller,
    path: &str,
    body: &Value,
) -> Result<(StatusCode, Bytes), String> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .map_err(|e| format!("building the request POST {path}: {e}"))?;
    req.extensions_mut().insert(Delegated(caller));
    let mut api = crate::api::api_routes(state.clone());
    let resp = match api.call(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), ANSWER_MAX_BYTES)
        .await
        .map_err(|e| format!("reading the answer to POST {path}: {e}"))?;
    Ok((status, bytes))
}

/// Back to the dashboard on success; the API's refusal on a page otherwise.
async fn send(state: &AppState, caller: Caller, what: &str, path: &str, body: &Value) -> Response {
    match call_api(state, caller, path, body).await {
        Ok((status, _)) if status.is_success() => super::redirect_home(None),
        Ok((status, bytes)) => {
            let problem: Option<Value> = serde_json::from_slice(&bytes).ok();
            let field = |k: &str| {
                problem
                    .as_ref()
                    .and_then(|p| p.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            let why = match (field("title"), field("detail")) {
                (Some(t), Some(d)) => format!("{} {t}: {d}", status.as_u16()),
                _ if status == StatusCode::NOT_FOUND => format!(
                    "404: this control plane does not serve POST {path} (an older version?)"
                ),
                _ => status.to_string(),
            };
            html(
                status,
                forms::message(&format!("{what}: refused"), &format!("{what}: {why}")),
            )
        }
        Err(e) => {
            tracing::error!("dashboard: {e}");
            super::failed_text()
        }
    }
}

/// `POST /act/machines/{name}/{action}`.
pub async fn machine(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((name, slug)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    let caller = match caller(&state, &headers, &form).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let Some(action) = MachineAction::parse(&slug) else {
        return html(
            StatusCode::NOT_FOUND,
            forms::message("Unknown action", &format!("There is no action {slug:?}.")),
        );
    };
    let what = format!("{} of machine {name}", action.label());
    let (path, api_body) = match action.request(&name, &form) {
        Ok(r) => r,
        Err(e) => {
            return html(
                StatusCode::BAD_REQUEST,
                forms::message(&format!("{what}: refused"), &e),
            )
        }
    };
    if action.needs_confirmation() && !form.confirm {
        let url = format!("/act/machines/{name}/{}", action.slug());
        let token = form.form_token.as_deref().unwrap_or_default();
        // The confirmation sends again what the first form said.
        let point = form.point.as_deref().map(|p| ("point", p.trim()));
        let consequence = match point {
            Some((_, p)) => format!("{} Point: {p}.", action.consequence()),
            None => action.consequence().to_string(),
        };
        let hidden: Vec<(&str, &str)> = point.into_iter().collect();
        return html(
            StatusCode::OK,
            forms::confirm(&what, &consequence, &url, token, &hidden),
        );
    }
    send(&state, caller, &what, &path, &api_body).await
}

/// `POST /act/jobs/{id}/cancel`.
pub async fn cancel_job(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    let caller = match caller(&state, &headers, &form).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return html(
            StatusCode::BAD_REQUEST,
            forms::message(
                "Cancel job: refused",
                "A job id is letters, digits and '-'.",
            ),
        );
    }
    let what = format!("Cancel job {id}");
    if !form.confirm {
        let url = format!("/act/jobs/{id}/cancel");
        let token = form.form_token.unwrap_or_default();
        return html(
            StatusCode::OK,
            forms::confirm(
                &what,
                "A queued or waiting job stops at once, a running one before its next task.",
                &url,
                &token,
                &[],
            ),
        );
    }
    send(
        &state,
        caller,
        &what,
        &format!("/v1/jobs/{id}/cancel"),
        &json!({}),
    )
    .await
}

/// The body a resume button sends: the verdict and notes of a cleanup, or nothing
/// (a plan's manual action done).
fn resume_body(form: &Form) -> Result<serde_json::Value, String> {
    match form.verdict.as_deref() {
        None => Ok(json!({})),
        Some(v @ ("passed" | "failed")) => {
            let notes = form.notes.as_deref().unwrap_or("").trim();
            if notes.chars().count() > NOTES_MAX_CHARS {
                return Err(format!("Notes are at most {NOTES_MAX_CHARS} characters."));
            }
            Ok(json!({"verdict": v, "notes": notes}))
        }
        Some(other) => Err(format!(
            "The verdict {other:?} is neither passed nor failed."
        )),
    }
}

/// `POST /act/jobs/{id}/resume`.
pub async fn resume_job(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    let caller = match caller(&state, &headers, &form).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let what = format!("Resume job {id}");
    let checked = if id.is_empty()
        || id.len() > 64
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        Err("A job id is letters, digits and '-'.".to_string())
    } else {
        resume_body(&form)
    };
    match checked {
        Ok(api_body) => {
            send(
                &state,
                caller,
                &what,
                &format!("/v1/jobs/{id}/resume"),
                &api_body,
            )
            .await
        }
        Err(e) => html(
            StatusCode::BAD_REQUEST,
            forms::message(&format!("{what}: refused"), &e),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_button_is_the_api_request_it_stands_for() {
        let none = Form::default();
        let req = |a: MachineAction, f: &Form| a.request("db1", f).unwrap();
        assert_eq!(
            req(MachineAction::TestFailover, &none),
            (
                "/v1/machines/db1/test-failover".to_string(),
                json!({"point": "latest", "target": {"kind": "nbd"}})
            )
        );
        assert_eq!(
            req(MachineAction::FailoverPlanned, &none),
            (
                "/v1/machines/db1/failover".to_string(),
                json!({"planned": true, "target": {"kind": "nbd"}})
            )
        );
        assert_eq!(
            req(MachineAction::FailoverUnplanned, &none).1,
            json!({"planned": false, "point": "latest", "target": {"kind": "nbd"}})
        );
        assert_eq!(
            req(MachineAction::Commit, &none),
            ("/v1/machines/db1/commit".to_string(), json!({}))
        );
        assert_eq!(
            req(MachineAction::Cancel, &none).0,
            "/v1/machines/db1/cancel"
        );
        assert_eq!(
            req(MachineAction::FailbackPlanned, &none),
            (
                "/v1/machines/db1/failover".to_string(),
                json!({"direction": "home", "planned": true})
            )
        );
        assert_eq!(
            req(MachineAction::FailbackUnplanned, &none).1,
            json!({"direction": "home", "planned": false})
        );
        assert_eq!(
            req(MachineAction::CommitFailback, &none),
            ("/v1/machines/db1/commit".to_string(), json!({}))
        );
        assert_eq!(
            req(MachineAction::ReEnable, &none),
            ("/v1/machines/db1/re-enable".to_string(), json!({}))
        );
        let form = Form::parse(b"form_token=t&point=+2026-01-01T00%3A00%3A00Z+");
        assert_eq!(
            req(MachineAction::ChangePoint, &form),
            (
                "/v1/machines/db1/change-point".to_string(),
                json!({"point": "2026-01-01T00:00:00Z"})
            )
        );
        for bad in [&none, &Form::parse(b"point=+")] {
            let e = MachineAction::ChangePoint.request("db1", bad).unwrap_err();
            assert!(e.contains("the point must be"), "{e}");
        }
        let long = format!("point={}", "p".repeat(POINT_MAX_CHARS + 1));
        let e = MachineAction::ChangePoint
            .request("db1", &Form::parse(long.as_bytes()))
            .unwrap_err();
        assert!(e.contains("at most"), "{e}");
        let form = Form::parse(b"form_token=t&verdict=failed&notes=+no+login+prompt+&confirm=yes");
        assert!(form.confirm);
        assert_eq!(
            req(MachineAction::Cleanup, &form),
            (
                "/v1/machines/db1/test-failover-cleanup".to_string(),
                json!({"verdict": "failed", "notes": "no login prompt"})
            )
        );
        let e = MachineAction::Cleanup.request("db1", &none).unwrap_err();
        assert!(e.contains("verdict"), "{e}");
        let e = MachineAction::Commit.request("../x", &none).unwrap_err();
        assert!(e.contains("machine"), "{e}");
        for a in MachineAction::ALL {
            assert_eq!(MachineAction::parse(a.slug()), Some(a));
            assert_eq!(a.needs_confirmation(), !a.consequence().is_empty());
        }
    }

    #[test]
    fn a_resume_sends_the_verdict_or_nothing() {
        assert_eq!(resume_body(&Form::default()).unwrap(), json!({}));
        let f = Form::parse(b"verdict=passed&notes=+ok+");
        assert_eq!(
            resume_body(&f).unwrap(),
            json!({"verdict": "passed", "notes": "ok"})
        );
        let e = resume_body(&Form::parse(b"verdict=maybe")).unwrap_err();
        assert!(e.contains("maybe"), "{e}");
    }

    #[test]
    fn the_form_token_is_the_sessions_and_not_its_database_key() {
        let t = form_token("abc");
        assert_eq!(t, form_token("abc"));
        assert_ne!(t, form_token("abd"));
        assert_ne!(t, hash("abc"));
        assert!(same(&t, &form_token("abc")));
        assert!(!same(&t, "") && !same("ab", "ac"));
    }
}
