//! How a process server is set up: everything `ferry process-server` takes, with the
//! defaults it documents.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::failed_over::FailedOver;
use super::revoked::Revoked;
use super::session::Limits;

#[derive(Debug, Clone)]
pub struct Options {
    /// This server's name: the writer its commits carry, which fencing tells apart
    /// (docs/storage-format.md 3). Unique among the servers writing to one store.
    pub name: String,
    pub listen: SocketAddr,
    pub cache_dir: PathBuf,
    /// Bound of the cache over all shards; each shard gets an equal part.
    pub cache_bytes: u64,
    /// Size at which a shard's cache file rolls over.
    pub cache_file_bytes: u64,
    pub shards: usize,
    /// Pin shard i to CPU i.
    pub pin: bool,
    pub metrics_listen: Option<SocketAddr>,
    pub limits: Limits,
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// A peer that sends nothing for this long (idle, or stalled within a frame) is
    /// disconnected. Agents ping when idle.
    pub peer_timeout: Duration,
    /// A session waits this long for an earlier session of its disk to end.
    pub claim_timeout: Duration,
    /// The upload stage waits up to this long to gather a bigger segment...
    pub batch_delay: Duration,
    /// ...unless this many bytes are already waiting.
    pub batch_bytes: usize,
    /// The grace compaction gives unreferenced objects: an upload whose commit would
    /// start later than this (less a margin) after its put is redone, never committed.
    /// Must equal compaction's; only tests change it.
    pub orphan_grace: Duration,
    /// Client certificates the control plane revoked; its heartbeat thread replaces
    /// the list while the server runs. Empty in the standalone mode.
    pub revoked: Arc<Revoked>,
    /// Machines that failed over to the recovery site: their agents are refused
    /// (no split brain). The heartbeat thread replaces it; empty in the standalone
    /// mode.
    pub failed_over: Arc<FailedOver>,
}

impl Options {
    pub fn new(listen: SocketAddr, cache_dir: PathBuf) -> Options {
        Options {
            // The host's name, as `ferry process-server` takes it without --name.
            name: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "process-server".into()),
            listen,
            cache_dir,
            cache_bytes: 8 << 30,
            cache_file_bytes: 64 << 20,
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin: false,
            metrics_listen: None,
            limits: Limits::default(),
            handshake_timeout: Duration::from_secs(10),
            peer_timeout: Duration::from_secs(30),
            claim_timeout: Duration::from_secs(30),
            batch_delay: Duration::from_millis(200),
            batch_bytes: 16 << 20,
            orphan_grace: ferry_replica::grace::ORPHAN_GRACE,
            revoked: Arc::default(),
            failed_over: Arc::default(),
        }
    }
}
