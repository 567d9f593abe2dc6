//! Failback end to end on the stand-in host (docs/failback.md): reprotect's reverse
//! phase, failback (planned and unplanned), its commit and re-enable; refusals before
//! a job exists, a failed item, and a runner killed mid-failback.

use ferry_link::control::wire::{DiskReport, PointRef, ResyncReport};

use super::*;

const FO: &str = "/v1/machines/m1/failover";

async fn run(s: &Site, path: &str, body: Value) -> Job {
    let job = s.post(path, body, 202).await;
    s.until(job["id"].as_str().unwrap(), JobState::Succeeded)
        .await
}

/// A failback queued and home: waiting for its commit.
async fn failed_back(s: &Site, body: Value) -> Job {
    let job = s.post(FO, body, 202).await;
    s.until(job["id"].as_str().unwrap(), JobState::WaitingForInput)
        .await
}

const COMMIT_TASKS: [&str; 5] = [
    "wait for commit",
    "remove recovery-site copies",
    "remove master target's apply",
    "delete reverse replica",
    "mark failed back",
];

fn names(job: &Job) -> Vec<&str> {
    job.tasks.iter().map(|t| t.name.as_str()).collect()
}

fn items_of(rows: &[work::WorkRow], kind: &str) -> Vec<work::WorkRow> {
    rows.iter()
        .filter(|w| w.op.kind() == kind)
        .cloned()
        .collect()
}

/// m1 failed over (unplanned, at P1, onto `target`), committed and reprotected onto
/// /h/sda and /h/sdb of the host: the reprotect job.
async fn reprotected(s: &Site, target: Value) -> Job {
    run(
        s,
        FO,
        json!({"planned": false, "point": point_id("P1"), "target": target}),
    )
    .await;
    run(s, "/v1/machines/m1/commit", Value::Null).await;
    run(
        s,
        "/v1/machines/m1/reprotect",
        json!({"master_target": HOST, "disks": {"sda": "/h/sda", "sdb": "/h/sdb"}}),
    )
    .await
}

/// Reverse points in the store, as a recovery host's rounds would write them.
fn reverse_points(s: &Site) {
    for (seq, id) in ["P1", "P2"].iter().enumerate() {
        for disk in ["sda", "sdb"] {
            write_point(
                &s.access.store,
                &s.access.vault,
                "m1.reverse",
                disk,
                &point_id(id),
                seq as u64,
            );
        }
    }
}

async fn reverse_objects(s: &Site) -> usize {
    s.access
        .store
        .list("machines/m1.reverse/")
        .await
        .unwrap()
        .len()
}

