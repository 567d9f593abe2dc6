//! The `group G: machines` and `group G: clean up` tasks: a machine job per machine
//! of the group, at most the plan's `max_parallel` in progress at once, waited on by
//! their states in the jobs table.
//!
//! A machine whose job fails does not stop the others of its group: the task waits
//! for them all, then fails naming every machine that failed. Run again (the plan
//! job resumed), it resumes those machine jobs and waits for the others it recorded.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use serde_json::Value;
use sqlx::Row;

use super::children::{enqueue_child, machine_key, ChildKind};
use super::job::{save_params, Params};
use crate::db::q;
use crate::jobs::queue::{self, Outcome};
use crate::jobs::runner::Context;
use crate::jobs::{Job, JobState};

/// How often the children's states are read.
const POLL: Duration = Duration::from_millis(300);

/// A child job as the plan sees it.
#[derive(Debug, Clone)]
struct Child {
    kind: String,
    state: JobState,
    error: Option<String>,
    prompt: Option<String>,
}

/// Where a child stands, for what the task wants of it.
#[derive(Debug, PartialEq)]
enum Seen {
    /// What the task waits for: up (bring up), or succeeded (clean up).
    Reached,
    /// Queued or running (or, bring up, waiting for an operator).
    InProgress,
    /// Failed or cancelled.
    Ended,
    /// A test failover that has already been cleaned up (an earlier job run's).
    CleanedUp,
}

fn seen_bringing_up(kind: ChildKind, state: JobState) -> Seen {
    match state {
        JobState::Queued | JobState::Running => Seen::InProgress,
        JobState::WaitingForInput if kind.up_when_waiting() => Seen::Reached,
        // A failback is home once it waits for its commit (or committed since).
        JobState::WaitingForInput | JobState::Succeeded
            if matches!(kind, ChildKind::Failback { .. }) =>
        {
            Seen::Reached
        }
        JobState::WaitingForInput => Seen::InProgress,
        JobState::Succeeded if kind.up_when_waiting() => Seen::CleanedUp,
        JobState::Succeeded => Seen::Reached,
        JobState::Failed | JobState::Cancelled => Seen::Ended,
    }
}

/// The states of jobs `ids` (at most a plan's 100 machines).
async fn states(ctx: &Context, ids: &[&String]) -> Result<HashMap<String, Child>, String> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let marks: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT id, kind, state, error, prompt FROM jobs WHERE id IN ({})",
        marks.join(", ")
    );
    let mut query = sqlx::query(&sql);
    for id in ids {
        query = query.bind((*id).clone());
    }
    let op = "reading a plan's machine jobs";
    let rows = query
        .fetch_all(ctx.db.pool())
        .await
        .map_err(|e| q(op)(e).to_string())?;
    let mut out = HashMap::new();
    for r in rows {
        let get = |col: &str| -> Result<Option<String>, String> {
            r.try_get(col).map_err(|e| q(op)(e).to_string())
        };
        let id = get("id")?.unwrap_or_default();
        let state = get("state")?.unwrap_or_default();
        let state = JobState::parse(&state)
            .ok_or_else(|| format!("job {id} has an unknown state {state:?}"))?;
        out.insert(
            id,
            Child {
                kind: get("kind")?.unwrap_or_default(),
                state,
                error: get("error")?,
                prompt: get("prompt")?,
            },
        );
    }
    Ok(out)
}

/// Between two looks at the children: the plan job must still be this runner's and
/// not asked to stop.
async fn still_ours(
    ctx: &Context,
    job: &Job,
    owner: &str,
    waiting_for: &str,
) -> Result<(), String> {
    let now = queue::get(&ctx.db, &job.id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("job {} vanished", job.id))?;
    if now.state != JobState::Running || now.lease_owner.as_deref() != Some(owner) {
        return Err(format!("job {}: its lease was lost", job.id));
    }
    if now.cancel_requested {
        return Err(format!(
            "cancelled while waiting for {waiting_for} (their machine jobs go on; cancel them \
             or run the plan's cancel)"
        ));
    }
    Ok(())
}

fn describe(machine: &str, id: &str, c: &Child) -> String {
    let mut s = format!(
        "machine {machine}: job {id} ({}) {}",
        c.kind,
        c.state.as_str()
    );
    if let Some(e) = &c.error {
        s.push_str(": ");
        s.push_str(e);
    }
    s
}

fn failed(group: &str, what: &str, total: usize, failures: &[String]) -> String {
    format!(
        "group {group}: {} of {total} machines {what}: {}",
        failures.len(),
        failures.join("; ")
    )
}

