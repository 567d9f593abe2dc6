//! The registry: machines and process servers as their heartbeats describe them,
//! which process server each machine uses, and the events of the fleet. The tables
//! are in `machines`, `process_servers` and `events`; this module holds what a
//! heartbeat does to them.
//!
//! An agent's first heartbeat registers its machine (it can send one only with the
//! certificate it enrolled for) and gives it the process server with the least load:
//! the fewest machines among those seen within three heartbeat intervals, ties by
//! name. A machine whose process server was removed gets another the same way.
//!
//! A group's coordinator is its first member by name seen within three heartbeat
//! intervals: the role moves on by itself when that machine goes away, which is why
//! every member should listen (`--group-listen`). Only the coordinator's orders list
//! the members, with the addresses they reported.

pub mod beats;
pub mod events;
pub mod failover;
pub mod machines;
pub mod process_servers;

use ferry_link::control::limits::{
    MAX_CONNECTED, MAX_FENCED, MAX_POINT_ID_BYTES, MAX_REASONS, MAX_TEXT_BYTES,
};
use ferry_link::control::wire::{
    AgentHeartbeat, AgentOrders, AgentPolicy, DiskReport, GroupMemberRef, PointRef,
    ProcessServerHeartbeat, ProcessServerRef, HEARTBEAT_INTERVAL_S,
};

use crate::db::{self, Db};
use crate::health::NOT_SEEN_S;

/// Disk states an agent may report.
pub const DISK_STATES: [&str; 3] = ["initial-copy", "resync", "protected"];
/// The most disks one heartbeat may list (a body is bounded anyway; this keeps the
/// stored JSON of one machine small).
pub const MAX_DISKS: usize = 64;

fn check_name(what: &'static str, name: &str) -> Result<(), String> {
    ferry_replica::layout::check_name(what, name).map_err(|e| e.to_string())
}

/// 400 when a string the client chose is longer than the database should keep.
fn check_len(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{what} is {} bytes; at most {max}", s.len()));
    }
    Ok(())
}

/// A point as an agent reports it: an id and a kind of bounded length (the kind is
/// only shown, so a kind added later by agents is no reason to refuse them), a time.
fn check_point(what: &str, p: &PointRef) -> Result<f64, String> {
    check_len(&format!("{what} id"), &p.id, MAX_POINT_ID_BYTES)?;
    check_len(&format!("{what} kind"), &p.kind, MAX_POINT_ID_BYTES)?;
    parse_time(what, &p.time)
}

/// Unix seconds of an RFC 3339 time.
fn parse_time(what: &str, t: &str) -> Result<f64, String> {
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp_micros() as f64 / 1e6)
        .map_err(|e| format!("{what} time {t:?} is not RFC 3339: {e}"))
}

/// The machine's state from its disks: the least advanced one's.
pub fn machine_state(disks: &[DiskReport]) -> &'static str {
    if disks.is_empty() {
        "no-disks"
    } else if disks.iter().any(|d| d.state == "initial-copy") {
        "initial-copy"
    } else if disks.iter().any(|d| d.state == "resync") {
        "resync"
    } else {
        "protected"
    }
}

