//! Syncing a disk to a recovery point by checksum (failback's master target): a
//! 64 MiB disk seeded (its checksum map made by the seed), a log after it and a point
//! P, then more log after P. A copy of the disk at P with 1 % of its blocks
//! overwritten and some zeroed gets exactly those blocks rewritten and equals P byte
//! for byte, fetching the log, the map and the base extents of the repaired blocks
//! only; an empty target gets every non-zero block; a disk with no map is hashed
//! whole; a small, locked or missing target, or an unknown point or disk, is refused
//! naming what was wrong.

mod common;

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use common::*;
use ferry_agent::recover::sync::{MapSource, Phase, SyncProgress};
use ferry_agent::recover::{sync_to_point, SyncOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A sync of disk `disk` of machine `m` onto `target`, with what it reported.
trait Syncing {
    fn sync(&self, disk: &str, point: &str, target: &Path, verify: bool) -> SyncResult;
}

impl Syncing for Env {
    fn sync(&self, disk: &str, point: &str, target: &Path, verify: bool) -> SyncResult {
        let seen = Mutex::new(Vec::new());
        let opts = SyncOptions {
            verify,
            work_dir: None,
        };
        let r = sync_to_point(
            &self.store,
            &self.vault,
            "m",
            disk,
            point,
            target,
            &opts,
            &|p: &SyncProgress| seen.lock().unwrap().push(*p),
        );
        SyncResult {
            report: r.map_err(|e| e.to_string()),
            progress: seen.into_inner().unwrap(),
        }
    }
}

struct SyncResult {
    report: Result<ferry_agent::recover::SyncReport, String>,
    progress: Vec<SyncProgress>,
}

fn random_block(rng: &mut StdRng) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    rng.fill(&mut b[..]);
    b
}

fn distinct_blocks(rng: &mut StdRng, n: usize, avoid: &BTreeSet<u64>) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    while out.len() < n {
        let b = rng.gen_range(0..BLOCKS);
        if !avoid.contains(&b) {
            out.insert(b);
        }
    }
    out
}

fn block_of(data: &[u8], b: u64) -> &[u8] {
    &data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]
}

/// A seeded disk "d0" (half its 256 KiB regions random data, the rest holes), a log
/// of whole blocks, zeroes and one sub-block write after it up to point P, and more
/// log after P. Returns the disk at P, P's id and the blocks P's log touched.
fn seeded_disk(env: &Env, rng: &mut StdRng) -> (Vec<u8>, String, BTreeSet<u64>) {
    let mut model = half_random(rng);
    let seeded = seed_image(env, "d0", &model);
    assert!(seeded.sums.is_some(), "the seed made a checksum map");

    // 2 % of the blocks written whole, two zeroed, one written in part.
    let mut touched = distinct_blocks(rng, (BLOCKS / 50) as usize, &BTreeSet::new());
    let mut writes: Vec<(u64, Option<Vec<u8>>, u64)> = touched
        .iter()
        .map(|b| (b * BLOCK, Some(random_block(rng)), BLOCK))
        .collect();
    for b in distinct_blocks(rng, 2, &touched) {
        writes.push((b * BLOCK, None, BLOCK));
        touched.insert(b);
    }
    let part = *distinct_blocks(rng, 1, &touched).first().unwrap();
    writes.push((part * BLOCK + 1000, Some(vec![0xa5; 3000]), 3000));
    touched.insert(part);
    let p = append_point(env, "d0", &writes, &mut model);

    // After P: never part of it.
    let mut after = model.clone();
    let later: Vec<(u64, Option<Vec<u8>>, u64)> = distinct_blocks(rng, 8, &BTreeSet::new())
        .iter()
        .map(|b| (b * BLOCK, Some(random_block(rng)), BLOCK))
        .collect();
    append_point(env, "d0", &later, &mut after);
    (model, p, touched)
}

/// Stored bytes of the log segments up to point `p`, the checksum map objects, and
/// the base extents holding `blocks`.
fn stored_figures(env: &Env, p: &str, blocks: &BTreeSet<u64>) -> (u64, u64, u64) {
    let d = env.open("m", "d0");
    let state = env.store.block(d.load_state()).unwrap();
    let point = state.point(p).unwrap();
    let log = state
        .segments_up_to(point.seq)
        .map(|s| s.stored_bytes)
        .sum();
    let maps: u64 = state
        .points
        .iter()
        .filter_map(|p| p.sums.as_ref())
        .map(|o| std::fs::metadata(env.store_dir.join(o)).unwrap().len())
        .sum();
    let extents: BTreeSet<u64> = blocks.iter().map(|b| b * BLOCK / EXTENT).collect();
    let base = state.base.as_ref().unwrap();
    let extent_bytes = base
        .extents
        .iter()
        .filter(|e| extents.contains(&e.index))
        .map(|e| e.stored_bytes)
        .sum();
    (log, maps, extent_bytes)
}

