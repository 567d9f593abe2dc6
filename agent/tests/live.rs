//! The live agent end to end with real clients: a process server (in-process, over
//! mutual TLS) and an agent exporting a disk over NBD. The agent copies the disk's
//! existing content while qemu-io writes random patterns through the export, with
//! points taken between batches (through the API and the admin socket, one through
//! a freeze hook); a copy of the disk file is kept at each point. Afterwards every
//! point rebuilt from the store equals its copy.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_agent::live::group::{Coordinator, GroupPeer};
use ferry_agent::live::{admin, Agent};
use ferry_link::tls::certs::generate_loopback;
use ferry_replica::Store;
use ferry_testkit::disk::change_blocks as change_behind;
use ferry_testkit::net::free_addr;
use ferry_testkit::qemu::{qemu_io, random_writes};
use ferry_testkit::site::{point_when_ready, rebuilt, site, wait_uploaded, DISK_BYTES as SIZE};
use ferry_testkit::{wait_for, wait_ok};
use rand::{Rng, SeedableRng};

/// `n` qemu-io writes of random patterns, each `blocks` x 4 KiB, through `agent`'s export.
fn pattern_writes(
    agent: &Agent,
    rng: &mut rand::rngs::StdRng,
    n: usize,
    blocks: std::ops::RangeInclusive<u64>,
) {
    let cmds = random_writes(rng, SIZE, n, blocks);
    qemu_io(&format!("nbd://{}/sda", agent.nbd_addr), &cmds);
}

#[test]
fn every_point_taken_through_nbd_rebuilds_as_the_disk_was() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let server = w.server("127.0.0.1:0".parse().unwrap());
    // A disk with content before protection starts.
    let disk = w.disk(&mut rng, 0..4 << 20);
    let hook_log = w.path("hook.log");
    let hook = w.path("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$1\" >> {}\n", hook_log.display()),
    )
    .unwrap();
    let admin_path = w.path("admin.sock");
    let mut o = w.options(0, &disk, server.addr);
    o.freeze_hook = Some(format!("sh {}", hook.display()));
    o.admin_socket = Some(admin_path.clone());
    o.initial_copy = true;
    let agent = Agent::start(o).unwrap();
    let nbd = format!("nbd://{}/sda", agent.nbd_addr);
    // No point until the initial copy is complete: it would not rebuild the disk.
    wait_ok(
        "the initial copy to finish",
        Duration::from_secs(30),
        || {
            agent.bookmark(false, Some("first")).map_err(|e| {
                assert!(e.to_string().contains("initial copy"), "{e}");
                e
            })
        },
    );
    let expected_first = std::fs::read(&disk).unwrap();

    let expected = Mutex::new(BTreeMap::<String, Vec<u8>>::new());
    let first_id = agent.status()[0]["last_point"]
        .as_str()
        .unwrap()
        .to_string();
    expected.lock().unwrap().insert(first_id, expected_first);
    let snapshot = |id: String| {
        expected
            .lock()
            .unwrap()
            .insert(id, std::fs::read(&disk).unwrap());
    };
    for round in 0..4 {
        let cmds: Vec<String> = (0..20)
            .map(|_| {
                let len = rng.gen_range(1..=32) * 4096u64;
                let off = rng.gen_range(0..(SIZE - len) / 4096) * 4096;
                match rng.gen_range(0..6) {
                    0 => format!("write -z {off} {len}"),
                    1 => format!("discard {off} {len}"),
                    _ => format!("write -P {} {off} {len}", rng.gen::<u8>()),
                }
            })
            .collect();
        qemu_io(&nbd, &cmds);
        let id = match round {
            0 => agent.bookmark(false, Some("api")).unwrap(),
            1 => {
                let lines = admin::request(&admin_path, "bookmark --label admin").unwrap();
                lines[0].trim_start_matches("ok ").to_string()
            }
            2 => agent.bookmark(true, Some("app")).unwrap(),
            _ => agent.bookmark(false, None).unwrap(),
        };
        snapshot(id);
    }
    assert_eq!(
        std::fs::read_to_string(&hook_log).unwrap(),
        "freeze\nthaw\n"
    );
    let status = admin::request(&admin_path, "status").unwrap();
    assert!(status[1].contains("sda:"), "{status:?}");

    wait_uploaded(&[&agent]);
    agent.stop();

    let (_store, replica, state) = w.replica("agent-0");
    let expected = expected.into_inner().unwrap();
    assert_eq!(state.points.len(), expected.len());
    for p in &state.points {
        assert!(
            rebuilt(&replica, &state, p) == expected[&p.id],
            "point {} ({:?}) differs from the disk at that moment",
            p.id,
            p.label
        );
        if p.label.as_deref() == Some("app") {
            assert_eq!(p.kind, ferry_replica::PointKind::App);
        }
    }
    server.stop();
}

