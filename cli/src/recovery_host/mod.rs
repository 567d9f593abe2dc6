//! The recovery host (`ferry recovery-host`, docs/recovery-hosts.md): it executes the
//! work items the control plane gives it in its heartbeat answers (build, serve,
//! start, script, remove, sync, and failback's reverse and apply, which run until
//! removed), each once by id, and reports their state in its next heartbeats.
//!
//! One table holds every item the host knows, with its last report; each change is
//! written to the item's `state.json` first (`files`), so that a restart (kill -9)
//! resumes from the table as it was: served items are served again, results are
//! re-reported, a build that was running starts over. The ops themselves run on their
//! own threads (`ops`, `serve`, `remove`, `sync`), at most `MAX_BUILDS` builds and
//! syncs (and their home-map and point-diff steps) together and `MAX_SCRIPTS` scripts at once; the rest wait in the table for their turn, which
//! the next heartbeat answer (one a second) gives them.

pub mod apply;
pub mod files;
pub mod heartbeat;
pub mod ops;
pub mod procs;
pub mod progress;
pub mod remove;
pub mod reverse;
pub mod serve;
pub mod store_probe;
pub mod sync;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::Result;
use ferry_agent::nbd::Exports;
use ferry_link::control::limits::{trimmed, MAX_TEXT_BYTES, MAX_WORK_ITEMS};
use ferry_link::control::wire::{DiskProgress, WorkItem, WorkOp, WorkReport, WorkResult};
use ferry_replica::{Store, VaultKey};

/// Builds and syncs at once: each reads the store and writes whole disks, so more
/// would only share the same bandwidth and disk.
pub const MAX_BUILDS: usize = 2;
/// The kinds `MAX_BUILDS` bounds: each reads or writes whole disks.
const HEAVY: [&str; 4] = ["build", "sync", "home-map", "point-diff"];
/// Scripts at once.
pub const MAX_SCRIPTS: usize = 4;
/// How long a last reverse or final apply item waits for the machine's running one
/// to end its round.
pub const SUPERSEDE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// How an op ended: `error` set means failed; `result` is reported either way (a
/// failed script's exit code and output), and so is `disks` (build, serve: how far
/// each disk got).
#[derive(Debug, Default)]
pub struct Outcome {
    pub error: Option<String>,
    pub result: WorkResult,
    pub disks: Vec<DiskProgress>,
}

impl Outcome {
    pub fn ok(result: WorkResult) -> Outcome {
        Outcome {
            error: None,
            result,
            disks: Vec::new(),
        }
    }

    pub fn failed(error: impl Into<String>) -> Outcome {
        Outcome::failed_with(error, WorkResult::default())
    }

    /// Failed, with what it did before (a failed script's output, the rounds made).
    pub fn failed_with(error: impl Into<String>, result: WorkResult) -> Outcome {
        Outcome {
            error: Some(error.into()),
            result,
            disks: Vec::new(),
        }
    }
}

