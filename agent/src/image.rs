//! Reading a disk image or block device by extent.

use std::fs::File;
use std::io::{Seek, SeekFrom};
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
        // A block device reports length 0 in its metadata; seeking to the end works for
        // both kinds.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io("size image", &shown, e))?;
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
