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
    fleet(&state.db, &mut out).await?;
    out.push_str(&super::jobs::metrics_text(&state).await);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// One figure of a process server, for its gauge.
type PsFigure = fn(&crate::registry::process_servers::PsRow, f64) -> f64;

/// Rows read per query while rendering the fleet's gauges: each page is turned into
/// text and dropped before the next is read, so that a scrape (it needs no token)
/// holds at most this many rows, each up to a heartbeat's size, whatever the fleet's.
const METRICS_PAGE: u32 = 100;

/// The fleet's gauges, computed at scrape time like the API's views: per machine its
/// RPO and health, per process server its figures and health, so that Prometheus and
/// Alertmanager can page on them.
async fn fleet(db: &crate::db::Db, out: &mut String) -> Result<(), ApiError> {
    use crate::health;
    use crate::registry::{machines, process_servers};
    let now = health::now_f();
    let policies = health::policies(db).await?;
    let mut rpo = String::new();
    let mut level = String::new();
    let mut after: Option<String> = None;
    loop {
        let page = machines::list(db, after.as_deref(), METRICS_PAGE).await?;
        for m in &page {
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
        if page.len() < METRICS_PAGE as usize {
            break;
        }
        after = page.last().map(|m| m.name.clone());
    }
    let _ = write!(
        out,
        "# HELP ferry_machine_rpo_seconds Now minus the newest uploaded point's time.\n\
         # TYPE ferry_machine_rpo_seconds gauge\n{rpo}\
         # HELP ferry_machine_health 0 normal, 1 warning, 2 critical.\n\
         # TYPE ferry_machine_health gauge\n{level}"
    );
    let gauges: [(&str, &str, PsFigure); 6] = [
        ("cache_free_bytes", "Cache bytes free.", |p, _| {
            p.cache_free_bytes as f64
        }),
        ("cache_used_bytes", "Cache bytes used.", |p, _| {
            p.cache_used_bytes as f64
        }),
        (
            "ingest_bytes_per_second",
            "Bytes taken from agents per second.",
            |p, _| p.ingest_bytes_per_s,
        ),
        (
            "upload_lag_seconds",
            "Age of the oldest cached write not yet in the store.",
            |p, _| p.upload_lag_s,
        ),
        ("cpu_percent", "CPU use, percent of one core.", |p, _| {
            p.cpu_percent
        }),
        ("health", "0 normal, 1 warning, 2 critical.", |p, now| {
            f64::from(health::process_server(p, now).health.level())
        }),
    ];
    // One text per gauge, each filled a page at a time.
    let mut texts: Vec<String> = gauges
        .iter()
        .map(|(name, help, _)| {
            format!(
                "# HELP ferry_process_server_{name} {help}\n# TYPE ferry_process_server_{name} gauge\n"
            )
        })
        .collect();
    let mut after: Option<String> = None;
    loop {
        let page = process_servers::list(db, after.as_deref(), METRICS_PAGE).await?;
        for p in &page {
            for ((name, _, value), text) in gauges.iter().zip(texts.iter_mut()) {
                let _ = writeln!(
                    text,
                    "ferry_process_server_{name}{{process_server=\"{}\"}} {}",
                    p.name,
                    value(p, now)
                );
            }
        }
        if page.len() < METRICS_PAGE as usize {
            break;
        }
        after = page.last().map(|p| p.name.clone());
    }
    for text in texts {
        out.push_str(&text);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;
    use crate::registry::{machines, process_servers};
    use ferry_link::control::wire::ProcessServerHeartbeat;

    /// Every machine and process server is on `/metrics` once, however many pages
    /// the rendering reads them in.
    #[tokio::test]
    async fn the_fleet_gauges_cover_every_page() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
        let now = crate::db::now_s();
        let n = 2 * METRICS_PAGE as usize + 1;
        for i in 0..n {
            let name = format!("m{i:04}");
            let beat = machines::Beat {
                name: &name,
                state: "protected",
                disks: &[],
                last_error: None,
                newest_uploaded_at: Some(now as f64 - 3.0),
                group_listen: None,
                now,
            };
            machines::heartbeat(&db, &beat).await.unwrap();
        }
        for i in 0..(METRICS_PAGE as usize + 2) {
            let hb = ProcessServerHeartbeat {
                name: format!("ps{i:04}"),
                address: format!("ps{i}.example:7000"),
                cache_used_bytes: 10,
                cache_free_bytes: 90,
                ingest_bytes_per_s: 0.0,
                upload_lag_s: 0.0,
                cpu_percent: 1.0,
                health: "normal".into(),
                health_reasons: vec![],
                machines: vec![],
                fenced: vec![],
            };
            process_servers::heartbeat(&db, &hb, now).await.unwrap();
        }
        let mut out = String::new();
        fleet(&db, &mut out).await.unwrap();
        let count = |prefix: &str| out.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(count("ferry_machine_rpo_seconds{"), n);
        assert_eq!(count("ferry_machine_health{"), n);
        assert!(
            out.contains("ferry_machine_health{machine=\"m0200\"} 0"),
            "{out}"
        );
        let ps = METRICS_PAGE as usize + 2;
        assert_eq!(count("ferry_process_server_cache_free_bytes{"), ps);
        assert_eq!(count("ferry_process_server_health{"), ps);
        assert_eq!(count("# TYPE ferry_process_server_health gauge"), 1);
        assert!(out.contains("ferry_process_server_cache_free_bytes{process_server=\"ps0101\"} 90"));
        assert!(out.contains("ferry_process_server_health{process_server=\"ps0000\"} 0"));
    }
}
