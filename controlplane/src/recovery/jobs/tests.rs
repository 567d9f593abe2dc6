//! The machine jobs end to end inside one process: the API over HTTP, the real job
//! runner, a real local store holding real points, and an in-process task that
//! plays the recovery host through `work::record_reports` (and, for a planned
//! failover, the source agent through `machine_recovery.prepared`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_link::control::wire::{ReadyDisk, WorkItem, WorkOp, WorkReport, WorkResult};
use ferry_replica::object::SealContext;
use ferry_replica::writer::{append_writes, Payload, Write};
use ferry_replica::{Disk, Point, PointKind, Store, VaultKey};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::db::Db;
use crate::jobs::runner::{self, Context, RunnerConfig, StoreAccess};
use crate::jobs::singleton::{Singleton, SCHEDULER};
use crate::jobs::{queue, Job, JobState, TaskState};
use crate::recovery::work;

use super::state;

const SIZE: u64 = 1 << 20;
const HOST: &str = "rh1";
const NBD: &str = "127.0.0.1:10809";

/// Writes one point `id` on `machine/disk` (a block of `fill` bytes at `seq`'s
/// offset), as a process server's upload would.
fn write_point(store: &Store, vault: &VaultKey, machine: &str, disk: &str, id: &str, seq: u64) {
    let d = store
        .block(Disk::open_or_create(
            store,
            machine,
            disk,
            vault,
            4096,
            256 << 10,
        ))
        .unwrap();
    let mut st = store.block(d.load_state()).unwrap();
    let data = vec![seq as u8 + 1; 4096];
    let writes = [Write {
        seq,
        offset: 4096 * seq,
        payload: Payload::Data(&data),
    }];
    let p = Point {
        id: id.to_string(),
        kind: PointKind::Crash,
        time: chrono::Utc::now(),
        seq,
        disk_bytes: SIZE,
        label: None,
        group: Some("g1".into()),
        sums: None,
    };
    store
        .block(append_writes(
            &d,
            &mut st,
            &mut SealContext::default(),
            &writes,
            vec![p],
            seq + 1,
            ferry_replica::grace::ORPHAN_GRACE,
        ))
        .unwrap();
}

/// How the fake recovery host answers.
#[derive(Default)]
struct HostPlay {
    /// Items seen, in order.
    seen: Mutex<Vec<WorkItem>>,
    /// Keep every item running (a host busy building).
    hold: AtomicBool,
    /// Fail remove items, naming what is left.
    fail_removes: AtomicBool,
    /// Stop heartbeating.
    silent: AtomicBool,
}

async fn play_host(db: Db, play: Arc<HostPlay>) {
    let mut reported: BTreeMap<String, ()> = BTreeMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(30)).await;
        if play.silent.load(Ordering::SeqCst) {
            continue;
        }
        let now = crate::db::now_s();
        work::host_heartbeat(&db, HOST, NBD, 1 << 40, now)
            .await
            .unwrap();
        let orders = work::for_host(&db, HOST).await.unwrap();
        let mut reports = Vec::new();
        for item in orders {
            if reported.contains_key(&item.id) {
                continue;
            }
            play.seen.lock().unwrap().push(item.clone());
            if play.hold.load(Ordering::SeqCst) {
                reports.push(WorkReport {
                    id: item.id.clone(),
                    state: "running".into(),
                    progress: 0.5,
                    bytes_per_s: 1e6,
                    error: None,
                    result: None,
                });
                play.seen.lock().unwrap().pop();
                continue;
            }
            let ready = |disks: &[ferry_link::control::wire::DiskPoint], file: bool| {
                disks
                    .iter()
                    .map(|d| ReadyDisk {
                        disk: d.disk.clone(),
                        point: d.point.clone(),
                        path: file.then(|| format!("/w/items/{}/{}.raw", item.id, d.disk)),
                        nbd_url: (!file)
                            .then(|| format!("nbd://{NBD}/{}/{}", item.machine, d.disk)),
                        bytes: SIZE,
                    })
                    .collect()
            };
            let (state, error, result) = match &item.op {
                WorkOp::Build { disks, .. } => (
                    "succeeded",
                    None,
                    WorkResult {
                        disks: ready(disks, true),
                        ..WorkResult::default()
                    },
                ),
                WorkOp::Serve { disks } => (
                    "succeeded",
                    None,
                    WorkResult {
                        disks: ready(disks, false),
                        ..WorkResult::default()
                    },
                ),
                WorkOp::Start { .. } => (
                    "succeeded",
                    None,
                    WorkResult {
                        pid: Some(4242),
                        ..WorkResult::default()
                    },
                ),
                WorkOp::Remove { items } if play.fail_removes.load(Ordering::SeqCst) => (
                    "failed",
                    Some(format!("left: file /w/items/{}/sda.raw", items[0])),
                    WorkResult::default(),
                ),
                WorkOp::Remove { items } => (
                    "succeeded",
                    None,
                    WorkResult {
                        deleted: items.iter().map(|i| format!("file /w/items/{i}")).collect(),
                        ..WorkResult::default()
                    },
                ),
                WorkOp::Script { .. } => (
                    "failed",
                    Some("no scripts here".into()),
                    WorkResult::default(),
                ),
            };
            reported.insert(item.id.clone(), ());
            reports.push(WorkReport {
                id: item.id.clone(),
                state: state.into(),
                progress: 1.0,
                bytes_per_s: 0.0,
                error,
                result: Some(result),
            });
        }
        work::record_reports(&db, HOST, &reports, now)
            .await
            .unwrap();
    }
}

