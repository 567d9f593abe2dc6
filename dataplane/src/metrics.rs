//! Metrics in the Prometheus text format. Each shard owns a `ShardMetrics` (plain
//! fields, no atomics or locks on the hot path); the metrics endpoint merges copies the
//! shards hand over and renders them with the health verdict.

use hdrhistogram::Histogram;

use crate::health::Health;

/// Error kinds counted separately.
pub const ERROR_KINDS: [&str; 6] = [
    "malformed",
    "sequence",
    "not_owned",
    "tls",
    "cache",
    "store",
];

#[derive(Debug, Clone)]
pub struct ShardMetrics {
    pub bytes_in: u64,
    pub bytes_stored: u64,
    pub bytes_uploaded: u64,
    pub connections: u64,
    pub errors: [u64; ERROR_KINDS.len()],
    /// Microseconds from a write's arrival to its acknowledgement.
    pub ack_latency_us: Histogram<u64>,
    /// Microseconds each group commit's sync took (the cache disk's share of the above).
    pub cache_sync_us: Histogram<u64>,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            bytes_in: 0,
            bytes_stored: 0,
            bytes_uploaded: 0,
            connections: 0,
            errors: [0; ERROR_KINDS.len()],
            ack_latency_us: micros_histogram(),
            cache_sync_us: micros_histogram(),
        }
    }
}

/// Largest latency recorded, in µs; beyond it a value saturates instead of failing.
const MICROS_MAX: u64 = 60_000_000;

/// 1 µs .. 60 s at 3 significant digits: about 30 KiB per shard.
fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MICROS_MAX, 3).expect("valid histogram bounds")
}

impl ShardMetrics {
    pub fn error(&mut self, kind: &str) {
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.errors[i] += 1;
        }
    }

    pub fn ack(&mut self, micros: u64) {
        let _ = self.ack_latency_us.record(micros.clamp(1, MICROS_MAX));
    }

    pub fn cache_sync(&mut self, micros: u64) {
        let _ = self.cache_sync_us.record(micros.clamp(1, MICROS_MAX));
    }

    pub fn merge(&mut self, other: &ShardMetrics) {
        self.bytes_in += other.bytes_in;
        self.bytes_stored += other.bytes_stored;
        self.bytes_uploaded += other.bytes_uploaded;
        self.connections += other.connections;
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        let _ = self.ack_latency_us.add(&other.ack_latency_us);
        let _ = self.cache_sync_us.add(&other.cache_sync_us);
    }
}

/// Gauges known only to the server as a whole.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub cache_bytes: u64,
    pub cache_max_bytes: u64,
    pub upload_lag_s: f64,
    pub store_failing: bool,
    /// Disks whose uploads fail, each retried while the others go on.
    pub failing_disks: u64,
    /// Bytes free on the cache's file system (None where it cannot be read).
    pub cache_fs_free_bytes: Option<u64>,
}

/// A microsecond histogram as a Prometheus summary in seconds.
fn summary(h: &Histogram<u64>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = [0.5, 0.99, 0.999]
        .iter()
        .map(|q| {
            (
                format!("{{quantile=\"{q}\"}}"),
                format!("{:.6}", h.value_at_quantile(*q) as f64 / 1e6),
            )
        })
        .collect();
    out.push(("_count".into(), h.len().to_string()));
    out
}

