//! One agent connection on a shard: TLS handshake with a required client certificate,
//! the Hello, a claim on the disk, then two tasks — the reader judges frames and
//! appends them to the shard's cache log; the writer sends acknowledgements and credit
//! as the committer makes appends durable. Anything wrong closes this connection only,
//! with an Error frame and a logged reason.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{select, Either};
use tokio::sync::{mpsc, Notify};

use ferry_link::log::{LogError, Position};
use ferry_link::protocol::{
    decode, encode, Decoded, ErrorCode, Frame, HEADER_BYTES, SUMS_HEADER_BYTES, SUM_BYTES,
};
use ferry_link::tls::{handshake, TlsReader, TlsWriter};

use super::end::{unavailable, End};
use super::hello::read_first;
use super::registry::DiskEntry;
use super::session::{Action, Reject, Session};
use super::shard::Shard;
use super::sums::{prepare, Outgoing};
use crate::error::ConnError;

struct State {
    session: Session,
    /// Cached, not yet durable: (sequence, end of its record, arrival).
    pending: VecDeque<(u64, Position, Instant)>,
    /// An Ack is owed once every write below this is durable.
    flush: Option<u64>,
    /// Frames to send as soon as possible (pongs).
    outbox: Vec<u8>,
    end: Option<End>,
    throttled: bool,
    /// The disk's size as the Hello gave it.
    disk_bytes: u64,
    /// A checksum map being made, then sent (one per session at a time).
    sums_task: Option<compio::runtime::JoinHandle<()>>,
    sums: Option<Outgoing>,
}

/// Runs a shard until its connection channel closes: the committer, and a task for
/// each connection the acceptor hands over.
pub async fn run_shard(shard: Rc<Shard>, mut conns: mpsc::Receiver<std::net::TcpStream>) {
    shard.start_committer();
    while let Some(tcp) = conns.recv().await {
        compio::runtime::spawn(serve(shard.clone(), tcp)).detach();
    }
}

pub async fn serve(shard: Rc<Shard>, tcp: std::net::TcpStream) {
    let peer = tcp
        .peer_addr()
        .map_or_else(|_| "unknown".to_string(), |a: SocketAddr| a.to_string());
    let _ = tcp.set_nodelay(true);
    shard.metrics.borrow_mut().connections += 1;
    if let Err(why) = serve_inner(&shard, tcp, &peer).await {
        tracing::warn!(shard = shard.shared.id, %peer, reason = %why, "connection closed");
    }
    shard.shared.connections.fetch_sub(1, Ordering::Relaxed);
}

