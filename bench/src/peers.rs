//! `ferry seed` against `restic backup` on the same image, in MB of image per
//! CPU-second (user + system of the child, from wait4), first run and after a change.

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

pub struct PeerFigures {
    pub first_ratio: f64,
    pub second_ratio: f64,
}

struct Usage {
    cpu_s: f64,
    wall_s: f64,
    max_rss_mib: f64,
}

fn measure(cmd: &mut Command) -> Result<Usage> {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // wait4 gives this child's own CPU time and peak RSS.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall_s = start.elapsed().as_secs_f64();
    if rc < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let mut err = String::new();
        if let Some(mut e) = child.stderr {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!("{cmd:?} failed: {err}");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Usage {
        cpu_s: tv(ru.ru_utime) + tv(ru.ru_stime),
        wall_s,
        max_rss_mib: ru.ru_maxrss as f64 / 1024.0,
    })
}

fn change(image: &Path, percent: f64) -> Result<u64> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)?;
    let blocks = f.metadata()?.len() / 65536;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as f64) < blocks as f64 * percent / 100.0 {
        chosen.insert(rng.gen_range(0..blocks));
    }
    let mut buf = vec![0u8; 65536];
    for b in &chosen {
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, b * 65536)?;
    }
    f.sync_all()?;
    Ok(chosen.len() as u64)
}

fn row(name: &str, bytes: u64, u: &Usage) -> f64 {
    let per_cpu = bytes as f64 / 1e6 / u.cpu_s;
    println!(
        "  {name:<28} {per_cpu:>8.0} MB/CPU-s {:>8.0} MB/s wall {:>7.1} CPU-s {:>6.0} MiB RSS",
        bytes as f64 / 1e6 / u.wall_s,
        u.cpu_s,
        u.max_rss_mib
    );
    per_cpu
}

pub fn run(image: &Path, ferry: &Path, work: &Path, percent: f64) -> Result<PeerFigures> {
    let bytes = std::fs::metadata(image)?.len();
    std::fs::create_dir_all(work)?;
    let store = work.join("ferry-store");
    let repo = work.join("restic-repo");
    let _ = std::fs::remove_dir_all(&store);
    let _ = std::fs::remove_dir_all(&repo);
    let key = work.join("bench.key");
    let _ = std::fs::remove_file(&key);
    measure(Command::new(ferry).args([
        OsStr::new("keygen"),
        OsStr::new("--out"),
        key.as_os_str(),
    ]))?;
    let store_url = format!("file://{}", store.display());
    let ferry_seed = || {
        let mut c = Command::new(ferry);
        c.args([
            "seed",
            "--store",
            &store_url,
            "--machine",
            "bench",
            "--disk",
            "d0",
            "--key-file",
        ])
        .arg(&key)
        .arg("--image")
        .arg(image);
        c
    };
    let restic = |args: &[&OsStr]| {
        let mut c = Command::new("restic");
        c.arg("-r")
            .arg(&repo)
            .args(args)
            .env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", work.join("restic-cache"));
        c
    };
    measure(&mut restic(&[OsStr::new("init")]))
        .context("restic (Debian package restic) must be installed")?;

    println!(
        "seed vs restic: {} MiB image {}",
        bytes >> 20,
        image.display()
    );
    let f1 = measure(&mut ferry_seed())?;
    let r1 = measure(&mut restic(&[OsStr::new("backup"), image.as_os_str()]))?;
    let a = row("ferry seed, first", bytes, &f1);
    let b = row("restic backup, first", bytes, &r1);
    let changed = change(image, percent)?;
    println!("  (changed {changed} blocks of 64 KiB, {percent} %)");
    let f2 = measure(&mut ferry_seed())?;
    let r2 = measure(&mut restic(&[OsStr::new("backup"), image.as_os_str()]))?;
    let c = row("ferry seed, after change", bytes, &f2);
    let d = row("restic backup, after change", bytes, &r2);
    let first_ratio = a / b;
    let second_ratio = c / d;
    println!("  ferry / restic, MB per CPU-second: first {first_ratio:.1} x, after change {second_ratio:.1} x");
    Ok(PeerFigures {
        first_ratio,
        second_ratio,
    })
}
