//! Failback's reverse and apply items on the host's table, without a control plane:
//! a served disk written after failover comes home round by round, a last round
//! freezes it and leaves a final map the home disk is verified against, a built
//! disk's rounds send only the blocks that changed, and an apply item found running
//! after a restart resumes from its marker.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use ferry_agent::nbd::Device;
use ferry_link::control::wire::{
    ApplyDisk, DiskPoint, ReverseDisk, SyncDisk, WorkItem, WorkOp, WorkReport, WorkResult,
};

use super::serve::Gate;
use super::tests::{host, state, write_point};
use super::*;

const MB: u64 = 1 << 20;

/// A host whose vault key a restarted one shares.
fn keyed_host(dir: &Path) -> Arc<Host> {
    let store_dir = dir.join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    Host::open(
        dir.join("items"),
        ferry_replica::Store::open(&format!("file://{}", store_dir.display())).unwrap(),
        ferry_replica::VaultKey::from_bytes([7; 32]),
        "127.0.0.1:10809".into(),
        Arc::new(ferry_agent::nbd::Exports::default()),
        4,
    )
    .unwrap()
}

fn item(id: &str, op: WorkOp) -> WorkItem {
    WorkItem {
        id: id.into(),
        machine: "m1".into(),
        op,
    }
}

fn sync(id: &str, home: &Path) -> WorkItem {
    item(
        id,
        WorkOp::Sync {
            disks: vec![SyncDisk {
                disk: "d0".into(),
                point: "p1".into(),
                target: home.display().to_string(),
                from: None,
            }],
        },
    )
}

fn serve(id: &str) -> WorkItem {
    item(
        id,
        WorkOp::Serve {
            disks: vec![DiskPoint {
                disk: "d0".into(),
                point: "p1".into(),
            }],
        },
    )
}

fn reverse(id: &str, source: &str, last: bool) -> WorkItem {
    item(
        id,
        WorkOp::Reverse {
            disks: vec![ReverseDisk {
                disk: "d0".into(),
                over: "p1".into(),
                source: source.into(),
            }],
            interval_s: 1,
            last,
        },
    )
}

fn apply(id: &str, home: &Path, until: Vec<DiskPoint>, verify: bool) -> WorkItem {
    item(
        id,
        WorkOp::Apply {
            disks: vec![ApplyDisk {
                disk: "d0".into(),
                over: "p1".into(),
                target: home.display().to_string(),
            }],
            interval_s: 1,
            until,
            verify,
        },
    )
}

fn report(h: &Host, id: &str) -> WorkReport {
    h.table()
        .entries
        .get(id)
        .and_then(|e| e.report.clone())
        .unwrap_or_else(|| panic!("no report of {id}"))
}

fn result(h: &Host, id: &str) -> WorkResult {
    report(h, id).result.unwrap_or_default()
}

fn ended(h: &Host, id: &str) -> String {
    ferry_testkit::wait_for(id, Duration::from_secs(60), || {
        state(h, id).is_some_and(|s| s != "running")
    });
    state(h, id).unwrap_or_default()
}

fn gate(h: &Host, id: &str) -> Arc<Gate> {
    h.table().entries[id].served[0].1.clone()
}

fn whole(d: &dyn Device) -> Vec<u8> {
    let mut b = vec![0u8; d.size() as usize];
    d.read(0, &mut b).unwrap();
    b
}

fn home_file(dir: &Path) -> std::path::PathBuf {
    let home = dir.join("home.raw");
    std::fs::File::create(&home).unwrap().set_len(MB).unwrap();
    home
}

fn wait_equal(what: &str, home: &Path, want: &dyn Fn() -> Vec<u8>) {
    ferry_testkit::wait_for(what, Duration::from_secs(60), || {
        std::fs::read(home).unwrap()[..MB as usize] == want()[..]
    });
}

