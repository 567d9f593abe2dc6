//! The `jobs` and `job_tasks` tables.
//!
//! A runner owns a job through its lease: `lease_owner` and `lease_until_ms`, taken
//! with one conditional UPDATE (`claim`), which matches only a queued job or a
//! running one whose lease has run out. Both SQLite and PostgreSQL apply such an
//! UPDATE to a row atomically (PostgreSQL re-checks the WHERE clause on the locked
//! row), so of two control planes racing for one job exactly one sees a row changed.
//! Every later write of the runner is conditioned on still holding the lease, so a
//! runner that lost it (stalled past its deadline, taken over) changes nothing.

use rand::Rng;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{Action, Job, JobState, Task, TaskState};
use crate::db::{now_s, q, Db, Error, Result};

const JOB_COLUMNS: &str = "id, kind, subject, state, params, error, created_at, started_at, \
                           ended_at, lease_owner, lease_until_ms, cancel_requested, prompt, \
                           input";
const TASK_COLUMNS: &str = "job_id, seq, name, state, error, started_at, ended_at, progress";

/// Now, in Unix milliseconds: the lease's clock.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn damaged(op: &'static str, what: String) -> Error {
    Error::Query {
        op,
        source: sqlx::Error::Decode(what.into()),
    }
}

fn job_from_row(row: &AnyRow) -> Result<Job> {
    let op = "reading a job";
    let id: String = row.try_get("id").map_err(q(op))?;
    let state: String = row.try_get("state").map_err(q(op))?;
    let state = JobState::parse(&state)
        .ok_or_else(|| damaged(op, format!("job {id} has an unknown state {state:?}")))?;
    let params: String = row.try_get("params").map_err(q(op))?;
    let params = serde_json::from_str(&params)
        .map_err(|e| damaged(op, format!("job {id}: its params are not JSON: {e}")))?;
    let cancel_requested = row.try_get::<i64, _>("cancel_requested").map_err(q(op))? != 0;
    let input: Option<String> = row.try_get("input").map_err(q(op))?;
    let input = input
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|e| damaged(op, format!("job {id}: its input is not JSON: {e}")))?;
    Ok(Job {
        kind: row.try_get("kind").map_err(q(op))?,
        subject: row.try_get("subject").map_err(q(op))?,
        state,
        params,
        error: row.try_get("error").map_err(q(op))?,
        created_at: row.try_get("created_at").map_err(q(op))?,
        started_at: row.try_get("started_at").map_err(q(op))?,
        ended_at: row.try_get("ended_at").map_err(q(op))?,
        lease_owner: row.try_get("lease_owner").map_err(q(op))?,
        lease_until_ms: row.try_get("lease_until_ms").map_err(q(op))?,
        cancel_requested,
        prompt: row.try_get("prompt").map_err(q(op))?,
        input,
        tasks: Vec::new(),
        actions: Action::allowed(state, cancel_requested),
        id,
    })
}

fn task_from_row(row: &AnyRow) -> Result<(String, Task)> {
    let op = "reading a job's task";
    let job: String = row.try_get("job_id").map_err(q(op))?;
    let state: String = row.try_get("state").map_err(q(op))?;
    let state = TaskState::parse(&state)
        .ok_or_else(|| damaged(op, format!("a task of job {job} is {state:?}")))?;
    Ok((
        job,
        Task {
            name: row.try_get("name").map_err(q(op))?,
            state,
            error: row.try_get("error").map_err(q(op))?,
            started_at: row.try_get("started_at").map_err(q(op))?,
            ended_at: row.try_get("ended_at").map_err(q(op))?,
            progress: row.try_get("progress").map_err(q(op))?,
        },
    ))
}

/// A new job id: sorts by creation (milliseconds), unique by its random tail. Within
/// one control plane the millisecond part only grows (two jobs queued in the same
/// millisecond take the next one), so its jobs list in the order they were queued;
/// between control planes on one database, jobs of the same millisecond order by tail.
fn new_id() -> String {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST_MS: AtomicI64 = AtomicI64::new(0);
    let now = now_ms();
    let prev = LAST_MS
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or(now);
    let ms = now.max(prev + 1);
    let tail: u32 = rand::thread_rng().gen();
    format!("j{ms:013}-{tail:08x}")
}

