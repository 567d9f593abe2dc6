//! Local files that hold a disk: its size, whether a regular file or a block device,
//! and creating files and directories only their owner can read (disk data in the
//! clear must not be readable by every user of the host).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// A disk's size is counted in sectors: NBD clients and every hypervisor address it
/// in units of 512 bytes.
pub const SECTOR_BYTES: u64 = 512;

/// The mode of a file holding disk data: its owner reads and writes it.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// The mode of a directory we create for such files.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// The size of the open disk or image `file` (shown as `path`), by seeking to its end:
/// a block device's metadata says 0 bytes, while its end is its size. The file's
/// position is left at its end (callers read and write by offset). A size of 0 or one
/// that is not a whole number of sectors is refused: no hypervisor can attach it, and
/// a failover of it could not be one.
pub fn disk_size(file: &mut File, path: &Path) -> Result<u64> {
    let shown = path.display().to_string();
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io("find the size of", &shown, e))?;
    if size == 0 || !size.is_multiple_of(SECTOR_BYTES) {
        return Err(Error::Invalid(format!(
            "disk {shown}: its size is {size} bytes; a disk must be a non-zero multiple of {SECTOR_BYTES} bytes"
        )));
    }
    Ok(size)
}

/// Options that create a file with mode 0600 (before the umask), whatever else the
/// caller adds. An existing file keeps its mode.
pub fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(PRIVATE_FILE_MODE);
    o
}

/// Creates `dir` and any missing parents with mode 0700; directories that exist keep
/// their mode (an operator may have chosen it, and a parent such as /var is not ours).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn sizes_must_be_whole_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        for (len, ok) in [(0, false), (511, false), (1000, false), (4096, true)] {
            let mut f = File::create(&p).unwrap();
            f.set_len(len).unwrap();
            match disk_size(&mut f, &p) {
                Ok(n) => assert!(ok && n == len, "{len}"),
                Err(e) => {
                    assert!(!ok, "{len}: {e}");
                    let m = e.to_string();
                    assert!(m.contains(&p.display().to_string()), "{m}");
                    assert!(m.contains(&format!("{len} bytes")), "{m}");
                }
            }
        }
    }

    #[test]
    fn private_files_and_new_dirs_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let deep = dir.path().join("a/b");
        create_private_dir(&deep).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&deep), 0o700);
        // Existing directories keep their mode.
        assert_eq!(mode(dir.path()), 0o755);
        create_private_dir(&deep).unwrap();
        let f = deep.join("f");
        private_options()
            .write(true)
            .create_new(true)
            .open(&f)
            .unwrap();
        assert_eq!(mode(&f), 0o600);
    }
}
