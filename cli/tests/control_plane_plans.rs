//! `ferry cp plans` against a real control plane: a plan created from a file, listed
//! and shown; a plan naming an unknown machine refused; a test failover run from the
//! command line (its script run by the control plane, with the plan's environment),
//! then cleaned up with a verdict; the plan deleted.

use std::path::Path;
use std::time::Duration;

use ferry_testkit::control::Cp;
use ferry_testkit::net::free_addr;
use ferry_testkit::process::run;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_ferry");

/// `ferry cp ARGS` as the admin, which must fail; its stderr.
fn cli_fails(cp: &Cp, args: &[&str]) -> String {
    let (url, tf, ca) = (
        cp.url.clone(),
        cp.token_file.display().to_string(),
        cp.ca.display().to_string(),
    );
    let mut all = vec!["cp", "--url", &url, "--token-file", &tf, "--ca", &ca];
    all.extend_from_slice(args);
    let out = run(Path::new(BIN), &all);
    assert!(!out.status.success(), "ferry {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn job_until(cp: &Cp, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (st, job) = cp.api("GET", &format!("/v1/jobs/{id}"), None);
        assert_eq!(st, 200, "{job}");
        if cond(&job) {
            return job;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {job:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn plans_are_created_listed_shown_run_and_deleted_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = Cp::start(
        Path::new(BIN),
        &tmp.path().join("cp"),
        &free_addr().to_string(),
        None,
    );
    let out = tmp.path().join("ran.txt");
    let plan = json!({"name": "drill", "groups": [
        {"name": "web", "machines": [], "before": [{"kind": "script", "name": "note",
            "timeout_s": 30, "command": format!(
                "echo \"$FERRY_PLAN $FERRY_GROUP $FERRY_FAILOVER_TYPE $FERRY_DIRECTION\" >> {}",
                out.display())}]},
        {"name": "app", "machines": [], "after": [{"kind": "manual", "name": "look",
            "text": "open the shop", "failover_types": ["planned"]}]}]});
    let file = tmp.path().join("plan.json");
    std::fs::write(&file, plan.to_string()).unwrap();
    let f = file.display().to_string();
    let created = cp.cli(&["plans", "create", "--file", &f]);
    assert!(
        created.contains("drill") && created.contains("note"),
        "{created}"
    );

    // A plan naming a machine the control plane does not know: refused, named.
    let mut ghost = plan.clone();
    ghost["name"] = json!("ghostly");
    ghost["groups"][0]["machines"] = json!(["ghost"]);
    let gfile = tmp.path().join("ghost.json");
    std::fs::write(&gfile, ghost.to_string()).unwrap();
    let g = gfile.display().to_string();
    let err = cli_fails(&cp, &["plans", "create", "--file", &g]);
    assert!(
        err.contains("400") && err.contains("no machine ghost"),
        "{err}"
    );

    let list = cp.cli(&["plans", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(
        lines[0].starts_with("NAME") && lines[1].starts_with("drill"),
        "{list}"
    );
    let shown = cp.cli(&["plans", "show", "drill"]);
    assert!(
        shown.contains("web") && shown.contains("app") && shown.contains("look"),
        "{shown}"
    );
    let json: Value = serde_json::from_str(&cp.cli(&["--json", "plans", "show", "drill"])).unwrap();
    assert_eq!(json["max_parallel"], 4);
    assert_eq!(
        json["groups"][1]["after"][0]["failover_types"],
        json!(["planned"])
    );

    // A test failover from the command line: the script runs on the control plane;
    // the planned-only manual action is not a task.
    let started: Value = serde_json::from_str(&cp.cli(&[
        "--json",
        "plans",
        "test-failover",
        "drill",
        "--target",
        "raw",
    ]))
    .unwrap();
    assert_eq!(started["kind"], "plan-test-failover");
    let id = started["id"].as_str().unwrap().to_string();
    let tasks: Vec<&str> = started["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        tasks,
        [
            "group web: before: note",
            "group web: machines",
            "group app: machines",
            "wait for cleanup",
            "group app: clean up",
            "group web: clean up",
        ]
    );
    job_until(&cp, &id, "waiting for cleanup", |j| {
        j["state"] == "waiting-for-input"
    });
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "drill web test forward\n"
    );
    // One job per plan at a time.
    let err = cli_fails(&cp, &["plans", "failover", "drill", "--unplanned"]);
    assert!(err.contains("409") && err.contains(&id), "{err}");
    let cleaned = cp.cli(&[
        "plans",
        "test-failover-cleanup",
        "drill",
        "--verdict",
        "passed",
        "--notes",
        "fine",
    ]);
    assert!(cleaned.contains(&id), "{cleaned}");
    job_until(&cp, &id, "succeeded", |j| j["state"] == "succeeded");

    let deleted = cp.cli(&["plans", "delete", "drill"]);
    assert!(deleted.contains("plan drill deleted"), "{deleted}");
    assert_eq!(cp.cli(&["plans", "list"]).lines().count(), 1);
}