struct Entry {
    item: WorkItem,
    /// None while it waits for its turn.
    report: Option<WorkReport>,
    /// The table's clock when `report` last changed.
    changed: u64,
    /// The `changed` of the last report of it that the control plane received.
    acked: u64,
    /// A thread works on it now.
    busy: bool,
    /// Its exports, while it serves.
    served: serve::Exported,
    /// Its process group while it may have one (start, script).
    pgid: Option<i32>,
    /// A succeeded serve item found at start-up: served again once ordered.
    reserve: bool,
    /// Set by a remove: a reverse or apply item's loop ends at its next look.
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct Table {
    entries: BTreeMap<String, Entry>,
    /// The ids of the last orders, in their order.
    ordered: Vec<String>,
    /// Bumped at every report change.
    clock: u64,
}

impl Table {
    /// The ids that remove items name: never started (again), whatever the orders
    /// still say until the control plane marks them removed.
    fn removed_targets(&self) -> std::collections::BTreeSet<String> {
        self.entries
            .values()
            .filter_map(|e| match &e.item.op {
                // One naming itself is not its own target: it fails when it runs.
                WorkOp::Remove { items } => {
                    Some(items.iter().filter(|i| **i != e.item.id).cloned())
                }
                _ => None,
            })
            .flatten()
            .collect()
    }
}

/// The reports one heartbeat carried: each item's id and the change it was.
pub type Sent = Vec<(String, u64)>;

/// What the host shares between the heartbeat thread, the NBD server and the ops.
pub struct Host {
    /// WORK_DIR/items.
    pub items: PathBuf,
    pub store: Store,
    pub vault: VaultKey,
    /// HOST:PORT the NBD URLs name.
    pub nbd_address: String,
    pub exports: Arc<Exports>,
    /// Decoded extents each served disk keeps in memory.
    pub cache_extents: usize,
    table: Mutex<Table>,
}

fn running(id: &str) -> WorkReport {
    WorkReport {
        id: id.to_string(),
        state: "running".into(),
        progress: 0.0,
        bytes_per_s: 0.0,
        error: None,
        result: None,
        disks: Vec::new(),
    }
}

impl Host {
    /// The host with the items `items` holds, as a restart finds them: an item that
    /// was running when the host died is made ready to run again (build, serve,
    /// remove), or ended by what can be known of it (a start whose process group
    /// lives on succeeded; a script is killed and failed: it may not be idempotent).
    pub fn open(
        items: PathBuf,
        store: Store,
        vault: VaultKey,
        nbd_address: String,
        exports: Arc<Exports>,
        cache_extents: usize,
    ) -> Result<Arc<Host>> {
        let mut table = Table::default();
        for (item, report) in files::load_all(&items)? {
            let dir = files::item_dir(&items, &item.id)?;
            let pid = report
                .as_ref()
                .and_then(|r| r.result.as_ref())
                .and_then(|r| r.pid)
                .and_then(|p| i32::try_from(p).ok());
            let mut e = Entry {
                item,
                report: None,
                changed: 0,
                acked: 0,
                busy: false,
                served: Vec::new(),
                pgid: pid,
                reserve: false,
                stop: Arc::default(),
            };
            e.report = match (report, e.item.op.kind()) {
                (None, _) => None,
                (Some(r), kind) if r.state != "running" => {
                    e.reserve = kind == "serve" && r.state == "succeeded";
                    Some(r)
                }
                // A sync run again compares again: what it wrote already matches.
                // Reverse and apply resume from their cursors and markers.
                (
                    Some(_),
                    "build" | "serve" | "remove" | "sync" | "home-map" | "point-diff" | "reverse"
                    | "apply",
                ) => None,
                (Some(mut r), "start") => {
                    match pid.filter(|p| procs::group_alive(*p)) {
                        Some(_) => r.state = "succeeded".into(),
                        None => {
                            r.state = "failed".into();
                            r.error = Some(
                                "the recovery host restarted before the command had run 1 s, \
                                 and it is not running now"
                                    .into(),
                            );
                            e.pgid = None;
                        }
                    }
                    files::save_report(&dir, &r)?;
                    Some(r)
                }
                (Some(mut r), _) => {
                    if let Some(p) = pid {
                        procs::kill_group(p, procs::TERM_GRACE);
                    }
                    e.pgid = None;
                    r.state = "failed".into();
                    r.error = Some(
                        "the recovery host restarted while the script ran; it was killed".into(),
                    );
                    r.result = Some(WorkResult {
                        output: procs::output_tail(&dir.join("output.log")),
                        ..WorkResult::default()
                    });
                    files::save_report(&dir, &r)?;
                    Some(r)
                }
            };
            // Everything found is reported again: the control plane keeps the first
            // word on an ended item, and may have missed it.
            e.changed = 1;
            table.entries.insert(e.item.id.clone(), e);
        }
        table.clock = 1;
        Ok(Arc::new(Host {
            items,
            store,
            vault,
            nbd_address,
            exports,
            cache_extents,
            table: Mutex::new(table),
        }))
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // An op thread that panicked left the table consistent: every change is one
        // assignment.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn dir(&self, id: &str) -> Result<PathBuf> {
        files::item_dir(&self.items, id)
    }

