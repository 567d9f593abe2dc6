//! One agent session for one disk, as the process server sees it (docs/protocol.md).
//!
//! It decides, frame by frame, what happens: append to the cache, ignore a resend,
//! answer, or close with a reason. It never trusts the peer: sequence gaps, frames
//! beyond the granted credit, frames for another disk and frames only a server may send
//! end the session with an error frame. Acks carry two watermarks; credit is returned
//! as the cache makes writes durable, and withheld while the server throttles.

use std::collections::VecDeque;

use ferry_link::protocol::{
    payload_bytes, ErrorCode, Frame, Hello, Welcome, MAX_PAYLOAD_BYTES, OLDEST_VERSION, VERSION,
};

/// The largest disk a session may announce (the VHDX limit): what rebuilds,
/// checksum maps and points are sized by.
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// What the server knows of a disk when a session starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Every write below this sequence number is durable in the cache (or beyond).
    pub durable: u64,
    /// Every write below this is committed in blob storage.
    pub uploaded: u64,
}

/// Bounds a server applies to every session, sized at start-up.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Payload bytes an agent may have in flight, not yet durable.
    pub credit_bytes: u64,
    /// Largest payload of one frame.
    pub max_payload: u32,
    /// Newest protocol version served (`VERSION`); lowered only where a server stands
    /// in for an older release, as tests of agents meeting one do.
    pub newest_version: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            credit_bytes: 8 << 20,
            max_payload: 1 << 20,
            newest_version: VERSION,
        }
    }
}

/// Why a session is being closed; sent to the peer as an Error frame and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub code: ErrorCode,
    pub reason: String,
}

impl Reject {
    fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Reject {
            code,
            reason: reason.into(),
        }
    }

    pub fn frame(&self) -> Frame<'_> {
        Frame::Error {
            code: self.code,
            reason: &self.reason,
        }
    }
}

/// What to do with a frame that was accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Append the frame to the durable cache; it holds sequence `seq`.
    Cache { seq: u64 },
    /// A resend of something already durable: drop it.
    Duplicate,
    /// Send an Ack once everything below `seq` is durable.
    Flush { seq: u64 },
    /// Answer with this frame now.
    Pong { token: u64 },
    /// Send the block checksums of the replica holding every write below `seq`.
    Sums { seq: u64 },
    /// The agent ended the session in order.
    Close,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub machine: String,
    pub disk: String,
    limits: Limits,
    /// The protocol version of this session: the agent's.
    version: u16,
    /// Next sequence number expected on the wire.
    next: u64,
    /// Durable watermark last told to the agent.
    acked: u64,
    /// (sequence, payload bytes) of frames cached but not yet durable, in order.
    pending: VecDeque<(u64, u64)>,
    /// Payload bytes received and not yet durable.
    in_flight: u64,
    /// Credit the agent holds: it may send this many more payload bytes.
    credit: u64,
    /// Credit earned back by durable writes but withheld while throttling.
    owed: u64,
    throttled: bool,
}

impl Session {
    /// Answers a Hello. `owns` says whether this server serves that machine's disk.
    pub fn start(
        hello: &Hello<'_>,
        progress: Progress,
        limits: Limits,
        owns: impl FnOnce(&str, &str) -> bool,
    ) -> Result<(Session, Welcome), Reject> {
        let newest = limits.newest_version.min(VERSION);
        if !(OLDEST_VERSION..=newest).contains(&hello.version) {
            return Err(Reject::new(
                ErrorCode::Version,
                format!(
                    "protocol version {} is not supported; this server speaks {OLDEST_VERSION} to {newest}",
                    hello.version
                ),
            ));
        }
        if hello.disk_bytes > MAX_DISK_BYTES {
            return Err(Reject::new(
                ErrorCode::Malformed,
                format!(
                    "a disk of {} bytes exceeds the limit of {MAX_DISK_BYTES} (64 TiB)",
                    hello.disk_bytes
                ),
            ));
        }
        if !owns(hello.machine, hello.disk) {
            return Err(Reject::new(
                ErrorCode::NotOwned,
                format!(
                    "disk {} of machine {} is not served by this process server",
                    hello.disk, hello.machine
                ),
            ));
        }
        if progress.durable < hello.journal_from {
            return Err(Reject::new(
                ErrorCode::Sequence,
                format!(
                    "writes {}..{} are neither here nor in the agent's journal: resync",
                    progress.durable, hello.journal_from
                ),
            ));
        }
        if hello.next_seq < progress.durable {
            return Err(Reject::new(
                ErrorCode::Sequence,
                format!(
                    "the agent's next sequence {} is below what is durable here ({}): resync",
                    hello.next_seq, progress.durable
                ),
            ));
        }
        let max_payload = limits.max_payload.min(MAX_PAYLOAD_BYTES);
        let session = Session {
            machine: hello.machine.to_string(),
            disk: hello.disk.to_string(),
            limits: Limits {
                max_payload,
                ..limits
            },
            version: hello.version,
            next: progress.durable,
            acked: progress.durable,
            pending: VecDeque::new(),
            in_flight: 0,
            credit: limits.credit_bytes,
            owed: 0,
            throttled: false,
        };
        let welcome = Welcome {
            // The session speaks the agent's version.
            version: hello.version,
            durable: progress.durable,
            uploaded: progress.uploaded,
            credit: limits.credit_bytes,
            max_payload,
        };
        Ok((session, welcome))
    }

