//! The agent under a control plane's orders, applied while it runs (the heartbeat
//! thread's `apply`, without an HTTP round trip): a new crash-point interval takes
//! effect without a restart, and a move to another process server reconnects every
//! sender there with every point still rebuilding byte-identical from the store; and
//! a group given by the orders (and taken away) while two agents run.

use std::time::{Duration, Instant};

use ferry_agent::live::control::{load_orders, Controlled};
use ferry_agent::live::group::{Coordinator, GroupPeer, Membership};
use ferry_agent::live::group_role::GroupRole;
use ferry_agent::live::Agent;
use ferry_link::control::client::{Heartbeater, IdentityFiles};
use ferry_link::control::wire::{AgentOrders, AgentPolicy, GroupMemberRef, ProcessServerRef};
use ferry_testkit::qemu::{qemu_io, random_writes};
use ferry_testkit::site::{point_when_ready, rebuilt, site, wait_uploaded, Site, DISK_BYTES};
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
        group_coordinator: None,
        group_members: Vec::new(),
        failover: None,
    }
}

/// agent-0's certificate from the site's PKI, as enrollment would have left it.
fn identity(w: &Site) -> IdentityFiles {
    identity_of(w, 0)
}

fn identity_of(w: &Site, i: usize) -> IdentityFiles {
    let pki = w.path("pki");
    IdentityFiles {
        key: pki.join(format!("agent-{i}.key")),
        cert: pki.join(format!("agent-{i}.pem")),
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
    // Four points take 1.5 s at 0.5 s, and 15 s at the default 5 s: six seconds tell
    // the two apart with room for a busy machine.
    let mut ids = std::collections::BTreeSet::new();
    while start.elapsed() < Duration::from_secs(6) && ids.len() < 4 {
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
    // The point is journaled (and reported) before the thaw runs.
    wait_for("the thaw after the point", Duration::from_secs(10), || {
        std::fs::read_to_string(&hook_log).is_ok_and(|l| l.contains("thaw"))
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

/// Two agents started under a control plane with no group (agent-1 with a group
/// listener, as `--group-listen` leaves it), then given group g1 by their orders: the
/// coordinator the orders name cuts group points with the member they list, both
/// hold each point under the same id and rebuild it exactly as their disks were at
/// the cut. Orders without the group end both roles, without a restart.
#[test]
fn a_group_given_by_the_orders_cuts_points_on_both_agents() {
    let w = site(2);
    let mut rng = w.rng.clone();
    let server = w.server("127.0.0.1:0".parse().unwrap());
    let mut agents = Vec::new();
    for i in 0..2 {
        let disk = w.path(&format!("disk{i}.img"));
        std::fs::write(&disk, vec![0u8; DISK_BYTES as usize]).unwrap();
        let mut o = w.options(i, &disk, server.addr);
        o.group_listen = (i == 1).then(|| "127.0.0.1:0".parse().unwrap());
        o.group_tls = Some(w.group_tls(i));
        let agent = Agent::start(o).unwrap();
        let c = Controlled::new(
            agent.clone(),
            format!("agent-{i}"),
            identity_of(&w, i),
            w.path(&format!("orders{i}.json")),
            orders(Some(("ps1", server.addr)), 0.0),
        );
        agents.push((agent, c, disk));
    }
    let member_addr = agents[1].0.group_addr().unwrap();
    assert_eq!(agents[0].0.group_role(), GroupRole::None);
    assert_eq!(agents[0].1.report().group_listen, None);
    assert_eq!(
        agents[1].1.report().group_listen,
        Some(member_addr.to_string()),
        "the member reports where its coordinator reaches it"
    );
    // Not a member yet: a cut is refused.
    let a0 = agents[0].0.clone();
    let cut_by_agent_0 = |to: std::net::SocketAddr| {
        let peer = GroupPeer {
            name: "agent-1".into(),
            addr: to,
        };
        Coordinator::new("g1".into(), vec![peer], w.group_tls(0).coordinator)
            .cut(&*a0)
            .map_err(|e| e.to_string())
    };
    let e = cut_by_agent_0(member_addr).unwrap_err();
    assert!(e.contains("member of no group"), "{e}");

    // The control plane puts both in g1, agent-0 coordinating.
    let mut in_g1 = orders(Some(("ps1", server.addr)), 0.0);
    in_g1.group = Some("g1".into());
    in_g1.group_coordinator = Some("agent-0".into());
    agents[1].1.apply(in_g1.clone());
    in_g1.group_members = vec![GroupMemberRef {
        name: "agent-1".into(),
        address: member_addr.to_string(),
    }];
    agents[0].1.apply(in_g1.clone());
    assert_eq!(
        agents[0].0.group_role(),
        GroupRole::Coordinator {
            group: "g1".into(),
            peers: vec![GroupPeer {
                name: "agent-1".into(),
                addr: member_addr
            }]
        }
    );
    assert_eq!(
        agents[1].0.group_role(),
        GroupRole::Member(Membership {
            group: "g1".into(),
            coordinator: "agent-0".into()
        })
    );
    let mut want = Vec::new();
    for _ in 0..3 {
        for (a, _, _) in &agents {
            let nbd = format!("nbd://{}/sda", a.nbd_addr);
            qemu_io(&nbd, &random_writes(&mut rng, DISK_BYTES, 20, 1..=8));
        }
        let (id, _) = agents[0].0.group_point().unwrap();
        let newest: Vec<_> = agents
            .iter_mut()
            .map(|(_, c, _)| c.report().disks[0].newest_point.clone().unwrap().id)
            .collect();
        assert_eq!(newest, [id.clone(), id.clone()], "one id on both");
        want.push((
            id,
            std::fs::read(&agents[0].2).unwrap(),
            std::fs::read(&agents[1].2).unwrap(),
        ));
    }
    // The policy's interval drives the cuts too.
    let mut every = in_g1.clone();
    every.policy.crash_point_interval_s = 0.5;
    agents[0].1.apply(every);
    let last = want.last().unwrap().0.clone();
    wait_for(
        "a group point on the timer",
        Duration::from_secs(10),
        || {
            agents[1].1.report().disks[0]
                .newest_point
                .as_ref()
                .is_some_and(|p| p.id != last && p.id.starts_with("g-"))
        },
    );

    // The group is taken away: no role on either, and the old coordinator's
    // certificate no longer cuts on the member.
    let alone = orders(Some(("ps1", server.addr)), 0.0);
    for (_, c, _) in &mut agents {
        c.apply(alone.clone());
    }
    assert_eq!(agents[0].0.group_role(), GroupRole::None);
    assert_eq!(agents[1].0.group_role(), GroupRole::None);
    let e = agents[0].0.group_point().unwrap_err().to_string();
    assert!(e.contains("coordinator"), "{e}");
    let e = cut_by_agent_0(member_addr).unwrap_err();
    assert!(e.contains("member of no group"), "{e}");

    let (a0, a1) = (&agents[0].0, &agents[1].0);
    wait_uploaded(&[a0, a1]);
    a0.stop();
    a1.stop();
    for (i, m) in ["agent-0", "agent-1"].iter().enumerate() {
        let (_, replica, state) = w.replica(m);
        for (id, d0, d1) in &want {
            let p = state
                .point(id)
                .expect("every member holds every group point");
            assert_eq!(p.kind, ferry_replica::PointKind::Group);
            let expect = if i == 0 { d0 } else { d1 };
            assert!(
                rebuilt(&replica, &state, p) == *expect,
                "{m} at {id} differs"
            );
        }
    }
    server.stop();
}
