//! The fixed VHD footer (Virtual Hard Disk Image Format Specification, "Hard Disk Footer
//! Format"): a fixed VHD is the raw disk followed by this 512-byte footer. Azure takes a
//! fixed VHD as a managed disk (its size must be a whole number of MiB), and qemu-img
//! reads it as format vpc.
//!
//! The creator application is "win ", as Hyper-V and Azure write it: readers such as
//! QEMU then take the disk size from the footer's current-size field rather than from
//! the CHS geometry, which cannot express most sizes exactly.

use crate::keys::random_bytes;
use chrono::{DateTime, TimeZone, Utc};

pub const VHD_FOOTER_BYTES: usize = 512;

/// CHS geometry as the specification's algorithm derives it from the size.
fn geometry(size: u64) -> (u16, u8, u8) {
    let mut total = size / 512;
    total = total.min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// The footer of a fixed VHD whose data area is `size` bytes (a multiple of 512).
pub fn footer(size: u64, now: DateTime<Utc>) -> [u8; VHD_FOOTER_BYTES] {
    let mut f = [0u8; VHD_FOOTER_BYTES];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit set
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // version 1.0
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes()); // no dynamic header
    let epoch = Utc
        .with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or(now);
    let stamp = (now - epoch).num_seconds().clamp(0, u32::MAX as i64) as u32;
    f[24..28].copy_from_slice(&stamp.to_be_bytes());
    f[28..32].copy_from_slice(b"win ");
    f[32..36].copy_from_slice(&0x000a_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    let (c, h, s) = geometry(size);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&2u32.to_be_bytes()); // fixed disk
    random_bytes(&mut f[68..84]);
    let sum: u32 = f.iter().map(|b| *b as u32).fold(0u32, u32::wrapping_add);
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_fields_and_checksum() {
        let f = footer(64 << 20, Utc::now());
        assert_eq!(&f[0..8], b"conectix");
        assert_eq!(u64::from_be_bytes(f[48..56].try_into().unwrap()), 64 << 20);
        let mut g = f;
        g[64..68].fill(0);
        let sum: u32 = g.iter().map(|b| *b as u32).sum();
        assert_eq!(u32::from_be_bytes(f[64..68].try_into().unwrap()), !sum);
        // 64 MiB: the spec's algorithm gives 963 cylinders, 8 heads, 17 sectors.
        assert_eq!(geometry(64 << 20), (963, 8, 17));
    }
}
