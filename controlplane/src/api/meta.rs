//! What needs no token: `/healthz`, `/metrics` (Prometheus text) and the OpenAPI
//! document. The request counter is a middleware over every route.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

/// Requests served, by route template, method and status. Bounded: routes are the
/// router's templates (anything unrouted counts as `unmatched`), methods the standard
/// ones (others count as `other`), statuses three digits.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, &'static str, u16), u64>>,
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

impl Metrics {
    fn count(&self, route: String, method: &'static str, status: u16) {
        // A poisoned lock only means a panic elsewhere mid-increment: keep counting.
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((route, method, status)).or_insert(0) += 1;
    }

    fn render(&self) -> String {
        let map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::from(
            "# HELP ferry_cp_http_requests_total Requests served, by route, method and status.\n\
             # TYPE ferry_cp_http_requests_total counter\n",
        );
        for ((route, method, status), n) in map.iter() {
            let _ = writeln!(
                out,
                "ferry_cp_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
            );
        }
        out
    }
}

/// Middleware: counts each request under its route template.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = method_label(req.method());
    let resp = next.run(req).await;
    state.metrics.count(route, method, resp.status().as_u16());
    resp
}

#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain"),
        (status = 500, body = super::error::Problem)))]
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut out = state.metrics.render();
    fleet(&state, &mut out).await?;
    out.push_str(&super::jobs::metrics_text(&state).await);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// One figure of a process server, for its gauge.
type PsFigure = fn(&crate::registry::process_servers::PsRow) -> f64;

/// The fleet's gauges, computed at scrape time like the API's views: per machine its
/// RPO and health, per process server its figures and health, so that Prometheus and
/// Alertmanager can page on them.
async fn fleet(state: &AppState, out: &mut String) -> Result<(), ApiError> {
    use crate::health;
    use crate::registry::{machines, process_servers};
    let db = &state.db;
    let now = health::now_f();
    let policies = health::policies(db).await?;
    let mut ms = Vec::new();
    loop {
        let after = ms.last().map(|m: &machines::MachineRow| m.name.clone());
        let page = machines::list(db, after.as_deref(), super::PAGE_MAX).await?;
        let short = page.len() < super::PAGE_MAX as usize;
        ms.extend(page);
        if short {
            break;
        }
    }
    let mut rpo = String::new();
    let mut level = String::new();
    for m in &ms {
        if let Some(r) = health::rpo_seconds(m, now) {
            let _ = writeln!(
                rpo,
                "ferry_machine_rpo_seconds{{machine=\"{}\"}} {r}",
                m.name
            );
        }
        let h = health::policy_of(&policies, &m.policy).map_or(health::Health::Warning, |p| {
            health::machine(m, p, now).health
        });
        let _ = writeln!(
            level,
            "ferry_machine_health{{machine=\"{}\"}} {}",
            m.name,
            h.level()
        );
    }
    let _ = write!(
        out,
        "# HELP ferry_machine_rpo_seconds Now minus the newest uploaded point's time.\n\
         # TYPE ferry_machine_rpo_seconds gauge\n{rpo}\
         # HELP ferry_machine_health 0 normal, 1 warning, 2 critical.\n\
         # TYPE ferry_machine_health gauge\n{level}"
    );
    let mut ps = Vec::new();
    loop {
        let after = ps.last().map(|p: &process_servers::PsRow| p.name.clone());
        let page = process_servers::list(db, after.as_deref(), super::PAGE_MAX).await?;
        let short = page.len() < super::PAGE_MAX as usize;
        ps.extend(page);
        if short {
            break;
        }
    }
    let gauges: [(&str, &str, PsFigure); 5] = [
        ("cache_free_bytes", "Cache bytes free.", |p| {
            p.cache_free_bytes as f64
        }),
        ("cache_used_bytes", "Cache bytes used.", |p| {
            p.cache_used_bytes as f64
        }),
        (
            "ingest_bytes_per_second",
            "Bytes taken from agents per second.",
            |p| p.ingest_bytes_per_s,
        ),
        (
            "upload_lag_seconds",
            "Age of the oldest cached write not yet in the store.",
            |p| p.upload_lag_s,
        ),
        ("cpu_percent", "CPU use, percent of one core.", |p| {
            p.cpu_percent
        }),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP ferry_process_server_{name} {help}\n# TYPE ferry_process_server_{name} gauge"
        );
        for p in &ps {
            let _ = writeln!(
                out,
                "ferry_process_server_{name}{{process_server=\"{}\"}} {}",
                p.name,
                value(p)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP ferry_process_server_health 0 normal, 1 warning, 2 critical.\n\
         # TYPE ferry_process_server_health gauge"
    );
    for p in &ps {
        let _ = writeln!(
            out,
            "ferry_process_server_health{{process_server=\"{}\"}} {}",
            p.name,
            health::process_server(p, now).health.level()
        );
    }
    Ok(())
}

#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "serving, and the database answers"),
        (status = 500, body = super::error::Problem)))]
pub async fn healthz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.db.ping().await?;
    Ok("ok\n")
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "this document")))]
pub async fn openapi(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.clone(),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such resource (see /v1/openapi.json)".into())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("method not allowed on this resource".into())
}
