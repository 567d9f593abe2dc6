//! The bounds on what a heartbeat may carry, shared by the control plane (which
//! refuses a heartbeat over them with a 400 naming the field) and the parts that send
//! them (which trim what they send to fit, so that a long error message or a busy
//! process server never has its heartbeats refused). Each keeps one heartbeat, and the
//! row it becomes in the database, a few tens of KiB at most: under the API's body
//! limit, whatever the fleet does.

/// The most bytes of one free-text string: an agent's `last_error`, each of a process
/// server's `health_reasons`.
pub const MAX_TEXT_BYTES: usize = 1024;
/// The most bytes of a point's `id` (agents make `p` and a sequence number).
pub const MAX_POINT_ID_BYTES: usize = 128;
/// The most `health_reasons` one process server heartbeat may give.
pub const MAX_REASONS: usize = 16;
/// The most machines one process server heartbeat may list as connected: 512 names of
/// at most 64 bytes stay well under the 64 KiB body limit.
pub const MAX_CONNECTED: usize = 512;
/// The most fenced disks one process server heartbeat may report (about 200 bytes
/// each); more wait for the next heartbeat.
pub const MAX_FENCED: usize = 32;
/// The most bytes of a control plane's answer a part reads: the revoked list of a
/// large fleet fits many times over, and a broken or hostile answer cannot fill memory.
pub const MAX_ANSWER_BYTES: usize = 4 << 20;
/// The most revoked serials (33 bytes each in JSON) one answer may carry; well under
/// `MAX_ANSWER_BYTES`.
pub const MAX_REVOKED: usize = 65_536;
/// The most failed-over machines (at most 64 bytes of name each) one process server
/// answer may list (about 1 MiB: with the revoked list, under `MAX_ANSWER_BYTES`). A
/// longer list is not cut (a cut would let the rest replicate): the
/// answer fails and the process server keeps its last list.
pub const MAX_FAILED_OVER: usize = 16_384;

/// The most work items one recovery host's orders carry, and the most reports its
/// heartbeat sends; more wait for later heartbeats (one a second).
pub const MAX_WORK_ITEMS: usize = 256;
/// The most bytes of output a script or start item reports (its end): a few such
/// reports stay under the API's body limit.
pub const MAX_WORK_OUTPUT_BYTES: usize = 4096;

/// `s` cut to at most `max` bytes, at a character boundary, with `…` marking the cut.
pub fn trimmed(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    const MARK: &str = "…";
    let mut end = max.saturating_sub(MARK.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimming_keeps_short_text_and_cuts_long_text_at_a_character() {
        assert_eq!(trimmed("disk full", MAX_TEXT_BYTES), "disk full");
        let long = "é".repeat(MAX_TEXT_BYTES);
        let t = trimmed(&long, MAX_TEXT_BYTES);
        assert!(t.len() <= MAX_TEXT_BYTES, "{}", t.len());
        assert!(t.ends_with('…') && t.starts_with("éé"));
        assert_eq!(trimmed("abcdef", 5), "ab…");
    }
}
