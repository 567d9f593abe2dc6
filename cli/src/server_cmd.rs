//! `ferry process-server` and `ferry certs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use ferry_dataplane::server::{start, Limits, Options};
use ferry_link::tls::certs::{generate_loopback, server_config};
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
    #[arg(long, value_name = "PEM")]
    tls_cert: PathBuf,
    #[arg(long, value_name = "PEM")]
    tls_key: PathBuf,
    /// CA that signs the agents' client certificates
    #[arg(long, value_name = "PEM")]
    client_ca: PathBuf,
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
    let tls = server_config(&a.tls_cert, &a.tls_key, &a.client_ca)?;
    if !(a.cache_gib.is_finite() && a.cache_gib > 0.0) {
        bail!("--cache-gib must be positive");
    }
    let mut o = Options::new(a.listen, a.cache_dir);
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
    let running = start(o, tls, store, vault)?;
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
    Ok(())
}

pub fn certs(out: &Path, agents: usize) -> Result<()> {
    generate_loopback(out, agents)?;
    println!(
        "wrote ca.pem, server.pem/.key (for 127.0.0.1) and {agents} agent certificates to {}",
        out.display()
    );
    Ok(())
}
