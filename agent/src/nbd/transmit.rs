//! The transmission phase of one connection: requests in, replies out, with reads
//! answered by a few threads of the connection's own.
//!
//! Why reads run beside the request loop: a client that keeps several reads in
//! flight (QEMU, qemu-img, the kernel's nbd driver all do) would otherwise wait for
//! each read's disk I/O and its reply's send one after the other; with reads on
//! their own threads, one read's disk I/O overlaps the previous reply's send and the
//! disk sees more than one request at a time, as it does under a local reader with
//! readahead. A client that sends one request at a time gains nothing and loses only
//! a thread hand-off per read.
//!
//! Order: the NBD protocol lets a server answer in any order, but this one keeps the
//! simplest guarantee a writer could want: anything but a read (write, zero, trim,
//! flush, disconnect) waits until every read before it has been answered, then runs
//! on the request loop before the next request is read. So a read never overlaps a
//! write, a read after a write sees it, and the agent's capture still sees writes one
//! at a time, in the order they came.
//!
//! Bounds: at most `READERS` reads in flight and `IN_FLIGHT_BYTES` of their buffers
//! per connection; the request loop stops reading requests until one is answered.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Instant;

use super::server::{errno, is_refusal, Device, Piece, Refusals, REFUSAL_LOG_EVERY};
use super::wire::*;
use crate::error::NbdError;

/// Reads in flight per connection at most (and so threads serving them).
pub const READERS: usize = 8;
/// Bytes of reads in flight per connection at most (one larger read still goes
/// alone): the bound on this connection's read buffers.
const IN_FLIGHT_BYTES: usize = 64 << 20;

/// Where replies go: a writer that can also send a file's bytes.
pub trait Sink: Write + Send {
    /// Writes `len` bytes of `file` at `offset`. The default reads and writes them; a
    /// socket sends them with sendfile(2), from the page cache straight to the socket.
    fn send_file(&mut self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], offset + done)?;
            self.write_all(&buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

impl Sink for Vec<u8> {}
impl Sink for io::Sink {}

impl Sink for BufWriter<TcpStream> {
    fn send_file(&mut self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        // What is buffered goes first: the file's bytes follow it on the wire.
        self.flush()?;
        let sock = self.get_ref().as_raw_fd();
        let mut off = offset as libc::off_t;
        let end = offset + len;
        while (off as u64) < end {
            let left = (end - off as u64).min(1 << 30) as usize;
            // SAFETY: both descriptors are open for the call (the socket is borrowed
            // from self, the file from the caller) and `off` is a valid off_t.
            let n = unsafe { libc::sendfile(sock, file.as_raw_fd(), &mut off, left) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ends before byte {end} (sendfile)"),
                ));
            }
        }
        Ok(())
    }
}

/// Zeroes sent from here, a piece at a time.
static ZEROES: [u8; 64 << 10] = [0u8; 64 << 10];

/// A read handed to a reader thread.
struct ReadJob {
    handle: u64,
    offset: u64,
    len: usize,
}

/// What the request loop and the readers share.
struct Shared<'a, W> {
    w: Mutex<&'a mut W>,
    /// Reads in flight and their bytes.
    flight: Mutex<(usize, usize)>,
    landed: Condvar,
    /// The first reply that could not be sent: the connection is over.
    broken: Mutex<Option<NbdError>>,
    export: &'a str,
    dev: &'a dyn Device,
    refusals: &'a Refusals,
}

