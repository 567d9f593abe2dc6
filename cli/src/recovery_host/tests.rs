//! The host's table without a control plane: the bounds on builds and scripts at
//! once, the order and budget of reports, and what a restart makes of items that
//! were running.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_agent::nbd::Exports;
use ferry_link::control::wire::{DiskPoint, WorkItem, WorkOp, WorkReport, WorkResult};
use ferry_replica::{Store, VaultKey};

use super::*;

pub(super) fn host(dir: &std::path::Path) -> Arc<Host> {
    let store_dir = dir.join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    Host::open(
        dir.join("items"),
        Store::open(&format!("file://{}", store_dir.display())).unwrap(),
        VaultKey::generate(),
        "127.0.0.1:10809".into(),
        Arc::new(Exports::default()),
        4,
    )
    .unwrap()
}

fn script(id: &str, command: &str) -> WorkItem {
    WorkItem {
        id: id.into(),
        machine: "m1".into(),
        op: WorkOp::Script {
            command: command.into(),
            timeout_s: 30,
            env: BTreeMap::new(),
        },
    }
}

pub(super) fn state(h: &Host, id: &str) -> Option<String> {
    h.table()
        .entries
        .get(id)
        .and_then(|e| e.report.as_ref())
        .map(|r| r.state.clone())
}

fn count(h: &Host, ids: &[WorkItem], want: &str) -> usize {
    ids.iter()
        .filter(|i| state(h, &i.id).as_deref() == Some(want))
        .count()
}

#[test]
fn at_most_four_scripts_run_at_once_and_the_rest_wait_their_turn() {
    let tmp = tempfile::tempdir().unwrap();
    let h = host(tmp.path());
    let items: Vec<WorkItem> = (0..6)
        .map(|i| script(&format!("j-{i}-m1"), "sleep 1"))
        .collect();
    h.apply(items.clone());
    assert_eq!(count(&h, &items, "running"), MAX_SCRIPTS);
    assert_eq!(
        items.iter().filter(|i| state(&h, &i.id).is_none()).count(),
        2
    );
    // The same orders again start nothing twice.
    h.apply(items.clone());
    assert_eq!(count(&h, &items, "running"), MAX_SCRIPTS);
    ferry_testkit::wait_for("the first four", Duration::from_secs(10), || {
        count(&h, &items, "succeeded") == MAX_SCRIPTS
    });
    h.apply(items.clone());
    ferry_testkit::wait_for("all six", Duration::from_secs(10), || {
        count(&h, &items, "succeeded") == 6
    });
}

#[test]
fn at_most_two_builds_run_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let h = host(tmp.path());
    // Builds of a machine the store lacks: each fails at once once started, so the
    // bound shows in how many ever ran before the next orders.
    let items: Vec<WorkItem> = (0..3)
        .map(|i| WorkItem {
            id: format!("j-{i}-m1"),
            machine: "m1".into(),
            op: WorkOp::Build {
                disks: vec![DiskPoint {
                    disk: "sda".into(),
                    point: "p1".into(),
                }],
                format: "raw".into(),
            },
        })
        .collect();
    h.apply(items.clone());
    let started = items.iter().filter(|i| state(&h, &i.id).is_some()).count();
    assert_eq!(started, MAX_BUILDS);
    ferry_testkit::wait_for("two failed", Duration::from_secs(10), || {
        count(&h, &items, "failed") == MAX_BUILDS
    });
    let r = h.table().entries["j-0-m1"].report.clone().unwrap();
    assert!(
        r.error.unwrap().contains("m1"),
        "the error names the machine"
    );
    h.apply(items.clone());
    ferry_testkit::wait_for("the third", Duration::from_secs(10), || {
        count(&h, &items, "failed") == 3
    });
}