struct Site {
    _dir: tempfile::TempDir,
    db: Db,
    ctx: Context,
    access: Arc<StoreAccess>,
    url: String,
    http: reqwest::Client,
    token: String,
    play: Arc<HostPlay>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Site {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn runner_cfg(owner: &str, lease: Duration) -> RunnerConfig {
    RunnerConfig {
        owner: owner.into(),
        lease,
        poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    }
}

/// A site on `url` (None: a new SQLite) with machine m1 (disks sda, sdb, at point
/// P1 then P2) registered in group g1, a live host, and a runner unless `runner`
/// is false.
async fn site(url: Option<&str>, with_store: bool, runner: bool) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let url = url.map_or_else(|| Db::default_url(dir.path()), str::to_string);
    let db = Db::open(&url).await.unwrap();
    let store = Store::open(&format!("file://{}/store", dir.path().display())).unwrap();
    let vault = VaultKey::generate();
    for (seq, id) in ["P1", "P2"].iter().enumerate() {
        for disk in ["sda", "sdb"] {
            write_point(&store, &vault, "m1", disk, &point_id(id), seq as u64);
        }
    }
    let access = Arc::new(StoreAccess { store, vault });
    let ctx = Context {
        db: db.clone(),
        store: with_store.then(|| access.clone()),
        wake: Arc::new(Notify::new()),
    };
    crate::registry::machines::heartbeat(
        &db,
        &crate::registry::machines::Beat {
            name: "m1",
            state: "protected",
            disks: &[],
            last_error: None,
            newest_uploaded_at: None,
            group_listen: None,
            now: crate::db::now_s(),
        },
    )
    .await
    .unwrap();
    crate::registry::machines::patch(&db, "m1", None, Some(Some("g1")))
        .await
        .unwrap();
    let ca = crate::enroll::ca::SiteCa::open_or_create(dir.path()).unwrap();
    let app = crate::api::router(db.clone(), Arc::new(ca), ctx.clone()).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_url = format!("http://{}", l.local_addr().unwrap());
    let mut tasks = vec![tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    })];
    let secret = crate::enroll::tokens::new_secret();
    crate::db::tokens::create(&db, "op", "admin", &crate::enroll::tokens::hash(&secret))
        .await
        .unwrap();
    let play = Arc::new(HostPlay::default());
    tasks.push(tokio::spawn(play_host(db.clone(), play.clone())));
    if runner {
        tasks.push(start_runner(&ctx, "cp-a", Duration::from_secs(30)).await);
    }
    // The host is live before any POST.
    wait_for("the host's first heartbeat", || async {
        !work::hosts(&db).await.unwrap().is_empty()
    })
    .await;
    Site {
        _dir: dir,
        db,
        ctx,
        access,
        url: http_url,
        http: crate::webhooks::deliver::http_client(Duration::from_secs(10)).unwrap(),
        token: secret,
        play,
        tasks,
    }
}

