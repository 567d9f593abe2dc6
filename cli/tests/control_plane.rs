//! `ferry control-plane` as a real process, and `ferry cp` against it: the state
//! directory it makes (and keeps across a kill -9), the CLI round trip, and bad input
//! on every endpoint, each answered with its status and an RFC 9457 problem.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_testkit::process::{run, spawn, Killed};
use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// A running control plane and its state directory.
struct Cp {
    child: Killed,
    url: String,
    dir: PathBuf,
}

fn start(dir: &Path) -> Cp {
    start_with(dir, &[])
}

fn start_with(dir: &Path, extra: &[&str]) -> Cp {
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

    /// `ferry cp ARGS` with the admin token, or with `token_file`.
    fn cli(&self, token_file: Option<&Path>, args: &[&str]) -> std::process::Output {
        let admin = self.dir.join("admin.token");
        let token = token_file.unwrap_or(&admin).to_str().unwrap().to_string();
        let ca = self.dir.join("ca.pem").to_str().unwrap().to_string();
        let mut all = vec![
            "cp",
            "--url",
            &self.url,
            "--token-file",
            &token,
            "--ca",
            &ca,
        ];
        all.extend_from_slice(args);
        run(Path::new(FERRY), &all)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(None, args);
        assert!(
            out.status.success(),
            "ferry cp {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn http(&self) -> Http {
        Http::new(&self.url, &self.dir.join("ca.pem"))
    }
}

/// A plain HTTPS client for the raw API.
struct Http {
    url: String,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// Asserts an RFC 9457 problem with this status.
    fn problem(&self, status: u16, what: &str) {
        assert_eq!(self.status, status, "{what}: {}", self.body);
        assert_eq!(self.content_type, "application/problem+json", "{what}");
        let p = self.json();
        assert_eq!(p["status"], json!(status), "{what}");
        assert_eq!(p["type"], json!("about:blank"), "{what}");
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{what}");
        assert!(
            p["detail"].as_str().is_some_and(|t| !t.is_empty()),
            "{what}"
        );
    }
}

impl Http {
    fn new(url: &str, ca: &Path) -> Http {
        let pem = std::fs::read(ca).unwrap();
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

    fn send(&self, method: &str, path: &str, token: Option<&str>, body: Option<Vec<u8>>) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        self.rt.block_on(async {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let content_type = resp
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let body = resp.text().await.unwrap();
            Answer {
                status,
                content_type,
                body,
            }
        })
    }

    fn json(&self, method: &str, path: &str, token: Option<&str>, body: &Value) -> Answer {
        self.send(method, path, token, Some(serde_json::to_vec(body).unwrap()))
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn first_start_makes_private_files_and_a_kill_9_keeps_them_and_the_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cp");
    let mut cp = start(&dir);
    assert_eq!(mode(&dir), 0o700, "the state directory is its owner's");
    for private in ["ca.key", "server.key", "admin.token"] {
        assert_eq!(mode(&dir.join(private)), 0o600, "{private}");
    }
    for public in ["ca.pem", "server.pem", "ferry.db"] {
        assert!(dir.join(public).is_file(), "{public}");
    }
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let server = std::fs::read(dir.join("server.pem")).unwrap();
    let admin = cp.admin();
    assert!(admin.starts_with("ferry_") && admin.len() == 70, "{admin}");
    cp.cli_ok(&[
        "policies",
        "create",
        "fast",
        "--crash-point-interval-s",
        "0.5",
    ]);

    // SIGKILL: no chance to flush anything the commit did not.
    cp.child.kill();
    let cp = start(&dir);
    assert_eq!(
        std::fs::read(dir.join("ca.pem")).unwrap(),
        ca,
        "the CA is kept"
    );
    assert_eq!(cp.admin(), admin, "the admin token is kept");
    assert_eq!(
        std::fs::read(dir.join("server.pem")).unwrap(),
        server,
        "same names, same certificate"
    );
    let shown: Value =
        serde_json::from_str(&cp.cli_ok(&["policies", "show", "fast", "--json"])).unwrap();
    assert_eq!(shown["crash_point_interval_s"], json!(0.5));
    assert_eq!(shown["rpo_critical_s"], json!(120));

    // Other names: a new service certificate from the same CA, for those names only.
    drop(cp);
    let mut cp = start_with(&dir, &["--server-name", "localhost"]);
    assert_ne!(std::fs::read(dir.join("server.pem")).unwrap(), server);
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
    let by_ip = cp.cli(None, &["policies", "show", "fast"]);
    let err = String::from_utf8_lossy(&by_ip.stderr);
    assert!(
        !by_ip.status.success(),
        "127.0.0.1 is no longer a name of the service"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    cp.url = cp.url.replace("127.0.0.1", "localhost");
    cp.cli_ok(&["policies", "show", "fast"]);
}

#[test]
fn cli_round_trip_policies_and_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = start(&tmp.path().join("cp"));

    let list = cp.cli_ok(&["policies", "list"]);
    let mut lines = list.lines();
    assert!(lines.next().unwrap().starts_with("NAME"), "{list}");
    assert!(lines.next().unwrap().starts_with("default  5"), "{list}");

    cp.cli_ok(&[
        "policies",
        "create",
        "gold",
        "--retention-hours",
        "72",
        "--rpo-warning-s",
        "10",
        "--rpo-critical-s",
        "20",
    ]);
    let updated = cp.cli_ok(&[
        "policies",
        "update",
        "gold",
        "--crash-point-interval-s",
        "1.5",
        "--json",
    ]);
    let gold: Value = serde_json::from_str(&updated).unwrap();
    assert_eq!(
        gold,
        json!({"name": "gold", "crash_point_interval_s": 1.5, "app_point_interval_s": 0,
               "retention_hours": 72, "rpo_warning_s": 10, "rpo_critical_s": 20}),
        "PATCH changes only the field named"
    );
    let all: Value = serde_json::from_str(&cp.cli_ok(&["policies", "list", "--json"])).unwrap();
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "gold"]);

    // A viewer token, made and used through the CLI, may read but not write.
    let made = cp.cli_ok(&["tokens", "create", "ops-view", "--role", "viewer"]);
    let secret = made.lines().last().unwrap().trim().to_string();
    assert!(secret.starts_with("ferry_"), "{made}");
    let file = tmp.path().join("viewer.token");
    std::fs::write(&file, &secret).unwrap();
    let read = cp.cli(Some(&file), &["policies", "show", "gold"]);
    assert!(read.status.success());
    let refused = cp.cli(
        Some(&file),
        &["policies", "update", "gold", "--retention-hours", "1"],
    );
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("403 Forbidden: token ops-view has role viewer; this needs admin"),
        "{err}"
    );

    let tokens: Value = serde_json::from_str(&cp.cli_ok(&["tokens", "list", "--json"])).unwrap();
    let listed = tokens.to_string();
    assert!(
        listed.contains("ops-view") && listed.contains("\"viewer\""),
        "{listed}"
    );
    assert!(
        !listed.contains(&secret) && !listed.contains("ferry_"),
        "no secret is listed"
    );
    assert!(cp.cli_ok(&["tokens", "list"]).contains("ops-view  viewer"));

    cp.cli_ok(&["tokens", "delete", "ops-view"]);
    let gone = cp.cli(Some(&file), &["policies", "list"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("401 Unauthorized"));

    // A bad value is one clear line with the API's detail.
    let bad = cp.cli(
        None,
        &[
            "policies",
            "update",
            "gold",
            "--crash-point-interval-s",
            "0.4",
        ],
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("400 Bad Request: crash_point_interval_s 0.4 must be from 0.5"),
        "{err}"
    );
    // The connection from the environment alone.
    let out = std::process::Command::new(FERRY)
        .args(["cp", "policies", "show", "gold", "--json"])
        .env("FERRY_CP_URL", &cp.url)
        .env("FERRY_CP_TOKEN", cp.admin())
        .env("FERRY_CP_CA", cp.dir.join("ca.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"gold\""));
    // No CA: refused before any request.
    let out = run(
        Path::new(FERRY),
        &[
            "cp",
            "--url",
            &cp.url,
            "--token-file",
            "/dev/null",
            "policies",
            "list",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CA"));
}

#[test]
fn bad_input_on_every_endpoint_is_a_problem_with_its_status() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = start(&tmp.path().join("cp"));
    let http = cp.http();
    let admin = cp.admin();
    let token_of = |name: &str, role: &str| {
        let a = http.json(
            "POST",
            "/v1/tokens",
            Some(&admin),
            &json!({"name": name, "role": role}),
        );
        assert_eq!(a.status, 201, "{}", a.body);
        a.json()["token"].as_str().unwrap().to_string()
    };
    let viewer = token_of("v", "viewer");
    let operator = token_of("o", "operator");
    let policy = json!({"name": "p1", "crash_point_interval_s": 2.0, "app_point_interval_s": 0,
                        "retention_hours": 24, "rpo_warning_s": 30, "rpo_critical_s": 120});
    assert_eq!(
        http.json("POST", "/v1/policies", Some(&admin), &policy)
            .status,
        201
    );

    // (method, path, body, least role): every endpoint.
    let endpoints: [(&str, &str, Option<Value>, &str); 8] = [
        ("GET", "/v1/policies", None, "viewer"),
        (
            "POST",
            "/v1/policies",
            Some(
                json!({"name": "p2", "crash_point_interval_s": 1.0, "app_point_interval_s": 0, "retention_hours": 1, "rpo_warning_s": 1, "rpo_critical_s": 2}),
            ),
            "admin",
        ),
        ("GET", "/v1/policies/p1", None, "viewer"),
        (
            "PATCH",
            "/v1/policies/p1",
            Some(json!({"retention_hours": 48})),
            "admin",
        ),
        ("DELETE", "/v1/policies/p1", None, "admin"),
        ("GET", "/v1/tokens", None, "admin"),
        (
            "POST",
            "/v1/tokens",
            Some(json!({"name": "t2", "role": "viewer"})),
            "admin",
        ),
        ("DELETE", "/v1/tokens/o", None, "admin"),
    ];
    for (method, path, body, least) in &endpoints {
        let send = |token: Option<&str>| match body {
            Some(b) => http.json(method, path, token, b),
            None => http.send(method, path, token, None),
        };
        let what = format!("{method} {path}");
        send(None).problem(401, &format!("{what} without a token"));
        send(Some("ferry_0000")).problem(401, &format!("{what} with a wrong token"));
        if *least == "admin" {
            send(Some(&viewer)).problem(403, &format!("{what} as viewer"));
            send(Some(&operator)).problem(403, &format!("{what} as operator"));
        } else {
            assert_eq!(send(Some(&viewer)).status, 200, "{what} as viewer");
        }
        if let Some(b) = body {
            let mut extra = b.clone();
            extra["colour"] = json!("blue");
            http.json(method, path, Some(&admin), &extra)
                .problem(400, &format!("{what} with an unknown field"));
            let big = vec![b' '; 65 * 1024];
            http.send(method, path, Some(&admin), Some(big))
                .problem(413, &format!("{what} with an oversized body"));
            http.send(method, path, Some(&admin), Some(b"{not json".to_vec()))
                .problem(400, &format!("{what} with broken JSON"));
        }
    }
    // Names that break the name rule, in bodies and paths.
    let mut bad = policy.clone();
    bad["name"] = json!("../etc");
    http.json("POST", "/v1/policies", Some(&admin), &bad)
        .problem(400, "policy name ../etc");
    for path in ["/v1/policies/.hidden", "/v1/policies/-x"] {
        http.send("GET", path, Some(&admin), None)
            .problem(400, path);
        http.json("PATCH", path, Some(&admin), &json!({"retention_hours": 1}))
            .problem(400, path);
        http.send("DELETE", path, Some(&admin), None)
            .problem(400, path);
    }
    http.json(
        "POST",
        "/v1/tokens",
        Some(&admin),
        &json!({"name": "a b", "role": "viewer"}),
    )
    .problem(400, "token name with a space");
    http.send("DELETE", "/v1/tokens/.x", Some(&admin), None)
        .problem(400, "token .x");
    http.json(
        "POST",
        "/v1/tokens",
        Some(&admin),
        &json!({"name": "r", "role": "root"}),
    )
    .problem(400, "unknown role");
    // Intervals below 0.5 s, on create and on change.
    let mut fast = policy.clone();
    fast["name"] = json!("fast");
    fast["crash_point_interval_s"] = json!(0.4);
    http.json("POST", "/v1/policies", Some(&admin), &fast)
        .problem(400, "create at 0.4 s");
    http.json(
        "PATCH",
        "/v1/policies/p1",
        Some(&admin),
        &json!({"crash_point_interval_s": 0.25}),
    )
    .problem(400, "patch to 0.25 s");
    assert_eq!(
        http.send("GET", "/v1/policies/p1", Some(&admin), None)
            .json()["crash_point_interval_s"],
        json!(2.0),
        "a refused change changes nothing"
    );
    // Conflicts, absences, paging bounds.
    http.json("POST", "/v1/policies", Some(&admin), &policy)
        .problem(409, "duplicate policy");
    http.send("DELETE", "/v1/policies/default", Some(&admin), None)
        .problem(409, "delete default");
    http.send("DELETE", "/v1/tokens/admin", Some(&admin), None)
        .problem(409, "delete admin");
    http.send("GET", "/v1/policies/nope", Some(&admin), None)
        .problem(404, "absent policy");
    http.send("DELETE", "/v1/tokens/nope", Some(&admin), None)
        .problem(404, "absent token");
    http.send("GET", "/v1/nothing", Some(&admin), None)
        .problem(404, "unknown resource");
    http.send("PUT", "/v1/policies", Some(&admin), None)
        .problem(405, "PUT");
    http.send("GET", "/v1/policies?limit=0", Some(&admin), None)
        .problem(400, "limit 0");
    http.send("GET", "/v1/policies?limit=1001", Some(&admin), None)
        .problem(400, "limit 1001");
    http.send("GET", "/v1/policies?colour=blue", Some(&admin), None)
        .problem(400, "unknown query");
}

#[test]
fn lists_page_and_the_openapi_document_metrics_and_health_need_no_token() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = start(&tmp.path().join("cp"));
    let http = cp.http();
    let admin = cp.admin();
    for name in ["a1", "b2", "c3"] {
        let p = json!({"name": name, "crash_point_interval_s": 0.5, "app_point_interval_s": 60,
                       "retention_hours": 1, "rpo_warning_s": 5, "rpo_critical_s": 5});
        assert_eq!(
            http.json("POST", "/v1/policies", Some(&admin), &p).status,
            201
        );
    }
    let mut seen = Vec::new();
    let mut path = "/v1/policies?limit=3".to_string();
    loop {
        let page = http.send("GET", &path, Some(&admin), None).json();
        for p in page["items"].as_array().unwrap() {
            seen.push(p["name"].as_str().unwrap().to_string());
        }
        match page["next_after"].as_str() {
            Some(after) => path = format!("/v1/policies?limit=3&after={after}"),
            None => break,
        }
    }
    assert_eq!(seen, ["a1", "b2", "c3", "default"]);

    let doc = http.send("GET", "/v1/openapi.json", None, None);
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    assert_eq!(doc["openapi"], json!("3.1.0"));
    for (path, methods) in [
        ("/v1/policies", &["get", "post"][..]),
        ("/v1/policies/{name}", &["get", "patch", "delete"][..]),
        ("/v1/tokens", &["get", "post"][..]),
        ("/v1/tokens/{name}", &["delete"][..]),
        ("/v1/openapi.json", &["get"][..]),
        ("/healthz", &["get"][..]),
        ("/metrics", &["get"][..]),
    ] {
        for m in methods {
            assert!(
                doc["paths"][path][m].is_object(),
                "{m} {path} is not in the document"
            );
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    assert_eq!(http.send("GET", "/healthz", None, None).status, 200);
    http.send("GET", "/v1/policies", None, None);
    let metrics = http.send("GET", "/metrics", None, None);
    assert_eq!(metrics.status, 200);
    let text = metrics.body;
    assert!(
        text.contains(
            "ferry_cp_http_requests_total{route=\"/v1/policies\",method=\"GET\",status=\"401\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "ferry_cp_http_requests_total{route=\"/v1/policies\",method=\"POST\",status=\"201\"} 3"
        ),
        "{text}"
    );
    assert!(
        text.contains("route=\"/healthz\",method=\"GET\",status=\"200\"} 1"),
        "{text}"
    );
}
