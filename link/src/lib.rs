//! What a Ferry agent and a process server share, so that the agent links no server:
//! `protocol` (the frames and their codec, docs/protocol.md), `tls` (certificates,
//! client and server configurations, TLS over compio sockets), `client` (the agent's
//! end of a connection: Hello, credit, Acks), `error` (its `LinkError`), `log` (`DurableLog`, the ordered
//! durable log in numbered files that is both the agent's journal and the process
//! server's cache, with `Tailer` to read it from behind), and `control` (the wire types
//! of enrollment and heartbeats with the control plane).

pub mod client;
pub mod control;
pub mod error;
pub mod log;
pub mod protocol;
pub mod tls;
