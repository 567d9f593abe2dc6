//! `ferry reverse-send` and `ferry reverse-apply`: one round of failback's reverse
//! replication by hand. `reverse-send` seals the writes a served disk's overlay
//! journaled since its last round as a point of the reverse replica `{M}.reverse`;
//! `reverse-apply` applies that replica's points onto the home disk, which
//! `ferry sync-point` made equal to the failover point first. The work is
//! `ferry_agent::recover::reverse`; these choose the points and print one line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_agent::recover::reverse::{open_served, reverse_machine};
use ferry_agent::recover::{apply_deltas, send_delta, ApplyOptions};
use ferry_controlplane::recovery::points::{choose, open_machine, PointSpec};
use ferry_replica::{Disk, Store, VaultKey};

const MIB: f64 = (1u64 << 20) as f64;

#[derive(clap::Args)]
pub struct ReverseSendArgs {
    /// Blob store: file:///abs/path, az://container or s3://bucket
    #[arg(long, value_name = "URL")]
    store: String,
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// The forward machine (its reverse replica is MACHINE.reverse)
    #[arg(long)]
    machine: String,
    #[arg(long)]
    disk: String,
    /// serve-point's overlay directory of the disk (not while serve-point holds it)
    #[arg(long, value_name = "DIR")]
    overlay_dir: PathBuf,
    /// Where the round's cursor is kept (default: the overlay directory)
    #[arg(long, value_name = "DIR")]
    cursor_dir: Option<PathBuf>,
}

pub fn send(a: ReverseSendArgs) -> Result<()> {
    let vault = VaultKey::load(&a.key_file)?;
    let store = Store::open(&a.store)?;
    let reverse = reverse_machine(&a.machine)?;
    let served =
        open_served(&store, &vault, &a.machine, &a.disk, &a.overlay_dir).with_context(|| {
            format!(
                "open disk {} of {} served from {}",
                a.disk,
                a.machine,
                a.overlay_dir.display()
            )
        })?;
    let cursor_dir = a.cursor_dir.as_ref().unwrap_or(&a.overlay_dir);
    let r = send_delta(&served, &store, &vault, &reverse, cursor_dir)
        .with_context(|| format!("send the deltas of {}/{} to {reverse}", a.machine, a.disk))?;
    println!(
        "reverse-send: {}/{} over {} -> {reverse} point {}: {} ranges, {:.1} MiB data, {:.1} MiB zeroed, {:.1} MiB sent",
        a.machine,
        a.disk,
        served.point().id,
        r.point_id,
        r.ranges,
        r.bytes_data as f64 / MIB,
        r.bytes_zero as f64 / MIB,
        r.bytes_sent as f64 / MIB
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct ReverseApplyArgs {
    /// Blob store: file:///abs/path, az://container or s3://bucket
    #[arg(long, value_name = "URL")]
    store: String,
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// The forward machine (its reverse replica is MACHINE.reverse)
    #[arg(long)]
    machine: String,
    #[arg(long)]
    disk: String,
    /// The forward point the target was synced to (ferry sync-point) and the
    /// deltas lie over: a point id
    #[arg(long, value_name = "POINT")]
    over: String,
    /// The reverse point to apply up to: latest, a point id, or an RFC 3339 time
    #[arg(long, default_value = "latest")]
    point: PointSpec,
    /// The home disk: a regular file or a block device, not in use
    #[arg(long, value_name = "PATH")]
    target: PathBuf,
    /// Where the "applied" marker is kept (default: beside a regular file target;
    /// required for a block device)
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

pub fn apply(a: ReverseApplyArgs) -> Result<()> {
    let vault = VaultKey::load(&a.key_file)?;
    let store = Store::open(&a.store)?;
    let reverse = reverse_machine(&a.machine)?;
    let forward = store.block(Disk::open(&store, &a.machine, &a.disk, Some(&vault)))?;
    let state = store.block(forward.load_state())?;
    let over = state.point(&a.over).cloned().with_context(|| {
        format!(
            "disk {} of {} has no point {} (the point the target was synced to)",
            a.disk, a.machine, a.over
        )
    })?;
    let disks: Vec<_> = open_machine(&store, &reverse, Some(&vault))?
        .into_iter()
        .filter(|d| d.name == a.disk)
        .collect();
    anyhow::ensure!(
        !disks.is_empty(),
        "reverse replica {reverse} has no disk {} in store {}",
        a.disk,
        a.store
    );
    let (points, _) = choose(&reverse, &disks, &a.point)?;
    let up_to = points
        .first()
        .with_context(|| format!("no {} of disk {} of {reverse}", a.point, a.disk))?
        .id
        .clone();
    let opts = ApplyOptions {
        up_to: Some(up_to),
        state_dir: a.state_dir.clone(),
    };
    let r = apply_deltas(&store, &vault, &reverse, &a.disk, &over, &a.target, &opts).with_context(
        || {
            format!(
                "apply the deltas of {reverse}/{} onto {}",
                a.disk,
                a.target.display()
            )
        },
    )?;
    println!(
        "reverse-apply: {reverse}/{} over {} onto {}: {} points ({} records) applied, now at {}, {:.1} MiB written, {:.1} MiB fetched",
        a.disk,
        a.over,
        a.target.display(),
        r.points,
        r.records,
        r.applied.as_deref().unwrap_or("none"),
        r.bytes_written as f64 / MIB,
        r.bytes_fetched as f64 / MIB
    );
    Ok(())
}
