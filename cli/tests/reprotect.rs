//! Reprotect with real processes (docs/failback.md): a control plane, a process
//! server, a recovery host and an agent written through NBD with qemu-io. The machine
//! fails over (unplanned, its agent gone) and is committed; its home disk, the
//! source's disk at the failover point, then gets a few writes that never reached the
//! replica. A reprotect naming a master target that cannot reach the store is
//! refused; one onto a home disk smaller than the replica fails with the host's error; one onto the home disk with the recovery host as master target
//! rewrites exactly the blocks that differ, and the home disk equals the failover
//! point again; the machine's direction is reverse.

use std::path::Path;
use std::time::Duration;

use ferry_testkit::cli::wait_uploaded;
use ferry_testkit::control::{process_server, recovery_host, Agent, Cp};
use ferry_testkit::net::free_addr;
use ferry_testkit::process::run_ok;
use ferry_testkit::wait_ok;
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const DISK_BYTES: u64 = 8 << 20;
/// Home disk writes after the failover point, one per MiB: each in a block of its
/// own whatever the replica's block size.
const CHANGED: u64 = 5;

fn bin() -> &'static Path {
    Path::new(FERRY)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn post(cp: &Cp, path: &str, body: Value) -> Value {
    let (st, v) = cp.api("POST", path, Some(body));
    assert_eq!(st, 202, "POST {path}: {v}");
    v
}

/// Waits until job `id` ended; the job.
fn ended(cp: &Cp, id: &str) -> Value {
    wait_ok(&format!("job {id} ended"), Duration::from_secs(60), || {
        let (st, j) = cp.api("GET", &format!("/v1/jobs/{id}"), None);
        assert_eq!(st, 200, "{j}");
        match j["state"].as_str() {
            Some("succeeded" | "failed" | "cancelled") => Ok(j),
            _ => Err(j),
        }
    })
}

fn succeeded(cp: &Cp, job: &Value) -> Value {
    let j = ended(cp, job["id"].as_str().unwrap());
    assert_eq!(j["state"], "succeeded", "{j}");
    j
}

