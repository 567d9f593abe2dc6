//! What the process server refuses, over real TLS: certificates that are missing,
//! signed by another CA, expired, or naming another machine; malformed, truncated,
//! oversized and out-of-order frames; a second hello; a Hello naming a disk against
//! the name rule; a peer stalled within a frame.
//! Each closes only its own connection with a logged reason (and an Error frame where
//! TLS got that far), while a well-behaved agent keeps replicating throughout and its
//! disk rebuilds identical afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_link::client::{connect, Target};
use ferry_link::protocol::{
    decode, encode, encode_write_header, Decoded, ErrorCode, Frame, Hello, VERSION,
};
use ferry_link::tls::certs::anonymous_client_config;
use ferry_link::tls::{handshake, TlsReader, TlsWriter};
use ferry_replica::Store;
use ferry_testkit::sim::{verify, SimDisk};
use ferry_testkit::{pki, server};
use rand::{Rng, SeedableRng};

fn hello<'a>(machine: &'a str, disk: &'a str) -> Hello<'a> {
    Hello {
        version: VERSION,
        machine,
        disk,
        session: [7; 16],
        journal_from: 0,
        next_seq: 0,
        disk_bytes: 1 << 20,
    }
}

/// A TLS session that has said Hello and read the Welcome, for sending raw bytes.
async fn raw(target: &Target, disk: &str) -> (TlsReader, TlsWriter) {
    let tcp = compio::net::TcpStream::connect(target.addr).await.unwrap();
    let conn =
        rustls::ClientConnection::new(target.tls.clone(), target.server_name.clone()).unwrap();
    let (mut r, mut w) = handshake(tcp, conn, Duration::from_secs(5)).await.unwrap();
    let mut out = Vec::new();
    encode(&Frame::Hello(hello("agent-0", disk)), &mut out);
    w.send(&out).await.unwrap();
    let mut inbuf = Vec::new();
    loop {
        if let Ok(Decoded::Frame(f, _)) = decode(&inbuf, u32::MAX) {
            assert!(matches!(f, Frame::Welcome(_)), "{f:?}");
            break;
        }
        assert!(r.read(&mut inbuf).await.unwrap() > 0);
    }
    (r, w)
}

/// A TLS session that has said nothing yet.
async fn hello_raw(target: &Target) -> (TlsReader, TlsWriter) {
    let tcp = compio::net::TcpStream::connect(target.addr).await.unwrap();
    let conn =
        rustls::ClientConnection::new(target.tls.clone(), target.server_name.clone()).unwrap();
    handshake(tcp, conn, Duration::from_secs(5)).await.unwrap()
}

/// Reads until the server's Error frame; returns its code and reason.
async fn error_frame(r: &mut TlsReader) -> (ErrorCode, String) {
    let mut inbuf = Vec::new();
    loop {
        let mut at = 0;
        while let Ok(Decoded::Frame(f, used)) = decode(&inbuf[at..], u32::MAX) {
            if let Frame::Error { code, reason } = f {
                return (code, reason.to_string());
            }
            at += used;
        }
        inbuf.drain(..at);
        let n = r
            .read(&mut inbuf)
            .await
            .expect("an error frame before the close");
        assert!(n > 0, "closed without an error frame");
    }
}

