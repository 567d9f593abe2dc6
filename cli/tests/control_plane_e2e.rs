//! The control plane with real processes end to end: `ferry control-plane`, two
//! process servers and an agent that enroll with one-time tokens (no hand-made
//! certificate), the agent written through NBD with qemu-io, a policy PATCH that
//! reaches the running agent at its next heartbeat, an operator's `move` to the
//! other process server after which every point still rebuilds byte-identical, and a
//! removal after which the process server refuses the machine's certificate. While
//! the control plane is killed, replication and points go on and the agent restarts
//! with the orders it kept; restarted, the control plane has its state.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_replica::{Disk, Store, VaultKey};
use ferry_testkit::cli::{bookmark, status, wait_uploaded};
use ferry_testkit::net::free_addr;
use ferry_testkit::process::{run_ok, spawn, Killed};
use ferry_testkit::qemu::{qemu_io, random_writes};
use ferry_testkit::site::rebuilt;
use ferry_testkit::{wait_for, wait_ok};
use rand::SeedableRng;
use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const DISK_BYTES: u64 = 16 << 20;

fn bin() -> &'static Path {
    Path::new(FERRY)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A running control plane: its URL, CA and admin token, and the raw API.
struct Cp {
    child: Killed,
    url: String,
    ca: PathBuf,
    token_file: PathBuf,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Cp {
    /// Starts (or, on the same state directory and address, restarts) it.
    fn start(dir: &Path, listen: &str) -> Cp {
        let (child, line) = spawn(
            bin(),
            &["control-plane", "--state-dir", &s(dir), "--listen", listen],
        );
        let url = line.trim().to_string();
        assert!(url.starts_with("https://"), "{line:?}");
        let ca = dir.join("ca.pem");
        let pem = std::fs::read(&ca).unwrap();
        use rustls_pki_types::pem::PemObject;
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
        Cp {
            child,
            url,
            token_file: dir.join("admin.token"),
            ca,
            http: reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// `ferry cp ARGS` as the admin; its stdout.
    fn cli(&self, args: &[&str]) -> String {
        let (url, tf, ca) = (self.url.clone(), s(&self.token_file), s(&self.ca));
        let mut all = vec!["cp", "--url", &url, "--token-file", &tf, "--ca", &ca];
        all.extend_from_slice(args);
        run_ok(bin(), &all)
    }

    /// A one-time enrollment token (the last line of `tokens create --for`).
    fn enroll_token(&self, kind: &str) -> String {
        let out = self.cli(&["tokens", "create", "--for", kind]);
        out.lines().last().unwrap().trim().to_string()
    }

    /// One API call as the admin; the status and the JSON answer.
    fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let token = std::fs::read_to_string(&self.token_file).unwrap();
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token.trim());
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&b).unwrap());
        }
        self.rt.block_on(async {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        })
    }

    fn machine(&self, name: &str) -> Value {
        let (st, m) = self.api("GET", &format!("/v1/machines/{name}"), None);
        assert_eq!(st, 200, "{m}");
        m
    }
}

