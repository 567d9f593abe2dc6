//! The sync op (failback's master target, docs/failback.md): each target, a disk on
//! this host that belongs to the user (the original disk, or a new one), is made
//! equal to its disk at its point by checksum; only the blocks that differ are
//! fetched and written, and the target is read back against the point's map. What
//! the item's folder holds is scratch (the point's decoded log while a disk syncs):
//! a remove deletes the folder, never a target, which is why a target inside the
//! host's items folder is refused.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use ferry_agent::recover::sync::{Phase, SyncProgress};
use ferry_agent::recover::{sync_to_point, SyncOptions};
use ferry_link::control::wire::{DiskProgress, SyncDisk, SyncedDisk, WorkItem, WorkResult};

use super::ops::PROGRESS_EVERY;
use super::{Host, Outcome};

/// `path` as the file system resolves it, or as given when it does not exist (the
/// sync then fails opening it).
fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Refuses a target that a remove of an item would delete: one inside the host's
/// items folder.
fn check_target(host: &Host, d: &SyncDisk) -> Result<PathBuf, String> {
    check_home_target(host, &d.disk, &d.target)
}

/// Refuses a home target (sync, apply) that is not absolute or that a remove of an
/// item would delete: one inside the host's items folder.
pub fn check_home_target(host: &Host, disk: &str, target: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(target);
    if !path.is_absolute() {
        return Err(format!("disk {disk}: target {target} is not absolute"));
    }
    if resolved(&path).starts_with(resolved(&host.items)) {
        return Err(format!(
            "disk {disk}: target {target} is inside the recovery host's items folder {}: a home disk \
             must live outside what the host removes",
            host.items.display()
        ));
    }
    Ok(path)
}

/// How far through one disk a progress report is: each pass a third.
fn fraction(p: &SyncProgress) -> f64 {
    let pass = match p.phase {
        Phase::Map => 0.0,
        Phase::Compare => 1.0,
        Phase::Verify => 2.0,
    };
    let within = p.done_bytes as f64 / p.total_bytes.max(1) as f64;
    (pass + within.min(1.0)) / 3.0
}

/// Syncs each disk of `item` in turn with verify on, reporting progress over all of
/// them; the result lists what each disk took, also when a later one failed.
pub fn sync(host: &Host, item: &WorkItem, disks: &[SyncDisk], dir: &Path) -> Outcome {
    if disks.is_empty() {
        return Outcome::failed("no disks named");
    }
    let mut targets = Vec::with_capacity(disks.len());
    for d in disks {
        match check_target(host, d) {
            Ok(p) => targets.push(p),
            Err(e) => return Outcome::failed(e),
        }
    }
    let scratch = dir.join("sync");
    let started = Instant::now();
    let last = Mutex::new(Instant::now());
    let mut synced = Vec::with_capacity(disks.len());
    let n = disks.len() as f64;
    for (i, (d, target)) in disks.iter().zip(&targets).enumerate() {
        let progress = |p: &SyncProgress| {
            let mut last = last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.elapsed() < PROGRESS_EVERY {
                return;
            }
            *last = Instant::now();
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            let rate = p.done_bytes as f64 / secs;
            // Each disk's own figure: those before this one are done, those after
            // not started.
            let per_disk = disks
                .iter()
                .enumerate()
                .map(|(j, dj)| DiskProgress {
                    disk: dj.disk.clone(),
                    progress: match j.cmp(&i) {
                        std::cmp::Ordering::Less => 1.0,
                        std::cmp::Ordering::Equal => fraction(p),
                        std::cmp::Ordering::Greater => 0.0,
                    },
                    bytes_per_s: if j == i { rate } else { 0.0 },
                    bytes_done: if j == i { p.done_bytes } else { 0 },
                    bytes: if j == i { p.total_bytes } else { 0 },
                })
                .collect();
            host.progress(&item.id, (i as f64 + fraction(p)) / n, rate, per_disk);
        };
        // The sync rewrites the target to P: what an apply marker says it holds
        // above P is void from the first block written.
        if let Err(e) = super::apply::forget_markers(host, target) {
            return failed(e, synced);
        }
        // Scratch of a run the host died in is stale: each disk starts clean.
        let _ = std::fs::remove_dir_all(&scratch);
        if let Err(e) = std::fs::create_dir_all(&scratch) {
            return failed(format!("creating {}: {e}", scratch.display()), synced);
        }
        let opts = SyncOptions {
            verify: true,
            work_dir: Some(scratch.clone()),
        };
        let r = sync_to_point(
            &host.store,
            &host.vault,
            &item.machine,
            &d.disk,
            &d.point,
            target,
            &opts,
            &progress,
        );
        let _ = std::fs::remove_dir_all(&scratch);
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                return failed(
                    format!(
                        "syncing {} to disk {} of {} at point {}: {e}",
                        d.target, d.disk, item.machine, d.point
                    ),
                    synced,
                )
            }
        };
        let identical = r.identical == Some(true);
        synced.push(SyncedDisk {
            disk: d.disk.clone(),
            blocks: r.blocks,
            blocks_differing: r.blocks_differing,
            bytes_written: r.bytes_written,
            bytes_fetched: r.bytes_fetched,
            identical,
        });
        if !identical {
            return failed(
                format!(
                    "verify: {} does not read back equal to disk {} of {} at point {}",
                    d.target, d.disk, item.machine, d.point
                ),
                synced,
            );
        }
    }
    Outcome::ok(WorkResult {
        synced,
        ..WorkResult::default()
    })
}

fn failed(error: String, synced: Vec<SyncedDisk>) -> Outcome {
    Outcome::failed_with(
        error,
        WorkResult {
            synced,
            ..WorkResult::default()
        },
    )
}
