//! Which machines move where: a pure function of the process servers' rows, the
//! machines each holds and when the movable ones last moved. No clock and no database
//! here, so that every rule is a unit test (docs/control-plane.md, "Rebalancing").
//!
//! 1. Evacuation: the machines of a process server that is lost (not seen for three
//!    heartbeats), critical (cache thresholds, upload lag, its own verdict) or gone
//!    (removed, or a name with no row) move to the live, non-critical others, each to
//!    the least loaded counting the machines just given to it.
//! 2. Shedding: while the most loaded server holds `SHED_MARGIN` machines more than
//!    the least loaded settled one (normal for `SETTLE_S`), one machine moves from
//!    the first to the second.
//! 3. Rate limits: a machine that moved (by an operator too) within `COOLDOWN_S` is
//!    left where it is, and at most `MOVES_PER_SWEEP` machines move per sweep.

use std::collections::{HashMap, HashSet};

use crate::health::{self, Health, NOT_SEEN_S};
use crate::registry::process_servers::PsRow;

/// A machine is not moved automatically within this long of its last move (10 min):
/// a flapping server cannot bounce it, and an operator's move stands at least this
/// long.
pub const COOLDOWN_S: i64 = 600;
/// The most automatic moves per sweep (one sweep per heartbeat interval): each moved
/// agent reconnects and replays its journal, so a large evacuation is spread out.
pub const MOVES_PER_SWEEP: usize = 16;
/// A process server takes shed machines only after it has been normal this long
/// (5 min): one that just came back may fail again.
pub const SETTLE_S: i64 = 300;
/// A server is overloaded when it holds this many machines more than the least
/// loaded settled one. Two, so that a move never reverses the difference: from n and
/// m with n - m >= 2, it leaves n - 1 >= m + 1, and nothing moves back.
pub const SHED_MARGIN: i64 = 2;

/// A process server not removed, with since when it has been normal.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub row: PsRow,
    pub normal_since: Option<i64>,
}

/// A machine the rebalancer may move: its process server and last move.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub process_server: String,
    pub moved_at: Option<i64>,
}

/// What a plan is made from.
pub struct Fleet<'a> {
    /// Every process server not removed.
    pub servers: &'a [Server],
    /// Machines held by each process server, by name (a server absent holds none).
    pub loads: &'a HashMap<String, i64>,
    /// Machines that may move, grouped by server in any order.
    pub candidates: &'a [Candidate],
    /// Unix seconds.
    pub now: f64,
    /// Since when this control plane has been listening for heartbeats: a server is
    /// lost only after three heartbeats it could have heard, so a restarted control
    /// plane moves nothing before its servers have had the time to report.
    pub watching_since: f64,
}

/// One move and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub machine: String,
    pub from: String,
    pub to: String,
    /// Why the machine leaves `from`, e.g. "process server ps-a not seen for 17 s".
    pub why: String,
}

impl Move {
    /// The event's message.
    pub fn message(&self) -> String {
        format!("{}: moved to {}", self.why, self.to)
    }
}

/// What the rebalancer makes of a server now.
#[derive(Debug, Clone, PartialEq)]
enum Role {
    /// Its machines leave, for this reason.
    Evacuate(String),
    /// It may take machines; `settled` ones take shed machines too.
    Target { health: Health, settled: bool },
}

/// Whether the server is lost, critical or fine at `now`.
fn role(s: &Server, now: f64, watching_since: f64) -> Role {
    let name = &s.row.name;
    // The time this control plane could have heard it last, for the lost rule.
    let heard = (s.row.last_seen as f64).max(watching_since);
    if (now - heard).floor() as i64 > NOT_SEEN_S {
        let quiet = (now - s.row.last_seen as f64).floor() as i64;
        return Role::Evacuate(format!("process server {name} not seen for {quiet} s"));
    }
    // Judged as seen: the lost rule above is the one that counts for silence.
    let seen = PsRow {
        last_seen: s.row.last_seen.max(now.floor() as i64),
        ..s.row.clone()
    };
    let v = health::process_server(&seen, now);
    if v.health == Health::Critical {
        return Role::Evacuate(format!(
            "process server {name} is critical ({})",
            v.reasons.join("; ")
        ));
    }
    let settled = v.health == Health::Normal
        && s.normal_since
            .is_some_and(|t| now - t as f64 >= SETTLE_S as f64);
    Role::Target {
        health: v.health,
        settled,
    }
}

