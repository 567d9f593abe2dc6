//! The control plane under a fleet's heartbeats: one real `ferry control-plane`
//! process (SQLite in its state directory, or PostgreSQL with `--database`), and in
//! this process simulated agents and process servers, each enrolled through the real
//! enrollment API with a key of its own and heartbeating over mutual TLS with the
//! certificate it was issued, on a connection it keeps alive between heartbeats as
//! the real client (reqwest) does.
//!
//! The offered rate is open-loop: each agent is due at its own phase of the interval
//! and its latency runs from when it was due, not from when it could send, so a
//! control plane that falls behind shows it in p99 instead of slowing the load
//! (coordinated omission). The first step offers the goal (every agent once per
//! `interval_s`); later steps shorten the interval until p99 passes 50 ms, the
//! control plane answers fewer than 95 % of what was offered, or heartbeats fail.
//!
//! The figure that carries over between machines is heartbeats per CPU second of the
//! control-plane process (utime + stime from /proc, every thread of it, the health
//! sweep and the database driver included; PostgreSQL's own CPU is not), with the
//! control plane pinned to one CPU and the load generator to another.
//!
//! Enrolling 10,000 identities takes a while, so they are kept beside the state
//! directory (`identities.json`) and reused by later runs on the same database.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{SecondsFormat, Utc};
use ferry_link::control::limits::MAX_CONNECTED;
use ferry_link::control::wire::{
    AgentHeartbeat, AgentOrders, DiskReport, EnrollRequest, Issued, Kind, PointRef,
    ProcessServerHeartbeat, ProcessServerOrders,
};
use hdrhistogram::Histogram;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ingest::{cpu_s, proc_field};
use crate::load::{allowed_cpus, bind};

/// p99 past this (ms) means the step broke: the goal.
pub const P99_GOAL_MS: f64 = 50.0;
/// A step breaks when the control plane answers less than this share of the offered
/// rate.
const KEPT_UP: f64 = 0.95;
/// Or when more than this share of heartbeats fail.
const MAX_ERROR_SHARE: f64 = 0.001;
/// Each step's offered rate, as a multiple of the goal's.
const STEPS: [f64; 7] = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0];
/// As the real client: a control plane that does not answer by then is down.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// New connections a second at most in the first contact: a fleet coming up (or
/// coming back after a control-plane restart) as agents start, not all in one
/// interval, whose TLS handshakes would otherwise be measured as heartbeats.
const CONNECT_RATE: f64 = 500.0;
/// Enrollments in flight at once.
const ENROLL_AT_ONCE: usize = 8;

pub struct Options {
    pub ferry: PathBuf,
    pub work: PathBuf,
    /// None: SQLite in the state directory.
    pub database: Option<String>,
    pub agents: usize,
    pub process_servers: usize,
    /// The goal's interval: every agent heartbeats once per this.
    pub interval_s: f64,
    /// Measured seconds per step, after one interval of warm-up.
    pub seconds: f64,
    /// Steps past the goal's (at most `STEPS.len() - 1`); 0: the goal only.
    pub more_steps: usize,
    /// The control plane on one CPU, this process on another.
    pub pin: bool,
}

/// One step's figures.
#[derive(Debug, Clone)]
pub struct Step {
    pub offered: f64,
    /// Heartbeats answered per wall second within the measured window.
    pub answered: f64,
    /// Heartbeats answered per CPU second of the control plane.
    pub per_core: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// CPU of the control plane and of this load generator, percent of one core.
    pub cp_cpu_percent: f64,
    pub load_cpu_percent: f64,
    pub rss_mib: f64,
}

