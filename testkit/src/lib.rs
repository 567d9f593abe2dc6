//! Ferry's test kit: what the tests of several crates share, so each test reads as
//! its scenario. `boot` makes a tiny bootable disk and boots it with qemu from NBD,
//! `process` runs the `ferry` binary (killed when dropped, waiting for
//! its first line), `cli` the arguments and admin-socket calls of a loopback site
//! driven through it, `net` finds free loopback ports, `qemu` drives qemu-io, `pki` and
//! `server` build certificates and an in-process process server, `site` a loopback
//! deployment with agents, `disk` random disk images, `wait` polls a condition with a
//! deadline instead of sleeping, and `sim` is the simulated agent (a model disk and
//! its journal) that the data plane's tests and the load benchmark drive;
//! `postgres` makes a throwaway PostgreSQL database per test, `control` a site
//! driven through its control plane (the control plane, enrolled process servers and
//! agents), and `failback` the whole failback cycle on such a site (its test and its
//! benchmark).
//!
//! Test code only: a dev-dependency (the benchmarks' load generator aside), never
//! shipped, so it may panic on a failed set-up step: that fails the test, naming it.

pub mod boot;
pub mod cli;
pub mod control;
pub mod disk;
pub mod failback;
pub mod net;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod qemu;
pub mod server;
pub mod sim;
pub mod site;
pub mod wait;

pub use wait::{wait_for, wait_ok};

/// The seed of a randomised test: FERRY_SEED if set (to replay a failure), else a
/// random one. Printed, so a failing run names the seed that replays it.
pub fn seed() -> u64 {
    let seed = std::env::var("FERRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("FERRY_SEED={seed}");
    seed
}
