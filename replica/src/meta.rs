//! The metadata objects: disk.json and commit records. They are JSON, readable without
//! the vault key (so `ferry points` needs none), and framed with a SHA-256 digest so a
//! flipped byte is reported as corruption of that object rather than misread:
//!
//! ```text
//! <one line of JSON>\n
//! sha256 <64 hex digits of the JSON line's bytes>\n
//! ```
//!
//! Commit records add a third line, `hmac-sha256 <64 hex>`, a MAC under a key derived
//! from the disk's data key: the digest still lets a reader without the key tell a
//! flipped byte, the MAC lets a reader with it tell a record someone without the key
//! wrote or edited (docs/decisions/0013-authenticated-commit-records.md).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::RecordKey;

/// Format of disk.json and checkpoint hints.
pub const FORMAT: u32 = 1;
/// Format of commit records: 2 since they carry a MAC. A format-1 record has none and
/// is refused, since accepting it would let anyone who can write the store forge one.
pub const COMMIT_FORMAT: u32 = 2;
const MAC_PREFIX: &[u8] = b"hmac-sha256 ";

/// Identity and keys of one protected disk; written once, create-if-absent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskInfo {
    pub format: u32,
    pub machine: String,
    pub disk: String,
    /// 16 random bytes as hex; sealed into every object of this disk.
    pub disk_id: String,
    /// Granularity of checksum maps and zero detection.
    pub block_bytes: u64,
    /// Disk address space covered by one base extent object.
    pub extent_bytes: u64,
    pub created: DateTime<Utc>,
    pub vault_key_id: String,
    pub data_key: WrappedKeyInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WrappedKeyInfo {
    pub id: String,
    pub salt: String,
    pub wrapped: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    Crash,
    App,
    Group,
    Seed,
}

impl std::fmt::Display for PointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            PointKind::Crash => "crash",
            PointKind::App => "app",
            PointKind::Group => "group",
            PointKind::Seed => "seed",
        })
    }
}

/// A recovery point: the disk as of every write with sequence <= `seq`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Point {
    pub id: String,
    pub kind: PointKind,
    pub time: DateTime<Utc>,
    pub seq: u64,
    pub disk_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Checksum map of the disk at this point, if one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sums: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SegmentRef {
    pub object: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExtentRef {
    pub index: u64,
    pub object: String,
    pub stored_bytes: u64,
}

/// A base generation: the disk as of `seq`, as non-overlapping extents. Extents absent
/// from the list are all zero.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Base {
    pub generation: String,
    pub seq: u64,
    pub disk_bytes: u64,
    pub extent_bytes: u64,
    pub extents: Vec<ExtentRef>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CommitKind {
    /// Adds segments and points to the state before it.
    Append,
    /// Replaces the whole state: base, live segments, live points.
    Checkpoint,
}

/// One commit record, `commits/{commit:020}.json`, created if absent, never changed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Commit {
    pub format: u32,
    pub commit: u64,
    pub disk_id: String,
    pub kind: CommitKind,
    pub time: DateTime<Utc>,
    /// Every sequence number below this is accounted for after this commit.
    pub next_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Base>,
    #[serde(default)]
    pub segments: Vec<SegmentRef>,
    #[serde(default)]
    pub points: Vec<Point>,
    /// The writer epoch this commit was made in (docs/storage-format.md 3, "Fencing"):
    /// never lower than the state's; a process server's claim raises it by one.
    /// Absent (0) in records written before fencing, which fold as before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// The process server that holds `epoch`; absent for writers that are not process
    /// servers (seed, compaction's appends, resync tools), which keep the state's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `checkpoints/{checkpoint:020}.json`: says commit `checkpoint` replaces everything
/// before it, so readers list and read commits from there on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointHint {
    pub format: u32,
    pub checkpoint: u64,
}

/// Serialises with the digest frame.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(value).expect("metadata types always serialise");
    let digest = ring::digest::digest(&ring::digest::SHA256, &out);
    out.push(b'\n');
    out.extend_from_slice(b"sha256 ");
    out.extend_from_slice(hex::encode(digest.as_ref()).as_bytes());
    out.push(b'\n');
    out
}

/// Checks the digest frame and parses; errors name `object`.
pub fn decode<T: for<'de> Deserialize<'de>>(object: &str, bytes: &[u8]) -> Result<T> {
    let bad = |reason: &str| Error::corrupt(object, reason.to_string());
    let body = bytes
        .strip_suffix(b"\n")
        .ok_or_else(|| bad("missing final newline"))?;
    let split = body
        .iter()
        .rposition(|b| *b == b'\n')
        .ok_or_else(|| bad("missing digest line"))?;
    let (json, trailer) = (&body[..split], &body[split + 1..]);
    let want = trailer
        .strip_prefix(b"sha256 ")
        .ok_or_else(|| bad("malformed digest line"))?;
    let got = hex::encode(ring::digest::digest(&ring::digest::SHA256, json).as_ref());
    if want != got.as_bytes() {
        return Err(bad("digest mismatch"));
    }
    serde_json::from_slice(json).map_err(|e| Error::corrupt(object, format!("bad JSON: {e}")))
}