    /// Records a new report for `id` (in memory, and in `state.json` when `durable`),
    /// unless the item is gone (a remove took it).
    fn set_report(&self, id: &str, report: WorkReport, durable: bool) {
        let mut t = self.table();
        t.clock += 1;
        let clock = t.clock;
        let Some(e) = t.entries.get_mut(id) else {
            return;
        };
        if durable {
            let saved =
                files::item_dir(&self.items, id).and_then(|dir| files::save_report(&dir, &report));
            if let Err(err) = saved {
                tracing::error!(item = id, error = %format!("{err:#}"), "cannot save an item's state: a restart will run it again");
            }
        }
        e.report = Some(report);
        e.changed = clock;
    }

    /// A running build's progress (0..1) and rate, and each disk's: in memory only,
    /// reported at the next heartbeat.
    pub fn progress(&self, id: &str, progress: f64, bytes_per_s: f64, disks: Vec<DiskProgress>) {
        let mut r = running(id);
        r.progress = progress;
        r.bytes_per_s = bytes_per_s;
        r.disks = disks;
        self.set_report(id, r, false);
    }

    /// The process group `id` runs in, kept (with a running report naming it) before
    /// anything waits on it: a restart then still finds what to kill.
    pub fn set_pgid(&self, id: &str, pgid: i32) {
        {
            let mut t = self.table();
            if let Some(e) = t.entries.get_mut(id) {
                e.pgid = Some(pgid);
            }
        }
        let mut r = running(id);
        r.result = Some(WorkResult {
            pid: u32::try_from(pgid).ok(),
            ..WorkResult::default()
        });
        self.set_report(id, r, true);
    }

    /// A running reverse or apply item's newest figures (and the error of its last
    /// round, if it failed): in memory only, reported at the next heartbeat.
    pub fn running_result(&self, id: &str, result: WorkResult, error: Option<String>) {
        let mut r = running(id);
        r.result = Some(result);
        r.error = error.map(|e| trimmed(&e, MAX_TEXT_BYTES));
        self.set_report(id, r, false);
    }

    /// Whether a remove asked item `id` to stop (or took it already).
    pub fn stopping(&self, id: &str) -> bool {
        self.table()
            .entries
            .get(id)
            .is_none_or(|e| e.stop.load(Ordering::SeqCst))
    }

