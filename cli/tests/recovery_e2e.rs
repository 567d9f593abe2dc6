//! Recovery with real processes: a control plane, a process server, a recovery host
//! and two agents in one replication group, written through NBD with qemu-io.
//!
//! - A recovery plan of two groups (scripts before and after, a manual pause) test-
//!   fails over both machines to NBD at one group point: the scripts run in order,
//!   each disk equals the source at that point, the sources keep making points, and
//!   the cleanup leaves nothing on the recovery host.
//! - A test failover to raw files at a chosen point, the control plane killed (-9)
//!   while it runs: it finishes after the restart, and its cleanup records the verdict.
//! - A planned failover whose last acknowledged write is in the failed-over disk, the
//!   control plane killed while it runs; the source is then read-only; commit.
//! - A planned failover cancelled: the source writes again.
//! - An unplanned failover with the process server killed first; the process server
//!   comes back and the source agent is refused: its disk is read-only.
//! - A recovery plan of two fresh machines: its planned failover, its cancel, and its
//!   commit, the control plane killed -9 in the middle of each; disks equal the sources.
//! - Bad input on the way: a second job on a busy machine, failover of a machine
//!   already failed over, a point that does not exist, cleanup without a test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_testkit::cli::wait_uploaded;
use ferry_testkit::control::{items_left, process_server, recovery_host, Agent, Cp};
use ferry_testkit::net::free_addr;
use ferry_testkit::process::run_ok;
use ferry_testkit::process::Killed;
use ferry_testkit::qemu::qemu_io;
use ferry_testkit::wait_ok;
use rand::SeedableRng;
use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const DISK_BYTES: u64 = 8 << 20;

fn bin() -> &'static Path {
    Path::new(FERRY)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `qemu-img compare` of a recovered disk (NBD URL or file) with a copy of the source.
fn assert_same(recovered: &str, copy: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", recovered, &s(copy)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{recovered} differs from {}: {}{}",
        copy.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The source's disk as it is now, kept as the reference copy `name`.
fn copy_of(agent: &Agent, d: &Path, name: &str) -> PathBuf {
    let to = d.join(name);
    std::fs::copy(&agent.disk, &to).unwrap();
    to
}

/// Whether a qemu-io write through `url` succeeds.
fn write_works(url: &str) -> bool {
    std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 4096", url])
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            o.status.success() && !text.contains("failed")
        })
        .unwrap_or(false)
}

/// The newest group point of `group` both machines hold, made after `after`.
fn group_point_after(cp: &Cp, machines: &[&str], group: &str, after: &str) -> String {
    wait_ok(
        "a group point after the writes",
        Duration::from_secs(60),
        || {
            let mut common: Option<Vec<String>> = None;
            for m in machines {
                let (_, list) = cp.api("GET", &format!("/v1/machines/{m}/points?limit=1000"), None);
                let ids: Vec<String> = list["items"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| p["group"] == json!(group) && p["time"].as_str() > Some(after))
                    .map(|p| p["id"].as_str().unwrap().to_string())
                    .collect();
                common = Some(match common {
                    None => ids,
                    Some(c) => c.into_iter().filter(|i| ids.contains(i)).collect(),
                });
            }
            common.unwrap_or_default().into_iter().max().ok_or(())
        },
    )
}

/// The machine job plan job `id` queued for `machine`, once it is running: the
/// plan is then in the middle of its machines.
fn child_running(cp: &Cp, id: &str, machine: &str) -> String {
    wait_ok(
        &format!("plan job {id}'s job for {machine} running"),
        Duration::from_secs(60),
        || {
            let pj = cp.job(id);
            let child = pj["params"]["children"][machine]
                .as_str()
                .ok_or(pj.clone())?;
            let cj = cp.job(child);
            if cj["state"] == "running" {
                Ok(child.to_string())
            } else {
                Err(cj)
            }
        },
    )
}

