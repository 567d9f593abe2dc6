//! Ferry's control plane: the configuration server (`ferry control-plane`) and the
//! decisions about recovery. See docs/control-plane.md.
//!
//! Where things are, the service first, in the order a request meets them:
//! - `server`: the state directory, the database, HTTPS.
//! - `api`: the HTTP API under `/v1`, one module per resource, one error type.
//! - `policy`: replication policies and their rules.
//! - `db`: the state in SQLite or PostgreSQL (sqlx), migrations in `migrations/`.
//! - `enroll`: the site CA, the service certificate, API and enrollment token
//!   secrets, certificates issued to agents and process servers from their CSRs.
//! - `registry`: machines, process servers and events, as heartbeats report them;
//!   assignment to the least loaded process server.
//! - `health`: health and RPO of machines and process servers, and the sweep that
//!   records each change as an event.
//! - `jobs`: durable jobs with leases, their runner, and the retention job.
//! - `plans`: recovery plans and the plan jobs that drive machine recovery jobs.
//! - `fleet`: automatic rebalancing: the machines of a lost, critical or overloaded
//!   process server move to the others, rate limited.
//! - `webhooks`: events POSTed, signed, to the URLs operators configure; the
//!   background deliverer.
//! - `dashboard`: the operators' web page at `/`, with its token sign-in.
//!
//! The recovery library the `ferry` command calls directly:
//! - `recovery::points`: a machine's recovery points and choosing one (latest,
//!   latest-app, an id, or a time).
//! - `recovery::group`: the latest point a whole multi-machine group shares.
//! - `recovery::failover`: rebuilding every disk of a machine at the chosen point into
//!   raw or fixed-VHD files (`ferry_replica::export`).
//! - `recovery::retention`: compaction by age.
//! - `error`: the control plane's `Error`.

pub mod api;
pub mod dashboard;
pub mod db;
pub mod enroll;
pub mod error;
pub mod fleet;
pub mod health;
pub mod jobs;
pub mod plans;
pub mod policy;
pub mod recovery;
pub mod registry;
pub mod server;
pub mod webhooks;
