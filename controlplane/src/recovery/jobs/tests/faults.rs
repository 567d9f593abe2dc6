//! What goes wrong: a runner killed mid-job, a host gone silent, a source that never
//! answers, and the failover row's conditional writes.

use super::*;

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
    s.hush().await;
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

/// A planned failover whose source never answers: its job is asked to cancel and
/// stops waiting (cancelled, saying where); the machine's cancel then lets the
/// source resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_failover_waiting_for_its_source_stops_at_a_cancel() {
    let s = site(None, true, true).await;
    let job = s
        .post(
            "/v1/machines/m1/failover",
            json!({"planned": true, "target": {"kind": "nbd"}}),
            202,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    s.at_task(&id, "stop source writes").await;
    // The machine is busy while the job is active.
    s.refused(
        "/v1/machines/m1/cancel",
        json!({}),
        409,
        &format!("failover job {id}"),
    )
    .await;
    let (st, v) = s.send("POST", &format!("/v1/jobs/{id}/cancel"), None).await;
    assert_eq!(st, 200, "{v}");
    let job = s.until(&id, JobState::Cancelled).await;
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("cancel asked while waiting for the source agent"),
        "{job:?}"
    );
    assert_eq!(
        state::get(&s.db, "m1").await.unwrap().unwrap().state,
        "preparing"
    );
    let c = s.post("/v1/machines/m1/cancel", json!({}), 202).await;
    s.until(c["id"].as_str().unwrap(), JobState::Succeeded)
        .await;
    assert_eq!(state::get(&s.db, "m1").await.unwrap(), None);
}

/// An unplanned failover cancelled while its host builds (`bring up disks`
/// running) ends cancelled, not failed; the item it gave is one of the failover's,
/// so the machine's cancel removes it and the source resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_failover_asked_to_cancel_ends_cancelled() {
    let s = site(None, true, true).await;
    s.play.hold.store(true, Ordering::SeqCst);
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
    let (st, v) = s.send("POST", &format!("/v1/jobs/{id}/cancel"), None).await;
    assert_eq!(st, 200, "{v}");
    let job = s.until(&id, JobState::Cancelled).await;
    let e = job.error.as_deref().unwrap();
    assert!(e.contains("task bring up disks: cancel asked"), "{e}");
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.items.len(), 1, "{row:?}");
    // The event follows the job's end (the runner writes it after the state).
    wait_for("the job-cancelled event", || async {
        crate::registry::events::list(&s.db, 0, 1000)
            .await
            .unwrap()
            .iter()
            .any(|e| e.kind == "job-cancelled" && e.subject == format!("job {id}"))
    })
    .await;
    s.play.hold.store(false, Ordering::SeqCst);
    let c = s.post("/v1/machines/m1/cancel", json!({}), 202).await;
    s.until(c["id"].as_str().unwrap(), JobState::Succeeded)
        .await;
    assert_eq!(state::get(&s.db, "m1").await.unwrap(), None);
    assert!(s.live_items(&id).await.is_empty());
}

/// `record verdict` run again (a control plane killed -9 after it wrote the event
/// but before the task was marked done) records the verdict once; the test
/// restarted and given the same verdict again records it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_verdict_recorded_again_is_one_event() {
    let s = site(None, true, true).await;
    let job = s
        .post(
            "/v1/machines/m1/test-failover",
            json!({"point": "latest", "target": {"kind": "nbd"}}),
            202,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    s.until(&id, JobState::WaitingForInput).await;
    s.post(
        "/v1/machines/m1/test-failover-cleanup",
        json!({"verdict": "failed", "notes": "no network"}),
        200,
    )
    .await;
    let job = s.until(&id, JobState::Succeeded).await;
    let seq = job
        .tasks
        .iter()
        .position(|t| t.name == super::super::RECORD_VERDICT)
        .unwrap();
    // The task as a takeover runs it again.
    super::super::tasks::run_task(&s.ctx, &job, seq)
        .await
        .unwrap();
    let verdicts: Vec<_> = crate::registry::events::list(&s.db, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind.starts_with("test-failover-"))
        .collect();
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    assert!(verdicts[0].message.contains("no network"), "{verdicts:?}");
    // A new test of the same job: its verdict is taken (and dated) anew.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (st, v) = s
        .send("POST", &format!("/v1/jobs/{id}/restart"), None)
        .await;
    assert_eq!(st, 200, "{v}");
    s.until(&id, JobState::WaitingForInput).await;
    s.post(
        "/v1/machines/m1/test-failover-cleanup",
        json!({"verdict": "failed", "notes": "no network"}),
        200,
    )
    .await;
    s.until(&id, JobState::Succeeded).await;
    let verdicts = crate::registry::events::list(&s.db, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind.starts_with("test-failover-"))
        .count();
    assert_eq!(verdicts, 2);
}

/// The failover row's writes move it only from the state they expect: a task run
/// again changes nothing, a later job takes over only what an earlier one left.
#[tokio::test]
async fn failover_rows_move_only_from_the_state_expected() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
    let begin = |job: &'static str| state::Begin {
        machine: "m1",
        job_id: job,
        host: HOST,
        prepare_id: Some(job),
    };
    let row = state::begin_prepare(&db, &begin("j1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.state.as_str(), row.prepare_id.as_deref()),
        ("preparing", Some("j1"))
    );
    sqlx::query("UPDATE machine_recovery SET prepared = $1")
        .bind(json!({"id": "j1", "state": "prepared", "points": []}).to_string())
        .execute(db.pool())
        .await
        .unwrap();
    // j1's task run again keeps the source's report.
    let row = state::begin_prepare(&db, &begin("j1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.prepared.unwrap().id, "j1");
    // A later planned failover (j1 failed) takes it over with its own prepare id.
    let row = state::begin_prepare(&db, &begin("j2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.prepare_id.as_deref(), row.prepared),
        (Some("j2"), None)
    );
    // An unplanned one fences it at once.
    let points = BTreeMap::from([("sda".to_string(), "p1".to_string())]);
    let row = state::fence(&db, &begin("j3"), &points)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.state.as_str(), row.job_id.as_deref()),
        ("failed-over", Some("j3"))
    );
    assert!(!state::mark_failed_over(&db, "m1", "j2").await.unwrap());
    // Failed over: neither a prepare nor another fence takes it.
    let row = state::begin_prepare(&db, &begin("j4"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.job_id.as_deref(), Some("j3"));
    let row = state::fence(&db, &begin("j5"), &points)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.job_id.as_deref(), Some("j3"));
    assert!(state::add_item(&db, "m1", "j3", "i1", &["failed-over"])
        .await
        .unwrap());
    assert!(state::add_item(&db, "m1", "j3", "i1", &["failed-over"])
        .await
        .unwrap());
    assert!(!state::add_item(&db, "m1", "j3", "i2", &["preparing"])
        .await
        .unwrap());
    assert_eq!(state::get(&db, "m1").await.unwrap().unwrap().items, ["i1"]);
    assert!(state::commit(&db, "m1", "j6").await.unwrap());
    assert!(
        state::commit(&db, "m1", "j6").await.unwrap(),
        "again: still committed"
    );
    assert!(
        !state::resume_source(&db, "m1").await.unwrap(),
        "committed stays"
    );
    assert_eq!(
        state::get(&db, "m1").await.unwrap().unwrap().state,
        "committed"
    );
}