/// The site every step works on.
struct Site {
    dir: tempfile::TempDir,
    rng: rand::rngs::StdRng,
    cp: Cp,
    cp_listen: String,
    cp_args: Vec<String>,
    store_url: String,
    ps: Killed,
    rh_dir: PathBuf,
    _rh: Killed,
    m1: Agent,
    m2: Agent,
}

/// Kill -9 of the control plane while job `id` runs (its tasks pause 300 ms each, so
/// it is caught between two), and a start on the same state: the job must go on.
fn kill_cp_while_running(site: &mut Site, id: &str) {
    let state = wait_ok(
        &format!("job {id} running"),
        Duration::from_secs(60),
        || {
            let j = site.cp.job(id);
            match j["state"].as_str() {
                Some("queued") => Err(j),
                Some(s) => Ok(s.to_string()),
                None => Err(j),
            }
        },
    );
    assert_eq!(state, "running", "job {id} was not caught running");
    site.restart_cp();
}

impl Site {
    fn d(&self) -> &Path {
        self.dir.path()
    }

    /// Kill -9 of the control plane, and a start on the same state.
    fn restart_cp(&mut self) {
        self.cp.child.kill();
        let args: Vec<&str> = self.cp_args.iter().map(String::as_str).collect();
        self.cp = Cp::start_with(bin(), &self.d().join("cp"), &self.cp_listen, None, &args);
    }

    /// A control plane (jobs paused 300 ms before each task, so that a test can kill it
    /// between two; leases of 3 s, so that the restart takes its jobs over soon), a
    /// process server, a recovery host, and m1 and m2, one replication group, written
    /// and uploaded.
    fn start() -> Site {
        let seed = ferry_testkit::seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        std::fs::create_dir_all(d.join("store")).unwrap();
        let store_url = format!("file://{}", s(&d.join("store")));
        let key = d.join("vault.key");
        run_ok(bin(), &["keygen", "--out", &s(&key)]);
        let cp_listen = free_addr().to_string();
        let cp_args: Vec<String> = [
            "--store",
            &store_url,
            "--key-file",
            &s(&key),
            "--job-lease-s",
            "3",
            "--job-step-delay-ms",
            "300",
            "--jobs-at-once",
            "8",
        ]
        .map(str::to_string)
        .to_vec();
        let args: Vec<&str> = cp_args.iter().map(String::as_str).collect();
        let cp = Cp::start_with(bin(), &d.join("cp"), &cp_listen, None, &args);
        let (st, p) = cp.api(
            "PATCH",
            "/v1/policies/default",
            Some(json!({ "crash_point_interval_s": 1.0 })),
        );
        assert_eq!(st, 200, "{p}");
        let (ps, _) = process_server(&cp, &d, "ps1", &store_url, None);
        let rh_dir = d.join("rh1");
        let (rh, _) = recovery_host(&cp, &rh_dir, "rh1", &store_url, &key, None);
        let group = || vec!["--group-listen".to_string(), free_addr().to_string()];
        let m1 = Agent::enroll_with(&cp, &d, "m1", DISK_BYTES, &mut rng, &group());
        let m2 = Agent::enroll_with(&cp, &d, "m2", DISK_BYTES, &mut rng, &group());
        for m in ["m1", "m2"] {
            let (st, v) = cp.api(
                "PATCH",
                &format!("/v1/machines/{m}"),
                Some(json!({"group": "g1"})),
            );
            assert_eq!(st, 200, "{v}");
        }
        let mut site = Site {
            dir,
            rng,
            cp,
            cp_listen,
            cp_args,
            store_url,
            ps,
            rh_dir,
            _rh: rh,
            m1,
            m2,
        };
        // Points only once the initial copies are done.
        wait_uploaded(bin(), &site.m1.sock);
        wait_uploaded(bin(), &site.m2.sock);
        site.m1.write_and_point(bin(), &mut site.rng, "first");
        site.m2.write_and_point(bin(), &mut site.rng, "first");
        wait_uploaded(bin(), &site.m1.sock);
        wait_uploaded(bin(), &site.m2.sock);
        site
    }

