//! Sealed objects as whoever can write to the store may leave them. The first byte
//! picks the mode:
//! - even: the rest is an object, opened under a fixed key; it must be refused (it
//!   cannot authenticate) without a panic and without allocating beyond a chunk;
//! - odd: the rest is `flip_at u16 LE | flip_xor u8 | (len u8, repeat u8, bytes)*`:
//!   those chunks are sealed, one byte is flipped (unless flip_xor is 0) and the object
//!   opened. Untouched it must give back exactly its chunks; any flipped byte must make
//!   it fail.
#![no_main]

use ferry_replica::keys::DataKey;
use ferry_replica::object::{open_object, Expect, ObjectKind, OpenContext, SealContext, Sealer};
use libfuzzer_sys::fuzz_target;

const NAME: &str = "machines/m/disks/d/segments/fuzz";
const DISK: [u8; 16] = [0x11; 16];

fn open(key: &DataKey, bytes: &mut [u8]) -> Result<Vec<Vec<u8>>, String> {
    let expect = Expect {
        key,
        disk_id: &DISK,
        kind: ObjectKind::Segment,
        name: NAME,
    };
    let mut chunks = Vec::new();
    open_object(&expect, bytes, &mut OpenContext::default(), |c| {
        chunks.push(c.to_vec());
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(chunks)
}

fuzz_target!(|data: &[u8]| {
    let key = DataKey::from_bytes([0x42; 32], "000102030405060708090a0b0c0d0e0f");
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let mut bytes = rest.to_vec();
        if let Ok(chunks) = open(&key, &mut bytes) {
            panic!("forged object opened: {chunks:?}");
        }
        return;
    }
    if rest.len() < 3 {
        return;
    }
    let flip_at = u16::from_le_bytes([rest[0], rest[1]]) as usize;
    let flip_xor = rest[2];
    let mut spec = &rest[3..];
    let mut chunks = Vec::new();
    while let [len, repeat, tail @ ..] = spec {
        let n = (*len as usize).min(tail.len());
        // Repeats make compressible chunks, so both codecs are sealed and opened.
        chunks.push(tail[..n].repeat(*repeat as usize + 1));
        spec = &tail[n..];
    }
    if chunks.is_empty() {
        chunks.push(Vec::new());
    }
    let mut ctx = SealContext::default();
    let mut sealer = Sealer::new(&key, &DISK, ObjectKind::Segment, NAME, 0);
    for (i, c) in chunks.iter().enumerate() {
        sealer.push_chunk(&mut ctx, c, i + 1 == chunks.len());
    }
    let mut obj = sealer.finish();
    if flip_xor == 0 {
        assert_eq!(open(&key, &mut obj).expect("a sealed object opens"), chunks);
    } else {
        let at = flip_at % obj.len();
        obj[at] ^= flip_xor;
        assert!(open(&key, &mut obj).is_err(), "flip at byte {at} unnoticed");
    }
});