/// Queues machine `m`'s job, or finds the one an earlier run of this task queued but
/// did not get to record (killed between the two).
async fn start_child(
    ctx: &Context,
    job: &Job,
    params: &Params,
    kind: ChildKind,
    m: &str,
) -> Result<String, String> {
    let point = params.points.get(m).map(String::as_str);
    let body = params.operation.child_params(m, point);
    match enqueue_child(&ctx.db, ctx.store.as_ref(), kind, m, &body).await {
        Ok(Some(id)) => return Ok(id),
        Ok(None) => {}
        // Refused: the job an earlier run of this task queued (killed before it
        // recorded it) may have ended already, leaving the machine where it refuses
        // another (a commit done). That job is this plan's: newer than the plan job,
        // of the kind it queues, recorded for no other machine.
        Err(refused) => {
            let earlier = super::store::job_after(&ctx.db, kind.as_str(), m, &job.id)
                .await
                .map_err(|e| e.to_string())?;
            return match earlier {
                Some(id) if !params.children.values().any(|c| c == &id) => Ok(id),
                _ => Err(refused),
            };
        }
    }
    let active = super::store::active_job(&ctx.db, &machine_key(m))
        .await
        .map_err(|e| e.to_string())?;
    match active {
        // Newer than this plan job, of the kind it queues, and no other machine's:
        // the one this task queued before it was stopped.
        Some((id, k))
            if k == kind.as_str()
                && id.as_str() > job.id.as_str()
                && !params.children.values().any(|c| c == &id) =>
        {
            Ok(id)
        }
        Some((id, k)) => Err(format!(
            "machine {m}: another recovery job is active, {k} {id} (resume once it ended)"
        )),
        None => Err(format!(
            "machine {m}: its {} job could not be queued (another ended meanwhile: resume to \
             retry)",
            kind.as_str()
        )),
    }
}

/// `group G: machines`: each machine's job queued (or found, or resumed) and waited
/// for until it is up.
pub async fn bring_up(
    ctx: &Context,
    job: &Job,
    owner: &str,
    seq: usize,
    params: &mut Params,
    group: usize,
) -> Result<(), String> {
    let kind = params.operation.child();
    let gname = params.plan.groups[group].name.clone();
    let machines = params.plan.groups[group].machines.clone();
    let max = (params.plan.max_parallel as usize).max(1);
    let recorded: Vec<&String> = machines
        .iter()
        .filter_map(|m| params.children.get(m))
        .collect();
    let known = states(ctx, &recorded).await?;
    let mut to_start = VecDeque::new();
    let mut in_flight = BTreeSet::new();
    let mut failures = Vec::new();
    let mut up = 0usize;
    for m in &machines {
        let Some((id, c)) = params
            .children
            .get(m)
            .and_then(|id| known.get(id).map(|c| (id.clone(), c)))
        else {
            to_start.push_back(m.clone());
            continue;
        };
        match seen_bringing_up(kind, c.state) {
            Seen::Reached => up += 1,
            Seen::InProgress => {
                in_flight.insert(m.clone());
            }
            // A new test: the recorded one was a finished test of an earlier run.
            Seen::CleanedUp => to_start.push_back(m.clone()),
            // Run again after it failed: the machine job is resumed (retried).
            Seen::Ended => match queue::resume(&ctx.db, &id)
                .await
                .map_err(|e| e.to_string())?
            {
                Outcome::Done(_) => {
                    ctx.wake.notify_one();
                    in_flight.insert(m.clone());
                }
                _ => failures.push(format!(
                    "{} (and it cannot resume now)",
                    describe(m, &id, c)
                )),
            },
        }
    }
    loop {
        while in_flight.len() < max {
            let Some(m) = to_start.pop_front() else { break };
            match start_child(ctx, job, params, kind, &m).await {
                Ok(id) => {
                    params.children.insert(m.clone(), id);
                    save_params(&ctx.db, job, owner, params).await?;
                    ctx.wake.notify_one();
                    in_flight.insert(m);
                }
                Err(e) => failures.push(e),
            }
        }
        if in_flight.is_empty() && to_start.is_empty() {
            break;
        }
        tokio::time::sleep(POLL).await;
        still_ours(ctx, job, owner, &format!("the machines of group {gname}")).await?;
        let ids: Vec<&String> = in_flight
            .iter()
            .filter_map(|m| params.children.get(m))
            .collect();
        let now = states(ctx, &ids).await?;
        for m in in_flight.clone() {
            let id = params.children.get(&m).cloned().unwrap_or_default();
            let Some(c) = now.get(&id) else {
                failures.push(format!("machine {m}: its job {id} vanished"));
                in_flight.remove(&m);
                continue;
            };
            match seen_bringing_up(kind, c.state) {
                Seen::Reached => {
                    up += 1;
                    in_flight.remove(&m);
                }
                Seen::InProgress => {}
                Seen::CleanedUp => {
                    failures.push(format!(
                        "machine {m}: its test failover {id} ended before the plan's cleanup"
                    ));
                    in_flight.remove(&m);
                }
                Seen::Ended => {
                    failures.push(describe(&m, &id, c));
                    in_flight.remove(&m);
                }
            }
        }
        let progress = up as f64 / machines.len().max(1) as f64;
        queue::task_progress(&ctx.db, &job.id, owner, seq, progress)
            .await
            .map_err(|e| e.to_string())?;
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failed(&gname, "did not come up", machines.len(), &failures))
    }
}

