//! A plan job's children: the machine jobs (docs/recovery.md, "Jobs on machines") it queues, one per
//! machine, and the states it waits for. Everything a plan knows of machine jobs is in
//! this file, so that joining it with the machine jobs' own module is one change.

use crate::db::Db;
#[cfg(test)]
use crate::jobs::queue;

/// The machine job kinds a plan queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildKind {
    TestFailover,
    Failover { planned: bool },
    Commit,
    CancelFailover,
    Reprotect,
    Failback { planned: bool },
}

impl ChildKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChildKind::TestFailover => "test-failover",
            ChildKind::Failover { .. } => "failover",
            ChildKind::Commit => "commit",
            ChildKind::CancelFailover => "cancel-failover",
            ChildKind::Reprotect => "reprotect",
            ChildKind::Failback { .. } => "failback",
        }
    }

    /// The tasks the machine job of this kind has (DESIGN.md, "Jobs"): for the
    /// stand-in the plan's unit tests run.
    #[cfg(test)]
    fn tasks(self) -> &'static [&'static str] {
        match self {
            ChildKind::TestFailover => &[
                "bring up disks",
                "start machine",
                "wait for cleanup",
                "clean up",
                "record verdict",
            ],
            ChildKind::Failover { planned: true } => &[
                "stop source writes",
                "wait for final point upload",
                "bring up disks",
                "mark failed over",
                "start machine",
            ],
            ChildKind::Failover { planned: false } => {
                &["fence source", "bring up disks", "start machine"]
            }
            ChildKind::Commit => &["mark committed"],
            ChildKind::CancelFailover => &["remove recovery disks", "resume source"],
            ChildKind::Reprotect => &[
                "check reprotect",
                "sync home disks",
                "start reverse replication",
                "apply at home",
                "mark reverse",
            ],
            ChildKind::Failback { planned: true } => &[
                "check failback",
                "stop reverse replication",
                "take final point",
                "stop applying",
                "apply final point",
                "mark active at home",
                "wait for commit",
                "remove recovery-site copies",
                "remove master target's apply",
                "delete reverse replica",
                "mark failed back",
            ],
            ChildKind::Failback { planned: false } => &[
                "check failback",
                "stop applying",
                "apply final point",
                "mark active at home",
                "wait for commit",
                "remove recovery-site copies",
                "remove master target's apply",
                "delete reverse replica",
                "mark failed back",
            ],
        }
    }

    /// A test failover is up once it waits for its cleanup; the others once they
    /// succeeded.
    pub fn up_when_waiting(self) -> bool {
        matches!(self, ChildKind::TestFailover)
    }
}

/// The key that keeps one recovery job per machine.
pub fn machine_key(machine: &str) -> String {
    format!("recovery/{machine}")
}

/// Queues the machine job `kind` of `machine` with `params` (the body its POST takes,
/// `point` already resolved by the plan), validated as the machine POSTs validate it
/// (`recovery::jobs::enqueue::enqueue_machine_job`); its id, or None when the machine
/// has another recovery job active.
pub async fn enqueue_child(
    db: &Db,
    store: Option<&std::sync::Arc<crate::jobs::runner::StoreAccess>>,
    kind: ChildKind,
    machine: &str,
    params: &serde_json::Value,
) -> Result<Option<String>, String> {
    use crate::recovery::jobs::{enqueue::enqueue_machine_job, state};
    // The plan's own unit tests (plans/tests/) run without a store, against a
    // stand-in for the machine jobs: they queue its children unchecked. The real
    // machine jobs are run by the end-to-end test (cli/tests/recovery_e2e.rs).
    #[cfg(test)]
    if store.is_none() {
        let tasks: Vec<String> = kind.tasks().iter().map(|t| t.to_string()).collect();
        let key = machine_key(machine);
        return queue::enqueue_keyed(db, kind.as_str(), machine, Some(&key), params, &tasks)
            .await
            .map_err(|e| e.to_string());
    }
    match enqueue_machine_job(db, store, kind.as_str(), machine, params).await {
        Ok(job) => Ok(Some(job.id)),
        Err(e) => {
            let busy = state::active_job(db, machine)
                .await
                .map_err(|e| e.to_string())?
                .is_some();
            if busy {
                Ok(None)
            } else {
                Err(format!(
                    "queueing the {} job of machine {machine}: {e}",
                    kind.as_str()
                ))
            }
        }
    }
}
