//! The `recovery_work` and `recovery_hosts` tables: the work the control plane gives
//! recovery hosts (`wire::WorkItem`), what they report of it, and the hosts
//! themselves. See docs/recovery.md, "Recovery hosts".
//!
//! A job's task submits an item with a deterministic id (`item_id`) and waits for its
//! state: a task run again after a kill -9 of the control plane finds its item
//! instead of submitting a second one, and the host, which works by item id, never
//! does one item twice.

use std::collections::HashMap;

use ferry_link::control::limits::MAX_WORK_ITEMS;
use ferry_link::control::wire::{
    DiskProgress, ReadyDisk, WorkItem, WorkOp, WorkReport, WorkResult,
};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{q, Db, Error, Result};
use crate::enroll::store::live_cert;

/// A recovery host not heard from for this long is not given new work.
pub const HOST_LIVE_S: i64 = 15;

/// An item as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkRow {
    pub id: String,
    pub host: String,
    pub job_id: String,
    pub machine: String,
    pub op: WorkOp,
    /// pending, running, succeeded, failed, removed.
    pub state: String,
    pub progress: f64,
    pub bytes_per_s: f64,
    pub result: Option<WorkResult>,
    pub error: Option<String>,
    /// build, serve: each disk's progress as the host last reported it (checked
    /// against the item's disks).
    pub disks: Vec<DiskProgress>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl WorkRow {
    pub fn is_ended(&self) -> bool {
        matches!(self.state.as_str(), "succeeded" | "failed" | "removed")
    }
}

/// A recovery host as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    pub name: String,
    pub nbd_address: String,
    pub work_dir_free_bytes: u64,
    pub registered_at: i64,
    pub last_seen: i64,
    /// Items given to it and not removed.
    pub items: i64,
    /// Why it last could not reach the store; None while it can.
    pub store_error: Option<String>,
}

impl HostRow {
    /// Why this host cannot do work that reads or writes the store, if it cannot.
    pub fn store_refusal(&self) -> Option<String> {
        self.store_error
            .as_ref()
            .map(|e| format!("recovery host {} cannot reach the store: {e}", self.name))
    }
}

/// The id of the item task `seq` of job `job_id` makes for `machine`.
pub fn item_id(job_id: &str, seq: usize, machine: &str) -> String {
    format!("{job_id}-{seq}-{machine}")
}

const COLUMNS: &str = "id, host, job_id, machine, op, state, progress, bytes_per_s, result, \
                       error, disk_progress, created_at, updated_at";

fn decode(op: &'static str, what: String) -> Error {
    Error::Query {
        op,
        source: sqlx::Error::Decode(what.into()),
    }
}

fn from_row(r: &AnyRow) -> Result<WorkRow> {
    let op_name = "reading a work item";
    let get = |e| q(op_name)(e);
    let id: String = r.try_get("id").map_err(get)?;
    let op: String = r.try_get("op").map_err(get)?;
    let op = serde_json::from_str(&op)
        .map_err(|e| decode(op_name, format!("work item {id}: its op: {e}")))?;
    let result: Option<String> = r.try_get("result").map_err(get)?;
    let result = result
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|e| decode(op_name, format!("work item {id}: its result: {e}")))?;
    let disks: String = r.try_get("disk_progress").map_err(get)?;
    let disks = serde_json::from_str(&disks)
        .map_err(|e| decode(op_name, format!("work item {id}: its disk progress: {e}")))?;
    Ok(WorkRow {
        host: r.try_get("host").map_err(get)?,
        job_id: r.try_get("job_id").map_err(get)?,
        machine: r.try_get("machine").map_err(get)?,
        op,
        state: r.try_get("state").map_err(get)?,
        progress: r.try_get("progress").map_err(get)?,
        bytes_per_s: r.try_get("bytes_per_s").map_err(get)?,
        result,
        error: r.try_get("error").map_err(get)?,
        disks,
        created_at: r.try_get("created_at").map_err(get)?,
        updated_at: r.try_get("updated_at").map_err(get)?,
        id,
    })
}