    fn assert_host_empty(&self) {
        wait_ok(
            "the recovery host holds nothing",
            Duration::from_secs(30),
            || {
                let left = items_left(&self.rh_dir);
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(left)
                }
            },
        );
    }
}

#[test]
fn recovery_end_to_end() {
    let mut site = Site::start();
    a_plan_of_two_groups_is_drilled_through_a_control_plane_kill(&mut site);
    test_failover_of_a_group_to_nbd(&mut site);
    test_failover_to_files_through_a_control_plane_kill(&mut site);
    planned_failover_then_commit(&mut site);
    planned_failover_cancelled(&mut site);
    unplanned_failover_and_the_source_refused(&mut site);
    a_plans_failover_cancel_and_commit_through_control_plane_kills(&mut site);
}

/// A recovery plan of two groups (a script before the first on the control plane, one
/// after it on the recovery host, a manual pause before the second, a script after
/// it) test-fails both machines over to NBD at one group point, the control plane
/// killed (-9) while the plan job runs: the scripts ran in order, each disk is the
/// source at that point, and the cleanup leaves nothing.
fn a_plan_of_two_groups_is_drilled_through_a_control_plane_kill(site: &mut Site) {
    let quiet_since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let d = site.d().to_path_buf();
    let m1_copy = copy_of(&site.m1, &d, "m1.plan-copy");
    let m2_copy = copy_of(&site.m2, &d, "m2.plan-copy");
    let gp = group_point_after(&site.cp, &["m1", "m2"], "g1", &quiet_since);
    let order = d.join("order.log");
    let append = |what: &str| {
        format!(
            "echo \"{what} $FERRY_GROUP $FERRY_FAILOVER_TYPE $FERRY_DIRECTION\" >> {}",
            s(&order)
        )
    };
    let plan = json!({
        "name": "app",
        "max_parallel": 2,
        "groups": [
            {"name": "db", "machines": ["m1"],
             "before": [{"kind": "script", "name": "stop-app", "command": append("db-before"),
                         "timeout_s": 30, "run_on": "control-plane"}],
             "after": [{"kind": "script", "name": "check-db", "command": append("db-after"),
                        "timeout_s": 30, "run_on": "recovery-host:rh1"}]},
            {"name": "web", "machines": ["m2"],
             "before": [{"kind": "manual", "name": "look", "text": "check the database"}],
             "after": [{"kind": "script", "name": "start-web", "command": append("web-after"),
                        "timeout_s": 30, "run_on": "control-plane"}]}
        ]
    });
    let (st, v) = site.cp.api("POST", "/v1/recovery-plans", Some(plan));
    assert_eq!(st, 201, "{v}");
    // A plan naming a machine nobody knows.
    let (st, v) = site.cp.api(
        "POST",
        "/v1/recovery-plans",
        Some(json!({"name": "bad", "groups": [{"name": "g", "machines": ["nobody"]}]})),
    );
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("nobody"), "{v}");
    let pj = site.cp.post(
        "/v1/recovery-plans/app/test-failover",
        json!({"point": "latest-group", "target": {"kind": "nbd"}}),
    );
    let pj_id = pj["id"].as_str().unwrap().to_string();
    kill_cp_while_running(site, &pj_id);
    let cp = &site.cp;
    let waiting = cp.wait_job(&pj_id, "waiting-for-input");
    assert!(
        waiting["prompt"]
            .as_str()
            .unwrap_or("")
            .contains("check the database"),
        "{waiting}"
    );
    let ran = std::fs::read_to_string(&order).unwrap();
    assert_eq!(
        ran.lines().collect::<Vec<_>>(),
        ["db-before db test forward", "db-after db test forward"],
        "{ran}"
    );
    cp.post(&format!("/v1/jobs/{pj_id}/resume"), json!({}));
    wait_ok(
        "the plan waits for its cleanup",
        Duration::from_secs(120),
        || {
            let j = cp.job(&pj_id);
            let prompt = j["prompt"].as_str().unwrap_or("").to_string();
            assert!(j["state"] != "failed", "{j}");
            if j["state"] == "waiting-for-input" && prompt.contains("verdict") {
                Ok(())
            } else {
                Err(j)
            }
        },
    );
    let ran = std::fs::read_to_string(&order).unwrap();
    assert_eq!(ran.lines().count(), 3, "{ran}");
    assert_eq!(
        ran.lines().last(),
        Some("web-after web test forward"),
        "{ran}"
    );
    // Each machine's test disk is the source at the group point.
    let (_, tests) = cp.api("GET", "/v1/jobs?state=waiting-for-input&limit=1000", None);
    let mut seen = 0;
    for j in tests["items"].as_array().unwrap() {
        if j["kind"] != "test-failover" {
            continue;
        }
        for disk in j["disks"].as_array().unwrap() {
            assert_eq!(disk["point"], json!(gp), "{j}");
            let copy = if disk["machine"] == "m1" {
                &m1_copy
            } else {
                &m2_copy
            };
            assert_same(disk["nbd_url"].as_str().unwrap(), copy);
            seen += 1;
        }
    }
    assert_eq!(seen, 2, "{tests}");
    cp.post(
        "/v1/recovery-plans/app/test-failover-cleanup",
        json!({"verdict": "passed", "notes": "both up"}),
    );
    cp.wait_job(&pj_id, "succeeded");
    site.assert_host_empty();
}

