//! The remove op: for each item named, its exports shut and withdrawn, its process
//! group killed (SIGTERM, SIGKILL after `procs::TERM_GRACE`), its folder deleted; then
//! checked: no folder, no live process of its group, no export left. What it deleted
//! is the result; what is left fails the item, by name. Removing an item the host
//! never had (or already removed) finds nothing and succeeds: a remove run again
//! after a restart is the same remove.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_link::control::limits::{trimmed, MAX_TEXT_BYTES};
use ferry_link::control::wire::{WorkOp, WorkResult};

use super::{procs, Host, Outcome};

/// How long a remove waits for a target's op to end (a build in progress cannot be
/// stopped half way: it finishes, then its files are deleted).
const BUSY_WAIT: Duration = Duration::from_secs(3600);
/// The most things listed as deleted (the rest are counted in one line), so the
/// report stays within the heartbeat's bounds.
const MAX_LISTED: usize = 200;

fn list_files(dir: &Path, out: &mut Vec<String>) {
    let Ok(list) = std::fs::read_dir(dir) else {
        return;
    };
    for e in list.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => list_files(&p, out),
            _ => out.push(format!("file {}", p.display())),
        }
    }
}

fn remove_one(host: &Host, id: &str, deleted: &mut Vec<String>, left: &mut Vec<String>) {
    let dir = match host.dir(id) {
        Ok(d) => d,
        Err(e) => {
            left.push(format!("item {id}: {e:#}"));
            return;
        }
    };
    // A script (or a start in its first second) is killed first, so that waiting for
    // its thread is short.
    let pgid = host.table().entries.get(id).and_then(|e| e.pgid);
    if let Some(p) = pgid {
        if procs::group_alive(p) && procs::kill_group(p, procs::TERM_GRACE) {
            deleted.push(format!("process {p}"));
        }
    }
    // A reverse or apply item runs until told: it ends at its next look.
    if let Some(e) = host.table().entries.get(id) {
        e.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let end = Instant::now() + BUSY_WAIT;
    loop {
        let t = host.table();
        let Some(e) = t.entries.get(id) else { break };
        if !e.busy {
            break;
        }
        if Instant::now() >= end {
            left.push(format!(
                "item {id}: its {} did not end within {} s",
                e.item.op.kind(),
                BUSY_WAIT.as_secs()
            ));
            return;
        }
        drop(t);
        std::thread::sleep(Duration::from_millis(100));
    }
    let entry = host.table().entries.remove(id);
    if let Some(e) = &entry {
        forget_final_markers(host, &e.item.op, deleted, left);
    }
    let (served, pgid) = entry.map_or((Vec::new(), None), |e| (e.served, e.pgid));
    for (name, gate) in &served {
        gate.close();
        if host.exports.remove(name) {
            deleted.push(format!("export {name}"));
        }
    }
    if let Some(p) = pgid {
        if procs::group_alive(p) {
            if procs::kill_group(p, procs::TERM_GRACE) {
                deleted.push(format!("process {p}"));
            } else {
                left.push(format!("process group {p} of item {id} survived SIGKILL"));
            }
        }
    }
    let mut files = Vec::new();
    list_files(&dir, &mut files);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => deleted.extend(files),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => left.push(format!("folder {}: {e}", dir.display())),
    }
    // The check: whatever the steps above said.
    if dir.exists() {
        left.push(format!("folder {}", dir.display()));
    }
    for (name, _) in &served {
        if host.exports.contains(name) {
            left.push(format!("export {name}"));
        }
    }
    if let Some(p) = pgid.filter(|p| procs::group_alive(*p)) {
        left.push(format!("process group {p}"));
    }
}

/// Failback's final apply (one with `until`) is removed by its commit (or a retried
/// failback): the applied markers of its targets go with it. A running apply's stay:
/// the final apply given after its removal goes on from them.
fn forget_final_markers(
    host: &Host,
    op: &WorkOp,
    deleted: &mut Vec<String>,
    left: &mut Vec<String>,
) {
    let WorkOp::Apply { disks, until, .. } = op else {
        return;
    };
    if until.is_empty() {
        return;
    }
    for d in disks {
        match super::apply::forget_markers(host, Path::new(&d.target)) {
            Ok(files) => deleted.extend(files),
            Err(e) => left.push(e),
        }
    }
}

pub fn remove(host: &Host, ids: &[String]) -> Outcome {
    let mut deleted = Vec::new();
    let mut left = Vec::new();
    for id in ids {
        remove_one(host, id, &mut deleted, &mut left);
    }
    if deleted.len() > MAX_LISTED {
        let more = deleted.len() - (MAX_LISTED - 1);
        deleted.truncate(MAX_LISTED - 1);
        deleted.push(format!("… and {more} more"));
    }
    let deleted = deleted
        .into_iter()
        .map(|d| trimmed(&d, MAX_TEXT_BYTES))
        .collect();
    let result = WorkResult {
        deleted,
        ..WorkResult::default()
    };
    if left.is_empty() {
        Outcome::ok(result)
    } else {
        Outcome::failed_with(format!("left after removal: {}", left.join("; ")), result)
    }
}
