//! The live agent: NBD export of each protected disk, write capture into an ordered
//! journal, one sender per disk draining it to the process server, crash-consistent
//! points on a timer, app-consistent points through a freeze hook, the initial copy
//! of each disk alongside live writes, and the admin socket.

pub mod admin;
pub mod capture;
pub mod checksum;
pub mod control;
pub mod failover;
pub mod group;
pub mod group_line;
pub mod group_role;
mod handles;
pub mod last_stop;
pub mod points;
pub mod sender;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_link::client::Target;
use ferry_link::protocol::PointKindWire;

use crate::error::{Error, Result};
use crate::nbd::{Device, Exports};
use capture::Capture;
use last_stop::LastStop;
use sender::{SendStatus, Sender, TargetSlot};

pub struct DiskSpec {
    pub name: String,
    pub path: PathBuf,
}

pub struct Options {
    pub machine: String,
    pub disks: Vec<DiskSpec>,
    pub target: Target,
    pub nbd_listen: SocketAddr,
    pub journal_dir: PathBuf,
    pub journal_bytes: u64,
    pub crash_point_interval: Option<Duration>,
    pub freeze_hook: Option<String>,
    pub admin_socket: Option<PathBuf>,
    /// Copy every disk in full into the journal at start (the first replication).
    pub initial_copy: bool,
    /// Replication group: members listen for the coordinator's cuts; the agent
    /// given peers coordinates and cuts a group point every crash-point interval.
    /// Under a control plane these start empty and its orders set the role
    /// (`set_group_role`); only `group_listen` (and the TLS) are given.
    pub group: Option<String>,
    /// Where the member's listener binds; without `group`, it refuses every
    /// coordinator until a role is set.
    pub group_listen: Option<SocketAddr>,
    /// A member's coordinator: the machine name its certificate must carry
    /// (required with `group_listen`).
    pub group_coordinator: Option<String>,
    pub group_peers: Vec<group::GroupPeer>,
    /// Mutual TLS of the group channel (required with a group or a listener).
    pub group_tls: Option<group::GroupTls>,
}

struct Disk {
    capture: Arc<Capture>,
    status: Arc<Mutex<SendStatus>>,
    copy: Arc<Mutex<CopyProgress>>,
}

/// The initial copy's progress: bytes done of the disk's, since when.
#[derive(Debug, Clone, Copy)]
struct CopyProgress {
    done: u64,
    total: u64,
    started: Instant,
}

impl CopyProgress {
    fn new(done: u64, total: u64) -> CopyProgress {
        CopyProgress {
            done,
            total,
            started: Instant::now(),
        }
    }
}

pub struct Agent {
    disks: Vec<Disk>,
    /// The process server every sender uses; the control plane may move it.
    target: Arc<TargetSlot>,
    /// Crash-consistent points every this long (None: none); the control plane's
    /// policy may change it while the agent runs.
    crash_point_interval: Mutex<Option<Duration>>,
    /// App-consistent points (through the freeze hook) every this long; only a
    /// control plane's policy sets it.
    app_point_interval: Mutex<Option<Duration>>,
    journal_dir: PathBuf,
    freeze_hook: Option<String>,
    pub nbd_addr: SocketAddr,
    /// Held or read-only writes and stopped replication while the machine fails over.
    failover: Arc<failover::Switch>,
    /// Where the admin socket and the group member listen: `stop` connects to each
    /// to wake its accept.
    admin_socket: Option<PathBuf>,
    group_addr: Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    /// Serialises points, so one id covers every disk.
    points: Mutex<()>,
    /// The group role (`group_role.rs`): at most one of the two is set.
    coordinator: Mutex<Option<group::Coordinator>>,
    membership: Mutex<Option<group::Membership>>,
    group_tls: Mutex<Option<group::GroupTls>>,
    /// Longest and last pause of writes for a group cut.
    pauses: Mutex<(Duration, Duration)>,
    /// The threads that use the disks and the journal (senders, resync loops,
    /// initial copies, the NBD acceptor, the point timer, the admin socket and the
    /// group member): `stop` waits for them.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// How often `stop` looks whether a thread ended, and the point timer at the flag.
const STOP_POLL: Duration = Duration::from_millis(5);

/// How long `stop` waits for the agent's threads. A sender may be inside a
/// connection attempt (its timeout is seconds), a resync loop inside one region.
const STOP_WAIT: Duration = Duration::from_secs(15);

fn hook(cmd: &str, phase: &'static str) -> Result<()> {
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{cmd} {phase}"))
        .status()
        .map_err(|source| Error::HookRun {
            cmd: cmd.to_string(),
            phase,
            source,
        })?;
    if !st.success() {
        return Err(Error::HookFailed {
            cmd: cmd.to_string(),
            phase,
            status: st,
        });
    }
    Ok(())
}

/// Starts a named thread of the agent.
fn spawn<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|source| Error::Thread { name, source })
}

