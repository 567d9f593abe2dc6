//! `/v1/heartbeat/agent` and `/v1/heartbeat/process-server`: over mutual TLS, each
//! with the certificate its sender enrolled for, which must name the machine or
//! process server the heartbeat is about.

use axum::extract::State;
use axum::Json;
use ferry_link::control::limits::{MAX_FAILED_OVER, MAX_REVOKED};
use ferry_link::control::wire::{
    AgentHeartbeat, AgentOrders, ProcessServerHeartbeat, ProcessServerOrders, HEARTBEAT_INTERVAL_S,
};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::peer::Peer;
use super::{AppState, Body};
use crate::enroll::store::revoked_serials;
use crate::registry::{self, events, failover, process_servers};

/// `wire::AgentHeartbeat`, as the OpenAPI document shows it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AgentHeartbeatBody {
    machine: String,
    /// `wire::DiskReport`s.
    disks: Vec<serde_json::Value>,
    process_server: Option<String>,
    last_error: Option<String>,
    /// HOST:PORT where it accepts its group coordinator's cuts; absent: none.
    group_listen: Option<String>,
    /// `wire::FailoverReport`: where it is with its failover order; absent: none.
    failover: Option<serde_json::Value>,
}

/// `wire::ProcessServerHeartbeat`, as the OpenAPI document shows it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ProcessServerHeartbeatBody {
    name: String,
    address: String,
    cache_used_bytes: u64,
    cache_free_bytes: u64,
    ingest_bytes_per_s: f64,
    upload_lag_s: f64,
    cpu_percent: f64,
    health: String,
    health_reasons: Vec<String>,
    machines: Vec<String>,
    /// Optional: disks it was fenced from (`wire::FencedDisk`), each an event of kind
    /// `fencing`.
    fenced: Vec<FencedDiskBody>,
}

/// `wire::FencedDisk`, as the OpenAPI document shows it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FencedDiskBody {
    machine: String,
    disk: String,
    epoch: u64,
    new_writer: String,
    dropped_bytes: u64,
    time: String,
}

#[utoipa::path(post, path = "/v1/heartbeat/agent", tag = "heartbeats",
    request_body = AgentHeartbeatBody,
    responses((status = 200, description = "wire::AgentOrders: process server, policy, group, failover"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem)))]
pub async fn agent(
    State(state): State<AppState>,
    peer: Peer,
    Body(hb): Body<AgentHeartbeat>,
) -> Result<Json<AgentOrders>, ApiError> {
    peer.require("agent", &hb.machine)?;
    let uploaded = registry::check_agent_heartbeat(&hb).map_err(ApiError::BadRequest)?;
    let orders = registry::agent_heartbeat(&state.db, &hb, uploaded, crate::db::now_s()).await?;
    Ok(Json(orders))
}

#[utoipa::path(post, path = "/v1/heartbeat/process-server", tag = "heartbeats",
    request_body = ProcessServerHeartbeatBody,
    responses((status = 200, description = "wire::ProcessServerOrders: the revoked serials, the machines failed over"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem)))]
pub async fn process_server(
    State(state): State<AppState>,
    peer: Peer,
    Body(hb): Body<ProcessServerHeartbeat>,
) -> Result<Json<ProcessServerOrders>, ApiError> {
    peer.require("process-server", &hb.name)?;
    registry::check_process_server_heartbeat(&hb).map_err(ApiError::BadRequest)?;
    let now = crate::db::now_s();
    if process_servers::heartbeat(&state.db, &hb, now).await? {
        let subject = format!("process-server {}", hb.name);
        let msg = format!("first heartbeat; agents reach it at {}", hb.address);
        events::add(&state.db, "registered", &subject, &msg, now).await?;
    }
    process_servers::record_fencings(&state.db, &hb, now).await?;
    let limit = u32::try_from(MAX_REVOKED + 1).unwrap_or(u32::MAX);
    let revoked = whole_revoked_list(revoked_serials(&state.db, now, limit).await?)?;
    let failed_over = whole_failed_over_list(failover::failed_over_machines(&state.db).await?)?;
    Ok(Json(ProcessServerOrders {
        revoked_serials: revoked,
        heartbeat_interval_s: HEARTBEAT_INTERVAL_S,
        failed_over,
    }))
}

/// The failed-over machines as fetched (at most one over `MAX_FAILED_OVER`), if the
/// list is whole. As with the revoked list, a longer one is not cut: the machines left
/// out would replicate again over their recovery site's history (split brain). The
/// heartbeat fails, the process server keeps its last list, and the log says why.
fn whole_failed_over_list(machines: Vec<String>) -> Result<Vec<String>, ApiError> {
    if machines.len() > MAX_FAILED_OVER {
        return Err(ApiError::Internal(
            format!(
                "over {MAX_FAILED_OVER} machines are failed over: too many to send process \
                 servers; they keep their last list until some are cancelled or removed"
            )
            .into(),
        ));
    }
    Ok(machines)
}

/// The revoked list as fetched (at most one over `MAX_REVOKED`), if it is whole. A
/// longer one is not cut: a process server sent part of it would let the rest of the
/// removed in, so the heartbeat fails (the process server keeps its last list) and the
/// log says why.
fn whole_revoked_list(serials: Vec<String>) -> Result<Vec<String>, ApiError> {
    if serials.len() > MAX_REVOKED {
        return Err(ApiError::Internal(
            format!(
                "over {MAX_REVOKED} revoked certificates have not expired: too many to send \
                 process servers; they keep their last list until some expire"
            )
            .into(),
        ));
    }
    Ok(serials)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_list_over_the_bound_is_an_error_not_a_cut() {
        let full: Vec<String> = (0..MAX_REVOKED).map(|i| format!("{i:x}")).collect();
        assert_eq!(whole_revoked_list(full.clone()).unwrap().len(), MAX_REVOKED);
        let mut over = full;
        over.push("ffffffff".into());
        let e = whole_revoked_list(over).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn a_failed_over_list_over_the_bound_is_an_error_not_a_cut() {
        let full: Vec<String> = (0..MAX_FAILED_OVER).map(|i| format!("m{i}")).collect();
        assert_eq!(
            whole_failed_over_list(full.clone()).unwrap().len(),
            MAX_FAILED_OVER
        );
        let mut over = full;
        over.push("zz".into());
        let e = whole_failed_over_list(over).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    }
}
