//! Certificates for the network tests, and the agents' targets built from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_link::client::Target;
use ferry_link::tls::certs::{client_config, server_config, server_name};
use ferry_link::tls::{Authority, Validity};

pub struct Pki {
    pub dir: PathBuf,
}

/// A CA with a server certificate, agents `agent-0`, `agent-1`, an expired agent, and a
/// stranger signed by another CA. Also sets up logging to the test's output
/// (FERRY_LOG filters it, default warn).
pub fn pki(dir: &Path) -> Pki {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let ca = Authority::create(dir, "test CA").unwrap();
    ca.issue("server", "127.0.0.1", true, Validity::Current)
        .unwrap();
    ca.issue("agent-0", "agent-0", false, Validity::Current)
        .unwrap();
    ca.issue("agent-1", "agent-1", false, Validity::Current)
        .unwrap();
    ca.issue("expired", "agent-0", false, Validity::Expired)
        .unwrap();
    let other = Authority::create(&dir.join("other"), "another CA").unwrap();
    other
        .issue("stranger", "agent-0", false, Validity::Current)
        .unwrap();
    Pki {
        dir: dir.to_path_buf(),
    }
}

impl Pki {
    /// How `who` (a certificate of this PKI, or "stranger") reaches the server at
    /// `addr`.
    pub fn target(&self, addr: std::net::SocketAddr, who: &str) -> Target {
        let (cert, key) = if who == "stranger" {
            (
                self.dir.join("other/stranger.pem"),
                self.dir.join("other/stranger.key"),
            )
        } else {
            (
                self.dir.join(format!("{who}.pem")),
                self.dir.join(format!("{who}.key")),
            )
        };
        target(&self.dir, &cert, &key, addr)
    }

    pub fn server_tls(&self) -> rustls::ServerConfig {
        server_tls(&self.dir)
    }
}

/// The server's TLS from `dir`'s server.pem, server.key and ca.pem (the layout of
/// both `pki` and `ferry certs`).
pub fn server_tls(dir: &Path) -> rustls::ServerConfig {
    server_config(
        &dir.join("server.pem"),
        &dir.join("server.key"),
        &dir.join("ca.pem"),
    )
    .unwrap()
}

/// How the holder of `cert` reaches the server at `addr` (named 127.0.0.1), trusting
/// `dir`'s ca.pem.
pub fn target(dir: &Path, cert: &Path, key: &Path, addr: std::net::SocketAddr) -> Target {
    Target {
        addr,
        server_name: server_name("127.0.0.1").unwrap(),
        tls: Arc::new(client_config(cert, key, &dir.join("ca.pem")).unwrap()),
        timeout: Duration::from_secs(5),
    }
}

/// Agent `i`'s target (agent-i.pem of `dir`, as `ferry certs` names them).
pub fn agent_target(dir: &Path, i: usize, addr: std::net::SocketAddr) -> Target {
    target(
        dir,
        &dir.join(format!("agent-{i}.pem")),
        &dir.join(format!("agent-{i}.key")),
        addr,
    )
}
