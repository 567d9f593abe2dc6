//! Health of machines and process servers: computed from what their heartbeats last
//! said and the time now, both when the API is read (so a reader never sees a stale
//! verdict) and by a background sweep every heartbeat interval, which records every
//! change as an event (so a machine that goes quiet is noticed with nobody reading).
//!
//! The rules (docs/control-plane.md, "Health"):
//! - not seen for 3 heartbeat intervals (15 s): critical;
//! - a machine's RPO over its policy's `rpo_critical_s`: critical; over
//!   `rpo_warning_s`: warning;
//! - a disk in resync: warning;
//! - a process server's cache under 25 % free: critical; under 30 %: warning; its own
//!   verdict when it reports worse than normal.

use std::collections::HashMap;
use std::time::Duration;

use ferry_link::control::wire::HEARTBEAT_INTERVAL_S;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::db::{self, Db};
use crate::jobs::singleton::Singleton;
use crate::policy::Policy;
use crate::registry::machines::MachineRow;
use crate::registry::process_servers::PsRow;
use crate::registry::{events, machines, process_servers};

/// A part unheard of for this long is critical: three missed heartbeats.
pub const NOT_SEEN_S: i64 = 3 * HEARTBEAT_INTERVAL_S as i64;
/// A process server's cache free below these fractions of its size.
pub const CACHE_WARNING_FREE: f64 = 0.30;
pub const CACHE_CRITICAL_FREE: f64 = 0.25;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Normal,
    Warning,
    Critical,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Normal => "normal",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }

    /// 0, 1, 2: the `/metrics` gauge.
    pub fn level(self) -> u8 {
        self as u8
    }

    pub fn parse(s: &str) -> Health {
        match s {
            "critical" => Health::Critical,
            "warning" => Health::Warning,
            _ => Health::Normal,
        }
    }
}

/// A verdict and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub health: Health,
    pub reasons: Vec<String>,
}

impl Verdict {
    fn new() -> Verdict {
        Verdict {
            health: Health::Normal,
            reasons: Vec::new(),
        }
    }

    fn raise(&mut self, to: Health, why: String) {
        self.health = self.health.max(to);
        self.reasons.push(why);
    }
}

fn not_seen(v: &mut Verdict, last_seen: i64, now: f64) {
    let quiet = (now - last_seen as f64).floor() as i64;
    if quiet > NOT_SEEN_S {
        v.raise(Health::Critical, format!("not seen for {quiet} s"));
    }
}

/// A machine's RPO: now minus the oldest of its disks' newest uploaded points; None
/// before the first.
pub fn rpo_seconds(m: &MachineRow, now: f64) -> Option<f64> {
    m.newest_uploaded_at
        .map(|t| ((now - t).max(0.0) * 1000.0).round() / 1000.0)
}

/// A machine's health under `policy`, at `now` (Unix seconds).
pub fn machine(m: &MachineRow, policy: &Policy, now: f64) -> Verdict {
    let mut v = Verdict::new();
    not_seen(&mut v, m.last_seen, now);
    if let Some(rpo) = rpo_seconds(m, now) {
        if rpo > f64::from(policy.rpo_critical_s) {
            v.raise(
                Health::Critical,
                format!(
                    "RPO {rpo:.0} s over policy {}'s critical threshold {} s",
                    policy.name, policy.rpo_critical_s
                ),
            );
        } else if rpo > f64::from(policy.rpo_warning_s) {
            v.raise(
                Health::Warning,
                format!(
                    "RPO {rpo:.0} s over policy {}'s warning threshold {} s",
                    policy.name, policy.rpo_warning_s
                ),
            );
        }
    }
    for d in &m.disks {
        if d.state == "resync" {
            v.raise(Health::Warning, format!("disk {} is in resync", d.name));
        }
    }
    // Any member may become the coordinator (the role moves on when the first goes
    // away), so every member should be reachable.
    if let (Some(g), None) = (&m.group, &m.group_listen) {
        v.raise(
            Health::Warning,
            format!(
                "in group {g} but reports no group-listen address: left out of the group's cuts"
            ),
        );
    }
    v
}

