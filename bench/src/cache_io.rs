//! What the process server's cache costs in CPU per GB, written two ways on the same
//! disk in the same run: through the page cache (as the cache log does: each 64 KiB
//! record written, fdatasync per 512 KiB group, read back for upload, files deleted),
//! and with O_DIRECT from an aligned staging buffer (records copied into it, one
//! write per group, read back with O_DIRECT). The difference is what moving the cache
//! off the page cache would save the server.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

const RECORD: usize = 64 << 10;
const GROUP: usize = 512 << 10;
const FILE: usize = 64 << 20;

/// CPU seconds of this process (user and system).
fn process_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(r.ru_utime) + t(r.ru_stime)
}

/// A zeroed buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: a non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, layout }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `layout.size()` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// CPU seconds per GB and MB/s for `total` bytes, `direct` or through the page cache.
pub(crate) fn run(dir: &Path, total: usize, direct: bool) -> Result<(f64, f64)> {
    let record: Vec<u8> = (0..RECORD).map(|i| (i * 7 % 251) as u8).collect();
    let mut stage = Aligned::new(GROUP);
    let mut back = Aligned::new(GROUP);
    let mut plain_back = vec![0u8; GROUP];
    let (cpu0, t0) = (process_cpu_s(), Instant::now());
    let mut written = 0;
    let mut n = 0;
    while written < total {
        let path = dir.join(format!("cache-io-{n}.log"));
        n += 1;
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let reader = File::open(&path)?;
        let mut at = 0;
        while at < FILE {
            for g in (0..GROUP).step_by(RECORD) {
                if direct {
                    stage.bytes()[g..g + RECORD].copy_from_slice(&record);
                } else {
                    f.write_all(&record)?;
                }
            }
            if direct {
                f.write_all_at(stage.bytes(), at as u64)?;
            }
            f.sync_data()?;
            if direct {
                f.read_exact_at(back.bytes(), at as u64)?;
            } else {
                reader.read_exact_at(&mut plain_back, at as u64)?;
            }
            at += GROUP;
        }
        written += FILE;
        std::fs::remove_file(&path)?;
    }
    let cpu = process_cpu_s() - cpu0;
    Ok((
        cpu / (total as f64 / 1e9),
        total as f64 / t0.elapsed().as_secs_f64() / 1e6,
    ))
}

pub fn cache_io(dir: &Path, gib: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let total = gib << 30;
    let (pc, pw) = run(dir, total, false)?;
    let (dc, dw) = run(dir, total, true)?;
    println!("cache I/O, {gib} GiB of 64 KiB records, fdatasync per 512 KiB, read back, deleted:");
    println!("  through the page cache  {pc:.2} CPU-s per GB, {pw:.0} MB/s");
    println!("  O_DIRECT from staging   {dc:.2} CPU-s per GB, {dw:.0} MB/s");
    println!(
        "  saving {:.2} CPU-s per GB ({:.0} %)",
        pc - dc,
        100.0 * (pc - dc) / pc
    );
    Ok(())
}