impl Step {
    /// Why the step broke, or None when it held.
    pub fn broke(&self) -> Option<String> {
        let sent = (self.answered + self.errors as f64).max(1.0);
        if self.errors as f64 / sent > MAX_ERROR_SHARE {
            return Some(format!(
                "{} failed: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            ));
        }
        if self.p99_ms > P99_GOAL_MS {
            return Some(format!("p99 {:.1} ms", self.p99_ms));
        }
        if self.answered < KEPT_UP * self.offered {
            return Some(format!("answered {:.0}/s", self.answered));
        }
        None
    }
}

pub struct Figures {
    pub label: String,
    pub agents: usize,
    pub interval_s: f64,
    /// Seconds to enroll every identity, when this run enrolled them.
    pub enroll_s: Option<f64>,
    pub steps: Vec<Step>,
    pub peak_rss_mib: f64,
}

impl Figures {
    /// The one line a script or reader looks for.
    pub fn summary(&self) -> String {
        let goal = &self.steps[0];
        let held = self.steps.iter().take_while(|s| s.broke().is_none()).last();
        let broke = self
            .steps
            .iter()
            .find_map(|s| s.broke().map(|why| (s, why)));
        let saturation = match (held, broke) {
            (Some(h), Some((b, why))) => format!(
                "holds {:.0}/s ({:.0} per CP CPU second), breaks at {:.0}/s offered ({why})",
                h.answered, h.per_core, b.offered
            ),
            (None, Some((b, why))) => {
                format!("breaks at the goal, {:.0}/s offered ({why})", b.offered)
            }
            (Some(h), None) => format!(
                "held every step, up to {:.0}/s ({:.0} per CP CPU second)",
                h.answered, h.per_core
            ),
            (None, None) => "no steps".into(),
        };
        let enrolled = self
            .enroll_s
            .map_or(String::new(), |s| format!("; enrolled in {s:.0} s"));
        format!(
            "control-plane {}: {} agents every {} s: {:.0} heartbeats/s, p99 {:.1} ms, \
             {:.0} per CP CPU second, RSS {:.0} MiB; {saturation}{enrolled}",
            self.label,
            self.agents,
            self.interval_s,
            goal.answered,
            goal.p99_ms,
            goal.per_core,
            self.peak_rss_mib
        )
    }
}

/// An enrolled agent or process server: its own key, the certificate issued for it.
#[derive(Clone, Serialize, Deserialize)]
struct Identity {
    name: String,
    key_pem: String,
    cert_pem: String,
}

/// What `identities.json` keeps: the database the certificates are recorded in.
#[derive(Serialize, Deserialize)]
struct Enrolled {
    database: Option<String>,
    agents: Vec<Identity>,
    process_servers: Vec<Identity>,
}

struct ControlPlane {
    child: Child,
    url: String,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(o: &Options, dir: &Path, cpu: Option<usize>) -> Result<ControlPlane> {
    let state = dir.join("state");
    let log = std::fs::File::create(dir.join("control-plane.log"))
        .with_context(|| format!("creating {}", dir.join("control-plane.log").display()))?;
    let mut cmd = Command::new(&o.ferry);
    cmd.arg("control-plane")
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", "127.0.0.1:0"]);
    if let Some(db) = &o.database {
        cmd.args(["--database", db]);
    }
    if let Some(cpu) = cpu {
        // SAFETY: between fork and exec the closure only calls sched_setaffinity
        // (async-signal-safe) on a set built from a copied integer.
        unsafe {
            cmd.pre_exec(move || bind(&[cpu]));
        }
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} control-plane", o.ferry.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("control plane stdout")?).read_line(&mut line)?;
    let url = line.trim().to_string();
    let cp = ControlPlane { child, url };
    if !cp.url.starts_with("https://") {
        bail!(
            "the control plane said {line:?}; its log: {}",
            dir.join("control-plane.log").display()
        );
    }
    Ok(cp)
}

/// HTTPS to the control plane, with `id`'s certificate or none, HTTP/1.1 as the
/// real client speaks.
fn client(ca: &Arc<rustls::RootCertStore>, id: Option<&Identity>) -> Result<reqwest::Client> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(ca.clone());
    let mut tls = match id {
        Some(id) => {
            let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("{}'s certificate", id.name))?;
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
                .with_context(|| format!("{}'s key", id.name))?;
            b.with_client_auth_cert(chain, key)?
        }
        None => b.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(CALL_TIMEOUT)
        .build()?)
}

async fn post<B: Serialize, R: DeserializeOwned>(
    c: &reqwest::Client,
    url: &str,
    path: &str,
    bearer: Option<&str>,
    body: &B,
) -> Result<R, String> {
    let mut req = c
        .post(format!("{url}{path}"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).map_err(|e| e.to_string())?);
    if let Some(t) = bearer {
        req = req.header(reqwest::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = req.send().await.map_err(|e| format!("POST {path}: {e}"))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("POST {path}: {e}"))?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).to_string();
        return Err(format!("POST {path}: {status} {text}"));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("POST {path}: {e}"))
}

