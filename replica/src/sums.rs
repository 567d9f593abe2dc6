//! Checksum maps: the block checksums of a disk at a recovery point, sealed like any
//! other object (checksums of plaintext would otherwise reveal which blocks are equal).
//! A resync compares the source's blocks against the map of the replica's latest point
//! instead of reading the replica back.
//!
//! Plaintext: block_bytes u64 LE | disk_bytes u64 LE | ceil(disk_bytes / block_bytes)
//! checksums of 16 bytes (xxh3-128 LE, all zero for a zero block).

use std::path::Path;

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::keys::random_hex;
use crate::object::{open_object, Expect, ObjectKind, OpenContext, SealContext};
use crate::rebuild::{rebuild, FileSink};
use crate::record::ObjectBuilder;
use crate::scan::{block_sum, Sum};
use crate::state::DiskState;

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
        let bytes = self.seal_as(disk, ctx, &object)?;
        Ok((object, bytes))
    }

    /// Seals the map under the name `object` (of `disk`'s paths).
    pub fn seal_as(&self, disk: &Disk, ctx: &mut SealContext, object: &str) -> Result<Vec<u8>> {
        let mut b = ObjectBuilder::new(ctx, disk.key()?, &disk.disk_id, ObjectKind::Sums, object);
        b.raw(&self.header());
        b.raw(self.sums.as_flattened());
        Ok(b.finish())
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
        Self::parse(object, &plain)
    }

    /// The plaintext's first 16 bytes; the checksums follow.
    pub fn header(&self) -> [u8; 16] {
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&self.block_bytes.to_le_bytes());
        head[8..].copy_from_slice(&self.disk_bytes.to_le_bytes());
        head
    }

    /// Reads a map from its opened plaintext; errors name `object`.
    pub fn parse(object: &str, plain: &[u8]) -> Result<BlockSums> {
        let bad = |r: &str| Error::corrupt(object, r.to_string());
        if plain.len() < 16 || !(plain.len() - 16).is_multiple_of(16) {
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

impl BlockSums {
    /// The checksums of the replica holding every write below `seq`, `disk_bytes`
    /// long: a point's checksum map when one describes exactly that state (no write
    /// between the point and `seq`), else hashed from a rebuild into a sparse scratch
    /// file in `scratch_dir` (deleted on return).
    pub fn of_replica(
        disk: &Disk,
        state: &DiskState,
        seq: u64,
        disk_bytes: u64,
        scratch_dir: &Path,
    ) -> Result<BlockSums> {
        let bs = disk.info.block_bytes;
        for p in state.points.iter().rev() {
            let Some(object) = &p.sums else { continue };
            let unchanged = p.seq <= seq
                && p.disk_bytes == disk_bytes
                && state.base.as_ref().is_none_or(|b| b.seq <= p.seq)
                && state
                    .segments
                    .iter()
                    .all(|s| s.last_seq < p.seq || s.first_seq >= seq);
            if unchanged {
                let map = disk.store.block(BlockSums::load(disk, object))?;
                if map.block_bytes == bs && map.disk_bytes == disk_bytes {
                    return Ok(map);
                }
            }
        }
        let name = "checksum scratch file";
        let tmp = tempfile::tempfile_in(scratch_dir).map_err(|e| Error::io("create", name, e))?;
        tmp.set_len(disk_bytes)
            .map_err(|e| Error::io("size", name, e))?;
        let sink = FileSink {
            file: &tmp,
            path: name.into(),
        };
        rebuild(disk, state, seq, disk_bytes, &sink, &|_| {})?;
        let mut sums = Vec::with_capacity(Self::blocks_for(disk_bytes, bs));
        let mut buf = vec![0u8; bs as usize];
        let mut at = 0;
        while at < disk_bytes {
            let n = bs.min(disk_bytes - at) as usize;
            std::os::unix::fs::FileExt::read_exact_at(&tmp, &mut buf[..n], at)
                .map_err(|e| Error::io("read", name, e))?;
            sums.push(block_sum(&buf[..n]));
            at += n as u64;
        }
        Ok(BlockSums {
            block_bytes: bs,
            disk_bytes,
            sums,
        })
    }
}
