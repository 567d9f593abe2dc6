//! The control plane's failed-over machines on a running process server (no split
//! brain): a write of one that arrives after the heartbeat's answer listed it never
//! reaches the cache, its session is closed with Error(failed over), a new Hello of
//! it is refused so, every other machine goes on, and once the list drops it (a
//! cancelled failover) it may connect again.

use std::time::{Duration, Instant};

use ferry_dataplane::server::control::Reporter;
use ferry_link::client::connect;
use ferry_link::control::client::Heartbeater;
use ferry_link::control::wire::ProcessServerOrders;
use ferry_link::protocol::{ErrorCode, Frame, Hello, VERSION};
use ferry_replica::Store;
use ferry_testkit::{pki, server};

fn hello<'a>(machine: &'a str, next_seq: u64) -> Hello<'a> {
    Hello {
        version: VERSION,
        machine,
        disk: "d",
        session: [5; 16],
        journal_from: next_seq,
        next_seq,
        disk_bytes: 1 << 20,
    }
}

#[test]
fn a_failed_over_machines_writes_never_reach_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::pki(&dir.path().join("pki"));
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let url = format!("file://{}", store_dir.display());
    let opts = server::options(&dir.path().join("cache"), 1);
    let failed_over = opts.failed_over.clone();
    let server = server::serve(
        &pki,
        opts,
        Store::open(&url).unwrap(),
        server::vault(dir.path()).1,
    );
    let addr = server.addr;
    let mut reporter = Reporter::new(
        "ps1".into(),
        addr.to_string(),
        server.view.clone(),
        server.registry.clone(),
        Default::default(),
    )
    .with_failed_over(failed_over.clone());
    let orders = |machines: &[&str]| ProcessServerOrders {
        revoked_serials: Vec::new(),
        heartbeat_interval_s: 5.0,
        failed_over: machines.iter().map(|m| m.to_string()).collect(),
    };
    let rt = compio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (zero, one) = (pki.target(addr, "agent-0"), pki.target(addr, "agent-1"));
        let mut open = connect(&zero, &hello("agent-0", 0)).await.unwrap();
        let mut other = connect(&one, &hello("agent-1", 0)).await.unwrap();
        let data = [0x5a; 4096];
        open.send_frame(&Frame::Write {
            seq: 0,
            offset: 0,
            data: &data,
        })
        .await
        .unwrap();
        open.wait_durable(1).await.unwrap();

        // The answer lists agent-0: its next write is refused, not cached.
        reporter.apply(orders(&["agent-0"]));
        assert_eq!(failed_over.len(), 1);
        let _ = open
            .send_frame(&Frame::Write {
                seq: 1,
                offset: 4096,
                data: &data,
            })
            .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while open.closed().is_none() && Instant::now() < deadline {
            compio::time::sleep(Duration::from_millis(20)).await;
        }
        let why = open.closed().expect("the failed-over session was closed");
        assert_eq!(why.code(), Some(ErrorCode::FailedOver), "{why}");
        assert!(why.to_string().contains("failed over"), "{why}");
        assert_eq!(open.durable(), 1, "the write after the list is not durable");

        // A new Hello is refused with the same code.
        let e = match connect(&zero, &hello("agent-0", 1)).await {
            Ok(_) => panic!("a failed-over machine was accepted"),
            Err(e) => e,
        };
        assert_eq!(e.code(), Some(ErrorCode::FailedOver), "{e}");

        // Another machine is untouched.
        other
            .send_frame(&Frame::Write {
                seq: 0,
                offset: 0,
                data: &data,
            })
            .await
            .unwrap();
        other.wait_durable(1).await.unwrap();

        // The failover cancelled: agent-0 connects again, and the server holds its
        // first write only.
        reporter.apply(orders(&[]));
        assert!(failed_over.is_empty());
        let again = connect(&zero, &hello("agent-0", 1)).await.unwrap();
        assert_eq!(
            again.welcome.durable, 1,
            "the refused write never reached the cache"
        );
    });
    server.stop();
}