/// A process server's health at `now`.
pub fn process_server(p: &PsRow, now: f64) -> Verdict {
    let mut v = Verdict::new();
    not_seen(&mut v, p.last_seen, now);
    let size = p.cache_used_bytes.saturating_add(p.cache_free_bytes);
    if size > 0 {
        let free = p.cache_free_bytes as f64 / size as f64;
        let pct = free * 100.0;
        if free < CACHE_CRITICAL_FREE {
            v.raise(
                Health::Critical,
                format!("cache {pct:.1} % free (under 25 %)"),
            );
        } else if free < CACHE_WARNING_FREE {
            v.raise(
                Health::Warning,
                format!("cache {pct:.1} % free (under 30 %)"),
            );
        }
    }
    let own = Health::parse(&p.reported_health);
    if own > Health::Normal {
        let why = if p.reported_reasons.is_empty() {
            format!("reports itself {}", own.as_str())
        } else {
            format!("reports: {}", p.reported_reasons.join("; "))
        };
        v.raise(own, why);
    }
    v
}

/// Every policy by name, for judging many machines at once.
pub async fn policies(db: &Db) -> db::Result<HashMap<String, Policy>> {
    let mut all = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = db::policies::list(db, after.as_deref(), crate::api::PAGE_MAX).await?;
        let short = page.len() < crate::api::PAGE_MAX as usize;
        after = page.last().map(|p| p.name.clone());
        all.extend(page.into_iter().map(|p| (p.name.clone(), p)));
        if short {
            return Ok(all);
        }
    }
}

/// The policy a machine runs under: its own, or `default` if its own was deleted.
pub fn policy_of<'a>(all: &'a HashMap<String, Policy>, name: &str) -> Option<&'a Policy> {
    all.get(name)
        .or_else(|| all.get(crate::policy::DEFAULT_NAME))
}

/// Now, in fractional Unix seconds.
pub fn now_f() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

/// One pass: judges every machine and process server at `now`, writes each changed
/// verdict and an event for it. How many changed.
pub async fn sweep(db: &Db, now: f64) -> db::Result<usize> {
    let policies = policies(db).await?;
    let mut changed = 0;
    let mut after: Option<String> = None;
    loop {
        let page = machines::list(db, after.as_deref(), crate::api::PAGE_MAX).await?;
        for m in &page {
            let Some(policy) = policy_of(&policies, &m.policy) else {
                continue;
            };
            let v = machine(m, policy, now);
            if v.health.as_str() != m.health
                && machines::set_health(db, &m.name, &m.health, v.health.as_str()).await?
            {
                record(db, &format!("machine {}", m.name), &m.health, &v, now).await?;
                changed += 1;
            }
        }
        if page.len() < crate::api::PAGE_MAX as usize {
            break;
        }
        after = page.last().map(|m| m.name.clone());
    }
    let mut after: Option<String> = None;
    loop {
        let page = process_servers::list(db, after.as_deref(), crate::api::PAGE_MAX).await?;
        for p in &page {
            let v = process_server(p, now);
            if v.health.as_str() != p.health
                && process_servers::set_health(db, &p.name, &p.health, v.health.as_str()).await?
            {
                record(
                    db,
                    &format!("process-server {}", p.name),
                    &p.health,
                    &v,
                    now,
                )
                .await?;
                changed += 1;
            }
        }
        if page.len() < crate::api::PAGE_MAX as usize {
            break;
        }
        after = page.last().map(|p| p.name.clone());
    }
    Ok(changed)
}

async fn record(db: &Db, subject: &str, was: &str, v: &Verdict, now: f64) -> db::Result<()> {
    let why = if v.reasons.is_empty() {
        String::new()
    } else {
        format!(": {}", v.reasons.join("; "))
    };
    let message = format!("health {was} -> {}{why}", v.health.as_str());
    events::add(db, "health", subject, &message, now as i64).await?;
    Ok(())
}

