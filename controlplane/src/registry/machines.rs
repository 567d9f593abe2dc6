//! The `machines` table: one row per agent, made by its first heartbeat.

use ferry_link::control::wire::DiskReport;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{q, Db, Error, Result};
use crate::enroll::store::revoke_owner;

/// A machine as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineRow {
    pub name: String,
    pub process_server: Option<String>,
    pub policy: String,
    pub group: Option<String>,
    /// `initial-copy`, `resync`, `protected`, or `no-disks`.
    pub state: String,
    pub disks: Vec<DiskReport>,
    pub last_error: Option<String>,
    pub registered_at: i64,
    pub last_seen: i64,
    /// Unix seconds, fractional: the oldest of its disks' newest uploaded points.
    pub newest_uploaded_at: Option<f64>,
    /// What the last health sweep found.
    pub health: String,
    pub removed: bool,
    /// Where it accepts its group coordinator's cuts, as its last heartbeat said.
    pub group_listen: Option<String>,
}

const COLUMNS: &str = "name, process_server, policy, group_name, state, disks, last_error, \
                       registered_at, last_seen, newest_uploaded_at, health, removed, group_listen";

fn json_err(op: &'static str) -> impl FnOnce(serde_json::Error) -> Error {
    move |e| Error::Query {
        op,
        source: sqlx::Error::Decode(Box::new(e)),
    }
}

fn from_row(r: &AnyRow) -> Result<MachineRow> {
    let get = |e| q("reading a machine")(e);
    let disks: String = r.try_get("disks").map_err(get)?;
    let removed: i64 = r.try_get("removed").map_err(get)?;
    Ok(MachineRow {
        name: r.try_get("name").map_err(get)?,
        process_server: r.try_get("process_server").map_err(get)?,
        policy: r.try_get("policy").map_err(get)?,
        group: r.try_get("group_name").map_err(get)?,
        state: r.try_get("state").map_err(get)?,
        disks: serde_json::from_str(&disks).map_err(json_err("reading a machine's disks"))?,
        last_error: r.try_get("last_error").map_err(get)?,
        registered_at: r.try_get("registered_at").map_err(get)?,
        last_seen: r.try_get("last_seen").map_err(get)?,
        newest_uploaded_at: r.try_get("newest_uploaded_at").map_err(get)?,
        health: r.try_get("health").map_err(get)?,
        removed: removed != 0,
        group_listen: r.try_get("group_listen").map_err(get)?,
    })
}

/// Up to `limit` machines not removed, in name order, after `after`.
pub async fn list(db: &Db, after: Option<&str>, limit: u32) -> Result<Vec<MachineRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM machines WHERE removed = 0 AND name > $1 ORDER BY name LIMIT $2"
    );
    let rows = sqlx::query(&sql)
        .bind(after.unwrap_or("").to_string())
        .bind(i64::from(limit))
        .fetch_all(db.pool())
        .await
        .map_err(q("listing machines"))?;
    rows.iter().map(from_row).collect()
}

/// The machine, removed or not.
pub async fn get(db: &Db, name: &str) -> Result<Option<MachineRow>> {
    let sql = format!("SELECT {COLUMNS} FROM machines WHERE name = $1");
    let row = sqlx::query(&sql)
        .bind(name.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("reading a machine"))?;
    row.as_ref().map(from_row).transpose()
}

/// What an agent's heartbeat changes.
pub struct Beat<'a> {
    pub name: &'a str,
    pub state: &'a str,
    pub disks: &'a [DiskReport],
    pub last_error: Option<&'a str>,
    pub newest_uploaded_at: Option<f64>,
    pub group_listen: Option<&'a str>,
    pub now: i64,
}

/// Registers the machine at its first heartbeat, updates it at the others. True when
/// this heartbeat registered it (or brought back a removed one, which only a new
/// enrollment can: the removed one's certificates are revoked).
pub async fn heartbeat(db: &Db, b: &Beat<'_>) -> Result<bool> {
    Ok(heartbeat_written(db, b).await?.registered)
}

