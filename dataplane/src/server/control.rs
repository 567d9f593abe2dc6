//! The process server under a control plane: what its heartbeat reports (cache room,
//! ingest rate, upload lag, CPU, its own health, the machines connected) and what it
//! does with the answer (the revoked certificates, the machines failed over). The heartbeat thread itself is the
//! shared client's (`ferry_link::control::client::Heartbeats`).

use std::sync::Arc;
use std::time::Instant;

use ferry_link::control::client::{Heartbeater, IdentityFiles};
use ferry_link::control::limits::{
    trimmed, MAX_CONNECTED, MAX_FENCED, MAX_REASONS, MAX_TEXT_BYTES,
};
use ferry_link::control::wire::{ProcessServerHeartbeat, ProcessServerOrders};
use ferry_link::tls::certs::ServerCert;

use super::failed_over::FailedOver;
use super::http::View;
use super::registry::Registry;
use super::revoked::Revoked;
use crate::health::Level;

/// The control plane's three words for a verdict.
pub fn health_word(l: Level) -> &'static str {
    match l {
        Level::Ok => "normal",
        Level::Warning => "warning",
        Level::Critical => "critical",
    }
}

/// What the last report counted, for rates over the interval.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    bytes_in: u64,
    cpu_s: Option<f64>,
}

pub struct Reporter {
    pub name: String,
    /// HOST:PORT agents use (`--advertise`).
    pub address: String,
    view: Arc<View>,
    registry: Arc<Registry>,
    revoked: Arc<Revoked>,
    failed_over: Arc<FailedOver>,
    last: Option<Sample>,
    /// The certificate agents see, replaced when the control plane renews it.
    cert: Option<Arc<ServerCert>>,
    /// The last fencing the report in flight carries: answered, it is sent no more.
    fencings_sent: Option<u64>,
}

impl Reporter {
    pub fn new(
        name: String,
        address: String,
        view: Arc<View>,
        registry: Arc<Registry>,
        revoked: Arc<Revoked>,
    ) -> Reporter {
        Reporter {
            name,
            address,
            view,
            registry,
            revoked,
            failed_over: Arc::default(),
            last: None,
            cert: None,
            fencings_sent: None,
        }
    }

    /// Refuses the machines the control plane lists as failed over through
    /// `failed_over` (the list the server's sessions look at).
    pub fn with_failed_over(mut self, failed_over: Arc<FailedOver>) -> Reporter {
        self.failed_over = failed_over;
        self
    }

    /// Serves the renewed certificate through `cert` from the next handshake on.
    pub fn with_cert(mut self, cert: Arc<ServerCert>) -> Reporter {
        self.cert = Some(cert);
        self
    }
}

impl Heartbeater for Reporter {
    type Report = ProcessServerHeartbeat;
    type Orders = ProcessServerOrders;
    const PATH: &'static str = "/v1/heartbeat/process-server";

    fn report(&mut self) -> ProcessServerHeartbeat {
        let (m, g, h) = self.view.snapshot();
        let now = Sample {
            at: Instant::now(),
            bytes_in: m.bytes_in,
            cpu_s: process_cpu_seconds(),
        };
        // Rates over the interval since the last report; nothing to compare the first
        // one with, so it reports none.
        let (ingest, cpu) = match self.last {
            Some(last) => {
                let secs = now.at.duration_since(last.at).as_secs_f64().max(1e-3);
                let ingest = now.bytes_in.saturating_sub(last.bytes_in) as f64 / secs;
                let cpu = match (now.cpu_s, last.cpu_s) {
                    (Some(a), Some(b)) => 100.0 * (a - b).max(0.0) / secs,
                    _ => 0.0,
                };
                (ingest, cpu)
            }
            None => (0.0, 0.0),
        };
        self.last = Some(now);
        let room = g.cache_max_bytes.saturating_sub(g.cache_bytes);
        // Each fencing goes out until a heartbeat carrying it is answered.
        let (fenced, sent) = self.registry.fencings(MAX_FENCED);
        self.fencings_sent = sent;
        ProcessServerHeartbeat {
            name: self.name.clone(),
            address: self.address.clone(),
            cache_used_bytes: g.cache_bytes,
            // The bound's room, or less where the file system has less.
            cache_free_bytes: g.cache_fs_free_bytes.map_or(room, |fs| fs.min(room)),
            ingest_bytes_per_s: ingest,
            upload_lag_s: g.upload_lag_s,
            cpu_percent: cpu,
            health: health_word(h.level).to_string(),
            health_reasons: bounded_reasons(h.reasons),
            machines: bounded_machines(self.registry.connected_machines()),
            fenced,
        }
    }

