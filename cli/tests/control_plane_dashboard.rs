//! What operators see of a fleet, with real processes: a `ferry control-plane`, two
//! enrolled process servers and two agents; one process server killed with -9.
//! - Webhooks: a receiver in the test (a small HTTP server) gets the "not seen" health
//!   event, signed with the secret `ferry cp webhooks create` printed, after a first
//!   answer of 500 was tried again; the secret never appears in the control plane's
//!   log (at debug level).
//! - The dashboard, opened in headless Chromium: the machines' rows and their health,
//!   a job's progress, the event of the killed process server, read from the DOM
//!   Chromium dumps. Skipped (and says so) without `chromium`, unless
//!   FERRY_TEST_REQUIRE_REMOTE=1. With FERRY_DASHBOARD_SCREENSHOT=FILE it also saves a
//!   screenshot there, as an operator (docs/dashboard.png is one).
//! - Recovery on the dashboard, seeded in the database as the recovery jobs leave it
//!   (no recovery host runs here): a machine failed over unplanned, a test failover
//!   of web1 waiting for its cleanup with its disk served over NBD, two recovery
//!   hosts (one that cannot reach the store) and a plan. An operator sees them with the buttons their states allow; a
//!   viewer sees no button.
//!
//! How Chromium signs in: a person types a token into the sign-in form; here a page
//! served by the test (HTTPS on 127.0.0.1, so same-site with the control plane, as
//! SameSite=Strict needs) holds the same form with the viewer token filled in and
//! submits it on load. Chromium POSTs it to `/sign-in`, keeps the session cookie and
//! follows the redirect to `/`: the browser's own sign-in, with no token in a URL and
//! no cookie handed to it by the test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_controlplane::db::Db;
use ferry_controlplane::jobs::queue;
use ferry_testkit::control::{process_server, Agent, Cp};
use ferry_testkit::net::free_addr;
use ferry_testkit::process::{run, run_ok};
use ferry_testkit::{wait_for, wait_ok};
use rand::SeedableRng;
use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn bin() -> &'static Path {
    Path::new(FERRY)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// One request the receiver got: its headers (lowercase names) and body.
#[derive(Clone, Debug)]
struct Got {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// A webhook receiver: answers 500 to the first request, 200 to the rest.
fn receiver() -> (String, Arc<Mutex<Vec<Got>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/ferry", l.local_addr().unwrap());
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let mut headers = Vec::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            let first = {
                let mut all = g.lock().unwrap();
                all.push(Got { headers, body });
                all.len() == 1
            };
            let status = if first {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (url, got)
}

/// Serves, over HTTPS on 127.0.0.1 with a throwaway certificate, one page: the
/// dashboard's sign-in form with `token` filled in, submitted on load. Its URL.
fn sign_in_page(cp_url: &str, token: &str) -> String {
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap(),
    );
    let page = format!(
        "<!DOCTYPE html><html><body><form method=\"post\" action=\"{cp_url}/sign-in\">\
         <input name=\"token\" value=\"{token}\"></form>\
         <script>document.forms[0].submit()</script></body></html>"
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(tcp) = conn else { continue };
            let Ok(tls) = rustls::ServerConnection::new(cfg.clone()) else {
                continue;
            };
            let mut stream = rustls::StreamOwned::new(tls, tcp);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                match stream.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = stream.flush();
            stream.conn.send_close_notify();
            let _ = stream.flush();
        }
    });
    url
}

/// Chromium, headless, at `url`, given `budget_ms` of virtual time (the sign-in
/// page's submit and redirect happen within it); the DOM it dumps, or its screenshot
/// when `screenshot` is given.
fn chromium(url: &str, budget_ms: u32, screenshot: Option<&Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        // The test's page and the control plane have certificates Chromium does not
        // know (a throwaway one, the site CA's): for this test only.
        "--ignore-certificate-errors",
        // Taller for the screenshot: the jobs below the recovery tables.
        if screenshot.is_some() {
            "--window-size=1360,1500"
        } else {
            "--window-size=1360,1000"
        },
        "--hide-scrollbars",
        &format!("--virtual-time-budget={budget_ms}"),
        &format!("--user-data-dir={}", profile.path().display()),
    ]);
    match screenshot {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .expect("running chromium");
    assert!(out.status.success(), "chromium failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn chromium_present() -> bool {
    Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The table row (`<tr ...>...</tr>`) of the DOM that holds `needle`.
fn row_with<'a>(dom: &'a str, needle: &str) -> &'a str {
    let at = dom
        .find(needle)
        .unwrap_or_else(|| panic!("{needle} is not on the page:\n{dom}"));
    let start = dom[..at].rfind("<tr").unwrap();
    let end = at + dom[at..].find("</tr>").unwrap();
    &dom[start..end]
}

