//! `ferry serve-point`: every disk of a machine at a recovery point, served over NBD at
//! once (instant recovery); reads fetch only what they cover, writes go to a local
//! overlay, and `--hydrate` copies the rest in the background. The serving itself is
//! `ferry_agent::recover`; this file chooses the point, prints the URLs, drives
//! hydration and keeps `DIR/status.json` current for scripts and tests.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_agent::nbd::{serve, Exports};
use ferry_agent::recover::ServedDisk;
use ferry_controlplane::recovery::failover;
use ferry_controlplane::recovery::points::PointSpec;
use ferry_replica::{Store, VaultKey};

/// A failed extent copy is retried after this (the store may be briefly unreachable).
const HYDRATE_RETRY: Duration = Duration::from_secs(2);

#[derive(clap::Args)]
pub struct ServePointArgs {
    /// Blob store: file:///abs/path, az://container or s3://bucket
    #[arg(long, value_name = "URL")]
    store: String,
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    #[arg(long)]
    machine: String,
    /// latest, latest-app, a point id, or an RFC 3339 time (the newest point at or
    /// before it)
    #[arg(long, default_value = "latest")]
    point: PointSpec,
    /// Where the NBD server listens (port 0: any free port; the URLs printed say which)
    #[arg(long, value_name = "ADDR")]
    nbd_listen: String,
    /// The overlay (writes since the point, journaled), the decoded log, the hydrated
    /// copy and status.json; kept across restarts at the same point
    #[arg(long, value_name = "DIR")]
    overlay_dir: PathBuf,
    /// Copy every base extent locally in the background, so reads stop touching the
    /// store; a restart resumes where it stopped
    #[arg(long)]
    hydrate: bool,
    /// Decoded extents kept in memory per disk (16 MiB each by default)
    #[arg(long, default_value_t = 32)]
    cache_extents: usize,
}

fn status_json(machine: &str, urls: &[String], hydrate: bool, disks: &[Arc<ServedDisk>]) -> String {
    let list: Vec<serde_json::Value> = disks
        .iter()
        .map(|d| {
            let s = d.status();
            serde_json::json!({
                "disk": s.disk,
                "point": s.point,
                "disk_bytes": s.disk_bytes,
                "extents": s.extents,
                "hydrated_extents": s.hydrated_extents,
                "fetched_objects": s.fetched_objects,
                "overlay_bytes": s.overlay_bytes,
            })
        })
        .collect();
    let hydrated = disks.iter().all(|d| d.to_hydrate().is_empty());
    serde_json::json!({
        "machine": machine,
        "nbd": urls,
        "hydrate": hydrate,
        "hydrated": hydrated,
        "disks": list,
    })
    .to_string()
}

/// Replaces DIR/status.json whole (written aside, then renamed), so a reader never
/// sees half of it.
fn write_status(dir: &Path, text: &str) -> Result<()> {
    let tmp = dir.join("status.json.tmp");
    let path = dir.join("status.json");
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))
}

fn hydrate(disks: &[Arc<ServedDisk>]) {
    for d in disks {
        let left = d.to_hydrate();
        let total = d.status().extents;
        for idx in left {
            loop {
                match d.hydrate_extent(idx) {
                    Ok(()) => break,
                    Err(e) => {
                        eprintln!("hydrate {}: extent {idx}: {e} (retrying)", d.name());
                        std::thread::sleep(HYDRATE_RETRY);
                    }
                }
            }
            let s = d.status();
            eprintln!(
                "hydrate {}: {}/{total} extents ({}%)",
                d.name(),
                s.hydrated_extents,
                (s.hydrated_extents * 100).checked_div(total).unwrap_or(100)
            );
        }
    }
    eprintln!("hydrated: every read is now served locally");
}

/// Whether choosing the point failed because the store could not be read (gone,
/// unreachable, emptied), not because of what was asked (a point, a key).
fn store_gone(e: &ferry_controlplane::error::Error) -> bool {
    use ferry_controlplane::error::Error as E;
    match e {
        E::NoMachine { .. } => true,
        E::Replica(r) => r.is_missing() || matches!(r, ferry_replica::Error::Store { .. }),
        _ => false,
    }
}

