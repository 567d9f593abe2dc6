//! Fencing a moved disk (docs/storage-format.md 3, "Fencing"): two process servers on
//! one store. The agent writes through A, which acknowledges but has not uploaded; A
//! stops with its cache intact; the agent moves to B, which claims the disk, and
//! resyncs. A, started again with its old cache, must commit nothing (it is fenced and
//! says so), and when the agent comes back to A, what A cached under its first claim
//! is dropped, never uploaded. Every point rebuilds identical to the model. The same
//! server restarting with its cache and its claim uploads what it holds.

use std::sync::Arc;
use std::time::Duration;

use ferry_dataplane::server::{Options, Running};
use ferry_replica::{Disk, DiskState, Store, VaultKey};
use ferry_testkit::pki::Pki;
use ferry_testkit::sim::{verify, SimDisk};
use ferry_testkit::{pki, server, wait_for};
use rand::{Rng, SeedableRng};

const SIZE: usize = 2 << 20;

fn round(sim: &mut SimDisk, rng: &mut impl Rng) -> String {
    for _ in 0..50 {
        let len = rng.gen_range(1..=32) * 512;
        let off = rng.gen_range(0..(SIZE - len) / 512) as u64 * 512;
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        sim.write(off, &data);
    }
    sim.bookmark(0)
}

/// Ends the agent's session (as a move to another server does): the next pump
/// connects to whatever target it is given.
fn disconnect(sim: &mut SimDisk) {
    sim.resize(sim.model.len());
}

/// What an agent does when a server is below its journal (docs/protocol.md, Session
/// 2): it numbers on from the server's `durable` and resyncs, here by sending the
/// whole disk. Points that never reached the replica are gone from it.
fn resync_from(sim: &mut SimDisk, durable: u64, in_replica: &DiskState) {
    sim.next_seq = durable;
    sim.points.retain(|id, _| in_replica.point(id).is_some());
    let model = sim.model.clone();
    for (i, chunk) in model.chunks(64 << 10).enumerate() {
        sim.write((i * (64 << 10)) as u64, chunk);
    }
}

struct Site {
    dir: tempfile::TempDir,
    pki: Pki,
    vault: VaultKey,
    inner: Arc<dyn object_store::ObjectStore>,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki::pki(&dir.path().join("pki"));
        let (_, vault) = server::vault(dir.path());
        Site {
            dir,
            pki,
            vault,
            inner: Arc::new(object_store::memory::InMemory::new()),
        }
    }

    fn store(&self) -> Store {
        Store::with_object_store(self.inner.clone(), "memory")
    }

    /// Process server `name` with its own cache dir; `hold` keeps everything in the
    /// cache (acknowledged, not uploaded).
    fn serve(&self, name: &str, hold: bool) -> Running {
        let mut o: Options = server::options(&self.dir.path().join(name), 1);
        o.name = name.into();
        if hold {
            o.batch_delay = Duration::from_secs(3600);
            o.batch_bytes = 1 << 30;
        }
        server::serve(&self.pki, o, self.store(), server::vault(self.dir.path()).1)
    }

    fn state(&self) -> DiskState {
        let store = self.store();
        let disk = store
            .block(Disk::open(&store, "agent-0", "d", Some(&self.vault)))
            .unwrap();
        store.block(disk.load_state()).unwrap()
    }
}

const PATIENCE: Duration = Duration::from_secs(30);

/// Waits until `server` reports being fenced from the disk by `writer` in `epoch`,
/// with at least `bytes` dropped, and returns its report.
fn fenced(server: &Running, epoch: u64, writer: &str, bytes: u64) {
    wait_for("the fencing report", PATIENCE, || {
        let (f, _) = server.registry.fencings(32);
        f.first().is_some_and(|f| f.dropped_bytes >= bytes)
    });
    let (fenced, last) = server.registry.fencings(32);
    assert_eq!(fenced.len(), 1, "{fenced:?}");
    let f = &fenced[0];
    assert_eq!(
        (
            f.machine.as_str(),
            f.disk.as_str(),
            f.epoch,
            f.new_writer.as_str()
        ),
        ("agent-0", "d", epoch, writer)
    );
    // Answered by the control plane, it is reported no more.
    server.registry.fencings_answered(last.unwrap());
    assert!(server.registry.fencings(32).0.is_empty());
}

