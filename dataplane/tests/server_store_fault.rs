//! Blob storage goes down while agents write: acknowledgements go on (the cache is
//! durable), uploads are retried with backoff, the cache grows, the alert metric and
//! the health verdict say so; when storage returns, everything uploads and every
//! point rebuilds identical. Nothing is lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_dataplane::health::Level;
use ferry_replica::fault::FaultStore;
use ferry_replica::Store;
use ferry_testkit::sim::{verify, SimDisk};
use ferry_testkit::{pki, server, wait_for, wait_ok};
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

/// Asserts that one of the health verdict's reasons says `what`.
fn says(h: &ferry_dataplane::health::Health, what: &str) {
    assert!(
        h.reasons.iter().any(|r| r.contains(what)),
        "{what:?} not in {:?}",
        h.reasons
    );
}

/// A process server whose blob storage can be made to fail, and an agent's target.
struct Site {
    _dir: tempfile::TempDir,
    vault: ferry_replica::VaultKey,
    /// The storage behind the fault wrapper, for verifying afterwards.
    inner: Arc<dyn object_store::ObjectStore>,
    fault: Arc<FaultStore>,
    server: ferry_dataplane::server::Running,
    target: ferry_link::client::Target,
    rng: rand::rngs::StdRng,
}

fn site(shards: usize, tune: impl FnOnce(&mut ferry_dataplane::server::Options)) -> Site {
    let seed = ferry_testkit::seed();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::pki(&dir.path().join("pki"));
    let (_, vault) = server::vault(dir.path());
    let inner: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let fault = FaultStore::new(inner.clone());
    let mut opts = server::options(&dir.path().join("cache"), shards);
    tune(&mut opts);
    let server = server::serve(
        &pki,
        opts,
        Store::with_object_store(fault.clone(), "fault"),
        server::vault(dir.path()).1,
    );
    let target = pki.target(server.addr, "agent-0");
    Site {
        _dir: dir,
        vault,
        inner,
        fault,
        server,
        target,
        rng: rand::rngs::StdRng::seed_from_u64(seed),
    }
}

#[test]
fn a_store_outage_grows_the_cache_raises_the_alert_and_loses_nothing() {
    let Site {
        _dir,
        vault,
        inner,
        fault,
        server,
        target,
        mut rng,
    } = site(2, |_| {});
    let rt = compio::runtime::Runtime::new().unwrap();
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
    // The upload stage tries, fails and backs off.
    let (g, h) = wait_ok(
        "the store failure to show in metrics",
        Duration::from_secs(10),
        || {
            let (_, g, h) = server.view.snapshot();
            if g.store_failing && g.upload_lag_s > 0.5 {
                Ok((g, h))
            } else {
                Err(g)
            }
        },
    );
    assert!(h.level >= Level::Warning, "{:?}", h);
    says(&h, "blob storage is failing");
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
    // The uploader clears the alert just after the commit `finish` waits for.
    wait_for(
        "the alert to clear once the disk caught up",
        Duration::from_secs(10),
        || !server.view.snapshot().1.store_failing,
    );
    server.stop();
    let store = Store::with_object_store(inner, "memory");
    let points = verify(&store, &vault, &sim).unwrap();
    assert_eq!(points, 7);
}

/// A cache too small for what an agent has in flight fills up while blob storage is
/// down: the server holds the agent (no more reading, no disconnect) until uploads
/// free room, then everything flows on the same connection and every point rebuilds.
#[test]
fn a_full_cache_holds_the_agent_instead_of_dropping_the_session() {
    // Smaller than the agent's credit (8 MiB): the agent can fill it.
    let max = 3 << 20;
    let Site {
        _dir,
        vault,
        inner,
        fault,
        server,
        target,
        mut rng,
    } = site(1, |o| o.cache_bytes = max);
    let rt = compio::runtime::Runtime::new().unwrap();
    let mut sim = SimDisk::new("agent-0", "d", 2 << 20, true);
    // The session opens the disk while storage works, then storage goes down.
    rt.block_on(async {
        round(&mut sim, &mut rng);
        sim.finish(&target, Duration::from_secs(20)).await.unwrap();
    });
    // `finish` ended that session with Bye: the next pump opens one more, and only one.
    let connects = sim.connects + 1;
    fault.outage.store(true, Ordering::SeqCst);
    // Storage comes back once the cache has been full for a while.
    let view = server.view.clone();
    let f2 = fault.clone();
    let watcher = std::thread::spawn(move || {
        let mut full_since = None;
        for _ in 0..600 {
            let (_, g, _) = view.snapshot();
            if g.cache_bytes + (512 << 10) >= max {
                let t = *full_since.get_or_insert_with(std::time::Instant::now);
                if t.elapsed() > Duration::from_millis(500) {
                    f2.outage.store(false, Ordering::SeqCst);
                    return g.cache_bytes;
                }
            }
            // A watcher polling the cache's fill (bounded above), not a fixed wait.
            std::thread::sleep(Duration::from_millis(20));
        }
        f2.outage.store(false, Ordering::SeqCst);
        0
    });
    rt.block_on(async {
        // About 7 MiB of writes, more than twice the cache.
        for _ in 0..8 {
            round(&mut sim, &mut rng);
        }
        sim.pump(&target, Duration::from_secs(60)).await.unwrap();
        sim.finish(&target, Duration::from_secs(30)).await.unwrap();
    });
    let peak = watcher.join().unwrap();
    assert!(peak > 0, "the cache never filled");
    assert_eq!(sim.connects, connects, "the session was dropped, not held");
    let (m, _, _) = server.view.snapshot();
    let cache_errors = ferry_dataplane::metrics::ERROR_KINDS
        .iter()
        .position(|k| *k == "cache")
        .map(|i| m.errors[i]);
    assert_eq!(cache_errors, Some(0), "no session ended for want of cache");
    server.stop();
    let store = Store::with_object_store(inner, "memory");
    let points = verify(&store, &vault, &sim).unwrap();
    assert_eq!(points, 9);
}