/// Queues a job with its tasks, unless one of the same kind and subject is active
/// (queued, running or waiting): then None. The unique `active_key` decides, so that
/// two schedules firing at once (two control planes) queue one job.
pub async fn enqueue(
    db: &Db,
    kind: &str,
    subject: &str,
    params: &serde_json::Value,
    tasks: &[String],
) -> Result<Option<String>> {
    enqueue_keyed(db, kind, subject, None, params, tasks).await
}

/// `enqueue`, with one active job per `key` rather than per kind and subject (the
/// recovery jobs: one per machine, whatever their kind). None when a job holding
/// `key` is active.
pub async fn enqueue_keyed(
    db: &Db,
    kind: &str,
    subject: &str,
    key: Option<&str>,
    params: &serde_json::Value,
    tasks: &[String],
) -> Result<Option<String>> {
    let id = new_id();
    let active_key = key.map_or_else(|| format!("{kind}/{subject}"), str::to_string);
    let mut tx = db.begin_write("queueing a job").await?;
    let done = sqlx::query(
        "INSERT INTO jobs (id, kind, subject, state, params, created_at, cancel_requested, \
         active_key, job_key) VALUES ($1, $2, $3, 'queued', $4, $5, 0, $6, $7) \
         ON CONFLICT (active_key) DO NOTHING",
    )
    .bind(id.clone())
    .bind(kind.to_string())
    .bind(subject.to_string())
    .bind(params.to_string())
    .bind(now_s())
    .bind(active_key)
    .bind(key.map(str::to_string))
    .execute(&mut *tx)
    .await
    .map_err(q("queueing a job"))?;
    if done.rows_affected() != 1 {
        tx.rollback().await.map_err(q("queueing a job"))?;
        return Ok(None);
    }
    for (seq, name) in tasks.iter().enumerate() {
        sqlx::query(
            "INSERT INTO job_tasks (job_id, seq, name, state, progress) \
             VALUES ($1, $2, $3, 'pending', 0)",
        )
        .bind(id.clone())
        .bind(seq as i64)
        .bind(name.clone())
        .execute(&mut *tx)
        .await
        .map_err(q("queueing a job's tasks"))?;
    }
    tx.commit().await.map_err(q("queueing a job"))?;
    Ok(Some(id))
}

async fn tasks_of(db: &Db, id: &str) -> Result<Vec<Task>> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM job_tasks WHERE job_id = $1 ORDER BY seq");
    let rows = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_all(db.pool())
        .await
        .map_err(q("reading a job's tasks"))?;
    rows.iter().map(|r| Ok(task_from_row(r)?.1)).collect()
}

/// One job with its tasks.
pub async fn get(db: &Db, id: &str) -> Result<Option<Job>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("reading a job"))?;
    let Some(row) = row else { return Ok(None) };
    let mut job = job_from_row(&row)?;
    job.tasks = tasks_of(db, id).await?;
    Ok(Some(job))
}

/// Up to `limit` jobs in id (creation) order after `after`, of `state` when given,
/// each with its tasks.
pub async fn list(
    db: &Db,
    state: Option<JobState>,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<Job>> {
    let after = after.unwrap_or("").to_string();
    let rows = match state {
        Some(s) => {
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE id > $1 AND state = $2 ORDER BY id LIMIT $3"
            );
            sqlx::query(&sql)
                .bind(after.clone())
                .bind(s.as_str().to_string())
                .bind(i64::from(limit))
                .fetch_all(db.pool())
                .await
        }
        None => {
            let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id > $1 ORDER BY id LIMIT $2");
            sqlx::query(&sql)
                .bind(after.clone())
                .bind(i64::from(limit))
                .fetch_all(db.pool())
                .await
        }
    }
    .map_err(q("listing jobs"))?;
    let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>>>()?;
    let Some(last) = jobs.last().map(|j| j.id.clone()) else {
        return Ok(jobs);
    };
    // The tasks of the page in one query: those of every job in its id range (a state
    // filter may skip some; their tasks are dropped below).
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM job_tasks WHERE job_id > $1 AND job_id <= $2 \
         ORDER BY job_id, seq"
    );
    let rows = sqlx::query(&sql)
        .bind(after)
        .bind(last)
        .fetch_all(db.pool())
        .await
        .map_err(q("listing jobs' tasks"))?;
    let mut by_job = std::collections::HashMap::<String, Vec<Task>>::new();
    for r in &rows {
        let (job, task) = task_from_row(r)?;
        by_job.entry(job).or_default().push(task);
    }
    for j in &mut jobs {
        j.tasks = by_job.remove(&j.id).unwrap_or_default();
    }
    Ok(jobs)
}

