//! An NBD server (fixed newstyle handshake, simple replies) exporting `Device`s by
//! name, so QEMU, qemu-img, qemu-io and qemu-nbd attach to a protected disk as to any
//! NBD server. One thread per connection for the handshake and the requests, and up to
//! a few more for its reads (`transmit.rs`): the agent serves a handful of disks, and
//! a write must be applied and captured before its reply anyway.
//!
//! A client's mistakes get an NBD error reply where the protocol allows one and close
//! the connection where it does not (an oversized request whose payload we will not
//! read); they never take the server down.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::wire::*;
use crate::error::NbdError;

/// A disk behind an export. TRIM is served as zeroing, so what the replica records
/// is exactly what a reader of the disk sees.
pub trait Device: Send + Sync {
    fn size(&self) -> u64;
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Applies a write; with `fua` it is durable before this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    fn zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Where the bytes of `[offset, offset + len)` lie when every one of them is in a
    /// local file or zero: the server then sends them from the page cache with
    /// sendfile(2), never copying them through its own memory (on a loaded host the
    /// copies, not the disk, bound a hydrated disk's reads). None, the default, when
    /// any part needs work first (a fetch, a decode, a lock): the server calls `read`.
    fn pieces(&self, _offset: u64, _len: u64) -> Option<Vec<Piece<'_>>> {
        None
    }
}

/// A part of a read, in order.
#[derive(Debug)]
pub enum Piece<'a> {
    /// `len` bytes of `file` at `offset`.
    File {
        file: &'a std::fs::File,
        offset: u64,
        len: u64,
    },
    /// `len` zero bytes.
    Zero(u64),
}

/// The exports by name. Behind a lock so that a server that is already serving can
/// gain and lose exports (the recovery host serves each recovered machine's disks on
/// one listener as they come and go); a connection looks its export up once, at the
/// handshake, so the lock is never on the request path.
#[derive(Default)]
pub struct Exports {
    map: RwLock<HashMap<String, Arc<dyn Device>>>,
    /// What this server logged of its devices' refusals, across connections.
    refusals: Refusals,
}

/// How often one export's refusals of one kind are logged: the first at once, then
/// at most one line a minute, counting those not logged. A guest retries a refused
/// write for as long as it runs, and a client polling with a new connection each
/// time (qemu-io in a loop) does too: neither may flood the log.
pub(super) const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// The (export, kind) pairs remembered at most; past it they are forgotten at once
/// (the worst case: one more line each).
const REFUSAL_KEYS: usize = 1024;

/// Per export and kind of refusal: when it was last logged, and how many refusals
/// since were not.
#[derive(Default)]
pub(super) struct Refusals {
    seen: Mutex<HashMap<(String, io::ErrorKind), (Instant, u64)>>,
}

impl Refusals {
    /// Whether a refusal of `kind` on `export` at `now` is logged, with the number of
    /// refusals like it that were not logged since the last line.
    pub(super) fn note(
        &self,
        export: &str,
        kind: io::ErrorKind,
        now: Instant,
        every: Duration,
    ) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (export.to_string(), kind);
        if let Some((last, skipped)) = seen.get_mut(&key) {
            if now.saturating_duration_since(*last) < every {
                *skipped += 1;
                return None;
            }
            let n = *skipped;
            (*last, *skipped) = (now, 0);
            return Some(n);
        }
        if seen.len() >= REFUSAL_KEYS {
            seen.clear();
        }
        seen.insert(key, (now, 0));
        Some(0)
    }
}

impl Exports {
    /// Adds (or replaces) an export before the server shares these exports.
    pub fn add(&mut self, name: &str, dev: Arc<dyn Device>) {
        self.map
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), dev);
    }

    /// Adds an export while serving; false (and nothing changed) if `name` is taken.
    pub fn insert(&self, name: &str, dev: Arc<dyn Device>) -> bool {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(name) {
            return false;
        }
        map.insert(name.to_string(), dev);
        true
    }

    /// Removes an export while serving: new clients no longer find it (a connection
    /// already attached keeps its device until it leaves). True if it was there.
    pub fn remove(&self, name: &str) -> bool {
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
            .is_some()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name)
    }

    /// The export names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    fn get(&self, name: &str) -> Option<Arc<dyn Device>> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }
}

