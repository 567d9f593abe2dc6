//! Plan jobs run by the real job runner against SQLite (and PostgreSQL when
//! FERRY_TEST_DATABASE is set). The machine jobs a plan queues are played by `FakeJ`,
//! which claims them and moves them through their states with the queue's functions,
//! the way their own runner does: a test failover comes up by waiting for its
//! cleanup, a failover succeeds (or fails once, when told to).
//!
//! The runner runs one job at a time, so that while a plan job runs it never claims
//! the plan's machine jobs itself (it has no runner for them here).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_link::control::wire::{DiskPoint, ReadyDisk, WorkOp, WorkReport, WorkResult};
use serde_json::{json, Value};
use sqlx::Row;
use tokio::sync::Notify;

use super::job::{self, Operation, Target};
use super::spec::Plan;
use crate::db::Db;
use crate::jobs::queue::{self, now_ms};
use crate::jobs::runner::{self, Context, RunnerConfig, StoreAccess};
use crate::jobs::singleton::Singleton;
use crate::jobs::{Job, JobState, TaskState};
use crate::recovery::work;

const CHILD_KINDS: &str =
    "('test-failover', 'failover', 'commit', 'cancel-failover', 'reprotect', 'failback')";

#[derive(Default)]
struct FakeJ {
    /// Machines whose first failover fails.
    fail_once: HashSet<String>,
    failed: HashSet<String>,
    /// (machine, input) of each test failover resumed for its cleanup, in order.
    cleanups: Vec<(String, Value)>,
    /// The most machine jobs queued or running at once, seen at each claim.
    most_in_progress: i64,
    /// Machines whose jobs are left queued until taken out of here.
    hold: HashSet<String>,
}

async fn in_progress(db: &Db) -> i64 {
    sqlx::query(&format!(
        "SELECT COUNT(*) AS n FROM jobs WHERE kind IN {CHILD_KINDS} \
         AND state IN ('queued', 'running')"
    ))
    .fetch_one(db.pool())
    .await
    .unwrap()
    .try_get("n")
    .unwrap()
}