    /// Stops the running items of kind `kind` of `machine` but `id`, and waits until
    /// they ended (failback's last reverse round and final apply take over from the
    /// machine's running ones).
    pub fn supersede(&self, id: &str, machine: &str, kind: &str) -> Result<(), String> {
        let mut others = Vec::new();
        for e in self.table().entries.values() {
            if e.item.op.kind() == kind && e.item.machine == machine && e.item.id != id && e.busy {
                e.stop.store(true, Ordering::SeqCst);
                others.push(e.item.id.clone());
            }
        }
        let end = std::time::Instant::now() + SUPERSEDE_WAIT;
        while others
            .iter()
            .any(|o| self.table().entries.get(o).is_some_and(|e| e.busy))
        {
            if std::time::Instant::now() >= end {
                return Err(format!(
                    "{kind} items {} of {machine} did not end within {} s",
                    others.join(", "),
                    SUPERSEDE_WAIT.as_secs()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(())
    }

    pub fn clear_pgid(&self, id: &str) {
        if let Some(e) = self.table().entries.get_mut(id) {
            e.pgid = None;
        }
    }

    fn finish(&self, id: &str, o: Outcome, served: serve::Exported) {
        let failed = o.error.is_some();
        let report = WorkReport {
            id: id.to_string(),
            state: if failed { "failed" } else { "succeeded" }.into(),
            progress: if failed { 0.0 } else { 1.0 },
            bytes_per_s: 0.0,
            error: o.error.map(|e| trimmed(&e, MAX_TEXT_BYTES)),
            result: Some(o.result),
            disks: o.disks,
        };
        if let Some(e) = self.table().entries.get_mut(id) {
            e.served = served;
        }
        self.set_report(id, report, true);
        if let Some(e) = self.table().entries.get_mut(id) {
            e.busy = false;
        }
    }

    /// Takes the orders of a heartbeat answer: new items are recorded (their folder
    /// and `item.json`), then every item whose turn it is starts on its own thread.
    pub fn apply(self: &Arc<Self>, work: Vec<WorkItem>) {
        let mut starts = Vec::new();
        {
            let mut t = self.table();
            t.ordered = work.iter().map(|w| w.id.clone()).collect();
            // Taken before anything is recorded: an item a remove took must not get
            // its folder back while the orders still list it.
            let mut gone = t.removed_targets();
            for w in &work {
                if let WorkOp::Remove { items } = &w.op {
                    gone.extend(items.iter().filter(|i| **i != w.id).cloned());
                }
            }
            for item in work {
                if t.entries.contains_key(&item.id) || gone.contains(&item.id) {
                    // The id is the item: what it does never changes.
                    continue;
                }
                let id = item.id.clone();
                let mut e = Entry {
                    item,
                    report: None,
                    changed: 0,
                    acked: 0,
                    busy: false,
                    served: Vec::new(),
                    pgid: None,
                    reserve: false,
                    stop: Arc::default(),
                };
                let saved = files::item_dir(&self.items, &id)
                    .and_then(|dir| files::save_item(&dir, &e.item));
                if let Err(err) = saved {
                    // Reported failed at once; nothing is kept on disk, so a restart
                    // tries it again.
                    t.clock += 1;
                    e.changed = t.clock;
                    let mut r = running(&id);
                    r.state = "failed".into();
                    r.error = Some(trimmed(
                        &format!("recording the item: {err:#}"),
                        MAX_TEXT_BYTES,
                    ));
                    e.report = Some(r);
                }
                t.entries.insert(id, e);
            }
            let busy = |t: &Table, kind: &str| {
                t.entries
                    .values()
                    .filter(|e| e.busy && e.item.op.kind() == kind)
                    .count()
            };
            let heavy: usize = HEAVY.iter().map(|k| busy(&t, k)).sum();
            let (mut builds, mut scripts) = (heavy, busy(&t, "script"));
            let ordered = t.ordered.clone();
            for id in &ordered {
                if gone.contains(id) {
                    continue;
                }
                let Some(e) = t.entries.get_mut(id) else {
                    continue;
                };
                if e.busy || !(e.report.is_none() || e.reserve) {
                    continue;
                }
                match e.item.op.kind() {
                    k if HEAVY.contains(&k) && builds >= MAX_BUILDS => continue,
                    k if HEAVY.contains(&k) => builds += 1,
                    "script" if scripts >= MAX_SCRIPTS => continue,
                    "script" => scripts += 1,
                    _ => {}
                }
                e.busy = true;
                e.reserve = false;
                starts.push(e.item.clone());
            }
            self.prune(&mut t);
        }
        for item in starts {
            self.start(item);
        }
    }

    /// Forgets ended items that left the orders and hold nothing (script, remove and
    /// sync items: what the others made is taken only by a remove; a sync's targets
    /// are the user's), with their folder.
    /// Only when the orders were whole: a cut list says nothing of what it left out.
    fn prune(&self, t: &mut Table) {
        if t.ordered.len() >= MAX_WORK_ITEMS {
            return;
        }
        let ordered: std::collections::BTreeSet<&String> = t.ordered.iter().collect();
        let drop: Vec<String> = t
            .entries
            .values()
            .filter(|e| {
                !e.busy
                    && !ordered.contains(&e.item.id)
                    && matches!(
                        e.item.op.kind(),
                        "script" | "remove" | "sync" | "home-map" | "point-diff"
                    )
                    && e.report.as_ref().is_some_and(|r| r.state != "running")
            })
            .map(|e| e.item.id.clone())
            .collect();
        for id in drop {
            t.entries.remove(&id);
            if let Ok(dir) = files::item_dir(&self.items, &id) {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(item = id, error = %e, "cannot delete a finished item's folder");
                    }
                }
            }
        }
    }

    fn start(self: &Arc<Self>, item: WorkItem) {
        let id = item.id.clone();
        let was_served = self
            .table()
            .entries
            .get(&id)
            .and_then(|e| e.report.as_ref())
            .is_some_and(|r| r.state == "succeeded");
        if !was_served {
            self.set_report(&id, running(&id), true);
        }
        let host = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ferry-item-{}", item.op.kind()))
            .spawn(move || {
                let (outcome, served) = host.run(&item);
                host.finish(&item.id, outcome, served);
            });
        if let Err(e) = spawned {
            self.finish(
                &id,
                Outcome::failed(format!("cannot start a thread for it: {e}")),
                Vec::new(),
            );
        }
    }

    fn run(self: &Arc<Self>, item: &WorkItem) -> (Outcome, serve::Exported) {
        let dir = match self.dir(&item.id) {
            Ok(d) => d,
            Err(e) => return (Outcome::failed(format!("{e:#}")), Vec::new()),
        };
        match &item.op {
            WorkOp::Build { disks, format } => {
                (ops::build(self, item, disks, format, &dir), Vec::new())
            }
            WorkOp::Serve { disks } => match serve::serve(self, item, disks, &dir) {
                Ok((result, gates)) => (
                    Outcome {
                        disks: progress::served(&result.disks),
                        ..Outcome::ok(result)
                    },
                    gates,
                ),
                Err(e) => (Outcome::failed(e), Vec::new()),
            },
            WorkOp::Start { command, env } => {
                (ops::start(self, &item.id, command, env, &dir), Vec::new())
            }
            WorkOp::Script {
                command,
                timeout_s,
                env,
            } => (
                ops::script(self, &item.id, command, *timeout_s, env, &dir),
                Vec::new(),
            ),
            WorkOp::Remove { items } if items.contains(&item.id) => (
                Outcome::failed(format!("remove item {} names itself", item.id)),
                Vec::new(),
            ),
            WorkOp::Remove { items } => (remove::remove(self, items), Vec::new()),
            WorkOp::Sync { disks } => (sync::sync(self, item, disks, &dir), Vec::new()),
            WorkOp::HomeMap { disks } => (sync::home_map(self, item, disks), Vec::new()),
            WorkOp::PointDiff { disks } => (sync::point_diff(self, item, disks, &dir), Vec::new()),
            WorkOp::Reverse {
                disks,
                interval_s,
                last,
            } => (
                reverse::reverse(self, item, disks, *interval_s, *last, &dir),
                Vec::new(),
            ),
            WorkOp::Apply {
                disks,
                interval_s,
                until,
                verify,
            } => (
                apply::apply(self, item, disks, *interval_s, until, *verify),
                Vec::new(),
            ),
        }
    }

    /// The reports of the last orders' items, those changed since the control plane
    /// last received them first, at most `MAX_WORK_ITEMS` and about `budget` bytes of
    /// JSON; and which change of each item they carry (for `acked`).
    pub fn reports(&self, budget: usize) -> (Vec<WorkReport>, Sent) {
        let t = self.table();
        let mut changed = Vec::new();
        let mut rest = Vec::new();
        for id in &t.ordered {
            let Some(e) = t.entries.get(id) else { continue };
            let Some(r) = &e.report else { continue };
            if e.changed > e.acked {
                changed.push((e.changed, r));
            } else {
                rest.push((e.changed, r));
            }
        }
        let mut out = Vec::new();
        let mut sent = Vec::new();
        let mut bytes: usize = 0;
        for (clock, r) in changed.into_iter().chain(rest) {
            let size = serde_json::to_vec(r).map_or(usize::MAX, |v| v.len());
            if out.len() >= MAX_WORK_ITEMS || bytes.saturating_add(size) > budget {
                // Left for a later heartbeat, still marked changed.
                continue;
            }
            bytes += size;
            sent.push((r.id.clone(), clock));
            out.push(r.clone());
        }
        (out, sent)
    }

    /// The control plane answered a heartbeat carrying these reports.
    pub fn acked(&self, sent: &Sent) {
        let mut t = self.table();
        for (id, clock) in sent {
            if let Some(e) = t.entries.get_mut(id) {
                e.acked = e.acked.max(*clock);
            }
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_reverse;