#[test]
fn a_served_disk_comes_home_round_by_round_then_freezes_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let h = host(tmp.path());
    write_point(&h, "m1", "d0", "p1", 4);
    let home = home_file(tmp.path());
    let mut orders = vec![sync("y1", &home), serve("s1")];
    h.apply(orders.clone());
    assert_eq!(ended(&h, "y1"), "succeeded");
    assert_eq!(ended(&h, "s1"), "succeeded");
    let g = gate(&h, "s1");
    g.write(3 * 4096 + 100, &[0xab; 10_000], false).unwrap();
    g.write(700_000, &[0x5c; 4096], false).unwrap();
    g.zero(0, 4096, false).unwrap();

    orders.push(reverse("r1", "item:s1", false));
    orders.push(apply("a1", &home, Vec::new(), false));
    h.apply(orders.clone());
    let served = || whole(&*gate(&h, "s1"));
    wait_equal("the home disk equal to the served one", &home, &served);
    g.write(900_000, &[0x77; 5000], false).unwrap();
    wait_equal("equal again after more writes", &home, &served);
    assert_eq!(state(&h, "r1").as_deref(), Some("running"));
    let rounds = result(&h, "r1").rounds;
    assert_eq!(rounds.len(), 1, "{rounds:?}");
    assert!(rounds[0].total_bytes_sent >= rounds[0].bytes_sent && rounds[0].at > 0);
    ferry_testkit::wait_for(
        "a1 reports what it applied",
        Duration::from_secs(30),
        || {
            result(&h, "a1")
                .applied
                .first()
                .is_some_and(|a| a.total_bytes_written >= 10_000 + 4096 + 4096 + 5000)
        },
    );

    // As a failback does: the running items are removed first (their state, kept
    // with the source and by target, stays), then the last round freezes the
    // machine and reports the final point.
    orders.push(item(
        "x0",
        WorkOp::Remove {
            items: vec!["r1".into(), "a1".into()],
        },
    ));
    h.apply(orders.clone());
    assert_eq!(ended(&h, "x0"), "succeeded");
    orders.push(reverse("r2", "item:s1", true));
    h.apply(orders.clone());
    assert_eq!(ended(&h, "r2"), "succeeded", "{:?}", report(&h, "r2"));
    let last = result(&h, "r2").rounds;
    assert_eq!(last.len(), 1);
    // It goes on from r1's cursor: nothing was written since r1's last round.
    assert_eq!(last[0].bytes_data, 0, "{last:?}");
    let refused = g.write(0, &[1; 512], false).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ReadOnlyFilesystem);
    assert!(tmp.path().join("items/s1").join(serve::FROZEN).exists());

    let until = vec![DiskPoint {
        disk: "d0".into(),
        point: last[0].point.clone(),
    }];
    orders.push(apply("a2", &home, until.clone(), true));
    h.apply(orders.clone());
    assert_eq!(ended(&h, "a2"), "succeeded", "{:?}", report(&h, "a2"));
    let applied = result(&h, "a2").applied;
    assert_eq!(applied[0].point, last[0].point);
    assert_eq!(applied[0].verified, Some(true));
    // From a1's marker: only the last (empty) round was left to apply.
    assert_eq!(applied[0].bytes_written, 0, "{applied:?}");
    assert_eq!(std::fs::read(&home).unwrap(), served());

    // A home block that no longer matches fails the verify, named (a3 goes on from
    // the target's marker: nothing is left to apply, nothing repairs it).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&home)
        .unwrap()
        .write_all_at(&[0xee; 10], 2 * 4096 + 7)
        .unwrap();
    orders.push(apply("a3", &home, until, true));
    h.apply(orders.clone());
    assert_eq!(ended(&h, "a3"), "failed");
    let e = report(&h, "a3").error.unwrap();
    assert!(e.contains("disk d0") && e.contains("block 2 "), "{e}");

    // A remove stops and deletes the items' own state, never the home disk.
    orders.push(item(
        "x1",
        WorkOp::Remove {
            items: vec!["a3".into(), "r2".into()],
        },
    ));
    h.apply(orders.clone());
    assert_eq!(ended(&h, "x1"), "succeeded");
    let deleted = result(&h, "x1").deleted;
    // a3 was a final apply: its target's markers go with it.
    assert!(
        deleted.iter().any(|d| d.contains("reverse-applied")),
        "{deleted:?}"
    );
    assert!(home.exists() && !tmp.path().join("items/r2").exists());
    assert_eq!(
        std::fs::read_dir(tmp.path().join("applied"))
            .unwrap()
            .count(),
        0
    );
    // The reverse cursor lives with the served disk, and goes with it.
    assert!(tmp
        .path()
        .join("items/s1")
        .join(reverse::STATE_DIR)
        .exists());
    orders.push(item(
        "x2",
        WorkOp::Remove {
            items: vec!["s1".into()],
        },
    ));
    h.apply(orders.clone());
    assert_eq!(ended(&h, "x2"), "succeeded");
    let deleted = result(&h, "x2").deleted;
    assert!(
        deleted.iter().any(|d| d.contains("reverse-state")),
        "{deleted:?}"
    );
}

