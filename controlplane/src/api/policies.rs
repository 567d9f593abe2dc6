//! `/v1/policies`: list, create, get, change (PATCH: only the fields named), delete
//! (never `default`). Reading needs a viewer token, changing an admin one.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::{AppState, Body, Page, Query};
use crate::db;
use crate::policy::{Policy, PolicyPatch, DEFAULT_NAME};

/// One page of policies, in name order.
#[derive(Serialize, ToSchema)]
pub struct PolicyList {
    pub items: Vec<Policy>,
    /// Pass as `after` for the next page; null once a page comes back short.
    pub next_after: Option<String>,
}

fn checked_name(name: &str) -> Result<(), ApiError> {
    ferry_replica::layout::check_name("policy", name)
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("no policy {name}"))
}

#[utoipa::path(get, path = "/v1/policies", tag = "policies", params(Page),
    security(("bearer" = [])),
    responses((status = 200, body = PolicyList), (status = 401, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Json<PolicyList>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = page.limit()?;
    let items = db::policies::list(&state.db, page.after.as_deref(), limit).await?;
    let next_after = page.next_after(&items, |p| &p.name, limit);
    Ok(Json(PolicyList { items, next_after }))
}

#[utoipa::path(post, path = "/v1/policies", tag = "policies", request_body = Policy,
    security(("bearer" = [])),
    responses((status = 201, body = Policy), (status = 400, body = Problem),
        (status = 409, body = Problem)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(policy): Body<Policy>,
) -> Result<(StatusCode, Json<Policy>), ApiError> {
    caller.require(Role::Admin)?;
    policy.check().map_err(ApiError::BadRequest)?;
    if !db::policies::create(&state.db, &policy).await? {
        return Err(ApiError::Conflict(format!("policy {} exists", policy.name)));
    }
    Ok((StatusCode::CREATED, Json(policy)))
}

#[utoipa::path(get, path = "/v1/policies/{name}", tag = "policies",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = Policy), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Policy>, ApiError> {
    caller.require(Role::Viewer)?;
    checked_name(&name)?;
    let policy = db::policies::get(&state.db, &name)
        .await?
        .ok_or_else(|| not_found(&name))?;
    Ok(Json(policy))
}

#[utoipa::path(patch, path = "/v1/policies/{name}", tag = "policies",
    params(("name" = String, Path)), request_body = PolicyPatch, security(("bearer" = [])),
    responses((status = 200, body = Policy), (status = 400, body = Problem),
        (status = 404, body = Problem)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(patch): Body<PolicyPatch>,
) -> Result<Json<Policy>, ApiError> {
    caller.require(Role::Admin)?;
    checked_name(&name)?;
    let old = db::policies::get(&state.db, &name)
        .await?
        .ok_or_else(|| not_found(&name))?;
    let new = old.patched(&patch);
    new.check().map_err(ApiError::BadRequest)?;
    // Read, change, write: two PATCHes of different fields at once could lose one;
    // acceptable while people change policies by hand (jobs will want a version).
    if !db::policies::update(&state.db, &new).await? {
        return Err(not_found(&name));
    }
    Ok(Json(new))
}

#[utoipa::path(delete, path = "/v1/policies/{name}", tag = "policies",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    checked_name(&name)?;
    if name == DEFAULT_NAME {
        return Err(ApiError::Conflict(
            "the default policy cannot be deleted (change it instead)".into(),
        ));
    }
    // Refused while machines use it: they would silently fall back to `default`.
    // (A machine given it between this check and the delete gets `default` at its
    // next heartbeat, which is what it would get anyway.)
    let users = crate::registry::machines::using_policy(&state.db, &name, 5).await?;
    if !users.is_empty() {
        return Err(ApiError::Conflict(format!(
            "policy {name} is used by machine {}: give them another first",
            users.join(", ")
        )));
    }
    if !db::policies::delete(&state.db, &name).await? {
        return Err(not_found(&name));
    }
    Ok(StatusCode::NO_CONTENT)
}
