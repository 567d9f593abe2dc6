//! Syncing a home disk to a point across the sites (`recover::sync_exchange`,
//! failback's reprotect): a disk whose every block was written through the log (so
//! making the point's map at home would fetch the whole disk), a home copy of the
//! point with some blocks overwritten, some zeroed, and data where the point has
//! zeros. Home hashes its disk, the recovery site compares and stores the differing
//! blocks, home writes them: the home disk equals the point byte for byte, and what
//! home fetched and put is the two maps and the differing blocks, never the log.
//! Objects of another point, a home disk changed between the steps and a small home
//! disk are refused or caught, naming what was wrong.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;

use common::*;
use ferry_agent::recover::sync::{MapSource, Phase, SyncProgress};
use ferry_agent::recover::sync_exchange::{home_map, point_diff, write_diff, At, Exchanged};
use ferry_agent::recover::SyncReport;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The disk's size here: every block written through the log.
const DISK: u64 = 16 * MIB;
const DISK_BLOCKS: u64 = DISK / BLOCK;
/// Disk info and commits read by a step, besides maps and data.
const METADATA: u64 = 64 << 10;

/// Disk "d1" written whole through its log, two blocks then zeroed, then point P;
/// then more writes after P. Returns the disk at P and P's id.
fn full_disk(env: &Env, rng: &mut StdRng) -> (Vec<u8>, String) {
    env.disk("d1");
    let mut model = vec![0u8; DISK as usize];
    let mut writes: Vec<(u64, Option<Vec<u8>>, u64)> = (0..DISK_BLOCKS)
        .map(|b| (b * BLOCK, Some(random_bytes(rng, BLOCK)), BLOCK))
        .collect();
    writes.push((5 * BLOCK, None, BLOCK));
    writes.push((200 * BLOCK, None, BLOCK));
    let p = append_point(env, "d1", &writes, &mut model);
    let mut after = model.clone();
    append_point(
        env,
        "d1",
        &[(9 * BLOCK, Some(random_bytes(rng, BLOCK)), BLOCK)],
        &mut after,
    );
    (model, p)
}

fn at<'a>(env: &'a Env, point: &'a str) -> At<'a> {
    At {
        store: &env.store,
        vault: &env.vault,
        machine: "m",
        disk: "d1",
        point,
    }
}

struct Steps {
    home: Exchanged,
    diff: Exchanged,
    sync: SyncReport,
    phases: Vec<Phase>,
}

fn run(env: &Env, p: &str, target: &Path) -> Result<Steps, String> {
    let seen = Mutex::new(Vec::new());
    let progress = |x: &SyncProgress| seen.lock().unwrap().push(x.phase);
    let e = |e: ferry_agent::recover::Error| e.to_string();
    let at = at(env, p);
    let home = home_map(&at, target, &progress).map_err(e)?;
    let scratch = tempfile::tempdir().unwrap();
    let diff = point_diff(&at, &home.map, scratch.path(), &progress).map_err(e)?;
    let sync = write_diff(&at, target, &diff.map, diff.segments, &progress).map_err(e)?;
    let mut phases = seen.into_inner().unwrap();
    phases.dedup();
    Ok(Steps {
        home,
        diff,
        sync,
        phases,
    })
}

/// Stored bytes of the log up to point `p`.
fn log_bytes(env: &Env, p: &str) -> u64 {
    let d = env.open("m", "d1");
    let state = env.store.block(d.load_state()).unwrap();
    let seq = state.point(p).unwrap().seq;
    state.segments_up_to(seq).map(|s| s.stored_bytes).sum()
}

