//! What the store holds is authenticated and secret: a flipped byte in any object is an
//! error naming that object, a wrong key is a clear error, and no plaintext of the disk
//! appears anywhere in the store.

mod common;

use std::collections::HashSet;
use std::path::Path;

use chrono::{Duration, TimeZone, Utc};
use common::*;
use ferry_replica::compact::{compact, CompactOptions};
use ferry_replica::object::SealContext;
use ferry_replica::scan::block_sum;
use ferry_replica::sums::BlockSums;
use ferry_replica::writer::{append, seal_segment, Payload, Write};
use ferry_replica::{Disk, DiskState, Error, Point, PointKind, Store, VaultKey};
use rand::Rng;

const SIZE: u64 = 1 << 20;
const MARKER: &[u8] = b"TOP-SECRET-PLAINTEXT-MARKER";

/// Writes a disk with a base, live segments, a checksum map and several points into
/// `url`; returns the disk content (the last point's).
fn populate(store: &Store, vault: &VaultKey) -> Vec<u8> {
    let disk = store
        .block(Disk::open_or_create(
            store,
            "m",
            "d0",
            vault,
            4096,
            256 << 10,
        ))
        .unwrap();
    let mut state = DiskState::default();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = rng(11);
    let mut ctx = SealContext::default();
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap();
    let mut seq = 0;
    for i in 0..5 {
        let mut owned = Vec::new();
        for _ in 0..3 {
            let len = rng.gen_range(1000..60_000usize);
            let off = rng.gen_range(0..SIZE as usize - len);
            // Random bytes (stored raw when sealed) and text with a marker (compressed).
            let mut data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if rng.gen_bool(0.5) {
                data = MARKER.repeat(len / MARKER.len() + 1)[..len].to_vec();
            }
            model[off..off + len].copy_from_slice(&data);
            owned.push((seq, off as u64, data));
            seq += 1;
        }
        let writes: Vec<Write<'_>> = owned
            .iter()
            .map(|(s, o, d)| Write {
                seq: *s,
                offset: *o,
                payload: Payload::Data(d),
            })
            .collect();
        let sealed = seal_segment(&disk, &mut ctx, &writes).unwrap();
        let sums = BlockSums {
            block_bytes: 4096,
            disk_bytes: SIZE,
            sums: model.chunks(4096).map(block_sum).collect(),
        };
        let (sums_object, bytes) = sums.seal(&disk, &mut ctx).unwrap();
        store
            .block(disk.upload(&sums_object, bytes.into()))
            .unwrap();
        let p = Point {
            id: format!("p{i}"),
            kind: PointKind::Crash,
            time: t0 + Duration::hours(i),
            seq: seq - 1,
            disk_bytes: SIZE,
            label: None,
            group: None,
            sums: Some(sums_object),
        };
        store
            .block(append(&disk, &mut state, vec![sealed], vec![p], seq))
            .unwrap();
        if i == 2 {
            let opts = CompactOptions {
                keep: Duration::minutes(90),
                now: t0 + Duration::hours(2),
                orphan_grace: Duration::zero(),
            };
            compact(&disk, &opts).unwrap();
            state = store.block(disk.load_state()).unwrap();
        }
    }
    assert!(state.base.is_some() && !state.segments.is_empty());
    model
}

