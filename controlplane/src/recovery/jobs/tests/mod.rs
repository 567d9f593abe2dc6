//! The machine jobs end to end inside one process: the API over HTTP, the real job
//! runner, a real local store holding real points, and an in-process task that
//! plays the recovery host through `work::record_reports` (and, for a planned
//! failover, the source agent through `machine_recovery.prepared`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_link::control::wire::{
    AppliedDisk, DiskProgress, ExchangeDisk, ReadyDisk, RoundDisk, WorkItem, WorkOp, WorkReport,
    WorkResult,
};
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

mod failback;
mod faults;
mod reprotect;
mod scenarios;

const SIZE: u64 = 1 << 20;
const HOST: &str = "rh1";
const NBD: &str = "127.0.0.1:10809";

/// Writes one point `id` on `machine/disk` (a block of `seq + 1` bytes at block
/// `seq`), as a process server's upload would.
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
    /// Heartbeats skipped while silent: once it grows, no heartbeat is in flight.
    silent_ticks: AtomicU64,
    /// Fail sync items with this error (a home disk too small, say).
    fail_syncs: Mutex<Option<String>>,
    /// Fail apply items with an end (failback's) with this error (a verify, say).
    fail_applies: Mutex<Option<String>>,
    /// Fail reverse items with this error (a served disk gone, say).
    fail_reverses: Mutex<Option<String>>,
    /// Keep the items of this kind running (`hold` for one kind only).
    hold_kind: Mutex<Option<&'static str>>,
}

/// What the fake host reports a sync wrote on each disk: three blocks.
const SYNC_BLOCKS_WRITTEN: u64 = 3;

/// The reverse point the fake host's rounds end at: a continuous item's first round,
/// or a last item's final point.
fn reverse_point(disk: &str, last: bool) -> String {
    format!("{}-{disk}", if last { "RF" } else { "R1" })
}

/// An applied disk as the fake master target reports it: applied 5 s before `now`.
fn applied(disk: &str, point: &str, now: i64, verified: Option<bool>) -> AppliedDisk {
    AppliedDisk {
        disk: disk.into(),
        point: point.into(),
        at: now - 5,
        bytes_written: 8192,
        bytes_fetched: 9000,
        total_bytes_written: 16384,
        verified,
    }
}

/// What the fake hosts' home-map and point-diff items store for `disk`: a map named
/// `map`, and segments.
fn exchange(disk: &str, map: &str, segments: u64) -> ExchangeDisk {
    ExchangeDisk {
        disk: disk.into(),
        map: format!("{map}-{disk}"),
        segments,
        blocks: SIZE / 4096,
        blocks_differing: SYNC_BLOCKS_WRITTEN,
        bytes_fetched: 500,
        bytes_stored: 700,
    }
}