/// Both machines at one group point, each disk the source at that point; replication
/// goes on meanwhile; cleanup leaves nothing.
fn test_failover_of_a_group_to_nbd(site: &mut Site) {
    let quiet_since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let d = site.d().to_path_buf();
    let m1_copy = copy_of(&site.m1, &d, "m1.copy");
    let m2_copy = copy_of(&site.m2, &d, "m2.copy");
    let cp = &site.cp;
    let gp = group_point_after(cp, &["m1", "m2"], "g1", &quiet_since);
    let mut jobs = Vec::new();
    for m in ["m1", "m2"] {
        let j = cp.post(
            &format!("/v1/machines/{m}/test-failover"),
            json!({"point": "latest-group", "target": {"kind": "nbd"}}),
        );
        jobs.push(j["id"].as_str().unwrap().to_string());
    }
    for (id, copy) in jobs.iter().zip([&m1_copy, &m2_copy]) {
        let up = cp.wait_job(id, "waiting-for-input");
        let disk = &up["disks"][0];
        assert_eq!(disk["point"], json!(gp), "{up}");
        assert_same(disk["nbd_url"].as_str().unwrap(), copy);
    }
    // Replication goes on during the test: a new point is made and uploaded.
    site.m1.write_and_point(bin(), &mut site.rng, "during-test");
    wait_uploaded(bin(), &site.m1.sock);
    let cp = &site.cp;
    for m in ["m1", "m2"] {
        cp.post(
            &format!("/v1/machines/{m}/test-failover-cleanup"),
            json!({"verdict": "passed", "notes": "up"}),
        );
    }
    for id in &jobs {
        cp.wait_job(id, "succeeded");
    }
    site.assert_host_empty();
}

