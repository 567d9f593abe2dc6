//! The first frame of a connection: it must be a Hello naming a valid disk of a
//! machine the client certificate names, from a certificate not revoked, of a machine
//! that did not fail over. Checked before the store is touched.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_link::protocol::{decode, Decoded, ErrorCode, Frame};
use ferry_link::tls::certs::cert_names;
use ferry_link::tls::TlsReader;

use super::end::{unavailable, End};
use super::registry::DiskEntry;
use super::session::Reject;
use super::shard::Shard;

/// What the first frame started.
pub(super) struct First {
    /// The Hello's length in the buffer.
    pub used: usize,
    pub entry: Arc<DiskEntry>,
    pub progress: super::session::Progress,
    /// The replica's `next_seq` where this server just claimed the disk and dropped
    /// what it had cached under an older claim: the session's watermarks.
    pub claimed: Option<u64>,
}

/// Reads until the first frame is whole; it must be a Hello naming a valid disk.
/// Returns its length in `inbuf`, the disk and its watermarks.
pub(super) async fn read_first(
    shard: &Shard,
    reader: &mut TlsReader,
    inbuf: &mut Vec<u8>,
) -> Result<First, End> {
    let timeout = shard.opts.peer_timeout;
    loop {
        match decode(inbuf, shard.opts.limits.max_payload) {
            Ok(Decoded::Frame(Frame::Hello(h), used)) => {
                let key = format!("{}/{}", h.machine, h.disk);
                if let Err(e) = h.check_names() {
                    return Err(End::Reject(Reject {
                        code: ErrorCode::Malformed,
                        reason: format!("hello for {key:?}: {e}"),
                    }));
                }
                // An agent writes only its own machine's disks: the machine must be a
                // name in its certificate. Checked before the store is touched.
                if !reader
                    .peer_certificate()
                    .is_some_and(|der| cert_names(&der, h.machine))
                {
                    return Err(End::Reject(Reject {
                        code: ErrorCode::NotOwned,
                        reason: format!(
                            "the client certificate does not name machine {}: it may not write {key}",
                            h.machine
                        ),
                    }));
                }
                // A removed machine's certificate still chains to the CA until it
                // expires: the control plane's revoked list is what refuses it.
                let der = reader.peer_certificate();
                if let Some(why) = shard.opts.revoked.refusal(der.as_deref()) {
                    return Err(End::Reject(Reject {
                        code: ErrorCode::NotOwned,
                        reason: format!("{why}; it may not write {key}"),
                    }));
                }
                // A machine that failed over runs at the recovery site: its source
                // is told so, in words its agent acts on (read-only, no replication).
                if let Some(why) = shard.opts.failed_over.refusal(h.machine) {
                    return Err(End::Reject(Reject {
                        code: ErrorCode::FailedOver,
                        reason: format!("{why}; it may not write {key}"),
                    }));
                }
                let entry = shard.registry.entry(&key);
                let registry = shard.registry.clone();
                let e2 = entry.clone();
                // Claims the disk in the replica unless this server owns it already
                // (docs/protocol.md, Session 2).
                let opened = compio::runtime::spawn_blocking(move || {
                    e2.open_for_session(&registry).map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|_| Err("opening the disk panicked".into()));
                let claimed = match opened {
                    Ok(c) => c,
                    Err(e) => {
                        shard.metrics.borrow_mut().error("store");
                        return Err(End::Reject(unavailable(format!("disk {key}: {e}"))));
                    }
                };
                let progress = super::session::Progress {
                    durable: entry.durable.load(Ordering::SeqCst),
                    uploaded: entry.uploaded.load(Ordering::SeqCst),
                };
                return Ok(First {
                    used,
                    entry,
                    progress,
                    claimed,
                });
            }
            Ok(Decoded::Frame(_, _)) => {
                return Err(End::Reject(Reject {
                    code: ErrorCode::Malformed,
                    reason: "the first frame must be a hello".into(),
                }))
            }
            Ok(Decoded::Incomplete(_)) => {}
            Err(e) => {
                return Err(End::Reject(Reject {
                    code: e.code(),
                    reason: e.to_string(),
                }))
            }
        }
        match compio::time::timeout(timeout, reader.read(inbuf)).await {
            Ok(Ok(0)) => return Err(End::Gone("closed before its hello".into())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(End::Gone(format!("reading hello: {e}"))),
            Err(_) => return Err(End::Gone(format!("no hello within {timeout:?}"))),
        }
    }
}