async fn play_host(db: Db, play: Arc<HostPlay>) {
    let mut reported: BTreeMap<String, ()> = BTreeMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(30)).await;
        if play.silent.load(Ordering::SeqCst) {
            play.silent_ticks.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let now = crate::db::now_s();
        work::host_heartbeat(&db, HOST, NBD, 1 << 40, now, None)
            .await
            .unwrap();
        let orders = work::for_host(&db, HOST).await.unwrap();
        let mut reports = Vec::new();
        for item in orders {
            if reported.contains_key(&item.id) {
                continue;
            }
            play.seen.lock().unwrap().push(item.clone());
            let held_kind = *play.hold_kind.lock().unwrap() == Some(item.op.kind());
            if play.hold.load(Ordering::SeqCst) || held_kind {
                reports.push(WorkReport {
                    id: item.id.clone(),
                    state: "running".into(),
                    progress: 0.5,
                    bytes_per_s: 1e6,
                    error: None,
                    result: None,
                    disks: Vec::new(),
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
                WorkOp::Reverse { .. } if play.fail_reverses.lock().unwrap().is_some() => (
                    "failed",
                    play.fail_reverses.lock().unwrap().clone(),
                    WorkResult::default(),
                ),
                WorkOp::Reverse { disks, last, .. } => (
                    // A continuous item runs on; a last one ends with its final points.
                    if *last { "succeeded" } else { "running" },
                    None,
                    WorkResult {
                        rounds: disks
                            .iter()
                            .map(|d| RoundDisk {
                                disk: d.disk.clone(),
                                point: reverse_point(&d.disk, *last),
                                at: now - 2,
                                bytes_data: 8192,
                                bytes_sent: 9000,
                                total_bytes_sent: 18000,
                            })
                            .collect(),
                        ..WorkResult::default()
                    },
                ),
                WorkOp::Apply { until, .. } if !until.is_empty() => {
                    match play.fail_applies.lock().unwrap().clone() {
                        Some(e) => ("failed", Some(e), WorkResult::default()),
                        None => (
                            "succeeded",
                            None,
                            WorkResult {
                                applied: until
                                    .iter()
                                    .map(|d| applied(&d.disk, &d.point, now, Some(true)))
                                    .collect(),
                                ..WorkResult::default()
                            },
                        ),
                    }
                }
                WorkOp::Apply { disks, .. } => (
                    "running",
                    None,
                    WorkResult {
                        applied: disks
                            .iter()
                            .map(|d| applied(&d.disk, &reverse_point(&d.disk, false), now, None))
                            .collect(),
                        ..WorkResult::default()
                    },
                ),
                WorkOp::HomeMap { disks } => (
                    "succeeded",
                    None,
                    WorkResult {
                        exchange: disks
                            .iter()
                            .map(|d| exchange(&d.disk, &format!("home-{}", item.id), 0))
                            .collect(),
                        ..WorkResult::default()
                    },
                ),
                WorkOp::PointDiff { disks } => (
                    "succeeded",
                    None,
                    WorkResult {
                        exchange: disks
                            .iter()
                            .map(|d| exchange(&d.disk, &format!("point-{}", item.id), 3))
                            .collect(),
                        ..WorkResult::default()
                    },
                ),
                WorkOp::Sync { disks } => match play.fail_syncs.lock().unwrap().clone() {
                    Some(e) => ("failed", Some(e), WorkResult::default()),
                    None => (
                        "succeeded",
                        None,
                        WorkResult {
                            synced: disks
                                .iter()
                                .map(|d| ferry_link::control::wire::SyncedDisk {
                                    disk: d.disk.clone(),
                                    blocks: SIZE / 4096,
                                    blocks_differing: SYNC_BLOCKS_WRITTEN,
                                    bytes_written: SYNC_BLOCKS_WRITTEN * 4096,
                                    bytes_fetched: 10_000,
                                    bytes_stored: 0,
                                    identical: true,
                                })
                                .collect(),
                            ..WorkResult::default()
                        },
                    ),
                },
            };
            // Each disk done, at the rate the job view shows as 118 MB/s.
            let per_disk = match &item.op {
                WorkOp::Build { disks, .. } | WorkOp::Serve { disks } => disks
                    .iter()
                    .map(|d| DiskProgress {
                        disk: d.disk.clone(),
                        progress: 1.0,
                        bytes_per_s: 118e6,
                        bytes_done: SIZE,
                        bytes: SIZE,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            reported.insert(item.id.clone(), ());
            reports.push(WorkReport {
                id: item.id.clone(),
                state: state.into(),
                progress: 1.0,
                bytes_per_s: 0.0,
                error,
                result: Some(result),
                disks: per_disk,
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
    /// Stops the host's heartbeats and returns once none is in flight, so that a
    /// `last_seen` written next is not overwritten by a late one.
    async fn hush(&self) {
        self.play.silent.store(true, Ordering::SeqCst);
        let from = self.play.silent_ticks.load(Ordering::SeqCst);
        wait_for("the host silent", || async {
            self.play.silent_ticks.load(Ordering::SeqCst) > from
        })
        .await;
    }

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
