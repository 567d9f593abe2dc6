//! Reprotect (docs/failback.md): refused until the machine is failed over and
//! committed, and for a bad master target or home disks; then one sync item on the
//! master target, and the machine goes reverse.

use super::*;

const RP: &str = "/v1/machines/m1/reprotect";

fn names(job: &Job) -> Vec<&str> {
    job.tasks.iter().map(|t| t.name.as_str()).collect()
}

fn home() -> Value {
    json!({"master_target": HOST, "disks": {"sda": "/h/sda", "sdb": "/h/sdb"}})
}

async fn run(s: &Site, path: &str, body: Value) -> Job {
    let job = s.post(path, body, 202).await;
    s.until(job["id"].as_str().unwrap(), JobState::Succeeded)
        .await
}

/// Machine m2's row, reprotected onto `path` of the host: the path is taken.
async fn m2_reprotected_onto(db: &Db, path: &str) {
    sqlx::query(
        "INSERT INTO machine_recovery (machine, state, active_site, planned, items, \
         updated_at, direction, master_target, home_disks) \
         VALUES ('m2', 'committed', 'recovery', 0, '[]', 1, 'reverse', $1, $2)",
    )
    .bind(HOST.to_string())
    .bind(json!({ "sda": path }).to_string())
    .execute(db.pool())
    .await
    .unwrap();
}

async fn refusals_before_and_after_commit(s: &Site) {
    let (st, m) = s.send("GET", "/v1/machines/m1", None).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(
        (m["active_site"].as_str(), m["direction"].as_str()),
        (Some("home"), Some("forward"))
    );
    s.refused(RP, home(), 409, "protected at home").await;
    run(
        s,
        "/v1/machines/m1/failover",
        json!({"planned": false, "point": point_id("P1"), "target": {"kind": "dir"}}),
    )
    .await;
    s.refused(RP, home(), 409, "needs a failover committed")
        .await;
    run(s, "/v1/machines/m1/commit", Value::Null).await;
    s.refused(
        RP,
        json!({"master_target": "nohost", "disks": {"sda": "/h/sda", "sdb": "/h/sdb"}}),
        400,
        "no recovery host nohost",
    )
    .await;
    work::host_heartbeat(
        &s.db,
        "rh-old",
        NBD,
        1 << 30,
        crate::db::now_s() - 3600,
        None,
    )
    .await
    .unwrap();
    s.refused(
        RP,
        json!({"master_target": "rh-old", "disks": {"sda": "/h/sda", "sdb": "/h/sdb"}}),
        409,
        "recovery host rh-old is not live",
    )
    .await;
    // A master target that cannot reach the store cannot read P nor the rounds.
    work::host_heartbeat(
        &s.db,
        "rh-blind",
        NBD,
        1 << 30,
        crate::db::now_s(),
        Some("get probe/recovery-host: refused"),
    )
    .await
    .unwrap();
    s.refused(
        RP,
        json!({"master_target": "rh-blind", "disks": {"sda": "/h/sda", "sdb": "/h/sdb"}}),
        409,
        "recovery host rh-blind cannot reach the store: get probe/recovery-host: refused",
    )
    .await;
    s.refused(
        RP,
        json!({"master_target": HOST, "disks": {"sda": "/h/sda"}}),
        400,
        "disk sdb of machine m1 has no home disk",
    )
    .await;
    s.refused(
        RP,
        json!({"master_target": HOST, "disks": {"sda": "/h/a", "sdb": "/h/b", "sdc": "/h/c"}}),
        400,
        "machine m1 has no disk sdc",
    )
    .await;
    s.refused(
        RP,
        json!({"master_target": HOST, "disks": {"sda": "h/a", "sdb": "/h/b"}}),
        400,
        "must be absolute",
    )
    .await;
    s.refused(
        RP,
        json!({"master_target": HOST, "disks": {"sda": "/h/a", "sdb": "/h/a"}}),
        400,
        "both name home disk /h/a",
    )
    .await;
    m2_reprotected_onto(&s.db, "/h/shared").await;
    s.refused(
        RP,
        json!({"master_target": HOST, "disks": {"sda": "/h/shared", "sdb": "/h/b"}}),
        409,
        "is disk sda of machine m2",
    )
    .await;
    assert!(state::active_job(&s.db, "m1").await.unwrap().is_none());
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.direction, state::FORWARD);
}