/// Reads every object the disk references, the way failover and resync do.
fn read_everything(store: &Store, vault: &VaultKey) -> ferry_replica::Result<Vec<u8>> {
    let disk = store.block(Disk::open(store, "m", "d0", Some(vault)))?;
    let state = store.block(disk.load_state())?;
    let mut last = Vec::new();
    for p in &state.points {
        last = rebuild_mem(&disk, &state, &p.id)?;
        if let Some(s) = &p.sums {
            store.block(BlockSums::load(&disk, s))?;
        }
    }
    Ok(last)
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let mut all = Vec::new();
    files(from, &mut all);
    for f in all {
        let dest = to.join(f.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}

fn file_store(dir: &Path) -> Store {
    Store::open(&format!("file://{}", dir.display())).unwrap()
}

#[test]
fn a_flipped_byte_in_any_object_is_named() {
    let vault = VaultKey::generate();
    let origin = tempfile::tempdir().unwrap();
    let model = populate(&file_store(origin.path()), &vault);
    assert_eq!(
        read_everything(&file_store(origin.path()), &vault).unwrap(),
        model
    );
    let mut all = Vec::new();
    files(origin.path(), &mut all);
    assert!(
        all.len() > 10,
        "the scenario should hold many objects: {}",
        all.len()
    );
    let mut rng = rng(99);
    for f in &all {
        let rel = f.strip_prefix(origin.path()).unwrap().display().to_string();
        let len = std::fs::metadata(f).unwrap().len();
        for _ in 0..4 {
            let copy = tempfile::tempdir().unwrap();
            copy_tree(origin.path(), copy.path());
            let target = copy.path().join(&rel);
            let mut bytes = std::fs::read(&target).unwrap();
            let at = rng.gen_range(0..len as usize);
            bytes[at] ^= 1 << rng.gen_range(0..8);
            std::fs::write(&target, bytes).unwrap();
            match read_everything(&file_store(copy.path()), &vault) {
                Ok(_) => panic!("flip at byte {at} of {rel} went unnoticed"),
                Err(e) => assert!(
                    e.to_string().contains(&rel),
                    "flip in {rel}: error does not name it: {e}"
                ),
            }
        }
    }
}

#[test]
fn a_wrong_key_is_a_clear_error() {
    let vault = VaultKey::generate();
    let dir = tempfile::tempdir().unwrap();
    populate(&file_store(dir.path()), &vault);
    let e = read_everything(&file_store(dir.path()), &VaultKey::generate()).unwrap_err();
    assert!(matches!(e, Error::WrongKey(_)), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("wrong key: disk m/d0 is sealed under vault key"),
        "{e}"
    );
}

#[test]
fn no_plaintext_reaches_the_store() {
    let vault = VaultKey::generate();
    for ts in stores() {
        let store = ts.store();
        let model = populate(&store, &vault);
        // Every 16-byte window of the disk's non-zero content, at 8-byte steps.
        let mut windows = HashSet::new();
        for w in model.windows(16).step_by(8) {
            if w.iter().any(|b| *b != 0) {
                windows.insert(w.to_vec());
            }
        }
        let listed = store.block(store.list("machines/m/")).unwrap();
        assert!(!listed.is_empty());
        for l in listed {
            let bytes = store.block(store.get(&l.path)).unwrap();
            assert!(
                !bytes.windows(MARKER.len()).any(|w| w == MARKER),
                "{}: {} holds the marker text",
                ts.name,
                l.path
            );
            if let Some(at) = bytes.windows(16).position(|w| windows.contains(w)) {
                panic!("{}: {} holds disk plaintext at byte {at}", ts.name, l.path);
            }
        }
        // Clean up the shared containers of remote stores.
        for l in store.block(store.list("machines/m/")).unwrap() {
            store.block(store.delete(&l.path)).unwrap();
        }
    }
}

/// The newest commit record of the disk `populate` wrote: (path in the store, its JSON).
fn newest_record(dir: &Path) -> (String, ferry_replica::meta::Commit) {
    let store = file_store(dir);
    let mut names: Vec<String> = store
        .block(store.list("machines/m/disks/d0/commits/"))
        .unwrap()
        .into_iter()
        .map(|l| l.path)
        .collect();
    names.sort();
    let name = names.pop().unwrap();
    let bytes = std::fs::read(dir.join(&name)).unwrap();
    let json = bytes.split(|b| *b == b'\n').next().unwrap();
    (name, serde_json::from_slice(json).unwrap())
}

fn write_record(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

#[test]
fn a_record_edited_without_the_key_is_refused_naming_it() {
    let vault = VaultKey::generate();
    let dir = tempfile::tempdir().unwrap();
    let model = populate(&file_store(dir.path()), &vault);
    let (name, record) = newest_record(dir.path());
    let original = std::fs::read(dir.path().join(&name)).unwrap();
    assert!(!record.segments.is_empty() && !record.points.is_empty());

    // Whoever can write the store drops the record's segment and recomputes the digest:
    // the point then silently loses that segment's writes. The MAC line is left as it
    // was (the attacker cannot compute a new one), or removed.
    let mut forged = record.clone();
    forged.segments.clear();
    let mac_line = original[original.len() - 77..].to_vec();
    assert!(mac_line.starts_with(b"hmac-sha256 "));
    let mut kept_mac = ferry_replica::meta::encode(&forged);
    kept_mac.extend_from_slice(&mac_line);
    // Under a key the attacker does own (another vault's data key), well-formed.
    let disk = file_store(dir.path())
        .block(Disk::open(&file_store(dir.path()), "m", "d0", None))
        .unwrap();
    let other = ferry_replica::keys::DataKey::generate().record_key(&disk.disk_id);
    let other_key = ferry_replica::meta::encode_commit(&name, &forged, &other);
    let no_mac = ferry_replica::meta::encode(&forged);

    for (case, bytes, says) in [
        ("digest recomputed", &kept_mac, "fails authentication"),
        ("another key", &other_key, "fails authentication"),
        ("MAC line removed", &no_mac, "carries no MAC"),
    ] {
        write_record(dir.path(), &name, bytes);
        let store = file_store(dir.path());
        // Failover (rebuild) refuses it, naming the record and its number.
        let e = read_everything(&store, &vault).unwrap_err().to_string();
        assert!(e.contains(&name) && e.contains(says), "{case}: {e}");
        if says == "fails authentication" {
            let n = ferry_replica::layout::number_of(&name).unwrap();
            assert!(e.contains(&format!("commit record {n} ")), "{case}: {e}");
        }
        // So does compaction, before it writes anything.
        let keyed = store
            .block(Disk::open(&store, "m", "d0", Some(&vault)))
            .unwrap();
        let opts = CompactOptions {
            keep: Duration::zero(),
            now: Utc::now(),
            orphan_grace: Duration::zero(),
        };
        let e = compact(&keyed, &opts).unwrap_err().to_string();
        assert!(e.contains(&name), "{case}: compaction: {e}");
    }

    // A keyless listing cannot tell (decision 0013): it shows what the store says.
    write_record(dir.path(), &name, &kept_mac);
    let store = file_store(dir.path());
    let listed = store
        .block(
            store
                .block(Disk::open(&store, "m", "d0", None))
                .unwrap()
                .load_state(),
        )
        .unwrap();
    let dropped = &record.segments[0].object;
    assert!(!listed.segments.iter().any(|s| &s.object == dropped));

    // The original record, put back, rebuilds byte-identical.
    write_record(dir.path(), &name, &original);
    assert_eq!(
        read_everything(&file_store(dir.path()), &vault).unwrap(),
        model
    );
}