/// Checks an agent's report; the oldest of its disks' newest uploaded points (the
/// machine's RPO runs from the disk furthest behind), None when no disk has one.
pub fn check_agent_heartbeat(hb: &AgentHeartbeat) -> Result<Option<f64>, String> {
    check_name("machine", &hb.machine)?;
    if let Some(ps) = &hb.process_server {
        check_name("process server", ps)?;
    }
    if let Some(a) = &hb.group_listen {
        if crate::enroll::issue::advertise_host(a).is_none() {
            return Err(format!("group_listen {a:?} is not HOST:PORT"));
        }
    }
    if let Some(e) = &hb.last_error {
        check_len("last_error", e, MAX_TEXT_BYTES)?;
    }
    failover::check_report(hb)?;
    if hb.disks.len() > MAX_DISKS {
        return Err(format!(
            "{} disks in one heartbeat; at most {MAX_DISKS}",
            hb.disks.len()
        ));
    }
    let mut oldest: Option<f64> = None;
    for (i, d) in hb.disks.iter().enumerate() {
        check_name("disk", &d.name)?;
        if hb.disks[..i].iter().any(|o| o.name == d.name) {
            return Err(format!("disk {} is listed twice", d.name));
        }
        if !DISK_STATES.contains(&d.state.as_str()) {
            return Err(format!(
                "disk {} has state {:?}; it must be one of {}",
                d.name,
                d.state,
                DISK_STATES.join(", ")
            ));
        }
        if !(0.0..=100.0).contains(&d.initial_copy_percent) {
            return Err(format!(
                "disk {} initial_copy_percent {} must be from 0 to 100",
                d.name, d.initial_copy_percent
            ));
        }
        if let Some(p) = &d.newest_point {
            check_point(&format!("disk {} newest_point", d.name), p)?;
        }
        if let Some(p) = &d.newest_uploaded_point {
            let t = check_point(&format!("disk {} newest_uploaded_point", d.name), p)?;
            oldest = Some(oldest.map_or(t, |o| o.min(t)));
        }
    }
    Ok(oldest)
}

/// Checks a process server's report.
pub fn check_process_server_heartbeat(hb: &ProcessServerHeartbeat) -> Result<(), String> {
    check_name("process server", &hb.name)?;
    if crate::enroll::issue::advertise_host(&hb.address).is_none() {
        return Err(format!("address {:?} is not HOST:PORT", hb.address));
    }
    if !matches!(hb.health.as_str(), "normal" | "warning" | "critical") {
        return Err(format!(
            "health {:?} must be normal, warning or critical",
            hb.health
        ));
    }
    if hb.health_reasons.len() > MAX_REASONS {
        return Err(format!(
            "{} health_reasons in one heartbeat; at most {MAX_REASONS}",
            hb.health_reasons.len()
        ));
    }
    for r in &hb.health_reasons {
        check_len("a health reason", r, MAX_TEXT_BYTES)?;
    }
    if hb.machines.len() > MAX_CONNECTED {
        return Err(format!(
            "{} machines in one heartbeat; at most {MAX_CONNECTED}",
            hb.machines.len()
        ));
    }
    for m in &hb.machines {
        check_name("machine", m)?;
    }
    if hb.fenced.len() > MAX_FENCED {
        return Err(format!(
            "{} fenced disks in one heartbeat; at most {MAX_FENCED}",
            hb.fenced.len()
        ));
    }
    for f in &hb.fenced {
        check_name("machine", &f.machine)?;
        check_name("disk", &f.disk)?;
        if !f.new_writer.is_empty() {
            check_name("process server", &f.new_writer)?;
        }
        check_len("a fencing time", &f.time, MAX_TEXT_BYTES)?;
    }
    let finite = [hb.ingest_bytes_per_s, hb.upload_lag_s, hb.cpu_percent];
    if finite.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(
            "ingest_bytes_per_s, upload_lag_s and cpu_percent must be finite and \
                    not negative"
                .into(),
        );
    }
    Ok(())
}

