//! A machine's failover (`machine_recovery`, one row per machine; no row: protected
//! at home) and its start action (`machines.start_action`).
//!
//! Every write is conditional on the state it moves from, so that a task run again
//! after a kill -9 of the control plane writes nothing new, and a task of a stale job
//! cannot undo what a later one did. One active recovery job per machine (the
//! `recovery/MACHINE` job key) keeps two jobs from racing on a row in the first place.

use std::collections::BTreeMap;

use ferry_link::control::wire::FailoverReport;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{now_s, q, Db, Error, Result};

/// `machine_recovery.state` values.
pub const PREPARING: &str = "preparing";
pub const FAILED_OVER: &str = "failed-over";
pub const COMMITTED: &str = "committed";
/// Failback committed: the machine runs at home again; its agent stays read-only
/// until re-enable deletes the row.
pub const FAILED_BACK: &str = "failed-back";

/// A machine's failover as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryRow {
    pub machine: String,
    /// preparing, failed-over, committed.
    pub state: String,
    /// home or recovery.
    pub active_site: String,
    pub planned: bool,
    pub prepare_id: Option<String>,
    /// What the source agent reported of its final point, once it did.
    pub prepared: Option<FailoverReport>,
    /// `{disk: point id}` failed over to.
    pub point: Option<BTreeMap<String, String>>,
    pub host: Option<String>,
    /// The live work items of this failover (disks, start).
    pub items: Vec<String>,
    /// The job that last worked on it.
    pub job_id: Option<String>,
    pub updated_at: i64,
    /// forward, or reverse once reprotected (docs/failback.md).
    pub direction: String,
    /// The recovery host that wrote the home disks (reprotect).
    pub master_target: Option<String>,
    /// `{disk: path on the master target}` (reprotect).
    pub home_disks: BTreeMap<String, String>,
}

/// `machine_recovery.direction` values.
pub const FORWARD: &str = "forward";
pub const REVERSE: &str = "reverse";

const COLUMNS: &str =
    "machine, state, active_site, planned, prepare_id, prepared, point, host, items, job_id, \
     updated_at, direction, master_target, home_disks";

fn decode(what: String) -> Error {
    Error::Query {
        op: "reading a machine's failover",
        source: sqlx::Error::Decode(what.into()),
    }
}

fn json_of<T: serde::de::DeserializeOwned>(
    machine: &str,
    column: &str,
    s: Option<String>,
) -> Result<Option<T>> {
    s.map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|e| decode(format!("machine {machine}: its failover's {column}: {e}")))
}

fn from_row(r: &AnyRow) -> Result<RecoveryRow> {
    let get = |e| q("reading a machine's failover")(e);
    let machine: String = r.try_get("machine").map_err(get)?;
    let items: String = r.try_get("items").map_err(get)?;
    let planned: i64 = r.try_get("planned").map_err(get)?;
    Ok(RecoveryRow {
        state: r.try_get("state").map_err(get)?,
        active_site: r.try_get("active_site").map_err(get)?,
        planned: planned != 0,
        prepare_id: r.try_get("prepare_id").map_err(get)?,
        prepared: json_of(&machine, "prepared", r.try_get("prepared").map_err(get)?)?,
        point: json_of(&machine, "point", r.try_get("point").map_err(get)?)?,
        host: r.try_get("host").map_err(get)?,
        items: json_of(&machine, "items", Some(items))?.unwrap_or_default(),
        job_id: r.try_get("job_id").map_err(get)?,
        updated_at: r.try_get("updated_at").map_err(get)?,
        direction: r.try_get("direction").map_err(get)?,
        master_target: r.try_get("master_target").map_err(get)?,
        home_disks: json_of(
            &machine,
            "home_disks",
            r.try_get("home_disks").map_err(get)?,
        )?
        .unwrap_or_default(),
        machine,
    })
}

