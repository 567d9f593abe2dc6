//! `ferry seed` against `restic backup` and `borg create` on the same image in the same
//! run, in MB of image per CPU-second (user + system of the child and all its threads,
//! from wait4), first run and after a change.
//!
//! The first runs are repeated, interleaved (ferry, restic, borg, then again, each into
//! a fresh repository), and each tool's median is its figure, printed with the spread:
//! on a shared 2-vCPU host one run of the same build moved by 10 % with the neighbours'
//! load, and interleaving makes a drift move all three alike.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

/// The peers the seed is compared with: (program, Debian package).
pub const PEERS: [(&str, &str); 2] = [("restic", "restic"), ("borg", "borgbackup")];

/// Ferry's rate over a peer's, MB per CPU-second, first run and after the change.
pub struct Ratios {
    pub first: f64,
    pub after_change: f64,
}

pub struct PeerFigures {
    pub restic: Ratios,
    pub borg: Ratios,
}

/// The programs of `tools` (program, package) that no directory of `path` (a
/// PATH-style list) holds as an executable file, with their packages.
pub fn missing<'a>(tools: &[(&'a str, &'a str)], path: &OsStr) -> Vec<(&'a str, &'a str)> {
    let dirs: Vec<PathBuf> = std::env::split_paths(path).collect();
    tools
        .iter()
        .filter(|(program, _)| {
            !dirs.iter().any(|d| {
                std::fs::metadata(d.join(program))
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
        })
        .copied()
        .collect()
}

/// Fails, naming the Debian packages to install, when a peer is not on PATH: checked
/// before anything is timed, so that a missing peer costs no half-finished run.
pub fn require_peers() -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let gone = missing(&PEERS, &path);
    if gone.is_empty() {
        return Ok(());
    }
    let programs: Vec<&str> = gone.iter().map(|(p, _)| *p).collect();
    let packages: Vec<&str> = gone.iter().map(|(_, p)| *p).collect();
    bail!(
        "{} not found on PATH: the seed is compared with restic and borg; install them with `apt-get install {}`",
        programs.join(" and "),
        packages.join(" ")
    )
}

#[derive(Clone, Copy)]
struct Usage {
    cpu_s: f64,
    wall_s: f64,
    max_rss_mib: f64,
}

fn measure(cmd: &mut Command) -> Result<Usage> {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data; all zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // wait4 gives this child's own CPU time (all its threads) and peak RSS. A child
    // that fills its stderr pipe would block: every peer here writes little to it.
    // SAFETY: pid is our unwaited child; status and ru are valid for writes.
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

/// A measure and, when there were several runs, the range of their CPU-seconds.
struct Measured {
    usage: Usage,
    range: Option<(f64, f64)>,
}

/// The run of median CPU time (the upper middle one of an even count).
fn median(runs: &mut [Usage]) -> Measured {
    runs.sort_by(|a, b| a.cpu_s.total_cmp(&b.cpu_s));
    Measured {
        usage: runs[runs.len() / 2],
        range: (runs.len() > 1).then(|| (runs[0].cpu_s, runs[runs.len() - 1].cpu_s)),
    }
}

impl From<Usage> for Measured {
    fn from(usage: Usage) -> Measured {
        Measured { usage, range: None }
    }
}

fn row(name: &str, bytes: u64, m: &Measured) -> f64 {
    let u = &m.usage;
    let per_cpu = bytes as f64 / 1e6 / u.cpu_s;
    let spread = m.range.map_or(String::new(), |(lo, hi)| {
        format!(
            "  (runs {:.0} to {:.0} MB/CPU-s)",
            bytes as f64 / 1e6 / hi,
            bytes as f64 / 1e6 / lo
        )
    });
    println!(
        "  {name:<28} {per_cpu:>8.0} MB/CPU-s {:>8.0} MB/s wall {:>7.1} CPU-s {:>6.0} MiB RSS{spread}",
        bytes as f64 / 1e6 / u.wall_s,
        u.cpu_s,
        u.max_rss_mib
    );
    per_cpu
}

/// The three tools' commands on one image, each with its repository under `work`.
struct Tools<'a> {
    image: &'a Path,
    ferry: &'a Path,
    work: &'a Path,
    key: PathBuf,
}

