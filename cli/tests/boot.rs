//! A real boot from the replica, with real processes: a control plane, an enrolled
//! process server and an enrolled agent; a bootable disk image (a boot sector that
//! prints a line on COM1 and halts, random data after the first MiB) is written
//! into the agent's NBD export with qemu-img, a point is taken and uploaded, and the
//! site is then lost (agent and process server killed). `ferry serve-point` serves
//! that point from the store alone, `qemu-img compare` finds it equal to the image
//! byte for byte, and `qemu-system-x86_64` (KVM where /dev/kvm is usable) boots from
//! the export: the test reads the line from the guest's serial console.
//!
//! Skipped, saying why, only where qemu-system-x86_64 is missing and CI is unset.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_testkit::boot::{accel, boot_image, boot_test_runs, Guest};
use ferry_testkit::cli::{bookmark, wait_uploaded};
use ferry_testkit::control::{process_server, Agent, Cp};
use ferry_testkit::net::free_addr;
use ferry_testkit::process::{run_ok, spawn};
use rand::SeedableRng;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const DISK_BYTES: u64 = 64 << 20;
const LINE: &str = "ferry: booted from the replica";

fn bin() -> &'static Path {
    Path::new(FERRY)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `qemu-img ARGS`, which must succeed.
fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian package qemu-utils) runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_protected_machine_boots_from_its_served_point() {
    if !boot_test_runs("a_protected_machine_boots_from_its_served_point") {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cp = Cp::start(bin(), &d.join("cp"), &free_addr().to_string(), None);
    std::fs::create_dir_all(d.join("store")).unwrap();
    let store_url = format!("file://{}", s(&d.join("store")));
    let key = s(&d.join("vault.key"));
    run_ok(bin(), &["keygen", "--out", &key]);
    let mut server = process_server(&cp, d, "ps1", &store_url, None);
    let mut agent = Agent::enroll(&cp, d, "m1", DISK_BYTES, &mut rng);
    wait_uploaded(bin(), &agent.sock);

    // The machine's disk becomes bootable through its agent, as a guest's writes
    // would make it: every byte of the image goes through NBD (-n: the target exists).
    let image = d.join("boot.img");
    boot_image(&image, LINE, DISK_BYTES, &mut rng);
    qemu_img(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        &s(&image),
        &agent.nbd(),
    ]);
    let point = bookmark(bin(), &agent.sock, "bootable");
    wait_uploaded(bin(), &agent.sock);
    // The protected site is gone: what follows uses the store alone.
    agent.child.kill();
    server.0.kill();

    let overlay = d.join("overlay");
    let started = Instant::now();
    let (mut serving, line) = spawn(
        bin(),
        &[
            "serve-point",
            "--store",
            &store_url,
            "--key-file",
            &key,
            "--machine",
            "m1",
            "--point",
            &point,
            "--nbd-listen",
            "127.0.0.1:0",
            "--overlay-dir",
            &s(&overlay),
        ],
    );
    let url = line.trim().to_string();
    let served_after = started.elapsed();
    assert!(
        url.starts_with("nbd://") && url.ends_with("/sda"),
        "serve-point printed {line:?}"
    );
    let booted = Guest::boot(&url).wait_line(LINE, Duration::from_secs(120));
    let total = started.elapsed();
    eprintln!(
        "boot from the replica ({}): serve-point printed its URL after {served_after:?}, \
         the guest's line {booted:?} after qemu started; {total:?} from serve-point start",
        accel()
    );
    // Every byte of the served point is the image, not only the boot sector.
    qemu_img(&["compare", "-f", "raw", "-F", "raw", &s(&image), &url]);
    serving.kill();
}