#[test]
fn a_fenced_server_commits_nothing_it_cached_and_reports_it() {
    let site = Site::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    let rt = compio::runtime::Runtime::new().unwrap();
    let mut sim = SimDisk::new("agent-0", "d", SIZE, true);
    let pump = |sim: &mut SimDisk, rng: &mut rand::rngs::StdRng, to: &Running| {
        let target = site.pki.target(to.addr, "agent-0");
        rt.block_on(async {
            let before = sim.bytes;
            round(sim, rng);
            sim.pump(&target, PATIENCE).await.unwrap();
            sim.bytes - before
        })
    };

    // A claims the disk and uploads a first round.
    let a = site.serve("ps-a", false);
    let to_a = site.pki.target(a.addr, "agent-0");
    rt.block_on(async {
        round(&mut sim, &mut rng);
        sim.finish(&to_a, PATIENCE).await.unwrap();
    });
    disconnect(&mut sim);
    a.stop();
    let first = site.state();
    assert!(first.held_by(1, Some("ps-a")), "{first:?}");

    // A again, same cache and claim: no new claim. It acknowledges a second round but
    // holds it in its cache.
    let a = site.serve("ps-a", true);
    let held_by_a = pump(&mut sim, &mut rng, &a);
    assert_eq!(sim.uploaded(), first.next_seq, "nothing more uploaded");
    disconnect(&mut sim);
    a.stop();
    assert_eq!(site.state(), first, "the restart made no claim");

    // The agent moves to B: B claims (epoch 2); its durable watermark is the
    // replica's, below the agent's journal, so the agent resyncs, then writes on. B
    // holds all that in its cache too.
    let b = site.serve("ps-b", true);
    resync_from(&mut sim, first.next_seq, &first);
    let held_by_b = pump(&mut sim, &mut rng, &b);
    disconnect(&mut sim);
    b.stop();
    let at_b = site.state();
    assert!(at_b.held_by(2, Some("ps-b")), "{at_b:?}");
    assert_eq!(at_b.next_seq, first.next_seq, "the claim commits no writes");

    // A comes back with its cache of acknowledged writes, whose sequence numbers are
    // at the replica's watermark: fenced, it commits none of them, drops them and
    // reports it.
    let a = site.serve("ps-a", false);
    fenced(&a, 2, "ps-b", held_by_a);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(site.state(), at_b, "the fenced server committed something");
    a.stop();

    // The agent moves back to A (A -> B -> A) while A's stale cache from its first
    // claim is still unread: A claims again (epoch 3) and the agent resyncs from the
    // replica's watermark. Restarted, A uploads the new claim's writes only.
    let a = site.serve("ps-a", true);
    resync_from(&mut sim, at_b.next_seq, &at_b);
    pump(&mut sim, &mut rng, &a);
    disconnect(&mut sim);
    a.stop();
    let again = site.state();
    assert!(again.held_by(3, Some("ps-a")), "{again:?}");
    let a = site.serve("ps-a", false);
    wait_for("A's new claim's writes to upload", PATIENCE, || {
        site.state().next_seq == sim.next_seq
    });
    assert!(site.state().held_by(3, Some("ps-a")));
    let points = verify(&site.store(), &site.vault, &sim).unwrap();
    assert_eq!(points, 2, "round 1 and round 4, both through A");

    // B comes back with its cache: fenced by A's epoch 3, it commits nothing.
    let before = site.state();
    let b = site.serve("ps-b", false);
    fenced(&b, 3, "ps-a", held_by_b);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        site.state(),
        before,
        "the fenced server committed something"
    );
    assert_eq!(verify(&site.store(), &site.vault, &sim).unwrap(), 2);
    b.stop();
    a.stop();
}

#[test]
fn the_same_server_restarting_with_its_cache_uploads_it() {
    let site = Site::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    let rt = compio::runtime::Runtime::new().unwrap();
    let mut sim = SimDisk::new("agent-0", "d", SIZE, true);
    let a = site.serve("ps-a", true);
    let to_a = site.pki.target(a.addr, "agent-0");
    rt.block_on(async {
        round(&mut sim, &mut rng);
        round(&mut sim, &mut rng);
        sim.pump(&to_a, PATIENCE).await.unwrap();
    });
    disconnect(&mut sim);
    a.stop();
    let claimed = site.state();
    assert!(claimed.held_by(1, Some("ps-a")) && claimed.next_seq == 0);

    // Started again with its cache: its claim is intact, so it uploads what it holds.
    let a = site.serve("ps-a", false);
    wait_for("the cached writes to upload", PATIENCE, || {
        site.state().next_seq == sim.next_seq
    });
    let after = site.state();
    assert!(after.held_by(1, Some("ps-a")), "no second claim: {after:?}");
    assert!(a.registry.fencings(32).0.is_empty(), "no false fencing");
    assert_eq!(verify(&site.store(), &site.vault, &sim).unwrap(), 2);
    a.stop();
}
