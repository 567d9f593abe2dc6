//! Frame types. Numbers are part of the wire format: never reuse one.

/// Agent -> process server, first frame of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello<'a> {
    pub version: u16,
    pub machine: &'a str,
    pub disk: &'a str,
    /// Random per agent process start; a reconnect of the same process reuses it.
    pub session: [u8; 16],
    /// The oldest sequence number the agent still holds in its journal: the server
    /// must not need anything older.
    pub journal_from: u64,
    /// The next sequence number the agent will assign.
    pub next_seq: u64,
    pub disk_bytes: u64,
}

impl Hello<'_> {
    /// Machine and disk names follow the store's one rule (`ferry_replica::layout::
    /// check_name`): they become paths in the store, the agent's journal directory and
    /// the process server's cache. Both ends check: the agent before it says Hello, the
    /// server before it touches anything.
    pub fn check_names(&self) -> Result<(), ferry_replica::Error> {
        ferry_replica::layout::check_name("machine", self.machine)?;
        ferry_replica::layout::check_name("disk", self.disk)
    }
}

/// Process server -> agent, answer to Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    /// Every write with a sequence number below this is durable in the server's cache
    /// (or beyond): resend from here.
    pub durable: u64,
    /// Every write below this is committed in blob storage.
    pub uploaded: u64,
    /// Payload bytes the agent may send before it waits for more credit.
    pub credit: u64,
    /// Largest payload the server accepts on this session.
    pub max_payload: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PointKindWire {
    Crash = 1,
    App = 2,
    Group = 3,
}

/// A recovery-point bookmark: the point holds every write with sequence < `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookmark<'a> {
    pub seq: u64,
    pub kind: PointKindWire,
    /// Milliseconds since the Unix epoch, agent clock.
    pub time_ms: i64,
    pub id: &'a str,
    /// Replication group tag; empty when none.
    pub group: &'a str,
    pub label: &'a str,
    /// The disk's size when the point was taken (protocol 2). None in frames of
    /// protocol 1, still found in caches and journals written before an upgrade: their
    /// points take the size of the session's Hello.
    pub disk_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be decoded.
    Malformed = 1,
    /// A frame larger than the negotiated limit.
    TooLarge = 2,
    /// The session does not own this machine or disk.
    NotOwned = 3,
    /// Unsupported protocol version.
    Version = 4,
    /// A sequence number out of order, or older than the server holds.
    Sequence = 5,
    /// The agent sent beyond its credit.
    Credit = 6,
    /// The server cannot take data now (cache failure, shutting down).
    Unavailable = 7,
    /// Anything else.
    Internal = 8,
    /// The machine failed over to the recovery site: its source may not replicate
    /// any more (no split brain). The agent stops replicating and turns its disks
    /// read-only; an agent older than this code sees an undecodable frame and retries,
    /// refused all the same.
    FailedOver = 9,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => Malformed,
            2 => TooLarge,
            3 => NotOwned,
            4 => Version,
            5 => Sequence,
            6 => Credit,
            7 => Unavailable,
            8 => Internal,
            9 => FailedOver,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello(Hello<'a>),
    Welcome(Welcome),
    /// A write of `data` at `offset`.
    Write {
        seq: u64,
        offset: u64,
        data: &'a [u8],
    },
    /// `len` bytes at `offset` now read as zero (TRIM, WRITE_ZEROES).
    Zero {
        seq: u64,
        offset: u64,
        len: u64,
    },
    Bookmark(Bookmark<'a>),
    /// Asks for an Ack once every write below `seq` is durable.
    Flush {
        seq: u64,
    },
    /// The two watermarks: below `durable` is in the server's cache, below `uploaded`
    /// is committed in blob storage.
    Ack {
        durable: u64,
        uploaded: u64,
    },
    /// More payload bytes the agent may send.
    Credit {
        bytes: u64,
    },
    /// The sender closes the session after this frame.
    Error {
        code: ErrorCode,
        reason: &'a str,
    },
    Ping {
        token: u64,
    },
    Pong {
        token: u64,
    },
    /// Orderly end of the session.
    Bye,
    /// Asks for the block checksums of the replica holding every write below `seq`
    /// (at most the next sequence number the server expects): a checksum resync.
    SumsRequest {
        seq: u64,
    },
    /// One chunk of the answer to SumsRequest: the checksums of blocks `first`,
    /// `first + 1`, ... (16 bytes each, xxh3-128 LE, all zero for a zero block) of the
    /// replica at `seq`, `disk_bytes` long in blocks of `block_bytes`. Chunks come in
    /// order; the last ends at the disk's last block.
    Sums {
        seq: u64,
        block_bytes: u32,
        disk_bytes: u64,
        first: u64,
        sums: &'a [u8],
    },
}

pub(crate) mod types {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const WRITE: u8 = 0x10;
    pub const ZERO: u8 = 0x11;
    pub const BOOKMARK: u8 = 0x12;
    pub const FLUSH: u8 = 0x13;
    pub const SUMS_REQUEST: u8 = 0x14;
    pub const ACK: u8 = 0x20;
    pub const CREDIT: u8 = 0x21;
    pub const SUMS: u8 = 0x22;
    pub const ERROR: u8 = 0x30;
    pub const PING: u8 = 0x31;
    pub const PONG: u8 = 0x32;
    pub const BYE: u8 = 0x3f;
}