#[test]
fn changed_reports_go_first_and_what_does_not_fit_waits_unacknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let h = host(tmp.path());
    let items: Vec<WorkItem> = (0..3)
        .map(|i| script(&format!("j-{i}-m1"), "exit 0"))
        .collect();
    h.apply(items.clone());
    ferry_testkit::wait_for("three ended", Duration::from_secs(10), || {
        count(&h, &items, "succeeded") == 3
    });
    let (all, sent) = h.reports(1 << 20);
    assert_eq!(all.len(), 3);
    h.acked(&sent);
    // One changes: it comes first.
    h.progress("j-2-m1", 0.5, 1.0, Vec::new());
    let (first, _) = h.reports(1 << 20);
    assert_eq!(first[0].id, "j-2-m1");
    assert_eq!(first.len(), 3);
    // Room for one report: the changed one, acknowledged once answered.
    let one = serde_json::to_vec(&first[0]).unwrap().len();
    let (cut, sent) = h.reports(one);
    assert_eq!(cut.len(), 1);
    assert_eq!(cut[0].id, "j-2-m1");
    h.acked(&sent);
    h.progress("j-0-m1", 0.5, 1.0, Vec::new());
    h.progress("j-1-m1", 0.5, 1.0, Vec::new());
    // Two changed, room for one: the one left out goes first next time.
    let (cut, sent) = h.reports(one);
    assert_eq!(cut.len(), 1);
    h.acked(&sent);
    let (next, sent) = h.reports(one);
    assert_eq!(next.len(), 1);
    assert_ne!(next[0].id, cut[0].id, "the change left out comes next");
    // A heartbeat that got no answer acknowledges nothing: the same again.
    let (again, _) = h.reports(one);
    assert_eq!(again[0].id, next[0].id);
    h.acked(&sent);
}

#[test]
fn a_restart_runs_a_half_done_build_again_and_kills_a_running_script() {
    let tmp = tempfile::tempdir().unwrap();
    let items = tmp.path().join("items");
    let running = |id: &str, pid: Option<u32>| WorkReport {
        id: id.into(),
        state: "running".into(),
        progress: 0.4,
        bytes_per_s: 1.0,
        error: None,
        result: pid.map(|p| WorkResult {
            pid: Some(p),
            ..WorkResult::default()
        }),
        disks: Vec::new(),
    };
    let build = WorkItem {
        id: "j-0-m1".into(),
        machine: "m1".into(),
        op: WorkOp::Build {
            disks: vec![],
            format: "raw".into(),
        },
    };
    let dir = files::item_dir(&items, &build.id).unwrap();
    files::save_item(&dir, &build).unwrap();
    files::save_report(&dir, &running(&build.id, None)).unwrap();
    // A script the dead host had started, still running in its own group.
    let s = script("j-1-m1", "sleep 600");
    let sdir = files::item_dir(&items, &s.id).unwrap();
    files::save_item(&sdir, &s).unwrap();
    let mut child =
        procs::spawn("exec sleep 600", &BTreeMap::new(), &sdir.join("output.log")).unwrap();
    let pgid = child.id();
    let reaper = std::thread::spawn(move || child.wait());
    files::save_report(&sdir, &running(&s.id, Some(pgid))).unwrap();

    let h = host(tmp.path());
    assert_eq!(state(&h, &build.id), None, "the build waits to start over");
    assert_eq!(state(&h, &s.id).as_deref(), Some("failed"));
    reaper.join().unwrap().unwrap();
    assert!(!procs::group_alive(pgid as i32));
    let on_disk = files::load_all(&items).unwrap();
    let saved = on_disk.iter().find(|(i, _)| i.id == s.id).unwrap();
    assert_eq!(saved.1.as_ref().unwrap().state, "failed");
    // Everything found is reported at the first heartbeat once ordered.
    h.apply(vec![s.clone()]);
    let (reports, _) = h.reports(1 << 20);
    assert_eq!(reports.len(), 1);
    assert!(reports[0].error.as_ref().unwrap().contains("restarted"));
}

#[test]
fn an_item_removed_stays_removed_while_the_orders_still_list_it() {
    let tmp = tempfile::tempdir().unwrap();
    let h = host(tmp.path());
    let x = script("j-0-m1", "echo hi");
    h.apply(vec![x.clone()]);
    ferry_testkit::wait_for("x ended", Duration::from_secs(10), || {
        state(&h, &x.id).as_deref() == Some("succeeded")
    });
    let r = WorkItem {
        id: "j-1-m1".into(),
        machine: "m1".into(),
        op: WorkOp::Remove {
            items: vec![x.id.clone()],
        },
    };
    let orders = vec![x.clone(), r.clone()];
    h.apply(orders.clone());
    ferry_testkit::wait_for("r ended", Duration::from_secs(10), || {
        state(&h, &r.id).as_deref() == Some("succeeded")
    });
    let deleted = h.table().entries[&r.id]
        .report
        .as_ref()
        .unwrap()
        .result
        .clone()
        .unwrap()
        .deleted;
    let x_dir = files::item_dir(&h.items, &x.id).unwrap();
    assert!(
        deleted.contains(&format!("file {}", x_dir.join("output.log").display())),
        "{deleted:?}"
    );
    assert!(!x_dir.exists());
    // The control plane has not marked it removed yet: still ordered, never back.
    h.apply(orders.clone());
    assert!(!x_dir.exists());
    assert_eq!(state(&h, &x.id), None);
    let (reports, _) = h.reports(1 << 20);
    assert_eq!(reports.len(), 1, "only the remove is reported");

    // A remove naming itself fails instead of waiting on itself.
    let selfish = WorkItem {
        id: "j-2-m1".into(),
        machine: "m1".into(),
        op: WorkOp::Remove {
            items: vec!["j-2-m1".into()],
        },
    };
    h.apply(vec![selfish.clone()]);
    ferry_testkit::wait_for("selfish ended", Duration::from_secs(10), || {
        state(&h, &selfish.id).as_deref() == Some("failed")
    });
    // Once out of the orders, ended scripts and removes are forgotten with their folder.
    h.apply(Vec::new());
    for id in [&r.id, &selfish.id] {
        assert!(!files::item_dir(&h.items, id).unwrap().exists(), "{id}");
    }
}