/// Records an agent's heartbeat (registering the machine at the first), gives it a
/// process server if it has none, and answers what it is to do.
pub async fn agent_heartbeat(
    db: &Db,
    hb: &AgentHeartbeat,
    newest_uploaded_at: Option<f64>,
    now: i64,
) -> db::Result<AgentOrders> {
    let written = machines::heartbeat_written(
        db,
        &machines::Beat {
            name: &hb.machine,
            state: machine_state(&hb.disks),
            disks: &hb.disks,
            last_error: hb.last_error.as_deref(),
            newest_uploaded_at,
            group_listen: hb.group_listen.as_deref(),
            now,
        },
    )
    .await?;
    let subject = format!("machine {}", hb.machine);
    if written.registered {
        events::add(db, "registered", &subject, "first heartbeat", now).await?;
    }
    // The row as the heartbeat's own transaction left it: no second read.
    let mut ps_name = written.process_server;
    if ps_name.is_none() {
        ps_name = machines::assign_least_loaded(db, &hb.machine, now - NOT_SEEN_S).await?;
        if let Some(ps) = &ps_name {
            let msg = format!("assigned to process server {ps} (the least loaded)");
            events::add(db, "assigned", &subject, &msg, now).await?;
        }
    }
    let mut o = orders_for(db, written.policy, written.group, ps_name).await?;
    if let Some(g) = &o.group {
        let members = machines::members(db, g, GROUP_MAX).await?;
        (o.group_coordinator, o.group_members) =
            group_plan(&hb.machine, &members, now - NOT_SEEN_S);
    }
    if let Some(r) = &hb.failover {
        if failover::record_report(db, &hb.machine, r, now).await? {
            let msg = format!(
                "the source stopped writing and its final points are acknowledged ({}): failover {}",
                r.points
                    .iter()
                    .map(|p| format!("{} at {}", p.disk, p.point))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.id
            );
            events::add(db, "prepared", &subject, &msg, now).await?;
        }
    }
    o.failover = failover::order(db, &hb.machine).await?;
    Ok(o)
}

/// The most machines one group's orders list: a cut waits on every member, so a
/// group is a handful of machines; the bound keeps one answer small.
pub const GROUP_MAX: u32 = 256;

/// For `machine`, of a group with `members` (by name): the coordinator, the first
/// member seen since `seen_since` (none while no member is); and, when `machine` is
/// the coordinator, the other members seen that report a group-listen address.
/// Members without one are left out of the cuts (their health says why).
pub fn group_plan(
    machine: &str,
    members: &[machines::Member],
    seen_since: i64,
) -> (Option<String>, Vec<GroupMemberRef>) {
    let coordinator = members
        .iter()
        .find(|m| m.last_seen >= seen_since)
        .map(|m| m.name.clone());
    if coordinator.as_deref() != Some(machine) {
        return (coordinator, Vec::new());
    }
    let cut = members
        .iter()
        .filter(|m| m.name != machine && m.last_seen >= seen_since)
        .filter_map(|m| {
            m.group_listen.as_ref().map(|a| GroupMemberRef {
                name: m.name.clone(),
                address: a.clone(),
            })
        })
        .collect();
    (coordinator, cut)
}

/// What a machine is to do now: its process server, policy and group.
pub async fn orders(db: &Db, machine: &str, ps_name: Option<String>) -> db::Result<AgentOrders> {
    let m = machines::get(db, machine).await?;
    let (policy_name, group) = m.map_or_else(
        || (crate::policy::DEFAULT_NAME.to_string(), None),
        |m| (m.policy, m.group),
    );
    orders_for(db, policy_name, group, ps_name).await
}

/// `orders` for a machine whose policy and group are known.
async fn orders_for(
    db: &Db,
    policy_name: String,
    group: Option<String>,
    ps_name: Option<String>,
) -> db::Result<AgentOrders> {
    let policy = match db::policies::get(db, &policy_name).await? {
        Some(p) => p,
        // Its policy was deleted since it was set: the default holds until it is
        // given another.
        None => db::policies::get(db, crate::policy::DEFAULT_NAME)
            .await?
            .unwrap_or_else(crate::policy::Policy::default_policy),
    };
    let process_server = match ps_name {
        Some(name) => process_servers::get(db, &name)
            .await?
            .filter(|p| !p.removed)
            .map(|p| ProcessServerRef {
                name: p.name,
                address: p.address,
            }),
        None => None,
    };
    Ok(AgentOrders {
        process_server,
        policy: AgentPolicy {
            name: policy.name,
            crash_point_interval_s: policy.crash_point_interval_s,
            app_point_interval_s: u64::from(policy.app_point_interval_s),
        },
        group,
        heartbeat_interval_s: HEARTBEAT_INTERVAL_S,
        group_coordinator: None,
        group_members: Vec::new(),
        failover: None,
    })
}

#[cfg(test)]
pub(crate) mod tests;