/// Gives `op` to `host` as item `id`, unless an item `id` exists: then that one, as
/// it is, whatever it holds (the task that made it runs again).
pub async fn submit(
    db: &Db,
    id: &str,
    host: &str,
    job_id: &str,
    machine: &str,
    op: &WorkOp,
    now: i64,
) -> Result<WorkRow> {
    let json =
        serde_json::to_string(op).map_err(|e| decode("submitting a work item", e.to_string()))?;
    let mut tx = db.begin_write("submitting a work item").await?;
    sqlx::query(
        "INSERT INTO recovery_work (id, host, job_id, machine, op_kind, op, state, progress, \
         bytes_per_s, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, 0, $7, $7) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id.to_string())
    .bind(host.to_string())
    .bind(job_id.to_string())
    .bind(machine.to_string())
    .bind(op.kind().to_string())
    .bind(json)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(q("submitting a work item"))?;
    tx.commit().await.map_err(q("submitting a work item"))?;
    get(db, id)
        .await?
        .ok_or_else(|| decode("submitting a work item", format!("work item {id} vanished")))
}

pub async fn get(db: &Db, id: &str) -> Result<Option<WorkRow>> {
    let sql = format!("SELECT {COLUMNS} FROM recovery_work WHERE id = $1");
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("reading a work item"))?;
    row.as_ref().map(from_row).transpose()
}

/// Ids bound in one query of `get_many`: far below SQLite's 32,766 variables and
/// PostgreSQL's 65,535 parameters, whatever a page holds.
const IDS_PER_QUERY: usize = 500;

/// The items of `ids` that exist, a query per `IDS_PER_QUERY` of them (a page of
/// machines' items, not one query an item); in no particular order.
pub async fn get_many(db: &Db, ids: &[String]) -> Result<Vec<WorkRow>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_QUERY) {
        let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT {COLUMNS} FROM recovery_work WHERE id IN ({})",
            marks.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.clone());
        }
        let rows = query
            .fetch_all(db.pool())
            .await
            .map_err(q("reading work items"))?;
        for row in &rows {
            out.push(from_row(row)?);
        }
    }
    Ok(out)
}

/// The items of `ids` that exist, by id (`get_many`).
pub async fn get_by_id(db: &Db, ids: &[String]) -> Result<HashMap<String, WorkRow>> {
    let rows = get_many(db, ids).await?;
    Ok(rows.into_iter().map(|w| (w.id.clone(), w)).collect())
}

/// The items of `ids` that exist, in the order of `ids` (`get_many`).
pub async fn get_in_order(db: &Db, ids: &[String]) -> Result<Vec<WorkRow>> {
    let mut found = get_by_id(db, ids).await?;
    Ok(ids.iter().filter_map(|id| found.remove(id)).collect())
}

/// Every item a job made, oldest first.
pub async fn for_job(db: &Db, job_id: &str) -> Result<Vec<WorkRow>> {
    let sql =
        format!("SELECT {COLUMNS} FROM recovery_work WHERE job_id = $1 ORDER BY created_at, id");
    let rows = sqlx::query(&sql)
        .bind(job_id.to_string())
        .fetch_all(db.pool())
        .await
        .map_err(q("listing a job's work items"))?;
    rows.iter().map(from_row).collect()
}

