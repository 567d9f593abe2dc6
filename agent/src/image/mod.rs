//! Reading a disk image or block device by extent: through a read-only map where the
//! kernel allows one (`map`), else with positional reads; holes found with SEEK_DATA /
//! SEEK_HOLE are never read.

mod map;

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
    map: Option<map::Map>,
}

impl Image {
    pub fn open(path: &Path) -> Result<Image> {
        let shown = path.display().to_string();
        let mut file = File::open(path).map_err(|e| Error::io("open image", &shown, e))?;
        let size = ferry_replica::local::disk_size(&mut file, path)?;
        Ok(Image {
            map: map::Map::new(&file, size),
            file,
            path: shown,
            size,
        })
    }

    /// Opens the image without a map: every read is a `pread` (the tests compare the
    /// two ways).
    pub fn open_unmapped(path: &Path) -> Result<Image> {
        let mut image = Image::open(path)?;
        image.map = None;
        Ok(image)
    }

    /// The `len` bytes at `offset`, with `holes` set as `read_holes_at` sets them
    /// (whole blocks of `block` bytes in a hole: their bytes are not to be used). Taken
    /// straight from the map when there is one (`buf` untouched), else read into
    /// `buf`. Fails, naming the image, where the file is shorter than it was when
    /// opened.
    pub fn view_holes_at<'a>(
        &'a self,
        buf: &'a mut Vec<u8>,
        offset: u64,
        len: usize,
        block: usize,
        holes: &mut Vec<bool>,
    ) -> Result<&'a [u8]> {
        let Some(map) = &self.map else {
            buf.resize(len, 0);
            self.read_holes_at(buf, offset, block, holes)?;
            return Ok(buf);
        };
        let at = usize::try_from(offset).map_err(|_| self.past_end(offset + len as u64))?;
        self.walk(offset, len, block, holes, |a, b, is_data| {
            if !is_data {
                // A partly-hole block reads the hole's zeros from the map.
                return Ok(());
            }
            map.populate(at + a, at + b)
                .map_err(|e| Error::io("read image", &self.path, e))
        })?;
        self.check_whole()?;
        Ok(&map.bytes()[at..at + len])
    }

    /// Fails if a page of the map was found past the file's end: the image shrank
    /// while it was read, and what was read of it since reads as zeros. Called after
    /// using a view, before anything made of it is kept.
    pub fn check_whole(&self) -> Result<()> {
        match &self.map {
            Some(m) if m.shrunk() => Err(Error::io(
                "read image",
                &self.path,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "it became shorter than {} bytes while it was read: an image must not change during a seed",
                        self.size
                    ),
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Done with the view of `len` bytes at `offset`: its pages leave this process's
    /// resident set (they stay in the page cache). Nothing to do without a map.
    pub fn release(&self, offset: u64, len: usize) {
        if let (Some(map), Ok(at)) = (&self.map, usize::try_from(offset)) {
            map.release(at, at.saturating_add(len));
        }
    }

    fn past_end(&self, end: u64) -> Error {
        // Past the end a hole query answers "no data": that must not read as zeros.
        let e = std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{end} is past the end ({})", self.size),
        );
        Error::io("read image", &self.path, e)
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
        self.walk(offset, buf.len(), block, holes, |a, b, is_data| {
            if is_data {
                self.read_at(&mut buf[a..b], offset + a as u64)
            } else {
                buf[a..b].fill(0);
                Ok(())
            }
        })
    }

    /// Walks `[offset, offset + len)` as data and hole ranges (buffer positions, from
    /// 0), calling `each(a, b, is_data)` in order, except for the parts of holes that
    /// are whole blocks of `block` bytes: those are marked in `holes` (resized to the
    /// range's blocks) instead. `block` 0 passes every hole to `each`. Where the file
    /// cannot say where its holes are, the rest is one data range.
    fn walk(
        &self,
        offset: u64,
        len: usize,
        block: usize,
        holes: &mut Vec<bool>,
        mut each: impl FnMut(usize, usize, bool) -> Result<()>,
    ) -> Result<()> {
        holes.clear();
        if block > 0 {
            holes.resize(len.div_ceil(block), false);
        }
        // The hole [a, b), but for the whole blocks inside it.
        let mut hole =
            |a: usize, b: usize, each: &mut dyn FnMut(usize, usize, bool) -> Result<()>| {
                if a == b {
                    return Ok(());
                }
                if block == 0 {
                    return each(a, b, false);
                }
                let first = a.div_ceil(block);
                // The last block may be short: it is whole when the hole reaches the end.
                let last = if b == len {
                    b.div_ceil(block)
                } else {
                    b / block
                };
                if first >= last {
                    return each(a, b, false);
                }
                if a < first * block {
                    each(a, first * block, false)?;
                }
                holes[first..last].fill(true);
                let tail = (last * block).min(len);
                if tail < b {
                    each(tail, b, false)?;
                }
                Ok(())
            };
        let end = offset + len as u64;
        if end > self.size {
            return Err(self.past_end(end));
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
                Err(_) => return each(at(pos), len, true),
            };
            hole(at(pos), at(data), &mut each)?;
            if data == end {
                break;
            }
            let next = match seek(fd, data, libc::SEEK_HOLE) {
                Ok(h) if h > data => h.min(end),
                _ => end,
            };
            each(at(data), at(next), true)?;
            pos = next;
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

    /// A sparse file of `size` bytes with data at the start, `middle` bytes of data at
    /// 300,000 and 100 bytes at the very end; holes between (where the file system
    /// keeps them).
    fn sparse_file(dir: &Path, name: &str, size: u64, middle: usize) -> std::path::PathBuf {
        let path = dir.join(name);
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&[1u8; 5000], 0).unwrap();
        f.write_all_at(&vec![2u8; middle], 300_000).unwrap();
        f.write_all_at(&[3u8; 100], size - 100).unwrap();
        path
    }

    #[test]
    fn a_sparse_read_equals_a_plain_read_whatever_the_buffer_held() {
        let dir = tempfile::tempdir().unwrap();
        // Data in the middle crosses a 4 KiB page.
        let path = sparse_file(dir.path(), "sparse.img", 1 << 20, 9000);
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
    fn a_mapped_view_equals_a_plain_read_and_marks_the_same_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path(), "view.img", 4 << 20, 200_000);
        let block = 64 << 10;
        let mapped = Image::open(&path).unwrap();
        assert!(mapped.map.is_some(), "a regular file is mapped");
        let plain = Image::open_unmapped(&path).unwrap();
        for (offset, len) in [(0, 4 << 20), (4096, 400_000), (65536, 1 << 20)] {
            let (mut b1, mut b2) = (Vec::new(), vec![0xeeu8; 7]);
            let (mut h1, mut h2) = (Vec::new(), Vec::new());
            let v1 = mapped
                .view_holes_at(&mut b1, offset, len, block, &mut h1)
                .unwrap();
            let in_map = &mapped.map.as_ref().unwrap().bytes()[offset as usize..];
            assert!(
                std::ptr::eq(v1.as_ptr(), in_map.as_ptr()),
                "a mapped view copies nothing"
            );
            let v2 = plain
                .view_holes_at(&mut b2, offset, len, block, &mut h2)
                .unwrap();
            assert_eq!(h1, h2, "holes at {offset}");
            for (i, (a, b)) in v1.chunks(block).zip(v2.chunks(block)).enumerate() {
                if !h1[i] {
                    assert!(a == b, "block {i} at {offset}");
                }
            }
            mapped.release(offset, len);
            mapped.check_whole().unwrap();
        }
        let mut past = Vec::new();
        assert!(mapped
            .view_holes_at(&mut past, 4 << 20, 10, block, &mut Vec::new())
            .is_err());
    }

    #[test]
    fn an_image_that_shrinks_under_its_map_is_an_error_naming_it_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shrinks.img");
        let f = File::create(&path).unwrap();
        f.write_all_at(&vec![7u8; 1 << 20], 0).unwrap();
        let image = Image::open(&path).unwrap();
        assert!(image.map.is_some());
        let mut buf = Vec::new();
        let mut holes = Vec::new();
        let v = image
            .view_holes_at(&mut buf, 0, 1 << 20, 4096, &mut holes)
            .unwrap();
        assert!(v.iter().all(|b| *b == 7));
        image.release(0, 1 << 20);
        // Someone truncates the image under the seed: the pages past the new end
        // would raise SIGBUS when touched.
        f.set_len(64 << 10).unwrap();
        let map = image.map.as_ref().unwrap();
        let tail = &map.bytes()[(512 << 10)..];
        let sum: u64 = tail.iter().map(|b| *b as u64).sum();
        assert_eq!(sum, 0, "the vanished pages read as zeros");
        let e = image.check_whole().unwrap_err().to_string();
        assert!(e.contains("shrinks.img") && e.contains("shorter"), "{e}");
        // A view past the new end fails at once: populating it finds no pages.
        assert!(image
            .view_holes_at(&mut buf, 512 << 10, 4096, 4096, &mut holes)
            .is_err());
    }

    #[test]
    fn holes_reported_as_blocks_read_as_zero_and_the_rest_as_a_plain_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path(), "holes.img", 1 << 20, 9000);
        let block = 64 << 10;
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
