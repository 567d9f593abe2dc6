//! Plan jobs and what they depend on beyond the database: the store's group points,
//! a recovery host's work items, a control plane killed under a running plan job.

use super::*;

/// A file store where machines `g1a` and `g1b` (replication group g1) share group
/// point `gp1`; `gp2`, newer, is on `g1a` only.
fn group_store(dir: &std::path::Path) -> Arc<StoreAccess> {
    use ferry_replica::writer::append;
    use ferry_replica::{Disk, Point, PointKind, Store, VaultKey};
    let store = Store::open(&format!("file://{}", dir.display())).unwrap();
    let vault = VaultKey::generate();
    let t0 = chrono::Utc::now() - chrono::Duration::minutes(5);
    let members = [
        ("g1a", vec!["gp1", "gp2"], Some("g1")),
        ("g1b", vec!["gp1"], Some("g1")),
        ("solo", vec!["s1"], None),
    ];
    for (m, points, group) in members {
        let disk = store
            .block(Disk::open_or_create(
                &store,
                m,
                "sda",
                &vault,
                4096,
                1 << 20,
            ))
            .unwrap();
        let mut state = store.block(disk.load_state()).unwrap();
        for (i, id) in points.iter().enumerate() {
            let seq = state.next_seq;
            let p = Point {
                id: id.to_string(),
                kind: if group.is_some() {
                    PointKind::Group
                } else {
                    PointKind::Crash
                },
                time: t0 + chrono::Duration::seconds(i as i64),
                seq,
                disk_bytes: 1 << 20,
                label: None,
                group: group.map(str::to_string),
                sums: None,
            };
            store
                .block(append(&disk, &mut state, Vec::new(), vec![p], seq + 1))
                .unwrap();
        }
    }
    Arc::new(StoreAccess { store, vault })
}

#[tokio::test]
async fn the_members_of_a_replication_group_fail_over_at_one_group_point() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().to_path_buf();
    let access = tokio::task::spawn_blocking(move || group_store(&store_dir))
        .await
        .unwrap();
    let s = site_on(None, Some(access)).await;
    // The machine jobs' own checks want a live recovery host (the stand-in plays it).
    crate::recovery::work::host_heartbeat(
        &s.db,
        "rh1",
        "127.0.0.1:10809",
        1 << 30,
        crate::db::now_s(),
        None,
    )
    .await
    .unwrap();
    s.machine("g1a", Some("g1")).await;
    s.machine("g1b", Some("g1")).await;
    s.machine("solo", None).await;
    // The members in two plan groups: still one point.
    s.plan(json!({"name": "grp", "groups": [
        {"name": "first", "machines": ["g1a", "solo"]},
        {"name": "second", "machines": ["g1b"]}]}))
        .await;
    for spec in ["latest", "latest-group"] {
        let job = job::enqueue(&s.ctx, "grp", unplanned(), Some(spec))
            .await
            .unwrap();
        let done = s.until_state(&job.id, JobState::Succeeded).await;
        let points: Vec<(String, Value)> = s
            .children(&done)
            .await
            .into_iter()
            .map(|(m, c)| (m, c.params["point"].clone()))
            .collect();
        assert_eq!(
            points,
            [
                ("g1a".to_string(), json!("gp1")),
                ("g1b".to_string(), json!("gp1")),
                ("solo".to_string(), json!("latest")),
            ],
            "{spec}"
        );
    }
    // Another spec goes to each machine as it is (and is checked by its machine job:
    // none of these has an app-consistent point, which fails the plan naming it); a
    // bad one is refused before a job.
    let job = job::enqueue(&s.ctx, "grp", unplanned(), Some("latest-app"))
        .await
        .unwrap();
    assert_eq!(
        job.params["points"],
        json!({"g1a": "latest-app", "g1b": "latest-app", "solo": "latest-app"})
    );
    let failed = s.until_state(&job.id, JobState::Failed).await;
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("has no app-consistent point")),
        "{failed:?}"
    );
    let e = job::enqueue(&s.ctx, "grp", unplanned(), Some("2026-01-01 00:00"))
        .await
        .unwrap_err();
    assert!(matches!(e, job::PlanError::BadRequest(_)), "{e}");
    // A group no machine of the store is in: named.
    sqlx::query("UPDATE machines SET group_name = 'g9' WHERE name = 'solo'")
        .execute(s.db.pool())
        .await
        .unwrap();
    let e = job::enqueue(&s.ctx, "grp", unplanned(), Some("latest"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("replication group g9"), "{e}");
}