/// `heartbeat`, with the row's assignments as the same transaction left them
/// (committed with other heartbeats: `super::beats`).
pub async fn heartbeat_written(db: &Db, b: &Beat<'_>) -> Result<super::beats::Written> {
    let row = super::beats::BeatRow::new(
        b.name,
        b.state,
        b.disks,
        b.last_error,
        b.newest_uploaded_at,
        b.group_listen,
        b.now,
    )?;
    super::beats::write(db, row).await
}

/// Gives a machine without a process server the least loaded one seen since
/// `seen_since`: fewest machines, ties by name. The name given, or None when there
/// is none to give (or the machine has one already).
pub async fn assign_least_loaded(db: &Db, name: &str, seen_since: i64) -> Result<Option<String>> {
    let pick = sqlx::query(
        "SELECT p.name FROM process_servers p WHERE p.removed = 0 AND p.last_seen >= $1 \
         ORDER BY (SELECT COUNT(*) FROM machines m \
                   WHERE m.process_server = p.name AND m.removed = 0), p.name LIMIT 1",
    )
    .bind(seen_since)
    .fetch_optional(db.pool())
    .await
    .map_err(q("choosing a process server"))?;
    let Some(pick) = pick else {
        return Ok(None);
    };
    let ps: String = pick
        .try_get("name")
        .map_err(q("choosing a process server"))?;
    let done = sqlx::query(
        "UPDATE machines SET process_server = $2 WHERE name = $1 AND process_server IS NULL",
    )
    .bind(name.to_string())
    .bind(ps.clone())
    .execute(db.pool())
    .await
    .map_err(q("assigning a process server"))?;
    Ok((done.rows_affected() == 1).then_some(ps))
}

/// Moves a machine (not removed) to `ps` at `now`, an operator's move; false when
/// there is no such machine. The time starts the rebalancer's rate window, so that
/// it does not undo the move (fleet::rebalance::COOLDOWN_S).
pub async fn set_process_server(db: &Db, name: &str, ps: &str, now: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE machines SET process_server = $2, moved_at = $3 WHERE name = $1 AND removed = 0",
    )
    .bind(name.to_string())
    .bind(ps.to_string())
    .bind(now)
    .execute(db.pool())
    .await
    .map_err(q("moving a machine"))?;
    Ok(done.rows_affected() == 1)
}

/// The rebalancer's move: `name` from `from` to `to` at `now`, only if it is still on
/// `from` and has not moved within `cooldown_s` (an operator's move or another
/// control plane's since the plan was made wins). True when this call moved it.
pub async fn move_if(
    db: &Db,
    name: &str,
    from: &str,
    to: &str,
    now: i64,
    cooldown_s: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE machines SET process_server = $3, moved_at = $4 \
         WHERE name = $1 AND process_server = $2 AND removed = 0 \
           AND (moved_at IS NULL OR moved_at <= $5)",
    )
    .bind(name.to_string())
    .bind(from.to_string())
    .bind(to.to_string())
    .bind(now)
    .bind(now - cooldown_s)
    .execute(db.pool())
    .await
    .map_err(q("moving a machine off its process server"))?;
    Ok(done.rows_affected() == 1)
}

/// Sets the policy and/or the group (`Some(None)` clears it) of a machine not
/// removed; false when there is none.
pub async fn patch(
    db: &Db,
    name: &str,
    policy: Option<&str>,
    group: Option<Option<&str>>,
) -> Result<bool> {
    let mut tx = db.begin_write("changing a machine").await?;
    let mut found = true;
    if let Some(p) = policy {
        let done = sqlx::query("UPDATE machines SET policy = $2 WHERE name = $1 AND removed = 0")
            .bind(name.to_string())
            .bind(p.to_string())
            .execute(&mut *tx)
            .await
            .map_err(q("setting a machine's policy"))?;
        found &= done.rows_affected() == 1;
    }
    if let Some(g) = group {
        let done =
            sqlx::query("UPDATE machines SET group_name = $2 WHERE name = $1 AND removed = 0")
                .bind(name.to_string())
                .bind(g.map(str::to_string))
                .execute(&mut *tx)
                .await
                .map_err(q("setting a machine's group"))?;
        found &= done.rows_affected() == 1;
    }
    tx.commit().await.map_err(q("changing a machine"))?;
    Ok(found)
}

