//! The runner: a tokio task inside `ferry control-plane` that claims jobs and runs
//! their tasks in order, at most `max_running` at once.
//!
//! For each job it holds, a ticker renews the lease every third of its length; the
//! job's own loop re-reads the row before each task, so that it stops when an
//! operator cancelled it or when another control plane took the lease over (this one
//! stalled past its deadline). A database error abandons the job without ending it:
//! its lease runs out and a runner (this one, or another) picks it up again at its
//! first unfinished task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, Semaphore};

use super::queue::{self, now_ms};
use super::singleton::Singleton;
use super::{retention, Job, JobState, Step, TaskState};
use crate::db::Db;

/// Settings of the runner; `Default` is what `ferry control-plane` uses.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Names this control plane in `lease_owner`: unique per process.
    pub owner: String,
    /// How long a lease holds unless renewed: also how long a job of a control plane
    /// killed with -9 waits before another start (or instance) takes it over.
    pub lease: Duration,
    /// How often to look for claimable jobs when nothing wakes the runner sooner.
    pub poll: Duration,
    /// Jobs run at once by this control plane.
    pub max_running: usize,
    /// A pause before each task. Zero in production; tests set it to stop a job
    /// between two tasks (kill -9, cancel) without racing it.
    pub step_delay: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            owner: new_owner(),
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(2),
            max_running: 4,
            step_delay: Duration::ZERO,
        }
    }
}

/// `cp-PID-RANDOM`: the pid for people reading the table, the random part because
/// pids repeat across hosts and restarts.
pub fn new_owner() -> String {
    let tail: u32 = rand::thread_rng().gen();
    format!("cp-{}-{tail:08x}", std::process::id())
}

/// The store and vault key the jobs that touch the replica use (`--store`,
/// `--key-file`).
pub struct StoreAccess {
    pub store: ferry_replica::Store,
    pub vault: ferry_replica::VaultKey,
}

/// What jobs run against.
#[derive(Clone)]
pub struct Context {
    pub db: Db,
    pub store: Option<Arc<StoreAccess>>,
    /// Notified when a job is queued or requeued, so that it starts without waiting
    /// for the next poll.
    pub wake: Arc<Notify>,
}

/// Ended jobs are kept this long, then deleted: hourly retention alone makes 168 jobs
/// a week per machine.
pub const ENDED_JOBS_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often ended jobs past `ENDED_JOBS_KEPT`, and events past
/// `registry::events::KEPT_S`, are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Runs until the process ends. Ended jobs and old events are pruned by the holder
/// of `scheduler` only (of several control planes on one database).
pub async fn run(ctx: Context, cfg: RunnerConfig, scheduler: Singleton) {
    let cfg = Arc::new(cfg);
    let slots = Arc::new(Semaphore::new(cfg.max_running.max(1)));
    tracing::info!(
        "job runner {} started: up to {} jobs at once, leases of {:?}",
        cfg.owner,
        cfg.max_running.max(1),
        cfg.lease
    );
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let free = slots.available_permits();
        if free > 0 {
            if let Err(e) = claim_some(&ctx, &cfg, &slots, free).await {
                tracing::warn!("job runner {}: {e}", cfg.owner);
            }
        }
        tokio::select! {
            _ = ctx.wake.notified() => {}
            _ = tokio::time::sleep(cfg.poll) => {}
            _ = prune.tick(), if scheduler.held() => {
                let before = crate::db::now_s() - ENDED_JOBS_KEPT.as_secs() as i64;
                match queue::prune_ended(&ctx.db, before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("deleted {n} jobs that ended over a week ago"),
                    Err(e) => tracing::warn!("deleting old jobs: {e}"),
                }
                let before = crate::db::now_s() - crate::registry::events::KEPT_S;
                match crate::registry::events::prune(&ctx.db, before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("deleted {n} events over 30 days old"),
                    Err(e) => tracing::warn!("deleting old events: {e}"),
                }
            }
        }
    }
}

