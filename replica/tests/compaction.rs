//! Compaction stopped at every single store operation, before and after the operation
//! takes effect: every point stays rebuildable, no retained point is lost, and a later
//! compaction finishes the job and leaves no orphan behind.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use common::*;
use ferry_replica::compact::{compact, CompactOptions};
use ferry_replica::fault::{Fault, FaultStore, Plan};
use ferry_replica::object::SealContext;
use ferry_replica::writer::{append, seal_segment, Payload, Write};
use ferry_replica::{Disk, DiskState, Point, PointKind, Store, VaultKey};
use object_store::ObjectStore;
use rand::Rng;

const SIZE: u64 = 1 << 20;

/// Six batches of writes, a point after each, an hour apart.
fn scenario(store: &Store, vault: &VaultKey, machine: &str) -> BTreeMap<String, Vec<u8>> {
    let disk = store
        .block(Disk::open_or_create(
            store,
            machine,
            "d0",
            vault,
            4096,
            128 << 10,
        ))
        .unwrap();
    let mut state = DiskState::default();
    let mut model = vec![0u8; SIZE as usize];
    let mut snaps = BTreeMap::new();
    let mut rng = rng(7);
    let mut ctx = SealContext::default();
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap();
    let mut seq = 0;
    for i in 0..6 {
        let mut owned = Vec::new();
        for _ in 0..4 {
            let len = rng.gen_range(1..100_000u64);
            let off = rng.gen_range(0..SIZE - len);
            let data = payload(&mut rng, len as usize);
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            owned.push((seq, off, data));
            seq += 1;
        }
        let zero_at = rng.gen_range(0..SIZE - 5000);
        model[zero_at as usize..zero_at as usize + 5000].fill(0);
        let mut writes: Vec<Write<'_>> = owned
            .iter()
            .map(|(s, o, d)| Write {
                seq: *s,
                offset: *o,
                payload: Payload::Data(d),
            })
            .collect();
        writes.push(Write {
            seq,
            offset: zero_at,
            payload: Payload::Zero(5000),
        });
        seq += 1;
        let sealed = seal_segment(&disk, &mut ctx, &writes).unwrap();
        let p = Point {
            id: format!("p{i}"),
            kind: PointKind::Crash,
            time: t0 + Duration::hours(i),
            seq: seq - 1,
            disk_bytes: SIZE,
            label: None,
            group: None,
            sums: None,
        };
        snaps.insert(p.id.clone(), model.clone());
        store
            .block(append(&disk, &mut state, vec![sealed], vec![p], seq))
            .unwrap();
    }
    snaps
}

fn verify(
    store: &Store,
    vault: &VaultKey,
    machine: &str,
    snaps: &BTreeMap<String, Vec<u8>>,
    ctx: &str,
) -> DiskState {
    let disk = store
        .block(Disk::open(store, machine, "d0", Some(vault)))
        .unwrap();
    let state = store
        .block(disk.load_state())
        .unwrap_or_else(|e| panic!("{ctx}: load: {e}"));
    // p3..p5 are inside the retention window and must never go.
    for id in ["p3", "p4", "p5"] {
        assert!(state.point(id).is_some(), "{ctx}: retained point {id} lost");
    }
    for p in &state.points {
        let got =
            rebuild_mem(&disk, &state, &p.id).unwrap_or_else(|e| panic!("{ctx}: {}: {e}", p.id));
        assert!(got == snaps[&p.id], "{ctx}: point {} differs", p.id);
    }
    state
}

#[test]
fn compaction_survives_a_stop_at_every_step() {
    let vault = VaultKey::generate();
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap();
    // Keep the last 2.5 hours: p3, p4, p5.
    let opts = CompactOptions {
        keep: Duration::minutes(150),
        now: t0 + Duration::hours(5),
        orphan_grace: Duration::zero(),
    };
    for fault in [
        Fault::CrashBefore,
        Fault::CrashAfter,
        Fault::FailBefore,
        Fault::FailAfter,
    ] {
        for at in 0.. {
            let inner: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
            let clean = Store::with_object_store(inner.clone(), "memory://");
            let snaps = scenario(&clean, &vault, "m");
            let faulty = FaultStore::new(inner.clone());
            let store =
                Store::with_object_store(faulty.clone() as Arc<dyn ObjectStore>, "memory://");
            let disk = clean
                .block(Disk::open(&store, "m", "d0", Some(&vault)))
                .unwrap();
            faulty.plan(Plan {
                at: faulty.ops() + at,
                fault,
                delay: std::time::Duration::ZERO,
            });
            let result = compact(&disk, &opts);
            let ctx = format!("{fault:?} at op {at}");
            if faulty.log.lock().unwrap().is_empty() {
                // The compaction finished before op `at`: every step has been covered.
                result.unwrap();
                verify(&clean, &vault, "m", &snaps, &ctx);
                assert!(at > 10, "a compaction takes more than ten operations");
                break;
            }
            verify(&clean, &vault, "m", &snaps, &ctx);
            // Run again without faults: it completes and leaves nothing unreferenced.
            let disk = clean
                .block(Disk::open(&clean, "m", "d0", Some(&vault)))
                .unwrap();
            compact(&disk, &opts).unwrap_or_else(|e| panic!("{ctx}: second compaction: {e}"));
            let state = verify(&clean, &vault, "m", &snaps, &ctx);
            assert_eq!(state.points.len(), 3, "{ctx}");
            let keep = state.referenced();
            for dir in ["log", "base", "sums"] {
                let listed = clean
                    .block(clean.list(&format!("{}/{dir}/", disk.paths.root())))
                    .unwrap();
                for l in listed {
                    assert!(keep.contains(&l.path), "{ctx}: orphan {} left", l.path);
                }
            }
        }
    }
}

