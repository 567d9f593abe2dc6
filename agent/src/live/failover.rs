//! No split brain (docs/recovery.md, "No split brain"): the source agent's side of a
//! failover. A planned failover's `prepare` order holds every write (NBD writes and
//! trims answered with an error, reads served), flushes, takes a final point on every
//! disk and reports it once the process server acknowledged it durable. Once the
//! machine failed over (the order says so, or a process server refuses the machine
//! because it did), the agent stops replicating and its disks stay read-only. Both
//! are kept in the journal directory, so a restart holds writes or stays read-only
//! from its start until the control plane's orders carry no failover any more (a
//! cancelled failover, or a re-enable after failback): a write accepted after a final
//! point was reported would be acknowledged and lost. Lifted from read-only, each
//! disk drops its journal and is compared with its replica by checksum first.
//!
//! The switch is one per agent, shared by the heartbeat (orders), the senders (a
//! process server's refusal) and the captures (each disk's write gate).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_link::control::wire::{DiskPoint, FailoverReport};
use ferry_link::protocol::PointKindWire;

use super::capture::Capture;
use super::Agent;
use crate::error::{Error, Result};
use crate::nbd::Device;

/// The file, in the journal directory, that keeps a failed-over agent read-only (or
/// a preparing one's writes held) across a restart.
pub const MARKER: &str = "failed-over.json";

/// The marker's states.
const HELD: &str = "held";
const READ_ONLY: &str = "read-only";

/// The id a read-only state has when a process server's refusal caused it (the
/// control plane's order brings its own).
pub const REFUSAL_ID: &str = "process-server";

/// After the control plane lifted a failover (a cancel), a process server may still
/// hold the old list for up to a heartbeat interval: its refusals within this long
/// are retried, not taken for a new failover.
pub const LIFT_GRACE: Duration = Duration::from_secs(15);

/// What a disk's capture does with writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Writes {
    Open = 0,
    /// A planned failover prepares: writes wait for the failover or its cancel.
    Held = 1,
    /// The machine failed over: the source must never diverge from it.
    ReadOnly = 2,
}

impl Writes {
    pub fn from_u8(v: u8) -> Writes {
        match v {
            0 => Writes::Open,
            1 => Writes::Held,
            _ => Writes::ReadOnly,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Writes::Open => "open",
            Writes::Held => "held",
            Writes::ReadOnly => "read-only",
        }
    }
}

/// A disk's write gate, read under its capture lock.
#[derive(Debug, Default)]
pub struct Gate(AtomicU8);

impl Gate {
    pub fn get(&self) -> Writes {
        Writes::from_u8(self.0.load(Ordering::SeqCst))
    }

    pub fn set(&self, w: Writes) {
        self.0.store(w as u8, Ordering::SeqCst);
    }

    /// The error a write gets while the gate is not open. Its kind is one the NBD
    /// server knows for a refusal (`nbd::server::is_refusal`): a guest retrying such
    /// writes is warned about once a minute per export, not logged at every retry.
    pub fn refusal(&self, disk: &str) -> io::Result<()> {
        match self.get() {
            Writes::Open => Ok(()),
            Writes::Held => Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "disk {disk}: writes are held: the machine is being failed over \
                     (planned failover)"
                ),
            )),
            Writes::ReadOnly => Err(io::Error::new(
                io::ErrorKind::ReadOnlyFilesystem,
                format!("disk {disk} is read-only: the machine failed over to the recovery site"),
            )),
        }
    }
}

/// A final point: its id and, per disk, its bookmark's sequence number (durable at
/// the process server once its watermark is past it).
#[derive(Debug, Clone, PartialEq)]
pub struct Final {
    pub point: String,
    pub seqs: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Normal,
    Preparing {
        id: String,
        taken: Option<Final>,
        /// Why the final point could not be taken yet (tried again each heartbeat).
        error: Option<String>,
    },
    ReadOnly {
        id: String,
    },
}

pub struct Switch {
    machine: String,
    marker: PathBuf,
    captures: Mutex<Vec<Arc<Capture>>>,
    mode: Mutex<Mode>,
    /// Read by the senders before each step: false once failed over.
    replicating: AtomicBool,
    lifted: Mutex<Option<Instant>>,
}

