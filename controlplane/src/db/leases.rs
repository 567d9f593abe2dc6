//! Named singleton leases (`singleton_leases`): the work that must run on one
//! control plane at a time, of several on one database, is done by the holder of
//! its lease only. A holder renews its lease well before the deadline; once the
//! deadline passes (the holder was killed, stalled or lost the database) any other
//! may take it. Deadlines are in each control plane's wall-clock milliseconds, as the
//! jobs' leases are: the control planes' clocks must agree to well under a lease.

use super::{q, Db, Result};

/// Takes the lease `name` for `owner` until `now_ms + lease_ms`, or renews it if
/// `owner` holds it. True when `owner` holds it now; false while another holds an
/// unexpired one. One statement, so that of two control planes trying at once,
/// exactly one gets it (the row's lock on PostgreSQL, the write lock on SQLite).
pub async fn hold(db: &Db, name: &str, owner: &str, now_ms: i64, lease_ms: i64) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO singleton_leases (name, owner, expires_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET owner = $2, expires_ms = $3 \
         WHERE singleton_leases.owner = $2 OR singleton_leases.expires_ms < $4",
    )
    .bind(name.to_string())
    .bind(owner.to_string())
    .bind(now_ms.saturating_add(lease_ms))
    .bind(now_ms)
    .execute(db.pool())
    .await
    .map_err(q("taking a singleton lease"))?;
    Ok(done.rows_affected() == 1)
}

/// Who holds the lease `name` and until when (Unix ms), expired or not.
pub async fn holder(db: &Db, name: &str) -> Result<Option<(String, i64)>> {
    use sqlx::Row;
    let row = sqlx::query("SELECT owner, expires_ms FROM singleton_leases WHERE name = $1")
        .bind(name.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("reading a singleton lease"))?;
    row.map(|r| {
        Ok((
            r.try_get("owner").map_err(q("reading a singleton lease"))?,
            r.try_get("expires_ms")
                .map_err(q("reading a singleton lease"))?,
        ))
    })
    .transpose()
}
