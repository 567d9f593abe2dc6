//! `/v1/process-servers`: the process servers that heartbeat, with their figures and
//! health; removing one (admin) revokes its certificates and frees its machines to
//! be given another at their next heartbeat.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::machines::{checked, rfc3339};
use super::{AppState, Page, Query};
use crate::db;
use crate::health::{self, Health};
use crate::registry::events;
use crate::registry::process_servers::{self, PsRow};

/// A process server as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProcessServer {
    pub name: String,
    /// HOST:PORT agents reach it at.
    pub address: String,
    pub health: Health,
    pub health_reasons: Vec<String>,
    /// Machines the control plane gave it.
    pub machines_assigned: i64,
    /// Machines connected to it, as it last reported.
    pub machines_connected: Vec<String>,
    pub cache_used_bytes: u64,
    pub cache_free_bytes: u64,
    pub ingest_bytes_per_s: f64,
    pub upload_lag_s: f64,
    pub cpu_percent: f64,
    /// RFC 3339.
    pub last_seen: String,
}

#[derive(Serialize, ToSchema)]
pub struct ProcessServerList {
    pub items: Vec<ProcessServer>,
    pub next_after: Option<String>,
}

pub(crate) fn view(p: PsRow, assigned: i64, now: f64) -> ProcessServer {
    let v = health::process_server(&p, now);
    ProcessServer {
        name: p.name,
        address: p.address,
        health: v.health,
        health_reasons: v.reasons,
        machines_assigned: assigned,
        machines_connected: p.connected,
        cache_used_bytes: p.cache_used_bytes,
        cache_free_bytes: p.cache_free_bytes,
        ingest_bytes_per_s: p.ingest_bytes_per_s,
        upload_lag_s: p.upload_lag_s,
        cpu_percent: p.cpu_percent,
        last_seen: rfc3339(p.last_seen),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("no process server {name}"))
}

#[utoipa::path(get, path = "/v1/process-servers", tag = "process-servers", params(Page),
    security(("bearer" = [])),
    responses((status = 200, body = ProcessServerList), (status = 401, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Json<ProcessServerList>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = page.limit()?;
    let rows = process_servers::list(&state.db, page.after.as_deref(), limit).await?;
    let loads = process_servers::loads(&state.db).await?;
    let now = health::now_f();
    let items: Vec<ProcessServer> = rows
        .into_iter()
        .map(|p| {
            let n = loads.get(&p.name).copied().unwrap_or(0);
            view(p, n, now)
        })
        .collect();
    let next_after = page.next_after(&items, |p| &p.name, limit);
    Ok(Json(ProcessServerList { items, next_after }))
}

#[utoipa::path(get, path = "/v1/process-servers/{name}", tag = "process-servers",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = ProcessServer), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ProcessServer>, ApiError> {
    caller.require(Role::Viewer)?;
    checked("process server", &name)?;
    let p = process_servers::get(&state.db, &name)
        .await?
        .filter(|p| !p.removed)
        .ok_or_else(|| not_found(&name))?;
    let n = process_servers::loads(&state.db)
        .await?
        .get(&name)
        .copied()
        .unwrap_or(0);
    Ok(Json(view(p, n, health::now_f())))
}

#[utoipa::path(delete, path = "/v1/process-servers/{name}", tag = "process-servers",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 404, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    checked("process server", &name)?;
    if !process_servers::remove(&state.db, &name).await? {
        return Err(not_found(&name));
    }
    let msg = format!(
        "removed by {}; its certificates are revoked and its machines freed",
        caller.token
    );
    let subject = format!("process-server {name}");
    events::add(&state.db, "removed", &subject, &msg, db::now_s()).await?;
    Ok(StatusCode::NO_CONTENT)
}