impl<W: Sink> Shared<'_, W> {
    /// The NBD error for `result`, logging what deserves it.
    fn error_of(&self, result: &io::Result<()>, req: &Request) -> u32 {
        match result {
            Ok(()) => 0,
            Err(e) if e.raw_os_error() == Some(EINVAL as i32) => EINVAL,
            Err(e) if is_refusal(e) => {
                let now = Instant::now();
                if let Some(not_logged) =
                    self.refusals
                        .note(self.export, e.kind(), now, REFUSAL_LOG_EVERY)
                {
                    tracing::warn!(export = self.export, reason = %e, offset = req.offset,
                        len = req.length, not_logged,
                        "NBD write refused (logged at most once a minute per export)");
                }
                errno(e)
            }
            Err(e) => {
                tracing::error!(error = %e, offset = req.offset, len = req.length, "NBD request failed");
                errno(e)
            }
        }
    }

    /// One reply (with its data for a read that succeeded), sent whole and flushed.
    fn reply(&self, err: u32, handle: u64, data: Option<&[u8]>) -> Result<(), NbdError> {
        let mut w = self.w.lock().unwrap_or_else(PoisonError::into_inner);
        w.write_all(&simple_reply(err, handle))
            .and_then(|_| match data {
                Some(d) if err == 0 => w.write_all(d),
                _ => Ok(()),
            })
            .and_then(|_| w.flush())
            .map_err(NbdError::io("reply"))
    }

    /// A read's reply sent from where its bytes lie. Once its header is out a failure
    /// cannot be told to the client any more: it ends the connection (the client
    /// retries on a new one), as any failed send does.
    fn reply_pieces(&self, handle: u64, pieces: &[Piece<'_>]) -> Result<(), NbdError> {
        // The disk reads start here, before the reply's turn on the socket: sendfile
        // reads what is not cached while it holds the connection, so without this
        // the readers' disk I/O would go one at a time; with it, it overlaps.
        for p in pieces {
            if let Piece::File { file, offset, len } = *p {
                // SAFETY: the descriptor is open (borrowed from the device); the
                // call only advises the kernel.
                unsafe {
                    libc::posix_fadvise(
                        file.as_raw_fd(),
                        offset as libc::off_t,
                        len as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    );
                }
            }
        }
        let mut w = self.w.lock().unwrap_or_else(PoisonError::into_inner);
        let mut send = || -> io::Result<()> {
            w.write_all(&simple_reply(0, handle))?;
            for p in pieces {
                match *p {
                    Piece::File { file, offset, len } => w.send_file(file, offset, len)?,
                    Piece::Zero(mut len) => {
                        while len > 0 {
                            let n = len.min(ZEROES.len() as u64) as usize;
                            w.write_all(&ZEROES[..n])?;
                            len -= n as u64;
                        }
                    }
                }
            }
            w.flush()
        };
        send().map_err(NbdError::io("reply from the disk's files"))
    }

    /// Waits until a read of `len` bytes may go: fewer than `READERS` in flight and
    /// room in the byte bound (or nothing in flight at all).
    fn admit(&self, len: usize) {
        let mut f = self.flight.lock().unwrap_or_else(PoisonError::into_inner);
        while f.0 > 0 && (f.0 >= READERS || f.1 + len > IN_FLIGHT_BYTES) {
            f = self.landed.wait(f).unwrap_or_else(PoisonError::into_inner);
        }
        f.0 += 1;
        f.1 += len;
    }

    fn landed(&self, len: usize) {
        let mut f = self.flight.lock().unwrap_or_else(PoisonError::into_inner);
        f.0 -= 1;
        f.1 -= len;
        self.landed.notify_all();
    }

    /// Waits until every read in flight has been answered.
    fn drain(&self) {
        let mut f = self.flight.lock().unwrap_or_else(PoisonError::into_inner);
        while f.0 > 0 {
            f = self.landed.wait(f).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn take_broken(&self) -> Option<NbdError> {
        self.broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// A reader thread: reads jobs until the request loop hangs up.
    fn reader(&self, jobs: &Mutex<mpsc::Receiver<ReadJob>>) {
        let mut buf = Vec::new();
        loop {
            let job = match jobs.lock().unwrap_or_else(PoisonError::into_inner).recv() {
                Ok(j) => j,
                Err(_) => return,
            };
            if let Some(pieces) = self.dev.pieces(job.offset, job.len as u64) {
                if let Err(e) = self.reply_pieces(job.handle, &pieces) {
                    let mut b = self.broken.lock().unwrap_or_else(PoisonError::into_inner);
                    b.get_or_insert(e);
                }
                self.landed(job.len);
                continue;
            }
            buf.resize(job.len, 0);
            let result = self.dev.read(job.offset, &mut buf);
            let req = Request {
                flags: 0,
                kind: CMD_READ,
                handle: job.handle,
                offset: job.offset,
                length: job.len as u32,
            };
            let err = self.error_of(&result, &req);
            let sent = self.reply(err, job.handle, Some(&buf));
            if let Err(e) = sent {
                let mut b = self.broken.lock().unwrap_or_else(PoisonError::into_inner);
                b.get_or_insert(e);
            }
            self.landed(job.len);
            // A reply buffer larger than any the client asks for lately is given
            // back rather than held for the connection's life.
            if buf.capacity() > 4 * MAX_REQUEST_BYTES as usize / READERS {
                buf = Vec::new();
            }
        }
    }
}

/// Serves requests on `dev` until the client disconnects or the connection breaks.
pub fn transmit<W: Sink>(
    r: &mut impl Read,
    w: &mut W,
    export: &str,
    dev: &dyn Device,
    refusals: &Refusals,
) -> Result<(), NbdError> {
    let shared = Shared {
        w: Mutex::new(w),
        flight: Mutex::new((0, 0)),
        landed: Condvar::new(),
        broken: Mutex::new(None),
        export,
        dev,
        refusals,
    };
    let (tx, rx) = mpsc::channel::<ReadJob>();
    let jobs = Mutex::new(rx);
    // Readers log where the connection logs (a scoped subscriber included).
    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
    std::thread::scope(|s| {
        let mut readers = 0usize;
        let result = requests(r, &shared, |job| {
            // One more reader while all are busy, up to READERS: a client sending
            // one request at a time never costs more than one thread.
            let busy = shared
                .flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if readers < READERS && busy > readers {
                let spawned = std::thread::Builder::new()
                    .name("ferry-nbd-read".into())
                    .spawn_scoped(s, || {
                        tracing::dispatcher::with_default(&dispatch, || shared.reader(&jobs))
                    });
                match spawned {
                    Ok(_) => readers += 1,
                    // Without a thread of its own the read still runs on those there
                    // are; with none at all, it cannot.
                    Err(e) if readers == 0 => {
                        shared.landed(job.len);
                        return Err(NbdError::io("starting a reader thread")(e));
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot start another NBD reader thread"),
                }
            }
            tx.send(job).map_err(|e| {
                shared.landed(e.0.len);
                NbdError::io("read queue")(io::ErrorKind::BrokenPipe.into())
            })
        });
        // Every read already queued is answered before the connection ends.
        shared.drain();
        drop(tx);
        result
    })?;
    shared.take_broken().map_or(Ok(()), Err)
}

/// The request loop: parses requests, hands reads to `read`, runs the rest itself.
fn requests<W: Sink>(
    r: &mut impl Read,
    shared: &Shared<'_, W>,
    mut read: impl FnMut(ReadJob) -> Result<(), NbdError>,
) -> Result<(), NbdError> {
    let dev = shared.dev;
    let size = dev.size();
    let mut data = Vec::new();
    loop {
        if let Some(e) = shared.take_broken() {
            return Err(e);
        }
        let mut h = [0u8; 28];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            // A client that goes away without NBD_CMD_DISC.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(NbdError::io("request")(e)),
        }
        let req = Request::parse(&h)?;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let in_range = req
            .offset
            .checked_add(req.length as u64)
            .is_some_and(|end| end <= size);
        let carries_data = req.kind == CMD_WRITE;
        if (carries_data || req.kind == CMD_READ) && req.length > MAX_REQUEST_BYTES {
            // Its payload would not be read: reply, then close.
            shared.drain();
            let _ = shared.reply(EOVERFLOW, req.handle, None);
            return Err(NbdError::TooLarge {
                len: req.length,
                max: MAX_REQUEST_BYTES,
            });
        }
        if req.kind == CMD_READ && in_range {
            shared.admit(req.length as usize);
            read(ReadJob {
                handle: req.handle,
                offset: req.offset,
                len: req.length as usize,
            })?;
            continue;
        }
        if carries_data {
            data.resize(req.length as usize, 0);
            r.read_exact(&mut data)
                .map_err(NbdError::io("write payload"))?;
        }
        // Everything but a read waits for the reads before it.
        shared.drain();
        let result: io::Result<()> = if !in_range && req.kind != CMD_FLUSH && req.kind != CMD_DISC {
            Err(io::Error::from_raw_os_error(EINVAL as i32))
        } else {
            match req.kind {
                CMD_WRITE => dev.write(req.offset, &data, fua),
                CMD_TRIM | CMD_WRITE_ZEROES => dev.zero(req.offset, req.length as u64, fua),
                CMD_FLUSH => dev.flush(),
                CMD_DISC => return Ok(()),
                _ => Err(io::Error::from_raw_os_error(EINVAL as i32)),
            }
        };
        let err = shared.error_of(&result, &req);
        shared.reply(err, req.handle, None)?;
    }
}
