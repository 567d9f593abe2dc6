//! The process server's logic, apart from any socket or kernel interface so that tests
//! can drive it directly: today the per-connection session state machine (sequence
//! checks, resumption, credit-based flow control, acknowledgement watermarks).

pub mod session;

pub use session::{Action, Limits, Progress, Reject, Session};
