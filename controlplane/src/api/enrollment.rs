//! Enrollment: one-time tokens (`/v1/enrollment-tokens`, admin), the exchange of a
//! token and a CSR for a certificate (`/v1/enroll`, the token is the credential),
//! and renewal over mutual TLS (`/v1/renew`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_link::control::wire::{EnrollRequest, Issued, Kind, RenewRequest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::peer::Peer;
use super::{AppState, Body};
use crate::enroll::issue::{advertise_host, parse_csr, Leaf};
use crate::enroll::store::{self, Owner};
use crate::enroll::tokens::{hash, new_enrollment_secret};
use crate::registry::events;

/// A token lives an hour unless told otherwise, a week at most.
pub const DEFAULT_TTL_S: u32 = 3600;
pub const MAX_TTL_S: u32 = 7 * 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EnrollKind {
    Agent,
    ProcessServer,
    RecoveryHost,
}

impl From<EnrollKind> for Kind {
    fn from(k: EnrollKind) -> Kind {
        match k {
            EnrollKind::Agent => Kind::Agent,
            EnrollKind::ProcessServer => Kind::ProcessServer,
            EnrollKind::RecoveryHost => Kind::RecoveryHost,
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEnrollmentToken {
    /// What may enroll with it.
    #[serde(rename = "for")]
    pub kind: EnrollKind,
    /// Seconds it stays valid: 1 to 604800; default 3600.
    pub ttl_s: Option<u32>,
}

/// The only time the secret is shown.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedEnrollmentToken {
    #[serde(rename = "for")]
    pub kind: EnrollKind,
    /// Give it to `--enroll-token`; it works once.
    pub token: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// `wire::EnrollRequest`, as the OpenAPI document shows it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct EnrollBody {
    token: String,
    /// `agent` or `process-server`.
    kind: String,
    name: String,
    csr_pem: String,
    /// HOST:PORT; process servers only.
    advertise: Option<String>,
}

/// `wire::Issued`, as the OpenAPI document shows it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct IssuedBody {
    certificate_pem: String,
    ca_pem: String,
    not_after: String,
}

/// `wire::RenewRequest`, as the OpenAPI document shows it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RenewBody {
    csr_pem: String,
}

fn rfc3339(s: i64) -> String {
    chrono::DateTime::from_timestamp(s, 0).map_or_else(|| s.to_string(), |d| d.to_rfc3339())
}

#[utoipa::path(post, path = "/v1/enrollment-tokens", tag = "enrollment",
    request_body = NewEnrollmentToken, security(("bearer" = [])),
    responses((status = 201, body = CreatedEnrollmentToken), (status = 400, body = Problem),
        (status = 403, body = Problem)))]
pub async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    Body(new): Body<NewEnrollmentToken>,
) -> Result<(StatusCode, Json<CreatedEnrollmentToken>), ApiError> {
    caller.require(Role::Admin)?;
    let ttl = new.ttl_s.unwrap_or(DEFAULT_TTL_S);
    if !(1..=MAX_TTL_S).contains(&ttl) {
        return Err(ApiError::BadRequest(format!(
            "ttl_s {ttl} must be from 1 to {MAX_TTL_S}"
        )));
    }
    let secret = new_enrollment_secret();
    let now = crate::db::now_s();
    let kind = Kind::from(new.kind).as_str();
    store::create_token(&state.db, &hash(&secret), kind, now, i64::from(ttl)).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrollmentToken {
            kind: new.kind,
            token: secret,
            expires_at: rfc3339(now + i64::from(ttl)),
        }),
    ))
}

fn issued(state: &AppState, leaf: Leaf) -> Json<Issued> {
    Json(Issued {
        certificate_pem: leaf.pem,
        ca_pem: state.ca.pem.clone(),
        not_after: rfc3339(leaf.not_after),
    })
}

fn internal(e: crate::enroll::Error) -> ApiError {
    ApiError::Internal(Box::new(e))
}