pub async fn get(db: &Db, machine: &str) -> Result<Option<RecoveryRow>> {
    let sql = format!("SELECT {COLUMNS} FROM machine_recovery WHERE machine = $1");
    let row = sqlx::query(&sql)
        .bind(machine.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("reading a machine's failover"))?;
    row.as_ref().map(from_row).transpose()
}

/// The failovers of the machines named `first` to `last` (a page of machines).
pub async fn in_range(db: &Db, first: &str, last: &str) -> Result<Vec<RecoveryRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM machine_recovery WHERE machine >= $1 AND machine <= $2 \
         ORDER BY machine"
    );
    let rows = sqlx::query(&sql)
        .bind(first.to_string())
        .bind(last.to_string())
        .fetch_all(db.pool())
        .await
        .map_err(q("listing machines' failovers"))?;
    rows.iter().map(from_row).collect()
}

/// What a failover writes when it begins.
pub struct Begin<'a> {
    pub machine: &'a str,
    pub job_id: &'a str,
    pub host: &'a str,
    /// The final point's id (planned), None for an unplanned failover.
    pub prepare_id: Option<&'a str>,
}

/// Planned failover: the row goes to `preparing` for `job_id` (the source is told to
/// stop writing and take its final point). Takes over a row left `preparing` by an
/// earlier job (failed or cancelled) with a new prepare id; a row of this job stays
/// as it is (its `prepared` kept). The row as it is after; the caller checks it is
/// its own.
pub async fn begin_prepare(db: &Db, b: &Begin<'_>) -> Result<Option<RecoveryRow>> {
    sqlx::query(
        "INSERT INTO machine_recovery (machine, state, active_site, planned, prepare_id, host, \
         items, job_id, updated_at) VALUES ($1, 'preparing', 'home', 1, $2, $3, '[]', $4, $5) \
         ON CONFLICT (machine) DO UPDATE SET planned = 1, prepare_id = $2, prepared = NULL, \
         host = $3, job_id = $4, updated_at = $5 \
         WHERE machine_recovery.state = 'preparing' AND machine_recovery.job_id <> $4",
    )
    .bind(b.machine.to_string())
    .bind(b.prepare_id.map(str::to_string))
    .bind(b.host.to_string())
    .bind(b.job_id.to_string())
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("preparing a machine's failover"))?;
    get(db, b.machine).await
}

/// Unplanned failover: the row goes to `failed-over` at the recovery site for
/// `job_id` at once (from nothing, or from a `preparing` left by an earlier planned
/// failover), so that the source is refused from now on. The row as it is after.
pub async fn fence(
    db: &Db,
    b: &Begin<'_>,
    point: &BTreeMap<String, String>,
) -> Result<Option<RecoveryRow>> {
    let point = serde_json::to_string(point).map_err(|e| decode(e.to_string()))?;
    sqlx::query(
        "INSERT INTO machine_recovery (machine, state, active_site, planned, point, host, \
         items, job_id, updated_at) VALUES ($1, 'failed-over', 'recovery', 0, $2, $3, '[]', $4, \
         $5) ON CONFLICT (machine) DO UPDATE SET state = 'failed-over', \
         active_site = 'recovery', planned = 0, point = $2, host = $3, job_id = $4, \
         updated_at = $5 WHERE machine_recovery.state = 'preparing'",
    )
    .bind(b.machine.to_string())
    .bind(point)
    .bind(b.host.to_string())
    .bind(b.job_id.to_string())
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("fencing a failed-over machine's source"))?;
    get(db, b.machine).await
}

/// Planned failover, once its disks are up: `preparing` of `job_id` goes to
/// `failed-over` at the recovery site. True when the row is failed over by this job
/// (now or before).
pub async fn mark_failed_over(db: &Db, machine: &str, job_id: &str) -> Result<bool> {
    sqlx::query(
        "UPDATE machine_recovery SET state = 'failed-over', active_site = 'recovery', \
         updated_at = $3 WHERE machine = $1 AND job_id = $2 AND state = 'preparing'",
    )
    .bind(machine.to_string())
    .bind(job_id.to_string())
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("marking a machine failed over"))?;
    Ok(get(db, machine)
        .await?
        .is_some_and(|r| r.state == FAILED_OVER && r.job_id.as_deref() == Some(job_id)))
}