async fn refused(target: &Target, machine: &str) -> String {
    match connect(target, &hello(machine, "d")).await {
        Ok(_) => panic!("a connection for {machine} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_certificates_and_bad_frames_close_only_their_connection() {
    let seed = ferry_testkit::seed();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::pki(&dir.path().join("pki"));
    let (_, vault) = server::vault(dir.path());
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let url = format!("file://{}", store_dir.display());
    let mut opts = server::options(&dir.path().join("cache"), 2);
    opts.peer_timeout = Duration::from_secs(1);
    opts.limits.max_payload = 256 << 10;
    let server = server::serve(
        &pki,
        opts,
        Store::open(&url).unwrap(),
        server::vault(dir.path()).1,
    );
    let addr = server.addr;
    let good = pki.target(addr, "agent-0");

    let rt = compio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(async {
        // The well-behaved agent runs throughout.
        let target = good.clone();
        let flowing = compio::runtime::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut sim = SimDisk::new("agent-0", "good", 1 << 20, true);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(4) {
                for _ in 0..50 {
                    let len = rng.gen_range(1..=16) * 512;
                    let off = rng.gen_range(0..((1 << 20) - len) / 512) as u64 * 512;
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    sim.write(off, &data);
                }
                sim.bookmark(0);
                sim.pump(&target, Duration::from_secs(10)).await.unwrap();
                // Idle, but within the peer timeout.
                compio::time::sleep(Duration::from_millis(100)).await;
            }
            sim.finish(&target, Duration::from_secs(10)).await.unwrap();
            sim
        });

        // Certificates.
        let mut anon = good.clone();
        anon.tls = Arc::new(anonymous_client_config(&pki.dir.join("ca.pem")).unwrap());
        let e = refused(&anon, "agent-0").await;
        eprintln!("no certificate: {e}");
        let e = refused(&pki.target(addr, "stranger"), "agent-0").await;
        eprintln!("another CA: {e}");
        let e = refused(&pki.target(addr, "expired"), "agent-0").await;
        eprintln!("expired: {e}");
        let e = refused(&pki.target(addr, "agent-1"), "agent-0").await;
        assert!(e.contains("does not name machine agent-0"), "{e}");
        assert!(e.contains("NotOwned"), "{e}");

        // Names against the store's rule: refused by the agent's own client before it
        // connects, and by the server when a peer says such a Hello anyway.
        for disk in ["-x", ".x", "..", "../x"] {
            let e = match connect(&good, &hello("agent-0", disk)).await {
                Ok(_) => panic!("the client said hello for disk {disk:?}"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(ferry_replica::layout::NAME_RULE), "{e}");
            let (mut r, mut w) = hello_raw(&good).await;
            let mut bad = Vec::new();
            encode(&Frame::Hello(hello("agent-0", disk)), &mut bad);
            w.send(&bad).await.unwrap();
            let (code, reason) = error_frame(&mut r).await;
            assert_eq!(code, ErrorCode::Malformed, "{reason}");
            assert!(
                reason.contains(&format!("invalid disk name {disk:?}")),
                "{reason}"
            );
            assert!(
                reason.contains(ferry_replica::layout::NAME_RULE),
                "{reason}"
            );
        }

        // Frames.
        let (mut r, mut w) = raw(&good, "bad1").await;
        w.send(&[0xee, 0, 0, 0, 0, 0, 0, 0]).await.unwrap();
        let (code, reason) = error_frame(&mut r).await;
        assert_eq!(code, ErrorCode::Malformed, "{reason}");
        assert!(reason.contains("unknown frame type 0xee"), "{reason}");

        let (mut r, mut w) = raw(&good, "bad2").await;
        let mut big = Vec::new();
        encode_write_header(&mut big, 0, 0, 8 << 20);
        w.send(&big).await.unwrap();
        let (code, reason) = error_frame(&mut r).await;
        assert_eq!(code, ErrorCode::TooLarge, "{reason}");

        let (mut r, mut w) = raw(&good, "bad3").await;
        let mut skip = Vec::new();
        encode(
            &Frame::Write {
                seq: 5,
                offset: 0,
                data: b"x",
            },
            &mut skip,
        );
        w.send(&skip).await.unwrap();
        let (code, reason) = error_frame(&mut r).await;
        assert_eq!(code, ErrorCode::Sequence, "{reason}");

        let (mut r, mut w) = raw(&good, "bad4").await;
        let mut again = Vec::new();
        encode(&Frame::Hello(hello("agent-0", "good")), &mut again);
        w.send(&again).await.unwrap();
        let (code, reason) = error_frame(&mut r).await;
        assert_eq!(code, ErrorCode::Malformed, "{reason}");
        assert!(reason.contains("second hello"), "{reason}");

        // Truncated, then stalled: closed after the peer timeout, naming the stall.
        let (mut r, mut w) = raw(&good, "bad5").await;
        let mut part = Vec::new();
        encode_write_header(&mut part, 0, 0, 1000);
        part.extend_from_slice(&[1; 10]);
        w.send(&part).await.unwrap();
        let t = Instant::now();
        let (code, reason) = error_frame(&mut r).await;
        assert_eq!(code, ErrorCode::Malformed, "{reason}");
        assert!(reason.contains("stalled"), "{reason}");
        assert!(t.elapsed() >= Duration::from_millis(900));

        // A first frame that is not a hello.
        let tcp = compio::net::TcpStream::connect(addr).await.unwrap();
        let conn =
            rustls::ClientConnection::new(good.tls.clone(), good.server_name.clone()).unwrap();
        let (mut r, mut w) = handshake(tcp, conn, Duration::from_secs(5)).await.unwrap();
        let mut ping = Vec::new();
        encode(&Frame::Ping { token: 1 }, &mut ping);
        w.send(&ping).await.unwrap();
        let (code, reason) = error_frame(&mut r).await;
        assert_eq!(code, ErrorCode::Malformed, "{reason}");
        assert!(reason.contains("must be a hello"), "{reason}");

        flowing.await.unwrap()
    });
    let (m, _, _) = server.view.snapshot();
    let err = |k: &str| {
        let i = ferry_dataplane::metrics::ERROR_KINDS
            .iter()
            .position(|x| *x == k)
            .unwrap();
        m.errors[i]
    };
    assert!(err("tls") >= 3, "TLS refusals counted: {:?}", m.errors);
    assert!(err("not_owned") >= 1, "{:?}", m.errors);
    assert!(err("malformed") >= 8, "{:?}", m.errors);
    server.stop();
    let store = Store::open(&url).unwrap();
    verify(&store, &vault, &sim).unwrap();
    assert_eq!(sim.connects, 1, "the good agent was never disconnected");
}

/// A cache bound its file system cannot hold is refused at start, with the numbers:
/// not found later by an append that fails when the cache fills.
#[test]
fn a_cache_bound_beyond_its_file_system_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::pki(&dir.path().join("pki"));
    let (_, vault) = server::vault(dir.path());
    let mut opts = server::options(&dir.path().join("cache"), 1);
    opts.cache_bytes = 1 << 60;
    let store = Store::with_object_store(Arc::new(object_store::memory::InMemory::new()), "memory");
    let Err(e) = ferry_dataplane::server::start(opts, pki.server_tls(), store, vault) else {
        panic!("a 1 EiB cache was accepted");
    };
    let e = e.to_string();
    assert!(
        e.contains("the cache may grow to 1073741824.00 GiB")
            && e.contains("lower --cache-gib or free space"),
        "{e}"
    );
}