/// Serialises a commit record with its digest and its MAC as record `object`.
pub fn encode_commit(object: &str, c: &Commit, key: &RecordKey) -> Vec<u8> {
    let mut out = encode(c);
    let json_len = out.iter().position(|b| *b == b'\n').unwrap_or(out.len());
    let mac = key.sign(object, &out[..json_len]);
    out.extend_from_slice(MAC_PREFIX);
    out.extend_from_slice(hex::encode(mac).as_bytes());
    out.push(b'\n');
    out
}

/// Checks a commit record's digest and, given the disk's record key, its MAC; then
/// parses. Without a key only accidents are detected (listing points needs no key).
pub fn decode_commit(object: &str, bytes: &[u8], key: Option<&RecordKey>) -> Result<Commit> {
    let body = bytes
        .strip_suffix(b"\n")
        .ok_or_else(|| Error::corrupt(object, "missing final newline"))?;
    let split = body.iter().rposition(|b| *b == b'\n');
    let mac_hex = split
        .and_then(|at| body[at + 1..].strip_prefix(MAC_PREFIX))
        .ok_or_else(|| {
            Error::corrupt(
                object,
                format!(
                    "commit record carries no MAC line: a format-1 record, or one written \
                     without the disk's key (Ferry reads commit format {COMMIT_FORMAT})"
                ),
            )
        })?;
    // Everything before the MAC line is an ordinary digest-framed object.
    let framed = &bytes[..split.map_or(0, |at| at + 1)];
    let c: Commit = decode(object, framed)?;
    if let Some(key) = key {
        let json = &framed[..framed.iter().position(|b| *b == b'\n').unwrap_or(0)];
        // Lowercase only, as written: hex decoding would also take an upper-case
        // digit, so a flipped case bit would otherwise pass unnoticed.
        let canonical = mac_hex.len() == 2 * crate::keys::MAC_BYTES
            && mac_hex
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
        let authentic = canonical
            && hex::decode(mac_hex)
                .ok()
                .is_some_and(|mac| key.verify(object, json, &mac));
        if !authentic {
            return Err(Error::corrupt(
                object,
                format!(
                    "commit record {} fails authentication: its MAC does not match under \
                     this disk's key, so it was altered or written by someone without the \
                     vault key; refusing to use it",
                    crate::layout::number_of(object)
                        .map_or_else(|| "?".to_string(), |n| n.to_string())
                ),
            ));
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_detects_any_flip() {
        let p = Point {
            id: "p1".into(),
            kind: PointKind::Seed,
            time: Utc::now(),
            seq: 9,
            disk_bytes: 4096,
            label: Some("x".into()),
            group: None,
            sums: None,
        };
        let bytes = encode(&p);
        assert_eq!(decode::<Point>("o", &bytes).unwrap(), p);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            let e = decode::<Point>("o", &b).unwrap_err();
            assert!(e.to_string().contains("corrupt object o"), "{e}");
        }
    }

    fn commit() -> Commit {
        Commit {
            format: COMMIT_FORMAT,
            commit: 3,
            disk_id: "d".into(),
            kind: CommitKind::Append,
            time: Utc::now(),
            next_seq: 9,
            base: None,
            segments: vec![SegmentRef {
                object: "s".into(),
                first_seq: 1,
                last_seq: 8,
                stored_bytes: 10,
            }],
            points: Vec::new(),
            epoch: 0,
            writer: None,
        }
    }

    #[test]
    fn commit_mac_round_trip_and_forgery() {
        let key = crate::keys::DataKey::generate().record_key(&[7; 16]);
        let name = "m/commits/00000000000000000003.json";
        let c = commit();
        let bytes = encode_commit(name, &c, &key);
        assert_eq!(decode_commit(name, &bytes, Some(&key)).unwrap(), c);
        assert_eq!(decode_commit(name, &bytes, None).unwrap(), c);
        // Any flipped byte fails a reader with the key (digest, MAC or framing).
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    decode_commit(name, &b, Some(&key)).is_err(),
                    "flip of bit {bit} at {i}"
                );
            }
        }
        // Edited, digest recomputed, MAC kept: only a reader with the key can tell.
        let mut forged = c.clone();
        forged.segments.clear();
        let mut b = encode(&forged);
        let mac_line = bytes[bytes.len() - MAC_PREFIX.len() - 65..].to_vec();
        b.extend_from_slice(&mac_line);
        assert_eq!(decode_commit(name, &b, None).unwrap(), forged);
        let e = decode_commit(name, &b, Some(&key)).unwrap_err().to_string();
        assert!(
            e.contains(name) && e.contains("commit record 3 fails authentication"),
            "{e}"
        );
        // Without a MAC line (format 1): refused even without a key.
        let e = decode_commit(name, &encode(&c), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("carries no MAC"), "{e}");
        // Valid bytes under another name: refused.
        assert!(decode_commit("m/commits/00000000000000000004.json", &bytes, Some(&key)).is_err());
    }
}
