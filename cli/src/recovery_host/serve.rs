//! The serve op: each disk at its point as `ferry_agent::recover::ServedDisk` (reads
//! from the replica on demand, writes into the item's overlay), exported on the host's
//! one NBD listener as `MACHINE/DISK`.
//!
//! Each export goes through a `Gate`: removing an item closes it, so a client still
//! attached to a removed export gets errors instead of reading a disk whose files are
//! being deleted under it. Failback's last reverse round freezes it (`freeze`):
//! writes are refused as a failed-over agent's export refuses them
//! (`ReadOnlyFilesystem`), and the freeze is kept in the item's folder (`FROZEN`), so
//! that a restart serves the disk read-only again.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_agent::nbd::{Device, Piece};
use ferry_agent::recover::ServedDisk;
use ferry_link::control::wire::{DiskPoint, ReadyDisk, WorkItem, WorkResult};

use super::ops::disks_at;
use super::Host;

/// A served disk that can be shut.
pub struct Gate {
    disk: ServedDisk,
    open: AtomicBool,
    read_only: AtomicBool,
}

/// The file in a serve item's folder that says its disks take no more writes.
pub const FROZEN: &str = "frozen";

impl Gate {
    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    /// Refuses every later write (failback's freeze); reads go on.
    pub fn freeze(&self) {
        self.read_only.store(true, Ordering::SeqCst);
    }

    pub fn disk(&self) -> &ServedDisk {
        &self.disk
    }

    fn check_write(&self) -> io::Result<()> {
        self.check()?;
        if self.read_only.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::ReadOnlyFilesystem,
                format!(
                    "disk {} is frozen for failback: it takes no more writes",
                    self.disk.name()
                ),
            ));
        }
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        if self.open.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "disk {} is no longer served: its item was removed",
                self.disk.name()
            )))
        }
    }
}

impl Device for Gate {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check()?;
        self.disk.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.check_write()?;
        self.disk.write(offset, data, fua)
    }
    fn zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_write()?;
        self.disk.zero(offset, len, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.check()?;
        self.disk.flush()
    }
    fn pieces(&self, offset: u64, len: u64) -> Option<Vec<Piece<'_>>> {
        // A removed item's read goes the usual way, to be refused there.
        self.check().ok()?;
        self.disk.pieces(offset, len)
    }
}

/// An item's exports: each name and the gate before its disk.
pub type Exported = Vec<(String, Arc<Gate>)>;

/// The export name of a machine's disk.
pub fn export_name(machine: &str, disk: &str) -> String {
    format!("{machine}/{disk}")
}

/// Opens and exports every disk; on an error nothing of this item stays exported.
pub fn serve(
    host: &Host,
    item: &WorkItem,
    disks: &[DiskPoint],
    dir: &Path,
) -> Result<(WorkResult, Exported), String> {
    let chosen = disks_at(host, &item.machine, disks)?;
    let overlay = dir.join("overlay");
    let mut opened = Vec::with_capacity(chosen.len());
    for (md, point) in chosen {
        let name = md.name.clone();
        let disk = ServedDisk::open(
            &name,
            md.disk,
            &md.state,
            &point,
            &overlay,
            host.cache_extents,
        )
        .map_err(|e| {
            format!(
                "serving disk {name} of {} at point {}: {e}",
                item.machine, point.id
            )
        })?;
        opened.push((point, disk));
    }
    let frozen = dir.join(FROZEN).exists();
    let mut gates: Exported = Vec::with_capacity(opened.len());
    let mut ready = Vec::with_capacity(opened.len());
    for (point, disk) in opened {
        let name = export_name(&item.machine, disk.name());
        let bytes = disk.size();
        let disk_name = disk.name().to_string();
        let gate = Arc::new(Gate {
            disk,
            open: AtomicBool::new(true),
            read_only: AtomicBool::new(frozen),
        });
        if !host.exports.insert(&name, gate.clone()) {
            for (n, g) in &gates {
                g.close();
                host.exports.remove(n);
            }
            return Err(format!(
                "export {name} is already served by another item: remove that one first"
            ));
        }
        ready.push(ReadyDisk {
            disk: disk_name,
            point: point.id,
            path: None,
            nbd_url: Some(format!("nbd://{}/{name}", host.nbd_address)),
            bytes,
        });
        gates.push((name, gate));
    }
    Ok((
        WorkResult {
            disks: ready,
            ..WorkResult::default()
        },
        gates,
    ))
}
