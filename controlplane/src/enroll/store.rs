//! The `enrollment_tokens` and `issued_certs` tables: one-time tokens (hashed, with
//! an expiry), and every certificate the site CA issued to an agent or process
//! server, by serial, with its owner and whether it is revoked.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::issue::Leaf;
use crate::db::{q, Db, Error, Result};

/// Why an enrollment was refused: the token (a 401), or the name (a 409).
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    Unknown,
    Used {
        by: String,
        at: i64,
    },
    Expired {
        at: i64,
    },
    WrongKind {
        is: String,
    },
    /// The name holds a certificate that is neither revoked nor expired: a token
    /// must not let anyone take over an enrolled machine or process server.
    Taken {
        kind: String,
        name: String,
    },
}

impl Refusal {
    /// Whether the token is what was wrong (rather than the name).
    pub fn is_token(&self) -> bool {
        !matches!(self, Refusal::Taken { .. })
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let time = |s: i64| {
            chrono::DateTime::from_timestamp(s, 0).map_or_else(|| s.to_string(), |d| d.to_rfc3339())
        };
        match self {
            Refusal::Unknown => write!(f, "unknown enrollment token"),
            Refusal::Used { by, at } => write!(
                f,
                "the enrollment token was already used (by {by} at {}); tokens work once",
                time(*at)
            ),
            Refusal::Expired { at } => {
                write!(f, "the enrollment token expired at {}", time(*at))
            }
            Refusal::WrongKind { is } => {
                write!(f, "the enrollment token is for a {is}, not for this kind")
            }
            Refusal::Taken { kind, name } => write!(
                f,
                "{kind} {name} is enrolled already: remove it first to enroll it again"
            ),
        }
    }
}

/// Stores a new token's hash.
pub async fn create_token(db: &Db, sha256: &str, kind: &str, now: i64, ttl_s: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO enrollment_tokens (secret_sha256, kind, created_at, expires_at) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(sha256.to_string())
    .bind(kind.to_string())
    .bind(now)
    .bind(now + ttl_s)
    .execute(db.pool())
    .await
    .map_err(q("creating an enrollment token"))?;
    Ok(())
}

/// What a new certificate is recorded with.
pub struct Owner<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    /// The names it holds, reissued alike on renewal.
    pub names: &'a [String],
}

async fn insert_cert(
    conn: &mut sqlx::AnyConnection,
    leaf: &Leaf,
    owner: &Owner<'_>,
    now: i64,
) -> Result<()> {
    let names = serde_json::to_string(owner.names).map_err(|e| Error::Query {
        op: "recording a certificate",
        source: sqlx::Error::Encode(Box::new(e)),
    })?;
    sqlx::query(
        "INSERT INTO issued_certs (serial, cert_sha256, owner_kind, owner_name, names, \
         issued_at, not_after) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(leaf.serial.clone())
    .bind(leaf.der_sha256.clone())
    .bind(owner.kind.to_string())
    .bind(owner.name.to_string())
    .bind(names)
    .bind(now)
    .bind(leaf.not_after)
    .execute(&mut *conn)
    .await
    .map_err(q("recording a certificate"))?;
    Ok(())
}

/// Spends the token and records the certificate in one transaction: a certificate
/// is handed out only if its token was spent, and a spent token stays spent.
pub async fn enroll(
    db: &Db,
    token_sha256: &str,
    leaf: &Leaf,
    owner: &Owner<'_>,
    now: i64,
) -> Result<Result<(), Refusal>> {
    let mut tx = db.begin_write("starting an enrollment").await?;
    let row = sqlx::query(
        "SELECT kind, expires_at, used_at, used_by FROM enrollment_tokens \
         WHERE secret_sha256 = $1",
    )
    .bind(token_sha256.to_string())
    .fetch_optional(&mut *tx)
    .await
    .map_err(q("reading an enrollment token"))?;
    let Some(row) = row else {
        return Ok(Err(Refusal::Unknown));
    };
    let get = |e| q("reading an enrollment token")(e);
    let kind: String = row.try_get("kind").map_err(get)?;
    let expires_at: i64 = row.try_get("expires_at").map_err(get)?;
    let used_at: Option<i64> = row.try_get("used_at").map_err(get)?;
    let used_by: Option<String> = row.try_get("used_by").map_err(get)?;
    if let Some(at) = used_at {
        return Ok(Err(Refusal::Used {
            by: used_by.unwrap_or_default(),
            at,
        }));
    }
    if expires_at <= now {
        return Ok(Err(Refusal::Expired { at: expires_at }));
    }
    if kind != owner.kind {
        return Ok(Err(Refusal::WrongKind { is: kind }));
    }
    let live: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM issued_certs \
         WHERE owner_kind = $1 AND owner_name = $2 AND revoked = 0 AND not_after > $3",
    )
    .bind(owner.kind.to_string())
    .bind(owner.name.to_string())
    .bind(now)
    .fetch_one(&mut *tx)
    .await
    .map_err(q("looking for the name's certificates"))?
    .try_get("n")
    .map_err(q("looking for the name's certificates"))?;
    if live > 0 {
        return Ok(Err(Refusal::Taken {
            kind: owner.kind.to_string(),
            name: owner.name.to_string(),
        }));
    }
    // `used_at IS NULL` again: of two enrollments racing with one token, one wins.
    let spent = sqlx::query(
        "UPDATE enrollment_tokens SET used_at = $2, used_by = $3 \
         WHERE secret_sha256 = $1 AND used_at IS NULL",
    )
    .bind(token_sha256.to_string())
    .bind(now)
    .bind(owner.name.to_string())
    .execute(&mut *tx)
    .await
    .map_err(q("spending an enrollment token"))?;
    if spent.rows_affected() != 1 {
        return Ok(Err(Refusal::Used {
            by: "another enrollment".into(),
            at: now,
        }));
    }
    insert_cert(&mut tx, leaf, owner, now).await?;
    tx.commit().await.map_err(q("committing an enrollment"))?;
    Ok(Ok(()))
}

