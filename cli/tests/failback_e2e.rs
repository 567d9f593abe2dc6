//! The whole failback cycle with real processes (`ferry_testkit::failback`): a control
//! plane, a process server and a recovery host at each site, an agent at home written
//! through NBD with qemu-io. Unplanned failover with the home process server and agent
//! killed (the home disk holds acknowledged writes that never reached the replica),
//! writes at the recovery site, reprotect onto the original home disk with the master
//! target, the recovery-site host and the control plane killed (-9) in the middle,
//! more writes, a planned failback with the recovery-site host, the master target and
//! the control plane killed in the middle, commit (the recovery site left empty),
//! re-enable with the control plane and the home agent killed, writes at home, a
//! second failover. Every disk equals its reference copy at every
//! step, and each step sends at most twice the changed bytes plus metadata.
//! Then the cycle onto a new, empty home disk: one full copy, deltas after; and the
//! cycle of a machine failed over to built raw files (target dir), whose rounds go by
//! checksum.

use std::path::Path;

use ferry_testkit::failback::{cycle, Figures, Options, Step, BLOCK};
use rand::SeedableRng;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const DISK_BYTES: u64 = 16 << 20;
/// Per step, besides the changed bytes: checksum maps (16 bytes a block), commit
/// records, object headers.
const METADATA: u64 = 1 << 20;

/// The cycle on a 16 MiB disk with 2 % of its blocks written before the failover,
/// 2 % at the recovery site and 1 % at home after the point; every disk equal to its
/// reference at every step.
fn run(kills: bool, new_home_disk: bool, built_files: bool) -> Figures {
    let mut rng = rand::rngs::StdRng::seed_from_u64(ferry_testkit::seed());
    let dir = tempfile::tempdir().unwrap();
    let f = cycle(
        &Options {
            bin: Path::new(FERRY),
            dir: dir.path(),
            disk_bytes: DISK_BYTES,
            base_share: 0.02,
            built_files,
            recovery_share: 0.02,
            home_share: 0.01,
            kills,
            new_home_disk,
        },
        &mut rng,
    );
    eprintln!("{f:#?}");
    assert!(f.identical);
    f
}

/// Every step after the failover sends at most twice the changed bytes plus
/// metadata, never the disk: reprotect's sync too (the home disk's map put, the
/// point's map and the blocks that differ fetched).
fn bounded_by_what_changed(f: &Figures) {
    let changed = f.changed_bytes;
    assert!(changed >= 2 * BLOCK, "{f:?}");
    for s in f.steps.iter().filter(|s| s.name != "failover") {
        assert!(
            s.wire_bytes <= 2 * changed + METADATA,
            "{}: {} bytes over the wire for {changed} changed",
            s.name,
            s.wire_bytes
        );
        assert!(
            s.wire_bytes < DISK_BYTES / 2,
            "{}: the disk was sent",
            s.name
        );
    }
}

fn step(f: &Figures, name: &str) -> Step {
    f.steps.iter().find(|s| s.name == name).unwrap().clone()
}

#[test]
fn failback_cycle_sends_only_what_changed_through_kills() {
    let f = run(true, false, false);
    bounded_by_what_changed(&f);
    // The sync rewrote no more than the blocks written at home after the point (a
    // sync restarted after the master target's kill finds some already repaired).
    assert!(
        step(&f, "reprotect").written_bytes <= f.home_changed_bytes,
        "{f:?}"
    );
}

#[test]
fn failback_to_a_new_empty_disk_copies_it_once_then_deltas() {
    let f = run(false, true, false);
    // The full copy: every block of the point that is not zero (the agent's random
    // first 2 MiB and the writes since), nothing skipped.
    let reprotect = step(&f, "reprotect");
    assert!(reprotect.written_bytes >= 2 << 20, "{reprotect:?}");
    for n in ["failback", "re-enable"] {
        let s = step(&f, n);
        assert!(
            s.wire_bytes <= 2 * f.changed_bytes + METADATA,
            "{n}: {} bytes for {} changed",
            s.wire_bytes,
            f.changed_bytes
        );
    }
}

#[test]
fn failback_of_a_machine_running_on_built_files_sends_only_what_changed() {
    bounded_by_what_changed(&run(false, false, true));
}
