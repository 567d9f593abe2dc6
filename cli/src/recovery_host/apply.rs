//! The apply op (failback, docs/recovery-hosts.md): on the master target, every
//! `interval_s`, each home target (made equal to the forward point P by a sync item)
//! gets the reverse replica's points above the last one applied (`apply_deltas`).
//! The "applied" markers live on the host by target (`marker_dir`; a home target may
//! be a block device), not in the item's folder: a restart, and failback's final
//! apply (a new item, given after the running one was removed), go on from the last
//! point applied instead of applying every round again. A sync of the target deletes
//! them (it rewrites the target to P), and so does the removal of an apply item with
//! `until` (failback's final apply: the commit removes it); a remove never deletes a
//! target.
//!
//! `until`: apply exactly up to those points and end; with `verify`, every block of
//! each target is then compared with the point's final map (the last reverse round
//! stores it): the item fails naming the disk and the first block that differs. A
//! point without a map (the recovery site was lost before a last round) is reported
//! `verified: false`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_agent::recover::reverse::reverse_machine;
use ferry_agent::recover::reverse_map::{final_map, first_differing_block};
use ferry_agent::recover::{apply_deltas, ApplyOptions};
use ferry_link::control::wire::{AppliedDisk, ApplyDisk, DiskPoint, WorkItem, WorkResult};
use ferry_replica::{Disk, Point};

use super::sync::check_home_target;
use super::{Host, Outcome};

/// The folder of `target`'s applied markers: one per target path (resolved, so that
/// two names of one disk share it), under the host's work folder beside its items.
pub fn marker_dir(host: &Host, target: &Path) -> PathBuf {
    let resolved = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    // A name of fixed length whatever the path's (the checksum used for blocks;
    // not a secret, only a key).
    let sum = ferry_replica::scan::block_sum(resolved.as_os_str().as_encoded_bytes());
    let key: String = sum.iter().map(|b| format!("{b:02x}")).collect();
    host.items.with_file_name(MARKERS).join(key)
}

/// The host's folder of applied markers, beside `items`.
const MARKERS: &str = "applied";

/// Deletes `target`'s applied markers (a sync rewrote it, or failback's final apply
/// was removed): returns what it deleted.
pub fn forget_markers(host: &Host, target: &Path) -> Result<Vec<String>, String> {
    let dir = marker_dir(host, target);
    let mut deleted = Vec::new();
    let list = match std::fs::read_dir(&dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(deleted),
        Err(e) => return Err(format!("listing {}: {e}", dir.display())),
    };
    for e in list.flatten() {
        deleted.push(format!("file {}", e.path().display()));
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(deleted),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(deleted),
        Err(e) => Err(format!(
            "deleting the applied markers of {} in {}: {e}",
            target.display(),
            dir.display()
        )),
    }
}

/// The forward point `over` of `disk`, which every target holds under its deltas.
fn over_point(host: &Host, machine: &str, d: &ApplyDisk) -> Result<Point, String> {
    let disk = host
        .store
        .block(Disk::open(&host.store, machine, &d.disk, Some(&host.vault)))
        .map_err(|e| format!("opening disk {} of {machine}: {e}", d.disk))?;
    let state = host
        .store
        .block(disk.load_state())
        .map_err(|e| format!("reading disk {} of {machine}: {e}", d.disk))?;
    state
        .point(&d.over)
        .cloned()
        .ok_or_else(|| format!("disk {} of {machine} has no point {}", d.disk, d.over))
}

/// Applies one disk up to `up_to` (None: the newest point); None while the reverse
/// replica has no point of it yet. Returns the figures with `total` not yet added.
fn apply_one(
    host: &Host,
    rev: &str,
    d: &ApplyDisk,
    over: &Point,
    target: &Path,
    markers: &Path,
    up_to: Option<&str>,
) -> Result<Option<AppliedDisk>, String> {
    let reverse = match host
        .store
        .block(Disk::open(&host.store, rev, &d.disk, Some(&host.vault)))
    {
        Ok(r) => r,
        Err(ferry_replica::Error::NotFound(_)) if up_to.is_none() => return Ok(None),
        Err(e) => return Err(format!("opening reverse disk {rev}/{}: {e}", d.disk)),
    };
    let opts = ApplyOptions {
        up_to: up_to.map(str::to_string),
        state_dir: Some(markers.to_path_buf()),
    };
    let r = apply_deltas(&host.store, &host.vault, rev, &d.disk, over, target, &opts)
        .map_err(|e| format!("applying {rev}/{} onto {}: {e}", d.disk, target.display()))?;
    let Some(point) = r.applied else {
        return Ok(None);
    };
    let at = host
        .store
        .block(reverse.load_state())
        .ok()
        .and_then(|s| s.point(&point).map(|p| p.time.timestamp()))
        .unwrap_or_default();
    Ok(Some(AppliedDisk {
        disk: d.disk.clone(),
        point,
        at,
        bytes_written: r.bytes_written,
        bytes_fetched: r.bytes_fetched,
        total_bytes_written: 0,
        verified: None,
    }))
}