/// The journal overflows while the process server is down: writes go on (the agent
/// tracks dirty regions), points are refused rather than emitted with a gap, and once
/// the server is up the dirty regions are resynced and the next point rebuilds the
/// disk exactly.
#[test]
fn a_burst_that_overflows_the_journal_leaves_every_point_correct() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let addr = free_addr();
    let disk = w.path("disk.img");
    std::fs::write(&disk, vec![0u8; SIZE as usize]).unwrap();
    let mut o = w.options(0, &disk, addr);
    o.journal_bytes = 2 << 20;
    let agent = Agent::start(o).unwrap();
    // About 6 MiB of writes against a 2 MiB journal, with nobody to drain it.
    pattern_writes(&agent, &mut rng, 60, 16..=32);
    assert_eq!(agent.status()[0]["mode"], "bitmap", "{:?}", agent.status());
    let e = agent.bookmark(false, None).unwrap_err();
    assert!(e.to_string().contains("overflowed"), "{e}");

    let server = w.server(addr);
    let id = wait_ok(
        "the dirty regions to be resynced",
        Duration::from_secs(60),
        || {
            agent.bookmark(false, Some("after")).map_err(|e| {
                assert!(e.to_string().contains("overflowed"), "{e}");
                agent.status()
            })
        },
    );
    let want = std::fs::read(&disk).unwrap();
    wait_uploaded(&[&agent]);
    agent.stop();
    let (_store, replica, state) = w.replica("agent-0");
    assert_eq!(
        state.points.len(),
        1,
        "no point was emitted while resyncing"
    );
    let p = &state.points[0];
    assert_eq!(p.id, id);
    assert!(
        rebuilt(&replica, &state, p) == want,
        "the point after the overflow differs from the disk"
    );
    server.stop();
}

