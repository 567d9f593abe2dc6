//! Recovers a cache log (the server's cache, the agent's journal) from arbitrary file
//! contents, as a crash, a full disk or a stray writer may leave them. Input:
//! `flags u8 | first file number u64 LE | (len u16 LE, bytes){1,3}`;
//! flags bit 0 recycles, bit 1 adds a spare file. Recovery must never panic and never
//! read more than the files hold; the records it recovers, appended to a fresh log,
//! must recover again as the same records, and the recovered log must take an append
//! that a second recovery returns after them.
#![no_main]

use std::path::Path;

use ferry_link::log::DurableLog;
use libfuzzer_sys::fuzz_target;

const FILE_MAX: u64 = 1 << 20;
const TOTAL_MAX: u64 = 64 << 20;

fn records(dir: &Path, recycle: bool) -> Option<(DurableLog, Vec<(String, Vec<u8>)>)> {
    let (log, rec) = DurableLog::open(dir, FILE_MAX, TOTAL_MAX, recycle).ok()?;
    let list = rec
        .entries
        .into_iter()
        .map(|e| (e.disk, e.payload))
        .collect();
    Some((log, list))
}

fn scratch() -> tempfile::TempDir {
    // Memory-backed where there is one: recovery fsyncs every file.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("a temporary directory")
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let flags = data[0];
    let first = u64::from_le_bytes(data[1..9].try_into().unwrap());
    let recycle = flags & 1 != 0;
    let dir = scratch();
    // Up to three files, numbered from `first` on (wrapping, to reach the end of the
    // number space).
    let mut rest = &data[9..];
    let mut files = Vec::new();
    while let [a, b, tail @ ..] = rest {
        if files.len() == 3 {
            break;
        }
        let len = (u16::from_le_bytes([*a, *b]) as usize).min(tail.len());
        files.push(&tail[..len]);
        rest = &tail[len..];
    }
    if files.is_empty() {
        files.push(rest);
    }
    let mut n = first;
    for (i, file) in files.iter().enumerate() {
        n = first.wrapping_add(i as u64);
        std::fs::write(dir.path().join(format!("{n:016}.log")), file).unwrap();
    }
    if flags & 2 != 0 {
        let spare = n.wrapping_add(1);
        std::fs::write(dir.path().join(format!("{spare:016}.spare")), b"old").unwrap();
    }

    let Some((mut log, got)) = records(dir.path(), recycle) else {
        return;
    };

    // What was recovered, appended to a fresh log, recovers the same.
    let fresh = scratch();
    {
        let (mut copy, _) = DurableLog::open(fresh.path(), FILE_MAX, TOTAL_MAX, recycle).unwrap();
        for (disk, payload) in &got {
            copy.append(disk, payload)
                .expect("a recovered record appends");
        }
        copy.sync().unwrap();
    }
    let (_, again) = records(fresh.path(), recycle).expect("a fresh log recovers");
    assert_eq!(again, got, "cache log round trip");

    // The recovered log goes on: a new append comes back after everything before it.
    // Not near the top of the number space: recovery refuses numbers above 2^62 (no
    // log reaches them), so a stray file just below that leads the log past the line
    // and the next recovery refuses it, by design.
    if first < 1 << 61 && log.append("m/d", b"after").is_ok() {
        log.sync().unwrap();
        drop(log);
        let (_, after) = records(dir.path(), recycle).expect("the log recovers again");
        let mut want = got.clone();
        want.push(("m/d".into(), b"after".to_vec()));
        assert_eq!(after, want, "an append after recovery");
    }
});
