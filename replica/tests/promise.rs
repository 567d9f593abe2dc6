//! The promise, tested against a reference model: random write sequences with recovery
//! points and compactions; every committed point rebuilds byte-identical to the model's
//! copy of the disk at that point — also when the store fails, loses replies, or the
//! writer crashes at any step of upload or compaction. Seeded: a failure prints its
//! seed, and FERRY_SEED=N replays it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::*;
use ferry_replica::compact::{compact, CompactOptions};
use ferry_replica::fault::{Fault, FaultStore, Plan};
use ferry_replica::object::SealContext;
use ferry_replica::writer::{append, seal_segment, Payload, Write};
use ferry_replica::{Disk, DiskState, Point, PointKind, Store, VaultKey};
use rand::Rng;

const BLOCK: u64 = 4096;
const EXTENT: u64 = 256 << 10;

/// What the test knows: the disk content after each commit it attempted, and the
/// content at each point.
struct Model {
    disk: Vec<u8>,
    after_commit: BTreeMap<u64, Vec<u8>>,
    at_point: BTreeMap<String, Vec<u8>>,
    /// Points whose commit returned Ok.
    acked: BTreeSet<String>,
    /// Points a compaction was allowed to drop.
    droppable: BTreeSet<String>,
    time: DateTime<Utc>,
}

struct Run<'a> {
    seed: u64,
    rng: rand_chacha::ChaCha8Rng,
    disk: Disk,
    state: DiskState,
    model: Model,
    ctx: SealContext,
    vault: &'a VaultKey,
    /// The store without injected faults, for verification.
    clean: Store,
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap()
}

impl Run<'_> {
    /// One step of the workload. An Err means the store failed the step.
    fn step(&mut self) -> ferry_replica::Result<()> {
        self.model.time += Duration::minutes(1);
        let size = self.model.disk.len() as u64;
        match self.rng.gen_range(0..100) {
            0..=69 => {
                let mut next = self.state.next_seq;
                let mut disk = self.model.disk.clone();
                // (seq, offset, data or None for a hole of len)
                let mut owned: Vec<(u64, u64, u64, Option<Vec<u8>>)> = Vec::new();
                for _ in 0..self.rng.gen_range(1..6) {
                    let len = self.rng.gen_range(1..=64 << 10).min(size);
                    let offset = if self.rng.gen_bool(0.5) {
                        self.rng.gen_range(0..=(size - len) / 512) * 512
                    } else {
                        self.rng.gen_range(0..=size - len)
                    };
                    let range = offset as usize..(offset + len) as usize;
                    if self.rng.gen_bool(0.1) {
                        disk[range].fill(0);
                        owned.push((next, offset, len, None));
                    } else {
                        let data = payload(&mut self.rng, len as usize);
                        disk[range].copy_from_slice(&data);
                        owned.push((next, offset, len, Some(data)));
                    }
                    next += 1;
                }
                let writes: Vec<Write<'_>> = owned
                    .iter()
                    .map(|(seq, offset, len, d)| Write {
                        seq: *seq,
                        offset: *offset,
                        payload: match d {
                            Some(d) => Payload::Data(d),
                            None => Payload::Zero(*len),
                        },
                    })
                    .collect();
                let sealed = seal_segment(&self.disk, &mut self.ctx, &writes)?;
                let point = self.rng.gen_bool(0.5).then(|| self.point(next - 1));
                self.commit(disk, vec![sealed], point, next)
            }
            70..=79 => {
                let point = self.point(self.state.next_seq.saturating_sub(1));
                let next = self.state.next_seq.max(1);
                self.commit(self.model.disk.clone(), vec![], Some(point), next)
            }
            _ => {
                let age = (self.model.time - t0()).num_minutes().max(1);
                let keep = Duration::minutes(self.rng.gen_range(0..=age));
                let cutoff = self.model.time - keep;
                for p in &self.state.points {
                    if p.time < cutoff {
                        self.model.droppable.insert(p.id.clone());
                    }
                }
                let n = self.state.next_commit();
                self.model.after_commit.insert(n, self.model.disk.clone());
                let opts = CompactOptions {
                    keep,
                    now: self.model.time,
                    orphan_grace: Duration::zero(),
                };
                compact(&self.disk, &opts)?;
                self.state = self.disk.store.block(self.disk.load_state())?;
                Ok(())
            }
        }
    }

    fn point(&mut self, seq: u64) -> Point {
        let kind = if self.rng.gen_bool(0.3) {
            PointKind::App
        } else {
            PointKind::Crash
        };
        Point {
            id: ferry_replica::disk::new_point_id(self.model.time),
            kind,
            time: self.model.time,
            seq,
            disk_bytes: self.model.disk.len() as u64,
            label: None,
            group: None,
            sums: None,
        }
    }

    fn commit(
        &mut self,
        disk: Vec<u8>,
        sealed: Vec<ferry_replica::writer::Sealed>,
        point: Option<Point>,
        next: u64,
    ) -> ferry_replica::Result<()> {
        let n = self.state.next_commit();
        self.model.after_commit.insert(n, disk.clone());
        if let Some(p) = &point {
            self.model.at_point.insert(p.id.clone(), disk.clone());
        }
        let store = self.disk.store.clone();
        store.block(append(
            &self.disk,
            &mut self.state,
            sealed,
            point.iter().cloned().collect(),
            next,
        ))?;
        if let Some(p) = point {
            self.model.acked.insert(p.id);
        }
        self.model.disk = disk;
        Ok(())
    }

    /// After a failure: read the store again and take the model back to what it holds.
    fn recover(&mut self, store: &Store) {
        let seed = self.seed;
        let disk = store
            .block(Disk::open(
                store,
                &self.disk.paths.machine,
                &self.disk.paths.disk,
                Some(self.vault),
            ))
            .unwrap_or_else(|e| panic!("seed {seed}: reopen after fault: {e}"));
        let state = store
            .block(disk.load_state())
            .unwrap_or_else(|e| panic!("seed {seed}: load after fault: {e}"));
        if let Some(h) = state.head {
            self.model.disk = self.model.after_commit[&h].clone();
        }
        self.disk = disk;
        self.state = state;
        self.check();
    }

    /// Every acked point not droppable is present; every present point rebuilds equal.
    fn check(&self) {
        let seed = self.seed;
        for id in &self.model.acked {
            if !self.model.droppable.contains(id) {
                assert!(
                    self.state.point(id).is_some(),
                    "seed {seed}: acked point {id} lost"
                );
            }
        }
        let clean = &self.clean;
        let disk = clean
            .block(Disk::open(
                clean,
                &self.disk.paths.machine,
                &self.disk.paths.disk,
                Some(self.vault),
            ))
            .unwrap_or_else(|e| panic!("seed {seed}: open for check: {e}"));
        for p in &self.state.points {
            let got = rebuild_mem(&disk, &self.state, &p.id)
                .unwrap_or_else(|e| panic!("seed {seed}: rebuild {}: {e}", p.id));
            let want = &self.model.at_point[&p.id];
            if &got != want {
                let at = got.iter().zip(want.iter()).position(|(a, b)| a != b);
                panic!(
                    "seed {seed}: point {} differs from the model at byte {at:?}",
                    p.id
                );
            }
        }
    }
}

