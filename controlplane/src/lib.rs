//! Ferry's control plane: the decisions about recovery. Today it is a library the
//! `ferry` command calls; the HTTP configuration server comes next and grows around it
//! (its service and routes will sit beside `recovery`).
//!
//! Where things are:
//! - `recovery::points`: a machine's recovery points and choosing one (latest,
//!   latest-app, an id, or a time).
//! - `recovery::group`: the latest point a whole multi-machine group shares.
//! - `recovery::failover`: rebuilding every disk of a machine at the chosen point into
//!   raw or fixed-VHD files (`ferry_replica::export`).
//! - `recovery::retention`: compaction by age.
//! - `error`: the control plane's `Error`.

pub mod error;
pub mod recovery;