async fn a_refused_sync_fails_the_job_and_a_resume_finishes_it(s: &Site) {
    let too_small = "target /h/sda: is 4096 bytes, smaller than disk sda of m1";
    *s.play.fail_syncs.lock().unwrap() = Some(too_small.into());
    let job = s.post(RP, home(), 202).await;
    let id = job["id"].as_str().unwrap().to_string();
    let job = s.until(&id, JobState::Failed).await;
    let e = job.error.clone().unwrap();
    assert!(
        e.starts_with("task sync home disks: ") && e.contains(too_small),
        "{e}"
    );
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(
        (row.direction.as_str(), row.master_target),
        ("forward", None)
    );

    *s.play.fail_syncs.lock().unwrap() = None;
    s.post(&format!("/v1/jobs/{id}/resume"), json!({}), 200)
        .await;
    let job = s.until(&id, JobState::Succeeded).await;
    assert_eq!(
        names(&job),
        [
            "check reprotect",
            "sync home disks",
            "start reverse replication",
            "apply at home",
            "mark reverse"
        ]
    );
    // One sync item per attempt, on the master target, each disk at its failover
    // point onto its home disk.
    let syncs: Vec<work::WorkRow> = work::for_job(&s.db, &id)
        .await
        .unwrap()
        .into_iter()
        .filter(|w| w.op.kind() == "sync")
        .collect();
    assert_eq!(syncs.len(), 2, "the failed attempt, then a new one");
    let WorkOp::Sync { disks } = &syncs[1].op else {
        panic!("{:?}", syncs[1].op)
    };
    let got: Vec<(&str, &str, &str)> = disks
        .iter()
        .map(|d| (d.disk.as_str(), d.point.as_str(), d.target.as_str()))
        .collect();
    let p1 = point_id("P1");
    assert_eq!(
        got,
        [
            ("sda", p1.as_str(), "/h/sda"),
            ("sdb", p1.as_str(), "/h/sdb")
        ]
    );
    // The sync takes, per disk, the map and segments the point-diff stored from the
    // home map the home-map stored, all three of the new round.
    let items = work::for_job(&s.db, &id).await.unwrap();
    let of_round = |kind: &str| -> Vec<String> {
        items
            .iter()
            .filter(|w| w.op.kind() == kind && w.id.ends_with("-r1"))
            .map(|w| w.id.clone())
            .collect()
    };
    let (maps, diffs) = (of_round("home-map"), of_round("point-diff"));
    assert_eq!((maps.len(), diffs.len()), (1, 1), "{items:?}");
    assert_eq!(
        syncs[1].id,
        format!(
            "{}-sync-r1",
            &maps[0][..maps[0].len() - "-home-map-r1".len()]
        )
    );
    let diff = items.iter().find(|w| w.id == diffs[0]).unwrap();
    let WorkOp::PointDiff { disks: pd } = &diff.op else {
        panic!("{:?}", diff.op)
    };
    assert_eq!(pd[1].home_map, format!("home-{}-sdb", maps[0]));
    let from = disks[1].from.as_ref().unwrap();
    assert_eq!(from.map, format!("point-{}-sdb", diffs[0]));
    assert_eq!(from.segments, 3);
    // The job says what each disk took: the sync's, and the home map put and what
    // its item fetched.
    let synced = job.params["synced"].as_array().unwrap();
    assert_eq!(synced.len(), 2);
    for d in synced {
        assert_eq!(d["bytes_written"], SYNC_BLOCKS_WRITTEN * 4096);
        assert_eq!(d["bytes_fetched"], 10_500);
        assert_eq!(d["bytes_stored"], 700);
        assert_eq!(d["identical"], true);
    }
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.direction, state::REVERSE);
    assert_eq!(row.master_target.as_deref(), Some(HOST));
    assert_eq!(row.home_disks["sdb"], "/h/sdb");
    // The home disks are the user's: never one of the failover's items to remove.
    assert!(!row.items.iter().any(|i| syncs.iter().any(|s| &s.id == i)));
    let (_, m) = s.send("GET", "/v1/machines/m1", None).await;
    assert_eq!(
        (m["active_site"].as_str(), m["direction"].as_str()),
        (Some("recovery"), Some("reverse"))
    );
    assert_eq!(m["recovery"]["master_target"], HOST);
    assert_eq!(m["recovery"]["home_disks"]["sda"], "/h/sda");
    let (_, list) = s.send("GET", "/v1/machines", None).await;
    assert_eq!(list["items"][0]["direction"], "reverse");
    s.refused(RP, home(), 409, "already reprotected").await;
}