/// Compares each target with its point's final map; an error names the disk and
/// the first differing block.
fn verify(
    host: &Host,
    rev: &str,
    disks: &[ApplyDisk],
    targets: &[PathBuf],
    until: &[DiskPoint],
    newest: &mut [Option<AppliedDisk>],
) -> Result<(), String> {
    for (i, (d, target)) in disks.iter().zip(targets).enumerate() {
        let Some(point) = until.iter().find(|u| u.disk == d.disk) else {
            continue;
        };
        let map = final_map(&host.store, &host.vault, rev, &d.disk, &point.point)
            .map_err(|e| format!("verify: disk {}: {e}", d.disk))?;
        let verified = match map {
            None => false,
            Some(map) => match first_differing_block(target, &map) {
                Err(e) => return Err(format!("verify: disk {}: {e}", d.disk)),
                Ok(Some(b)) => {
                    return Err(format!(
                        "verify: disk {}: {} differs from the final map of point {} at block {b} \
                         (byte {} of {}-byte blocks)",
                        d.disk,
                        target.display(),
                        point.point,
                        b * map.block_bytes,
                        map.block_bytes
                    ))
                }
                Ok(None) => true,
            },
        };
        if let Some(a) = newest[i].as_mut() {
            a.verified = Some(verified);
        }
    }
    Ok(())
}

/// Runs the apply item until a remove or an `until` apply item of the machine
/// stops it (it then ends succeeded), or (`until`) until those points are applied
/// (and verified).
pub fn apply(
    host: &Host,
    item: &WorkItem,
    disks: &[ApplyDisk],
    interval_s: u64,
    until: &[DiskPoint],
    verify_after: bool,
) -> Outcome {
    if disks.is_empty() {
        return Outcome::failed("no disks named");
    }
    if let Some(d) = disks
        .iter()
        .find(|d| !until.is_empty() && !until.iter().any(|u| u.disk == d.disk))
    {
        return Outcome::failed(format!("until names no point for disk {}", d.disk));
    }
    let mut targets = Vec::with_capacity(disks.len());
    let mut overs = Vec::with_capacity(disks.len());
    for d in disks {
        match check_home_target(host, &d.disk, &d.target)
            .and_then(|t| Ok((t, over_point(host, &item.machine, d)?)))
        {
            Ok((t, p)) => {
                targets.push(t);
                overs.push(p);
            }
            Err(e) => return Outcome::failed(e),
        }
    }
    let rev = match reverse_machine(&item.machine) {
        Ok(r) => r,
        Err(e) => return Outcome::failed(e.to_string()),
    };
    if !until.is_empty() {
        // The machine's running apply item ends (succeeded): it holds the targets
        // while it applies, and this item applies exactly up to `until`.
        if let Err(e) = host.supersede(&item.id, &item.machine, "apply") {
            return Outcome::failed(e);
        }
    }
    // Once: each round's apply reads and writes the markers there.
    let markers: Vec<PathBuf> = targets.iter().map(|t| marker_dir(host, t)).collect();
    let mut newest: Vec<Option<AppliedDisk>> = vec![None; disks.len()];
    // Stopped by a remove or by a newer apply: a running item's points so far are its
    // result; one applying up to `until` stopped before it got there (or verified)
    // did not do what it was for, and says so.
    let stopped = |newest: &[Option<AppliedDisk>]| {
        if until.is_empty() {
            Outcome::ok(result(newest))
        } else {
            Outcome::failed_with(
                format!(
                    "stopped before the apply of {} up to its final points ended",
                    item.machine
                ),
                result(newest),
            )
        }
    };
    loop {
        let mut error = None;
        for (i, d) in disks.iter().enumerate() {
            if host.stopping(&item.id) {
                return stopped(&newest);
            }
            let up_to = until
                .iter()
                .find(|u| u.disk == d.disk)
                .map(|u| u.point.as_str());
            match apply_one(host, &rev, d, &overs[i], &targets[i], &markers[i], up_to) {
                Ok(Some(mut a)) => {
                    let total = newest[i].as_ref().map_or(0, |n| n.total_bytes_written);
                    a.total_bytes_written = total + a.bytes_written;
                    newest[i] = Some(a);
                }
                Ok(None) => {}
                Err(e) if !until.is_empty() => return Outcome::failed_with(e, result(&newest)),
                Err(e) => {
                    tracing::warn!(item = %item.id, error = %e, "apply failed; the next one tries again");
                    error = Some(e);
                }
            }
        }
        if !until.is_empty() {
            if verify_after {
                if let Err(e) = verify(host, &rev, disks, &targets, until, &mut newest) {
                    return Outcome::failed_with(e, result(&newest));
                }
            }
            return Outcome::ok(result(&newest));
        }
        host.running_result(&item.id, result(&newest), error);
        let end = Instant::now() + Duration::from_secs(interval_s.max(1));
        while Instant::now() < end {
            if host.stopping(&item.id) {
                return stopped(&newest);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn result(newest: &[Option<AppliedDisk>]) -> WorkResult {
    WorkResult {
        applied: newest.iter().flatten().cloned().collect(),
        ..WorkResult::default()
    }
}
