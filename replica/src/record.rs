//! Write records: the plaintext inside segment and extent chunks.
//!
//! ```text
//! record = seq u64 LE | offset u64 LE | len u64 LE | kind u8 (1 data, 2 zero) | 7 zero bytes
//!          | len bytes of data (kind 1 only)
//! ```
//! A record never spans chunks; a write larger than a chunk is split into records that
//! share its sequence number. A zero record is a hole: it stores no data.

use crate::error::{Error, Result};
use crate::keys::DataKey;
use crate::object::{ObjectKind, SealContext, Sealer, CHUNK_TARGET};

pub const RECORD_HEADER: usize = 32;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    /// None for a zero (hole) record.
    pub data: Option<&'a [u8]>,
}

fn header(seq: u64, offset: u64, len: u64, kind: u8) -> [u8; RECORD_HEADER] {
    let mut h = [0u8; RECORD_HEADER];
    h[0..8].copy_from_slice(&seq.to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h[24] = kind;
    h
}

fn put_header(buf: &mut Vec<u8>, seq: u64, offset: u64, len: u64, kind: u8) {
    buf.extend_from_slice(&header(seq, offset, len, kind));
}

/// Why a record header is one no writer writes, if it is: so that every record read
/// back is one `ObjectBuilder` could have written (the reserved bytes stay free for a
/// later format to give a meaning, and a data record always holds data).
fn unwritten(header: &[u8]) -> Option<&'static str> {
    if header[25..RECORD_HEADER].iter().any(|b| *b != 0) {
        return Some("record reserved bytes are not zero");
    }
    if header[24] == KIND_DATA && header[16..24] == [0; 8] {
        return Some("data record without data");
    }
    None
}

/// Decodes the records of one chunk's plaintext.
pub fn decode_records(
    mut chunk: &[u8],
    mut f: impl FnMut(Record<'_>) -> Result<()>,
    object: &str,
) -> Result<()> {
    while !chunk.is_empty() {
        if chunk.len() < RECORD_HEADER {
            return Err(Error::corrupt(object, "truncated record header"));
        }
        let u = |at: usize| u64::from_le_bytes(chunk[at..at + 8].try_into().unwrap_or_default());
        let (seq, offset, len, kind) = (u(0), u(8), u(16), chunk[24]);
        if offset.checked_add(len).is_none() {
            return Err(Error::corrupt(object, "record range overflows"));
        }
        if let Some(reason) = unwritten(&chunk[..RECORD_HEADER]) {
            return Err(Error::corrupt(object, reason));
        }
        let body = &chunk[RECORD_HEADER..];
        match kind {
            KIND_DATA => {
                let n = usize::try_from(len)
                    .ok()
                    .filter(|n| *n <= body.len())
                    .ok_or_else(|| {
                        Error::corrupt(
                            object,
                            format!("data record of {len} bytes overruns its chunk"),
                        )
                    })?;
                f(Record {
                    seq,
                    offset,
                    len,
                    data: Some(&body[..n]),
                })?;
                chunk = &body[n..];
            }
            KIND_ZERO => {
                f(Record {
                    seq,
                    offset,
                    len,
                    data: None,
                })?;
                chunk = body;
            }
            other => {
                return Err(Error::corrupt(
                    object,
                    format!("unknown record kind {other}"),
                ))
            }
        }
    }
    Ok(())
}

/// Builds one sealed object out of records, cutting chunks at about CHUNK_TARGET bytes.
pub struct ObjectBuilder<'c> {
    sealer: Sealer,
    ctx: &'c mut SealContext,
    chunk: Vec<u8>,
    data_bytes: u64,
    first_seq: Option<u64>,
    last_seq: u64,
}

impl<'c> ObjectBuilder<'c> {
    pub fn new(
        ctx: &'c mut SealContext,
        key: &DataKey,
        disk_id: &[u8; 16],
        kind: ObjectKind,
        name: &str,
    ) -> Self {
        // Both buffers come from the context when an earlier object left them there, so
        // a worker sealing object after object touches no fresh memory.
        let out = ctx.take_buffer();
        let mut chunk = std::mem::take(&mut ctx.chunk);
        chunk.clear();
        chunk.reserve(CHUNK_TARGET + RECORD_HEADER);
        ObjectBuilder {
            sealer: Sealer::with_buffer(out, key, disk_id, kind, name, CHUNK_TARGET),
            ctx,
            chunk,
            data_bytes: 0,
            first_seq: None,
            last_seq: 0,
        }
    }

    fn note_seq(&mut self, seq: u64) {
        self.first_seq.get_or_insert(seq);
        self.last_seq = seq;
    }

    fn make_room(&mut self, bytes: usize) {
        if !self.chunk.is_empty() && self.chunk.len() + bytes > CHUNK_TARGET + RECORD_HEADER {
            self.sealer.push_chunk(self.ctx, &self.chunk, false);
            self.chunk.clear();
        }
    }

    /// Adds a data record, split so no record exceeds one chunk.
    pub fn data(&mut self, seq: u64, offset: u64, data: &[u8]) {
        self.note_seq(seq);
        let mut at = 0usize;
        while at < data.len() {
            let n = (data.len() - at).min(CHUNK_TARGET);
            self.make_room(RECORD_HEADER + n);
            if self.chunk.is_empty() && n == CHUNK_TARGET {
                // A record that fills a chunk alone (a full seed's usual case): sealed
                // from the caller's buffer, not copied into the chunk first. The chunk
                // holds the same plaintext it would have held; an object that ends with
                // such a record ends with an empty final chunk, which readers accept.
                let h = header(seq, offset + at as u64, n as u64, KIND_DATA);
                let body = &data[at..at + n];
                self.sealer.push_chunk_parts(self.ctx, &[&h, body], false);
                at += n;
                continue;
            }
            put_header(
                &mut self.chunk,
                seq,
                offset + at as u64,
                n as u64,
                KIND_DATA,
            );
            self.chunk.extend_from_slice(&data[at..at + n]);
            at += n;
        }
        self.data_bytes += data.len() as u64;
    }

