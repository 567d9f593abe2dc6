//! What the dashboard shows of recovery, read straight from the tables of migration
//! 0008 (docs/recovery.md): each machine's failover (`machine_recovery`), its active
//! recovery job (the job holding the active key `recovery/MACHINE`) with its disks
//! (`recovery_work`), the recovery hosts, and the recovery plans with their active
//! job (`plan/PLAN`). Bounded like the rest of the page.

use std::collections::HashMap;

use sqlx::Row;

use super::page::{HostLine, MachineAction, PlanLine, RecoveryLine};
use super::{progress, ROWS};
use crate::db::{q, Db, Result};
use crate::jobs::{queue, Job, JobState, TaskState};
use crate::recovery::work;

/// Machines whose recovery is shown in detail (job, disks) at most: each costs a few
/// queries.
pub const DETAILED: usize = 50;

/// A machine's row of `machine_recovery`.
#[derive(Debug, Clone, PartialEq)]
pub struct Failover {
    pub state: String,
    pub active_site: String,
    /// forward, or reverse once reprotected.
    pub direction: String,
    /// Reprotect's master target.
    pub master_target: Option<String>,
    pub planned: bool,
    /// `{disk: point}` as `sda=p1, sdb=p1`.
    pub point: Option<String>,
    pub host: Option<String>,
    pub job_id: Option<String>,
    /// The live work items of this failover (its disks, its start).
    pub items: Vec<String>,
}

/// Work items of one failover read for its disks, at most.
pub const ITEMS: usize = 16;

/// Every machine's failover (at most `ROWS`), by machine.
pub async fn failovers(db: &Db) -> Result<HashMap<String, Failover>> {
    let op = "reading machines' failovers";
    let rows = sqlx::query(
        "SELECT machine, state, active_site, direction, master_target, planned, point, host, \
         job_id, items \
         FROM machine_recovery ORDER BY machine LIMIT $1",
    )
    .bind(i64::from(ROWS))
    .fetch_all(db.pool())
    .await
    .map_err(q(op))?;
    let mut out = HashMap::new();
    for r in rows {
        let point: Option<String> = r.try_get("point").map_err(q(op))?;
        let planned: i64 = r.try_get("planned").map_err(q(op))?;
        let items: String = r.try_get("items").map_err(q(op))?;
        // A list of ids, as the failover jobs write it; anything else shows no disk
        // rather than no page.
        let items: Vec<String> = serde_json::from_str(&items).unwrap_or_default();
        out.insert(
            r.try_get("machine").map_err(q(op))?,
            Failover {
                state: r.try_get("state").map_err(q(op))?,
                active_site: r.try_get("active_site").map_err(q(op))?,
                direction: r.try_get("direction").map_err(q(op))?,
                master_target: r.try_get("master_target").map_err(q(op))?,
                planned: planned != 0,
                point: point.map(|p| points_text(&p)),
                host: r.try_get("host").map_err(q(op))?,
                job_id: r.try_get("job_id").map_err(q(op))?,
                items: items.into_iter().take(ITEMS).collect(),
            },
        );
    }
    Ok(out)
}

/// `{"sda": "p1", "sdb": "p2"}` as `sda=p1, sdb=p2`; anything else as it is.
fn points_text(json: &str) -> String {
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json) {
        Ok(m) => m
            .iter()
            .map(|(disk, p)| format!("{disk}={}", p.as_str().unwrap_or("?")))
            .collect::<Vec<_>>()
            .join(", "),
        Err(_) => json.to_string(),
    }
}

/// The active jobs (queued, running, waiting) whose active key starts with
/// `prefix`, by the rest of the key: `recovery/` gives each machine's, `plan/` each
/// plan's.
pub async fn active_jobs(db: &Db, prefix: &str) -> Result<HashMap<String, String>> {
    let op = "reading the active recovery jobs";
    let rows = sqlx::query(
        "SELECT id, active_key FROM jobs WHERE active_key LIKE $1 ORDER BY id LIMIT $2",
    )
    .bind(format!("{prefix}%"))
    .bind(i64::from(ROWS))
    .fetch_all(db.pool())
    .await
    .map_err(q(op))?;
    let mut out = HashMap::new();
    for r in rows {
        let key: String = r.try_get("active_key").map_err(q(op))?;
        if let Some(rest) = key.strip_prefix(prefix) {
            out.insert(rest.to_string(), r.try_get("id").map_err(q(op))?);
        }
    }
    Ok(out)
}

