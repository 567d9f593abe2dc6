//! How far a build or serve item is, disk by disk (`wire::DiskProgress`), and the
//! item's own progress: the disks' mean weighted by bytes, as the control plane has
//! always been told.
//!
//! A build rebuilds its disks in turn (`failover::run_per_disk`): a disk not started
//! yet is at 0, one that the next disk followed is done (1.0), and each disk's rate
//! is its own bytes over its own time, kept once it is done.

use std::time::Instant;

use ferry_link::control::wire::{DiskProgress, ReadyDisk};

/// The least time a rate is divided by: a disk that took no measurable time does not
/// report an infinite rate.
const MIN_SECS: f64 = 1e-3;

struct Disk {
    name: String,
    /// The stored bytes its point reads.
    bytes: u64,
    /// Stored bytes read so far (a retry reads again: may pass `bytes`).
    read: u64,
    started: Option<Instant>,
    ended: Option<Instant>,
}

impl Disk {
    fn progress(&self) -> f64 {
        if self.ended.is_some() {
            return 1.0;
        }
        if self.started.is_none() || self.bytes == 0 {
            return 0.0;
        }
        // 100 % only once built: the last bytes read are not yet written out.
        (self.read as f64 / self.bytes as f64).min(0.999)
    }

    fn done(&self) -> u64 {
        if self.ended.is_some() {
            self.bytes
        } else {
            self.read.min(self.bytes)
        }
    }

    fn rate(&self, now: Instant) -> f64 {
        match self.started {
            None => 0.0,
            Some(s) => {
                let secs = self.ended.unwrap_or(now).duration_since(s).as_secs_f64();
                self.read as f64 / secs.max(MIN_SECS)
            }
        }
    }
}

/// A build's tally, fed by its progress callback.
pub struct BuildTally {
    disks: Vec<Disk>,
    started: Instant,
}

impl BuildTally {
    /// `disks`: each disk's name and the stored bytes its point reads, in the order
    /// they are rebuilt.
    pub fn new(disks: Vec<(String, u64)>, now: Instant) -> BuildTally {
        BuildTally {
            disks: disks
                .into_iter()
                .map(|(name, bytes)| Disk {
                    name,
                    bytes,
                    read: 0,
                    started: None,
                    ended: None,
                })
                .collect(),
            started: now,
        }
    }

    /// Disk `i` starts; those before it are done (the disks go in turn).
    pub fn start(&mut self, i: usize, now: Instant) {
        for d in self.disks.iter_mut().take(i) {
            if d.ended.is_none() {
                d.started.get_or_insert(now);
                d.ended = Some(now);
            }
        }
        if let Some(d) = self.disks.get_mut(i) {
            d.started.get_or_insert(now);
        }
    }

    /// Disk `i` read `n` more stored bytes (an index out of the plan is ignored).
    pub fn read(&mut self, i: usize, n: u64) {
        if let Some(d) = self.disks.get_mut(i) {
            d.read = d.read.saturating_add(n);
        }
    }

    /// The build succeeded: every disk is done.
    pub fn finish(&mut self, now: Instant) {
        self.start(self.disks.len(), now);
    }

    /// The item's progress (0..1, the disks' mean weighted by bytes) and its rate
    /// (every byte read over the build's time).
    pub fn item(&self, now: Instant) -> (f64, f64) {
        let bytes = self
            .disks
            .iter()
            .map(|d| d.bytes)
            .fold(0, u64::saturating_add);
        let progress = if bytes == 0 {
            // Nothing stored at all: the share of disks done.
            let ended = self.disks.iter().filter(|d| d.ended.is_some()).count();
            ended as f64 / self.disks.len().max(1) as f64
        } else {
            let done = self
                .disks
                .iter()
                .map(Disk::done)
                .fold(0, u64::saturating_add);
            (done as f64 / bytes as f64).min(1.0)
        };
        let read = self
            .disks
            .iter()
            .map(|d| d.read)
            .fold(0, u64::saturating_add);
        let secs = now.duration_since(self.started).as_secs_f64();
        (progress, read as f64 / secs.max(MIN_SECS))
    }

    /// Each disk as reported.
    pub fn disks(&self, now: Instant) -> Vec<DiskProgress> {
        self.disks
            .iter()
            .map(|d| DiskProgress {
                disk: d.name.clone(),
                progress: d.progress(),
                bytes_per_s: d.rate(now),
                bytes_done: d.done(),
                bytes: d.bytes,
            })
            .collect()
    }
}

/// A served item's disks: each is whole at once (reads go to the replica); the
/// recovery host does not hydrate, so there is no copy to follow.
pub fn served(ready: &[ReadyDisk]) -> Vec<DiskProgress> {
    ready
        .iter()
        .map(|d| DiskProgress {
            disk: d.disk.clone(),
            progress: 1.0,
            bytes_per_s: 0.0,
            bytes_done: d.bytes,
            bytes: d.bytes,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_first_disk_is_done_while_the_second_runs_and_the_item_is_their_weighted_mean() {
        let t0 = Instant::now();
        let mut t = BuildTally::new(vec![("d0".into(), 100), ("d1".into(), 300)], t0);
        let before = t.disks(t0);
        assert_eq!((before[0].progress, before[1].progress), (0.0, 0.0));
        t.start(0, t0);
        t.read(0, 50);
        let half = t.disks(t0 + Duration::from_secs(1));
        assert_eq!(half[0].progress, 0.5);
        assert_eq!(half[0].bytes_done, 50);
        assert_eq!(half[0].bytes_per_s, 50.0);
        assert_eq!(half[1].progress, 0.0, "not started");
        t.read(0, 50);
        // All its bytes read, not yet written out: not 100 % before the next starts.
        assert!(t.disks(t0)[0].progress < 1.0);
        t.start(1, t0 + Duration::from_secs(2));
        t.read(1, 150);
        let now = t0 + Duration::from_secs(5);
        let d = t.disks(now);
        assert_eq!(d[0].progress, 1.0);
        assert_eq!(d[0].bytes_done, 100);
        assert_eq!(d[0].bytes_per_s, 50.0, "its own rate, kept once done");
        assert_eq!(d[1].progress, 0.5);
        assert_eq!(d[1].bytes_per_s, 50.0);
        let (progress, rate) = t.item(now);
        assert_eq!(progress, 250.0 / 400.0);
        assert_eq!(rate, 250.0 / 5.0);
        t.finish(now);
        let end = t.disks(now);
        assert!(end
            .iter()
            .all(|d| d.progress == 1.0 && d.bytes_done == d.bytes));
        assert_eq!(t.item(now).0, 1.0);
    }

    #[test]
    fn a_retry_that_reads_again_stays_below_done_and_empty_disks_count_by_number() {
        let t0 = Instant::now();
        let mut t = BuildTally::new(vec![("d0".into(), 10)], t0);
        t.start(0, t0);
        t.read(0, 25);
        let d = &t.disks(t0)[0];
        assert!(d.progress < 1.0);
        assert_eq!(d.bytes_done, 10);
        assert!(t.item(t0).0 <= 1.0);
        let mut e = BuildTally::new(vec![("a".into(), 0), ("b".into(), 0)], t0);
        e.start(1, t0);
        assert_eq!(e.item(t0).0, 0.5);
        // An index past the plan changes nothing.
        e.read(7, 1);
        e.start(9, t0);
        assert_eq!(e.disks(t0).len(), 2);
    }
}
