//! `ferry-bench`: measurements that print their own baseline. Every figure is shown
//! next to a ceiling or a peer timed in the same run on the same machine, because the
//! machines are shared and noisy and only ratios carry over.

mod cache_io;
mod ceilings;
mod control_plane;
mod failback;
mod ingest;
mod instant;
mod load;
mod machine;
mod peers;
mod rebuild;
mod recovery_plan;
mod sample;
mod seal;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry-bench",
    about = "Ferry benchmarks with same-run baselines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Seal throughput on one core against the zstd-1 + AES-256-GCM ceiling
    Seal {
        #[arg(long)]
        image: PathBuf,
        /// MiB of non-zero image data to measure on
        #[arg(long, default_value_t = 256)]
        sample_mib: usize,
    },
    /// The cache's CPU per GB through the page cache against O_DIRECT, same disk
    CacheIo {
        /// A directory on the disk to measure (the cache disk)
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        gib: usize,
    },
    /// Instant recovery: start to first read over NBD of a sparse disk, and hydrated
    /// reads against the local disk's own read speed
    InstantRecovery {
        /// A directory on the disk to measure (store, image and overlay go there)
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 10)]
        gib: u64,
    },
    /// Seed an image into a local store, then time a failover rebuild of it
    Rebuild {
        #[arg(long)]
        image: PathBuf,
    },
    /// `ferry seed` against `restic backup` and `borg create`, first run and after a
    /// change
    #[command(alias = "seed-vs-restic")]
    SeedVsPeers {
        #[command(flatten)]
        peer: PeerArgs,
        #[arg(long, default_value_t = 5.0)]
        change_percent: f64,
        /// First runs of each tool, interleaved; the median counts
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The process server under load on loopback: full load, half load, many
    /// connections; every disk verified against its model afterwards
    Ingest {
        // The image whose blocks the agents send, the ferry binary whose process
        // server is measured, and a work directory.
        #[command(flatten)]
        peer: PeerArgs,
        /// Seconds of load per run
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Server shards; default: one per core
        #[arg(long)]
        shards: Option<usize>,
        /// Agents (connections) in the full- and half-load runs
        #[arg(long, default_value_t = 8)]
        agents: usize,
        /// Connections in the many-connections run
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Which runs, comma-separated: full, half, eighty (80 % of full), connections,
        /// scaling (profiling, latency studies); the summary line needs full, half and
        /// connections
        #[arg(long, value_delimiter = ',', default_values = ["full", "half", "eighty", "connections", "scaling"])]
        runs: Vec<ingest::RunKind>,
        /// Seconds between each agent's crash-consistent points (fractional), for the
        /// RPO figures
        #[arg(long, default_value_t = 1.0)]
        point_interval_s: f64,
        /// Offered MB/s of the half-load run when the full-load run is left out
        #[arg(long)]
        half_mbps: Option<f64>,
        /// Put the blob store here instead of beside the cache (another disk, or
        /// tmpfs standing for the remote site)
        #[arg(long)]
        store_dir: Option<PathBuf>,
        /// Threads of the load generator in the full, half and connections runs;
        /// default: one per four cores, at least one
        #[arg(long)]
        load_threads: Option<usize>,
    },
    /// Simulated agents and process servers heartbeating over mutual TLS against one
    /// real `ferry control-plane`: heartbeats per control-plane CPU second, p99
    /// latency and memory at the goal rate, then stepped up until it breaks
    ControlPlane {
        /// The ferry binary to run
        #[arg(long)]
        ferry: PathBuf,
        /// Where the state directory and the enrolled identities are kept (reused by
        /// later runs on the same database)
        #[arg(long)]
        work: PathBuf,
        /// postgres://USER@HOST/DB; default: SQLite in the state directory
        #[arg(long)]
        database: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// Simulated process servers (each lists at most 512 machines)
        #[arg(long, default_value_t = 20)]
        process_servers: usize,
        /// Every agent heartbeats once per this in the first step (the goal)
        #[arg(long, default_value_t = 5.0)]
        interval_s: f64,
        /// Measured seconds of each step, after one interval of warm-up
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// Steps after the goal's, each offering more (1.5, 2, 3, 4, 6, 8 x the
        /// goal), until one breaks
        #[arg(long, default_value_t = 6)]
        more_steps: usize,
        /// Leave both processes unpinned
        #[arg(long)]
        no_pin: bool,
    },
    /// A recovery plan of real agents (small disks, two groups) test-failed-over to
    /// NBD and cleaned up, against one machine's drill alone in the same run; every
    /// test disk compared with its source, the recovery host empty after
    RecoveryPlan {
        /// The ferry binary to run
        #[arg(long)]
        ferry: PathBuf,
        /// Where the run's files go (removed at its end)
        #[arg(long)]
        work: PathBuf,
        #[arg(long, default_value_t = 20)]
        machines: usize,
        /// Each machine's disk
        #[arg(long, default_value_t = 16)]
        disk_mib: u64,
        /// The plan's `max_parallel`; the control plane runs this many jobs plus 4
        #[arg(long, default_value_t = 4)]
        max_parallel: u32,
    },
    /// The failback cycle (reprotect, failback, re-enable, a second failover) of one
    /// machine with real processes: each step's bytes over the wire against the bytes
    /// changed, onto the original home disk and onto a new, empty one
    Failback {
        /// The ferry binary to run
        #[arg(long)]
        ferry: PathBuf,
        /// Where the run's files go (removed at its end)
        #[arg(long)]
        work: PathBuf,
        /// The disk's size
        #[arg(long, default_value_t = 1024)]
        disk_mib: u64,
        /// The share of the disk's blocks written (random bytes) before the failover
        /// point: 1 for a full disk, where every stored extent holds data
        #[arg(long, default_value_t = 0.02)]
        base_share: f64,
    },
    /// All of the above, ending with the one-line summary
    All {
        #[command(flatten)]
        peer: PeerArgs,
        #[arg(long, default_value_t = 256)]
        sample_mib: usize,
        /// First runs of each tool in the seed-vs-peers part, interleaved; the median counts
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

#[derive(clap::Args)]
struct PeerArgs {
    #[arg(long)]
    image: PathBuf,
    /// The ferry binary to run
    #[arg(long)]
    ferry: PathBuf,
    #[arg(long)]
    work: PathBuf,
}

/// Errors end the run with their whole chain on one line and no backtrace: what was
/// missing or failed is all a reader needs (a missing peer names its package).
fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Seal { image, sample_mib } => {
            machine::print();
            seal::run(&image, sample_mib)?;
        }
        Command::CacheIo { dir, gib } => {
            machine::print();
            cache_io::cache_io(&dir, gib)?;
        }
        Command::InstantRecovery { dir, gib } => {
            machine::print();
            instant::run(&dir, gib)?;
        }
        Command::Rebuild { image } => {
            machine::print();
            rebuild::run(&image)?;
        }
        Command::SeedVsPeers {
            peer,
            change_percent,
            rounds,
        } => {
            machine::print();
            peers::run(&peer.image, &peer.ferry, &peer.work, change_percent, rounds)?;
        }
        Command::Ingest {
            peer: PeerArgs { image, ferry, work },
            seconds,
            shards,
            agents,
            connections,
            runs,
            half_mbps,
            store_dir,
            load_threads,
            point_interval_s,
        } => {
            machine::print();
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            ingest::run(&ingest::IngestOptions {
                image,
                ferry,
                work,
                seconds,
                shards: shards.unwrap_or(cores),
                agents,
                connections,
                runs,
                half_mbps,
                store_dir,
                load_threads: load_threads.unwrap_or((cores / 4).max(1)),
                point_interval_s,
            })?;
        }
        Command::ControlPlane {
            ferry,
            work,
            database,
            agents,
            process_servers,
            interval_s,
            seconds,
            more_steps,
            no_pin,
        } => {
            machine::print();
            control_plane::run(&control_plane::Options {
                ferry,
                work,
                database,
                agents,
                process_servers,
                interval_s,
                seconds,
                more_steps,
                pin: !no_pin,
            })?;
        }
        Command::RecoveryPlan {
            ferry,
            work,
            machines,
            disk_mib,
            max_parallel,
        } => {
            machine::print();
            let f = recovery_plan::run(&recovery_plan::Options {
                ferry,
                work,
                machines,
                disk_mib,
                max_parallel,
            })?;
            recovery_plan::print(&f);
        }
        Command::Failback {
            ferry,
            work,
            disk_mib,
            base_share,
        } => {
            if !(0.0..=1.0).contains(&base_share) {
                anyhow::bail!("--base-share {base_share}: a share from 0 to 1");
            }
            machine::print();
            failback::run(ferry, work, disk_mib, base_share)?;
        }
        Command::All {
            peer: PeerArgs { image, ferry, work },
            sample_mib,
            rounds,
        } => {
            // A missing peer is reported before anything is built or timed.
            peers::require_peers()?;
            machine::print();
            // Peers first, while this process is small: a child's peak RSS as wait4
            // reports it starts from the parent's at spawn time.
            let p = peers::run(&image, &ferry, &work, 5.0, rounds)?;
            let s = seal::run(&image, sample_mib)?;
            rebuild::run(&image)?;
            println!(
                "after 5 % of blocks changed: seed vs restic: {:.1} x; seed vs borg: {:.1} x",
                p.restic.after_change, p.borg.after_change
            );
            println!(
                "seal: {:.0} MB/s per core, ceiling {:.0} MB/s, ratio {:.2}; seed vs restic: {:.1} x; seed vs borg: {:.1} x",
                s.seal,
                s.ceiling,
                s.seal / s.ceiling,
                p.restic.first,
                p.borg.first
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod smoke {
    //! The benchmarks run small inside the test suite so they cannot rot.
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

    /// 24 MiB: text, noise and zeros.
    fn small_image(dir: &Path) -> PathBuf {
        std::env::set_var("FERRY_BENCH_SECONDS", "0.05");
        let image = dir.join("small.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(24 << 20).unwrap();
        let text = b"a small image for the benchmark smoke test\n".repeat(30_000);
        f.write_all_at(&text, 1 << 20).unwrap();
        let noise: Vec<u8> = (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        f.write_all_at(&noise, 9 << 20).unwrap();
        image
    }

    #[test]
    fn seal_and_rebuild_run_on_a_small_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = small_image(dir.path());
        let s = crate::seal::run(&image, 4).unwrap();
        assert!(s.seal > 0.0 && s.ceiling > 0.0);
        crate::rebuild::run(&image).unwrap();
    }

    /// `cargo test --workspace` builds the ferry binary beside this test's own.
    fn ferry() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        let ferry = exe.parent().unwrap().parent().unwrap().join("ferry");
        assert!(
            ferry.exists(),
            "{} is missing: run the tests with --workspace",
            ferry.display()
        );
        ferry
    }

    #[test]
    fn seed_runs_against_restic_and_borg_without_prompts() {
        if let Err(e) = crate::peers::require_peers() {
            eprintln!("skipped: {e:#}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = small_image(dir.path());
        let p = crate::peers::run(&image, &ferry(), &dir.path().join("work"), 5.0, 1).unwrap();
        for r in [&p.restic, &p.borg] {
            assert!(r.first > 0.0 && r.after_change > 0.0);
        }
        // The repositories are gone: they would hold three copies of the image.
        assert!(!dir.path().join("work/borg-repo").exists());
        assert!(!dir.path().join("work/restic-repo").exists());
    }

    #[test]
    fn ingest_runs_small_against_a_real_server_and_verifies() {
        let ferry = ferry();
        let dir = tempfile::tempdir().unwrap();
        let image = small_image(dir.path());
        // Half load at a fixed rate over two load threads, and the scaling sweep
        // (one step on two CPUs): each run ends with every disk checked.
        crate::ingest::run(&crate::ingest::IngestOptions {
            image,
            ferry,
            work: dir.path().join("work"),
            seconds: 1.0,
            shards: 2,
            agents: 4,
            connections: 0,
            runs: vec![
                crate::ingest::RunKind::Half,
                crate::ingest::RunKind::Scaling,
            ],
            half_mbps: Some(20.0),
            store_dir: None,
            load_threads: 2,
            point_interval_s: 0.5,
        })
        .unwrap();
    }

    #[test]
    fn instant_recovery_runs_on_a_small_disk() {
        let dir = tempfile::tempdir().unwrap();
        crate::instant::run(dir.path(), 1).unwrap();
    }

    #[test]
    fn control_plane_runs_small_and_prints_its_summary() {
        let dir = tempfile::tempdir().unwrap();
        let o = crate::control_plane::Options {
            ferry: ferry(),
            work: dir.path().join("work"),
            database: None,
            agents: 50,
            process_servers: 2,
            interval_s: 1.0,
            seconds: 2.0,
            more_steps: 0,
            pin: false,
        };
        let f = crate::control_plane::run(&o).unwrap();
        assert!(f.enroll_s.is_some(), "enrolled the first time");
        let goal = &f.steps[0];
        assert_eq!(goal.errors, 0, "{:?}", goal.first_error);
        assert!(goal.answered > 0.0 && goal.per_core > 0.0 && goal.p99_ms > 0.0);
        let line = f.summary();
        assert!(
            line.starts_with("control-plane sqlite: 50 agents every 1 s:"),
            "{line}"
        );
        // A second run reuses the identities (and the database they are in).
        let again = crate::control_plane::run(&o).unwrap();
        assert!(again.enroll_s.is_none());
        assert_eq!(again.steps[0].errors, 0, "{:?}", again.steps[0].first_error);
    }

    #[test]
    fn cache_io_runs_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [false, true] {
            let (cpu, mbps) = crate::cache_io::run(dir.path(), 64 << 20, direct).unwrap();
            assert!(cpu > 0.0 && mbps > 0.0);
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "files deleted"
        );
    }
}
