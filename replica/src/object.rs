//! The sealed object: the one binary format every data object in the store uses (log
//! segments, base extents, checksum maps).
//!
//! ```text
//! header (80 bytes, authenticated as part of every chunk's associated data)
//!   0  magic "FERRYOBJ"      8  version u16 LE (1)   10 kind u8   11 flags u8 (0)
//!   12 reserved u32 (0)      16 disk id [16]         32 data key id [16]
//!   48 salt [32]             (object key = HKDF-SHA256(data key, salt, info || disk id))
//! chunk*, each:
//!   sealed_len u32 LE | codec u8 (0 raw, 1 zstd) | last u8 (0|1) | reserved u16 | plain_len u32 LE
//!   sealed_len bytes: AES-256-GCM ciphertext of the (compressed) body, then the 16-byte tag
//! ```
//! The nonce of chunk i is 4 zero bytes then i as u64 big-endian. The associated data of
//! chunk i binds the header, the object's own path in the store, i and the frame header,
//! so an object cannot be renamed, spliced, truncated (the final chunk is marked) or
//! moved to another disk without failing authentication.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::keys::{random_bytes, DataKey, ObjectKey, SALT_BYTES, TAG_BYTES};

pub const MAGIC: &[u8; 8] = b"FERRYOBJ";
pub const VERSION: u16 = 1;
pub const HEADER_BYTES: usize = 80;
pub const FRAME_BYTES: usize = 12;
/// Plaintext bytes a writer puts in one chunk before starting the next.
pub const CHUNK_TARGET: usize = 1 << 20;
/// Largest plaintext a reader accepts for one chunk; bounds memory on hostile input.
pub const CHUNK_PLAIN_MAX: usize = 4 << 20;
const AAD_DOMAIN: &[u8] = b"ferry chunk v1";
/// A chunk is stored compressed only if zstd saves at least 1/32 of it.
const MIN_SAVING_SHIFT: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    Segment = 1,
    Extent = 2,
    Sums = 3,
}

impl ObjectKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Segment),
            2 => Some(Self::Extent),
            3 => Some(Self::Sums),
            _ => None,
        }
    }
}

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// Disk identity as the 16 bytes sealed into every header.
pub fn disk_id_bytes(disk_id: &str) -> Result<[u8; 16]> {
    let v = hex::decode(disk_id)
        .map_err(|_| Error::Invalid(format!("disk id {disk_id:?} is not hex")))?;
    v.as_slice()
        .try_into()
        .map_err(|_| Error::Invalid(format!("disk id {disk_id:?} is not 16 bytes")))
}

fn key_id_bytes(id: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(v) = hex::decode(id) {
        let n = v.len().min(16);
        out[..n].copy_from_slice(&v[..n]);
    }
    out
}

fn build_aad(aad: &mut Vec<u8>, header: &[u8], name: &str, index: u64, frame: &[u8]) {
    aad.clear();
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(header);
    aad.extend_from_slice(&(name.len() as u32).to_le_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad.extend_from_slice(&index.to_le_bytes());
    aad.extend_from_slice(frame);
}

/// Largest buffer a `SealContext` keeps for the next object: an extent of 16 MiB seals
/// into at most about 16 MiB, and a context must not pin more than a few of those.
const RECYCLE_MAX: usize = 64 << 20;

/// Per-thread sealing state, reused across objects so the hot path allocates nothing
/// per chunk, nor (where the caller hands finished objects back) per object.
pub struct SealContext {
    compressor: zstd::bulk::Compressor<'static>,
    aad: Vec<u8>,
    /// The records builder's chunk plaintext, kept between objects.
    pub(crate) chunk: Vec<u8>,
    /// A finished object's buffer handed back by `recycle`, for the next object. Fresh
    /// memory costs a page fault per 4 KiB on first touch (about 1.4 GB/s, slower than
    /// zstd), and an object's buffer is mostly written once: reusing it saves that.
    spare: Vec<u8>,
}

/// The capacity of a Vec past `at`, for zstd to write a chunk's body where it belongs
/// (its bulk API on a plain Vec writes from the start).
struct Spare<'a> {
    vec: &'a mut Vec<u8>,
    at: usize,
}

// SAFETY: the pointer and capacity describe the Vec's allocation past `at`, which the
// Vec owns; `filled_until(n)` is called by zstd only for bytes it wrote, so the new
// length covers initialized memory only.
unsafe impl zstd::zstd_safe::WriteBuf for Spare<'_> {
    fn as_slice(&self) -> &[u8] {
        &self.vec[self.at..]
    }

    fn capacity(&self) -> usize {
        self.vec.capacity() - self.at
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: `at` is at most the length, so within the allocation or one past it.
        unsafe { self.vec.as_mut_ptr().add(self.at) }
    }

    unsafe fn filled_until(&mut self, n: usize) {
        // SAFETY: the caller wrote n bytes from `at` (the trait's contract).
        unsafe { self.vec.set_len(self.at + n) }
    }
}

