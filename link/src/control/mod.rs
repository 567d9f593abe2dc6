//! The agent's and process server's side of the control plane: the wire types of
//! enrollment, renewal and heartbeats (`wire`), shared with the control plane itself,
//! and the client both parts run (`client`: identity files, enrollment, renewal and
//! the heartbeat thread).

pub mod client;
pub mod wire;
