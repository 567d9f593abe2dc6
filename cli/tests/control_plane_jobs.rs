//! Durable jobs of `ferry control-plane` as a real process: retention over a real
//! local store (points older than the policy's window gone, the newer ones still
//! rebuilding byte-identical), a job that survives kill -9 and resumes at its
//! unfinished task, cancel and resume, roles, and the points the API reads from the
//! store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use ferry_agent::{seed, SeedOptions};
use ferry_replica::{Store, VaultKey};
use ferry_testkit::process::{run, spawn, Killed};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// A state directory, a local store with its key, and the control plane when running.
struct Site {
    tmp: tempfile::TempDir,
    store: String,
    key: PathBuf,
}

struct Cp {
    child: Killed,
    url: String,
    dir: PathBuf,
    http: Http,
}

impl Site {
    fn new() -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let store = format!("file://{}/store", tmp.path().display());
        let key = tmp.path().join("vault.key");
        VaultKey::generate().save_new(&key).unwrap();
        Site { tmp, store, key }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Seeds `machine/disk` from a new random 1 MiB image stamped `time_ago` in the
    /// past; the point's id and the image.
    fn seed(
        &self,
        machine: &str,
        disk: &str,
        time_ago: chrono::Duration,
        n: u64,
    ) -> (String, PathBuf) {
        let image = self.path(&format!("{machine}-{disk}-{n}.img"));
        let mut rng = rand::rngs::StdRng::seed_from_u64(n);
        let mut bytes = vec![0u8; 1 << 20];
        rng.fill(&mut bytes[..]);
        std::fs::write(&image, &bytes).unwrap();
        let store = Store::open(&self.store).unwrap();
        let vault = VaultKey::load(&self.key).unwrap();
        let opts = SeedOptions {
            machine,
            disk,
            image: &image,
            label: Some(format!("n{n}")),
            time: Utc::now() - time_ago,
            workers: 0,
            orphan_grace: ferry_replica::grace::ORPHAN_GRACE,
        };
        let r = seed(&store, &vault, &opts, &|_| {}).unwrap();
        (r.point.id, image)
    }

