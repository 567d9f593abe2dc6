//! Drains a disk's journal to the process server, in order, over one TLS session at a
//! time. Unacknowledged frames are remembered by journal position only; after a
//! reconnect the journal is read again from the first frame the server does not hold
//! (the Welcome's durable watermark), so nothing is lost and nothing applied twice.
//! The journal is trimmed as the server acknowledges frames durable.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_link::client::{connect, credit_cost, Link, Target};
use ferry_link::log::{Position, Tailer};
use ferry_link::protocol::{
    decode, encode, Decoded, ErrorCode, Frame, Hello, OLDEST_VERSION, VERSION,
};

use super::capture::{journal_end, seq_of, Capture, NO_CONTACT};
use crate::nbd::Device;

/// What the sender reports for `status`.
#[derive(Debug, Default, Clone)]
pub struct SendStatus {
    pub connected: bool,
    /// The protocol version of the session (0 before the first).
    pub protocol: u16,
    pub durable: u64,
    pub uploaded: u64,
    pub sent: u64,
    pub reconnects: u64,
    /// Why the last session ended or the last connection attempt failed (a refusal
    /// by the process server says so and why).
    pub last_error: Option<String>,
    /// Since when the oldest unacknowledged frame has waited.
    pub oldest_unacked: Option<Instant>,
}

/// The process server the senders use, replaceable while they run: an operator's move
/// through the control plane, or a renewed certificate. Each sender reads it before
/// each connection, and drops a session to another address than the current one.
pub struct TargetSlot {
    current: Mutex<Target>,
}

impl TargetSlot {
    pub fn new(t: Target) -> TargetSlot {
        TargetSlot {
            current: Mutex::new(t),
        }
    }

    pub fn get(&self) -> Target {
        self.current.lock().expect("target lock").clone()
    }

    /// Replaces the target; sessions to another address end and reconnect there.
    /// Returns whether the address changed.
    pub fn set(&self, t: Target) -> bool {
        let mut cur = self.current.lock().expect("target lock");
        let moved = cur.addr != t.addr || cur.server_name != t.server_name;
        *cur = t;
        moved
    }
}

pub struct Sender {
    pub capture: Arc<Capture>,
    pub journal_dir: PathBuf,
    pub target: Arc<TargetSlot>,
    pub machine: String,
    pub session: [u8; 16],
    pub status: Arc<Mutex<SendStatus>>,
    pub stop: Arc<AtomicBool>,
    /// Once the machine failed over: no session; a process server's refusal says so.
    pub failover: Arc<super::failover::Switch>,
}

const BATCH_BYTES: usize = 256 << 10;

/// How long a move to another process server waits for the old one to upload what
/// it was sent.
const MOVE_DRAIN: Duration = Duration::from_secs(60);