/// Two agents in a group: the coordinator cuts group points with the member, the
/// failover of the group picks the newest point both hold, and each machine rebuilds
/// exactly as its disk was at the cut. A member that never answers makes the cut
/// skip, leaving no point at all.
#[test]
fn two_agents_in_a_group_fail_over_consistently() {
    let w = site(2);
    let mut rng = w.rng.clone();
    let server = w.server("127.0.0.1:0".parse().unwrap());
    let member_addr = free_addr();
    let make = |i: usize, listen: Option<std::net::SocketAddr>, peers: Vec<GroupPeer>| {
        let disk = w.path(&format!("disk{i}.img"));
        std::fs::write(&disk, vec![0u8; SIZE as usize]).unwrap();
        let mut o = w.options(i, &disk, server.addr);
        o.group = Some("g1".into());
        o.group_listen = listen;
        o.group_coordinator = listen.map(|_| "agent-0".into());
        o.group_peers = peers;
        o.group_tls = Some(w.group_tls(i));
        (Agent::start(o).unwrap(), disk)
    };
    let peer = |addr| GroupPeer {
        name: "agent-1".into(),
        addr,
    };
    let (member, member_disk) = make(1, Some(member_addr), vec![]);
    let (coord, coord_disk) = make(0, None, vec![peer(member_addr)]);
    let mut want = BTreeMap::new();
    let mut pauses = Vec::new();
    for _ in 0..3 {
        for a in [&coord, &member] {
            pattern_writes(a, &mut rng, 10, 1..=16);
        }
        let (id, pause) = coord.group_point().unwrap();
        pauses.push(pause);
        want.insert(
            id,
            (
                std::fs::read(&coord_disk).unwrap(),
                std::fs::read(&member_disk).unwrap(),
            ),
        );
    }
    eprintln!("group cut pauses: {pauses:?}");

    // A member that never answers: the cut is skipped, no point is journaled.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let before = coord.status()[0]["last_point"].clone();
    let mut c = Coordinator::new(
        "g1".into(),
        vec![peer(silent_addr)],
        w.group_tls(0).coordinator,
    );
    let e = c.cut(&*coord).unwrap_err().to_string();
    assert!(e.contains("skipped"), "{e}");
    assert_eq!(
        coord.status()[0]["last_point"],
        before,
        "no point from a skipped cut"
    );

    // Only agents of the deployment's CA may hold a member's writes: plain TCP and
    // a certificate of another CA are refused before any request is read.
    let member_before = member.status()[0]["last_point"].clone();
    {
        use std::io::{Read, Write};
        let mut plain = std::net::TcpStream::connect(member_addr).unwrap();
        plain
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = plain.write_all(b"prepare g1 intruder\n");
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer);
        assert!(
            !String::from_utf8_lossy(&answer).contains("ready"),
            "a plain TCP peer was answered"
        );
    }
    let other = w.path("other-pki");
    generate_loopback(&other, 1).unwrap();
    let stranger = ferry_link::tls::certs::peer_client_config(
        &other.join("agent-0.pem"),
        &other.join("agent-0.key"),
        &w.path("pki").join("ca.pem"),
    )
    .unwrap();
    let mut c = Coordinator::new("g1".into(), vec![peer(member_addr)], Arc::new(stranger));
    let e = c.cut(&*coord).unwrap_err().to_string();
    assert!(e.contains("skipped"), "{e}");
    assert_eq!(
        member.status()[0]["last_point"],
        member_before,
        "a stranger cut a point"
    );

    wait_uploaded(&[&coord, &member]);
    coord.stop();
    member.stop();
    let store = Store::open(&w.url).unwrap();
    let (machines, id) =
        ferry_controlplane::recovery::group::latest_group_point(&store, "g1").unwrap();
    assert_eq!(machines, vec!["agent-0".to_string(), "agent-1".to_string()]);
    assert_eq!(&id, want.keys().max_by_key(|k| k.to_string()).unwrap());
    for (i, m) in machines.iter().enumerate() {
        let (_, replica, state) = w.replica(m);
        for (pid, (c0, c1)) in &want {
            let p = state
                .point(pid)
                .expect("every member holds every group point");
            assert_eq!(p.kind, ferry_replica::PointKind::Group);
            let expect = if i == 0 { c0 } else { c1 };
            assert!(
                rebuilt(&replica, &state, p) == *expect,
                "{m} at {pid} differs"
            );
        }
    }
    server.stop();
}

/// An agent whose journal and sequence record are lost (a new journal directory)
/// restarts below what the process server holds: it must not reuse those numbers for
/// new data. It numbers on from the server's and resyncs by checksum instead, and the
/// next point is exact.
#[test]
fn an_agent_that_lost_its_numbering_resyncs_instead_of_reusing_numbers() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let server = w.server("127.0.0.1:0".parse().unwrap());
    let disk = w.path("disk.img");
    std::fs::write(&disk, vec![0u8; SIZE as usize]).unwrap();
    let first = Agent::start(w.options(0, &disk, server.addr)).unwrap();
    pattern_writes(&first, &mut rng, 20, 1..=16);
    first.bookmark(false, None).unwrap();
    wait_uploaded(&[&first]);
    first.stop();

    let mut o = w.options(0, &disk, server.addr);
    o.journal_dir = w.path("journal-lost");
    let second = Agent::start(o).unwrap();
    pattern_writes(&second, &mut rng, 20, 1..=16);
    let id = point_when_ready(&second, "after");
    let want = std::fs::read(&disk).unwrap();
    wait_uploaded(&[&second]);
    second.stop();
    w.assert_points(&[(&id, &want)]);
    server.stop();
}

