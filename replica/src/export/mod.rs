//! Output images for failover: a sparse raw file, or the same with a fixed-VHD footer.

mod vhd;

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
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
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Format::Raw),
            "vhd" => Ok(Format::Vhd),
            other => Err(Error::Invalid(format!(
                "unknown format {other:?}; expected raw or vhd"
            ))),
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
    /// Creates `dir/name.ext` as a hole of `disk_bytes`, mode 0600 (it holds the disk
    /// in the clear). A symbolic link there is never followed: it could point anywhere
    /// the operator may write. An existing file is replaced only with `overwrite`.
    pub fn create(
        dir: &Path,
        name: &str,
        format: Format,
        disk_bytes: u64,
        overwrite: bool,
    ) -> Result<Output> {
        let path = dir.join(format!("{name}.{}", format.extension()));
        let shown = path.display().to_string();
        let refuse = |kind, why: &str| Err(Error::io("create", &shown, io::Error::new(kind, why)));
        // For the message only: the open below is what guards, whatever appears.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return refuse(
                io::ErrorKind::AlreadyExists,
                "a symbolic link is there; a failover output never follows one",
            );
        }
        let mut o = crate::local::private_options();
        o.read(true).write(true).custom_flags(libc::O_NOFOLLOW);
        match overwrite {
            true => o.create(true).truncate(true),
            false => o.create_new(true),
        };
        let file = match o.open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return refuse(
                    io::ErrorKind::AlreadyExists,
                    "it exists; give --overwrite to replace it",
                )
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return refuse(
                    io::ErrorKind::AlreadyExists,
                    "a symbolic link is there; a failover output never follows one",
                )
            }
            Err(e) => return Err(Error::io("create", &shown, e)),
        };
        if overwrite {
            // A file that existed keeps its mode through O_CREAT: it is about to hold
            // the disk in the clear, so it becomes its owner's only.
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(
                crate::local::PRIVATE_FILE_MODE,
            ))
            .map_err(|e| Error::io("make private", &shown, e))?;
        }
        let out = Output {
            file,
            path,
            format,
            disk_bytes,
        };
        out.reset()?;
        Ok(out)
    }

    /// Makes the file a hole of `disk_bytes` again, for a rebuild that starts over.
    pub fn reset(&self) -> Result<()> {
        let shown = self.shown();
        self.file
            .set_len(0)
            .and_then(|_| self.file.set_len(self.disk_bytes))
            .map_err(|e| Error::io("size", &shown, e))
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
