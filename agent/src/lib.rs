//! Ferry's agent (mobility service), the part that runs on a protected machine.
//!
//! Today it holds the copy algorithms the agent is built around: `seed` makes the first
//! full copy of a disk (zero blocks skipped) and every later checksum resync (only
//! blocks whose checksums differ from the replica's are sent). Live write capture over
//! NBD, the journal and recovery-point cuts build on these.

pub mod image;
pub mod live;
pub mod nbd;
pub mod seed;

pub use seed::{seed, SeedOptions, SeedReport};
