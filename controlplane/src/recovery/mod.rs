//! Recovery decisions over what the replica holds: which point, rebuilt where, kept
//! how long.

pub mod failover;
pub mod group;
pub mod jobs;
pub mod points;
pub mod retention;
pub mod work;