/// Jobs a runner could claim now: queued, or running under a lease past its
/// deadline (its runner died or stalled). Oldest first.
pub async fn claimable(db: &Db, now_ms: i64, limit: u32) -> Result<Vec<String>> {
    let rows = sqlx::query(
        "SELECT id FROM jobs WHERE state = 'queued' \
         OR (state = 'running' AND lease_until_ms < $1) ORDER BY id LIMIT $2",
    )
    .bind(now_ms)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(q("finding jobs to run"))?;
    rows.iter()
        .map(|r| r.try_get("id").map_err(q("finding jobs to run")))
        .collect()
}

/// Takes the lease of job `id` for `owner` until `now_ms + lease_ms`, if the job is
/// queued or its lease has run out; true when this call took it.
pub async fn claim(db: &Db, id: &str, owner: &str, now_ms: i64, lease_ms: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET state = 'running', lease_owner = $1, lease_until_ms = $2, \
         started_at = COALESCE(started_at, $3) \
         WHERE id = $4 AND (state = 'queued' OR (state = 'running' AND lease_until_ms < $5))",
    )
    .bind(owner.to_string())
    .bind(now_ms + lease_ms)
    .bind(now_ms / 1000)
    .bind(id.to_string())
    .bind(now_ms)
    .execute(db.pool())
    .await
    .map_err(q("claiming a job"))?;
    Ok(done.rows_affected() == 1)
}

/// Extends `owner`'s lease on `id`; false when it no longer holds it.
pub async fn renew(db: &Db, id: &str, owner: &str, now_ms: i64, lease_ms: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET lease_until_ms = $1 \
         WHERE id = $2 AND lease_owner = $3 AND state = 'running'",
    )
    .bind(now_ms + lease_ms)
    .bind(id.to_string())
    .bind(owner.to_string())
    .execute(db.pool())
    .await
    .map_err(q("renewing a job's lease"))?;
    Ok(done.rows_affected() == 1)
}

/// The condition every runner write adds: the job is still running under its lease.
const HOLDS_LEASE: &str =
    "EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND lease_owner = $2 AND state = 'running')";

/// Marks task `seq` running (again, after a takeover: its start time is the new one).
pub async fn task_started(db: &Db, id: &str, owner: &str, seq: usize) -> Result<bool> {
    let sql = format!(
        "UPDATE job_tasks SET state = 'running', started_at = $3, ended_at = NULL, \
         error = NULL, progress = 0 WHERE job_id = $1 AND seq = $4 AND {HOLDS_LEASE}"
    );
    let done = sqlx::query(&sql)
        .bind(id.to_string())
        .bind(owner.to_string())
        .bind(now_s())
        .bind(seq as i64)
        .execute(db.pool())
        .await
        .map_err(q("starting a task"))?;
    Ok(done.rows_affected() == 1)
}

/// Records a task's progress (0.0 to 1.0).
pub async fn task_progress(
    db: &Db,
    id: &str,
    owner: &str,
    seq: usize,
    progress: f64,
) -> Result<bool> {
    let sql = format!(
        "UPDATE job_tasks SET progress = $3 WHERE job_id = $1 AND seq = $4 AND {HOLDS_LEASE}"
    );
    let done = sqlx::query(&sql)
        .bind(id.to_string())
        .bind(owner.to_string())
        .bind(progress.clamp(0.0, 1.0))
        .bind(seq as i64)
        .execute(db.pool())
        .await
        .map_err(q("recording a task's progress"))?;
    Ok(done.rows_affected() == 1)
}

