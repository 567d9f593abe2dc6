//! The subcommands and their arguments.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use chrono::Utc;
use clap::{Parser, Subcommand};
use ferry_agent::{seed, SeedOptions};
use ferry_controlplane::recovery::points::{list_points, open_machine, PointSpec};
use ferry_controlplane::recovery::{failover, retention};
use ferry_replica::export::Format;
use ferry_replica::{Store, VaultKey};

use crate::progress::bar;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Continuous disk replication to blob storage, failover and failback"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct StoreArgs {
    /// Blob store: file:///abs/path, az://container or s3://bucket
    #[arg(long, value_name = "URL")]
    store: String,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new vault key file (32 random bytes, readable only by its owner)
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Copy a disk image into the store: a full copy the first time, afterwards only
    /// the blocks whose checksums differ; then a recovery point of kind seed
    Seed {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        #[arg(long)]
        machine: String,
        #[arg(long)]
        disk: String,
        #[arg(long, value_name = "PATH")]
        image: PathBuf,
        #[arg(long)]
        label: Option<String>,
    },
    /// List the recovery points of every disk of a machine, newest first
    Points {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        machine: String,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild every disk of a machine at a recovery point
    Failover {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        machine: Option<String>,
        /// Every machine of a replication group, each into OUT/{machine}, at the newest
        /// group point all of them hold (`--point latest-group`)
        #[arg(long)]
        group: Option<String>,
        /// latest, latest-app, latest-group (with --group), a point id, or an RFC 3339
        /// time (the newest point at or before it)
        #[arg(long, default_value = "latest")]
        point: PointSpec,
        /// raw, or vhd (fixed VHD, as Azure takes for a managed disk)
        #[arg(long, default_value = "raw")]
        format: Format,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace output images that exist (without it, failover refuses to touch
        /// them); a symbolic link at an output path is refused either way
        #[arg(long)]
        overwrite: bool,
    },
    /// Serve every disk of a machine at a recovery point over NBD at once (instant
    /// recovery): reads fetch what they cover, writes go to a local journaled overlay
    ServePoint(Box<crate::serve_point_cmd::ServePointArgs>),
    /// Make a disk (a file or a block device) equal to one disk of a machine at a
    /// recovery point, by checksum: only the blocks that differ are fetched and
    /// rewritten (failback's master target)
    SyncPoint(Box<crate::sync_point_cmd::SyncPointArgs>),
    /// Failback by hand, one round: seal the writes a served disk's overlay made since
    /// the last round as a point of the reverse replica MACHINE.reverse
    ReverseSend(Box<crate::reverse_cmd::ReverseSendArgs>),
    /// Failback by hand: apply the reverse replica's points onto the home disk, which
    /// sync-point made equal to the failover point first
    ReverseApply(Box<crate::reverse_cmd::ReverseApplyArgs>),
    /// Run a process server: agents' writes in over mutual TLS, into a durable cache,
    /// sealed and uploaded to the store
    ProcessServer(Box<crate::server_cmd::ProcessServerArgs>),
    /// Run a recovery host: enrolled with the control plane, it builds and serves
    /// recovered disks and runs the actions of failovers and recovery plans
    RecoveryHost(Box<crate::recovery_host_cmd::RecoveryHostArgs>),
    /// Everything on loopback with nothing else installed: a process server, an
    /// agent, writes through NBD, recovery points, failover, and a byte comparison
    Quickstart {
        /// An empty or new directory for the run (default: a new one in the temp dir)
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Run the agent (mobility service): protect disks served over NBD, replicate
    /// every write to a process server; `ferry agent ctl` talks to a running one
    Agent(Box<crate::agent_cmd::AgentArgs>),
    /// Run the control plane: the configuration server's HTTPS API (policies, tokens)
    /// with its site CA and state in a directory
    ControlPlane(crate::control_plane_cmd::ControlPlaneArgs),
    /// Talk to a control plane's API
    Cp(crate::cp::CpArgs),
    /// Write a CA, a server certificate for 127.0.0.1 and agent certificates (loopback
    /// and tests; production brings its own PKI)
    Certs {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        agents: usize,
    },
    /// Drop recovery points older than the retention window and fold the log into a
    /// new base; the newest point is always kept
    Compact {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        #[arg(long)]
        machine: String,
        #[arg(long, value_name = "H")]
        keep_hours: f64,
    },
}

fn key(path: &Path) -> Result<VaultKey> {
    Ok(VaultKey::load(path)?)
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out } => {
            let k = VaultKey::generate();
            k.save_new(&out)?;
            println!("wrote vault key {} to {}", k.id(), out.display());
        }
        Command::Seed {
            store,
            key_file,
            machine,
            disk,
            image,
            label,
        } => {
            // Names first: a bad name is the mistake to report, whatever the image is.
            ferry_replica::layout::check_name("machine", &machine)?;
            ferry_replica::layout::check_name("disk", &disk)?;
            let vault = key(&key_file)?;
            let store = Store::open(&store.store)?;
            // The seed sizes the image the same way; a block device's metadata says 0.
            let size = std::fs::File::open(&image)
                .map_err(|e| ferry_replica::Error::io("open image", image.display().to_string(), e))
                .and_then(|mut f| ferry_replica::local::disk_size(&mut f, &image))?;
            let pb = bar(size, "seed");
            let opts = SeedOptions {
                machine: &machine,
                disk: &disk,
                image: &image,
                label,
                time: Utc::now(),
                workers: 0,
                orphan_grace: ferry_replica::grace::ORPHAN_GRACE,
            };
            let r = seed(&store, &vault, &opts, &|n| pb.inc(n))?;
            pb.finish_and_clear();
            println!(
                "{} {machine}/{disk}: {} blocks of {}, {} sent ({} data bytes, {} stored)",
                if r.full_copy { "seeded" } else { "resynced" },
                r.blocks_sent,
                r.blocks,
                if r.full_copy { "non-zero" } else { "changed" },
                r.sent_bytes,
                r.stored_bytes,
            );
            println!("{}", r.point.id);
        }
        Command::Points {
            store,
            machine,
            json,
        } => {
            let store = Store::open(&store.store)?;
            let disks = open_machine(&store, &machine, None)?;
            let rows = list_points(&disks);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<10} {:<30} {:<6} {:<25} {:>8} {:>14}  LABEL",
                    "DISK", "POINT", "KIND", "TIME", "SEQ", "BYTES"
                );
                for r in rows {
                    let p = &r.point;
                    println!(
                        "{:<10} {:<30} {:<6} {:<25} {:>8} {:>14}  {}",
                        r.disk,
                        p.id,
                        p.kind,
                        p.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        p.seq,
                        p.disk_bytes,
                        p.label.as_deref().unwrap_or("")
                    );
                }
            }
        }
        Command::Failover {
            store,
            key_file,
            machine,
            group,
            point,
            format,
            out,
            overwrite,
        } => {
            let vault = key(&key_file)?;
            let store = Store::open(&store.store)?;
            let targets: Vec<(String, PointSpec, PathBuf)> = match (machine, group) {
                (Some(m), _) => {
                    if point == PointSpec::Id("latest-group".into()) {
                        bail!("--point latest-group needs --group");
                    }
                    vec![(m, point, out)]
                }
                (None, Some(g)) => {
                    if !matches!(&point, PointSpec::Id(id) if id == "latest-group") {
                        bail!("with --group, --point must be latest-group");
                    }
                    let (members, id) =
                        ferry_controlplane::recovery::group::latest_group_point(&store, &g)?;
                    eprintln!("group {g}: machines {} at point {id}", members.join(", "));
                    members
                        .into_iter()
                        .map(|m| {
                            let dir = out.join(&m);
                            (m, PointSpec::Id(id.clone()), dir)
                        })
                        .collect()
                }
                (None, None) => bail!("--machine or --group is required"),
            };
            for (machine, point, out) in targets {
                let mut plan = failover::plan(&store, &vault, &machine, &point)?;
                plan.overwrite = overwrite;
                if let Some(note) = &plan.note {
                    eprintln!("note: {note}");
                }
                let pb = bar(plan.stored_bytes(), "failover");
                let done = failover::run(plan, format, &out, &|n| pb.inc(n))?;
                pb.finish_and_clear();
                for d in done {
                    let padded = ferry_replica::export::Output::vhd_data_bytes(d.point.disk_bytes);
                    if format == Format::Vhd && padded != d.point.disk_bytes {
                        eprintln!(
                        "note: {} is padded with zeroes from {} to {padded} bytes: Azure takes only whole MiB",
                        d.path.display(),
                        d.point.disk_bytes
                    );
                    }
                    println!(
                        "{} {} at point {} ({}, {} bytes)",
                        d.path.display(),
                        d.disk,
                        d.point.id,
                        d.point
                            .time
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        d.point.disk_bytes
                    );
                }
            }
        }
        Command::ServePoint(a) => crate::serve_point_cmd::run(*a)?,
        Command::SyncPoint(a) => crate::sync_point_cmd::run(*a)?,
        Command::ReverseSend(a) => crate::reverse_cmd::send(*a)?,
        Command::ReverseApply(a) => crate::reverse_cmd::apply(*a)?,
        Command::ProcessServer(a) => crate::server_cmd::process_server(*a)?,
        Command::RecoveryHost(a) => crate::recovery_host_cmd::run(*a)?,
        Command::Quickstart { dir } => crate::quickstart::run(dir)?,
        Command::Agent(a) => crate::agent_cmd::agent(*a)?,
        Command::ControlPlane(a) => crate::control_plane_cmd::control_plane(a)?,
        Command::Cp(a) => crate::cp::cp(a)?,
        Command::Certs { out, agents } => crate::server_cmd::certs(&out, agents)?,
        Command::Compact {
            store,
            key_file,
            machine,
            keep_hours,
        } => {
            if !(keep_hours.is_finite() && keep_hours >= 0.0) {
                bail!("--keep-hours must be a non-negative number of hours");
            }
            let vault = key(&key_file)?;
            let store = Store::open(&store.store)?;
            let keep = chrono::Duration::milliseconds((keep_hours * 3_600_000.0) as i64);
            for (disk, r) in retention::compact_machine(&store, &vault, &machine, keep)? {
                println!(
                    "{machine}/{disk}: dropped {} points, folded {} segments, rewrote {} extents, deleted {} objects{}",
                    r.points_dropped,
                    r.segments_folded,
                    r.extents_rewritten,
                    r.objects_deleted,
                    r.base_seq.map(|s| format!(", base now at sequence {s}")).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