/// A test failover to raw files at a chosen point, the control plane killed while it
/// runs: it finishes after the restart, and its cleanup records the verdict.
fn test_failover_to_files_through_a_control_plane_kill(site: &mut Site) {
    let (point, want) = site.m1.expected.last().cloned().unwrap();
    let want_file = site.d().join("m1.at-point");
    std::fs::write(&want_file, &want).unwrap();
    let tj = site.cp.post(
        "/v1/machines/m1/test-failover",
        json!({"point": point, "target": {"kind": "dir", "format": "raw"}}),
    );
    let tj_id = tj["id"].as_str().unwrap().to_string();
    // One recovery job per machine.
    let (st, v) = site.cp.api(
        "POST",
        "/v1/machines/m1/failover",
        Some(json!({"planned": true, "target": {"kind": "nbd"}})),
    );
    assert_eq!(st, 409, "{v}");
    kill_cp_while_running(site, &tj_id);
    let cp = &site.cp;
    let up = cp.wait_job(&tj_id, "waiting-for-input");
    let disk = &up["disks"][0];
    assert_eq!(disk["point"], json!(point), "{up}");
    let path = disk["path"].as_str().unwrap().to_string();
    assert_same(&path, &want_file);
    // A test failover is not cancelled: that would leave its disks.
    let (st, v) = cp.api("POST", &format!("/v1/jobs/{tj_id}/cancel"), None);
    assert_eq!(st, 409, "{v}");
    cp.post(
        "/v1/machines/m1/test-failover-cleanup",
        json!({"verdict": "failed", "notes": "app did not start"}),
    );
    let done = cp.wait_job(&tj_id, "succeeded");
    assert_eq!(done["params"]["verdict"], "failed", "{done}");
    assert!(done.to_string().contains("app did not start"), "{done}");
    assert!(!Path::new(&path).exists(), "{path} is left");
    site.assert_host_empty();
    // Cleanup of a machine with no test failover waiting.
    let (st, v) = cp.api(
        "POST",
        "/v1/machines/m1/test-failover-cleanup",
        Some(json!({"verdict": "passed"})),
    );
    assert_eq!(st, 409, "{v}");
    // A point that does not exist.
    let (st, v) = cp.api(
        "POST",
        "/v1/machines/m1/test-failover",
        Some(json!({"point": "p999999", "target": {"kind": "nbd"}})),
    );
    assert_eq!(st, 400, "{v}");
}

/// A planned failover whose last acknowledged write is in the failed-over disk, the
/// control plane killed while it runs; the source is read-only after; commit.
fn planned_failover_then_commit(site: &mut Site) {
    qemu_io(&site.m1.nbd(), &["write -P 0x7e 4096 65536"]);
    let fj = site.cp.post(
        "/v1/machines/m1/failover",
        json!({"planned": true, "target": {"kind": "nbd"}}),
    );
    let fj_id = fj["id"].as_str().unwrap().to_string();
    site.cp.wait_job(&fj_id, "running");
    std::thread::sleep(Duration::from_millis(700));
    site.restart_cp();
    let cp = &site.cp;
    let failed_over = cp.wait_job(&fj_id, "succeeded");
    // The source stopped writing when the failover began: its disk is the final point.
    assert!(
        !write_works(&site.m1.nbd()),
        "the source still takes writes"
    );
    let final_copy = copy_of(&site.m1, site.d(), "m1.final");
    let url = failed_over["disks"][0]["nbd_url"]
        .as_str()
        .unwrap()
        .to_string();
    assert_same(&url, &final_copy);
    let machine = cp.machine("m1");
    assert_eq!(machine["recovery"]["state"], "failed-over", "{machine}");
    assert_eq!(machine["recovery"]["active_site"], "recovery", "{machine}");
    // Failover of a machine already failed over.
    let (st, v) = cp.api(
        "POST",
        "/v1/machines/m1/failover",
        Some(json!({"planned": false, "target": {"kind": "nbd"}})),
    );
    assert_eq!(st, 409, "{v}");
    // Fail over again, to m1's first point, the control plane killed meanwhile.
    let (first, first_disk) = site.m1.expected[0].clone();
    let first_file = site.d().join("m1.first");
    std::fs::write(&first_file, &first_disk).unwrap();
    let xj = cp.post(
        "/v1/machines/m1/change-point",
        json!({"point": first, "target": {"kind": "nbd"}}),
    );
    let xj_id = xj["id"].as_str().unwrap().to_string();
    kill_cp_while_running(site, &xj_id);
    let cp = &site.cp;
    let changed = cp.wait_job(&xj_id, "succeeded");
    let new_url = changed["disks"][0]["nbd_url"].as_str().unwrap().to_string();
    assert_eq!(changed["disks"][0]["point"], json!(first), "{changed}");
    assert_same(&new_url, &first_file);
    // Commit, the control plane killed meanwhile.
    let cj = cp.post("/v1/machines/m1/commit", json!({}));
    let cj_id = cj["id"].as_str().unwrap().to_string();
    kill_cp_while_running(site, &cj_id);
    let cp = &site.cp;
    cp.wait_job(&cj_id, "succeeded");
    assert_eq!(cp.machine("m1")["recovery"]["state"], "committed");
    // No cancel once committed.
    let (st, v) = cp.api("POST", "/v1/machines/m1/cancel", Some(json!({})));
    assert_eq!(st, 409, "{v}");
}