impl Switch {
    /// The switch of `machine`, read-only from the start when its marker is in
    /// `journal_dir` (it failed over before this start).
    pub fn open(machine: &str, journal_dir: &Path) -> io::Result<Switch> {
        let marker = journal_dir.join(MARKER);
        let mode = match std::fs::read(&marker) {
            Ok(bytes) => {
                let v = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
                let field = |k: &str| v.as_ref().and_then(|v| v[k].as_str().map(str::to_string));
                // Unreadable, it still says the machine failed over.
                let id = field("id").unwrap_or_else(|| REFUSAL_ID.to_string());
                if field("state").as_deref() == Some(HELD) {
                    // A final point taken before the restart may be reported already:
                    // writes stay held, and a new final point is taken once the
                    // orders say prepare again.
                    tracing::warn!(machine, failover = %id, "a planned failover was preparing before this start: writes held until the control plane's orders say otherwise");
                    Mode::Preparing {
                        id,
                        taken: None,
                        error: None,
                    }
                } else {
                    tracing::warn!(machine, failover = %id, marker = %marker.display(), "machine {machine} failed over to the recovery site before this start: replication stopped, disks read-only until the control plane lifts it");
                    Mode::ReadOnly { id }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Mode::Normal,
            Err(e) => return Err(e),
        };
        Ok(Switch {
            machine: machine.to_string(),
            replicating: AtomicBool::new(!matches!(mode, Mode::ReadOnly { .. })),
            marker,
            captures: Mutex::new(Vec::new()),
            mode: Mutex::new(mode),
            lifted: Mutex::new(None),
        })
    }

    fn writes_of(mode: &Mode) -> Writes {
        match mode {
            Mode::Normal => Writes::Open,
            Mode::Preparing { .. } => Writes::Held,
            Mode::ReadOnly { .. } => Writes::ReadOnly,
        }
    }

    /// Puts a disk under the switch, its gate set as the switch stands.
    pub fn add(&self, cap: Arc<Capture>) {
        let mode = self.mode.lock().expect("failover lock");
        cap.set_writes(Switch::writes_of(&mode));
        self.captures.lock().expect("failover lock").push(cap);
    }

    /// Each gate set under its capture lock: once this returns, no write is half
    /// done and every later one sees `w`.
    fn set_all(&self, w: Writes) {
        for c in self.captures.lock().expect("failover lock").iter() {
            c.set_writes(w);
        }
    }

    /// Whether the senders may replicate (not failed over).
    pub fn replicating(&self) -> bool {
        self.replicating.load(Ordering::SeqCst)
    }

    /// What the disks do with writes now.
    pub fn writes(&self) -> Writes {
        Switch::writes_of(&self.mode.lock().expect("failover lock"))
    }

    /// The machine failed over (failover `id`): disks read-only, replication stopped,
    /// kept for a restart. Logged once.
    pub fn read_only(&self, id: &str, why: &str) {
        let mut mode = self.mode.lock().expect("failover lock");
        if let Mode::ReadOnly { id: cur } = &*mode {
            if cur != id {
                // The control plane's order names the failover a refusal stood for.
                self.persist(READ_ONLY, id, why);
                *mode = Mode::ReadOnly { id: id.to_string() };
            }
            return;
        }
        // The gates first: from here the guest can change nothing the recovery site
        // does not hold.
        self.set_all(Writes::ReadOnly);
        self.replicating.store(false, Ordering::SeqCst);
        self.persist(READ_ONLY, id, why);
        *mode = Mode::ReadOnly { id: id.to_string() };
        tracing::warn!(machine = %self.machine, failover = id, why, "machine {} failed over to the recovery site: replication stopped, disks read-only", self.machine);
    }

    /// A planned failover `id` prepares: writes held, replication on (the final
    /// point must reach the process server). Returns whether this is news.
    pub fn prepare(&self, id: &str) -> bool {
        let mut mode = self.mode.lock().expect("failover lock");
        if matches!(&*mode, Mode::Preparing { id: cur, .. } if cur == id) {
            return false;
        }
        self.set_all(Writes::Held);
        self.persist(HELD, id, "a planned failover prepares");
        self.replicating.store(true, Ordering::SeqCst);
        *mode = Mode::Preparing {
            id: id.to_string(),
            taken: None,
            error: None,
        };
        tracing::info!(machine = %self.machine, failover = id, "planned failover: writes held, taking the final point of every disk");
        true
    }

    /// No failover any more: writes and replication resume. After a failover that
    /// completed (read-only), the disk may have been rewritten underneath by a
    /// failback and the journal may hold writes the replica never got: each disk's
    /// journal is dropped and a checksum resync wanted (`Capture::reenable`) before
    /// anything is sent or written. A cancelled planned failover (held) changed
    /// nothing underneath: its journal is sent as it is.
    pub fn lift(&self) {
        let mut mode = self.mode.lock().expect("failover lock");
        if *mode == Mode::Normal {
            return;
        }
        if matches!(*mode, Mode::ReadOnly { .. }) {
            for c in self.captures.lock().expect("failover lock").iter() {
                if let Err(e) = c.reenable() {
                    // Read-only stays, marker and all: the next answer without a
                    // failover tries again.
                    tracing::error!(machine = %self.machine, disk = %c.disk, error = %e, "cannot drop the journal from before the failover: staying read-only");
                    return;
                }
            }
        }
        self.unpersist();
        *self.lifted.lock().expect("failover lock") = Some(Instant::now());
        self.replicating.store(true, Ordering::SeqCst);
        self.set_all(Writes::Open);
        tracing::info!(machine = %self.machine, was = ?*mode, "the failover was lifted: writes and replication resume");
        *mode = Mode::Normal;
    }

    /// A process server refused the machine: it failed over. Returns whether the
    /// agent is now read-only (not within `LIFT_GRACE` of a lift, where the process
    /// server's list is taken for stale).
    pub fn refused(&self, why: &str) -> bool {
        if matches!(
            *self.mode.lock().expect("failover lock"),
            Mode::ReadOnly { .. }
        ) {
            return true;
        }
        let lifted = *self.lifted.lock().expect("failover lock");
        if lifted.is_some_and(|t| t.elapsed() < LIFT_GRACE) {
            tracing::debug!(why, "a process server still refuses this machine as failed over, just after the control plane lifted it; retrying");
            return false;
        }
        self.read_only(REFUSAL_ID, why);
        true
    }

    /// The failover whose final point is still to take.
    fn pending_final(&self) -> Option<String> {
        match &*self.mode.lock().expect("failover lock") {
            Mode::Preparing {
                id, taken: None, ..
            } => Some(id.clone()),
            _ => None,
        }
    }

    /// Records the final point of failover `id` (or why it could not be taken), if
    /// that failover still prepares. Returns whether the error is new.
    fn set_final(&self, for_id: &str, r: std::result::Result<Final, String>) -> bool {
        let mut mode = self.mode.lock().expect("failover lock");
        let Mode::Preparing { id, taken, error } = &mut *mode else {
            return false;
        };
        if id != for_id {
            return false;
        }
        match r {
            Ok(f) => {
                *taken = Some(f);
                *error = None;
                false
            }
            Err(e) => {
                let new = error.as_deref() != Some(e.as_str());
                *error = Some(e);
                new
            }
        }
    }

    /// The heartbeat's report; `durable` gives a disk's durable watermark at the
    /// process server.
    pub fn report(&self, durable: impl Fn(&str) -> u64) -> Option<FailoverReport> {
        let r = |id: &str, state: &str| FailoverReport {
            id: id.to_string(),
            state: state.to_string(),
            points: Vec::new(),
            error: None,
        };
        match &*self.mode.lock().expect("failover lock") {
            Mode::Normal => None,
            Mode::ReadOnly { id } => Some(r(id, "read-only")),
            Mode::Preparing {
                id,
                taken: None,
                error,
            } => Some(FailoverReport {
                error: error.clone(),
                ..r(
                    id,
                    if error.is_some() {
                        "failed"
                    } else {
                        "preparing"
                    },
                )
            }),
            Mode::Preparing {
                id, taken: Some(f), ..
            } => {
                if !f.seqs.iter().all(|(disk, seq)| durable(disk) > *seq) {
                    return Some(r(id, "preparing"));
                }
                Some(FailoverReport {
                    points: f
                        .seqs
                        .iter()
                        .map(|(disk, _)| DiskPoint {
                            disk: disk.clone(),
                            point: f.point.clone(),
                        })
                        .collect(),
                    ..r(id, "prepared")
                })
            }
        }
    }

    /// Writes the marker (through a temporary file and a rename, synced): a restart
    /// stays read-only. A failure is logged, not returned: the agent is read-only in
    /// memory whatever the disk says.
    fn persist(&self, state: &str, id: &str, why: &str) {
        let body =
            serde_json::json!({ "machine": self.machine, "state": state, "id": id, "why": why });
        let tmp = self.marker.with_extension("tmp");
        let r = (|| {
            if let Some(dir) = self.marker.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&tmp, body.to_string())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &self.marker)?;
            match self.marker.parent() {
                Some(dir) => std::fs::File::open(dir)?.sync_all(),
                None => Ok(()),
            }
        })();
        if let Err(e) = r {
            tracing::error!(path = %self.marker.display(), error = %e, state, "cannot record the failover for a restart: a restart would accept writes until the control plane or a process server says otherwise");
        }
    }

