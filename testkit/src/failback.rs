//! The whole failback cycle with real processes (docs/failback.md), shared by the
//! end-to-end test (a small disk, kills in the middle of each step) and `ferry-bench
//! failback` (a 1 GiB disk, the bytes of each step): a control plane; a process server
//! at each site; a recovery host at each site (the recovery site's serves the
//! failed-over machine, the home site's is the master target); one agent at home
//! written through NBD with qemu-io.
//!
//! protect -> write -> unplanned failover (home process server and agent killed; the
//! home disk holds writes acknowledged after the failover point, never replicated) ->
//! writes at the recovery site through its NBD export -> reprotect onto the original
//! home disk -> more writes there, carried home -> a few more, not waited for ->
//! failback (planned) -> commit -> re-enable ->
//! writes at home -> a second failover. At every step each disk is compared with a
//! reference copy taken at the same moment.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};

use crate::cli::{bookmark, wait_uploaded};
use crate::control::{process_server, recovery_host, Agent, Cp};
use crate::net::free_addr;
use crate::process::{run_ok, Killed};
use crate::qemu::qemu_io;
use crate::wait_ok;

/// What a run is asked to do.
pub struct Options<'a> {
    pub bin: &'a Path,
    pub dir: &'a Path,
    pub disk_bytes: u64,
    /// Shares of the disk's 64 KiB blocks written at the recovery site (after
    /// failover) and at home after the failover point (never replicated).
    pub recovery_share: f64,
    pub home_share: f64,
    /// Kill -9 the control plane, the master target and the recovery-site host in
    /// the middle of the steps (the test); the benchmark leaves them alone.
    pub kills: bool,
    /// A new, empty home disk instead of the original one (alternate location).
    pub new_home_disk: bool,
    /// Share of the disk's blocks written before the failover point (random bytes).
    pub base_share: f64,
    /// The failover builds raw files on the recovery-site host (target `dir`), which
    /// the machine there writes, instead of serving the point over NBD.
    pub built_files: bool,
}

/// One step's figures.
#[derive(Debug, Clone, Default)]
pub struct Step {
    pub name: &'static str,
    pub seconds: f64,
    /// Bytes that crossed between the sites: what the home side fetched from the
    /// store at the recovery site or put there, or what the home agent sent there.
    pub wire_bytes: u64,
    /// Bytes written to the home disk (reprotect, failback).
    pub written_bytes: u64,
}

/// A run's figures.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub steps: Vec<Step>,
    /// Bytes changed: written at the recovery site plus written at home after the
    /// failover point (each counted once per 64 KiB block).
    pub changed_bytes: u64,
    pub recovery_changed_bytes: u64,
    pub home_changed_bytes: u64,
    /// Of reprotect's bytes, what its sync of the home disk to the failover point
    /// moved between the sites: the home disk's checksum map put, the point's map and
    /// blocks that differ fetched, and metadata.
    pub sync_bytes: u64,
    /// Every disk equalled its reference at every step.
    pub identical: bool,
}

pub const BLOCK: u64 = 64 << 10;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `share` of the disk's 64 KiB blocks, distinct and chosen at random, written whole
/// with random (incompressible) bytes through the NBD export at `url` (or into the raw
/// file at that path), then flushed; returns the bytes written. Random, so that the
/// bytes each step sends are what a real disk's changes would cost, not what a
/// compressor makes of a pattern; a qemu-io write through the same export (or file)
/// comes first (a real client's writes).
pub fn write_blocks(url: &str, disk_bytes: u64, share: f64, rng: &mut StdRng) -> u64 {
    let blocks = disk_bytes / BLOCK;
    let want = ((blocks as f64 * share).ceil() as u64).clamp(1, blocks);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < want {
        chosen.insert(rng.gen_range(0..blocks));
    }
    let first = *chosen.iter().next().expect("one block at least");
    let out = qemu_io(url, &[format!("write -P 90 {} {BLOCK}", first * BLOCK)]);
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
    let mut data = vec![0u8; BLOCK as usize];
    if !url.starts_with("nbd://") {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(url)
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
        for b in &chosen {
            rng.fill(&mut data[..]);
            f.write_all_at(&data, b * BLOCK)
                .unwrap_or_else(|e| panic!("writing block {b} of {url}: {e}"));
        }
        f.sync_all()
            .unwrap_or_else(|e| panic!("syncing {url}: {e}"));
        return want * BLOCK;
    }
    let (addr, name) = export_of(url);
    let mut c = ferry_agent::nbd::client::Client::connect(addr, name)
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    for b in &chosen {
        rng.fill(&mut data[..]);
        c.write(b * BLOCK, &data)
            .unwrap_or_else(|e| panic!("writing block {b} through {url}: {e}"));
    }
    c.flush().unwrap_or_else(|e| panic!("flushing {url}: {e}"));
    let _ = c.disconnect();
    want * BLOCK
}

