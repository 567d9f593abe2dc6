//! The process server under load on loopback: a real `ferry process-server` process,
//! simulated agents in this process sending blocks of a real file-system image, zero
//! blocks and incompressible blocks, sequential and random mixes, over mutual TLS.
//! Four runs, each with a fresh server and store: full load, half of that load (for
//! ack latency), many connections (for memory), and full load on 1, 2, 4, ... shards
//! with the server and the load on CPUs of their own (scaling). Server CPU comes from
//! /proc/PID/stat, peak RSS from VmHWM. Each run ends with every disk rebuilt from the
//! store and compared with its agent's model.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_link::client::Target;
use ferry_link::tls::certs::{client_config, generate_loopback, server_config, server_name};
use ferry_replica::{Store, VaultKey};
use rand::Rng;

use crate::ceilings::{Drift, Stages};
use crate::load::{allowed_cpus, bind, Drive, Load, Loaded, Pin};

pub struct RunFigures {
    pub mbps: f64,
    pub per_core_s: f64,
    pub cpu_s_per_gb: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Arrival to ack in the server, from its metrics.
    pub server_p99_ms: f64,
    pub rss_mib: f64,
    pub disks: usize,
    /// Age of each disk's newest uploaded point at random moments, seconds:
    /// (p50, p99, max, samples).
    pub rpo: (f64, f64, f64, u64),
}

