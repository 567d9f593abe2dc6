//! Real block devices: a loop device protected by `ferry agent` (its metadata says 0
//! bytes; its size is found by seeking to its end), written through the agent's NBD
//! export with qemu-io, with a failover at each recovery point equal to the device as
//! it was when the point was taken; and a loop device seeded offline, then resynced.
//! Needs root and /dev/loop-control (`.ci/run` runs as root); elsewhere each test says
//! why it skips.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_testkit::cli;
use ferry_testkit::process::{run_ok, Killed};
use ferry_testkit::qemu::random_writes;

use rand::{Rng, SeedableRng};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const SIZE: u64 = 16 << 20;

/// A loop device over a file, detached when dropped, whatever the test did.
struct LoopDevice {
    dev: PathBuf,
}

impl LoopDevice {
    /// Attaches `file`; None (with the reason printed) where no loop device can be made.
    fn attach(file: &Path) -> Option<LoopDevice> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loop devices need root");
            return None;
        }
        if !Path::new("/dev/loop-control").exists() {
            eprintln!("skipped: no /dev/loop-control on this host");
            return None;
        }
        let out = match Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipped: cannot run losetup (util-linux): {e}");
                return None;
            }
        };
        if !out.status.success() {
            eprintln!(
                "skipped: losetup could not make a loop device: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDevice { dev })
    }

    fn path(&self) -> String {
        self.dev.display().to_string()
    }

    fn read(&self) -> Vec<u8> {
        std::fs::read(&self.dev).unwrap()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn ferry(args: &[&str]) -> String {
    run_ok(Path::new(FERRY), args)
}

fn spawn(args: &[String]) -> (Killed, String) {
    ferry_testkit::process::spawn(Path::new(FERRY), args)
}

fn status(sock: &Path) -> serde_json::Value {
    cli::status(Path::new(FERRY), sock)
}

fn wait_uploaded(sock: &Path) {
    cli::wait_uploaded(Path::new(FERRY), sock)
}

/// `n` random pattern or zero writes of 4 KiB to 128 KiB through qemu-io.
fn qemu_io(url: &str, rng: &mut impl Rng, n: usize) {
    ferry_testkit::qemu::qemu_io(url, &random_writes(rng, SIZE, n, 1..=32));
}

fn seed_rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed())
}

/// A backing file of `SIZE` bytes, its first quarter random.
fn backing(path: &Path, rng: &mut impl Rng) {
    let mut content = vec![0u8; SIZE as usize];
    rng.fill(&mut content[..(SIZE / 4) as usize]);
    std::fs::write(path, &content).unwrap();
}

/// Fails `machine` over to `point` into `out`; returns the rebuilt disk `disk`.
fn failover(store: &str, key: &str, machine: &str, point: &str, out: &Path, disk: &str) -> Vec<u8> {
    ferry(&[
        "failover",
        "--store",
        store,
        "--key-file",
        key,
        "--machine",
        machine,
        "--point",
        point,
        "--out",
        &out.display().to_string(),
    ]);
    std::fs::read(out.join(format!("{disk}.raw"))).unwrap()
}

fn same(got: &[u8], want: &[u8], what: &str) {
    let first = got.iter().zip(want.iter()).position(|(a, b)| a != b);
    assert!(
        got == want,
        "{what}: {} bytes rebuilt, {} wanted, first difference at {first:?}",
        got.len(),
        want.len()
    );
}

#[test]
fn a_loop_device_under_the_agent_fails_over_to_each_point() {
    let mut rng = seed_rng();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |s: &str| d.join(s).display().to_string();
    backing(&d.join("backing.img"), &mut rng);
    // Declared before the processes: dropped (detached) after they are killed.
    let Some(dev) = LoopDevice::attach(&d.join("backing.img")) else {
        return;
    };
    assert_eq!(
        std::fs::metadata(&dev.dev).unwrap().len(),
        0,
        "a block device's metadata says 0 bytes: the case this test is for"
    );
    let store = cli::site(Path::new(FERRY), d, 1);
    let server_args = cli::server_args(d, "127.0.0.1:0", "0.25");
    let (_server, line) = spawn(&server_args);
    let addr = cli::server_addr(&line);

    let sock = d.join("admin.sock");
    let mut agent_args = cli::agent_args(
        d,
        &addr,
        "agent-0",
        "agent-0",
        &format!("sda={}", dev.path()),
        "127.0.0.1:0",
    );
    agent_args.extend(
        ["--crash-point-interval-s", "0", "--admin-socket"]
            .iter()
            .map(|s| s.to_string()),
    );
    agent_args.push(sock.display().to_string());
    let (_agent, line) = spawn(&agent_args);
    assert!(line.contains("serving NBD on"), "{line}");
    let nbd = line.split_whitespace().last().unwrap().to_string();
    let url = format!("nbd://{nbd}/sda");
    wait_uploaded(&sock);
    let s = status(&sock);
    assert_eq!(s["copy_total_bytes"], SIZE, "the whole device copied: {s}");

    let bookmark = |label: &str| cli::bookmark(Path::new(FERRY), &sock, label);
    let mut points = vec![(bookmark("copied"), dev.read())];
    for round in 0..3 {
        qemu_io(&url, &mut rng, 25);
        let id = bookmark(&format!("round-{round}"));
        points.push((id, dev.read()));
    }
    wait_uploaded(&sock);

    let listed: serde_json::Value = serde_json::from_str(&ferry(&[
        "points",
        "--store",
        &store,
        "--machine",
        "agent-0",
        "--json",
    ]))
    .unwrap();
    for p in listed.as_array().unwrap() {
        assert_eq!(p["disk_bytes"], SIZE, "{p}");
    }
    for (id, want) in &points {
        assert_eq!(want.len() as u64, SIZE);
        let got = failover(
            &store,
            &p("vault.key"),
            "agent-0",
            id,
            &d.join(format!("out-{id}")),
            "sda",
        );
        same(&got, want, &format!("point {id}"));
    }
}

