//! Reading a disk image or block device by extent.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ferry_replica::{Error, Result};

/// An open source disk: a regular file or a block device.
pub struct Image {
    file: File,
    path: String,
    pub size: u64,
}

impl Image {
    pub fn open(path: &Path) -> Result<Image> {
        let shown = path.display().to_string();
        let mut file = File::open(path).map_err(|e| Error::io("open image", &shown, e))?;
        let size = ferry_replica::local::disk_size(&mut file, path)?;
        Ok(Image {
            file,
            path: shown,
            size,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("read image", &self.path, e))
    }
}