/// What an operator may do to a machine now, given its failover and its active
/// recovery job. One job per machine at a time: while one is queued or running,
/// nothing (the API would answer 409).
pub fn actions(failover: Option<&Failover>, job: Option<&Job>) -> Vec<MachineAction> {
    if let Some(j) = job {
        return match (j.kind.as_str(), &j.state) {
            ("test-failover", JobState::WaitingForInput) => vec![MachineAction::Cleanup],
            // A failback waiting for its commit: the commit resumes it.
            ("failback", JobState::WaitingForInput) => vec![MachineAction::CommitFailback],
            _ => Vec::new(),
        };
    }
    match failover.map(|f| f.state.as_str()) {
        None => vec![
            MachineAction::TestFailover,
            MachineAction::FailoverPlanned,
            MachineAction::FailoverUnplanned,
        ],
        Some("preparing") => vec![MachineAction::Cancel],
        Some("failed-over") => vec![
            MachineAction::ChangePoint,
            MachineAction::Commit,
            MachineAction::Cancel,
        ],
        // Reprotected: failback; failed back: its commit; committed: re-enable.
        Some("committed") => match failover.map(|f| (f.direction.as_str(), f.active_site.as_str()))
        {
            Some(("reverse", "recovery")) => vec![
                MachineAction::FailbackPlanned,
                MachineAction::FailbackUnplanned,
            ],
            Some(("reverse", "home")) => vec![MachineAction::CommitFailback],
            _ => Vec::new(),
        },
        Some("failed-back") => vec![MachineAction::ReEnable],
        Some(_) => Vec::new(),
    }
}

/// One line of the recovery section: the machine's failover and its job (the active
/// one, else the failover's last) with its disks.
pub async fn line(
    db: &Db,
    machine: &str,
    failover: Option<&Failover>,
    job: Option<&Job>,
) -> Result<RecoveryLine> {
    // A failover's disks are its live items (whichever job made them: the failover,
    // a change of point); a test's, its job's.
    let mut items = Vec::new();
    match failover.filter(|f| !f.items.is_empty()) {
        Some(f) => items = work::get_in_order(db, &f.items).await?,
        None => {
            if let Some(j) = job {
                items.extend(
                    work::for_job(db, &j.id)
                        .await?
                        .into_iter()
                        .filter(|w| w.machine == machine)
                        .take(ITEMS),
                );
            }
        }
    }
    let mut ready = Vec::new();
    let mut disk_progress = Vec::new();
    for w in items {
        if !matches!(w.op.kind(), "build" | "serve") || w.state == "removed" {
            continue;
        }
        // As the job's JSON shows them (`JobWorkDisk`).
        for d in w.disks.iter().map(crate::api::jobs::JobWorkDisk::of) {
            disk_progress.push(format!(
                "{} {:.1} % {:.0} MB/s",
                d.disk, d.percent, d.mb_per_s
            ));
        }
        if w.state == "succeeded" {
            ready.extend(w.result.map(|r| r.disks).unwrap_or_default());
        }
    }
    let disks = ready
        .into_iter()
        .map(|d| {
            let at = d.nbd_url.or(d.path).unwrap_or_else(|| "-".to_string());
            format!("{} @ {}: {at}", d.disk, d.point)
        })
        .collect();
    Ok(RecoveryLine {
        machine: machine.to_string(),
        state: failover.map(|f| f.state.clone()),
        active_site: failover.map(|f| f.active_site.clone()),
        direction: failover.map(|f| f.direction.clone()),
        master_target: failover.and_then(|f| f.master_target.clone()),
        planned: failover.map(|f| f.planned),
        point: failover.and_then(|f| f.point.clone()),
        host: failover.and_then(|f| f.host.clone()),
        job_id: job.map(|j| j.id.clone()),
        job_kind: job.map(|j| j.kind.clone()),
        job_state: job.map(|j| j.state.as_str().to_string()),
        job_progress: job.map_or(0.0, progress),
        job_task: job.and_then(|j| {
            j.tasks
                .iter()
                .find(|t| t.state != TaskState::Succeeded)
                .map(|t| t.name.clone())
        }),
        job_error: job.and_then(|j| j.error.clone()),
        prompt: job
            .filter(|j| j.state == JobState::WaitingForInput)
            .and_then(|j| j.prompt.clone()),
        disks,
        disk_progress,
    })
}

/// The machines' recovery: their actions, by machine, and the detailed lines of
/// those with a failover or an active job.
pub async fn machines(
    db: &Db,
    names: &[String],
) -> Result<(HashMap<String, Vec<MachineAction>>, Vec<RecoveryLine>)> {
    let failovers = failovers(db).await?;
    let active = active_jobs(db, "recovery/").await?;
    let mut actions_of = HashMap::new();
    let mut lines = Vec::new();
    for name in names {
        let failover = failovers.get(name);
        let job_id = active
            .get(name)
            .or_else(|| failover.and_then(|f| f.job_id.as_ref()));
        let job = match job_id {
            Some(id) if lines.len() < DETAILED => queue::get(db, id).await?,
            _ => None,
        };
        // The failover's last job counts as active only while it is.
        let active_job = job.as_ref().filter(|j| active.get(name) == Some(&j.id));
        actions_of.insert(name.clone(), actions(failover, active_job));
        if (failover.is_some() || job.is_some()) && lines.len() < DETAILED {
            lines.push(line(db, name, failover, job.as_ref()).await?);
        }
    }
    Ok((actions_of, lines))
}

