//! The agent's end of the protocol, on a compio runtime: connect with a client
//! certificate, say Hello, then send frames as credit allows while a receive task
//! follows Acks, Credit and Errors. The caller keeps the journal: after a reconnect it
//! resends from the Welcome's durable watermark. Used by the benchmarks and tests, and
//! by the agent.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use compio::runtime::JoinHandle;
use tokio::sync::Notify;

use ferry_replica::sums::BlockSums;

use crate::protocol::{decode, encode, Decoded, ErrorCode, Frame, Hello, Welcome, SUM_BYTES};
use crate::tls::{handshake, TlsReader, TlsWriter};

/// Credit a frame costs; only writes, zeroes and bookmarks spend it.
pub fn credit_cost(f: &Frame<'_>) -> u64 {
    match f {
        Frame::Write { .. } | Frame::Zero { .. } | Frame::Bookmark(_) => {
            crate::protocol::payload_bytes(f)
        }
        _ => 0,
    }
}

/// Where and as whom to connect.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub server_name: rustls_pki_types::ServerName<'static>,
    pub tls: Arc<rustls::ClientConfig>,
    pub timeout: Duration,
}

#[derive(Default)]
struct Shared {
    credit: u64,
    durable: u64,
    uploaded: u64,
    /// Why the link ended, once it has.
    closed: Option<String>,
    /// A checksum map arriving (SumsRequest): its sequence and what came so far.
    sums: Option<(u64, BlockSums)>,
}

pub struct Link {
    writer: TlsWriter,
    shared: Rc<RefCell<Shared>>,
    changed: Rc<Notify>,
    _recv: JoinHandle<()>,
    pub welcome: Welcome,
    out: Vec<u8>,
}

/// Why `connect` failed; `durable` is the server's watermark when it refused the
/// agent's sequence numbers (an Ack precedes that refusal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub reason: String,
    pub durable: Option<u64>,
    /// The code of the server's Error frame, when it refused the Hello.
    pub code: Option<ErrorCode>,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl From<String> for ConnectError {
    fn from(reason: String) -> Self {
        ConnectError {
            reason,
            durable: None,
            code: None,
        }
    }
}

impl From<&str> for ConnectError {
    fn from(reason: &str) -> Self {
        reason.to_string().into()
    }
}

impl From<ConnectError> for String {
    fn from(e: ConnectError) -> Self {
        e.reason
    }
}

/// Connects, handshakes and exchanges Hello and Welcome.
pub async fn connect(target: &Target, hello: &Hello<'_>) -> Result<Link, ConnectError> {
    // Refused here rather than by the server: the same rule, without a round trip.
    hello.check_names().map_err(|e| e.to_string())?;
    let tcp = compio::time::timeout(target.timeout, compio::net::TcpStream::connect(target.addr))
        .await
        .map_err(|_| format!("connect to {}: timed out", target.addr))?
        .map_err(|e| format!("connect to {}: {e}", target.addr))?;
    let _ = tcp.set_nodelay(true);
    let conn = rustls::ClientConnection::new(target.tls.clone(), target.server_name.clone())
        .map_err(|e| format!("TLS setup: {e}"))?;
    let (mut reader, mut writer) = handshake(tcp, conn, target.timeout)
        .await
        .map_err(|e| format!("TLS handshake with {}: {e}", target.addr))?;
    let mut out = Vec::new();
    encode(&Frame::Hello(hello.clone()), &mut out);
    writer
        .send(&out)
        .await
        .map_err(|e| format!("send hello: {e}"))?;
    let mut inbuf = Vec::new();
    let mut durable = None;
    let welcome = loop {
        match decode(&inbuf, u32::MAX) {
            Ok(Decoded::Frame(Frame::Welcome(w), used)) => {
                inbuf.drain(..used);
                break w;
            }
            Ok(Decoded::Frame(Frame::Ack { durable: d, .. }, used)) => {
                // The watermarks ahead of a refusal of our sequence numbers.
                durable = Some(d);
                inbuf.drain(..used);
                continue;
            }
            Ok(Decoded::Frame(Frame::Error { code, reason }, _)) => {
                return Err(ConnectError {
                    reason: format!("refused by the process server: {reason} ({code:?})"),
                    durable,
                    code: Some(code),
                })
            }
            Ok(Decoded::Frame(f, _)) => return Err(format!("expected welcome, got {f:?}").into()),
            Ok(Decoded::Incomplete(_)) => {}
            Err(e) => return Err(format!("bad answer to hello: {e}").into()),
        }
        match compio::time::timeout(target.timeout, reader.read(&mut inbuf)).await {
            Ok(Ok(0)) => return Err("the process server closed the connection".into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("waiting for welcome: {e}").into()),
            Err(_) => return Err("no welcome in time".into()),
        }
    };
    let shared = Rc::new(RefCell::new(Shared {
        credit: welcome.credit,
        durable: welcome.durable,
        uploaded: welcome.uploaded,
        closed: None,
        sums: None,
    }));
    let changed = Rc::new(Notify::new());
    let recv = compio::runtime::spawn(receive(reader, inbuf, shared.clone(), changed.clone()));
    Ok(Link {
        writer,
        shared,
        changed,
        _recv: recv,
        welcome,
        out,
    })
}