/// Writes point `id` of `machine/disk`: `blocks` blocks of data at `seq`, as a
/// process server's upload would.
pub(super) fn write_point(h: &Host, machine: &str, disk: &str, id: &str, blocks: u64) {
    use ferry_replica::object::SealContext;
    use ferry_replica::writer::{append_writes, Payload, Write};
    use ferry_replica::{Disk, Point, PointKind};
    let d = h
        .store
        .block(Disk::open_or_create(
            &h.store,
            machine,
            disk,
            &h.vault,
            4096,
            256 << 10,
        ))
        .unwrap();
    let mut st = h.store.block(d.load_state()).unwrap();
    // Not compressible to nothing: each block differs.
    let data: Vec<Vec<u8>> = (0..blocks)
        .map(|b| (0..4096).map(|i| (i * 7 + b as usize * 13) as u8).collect())
        .collect();
    let writes: Vec<Write> = data
        .iter()
        .enumerate()
        .map(|(b, data)| Write {
            seq: 1,
            offset: 4096 * b as u64,
            payload: Payload::Data(data),
        })
        .collect();
    let p = Point {
        id: id.to_string(),
        kind: PointKind::Crash,
        time: chrono::Utc::now(),
        seq: 1,
        disk_bytes: 1 << 20,
        label: None,
        group: None,
        sums: None,
    };
    h.store
        .block(append_writes(
            &d,
            &mut st,
            &mut SealContext::default(),
            &writes,
            vec![p],
            2,
            ferry_replica::grace::ORPHAN_GRACE,
        ))
        .unwrap();
}

#[test]
fn a_build_of_two_disks_reports_each_disk_done_with_its_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let h = host(tmp.path());
    write_point(&h, "m1", "d0", "p1", 4);
    write_point(&h, "m1", "d1", "p1", 16);
    let item = WorkItem {
        id: "j-0-m1".into(),
        machine: "m1".into(),
        op: WorkOp::Build {
            disks: ["d0", "d1"]
                .map(|d| DiskPoint {
                    disk: d.into(),
                    point: "p1".into(),
                })
                .to_vec(),
            format: "raw".into(),
        },
    };
    h.apply(vec![item.clone()]);
    ferry_testkit::wait_for("the build", Duration::from_secs(30), || {
        state(&h, &item.id).as_deref() == Some("succeeded")
    });
    let (reports, _) = h.reports(1 << 20);
    let r = &reports[0];
    assert_eq!(r.progress, 1.0);
    let names: Vec<&str> = r.disks.iter().map(|d| d.disk.as_str()).collect();
    assert_eq!(names, ["d0", "d1"]);
    for d in &r.disks {
        assert_eq!(d.progress, 1.0, "{d:?}");
        assert!(d.bytes > 0, "{d:?}");
        assert_eq!(d.bytes_done, d.bytes, "{d:?}");
        assert!(d.bytes_per_s > 0.0, "{d:?}");
    }
    assert!(
        r.disks[1].bytes > r.disks[0].bytes,
        "each disk its own bytes: {:?}",
        r.disks
    );
}