/// Metadata read besides the map and the data: the disk's info and its commits.
const METADATA: u64 = 64 << 10;

#[test]
fn a_damaged_disk_gets_exactly_its_differing_blocks_from_little_more_than_the_log() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(16);
    let (reference, p, logged) = seeded_disk(&env, &mut rng);

    // The disk at P, 1 % of its blocks overwritten, three non-zero ones zeroed, and
    // 1 MiB past the disk's end that the sync must leave alone.
    let mut damaged = reference.clone();
    let overwritten = distinct_blocks(&mut rng, (BLOCKS / 100) as usize, &BTreeSet::new());
    for &b in &overwritten {
        let at = (b * BLOCK) as usize;
        damaged[at..at + BLOCK as usize].copy_from_slice(&random_block(&mut rng));
    }
    let mut zeroed = BTreeSet::new();
    while zeroed.len() < 3 {
        let b = rng.gen_range(0..BLOCKS);
        if !overwritten.contains(&b) && block_of(&reference, b).iter().any(|x| *x != 0) {
            zeroed.insert(b);
        }
    }
    for &b in &zeroed {
        let at = (b * BLOCK) as usize;
        damaged[at..at + BLOCK as usize].fill(0);
    }
    let tail = vec![0x5au8; MIB as usize];
    let target = env.path("home.img");
    std::fs::write(&target, [&damaged[..], &tail[..]].concat()).unwrap();
    let changed: BTreeSet<u64> = overwritten.union(&zeroed).copied().collect();

    let run = env.sync("d0", &p, &target, true);
    let r = run.report.unwrap();
    let (log_bytes, map_bytes, extent_bytes) = stored_figures(&env, &p, &changed);
    println!(
        "sync: {} blocks, {} differed, {} written, {} fetched (log {log_bytes}, maps \
         {map_bytes}, extents of the repaired blocks {extent_bytes}), {}, {:.3} s",
        r.blocks, r.blocks_differing, r.bytes_written, r.bytes_fetched, r.map_from, r.seconds
    );
    let synced = std::fs::read(&target).unwrap();
    assert!(
        synced[..SIZE as usize] == reference[..],
        "the target equals P"
    );
    assert_eq!(
        &synced[SIZE as usize..],
        &tail[..],
        "past the disk: untouched"
    );
    assert_eq!(r.blocks, BLOCKS);
    assert_eq!(r.blocks_differing, changed.len() as u64);
    assert_eq!(r.bytes_written, changed.len() as u64 * BLOCK);
    assert_eq!(r.identical, Some(true));
    assert_eq!(r.point, p);
    match &r.map_from {
        MapSource::Seed { log_blocks, .. } => assert_eq!(*log_blocks, logged.len() as u64),
        other => panic!("made from {other:?}, not the seed's map"),
    }
    assert_eq!(
        r.map_from.to_string(),
        format!("seed map + {} log blocks", logged.len())
    );
    // The log (once), the map, and the base extents of what was repaired or is only
    // partly in the log: never the disk.
    let partly = stored_figures(&env, &p, &logged).2;
    let bound = 2 * (log_bytes + extent_bytes + partly) + map_bytes + METADATA;
    assert!(
        r.bytes_fetched <= bound,
        "fetched {} > bound {bound}",
        r.bytes_fetched
    );
    assert!(r.bytes_fetched < SIZE / 4, "fetched {}", r.bytes_fetched);

    // Progress: each pass reaches the disk's size, never going back.
    for phase in [Phase::Compare, Phase::Verify] {
        let seen: Vec<u64> = run
            .progress
            .iter()
            .filter(|p| p.phase == phase)
            .map(|p| p.done_bytes)
            .collect();
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{phase:?}");
        assert_eq!(seen.last(), Some(&SIZE), "{phase:?}");
    }

    // Again: nothing differs, nothing is written, no base extent is fetched.
    let again = env.sync("d0", &p, &target, false).report.unwrap();
    println!("again: {} fetched", again.bytes_fetched);
    assert_eq!((again.blocks_differing, again.bytes_written), (0, 0));
    assert_eq!(again.identical, None);
    let logged_partly = stored_figures(&env, &p, &logged).2;
    assert!(again.bytes_fetched <= log_bytes + logged_partly + map_bytes + METADATA);

    // qemu-img agrees (the disk's bytes of the target against the reference).
    let reference_img = env.path("reference.img");
    std::fs::write(&reference_img, &reference).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&target)
        .arg(&reference_img)
        .output();
    if let Ok(out) = out {
        assert!(out.status.success(), "{out:?}");
    }
}

