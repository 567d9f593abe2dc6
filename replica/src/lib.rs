//! Ferry's replica format and library: how a protected disk lives in blob storage.
//!
//! Read in flow order: `keys` (vault key, data keys), `object` (the sealed object
//! format), `record` (write records inside objects), `scan` (zero blocks, checksums,
//! what a resync sends), `sums` (checksum maps), `meta` and `layout` (metadata objects
//! and where they live), `store` (object_store on its own runtime), `disk` and `state`
//! (commit protocol and the fold over commit records), `grace` (how long a writer may
//! take to commit what it put), `writer`, `rebuild`, `export` (the failover output
//! files a rebuild writes: sparse raw or fixed VHD), `local` (local disks and private
//! files), `compact`.
//! docs/storage-format.md is the normative description.

pub mod compact;
pub mod disk;
pub mod error;
pub mod export;
pub mod fault;
pub mod grace;
pub mod keys;
pub mod layout;
pub mod local;
pub mod meta;
pub mod object;
pub mod rebuild;
pub mod record;
pub mod scan;
pub mod state;
pub mod store;
pub mod sums;
pub mod writer;

pub use disk::{Disk, DEFAULT_BLOCK_BYTES, DEFAULT_EXTENT_BYTES};
pub use error::{Error, Result};
pub use keys::VaultKey;
pub use meta::{Point, PointKind};
pub use state::DiskState;
pub use store::Store;
