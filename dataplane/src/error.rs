//! Errors of the process server. `Error` is starting the server and the work a session
//! asks of it (a checksum map): each names the path, address or disk it concerns and
//! keeps its cause as `source`. `ConnError` is what ends one agent connection; it is
//! logged with the connection's shard and peer beside it.

use std::io;

use ferry_link::log::LogError;
use ferry_link::protocol::ErrorCode;

use crate::cache::gib;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting that cannot work.
    #[error("{0}")]
    Setting(&'static str),
    /// The cache's file system cannot hold what the cache's bound promises.
    #[error(
        "cache dir {dir}: the cache may grow to {:.2} GiB (--cache-gib and a spare file per shard), but its file system has {:.2} GiB free and the cache holds {:.2} GiB: lower --cache-gib or free space",
        gib(*bound), gib(*free), gib(*held)
    )]
    NoRoom {
        dir: String,
        bound: u64,
        free: u64,
        held: u64,
    },
    /// The cache holds writes of a shard this start would not run: nobody would
    /// upload them.
    #[error("the cache in {dir} holds data of shard {shard}, but --shards is {shards}: start with --shards {} until it has drained", shard + 1)]
    StrayShard {
        dir: String,
        shard: usize,
        shards: usize,
    },
    /// Local I/O on a path or address (the cache directory, listening sockets).
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    /// A shard's cache log could not be recovered.
    #[error("recovering the cache in {dir}: {source}")]
    Recover {
        dir: String,
        #[source]
        source: LogError,
    },
    /// A cache record that is not a protocol frame.
    #[error("cache {dir}: a record at file {file} offset {offset} is not a frame")]
    NotAFrame { dir: String, file: u64, offset: u64 },
    /// A thread could not be started.
    #[error("starting {what}: {source}")]
    Thread {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A worker thread ended without an answer.
    #[error("the {what} thread died")]
    ThreadDied { what: &'static str },
    /// The replica (store, keys, records) refused or failed, for a disk.
    #[error("disk {disk}: {source}")]
    Replica {
        disk: String,
        #[source]
        source: ferry_replica::Error,
    },
    /// The disk's replica state is not open (its uploader failed or was reset).
    #[error("disk {disk}: {why}")]
    NotOpen { disk: String, why: &'static str },
    /// A checksum map larger than the protocol carries.
    #[error("disk {disk}: a checksum map of {blocks} blocks exceeds the {max}-byte limit (disks up to 4 TiB at 64 KiB blocks)")]
    MapTooLarge { disk: String, blocks: u64, max: u64 },
    /// The session that asked for the work ended first.
    #[error("the session ended")]
    SessionEnded,
}

/// What ended an agent's connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// A socket operation failed.
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The server's TLS configuration cannot start a session.
    #[error("TLS setup: {0}")]
    Tls(#[source] rustls::Error),
    /// The client's TLS handshake failed (no certificate, another CA, expired, ...).
    #[error("refused: TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
    /// We refused the agent and told it why.
    #[error("refused: {reason} ({code:?})")]
    Refused { code: ErrorCode, reason: String },
    /// We closed a running session and told the agent why.
    #[error("{reason} ({code:?})")]
    Closed { code: ErrorCode, reason: String },
    /// The agent went away or stalled; nothing could be told.
    #[error("{0}")]
    Gone(String),
    /// The connection's writer task panicked.
    #[error("the writer task failed")]
    WriterFailed,
}