/// Storage refuses one disk's objects (its prefix): that disk holds back only itself.
/// Another disk on the same shard goes on uploading, the alert is set, the failing
/// disk's writes are still acknowledged from the cache, and once its storage works
/// again it catches up; every point of both rebuilds.
#[test]
fn a_disk_whose_uploads_fail_holds_back_only_itself() {
    let mut s = site(1, |_| {});
    let (target, fault, server) = (s.target.clone(), s.fault.clone(), s.server);
    let rt = compio::runtime::Runtime::new().unwrap();
    let mut bad = SimDisk::new("agent-0", "bad", 2 << 20, true);
    let mut good = SimDisk::new("agent-0", "good", 2 << 20, true);
    rt.block_on(async {
        for sim in [&mut bad, &mut good] {
            round(sim, &mut s.rng);
            sim.finish(&target, Duration::from_secs(20)).await.unwrap();
        }
    });
    *fault.outage_under.lock().unwrap() = Some("machines/agent-0/disks/bad/".into());
    rt.block_on(async {
        for _ in 0..3 {
            for sim in [&mut bad, &mut good] {
                round(sim, &mut s.rng);
                // Acknowledged durable, storage or not.
                sim.pump(&target, Duration::from_secs(20)).await.unwrap();
                // Past the batching delay: the bad disk's writes are a batch of their
                // own, whose every upload fails, and yet the others go on.
                compio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        // Every write of the good disk reaches storage while the bad one's cannot.
        good.finish(&target, Duration::from_secs(20)).await.unwrap();
    });
    let (_, g, h) = server.view.snapshot();
    assert!(
        g.store_failing,
        "the alert is set while a disk cannot upload"
    );
    assert_eq!(g.failing_disks, 1, "one disk is held back");
    assert!(g.upload_lag_s > 0.0, "the bad disk's writes are waiting");
    says(&h, "blob storage is failing for 1 disk(s)");

    *fault.outage_under.lock().unwrap() = None;
    rt.block_on(async {
        round(&mut bad, &mut s.rng);
        bad.finish(&target, Duration::from_secs(30)).await.unwrap();
    });
    // The alert clears first, then the count is published: both waited for.
    wait_for(
        "the alert to clear once the disk caught up",
        Duration::from_secs(10),
        || {
            let g = server.view.snapshot().1;
            !g.store_failing && g.failing_disks == 0
        },
    );
    server.stop();
    let store = Store::with_object_store(s.inner.clone(), "memory");
    assert_eq!(verify(&store, &s.vault, &good).unwrap(), 4);
    assert_eq!(verify(&store, &s.vault, &bad).unwrap(), 5);
}

/// Storage down for all of several disks on one shard, then back: the stuck disks are
/// retried together and every point of every disk rebuilds.
#[test]
fn an_outage_of_several_disks_is_caught_up_in_full() {
    let mut s = site(1, |_| {});
    let (target, fault, server) = (s.target.clone(), s.fault.clone(), s.server);
    let rt = compio::runtime::Runtime::new().unwrap();
    let mut sims: Vec<SimDisk> = (0..3)
        .map(|i| SimDisk::new("agent-0", &format!("d{i}"), 2 << 20, true))
        .collect();
    // A disk's first session reads its state from the store: before the outage.
    rt.block_on(async {
        for sim in sims.iter_mut() {
            round(sim, &mut s.rng);
            sim.finish(&target, Duration::from_secs(20)).await.unwrap();
        }
    });
    fault.outage.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for _ in 0..3 {
            for sim in sims.iter_mut() {
                round(sim, &mut s.rng);
                sim.pump(&target, Duration::from_secs(20)).await.unwrap();
                // Time for the uploads of this round to be tried and fail.
                compio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    wait_ok(
        "every disk to be held back",
        Duration::from_secs(10),
        || match server.view.snapshot().1.failing_disks {
            3 => Ok(()),
            held => Err(held),
        },
    );
    fault.outage.store(false, Ordering::SeqCst);
    rt.block_on(async {
        for sim in sims.iter_mut() {
            sim.finish(&target, Duration::from_secs(30)).await.unwrap();
        }
    });
    wait_for("no disk failing", Duration::from_secs(10), || {
        server.view.snapshot().1.failing_disks == 0
    });
    server.stop();
    let store = Store::with_object_store(s.inner.clone(), "memory");
    for sim in &sims {
        assert_eq!(verify(&store, &s.vault, sim).unwrap(), 4);
    }
}

/// A disk grows between sessions; the first point after that is cached while storage
/// fails, so the disk's uploader is reopened from the store before the point lands.
/// The point still records the new size (its bookmark names it, not the Hello the
/// reopened uploader never saw) and rebuilds whole.
#[test]
fn a_point_keeps_its_disk_size_when_the_upload_is_retried() {
    let mut s = site(1, |_| {});
    let (target, fault, server) = (s.target.clone(), s.fault.clone(), s.server);
    let rt = compio::runtime::Runtime::new().unwrap();
    let mut sim = SimDisk::new("agent-0", "d", 2 << 20, true);
    rt.block_on(async {
        round(&mut sim, &mut s.rng);
        sim.finish(&target, Duration::from_secs(20)).await.unwrap();
        // The next session announces 3 MiB; its writes beyond the old end upload
        // (and the Hello with them) before any point is taken, the session open.
        sim.resize(3 << 20);
        sim.write((2 << 20) + 4096, &[7; 8192]);
        sim.settle(&target, Duration::from_secs(20)).await.unwrap();
    });
    fault.outage.store(true, Ordering::SeqCst);
    rt.block_on(async {
        sim.write((3 << 20) - 512, &[9; 512]);
        sim.bookmark(0);
        sim.pump(&target, Duration::from_secs(20)).await.unwrap();
    });
    wait_for(
        "the point's upload to fail",
        Duration::from_secs(10),
        || server.view.snapshot().1.store_failing,
    );
    fault.outage.store(false, Ordering::SeqCst);
    rt.block_on(async {
        sim.finish(&target, Duration::from_secs(30)).await.unwrap();
    });
    server.stop();
    let store = Store::with_object_store(s.inner.clone(), "memory");
    assert_eq!(verify(&store, &s.vault, &sim).unwrap(), 2);
}

#[test]
fn an_upload_whose_reply_outlives_the_grace_is_redone_not_committed() {
    let grace = Duration::from_millis(200);
    let mut s = site(1, |o| o.orphan_grace = grace);
    let (target, fault, server) = (s.target.clone(), s.fault.clone(), s.server);
    // The first segment lands at once but its reply comes twice the grace late: by
    // then compaction may have swept it as an orphan.
    *fault.slow_puts.lock().unwrap() = Some(ferry_replica::fault::SlowPuts {
        under: "machines/agent-0/disks/d/log/".into(),
        count: 1,
        delay: grace * 2,
    });
    let rt = compio::runtime::Runtime::new().unwrap();
    let mut sim = SimDisk::new("agent-0", "d", 2 << 20, true);
    rt.block_on(async {
        round(&mut sim, &mut s.rng);
        round(&mut sim, &mut s.rng);
        sim.finish(&target, Duration::from_secs(20)).await.unwrap();
    });
    server.stop();
    let late = fault.slowed.lock().unwrap().clone();
    assert_eq!(late.len(), 1, "one reply was slowed");
    let store = Store::with_object_store(s.inner.clone(), "memory");
    let disk = store
        .block(ferry_replica::Disk::open(
            &store,
            "agent-0",
            "d",
            Some(&s.vault),
        ))
        .unwrap();
    let state = store.block(disk.load_state()).unwrap();
    assert!(
        !state.referenced().contains(&late[0]),
        "the late segment was committed"
    );
    assert_eq!(verify(&store, &s.vault, &sim).unwrap(), 2);
    // Compaction with the same grace sweeps it; every point still rebuilds (the
    // simulated bookmarks carry early times: keep them all).
    std::thread::sleep(grace);
    let opts = ferry_replica::compact::CompactOptions {
        keep: chrono::Duration::days(365 * 200),
        now: chrono::Utc::now(),
        orphan_grace: chrono::Duration::from_std(grace).unwrap(),
    };
    ferry_replica::compact::compact(&disk, &opts).unwrap();
    assert!(store.block(store.get_opt(&late[0])).unwrap().is_none());
    assert_eq!(verify(&store, &s.vault, &sim).unwrap(), 2);
}
