//! The agent under a control plane's orders, applied while it runs (the heartbeat
//! thread's `apply`, without an HTTP round trip): a new crash-point interval takes
//! effect without a restart, and a move to another process server reconnects every
//! sender there with every point still rebuilding byte-identical from the store.

use std::time::{Duration, Instant};

use ferry_agent::live::control::{load_orders, Controlled};
use ferry_agent::live::Agent;
use ferry_link::control::client::{Heartbeater, IdentityFiles};
use ferry_link::control::wire::{AgentOrders, AgentPolicy, ProcessServerRef};
use ferry_testkit::qemu::{qemu_io, random_writes};
use ferry_testkit::site::{point_when_ready, site, wait_uploaded, Site, DISK_BYTES};
use ferry_testkit::wait_for;

fn orders(ps: Option<(&str, std::net::SocketAddr)>, interval_s: f64) -> AgentOrders {
    with_app(ps, interval_s, 0)
}

fn with_app(ps: Option<(&str, std::net::SocketAddr)>, interval_s: f64, app_s: u64) -> AgentOrders {
    AgentOrders {
        process_server: ps.map(|(name, addr)| ProcessServerRef {
            name: name.into(),
            address: addr.to_string(),
        }),
        policy: AgentPolicy {
            name: "default".into(),
            crash_point_interval_s: interval_s,
            app_point_interval_s: app_s,
        },
        group: None,
        heartbeat_interval_s: 5.0,
    }
}

/// agent-0's certificate from the site's PKI, as enrollment would have left it.
fn identity(w: &Site) -> IdentityFiles {
    let pki = w.path("pki");
    IdentityFiles {
        key: pki.join("agent-0.key"),
        cert: pki.join("agent-0.pem"),
        ca: pki.join("ca.pem"),
        issued: pki.join("issued.json"),
    }
}

fn newest_point(c: &mut Controlled) -> Option<String> {
    c.report().disks[0]
        .newest_point
        .as_ref()
        .map(|p| p.id.clone())
}

#[test]
fn a_new_crash_point_interval_applies_without_a_restart() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let server = w.server("127.0.0.1:0".parse().unwrap());
    let disk = w.disk(&mut rng, 0..1 << 20);
    let agent = Agent::start(w.options(0, &disk, server.addr)).unwrap();
    let first = orders(Some(("ps1", server.addr)), 0.0);
    let mut c = Controlled::new(
        agent.clone(),
        "agent-0".into(),
        identity(&w),
        w.path("orders.json"),
        first.clone(),
    );
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(newest_point(&mut c), None, "no interval, no points");

    // The policy now asks for a point every half second.
    assert_eq!(c.apply(orders(Some(("ps1", server.addr)), 0.5)), 5.0);
    assert_eq!(
        agent.crash_point_interval(),
        Some(Duration::from_millis(500))
    );
    assert_eq!(
        load_orders(&w.path("orders.json"))
            .unwrap()
            .policy
            .crash_point_interval_s,
        0.5,
        "kept for a restart"
    );
    let start = Instant::now();
    wait_for("a crash point", Duration::from_secs(10), || {
        newest_point(&mut c).is_some()
    });
    let mut ids = std::collections::BTreeSet::new();
    while start.elapsed() < Duration::from_secs(3) {
        if let Some(id) = newest_point(&mut c) {
            ids.insert(id);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ids.len() >= 4, "points every 0.5 s: {ids:?}");

    // And none again.
    c.apply(first);
    assert_eq!(agent.crash_point_interval(), None);
    std::thread::sleep(Duration::from_millis(700));
    let last = newest_point(&mut c);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        newest_point(&mut c),
        last,
        "no point after the interval went"
    );
    agent.stop();
}

