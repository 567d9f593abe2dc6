//! A disk file as an NBD device: positional reads and writes, fdatasync for FLUSH and
//! FUA, punched-and-zeroed ranges for TRIM and WRITE_ZEROES.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::server::{Device, Piece};

pub struct FileDevice {
    file: File,
    size: u64,
}

impl FileDevice {
    pub fn open(path: &Path) -> io::Result<FileDevice> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
        // Seeking, not metadata: a block device's metadata says 0 bytes.
        let size = ferry_replica::local::disk_size(&mut file, path).map_err(io::Error::other)?;
        Ok(FileDevice { file, size })
    }
}

impl Device for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        ferry_replica::rebuild::zero_range(&self.file, offset, len)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn pieces(&self, offset: u64, len: u64) -> Option<Vec<Piece<'_>>> {
        Some(vec![Piece::File {
            file: &self.file,
            offset,
            len,
        }])
    }
}