/// The home agent's heartbeat: every disk `state`, its re-enable resync in `phase`,
/// its newest point uploaded at `at`.
async fn home_agent_beats(s: &Site, state: &str, phase: &str, at: i64) {
    let point = PointRef {
        id: "H1".into(),
        kind: "crash".into(),
        time: chrono::DateTime::from_timestamp(at, 0)
            .unwrap()
            .to_rfc3339(),
    };
    let disks: Vec<DiskReport> = ["sda", "sdb"]
        .iter()
        .map(|d| DiskReport {
            name: d.to_string(),
            size_bytes: SIZE,
            state: state.into(),
            initial_copy_percent: 100.0,
            journal_bytes: 0,
            unacked_bytes: 0,
            newest_point: Some(point.clone()),
            newest_uploaded_point: Some(point.clone()),
            resync: Some(ResyncReport {
                reason: "re-enable".into(),
                phase: phase.into(),
                compared_bytes: SIZE,
                total_bytes: SIZE,
                sent_bytes: 8192,
            }),
        })
        .collect();
    crate::registry::machines::heartbeat(
        &s.db,
        &crate::registry::machines::Beat {
            name: "m1",
            state,
            disks: &disks,
            last_error: None,
            newest_uploaded_at: None,
            group_listen: None,
            now: crate::db::now_s(),
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reprotect_failback_commit_and_re_enable() {
    let s = site(None, true, true).await;
    // Failback of a machine that is not failed over; a direction that is no direction.
    s.refused(FO, json!({"direction": "home"}), 409, "protected at home")
        .await;
    s.refused(FO, json!({"direction": "sideways"}), 400, "sideways")
        .await;
    s.refused(
        FO,
        json!({"direction": "home", "planned": true, "point": "latest"}),
        400,
        "unknown field",
    )
    .await;
    s.refused(
        "/v1/machines/m1/re-enable",
        Value::Null,
        409,
        "re-enable needs",
    )
    .await;

    // Reprotect's reverse phase: a reverse item on the recovery-site host reading the
    // serve item's disks, an apply item on the master target, both live items of the
    // failover, running on after the job.
    let rp = reprotected(&s, json!({"kind": "nbd"})).await;
    assert_eq!(
        names(&rp),
        [
            "check reprotect",
            "sync home disks",
            "start reverse replication",
            "apply at home",
            "mark reverse"
        ]
    );
    let rows = work::for_job(&s.db, &rp.id).await.unwrap();
    let (rev, apply) = (items_of(&rows, "reverse"), items_of(&rows, "apply"));
    assert_eq!((rev.len(), apply.len()), (1, 1), "{rows:?}");
    assert_eq!(
        (rev[0].state.as_str(), apply[0].state.as_str()),
        ("running", "running")
    );
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    let mut serve = None;
    for id in &row.items {
        if work::get(&s.db, id).await.unwrap().unwrap().op.kind() == "serve" {
            serve = Some(id.clone());
        }
    }
    assert!(row.items.contains(&rev[0].id) && row.items.contains(&apply[0].id));
    let WorkOp::Reverse {
        disks,
        interval_s,
        last,
    } = &rev[0].op
    else {
        panic!("{:?}", rev[0].op)
    };
    assert!(!last);
    assert_eq!(*interval_s, 5, "the default policy's point interval");
    let p1 = point_id("P1");
    assert!(disks
        .iter()
        .all(|d| d.over == p1 && d.source.starts_with("item:")));
    assert!(serve.is_some_and(|id| disks[0].source == format!("item:{id}")));
    let WorkOp::Apply {
        disks,
        until,
        verify,
        ..
    } = &apply[0].op
    else {
        panic!("{:?}", apply[0].op)
    };
    assert!(until.is_empty() && !verify);
    let targets: Vec<(&str, &str)> = disks
        .iter()
        .map(|d| (d.disk.as_str(), d.target.as_str()))
        .collect();
    assert_eq!(targets, [("sda", "/h/sda"), ("sdb", "/h/sdb")]);
    // The machine shows its reverse replication: the newest applied point and its age.
    let (_, m) = s.send("GET", "/v1/machines/m1", None).await;
    assert_eq!(m["direction"], "reverse");
    assert_eq!(m["active_site"], "recovery");
    let rev_view = &m["recovery"]["reverse"];
    assert_eq!(rev_view["applied"][0]["point"], "R1-sda");
    let rpo = rev_view["rpo_seconds"].as_f64().unwrap();
    assert!((4.0..60.0).contains(&rpo), "{rpo}");
    // The list too (its page's items read in one query).
    let (_, list) = s.send("GET", "/v1/machines", None).await;
    let listed = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "m1")
        .unwrap();
    assert_eq!(
        listed["recovery"]["reverse"]["applied"][1]["point"],
        "R1-sdb"
    );

    // Planned failback.
    let fb = failed_back(&s, json!({"direction": "home"})).await;
    assert_eq!(fb.kind, "failback");
    assert_eq!(
        names(&fb)[..6],
        [
            "check failback",
            "stop reverse replication",
            "take final point",
            "stop applying",
            "apply final point",
            "mark active at home"
        ]
    );
    assert_eq!(names(&fb)[6..], COMMIT_TASKS);
    assert!(fb
        .prompt
        .as_deref()
        .unwrap()
        .contains("commit its failback"));
    let rows = work::for_job(&s.db, &fb.id).await.unwrap();
    // The continuous items were removed first: one writer at a time.
    for id in [&rev[0].id, &apply[0].id] {
        assert_eq!(
            work::get(&s.db, id).await.unwrap().unwrap().state,
            "removed"
        );
    }
    let last_rev = items_of(&rows, "reverse");
    assert!(matches!(last_rev[0].op, WorkOp::Reverse { last: true, .. }));
    let final_apply = items_of(&rows, "apply");
    let WorkOp::Apply { until, verify, .. } = &final_apply[0].op else {
        panic!()
    };
    let until: Vec<&str> = until.iter().map(|d| d.point.as_str()).collect();
    assert_eq!(until, ["RF-sda", "RF-sdb"]);
    assert!(verify);
    assert_eq!(fb.params["final_points"][1]["point"], "RF-sdb");
    assert_eq!(fb.params["applied"][0]["verified"], true);
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(
        (
            row.state.as_str(),
            row.active_site.as_str(),
            row.direction.as_str()
        ),
        ("committed", "home", "reverse")
    );
    // Nothing unfreezes the recovery-site copy: no cancel from here on.
    s.refused(
        "/v1/machines/m1/cancel",
        Value::Null,
        409,
        "nothing unfreezes",
    )
    .await;
    s.refused(
        &format!("/v1/jobs/{}/cancel", fb.id),
        Value::Null,
        409,
        "no unfreeze",
    )
    .await;
    s.refused(
        FO,
        json!({"direction": "home"}),
        409,
        "one recovery job per machine",
    )
    .await;
    // Resumed only to commit.
    s.refused(
        &format!("/v1/jobs/{}/resume", fb.id),
        json!({"go": 1}),
        400,
        "commit",
    )
    .await;

    // The commit removes everything at the recovery site and the master target's
    // apply, and the reverse replica, listing it all.
    reverse_points(&s);
    let before = reverse_objects(&s).await;
    assert!(before > 0);
    // The commit resumes the failback, which removes it all.
    let c = run(&s, "/v1/machines/m1/commit", Value::Null).await;
    assert_eq!(c.id, fb.id);
    let deleted: Vec<&str> = c.params["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(
        deleted
            .iter()
            .filter(|d| d.starts_with("store: machines/m1.reverse/"))
            .count(),
        before
    );
    assert!(
        deleted.iter().any(|d| d.contains(&last_rev[0].id)),
        "{deleted:?}"
    );
    assert!(
        deleted.iter().any(|d| d.contains(&final_apply[0].id)),
        "{deleted:?}"
    );
    assert_eq!(reverse_objects(&s).await, 0);
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(
        (
            row.state.as_str(),
            row.active_site.as_str(),
            row.direction.as_str()
        ),
        ("failed-back", "home", "forward")
    );
    assert!(row.items.is_empty());
    assert!(s
        .live_items(&fb.id)
        .await
        .iter()
        .all(|w| w.op.kind() == "remove"));
    // Still refused at the process servers until re-enable.
    let fenced = crate::registry::failover::failed_over_machines(&s.db)
        .await
        .unwrap();
    assert_eq!(fenced, ["m1"]);

    // Re-enable: the row goes at once; the job waits for a resynced point.
    let re = s.post("/v1/machines/m1/re-enable", Value::Null, 202).await;
    let re_id = re["id"].as_str().unwrap().to_string();
    s.at_task(&re_id, "wait for home resync").await;
    assert!(state::get(&s.db, "m1").await.unwrap().is_none());
    // A resync under way, then done but no point since the re-enable: waiting.
    home_agent_beats(&s, "resync", "comparing", crate::db::now_s() + 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        s.job(&re_id).await.state,
        JobState::Running,
        "a resync in progress"
    );
    home_agent_beats(&s, "protected", "done", crate::db::now_s() - 3600).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        s.job(&re_id).await.state,
        JobState::Running,
        "no point since"
    );
    home_agent_beats(&s, "protected", "done", crate::db::now_s() + 1).await;
    let re = s.until(&re_id, JobState::Succeeded).await;
    assert_eq!(re.params["resynced"][1]["resync"]["sent_bytes"], 8192);
    assert_eq!(re.params["resync_sent_bytes"], 2 * 8192);
    assert_eq!(re.params["resynced"][0]["state"], "protected");
    assert!(re.params["since"].as_i64().is_some());
    let (_, m) = s.send("GET", "/v1/machines/m1", None).await;
    assert_eq!(
        (m["active_site"].as_str(), m["direction"].as_str()),
        (Some("home"), Some("forward"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_reverse_item_fails_the_reprotect_and_the_machine_stays_forward() {
    let s = site(None, true, true).await;
    run(
        &s,
        FO,
        json!({"planned": false, "point": point_id("P1"), "target": {"kind": "nbd"}}),
    )
    .await;
    run(&s, "/v1/machines/m1/commit", Value::Null).await;
    let gone = "export m1/sda is not served here";
    *s.play.fail_reverses.lock().unwrap() = Some(gone.into());
    let rp = s
        .post(
            "/v1/machines/m1/reprotect",
            json!({"master_target": HOST, "disks": {"sda": "/h/sda", "sdb": "/h/sdb"}}),
            202,
        )
        .await;
    let job = s.until(rp["id"].as_str().unwrap(), JobState::Failed).await;
    let e = job.error.unwrap();
    assert!(
        e.starts_with("task apply at home: reverse item ") && e.contains(gone),
        "{e}"
    );
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.direction, "forward");
    s.refused(
        FO,
        json!({"direction": "home"}),
        409,
        "failback needs a reprotected",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_verify_fails_the_failback_and_a_resume_finishes_it() {
    let s = site(None, true, true).await;
    s.refused(FO, json!({"direction": "home"}), 409, "protected at home")
        .await;
    reprotected(&s, json!({"kind": "dir"})).await;
    let bad = "home disk /h/sda differs from final point RF-sda at block 7";
    *s.play.fail_applies.lock().unwrap() = Some(bad.into());
    let fb = s
        .post(FO, json!({"direction": "home", "planned": true}), 202)
        .await;
    let id = fb["id"].as_str().unwrap().to_string();
    let job = s.until(&id, JobState::Failed).await;
    let e = job.error.clone().unwrap();
    assert!(
        e.starts_with("task apply final point: ") && e.contains(bad),
        "{e}"
    );
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(
        row.active_site, "recovery",
        "not home before the verify passed"
    );
    // The built files are the reverse item's sources.
    let last = items_of(&work::for_job(&s.db, &id).await.unwrap(), "reverse");
    let WorkOp::Reverse { disks, .. } = &last[0].op else {
        panic!()
    };
    assert!(disks[0].source.starts_with("/w/items/") && disks[0].source.ends_with("/sda.raw"));

    *s.play.fail_applies.lock().unwrap() = None;
    s.post(&format!("/v1/jobs/{id}/resume"), json!({}), 200)
        .await;
    s.until(&id, JobState::WaitingForInput).await;
    let applies = items_of(&work::for_job(&s.db, &id).await.unwrap(), "apply");
    assert_eq!(applies.len(), 2, "the failed attempt, then a new one");
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.active_site, "home");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unplanned_failback_applies_the_newest_reverse_point_and_commits_without_the_site() {
    let s = site(None, true, true).await;
    reprotected(&s, json!({"kind": "nbd"})).await;
    reverse_points(&s);
    // The recovery site is lost: its items are on a host not seen for an hour (the
    // stand-in host stays the master target).
    work::host_heartbeat(
        &s.db,
        "rh-lost",
        NBD,
        1 << 30,
        crate::db::now_s() - 3600,
        None,
    )
    .await
    .unwrap();
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    let mut site_items = Vec::new();
    for id in &row.items {
        if work::get(&s.db, id).await.unwrap().unwrap().op.kind() != "apply" {
            site_items.push(id.clone());
        }
    }
    for id in &site_items {
        sqlx::query("UPDATE recovery_work SET host = 'rh-lost' WHERE id = $1")
            .bind(id.clone())
            .execute(s.db.pool())
            .await
            .unwrap();
    }
    sqlx::query("UPDATE machine_recovery SET host = 'rh-lost'")
        .execute(s.db.pool())
        .await
        .unwrap();
    s.refused(FO, json!({"direction": "home"}), 409, "rh-lost is not live")
        .await;
    let fb = failed_back(&s, json!({"direction": "home", "planned": false})).await;
    assert_eq!(
        names(&fb)[..4],
        [
            "check failback",
            "stop applying",
            "apply final point",
            "mark active at home"
        ]
    );
    // Nothing was frozen: this one may be cancelled; its commit is then a job of
    // its own.
    s.post(&format!("/v1/jobs/{}/cancel", fb.id), Value::Null, 200)
        .await;
    s.until(&fb.id, JobState::Cancelled).await;
    // The newest reverse point in the store, not the newest applied.
    let p2 = point_id("P2");
    assert_eq!(fb.params["final_points"][0]["point"], p2.as_str());
    let c = run(&s, "/v1/machines/m1/commit", Value::Null).await;
    assert_eq!(
        (c.kind.as_str(), &names(&c)[..]),
        ("commit", &COMMIT_TASKS[1..])
    );
    let left: Vec<&str> = c.params["left"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(left.len(), site_items.len(), "{left:?}");
    assert!(left.iter().all(|l| l.starts_with("rh-lost: work item ")));
    let deleted = c.params["deleted"].as_array().unwrap();
    assert!(deleted
        .iter()
        .any(|d| d.as_str().unwrap().starts_with("rh1: ")));
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.state, "failed-back");
    assert_eq!(reverse_objects(&s).await, 0);
}

/// A runner killed while the master target applies the final point, and another that
/// takes the job over: it finds the apply item the first gave, and the failback ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_killed_mid_failback_is_taken_over_and_finishes() {
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
    reprotected(&s, json!({"kind": "nbd"})).await;
    *s.play.hold_kind.lock().unwrap() = Some("apply");
    let fb = s.post(FO, json!({"direction": "home"}), 202).await;
    let id = fb["id"].as_str().unwrap().to_string();
    s.at_task(&id, "apply final point").await;
    wait_for("the final apply item", || async {
        items_of(&s.live_items(&id).await, "apply").len() == 1
    })
    .await;
    // Frozen: the job is not cancelled any more.
    s.refused(
        &format!("/v1/jobs/{id}/cancel"),
        Value::Null,
        409,
        "no unfreeze",
    )
    .await;
    rt.shutdown_background();
    let runner_b = start_runner(&s.ctx, "cp-b", Duration::from_secs(30)).await;
    *s.play.hold_kind.lock().unwrap() = None;
    s.until(&id, JobState::WaitingForInput).await;
    let rows = work::for_job(&s.db, &id).await.unwrap();
    assert_eq!(items_of(&rows, "reverse").len(), 1, "found again: {rows:?}");
    assert_eq!(items_of(&rows, "apply").len(), 1);
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.active_site, "home");
    // The commit resumes it under the runner that took it over.
    let c = s.post("/v1/machines/m1/commit", Value::Null, 202).await;
    assert_eq!(c["id"].as_str(), Some(id.as_str()));
    s.until(&id, JobState::Succeeded).await;
    runner_b.abort();
    let row = state::get(&s.db, "m1").await.unwrap().unwrap();
    assert_eq!(row.state, "failed-back");
}
