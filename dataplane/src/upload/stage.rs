//! The upload stage: cached frames of one disk, in sequence order, become a sealed log
//! segment and the recovery points their bookmarks mark, committed to the replica in one
//! append. The replica's `next_seq` is the uploaded watermark: every frame below it is
//! in blob storage, so replaying a cache after a restart skips what already landed and
//! each write lands exactly once.
//!
//! A segment whose commit would start after the orphan grace (less its margin) from
//! its put is abandoned, never committed: compaction may already have collected it.
//! The upload is sealed again under a fresh name and redone (`append_writes`).
//!
//! Every commit carries the writer epoch this server holds (docs/storage-format.md 3,
//! "Fencing"), and it commits only while the replica's state is in that epoch of that
//! writer: once another server claimed the disk, `upload` answers `Error::Fenced`.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use ferry_replica::grace::ORPHAN_GRACE;
use ferry_replica::meta::CommitKind;
use ferry_replica::meta::Point;
use ferry_replica::object::SealContext;
use ferry_replica::writer::{append_writes, Payload, Write};
use ferry_replica::{Disk, DiskState, Error, PointKind, Result, Store, VaultKey};

use crate::server::claims::{ClaimRecord, Claims};

use ferry_link::protocol::{Frame, PointKindWire};

pub struct DiskUploader {
    disk: Disk,
    state: DiskState,
    ctx: SealContext,
    /// The disk's size as the agent last announced it.
    disk_bytes: u64,
    /// The grace compaction gives unreferenced objects; uploads commit well within it.
    orphan_grace: Duration,
    /// Payload bytes and sealed bytes of everything uploaded by this uploader.
    pub plain_bytes: u64,
    pub sealed_bytes: u64,
    /// Uploads abandoned and redone because they outlived the commit deadline.
    pub redone: u64,
    /// The writer epoch and name its commits carry: this server's claim on record, or
    /// (0, none) where it has none (writes cached before fencing existed).
    held: (u64, Option<String>),
}

/// Attempts at a claim when other servers' commits keep winning the number.
const CLAIM_ATTEMPTS: usize = 5;

impl DiskUploader {
    pub fn open(
        store: &Store,
        vault: &VaultKey,
        machine: &str,
        disk: &str,
        claim: Option<&ClaimRecord>,
    ) -> Result<DiskUploader> {
        let mut disk = store.block(Disk::open_or_create(
            store,
            machine,
            disk,
            vault,
            ferry_replica::DEFAULT_BLOCK_BYTES,
            ferry_replica::DEFAULT_EXTENT_BYTES,
        ))?;
        let state = store.block(disk.load_state())?;
        let disk_bytes = state.latest_point().map_or(0, |p| p.disk_bytes);
        let held = claim.map_or((0, None), |c| (c.epoch, Some(c.writer.clone())));
        disk.set_writer(held.1.clone());
        Ok(DiskUploader {
            disk,
            state,
            ctx: SealContext::default(),
            disk_bytes,
            orphan_grace: ORPHAN_GRACE,
            plain_bytes: 0,
            sealed_bytes: 0,
            redone: 0,
            held,
        })
    }

    /// Whether the replica, as last folded, is in the epoch this server holds.
    pub fn owns(&self) -> bool {
        self.state.held_by(self.held.0, self.held.1.as_deref())
    }

    /// The epoch this server holds.
    pub fn held_epoch(&self) -> u64 {
        self.held.0
    }

    /// Folds the replica's commit records again.
    pub fn reload(&mut self) -> Result<()> {
        self.state = self.disk.store.block(self.disk.load_state())?;
        Ok(())
    }

    fn fenced(&self) -> Error {
        Error::Fenced {
            disk: self.disk.paths.label(),
            held: self.held.0,
            epoch: self.state.epoch,
            writer: self
                .state
                .writer
                .clone()
                .unwrap_or_else(|| "a writer that names none".into()),
        }
    }