/// `group G: clean up`: each machine's test failover resumed with the verdict, and
/// waited for until it succeeded (its cleanup verified by its own job).
pub async fn clean_up(
    ctx: &Context,
    job: &Job,
    owner: &str,
    seq: usize,
    params: &Params,
    group: usize,
) -> Result<(), String> {
    let verdict: Value = params
        .verdict
        .clone()
        .ok_or_else(|| format!("job {}: no verdict was given", job.id))?;
    let gname = &params.plan.groups[group].name;
    let machines: Vec<(String, String)> = params.plan.groups[group]
        .machines
        .iter()
        .filter_map(|m| params.children.get(m).map(|id| (m.clone(), id.clone())))
        .collect();
    let max = (params.plan.max_parallel as usize).max(1);
    let ids: Vec<&String> = machines.iter().map(|(_, id)| id).collect();
    let known = states(ctx, &ids).await?;
    let mut to_resume = VecDeque::new();
    let mut in_flight = BTreeSet::new();
    let mut failures = Vec::new();
    let mut done = 0usize;
    for (m, id) in &machines {
        match known.get(id).map(|c| c.state) {
            None => failures.push(format!("machine {m}: its test failover {id} vanished")),
            Some(JobState::Succeeded) => done += 1,
            Some(JobState::Queued | JobState::Running) => {
                in_flight.insert(m.clone());
            }
            Some(JobState::WaitingForInput | JobState::Failed | JobState::Cancelled) => {
                to_resume.push_back(m.clone())
            }
        }
    }
    let id_of = |m: &str| -> String {
        machines
            .iter()
            .find(|(x, _)| x == m)
            .map(|(_, id)| id.clone())
            .unwrap_or_default()
    };
    loop {
        while in_flight.len() < max {
            let Some(m) = to_resume.pop_front() else {
                break;
            };
            let id = id_of(&m);
            match queue::resume_with(&ctx.db, &id, Some(&verdict))
                .await
                .map_err(|e| e.to_string())?
            {
                Outcome::Done(_) => {
                    ctx.wake.notify_one();
                    in_flight.insert(m);
                }
                other => failures.push(format!(
                    "machine {m}: its test failover {id} could not be resumed for its cleanup \
                     ({other:?})"
                )),
            }
        }
        if in_flight.is_empty() && to_resume.is_empty() {
            break;
        }
        tokio::time::sleep(POLL).await;
        still_ours(ctx, job, owner, &format!("the cleanup of group {gname}")).await?;
        let ids: Vec<String> = in_flight.iter().map(|m| id_of(m)).collect();
        let now = states(ctx, &ids.iter().collect::<Vec<_>>()).await?;
        for m in in_flight.clone() {
            let id = id_of(&m);
            let Some(c) = now.get(&id) else {
                failures.push(format!("machine {m}: its test failover {id} vanished"));
                in_flight.remove(&m);
                continue;
            };
            match c.state {
                JobState::Succeeded => {
                    done += 1;
                    in_flight.remove(&m);
                }
                JobState::Queued | JobState::Running => {}
                JobState::WaitingForInput => {
                    failures.push(format!(
                        "machine {m}: its test failover {id} waits for input again: {}",
                        c.prompt.as_deref().unwrap_or("")
                    ));
                    in_flight.remove(&m);
                }
                JobState::Failed | JobState::Cancelled => {
                    failures.push(describe(&m, &id, c));
                    in_flight.remove(&m);
                }
            }
        }
        let progress = done as f64 / machines.len().max(1) as f64;
        queue::task_progress(&ctx.db, &job.id, owner, seq, progress)
            .await
            .map_err(|e| e.to_string())?;
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failed(
            gname,
            "were not cleaned up",
            machines.len(),
            &failures,
        ))
    }
}
