//! `ferry serve-point` as a user runs it: a machine seeded with `ferry seed` and then
//! written at byte granularity in the log with several points; the point served over
//! NBD at once, read through the NBD client and compared with the disk as it was;
//! writes through NBD kept in the overlay across a restart, the log decoded once and
//! reused; hydration that ends every read's need for the store (the store directory
//! renamed away), and a restart then from the directory alone; the replica's objects
//! unchanged byte for byte; and a wrong point, machine, key or overlay as a clear error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_agent::nbd::client::Client;
use ferry_replica::meta::PointKind;
use ferry_replica::object::SealContext;
use ferry_replica::writer::{append, seal_segment, Payload, Write};
use ferry_replica::{Disk, Point, Store, VaultKey};
use ferry_testkit::process::{run, run_ok, spawn, Killed};
use ferry_testkit::wait_for;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
const MIB: u64 = 1 << 20;

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// Every file of the store and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// Appends one log segment of `writes` to a disk and a point `id` after it; applies
/// them to `model`.
fn append_point(
    store: &Store,
    vault: &VaultKey,
    disk: &str,
    id: &str,
    writes: &[(u64, Option<Vec<u8>>, u64)],
    model: &mut [u8],
) {
    let d = store
        .block(Disk::open(store, "m", disk, Some(vault)))
        .unwrap();
    let mut state = store.block(d.load_state()).unwrap();
    let mut seq = state.next_seq;
    let mut ws = Vec::new();
    for (offset, data, len) in writes {
        let payload = match data {
            Some(b) => {
                model[*offset as usize..*offset as usize + b.len()].copy_from_slice(b);
                Payload::Data(b)
            }
            None => {
                model[*offset as usize..(*offset + *len) as usize].fill(0);
                Payload::Zero(*len)
            }
        };
        ws.push(Write {
            seq,
            offset: *offset,
            payload,
        });
        seq += 1;
    }
    let sealed = if ws.is_empty() {
        Vec::new()
    } else {
        vec![seal_segment(&d, &mut SealContext::new(1), &ws).unwrap()]
    };
    let point = Point {
        id: id.into(),
        kind: PointKind::Crash,
        time: chrono::Utc::now(),
        seq,
        disk_bytes: model.len() as u64,
        label: None,
        group: None,
        sums: None,
    };
    store
        .block(append(&d, &mut state, sealed, vec![point], seq + 1))
        .unwrap();
}

fn read_all(addr: SocketAddr, disk: &str, size: u64) -> Vec<u8> {
    let mut c = Client::connect(addr, disk).unwrap();
    let mut out = vec![0u8; size as usize];
    for (i, piece) in out.chunks_mut(4 * MIB as usize).enumerate() {
        c.read(i as u64 * 4 * MIB, piece).unwrap();
    }
    c.disconnect().unwrap();
    out
}

