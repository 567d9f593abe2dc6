//! `ferry quickstart`: the whole path on loopback with nothing else installed. It
//! generates certificates and a vault key, starts a process server (local directory
//! store) and an agent, writes to a sample disk through the agent's NBD export, takes
//! recovery points, fails over to each one and checks that the rebuilt disk matches
//! the sample disk as it was when the point was taken.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_agent::live::{Agent, DiskSpec, Options};
use ferry_agent::nbd::client::Client;
use ferry_controlplane::recovery::failover;
use ferry_controlplane::recovery::points::PointSpec;
use ferry_dataplane::server::{start, Options as ServerOptions};
use ferry_link::client::Target;
use ferry_link::tls::certs::{client_config, generate_loopback, server_config, server_name};
use ferry_replica::export::Format;
use ferry_replica::{Store, VaultKey};

use crate::progress::bar;

const DISK_BYTES: u64 = 256 << 20;
const ROUNDS: usize = 3;
const ROUND_BYTES: u64 = 48 << 20;

/// Deterministic, partly compressible data: text-like runs and noise.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = if i % 4 == 0 {
            x
        } else {
            0x2020_6f6c_6c65_6820 ^ (i as u64 & 0xff)
        };
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (v >> (8 * j)) as u8;
        }
    }
}

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

    generate_loopback(&p("pki"), 1)?;
    VaultKey::generate().save_new(&p("vault.key"))?;
    std::fs::create_dir_all(p("store"))?;
    let store_url = format!("file://{}", p("store").display());
    println!(
        "  certificates (CA, server, agent-0) in {}",
        p("pki").display()
    );

    let mut so = ServerOptions::new("127.0.0.1:0".parse()?, p("cache"));
    so.cache_bytes = 1 << 30;
    so.batch_delay = Duration::from_millis(50);
    let server = start(
        so,
        server_config(&p("pki/server.pem"), &p("pki/server.key"), &p("pki/ca.pem"))?,
        Store::open(&store_url)?,
        VaultKey::load(&p("vault.key"))?,
    )?;
    println!(
        "  process server on {} (mutual TLS), store {store_url}",
        server.addr
    );

    let disk = p("sample-disk.img");
    std::fs::File::create(&disk)?.set_len(DISK_BYTES)?;
    let agent = Agent::start(Options {
        machine: "agent-0".into(),
        disks: vec![DiskSpec {
            name: "sda".into(),
            path: disk.clone(),
        }],
        target: Target {
            addr: server.addr,
            server_name: server_name("127.0.0.1")?,
            tls: Arc::new(client_config(
                &p("pki/agent-0.pem"),
                &p("pki/agent-0.key"),
                &p("pki/ca.pem"),
            )?),
            timeout: Duration::from_secs(10),
        },
        nbd_listen: "127.0.0.1:0".parse()?,
        journal_dir: p("journal"),
        journal_bytes: 256 << 20,
        crash_point_interval: Some(Duration::from_secs(5)),
        freeze_hook: None,
        admin_socket: None,
        initial_copy: true,
        group: None,
        group_listen: None,
        group_coordinator: None,
        group_peers: Vec::new(),
        group_tls: None,
    })?;
    println!(
        "  agent for machine agent-0 exporting disk sda over NBD on {}",
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
        let plan = failover::plan(&store, &vault, "agent-0", &spec)?;
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
    agent.stop();
    server.stop();
    println!(
        "quickstart: OK, {} points rebuilt byte-identical",
        points.len()
    );
    Ok(())
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

fn same(a: &Path, b: &Path) -> Result<()> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    loop {
        let na = fa.read(&mut ba)?;
        fb.read_exact(&mut bb[..na])
            .with_context(|| format!("{} is shorter", b.display()))?;
        if ba[..na] != bb[..na] {
            bail!(
                "{} differs from {} within bytes {at}..{}",
                a.display(),
                b.display(),
                at + na as u64
            );
        }
        if na == 0 {
            return Ok(());
        }
        at += na as u64;
    }
}
