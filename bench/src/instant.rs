//! Instant recovery (`ferry serve-point`): time from start to the first read answered
//! over NBD for a large disk with a realistic replica, with and without a log after
//! its base; the log's decoding on one thread against all cores; the boot of a guest
//! from the served disk; and read MB/s of hydrated data against the local disk's own
//! read speed of the same bytes, same run, caches dropped before each.
//!
//! The disk: `gib` GiB; every other 16 MiB extent holds 2 MiB of random
//! (incompressible) bytes, the first one starting with a boot sector that prints a
//! line on COM1. After the base (`ferry seed`), a log of `gib` x 20 MiB in 2 MiB
//! segments: 64 KiB writes of random bytes at random places, one 64 KiB zeroed range
//! per segment, then a point. "Start" is what `ferry serve-point` does before it
//! answers: open the store and the machine, load every disk's commit records, choose
//! the point, open the served disk (decode the log, replay the overlay), listen; then
//! a client connects and reads 4 KiB at offset 0, which fetches and decodes one
//! 16 MiB extent. The store's files are dropped from the page cache before each start
//! (a remote store has nothing local). Process start-up (exec, a few ms) is not in it:
//! the benchmark runs the library in-process.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use ferry_agent::nbd::client::Client;
use ferry_agent::nbd::{serve, Exports, FileDevice};
use ferry_agent::recover::log::{decode_log, default_workers, LogSpec};
use ferry_agent::recover::ServedDisk;
use ferry_agent::{seed, SeedOptions};
use ferry_controlplane::recovery::failover;
use ferry_controlplane::recovery::points::PointSpec;
use ferry_replica::meta::PointKind;
use ferry_replica::object::SealContext;
use ferry_replica::writer::{append, seal_segment, Payload, Write};
use ferry_replica::{Disk, Point, Store, VaultKey};
use ferry_testkit::boot::{accel, boot_sector, qemu_system_installed, Guest};
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const EXTENT: u64 = 16 * MIB;
const DATA: u64 = 2 * MIB;
const WRITE: u64 = 64 << 10;
/// Reads in flight in the pipelined figures (QEMU's `qemu-img convert` keeps 8).
const DEPTH: usize = 8;
const SEGMENT: u64 = 2 * MIB;
/// Segments committed together (one commit record each time).
const SEGMENTS_PER_COMMIT: usize = 10;
const LINE: &str = "ferry-bench: booted from the replica";

fn drop_cache(f: &std::fs::File) {
    // SAFETY: advice on a descriptor we own; it only drops clean cached pages.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Every file under `dir` synced and dropped from the page cache.
fn drop_tree(dir: &Path) -> Result<()> {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("list {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let f = std::fs::File::open(&p)?;
                f.sync_all()?;
                drop_cache(&f);
            }
        }
    }
    Ok(())
}

/// A served machine: its disks and where the NBD server listens.
struct Served {
    disks: Vec<Arc<ServedDisk>>,
    addr: SocketAddr,
}

/// What `ferry serve-point` does before its first answer, in-process.
fn start(store_url: &str, vault: &VaultKey, overlay: &Path, image: &Path) -> Result<Served> {
    let store = Store::open(store_url)?;
    let plan = failover::plan(&store, vault, "bench", &PointSpec::Latest)?;
    let mut exports = Exports::default();
    let mut disks = Vec::new();
    for (md, point) in plan.disks {
        let d = Arc::new(ServedDisk::open(
            &md.name, md.disk, &md.state, &point, overlay, 32,
        )?);
        exports.add(d.name(), d.clone());
        disks.push(d);
    }
    // The image itself over the same server: what the transport alone costs.
    exports.add("image", Arc::new(FileDevice::open(image)?));
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let exports = Arc::new(exports);
    std::thread::spawn(move || serve(listener, exports, Arc::new(AtomicBool::new(false))));
    Ok(Served { disks, addr })
}

/// Writes the image (the disk as the point has it) and seeds it; the data regions.
fn make_base(
    image: &Path,
    size: u64,
    store: &Store,
    vault: &VaultKey,
    rng: &mut impl Rng,
) -> Result<Vec<u64>> {
    let f = std::fs::File::create(image)?;
    f.set_len(size)?;
    let mut regions = Vec::new();
    let mut piece = vec![0u8; DATA as usize];
    for (k, ext) in (0..size / EXTENT).step_by(2).enumerate() {
        let at = ext * EXTENT + (k as u64 * 7 % 14) * MIB;
        rng.fill(&mut piece[..]);
        if at == 0 {
            piece[..512].copy_from_slice(&boot_sector(LINE));
        }
        f.write_all_at(&piece, at)?;
        regions.push(at);
    }
    f.sync_all()?;
    let opts = SeedOptions {
        machine: "bench",
        disk: "d0",
        image,
        label: None,
        time: Utc::now(),
        workers: 0,
        orphan_grace: ferry_replica::grace::ORPHAN_GRACE,
    };
    seed(store, vault, &opts, &|_| {})?;
    Ok(regions)
}

