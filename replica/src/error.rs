//! Errors of the replica layer. Every variant names what it was working on (an object
//! path, a disk, a point) so the command line can print one line that says what was
//! wrong without a backtrace.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be reached or refused an operation.
    #[error("store {store}: {op} {path}: {source}")]
    Store {
        store: String,
        op: &'static str,
        path: String,
        // Boxed: object_store's error is large and every Result would carry its size.
        #[source]
        source: Box<object_store::Error>,
    },
    /// An object that a commit references is missing.
    #[error("store {store}: object {path} is missing")]
    Missing { store: String, path: String },
    /// An object failed its integrity check (digest, authentication tag, framing).
    #[error("corrupt object {object}: {reason}")]
    Corrupt { object: String, reason: String },
    /// The vault key is not the one this disk was sealed with.
    #[error("wrong key: {0}")]
    WrongKey(String),
    /// A key file could not be read or has the wrong shape.
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    /// A store URL could not be understood.
    #[error("store URL {url}: {reason}")]
    StoreUrl { url: String, reason: String },
    /// A name (machine, disk) is not allowed in a store path.
    #[error("invalid {what} name {name:?}: {reason} (a name is {rule})", rule = crate::layout::NAME_RULE)]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    /// No such machine, disk or point.
    #[error("{0}")]
    NotFound(String),
    /// Another writer committed first; the caller's view is stale.
    #[error("disk {disk}: another writer committed {commit} concurrently; run again")]
    Conflict { disk: String, commit: String },
    /// Local file I/O (image, output, temporary files).
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    /// A writer's upload is too old to commit: compaction may already have collected
    /// its objects as orphans. The caller redoes the upload under fresh names.
    #[error(
        "disk {disk}: the upload's first object was put {age_ms} ms ago, past the commit \
         deadline (orphan grace {grace_ms} ms less a margin of {margin_ms} ms); compaction \
         may have collected it, so the upload is abandoned and must be redone"
    )]
    UploadExpired {
        disk: String,
        age_ms: u64,
        grace_ms: u64,
        margin_ms: u64,
    },
    /// Another process server claimed the disk: this writer may never commit to it
    /// again (docs/storage-format.md 3, "Fencing").
    #[error(
        "disk {disk}: fenced: {writer} claimed writer epoch {epoch}, past this writer's epoch {held}; it may not commit to the disk again"
    )]
    Fenced {
        disk: String,
        held: u64,
        epoch: u64,
        writer: String,
    },
    /// A caller asked for something the format cannot express.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.into(),
            reason: reason.into(),
        }
    }

    pub fn io(op: &'static str, path: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// True when retrying from a fresh view of the store may succeed: an object vanished
    /// under a reader because a compaction committed meanwhile.
    pub fn is_missing(&self) -> bool {
        matches!(self, Error::Missing { .. })
    }
}
