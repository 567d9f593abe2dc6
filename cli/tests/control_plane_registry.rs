//! Enrollment, mutual TLS, heartbeats and the registry against a real `ferry
//! control-plane`: CSRs made here with rcgen, certificates presented over mutual TLS
//! with reqwest, and `ferry cp` for the operator's side.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_testkit::process::{run, spawn, Killed};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

struct Cp {
    child: Killed,
    url: String,
    dir: PathBuf,
}

fn start(dir: &Path) -> Cp {
    let args = [
        "control-plane",
        "--state-dir",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    let (child, line) = spawn(Path::new(FERRY), &args);
    let url = line.trim().to_string();
    assert!(url.starts_with("https://127.0.0.1:"), "{line:?}");
    Cp {
        child,
        url,
        dir: dir.to_path_buf(),
    }
}

impl Cp {
    fn admin(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn cli_ok(&self, args: &[&str]) -> String {
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
        let out = run(Path::new(FERRY), &all);
        assert!(
            out.status.success(),
            "ferry cp {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A client with no certificate, or with `id`'s.
    fn http(&self, id: Option<&Identity>) -> Http {
        let pem = std::fs::read(self.dir.join("ca.pem")).unwrap();
        Http::new(&self.url, &pem, id)
    }

    /// A fresh enrollment token, through the API.
    fn token(&self, kind: &str) -> String {
        let a = self.http(None).json(
            "POST",
            "/v1/enrollment-tokens",
            Some(&self.admin()),
            &json!({"for": kind}),
        );
        assert_eq!(a.status, 201, "{}", a.body);
        a.json()["token"].as_str().unwrap().to_string()
    }
}

/// A key made here, and the certificate the control plane issued for it.
struct Identity {
    key: rcgen::KeyPair,
    cert_pem: String,
}

impl Identity {
    fn der(&self) -> Vec<u8> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    }
}

fn csr(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

struct Http {
    url: String,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// Asserts this status and a problem whose detail contains `detail`.
    fn problem(&self, status: u16, detail: &str) {
        assert_eq!(self.status, status, "{detail}: {}", self.body);
        let d = self.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(d.contains(detail), "{d:?} lacks {detail:?}");
    }
}

impl Http {
    fn new(url: &str, ca_pem: &[u8], id: Option<&Identity>) -> Http {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(c.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut tls = match id {
            None => builder.with_no_client_auth(),
            Some(id) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(id.der())],
                    PrivateKeyDer::Pkcs8(id.key.serialize_der().into()),
                )
                .unwrap(),
        };
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

    fn try_send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, reqwest::Error> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        self.rt.block_on(async {
            let resp = req.send().await?;
            let status = resp.status().as_u16();
            let body = resp.text().await?;
            Ok(Answer { status, body })
        })
    }

    fn send(&self, method: &str, path: &str, token: Option<&str>) -> Answer {
        self.try_send(method, path, token, None).unwrap()
    }

    fn json(&self, method: &str, path: &str, token: Option<&str>, body: &Value) -> Answer {
        self.try_send(method, path, token, Some(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }
}

/// Enrolls with `token`; the answer.
fn enroll_raw(cp: &Cp, token: &str, kind: &str, name: &str, key: &rcgen::KeyPair) -> Answer {
    let mut body = json!({"token": token, "kind": kind, "name": name, "csr_pem": csr(key)});
    if kind == "process-server" {
        body["advertise"] = json!(format!("127.0.0.1:{}", 7000 + name.len()));
    }
    cp.http(None).json("POST", "/v1/enroll", None, &body)
}

fn enroll(cp: &Cp, kind: &str, name: &str) -> Identity {
    let key = rcgen::KeyPair::generate().unwrap();
    let a = enroll_raw(cp, &cp.token(kind), kind, name, &key);
    assert_eq!(a.status, 200, "{}", a.body);
    let issued = a.json();
    assert_eq!(
        issued["ca_pem"].as_str().unwrap(),
        std::fs::read_to_string(cp.dir.join("ca.pem")).unwrap()
    );
    Identity {
        key,
        cert_pem: issued["certificate_pem"].as_str().unwrap().to_string(),
    }
}

fn rfc3339_ago(s: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::seconds(s)).to_rfc3339()
}

fn agent_beat(machine: &str, state: &str, uploaded_ago: Option<i64>) -> Value {
    let uploaded =
        uploaded_ago.map(|s| json!({"id": "p1", "kind": "crash", "time": rfc3339_ago(s)}));
    json!({"machine": machine, "process_server": null, "last_error": null, "disks": [{
        "name": "d0", "size_bytes": 1048576, "state": state, "initial_copy_percent": 100.0,
        "journal_bytes": 0, "unacked_bytes": 0, "newest_point": uploaded,
        "newest_uploaded_point": uploaded}]})
}

fn ps_beat(name: &str, free: u64) -> Value {
    json!({"name": name, "address": format!("127.0.0.1:{}", 7000 + name.len()),
           "cache_used_bytes": 100 - free, "cache_free_bytes": free, "ingest_bytes_per_s": 0.0,
           "upload_lag_s": 0.5, "cpu_percent": 3.0, "health": "normal", "health_reasons": [],
           "machines": []})
}

/// A heartbeat (agent or process server, by its body) with `id`'s certificate.
fn beat(cp: &Cp, id: &Identity, body: &Value) -> Answer {
    let http = cp.http(Some(id));
    let path = if body.get("machine").is_some() {
        "/v1/heartbeat/agent"
    } else {
        "/v1/heartbeat/process-server"
    };
    http.json("POST", path, None, body)
}

#[test]
fn enrolled_parts_heartbeat_over_mutual_tls_and_the_registry_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = start(&tmp.path().join("cp"));
    let admin = cp.admin();
    let http = cp.http(None);

    // Process servers enroll with tokens from the CLI (secret on the last line).
    let made = cp.cli_ok(&["tokens", "create", "--for", "process-server", "--ttl", "1h"]);
    let token = made.lines().last().unwrap().trim().to_string();
    assert!(token.starts_with("ferry_enroll_"), "{made}");
    let key = rcgen::KeyPair::generate().unwrap();
    let a = enroll_raw(&cp, &token, "process-server", "ps1", &key);
    assert_eq!(a.status, 200, "{}", a.body);
    let ps1 = Identity {
        key,
        cert_pem: a.json()["certificate_pem"].as_str().unwrap().to_string(),
    };
    // Named as the data plane checks: its name and its advertised host.
    let der = ps1.der();
    assert!(ferry_link::tls::certs::cert_names(&der, "ps1"));
    assert!(ferry_link::tls::certs::cert_names(&der, "127.0.0.1"));
    let ps2 = enroll(&cp, "process-server", "ps2");
    for (id, name) in [(&ps1, "ps1"), (&ps2, "ps2")] {
        let a = beat(&cp, id, &ps_beat(name, 50));
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.json()["revoked_serials"], json!([]));
        assert_eq!(a.json()["heartbeat_interval_s"], json!(5.0));
    }

    // Agents: the first heartbeat registers and assigns the least loaded (ties by name).
    let m1 = enroll(&cp, "agent", "m1");
    assert!(ferry_link::tls::certs::cert_names(&m1.der(), "m1"));
    let orders = beat(&cp, &m1, &agent_beat("m1", "protected", Some(10))).json();
    assert_eq!(
        orders["process_server"],
        json!({"name": "ps1", "address": "127.0.0.1:7003"})
    );
    assert_eq!(orders["policy"]["name"], json!("default"));
    assert_eq!(orders["policy"]["crash_point_interval_s"], json!(5.0));
    let m2 = enroll(&cp, "agent", "m2");
    let orders = beat(&cp, &m2, &agent_beat("m2", "protected", None)).json();
    assert_eq!(
        orders["process_server"]["name"],
        json!("ps2"),
        "ps1 has one"
    );

    let m = http.send("GET", "/v1/machines/m1", Some(&admin)).json();
    assert_eq!(m["health"], json!("normal"), "{m}");
    assert_eq!(m["state"], json!("protected"));
    assert_eq!(m["process_server"], json!("ps1"));
    let rpo = m["rpo_seconds"].as_f64().unwrap();
    assert!((9.0..20.0).contains(&rpo), "{rpo}");
    let m = http.send("GET", "/v1/machines/m2", Some(&admin)).json();
    assert_eq!(m["rpo_seconds"], Value::Null, "no point uploaded yet");

    // Health from RPO over the default policy's thresholds (30 s, 120 s), and resync.
    beat(&cp, &m1, &agent_beat("m1", "protected", Some(60)));
    let m = http.send("GET", "/v1/machines/m1", Some(&admin)).json();
    assert_eq!(m["health"], json!("warning"), "{m}");
    assert!(m["health_reasons"][0]
        .as_str()
        .unwrap()
        .contains("warning threshold 30 s"));
    beat(&cp, &m1, &agent_beat("m1", "resync", Some(500)));
    let m = http.send("GET", "/v1/machines/m1", Some(&admin)).json();
    assert_eq!(m["health"], json!("critical"), "{m}");
    assert_eq!(m["state"], json!("resync"));
    let reasons = m["health_reasons"].to_string();
    assert!(
        reasons.contains("critical threshold 120 s") && reasons.contains("disk d0 is in resync")
    );
    // The background sweep (every heartbeat interval) records the change as an event.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let evs = http
            .send("GET", "/v1/events?limit=1000", Some(&admin))
            .json();
        let swept = evs["items"].as_array().unwrap().iter().any(|e| {
            e["kind"] == json!("health")
                && e["subject"] == json!("machine m1")
                && e["message"].as_str().unwrap().contains("-> critical")
        });
        if swept {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no health event: {evs}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let metrics = http.send("GET", "/metrics", None).body;
    assert!(
        metrics.contains("ferry_machine_health{machine=\"m1\"} 2"),
        "{metrics}"
    );
    let rpo: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferry_machine_rpo_seconds{machine=\"m1\"} "))
        .unwrap_or_else(|| panic!("{metrics}"))
        .parse()
        .unwrap();
    assert!((499.0..560.0).contains(&rpo), "{rpo}");
    assert!(
        !metrics.contains("ferry_machine_rpo_seconds{machine=\"m2\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("ferry_process_server_cache_free_bytes{process_server=\"ps1\"} 50"));

    // An operator's move and a new policy and group reach the agent at its next heartbeat.
    cp.cli_ok(&["machines", "move", "m1", "--to", "ps2"]);
    cp.cli_ok(&[
        "policies",
        "create",
        "gold",
        "--crash-point-interval-s",
        "0.5",
    ]);
    let shown = cp.cli_ok(&[
        "machines",
        "set-policy",
        "m1",
        "--policy",
        "gold",
        "--group",
        "g1",
        "--json",
    ]);
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(
        (&shown["policy"], &shown["group"]),
        (&json!("gold"), &json!("g1"))
    );
    let orders = beat(&cp, &m1, &agent_beat("m1", "protected", Some(1))).json();
    assert_eq!(
        orders["process_server"],
        json!({"name": "ps2", "address": "127.0.0.1:7003"})
    );
    assert_eq!(
        orders["policy"],
        json!({"name": "gold", "crash_point_interval_s": 0.5, "app_point_interval_s": 0})
    );
    assert_eq!(orders["group"], json!("g1"));
    http.send("DELETE", "/v1/policies/gold", Some(&admin))
        .problem(409, "policy gold is used by machine m1");
    let groups = http.send("GET", "/v1/groups", Some(&admin)).json();
    assert_eq!(groups["items"], json!([{"name": "g1", "machines": ["m1"]}]));
    let table = cp.cli_ok(&["machines", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("m1") && l.contains("ps2") && l.contains("gold")),
        "{table}"
    );
    let table = cp.cli_ok(&["process-servers", "list"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("ps2") && l.contains("127.0.0.1:7003")),
        "{table}"
    );

    // A certificate speaks only for its owner; none at all is a 401.
    beat(&cp, &m1, &agent_beat("m2", "protected", None)).problem(403, "agent m1's, not agent m2's");
    beat(&cp, &m1, &ps_beat("ps1", 50)).problem(403, "not process-server ps1's");
    http.json(
        "POST",
        "/v1/heartbeat/agent",
        None,
        &agent_beat("m1", "protected", None),
    )
    .problem(401, "mutual TLS");
    // Unknown fields and bad values in heartbeats.
    let mut bad = agent_beat("m1", "protected", None);
    bad["colour"] = json!("blue");
    beat(&cp, &m1, &bad).problem(400, "colour");
    let mut bad = ps_beat("ps1", 50);
    bad["colour"] = json!("blue");
    beat(&cp, &ps1, &bad).problem(400, "colour");
    cp.http(Some(&m1))
        .json(
            "POST",
            "/v1/renew",
            None,
            &json!({"csr_pem": csr(&m1.key), "colour": 1}),
        )
        .problem(400, "colour");
    beat(&cp, &m1, &agent_beat("m1", "asleep", None)).problem(400, "asleep");

    // Renewal: a new certificate for the same owner, which heartbeats like the first.
    let key = rcgen::KeyPair::generate().unwrap();
    let a = cp
        .http(Some(&m1))
        .json("POST", "/v1/renew", None, &json!({"csr_pem": csr(&key)}));
    assert_eq!(a.status, 200, "{}", a.body);
    let renewed = Identity {
        key,
        cert_pem: a.json()["certificate_pem"].as_str().unwrap().to_string(),
    };
    assert_eq!(
        beat(&cp, &renewed, &agent_beat("m1", "protected", Some(1))).status,
        200
    );

    // Removal revokes every certificate of the machine: refused from then on, and the
    // process servers learn the serials with their heartbeat.
    assert!(cp
        .cli_ok(&["machines", "remove", "m1"])
        .contains("removed machine m1"));
    for id in [&m1, &renewed] {
        beat(&cp, id, &agent_beat("m1", "protected", None)).problem(403, "revoked");
    }
    cp.http(Some(&renewed))
        .json(
            "POST",
            "/v1/renew",
            None,
            &json!({"csr_pem": csr(&renewed.key)}),
        )
        .problem(403, "revoked");
    http.send("GET", "/v1/machines/m1", Some(&admin))
        .problem(404, "no machine m1");
    let revoked = beat(&cp, &ps1, &ps_beat("ps1", 50)).json()["revoked_serials"].clone();
    assert_eq!(revoked.as_array().unwrap().len(), 2, "{revoked}");

    // Removing a process server frees its machines for the next least loaded.
    cp.cli_ok(&["process-servers", "remove", "ps2"]);
    beat(&cp, &ps2, &ps_beat("ps2", 50)).problem(403, "revoked");
    let orders = beat(&cp, &m2, &agent_beat("m2", "protected", None)).json();
    assert_eq!(orders["process_server"]["name"], json!("ps1"));

    let events = cp.cli_ok(&["events", "list", "--json"]);
    let events: Value = serde_json::from_str(&events).unwrap();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "enrolled",
        "registered",
        "assigned",
        "moved",
        "changed",
        "removed",
    ] {
        assert!(kinds.contains(&k), "no {k} event in {kinds:?}");
    }
    let page = http
        .send("GET", "/v1/events?limit=2&after=1", Some(&admin))
        .json();
    assert_eq!(page["items"][0]["id"], json!(2));
    assert_eq!(page["next_after"], json!("3"));
    assert!(cp
        .cli_ok(&["events", "list"])
        .contains("moved from process server ps1 to ps2"));
}

#[test]
fn enrollment_refuses_used_expired_forged_and_wrong_kind_tokens_and_foreign_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = start(&tmp.path().join("cp"));
    let key = rcgen::KeyPair::generate().unwrap();
    let token = cp.token("agent");
    // A bad CSR or name is a 400 and spends nothing.
    let http = cp.http(None);
    let body = |name: &str, csr_pem: &str| json!({"token": token, "kind": "agent", "name": name, "csr_pem": csr_pem});
    http.json("POST", "/v1/enroll", None, &body("m1", "garbage"))
        .problem(400, "CSR");
    http.json("POST", "/v1/enroll", None, &body("../m1", &csr(&key)))
        .problem(400, "machine name");
    let mut extra = body("m1", &csr(&key));
    extra["colour"] = json!("blue");
    http.json("POST", "/v1/enroll", None, &extra)
        .problem(400, "colour");
    let ps_token = cp.token("process-server");
    let no_advertise = json!({"token": ps_token, "kind": "process-server", "name": "ps1",
                              "csr_pem": csr(&key)});
    http.json("POST", "/v1/enroll", None, &no_advertise)
        .problem(400, "advertise");
    // Wrong kind, then the right one once, then used.
    enroll_raw(&cp, &ps_token, "agent", "m1", &key).problem(401, "for a process-server");
    assert_eq!(enroll_raw(&cp, &token, "agent", "m1", &key).status, 200);
    enroll_raw(&cp, &token, "agent", "m2", &key).problem(401, "already used (by m1");
    // A token does not take over an enrolled name; it is not spent by trying.
    let again = cp.token("agent");
    enroll_raw(&cp, &again, "agent", "m1", &key).problem(409, "agent m1 is enrolled already");
    assert_eq!(enroll_raw(&cp, &again, "agent", "m5", &key).status, 200);
    enroll_raw(&cp, "ferry_enroll_0000", "agent", "m2", &key).problem(401, "unknown");
    // An API token is no enrollment token.
    enroll_raw(&cp, &cp.admin(), "agent", "m2", &key).problem(401, "unknown");
    let short = http.json(
        "POST",
        "/v1/enrollment-tokens",
        Some(&cp.admin()),
        &json!({"for": "agent", "ttl_s": 1}),
    );
    let short = short.json()["token"].as_str().unwrap().to_string();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    enroll_raw(&cp, &short, "agent", "m3", &key).problem(401, "expired");

    // A used token stays used after a kill -9 and a restart.
    cp.child.kill();
    let cp = start(&cp.dir);
    enroll_raw(&cp, &token, "agent", "m4", &key).problem(401, "already used");

    // A certificate from another CA fails the handshake; one of the site CA that
    // enrollment did not issue is refused.
    let other =
        ferry_link::tls::certs::Authority::create(&tmp.path().join("other"), "other").unwrap();
    let id = other
        .issue("m1", "m1", false, ferry_link::tls::certs::Validity::Current)
        .unwrap();
    let foreign = Identity {
        key: rcgen::KeyPair::from_pem(&std::fs::read_to_string(&id.key).unwrap()).unwrap(),
        cert_pem: std::fs::read_to_string(&id.cert).unwrap(),
    };
    let ca = std::fs::read(cp.dir.join("ca.pem")).unwrap();
    let refused = Http::new(&cp.url, &ca, Some(&foreign)).try_send(
        "POST",
        "/v1/heartbeat/agent",
        None,
        Some(serde_json::to_vec(&agent_beat("m1", "protected", None)).unwrap()),
    );
    assert!(refused.is_err(), "a foreign certificate was let through");
}

#[test]
fn new_endpoints_refuse_wrong_tokens_roles_and_unknown_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = start(&tmp.path().join("cp"));
    let http = cp.http(None);
    let admin = cp.admin();
    let token_of = |name: &str, role: &str| {
        let a = http.json(
            "POST",
            "/v1/tokens",
            Some(&admin),
            &json!({"name": name, "role": role}),
        );
        a.json()["token"].as_str().unwrap().to_string()
    };
    let viewer = token_of("v", "viewer");
    let operator = token_of("o", "operator");
    let ps1 = enroll(&cp, "process-server", "ps1");
    beat(&cp, &ps1, &ps_beat("ps1", 50));
    let m1 = enroll(&cp, "agent", "m1");
    beat(&cp, &m1, &agent_beat("m1", "protected", None));

    let endpoints: [(&str, &str, Option<Value>, &str); 11] = [
        ("GET", "/v1/machines", None, "viewer"),
        ("GET", "/v1/machines/m1", None, "viewer"),
        (
            "POST",
            "/v1/machines/m1/move",
            Some(json!({"to": "ps1"})),
            "operator",
        ),
        (
            "PATCH",
            "/v1/machines/m1",
            Some(json!({"group": "g"})),
            "admin",
        ),
        ("DELETE", "/v1/machines/m1", None, "admin"),
        ("GET", "/v1/process-servers", None, "viewer"),
        ("GET", "/v1/process-servers/ps1", None, "viewer"),
        ("DELETE", "/v1/process-servers/ps1", None, "admin"),
        ("GET", "/v1/groups", None, "viewer"),
        ("GET", "/v1/events", None, "viewer"),
        (
            "POST",
            "/v1/enrollment-tokens",
            Some(json!({"for": "agent"})),
            "admin",
        ),
    ];
    for (method, path, body, least) in &endpoints {
        let send = |token: Option<&str>| match body {
            Some(b) => http.json(method, path, token, b),
            None => http.send(method, path, token),
        };
        let what = format!("{method} {path}");
        assert_eq!(send(None).status, 401, "{what} without a token");
        assert_eq!(
            send(Some("ferry_0000")).status,
            401,
            "{what} with a wrong token"
        );
        match *least {
            "viewer" => assert_eq!(send(Some(&viewer)).status, 200, "{what} as viewer"),
            "operator" => {
                assert_eq!(send(Some(&viewer)).status, 403, "{what} as viewer");
                assert_eq!(send(Some(&operator)).status, 200, "{what} as operator");
            }
            _ => {
                assert_eq!(send(Some(&viewer)).status, 403, "{what} as viewer");
                assert_eq!(send(Some(&operator)).status, 403, "{what} as operator");
            }
        }
        if let Some(b) = body {
            let mut extra = b.clone();
            extra["colour"] = json!("blue");
            http.json(method, path, Some(&admin), &extra)
                .problem(400, "colour");
        }
    }
    // Bad names and values.
    http.send("GET", "/v1/machines/.x", Some(&admin))
        .problem(400, "machine name");
    http.json(
        "POST",
        "/v1/machines/m1/move",
        Some(&admin),
        &json!({"to": "nope"}),
    )
    .problem(400, "no process server nope");
    http.json(
        "PATCH",
        "/v1/machines/m1",
        Some(&admin),
        &json!({"policy": "nope"}),
    )
    .problem(400, "no policy nope");
    http.send("GET", "/v1/machines/zz", Some(&admin))
        .problem(404, "no machine zz");
    http.send("GET", "/v1/events?after=x", Some(&admin))
        .problem(400, "event id");
    http.json(
        "POST",
        "/v1/enrollment-tokens",
        Some(&admin),
        &json!({"for": "agent", "ttl_s": 0}),
    )
    .problem(400, "ttl_s");
    http.json(
        "POST",
        "/v1/enrollment-tokens",
        Some(&admin),
        &json!({"for": "robot"}),
    )
    .problem(400, "robot");
    // The group can be cleared with null.
    let m = http
        .json(
            "PATCH",
            "/v1/machines/m1",
            Some(&admin),
            &json!({"group": null}),
        )
        .json();
    assert_eq!(m["group"], Value::Null);
    // After the admin's DELETEs, both are gone.
    assert_eq!(
        http.send("DELETE", "/v1/machines/m1", Some(&admin)).status,
        204
    );
    assert_eq!(
        http.send("DELETE", "/v1/process-servers/ps1", Some(&admin))
            .status,
        204
    );
    http.send("DELETE", "/v1/machines/m1", Some(&admin))
        .problem(404, "no machine m1");
    http.send("GET", "/v1/process-servers/ps1", Some(&admin))
        .problem(404, "no process server");
}

