//! Checksum resync of a live disk: the process server sends the block checksums of
//! the replica (holding every write the agent sent before asking), the agent compares
//! them with its disk region by region under the capture lock and journals only the
//! blocks that differ. Used when the agent cannot trust its journal — it was lost, or
//! the replica exists but this agent never copied the disk — and on request.
//!
//! Why it is exact: a region is read, compared and its differing blocks journaled in
//! one step under the capture lock, so every live write to it comes before (and is
//! in the disk as read) or after (a later sequence number). A block equal to the
//! replica's state at the asked sequence stays equal once the writes journaled since
//! are applied, since the disk already holds them. No point is cut until the
//! comparison is done.
//!
//! Phases: idle -> wanted (a reason to resync) -> asked (the sender sent SumsRequest)
//! -> comparing (the map arrived) -> idle. A lost connection while asked goes back
//! to wanted; the map is asked for again.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_replica::sums::BlockSums;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Wanted,
    Asked,
    Comparing,
}

impl Phase {
    /// As the heartbeat names it (`idle` when none runs).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Wanted => "wanted",
            Phase::Asked => "asked",
            Phase::Comparing => "comparing",
        }
    }
}

/// Figures of a resync, running or done.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub why: String,
    /// Bytes of the disk compared so far, of `total`.
    pub compared: u64,
    pub total: u64,
    /// Bytes journaled because they differed (data and zeroed ranges).
    pub sent: u64,
    pub seconds: f64,
    /// A re-enable's resync: the failover was lifted and the disk may have been
    /// rewritten underneath by a failback (the control plane waits for this one).
    pub reenable: bool,
}

struct Inner {
    phase: Phase,
    /// Asking again after a lost map waits until then (doubling, up to a minute), so
    /// a server that cannot make the map is not asked in a tight loop.
    retry_at: Option<Instant>,
    retries: u32,
    map: Option<Arc<BlockSums>>,
    started: Option<Instant>,
    now: Figures,
    last: Option<Figures>,
}

pub struct Resync {
    inner: Mutex<Inner>,
}

impl Default for Resync {
    fn default() -> Self {
        Resync {
            inner: Mutex::new(Inner {
                phase: Phase::Idle,
                retry_at: None,
                retries: 0,
                map: None,
                started: None,
                now: Figures::default(),
                last: None,
            }),
        }
    }
}

impl Resync {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    pub fn busy(&self) -> bool {
        self.phase() != Phase::Idle
    }

    /// Asks for a resync; false when one is already under way.
    pub fn want(&self, why: &str) -> bool {
        let mut i = self.lock();
        if i.phase != Phase::Idle {
            return false;
        }
        Self::start(&mut i, why, false);
        true
    }

    /// Asks for a resync from the start, even if one is under way: what it journaled
    /// so far may never reach the replica (the journal was dropped, or its numbers
    /// are below the server's and will be ignored). A re-enable's resync started
    /// over stays one: it is what the control plane waits for.
    pub fn restart(&self, why: &str) {
        let mut i = self.lock();
        let reenable = i.phase != Phase::Idle && i.now.reenable;
        Self::start(&mut i, why, reenable);
    }

    /// A re-enable's resync (the failover was lifted), from the start even if one is
    /// under way: the journal it journaled into was dropped.
    pub fn reenable(&self, why: &str) {
        Self::start(&mut self.lock(), why, true);
    }

    /// Whether the resync under way is a re-enable's.
    pub fn reenabling(&self) -> bool {
        let i = self.lock();
        i.phase != Phase::Idle && i.now.reenable
    }

    /// A new resync, wanted now: no map, no backoff left from an earlier one.
    fn start(i: &mut Inner, why: &str, reenable: bool) {
        i.phase = Phase::Wanted;
        i.map = None;
        i.retry_at = None;
        i.retries = 0;
        i.started = Some(Instant::now());
        i.now = Figures {
            why: why.to_string(),
            reenable,
            ..Figures::default()
        };
    }

    /// For the sender: true once when the map should be asked for now.
    pub fn take_wanted(&self) -> bool {
        let mut i = self.lock();
        if i.phase != Phase::Wanted || i.retry_at.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        i.phase = Phase::Asked;
        true
    }

    /// The connection dropped: a map asked for will not come; ask again.
    pub fn lost_link(&self) {
        let mut i = self.lock();
        if i.phase == Phase::Asked {
            i.phase = Phase::Wanted;
            let wait = std::time::Duration::from_millis(250) * 2u32.pow(i.retries.min(8));
            i.retry_at = Some(Instant::now() + wait.min(std::time::Duration::from_secs(60)));
            i.retries += 1;
        }
    }

    /// The map arrived: compare `disk_bytes` of the disk against it.
    pub fn got_map(&self, map: BlockSums, disk_bytes: u64) {
        let mut i = self.lock();
        if i.phase != Phase::Asked {
            return;
        }
        i.phase = Phase::Comparing;
        i.retry_at = None;
        i.retries = 0;
        i.now.total = disk_bytes;
        i.map = Some(Arc::new(map));
    }

    /// The next range to compare: (map, offset, length), at most `region` bytes and
    /// whole blocks; None when not comparing.
    pub fn next_range(&self, region: u64) -> Option<(Arc<BlockSums>, u64, u64)> {
        let i = self.lock();
        let map = i.map.clone()?;
        if i.phase != Phase::Comparing || i.now.compared >= i.now.total {
            return None;
        }
        let step = map.block_bytes * (region / map.block_bytes).max(1);
        let len = step.min(i.now.total - i.now.compared);
        Some((map, i.now.compared, len))
    }

