//! The process server over real TLS sockets, in-process: agents replicate random
//! workloads into it and every point rebuilds byte-identical from the store.

use std::time::Duration;

use ferry_replica::Store;
use ferry_testkit::sim::{verify, SimDisk};
use ferry_testkit::{pki, server};
use rand::{Rng, SeedableRng};

const SIZE: usize = 4 << 20;

/// Random writes (random and repetitive data), zeroes and points.
pub fn workload(sim: &mut SimDisk, rng: &mut impl Rng, ops: usize) {
    for i in 0..ops {
        match rng.gen_range(0..20) {
            0..=14 => {
                let len = rng.gen_range(1..=64) * 512;
                let off = rng.gen_range(0..(SIZE - len) / 512) as u64 * 512;
                let data: Vec<u8> = if rng.gen_bool(0.5) {
                    (0..len).map(|_| rng.gen()).collect()
                } else {
                    vec![rng.gen(); len]
                };
                sim.write(off, &data);
            }
            15 => {
                let len = rng.gen_range(1..=256) * 512;
                let off = rng.gen_range(0..(SIZE - len) / 512) as u64 * 512;
                sim.zero(off, len as u64);
            }
            _ => {
                sim.bookmark(i as i64);
            }
        }
    }
}

#[test]
fn agents_replicate_over_mutual_tls_and_every_point_rebuilds() {
    let seed = ferry_testkit::seed();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::pki(&dir.path().join("pki"));
    let (_, vault) = server::vault(dir.path());
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let url = format!("file://{}", store_dir.display());
    let server = server::serve(
        &pki,
        server::options(&dir.path().join("cache"), 2),
        Store::open(&url).unwrap(),
        server::vault(dir.path()).1,
    );
    let addr = server.addr;
    let mut sims: Vec<SimDisk> = (0..3)
        .map(|i| SimDisk::new(&format!("agent-{}", i % 2), &format!("disk{i}"), SIZE, true))
        .collect();
    let rt = compio::runtime::Runtime::new().unwrap();
    sims = rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, mut sim) in sims.into_iter().enumerate() {
            let target = pki.target(addr, &sim.machine.clone());
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed + i as u64);
            tasks.push(compio::runtime::spawn(async move {
                for _ in 0..6 {
                    workload(&mut sim, &mut rng, 300);
                    sim.pump(&target, Duration::from_secs(30)).await.unwrap();
                }
                sim.finish(&target, Duration::from_secs(30)).await.unwrap();
                sim
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let (m, g, h) = server.view.snapshot();
    assert!(
        m.bytes_in > 0 && m.bytes_uploaded > 0,
        "metrics count traffic"
    );
    assert_eq!(m.errors.iter().sum::<u64>(), 0, "no errors: {:?}", m.errors);
    assert!(!g.store_failing, "{:?}", h.reasons);
    server.stop();
    let store = Store::open(&url).unwrap();
    for sim in &sims {
        let n = verify(&store, &vault, sim).unwrap();
        assert!(n > 10, "{}: only {n} points checked", sim.disk);
        assert_eq!(sim.connects, 1, "one connection, no reconnect needed");
    }
}
