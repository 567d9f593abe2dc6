//! Ferry's agent (mobility service), the part that runs on a protected machine.
//!
//! Today it holds `nbd` (the NBD export each protected disk is served through),
//! `live` (the running agent: write capture into a journal, the sender that streams it
//! to a process server over `ferry_link::client`, recovery points, initial copy,
//! dirty-region and checksum resync, groups, the admin socket), `seed` (the offline
//! first full copy of a disk, zero blocks skipped, and every later checksum resync) and
//! `image` (reading a disk image or device), with `error` (`Error` for the live agent,
//! `NbdError` for an NBD connection). It links `ferry-link`, never the process
//! server.

pub mod error;
pub mod image;
pub mod live;
pub mod nbd;
pub mod recover;
pub mod seed;

pub use seed::{seed, SeedOptions, SeedReport};