/// The orders of `host`: its items not removed, oldest first, at most
/// `MAX_WORK_ITEMS`. A script or remove item leaves them once it ended: it made
/// nothing that lasts, and kept there, ended items would fill the orders and hold
/// new ones back. Build, serve and start items stay until removed: what they made
/// lives on the host (a restarted host serves them again).
pub async fn for_host(db: &Db, host: &str) -> Result<Vec<WorkItem>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM recovery_work WHERE host = $1 AND state <> 'removed' \
         AND (state IN ('pending', 'running') OR op_kind IN ('build', 'serve', 'start')) \
         ORDER BY created_at, id LIMIT $2"
    );
    let rows = sqlx::query(&sql)
        .bind(host.to_string())
        .bind(MAX_WORK_ITEMS as i64)
        .fetch_all(db.pool())
        .await
        .map_err(q("listing a recovery host's work"))?;
    rows.iter()
        .map(|r| {
            let w = from_row(r)?;
            Ok(WorkItem {
                id: w.id,
                machine: w.machine,
                op: w.op,
            })
        })
        .collect()
}

/// A figure as stored: finite and not negative (0 otherwise).
fn figure(x: f64) -> f64 {
    if x.is_finite() {
        x.max(0.0)
    } else {
        0.0
    }
}

/// The per-disk progress of a report as kept: only disks the item has, each once, in
/// the host's order (so at most as many as the item has disks), each figure in its
/// range.
fn checked_disks(op: &WorkOp, reported: &[DiskProgress]) -> Vec<DiskProgress> {
    let names: Vec<&str> = match op {
        WorkOp::Build { disks, .. } | WorkOp::Serve { disks } => {
            disks.iter().map(|d| d.disk.as_str()).collect()
        }
        _ => Vec::new(),
    };
    let mut out: Vec<DiskProgress> = Vec::with_capacity(names.len());
    for d in reported {
        if out.len() == names.len() {
            break;
        }
        if !names.contains(&d.disk.as_str()) || out.iter().any(|o| o.disk == d.disk) {
            continue;
        }
        out.push(DiskProgress {
            disk: d.disk.clone(),
            progress: figure(d.progress).min(1.0),
            bytes_per_s: figure(d.bytes_per_s),
            bytes_done: d.bytes_done.min(d.bytes),
            bytes: d.bytes,
        });
    }
    out
}

/// Records what `host` reports of its items. A report about an item of another host,
/// an unknown or a removed one is ignored; an ended item keeps its end (the host
/// re-reports results after a restart, and the first word counts). A running item's
/// result is kept too (failback's reverse and apply items report their newest round
/// while they run), and a report without one keeps the last.
pub async fn record_reports(db: &Db, host: &str, reports: &[WorkReport], now: i64) -> Result<()> {
    let counted = |r: &&WorkReport| matches!(r.state.as_str(), "running" | "succeeded" | "failed");
    // Per-disk figures are checked against the item's own disks, which only its row
    // knows: the rows of the reports that have them, read in one query.
    let with_disks: Vec<String> = reports
        .iter()
        .filter(counted)
        .filter(|r| !r.disks.is_empty())
        .map(|r| r.id.clone())
        .collect();
    let rows = get_by_id(db, &with_disks).await?;
    for r in reports.iter().filter(counted) {
        // An ended item (re-reported at every heartbeat while it is ordered) is not
        // updated below either: its read replaces the update.
        let disks = if r.disks.is_empty() {
            Vec::new()
        } else {
            match rows.get(&r.id) {
                Some(w) if w.host == host && !w.is_ended() => checked_disks(&w.op, &r.disks),
                _ => continue,
            }
        };
        let disks = serde_json::to_string(&disks)
            .map_err(|e| decode("recording a work report", e.to_string()))?;
        let result = r
            .result
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| decode("recording a work report", e.to_string()))?;
        let progress = figure(r.progress).min(1.0);
        let rate = figure(r.bytes_per_s);
        sqlx::query(
            "UPDATE recovery_work SET state = $1, progress = $2, bytes_per_s = $3, \
             result = COALESCE($4, result), error = $5, updated_at = $6, disk_progress = $9 \
             WHERE id = $7 AND host = $8 AND state IN ('pending', 'running')",
        )
        .bind(r.state.clone())
        .bind(progress)
        .bind(rate)
        .bind(result)
        .bind(r.error.clone())
        .bind(now)
        .bind(r.id.clone())
        .bind(host.to_string())
        .bind(disks)
        .execute(db.pool())
        .await
        .map_err(q("recording a work report"))?;
    }
    Ok(())
}