/// Adds `item` to the failover's live items and makes `job_id` its job; false when
/// the machine has no failover in `states`.
pub async fn add_item(
    db: &Db,
    machine: &str,
    job_id: &str,
    item: &str,
    states: &[&str],
) -> Result<bool> {
    let Some(row) = get(db, machine).await? else {
        return Ok(false);
    };
    if !states.contains(&row.state.as_str()) {
        return Ok(false);
    }
    let mut items = row.items.clone();
    if !items.iter().any(|i| i == item) {
        items.push(item.to_string());
    }
    set_items(db, &row, job_id, &items).await
}

/// Replaces the live items, if the row is still as read (its `updated_at` and
/// items): a conditional write, not a lost update.
async fn set_items(db: &Db, row: &RecoveryRow, job_id: &str, items: &[String]) -> Result<bool> {
    let old = serde_json::to_string(&row.items).map_err(|e| decode(e.to_string()))?;
    let new = serde_json::to_string(items).map_err(|e| decode(e.to_string()))?;
    let done = sqlx::query(
        "UPDATE machine_recovery SET items = $1, job_id = $2, updated_at = $3 \
         WHERE machine = $4 AND items = $5 AND state = $6",
    )
    .bind(new)
    .bind(job_id.to_string())
    .bind(now_s().max(row.updated_at))
    .bind(row.machine.clone())
    .bind(old)
    .bind(row.state.clone())
    .execute(db.pool())
    .await
    .map_err(q("recording a failover's work items"))?;
    Ok(done.rows_affected() == 1)
}

/// Takes `removed` out of the live items; false when the row changed meanwhile or
/// is gone.
pub async fn drop_items(db: &Db, machine: &str, job_id: &str, removed: &[String]) -> Result<bool> {
    let Some(row) = get(db, machine).await? else {
        return Ok(false);
    };
    let left: Vec<String> = row
        .items
        .iter()
        .filter(|i| !removed.contains(i))
        .cloned()
        .collect();
    set_items(db, &row, job_id, &left).await
}

/// Records the points the machine is failed over to, and the job that brought them
/// up.
pub async fn set_point(
    db: &Db,
    machine: &str,
    job_id: &str,
    point: &BTreeMap<String, String>,
) -> Result<bool> {
    let point = serde_json::to_string(point).map_err(|e| decode(e.to_string()))?;
    let done = sqlx::query(
        "UPDATE machine_recovery SET point = $1, job_id = $2, updated_at = $3 \
         WHERE machine = $4 AND state IN ('preparing', 'failed-over')",
    )
    .bind(point)
    .bind(job_id.to_string())
    .bind(now_s())
    .bind(machine.to_string())
    .execute(db.pool())
    .await
    .map_err(q("recording a failover's point"))?;
    Ok(done.rows_affected() == 1)
}

/// `failed-over` goes to `committed`. True when the machine is committed (now or
/// before).
pub async fn commit(db: &Db, machine: &str, job_id: &str) -> Result<bool> {
    sqlx::query(
        "UPDATE machine_recovery SET state = 'committed', job_id = $2, updated_at = $3 \
         WHERE machine = $1 AND state = 'failed-over'",
    )
    .bind(machine.to_string())
    .bind(job_id.to_string())
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("committing a failover"))?;
    Ok(get(db, machine)
        .await?
        .is_some_and(|r| r.state == COMMITTED))
}

