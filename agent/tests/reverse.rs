//! Failback's reverse deltas: a 64 MiB disk seeded with a log after it up to point P
//! (and more log after P), P served with an overlay, 2 % of its blocks written
//! through the served disk (random 4-64 KiB writes and a few zero writes). Each
//! `send_delta` round sends only what was written since the last one, in at most
//! twice the changed bytes plus metadata; a home disk at P with 1 % of its blocks
//! changed (never replicated), synced to P by checksum and given the rounds by
//! `apply_deltas`, equals the served disk byte for byte. A round whose cursor was
//! lost after its commit (a crash) is sent again and applies to the same disk;
//! applying twice changes nothing; a reverse replica over another point is refused
//! naming both.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use ferry_agent::nbd::Device;
use ferry_agent::recover::reverse::{
    cursor_path, marker_path, open_served, SEGMENTS_PER_COMMIT, SEGMENT_DATA_BYTES,
};
use ferry_agent::recover::{
    apply_deltas, send_delta, sync_to_point, ApplyOptions, ApplyReport, DeltaReport, ServedDisk,
    SyncOptions,
};
use ferry_replica::Point;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The unit the served disk's writes are aligned to and counted in.
const UNIT: u64 = 4096;
/// Sealing overhead a round may add to its data: headers, record headers, the
/// commit record.
const METADATA: u64 = 64 << 10;
const REVERSE: &str = "m.reverse";

fn apply(env: &Env, over: &Point, target: &Path) -> Result<ApplyReport, String> {
    apply_deltas(
        &env.store,
        &env.vault,
        REVERSE,
        "d0",
        over,
        target,
        &ApplyOptions::default(),
    )
    .map_err(|e| e.to_string())
}

/// Writes through the served disk until `share` of the disk's bytes are touched:
/// random 4-64 KiB writes at 4 KiB offsets, every seventh a zero write. Applies
/// them to `model`; returns the 4 KiB units this round touched.
fn write_round(
    served: &ServedDisk,
    model: &mut [u8],
    rng: &mut StdRng,
    share: f64,
) -> BTreeSet<u64> {
    let mut touched = BTreeSet::new();
    let want = (SIZE as f64 * share / UNIT as f64) as usize;
    let mut n = 0;
    while touched.len() < want {
        let len = rng.gen_range(1..=16u64) * UNIT;
        let at = rng.gen_range(0..(SIZE - len) / UNIT) * UNIT;
        let range = at as usize..(at + len) as usize;
        if n % 7 == 6 {
            served.zero(at, len, false).unwrap();
            model[range].fill(0);
        } else {
            let data = random_bytes(rng, len);
            served.write(at, &data, false).unwrap();
            model[range].copy_from_slice(&data);
        }
        touched.extend(at / UNIT..(at + len) / UNIT);
        n += 1;
    }
    served.flush().unwrap();
    touched
}

fn read_all(served: &ServedDisk) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    served.read(0, &mut buf).unwrap();
    buf
}

fn home_equals(home: &Path, model: &[u8]) -> bool {
    std::fs::read(home).unwrap() == model
}

/// Checks what one round sent against the units written since the last one.
fn check_round(what: &str, r: &DeltaReport, touched: &BTreeSet<u64>) {
    let changed = touched.len() as u64 * UNIT;
    println!(
        "{what}: {} ranges, {} data + {} zero bytes for {changed} changed, {} bytes sent, point {}",
        r.ranges, r.bytes_data, r.bytes_zero, r.bytes_sent, r.point_id
    );
    assert_eq!(
        r.bytes_data + r.bytes_zero,
        changed,
        "{what}: exactly the ranges written since the last round"
    );
    assert!(r.bytes_zero > 0, "{what}: zero writes went as zero records");
    assert!(
        r.bytes_sent <= 2 * changed + METADATA,
        "{what}: sent {} > 2 x {changed} + metadata",
        r.bytes_sent
    );
    assert!(
        r.bytes_sent >= r.bytes_data,
        "{what}: random data does not shrink"
    );
}