/// Ends task `seq`: succeeded (progress 1) or failed with `error`.
pub async fn task_ended(
    db: &Db,
    id: &str,
    owner: &str,
    seq: usize,
    error: Option<&str>,
) -> Result<bool> {
    let (state, progress_sql) = match error {
        None => ("succeeded", ", progress = 1"),
        Some(_) => ("failed", ""),
    };
    let sql = format!(
        "UPDATE job_tasks SET state = '{state}', ended_at = $3, error = $4{progress_sql} \
         WHERE job_id = $1 AND seq = $5 AND {HOLDS_LEASE}"
    );
    let done = sqlx::query(&sql)
        .bind(id.to_string())
        .bind(owner.to_string())
        .bind(now_s())
        .bind(error.map(str::to_string))
        .bind(seq as i64)
        .execute(db.pool())
        .await
        .map_err(q("ending a task"))?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    // The input answered the task that asked for it: the next waiting task asks anew.
    sqlx::query(
        "UPDATE jobs SET input = NULL WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
    )
    .bind(id.to_string())
    .bind(owner.to_string())
    .execute(db.pool())
    .await
    .map_err(q("ending a task"))?;
    Ok(true)
}

/// Stops a job its runner holds at task `seq`, which waits for input: the job waits
/// (`waiting-for-input`, showing `prompt`, its lease released, still active), and the
/// task goes back to pending to run again at resume. False when the runner no longer
/// held it.
pub async fn wait_for_input(
    db: &Db,
    id: &str,
    owner: &str,
    seq: usize,
    prompt: &str,
) -> Result<bool> {
    let mut tx = db.begin_write("stopping a job for input").await?;
    let sql = format!(
        "UPDATE job_tasks SET state = 'pending', ended_at = NULL \
         WHERE job_id = $1 AND seq = $3 AND {HOLDS_LEASE}"
    );
    sqlx::query(&sql)
        .bind(id.to_string())
        .bind(owner.to_string())
        .bind(seq as i64)
        .execute(&mut *tx)
        .await
        .map_err(q("stopping a job for input"))?;
    let done = sqlx::query(
        "UPDATE jobs SET state = 'waiting-for-input', prompt = $1, input = NULL, \
         lease_owner = NULL, lease_until_ms = NULL \
         WHERE id = $2 AND lease_owner = $3 AND state = 'running'",
    )
    .bind(prompt.to_string())
    .bind(id.to_string())
    .bind(owner.to_string())
    .execute(&mut *tx)
    .await
    .map_err(q("stopping a job for input"))?;
    tx.commit().await.map_err(q("stopping a job for input"))?;
    Ok(done.rows_affected() == 1)
}

/// Ends a job its runner holds: succeeded, failed (with `error`) or cancelled; the
/// lease is released. False when the runner no longer held it. A task left `running`
/// (by a runner that died before a cancel was honoured) goes back to `pending`: it
/// did not finish, and a resume runs it again.
pub async fn finish(
    db: &Db,
    id: &str,
    owner: &str,
    state: JobState,
    error: Option<&str>,
) -> Result<bool> {
    let mut tx = db.begin_write("ending a job").await?;
    let sql = format!(
        "UPDATE job_tasks SET state = 'pending', started_at = NULL, progress = 0 \
         WHERE job_id = $1 AND state = 'running' AND {HOLDS_LEASE}"
    );
    sqlx::query(&sql)
        .bind(id.to_string())
        .bind(owner.to_string())
        .execute(&mut *tx)
        .await
        .map_err(q("ending a job's tasks"))?;
    let done = sqlx::query(
        "UPDATE jobs SET state = $1, error = $2, ended_at = $3, lease_owner = NULL, \
         lease_until_ms = NULL, active_key = NULL \
         WHERE id = $4 AND lease_owner = $5 AND state = 'running'",
    )
    .bind(state.as_str().to_string())
    .bind(error.map(str::to_string))
    .bind(now_s())
    .bind(id.to_string())
    .bind(owner.to_string())
    .execute(&mut *tx)
    .await
    .map_err(q("ending a job"))?;
    tx.commit().await.map_err(q("ending a job"))?;
    Ok(done.rows_affected() == 1)
}

