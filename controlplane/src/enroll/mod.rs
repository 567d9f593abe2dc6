//! What the control plane issues: the site CA, its own service certificate, API and
//! enrollment token secrets (`tokens`), and the certificates of enrolled agents and
//! process servers, signed from their CSRs (`issue`) and recorded with their one-time
//! tokens (`store`).
//!
//! Files in the state directory (private ones 0600, written whole then renamed, so a
//! crash leaves the old file or the new one, never half of one):
//! - `ca.pem` (the site CA, the only thing a client must trust), `ca.key` (0600);
//! - `server.pem`, `server.key` (0600), `server.names`: the service's certificate and
//!   the names it was issued for (a change of `--server-name` reissues it);
//! - `admin.token` (0600): a bearer token with the admin role.

pub mod ca;
pub mod files;
pub mod issue;
pub mod join;
pub mod store;
pub mod tokens;

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: {source}")]
    Cert {
        op: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path}: {why}")]
    Bad { path: PathBuf, why: String },
}
