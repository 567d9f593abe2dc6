//! The agent's and process server's side of the control plane: the wire types of
//! enrollment, renewal and heartbeats (`wire`), shared with the control plane itself.

pub mod wire;
