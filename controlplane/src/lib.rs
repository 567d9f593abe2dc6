//! Ferry's control plane: the decisions about recovery. Today it holds `points`
//! (listing a machine's recovery points and choosing one — latest, latest-app, an id, or
//! a time), `failover` (rebuilding every disk of a machine at the chosen point) and
//! `retention` (compaction by age). The HTTP configuration server grows around these.

pub mod failover;
pub mod group;
pub mod points;
pub mod retention;
