//! `ferry process-server` as a real process, killed with SIGKILL at random moments
//! while agents replicate, then restarted on the same port with the same cache: the
//! agents reconnect and resend from the durable watermark, and afterwards every
//! acknowledged write is in the rebuilt disk and every point rebuilds identical.
//! Seeded: FERRY_SEED=N replays the workload and the kill times.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_replica::{Store, VaultKey};
use ferry_testkit::pki::agent_target;
use ferry_testkit::process::{run_ok, spawn, Killed};
use ferry_testkit::sim::{verify, SimDisk};
use rand::{Rng, SeedableRng};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const SIZE: usize = 4 << 20;

fn run(args: &[&str]) {
    run_ok(Path::new(FERRY), args);
}

/// Starts the server and waits for its "listening" line.
fn start(dir: &Path, port: u16) -> Killed {
    let s = |p: &str| dir.join(p).display().to_string();
    let listen = format!("127.0.0.1:{port}");
    let store = format!("file://{}", s("store"));
    let args = [
        "process-server",
        "--listen",
        &listen,
        "--cache-dir",
        &s("cache"),
        "--store",
        &store,
        "--key-file",
        &s("vault.key"),
        "--tls-cert",
        &s("pki/server.pem"),
        "--tls-key",
        &s("pki/server.key"),
        "--client-ca",
        &s("pki/ca.pem"),
        "--shards",
        "2",
        "--batch-ms",
        "20",
        "--cache-gib",
        "0.25",
    ];
    let (child, line) = spawn(Path::new(FERRY), &args);
    assert!(line.contains("listening on"), "{line}");
    child
}

/// Kills the current server when the test ends, passing or failing: a server left
/// behind holds the test's stderr and would hang the run.
struct KillOnDrop(Arc<Mutex<Killed>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(mut c) = self.0.lock() {
            c.kill();
        }
    }
}

#[test]
fn sigkill_of_the_process_server_loses_no_acknowledged_write() {
    let seed = ferry_testkit::seed();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("store")).unwrap();
    run(&[
        "certs",
        "--out",
        &d.join("pki").display().to_string(),
        "--agents",
        "2",
    ]);
    run(&[
        "keygen",
        "--out",
        &d.join("vault.key").display().to_string(),
    ]);
    let port = ferry_testkit::net::free_port();
    let server = Arc::new(Mutex::new(start(d, port)));
    let _guard = KillOnDrop(server.clone());
    let done = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU64::new(0));
    let killer = {
        let (server, done, kills, dir) =
            (server.clone(), done.clone(), kills.clone(), d.to_path_buf());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
            while kills.load(Ordering::SeqCst) < 4 && !done.load(Ordering::SeqCst) {
                // The kill's random moment is the behaviour under test, not a wait.
                std::thread::sleep(Duration::from_millis(rng.gen_range(200..1200)));
                let mut s = server.lock().unwrap();
                s.0.kill().unwrap();
                s.0.wait().unwrap();
                kills.fetch_add(1, Ordering::SeqCst);
                // Down for a moment: agents see refused connections and retry.
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
                *s = start(&dir, port);
            }
        })
    };

    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let target = |i: usize| agent_target(&d.join("pki"), i, addr);
    let rt = compio::runtime::Runtime::new().unwrap();
    let sims = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..2 {
            let t = target(i as usize);
            let kills = kills.clone();
            tasks.push(compio::runtime::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + i);
                let mut sim = SimDisk::new(&format!("agent-{i}"), "disk", SIZE, true);
                let mut rounds = 0;
                // Keep writing until the server has been killed four times.
                while kills.load(Ordering::SeqCst) < 4 || rounds < 5 {
                    for _ in 0..100 {
                        let len = rng.gen_range(1..=64) * 512;
                        let off = rng.gen_range(0..(SIZE - len) / 512) as u64 * 512;
                        let data: Vec<u8> = if rng.gen_bool(0.5) {
                            (0..len).map(|_| rng.gen()).collect()
                        } else {
                            vec![rng.gen(); len]
                        };
                        sim.write(off, &data);
                    }
                    sim.bookmark(rounds);
                    sim.pump(&t, Duration::from_secs(60)).await.unwrap();
                    rounds += 1;
                    assert!(rounds < 2000, "the killer never finished");
                }
                sim
            }));
        }
        let mut sims = Vec::new();
        for t in tasks {
            sims.push(t.await.unwrap());
        }
        sims
    });
    done.store(true, Ordering::SeqCst);
    killer.join().unwrap();
    // Let the last server upload everything, then stop it for good.
    let mut sims = rt.block_on(async move {
        let mut out = Vec::new();
        for (i, mut sim) in sims.into_iter().enumerate() {
            sim.finish(&target(i), Duration::from_secs(60))
                .await
                .unwrap();
            out.push(sim);
        }
        out
    });
    {
        let mut s = server.lock().unwrap();
        s.0.kill().unwrap();
        s.0.wait().unwrap();
    }
    let store = Store::open(&format!("file://{}", d.join("store").display())).unwrap();
    let vault = VaultKey::load(&d.join("vault.key")).unwrap();
    for sim in &mut sims {
        let points = verify(&store, &vault, sim).unwrap();
        eprintln!(
            "{}: {} points identical, {} connections, {} bytes written",
            sim.machine, points, sim.connects, sim.bytes
        );
        assert!(sim.connects > 1, "the agent had to reconnect");
    }
    assert_eq!(kills.load(Ordering::SeqCst), 4);
}