    pub fn max_payload(&self) -> u32 {
        self.limits.max_payload
    }

    /// Next sequence number the session expects.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// The durable watermark last told to the agent.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Payload bytes received and not yet durable.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// Judges one frame from the agent.
    pub fn on_frame(&mut self, f: &Frame<'_>) -> Result<Action, Reject> {
        let seq = match f {
            Frame::Write { seq, .. } | Frame::Zero { seq, .. } => *seq,
            Frame::Bookmark(b) => {
                // As a server of that release would: it knew no such field.
                if self.version < 2 && b.disk_bytes.is_some() {
                    return Err(Reject::new(
                        ErrorCode::Malformed,
                        format!("point {}: a version-1 bookmark names no disk size", b.id),
                    ));
                }
                if b.disk_bytes.is_some_and(|n| n == 0 || n > MAX_DISK_BYTES) {
                    return Err(Reject::new(
                        ErrorCode::Malformed,
                        format!(
                            "point {} names a disk of {} bytes: not between 1 and {MAX_DISK_BYTES} (64 TiB)",
                            b.id,
                            b.disk_bytes.unwrap_or(0)
                        ),
                    ));
                }
                b.seq
            }
            Frame::Flush { seq } => {
                if *seq > self.next {
                    return Err(Reject::new(
                        ErrorCode::Sequence,
                        format!("flush of {seq} beyond the last write {}", self.next),
                    ));
                }
                return Ok(Action::Flush { seq: *seq });
            }
            Frame::SumsRequest { seq } => {
                if *seq > self.next {
                    return Err(Reject::new(
                        ErrorCode::Sequence,
                        format!(
                            "checksums asked at {seq}, beyond the last write {}",
                            self.next
                        ),
                    ));
                }
                return Ok(Action::Sums { seq: *seq });
            }
            Frame::Ping { token } => return Ok(Action::Pong { token: *token }),
            Frame::Bye => return Ok(Action::Close),
            Frame::Pong { .. } => return Ok(Action::Duplicate),
            other => {
                return Err(Reject::new(
                    ErrorCode::Malformed,
                    format!("an agent may not send {}", frame_name(other)),
                ));
            }
        };
        if seq < self.next {
            return Ok(Action::Duplicate);
        }
        if seq > self.next {
            return Err(Reject::new(
                ErrorCode::Sequence,
                format!("sequence {seq} skips ahead of {}", self.next),
            ));
        }
        if let Frame::Write { data, .. } = f {
            if data.len() > self.limits.max_payload as usize {
                return Err(Reject::new(
                    ErrorCode::TooLarge,
                    format!(
                        "a write of {} bytes exceeds {}",
                        data.len(),
                        self.limits.max_payload
                    ),
                ));
            }
        }
        let bytes = payload_bytes(f);
        if bytes > self.credit {
            return Err(Reject::new(
                ErrorCode::Credit,
                format!(
                    "{bytes} bytes sent with {} bytes of credit left",
                    self.credit
                ),
            ));
        }
        self.credit -= bytes;
        self.in_flight += bytes;
        self.pending.push_back((seq, bytes));
        self.next += 1;
        Ok(Action::Cache { seq })
    }

