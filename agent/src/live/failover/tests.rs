use super::*;

fn capture(dir: &Path) -> Arc<Capture> {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    Arc::new(Capture::open("sda", &disk, &dir.join("journal/sda"), 16 << 20, 0).unwrap())
}

#[test]
fn held_and_read_only_disks_refuse_writes_and_trims_and_serve_reads() {
    let dir = tempfile::tempdir().unwrap();
    let c = capture(dir.path());
    let s = Switch::open("m1", &dir.path().join("journal")).unwrap();
    s.add(c.clone());
    c.write(0, &[1; 512], false).unwrap();
    let next = c.state().next_seq;
    assert!(s.prepare("f1"));
    assert!(!s.prepare("f1"), "the same prepare is no news");
    let e = c.write(512, &[2; 512], false).unwrap_err();
    assert!(e.to_string().contains("held"), "{e}");
    assert!(c.zero(0, 4096, false).is_err());
    assert_eq!(c.state().next_seq, next, "nothing journaled");
    let mut buf = [0u8; 1024];
    c.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..512], &[1; 512][..]);
    assert_eq!(
        &buf[512..],
        &[7; 512][..],
        "the refused write did not reach the disk"
    );
    s.read_only("f1", "test");
    let e = c.write(512, &[2; 512], false).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    s.lift();
    c.write(512, &[2; 512], false).unwrap();
    c.zero(0, 512, false).unwrap();
}

#[test]
fn read_only_is_kept_for_a_restart_until_lifted() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    let s = Switch::open("m1", &jdir).unwrap();
    assert!(s.replicating());
    s.read_only("job-7", "the control plane's orders say so");
    assert!(!s.replicating());
    assert!(jdir.join(MARKER).exists());

    // A new start on that journal directory: read-only before any disk is added.
    let again = Switch::open("m1", &jdir).unwrap();
    assert!(!again.replicating());
    assert_eq!(again.writes(), Writes::ReadOnly);
    let c = capture(dir.path());
    again.add(c.clone());
    assert!(c.write(0, &[1; 512], false).is_err());
    assert_eq!(
        again.report(|_| 0).map(|r| (r.id, r.state)),
        Some(("job-7".to_string(), "read-only".to_string()))
    );
    again.lift();
    assert!(again.replicating());
    assert!(!jdir.join(MARKER).exists());
    c.write(0, &[1; 512], false).unwrap();
    assert_eq!(again.report(|_| 0), None);
}

#[test]
fn a_refusal_turns_read_only_except_just_after_a_lift() {
    let dir = tempfile::tempdir().unwrap();
    let s = Switch::open("m1", dir.path()).unwrap();
    assert!(s.refused("failed over"));
    assert!(!s.replicating());
    assert_eq!(s.report(|_| 0).unwrap().id, REFUSAL_ID);
    // The control plane's order names the failover; still read-only, once logged.
    s.read_only("job-1", "orders");
    assert_eq!(s.report(|_| 0).unwrap().id, "job-1");
    s.lift();
    assert!(
        !s.refused("a process server's list from before the cancel"),
        "within the grace after a lift"
    );
    assert!(s.replicating());
}

