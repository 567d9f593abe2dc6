//! Bearer tokens and roles. Every `/v1` resource but the OpenAPI document needs a
//! token; a handler then asks its caller for the role it needs.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::AppState;
use crate::db;
use crate::enroll::tokens::hash;

/// What a token may do; each role can do all that the ones before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads (GET) only.
    Viewer,
    /// Reads, and cancels, resumes or restarts jobs.
    Operator,
    /// Everything: policies, tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The token a request came with, once known.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: String,
    pub role: Role,
}

impl Caller {
    /// 403 unless the caller's role is at least `needed`.
    pub fn require(&self, needed: Role) -> Result<(), ApiError> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "token {} has role {}; this needs {}",
                self.token,
                self.role.as_str(),
                needed.as_str()
            )))
        }
    }
}

/// A caller the dashboard vouches for: its forms (`crate::dashboard::actions`) call
/// the API's handlers in-process as the signed-in session's token and role. Only
/// code in this process can put one in a request's extensions; nothing a client
/// sends becomes one.
#[derive(Debug, Clone)]
pub(crate) struct Delegated(pub(crate) Caller);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(Delegated(caller)) = parts.extensions.get::<Delegated>() {
            return Ok(caller.clone());
        }
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer token".into()))?;
        let secret = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be `Bearer TOKEN`".into())
            })?;
        let (token, role) = db::tokens::find(&state.db, &hash(secret))
            .await?
            .ok_or_else(|| ApiError::Unauthorized("unknown or deleted token".into()))?;
        let role = Role::parse(&role).ok_or_else(|| {
            ApiError::Internal(format!("token {token} has an unknown role {role:?}").into())
        })?;
        Ok(Caller { token, role })
    }
}
