//! `ferry recovery-host` with a real control plane: enrolled with a one-time token,
//! listed by `GET /v1/recovery-hosts`, given work items the way the control plane's
//! jobs give them (`work::submit` on its database), and checked from outside: a built
//! image equal to the seeded disk, the same disk served over NBD, a started process
//! that runs, scripts' exit codes, outputs and timeouts, a kill -9 after which the
//! export comes back with the writes made through it, a remove that leaves nothing
//! (no folder, no process, no export), and the host removed by an admin.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_controlplane::db::Db;
use ferry_controlplane::recovery::work::{self, WorkRow};
use ferry_link::control::wire::{DiskPoint, WorkOp};
use ferry_testkit::control::Cp;
use ferry_testkit::net::free_addr;
use ferry_testkit::process::{run_ok, spawn, Killed};
use ferry_testkit::qemu::qemu_io;
use ferry_testkit::wait_for;
use rand::SeedableRng;

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
const MIB: u64 = 1 << 20;

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

struct Site {
    dir: PathBuf,
    cp: Cp,
    db: Db,
    rt: tokio::runtime::Runtime,
    store_url: String,
    key: String,
    nbd: String,
    next: usize,
}

impl Site {
    /// The recovery host `rh1`, enrolled with a token the first time only.
    fn host(&self) -> Killed {
        let work = self.dir.join("rh1");
        let (url, ca) = (self.cp.url.clone(), s(&self.cp.ca));
        let work_s = s(&work);
        let mut args = vec![
            "recovery-host",
            "--control-plane",
            &url,
            "--ca",
            &ca,
            "--name",
            "rh1",
            "--work-dir",
            &work_s,
            "--store",
            &self.store_url,
            "--key-file",
            &self.key,
            "--nbd-listen",
            &self.nbd,
        ];
        let token;
        if !work.join("identity/cert.pem").exists() {
            token = self.cp.enroll_token("recovery-host");
            args.extend(["--enroll-token", &token]);
        }
        let (child, line) = spawn(bin(), &args);
        assert_eq!(
            line.trim(),
            format!("recovery host rh1 serving NBD at {}", self.nbd)
        );
        child
    }

    /// Gives `op` to rh1 as the next item of job j1; its id.
    fn submit(&mut self, op: WorkOp) -> String {
        let id = work::item_id("j1", self.next, "m1");
        self.next += 1;
        self.rt
            .block_on(work::submit(&self.db, &id, "rh1", "j1", "m1", &op, 1))
            .unwrap();
        id
    }

    fn row(&self, id: &str) -> WorkRow {
        self.rt.block_on(work::get(&self.db, id)).unwrap().unwrap()
    }

    /// The item once it ended, as the control plane recorded it.
    fn ended(&self, id: &str, within: Duration) -> WorkRow {
        wait_for(&format!("item {id} to end"), within, || {
            self.row(id).is_ended()
        });
        self.row(id)
    }

    fn item_dir(&self, id: &str) -> PathBuf {
        self.dir.join("rh1/items").join(id)
    }
}