async fn serve_inner(
    shard: &Rc<Shard>,
    tcp: std::net::TcpStream,
    peer: &str,
) -> Result<(), ConnError> {
    let tcp = compio::net::TcpStream::from_std(tcp).map_err(|source| ConnError::Io {
        op: "socket",
        source,
    })?;
    let conn = rustls::ServerConnection::new(shard.tls.clone()).map_err(ConnError::Tls)?;
    let (mut reader, mut writer) = match handshake(tcp, conn, shard.opts.handshake_timeout).await {
        Ok(halves) => halves,
        Err(e) => {
            shard.metrics.borrow_mut().error("tls");
            return Err(ConnError::Handshake(e));
        }
    };
    let mut inbuf: Vec<u8> = Vec::with_capacity(128 << 10);
    let first = read_first(shard, &mut reader, &mut inbuf).await;
    let (hello_len, entry, progress, claimed) = match first {
        Ok(f) => (f.used, f.entry, f.progress, f.claimed),
        Err(End::Reject(r)) => return refuse(shard, writer, r).await,
        Err(End::Gone(why)) => return Err(ConnError::Gone(why)),
        Err(End::Bye) => return Ok(()),
    };
    let hello_bytes = inbuf[..hello_len].to_vec();
    let Ok(Decoded::Frame(Frame::Hello(hello), _)) = decode(&hello_bytes, u32::MAX) else {
        return Err(ConnError::Gone("the hello vanished from its buffer".into()));
    };
    // Judge the hello before taking the disk from another session.
    if let Err(r) = Session::start(&hello, progress, shard.opts.limits, |m, d| {
        entry.machine == m && entry.disk == d
    }) {
        return refuse_behind(shard, writer, r, progress).await;
    }
    let stop = Arc::new(Notify::new());
    let claim = match entry
        .claim(
            shard.shared.id,
            shard.conn_id(),
            stop.clone(),
            shard.opts.claim_timeout,
        )
        .await
    {
        Ok(c) => c,
        Err(r) => return refuse(shard, writer, r).await,
    };
    // A new claim dropped what this server cached under an older one; an earlier
    // session of that claim, ended now, may have raised the watermarks meanwhile.
    if let Some(n) = claimed {
        entry.uploaded.store(n, Ordering::SeqCst);
        entry.durable.store(n, Ordering::SeqCst);
    }
    // The progress read before the claim may be stale if an earlier session just
    // ended: answer with the watermarks as they are now.
    let progress = super::session::Progress {
        durable: entry.durable.load(Ordering::SeqCst),
        uploaded: entry.uploaded.load(Ordering::SeqCst),
    };
    let (session, welcome) = match Session::start(&hello, progress, shard.opts.limits, |_, _| true)
    {
        Ok(v) => v,
        Err(r) => {
            entry.release(claim);
            return refuse_behind(shard, writer, r, progress).await;
        }
    };
    // The Hello goes into the cache too: it carries the disk size for the points.
    // Where it lies marks where this claim's writes begin in this shard's log.
    let hello_at = shard.log.borrow().end_position();
    let appended = if shard.durable.borrow().failed {
        Err(LogError::Full { used: 0, max: 0 })
    } else {
        shard.log.borrow_mut().append(&entry.key, &hello_bytes)
    };
    if let Err(e) = appended {
        entry.release(claim);
        return refuse(shard, writer, unavailable(format!("cache: {e}"))).await;
    }
    // On record before the Welcome, so that a restart tells this claim's writes from
    // an older one's (`claims`).
    if let Some(rec) = entry.cached_hello(shard.shared.id, hello_at) {
        let claims = shard.registry.claims.clone();
        let (m, d) = (entry.machine.clone(), entry.disk.clone());
        let put = compio::runtime::spawn_blocking(move || claims.put(&m, &d, &rec))
            .await
            .unwrap_or_else(|_| {
                Err(ferry_replica::Error::Invalid(
                    "writing the claim panicked".into(),
                ))
            });
        if let Err(e) = put {
            entry.release(claim);
            return refuse(
                shard,
                writer,
                unavailable(format!("disk {}: {e}", entry.key)),
            )
            .await;
        }
    }
    let mut out = Vec::new();
    encode(&Frame::Welcome(welcome), &mut out);
    if let Err(source) = writer.send(&out).await {
        entry.release(claim);
        return Err(ConnError::Io {
            op: "sending welcome",
            source,
        });
    }
    tracing::info!(shard = shard.shared.id, %peer, disk = %entry.key, durable = progress.durable, uploaded = progress.uploaded, "session started");
    inbuf.drain(..hello_len);
    let state = Rc::new(RefCell::new(State {
        session,
        pending: VecDeque::new(),
        flush: None,
        outbox: Vec::new(),
        end: None,
        throttled: false,
        disk_bytes: hello.disk_bytes,
        sums_task: None,
        sums: None,
    }));
    let wake_writer = Rc::new(Notify::new());
    let write_task = compio::runtime::spawn(write_loop(
        shard.clone(),
        entry.clone(),
        state.clone(),
        wake_writer.clone(),
        writer,
    ));
    let read_end = read_loop(
        shard,
        &entry,
        &state,
        &wake_writer,
        &mut reader,
        &mut inbuf,
        &stop,
    )
    .await;
    {
        let mut st = state.borrow_mut();
        if st.end.is_none() {
            st.end = Some(read_end);
        }
    }
    wake_writer.notify_one();
    let result = write_task.await.unwrap_or(Err(ConnError::WriterFailed));
    entry.release(claim);
    let end = state.borrow_mut().end.take();
    match end {
        Some(End::Bye) | None => result,
        Some(End::Reject(r)) => {
            shard.metrics.borrow_mut().error(error_kind(r.code));
            Err(ConnError::Closed {
                code: r.code,
                reason: r.reason,
            })
        }
        Some(End::Gone(why)) => Err(ConnError::Gone(why)),
    }
}

/// The end of a session whose machine the control plane says failed over.
fn failed_over_end(shard: &Shard, entry: &DiskEntry) -> Option<End> {
    let machine = entry.key.split('/').next().unwrap_or("");
    let why = shard.opts.failed_over.refusal(machine)?;
    Some(End::Reject(Reject {
        code: ErrorCode::FailedOver,
        reason: format!("{why}; the session for {} is closed", entry.key),
    }))
}

fn error_kind(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Sequence | ErrorCode::Credit => "sequence",
        ErrorCode::NotOwned | ErrorCode::FailedOver => "not_owned",
        ErrorCode::Unavailable => "cache",
        _ => "malformed",
    }
}