/// Appends `bytes` of log after the base (and applies it to the image); then a point.
/// Returns the number of segments.
fn make_log(
    image: &Path,
    size: u64,
    bytes: u64,
    store: &Store,
    vault: &VaultKey,
    rng: &mut impl Rng,
) -> Result<usize> {
    let f = std::fs::OpenOptions::new().write(true).open(image)?;
    let d = store.block(Disk::open(store, "bench", "d0", Some(vault)))?;
    let mut state = store.block(d.load_state())?;
    let mut seq = state.next_seq;
    let mut ctx = SealContext::new(1);
    let segments = bytes.div_ceil(SEGMENT) as usize;
    let mut sealed = Vec::new();
    let mut data = vec![0u8; SEGMENT as usize];
    for s in 0..segments {
        rng.fill(&mut data[..]);
        let mut writes = Vec::new();
        for piece in data.chunks(WRITE as usize) {
            // Past the first MiB: the boot sector stays.
            let off = rng.gen_range(MIB / 4096..(size - WRITE) / 4096) * 4096;
            f.write_all_at(piece, off)?;
            writes.push(Write {
                seq,
                offset: off,
                payload: Payload::Data(piece),
            });
            seq += 1;
        }
        let off = rng.gen_range(MIB / 4096..(size - WRITE) / 4096) * 4096;
        f.write_all_at(&vec![0u8; WRITE as usize], off)?;
        writes.push(Write {
            seq,
            offset: off,
            payload: Payload::Zero(WRITE),
        });
        seq += 1;
        sealed.push(seal_segment(&d, &mut ctx, &writes)?);
        let last = s + 1 == segments;
        if sealed.len() == SEGMENTS_PER_COMMIT || last {
            let points = match last {
                true => vec![Point {
                    id: ferry_replica::disk::new_point_id(Utc::now()),
                    kind: PointKind::Crash,
                    time: Utc::now(),
                    seq,
                    disk_bytes: size,
                    label: None,
                    group: None,
                    sums: None,
                }],
                false => Vec::new(),
            };
            let next = if last { seq + 1 } else { seq };
            store.block(append(
                &d,
                &mut state,
                std::mem::take(&mut sealed),
                points,
                next,
            ))?;
        }
    }
    f.sync_all()?;
    Ok(segments)
}

/// Start to the first 4 KiB read at offset 0 answered, store cold; checked against
/// the image.
fn first_read(
    store_url: &str,
    store_dir: &Path,
    vault: &VaultKey,
    overlay: &Path,
    image: &std::fs::File,
    image_path: &Path,
) -> Result<(f64, Served)> {
    drop_tree(store_dir)?;
    let t = Instant::now();
    let served = start(store_url, vault, overlay, image_path)?;
    let mut c = Client::connect(served.addr, "d0")?;
    let mut first = vec![0u8; 4096];
    c.read(0, &mut first)?;
    let secs = t.elapsed().as_secs_f64();
    c.disconnect()?;
    let mut want = vec![0u8; 4096];
    image.read_exact_at(&mut want, 0)?;
    anyhow::ensure!(first == want, "the first read differs from the image");
    Ok((secs, served))
}

/// Every byte of the served disk equals the image (read in 4 MiB requests).
fn check_all(addr: SocketAddr, image: &std::fs::File, size: u64) -> Result<()> {
    let mut c = Client::connect(addr, "d0")?;
    let (mut got, mut want) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut at = 0;
    while at < size {
        c.read(at, &mut got)?;
        image.read_exact_at(&mut want, at)?;
        anyhow::ensure!(
            got == want,
            "the served disk differs from the image at {at}"
        );
        at += got.len() as u64;
    }
    c.disconnect()?;
    Ok(())
}

/// The log's decoding alone, store cold, on `workers` threads: seconds.
fn decode_alone(
    store_url: &str,
    store_dir: &Path,
    vault: &VaultKey,
    dir: &Path,
    workers: usize,
) -> Result<f64> {
    let store = Store::open(store_url)?;
    let plan = failover::plan(&store, vault, "bench", &PointSpec::Latest)?;
    let (md, point) = plan.disks.into_iter().next().context("no disk")?;
    let floor = md.state.base.as_ref().map_or(0, |b| b.seq + 1);
    let segments: Vec<String> = md
        .state
        .segments_up_to(point.seq)
        .map(|s| s.object.clone())
        .collect();
    let path = dir.join(format!("decode-{workers}.log"));
    let file = std::fs::File::create(&path)?;
    drop_tree(store_dir)?;
    let t = Instant::now();
    let spec = LogSpec {
        disk: &md.disk,
        segments: &segments,
        floor,
        seq: point.seq,
        size: point.disk_bytes,
    };
    decode_log(&spec, workers, &file, &path)?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(secs)
}

