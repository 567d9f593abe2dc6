//! Recovery hosts (`ferry recovery-host`, docs/recovery-hosts.md): their heartbeat
//! (`POST /v1/heartbeat/recovery-host`, mutual TLS), which records what they report of
//! their work items and answers with their orders; the list operators see; and
//! removing one (admin), which revokes its certificates like a process server's.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use ferry_link::control::limits::{
    MAX_POINT_ID_BYTES, MAX_TEXT_BYTES, MAX_WORK_ITEMS, MAX_WORK_OUTPUT_BYTES,
};
use ferry_link::control::wire::{RecoveryHostHeartbeat, RecoveryHostOrders, WorkReport};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::machines::{checked, rfc3339};
use super::peer::Peer;
use super::{AppState, Body, Page, Query};
use crate::db::{self, q, Db};
use crate::enroll::store::revoke_owner;
use crate::recovery::work::{self, HostRow, HOST_LIVE_S};
use crate::registry::events;

/// A recovery host asks for its orders this often: work given to it starts within a
/// second, and its reports (a build's progress) are that fresh.
pub const RECOVERY_HOST_INTERVAL_S: f64 = 1.0;

/// The most things one remove report may list as deleted: a machine's item holds a
/// handful of files per disk, so this is room for many disks within the body limit.
const MAX_DELETED: usize = 256;

/// `wire::RecoveryHostHeartbeat`, as the OpenAPI document shows it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RecoveryHostHeartbeatBody {
    name: String,
    /// HOST:PORT of its NBD listener.
    nbd_address: String,
    work_dir_free_bytes: u64,
    /// Why its last look at the store failed; absent while it reaches it.
    store_error: Option<String>,
    /// `wire::WorkReport`s: `{id, state, progress, bytes_per_s, error?, result?,
    /// disks?}` (`disks`: `{disk, progress, bytes_per_s, bytes_done, bytes}` each).
    reports: Vec<serde_json::Value>,
}

/// A recovery host as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecoveryHost {
    pub name: String,
    /// HOST:PORT of its NBD listener: the `nbd_url`s it serves name it.
    pub nbd_address: String,
    pub work_dir_free_bytes: u64,
    /// RFC 3339.
    pub last_seen: String,
    /// Work items given to it and not removed.
    pub items: i64,
    /// Heard from within the last 15 s: only a live host is given new work.
    pub live: bool,
    /// Why it last could not reach the store (it is then given no new work, nor
    /// made a failback's master target); absent while it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RecoveryHostList {
    pub items: Vec<RecoveryHost>,
    pub next_after: Option<String>,
}

fn view(h: HostRow, now: i64) -> RecoveryHost {
    RecoveryHost {
        live: now - h.last_seen <= HOST_LIVE_S,
        name: h.name,
        nbd_address: h.nbd_address,
        work_dir_free_bytes: h.work_dir_free_bytes,
        last_seen: rfc3339(h.last_seen),
        items: h.items,
        store_error: h.store_error,
    }
}

fn too_long(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{what} is {} bytes; at most {max}", s.len()));
    }
    Ok(())
}

