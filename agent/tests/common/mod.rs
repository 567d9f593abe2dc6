//! A replica to test against: a store in a temporary directory, a seeded disk with a
//! log after its base, and points. Shared by the tests of served disks.
#![allow(dead_code)]

use std::path::PathBuf;

use chrono::Utc;
use ferry_agent::{seed, SeedOptions};
use ferry_replica::meta::PointKind;
use ferry_replica::object::SealContext;
use ferry_replica::writer::{append, seal_segment, Payload, Write};
use ferry_replica::{Disk, Point, Store, VaultKey};
use rand::rngs::StdRng;
use rand::Rng;

pub const MIB: u64 = 1 << 20;
pub const SIZE: u64 = 64 * MIB;
pub const BLOCK: u64 = 64 << 10;
pub const EXTENT: u64 = 256 << 10;
pub const BLOCKS: u64 = SIZE / BLOCK;

pub struct Env {
    pub tmp: tempfile::TempDir,
    pub store: Store,
    pub store_dir: PathBuf,
    pub vault: VaultKey,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let store_dir = tmp.path().join("store");
        let store = Store::open(&format!("file://{}", store_dir.display())).unwrap();
        Env {
            tmp,
            store,
            store_dir,
            vault: VaultKey::generate(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn open(&self, machine: &str, disk: &str) -> Disk {
        self.store
            .block(Disk::open(&self.store, machine, disk, Some(&self.vault)))
            .unwrap()
    }

    /// Disk `name` of machine `m` (64 KiB blocks, 256 KiB extents), made if new.
    pub fn disk(&self, name: &str) -> Disk {
        self.store
            .block(Disk::open_or_create(
                &self.store,
                "m",
                name,
                &self.vault,
                BLOCK,
                EXTENT,
            ))
            .unwrap()
    }

    pub fn point(&self, id: &str) -> Point {
        let d = self.open("m", "d0");
        let state = self.store.block(d.load_state()).unwrap();
        state.point(id).unwrap().clone()
    }
}

/// Appends one segment of `writes` (offset, data or None for zero, length) and a
/// crash point after it; applies them to `model`. Returns the point's id.
pub fn append_point(
    env: &Env,
    disk: &str,
    writes: &[(u64, Option<Vec<u8>>, u64)],
    model: &mut [u8],
) -> String {
    let d = env.open("m", disk);
    let mut state = env.store.block(d.load_state()).unwrap();
    let mut seq = state.next_seq;
    let mut ws = Vec::new();
    for (offset, data, len) in writes {
        let at = *offset as usize;
        let payload = match data {
            Some(b) => {
                model[at..at + b.len()].copy_from_slice(b);
                Payload::Data(b)
            }
            None => {
                model[at..at + *len as usize].fill(0);
                Payload::Zero(*len)
            }
        };
        ws.push(Write {
            seq,
            offset: *offset,
            payload,
        });
        seq += 1;
    }
    let sealed = vec![seal_segment(&d, &mut SealContext::new(1), &ws).unwrap()];
    let id = ferry_replica::disk::new_point_id(Utc::now());
    let point = Point {
        id: id.clone(),
        kind: PointKind::Crash,
        time: Utc::now(),
        seq,
        disk_bytes: model.len() as u64,
        label: None,
        group: None,
        sums: None,
    };
    env.store
        .block(append(&d, &mut state, sealed, vec![point], seq + 1))
        .unwrap();
    id
}

pub fn random_bytes(rng: &mut StdRng, n: u64) -> Vec<u8> {
    let mut b = vec![0u8; n as usize];
    rng.fill(&mut b[..]);
    b
}

/// A disk's content: half its 256 KiB regions random, the rest zero.
pub fn half_random(rng: &mut StdRng) -> Vec<u8> {
    let mut model = vec![0u8; SIZE as usize];
    for region in 0..SIZE / EXTENT {
        if rng.gen_bool(0.5) {
            let at = (region * EXTENT) as usize;
            rng.fill(&mut model[at..at + EXTENT as usize]);
        }
    }
    model
}

/// Disk `disk` of machine `m` made and seeded (`ferry seed`) with `model`; the
/// seed's point.
pub fn seed_image(env: &Env, disk: &str, model: &[u8]) -> Point {
    env.disk(disk);
    let image = env.path("seed.img");
    std::fs::write(&image, model).unwrap();
    let opts = SeedOptions {
        machine: "m",
        disk,
        image: &image,
        label: None,
        time: Utc::now(),
        workers: 2,
        orphan_grace: ferry_replica::grace::ORPHAN_GRACE,
    };
    let seeded = seed(&env.store, &env.vault, &opts, &|_| {}).unwrap();
    std::fs::remove_file(&image).unwrap();
    seeded.point
}

/// A seeded disk "d0" (half its 256 KiB regions random), a log of whole blocks and
/// one zeroed after it up to point P, and one more point after P. Returns the disk
/// at P, P's id and the later point's id.
pub fn seeded_disk(env: &Env, rng: &mut StdRng) -> (Vec<u8>, String, String) {
    let mut model = half_random(rng);
    seed_image(env, "d0", &model);
    let mut writes: Vec<(u64, Option<Vec<u8>>, u64)> = (0..20)
        .map(|_| {
            let b = rng.gen_range(0..BLOCKS);
            (b * BLOCK, Some(random_bytes(rng, BLOCK)), BLOCK)
        })
        .collect();
    writes.push((rng.gen_range(0..BLOCKS) * BLOCK, None, BLOCK));
    let p = append_point(env, "d0", &writes, &mut model);
    let mut after = model.clone();
    let later = vec![(0, Some(random_bytes(rng, BLOCK)), BLOCK)];
    let p2 = append_point(env, "d0", &later, &mut after);
    (model, p, p2)
}