    fn unpersist(&self) {
        match std::fs::remove_file(&self.marker) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(path = %self.marker.display(), error = %e, "cannot remove the failed-over marker: the next start is read-only until the control plane lifts it again")
            }
        }
    }
}

impl Agent {
    /// Takes the final point of the failover that prepares, if not yet taken: every
    /// disk flushed (writes are held, so nothing follows it), then one point id on
    /// every disk. A crash-consistent point: the replica takes any kind, and with
    /// writes held and flushed the disks are quiescent, which a freeze hook could not
    /// improve on (and a failing hook must not stop a failover). Its error (a disk in
    /// its initial copy or a resync cannot point yet) is reported, and tried again at
    /// the next heartbeat.
    pub fn take_final_point(&self) -> Result<()> {
        let Some(id) = self.failover.pending_final() else {
            return Ok(());
        };
        let taken = self.final_point(&id);
        let r = taken.as_ref().map(Clone::clone).map_err(|e| e.to_string());
        if self.failover.set_final(&id, r) {
            if let Err(e) = &taken {
                tracing::warn!(failover = %id, error = %e, "the final point cannot be taken yet; trying again at the next heartbeat");
            }
        }
        if let Ok(f) = &taken {
            tracing::info!(failover = %id, point = %f.point, "final point taken; reported once the process server holds it");
        }
        taken.map(|_| ())
    }

