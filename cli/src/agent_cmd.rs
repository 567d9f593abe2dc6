//! `ferry agent` (the mobility service) and `ferry agent ctl`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_agent::live::group::GroupPeer;
use ferry_agent::live::{admin, Agent, DiskSpec, Options};
use ferry_link::client::Target;
use ferry_link::tls::certs::{client_config, server_name};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    ctl: Option<Ctl>,
    #[command(flatten)]
    run: Option<RunArgs>,
}

#[derive(clap::Subcommand)]
enum Ctl {
    /// Talk to a running agent through its admin socket
    Ctl {
        #[arg(long, value_name = "PATH")]
        admin_socket: PathBuf,
        #[command(subcommand)]
        request: Request,
    },
}

#[derive(clap::Subcommand)]
enum Request {
    /// Take a recovery point now; prints its id on the last line
    Bookmark {
        /// App-consistent: run the freeze hook around the point
        #[arg(long)]
        app: bool,
        #[arg(long)]
        label: Option<String>,
    },
    /// Compare the disks with the replica's block checksums and send only what
    /// differs (progress in `status`)
    Resync {
        /// Only this disk (default: every disk)
        #[arg(long)]
        disk: Option<String>,
    },
    /// Mode, journal bytes, replication lag, last point, copy and resync progress
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// The process server, HOST:PORT (standalone; under a control plane its orders
    /// name it)
    #[arg(
        long,
        value_name = "HOST:PORT",
        required_unless_present = "control_plane",
        conflicts_with = "control_plane"
    )]
    process_server: Option<String>,
    /// The control plane, https://HOST:PORT: enroll (once, with --enroll-token),
    /// heartbeat, and take the process server and policy from its orders. Several
    /// control planes of one site: repeat the flag or give a comma list; requests go
    /// to whichever answers
    #[arg(
        long,
        value_name = "URL",
        value_delimiter = ',',
        requires = "state_dir"
    )]
    control_plane: Vec<String>,
    /// One-time enrollment token (`ferry cp tokens create --for agent`); only needed
    /// while --state-dir holds no certificate yet
    #[arg(long, value_name = "TOKEN", requires = "control_plane")]
    enroll_token: Option<String>,
    /// Under a control plane: the key, certificate, site CA, last orders and journal
    /// (DIR/journal)
    #[arg(long, value_name = "DIR", requires = "control_plane")]
    state_dir: Option<PathBuf>,
    /// This machine's name (its certificate must name it)
    #[arg(long)]
    machine: String,
    /// A protected disk: NAME=PATH (the NBD export NAME serves PATH)
    #[arg(long = "disk", value_name = "NAME=PATH", required = true)]
    disks: Vec<String>,
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: SocketAddr,
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "control_plane",
        conflicts_with = "control_plane"
    )]
    journal_dir: Option<PathBuf>,
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
    /// CA the process server's certificate chains to (standalone), or the control
    /// plane's (its state directory's ca.pem)
    #[arg(long, value_name = "PEM")]
    ca: PathBuf,
    /// Standalone only: under a control plane the policy sets it
    #[arg(long, default_value_t = 5.0, conflicts_with = "control_plane")]
    crash_point_interval_s: f64,
    /// Run as `CMD freeze` and `CMD thaw` around app-consistent points
    #[arg(long, value_name = "CMD")]
    freeze_hook: Option<String>,
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Journal bound per disk, MiB
    #[arg(long, default_value_t = 1024)]
    journal_mib: u64,
    /// Skip the initial full copy (the replica already holds the disk)
    #[arg(long)]
    no_initial_copy: bool,
    /// Replication group for multi-machine consistent points (standalone; under a
    /// control plane its orders give the group)
    #[arg(long, conflicts_with = "control_plane")]
    group: Option<String>,
    /// Where this member listens for the group coordinator (port 20004 by
    /// convention). Standalone it needs --group and --group-coordinator; under a
    /// control plane it is reported in the heartbeat, and the orders say whom to
    /// accept
    #[arg(long, value_name = "ADDR")]
    group_listen: Option<SocketAddr>,
    /// Under a control plane: the HOST:PORT the coordinator reaches --group-listen
    /// at, when that is not the address bound (e.g. 0.0.0.0:20004)
    #[arg(
        long,
        value_name = "HOST:PORT",
        requires = "group_listen",
        requires = "control_plane"
    )]
    group_advertise: Option<String>,
    /// The coordinator's machine name: this member accepts cuts only from a
    /// certificate that names it
    #[arg(
        long,
        value_name = "NAME",
        requires = "group_listen",
        conflicts_with = "control_plane"
    )]
    group_coordinator: Option<String>,
    /// A member, by the machine name its certificate carries and its --group-listen
    /// address: given, this agent coordinates the group's cuts
    #[arg(long = "group-peer", value_name = "NAME@ADDR", requires = "group", value_parser = GroupPeer::parse)]
    group_peers: Vec<GroupPeer>,
}

