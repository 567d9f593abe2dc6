//! `ferry cp machines test-failover|test-failover-cleanup|failover|change-point|
//! commit|cancel|set-start` and `ferry cp recovery-hosts list`, run as a person runs
//! them:
//! - their --help and argument errors (clap's, and the names and points checked
//!   before anything is sent);
//! - the requests they send and what they print, against an HTTPS API in the test
//!   that records each request and answers as the recovery API does (a job queued,
//!   then polled by --wait until it waits for input, with its disks; a job that
//!   fails; a 409 problem);
//! - one request against a real `ferry control-plane`: an unknown machine is a one-
//!   line error naming the request and its 404.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};

use ferry_testkit::control::Cp;
use ferry_testkit::net::free_addr;
use ferry_testkit::process::run;
use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn ferry(args: &[&str]) -> Output {
    run(Path::new(FERRY), args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// One request the fake API got.
#[derive(Debug, Clone)]
struct Got {
    method: String,
    path: String,
    auth: String,
    body: Value,
}

type Answer = dyn Fn(&str, &str, usize) -> (u16, Value) + Send + Sync;

/// An HTTPS API on 127.0.0.1 whose certificate a site CA in `dir` signed
/// (`dir/ca.pem`): answers each request with `answer(method, path, n)`, `n` counting
/// the requests of that method and path so far, and records it. Its URL.
fn fake_api(dir: &Path, answer: Arc<Answer>) -> (String, Arc<Mutex<Vec<Got>>>) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let ca = ferry_controlplane::enroll::ca::SiteCa::open_or_create(dir).unwrap();
    let (cert, key) = ca.service_cert(dir, &["127.0.0.1".to_string()]).unwrap();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", l.local_addr().unwrap());
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(tcp) = conn else { continue };
            let Ok(tls) = rustls::ServerConnection::new(cfg.clone()) else {
                continue;
            };
            let mut s = rustls::StreamOwned::new(tls, tcp);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                match s.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let head = text(&head);
            let mut lines = head.lines();
            let first: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
            let (method, path) = (
                first.first().copied().unwrap_or("").to_string(),
                first.get(1).copied().unwrap_or("").to_string(),
            );
            let mut len = 0;
            let mut auth = String::new();
            for l in lines {
                if let Some((k, v)) = l.split_once(':') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap_or(0),
                        "authorization" => auth = v.trim().to_string(),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0u8; len];
            if s.read_exact(&mut body).is_err() {
                continue;
            }
            let n = {
                let mut all = g.lock().unwrap();
                let n = all
                    .iter()
                    .filter(|r| r.method == method && r.path == path)
                    .count();
                all.push(Got {
                    method: method.clone(),
                    path: path.clone(),
                    auth,
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                });
                n
            };
            let (status, answer) = answer(&method, &path, n);
            let body = answer.to_string();
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.flush();
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    });
    (url, got)
}

fn task(name: &str, state: &str, progress: f64) -> Value {
    json!({"name": name, "state": state, "progress": progress, "error": null})
}

fn job(id: &str, kind: &str, state: &str, tasks: Vec<Value>) -> Value {
    json!({"id": id, "kind": kind, "subject": "m1", "state": state, "tasks": tasks,
           "error": null, "prompt": null})
}

