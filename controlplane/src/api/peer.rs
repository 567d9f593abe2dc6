//! The client certificate of a mutual-TLS connection: agents and process servers
//! present the one they enrolled for. The TLS layer has already checked that it
//! chains to the site CA and is within its dates; here it is found among the
//! certificates the control plane issued (by the SHA-256 of its DER) to learn whose
//! it is, and refused if it was revoked.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;
use crate::enroll::store::{find_cert, CertRow};

/// The peer's certificate (DER), put on every request of its connection by the
/// server; None when the client presented none (operators with bearer tokens).
#[derive(Debug, Clone, Default)]
pub struct ClientCert(pub Option<Arc<Vec<u8>>>);

/// The issued, unrevoked certificate a request came with.
#[derive(Debug, Clone)]
pub struct Peer(pub CertRow);

impl Peer {
    /// 403 unless the certificate was issued to this `kind` named `name`.
    pub fn require(&self, kind: &str, name: &str) -> Result<(), ApiError> {
        if self.0.owner_kind == kind && self.0.owner_name == name {
            return Ok(());
        }
        Err(ApiError::Forbidden(format!(
            "the client certificate is {} {}'s, not {kind} {name}'s",
            self.0.owner_kind, self.0.owner_name
        )))
    }
}

impl FromRequestParts<AppState> for Peer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let der = parts
            .extensions
            .get::<ClientCert>()
            .and_then(|c| c.0.clone())
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "this needs mutual TLS with the certificate issued at enrollment".into(),
                )
            })?;
        let cert = find_cert(&state.db, &hex::encode(Sha256::digest(der.as_slice())))
            .await?
            .ok_or_else(|| {
                ApiError::Forbidden(
                    "the client certificate was not issued by enrollment here".into(),
                )
            })?;
        if cert.revoked {
            return Err(ApiError::Forbidden(format!(
                "certificate {} of {} {} is revoked: it was removed",
                cert.serial, cert.owner_kind, cert.owner_name
            )));
        }
        Ok(Peer(cert))
    }
}
