//! A resync whose upload outlives the orphan grace makes its stale objects again under
//! fresh names before it commits: the commit references none of them, compaction may
//! sweep them, and the new point rebuilds equal to the image. A 200 ms grace and a
//! store whose put replies come late stand in for an hour and a slow network.

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{Duration, Utc};
use ferry_agent::{seed, SeedOptions};
use ferry_replica::compact::{compact, CompactOptions};
use ferry_replica::fault::{FaultStore, SlowPuts};
use ferry_replica::rebuild::{rebuild_point, FileSink};
use ferry_replica::{Disk, Store, VaultKey};
use object_store::ObjectStore;

const GRACE: StdDuration = StdDuration::from_millis(200);
const EXTENT: u64 = ferry_replica::DEFAULT_EXTENT_BYTES;

fn write_at(path: &std::path::Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
}

#[test]
fn a_resync_slower_than_the_grace_redoes_its_stale_segments() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(3 * EXTENT)
        .unwrap();
    write_at(&image, 4096, &[0x11; 100_000]);
    write_at(&image, 2 * EXTENT + 8192, &[0x22; 70_000]);

    let vault = VaultKey::generate();
    let inner: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let faulty = FaultStore::new(inner.clone());
    let store = Store::with_object_store(faulty.clone() as Arc<dyn ObjectStore>, "memory://");
    let opts = |label: &str| SeedOptions {
        machine: "m",
        disk: "sda",
        image: &image,
        label: Some(label.into()),
        time: Utc::now(),
        // One at a time: the slowed segment is the first job's, the others follow.
        workers: 1,
        orphan_grace: GRACE,
    };
    let first = seed(&store, &vault, &opts("first"), &|_| {}).unwrap();
    assert!(first.full_copy);
    assert_eq!(first.redone, 0);

    // Change two extents, then resync through a store whose first segment reply
    // comes twice the grace late.
    write_at(&image, 4096, &[0x33; 50_000]);
    write_at(&image, EXTENT + 65536, &[0x44; 65536]);
    let disk = store
        .block(Disk::open(&store, "m", "sda", Some(&vault)))
        .unwrap();
    *faulty.slow_puts.lock().unwrap() = Some(SlowPuts {
        under: disk.paths.log_dir(),
        count: 1,
        delay: GRACE * 2,
    });
    let second = seed(&store, &vault, &opts("second"), &|_| {}).unwrap();
    assert!(!second.full_copy);
    assert!(second.redone >= 1, "the late segment was not made again");
    let late = faulty.slowed.lock().unwrap().clone();
    assert_eq!(late.len(), 1);

    let state = store.block(disk.load_state()).unwrap();
    assert_eq!(state.segments.len(), 2, "{:?}", state.segments);
    for s in &state.segments {
        assert_ne!(s.object, late[0], "the late segment was committed");
    }

    // Compaction with the same grace sweeps the abandoned segment; the point rebuilds
    // equal to the image.
    std::thread::sleep(GRACE);
    let report = compact(
        &disk,
        &CompactOptions {
            keep: Duration::days(1),
            now: Utc::now(),
            orphan_grace: Duration::from_std(GRACE).unwrap(),
        },
    )
    .unwrap();
    assert!(report.objects_deleted >= 1, "{report:?}");
    assert!(store.block(store.get_opt(&late[0])).unwrap().is_none());
    let state = store.block(disk.load_state()).unwrap();
    let point = state.point(&second.point.id).unwrap();
    let out = dir.path().join("rebuilt.img");
    let file = std::fs::File::create(&out).unwrap();
    file.set_len(point.disk_bytes).unwrap();
    let sink = FileSink {
        file: &file,
        path: out.display().to_string(),
    };
    rebuild_point(&disk, &state, point, &sink, &|_| {}).unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&image).unwrap());
}
