//! Several `ferry control-plane` processes serving one site (docs/control-plane.md,
//! "Running it highly available"): one site CA for all of them, and on PostgreSQL,
//! two control planes with an enrolled process server and agent given both URLs,
//! one of them killed with -9 in the middle of a job and of heartbeats.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::Utc;
use ferry_agent::{seed, SeedOptions};
use ferry_replica::{Store, VaultKey};
use ferry_testkit::control::client_trusting;
use ferry_testkit::net::free_addr;
use ferry_testkit::process::{run, spawn_logging, Killed};
use ferry_testkit::wait::wait_for;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A control plane started as a process, its log (control plane at info) in a file.
struct Cp {
    child: Killed,
    url: String,
    dir: PathBuf,
    log: PathBuf,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Cp {
    fn args(dir: &Path, database: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "control-plane",
            "--state-dir",
            &s(dir),
            "--listen",
            "127.0.0.1:0",
            "--database",
            database,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        a.extend(extra.iter().map(|a| a.to_string()));
        a
    }

    fn start(dir: &Path, database: &str, extra: &[&str]) -> Cp {
        let log = dir.with_extension("log");
        let mut cmd = std::process::Command::new(FERRY);
        cmd.args(Cp::args(dir, database, extra))
            .env("FERRY_LOG", "warn,ferry_controlplane=info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let child = Killed(child);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        let url = line.trim().to_string();
        assert!(
            url.starts_with("https://"),
            "{line:?}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Cp {
            child,
            url,
            dir: dir.to_path_buf(),
            log,
            // The site CA of the control plane's own directory: the same file for
            // every control plane of the site.
            http: client_trusting(&std::fs::read(dir.join("ca.pem")).unwrap()),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// The `owner` its job runner and leases go by: `cp-PID-...`.
    fn owner_prefix(&self) -> String {
        format!("cp-{}-", self.child.0.id())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` as the site's admin; status and JSON.
    fn get(&self, path: &str) -> (u16, Value) {
        self.get_at(&self.url, path)
    }

    /// GET `path` from the control plane at `url`, with this one's CA and admin token.
    fn get_at(&self, url: &str, path: &str) -> (u16, Value) {
        let token = std::fs::read_to_string(self.dir.join("admin.token")).unwrap();
        let req = self
            .http
            .get(format!("{url}{path}"))
            .bearer_auth(token.trim());
        self.rt.block_on(async {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        })
    }

    fn get_ok(&self, path: &str) -> Value {
        let (status, v) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// A one-time enrollment token from `ferry cp tokens create`.
    fn enroll_token(&self, kind: &str) -> String {
        let out = run(
            Path::new(FERRY),
            &[
                "cp",
                "--url",
                &self.url,
                "--token-file",
                &s(&self.dir.join("admin.token")),
                "--ca",
                &s(&self.dir.join("ca.pem")),
                "tokens",
                "create",
                "--for",
                kind,
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines().last().unwrap().trim().to_string()
    }
}

fn fails(args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(Path::new(FERRY), &args);
    assert!(!out.status.success(), "ferry {args:?} started");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// On one database (an SQLite file here: the check is the same on PostgreSQL), a
/// second control plane must hold the first one's CA: without it, it refuses naming
/// what to copy and keeps nothing it made; with `--join` it serves, its own server
/// certificate chaining to the site CA; one with another site's CA is refused.
#[test]
fn a_second_control_plane_holds_the_site_ca_or_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}?mode=rwc", tmp.path().join("site.db").display());
    let dir_a = tmp.path().join("cp-a");
    let a = Cp::start(&dir_a, &database, &[]);

    let dir_b = tmp.path().join("cp-b");
    let e = fails(&Cp::args(&dir_b, &database, &[]));
    assert!(e.contains("already serves a site"), "{e}");
    assert!(
        e.contains("from the state directory of a control plane of that site"),
        "{e}"
    );
    for what in ["ca.pem", "ca.key", "admin.token", "--join"] {
        assert!(e.contains(what), "{what}: {e}");
    }
    assert!(
        !dir_b.join("ca.key").exists() && !dir_b.join("ca.pem").exists(),
        "no second CA made"
    );

    let b = Cp::start(&dir_b, &database, &["--join", &s(&dir_a)]);
    let ca = |d: &Path| std::fs::read_to_string(d.join("ca.pem")).unwrap();
    assert_eq!(ca(&dir_a), ca(&dir_b));
    assert_ne!(
        std::fs::read_to_string(dir_a.join("server.pem")).unwrap(),
        std::fs::read_to_string(dir_b.join("server.pem")).unwrap(),
        "each keeps its own server certificate"
    );
    // A client of the first one's ca.pem and admin token talks to the second.
    let (status, _) = a.get("/v1/machines");
    assert_eq!(status, 200);
    let (status, v) = a.get_at(&b.url, "/v1/machines");
    assert_eq!(status, 200, "{v}");
    drop(b);
    // A restart needs no --join any more.
    let _b = Cp::start(&dir_b, &database, &[]);

    // A state directory of another site (its own CA) is refused, and kept.
    let other = tempfile::tempdir().unwrap();
    let dir_c = other.path().join("cp-c");
    let lone = Cp::start(
        &dir_c,
        &format!("sqlite://{}?mode=rwc", other.path().join("c.db").display()),
        &[],
    );
    drop(lone);
    let before = ca(&dir_c);
    let e = fails(&Cp::args(&dir_c, &database, &[]));
    assert!(
        e.contains("the site CA that database") && e.contains("ca.pem"),
        "{e}"
    );
    assert_eq!(ca(&dir_c), before, "its CA kept as it was");
    let e = fails(&Cp::args(&dir_c, &database, &["--join", &s(&dir_a)]));
    assert!(e.contains("another site"), "{e}");
}

/// Seeds `machine/disk` in the store from a random 1 MiB image, stamped now.
fn seed_point(store: &str, key: &Path, machine: &str, disk: &str, n: u64, tmp: &Path) {
    let image = tmp.join(format!("{machine}-{disk}.img"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(n);
    let mut bytes = vec![0u8; 1 << 20];
    rng.fill(&mut bytes[..]);
    std::fs::write(&image, &bytes).unwrap();
    let opts = SeedOptions {
        machine,
        disk,
        image: &image,
        label: Some(format!("n{n}")),
        time: Utc::now(),
        workers: 0,
        orphan_grace: ferry_replica::grace::ORPHAN_GRACE,
    };
    let store = Store::open(store).unwrap();
    seed(&store, &VaultKey::load(key).unwrap(), &opts, &|_| {}).unwrap();
}

fn task_states(job: &Value) -> Vec<String> {
    job["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap().to_string())
        .collect()
}

/// Two control planes on one PostgreSQL, a process server and an agent enrolled
/// with both URLs (the one that runs the job first). That one is killed with -9
/// between two tasks of a retention job while heartbeats flow: the other takes the
/// job over once its lease runs out and finishes it, each task run once and one
/// end recorded; the process server and agent move to the other URL at their next
/// heartbeat, and their health stays normal throughout.
#[test]
fn killing_one_of_two_control_planes_loses_no_job_and_no_heartbeat() {
    // Declared first: dropped last, after the processes that use it.
    let Some(db) = ferry_testkit::postgres::fresh("ferry_ha", "two control planes") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = format!("file://{}/store", t.display());
    let key = t.join("vault.key");
    VaultKey::generate().save_new(&key).unwrap();
    // A machine of the store with three disks: a retention job of three tasks.
    for (i, d) in ["d0", "d1", "d2"].iter().enumerate() {
        seed_point(&store, &key, "archive", d, i as u64, t);
    }
    // A pause before each task (the kill falls between two), short leases, one job
    // at a time.
    let flags = [
        "--store",
        &store,
        "--key-file",
        &s(&key),
        "--job-step-delay-ms",
        "5000",
        "--job-lease-s",
        "3",
        "--jobs-at-once",
        "1",
    ];
    let dir_a = t.join("cp-a");
    let cp_a = Cp::start(&dir_a, &db.url, &flags);
    let mut joined = flags.to_vec();
    let join = s(&dir_a);
    joined.extend(["--join", &join]);
    let cp_b = Cp::start(&t.join("cp-b"), &db.url, &joined);

    // The job of `archive`, once claimed: its owner is the control plane to kill.
    let mut job = Value::Null;
    wait_for("the retention job claimed", Duration::from_secs(30), || {
        let jobs = cp_b.get_ok("/v1/jobs");
        let items = jobs["items"].as_array().unwrap().clone();
        assert!(items.len() <= 1, "one job for one machine: {items:?}");
        job = items.into_iter().next().unwrap_or(Value::Null);
        job["lease_owner"].is_string()
    });
    let id = job["id"].as_str().unwrap().to_string();
    let owner = job["lease_owner"].as_str().unwrap().to_string();
    let (mut victim, survivor) = if owner.starts_with(&cp_a.owner_prefix()) {
        (cp_a, cp_b)
    } else {
        assert!(owner.starts_with(&cp_b.owner_prefix()), "{owner}");
        (cp_b, cp_a)
    };
    // The victim's URL first: the parts use it until it dies.
    let urls = format!("{},{}", victim.url, survivor.url);
    let ca = s(&dir_a.join("ca.pem"));

    let ps_listen = free_addr().to_string();
    let ps_log = t.join("ps.log");
    let (_ps, line) = spawn_logging(
        Path::new(FERRY),
        &[
            "process-server",
            "--control-plane",
            &urls,
            "--ca",
            &ca,
            "--enroll-token",
            &victim.enroll_token("process-server"),
            "--name",
            "ps1",
            "--listen",
            &ps_listen,
            "--advertise",
            &ps_listen,
            "--cache-dir",
            &s(&t.join("cache")),
            "--store",
            &store,
            "--key-file",
            &s(&key),
            "--shards",
            "1",
            "--cache-gib",
            "0.25",
        ],
        Stdio::from(std::fs::File::create(&ps_log).unwrap()),
    );
    assert!(line.contains("listening on"), "{line:?}");
    let disk = t.join("web.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let agent_log = t.join("agent.log");
    let (_agent, line) = spawn_logging(
        Path::new(FERRY),
        &[
            "agent",
            "--control-plane",
            &victim.url,
            "--control-plane",
            &survivor.url,
            "--ca",
            &ca,
            "--enroll-token",
            &victim.enroll_token("agent"),
            "--machine",
            "web",
            "--disk",
            &format!("sda={}", s(&disk)),
            "--nbd-listen",
            &free_addr().to_string(),
            "--state-dir",
            &s(&t.join("agent")),
        ],
        Stdio::from(std::fs::File::create(&agent_log).unwrap()),
    );
    assert!(line.contains("serving NBD"), "{line:?}");
    let web_seen = |cp: &Cp| cp.get_ok("/v1/machines/web")["last_seen"].clone();

    // Between two tasks: at least one done, at least one to do, none running (a task
    // killed while running would rightly run again, on the survivor).
    let before = {
        let mut j = Value::Null;
        wait_for("a task done", Duration::from_secs(30), || {
            j = victim.get_ok(&format!("/v1/jobs/{id}"));
            let st = task_states(&j);
            st.iter().any(|s| s == "succeeded")
                && st.iter().any(|s| s == "pending")
                && !st.iter().any(|s| s == "running")
        });
        j
    };
    assert_eq!(before["state"], json!("running"), "{before}");
    victim.child.kill();
    let killed = Instant::now();

    // The survivor takes the job over and finishes it.
    let mut done = Value::Null;
    wait_for("the job finished", Duration::from_secs(60), || {
        done = survivor.get_ok(&format!("/v1/jobs/{id}"));
        done["state"] != json!("running")
    });
    assert_eq!(done["state"], json!("succeeded"), "{done}");
    assert_eq!(task_states(&done), ["succeeded"; 3]);
    for (seq, task) in before["tasks"].as_array().unwrap().iter().enumerate() {
        if task["state"] == json!("succeeded") {
            assert_eq!(
                task["started_at"], done["tasks"][seq]["started_at"],
                "task {seq} did not run again"
            );
        }
    }
    // Each task started once over both logs, and the job ended once.
    let logs = victim.log() + &survivor.log();
    for seq in 0..3 {
        let started = format!("job {id}: task {seq} (");
        assert_eq!(logs.matches(&started).count(), 1, "{started}\n{logs}");
    }
    // The job's end event is written just after its state: waited for.
    let subject = json!(format!("job {id}"));
    let mut ends: Vec<Value> = Vec::new();
    wait_for("the job's end event", Duration::from_secs(20), || {
        let events = survivor.get_ok("/v1/events?limit=1000");
        ends = events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["subject"] == subject)
            .cloned()
            .collect();
        !ends.is_empty()
    });
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(ends[0]["kind"], json!("job-succeeded"));
    // One job for `archive`. (A survivor that took the scheduler over schedules
    // at once, and may queue one for `web`, in the store by now.)
    let jobs = survivor.get_ok("/v1/jobs");
    let archive: Vec<&Value> = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["subject"] == json!("archive"))
        .collect();
    assert_eq!(archive.len(), 1, "{jobs}");

    // Heartbeats reach the survivor, and health stays normal past three missed
    // heartbeats' worth of time (when a part that stopped would turn critical).
    let seen = web_seen(&survivor);
    wait_for(
        "the agent's heartbeat on the survivor",
        Duration::from_secs(20),
        || web_seen(&survivor) != seen,
    );
    while killed.elapsed() < Duration::from_secs(20) {
        let m = survivor.get_ok("/v1/machines/web");
        assert_eq!(m["health"], json!("normal"), "{m}");
        assert_eq!(m["process_server"], json!("ps1"), "{m}");
        let ps = survivor.get_ok("/v1/process-servers/ps1");
        assert_eq!(ps["health"], json!("normal"), "{ps}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let events = survivor.get_ok("/v1/events?limit=1000")["items"]
        .as_array()
        .unwrap()
        .clone();
    let health: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == json!("health"))
        .collect();
    assert!(health.is_empty(), "no health change at all: {health:?}");
    let registered = |subject: &str| {
        events
            .iter()
            .filter(|e| e["kind"] == json!("registered") && e["subject"] == json!(subject))
            .count()
    };
    assert_eq!(registered("machine web"), 1, "{events:?}");
    assert_eq!(registered("process-server ps1"), 1, "{events:?}");

    // The parts say they moved, naming the survivor.
    for log in [&agent_log, &ps_log] {
        let text = std::fs::read_to_string(log).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains("switched to another control plane"))
            .unwrap_or_else(|| panic!("{}: {text}", log.display()));
        assert!(line.contains(&survivor.url), "{line}");
    }
    // And the scheduled work (health sweep, retention schedule) has one holder: the
    // survivor, within a lease of the kill.
    wait_for(
        "the scheduler lease on the survivor",
        Duration::from_secs(20),
        || holder(&db.url).is_some_and(|h| h.starts_with(&survivor.owner_prefix())),
    );
}

/// The holder of the scheduler lease, read from the database.
fn holder(url: &str) -> Option<String> {
    ferry_testkit::postgres::text(
        url,
        "SELECT owner FROM singleton_leases WHERE name = 'scheduler'",
        "owner",
    )
}
