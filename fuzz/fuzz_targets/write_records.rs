//! Arbitrary bytes as the plaintext of one segment or extent chunk (opened, so
//! authentic, but written by whatever wrote the object): decoding must never panic,
//! and the records it accepts, sealed again with the writer's builder, must decode to
//! the same records.
#![no_main]

use ferry_replica::keys::DataKey;
use ferry_replica::object::{open_object, Expect, ObjectKind, OpenContext, SealContext};
use ferry_replica::record::{decode_records, ObjectBuilder};
use libfuzzer_sys::fuzz_target;

type Owned = (u64, u64, u64, Option<Vec<u8>>);

fn decode_all(chunk: &[u8], out: &mut Vec<Owned>) -> ferry_replica::Result<()> {
    decode_records(
        chunk,
        |r| {
            out.push((r.seq, r.offset, r.len, r.data.map(<[u8]>::to_vec)));
            Ok(())
        },
        "fuzz",
    )
}

fuzz_target!(|data: &[u8]| {
    let mut records = Vec::new();
    if decode_all(data, &mut records).is_err() {
        return;
    }
    let key = DataKey::from_bytes([0x42; 32], "000102030405060708090a0b0c0d0e0f");
    let disk = [0x11; 16];
    let mut ctx = SealContext::default();
    let mut b = ObjectBuilder::new(&mut ctx, &key, &disk, ObjectKind::Segment, "s");
    for (seq, offset, len, d) in &records {
        match d {
            Some(d) => b.data(*seq, *offset, d),
            None => b.zero(*seq, *offset, *len),
        }
    }
    let mut obj = b.finish();
    let expect = Expect {
        key: &key,
        disk_id: &disk,
        kind: ObjectKind::Segment,
        name: "s",
    };
    let mut again = Vec::new();
    open_object(&expect, &mut obj, &mut OpenContext::default(), |c| {
        decode_all(c, &mut again)
    })
    .expect("re-encoded records open and decode");
    assert_eq!(again, records, "records round trip");
});