async fn an_active_reprotect_holds_its_home_disks(s: &Site) {
    // m3 failed over and committed, its reprotect held running on the host.
    sqlx::query(
        "INSERT INTO machine_recovery (machine, state, active_site, planned, point, items, \
         host, updated_at) VALUES ('m3', 'committed', 'recovery', 0, $1, '[]', $2, 1)",
    )
    .bind(json!({ "sda": point_id("P1") }).to_string())
    .bind(HOST)
    .execute(s.db.pool())
    .await
    .unwrap();
    s.play.hold.store(true, Ordering::SeqCst);
    let job = s
        .post(
            "/v1/machines/m3/reprotect",
            json!({"master_target": HOST, "disks": {"sda": "/h/m3"}}),
            202,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    s.at_task(&id, "sync home disks").await;
    sqlx::query("UPDATE machine_recovery SET direction = 'forward' WHERE machine = 'm1'")
        .execute(s.db.pool())
        .await
        .unwrap();
    s.refused(
        RP,
        json!({"master_target": HOST, "disks": {"sda": "/h/m3", "sdb": "/h/b"}}),
        409,
        &format!("machine m3, whose reprotect job {id} is active"),
    )
    .await;
    s.post(&format!("/v1/jobs/{id}/cancel"), Value::Null, 200)
        .await;
    s.play.hold.store(false, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reprotect_on_sqlite() {
    let s = site(None, true, true).await;
    refusals_before_and_after_commit(&s).await;
    a_refused_sync_fails_the_job_and_a_resume_finishes_it(&s).await;
    an_active_reprotect_holds_its_home_disks(&s).await;
}

/// A runner killed while the master target syncs (its runtime dropped), and another
/// that takes the job over once the lease ran out: it finds the sync item the first
/// gave instead of giving a second, and the machine goes reverse.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_killed_mid_sync_is_taken_over_and_the_reprotect_finishes() {
    let s = site(None, true, false).await;
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
    run(
        &s,
        "/v1/machines/m1/failover",
        json!({"planned": false, "point": point_id("P2"), "target": {"kind": "dir"}}),
    )
    .await;
    run(&s, "/v1/machines/m1/commit", Value::Null).await;
    s.play.hold.store(true, Ordering::SeqCst);
    let job = s.post(RP, home(), 202).await;
    let id = job["id"].as_str().unwrap().to_string();
    s.at_task(&id, "sync home disks").await;
    wait_for("the home-map item", || async {
        s.live_items(&id)
            .await
            .iter()
            .any(|w| w.op.kind() == "home-map")
    })
    .await;
    rt.shutdown_background();
    let runner_b = start_runner(&s.ctx, "cp-b", Duration::from_secs(30)).await;
    s.play.hold.store(false, Ordering::SeqCst);
    let job = s.until(&id, JobState::Succeeded).await;
    runner_b.abort();
    let syncs: Vec<work::WorkRow> = work::for_job(&s.db, &id)
        .await
        .unwrap()
        .into_iter()
        .filter(|w| w.op.kind() == "sync")
        .collect();
    assert_eq!(syncs.len(), 1, "one sync item, found again: {syncs:?}");
    // The whole chain given once: each part found again, none given twice.
    let kinds: Vec<String> = work::for_job(&s.db, &id)
        .await
        .unwrap()
        .into_iter()
        .filter(|w| matches!(w.op.kind(), "home-map" | "point-diff"))
        .map(|w| w.id)
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert_eq!(job.params["synced"].as_array().unwrap().len(), 2);
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.direction, state::REVERSE);
    assert_eq!(row.job_id.as_deref(), Some(id.as_str()));
}
