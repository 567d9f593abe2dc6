//! Errors of the control plane: the recovery decisions it could not make, each naming
//! the machine, disk, point or group concerned, and the replica's own errors (store,
//! keys, records), kept whole as their `source`.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A point given on the command line that is neither a name, an id nor a time.
    #[error("point {spec:?} {why}")]
    BadPointSpec { spec: String, why: &'static str },
    /// The store holds no disk of this machine.
    #[error("no machine {machine} in store {store}")]
    NoMachine { machine: String, store: String },
    /// A point id that some disks of the machine lack.
    #[error("point {id} is not a point of disk {disks} of machine {machine} (see `ferry points`)")]
    NotAPoint {
        id: String,
        machine: String,
        /// The disks that lack it, comma-separated.
        disks: String,
    },
    /// A disk with no point of the kind or time asked for.
    #[error("disk {disk} of machine {machine} has no {wanted}")]
    NoPoint {
        machine: String,
        disk: String,
        wanted: String,
    },
    /// Retention dropped the chosen point while a failover rebuilt it.
    #[error("point {id} of disk {disk} was removed by retention during the failover")]
    PointRemoved { id: String, disk: String },
    /// No machine has points of this group.
    #[error("no machine in store {store} has points of group {group}")]
    NoGroup { group: String, store: String },
    /// The group's machines share no group point.
    #[error("no point of group {group} is held by all of {members}")]
    NoGroupPoint { group: String, members: String },
    /// Local I/O (the failover's output directory).
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    /// The replica failed or refused (store, keys, records, rebuild).
    #[error(transparent)]
    Replica(#[from] ferry_replica::Error),
}
