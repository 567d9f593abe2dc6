//! The control plane's revoked list on a running process server: a Hello from a
//! revoked certificate is refused with the reason, an open session from one is closed
//! at its next frame, and every other agent goes on.

use std::time::{Duration, Instant};

use ferry_dataplane::server::control::Reporter;
use ferry_link::client::connect;
use ferry_link::control::client::Heartbeater;
use ferry_link::control::wire::ProcessServerOrders;
use ferry_link::protocol::{Frame, Hello, VERSION};
use ferry_link::tls::certs::cert_serial;
use ferry_replica::Store;
use ferry_testkit::{pki, server};
use rustls_pki_types::pem::PemObject;

fn hello<'a>(machine: &'a str) -> Hello<'a> {
    Hello {
        version: VERSION,
        machine,
        disk: "d",
        session: [3; 16],
        journal_from: 0,
        next_seq: 0,
        disk_bytes: 1 << 20,
    }
}

fn serial_of(pem: &std::path::Path) -> String {
    let der = rustls_pki_types::CertificateDer::from_pem_file(pem).unwrap();
    cert_serial(der.as_ref()).unwrap()
}

#[test]
fn a_revoked_certificate_is_refused_and_its_open_session_closed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::pki(&dir.path().join("pki"));
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let url = format!("file://{}", store_dir.display());
    let opts = server::options(&dir.path().join("cache"), 1);
    let revoked = opts.revoked.clone();
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
        revoked.clone(),
    );
    let orders = |serials: Vec<String>| ProcessServerOrders {
        revoked_serials: serials,
        heartbeat_interval_s: 5.0,
        failed_over: Vec::new(),
    };
    let rt = compio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (zero, one) = (pki.target(addr, "agent-0"), pki.target(addr, "agent-1"));
        let mut open = connect(&zero, &hello("agent-0")).await.unwrap();
        let mut other = connect(&one, &hello("agent-1")).await.unwrap();
        let hb = reporter.report();
        assert_eq!(hb.machines, ["agent-0", "agent-1"], "both connected");
        assert_eq!(hb.name, "ps1");
        assert_eq!(hb.health, "normal", "{:?}", hb.health_reasons);
        assert!(hb.cache_free_bytes > 0 && hb.cpu_percent == 0.0, "{hb:?}");
        // The heartbeat's answer revokes agent-0, in another spelling than the
        // parser's: upper case, padded.
        let serial = serial_of(&pki.dir.join("agent-0.pem"));
        let interval = reporter.apply(orders(vec![format!("00{}", serial.to_uppercase())]));
        assert_eq!(interval, 5.0);
        assert_eq!(revoked.len(), 1);

        // The open session ends at its next frame, with the reason.
        open.send_frame(&Frame::Ping { token: 1 }).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while open.closed().is_none() && Instant::now() < deadline {
            compio::time::sleep(Duration::from_millis(20)).await;
        }
        let why = open
            .closed()
            .expect("the revoked session was closed")
            .to_string();
        assert!(why.contains("revoked") && why.contains(&serial), "{why}");

        // A new Hello is refused before the store is touched.
        let e = match connect(&zero, &hello("agent-0")).await {
            Ok(_) => panic!("a revoked certificate was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("revoked") && e.contains("NotOwned"), "{e}");

        // Another machine's session is untouched.
        other.send_frame(&Frame::Ping { token: 2 }).await.unwrap();
        compio::time::sleep(Duration::from_millis(200)).await;
        assert!(other.closed().is_none(), "{:?}", other.closed());

        // The closed session lets go of its disk just after the refusal is sent.
        let deadline = Instant::now() + Duration::from_secs(10);
        while reporter.report().machines != ["agent-1"] && Instant::now() < deadline {
            compio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(reporter.report().machines, ["agent-1"], "agent-0 is gone");

        // Un-revoked, it may connect again.
        reporter.apply(orders(vec![]));
        assert!(revoked.is_empty());
        connect(&zero, &hello("agent-0")).await.unwrap();
    });
    server.stop();
}