    /// Records a compared range; returns the figures once the whole disk is done.
    pub fn advance(&self, len: u64, sent: u64) -> Option<Figures> {
        let mut i = self.lock();
        i.now.compared += len;
        i.now.sent += sent;
        i.now.seconds = i.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        if i.now.compared < i.now.total {
            return None;
        }
        i.phase = Phase::Idle;
        i.map = None;
        let done = std::mem::take(&mut i.now);
        i.last = Some(done.clone());
        Some(done)
    }

    /// (phase, the running resync's figures, the last finished one's).
    pub fn figures(&self) -> (Phase, Figures, Option<Figures>) {
        let i = self.lock();
        let mut now = i.now.clone();
        now.seconds = i.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        (i.phase, now, i.last.clone())
    }
}

/// Progress as the status shows it: percent, MB/s and time left.
pub fn progress_json(done: u64, total: u64, seconds: f64) -> serde_json::Value {
    let rate = done as f64 / seconds.max(1e-3);
    serde_json::json!({
        "done_bytes": done,
        "total_bytes": total,
        "percent": if total == 0 { 0.0 } else { 100.0 * done as f64 / total as f64 },
        "seconds": seconds,
        "mb_per_s": rate / 1e6,
        "left_s": if done == 0 { serde_json::Value::Null } else { (total.saturating_sub(done) as f64 / rate).into() },
    })
}

/// Logs a running copy's or resync's progress (a `progress_json` value).
pub fn log_progress(disk: &str, what: &str, p: &serde_json::Value) {
    let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
    tracing::info!(
        disk,
        percent = format!("{:.1}", f("percent")),
        mb_per_s = format!("{:.0}", f("mb_per_s")),
        left_s = format!("{:.0}", f("left_s")),
        sent_bytes = p["sent_bytes"].as_u64(),
        "{what}"
    );
}

/// A resync's figures as the status shows them: its progress, why, and bytes sent.
pub fn figures_json(f: &Figures) -> serde_json::Value {
    let mut j = progress_json(f.compared, f.total, f.seconds);
    j["why"] = f.why.clone().into();
    j["compared_bytes"] = f.compared.into();
    j["sent_bytes"] = f.sent.into();
    j["reenable"] = f.reenable.into();
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_has_percent_rate_and_time_left() {
        let p = progress_json(25 << 20, 100 << 20, 2.0);
        assert_eq!(p["percent"], 25.0);
        let rate = p["mb_per_s"].as_f64().unwrap();
        assert!((rate - 13.107).abs() < 0.01, "{p}");
        assert!((p["left_s"].as_f64().unwrap() - 6.0).abs() < 1e-9, "{p}");
        assert!(progress_json(0, 100, 1.0)["left_s"].is_null());
    }

    #[test]
    fn a_resync_goes_through_its_phases_and_keeps_its_figures() {
        let r = Resync::default();
        assert!(r.want("test"));
        assert!(!r.want("again"), "one resync at a time");
        assert!(r.take_wanted());
        r.lost_link();
        assert_eq!(r.phase(), Phase::Wanted, "asked again after a lost link");
        assert!(!r.take_wanted(), "not at once");
        // Past the retry delay: the delay itself is what is tested.
        std::thread::sleep(std::time::Duration::from_millis(260));
        assert!(r.take_wanted());
        let map = BlockSums {
            block_bytes: 4,
            disk_bytes: 10,
            sums: vec![[0; 16]; 3],
        };
        r.got_map(map, 10);
        let (_, at, len) = r.next_range(8).unwrap();
        assert_eq!((at, len), (0, 8));
        assert!(r.advance(len, 4).is_none());
        let (_, at, len) = r.next_range(8).unwrap();
        assert_eq!((at, len), (8, 2));
        let done = r.advance(len, 0).unwrap();
        assert_eq!((done.compared, done.sent, done.total), (10, 4, 10));
        assert!(!r.busy());
        assert_eq!(r.figures().2.unwrap().sent, 4);
        // A restart during a comparison starts over and drops the map.
        assert!(r.want("again"));
        assert!(r.take_wanted());
        r.got_map(
            BlockSums {
                block_bytes: 4,
                disk_bytes: 10,
                sums: vec![[0; 16]; 3],
            },
            10,
        );
        r.advance(4, 0);
        r.restart("lost");
        assert_eq!(r.phase(), Phase::Wanted);
        assert!(r.next_range(8).is_none());
        assert_eq!(r.figures().1.compared, 0);
        assert!(!r.reenabling());
    }

    #[test]
    fn a_reenables_resync_stays_one_when_started_over_and_once_done() {
        let r = Resync::default();
        r.reenable("lifted");
        assert!(r.reenabling());
        assert!(!r.want("asked"), "one resync at a time");
        r.restart("the process server holds less");
        assert!(r.reenabling(), "started over, still the re-enable's");
        assert!(r.take_wanted());
        r.got_map(
            BlockSums {
                block_bytes: 4,
                disk_bytes: 4,
                sums: vec![[0; 16]; 1],
            },
            4,
        );
        let done = r.advance(4, 4).unwrap();
        assert!(done.reenable);
        assert!(!r.reenabling());
        assert!(r.figures().2.unwrap().reenable);
        // A restart with none under way is another resync's.
        r.restart("lost");
        assert!(!r.reenabling());
    }
}
