//! `ferry process-server` and `ferry certs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_dataplane::server::control::Reporter;
use ferry_dataplane::server::{start, Limits, Options};
use ferry_link::control::client::{ControlClient, Enrollment, Heartbeats};
use ferry_link::control::wire::{Kind, HEARTBEAT_INTERVAL_S};
use ferry_link::tls::certs::{
    generate_loopback, server_config, server_config_reloading, ServerCert,
};
use ferry_replica::{Store, VaultKey};

#[derive(clap::Args)]
pub struct ProcessServerArgs {
    /// Address for agents (TLS 1.3, client certificates required)
    #[arg(long, default_value = "0.0.0.0:9443")]
    listen: SocketAddr,
    /// Directory of the durable cache (one log per shard)
    #[arg(long, value_name = "DIR")]
    cache_dir: PathBuf,
    /// Blob store: file:///abs/path, az://container or s3://bucket
    #[arg(long, value_name = "URL")]
    store: String,
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    #[arg(
        long,
        value_name = "PEM",
        required_unless_present = "control_plane",
        conflicts_with = "control_plane"
    )]
    tls_cert: Option<PathBuf>,
    #[arg(
        long,
        value_name = "PEM",
        required_unless_present = "control_plane",
        conflicts_with = "control_plane"
    )]
    tls_key: Option<PathBuf>,
    /// CA that signs the agents' client certificates (standalone; under a control
    /// plane, its site CA)
    #[arg(
        long,
        value_name = "PEM",
        required_unless_present = "control_plane",
        conflicts_with = "control_plane"
    )]
    client_ca: Option<PathBuf>,
    /// The control plane, https://HOST:PORT: enroll (once, with --enroll-token) for
    /// the server certificate, heartbeat, and refuse the certificates it revokes.
    /// Several control planes of one site: repeat the flag or give a comma list;
    /// requests go to whichever answers
    #[arg(long, value_name = "URL", value_delimiter = ',', requires_all = ["ca", "advertise"])]
    control_plane: Vec<String>,
    /// The control plane's CA (its state directory's ca.pem)
    #[arg(long, value_name = "PEM", requires = "control_plane")]
    ca: Option<PathBuf>,
    /// One-time enrollment token (`ferry cp tokens create --for process-server`);
    /// only needed while the state directory holds no certificate yet
    #[arg(long, value_name = "TOKEN", requires = "control_plane")]
    enroll_token: Option<String>,
    /// This process server's name at the control plane (default: the host name)
    #[arg(long, requires = "control_plane")]
    name: Option<String>,
    /// HOST:PORT agents connect to; the certificate names HOST
    #[arg(long, value_name = "HOST:PORT", requires = "control_plane")]
    advertise: Option<String>,
    /// Where the key, certificate and site CA are kept (default: CACHE_DIR/identity)
    #[arg(long, value_name = "DIR", requires = "control_plane")]
    state_dir: Option<PathBuf>,
    /// Shards (threads, each with its own io_uring); default: one per core
    #[arg(long)]
    shards: Option<usize>,
    /// Pin shard i to CPU i
    #[arg(long)]
    pin: bool,
    /// Address for GET /metrics and /health
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Bound of the cache in GiB, over all shards
    #[arg(long, default_value_t = 8.0)]
    cache_gib: f64,
    /// Payload bytes an agent may have in flight before its writes are durable
    #[arg(long, default_value_t = 8 << 20)]
    credit_bytes: u64,
    /// Seconds a peer may send nothing (idle without ping, or stalled in a frame)
    #[arg(long, default_value_t = 30.0)]
    peer_timeout_s: f64,
    /// Milliseconds the upload stage waits to gather a larger segment
    #[arg(long, default_value_t = 200)]
    batch_ms: u64,
}

