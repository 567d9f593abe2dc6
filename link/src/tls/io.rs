//! rustls over a compio (io_uring) TCP stream, split into a read half and a write half
//! that run as two tasks of the same shard thread. Both halves share the one rustls
//! state machine through a `RefCell`; neither holds the borrow across an await, so
//! they never conflict. Received ciphertext goes from one reused buffer into rustls,
//! which decrypts in place; plaintext is copied once, into the caller's frame buffer.

use std::cell::RefCell;
use std::io::{self, BufRead, Write};
use std::rc::Rc;
use std::time::Duration;

use compio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use compio::net::TcpStream;
use compio::BufResult;
use rustls::Connection;
use tokio::sync::Notify;

/// Ciphertext read at a time: four full TLS records.
const READ_BYTES: usize = 64 << 10;

struct Shared {
    conn: RefCell<Connection>,
    /// The reader woke rustls into wanting to write (an alert, a key update).
    wants_write: Notify,
}

pub struct TlsReader {
    tcp: TcpStream,
    shared: Rc<Shared>,
    /// Ciphertext read from the socket; `buf[pos..]` is not yet fed to rustls.
    buf: Option<Vec<u8>>,
    pos: usize,
    eof: bool,
}

pub struct TlsWriter {
    tcp: TcpStream,
    shared: Rc<Shared>,
    out: Option<Vec<u8>>,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Feeds some ciphertext to rustls and processes it; returns how much it took. rustls
/// bounds what it buffers, so the caller drains plaintext between calls. On a TLS
/// error the alert is left queued for the writer.
fn feed(conn: &mut Connection, data: &[u8]) -> io::Result<usize> {
    let mut rest = data;
    let n = conn.read_tls(&mut rest)?;
    conn.process_new_packets().map_err(tls_err)?;
    Ok(n)
}

async fn flush_conn(
    tcp: &mut TcpStream,
    shared: &Shared,
    out: &mut Option<Vec<u8>>,
) -> io::Result<()> {
    loop {
        let mut buf = out.take().unwrap_or_default();
        buf.clear();
        {
            let mut conn = shared.conn.borrow_mut();
            while conn.wants_write() {
                conn.write_tls(&mut buf)?;
            }
        }
        if buf.is_empty() {
            *out = Some(buf);
            return Ok(());
        }
        let BufResult(r, buf) = tcp.write_all(buf).await;
        *out = Some(buf);
        r?;
    }
}

/// Runs the TLS handshake on `tcp` within `limit`, then splits the stream.
pub async fn handshake(
    tcp: TcpStream,
    conn: impl Into<Connection>,
    limit: Duration,
) -> io::Result<(TlsReader, TlsWriter)> {
    let shared = Rc::new(Shared {
        conn: RefCell::new(conn.into()),
        wants_write: Notify::new(),
    });
    let mut tcp_w = tcp.clone();
    let mut tcp_r = tcp;
    let mut out = None;
    let mut buf = Vec::with_capacity(READ_BYTES);
    let run = async {
        loop {
            flush_conn(&mut tcp_w, &shared, &mut out).await?;
            if !shared.conn.borrow().is_handshaking() {
                return Ok(());
            }
            buf.clear();
            let BufResult(n, b) = tcp_r.read(std::mem::take(&mut buf)).await;
            buf = b;
            if n? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
            let mut pos = 0;
            while pos < buf.len() && shared.conn.borrow().is_handshaking() {
                let fed = feed(&mut shared.conn.borrow_mut(), &buf[pos..]);
                match fed {
                    Ok(n) => pos += n,
                    Err(e) => {
                        // Tell the peer why (a TLS alert), best effort, then fail.
                        let _ = flush_conn(&mut tcp_w, &shared, &mut out).await;
                        return Err(e);
                    }
                }
            }
            // Bytes after the handshake belong to the reader.
            buf.drain(..pos);
            if !buf.is_empty() {
                flush_conn(&mut tcp_w, &shared, &mut out).await?;
                return Ok(());
            }
        }
    };
    match compio::time::timeout(limit, run).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TLS handshake not finished within {limit:?}"),
            ))
        }
    }
    Ok((
        TlsReader {
            tcp: tcp_r,
            shared: shared.clone(),
            buf: Some(buf),
            pos: 0,
            eof: false,
        },
        TlsWriter {
            tcp: tcp_w,
            shared,
            out,
        },
    ))
}

impl TlsReader {
    /// The peer's end-entity certificate, as DER.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        let conn = self.shared.conn.borrow();
        conn.peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
    }

    /// Appends decrypted bytes to `out`; returns how many, 0 at a clean end of stream.
    /// An end without TLS close_notify is an `UnexpectedEof` error.
    pub async fn read(&mut self, out: &mut Vec<u8>) -> io::Result<usize> {
        loop {
            // Copies what rustls holds straight from its buffers (fill_buf): Read's
            // read_to_end would zero-fill the spare capacity on every call (2.7 % of
            // the server's CPU at full load). rustls answers WouldBlock once drained,
            // an empty chunk at a clean close_notify.
            let start = out.len();
            let got = {
                let mut conn = self.shared.conn.borrow_mut();
                let mut reader = conn.reader();
                loop {
                    match reader.fill_buf() {
                        Ok([]) => break Ok(()),
                        Ok(chunk) => {
                            out.extend_from_slice(chunk);
                            let k = chunk.len();
                            reader.consume(k);
                        }
                        Err(e) => break Err(e),
                    }
                }
            };
            let n = out.len() - start;
            match got {
                // A clean close_notify; hand over what came before it first.
                Ok(()) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if n > 0 {
                        return Ok(n);
                    }
                }
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            }
            let pending = self.buf.as_ref().map_or(0, |b| b.len() - self.pos);
            if pending > 0 {
                let fed = {
                    let data = &self.buf.as_ref().expect("checked")[self.pos..];
                    feed(&mut self.shared.conn.borrow_mut(), data)
                };
                if self.shared.conn.borrow().wants_write() {
                    self.shared.wants_write.notify_one();
                }
                self.pos += fed?;
                continue;
            }
            if self.eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without TLS close_notify",
                ));
            }
            let mut buf = self.buf.take().unwrap_or_default();
            buf.clear();
            self.pos = 0;
            let BufResult(n, b) = self.tcp.read(buf).await;
            self.buf = Some(b);
            if n? == 0 {
                self.eof = true;
            }
        }
    }
}

impl TlsWriter {
    /// Encrypts `plain` and sends it.
    pub async fn send(&mut self, mut plain: &[u8]) -> io::Result<()> {
        while !plain.is_empty() {
            let n = self.shared.conn.borrow_mut().writer().write(plain)?;
            plain = &plain[n..];
            if n == 0 || self.shared.conn.borrow().wants_write() {
                self.flush().await?;
            }
        }
        self.flush().await
    }

    /// Sends whatever rustls has queued (records, alerts, key updates).
    pub async fn flush(&mut self) -> io::Result<()> {
        flush_conn(&mut self.tcp, &self.shared, &mut self.out).await
    }

    /// Resolves when the read half left something for the writer to send.
    pub async fn wants_write(&self) {
        self.shared.wants_write.notified().await
    }

    /// Sends close_notify and shuts the socket down for writing.
    pub async fn close(mut self) -> io::Result<()> {
        self.shared.conn.borrow_mut().send_close_notify();
        self.flush().await?;
        self.tcp.shutdown().await
    }
}