/// What the fake API answers: the recovery API's shapes.
fn answers(method: &str, path: &str, n: usize) -> (u16, Value) {
    let tf = "j0000000000001-0000000a";
    let fo = "j0000000000002-0000000b";
    match (method, path) {
        ("POST", "/v1/machines/m1/test-failover") => (
            202,
            job(
                tf,
                "test-failover",
                "queued",
                vec![
                    task("bring up disks", "pending", 0.0),
                    task("wait for cleanup", "pending", 0.0),
                ],
            ),
        ),
        ("GET", p) if p == format!("/v1/jobs/{tf}") && n == 0 => {
            let mut j = job(
                tf,
                "test-failover",
                "running",
                vec![
                    task("bring up disks", "running", 0.5),
                    task("wait for cleanup", "pending", 0.0),
                ],
            );
            // A build half done: its first disk built, the second at 42 %.
            j["work"] = json!([
                {"id": format!("{tf}-0-m1"), "host": "rh1", "machine": "m1",
                 "kind": "build", "state": "running", "progress": 0.5,
                 "bytes_per_s": 1.1e8, "error": null,
                 "disks": [
                    {"disk": "sda", "percent": 100.0, "mb_per_s": 97.4,
                     "bytes_done": 1000, "bytes": 1000},
                    {"disk": "sdb", "percent": 42.0, "mb_per_s": 118.2,
                     "bytes_done": 420, "bytes": 1000}
                 ]}
            ]);
            (200, j)
        }
        ("GET", p) if p == format!("/v1/jobs/{tf}") => {
            let mut j = job(
                tf,
                "test-failover",
                "waiting-for-input",
                vec![
                    task("bring up disks", "succeeded", 1.0),
                    task("wait for cleanup", "pending", 0.0),
                ],
            );
            j["prompt"] = json!("Test m1, then clean up with a verdict");
            j["disks"] = json!([
                {"machine": "m1", "disk": "sda", "point": "p7",
                 "nbd_url": "nbd://10.0.0.5:10809/m1/sda"},
                {"machine": "m1", "disk": "sdb", "point": "p7",
                 "path": "/w/items/x/sdb.raw"},
            ]);
            (200, j)
        }
        ("POST", "/v1/machines/m1/failover") => (
            202,
            job(
                fo,
                "failover",
                "running",
                vec![task("fence source", "running", 0.0)],
            ),
        ),
        ("GET", p) if p == format!("/v1/jobs/{fo}") => {
            let mut j = job(
                fo,
                "failover",
                "failed",
                vec![task("fence source", "failed", 0.0)],
            );
            j["error"] = json!("task 1 bring up disks: no live recovery host");
            (200, j)
        }
        ("POST", "/v1/machines/m1/commit") => (
            409,
            json!({"type": "about:blank", "title": "Conflict", "status": 409,
                   "detail": "machine m1 has not failed over"}),
        ),
        ("POST", "/v1/machines/m1/test-failover-cleanup" | "/v1/machines/m1/cancel") => {
            (200, job(tf, "test-failover", "queued", vec![]))
        }
        ("PATCH", "/v1/machines/m1") => (
            200,
            json!({"name": "m1", "process_server": "ps1", "policy": "default",
                   "group": null, "state": "protected", "health": "normal",
                   "rpo_seconds": 3.0, "last_seen": "2026-12-06T10:00:00Z",
                   "health_reasons": [], "disks": [],
                   "actions": {"start": "qemu-system-x86_64 -drive file={nbd_url}"},
                   "recovery": {"state": "failed-over", "active_site": "recovery",
                                "planned": true, "point": {"sda": "p7"}, "host": "rh1",
                                "job": fo}}),
        ),
        ("GET", "/v1/recovery-hosts?limit=1000") => (
            200,
            json!({"items": [{"name": "rh1", "nbd_address": "10.0.0.5:10809",
                              "work_dir_free_bytes": 1000, "last_seen": "2026-12-06T10:00:00Z",
                              "items": 2, "live": true}],
                   "next_after": null}),
        ),
        _ => (
            404,
            json!({"title": "Not Found", "status": 404, "detail": "no such resource"}),
        ),
    }
}

