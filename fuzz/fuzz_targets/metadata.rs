//! Metadata objects (disk.json, commit records, checkpoint hints) as whoever can write
//! to the store may leave them. The whole input is tried as a framed object; then each
//! line is framed with its correct digest (so the fuzzer reaches the JSON, not just the
//! digest check) and parsed as every metadata type. Whatever parses must serialise
//! and parse back equal, and commit records are folded into a disk state in order, as
//! a reader folds them: none of it may panic or overflow.
#![no_main]

use ferry_replica::meta::{decode, encode, CheckpointHint, Commit, DiskInfo, Point};
use ferry_replica::DiskState;
use libfuzzer_sys::fuzz_target;

const DISK_ID: &str = "00112233445566778899aabbccddeeff";

fn framed(json: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, json);
    let mut out = json.to_vec();
    out.extend_from_slice(b"\nsha256 ");
    out.extend_from_slice(hex::encode(digest.as_ref()).as_bytes());
    out.push(b'\n');
    out
}

fn round_trip<T>(bytes: &[u8]) -> Option<T>
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let v: T = decode("fuzz", bytes).ok()?;
    let again: T = decode("fuzz", &encode(&v)).expect("encoded metadata decodes");
    assert_eq!(again, v, "metadata round trip");
    Some(v)
}

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Commit>("fuzz", data);
    let mut state = DiskState::default();
    for line in data.split(|b| *b == b'\n') {
        let obj = framed(line);
        if let Some(c) = round_trip::<Commit>(&obj) {
            let name = format!("machines/m/disks/d/commits/{:020}.json", c.commit);
            let _ = state.fold(&name, &c, DISK_ID);
        }
        round_trip::<DiskInfo>(&obj);
        round_trip::<CheckpointHint>(&obj);
        round_trip::<Point>(&obj);
    }
    // What readers ask of a folded state.
    let _ = state.next_commit();
    let _ = state.latest_point();
    let _ = state.referenced();
    let _ = state.stored_bytes_up_to(u64::MAX);
    let _ = state.segments_up_to(u64::MAX).count();
});
