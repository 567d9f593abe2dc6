//! The metrics and health endpoint, on its own port and thread, away from the shards:
//! `GET /metrics` (Prometheus text) and `GET /health` (the verdict and its reasons).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::health::{assess, Health, Inputs, Policy};
use crate::metrics::{render, Gauges, ShardMetrics};

use super::shard::ShardShared;
use super::uploader::UploadStatus;

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
            cache_fs_free_bytes: super::room::free_bytes(&self.cache_dir).ok(),
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

pub fn serve(listener: TcpListener, view: View, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(conn) = conn else { continue };
        if let Err(e) = answer(conn, &view) {
            tracing::debug!(error = %e, "metrics request failed");
        }
    }
}

fn answer(mut conn: TcpStream, view: &View) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/metrics" => {
            let (m, g, h) = view.snapshot();
            ("200 OK", render(&m, &g, &h))
        }
        "/health" => {
            let (_, _, h) = view.snapshot();
            let mut body = format!("{}\n", h.level.name());
            for r in &h.reasons {
                body.push_str(r);
                body.push('\n');
            }
            ("200 OK", body)
        }
        _ => ("404 Not Found", "try /metrics or /health\n".to_string()),
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}
