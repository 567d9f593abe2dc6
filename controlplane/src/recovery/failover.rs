//! Failover: rebuild every disk of a machine at a chosen point into output images.

use std::path::{Path, PathBuf};

use ferry_replica::export::{Format, Output};
use ferry_replica::rebuild::{rebuild_point, FileSink, RebuildStats};
use ferry_replica::{Point, Store, VaultKey};

use crate::error::{Error, Result};

use super::points::{choose, open_machine, PointSpec};

/// Attempts per disk when objects vanish under the rebuild (a compaction committed).
const ATTEMPTS: usize = 3;

#[derive(Debug, Clone)]
pub struct FailedOverDisk {
    pub disk: String,
    pub point: Point,
    pub path: PathBuf,
    pub stats: RebuildStats,
}

pub struct FailoverPlan {
    pub machine: String,
    pub disks: Vec<(super::points::MachineDisk, Point)>,
    /// Said to the operator when disks are not at one common point.
    pub note: Option<String>,
    /// Replace output files that exist (`--overwrite`); without it they are refused.
    pub overwrite: bool,
}

impl FailoverPlan {
    pub fn stored_bytes(&self) -> u64 {
        self.disks
            .iter()
            .map(|(d, p)| d.state.stored_bytes_up_to(p.seq))
            .fold(0, u64::saturating_add)
    }

    /// Each disk's stored bytes its point reads, in the plan's order.
    pub fn stored_bytes_per_disk(&self) -> Vec<u64> {
        self.disks
            .iter()
            .map(|(d, p)| d.state.stored_bytes_up_to(p.seq))
            .collect()
    }
}

pub fn plan(
    store: &Store,
    vault: &VaultKey,
    machine: &str,
    spec: &PointSpec,
) -> Result<FailoverPlan> {
    let disks = open_machine(store, machine, Some(vault))?;
    let (points, note) = choose(machine, &disks, spec)?;
    Ok(FailoverPlan {
        machine: machine.into(),
        disks: disks.into_iter().zip(points).collect(),
        note,
        overwrite: false,
    })
}

/// Rebuilds each planned disk as `out/{disk}.{raw|vhd}`; `progress` gets the stored
/// bytes read.
pub fn run(
    plan: FailoverPlan,
    format: Format,
    out: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<FailedOverDisk>> {
    run_per_disk(plan, format, out, &|_, n| progress(n))
}

/// As `run`, telling `progress` which disk (its index in `plan.disks`) each read is
/// of. The disks are rebuilt in turn, and each gets a `(i, 0)` as it starts, so that
/// one with nothing stored is seen starting too. A retry after a compaction reads
/// again: a disk's bytes may add up to more than its share of `stored_bytes`.
pub fn run_per_disk(
    plan: FailoverPlan,
    format: Format,
    out: &Path,
    progress: &(dyn Fn(usize, u64) + Sync),
) -> Result<Vec<FailedOverDisk>> {
    // The images hold the disks in the clear: a directory we make is the owner's only.
    ferry_replica::local::create_private_dir(out).map_err(|source| Error::Io {
        op: "create",
        path: out.display().to_string(),
        source,
    })?;
    let mut done = Vec::new();
    for (i, (mut md, point)) in plan.disks.into_iter().enumerate() {
        let mut attempt = 0;
        // Created once: a retry starts over in the file this run made, which must not
        // be refused as one that existed before.
        let output = Output::create(out, &md.name, format, point.disk_bytes, plan.overwrite)?;
        progress(i, 0);
        let read = |n: u64| progress(i, n);
        let path_of_failed = output.path.clone();
        let rebuilt = loop {
            attempt += 1;
            if attempt > 1 {
                output.reset()?;
            }
            let sink = FileSink {
                file: &output.file,
                path: output.shown(),
            };
            match rebuild_point(&md.disk, &md.state, &point, &sink, &read) {
                Ok(stats) => break Ok(stats),
                Err(e) if e.is_missing() && attempt < ATTEMPTS => {
                    // A compaction replaced objects since we read the state: read it
                    // again; the point is still there unless retention dropped it.
                    match md.disk.store.block(md.disk.load_state()) {
                        Ok(s) => md.state = s,
                        Err(e) => break Err(e.into()),
                    }
                    if md.state.point(&point.id).is_none() {
                        break Err(Error::PointRemoved {
                            id: point.id.clone(),
                            disk: md.name.clone(),
                        });
                    }
                }
                Err(e) => break Err(e.into()),
            }
        };
        let stats = match rebuilt.and_then(|stats| Ok((stats, output.finish()?))) {
            Ok(done) => done,
            Err(e) => {
                // Half an image is no image: leave no file that a rerun would have to
                // be told to overwrite, or that someone might boot.
                let _ = std::fs::remove_file(&path_of_failed);
                return Err(e);
            }
        };
        done.push(FailedOverDisk {
            disk: md.name,
            point,
            path: stats.1,
            stats: stats.0,
        });
    }
    Ok(done)
}