/// Tells the peer why, then closes.
async fn refuse(shard: &Shard, mut writer: TlsWriter, r: Reject) -> Result<(), ConnError> {
    shard.metrics.borrow_mut().error(error_kind(r.code));
    let mut out = Vec::new();
    encode(&r.frame(), &mut out);
    let _ = writer.send(&out).await;
    let _ = writer.close().await;
    Err(ConnError::Refused {
        code: r.code,
        reason: r.reason,
    })
}

/// A refusal of the agent's sequence numbers is preceded by an Ack with the disk's
/// watermarks (docs/protocol.md, Session 2), so the agent learns, typed, where the
/// server stands: above its numbering (it lost its own) or below its journal (the
/// server lost writes).
async fn refuse_behind(
    shard: &Shard,
    mut writer: TlsWriter,
    r: Reject,
    progress: super::session::Progress,
) -> Result<(), ConnError> {
    if r.code == ErrorCode::Sequence {
        let mut out = Vec::new();
        encode(
            &Frame::Ack {
                durable: progress.durable,
                uploaded: progress.uploaded,
            },
            &mut out,
        );
        if let Err(source) = writer.send(&out).await {
            return Err(ConnError::Io {
                op: "refusing",
                source,
            });
        }
    }
    refuse(shard, writer, r).await
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    shard: &Rc<Shard>,
    entry: &Arc<DiskEntry>,
    state: &Rc<RefCell<State>>,
    wake_writer: &Rc<Notify>,
    reader: &mut TlsReader,
    inbuf: &mut Vec<u8>,
    stop: &Notify,
) -> End {
    let timeout = shard.opts.peer_timeout;
    let max_payload = state.borrow().session.max_payload();
    // The revoked list may change while the session runs: looked at again, at the
    // next frame, only when it did.
    let cert = reader.peer_certificate();
    let mut revoked_seen = shard.opts.revoked.generation();
    // So may the failed-over list: looked at before every frame (one atomic load), so
    // that no write of a machine reaches the cache once the server learned that it
    // failed over. Looked at once at the first frame whatever the generation: the
    // list may have changed since the Hello was judged.
    let mut failed_over_seen = u64::MAX;
    loop {
        let generation = shard.opts.revoked.generation();
        if generation != revoked_seen {
            revoked_seen = generation;
            if let Some(why) = shard.opts.revoked.refusal(cert.as_deref()) {
                return End::Reject(Reject {
                    code: ErrorCode::NotOwned,
                    reason: format!("{why}; the session for {} is closed", entry.key),
                });
            }
        }
        // Judge every whole frame in the buffer.
        let mut start = 0;
        let mut need = HEADER_BYTES;
        // A judged frame the full cache could not take: (sequence, length).
        let mut blocked = None;
        while start < inbuf.len() {
            let (f, used) = match decode(&inbuf[start..], max_payload) {
                Ok(Decoded::Frame(f, used)) => (f, used),
                Ok(Decoded::Incomplete(n)) => {
                    need = n;
                    break;
                }
                Err(e) => {
                    return End::Reject(Reject {
                        code: e.code(),
                        reason: e.to_string(),
                    })
                }
            };
            let generation = shard.opts.failed_over.generation();
            if generation != failed_over_seen {
                failed_over_seen = generation;
                if let Some(end) = failed_over_end(shard, entry) {
                    return end;
                }
            }
            let mut st = state.borrow_mut();
            match st.session.on_frame(&f) {
                Ok(Action::Cache { seq }) => {
                    match append_frame(shard, entry, &mut st, seq, &inbuf[start..start + used]) {
                        Ok(true) => {}
                        Ok(false) => {
                            blocked = Some((seq, used));
                            break;
                        }
                        Err(end) => return end,
                    }
                }
                Ok(Action::Duplicate) => {}
                Ok(Action::Flush { seq }) => {
                    st.flush = Some(st.flush.map_or(seq, |f| f.max(seq)));
                    wake_writer.notify_one();
                }
                Ok(Action::Pong { token }) => {
                    encode(&Frame::Pong { token }, &mut st.outbox);
                    wake_writer.notify_one();
                }
                Ok(Action::Sums { seq }) => {
                    if st.sums_task.is_some() {
                        return End::Reject(Reject {
                            code: ErrorCode::Malformed,
                            reason: "a checksum map is already on its way to this session".into(),
                        });
                    }
                    let task = make_sums(
                        shard.clone(),
                        entry.clone(),
                        Rc::downgrade(state),
                        wake_writer.clone(),
                        seq,
                        st.disk_bytes,
                    );
                    st.sums_task = Some(compio::runtime::spawn(task));
                }
                Ok(Action::Close) => return End::Bye,
                Err(r) => return End::Reject(r),
            }
            start += used;
        }
        inbuf.drain(..start);
        if let Some((seq, used)) = blocked {
            // Backpressure, not a disconnect: hold the frame (and stop reading, so
            // TCP pushes back on the agent) until uploads free room in the cache.
            tracing::warn!(shard = shard.shared.id, disk = %entry.key, "the cache is full: holding the agent until uploads free room");
            loop {
                let stopped = {
                    let nap = pin!(compio::time::sleep(Duration::from_millis(20)));
                    let stopped = pin!(stop.notified());
                    matches!(select(nap, stopped).await, Either::Right(_))
                };
                if stopped {
                    return End::Reject(unavailable("a newer session took over this disk"));
                }
                // Held while the machine failed over: it never reaches the cache.
                let generation = shard.opts.failed_over.generation();
                if generation != failed_over_seen {
                    failed_over_seen = generation;
                    if let Some(end) = failed_over_end(shard, entry) {
                        return end;
                    }
                }
                let mut st = state.borrow_mut();
                match append_frame(shard, entry, &mut st, seq, &inbuf[..used]) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(end) => return end,
                }
            }
            inbuf.drain(..used);
            continue;
        }
        if inbuf.capacity() > (256 << 10) && inbuf.len() < (64 << 10) && need < (64 << 10) {
            // A big frame passed; do not keep its buffer for an idle connection.
            inbuf.shrink_to(128 << 10);
        }
        let outcome = {
            let read = pin!(compio::time::timeout(timeout, reader.read(inbuf)));
            let stopped = pin!(stop.notified());
            match select(read, stopped).await {
                Either::Left((r, _)) => Either::Left(r),
                Either::Right(_) => Either::Right(()),
            }
        };
        match outcome {
            Either::Left(Ok(Ok(0))) => {
                return End::Gone(if inbuf.is_empty() {
                    "the agent closed the connection without bye".into()
                } else {
                    format!(
                        "the agent closed the connection within a frame ({} of {need} bytes)",
                        inbuf.len()
                    )
                })
            }
            Either::Left(Ok(Ok(_))) => {}
            Either::Left(Ok(Err(e))) => return End::Gone(format!("read: {e}")),
            Either::Left(Err(_)) => {
                return End::Reject(Reject {
                    code: ErrorCode::Malformed,
                    reason: if inbuf.is_empty() {
                        format!("idle for {timeout:?} without a ping")
                    } else {
                        format!(
                            "stalled for {timeout:?} within a frame ({} of {need} bytes)",
                            inbuf.len()
                        )
                    },
                })
            }
            Either::Right(_) => {
                return End::Reject(unavailable("a newer session took over this disk"))
            }
        }
    }
}

