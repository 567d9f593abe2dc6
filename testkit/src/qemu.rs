//! qemu-io, the client the tests write through an NBD export with.

use std::ops::RangeInclusive;
use std::process::Command;

use rand::Rng;

/// Runs qemu-io on `url` with `cmds`, one `-c` each, and returns its output. Panics
/// if it fails or any command reports a failure: qemu-io exits 0 even when a command
/// failed, so the text is checked as well.
pub fn qemu_io<S: AsRef<str>>(url: &str, cmds: &[S]) -> String {
    let mut c = Command::new("qemu-io");
    // writeback: FUA only where a command asks for it (the default writethrough
    // sets it on every write).
    c.args(["-f", "raw", "-t", "writeback"]);
    for cmd in cmds {
        c.args(["-c", cmd.as_ref()]);
    }
    let out = c
        .arg(url)
        .output()
        .expect("qemu-io is installed (qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cmds: Vec<&str> = cmds.iter().map(|c| c.as_ref()).collect();
    assert!(out.status.success(), "qemu-io {cmds:?}: {text}");
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}

/// `n` qemu-io writes of random patterns, each `blocks` x 4 KiB, at 4 KiB-aligned
/// random places of a disk of `size` bytes.
pub fn random_writes(
    rng: &mut impl Rng,
    size: u64,
    n: usize,
    blocks: RangeInclusive<u64>,
) -> Vec<String> {
    (0..n)
        .map(|_| {
            let len = rng.gen_range(blocks.clone()) * 4096;
            let off = rng.gen_range(0..(size - len) / 4096) * 4096;
            format!("write -P {} {off} {len}", rng.gen::<u8>())
        })
        .collect()
}
