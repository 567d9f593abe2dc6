//! The build, start and script ops (serve and remove have their own files).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferry_controlplane::recovery::failover::{self, FailoverPlan};
use ferry_controlplane::recovery::points::{open_machine, MachineDisk};
use ferry_link::control::wire::{DiskPoint, ReadyDisk, WorkItem, WorkResult};
use ferry_replica::export::Format;
use ferry_replica::Point;

use super::progress::BuildTally;
use super::{procs, Host, Outcome};

/// A started command must still run after this to count as started.
pub const START_SETTLE: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(50);
/// The least time between two progress reports of a build (each takes the table's
/// lock; the heartbeat reads one a second anyway).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Each named disk of `machine` at its point, opened; an error names the disk or
/// point missing.
pub fn disks_at(
    host: &Host,
    machine: &str,
    wanted: &[DiskPoint],
) -> Result<Vec<(MachineDisk, Point)>, String> {
    if wanted.is_empty() {
        return Err("no disks named".into());
    }
    let mut all = open_machine(&host.store, machine, Some(&host.vault))
        .map_err(|e| format!("opening machine {machine} in the store: {e}"))?;
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        let i = all
            .iter()
            .position(|d| d.name == w.disk)
            .ok_or_else(|| format!("machine {machine} has no disk {} in the store", w.disk))?;
        let md = all.swap_remove(i);
        let point = md.state.point(&w.point).cloned().ok_or_else(|| {
            format!(
                "disk {} of machine {machine} has no point {} (compacted away, or never made)",
                w.disk, w.point
            )
        })?;
        out.push((md, point));
    }
    Ok(out)
}

/// Rebuilds each disk at its point into `dir/DISK.{raw|vhd}`, reporting progress
/// (stored bytes read over those the points need) and rate, of the item and of each
/// disk. A build run again (after a restart) starts over in the files it made.
pub fn build(
    host: &Host,
    item: &WorkItem,
    disks: &[DiskPoint],
    format: &str,
    dir: &Path,
) -> Outcome {
    let format: Format = match format.parse() {
        Ok(f) => f,
        Err(e) => return Outcome::failed(format!("format: {e}")),
    };
    let chosen = match disks_at(host, &item.machine, disks) {
        Ok(c) => c,
        Err(e) => return Outcome::failed(e),
    };
    let plan = FailoverPlan {
        machine: item.machine.clone(),
        disks: chosen,
        note: None,
        overwrite: true,
    };
    let names = plan.disks.iter().map(|(md, _)| md.name.clone());
    let tally = Mutex::new(BuildTally::new(
        names.zip(plan.stored_bytes_per_disk()).collect(),
        Instant::now(),
    ));
    let last = Mutex::new(Instant::now());
    let progress = |i: usize, n: u64| {
        let now = Instant::now();
        let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
        if n == 0 {
            t.start(i, now);
        }
        t.read(i, n);
        let mut last = last.lock().unwrap_or_else(PoisonError::into_inner);
        if now.duration_since(*last) < PROGRESS_EVERY {
            return;
        }
        *last = now;
        let (progress, rate) = t.item(now);
        host.progress(&item.id, progress, rate, t.disks(now));
    };
    let built = failover::run_per_disk(plan, format, dir, &progress);
    let mut tally = tally.into_inner().unwrap_or_else(PoisonError::into_inner);
    if built.is_ok() {
        tally.finish(Instant::now());
    }
    let disks = tally.disks(Instant::now());
    let outcome = match built {
        Ok(built) => Outcome::ok(WorkResult {
            disks: built
                .into_iter()
                .map(|d| ReadyDisk {
                    disk: d.disk,
                    point: d.point.id,
                    path: Some(d.path.display().to_string()),
                    nbd_url: None,
                    bytes: d.point.disk_bytes,
                })
                .collect(),
            ..WorkResult::default()
        }),
        Err(e) => Outcome::failed(format!("building into {}: {e}", dir.display())),
    };
    // A failed build still says how far each disk got.
    Outcome { disks, ..outcome }
}

/// Starts `sh -c command` detached in its own process group, its output in
/// `dir/output.log`; succeeded if it still runs after `START_SETTLE`.
pub fn start(
    host: &Host,
    id: &str,
    command: &str,
    env: &BTreeMap<String, String>,
    dir: &Path,
) -> Outcome {
    let log = dir.join("output.log");
    let mut child = match procs::spawn(command, env, &log) {
        Ok(c) => c,
        Err(e) => return Outcome::failed(format!("{e:#}")),
    };
    let pgid = child.id() as i32;
    host.set_pgid(id, pgid);
    let end = Instant::now() + START_SETTLE;
    while Instant::now() < end {
        match child.try_wait() {
            Ok(Some(status)) => {
                // What it started in its group goes with it: a start that failed
                // leaves nothing behind.
                procs::kill_group(pgid, procs::TERM_GRACE);
                host.clear_pgid(id);
                return Outcome {
                    error: Some(format!(
                        "the command ended within {} s ({status})",
                        START_SETTLE.as_secs()
                    )),
                    result: WorkResult {
                        output: procs::output_tail(&log),
                        exit_code: status.code(),
                        ..WorkResult::default()
                    },
                    disks: Vec::new(),
                };
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => return Outcome::failed(format!("waiting for pid {pgid}: {e}")),
        }
    }
    // Reaped when it ends, so that it never lingers as a zombie (which a remove
    // would not count as alive anyway, but `ps` would show).
    let reaped = std::thread::Builder::new()
        .name("ferry-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    if let Err(e) = reaped {
        tracing::warn!(pid = pgid, error = %e, "no thread to reap a started command");
    }
    Outcome::ok(WorkResult {
        pid: u32::try_from(pgid).ok(),
        ..WorkResult::default()
    })
}

/// Runs `sh -c command` to its end or `timeout_s`; exit 0 succeeds. Its group is
/// killed either way once the shell is done: a script leaves nothing running.
pub fn script(
    host: &Host,
    id: &str,
    command: &str,
    timeout_s: u64,
    env: &BTreeMap<String, String>,
    dir: &Path,
) -> Outcome {
    let log = dir.join("output.log");
    let mut child = match procs::spawn(command, env, &log) {
        Ok(c) => c,
        Err(e) => return Outcome::failed(format!("{e:#}")),
    };
    let pgid = child.id() as i32;
    host.set_pgid(id, pgid);
    let end = Instant::now() + Duration::from_secs(timeout_s);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= end => break None,
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => {
                procs::kill_group(pgid, procs::TERM_GRACE);
                host.clear_pgid(id);
                return Outcome::failed(format!("waiting for pid {pgid}: {e}"));
            }
        }
    };
    procs::kill_group(pgid, procs::TERM_GRACE);
    if status.is_none() {
        // The shell, killed with its group on the timeout: reaped.
        let _ = child.wait();
    }
    host.clear_pgid(id);
    let output = procs::output_tail(&log);
    match status {
        None => Outcome {
            error: Some(format!(
                "timed out after {timeout_s} s: its process group was killed"
            )),
            result: WorkResult {
                output,
                ..WorkResult::default()
            },
            disks: Vec::new(),
        },
        Some(s) => {
            let result = WorkResult {
                exit_code: s.code(),
                output,
                ..WorkResult::default()
            };
            if s.success() {
                Outcome::ok(result)
            } else {
                Outcome {
                    error: Some(match s.code() {
                        Some(c) => format!("exited with status {c}"),
                        None => format!("ended by a signal ({s})"),
                    }),
                    result,
                    disks: Vec::new(),
                }
            }
        }
    }
}
