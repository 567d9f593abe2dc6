//! Ferry's data plane: the process server. Read in flow order, its modules draw its
//! pipeline: `server` (the sessions that judge agents' frames, the shards that cache
//! them in a `ferry_link::log::DurableLog` with group commit) -> `upload` (seal into
//! segments and commit to the replica), with `health` and `metrics` beside them. The simulated
//! agent its tests drive lives in the dev-only `ferry-testkit`. The
//! protocol, TLS, the agent's client end and the durable log moved to `ferry-link`,
//! which the agent shares without linking this crate; the failover output writers
//! moved to `ferry_replica::export`.

pub mod health;
pub mod metrics;
pub mod server;
pub mod upload;