/// A one-time token, then the enrollment with a fresh key's CSR.
async fn enroll_one(
    http: &reqwest::Client,
    url: &str,
    admin: &str,
    kind: Kind,
    name: String,
    advertise: Option<String>,
) -> Result<Identity, String> {
    #[derive(Deserialize)]
    struct Token {
        token: String,
    }
    let t: Token = post(
        http,
        url,
        "/v1/enrollment-tokens",
        Some(admin),
        &serde_json::json!({ "for": kind.as_str() }),
    )
    .await?;
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let csr_pem = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|c| c.pem())
        .map_err(|e| e.to_string())?;
    let req = EnrollRequest {
        token: t.token,
        kind,
        name: name.clone(),
        csr_pem,
        advertise,
    };
    let issued: Issued = post(http, url, "/v1/enroll", None, &req).await?;
    Ok(Identity {
        name,
        key_pem: key.serialize_pem(),
        cert_pem: issued.certificate_pem,
    })
}

fn ps_address(i: usize) -> String {
    format!("127.0.0.1:{}", 20_000 + i)
}

/// Enrolls `agents` agents and `pss` process servers, ENROLL_AT_ONCE at a time.
async fn enroll_all(
    http: &reqwest::Client,
    url: &str,
    admin: &str,
    agents: usize,
    pss: usize,
) -> Result<(Vec<Identity>, Vec<Identity>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let total = agents + pss;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..ENROLL_AT_ONCE {
        let (http, url, admin, next) = (
            http.clone(),
            url.to_string(),
            admin.to_string(),
            next.clone(),
        );
        workers.spawn(async move {
            let mut got = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, String>(got);
                }
                let (kind, name, adv) = if i < pss {
                    (
                        Kind::ProcessServer,
                        format!("bench-ps-{i:03}"),
                        Some(ps_address(i)),
                    )
                } else {
                    (Kind::Agent, format!("bench-agent-{:05}", i - pss), None)
                };
                got.push((i, enroll_one(&http, &url, &admin, kind, name, adv).await?));
            }
        });
    }
    let mut all = Vec::with_capacity(total);
    while let Some(done) = workers.join_next().await {
        all.extend(done?.map_err(|e| anyhow::anyhow!("enrolling: {e}"))?);
    }
    all.sort_by_key(|(i, _)| *i);
    let mut ids: Vec<Identity> = all.into_iter().map(|(_, id)| id).collect();
    let agents = ids.split_off(pss);
    Ok((agents, ids))
}

/// A realistic report: one or two disks, protected, points a second and twenty
/// seconds old, the process server it was told to use.
fn agent_beat(name: &str, disks: usize, ps: Option<String>, k: u64) -> AgentHeartbeat {
    let now = Utc::now();
    let point = |age_ms: i64, kind: &str| PointRef {
        id: format!("{:x}-{k:08x}", (now.timestamp_millis() - age_ms) as u64),
        kind: kind.into(),
        time: (now - chrono::Duration::milliseconds(age_ms))
            .to_rfc3339_opts(SecondsFormat::Millis, true),
    };
    AgentHeartbeat {
        machine: name.to_string(),
        disks: ["sda", "sdb"][..disks]
            .iter()
            .enumerate()
            .map(|(d, disk)| DiskReport {
                name: disk.to_string(),
                size_bytes: (100 << 30) * (d as u64 + 1),
                state: "protected".into(),
                initial_copy_percent: 100.0,
                journal_bytes: 1 << 30,
                unacked_bytes: (k % 7) * 65_536,
                newest_point: Some(point(1_000, "crash")),
                newest_uploaded_point: Some(point(20_000, "crash")),
                resync: None,
            })
            .collect(),
        process_server: ps,
        last_error: None,
        group_listen: None,
        failover: None,
    }
}

struct Agent {
    name: String,
    disks: usize,
    http: reqwest::Client,
    process_server: Option<String>,
    beats: u64,
}

#[derive(Default)]
struct Tally {
    answered: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    hist: Mutex<Option<Histogram<u64>>>,
}

impl Tally {
    fn failed(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first_error.lock() {
            f.get_or_insert(e);
        }
    }
}

