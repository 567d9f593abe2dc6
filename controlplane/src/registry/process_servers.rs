//! The `process_servers` table: one row per process server, made by its first
//! heartbeat, with the figures of its last one.

use ferry_link::control::wire::ProcessServerHeartbeat;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{q, Db, Error, Result};
use crate::enroll::store::{live_cert, revoke_owner};

/// A process server as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct PsRow {
    pub name: String,
    pub address: String,
    pub cache_used_bytes: u64,
    pub cache_free_bytes: u64,
    pub ingest_bytes_per_s: f64,
    pub upload_lag_s: f64,
    pub cpu_percent: f64,
    pub reported_health: String,
    pub reported_reasons: Vec<String>,
    pub connected: Vec<String>,
    pub health: String,
    pub registered_at: i64,
    pub last_seen: i64,
    pub removed: bool,
}

const COLUMNS: &str = "name, address, cache_used_bytes, cache_free_bytes, ingest_bytes_per_s, \
                       upload_lag_s, cpu_percent, reported_health, reported_reasons, connected, \
                       health, registered_at, last_seen, removed";

fn json_err(op: &'static str) -> impl FnOnce(serde_json::Error) -> Error {
    move |e| Error::Query {
        op,
        source: sqlx::Error::Decode(Box::new(e)),
    }
}

fn from_row(r: &AnyRow) -> Result<PsRow> {
    let get = |e| q("reading a process server")(e);
    let bytes = |col: &str| -> Result<u64> {
        let v: i64 = r.try_get(col).map_err(get)?;
        Ok(u64::try_from(v).unwrap_or(0))
    };
    let reasons: String = r.try_get("reported_reasons").map_err(get)?;
    let connected: String = r.try_get("connected").map_err(get)?;
    let removed: i64 = r.try_get("removed").map_err(get)?;
    Ok(PsRow {
        name: r.try_get("name").map_err(get)?,
        address: r.try_get("address").map_err(get)?,
        cache_used_bytes: bytes("cache_used_bytes")?,
        cache_free_bytes: bytes("cache_free_bytes")?,
        ingest_bytes_per_s: r.try_get("ingest_bytes_per_s").map_err(get)?,
        upload_lag_s: r.try_get("upload_lag_s").map_err(get)?,
        cpu_percent: r.try_get("cpu_percent").map_err(get)?,
        reported_health: r.try_get("reported_health").map_err(get)?,
        reported_reasons: serde_json::from_str(&reasons)
            .map_err(json_err("reading a process server's reasons"))?,
        connected: serde_json::from_str(&connected)
            .map_err(json_err("reading a process server's machines"))?,
        health: r.try_get("health").map_err(get)?,
        registered_at: r.try_get("registered_at").map_err(get)?,
        last_seen: r.try_get("last_seen").map_err(get)?,
        removed: removed != 0,
    })
}

/// Up to `limit` process servers not removed, in name order, after `after`.
pub async fn list(db: &Db, after: Option<&str>, limit: u32) -> Result<Vec<PsRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM process_servers WHERE removed = 0 AND name > $1 \
         ORDER BY name LIMIT $2"
    );
    let rows = sqlx::query(&sql)
        .bind(after.unwrap_or("").to_string())
        .bind(i64::from(limit))
        .fetch_all(db.pool())
        .await
        .map_err(q("listing process servers"))?;
    rows.iter().map(from_row).collect()
}

/// The process server, removed or not.
pub async fn get(db: &Db, name: &str) -> Result<Option<PsRow>> {
    let sql = format!("SELECT {COLUMNS} FROM process_servers WHERE name = $1");
    let row = sqlx::query(&sql)
        .bind(name.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("reading a process server"))?;
    row.as_ref().map(from_row).transpose()
}

/// Machines (not removed) assigned to each process server, by name.
pub async fn loads(db: &Db) -> Result<std::collections::HashMap<String, i64>> {
    let rows = sqlx::query(
        "SELECT process_server, COUNT(*) AS n FROM machines \
         WHERE removed = 0 AND process_server IS NOT NULL GROUP BY process_server",
    )
    .fetch_all(db.pool())
    .await
    .map_err(q("counting machines per process server"))?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("process_server").map_err(q("reading a count"))?,
                r.try_get("n").map_err(q("reading a count"))?,
            ))
        })
        .collect()
}

/// One event of kind `fencing`, subject `machine NAME`, per disk the heartbeat says
/// its process server was fenced from. The process server sends each until an answer
/// reaches it, so a lost answer repeats an event rather than losing one. How many.
pub async fn record_fencings(db: &Db, hb: &ProcessServerHeartbeat, now: i64) -> Result<usize> {
    for f in &hb.fenced {
        let by = match f.new_writer.as_str() {
            "" => "another writer".to_string(),
            w => format!("process server {w}"),
        };
        let message = format!(
            "process server {} was fenced from disk {} at {}: {by} claimed it (writer \
             epoch {}); {} bytes of its cached writes were dropped, and the agent's \
             journal or a resync refills them",
            hb.name, f.disk, f.time, f.epoch, f.dropped_bytes
        );
        let subject = format!("machine {}", f.machine);
        super::events::add(db, "fencing", &subject, &message, now).await?;
    }
    Ok(hb.fenced.len())
}

