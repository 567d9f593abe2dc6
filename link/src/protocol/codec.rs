//! Encoding and decoding frames.

use super::frame::{types::*, Bookmark, ErrorCode, Frame, Hello, PointKindWire, Welcome};
use super::{HEADER_BYTES, MAX_PAYLOAD_BYTES};

/// Longest machine or disk name, point id or group tag.
const NAME_MAX: usize = 64;
/// Longest label or error reason.
const TEXT_MAX: usize = 1024;
/// Bytes of one block checksum in a Sums frame.
pub const SUM_BYTES: usize = 16;
/// Bytes of a Sums frame's fields before its checksums.
pub const SUMS_HEADER_BYTES: usize = 28;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("frame of {len} payload bytes exceeds the limit of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("malformed {frame} frame: {reason}")]
    Malformed {
        frame: &'static str,
        reason: &'static str,
    },
}

impl DecodeError {
    /// The error code to send back before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::Malformed,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame and the bytes it took from the buffer.
    Frame(Frame<'a>, usize),
    /// Not enough bytes yet: the whole frame needs this many in the buffer.
    Incomplete(usize),
}

/// A cursor over one frame's payload.
struct Reader<'a> {
    buf: &'a [u8],
    frame: &'static str,
}

impl<'a> Reader<'a> {
    fn bad(&self, reason: &'static str) -> DecodeError {
        DecodeError::Malformed {
            frame: self.frame,
            reason,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.bad("payload shorter than its fields"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn str(&mut self, max: usize) -> Result<&'a str, DecodeError> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(self.bad("string longer than allowed"));
        }
        std::str::from_utf8(self.take(n)?).map_err(|_| self.bad("string is not UTF-8"))
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad("trailing bytes after the fields"))
        }
    }
}

fn name_of(t: u8) -> &'static str {
    match t {
        HELLO => "hello",
        WELCOME => "welcome",
        WRITE => "write",
        ZERO => "zero",
        BOOKMARK => "bookmark",
        FLUSH => "flush",
        SUMS_REQUEST => "sums request",
        SUMS => "sums",
        ACK => "ack",
        CREDIT => "credit",
        ERROR => "error",
        PING => "ping",
        PONG => "pong",
        BYE => "bye",
        _ => "unknown",
    }
}