#[test]
fn a_served_item_reports_each_disk_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let h = host(tmp.path());
    write_point(&h, "m1", "d0", "p1", 1);
    write_point(&h, "m1", "d1", "p1", 1);
    let item = WorkItem {
        id: "j-0-m1".into(),
        machine: "m1".into(),
        op: WorkOp::Serve {
            disks: ["d0", "d1"]
                .map(|d| DiskPoint {
                    disk: d.into(),
                    point: "p1".into(),
                })
                .to_vec(),
        },
    };
    h.apply(vec![item.clone()]);
    ferry_testkit::wait_for("served", Duration::from_secs(30), || {
        state(&h, &item.id).as_deref() == Some("succeeded")
    });
    let (reports, _) = h.reports(1 << 20);
    let d = &reports[0].disks;
    assert_eq!(d.len(), 2);
    assert!(
        d.iter()
            .all(|d| d.progress == 1.0 && d.bytes == 1 << 20 && d.bytes_done == d.bytes),
        "{d:?}"
    );
}

fn sync_item(id: &str, target: &std::path::Path) -> WorkItem {
    WorkItem {
        id: id.into(),
        machine: "m1".into(),
        op: WorkOp::Sync {
            disks: vec![ferry_link::control::wire::SyncDisk {
                disk: "sda".into(),
                point: "p1".into(),
                target: target.display().to_string(),
                from: None,
            }],
        },
    }
}

#[test]
fn a_remove_of_a_sync_item_never_deletes_its_target() {
    let tmp = tempfile::tempdir().unwrap();
    let h = host(tmp.path());
    let home = tmp.path().join("home-sda.raw");
    std::fs::write(&home, vec![7u8; 8192]).unwrap();
    // A sync of a machine the store lacks: it fails once started, its target untouched.
    let s = sync_item("j-0-m1", &home);
    h.apply(vec![s.clone()]);
    ferry_testkit::wait_for("the sync ended", Duration::from_secs(10), || {
        state(&h, &s.id).as_deref() == Some("failed")
    });
    let r = h.table().entries[&s.id].report.clone().unwrap();
    assert!(
        r.error.unwrap().contains("m1"),
        "the error names the machine"
    );
    let rm = WorkItem {
        id: "j-1-m1".into(),
        machine: "m1".into(),
        op: WorkOp::Remove {
            items: vec![s.id.clone()],
        },
    };
    h.apply(vec![s.clone(), rm.clone()]);
    ferry_testkit::wait_for("the remove ended", Duration::from_secs(10), || {
        state(&h, &rm.id).as_deref() == Some("succeeded")
    });
    let deleted = h.table().entries[&rm.id]
        .report
        .as_ref()
        .and_then(|r| r.result.clone())
        .unwrap()
        .deleted;
    assert!(
        !deleted.iter().any(|d| d.contains("home-sda")),
        "{deleted:?}"
    );
    assert!(!files::item_dir(&h.items, &s.id).unwrap().exists());
    assert_eq!(std::fs::read(&home).unwrap(), vec![7u8; 8192]);

    // A target the host's items folder holds (which a remove deletes) is refused.
    let inside = h.items.join("j-2-m1").join("sda.raw");
    let bad = sync_item("j-2-m1", &inside);
    h.apply(vec![bad.clone()]);
    ferry_testkit::wait_for("refused", Duration::from_secs(10), || {
        state(&h, &bad.id).as_deref() == Some("failed")
    });
    let r = h.table().entries[&bad.id].report.clone().unwrap();
    assert!(r
        .error
        .unwrap()
        .contains("inside the recovery host's items folder"));
}

#[test]
fn syncs_share_the_bound_on_builds() {
    let tmp = tempfile::tempdir().unwrap();
    let h = host(tmp.path());
    let home = tmp.path().join("home.raw");
    std::fs::write(&home, [0u8; 4096]).unwrap();
    // A build, then two syncs: the build and one sync run, the other sync waits.
    let mut items = vec![WorkItem {
        id: "j-0-m1".into(),
        machine: "m1".into(),
        op: WorkOp::Build {
            disks: vec![DiskPoint {
                disk: "sda".into(),
                point: "p1".into(),
            }],
            format: "raw".into(),
        },
    }];
    items.extend((1..3).map(|i| sync_item(&format!("j-{i}-m1"), &home)));
    h.apply(items.clone());
    assert_eq!(state(&h, "j-2-m1"), None, "the second sync waits its turn");
    let started = items.iter().filter(|i| state(&h, &i.id).is_some()).count();
    assert_eq!(started, MAX_BUILDS);
    ferry_testkit::wait_for("two failed", Duration::from_secs(10), || {
        count(&h, &items, "failed") == MAX_BUILDS
    });
    h.apply(items.clone());
    ferry_testkit::wait_for("the third", Duration::from_secs(10), || {
        count(&h, &items, "failed") == 3
    });
}
