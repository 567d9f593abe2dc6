//! Shared test support: the stores every suite runs against, a memory sink, and a
//! seeded random source whose seed is printed so any failure can be replayed.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use ferry_replica::rebuild::{rebuild_point, DiskSink};
use ferry_replica::{Disk, DiskState, Store};
use object_store::ObjectStore;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct TestStore {
    pub name: &'static str,
    pub url: String,
    pub inner: Arc<dyn ObjectStore>,
    _dir: Option<tempfile::TempDir>,
}

impl TestStore {
    pub fn store(&self) -> Store {
        Store::with_object_store(self.inner.clone(), &self.url)
    }
}

fn remote(name: &'static str, var: &str) -> Option<TestStore> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => {
            let inner =
                ferry_replica::store::build(&url).unwrap_or_else(|e| panic!("{var}={url}: {e}"));
            Some(TestStore {
                name,
                url,
                inner,
                _dir: None,
            })
        }
        _ => {
            if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
                panic!("{var} is not set but FERRY_TEST_REQUIRE_REMOTE=1 (.ci/run sets both)");
            }
            eprintln!("note: {var} not set; the {name} store is not exercised in this run");
            None
        }
    }
}

/// The local directory store, memory, and Azurite / s3s-fs when .ci/run started them.
pub fn stores() -> Vec<TestStore> {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().display());
    let local = ferry_replica::store::build(&url).expect("local store");
    let mut v = vec![
        TestStore {
            name: "file",
            url,
            inner: local,
            _dir: Some(dir),
        },
        TestStore {
            name: "memory",
            url: "memory://".into(),
            inner: Arc::new(object_store::memory::InMemory::new()),
            _dir: None,
        },
    ];
    v.extend(remote("azurite", "FERRY_TEST_AZURE_URL"));
    v.extend(remote("s3s-fs", "FERRY_TEST_S3_URL"));
    v
}

/// Fewer cases for the slow emulators.
pub fn cases_for(store: &TestStore, local: u64) -> u64 {
    match store.name {
        "file" | "memory" => local,
        _ => (local / 8).max(2),
    }
}

/// Seeds: FERRY_SEED replays one; otherwise FERRY_CASES (or `default`) seeds from a
/// base that FERRY_SEED_BASE can move.
pub fn seeds(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("FERRY_SEED") {
        return vec![s.parse().expect("FERRY_SEED is a number")];
    }
    let n = std::env::var("FERRY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let base: u64 = std::env::var("FERRY_SEED_BASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    (base..base + n).collect()
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A unique machine name so runs sharing a container never meet.
pub fn machine(rng: &mut impl Rng) -> String {
    format!(
        "m-{:016x}",
        rng.gen::<u64>() ^ std::process::id() as u64 ^ nanos()
    )
}

fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub struct MemSink(pub Mutex<Vec<u8>>);

impl MemSink {
    pub fn new(size: u64) -> Self {
        MemSink(Mutex::new(vec![0u8; size as usize]))
    }
    pub fn into_inner(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

impl DiskSink for MemSink {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let mut v = self.0.lock().unwrap();
        v[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut v = self.0.lock().unwrap();
        v[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// Rebuilds a point of `state` into memory.
pub fn rebuild_mem(disk: &Disk, state: &DiskState, id: &str) -> ferry_replica::Result<Vec<u8>> {
    let p = state.point(id).unwrap_or_else(|| panic!("no point {id}"));
    let sink = MemSink::new(p.disk_bytes);
    rebuild_point(disk, state, p, &sink, &|_| {})?;
    Ok(sink.into_inner())
}

/// Data a disk might hold: random, text-like, runs of one byte, or zeroes.
pub fn payload(rng: &mut impl Rng, len: usize) -> Vec<u8> {
    match rng.gen_range(0..4) {
        0 => (0..len).map(|_| rng.gen()).collect(),
        1 => {
            let words: [&[u8]; 5] = [b"ferry ", b"replica ", b"block ", b"disk ", b"\n"];
            let mut v = Vec::with_capacity(len + 8);
            while v.len() < len {
                v.extend_from_slice(words[rng.gen_range(0..5)]);
            }
            v.truncate(len);
            v
        }
        2 => vec![rng.gen(); len],
        _ => vec![0u8; len],
    }
}