/// Accepts NBD clients until `stop` is set (then one more connection wakes it).
pub fn serve(listener: TcpListener, exports: Arc<Exports>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let exports = exports.clone();
        let peer = conn
            .peer_addr()
            .map_or_else(|_| "unknown".into(), |a| a.to_string());
        let spawned = std::thread::Builder::new()
            .name("ferry-nbd".into())
            .spawn(move || {
                if let Err(e) = handle(conn, &exports) {
                    tracing::warn!(%peer, reason = %e, "NBD connection closed");
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start an NBD connection thread");
        }
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn export_info(size: u64) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    d
}

fn handle(conn: TcpStream, exports: &Exports) -> Result<(), NbdError> {
    conn.set_nodelay(true).map_err(NbdError::io("socket"))?;
    let mut r =
        BufReader::with_capacity(256 << 10, conn.try_clone().map_err(NbdError::io("socket"))?);
    let mut w = BufWriter::with_capacity(256 << 10, conn);
    session(&mut r, &mut w, exports)
}

/// One client from greeting to disconnect: the handshake's option haggling, then
/// requests until the client leaves. Over any reader and writer, so the fuzz target
/// can play a hostile client from memory.
pub fn session(
    r: &mut impl Read,
    w: &mut impl super::transmit::Sink,
    exports: &Exports,
) -> Result<(), NbdError> {
    let io = |what: &'static str, e: io::Error| NbdError::io(what)(e);
    w.write_all(&NBDMAGIC.to_be_bytes())
        .and_then(|_| w.write_all(&IHAVEOPT.to_be_bytes()))
        .and_then(|_| w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()))
        .and_then(|_| w.flush())
        .map_err(|e| io("greeting", e))?;
    let client = read_u32(r).map_err(|e| io("client flags", e))?;
    let no_zeroes = client & CLIENT_NO_ZEROES != 0;
    let (name, dev) = loop {
        let magic = read_u64(r).map_err(|e| io("option", e))?;
        if magic != IHAVEOPT {
            return Err(NbdError::BadMagic {
                what: "option",
                magic,
            });
        }
        let opt = read_u32(r).map_err(|e| io("option", e))?;
        let len = read_u32(r).map_err(|e| io("option", e))?;
        if len > 4096 {
            return Err(NbdError::OptionTooLong { opt, len });
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).map_err(|e| io("option data", e))?;
        let mut reply = |kind: u32, d: &[u8]| -> Result<(), NbdError> {
            w.write_all(&option_reply(opt, kind, d))
                .and_then(|_| w.flush())
                .map_err(|e| io("option reply", e))
        };
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).to_string();
                // No error reply exists for this option: an unknown name closes.
                let dev = exports
                    .get(&name)
                    .ok_or_else(|| NbdError::NoExport { name: name.clone() })?;
                w.write_all(&dev.size().to_be_bytes())
                    .and_then(|_| w.write_all(&TRANSMISSION_FLAGS.to_be_bytes()))
                    .and_then(|_| {
                        if no_zeroes {
                            Ok(())
                        } else {
                            w.write_all(&[0u8; 124])
                        }
                    })
                    .and_then(|_| w.flush())
                    .map_err(|e| io("export reply", e))?;
                break (name, dev);
            }
            OPT_GO | OPT_INFO => {
                if data.len() < 6 {
                    reply(REP_ERR_INVALID, b"")?;
                    continue;
                }
                let n = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
                if data.len() < 4 + n + 2 {
                    reply(REP_ERR_INVALID, b"")?;
                    continue;
                }
                let name = String::from_utf8_lossy(&data[4..4 + n]).to_string();
                let Some(dev) = exports.get(&name) else {
                    reply(
                        REP_ERR_UNKNOWN,
                        format!("no export named {name:?}").as_bytes(),
                    )?;
                    continue;
                };
                reply(REP_INFO, &export_info(dev.size()))?;
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                for v in [1u32, 4096, MAX_REQUEST_BYTES] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                reply(REP_INFO, &bs)?;
                reply(REP_ACK, b"")?;
                if opt == OPT_GO {
                    break (name, dev);
                }
            }
            OPT_LIST => {
                for name in exports.names() {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    reply(REP_SERVER, &d)?;
                }
                reply(REP_ACK, b"")?;
            }
            OPT_ABORT => {
                let _ = reply(REP_ACK, b"");
                return Ok(());
            }
            _ => reply(REP_ERR_UNSUP, b"")?,
        }
    };
    super::transmit::transmit(r, w, &name, dev.as_ref(), &exports.refusals)
}

/// Whether `e` is a device refusing writes on purpose rather than failing: a
/// failed-over disk is read-only (`ReadOnlyFilesystem`), a disk whose planned
/// failover prepares holds its writes (`ResourceBusy`). They are logged at WARN at
/// most once a minute per export and kind (`REFUSAL_LOG_EVERY`), not each time.
pub fn is_refusal(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::ResourceBusy
    )
}

pub(super) fn errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(n) if n == ENOSPC as i32 => ENOSPC,
        Some(n) if n == ENOMEM as i32 => ENOMEM,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_first_then_once_per_window_with_the_count_between() {
        let r = Refusals::default();
        let every = Duration::from_secs(60);
        let t0 = Instant::now();
        let ro = io::ErrorKind::ReadOnlyFilesystem;
        assert_eq!(
            r.note("m1/sda", ro, t0, every),
            Some(0),
            "the first is logged"
        );
        assert_eq!(
            r.note("m1/sda", ro, t0 + Duration::from_secs(1), every),
            None
        );
        assert_eq!(
            r.note("m1/sda", ro, t0 + Duration::from_secs(59), every),
            None
        );
        // Another export, another kind: each logged at once.
        assert_eq!(r.note("m1/sdb", ro, t0, every), Some(0));
        let held = io::ErrorKind::ResourceBusy;
        assert_eq!(r.note("m1/sda", held, t0, every), Some(0));
        // A minute on: logged again, saying how many were not.
        assert_eq!(r.note("m1/sda", ro, t0 + every, every), Some(2));
        assert_eq!(r.note("m1/sda", ro, t0 + every, every), None);
    }

    #[test]
    fn refusals_remember_a_bounded_number_of_exports() {
        let r = Refusals::default();
        let (t, every) = (Instant::now(), Duration::from_secs(60));
        for i in 0..REFUSAL_KEYS * 3 {
            r.note(
                &format!("m{i}/sda"),
                io::ErrorKind::ReadOnlyFilesystem,
                t,
                every,
            );
            assert!(r.seen.lock().unwrap().len() <= REFUSAL_KEYS);
        }
    }
}