/// Whether the machine's last move is out of the rate window.
pub fn may_move(moved_at: Option<i64>, now: f64) -> bool {
    moved_at.is_none_or(|t| now - t as f64 >= COOLDOWN_S as f64)
}

/// What `normal_since` becomes for a server whose health is `health` at `now`.
pub fn normal_since(was: Option<i64>, health: Health, now: f64) -> Option<i64> {
    (health == Health::Normal).then(|| was.unwrap_or(now.floor() as i64))
}

/// The moves to make now, at most `MOVES_PER_SWEEP`, evacuations first.
pub fn plan(f: &Fleet<'_>) -> Vec<Move> {
    let roles: HashMap<&str, Role> = f
        .servers
        .iter()
        .map(|s| (s.row.name.as_str(), role(s, f.now, f.watching_since)))
        .collect();
    let mut load: HashMap<&str, i64> = f
        .servers
        .iter()
        .map(|s| {
            let n = f.loads.get(&s.row.name).copied().unwrap_or(0);
            (s.row.name.as_str(), n)
        })
        .collect();
    let mut movable: Vec<&Candidate> = f
        .candidates
        .iter()
        .filter(|c| may_move(c.moved_at, f.now))
        .collect();
    movable.sort_by(|a, b| (&a.process_server, &a.name).cmp(&(&b.process_server, &b.name)));
    let mut moves = Vec::new();
    let mut moved: HashSet<&str> = HashSet::new();

    // Evacuation: to any live, non-critical server, least loaded first; a normal one
    // before a warning one at equal load, then by name.
    for c in &movable {
        if moves.len() >= MOVES_PER_SWEEP {
            return moves;
        }
        let why = match roles.get(c.process_server.as_str()) {
            Some(Role::Evacuate(why)) => why.clone(),
            Some(Role::Target { .. }) => continue,
            None => format!("process server {} is removed", c.process_server),
        };
        let to = roles
            .iter()
            .filter_map(|(name, r)| match r {
                Role::Target { health, .. } => Some((load[name], *health, *name)),
                Role::Evacuate(_) => None,
            })
            .min();
        let Some((_, _, to)) = to else {
            // Nowhere to go: the machines stay (their health says why) until a server
            // comes back.
            return moves;
        };
        *load.entry(to).or_insert(0) += 1;
        if let Some(n) = load.get_mut(c.process_server.as_str()) {
            *n -= 1;
        }
        moved.insert(c.name.as_str());
        moves.push(Move {
            machine: c.name.clone(),
            from: c.process_server.clone(),
            to: to.to_string(),
            why,
        });
    }

    // Shedding: from the most loaded healthy-enough server that has a machine free to
    // move, to the least loaded settled one, while they differ by the margin.
    while moves.len() < MOVES_PER_SWEEP {
        let mut sources: Vec<(i64, &str)> = roles
            .iter()
            .filter(|(_, r)| matches!(r, Role::Target { .. }))
            .map(|(name, _)| (load[name], *name))
            .collect();
        // Most loaded first, then by name.
        sources.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        let step = sources.iter().find_map(|&(n, from)| {
            let (m, to) = roles
                .iter()
                .filter(|(name, r)| {
                    **name != from && matches!(r, Role::Target { settled: true, .. })
                })
                .map(|(name, _)| (load[name], *name))
                .min()?;
            if n - m < SHED_MARGIN {
                return None;
            }
            let c = movable
                .iter()
                .find(|c| c.process_server == from && !moved.contains(c.name.as_str()))?;
            Some((*c, n, from, m, to))
        });
        let Some((c, n, from, m, to)) = step else {
            break;
        };
        *load.entry(from).or_insert(0) -= 1;
        *load.entry(to).or_insert(0) += 1;
        moved.insert(c.name.as_str());
        moves.push(Move {
            machine: c.name.clone(),
            from: from.to_string(),
            to: to.to_string(),
            why: format!("process server {from} is overloaded ({n} machines; {to} has {m})"),
        });
    }
    moves
}

#[cfg(test)]
#[path = "rebalance_tests.rs"]
mod tests;