fn start<'a>(seed: u64, store: &Store, clean: &Store, vault: &'a VaultKey) -> Run<'a> {
    let mut rng = rng(seed);
    let machine = machine(&mut rng);
    let disk = store
        .block(Disk::open_or_create(
            store, &machine, "d0", vault, BLOCK, EXTENT,
        ))
        .unwrap_or_else(|e| panic!("seed {seed}: create: {e}"));
    let size = rng.gen_range(1..=12) * 128 * 1024 + rng.gen_range(0..2) * 1000;
    Run {
        seed,
        rng,
        disk,
        state: DiskState::default(),
        model: Model {
            disk: vec![0u8; size as usize],
            after_commit: BTreeMap::new(),
            at_point: BTreeMap::new(),
            acked: BTreeSet::new(),
            droppable: BTreeSet::new(),
            time: t0(),
        },
        ctx: SealContext::default(),
        vault,
        clean: clean.clone(),
    }
}

#[test]
fn every_point_rebuilds_like_the_model() {
    let vault = VaultKey::generate();
    for ts in stores() {
        let store = ts.store();
        for seed in seeds(cases_for(&ts, 24)) {
            let mut run = start(seed, &store, &store, &vault);
            for _ in 0..30 {
                run.step()
                    .unwrap_or_else(|e| panic!("{} seed {seed}: {e}", ts.name));
            }
            run.check();
            // A reader that starts from scratch sees the same state.
            let fresh = store.block(run.disk.load_state()).unwrap();
            assert_eq!(fresh, run.state, "{} seed {seed}", ts.name);
        }
    }
}

#[test]
fn committed_points_survive_faults_at_any_step() {
    let vault = VaultKey::generate();
    for ts in stores() {
        for seed in seeds(cases_for(&ts, 48)) {
            let faulty = FaultStore::new(ts.inner.clone());
            let store = Store::with_object_store(
                faulty.clone() as Arc<dyn object_store::ObjectStore>,
                &ts.url,
            );
            let clean = ts.store();
            let mut run = start(seed, &store, &clean, &vault);
            let mut r = rng(seed ^ 0x5eed);
            let fault = match r.gen_range(0..4) {
                0 => Fault::FailBefore,
                1 => Fault::FailAfter,
                2 => Fault::CrashBefore,
                _ => Fault::CrashAfter,
            };
            let at = r.gen_range(0..240);
            let delay = if r.gen_bool(0.1) {
                StdDuration::from_millis(20)
            } else {
                StdDuration::ZERO
            };
            faulty.plan(Plan { at, fault, delay });
            for _ in 0..30 {
                if let Err(e) = run.step() {
                    // A failed step acknowledged nothing; recover from what the store
                    // holds. After a crash the writer restarts without the faulty store.
                    eprintln!(
                        "{} seed {seed}: injected {fault:?} at op {at}: {e}",
                        ts.name
                    );
                    if faulty.crashed() {
                        run.recover(&clean);
                    } else {
                        run.recover(&store);
                    }
                }
            }
            run.check();
        }
    }
}
