//! Instant recovery: serving a recovery point over NBD at once, without rebuilding it
//! first (`ferry serve-point`).
//!
//! Why here: the NBD server and its `Device` trait are the agent's, and the agent
//! already links the replica library; the control plane only chooses the point (the
//! CLI asks it), so this module takes opened disks and chosen points.
//!
//! A served disk reads in three layers, each over the one before: the base (extent
//! objects fetched on demand into a bounded LRU cache, or the local hydrated copy),
//! the log segments up to the point (decoded at start, on several threads, into a
//! local file and an interval index: `log`), and the overlay (the writes made since, journaled locally). The
//! replica is only read.
//!
//! `sync` uses a served disk the other way round: to make an existing disk (failback's
//! home disk) equal to a point by checksum, fetching only what differs
//! (`ferry sync-point`). `reverse` then carries the overlay's writes home: each
//! round seals the ranges written since the last one as a point of a reverse replica
//! (`{machine}.reverse`), which the home disk applies over the failover point.

pub mod flight;
pub mod log;
pub mod overlay;
pub mod ranges;
pub mod reverse;
pub mod reverse_map;
pub mod saved;
pub mod served;
pub mod sync;
pub mod sync_exchange;

use std::path::Path;

pub use overlay::Overlay;
pub use reverse::{
    apply_deltas, send_delta, send_final_delta, ApplyOptions, ApplyReport, DeltaReport,
};
pub use served::{DiskStatus, ServedDisk};
pub use sync::{sync_disk, sync_to_point, SyncOptions, SyncReport};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Replica(#[from] ferry_replica::Error),
    /// A fetch this read waited for (another reader's) failed.
    #[error("fetch {what}: {why}")]
    Fetch { what: String, why: String },
    /// The overlay directory belongs to another disk or point.
    #[error("overlay {path}: {why}")]
    Overlay { path: String, why: String },
    /// The disk a sync writes cannot be used (in use, too small, not a disk).
    #[error("target {path}: {why}")]
    Target { path: String, why: String },
    /// A reverse replica (failback's deltas) that does not fit what it is used with.
    #[error("reverse replica {disk}: {why}")]
    Reverse { disk: String, why: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}
