//! The `api_tokens` table: names, roles and the SHA-256 of each secret.

use sqlx::Row;

use super::{now_s, q, Db, Result};

/// The name of the token kept in the state directory's `admin.token`.
pub const ADMIN_TOKEN_NAME: &str = "admin";

/// A token as listed: never its secret, which is not stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub name: String,
    pub role: String,
    pub created_at: i64,
}

pub async fn list(db: &Db, after: Option<&str>, limit: u32) -> Result<Vec<TokenRow>> {
    let rows = sqlx::query(
        "SELECT name, role, created_at FROM api_tokens WHERE name > $1 ORDER BY name LIMIT $2",
    )
    .bind(after.unwrap_or("").to_string())
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(q("listing tokens"))?;
    rows.iter()
        .map(|r| {
            Ok(TokenRow {
                name: r.try_get("name").map_err(q("reading a token"))?,
                role: r.try_get("role").map_err(q("reading a token"))?,
                created_at: r.try_get("created_at").map_err(q("reading a token"))?,
            })
        })
        .collect()
}

/// Inserts a token; false when one of that name exists.
pub async fn create(db: &Db, name: &str, role: &str, secret_sha256: &str) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO api_tokens (name, role, secret_sha256, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name.to_string())
    .bind(role.to_string())
    .bind(secret_sha256.to_string())
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("creating a token"))?;
    Ok(done.rows_affected() == 1)
}

/// Registers the state directory's admin token (at each start: a replaced
/// `admin.token` file replaces the old secret).
pub async fn set_admin(db: &Db, secret_sha256: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO api_tokens (name, role, secret_sha256, created_at) \
         VALUES ($1, 'admin', $2, $3) \
         ON CONFLICT (name) DO UPDATE SET role = 'admin', secret_sha256 = $2",
    )
    .bind(ADMIN_TOKEN_NAME.to_string())
    .bind(secret_sha256.to_string())
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("registering the admin token"))?;
    Ok(())
}

/// The (name, role) of the token with this hash.
pub async fn find(db: &Db, secret_sha256: &str) -> Result<Option<(String, String)>> {
    let row = sqlx::query("SELECT name, role FROM api_tokens WHERE secret_sha256 = $1")
        .bind(secret_sha256.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("looking up a token"))?;
    row.map(|r| {
        Ok((
            r.try_get("name").map_err(q("reading a token"))?,
            r.try_get("role").map_err(q("reading a token"))?,
        ))
    })
    .transpose()
}

/// False when there is no token of that name.
pub async fn delete(db: &Db, name: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM api_tokens WHERE name = $1")
        .bind(name.to_string())
        .execute(db.pool())
        .await
        .map_err(q("deleting a token"))?;
    Ok(done.rows_affected() == 1)
}
