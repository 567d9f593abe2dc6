//! The `ferry` binary as a user runs it: seed an ext4 image, change it, resync, fail
//! over to each point as raw and as VHD, and check the results with qemu-img; errors
//! are one line naming their cause; a seed killed with SIGKILL leaves every committed
//! point intact.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

struct Env {
    dir: tempfile::TempDir,
    store: String,
    key: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}/store", dir.path().display());
        let key = dir.path().join("vault.key");
        let out = ferry(&["keygen", "--out", key.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        Env { dir, store, key }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--store", &self.store]);
        if !matches!(args[0], "points") {
            full.extend(["--key-file", self.key.to_str().unwrap()]);
        }
        ferry(&full)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn seed(&self, machine: &str, disk: &str, image: &Path) -> String {
        let out = self.ok(&[
            "seed",
            "--machine",
            machine,
            "--disk",
            disk,
            "--image",
            image.to_str().unwrap(),
        ]);
        out.lines().last().unwrap().to_string()
    }
}

fn ferry(args: &[&str]) -> Output {
    Command::new(FERRY).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An ext4 file system image holding real files (this crate's sources and more).
fn ext4_image(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(src.join("replica"))
        .arg(path)
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is installed by scripts/install-deps.sh");
    assert!(st.success());
}

/// Overwrites `n` distinct 64 KiB blocks with random bytes; returns how many.
fn change_blocks(path: &Path, fraction: f64, seed: u64) -> u64 {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let blocks = f.metadata().unwrap().len() / 65536;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as f64) < blocks as f64 * fraction {
        chosen.insert(rng.gen_range(0..blocks));
    }
    for b in &chosen {
        let data: Vec<u8> = (0..65536).map(|_| rng.gen()).collect();
        f.write_all_at(&data, b * 65536).unwrap();
    }
    chosen.len() as u64
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (qemu-utils) is installed")
}

/// qemu-img reads `vhd` as a VHD (vpc) of `size` bytes, equal to the raw `want`.
fn assert_vhd_matches(want: &Path, vhd: &Path, size: u64) {
    let info = qemu_img(&["info", "-f", "vpc", "--output=json", vhd.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "vpc");
    assert_eq!(info["virtual-size"], size);
    let (w, v) = (want.to_str().unwrap(), vhd.to_str().unwrap());
    let cmp = qemu_img(&["compare", "-f", "raw", "-F", "vpc", w, v]);
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}",
        text(&cmp.stdout)
    );
}

#[test]
fn seed_resync_failover_raw_and_vhd() {
    let env = Env::new();
    let image = env.path("disk.img");
    ext4_image(&image, 64);
    let first = env.seed("web1", "sda", &image);
    std::fs::copy(&image, env.path("first.img")).unwrap();

    let changed = change_blocks(&image, 0.05, 1);
    let out = env.ok(&[
        "seed",
        "--machine",
        "web1",
        "--disk",
        "sda",
        "--image",
        image.to_str().unwrap(),
        "--label",
        "after",
    ]);
    let second = out.lines().last().unwrap().to_string();
    // Only the changed blocks travel: "resynced web1/sda: N blocks of M, changed sent".
    let sent: u64 = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_eq!(sent, changed, "{out}");
    assert!(out.contains("of 1024"), "{out}");

    // Points, newest first, as a table and as JSON.
    let table = env.ok(&["points", "--machine", "web1"]);
    assert!(
        table.find(&second).unwrap() < table.find(&first).unwrap(),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["points", "--machine", "web1", "--json"])).unwrap();
    assert_eq!(json[0]["id"], second.as_str());
    assert_eq!(json[0]["label"], "after");
    assert_eq!(json[1]["kind"], "seed");

    for (point, want) in [
        (first.as_str(), env.path("first.img")),
        (second.as_str(), image.clone()),
    ] {
        for format in ["raw", "vhd"] {
            let out_dir = env.path(&format!("out-{point}-{format}"));
            env.ok(&[
                "failover",
                "--machine",
                "web1",
                "--point",
                point,
                "--format",
                format,
                "--out",
                out_dir.to_str().unwrap(),
            ]);
            let rebuilt = out_dir.join(format!("sda.{format}"));
            if format == "raw" {
                assert!(
                    std::fs::read(&rebuilt).unwrap() == std::fs::read(&want).unwrap(),
                    "raw at {point}"
                );
            } else {
                assert_vhd_matches(&want, &rebuilt, 64 << 20);
            }
        }
    }
    // A time between the two points picks the first; latest picks the second.
    let between = serde_json::from_str::<serde_json::Value>(&env.ok(&[
        "points",
        "--machine",
        "web1",
        "--json",
    ]))
    .unwrap()[1]["time"]
        .as_str()
        .unwrap()
        .to_string();
    let out = env.ok(&[
        "failover",
        "--machine",
        "web1",
        "--point",
        &between,
        "--out",
        env.path("t").to_str().unwrap(),
    ]);
    assert!(out.contains(&first), "{out}");
    let out = env.ok(&[
        "failover",
        "--machine",
        "web1",
        "--out",
        env.path("l").to_str().unwrap(),
    ]);
    assert!(out.contains(&second), "{out}");

    // Compaction with no window keeps only the newest point, which still rebuilds.
    env.ok(&["compact", "--machine", "web1", "--keep-hours", "0"]);
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["points", "--machine", "web1", "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    env.ok(&[
        "failover",
        "--machine",
        "web1",
        "--out",
        env.path("c").to_str().unwrap(),
    ]);
    assert!(std::fs::read(env.path("c/sda.raw")).unwrap() == std::fs::read(&image).unwrap());
}