/// Reprotect, once the master target wrote the home disks: a committed failover of
/// `machine` goes `reverse`, recording its master target and home disks. True when
/// it is reverse with these (now or before: a task run again changes nothing).
pub async fn set_reverse(
    db: &Db,
    machine: &str,
    job_id: &str,
    master_target: &str,
    home_disks: &BTreeMap<String, String>,
) -> Result<bool> {
    let disks = serde_json::to_string(home_disks).map_err(|e| decode(e.to_string()))?;
    sqlx::query(
        "UPDATE machine_recovery SET direction = 'reverse', master_target = $2, \
         home_disks = $3, job_id = $4, updated_at = $5 \
         WHERE machine = $1 AND state = 'committed' AND direction = 'forward'",
    )
    .bind(machine.to_string())
    .bind(master_target.to_string())
    .bind(disks)
    .bind(job_id.to_string())
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("recording a machine reprotected"))?;
    Ok(get(db, machine).await?.is_some_and(|r| {
        r.direction == REVERSE
            && r.master_target.as_deref() == Some(master_target)
            && r.home_disks == *home_disks
    }))
}

/// Failback, once the home disks hold the final (or newest) reverse point: the
/// machine is active at home, its row still committed and reverse until the
/// failback's commit. True when it is (now or before).
pub async fn set_active_home(db: &Db, machine: &str, job_id: &str) -> Result<bool> {
    sqlx::query(
        "UPDATE machine_recovery SET active_site = 'home', job_id = $2, updated_at = $3 \
         WHERE machine = $1 AND state = 'committed' AND direction = 'reverse'",
    )
    .bind(machine.to_string())
    .bind(job_id.to_string())
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("marking a machine active at home"))?;
    Ok(get(db, machine)
        .await?
        .is_some_and(|r| r.state == COMMITTED && r.direction == REVERSE && r.active_site == "home"))
}

/// Commit of a failback, once the recovery site's copies are gone: `failed-back`,
/// active at home, forward. True when it is (now or before).
pub async fn mark_failed_back(db: &Db, machine: &str, job_id: &str) -> Result<bool> {
    sqlx::query(
        "UPDATE machine_recovery SET state = 'failed-back', active_site = 'home', \
         direction = 'forward', items = '[]', job_id = $2, updated_at = $3 \
         WHERE machine = $1 AND state = 'committed' AND direction = 'reverse' \
         AND active_site = 'home'",
    )
    .bind(machine.to_string())
    .bind(job_id.to_string())
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("marking a machine failed back"))?;
    Ok(get(db, machine)
        .await?
        .is_some_and(|r| r.state == FAILED_BACK))
}

/// Re-enable: a failed-back machine's row goes, so that its agent's orders carry no
/// failover any more. True when no row is left (a second call finds none); false
/// when the row is in another state.
pub async fn re_enable(db: &Db, machine: &str) -> Result<bool> {
    sqlx::query("DELETE FROM machine_recovery WHERE machine = $1 AND state = 'failed-back'")
        .bind(machine.to_string())
        .execute(db.pool())
        .await
        .map_err(q("re-enabling a machine's protection"))?;
    Ok(get(db, machine).await?.is_none())
}

/// Every home disk of a reprotected machine: (machine, master target, disk, path).
/// A site has few failed-over machines: all of them are read.
pub async fn home_disks(db: &Db) -> Result<Vec<(String, String, String, String)>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM machine_recovery WHERE master_target IS NOT NULL ORDER BY machine"
    );
    let rows = sqlx::query(&sql)
        .fetch_all(db.pool())
        .await
        .map_err(q("reading machines' home disks"))?;
    let mut out = Vec::new();
    for r in rows.iter().map(from_row) {
        let r = r?;
        let host = r.master_target.clone().unwrap_or_default();
        for (disk, path) in r.home_disks {
            out.push((r.machine.clone(), host.clone(), disk, path));
        }
    }
    Ok(out)
}

/// The reprotect jobs active now: id, machine, params.
pub async fn active_reprotects(db: &Db) -> Result<Vec<(String, String, serde_json::Value)>> {
    let op = "reading the active reprotect jobs";
    let rows = sqlx::query(
        "SELECT id, subject, params FROM jobs WHERE kind = $1 AND active_key IS NOT NULL",
    )
    .bind(super::REPROTECT)
    .fetch_all(db.pool())
    .await
    .map_err(q(op))?;
    rows.iter()
        .map(|r| {
            let params: String = r.try_get("params").map_err(q(op))?;
            Ok((
                r.try_get("id").map_err(q(op))?,
                r.try_get("subject").map_err(q(op))?,
                serde_json::from_str(&params).map_err(|e| decode(format!("{op}: {e}")))?,
            ))
        })
        .collect()
}