#[test]
fn app_consistent_points_follow_the_policy_through_the_freeze_hook() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let server = w.server("127.0.0.1:0".parse().unwrap());
    let disk = w.disk(&mut rng, 0..1 << 20);
    let hook_log = w.path("hook.log");
    let hook = w.path("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$1\" >> {}\n", hook_log.display()),
    )
    .unwrap();
    let mut o = w.options(0, &disk, server.addr);
    o.freeze_hook = Some(format!("sh {}", hook.display()));
    let agent = Agent::start(o).unwrap();
    let ps = Some(("ps1", server.addr));
    let mut c = Controlled::new(
        agent.clone(),
        "agent-0".into(),
        identity(&w),
        w.path("orders.json"),
        orders(ps, 0.0),
    );
    c.apply(with_app(ps, 0.0, 1));
    assert_eq!(agent.app_point_interval(), Some(Duration::from_secs(1)));
    wait_for("an app-consistent point", Duration::from_secs(10), || {
        c.report().disks[0]
            .newest_point
            .as_ref()
            .is_some_and(|p| p.kind == "app")
    });
    let log = std::fs::read_to_string(&hook_log).unwrap();
    assert!(log.starts_with("freeze\nthaw\n"), "{log:?}");
    c.apply(orders(ps, 0.0));
    assert_eq!(agent.app_point_interval(), None);
    std::thread::sleep(Duration::from_millis(300));
    let frozen = std::fs::read_to_string(&hook_log).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        std::fs::read_to_string(&hook_log).unwrap(),
        frozen,
        "no freeze once the policy has no app-consistent points"
    );
    agent.stop();
}

#[test]
fn a_move_to_another_process_server_keeps_every_point_byte_identical() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let ps1 = w.server("127.0.0.1:0".parse().unwrap());
    let cache2 = w.path("cache2");
    let ps2 = w.server_with("127.0.0.1:0".parse().unwrap(), |o| o.cache_dir = cache2);
    let disk = w.disk(&mut rng, 0..4 << 20);
    let mut o = w.options(0, &disk, ps1.addr);
    o.initial_copy = true;
    let agent = Agent::start(o).unwrap();
    let mut c = Controlled::new(
        agent.clone(),
        "agent-0".into(),
        identity(&w),
        w.path("orders.json"),
        orders(Some(("ps1", ps1.addr)), 0.0),
    );
    let nbd = format!("nbd://{}/sda", agent.nbd_addr);
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    let first = point_when_ready(&agent, "before");
    expected.push((first, std::fs::read(&disk).unwrap()));
    qemu_io(&nbd, &random_writes(&mut rng, DISK_BYTES, 30, 1..=8));
    let id = agent.bookmark(false, Some("on-ps1")).unwrap();
    expected.push((id, std::fs::read(&disk).unwrap()));
    wait_for("a session with ps1", Duration::from_secs(30), || {
        ps1.registry.connected_machines() == ["agent-0"]
    });
    assert_eq!(c.report().process_server.as_deref(), Some("ps1"));

    // The operator's move: writes go on while the sender drains to ps1 and
    // reconnects to ps2.
    c.apply(orders(Some(("ps2", ps2.addr)), 0.0));
    assert_eq!(agent.target().addr, ps2.addr);
    for round in 0..3 {
        qemu_io(&nbd, &random_writes(&mut rng, DISK_BYTES, 30, 1..=8));
        let id = agent
            .bookmark(false, Some(&format!("moving-{round}")))
            .unwrap();
        expected.push((id, std::fs::read(&disk).unwrap()));
    }
    wait_for("a session with ps2 only", Duration::from_secs(60), || {
        ps2.registry.connected_machines() == ["agent-0"]
            && ps1.registry.connected_machines().is_empty()
    });
    qemu_io(&nbd, &random_writes(&mut rng, DISK_BYTES, 30, 1..=8));
    let last = agent.bookmark(false, Some("on-ps2")).unwrap();
    expected.push((last.clone(), std::fs::read(&disk).unwrap()));
    wait_uploaded(&[&agent]);
    let hb = c.report();
    assert_eq!(hb.process_server.as_deref(), Some("ps2"));
    let d = &hb.disks[0];
    assert_eq!(d.state, "protected");
    assert_eq!(d.initial_copy_percent, 100.0);
    assert_eq!(
        d.newest_point.as_ref().map(|p| p.id.as_str()),
        Some(last.as_str())
    );
    assert_eq!(
        d.newest_uploaded_point.as_ref().map(|p| p.id.as_str()),
        Some(last.as_str()),
        "the control plane's RPO is measured from this point"
    );
    agent.stop();
    let refs: Vec<(&str, &[u8])> = expected
        .iter()
        .map(|(id, b)| (id.as_str(), b.as_slice()))
        .collect();
    w.assert_points(&refs);
    let (_s, _r, state) = w.replica("agent-0");
    assert_eq!(state.points.len(), expected.len(), "no point lost or added");
}
