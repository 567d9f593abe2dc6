//! Feeds arbitrary bytes to the protocol's frame decoder, as a hostile peer would: it
//! must never panic, never read past its input, and whatever it accepts must encode
//! back to the same bytes.
#![no_main]

use ferry_link::protocol::{decode, encode, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Decoded::Frame(frame, used)) = decode(rest, 1 << 16) {
        let mut again = Vec::new();
        encode(&frame, &mut again);
        assert_eq!(&again[..], &rest[..used], "decode/encode round trip");
        rest = &rest[used..];
    }
});