fn one_line_error(out: &Output, wants: &str) {
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains(wants),
        "wanted {wants:?} in {err}"
    );
}

#[test]
fn errors_are_one_clear_line() {
    let env = Env::new();
    let image = env.path("small.img");
    // Not a whole number of sectors: refused, naming the image and its size.
    std::fs::write(&image, vec![7u8; 300_000]).unwrap();
    one_line_error(
        &env.run(&[
            "seed",
            "--machine",
            "m",
            "--disk",
            "d",
            "--image",
            image.to_str().unwrap(),
        ]),
        &format!(
            "disk {}: its size is 300000 bytes; a disk must be a non-zero multiple of 512 bytes",
            image.display()
        ),
    );
    std::fs::write(&image, vec![7u8; 300_032]).unwrap();
    env.seed("m", "d", &image);
    let out = env.path("o");
    let o = out.to_str().unwrap();

    let other = env.path("other.key");
    assert!(ferry(&["keygen", "--out", other.to_str().unwrap()])
        .status
        .success());
    assert_eq!(
        std::fs::metadata(&other).unwrap().permissions().mode() & 0o777,
        0o600
    );
    one_line_error(
        &ferry(&["keygen", "--out", other.to_str().unwrap()]),
        "File exists",
    );
    one_line_error(
        &ferry(&[
            "failover",
            "--store",
            &env.store,
            "--key-file",
            other.to_str().unwrap(),
            "--machine",
            "m",
            "--out",
            o,
        ]),
        "wrong key",
    );
    one_line_error(
        &env.run(&["failover", "--machine", "m", "--point", "nope", "--out", o]),
        "point nope is not a point of disk d",
    );
    one_line_error(
        &env.run(&[
            "failover",
            "--machine",
            "m",
            "--point",
            "2001-01-01T00:00:00Z",
            "--out",
            o,
        ]),
        "no point at or before",
    );
    one_line_error(
        &env.run(&[
            "failover",
            "--machine",
            "m",
            "--point",
            "latest-app",
            "--out",
            o,
        ]),
        "no app-consistent point",
    );
    one_line_error(
        &env.run(&["points", "--machine", "ghost"]),
        "no machine ghost",
    );
    one_line_error(
        &env.run(&[
            "seed",
            "--machine",
            "a/b",
            "--disk",
            "d",
            "--image",
            image.to_str().unwrap(),
        ]),
        "invalid machine name",
    );

    // A VHD of a disk that is not a whole number of MiB is padded to one, for Azure;
    // qemu-img finds it equal to the raw disk (the padding reads as zero).
    let vhd_dir = env.path("vhd");
    let out = env.run(&[
        "failover",
        "--machine",
        "m",
        "--format",
        "vhd",
        "--out",
        vhd_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("padded with zeroes from 300032 to 1048576 bytes"),
        "{}",
        text(&out.stderr)
    );
    let vhd = vhd_dir.join("d.vhd");
    assert_vhd_matches(&image, &vhd, 1 << 20);

    // A corrupt segment: the error names it.
    std::fs::write(&image, vec![9u8; 300_032]).unwrap();
    env.seed("m", "d", &image);
    let store_dir = env.dir.path().join("store");
    let log_dir = store_dir.join("machines/m/disks/d/log");
    let seg = std::fs::read_dir(&log_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0x10;
    std::fs::write(&seg, bytes).unwrap();
    let rel = seg.strip_prefix(&store_dir).unwrap().display().to_string();
    one_line_error(
        &env.run(&["failover", "--machine", "m", "--out", o]),
        &format!("corrupt object {rel}"),
    );
    assert!(
        !Path::new(o).join("d.raw").exists(),
        "a failed failover leaves no half image behind"
    );

    // An unreachable store (nothing listens on this loopback port).
    let start = Instant::now();
    let out = Command::new(FERRY)
        .args(["points", "--store", "s3://bucket", "--machine", "m"])
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_ALLOW_HTTP", "true")
        .output()
        .unwrap();
    one_line_error(&out, "store s3://bucket");
    assert!(start.elapsed() < Duration::from_secs(60));
    let out = Command::new(FERRY)
        .args(["points", "--store", "s3://bucket", "--machine", "m"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .output()
        .unwrap();
    one_line_error(&out, "no credentials");
}

/// The whole chain of causes, on one line: what was being done and why it failed.
#[test]
fn errors_name_their_cause() {
    let env = Env::new();
    let missing = env.path("missing.img");
    let m = missing.to_str().unwrap();
    let out = env.run(&["seed", "--machine", "m", "--disk", "d", "--image", m]);
    one_line_error(&out, m);
    one_line_error(&out, "No such file or directory");
    // A bad name is the mistake reported, before the image is looked at.
    let out = env.run(&["seed", "--machine", ".m", "--disk", "d", "--image", m]);
    one_line_error(&out, "invalid machine name \".m\"");
    let out = env.run(&["seed", "--machine", "m", "--disk", "../d", "--image", m]);
    one_line_error(&out, "invalid disk name \"../d\"");

    // A group member must be told its coordinator; a coordinator its members' names.
    let agent = |group: &[&str]| {
        let mut args = vec![
            "agent",
            "--process-server",
            "127.0.0.1:1",
            "--machine",
            "m",
            "--disk",
            "sda=/dev/null",
            "--journal-dir",
            "/nonexistent",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--ca",
            "ca",
            "--group",
            "g",
        ];
        args.extend(group);
        let out = ferry(&args);
        assert!(!out.status.success());
        text(&out.stderr)
    };
    let err = agent(&["--group-listen", "127.0.0.1:20004"]);
    assert!(err.contains("--group-coordinator <NAME>"), "{err}");
    let err = agent(&["--group-peer", "127.0.0.1:20004"]);
    assert!(err.contains("expected NAME@ADDR"), "{err}");
}

#[test]
fn failover_outputs_are_private_and_never_clobbered() {
    let env = Env::new();
    let image = env.path("disk.img");
    std::fs::write(&image, vec![5u8; 1 << 20]).unwrap();
    env.seed("m", "d", &image);
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    let failover = |out: &Path, more: &[&str]| {
        let mut args = vec!["failover", "--machine", "m", "--out", out.to_str().unwrap()];
        args.extend(more);
        env.run(&args)
    };

    // A new directory is the owner's only; the image in it too.
    let out = env.path("new/out");
    env.ok(&["failover", "--machine", "m", "--out", out.to_str().unwrap()]);
    assert_eq!(mode(&env.path("new")), 0o700);
    assert_eq!(mode(&out), 0o700);
    let raw = out.join("d.raw");
    assert_eq!(mode(&raw), 0o600);
    assert!(std::fs::read(&raw).unwrap() == std::fs::read(&image).unwrap());

    // An existing image is refused, untouched, unless --overwrite is given.
    std::fs::write(&raw, b"keep me").unwrap();
    one_line_error(
        &failover(&out, &[]),
        &format!(
            "{}: it exists; give --overwrite to replace it",
            raw.display()
        ),
    );
    assert_eq!(std::fs::read(&raw).unwrap(), b"keep me");
    std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out_ok = failover(&out, &["--overwrite"]);
    assert!(out_ok.status.success(), "{}", text(&out_ok.stderr));
    assert_eq!(mode(&raw), 0o600, "a replaced image is made private too");
    assert!(std::fs::read(&raw).unwrap() == std::fs::read(&image).unwrap());

    // A symbolic link at the output path is never followed, even with --overwrite,
    // dangling or not.
    let victim = env.path("victim");
    std::fs::write(&victim, b"not an image").unwrap();
    let linked = env.path("linked");
    std::fs::create_dir(&linked).unwrap();
    for target in [victim.clone(), env.path("nothing-here")] {
        let link = linked.join("d.raw");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for more in [&[][..], &["--overwrite"][..]] {
            one_line_error(
                &failover(&linked, more),
                &format!(
                    "{}: a symbolic link is there; a failover output never follows one",
                    link.display()
                ),
            );
        }
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"not an image");
    assert!(!env.path("nothing-here").exists());
}

#[test]
fn a_killed_seed_loses_no_committed_point() {
    let env = Env::new();
    let image = env.path("big.img");
    // 192 MiB of mostly random data: long enough to be killed in the middle.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let f = std::fs::File::create(&image).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for i in 0..192u64 {
        if i % 4 != 0 {
            rng.fill(&mut block[..]);
            f.write_all_at(&block, i << 20).unwrap();
        }
    }
    f.set_len(192 << 20).unwrap();
    let first = env.seed("k", "d", &image);
    std::fs::copy(&image, env.path("first.img")).unwrap();
    change_blocks(&image, 0.5, 2);
    for delay_ms in [50u64, 150, 400] {
        let mut child = Command::new(FERRY)
            .args([
                "seed",
                "--store",
                &env.store,
                "--key-file",
                env.key.to_str().unwrap(),
            ])
            .args([
                "--machine",
                "k",
                "--disk",
                "d",
                "--image",
                image.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Killed at several moments of its run: the delay is the behaviour under
        // test, not a wait for a condition.
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // The first point is intact whatever the killed run left behind.
        let out = env.path(&format!("after-kill-{delay_ms}"));
        env.ok(&[
            "failover",
            "--machine",
            "k",
            "--point",
            &first,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(out.join("d.raw")).unwrap()
                == std::fs::read(env.path("first.img")).unwrap()
        );
    }
    // A new seed completes and its point rebuilds the current image.
    let last = env.seed("k", "d", &image);
    let out = env.path("final");
    env.ok(&[
        "failover",
        "--machine",
        "k",
        "--point",
        &last,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(out.join("d.raw")).unwrap() == std::fs::read(&image).unwrap());
}

#[test]
fn quickstart_runs_the_whole_path_and_checks_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry(&[
        "quickstart",
        "--dir",
        &dir.path().join("qs").display().to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("quickstart: OK, 3 points rebuilt byte-identical"),
        "{text}"
    );
    // Through the control plane: the process server and the agent enrolled (keys
    // made on the spot, certificates from the site CA), and the machine's health and
    // RPO as the API reports them.
    assert!(text.contains("process server ps-0 enrolled"), "{text}");
    assert!(
        text.contains("agent for machine agent-0 enrolled"),
        "{text}"
    );
    let qs = dir.path().join("qs");
    for f in [
        "control-plane/ca.pem",
        "control-plane/admin.token",
        "process-server/cert.pem",
        "agent/cert.pem",
    ] {
        assert!(qs.join(f).is_file(), "{f}: {text}");
    }
    assert!(
        !qs.join("pki").exists(),
        "no hand-made certificates: {text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("control plane: machine agent-0"))
        .unwrap_or_else(|| panic!("no health line: {text}"));
    assert!(line.contains("health normal"), "{line}");
    let rpo: f64 = line
        .split("rpo_seconds ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no numeric rpo_seconds: {line}"));
    // The default policy's crash point every 5 s keeps it under its 30 s warning.
    assert!((0.0..30.0).contains(&rpo), "{line}");
    assert!(
        text.contains(&format!(
            "--token-file {}",
            qs.join("control-plane/admin.token").display()
        )),
        "how to go on with ferry cp: {text}"
    );
}
