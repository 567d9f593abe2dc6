//! The agent under a control plane: what its heartbeat reports (per disk: size, state,
//! copy progress, journal, the newest point and the newest uploaded), and its orders
//! applied while it runs: a new crash-point interval from the next point on, and a new
//! process server (an operator's move) by reconnecting the senders there, resuming
//! from the journal. The last orders are kept in the state directory, so a restart
//! while the control plane is down replicates where it did before. A failover order
//! holds writes and takes the final point, or stops replication (`failover`); only a
//! fresh answer without one lifts it, never the orders kept for a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::group::{check_machine_name, GroupPeer, GroupTls, Membership};
use super::group_role::GroupRole;
use chrono::{TimeZone, Utc};
use ferry_link::client::Target;
use ferry_link::control::client::{Heartbeater, IdentityFiles};
use ferry_link::control::limits::{trimmed, MAX_TEXT_BYTES};
use ferry_link::control::wire::{
    AgentHeartbeat, AgentOrders, DiskReport, FailoverOrder, PointRef, ProcessServerRef,
    ResyncReport,
};
use ferry_link::protocol::PointKindWire;
use ferry_link::tls::certs::{client_config, server_name};

use super::points::PointMark;
use super::{checksum, Agent, CopyProgress, STOP_POLL};
use crate::error::{Error, Result};
use crate::nbd::Device;

/// How long a sender's connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Agent {
    pub fn crash_point_interval(&self) -> Option<Duration> {
        *self.crash_point_interval.lock().expect("interval lock")
    }

    /// Points every `every` from the last one on (None: no crash-consistent points);
    /// returns whether it changed.
    pub fn set_crash_point_interval(&self, every: Option<Duration>) -> bool {
        let mut cur = self.crash_point_interval.lock().expect("interval lock");
        let changed = *cur != every;
        *cur = every;
        changed
    }

    pub fn app_point_interval(&self) -> Option<Duration> {
        *self.app_point_interval.lock().expect("interval lock")
    }

    /// App-consistent points (freeze hook, point, thaw) every `every`; returns whether
    /// it changed.
    pub fn set_app_point_interval(&self, every: Option<Duration>) -> bool {
        let mut cur = self.app_point_interval.lock().expect("interval lock");
        let changed = *cur != every;
        *cur = every;
        changed
    }

    /// The process server the senders use now.
    pub fn target(&self) -> Target {
        self.target.get()
    }

    /// Sends to `t` from now on: sessions to another address end (once the old
    /// server has uploaded what it was sent) and resume there from the journal. The
    /// same address with new TLS (a renewed certificate) applies at the next connect.
    /// Returns whether the address changed.
    pub fn retarget(&self, t: Target) -> bool {
        self.target.set(t)
    }

    /// Whether every disk has a session with the process server now.
    pub fn connected(&self) -> bool {
        self.disks
            .iter()
            .all(|d| d.status.lock().expect("status lock").connected)
    }

    /// The last connection error or refusal of any disk, as `status` shows it.
    pub fn last_error(&self) -> Option<String> {
        self.disks
            .iter()
            .find_map(|d| d.status.lock().expect("status lock").last_error.clone())
    }

    /// Each disk as the heartbeat reports it.
    pub fn disk_reports(&self) -> Vec<DiskReport> {
        self.disks
            .iter()
            .map(|d| {
                let (uploaded, connected) = {
                    let s = d.status.lock().expect("status lock");
                    (s.uploaded, s.connected)
                };
                let (journal, overflowed, newest, newest_uploaded) = {
                    let mut st = d.capture.state();
                    // Before the first session the watermark is not known: nothing
                    // is claimed uploaded.
                    let (n, u) = st.points.report(if connected || uploaded > 0 {
                        uploaded
                    } else {
                        0
                    });
                    (st.journal.used_bytes(), st.overflowed, n, u)
                };
                let CopyProgress { done, total, .. } = *d.copy.lock().expect("copy lock");
                let copying = total > 0 && done < total;
                let (phase, now, last) = d.capture.resync.figures();
                let resyncing = overflowed || phase != checksum::Phase::Idle;
                DiskReport {
                    name: d.capture.disk.clone(),
                    size_bytes: d.capture.size(),
                    state: if copying {
                        "initial-copy"
                    } else if resyncing {
                        "resync"
                    } else {
                        "protected"
                    }
                    .to_string(),
                    initial_copy_percent: if copying {
                        100.0 * done as f64 / total as f64
                    } else {
                        100.0
                    },
                    journal_bytes: journal,
                    // The journal is trimmed as the process server acknowledges frames
                    // durable: what it holds is exactly what is not yet acknowledged.
                    unacked_bytes: journal,
                    newest_point: newest.as_ref().map(point_ref),
                    newest_uploaded_point: newest_uploaded.as_ref().map(point_ref),
                    resync: resync_report(phase, &now, last.as_ref()),
                }
            })
            .collect()
    }
}

