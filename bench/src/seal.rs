//! Seal throughput on one core, against each stage's own ceiling timed alone on the same
//! data in the same run: zstd level 1 and AES-256-GCM (ring), composed as
//! 1 / (1/zstd + 1/aes) — what one core could do if sealing added nothing to them.

use std::path::Path;

use anyhow::Result;
use ferry_replica::keys::DataKey;
use ferry_replica::object::{ObjectKind, SealContext, Sealer};
use ferry_replica::record::ObjectBuilder;
use ferry_replica::scan::{scan_region, Run, ZERO_SUM};

use crate::sample::{load, rate, CHUNK};

pub struct SealFigures {
    pub ceiling: f64,
    pub seal: f64,
}

pub fn run(image: &Path, mib: usize) -> Result<SealFigures> {
    let sample = load(image, mib)?;
    let total: usize = sample.iter().map(|c| c.len()).sum();
    println!(
        "seal: sample of {} MiB of non-zero data from {}",
        total >> 20,
        image.display()
    );

    let mut z = zstd::bulk::Compressor::new(1)?;
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(CHUNK));
    let mut compressed = 0usize;
    for c in &sample {
        compressed += z.compress_to_buffer(c, &mut out)?;
    }
    let zstd = crate::ceilings::zstd(&sample)?;
    let aes = crate::ceilings::aes(&sample);
    let ceiling = 1.0 / (1.0 / zstd + 1.0 / aes);

    // Ferry's sealer: 16 chunks to an object, as an extent of the base would be.
    let dk = DataKey::generate();
    let disk = [1u8; 16];
    let mut ctx = SealContext::default();
    let mut sealer: Option<Sealer> = None;
    let mut i = 0usize;
    let seal = rate(&sample, 2.0, |c| {
        let s = sealer.get_or_insert_with(|| {
            Sealer::new(&dk, &disk, ObjectKind::Extent, "bench/object", 16 * CHUNK)
        });
        i += 1;
        let last = i.is_multiple_of(16);
        s.push_chunk(&mut ctx, c, last);
        if last {
            let _ = sealer.take().map(|s| s.finish());
        }
    });

    // The seed's whole per-byte work: zero test, block checksums, records, sealing.
    let mut sums = vec![ZERO_SUM; CHUNK / 65536];
    let mut ctx2 = SealContext::default();
    let start = crate::sample::thread_cpu_s();
    let mut done = 0usize;
    while crate::sample::thread_cpu_s() - start < crate::sample::seconds() {
        for group in sample.chunks(16) {
            let mut b =
                ObjectBuilder::new(&mut ctx2, &dk, &disk, ObjectKind::Extent, "bench/extent");
            for c in group {
                scan_region(c, 0, 65536, None, &mut sums, CHUNK, |r| {
                    if let Run::Data { offset, data } = r {
                        b.data(1, offset, data);
                    }
                });
                done += c.len();
            }
            let _ = b.finish();
        }
    }
    let seed_path = done as f64 / (crate::sample::thread_cpu_s() - start) / 1e6;

    println!(
        "  zstd level 1 alone      {zstd:>8.0} MB/s  (ratio {:.2})",
        total as f64 / compressed as f64
    );
    println!("  AES-256-GCM (ring) alone {aes:>7.0} MB/s");
    println!("  ceiling 1/(1/z+1/a)     {ceiling:>8.0} MB/s");
    println!(
        "  ferry seal              {seal:>8.0} MB/s  ratio {:.2} of the ceiling",
        seal / ceiling
    );
    println!("  ferry scan + seal       {seed_path:>8.0} MB/s  ratio {:.2} (zero test, xxh3 sums, records)", seed_path / ceiling);
    Ok(SealFigures { ceiling, seal })
}
