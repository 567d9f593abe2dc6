//! Rebuild throughput: seed an image into a local store, then fail over to its point,
//! timed end to end (store reads, authentication, decompression, writes, fsync). The
//! baseline timed in the same run is the decode ceiling: zstd decompression and AES-GCM
//! decryption of the same sealed data on one core, times the decoder threads.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use chrono::Utc;
use ferry_agent::{seed, SeedOptions};
use ferry_controlplane::recovery::failover;
use ferry_controlplane::recovery::points::PointSpec;
use ferry_replica::export::Format;
use ferry_replica::{Store, VaultKey};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::sample::{load, rate};

pub fn run(image: &Path) -> Result<()> {
    let dir = tempfile::tempdir_in(image.parent().unwrap_or(Path::new(".")))?;
    let store = Store::open(&format!("file://{}/store", dir.path().display()))?;
    let vault = VaultKey::generate();
    let opts = SeedOptions {
        machine: "bench",
        disk: "d0",
        image,
        label: None,
        time: Utc::now(),
        workers: 0,
        orphan_grace: ferry_replica::grace::ORPHAN_GRACE,
    };
    let r = seed(&store, &vault, &opts, &|_| {})?;
    let plan = failover::plan(&store, &vault, "bench", &PointSpec::Latest)?;
    let start = Instant::now();
    let done = failover::run(plan, Format::Raw, &dir.path().join("out"), &|_| {})?;
    let secs = start.elapsed().as_secs_f64();
    let stats = done[0].stats;

    // Decode ceiling on the same kind of data: decompress + decrypt, one core.
    let sample = load(image, 128)?;
    let compressed: Vec<Vec<u8>> = sample
        .iter()
        .map(|c| zstd::bulk::compress(c, 1))
        .collect::<Result<_, _>>()?;
    let mut d = zstd::bulk::Decompressor::new()?;
    let mut out = Vec::with_capacity(1 << 20);
    let mut zin = 0usize;
    let start_z = Instant::now();
    let mut zout = 0usize;
    while start_z.elapsed().as_secs_f64() < crate::sample::seconds() {
        for c in &compressed {
            out.clear();
            zout += d.decompress_to_buffer(c, &mut out)?;
            zin += c.len();
        }
    }
    let unzstd = zout as f64 / start_z.elapsed().as_secs_f64() / 1e6;
    let _ = zin;
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[9u8; 32]).expect("key"));
    let mut buf = vec![0u8; 1 << 20];
    let aes = rate(&sample, 1.0, |c| {
        buf[..c.len()].copy_from_slice(c);
        let _ = key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::empty(),
            &mut buf[..c.len()],
        );
    });
    let per_core = 1.0 / (1.0 / unzstd + 1.0 / aes);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let disk_rate = stats.disk_bytes as f64 / secs / 1e6;
    let data_rate = stats.data_bytes as f64 / secs / 1e6;
    println!(
        "rebuild: {} MiB disk, {} MiB of data in {} objects ({} MiB stored; seeded in this run)",
        stats.disk_bytes >> 20,
        stats.data_bytes >> 20,
        stats.objects,
        r.stored_bytes >> 20
    );
    // The output disk's own ceiling, same run: write as many bytes, fsync included.
    let disk_write = write_rate(&dir.path().join("baseline.bin"), stats.data_bytes)?;
    println!("  failover to raw, fsync included   {:>6.2} s", secs);
    println!("  rebuild, disk bytes               {disk_rate:>8.0} MB/s (goal >= 1000)");
    println!("  rebuild, data bytes (no holes)    {data_rate:>8.0} MB/s");
    println!(
        "  output disk write + fsync alone   {disk_write:>8.0} MB/s  -> rebuild / disk {:.2}",
        data_rate / disk_write
    );
    println!(
        "  decode ceiling (unzstd + AES) x {cores} cores {:>6.0} MB/s (one core {per_core:.0})",
        per_core * cores as f64
    );
    // The same rebuild into memory (tmpfs), where the disk does not bound it.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let out = tempfile::tempdir_in(shm)?;
        let plan = failover::plan(&store, &vault, "bench", &PointSpec::Latest)?;
        let start = Instant::now();
        failover::run(plan, Format::Raw, out.path(), &|_| {})?;
        let t = start.elapsed().as_secs_f64();
        println!(
            "  rebuild into tmpfs                {:>8.0} MB/s disk, {:.0} MB/s data -> data / decode ceiling {:.2}",
            stats.disk_bytes as f64 / t / 1e6,
            stats.data_bytes as f64 / t / 1e6,
            stats.data_bytes as f64 / t / 1e6 / (per_core * cores as f64)
        );
    }
    Ok(())
}

/// MB/s of writing `bytes` in 4 MiB writes to a new file, fsync included.
fn write_rate(path: &Path, bytes: u64) -> Result<f64> {
    use std::io::Write;
    let buf: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let start = Instant::now();
    let mut f = std::fs::File::create(path)?;
    let mut done = 0u64;
    while done < bytes {
        f.write_all(&buf)?;
        done += buf.len() as u64;
    }
    f.sync_all()?;
    let rate = done as f64 / start.elapsed().as_secs_f64() / 1e6;
    std::fs::remove_file(path)?;
    Ok(rate)
}