#[test]
fn rounds_of_deltas_make_a_synced_home_disk_equal_the_served_one() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(16);
    let (at_p, p, p2) = seeded_disk(&env, &mut rng);
    let point = env.point(&p);

    // Failover: P served with an overlay, written at the recovery site.
    let overlay_dir = env.path("overlay");
    let cursors = env.path("cursors");
    let d = env.open("m", "d0");
    let state = env.store.block(d.load_state()).unwrap();
    let served = ServedDisk::open("d0", d, &state, &point, &overlay_dir, 4).unwrap();
    let mut model = at_p.clone();
    let first = write_round(&served, &mut model, &mut rng, 0.02);
    assert!(
        read_all(&served) == model,
        "the served disk holds the writes"
    );
    let send = || send_delta(&served, &env.store, &env.vault, REVERSE, &cursors).unwrap();
    let r1 = send();
    check_round("round 1", &r1, &first);

    // Home: the disk at P plus 1 % of its blocks written after P, never replicated.
    let home = env.path("home.img");
    let mut at_home = at_p.clone();
    for _ in 0..BLOCKS / 100 {
        let b = rng.gen_range(0..BLOCKS);
        let at = (b * BLOCK) as usize;
        at_home[at..at + BLOCK as usize].copy_from_slice(&random_bytes(&mut rng, BLOCK));
    }
    std::fs::write(&home, &at_home).unwrap();
    drop(at_home);
    let opts = SyncOptions::default();
    let s = sync_to_point(&env.store, &env.vault, "m", "d0", &p, &home, &opts, &|_| {}).unwrap();
    assert!(s.blocks_differing > 0);
    assert!(home_equals(&home, &at_p), "sync-point made home equal P");
    let a1 = apply(&env, &point, &home).unwrap();
    println!(
        "apply 1: {} points, {} records, {} written, {} fetched",
        a1.points, a1.records, a1.bytes_written, a1.bytes_fetched
    );
    assert_eq!(
        (a1.points, a1.applied.as_deref()),
        (1, Some(r1.point_id.as_str()))
    );
    assert_eq!(a1.bytes_written, r1.bytes_data + r1.bytes_zero);
    assert!(a1.bytes_fetched <= r1.bytes_sent + METADATA);
    assert!(home_equals(&home, &model), "home equals the served disk");

    // Round 2: only the new ranges go; applied on top, home follows.
    let second = write_round(&served, &mut model, &mut rng, 0.01);
    let r2 = send();
    check_round("round 2", &r2, &second);
    assert!(r2.cursor > r1.cursor);
    let a2 = apply(&env, &point, &home).unwrap();
    assert_eq!(
        (a2.points, a2.applied.as_deref()),
        (1, Some(r2.point_id.as_str()))
    );
    assert_eq!(a2.bytes_written, r2.bytes_data + r2.bytes_zero);
    assert!(
        home_equals(&home, &model),
        "home equals the served disk after round 2"
    );

    // A crash after round 3's commit, before its cursor was saved: the old cursor
    // is what a restart finds. The resend is a new point with the same ranges.
    let cursor_file = cursor_path(&cursors, "d0");
    let before = std::fs::read(&cursor_file).unwrap();
    let third = write_round(&served, &mut model, &mut rng, 0.01);
    let r3 = send();
    std::fs::write(&cursor_file, &before).unwrap();
    let r3b = send();
    check_round("round 3 again", &r3b, &third);
    assert_ne!(r3.point_id, r3b.point_id);
    assert_eq!(
        (r3b.ranges, r3b.bytes_data, r3b.cursor),
        (r3.ranges, r3.bytes_data, r3.cursor)
    );
    let a3 = apply(&env, &point, &home).unwrap();
    assert_eq!(
        (a3.points, a3.applied.as_deref()),
        (2, Some(r3b.point_id.as_str()))
    );
    assert!(
        home_equals(&home, &model),
        "home equals after the resent round"
    );

    // Nothing new: nothing applied. Applied twice (the marker lost): the same disk.
    let again = apply(&env, &point, &home).unwrap();
    assert_eq!((again.points, again.bytes_written), (0, 0));
    std::fs::remove_file(marker_path(&home, "d0", None).unwrap()).unwrap();
    let twice = apply(&env, &point, &home).unwrap();
    assert_eq!(twice.points, 4);
    assert!(
        home_equals(&home, &model),
        "applying every round again changes nothing"
    );

    // A round with no writes still makes a point (failback's final one), empty.
    let empty = send();
    assert_eq!((empty.ranges, empty.bytes_sent), (0, 0));
    let a4 = apply(&env, &point, &home).unwrap();
    assert_eq!((a4.points, a4.records), (1, 0));
    assert!(home_equals(&home, &model));

    // Over another point: refused, naming both, and the target untouched.
    let other = env.point(&p2);
    let e = apply(&env, &other, &home).unwrap_err();
    assert!(
        e.contains(&p) && e.contains(&p2) && e.contains(REVERSE),
        "{e}"
    );
    assert!(home_equals(&home, &model));

    // The same overlay reopened without serving (as `ferry reverse-send` does):
    // the journal and the cursor carry on where they were.
    drop(served);
    let reopened = open_served(&env.store, &env.vault, "m", "d0", &overlay_dir).unwrap();
    assert!(read_all(&reopened) == model);
    let fourth = write_round(&reopened, &mut model, &mut rng, 0.005);
    let r4 = send_delta(&reopened, &env.store, &env.vault, REVERSE, &cursors).unwrap();
    check_round("round 4, reopened", &r4, &fourth);
    apply(&env, &point, &home).unwrap();
    assert!(home_equals(&home, &model));

    // A disk served at another point (a later failover) cannot send into this
    // reverse replica: refused naming both points.
    let d = env.open("m", "d0");
    let state = env.store.block(d.load_state()).unwrap();
    let at_p2 = ServedDisk::open("d0", d, &state, &other, &env.path("overlay2"), 4).unwrap();
    let e = send_delta(
        &at_p2,
        &env.store,
        &env.vault,
        REVERSE,
        &env.path("cursors2"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(&p) && e.contains(&p2), "{e}");
}