#[test]
fn operators_see_a_killed_process_server_on_the_dashboard_and_in_a_webhook() {
    let browser = chromium_present();
    if !browser {
        if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
            panic!("chromium is missing but FERRY_TEST_REQUIRE_REMOTE=1");
        }
        eprintln!("chromium not found: the dashboard is not opened in a browser");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let log_path = d.join("cp.log");
    // Debug level: the check that the secret never reaches the log means more when
    // the log says much.
    std::env::set_var("FERRY_LOG", "debug");
    let cp = Cp::start_logging(
        bin(),
        &d.join("cp"),
        &free_addr().to_string(),
        None,
        &[],
        Stdio::from(std::fs::File::create(&log_path).unwrap()),
    );
    std::env::remove_var("FERRY_LOG");

    let (hook_url, got) = receiver();
    let out = cp.cli(&[
        "webhooks",
        "create",
        "ops",
        &hook_url,
        "--events",
        "health,fencing",
    ]);
    let secret = out.lines().last().unwrap().trim().to_string();
    assert!(secret.starts_with("ferry_whsec_"), "{out}");
    let listed = cp.cli(&["webhooks", "list"]);
    assert!(
        listed.contains("ops") && listed.contains("health,fencing"),
        "{listed}"
    );
    assert!(
        !listed.contains(&secret),
        "listed without its secret: {listed}"
    );
    let shown = cp.cli(&["--json", "webhooks", "show", "ops"]);
    assert!(!shown.contains(&secret), "{shown}");

    let out = cp.cli(&["tokens", "create", "wall", "--role", "viewer"]);
    let viewer = out.lines().last().unwrap().trim().to_string();

    // Admin to change, viewer to read; bodies checked.
    let viewer_file = d.join("viewer.token");
    std::fs::write(&viewer_file, &viewer).unwrap();
    let as_viewer = |args: &[&str]| {
        let (url, tf, ca) = (cp.url.clone(), s(&viewer_file), s(&cp.ca));
        let mut all = vec!["cp", "--url", &url, "--token-file", &tf, "--ca", &ca];
        all.extend_from_slice(args);
        run(bin(), &all)
    };
    let denied = as_viewer(&["webhooks", "create", "x", &hook_url, "--events", "health"]);
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("403") && err.contains("needs admin"), "{err}");
    assert!(!as_viewer(&["webhooks", "delete", "ops"]).status.success());
    let seen = as_viewer(&["webhooks", "show", "ops"]);
    assert!(
        seen.status.success() && String::from_utf8_lossy(&seen.stdout).contains("health,fencing")
    );
    for (body, why) in [
        (
            json!({"name": "y", "url": hook_url, "events": ["health"], "extra": 1}),
            "unknown field",
        ),
        (
            json!({"name": "y", "url": "ftp://h/", "events": ["health"]}),
            "scheme ftp",
        ),
        (
            json!({"name": "y", "url": hook_url, "events": ["nope"]}),
            "unknown kind",
        ),
        (
            json!({"name": "../y", "url": hook_url, "events": ["health"]}),
            "webhook",
        ),
    ] {
        let (st, problem) = cp.api("POST", "/v1/webhooks", Some(body));
        assert_eq!(st, 400, "{problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains(why),
            "{problem}"
        );
    }
    let (st, _) = cp.api("GET", "/v1/webhooks/nope", None);
    assert_eq!(st, 404);

    std::fs::create_dir_all(d.join("store")).unwrap();
    let store = format!("file://{}", s(&d.join("store")));
    run_ok(bin(), &["keygen", "--out", &s(&d.join("vault.key"))]);
    let (mut ps1, _) = process_server(&cp, d, "ps1", &store, None);
    let (_ps2, _) = process_server(&cp, d, "ps2", &store, None);
    let agents: Vec<Agent> = ["web1", "db1"]
        .iter()
        .map(|name| Agent::enroll(&cp, d, name, 8 << 20, &mut rng))
        .collect();
    for a in &agents {
        wait_ok(
            &format!("{} assigned", a.name),
            Duration::from_secs(30),
            || {
                let m = cp.machine(&a.name);
                m["process_server"].as_str().map(str::to_string).ok_or(m)
            },
        );
    }

    // A job half-way through: no job kind runs long enough to be seen mid-way in a
    // test, so one is queued in the control plane's database and held by a runner
    // named here (a lease of ten minutes that the control plane's own runner leaves
    // alone), its second task of two at 40 %.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let job = rt.block_on(async {
        let db = Db::open(&Db::default_url(&d.join("cp"))).await.unwrap();
        let tasks = ["list points".to_string(), "compact".to_string()];
        let params = serde_json::json!({});
        let id = queue::enqueue(&db, "retention", "db1", &params, &tasks)
            .await
            .unwrap()
            .unwrap();
        let now = queue::now_ms();
        assert!(queue::claim(&db, &id, "test", now, 600_000).await.unwrap());
        assert!(queue::task_started(&db, &id, "test", 0).await.unwrap());
        assert!(queue::task_ended(&db, &id, "test", 0, None).await.unwrap());
        assert!(queue::task_started(&db, &id, "test", 1).await.unwrap());
        assert!(queue::task_progress(&db, &id, "test", 1, 0.4)
            .await
            .unwrap());
        id
    });

    // kill -9: after three missed heartbeats the sweep says it is not seen.
    ps1.kill();
    let not_seen = |e: &Value| {
        e["kind"] == "health"
            && e["subject"] == "process-server ps1"
            && e["message"].as_str().unwrap_or("").contains("not seen")
    };
    let event = wait_ok("ps1's not-seen event", Duration::from_secs(60), || {
        cp.events().into_iter().find(not_seen).ok_or(())
    });
    let id = event["id"].as_i64().unwrap();

    // The webhook: that event, signed; the first try answered 500 and was sent again.
    // Only the first request was answered 500: a later one of the event is its
    // delivery.
    wait_for("the webhook's delivery", Duration::from_secs(30), || {
        got.lock()
            .unwrap()
            .iter()
            .skip(1)
            .any(|g| g.header("ferry-delivery") == id.to_string())
    });
    let all = got.lock().unwrap().clone();
    let first = all[0].header("ferry-delivery").to_string();
    assert!(
        all.iter()
            .skip(1)
            .any(|g| g.header("ferry-delivery") == first),
        "the event answered 500 was tried again"
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    for g in &all {
        let sig = g.header("ferry-signature").strip_prefix("sha256=").unwrap();
        ring::hmac::verify(&key, &g.body, &hex_decode(sig)).expect("the signature verifies");
        let v: Value = serde_json::from_slice(&g.body).unwrap();
        assert!(["health", "fencing"].contains(&v["event"]["kind"].as_str().unwrap()));
        assert_eq!(v["sent_at"].to_string(), g.header("ferry-timestamp"));
    }
    let ok = all
        .iter()
        .skip(1)
        .find(|g| g.header("ferry-delivery") == id.to_string())
        .unwrap();
    let v: Value = serde_json::from_slice(&ok.body).unwrap();
    assert_eq!(v["webhook"], "ops");
    assert_eq!(v["event"]["subject"], "process-server ps1");
    // The count goes up once the receiver's answer is in: polled.
    let mut shown = Value::Null;
    wait_for("a delivery counted", Duration::from_secs(20), || {
        shown = serde_json::from_str(&cp.cli(&["--json", "webhooks", "show", "ops"])).unwrap();
        shown["delivered"].as_i64().unwrap() >= 1
    });
    assert!(
        shown["last_error"].as_str().unwrap().contains("500"),
        "{shown}"
    );

    let operator = cp.cli(&["tokens", "create", "ops", "--role", "operator"]);
    let operator = operator.lines().last().unwrap().trim().to_string();
    let waiting = rt.block_on(seed_recovery(&d.join("cp")));

    if browser {
        let page = sign_in_page(&cp.url, &viewer);
        let dom = chromium(&page, 4000, None);
        assert!(dom.contains("signed in as wall"), "not signed in:\n{dom}");
        assert!(
            !dom.contains("class=\"act\""),
            "a viewer gets no button:\n{dom}"
        );
        for a in &agents {
            let row = row_with(&dom, &format!("data-machine=\"{}\"", a.name));
            assert!(row.contains("class=\"badge "), "{row}");
            assert!(
                ["normal", "warning", "critical"]
                    .iter()
                    .any(|h| row.contains(&format!(">{h}</span>"))),
                "{row}"
            );
        }
        let ps1_row = row_with(&dom, "data-process-server=\"ps1\"");
        assert!(ps1_row.contains(">critical</span>"), "{ps1_row}");
        assert!(ps1_row.contains("not seen for"), "{ps1_row}");
        let job_row = row_with(&dom, &format!("data-job=\"{job}\""));
        assert!(
            job_row.contains("70 %") && job_row.contains("compact"),
            "{job_row}"
        );
        let ev = row_with(&dom, "<td>process-server ps1</td>");
        assert!(ev.contains("not seen for"), "{ev}");

        let page = sign_in_page(&cp.url, &operator);
        let dom = chromium(&page, 4000, None);
        assert!(dom.contains("signed in as ops"), "not signed in:\n{dom}");
        let erp = row_with(&dom, "data-machine=\"erp-db\"");
        assert!(erp.contains("failed-over (recovery site)"), "{erp}");
        assert!(
            erp.contains("data-action=\"commit\"") && erp.contains("data-action=\"cancel\""),
            "{erp}"
        );
        // Not committed: its point can change, the browser showing the form's field.
        assert!(
            erp.contains("data-action=\"change-point\"")
                && erp.contains("name=\"point\" value=\"latest\""),
            "{erp}"
        );
        let web1 = row_with(&dom, "data-machine=\"web1\"");
        assert!(web1.contains("data-action=\"cleanup-passed\""), "{web1}");
        assert!(
            web1.contains("at home; test-failover waiting-for-input"),
            "{web1}"
        );
        let db1 = row_with(&dom, "data-machine=\"db1\"");
        assert!(db1.contains("data-action=\"test-failover\""), "{db1}");
        let r = row_with(&dom, "data-recovery=\"erp-db\"");
        assert!(r.contains("unplanned; point sda=p-erp-7; host rh1"), "{r}");
        assert!(r.contains("nbd://127.0.0.1:10809/erp-db/sda"), "{r}");
        let r = row_with(&dom, "data-recovery=\"web1\"");
        assert!(
            r.contains("waiting-for-input") && r.contains("Test web1 at its point"),
            "{r}"
        );
        assert!(r.contains("nbd://127.0.0.1:10809/web1/sda"), "{r}");
        let h = row_with(&dom, "data-recovery-host=\"rh1\"");
        assert!(h.contains(">live<"), "{h}");
        let h = row_with(&dom, "data-recovery-host=\"rh2\"");
        assert!(
            h.contains(">no store<")
                && h.contains("cannot reach the store: store s3://dr: get probe/recovery-host: connection refused"),
            "{h}"
        );
        let p = row_with(&dom, "data-plan=\"erp\"");
        assert!(p.contains(">2<") && p.contains(">3<"), "{p}");
        let j = row_with(&dom, &format!("data-job=\"{waiting}\""));
        assert!(j.contains("class=\"prompt\""), "{j}");
        if let Ok(path) = std::env::var("FERRY_DASHBOARD_SCREENSHOT") {
            chromium(&page, 4000, Some(Path::new(&path)));
            assert!(std::fs::metadata(&path).unwrap().len() > 10_000);
        }
    }

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("webhook ops: event") && log.contains("500"),
        "the failed try is logged:\n{log}"
    );
    assert!(!log.contains(&secret), "the webhook's secret is in the log");
    assert!(!log.contains(&viewer), "the viewer's token is in the log");
}

