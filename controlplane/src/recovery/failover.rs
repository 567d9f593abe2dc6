//! Failover: rebuild every disk of a machine at a chosen point into output images.

use std::path::{Path, PathBuf};

use ferry_replica::export::{Format, Output};
use ferry_replica::rebuild::{rebuild_point, FileSink, RebuildStats};
use ferry_replica::{Error, Point, Result, Store, VaultKey};

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
}

impl FailoverPlan {
    pub fn stored_bytes(&self) -> u64 {
        self.disks
            .iter()
            .map(|(d, p)| d.state.stored_bytes_up_to(p.seq))
            .sum()
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
    })
}

/// Rebuilds each planned disk as `out/{disk}.{raw|vhd}`.
pub fn run(
    plan: FailoverPlan,
    format: Format,
    out: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<FailedOverDisk>> {
    std::fs::create_dir_all(out).map_err(|e| Error::io("create", out.display().to_string(), e))?;
    let mut done = Vec::new();
    for (mut md, point) in plan.disks {
        let mut attempt = 0;
        let stats = loop {
            attempt += 1;
            let output = Output::create(out, &md.name, format, point.disk_bytes)?;
            let sink = FileSink {
                file: &output.file,
                path: output.shown(),
            };
            match rebuild_point(&md.disk, &md.state, &point, &sink, progress) {
                Ok(stats) => {
                    let path = output.finish()?;
                    break (stats, path);
                }
                Err(e) if e.is_missing() && attempt < ATTEMPTS => {
                    // A compaction replaced objects since we read the state: read it
                    // again; the point is still there unless retention dropped it.
                    md.state = md.disk.store.block(md.disk.load_state())?;
                    if md.state.point(&point.id).is_none() {
                        return Err(Error::NotFound(format!(
                            "point {} of disk {} was removed by retention during the failover",
                            point.id, md.name
                        )));
                    }
                }
                Err(e) => return Err(e),
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
