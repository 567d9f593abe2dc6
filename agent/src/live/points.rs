//! The recovery points an agent has taken and not yet seen uploaded, so that its
//! heartbeat can name the newest point and the newest point durable in the store (the
//! control plane's RPO is the age of the latter).

use std::collections::VecDeque;

use ferry_link::protocol::PointKindWire;

/// Points kept while waiting for their upload. Past it the oldest are forgotten: a
/// newer point, still kept, becomes the newest uploaded soon after anyway.
const KEPT: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct PointMark {
    pub id: String,
    pub kind: PointKindWire,
    pub time_ms: i64,
    /// The bookmark frame's sequence number: the point is in the store once every
    /// frame below `seq + 1` is uploaded.
    pub seq: u64,
}

#[derive(Debug, Default)]
pub struct PointLog {
    waiting: VecDeque<PointMark>,
    newest: Option<PointMark>,
    newest_uploaded: Option<PointMark>,
}

impl PointLog {
    pub fn push(&mut self, p: PointMark) {
        if self.waiting.len() == KEPT {
            self.waiting.pop_front();
        }
        self.newest = Some(p.clone());
        self.waiting.push_back(p);
    }

    /// Forgets the points from sequence `seq` on: their frames were dropped with the
    /// journal and the numbers go to other frames, so they will never be in the
    /// store (a later watermark past them must not claim them uploaded).
    pub fn forget_from(&mut self, seq: u64) {
        self.waiting.retain(|p| p.seq < seq);
        if self.newest.as_ref().is_some_and(|p| p.seq >= seq) {
            self.newest = self
                .waiting
                .back()
                .or(self.newest_uploaded.as_ref())
                .cloned();
        }
    }

    /// The newest point, and the newest with every frame below `uploaded` in the
    /// store (the uploaded watermark the process server reports).
    pub fn report(&mut self, uploaded: u64) -> (Option<PointMark>, Option<PointMark>) {
        while self.waiting.front().is_some_and(|p| p.seq < uploaded) {
            self.newest_uploaded = self.waiting.pop_front();
        }
        (self.newest.clone(), self.newest_uploaded.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(seq: u64) -> PointMark {
        PointMark {
            id: format!("p{seq}"),
            kind: PointKindWire::Crash,
            time_ms: seq as i64,
            seq,
        }
    }

    #[test]
    fn the_newest_uploaded_follows_the_watermark() {
        let mut log = PointLog::default();
        assert_eq!(log.report(100), (None, None));
        log.push(mark(10));
        log.push(mark(20));
        assert_eq!(
            log.report(10),
            (Some(mark(20)), None),
            "10 itself not yet up"
        );
        assert_eq!(log.report(11), (Some(mark(20)), Some(mark(10))));
        assert_eq!(log.report(15), (Some(mark(20)), Some(mark(10))));
        assert_eq!(log.report(21), (Some(mark(20)), Some(mark(20))));
        log.push(mark(30));
        assert_eq!(log.report(21), (Some(mark(30)), Some(mark(20))), "kept");
    }

    #[test]
    fn points_dropped_with_the_journal_are_never_claimed_uploaded() {
        let mut log = PointLog::default();
        log.push(mark(10));
        assert_eq!(log.report(11), (Some(mark(10)), Some(mark(10))));
        log.push(mark(20));
        log.push(mark(30));
        log.forget_from(20);
        assert_eq!(log.report(100), (Some(mark(10)), Some(mark(10))));
        log.push(mark(25));
        log.forget_from(25);
        assert_eq!(log.report(100), (Some(mark(10)), Some(mark(10))));
    }

    #[test]
    fn the_log_is_bounded() {
        let mut log = PointLog::default();
        for s in 0..(KEPT as u64 + 10) {
            log.push(mark(s));
        }
        assert_eq!(log.waiting.len(), KEPT);
        let last = KEPT as u64 + 9;
        assert_eq!(log.report(last + 1), (Some(mark(last)), Some(mark(last))));
    }
}
