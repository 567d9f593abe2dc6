//! The `policies` table.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{now_s, q, Db, Result};
use crate::policy::Policy;

const COLUMNS: &str = "name, crash_point_interval_s, app_point_interval_s, retention_hours, \
                       rpo_warning_s, rpo_critical_s";

fn from_row(row: &AnyRow) -> Result<Policy> {
    let int = |col: &str| -> Result<u32> {
        let v: i64 = row.try_get(col).map_err(q("reading a policy"))?;
        // Written only from checked u32 values; anything else is a damaged row.
        u32::try_from(v).map_err(|_| super::Error::Query {
            op: "reading a policy",
            source: sqlx::Error::Decode(format!("{col} {v} out of range").into()),
        })
    };
    Ok(Policy {
        name: row.try_get("name").map_err(q("reading a policy"))?,
        crash_point_interval_s: row
            .try_get("crash_point_interval_s")
            .map_err(q("reading a policy"))?,
        app_point_interval_s: int("app_point_interval_s")?,
        retention_hours: int("retention_hours")?,
        rpo_warning_s: int("rpo_warning_s")?,
        rpo_critical_s: int("rpo_critical_s")?,
    })
}

/// Up to `limit` policies in name order, after `after` when given.
pub async fn list(db: &Db, after: Option<&str>, limit: u32) -> Result<Vec<Policy>> {
    let sql = format!("SELECT {COLUMNS} FROM policies WHERE name > $1 ORDER BY name LIMIT $2");
    let rows = sqlx::query(&sql)
        .bind(after.unwrap_or("").to_string())
        .bind(i64::from(limit))
        .fetch_all(db.pool())
        .await
        .map_err(q("listing policies"))?;
    rows.iter().map(from_row).collect()
}

pub async fn get(db: &Db, name: &str) -> Result<Option<Policy>> {
    let sql = format!("SELECT {COLUMNS} FROM policies WHERE name = $1");
    let row = sqlx::query(&sql)
        .bind(name.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("reading a policy"))?;
    row.as_ref().map(from_row).transpose()
}

/// Inserts a new policy; false when one of that name exists.
pub async fn create(db: &Db, p: &Policy) -> Result<bool> {
    let now = now_s();
    let done = sqlx::query(
        "INSERT INTO policies (name, crash_point_interval_s, app_point_interval_s, \
         retention_hours, rpo_warning_s, rpo_critical_s, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (name) DO NOTHING",
    )
    .bind(p.name.clone())
    .bind(p.crash_point_interval_s)
    .bind(i64::from(p.app_point_interval_s))
    .bind(i64::from(p.retention_hours))
    .bind(i64::from(p.rpo_warning_s))
    .bind(i64::from(p.rpo_critical_s))
    .bind(now)
    .bind(now)
    .execute(db.pool())
    .await
    .map_err(q("creating a policy"))?;
    Ok(done.rows_affected() == 1)
}

/// Writes every field of an existing policy; false when there is none of that name.
pub async fn update(db: &Db, p: &Policy) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE policies SET crash_point_interval_s = $2, app_point_interval_s = $3, \
         retention_hours = $4, rpo_warning_s = $5, rpo_critical_s = $6, updated_at = $7 \
         WHERE name = $1",
    )
    .bind(p.name.clone())
    .bind(p.crash_point_interval_s)
    .bind(i64::from(p.app_point_interval_s))
    .bind(i64::from(p.retention_hours))
    .bind(i64::from(p.rpo_warning_s))
    .bind(i64::from(p.rpo_critical_s))
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("updating a policy"))?;
    Ok(done.rows_affected() == 1)
}

/// False when there is no policy of that name.
pub async fn delete(db: &Db, name: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM policies WHERE name = $1")
        .bind(name.to_string())
        .execute(db.pool())
        .await
        .map_err(q("deleting a policy"))?;
    Ok(done.rows_affected() == 1)
}