#[test]
fn a_built_disks_rounds_send_only_the_blocks_that_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let h = host(tmp.path());
    write_point(&h, "m1", "d0", "p1", 8);
    let home = home_file(tmp.path());
    let build = item(
        "b1",
        WorkOp::Build {
            disks: vec![DiskPoint {
                disk: "d0".into(),
                point: "p1".into(),
            }],
            format: "raw".into(),
        },
    );
    let mut orders = vec![sync("y1", &home), build];
    h.apply(orders.clone());
    assert_eq!(ended(&h, "y1"), "succeeded");
    assert_eq!(ended(&h, "b1"), "succeeded");
    let file = result(&h, "b1").disks[0].path.clone().unwrap();
    orders.push(reverse("r1", &file, false));
    h.apply(orders.clone());
    ferry_testkit::wait_for("a first round", Duration::from_secs(60), || {
        !result(&h, "r1").rounds.is_empty()
    });
    let first = result(&h, "r1").rounds[0].clone();
    assert_eq!(first.bytes_data, 0, "the built disk equals P: {first:?}");

    // Blocks 10 and 11 (one run) and block 100: 3 blocks.
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(&[0x42; 8192], 10 * 4096).unwrap();
    f.write_all_at(&[0x43; 1], 100 * 4096 + 9).unwrap();
    f.sync_all().unwrap();
    ferry_testkit::wait_for("a round with the change", Duration::from_secs(60), || {
        result(&h, "r1")
            .rounds
            .first()
            .is_some_and(|r| r.bytes_data > 0)
    });
    let changed = result(&h, "r1").rounds[0].clone();
    assert_eq!(changed.bytes_data, 3 * 4096, "{changed:?}");
    ferry_testkit::wait_for("an empty round after it", Duration::from_secs(60), || {
        result(&h, "r1")
            .rounds
            .first()
            .is_some_and(|r| r.point != changed.point && r.bytes_data == 0)
    });

    // The last round's final map verifies the home disk, built from the rounds.
    orders.push(reverse("r2", &file, true));
    h.apply(orders.clone());
    assert_eq!(ended(&h, "r2"), "succeeded", "{:?}", report(&h, "r2"));
    let last = result(&h, "r2").rounds;
    // From r1's map: the file did not change since its last round.
    assert_eq!(last[0].bytes_data, 0, "{last:?}");
    orders.push(apply(
        "a1",
        &home,
        vec![DiskPoint {
            disk: "d0".into(),
            point: last[0].point.clone(),
        }],
        true,
    ));
    h.apply(orders.clone());
    assert_eq!(ended(&h, "a1"), "succeeded", "{:?}", report(&h, "a1"));
    assert_eq!(result(&h, "a1").applied[0].verified, Some(true));
    assert_eq!(std::fs::read(&home).unwrap(), std::fs::read(&file).unwrap());
}

