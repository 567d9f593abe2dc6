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

use crate::error::LinkError;
use crate::protocol::{decode, encode, Decoded, Frame, Hello, Welcome, SUM_BYTES};
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
    closed: Option<Arc<LinkError>>,
    /// A checksum map arriving (SumsRequest): its sequence and what came so far.
    sums: Option<(u64, BlockSums)>,
}

pub struct Link {
    peer: SocketAddr,
    writer: TlsWriter,
    shared: Rc<RefCell<Shared>>,
    changed: Rc<Notify>,
    _recv: JoinHandle<()>,
    pub welcome: Welcome,
    out: Vec<u8>,
}

/// Connects, handshakes and exchanges Hello and Welcome.
pub async fn connect(target: &Target, hello: &Hello<'_>) -> Result<Link, LinkError> {
    let peer = target.addr;
    // Refused here rather than by the server: the same rule, without a round trip.
    hello.check_names().map_err(LinkError::BadName)?;
    let io = |op| move |source| LinkError::Io { op, peer, source };
    let tcp = compio::time::timeout(target.timeout, compio::net::TcpStream::connect(peer))
        .await
        .map_err(|_| LinkError::ConnectTimeout { peer })?
        .map_err(io("connect to"))?;
    let _ = tcp.set_nodelay(true);
    let conn = rustls::ClientConnection::new(target.tls.clone(), target.server_name.clone())
        .map_err(|source| LinkError::Tls { peer, source })?;
    let (mut reader, mut writer) = handshake(tcp, conn, target.timeout)
        .await
        .map_err(io("TLS handshake with"))?;
    let mut out = Vec::new();
    encode(&Frame::Hello(hello.clone()), &mut out);
    writer.send(&out).await.map_err(io("send hello to"))?;
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
                return Err(LinkError::Refused {
                    peer,
                    code,
                    reason: reason.to_string(),
                    durable,
                })
            }
            Ok(Decoded::Frame(f, _)) => {
                return Err(LinkError::Unexpected {
                    peer,
                    what: format!("expected welcome, got {f:?}"),
                })
            }
            Ok(Decoded::Incomplete(_)) => {}
            Err(source) => {
                return Err(LinkError::BadFrame {
                    what: "answer to hello",
                    peer,
                    source,
                })
            }
        }
        match compio::time::timeout(target.timeout, reader.read(&mut inbuf)).await {
            Ok(Ok(0)) => return Err(LinkError::Closed { peer }),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(io("waiting for welcome from")(e)),
            Err(_) => return Err(LinkError::NoWelcome { peer }),
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
    let recv = compio::runtime::spawn(receive(
        peer,
        reader,
        inbuf,
        shared.clone(),
        changed.clone(),
    ));
    Ok(Link {
        peer,
        writer,
        shared,
        changed,
        _recv: recv,
        welcome,
        out,
    })
}

async fn receive(
    peer: SocketAddr,
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
                            if let Err(what) =
                                s.sums_chunk(seq, block_bytes, disk_bytes, first, sums)
                            {
                                stop = Some(LinkError::Unexpected {
                                    peer,
                                    what: what.to_string(),
                                });
                            }
                        }
                        Frame::Error { code, reason } => {
                            stop = Some(LinkError::SessionClosed {
                                peer,
                                code,
                                reason: reason.to_string(),
                            });
                        }
                        _ => {}
                    }
                }
                Ok(Decoded::Incomplete(_)) => break,
                Err(source) => {
                    stop = Some(LinkError::BadFrame {
                        what: "frame",
                        peer,
                        source,
                    });
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
            Ok(0) => break LinkError::Closed { peer },
            Ok(_) => {}
            Err(source) => {
                break LinkError::Io {
                    op: "connection lost to",
                    peer,
                    source,
                }
            }
        }
    };
    shared.borrow_mut().closed = Some(Arc::new(why));
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
    ) -> Result<(), &'static str> {
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
            return Err("a checksum map chunk without its start");
        };
        if *s != seq
            || map.block_bytes != block_bytes as u64
            || map.disk_bytes != disk_bytes
            || map.sums.len() as u64 != first
        {
            return Err("checksum map chunks out of order");
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

    /// Why the link ended, once it has.
    pub fn closed(&self) -> Option<Arc<LinkError>> {
        self.shared.borrow().closed.clone()
    }

    async fn wait_until(&self, ok: impl Fn(&Shared) -> bool) -> Result<(), LinkError> {
        loop {
            let notified = self.changed.notified();
            {
                let s = self.shared.borrow();
                if ok(&s) {
                    return Ok(());
                }
                if let Some(why) = &s.closed {
                    return Err(LinkError::Ended(why.clone()));
                }
            }
            // A timer as well: a notification between the check and the wait is
            // not lost for long.
            let _ = compio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    /// Sends encoded frames costing `cost` credit, waiting for the credit first.
    pub async fn send(&mut self, frames: &[u8], cost: u64) -> Result<(), LinkError> {
        self.wait_until(|s| s.credit >= cost).await?;
        self.shared.borrow_mut().credit -= cost;
        let peer = self.peer;
        self.writer
            .send(frames)
            .await
            .map_err(|source| LinkError::Io {
                op: "send to",
                peer,
                source,
            })
    }

    /// Sends one frame.
    pub async fn send_frame(&mut self, f: &Frame<'_>) -> Result<(), LinkError> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        encode(f, &mut out);
        let r = self.send(&out, credit_cost(f)).await;
        self.out = out;
        r
    }

    /// Waits until every write below `seq` is durable.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), LinkError> {
        self.wait_until(|s| s.durable >= seq).await
    }

    /// Waits until every write below `seq` is in blob storage (the Ack after a Flush
    /// reports it).
    pub async fn wait_uploaded(&mut self, seq: u64, poll: Duration) -> Result<(), LinkError> {
        loop {
            if self.uploaded() >= seq {
                return Ok(());
            }
            if let Some(why) = self.closed() {
                return Err(LinkError::Ended(why));
            }
            let durable = self.durable();
            self.send_frame(&Frame::Flush { seq: durable }).await?;
            compio::time::sleep(poll).await;
        }
    }

    /// Ends the session in order.
    pub async fn bye(mut self) -> Result<(), LinkError> {
        self.send_frame(&Frame::Bye).await?;
        let _ = self.writer.close().await;
        Ok(())
    }
}