impl Tools<'_> {
    fn ferry_seed(&self) -> Command {
        let store_url = format!("file://{}", self.work.join("ferry-store").display());
        let mut c = Command::new(self.ferry);
        c.args(["seed", "--store", &store_url])
            .args(["--machine", "bench", "--disk", "d0", "--key-file"])
            .arg(&self.key)
            .arg("--image")
            .arg(self.image);
        c
    }

    fn restic(&self, args: &[&OsStr]) -> Command {
        let mut c = Command::new("restic");
        c.arg("-r")
            .arg(self.work.join("restic-repo"))
            .args(args)
            .env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", self.work.join("restic-cache"));
        c
    }

    /// borg with its keys, cache and security state under the run's directory, a
    /// passphrase from the environment, and every question answered, so that it never
    /// prompts and never touches the user's ~/.config/borg or ~/.cache/borg.
    fn borg(&self, args: &[OsString]) -> Command {
        let home = self.work.join("borg-home");
        let mut c = Command::new("borg");
        c.args(args)
            .env("BORG_PASSPHRASE", "bench")
            .env("BORG_DISPLAY_PASSPHRASE", "no")
            .env("BORG_BASE_DIR", &home)
            .env("BORG_CONFIG_DIR", home.join("config"))
            .env("BORG_CACHE_DIR", home.join("cache"))
            .env("BORG_SECURITY_DIR", home.join("security"))
            .env("BORG_KEYS_DIR", home.join("keys"))
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
        c
    }

    fn borg_repo(&self) -> PathBuf {
        self.work.join("borg-repo")
    }

    fn borg_create(&self, archive: &str) -> Command {
        let mut target = self.borg_repo().into_os_string();
        target.push(format!("::{archive}"));
        self.borg(&[
            "create".into(),
            "--compression".into(),
            "zstd,1".into(),
            target,
            self.image.into(),
        ])
    }
}

pub fn run(
    image: &Path,
    ferry: &Path,
    work: &Path,
    percent: f64,
    rounds: usize,
) -> Result<PeerFigures> {
    require_peers()?;
    let bytes = std::fs::metadata(image)
        .with_context(|| format!("image {}", image.display()))?
        .len();
    std::fs::create_dir_all(work).with_context(|| format!("create {}", work.display()))?;
    remove_repos(work);
    let t = Tools {
        image,
        ferry,
        work,
        key: work.join("bench.key"),
    };
    let _ = std::fs::remove_file(&t.key);
    measure(Command::new(ferry).arg("keygen").arg("--out").arg(&t.key))?;
    println!(
        "seed vs restic and borg (zstd,1, repokey): {} MiB image {}; {}; {}; first runs: median of {rounds}, interleaved",
        bytes >> 20,
        image.display(),
        crate::machine::first_line("restic", &["version"]),
        crate::machine::first_line("borg", &["--version"]),
    );
    let backup = [OsStr::new("backup"), image.as_os_str()];
    let (mut f, mut r, mut b) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        // Every round starts from empty repositories: each is a first run. The last
        // round's stay for the run after the change.
        for old in ["ferry-store", "restic-repo", "restic-cache", "borg-repo"] {
            let _ = std::fs::remove_dir_all(work.join(old));
        }
        measure(&mut t.restic(&[OsStr::new("init")])).context("restic init")?;
        measure(&mut t.borg(&[
            "init".into(),
            "--encryption".into(),
            "repokey".into(),
            t.borg_repo().into(),
        ]))
        .context("borg init")?;
        f.push(measure(&mut t.ferry_seed())?);
        r.push(measure(&mut t.restic(&backup))?);
        b.push(measure(&mut t.borg_create("first"))?);
    }
    let f1 = row("ferry seed, first", bytes, &median(&mut f));
    let r1 = row("restic backup, first", bytes, &median(&mut r));
    let b1 = row("borg create, first", bytes, &median(&mut b));
    let changed = change(image, percent)?;
    println!("  (changed {changed} blocks of 64 KiB, {percent} %)");
    let f2 = measure(&mut t.ferry_seed())?;
    let r2 = measure(&mut t.restic(&backup))?;
    let b2 = measure(&mut t.borg_create("second"))?;
    let f2 = row("ferry seed, after change", bytes, &f2.into());
    let r2 = row("restic backup, after change", bytes, &r2.into());
    let b2 = row("borg create, after change", bytes, &b2.into());
    let figures = PeerFigures {
        restic: Ratios {
            first: f1 / r1,
            after_change: f2 / r2,
        },
        borg: Ratios {
            first: f1 / b1,
            after_change: f2 / b2,
        },
    };
    println!(
        "  ferry / restic, MB per CPU-second: first {:.1} x, after change {:.1} x",
        figures.restic.first, figures.restic.after_change
    );
    println!(
        "  ferry / borg, MB per CPU-second: first {:.1} x, after change {:.1} x",
        figures.borg.first, figures.borg.after_change
    );
    // Three copies of a 4 GiB image: gone before the rebuild needs the room.
    remove_repos(work);
    Ok(figures)
}

fn remove_repos(work: &Path) {
    for old in [
        "ferry-store",
        "restic-repo",
        "restic-cache",
        "borg-repo",
        "borg-home",
    ] {
        let _ = std::fs::remove_dir_all(work.join(old));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_names_the_programs_and_packages_not_on_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let restic = dir.path().join("restic");
        std::fs::write(&restic, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&restic, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Present but not executable: as good as missing.
        std::fs::write(dir.path().join("borg"), "").unwrap();
        let path = std::env::join_paths([Path::new("/nonexistent"), dir.path()]).unwrap();
        assert_eq!(missing(&PEERS, &path), vec![("borg", "borgbackup")]);
        assert_eq!(missing(&PEERS, OsStr::new("")).len(), 2);
    }
}
