//! The orphan grace holds on the writers' side: an upload whose commit would land after
//! compaction may have collected its objects is abandoned and redone under fresh names,
//! never committed. Driven with a 200 ms grace and a store whose put replies come late.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{Duration, Utc};
use common::*;
use ferry_replica::compact::{compact, CompactOptions};
use ferry_replica::disk::new_point_id;
use ferry_replica::fault::{FaultStore, SlowPuts};
use ferry_replica::object::SealContext;
use ferry_replica::writer::{append_writes, Payload, Write};
use ferry_replica::{Disk, DiskState, Error, Point, PointKind, Store, VaultKey};
use object_store::ObjectStore;
use rand::Rng;

const SIZE: u64 = 1 << 20;
const GRACE: StdDuration = StdDuration::from_millis(200);

fn point(seq: u64) -> Point {
    let time = Utc::now();
    Point {
        id: new_point_id(time),
        kind: PointKind::Crash,
        time,
        seq,
        disk_bytes: SIZE,
        label: None,
        group: None,
        sums: None,
    }
}

/// Stops the compactor when the writer's side ends, even by a panic (or the scope
/// would wait for it forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Every object the state references exists in the store.
fn assert_all_present(store: &Store, state: &DiskState, ctx: &str) {
    for o in state.referenced() {
        assert!(
            store.block(store.get_opt(&o)).unwrap().is_some(),
            "{ctx}: committed state references {o}, which compaction deleted"
        );
    }
}

#[test]
fn a_late_reply_makes_the_upload_redone_under_a_fresh_name() {
    let vault = VaultKey::generate();
    let inner: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let faulty = FaultStore::new(inner.clone());
    let store = Store::with_object_store(faulty.clone() as Arc<dyn ObjectStore>, "memory://");
    let disk = store
        .block(Disk::open_or_create(
            &store,
            "m",
            "d0",
            &vault,
            4096,
            256 << 10,
        ))
        .unwrap();
    let data = vec![0x5au8; 10_000];
    let writes = [Write {
        seq: 0,
        offset: 4096,
        payload: Payload::Data(&data),
    }];
    let p = point(0);
    *faulty.slow_puts.lock().unwrap() = Some(SlowPuts {
        under: disk.paths.log_dir(),
        count: 1,
        delay: GRACE,
    });
    let mut state = DiskState::default();
    let done = store
        .block(append_writes(
            &disk,
            &mut state,
            &mut SealContext::default(),
            &writes,
            vec![p.clone()],
            1,
            GRACE,
        ))
        .unwrap();
    assert_eq!(done.redone, 1);
    let late = faulty.slowed.lock().unwrap().clone();
    assert_eq!(late.len(), 1);
    let state = store.block(disk.load_state()).unwrap();
    assert_eq!(state.segments.len(), 1);
    assert_ne!(
        state.segments[0].object, late[0],
        "the late object was committed"
    );
    let mut model = vec![0u8; SIZE as usize];
    model[4096..4096 + data.len()].copy_from_slice(&data);
    assert!(rebuild_mem(&disk, &state, &p.id).unwrap() == model);

    // A store slower than the grace every time: given up after a bounded number of
    // attempts, nothing committed.
    *faulty.slow_puts.lock().unwrap() = Some(SlowPuts {
        under: disk.paths.log_dir(),
        count: u64::MAX,
        delay: GRACE,
    });
    let mut stale = state.clone();
    let e = store
        .block(append_writes(
            &disk,
            &mut stale,
            &mut SealContext::default(),
            &[Write {
                seq: 1,
                offset: 0,
                payload: Payload::Zero(4096),
            }],
            vec![],
            2,
            GRACE,
        ))
        .unwrap_err();
    assert!(matches!(e, Error::UploadExpired { .. }), "{e}");
    assert_eq!(store.block(disk.load_state()).unwrap(), state);
}

