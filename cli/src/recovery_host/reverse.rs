//! The reverse op (failback, docs/recovery-hosts.md): on the recovery-site host,
//! every `interval_s`, one round per disk carries what the recovered machine wrote
//! since the last round home as the next point of the reverse replica
//! `MACHINE.reverse`. A served disk (`item:ID`) sends its overlay's journal since the
//! cursor (`send_delta`); a built disk (a file path) sends the blocks whose checksum
//! changed since the last round's map (`send_file_delta`). Cursors and maps live with
//! the source (the serve item's folder, beside the built file), so a restart, and
//! failback's last item after the running one, go on where the last committed round
//! ended.
//!
//! `last`: the machine is frozen first (its start items' process groups stopped, its
//! served disks refusing writes, both kept across a restart by `FROZEN` files), then
//! one round per disk carries the checksum map of the disk as it is left (the final
//! map), and the item ends with those points.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_agent::recover::reverse::reverse_machine;
use ferry_agent::recover::reverse_map::{send_file_delta, served_map};
use ferry_agent::recover::sync::{point_sums, seed_map, CACHE_EXTENTS};
use ferry_agent::recover::{send_delta, send_final_delta, DeltaReport, ServedDisk};
use ferry_link::control::wire::{ReverseDisk, RoundDisk, WorkItem, WorkResult};
use ferry_replica::Disk;

use super::serve::{export_name, Gate, FROZEN};
use super::{procs, Host, Outcome};

/// How a source names a serve item.
pub const ITEM_PREFIX: &str = "item:";
/// The folder of a source's reverse state (`state_dir`).
pub const STATE_DIR: &str = "reverse-state";
/// How long a last round waits for what it needs (a serve item served again after a
/// restart, a store that answers) before it fails.
const LAST_TRIES: u32 = 30;

enum Source {
    /// The serve item's served disk.
    Served(String),
    /// A raw disk file.
    File(PathBuf),
}

fn source(d: &ReverseDisk) -> Result<Source, String> {
    if let Some(id) = d.source.strip_prefix(ITEM_PREFIX) {
        return Ok(Source::Served(id.to_string()));
    }
    let path = PathBuf::from(&d.source);
    if !path.is_absolute() {
        return Err(format!(
            "disk {}: source {} is neither item:ID nor an absolute path",
            d.disk, d.source
        ));
    }
    Ok(Source::File(path))
}

/// Where a source's reverse state lives (the journal cursor of a served disk, the
/// last round's map of a built one): with the source, not with the item. Failback's
/// last round is a new item, given after the running one was removed; it goes on
/// from where that one stopped instead of sending everything since the failover
/// again. The state goes when the source does (the commit removes it).
fn state_dir(host: &Host, src: &Source) -> Result<PathBuf, String> {
    match src {
        Source::Served(id) => host
            .dir(id)
            .map(|d| d.join(STATE_DIR))
            .map_err(|e| format!("{e:#}")),
        Source::File(path) => {
            let name = path
                .file_name()
                .ok_or_else(|| format!("source {} names no file", path.display()))?;
            Ok(path.with_file_name(format!(".{}.{STATE_DIR}", name.to_string_lossy())))
        }
    }
}

fn served_gate(host: &Host, serve_id: &str, export: &str) -> Option<Arc<Gate>> {
    let t = host.table();
    let e = t.entries.get(serve_id)?;
    e.served
        .iter()
        .find(|(name, _)| name == export)
        .map(|(_, g)| g.clone())
}

