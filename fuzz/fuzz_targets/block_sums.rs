//! Arbitrary bytes as an opened checksum map's plaintext: parsing must never panic
//! nor allocate more than the input implies, and a map it accepts must encode back
//! to the same bytes.
#![no_main]

use ferry_replica::sums::BlockSums;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(map) = BlockSums::parse("fuzz", data) {
        let mut again = map.header().to_vec();
        again.extend_from_slice(map.sums.as_flattened());
        assert_eq!(again, data, "checksum map round trip");
    }
});