pub fn render(m: &ShardMetrics, g: &Gauges, health: &Health) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
        let _ = writeln!(s, "# HELP ferry_{name} {help}");
        let _ = writeln!(s, "# TYPE ferry_{name} {kind}");
        for (labels, value) in lines {
            // "_count" is a suffix of the name, not a label set.
            let _ = writeln!(s, "ferry_{name}{labels} {value}");
        }
    };
    let one = |v: String| vec![(String::new(), v)];
    metric(
        "bytes_in_total",
        "counter",
        "Payload bytes received from agents.",
        &one(m.bytes_in.to_string()),
    );
    metric(
        "bytes_uploaded_total",
        "counter",
        "Sealed bytes uploaded to blob storage.",
        &one(m.bytes_uploaded.to_string()),
    );
    let ratio = if m.bytes_uploaded == 0 {
        1.0
    } else {
        m.bytes_stored as f64 / m.bytes_uploaded as f64
    };
    metric(
        "compression_ratio",
        "gauge",
        "Bytes of writes per byte uploaded.",
        &one(format!("{ratio:.3}")),
    );
    metric(
        "cache_bytes",
        "gauge",
        "Bytes held in the durable cache.",
        &one(g.cache_bytes.to_string()),
    );
    metric(
        "cache_max_bytes",
        "gauge",
        "Bound of the durable cache.",
        &one(g.cache_max_bytes.to_string()),
    );
    if let Some(free) = g.cache_fs_free_bytes {
        metric(
            "cache_fs_free_bytes",
            "gauge",
            "Bytes free on the cache's file system: below what the cache may still grow, appends fail before it throttles.",
            &one(free.to_string()),
        );
    }
    metric(
        "upload_lag_seconds",
        "gauge",
        "Age of the oldest write not yet in blob storage.",
        &one(format!("{:.3}", g.upload_lag_s)),
    );
    metric(
        "connections",
        "gauge",
        "Agent connections open.",
        &one(m.connections.to_string()),
    );
    let errors: Vec<(String, String)> = ERROR_KINDS
        .iter()
        .zip(m.errors)
        .map(|(k, v)| (format!("{{kind=\"{k}\"}}"), v.to_string()))
        .collect();
    metric("errors_total", "counter", "Errors by kind.", &errors);
    metric(
        "ack_latency_seconds",
        "summary",
        "Time from a write's arrival to its acknowledgement.",
        &summary(&m.ack_latency_us),
    );
    metric(
        "cache_sync_seconds",
        "summary",
        "Time each group commit's sync of the cache took.",
        &summary(&m.cache_sync_us),
    );
    metric(
        "store_failing",
        "gauge",
        "1 while requests to blob storage fail (alert).",
        &one((g.store_failing as u8).to_string()),
    );
    metric(
        "upload_failing_disks",
        "gauge",
        "Disks whose uploads fail: retried with backoff, their writes kept in the cache, other disks going on.",
        &one(g.failing_disks.to_string()),
    );
    let level = health.level as u8;
    metric(
        "health",
        "gauge",
        "0 ok, 1 warning, 2 critical.",
        &one(level.to_string()),
    );
    metric(
        "throttling",
        "gauge",
        "1 while agents are throttled.",
        &one((health.throttle as u8).to_string()),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{assess, Inputs, Policy};

    #[test]
    fn renders_merged_shards() {
        let mut a = ShardMetrics {
            bytes_in: 1000,
            bytes_stored: 1000,
            bytes_uploaded: 250,
            ..Default::default()
        };
        a.error("sequence");
        for us in 1..=1000 {
            a.ack(us);
        }
        let mut b = ShardMetrics {
            bytes_in: 500,
            connections: 3,
            ..Default::default()
        };
        b.error("tls");
        b.ack(50_000);
        b.cache_sync(700);
        b.cache_sync(900);
        a.merge(&b);
        let g = Gauges {
            cache_bytes: 90,
            cache_max_bytes: 100,
            upload_lag_s: 2.5,
            store_failing: true,
            failing_disks: 2,
            cache_fs_free_bytes: Some(5),
        };
        let h = assess(
            &Policy::default(),
            &Inputs {
                cache_used_bytes: 90,
                cache_max_bytes: 100,
                upload_lag_s: 2.5,
                store_failing: true,
                failing_disks: 2,
                cache_fs_free_bytes: Some(5),
            },
        );
        let text = render(&a, &g, &h);
        for want in [
            "ferry_bytes_in_total 1500",
            "ferry_compression_ratio 4.000",
            "ferry_connections 3",
            "ferry_errors_total{kind=\"sequence\"} 1",
            "ferry_errors_total{kind=\"tls\"} 1",
            "ferry_ack_latency_seconds_count 1001",
            "ferry_cache_sync_seconds_count 2",
            "ferry_cache_sync_seconds{quantile=\"0.99\"} 0.000900",
            "ferry_health 2",
            "ferry_throttling 1",
            "ferry_store_failing 1",
            "ferry_upload_failing_disks 2",
            "ferry_cache_fs_free_bytes 5",
            "# TYPE ferry_ack_latency_seconds summary",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        assert!(
            text.contains("ferry_ack_latency_seconds{quantile=\"0.5\"} 0.000501"),
            "{text}"
        );
    }
}