    /// The cache made everything below `durable` durable (and blob storage everything
    /// below `uploaded`): returns the Ack to send and the credit to return, if any.
    pub fn durable(
        &mut self,
        durable: u64,
        uploaded: u64,
    ) -> (Option<Frame<'static>>, Option<Frame<'static>>) {
        let mut freed = 0;
        while let Some(&(seq, bytes)) = self.pending.front() {
            if seq >= durable {
                break;
            }
            freed += bytes;
            self.pending.pop_front();
        }
        self.in_flight -= freed;
        let ack = (durable > self.acked).then(|| {
            self.acked = durable;
            Frame::Ack { durable, uploaded }
        });
        self.owed += freed;
        (ack, self.release())
    }

    /// Throttling withholds returned credit (the cache is nearly full); the agent then
    /// waits, and nothing is ever dropped.
    pub fn set_throttled(&mut self, throttled: bool) -> Option<Frame<'static>> {
        self.throttled = throttled;
        self.release()
    }

    fn release(&mut self) -> Option<Frame<'static>> {
        if self.throttled || self.owed == 0 {
            return None;
        }
        let bytes = std::mem::take(&mut self.owed);
        self.credit += bytes;
        Some(Frame::Credit { bytes })
    }
}

fn frame_name(f: &Frame<'_>) -> &'static str {
    match f {
        Frame::Hello(_) => "a second hello",
        Frame::Welcome(_) => "welcome",
        Frame::Ack { .. } => "ack",
        Frame::Credit { .. } => "credit",
        Frame::Error { .. } => "error",
        Frame::Sums { .. } => "sums",
        _ => "this frame",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_link::protocol::{Bookmark, PointKindWire};

    fn hello(journal_from: u64, next_seq: u64) -> Hello<'static> {
        Hello {
            version: VERSION,
            machine: "m",
            disk: "d",
            session: [1; 16],
            journal_from,
            next_seq,
            disk_bytes: 1 << 30,
        }
    }

    fn bookmark(seq: u64, disk_bytes: Option<u64>) -> Frame<'static> {
        Frame::Bookmark(Bookmark {
            seq,
            kind: PointKindWire::Crash,
            time_ms: 0,
            id: "p",
            group: "",
            label: "",
            disk_bytes,
        })
    }

    fn limits() -> Limits {
        Limits {
            credit_bytes: 1000,
            max_payload: 512,
            newest_version: VERSION,
        }
    }

    #[test]
    fn resumes_at_the_durable_watermark_and_drops_resends() {
        let p = Progress {
            durable: 5,
            uploaded: 3,
        };
        let (mut s, w) = Session::start(&hello(2, 9), p, limits(), |_, _| true).unwrap();
        assert_eq!(
            (w.durable, w.uploaded, w.credit, w.max_payload),
            (5, 3, 1000, 512)
        );
        // The agent resends from its journal: 2..5 are duplicates, 5 is new.
        for seq in 2..5 {
            assert_eq!(
                s.on_frame(&Frame::Zero {
                    seq,
                    offset: 0,
                    len: 1
                }),
                Ok(Action::Duplicate)
            );
        }
        assert_eq!(
            s.on_frame(&Frame::Write {
                seq: 5,
                offset: 0,
                data: b"abc"
            }),
            Ok(Action::Cache { seq: 5 })
        );
        let bm = bookmark(6, Some(1 << 30));
        let e = s.clone().on_frame(&bookmark(6, Some(0))).unwrap_err();
        assert_eq!(e.code, ErrorCode::Malformed);
        assert!(
            e.reason.contains("point p names a disk of 0 bytes"),
            "{}",
            e.reason
        );
        assert_eq!(s.on_frame(&bm), Ok(Action::Cache { seq: 6 }));
        assert_eq!(
            s.on_frame(&Frame::Flush { seq: 7 }),
            Ok(Action::Flush { seq: 7 })
        );
        assert_eq!(
            s.on_frame(&Frame::SumsRequest { seq: 7 }),
            Ok(Action::Sums { seq: 7 })
        );
        assert_eq!(
            s.clone()
                .on_frame(&Frame::SumsRequest { seq: 8 })
                .unwrap_err()
                .code,
            ErrorCode::Sequence
        );
        let e = s
            .on_frame(&Frame::Write {
                seq: 9,
                offset: 0,
                data: b"x",
            })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Sequence);
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        let p = Progress {
            durable: 5,
            uploaded: 0,
        };
        let e = Session::start(&hello(7, 9), p, limits(), |_, _| true).unwrap_err();
        assert_eq!(e.code, ErrorCode::Sequence, "{}", e.reason);
        let e = Session::start(&hello(0, 3), p, limits(), |_, _| true).unwrap_err();
        assert_eq!(e.code, ErrorCode::Sequence);
        let e = Session::start(&hello(0, 9), p, limits(), |_, d| d == "other").unwrap_err();
        assert_eq!(e.code, ErrorCode::NotOwned);
        assert!(e.reason.contains("disk d of machine m"));
        let mut h = hello(0, 9);
        h.disk_bytes = MAX_DISK_BYTES + 1;
        let e = Session::start(&h, p, limits(), |_, _| true).unwrap_err();
        assert_eq!(e.code, ErrorCode::Malformed);
        assert!(e.reason.contains("64 TiB"), "{}", e.reason);
        let mut h = hello(0, 9);
        h.version = 9;
        let e = Session::start(&h, p, limits(), |_, _| true).unwrap_err();
        assert_eq!(e.code, ErrorCode::Version);
        assert!(e.reason.contains("speaks 1 to 2"), "{}", e.reason);
        // An agent not yet upgraded is served in its own version, and held to it.
        h.version = 1;
        let (mut s1, w) = Session::start(&h, p, limits(), |_, _| true).unwrap();
        assert_eq!(w.version, 1);
        let e = s1
            .clone()
            .on_frame(&bookmark(5, Some(1 << 30)))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Malformed, "{}", e.reason);
        assert_eq!(
            s1.on_frame(&bookmark(5, None)),
            Ok(Action::Cache { seq: 5 })
        );
        // A server standing in for the release before: version 2 is refused.
        let old = Limits {
            newest_version: 1,
            ..limits()
        };
        let e = Session::start(&hello(0, 9), p, old, |_, _| true).unwrap_err();
        assert_eq!(e.code, ErrorCode::Version);
        assert!(e.reason.contains("speaks 1 to 1"), "{}", e.reason);
        let (mut s, _) = Session::start(&hello(0, 9), p, limits(), |_, _| true).unwrap();
        let w = Frame::Welcome(Welcome {
            version: 1,
            durable: 0,
            uploaded: 0,
            credit: 0,
            max_payload: 0,
        });
        assert_eq!(s.on_frame(&w).unwrap_err().code, ErrorCode::Malformed);
        let big = vec![0u8; 600];
        assert_eq!(
            s.on_frame(&Frame::Write {
                seq: 5,
                offset: 0,
                data: &big
            })
            .unwrap_err()
            .code,
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn credit_is_spent_returned_and_withheld_while_throttled() {
        let (mut s, _) =
            Session::start(&hello(0, 0), Progress::default(), limits(), |_, _| true).unwrap();
        let data = [7u8; 400];
        assert!(s
            .on_frame(&Frame::Write {
                seq: 0,
                offset: 0,
                data: &data
            })
            .is_ok());
        assert!(s
            .on_frame(&Frame::Write {
                seq: 1,
                offset: 0,
                data: &data
            })
            .is_ok());
        // 200 bytes of credit left: a third write of 400 is a protocol violation.
        let e = s
            .on_frame(&Frame::Write {
                seq: 2,
                offset: 0,
                data: &data,
            })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Credit);

        let (mut s, _) =
            Session::start(&hello(0, 0), Progress::default(), limits(), |_, _| true).unwrap();
        s.on_frame(&Frame::Write {
            seq: 0,
            offset: 0,
            data: &data,
        })
        .unwrap();
        s.on_frame(&Frame::Write {
            seq: 1,
            offset: 0,
            data: &data,
        })
        .unwrap();
        assert_eq!(s.set_throttled(true), None);
        let (ack, credit) = s.durable(1, 0);
        assert_eq!(
            ack,
            Some(Frame::Ack {
                durable: 1,
                uploaded: 0
            })
        );
        assert_eq!(credit, None, "withheld while throttled");
        assert_eq!(s.in_flight(), 400);
        assert_eq!(s.set_throttled(false), Some(Frame::Credit { bytes: 400 }));
        let (ack, credit) = s.durable(2, 2);
        assert_eq!(
            ack,
            Some(Frame::Ack {
                durable: 2,
                uploaded: 2
            })
        );
        assert_eq!(credit, Some(Frame::Credit { bytes: 400 }));
        assert_eq!(s.durable(2, 2), (None, None), "nothing new to say");
    }
}
