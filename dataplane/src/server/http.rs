//! The metrics and health endpoint, on its own port and threads, away from the shards:
//! `GET /metrics` (Prometheus text) and `GET /health` (the verdict and its reasons;
//! 503 when critical, since load balancers and probes read the code, not the body).
//! HEAD is answered too; any other method gets 405, any other path 404.
//!
//! Each request runs on its own thread, at most `REQUESTS_MAX` at once, and has one
//! deadline for reading it and writing the answer (`REQUEST_DEADLINE`), not a timeout
//! per read: a client that trickles a byte a second, or never finishes its request,
//! is closed at the deadline and never holds up another scrape.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::health::{assess, Health, Inputs, Level, Policy};
use crate::metrics::{render, Gauges, ShardMetrics};

use super::shard::ShardShared;
use crate::upload::UploadStatus;

pub struct View {
    pub shards: Vec<Arc<ShardShared>>,
    pub uploads: Vec<Arc<UploadStatus>>,
    pub cache_dir: std::path::PathBuf,
}

impl View {
    pub fn snapshot(&self) -> (ShardMetrics, Gauges, Health) {
        let mut m = ShardMetrics::default();
        for s in &self.shards {
            m.merge(&s.metrics.lock().expect("metrics lock"));
        }
        m.connections = self
            .shards
            .iter()
            .map(|s| s.connections.load(Ordering::Relaxed) as u64)
            .sum();
        m.bytes_stored = self
            .uploads
            .iter()
            .map(|u| u.plain_bytes.load(Ordering::Relaxed))
            .sum();
        m.bytes_uploaded = self
            .uploads
            .iter()
            .map(|u| u.sealed_bytes.load(Ordering::Relaxed))
            .sum();
        let g = Gauges {
            cache_bytes: self
                .shards
                .iter()
                .map(|s| s.cache_used.load(Ordering::Relaxed))
                .sum(),
            cache_max_bytes: self.shards.iter().map(|s| s.cache_max).sum(),
            upload_lag_s: self.uploads.iter().map(|u| u.lag_s()).fold(0.0, f64::max),
            store_failing: self
                .uploads
                .iter()
                .any(|u| u.failing.load(Ordering::Relaxed)),
            failing_disks: self
                .uploads
                .iter()
                .map(|u| u.failing_disks.load(Ordering::Relaxed))
                .sum(),
            cache_fs_free_bytes: crate::cache::free_bytes(&self.cache_dir).ok(),
        };
        let h = assess(
            &Policy::default(),
            &Inputs {
                cache_used_bytes: g.cache_bytes,
                cache_max_bytes: g.cache_max_bytes,
                upload_lag_s: g.upload_lag_s,
                store_failing: g.store_failing,
                failing_disks: g.failing_disks,
                cache_fs_free_bytes: g.cache_fs_free_bytes,
            },
        );
        (m, g, h)
    }
}

/// What the endpoint shows: the server's live view, or a fixed one in tests.
pub trait Source: Send + Sync + 'static {
    /// The Prometheus text of `/metrics`.
    fn metrics(&self) -> String;
    fn health(&self) -> Health;
}

impl Source for View {
    fn metrics(&self) -> String {
        let (m, g, h) = self.snapshot();
        render(&m, &g, &h)
    }

    fn health(&self) -> Health {
        self.snapshot().2
    }
}

/// How long one request may take, reading it and writing the answer together.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Requests served at once; past it a connection is closed unanswered. Scrapers are
/// few: this bounds the threads a flood of slow clients can hold (each for at most
/// the deadline).
pub const REQUESTS_MAX: usize = 8;
/// The longest request head read; the rest of a longer one is ignored.
const REQUEST_HEAD_MAX_BYTES: usize = 8192;

pub fn serve<S: Source>(listener: TcpListener, source: S, stop: Arc<AtomicBool>) {
    serve_with_deadline(listener, source, stop, REQUEST_DEADLINE)
}

fn serve_with_deadline<S: Source>(
    listener: TcpListener,
    source: S,
    stop: Arc<AtomicBool>,
    deadline: Duration,
) {
    let source = Arc::new(source);
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(conn) = conn else { continue };
        if open.fetch_add(1, Ordering::SeqCst) >= REQUESTS_MAX {
            open.fetch_sub(1, Ordering::SeqCst);
            tracing::debug!(
                "metrics endpoint: {REQUESTS_MAX} requests in progress; closed one more"
            );
            continue;
        }
        let (source, open2) = (source.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("ferry-metrics-req".into())
            .spawn(move || {
                if let Err(e) = answer(conn, &*source, Instant::now() + deadline) {
                    tracing::debug!(error = %e, "metrics request failed");
                }
                open2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Time left before `deadline`, or a timeout error naming what was cut short.
fn left(deadline: Instant, what: &str) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} not done within the request deadline"),
        ));
    }
    Ok(left)
}

/// The status line and body for a request, and whether to send the body.
struct Response {
    status: &'static str,
    body: String,
    head_only: bool,
}

fn route(method: &str, target: &str, source: &dyn Source) -> Response {
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return Response {
            status: "405 Method Not Allowed",
            body: "only GET and HEAD\n".into(),
            head_only: false,
        };
    }
    // A query string changes nothing here.
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = match path {
        "/metrics" => ("200 OK", source.metrics()),
        "/health" => {
            let h = source.health();
            let mut body = format!("{}\n", h.level.name());
            for r in &h.reasons {
                body.push_str(r);
                body.push('\n');
            }
            let status = if h.level == Level::Critical {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            (status, body)
        }
        _ => ("404 Not Found", "try /metrics or /health\n".to_string()),
    };
    Response {
        status,
        body,
        head_only,
    }
}

fn answer(mut conn: TcpStream, source: &dyn Source, deadline: Instant) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < REQUEST_HEAD_MAX_BYTES {
        conn.set_read_timeout(Some(left(deadline, "reading the request")?))?;
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&req);
    let mut words = text.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let r = route(method, target, source);
    let allow = if r.status.starts_with("405") {
        "allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\n{allow}connection: close\r\n\r\n",
        r.status,
        r.body.len()
    )
    .into_bytes();
    if !r.head_only {
        out.extend_from_slice(r.body.as_bytes());
    }
    // Written against the same deadline: a client that does not read cannot hold
    // the thread past it either.
    let mut rest = &out[..];
    while !rest.is_empty() {
        conn.set_write_timeout(Some(left(deadline, "writing the answer")?))?;
        match conn.write(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