#[test]
fn an_empty_target_gets_every_non_zero_block_of_the_point() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(61);
    let (reference, p, _) = seeded_disk(&env, &mut rng);
    let target = env.path("new.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let r = env.sync("d0", &p, &target, true).report.unwrap();
    let non_zero = (0..BLOCKS)
        .filter(|b| block_of(&reference, *b).iter().any(|x| *x != 0))
        .count() as u64;
    assert!(std::fs::read(&target).unwrap() == reference);
    assert_eq!(r.blocks_differing, non_zero);
    assert_eq!(r.bytes_written, non_zero * BLOCK);
    assert_eq!(r.identical, Some(true));
}

/// A disk written only through its log (never seeded) has no checksum map: every
/// block it wrote is read and hashed, the holes are not.
#[test]
fn a_disk_without_a_map_is_hashed_whole_holes_skipped() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(7);
    env.disk("d1");
    let mut model = vec![0u8; (4 * MIB) as usize];
    let writes: Vec<(u64, Option<Vec<u8>>, u64)> = [3u64, 4, 40, 41, 63]
        .iter()
        .map(|b| (b * BLOCK, Some(random_block(&mut rng)), BLOCK))
        .collect();
    let p = append_point(&env, "d1", &writes, &mut model);
    let target = env.path("d1.img");
    let mut start = vec![0u8; model.len()];
    start[(41 * BLOCK) as usize..(42 * BLOCK) as usize].copy_from_slice(block_of(&model, 41));
    start[7] = 1;
    std::fs::write(&target, &start).unwrap();
    let r = env.sync("d1", &p, &target, true).report.unwrap();
    assert_eq!(
        r.map_from,
        MapSource::Whole {
            blocks_hashed: writes.len() as u64
        }
    );
    assert_eq!(r.map_from.to_string(), "hashed whole");
    assert!(std::fs::read(&target).unwrap() == model);
    // 3, 4, 40, 63 written; 41 was right; block 0's stray byte zeroed.
    assert_eq!(r.blocks_differing, 5);
    assert_eq!(r.identical, Some(true));
}

#[test]
fn a_wrong_target_point_or_disk_is_refused_naming_it() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(3);
    env.disk("d1");
    let mut model = vec![0u8; (2 * MIB) as usize];
    let p = append_point(
        &env,
        "d1",
        &[(0, Some(random_block(&mut rng)), BLOCK)],
        &mut model,
    );

    let small = env.path("small.img");
    std::fs::File::create(&small).unwrap().set_len(MIB).unwrap();
    let e = env.sync("d1", &p, &small, false).report.unwrap_err();
    assert!(
        e.contains(small.to_str().unwrap()) && e.contains("1048576") && e.contains("2097152"),
        "{e}"
    );

    let held = env.path("held.img");
    let f = std::fs::File::create(&held).unwrap();
    f.set_len(2 * MIB).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let e = env.sync("d1", &p, &held, false).report.unwrap_err();
    assert!(
        e.contains(held.to_str().unwrap()) && e.contains("in use"),
        "{e}"
    );
    drop(f);
    // A byte-range lock as QEMU takes on an image it runs (a shared lock on a few
    // bytes, on an open file description): in use too.
    let f = std::fs::File::open(&held).unwrap();
    let lock = libc::flock {
        l_type: libc::F_RDLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 100,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: an OFD lock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &lock) },
        0
    );
    let e = env.sync("d1", &p, &held, false).report.unwrap_err();
    assert!(e.contains("in use") && e.contains("byte-range"), "{e}");
    drop(f);
    // Released: the same target syncs.
    let r = env.sync("d1", &p, &held, true).report.unwrap();
    assert_eq!(r.identical, Some(true));
    let mut first = vec![0u8; BLOCK as usize];
    std::fs::File::open(&held)
        .unwrap()
        .read_exact_at(&mut first, 0)
        .unwrap();
    assert!(first == block_of(&model, 0));

    let missing = env.path("missing.img");
    let e = env.sync("d1", &p, &missing, false).report.unwrap_err();
    assert!(e.contains(missing.to_str().unwrap()), "{e}");

    let e = env.sync("d1", "nope", &held, false).report.unwrap_err();
    assert!(e.contains("no point nope") && e.contains(&p), "{e}");
    let e = env.sync("ghost", &p, &held, false).report.unwrap_err();
    assert!(e.contains("no disk ghost of machine m"), "{e}");

    // The store gone (its directory removed): the disk cannot be found in it.
    std::fs::remove_dir_all(&env.store_dir).unwrap();
    let e = env.sync("d1", &p, &held, false).report.unwrap_err();
    assert!(
        e.contains("d1") && e.contains(&env.store_dir.display().to_string()),
        "{e}"
    );
}
