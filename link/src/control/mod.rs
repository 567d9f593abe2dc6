//! The agent's and process server's side of the control plane: the wire types of
//! enrollment, renewal and heartbeats (`wire`), shared with the control plane itself,
//! and the client both parts run (`client`: identity files, enrollment, renewal and
//! the heartbeat thread), and the bounds on what a heartbeat carries (`limits`).

pub mod client;
pub mod limits;
pub mod wire;
