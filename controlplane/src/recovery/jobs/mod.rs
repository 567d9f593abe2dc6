//! The recovery jobs of one machine (docs/recovery.md, "Jobs on machines"): test failover and its
//! cleanup, planned and unplanned failover, change-point, commit and cancel. Each is
//! (and failback's reprotect, failback, its commit and re-enable: docs/failback.md) is
//! a job of the control plane's framework (`crate::jobs`) whose tasks give work
//! items to a recovery host (`recovery::work`) and move the machine's failover
//! (`state`, the `machine_recovery` row the split-brain orders are read from).
//!
//! - `enqueue`: the validation every POST (and a recovery plan) goes through before
//!   a job exists, and the job's parameters and tasks.
//! - `tasks`: what each task does, idempotently: work item ids are deterministic per
//!   task, and every write to the failover row is conditional.
//! - `wait`: waiting for a work item, the source agent, or the store, inside a task.
//! - `template`: the machine's start action.

pub mod enqueue;
pub mod failback;
pub mod failed_back;
pub mod reprotect;
pub mod reverse;
pub mod state;
pub mod tasks;
pub mod template;
pub mod wait;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use ferry_link::control::wire::{AppliedDisk, DiskPoint, DiskReport, SyncedDisk, WorkOp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use enqueue::enqueue_machine_job;

pub const TEST_FAILOVER: &str = "test-failover";
pub const FAILOVER: &str = "failover";
pub const CHANGE_POINT: &str = "change-point";
pub const COMMIT: &str = "commit";
pub const CANCEL_FAILOVER: &str = "cancel-failover";
pub const REPROTECT: &str = "reprotect";
pub const FAILBACK: &str = "failback";
pub const RE_ENABLE: &str = "re-enable";

/// Every kind this module runs.
pub const KINDS: [&str; 8] = [
    TEST_FAILOVER,
    FAILOVER,
    CHANGE_POINT,
    COMMIT,
    CANCEL_FAILOVER,
    REPROTECT,
    FAILBACK,
    RE_ENABLE,
];

/// Task names; a task is dispatched by its job's kind and its name.
pub const BRING_UP: &str = "bring up disks";
pub const START: &str = "start machine";
pub const WAIT_CLEANUP: &str = "wait for cleanup";
pub const CLEAN_UP: &str = "clean up";
pub const RECORD_VERDICT: &str = "record verdict";
pub const STOP_WRITES: &str = "stop source writes";
pub const FINAL_UPLOAD: &str = "wait for final point upload";
pub const MARK_FAILED_OVER: &str = "mark failed over";
pub const FENCE: &str = "fence source";
pub const REMOVE_PREVIOUS: &str = "remove previous disks";
pub const MARK_COMMITTED: &str = "mark committed";
pub const REMOVE_RECOVERY: &str = "remove recovery disks";
pub const RESUME_SOURCE: &str = "resume source";
pub const CHECK_REPROTECT: &str = "check reprotect";
pub const SYNC_HOME: &str = "sync home disks";
pub const MARK_REVERSE: &str = "mark reverse";
pub const START_REVERSE: &str = "start reverse replication";
pub const START_APPLY: &str = "apply at home";
pub const CHECK_FAILBACK: &str = "check failback";
pub const STOP_REVERSE: &str = "stop reverse replication";
pub const FINAL_ROUND: &str = "take final point";
pub const STOP_APPLY: &str = "stop applying";
pub const APPLY_FINAL: &str = "apply final point";
pub const MARK_HOME: &str = "mark active at home";
pub const WAIT_COMMIT: &str = "wait for commit";
pub const REMOVE_SITE: &str = "remove recovery-site copies";
pub const REMOVE_APPLY: &str = "remove master target's apply";
pub const DELETE_REVERSE: &str = "delete reverse replica";
pub const MARK_FAILED_BACK: &str = "mark failed back";
pub const RESUME_HOME: &str = "resume home agent";
pub const WAIT_RESYNC: &str = "wait for home resync";

/// The key that keeps one recovery job per machine active, whatever its kind.
pub fn job_key(machine: &str) -> String {
    format!("recovery/{machine}")
}

/// Where the recovered disks go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Target {
    /// Image files built on the recovery host (`WORK_DIR/items/ID/DISK.raw|vhd`).
    Dir {
        /// `raw` (default) or `vhd`.
        #[serde(default = "raw")]
        format: String,
    },
    /// Served over NBD at once from the replica (instant recovery).
    Nbd,
}

fn raw() -> String {
    "raw".into()
}

impl Target {
    pub fn check(&self) -> Result<(), String> {
        match self {
            Target::Dir { format } if !matches!(format.as_str(), "raw" | "vhd") => {
                Err(format!("target format {format:?} must be raw or vhd"))
            }
            _ => Ok(()),
        }
    }