/// Appends a judged frame (sequence `seq`) to the shard's cache log, to be
/// acknowledged once synced. Ok(false): the cache is full, try again later.
fn append_frame(
    shard: &Shard,
    entry: &DiskEntry,
    st: &mut State,
    seq: u64,
    frame: &[u8],
) -> Result<bool, End> {
    if shard.durable.borrow().failed {
        return Err(End::Reject(unavailable(
            "this shard's cache failed; reconnect",
        )));
    }
    let appended = shard.log.borrow_mut().append(&entry.key, frame);
    let end = match appended {
        // Durable once the synced prefix reaches the record's end.
        Ok(_) => shard.log.borrow().end_position(),
        Err(LogError::Full { used: 0, max }) => {
            return Err(End::Reject(unavailable(format!(
                "a record of {} bytes can never fit a cache of {max} bytes",
                frame.len()
            ))))
        }
        Err(LogError::Full { .. }) => return Ok(false),
        Err(e) => return Err(End::Reject(unavailable(format!("cache: {e}")))),
    };
    st.pending.push_back((seq, end, Instant::now()));
    shard.metrics.borrow_mut().bytes_in += frame.len() as u64;
    shard
        .shared
        .backlog
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
    shard.commit.notify_one();
    Ok(true)
}

/// Makes the replica's checksum map at `seq` and queues it for the writer; a failure
/// ends the session with the reason (the agent asks again after reconnecting).
async fn make_sums(
    shard: Rc<Shard>,
    entry: Arc<DiskEntry>,
    state: Weak<RefCell<State>>,
    wake: Rc<Notify>,
    seq: u64,
    disk_bytes: u64,
) {
    let alive = {
        let s = state.clone();
        move || s.upgrade().is_some_and(|st| st.borrow().end.is_none())
    };
    let made = prepare(
        entry,
        shard.registry.clone(),
        shard.opts.cache_dir.clone(),
        seq,
        disk_bytes,
        alive,
    )
    .await;
    let Some(st) = state.upgrade() else { return };
    let mut st = st.borrow_mut();
    match made {
        Ok((map, permit)) => {
            st.sums = Some(Outgoing {
                seq,
                map,
                next: 0,
                permit,
            })
        }
        Err(e) => {
            shard.metrics.borrow_mut().error("store");
            if st.end.is_none() {
                st.end = Some(End::Reject(Reject {
                    code: ErrorCode::Internal,
                    reason: format!("cannot make the checksum map: {e}"),
                }));
            }
        }
    }
    wake.notify_one();
}