/// Decodes the frame at the start of `buf`. `max_payload` is the session's limit.
pub fn decode(buf: &[u8], max_payload: u32) -> Result<Decoded<'_>, DecodeError> {
    if buf.len() < HEADER_BYTES {
        return Ok(Decoded::Incomplete(HEADER_BYTES));
    }
    let t = buf[0];
    let name = name_of(t);
    if name == "unknown" {
        return Err(DecodeError::UnknownType(t));
    }
    if buf[1] != 0 || buf[2] != 0 || buf[3] != 0 {
        return Err(DecodeError::Malformed {
            frame: name,
            reason: "flags or reserved bytes are not zero",
        });
    }
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let max = max_payload.min(MAX_PAYLOAD_BYTES);
    // The fixed fields of a write or a bookmark's texts may exceed a tiny negotiated
    // limit; the limit is on data, so allow their overhead on top.
    if len > max + 4096 {
        return Err(DecodeError::TooLarge { len, max });
    }
    let total = HEADER_BYTES + len as usize;
    if buf.len() < total {
        return Ok(Decoded::Incomplete(total));
    }
    let mut r = Reader {
        buf: &buf[HEADER_BYTES..total],
        frame: name,
    };
    let frame = match t {
        HELLO => {
            let version = r.u16()?;
            let machine = r.str(NAME_MAX)?;
            let disk = r.str(NAME_MAX)?;
            let mut session = [0u8; 16];
            session.copy_from_slice(r.take(16)?);
            let journal_from = r.u64()?;
            let next_seq = r.u64()?;
            let disk_bytes = r.u64()?;
            if journal_from > next_seq {
                return Err(r.bad("journal starts after the next sequence number"));
            }
            Frame::Hello(Hello {
                version,
                machine,
                disk,
                session,
                journal_from,
                next_seq,
                disk_bytes,
            })
        }
        WELCOME => Frame::Welcome(Welcome {
            version: r.u16()?,
            durable: r.u64()?,
            uploaded: r.u64()?,
            credit: r.u64()?,
            max_payload: r.u32()?,
        }),
        WRITE => {
            let seq = r.u64()?;
            let offset = r.u64()?;
            let data = r.take(r.buf.len())?;
            if data.is_empty() {
                return Err(r.bad("a write carries no data"));
            }
            if data.len() as u64 > max as u64 {
                return Err(DecodeError::TooLarge { len, max });
            }
            if offset.checked_add(data.len() as u64).is_none() {
                return Err(r.bad("offset + length overflows"));
            }
            Frame::Write { seq, offset, data }
        }
        ZERO => {
            let (seq, offset, len) = (r.u64()?, r.u64()?, r.u64()?);
            if len == 0 || offset.checked_add(len).is_none() {
                return Err(r.bad("empty or overflowing range"));
            }
            Frame::Zero { seq, offset, len }
        }
        BOOKMARK => {
            let seq = r.u64()?;
            let kind = match r.u8()? {
                1 => PointKindWire::Crash,
                2 => PointKindWire::App,
                3 => PointKindWire::Group,
                _ => return Err(r.bad("unknown point kind")),
            };
            let time_ms = r.u64()? as i64;
            let id = r.str(NAME_MAX)?;
            if id.is_empty() {
                return Err(r.bad("empty point id"));
            }
            let group = r.str(NAME_MAX)?;
            let label = r.str(TEXT_MAX)?;
            // Protocol 2 adds the disk's size; a protocol-1 bookmark ends at its label.
            let disk_bytes = if r.buf.is_empty() {
                None
            } else {
                Some(r.u64()?)
            };
            Frame::Bookmark(Bookmark {
                seq,
                kind,
                time_ms,
                id,
                group,
                label,
                disk_bytes,
            })
        }
        FLUSH => Frame::Flush { seq: r.u64()? },
        SUMS_REQUEST => Frame::SumsRequest { seq: r.u64()? },
        SUMS => {
            let (seq, block_bytes, disk_bytes, first) = (r.u64()?, r.u32()?, r.u64()?, r.u64()?);
            let sums = r.take(r.buf.len())?;
            if block_bytes == 0 || sums.len() % SUM_BYTES != 0 {
                return Err(r.bad("zero block size or a partial checksum"));
            }
            let blocks = disk_bytes.div_ceil(block_bytes as u64);
            if first
                .checked_add((sums.len() / SUM_BYTES) as u64)
                .is_none_or(|end| end > blocks)
            {
                return Err(r.bad("checksums beyond the disk's last block"));
            }
            Frame::Sums {
                seq,
                block_bytes,
                disk_bytes,
                first,
                sums,
            }
        }
        ACK => Frame::Ack {
            durable: r.u64()?,
            uploaded: r.u64()?,
        },
        CREDIT => Frame::Credit { bytes: r.u64()? },
        ERROR => {
            let code = ErrorCode::from_u16(r.u16()?).ok_or_else(|| r.bad("unknown error code"))?;
            Frame::Error {
                code,
                reason: r.str(TEXT_MAX)?,
            }
        }
        PING => Frame::Ping { token: r.u64()? },
        PONG => Frame::Pong { token: r.u64()? },
        _ => Frame::Bye,
    };
    r.end()?;
    Ok(Decoded::Frame(frame, total))
}

