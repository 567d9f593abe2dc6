//! How a connection ends. Both the Hello check (`hello.rs`) and the connection
//! (`conn.rs`) produce these, so they live below both: imports point one way,
//! `conn` -> `hello` -> `shard`, and each of them -> `end`.

use ferry_link::protocol::ErrorCode;

use super::session::Reject;

/// Why a connection ended, for the log.
pub(super) enum End {
    /// The agent said Bye.
    Bye,
    /// We refuse to go on; the agent is told why.
    Reject(Reject),
    /// The peer went away or stalled; nothing can be told.
    Gone(String),
}

/// A refusal for a reason on the server's side (its cache or the store): the agent
/// may try again later.
pub(super) fn unavailable(reason: impl Into<String>) -> Reject {
    Reject {
        code: ErrorCode::Unavailable,
        reason: reason.into(),
    }
}
