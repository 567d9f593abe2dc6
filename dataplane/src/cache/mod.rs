//! The process server's durable cache: what agents sent, kept on local disk until it is
//! committed in blob storage. An agent's write is acknowledged only once it is here and
//! synced; on restart, the cache is read back and what was not yet uploaded is uploaded.

pub mod log;
#[cfg(test)]
mod powercut;
pub mod tail;

pub use log::{CacheError, CacheLog, Entry, Position, RecordRef, Recovered};
pub use tail::{Batch, Tailer};