/// Registers the process server at its first heartbeat, updates it at the others.
/// True when this heartbeat registered it (or brought back a removed one).
pub async fn heartbeat(db: &Db, hb: &ProcessServerHeartbeat, now: i64) -> Result<bool> {
    let reasons = serde_json::to_string(&hb.health_reasons)
        .map_err(json_err("writing a process server's reasons"))?;
    let connected = serde_json::to_string(&hb.machines)
        .map_err(json_err("writing a process server's machines"))?;
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    // As a machine's (`machines::heartbeat`): registration is what the writes find,
    // and a heartbeat older than the one recorded changes nothing, so that two
    // control planes on one database neither both register it nor lose the newer
    // report.
    let values = |sql| {
        sqlx::query(sql)
            .bind(hb.name.clone())
            .bind(hb.address.clone())
            .bind(clamp(hb.cache_used_bytes))
            .bind(clamp(hb.cache_free_bytes))
            .bind(hb.ingest_bytes_per_s)
            .bind(hb.upload_lag_s)
            .bind(hb.cpu_percent)
            .bind(hb.health.clone())
            .bind(reasons.clone())
            .bind(connected.clone())
            .bind(now)
    };
    let mut tx = db.begin_write("starting a heartbeat").await?;
    let inserted = values(
        "INSERT INTO process_servers (name, address, cache_used_bytes, cache_free_bytes, \
         ingest_bytes_per_s, upload_lag_s, cpu_percent, reported_health, reported_reasons, \
         connected, registered_at, last_seen) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11) \
         ON CONFLICT (name) DO NOTHING",
    )
    .execute(&mut *tx)
    .await
    .map_err(q("recording a heartbeat"))?
    .rows_affected()
        == 1;
    let mut revived = false;
    if !inserted {
        // Back only through a new enrollment, checked in the statement (see
        // `live_cert`): a heartbeat in flight while it was removed stays out.
        let revive = format!(
            "UPDATE process_servers SET removed = 0 WHERE name = $1 AND removed <> 0 AND {}",
            live_cert("process-server", "$1")
        );
        revived = sqlx::query(&revive)
            .bind(hb.name.clone())
            .execute(&mut *tx)
            .await
            .map_err(q("recording a heartbeat"))?
            .rows_affected()
            == 1;
        values(
            "UPDATE process_servers SET address = $2, cache_used_bytes = $3, \
             cache_free_bytes = $4, ingest_bytes_per_s = $5, upload_lag_s = $6, \
             cpu_percent = $7, reported_health = $8, reported_reasons = $9, connected = $10, \
             last_seen = $11 WHERE name = $1 AND last_seen <= $11",
        )
        .execute(&mut *tx)
        .await
        .map_err(q("recording a heartbeat"))?;
    }
    tx.commit().await.map_err(q("committing a heartbeat"))?;
    Ok(inserted || revived)
}

/// Removes a process server: marks it removed, revokes its certificates, and frees
/// its machines to be given another at their next heartbeat; one transaction. False
/// when there was neither a process server nor a certificate to revoke.
pub async fn remove(db: &Db, name: &str) -> Result<bool> {
    let mut tx = db.begin_write("removing a process server").await?;
    let done =
        sqlx::query("UPDATE process_servers SET removed = 1 WHERE name = $1 AND removed = 0")
            .bind(name.to_string())
            .execute(&mut *tx)
            .await
            .map_err(q("removing a process server"))?;
    sqlx::query("UPDATE machines SET process_server = NULL WHERE process_server = $1")
        .bind(name.to_string())
        .execute(&mut *tx)
        .await
        .map_err(q("freeing a process server's machines"))?;
    let revoked = revoke_owner(&mut tx, "process-server", name).await?;
    tx.commit().await.map_err(q("removing a process server"))?;
    Ok(done.rows_affected() == 1 || revoked > 0)
}

/// Writes the health a sweep found, if it is still `was`; true when this call
/// changed it.
pub async fn set_health(db: &Db, name: &str, was: &str, now: &str) -> Result<bool> {
    let done =
        sqlx::query("UPDATE process_servers SET health = $3 WHERE name = $1 AND health = $2")
            .bind(name.to_string())
            .bind(was.to_string())
            .bind(now.to_string())
            .execute(db.pool())
            .await
            .map_err(q("writing a process server's health"))?;
    Ok(done.rows_affected() == 1)
}