async fn receive(
    mut reader: TlsReader,
    mut inbuf: Vec<u8>,
    shared: Rc<RefCell<Shared>>,
    changed: Rc<Notify>,
) {
    let why = loop {
        let mut start = 0;
        let mut stop = None;
        while start < inbuf.len() {
            match decode(&inbuf[start..], u32::MAX) {
                Ok(Decoded::Frame(f, used)) => {
                    start += used;
                    let mut s = shared.borrow_mut();
                    match f {
                        Frame::Ack { durable, uploaded } => {
                            s.durable = s.durable.max(durable);
                            s.uploaded = s.uploaded.max(uploaded);
                        }
                        Frame::Credit { bytes } => s.credit += bytes,
                        Frame::Sums {
                            seq,
                            block_bytes,
                            disk_bytes,
                            first,
                            sums,
                        } => {
                            if let Err(why) =
                                s.sums_chunk(seq, block_bytes, disk_bytes, first, sums)
                            {
                                stop = Some(why);
                            }
                        }
                        Frame::Error { code, reason } => {
                            stop = Some(format!(
                                "the process server closed the session: {reason} ({code:?})"
                            ));
                        }
                        _ => {}
                    }
                }
                Ok(Decoded::Incomplete(_)) => break,
                Err(e) => {
                    stop = Some(format!("bad frame from the process server: {e}"));
                    break;
                }
            }
        }
        inbuf.drain(..start);
        changed.notify_waiters();
        if let Some(s) = stop {
            break s;
        }
        match reader.read(&mut inbuf).await {
            Ok(0) => break "the process server closed the connection".to_string(),
            Ok(_) => {}
            Err(e) => break format!("connection lost: {e}"),
        }
    };
    shared.borrow_mut().closed = Some(why);
    changed.notify_waiters();
}

impl Shared {
    /// Adds one chunk of a checksum map; chunks must come in order.
    fn sums_chunk(
        &mut self,
        seq: u64,
        block_bytes: u32,
        disk_bytes: u64,
        first: u64,
        sums: &[u8],
    ) -> Result<(), String> {
        if first == 0 {
            self.sums = Some((
                seq,
                BlockSums {
                    block_bytes: block_bytes as u64,
                    disk_bytes,
                    sums: Vec::new(),
                },
            ));
        }
        let Some((s, map)) = self.sums.as_mut() else {
            return Err("a checksum map chunk without its start".into());
        };
        if *s != seq
            || map.block_bytes != block_bytes as u64
            || map.disk_bytes != disk_bytes
            || map.sums.len() as u64 != first
        {
            return Err("checksum map chunks out of order".into());
        }
        map.sums.extend(
            sums.chunks_exact(SUM_BYTES)
                .map(|c| <[u8; 16]>::try_from(c).unwrap_or_default()),
        );
        Ok(())
    }
}

impl Link {
    /// A checksum map asked for with SumsRequest, once whole: (its sequence, the map).
    pub fn take_sums(&self) -> Option<(u64, BlockSums)> {
        let mut s = self.shared.borrow_mut();
        let whole = s.sums.as_ref().is_some_and(|(_, m)| {
            m.sums.len() == BlockSums::blocks_for(m.disk_bytes, m.block_bytes)
        });
        if whole {
            s.sums.take()
        } else {
            None
        }
    }

    /// Every write below this is durable at the process server.
    pub fn durable(&self) -> u64 {
        self.shared.borrow().durable
    }

    pub fn uploaded(&self) -> u64 {
        self.shared.borrow().uploaded
    }

    pub fn closed(&self) -> Option<String> {
        self.shared.borrow().closed.clone()
    }

    async fn wait_until(&self, ok: impl Fn(&Shared) -> bool) -> Result<(), String> {
        loop {
            let notified = self.changed.notified();
            {
                let s = self.shared.borrow();
                if ok(&s) {
                    return Ok(());
                }
                if let Some(why) = &s.closed {
                    return Err(why.clone());
                }
            }
            // A timer as well: a notification between the check and the wait is
            // not lost for long.
            let _ = compio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    /// Sends encoded frames costing `cost` credit, waiting for the credit first.
    pub async fn send(&mut self, frames: &[u8], cost: u64) -> Result<(), String> {
        self.wait_until(|s| s.credit >= cost).await?;
        self.shared.borrow_mut().credit -= cost;
        self.writer
            .send(frames)
            .await
            .map_err(|e| format!("send: {e}"))
    }

    /// Sends one frame.
    pub async fn send_frame(&mut self, f: &Frame<'_>) -> Result<(), String> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        encode(f, &mut out);
        let r = self.send(&out, credit_cost(f)).await;
        self.out = out;
        r
    }

    /// Waits until every write below `seq` is durable.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), String> {
        self.wait_until(|s| s.durable >= seq).await
    }

    /// Waits until every write below `seq` is in blob storage (the Ack after a Flush
    /// reports it).
    pub async fn wait_uploaded(&mut self, seq: u64, poll: Duration) -> Result<(), String> {
        loop {
            if self.uploaded() >= seq {
                return Ok(());
            }
            if let Some(why) = self.closed() {
                return Err(why);
            }
            let durable = self.durable();
            self.send_frame(&Frame::Flush { seq: durable }).await?;
            compio::time::sleep(poll).await;
        }
    }

    /// Ends the session in order.
    pub async fn bye(mut self) -> Result<(), String> {
        self.send_frame(&Frame::Bye).await?;
        let _ = self.writer.close().await;
        Ok(())
    }
}
