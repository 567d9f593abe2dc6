//! Arbitrary bytes as what a group peer sends: read line by line (bounded) and
//! parsed. Never a panic; every line that parses, written again, parses to the same
//! message.
#![no_main]

use ferry_agent::live::group_line::{parse, read_line, MAX_LINE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(Some(line)) = read_line(&mut r) {
        assert!(line.len() <= MAX_LINE);
        if let Some(m) = parse(&line) {
            let again = m.to_string();
            assert_eq!(parse(&again), Some(m), "group line round trip");
        }
    }
});
