//! Output images for failover: a sparse raw file, or the same with a fixed-VHD footer.

mod vhd;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub use vhd::{footer, VHD_FOOTER_BYTES};

/// Azure requires a managed disk's VHD to be a whole number of MiB.
pub const VHD_ALIGN: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Vhd,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "vhd" => Ok(Format::Vhd),
            other => Err(format!("unknown format {other:?}; expected raw or vhd")),
        }
    }
}

/// An output image being written: data goes to offsets 0..disk_bytes.
pub struct Output {
    pub file: File,
    pub path: PathBuf,
    pub format: Format,
    pub disk_bytes: u64,
}

impl Output {
    /// Creates (or truncates) `dir/name.ext` as a hole of `disk_bytes`.
    pub fn create(dir: &Path, name: &str, format: Format, disk_bytes: u64) -> Result<Output> {
        let path = dir.join(format!("{name}.{}", format.extension()));
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io("create", &shown, e))?;
        file.set_len(disk_bytes)
            .map_err(|e| Error::io("size", &shown, e))?;
        Ok(Output {
            file,
            path,
            format,
            disk_bytes,
        })
    }

    pub fn shown(&self) -> String {
        self.path.display().to_string()
    }

    /// The size a VHD's data area gets: Azure takes only whole MiB, so a disk of
    /// another size is padded with zeroes at its end.
    pub fn vhd_data_bytes(disk_bytes: u64) -> u64 {
        disk_bytes.div_ceil(VHD_ALIGN) * VHD_ALIGN
    }

    /// Appends the VHD footer if needed and makes the file durable.
    pub fn finish(self) -> Result<PathBuf> {
        let shown = self.shown();
        if self.format == Format::Vhd {
            let data = Self::vhd_data_bytes(self.disk_bytes);
            let f = footer(data, chrono::Utc::now());
            std::os::unix::fs::FileExt::write_all_at(&self.file, &f, data)
                .map_err(|e| Error::io("write VHD footer", &shown, e))?;
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io("sync", &shown, e))?;
        Ok(self.path)
    }
}