/// A planned failover cancelled: what it brought up is removed, the source writes again.
fn planned_failover_cancelled(site: &mut Site) {
    let cp = &site.cp;
    let fj = cp.post(
        "/v1/machines/m2/failover",
        json!({"planned": true, "target": {"kind": "nbd"}}),
    );
    cp.wait_job(fj["id"].as_str().unwrap(), "succeeded");
    assert!(!write_works(&site.m2.nbd()));
    let xj = cp.post("/v1/machines/m2/cancel", json!({}));
    let xj_id = xj["id"].as_str().unwrap().to_string();
    kill_cp_while_running(site, &xj_id);
    let cp = &site.cp;
    cp.wait_job(&xj_id, "succeeded");
    assert_eq!(cp.machine("m2")["recovery"], Value::Null);
    let url = site.m2.nbd();
    wait_ok("m2 writes again", Duration::from_secs(30), || {
        if write_works(&url) {
            Ok(())
        } else {
            Err(())
        }
    });
    // Lifted from read-only (if the order that the failover completed reached it
    // before the cancel), the agent dropped its journal and compares its disk with
    // the replica: no point until that is done. Lifted from held, none runs.
    wait_ok("m2's resync done, if any", Duration::from_secs(60), || {
        let st = ferry_testkit::cli::status(bin(), &site.m2.sock);
        if st["resync"].is_null() {
            Ok(())
        } else {
            Err(st)
        }
    });
    site.m2
        .write_and_point(bin(), &mut site.rng, "after-cancel");
    wait_uploaded(bin(), &site.m2.sock);
}

/// An unplanned failover with the process server and the source gone; they come back,
/// and the source is refused: its disk is read-only.
fn unplanned_failover_and_the_source_refused(site: &mut Site) {
    let m2_last = copy_of(&site.m2, site.d(), "m2.last");
    site.ps.kill();
    site.m2.child.kill();
    let uj = site.cp.post(
        "/v1/machines/m2/failover",
        json!({"planned": false, "point": "latest", "target": {"kind": "nbd"}}),
    );
    let up = site.cp.wait_job(uj["id"].as_str().unwrap(), "succeeded");
    assert_same(up["disks"][0]["nbd_url"].as_str().unwrap(), &m2_last);
    let d = site.d().to_path_buf();
    let (ps, _) = process_server(&site.cp, &d, "ps1", &site.store_url, None);
    site.ps = ps;
    site.m2.restart(&site.cp, &d);
    let url = site.m2.nbd();
    wait_ok("m2's source is read-only", Duration::from_secs(60), || {
        if write_works(&url) {
            Err(())
        } else {
            Ok(())
        }
    });
    let status = ferry_testkit::cli::status(bin(), &site.m2.sock);
    assert!(status.to_string().contains("read-only"), "{status}");
}