/// The address and export name of `nbd://ADDR/NAME`.
fn export_of(url: &str) -> (std::net::SocketAddr, &str) {
    let rest = url.strip_prefix("nbd://").expect("an nbd:// URL");
    let (addr, name) = rest.split_once('/').expect("nbd://ADDR/NAME");
    (addr.parse().expect("ADDR is HOST:PORT"), name)
}

/// Bytes of the objects of machine `machine` in the `file://` store at `store_dir`
/// (the reverse replica's rounds: what the master target fetches of them).
fn stored_bytes(store_dir: &Path, machine: &str) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.filter_map(|e| e.ok())
            .map(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk(&p)
                } else {
                    e.metadata().map_or(0, |m| m.len())
                }
            })
            .sum()
    }
    walk(&store_dir.join("machines").join(machine))
}

struct Run<'a> {
    o: &'a Options<'a>,
    cp: Cp,
    cp_listen: String,
    cp_args: Vec<String>,
    store_url: String,
    key: PathBuf,
    ps_home: Option<Killed>,
    _ps_rec: Killed,
    rh_rec: Killed,
    rh_rec_nbd: String,
    rh_home: Killed,
    rh_home_nbd: String,
}

impl Run<'_> {
    fn restart_cp(&mut self) {
        self.cp.child.kill();
        let args: Vec<&str> = self.cp_args.iter().map(String::as_str).collect();
        self.cp = Cp::start_with(
            self.o.bin,
            &self.o.dir.join("cp"),
            &self.cp_listen,
            None,
            &args,
        );
    }

    fn restart_rh_home(&mut self) {
        self.rh_home.kill();
        let dir = self.o.dir.join("rh-home");
        self.rh_home = recovery_host(
            &self.cp,
            &dir,
            "rh-home",
            &self.store_url,
            &self.key,
            Some(&self.rh_home_nbd),
        )
        .0;
    }

    fn restart_rh_rec(&mut self) {
        self.rh_rec.kill();
        let dir = self.o.dir.join("rh-rec");
        self.rh_rec = recovery_host(
            &self.cp,
            &dir,
            "rh-rec",
            &self.store_url,
            &self.key,
            Some(&self.rh_rec_nbd),
        )
        .0;
    }

    /// Waits until job `id` runs, then kills and restarts what `kill` names.
    fn kill_while_running(&mut self, id: &str, kill: &str) {
        if !self.o.kills {
            return;
        }
        self.wait_running(id);
        match kill {
            "control plane" => self.restart_cp(),
            "master target" => self.restart_rh_home(),
            "recovery host" => self.restart_rh_rec(),
            other => panic!("nothing called {other} to kill"),
        }
    }

    /// Waits until job `id` runs (a kill then lands in the middle of it).
    fn wait_running(&self, id: &str) {
        wait_ok(
            &format!("job {id} running"),
            Duration::from_secs(60),
            || {
                let j = self.cp.job(id);
                match j["state"].as_str() {
                    Some("running") => Ok(()),
                    _ => Err(j),
                }
            },
        );
    }
}

