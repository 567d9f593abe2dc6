//! Durable jobs: every long operation of the control plane is a row in `jobs` with
//! its ordered tasks in `job_tasks`, so that it survives a kill -9 and resumes at its
//! first unfinished task. See docs/control-plane.md, "Jobs".
//!
//! - `queue`: the tables: queueing, the lease a runner takes with a conditional
//!   UPDATE (so that several control planes on one database never run a job twice),
//!   renewing it, recording tasks, and the operators' cancel, resume and restart.
//! - `runner`: the tokio task inside `ferry control-plane` that claims jobs and runs
//!   them, a bounded number at once.
//! - `retention`: the first kind: compaction of a machine's points by age, queued
//!   hourly for every machine in the store.
//!
//! Each task must be idempotent: a runner killed after a task's work but before its
//! `succeeded` was written runs it again.

pub mod queue;
pub mod retention;
pub mod runner;
pub mod singleton;

/// How a task ended without error.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Done: the next task runs.
    Done,
    /// Not done until an operator resumes the job with input: the job waits
    /// (`waiting-for-input`) showing this prompt, and the task runs again at resume
    /// with the input in `Job::input`.
    Wait(String),
}

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Checks the input an operator resumes `job` with, by the job's kind: a clear error
/// (a 400) rather than a job that fails later on what it was given. Kinds that take
/// no input accept any object and ignore it.
pub fn check_input(job: &Job, input: &serde_json::Value) -> Result<(), String> {
    if !input.is_object() {
        return Err(format!("job {}: its input must be a JSON object", job.id));
    }
    if crate::recovery::jobs::KINDS.contains(&job.kind.as_str()) {
        return crate::recovery::jobs::check_input(job, input);
    }
    if crate::plans::job::KINDS.contains(&job.kind.as_str()) {
        return crate::plans::job::check_input(job, input);
    }
    Ok(())
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Waiting for a runner.
    Queued,
    /// A runner holds its lease and works through its tasks.
    Running,
    /// Stopped until an operator resumes it, with the input `prompt` asks for (a test
    /// failover waiting for its cleanup, a recovery plan's manual action).
    WaitingForInput,
    Succeeded,
    /// A task failed; `error` says which and why. Resume retries from that task.
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::WaitingForInput,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::WaitingForInput => "waiting-for-input",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Succeeded, failed or cancelled: nothing runs until an operator acts.
    pub fn is_ended(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        [
            TaskState::Pending,
            TaskState::Running,
            TaskState::Succeeded,
            TaskState::Failed,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// What an operator may do to a job now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Stop it: at once when queued or waiting, between two tasks when running.
    Cancel,
    /// Run it again from its first unfinished task.
    Resume,
    /// Run it again from its first task.
    Restart,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Cancel => "cancel",
            Action::Resume => "resume",
            Action::Restart => "restart",
        }
    }

    /// The actions a job in `state` allows; a running job already asked to stop
    /// allows none until it has.
    pub fn allowed(state: JobState, cancel_requested: bool) -> Vec<Action> {
        match state {
            JobState::Queued => vec![Action::Cancel],
            JobState::Running if cancel_requested => vec![],
            JobState::Running => vec![Action::Cancel],
            JobState::WaitingForInput => vec![Action::Cancel, Action::Resume],
            JobState::Failed | JobState::Cancelled => vec![Action::Resume, Action::Restart],
            JobState::Succeeded => vec![Action::Restart],
        }
    }
}

/// One step of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub name: String,
    pub state: TaskState,
    pub error: Option<String>,
    /// Unix seconds.
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// 0.0 to 1.0.
    pub progress: f64,
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// Sorts by creation time.
    pub id: String,
    /// `retention` for now.
    pub kind: String,
    /// What it works on: a machine's name for retention.
    pub subject: String,
    pub state: JobState,
    /// The kind's parameters, fixed when it was queued.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    pub error: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// The control plane running it (its owner id), while running.
    pub lease_owner: Option<String>,
    /// Unix milliseconds until which that lease holds unless renewed.
    pub lease_until_ms: Option<i64>,
    /// A cancel was asked while it ran; it stops before its next task.
    pub cancel_requested: bool,
    /// While waiting for input: what it waits for, as people read it.
    pub prompt: Option<String>,
    /// The input it was last resumed with (JSON), until the task that asked for it
    /// ends.
    #[schema(value_type = Option<Object>)]
    pub input: Option<serde_json::Value>,
    pub tasks: Vec<Task>,
    /// What an operator may do now.
    pub actions: Vec<Action>,
}