fn status(dir: &Path) -> serde_json::Value {
    std::fs::read(dir.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    store_dir: PathBuf,
    store_url: String,
    key: String,
}

impl Env {
    fn serve(&self, point: &str, overlay: &Path, more: &[&str]) -> (Killed, SocketAddr) {
        let mut args = vec![
            "serve-point",
            "--store",
            &self.store_url,
            "--key-file",
            &self.key,
            "--machine",
            "m",
            "--point",
            point,
            "--nbd-listen",
            "127.0.0.1:0",
            "--overlay-dir",
            overlay.to_str().unwrap(),
        ];
        args.extend_from_slice(more);
        let (child, line) = spawn(bin(), &args);
        let url = line.trim();
        assert!(
            url.starts_with("nbd://") && url.ends_with("/sda"),
            "first line {line:?}"
        );
        let addr = url["nbd://".len()..url.len() - "/sda".len()]
            .parse()
            .unwrap();
        (child, addr)
    }

    fn serve_err(&self, point: &str, key: &str, machine: &str, overlay: &Path) -> String {
        let out = run(
            bin(),
            &[
                "serve-point",
                "--store",
                &self.store_url,
                "--key-file",
                key,
                "--machine",
                machine,
                "--point",
                point,
                "--nbd-listen",
                "127.0.0.1:0",
                "--overlay-dir",
                overlay.to_str().unwrap(),
            ],
        );
        assert!(!out.status.success(), "serve-point should have failed");
        String::from_utf8_lossy(&out.stderr).to_string()
    }
}

#[test]
fn serve_point_reads_writes_restarts_and_hydrates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let store_dir = dir.join("store");
    std::fs::create_dir(&store_dir).unwrap();
    let env = Env {
        store_url: format!("file://{}", store_dir.display()),
        key: dir.join("key").to_str().unwrap().to_string(),
        store_dir,
        dir: dir.clone(),
        _tmp: tmp,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    run_ok(bin(), &["keygen", "--out", &env.key]);
    // sda: 40 MiB (two whole extents and a half), random in the first 20 MiB and a
    // piece of the last extent; sdb: 3 MiB.
    let sizes = [("sda", 40 * MIB), ("sdb", 3 * MIB)];
    let mut models = Vec::new();
    for (disk, size) in sizes {
        let image = dir.join(format!("{disk}.img"));
        ferry_testkit::disk::random_disk(&image, size, 0..(size as usize / 2), &mut rng);
        run_ok(
            bin(),
            &[
                "seed",
                "--store",
                &env.store_url,
                "--key-file",
                &env.key,
                "--machine",
                "m",
                "--disk",
                disk,
                "--image",
                image.to_str().unwrap(),
            ],
        );
        models.push(std::fs::read(&image).unwrap());
    }
    let store = Store::open(&env.store_url).unwrap();
    let vault = VaultKey::load(Path::new(&env.key)).unwrap();
    // Three points, each after byte-granular writes that overlap earlier ones, cross
    // an extent boundary and zero a range.
    let mut at_point: Vec<Vec<Vec<u8>>> = Vec::new();
    // sda's ranges the log wrote up to each point: a read they cover whole needs no
    // extent.
    let mut logged: Vec<(u64, u64)> = Vec::new();
    let mut logged_at = Vec::new();
    for p in 0..3 {
        let mut writes = Vec::new();
        for _ in 0..12 {
            let len = rng.gen_range(1..200_000u64);
            let off = rng.gen_range(0..40 * MIB - len);
            writes.push((
                off,
                Some((0..len).map(|_| rng.gen()).collect::<Vec<u8>>()),
                len,
            ));
        }
        writes.push((16 * MIB - 1000, Some(vec![p as u8 + 1; 5000]), 5000));
        writes.push((rng.gen_range(0..30 * MIB), None, 77_777));
        logged.extend(writes.iter().map(|w| (w.0, w.0 + w.2)));
        logged_at.push(logged.clone());
        append_point(
            &store,
            &vault,
            "sda",
            &format!("p{p}"),
            &writes,
            &mut models[0],
        );
        let w = vec![(
            rng.gen_range(0..MIB),
            Some(vec![0xa0 + p as u8; 1234]),
            1234,
        )];
        append_point(&store, &vault, "sdb", &format!("p{p}"), &w, &mut models[1]);
        at_point.push(models.clone());
    }
    let before = snapshot(&env.store_dir);
    let overlay = env.dir.join("overlay");

    // The middle point, served at once; every byte equals the disks at p1.
    let (mut child, addr) = env.serve("p1", &overlay, &[]);
    // One read in the second extent fetches one extent object and no more: a read
    // there that no log record touches (one the log covers needs no extent).
    let at = (20 * MIB..32 * MIB)
        .step_by(4096)
        .find(|&o| !logged_at[1].iter().any(|&(s, e)| s < o + 4096 && o < e))
        .expect("a piece of the second extent the log leaves");
    let mut c = Client::connect(addr, "sda").unwrap();
    let mut piece = vec![0u8; 4096];
    c.read(at, &mut piece).unwrap();
    assert_eq!(piece, at_point[1][0][at as usize..at as usize + 4096]);
    ferry_testkit::wait_ok("status after one read", Duration::from_secs(10), || {
        let st = status(&overlay);
        if st["disks"][0]["fetched_objects"] == 1 {
            Ok(())
        } else {
            Err(st)
        }
    });
    for (i, (disk, size)) in sizes.iter().enumerate() {
        assert!(
            read_all(addr, disk, *size) == at_point[1][i],
            "{disk} differs from p1"
        );
    }
    // Writes through NBD: unaligned, a zeroed range, across an extent boundary.
    let mut want = at_point[1][0].clone();
    for (off, len) in [
        (123u64, 4567usize),
        (16 * MIB - 10, 20),
        (33 * MIB + 5, 300_000),
    ] {
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        c.write(off, &data).unwrap();
        want[off as usize..off as usize + len].copy_from_slice(&data);
    }
    c.zero(200, 1000).unwrap();
    want[200..1200].fill(0);
    c.flush().unwrap();
    c.disconnect().unwrap();
    assert!(
        read_all(addr, "sda", 40 * MIB) == want,
        "writes are not read back"
    );
    child.kill();

    // After a restart the overlay is still there; the untouched disk still equals p1.
    // The log decoded at the first start is reused, not decoded again.
    let log_mtime = || {
        std::fs::metadata(overlay.join("sda.log"))
            .unwrap()
            .modified()
            .unwrap()
    };
    assert!(overlay.join("sda.log-index").exists());
    let decoded_at = log_mtime();
    let (mut child, addr) = env.serve("p1", &overlay, &[]);
    assert_eq!(log_mtime(), decoded_at, "the log was decoded again");
    assert!(
        read_all(addr, "sda", 40 * MIB) == want,
        "writes lost across a restart"
    );
    assert!(read_all(addr, "sdb", 3 * MIB) == at_point[1][1]);
    child.kill();

    // The same overlay at another point is refused.
    let e = env.serve_err("p2", &env.key, "m", &overlay);
    assert!(e.contains("use another overlay directory"), "{e}");

    // Hydration: copies every extent, then reads need no store.
    let (mut child, addr) = env.serve("p1", &overlay, &["--hydrate"]);
    wait_for("hydration", Duration::from_secs(60), || {
        status(&overlay)["hydrated"] == true
    });
    let s = status(&overlay);
    assert_eq!(s["disks"][0]["hydrated_extents"], s["disks"][0]["extents"]);
    let moved = env.dir.join("store-away");
    std::fs::rename(&env.store_dir, &moved).unwrap();
    assert!(
        read_all(addr, "sda", 40 * MIB) == want,
        "hydrated reads differ"
    );
    assert!(read_all(addr, "sdb", 3 * MIB) == at_point[1][1]);
    child.kill();
    // Hydrated, it restarts without the store: every disk from the directory alone.
    let (mut child, addr) = env.serve("p1", &overlay, &[]);
    assert!(
        read_all(addr, "sda", 40 * MIB) == want,
        "a restart without the store differs"
    );
    assert!(read_all(addr, "sdb", 3 * MIB) == at_point[1][1]);
    child.kill();
    // A directory that does not hold the disks whole still needs the store.
    let e = env.serve_err("p1", &env.key, "m", &env.dir.join("overlay-none"));
    assert!(e.contains("no machine m"), "{e}");
    std::fs::rename(&moved, &env.store_dir).unwrap();

    // A restart keeps the hydrated copy: no extent is fetched again.
    let (mut child, addr) = env.serve("p1", &overlay, &["--hydrate"]);
    assert!(read_all(addr, "sda", 40 * MIB) == want);
    wait_for("status", Duration::from_secs(10), || {
        status(&overlay)["hydrated"] == true
    });
    assert_eq!(status(&overlay)["disks"][0]["fetched_objects"], 0);
    child.kill();

    // Other points serve their own content; qemu-img agrees, byte for byte.
    for p in [0usize, 2] {
        let o = env.dir.join(format!("overlay-{p}"));
        let (mut child, addr) = env.serve(&format!("p{p}"), &o, &[]);
        assert!(
            read_all(addr, "sda", 40 * MIB) == at_point[p][0],
            "p{p} differs"
        );
        let raw = env.dir.join(format!("p{p}.raw"));
        std::fs::write(&raw, &at_point[p][0]).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", raw.to_str().unwrap()])
            .arg(format!("nbd://{addr}/sda"))
            .output()
            .expect("qemu-img (Debian package qemu-utils) runs");
        assert!(
            out.status.success(),
            "qemu-img compare at p{p}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        child.kill();
    }
    let (mut child, addr) = env.serve("latest", &env.dir.join("overlay-latest"), &[]);
    assert!(
        read_all(addr, "sda", 40 * MIB) == at_point[2][0],
        "latest differs"
    );
    child.kill();

    // The replica was only read.
    assert!(
        snapshot(&env.store_dir) == before,
        "the replica's objects changed"
    );

    // Mistakes are one clear line.
    let fresh = env.dir.join("overlay-err");
    let e = env.serve_err("nope", &env.key, "m", &fresh);
    assert!(e.contains("nope"), "{e}");
    let e = env.serve_err("p1", &env.key, "ghost", &fresh);
    assert!(e.contains("ghost"), "{e}");
    let other = env.dir.join("other-key");
    run_ok(bin(), &["keygen", "--out", other.to_str().unwrap()]);
    let e = env.serve_err("p1", other.to_str().unwrap(), "m", &fresh);
    assert!(e.contains("vault key"), "{e}");
}
