//! Errors of the agent. `Error` is the live agent's (starting it, points, resyncs,
//! stopping, group cuts, admin requests): each names the disk, path, member or address
//! it concerns and keeps its cause as `source`. `NbdError` is what ends one NBD connection (logged with its peer).

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
    /// The machine failed over to the recovery site: no point, nothing replicated.
    #[error("the machine failed over to the recovery site: its disks are read-only and nothing is replicated")]
    FailedOver,
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
    #[error("this agent does not coordinate a group (no --group-peer, nor orders naming it the coordinator)")]
    NotCoordinator,
    /// The group channel's certificates could not be loaded.
    #[error("group channel TLS: {source}")]
    GroupCerts {
        #[source]
        source: ferry_link::tls::certs::CertError,
    },
    /// A `--group-peer` that is not `NAME@ADDR`.
    #[error("group peer {peer:?}: expected NAME@ADDR (the member's machine name, as its certificate names it, and its --group-listen address)")]
    GroupPeerForm { peer: String },
    /// A `--group-peer` whose NAME no certificate can carry.
    #[error("group peer {peer:?}: {source}")]
    GroupPeerName {
        peer: String,
        #[source]
        source: MachineNameError,
    },
    /// A `--group-peer` whose ADDR is not a socket address.
    #[error("group peer {peer:?}: address {addr:?}: {source}")]
    GroupPeerAddr {
        peer: String,
        addr: String,
        #[source]
        source: std::net::AddrParseError,
    },
    /// A group point skipped: a member could not be asked (connection, TLS handshake).
    #[error("group point skipped: member {member}: {source}")]
    MemberUnreachable {
        member: String,
        #[source]
        source: io::Error,
    },
    /// A group point skipped: a member did not answer `ready` in time.
    #[error("group point skipped: member {member} not ready in time: {source}")]
    MemberNotReady {
        member: String,
        #[source]
        source: io::Error,
    },
    /// A group point skipped: a member said no, and why (its own words).
    #[error("group point skipped: member {member}: {why}")]
    MemberRefused { member: String, why: String },
    /// The admin socket could not be asked (connect, send).
    #[error("admin socket {path}: {op}: {source}")]
    Admin {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The agent answered an admin request with an error (its words).
    #[error("{answer}")]
    AdminRefused { path: String, answer: String },
    /// The agent closed the admin connection without answering.
    #[error("admin socket {path}: the agent closed the admin connection without an answer")]
    AdminNoAnswer { path: String },
    /// The control plane named a process server this agent cannot use.
    #[error("process server {name} at {address}: {why}")]
    ProcessServer {
        name: String,
        address: String,
        why: String,
    },
}

/// A machine name that no certificate can carry (not a DNS name or an IP address).
#[derive(Debug, thiserror::Error)]
#[error("machine name {name:?} cannot be named by a certificate (a DNS name or an IP address)")]
pub struct MachineNameError {
    pub name: String,
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