/// The resync under way, else the last one done, as the heartbeat reports it.
fn resync_report(
    phase: checksum::Phase,
    now: &checksum::Figures,
    last: Option<&checksum::Figures>,
) -> Option<ResyncReport> {
    let (f, phase) = match (phase, last) {
        (checksum::Phase::Idle, None) => return None,
        (checksum::Phase::Idle, Some(f)) => (f, "done"),
        (p, _) => (now, p.as_str()),
    };
    Some(ResyncReport {
        reason: if f.reenable { "re-enable" } else { "other" }.to_string(),
        phase: phase.to_string(),
        compared_bytes: f.compared,
        total_bytes: f.total,
        sent_bytes: f.sent,
    })
}

fn point_ref(p: &PointMark) -> PointRef {
    PointRef {
        id: p.id.clone(),
        // A group point is crash-consistent across its machines.
        kind: match p.kind {
            PointKindWire::App => "app",
            PointKindWire::Crash | PointKindWire::Group => "crash",
        }
        .to_string(),
        time: Utc
            .timestamp_millis_opt(p.time_ms)
            .single()
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}

/// Takes crash-consistent (and a coordinator's group) points and app-consistent
/// points as the intervals say, until the agent stops. The intervals are read at every
/// slice, so a new one applies from the last point on, not once the old one ran out;
/// an app-consistent point due is taken instead of the crash-consistent one.
pub(super) fn point_timer(a: &Agent) {
    let (mut last_crash, mut last_app) = (Instant::now(), Instant::now());
    let mut no_hook_said = false;
    while !a.stop.load(Ordering::Relaxed) {
        if !a.failover.replicating() {
            // Failed over: a point would never replicate (and each would warn).
            std::thread::sleep(STOP_POLL);
            continue;
        }
        let (crash, app) = (a.crash_point_interval(), a.app_point_interval());
        // Without an interval, the first point comes one interval after it is set.
        if crash.is_none() {
            last_crash = Instant::now();
        }
        if app.is_none() {
            last_app = Instant::now();
        }
        let app_due = app.is_some_and(|e| last_app.elapsed() >= e);
        let crash_due = crash.is_some_and(|e| last_crash.elapsed() >= e);
        if !app_due && !crash_due {
            // In slices, so that `stop` need not wait out an interval.
            std::thread::sleep(STOP_POLL);
            continue;
        }
        if app_due {
            last_app = Instant::now();
            if a.freeze_hook.is_some() {
                last_crash = Instant::now();
                match a.bookmark(true, None) {
                    Ok(id) => tracing::debug!(id, "app-consistent point"),
                    Err(e) => tracing::warn!(error = %e, "app-consistent point skipped"),
                }
                continue;
            }
            if !no_hook_said {
                tracing::warn!("the policy asks for app-consistent points but this agent has no --freeze-hook: crash-consistent points only");
                no_hook_said = true;
            }
            if !crash_due {
                continue;
            }
        }
        last_crash = Instant::now();
        if let Err(e) = a.point(PointKindWire::Crash, None) {
            tracing::warn!(error = %e, "crash-consistent point skipped");
        }
        if a.is_coordinator() {
            match a.group_point() {
                Ok((id, pause)) => {
                    tracing::info!(id, pause_us = pause.as_micros() as u64, "group point")
                }
                Err(e) => tracing::warn!(error = %e, "group point skipped"),
            }
        }
    }
}

/// How this agent reaches the process server `ps` with its enrolled identity.
pub fn target_for(ps: &ProcessServerRef, id: &IdentityFiles) -> Result<Target> {
    let err = |why: String| Error::ProcessServer {
        name: ps.name.clone(),
        address: ps.address.clone(),
        why,
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&ps.address)
        .map_err(|e| err(format!("resolving: {e}")))?
        .next()
        .ok_or_else(|| err("no address".into()))?;
    let host = ps
        .address
        .rsplit_once(':')
        .map_or(ps.address.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    Ok(Target {
        addr,
        server_name: server_name(host).map_err(|e| err(e.to_string()))?,
        tls: Arc::new(client_config(&id.cert, &id.key, &id.ca).map_err(|e| err(e.to_string()))?),
        timeout: CONNECT_TIMEOUT,
    })
}

/// The crash-point interval a policy asks for (none at 0 or below).
pub fn interval_of(orders: &AgentOrders) -> Option<Duration> {
    let s = orders.policy.crash_point_interval_s;
    (s.is_finite() && s > 0.0).then(|| Duration::from_secs_f64(s))
}

/// The app-consistent point interval a policy asks for (none at 0).
pub fn app_interval_of(orders: &AgentOrders) -> Option<Duration> {
    let s = orders.policy.app_point_interval_s;
    (s > 0).then(|| Duration::from_secs(s))
}

/// The group role the orders give machine `machine`: a member of the group under
/// its coordinator, or the coordinator of the members listed (each resolved now; one
/// that cannot be is left out of the cuts, with a warning, until the next orders).
pub fn group_role_of(orders: &AgentOrders, machine: &str) -> GroupRole {
    let (Some(group), Some(coordinator)) = (&orders.group, &orders.group_coordinator) else {
        return GroupRole::None;
    };
    if coordinator != machine {
        if let Err(e) = check_machine_name(coordinator) {
            tracing::warn!(group, error = %e, "the orders name a coordinator no certificate can carry: no group role");
            return GroupRole::None;
        }
        return GroupRole::Member(Membership {
            group: group.clone(),
            coordinator: coordinator.clone(),
        });
    }
    let peers = orders
        .group_members
        .iter()
        .filter_map(|m| {
            let peer = check_machine_name(&m.name)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    std::net::ToSocketAddrs::to_socket_addrs(&m.address)
                        .map_err(|e| e.to_string())?
                        .next()
                        .ok_or_else(|| "no address".to_string())
                })
                .map(|addr| GroupPeer {
                    name: m.name.clone(),
                    addr,
                });
            match peer {
                Ok(p) => Some(p),
                Err(why) => {
                    tracing::warn!(group, member = %m.name, address = %m.address, why, "left out of this group's cuts");
                    None
                }
            }
        })
        .collect();
    GroupRole::Coordinator {
        group: group.clone(),
        peers,
    }
}