    /// The work op that brings `disks` up on this target.
    pub fn op(&self, disks: Vec<DiskPoint>) -> WorkOp {
        match self {
            Target::Dir { format } => WorkOp::Build {
                disks,
                format: format.clone(),
            },
            Target::Nbd => WorkOp::Serve { disks },
        }
    }

    /// The target an item brought disks up on, for a build or serve item.
    pub fn of_op(op: &WorkOp) -> Option<Target> {
        match op {
            WorkOp::Build { format, .. } => Some(Target::Dir {
                format: format.clone(),
            }),
            WorkOp::Serve { .. } => Some(Target::Nbd),
            _ => None,
        }
    }
}

/// A machine job's parameters, fixed when it is queued (but for a test failover's
/// verdict, recorded when its cleanup is asked for).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub machine: String,
    /// The point as asked (`latest`, an id, a time...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    /// The point of each disk it was resolved to when the job was queued (empty for
    /// a planned failover: its final point is the source's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub points: Vec<DiskPoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// The recovery host doing the work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned: Option<bool>,
    /// Said when the disks share no matching point (each is at its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Test failover: `passed` or `failed`, once its cleanup was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// When the verdict was taken (Unix seconds): its event is one written since, so
    /// that a restarted test given the same verdict again records it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict_at: Option<i64>,
    /// Reprotect: the recovery host at the home site that writes the home disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_target: Option<String>,
    /// Reprotect: `{disk: path on the master target}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub home_disks: BTreeMap<String, String>,
    /// Reprotect: what the sync of each home disk took, once done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub synced: Vec<SyncedDisk>,
    /// Failback: the reverse points applied home (planned: the final round's; unplanned:
    /// the newest in the store or applied), once chosen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub final_points: Vec<DiskPoint>,
    /// Failback: what the master target's last apply reported of each disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<AppliedDisk>,
    /// Commit of a failback: everything deleted (hosts' things, store objects).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
    /// Commit of a failback: what could not be deleted (a recovery site that is lost).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<String>,
    /// Re-enable: when forward protection resumed (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Re-enable: the home agent's disks as it reported them once resynced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resynced: Vec<DiskReport>,
    /// Re-enable: the bytes the resync sent, every disk together (what re-enable
    /// cost on the wire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_sent_bytes: Option<u64>,
}

impl Params {
    /// The master target a reprotect or failback job names.
    pub fn master(&self) -> Result<&str, String> {
        self.master_target
            .as_deref()
            .ok_or_else(|| format!("machine {}: the job names no master target", self.machine))
    }
}

/// The input a test failover waits for: `POST /v1/jobs/{id}/resume` or
/// `POST /v1/machines/{name}/test-failover-cleanup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    /// `passed` or `failed`: what the test showed.
    pub verdict: String,
    #[serde(default)]
    pub notes: String,
}

/// The longest notes taken with a verdict.
pub const MAX_NOTES_BYTES: usize = 4096;

impl Verdict {
    pub fn parse(input: &serde_json::Value) -> Result<Verdict, String> {
        let v: Verdict = serde_json::from_value(input.clone()).map_err(|e| {
            format!(
                "a test failover's cleanup takes {{\"verdict\": \"passed\"|\"failed\", \
                 \"notes\": \"...\"}}: {e}"
            )
        })?;
        if !matches!(v.verdict.as_str(), "passed" | "failed") {
            return Err(format!("verdict {:?} must be passed or failed", v.verdict));
        }
        if v.notes.len() > MAX_NOTES_BYTES {
            return Err(format!(
                "notes of {} bytes are over {MAX_NOTES_BYTES}",
                v.notes.len()
            ));
        }
        Ok(v)
    }
}

/// `crate::jobs::check_input` for the recovery kinds: a test failover waiting for
/// its cleanup is resumed with its verdict (a failed one is resumed to retry, and
/// takes any object); the others take no input.
pub fn check_input(job: &crate::jobs::Job, input: &serde_json::Value) -> Result<(), String> {
    if job.kind == TEST_FAILOVER && job.state == crate::jobs::JobState::WaitingForInput {
        Verdict::parse(input).map_err(|e| format!("job {}: {e}", job.id))?;
    }
    if job.kind == FAILBACK
        && job.state == crate::jobs::JobState::WaitingForInput
        && *input != serde_json::json!({"commit": true})
    {
        return Err(format!(
            "failback job {}: it takes {{\"commit\": true}} (POST /v1/machines/{}/commit)",
            job.id, job.subject
        ));
    }
    Ok(())
}
