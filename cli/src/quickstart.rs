//! `ferry quickstart`: the whole path on loopback with nothing else installed. It
//! starts a control plane (its own site CA, SQLite), enrolls a process server (local
//! directory store) and an agent through it with one-time tokens, writes to a sample
//! disk through the agent's NBD export, takes recovery points, fails over to each one
//! and checks that the rebuilt disk matches the sample disk as it was when the point
//! was taken; last, it shows the machine's health and RPO as the control plane's API
//! reports them.

mod control_plane;
mod sample;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_agent::live::{Agent, DiskSpec, Options};
use ferry_agent::nbd::client::Client;
use ferry_controlplane::recovery::failover;
use ferry_controlplane::recovery::points::PointSpec;
use ferry_dataplane::server::control::Reporter;
use ferry_dataplane::server::{start, Options as ServerOptions, Running};
use ferry_link::control::client::{ControlClient, Enrollment, Heartbeats};
use ferry_link::control::wire::{Kind, HEARTBEAT_INTERVAL_S};
use ferry_link::tls::certs::{server_config_reloading, ServerCert};
use ferry_replica::export::Format;
use ferry_replica::{Store, VaultKey};

use crate::progress::bar;
use control_plane::Embedded;
use sample::{fill, same};

const MACHINE: &str = "agent-0";
const PROCESS_SERVER: &str = "ps-0";
const DISK_BYTES: u64 = 256 << 20;
const ROUNDS: usize = 3;
const ROUND_BYTES: u64 = 48 << 20;