/// Encodes the next chunk of a checksum map, if one is being sent; returns whether
/// more chunks follow.
fn next_sums_chunk(st: &mut State, out: &mut Vec<u8>) -> bool {
    let per = (st.session.max_payload() as usize - SUMS_HEADER_BYTES) / SUM_BYTES;
    let Some(o) = st.sums.as_mut() else {
        return false;
    };
    let total = o.map.sums.len();
    let end = (o.next + per).min(total);
    encode(
        &Frame::Sums {
            seq: o.seq,
            block_bytes: o.map.block_bytes as u32,
            disk_bytes: o.map.disk_bytes,
            first: o.next as u64,
            sums: o.map.sums[o.next..end].as_flattened(),
        },
        out,
    );
    o.next = end;
    if end < total {
        return true;
    }
    st.sums = None;
    st.sums_task = None;
    false
}

async fn write_loop(
    shard: Rc<Shard>,
    entry: Arc<DiskEntry>,
    state: Rc<RefCell<State>>,
    wake: Rc<Notify>,
    mut writer: TlsWriter,
) -> Result<(), ConnError> {
    let mut durable = shard.durable.subscribe();
    let mut out = Vec::new();
    let mut ending_since: Option<Instant> = None;
    loop {
        let d = *durable.borrow_and_update();
        let mut finished = false;
        let more;
        {
            let mut st = state.borrow_mut();
            let st = &mut *st;
            let mut upto = None;
            while let Some(&(seq, end, at)) = st.pending.front() {
                if end > d.pos {
                    break;
                }
                upto = Some(seq + 1);
                shard
                    .metrics
                    .borrow_mut()
                    .ack(at.elapsed().as_micros() as u64);
                st.pending.pop_front();
            }
            let uploaded = entry.uploaded.load(Ordering::SeqCst);
            if let Some(w) = upto {
                entry.durable.fetch_max(w, Ordering::SeqCst);
                let (ack, credit) = st.session.durable(w, uploaded);
                for f in ack.iter().chain(credit.iter()) {
                    encode(f, &mut out);
                }
            }
            if d.throttled != st.throttled {
                st.throttled = d.throttled;
                if let Some(c) = st.session.set_throttled(d.throttled) {
                    encode(&c, &mut out);
                }
            }
            if let Some(f) = st.flush {
                if st.pending.front().is_none_or(|p| p.0 >= f) {
                    encode(
                        &Frame::Ack {
                            durable: st.session.acked(),
                            uploaded,
                        },
                        &mut out,
                    );
                    st.flush = None;
                }
            }
            out.append(&mut st.outbox);
            more = st.end.is_none() && next_sums_chunk(st, &mut out);
            if st.end.is_some() {
                // Acknowledge what is already cached before leaving, briefly.
                let since = *ending_since.get_or_insert_with(Instant::now);
                if st.pending.is_empty() || d.failed || since.elapsed() > Duration::from_secs(2) {
                    if let Some(End::Reject(r)) = &st.end {
                        encode(&r.frame(), &mut out);
                    }
                    finished = true;
                }
            }
        }
        if !out.is_empty() {
            let r = writer.send(&out).await;
            out.clear();
            if let Err(e) = r {
                let mut st = state.borrow_mut();
                if st.end.is_none() {
                    st.end = Some(End::Gone(format!("write: {e}")));
                }
                return Ok(());
            }
        }
        if finished {
            let _ = writer.close().await;
            return Ok(());
        }
        if more {
            // The rest of a checksum map: keep sending between acks.
            continue;
        }
        let tls_wants = {
            let changed = pin!(durable.changed());
            let woken = pin!(wake.notified());
            let tls = pin!(writer.wants_write());
            let tick = pin!(compio::time::sleep(Duration::from_millis(100)));
            matches!(
                select(select(changed, woken), select(tls, tick)).await,
                Either::Right((Either::Left(_), _))
            )
        };
        if tls_wants {
            if let Err(source) = writer.flush().await {
                return Err(ConnError::Io {
                    op: "write",
                    source,
                });
            }
        }
    }
}
