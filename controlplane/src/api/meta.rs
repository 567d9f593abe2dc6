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
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state.metrics.render();
    text.push_str(&super::jobs::metrics_text(&state).await);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
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