/// Marks items removed (a remove item took them away): they leave their host's
/// orders.
pub async fn mark_removed(db: &Db, ids: &[String], now: i64) -> Result<()> {
    for id in ids {
        sqlx::query("UPDATE recovery_work SET state = 'removed', updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id.clone())
            .execute(db.pool())
            .await
            .map_err(q("marking a work item removed"))?;
    }
    Ok(())
}

/// The disks a job's succeeded build and serve items made (not removed), by machine.
pub async fn ready_disks(db: &Db, job_id: &str) -> Result<Vec<(String, ReadyDisk)>> {
    Ok(for_job(db, job_id)
        .await?
        .into_iter()
        .filter(|w| w.state == "succeeded" && matches!(w.op.kind(), "build" | "serve"))
        .flat_map(|w| {
            let machine = w.machine;
            w.result
                .map(|r| r.disks)
                .unwrap_or_default()
                .into_iter()
                .map(move |d| (machine.clone(), d))
        })
        .collect())
}

/// Registers the host at its first heartbeat, updates it at the others, with what it
/// said of the store (`store_error`, None while it reaches it). True when this
/// heartbeat registered it (or brought back a removed one, which only a new
/// enrollment can).
pub async fn host_heartbeat(
    db: &Db,
    name: &str,
    nbd_address: &str,
    free_bytes: u64,
    now: i64,
    store_error: Option<&str>,
) -> Result<bool> {
    let free = i64::try_from(free_bytes).unwrap_or(i64::MAX);
    let store_error = store_error.map(str::to_string);
    let updated = sqlx::query(
        "UPDATE recovery_hosts SET nbd_address = $1, work_dir_free_bytes = $2, last_seen = $3, \
         store_error = $5 WHERE name = $4 AND removed = 0",
    )
    .bind(nbd_address.to_string())
    .bind(free)
    .bind(now)
    .bind(name.to_string())
    .bind(store_error.clone())
    .execute(db.pool())
    .await
    .map_err(q("recording a recovery host's heartbeat"))?;
    if updated.rows_affected() == 1 {
        return Ok(false);
    }
    // A removed host comes back only through a new enrollment. The check of the
    // certificate is in this statement: a heartbeat that passed the peer check just
    // before the removal committed must not bring the host back.
    let upsert = format!(
        "INSERT INTO recovery_hosts (name, nbd_address, work_dir_free_bytes, registered_at, \
         last_seen, removed, store_error) VALUES ($1, $2, $3, $4, $4, 0, $5) \
         ON CONFLICT (name) DO UPDATE SET nbd_address = $2, work_dir_free_bytes = $3, \
         registered_at = $4, last_seen = $4, removed = 0, store_error = $5 \
         WHERE recovery_hosts.removed = 0 OR {}",
        live_cert("recovery-host", "$1")
    );
    let done = sqlx::query(&upsert)
        .bind(name.to_string())
        .bind(nbd_address.to_string())
        .bind(free)
        .bind(now)
        .bind(store_error)
        .execute(db.pool())
        .await
        .map_err(q("registering a recovery host"))?;
    Ok(done.rows_affected() == 1)
}

/// Every recovery host not removed, by name, with its live items counted.
pub async fn hosts(db: &Db) -> Result<Vec<HostRow>> {
    let rows = sqlx::query(
        "SELECT h.name, h.nbd_address, h.work_dir_free_bytes, h.registered_at, h.last_seen, \
         h.store_error, \
         (SELECT COUNT(*) FROM recovery_work w WHERE w.host = h.name AND w.state <> 'removed') \
         AS items FROM recovery_hosts h WHERE h.removed = 0 ORDER BY h.name",
    )
    .fetch_all(db.pool())
    .await
    .map_err(q("listing recovery hosts"))?;
    rows.iter()
        .map(|r| {
            let get = |e| q("reading a recovery host")(e);
            let free: i64 = r.try_get("work_dir_free_bytes").map_err(get)?;
            Ok(HostRow {
                name: r.try_get("name").map_err(get)?,
                nbd_address: r.try_get("nbd_address").map_err(get)?,
                work_dir_free_bytes: u64::try_from(free).unwrap_or(0),
                registered_at: r.try_get("registered_at").map_err(get)?,
                last_seen: r.try_get("last_seen").map_err(get)?,
                items: r.try_get("items").map_err(get)?,
                store_error: r.try_get("store_error").map_err(get)?,
            })
        })
        .collect()
}

/// The live host (seen within `HOST_LIVE_S`) that reaches the store, with the fewest
/// items not removed, ties by name; None when there is no such host.
pub async fn least_loaded_host(db: &Db, now: i64) -> Result<Option<String>> {
    Ok(hosts(db)
        .await?
        .into_iter()
        .filter(|h| now - h.last_seen <= HOST_LIVE_S && h.store_error.is_none())
        .min_by(|a, b| a.items.cmp(&b.items).then_with(|| a.name.cmp(&b.name)))
        .map(|h| h.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_link::control::wire::DiskPoint;

    fn serve(disk: &str) -> WorkOp {
        WorkOp::Serve {
            disks: vec![DiskPoint {
                disk: disk.into(),
                point: "p1".into(),
            }],
        }
    }

    #[tokio::test]
    async fn a_running_items_result_is_kept_until_a_newer_one() {
        use ferry_link::control::wire::AppliedDisk;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
        let id = item_id("j1", 0, "m1");
        submit(&db, &id, "rh1", "j1", "m1", &serve("sda"), 1)
            .await
            .unwrap();
        let applied = |point: &str| WorkResult {
            applied: vec![AppliedDisk {
                disk: "sda".into(),
                point: point.into(),
                at: 5,
                bytes_written: 1,
                bytes_fetched: 1,
                total_bytes_written: 1,
                verified: None,
            }],
            ..WorkResult::default()
        };
        let running = |result: Option<WorkResult>| WorkReport {
            id: id.clone(),
            state: "running".into(),
            progress: 0.5,
            bytes_per_s: 0.0,
            error: None,
            result,
            disks: Vec::new(),
        };
        let point = |db: Db| {
            let id = id.clone();
            async move {
                let r = get(&db, &id).await.unwrap().unwrap().result.unwrap();
                r.applied[0].point.clone()
            }
        };
        record_reports(&db, "rh1", &[running(Some(applied("r1")))], 2)
            .await
            .unwrap();
        assert_eq!(point(db.clone()).await, "r1");
        record_reports(&db, "rh1", &[running(None)], 3)
            .await
            .unwrap();
        assert_eq!(
            point(db.clone()).await,
            "r1",
            "a report without one keeps it"
        );
        record_reports(&db, "rh1", &[running(Some(applied("r2")))], 4)
            .await
            .unwrap();
        assert_eq!(point(db.clone()).await, "r2");
    }

    #[tokio::test]
    async fn an_item_is_submitted_once_reported_by_its_host_only_and_keeps_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
        assert!(host_heartbeat(&db, "rh1", "127.0.0.1:10809", 5, 100, None)
            .await
            .unwrap());
        assert!(!host_heartbeat(&db, "rh1", "127.0.0.1:10809", 5, 101, None)
            .await
            .unwrap());
        host_heartbeat(&db, "rh2", "127.0.0.1:10810", 5, 101, None)
            .await
            .unwrap();
        let id = item_id("j1", 0, "m1");
        let first = submit(&db, &id, "rh1", "j1", "m1", &serve("sda"), 102)
            .await
            .unwrap();
        // A task run again gets the first item back, not a second with other content.
        let again = submit(&db, &id, "rh2", "j1", "m1", &serve("sdb"), 103)
            .await
            .unwrap();
        assert_eq!(first, again);
        assert_eq!(for_host(&db, "rh1").await.unwrap().len(), 1);
        assert!(for_host(&db, "rh2").await.unwrap().is_empty());
        // rh2 is the least loaded now; not while it cannot reach the store.
        assert_eq!(
            least_loaded_host(&db, 105).await.unwrap().as_deref(),
            Some("rh2")
        );
        host_heartbeat(&db, "rh2", "127.0.0.1:10810", 5, 104, Some("refused"))
            .await
            .unwrap();
        assert_eq!(
            least_loaded_host(&db, 105).await.unwrap().as_deref(),
            Some("rh1")
        );
        host_heartbeat(&db, "rh2", "127.0.0.1:10810", 5, 104, None)
            .await
            .unwrap();
        assert_eq!(
            least_loaded_host(&db, 105).await.unwrap().as_deref(),
            Some("rh2")
        );
        let done = WorkReport {
            id: id.clone(),
            state: "succeeded".into(),
            progress: 1.0,
            bytes_per_s: 0.0,
            error: None,
            result: Some(WorkResult {
                disks: vec![ReadyDisk {
                    disk: "sda".into(),
                    point: "p1".into(),
                    path: None,
                    nbd_url: Some("nbd://127.0.0.1:10809/m1/sda".into()),
                    bytes: 4096,
                }],
                ..WorkResult::default()
            }),
            disks: Vec::new(),
        };
        // Another host's word about it changes nothing.
        record_reports(&db, "rh2", std::slice::from_ref(&done), 106)
            .await
            .unwrap();
        assert_eq!(get(&db, &id).await.unwrap().unwrap().state, "pending");
        record_reports(&db, "rh1", std::slice::from_ref(&done), 107)
            .await
            .unwrap();
        let failed = WorkReport {
            state: "failed".into(),
            error: Some("late".into()),
            result: None,
            ..done.clone()
        };
        record_reports(&db, "rh1", &[failed], 108).await.unwrap();
        let row = get(&db, &id).await.unwrap().unwrap();
        assert_eq!(row.state, "succeeded");
        let ready = ready_disks(&db, "j1").await.unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].0, "m1");
        mark_removed(&db, std::slice::from_ref(&id), 109)
            .await
            .unwrap();
        assert!(for_host(&db, "rh1").await.unwrap().is_empty());
        assert!(ready_disks(&db, "j1").await.unwrap().is_empty());
        // An ended script leaves the orders; a pending one is in them.
        let script = WorkOp::Script {
            command: "true".into(),
            timeout_s: 5,
            env: Default::default(),
        };
        let sid = item_id("j2", 0, "m1");
        submit(&db, &sid, "rh1", "j2", "m1", &script, 110)
            .await
            .unwrap();
        assert_eq!(for_host(&db, "rh1").await.unwrap().len(), 1);
        let ran = WorkReport {
            id: sid.clone(),
            state: "succeeded".into(),
            progress: 1.0,
            bytes_per_s: 0.0,
            error: None,
            result: None,
            disks: Vec::new(),
        };
        record_reports(&db, "rh1", &[ran], 111).await.unwrap();
        assert!(for_host(&db, "rh1").await.unwrap().is_empty());
        // A host not heard from lately gets no new work.
        assert_eq!(least_loaded_host(&db, 200).await.unwrap(), None);
    }

    fn disk(name: &str, progress: f64, bytes_per_s: f64) -> DiskProgress {
        DiskProgress {
            disk: name.into(),
            progress,
            bytes_per_s,
            bytes_done: 50,
            bytes: 100,
        }
    }

    /// A report's per-disk progress is stored and read back, checked against the
    /// item's disks: unknown and repeated disks dropped, figures clamped.
    async fn disk_progress_is_kept_checked(url: &str) {
        let db = Db::open(url).await.unwrap();
        host_heartbeat(&db, "rh1", "127.0.0.1:10809", 5, 100, None)
            .await
            .unwrap();
        let op = WorkOp::Build {
            disks: ["sda", "sdb"]
                .map(|d| DiskPoint {
                    disk: d.into(),
                    point: "p1".into(),
                })
                .to_vec(),
            format: "raw".into(),
        };
        let id = item_id("j1", 0, "m1");
        submit(&db, &id, "rh1", "j1", "m1", &op, 101).await.unwrap();
        assert!(get(&db, &id).await.unwrap().unwrap().disks.is_empty());
        let running = WorkReport {
            id: id.clone(),
            state: "running".into(),
            progress: 0.4,
            bytes_per_s: 10.0,
            error: None,
            result: None,
            disks: vec![
                disk("sda", 1.5, 20.0),
                disk("sdz", 0.5, 1.0),
                disk("sdb", f64::NAN, f64::INFINITY),
                disk("sda", 0.1, 1.0),
            ],
        };
        // Another host's word is not kept.
        record_reports(&db, "rh2", std::slice::from_ref(&running), 102)
            .await
            .unwrap();
        assert!(get(&db, &id).await.unwrap().unwrap().disks.is_empty());
        record_reports(&db, "rh1", std::slice::from_ref(&running), 103)
            .await
            .unwrap();
        let row = for_job(&db, "j1").await.unwrap().remove(0);
        assert_eq!(
            row.disks,
            vec![disk("sda", 1.0, 20.0), disk("sdb", 0.0, 0.0)]
        );
        // A host that sends none (one from before per-disk progress) clears them.
        let plain = WorkReport {
            disks: Vec::new(),
            ..running.clone()
        };
        record_reports(&db, "rh1", &[plain], 104).await.unwrap();
        assert!(get(&db, &id).await.unwrap().unwrap().disks.is_empty());
        // Too many entries for the item: at most its two disks.
        let many = WorkReport {
            disks: (0..300)
                .map(|i| disk(if i % 2 == 0 { "sdb" } else { "sda" }, 0.5, 1.0))
                .collect(),
            ..running
        };
        record_reports(&db, "rh1", std::slice::from_ref(&many), 105)
            .await
            .unwrap();
        let kept = get(&db, &id).await.unwrap().unwrap().disks;
        assert_eq!(kept, vec![disk("sdb", 0.5, 1.0), disk("sda", 0.5, 1.0)]);
        // An ended item keeps the disks of its end, whatever is reported after.
        let done = WorkReport {
            state: "succeeded".into(),
            disks: vec![disk("sda", 1.0, 3.0), disk("sdb", 1.0, 3.0)],
            ..many.clone()
        };
        record_reports(&db, "rh1", std::slice::from_ref(&done), 106)
            .await
            .unwrap();
        let late = WorkReport {
            state: "running".into(),
            disks: vec![disk("sda", 0.1, 1.0)],
            ..done.clone()
        };
        record_reports(&db, "rh1", &[late], 107).await.unwrap();
        assert_eq!(get(&db, &id).await.unwrap().unwrap().disks, done.disks);
    }

    #[tokio::test]
    async fn disk_progress_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        disk_progress_is_kept_checked(&Db::default_url(dir.path())).await;
    }

    /// PostgreSQL when FERRY_TEST_DATABASE names one, as in `db::tests`.
    #[tokio::test]
    async fn disk_progress_on_the_test_database() {
        let Ok(url) = std::env::var("FERRY_TEST_DATABASE") else {
            if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
                panic!("FERRY_TEST_DATABASE is not set but FERRY_TEST_REQUIRE_REMOTE=1");
            }
            eprintln!("FERRY_TEST_DATABASE not set: PostgreSQL not tested");
            return;
        };
        let _only = crate::db::tests::drop_all(&url).await;
        disk_progress_is_kept_checked(&url).await;
    }
}
