//! Errors of the link. `LinkError` is the agent's end of a connection to a process
//! server (`client`): each names the peer and the step that failed and keeps its cause
//! as `source`. The durable log's own errors are `LogError` (`log`), re-exported here.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::protocol::{DecodeError, ErrorCode};

pub use crate::log::LogError;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The Hello names a machine or disk the store cannot hold (checked before
    /// connecting, by the rule the process server applies too).
    #[error(transparent)]
    BadName(ferry_replica::Error),
    /// No TCP connection in time.
    #[error("connect to {peer}: timed out")]
    ConnectTimeout { peer: SocketAddr },
    /// A socket operation failed: connecting, the TLS handshake, sending, reading.
    #[error("{op} {peer}: {source}")]
    Io {
        op: &'static str,
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The client's TLS configuration cannot start a session.
    #[error("TLS setup for {peer}: {source}")]
    Tls {
        peer: SocketAddr,
        #[source]
        source: rustls::Error,
    },
    /// The process server refused the Hello with an Error frame. `durable` is its
    /// watermark when it refused the agent's sequence numbers (an Ack precedes that
    /// refusal).
    #[error("refused by the process server: {reason} ({code:?})")]
    Refused {
        peer: SocketAddr,
        code: ErrorCode,
        reason: String,
        durable: Option<u64>,
    },
    /// The process server ended an established session with an Error frame.
    #[error("the process server closed the session: {reason} ({code:?})")]
    SessionClosed {
        peer: SocketAddr,
        code: ErrorCode,
        reason: String,
    },
    /// The process server sent bytes that are not a frame.
    #[error("bad {what} from the process server {peer}: {source}")]
    BadFrame {
        what: &'static str,
        peer: SocketAddr,
        #[source]
        source: DecodeError,
    },
    /// A frame that has no place at this step of the protocol.
    #[error("process server {peer}: {what}")]
    Unexpected { peer: SocketAddr, what: String },
    /// The process server closed the connection.
    #[error("the process server {peer} closed the connection")]
    Closed { peer: SocketAddr },
    /// No Welcome within the timeout.
    #[error("no welcome from {peer} in time")]
    NoWelcome { peer: SocketAddr },
    /// The link had already ended: why, shared by every caller that waits on it.
    #[error(transparent)]
    Ended(Arc<LinkError>),
}

impl LinkError {
    /// The process server's durable watermark, when it refused the agent's sequence
    /// numbers.
    pub fn durable(&self) -> Option<u64> {
        match self {
            LinkError::Refused { durable, .. } => *durable,
            LinkError::Ended(e) => e.durable(),
            _ => None,
        }
    }

    /// The code of the process server's Error frame, when it sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            LinkError::Refused { code, .. } | LinkError::SessionClosed { code, .. } => Some(*code),
            LinkError::Ended(e) => e.code(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    fn peer() -> SocketAddr {
        "127.0.0.1:20003".parse().expect("an address")
    }

    #[test]
    fn a_refusal_keeps_its_code_and_watermark_after_the_link_ended() {
        let refused = LinkError::Refused {
            peer: peer(),
            code: ErrorCode::Sequence,
            reason: "behind".into(),
            durable: Some(42),
        };
        assert_eq!(refused.code(), Some(ErrorCode::Sequence));
        assert_eq!(refused.durable(), Some(42));
        let ended = LinkError::Ended(Arc::new(refused));
        assert_eq!(ended.code(), Some(ErrorCode::Sequence));
        assert_eq!(ended.durable(), Some(42));
        assert_eq!(
            ended.to_string(),
            "refused by the process server: behind (Sequence)"
        );
        assert_eq!(LinkError::Closed { peer: peer() }.code(), None);
    }

    #[test]
    fn socket_errors_name_the_step_and_peer_and_keep_their_cause() {
        let e = LinkError::Io {
            op: "connect to",
            peer: peer(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert!(
            e.to_string().starts_with("connect to 127.0.0.1:20003: "),
            "{e}"
        );
        let cause = e.source().expect("the cause is kept");
        assert_eq!(
            cause.downcast_ref::<io::Error>().map(io::Error::kind),
            Some(io::ErrorKind::ConnectionRefused)
        );
    }

    #[test]
    fn the_log_speaks_of_itself_not_of_whose_log_it_is() {
        let e = crate::log::io_err(
            "open",
            std::path::Path::new("/j/0.log"),
            io::Error::other("x"),
        );
        assert_eq!(e.to_string(), "log open /j/0.log: x");
        assert!(e.source().is_some());
    }
}
