//! `ferry sync-point`: makes a disk (a file or a block device) equal to one disk of a
//! machine at a recovery point, by checksum: failback's master target. Only the
//! blocks whose checksum differs from the point's are fetched and rewritten; the
//! work is `ferry_agent::recover::sync`, this file chooses the point and prints.

use std::cell::RefCell;
use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_agent::recover::sync::{MapSource, Phase, SyncProgress};
use ferry_agent::recover::{sync_to_point, SyncOptions};
use ferry_controlplane::recovery::points::{choose, open_machine, PointSpec};
use ferry_replica::{Store, VaultKey};
use indicatif::ProgressBar;

use crate::progress::bar;

const MIB: f64 = (1u64 << 20) as f64;

#[derive(clap::Args)]
pub struct SyncPointArgs {
    /// Blob store: file:///abs/path, az://container or s3://bucket
    #[arg(long, value_name = "URL")]
    store: String,
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    #[arg(long)]
    machine: String,
    #[arg(long)]
    disk: String,
    /// latest, latest-app, a point id, or an RFC 3339 time (the newest point at or
    /// before it)
    #[arg(long, default_value = "latest")]
    point: PointSpec,
    /// The disk to make equal to the point: a regular file or a block device, at
    /// least the disk's size (bytes past it are left alone), not in use
    #[arg(long, value_name = "PATH")]
    target: PathBuf,
    /// Read the target back afterwards and compare it with the point's checksums
    #[arg(long)]
    verify: bool,
    /// Where the point's decoded log is kept while the sync runs (default: a
    /// temporary directory, removed after)
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Map => "checksums",
        Phase::Compare => "compare",
        Phase::Verify => "verify",
        Phase::Home => "hash home",
        Phase::Write => "write",
    }
}

pub fn run(a: SyncPointArgs) -> Result<()> {
    let vault = VaultKey::load(&a.key_file)?;
    let store = Store::open(&a.store)?;
    let disks = open_machine(&store, &a.machine, Some(&vault))?;
    let names: Vec<String> = disks.iter().map(|d| d.name.clone()).collect();
    let md = disks
        .into_iter()
        .find(|d| d.name == a.disk)
        .with_context(|| {
            format!(
                "machine {} has no disk {} in store {} (its disks: {})",
                a.machine,
                a.disk,
                a.store,
                names.join(", ")
            )
        })?;
    let (points, _) = choose(&a.machine, std::slice::from_ref(&md), &a.point)?;
    let point = points
        .first()
        .with_context(|| format!("no {} of disk {} of {}", a.point, a.disk, a.machine))?
        .id
        .clone();
    let opts = SyncOptions {
        verify: a.verify,
        work_dir: a.work_dir.clone(),
    };
    // One bar per pass, replaced when the next pass begins.
    let shown: RefCell<Option<(Phase, ProgressBar)>> = RefCell::new(None);
    let progress = |p: &SyncProgress| {
        let mut shown = shown.borrow_mut();
        if shown.as_ref().is_none_or(|(phase, _)| *phase != p.phase) {
            if let Some((_, old)) = shown.take() {
                old.finish_and_clear();
            }
            *shown = Some((p.phase, bar(p.total_bytes, phase_name(p.phase))));
        }
        if let Some((_, pb)) = shown.as_ref() {
            pb.set_position(p.done_bytes);
        }
    };
    let r = sync_to_point(
        &store, &vault, &a.machine, &a.disk, &point, &a.target, &opts, &progress,
    )
    .with_context(|| {
        format!(
            "sync {} to disk {} of {} at point {point}",
            a.target.display(),
            a.disk,
            a.machine
        )
    });
    if let Some((_, pb)) = shown.borrow_mut().take() {
        pb.finish_and_clear();
    }
    let r = r?;
    if let MapSource::Whole { blocks_hashed } = r.map_from {
        eprintln!(
            "note: no seed's checksum map precedes the point: its checksums were made by reading {blocks_hashed} blocks"
        );
    }
    println!(
        "sync-point: {}/{} at {}: {} blocks compared, {} differed, {:.1} MiB written, {:.1} MiB fetched{}",
        a.machine,
        a.disk,
        r.point,
        r.blocks,
        r.blocks_differing,
        r.bytes_written as f64 / MIB,
        r.bytes_fetched as f64 / MIB,
        if r.identical == Some(true) {
            "; identical"
        } else {
            ""
        }
    );
    if r.identical == Some(false) {
        anyhow::bail!(
            "verify: {} does not read back equal to disk {} of {} at point {}",
            a.target.display(),
            a.disk,
            a.machine,
            r.point
        );
    }
    Ok(())
}