async fn claim_some(
    ctx: &Context,
    cfg: &Arc<RunnerConfig>,
    slots: &Arc<Semaphore>,
    free: usize,
) -> crate::db::Result<()> {
    let now = now_ms();
    let lease_ms = i64::try_from(cfg.lease.as_millis()).unwrap_or(i64::MAX / 2);
    for id in queue::claimable(&ctx.db, now, free as u32).await? {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            return Ok(());
        };
        if !queue::claim(&ctx.db, &id, &cfg.owner, now, lease_ms).await? {
            // Another control plane was quicker.
            continue;
        }
        tracing::info!("job {id}: claimed by {}", cfg.owner);
        let (ctx, cfg) = (ctx.clone(), cfg.clone());
        tokio::spawn(async move {
            let _permit = permit;
            drive(&ctx, &cfg, &id).await;
        });
    }
    Ok(())
}

/// Runs one claimed job with its lease renewed beside it.
async fn drive(ctx: &Context, cfg: &Arc<RunnerConfig>, id: &str) {
    let lost = Arc::new(AtomicBool::new(false));
    let renewer = {
        let (db, cfg, id, lost) = (ctx.db.clone(), cfg.clone(), id.to_string(), lost.clone());
        tokio::spawn(async move {
            let lease_ms = i64::try_from(cfg.lease.as_millis()).unwrap_or(i64::MAX / 2);
            loop {
                tokio::time::sleep(cfg.lease / 3).await;
                match queue::renew(&db, &id, &cfg.owner, now_ms(), lease_ms).await {
                    Ok(true) => {}
                    Ok(false) => {
                        lost.store(true, Ordering::Relaxed);
                        return;
                    }
                    // Keep trying: the lease holds until its deadline anyway.
                    Err(e) => tracing::warn!("job {id}: renewing its lease: {e}"),
                }
            }
        })
    };
    match steps(ctx, cfg, id, &lost).await {
        Ok(Some(state)) => {
            tracing::info!("job {id}: {}", state.as_str());
            record_end(ctx, id, state).await;
        }
        Ok(None) => tracing::warn!("job {id}: its lease was lost; left to its new owner"),
        Err(e) => tracing::warn!(
            "job {id}: abandoned after a database error (it resumes once its lease runs out): {e}"
        ),
    }
    renewer.abort();
}

/// An ended job is an event (`job-succeeded`, `job-failed`, `job-cancelled`, about
/// `job ID`, saying its kind, subject and error), so that `/v1/events` tells what
/// the jobs did beside what the fleet did. A failure to record it is logged: the job
/// has ended either way.
async fn record_end(ctx: &Context, id: &str, state: JobState) {
    let job = match queue::get(&ctx.db, id).await {
        Ok(Some(job)) => job,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("job {id}: recording its end as an event: {e}");
            return;
        }
    };
    let mut message = format!("{} of {} {}", job.kind, job.subject, state.as_str());
    if let Some(e) = &job.error {
        message.push_str(": ");
        message.push_str(e);
    }
    let kind = format!("job-{}", state.as_str());
    let subject = format!("job {id}");
    if let Err(e) =
        crate::registry::events::add(&ctx.db, &kind, &subject, &message, crate::db::now_s()).await
    {
        tracing::warn!("job {id}: recording its end as an event: {e}");
    }
}