async fn fake_j(db: Db, me: Arc<Mutex<FakeJ>>) {
    loop {
        let rows = sqlx::query(&format!(
            "SELECT id, subject FROM jobs WHERE state = 'queued' AND kind IN {CHILD_KINDS} \
             ORDER BY id"
        ))
        .fetch_all(db.pool())
        .await
        .unwrap();
        for r in rows {
            let id: String = r.try_get("id").unwrap();
            let subject: String = r.try_get("subject").unwrap();
            if me.lock().unwrap().hold.contains(&subject) {
                continue;
            }
            let n = in_progress(&db).await;
            {
                let mut j = me.lock().unwrap();
                j.most_in_progress = j.most_in_progress.max(n);
            }
            if queue::claim(&db, &id, "fake-j", now_ms(), 60_000)
                .await
                .unwrap()
            {
                let job = queue::get(&db, &id).await.unwrap().unwrap();
                play(&db, &job, &me).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the job's pending tasks up to `upto` (exclusive), succeeding each.
async fn tasks_done(db: &Db, job: &Job, upto: usize) {
    for seq in 0..upto {
        if job.tasks[seq].state != TaskState::Succeeded {
            assert!(queue::task_started(db, &job.id, "fake-j", seq)
                .await
                .unwrap());
            assert!(queue::task_ended(db, &job.id, "fake-j", seq, None)
                .await
                .unwrap());
        }
    }
}

async fn play(db: &Db, job: &Job, me: &Arc<Mutex<FakeJ>>) {
    // Long enough for a parallel bound to show.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let m = job.subject.clone();
    match job.kind.as_str() {
        "test-failover" if job.input.is_none() => {
            // Its disk, served by recovery host rh1.
            let item = work::item_id(&job.id, 0, &m);
            let op = WorkOp::Serve {
                disks: vec![DiskPoint {
                    disk: "sda".into(),
                    point: "p".into(),
                }],
            };
            work::submit(db, &item, "rh1", &job.id, &m, &op, 1)
                .await
                .unwrap();
            let report = WorkReport {
                id: item,
                state: "succeeded".into(),
                progress: 1.0,
                bytes_per_s: 0.0,
                error: None,
                result: Some(WorkResult {
                    disks: vec![ReadyDisk {
                        disk: "sda".into(),
                        point: "p".into(),
                        path: None,
                        nbd_url: Some(format!("nbd://127.0.0.1:10809/{m}/sda")),
                        bytes: 4096,
                    }],
                    ..WorkResult::default()
                }),
                disks: Vec::new(),
            };
            work::record_reports(db, "rh1", &[report], 2).await.unwrap();
            tasks_done(db, job, 2).await;
            assert!(queue::task_started(db, &job.id, "fake-j", 2).await.unwrap());
            assert!(queue::wait_for_input(db, &job.id, "fake-j", 2, "verdict?")
                .await
                .unwrap());
        }
        "test-failover" => {
            let input = job.input.clone().unwrap();
            me.lock().unwrap().cleanups.push((m, input));
            tasks_done(db, job, job.tasks.len()).await;
            assert!(
                queue::finish(db, &job.id, "fake-j", JobState::Succeeded, None)
                    .await
                    .unwrap()
            );
        }
        _ => {
            let fail = {
                let mut j = me.lock().unwrap();
                j.fail_once.contains(&m) && j.failed.insert(m.clone())
            };
            if fail {
                assert!(queue::task_started(db, &job.id, "fake-j", 0).await.unwrap());
                assert!(
                    queue::task_ended(db, &job.id, "fake-j", 0, Some("source unreachable"))
                        .await
                        .unwrap()
                );
                let e = format!("task {}: source unreachable", job.tasks[0].name);
                assert!(
                    queue::finish(db, &job.id, "fake-j", JobState::Failed, Some(&e))
                        .await
                        .unwrap()
                );
                return;
            }
            tasks_done(db, job, job.tasks.len()).await;
            assert!(
                queue::finish(db, &job.id, "fake-j", JobState::Succeeded, None)
                    .await
                    .unwrap()
            );
        }
    }
}

struct Site {
    _dir: tempfile::TempDir,
    db: Db,
    ctx: Context,
    j: Arc<Mutex<FakeJ>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Site {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn runner_config() -> RunnerConfig {
    RunnerConfig {
        poll: Duration::from_millis(50),
        max_running: 1,
        lease: Duration::from_secs(1),
        ..RunnerConfig::default()
    }
}

async fn start_runner(db: &Db, ctx: &Context) -> tokio::task::JoinHandle<()> {
    let cfg = runner_config();
    let scheduler = Singleton::start(
        db.clone(),
        crate::jobs::singleton::SCHEDULER,
        &cfg.owner,
        cfg.lease,
    )
    .await;
    tokio::spawn(runner::run(ctx.clone(), cfg, scheduler))
}

async fn site_on(url: Option<&str>, store: Option<Arc<StoreAccess>>) -> Site {
    site_with(url, store, true).await
}

async fn site_with(url: Option<&str>, store: Option<Arc<StoreAccess>>, runner: bool) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let url = url.map_or_else(|| Db::default_url(dir.path()), str::to_string);
    let db = Db::open(&url).await.unwrap();
    let ctx = Context {
        db: db.clone(),
        store,
        wake: Arc::new(Notify::new()),
    };
    let j = Arc::new(Mutex::new(FakeJ::default()));
    let mut tasks = vec![tokio::spawn(fake_j(db.clone(), j.clone()))];
    if runner {
        tasks.push(start_runner(&db, &ctx).await);
    }
    Site {
        _dir: dir,
        db,
        ctx,
        j,
        tasks,
    }
}

async fn site() -> Site {
    site_on(None, None).await
}

impl Site {
    async fn machine(&self, name: &str, group: Option<&str>) {
        sqlx::query(
            "INSERT INTO machines (name, group_name, state, disks, registered_at, last_seen) \
             VALUES ($1, $2, 'protected', '[]', 1, 1)",
        )
        .bind(name.to_string())
        .bind(group.map(str::to_string))
        .execute(self.db.pool())
        .await
        .unwrap();
    }

    async fn plan(&self, v: Value) -> Plan {
        let plan: Plan = serde_json::from_value(v).unwrap();
        plan.check().unwrap();
        assert!(super::store::create(&self.db, &plan).await.unwrap());
        plan
    }

    /// The job once `done` holds of it.
    async fn until(&self, id: &str, what: &str, done: impl Fn(&Job) -> bool) -> Job {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let job = queue::get(&self.db, id).await.unwrap().unwrap();
            if done(&job) {
                return job;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: {job:#?}");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    async fn until_state(&self, id: &str, state: JobState) -> Job {
        self.until(id, state.as_str(), |j| j.state == state).await
    }

    async fn resume(&self, id: &str, input: Option<Value>) {
        let job = queue::get(&self.db, id).await.unwrap().unwrap();
        if let Some(i) = &input {
            crate::jobs::check_input(&job, i).unwrap();
        }
        assert!(matches!(
            queue::resume_with(&self.db, id, input.as_ref())
                .await
                .unwrap(),
            queue::Outcome::Done(_)
        ));
        self.ctx.wake.notify_one();
    }

    async fn children(&self, job: &Job) -> Vec<(String, Job)> {
        let params: job::Params =
            serde_json::from_value(queue::get(&self.db, &job.id).await.unwrap().unwrap().params)
                .unwrap();
        let mut out = Vec::new();
        for (m, id) in params.children {
            out.push((m, queue::get(&self.db, &id).await.unwrap().unwrap()));
        }
        out
    }
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn test_failover() -> Operation {
    Operation::TestFailover {
        point: "latest".into(),
        target: Target::Nbd,
        host: None,
    }
}

fn unplanned() -> Operation {
    Operation::Failover {
        planned: false,
        point: Some("latest".into()),
        target: Target::Nbd,
        host: None,
    }
}

/// Two groups in order with scripts, a manual pause, parallel bounded by
/// `max_parallel`, each machine up before `after`, then the cleanup in reverse order.
async fn two_groups_then_cleanup(s: &Site) {
    for m in ["m1", "m2", "m3"] {
        s.machine(m, None).await;
    }
    let log = s._dir.path().join("ran.log");
    let log = log.display();
    s.plan(json!({"name": "shop", "max_parallel": 1, "groups": [
        {"name": "db", "machines": ["m1", "m2"],
         "before": [
            {"kind": "script", "name": "stop-app", "timeout_s": 10, "command":
             format!("echo \"db-before $FERRY_GROUP [$FERRY_MACHINE] $FERRY_FAILOVER_TYPE \
                     $FERRY_DIRECTION $FERRY_PLAN $FERRY_POINT\" >> {log}")},
            {"kind": "script", "name": "planned-only", "timeout_s": 10,
             "failover_types": ["planned"], "command": format!("echo planned >> {log}")}],
         "after": [{"kind": "script", "name": "check-db", "timeout_s": 10, "command":
             format!("echo \"db-after $FERRY_DISK_M1_SDA $FERRY_DISK_M2_SDA\" >> {log}")}]},
        {"name": "app", "machines": ["m3"],
         "before": [{"kind": "manual", "name": "look", "text": "check the database answers"}],
         "after": [{"kind": "script", "name": "smoke", "timeout_s": 10, "command":
             format!("echo \"app-after $FERRY_DISK_M3_SDA\" >> {log}")}]}]}))
        .await;
    let job = job::enqueue(&s.ctx, "shop", test_failover(), Some("latest"))
        .await
        .unwrap();
    let names: Vec<&str> = job.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "group db: before: stop-app",
            "group db: machines",
            "group db: after: check-db",
            "group app: before: look",
            "group app: machines",
            "group app: after: smoke",
            "wait for cleanup",
            "group app: clean up",
            "group db: clean up",
        ]
    );
    // A second job on the plan while this one is active: refused.
    let e = job::enqueue(&s.ctx, "shop", unplanned(), Some("latest"))
        .await
        .unwrap_err();
    assert!(matches!(e, job::PlanError::Conflict(_)), "{e}");

    let waiting = s.until_state(&job.id, JobState::WaitingForInput).await;
    assert!(
        waiting
            .prompt
            .as_deref()
            .unwrap()
            .contains("check the database answers"),
        "{waiting:?}"
    );
    assert_eq!(waiting.tasks[3].state, TaskState::Pending);
    let log_path = s._dir.path().join("ran.log");
    assert_eq!(
        lines(&log_path),
        [
            "db-before db [m1 m2] test forward shop latest".to_string(),
            "db-after nbd://127.0.0.1:10809/m1/sda nbd://127.0.0.1:10809/m2/sda".to_string(),
        ]
    );
    // Both db machines are up (waiting for their cleanup), app's not started.
    let children = s.children(&waiting).await;
    assert_eq!(children.len(), 2);
    for (_, c) in &children {
        assert_eq!(c.kind, "test-failover");
        assert_eq!(c.state, JobState::WaitingForInput);
        assert_eq!(
            c.params,
            json!({"point": "latest", "target": {"kind": "nbd"}})
        );
    }
    // The manual action takes {} or a skip, not a verdict.
    assert!(crate::jobs::check_input(&waiting, &json!({"verdict": "passed"})).is_err());
    // A resume, with or without input, goes on.
    s.resume(&job.id, None).await;
    let up = s
        .until(&job.id, "waiting for cleanup", |j| {
            j.state == JobState::WaitingForInput && j.tasks[6].started_at.is_some()
        })
        .await;
    assert!(
        up.prompt
            .as_deref()
            .unwrap()
            .contains("test-failover-cleanup"),
        "{up:?}"
    );
    assert_eq!(
        lines(&log_path)[2..],
        ["app-after nbd://127.0.0.1:10809/m3/sda".to_string()]
    );
    assert!(crate::jobs::check_input(&up, &json!({})).is_err());
    assert!(crate::jobs::check_input(&up, &json!({"verdict": "maybe"})).is_err());
    let verdict = json!({"verdict": "passed", "notes": "all answered"});
    job::clean_up(&s.ctx, "shop", &verdict).await.unwrap();
    let done = s.until_state(&job.id, JobState::Succeeded).await;
    assert!(done.tasks.iter().all(|t| t.state == TaskState::Succeeded));
    for (_, c) in s.children(&done).await {
        assert_eq!(c.state, JobState::Succeeded);
    }
    {
        let j = s.j.lock().unwrap();
        // Cleanup in reverse group order, each with the verdict.
        let order: Vec<&str> = j.cleanups.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(order[0], "m3");
        assert_eq!(order.len(), 3);
        assert!(j.cleanups.iter().all(|(_, v)| v == &verdict));
        assert_eq!(j.most_in_progress, 1, "max_parallel 1");
    }
    // Nothing waits: no second cleanup.
    let e = job::clean_up(&s.ctx, "shop", &verdict).await.unwrap_err();
    assert!(e.to_string().contains("no test failover waiting"), "{e}");
}

#[tokio::test]
async fn a_plan_of_two_groups_runs_in_order_pauses_and_cleans_up_on_sqlite() {
    two_groups_then_cleanup(&site().await).await;
}

#[tokio::test]
async fn a_plan_of_two_groups_runs_in_order_pauses_and_cleans_up_on_the_test_database() {
    let Ok(url) = std::env::var("FERRY_TEST_DATABASE") else {
        if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
            panic!("FERRY_TEST_DATABASE is not set but FERRY_TEST_REQUIRE_REMOTE=1");
        }
        eprintln!("FERRY_TEST_DATABASE not set: PostgreSQL not tested");
        return;
    };
    let _only = crate::db::tests::drop_all(&url).await;
    two_groups_then_cleanup(&site_on(Some(&url), None).await).await;
}

#[tokio::test]
async fn a_failing_script_fails_the_job_with_its_output_then_retries_or_is_skipped() {
    let s = site().await;
    s.machine("m1", None).await;
    s.machine("m2", None).await;
    s.j.lock().unwrap().fail_once.insert("m2".into());
    let log = s._dir.path().join("attempts.log");
    s.plan(
        json!({"name": "p", "groups": [{"name": "g", "machines": ["m1", "m2"],
        "before": [{"kind": "script", "name": "boom", "timeout_s": 10, "command":
            format!("echo attempt >> {}; echo boom-output; exit 7", log.display())}]}]}),
    )
    .await;
    let job = job::enqueue(&s.ctx, "p", unplanned(), Some("latest"))
        .await
        .unwrap();
    let failed = s.until_state(&job.id, JobState::Failed).await;
    let e = failed.error.clone().unwrap();
    assert!(
        e.starts_with("task group g: before: boom: script boom"),
        "{e}"
    );
    assert!(
        e.contains("exited with 7") && e.contains("boom-output"),
        "{e}"
    );
    assert_eq!(failed.tasks[0].state, TaskState::Failed);
    assert!(crate::jobs::check_input(&failed, &json!({"skip": "yes"})).is_err());
    assert!(crate::jobs::check_input(&failed, &json!({"verdict": "passed"})).is_err());
    // Resume: it runs again (and fails again).
    s.resume(&job.id, None).await;
    s.until(&job.id, "failed again", |j| {
        j.state == JobState::Failed && lines(&log).len() == 2
    })
    .await;
    // Skipped: the machines go on; m2's failover fails, m1's does not.
    s.resume(&job.id, Some(json!({"skip": true}))).await;
    let failed = s
        .until(&job.id, "machines failed", |j| {
            j.state == JobState::Failed && j.tasks[0].state == TaskState::Succeeded
        })
        .await;
    let e = failed.error.clone().unwrap();
    assert!(
        e.contains("group g: 1 of 2 machines did not come up: machine m2: job")
            && e.contains("(failover) failed: task fence source: source unreachable"),
        "{e}"
    );
    assert!(!e.contains("machine m1"), "{e}");
    // The machines task takes no skip.
    assert!(crate::jobs::check_input(&failed, &json!({"skip": true})).is_err());
    let before = s.children(&failed).await;
    // Resumed: m2's own failover job is resumed (not a second one), and succeeds.
    s.resume(&job.id, None).await;
    let done = s.until_state(&job.id, JobState::Succeeded).await;
    assert_eq!(lines(&log).len(), 2, "the skipped script did not run again");
    let after = s.children(&done).await;
    assert_eq!(
        before.iter().map(|(m, c)| (m, &c.id)).collect::<Vec<_>>(),
        after.iter().map(|(m, c)| (m, &c.id)).collect::<Vec<_>>()
    );
    assert!(after.iter().all(|(_, c)| c.state == JobState::Succeeded));
    assert_eq!(
        after[1].1.params,
        json!({"planned": false, "point": "latest",
        "target": {"kind": "nbd"}})
    );
    let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE kind = 'failover'")
        .fetch_one(s.db.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    assert_eq!(n, 2);
}

#[tokio::test]
async fn a_hanging_script_is_killed_at_its_timeout_and_fails_the_job() {
    let s = site().await;
    s.plan(json!({"name": "h", "groups": [{"name": "g", "machines": [],
        "after": [{"kind": "script", "name": "hang", "timeout_s": 1,
            "command": "echo waiting; sleep 300"}]}]}))
        .await;
    let t0 = std::time::Instant::now();
    let job = job::enqueue(&s.ctx, "h", unplanned(), Some("latest"))
        .await
        .unwrap();
    let failed = s.until_state(&job.id, JobState::Failed).await;
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let e = failed.error.unwrap();
    assert!(
        e.contains("script hang on control-plane timed out after 1 s") && e.contains("waiting"),
        "{e}"
    );
}

mod failback;
mod points_and_hosts;

/// A manual action waits once per run of its job: resumed (with `{}` or no input) it
/// goes on; the job restarted, it waits again.
#[tokio::test]
async fn a_manual_action_waits_until_resumed_and_again_after_a_restart() {
    let s = site().await;
    s.plan(
        json!({"name": "ask", "groups": [{"name": "g", "machines": [],
        "before": [{"kind": "manual", "name": "call", "text": "call the DBA"}]}]}),
    )
    .await;
    let job = job::enqueue(&s.ctx, "ask", unplanned(), Some("latest"))
        .await
        .unwrap();
    let waiting = s.until_state(&job.id, JobState::WaitingForInput).await;
    assert_eq!(
        waiting.prompt.as_deref(),
        Some("group g: call: call the DBA (resume the job to go on)")
    );
    s.resume(&job.id, Some(json!({}))).await;
    let done = s.until_state(&job.id, JobState::Succeeded).await;
    assert_eq!(done.params["waited"], json!([]));
    assert!(matches!(
        queue::restart(&s.db, &job.id).await.unwrap(),
        queue::Outcome::Done(_)
    ));
    s.ctx.wake.notify_one();
    let again = s
        .until(&job.id, "waiting again", |j| {
            j.state == JobState::WaitingForInput && j.started_at.is_some()
        })
        .await;
    assert!(again.prompt.as_deref().unwrap().contains("call the DBA"));
    s.resume(&job.id, None).await;
    s.until_state(&job.id, JobState::Succeeded).await;
}
