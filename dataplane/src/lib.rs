//! Ferry's data plane: the process server. Read in flow order, its modules draw its
//! pipeline, ingest -> cache -> upload: `server` (ingest: the sessions that judge
//! agents' frames and the shards that append them, with group commit, to their cache
//! log, a `ferry_link::log::DurableLog`) -> `cache` (the cache directory those logs
//! live in: room on its file system, shards it may hold) -> `upload` (tail the cache,
//! seal into segments and commit to the replica). Beside them: `health` and `metrics`,
//! and `error` (the server's error types). The simulated agent its tests drive lives
//! in the dev-only `ferry-testkit`. The protocol, TLS, the agent's client end and the
//! durable log live in `ferry-link`, which the agent shares without linking this crate;
//! the failover output writers live in `ferry_replica::export`.

// The pipeline, in flow order (each its own group, so that rustfmt keeps the order).
pub mod server;

pub mod cache;

pub mod upload;

pub mod error;
pub mod health;
pub mod metrics;