#[test]
fn prepared_is_reported_once_every_final_point_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let s = Switch::open("m1", dir.path()).unwrap();
    s.prepare("f1");
    assert_eq!(s.report(|_| 0).unwrap().state, "preparing");
    assert!(s.set_final("f1", Err("disk sda is in its initial copy".into())));
    assert!(
        !s.set_final("f1", Err("disk sda is in its initial copy".into())),
        "said once"
    );
    let r = s.report(|_| 0).unwrap();
    assert_eq!(r.state, "failed");
    assert!(r.error.unwrap().contains("initial copy"));
    assert_eq!(s.pending_final().as_deref(), Some("f1"), "tried again");
    let f = Final {
        point: "p9".into(),
        seqs: vec![("sda".into(), 10), ("sdb".into(), 20)],
    };
    assert!(
        !s.set_final("f0", Ok(f.clone())),
        "another failover's point"
    );
    assert_eq!(s.pending_final().as_deref(), Some("f1"));
    s.set_final("f1", Ok(f));
    assert_eq!(s.pending_final(), None);
    let durable = |sdb: u64| move |d: &str| if d == "sda" { 11 } else { sdb };
    assert_eq!(s.report(durable(20)).unwrap().state, "preparing");
    let r = s.report(durable(21)).unwrap();
    assert_eq!(r.state, "prepared");
    assert_eq!(
        r.points,
        vec![
            DiskPoint {
                disk: "sda".into(),
                point: "p9".into()
            },
            DiskPoint {
                disk: "sdb".into(),
                point: "p9".into()
            },
        ]
    );
    // A second prepare starts over.
    s.prepare("f2");
    assert_eq!(s.report(durable(21)).unwrap().state, "preparing");
}

#[test]
fn a_restart_while_preparing_holds_writes_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    let s = Switch::open("m1", &jdir).unwrap();
    s.prepare("prep-1");
    s.set_final(
        "prep-1",
        Ok(Final {
            point: "p1".into(),
            seqs: vec![("sda".into(), 3)],
        }),
    );
    drop(s);
    let again = Switch::open("m1", &jdir).unwrap();
    assert_eq!(again.writes(), Writes::Held);
    assert!(
        again.replicating(),
        "its final point must still reach the store"
    );
    let c = capture(dir.path());
    again.add(c.clone());
    assert!(
        c.write(0, &[1; 512], false).is_err(),
        "held before any order"
    );
    assert_eq!(again.report(|_| 9).unwrap().state, "preparing");
    assert!(!again.prepare("prep-1"), "the same prepare goes on");
    assert_eq!(
        again.pending_final().as_deref(),
        Some("prep-1"),
        "a new final point"
    );
    again.lift();
    assert!(!jdir.join(MARKER).exists());
    c.write(0, &[1; 512], false).unwrap();
}

#[test]
fn the_lift_of_a_failover_drops_the_journal_and_resyncs_that_of_a_prepare_does_not() {
    use crate::live::checksum::Phase;
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    let c = capture(dir.path());
    let s = Switch::open("m1", &jdir).unwrap();
    s.add(c.clone());

    // A cancelled planned failover: nothing changed underneath, the journal stays.
    c.write(0, &[1; 512], false).unwrap();
    s.prepare("prep-1");
    s.lift();
    assert!(c.journal_bytes() > 0, "the journal is sent as it is");
    assert_eq!(c.resync.phase(), Phase::Idle, "no resync");
    assert_eq!(c.take_reset(), None);
    assert!(!crate::live::last_stop::owes_compare(&jdir.join("sda")));

    // A failover that completed: the journal goes before writes open.
    c.write(512, &[2; 512], false).unwrap();
    let next = c.state().next_seq;
    s.read_only("job-1", "test");
    s.lift();
    assert_eq!(
        c.journal_bytes(),
        0,
        "nothing from before the failover is sent"
    );
    assert_eq!(c.state().next_seq, next, "numbering goes on");
    let (at, seq) = c.take_reset().expect("the sender reads from the drop");
    assert_eq!(seq, next);
    assert_eq!(at, crate::live::capture::journal_end(&c));
    assert_eq!(c.resync.phase(), Phase::Wanted);
    assert!(c.resync.reenabling());
    // Owed durably as a re-enable's: a restart resumes it as one.
    assert!(crate::live::last_stop::owed_by_reenable(&jdir.join("sda")));
    c.write(0, &[3; 512], false).unwrap();
    assert!(
        c.journal_bytes() > 0,
        "writes open once the resync is wanted"
    );
    // The server holds less than the numbering: started over, still a re-enable's.
    c.restart_at(next - 1);
    assert!(c.resync.reenabling());
}
