//! Blob storage goes down while agents write: acknowledgements go on (the cache is
//! durable), uploads are retried with backoff, the cache grows, the alert metric and
//! the health verdict say so; when storage returns, everything uploads and every
//! point rebuilds identical. Nothing is lost.

mod net;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_dataplane::health::Level;
use ferry_dataplane::sim::{verify, SimDisk};
use ferry_replica::fault::FaultStore;
use ferry_replica::Store;
use rand::{Rng, SeedableRng};

fn round(sim: &mut SimDisk, rng: &mut impl Rng) {
    for _ in 0..100 {
        let len = rng.gen_range(1..=32) * 512;
        let off = rng.gen_range(0..((2 << 20) - len) / 512) as u64 * 512;
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        sim.write(off, &data);
    }
    sim.bookmark(0);
}

#[test]
fn a_store_outage_grows_the_cache_raises_the_alert_and_loses_nothing() {
    let seed = net::seed();
    eprintln!("FERRY_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let pki = net::pki(&dir.path().join("pki"));
    let (_, vault) = net::vault(dir.path());
    let inner: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let fault = FaultStore::new(inner.clone());
    let server = net::serve(
        &pki,
        net::options(&dir.path().join("cache"), 2),
        Store::with_object_store(fault.clone(), "fault"),
        net::vault(dir.path()).1,
    );
    let target = pki.target(server.addr, "agent-0");
    let rt = compio::runtime::Runtime::new().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sim = SimDisk::new("agent-0", "d", 2 << 20, true);
    rt.block_on(async {
        round(&mut sim, &mut rng);
        sim.finish(&target, Duration::from_secs(20)).await.unwrap();
    });
    let cache_before = server.view.snapshot().1.cache_bytes;

    fault.outage.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for _ in 0..5 {
            round(&mut sim, &mut rng);
            // Acknowledged durable although storage is down.
            sim.pump(&target, Duration::from_secs(20)).await.unwrap();
        }
    });
    // Give the upload stage time to try, fail and back off.
    let mut seen = None;
    for _ in 0..100 {
        let (_, g, h) = server.view.snapshot();
        if g.store_failing && g.upload_lag_s > 0.5 {
            seen = Some((g, h));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (g, h) = seen.expect("the store failure shows in metrics");
    assert!(h.level >= Level::Warning, "{:?}", h);
    assert!(
        h.reasons
            .iter()
            .any(|r| r.contains("blob storage is failing")),
        "{:?}",
        h.reasons
    );
    assert!(
        g.cache_bytes > cache_before,
        "the cache holds the writes: {} <= {cache_before}",
        g.cache_bytes
    );
    let text = {
        let (m, g, h) = server.view.snapshot();
        ferry_dataplane::metrics::render(&m, &g, &h)
    };
    assert!(text.contains("ferry_store_failing 1"), "{text}");

    fault.outage.store(false, Ordering::SeqCst);
    rt.block_on(async {
        round(&mut sim, &mut rng);
        sim.finish(&target, Duration::from_secs(30)).await.unwrap();
    });
    let (_, g, _) = server.view.snapshot();
    assert!(!g.store_failing);
    server.stop();
    let store = Store::with_object_store(inner, "memory");
    let points = verify(&store, &vault, &sim).unwrap();
    assert_eq!(points, 7);
}