/// The recovery hosts (at most `ROWS`).
pub async fn hosts(db: &Db, now: i64) -> Result<Vec<HostLine>> {
    Ok(work::hosts(db)
        .await?
        .into_iter()
        .take(ROWS as usize)
        .map(|h| HostLine {
            live: now - h.last_seen <= work::HOST_LIVE_S,
            last_seen_ago_s: (now - h.last_seen).max(0),
            name: h.name,
            nbd_address: h.nbd_address,
            items: h.items,
            work_dir_free_bytes: h.work_dir_free_bytes,
            store_error: h.store_error,
        })
        .collect())
}

/// The recovery plans (at most `ROWS`) with their group and machine counts and
/// their active job.
pub async fn plans(db: &Db) -> Result<Vec<PlanLine>> {
    let op = "reading recovery plans";
    let rows = sqlx::query("SELECT name, spec FROM recovery_plans ORDER BY name LIMIT $1")
        .bind(i64::from(ROWS))
        .fetch_all(db.pool())
        .await
        .map_err(q(op))?;
    let active = active_jobs(db, "plan/").await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let name: String = r.try_get("name").map_err(q(op))?;
        let spec: String = r.try_get("spec").map_err(q(op))?;
        // The spec is the plans' own (`groups: [{machines: [...]}, ...]`): counted
        // when it reads so, shown as unknown otherwise.
        let groups = serde_json::from_str::<serde_json::Value>(&spec)
            .ok()
            .and_then(|v| v.get("groups").and_then(|g| g.as_array()).cloned());
        let machines = groups.as_ref().map(|gs| {
            gs.iter()
                .filter_map(|g| g.get("machines").and_then(|m| m.as_array()))
                .map(Vec::len)
                .sum()
        });
        let job = match active.get(&name) {
            Some(id) => queue::get(db, id).await?,
            None => None,
        };
        out.push(PlanLine {
            groups: groups.map(|g| g.len()),
            machines,
            job_id: job.as_ref().map(|j| j.id.clone()),
            job_kind: job.as_ref().map(|j| j.kind.clone()),
            job_state: job.as_ref().map(|j| j.state.as_str().to_string()),
            job_progress: job.as_ref().map_or(0.0, progress),
            prompt: job
                .as_ref()
                .filter(|j| j.state == JobState::WaitingForInput)
                .and_then(|j| j.prompt.clone()),
            name,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(kind: &str, state: JobState) -> Job {
        Job {
            id: "j1".into(),
            kind: kind.into(),
            subject: "m1".into(),
            state,
            params: serde_json::json!({}),
            error: None,
            created_at: 0,
            started_at: None,
            ended_at: None,
            lease_owner: None,
            lease_until_ms: None,
            cancel_requested: false,
            prompt: None,
            input: None,
            tasks: vec![],
            actions: vec![],
        }
    }

    fn failover(state: &str) -> Failover {
        Failover {
            state: state.into(),
            active_site: "recovery".into(),
            direction: "forward".into(),
            master_target: None,
            planned: false,
            point: None,
            host: None,
            job_id: None,
            items: vec![],
        }
    }

    #[test]
    fn the_buttons_follow_the_machines_recovery_state() {
        use MachineAction::*;
        assert_eq!(
            actions(None, None),
            vec![TestFailover, FailoverPlanned, FailoverUnplanned]
        );
        let waiting = job("test-failover", JobState::WaitingForInput);
        assert_eq!(actions(None, Some(&waiting)), vec![Cleanup]);
        // A job at work: nothing until it is done.
        let running = job("test-failover", JobState::Running);
        assert!(actions(None, Some(&running)).is_empty());
        let fo = failover("failed-over");
        assert!(actions(Some(&fo), Some(&job("failover", JobState::Queued))).is_empty());
        assert_eq!(actions(Some(&fo), None), vec![ChangePoint, Commit, Cancel]);
        assert_eq!(actions(Some(&failover("preparing")), None), vec![Cancel]);
        assert!(actions(Some(&failover("committed")), None).is_empty());
        // Failback (docs/failback.md): reprotected, failed back, committed.
        let mut rev = failover("committed");
        rev.direction = "reverse".into();
        assert_eq!(
            actions(Some(&rev), None),
            vec![FailbackPlanned, FailbackUnplanned]
        );
        rev.active_site = "home".into();
        assert_eq!(actions(Some(&rev), None), vec![CommitFailback]);
        assert_eq!(
            actions(Some(&failover("failed-back")), None),
            vec![ReEnable]
        );
        let waiting = job("failback", JobState::WaitingForInput);
        assert_eq!(actions(Some(&rev), Some(&waiting)), vec![CommitFailback]);
    }

    #[test]
    fn points_read_as_disk_equals_point() {
        assert_eq!(points_text(r#"{"sda":"p1","sdb":"p2"}"#), "sda=p1, sdb=p2");
        assert_eq!(points_text("not json"), "not json");
    }
}
