//! Failback's reverse rounds of a built file (`reverse_map::send_file_delta`) across a
//! kill between a round's commit and its map's save: the next round takes the new map
//! (the pending one, whose point is committed), so a block changed in the lost round
//! and changed back since is sent again, and the home disk given the rounds equals
//! the file. A pending map whose point never committed is dropped.

mod common;

use std::path::Path;

use common::*;
use ferry_agent::recover::reverse_map::{map_path, pending_map_path, send_file_delta};
use ferry_agent::recover::{apply_deltas, ApplyOptions, DeltaReport};
use ferry_replica::scan::block_sum;
use ferry_replica::sums::BlockSums;
use ferry_replica::Point;
use rand::SeedableRng;

const DISK: u64 = 4 * MIB;

fn round(env: &Env, file: &Path, over: &Point, p_map: &BlockSums) -> DeltaReport {
    send_file_delta(
        file,
        "d0",
        over,
        &env.store,
        &env.vault,
        "m.reverse",
        &env.path("state"),
        &|| Ok(p_map.clone()),
        false,
    )
    .unwrap()
}

fn write_block(file: &Path, b: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, data, b * BLOCK).unwrap();
}

#[test]
fn a_round_killed_between_its_commit_and_its_map_is_not_missed_by_the_next() {
    let env = Env::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    env.disk("d0");
    let mut model = vec![0u8; DISK as usize];
    let writes: Vec<(u64, Option<Vec<u8>>, u64)> = (0..8)
        .map(|b| (b * BLOCK, Some(random_bytes(&mut rng, BLOCK)), BLOCK))
        .collect();
    let p = append_point(&env, "d0", &writes, &mut model);
    let over = env.point(&p);
    let p_map = BlockSums {
        block_bytes: BLOCK,
        disk_bytes: DISK,
        sums: model.chunks(BLOCK as usize).map(block_sum).collect(),
    };
    let file = env.path("built.raw");
    std::fs::write(&file, &model).unwrap();
    let (saved, pending) = (
        map_path(&env.path("state"), "d0"),
        pending_map_path(&env.path("state"), "d0"),
    );

    assert_eq!(round(&env, &file, &over, &p_map).bytes_data, 0);
    let before = std::fs::read(&saved).unwrap();
    // Block 3 changes; its round commits, then the host is killed before the map's
    // rename: the older map is in place, the new one pending.
    let x = model[(3 * BLOCK) as usize..(4 * BLOCK) as usize].to_vec();
    write_block(&file, 3, &random_bytes(&mut rng, BLOCK));
    assert_eq!(round(&env, &file, &over, &p_map).bytes_data, BLOCK);
    let after_lost = std::fs::read(&saved).unwrap();
    std::fs::rename(&saved, &pending).unwrap();
    std::fs::write(&saved, &before).unwrap();
    // Block 3 back as it was: the reverse replica holds the lost round's bytes, so it
    // must go again.
    write_block(&file, 3, &x);
    let r = round(&env, &file, &over, &p_map);
    assert_eq!(r.bytes_data, BLOCK, "block 3 sent again: {r:?}");
    assert!(!pending.exists());

    // A pending map whose point never committed (killed before the commit) is
    // dropped: here one that would send block 3 again if it were taken.
    let text = String::from_utf8_lossy(&after_lost).into_owned();
    let nl = after_lost.iter().position(|b| *b == b'\n').unwrap();
    let mut head: serde_json::Value = serde_json::from_str(&text[..nl]).unwrap();
    head["point_seq"] = 1_000_000.into();
    let mut bytes = head.to_string().into_bytes();
    bytes.extend_from_slice(&after_lost[nl..]);
    std::fs::write(&pending, bytes).unwrap();
    assert_eq!(round(&env, &file, &over, &p_map).bytes_data, 0);
    assert!(!pending.exists());

    // The home disk at P, given every round, equals the file.
    let home = env.path("home.raw");
    std::fs::write(&home, &model).unwrap();
    apply_deltas(
        &env.store,
        &env.vault,
        "m.reverse",
        "d0",
        &over,
        &home,
        &ApplyOptions::default(),
    )
    .unwrap();
    assert!(std::fs::read(&home).unwrap() == std::fs::read(&file).unwrap());
}