#[test]
fn an_upload_that_outlives_the_grace_is_redone_while_compaction_sweeps() {
    let vault = VaultKey::generate();
    let inner: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let clean = Store::with_object_store(inner.clone(), "memory://");
    let faulty = FaultStore::new(inner.clone());
    let slow = Store::with_object_store(faulty.clone() as Arc<dyn ObjectStore>, "memory://");
    clean
        .block(Disk::open_or_create(
            &clean,
            "m",
            "d0",
            &vault,
            4096,
            256 << 10,
        ))
        .unwrap();
    let writer = slow
        .block(Disk::open(&slow, "m", "d0", Some(&vault)))
        .unwrap();
    let log_dir = writer.paths.log_dir();

    // A compactor that runs over and over beside the writer, with the same short grace.
    let stop = AtomicBool::new(false);
    let compactions = AtomicUsize::new(0);
    let swept = AtomicUsize::new(0);
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = rng(7);
    let mut state = DiskState::default();
    let mut ctx = SealContext::default();
    let mut committed: BTreeSet<String> = BTreeSet::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            let disk = clean
                .block(Disk::open(&clean, "m", "d0", Some(&vault)))
                .unwrap();
            while !stop.load(Ordering::SeqCst) {
                let opts = CompactOptions {
                    keep: Duration::zero(),
                    now: Utc::now(),
                    orphan_grace: Duration::from_std(GRACE).unwrap(),
                };
                match compact(&disk, &opts) {
                    Ok(r) => {
                        compactions.fetch_add(1, Ordering::SeqCst);
                        swept.fetch_add(r.objects_deleted, Ordering::SeqCst);
                    }
                    // A writer appended first; the next round merges it.
                    Err(Error::Conflict { .. }) => {}
                    Err(e) => panic!("compaction failed: {e}"),
                }
                std::thread::sleep(StdDuration::from_millis(5));
            }
        });

        let _stop = StopOnDrop(&stop);
        let mut seq = 0u64;
        for batch in 0..12 {
            let owned: Vec<(u64, u64, Vec<u8>)> = (0..3)
                .map(|i| {
                    let len = rng.gen_range(512..20_000usize);
                    let off = rng.gen_range(0..SIZE as usize - len);
                    (seq + i, off as u64, payload(&mut rng, len))
                })
                .collect();
            for (_, off, data) in &owned {
                model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            let writes: Vec<Write<'_>> = owned
                .iter()
                .map(|(s, o, d)| Write {
                    seq: *s,
                    offset: *o,
                    payload: Payload::Data(d),
                })
                .collect();
            // The point takes the number after the writes, as a bookmark does.
            let p = point(seq + 3);
            seq += 4;
            // Every third batch: the segment's put lands at once, its reply twice the
            // grace later, so compaction sees an old unreferenced object meanwhile.
            let slowed = batch % 3 == 1;
            if slowed {
                *faulty.slow_puts.lock().unwrap() = Some(SlowPuts {
                    under: log_dir.clone(),
                    count: 1,
                    delay: GRACE * 2,
                });
            }
            loop {
                match slow.block(append_writes(
                    &writer,
                    &mut state,
                    &mut ctx,
                    &writes,
                    vec![p.clone()],
                    seq,
                    GRACE,
                )) {
                    Ok(_) => break,
                    // A compaction's checkpoint came first: read its state, redo.
                    Err(Error::Conflict { .. }) => {
                        state = slow.block(writer.load_state()).unwrap();
                    }
                    Err(e) => panic!("batch {batch}: {e}"),
                }
            }
            // The commit references only fresh objects: none whose reply came late.
            let late: Vec<String> = faulty.slowed.lock().unwrap().clone();
            let state_now = clean.block(writer.load_state()).unwrap();
            for seg in &state_now.segments {
                assert!(
                    !late.contains(&seg.object),
                    "batch {batch}: {} was committed after the grace",
                    seg.object
                );
                committed.insert(seg.object.clone());
            }
            assert_all_present(&clean, &state_now, &format!("batch {batch}"));
        }
        // Let the compactor run past the grace of the last orphans.
        std::thread::sleep(GRACE * 2);
    });
    assert_eq!(faulty.slowed.lock().unwrap().len(), 4, "four slowed puts");
    assert!(
        compactions.load(Ordering::SeqCst) > 3,
        "compaction ran beside the writer"
    );

    // One last sweep past the grace: every late object is gone, nothing committed is.
    std::thread::sleep(GRACE);
    let disk = clean
        .block(Disk::open(&clean, "m", "d0", Some(&vault)))
        .unwrap();
    let opts = CompactOptions {
        keep: Duration::zero(),
        now: Utc::now(),
        orphan_grace: Duration::from_std(GRACE).unwrap(),
    };
    compact(&disk, &opts).unwrap();
    let state = clean.block(disk.load_state()).unwrap();
    assert_all_present(&clean, &state, "end");
    for late in faulty.slowed.lock().unwrap().iter() {
        assert!(
            clean.block(clean.get_opt(late)).unwrap().is_none(),
            "the abandoned upload {late} was never swept"
        );
    }
    let latest = state.latest_point().unwrap().id.clone();
    assert!(
        rebuild_mem(&disk, &state, &latest).unwrap() == model,
        "the latest point does not rebuild byte-identical"
    );
}
