//! Failback's items on a real `ferry recovery-host` with a real control plane (issue
//! 16): a home disk synced to the failover point P (sync item) follows the served
//! disk written through its NBD export (reverse + apply items, interval 1 s), also
//! across a kill -9 of the host; a last reverse round freezes the machine (its
//! export refuses writes, its started process is stopped) and reports the final
//! point; an apply up to it with verify ends verified, and the home disk equals
//! the served one (qemu-img compare).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_controlplane::db::Db;
use ferry_controlplane::recovery::work::{self, WorkRow};
use ferry_link::control::wire::{ApplyDisk, DiskPoint, ReverseDisk, SyncDisk, WorkOp};
use ferry_testkit::control::Cp;
use ferry_testkit::net::free_addr;
use ferry_testkit::process::{run_ok, spawn, Killed};
use ferry_testkit::qemu::qemu_io;
use ferry_testkit::wait_for;
use rand::SeedableRng;

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
const MIB: u64 = 1 << 20;

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
    fn host(&self) -> Killed {
        let work = self.dir.join("rh1");
        let (url, ca, work_s) = (self.cp.url.clone(), s(&self.cp.ca), s(&work));
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
        spawn(Path::new(BIN), &args).0
    }

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

    fn ended(&self, id: &str) -> WorkRow {
        wait_for(
            &format!("item {id} to end"),
            Duration::from_secs(60),
            || self.row(id).is_ended(),
        );
        self.row(id)
    }
}

fn same(a: &str, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw", a, &s(b)])
        .status()
        .is_ok_and(|st| st.success())
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| !st.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn a_home_disk_follows_the_served_one_then_the_last_round_freezes_it_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let store_dir = dir.join("store");
    std::fs::create_dir(&store_dir).unwrap();
    let store_url = format!("file://{}", store_dir.display());
    let key = s(&dir.join("vault.key"));
    run_ok(Path::new(BIN), &["keygen", "--out", &key]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    let image = dir.join("sda.img");
    ferry_testkit::disk::random_disk(&image, 4 * MIB, 0..(2 * MIB as usize), &mut rng);
    let out = run_ok(
        Path::new(BIN),
        &[
            "seed",
            "--store",
            &store_url,
            "--key-file",
            &key,
            "--machine",
            "m1",
            "--disk",
            "sda",
            "--image",
            &s(&image),
        ],
    );
    let p = out.lines().last().unwrap().trim().to_string();
    let cp_dir = dir.join("cp");
    let cp = Cp::start(Path::new(BIN), &cp_dir, &free_addr().to_string(), None);
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

    // The home disk, an empty file, made equal to P.
    let home = dir.join("home.raw");
    std::fs::File::create(&home)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let sync = site.submit(WorkOp::Sync {
        disks: vec![SyncDisk {
            disk: "sda".into(),
            point: p.clone(),
            target: s(&home),
            from: None,
        }],
    });
    assert_eq!(site.ended(&sync).state, "succeeded");
    assert!(same(&s(&image), &home));
    let serve = site.submit(WorkOp::Serve {
        disks: vec![DiskPoint {
            disk: "sda".into(),
            point: p.clone(),
        }],
    });
    assert_eq!(site.ended(&serve).state, "succeeded");
    let url = format!("nbd://{}/m1/sda", site.nbd);
    let start = site.submit(WorkOp::Start {
        command: "exec sleep 600".into(),
        env: Default::default(),
    });
    let row = site.ended(&start);
    let pid = u64::from(row.result.unwrap().pid.unwrap());
    qemu_io(&url, &["write -P 0xcd 512k 64k", "write -z 1M 8k", "flush"]);

    let rdisk = |last| WorkOp::Reverse {
        disks: vec![ReverseDisk {
            disk: "sda".into(),
            over: p.clone(),
            source: format!("item:{serve}"),
        }],
        interval_s: 1,
        last,
    };
    let adisk = |until: Vec<DiskPoint>, verify| WorkOp::Apply {
        disks: vec![ApplyDisk {
            disk: "sda".into(),
            over: p.clone(),
            target: s(&home),
        }],
        interval_s: 1,
        until,
        verify,
    };
    let _reverse = site.submit(rdisk(false));
    let _apply = site.submit(adisk(Vec::new(), false));
    wait_for(
        "home equal to the served disk",
        Duration::from_secs(60),
        || same(&url, &home),
    );

    // kill -9 while rounds are applied; the restarted host resumes both items.
    qemu_io(&url, &["write -P 0x5a 3M 256k", "flush"]);
    std::thread::sleep(Duration::from_millis(1500));
    host.kill();
    let mut host = site.host();
    wait_for(
        "home equal again after the restart",
        Duration::from_secs(60),
        || same(&url, &home),
    );
    qemu_io(&url, &["write -P 0x33 100k 4k", "flush"]);
    wait_for("and after more writes", Duration::from_secs(60), || {
        same(&url, &home)
    });

    // The last round: frozen, the final point reported.
    let last = site.submit(rdisk(true));
    let row = site.ended(&last);
    assert_eq!(row.state, "succeeded", "{row:?}");
    let rounds = row.result.unwrap().rounds;
    assert_eq!(rounds.len(), 1, "{rounds:?}");
    assert!(!alive(pid), "the started machine was stopped");
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x01 0 4k", &url])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("write failed"), "{said}");

    let fin = site.submit(adisk(
        vec![DiskPoint {
            disk: "sda".into(),
            point: rounds[0].point.clone(),
        }],
        true,
    ));
    let row = site.ended(&fin);
    assert_eq!(row.state, "succeeded", "{row:?}");
    let applied = row.result.unwrap().applied;
    assert_eq!(applied[0].point, rounds[0].point);
    assert_eq!(applied[0].verified, Some(true));
    assert!(same(&url, &home));
    host.kill();
}