/// The last orders, kept in the state directory.
pub fn load_orders(path: &Path) -> Option<AgentOrders> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable saved orders");
            None
        }
    }
}

/// Keeps `o` for a restart (through a temporary file and a rename).
pub fn save_orders(path: &Path, o: &AgentOrders) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(o).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

/// The agent's side of the heartbeat loop.
pub struct Controlled {
    agent: Arc<Agent>,
    machine: String,
    identity: IdentityFiles,
    orders_file: PathBuf,
    /// The orders applied last (the ones in `orders_file`).
    applied: Option<AgentOrders>,
    /// The process server the senders use, as the orders named it.
    serving: Option<ProcessServerRef>,
    /// The last error reported, so each is reported once.
    reported_error: Option<String>,
    /// Where this agent's group coordinator reaches it, as its heartbeat says.
    group_listen: Option<String>,
}

impl Controlled {
    /// `applied`: the orders the agent was started with (its target and interval);
    /// their group role is taken here. The group-listen address reported is the
    /// listener's own, unless it is bound to every interface (see
    /// `advertise_group_listen`).
    pub fn new(
        agent: Arc<Agent>,
        machine: String,
        identity: IdentityFiles,
        orders_file: PathBuf,
        applied: AgentOrders,
    ) -> Controlled {
        let group_listen = agent
            .group_addr()
            .filter(|a| !a.ip().is_unspecified())
            .map(|a| a.to_string());
        let c = Controlled {
            agent,
            machine,
            identity,
            orders_file,
            serving: applied.process_server.clone(),
            applied: None,
            reported_error: None,
            group_listen,
        };
        c.apply_group(&applied);
        // Kept orders may be older than a failover: they never lift one (the marker
        // the agent started with stands), only the control plane's next answer does.
        c.apply_failover(applied.failover.as_ref(), false);
        Controlled {
            applied: Some(applied),
            ..c
        }
    }