/// Freezes `machine` on this host: the freeze is recorded first (in this item's
/// folder and each serve item's), then the served disks refuse writes and the start
/// items' process groups are stopped. Run again, it finds the same done.
fn freeze(host: &Host, item: &WorkItem, sources: &[Source], dir: &Path) -> Result<(), String> {
    let mark = |d: &Path| {
        std::fs::write(d.join(FROZEN), b"frozen for failback\n")
            .map_err(|e| format!("recording the freeze in {}: {e}", d.display()))
    };
    mark(dir)?;
    let named: Vec<&str> = sources
        .iter()
        .filter_map(|s| match s {
            Source::Served(id) => Some(id.as_str()),
            Source::File(_) => None,
        })
        .collect();
    let (mut gates, mut groups, mut serve_dirs) = (Vec::new(), Vec::new(), Vec::new());
    {
        let t = host.table();
        for e in t.entries.values() {
            let kind = e.item.op.kind();
            let ours = e.item.machine == item.machine;
            if kind == "serve" && (ours || named.contains(&e.item.id.as_str())) {
                serve_dirs.push(host.dir(&e.item.id).map_err(|e| format!("{e:#}"))?);
                gates.extend(e.served.iter().map(|(_, g)| g.clone()));
            }
            if kind == "start" && ours {
                groups.extend(e.pgid.map(|p| (e.item.id.clone(), p)));
            }
        }
    }
    for d in &serve_dirs {
        mark(d)?;
    }
    // The machine's running reverse item ends (succeeded): the last round is this
    // item's, and two writers of one reverse disk would only race.
    host.supersede(&item.id, &item.machine, "reverse")?;
    for g in &gates {
        g.freeze();
    }
    for (id, p) in groups {
        if procs::group_alive(p) && !procs::kill_group(p, procs::TERM_GRACE) {
            return Err(format!(
                "freezing {}: the process group {p} of start item {id} survived SIGKILL",
                item.machine
            ));
        }
        tracing::info!(item = %item.id, start = %id, pgid = p, "stopped the machine for failback");
    }
    Ok(())
}

/// Whether a serve item a source names was frozen by a last item.
fn frozen(host: &Host, sources: &[Source]) -> bool {
    sources.iter().any(|s| match s {
        Source::Served(id) => host.dir(id).is_ok_and(|d| d.join(FROZEN).exists()),
        Source::File(_) => false,
    })
}

/// One round of one disk.
fn round(
    host: &Host,
    item: &WorkItem,
    d: &ReverseDisk,
    src: &Source,
    rev: &str,
    dir: &Path,
    last: bool,
) -> Result<DeltaReport, String> {
    let cursors = state_dir(host, src)?;
    let machine = &item.machine;
    let fwd_state = || -> Result<(Disk, ferry_replica::DiskState), String> {
        let disk = host
            .store
            .block(Disk::open(&host.store, machine, &d.disk, Some(&host.vault)))
            .map_err(|e| format!("opening disk {} of {machine}: {e}", d.disk))?;
        let state = host
            .store
            .block(disk.load_state())
            .map_err(|e| format!("reading disk {} of {machine}: {e}", d.disk))?;
        Ok((disk, state))
    };
    match src {
        Source::Served(serve_id) => {
            let export = export_name(machine, &d.disk);
            let gate = served_gate(host, serve_id, &export).ok_or_else(|| {
                format!("serve item {serve_id} does not serve {export} on this host (yet)")
            })?;
            let served = gate.disk();
            if served.point().id != d.over {
                return Err(format!(
                    "serve item {serve_id} serves {export} at point {}, not over {}",
                    served.point().id,
                    d.over
                ));
            }
            let r = if last {
                let (disk, state) = fwd_state()?;
                let bs = disk.info.block_bytes;
                let seed = seed_map(&disk, &state, served.point()).map_err(|e| e.to_string())?;
                let map = served_map(served, seed, bs).map_err(|e| e.to_string())?;
                send_final_delta(served, &host.store, &host.vault, rev, &cursors, &map)
            } else {
                send_delta(served, &host.store, &host.vault, rev, &cursors)
            };
            r.map_err(|e| e.to_string())
        }
        Source::File(path) => {
            let (_, state) = fwd_state()?;
            let point = state
                .point(&d.over)
                .cloned()
                .ok_or_else(|| format!("disk {} of {machine} has no point {}", d.disk, d.over))?;
            let scratch = dir.join("p-map");
            // P's map, for the first round only: as a sync makes it (a seed's map
            // patched with the log's blocks), fetching only what those cover.
            let first = || {
                let _ = std::fs::remove_dir_all(&scratch);
                std::fs::create_dir_all(&scratch).map_err(|e| ferry_agent::recover::Error::Io {
                    op: "create",
                    path: scratch.display().to_string(),
                    source: e,
                })?;
                let disk = host.store.block(Disk::open(
                    &host.store,
                    machine,
                    &d.disk,
                    Some(&host.vault),
                ))?;
                let bs = disk.info.block_bytes;
                let seed = seed_map(&disk, &state, &point)?;
                let served =
                    ServedDisk::open(&d.disk, disk, &state, &point, &scratch, CACHE_EXTENTS)?;
                let map = point_sums(seed, &served, bs, &|_| {}).map(|s| s.map);
                drop(served);
                let _ = std::fs::remove_dir_all(&scratch);
                map
            };
            send_file_delta(
                path,
                &d.disk,
                &point,
                &host.store,
                &host.vault,
                rev,
                &cursors,
                &first,
                last,
            )
            .map_err(|e| e.to_string())
        }
    }
}

