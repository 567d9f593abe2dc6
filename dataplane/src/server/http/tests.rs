//! The endpoint over real loopback sockets, with a fixed source.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{serve_with_deadline, Source};
use crate::health::{Health, Level};

struct Fixed(Mutex<Level>);

impl Source for Arc<Fixed> {
    fn metrics(&self) -> String {
        "ferry_up 1\n".into()
    }

    fn health(&self) -> Health {
        let level = *self.0.lock().unwrap();
        Health {
            level,
            throttle: false,
            reasons: match level {
                Level::Ok => vec![],
                _ => vec!["cache 10.0 % free (critical below 25 %)".into()],
            },
        }
    }
}

/// An endpoint with request deadline `deadline`, and the handle to its health.
fn endpoint(deadline: Duration) -> (SocketAddr, Arc<Fixed>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let fixed = Arc::new(Fixed(Mutex::new(Level::Ok)));
    let src = fixed.clone();
    std::thread::spawn(move || {
        serve_with_deadline(l, src, Arc::new(AtomicBool::new(false)), deadline)
    });
    (addr, fixed)
}

/// Sends `req` and returns (status code, headers, body).
fn ask(addr: SocketAddr, req: &str) -> (u16, String, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(req.as_bytes()).unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_lowercase(), body.to_string())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    ask(addr, &format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n"))
}

#[test]
fn health_is_503_when_critical_with_the_same_body() {
    let (addr, fixed) = endpoint(Duration::from_secs(5));
    let (code, _, body) = get(addr, "/health");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    *fixed.0.lock().unwrap() = Level::Warning;
    let (code, _, body) = get(addr, "/health");
    assert_eq!((code, body.lines().next()), (200, Some("warning")));
    *fixed.0.lock().unwrap() = Level::Critical;
    let (code, _, body) = get(addr, "/health");
    assert_eq!(code, 503);
    assert_eq!(body, "critical\ncache 10.0 % free (critical below 25 %)\n");
    // Metrics are still served while critical: they say why.
    assert_eq!(get(addr, "/metrics?x=1").0, 200);
}

#[test]
fn methods_and_paths_are_checked() {
    let (addr, _) = endpoint(Duration::from_secs(5));
    let (code, head, body) = ask(addr, "POST /metrics HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    assert_eq!(code, 405);
    assert!(head.contains("allow: get, head"), "{head}");
    assert_eq!(body, "only GET and HEAD\n");
    assert_eq!(get(addr, "/nope").0, 404);
    let (code, head, body) = ask(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(code, 200);
    assert!(head.contains("content-length: 11"), "{head}");
    assert_eq!(body, "", "HEAD answers without a body");
    assert_eq!(get(addr, "/metrics").2, "ferry_up 1\n");
}

/// Waits until the server closes `c`; returns how long that took.
fn closed_after(mut c: TcpStream, start: Instant) -> Duration {
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 256];
    match c.read(&mut b) {
        Ok(0) => start.elapsed(),
        Ok(n) => panic!("a request never finished was answered: {:?}", &b[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => start.elapsed(),
        Err(e) => panic!("not closed: {e}"),
    }
}

#[test]
fn slow_clients_cannot_stall_scrapes_and_are_closed_at_the_deadline() {
    let deadline = Duration::from_millis(800);
    let (addr, _) = endpoint(deadline);
    let start = Instant::now();
    // One never finishes its request; another trickles a byte every 50 ms, which a
    // timeout per read would never end.
    let mut silent = TcpStream::connect(addr).unwrap();
    silent.write_all(b"GET /metr").unwrap();
    let trickle = TcpStream::connect(addr).unwrap();
    let mut w = trickle.try_clone().unwrap();
    std::thread::spawn(move || {
        for b in b"GET /metrics HTTP/1.1\r\nhost: x".iter().cycle() {
            if w.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let asked = Instant::now();
    assert_eq!(get(addr, "/metrics").0, 200);
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "a scrape waited {:?} behind slow clients",
        asked.elapsed()
    );
    for c in [silent, trickle] {
        let t = closed_after(c, start);
        assert!(
            t >= deadline && t < deadline + Duration::from_secs(2),
            "closed after {t:?}, the deadline is {deadline:?}"
        );
    }
}

#[test]
fn requests_in_progress_are_bounded() {
    let (addr, _) = endpoint(Duration::from_secs(5));
    let mut slow = Vec::new();
    for _ in 0..super::REQUESTS_MAX {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /").unwrap();
        slow.push(c);
    }
    // One past the bound is closed at once, unanswered, not queued behind them.
    let start = Instant::now();
    let t = closed_after(TcpStream::connect(addr).unwrap(), start);
    assert!(t < Duration::from_secs(2), "closed after {t:?}");
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut text = String::new();
        let _ = c.read_to_string(&mut text);
        if text.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no scrape answered once they left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
