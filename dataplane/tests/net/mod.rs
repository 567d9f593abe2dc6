//! Shared set-up for the network tests: certificates, a server started in-process on
//! a loopback port, and agent targets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_dataplane::server::{start, Options, Running};
use ferry_link::client::Target;
use ferry_link::tls::certs::{client_config, server_config, server_name};
use ferry_link::tls::{Authority, Validity};
use ferry_replica::{Store, VaultKey};

pub struct Pki {
    pub dir: PathBuf,
}

/// A CA with a server certificate, agents `agent-0`, `agent-1`, an expired agent, and a
/// stranger signed by another CA.
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
        Target {
            addr,
            server_name: server_name("127.0.0.1").unwrap(),
            tls: Arc::new(client_config(&cert, &key, &self.dir.join("ca.pem")).unwrap()),
            timeout: Duration::from_secs(5),
        }
    }

    pub fn server_tls(&self) -> rustls::ServerConfig {
        server_config(
            &self.dir.join("server.pem"),
            &self.dir.join("server.key"),
            &self.dir.join("ca.pem"),
        )
        .unwrap()
    }
}

pub fn vault(dir: &Path) -> (PathBuf, VaultKey) {
    let path = dir.join("vault.key");
    if !path.exists() {
        VaultKey::generate().save_new(&path).unwrap();
    }
    (path.clone(), VaultKey::load(&path).unwrap())
}

pub fn options(cache: &Path, shards: usize) -> Options {
    let mut o = Options::new("127.0.0.1:0".parse().unwrap(), cache.to_path_buf());
    o.shards = shards;
    o.cache_bytes = 256 << 20;
    o.cache_file_bytes = 4 << 20;
    o.batch_delay = Duration::from_millis(20);
    o.peer_timeout = Duration::from_secs(10);
    o
}

pub fn serve(pki: &Pki, opts: Options, store: Store, vault: VaultKey) -> Running {
    start(opts, pki.server_tls(), store, vault).unwrap()
}

pub fn seed() -> u64 {
    std::env::var("FERRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}