    /// Reports `addr` (HOST:PORT) as where the coordinator reaches this agent.
    pub fn advertise_group_listen(&mut self, addr: String) {
        self.group_listen = Some(addr);
    }

    /// Acts on the failover order: None lifts a failover (only from a `fresh`
    /// answer), `prepare` holds writes and takes the final point, `failed-over` (or
    /// a state this agent does not know: the safe side) stops replication and turns
    /// the disks read-only.
    fn apply_failover(&self, order: Option<&FailoverOrder>, fresh: bool) {
        let switch = self.agent.failover();
        match order {
            None if fresh => switch.lift(),
            None => {}
            Some(o) if o.state == "prepare" => {
                switch.prepare(&o.id);
                // Its error is in the report; tried again at the next heartbeat.
                let _ = self.agent.take_final_point();
            }
            Some(o) => {
                if o.state != "failed-over" {
                    tracing::warn!(failover = %o.id, state = %o.state, "a failover order this agent does not know: taken as failed over");
                }
                switch.read_only(&o.id, "the control plane's orders say so");
            }
        }
    }

    /// Takes the group role the orders give.
    fn apply_group(&self, orders: &AgentOrders) {
        let role = group_role_of(orders, &self.machine);
        if matches!(role, GroupRole::Member(_)) && self.agent.group_addr().is_none() {
            tracing::warn!(group = ?orders.group, "the control plane made this machine a group member, but it has no --group-listen: its coordinator cannot reach it");
        }
        match self.agent.set_group_role(role.clone()) {
            Ok(true) => tracing::info!(role = ?role, "the group role changed"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(group = ?orders.group, error = %e, "cannot take the group role the control plane gave")
            }
        }
    }
}

impl Heartbeater for Controlled {
    type Report = AgentHeartbeat;
    type Orders = AgentOrders;
    const PATH: &'static str = "/v1/heartbeat/agent";

    fn report(&mut self) -> AgentHeartbeat {
        let err = self.agent.last_error();
        let last_error = if err != self.reported_error {
            self.reported_error = err.clone();
            err
        } else {
            None
        };
        AgentHeartbeat {
            machine: self.machine.clone(),
            disks: self.agent.disk_reports(),
            process_server: self
                .agent
                .connected()
                .then(|| self.serving.as_ref().map(|p| p.name.clone()))
                .flatten(),
            // Cut to what the control plane takes: a long error chain must not get
            // the heartbeat refused.
            last_error: last_error.map(|e| trimmed(&e, MAX_TEXT_BYTES)),
            group_listen: self.group_listen.clone(),
            failover: self.agent.failover_report(),
        }
    }

