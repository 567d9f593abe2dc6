//! A loopback site for the live agent's tests: certificates for some agents, a vault
//! key, a file store, process servers started in-process, and agents' options, with
//! the checks every such test ends with (each point rebuilds as the disk was).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ferry_agent::live::group::GroupTls;
use ferry_agent::live::{Agent, DiskSpec, Options};
use ferry_dataplane::server::{start, Options as ServerOptions, Running};
use ferry_link::tls::certs::generate_loopback;
use ferry_replica::meta::Point;
use ferry_replica::rebuild::rebuild_point;
use ferry_replica::{Disk, DiskState, Store, VaultKey};
use rand::SeedableRng;

use crate::sim::MemSink;
use crate::wait::wait_ok;

/// The size of `Site::disk`'s image.
pub const DISK_BYTES: u64 = 16 << 20;

pub struct Site {
    pub dir: tempfile::TempDir,
    pub url: String,
    /// Seeded from FERRY_SEED (printed), so a failure replays.
    pub rng: rand::rngs::StdRng,
}

/// A loopback site: certificates for `agents` agents, a vault key, an empty store.
pub fn site(agents: usize) -> Site {
    let seed = crate::seed();
    let dir = tempfile::tempdir().unwrap();
    generate_loopback(&dir.path().join("pki"), agents).unwrap();
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    VaultKey::generate()
        .save_new(&dir.path().join("vault.key"))
        .unwrap();
    Site {
        url: format!("file://{}", store_dir.display()),
        dir,
        rng: rand::rngs::StdRng::seed_from_u64(seed),
    }
}

impl Site {
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn vault(&self) -> VaultKey {
        VaultKey::load(&self.path("vault.key")).unwrap()
    }

    pub fn server(&self, listen: std::net::SocketAddr) -> Running {
        self.server_with(listen, |_| {})
    }

    /// A process server with the test's options, then `tune`'s.
    pub fn server_with(
        &self,
        listen: std::net::SocketAddr,
        tune: impl FnOnce(&mut ServerOptions),
    ) -> Running {
        let mut so = ServerOptions::new(listen, self.path("cache"));
        so.shards = 2;
        so.cache_bytes = 256 << 20;
        so.batch_delay = Duration::from_millis(20);
        tune(&mut so);
        start(
            so,
            crate::pki::server_tls(&self.path("pki")),
            Store::open(&self.url).unwrap(),
            self.vault(),
        )
        .unwrap()
    }

    /// `disk.img` of DISK_BYTES, random in `random`, zero elsewhere.
    pub fn disk(&self, rng: &mut rand::rngs::StdRng, random: std::ops::Range<usize>) -> PathBuf {
        let disk = self.path("disk.img");
        crate::disk::random_disk(&disk, DISK_BYTES, random, rng);
        disk
    }

    /// Agent `i` (machine agent-i) protecting `disk` as sda; nothing optional on.
    pub fn options(&self, i: usize, disk: &Path, server: std::net::SocketAddr) -> Options {
        Options {
            machine: format!("agent-{i}"),
            disks: vec![DiskSpec {
                name: "sda".into(),
                path: disk.to_path_buf(),
            }],
            target: crate::pki::agent_target(&self.path("pki"), i, server),
            nbd_listen: "127.0.0.1:0".parse().unwrap(),
            journal_dir: self.path(&format!("journal{i}")),
            journal_bytes: 64 << 20,
            crash_point_interval: None,
            freeze_hook: None,
            admin_socket: None,
            initial_copy: false,
            group: None,
            group_listen: None,
            group_coordinator: None,
            group_peers: Vec::new(),
            group_tls: None,
        }
    }

    /// Agent `i`'s TLS for the group channel.
    pub fn group_tls(&self, i: usize) -> GroupTls {
        let pki = self.path("pki");
        GroupTls::load(
            &pki.join(format!("agent-{i}.pem")),
            &pki.join(format!("agent-{i}.key")),
            &pki.join("ca.pem"),
        )
        .unwrap()
    }

    /// Asserts that each point (id, expected disk) of agent-0 rebuilds exactly.
    pub fn assert_points(&self, points: &[(&str, &[u8])]) {
        let (_store, replica, state) = self.replica("agent-0");
        for (id, want) in points {
            let p = state
                .point(id)
                .unwrap_or_else(|| panic!("point {id} is not in the replica"));
            assert!(
                rebuilt(&replica, &state, p) == *want,
                "point {id} does not rebuild the disk as it was"
            );
        }
    }

    /// The replica of machine's sda and its state.
    pub fn replica(&self, machine: &str) -> (Store, Disk, DiskState) {
        let store = Store::open(&self.url).unwrap();
        let disk = store
            .block(Disk::open(&store, machine, "sda", Some(&self.vault())))
            .unwrap();
        let state = store.block(disk.load_state()).unwrap();
        (store, disk, state)
    }
}

/// The disk as point `p` rebuilds it.
pub fn rebuilt(replica: &Disk, state: &DiskState, p: &Point) -> Vec<u8> {
    let sink = MemSink(Mutex::new(vec![0; p.disk_bytes as usize]));
    rebuild_point(replica, state, p, &sink, &|_| {}).unwrap();
    sink.0.into_inner().unwrap()
}

/// Waits (up to a minute) until every write of every agent is in the store.
pub fn wait_uploaded(agents: &[&Agent]) {
    wait_ok("every write uploaded", Duration::from_secs(60), || {
        if agents.iter().all(|a| a.uploaded_all()) {
            Ok(())
        } else {
            Err(agents.iter().map(|a| a.status()).collect::<Vec<_>>())
        }
    })
}

/// Takes a point as soon as the agent allows one (after a copy or resync), within a
/// minute.
pub fn point_when_ready(agent: &Agent, label: &str) -> String {
    wait_ok(
        &format!("a point labelled {label:?}"),
        Duration::from_secs(60),
        || agent.bookmark(false, Some(label)),
    )
}