/// Deletes a failover not committed: the source resumes. True when no row is left
/// that is not committed (a second call finds none).
pub async fn resume_source(db: &Db, machine: &str) -> Result<bool> {
    sqlx::query(
        "DELETE FROM machine_recovery WHERE machine = $1 AND state IN ('preparing', 'failed-over')",
    )
    .bind(machine.to_string())
    .execute(db.pool())
    .await
    .map_err(q("cancelling a failover"))?;
    Ok(get(db, machine).await?.is_none())
}

/// The machine's start action (`actions.start`), None when it has none or is not
/// registered.
pub async fn start_action(db: &Db, machine: &str) -> Result<Option<String>> {
    let row = sqlx::query("SELECT start_action FROM machines WHERE name = $1")
        .bind(machine.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("reading a machine's start action"))?;
    match row {
        None => Ok(None),
        Some(r) => r
            .try_get("start_action")
            .map_err(q("reading a machine's start action")),
    }
}

/// The start actions of the machines named `first` to `last` that have one.
pub async fn start_actions_in_range(
    db: &Db,
    first: &str,
    last: &str,
) -> Result<BTreeMap<String, String>> {
    let rows = sqlx::query(
        "SELECT name, start_action FROM machines WHERE name >= $1 AND name <= $2 \
         AND start_action IS NOT NULL",
    )
    .bind(first.to_string())
    .bind(last.to_string())
    .fetch_all(db.pool())
    .await
    .map_err(q("reading machines' start actions"))?;
    rows.iter()
        .map(|r| {
            let get = |e| q("reading machines' start actions")(e);
            Ok((
                r.try_get("name").map_err(get)?,
                r.try_get("start_action").map_err(get)?,
            ))
        })
        .collect()
}

/// Sets (or with None clears) the start action of a machine not removed; false when
/// there is none.
pub async fn set_start_action(db: &Db, machine: &str, action: Option<&str>) -> Result<bool> {
    let done = sqlx::query("UPDATE machines SET start_action = $1 WHERE name = $2 AND removed = 0")
        .bind(action.map(str::to_string))
        .bind(machine.to_string())
        .execute(db.pool())
        .await
        .map_err(q("setting a machine's start action"))?;
    Ok(done.rows_affected() == 1)
}

/// The job holding the machine's recovery key now (queued, running or waiting):
/// its id, kind and state.
pub async fn active_job(db: &Db, machine: &str) -> Result<Option<(String, String, String)>> {
    let row = sqlx::query("SELECT id, kind, state FROM jobs WHERE active_key = $1")
        .bind(super::job_key(machine))
        .fetch_optional(db.pool())
        .await
        .map_err(q("finding a machine's recovery job"))?;
    row.map(|r| {
        let get = |e| q("finding a machine's recovery job")(e);
        Ok((
            r.try_get("id").map_err(get)?,
            r.try_get("kind").map_err(get)?,
            r.try_get("state").map_err(get)?,
        ))
    })
    .transpose()
}

/// Stores the verdict a test failover was resumed with in its params (the input is
/// cleared once the task that asked for it ends), while `owner` holds the job.
pub async fn record_params(
    db: &Db,
    job_id: &str,
    owner: &str,
    params: &serde_json::Value,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET params = $1 WHERE id = $2 AND lease_owner = $3 AND state = 'running'",
    )
    .bind(params.to_string())
    .bind(job_id.to_string())
    .bind(owner.to_string())
    .execute(db.pool())
    .await
    .map_err(q("recording a job's verdict"))?;
    Ok(done.rows_affected() == 1)
}