fn check_report(r: &WorkReport) -> Result<(), String> {
    // Item ids are `{job}-{seq}-{machine}`: a point id's bound is ample.
    too_long("a report's id", &r.id, MAX_POINT_ID_BYTES)?;
    if !matches!(r.state.as_str(), "running" | "succeeded" | "failed") {
        return Err(format!(
            "report {}: state {:?} must be running, succeeded or failed",
            r.id, r.state
        ));
    }
    if let Some(e) = &r.error {
        too_long(&format!("report {}: error", r.id), e, MAX_TEXT_BYTES)?;
    }
    if r.disks.len() > crate::registry::MAX_DISKS {
        return Err(format!(
            "report {}: progress of {} disks; at most {}",
            r.id,
            r.disks.len(),
            crate::registry::MAX_DISKS
        ));
    }
    for d in &r.disks {
        ferry_replica::layout::check_name("disk", &d.disk).map_err(|e| e.to_string())?;
    }
    if let Some(res) = &r.result {
        too_long(
            &format!("report {}: output", r.id),
            &res.output,
            MAX_WORK_OUTPUT_BYTES,
        )?;
        if res.deleted.len() > MAX_DELETED {
            return Err(format!(
                "report {}: {} deleted things; at most {MAX_DELETED}",
                r.id,
                res.deleted.len()
            ));
        }
        for d in &res.deleted {
            too_long(
                &format!("report {}: a deleted thing", r.id),
                d,
                MAX_TEXT_BYTES,
            )?;
        }
        if res.synced.len() > MAX_WORK_ITEMS {
            return Err(format!(
                "report {}: {} synced disks; at most {MAX_WORK_ITEMS}",
                r.id,
                res.synced.len()
            ));
        }
        for d in &res.synced {
            ferry_replica::layout::check_name("disk", &d.disk).map_err(|e| e.to_string())?;
        }
        if res.rounds.len() > MAX_WORK_ITEMS || res.applied.len() > MAX_WORK_ITEMS {
            return Err(format!(
                "report {}: {} rounds and {} applied disks; at most {MAX_WORK_ITEMS} each",
                r.id,
                res.rounds.len(),
                res.applied.len()
            ));
        }
        let points = res
            .rounds
            .iter()
            .map(|d| (&d.disk, &d.point))
            .chain(res.applied.iter().map(|d| (&d.disk, &d.point)));
        for (disk, point) in points {
            ferry_replica::layout::check_name("disk", disk).map_err(|e| e.to_string())?;
            too_long("a disk's point", point, MAX_POINT_ID_BYTES)?;
        }
        if res.exchange.len() > MAX_WORK_ITEMS {
            return Err(format!(
                "report {}: {} exchanged disks; at most {MAX_WORK_ITEMS}",
                r.id,
                res.exchange.len()
            ));
        }
        for d in &res.exchange {
            ferry_replica::layout::check_name("disk", &d.disk).map_err(|e| e.to_string())?;
            too_long(
                &format!("report {}: an exchanged map", r.id),
                &d.map,
                MAX_TEXT_BYTES,
            )?;
        }
        for d in &res.disks {
            ferry_replica::layout::check_name("disk", &d.disk).map_err(|e| e.to_string())?;
            too_long("a disk's point", &d.point, MAX_POINT_ID_BYTES)?;
            for s in d.path.iter().chain(&d.nbd_url) {
                too_long(
                    &format!("report {}: a disk's place", r.id),
                    s,
                    MAX_TEXT_BYTES,
                )?;
            }
        }
    }
    Ok(())
}

/// 400 (naming the field) for a heartbeat over the bounds the host trims to.
pub fn check_heartbeat(hb: &RecoveryHostHeartbeat) -> Result<(), String> {
    ferry_replica::layout::check_name("recovery host", &hb.name).map_err(|e| e.to_string())?;
    if crate::enroll::issue::advertise_host(&hb.nbd_address).is_none() {
        return Err(format!("nbd_address {:?} is not HOST:PORT", hb.nbd_address));
    }
    if let Some(e) = &hb.store_error {
        too_long("store_error", e, MAX_TEXT_BYTES)?;
    }
    if hb.reports.len() > MAX_WORK_ITEMS {
        return Err(format!(
            "{} reports in one heartbeat; at most {MAX_WORK_ITEMS}",
            hb.reports.len()
        ));
    }
    hb.reports.iter().try_for_each(check_report)
}

#[utoipa::path(post, path = "/v1/heartbeat/recovery-host", tag = "heartbeats",
    request_body = RecoveryHostHeartbeatBody,
    responses((status = 200, description = "wire::RecoveryHostOrders: its work items"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem)))]
pub async fn heartbeat(
    State(state): State<AppState>,
    peer: Peer,
    Body(hb): Body<RecoveryHostHeartbeat>,
) -> Result<Json<RecoveryHostOrders>, ApiError> {
    peer.require("recovery-host", &hb.name)?;
    check_heartbeat(&hb).map_err(ApiError::BadRequest)?;
    let now = db::now_s();
    let registered = work::host_heartbeat(
        &state.db,
        &hb.name,
        &hb.nbd_address,
        hb.work_dir_free_bytes,
        now,
        hb.store_error.as_deref(),
    )
    .await?;
    if registered {
        let subject = format!("recovery-host {}", hb.name);
        let msg = format!("first heartbeat; it serves NBD at {}", hb.nbd_address);
        events::add(&state.db, "registered", &subject, &msg, now).await?;
    }
    work::record_reports(&state.db, &hb.name, &hb.reports, now).await?;
    Ok(Json(RecoveryHostOrders {
        work: work::for_host(&state.db, &hb.name).await?,
        heartbeat_interval_s: RECOVERY_HOST_INTERVAL_S,
    }))
}

