//! Dashboard sessions: an operator signs in by POSTing an API token (never in a URL)
//! and gets a cookie holding 32 random bytes; the `dashboard_sessions` table keeps
//! only their SHA-256, beside the hash of the token they stand for. A session lasts
//! `SESSION_S` and ends at once when its token is deleted or replaced, since every
//! look-up joins the live token.

use axum::http::header::COOKIE;
use axum::http::HeaderMap;
use rand::RngCore;
use sqlx::Row;

use crate::db::{now_s, q, Db, Result};
use crate::enroll::tokens::hash;

/// The cookie's name.
pub const COOKIE_NAME: &str = "ferry_session";
/// How long a session lasts: a working day.
pub const SESSION_S: i64 = 8 * 3600;
/// Sessions one token may hold at once; signing in again past it ends its oldest.
pub const SESSIONS_PER_TOKEN: i64 = 32;

/// Who a session belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Signed {
    pub token_name: String,
    pub role: String,
}

/// The `Set-Cookie` value for a new session: HttpOnly (no script reads it), Secure
/// (HTTPS only, which is all the control plane serves), SameSite=Strict (no other
/// site's page can make the browser send it, which is the forms' CSRF defence).
pub fn set_cookie(value: &str) -> String {
    format!("{COOKIE_NAME}={value}; Path=/; Max-Age={SESSION_S}; HttpOnly; Secure; SameSite=Strict")
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn clear_cookie() -> String {
    format!("{COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

/// The session cookie's value in a request's `Cookie` headers.
pub fn from_headers(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE_NAME)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

/// Signs in with an API token's secret: the new cookie value and who it is, or None
/// for an unknown token. Expired sessions are deleted on the way, and the token's
/// oldest past `SESSIONS_PER_TOKEN`, so the table stays bounded.
pub async fn sign_in(db: &Db, token_secret: &str) -> Result<Option<(String, Signed)>> {
    let token_sha256 = hash(token_secret);
    let Some((token_name, role)) = crate::db::tokens::find(db, &token_sha256).await? else {
        return Ok(None);
    };
    let now = now_s();
    sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at <= $1")
        .bind(now)
        .execute(db.pool())
        .await
        .map_err(q("deleting expired dashboard sessions"))?;
    let held: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM dashboard_sessions WHERE token_sha256 = $1")
            .bind(token_sha256.clone())
            .fetch_one(db.pool())
            .await
            .and_then(|r| r.try_get("n"))
            .map_err(q("counting a token's dashboard sessions"))?;
    if held >= SESSIONS_PER_TOKEN {
        sqlx::query(
            "DELETE FROM dashboard_sessions WHERE id_sha256 IN \
             (SELECT id_sha256 FROM dashboard_sessions WHERE token_sha256 = $1 \
              ORDER BY created_at, id_sha256 LIMIT $2)",
        )
        .bind(token_sha256.clone())
        .bind(held - SESSIONS_PER_TOKEN + 1)
        .execute(db.pool())
        .await
        .map_err(q("ending a token's oldest dashboard sessions"))?;
    }
    // Strictly after the token's newest session, so that "oldest" is one session,
    // not whichever hash sorts first among several signed in within one second.
    let newest: Option<i64> = sqlx::query(
        "SELECT MAX(created_at) AS newest FROM dashboard_sessions WHERE token_sha256 = $1",
    )
    .bind(token_sha256.clone())
    .fetch_one(db.pool())
    .await
    .and_then(|r| r.try_get("newest"))
    .map_err(q("reading a token's newest dashboard session"))?;
    let created = newest.map_or(now, |n| now.max(n + 1));
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let value = hex::encode(bytes);
    sqlx::query(
        "INSERT INTO dashboard_sessions (id_sha256, token_sha256, created_at, expires_at) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(hash(&value))
    .bind(token_sha256)
    .bind(created)
    .bind(now + SESSION_S)
    .execute(db.pool())
    .await
    .map_err(q("creating a dashboard session"))?;
    Ok(Some((value, Signed { token_name, role })))
}

/// Who the cookie value signs in, if its session is live and its token still there.
pub async fn find(db: &Db, value: &str) -> Result<Option<Signed>> {
    let row = sqlx::query(
        "SELECT t.name, t.role FROM dashboard_sessions s \
         JOIN api_tokens t ON t.secret_sha256 = s.token_sha256 \
         WHERE s.id_sha256 = $1 AND s.expires_at > $2",
    )
    .bind(hash(value))
    .bind(now_s())
    .fetch_optional(db.pool())
    .await
    .map_err(q("looking up a dashboard session"))?;
    row.map(|r| {
        Ok(Signed {
            token_name: r
                .try_get("name")
                .map_err(q("reading a dashboard session"))?,
            role: r
                .try_get("role")
                .map_err(q("reading a dashboard session"))?,
        })
    })
    .transpose()
}

/// Ends the session of this cookie value (signing out).
pub async fn end(db: &Db, value: &str) -> Result<()> {
    sqlx::query("DELETE FROM dashboard_sessions WHERE id_sha256 = $1")
        .bind(hash(value))
        .execute(db.pool())
        .await
        .map_err(q("ending a dashboard session"))?;
    Ok(())
}