#[utoipa::path(post, path = "/v1/enroll", tag = "enrollment", request_body = EnrollBody,
    responses((status = 200, body = IssuedBody), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 409, body = Problem)))]
pub async fn enroll(
    State(state): State<AppState>,
    Body(req): Body<EnrollRequest>,
) -> Result<Json<Issued>, ApiError> {
    let what = match req.kind {
        Kind::Agent => "machine",
        Kind::ProcessServer => "process server",
        Kind::RecoveryHost => "recovery host",
    };
    ferry_replica::layout::check_name(what, &req.name)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if req.kind == Kind::Agent && ferry_replica::layout::is_reverse(&req.name) {
        return Err(ApiError::BadRequest(format!(
            "machine name {:?} ends in {:?}, which names failback's reverse replicas",
            req.name,
            ferry_replica::layout::REVERSE_SUFFIX
        )));
    }
    let mut names = vec![req.name.clone()];
    match (req.kind, &req.advertise) {
        (Kind::Agent | Kind::RecoveryHost, None) => {}
        (Kind::Agent | Kind::RecoveryHost, Some(_)) => {
            return Err(ApiError::BadRequest(format!(
                "advertise is for process servers; a {what} has none"
            )))
        }
        (Kind::ProcessServer, None) => {
            return Err(ApiError::BadRequest(
                "a process server must give advertise (HOST:PORT agents reach it at)".into(),
            ))
        }
        (Kind::ProcessServer, Some(a)) => {
            let host = advertise_host(a)
                .ok_or_else(|| ApiError::BadRequest(format!("advertise {a:?} is not HOST:PORT")))?;
            if host != req.name {
                names.push(host);
            }
        }
    }
    let csr = parse_csr(&req.csr_pem).map_err(ApiError::BadRequest)?;
    // Signed before the token is looked at: signing is cheap, and the certificate is
    // handed out only if the transaction that spends the token commits.
    let leaf = state.ca.issue(csr, req.kind, &names).map_err(internal)?;
    let now = crate::db::now_s();
    let owner = Owner {
        kind: req.kind.as_str(),
        name: &req.name,
        names: &names,
    };
    store::enroll(&state.db, &hash(req.token.trim()), &leaf, &owner, now)
        .await?
        .map_err(|refusal| {
            if refusal.is_token() {
                ApiError::Unauthorized(refusal.to_string())
            } else {
                ApiError::Conflict(refusal.to_string())
            }
        })?;
    let subject = format!("{} {}", req.kind.as_str(), req.name);
    let msg = format!("enrolled; certificate {}", leaf.serial);
    events::add(&state.db, "enrolled", &subject, &msg, now).await?;
    Ok(issued(&state, leaf))
}

#[utoipa::path(post, path = "/v1/renew", tag = "enrollment", request_body = RenewBody,
    responses((status = 200, body = IssuedBody), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn renew(
    State(state): State<AppState>,
    peer: Peer,
    Body(req): Body<RenewRequest>,
) -> Result<Json<Issued>, ApiError> {
    let kind = match peer.0.owner_kind.as_str() {
        "agent" => Kind::Agent,
        "process-server" => Kind::ProcessServer,
        "recovery-host" => Kind::RecoveryHost,
        other => {
            return Err(ApiError::Internal(
                format!("certificate {} has owner kind {other:?}", peer.0.serial).into(),
            ))
        }
    };
    let csr = parse_csr(&req.csr_pem).map_err(ApiError::BadRequest)?;
    let leaf = state.ca.issue(csr, kind, &peer.0.names).map_err(internal)?;
    let owner = Owner {
        kind: kind.as_str(),
        name: &peer.0.owner_name,
        names: &peer.0.names,
    };
    store::record_cert(&state.db, &leaf, &owner, crate::db::now_s()).await?;
    Ok(issued(&state, leaf))
}
