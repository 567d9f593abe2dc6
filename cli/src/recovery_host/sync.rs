//! The sync ops (failback's master target, docs/failback.md): each target, a disk on
//! a host at home that belongs to the user (the original disk, or a new one), is made
//! equal to its disk at its point by checksum, and read back against the point's map.
//! Across the sites it takes three items (`ferry_agent::recover::sync_exchange`):
//! `home-map` here (hash the targets), `point-diff` on the recovery-site host (the
//! point's map and differing blocks, made beside the store), then `sync` with `from`
//! here (write those blocks, verify). A `sync` without `from` does it all here,
//! reading the store for the point's map and blocks.
//!
//! What an item's folder holds is scratch (the point's decoded log while a disk is
//! compared): a remove deletes the folder, never a target, which is why a target
//! inside the host's items folder is refused.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use ferry_agent::recover::sync::{Phase, SyncProgress};
use ferry_agent::recover::sync_exchange::{self, At, Exchanged};
use ferry_agent::recover::{sync_to_point, SyncOptions, SyncReport};
use ferry_link::control::wire::{
    DiskProgress, ExchangeDisk, PointDiffDisk, SyncDisk, SyncedDisk, WorkItem, WorkResult,
};

use super::ops::PROGRESS_EVERY;
use super::{Host, Outcome};

/// `path` as the file system resolves it, or as given when it does not exist (the
/// sync then fails opening it).
fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
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

/// How far through one disk a progress report is: each of `phases` an equal part.
fn fraction(p: &SyncProgress, phases: &[Phase]) -> f64 {
    let pass = phases.iter().position(|x| *x == p.phase).unwrap_or(0) as f64;
    let within = p.done_bytes as f64 / p.total_bytes.max(1) as f64;
    (pass + within.min(1.0)) / phases.len().max(1) as f64
}

/// Runs `one` for each of `names` (disks) in turn, reporting progress over all of
/// them (`phases`: the passes of one disk); stops at the first error.
fn each_disk<T>(
    host: &Host,
    item: &WorkItem,
    names: &[&str],
    phases: &[Phase],
    mut one: impl FnMut(usize, &dyn Fn(&SyncProgress)) -> Result<T, String>,
    done: &mut Vec<T>,
) -> Result<(), String> {
    let last = Mutex::new(Instant::now());
    // When the pass being reported began: its bytes over its own time make the rate
    // (over the item's whole time, each new pass would start near zero).
    let pass = Mutex::new((usize::MAX, Phase::Home, Instant::now()));
    let n = names.len() as f64;
    for i in 0..names.len() {
        let progress = |p: &SyncProgress| {
            let since = {
                let mut pass = pass
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if (pass.0, pass.1) != (i, p.phase) {
                    *pass = (i, p.phase, Instant::now());
                }
                pass.2
            };
            let mut last = last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.elapsed() < PROGRESS_EVERY {
                return;
            }
            *last = Instant::now();
            let secs = since.elapsed().as_secs_f64().max(1e-3);
            let rate = p.done_bytes as f64 / secs;
            // Each disk's own figure: those before this one are done, those after
            // not started.
            let per_disk = names
                .iter()
                .enumerate()
                .map(|(j, name)| DiskProgress {
                    disk: name.to_string(),
                    progress: match j.cmp(&i) {
                        std::cmp::Ordering::Less => 1.0,
                        std::cmp::Ordering::Equal => fraction(p, phases),
                        std::cmp::Ordering::Greater => 0.0,
                    },
                    bytes_per_s: if j == i { rate } else { 0.0 },
                    bytes_done: if j == i { p.done_bytes } else { 0 },
                    bytes: if j == i { p.total_bytes } else { 0 },
                })
                .collect();
            host.progress(
                &item.id,
                (i as f64 + fraction(p, phases)) / n,
                rate,
                per_disk,
            );
        };
        done.push(one(i, &progress)?);
    }
    Ok(())
}

/// A fresh scratch folder `dir/name`: one a killed run left is stale.
fn scratch(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let s = dir.join(name);
    let _ = std::fs::remove_dir_all(&s);
    std::fs::create_dir_all(&s).map_err(|e| format!("creating {}: {e}", s.display()))?;
    Ok(s)
}

fn targets(host: &Host, disks: &[SyncDisk]) -> Result<Vec<PathBuf>, String> {
    if disks.is_empty() {
        return Err("no disks named".into());
    }
    disks
        .iter()
        .map(|d| check_home_target(host, &d.disk, &d.target))
        .collect()
}