/// A recovery plan of two fresh machines (m3, m4: the others are failed over by
/// now) in one group: its planned failover, the plan's cancel of it, and (failed
/// over again) its commit, the control plane killed -9 in the middle of each plan
/// job (while a machine job of it runs). Each ends as it would have: both sources
/// stopped and their disks, served from the replica, equal to the sources' final
/// point; after the cancel both write again; after the commit both stay failed over.
fn a_plans_failover_cancel_and_commit_through_control_plane_kills(site: &mut Site) {
    let d = site.d().to_path_buf();
    let agents: Vec<Agent> = ["m3", "m4"]
        .iter()
        .map(|m| Agent::enroll(&site.cp, &d, m, DISK_BYTES, &mut site.rng))
        .collect();
    for a in &agents {
        wait_uploaded(bin(), &a.sock);
    }
    let plan = json!({"name": "pair", "max_parallel": 2,
        "groups": [{"name": "both", "machines": ["m3", "m4"]}]});
    let (st, v) = site.cp.api("POST", "/v1/recovery-plans", Some(plan));
    assert_eq!(st, 201, "{v}");
    let failover = |site: &mut Site, kill: bool| {
        let pj = site.cp.post(
            "/v1/recovery-plans/pair/failover",
            json!({"planned": true, "target": {"kind": "nbd"}}),
        );
        let id = pj["id"].as_str().unwrap().to_string();
        if kill {
            child_running(&site.cp, &id, "m4");
            site.restart_cp();
        }
        let done = site.cp.wait_job(&id, "succeeded");
        for a in &agents {
            assert!(!write_works(&a.nbd()), "{} still takes writes", a.name);
            let m = site.cp.machine(&a.name);
            assert_eq!(m["recovery"]["state"], "failed-over", "{m}");
            let child = site
                .cp
                .job(done["params"]["children"][&a.name].as_str().unwrap());
            assert_eq!(child["state"], "succeeded", "{child}");
            let url = child["disks"][0]["nbd_url"].as_str().unwrap().to_string();
            let final_copy = copy_of(a, &d, &format!("{}.final", a.name));
            assert_same(&url, &final_copy);
        }
        done
    };
    failover(site, true);
    // The plan's cancel, killed while its machines' cancels run: both write again.
    let xj = site.cp.post("/v1/recovery-plans/pair/cancel", json!({}));
    let xj_id = xj["id"].as_str().unwrap().to_string();
    child_running(&site.cp, &xj_id, "m3");
    site.restart_cp();
    site.cp.wait_job(&xj_id, "succeeded");
    for a in &agents {
        assert_eq!(site.cp.machine(&a.name)["recovery"], Value::Null);
        let url = a.nbd();
        wait_ok(
            &format!("{} writes again", a.name),
            Duration::from_secs(30),
            || if write_works(&url) { Ok(()) } else { Err(()) },
        );
    }
    // m1 and m2 are still failed over there: only m3's and m4's items must be gone.
    wait_ok(
        "the recovery host holds nothing of m3 and m4",
        Duration::from_secs(30),
        || {
            let left: Vec<String> = items_left(&site.rh_dir)
                .into_iter()
                .filter(|i| i.ends_with("-m3") || i.ends_with("-m4"))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(left)
            }
        },
    );
    // Failed over again (no kill), then the commit, killed while it runs.
    let done = failover(site, false);
    let cj = site.cp.post("/v1/recovery-plans/pair/commit", json!({}));
    let cj_id = cj["id"].as_str().unwrap().to_string();
    child_running(&site.cp, &cj_id, "m3");
    site.restart_cp();
    site.cp.wait_job(&cj_id, "succeeded");
    for a in &agents {
        let m = site.cp.machine(&a.name);
        assert_eq!(m["recovery"]["state"], "committed", "{m}");
        // Committed, its disks are still the final point.
        let child = site
            .cp
            .job(done["params"]["children"][&a.name].as_str().unwrap());
        let url = child["disks"][0]["nbd_url"].as_str().unwrap().to_string();
        assert_same(&url, &d.join(format!("{}.final", a.name)));
    }
}