/// A script on a recovery host: a `script` work item given to it, its report read,
/// a failure shown with its output, a retry a new item.
#[tokio::test]
async fn a_script_on_a_recovery_host_is_a_work_item_and_its_failure_shows_its_output() {
    let s = site().await;
    work::host_heartbeat(
        &s.db,
        "rh1",
        "127.0.0.1:10809",
        1 << 30,
        crate::db::now_s(),
        None,
    )
    .await
    .unwrap();
    s.plan(
        json!({"name": "rh", "groups": [{"name": "g", "machines": [],
        "before": [{"kind": "script", "name": "remote", "timeout_s": 30,
            "run_on": "recovery-host:rh1", "command": "check-app"}]}]}),
    )
    .await;
    let job = job::enqueue(&s.ctx, "rh", unplanned(), Some("latest"))
        .await
        .unwrap();
    // Plays the host: fails the first item, succeeds the second.
    let item = |n: usize| format!("{}-a{n}", work::item_id(&job.id, 0, "rh"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let row = loop {
        if let Some(r) = work::get(&s.db, &item(0)).await.unwrap() {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no item");
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    let WorkOp::Script {
        command,
        timeout_s,
        env,
    } = &row.op
    else {
        panic!("{row:?}")
    };
    assert_eq!((command.as_str(), *timeout_s), ("check-app", 30));
    assert_eq!(env["FERRY_PLAN"], "rh");
    assert_eq!(env["FERRY_FAILOVER_TYPE"], "unplanned");
    let report = |id: String, state: &str, code: i32| WorkReport {
        id,
        state: state.into(),
        progress: 1.0,
        bytes_per_s: 0.0,
        error: (code != 0).then(|| format!("exited with {code}")),
        result: Some(WorkResult {
            exit_code: Some(code),
            output: "app said no".into(),
            ..WorkResult::default()
        }),
        disks: Vec::new(),
    };
    work::record_reports(
        &s.db,
        "rh1",
        &[report(item(0), "failed", 2)],
        crate::db::now_s(),
    )
    .await
    .unwrap();
    let failed = s.until_state(&job.id, JobState::Failed).await;
    let e = failed.error.unwrap();
    assert!(
        e.contains("script remote on recovery host rh1 exited with 2") && e.contains("app said no"),
        "{e}"
    );
    // Read, it leaves the host's orders; a retry is a new item.
    assert!(work::for_host(&s.db, "rh1").await.unwrap().is_empty());
    s.resume(&job.id, None).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while work::get(&s.db, &item(1)).await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "no second item");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    work::record_reports(
        &s.db,
        "rh1",
        &[report(item(1), "succeeded", 0)],
        crate::db::now_s(),
    )
    .await
    .unwrap();
    s.until_state(&job.id, JobState::Succeeded).await;
}

async fn count(db: &Db, kind: &str) -> i64 {
    sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE kind = $1")
        .bind(kind.to_string())
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap()
}

/// A control plane killed (its runtime gone, as with kill -9) while a plan waits for
/// its machines: the next one takes the job over once its lease ran out, finds the
/// machine jobs the first recorded, and queues none twice. A machine job queued but
/// not yet recorded when it died is found by its key and kind.
#[tokio::test]
async fn a_plan_job_taken_over_after_a_kill_finds_its_machine_jobs() {
    let s = site_with(None, None, false).await;
    for m in ["m1", "m2", "m3"] {
        s.machine(m, None).await;
    }
    s.plan(json!({"name": "k", "max_parallel": 1, "groups": [
        {"name": "g", "machines": ["m1", "m2", "m3"]}]}))
        .await;
    s.j.lock().unwrap().hold.insert("m1".into());
    let job = job::enqueue(&s.ctx, "k", test_failover(), Some("latest"))
        .await
        .unwrap();
    // Queued by the job before it could record it: the take-over adopts it.
    let orphan = crate::plans::children::enqueue_child(
        &s.db,
        None,
        crate::plans::children::ChildKind::TestFailover,
        "m3",
        &json!({"point": "latest", "target": {"kind": "nbd"}}),
    )
    .await
    .unwrap()
    .unwrap();
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (db, ctx) = (s.db.clone(), s.ctx.clone());
    first.spawn(async move {
        let _runner = start_runner(&db, &ctx).await;
        std::future::pending::<()>().await
    });
    let held = s
        .until(&job.id, "m1's job recorded", |j| {
            j.params["children"].get("m1").is_some()
        })
        .await;
    let m1_job = held.params["children"]["m1"].clone();
    first.shutdown_background();
    assert_eq!(
        count(&s.db, "test-failover").await,
        2,
        "m1's and the orphan"
    );
    let _second = start_runner(&s.db, &s.ctx).await;
    // Let the second runner take it over before m1 comes up.
    s.until(&job.id, "taken over", |j| {
        j.lease_owner.is_some() && j.lease_owner != held.lease_owner
    })
    .await;
    s.j.lock().unwrap().hold.clear();
    let up = s
        .until(&job.id, "up", |j| j.state == JobState::WaitingForInput)
        .await;
    assert_eq!(up.params["children"]["m1"], m1_job);
    assert_eq!(up.params["children"]["m3"], json!(orphan));
    assert_eq!(count(&s.db, "test-failover").await, 3, "one per machine");
}