/// An agent upgraded before its process server: the server, standing in for the
/// release before (protocol 1), refuses version 2. The agent steps down to version 1
/// and sends its journal's bookmarks without the size that version lacks (a server of
/// that release calls the field malformed); every point rebuilds. Then the server is
/// upgraded: the next connection speaks version 2 again.
#[test]
fn an_agent_upgraded_before_its_process_server_steps_down_to_its_protocol() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let addr = free_addr();
    let old = w.server_with(addr, |o| o.limits.newest_version = 1);
    let disk = w.path("disk.img");
    std::fs::write(&disk, vec![0u8; SIZE as usize]).unwrap();
    let agent = Agent::start(w.options(0, &disk, addr)).unwrap();
    pattern_writes(&agent, &mut rng, 20, 1..=16);
    let id1 = agent.bookmark(false, Some("old server")).unwrap();
    let want1 = std::fs::read(&disk).unwrap();
    wait_uploaded(&[&agent]);
    assert_eq!(agent.status()[0]["protocol"], 1, "{}", agent.status()[0]);
    old.stop();

    let new = w.server(addr);
    pattern_writes(&agent, &mut rng, 20, 1..=16);
    let id2 = agent.bookmark(false, Some("upgraded server")).unwrap();
    let want2 = std::fs::read(&disk).unwrap();
    wait_uploaded(&[&agent]);
    assert_eq!(agent.status()[0]["protocol"], 2, "{}", agent.status()[0]);
    agent.stop();
    new.stop();
    w.assert_points(&[(&id1, &want1), (&id2, &want2)]);
}

/// Checksum resync, twice: an agent that lost its journal directory (and so its
/// initial-copy record) finds the replica already holds the disk and sends only the
/// blocks that changed while it was down, not the whole disk; then, asked through
/// its admin socket, it finds a block changed behind its back and sends just that.
/// After each, the next point rebuilds exactly the disk.
#[test]
fn a_checksum_resync_sends_only_the_blocks_that_differ() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let server = w.server("127.0.0.1:0".parse().unwrap());
    let disk = w.disk(&mut rng, 0..10 << 20);
    let mut o = w.options(0, &disk, server.addr);
    o.initial_copy = true;
    let first = Agent::start(o).unwrap();
    point_when_ready(&first, "copied");
    pattern_writes(&first, &mut rng, 20, 1..=16);
    wait_uploaded(&[&first]);
    first.stop();

    // Three blocks change while no agent runs, and the journal directory is lost.
    let bs = ferry_replica::DEFAULT_BLOCK_BYTES;
    change_behind(&disk, &[3, 77, 200], &mut rng);
    let admin_path = w.path("admin.sock");
    let mut o = w.options(0, &disk, server.addr);
    o.journal_dir = w.path("journal-lost");
    o.initial_copy = true;
    o.admin_socket = Some(admin_path.clone());
    let second = Agent::start(o).unwrap();
    let id = point_when_ready(&second, "resynced");
    let want = std::fs::read(&disk).unwrap();
    let s = &second.status()[0];
    let last = &s["last_resync"];
    assert_eq!(last["compared_bytes"], SIZE, "{s}");
    assert_eq!(last["sent_bytes"], 3 * bs, "only the changed blocks: {s}");
    assert_eq!(s["copy_total_bytes"], 0, "no full copy: {s}");

    // On request: one block changed behind the agent's back.
    change_behind(&disk, &[150], &mut rng);
    let answer = admin::request(&admin_path, "resync").unwrap();
    assert!(answer[0].contains("sda"), "{answer:?}");
    let id2 = point_when_ready(&second, "asked");
    let want2 = std::fs::read(&disk).unwrap();
    let s = &second.status()[0];
    assert_eq!(s["last_resync"]["sent_bytes"], bs, "{s}");
    wait_uploaded(&[&second]);
    second.stop();

    w.assert_points(&[(&id, &want), (&id2, &want2)]);
    server.stop();
}

