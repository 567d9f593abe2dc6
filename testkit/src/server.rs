//! A process server started in-process on a loopback port, with the tests' options.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_dataplane::server::{start, Options, Running};
use ferry_replica::{Store, VaultKey};

use crate::pki::Pki;

/// `dir`'s vault.key, made on first use, and the key.
pub fn vault(dir: &Path) -> (PathBuf, VaultKey) {
    let path = dir.join("vault.key");
    if !path.exists() {
        VaultKey::generate().save_new(&path).unwrap();
    }
    (path.clone(), VaultKey::load(&path).unwrap())
}

/// Small caches and a short batch delay, so tests upload promptly.
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
