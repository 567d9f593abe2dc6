//! Re-enable after failback, the source agent's side (docs/recovery.md, "No split
//! brain"): an agent whose machine failed over holds, in its journal, writes that
//! never reached the replica (its process server was gone), and its disk is
//! rewritten underneath while it is read-only, as a failback's master target does
//! (synced back to the failover point, then the recovery site's writes). Once the
//! control plane's orders carry no failover, the agent drops that journal and
//! compares the disk with the replica by checksum: only the differing blocks are
//! sent, the stale writes and their point never reach the store, and the newest
//! point rebuilds the disk. It survives a restart while read-only and one in the
//! middle of the resync (which resumes as the re-enable's).

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use ferry_agent::live::control::Controlled;
use ferry_agent::live::failover::MARKER;
use ferry_agent::live::Agent;
use ferry_agent::recover::{sync_to_point, SyncOptions};
use ferry_link::control::client::{Heartbeater, IdentityFiles};
use ferry_link::control::wire::{
    AgentOrders, AgentPolicy, FailoverOrder, ProcessServerRef, ResyncReport,
};
use ferry_replica::Store;
use ferry_testkit::qemu::{qemu_io, random_writes};
use ferry_testkit::site::{point_when_ready, rebuilt, site, wait_uploaded, Site, DISK_BYTES};
use ferry_testkit::wait_ok;
use rand::Rng;

/// The replica's block: what a resync compares and sends at least.
const BLOCK: u64 = 64 << 10;

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