#[test]
fn an_apply_item_found_running_after_a_restart_resumes_from_its_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let h = keyed_host(tmp.path());
    write_point(&h, "m1", "d0", "p1", 4);
    let home = home_file(tmp.path());
    let orders = vec![
        sync("y1", &home),
        serve("s1"),
        reverse("r1", "item:s1", false),
        apply("a1", &home, Vec::new(), false),
    ];
    h.apply(orders[..2].to_vec());
    assert_eq!(ended(&h, "y1"), "succeeded");
    assert_eq!(ended(&h, "s1"), "succeeded");
    let g = gate(&h, "s1");
    g.write(4096, &[0x11; 4096], false).unwrap();
    h.apply(orders.clone());
    let served = || whole(&*gate(&h, "s1"));
    wait_equal("the first writes home", &home, &served);

    // The host dies with a1 running: its thread is stopped here, and its state
    // left as a kill -9 leaves it (running), with its marker at the last point.
    h.table().entries["a1"]
        .stop
        .store(true, std::sync::atomic::Ordering::SeqCst);
    ended(&h, "a1");
    let dir = h.dir("a1").unwrap();
    let mut running = report(&h, "a1");
    running.state = "running".into();
    files::save_report(&dir, &running).unwrap();
    g.write(40_960, &[0x22; 9000], false).unwrap();

    // The restarted host (its own table over the same items and store) resumes it.
    let again = keyed_host(tmp.path());
    assert_eq!(state(&again, "a1"), None, "a running apply waits to resume");
    again.apply(vec![orders[3].clone()]);
    wait_equal("the later writes home", &home, &served);
    // Only what the marker had not: the first write is not applied again.
    ferry_testkit::wait_for("a1's figures", Duration::from_secs(10), || {
        result(&again, "a1")
            .applied
            .first()
            .is_some_and(|a| a.total_bytes_written == 9000)
    });

    // A sync of the target rewrites it to P: its marker goes, and the next apply
    // applies every round again (onto P, not onto what the marker said).
    again.apply(vec![item(
        "x1",
        WorkOp::Remove {
            items: vec!["a1".into()],
        },
    )]);
    assert_eq!(ended(&again, "x1"), "succeeded");
    let markers = || {
        std::fs::read_dir(tmp.path().join("applied"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(markers(), 1, "a running apply's removal keeps its marker");
    again.apply(vec![serve("s1"), sync("y2", &home)]);
    assert_eq!(ended(&again, "y2"), "succeeded");
    assert_eq!(markers(), 0);
    again.apply(vec![serve("s1"), apply("a3", &home, Vec::new(), false)]);
    wait_equal("every round applied again", &home, &served);
    ferry_testkit::wait_for("a3's figures", Duration::from_secs(10), || {
        result(&again, "a3")
            .applied
            .first()
            .is_some_and(|a| a.total_bytes_written == 4096 + 9000)
    });
}

#[test]
fn a_frozen_disk_stays_frozen_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let h = keyed_host(tmp.path());
    write_point(&h, "m1", "d0", "p1", 2);
    let orders = vec![serve("s1"), reverse("r1", "item:s1", true)];
    h.apply(orders[..1].to_vec());
    assert_eq!(ended(&h, "s1"), "succeeded");
    gate(&h, "s1").write(8192, &[9; 4096], false).unwrap();
    h.apply(orders.clone());
    assert_eq!(ended(&h, "r1"), "succeeded", "{:?}", report(&h, "r1"));
    let first = result(&h, "r1").rounds;
    assert_eq!(first[0].bytes_data, 4096, "{first:?}");

    let again = keyed_host(tmp.path());
    again.apply(orders);
    ferry_testkit::wait_for("s1 served again", Duration::from_secs(30), || {
        again
            .table()
            .entries
            .get("s1")
            .is_some_and(|e| !e.served.is_empty())
    });
    let g = gate(&again, "s1");
    let e = g.write(0, &[1; 512], false).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ReadOnlyFilesystem);
    // Reads go on, with the writes made before the freeze.
    assert_eq!(whole(&*g)[8192..8192 + 4096], [9; 4096]);
    // The last item that ended is reported again as it ended, not run again.
    assert_eq!(result(&again, "r1").rounds, first);
    // A reverse item of a frozen machine (one the restart resumed) makes no round.
    again.apply(vec![serve("s1"), reverse("r0", "item:s1", false)]);
    assert_eq!(ended(&again, "r0"), "succeeded");
    assert!(result(&again, "r0").rounds.is_empty());
}

#[test]
fn an_apply_up_to_a_point_without_a_final_map_says_it_is_not_verified() {
    // Unplanned failback: the recovery site was lost before a last round.
    let tmp = tempfile::tempdir().unwrap();
    let h = host(tmp.path());
    write_point(&h, "m1", "d0", "p1", 2);
    let home = home_file(tmp.path());
    let mut orders = vec![sync("y1", &home), serve("s1")];
    h.apply(orders.clone());
    assert_eq!(ended(&h, "y1"), "succeeded");
    assert_eq!(ended(&h, "s1"), "succeeded");
    gate(&h, "s1").write(4096, &[3; 100], false).unwrap();
    orders.push(reverse("r1", "item:s1", false));
    h.apply(orders.clone());
    ferry_testkit::wait_for("a round", Duration::from_secs(30), || {
        !result(&h, "r1").rounds.is_empty()
    });
    let point = result(&h, "r1").rounds[0].point.clone();
    orders.push(apply(
        "a1",
        &home,
        vec![DiskPoint {
            disk: "d0".into(),
            point: point.clone(),
        }],
        true,
    ));
    h.apply(orders);
    assert_eq!(ended(&h, "a1"), "succeeded", "{:?}", report(&h, "a1"));
    let a = &result(&h, "a1").applied[0];
    assert_eq!(
        (a.point.as_str(), a.verified),
        (point.as_str(), Some(false))
    );
    assert_eq!(std::fs::read(&home).unwrap()[4096..4196], [3; 100]);
}
