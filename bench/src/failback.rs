//! The failback cycle on loopback (docs/failback.md), real processes, one machine:
//! protect, unplanned failover, writes at the recovery site, reprotect onto the
//! original home disk (which got writes after the failover point that never reached
//! the replica), failback, commit, re-enable, writes at home, a second failover
//! (`ferry_testkit::failback`). Prints each step's wall time and the bytes that
//! crossed between the sites, against the bytes changed: the goal is at most twice
//! the changed bytes plus metadata per step, never the disk. Then the same cycle onto
//! a new, empty home disk: a full copy once, deltas after.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_testkit::failback::{cycle, Figures, Options};
use rand::SeedableRng;

const MIB: f64 = (1u64 << 20) as f64;

pub fn run(ferry: PathBuf, work: PathBuf, mib: u64, base_share: f64) -> Result<()> {
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    for new_home_disk in [false, true] {
        let dir = tempfile::tempdir_in(&work)
            .with_context(|| format!("a temporary directory in {}", work.display()))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let f = cycle(
            &Options {
                bin: &ferry,
                dir: dir.path(),
                disk_bytes: mib << 20,
                base_share,
                built_files: false,
                recovery_share: 0.02,
                home_share: 0.01,
                kills: false,
                new_home_disk,
            },
            &mut rng,
        );
        print(&f, mib, new_home_disk);
    }
    Ok(())
}

fn print(f: &Figures, mib: u64, new_home_disk: bool) {
    println!(
        "failback cycle, {mib} MiB disk, {} home disk: {:.1} MiB written at the recovery site, \
         {:.1} MiB at home after the failover point",
        if new_home_disk {
            "a new, empty"
        } else {
            "the original"
        },
        f.recovery_changed_bytes as f64 / MIB,
        f.home_changed_bytes as f64 / MIB
    );
    for s in &f.steps {
        println!(
            "  {:<10} {:>7.2} s  {:>8.1} MiB over the wire  {:>8.1} MiB written at home",
            s.name,
            s.seconds,
            s.wire_bytes as f64 / MIB,
            s.written_bytes as f64 / MIB
        );
    }
    let step = |n: &str| {
        f.steps
            .iter()
            .find(|s| s.name == n)
            .map_or(0.0, |s| s.wire_bytes as f64 / MIB)
    };
    println!(
        "  (of reprotect's bytes, {:.1} MiB were its sync's: the two checksum maps and the blocks that differed)",
        f.sync_bytes as f64 / MIB
    );
    println!(
        "failback: reprotect {:.1} MiB, failback {:.1} MiB, re-enable {:.1} MiB for {:.1} MiB changed{}",
        step("reprotect"),
        step("failback"),
        step("re-enable"),
        f.changed_bytes as f64 / MIB,
        if f.identical { "; identical" } else { "" }
    );
}
