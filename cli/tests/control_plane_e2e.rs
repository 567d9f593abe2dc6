//! The control plane with real processes end to end: `ferry control-plane`, two
//! process servers and three agents that enroll with one-time tokens (no hand-made
//! certificate), the agents written through NBD with qemu-io, a policy PATCH that
//! reaches the running agents at their next heartbeat, the control plane's RPO
//! against the agents' own, an operator's `move` to the other process server after
//! which every point still rebuilds byte-identical, and a removal after which the
//! process server refuses the machine's certificate. While the control plane is
//! killed (-9) as the agents write, replication and points go on and an agent
//! restarts with the orders it kept; restarted, the control plane has its state. The
//! same suite on SQLite and, with FERRY_TEST_DATABASE, on PostgreSQL.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_replica::{Store, VaultKey};
use ferry_testkit::cli::{status, wait_uploaded};
use ferry_testkit::control::{process_server, Agent, Cp};
use ferry_testkit::net::free_addr;
use ferry_testkit::process::run_ok;
use ferry_testkit::{wait_for, wait_ok};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const DISK_BYTES: u64 = 8 << 20;

fn bin() -> &'static Path {
    Path::new(FERRY)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Distinct newest points the agent reports over `span`.
fn points_seen(sock: &Path, span: Duration) -> usize {
    let mut ids = std::collections::BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < span {
        if let Some(p) = status(bin(), sock)["last_point"].as_str() {
            ids.insert(p.to_string());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ids.len()
}

/// The control plane's `rpo_seconds` for each machine agrees with the agent's own
/// figure (now minus the time of its newest point in the store) within one heartbeat
/// interval: the control plane's is as of the last heartbeat, at most one interval
/// old, plus the time between the two readings and half a second for the
/// heartbeat's own round trip (the next one is due an interval after the answer).
/// Several samples each.
fn rpo_agrees(cp: &Cp, agents: &[Agent]) {
    for a in agents {
        for _ in 0..3 {
            let (own, theirs, between) = wait_ok(
                &format!("an RPO from {} and from the control plane", a.name),
                Duration::from_secs(30),
                || {
                    let t0 = Instant::now();
                    let st = status(bin(), &a.sock);
                    let m = cp.machine(&a.name);
                    match (st["rpo_s"].as_f64(), m["rpo_seconds"].as_f64()) {
                        (Some(own), Some(theirs)) => Ok((own, theirs, t0.elapsed().as_secs_f64())),
                        _ => Err((st, m)),
                    }
                },
            );
            // The control plane knows the newest upload as of the last heartbeat (every
            // 5 s); 2 s more for a point taken and uploaded between the two reads.
            let interval = 5.0;
            assert!(
                (theirs - own).abs() <= interval + between + 2.0,
                "{}: the control plane's RPO {theirs} s, the agent's {own} s ({between} s apart)",
                a.name
            );
            std::thread::sleep(Duration::from_millis(700));
        }
    }
}

/// The tests of this file that start a whole site take turns: CI has two cores.
static SITE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn end_to_end_on_sqlite() {
    let _turn = SITE.lock().unwrap_or_else(|e| e.into_inner());
    enrolled_parts_follow_policies_moves_and_a_control_plane_kill(None);
}

#[test]
fn end_to_end_on_postgres() {
    // Declared first, dropped last: every process of the test's site is gone by
    // then, so nothing holds the database.
    let Some(db) = ferry_testkit::postgres::fresh("ferry_e2e", "the end-to-end suite") else {
        return;
    };
    let _turn = SITE.lock().unwrap_or_else(|e| e.into_inner());
    enrolled_parts_follow_policies_moves_and_a_control_plane_kill(Some(&db.url));
}

fn enrolled_parts_follow_policies_moves_and_a_control_plane_kill(database: Option<&str>) {
    let seed = ferry_testkit::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cp_listen = free_addr().to_string();
    let mut cp = Cp::start(bin(), &d.join("cp"), &cp_listen, database);
    std::fs::create_dir_all(d.join("store")).unwrap();
    let store = format!("file://{}", s(&d.join("store")));
    run_ok(bin(), &["keygen", "--out", &s(&d.join("vault.key"))]);

    let (_ps1, addr1) = process_server(&cp, d, "ps1", &store, None);
    let (_ps2, addr2) = process_server(&cp, d, "ps2", &store, None);
    assert_eq!(mode(&d.join("cache-ps1/identity/key.pem")), 0o600);
    let address = |ps: &str| if ps == "ps1" { &addr1 } else { &addr2 }.clone();

    // Three agents enroll; each starts once its first heartbeat names a process
    // server, the least loaded: both are used.
    let mut agents: Vec<Agent> = ["m1", "m2", "m3"]
        .iter()
        .map(|name| Agent::enroll(&cp, d, name, DISK_BYTES, &mut rng))
        .collect();
    let a = &agents[0];
    assert_eq!(
        mode(&a.state.join("key.pem")),
        0o600,
        "the key is the host's only"
    );
    for f in ["cert.pem", "ca.pem", "orders.json", "journal"] {
        assert!(a.state.join(f).exists(), "{f} in the state directory");
    }
    let placed: Vec<String> = agents
        .iter()
        .map(|a| {
            wait_ok(
                &format!("{} assigned", a.name),
                Duration::from_secs(30),
                || {
                    let m = cp.machine(&a.name);
                    m["process_server"].as_str().map(str::to_string).ok_or(m)
                },
            )
        })
        .collect();
    let used: std::collections::BTreeSet<&String> = placed.iter().collect();
    assert_eq!(used.len(), 2, "the least loaded each time: {placed:?}");

    for a in &mut agents {
        wait_uploaded(bin(), &a.sock);
        a.write_and_point(bin(), &mut rng, "first");
    }

    // A policy change reaches the running agents at their next heartbeat: the
    // default policy's 5 s becomes half a second.
    let (st, p) = cp.api(
        "PATCH",
        "/v1/policies/default",
        Some(json!({ "crash_point_interval_s": 0.5 })),
    );
    assert_eq!(st, 200, "{p}");
    for a in &agents {
        wait_for(
            &format!("points every half second on {}", a.name),
            Duration::from_secs(30),
            || points_seen(&a.sock, Duration::from_secs(2)) >= 3,
        );
    }
    rpo_agrees(&cp, &agents);

    // The operator moves the first machine; its agent reconnects there, nothing lost,
    // while the others write on.
    let (moved, from) = (agents[0].name.clone(), placed[0].clone());
    let to = if from == "ps1" { "ps2" } else { "ps1" };
    cp.cli(&["machines", "move", &moved, "--to", to]);
    for round in 0..2 {
        for a in &mut agents {
            a.write_and_point(bin(), &mut rng, &format!("moving-{round}"));
        }
    }
    wait_for("the move in the registry", Duration::from_secs(60), || {
        cp.machine(&moved)["process_server"] == json!(to)
    });
    wait_for(
        "the agent to take the move",
        Duration::from_secs(30),
        || agents[0].orders()["process_server"]["address"] == json!(address(to)),
    );
    for a in &mut agents {
        a.write_and_point(bin(), &mut rng, "after-move");
        wait_uploaded(bin(), &a.sock);
    }

    // The control plane is killed while the agents write: replication and points go
    // on, at the half second the agents were told.
    let writers: Vec<_> = agents
        .into_iter()
        .map(|mut a| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(rng.gen());
            std::thread::spawn(move || {
                for round in 0..3 {
                    a.write_and_point(bin(), &mut rng, &format!("control-plane-down-{round}"));
                }
                a
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    cp.child.kill();
    let mut agents: Vec<Agent> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    for a in &agents {
        wait_uploaded(bin(), &a.sock);
        // Sampled by starting `ferry agent ctl` processes: polled, as above, since a
        // busy machine can stretch one sample's two seconds.
        wait_for(
            &format!(
                "{}: points every half second with the control plane down",
                a.name
            ),
            Duration::from_secs(30),
            || points_seen(&a.sock, Duration::from_secs(2)) >= 3,
        );
    }
    // An agent restarted meanwhile starts with the orders it kept.
    agents[1].restart(&cp, d);
    agents[1].write_and_point(bin(), &mut rng, "restarted-without-control-plane");
    wait_uploaded(bin(), &agents[1].sock);
    assert_eq!(
        agents[1].orders()["process_server"]["address"],
        json!(address(&placed[1]))
    );

    // Back on the same state and database, it has all of it, and the heartbeats
    // resume.
    let cp = Cp::start(bin(), &d.join("cp"), &cp_listen, database);
    let (st, list) = cp.api("GET", "/v1/machines", None);
    assert_eq!(st, 200, "{list}");
    let text = list.to_string();
    for (a, ps) in agents.iter().zip(&placed) {
        assert!(
            text.contains(&format!("\"{}\"", a.name)),
            "{} in {text}",
            a.name
        );
        let ps = if a.name == moved { to } else { ps.as_str() };
        let m = cp.machine(&a.name);
        assert_eq!(m["process_server"], json!(ps), "{m}");
        assert_eq!(m["policy"], json!("default"), "{m}");
    }
    let (_, policy) = cp.api("GET", "/v1/policies/default", None);
    assert_eq!(policy["crash_point_interval_s"], json!(0.5), "{policy}");
    let (_, pss) = cp.api("GET", "/v1/process-servers", None);
    for ps in ["ps1", "ps2"] {
        assert!(
            pss.to_string().contains(&format!("\"{ps}\"")),
            "{ps} in {pss}"
        );
    }
    let (_, events) = cp.api("GET", "/v1/events?limit=1000", None);
    assert!(
        events
            .to_string()
            .contains(&format!("moved from process server {from} to {to}")),
        "the move's event in {events}"
    );
    let seen: Vec<Value> = agents
        .iter()
        .map(|a| cp.machine(&a.name)["last_seen"].clone())
        .collect();
    for (a, before) in agents.iter().zip(&seen) {
        wait_for(
            &format!("a heartbeat from {} after the restart", a.name),
            Duration::from_secs(30),
            || cp.machine(&a.name)["last_seen"] != *before,
        );
    }
    rpo_agrees(&cp, &agents[..1]);

    // Every point of every machine rebuilds its disk as it was.
    let vault = VaultKey::load(&d.join("vault.key")).unwrap();
    let store = Store::open(&store).unwrap();
    for a in &agents {
        a.assert_points_rebuild(&store, &vault);
    }

    // Removed, the machine's certificate is revoked: the process server learns it
    // at its next heartbeat and closes the agent's session, with the reason.
    cp.cli(&["machines", "remove", &moved]);
    wait_for(
        "the process server to refuse the removed machine",
        Duration::from_secs(60),
        || {
            let st = status(bin(), &agents[0].sock);
            st["connected"] == false
                && st["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("revoked"))
        },
    );
}

#[test]
fn a_renewed_certificate_replaces_the_old_one_and_heartbeats_go_on_with_it() {
    use ferry_link::control::client::{ControlClient, Enrollment};
    use ferry_link::control::wire::{AgentHeartbeat, AgentOrders, Kind};

    let tmp = tempfile::tempdir().unwrap();
    let cp = Cp::start(bin(), &tmp.path().join("cp"), "127.0.0.1:0", None);
    let state = tmp.path().join("m2");
    let enrollment = Enrollment {
        urls: vec![cp.url.clone()],
        ca: cp.ca.clone(),
        kind: Kind::Agent,
        name: "m2".into(),
        advertise: None,
        dir: state.clone(),
    };
    let token = cp.enroll_token("agent");
    let mut client = ControlClient::open(&enrollment, Some(&token)).unwrap();
    // The token works once.
    let again = ControlClient::open(
        &Enrollment {
            dir: tmp.path().join("m2-again"),
            ..enrollment.clone()
        },
        Some(&token),
    );
    assert!(again.is_err(), "a used token enrolled again");

    let heartbeat = |c: &ControlClient| {
        c.call::<_, AgentOrders>(
            "/v1/heartbeat/agent",
            &AgentHeartbeat {
                machine: "m2".into(),
                disks: vec![],
                process_server: None,
                last_error: None,
                group_listen: None,
                failover: None,
            },
        )
    };
    heartbeat(&client).unwrap();
    let (cert, key) = (
        std::fs::read_to_string(state.join("cert.pem")).unwrap(),
        std::fs::read_to_string(state.join("key.pem")).unwrap(),
    );
    let v = client.validity();
    assert!(!client.renew_if_due(v.issued_at).unwrap(), "not due yet");
    assert!(
        client.renew_if_due(v.renew_at()).unwrap(),
        "due at two thirds"
    );
    assert_ne!(
        std::fs::read_to_string(state.join("cert.pem")).unwrap(),
        cert
    );
    assert_ne!(std::fs::read_to_string(state.join("key.pem")).unwrap(), key);
    assert_eq!(mode(&state.join("key.pem")), 0o600);
    heartbeat(&client).unwrap();
    // And a restart loads the renewed identity without a token.
    let reopened = ControlClient::open(&enrollment, None).unwrap();
    heartbeat(&reopened).unwrap();
}