#[test]
fn reprotect_rewrites_only_the_home_blocks_that_differ_from_the_failover_point() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("store")).unwrap();
    let store_url = format!("file://{}", s(&d.join("store")));
    let key = d.join("vault.key");
    run_ok(bin(), &["keygen", "--out", &s(&key)]);
    let cp_args = ["--store", &store_url, "--key-file", &s(&key)];
    let cp = Cp::start_with(
        bin(),
        &d.join("cp"),
        &free_addr().to_string(),
        None,
        &cp_args,
    );
    let (_ps, _) = process_server(&cp, d, "ps1", &store_url, None);
    let (_rh, _) = recovery_host(&cp, &d.join("rh1"), "rh1", &store_url, &key, None);
    // A machine may not take a reverse replica's name: a failback's commit deletes
    // `M.reverse` whole.
    let (st, v) = cp.api(
        "POST",
        "/v1/enroll",
        Some(json!({"token": cp.enroll_token("agent"), "kind": "agent",
            "name": "m1.reverse", "csr_pem": "not read"})),
    );
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("reverse replicas"), "{v}");
    let mut m1 = Agent::enroll(&cp, d, "m1", DISK_BYTES, &mut rng);
    wait_uploaded(bin(), &m1.sock);
    m1.write_and_point(bin(), &mut rng, "before-failover");
    wait_uploaded(bin(), &m1.sock);
    let (point, at_point) = m1.expected[0].clone();
    let m = cp.machine("m1");
    assert_eq!(
        (m["active_site"].as_str(), m["direction"].as_str()),
        (Some("home"), Some("forward"))
    );

    // The home site is lost: unplanned failover to the point, then commit.
    m1.child.kill();
    succeeded(
        &cp,
        &post(
            &cp,
            "/v1/machines/m1/failover",
            json!({"planned": false, "point": point, "target": {"kind": "dir"}}),
        ),
    );
    succeeded(&cp, &post(&cp, "/v1/machines/m1/commit", json!({})));

    // The home disk: the source's disk, with writes after the point that never
    // reached the replica.
    let reference = d.join("reference.img");
    std::fs::write(&reference, &at_point).unwrap();
    let home = d.join("home-sda.img");
    let mut disk = at_point.clone();
    for i in 0..CHANGED {
        let at = (i << 20) as usize + 4096;
        rng.fill_bytes(&mut disk[at..at + 4096]);
    }
    std::fs::write(&home, &disk).unwrap();

    // A master target that cannot reach the store (its store's folder became a
    // file): it says so in its heartbeat, the list shows it, a reprotect naming it
    // is refused saying why.
    let blind_store = d.join("blind-store");
    let (_blind, _) = recovery_host(
        &cp,
        &d.join("rh-blind"),
        "rh-blind",
        &format!("file://{}", s(&blind_store)),
        &key,
        None,
    );
    std::fs::remove_dir_all(&blind_store).unwrap();
    std::fs::write(&blind_store, b"not a folder").unwrap();
    wait_ok(
        "rh-blind says it cannot reach the store",
        Duration::from_secs(30),
        || {
            let out = cp.cli(&["recovery-hosts", "list"]);
            match out.lines().find(|l| l.starts_with("rh-blind")) {
                Some(l) if l.contains("unreachable: ") => Ok(()),
                _ => Err(out),
            }
        },
    );
    let (st, v) = cp.api(
        "POST",
        "/v1/machines/m1/reprotect",
        Some(json!({"master_target": "rh-blind", "disks": {"sda": s(&d.join("any.img"))}})),
    );
    assert_eq!(st, 409, "{v}");
    assert!(
        v.to_string()
            .contains("recovery host rh-blind cannot reach the store"),
        "{v}"
    );

    // A home disk smaller than the replica: the master target refuses it, the job
    // fails with its error, and nothing is written to it.
    let small = d.join("small.img");
    std::fs::write(&small, vec![9u8; (DISK_BYTES / 2) as usize]).unwrap();
    let j = ended(
        &cp,
        post(
            &cp,
            "/v1/machines/m1/reprotect",
            json!({"master_target": "rh1", "disks": {"sda": s(&small)}}),
        )["id"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(j["state"], "failed", "{j}");
    let e = j["error"].as_str().unwrap();
    assert!(e.contains("smaller than disk sda of m1"), "{e}");
    assert_eq!(
        std::fs::read(&small).unwrap(),
        vec![9u8; (DISK_BYTES / 2) as usize]
    );
    assert_eq!(cp.machine("m1")["direction"], "forward");

    // Through the CLI, waited for: it prints what the disk took.
    let out = cp.cli(&[
        "machines",
        "reprotect",
        "m1",
        "--master-target",
        "rh1",
        "--disk",
        &format!("sda={}", s(&home)),
        "--wait",
    ]);
    assert!(out.contains("m1 sda synced: "), "{out}");
    // `job ID (reprotect): succeeded`
    let id = out
        .lines()
        .find(|l| l.ends_with("(reprotect): succeeded"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no reprotect job succeeded: {out}"));
    let (_, job) = cp.api("GET", &format!("/v1/jobs/{id}"), None);
    let synced = &job["params"]["synced"][0];
    let store = ferry_replica::Store::open(&store_url).unwrap();
    let vault = ferry_replica::VaultKey::load(&key).unwrap();
    let bs = store
        .block(ferry_replica::Disk::open(&store, "m1", "sda", Some(&vault)))
        .unwrap()
        .info
        .block_bytes;
    assert_eq!(synced["disk"], "sda");
    assert_eq!(synced["blocks"], DISK_BYTES / bs, "{synced}");
    assert_eq!(synced["blocks_differing"], CHANGED, "{synced}");
    assert_eq!(synced["bytes_written"], CHANGED * bs, "{synced}");
    assert_eq!(synced["identical"], true, "{synced}");
    // Across the sites: the home map put; P's map and the differing blocks fetched.
    let data = CHANGED * bs;
    let (put, fetched) = (
        synced["bytes_stored"].as_u64().unwrap(),
        synced["bytes_fetched"].as_u64().unwrap(),
    );
    assert!(put > 0 && put < DISK_BYTES / bs * 16 + 4096, "{synced}");
    assert!(fetched < data + 2 * put + (256 << 10), "{synced}");
    // The sync's exchange objects are gone once the home disk read back equal.
    let exchange = d.join("store/machines/m1.reverse/disks/sda/sync");
    let left: Vec<_> = std::fs::read_dir(&exchange)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", exchange.display());
    // The home disk is the failover point again, byte for byte.
    assert!(
        std::fs::read(&home).unwrap() == at_point,
        "the home disk differs from the point"
    );
    let cmp = std::process::Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &s(&home),
            &s(&reference),
        ])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    let m = cp.machine("m1");
    assert_eq!(
        (m["active_site"].as_str(), m["direction"].as_str()),
        (Some("recovery"), Some("reverse"))
    );
    assert_eq!(m["recovery"]["master_target"], "rh1");
    assert_eq!(m["recovery"]["home_disks"]["sda"], s(&home));
    let shown = cp.cli(&["machines", "show", "m1"]);
    assert!(
        shown.contains("committed (recovery site), reverse"),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("home disks sda={}", s(&home))),
        "{shown}"
    );
    // Another reprotect is refused; the home disk stays.
    let (st, v) = cp.api(
        "POST",
        "/v1/machines/m1/reprotect",
        Some(json!({"master_target": "rh1", "disks": {"sda": s(&home)}})),
    );
    assert_eq!(st, 409, "{v}");
    assert!(home.exists());
}
