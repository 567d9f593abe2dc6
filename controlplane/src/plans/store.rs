//! The `recovery_plans` table: each plan's spec as JSON, by name.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::spec::Plan;
use crate::db::{now_s, q, Db, Error, Result};

/// A plan as stored, with its times (Unix seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRow {
    pub plan: Plan,
    pub created_at: i64,
    pub updated_at: i64,
}

fn from_row(r: &AnyRow) -> Result<PlanRow> {
    let op = "reading a recovery plan";
    let name: String = r.try_get("name").map_err(q(op))?;
    let spec: String = r.try_get("spec").map_err(q(op))?;
    let plan = serde_json::from_str(&spec).map_err(|e| Error::Query {
        op,
        source: sqlx::Error::Decode(format!("recovery plan {name}: its spec: {e}").into()),
    })?;
    Ok(PlanRow {
        plan,
        created_at: r.try_get("created_at").map_err(q(op))?,
        updated_at: r.try_get("updated_at").map_err(q(op))?,
    })
}

fn spec_json(p: &Plan, op: &'static str) -> Result<String> {
    serde_json::to_string(p).map_err(|e| Error::Query {
        op,
        source: sqlx::Error::Encode(Box::new(e)),
    })
}

/// Up to `limit` plans in name order, after `after` when given.
pub async fn list(db: &Db, after: Option<&str>, limit: u32) -> Result<Vec<PlanRow>> {
    let rows = sqlx::query(
        "SELECT name, spec, created_at, updated_at FROM recovery_plans \
         WHERE name > $1 ORDER BY name LIMIT $2",
    )
    .bind(after.unwrap_or("").to_string())
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(q("listing recovery plans"))?;
    rows.iter().map(from_row).collect()
}

pub async fn get(db: &Db, name: &str) -> Result<Option<PlanRow>> {
    let row = sqlx::query(
        "SELECT name, spec, created_at, updated_at FROM recovery_plans WHERE name = $1",
    )
    .bind(name.to_string())
    .fetch_optional(db.pool())
    .await
    .map_err(q("reading a recovery plan"))?;
    row.as_ref().map(from_row).transpose()
}

/// Inserts a new plan; false when one of that name exists.
pub async fn create(db: &Db, p: &Plan) -> Result<bool> {
    let now = now_s();
    let done = sqlx::query(
        "INSERT INTO recovery_plans (name, spec, created_at, updated_at) \
         VALUES ($1, $2, $3, $3) ON CONFLICT (name) DO NOTHING",
    )
    .bind(p.name.clone())
    .bind(spec_json(p, "creating a recovery plan")?)
    .bind(now)
    .execute(db.pool())
    .await
    .map_err(q("creating a recovery plan"))?;
    Ok(done.rows_affected() == 1)
}

/// Replaces the spec of an existing plan; false when there is none of that name. A
/// job already running keeps the spec it was queued with (its params).
pub async fn replace(db: &Db, p: &Plan) -> Result<bool> {
    let done = sqlx::query("UPDATE recovery_plans SET spec = $2, updated_at = $3 WHERE name = $1")
        .bind(p.name.clone())
        .bind(spec_json(p, "replacing a recovery plan")?)
        .bind(now_s())
        .execute(db.pool())
        .await
        .map_err(q("replacing a recovery plan"))?;
    Ok(done.rows_affected() == 1)
}

/// False when there is no plan of that name.
pub async fn delete(db: &Db, name: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM recovery_plans WHERE name = $1")
        .bind(name.to_string())
        .execute(db.pool())
        .await
        .map_err(q("deleting a recovery plan"))?;
    Ok(done.rows_affected() == 1)
}

/// The job holding active key `key` (queued, running or waiting), if any: its id
/// and kind.
pub async fn active_job(db: &Db, key: &str) -> Result<Option<(String, String)>> {
    let row = sqlx::query("SELECT id, kind FROM jobs WHERE active_key = $1")
        .bind(key.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("finding an active job"))?;
    row.map(|r| {
        Ok((
            r.try_get("id").map_err(q("finding an active job"))?,
            r.try_get("kind").map_err(q("finding an active job"))?,
        ))
    })
    .transpose()
}

/// The newest job of `kind` on machine `machine` queued after job `after` (ids sort
/// by creation), whatever its state: (id).
pub async fn job_after(db: &Db, kind: &str, machine: &str, after: &str) -> Result<Option<String>> {
    let row = sqlx::query(
        "SELECT id FROM jobs WHERE kind = $1 AND subject = $2 AND id > $3 ORDER BY id DESC LIMIT 1",
    )
    .bind(kind.to_string())
    .bind(machine.to_string())
    .bind(after.to_string())
    .fetch_optional(db.pool())
    .await
    .map_err(q("finding a machine's job"))?;
    row.map(|r| r.try_get("id").map_err(q("finding a machine's job")))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::queue;

    /// A plan task killed between queueing a machine's job and recording it finds
    /// that job again, even once it ended: the newest of its kind on the machine
    /// queued after the plan job, none before.
    #[tokio::test]
    async fn the_newest_job_of_a_kind_on_a_machine_after_another_is_found_in_any_state() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
        let q = |kind: &'static str, subject: &'static str| {
            let db = db.clone();
            async move {
                let id =
                    queue::enqueue_keyed(&db, kind, subject, None, &serde_json::json!({}), &[])
                        .await
                        .unwrap()
                        .unwrap();
                // Ids sort by creation in milliseconds.
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                id
            }
        };
        let end = |id: String| {
            let db = db.clone();
            async move {
                sqlx::query("UPDATE jobs SET state = 'succeeded', active_key = NULL WHERE id = $1")
                    .bind(id)
                    .execute(db.pool())
                    .await
                    .unwrap();
            }
        };
        let before = q("commit", "m4").await;
        end(before.clone()).await;
        let plan = q("plan-commit", "pair").await;
        assert_eq!(job_after(&db, "commit", "m4", &plan).await.unwrap(), None);
        let child = q("commit", "m3").await;
        let mine = q("commit", "m4").await;
        end(mine.clone()).await;
        assert_eq!(
            job_after(&db, "commit", "m4", &plan)
                .await
                .unwrap()
                .as_deref(),
            Some(mine.as_str())
        );
        assert_eq!(
            job_after(&db, "commit", "m3", &plan)
                .await
                .unwrap()
                .as_deref(),
            Some(child.as_str())
        );
        assert_eq!(job_after(&db, "failover", "m4", &plan).await.unwrap(), None);
        assert_ne!(before, mine);
    }
}
