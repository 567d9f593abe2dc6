//! TLS for the agent <-> process-server link: certificates and an io_uring-driven
//! rustls stream whose read and write halves run as separate tasks of one shard.

pub mod certs;
pub mod io;

pub use certs::{client_config, server_config, server_name, Authority, Identity, Validity};
pub use io::{handshake, TlsReader, TlsWriter};