#[test]
fn a_loop_device_seeded_offline_fails_over_to_itself() {
    let mut rng = seed_rng();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |s: &str| d.join(s).display().to_string();
    backing(&d.join("backing.img"), &mut rng);
    let Some(dev) = LoopDevice::attach(&d.join("backing.img")) else {
        return;
    };
    ferry(&["keygen", "--out", &p("vault.key")]);
    std::fs::create_dir_all(d.join("store")).unwrap();
    let store = format!("file://{}", p("store"));
    let seed = || {
        let out = ferry(&[
            "seed",
            "--store",
            &store,
            "--key-file",
            &p("vault.key"),
            "--machine",
            "m",
            "--disk",
            "sdb",
            "--image",
            &dev.path(),
        ]);
        let id = out.lines().last().unwrap().trim().to_string();
        (out, id)
    };
    let (out, first) = seed();
    // 64 KiB blocks: the device's whole size, not the 0 bytes its metadata says.
    assert!(out.contains(&format!("of {}", SIZE / 65536)), "{out}");
    let want_first = dev.read();
    same(
        &failover(
            &store,
            &p("vault.key"),
            "m",
            &first,
            &d.join("first"),
            "sdb",
        ),
        &want_first,
        "the first seed",
    );

    // Blocks changed on the device itself: the next seed sends only those.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev.dev)
        .unwrap();
    for block in [3u64, 100, 201] {
        let data: Vec<u8> = (0..65536).map(|_| rng.gen()).collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, block * 65536).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let (out, second) = seed();
    assert!(out.starts_with("resynced m/sdb: 3 blocks of"), "{out}");
    same(
        &failover(
            &store,
            &p("vault.key"),
            "m",
            &second,
            &d.join("second"),
            "sdb",
        ),
        &dev.read(),
        "the resync",
    );
}

/// `ferry sync-point` onto a block device (failback's master target writing a home
/// disk): a seeded image synced onto an empty loop device equals it, only the
/// non-zero blocks written; the device held by another exclusive open is refused as
/// in use, naming it.
#[test]
fn sync_point_makes_a_loop_device_equal_to_a_point() {
    let mut rng = seed_rng();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |s: &str| d.join(s).display().to_string();
    backing(&d.join("image.img"), &mut rng);
    let empty = d.join("home.img");
    std::fs::File::create(&empty)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let Some(dev) = LoopDevice::attach(&empty) else {
        return;
    };
    ferry(&["keygen", "--out", &p("vault.key")]);
    let store = format!("file://{}", p("store"));
    let common = [
        "--store",
        &store,
        "--key-file",
        &p("vault.key"),
        "--machine",
        "m",
        "--disk",
        "sdc",
    ];
    let image = p("image.img");
    let mut seed = vec!["seed", "--image", &image];
    seed.extend(common);
    ferry(&seed);
    let target = dev.path();
    let mut sync = vec!["sync-point", "--target", &target, "--verify"];
    sync.extend(common);

    // Held exclusively by another open (as a mount holds it): refused.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev.dev)
        .unwrap();
    let out = ferry_testkit::process::run(Path::new(FERRY), &sync);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&target) && err.contains("in use"),
        "{err}"
    );
    drop(held);

    // The first quarter is data, the rest zero on both sides.
    let out = ferry(&sync);
    let blocks = SIZE / 65536;
    assert!(
        out.contains(&format!(
            ": {blocks} blocks compared, {} differed, ",
            blocks / 4
        )) && out.trim_end().ends_with("; identical"),
        "{out}"
    );
    same(
        &dev.read(),
        &std::fs::read(&image).unwrap(),
        "the synced device",
    );
}