fn header(out: &mut Vec<u8>, t: u8, len: usize) {
    out.extend_from_slice(&[t, 0, 0, 0]);
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

fn put_str(p: &mut Vec<u8>, s: &str, max: usize) {
    // Encoders truncate at a character boundary rather than send what peers reject.
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    p.extend_from_slice(&(end as u16).to_le_bytes());
    p.extend_from_slice(&s.as_bytes()[..end]);
}

/// The header and fixed fields of a Write whose `data_len` bytes follow separately, so
/// a sender can hand the data to the socket without copying it behind the header.
pub fn encode_write_header(out: &mut Vec<u8>, seq: u64, offset: u64, data_len: usize) {
    header(out, WRITE, 16 + data_len);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
}

/// Appends the encoding of `f` to `out`.
pub fn encode(f: &Frame<'_>, out: &mut Vec<u8>) {
    let mut p = Vec::new();
    let t = match f {
        Frame::Hello(h) => {
            p.extend_from_slice(&h.version.to_le_bytes());
            put_str(&mut p, h.machine, NAME_MAX);
            put_str(&mut p, h.disk, NAME_MAX);
            p.extend_from_slice(&h.session);
            for v in [h.journal_from, h.next_seq, h.disk_bytes] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            HELLO
        }
        Frame::Welcome(w) => {
            p.extend_from_slice(&w.version.to_le_bytes());
            for v in [w.durable, w.uploaded, w.credit] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            p.extend_from_slice(&w.max_payload.to_le_bytes());
            WELCOME
        }
        Frame::Write { seq, offset, data } => {
            encode_write_header(out, *seq, *offset, data.len());
            out.extend_from_slice(data);
            return;
        }
        Frame::Zero { seq, offset, len } => {
            for v in [*seq, *offset, *len] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            ZERO
        }
        Frame::Bookmark(b) => {
            p.extend_from_slice(&b.seq.to_le_bytes());
            p.push(b.kind as u8);
            p.extend_from_slice(&(b.time_ms as u64).to_le_bytes());
            put_str(&mut p, b.id, NAME_MAX);
            put_str(&mut p, b.group, NAME_MAX);
            put_str(&mut p, b.label, TEXT_MAX);
            if let Some(n) = b.disk_bytes {
                p.extend_from_slice(&n.to_le_bytes());
            }
            BOOKMARK
        }
        Frame::Flush { seq } => {
            p.extend_from_slice(&seq.to_le_bytes());
            FLUSH
        }
        Frame::Ack { durable, uploaded } => {
            p.extend_from_slice(&durable.to_le_bytes());
            p.extend_from_slice(&uploaded.to_le_bytes());
            ACK
        }
        Frame::Credit { bytes } => {
            p.extend_from_slice(&bytes.to_le_bytes());
            CREDIT
        }
        Frame::Error { code, reason } => {
            p.extend_from_slice(&(*code as u16).to_le_bytes());
            put_str(&mut p, reason, TEXT_MAX);
            ERROR
        }
        Frame::Ping { token } => {
            p.extend_from_slice(&token.to_le_bytes());
            PING
        }
        Frame::Pong { token } => {
            p.extend_from_slice(&token.to_le_bytes());
            PONG
        }
        Frame::Bye => BYE,
        Frame::SumsRequest { seq } => {
            p.extend_from_slice(&seq.to_le_bytes());
            SUMS_REQUEST
        }
        Frame::Sums {
            seq,
            block_bytes,
            disk_bytes,
            first,
            sums,
        } => {
            p.extend_from_slice(&seq.to_le_bytes());
            p.extend_from_slice(&block_bytes.to_le_bytes());
            p.extend_from_slice(&disk_bytes.to_le_bytes());
            p.extend_from_slice(&first.to_le_bytes());
            p.extend_from_slice(sums);
            SUMS
        }
    };
    header(out, t, p.len());
    out.extend_from_slice(&p);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame<'static>> {
        vec![
            Frame::Hello(Hello {
                version: 1,
                machine: "web1",
                disk: "sda",
                session: [3; 16],
                journal_from: 5,
                next_seq: 9,
                disk_bytes: 1 << 30,
            }),
            Frame::Welcome(Welcome {
                version: 1,
                durable: 4,
                uploaded: 2,
                credit: 1 << 24,
                max_payload: 1 << 20,
            }),
            Frame::Write {
                seq: 7,
                offset: 4096,
                data: b"hello",
            },
            Frame::Zero {
                seq: 8,
                offset: 0,
                len: 1 << 20,
            },
            Frame::Bookmark(Bookmark {
                seq: 9,
                kind: PointKindWire::App,
                time_ms: 1_700_000_000_000,
                id: "p1",
                group: "g",
                label: "before upgrade",
                disk_bytes: Some(1 << 30),
            }),
            // As protocol 1 sent it, and caches and journals of then still hold it.
            Frame::Bookmark(Bookmark {
                seq: 10,
                kind: PointKindWire::Crash,
                time_ms: 1_700_000_000_001,
                id: "p2",
                group: "",
                label: "",
                disk_bytes: None,
            }),
            Frame::Flush { seq: 9 },
            Frame::Ack {
                durable: 9,
                uploaded: 3,
            },
            Frame::Credit { bytes: 65536 },
            Frame::Error {
                code: ErrorCode::NotOwned,
                reason: "disk sdb is not this session's",
            },
            Frame::Error {
                code: ErrorCode::FailedOver,
                reason: "machine web1 failed over to the recovery site",
            },
            Frame::Ping { token: 1 },
            Frame::Pong { token: 1 },
            Frame::Bye,
            Frame::SumsRequest { seq: 12 },
            Frame::Sums {
                seq: 12,
                block_bytes: 65536,
                disk_bytes: 3 << 16,
                first: 1,
                sums: &[7u8; 32],
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_and_is_incomplete_until_whole() {
        for f in all() {
            let mut buf = Vec::new();
            encode(&f, &mut buf);
            for cut in 0..buf.len() {
                match decode(&buf[..cut], MAX_PAYLOAD_BYTES).unwrap() {
                    Decoded::Incomplete(n) => assert!(n > cut),
                    other => panic!("{f:?} decoded from {cut} bytes: {other:?}"),
                }
            }
            buf.extend_from_slice(b"next");
            assert_eq!(
                decode(&buf, MAX_PAYLOAD_BYTES).unwrap(),
                Decoded::Frame(f.clone(), buf.len() - 4)
            );
        }
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert_eq!(
            decode(&[0x99, 0, 0, 0, 0, 0, 0, 0], 1024),
            Err(DecodeError::UnknownType(0x99))
        );
        let mut big = Vec::new();
        encode(
            &Frame::Write {
                seq: 1,
                offset: 0,
                data: &[1u8; 2048],
            },
            &mut big,
        );
        assert!(matches!(
            decode(&big, 1024),
            Err(DecodeError::TooLarge { .. })
        ));
        let mut w = Vec::new();
        encode(
            &Frame::Write {
                seq: 1,
                offset: u64::MAX - 1,
                data: b"xyz",
            },
            &mut w,
        );
        assert!(matches!(
            decode(&w, 1024),
            Err(DecodeError::Malformed { .. })
        ));
        let mut e = Vec::new();
        encode(&Frame::Ping { token: 1 }, &mut e);
        e[4] = 9; // length says 9 bytes of payload, 8 are fields: trailing byte
        e.push(0);
        assert!(matches!(
            decode(&e, 1024),
            Err(DecodeError::Malformed { .. })
        ));
        e[1] = 1;
        assert!(matches!(
            decode(&e, 1024),
            Err(DecodeError::Malformed { .. })
        ));
        // Checksums past the disk's end, or a partial one.
        for (first, sums) in [(2u64, &[1u8; 32][..]), (0, &[1u8; 15][..])] {
            let mut s = Vec::new();
            encode(
                &Frame::Sums {
                    seq: 1,
                    block_bytes: 4096,
                    disk_bytes: 3 * 4096,
                    first,
                    sums,
                },
                &mut s,
            );
            assert!(matches!(
                decode(&s, 1024),
                Err(DecodeError::Malformed { .. })
            ));
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut buf = Vec::new();
            let len = (x % 64) as usize;
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            if let Some(t) = buf.first_mut() {
                *t =
                    [0x01, 0x02, 0x10, 0x11, 0x12, 0x13, 0x14, 0x20, 0x22, 0x30][(x % 10) as usize];
            }
            let _ = decode(&buf, 1 << 16);
        }
    }
}
