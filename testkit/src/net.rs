//! Free loopback ports, for a server that must be restarted on the same address or
//! an agent whose process server is not up yet.

use std::net::{SocketAddr, TcpListener};

/// A loopback address no one listens on now. Another process could take the port
/// before the caller binds it: tests accept that small race for a fixed address.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free loopback port")
}

/// The port of `free_addr`.
pub fn free_port() -> u16 {
    free_addr().port()
}