    /// Claims the disk for `claims.me`: the next epoch, written on record first, then
    /// an append commit with nothing in it but the epoch and the name. `kept_cache`:
    /// this server owns the disk now, so what it cached stays valid. A lost race folds
    /// again and claims the epoch after the winner's.
    pub fn claim(&mut self, claims: &Claims, kept_cache: bool) -> Result<ClaimRecord> {
        let mut last = None;
        for _ in 0..CLAIM_ATTEMPTS {
            self.reload()?;
            let rec = ClaimRecord {
                epoch: self.state.epoch + 1,
                writer: claims.me.clone(),
                kept_cache: kept_cache && self.owns(),
                starts: Default::default(),
            };
            // On record before the commit: see `crate::server::claims`.
            claims.put(&self.disk.info.machine, &self.disk.info.disk, &rec)?;
            let mut c = self
                .disk
                .new_commit(&self.state, CommitKind::Append, self.state.next_seq);
            c.epoch = rec.epoch;
            c.writer = Some(rec.writer.clone());
            let store = self.disk.store.clone();
            match store.block(self.disk.commit(&mut self.state, c)) {
                Ok(()) => {
                    self.held = (rec.epoch, Some(rec.writer.clone()));
                    self.disk.set_writer(Some(rec.writer.clone()));
                    return Ok(rec);
                }
                Err(e @ Error::Conflict { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Invalid("no claim attempt was made".into())))
    }

    /// Holds uploads to another orphan grace than `ORPHAN_GRACE` (it must be the one
    /// compaction of this store uses; tests shorten both).
    pub fn with_orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// Every frame below this sequence number is committed in blob storage.
    pub fn uploaded(&self) -> u64 {
        self.state.next_seq
    }

    /// The replica's state as this uploader has committed it.
    pub fn state(&self) -> &DiskState {
        &self.state
    }

    pub fn set_disk_bytes(&mut self, bytes: u64) {
        self.disk_bytes = bytes;
    }

    /// Seals and commits `frames` (Write, Zero, Bookmark; ascending, gap-free sequence
    /// numbers from `uploaded()` on; older ones are skipped; a Hello sets the disk size). Returns the new watermark.
    pub fn upload(&mut self, frames: &[Frame<'_>]) -> Result<u64> {
        let mut writes = Vec::new();
        let mut points = Vec::new();
        let mut next = self.state.next_seq;
        for f in frames {
            let seq = match f {
                Frame::Write { seq, .. } | Frame::Zero { seq, .. } => *seq,
                Frame::Bookmark(b) => b.seq,
                // The cache keeps each session's Hello: it carries the disk's size,
                // which the points after it record.
                Frame::Hello(h) => {
                    self.disk_bytes = h.disk_bytes;
                    continue;
                }
                _ => continue,
            };
            if seq < next {
                continue;
            }
            if seq != next {
                return Err(ferry_replica::Error::Invalid(format!(
                    "disk {}: frame {seq} follows {next}: the cache lost a frame",
                    self.disk.paths.label()
                )));
            }
            match f {
                Frame::Write { offset, data, .. } => writes.push(Write {
                    seq,
                    offset: *offset,
                    payload: Payload::Data(data),
                }),
                Frame::Zero { offset, len, .. } => writes.push(Write {
                    seq,
                    offset: *offset,
                    payload: Payload::Zero(*len),
                }),
                Frame::Bookmark(b) => points.push(Point {
                    id: b.id.to_string(),
                    kind: match b.kind {
                        PointKindWire::Crash => PointKind::Crash,
                        PointKindWire::App => PointKind::App,
                        PointKindWire::Group => PointKind::Group,
                    },
                    time: Utc
                        .timestamp_millis_opt(b.time_ms)
                        .single()
                        .unwrap_or_else(Utc::now),
                    // The bookmark's own number: every write below it, none after.
                    seq,
                    // Protocol 2 names the size with the point; a protocol-1 point
                    // takes the size of its session's Hello.
                    disk_bytes: b.disk_bytes.unwrap_or(self.disk_bytes),
                    label: (!b.label.is_empty()).then(|| b.label.to_string()),
                    group: (!b.group.is_empty()).then(|| b.group.to_string()),
                    sums: None,
                }),
                _ => {}
            }
            next += 1;
        }
        if next == self.state.next_seq {
            return Ok(next);
        }
        let plain: u64 = writes
            .iter()
            .map(|w| match w.payload {
                Payload::Data(d) => d.len() as u64,
                Payload::Zero(_) => 0,
            })
            .sum();
        if !self.owns() {
            return Err(self.fenced());
        }
        let store = self.disk.store.clone();
        let done = match store.block(append_writes(
            &self.disk,
            &mut self.state,
            &mut self.ctx,
            &writes,
            points,
            next,
            self.orphan_grace,
        )) {
            Ok(d) => d,
            // Another writer took the number: fold again; if it claimed the disk,
            // these writes are never retried.
            Err(e @ Error::Conflict { .. }) => {
                self.reload()?;
                return Err(if self.owns() { e } else { self.fenced() });
            }
            Err(e) => return Err(e),
        };
        if done.redone > 0 {
            tracing::warn!(
                disk = %self.disk.paths.label(),
                redone = done.redone,
                "the store answered too slowly: an upload outlived its commit deadline and was redone under fresh names"
            );
        }
        self.plain_bytes += plain;
        self.sealed_bytes += done.sealed_bytes;
        self.redone += done.redone as u64;
        Ok(next)
    }
}