    /// Adds a hole of `len` bytes.
    pub fn zero(&mut self, seq: u64, offset: u64, len: u64) {
        self.note_seq(seq);
        self.make_room(RECORD_HEADER);
        put_header(&mut self.chunk, seq, offset, len, KIND_ZERO);
    }

    /// Adds raw chunk plaintext that is not records (checksum maps).
    pub fn raw(&mut self, bytes: &[u8]) {
        for piece in bytes.chunks(CHUNK_TARGET) {
            self.make_room(piece.len());
            self.chunk.extend_from_slice(piece);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.first_seq.is_none() && self.chunk.is_empty() && self.sealer.is_empty()
    }

    /// (first_seq, last_seq) of the records added, if any.
    pub fn seq_range(&self) -> Option<(u64, u64)> {
        self.first_seq.map(|f| (f, self.last_seq))
    }

    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// The sealed object. Handing its bytes back with `SealContext::recycle` once they
    /// are uploaded lets the next object reuse the buffer.
    pub fn finish(mut self) -> Vec<u8> {
        self.sealer.push_chunk(self.ctx, &self.chunk, true);
        self.ctx.chunk = std::mem::take(&mut self.chunk);
        self.sealer.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{open_object, Expect, OpenContext};

    // Found by the write_records fuzz target: records no writer writes were read,
    // so decoding did not round-trip through the builder.
    #[test]
    fn records_no_writer_writes_are_refused() {
        let mut empty = Vec::new();
        put_header(&mut empty, 3, 1 << 54, 0, KIND_DATA);
        let mut reserved = Vec::new();
        put_header(&mut reserved, 3, 0, 1, KIND_DATA);
        reserved[26] = 121;
        reserved.push(7);
        for (chunk, why) in [
            (empty, "data record without data"),
            (reserved, "reserved bytes are not zero"),
        ] {
            let e = decode_records(&chunk, |_| Ok(()), "s").unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
        let mut zero = Vec::new();
        put_header(&mut zero, 3, 0, 0, KIND_ZERO);
        decode_records(&zero, |_| Ok(()), "s").unwrap();
    }

    #[test]
    fn records_round_trip_across_chunks() {
        let key = DataKey::generate();
        let disk = [3u8; 16];
        let mut ctx = SealContext::default();
        let mut b = ObjectBuilder::new(&mut ctx, &key, &disk, ObjectKind::Segment, "s");
        let big: Vec<u8> = (0..3 * CHUNK_TARGET + 5).map(|i| (i % 251) as u8).collect();
        b.data(1, 4096, b"abc");
        b.zero(2, 0, 1 << 40);
        b.data(3, 10, &big);
        assert_eq!(b.seq_range(), Some((1, 3)));
        let mut obj = b.finish();
        let mut got = Vec::new();
        let e = Expect {
            key: &key,
            disk_id: &disk,
            kind: ObjectKind::Segment,
            name: "s",
        };
        open_object(&e, &mut obj, &mut OpenContext::default(), |c| {
            decode_records(
                c,
                |r| {
                    got.push((r.seq, r.offset, r.len, r.data.map(|d| d.to_vec())));
                    Ok(())
                },
                "s",
            )
        })
        .unwrap();
        assert_eq!(got[0], (1, 4096, 3, Some(b"abc".to_vec())));
        assert_eq!(got[1], (2, 0, 1 << 40, None));
        let mut joined = Vec::new();
        let mut next = 10;
        for (seq, off, len, data) in &got[2..] {
            assert_eq!((*seq, *off), (3, next));
            next += len;
            joined.extend_from_slice(data.as_ref().unwrap());
        }
        assert_eq!(joined, big);
    }

    #[test]
    fn a_recycled_buffer_seals_the_next_object() {
        let key = DataKey::generate();
        let disk = [5u8; 16];
        let mut ctx = SealContext::default();
        let data: Vec<u8> = (0..2 * CHUNK_TARGET).map(|i| (i % 253) as u8).collect();
        let seal = |ctx: &mut SealContext, name: &str| {
            let mut b = ObjectBuilder::new(ctx, &key, &disk, ObjectKind::Extent, name);
            b.data(7, 0, &data);
            b.finish()
        };
        let first = bytes::Bytes::from(seal(&mut ctx, "a"));
        let at = first.as_ptr();
        // Still shared (as during an upload): not taken.
        let held = first.clone();
        ctx.recycle(first);
        let second = seal(&mut ctx, "b");
        assert_ne!(second.as_ptr(), at, "a shared buffer must not be reused");
        drop(held);
        // Uploaded and released: the next object is sealed in the same memory.
        let second = bytes::Bytes::from(second);
        let at = second.as_ptr();
        ctx.recycle(second);
        let mut third = seal(&mut ctx, "c");
        assert_eq!(third.as_ptr(), at, "the recycled buffer is reused");
        let e = Expect {
            key: &key,
            disk_id: &disk,
            kind: ObjectKind::Extent,
            name: "c",
        };
        let mut got = Vec::new();
        open_object(&e, &mut third, &mut OpenContext::default(), |c| {
            decode_records(
                c,
                |r| {
                    got.extend_from_slice(r.data.unwrap_or_default());
                    Ok(())
                },
                "c",
            )
        })
        .unwrap();
        assert!(
            got == data,
            "the object sealed in a reused buffer opens to its data"
        );
    }
}