/// Runs the cycle; panics (naming the step) where anything differs.
pub fn cycle(o: &Options<'_>, rng: &mut StdRng) -> Figures {
    let d = o.dir;
    std::fs::create_dir_all(d.join("store")).unwrap();
    let store_url = format!("file://{}", s(&d.join("store")));
    let key = d.join("vault.key");
    run_ok(o.bin, &["keygen", "--out", &s(&key)]);
    let cp_listen = free_addr().to_string();
    let cp_args: Vec<String> = [
        "--store",
        &store_url,
        "--key-file",
        &s(&key),
        "--job-lease-s",
        "3",
        "--job-step-delay-ms",
        if o.kills { "300" } else { "0" },
    ]
    .map(str::to_string)
    .to_vec();
    let args: Vec<&str> = cp_args.iter().map(String::as_str).collect();
    let cp = Cp::start_with(o.bin, &d.join("cp"), &cp_listen, None, &args);
    let (st, p) = cp.api(
        "PATCH",
        "/v1/policies/default",
        Some(json!({ "crash_point_interval_s": 1.0 })),
    );
    assert_eq!(st, 200, "{p}");
    let (ps_home, _) = process_server(&cp, d, "ps-home", &store_url, None);
    let rh_rec_nbd = free_addr().to_string();
    let rh_home_nbd = free_addr().to_string();
    let (rh_rec, _) = recovery_host(
        &cp,
        &d.join("rh-rec"),
        "rh-rec",
        &store_url,
        &key,
        Some(&rh_rec_nbd),
    );
    let (rh_home, _) = recovery_host(
        &cp,
        &d.join("rh-home"),
        "rh-home",
        &store_url,
        &key,
        Some(&rh_home_nbd),
    );
    let mut m1 = Agent::enroll(&cp, d, "m1", o.disk_bytes, rng);
    wait_uploaded(o.bin, &m1.sock);
    // The second process server comes after the agent chose the first.
    let (ps_rec, _) = process_server(&cp, d, "ps-rec", &store_url, None);
    let mut run = Run {
        o,
        cp,
        cp_listen,
        cp_args,
        store_url,
        key,
        ps_home: Some(ps_home),
        _ps_rec: ps_rec,
        rh_rec,
        rh_rec_nbd,
        rh_home,
        rh_home_nbd,
    };
    let mut figures = Figures {
        identical: true,
        ..Figures::default()
    };

    // Protect and write; the failover point.
    write_blocks(&m1.nbd(), o.disk_bytes, o.base_share, rng);
    let point = bookmark(o.bin, &m1.sock, "before-failover");
    wait_uploaded(o.bin, &m1.sock);
    let at_point = std::fs::read(&m1.disk).unwrap();

    // The home site is lost: its process server first, so the agent acknowledges
    // writes it can no longer send; then the agent.
    if let Some(mut p) = run.ps_home.take() {
        p.kill();
    }
    figures.home_changed_bytes = write_blocks(&m1.nbd(), o.disk_bytes, o.home_share, rng);
    m1.child.kill();
    // The home disk is the agent's own; a new, empty one replaces it in place (the
    // machine comes home to another disk).
    let home_disk = m1.disk.clone();
    if o.new_home_disk {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&home_disk)
            .unwrap();
        f.set_len(0).unwrap();
        f.set_len(o.disk_bytes).unwrap();
    }

    // Unplanned failover to the point, served over NBD by the recovery-site host (or
    // built there as a raw file, which the machine then writes).
    let t = Instant::now();
    let target = if o.built_files {
        json!({"kind": "dir", "format": "raw"})
    } else {
        json!({"kind": "nbd"})
    };
    let j = run.cp.post(
        "/v1/machines/m1/failover",
        json!({"planned": false, "point": point, "target": target, "host": "rh-rec"}),
    );
    let j = run.cp.wait_job(j["id"].as_str().unwrap(), "succeeded");
    let url = j["disks"][0][if o.built_files { "path" } else { "nbd_url" }]
        .as_str()
        .unwrap()
        .to_string();
    let j = run.cp.post("/v1/machines/m1/commit", json!({}));
    run.cp.wait_job(j["id"].as_str().unwrap(), "succeeded");
    figures.steps.push(Step {
        name: "failover",
        seconds: t.elapsed().as_secs_f64(),
        ..Step::default()
    });
    same(
        &mut figures,
        "the failed-over disk at the point",
        &read_export(&url),
        &at_point,
    );

    // The machine runs at the recovery site.
    figures.recovery_changed_bytes = write_blocks(&url, o.disk_bytes, o.recovery_share, rng);

    // Reprotect onto the home disk, the master target at home.
    let t = Instant::now();
    let j = run.cp.post(
        "/v1/machines/m1/reprotect",
        json!({"master_target": "rh-home", "disks": {"sda": s(&home_disk)}}),
    );
    let id = j["id"].as_str().unwrap().to_string();
    run.kill_while_running(&id, "master target");
    run.kill_while_running(&id, "recovery host");
    run.kill_while_running(&id, "control plane");
    let j = run.cp.wait_job(&id, "succeeded");
    let (synced, written) = job_bytes(&j);
    let seconds = t.elapsed().as_secs_f64();
    converged(&run.cp, "reprotect", &url, &home_disk);

    // More writes at the recovery site; the reverse direction carries them home.
    let more = write_blocks(&url, o.disk_bytes, o.recovery_share / 4.0, rng);
    figures.recovery_changed_bytes += more;
    converged(&run.cp, "reverse replication", &url, &home_disk);
    // Reprotect's bytes: what the sync fetched, and the reverse rounds so far (the
    // master target fetches each once, its applied marker says how far it got).
    let store_dir = d.join("store");
    let rounds = stored_bytes(&store_dir, "m1.reverse");
    figures.sync_bytes = synced;
    figures.steps.push(Step {
        name: "reprotect",
        seconds,
        wire_bytes: synced + rounds,
        written_bytes: written,
    });

    // Failback, planned: the recovery site stops writing, a last round, verified home.
    // Writes just before it, not waited for: the last round carries what the running
    // rounds did not (and they may have taken some).
    let late = write_blocks(&url, o.disk_bytes, o.recovery_share / 8.0, rng);
    figures.recovery_changed_bytes += late;
    let t = Instant::now();
    let before = read_export(&url);
    let j = run.cp.post(
        "/v1/machines/m1/failover",
        json!({"direction": "home", "planned": true}),
    );
    let id = j["id"].as_str().unwrap().to_string();
    run.kill_while_running(&id, "recovery host");
    run.kill_while_running(&id, "master target");
    run.kill_while_running(&id, "control plane");
    let j = run.cp.wait_job(&id, "waiting-for-input");
    // Failback's bytes: the last round and its checksum map put in the store, and
    // what the final apply fetched of the reverse replica.
    let (fetched, written) = job_bytes(&j);
    let last_round = stored_bytes(&store_dir, "m1.reverse").saturating_sub(rounds);
    figures.steps.push(Step {
        name: "failback",
        seconds: t.elapsed().as_secs_f64(),
        wire_bytes: fetched + last_round,
        written_bytes: written,
    });
    same(
        &mut figures,
        "home after failback",
        &std::fs::read(&home_disk).unwrap()[..o.disk_bytes as usize],
        &before,
    );
    let j = run.cp.post("/v1/machines/m1/commit", json!({}));
    let j = run.cp.wait_job(j["id"].as_str().unwrap(), "succeeded");
    assert_eq!(run.cp.machine("m1")["active_site"], "home", "{j}");
    let left = crate::control::items_left(&d.join("rh-rec"));
    assert!(left.is_empty(), "the recovery site still holds {left:?}");

    // Re-enable: the home agent (on the home disk) resumes forward replication.
    let t = Instant::now();
    let (ps_home, _) = process_server(&run.cp, d, "ps-home", &run.store_url, None);
    run.ps_home = Some(ps_home);
    m1.restart(&run.cp, d);
    let j = run.cp.post("/v1/machines/m1/re-enable", json!({}));
    let id = j["id"].as_str().unwrap().to_string();
    run.kill_while_running(&id, "control plane");
    if o.kills {
        // The home agent, in the middle of its re-enable's resync (owed on disk).
        run.wait_running(&id);
        m1.restart(&run.cp, d);
    }
    let j = run.cp.wait_job(&id, "succeeded");
    wait_uploaded(o.bin, &m1.sock);
    let sent = resync_sent(&j, o.bin, &m1.sock);
    figures.steps.push(Step {
        name: "re-enable",
        seconds: t.elapsed().as_secs_f64(),
        wire_bytes: sent,
        written_bytes: 0,
    });

    // Writes at home, a point, and a second failover (planned, to built files).
    write_blocks(&m1.nbd(), o.disk_bytes, 0.01, rng);
    wait_uploaded(o.bin, &m1.sock);
    let j = run.cp.post(
        "/v1/machines/m1/failover",
        json!({"planned": true, "target": {"kind": "dir", "format": "raw"}, "host": "rh-rec"}),
    );
    let j = run.cp.wait_job(j["id"].as_str().unwrap(), "succeeded");
    let built = j["disks"][0]["path"].as_str().unwrap().to_string();
    same(
        &mut figures,
        "the second failover's disk",
        &std::fs::read(&built).unwrap(),
        &std::fs::read(&m1.disk).unwrap(),
    );
    figures.changed_bytes = figures.recovery_changed_bytes + figures.home_changed_bytes;
    figures
}

