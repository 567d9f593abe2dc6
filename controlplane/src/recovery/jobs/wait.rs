//! Waiting inside a task: for a recovery host's work item, for the source's final
//! point, for the store. A wait stops (the task fails, naming what it waited for)
//! when an operator asks the job to cancel, when the job's lease is lost (another
//! control plane took it over: its writes would change nothing anyway), or when the
//! recovery host doing the work is not seen for `HOST_LOST_S`.

use std::time::{Duration, Instant};

use ferry_link::control::wire::WorkOp;

use crate::jobs::queue;
use crate::jobs::runner::Context;
use crate::jobs::{Job, TaskState};
use crate::recovery::work::{self, WorkRow};

use super::state;

/// How often a waiting task looks again.
pub const POLL: Duration = Duration::from_millis(250);
/// How often it re-reads its job for a cancel.
const CANCEL_CHECK: Duration = Duration::from_secs(1);
/// A task waiting for a recovery host fails once the host is not seen this long.
pub const HOST_LOST_S: i64 = 60;

/// The job and task a wait belongs to.
pub struct Waiter<'a> {
    pub ctx: &'a Context,
    pub job: &'a Job,
    pub seq: usize,
    owner: String,
    last_cancel_check: Instant,
}

impl<'a> Waiter<'a> {
    pub fn new(ctx: &'a Context, job: &'a Job, seq: usize) -> Waiter<'a> {
        Waiter {
            ctx,
            job,
            seq,
            owner: job.lease_owner.clone().unwrap_or_default(),
            last_cancel_check: Instant::now(),
        }
    }

    /// Records `progress` and sleeps one poll; an error when the wait must stop.
    pub async fn tick(&mut self, progress: f64, waiting_for: &str) -> Result<(), String> {
        let db = &self.ctx.db;
        let held = queue::task_progress(db, &self.job.id, &self.owner, self.seq, progress)
            .await
            .map_err(|e| format!("recording progress while waiting for {waiting_for}: {e}"))?;
        if !held {
            return Err(format!(
                "job {} is no longer held by {} (waiting for {waiting_for})",
                self.job.id, self.owner
            ));
        }
        if self.last_cancel_check.elapsed() >= CANCEL_CHECK {
            self.last_cancel_check = Instant::now();
            let now = queue::get(db, &self.job.id)
                .await
                .map_err(|e| format!("reading job {}: {e}", self.job.id))?;
            if now.is_some_and(|j| j.cancel_requested) {
                return Err(format!("cancel asked while waiting for {waiting_for}"));
            }
        }
        tokio::time::sleep(POLL).await;
        Ok(())
    }

    /// A re-run after a takeover (the task was running under the dead owner): it
    /// must find what the first run did rather than try again.
    fn rerun_after_takeover(&self) -> bool {
        self.job.tasks[self.seq].state == TaskState::Running
    }

    /// The item this task gives `host` for `machine`: the one it gave before (a re-run
    /// after a kill -9 finds it), or a new attempt when the last one failed, or was
    /// removed (a cleanup, a cancel), and the task runs again because an operator
    /// resumed or restarted the job. Then waits until it ended:
    /// succeeded, or an error naming the host and what it said. `failover`: the
    /// machine's failover states in which the item is one of its live items (added at
    /// once, so that a cancel removes it even if it never finishes).
    pub async fn submit_and_wait(
        &mut self,
        host: &str,
        machine: &str,
        op: &WorkOp,
        failover: Option<&[&str]>,
    ) -> Result<WorkRow, String> {
        let row = self.submit(host, machine, op, failover).await?;
        self.until_ended(row).await
    }

    /// `submit_and_wait` without the wait: for items that keep running (failback's
    /// reverse and apply), whose task waits for what they report instead.
    pub async fn submit(
        &mut self,
        host: &str,
        machine: &str,
        op: &WorkOp,
        failover: Option<&[&str]>,
    ) -> Result<WorkRow, String> {
        let id = self.attempt_id(machine).await?;
        self.submit_as(&id, host, machine, op, failover).await
    }

    /// Gives part `part` of round `round` of this task's chain of items (see
    /// `chain_round`) to `host`, or finds it given, and waits until it ended.
    pub async fn submit_part_and_wait(
        &mut self,
        host: &str,
        machine: &str,
        part: &str,
        round: u32,
        op: &WorkOp,
    ) -> Result<WorkRow, String> {
        let base = work::item_id(&self.job.id, self.seq, machine);
        let id = match round {
            0 => format!("{base}-{part}"),
            n => format!("{base}-{part}-r{n}"),
        };
        let row = self.submit_as(&id, host, machine, op, None).await?;
        self.until_ended(row).await
    }

    /// The round of this task's chain of items for `machine` (`parts`, each given
    /// after the one before ended, each taking what the one before made): the round
    /// its items were last given in, or, when one of those failed or was removed
    /// and the task runs again (a resume, not a takeover), the next, which gives
    /// every part anew; 0 at first.
    pub async fn chain_round(&self, machine: &str, parts: &[&str]) -> Result<u32, String> {
        let base = format!("{}-", work::item_id(&self.job.id, self.seq, machine));
        let rows = work::for_job(&self.ctx.db, &self.job.id)
            .await
            .map_err(|e| format!("reading the work items of job {}: {e}", self.job.id))?;
        let round = |r: &WorkRow| -> Option<u32> {
            let rest = r.id.strip_prefix(&base).filter(|_| r.machine == machine)?;
            parts
                .iter()
                .find_map(|part| match rest.strip_prefix(part)? {
                    "" => Some(0),
                    n => n.strip_prefix("-r")?.parse().ok(),
                })
        };
        let rounds: Vec<(u32, &WorkRow)> =
            rows.iter().filter_map(|r| Some((round(r)?, r))).collect();
        let Some(last) = rounds.iter().map(|(n, _)| *n).max() else {
            return Ok(0);
        };
        let ended_badly = rounds
            .iter()
            .any(|(n, r)| *n == last && matches!(r.state.as_str(), "failed" | "removed"));
        Ok(if ended_badly && !self.rerun_after_takeover() {
            last + 1
        } else {
            last
        })
    }

    async fn submit_as(
        &mut self,
        id: &str,
        host: &str,
        machine: &str,
        op: &WorkOp,
        failover: Option<&[&str]>,
    ) -> Result<WorkRow, String> {
        let db = &self.ctx.db;
        let id = id.to_string();
        let row = work::submit(db, &id, host, &self.job.id, machine, op, crate::db::now_s())
            .await
            .map_err(|e| format!("giving work item {id} to recovery host {host}: {e}"))?;
        if let Some(states) = failover {
            let added = state::add_item(db, machine, &self.job.id, &id, states)
                .await
                .map_err(|e| format!("recording work item {id}: {e}"))?;
            if !added {
                return Err(format!(
                    "machine {machine} is no longer {}: work item {id} not recorded",
                    states.join(" or ")
                ));
            }
        }
        Ok(row)
    }

    async fn attempt_id(&self, machine: &str) -> Result<String, String> {
        let base = work::item_id(&self.job.id, self.seq, machine);
        let rows = work::for_job(&self.ctx.db, &self.job.id)
            .await
            .map_err(|e| format!("reading the work items of job {}: {e}", self.job.id))?;
        let attempt = |id: &str| -> Option<u32> {
            if id == base {
                return Some(0);
            }
            id.strip_prefix(&base)?.strip_prefix("-r")?.parse().ok()
        };
        let latest = rows
            .iter()
            .filter_map(|r| attempt(&r.id).map(|n| (n, r)))
            .max_by_key(|(n, _)| *n);
        Ok(match latest {
            None => base,
            Some((n, r))
                if matches!(r.state.as_str(), "failed" | "removed")
                    && !self.rerun_after_takeover() =>
            {
                format!("{base}-r{}", n + 1)
            }
            Some((_, r)) => r.id.clone(),
        })
    }

    async fn until_ended(&mut self, mut row: WorkRow) -> Result<WorkRow, String> {
        let what = format!(
            "work item {} ({}) on recovery host {}",
            row.id,
            row.op.kind(),
            row.host
        );
        loop {
            match row.state.as_str() {
                "succeeded" => return Ok(row),
                // Only a remove item of ours is marked removed, once it succeeded.
                "removed" if row.op.kind() == "remove" => return Ok(row),
                "removed" => return Err(format!("{what} was removed before it ended")),
                "failed" => {
                    return Err(format!(
                        "{what} failed: {}",
                        row.error.as_deref().unwrap_or("the host gave no reason")
                    ))
                }
                _ => {}
            }
            self.host_alive(&row.host, &what).await?;
            self.tick(row.progress, &what).await?;
            row = work::get(&self.ctx.db, &row.id)
                .await
                .map_err(|e| format!("reading {what}: {e}"))?
                .ok_or_else(|| format!("{what} vanished"))?;
        }
    }

    /// `host_alive`, and the host reaches the store (a master target reads it, a
    /// last round writes it).
    pub async fn host_working(&self, host: &str, what: &str) -> Result<(), String> {
        match self.alive_row(host, what).await?.store_refusal() {
            Some(e) => Err(format!("{e} (needed for {what})")),
            None => Ok(()),
        }
    }

    pub async fn host_alive(&self, host: &str, what: &str) -> Result<(), String> {
        self.alive_row(host, what).await.map(|_| ())
    }

    /// The host's row, if it was seen within `HOST_LOST_S`.
    async fn alive_row(&self, host: &str, what: &str) -> Result<work::HostRow, String> {
        let hosts = work::hosts(&self.ctx.db)
            .await
            .map_err(|e| format!("reading recovery hosts while waiting for {what}: {e}"))?;
        let h = hosts
            .into_iter()
            .find(|h| h.name == host)
            .ok_or_else(|| format!("recovery host {host} was removed while doing {what}"))?;
        let silent = crate::db::now_s() - h.last_seen;
        if silent > HOST_LOST_S {
            return Err(format!(
                "recovery host {host} not seen for {silent} s (over {HOST_LOST_S} s) while doing {what}"
            ));
        }
        Ok(h)
    }
}