/// Which process server each agent was told to use, as the process servers report
/// their connected machines (at most MAX_CONNECTED each, as the wire allows).
type Connected = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// Every process server heartbeats every `interval` until `stop` is set.
fn process_servers(
    rt: &tokio::runtime::Runtime,
    url: &str,
    pss: Vec<(Identity, reqwest::Client)>,
    interval: Duration,
    connected: Connected,
    tally: Arc<Tally>,
    stop: Arc<AtomicU64>,
) {
    for (i, (id, http)) in pss.into_iter().enumerate() {
        let (url, connected, tally, stop) = (
            url.to_string(),
            connected.clone(),
            tally.clone(),
            stop.clone(),
        );
        rt.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            while stop.load(Ordering::Relaxed) == 0 {
                tick.tick().await;
                let machines = connected
                    .lock()
                    .map(|c| c.get(&id.name).cloned().unwrap_or_default())
                    .unwrap_or_default();
                let hb = ProcessServerHeartbeat {
                    name: id.name.clone(),
                    address: ps_address(i),
                    cache_used_bytes: 40 << 30,
                    cache_free_bytes: 160 << 30,
                    ingest_bytes_per_s: 80e6,
                    upload_lag_s: 3.0,
                    cpu_percent: 35.0,
                    health: "normal".into(),
                    health_reasons: Vec::new(),
                    machines,
                    fenced: Vec::new(),
                };
                let r: Result<ProcessServerOrders, _> =
                    post(&http, &url, "/v1/heartbeat/process-server", None, &hb).await;
                if let Err(e) = r {
                    tally.failed(format!("process server {}: {e}", id.name));
                }
            }
        });
    }
}