/// The disks of `machine` that `dir` serves, by their `{disk}.point.json` files.
fn local_disks(dir: &Path, machine: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let disk = name.strip_suffix(".point.json")?.to_string();
            let bytes = std::fs::read(dir.join(&name)).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            (v["machine"] == machine).then_some(disk)
        })
        .collect();
    names.sort();
    names
}

/// Every disk of the machine at the point `dir` holds, from `dir` alone: for a
/// restart while the store is unreachable, once hydration finished.
fn open_local(a: &ServePointArgs) -> Result<Vec<Arc<ServedDisk>>> {
    let names = local_disks(&a.overlay_dir, &a.machine);
    anyhow::ensure!(
        !names.is_empty(),
        "{} serves no disk of {}",
        a.overlay_dir.display(),
        a.machine
    );
    names
        .iter()
        .map(|n| {
            Ok(Arc::new(ServedDisk::open_local(
                n,
                &a.overlay_dir,
                a.cache_extents,
            )?))
        })
        .collect()
}

pub fn run(a: ServePointArgs) -> Result<()> {
    let vault = VaultKey::load(&a.key_file)?;
    let store = Store::open(&a.store)?;
    let disks = match failover::plan(&store, &vault, &a.machine, &a.point) {
        Ok(plan) => {
            if let Some(note) = &plan.note {
                eprintln!("note: {note}");
            }
            let mut disks = Vec::new();
            for (md, point) in plan.disks {
                let name = md.name.clone();
                let served = ServedDisk::open(
                    &name,
                    md.disk,
                    &md.state,
                    &point,
                    &a.overlay_dir,
                    a.cache_extents,
                )
                .with_context(|| {
                    format!("serve disk {name} of {} at point {}", a.machine, point.id)
                })?;
                disks.push(Arc::new(served));
            }
            disks
        }
        // The store cannot be read: a directory that holds every disk whole (log
        // index saved, every extent hydrated) serves on without it.
        Err(e) if store_gone(&e) && !local_disks(&a.overlay_dir, &a.machine).is_empty() => {
            match open_local(&a) {
                Ok(disks) => {
                    eprintln!(
                        "note: the store: {e}; serving {} from {} alone (hydrated)",
                        a.machine,
                        a.overlay_dir.display()
                    );
                    disks
                }
                Err(local) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "and {} cannot serve without the store: {local:#}",
                        a.overlay_dir.display()
                    )))
                }
            }
        }
        Err(e) => return Err(e.into()),
    };
    let listener = TcpListener::bind(&a.nbd_listen)
        .with_context(|| format!("listen for NBD on {}", a.nbd_listen))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("address of {}", a.nbd_listen))?;
    let mut exports = Exports::default();
    for d in &disks {
        exports.add(d.name(), d.clone());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let exports = Arc::new(exports);
    std::thread::Builder::new()
        .name("ferry-nbd-accept".into())
        .spawn(move || serve(listener, exports, stop))
        .context("start the NBD server")?;
    let urls: Vec<String> = disks
        .iter()
        .map(|d| format!("nbd://{addr}/{}", d.name()))
        .collect();
    // A reader that took the lines it wanted and closed the pipe does not stop the
    // serving: the URLs are also in status.json.
    let mut out = std::io::stdout().lock();
    let printed = urls
        .iter()
        .try_for_each(|u| writeln!(out, "{u}"))
        .and_then(|_| out.flush());
    drop(out);
    if let Err(e) = printed {
        tracing::warn!(error = %e, "the NBD URLs could not all be printed");
    }
    if a.hydrate {
        let disks = disks.clone();
        std::thread::Builder::new()
            .name("ferry-hydrate".into())
            .spawn(move || hydrate(&disks))
            .context("start hydration")?;
    }
    // Served until killed: the overlay is durable at every flush, so a kill loses
    // only what NBD never promised.
    loop {
        write_status(
            &a.overlay_dir,
            &status_json(&a.machine, &urls, a.hydrate, &disks),
        )?;
        std::thread::sleep(Duration::from_millis(500));
    }
}
