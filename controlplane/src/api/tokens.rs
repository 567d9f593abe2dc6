//! `/v1/tokens`: API tokens for people and scripts, admin only. The secret is shown
//! once, in the answer to its creation; the store keeps only its SHA-256.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::{AppState, Body, Page, Query};
use crate::db;
use crate::db::tokens::ADMIN_TOKEN_NAME;
use crate::enroll::tokens::{hash, new_secret};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Follows the store's name rule.
    pub name: String,
    pub role: Role,
}

/// A token as listed.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    /// Unix seconds.
    pub created_at: i64,
}

/// The answer to a creation: the only time the secret is shown.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub name: String,
    pub role: Role,
    /// `Authorization: Bearer` this.
    pub token: String,
}

#[derive(Serialize, ToSchema)]
pub struct TokenList {
    pub items: Vec<TokenInfo>,
    pub next_after: Option<String>,
}

#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", params(Page),
    security(("bearer" = [])),
    responses((status = 200, body = TokenList), (status = 403, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Json<TokenList>, ApiError> {
    caller.require(Role::Admin)?;
    let limit = page.limit()?;
    let rows = db::tokens::list(&state.db, page.after.as_deref(), limit).await?;
    let items = rows
        .into_iter()
        .map(|r| {
            let role = Role::parse(&r.role).ok_or_else(|| {
                ApiError::Internal(
                    format!("token {} has an unknown role {:?}", r.name, r.role).into(),
                )
            })?;
            Ok(TokenInfo {
                name: r.name,
                role,
                created_at: r.created_at,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let next_after = page.next_after(&items, |t| &t.name, limit);
    Ok(Json(TokenList { items, next_after }))
}

#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = NewToken,
    security(("bearer" = [])),
    responses((status = 201, body = CreatedToken), (status = 400, body = Problem),
        (status = 409, body = Problem)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(new): Body<NewToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    caller.require(Role::Admin)?;
    ferry_replica::layout::check_name("token", &new.name)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let secret = new_secret();
    if !db::tokens::create(&state.db, &new.name, new.role.as_str(), &hash(&secret)).await? {
        return Err(ApiError::Conflict(format!("token {} exists", new.name)));
    }
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            name: new.name,
            role: new.role,
            token: secret,
        }),
    ))
}

#[utoipa::path(delete, path = "/v1/tokens/{name}", tag = "tokens",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    ferry_replica::layout::check_name("token", &name)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if name == ADMIN_TOKEN_NAME {
        // It is re-registered from DIR/admin.token at every start anyway.
        return Err(ApiError::Conflict(
            "the admin token lives in the state directory's admin.token: replace that \
             file and restart to change it"
                .into(),
        ));
    }
    if !db::tokens::delete(&state.db, &name).await? {
        return Err(ApiError::NotFound(format!("no token {name}")));
    }
    Ok(StatusCode::NO_CONTENT)
}
