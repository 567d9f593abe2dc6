//! The cache log's unit tests; power cuts are in `powercut.rs`.

use super::*;

fn frames(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("m/d{}", i % 3),
                (0..(i * 37 % 500 + 1)).map(|b| (b + i) as u8).collect(),
            )
        })
        .collect()
}

#[test]
fn appends_survive_reopen_and_files_roll_and_release() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, rec) = DurableLog::open(dir.path(), 4096, 1 << 20, true).unwrap();
    assert!(rec.entries.is_empty());
    let data = frames(100);
    let mut positions = Vec::new();
    for (d, p) in &data {
        positions.push(log.append(d, p).unwrap());
    }
    log.sync().unwrap();
    assert!(log.files.len() > 3, "rolled into several files");
    drop(log);
    let (mut log, rec) = DurableLog::open(dir.path(), 4096, 1 << 20, true).unwrap();
    assert_eq!(rec.torn_bytes, 0);
    let got: Vec<(String, Vec<u8>)> = rec
        .entries
        .iter()
        .map(|e| (e.disk.clone(), e.payload.clone()))
        .collect();
    assert_eq!(got, data);
    let before = log.used_bytes();
    let freed = log.release_before(positions[60]).unwrap();
    assert!(freed > 0 && log.used_bytes() == before - freed);
    drop(log);
    let (_, rec) = DurableLog::open(dir.path(), 4096, 1 << 20, true).unwrap();
    assert!(rec.entries.first().unwrap().at.file <= positions[60].file);
    assert_eq!(rec.entries.last().unwrap().payload, data[99].1);
}

#[test]
fn a_torn_tail_is_cut_and_corruption_elsewhere_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = DurableLog::open(dir.path(), 1 << 20, 1 << 20, true).unwrap();
    let data = frames(20);
    for (d, p) in &data {
        log.append(d, p).unwrap();
    }
    log.sync().unwrap();
    drop(log);
    let newest = |dir: &Path| {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    // A crash in the middle of the last append: cut its bytes short.
    let files = newest(dir.path());
    let full = files
        .iter()
        .rev()
        .find(|f| fs::metadata(f).unwrap().len() > 0)
        .unwrap();
    assert_eq!(
        full,
        files.last().unwrap(),
        "appends went to the newest file"
    );
    let len = fs::metadata(full).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(full)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let (log, rec) = DurableLog::open(dir.path(), 1 << 20, 1 << 20, true).unwrap();
    drop(log);
    assert_eq!(rec.entries.len(), 19);
    assert!(rec.torn_bytes > 0);
    // A flipped byte in an older file is corruption, named with its offset.
    let files = newest(dir.path());
    let mut bytes = fs::read(&files[0]).unwrap();
    bytes[40] ^= 1;
    fs::write(&files[0], bytes).unwrap();
    let e = DurableLog::open(dir.path(), 1 << 20, 1 << 20, true).unwrap_err();
    assert!(e.to_string().contains("is corrupt at byte"), "{e}");
}

#[test]
fn the_bound_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = DurableLog::open(dir.path(), 1 << 20, 1000, true).unwrap();
    log.append("m/d", &[1u8; 600]).unwrap();
    assert!(matches!(
        log.append("m/d", &[1u8; 600]),
        Err(LogError::Full { .. })
    ));
    assert!(matches!(
        log.append("m/d", &vec![0u8; RECORD_PAYLOAD_MAX + 1]),
        Err(LogError::TooLarge { .. })
    ));
}

fn names(dir: &Path, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(suffix))
        .collect();
    v.sort();
    v
}

#[test]
fn released_files_are_reused_and_their_old_records_never_read_back() {
    let dir = tempfile::tempdir().unwrap();
    // Records of one size, so a reused file's old records lie exactly where the
    // next new record would: only the number stamped in the checksum tells them
    // apart.
    let (mut log, _) = DurableLog::open(dir.path(), 1000, 4000, true).unwrap();
    let record = |i: u32| vec![i as u8; 189];
    let mut i = 0u32;
    for _round in 0..5 {
        for _ in 0..10 {
            log.append("m/d", &record(i)).unwrap();
            i += 1;
        }
        log.sync().unwrap();
        let end = log.end_position();
        log.release_before(Position {
            file: end.file,
            offset: 0,
        })
        .unwrap();
        log.sync().unwrap();
    }
    let spares = names(dir.path(), ".spare");
    assert!(!spares.is_empty(), "released files are kept as spares");
    assert!(
        names(dir.path(), ".log").len() + spares.len() <= log.files_max(),
        "live and spare files stay within the bound"
    );
    // Everything released, then two records into a reused file: the rest of it
    // holds old records of the same size, stamped with another number.
    let spares_before = names(dir.path(), ".spare").len();
    let drained = log.end_position().file;
    log.release_before(log.end_position()).unwrap();
    log.sync().unwrap();
    let first_new = i;
    for _ in 0..2 {
        log.append("m/d", &record(i)).unwrap();
        i += 1;
    }
    log.sync().unwrap();
    // The drained file became a spare, and a spare was reused for the new one.
    let spares = names(dir.path(), ".spare");
    assert_eq!(spares.len(), spares_before, "{spares:?}");
    assert!(
        spares.contains(&format!("{drained:016}.spare")),
        "the drained file is kept: {spares:?}"
    );
    let held: Vec<u64> = log.files.iter().map(|f| f.0).collect();
    drop(log);
    let (_, rec) = DurableLog::open(dir.path(), 1000, 4000, true).unwrap();
    assert_eq!(
        rec.torn_bytes,
        2 * 203,
        "the old records after the new ones cut"
    );
    let got: Vec<u8> = rec.entries.iter().map(|e| e.payload[0]).collect();
    let files: Vec<u64> = rec.entries.iter().map(|e| e.at.file).collect();
    assert!(files.iter().all(|f| held.contains(f)), "{files:?} {held:?}");
    assert_eq!(got.last(), Some(&((first_new + 1) as u8)));
    let newest = *files.last().unwrap();
    assert_eq!(
        rec.entries.iter().filter(|e| e.at.file == newest).count(),
        2,
        "no old record of the reused file came back: {got:?}"
    );
}

