//! Instant recovery (`ferry serve-point`): time from start to the first read answered
//! over NBD for a large sparse disk, and read MB/s of hydrated data against the local
//! disk's own read speed of the same bytes, same run, caches dropped before each.
//!
//! The disk: `gib` GiB, zero except 4 MiB of pseudo-random bytes at the start of every
//! 512 MiB (so a seed is quick and the base has one extent object per data region).
//! "Start" is what `ferry serve-point` does before it answers: open the store and the
//! machine, load every disk's commit records, choose the point, open the served disk
//! (decode the log, replay the overlay), listen; then a client connects and reads
//! 4 KiB at offset 0, which fetches and decodes one 16 MiB extent. Process start-up
//! (exec, a few ms) is not in it: the benchmark runs the library in-process.

use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use chrono::Utc;
use ferry_agent::nbd::client::Client;
use ferry_agent::nbd::{serve, Exports, FileDevice};
use ferry_agent::recover::ServedDisk;
use ferry_agent::{seed, SeedOptions};
use ferry_controlplane::recovery::failover;
use ferry_controlplane::recovery::points::PointSpec;
use ferry_replica::{Store, VaultKey};

const MIB: u64 = 1 << 20;
const REGION: u64 = 512 * MIB;
const DATA: u64 = 4 * MIB;

fn drop_cache(f: &std::fs::File) {
    // SAFETY: advice on a descriptor we own; it only drops clean cached pages.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

pub fn run(dir: &Path, gib: u64) -> Result<()> {
    let work =
        tempfile::tempdir_in(dir).with_context(|| format!("temp dir in {}", dir.display()))?;
    let size = gib << 30;
    let image = work.path().join("disk.img");
    let f = std::fs::File::create(&image)?;
    f.set_len(size)?;
    let mut regions = Vec::new();
    let mut at = 0;
    while at < size {
        let noise: Vec<u8> = (0..DATA as u32)
            .map(|i| ((i ^ (at >> 20) as u32).wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        f.write_all_at(&noise, at)?;
        regions.push(at);
        at += REGION;
    }
    f.sync_all()?;
    drop(f);
    let f = std::fs::File::open(&image)?;
    let store_url = format!("file://{}/store", work.path().display());
    let store = Store::open(&store_url)?;
    let vault = VaultKey::generate();
    let opts = SeedOptions {
        machine: "bench",
        disk: "d0",
        image: &image,
        label: None,
        time: Utc::now(),
        workers: 0,
        orphan_grace: ferry_replica::grace::ORPHAN_GRACE,
    };
    let t = Instant::now();
    seed(&store, &vault, &opts, &|_| {})?;
    println!(
        "instant recovery: {gib} GiB disk, {} MiB of data ({} regions of 4 MiB, one per 512 MiB); seeded in {:.1} s",
        regions.len() as u64 * DATA / MIB,
        regions.len(),
        t.elapsed().as_secs_f64()
    );
    let overlay = work.path().join("overlay");

    // Start to first read, as serve-point does it, on a fresh store handle.
    let start = Instant::now();
    let store = Store::open(&store_url)?;
    let plan = failover::plan(&store, &vault, "bench", &PointSpec::Latest)?;
    let mut exports = Exports::default();
    let mut served = Vec::new();
    for (md, point) in plan.disks {
        let d = Arc::new(ServedDisk::open(
            &md.name, md.disk, &md.state, &point, &overlay, 32,
        )?);
        exports.add(d.name(), d.clone());
        served.push(d);
    }
    exports.add("image", Arc::new(FileDevice::open(&image)?));
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let exports = Arc::new(exports);
    std::thread::spawn(move || serve(listener, exports, Arc::new(AtomicBool::new(false))));
    let mut c = Client::connect(addr, "d0")?;
    let mut first = vec![0u8; 4096];
    c.read(0, &mut first)?;
    let first_read = start.elapsed().as_secs_f64();
    let mut want = vec![0u8; 4096];
    f.read_exact_at(&mut want, 0)?;
    anyhow::ensure!(first == want, "the first read differs from the image");
    println!(
        "  start to first read answered       {:>8.3} s (goal <= 1 s)",
        first_read
    );

    // Hydration of the whole base.
    let disk = &served[0];
    let t = Instant::now();
    let left = disk.to_hydrate();
    for idx in &left {
        disk.hydrate_extent(*idx)?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  hydration: {} extents in {secs:.2} s ({:.0} MB/s of extent data)",
        left.len(),
        (left.len() as u64 * 16 * MIB) as f64 / secs / 1e6
    );

    // Hydrated reads over NBD against the local disk reading the same bytes, and
    // against the same NBD server exporting the image file itself (what the transport
    // alone costs); three interleaved rounds, caches dropped before each, medians.
    let hydrated = std::fs::File::open(overlay.join("d0.hydrated"))?;
    let mut raw = Client::connect(addr, "image")?;
    let bytes = (regions.len() as u64 * DATA) as f64;
    let mut buf = vec![0u8; DATA as usize];
    let (mut served_mbs, mut raw_mbs, mut local_mbs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        drop_cache(&hydrated);
        let t = Instant::now();
        for r in &regions {
            c.read(*r, &mut buf)?;
        }
        served_mbs.push(bytes / t.elapsed().as_secs_f64() / 1e6);
        drop_cache(&f);
        let t = Instant::now();
        for r in &regions {
            raw.read(*r, &mut buf)?;
        }
        raw_mbs.push(bytes / t.elapsed().as_secs_f64() / 1e6);
        drop_cache(&f);
        let t = Instant::now();
        for r in &regions {
            f.read_exact_at(&mut buf, *r)?;
        }
        local_mbs.push(bytes / t.elapsed().as_secs_f64() / 1e6);
    }
    let mut check = vec![0u8; DATA as usize];
    let last = *regions.last().unwrap_or(&0);
    f.read_exact_at(&mut check, last)?;
    c.read(last, &mut buf)?;
    anyhow::ensure!(buf == check, "a hydrated read differs from the image");
    let (served, rawn, local) = (median(served_mbs), median(raw_mbs), median(local_mbs));
    println!(
        "  hydrated reads over NBD            {served:>8.0} MB/s -> / local disk {:.2}, / image over NBD {:.2}",
        served / local,
        served / rawn
    );
    println!("  the local disk, same bytes         {local:>8.0} MB/s");
    println!("  the image file over the same NBD   {rawn:>8.0} MB/s");
    raw.disconnect()?;
    let s = disk.status();
    println!(
        "  objects fetched in all: {} (of {} extents); cache bound 32 extents",
        s.fetched_objects, s.extents
    );
    c.disconnect()?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