/// One agent's heartbeat; its orders' process server is kept for the next.
async fn beat(a: &mut Agent, url: &str, connected: &Connected) -> Result<(), String> {
    a.beats += 1;
    let hb = agent_beat(&a.name, a.disks, a.process_server.clone(), a.beats);
    let o: AgentOrders = post(&a.http, url, "/v1/heartbeat/agent", None, &hb).await?;
    let ps = o.process_server.map(|p| p.name);
    if ps != a.process_server {
        if let (Some(p), Ok(mut c)) = (&ps, connected.lock()) {
            let list = c.entry(p.clone()).or_default();
            if list.len() < MAX_CONNECTED {
                list.push(a.name.clone());
            }
        }
        a.process_server = ps;
    }
    Ok(())
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

fn rss_mib(pid: u32, key: &str) -> f64 {
    proc_field(pid, "status", key).unwrap_or(0.0) / 1024.0
}

/// Every agent once per `n / rate` seconds: one interval to settle, then `seconds`
/// measured.
fn step(
    rt: &tokio::runtime::Runtime,
    agents: Vec<Agent>,
    url: &str,
    connected: &Connected,
    rate: f64,
    seconds: f64,
    cp_pid: u32,
) -> Result<(Vec<Agent>, Step)> {
    let n = agents.len();
    let interval = Duration::from_secs_f64(n as f64 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let measure_from = start + interval;
    let end = measure_from + Duration::from_secs_f64(seconds);
    let tally = Arc::new(Tally::default());
    *tally.hist.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(histogram());
    let tasks: Vec<_> = agents
        .into_iter()
        .enumerate()
        .map(|(i, mut a)| {
            let phase = interval.mul_f64(i as f64 / n as f64);
            let (url, connected, tally) = (url.to_string(), connected.clone(), tally.clone());
            rt.spawn(async move {
                let mut due = start + phase;
                while due < end {
                    tokio::time::sleep_until(due).await;
                    let r = beat(&mut a, &url, &connected).await;
                    if r.is_ok() {
                        tally.answered.fetch_add(1, Ordering::Relaxed);
                    }
                    if due >= measure_from {
                        match r {
                            Ok(()) => {
                                let us = due.elapsed().as_micros() as u64;
                                if let Ok(mut h) = tally.hist.lock() {
                                    if let Some(h) = h.as_mut() {
                                        let _ = h.record(us.max(1));
                                    }
                                }
                            }
                            Err(e) => tally.failed(format!("{}: {e}", a.name)),
                        }
                    }
                    due += interval;
                }
                a
            })
        })
        .collect();
    let me = std::process::id();
    let window = rt.block_on(async {
        tokio::time::sleep_until(measure_from).await;
        let before = (
            cpu_s(cp_pid),
            cpu_s(me),
            tally.answered.load(Ordering::Relaxed),
            tally.errors.load(Ordering::Relaxed),
            Instant::now(),
        );
        tokio::time::sleep_until(end).await;
        (
            cpu_s(cp_pid) - before.0,
            cpu_s(me) - before.1,
            tally.answered.load(Ordering::Relaxed) - before.2,
            before.4.elapsed().as_secs_f64(),
        )
    });
    let (cp_cpu, load_cpu, answered, wall) = window;
    let mut back = Vec::with_capacity(n);
    for t in tasks {
        back.push(rt.block_on(t).context("an agent's task")?);
    }
    let hist = tally
        .hist
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .take()
        .unwrap_or_else(histogram);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let first_error = tally.first_error.lock().ok().and_then(|e| e.clone());
    Ok((
        back,
        Step {
            offered: rate,
            answered: answered as f64 / wall,
            per_core: answered as f64 / cp_cpu.max(1e-9),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: hist.max() as f64 / 1000.0,
            errors: tally.errors.load(Ordering::Relaxed),
            first_error,
            cp_cpu_percent: 100.0 * cp_cpu / wall,
            load_cpu_percent: 100.0 * load_cpu / wall,
            rss_mib: rss_mib(cp_pid, "VmRSS:"),
        },
    ))
}

/// The identities kept from an earlier run on the same database, if enough.
fn reusable(path: &Path, o: &Options) -> Option<Enrolled> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut e: Enrolled = serde_json::from_str(&text).ok()?;
    if e.database != o.database
        || e.agents.len() < o.agents
        || e.process_servers.len() < o.process_servers
    {
        return None;
    }
    e.agents.truncate(o.agents);
    e.process_servers.truncate(o.process_servers);
    Some(e)
}

pub fn run(o: &Options) -> Result<Figures> {
    anyhow::ensure!(
        o.agents > 0 && o.process_servers > 0,
        "--agents and --process-servers must be above 0"
    );
    anyhow::ensure!(
        o.process_servers * MAX_CONNECTED >= o.agents,
        "{} process servers list at most {} machines: give --process-servers {} or more",
        o.process_servers,
        o.process_servers * MAX_CONNECTED,
        o.agents.div_ceil(MAX_CONNECTED)
    );
    let label = match &o.database {
        None => "sqlite",
        Some(u) if u.starts_with("postgres") => "postgres",
        Some(_) => "other",
    };
    let dir = o.work.join(label);
    let kept = dir.join("identities.json");
    let reuse = reusable(&kept, o);
    if reuse.is_none() && dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let cpus = allowed_cpus()?;
    let (cp_cpu, load_cpu) = match (o.pin, cpus.as_slice()) {
        (true, [a, b, ..]) => (Some(*a), Some(*b)),
        _ => (None, None),
    };
    if let Some(c) = load_cpu {
        // This thread runs the whole load (a current-thread runtime).
        bind(&[c]).context("pinning the load generator")?;
    }
    let cp = start(o, &dir, cp_cpu)?;
    let cp_pid = cp.child.id();
    let url = cp.url.clone();
    println!(
        "control-plane {label}: {} pinned to CPU {}, load generator to CPU {} (sharing the \
         host with whatever else runs on it)",
        cp.url,
        cp_cpu.map_or("any".into(), |c| c.to_string()),
        load_cpu.map_or("any".into(), |c| c.to_string())
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ca_pem = std::fs::read(dir.join("state/ca.pem")).context("the control plane's CA")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(c?)?;
    }
    let roots = Arc::new(roots);

    let (enrolled, enroll_s) = match reuse {
        Some(e) => {
            println!(
                "  reusing {} agents and {} process servers enrolled earlier ({})",
                e.agents.len(),
                e.process_servers.len(),
                kept.display()
            );
            (e, None)
        }
        None => {
            let admin = std::fs::read_to_string(dir.join("state/admin.token"))
                .context("the admin token")?;
            let anon = client(&roots, None)?;
            let t = Instant::now();
            let (agents, pss) = rt.block_on(enroll_all(
                &anon,
                &url,
                admin.trim(),
                o.agents,
                o.process_servers,
            ))?;
            let s = t.elapsed().as_secs_f64();
            println!(
                "  enrolled {} agents and {} process servers in {s:.1} s ({:.0}/s, {ENROLL_AT_ONCE} at once)",
                agents.len(),
                pss.len(),
                (agents.len() + pss.len()) as f64 / s
            );
            let e = Enrolled {
                database: o.database.clone(),
                agents,
                process_servers: pss,
            };
            let tmp = kept.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(&e)?)
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &kept)?;
            (e, Some(s))
        }
    };

    let connected: Connected = Arc::default();
    let ps_tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicU64::new(0));
    let pss = enrolled
        .process_servers
        .iter()
        .map(|id| Ok((id.clone(), client(&roots, Some(id))?)))
        .collect::<Result<Vec<_>>>()?;
    // Seen before the agents' first heartbeats, so that each is given one.
    rt.block_on(async {
        for (id, http) in &pss {
            let hb = ProcessServerHeartbeat {
                name: id.name.clone(),
                address: ps_address(0),
                cache_used_bytes: 0,
                cache_free_bytes: 200 << 30,
                ingest_bytes_per_s: 0.0,
                upload_lag_s: 0.0,
                cpu_percent: 1.0,
                health: "normal".into(),
                health_reasons: Vec::new(),
                machines: Vec::new(),
                fenced: Vec::new(),
            };
            let _: ProcessServerOrders =
                post(http, &url, "/v1/heartbeat/process-server", None, &hb)
                    .await
                    .map_err(|e| anyhow::anyhow!("process server {}: {e}", id.name))?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    process_servers(
        &rt,
        &url,
        pss,
        Duration::from_secs_f64(o.interval_s),
        connected.clone(),
        ps_tally.clone(),
        stop.clone(),
    );
    let mut agents = enrolled
        .agents
        .iter()
        .enumerate()
        .map(|(i, id)| {
            Ok(Agent {
                name: id.name.clone(),
                disks: 1 + i % 2,
                http: client(&roots, Some(id))?,
                process_server: None,
                beats: 0,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let goal = o.agents as f64 / o.interval_s;
    // First contact: each agent's handshake and first heartbeat, once, unmeasured
    // but for its CPU.
    let (cpu0, t0) = (cpu_s(cp_pid), Instant::now());
    let (back, _) = step(
        &rt,
        agents,
        &url,
        &connected,
        goal.min(CONNECT_RATE),
        0.0,
        cp_pid,
    )?;
    agents = back;
    let connect_cpu = cpu_s(cp_pid) - cpu0;
    println!(
        "  first contact: {} handshakes and heartbeats in {:.1} s, {connect_cpu:.1} CP CPU s \
         ({:.0} per CP CPU second)",
        o.agents,
        t0.elapsed().as_secs_f64(),
        o.agents as f64 / connect_cpu.max(1e-9)
    );
    println!(
        "  {:>9} {:>9} {:>11} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>6}",
        "offered/s",
        "answered",
        "per CP CPU",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CP CPU",
        "load",
        "RSS MiB",
        "errors"
    );
    let mut steps = Vec::new();
    for mult in STEPS.iter().take(1 + o.more_steps) {
        let (back, s) = step(
            &rt,
            agents,
            &url,
            &connected,
            goal * mult,
            o.seconds,
            cp_pid,
        )?;
        agents = back;
        println!(
            "  {:>9.0} {:>9.0} {:>11.0} {:>8.1} {:>8.1} {:>8.1} {:>6.0}% {:>6.0}% {:>8.0} {:>6}{}",
            s.offered,
            s.answered,
            s.per_core,
            s.p50_ms,
            s.p99_ms,
            s.max_ms,
            s.cp_cpu_percent,
            s.load_cpu_percent,
            s.rss_mib,
            s.errors,
            s.broke()
                .map_or(String::new(), |why| format!("  broke: {why}"))
        );
        let broke = s.broke().is_some();
        steps.push(s);
        if broke {
            break;
        }
    }
    stop.store(1, Ordering::Relaxed);
    let ps_errors = ps_tally.errors.load(Ordering::Relaxed);
    if ps_errors > 0 {
        println!(
            "  process-server heartbeats failed {ps_errors} times; first: {}",
            ps_tally
                .first_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_default()
        );
    }
    let figures = Figures {
        label: label.into(),
        agents: o.agents,
        interval_s: o.interval_s,
        enroll_s,
        steps,
        peak_rss_mib: rss_mib(cp_pid, "VmHWM:"),
    };
    println!("{}", figures.summary());
    Ok(figures)
}