/// A log of 1000-byte files in `dir` with records of 300 bytes appended: three
/// fit a file.
fn appended(dir: &Path, recycle: bool, records: std::ops::Range<u8>) -> DurableLog {
    let (mut log, _) = DurableLog::open(dir, 1000, 1 << 20, recycle).unwrap();
    for i in records {
        log.append("m/d", &[i; 300]).unwrap();
    }
    log
}

#[test]
fn a_started_file_gets_its_name_only_once_the_files_before_it_are_synced() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = appended(dir.path(), true, 0..6);
    let logs_before = names(dir.path(), ".log");
    assert_eq!(logs_before.len(), 1, "the new file is not named yet");
    assert_eq!(names(dir.path(), ".spare").len(), 1);
    log.sync().unwrap();
    assert_eq!(names(dir.path(), ".log").len(), 2);
    assert!(names(dir.path(), ".spare").is_empty());
    // The rolled file was cut to its last record.
    let first = dir.path().join(&logs_before[0]);
    assert_eq!(fs::metadata(first).unwrap().len(), 3 * (300 + 11 + 3));
}

#[test]
fn numbers_are_never_reused_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = DurableLog::open(dir.path(), 1000, 1 << 20, true).unwrap();
    log.append("m/d", &[1; 100]).unwrap();
    log.sync().unwrap();
    let before = log.end_position().file;
    drop(log);
    let (log, rec) = DurableLog::open(dir.path(), 1000, 1 << 20, true).unwrap();
    assert_eq!(rec.entries.len(), 1);
    assert!(log.end_position().file > before + log.files_max() as u64);
}

#[test]
fn without_recycling_files_are_named_at_once_and_deleted_when_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = appended(dir.path(), false, 0..6);
    assert_eq!(names(dir.path(), ".log").len(), 2, "named before any sync");
    log.sync().unwrap();
    log.release_before(log.end_position()).unwrap();
    log.sync().unwrap();
    assert!(names(dir.path(), ".spare").is_empty());
    assert_eq!(names(dir.path(), ".log").len(), 1);
    let end = log.end_position().file;
    drop(log);
    let (log, _) = DurableLog::open(dir.path(), 1000, 1 << 20, false).unwrap();
    assert_eq!(
        log.end_position().file,
        end + 1,
        "numbers go on without a gap"
    );
}

#[test]
fn a_file_started_but_never_synced_is_a_spare_after_a_crash_and_its_numbers_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = appended(dir.path(), true, 0..3);
    log.sync().unwrap();
    // Roll over into a new file and write into it, then "crash": no sync, so the
    // new file still has its spare name, with records stamped with its number.
    for i in 3..6u8 {
        log.append("m/d", &[i; 300]).unwrap();
    }
    let stamped = log.end_position().file;
    assert_eq!(names(dir.path(), ".spare").len(), 1);
    std::mem::forget(log);
    let (log, rec) = DurableLog::open(dir.path(), 1000, 1 << 20, true).unwrap();
    let got: Vec<u8> = rec.entries.iter().map(|e| e.payload[0]).collect();
    assert_eq!(got, [0, 1, 2], "only what was synced before the crash");
    assert!(
        log.end_position().file > stamped,
        "the number stamped in the spare is never used again"
    );
}

// Found by the cache_log fuzz target: a file numbered u64::MAX made the next file's
// number overflow.
#[test]
fn a_file_number_beyond_the_log_s_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(format!("{:016}.log", u64::MAX)), b"").unwrap();
    let e = DurableLog::open(dir.path(), 4096, 1 << 20, false).unwrap_err();
    assert!(
        e.to_string().contains("18446744073709551615.log") && e.to_string().contains("beyond"),
        "{e}"
    );
}

#[test]
fn only_the_names_the_log_writes_are_its_files() {
    let dir = tempfile::tempdir().unwrap();
    appended(dir.path(), false, 0..3).sync().unwrap();
    // Aliases of file 0's number: read as file 0 they would be read twice (or, alone,
    // send recovery looking for a file that is not there).
    for alias in ["0.log", "+0.log", "00.spare"] {
        std::fs::write(dir.path().join(alias), b"junk").unwrap();
    }
    let (_, rec) = DurableLog::open(dir.path(), 4096, 1 << 20, false).unwrap();
    assert_eq!(rec.entries.len(), 3);
    assert_eq!(
        parse_name("0000000000000007.log".as_ref()),
        Some((7, false))
    );
    assert_eq!(
        parse_name("0000000000000007.spare".as_ref()),
        Some((7, true))
    );
    assert_eq!(parse_name("7.log".as_ref()), None);
}