    fn apply(&mut self, orders: AgentOrders) -> f64 {
        let interval = orders.heartbeat_interval_s;
        // At every answer, not only a changed one: the final point is tried again
        // until it can be taken.
        self.apply_failover(orders.failover.as_ref(), true);
        if self.applied.as_ref() == Some(&orders) {
            return interval;
        }
        let every = interval_of(&orders);
        if self.agent.set_crash_point_interval(every) {
            tracing::info!(policy = %orders.policy.name, interval_s = ?every.map(|d| d.as_secs_f64()), "the crash-point interval changed");
        }
        let app = app_interval_of(&orders);
        if self.agent.set_app_point_interval(app) {
            tracing::info!(policy = %orders.policy.name, interval_s = ?app.map(|d| d.as_secs()), "the app-consistent point interval changed");
        }
        self.apply_group(&orders);
        match &orders.process_server {
            Some(ps) if self.serving.as_ref() != Some(ps) => {
                match target_for(ps, &self.identity) {
                    Ok(t) => {
                        self.agent.retarget(t);
                        tracing::info!(process_server = %ps.name, address = %ps.address, "the control plane moved this machine: the senders reconnect there");
                        self.serving = Some(ps.clone());
                    }
                    // Kept on the old one; tried again at the next heartbeat (the
                    // orders are not recorded as applied).
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot use the process server the control plane named; staying");
                        return interval;
                    }
                }
            }
            Some(_) => {}
            None => {
                tracing::debug!("no process server assigned now: keeping the current one")
            }
        }
        if let Err(e) = save_orders(&self.orders_file, &orders) {
            tracing::warn!(path = %self.orders_file.display(), error = %e, "cannot keep the orders for a restart");
        }
        self.applied = Some(orders);
        interval
    }

    fn renewed(&mut self, files: &IdentityFiles) {
        // The same process server with the new certificate, for the next connect.
        if let Some(ps) = &self.serving {
            match target_for(ps, files) {
                Ok(t) => {
                    self.agent.retarget(t);
                }
                Err(e) => tracing::warn!(error = %e, "cannot load the renewed certificate"),
            }
        }
        match GroupTls::load(&files.cert, &files.key, &files.ca) {
            Ok(t) => self.agent.set_group_tls(t),
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the renewed certificate for the group channel")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_link::control::wire::{AgentPolicy, GroupMemberRef};

    use super::*;

    fn in_group(coordinator: Option<&str>, members: &[(&str, &str)]) -> AgentOrders {
        AgentOrders {
            process_server: None,
            policy: AgentPolicy {
                name: "default".into(),
                crash_point_interval_s: 5.0,
                app_point_interval_s: 0,
            },
            group: Some("g1".into()),
            heartbeat_interval_s: 5.0,
            group_coordinator: coordinator.map(str::to_string),
            group_members: members
                .iter()
                .map(|(n, a)| GroupMemberRef {
                    name: n.to_string(),
                    address: a.to_string(),
                })
                .collect(),
            failover: None,
        }
    }

    #[test]
    fn the_orders_give_each_machine_its_group_role() {
        assert_eq!(group_role_of(&in_group(None, &[]), "m1"), GroupRole::None);
        let mut no_group = in_group(Some("m1"), &[]);
        no_group.group = None;
        assert_eq!(group_role_of(&no_group, "m1"), GroupRole::None);
        assert_eq!(
            group_role_of(&in_group(Some("m0"), &[]), "m1"),
            GroupRole::Member(Membership {
                group: "g1".into(),
                coordinator: "m0".into()
            })
        );
        assert_eq!(
            group_role_of(&in_group(Some("bad name!"), &[]), "m1"),
            GroupRole::None,
            "no certificate can name it"
        );
        // Members that cannot be reached as listed are left out, the others kept.
        let o = in_group(
            Some("m1"),
            &[
                ("m2", "127.0.0.1:20004"),
                ("m3", "nowhere"),
                ("bad name!", "127.0.0.1:20005"),
            ],
        );
        assert_eq!(
            group_role_of(&o, "m1"),
            GroupRole::Coordinator {
                group: "g1".into(),
                peers: vec![GroupPeer {
                    name: "m2".into(),
                    addr: "127.0.0.1:20004".parse().unwrap()
                }]
            }
        );
    }
}