/// Records a renewed certificate.
pub async fn record_cert(db: &Db, leaf: &Leaf, owner: &Owner<'_>, now: i64) -> Result<()> {
    let mut conn = db
        .pool()
        .acquire()
        .await
        .map_err(q("recording a certificate"))?;
    insert_cert(&mut conn, leaf, owner, now).await
}

/// An issued certificate as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct CertRow {
    pub serial: String,
    pub owner_kind: String,
    pub owner_name: String,
    pub names: Vec<String>,
    pub not_after: i64,
    pub revoked: bool,
}

fn cert_row(r: &AnyRow) -> Result<CertRow> {
    let get = |e| q("reading a certificate")(e);
    let names: String = r.try_get("names").map_err(get)?;
    let revoked: i64 = r.try_get("revoked").map_err(get)?;
    Ok(CertRow {
        serial: r.try_get("serial").map_err(get)?,
        owner_kind: r.try_get("owner_kind").map_err(get)?,
        owner_name: r.try_get("owner_name").map_err(get)?,
        names: serde_json::from_str(&names).map_err(|e| Error::Query {
            op: "reading a certificate's names",
            source: sqlx::Error::Decode(Box::new(e)),
        })?,
        not_after: r.try_get("not_after").map_err(get)?,
        revoked: revoked != 0,
    })
}

/// The certificate whose DER hashes to `sha256`, if the site CA issued it by
/// enrollment or renewal.
pub async fn find_cert(db: &Db, sha256: &str) -> Result<Option<CertRow>> {
    let row = sqlx::query(
        "SELECT serial, owner_kind, owner_name, names, not_after, revoked FROM issued_certs \
         WHERE cert_sha256 = $1",
    )
    .bind(sha256.to_string())
    .fetch_optional(db.pool())
    .await
    .map_err(q("looking up a certificate"))?;
    row.as_ref().map(cert_row).transpose()
}

/// SQL true while owner `kind` named by the parameter `name_param` (`$1`) holds a
/// certificate not revoked. A heartbeat brings a removed owner back only under it:
/// the removal revoked the owner's certificates in its transaction, so only a new
/// enrollment makes it true again.
pub fn live_cert(kind: &'static str, name_param: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM issued_certs c WHERE c.owner_kind = '{kind}' \
         AND c.owner_name = {name_param} AND c.revoked = 0)"
    )
}

/// Revokes every certificate of an owner; how many were not revoked before.
pub async fn revoke_owner(conn: &mut sqlx::AnyConnection, kind: &str, name: &str) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE issued_certs SET revoked = 1 \
         WHERE owner_kind = $1 AND owner_name = $2 AND revoked = 0",
    )
    .bind(kind.to_string())
    .bind(name.to_string())
    .execute(&mut *conn)
    .await
    .map_err(q("revoking certificates"))?;
    Ok(done.rows_affected())
}

/// Up to `limit` serials of revoked certificates that have not expired yet (an
/// expired one is refused by its date alone), in serial order.
pub async fn revoked_serials(db: &Db, now: i64, limit: u32) -> Result<Vec<String>> {
    let rows = sqlx::query(
        "SELECT serial FROM issued_certs WHERE revoked = 1 AND not_after > $1 \
         ORDER BY serial LIMIT $2",
    )
    .bind(now)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(q("listing revoked certificates"))?;
    rows.iter()
        .map(|r| r.try_get("serial").map_err(q("reading a serial")))
        .collect()
}