fn secs(s: f64, what: &str) -> Result<Duration> {
    if !(s.is_finite() && s > 0.0) {
        bail!("{what} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(s))
}

pub fn process_server(a: ProcessServerArgs) -> Result<()> {
    let vault = VaultKey::load(&a.key_file)?;
    let store = Store::open_idle(&a.store)?;
    if !(a.cache_gib.is_finite() && a.cache_gib > 0.0) {
        bail!("--cache-gib must be positive");
    }
    // Under a control plane: enrolled (once) for the certificate agents see, and the
    // site CA their certificates chain to.
    let (tls, control) = if a.control_plane.is_empty() {
        let (Some(cert), Some(key), Some(ca)) = (&a.tls_cert, &a.tls_key, &a.client_ca) else {
            bail!("without --control-plane, --tls-cert, --tls-key and --client-ca are needed");
        };
        (server_config(cert, key, ca)?, None)
    } else {
        let c = enroll(&a, &a.control_plane)?;
        let cert = ServerCert::load(&c.files.cert, &c.files.key)?;
        let tls = server_config_reloading(cert.clone(), &c.files.ca)?;
        (tls, Some((c, cert)))
    };
    let mut o = Options::new(a.listen, a.cache_dir.clone());
    // The writer its commits carry: fencing tells servers apart by it.
    o.name = name(&a)?;
    if let Some(n) = a.shards {
        o.shards = n;
    }
    o.pin = a.pin;
    o.metrics_listen = a.metrics_listen;
    o.cache_bytes = (a.cache_gib * (1u64 << 30) as f64) as u64;
    o.limits = Limits {
        credit_bytes: a.credit_bytes,
        ..Limits::default()
    };
    o.peer_timeout = secs(a.peer_timeout_s, "--peer-timeout-s")?;
    o.batch_delay = Duration::from_millis(a.batch_ms);
    if a.credit_bytes < (1 << 20) + 4096 {
        bail!(
            "--credit-bytes must be at least 1052672 (one largest frame), got {}",
            a.credit_bytes
        );
    }
    let shards = o.shards;
    let revoked = o.revoked.clone();
    let failed_over = o.failed_over.clone();
    let running = start(o, tls, store, vault)?;
    let heartbeats = match control {
        Some((client, cert)) => {
            let reporter = Reporter::new(
                name(&a)?,
                a.advertise.clone().unwrap_or_default(),
                running.view.clone(),
                running.registry.clone(),
                revoked,
            )
            .with_cert(cert)
            .with_failed_over(failed_over);
            Some(Heartbeats::start(
                client,
                reporter,
                Duration::from_secs_f64(HEARTBEAT_INTERVAL_S),
            )?)
        }
        None => None,
    };
    // One line a supervisor or script can wait for.
    println!(
        "process server listening on {} with {shards} shards{}",
        running.addr,
        running
            .metrics_addr
            .map(|m| format!(", metrics on http://{m}/metrics"))
            .unwrap_or_default()
    );
    running.wait();
    if let Some(h) = heartbeats {
        h.stop();
    }
    Ok(())
}

/// The name at the control plane: --name, or the host name.
fn name(a: &ProcessServerArgs) -> Result<String> {
    let n = match &a.name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("--name not given and the host name unreadable")?
            .trim()
            .to_string(),
    };
    ferry_replica::layout::check_name("process server", &n)
        .map_err(|e| anyhow!("--name {n:?}: {e}"))?;
    Ok(n)
}

fn enroll(a: &ProcessServerArgs, urls: &[String]) -> Result<ControlClient> {
    let name = name(a)?;
    let advertise = a
        .advertise
        .clone()
        .context("--control-plane needs --advertise HOST:PORT")?;
    let ca = a.ca.clone().context("--control-plane needs --ca")?;
    let dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| a.cache_dir.join("identity"));
    ControlClient::open(
        &Enrollment {
            urls: urls.to_vec(),
            ca,
            kind: Kind::ProcessServer,
            name: name.clone(),
            advertise: Some(advertise),
            dir,
        },
        a.enroll_token.as_deref(),
    )
    .with_context(|| format!("enrolling process server {name} with {}", urls.join(", ")))
}

pub fn certs(out: &Path, agents: usize) -> Result<()> {
    generate_loopback(out, agents)?;
    println!(
        "wrote ca.pem, server.pem/.key (for 127.0.0.1) and {agents} agent certificates to {}",
        out.display()
    );
    Ok(())
}
