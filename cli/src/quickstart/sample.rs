//! The quickstart's sample data and the byte-for-byte check of a rebuilt disk.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Deterministic, partly compressible data: text-like runs and noise.
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = if i % 4 == 0 {
            x
        } else {
            0x2020_6f6c_6c65_6820 ^ (i as u64 & 0xff)
        };
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (v >> (8 * j)) as u8;
        }
    }
}

/// Fails, naming the first range that differs, unless `a` and `b` hold the same bytes.
pub fn same(a: &Path, b: &Path) -> Result<()> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    loop {
        let na = fa.read(&mut ba)?;
        fb.read_exact(&mut bb[..na])
            .with_context(|| format!("{} is shorter", b.display()))?;
        if ba[..na] != bb[..na] {
            bail!(
                "{} differs from {} within bytes {at}..{}",
                a.display(),
                b.display(),
                at + na as u64
            );
        }
        if na == 0 {
            return Ok(());
        }
        at += na as u64;
    }
}
