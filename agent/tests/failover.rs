//! No split brain, the source agent's side (docs/recovery.md, "No split brain"), with a
//! process server in-process and the orders applied as the heartbeat thread applies
//! them: a planned failover's prepare holds writes (NBD writes fail, reads work) and
//! reports a final point that holds the last acknowledged write once the process
//! server holds it; a cancel resumes writes; a failover turns the disks read-only
//! and stops replication, across a restart, until an order without failover lifts
//! it. A process server that lists the machine as failed over turns the agent
//! read-only by its refusal alone, of an open session or of a new one.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::live::control::Controlled;
use ferry_agent::live::failover::{MARKER, REFUSAL_ID};
use ferry_agent::live::Agent;
use ferry_dataplane::server::FailedOver;
use ferry_link::control::client::{Heartbeater, IdentityFiles};
use ferry_link::control::wire::{
    AgentOrders, AgentPolicy, FailoverOrder, FailoverReport, ProcessServerRef,
};
use ferry_testkit::qemu::{qemu_io, random_writes};
use ferry_testkit::site::{rebuilt, site, wait_uploaded, Site, DISK_BYTES};
use ferry_testkit::{wait_for, wait_ok};

fn orders(ps: std::net::SocketAddr, failover: Option<(&str, &str)>) -> AgentOrders {
    AgentOrders {
        process_server: Some(ProcessServerRef {
            name: "ps1".into(),
            address: ps.to_string(),
        }),
        policy: AgentPolicy {
            name: "default".into(),
            crash_point_interval_s: 0.0,
            app_point_interval_s: 0,
        },
        group: None,
        heartbeat_interval_s: 5.0,
        group_coordinator: None,
        group_members: Vec::new(),
        failover: failover.map(|(id, state)| FailoverOrder {
            id: id.into(),
            state: state.into(),
        }),
    }
}

fn identity(w: &Site) -> IdentityFiles {
    let pki = w.path("pki");
    IdentityFiles {
        key: pki.join("agent-0.key"),
        cert: pki.join("agent-0.pem"),
        ca: pki.join("ca.pem"),
        issued: pki.join("issued.json"),
    }
}

fn nbd(agent: &Agent) -> String {
    format!("nbd://{}/sda", agent.nbd_addr)
}

