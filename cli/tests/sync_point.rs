//! `ferry sync-point` as a user runs it: a machine seeded with `ferry seed`, a home
//! disk that drifted from the point made equal to it with only the differing blocks
//! written (its one line says how many), then nothing to do on a second run; and a
//! small or locked target, an unknown disk or point and an unreachable store as one
//! clear line each.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Output;

use ferry_testkit::process::{run, run_ok};
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
const MIB: u64 = 1 << 20;
/// The seed's block size (ferry_replica::DEFAULT_BLOCK_BYTES).
const BLOCK: u64 = 64 << 10;

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn one_line_error(out: &Output, wants: &[&str]) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    for w in wants {
        assert!(
            err.starts_with("error: ") && err.contains(w),
            "wanted {w:?} in {err}"
        );
    }
}

#[test]
fn sync_point_rewrites_only_what_differs_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store_url = format!("file://{}", dir.join("store").display());
    let key = dir.join("key").to_str().unwrap().to_string();
    run_ok(bin(), &["keygen", "--out", &key]);
    let size = 8 * MIB;
    let image = dir.join("sda.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    ferry_testkit::disk::random_disk(&image, size, 0..(size as usize / 2), &mut rng);
    let image_s = image.to_str().unwrap();
    let common = [
        "--store",
        &store_url,
        "--key-file",
        &key,
        "--machine",
        "m",
        "--disk",
        "sda",
    ];
    let mut seed = vec!["seed"];
    seed.extend(common);
    seed.extend(["--image", image_s]);
    run_ok(bin(), &seed);

    // The home disk drifted: three blocks of data changed, one written past the
    // data (where the point has zeros).
    let reference = std::fs::read(&image).unwrap();
    let target = dir.join("home.img");
    std::fs::copy(&image, &target).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    for b in [0u64, 5, 17, 100] {
        f.write_all_at(&[rng.gen::<u8>() | 1; 100], b * BLOCK + 7)
            .unwrap();
    }
    drop(f);
    let target_s = target.to_str().unwrap();
    let mut sync = vec!["sync-point"];
    sync.extend(common);
    sync.extend(["--point", "latest", "--target", target_s, "--verify"]);
    let line = run_ok(bin(), &sync);
    let want = "sync-point: m/sda at ";
    assert!(line.starts_with(want), "{line}");
    assert!(
        line.contains(": 128 blocks compared, 4 differed, "),
        "{line}"
    );
    assert!(line.trim_end().ends_with("; identical"), "{line}");
    assert_eq!(line.lines().count(), 1);
    assert!(std::fs::read(&target).unwrap() == reference);
    // Equal now: nothing to write; without --verify, no "identical".
    sync.pop();
    let line = run_ok(bin(), &sync);
    assert!(
        line.contains(": 128 blocks compared, 0 differed, 0.0 MiB written, "),
        "{line}"
    );
    assert!(!line.contains("identical"), "{line}");

    // A target smaller than the disk.
    let small = dir.join("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(size - 1)
        .unwrap();
    let mut args = sync.clone();
    *args.last_mut().unwrap() = small.to_str().unwrap();
    one_line_error(
        &run(bin(), &args),
        &[small.to_str().unwrap(), "8388607 bytes", "8388608 bytes"],
    );

    // A target another program holds.
    let held = std::fs::File::open(&target).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    one_line_error(&run(bin(), &sync), &[target_s, "in use"]);
    drop(held);

    // An unknown disk or point.
    let mut args = sync.clone();
    args[8] = "sdz";
    one_line_error(&run(bin(), &args), &["machine m has no disk sdz", "sda"]);
    let mut args = sync.clone();
    args[10] = "nope";
    one_line_error(&run(bin(), &args), &["point nope"]);

    // An unreachable store (nothing listens on this loopback port).
    let mut args = sync.clone();
    args[2] = "s3://bucket";
    let out = std::process::Command::new(bin())
        .args(&args)
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_ALLOW_HTTP", "true")
        .output()
        .unwrap();
    one_line_error(&out, &["store s3://bucket"]);
}