pub fn run(dir: &Path, gib: u64) -> Result<()> {
    let work =
        tempfile::tempdir_in(dir).with_context(|| format!("temp dir in {}", dir.display()))?;
    let w = |s: &str| -> PathBuf { work.path().join(s) };
    let size = gib << 30;
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let image = w("disk.img");
    let store_dir = w("store");
    std::fs::create_dir(&store_dir)?;
    let store_url = format!("file://{}", store_dir.display());
    let store = Store::open(&store_url)?;
    let vault = VaultKey::generate();
    let t = Instant::now();
    let regions = make_base(&image, size, &store, &vault, &mut rng)?;
    let base_secs = t.elapsed().as_secs_f64();
    let f = std::fs::File::open(&image)?;
    println!(
        "instant recovery: {gib} GiB disk, base of {} MiB of random data in {} extents \
         (seeded in {base_secs:.1} s); cores {}",
        regions.len() as u64 * DATA / MIB,
        regions.len(),
        default_workers()
    );
    let (no_log, served) = first_read(&store_url, &store_dir, &vault, &w("o-base"), &f, &image)?;
    drop(served);
    println!("  start to first read, no log          {no_log:>8.3} s (goal <= 1 s)");

    let log_bytes = gib * 20 * MIB;
    let segments = make_log(&image, size, log_bytes, &store, &vault, &mut rng)?;
    let (with_log, served) = first_read(&store_url, &store_dir, &vault, &w("o-log"), &f, &image)?;
    println!(
        "  start to first read, {} MiB of log in {segments} segments {with_log:>8.3} s (goal <= 1 s)",
        log_bytes / MIB
    );
    check_all(served.addr, &f, size)?;
    // A restart at the same point on the same directory: the log's index is reused.
    let (restart, again) = first_read(&store_url, &store_dir, &vault, &w("o-log-2"), &f, &image)?;
    drop(again);
    let (restart_2, again) = first_read(&store_url, &store_dir, &vault, &w("o-log-2"), &f, &image)?;
    drop(again);
    println!(
        "  start to first read, a restart of that (log index reused) {restart_2:>8.3} s (first start on its directory {restart:.3} s)"
    );
    let one = decode_alone(&store_url, &store_dir, &vault, work.path(), 1)?;
    let all = decode_alone(
        &store_url,
        &store_dir,
        &vault,
        work.path(),
        default_workers(),
    )?;
    println!(
        "  the log's decoding alone: 1 thread {one:.3} s, {} threads {all:.3} s ({:.0} MB/s of log)",
        default_workers(),
        log_bytes as f64 / all / 1e6
    );

    if qemu_system_installed() {
        // Both accelerators where KVM is usable: nested KVM can be the slower.
        let accels: &[&str] = match accel() {
            "kvm" => &["kvm", "tcg"],
            _ => &["tcg"],
        };
        for a in accels {
            drop_tree(&store_dir)?;
            let t = Instant::now();
            let booting = start(&store_url, &vault, &w(&format!("o-boot-{a}")), &image)?;
            let url = format!("nbd://{}/d0", booting.addr);
            let mut guest = Guest::boot_with(&url, a);
            let in_guest = guest.wait_line(LINE, Duration::from_secs(120));
            println!(
                "  start to the guest's line on COM1   {:>8.3} s (qemu-system-x86_64 -accel {a}; {:.3} s of it from qemu's start)",
                t.elapsed().as_secs_f64(),
                in_guest.as_secs_f64()
            );
        }
    } else {
        println!("  boot: skipped (qemu-system-x86_64 is not installed)");
    }

    hydrated_reads(&served, &f, &regions, &w("o-log"))
}