fn controlled(w: &Site, agent: &std::sync::Arc<Agent>, o: AgentOrders) -> Controlled {
    let pki = w.path("pki");
    Controlled::new(
        agent.clone(),
        "agent-0".into(),
        IdentityFiles {
            key: pki.join("agent-0.key"),
            cert: pki.join("agent-0.pem"),
            ca: pki.join("ca.pem"),
            issued: pki.join("issued.json"),
        },
        w.path("orders.json"),
        o,
    )
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

fn resync_of(c: &mut Controlled) -> Option<ResyncReport> {
    c.report().disks[0].resync.clone()
}

#[test]
fn a_lift_after_a_failover_drops_the_stale_journal_and_sends_only_the_blocks_that_differ() {
    let w = site(1);
    let mut rng = w.rng.clone();
    let server = w.server("127.0.0.1:0".parse().unwrap());
    let gone = server.addr;
    let disk = w.disk(&mut rng, 0..0);
    let agent = Agent::start(w.options(0, &disk, server.addr)).unwrap();
    let mut c = controlled(&w, &agent, orders(server.addr, None));
    let url = nbd(&agent);
    qemu_io(&url, &random_writes(&mut rng, DISK_BYTES, 20, 1..=8));
    let p = point_when_ready(&agent, "failover-point");
    wait_uploaded(&[&agent]);
    let at_p = std::fs::read(&disk).unwrap();

    // The process server goes (an unplanned failover): what follows stays in the
    // agent's journal, a point with it, and never reaches the replica.
    server.stop();
    let stale = [32 * BLOCK, 80 * BLOCK];
    for off in stale {
        qemu_io(&url, &[format!("write -P 0x77 {off} 4096")]);
    }
    let stale_point = agent.bookmark(false, Some("stale")).unwrap();
    assert!(!agent.uploaded_all(), "the stale writes are only journaled");
    c.apply(orders(gone, Some(("job-1", "failed-over"))));
    assert!(!try_io(&url, "write -P 0x11 0 4096"), "read-only");
    assert_eq!(c.report().failover.unwrap().state, "read-only");
    agent.stop();
    drop(c);

    // The master target rewrites the disk underneath: back to the failover point,
    // then the recovery site's writes in N blocks.
    let store = Store::open(&w.url).unwrap();
    let synced = sync_to_point(
        &store,
        &w.vault(),
        "agent-0",
        "sda",
        &p,
        &disk,
        &SyncOptions {
            verify: true,
            work_dir: None,
        },
        &|_| {},
    )
    .unwrap();
    assert_eq!(
        synced.blocks_differing,
        stale.len() as u64,
        "the stale writes undone"
    );
    assert_eq!(std::fs::read(&disk).unwrap(), at_p);
    let recovery_blocks = [3u64, 17, 100, 150, 200];
    {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        for b in recovery_blocks {
            let mut data = vec![0u8; BLOCK as usize];
            rng.fill(&mut data[..]);
            data[0] = 1; // never all zero
            f.write_all_at(&data, b * BLOCK).unwrap();
        }
        f.sync_all().unwrap();
    }

    // Restarted while read-only: it stays so until the control plane's answer lifts
    // it. Its process server is still gone, so the resync can only be wanted.
    let agent = Agent::start(w.options(0, &disk, gone)).unwrap();
    let url = nbd(&agent);
    let mut c = controlled(&w, &agent, orders(gone, None));
    assert!(
        !try_io(&url, "write -P 0x11 0 4096"),
        "kept orders do not lift it"
    );
    assert_eq!(resync_of(&mut c), None, "no resync while read-only");
    c.apply(orders(gone, None));
    assert!(!w.path("journal0").join(MARKER).exists());
    let r = resync_of(&mut c).expect("the lift starts a resync");
    assert_eq!(
        (r.reason.as_str(), r.phase.as_str()),
        ("re-enable", "wanted")
    );
    assert_eq!(
        c.report().disks[0].state,
        "resync",
        "a re-enable is not done before the resync"
    );
    assert!(
        agent.bookmark(false, None).is_err(),
        "no point before it is done"
    );
    // Writes are accepted once the resync is wanted: this one, in another block, is
    // either in what the resync reads or journaled after it.
    let live = 220 * BLOCK;
    qemu_io(&url, &[format!("write -P 0x99 {live} 4096")]);
    // Killed in the middle of the resync.
    agent.stop();
    drop(c);

    // Restarted with a process server: the resync resumes as the re-enable's.
    let server = w.server("127.0.0.1:0".parse().unwrap());
    let agent = Agent::start(w.options(0, &disk, server.addr)).unwrap();
    let mut c = controlled(&w, &agent, orders(server.addr, None));
    let done = wait_ok(
        "the re-enable's resync done",
        Duration::from_secs(60),
        || match resync_of(&mut c) {
            Some(r) if r.phase == "done" => Ok(r),
            other => Err(other),
        },
    );
    let expected = std::fs::read(&disk).unwrap();
    assert_eq!(done.reason, "re-enable");
    assert_eq!(done.compared_bytes, DISK_BYTES);
    assert_eq!(done.total_bytes, DISK_BYTES);
    // The recovery site's blocks and the block written after the lift; the stale
    // blocks equal the replica again and are not sent.
    assert_eq!(
        done.sent_bytes,
        (recovery_blocks.len() as u64 + 1) * BLOCK,
        "only the blocks that differ: {done:?}"
    );
    let st = &agent.status()[0];
    assert_eq!(st["last_resync"]["reenable"], true, "{st}");
    let after = point_when_ready(&agent, "re-enabled");
    wait_uploaded(&[&agent]);

    let (_store, replica, state) = w.replica("agent-0");
    assert!(
        state.point(&stale_point).is_none(),
        "the stale journal never reached the replica"
    );
    let newest = state.point(&after).expect("the point after the resync");
    assert!(
        rebuilt(&replica, &state, newest) == expected,
        "the newest point rebuilds the disk as it is"
    );
    assert!(
        rebuilt(&replica, &state, state.point(&p).unwrap()) == at_p,
        "the failover point still rebuilds as it was"
    );
    let uploaded = c.report().disks[0].newest_uploaded_point.clone().unwrap();
    assert_eq!(uploaded.id, after, "never the dropped point");
    agent.stop();
}