#[test]
fn a_full_disk_syncs_across_the_sites_moving_maps_and_differing_blocks_only() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(1616);
    let (reference, p) = full_disk(&env, &mut rng);

    // Home: P, with 8 blocks overwritten, 3 zeroed, data where P is zero (block 5),
    // and 1 MiB past the disk that the sync leaves alone.
    let mut home = reference.clone();
    let mut overwritten = BTreeSet::new();
    while overwritten.len() < 8 {
        let b = rng.gen_range(0..DISK_BLOCKS);
        if ![5, 200].contains(&b) {
            overwritten.insert(b);
        }
    }
    for &b in &overwritten {
        let at = (b * BLOCK) as usize;
        home[at..at + BLOCK as usize].copy_from_slice(&random_bytes(&mut rng, BLOCK));
    }
    let zeroed: BTreeSet<u64> = [10u64, 11, 100]
        .into_iter()
        .filter(|b| !overwritten.contains(b))
        .collect();
    for &b in &zeroed {
        let at = (b * BLOCK) as usize;
        home[at..at + BLOCK as usize].fill(0);
    }
    home[(5 * BLOCK) as usize] = 7;
    let tail = vec![0x5au8; MIB as usize];
    let target = env.path("home.img");
    std::fs::write(&target, [&home[..], &tail[..]].concat()).unwrap();

    let s = run(&env, &p, &target).unwrap();
    let synced = std::fs::read(&target).unwrap();
    assert!(synced[..DISK as usize] == reference[..], "home equals P");
    assert_eq!(
        &synced[DISK as usize..],
        &tail[..],
        "past the disk: untouched"
    );
    let data_blocks = (overwritten.len() + zeroed.len()) as u64;
    assert_eq!(s.diff.blocks, DISK_BLOCKS);
    assert_eq!(s.diff.blocks_differing, data_blocks + 1);
    assert_eq!(s.diff.bytes_data, data_blocks * BLOCK);
    assert_eq!(s.diff.bytes_zero, BLOCK, "block 5 zeroed by a zero record");
    assert_eq!(s.sync.blocks_differing, data_blocks + 1);
    assert_eq!(s.sync.bytes_written, (data_blocks + 1) * BLOCK);
    assert_eq!(s.sync.identical, Some(true));
    assert!(matches!(s.sync.map_from, MapSource::Stored { ref object } if *object == s.diff.map));
    assert_eq!(
        s.phases,
        [
            Phase::Home,
            Phase::Map,
            Phase::Compare,
            Phase::Write,
            Phase::Verify
        ]
    );

    // What crossed the sites: home's map put, P's map and the blocks fetched.
    let map_bytes = 16 * DISK_BLOCKS + 1024;
    let home_side = s.home.bytes_fetched + s.home.bytes_stored + s.sync.bytes_fetched;
    println!(
        "across: home map {} put, {} fetched ({} data blocks, log {} at the recovery site)",
        s.home.bytes_stored,
        s.home.bytes_fetched + s.sync.bytes_fetched,
        data_blocks,
        log_bytes(&env, &p)
    );
    assert!(s.home.bytes_stored <= map_bytes, "{}", s.home.bytes_stored);
    let bound = data_blocks * BLOCK + 2 * map_bytes + 2 * METADATA;
    assert!(home_side <= bound, "{home_side} > {bound}");
    assert!(
        home_side < log_bytes(&env, &p) / 8,
        "{home_side}: the log came home"
    );
    // The recovery site read the log (beside the store), and put P's map and blocks.
    assert!(s.diff.bytes_fetched >= log_bytes(&env, &p));
    assert!(s.diff.bytes_stored <= data_blocks * BLOCK + map_bytes + METADATA);

    // Again: nothing differs, no segment, nothing written.
    let again = run(&env, &p, &target).unwrap();
    assert_eq!(again.diff.blocks_differing, 0);
    assert_eq!(again.diff.segments, 0);
    assert_eq!(again.sync.bytes_written, 0);
    assert_eq!(again.sync.identical, Some(true));
}

#[test]
fn an_empty_home_disk_gets_every_non_zero_block_of_the_point() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(61);
    let (reference, p) = full_disk(&env, &mut rng);
    let target = env.path("new.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let s = run(&env, &p, &target).unwrap();
    assert!(std::fs::read(&target).unwrap() == reference);
    assert_eq!(
        s.diff.blocks_differing,
        DISK_BLOCKS - 2,
        "zero blocks skipped"
    );
    assert_eq!(s.diff.bytes_zero, 0);
    // Several segments (4 MiB of data each), found by count from the point's map.
    assert!(s.diff.segments >= 4, "{}", s.diff.segments);
    assert_eq!(s.sync.identical, Some(true));
}

#[test]
fn another_points_objects_a_changed_home_disk_and_a_small_one_are_refused_or_caught() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(3);
    let (reference, p) = full_disk(&env, &mut rng);
    let target = env.path("home.img");
    std::fs::write(&target, &reference).unwrap();
    let none = |_: &SyncProgress| {};

    // A home map stored for P, given as one of another point.
    let home = home_map(&at(&env, &p), &target, &none).unwrap();
    let d = env.open("m", "d1");
    let state = env.store.block(d.load_state()).unwrap();
    let other = state.points.iter().find(|x| x.id != p).unwrap().id.clone();
    let scratch = tempfile::tempdir().unwrap();
    let e = point_diff(&at(&env, &other), &home.map, scratch.path(), &none)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&home.map) && e.contains(&format!("a sync to point {other}")),
        "{e}"
    );

    // The home map given as the point's (it would verify the disk against itself).
    let e = write_diff(&at(&env, &p), &target, &home.map, 0, &none)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&home.map) && e.contains("(point.sum)"), "{e}");

    // The home disk written between the steps: the read-back says so.
    let diff = point_diff(&at(&env, &p), &home.map, scratch.path(), &none).unwrap();
    assert_eq!(diff.blocks_differing, 0);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"late", 3 * BLOCK).unwrap();
    drop(f);
    let r = write_diff(&at(&env, &p), &target, &diff.map, diff.segments, &none).unwrap();
    assert_eq!(r.identical, Some(false));

    // A home disk smaller than the point, refused before anything is stored.
    let small = env.path("small.img");
    std::fs::File::create(&small).unwrap().set_len(MIB).unwrap();
    let e = home_map(&at(&env, &p), &small, &none)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(small.to_str().unwrap())
            && e.contains("1048576")
            && e.contains(&DISK.to_string()),
        "{e}"
    );
}
