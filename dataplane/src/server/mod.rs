//! The process server. Its logic (the session state machine) is apart from any socket
//! so that tests can drive it directly; the rest runs it: shards with their own compio
//! runtime and cache log, TLS connections, the upload stage, and the metrics endpoint.

pub mod claims;
pub mod conn;
pub mod control;
mod end;
pub mod failed_over;
mod hello;
pub mod http;
pub mod listed;
pub mod options;
pub mod registry;
pub mod revoked;
pub mod run;
pub mod session;
pub mod shard;
pub mod sums;

pub use failed_over::FailedOver;
pub use options::Options;
pub use revoked::Revoked;
pub use run::{start, Running};
pub use session::{Action, Limits, Progress, Reject, Session};
