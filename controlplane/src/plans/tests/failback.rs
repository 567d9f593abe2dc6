//! A plan's reprotect and failback (docs/failback.md): machine jobs group by group;
//! a failback runs the actions whose directions hold `reverse`, with
//! `FERRY_DIRECTION=reverse`.

use std::collections::BTreeMap;

use super::*;

fn home_disks(machines: &[&str]) -> BTreeMap<String, BTreeMap<String, String>> {
    machines
        .iter()
        .map(|m| {
            let disks = BTreeMap::from([("sda".to_string(), format!("/h/{m}-sda"))]);
            (m.to_string(), disks)
        })
        .collect()
}

#[tokio::test]
async fn a_plan_reprotects_then_fails_back_with_the_reverse_actions() {
    let s = site().await;
    for m in ["m1", "m2"] {
        s.machine(m, None).await;
    }
    let log = s._dir.path().join("ran.log");
    let shown = log.display();
    s.plan(json!({"name": "shop", "groups": [
        {"name": "db", "machines": ["m1"],
         "before": [
            {"kind": "script", "name": "forward-only", "timeout_s": 10,
             "directions": ["forward"], "command": format!("echo forward >> {shown}")},
            {"kind": "script", "name": "both", "timeout_s": 10, "command":
             format!("echo \"both $FERRY_DIRECTION $FERRY_FAILOVER_TYPE\" >> {shown}")}]},
        {"name": "app", "machines": ["m2"],
         "after": [{"kind": "script", "name": "home-only", "timeout_s": 10,
             "directions": ["reverse"], "command": format!("echo home >> {shown}")}]}]}))
        .await;

    // Reprotect: each machine's own home disks; a machine left out is refused.
    let op = Operation::Reprotect {
        master_target: "rh-home".into(),
        disks: home_disks(&["m1"]),
    };
    let e = job::enqueue(&s.ctx, "shop", op, None).await.unwrap_err();
    assert!(
        matches!(&e, job::PlanError::BadRequest(m) if m.contains("machine m2 has no home disks")),
        "{e}"
    );
    let op = Operation::Reprotect {
        master_target: "rh-home".into(),
        disks: home_disks(&["m1", "m2"]),
    };
    let job = job::enqueue(&s.ctx, "shop", op, None).await.unwrap();
    assert_eq!(job.kind, "plan-reprotect");
    let names: Vec<&str> = job.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["group db: machines", "group app: machines"]);
    let done = s.until_state(&job.id, JobState::Succeeded).await;
    for (m, c) in s.children(&done).await {
        assert_eq!(c.kind, "reprotect");
        assert_eq!(
            c.params,
            json!({"master_target": "rh-home", "disks": {"sda": format!("/h/{m}-sda")}})
        );
    }
    assert!(lines(&log).is_empty(), "a reprotect runs no action");

    // Failback: the reverse actions, in group order.
    let job = job::enqueue(&s.ctx, "shop", Operation::Failback { planned: true }, None)
        .await
        .unwrap();
    assert_eq!(job.kind, "plan-failback");
    let names: Vec<&str> = job.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "group db: before: both",
            "group db: machines",
            "group app: machines",
            "group app: after: home-only",
        ]
    );
    let done = s.until_state(&job.id, JobState::Succeeded).await;
    assert_eq!(done.params["direction"], "reverse");
    for (_, c) in s.children(&done).await {
        assert_eq!(c.kind, "failback");
        assert_eq!(c.params, json!({"direction": "home", "planned": true}));
    }
    assert_eq!(lines(&log), ["both reverse planned", "home"]);
}

/// A machine whose failback waits for its commit: a plan's commit is queued (it
/// resumes that failback), any other plan operation is refused naming it.
#[tokio::test]
async fn a_plan_commit_is_queued_over_a_failback_waiting_for_its_commit() {
    let s = site_with(None, None, false).await;
    s.machine("m1", None).await;
    s.plan(json!({"name": "shop", "groups": [{"name": "db", "machines": ["m1"]}]}))
        .await;
    s.j.lock().unwrap().hold.insert("m1".into());
    let tasks = ["wait for commit".to_string()];
    let id = queue::enqueue_keyed(
        &s.db,
        "failback",
        "m1",
        Some("recovery/m1"),
        &json!({}),
        &tasks,
    )
    .await
    .unwrap()
    .unwrap();
    let e = job::enqueue(&s.ctx, "shop", Operation::Commit, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("has a failback job active"), "{e}");
    assert!(queue::claim(&s.db, &id, "fake-j", now_ms(), 60_000)
        .await
        .unwrap());
    assert!(queue::task_started(&s.db, &id, "fake-j", 0).await.unwrap());
    assert!(queue::wait_for_input(&s.db, &id, "fake-j", 0, "commit?")
        .await
        .unwrap());
    let e = job::enqueue(&s.ctx, "shop", Operation::Cancel, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("has a failback job active"), "{e}");
    let job = job::enqueue(&s.ctx, "shop", Operation::Commit, None)
        .await
        .unwrap();
    assert_eq!(job.kind, "plan-commit");
}