fn same_image(a: &str, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", a, &s(b)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {a} {}: {}{}",
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn opens(url: &str) -> bool {
    Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", url])
        .output()
        .map(|o| {
            o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("Could not open")
        })
        .unwrap_or(false)
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| !st.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn a_recovery_host_builds_serves_runs_survives_a_kill_and_removes_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let store_dir = dir.join("store");
    std::fs::create_dir(&store_dir).unwrap();
    let store_url = format!("file://{}", store_dir.display());
    let key = s(&dir.join("vault.key"));
    run_ok(bin(), &["keygen", "--out", &key]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    // Machine m1: sda (6 MiB, random in its first half) and sdb (1 MiB), seeded.
    let mut points = BTreeMap::new();
    for (disk, size) in [("sda", 6 * MIB), ("sdb", MIB)] {
        let image = dir.join(format!("{disk}.img"));
        ferry_testkit::disk::random_disk(&image, size, 0..(size as usize / 2), &mut rng);
        let out = run_ok(
            bin(),
            &[
                "seed",
                "--store",
                &store_url,
                "--key-file",
                &key,
                "--machine",
                "m1",
                "--disk",
                disk,
                "--image",
                &s(&image),
            ],
        );
        points.insert(disk, out.lines().last().unwrap().trim().to_string());
    }
    let cp_dir = dir.join("cp");
    let cp = Cp::start(bin(), &cp_dir, &free_addr().to_string(), None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(Db::open(&Db::default_url(&cp_dir))).unwrap();
    let mut site = Site {
        dir: dir.clone(),
        cp,
        db,
        rt,
        store_url,
        key,
        nbd: free_addr().to_string(),
        next: 0,
    };
    let mut host = site.host();
    wait_for("rh1 listed", Duration::from_secs(20), || {
        let (st, list) = site.cp.api("GET", "/v1/recovery-hosts", None);
        st == 200 && list["items"][0]["name"] == "rh1" && list["items"][0]["live"] == true
    });
    let (_, list) = site.cp.api("GET", "/v1/recovery-hosts", None);
    assert_eq!(list["items"][0]["nbd_address"], site.nbd.as_str());
    assert!(list["items"][0]["work_dir_free_bytes"].as_u64().unwrap() > 0);
    // The event is written just after the row: waited for.
    wait_for("rh1's registered event", Duration::from_secs(20), || {
        site.cp
            .events()
            .iter()
            .any(|e| e["kind"] == "registered" && e["subject"] == "recovery-host rh1")
    });

    // Each disk at its own seed point (the points of a machine's disks need not be
    // one: the jobs choose them).
    let both = |bad: Option<&str>| {
        ["sda", "sdb"]
            .map(|d| DiskPoint {
                disk: d.into(),
                point: bad.map_or_else(|| points[d].clone(), str::to_string),
            })
            .to_vec()
    };
    // Build: raw images equal to the disks as seeded.
    let build = site.submit(WorkOp::Build {
        disks: both(None),
        format: "raw".into(),
    });
    let row = site.ended(&build, Duration::from_secs(60));
    assert_eq!(row.state, "succeeded", "{row:?}");
    // Each disk's own progress came with it through the heartbeat: both built.
    let names: Vec<&str> = row.disks.iter().map(|d| d.disk.as_str()).collect();
    assert_eq!(names, ["sda", "sdb"], "{row:?}");
    assert!(
        row.disks
            .iter()
            .all(|d| d.progress == 1.0 && d.bytes > 0 && d.bytes_done == d.bytes),
        "{row:?}"
    );
    let disks = row.result.unwrap().disks;
    assert_eq!(disks.len(), 2);
    for d in &disks {
        let path = d.path.as_deref().unwrap();
        assert_eq!(
            Path::new(path),
            site.item_dir(&build).join(format!("{}.raw", d.disk))
        );
        assert_eq!(d.point, points[d.disk.as_str()]);
        same_image(path, &dir.join(format!("{}.img", d.disk)));
    }
    // A fixed VHD, as Azure takes, holds the same bytes.
    let vhd = site.submit(WorkOp::Build {
        disks: both(None)[1..].to_vec(),
        format: "vhd".into(),
    });
    let row = site.ended(&vhd, Duration::from_secs(60));
    assert_eq!(row.state, "succeeded", "{row:?}");
    let path = row.result.unwrap().disks[0].path.clone().unwrap();
    assert!(path.ends_with("/sdb.vhd"), "{path}");
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "raw", &path])
        .arg(dir.join("sdb.img"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A point the disk does not have fails, naming it.
    let bad = site.submit(WorkOp::Build {
        disks: both(Some("no-such-point")),
        format: "raw".into(),
    });
    let row = site.ended(&bad, Duration::from_secs(30));
    assert_eq!(row.state, "failed");
    assert!(row.error.unwrap().contains("no point no-such-point"));

    // Serve: the same disks over NBD, as m1/sda and m1/sdb.
    let serve = site.submit(WorkOp::Serve { disks: both(None) });
    let row = site.ended(&serve, Duration::from_secs(60));
    assert_eq!(row.state, "succeeded", "{row:?}");
    let urls: BTreeMap<String, String> = row
        .result
        .unwrap()
        .disks
        .into_iter()
        .map(|d| (d.disk, d.nbd_url.unwrap()))
        .collect();
    assert_eq!(urls["sda"], format!("nbd://{}/m1/sda", site.nbd));
    for (disk, url) in &urls {
        same_image(url, &dir.join(format!("{disk}.img")));
    }
    // Written through the export: kept in the overlay across a kill -9.
    qemu_io(&urls["sda"], &["write -P 0xab 1M 64k", "flush"]);

    // Start: the process runs detached, its pid reported.
    let start = site.submit(WorkOp::Start {
        command: "echo started; exec sleep 600".into(),
        env: BTreeMap::new(),
    });
    let row = site.ended(&start, Duration::from_secs(20));
    assert_eq!(row.state, "succeeded", "{row:?}");
    let pid = u64::from(row.result.unwrap().pid.unwrap());
    assert!(alive(pid));
    // A command that ends at once did not start: failed, with its output.
    let quick = site.submit(WorkOp::Start {
        command: "echo no machine here; exit 1".into(),
        env: BTreeMap::new(),
    });
    let row = site.ended(&quick, Duration::from_secs(20));
    assert_eq!(row.state, "failed");
    assert_eq!(row.result.unwrap().output, "no machine here\n");

    // Scripts: exit codes, output and environment, and a timeout.
    let env = BTreeMap::from([("FERRY_MACHINE".to_string(), "m1".to_string())]);
    let ok = site.submit(WorkOp::Script {
        command: "echo machine $FERRY_MACHINE".into(),
        timeout_s: 30,
        env: env.clone(),
    });
    let failing = site.submit(WorkOp::Script {
        command: "echo to stderr >&2; exit 3".into(),
        timeout_s: 30,
        env: env.clone(),
    });
    let hanging = site.submit(WorkOp::Script {
        command: "echo waiting; sleep 600".into(),
        timeout_s: 1,
        env,
    });
    let row = site.ended(&ok, Duration::from_secs(20));
    assert_eq!(row.state, "succeeded", "{row:?}");
    let res = row.result.unwrap();
    assert_eq!(
        (res.exit_code, res.output.as_str()),
        (Some(0), "machine m1\n")
    );
    let row = site.ended(&failing, Duration::from_secs(20));
    assert_eq!(row.state, "failed");
    let res = row.result.unwrap();
    assert_eq!(
        (res.exit_code, res.output.as_str()),
        (Some(3), "to stderr\n")
    );
    assert!(row.error.unwrap().contains("status 3"));
    let row = site.ended(&hanging, Duration::from_secs(20));
    assert_eq!(row.state, "failed");
    assert!(row.error.unwrap().contains("timed out after 1 s"));
    assert_eq!(row.result.unwrap().output, "waiting\n");

    // kill -9: the export comes back after a restart (no token now), with the write.
    host.kill();
    assert!(!opens(&urls["sda"]));
    let mut host = site.host();
    wait_for("m1/sda served again", Duration::from_secs(30), || {
        opens(&urls["sda"])
    });
    qemu_io(&urls["sda"], &["read -P 0xab 1M 64k"]);
    let mut want = std::fs::read(dir.join("sda.img")).unwrap();
    want[MIB as usize..(MIB + 64 * 1024) as usize].fill(0xab);
    let expected = dir.join("sda-written.img");
    std::fs::write(&expected, &want).unwrap();
    same_image(&urls["sda"], &expected);
    // The started process was not the host's child: it runs on.
    assert!(alive(pid));

    // Remove: exports, process and files gone, and each named.
    let remove = site.submit(WorkOp::Remove {
        items: vec![build.clone(), serve.clone(), start.clone()],
    });
    let row = site.ended(&remove, Duration::from_secs(30));
    assert_eq!(row.state, "succeeded", "{row:?}");
    let deleted = row.result.unwrap().deleted;
    for want in [
        "export m1/sda".to_string(),
        "export m1/sdb".to_string(),
        format!("process {pid}"),
        format!("file {}", s(&site.item_dir(&build).join("sda.raw"))),
    ] {
        assert!(deleted.contains(&want), "{want} not in {deleted:?}");
    }
    for id in [&build, &serve, &start] {
        assert!(!site.item_dir(id).exists(), "{id} left its folder");
    }
    assert!(!opens(&urls["sda"]) && !opens(&urls["sdb"]));
    wait_for("the started process gone", Duration::from_secs(5), || {
        !alive(pid)
    });
    // The jobs mark the removed items; they then leave rh1's orders.
    site.rt
        .block_on(work::mark_removed(
            &site.db,
            &[build.clone(), serve.clone(), start.clone()],
            2,
        ))
        .unwrap();
    let (_, list) = site.cp.api("GET", "/v1/recovery-hosts", None);
    let items = list["items"][0]["items"].as_i64().unwrap();
    assert_eq!(items, 7, "{list}");
    // Nothing comes back: not after a heartbeat, not after another restart.
    std::thread::sleep(Duration::from_secs(2));
    host.kill();
    let mut host = site.host();
    std::thread::sleep(Duration::from_secs(3));
    for id in [&build, &serve, &start] {
        assert!(!site.item_dir(id).exists(), "{id} came back");
    }
    assert!(!opens(&urls["sda"]));

    // An admin removes the host: its certificate is refused from now on.
    let (st, _) = site.cp.api("DELETE", "/v1/recovery-hosts/rh1", None);
    assert_eq!(st, 204);
    let (_, list) = site.cp.api("GET", "/v1/recovery-hosts", None);
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");
    let (st, _) = site.cp.api("DELETE", "/v1/recovery-hosts/rh1", None);
    assert_eq!(st, 404);
    // Still heartbeating, and refused: a heartbeat that got through would list it again.
    std::thread::sleep(Duration::from_secs(3));
    let (_, list) = site.cp.api("GET", "/v1/recovery-hosts", None);
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");
    assert!(site
        .cp
        .events()
        .iter()
        .any(|e| e["kind"] == "removed" && e["subject"] == "recovery-host rh1"));
    host.kill();
}