impl SealContext {
    pub fn new(level: i32) -> Self {
        SealContext {
            compressor: zstd::bulk::Compressor::new(level)
                .expect("a zstd compression context for a built-in level"),
            aad: Vec::with_capacity(256),
            chunk: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Takes back an uploaded object's bytes for the next object's buffer, if nothing
    /// else holds them (a store that still does is left alone) and they are not too
    /// large to keep.
    pub fn recycle(&mut self, object: Bytes) {
        if object.len() > RECYCLE_MAX {
            return;
        }
        if let Ok(b) = object.try_into_mut() {
            let buf = Vec::from(b);
            if buf.capacity() <= RECYCLE_MAX && buf.capacity() > self.spare.capacity() {
                self.spare = buf;
            }
        }
    }

    /// The buffer for the next object: the recycled one, emptied, or a new one.
    pub(crate) fn take_buffer(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        buf
    }
}

impl Default for SealContext {
    fn default() -> Self {
        Self::new(1)
    }
}

/// Writes one sealed object chunk by chunk into a growing buffer.
pub struct Sealer {
    key: ObjectKey,
    name: String,
    out: Vec<u8>,
    index: u64,
    finished: bool,
}

impl Sealer {
    pub fn new(
        key: &DataKey,
        disk_id: &[u8; 16],
        kind: ObjectKind,
        name: &str,
        capacity: usize,
    ) -> Self {
        Self::with_buffer(Vec::new(), key, disk_id, kind, name, capacity)
    }

    /// As `new`, writing into `out` (emptied first): a buffer reused from an earlier
    /// object has its pages already mapped.
    pub fn with_buffer(
        mut out: Vec<u8>,
        key: &DataKey,
        disk_id: &[u8; 16],
        kind: ObjectKind,
        name: &str,
        capacity: usize,
    ) -> Self {
        let mut salt = [0u8; SALT_BYTES];
        random_bytes(&mut salt);
        out.clear();
        out.reserve(capacity.max(HEADER_BYTES + FRAME_BYTES + TAG_BYTES));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(kind as u8);
        out.push(0);
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(disk_id);
        out.extend_from_slice(&key_id_bytes(&key.id));
        out.extend_from_slice(&salt);
        debug_assert_eq!(out.len(), HEADER_BYTES);
        Sealer {
            key: key.object_key(&salt, disk_id),
            name: name.to_string(),
            out,
            index: 0,
            finished: false,
        }
    }

    /// Compresses (or stores raw when zstd does not pay) and encrypts one chunk.
    pub fn push_chunk(&mut self, ctx: &mut SealContext, plain: &[u8], last: bool) {
        self.push_chunk_parts(ctx, &[plain], last);
    }

    /// As `push_chunk`, for a chunk whose plaintext is `parts` one after the other: a
    /// record header and its data sealed straight from where the data was read, with
    /// no copy into a chunk buffer. Each part is compressed as a zstd frame of its own;
    /// a zstd decoder reads concatenated frames as the concatenation of their contents
    /// (RFC 8878, section 3), so readers see the same plaintext.
    pub fn push_chunk_parts(&mut self, ctx: &mut SealContext, parts: &[&[u8]], last: bool) {
        assert!(!self.finished, "chunk pushed after the final chunk");
        let plain_len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(
            plain_len <= CHUNK_PLAIN_MAX,
            "chunk larger than the format allows"
        );
        let frame_at = self.out.len();
        self.out.extend_from_slice(&[0u8; FRAME_BYTES]);
        let body_at = self.out.len();
        let mut codec = CODEC_RAW;
        if plain_len > 0 {
            // Straight into the object, where the body goes: no copy of the output.
            let bound: usize = parts
                .iter()
                .map(|p| zstd::zstd_safe::compress_bound(p.len()))
                .sum();
            self.out.reserve(bound + TAG_BYTES);
            let mut compressed = true;
            for part in parts.iter().filter(|p| !p.is_empty()) {
                let at = self.out.len();
                let mut room = Spare {
                    vec: &mut self.out,
                    at,
                };
                if ctx.compressor.compress_to_buffer(part, &mut room).is_err() {
                    compressed = false;
                    break;
                }
            }
            let n = self.out.len() - body_at;
            if compressed && n < plain_len - (plain_len >> MIN_SAVING_SHIFT) {
                codec = CODEC_ZSTD;
            }
        }
        if codec == CODEC_RAW {
            self.out.truncate(body_at);
            self.out.reserve(plain_len + TAG_BYTES);
            for part in parts {
                self.out.extend_from_slice(part);
            }
        }
        let sealed_len = (self.out.len() - body_at + TAG_BYTES) as u32;
        let mut frame = [0u8; FRAME_BYTES];
        frame[0..4].copy_from_slice(&sealed_len.to_le_bytes());
        frame[4] = codec;
        frame[5] = last as u8;
        frame[8..12].copy_from_slice(&(plain_len as u32).to_le_bytes());
        self.out[frame_at..body_at].copy_from_slice(&frame);
        build_aad(
            &mut ctx.aad,
            &self.out[..HEADER_BYTES],
            &self.name,
            self.index,
            &frame,
        );
        let tag = self
            .key
            .seal(self.index, &ctx.aad, &mut self.out[body_at..]);
        self.out.extend_from_slice(&tag);
        self.index += 1;
        self.finished = last;
    }

    /// The finished object. The caller must have pushed a final chunk.
    pub fn finish(self) -> Vec<u8> {
        assert!(self.finished, "object finished without a final chunk");
        self.out
    }

    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.len() <= HEADER_BYTES
    }
}

/// Per-thread opening state, reused across objects.
#[derive(Default)]
pub struct OpenContext {
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    plain: Vec<u8>,
    aad: Vec<u8>,
}

/// What the opener expects of an object; anything else is reported as corruption.
pub struct Expect<'a> {
    pub key: &'a DataKey,
    pub disk_id: &'a [u8; 16],
    pub kind: ObjectKind,
    pub name: &'a str,
}

