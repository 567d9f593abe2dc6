//! Reading a disk image or block device by extent.

use std::fs::File;
use std::os::fd::AsRawFd;
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

    /// Reads `buf.len()` bytes at `offset` as `read_at` does, but zero-fills the file's
    /// holes (found with SEEK_DATA / SEEK_HOLE) instead of reading them: a sparse image
    /// file is often half holes, and reading one costs the kernel a zeroed page-cache
    /// page and a copy per page (a third of a checksum resync's CPU, profiled). Where
    /// the file cannot say (a block device reports all data; some file systems refuse
    /// the query) every byte is read.
    ///
    /// With `block` > 0, the blocks of `block` bytes (counted from `offset`)
    /// that lie wholly in holes are neither filled nor read: `holes[i]` is set true for
    /// each such block i (`holes` is resized to the buffer's blocks), and its bytes in
    /// `buf` are left as they were. Zero-filling them and testing them for zero again
    /// was about 3 % of a first seed's CPU. `block` 0 fills every hole.
    pub fn read_holes_at(
        &self,
        buf: &mut [u8],
        offset: u64,
        block: usize,
        holes: &mut Vec<bool>,
    ) -> Result<()> {
        holes.clear();
        if block > 0 {
            holes.resize(buf.len().div_ceil(block), false);
        }
        // Fills the hole [a, b) of `buf`, but for the whole blocks inside it.
        let mut fill = |buf: &mut [u8], a: usize, b: usize| {
            if block == 0 {
                buf[a..b].fill(0);
                return;
            }
            let first = a.div_ceil(block);
            // The last block may be short: it is whole when the hole reaches the end.
            let last = if b == buf.len() {
                b.div_ceil(block)
            } else {
                b / block
            };
            if first >= last {
                buf[a..b].fill(0);
                return;
            }
            buf[a..first * block].fill(0);
            holes[first..last].fill(true);
            let tail = (last * block).min(buf.len());
            buf[tail..b.max(tail)].fill(0);
        };
        let end = offset + buf.len() as u64;
        if end > self.size {
            // Past the end a hole query answers "no data": that must not read as zeros.
            let e = std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{end} is past the end ({})", self.size),
            );
            return Err(Error::io("read image", &self.path, e));
        }
        let fd = self.file.as_raw_fd();
        let at = |pos: u64| (pos - offset) as usize;
        let mut pos = offset;
        while pos < end {
            // The file offset these move is never used: reads are positional.
            let data = match seek(fd, pos, libc::SEEK_DATA) {
                Ok(d) => d.clamp(pos, end),
                // No data from here to the end of the file.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(_) => return self.read_at(&mut buf[at(pos)..], pos),
            };
            fill(buf, at(pos), at(data));
            if data == end {
                break;
            }
            let hole = match seek(fd, data, libc::SEEK_HOLE) {
                Ok(h) if h > data => h.min(end),
                _ => end,
            };
            self.read_at(&mut buf[at(data)..at(hole)], data)?;
            pos = hole;
        }
        Ok(())
    }
}

fn seek(fd: std::os::fd::RawFd, pos: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let pos = libc::off_t::try_from(pos).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek on a descriptor this Image owns for as long as the call.
    let r = unsafe { libc::lseek(fd, pos, whence) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_read_equals_a_plain_read_whatever_the_buffer_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let f = File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        // Data at the start, in the middle across a 4 KiB page, and at the very end;
        // holes between (where the file system keeps them).
        f.write_all_at(&[1u8; 5000], 0).unwrap();
        f.write_all_at(&[2u8; 9000], 300_000).unwrap();
        f.write_all_at(&[3u8; 100], (1 << 20) - 100).unwrap();
        drop(f);
        let image = Image::open(&path).unwrap();
        for (offset, len) in [
            (0, 1 << 20),
            (4096, 400_000),
            (299_000, 700_000),
            (500_000, 8192),
        ] {
            let mut plain = vec![0u8; len];
            image.read_at(&mut plain, offset).unwrap();
            // A reused buffer holds the last extent's bytes: holes must be cleared.
            let mut sparse = vec![0xeeu8; len];
            image
                .read_holes_at(&mut sparse, offset, 0, &mut Vec::new())
                .unwrap();
            assert!(plain == sparse, "offset {offset} len {len}");
        }
        let mut past = vec![0u8; 10];
        assert!(
            image
                .read_holes_at(&mut past, 1 << 20, 0, &mut Vec::new())
                .is_err(),
            "past the end"
        );
    }

    #[test]
    fn holes_reported_as_blocks_read_as_zero_and_the_rest_as_a_plain_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holes.img");
        let f = File::create(&path).unwrap();
        let block = 64 << 10;
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 5000], 0).unwrap();
        f.write_all_at(&[2u8; 9000], 300_000).unwrap();
        f.write_all_at(&[3u8; 100], (1 << 20) - 100).unwrap();
        drop(f);
        let image = Image::open(&path).unwrap();
        for (offset, len) in [(0, 1 << 20), (4096, 400_000), (65536, 700_000)] {
            let mut plain = vec![0u8; len];
            image.read_at(&mut plain, offset).unwrap();
            let mut got = vec![0xeeu8; len];
            let mut holes = Vec::new();
            image
                .read_holes_at(&mut got, offset, block, &mut holes)
                .unwrap();
            assert_eq!(holes.len(), len.div_ceil(block));
            for (i, (p, g)) in plain.chunks(block).zip(got.chunks(block)).enumerate() {
                if holes[i] {
                    assert!(p.iter().all(|b| *b == 0), "block {i} of {offset} is a hole");
                } else {
                    assert!(p == g, "block {i} at offset {offset}");
                }
            }
        }
    }
}