/// The host goes down under a running agent (a power cut): a write the guest never
/// flushed may be on the disk while its journal record is lost. The agent finds its run
/// marker from another boot, compares the disk with the replica by checksum (even
/// when the first start after the cut could not and was killed) and sends the blocks
/// that differ; the next point rebuilds exactly the disk. Restarted in the same boot
/// (killed) once that is done, it compares nothing; stopped in order, it leaves no
/// marker, and the next start compares nothing either.
#[test]
fn after_the_host_went_down_the_agent_compares_its_disk_with_the_replica() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let server = w.server("127.0.0.1:0".parse().unwrap());
    let disk = w.disk(&mut rng, 0..4 << 20);
    let options = || {
        let mut o = w.options(0, &disk, server.addr);
        o.initial_copy = true;
        o
    };
    let marker = w.path("journal0").join("running");
    let first = Agent::start(options()).unwrap();
    point_when_ready(&first, "copied");
    pattern_writes(&first, &mut rng, 20, 1..=16);
    wait_uploaded(&[&first]);
    first.stop();

    // As a power cut may leave it: two blocks the guest wrote are on the disk, their
    // journal records are not, and the marker names the boot that ended.
    change_behind(&disk, &[9, 120], &mut rng);
    std::fs::write(&marker, "a-boot-that-ended").unwrap();
    // The first start after it cannot reach its process server, and is killed: the
    // comparison it owed is still owed by the next start, in the same boot.
    let mut o = options();
    o.target.addr = free_addr();
    let unreachable = Agent::start(o).unwrap();
    wait_for(
        "the agent to fail to reach its process server",
        Duration::from_secs(30),
        || !unreachable.status()[0]["last_error"].is_null(),
    );
    unreachable.stop();
    let second = Agent::start(options()).unwrap();
    let id = point_when_ready(&second, "after the power cut");
    let want = std::fs::read(&disk).unwrap();
    let s = &second.status()[0];
    assert_eq!(s["last_resync"]["compared_bytes"], SIZE, "{s}");
    assert_eq!(
        s["last_resync"]["sent_bytes"],
        2 * ferry_replica::DEFAULT_BLOCK_BYTES,
        "only the blocks the journal lost: {s}"
    );
    assert_eq!(s["copy_total_bytes"], 0, "no second copy: {s}");
    wait_uploaded(&[&second]);
    second.stop();

    // Killed in this boot: nothing to compare.
    let third = Agent::start(options()).unwrap();
    point_when_ready(&third, "after a kill");
    assert!(
        third.status()[0]["last_resync"].is_null(),
        "{}",
        third.status()[0]
    );
    third.shutdown().unwrap();
    assert!(!marker.exists(), "an ordered stop leaves no marker");
    let fourth = Agent::start(options()).unwrap();
    point_when_ready(&fourth, "after an ordered stop");
    assert!(
        fourth.status()[0]["last_resync"].is_null(),
        "{}",
        fourth.status()[0]
    );
    wait_uploaded(&[&fourth]);
    fourth.stop();

    w.assert_points(&[(&id, &want)]);
    server.stop();
}

