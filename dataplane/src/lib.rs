//! Ferry's data plane. Read in flow order, its modules draw the process server's
//! pipeline: `protocol` (frames from agents) -> `server` (the session that judges them)
//! -> `cache` (durable local log, group commit) -> `upload` (seal into segments and
//! commit to the replica). `export` writes rebuilt disks for failover (raw, fixed VHD).
//! These are plain logic over files and the store, testable without sockets; the
//! thread-per-core io_uring shell that feeds them from TLS connections comes next.

pub mod cache;
pub mod client;
pub mod export;
pub mod health;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod sim;
pub mod tls;
pub mod upload;