pub(crate) fn proc_field(pid: u32, file: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU seconds of a process.
pub(crate) fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

struct Server {
    child: Child,
    addr: std::net::SocketAddr,
    metrics: Option<String>,
}

/// The server's /metrics page.
fn fetch_metrics(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    write!(c, "GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    Some(text)
}

/// A quantile of one of the server's latency summaries (`ack_latency`: arrival to
/// ack; `cache_sync`: a group commit's sync), in ms, from the metrics page.
fn server_quantile(text: &str, name: &str, q: &str) -> Option<f64> {
    let key = format!("ferry_{name}_seconds{{quantile=\"{q}\"}} ");
    let line = text.lines().find(|l| l.starts_with(&key))?;
    line[key.len()..]
        .trim()
        .parse::<f64>()
        .ok()
        .map(|s| s * 1000.0)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(
    ferry: &Path,
    dir: &Path,
    store: &Path,
    shards: usize,
    cpus: Option<&[usize]>,
) -> Result<Server> {
    let s = |p: &str| dir.join(p).display().to_string();
    let mut cmd = Command::new(ferry);
    if let Some(cpus) = cpus {
        let cpus = cpus.to_vec();
        // SAFETY: between fork and exec the closure only calls sched_setaffinity
        // (async-signal-safe) on a set built from data copied before the fork.
        // The server's own `--pin` is left off: it names CPUs from 0, and the set
        // here need not start there.
        unsafe {
            cmd.pre_exec(move || bind(&cpus));
        }
    }
    let mut child = cmd
        .args(["process-server", "--listen", "127.0.0.1:0"])
        .args(["--cache-dir", &s("cache")])
        .args(["--store", &format!("file://{}", store.display())])
        .args([
            "--key-file",
            &s("vault.key"),
            "--tls-cert",
            &s("pki/server.pem"),
        ])
        .args([
            "--tls-key",
            &s("pki/server.key"),
            "--client-ca",
            &s("pki/ca.pem"),
        ])
        .args(["--shards", &shards.to_string(), "--cache-gib", "4"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {}", ferry.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
    let addr = line
        .split_whitespace()
        .nth(4)
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("server said: {line}"))?;
    let metrics = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .map(str::to_string);
    Ok(Server {
        child,
        addr,
        metrics,
    })
}

/// Certificates and a vault key under `dir`, and an empty store.
fn prepare(dir: &Path, store: &Path) -> Result<()> {
    for d in [dir, store] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
    }
    std::fs::create_dir_all(store)?;
    generate_loopback(&dir.join("pki"), 1)?;
    VaultKey::generate().save_new(&dir.join("vault.key"))?;
    // Whatever else is dirty is written back now, not during the run.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    Ok(())
}

fn target(dir: &Path, addr: std::net::SocketAddr) -> Result<Target> {
    Ok(Target {
        addr,
        server_name: server_name("127.0.0.1")?,
        tls: Arc::new(client_config(
            &dir.join("pki/agent-0.pem"),
            &dir.join("pki/agent-0.key"),
            &dir.join("pki/ca.pem"),
        )?),
        timeout: Duration::from_secs(10),
    })
}

pub fn run_load(
    name: &str,
    ferry: &Path,
    work: &Path,
    sample: &Arc<Vec<Vec<u8>>>,
    load: Load,
    pin: Option<&Pin>,
    store_root: Option<&Path>,
) -> Result<RunFigures> {
    let dir = work.join(name);
    let store = store_root.map_or_else(|| dir.join("store"), |r| r.join(name));
    prepare(&dir, &store)?;
    let server = start_server(ferry, &dir, &store, load.shards, pin.map(|p| &p.server[..]))?;
    let pid = server.child.id();
    let target = target(&dir, server.addr)?;
    let opened = Arc::new(Store::open(&format!("file://{}", store.display()))?);
    let vault = Arc::new(VaultKey::load(&dir.join("vault.key"))?);
    let cpu0 = cpu_s(pid);
    let drive = Drive::start(
        load,
        &target,
        sample.clone(),
        pin.map(|p| &p.load[..]),
        opened,
        vault,
    )?;
    let start = drive.start;
    let Loaded { bytes, hist, rpo } = drive.loaded()?;
    let acked_wall = start.elapsed().as_secs_f64();
    let page = server.metrics.as_deref().and_then(fetch_metrics);
    let quantiles = |name: &str| -> Vec<f64> {
        ["0.5", "0.99", "0.999"]
            .iter()
            .map(|q| {
                page.as_deref()
                    .and_then(|t| server_quantile(t, name, q))
                    .unwrap_or(f64::NAN)
            })
            .collect()
    };
    let server_ms = quantiles("ack_latency");
    let sync_ms = quantiles("cache_sync");
    // Uploads drain, then everything is checked against the models.
    drive.drained()?;
    // Sealing may lag the acks: charge the server all its CPU up to the last upload,
    // and count the rate it sustained until then.
    let wall = start.elapsed().as_secs_f64();
    let upload_s = wall - acked_wall;
    let cpu = cpu_s(pid) - cpu0;
    let rss_mib = proc_field(pid, "status", "VmHWM:").unwrap_or(0.0) / 1024.0;
    let disks = drive.verify()?;
    drop(server);
    // Checked: gone, so that the next run has neither this one's gigabytes being
    // written back behind it (they slowed its cache syncs) nor a fuller disk.
    std::fs::remove_dir_all(&dir)?;
    if store_root.is_some() {
        std::fs::remove_dir_all(&store)?;
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let f = RunFigures {
        mbps: bytes as f64 / wall / 1e6,
        per_core_s: bytes as f64 / cpu.max(1e-9) / 1e6,
        cpu_s_per_gb: cpu / (bytes as f64 / 1e9).max(1e-9),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        server_p99_ms: server_ms[1],
        rss_mib,
        disks,
        rpo: (
            rpo.value_at_quantile(0.5) as f64 / 1e6,
            rpo.value_at_quantile(0.99) as f64 / 1e6,
            rpo.max() as f64 / 1e6,
            rpo.len(),
        ),
    };
    println!(
        "ingest {name}: {} agents on {} shard(s), {} MB acknowledged in {acked_wall:.1} s ({:.0} MB/s), uploaded by {wall:.1} s: {:.0} MB/s sustained; server {cpu:.1} CPU-s ({:.2} CPU-s per GB, {:.0} MB/s per core-second); ack at the agent p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms (in the server, arrival to ack: {:.2} / {:.2} / {:.2} ms; cache sync {:.2} / {:.2} / {:.2} ms); server peak RSS {:.0} MiB; uploads drained {upload_s:.1} s after the last ack; {} disks verified",
        load.agents,
        load.shards,
        bytes / 1_000_000,
        bytes as f64 / acked_wall / 1e6,
        f.mbps,
        f.cpu_s_per_gb,
        f.per_core_s,
        f.p50_ms,
        f.p99_ms,
        f.p999_ms,
        server_ms[0],
        server_ms[1],
        server_ms[2],
        sync_ms[0],
        sync_ms[1],
        sync_ms[2],
        f.rss_mib,
        f.disks
    );
    println!(
        "ingest {name}: RPO (age of each disk's newest uploaded point at {} random moments, points every {} s): p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        f.rpo.3, load.point_interval_s, f.rpo.0, f.rpo.1, f.rpo.2
    );
    Ok(f)
}

/// The TLS-receive, zstd and AES ceilings on the sample as sent, each on one core,
/// timed before the first run and again after every run: each run's ratio is against
/// the mean of the timings either side of it, so that a host whose speed changes
/// during the benchmark moves the ceiling by what it really did, and a ceiling that
/// moved within a run is reported rather than hidden in the ratio.
struct CeilingClock {
    sample: Vec<Vec<u8>>,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    timings: Vec<Stages>,
}

impl CeilingClock {
    fn new(work: &Path, sample: Vec<Vec<u8>>) -> Result<CeilingClock> {
        let dir = work.join("ceiling-pki");
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        generate_loopback(&dir, 1)?;
        let server = Arc::new(server_config(
            &dir.join("server.pem"),
            &dir.join("server.key"),
            &dir.join("ca.pem"),
        )?);
        let client = Arc::new(client_config(
            &dir.join("agent-0.pem"),
            &dir.join("agent-0.key"),
            &dir.join("ca.pem"),
        )?);
        Ok(CeilingClock {
            sample,
            server,
            client,
            timings: Vec::new(),
        })
    }

    /// Times the stages once more; returns the index of this timing.
    fn time(&mut self, when: &str) -> Result<usize> {
        let tls =
            crate::ceilings::tls_receive(&self.sample, self.server.clone(), self.client.clone())?;
        let zstd = crate::ceilings::zstd(&self.sample)?;
        let aes = crate::ceilings::aes(&self.sample);
        let s = Stages { tls, zstd, aes };
        println!(
            "ingest ceiling on one core, {when}: TLS receive {tls:.0} MB/s, zstd-1 {zstd:.0} MB/s, AES-256-GCM {aes:.0} MB/s: composed {:.0} MB/s",
            s.composed()
        );
        self.timings.push(s);
        Ok(self.timings.len() - 1)
    }

    /// The latest timing's index: the one before the next run.
    fn last(&self) -> usize {
        self.timings.len().saturating_sub(1)
    }

    /// Runs `f` between the latest timing and a new one; returns its result with the
    /// ceiling over the two.
    fn around<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<(T, Drift)> {
        let before = self.last();
        let out = f()?;
        self.time(&format!("after {name}"))?;
        Ok((out, Drift::of(&self.timings[before..])))
    }
}

pub struct IngestOptions {
    pub image: PathBuf,
    pub ferry: PathBuf,
    pub work: PathBuf,
    pub seconds: f64,
    pub shards: usize,
    pub agents: usize,
    pub connections: usize,
    pub runs: Vec<RunKind>,
    pub half_mbps: Option<f64>,
    pub store_dir: Option<PathBuf>,
    pub load_threads: usize,
    /// How often each agent takes a crash-consistent point (the policy's interval).
    pub point_interval_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunKind {
    Full,
    Half,
    /// 80 % of the full-load rate: where the RPO goal is held.
    Eighty,
    Connections,
    /// Full load on 1, 2, 4, ... shards, the server and the load each on CPUs of
    /// their own, as far as the host's CPUs go.
    Scaling,
}

/// The sample as the load sends it, for timing the ceiling on the same bytes: in
/// every ten 64 KiB blocks one zero block, one random block and eight of the image.
fn as_sent(sample: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let block = 64 << 10;
    let mut k = 0usize;
    sample
        .iter()
        .map(|c| {
            let mut out = c.clone();
            for b in out.chunks_mut(block) {
                match k % 10 {
                    0 => b.fill(0),
                    1 => rand::thread_rng().fill(b),
                    _ => {}
                }
                k += 1;
            }
            out
        })
        .collect()
}

pub fn run(o: &IngestOptions) -> Result<()> {
    ferry_dataplane::server::run::raise_fd_limit();
    let sample = Arc::new(crate::sample::load(&o.image, 64)?);
    let mut clock = CeilingClock::new(&o.work, as_sent(&sample))?;
    clock.time("before the runs")?;
    let store = o.store_dir.as_deref();
    match store {
        Some(d) => println!("ingest: the blob store is in {}", d.display()),
        None => println!("ingest: the blob store is beside the cache, on the same disk"),
    }
    let wants = |k| o.runs.contains(&k);
    let full_load = Load {
        agents: o.agents,
        disk_bytes: 64 << 20,
        block: 64 << 10,
        rate: None,
        seconds: o.seconds,
        shards: o.shards,
        threads: o.load_threads,
        point_interval_s: o.point_interval_s,
    };
    let full = match wants(RunKind::Full) {
        true => Some(clock.around("the full-load run", || {
            run_load("full", &o.ferry, &o.work, &sample, full_load, None, store)
        })?),
        false => None,
    };
    if let Some((f, c)) = &full {
        println!(
            "ingest full: {:.0} MB/s, {:.0} MB/s per server core-second, {}, ratio {:.2}{}",
            f.mbps,
            f.per_core_s,
            c.describe(2),
            f.per_core_s / c.mean,
            c.warning()
        );
    }
    let half_rate = match (o.half_mbps, &full) {
        (Some(r), _) => Some(r),
        (None, Some((f, _))) => Some(f.mbps / 2.0),
        (None, None) => None,
    };
    let half = match (wants(RunKind::Half), half_rate) {
        (true, Some(rate)) => {
            let load = Load {
                rate: Some(rate),
                ..full_load
            };
            let (half, _) = clock.around("the half-load run", || {
                run_load("half", &o.ferry, &o.work, &sample, load, None, store)
            })?;
            Some(half)
        }
        (true, None) => bail!("the half-load run needs the full-load run or --half-mbps"),
        (false, _) => None,
    };
    let eighty = match (wants(RunKind::Eighty), &full) {
        (true, Some((f, _))) => {
            let load = Load {
                rate: Some(f.mbps * 0.8),
                ..full_load
            };
            let (eighty, _) = clock.around("the 80 % load run", || {
                run_load("eighty", &o.ferry, &o.work, &sample, load, None, store)
            })?;
            Some(eighty)
        }
        (true, None) => bail!("the 80 % load run needs the full-load run"),
        (false, _) => None,
    };
    let goal = o.point_interval_s + 0.25;
    for (what, r) in [("half", &half), ("80 %", &eighty)] {
        if let Some(r) = r {
            println!(
                "RPO at {what} load, points every {} s: p50 {:.2} s, p99 {:.2} s, max {:.2} s (goal p99 <= {goal:.2} s: {})",
                o.point_interval_s,
                r.rpo.0,
                r.rpo.1,
                r.rpo.2,
                if r.rpo.1 <= goal { "met" } else { "NOT met" }
            );
        }
    }
    let many = match wants(RunKind::Connections) {
        true => {
            let rate = half_rate.map_or(50.0, |h| (h / 2.0).min(50.0));
            let load = Load {
                agents: o.connections,
                disk_bytes: 256 << 10,
                block: 4 << 10,
                rate: Some(rate),
                seconds: o.seconds.max(10.0),
                ..full_load
            };
            let (many, _) = clock.around("the connections run", || {
                run_load("connections", &o.ferry, &o.work, &sample, load, None, store)
            })?;
            println!(
                "{} connections: server peak RSS {:.0} MiB ({} 1 GiB)",
                many.disks,
                many.rss_mib,
                if many.rss_mib <= 1024.0 {
                    "within"
                } else {
                    "ABOVE"
                }
            );
            Some(many)
        }
        false => None,
    };
    if wants(RunKind::Scaling) {
        scaling(o, &sample, full_load, &mut clock)?;
    }
    let all = Drift::of(&clock.timings);
    println!(
        "ingest ceiling over the whole benchmark: {}",
        all.describe(clock.timings.len())
    );
    if let (Some((full, c)), Some(half), Some(_)) = (full, half, many) {
        println!(
            "ingest: {:.0} MB/s, {:.0} MB/s per server core-second, {}, ratio {:.2}, p99 ack {:.1} ms, verify ok{}",
            full.mbps,
            full.per_core_s,
            c.describe(2),
            full.per_core_s / c.mean,
            half.p99_ms,
            c.warning()
        );
    }
    Ok(())
}

/// Full load on 1, 2, 4, ... shards while the host has twice as many CPUs, then half of
/// the rate each step sustained: the server on the first n of the CPUs this process may
/// use, the load generator's n threads on the next n, so neither takes time from the
/// other and each step adds both.
fn scaling(
    o: &IngestOptions,
    sample: &Arc<Vec<Vec<u8>>>,
    base: Load,
    clock: &mut CeilingClock,
) -> Result<()> {
    let cpus = allowed_cpus().context("sched_getaffinity")?;
    if cpus.len() < 2 {
        println!(
            "ingest scaling: needs two CPUs, this process may use {}",
            cpus.len()
        );
        return Ok(());
    }
    let mut steps = Vec::new();
    let mut one = None;
    let mut n = 1;
    while 2 * n <= cpus.len() {
        let pin = Pin {
            server: cpus[..n].to_vec(),
            load: cpus[n..2 * n].to_vec(),
        };
        let full = Load {
            agents: 4 * n,
            shards: n,
            threads: n,
            ..base
        };
        let mut run = |name: &str, load| {
            let name = format!("scaling-{n}-{name}");
            let store = o.store_dir.as_deref();
            clock.around(&format!("the {name} run"), || {
                run_load(&name, &o.ferry, &o.work, sample, load, Some(&pin), store)
            })
        };
        let (f, ceiling) = run("full", full)?;
        let one = *one.get_or_insert(f.mbps);
        let rate = Some(f.mbps / 2.0);
        let (h, _) = run("half", Load { rate, ..full })?;
        steps.push(format!(
            "{n} shard(s) on {n} CPU(s) {:.0} MB/s (x{:.2}, {:.0} MB/s per core-second, ratio {:.2}{}), at half of that p99 ack {:.2} ms (in the server {:.2} ms)",
            f.mbps,
            f.mbps / one,
            f.per_core_s,
            f.per_core_s / ceiling.mean,
            ceiling.warning(),
            h.p99_ms,
            h.server_p99_ms,
        ));
        n *= 2;
    }
    println!(
        "ingest scaling, server and load on CPUs of their own: {}",
        steps.join("; ")
    );
    Ok(())
}
