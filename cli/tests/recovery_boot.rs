//! A real boot through a failover job, with real processes: a control plane (with the
//! store and its key), a process server, a recovery host and one agent. A tiny
//! bootable image (`ferry_testkit::boot`: a boot sector that prints a line on COM1)
//! is written through the agent's NBD export and uploaded; the machine's start action
//! is a `qemu-system-x86_64` command line booting `{nbd_url}` with its serial console
//! in a file. A planned failover to NBD brings the disk up on the recovery host, which
//! runs the start action: the test reads the line from the serial file, and prints the
//! time from the POST to the line. Cancelling the failover kills that qemu (no process
//! with its command line is left) and leaves the recovery host's work dir empty.
//!
//! Skipped, saying why, only where qemu-system-x86_64 is missing and CI is unset.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_testkit::boot::{accel, boot_image, boot_test_runs};
use ferry_testkit::cli::wait_uploaded;
use ferry_testkit::control::{items_left, process_server, recovery_host, Agent, Cp};
use ferry_testkit::net::free_addr;
use ferry_testkit::process::run_ok;
use ferry_testkit::wait_ok;
use rand::SeedableRng;
use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const DISK_BYTES: u64 = 16 << 20;
const LINE: &str = "ferry: booted through a failover";
const DEADLINE: Duration = Duration::from_secs(120);

fn bin() -> &'static Path {
    Path::new(FERRY)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Every live process whose command line holds `needle`: pid and command line.
/// Zombies have an empty command line, so a killed process not yet reaped is gone.
fn processes_with(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline.trim().to_string()));
        }
    }
    found
}

/// What the recovery host's start items printed (qemu's own errors), for a failure.
fn start_output(work_dir: &Path) -> String {
    items_left(work_dir)
        .into_iter()
        .filter_map(|i| {
            std::fs::read_to_string(work_dir.join("items").join(i).join("output.log")).ok()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_failed_over_machine_boots_on_the_recovery_host() {
    if !boot_test_runs("a_failed_over_machine_boots_on_the_recovery_host") {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("store")).unwrap();
    let store_url = format!("file://{}", s(&d.join("store")));
    let key = d.join("vault.key");
    run_ok(bin(), &["keygen", "--out", &s(&key)]);
    let cp = Cp::start_with(
        bin(),
        &d.join("cp"),
        &free_addr().to_string(),
        None,
        &["--store", &store_url, "--key-file", &s(&key)],
    );
    let (_ps, _) = process_server(&cp, d, "ps1", &store_url, None);
    let rh_dir = d.join("rh1");
    let (_rh, _) = recovery_host(&cp, &rh_dir, "rh1", &store_url, &key, None);
    let agent = Agent::enroll(&cp, d, "m1", DISK_BYTES, &mut rng);
    wait_uploaded(bin(), &agent.sock);

    // The disk becomes bootable through the agent, as a guest's writes would make it.
    let image = d.join("boot.img");
    boot_image(&image, LINE, DISK_BYTES, &mut rng);
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw", &s(&image)])
        .arg(agent.nbd())
        .output()
        .expect("qemu-img (Debian package qemu-utils) runs");
    assert!(out.status.success(), "qemu-img convert: {out:?}");
    wait_uploaded(bin(), &agent.sock);

    // The start action: the recovery host runs it once the disk is served. The serial
    // file's path is unique to this test, so it also finds the qemu it started.
    let serial = d.join("serial.log");
    let start = format!(
        "qemu-system-x86_64 -nodefaults -display none -m 64 -no-reboot -accel {} \
         -serial file:{} -drive file={{nbd_url}},format=raw,if=ide",
        accel(),
        s(&serial)
    );
    let (st, v) = cp.api(
        "PATCH",
        "/v1/machines/m1",
        Some(json!({"actions": {"start": start}})),
    );
    assert_eq!(st, 200, "{v}");

    let posted = Instant::now();
    let job = cp.post(
        "/v1/machines/m1/failover",
        json!({"planned": true, "target": {"kind": "nbd"}}),
    );
    let done = cp.wait_job(job["id"].as_str().unwrap(), "succeeded");
    let url = done["disks"][0]["nbd_url"].as_str().unwrap_or("");
    assert!(url.ends_with("/m1/sda"), "{done}");
    let job_done = posted.elapsed();
    let deadline = Instant::now() + DEADLINE;
    let console = loop {
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        if console.contains(LINE) {
            break console;
        }
        assert!(
            Instant::now() < deadline,
            "no {LINE:?} in {} within {DEADLINE:?}; it holds {console:?}; the start \
             action printed: {}",
            serial.display(),
            start_output(&rh_dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let booted = posted.elapsed();
    // Where the time went, per task (whole seconds, as the job records them).
    let tasks: Vec<String> = done["tasks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|t| {
            let took = t["ended_at"].as_i64().unwrap_or(0) - t["started_at"].as_i64().unwrap_or(0);
            format!("{} {took} s", t["name"].as_str().unwrap_or("?"))
        })
        .collect();
    eprintln!(
        "boot through failover: {:.1} s (job succeeded after {:.1} s: {}; {}; console \
         {console:?})",
        booted.as_secs_f64(),
        job_done.as_secs_f64(),
        tasks.join(", "),
        accel()
    );
    let needle = format!("file:{}", s(&serial));
    let qemus: Vec<_> = processes_with(&needle)
        .into_iter()
        .filter(|(_, c)| c.starts_with("qemu-system-x86_64"))
        .collect();
    assert_eq!(qemus.len(), 1, "one qemu runs the machine: {qemus:?}");
    assert_eq!(
        cp.machine("m1")["recovery"]["state"],
        "failed-over",
        "the machine runs at the recovery site"
    );

    // Cancel: the recovery host kills what it started and removes the served disk.
    let cancel = cp.post("/v1/machines/m1/cancel", json!({}));
    cp.wait_job(cancel["id"].as_str().unwrap(), "succeeded");
    let left = processes_with(&needle);
    assert!(
        left.is_empty(),
        "the cancelled machine still runs: {left:?}"
    );
    wait_ok(
        "the recovery host holds nothing",
        Duration::from_secs(30),
        || {
            let left = items_left(&rh_dir);
            if left.is_empty() {
                Ok(())
            } else {
                Err(left)
            }
        },
    );
    assert_eq!(cp.machine("m1")["recovery"], Value::Null);
}