/// One qemu-io command through the export; whether it succeeded (qemu-io exits 0
/// even when its command failed: the text says).
fn try_io(url: &str, cmd: &str) -> bool {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-t", "writeback", "-c", cmd, url])
        .output()
        .expect("qemu-io is installed (qemu-utils)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success() && !text.contains("failed") && !text.contains("error")
}

fn failover_of(c: &mut Controlled) -> Option<FailoverReport> {
    c.report().failover
}

#[test]
fn a_planned_failover_holds_writes_reports_its_final_point_and_a_failover_stays_read_only() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let server = w.server("127.0.0.1:0".parse().unwrap());
    // All zero, as the empty replica reads: every point rebuilds the disk file.
    let disk = w.disk(&mut rng, 0..0);
    let agent = Agent::start(w.options(0, &disk, server.addr)).unwrap();
    let mut c = Controlled::new(
        agent.clone(),
        "agent-0".into(),
        identity(&w),
        w.path("orders.json"),
        orders(server.addr, None),
    );
    let url = nbd(&agent);
    qemu_io(&url, &random_writes(&mut rng, DISK_BYTES, 20, 1..=8));
    // The last write acknowledged before the prepare.
    qemu_io(&url, &["write -P 0x5a 8192 4096"]);
    assert_eq!(failover_of(&mut c), None);
    let before = std::fs::read(&disk).unwrap();

    c.apply(orders(server.addr, Some(("prep-1", "prepare"))));
    assert!(!try_io(&url, "write -P 0x11 0 4096"), "writes are held");
    assert!(!try_io(&url, "discard 0 4096"), "trims too");
    assert!(try_io(&url, "read -P 0x5a 8192 4096"), "reads are served");
    let r = wait_ok(
        "the final point prepared",
        Duration::from_secs(30),
        || match failover_of(&mut c) {
            Some(r) if r.state == "prepared" => Ok(r),
            other => Err(other),
        },
    );
    assert_eq!(r.id, "prep-1");
    assert_eq!(r.points.len(), 1);
    assert_eq!(r.points[0].disk, "sda");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "no refused write landed"
    );
    // The control plane then waits until the store holds it: it rebuilds the disk
    // with the last acknowledged write.
    wait_uploaded(&[&agent]);
    let (_store, replica, state) = w.replica("agent-0");
    let p = state
        .point(&r.points[0].point)
        .expect("the final point is in the replica");
    assert!(
        rebuilt(&replica, &state, p) == before,
        "the final point rebuilds the disk as acknowledged"
    );
    assert_eq!(
        failover_of(&mut c).unwrap().state,
        "prepared",
        "reported while the order stands"
    );

    // Cancelled: the order goes, writes resume and replicate.
    c.apply(orders(server.addr, None));
    assert_eq!(failover_of(&mut c), None);
    qemu_io(&url, &["write -P 0x22 0 4096"]);
    wait_uploaded(&[&agent]);
    // Nothing changed underneath a cancelled prepare: its journal was sent as it
    // was, and nothing compared (a completed failover's lift resyncs:
    // tests/reenable.rs).
    assert_eq!(
        c.report().disks[0].resync,
        None,
        "a cancelled prepare resyncs nothing"
    );

    // Failed over: read-only, replication stopped.
    c.apply(orders(server.addr, Some(("job-9", "failed-over"))));
    assert!(!try_io(&url, "write -P 0x33 0 4096"));
    assert!(try_io(&url, "read -P 0x22 0 4096"));
    let r = failover_of(&mut c).unwrap();
    assert_eq!((r.id.as_str(), r.state.as_str()), ("job-9", "read-only"));
    wait_for("the session ended", Duration::from_secs(10), || {
        !agent.connected()
    });
    let st = &agent.status()[0];
    assert_eq!(st["writes"], "read-only", "{st}");
    assert_eq!(st["replicating"], false, "{st}");
    assert!(
        agent.bookmark(false, None).is_err(),
        "no point that would never replicate"
    );
    assert!(w.path("journal0").join(MARKER).exists());
    agent.stop();
    drop(c);

    // Restarted: read-only from the start, and kept orders without a failover (older
    // than it) do not lift it; the control plane's next answer without one does.
    let agent = Agent::start(w.options(0, &disk, server.addr)).unwrap();
    let url = nbd(&agent);
    assert!(
        !try_io(&url, "write -P 0x44 0 4096"),
        "still read-only after a restart"
    );
    let mut c = Controlled::new(
        agent.clone(),
        "agent-0".into(),
        identity(&w),
        w.path("orders.json"),
        orders(server.addr, None),
    );
    assert!(
        !try_io(&url, "write -P 0x44 0 4096"),
        "kept orders do not lift it"
    );
    assert_eq!(failover_of(&mut c).unwrap().state, "read-only");
    c.apply(orders(server.addr, None));
    qemu_io(&url, &["write -P 0x44 0 4096"]);
    wait_uploaded(&[&agent]);
    assert!(agent.connected());
    agent.stop();
}

#[test]
fn a_process_servers_refusal_alone_turns_the_agent_read_only() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let failed_over = Arc::new(FailedOver::default());
    let fo = failed_over.clone();
    let server = w.server_with("127.0.0.1:0".parse().unwrap(), move |so| {
        so.failed_over = fo;
    });
    let disk = w.disk(&mut rng, 0..0);
    let agent = Agent::start(w.options(0, &disk, server.addr)).unwrap();
    let url = nbd(&agent);
    qemu_io(&url, &["write -P 0x5a 0 4096"]);
    wait_uploaded(&[&agent]);

    // The process server learns that the machine failed over: the open session is
    // closed at its next frame (an idle agent pings every few seconds).
    failed_over.replace(&["agent-0".to_string()]);
    wait_for("read-only by the refusal", Duration::from_secs(20), || {
        !agent.failover().replicating()
    });
    assert!(!try_io(&url, "write -P 0x11 0 4096"));
    let r = agent.failover_report().unwrap();
    assert_eq!((r.id.as_str(), r.state.as_str()), (REFUSAL_ID, "read-only"));
    assert!(
        w.path("journal0").join(MARKER).exists(),
        "kept for a restart"
    );
    agent.stop();

    // A new agent of that machine (another journal: no marker) is refused at its
    // Hello, and goes read-only by that alone.
    let mut o = w.options(0, &disk, server.addr);
    o.journal_dir = w.path("journal-b");
    let agent = Agent::start(o).unwrap();
    wait_for("refused at its hello", Duration::from_secs(20), || {
        !agent.failover().replicating()
    });
    assert!(!try_io(&nbd(&agent), "write -P 0x11 0 4096"));
    let last = agent.last_error().unwrap_or_default();
    assert!(last.contains("failed over"), "{last}");
    agent.stop();
}
