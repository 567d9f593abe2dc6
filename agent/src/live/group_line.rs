//! The group channel's lines (see `group.rs` for the exchange), read and written
//! apart from the sockets so that a peer's bytes are parsed by pure functions the fuzz
//! target can drive: a line is bounded in length, and a line that is not one of the
//! messages below is `None`, never a panic.

use std::fmt;
use std::io::{self, BufRead, Read};

/// Longest line either end accepts, newline included. Lines hold a group name, a
/// point id or a short reason: a peer that sends more is not speaking this protocol.
pub const MAX_LINE: usize = 4096;

/// One line of the group protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// coordinator -> member: hold writes for point `id` of `group`.
    Prepare { group: &'a str, id: &'a str },
    /// member -> coordinator: writes are held.
    Ready,
    /// member -> coordinator: refused, and why.
    No(&'a str),
    /// coordinator -> member: journal point `id`, then release.
    Commit(&'a str),
    /// coordinator -> member: release without a point.
    Abort,
    /// member -> coordinator: journaled; writes were held this many microseconds.
    Done(u64),
}

/// Reads one message from `line` (surrounding whitespace ignored).
pub fn parse(line: &str) -> Option<Message<'_>> {
    let line = line.trim();
    let (verb, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim_start();
    let words: Vec<&str> = rest.split_whitespace().collect();
    match (verb, words.as_slice()) {
        ("prepare", [group, id]) => Some(Message::Prepare { group, id }),
        ("ready", []) => Some(Message::Ready),
        ("no", _) => Some(Message::No(rest)),
        ("commit", [id]) => Some(Message::Commit(id)),
        ("abort", []) => Some(Message::Abort),
        ("done", [us]) => us.parse().ok().map(Message::Done),
        _ => None,
    }
}

impl fmt::Display for Message<'_> {
    /// The line as sent, without its newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Prepare { group, id } => write!(f, "prepare {group} {id}"),
            Message::Ready => f.write_str("ready"),
            Message::No(why) => write!(f, "no {why}"),
            Message::Commit(id) => write!(f, "commit {id}"),
            Message::Abort => f.write_str("abort"),
            Message::Done(us) => write!(f, "done {us}"),
        }
    }
}

/// Reads one line of at most `MAX_LINE` bytes, without its newline; None at the end
/// of the stream. A longer line or one that is not UTF-8 is an error: the peer is not
/// speaking this protocol, and the connection ends.
pub fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && n == MAX_LINE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a group line longer than {MAX_LINE} bytes"),
        ));
    }
    let line = String::from_utf8(buf)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a group line is not UTF-8"))?;
    Ok(Some(line.trim_end_matches(['\n', '\r']).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_written() {
        let all = [
            Message::Prepare {
                group: "g1",
                id: "g-20260101T000000.000Z-0000abcd",
            },
            Message::Ready,
            Message::No("disk sda: journal full"),
            Message::Commit("p1"),
            Message::Abort,
            Message::Done(1234),
        ];
        for m in all {
            assert_eq!(parse(&m.to_string()), Some(m.clone()), "{m}");
        }
    }

    #[test]
    fn malformed_lines_are_none() {
        for l in [
            "",
            "prepare g",
            "prepare g id extra",
            "done",
            "done x",
            "done -1",
            "commit",
            "ready now",
            "hello",
        ] {
            assert_eq!(parse(l), None, "{l:?}");
        }
    }

    #[test]
    fn lines_are_bounded() {
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.push(b'\n');
        let e = read_line(&mut &long[..]).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        let ok = b"ready\r\nabort";
        let mut r = &ok[..];
        assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("ready"));
        assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("abort"));
        assert_eq!(read_line(&mut r).unwrap(), None);
        assert!(read_line(&mut &b"\xff\n"[..]).is_err());
    }
}