pub fn run(dir: Option<PathBuf>) -> Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("ferry-quickstart-{}", std::process::id())),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty: give an empty or new directory",
            dir.display()
        );
    }
    // It will hold a disk, its journal, the cache and failover images in the clear.
    ferry_replica::local::create_private_dir(&dir)
        .with_context(|| format!("create {}", dir.display()))?;
    let p = |s: &str| dir.join(s);
    println!("quickstart in {}", dir.display());
    VaultKey::generate().save_new(&p("vault.key"))?;
    std::fs::create_dir_all(p("store"))?;
    let store_url = format!("file://{}", p("store").display());

    let cp = Embedded::start(&p("control-plane"), &store_url, &p("vault.key"))?;
    println!(
        "  control plane on {} (site CA {}, admin token {})",
        cp.url,
        cp.ca.display(),
        cp.token_file.display()
    );

    let (server, ps_heartbeats) = process_server(&cp, &dir, &store_url)?;
    let ps = cp.wait_process_server(PROCESS_SERVER, Duration::from_secs(30))?;
    println!(
        "  process server {PROCESS_SERVER} enrolled, on {} (mutual TLS), store {store_url}",
        crate::cp::client::cell(&ps, "address")
    );

    let disk = p("sample-disk.img");
    std::fs::File::create(&disk)?.set_len(DISK_BYTES)?;
    let disks = vec![DiskSpec {
        name: "sda".into(),
        path: disk.clone(),
    }];
    // As `ferry agent --control-plane` does: enroll, then the first orders name the
    // process server and the policy (the default: a crash point every 5 s).
    let token = cp.enrollment_token("agent")?;
    let prepared = crate::agent_control::enroll_and_order(
        MACHINE,
        &disks,
        std::slice::from_ref(&cp.url),
        &cp.ca,
        Some(&token),
        &p("agent"),
    )?;
    let agent = Agent::start(Options {
        machine: MACHINE.into(),
        disks,
        target: prepared.target,
        nbd_listen: "127.0.0.1:0".parse()?,
        journal_dir: prepared.journal_dir,
        journal_bytes: 256 << 20,
        crash_point_interval: prepared.crash_point_interval,
        freeze_hook: None,
        admin_socket: None,
        initial_copy: true,
        group: None,
        group_listen: None,
        group_coordinator: None,
        group_peers: Vec::new(),
        group_tls: None,
    })?;
    let agent_heartbeats = match prepared.control {
        Some(c) => c.start(agent.clone())?,
        None => bail!("the agent was prepared without its control plane"),
    };
    println!(
        "  agent for machine {MACHINE} enrolled, exporting disk sda over NBD on {}",
        agent.nbd_addr
    );

    let mut nbd = Client::connect(agent.nbd_addr, "sda")?;
    let mut points = Vec::new();
    let mut block = vec![0u8; 1 << 20];
    for round in 0..ROUNDS {
        let pb = bar(ROUND_BYTES, &format!("write {}", round + 1));
        let mut off = ((round as u64 * 64) << 20) % DISK_BYTES;
        let mut written = 0;
        while written < ROUND_BYTES {
            fill(&mut block, (round as u64) << 32 | written);
            nbd.write(off, &block)?;
            off = (off + block.len() as u64 * 3) % DISK_BYTES;
            written += block.len() as u64;
            pb.inc(block.len() as u64);
        }
        nbd.zero((round as u64) << 20, 1 << 20)?;
        nbd.flush()?;
        pb.finish_and_clear();
        let id = wait_point(&agent)?;
        let copy = p(&format!("sample-at-{id}.img"));
        std::fs::copy(&disk, &copy)?;
        println!(
            "  wrote {} MiB through NBD; recovery point {id}",
            ROUND_BYTES >> 20
        );
        points.push((id, copy));
    }
    nbd.disconnect()?;

    let pb = bar(ROUNDS as u64, "upload");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !agent.uploaded_all() {
        if Instant::now() > deadline {
            bail!(
                "the replica did not catch up in 5 minutes: {:?}",
                agent.status()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pb.finish_and_clear();
    println!("  every write is in the store");

    let store = Store::open(&store_url)?;
    let vault = VaultKey::load(&p("vault.key"))?;
    for (id, copy) in &points {
        let spec: PointSpec = id.parse()?;
        let plan = failover::plan(&store, &vault, MACHINE, &spec)?;
        let out = p(&format!("failover-{id}"));
        let pb = bar(plan.stored_bytes(), "failover");
        failover::run(plan, Format::Raw, &out, &|n| pb.inc(n))?;
        pb.finish_and_clear();
        same(&out.join("sda.raw"), copy)?;
        println!(
            "  failover to {id}: {} matches the disk at that point",
            out.join("sda.raw").display()
        );
    }

    // The agent heartbeats every 5 s: its report of the newest uploaded point makes
    // the RPO the API shows.
    let m = cp.wait_machine_healthy(MACHINE, Duration::from_secs(60))?;
    println!(
        "  control plane: machine {MACHINE} health {}, rpo_seconds {} (process server {}, policy {})",
        m.health, m.rpo_seconds, m.process_server, m.policy
    );
    agent_heartbeats.stop();
    agent.stop();
    ps_heartbeats.stop();
    server.stop();
    // The embedded control plane ends with the quickstart; its state does not.
    println!(
        "  the control plane's state stays in {s}: serve it again with\n    \
         ferry control-plane --state-dir {s} --listen 127.0.0.1:8443 --store {store_url} --key-file {k}\n  \
         and go on with\n    \
         ferry cp --url https://127.0.0.1:8443 --token-file {t} --ca {c} machines show {MACHINE}",
        s = cp.state_dir.display(),
        k = p("vault.key").display(),
        t = cp.token_file.display(),
        c = cp.ca.display(),
    );
    drop(cp);
    println!(
        "quickstart: OK, {} points rebuilt byte-identical",
        points.len()
    );
    Ok(())
}

/// The process server, enrolled through the control plane for its certificate (the
/// site CA signs the agents' too), heartbeating to it as `ferry process-server
/// --control-plane` does.
fn process_server(cp: &Embedded, dir: &Path, store_url: &str) -> Result<(Running, Heartbeats)> {
    let token = cp.enrollment_token("process-server")?;
    let client = ControlClient::open(
        &Enrollment {
            urls: vec![cp.url.clone()],
            ca: cp.ca.clone(),
            kind: Kind::ProcessServer,
            name: PROCESS_SERVER.into(),
            // Its port is known only once it listens, after enrollment: the
            // certificate names the host alone, and the first heartbeat tells the
            // control plane (and so the agent) the address it listens on.
            advertise: Some("127.0.0.1:0".into()),
            dir: dir.join("process-server"),
        },
        Some(&token),
    )
    .with_context(|| format!("enrolling process server {PROCESS_SERVER} with {}", cp.url))?;
    let cert = ServerCert::load(&client.files.cert, &client.files.key)?;
    let tls = server_config_reloading(cert.clone(), &client.files.ca)?;
    let mut so = ServerOptions::new("127.0.0.1:0".parse()?, dir.join("cache"));
    so.cache_bytes = 1 << 30;
    so.batch_delay = Duration::from_millis(50);
    so.name = PROCESS_SERVER.into();
    let revoked = so.revoked.clone();
    let vault = VaultKey::load(&dir.join("vault.key"))?;
    let server = start(so, tls, Store::open(store_url)?, vault)?;
    let reporter = Reporter::new(
        PROCESS_SERVER.into(),
        server.addr.to_string(),
        server.view.clone(),
        server.registry.clone(),
        revoked,
    )
    .with_cert(cert);
    let heartbeats = Heartbeats::start(
        client,
        reporter,
        Duration::from_secs_f64(HEARTBEAT_INTERVAL_S),
    )?;
    Ok((server, heartbeats))
}

/// Takes a point, waiting out the initial copy (points are refused until it is done).
fn wait_point(agent: &Agent) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match agent.bookmark(false, Some("quickstart")) {
            Ok(id) => return Ok(id),
            Err(ferry_agent::error::Error::NotNow { why, .. })
                if Instant::now() < deadline
                    && (why.contains("initial copy") || why.contains("overflowed")) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => bail!(e),
        }
    }
}