/// A disk seeded offline (`ferry seed`) and then protected by an agent: the agent
/// finds the replica holds the disk and resyncs by checksum against the seed's
/// checksum map, sending only the blocks changed since the seed.
#[test]
fn an_agent_on_a_seeded_disk_sends_only_what_changed_since_the_seed() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let disk = w.disk(&mut rng, 2 << 20..12 << 20);
    let store = Store::open(&w.url).unwrap();
    let report = ferry_agent::seed(
        &store,
        &w.vault(),
        &ferry_agent::SeedOptions {
            machine: "agent-0",
            disk: "sda",
            image: &disk,
            label: None,
            time: chrono::Utc::now(),
            workers: 2,
            orphan_grace: ferry_replica::grace::ORPHAN_GRACE,
        },
        &|_| {},
    )
    .unwrap();
    assert!(report.full_copy);
    change_behind(&disk, &[40, 41], &mut rng);

    let server = w.server("127.0.0.1:0".parse().unwrap());
    let mut o = w.options(0, &disk, server.addr);
    o.initial_copy = true;
    let agent = Agent::start(o).unwrap();
    let id = point_when_ready(&agent, "attached");
    let want = std::fs::read(&disk).unwrap();
    let s = &agent.status()[0];
    assert_eq!(
        s["last_resync"]["sent_bytes"],
        2 * ferry_replica::DEFAULT_BLOCK_BYTES,
        "{s}"
    );
    wait_uploaded(&[&agent]);
    agent.stop();
    w.assert_points(&[(&id, &want)]);
    server.stop();
}

/// The process server loses its cache (a replaced disk) while it holds writes the
/// agent has already trimmed from its journal: the new server's watermark is below
/// what the agent holds. The agent gives up its journal, numbers on from the server's
/// watermark and resyncs by checksum; the next point rebuilds exactly the disk.
#[test]
fn an_agent_starts_over_when_the_process_server_lost_its_cache() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let addr = free_addr();
    // Uploads wait a minute: acknowledged writes stay only in the cache.
    let server = w.server_with(addr, |o| o.batch_delay = Duration::from_secs(60));
    let disk = w.path("disk.img");
    std::fs::write(&disk, vec![0u8; SIZE as usize]).unwrap();
    let agent = Agent::start(w.options(0, &disk, addr)).unwrap();
    pattern_writes(&agent, &mut rng, 30, 1..=16);
    let lost = agent.bookmark(false, Some("lost")).unwrap();
    wait_ok("the journal to be trimmed", Duration::from_secs(30), || {
        let s = agent.status()[0].clone();
        if s["durable"] == s["next_seq"] && s["journal_bytes"] == 0 {
            assert_eq!(s["uploaded"], 0, "nothing uploaded yet: {s}");
            Ok(())
        } else {
            Err(s)
        }
    });
    server.stop();
    std::fs::remove_dir_all(w.path("cache")).unwrap();
    let server = w.server(addr);
    // A point before the agent notices would be given up with its journal: wait.
    wait_for(
        "the agent to notice the loss",
        Duration::from_secs(30),
        || {
            let s = &agent.status()[0];
            !s["last_resync"].is_null() || !s["resync"].is_null()
        },
    );
    let id = point_when_ready(&agent, "after");
    let want = std::fs::read(&disk).unwrap();
    let s = &agent.status()[0];
    assert!(
        s["last_resync"]["why"]
            .as_str()
            .unwrap()
            .contains("lost writes"),
        "{s}"
    );
    wait_uploaded(&[&agent]);
    agent.stop();
    let (_, _, state) = w.replica("agent-0");
    assert!(state.point(&lost).is_none(), "a point the server lost");
    w.assert_points(&[(&id, &want)]);
    server.stop();
}