/// Records whether `got` equals `want`, and panics naming `what` if not.
fn same(f: &mut Figures, what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        f.identical = false;
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: differs from its reference (sizes {} and {}, first difference at {first:?})",
            got.len(),
            want.len()
        );
    }
}

/// Waits until the home disk equals what the recovery site serves.
fn converged(cp: &Cp, what: &str, url: &str, home: &Path) {
    let want = read_export(url);
    wait_ok(
        &format!("{what}: the home disk equals the recovery site's"),
        Duration::from_secs(120),
        || {
            let got = std::fs::read(home).unwrap();
            if got[..want.len()] == want[..] {
                Ok(())
            } else {
                Err(cp.machine("m1")["recovery"].clone())
            }
        },
    );
}

/// (bytes fetched by the home side, bytes written to the home disks) of a job.
fn job_bytes(j: &Value) -> (u64, u64) {
    let mut fetched = 0;
    let mut written = 0;
    for key in ["synced", "applied"] {
        if let Some(list) = j["params"][key].as_array() {
            for d in list {
                // Both ways across the sites: fetched, and put (a home checksum map).
                fetched += d["bytes_fetched"].as_u64().unwrap_or(0);
                fetched += d["bytes_stored"].as_u64().unwrap_or(0);
                written += d["bytes_written"].as_u64().unwrap_or(0);
            }
        }
    }
    (fetched, written)
}

/// What the re-enable's resync sent: from its job, else the agent's status.
fn resync_sent(j: &Value, bin: &Path, sock: &Path) -> u64 {
    if let Some(n) = j["params"]["resync_sent_bytes"].as_u64() {
        return n;
    }
    let st = crate::cli::status(bin, sock);
    st["last_resync"]["sent_bytes"]
        .as_u64()
        .or_else(|| st["resync"]["sent_bytes"].as_u64())
        .unwrap_or(0)
}

/// Every byte of the export at `url` (`nbd://ADDR/NAME`), read in 4 MiB requests; or
/// of the raw file at that path.
pub fn read_export(url: &str) -> Vec<u8> {
    if !url.starts_with("nbd://") {
        return std::fs::read(url).unwrap_or_else(|e| panic!("reading {url}: {e}"));
    }
    let (addr, name) = export_of(url);
    let mut c = ferry_agent::nbd::client::Client::connect(addr, name)
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    let mut out = vec![0u8; c.size as usize];
    for (i, chunk) in out.chunks_mut(4 << 20).enumerate() {
        c.read(i as u64 * (4 << 20), chunk)
            .unwrap_or_else(|e| panic!("reading {url}: {e}"));
    }
    let _ = c.disconnect();
    out
}