/// Up to `limit` machines (not removed) under policy `policy`, by name.
pub async fn using_policy(db: &Db, policy: &str, limit: u32) -> Result<Vec<String>> {
    let rows = sqlx::query(
        "SELECT name FROM machines WHERE removed = 0 AND policy = $1 ORDER BY name LIMIT $2",
    )
    .bind(policy.to_string())
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(q("listing a policy's machines"))?;
    rows.iter()
        .map(|r| r.try_get("name").map_err(q("reading a machine")))
        .collect()
}

/// Removes a machine: marks it removed and revokes every certificate it was issued,
/// in one transaction. False when there was neither a machine nor a certificate to
/// revoke (an enrolled machine that never sent a heartbeat has only the latter).
pub async fn remove(db: &Db, name: &str) -> Result<bool> {
    let mut tx = db.begin_write("removing a machine").await?;
    let done = sqlx::query(
        "UPDATE machines SET removed = 1, process_server = NULL WHERE name = $1 AND removed = 0",
    )
    .bind(name.to_string())
    .execute(&mut *tx)
    .await
    .map_err(q("removing a machine"))?;
    let revoked = revoke_owner(&mut tx, "agent", name).await?;
    tx.commit().await.map_err(q("removing a machine"))?;
    Ok(done.rows_affected() == 1 || revoked > 0)
}

/// Writes the health a sweep found, if it is still `was`; true when this call changed
/// it (so that only one writer, of several control planes, records the event).
pub async fn set_health(db: &Db, name: &str, was: &str, now: &str) -> Result<bool> {
    let done = sqlx::query("UPDATE machines SET health = $3 WHERE name = $1 AND health = $2")
        .bind(name.to_string())
        .bind(was.to_string())
        .bind(now.to_string())
        .execute(db.pool())
        .await
        .map_err(q("writing a machine's health"))?;
    Ok(done.rows_affected() == 1)
}

/// (group, machine) pairs of the groups after `after`, at most `limit` groups.
pub async fn groups(db: &Db, after: Option<&str>, limit: u32) -> Result<Vec<(String, String)>> {
    let names = sqlx::query(
        "SELECT DISTINCT group_name FROM machines \
         WHERE removed = 0 AND group_name IS NOT NULL AND group_name > $1 \
         ORDER BY group_name LIMIT $2",
    )
    .bind(after.unwrap_or("").to_string())
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(q("listing groups"))?;
    let (Some(first), Some(last)) = (names.first(), names.last()) else {
        return Ok(Vec::new());
    };
    let first: String = first.try_get("group_name").map_err(q("reading a group"))?;
    let last: String = last.try_get("group_name").map_err(q("reading a group"))?;
    let rows = sqlx::query(
        "SELECT group_name, name FROM machines \
         WHERE removed = 0 AND group_name >= $1 AND group_name <= $2 \
         ORDER BY group_name, name",
    )
    .bind(first)
    .bind(last)
    .fetch_all(db.pool())
    .await
    .map_err(q("listing groups"))?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("group_name").map_err(q("reading a group"))?,
                r.try_get("name").map_err(q("reading a group"))?,
            ))
        })
        .collect()
}

/// A member of a group as the coordinator's orders need it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub last_seen: i64,
    pub group_listen: Option<String>,
}

/// The machines (not removed) of group `group`, by name; at most `limit`.
pub async fn members(db: &Db, group: &str, limit: u32) -> Result<Vec<Member>> {
    let rows = sqlx::query(
        "SELECT name, last_seen, group_listen FROM machines \
         WHERE removed = 0 AND group_name = $1 ORDER BY name LIMIT $2",
    )
    .bind(group.to_string())
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(q("listing a group's machines"))?;
    rows.iter()
        .map(|r| {
            let get = |e| q("reading a group's machine")(e);
            Ok(Member {
                name: r.try_get("name").map_err(get)?,
                last_seen: r.try_get("last_seen").map_err(get)?,
                group_listen: r.try_get("group_listen").map_err(get)?,
            })
        })
        .collect()
}