/// Eight enrolled parts heartbeating at once, fifty times each, on the default
/// SQLite: every heartbeat is a 200 (two at once used to be a 500, "database is
/// locked").
#[test]
fn concurrent_heartbeats_are_never_a_server_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = start(&tmp.path().join("cp"));
    let ca = std::fs::read(cp.dir.join("ca.pem")).unwrap();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (kind, name) = if w % 2 == 0 {
                ("agent", format!("m{w}"))
            } else {
                ("process-server", format!("ps{w}"))
            };
            let id = enroll(&cp, kind, &name);
            let body = if w % 2 == 0 {
                agent_beat(&name, "protected", Some(1))
            } else {
                ps_beat(&name, 50)
            };
            let (url, ca) = (cp.url.clone(), ca.clone());
            std::thread::spawn(move || {
                let http = Http::new(&url, &ca, Some(&id));
                let path = if w % 2 == 0 {
                    "/v1/heartbeat/agent"
                } else {
                    "/v1/heartbeat/process-server"
                };
                (0..50)
                    .map(|_| http.json("POST", path, None, &body))
                    .filter(|a| a.status != 200)
                    .map(|a| format!("{name}: {} {}", a.status, a.body))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let failed: Vec<String> = writers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(failed.is_empty(), "{} failed: {failed:#?}", failed.len());
}

/// What the other tests leave out: a forged token of the right shape, bodies over
/// 64 KiB where a certificate or a token is enough to be heard, and a bad name on
/// every path parameter of the registry's endpoints.
#[test]
fn forged_tokens_oversized_bodies_and_bad_path_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = start(&tmp.path().join("cp"));
    let key = rcgen::KeyPair::generate().unwrap();
    // Shaped like an enrollment token, never issued.
    let forged = format!("ferry_enroll_{:064x}", rand::random::<u128>());
    assert_eq!(forged.len(), cp.token("agent").len());
    enroll_raw(&cp, &forged, "agent", "m1", &key).problem(401, "unknown");

    let big = Some(vec![b' '; 65 * 1024]);
    let anyone = cp.http(None);
    anyone
        .try_send("POST", "/v1/enroll", None, big.clone())
        .unwrap()
        .problem(413, "");
    let agent = cp.http(Some(&enroll(&cp, "agent", "m1")));
    let ps = cp.http(Some(&enroll(&cp, "process-server", "ps1")));
    for (http, path) in [
        (&agent, "/v1/heartbeat/agent"),
        (&ps, "/v1/heartbeat/process-server"),
        (&agent, "/v1/renew"),
    ] {
        let a = http.try_send("POST", path, None, big.clone()).unwrap();
        assert_eq!(a.status, 413, "POST {path} with 65 KiB: {}", a.body);
    }

    let admin = cp.admin();
    for bad in [".x", "-x", "a%2Fb", "a%20b", &"n".repeat(65)] {
        for (method, path, body) in [
            ("GET", format!("/v1/machines/{bad}"), None),
            (
                "PATCH",
                format!("/v1/machines/{bad}"),
                Some(json!({"group": "g"})),
            ),
            ("DELETE", format!("/v1/machines/{bad}"), None),
            (
                "POST",
                format!("/v1/machines/{bad}/move"),
                Some(json!({"to": "ps1"})),
            ),
            ("GET", format!("/v1/machines/{bad}/points"), None),
            ("GET", format!("/v1/process-servers/{bad}"), None),
            ("DELETE", format!("/v1/process-servers/{bad}"), None),
        ] {
            let a = match body {
                Some(b) => anyone.json(method, &path, Some(&admin), &b),
                None => anyone.send(method, &path, Some(&admin)),
            };
            assert_eq!(a.status, 400, "{method} {path}: {}", a.body);
        }
    }
}