struct Site {
    _dir: tempfile::TempDir,
    url: String,
    ca: PathBuf,
    token: PathBuf,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let (url, got) = fake_api(dir.path(), Arc::new(answers));
        let token = dir.path().join("token");
        std::fs::write(&token, "ferry_test_token\n").unwrap();
        Site {
            ca: dir.path().join("ca.pem"),
            _dir: dir,
            url,
            token,
            got,
        }
    }

    fn cp(&self, args: &[&str]) -> Output {
        let (ca, token) = (
            self.ca.display().to_string(),
            self.token.display().to_string(),
        );
        let mut all = vec![
            "cp",
            "--url",
            &self.url,
            "--ca",
            &ca,
            "--token-file",
            &token,
        ];
        all.extend_from_slice(args);
        ferry(&all)
    }

    fn requests(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

#[test]
fn help_tells_a_new_user_what_each_verb_does() {
    let out = ferry(&["cp", "machines", "--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for verb in [
        "test-failover ",
        "test-failover-cleanup",
        "failover ",
        "change-point",
        "commit",
        "cancel",
        "set-start",
    ] {
        assert!(help.contains(verb), "{verb}: {help}");
    }
    let help = text(&ferry(&["cp", "machines", "test-failover", "--help"]).stdout);
    for want in [
        "latest-app",
        "latest-group",
        "RFC 3339",
        "--target",
        "nbd",
        "vhd",
        "--host",
        "least",
        "--wait",
        "MACHINE DISK POINT",
        "test-failover-cleanup",
    ] {
        assert!(help.contains(want), "{want}: {help}");
    }
    let help = text(&ferry(&["cp", "machines", "failover", "--help"]).stdout);
    for want in [
        "--planned",
        "--unplanned",
        "final point",
        "fenced",
        "commit",
    ] {
        assert!(help.contains(want), "{want}: {help}");
    }
    let help = text(&ferry(&["cp", "machines", "set-start", "--help"]).stdout);
    for want in ["{nbd_url}", "{disk_path:DISK}", "FERRY_DISKS", "--clear"] {
        assert!(help.contains(want), "{want}: {help}");
    }
    let help = text(&ferry(&["cp", "recovery-hosts", "list", "--help"]).stdout);
    assert!(help.contains("least loaded"), "{help}");
}

#[test]
fn argument_errors_are_refused_before_anything_is_sent() {
    let s = Site::new();
    for (args, want) in [
        (&["failover", "m1"][..], "--planned"),
        (
            &["failover", "m1", "--planned", "--unplanned"][..],
            "cannot be used",
        ),
        (
            &["failover", "m1", "--planned", "--point", "latest"][..],
            "cannot be used",
        ),
        (&["test-failover", "m1", "--target", "qcow2"][..], "qcow2"),
        (&["test-failover-cleanup", "m1"][..], "--verdict"),
        (
            &["test-failover-cleanup", "m1", "--verdict", "maybe"][..],
            "maybe",
        ),
        (&["set-start", "m1"][..], "--command"),
        (
            &["set-start", "m1", "--command", "x", "--clear"][..],
            "cannot be used",
        ),
        (&["change-point", "m1"][..], "--point"),
        (&["test-failover", "m1", "--interval-ms", "5"][..], "5"),
        // Checked by ferry itself, before a request.
        (&["test-failover", "../m1"][..], "machine"),
        (
            &["change-point", "m1", "--point", "a b"][..],
            "point \"a b\"",
        ),
        (
            &["failover", "m1", "--unplanned", "--host", "x/y"][..],
            "recovery host",
        ),
        (&["set-start", "m1", "--command", "  "][..], "empty"),
    ] {
        let mut all = vec!["machines"];
        all.extend_from_slice(args);
        let out = s.cp(&all);
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(s.requests().is_empty(), "{:?}", s.requests());
}

#[test]
fn test_failover_waits_until_it_waits_for_cleanup_and_prints_its_disks() {
    let s = Site::new();
    let out = s.cp(&[
        "machines",
        "test-failover",
        "m1",
        "--point",
        "latest-app",
        "--target",
        "raw",
        "--host",
        "rh1",
        "--wait",
        "--interval-ms",
        "50",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let got = s.requests();
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].path, "/v1/machines/m1/test-failover");
    assert_eq!(got[0].auth, "Bearer ferry_test_token");
    assert_eq!(
        got[0].body,
        json!({"point": "latest-app", "target": {"kind": "dir", "format": "raw"},
               "host": "rh1"})
    );
    assert_eq!(got.len(), 3, "polled until waiting: {got:?}");
    for want in [
        "task 0 bring up disks: running 50%",
        "  m1/sdb  42.0 %  118 MB/s",
        "task 0 bring up disks: succeeded 100%",
        "(test-failover): waiting-for-input",
        "waiting for: Test m1, then clean up with a verdict",
    ] {
        assert!(stdout.contains(want), "{want}: {stdout}");
    }
    let last: Vec<&str> = stdout.lines().rev().take(2).collect();
    assert_eq!(
        last,
        vec![
            "m1 sdb p7 /w/items/x/sdb.raw",
            "m1 sda p7 nbd://10.0.0.5:10809/m1/sda"
        ],
        "{stdout}"
    );

    // --json: the job as it ended up, for a script.
    let out = s.cp(&[
        "--json",
        "machines",
        "test-failover",
        "m1",
        "--wait",
        "--interval-ms",
        "50",
    ]);
    assert!(out.status.success());
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["state"], "waiting-for-input");
    assert_eq!(j["disks"][0]["nbd_url"], "nbd://10.0.0.5:10809/m1/sda");
    let got = s.requests();
    assert_eq!(
        got[3].body,
        json!({"point": "latest", "target": {"kind": "nbd"}})
    );

    // Without --wait: the job as queued, no poll.
    let n = s.requests().len();
    let out = s.cp(&["machines", "test-failover", "m1"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("JOB") && stdout.contains("test-failover  m1"),
        "{stdout}"
    );
    assert!(stdout.contains("queued"), "{stdout}");
    assert_eq!(s.requests().len(), n + 1);

    let out = s.cp(&[
        "machines",
        "test-failover-cleanup",
        "m1",
        "--verdict",
        "passed",
        "--notes",
        "booted, logged in",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let last = s.requests().pop().unwrap();
    assert_eq!(last.path, "/v1/machines/m1/test-failover-cleanup");
    assert_eq!(
        last.body,
        json!({"verdict": "passed", "notes": "booted, logged in"})
    );
}

#[test]
fn a_failed_job_exits_1_and_a_refusal_is_one_line() {
    let s = Site::new();
    let out = s.cp(&[
        "machines",
        "failover",
        "m1",
        "--unplanned",
        "--wait",
        "--interval-ms",
        "50",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("failed: task 1 bring up disks: no live recovery host"),
        "{err}"
    );
    assert!(text(&out.stdout).contains("(failover): failed"));
    let got = s.requests();
    assert_eq!(
        got[0].body,
        json!({"planned": false, "target": {"kind": "nbd"}})
    );

    let out = s.cp(&["machines", "failover", "m1", "--planned", "--target", "vhd"]);
    assert!(out.status.success());
    let last = s.requests().pop().unwrap();
    assert_eq!(
        last.body,
        json!({"planned": true, "target": {"kind": "dir", "format": "vhd"}})
    );

    let out = s.cp(&["machines", "commit", "m1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("POST")
            && err.contains("/v1/machines/m1/commit: 409 Conflict: machine m1 has not failed over"),
        "{err}"
    );
    assert_eq!(s.requests().pop().unwrap().body, json!({}));
    assert!(s.cp(&["machines", "cancel", "m1"]).status.success());
    assert_eq!(s.requests().pop().unwrap().path, "/v1/machines/m1/cancel");
}

#[test]
fn set_start_patches_actions_and_show_says_where_the_machine_runs() {
    let s = Site::new();
    let cmd = "qemu-system-x86_64 -drive file={nbd_url}";
    let out = s.cp(&["machines", "set-start", "m1", "--command", cmd]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let last = s.requests().pop().unwrap();
    assert_eq!(
        (last.method.as_str(), last.path.as_str()),
        ("PATCH", "/v1/machines/m1")
    );
    assert_eq!(last.body, json!({"actions": {"start": cmd}}));
    assert!(stdout.contains(&format!("start action: {cmd}")), "{stdout}");
    assert!(
        stdout.contains("recovery: failed-over, active site recovery, planned"),
        "{stdout}"
    );
    assert!(stdout.contains("failed-over (recovery site)"), "{stdout}");
    assert!(s
        .cp(&["machines", "set-start", "m1", "--clear"])
        .status
        .success());
    assert_eq!(
        s.requests().pop().unwrap().body,
        json!({"actions": {"start": null}})
    );

    let out = s.cp(&["recovery-hosts", "list"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.starts_with("NAME"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("rh1") && l.contains("10.0.0.5:10809") && l.contains("true")),
        "{stdout}"
    );
}

#[test]
fn against_a_control_plane_an_unknown_machine_is_a_404() {
    let dir = tempfile::tempdir().unwrap();
    // With a store: recovery reads the replica, and a control plane without one
    // refuses recovery (503) before it looks for the machine.
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let store = format!("file://{}", store_dir.display());
    let key = dir.path().join("vault.key").display().to_string();
    ferry_testkit::process::run_ok(Path::new(FERRY), &["keygen", "--out", &key]);
    let cp = Cp::start_with(
        Path::new(FERRY),
        &dir.path().join("cp"),
        &free_addr().to_string(),
        None,
        &["--store", &store, "--key-file", &key],
    );
    let (url, tf, ca) = (
        cp.url.clone(),
        cp.token_file.display().to_string(),
        cp.ca.display().to_string(),
    );
    let out = ferry(&[
        "cp",
        "--url",
        &url,
        "--token-file",
        &tf,
        "--ca",
        &ca,
        "machines",
        "test-failover",
        "nosuch",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("POST") && err.contains("/v1/machines/nosuch/test-failover: 404"),
        "{err}"
    );
}

#[test]
fn jobs_show_prints_each_disk_of_its_work_with_percent_and_rate() {
    let s = Site::new();
    let out = s.cp(&["jobs", "show", "j0000000000001-0000000a"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let work: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("work "))
        .collect();
    assert_eq!(
        work,
        [
            "work build j0000000000001-0000000a-0-m1 on rh1: running 50%",
            "  m1/sda  100.0 %  97 MB/s",
            "  m1/sdb  42.0 %  118 MB/s",
        ],
        "{stdout}"
    );
    // --json: the API's fields as they are (a new site: its first answer again).
    let s = Site::new();
    let out = s.cp(&["--json", "jobs", "show", "j0000000000001-0000000a"]);
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["work"][0]["disks"][1]["percent"], 42.0);
    assert_eq!(j["work"][0]["disks"][1]["bytes_done"], 420);
}
