//! Errors of the agent. `Error` is the live agent's (starting it, points, resyncs,
//! stopping): each names the disk, path or address it concerns and keeps its cause as
//! `source`. `NbdError` is what ends one NBD connection (logged with its peer).

use std::io;
use std::process::ExitStatus;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A group without the certificates its channel needs.
    #[error("group {group}: the group channel needs the agent's certificate and CA")]
    GroupTls { group: String },
    /// A group set up in a way that cannot work.
    #[error("group {group}: {why}")]
    GroupSetup { group: String, why: String },
    /// A machine or disk name the store cannot hold (one rule for both).
    #[error(transparent)]
    Name(ferry_replica::Error),
    /// Local I/O on a path or address (journal directory, listening sockets).
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    /// A protected disk could not be opened.
    #[error("disk {disk} ({path}): {source}")]
    OpenDisk {
        disk: String,
        path: String,
        #[source]
        source: io::Error,
    },
    /// An operation on a protected disk or its journal failed.
    #[error("disk {disk}: {op}: {source}")]
    Disk {
        disk: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// A disk cannot do what was asked now (a point during its initial copy, ...).
    #[error("disk {disk} {why}")]
    NotNow { disk: String, why: String },
    /// No protected disk of that name.
    #[error("no disk {disk}")]
    NoDisk { disk: String },
    /// A thread could not be started.
    #[error("starting thread {name}: {source}")]
    Thread {
        name: String,
        #[source]
        source: io::Error,
    },
    /// The freeze hook could not be run.
    #[error("freeze hook `{cmd} {phase}`: {source}")]
    HookRun {
        cmd: String,
        phase: &'static str,
        #[source]
        source: io::Error,
    },
    /// The freeze hook failed.
    #[error("freeze hook `{cmd} {phase}` exited with {status}")]
    HookFailed {
        cmd: String,
        phase: &'static str,
        status: ExitStatus,
    },
    /// An app-consistent point was asked for without a freeze hook.
    #[error("an app-consistent point needs --freeze-hook")]
    NoFreezeHook,
    /// A group point was asked of an agent that does not coordinate one.
    #[error("this agent does not coordinate a group (no --group-peer)")]
    NotCoordinator,
    /// A group point failed (the group channel says why).
    #[error("{0}")]
    Group(String),
}

/// The group channel (`live/group.rs`) still speaks `String` errors: this lets it use
/// `?` on the agent's calls until it has a typed error of its own.
impl From<Error> for String {
    fn from(e: Error) -> String {
        e.to_string()
    }
}

/// What ends an NBD connection. The connection's peer is logged beside it.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A socket operation failed, at the handshake step or request named.
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The client sent a value where the protocol wants its magic number.
    #[error("bad {what} magic {magic:#x}")]
    BadMagic { what: &'static str, magic: u64 },
    /// An option longer than any this server reads.
    #[error("option {opt} of {len} bytes is too long")]
    OptionTooLong { opt: u32, len: u32 },
    /// NBD_OPT_EXPORT_NAME named no export (that option has no error reply).
    #[error("no export named {name:?}")]
    NoExport { name: String },
    /// A read or write longer than the advertised maximum.
    #[error("a request of {len} bytes exceeds {max}")]
    TooLarge { len: u32, max: u32 },
}

impl NbdError {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> NbdError {
        move |source| NbdError::Io { op, source }
    }
}