/// Runs the reverse item until a remove or a last item of the machine stops it
/// (it then ends succeeded), or, `last`, until its final round. Figures of the newest round of each disk are reported while it runs;
/// `total_bytes_sent` counts since the host (re)started the item.
pub fn reverse(
    host: &Arc<Host>,
    item: &WorkItem,
    disks: &[ReverseDisk],
    interval_s: u64,
    last: bool,
    dir: &Path,
) -> Outcome {
    if disks.is_empty() {
        return Outcome::failed("no disks named");
    }
    let sources: Vec<Source> = match disks.iter().map(source).collect() {
        Ok(s) => s,
        Err(e) => return Outcome::failed(e),
    };
    let rev = match reverse_machine(&item.machine) {
        Ok(r) => r,
        Err(e) => return Outcome::failed(e.to_string()),
    };
    if last {
        if let Err(e) = freeze(host, item, &sources, dir) {
            return Outcome::failed(e);
        }
    } else if frozen(host, &sources) {
        // Resumed after a restart while a last item froze the machine: the last
        // round carries what is left, and a later point would only follow it.
        return Outcome::ok(WorkResult::default());
    }
    // Stopped by a remove (which then forgets the item) or by a last item: a running
    // item's rounds so far are its result; a last item stopped before its round did
    // not do what it was for, and says so.
    let stopped = |newest: &[Option<RoundDisk>]| {
        if last {
            Outcome::failed_with(
                format!("stopped before the last round of {} ended", item.machine),
                result(newest),
            )
        } else {
            Outcome::ok(result(newest))
        }
    };
    let mut newest: Vec<Option<RoundDisk>> = vec![None; disks.len()];
    loop {
        let mut error = None;
        for (i, (d, src)) in disks.iter().zip(&sources).enumerate() {
            let mut tries = 0;
            let r = loop {
                if host.stopping(&item.id) {
                    return stopped(&newest);
                }
                match round(host, item, d, src, &rev, dir, last) {
                    Err(e) if last && tries + 1 < LAST_TRIES => {
                        tracing::warn!(item = %item.id, disk = %d.disk, error = %e, "last round failed; trying again");
                        tries += 1;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    r => break r,
                }
            };
            match r {
                Ok(r) => {
                    let total = newest[i].as_ref().map_or(0, |n| n.total_bytes_sent);
                    newest[i] = Some(RoundDisk {
                        disk: d.disk.clone(),
                        point: r.point_id,
                        at: r.at,
                        bytes_data: r.bytes_data,
                        bytes_sent: r.bytes_sent,
                        total_bytes_sent: total + r.bytes_sent,
                    });
                }
                Err(e) => {
                    let e = format!("round of disk {} of {}: {e}", d.disk, item.machine);
                    if last {
                        return Outcome::failed_with(e, result(&newest));
                    }
                    tracing::warn!(item = %item.id, error = %e, "reverse round failed; the next one tries again");
                    error = Some(e);
                }
            }
        }
        if last {
            return Outcome::ok(result(&newest));
        }
        host.running_result(&item.id, result(&newest), error);
        let until = Instant::now() + Duration::from_secs(interval_s.max(1));
        while Instant::now() < until {
            if host.stopping(&item.id) {
                return stopped(&newest);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn result(newest: &[Option<RoundDisk>]) -> WorkResult {
    WorkResult {
        rounds: newest.iter().flatten().cloned().collect(),
        ..WorkResult::default()
    }
}