/// An enrolled process server named `name`, its cache under `dir`.
fn process_server(cp: &Cp, dir: &Path, name: &str, store: &str) -> (Killed, String) {
    let listen = free_addr().to_string();
    let token = cp.enroll_token("process-server");
    let (child, line) = spawn(
        bin(),
        &[
            "process-server",
            "--control-plane",
            &cp.url,
            "--ca",
            &s(&cp.ca),
            "--enroll-token",
            &token,
            "--name",
            name,
            "--listen",
            &listen,
            "--advertise",
            &listen,
            "--cache-dir",
            &s(&dir.join(format!("cache-{name}"))),
            "--store",
            store,
            "--key-file",
            &s(&dir.join("vault.key")),
            "--shards",
            "1",
            "--batch-ms",
            "20",
            "--cache-gib",
            "0.25",
        ],
    );
    assert!(line.contains("listening on"), "{line:?}");
    let id = dir.join(format!("cache-{name}/identity"));
    assert_eq!(
        std::fs::metadata(id.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    (child, listen)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Distinct newest points the agent reports over `span`.
fn points_seen(sock: &Path, span: Duration) -> usize {
    let mut ids = std::collections::BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < span {
        if let Some(p) = status(bin(), sock)["last_point"].as_str() {
            ids.insert(p.to_string());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ids.len()
}

#[test]
fn enrolled_parts_follow_a_policy_change_and_a_move_with_every_point_identical() {
    let seed = ferry_testkit::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cp_listen = free_addr().to_string();
    let mut cp = Cp::start(&d.join("cp"), &cp_listen);
    std::fs::create_dir_all(d.join("store")).unwrap();
    let store = format!("file://{}", s(&d.join("store")));
    run_ok(bin(), &["keygen", "--out", &s(&d.join("vault.key"))]);

    let (_ps1, addr1) = process_server(&cp, d, "ps1", &store);
    let (_ps2, addr2) = process_server(&cp, d, "ps2", &store);

    // The agent enrolls; no process server, certificate or interval on its command
    // line: the first heartbeat's orders give them.
    let disk = d.join("disk.img");
    ferry_testkit::disk::random_disk(&disk, DISK_BYTES, 0..4 << 20, &mut rng);
    let state = d.join("agent");
    let sock = d.join("agent.sock");
    let token = cp.enroll_token("agent");
    let nbd_listen = free_addr().to_string();
    let agent_args = |token: Option<&str>| {
        let mut a = vec![
            "agent".to_string(),
            "--control-plane".into(),
            cp.url.clone(),
            "--ca".into(),
            s(&cp.ca),
            "--machine".into(),
            "m1".into(),
            "--disk".into(),
            format!("sda={}", s(&disk)),
            "--nbd-listen".into(),
            nbd_listen.clone(),
            "--state-dir".into(),
            s(&state),
            "--admin-socket".into(),
            s(&sock),
        ];
        if let Some(t) = token {
            a.extend(["--enroll-token".to_string(), t.to_string()]);
        }
        a
    };
    let (mut agent, line) = spawn(bin(), &agent_args(Some(&token)));
    assert!(line.contains("serving NBD"), "{line:?}");
    assert_eq!(
        mode(&state.join("key.pem")),
        0o600,
        "the key is the host's only"
    );
    for f in ["cert.pem", "ca.pem", "orders.json", "journal"] {
        assert!(state.join(f).exists(), "{f} in the state directory");
    }
    let nbd = format!("nbd://{nbd_listen}/sda");

    // The machine is registered on one of the two process servers.
    let first_ps = wait_ok("m1 assigned", Duration::from_secs(30), || {
        let m = cp.machine("m1");
        match m["process_server"].as_str() {
            Some(p) => Ok(p.to_string()),
            None => Err(m),
        }
    });
    let (other_ps, other_addr) = if first_ps == "ps1" {
        ("ps2", &addr2)
    } else {
        ("ps1", &addr1)
    };

    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    wait_uploaded(bin(), &sock);
    for round in 0..2 {
        qemu_io(&nbd, &random_writes(&mut rng, DISK_BYTES, 30, 1..=8));
        let id = bookmark(bin(), &sock, &format!("first-{round}"));
        expected.push((id, std::fs::read(&disk).unwrap()));
    }

    // A policy change reaches the running agent at its next heartbeat: the default
    // policy's 5 s becomes half a second.
    let (st, p) = cp.api(
        "PATCH",
        "/v1/policies/default",
        Some(json!({ "crash_point_interval_s": 0.5 })),
    );
    assert_eq!(st, 200, "{p}");
    wait_for("points every half second", Duration::from_secs(30), || {
        points_seen(&sock, Duration::from_secs(2)) >= 3
    });

    // The operator moves the machine; the agent reconnects there, nothing lost.
    cp.cli(&["machines", "move", "m1", "--to", other_ps]);
    for round in 0..3 {
        qemu_io(&nbd, &random_writes(&mut rng, DISK_BYTES, 30, 1..=8));
        let id = bookmark(bin(), &sock, &format!("moved-{round}"));
        expected.push((id, std::fs::read(&disk).unwrap()));
    }
    wait_for(
        "m1 on the other process server",
        Duration::from_secs(60),
        || {
            let m = cp.machine("m1");
            m["process_server"] == json!(other_ps)
        },
    );
    // The agent applied the move at a heartbeat (its kept orders say so).
    let orders_file = state.join("orders.json");
    wait_for(
        "the agent to take the move",
        Duration::from_secs(30),
        || {
            let orders: Value =
                serde_json::from_str(&std::fs::read_to_string(&orders_file).unwrap()).unwrap();
            orders["process_server"]["address"] == json!(other_addr)
        },
    );
    qemu_io(&nbd, &random_writes(&mut rng, DISK_BYTES, 30, 1..=8));
    let id = bookmark(bin(), &sock, "after-move");
    expected.push((id, std::fs::read(&disk).unwrap()));
    wait_uploaded(bin(), &sock);
    let m = cp.machine("m1");
    assert!(
        m["rpo_seconds"].as_f64().is_some(),
        "an RPO once a point is up: {m}"
    );

    // The control plane is killed: replication and points go on, and the agent
    // restarts (no token: its certificate is in the state directory) with the
    // orders it kept.
    cp.child.kill();
    qemu_io(&nbd, &random_writes(&mut rng, DISK_BYTES, 30, 1..=8));
    let id = bookmark(bin(), &sock, "control-plane-down");
    expected.push((id, std::fs::read(&disk).unwrap()));
    wait_uploaded(bin(), &sock);
    agent.kill();
    let (_agent, line) = spawn(bin(), &agent_args(None));
    assert!(line.contains("serving NBD"), "{line:?}");
    qemu_io(&nbd, &random_writes(&mut rng, DISK_BYTES, 30, 1..=8));
    let id = bookmark(bin(), &sock, "restarted-without-control-plane");
    expected.push((id, std::fs::read(&disk).unwrap()));
    wait_uploaded(bin(), &sock);

    // Back, it has its state, and the heartbeats resume.
    let cp = Cp::start(&d.join("cp"), &cp_listen);
    let before = cp.machine("m1");
    assert_eq!(before["process_server"], json!(other_ps), "{before}");
    wait_for(
        "a heartbeat after the restart",
        Duration::from_secs(30),
        || cp.machine("m1")["last_seen"] != before["last_seen"],
    );

    let vault = VaultKey::load(&d.join("vault.key")).unwrap();
    let store = Store::open(&store).unwrap();
    let replica = store
        .block(Disk::open(&store, "m1", "sda", Some(&vault)))
        .unwrap();
    let state = store.block(replica.load_state()).unwrap();
    for (id, want) in &expected {
        let p = state
            .point(id)
            .unwrap_or_else(|| panic!("point {id} is not in the replica"));
        assert!(
            rebuilt(&replica, &state, p) == *want,
            "point {id} does not rebuild the disk as it was"
        );
    }

    // Removed, the machine's certificate is revoked: the process server learns it
    // at its next heartbeat and closes the agent's session, with the reason.
    cp.cli(&["machines", "remove", "m1"]);
    wait_for(
        "the process server to refuse the removed machine",
        Duration::from_secs(60),
        || {
            let st = status(bin(), &sock);
            st["connected"] == false
                && st["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("revoked"))
        },
    );
}

#[test]
fn a_renewed_certificate_replaces_the_old_one_and_heartbeats_go_on_with_it() {
    use ferry_link::control::client::{ControlClient, Enrollment};
    use ferry_link::control::wire::{AgentHeartbeat, AgentOrders, Kind};

    let tmp = tempfile::tempdir().unwrap();
    let cp = Cp::start(&tmp.path().join("cp"), "127.0.0.1:0");
    let state = tmp.path().join("m2");
    let enrollment = Enrollment {
        url: cp.url.clone(),
        ca: cp.ca.clone(),
        kind: Kind::Agent,
        name: "m2".into(),
        advertise: None,
        dir: state.clone(),
    };
    let token = cp.enroll_token("agent");
    let mut client = ControlClient::open(&enrollment, Some(&token)).unwrap();
    // The token works once.
    let again = ControlClient::open(
        &Enrollment {
            dir: tmp.path().join("m2-again"),
            ..enrollment.clone()
        },
        Some(&token),
    );
    assert!(again.is_err(), "a used token enrolled again");

    let heartbeat = |c: &ControlClient| {
        c.call::<_, AgentOrders>(
            "/v1/heartbeat/agent",
            &AgentHeartbeat {
                machine: "m2".into(),
                disks: vec![],
                process_server: None,
                last_error: None,
                group_listen: None,
            },
        )
    };
    heartbeat(&client).unwrap();
    let (cert, key) = (
        std::fs::read_to_string(state.join("cert.pem")).unwrap(),
        std::fs::read_to_string(state.join("key.pem")).unwrap(),
    );
    let v = client.validity();
    assert!(!client.renew_if_due(v.issued_at).unwrap(), "not due yet");
    assert!(
        client.renew_if_due(v.renew_at()).unwrap(),
        "due at two thirds"
    );
    assert_ne!(
        std::fs::read_to_string(state.join("cert.pem")).unwrap(),
        cert
    );
    assert_ne!(std::fs::read_to_string(state.join("key.pem")).unwrap(), key);
    assert_eq!(mode(&state.join("key.pem")), 0o600);
    heartbeat(&client).unwrap();
    // And a restart loads the renewed identity without a token.
    let reopened = ControlClient::open(&enrollment, None).unwrap();
    heartbeat(&reopened).unwrap();
}
