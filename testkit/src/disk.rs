//! Disk images for tests: random content where wanted, and changes made behind an
//! agent's back (as writes a lost journal carried would leave).

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::Rng;

/// Writes a disk image of `size` bytes at `path`: random in `random`, zero elsewhere.
pub fn random_disk(path: &Path, size: u64, random: Range<usize>, rng: &mut impl Rng) {
    let mut content = vec![0u8; size as usize];
    rng.fill(&mut content[random]);
    std::fs::write(path, &content)
        .unwrap_or_else(|e| panic!("writing disk image {}: {e}", path.display()));
}

/// Overwrites one random 4 KiB piece in each of `blocks` (replica blocks of the
/// default size) of the disk image, and syncs it.
pub fn change_blocks(disk: &Path, blocks: &[u64], rng: &mut impl Rng) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .unwrap_or_else(|e| panic!("opening disk image {}: {e}", disk.display()));
    for b in blocks {
        let mut piece = [0u8; 4096];
        rng.fill(&mut piece[..]);
        let at = b * ferry_replica::DEFAULT_BLOCK_BYTES + rng.gen_range(0..16) * 4096;
        f.write_all_at(&piece, at).unwrap();
    }
    f.sync_all().unwrap();
}
