//! Recovery plans (docs/recovery-plans.md): ordered groups of machines with actions
//! before and after each group, and the plan jobs that run a test failover, its
//! cleanup, a planned or unplanned failover, a commit or a cancel for all of them.
//!
//! In the order a plan meets them:
//! - `spec`: the plan as written, and its rules (limits, names, one group per machine).
//! - `store`: the `recovery_plans` table.
//! - `job`: the plan job kinds, their tasks and params, queueing one, its input.
//! - `actions`: script actions, on the control plane or a recovery host, with the
//!   plan's environment; `script`: the control plane's script runner.
//! - `machines`: the tasks that drive each machine's own recovery job and wait for it.
//! - `children`: the one place that queues a machine job for a plan.

pub mod actions;
pub mod children;
pub mod job;
pub mod machines;
pub mod script;
pub mod spec;
pub mod store;

#[cfg(test)]
mod api_tests;
#[cfg(test)]
mod tests;