/// Sweeps every heartbeat interval until the process ends, while this control plane
/// holds `lease` (of several on one database, one sweeps). A failed sweep is logged
/// and tried again at the next tick: the database may be back by then.
pub fn spawn_sweeper(db: Db, lease: Singleton) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(HEARTBEAT_INTERVAL_S));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !lease.held() {
                continue;
            }
            if let Err(e) = sweep(&db, now_f()).await {
                tracing::warn!("health sweep: {e}");
            }
            crate::fleet::tick(&db, now_f()).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_link::control::wire::DiskReport;

    fn disk(name: &str, state: &str) -> DiskReport {
        DiskReport {
            name: name.into(),
            size_bytes: 1 << 30,
            state: state.into(),
            initial_copy_percent: 100.0,
            journal_bytes: 0,
            unacked_bytes: 0,
            newest_point: None,
            newest_uploaded_point: None,
            resync: None,
        }
    }

    fn m(last_seen: i64, uploaded: Option<f64>, disks: Vec<DiskReport>) -> MachineRow {
        MachineRow {
            name: "m1".into(),
            process_server: None,
            policy: "default".into(),
            group: None,
            state: "protected".into(),
            disks,
            last_error: None,
            registered_at: 0,
            last_seen,
            newest_uploaded_at: uploaded,
            health: "normal".into(),
            removed: false,
            group_listen: None,
        }
    }

    #[test]
    fn machine_rules() {
        let p = Policy::default_policy();
        let now = 1000.0;
        let fine = machine(&m(998, Some(990.0), vec![disk("d0", "protected")]), &p, now);
        assert_eq!(fine, Verdict::new());
        assert_eq!(rpo_seconds(&m(998, Some(990.5), vec![]), now), Some(9.5));
        assert_eq!(rpo_seconds(&m(998, None, vec![]), now), None);

        let v = machine(&m(998, Some(960.0), vec![]), &p, now);
        assert_eq!(v.health, Health::Warning);
        assert_eq!(
            v.reasons,
            ["RPO 40 s over policy default's warning threshold 30 s"]
        );
        let v = machine(&m(998, Some(800.0), vec![]), &p, now);
        assert_eq!(v.health, Health::Critical, "{v:?}");

        let v = machine(&m(998, None, vec![disk("d1", "resync")]), &p, now);
        assert_eq!(v.health, Health::Warning);
        assert_eq!(v.reasons, ["disk d1 is in resync"]);

        // A group member nobody can reach is left out of the cuts: a warning.
        let mut deaf = m(998, Some(990.0), vec![]);
        deaf.group = Some("g1".into());
        let v = machine(&deaf, &p, now);
        assert_eq!(v.health, Health::Warning);
        assert_eq!(
            v.reasons,
            ["in group g1 but reports no group-listen address: left out of the group's cuts"]
        );
        deaf.group_listen = Some("10.0.0.7:20004".into());
        assert_eq!(machine(&deaf, &p, now), Verdict::new());

        // Exactly three intervals is still seen; more is not.
        assert_eq!(
            machine(&m(985, None, vec![]), &p, now).health,
            Health::Normal
        );
        let v = machine(&m(980, None, vec![disk("d1", "resync")]), &p, now);
        assert_eq!(v.health, Health::Critical);
        assert_eq!(v.reasons, ["not seen for 20 s", "disk d1 is in resync"]);
    }

    fn ps(used: u64, free: u64, own: &str) -> PsRow {
        PsRow {
            name: "ps1".into(),
            address: "127.0.0.1:1".into(),
            cache_used_bytes: used,
            cache_free_bytes: free,
            ingest_bytes_per_s: 0.0,
            upload_lag_s: 0.0,
            cpu_percent: 0.0,
            reported_health: own.into(),
            reported_reasons: if own == "normal" {
                vec![]
            } else {
                vec!["store slow".into()]
            },
            connected: vec![],
            health: "normal".into(),
            registered_at: 0,
            last_seen: 1000,
            removed: false,
        }
    }

    #[test]
    fn process_server_rules() {
        let now = 1001.0;
        assert_eq!(process_server(&ps(50, 50, "normal"), now), Verdict::new());
        assert_eq!(
            process_server(&ps(0, 0, "normal"), now).health,
            Health::Normal
        );
        let v = process_server(&ps(71, 29, "normal"), now);
        assert_eq!(v.health, Health::Warning);
        assert_eq!(v.reasons, ["cache 29.0 % free (under 30 %)"]);
        let v = process_server(&ps(76, 24, "normal"), now);
        assert_eq!(v.health, Health::Critical);
        let v = process_server(&ps(50, 50, "warning"), now);
        assert_eq!(
            (v.health, v.reasons[0].as_str()),
            (Health::Warning, "reports: store slow")
        );
        let v = process_server(&ps(50, 50, "normal"), 1100.0);
        assert_eq!(v.reasons, ["not seen for 100 s"]);
    }
}