async fn start_runner(ctx: &Context, owner: &str, lease: Duration) -> tokio::task::JoinHandle<()> {
    let cfg = runner_cfg(owner, lease);
    let scheduler = Singleton::start(ctx.db.clone(), SCHEDULER, &cfg.owner, cfg.lease).await;
    tokio::spawn(runner::run(ctx.clone(), cfg, scheduler))
}

/// Point ids as agents make them (they sort by time).
fn point_id(name: &str) -> String {
    format!("20260101T00000{}.000Z-{name}", &name[1..])
}

async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Site {
    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(m, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// POSTs and expects `status`; the body.
    async fn post(&self, path: &str, body: Value, status: u16) -> Value {
        // Null: no body at all.
        let (s, v) = self
            .send("POST", path, (!body.is_null()).then_some(body))
            .await;
        assert_eq!(s, status, "POST {path}: {v}");
        v
    }

    /// The detail of a refusal.
    async fn refused(&self, path: &str, body: Value, status: u16, says: &str) {
        let v = self.post(path, body, status).await;
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(says),
            "POST {path}: {detail:?} lacks {says:?}"
        );
    }

    async fn job(&self, id: &str) -> Job {
        queue::get(&self.db, id).await.unwrap().unwrap()
    }

    async fn until(&self, id: &str, state: JobState) -> Job {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let job = self.job(id).await;
            if job.state == state {
                return job;
            }
            assert!(
                !job.state.is_ended() && std::time::Instant::now() < deadline,
                "job {id} is {:?}, not {state:?}: {job:#?}",
                job.state
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until task `name` of job `id` runs.
    async fn at_task(&self, id: &str, name: &str) {
        wait_for(&format!("task {name}"), || async {
            let job = self.job(id).await;
            job.tasks
                .iter()
                .any(|t| t.name == name && t.state == TaskState::Running)
        })
        .await;
    }

    async fn live_items(&self, job: &str) -> Vec<work::WorkRow> {
        work::for_job(&self.db, job)
            .await
            .unwrap()
            .into_iter()
            .filter(|w| w.state != "removed")
            .collect()
    }
}

fn names(job: &Job) -> Vec<&str> {
    job.tasks.iter().map(|t| t.name.as_str()).collect()
}

async fn test_failover_to_the_verdict(s: &Site) {
    // A template that cannot expand is refused at PATCH; one that can is shown.
    let (st, v) = s
        .send(
            "PATCH",
            "/v1/machines/m1",
            Some(json!({"actions": {"start": "boot {nbd}"}})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("{nbd}"), "{v}");
    let (st, v) = s
        .send(
            "PATCH",
            "/v1/machines/m1",
            Some(json!({"actions": {"start": "qemu -drive {nbd_url:sdb} -name {machine}"}})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["actions"]["start"],
        "qemu -drive {nbd_url:sdb} -name {machine}"
    );
    assert_eq!(v["recovery"], Value::Null);

    let job = s
        .post(
            "/v1/machines/m1/test-failover",
            json!({"point": point_id("P1"), "target": {"kind": "nbd"}}),
            202,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["kind"], "test-failover");
    assert_eq!(job["params"]["host"], HOST);
    // One recovery job per machine at a time.
    s.refused(
        "/v1/machines/m1/failover",
        json!({"planned": false, "target": {"kind": "nbd"}}),
        409,
        &format!("test-failover job {id}"),
    )
    .await;
    let job = s.until(&id, JobState::WaitingForInput).await;
    assert_eq!(
        names(&job),
        [
            "bring up disks",
            "start machine",
            "wait for cleanup",
            "clean up",
            "record verdict"
        ]
    );
    assert!(
        job.prompt
            .as_deref()
            .unwrap()
            .contains("test-failover-cleanup"),
        "{job:?}"
    );
    let (_, v) = s.send("GET", &format!("/v1/jobs/{id}"), None).await;
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{v}");
    assert_eq!(disks[0]["nbd_url"], format!("nbd://{NBD}/m1/sda"));
    assert_eq!(disks[0]["point"], point_id("P1"));
    assert_eq!(v["work"].as_array().unwrap().len(), 2, "{v}");
    let start = s
        .play
        .seen
        .lock()
        .unwrap()
        .iter()
        .find_map(|i| match &i.op {
            WorkOp::Start { command, env } => Some((command.clone(), env.clone())),
            _ => None,
        });
    let (command, env) = start.expect("a start item");
    assert_eq!(command, format!("qemu -drive nbd://{NBD}/m1/sdb -name m1"));
    assert_eq!(env["FERRY_POINT"], point_id("P1"));

    // Cancelling would leak what it made; a bad verdict is a 400.
    let (st, v) = s.send("POST", &format!("/v1/jobs/{id}/cancel"), None).await;
    assert_eq!(st, 409, "{v}");
    assert!(v["detail"]
        .as_str()
        .unwrap()
        .contains("test-failover-cleanup"));
    s.refused(
        "/v1/machines/m1/test-failover-cleanup",
        json!({"verdict": "fine"}),
        400,
        "passed or failed",
    )
    .await;
    let (st, _) = s
        .send(
            "POST",
            &format!("/v1/jobs/{id}/resume"),
            Some(json!({"nope": 1})),
        )
        .await;
    assert_eq!(st, 400);
    s.post(
        "/v1/machines/m1/test-failover-cleanup",
        json!({"verdict": "passed", "notes": "booted"}),
        200,
    )
    .await;
    let job = s.until(&id, JobState::Succeeded).await;
    assert_eq!(job.params["verdict"], "passed");
    assert_eq!(job.params["notes"], "booted");
    assert!(s.live_items(&id).await.is_empty(), "cleanup left items");
    assert!(work::for_host(&s.db, HOST).await.unwrap().is_empty());
    let events = crate::registry::events::list(&s.db, 0, 1000).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "test-failover-passed" && e.message.contains("booted")),
        "{events:?}"
    );
    s.refused(
        "/v1/machines/m1/test-failover-cleanup",
        json!({"verdict": "passed"}),
        409,
        "no test failover waiting",
    )
    .await;
    // A start action built for NBD cannot start files: removed for what follows.
    let (st, v) = s
        .send(
            "PATCH",
            "/v1/machines/m1",
            Some(json!({"actions": {"start": null}})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["actions"]["start"], Value::Null);
    assert_eq!(state::start_action(&s.db, "m1").await.unwrap(), None);
}

async fn a_cleanup_that_leaves_something_fails_the_job(s: &Site) {
    let job = s
        .post(
            "/v1/machines/m1/test-failover",
            json!({"point": "latest", "target": {"kind": "dir", "format": "vhd"}, "host": HOST}),
            202,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["params"]["points"][0]["point"], point_id("P2"));
    s.until(&id, JobState::WaitingForInput).await;
    s.play.fail_removes.store(true, Ordering::SeqCst);
    s.post(
        &format!("/v1/jobs/{id}/resume"),
        json!({"verdict": "failed", "notes": "no boot"}),
        200,
    )
    .await;
    let job = s.until(&id, JobState::Failed).await;
    let e = job.error.clone().unwrap();
    assert!(
        e.starts_with("task clean up: ") && e.contains("left: file"),
        "{e}"
    );
    assert!(!s.live_items(&id).await.is_empty());
    // Resumed once the host can remove: a second remove item, and nothing left.
    s.play.fail_removes.store(false, Ordering::SeqCst);
    s.post(&format!("/v1/jobs/{id}/resume"), json!({}), 200)
        .await;
    let job = s.until(&id, JobState::Succeeded).await;
    assert_eq!(job.params["verdict"], "failed");
    assert!(s.live_items(&id).await.is_empty());
    let removes = work::for_job(&s.db, &id)
        .await
        .unwrap()
        .into_iter()
        .filter(|w| w.op.kind() == "remove")
        .count();
    assert_eq!(removes, 2, "the failed remove, then a new attempt");
}

async fn planned_failover_change_point_and_commit(s: &Site) {
    let job = s
        .post(
            "/v1/machines/m1/failover",
            json!({"planned": true, "target": {"kind": "nbd"}}),
            202,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    s.at_task(&id, "stop source writes").await;
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.state, "preparing");
    assert_eq!(row.active_site, "home");
    assert_eq!(row.prepare_id.as_deref(), Some(id.as_str()));
    // The source's report (helper S's heartbeat stores it) names a final point the
    // store does not hold yet: the job waits for its upload.
    let fin = point_id("P3");
    let report = json!({"id": id, "state": "prepared",
        "points": [{"disk": "sda", "point": fin}, {"disk": "sdb", "point": fin}]});
    sqlx::query("UPDATE machine_recovery SET prepared = $1 WHERE machine = 'm1'")
        .bind(report.to_string())
        .execute(s.db.pool())
        .await
        .unwrap();
    s.at_task(&id, "wait for final point upload").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.job(&id).await.state, JobState::Running);
    assert!(work::for_job(&s.db, &id).await.unwrap().is_empty());
    for disk in ["sda", "sdb"] {
        write_point(&s.access.store, &s.access.vault, "m1", disk, &fin, 2);
    }
    let job = s.until(&id, JobState::Succeeded).await;
    assert_eq!(
        names(&job),
        [
            "stop source writes",
            "wait for final point upload",
            "bring up disks",
            "mark failed over",
            "start machine"
        ]
    );
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(
        (row.state.as_str(), row.active_site.as_str()),
        ("failed-over", "recovery")
    );
    assert_eq!(row.point.as_ref().unwrap()["sda"], fin);
    let first_items = row.items.clone();
    assert_eq!(first_items.len(), 1, "{row:?}");
    let (_, m) = s.send("GET", "/v1/machines/m1", None).await;
    assert_eq!(m["recovery"]["state"], "failed-over");
    assert_eq!(m["recovery"]["planned"], true);
    assert_eq!(m["recovery"]["host"], HOST);

    s.refused(
        "/v1/machines/m1/failover",
        json!({"planned": false, "target": {"kind": "nbd"}}),
        409,
        "already failed over",
    )
    .await;
    s.refused(
        "/v1/machines/m1/test-failover",
        json!({"point": "latest", "target": {"kind": "nbd"}}),
        409,
        "failed-over",
    )
    .await;
    // Change-point: the first disks go, the new ones (same target) come up.
    let job = s
        .post(
            "/v1/machines/m1/change-point",
            json!({"point": point_id("P1")}),
            202,
        )
        .await;
    let cp = job["id"].as_str().unwrap().to_string();
    s.until(&cp, JobState::Succeeded).await;
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.point.as_ref().unwrap()["sdb"], point_id("P1"));
    assert_eq!(row.items.len(), 1);
    assert_ne!(row.items, first_items);
    let old = work::get(&s.db, &first_items[0]).await.unwrap().unwrap();
    assert_eq!(old.state, "removed");
    assert_eq!(
        work::get(&s.db, &row.items[0])
            .await
            .unwrap()
            .unwrap()
            .op
            .kind(),
        "serve"
    );

    let job = s.post("/v1/machines/m1/commit", json!({}), 202).await;
    s.until(job["id"].as_str().unwrap(), JobState::Succeeded)
        .await;
    assert_eq!(
        state::get(&s.db, "m1").await.unwrap().unwrap().state,
        "committed"
    );
    s.refused("/v1/machines/m1/commit", json!({}), 409, "committed")
        .await;
    s.refused("/v1/machines/m1/cancel", json!({}), 409, "committed")
        .await;
    s.refused(
        "/v1/machines/m1/change-point",
        json!({"point": "latest"}),
        409,
        "committed",
    )
    .await;
}

async fn unplanned_failover_fences_first_and_cancel_resumes(s: &Site) {
    let job = s
        .post(
            "/v1/machines/m1/failover",
            json!({"planned": false, "point": point_id("P1"), "target": {"kind": "dir"}}),
            202,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let job = s.until(&id, JobState::Succeeded).await;
    assert_eq!(
        names(&job),
        ["fence source", "bring up disks", "start machine"]
    );
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!((row.state.as_str(), row.planned), ("failed-over", false));
    let items = row.items.clone();
    // No start action now: only the build item.
    assert_eq!(items.len(), 1);
    let job = s.post("/v1/machines/m1/cancel", Value::Null, 202).await;
    let c = job["id"].as_str().unwrap().to_string();
    let job = s.until(&c, JobState::Succeeded).await;
    assert_eq!(names(&job), ["remove recovery disks", "resume source"]);
    assert_eq!(state::get(&s.db, "m1").await.unwrap(), None);
    assert_eq!(
        work::get(&s.db, &items[0]).await.unwrap().unwrap().state,
        "removed"
    );
    s.refused(
        "/v1/machines/m1/cancel",
        json!({}),
        409,
        "protected at home",
    )
    .await;
    s.refused(
        "/v1/machines/m1/commit",
        json!({}),
        409,
        "protected at home",
    )
    .await;
}

async fn bad_input_is_refused_before_a_job_exists(s: &Site) {
    let nbd = json!({"kind": "nbd"});
    let tf = "/v1/machines/m1/test-failover";
    s.refused(
        "/v1/machines/zz/test-failover",
        json!({"point": "latest", "target": nbd}),
        404,
        "no machine zz",
    )
    .await;
    s.refused(
        tf,
        json!({"point": "2026-01-01 00:00", "target": nbd}),
        400,
        "2026-01-01 00:00",
    )
    .await;
    s.refused(
        tf,
        json!({"point": "20250101T000000.000Z-ffff", "target": nbd}),
        400,
        "20250101T000000.000Z-ffff",
    )
    .await;
    s.refused(
        tf,
        json!({"point": "latest", "target": {"kind": "dir", "format": "qcow2"}}),
        400,
        "qcow2",
    )
    .await;
    s.refused(
        tf,
        json!({"point": "latest", "target": {"kind": "tape"}}),
        400,
        "tape",
    )
    .await;
    s.refused(
        tf,
        json!({"point": "latest", "target": nbd, "host": "rh9"}),
        400,
        "no recovery host rh9",
    )
    .await;
    s.refused(
        tf,
        json!({"point": "latest", "target": nbd, "extra": 1}),
        400,
        "extra",
    )
    .await;
    s.refused(
        "/v1/machines/m1/failover",
        json!({"planned": true, "point": "latest", "target": nbd}),
        400,
        "takes no point",
    )
    .await;
    s.refused(
        "/v1/machines/m1/commit",
        json!({"now": true}),
        400,
        "no parameters",
    )
    .await;
    s.refused(
        "/v1/machines/m1/test-failover-cleanup",
        json!({"verdict": "passed"}),
        409,
        "no test failover waiting",
    )
    .await;
    s.refused(
        "/v1/machines/m1/change-point",
        json!({"point": "latest"}),
        409,
        "not failed over",
    )
    .await;
    // latest-group resolves to the group's newest common point.
    let job = s
        .post(tf, json!({"point": "latest-group", "target": nbd}), 202)
        .await;
    assert_eq!(job["params"]["points"][1]["point"], point_id("P2"));
    let id = job["id"].as_str().unwrap().to_string();
    s.until(&id, JobState::WaitingForInput).await;
    s.post(
        "/v1/machines/m1/test-failover-cleanup",
        json!({"verdict": "passed"}),
        200,
    )
    .await;
    s.until(&id, JobState::Succeeded).await;
    crate::registry::machines::patch(&s.db, "m1", None, Some(None))
        .await
        .unwrap();
    s.refused(
        tf,
        json!({"point": "latest-group", "target": nbd}),
        400,
        "no replication group",
    )
    .await;
    // No live host.
    s.play.silent.store(true, Ordering::SeqCst);
    sqlx::query("UPDATE recovery_hosts SET last_seen = last_seen - 100")
        .execute(s.db.pool())
        .await
        .unwrap();
    s.refused(
        tf,
        json!({"point": "latest", "target": nbd}),
        409,
        "no live recovery host",
    )
    .await;
    s.refused(
        tf,
        json!({"point": "latest", "target": nbd, "host": HOST}),
        409,
        "not live",
    )
    .await;
    s.play.silent.store(false, Ordering::SeqCst);
    wait_for("the host live again", || async {
        work::least_loaded_host(&s.db, crate::db::now_s())
            .await
            .unwrap()
            .is_some()
    })
    .await;
}

/// Every scenario on one database, one after the other (one machine).
async fn scenarios(url: Option<&str>) {
    let s = site(url, true, true).await;
    bad_input_is_refused_before_a_job_exists(&s).await;
    test_failover_to_the_verdict(&s).await;
    a_cleanup_that_leaves_something_fails_the_job(&s).await;
    unplanned_failover_fences_first_and_cancel_resumes(&s).await;
    planned_failover_change_point_and_commit(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn machine_jobs_on_sqlite() {
    scenarios(None).await;
}

/// PostgreSQL when FERRY_TEST_DATABASE names one, as in `db::tests`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn machine_jobs_on_the_test_database() {
    let Ok(url) = std::env::var("FERRY_TEST_DATABASE") else {
        if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
            panic!("FERRY_TEST_DATABASE is not set but FERRY_TEST_REQUIRE_REMOTE=1");
        }
        eprintln!("FERRY_TEST_DATABASE not set: PostgreSQL not tested");
        return;
    };
    let _only = crate::db::tests::drop_all(&url).await;
    scenarios(Some(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_store_the_jobs_that_read_the_replica_are_refused() {
    let s = site(None, false, false).await;
    s.refused(
        "/v1/machines/m1/test-failover",
        json!({"point": "latest", "target": {"kind": "nbd"}}),
        503,
        "--store",
    )
    .await;
}

/// A runner killed in `bring up disks` (its runtime dropped: no task of it runs on),
/// and another that takes the job over once the lease ran out: it finds the item
/// the first one gave instead of giving a second, and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_killed_mid_job_is_taken_over_and_the_job_finishes() {
    let s = site(None, true, false).await;
    s.play.hold.store(true, Ordering::SeqCst);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ctx = s.ctx.clone();
    rt.spawn(async move {
        let cfg = runner_cfg("cp-dies", Duration::from_secs(1));
        let scheduler = Singleton::start(ctx.db.clone(), SCHEDULER, &cfg.owner, cfg.lease).await;
        runner::run(ctx, cfg, scheduler).await;
    });
    let job = s
        .post(
            "/v1/machines/m1/failover",
            json!({"planned": false, "target": {"kind": "nbd"}}),
            202,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    s.at_task(&id, "bring up disks").await;
    wait_for("the serve item", || async {
        !s.live_items(&id).await.is_empty()
    })
    .await;
    // Its progress shows while it runs.
    wait_for("progress", || async {
        s.job(&id).await.tasks[1].progress == 0.5
    })
    .await;
    rt.shutdown_background();
    let runner_b = start_runner(&s.ctx, "cp-b", Duration::from_secs(30)).await;
    s.play.hold.store(false, Ordering::SeqCst);
    let job = s.until(&id, JobState::Succeeded).await;
    runner_b.abort();
    let items = work::for_job(&s.db, &id).await.unwrap();
    assert_eq!(items.len(), 1, "one serve item, found again: {items:?}");
    assert_eq!(items[0].state, "succeeded");
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.items, [items[0].id.clone()]);
    assert_eq!(row.job_id.as_deref(), Some(id.as_str()));
    assert!(job.tasks.iter().all(|t| t.state == TaskState::Succeeded));
}

/// A host that goes silent fails the task waiting for it, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_fails_once_its_host_is_not_seen_for_a_minute() {
    let s = site(None, true, true).await;
    s.play.hold.store(true, Ordering::SeqCst);
    let job = s
        .post(
            "/v1/machines/m1/test-failover",
            json!({"point": "latest", "target": {"kind": "nbd"}}),
            202,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    wait_for("the serve item", || async {
        !s.live_items(&id).await.is_empty()
    })
    .await;
    s.play.silent.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    sqlx::query("UPDATE recovery_hosts SET last_seen = last_seen - 61")
        .execute(s.db.pool())
        .await
        .unwrap();
    let job = s.until(&id, JobState::Failed).await;
    let e = job.error.unwrap();
    assert!(e.contains("recovery host rh1 not seen for"), "{e}");
    // What it made stays until a cleanup: the job is resumed, not cancelled.
    let (st, _) = s.send("POST", &format!("/v1/jobs/{id}/cancel"), None).await;
    assert_eq!(st, 409);
}