/// How many jobs there are of each (kind, state).
pub async fn count_by_state(db: &Db) -> Result<Vec<(String, String, i64)>> {
    let rows = sqlx::query(
        "SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state ORDER BY kind, state",
    )
    .fetch_all(db.pool())
    .await
    .map_err(q("counting jobs"))?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("kind").map_err(q("counting jobs"))?,
                r.try_get("state").map_err(q("counting jobs"))?,
                r.try_get("n").map_err(q("counting jobs"))?,
            ))
        })
        .collect()
}

/// Deletes the jobs that ended before `before_s` (Unix seconds) and their tasks; how
/// many jobs. Active jobs are never touched.
pub async fn prune_ended(db: &Db, before_s: i64) -> Result<u64> {
    let mut tx = db.begin_write("pruning ended jobs").await?;
    // Tasks first: SQLite enforces no foreign keys (so no cascade) unless asked.
    let ended = "SELECT id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') \
                 AND ended_at < $1";
    sqlx::query(&format!("DELETE FROM job_tasks WHERE job_id IN ({ended})"))
        .bind(before_s)
        .execute(&mut *tx)
        .await
        .map_err(q("pruning ended jobs' tasks"))?;
    let done = sqlx::query(&format!("DELETE FROM jobs WHERE id IN ({ended})"))
        .bind(before_s)
        .execute(&mut *tx)
        .await
        .map_err(q("pruning ended jobs"))?;
    tx.commit().await.map_err(q("pruning ended jobs"))?;
    Ok(done.rows_affected())
}

/// What an operator's action came to.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Done; the job as it is now.
    Done(Job),
    /// The job's state does not allow it; the job as it is.
    NotAllowed(Job),
    /// Another job of the same kind and subject is active; the job as it is.
    Busy(Job),
    NotFound,
}

/// Cancels: a queued or waiting job at once, a running one between two tasks (its
/// runner sees `cancel_requested`).
pub async fn cancel(db: &Db, id: &str) -> Result<Outcome> {
    let stopped = sqlx::query(
        "UPDATE jobs SET state = 'cancelled', ended_at = $1, active_key = NULL \
         WHERE id = $2 AND state IN ('queued', 'waiting-for-input')",
    )
    .bind(now_s())
    .bind(id.to_string())
    .execute(db.pool())
    .await
    .map_err(q("cancelling a job"))?;
    let asked = if stopped.rows_affected() == 1 {
        true
    } else {
        sqlx::query(
            "UPDATE jobs SET cancel_requested = 1 \
             WHERE id = $1 AND state = 'running' AND cancel_requested = 0",
        )
        .bind(id.to_string())
        .execute(db.pool())
        .await
        .map_err(q("cancelling a job"))?
        .rows_affected()
            == 1
    };
    outcome(db, id, asked).await
}

async fn outcome(db: &Db, id: &str, done: bool) -> Result<Outcome> {
    Ok(match get(db, id).await? {
        None => Outcome::NotFound,
        Some(job) if done => Outcome::Done(job),
        Some(job) => Outcome::NotAllowed(job),
    })
}

/// Queues a failed, cancelled or waiting job again; it goes on from its first task
/// not succeeded.
pub async fn resume(db: &Db, id: &str) -> Result<Outcome> {
    resume_with(db, id, None).await
}

/// `resume`, handing the job `input` (JSON) for the task that waits for it.
pub async fn resume_with(db: &Db, id: &str, input: Option<&serde_json::Value>) -> Result<Outcome> {
    requeue(
        db,
        id,
        "('failed', 'cancelled', 'waiting-for-input')",
        false,
        input,
    )
    .await
}

/// Queues an ended job again from its first task: every task back to pending.
pub async fn restart(db: &Db, id: &str) -> Result<Outcome> {
    requeue(db, id, "('failed', 'cancelled', 'succeeded')", true, None).await
}