/// Hydration of the whole base, then hydrated reads over NBD against the local disk
/// reading the same bytes, and against the same NBD server exporting the image file
/// itself (what the transport alone costs); three interleaved rounds, caches dropped
/// before each, medians.
fn hydrated_reads(
    served: &Served,
    f: &std::fs::File,
    regions: &[u64],
    overlay: &Path,
) -> Result<()> {
    let disk = &served.disks[0];
    let t = Instant::now();
    let left = disk.to_hydrate();
    for idx in &left {
        disk.hydrate_extent(*idx)?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  hydration: {} extents in {secs:.2} s ({:.0} MB/s of extent data)",
        left.len(),
        (left.len() as u64 * EXTENT) as f64 / secs / 1e6
    );
    let hydrated = std::fs::File::open(overlay.join("d0.hydrated"))?;
    let log = std::fs::File::open(overlay.join("d0.log"))?;
    let mut c = Client::connect(served.addr, "d0")?;
    let mut raw = Client::connect(served.addr, "image")?;
    let bytes = (regions.len() as u64 * DATA) as f64;
    let mut buf = vec![0u8; DATA as usize];
    let (mut served_mbs, mut raw_mbs, mut local_mbs) = (Vec::new(), Vec::new(), Vec::new());
    let mut warm = Vec::new();
    // The same reads with DEPTH in flight, as QEMU and the kernel's client send them,
    // against the local disk read by DEPTH threads: the same load on both sides.
    let (mut served_deep, mut raw_deep, mut local_deep) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        drop_cache(&hydrated);
        drop_cache(&log);
        let t = Instant::now();
        for r in regions {
            c.read(*r, &mut buf)?;
        }
        served_mbs.push(bytes / t.elapsed().as_secs_f64() / 1e6);
        // Again, now from the page cache: the transport and the layers alone.
        let t = Instant::now();
        for r in regions {
            c.read(*r, &mut buf)?;
        }
        warm.push(bytes / t.elapsed().as_secs_f64() / 1e6);
        drop_cache(f);
        let t = Instant::now();
        for r in regions {
            raw.read(*r, &mut buf)?;
        }
        raw_mbs.push(bytes / t.elapsed().as_secs_f64() / 1e6);
        drop_cache(f);
        let t = Instant::now();
        for r in regions {
            f.read_exact_at(&mut buf, *r)?;
        }
        local_mbs.push(bytes / t.elapsed().as_secs_f64() / 1e6);

        drop_cache(&hydrated);
        drop_cache(&log);
        let t = Instant::now();
        c.read_pipelined(regions, DATA as u32, DEPTH, |_, _| {})?;
        served_deep.push(bytes / t.elapsed().as_secs_f64() / 1e6);
        drop_cache(f);
        let t = Instant::now();
        raw.read_pipelined(regions, DATA as u32, DEPTH, |_, _| {})?;
        raw_deep.push(bytes / t.elapsed().as_secs_f64() / 1e6);
        drop_cache(f);
        let t = Instant::now();
        local_threads(f, regions, DEPTH)?;
        local_deep.push(bytes / t.elapsed().as_secs_f64() / 1e6);
    }
    // A pipelined read of everything again, checked against the image.
    let mut differs = 0;
    c.read_pipelined(regions, DATA as u32, DEPTH, |o, b| {
        let mut want = vec![0u8; b.len()];
        if f.read_exact_at(&mut want, o).is_err() || want != b {
            differs += 1;
        }
    })?;
    anyhow::ensure!(
        differs == 0,
        "{differs} pipelined hydrated reads differ from the image"
    );
    let mut check = vec![0u8; DATA as usize];
    let last = *regions.last().unwrap_or(&0);
    f.read_exact_at(&mut check, last)?;
    c.read(last, &mut buf)?;
    anyhow::ensure!(buf == check, "a hydrated read differs from the image");
    let (s, rawn, local, warm) = (
        median(served_mbs),
        median(raw_mbs),
        median(local_mbs),
        median(warm),
    );
    println!(
        "  hydrated reads over NBD ({} KiB)    {s:>8.0} MB/s -> / local disk {:.2}, / image over NBD {:.2}",
        DATA >> 10,
        s / local,
        s / rawn
    );
    println!("  the local disk, same bytes           {local:>8.0} MB/s");
    println!("  the image file over the same NBD     {rawn:>8.0} MB/s");
    println!("  hydrated reads, page cache warm      {warm:>8.0} MB/s");
    let (sd, rd, ld) = (median(served_deep), median(raw_deep), median(local_deep));
    println!(
        "  hydrated reads over NBD, {DEPTH} in flight {sd:>8.0} MB/s -> / local disk ({DEPTH} threads) {:.2}, / image over NBD {:.2}",
        sd / ld,
        sd / rd
    );
    println!("  the local disk, same bytes, {DEPTH} threads {ld:>8.0} MB/s");
    println!("  the image over the same NBD, {DEPTH} in flight {rd:>8.0} MB/s");
    raw.disconnect()?;
    let st = disk.status();
    println!(
        "  objects fetched in all: {} (of {} extents); cache bound 32 extents",
        st.fetched_objects, st.extents
    );
    c.disconnect()?;
    Ok(())
}

/// Reads `regions` (DATA bytes each) of `f` on `depth` threads, each taking the next
/// region not yet read: a local reader keeping `depth` reads in flight.
fn local_threads(f: &std::fs::File, regions: &[u64], depth: usize) -> Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..depth)
            .map(|_| {
                s.spawn(|| -> std::io::Result<()> {
                    let mut buf = vec![0u8; DATA as usize];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(r) = regions.get(i) else {
                            return Ok(());
                        };
                        f.read_exact_at(&mut buf, *r)?;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a local reader panicked"))??;
        }
        Ok(())
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
