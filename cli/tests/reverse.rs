//! `ferry reverse-send` and `ferry reverse-apply` as a person runs them: a machine
//! seeded with `ferry seed`, its point served from an overlay directory and written
//! (through the served disk, as the NBD export would), one round sent and applied
//! onto a home disk at the point; the home disk then equals the served one, each
//! command printed one line, a second apply has nothing to do, and a wrong `--over`
//! point is one clear line.

use std::path::Path;
use std::process::Output;

use ferry_agent::nbd::Device;
use ferry_agent::recover::ServedDisk;
use ferry_replica::{Disk, Store, VaultKey};
use ferry_testkit::process::{run, run_ok};
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
const MIB: u64 = 1 << 20;

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
fn a_round_sent_and_applied_by_hand_makes_home_equal_the_served_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store_dir = dir.join("store");
    let store_url = format!("file://{}", store_dir.display());
    let key = dir.join("key");
    let key_s = key.to_str().unwrap();
    run_ok(bin(), &["keygen", "--out", key_s]);
    let size = 8 * MIB;
    let image = dir.join("sda.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    ferry_testkit::disk::random_disk(&image, size, 0..(size as usize / 2), &mut rng);
    let common = [
        "--store",
        &store_url,
        "--key-file",
        key_s,
        "--machine",
        "m",
        "--disk",
        "sda",
    ];
    let mut seed = vec!["seed"];
    seed.extend(common);
    seed.extend(["--image", image.to_str().unwrap()]);
    run_ok(bin(), &seed);

    // Failover: the point served from an overlay directory and written.
    let store = Store::open(&store_url).unwrap();
    let vault = VaultKey::load(&key).unwrap();
    let d = store
        .block(Disk::open(&store, "m", "sda", Some(&vault)))
        .unwrap();
    let state = store.block(d.load_state()).unwrap();
    let p = state.latest_point().unwrap().clone();
    let overlay = dir.join("overlay");
    let mut model = std::fs::read(&image).unwrap();
    {
        let served = ServedDisk::open("sda", d, &state, &p, &overlay, 4).unwrap();
        for at in [0u64, 3 * MIB + 4096, 7 * MIB] {
            let mut data = vec![0u8; 40960];
            rng.fill(&mut data[..]);
            served.write(at, &data, false).unwrap();
            model[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
        served.zero(MIB, 65536, false).unwrap();
        model[MIB as usize..(MIB + 65536) as usize].fill(0);
        served.flush().unwrap();
    }

    let mut send = vec!["reverse-send"];
    send.extend(common);
    send.extend(["--overlay-dir", overlay.to_str().unwrap()]);
    let line = run_ok(bin(), &send);
    assert_eq!(line.lines().count(), 1, "{line}");
    let want = format!("reverse-send: m/sda over {} -> m.reverse point ", p.id);
    assert!(line.starts_with(&want), "{line}");
    assert!(
        line.contains(": 4 ranges, 0.1 MiB data, 0.1 MiB zeroed, "),
        "{line}"
    );

    // Home holds the point already (the seeded image): the round applied on top.
    let home = dir.join("home.img");
    std::fs::copy(&image, &home).unwrap();
    let home_s = home.to_str().unwrap();
    let mut apply = vec!["reverse-apply"];
    apply.extend(common);
    apply.extend(["--over", &p.id, "--target", home_s]);
    let line = run_ok(bin(), &apply);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with(&format!(
            "reverse-apply: m.reverse/sda over {} onto {home_s}: 1 points (4 records) applied, now at ",
            p.id
        )),
        "{line}"
    );
    assert!(std::fs::read(&home).unwrap() == model);
    let line = run_ok(bin(), &apply);
    assert!(line.contains(": 0 points (0 records) applied, "), "{line}");
    assert!(std::fs::read(&home).unwrap() == model);

    // The target synced to a point that is not the one the deltas lie over.
    let mut args = apply.clone();
    args[10] = "nope";
    one_line_error(&run(bin(), &args), &["no point nope", "sda"]);
}