/// Appends one write at `seq` and a point right after it.
fn append_one(disk: &Disk, state: &mut DiskState, seq: u64) -> ferry_replica::Result<()> {
    let data = vec![seq as u8 + 1; 4096];
    let writes = [Write {
        seq,
        offset: seq * 4096,
        payload: Payload::Data(&data),
    }];
    let sealed = seal_segment(disk, &mut SealContext::default(), &writes)?;
    let p = Point {
        id: format!("p{seq}"),
        kind: PointKind::Crash,
        time: Utc::now(),
        seq: seq + 1,
        disk_bytes: SIZE,
        label: None,
        group: None,
        sums: None,
    };
    disk.store
        .block(append(disk, state, vec![sealed], vec![p], seq + 2))
}

#[test]
fn a_stale_writer_cannot_retake_a_number_a_compaction_deleted() {
    let vault = VaultKey::generate();
    let store =
        Store::with_object_store(Arc::new(object_store::memory::InMemory::new()), "memory://");
    let disk = store
        .block(Disk::open_or_create(
            &store,
            "m",
            "d0",
            &vault,
            4096,
            128 << 10,
        ))
        .unwrap();
    let mut state = DiskState::default();
    append_one(&disk, &mut state, 0).unwrap();
    // A writer that read the state now (head 0) and stalls.
    let mut stale = state.clone();
    let opts = CompactOptions {
        keep: Duration::zero(),
        now: Utc::now(),
        orphan_grace: Duration::zero(),
    };
    // Checkpoint 1; then an append (2) and checkpoint 3, which deletes commits 1 and 2.
    compact(&disk, &opts).unwrap();
    let mut fresh = store.block(disk.load_state()).unwrap();
    append_one(&disk, &mut fresh, 2).unwrap();
    compact(&disk, &opts).unwrap();
    let before = store.block(disk.load_state()).unwrap();
    assert_eq!(before.head, Some(3));
    assert!(store
        .block(store.get_opt(&disk.paths.commit(1)))
        .unwrap()
        .is_none());

    // The stale writer's commit 1 can be created again, but it lies below checkpoint
    // 3 where no reader looks: it must be a conflict, not a silent success.
    let e = append_one(&disk, &mut stale, 2).unwrap_err();
    assert!(
        matches!(e, ferry_replica::Error::Conflict { .. }),
        "a shadowed commit was reported committed: {e:?}"
    );
    assert_eq!(store.block(disk.load_state()).unwrap(), before);
}

// A checkpoint replaces the whole state: it must carry the writer epoch forward, or
// the process server holding it would be fenced by compaction (or a fenced one let
// back in).
#[test]
fn compaction_carries_the_writer_epoch_forward() {
    let vault = VaultKey::generate();
    let store =
        Store::with_object_store(Arc::new(object_store::memory::InMemory::new()), "memory://");
    let mut disk = store
        .block(Disk::open_or_create(
            &store,
            "m",
            "d0",
            &vault,
            4096,
            128 << 10,
        ))
        .unwrap();
    let mut state = DiskState::default();
    let mut claim = disk.new_commit(&state, ferry_replica::meta::CommitKind::Append, 0);
    claim.epoch = 1;
    claim.writer = Some("ps-a".into());
    store.block(disk.commit(&mut state, claim)).unwrap();
    disk.set_writer(Some("ps-a".into()));
    append_one(&disk, &mut state, 0).unwrap();
    append_one(&disk, &mut state, 2).unwrap();
    let opts = CompactOptions {
        keep: Duration::zero(),
        now: Utc::now(),
        orphan_grace: Duration::zero(),
    };
    let report = compact(&disk, &opts).unwrap();
    assert!(report.base_seq.is_some(), "{report:?}");
    let mut after = store.block(disk.load_state()).unwrap();
    assert!(
        after.base.is_some() && after.held_by(1, Some("ps-a")),
        "{after:?}"
    );
    // The claimant goes on committing; another server in its epoch may not.
    append_one(&disk, &mut after, 4).unwrap();
    disk.set_writer(Some("ps-b".into()));
    let e = append_one(&disk, &mut after.clone(), 6).unwrap_err();
    assert!(e.to_string().contains("which ps-a holds"), "{e}");
}
