//! Every job kind's tasks and states over HTTP, and every bad input refused before a
//! job exists, on SQLite and (FERRY_TEST_DATABASE) PostgreSQL.

use super::*;

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
    // The serve item's disks, each with its own progress and rate.
    assert_eq!(
        v["work"][0]["disks"],
        json!([
            {"disk": "sda", "percent": 100.0, "mb_per_s": 118.0, "bytes_done": SIZE,
             "bytes": SIZE},
            {"disk": "sdb", "percent": 100.0, "mb_per_s": 118.0, "bytes_done": SIZE,
             "bytes": SIZE},
        ]),
        "{v}"
    );
    assert_eq!(
        v["work"][1]["disks"],
        json!([]),
        "a start item has none: {v}"
    );
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
    // The task runs before its first step has written the row: wait for that step.
    wait_for("machine m1 preparing", || async {
        let row = state::get(&s.db, "m1").await.unwrap();
        row.is_some_and(|r| r.state == "preparing")
    })
    .await;
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
    s.hush().await;
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