    /// Starts a control plane on `cp` (the state directory) with `extra` flags.
    fn start(&self, extra: &[&str]) -> Cp {
        let dir = self.path("cp");
        let mut args = vec![
            "control-plane",
            "--state-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let (child, line) = spawn(Path::new(FERRY), &args);
        let url = line.trim().to_string();
        assert!(url.starts_with("https://127.0.0.1:"), "{line:?}");
        let http = Http::new(&url, &dir.join("ca.pem"));
        Cp {
            child,
            url,
            dir,
            http,
        }
    }

    fn start_with_store(&self, extra: &[&str]) -> Cp {
        let mut args = vec![
            "--store",
            self.store.as_str(),
            "--key-file",
            self.key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.start(&args)
    }
}

impl Cp {
    fn admin(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `ferry cp ARGS` with the admin token.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        let token = self.dir.join("admin.token");
        let ca = self.dir.join("ca.pem");
        let mut all = vec![
            "cp",
            "--url",
            &self.url,
            "--token-file",
            token.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        run(Path::new(FERRY), &all)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "ferry cp {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) = self.http.send("GET", path, &self.admin());
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// A token of `role`, made through the API.
    fn token(&self, name: &str, role: &str) -> String {
        let (status, body) = self.http.send_json(
            "POST",
            "/v1/tokens",
            &self.admin(),
            &json!({"name": name, "role": role}),
        );
        assert_eq!(status, 201, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The one job of `subject`, once queued.
    fn job_of(&self, subject: &str) -> Value {
        let mut found = None;
        wait_for(&format!("a job for {subject}"), || {
            let jobs = self.get("/v1/jobs");
            let mine: Vec<Value> = jobs["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|j| j["subject"] == json!(subject))
                .cloned()
                .collect();
            assert!(mine.len() <= 1, "one job per machine: {mine:?}");
            found = mine.into_iter().next();
            found.is_some()
        });
        found.unwrap()
    }

    /// Polls job `id` until `cond` holds of it; the job then.
    fn job_until(&self, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        wait_for(what, || {
            last = self.get(&format!("/v1/jobs/{id}"));
            cond(&last)
        });
        last
    }
}

/// Polls every 50 ms for up to a minute.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTPS client for the raw API.
struct Http {
    url: String,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Http {
    fn new(url: &str, ca: &Path) -> Http {
        use rustls_pki_types::pem::PemObject;
        let pem = std::fs::read(ca).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Http {
            url: url.to_string(),
            client: reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .build()
                .unwrap(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> (u16, String) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).unwrap());
        }
        self.rt.block_on(async {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap())
        })
    }

    fn send(&self, method: &str, path: &str, token: &str) -> (u16, String) {
        self.request(method, path, token, None)
    }

    fn send_json(&self, method: &str, path: &str, token: &str, body: &Value) -> (u16, String) {
        self.request(method, path, token, Some(body))
    }
}

fn task_states(job: &Value) -> Vec<String> {
    job["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap().to_string())
        .collect()
}

fn point_ids(points: &Value) -> Vec<String> {
    points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn retention_drops_points_older_than_the_policy_window_and_the_rest_rebuild() {
    let site = Site::new();
    let hours = chrono::Duration::hours;
    let (p3h, _) = site.seed("web", "d0", hours(3), 1);
    let (p2h, _) = site.seed("web", "d0", hours(2), 2);
    let (p30m, img30m) = site.seed("web", "d0", chrono::Duration::minutes(30), 3);
    let (pnow, imgnow) = site.seed("web", "d0", chrono::Duration::zero(), 4);

    // Without a store: no jobs, and no points to show.
    let mut cp = site.start(&[]);
    let admin = cp.admin();
    let (status, body) = cp.http.send("GET", "/v1/machines/web/points", &admin);
    assert_eq!(status, 404, "{body}");
    cp.cli_ok(&["policies", "update", "default", "--retention-hours", "1"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cp.get("/v1/jobs")["items"], json!([]));
    cp.child.kill();

    // With the store: one retention job for the machine, at start.
    let cp = site.start_with_store(&[]);
    let before = cp.cli_ok(&["machines", "points", "web", "--json"]);
    let before: Value = serde_json::from_str(&before).unwrap();
    assert_eq!(point_ids(&before).len(), 4, "{before}");
    let job = cp.job_of("web");
    let id = job["id"].as_str().unwrap();
    assert_eq!(job["kind"], json!("retention"));
    assert_eq!(job["params"]["retention_hours"], json!(1));
    assert_eq!(job["params"]["policy"], json!("default"));
    let watched = cp.cli(&["jobs", "watch", id, "--interval-ms", "100"]);
    assert!(
        watched.status.success(),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let shown = String::from_utf8_lossy(&watched.stdout);
    assert!(
        shown.contains("task 0 compact disk d0: succeeded 100%"),
        "{shown}"
    );
    assert!(shown.contains(&format!("job {id}: succeeded")), "{shown}");
    let done = cp.get(&format!("/v1/jobs/{id}"));
    assert_eq!(done["actions"], json!(["restart"]));
    assert!(done["ended_at"].as_i64().unwrap() >= done["started_at"].as_i64().unwrap());

    // Points older than an hour are gone; the newer ones rebuild byte-identical.
    let after = cp.cli_ok(&["machines", "points", "web", "--json"]);
    let ids = point_ids(&serde_json::from_str(&after).unwrap());
    assert_eq!(ids, [pnow.clone(), p30m.clone()], "{after}");
    assert!(!ids.contains(&p3h) && !ids.contains(&p2h));
    for (point, image) in [(&p30m, &img30m), (&pnow, &imgnow)] {
        let out = site.path(&format!("out-{point}"));
        let done = run(
            Path::new(FERRY),
            &[
                "failover",
                "--store",
                &site.store,
                "--key-file",
                site.key.to_str().unwrap(),
                "--machine",
                "web",
                "--point",
                point,
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        assert!(
            std::fs::read(out.join("d0.raw")).unwrap() == std::fs::read(image).unwrap(),
            "point {point} rebuilds byte-identical"
        );
    }

    // The table, and a machine the store does not know.
    let table = cp.cli_ok(&["machines", "points", "web"]);
    assert!(table.starts_with("DISK"), "{table}");
    assert!(table.contains(&pnow), "{table}");
    let (status, body) = cp.http.send("GET", "/v1/machines/nobody/points", &admin);
    assert_eq!(status, 404, "{body}");
    let (status, body) = cp
        .http
        .send("GET", "/v1/machines/bad%20name/points", &admin);
    assert_eq!(status, 400, "{body}");
    let list = cp.cli_ok(&["jobs", "list", "--state", "succeeded"]);
    assert!(list.contains(id) && list.contains("retention"), "{list}");
    let none = cp.cli_ok(&["jobs", "list", "--state", "failed", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&none).unwrap(), json!([]));
    let (status, metrics) = cp.http.send("GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("ferry_cp_jobs{kind=\"retention\",state=\"succeeded\"} 1\n"),
        "{metrics}"
    );
    // The job's end is an event too.
    let events = cp.cli_ok(&["events", "list", "--json"]);
    let events: Value = serde_json::from_str(&events).unwrap();
    let ended = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["subject"] == json!(format!("job {id}")))
        .unwrap_or_else(|| panic!("no event for job {id}: {events}"));
    assert_eq!(ended["kind"], json!("job-succeeded"), "{ended}");
    assert!(
        ended["message"].as_str().unwrap().contains("retention of"),
        "{ended}"
    );
}

#[test]
fn a_job_survives_kill_9_and_resumes_at_its_unfinished_task() {
    let site = Site::new();
    site.seed("db", "d0", chrono::Duration::zero(), 1);
    site.seed("db", "d1", chrono::Duration::zero(), 2);
    // A pause before each task, so that the kill falls between the two; short leases.
    let flags = ["--job-step-delay-ms", "1500", "--job-lease-s", "2"];
    let mut cp = site.start_with_store(&flags);
    let id = cp.job_of("db")["id"].as_str().unwrap().to_string();
    let first = cp.job_until(&id, "task 0 done", |j| {
        task_states(j) == ["succeeded", "pending"]
    });
    assert_eq!(first["state"], json!("running"));
    let owner = first["lease_owner"].as_str().unwrap().to_string();
    cp.child.kill();
    let killed_at = Utc::now().timestamp();

    // The next start takes the job over once the dead one's lease runs out, and
    // queues no second job for the machine.
    let cp = site.start_with_store(&flags);
    let taken = cp.job_until(&id, "the job taken over", |j| {
        j["lease_owner"].as_str().is_some_and(|o| o != owner)
    });
    assert_eq!(taken["state"], json!("running"));
    let done = cp.job_until(&id, "the job to end", |j| j["state"] != json!("running"));
    assert_eq!(done["state"], json!("succeeded"), "{done}");
    assert_eq!(task_states(&done), ["succeeded", "succeeded"]);
    let (t0, t1) = (&first["tasks"][0], &done["tasks"][0]);
    assert_eq!(
        t0["started_at"], t1["started_at"],
        "task 0 did not run again"
    );
    assert_eq!(t0["ended_at"], t1["ended_at"], "task 0 did not run again");
    assert!(done["tasks"][1]["started_at"].as_i64().unwrap() >= killed_at);
    let all = cp.get("/v1/jobs");
    assert_eq!(all["items"].as_array().unwrap().len(), 1, "{all}");
}

#[test]
fn cancel_stops_between_tasks_resume_goes_on_and_a_viewer_may_not() {
    let site = Site::new();
    site.seed("app", "d0", chrono::Duration::zero(), 1);
    site.seed("app", "d1", chrono::Duration::zero(), 2);
    // The pause between tasks holds while the test looks and cancels: seconds, so a
    // busy machine still cancels between the two.
    let cp = site.start_with_store(&["--job-step-delay-ms", "4000"]);
    let viewer = cp.token("watcher", "viewer");
    let operator = cp.token("ops", "operator");
    let id = cp.job_of("app")["id"].as_str().unwrap().to_string();
    let first = cp.job_until(&id, "task 0 done", |j| {
        task_states(j) == ["succeeded", "pending"]
    });

    let cancel = format!("/v1/jobs/{id}/cancel");
    let (status, body) = cp.http.send("POST", &cancel, &viewer);
    assert_eq!(status, 403, "a viewer may not cancel: {body}");
    let (status, body) = cp.http.send("POST", &cancel, &operator);
    assert_eq!(status, 200, "{body}");
    let asked: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(asked["cancel_requested"], json!(true));
    assert_eq!(asked["actions"], json!([]));
    let (status, body) = cp.http.send("POST", &cancel, &operator);
    assert_eq!(status, 409, "cancelled twice: {body}");

    // `watch` ends with the job, non-zero: it was cancelled.
    let watched = cp.cli(&["jobs", "watch", &id, "--interval-ms", "100"]);
    assert!(!watched.status.success());
    assert!(
        String::from_utf8_lossy(&watched.stderr).contains("cancelled"),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let cancelled = cp.get(&format!("/v1/jobs/{id}"));
    assert_eq!(cancelled["state"], json!("cancelled"));
    assert_eq!(task_states(&cancelled), ["succeeded", "pending"]);
    assert_eq!(cancelled["actions"], json!(["resume", "restart"]));

    let (status, _) = cp
        .http
        .send("POST", &format!("/v1/jobs/{id}/resume"), &viewer);
    assert_eq!(status, 403);
    let resumed = cp.cli_ok(&["jobs", "resume", &id, "--json"]);
    let resumed: Value = serde_json::from_str(&resumed).unwrap();
    assert!(
        ["queued", "running"].contains(&resumed["state"].as_str().unwrap()),
        "{resumed}"
    );
    let watched = cp.cli(&["jobs", "watch", &id, "--interval-ms", "100"]);
    assert!(
        watched.status.success(),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let done = cp.get(&format!("/v1/jobs/{id}"));
    assert_eq!(task_states(&done), ["succeeded", "succeeded"]);
    assert_eq!(
        done["tasks"][0]["started_at"], first["tasks"][0]["started_at"],
        "resume goes on from the unfinished task"
    );
    let shown = cp.cli_ok(&["jobs", "show", &id]);
    assert!(
        shown.contains("compact disk d1") && shown.contains("succeeded"),
        "{shown}"
    );
    let (status, body) = cp
        .http
        .send("POST", &format!("/v1/jobs/{id}/resume"), &operator);
    assert_eq!(status, 409, "a succeeded job does not resume: {body}");
    let (status, body) = cp.http.send("GET", "/v1/jobs/no-such-job", &viewer);
    assert_eq!(status, 404, "{body}");
    let (status, body) = cp.http.send("GET", "/v1/jobs?state=done", &viewer);
    assert_eq!(status, 400, "{body}");
    let (status, body) = cp.http.send("GET", "/v1/jobs?colour=red", &viewer);
    assert_eq!(status, 400, "unknown query fields are refused: {body}");
    let (status, body) = cp.http.send("GET", "/v1/jobs/bad%20id", &viewer);
    assert_eq!(status, 400, "{body}");
    let (status, body) = cp.http.send("GET", "/v1/jobs", "not-a-token");
    assert_eq!(status, 401, "{body}");
    let (status, body) = cp
        .http
        .send("POST", &format!("/v1/jobs/{id}/restart"), &viewer);
    assert_eq!(status, 403, "{body}");
    let (status, body) = cp
        .http
        .send("POST", "/v1/jobs/no-such-job/cancel", &operator);
    assert_eq!(status, 404, "{body}");
}

/// A control plane whose log (at info for the control plane) goes to `log`.
fn start_logging(args: &[&str], log: &Path) -> (Killed, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(FERRY)
        .args(args)
        .env("FERRY_LOG", "warn,ferry_controlplane=info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Killed(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line.trim().to_string();
    assert!(url.starts_with("https://"), "{line:?}: {}", log.display());
    (child, url)
}

#[test]
fn two_control_planes_on_one_sqlite_file_run_each_job_once() {
    let site = Site::new();
    let database = format!("sqlite://{}?mode=rwc", site.path("shared.db").display());
    two_control_planes_run_each_job_once(&site, &database);
}

#[test]
fn two_control_planes_on_one_postgres_run_each_job_once() {
    // Declared before the site: its control planes are gone when the database drops.
    let Some(db) = ferry_testkit::postgres::fresh("ferry_jobs", "two control planes") else {
        return;
    };
    let site = Site::new();
    two_control_planes_run_each_job_once(&site, &db.url);
}

/// Two control planes on one database and store: each machine gets one retention
/// job, each job is claimed once and each task runs once, although every job runs
/// longer than a lease (its owner renews it).
fn two_control_planes_run_each_job_once(site: &Site, database: &str) {
    let machines = ["m1", "m2", "m3", "m4"];
    for (i, m) in machines.iter().enumerate() {
        site.seed(m, "d0", chrono::Duration::zero(), 10 * i as u64);
        site.seed(m, "d1", chrono::Duration::zero(), 10 * i as u64 + 1);
    }
    // One job at a time each and a pause before each task, so that both take jobs
    // while the other still runs one, and each job (three pauses) outlives a lease.
    // The second joins the first's site (its CA and admin token).
    let start = |name: &str, join: Option<&Path>| {
        let dir = site.path(name);
        let log = site.path(&format!("{name}.log"));
        let mut args = vec![
            "control-plane",
            "--state-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--database",
            database,
            "--store",
            &site.store,
            "--key-file",
            site.key.to_str().unwrap(),
            "--jobs-at-once",
            "1",
            "--job-step-delay-ms",
            "1000",
            "--job-lease-s",
            "2",
        ];
        if let Some(j) = join {
            args.extend(["--join", j.to_str().unwrap()]);
        }
        let (child, url) = start_logging(&args, &log);
        (child, url, dir, log)
    };
    let (mut cp_a, _, dir_a, log_a) = start("cp-a", None);
    let (mut cp_b, url_b, dir_b, log_b) = start("cp-b", Some(&dir_a));
    // One admin token for the site: the second copied the first's.
    let admin = std::fs::read_to_string(dir_b.join("admin.token")).unwrap();
    let http = Http::new(&url_b, &dir_b.join("ca.pem"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let jobs = loop {
        let (status, body) = http.send("GET", "/v1/jobs", admin.trim());
        assert_eq!(status, 200, "{body}");
        let jobs: Value = serde_json::from_str(&body).unwrap();
        let items = jobs["items"].as_array().unwrap();
        if items.len() == machines.len() && items.iter().all(|j| j["state"] == json!("succeeded")) {
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for every machine's retention: {jobs:#}\n{}\n{}",
            std::fs::read_to_string(&log_a).unwrap(),
            std::fs::read_to_string(&log_b).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let items = jobs["items"].as_array().unwrap();
    let mut subjects: Vec<&str> = items
        .iter()
        .map(|j| j["subject"].as_str().unwrap())
        .collect();
    subjects.sort();
    assert_eq!(
        subjects, machines,
        "both schedules queued one job per machine"
    );

    // Every task ran exactly once over the two logs, and each job was claimed once.
    let logs = std::fs::read_to_string(&log_a).unwrap() + &std::fs::read_to_string(&log_b).unwrap();
    let mut claimed = std::collections::BTreeMap::new();
    for job in items {
        let id = job["id"].as_str().unwrap();
        for seq in 0..2 {
            let started = format!("job {id}: task {seq} (");
            assert_eq!(logs.matches(&started).count(), 1, "{started}\n{logs}");
        }
        let line = logs
            .lines()
            .find(|l| l.contains(&format!("job {id}: claimed by ")))
            .unwrap();
        assert_eq!(
            logs.matches(&format!("job {id}: claimed by ")).count(),
            1,
            "{logs}"
        );
        *claimed
            .entry(line.rsplit(' ').next().unwrap().to_string())
            .or_insert(0) += 1;
    }
    eprintln!("jobs claimed per control plane: {claimed:?}");
    // Both ran some: the work is shared, not merely not doubled.
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    cp_a.kill();
    cp_b.kill();
}