pub fn agent(a: AgentArgs) -> Result<()> {
    if let Some(Ctl::Ctl {
        admin_socket,
        request,
    }) = a.ctl
    {
        let req = match request {
            Request::Bookmark { app, label } => {
                let mut r = "bookmark".to_string();
                if app {
                    r.push_str(" --app");
                }
                if let Some(l) = label {
                    if l.contains(char::is_whitespace) {
                        bail!("--label takes one word");
                    }
                    r.push_str(&format!(" --label {l}"));
                }
                r
            }
            Request::Resync { disk } => match disk {
                Some(d) if d.contains(char::is_whitespace) => bail!("--disk takes one name"),
                Some(d) => format!("resync --disk {d}"),
                None => "resync".to_string(),
            },
            Request::Status { json } => if json { "status --json" } else { "status" }.to_string(),
        };
        let lines = admin::request(&admin_socket, &req)?;
        let first = lines[0].trim_start_matches("ok").trim();
        if !first.is_empty() {
            println!("{first}");
        }
        for l in &lines[1..] {
            println!("{l}");
        }
        return Ok(());
    }
    let r = a
        .run
        .context("missing agent options; see ferry agent --help")?;
    ferry_replica::layout::check_name("machine", &r.machine)
        .map_err(|e| anyhow!("--machine: {e}"))?;
    let mut disks = Vec::new();
    for d in &r.disks {
        let (name, path) = d
            .split_once('=')
            .with_context(|| format!("--disk {d:?}: expected NAME=PATH"))?;
        // The name becomes a directory under --journal-dir and a path in the store.
        ferry_replica::layout::check_name("disk", name)
            .map_err(|e| anyhow!("--disk {d:?}: {e}"))?;
        disks.push(DiskSpec {
            name: name.to_string(),
            path: PathBuf::from(path),
        });
    }
    if !(r.crash_point_interval_s.is_finite() && r.crash_point_interval_s >= 0.0) {
        bail!("--crash-point-interval-s must be a number of seconds (0: none)");
    }
    // A member must know whom to accept: standalone, the flags say.
    if r.control_plane.is_empty()
        && r.group_listen.is_some()
        && (r.group.is_none() || r.group_coordinator.is_none())
    {
        bail!("--group-listen without a control plane needs --group <GROUP> and --group-coordinator <NAME>");
    }
    let run = if r.control_plane.is_empty() {
        standalone(&r)?
    } else {
        crate::agent_control::prepare(&r.machine, &disks, &r.control_plane, &r)?
    };
    // Under a control plane any heartbeat may give a group role: the channel's TLS
    // (the enrolled certificate) is ready from the start.
    let group_tls = if r.group.is_some() || r.group_listen.is_some() || run.control.is_some() {
        Some(ferry_agent::live::group::GroupTls::load(
            &run.cert, &run.key, &run.ca,
        )?)
    } else {
        None
    };
    // Before any thread starts, so that all inherit it: SIGTERM and SIGINT are taken
    // by this thread with sigwait, for an ordered stop, not by a handler.
    let stop_signals = block_stop_signals();
    let agent = Agent::start(Options {
        machine: r.machine.clone(),
        disks,
        target: run.target,
        nbd_listen: r.nbd_listen,
        journal_dir: run.journal_dir,
        journal_bytes: r.journal_mib << 20,
        crash_point_interval: run.crash_point_interval,
        freeze_hook: r.freeze_hook,
        admin_socket: r.admin_socket,
        initial_copy: !r.no_initial_copy,
        group: r.group,
        group_listen: r.group_listen,
        group_coordinator: r.group_coordinator,
        group_peers: r.group_peers,
        group_tls,
    })?;
    let heartbeats = match run.control {
        Some(c) => Some(c.group_advertise(r.group_advertise).start(agent.clone())?),
        None => None,
    };
    println!("agent for {} serving NBD on {}", r.machine, agent.nbd_addr);
    let signal = wait_for(&stop_signals);
    tracing::info!(signal, "stopping in order: flushing every disk");
    if let Some(h) = heartbeats {
        h.stop();
    }
    agent.shutdown()?;
    // On stderr: whoever read the first line of stdout may have closed it.
    tracing::info!(machine = %r.machine, "the agent stopped in order");
    Ok(())
}

/// What the agent starts with: from the flags (standalone) or from enrollment and the
/// control plane's orders.
pub(crate) struct Prepared {
    pub target: Target,
    pub journal_dir: PathBuf,
    pub crash_point_interval: Option<Duration>,
    /// The identity the group channel uses too.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub control: Option<crate::agent_control::Control>,
}

fn standalone(r: &RunArgs) -> Result<Prepared> {
    // clap requires these without --control-plane.
    let (Some(ps), Some(journal_dir), Some(cert), Some(key)) =
        (&r.process_server, &r.journal_dir, &r.tls_cert, &r.tls_key)
    else {
        bail!("without --control-plane, --process-server, --journal-dir, --tls-cert and --tls-key are needed");
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(ps)
        .with_context(|| format!("--process-server {ps}"))?
        .next()
        .with_context(|| format!("--process-server {ps}: no address"))?;
    let host = ps.rsplit_once(':').map_or(ps.as_str(), |(h, _)| h);
    Ok(Prepared {
        target: Target {
            addr,
            server_name: server_name(host)?,
            tls: Arc::new(client_config(cert, key, &r.ca)?),
            timeout: Duration::from_secs(10),
        },
        journal_dir: journal_dir.clone(),
        crash_point_interval: (r.crash_point_interval_s > 0.0)
            .then(|| Duration::from_secs_f64(r.crash_point_interval_s)),
        cert: cert.clone(),
        key: key.clone(),
        ca: r.ca.clone(),
        control: None,
    })
}

impl RunArgs {
    pub(crate) fn enroll_token(&self) -> Option<&str> {
        self.enroll_token.as_deref()
    }

    pub(crate) fn state_dir(&self) -> Option<&std::path::Path> {
        self.state_dir.as_deref()
    }

    pub(crate) fn ca(&self) -> &std::path::Path {
        &self.ca
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and in every thread it starts after).
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: the set is initialised by sigemptyset before use; pthread_sigmask only
    // reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for one of the blocked stop signals; returns its number.
fn wait_for(set: &libc::sigset_t) -> i32 {
    let mut signal = 0;
    // SAFETY: `set` is a valid signal set and `signal` a valid place for the answer.
    while unsafe { libc::sigwait(set, &mut signal) } != 0 {}
    signal
}