#[utoipa::path(get, path = "/v1/recovery-hosts", tag = "recovery-hosts", params(Page),
    security(("bearer" = [])),
    responses((status = 200, body = RecoveryHostList), (status = 401, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Json<RecoveryHostList>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = page.limit()?;
    let now = db::now_s();
    // A site has a handful of recovery hosts: paged here, after one read of them all.
    let items: Vec<RecoveryHost> = work::hosts(&state.db)
        .await?
        .into_iter()
        .filter(|h| page.after.as_ref().is_none_or(|a| h.name > *a))
        .take(limit as usize)
        .map(|h| view(h, now))
        .collect();
    let next_after = page.next_after(&items, |h| &h.name, limit);
    Ok(Json(RecoveryHostList { items, next_after }))
}

/// Marks the host removed and revokes its certificates, in one transaction; true if
/// there was anything to remove.
async fn remove(db: &Db, name: &str) -> crate::db::Result<bool> {
    let mut tx = db.begin_write("removing a recovery host").await?;
    let done = sqlx::query("UPDATE recovery_hosts SET removed = 1 WHERE name = $1 AND removed = 0")
        .bind(name.to_string())
        .execute(&mut *tx)
        .await
        .map_err(q("removing a recovery host"))?;
    let revoked = revoke_owner(&mut tx, "recovery-host", name).await?;
    tx.commit().await.map_err(q("removing a recovery host"))?;
    Ok(done.rows_affected() == 1 || revoked > 0)
}

#[utoipa::path(delete, path = "/v1/recovery-hosts/{name}", tag = "recovery-hosts",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 404, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    checked("recovery host", &name)?;
    if !remove(&state.db, &name).await? {
        return Err(ApiError::NotFound(format!("no recovery host {name}")));
    }
    let msg = format!(
        "removed by {}; its certificates are revoked: it can no longer heartbeat or get work",
        caller.token
    );
    let subject = format!("recovery-host {name}");
    events::add(&state.db, "removed", &subject, &msg, db::now_s()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_link::control::wire::{ReadyDisk, WorkResult};

    fn beat(reports: Vec<WorkReport>) -> RecoveryHostHeartbeat {
        RecoveryHostHeartbeat {
            name: "rh1".into(),
            nbd_address: "127.0.0.1:10809".into(),
            work_dir_free_bytes: 1 << 30,
            store_error: None,
            reports,
        }
    }

    fn report(id: &str, state: &str) -> WorkReport {
        WorkReport {
            id: id.into(),
            state: state.into(),
            progress: 1.0,
            bytes_per_s: 0.0,
            error: None,
            result: None,
            disks: Vec::new(),
        }
    }

    #[test]
    fn heartbeats_over_the_bounds_are_refused_naming_the_field() {
        assert_eq!(
            check_heartbeat(&beat(vec![report("j-0-m", "succeeded")])),
            Ok(())
        );
        let mut hb = beat(Vec::new());
        hb.nbd_address = "nowhere".into();
        assert!(check_heartbeat(&hb).unwrap_err().contains("nbd_address"));
        let e = check_heartbeat(&beat(vec![report("j-0-m", "pending")])).unwrap_err();
        assert!(e.contains("state \"pending\""), "{e}");
        let many = (0..=MAX_WORK_ITEMS)
            .map(|i| report(&format!("j-{i}-m"), "running"))
            .collect();
        assert!(check_heartbeat(&beat(many))
            .unwrap_err()
            .contains("reports"));
        let mut long = report("j-0-m", "failed");
        long.result = Some(WorkResult {
            output: "x".repeat(MAX_WORK_OUTPUT_BYTES + 1),
            ..WorkResult::default()
        });
        let e = check_heartbeat(&beat(vec![long])).unwrap_err();
        assert!(e.contains("report j-0-m: output"), "{e}");
        let mut bad_disk = report("j-0-m", "succeeded");
        bad_disk.result = Some(WorkResult {
            disks: vec![ReadyDisk {
                disk: "../etc".into(),
                point: "p1".into(),
                path: None,
                nbd_url: None,
                bytes: 1,
            }],
            ..WorkResult::default()
        });
        assert!(check_heartbeat(&beat(vec![bad_disk])).is_err());
        // A sync step's exchange: disk names checked, object names bounded.
        let exchanged = |disk: &str, map: String| {
            let mut r = report("j-0-m-point-diff", "succeeded");
            r.result = Some(WorkResult {
                exchange: vec![ferry_link::control::wire::ExchangeDisk {
                    disk: disk.into(),
                    map,
                    segments: 3,
                    blocks: 16,
                    blocks_differing: 2,
                    bytes_fetched: 1,
                    bytes_stored: 1,
                }],
                ..WorkResult::default()
            });
            check_heartbeat(&beat(vec![r]))
        };
        assert_eq!(exchanged("sda", "m".into()), Ok(()));
        assert!(exchanged("../sda", "m".into()).is_err());
        let e = exchanged("sda", "m".repeat(MAX_TEXT_BYTES + 1)).unwrap_err();
        assert!(e.contains("an exchanged map"), "{e}");
        let progress = |name: &str| ferry_link::control::wire::DiskProgress {
            disk: name.into(),
            progress: 0.5,
            bytes_per_s: 1.0,
            bytes_done: 1,
            bytes: 2,
        };
        let mut per_disk = report("j-0-m", "running");
        per_disk.disks = vec![progress("sda")];
        assert_eq!(check_heartbeat(&beat(vec![per_disk.clone()])), Ok(()));
        per_disk.disks = vec![progress("../sda")];
        assert!(check_heartbeat(&beat(vec![per_disk.clone()])).is_err());
        per_disk.disks = (0..=crate::registry::MAX_DISKS)
            .map(|i| progress(&format!("d{i}")))
            .collect();
        let e = check_heartbeat(&beat(vec![per_disk])).unwrap_err();
        assert!(e.contains("disks"), "{e}");
        let mut hb = beat(Vec::new());
        hb.name = "no/slash".into();
        assert!(check_heartbeat(&hb).is_err());
        let mut hb = beat(Vec::new());
        hb.store_error = Some("refused".into());
        assert_eq!(check_heartbeat(&hb), Ok(()));
        hb.store_error = Some("e".repeat(MAX_TEXT_BYTES + 1));
        assert!(check_heartbeat(&hb).unwrap_err().contains("store_error"));
    }

    #[test]
    fn reverse_rounds_and_applied_points_are_bounded() {
        use ferry_link::control::wire::{AppliedDisk, RoundDisk};
        let round = |disk: &str, point: &str| RoundDisk {
            disk: disk.into(),
            point: point.into(),
            at: 1,
            bytes_data: 1,
            bytes_sent: 1,
            total_bytes_sent: 1,
        };
        let with = |rounds: Vec<RoundDisk>, applied: Vec<AppliedDisk>| {
            let mut r = report("j-0-m", "running");
            r.result = Some(WorkResult {
                rounds,
                applied,
                ..WorkResult::default()
            });
            beat(vec![r])
        };
        assert_eq!(
            check_heartbeat(&with(vec![round("sda", "r1")], vec![])),
            Ok(())
        );
        assert!(check_heartbeat(&with(vec![round("../sda", "r1")], vec![])).is_err());
        let long = "p".repeat(MAX_POINT_ID_BYTES + 1);
        let e = check_heartbeat(&with(vec![round("sda", &long)], vec![])).unwrap_err();
        assert!(e.contains("point"), "{e}");
        let applied = AppliedDisk {
            disk: "sda".into(),
            point: "r1".into(),
            at: 1,
            bytes_written: 1,
            bytes_fetched: 1,
            total_bytes_written: 1,
            verified: None,
        };
        let many = vec![applied; MAX_WORK_ITEMS + 1];
        let e = check_heartbeat(&with(vec![], many)).unwrap_err();
        assert!(e.contains("applied"), "{e}");
    }

    /// A heartbeat that passed the peer check just before the host was removed (its
    /// certificate revoked in the same transaction) does not bring it back; one after
    /// a new enrollment does.
    #[tokio::test]
    async fn a_removed_host_comes_back_only_with_a_new_certificate() {
        use crate::enroll::issue::Leaf;
        use crate::enroll::store::{record_cert, Owner};
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
        let owner = Owner {
            kind: "recovery-host",
            name: "rh1",
            names: &[],
        };
        let cert = |serial: &str| Leaf {
            pem: String::new(),
            der_sha256: format!("sha-{serial}"),
            serial: serial.into(),
            not_after: 2_000_000_000,
        };
        let listed = |db: Db| async move {
            let hosts = work::hosts(&db).await.unwrap();
            hosts.iter().any(|h| h.name == "rh1")
        };
        let beat = |db: Db, now: i64| async move {
            work::host_heartbeat(&db, "rh1", "127.0.0.1:10809", 1, now, None)
                .await
                .unwrap()
        };
        record_cert(&db, &cert("1"), &owner, 100).await.unwrap();
        assert!(beat(db.clone(), 100).await, "registered");
        assert!(remove(&db, "rh1").await.unwrap());
        assert!(!beat(db.clone(), 101).await);
        assert!(!listed(db.clone()).await, "the old certificate's beat");
        record_cert(&db, &cert("2"), &owner, 102).await.unwrap();
        assert!(beat(db.clone(), 103).await, "back after a new enrollment");
        assert!(listed(db.clone()).await);
    }
}