/// Syncs each disk of `item` in turn with verify on: from what a point-diff item
/// stored (`from`), else reading the store. The result lists what each disk took,
/// also when a later one failed.
pub fn sync(host: &Host, item: &WorkItem, disks: &[SyncDisk], dir: &Path) -> Outcome {
    let targets = match targets(host, disks) {
        Ok(t) => t,
        Err(e) => return Outcome::failed(e),
    };
    let names: Vec<&str> = disks.iter().map(|d| d.disk.as_str()).collect();
    let phases: &[Phase] = if disks.iter().all(|d| d.from.is_some()) {
        &[Phase::Write, Phase::Verify]
    } else {
        &[Phase::Map, Phase::Compare, Phase::Verify]
    };
    let mut synced = Vec::with_capacity(disks.len());
    let r = each_disk(
        host,
        item,
        &names,
        phases,
        |i, progress| {
            let (d, target) = (&disks[i], &targets[i]);
            // The sync rewrites the target to P: what an apply marker says it holds
            // above P is void from the first block written.
            super::apply::forget_markers(host, target)?;
            let what = || {
                format!(
                    "syncing {} to disk {} of {} at point {}",
                    d.target, d.disk, item.machine, d.point
                )
            };
            let r = match &d.from {
                Some(from) => sync_exchange::write_diff(
                    &at(host, item, &d.disk, &d.point),
                    target,
                    &from.map,
                    from.segments,
                    progress,
                ),
                None => {
                    let opts = SyncOptions {
                        verify: true,
                        work_dir: Some(scratch(dir, "sync")?),
                    };
                    let r = sync_to_point(
                        &host.store,
                        &host.vault,
                        &item.machine,
                        &d.disk,
                        &d.point,
                        target,
                        &opts,
                        progress,
                    );
                    let _ = std::fs::remove_dir_all(dir.join("sync"));
                    r
                }
            };
            r.map(|r| synced_disk(&d.disk, &r))
                .map_err(|e| format!("{}: {e}", what()))
        },
        &mut synced,
    );
    // The first disk that did not read back equal ends the item.
    let unequal = disks.iter().zip(&synced).find(|(_, s)| !s.identical);
    let error = match (r, unequal) {
        (Err(e), _) => Some(e),
        (Ok(()), Some((d, _))) => Some(format!(
            "verify: {} does not read back equal to disk {} of {} at point {}",
            d.target, d.disk, item.machine, d.point
        )),
        (Ok(()), None) => None,
    };
    let result = WorkResult {
        synced,
        ..WorkResult::default()
    };
    match error {
        Some(e) => Outcome::failed_with(e, result),
        None => Outcome::ok(result),
    }
}

/// Disk `disk` of the item's machine at `point`, read with the host's store and key.
fn at<'a>(host: &'a Host, item: &'a WorkItem, disk: &'a str, point: &'a str) -> At<'a> {
    At {
        store: &host.store,
        vault: &host.vault,
        machine: &item.machine,
        disk,
        point,
    }
}

fn synced_disk(disk: &str, r: &SyncReport) -> SyncedDisk {
    SyncedDisk {
        disk: disk.to_string(),
        blocks: r.blocks,
        blocks_differing: r.blocks_differing,
        bytes_written: r.bytes_written,
        bytes_fetched: r.bytes_fetched,
        bytes_stored: 0,
        identical: r.identical == Some(true),
    }
}

fn exchange_disk(disk: &str, x: Exchanged) -> ExchangeDisk {
    ExchangeDisk {
        disk: disk.to_string(),
        map: x.map,
        segments: x.segments,
        blocks: x.blocks,
        blocks_differing: x.blocks_differing,
        bytes_fetched: x.bytes_fetched,
        bytes_stored: x.bytes_stored,
    }
}

fn exchanged(r: Result<(), String>, exchange: Vec<ExchangeDisk>) -> Outcome {
    let result = WorkResult {
        exchange,
        ..WorkResult::default()
    };
    match r {
        Ok(()) => Outcome::ok(result),
        Err(e) => Outcome::failed_with(e, result),
    }
}

/// The home-map op: hashes each target at its point's size and stores the map.
pub fn home_map(host: &Host, item: &WorkItem, disks: &[SyncDisk]) -> Outcome {
    let targets = match targets(host, disks) {
        Ok(t) => t,
        Err(e) => return Outcome::failed(e),
    };
    let names: Vec<&str> = disks.iter().map(|d| d.disk.as_str()).collect();
    let mut out = Vec::with_capacity(disks.len());
    let r = each_disk(
        host,
        item,
        &names,
        &[Phase::Home],
        |i, progress| {
            let d = &disks[i];
            sync_exchange::home_map(&at(host, item, &d.disk, &d.point), &targets[i], progress)
                .map(|x| exchange_disk(&d.disk, x))
                .map_err(|e| {
                    format!(
                        "hashing {} for disk {} of {} at point {}: {e}",
                        d.target, d.disk, item.machine, d.point
                    )
                })
        },
        &mut out,
    );
    exchanged(r, out)
}

/// The point-diff op: each disk's point's map, compared with its home map; the
/// point's map and differing blocks stored.
pub fn point_diff(host: &Host, item: &WorkItem, disks: &[PointDiffDisk], dir: &Path) -> Outcome {
    if disks.is_empty() {
        return Outcome::failed("no disks named");
    }
    let names: Vec<&str> = disks.iter().map(|d| d.disk.as_str()).collect();
    let mut out = Vec::with_capacity(disks.len());
    let r = each_disk(
        host,
        item,
        &names,
        &[Phase::Map, Phase::Compare],
        |i, progress| {
            let d = &disks[i];
            let work = scratch(dir, "point")?;
            let r = sync_exchange::point_diff(
                &at(host, item, &d.disk, &d.point),
                &d.home_map,
                &work,
                progress,
            );
            let _ = std::fs::remove_dir_all(&work);
            r.map(|x| exchange_disk(&d.disk, x)).map_err(|e| {
                format!(
                    "comparing disk {} of {} at point {} with its home map: {e}",
                    d.disk, item.machine, d.point
                )
            })
        },
        &mut out,
    );
    exchanged(r, out)
}
