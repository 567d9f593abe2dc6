//! A sample of an image's non-zero data, in 1 MiB chunks, to time stages on.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

pub const CHUNK: usize = 1 << 20;

pub fn load(image: &Path, mib: usize) -> Result<Vec<Vec<u8>>> {
    let mut f = File::open(image).with_context(|| format!("open {}", image.display()))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    while out.len() < mib {
        let mut filled = 0;
        while filled < CHUNK {
            let n = f.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled < CHUNK {
            break;
        }
        if !ferry_replica::scan::is_zero(&buf) {
            out.push(buf.clone());
        }
    }
    anyhow::ensure!(!out.is_empty(), "{} holds no non-zero MiB", image.display());
    Ok(out)
}

/// Seconds each stage is timed for: FERRY_BENCH_SECONDS, default 2 (the smoke test in
/// the suite uses a fraction of that).
pub fn seconds() -> f64 {
    std::env::var("FERRY_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0)
}

/// CPU seconds this thread has run. Stages are timed in CPU time, as the process
/// server is charged (from /proc): on a shared host, time stolen by neighbours would
/// otherwise slow the ceiling and flatter every ratio against it.
pub fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Runs `f` over the sample until at least `min_s` CPU seconds of this thread passed;
/// returns MB of input per CPU second.
pub fn rate(sample: &[Vec<u8>], min_s: f64, mut f: impl FnMut(&[u8])) -> f64 {
    let min_s = min_s * seconds() / 2.0;
    let start = thread_cpu_s();
    let mut bytes = 0usize;
    loop {
        for c in sample {
            f(c);
            bytes += c.len();
        }
        let t = thread_cpu_s() - start;
        if t >= min_s {
            return bytes as f64 / t / 1e6;
        }
    }
}
