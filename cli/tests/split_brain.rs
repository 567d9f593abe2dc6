//! No split brain, with real processes (docs/recovery.md, "No split brain"): a control
//! plane, an enrolled process server and an enrolled agent written through NBD with
//! qemu-io. A machine's failover row is set in the control plane's database by hand
//! (the recovery jobs that set it are tested apart): `preparing` holds the agent's
//! writes and brings its final point, acknowledged, into the row, and that point
//! rebuilds the disk with the last write acknowledged before; no row resumes writes;
//! `failed-over` turns the agent read-only, also after a kill -9 and restart, until
//! the row goes, and then it resyncs by checksum before its next point. SQLite.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_replica::{Disk, Store, VaultKey};
use ferry_testkit::cli::{status, wait_uploaded};
use ferry_testkit::control::{process_server, Agent, Cp};
use ferry_testkit::net::free_addr;
use ferry_testkit::process::run_ok;
use ferry_testkit::qemu::qemu_io;
use ferry_testkit::{wait_for, wait_ok};
use rand::SeedableRng;
use serde_json::Value;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const DISK_BYTES: u64 = 8 << 20;

fn bin() -> &'static Path {
    Path::new(FERRY)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The control plane's SQLite database, reached as a second writer would.
struct Sql {
    file: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Sql {
    fn run(&self, stmt: &str) {
        self.query(stmt, None);
    }

    fn text(&self, query: &str, column: &str) -> Option<String> {
        self.query(query, Some(column))
    }

    fn query(&self, sql: &str, column: Option<&str>) -> Option<String> {
        use sqlx::{Connection, Row};
        self.rt.block_on(async {
            let opts = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&self.file)
                .busy_timeout(Duration::from_secs(10));
            let mut c = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
            let out = match column {
                None => {
                    sqlx::query(sql).execute(&mut c).await.unwrap();
                    None
                }
                Some(col) => sqlx::query(sql)
                    .fetch_optional(&mut c)
                    .await
                    .unwrap()
                    .and_then(|r| r.try_get::<Option<String>, _>(col).unwrap()),
            };
            c.close().await.unwrap();
            out
        })
    }
}