    fn apply(&mut self, orders: ProcessServerOrders) -> f64 {
        if let Some(last) = self.fencings_sent.take() {
            self.registry.fencings_answered(last);
        }
        if self.revoked.replace(&orders.revoked_serials) {
            tracing::info!(
                revoked = self.revoked.len(),
                "the control plane's revoked certificates changed: refusing them from now on"
            );
        }
        if self.failed_over.replace(&orders.failed_over) {
            tracing::info!(
                failed_over = self.failed_over.len(),
                machines = ?orders.failed_over.iter().take(8).collect::<Vec<_>>(),
                "the machines failed over to the recovery site changed: their agents are refused from now on"
            );
        }
        orders.heartbeat_interval_s
    }

    fn renewed(&mut self, files: &IdentityFiles) {
        if let Some(c) = &self.cert {
            match c.reload(&files.cert, &files.key) {
                Ok(()) => tracing::info!("serving the renewed certificate"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot serve the renewed certificate; the old one stays until it expires")
                }
            }
        }
    }
}

/// The reasons as the control plane takes them: at most `MAX_REASONS`, each cut to
/// `MAX_TEXT_BYTES`, so that a long reason never gets the heartbeat refused.
fn bounded_reasons(reasons: Vec<String>) -> Vec<String> {
    reasons
        .iter()
        .take(MAX_REASONS)
        .map(|r| trimmed(r, MAX_TEXT_BYTES))
        .collect()
}

/// The connected machines as the control plane takes them: the first `MAX_CONNECTED`
/// by name. The list is shown, not acted on (the control plane assigns machines from
/// its own table), so a process server with more still heartbeats.
fn bounded_machines(mut machines: Vec<String>) -> Vec<String> {
    machines.truncate(MAX_CONNECTED);
    machines
}

/// This process's user and system CPU time so far, from /proc/self/stat.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_seconds_from_stat(&stat, clock_ticks()?)
}

fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (t > 0).then_some(t as f64)
}

/// utime + stime (fields 14 and 15) in seconds. The command name (field 2) may hold
/// spaces and parentheses: fields are counted after its last ')'.
fn cpu_seconds_from_stat(stat: &str, ticks: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // `rest` starts at field 3 (state): utime is the 12th from there.
    let utime: f64 = f.nth(11)?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) / ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces() {
        let stat =
            "1234 (ferry (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_seconds_from_stat(stat, 100.0), Some(3.0));
        assert_eq!(cpu_seconds_from_stat("garbage", 100.0), None);
        assert!(process_cpu_seconds().is_some_and(|s| s >= 0.0));
    }

    #[test]
    fn what_a_heartbeat_reports_fits_the_control_planes_bounds() {
        let reasons = vec!["r".repeat(MAX_TEXT_BYTES + 10); MAX_REASONS + 3];
        let r = bounded_reasons(reasons);
        assert_eq!(r.len(), MAX_REASONS);
        assert!(r.iter().all(|r| r.len() <= MAX_TEXT_BYTES));
        assert_eq!(bounded_reasons(vec!["cache full".into()]), ["cache full"]);
        let machines: Vec<String> = (0..MAX_CONNECTED + 5).map(|i| format!("m{i:04}")).collect();
        let m = bounded_machines(machines);
        assert_eq!(m.len(), MAX_CONNECTED);
        assert_eq!(m[0], "m0000");
    }

    #[test]
    fn verdicts_are_the_control_plane_words() {
        assert_eq!(health_word(Level::Ok), "normal");
        assert_eq!(health_word(Level::Warning), "warning");
        assert_eq!(health_word(Level::Critical), "critical");
    }
}