/// Recovery as the recovery jobs leave it in the control plane's database (in
/// `state_dir`): machine erp-db (registered here, its agent gone) failed over
/// unplanned to recovery host rh1; a test failover of web1 waiting for its cleanup,
/// its disk served over NBD; plan erp. The test failover's job id.
async fn seed_recovery(state_dir: &Path) -> String {
    use ferry_controlplane::recovery::work;
    use ferry_link::control::wire::{DiskPoint, ReadyDisk, WorkOp, WorkReport, WorkResult};
    let url = Db::default_url(state_dir);
    let db = Db::open(&url).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    work::host_heartbeat(&db, "rh1", "127.0.0.1:10809", 40 << 30, now, None)
        .await
        .unwrap();
    // A second host that cannot reach the store, as its heartbeat says.
    work::host_heartbeat(
        &db,
        "rh2",
        "127.0.0.1:10810",
        40 << 30,
        now,
        Some("store s3://dr: get probe/recovery-host: connection refused"),
    )
    .await
    .unwrap();
    let beat = ferry_controlplane::registry::machines::Beat {
        name: "erp-db",
        state: "protected",
        disks: &[],
        last_error: None,
        newest_uploaded_at: None,
        group_listen: None,
        now,
    };
    ferry_controlplane::registry::machines::heartbeat(&db, &beat)
        .await
        .unwrap();
    let tasks = [
        "bring up disks",
        "start machine",
        "wait for cleanup",
        "clean up",
        "record verdict",
    ]
    .map(String::from);
    let params = json!({"point": "latest", "target": {"kind": "nbd"}});
    let id = queue::enqueue_keyed(
        &db,
        "test-failover",
        "web1",
        Some("recovery/web1"),
        &params,
        &tasks,
    )
    .await
    .unwrap()
    .unwrap();
    let t = queue::now_ms();
    assert!(queue::claim(&db, &id, "test", t, 600_000).await.unwrap());
    for seq in 0..2 {
        assert!(queue::task_started(&db, &id, "test", seq).await.unwrap());
        assert!(queue::task_ended(&db, &id, "test", seq, None)
            .await
            .unwrap());
    }
    assert!(queue::task_started(&db, &id, "test", 2).await.unwrap());
    let prompt = "Test web1 at its point, then: ferry cp machines test-failover-cleanup web1 \
                  --verdict passed|failed";
    assert!(queue::wait_for_input(&db, &id, "test", 2, prompt)
        .await
        .unwrap());
    let item = work::item_id(&id, 0, "web1");
    let op = WorkOp::Serve {
        disks: vec![DiskPoint {
            disk: "sda".into(),
            point: "p-web-3".into(),
        }],
    };
    work::submit(&db, &item, "rh1", &id, "web1", &op, now)
        .await
        .unwrap();
    let served = WorkReport {
        id: item,
        state: "succeeded".into(),
        progress: 1.0,
        bytes_per_s: 0.0,
        error: None,
        result: Some(WorkResult {
            disks: vec![ReadyDisk {
                disk: "sda".into(),
                point: "p-web-3".into(),
                path: None,
                nbd_url: Some("nbd://127.0.0.1:10809/web1/sda".into()),
                bytes: 8 << 20,
            }],
            ..WorkResult::default()
        }),
        disks: Vec::new(),
    };
    work::record_reports(&db, "rh1", std::slice::from_ref(&served), now)
        .await
        .unwrap();
    // erp-db's disk, served by an item of its failover job.
    let erp_job = "j0000000000009-00000001";
    let erp_item = work::item_id(erp_job, 0, "erp-db");
    let op = WorkOp::Serve {
        disks: vec![DiskPoint {
            disk: "sda".into(),
            point: "p-erp-7".into(),
        }],
    };
    work::submit(&db, &erp_item, "rh1", erp_job, "erp-db", &op, now)
        .await
        .unwrap();
    let mut erp_served = served.clone();
    erp_served.id = erp_item.clone();
    if let Some(r) = erp_served.result.as_mut() {
        r.disks[0].point = "p-erp-7".into();
        r.disks[0].nbd_url = Some("nbd://127.0.0.1:10809/erp-db/sda".into());
    }
    work::record_reports(&db, "rh1", &[erp_served], now)
        .await
        .unwrap();
    // The failover's row and the plan: no public writer outside their jobs and API.
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO machine_recovery (machine, state, active_site, planned, point, host, \
         items, job_id, updated_at) VALUES ('erp-db', 'failed-over', 'recovery', 0, \
         '{\"sda\":\"p-erp-7\"}', 'rh1', ?, NULL, ?)",
    )
    .bind(json!([erp_item]).to_string())
    .bind(now)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO recovery_plans (name, spec, created_at, updated_at) VALUES ('erp', ?, ?, ?)",
    )
    .bind(
        json!({"name": "erp", "groups": [
            {"name": "database", "machines": ["erp-db"]},
            {"name": "web", "machines": ["web1", "db1"]}]})
        .to_string(),
    )
    .bind(now)
    .bind(now)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    id
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