/// A round larger than a few segments is sealed in several and committed in
/// several commits (memory stays bounded), the point only on the last; applied, the
/// home disk equals the served one.
#[test]
fn a_large_round_goes_in_several_segments_and_commits() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(61);
    let (at_p, p, _) = seeded_disk(&env, &mut rng);
    let point = env.point(&p);
    let d = env.open("m", "d0");
    let state = env.store.block(d.load_state()).unwrap();
    let served = ServedDisk::open("d0", d, &state, &point, &env.path("overlay"), 4).unwrap();
    let mut model = at_p.clone();
    let touched = write_round(&served, &mut model, &mut rng, 0.4);
    let r = send_delta(
        &served,
        &env.store,
        &env.vault,
        REVERSE,
        &env.path("cursors"),
    )
    .unwrap();
    check_round("large round", &r, &touched);
    let rd = env.open(REVERSE, "d0");
    let rstate = env.store.block(rd.load_state()).unwrap();
    let segments = rstate.segments.len() as u64;
    assert!(
        segments >= r.bytes_data / SEGMENT_DATA_BYTES,
        "{segments} segments"
    );
    assert!(rstate.segments.len() > SEGMENTS_PER_COMMIT);
    assert!(rstate.head.unwrap() >= 1, "more than one commit");
    assert_eq!(rstate.points.len(), 1);
    assert!(rstate.base.is_none(), "a reverse replica holds only log");

    // A new, empty home disk: synced to P first, then the deltas.
    let home = env.path("home.img");
    std::fs::File::create(&home).unwrap().set_len(SIZE).unwrap();
    let opts = SyncOptions::default();
    sync_to_point(&env.store, &env.vault, "m", "d0", &p, &home, &opts, &|_| {}).unwrap();
    let a = apply(&env, &point, &home).unwrap();
    assert_eq!(a.points, 1);
    assert!(home_equals(&home, &model));

    // The marker lives beside the file, or in the state directory asked for.
    let state_dir = env.path("state");
    let again = apply_deltas(
        &env.store,
        &env.vault,
        REVERSE,
        "d0",
        &point,
        &home,
        &ApplyOptions {
            up_to: Some(r.point_id.clone()),
            state_dir: Some(state_dir.clone()),
        },
    )
    .unwrap();
    assert_eq!(again.applied.as_deref(), Some(r.point_id.as_str()));
    assert!(state_dir.join("d0.reverse-applied.json").exists());
    assert!(home_equals(&home, &model));
    let e = apply_deltas(
        &env.store,
        &env.vault,
        REVERSE,
        "d0",
        &point,
        &home,
        &ApplyOptions {
            up_to: Some("nope".into()),
            state_dir: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no point nope") && e.contains(&r.point_id),
        "{e}"
    );

    // A marker saying the target holds deltas over another point (it was synced to
    // another one since): refused naming both, the target untouched.
    let marker = marker_path(&home, "d0", None).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&marker).unwrap()).unwrap();
    m["over"]["point"] = "20250101T000000000Z-00000000".into();
    std::fs::write(&marker, m.to_string()).unwrap();
    let e = apply(&env, &point, &home).unwrap_err();
    assert!(
        e.contains("20250101T000000000Z-00000000") && e.contains(&p) && e.contains("marker"),
        "{e}"
    );
    assert!(home_equals(&home, &model));
}
