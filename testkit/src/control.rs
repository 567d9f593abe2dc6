//! A site driven through its control plane, for the tests that start real processes:
//! `ferry control-plane` with its admin token and raw API, process servers and agents
//! that enroll with one-time tokens. The caller passes the `ferry` binary (a crate's
//! tests know it as `env!("CARGO_BIN_EXE_ferry")`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::cli::bookmark;
use crate::net::free_addr;
use crate::process::{run_ok, spawn, Killed};
use crate::qemu::{qemu_io, random_writes};

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A running control plane: its URL, CA and admin token, and the raw API.
pub struct Cp {
    pub bin: PathBuf,
    pub child: Killed,
    pub url: String,
    pub ca: PathBuf,
    pub token_file: PathBuf,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Cp {
    /// Starts (or, on the same state directory, address and database, restarts) it;
    /// on SQLite under `dir` without a `database`; `extra` flags after those.
    pub fn start(bin: &Path, dir: &Path, listen: &str, database: Option<&str>) -> Cp {
        Cp::start_with(bin, dir, listen, database, &[])
    }

    pub fn start_with(
        bin: &Path,
        dir: &Path,
        listen: &str,
        database: Option<&str>,
        extra: &[&str],
    ) -> Cp {
        Cp::start_logging(
            bin,
            dir,
            listen,
            database,
            extra,
            std::process::Stdio::inherit(),
        )
    }

    /// As `start_with`, its log (stderr) sent to `log`: a test that reads the log.
    pub fn start_logging(
        bin: &Path,
        dir: &Path,
        listen: &str,
        database: Option<&str>,
        extra: &[&str],
        log: std::process::Stdio,
    ) -> Cp {
        let dir_s = s(dir);
        let mut args = vec!["control-plane", "--state-dir", &dir_s, "--listen", listen];
        if let Some(url) = database {
            args.extend(["--database", url]);
        }
        args.extend_from_slice(extra);
        let (child, line) = crate::process::spawn_logging(bin, &args, log);
        let url = line.trim().to_string();
        assert!(url.starts_with("https://"), "{line:?}");
        let ca = dir.join("ca.pem");
        Cp {
            bin: bin.to_path_buf(),
            child,
            url,
            token_file: dir.join("admin.token"),
            http: client_trusting(&std::fs::read(&ca).unwrap()),
            ca,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// `ferry cp ARGS` as the admin; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let (url, tf, ca) = (self.url.clone(), s(&self.token_file), s(&self.ca));
        let mut all = vec!["cp", "--url", &url, "--token-file", &tf, "--ca", &ca];
        all.extend_from_slice(args);
        run_ok(&self.bin, &all)
    }

    /// A one-time enrollment token (the last line of `tokens create --for`).
    pub fn enroll_token(&self, kind: &str) -> String {
        let out = self.cli(&["tokens", "create", "--for", kind]);
        out.lines().last().unwrap().trim().to_string()
    }

    /// One API call as the admin; the status and the JSON answer (null when the
    /// body is not JSON).
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
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

    /// `GET /v1/machines/{name}`, which must answer 200.
    pub fn machine(&self, name: &str) -> Value {
        let (st, m) = self.api("GET", &format!("/v1/machines/{name}"), None);
        assert_eq!(st, 200, "{m}");
        m
    }

    /// Every event, oldest first.
    pub fn events(&self) -> Vec<Value> {
        let (st, list) = self.api("GET", "/v1/events?limit=1000", None);
        assert_eq!(st, 200, "{list}");
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// A POST that must be accepted (2xx); its answer (a job, for the recovery POSTs).
    pub fn post(&self, path: &str, body: Value) -> Value {
        let (st, v) = self.api("POST", path, Some(body));
        assert!((200..300).contains(&st), "POST {path}: {st} {v}");
        v
    }

    /// `GET /v1/jobs/{id}`, which must answer 200.
    pub fn job(&self, id: &str) -> Value {
        let (st, v) = self.api("GET", &format!("/v1/jobs/{id}"), None);
        assert_eq!(st, 200, "job {id}: {v}");
        v
    }

    /// Waits (up to `JOB_DEADLINE`) until job `id` is in `state`; one that fails or is
    /// cancelled instead ends the test with its error, unless that is the state
    /// waited for.
    pub fn wait_job(&self, id: &str, state: &str) -> Value {
        crate::wait_ok(&format!("job {id} {state}"), JOB_DEADLINE, || {
            let j = self.job(id);
            let now = j["state"].as_str().unwrap_or("");
            if now == state {
                return Ok(j);
            }
            assert!(
                !matches!(now, "failed" | "cancelled" | "succeeded"),
                "job {id} ended {now}, not {state}: {j}"
            );
            Err(j)
        })
    }
}

/// How long `Cp::wait_job` waits: a loaded CI host runs a recovery job in seconds,
/// a boot through one in tens of them.
pub const JOB_DEADLINE: Duration = Duration::from_secs(120);

/// An HTTPS client (HTTP/1.1, 10 s deadline) that trusts the CA certificates in `pem`.
pub fn client_trusting(pem: &[u8]) -> reqwest::Client {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
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
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(10))
        // The control plane closes a connection idle for 30 s (its header timeout);
        // one reused just as it closes fails the request ("peer closed connection
        // without sending TLS close_notify"), so idle ones are let go well before.
        .pool_idle_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// An enrolled process server named `name`, its cache in `dir/cache-NAME` (kept
/// across restarts), uploading to `store` with `dir/vault.key`; the child and the
/// address agents reach it at. `listen` None picks a free port.
pub fn process_server(
    cp: &Cp,
    dir: &Path,
    name: &str,
    store: &str,
    listen: Option<&str>,
) -> (Killed, String) {
    let listen = listen.map_or_else(|| free_addr().to_string(), str::to_string);
    let cache = s(&dir.join(format!("cache-{name}")));
    let key = s(&dir.join("vault.key"));
    let ca = s(&cp.ca);
    let mut args = vec!["process-server", "--control-plane", &cp.url, "--ca", &ca];
    // A restart on the same cache keeps its identity: a token only the first time.
    let token;
    if !dir.join(format!("cache-{name}/identity/cert.pem")).exists() {
        token = cp.enroll_token("process-server");
        args.extend(["--enroll-token", &token]);
    }
    args.extend([
        "--name",
        name,
        "--listen",
        &listen,
        "--advertise",
        &listen,
        "--cache-dir",
        &cache,
        "--store",
        store,
        "--key-file",
        &key,
        "--shards",
        "1",
        "--batch-ms",
        "20",
        "--cache-gib",
        "0.25",
    ]);
    let (child, line) = spawn(&cp.bin, &args);
    assert!(line.contains("listening on"), "{name}: {line:?}");
    (child, listen)
}

/// An enrolled agent of one disk (`sda`, an image file of `disk_bytes`), its
/// machine named `name`, its files under the test's directory.
pub struct Agent {
    pub name: String,
    pub disk: PathBuf,
    pub disk_bytes: u64,
    pub state: PathBuf,
    pub sock: PathBuf,
    pub nbd_listen: String,
    pub child: Killed,
    /// Each point taken and the disk as it was then.
    pub expected: Vec<(String, Vec<u8>)>,
    /// Flags after the usual ones, at every start (e.g. `--group-listen ADDR`).
    pub extra: Vec<String>,
}

impl Agent {
    /// The command line: no process server, certificate or interval on it (the
    /// heartbeat's orders give them); the token only for the first start.
    fn args(
        cp: &Cp,
        d: &Path,
        name: &str,
        nbd_listen: &str,
        token: Option<&str>,
        extra: &[String],
    ) -> Vec<String> {
        let mut a = vec![
            "agent".to_string(),
            "--control-plane".into(),
            cp.url.clone(),
            "--ca".into(),
            s(&cp.ca),
            "--machine".into(),
            name.into(),
            "--disk".into(),
            format!("sda={}", s(&d.join(format!("{name}.img")))),
            "--nbd-listen".into(),
            nbd_listen.into(),
            "--state-dir".into(),
            s(&d.join(format!("agent-{name}"))),
            "--admin-socket".into(),
            s(&d.join(format!("{name}.sock"))),
        ];
        if let Some(t) = token {
            a.extend(["--enroll-token".to_string(), t.to_string()]);
        }
        a.extend_from_slice(extra);
        a
    }

    /// A random disk image of `disk_bytes` (its first 2 MiB written), and an agent
    /// enrolled with a fresh token, serving NBD.
    pub fn enroll(
        cp: &Cp,
        d: &Path,
        name: &str,
        disk_bytes: u64,
        rng: &mut rand::rngs::StdRng,
    ) -> Agent {
        Agent::enroll_with(cp, d, name, disk_bytes, rng, &[])
    }

    /// `enroll`, with `extra` flags at every start.
    pub fn enroll_with(
        cp: &Cp,
        d: &Path,
        name: &str,
        disk_bytes: u64,
        rng: &mut rand::rngs::StdRng,
        extra: &[String],
    ) -> Agent {
        let disk = d.join(format!("{name}.img"));
        crate::disk::random_disk(&disk, disk_bytes, 0..2 << 20, rng);
        let nbd_listen = free_addr().to_string();
        let token = cp.enroll_token("agent");
        let (child, line) = spawn(
            &cp.bin,
            &Agent::args(cp, d, name, &nbd_listen, Some(&token), extra),
        );
        assert!(line.contains("serving NBD"), "{name}: {line:?}");
        Agent {
            name: name.into(),
            disk,
            disk_bytes,
            state: d.join(format!("agent-{name}")),
            sock: d.join(format!("{name}.sock")),
            nbd_listen,
            child,
            expected: Vec::new(),
            extra: extra.to_vec(),
        }
    }

    /// Kill -9, then a start with no token (its certificate is in the state
    /// directory) while the control plane may be down.
    pub fn restart(&mut self, cp: &Cp, d: &Path) {
        self.child.kill();
        let (child, line) = spawn(
            &cp.bin,
            &Agent::args(cp, d, &self.name, &self.nbd_listen, None, &self.extra),
        );
        assert!(line.contains("serving NBD"), "{}: {line:?}", self.name);
        self.child = child;
    }

    pub fn nbd(&self) -> String {
        format!("nbd://{}/sda", self.nbd_listen)
    }

    /// Random writes through NBD, then a point named `label` (through `bin`'s admin
    /// socket call), kept with the disk as it is then.
    pub fn write_and_point(&mut self, bin: &Path, rng: &mut rand::rngs::StdRng, label: &str) {
        qemu_io(&self.nbd(), &random_writes(rng, self.disk_bytes, 20, 1..=8));
        let id = bookmark(bin, &self.sock, label);
        self.expected.push((id, std::fs::read(&self.disk).unwrap()));
    }

    /// Every point it took (`expected`) is in the replica of its disk `sda` in `store`
    /// and rebuilds the disk as it was then.
    pub fn assert_points_rebuild(
        &self,
        store: &ferry_replica::Store,
        vault: &ferry_replica::VaultKey,
    ) {
        let replica = store
            .block(ferry_replica::Disk::open(
                store,
                &self.name,
                "sda",
                Some(vault),
            ))
            .unwrap();
        let state = store.block(replica.load_state()).unwrap();
        for (id, want) in &self.expected {
            let p = state
                .point(id)
                .unwrap_or_else(|| panic!("{}: point {id} is not in the replica", self.name));
            assert!(
                crate::site::rebuilt(&replica, &state, p) == *want,
                "{}: point {id} does not rebuild the disk as it was",
                self.name
            );
        }
    }

    /// The orders it kept from its last heartbeat (`orders.json`).
    pub fn orders(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.state.join("orders.json")).unwrap())
            .unwrap()
    }
}

/// An enrolled recovery host named `name`, its work directory `work_dir` (kept across
/// restarts: a restart needs no token), rebuilding from `store` with `key`; the child
/// and the NBD address its exports are at (`nbd` None picks a free port; a restart
/// passes the same one, since the URLs it reported name it).
pub fn recovery_host(
    cp: &Cp,
    work_dir: &Path,
    name: &str,
    store: &str,
    key: &Path,
    nbd: Option<&str>,
) -> (Killed, String) {
    let nbd = nbd.map_or_else(|| free_addr().to_string(), str::to_string);
    let (ca, wd, key) = (s(&cp.ca), s(work_dir), s(key));
    let mut args = vec!["recovery-host", "--control-plane", &cp.url, "--ca", &ca];
    let token;
    if !work_dir.join("identity/cert.pem").exists() {
        token = cp.enroll_token("recovery-host");
        args.extend(["--enroll-token", &token]);
    }
    args.extend([
        "--name",
        name,
        "--work-dir",
        &wd,
        "--store",
        store,
        "--key-file",
        &key,
        "--nbd-listen",
        &nbd,
    ]);
    let (child, line) = spawn(&cp.bin, &args);
    assert_eq!(
        line.trim(),
        format!("recovery host {name} serving NBD at {nbd}"),
        "{name}"
    );
    (child, nbd)
}

/// The names under the `items` folder of the recovery host working in `work_dir`
/// (one folder an item it holds); none when there is no such folder.
pub fn items_left(work_dir: &Path) -> Vec<String> {
    match std::fs::read_dir(work_dir.join("items")) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect(),
        Err(_) => Vec::new(),
    }
}