async fn requeue(
    db: &Db,
    id: &str,
    from: &str,
    all_tasks: bool,
    input: Option<&serde_json::Value>,
) -> Result<Outcome> {
    let op = if all_tasks {
        "restarting a job"
    } else {
        "resuming a job"
    };
    let mut tx = db.begin_write(op).await?;
    let sql = format!(
        "UPDATE jobs SET state = 'queued', error = NULL, ended_at = NULL, lease_owner = NULL, \
         lease_until_ms = NULL, cancel_requested = 0, prompt = NULL, input = $2, \
         active_key = COALESCE(job_key, kind || '/' || subject) \
         WHERE id = $1 AND state IN {from}"
    );
    let done = match sqlx::query(&sql)
        .bind(id.to_string())
        .bind(input.map(|v| v.to_string()))
        .execute(&mut *tx)
        .await
    {
        Ok(done) => done,
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            drop(tx);
            return Ok(match get(db, id).await? {
                Some(job) => Outcome::Busy(job),
                None => Outcome::NotFound,
            });
        }
        Err(e) => return Err(q(op)(e)),
    };
    if done.rows_affected() == 1 {
        let which = if all_tasks {
            ""
        } else {
            " AND state <> 'succeeded'"
        };
        let sql = format!(
            "UPDATE job_tasks SET state = 'pending', error = NULL, started_at = NULL, \
             ended_at = NULL, progress = 0 WHERE job_id = $1{which}"
        );
        sqlx::query(&sql)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(q(op))?;
    }
    tx.commit().await.map_err(q(op))?;
    outcome(db, id, done.rows_affected() == 1).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("step {i}")).collect()
    }

    /// The lease and every transition, on one backend.
    async fn leases_and_actions(url: &str) {
        let db = Db::open(url).await.unwrap();
        let id = enqueue(&db, "test", "m1", &json!({"n": 1}), &names(2))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            enqueue(&db, "test", "m1", &json!({}), &names(1))
                .await
                .unwrap(),
            None,
            "one active job per kind and subject"
        );
        let job = get(&db, &id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.tasks.len(), 2);
        assert_eq!(job.actions, [Action::Cancel]);
        assert_eq!(job.params, json!({"n": 1}));

        // A takes it; B cannot while A's lease holds, even though A never renews.
        let t0 = now_ms();
        assert_eq!(claimable(&db, t0, 10).await.unwrap(), [id.as_str()]);
        assert!(claim(&db, &id, "A", t0, 10_000).await.unwrap());
        assert!(!claim(&db, &id, "B", t0, 10_000).await.unwrap());
        assert!(!claim(&db, &id, "B", t0 + 9_999, 10_000).await.unwrap());
        assert!(claimable(&db, t0 + 9_999, 10).await.unwrap().is_empty());
        assert!(task_started(&db, &id, "A", 0).await.unwrap());
        assert!(
            !task_started(&db, &id, "B", 0).await.unwrap(),
            "B holds no lease"
        );
        assert!(task_ended(&db, &id, "A", 0, None).await.unwrap());
        assert!(task_started(&db, &id, "A", 1).await.unwrap());
        // A renews: still not B's at the old deadline.
        assert!(renew(&db, &id, "A", t0 + 5_000, 10_000).await.unwrap());
        assert!(!claim(&db, &id, "B", t0 + 10_001, 10_000).await.unwrap());
        // A dies (kill -9): once its lease runs out, B takes the job over.
        assert_eq!(
            claimable(&db, t0 + 15_001, 10).await.unwrap(),
            [id.as_str()]
        );
        assert!(claim(&db, &id, "B", t0 + 15_001, 10_000).await.unwrap());
        assert!(!renew(&db, &id, "A", t0 + 15_002, 10_000).await.unwrap());
        assert!(!task_ended(&db, &id, "A", 1, None).await.unwrap());
        assert!(!finish(&db, &id, "A", JobState::Succeeded, None)
            .await
            .unwrap());
        let job = get(&db, &id).await.unwrap().unwrap();
        assert_eq!(job.lease_owner.as_deref(), Some("B"));
        assert_eq!(job.tasks[0].state, TaskState::Succeeded);
        assert_eq!(job.tasks[0].progress, 1.0);
        assert_eq!(job.tasks[1].state, TaskState::Running);
        // B fails the second task; resume re-runs only that one.
        assert!(task_ended(&db, &id, "B", 1, Some("disk d1: gone"))
            .await
            .unwrap());
        assert!(
            finish(&db, &id, "B", JobState::Failed, Some("task step 1: gone"))
                .await
                .unwrap()
        );
        let job = get(&db, &id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert_eq!(job.actions, [Action::Resume, Action::Restart]);
        assert_eq!(job.tasks[1].error.as_deref(), Some("disk d1: gone"));
        assert!(matches!(
            cancel(&db, &id).await.unwrap(),
            Outcome::NotAllowed(_)
        ));
        let Outcome::Done(job) = resume(&db, &id).await.unwrap() else {
            panic!("a failed job resumes")
        };
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.error, None);
        assert_eq!(job.tasks[0].state, TaskState::Succeeded);
        assert_eq!(job.tasks[1].state, TaskState::Pending);

        // Cancel while running is a request its runner honours between tasks.
        let t1 = now_ms();
        assert!(claim(&db, &id, "C", t1, 10_000).await.unwrap());
        assert!(task_started(&db, &id, "C", 1).await.unwrap());
        let Outcome::Done(job) = cancel(&db, &id).await.unwrap() else {
            panic!("a running job takes a cancel")
        };
        assert!(job.cancel_requested);
        assert_eq!(job.state, JobState::Running);
        assert!(job.actions.is_empty());
        assert!(matches!(
            cancel(&db, &id).await.unwrap(),
            Outcome::NotAllowed(_)
        ));
        assert!(finish(&db, &id, "C", JobState::Cancelled, None)
            .await
            .unwrap());
        let job = get(&db, &id).await.unwrap().unwrap();
        assert_eq!(job.tasks[1].state, TaskState::Pending, "not left running");
        assert_eq!(job.tasks[1].started_at, None);
        let Outcome::Done(job) = restart(&db, &id).await.unwrap() else {
            panic!("a cancelled job restarts")
        };
        assert!(!job.cancel_requested);
        assert!(job.tasks.iter().all(|t| t.state == TaskState::Pending));
        // Queued: cancel stops it at once.
        let Outcome::Done(job) = cancel(&db, &id).await.unwrap() else {
            panic!("a queued job cancels")
        };
        assert_eq!(job.state, JobState::Cancelled);
        assert!(job.ended_at.is_some());
        assert_eq!(cancel(&db, "j-none").await.unwrap(), Outcome::NotFound);
        assert_eq!(resume(&db, "j-none").await.unwrap(), Outcome::NotFound);

        // Listing pages and filters.
        let other = enqueue(&db, "test", "m2", &json!({}), &names(3))
            .await
            .unwrap()
            .unwrap();
        // A job whose subject has another active job is not queued again beside it.
        let t2 = now_ms();
        assert!(claim(&db, &other, "D", t2, 10_000).await.unwrap());
        assert!(finish(&db, &other, "D", JobState::Failed, Some("x"))
            .await
            .unwrap());
        let third = enqueue(&db, "test", "m2", &json!({}), &names(1))
            .await
            .unwrap()
            .expect("the subject's only other job has ended");
        assert!(matches!(
            resume(&db, &other).await.unwrap(),
            Outcome::Busy(_)
        ));
        assert!(matches!(
            cancel(&db, &third).await.unwrap(),
            Outcome::Done(_)
        ));
        let Outcome::Done(_) = resume(&db, &other).await.unwrap() else {
            panic!("resumes once the other one ended")
        };
        let all = list(&db, None, None, 10).await.unwrap();
        assert_eq!(
            all.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            [id.as_str(), other.as_str(), third.as_str()]
        );
        assert_eq!(all[1].tasks.len(), 3);
        let queued = list(&db, Some(JobState::Queued), None, 10).await.unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].id, other);
        assert_eq!(queued[0].tasks.len(), 3);
        let page2 = list(&db, None, Some(&id), 1).await.unwrap();
        assert_eq!(page2.len(), 1);
        assert_eq!(page2[0].id, other);

        // Pruning takes the ended jobs (`id` and `third` are cancelled) with their
        // tasks, and leaves the queued one.
        assert_eq!(prune_ended(&db, now_s() - 60).await.unwrap(), 0, "too new");
        assert_eq!(prune_ended(&db, now_s() + 1).await.unwrap(), 2);
        let left = list(&db, None, None, 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, other);
        assert_eq!(left[0].tasks.len(), 3);
        assert_eq!(get(&db, &id).await.unwrap(), None);
        let orphans: i64 = sqlx::query("SELECT COUNT(*) AS n FROM job_tasks WHERE job_id = $1")
            .bind(id.clone())
            .fetch_one(db.pool())
            .await
            .unwrap()
            .try_get("n")
            .unwrap();
        assert_eq!(orphans, 0);
        waits_and_keys(&db).await;
    }

    /// A task that waits for input, the resume that hands it, and one active job per
    /// key across kinds.
    async fn waits_and_keys(db: &Db) {
        let key = Some("recovery/m9");
        let id = enqueue_keyed(db, "test-failover", "m9", key, &json!({}), &names(2))
            .await
            .unwrap()
            .unwrap();
        // Another kind on the same key is refused while the first is active.
        assert_eq!(
            enqueue_keyed(db, "failover", "m9", key, &json!({}), &names(1))
                .await
                .unwrap(),
            None
        );
        assert!(claim(db, &id, "cp-a", now_ms(), 30_000).await.unwrap());
        assert!(task_started(db, &id, "cp-a", 0).await.unwrap());
        assert!(task_ended(db, &id, "cp-a", 0, None).await.unwrap());
        assert!(task_started(db, &id, "cp-a", 1).await.unwrap());
        // Only the lease holder stops it.
        assert!(!wait_for_input(db, &id, "cp-b", 1, "verdict?")
            .await
            .unwrap());
        assert!(wait_for_input(db, &id, "cp-a", 1, "verdict?")
            .await
            .unwrap());
        let job = get(db, &id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::WaitingForInput);
        assert_eq!(job.prompt.as_deref(), Some("verdict?"));
        assert_eq!(job.lease_owner, None);
        assert_eq!(job.tasks[1].state, TaskState::Pending);
        assert_eq!(job.tasks[0].state, TaskState::Succeeded);
        let input = json!({"verdict": "passed"});
        let Outcome::Done(job) = resume_with(db, &id, Some(&input)).await.unwrap() else {
            panic!("resume refused");
        };
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.input, Some(input));
        assert_eq!(job.prompt, None);
        // Still the only active job of its key after the resume.
        assert_eq!(
            enqueue_keyed(db, "commit", "m9", key, &json!({}), &names(1))
                .await
                .unwrap(),
            None
        );
        assert!(claim(db, &id, "cp-b", now_ms(), 30_000).await.unwrap());
        assert!(task_started(db, &id, "cp-b", 1).await.unwrap());
        assert!(task_ended(db, &id, "cp-b", 1, None).await.unwrap());
        // The input answered its task.
        assert_eq!(get(db, &id).await.unwrap().unwrap().input, None);
        assert!(finish(db, &id, "cp-b", JobState::Succeeded, None)
            .await
            .unwrap());
        assert!(
            enqueue_keyed(db, "commit", "m9", key, &json!({}), &names(1))
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn leases_and_actions_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        leases_and_actions(&Db::default_url(dir.path())).await;
    }

    /// PostgreSQL when FERRY_TEST_DATABASE names one (a throwaway database: the test
    /// drops the control plane's tables first), as in `db::tests`.
    #[tokio::test]
    async fn leases_and_actions_on_the_test_database() {
        let Ok(url) = std::env::var("FERRY_TEST_DATABASE") else {
            if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
                panic!("FERRY_TEST_DATABASE is not set but FERRY_TEST_REQUIRE_REMOTE=1");
            }
            eprintln!("FERRY_TEST_DATABASE not set: PostgreSQL not tested");
            return;
        };
        let _only = crate::db::tests::drop_all(&url).await;
        leases_and_actions(&url).await;
    }
}