/// Writes keep coming through NBD while checksum resyncs compare the disk (a 64 MiB
/// disk, five resyncs asked for in a row, each with a batch of writes alongside):
/// the resync never sends a block older than a write that followed it, so the point
/// after all of it rebuilds exactly the disk.
#[test]
fn writes_during_a_checksum_resync_are_never_overwritten_by_it() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let server = w.server("127.0.0.1:0".parse().unwrap());
    let disk = w.path("disk.img");
    let mut content = vec![0u8; 4 * SIZE as usize];
    rng.fill(&mut content[..]);
    std::fs::write(&disk, &content).unwrap();
    let mut o = w.options(0, &disk, server.addr);
    o.initial_copy = true;
    let agent = Arc::new(Agent::start(o).unwrap());
    point_when_ready(&agent, "copied");
    for round in 0..5 {
        // Some blocks differ from the replica, so the resync has work to send.
        change_behind(&disk, &[round * 7 + 1, round * 11 + 300], &mut rng);
        agent.resync(None).unwrap();
        let (a, mut r) = (agent.clone(), rand::rngs::StdRng::seed_from_u64(rng.gen()));
        let writer = std::thread::spawn(move || pattern_writes(&a, &mut r, 40, 1..=16));
        writer.join().unwrap();
        point_when_ready(&agent, "round");
    }
    let id = point_when_ready(&agent, "end");
    let want = std::fs::read(&disk).unwrap();
    wait_uploaded(&[&agent]);
    agent.stop();
    w.assert_points(&[(&id, &want)]);
    server.stop();
}

/// Stops `agent`; stop must return well within its own 15 s bound on joining.
fn stop_promptly(agent: &Agent) {
    let started = std::time::Instant::now();
    agent.stop();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        started.elapsed()
    );
}

/// `stop` waits for the agent's threads: once it returns, the NBD address is free to
/// bind again and no thread holds the agent any more (the point timer, on an hour's
/// interval, has ended too), so another agent can take over at once.
#[test]
fn stop_waits_for_the_agents_threads() {
    let w = site(1);
    let disk = w.path("disk.img");
    std::fs::write(&disk, vec![0u8; SIZE as usize]).unwrap();
    // No process server: the sender is retrying its connection when stopped.
    let mut o = w.options(0, &disk, free_addr());
    o.crash_point_interval = Some(Duration::from_secs(3600));
    o.initial_copy = true;
    let agent = Agent::start(o).unwrap();
    let nbd = agent.nbd_addr;
    stop_promptly(&agent);
    drop(std::net::TcpListener::bind(nbd).expect("the NBD address is free once stopped"));
    assert_eq!(
        Arc::strong_count(&agent),
        1,
        "a thread of the stopped agent still holds it"
    );
    let mut o = w.options(0, &disk, free_addr());
    o.nbd_listen = nbd;
    let again = Agent::start(o).expect("a new agent on the same journal and address");
    again.stop();
}

/// `stop` also ends the admin socket's and the group member's threads, which wait in
/// accept (and a member's open connection, which waits in a read): once it returns,
/// the group address is free, nothing holds the agent, and a new agent starts in this
/// process on the same admin socket path (the old socket is stale, not answered) and
/// answers there.
#[test]
fn stop_frees_the_admin_socket_and_the_group_listener() {
    let w = site(2);
    let disk = w.path("disk.img");
    std::fs::write(&disk, vec![0u8; SIZE as usize]).unwrap();
    let admin_path = w.path("admin.sock");
    let group_addr = free_addr();
    let options = || {
        let mut o = w.options(1, &disk, free_addr());
        o.admin_socket = Some(admin_path.clone());
        o.group = Some("g1".into());
        o.group_listen = Some(group_addr);
        o.group_coordinator = Some("agent-0".into());
        o.group_tls = Some(w.group_tls(1));
        o
    };
    let agent = Agent::start(options()).unwrap();
    admin::request(&admin_path, "status").expect("the agent answers on its admin socket");
    // A peer that connects and never finishes its handshake holds a member thread.
    let idle = std::net::TcpStream::connect(group_addr).unwrap();
    stop_promptly(&agent);
    drop(std::net::TcpListener::bind(group_addr).expect("the group address is free once stopped"));
    assert_eq!(
        Arc::strong_count(&agent),
        1,
        "a thread of the stopped agent still holds it"
    );
    let again = Agent::start(options()).expect("a new agent on the same admin socket");
    let status = admin::request(&admin_path, "status").expect("the new agent answers");
    assert!(status[1].contains("sda:"), "{status:?}");
    again.stop();
    drop(idle);
}