/// Authenticates and decodes `bytes` (modified in place), handing each chunk's plaintext
/// to `on_chunk` in order.
pub fn open_object(
    expect: &Expect<'_>,
    bytes: &mut [u8],
    ctx: &mut OpenContext,
    mut on_chunk: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let name = expect.name;
    let bad = |reason: String| Error::corrupt(name, reason);
    if bytes.len() < HEADER_BYTES {
        return Err(bad(format!(
            "{} bytes is shorter than a header",
            bytes.len()
        )));
    }
    if &bytes[0..8] != MAGIC {
        return Err(bad("not a Ferry sealed object (bad magic)".into()));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != VERSION {
        return Err(bad(format!("unsupported format version {version}")));
    }
    match ObjectKind::from_u8(bytes[10]) {
        Some(k) if k == expect.kind => {}
        Some(k) => return Err(bad(format!("holds a {k:?}, expected a {:?}", expect.kind))),
        None => return Err(bad(format!("unknown object kind {}", bytes[10]))),
    }
    if bytes[11] != 0 || bytes[12..16] != [0; 4] {
        return Err(bad("reserved header bytes are not zero".into()));
    }
    if &bytes[16..32] != expect.disk_id {
        return Err(bad("belongs to another disk".into()));
    }
    if bytes[32..48] != key_id_bytes(&expect.key.id) {
        return Err(bad("sealed under another data key".into()));
    }
    let mut salt = [0u8; SALT_BYTES];
    salt.copy_from_slice(&bytes[48..80]);
    let key = expect.key.object_key(&salt, expect.disk_id);
    let (header, mut rest) = bytes.split_at_mut(HEADER_BYTES);
    let mut index = 0u64;
    loop {
        if rest.is_empty() {
            return Err(bad(format!(
                "truncated: no final chunk after {index} chunks"
            )));
        }
        if rest.len() < FRAME_BYTES {
            return Err(bad(format!("truncated frame header at chunk {index}")));
        }
        let (frame, tail) = rest.split_at_mut(FRAME_BYTES);
        let sealed_len = u32::from_le_bytes(frame[0..4].try_into().unwrap_or_default()) as usize;
        let codec = frame[4];
        let last = frame[5];
        let plain_len = u32::from_le_bytes(frame[8..12].try_into().unwrap_or_default()) as usize;
        if sealed_len < TAG_BYTES || sealed_len > tail.len() {
            return Err(bad(format!(
                "chunk {index} claims {sealed_len} sealed bytes, {} remain",
                tail.len()
            )));
        }
        if codec > CODEC_ZSTD || last > 1 || frame[6] != 0 || frame[7] != 0 {
            return Err(bad(format!("chunk {index} has an invalid frame header")));
        }
        if plain_len > CHUNK_PLAIN_MAX {
            return Err(bad(format!(
                "chunk {index} claims {plain_len} plaintext bytes"
            )));
        }
        build_aad(&mut ctx.aad, header, name, index, frame);
        let (sealed, next) = tail.split_at_mut(sealed_len);
        let body_len = key.open(index, &ctx.aad, sealed).ok_or_else(|| {
            bad(format!(
                "chunk {index} failed authentication (altered, truncated or moved)"
            ))
        })?;
        let body = &sealed[..body_len];
        if codec == CODEC_RAW {
            if body_len != plain_len {
                return Err(bad(format!("chunk {index} length mismatch")));
            }
            on_chunk(body)?;
        } else {
            let dec = match &mut ctx.decompressor {
                Some(d) => d,
                none => none.insert(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| bad(format!("zstd context: {e}")))?,
                ),
            };
            ctx.plain.clear();
            ctx.plain.reserve(plain_len);
            let n = dec
                .decompress_to_buffer(body, &mut ctx.plain)
                .map_err(|e| bad(format!("chunk {index} does not decompress: {e}")))?;
            if n != plain_len {
                return Err(bad(format!(
                    "chunk {index} decompressed to {n} bytes, header says {plain_len}"
                )));
            }
            on_chunk(&ctx.plain)?;
        }
        index += 1;
        rest = next;
        if last == 1 {
            if !rest.is_empty() {
                return Err(bad(format!("{} bytes after the final chunk", rest.len())));
            }
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(key: &DataKey, disk: &[u8; 16], name: &str, chunks: &[&[u8]]) -> Vec<u8> {
        let mut ctx = SealContext::default();
        let mut s = Sealer::new(key, disk, ObjectKind::Segment, name, 0);
        for (i, c) in chunks.iter().enumerate() {
            s.push_chunk(&mut ctx, c, i + 1 == chunks.len());
        }
        s.finish()
    }

    fn open(key: &DataKey, disk: &[u8; 16], name: &str, mut b: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let e = Expect {
            key,
            disk_id: disk,
            kind: ObjectKind::Segment,
            name,
        };
        open_object(&e, &mut b, &mut OpenContext::default(), |c| {
            out.push(c.to_vec());
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn round_trip_compressible_and_raw() {
        let key = DataKey::generate();
        let disk = [7u8; 16];
        let text = b"hello hello hello hello hello hello".repeat(1000);
        let mut noise = vec![0u8; 100_000];
        random_bytes(&mut noise);
        let obj = seal(&key, &disk, "a/b", &[&text, &noise, b""]);
        assert!(obj.len() < text.len() + noise.len());
        let got = open(&key, &disk, "a/b", obj).unwrap();
        assert_eq!(got, vec![text, noise, vec![]]);
    }

    #[test]
    fn rename_truncation_and_flips_are_caught() {
        let key = DataKey::generate();
        let disk = [1u8; 16];
        let obj = seal(&key, &disk, "x", &[b"one", b"two"]);
        assert!(open(&key, &disk, "y", obj.clone()).is_err(), "moved object");
        assert!(
            open(&key, &[2u8; 16], "x", obj.clone()).is_err(),
            "other disk"
        );
        let cut = obj[..obj.len() - 40].to_vec();
        assert!(open(&key, &disk, "x", cut).is_err(), "truncated");
        for i in 0..obj.len() {
            let mut b = obj.clone();
            b[i] ^= 0x40;
            let e = open(&key, &disk, "x", b).unwrap_err();
            assert!(e.to_string().contains("corrupt object x"), "{e}");
        }
    }

    #[test]
    fn a_chunk_in_parts_opens_to_the_parts_joined() {
        let key = DataKey::generate();
        let disk = [9u8; 16];
        let head = [7u8; 32];
        let text = b"compressible text ".repeat(5000);
        let mut noise = vec![0u8; 50_000];
        random_bytes(&mut noise);
        let mut ctx = SealContext::default();
        let mut s = Sealer::new(&key, &disk, ObjectKind::Segment, "p", 0);
        s.push_chunk_parts(&mut ctx, &[&head, &text], false);
        s.push_chunk_parts(&mut ctx, &[&head, &noise], false);
        s.push_chunk_parts(&mut ctx, &[], true);
        let obj = s.finish();
        // The text compressed (two zstd frames), the noise stored raw.
        assert!(
            obj.len() < text.len() / 4 + noise.len() + 1024,
            "{}",
            obj.len()
        );
        let got = open(&key, &disk, "p", obj).unwrap();
        assert_eq!(
            got,
            vec![
                [&head[..], &text].concat(),
                [&head[..], &noise].concat(),
                vec![]
            ]
        );
    }
}