    fn final_point(&self, failover: &str) -> Result<Final> {
        let _one = self.points.lock().expect("points lock");
        self.can_point()?;
        for d in &self.disks {
            d.capture.flush().map_err(|source| Error::Disk {
                disk: d.capture.disk.clone(),
                op: "flushing before the final point",
                source,
            })?;
        }
        let point = format!(
            "{}-{:08x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            rand::random::<u32>()
        );
        let label = format!("failover-{failover}");
        let mut seqs = Vec::with_capacity(self.disks.len());
        for d in &self.disks {
            let err = |source| Error::Disk {
                disk: d.capture.disk.clone(),
                op: "journaling the final point",
                source,
            };
            let seq = {
                let mut st = d.capture.state();
                d.capture
                    .bookmark_locked(&mut st, PointKindWire::Crash, &label, "", &point)
                    .map_err(err)?;
                st.last_point.as_ref().map_or(0, |p| p.1)
            };
            d.capture.sync_journal().map_err(err)?;
            seqs.push((d.capture.disk.clone(), seq));
        }
        Ok(Final { point, seqs })
    }

    /// Where the agent is with its failover order, for the heartbeat.
    pub fn failover_report(&self) -> Option<FailoverReport> {
        self.failover.report(|disk| {
            self.disks
                .iter()
                .find(|d| d.capture.disk == disk)
                .map_or(0, |d| d.status.lock().expect("status lock").durable)
        })
    }

    /// The failover switch (orders and refusals act on it).
    pub fn failover(&self) -> &Switch {
        &self.failover
    }
}

#[cfg(test)]
mod tests;
