//! Turning a region of a disk image into records: the zero-block test, block
//! checksums, and the comparison that makes a resync send only what differs. Seeding,
//! resync and compaction all go through `scan_region`.

use twox_hash::XxHash3_128;

/// A block checksum: xxh3-128 of the block's bytes, or all zero for a zero block.
pub type Sum = [u8; 16];
pub const ZERO_SUM: Sum = [0u8; 16];

/// True when every byte is zero. Works a word at a time; LLVM vectorises the fold.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|b| *b == 0)
        && tail.iter().all(|b| *b == 0)
        && words
            .chunks(16)
            .all(|c| c.iter().fold(0u128, |a, w| a | w) == 0)
}

pub fn block_sum(block: &[u8]) -> Sum {
    if is_zero(block) {
        return ZERO_SUM;
    }
    let s = XxHash3_128::oneshot(block).to_le_bytes();
    // A real digest of all zero bytes would read as a zero block; flip a bit instead.
    if s == ZERO_SUM {
        let mut s = s;
        s[0] = 1;
        return s;
    }
    s
}

/// What a scan found in a run of consecutive blocks.
#[derive(Debug, PartialEq, Eq)]
pub enum Run<'a> {
    Data { offset: u64, data: &'a [u8] },
    Zero { offset: u64, len: u64 },
}

/// Scans `region` (which starts at disk offset `start`, a multiple of `block_bytes`)
/// block by block, writing each block's checksum into `sums` (one per block) and
/// calling `emit` for maximal runs of blocks to send:
/// - with `old` = None (a full copy): every non-zero block, as data;
/// - with `old` = Some(sums of the replica): every block whose checksum differs, as
///   data, or as a hole when it is now zero.
///
/// Runs are cut at `max_run` bytes so a record fits the caller's chunking.
pub fn scan_region<'a>(
    region: &'a [u8],
    start: u64,
    block_bytes: usize,
    old: Option<&[Sum]>,
    sums: &mut [Sum],
    max_run: usize,
    emit: impl FnMut(Run<'a>),
) {
    scan_region_holes(region, start, block_bytes, old, sums, max_run, &[], emit);
}

/// As `scan_region`, where `holes[i]` true says block i is known to be zero (a hole of
/// the image file): it is neither tested nor hashed, and its bytes in `region` are
/// never read, so the reader need not fill them. Blocks past `holes`' end are scanned.
#[allow(clippy::too_many_arguments)]
pub fn scan_region_holes<'a>(
    region: &'a [u8],
    start: u64,
    block_bytes: usize,
    old: Option<&[Sum]>,
    sums: &mut [Sum],
    max_run: usize,
    holes: &[bool],
    mut emit: impl FnMut(Run<'a>),
) {
    debug_assert_eq!(sums.len(), region.len().div_ceil(block_bytes));
    // (first byte, end byte, is_data) of the run being built
    let mut run: Option<(usize, usize, bool)> = None;
    let flush = |run: &mut Option<(usize, usize, bool)>, emit: &mut dyn FnMut(Run<'a>)| {
        if let Some((a, b, data)) = run.take() {
            if data {
                emit(Run::Data {
                    offset: start + a as u64,
                    data: &region[a..b],
                });
            } else {
                emit(Run::Zero {
                    offset: start + a as u64,
                    len: (b - a) as u64,
                });
            }
        }
    };
    for (i, block) in region.chunks(block_bytes).enumerate() {
        let sum = match holes.get(i) {
            Some(true) => ZERO_SUM,
            _ => block_sum(block),
        };
        sums[i] = sum;
        let send = match old {
            None => sum != ZERO_SUM,
            Some(old) => old.get(i).copied().unwrap_or(ZERO_SUM) != sum,
        };
        let a = i * block_bytes;
        let b = a + block.len();
        let is_data = sum != ZERO_SUM;
        match (&mut run, send) {
            (Some((ra, rb, rd)), true)
                if *rb == a && *rd == is_data && (!is_data || b - *ra <= max_run) =>
            {
                *rb = b;
            }
            (_, true) => {
                flush(&mut run, &mut emit);
                run = Some((a, b, is_data));
            }
            (_, false) => flush(&mut run, &mut emit),
        }
    }
    flush(&mut run, &mut emit);
}

#[cfg(test)]
mod tests {
    #[test]
    fn block_sums_are_xxh3_128_as_the_reference_computes_it() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Lengths across every branch of XXH3 (short, mid, long, past a stripe block).
        for len in [
            1,
            3,
            16,
            17,
            128,
            129,
            240,
            241,
            1024,
            4096,
            65536,
            65537,
            1 << 20,
        ] {
            let mut b = vec![0u8; len];
            rng.fill(&mut b[..]);
            b[0] |= 1;
            let want = xxhash_rust::xxh3::xxh3_128(&b).to_le_bytes();
            assert_eq!(block_sum(&b), want, "length {len}");
        }
    }

    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        for i in [0, 17, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v));
            v[i] = 0;
        }
    }

    #[test]
    fn full_copy_skips_zero_blocks_and_coalesces() {
        let bs = 4;
        let region = [1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4];
        let mut sums = vec![ZERO_SUM; 5];
        let mut runs = Vec::new();
        scan_region(&region, 100, bs, None, &mut sums, 1 << 20, |r| runs.push(r));
        assert_eq!(
            runs,
            vec![
                Run::Data {
                    offset: 100,
                    data: &region[0..4]
                },
                Run::Data {
                    offset: 108,
                    data: &region[8..18]
                },
            ]
        );
        assert_eq!(sums[1], ZERO_SUM);
        // Against itself nothing differs; a block turned zero becomes a hole.
        let mut again = vec![ZERO_SUM; 5];
        let mut changed = region;
        changed[8..12].copy_from_slice(&[0; 4]);
        let mut runs = Vec::new();
        scan_region(&changed, 100, bs, Some(&sums), &mut again, 1 << 20, |r| {
            runs.push(r)
        });
        assert_eq!(
            runs,
            vec![Run::Zero {
                offset: 108,
                len: 4
            }]
        );
    }

    #[test]
    fn blocks_known_as_holes_are_zero_whatever_they_hold() {
        let bs = 4;
        // Block 1 holds stale bytes the reader did not clear: it is a hole.
        let region = [1, 1, 1, 1, 9, 9, 9, 9, 2, 2, 2, 2];
        let holes = [false, true, false];
        let mut sums = vec![ZERO_SUM; 3];
        let mut runs = Vec::new();
        scan_region_holes(&region, 0, bs, None, &mut sums, 1 << 20, &holes, |r| {
            runs.push(r)
        });
        assert_eq!(sums[1], ZERO_SUM);
        assert_eq!(
            runs,
            vec![
                Run::Data {
                    offset: 0,
                    data: &region[0..4]
                },
                Run::Data {
                    offset: 8,
                    data: &region[8..12]
                },
            ]
        );
    }
}
