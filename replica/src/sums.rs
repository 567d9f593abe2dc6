//! Checksum maps: the block checksums of a disk at a recovery point, sealed like any
//! other object (checksums of plaintext would otherwise reveal which blocks are equal).
//! A resync compares the source's blocks against the map of the replica's latest point
//! instead of reading the replica back.
//!
//! Plaintext: block_bytes u64 LE | disk_bytes u64 LE | ceil(disk_bytes / block_bytes)
//! checksums of 16 bytes (xxh3-128 LE, all zero for a zero block).

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::keys::random_hex;
use crate::object::{open_object, Expect, ObjectKind, OpenContext, SealContext};
use crate::record::ObjectBuilder;
use crate::scan::Sum;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSums {
    pub block_bytes: u64,
    pub disk_bytes: u64,
    pub sums: Vec<Sum>,
}

impl BlockSums {
    pub fn blocks_for(disk_bytes: u64, block_bytes: u64) -> usize {
        disk_bytes.div_ceil(block_bytes) as usize
    }

    /// Seals the map; returns its object path and bytes.
    pub fn seal(&self, disk: &Disk, ctx: &mut SealContext) -> Result<(String, Vec<u8>)> {
        let object = disk.paths.sums(&random_hex(8));
        let mut b = ObjectBuilder::new(ctx, disk.key()?, &disk.disk_id, ObjectKind::Sums, &object);
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&self.block_bytes.to_le_bytes());
        head[8..].copy_from_slice(&self.disk_bytes.to_le_bytes());
        b.raw(&head);
        b.raw(self.sums.as_flattened());
        Ok((object, b.finish()))
    }

    pub async fn load(disk: &Disk, object: &str) -> Result<BlockSums> {
        let bytes = disk.store.get(object).await?;
        let mut buf: Vec<u8> = bytes.into();
        let mut plain = Vec::new();
        let expect = Expect {
            key: disk.key()?,
            disk_id: &disk.disk_id,
            kind: ObjectKind::Sums,
            name: object,
        };
        open_object(&expect, &mut buf, &mut OpenContext::default(), |c| {
            plain.extend_from_slice(c);
            Ok(())
        })?;
        let bad = |r: &str| Error::corrupt(object, r.to_string());
        if plain.len() < 16 || (plain.len() - 16) % 16 != 0 {
            return Err(bad("checksum map has a malformed length"));
        }
        let block_bytes = u64::from_le_bytes(plain[..8].try_into().unwrap_or_default());
        let disk_bytes = u64::from_le_bytes(plain[8..16].try_into().unwrap_or_default());
        if block_bytes == 0 || Self::blocks_for(disk_bytes, block_bytes) != (plain.len() - 16) / 16
        {
            return Err(bad("checksum map does not match its disk size"));
        }
        let sums = plain[16..]
            .chunks_exact(16)
            .map(|c| c.try_into().unwrap_or_default())
            .collect();
        Ok(BlockSums {
            block_bytes,
            disk_bytes,
            sums,
        })
    }
}