impl Sender {
    pub fn run(self) {
        let rt = match compio::runtime::Runtime::new() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the sender's runtime");
                return;
            }
        };
        rt.block_on(self.drive());
    }

    fn set(&self, f: impl FnOnce(&mut SendStatus)) {
        f(&mut self.status.lock().expect("status lock"));
    }

    async fn drive(&self) {
        let first = self.capture.state().journal.first_position();
        let mut tail = Tailer::new(&self.journal_dir, first);
        // Sent, not yet durable upstream: (sequence, where it starts in the journal).
        let mut unacked: VecDeque<(u64, Position)> = VecDeque::new();
        let mut link: Option<Link> = None;
        let mut backoff = Duration::from_millis(50);
        let mut last_send = Instant::now();
        // The sequence number of the next frame the tail will read: what the agent
        // holds from, when nothing is waiting for an acknowledgement.
        let mut tail_next = self.capture.state().first_seq;
        // Each connection offers the newest version first and steps down when the
        // server is of an older release: agents may be upgraded before their servers.
        let mut version = VERSION;
        // The last connect failure logged: a refusal (a certificate that does not name
        // this machine) is retried every few seconds for as long as it lasts, and
        // logged once, not at every retry.
        let mut logged: Option<String> = None;
        // Where the current session goes: a move to another process server ends it.
        let mut linked_to: Option<Target> = None;
        while !self.stop.load(Ordering::Relaxed) {
            if !self.failover.replicating() {
                // Failed over: the session ends and none starts until the control
                // plane lifts it; what is unacknowledged is sent again then.
                if let Some(l) = link.take() {
                    let _ = compio::time::timeout(Duration::from_secs(2), l.bye()).await;
                    tracing::info!(disk = %self.capture.disk, "the machine failed over: its session ended, nothing more is replicated");
                    self.set(|s| s.connected = false);
                }
                compio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            // Replication resumes only once a re-enable dropped the journal (before
            // `replicating` turns true): nothing read or unacknowledged from before
            // the drop is sent, and the session starts from the new numbering.
            if let Some((at, seq)) = self.capture.take_reset() {
                tail = Tailer::new(&self.journal_dir, at);
                tail_next = seq;
                unacked.clear();
                if let Some(l) = link.take() {
                    let _ = compio::time::timeout(Duration::from_secs(2), l.bye()).await;
                    self.set(|s| s.connected = false);
                }
            }
            if let (Some(to), Some(_)) = (&linked_to, &link) {
                let now = self.target.get();
                if now.addr != to.addr || now.server_name != to.server_name {
                    tracing::info!(disk = %self.capture.disk, from = %to.addr, to = %now.addr, "moving to another process server: its session resumes from the journal");
                    if let Some(mut l) = link.take() {
                        // Everything sent is first uploaded by the old server, so the
                        // new one, which starts from the store, holds all of it, and no
                        // two servers ever upload this disk at once. Bounded: an old
                        // server that cannot upload is left to the new one's resume
                        // protocol (the journal, or a checksum resync).
                        let sent = tail_next;
                        let drained = compio::time::timeout(
                            MOVE_DRAIN,
                            l.wait_uploaded(sent, Duration::from_millis(50)),
                        )
                        .await;
                        if !matches!(drained, Ok(Ok(()))) {
                            tracing::warn!(disk = %self.capture.disk, uploaded = l.uploaded(), sent, "the old process server did not upload everything sent before the move; the new one resumes from what the store holds");
                        }
                        let _ = compio::time::timeout(Duration::from_secs(2), l.bye()).await;
                    }
                    self.set(|s| s.connected = false);
                }
            }
            if link.as_ref().is_none_or(|l| l.closed().is_some()) {
                self.capture.resync.lost_link();
                if let Some(l) = link.take() {
                    if let Some(e) = l
                        .closed()
                        .filter(|e| e.code() == Some(ErrorCode::FailedOver))
                    {
                        self.failover.refused(&e.to_string());
                    }
                    let why = l.closed().map(|e| e.to_string()).unwrap_or_default();
                    tracing::warn!(disk = %self.capture.disk, reason = %why, "lost the process server; reconnecting");
                    self.set(|s| {
                        s.connected = false;
                        s.last_error = Some(why);
                    });
                }
                let next_seq = self.capture.state().next_seq;
                let from = unacked.front().map_or(tail_next, |u| u.0);
                let hello = Hello {
                    version,
                    machine: &self.machine,
                    disk: &self.capture.disk,
                    session: self.session,
                    journal_from: from,
                    next_seq,
                    disk_bytes: self.capture.size(),
                };
                let target = self.target.get();
                match connect(&target, &hello).await {
                    Ok(l) => {
                        linked_to = Some(target);
                        backoff = Duration::from_millis(50);
                        if logged.take().is_some() {
                            tracing::info!(disk = %self.capture.disk, "connected to the process server");
                        }
                        let durable = l.welcome.durable;
                        // Read again from the first frame not yet sent and acked.
                        if let Some(&(seq, at)) = unacked.front() {
                            tail = Tailer::new(&self.journal_dir, at);
                            tail_next = seq;
                            unacked.clear();
                        }
                        // The first answer tells whether the replica holds anything
                        // of this disk (a full copy or a checksum resync).
                        let _ = self.capture.contact.compare_exchange(
                            NO_CONTACT,
                            durable,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                        self.set(|s| {
                            s.connected = true;
                            s.protocol = l.welcome.version;
                            s.durable = durable;
                            s.uploaded = l.welcome.uploaded;
                            s.reconnects += 1;
                        });
                        version = VERSION;
                        link = Some(l);
                    }
                    Err(e) if e.code() == Some(ErrorCode::Version) && version > OLDEST_VERSION => {
                        version -= 1;
                        tracing::info!(disk = %self.capture.disk, version, reason = %e, "the process server is of an older release: offering an older protocol version");
                        continue;
                    }
                    Err(e) => {
                        if e.code() == Some(ErrorCode::FailedOver) {
                            self.failover.refused(&e.to_string());
                        }
                        match e.durable() {
                            // The server already holds numbers this agent would
                            // reuse: never send different data under them.
                            Some(d) if d > next_seq => self.capture.renumber(d),
                            // The server lost writes this agent no longer holds (its
                            // cache was lost): start over from what it holds.
                            Some(d) if d < from => {
                                let at = self.capture.restart_at(d);
                                tail = Tailer::new(&self.journal_dir, at);
                                tail_next = d;
                                unacked.clear();
                            }
                            _ => {}
                        }
                        if let Some(d) = e.durable() {
                            let _ = self.capture.contact.compare_exchange(
                                NO_CONTACT,
                                d,
                                Ordering::SeqCst,
                                Ordering::SeqCst,
                            );
                        }
                        let e = e.to_string();
                        self.set(|s| s.last_error = Some(e.clone()));
                        if logged.as_ref() != Some(&e) {
                            tracing::warn!(disk = %self.capture.disk, error = %e, "cannot connect to the process server; retrying");
                            logged = Some(e);
                        } else {
                            tracing::debug!(disk = %self.capture.disk, error = %e, "connect failed");
                        }
                        compio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            let l = link.as_mut().expect("connected above");
            let durable = l.durable();
            if self.capture.resync.take_wanted() {
                // Every frame below `tail_next` is sent (or was durable already), so
                // the replica at this sequence is what the server will hold.
                let seq = tail_next.max(durable);
                if l.send_frame(&Frame::SumsRequest { seq }).await.is_err() {
                    link = None;
                    continue;
                }
                tracing::info!(disk = %self.capture.disk, seq, "asked the process server for the replica's checksums");
            }
            if let Some((_, map)) = l.take_sums() {
                self.capture.resync.got_map(map, self.capture.size());
            }
            // Trim what the server holds.
            while unacked.front().is_some_and(|u| u.0 < durable) {
                unacked.pop_front();
            }
            self.capture
                .trim(unacked.front().map_or(tail.position(), |u| u.1));
            self.set(|s| {
                s.durable = durable;
                s.uploaded = l.uploaded();
                if unacked.is_empty() {
                    s.oldest_unacked = None;
                }
            });
            let end = journal_end(&self.capture);
            let entries = match tail.read(end, BATCH_BYTES) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(disk = %self.capture.disk, error = %e, "cannot read the journal");
                    compio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if entries.is_empty() {
                let uploaded = l.uploaded();
                if uploaded < durable && last_send.elapsed() > Duration::from_millis(200) {
                    // Everything sent is durable; ask how much is uploaded (the Ack
                    // to a Flush carries it), for status and for points' visibility.
                    if l.send_frame(&Frame::Flush { seq: durable }).await.is_err() {
                        link = None;
                        continue;
                    }
                    last_send = Instant::now();
                } else if last_send.elapsed() > Duration::from_secs(5) {
                    // Keep the session alive through quiet periods.
                    if l.send_frame(&Frame::Ping { token: 0 }).await.is_err() {
                        link = None;
                        continue;
                    }
                    last_send = Instant::now();
                }
                compio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            let mut batch = Vec::with_capacity(BATCH_BYTES);
            let mut cost = 0;
            let mut sent = 0;
            // Version 1 knew no disk size in a bookmark: the journal's are cut down.
            let v1 = l.welcome.version < 2;
            for e in entries.iter() {
                let Ok(Decoded::Frame(f, _)) = decode(e.payload, u32::MAX) else {
                    continue;
                };
                let Some(seq) = seq_of(&f) else { continue };
                tail_next = seq + 1;
                if seq < durable {
                    continue;
                }
                cost += credit_cost(&f);
                match f {
                    Frame::Bookmark(mut b) if v1 && b.disk_bytes.is_some() => {
                        b.disk_bytes = None;
                        encode(&Frame::Bookmark(b), &mut batch);
                    }
                    _ => batch.extend_from_slice(e.payload),
                }
                unacked.push_back((seq, e.at));
                sent += 1;
            }
            if !batch.is_empty() {
                if let Err(e) = l.send(&batch, cost).await {
                    tracing::warn!(disk = %self.capture.disk, error = %e, "send failed");
                    link = None;
                    continue;
                }
                last_send = Instant::now();
                self.set(|s| {
                    s.sent += sent;
                    s.oldest_unacked.get_or_insert_with(Instant::now);
                });
            }
        }
    }
}