/// The job's tasks from its first unfinished one. The state it ended in, or None
/// when the lease was lost.
async fn steps(
    ctx: &Context,
    cfg: &RunnerConfig,
    id: &str,
    lost: &AtomicBool,
) -> crate::db::Result<Option<JobState>> {
    let owner = cfg.owner.as_str();
    loop {
        if !cfg.step_delay.is_zero() {
            tokio::time::sleep(cfg.step_delay).await;
        }
        let Some(job) = queue::get(&ctx.db, id).await? else {
            return Ok(None);
        };
        if lost.load(Ordering::Relaxed)
            || job.state != JobState::Running
            || job.lease_owner.as_deref() != Some(owner)
        {
            return Ok(None);
        }
        if job.cancel_requested {
            return Ok(queue::finish(&ctx.db, id, owner, JobState::Cancelled, None)
                .await?
                .then_some(JobState::Cancelled));
        }
        let Some(seq) = job
            .tasks
            .iter()
            .position(|t| t.state != TaskState::Succeeded)
        else {
            return Ok(queue::finish(&ctx.db, id, owner, JobState::Succeeded, None)
                .await?
                .then_some(JobState::Succeeded));
        };
        if !queue::task_started(&ctx.db, id, owner, seq).await? {
            return Ok(None);
        }
        let name = job.tasks[seq].name.clone();
        tracing::info!("job {id}: task {seq} ({name}) started");
        match run_task(ctx, &job, seq).await {
            Ok(Step::Wait(prompt)) => {
                tracing::info!("job {id}: task {seq} ({name}) waits for input: {prompt}");
                return Ok(queue::wait_for_input(&ctx.db, id, owner, seq, &prompt)
                    .await?
                    .then_some(JobState::WaitingForInput));
            }
            Ok(Step::Done) => {
                if !queue::task_ended(&ctx.db, id, owner, seq, None).await? {
                    return Ok(None);
                }
            }
            Err(e) => {
                tracing::warn!("job {id}: task {seq} ({name}) failed: {e}");
                if !queue::task_ended(&ctx.db, id, owner, seq, Some(&e)).await? {
                    return Ok(None);
                }
                let error = format!("task {name}: {e}");
                // A task that stopped because an operator asked the job to cancel
                // (a wait sees `cancel_requested`) ends it cancelled, not failed:
                // the failure is the cancel, and the error still says where it stopped.
                let ended = match queue::get(&ctx.db, id).await? {
                    Some(j) if j.cancel_requested => JobState::Cancelled,
                    _ => JobState::Failed,
                };
                return Ok(queue::finish(&ctx.db, id, owner, ended, Some(&error))
                    .await?
                    .then_some(ended));
            }
        }
    }
}

/// One task of a job, by its kind. The error is the task's, as people read it.
async fn run_task(ctx: &Context, job: &Job, seq: usize) -> Result<Step, String> {
    match job.kind.as_str() {
        retention::KIND => retention::run_task(ctx, job, seq)
            .await
            .map(|()| Step::Done),
        kind if crate::recovery::jobs::KINDS.contains(&kind) => {
            crate::recovery::jobs::tasks::run_task(ctx, job, seq).await
        }
        k if crate::plans::job::KINDS.contains(&k) => {
            crate::plans::job::run_task(ctx, job, seq).await
        }
        other => Err(format!("no runner for jobs of kind {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn until_ended(db: &Db, id: &str) -> Job {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let job = queue::get(db, id).await.unwrap().unwrap();
            if job.state.is_ended() {
                return job;
            }
            assert!(std::time::Instant::now() < deadline, "{job:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_failed_task_fails_its_job_naming_it_and_later_tasks_wait() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
        let params = json!({"machine": "m", "policy": "default", "retention_hours": 1,
            "disks": ["d0", "d1"]});
        let tasks = ["compact disk d0".to_string(), "compact disk d1".to_string()];
        let id = queue::enqueue(&db, retention::KIND, "m", &params, &tasks)
            .await
            .unwrap()
            .unwrap();
        let odd = queue::enqueue(&db, "mystery", "m", &json!({}), &tasks[..1])
            .await
            .unwrap()
            .unwrap();
        // No store: retention's first task cannot run.
        let ctx = Context {
            db: db.clone(),
            store: None,
            wake: Arc::new(Notify::new()),
        };
        let cfg = RunnerConfig {
            poll: Duration::from_millis(20),
            ..RunnerConfig::default()
        };
        let scheduler = Singleton::start(
            db.clone(),
            crate::jobs::singleton::SCHEDULER,
            &cfg.owner,
            cfg.lease,
        )
        .await;
        let runner = tokio::spawn(run(ctx, cfg, scheduler));
        let job = until_ended(&db, &id).await;
        assert_eq!(job.state, JobState::Failed);
        let error = job.error.clone().unwrap();
        assert!(
            error.starts_with("task compact disk d0: ") && error.contains("--store"),
            "{error}"
        );
        assert_eq!(job.tasks[0].state, TaskState::Failed);
        assert!(job.tasks[0].ended_at.is_some());
        assert_eq!(job.tasks[1].state, TaskState::Pending);
        assert_eq!(job.tasks[1].started_at, None);
        assert_eq!(job.lease_owner, None);
        let job = until_ended(&db, &odd).await;
        assert_eq!(job.state, JobState::Failed);
        assert!(
            job.error
                .as_deref()
                .unwrap()
                .contains("no runner for jobs of kind \"mystery\""),
            "{job:?}"
        );
        runner.abort();
    }
}