impl Agent {
    pub fn start(o: Options) -> Result<Arc<Agent>> {
        if o.group_tls.is_none() && (o.group.is_some() || o.group_listen.is_some()) {
            return Err(Error::GroupTls {
                group: o.group.clone().unwrap_or_default(),
            });
        }
        // A member that accepted any agent of the CA would let any of them hold its
        // writes: it must know whom to accept.
        let member_of = match (&o.group, o.group_listen, &o.group_coordinator) {
            (Some(g), Some(_), Some(c)) => {
                group::check_machine_name(c).map_err(|e| Error::GroupSetup {
                    group: g.clone(),
                    why: format!("coordinator {e}"),
                })?;
                Some(group::Membership {
                    group: g.clone(),
                    coordinator: c.clone(),
                })
            }
            (Some(g), Some(_), None) => {
                return Err(Error::GroupSetup {
                    group: g.clone(),
                    why: "a member (--group-listen) must be told its coordinator's machine name (--group-coordinator NAME)".into(),
                })
            }
            _ => None,
        };
        // Each name is a directory under the journal directory and a path in the
        // store: one rule for both, checked before anything is created.
        ferry_replica::layout::check_name("machine", &o.machine).map_err(Error::Name)?;
        for d in &o.disks {
            ferry_replica::layout::check_name("disk", &d.name).map_err(Error::Name)?;
        }
        // Before any journal is opened: a live socket here is another agent, which
        // may be using these journals.
        let admin_listener = match &o.admin_socket {
            Some(p) => Some(admin::bind(p).map_err(|source| Error::Io {
                op: "admin socket",
                path: p.display().to_string(),
                source,
            })?),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(TargetSlot::new(o.target.clone()));
        let mut threads = Vec::new();
        let mut disks = Vec::new();
        let mut exports = Exports::default();
        let boot = last_stop::boot_id();
        let journal_err = |source| Error::Io {
            op: "journal dir",
            path: o.journal_dir.display().to_string(),
            source,
        };
        let last = last_stop::last(&o.journal_dir, &boot).map_err(journal_err)?;
        // Before any disk takes a write: a machine that failed over stays read-only.
        let switch = Arc::new(failover::Switch::open(&o.machine, &o.journal_dir).map_err(
            |source| Error::Io {
                op: "reading the failed-over marker in",
                path: o.journal_dir.display().to_string(),
                source,
            },
        )?);
        if let LastStop::HostDown { boot } = &last {
            tracing::warn!(last_boot = %boot, "the host went down while the agent ran: every copied disk is compared with its replica");
        }
        for d in &o.disks {
            let jdir = o.journal_dir.join(&d.name);
            let cap = Arc::new(
                Capture::open(&d.name, &d.path, &jdir, o.journal_bytes, 0).map_err(|source| {
                    Error::OpenDisk {
                        disk: d.name.clone(),
                        path: d.path.display().to_string(),
                        source,
                    }
                })?,
            );
            let redone = cap.reconcile().map_err(|source| Error::Disk {
                disk: d.name.clone(),
                op: "reconciling the journal",
                source,
            })?;
            if redone > 0 {
                tracing::info!(disk = %d.name, bytes = redone, "journaled the newest write's region again, as the disk holds it");
            }
            // A disk not yet copied is copied or compared by its first sync anyway.
            let copied = !o.initial_copy || copied_marker(&o.journal_dir, &d.name).exists();
            if matches!(last, LastStop::HostDown { .. }) && copied {
                cap.owe_compare().map_err(|source| Error::Disk {
                    disk: d.name.clone(),
                    op: "recording the comparison owed",
                    source,
                })?;
            }
            // Owed until a whole comparison is done: an agent restarted before that,
            // or one that has not reached its process server yet, still owes it (as
            // one restarted while its journal had overflowed, or after it lost its
            // numbers or its journal).
            if copied && cap.owes_compare() {
                if last_stop::owed_by_reenable(&jdir) {
                    // Still the re-enable's: the control plane waits for that one.
                    cap.resync.reenable("re-enabled after a failover: the comparison did not finish before this start");
                } else {
                    cap.resync.want("a comparison with the replica is owed: the host went down, or the journal overflowed or was lost, before the last one finished");
                }
            }
            switch.add(cap.clone());
            exports.add(&d.name, cap.clone());
            let (c2, st2) = (cap.clone(), stop.clone());
            threads.push(spawn(format!("ferry-resync-{}", d.name), move || {
                resync_loop(&c2, &st2)
            })?);
            let status = Arc::new(Mutex::new(SendStatus::default()));
            let sender = Sender {
                capture: cap.clone(),
                journal_dir: jdir,
                target: target.clone(),
                machine: o.machine.clone(),
                session: rand::random(),
                status: status.clone(),
                stop: stop.clone(),
                failover: switch.clone(),
            };
            threads.push(spawn(format!("ferry-send-{}", d.name), move || {
                sender.run()
            })?);
            disks.push(Disk {
                capture: cap,
                status,
                copy: Arc::new(Mutex::new(CopyProgress::new(0, 0))),
            });
        }
        // Replaced only now that the comparisons owed are recorded, and before any
        // write can arrive.
        last_stop::mark(&o.journal_dir, &boot).map_err(journal_err)?;
        let nbd_err = |source| Error::Io {
            op: "NBD listen on",
            path: o.nbd_listen.to_string(),
            source,
        };
        let listener = std::net::TcpListener::bind(o.nbd_listen).map_err(nbd_err)?;
        let nbd_addr = listener.local_addr().map_err(nbd_err)?;
        let (ex, st) = (Arc::new(exports), stop.clone());
        threads.push(spawn("ferry-nbd-accept".into(), move || {
            crate::nbd::serve(listener, ex, st)
        })?);
        let member = match o.group_listen {
            Some(addr) => {
                let group_err = |source| Error::Io {
                    op: "group listen on",
                    path: addr.to_string(),
                    source,
                };
                let l = std::net::TcpListener::bind(addr).map_err(group_err)?;
                let bound = l.local_addr().map_err(group_err)?;
                Some((l, bound))
            }
            None => None,
        };
        let agent = Arc::new(Agent {
            disks,
            target,
            crash_point_interval: Mutex::new(o.crash_point_interval),
            app_point_interval: Mutex::new(None),
            journal_dir: o.journal_dir.clone(),
            freeze_hook: o.freeze_hook.clone(),
            nbd_addr,
            failover: switch,
            admin_socket: admin_listener.as_ref().and(o.admin_socket.clone()),
            group_addr: member.as_ref().map(|m| m.1),
            stop: stop.clone(),
            points: Mutex::new(()),
            coordinator: Mutex::new(match (&o.group, &o.group_tls, o.group_peers.is_empty()) {
                (Some(g), Some(t), false) => Some(group::Coordinator::new(
                    g.clone(),
                    o.group_peers.clone(),
                    t.coordinator.clone(),
                )),
                _ => None,
            }),
            membership: Mutex::new(member_of),
            group_tls: Mutex::new(o.group_tls.clone()),
            pauses: Mutex::new((Duration::ZERO, Duration::ZERO)),
            threads: Mutex::new(threads),
        });
        if let Some((l, _)) = member {
            let (a, st): (Arc<dyn group::GroupSide>, _) = (agent.clone(), stop.clone());
            let t = spawn("ferry-group-accept".into(), move || group::serve(l, a, st))?;
            agent.threads.lock().expect("threads lock").push(t);
        }
        if o.initial_copy {
            for d in &agent.disks {
                // Once copied into the journal, a disk is never copied again: its
                // journal and the process server carry everything since.
                let marker = copied_marker(&o.journal_dir, &d.capture.disk);
                if marker.exists() {
                    continue;
                }
                *d.copy.lock().expect("copy lock") = CopyProgress::new(0, d.capture.size());
                let (cap, copy, stop) = (d.capture.clone(), d.copy.clone(), stop.clone());
                let t = spawn(format!("ferry-copy-{}", cap.disk), move || {
                    if first_sync(&cap, &copy, &stop) {
                        if let Err(e) = cap
                            .sync_journal()
                            .and_then(|_| std::fs::write(&marker, b""))
                        {
                            tracing::error!(disk = %cap.disk, error = %e, "cannot record the initial copy as done");
                        }
                    }
                })?;
                agent.threads.lock().expect("threads lock").push(t);
            }
        }
        {
            // Always running, idle without an interval: the control plane's policy may
            // set or change the intervals at any heartbeat.
            let a = agent.clone();
            let t = spawn("ferry-points".into(), move || control::point_timer(&a))?;
            agent.threads.lock().expect("threads lock").push(t);
        }
        if let Some(l) = admin_listener {
            let t = admin::serve(l, agent.clone(), stop.clone()).map_err(|source| Error::Io {
                op: "admin socket",
                path: o
                    .admin_socket
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                source,
            })?;
            agent.threads.lock().expect("threads lock").push(t);
        }
        Ok(agent)
    }

    /// Whether a point now would rebuild: not during the initial copy or a resync.
    pub fn can_point(&self) -> Result<()> {
        let not_now = |d: &Disk, why: String| Error::NotNow {
            disk: d.capture.disk.clone(),
            why,
        };
        // Nothing it takes would ever be replicated.
        if !self.failover.replicating() {
            return Err(Error::FailedOver);
        }
        for d in &self.disks {
            if d.capture.resync.busy() {
                let (phase, f, _) = d.capture.resync.figures();
                return Err(not_now(d, format!(
                    "is in a checksum resync ({phase:?}, {} of {} bytes compared): no point until done",
                    f.compared, f.total
                )));
            }
            if d.capture.state().overflowed {
                return Err(not_now(
                    d,
                    "overflowed its journal and is resyncing its dirty regions: no point until done"
                        .into(),
                ));
            }
            let CopyProgress { done, total, .. } = *d.copy.lock().expect("copy lock");
            if done < total {
                return Err(not_now(
                    d,
                    format!(
                        "is still in its initial copy ({:.1} %): no point yet",
                        100.0 * done as f64 / total as f64
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Cuts a group point with every member (this agent must be the coordinator);
    /// returns its id and the longest time any member held writes.
    pub fn group_point(&self) -> Result<(String, Duration)> {
        let _one = self.points.lock().expect("points lock");
        let mut c = self.coordinator.lock().expect("coordinator lock");
        c.as_mut().ok_or(Error::NotCoordinator)?.cut(self)
    }

    fn record_pause(&self, d: Duration) {
        let mut p = self.pauses.lock().expect("pauses lock");
        p.0 = p.0.max(d);
        p.1 = d;
    }

    /// (longest, last) pause of writes for a group cut on this agent.
    pub fn pauses(&self) -> (Duration, Duration) {
        *self.pauses.lock().expect("pauses lock")
    }

    fn point(&self, kind: PointKindWire, label: Option<&str>) -> Result<String> {
        let _one = self.points.lock().expect("points lock");
        // A point during the initial copy or a resync would not rebuild the disk:
        // never emit one the replica cannot honour.
        self.can_point()?;
        let id = format!(
            "{}-{:08x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            rand::random::<u32>()
        );
        for d in &self.disks {
            d.capture
                .bookmark(kind, label.unwrap_or(""), "", Some(&id))
                .map_err(|source| Error::Disk {
                    disk: d.capture.disk.clone(),
                    op: "journaling the point",
                    source,
                })?;
        }
        Ok(id)
    }

    /// Takes a point now; app-consistent ones run the freeze hook around it.
    pub fn bookmark(&self, app: bool, label: Option<&str>) -> Result<String> {
        if !app {
            return self.point(PointKindWire::Crash, label);
        }
        let hook_cmd = self.freeze_hook.as_deref().ok_or(Error::NoFreezeHook)?;
        hook(hook_cmd, "freeze")?;
        let r = self.point(PointKindWire::App, label);
        // Thaw whatever happened: applications must not stay frozen.
        let thawed = hook(hook_cmd, "thaw");
        let id = r?;
        thawed?;
        Ok(id)
    }

    /// Starts a checksum resync of one disk, or of every disk: the replica's block
    /// checksums are compared with the disk and only differing blocks are sent.
    pub fn resync(&self, disk: Option<&str>) -> Result<Vec<String>> {
        let chosen: Vec<&Disk> = self
            .disks
            .iter()
            .filter(|d| disk.is_none_or(|n| n == d.capture.disk))
            .collect();
        if chosen.is_empty() {
            return Err(Error::NoDisk {
                disk: disk.unwrap_or("").to_string(),
            });
        }
        // Every disk is checked before any starts: an error means none started.
        for d in &chosen {
            let CopyProgress { done, total, .. } = *d.copy.lock().expect("copy lock");
            let not_now = |why: &str| Error::NotNow {
                disk: d.capture.disk.clone(),
                why: why.to_string(),
            };
            if done < total {
                return Err(not_now("is still in its initial copy"));
            }
            if d.capture.resync.busy() {
                return Err(not_now("is already in a checksum resync"));
            }
        }
        let mut started = Vec::new();
        for d in chosen {
            // One that began since the check (after a lost numbering) runs anyway.
            d.capture.resync.want("asked for");
            started.push(d.capture.disk.clone());
        }
        Ok(started)
    }

    /// Per disk: mode, journal, watermarks, lag, last point, copy progress.
    pub fn status(&self) -> Vec<serde_json::Value> {
        self.disks
            .iter()
            .map(|d| {
                let s = d.status.lock().expect("status lock").clone();
                let (next_seq, journal, last, overflowed, dirty, uploaded_point) = {
                    let mut st = d.capture.state();
                    // As the heartbeat reports it (before the first session nothing
                    // is claimed uploaded), so that the two can be compared.
                    let (_, u) = st.points.report(if s.connected || s.uploaded > 0 { s.uploaded } else { 0 });
                    (st.next_seq, st.journal.used_bytes(), st.last_point.clone(), st.overflowed, st.dirty.len(), u)
                };
                let now_ms = chrono::Utc::now().timestamp_millis();
                let copy = *d.copy.lock().expect("copy lock");
                let (done, total) = (copy.done, copy.total);
                let (phase, now, last_rs) = d.capture.resync.figures();
                let resyncing = phase != checksum::Phase::Idle;
                serde_json::json!({
                    "disk": d.capture.disk,
                    "mode": if overflowed { "bitmap" } else if resyncing { "checksum-resync" } else if total > 0 && done < total { "initial-copy" } else { "data" },
                    "resync": resyncing.then(|| checksum::figures_json(&now)),
                    "last_resync": last_rs.as_ref().map(checksum::figures_json),
                    "dirty_regions": dirty,
                    "journal_bytes": journal,
                    "next_seq": next_seq,
                    "durable": s.durable,
                    "uploaded": s.uploaded,
                    "lag_s": s.oldest_unacked.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                    "last_point": last.map(|p| p.0),
                    // The agent's own RPO: now minus the time of the newest point
                    // known to be in the store (null before the first).
                    "uploaded_point": uploaded_point.as_ref().map(|p| serde_json::json!({"id": p.id, "time_ms": p.time_ms})),
                    "rpo_s": uploaded_point.as_ref().map(|p| (now_ms - p.time_ms) as f64 / 1000.0),
                    "connected": s.connected,
                    "protocol": s.protocol,
                    "copy_done_bytes": done,
                    "copy_total_bytes": total,
                    "copy": (total > 0 && done < total).then(|| checksum::progress_json(done, total, copy.started.elapsed().as_secs_f64())),
                    "last_error": s.last_error,
                    "writes": d.capture.writes().as_str(),
                    "replicating": self.failover.replicating(),
                    "failover": self.failover_report(),
                })
            })
            .collect()
    }

    /// Whether every disk's journal, up to now, is uploaded.
    pub fn uploaded_all(&self) -> bool {
        self.disks.iter().all(|d| {
            let next = d.capture.state().next_seq;
            d.status.lock().expect("status lock").uploaded >= next
        })
    }

    /// Stops the agent and waits (up to STOP_WAIT) for the threads that use its
    /// disks, journal and process server sessions to end, so that another agent may
    /// take over the same journal directory, NBD address, admin socket, group
    /// address and sessions right after. Not waited for: NBD connections (each ends
    /// with its client).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // The NBD acceptor, the group member and the admin socket block in accept():
        // a connection wakes each to see the flag.
        wake(self.nbd_addr);
        if let Some(a) = self.group_addr {
            wake(a);
        }
        if let Some(p) = &self.admin_socket {
            let _ = std::os::unix::net::UnixStream::connect(p);
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        let deadline = Instant::now() + STOP_WAIT;
        let me = std::thread::current().id();
        for t in threads {
            let name = t.thread().name().unwrap_or("unnamed").to_string();
            // The point timer stopping the agent cannot wait for itself.
            if t.thread().id() == me {
                continue;
            }
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(STOP_POLL);
            }
            if !t.is_finished() {
                tracing::warn!(thread = %name, wait_s = STOP_WAIT.as_secs(), "an agent thread did not end in time; left running");
            } else if t.join().is_err() {
                tracing::error!(thread = %name, "an agent thread had panicked");
            }
        }
    }

    /// Stops in order: every disk flushed and its journal synced, then the run marker
    /// removed, so the next start knows the host did not go down under this run and
    /// need not compare the disks. Writes arriving after a disk's last flush are
    /// refused (the guest sees an I/O error, as from a disk that went away).
    pub fn shutdown(&self) -> Result<()> {
        self.stop();
        for d in &self.disks {
            d.capture.close().map_err(|source| Error::Disk {
                disk: d.capture.disk.clone(),
                op: "flushing",
                source,
            })?;
        }
        last_stop::end(&self.journal_dir).map_err(|source| Error::Io {
            op: "journal dir",
            path: self.journal_dir.display().to_string(),
            source,
        })
    }
}

/// Connects to a listener of this agent, so that its accept returns.
fn wake(mut addr: SocketAddr) {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1));
}

/// Marks that a disk's initial copy is in its journal: it is never copied again.
fn copied_marker(journal_dir: &std::path::Path, disk: &str) -> PathBuf {
    journal_dir.join(format!("{disk}.copied"))
}

/// Journals the dirty regions again after an overflow, and compares the disk with
/// the replica's checksums during a checksum resync, each as the journal drains.
fn resync_loop(cap: &Capture, stop: &AtomicBool) {
    let mut buf = Vec::new();
    let mut last_log = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // One look at the capture state (every write takes its lock), and none while
        // there is nothing to do.
        if !cap.resync.busy() && !cap.state().overflowed {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let (full, overflowed) = {
            let st = cap.state();
            (
                st.journal.used_bytes() > st.journal.max_bytes() / 2,
                st.overflowed,
            )
        };
        if full {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if overflowed {
            if let Err(e) = cap.resync_one(&mut buf) {
                tracing::error!(disk = %cap.disk, error = %e, "resync of a dirty region failed");
                std::thread::sleep(Duration::from_secs(1));
            }
            continue;
        }
        let Some((map, offset, len)) = cap.resync.next_range(capture::REGION_BYTES) else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        match cap.compare_range(&map, offset, len, &mut buf) {
            Ok(sent) => {
                if let Some(f) = cap.resync.advance(len, sent) {
                    tracing::info!(disk = %cap.disk, compared_bytes = f.total, sent_bytes = f.sent, seconds = f.seconds, "checksum resync done");
                    // What it found is journaled: once durable, no comparison is owed.
                    if let Err(e) = cap.compared() {
                        tracing::warn!(disk = %cap.disk, error = %e, "could not record the comparison as done; it runs again at the next start");
                    }
                } else if last_log.elapsed() > Duration::from_secs(5) {
                    last_log = Instant::now();
                    let (_, f, _) = cap.resync.figures();
                    checksum::log_progress(
                        &cap.disk,
                        "checksum resync",
                        &checksum::figures_json(&f),
                    );
                }
            }
            Err(e) => {
                tracing::error!(disk = %cap.disk, error = %e, offset, "checksum resync of a range failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// The first synchronisation of a disk this agent has not copied: once the process
/// server first answers, a full copy if the replica holds nothing of the disk, else
/// a checksum resync (the replica exists: the journal was lost, or the disk was
/// seeded). Returns whether it finished.
fn first_sync(cap: &Capture, copy: &Mutex<CopyProgress>, stop: &AtomicBool) -> bool {
    let durable = loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let c = cap.contact.load(Ordering::SeqCst);
        if c != capture::NO_CONTACT {
            break c;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if durable == 0 {
        return initial_copy(cap, copy, stop);
    }
    // Points stay refused throughout: the resync is wanted before the copy's
    // progress is cleared.
    cap.resync
        .want("the replica already holds this disk: sending only what differs");
    *copy.lock().expect("copy lock") = CopyProgress::new(0, 0);
    tracing::info!(disk = %cap.disk, durable, "the replica already holds this disk: checksum resync instead of a full copy");
    while cap.resync.busy() {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Journals every non-zero MiB of the disk, each under the capture lock, logging
/// progress (percent, MB/s, time left).
fn initial_copy(cap: &Capture, progress: &Mutex<CopyProgress>, stop: &AtomicBool) -> bool {
    let size = cap.size();
    *progress.lock().expect("copy lock") = CopyProgress::new(0, size);
    let start = Instant::now();
    let mut last_log = Instant::now();
    let mut buf = Vec::new();
    let mut off = 0;
    while off < size {
        // Leave half the journal to live writes: wait for the sender to drain it.
        // Stopped, the sender drains nothing more, and the copy resumes at the next
        // start (it is not recorded as done).
        while cap.journal_bytes() > cap.journal_max() / 2 {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let len = (size - off).min(1 << 20) as usize;
        if let Err(e) = cap.copy_region(off, len, &mut buf) {
            tracing::error!(disk = %cap.disk, error = %e, offset = off, "initial copy stopped");
            return false;
        }
        off += len as u64;
        progress.lock().expect("copy lock").done = off;
        if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
            let p = checksum::progress_json(off, size, start.elapsed().as_secs_f64());
            checksum::log_progress(&cap.disk, "initial copy", &p);
        }
    }
    tracing::info!(disk = %cap.disk, seconds = start.elapsed().as_secs_f64(), "initial copy done");
    true
}