/// One qemu-io command through the export; whether it succeeded.
fn try_io(url: &str, cmd: &str) -> bool {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-t", "writeback", "-c", cmd, url])
        .output()
        .expect("qemu-io is installed (qemu-utils)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success() && !text.contains("failed") && !text.contains("error")
}

#[test]
fn a_failed_over_source_stops_writing_and_its_final_point_holds_every_acknowledged_write() {
    let seed = ferry_testkit::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cp = Cp::start(bin(), &d.join("cp"), &free_addr().to_string(), None);
    let sql = Sql {
        file: d.join("cp/ferry.db"),
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    };
    std::fs::create_dir_all(d.join("store")).unwrap();
    let store_url = format!("file://{}", s(&d.join("store")));
    run_ok(bin(), &["keygen", "--out", &s(&d.join("vault.key"))]);
    let store = Store::open(&store_url).unwrap();
    let vault = VaultKey::load(&d.join("vault.key")).unwrap();

    let _ps = process_server(&cp, d, "ps1", &store_url, None);
    let mut a = Agent::enroll(&cp, d, "m1", DISK_BYTES, &mut rng);
    wait_uploaded(bin(), &a.sock);
    a.write_and_point(bin(), &mut rng, "before");
    // The last write acknowledged before the failover; written again below while the
    // hold takes effect, with the same bytes, so the disk stays as it is now.
    let last = "write -P 0x5a 1048576 65536";
    qemu_io(&a.nbd(), &[last]);
    let acknowledged = std::fs::read(&a.disk).unwrap();

    // A planned failover prepares: the agent learns it at its next heartbeat.
    sql.run(
        "INSERT INTO machine_recovery (machine, state, active_site, planned, prepare_id, \
         updated_at) VALUES ('m1', 'preparing', 'home', 1, 'prep-1', 0)",
    );
    wait_for("writes held", Duration::from_secs(20), || {
        !try_io(&a.nbd(), last)
    });
    assert!(
        try_io(&a.nbd(), "read -P 0x5a 1048576 65536"),
        "reads are served"
    );
    let prepared = wait_ok("the final point reported", Duration::from_secs(30), || {
        sql.text(
            "SELECT prepared FROM machine_recovery WHERE machine = 'm1'",
            "prepared",
        )
        .ok_or("not yet")
    });
    let prepared: Value = serde_json::from_str(&prepared).unwrap();
    assert_eq!(prepared["id"], "prep-1", "{prepared}");
    assert_eq!(prepared["state"], "prepared", "{prepared}");
    assert_eq!(prepared["points"][0]["disk"], "sda", "{prepared}");
    let point = prepared["points"][0]["point"].as_str().unwrap().to_string();
    // The event is added just after the row is written: waited for, not raced.
    wait_for("an event says so", Duration::from_secs(10), || {
        cp.events()
            .iter()
            .any(|e| e["kind"] == "prepared" && e["subject"] == "machine m1")
    });
    // The recovery job then waits until the store holds it: it rebuilds the disk as
    // it was acknowledged.
    let rebuilt = wait_ok(
        "the final point in the store",
        Duration::from_secs(60),
        || {
            let replica = store
                .block(Disk::open(&store, "m1", "sda", Some(&vault)))
                .map_err(|e| e.to_string())?;
            let state = store
                .block(replica.load_state())
                .map_err(|e| e.to_string())?;
            let p = state.point(&point).ok_or("not yet")?;
            Ok::<_, String>(ferry_testkit::site::rebuilt(&replica, &state, p))
        },
    );
    assert!(
        rebuilt == acknowledged,
        "the final point holds every acknowledged write"
    );
    assert_eq!(std::fs::read(&a.disk).unwrap(), acknowledged);

    // Cancelled: no row, writes resume.
    sql.run("DELETE FROM machine_recovery WHERE machine = 'm1'");
    wait_for("writes resumed", Duration::from_secs(20), || {
        try_io(&a.nbd(), "write -P 0x21 0 4096")
    });
    a.write_and_point(bin(), &mut rng, "after-cancel");
    wait_uploaded(bin(), &a.sock);

    // Failed over: read-only, no replication, reported.
    sql.run(
        "INSERT INTO machine_recovery (machine, state, active_site, planned, job_id, \
         updated_at) VALUES ('m1', 'failed-over', 'recovery', 0, 'job-1', 0)",
    );
    wait_for("read-only", Duration::from_secs(20), || {
        !try_io(&a.nbd(), "write -P 0x31 0 4096")
    });
    let st = wait_ok("replication stopped", Duration::from_secs(20), || {
        let st = status(bin(), &a.sock);
        if st["connected"] == false {
            Ok(st)
        } else {
            Err(st)
        }
    });
    assert_eq!(st["writes"], "read-only", "{st}");
    assert_eq!(st["replicating"], false, "{st}");
    assert_eq!(st["failover"]["state"], "read-only", "{st}");
    assert_eq!(st["failover"]["id"], "job-1", "{st}");

    // Killed and restarted: read-only from its first write.
    a.restart(&cp, d);
    assert!(!try_io(&a.nbd(), "write -P 0x41 0 4096"), "still read-only");
    assert_eq!(status(bin(), &a.sock)["writes"], "read-only");

    // The failover cancelled: writes and replication resume; every point rebuilds.
    sql.run("DELETE FROM machine_recovery WHERE machine = 'm1'");
    wait_for(
        "writes resumed after the restart",
        Duration::from_secs(20),
        || try_io(&a.nbd(), "write -P 0x51 0 4096"),
    );
    // Lifted from read-only, the agent dropped its journal and compares its disk with
    // the replica (a failback may have rewritten it): no point until that is done.
    wait_for(
        "the re-enable's resync done",
        Duration::from_secs(60),
        || {
            let st = status(bin(), &a.sock);
            st["resync"].is_null() && st["last_resync"]["reenable"] == true
        },
    );
    a.write_and_point(bin(), &mut rng, "after-restart");
    wait_uploaded(bin(), &a.sock);
    a.assert_points_rebuild(&store, &vault);
}
