//! `ferry recovery-host`: enrolls with the control plane (once; the identity is kept
//! in WORK_DIR/identity), listens for NBD, heartbeats every second and executes the
//! work items of its orders (`crate::recovery_host`). docs/recovery-hosts.md.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_agent::nbd::{serve, Exports};
use ferry_link::control::client::{ControlClient, Enrollment, Heartbeats};
use ferry_link::control::wire::Kind;
use ferry_replica::{Store, VaultKey};

use crate::recovery_host::heartbeat::Beat;
use crate::recovery_host::store_probe::{self, StoreHealth};
use crate::recovery_host::Host;

#[derive(clap::Args)]
pub struct RecoveryHostArgs {
    /// The control plane, https://HOST:PORT; several of one site: repeat the flag or
    /// give a comma list
    #[arg(long, value_name = "URL", value_delimiter = ',', required = true)]
    control_plane: Vec<String>,
    /// The control plane's CA (its state directory's ca.pem)
    #[arg(long, value_name = "PEM")]
    ca: PathBuf,
    /// One-time enrollment token (`ferry cp tokens create --for recovery-host`); only
    /// needed while WORK_DIR/identity holds no certificate yet
    #[arg(long, value_name = "TOKEN")]
    enroll_token: Option<String>,
    /// This recovery host's name at the control plane (default: the host name)
    #[arg(long)]
    name: Option<String>,
    /// Its identity, and one folder per work item (items/ID): images, overlays, logs
    #[arg(long, value_name = "DIR")]
    work_dir: PathBuf,
    /// Blob store: file:///abs/path, az://container or s3://bucket
    #[arg(long, value_name = "URL")]
    store: String,
    /// The store's vault key file (`ferry keygen`): the replica is decrypted with it
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// Where the NBD server listens for the disks it serves (port 0: any free port)
    #[arg(long, value_name = "ADDR")]
    nbd_listen: String,
    /// HOST:PORT clients reach the NBD server at, as the nbd:// URLs name it
    /// (default: the listening address, which must then not be 0.0.0.0 or ::)
    #[arg(long, value_name = "HOST:PORT")]
    advertise_nbd: Option<String>,
    /// Decoded extents kept in memory per served disk (16 MiB each by default)
    #[arg(long, default_value_t = 32)]
    cache_extents: usize,
}

/// The name at the control plane: --name, or the host name.
fn name(a: &RecoveryHostArgs) -> Result<String> {
    let n = match &a.name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("--name not given and the host name unreadable")?
            .trim()
            .to_string(),
    };
    ferry_replica::layout::check_name("recovery host", &n)
        .map_err(|e| anyhow!("--name {n:?}: {e}"))?;
    Ok(n)
}

pub fn run(a: RecoveryHostArgs) -> Result<()> {
    let name = name(&a)?;
    if a.cache_extents == 0 {
        bail!("--cache-extents must be at least 1");
    }
    ferry_replica::local::create_private_dir(&a.work_dir)
        .with_context(|| format!("create --work-dir {}", a.work_dir.display()))?;
    let vault = VaultKey::load(&a.key_file)?;
    let store = Store::open(&a.store)?;
    let listener = TcpListener::bind(&a.nbd_listen)
        .with_context(|| format!("listen for NBD on {}", a.nbd_listen))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("address of {}", a.nbd_listen))?;
    let nbd_address = match &a.advertise_nbd {
        Some(adv) => adv.clone(),
        None if local.ip().is_unspecified() => bail!(
            "--nbd-listen {local} is every address: say which one clients reach with \
             --advertise-nbd HOST:PORT"
        ),
        None => local.to_string(),
    };
    // The token is a secret: it goes to the enrollment only, never to a log line.
    let client = ControlClient::open(
        &Enrollment {
            urls: a.control_plane.clone(),
            ca: a.ca.clone(),
            kind: Kind::RecoveryHost,
            name: name.clone(),
            advertise: None,
            dir: a.work_dir.join("identity"),
        },
        a.enroll_token.as_deref(),
    )
    .with_context(|| {
        format!(
            "enrolling recovery host {name} with {}",
            a.control_plane.join(", ")
        )
    })?;
    let exports = Arc::new(Exports::default());
    let health = Arc::new(StoreHealth::default());
    store_probe::spawn(store.clone(), health.clone()).context("start the store probe")?;
    let host = Host::open(
        a.work_dir.join("items"),
        store,
        vault,
        nbd_address.clone(),
        exports.clone(),
        a.cache_extents,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::Builder::new()
        .name("ferry-nbd-accept".into())
        .spawn(move || serve(listener, exports, stop))
        .context("start the NBD server")?;
    // Served items come back at the first answer: the orders say which are still
    // wanted.
    let _beats = Heartbeats::start(
        client,
        Beat::new(host, name.clone(), a.work_dir.clone(), health),
        Duration::from_secs(1),
    )?;
    // One line a supervisor or script can wait for.
    println!("recovery host {name} serving NBD at {nbd_address}");
    loop {
        std::thread::park();
    }
}
