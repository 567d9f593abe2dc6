//! Every query of the registry and of enrollment, run by `db::tests` on SQLite and,
//! when FERRY_TEST_DATABASE names one, on PostgreSQL.

use ferry_link::control::wire::{
    AgentHeartbeat, DiskReport, FencedDisk, PointRef, ProcessServerHeartbeat,
};

use super::{events, machines, process_servers};
use crate::db::Db;
use crate::enroll::issue::Leaf;
use crate::enroll::store::{self, Owner, Refusal};

fn leaf(serial: &str, not_after: i64) -> Leaf {
    Leaf {
        pem: String::new(),
        der_sha256: format!("sha-{serial}"),
        serial: serial.into(),
        not_after,
    }
}

fn ps_beat(name: &str, free: u64) -> ProcessServerHeartbeat {
    ProcessServerHeartbeat {
        name: name.into(),
        address: format!("{name}.example:7000"),
        cache_used_bytes: 100 - free,
        cache_free_bytes: free,
        ingest_bytes_per_s: 1.5,
        upload_lag_s: 0.25,
        cpu_percent: 12.0,
        health: "normal".into(),
        health_reasons: vec![],
        machines: vec!["m1".into()],
        fenced: vec![],
    }
}

fn agent_beat(machine: &str, state: &str, uploaded: Option<&str>) -> AgentHeartbeat {
    AgentHeartbeat {
        machine: machine.into(),
        disks: vec![DiskReport {
            name: "d0".into(),
            size_bytes: 1 << 20,
            state: state.into(),
            initial_copy_percent: 100.0,
            journal_bytes: 0,
            unacked_bytes: 0,
            newest_point: None,
            newest_uploaded_point: uploaded.map(|t| PointRef {
                id: "p1".into(),
                kind: "crash".into(),
                time: t.into(),
            }),
            resync: None,
        }],
        process_server: None,
        last_error: None,
        group_listen: None,
        failover: None,
    }
}

async fn ps_listed(db: &Db, name: &str) -> bool {
    let all = process_servers::list(db, None, 10).await.unwrap();
    all.into_iter().any(|p| p.name == name)
}

pub(crate) async fn every_query(db: &Db) {
    let now = 1_800_000_000;
    // Enrollment tokens: one use, expiry, kind, unknown.
    let names = ["m1".to_string()];
    let agent_m1 = Owner {
        kind: "agent",
        name: "m1",
        names: &names,
    };
    store::create_token(db, "t1", "agent", now, 3600)
        .await
        .unwrap();
    store::create_token(db, "t2", "agent", now - 7200, 3600)
        .await
        .unwrap();
    store::create_token(db, "t3", "process-server", now, 3600)
        .await
        .unwrap();
    let l1 = leaf("4001", now + 86_400);
    assert_eq!(
        store::enroll(db, "t1", &l1, &agent_m1, now).await.unwrap(),
        Ok(())
    );
    assert_eq!(
        store::enroll(db, "t1", &leaf("4002", now), &agent_m1, now + 1)
            .await
            .unwrap(),
        Err(Refusal::Used {
            by: "m1".into(),
            at: now
        })
    );
    assert_eq!(
        store::enroll(db, "t2", &leaf("4003", now), &agent_m1, now)
            .await
            .unwrap(),
        Err(Refusal::Expired { at: now - 3600 })
    );
    assert_eq!(
        store::enroll(db, "t3", &leaf("4004", now), &agent_m1, now)
            .await
            .unwrap(),
        Err(Refusal::WrongKind {
            is: "process-server".into()
        })
    );
    assert_eq!(
        store::enroll(db, "nope", &leaf("4005", now), &agent_m1, now)
            .await
            .unwrap(),
        Err(Refusal::Unknown)
    );
    store::create_token(db, "t4", "agent", now, 3600)
        .await
        .unwrap();
    assert_eq!(
        store::enroll(db, "t4", &leaf("4007", now), &agent_m1, now)
            .await
            .unwrap(),
        Err(Refusal::Taken {
            kind: "agent".into(),
            name: "m1".into()
        }),
        "m1 holds a live certificate"
    );
    let cert = store::find_cert(db, "sha-4001").await.unwrap().unwrap();
    assert_eq!(
        (
            cert.owner_kind.as_str(),
            cert.owner_name.as_str(),
            cert.names.clone()
        ),
        ("agent", "m1", names.to_vec())
    );
    assert!(!cert.revoked);
    assert_eq!(
        store::find_cert(db, "sha-4002").await.unwrap(),
        None,
        "refused: not recorded"
    );
    store::record_cert(db, &leaf("4006", now - 1), &agent_m1, now)
        .await
        .unwrap();

    // Process servers: registered by a heartbeat; the least loaded gets new machines.
    let seen = now - 15;
    assert!(process_servers::heartbeat(db, &ps_beat("psb", 50), now)
        .await
        .unwrap());
    assert!(!process_servers::heartbeat(db, &ps_beat("psb", 40), now)
        .await
        .unwrap());
    assert!(process_servers::heartbeat(db, &ps_beat("psa", 50), now)
        .await
        .unwrap());
    assert!(
        process_servers::heartbeat(db, &ps_beat("psold", 50), now - 100)
            .await
            .unwrap()
    );
    let b = process_servers::get(db, "psb").await.unwrap().unwrap();
    assert_eq!((b.cache_free_bytes, b.cache_used_bytes), (40, 60));
    assert_eq!(b.connected, ["m1"]);

    let beat = |name: &'static str, uploaded: Option<f64>| machines::Beat {
        name,
        state: "protected",
        disks: &[],
        last_error: None,
        newest_uploaded_at: uploaded,
        group_listen: None,
        now,
    };
    assert!(machines::heartbeat(db, &beat("m1", None)).await.unwrap());
    assert!(!machines::heartbeat(db, &beat("m1", Some(1.5)))
        .await
        .unwrap());
    assert_eq!(
        machines::assign_least_loaded(db, "m1", seen)
            .await
            .unwrap()
            .as_deref(),
        Some("psa"),
        "a tie goes by name; psold is not seen"
    );
    assert_eq!(
        machines::assign_least_loaded(db, "m1", seen).await.unwrap(),
        None,
        "has one"
    );
    machines::heartbeat(db, &beat("m2", None)).await.unwrap();
    assert_eq!(
        machines::assign_least_loaded(db, "m2", seen)
            .await
            .unwrap()
            .as_deref(),
        Some("psb"),
        "psa has one machine now"
    );
    let loads = process_servers::loads(db).await.unwrap();
    assert_eq!((loads["psa"], loads["psb"]), (1, 1));
    assert!(machines::set_process_server(db, "m2", "psa", now)
        .await
        .unwrap());
    assert!(!machines::set_process_server(db, "m9", "psa", now)
        .await
        .unwrap());
    assert!(machines::patch(db, "m1", Some("default"), Some(Some("g1")))
        .await
        .unwrap());
    assert!(machines::patch(db, "m2", None, Some(Some("g1")))
        .await
        .unwrap());
    assert!(!machines::patch(db, "m9", Some("default"), None)
        .await
        .unwrap());
    assert_eq!(
        machines::using_policy(db, "default", 5).await.unwrap(),
        ["m1", "m2"]
    );
    assert!(machines::using_policy(db, "gold", 5)
        .await
        .unwrap()
        .is_empty());
    let m1 = machines::get(db, "m1").await.unwrap().unwrap();
    assert_eq!(
        (
            m1.process_server.as_deref(),
            m1.group.as_deref(),
            m1.newest_uploaded_at
        ),
        (Some("psa"), Some("g1"), Some(1.5))
    );
    assert_eq!(
        machines::groups(db, None, 10).await.unwrap(),
        [
            ("g1".to_string(), "m1".to_string()),
            ("g1".into(), "m2".into())
        ]
    );
    assert!(machines::patch(db, "m2", None, Some(None)).await.unwrap());
    assert_eq!(machines::groups(db, Some("g1"), 10).await.unwrap(), []);

    // Health writes are compare-and-set.
    assert!(machines::set_health(db, "m1", "normal", "critical")
        .await
        .unwrap());
    assert!(!machines::set_health(db, "m1", "normal", "warning")
        .await
        .unwrap());
    assert!(process_servers::set_health(db, "psa", "normal", "warning")
        .await
        .unwrap());

    // Removal: the machine is gone from lists, its certificates revoked.
    assert!(machines::remove(db, "m1").await.unwrap());
    assert!(!machines::remove(db, "m1").await.unwrap());
    assert!(machines::get(db, "m1").await.unwrap().unwrap().removed);
    let listed: Vec<String> = machines::list(db, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(listed, ["m2"]);
    assert!(
        store::find_cert(db, "sha-4001")
            .await
            .unwrap()
            .unwrap()
            .revoked
    );
    assert_eq!(
        store::revoked_serials(db, now, 10).await.unwrap(),
        ["4001"],
        "4006 has expired: no need to list it"
    );
    assert_eq!(
        store::revoked_serials(db, now - 1_000_000, 1)
            .await
            .unwrap(),
        ["4001"],
        "the list is bounded: 4006 would be next"
    );
    // A heartbeat sent with the revoked certificate (in flight while it was removed)
    // does not bring it back; one after a new enrollment does.
    assert!(!machines::heartbeat(db, &beat("m1", None)).await.unwrap());
    assert!(machines::get(db, "m1").await.unwrap().unwrap().removed);
    store::record_cert(db, &leaf("4008", now + 3600), &agent_m1, now)
        .await
        .unwrap();
    assert!(machines::heartbeat(db, &beat("m1", None)).await.unwrap());
    assert!(!machines::get(db, "m1").await.unwrap().unwrap().removed);

    // Removing a process server frees its machines.
    assert!(process_servers::remove(db, "psa").await.unwrap());
    assert_eq!(
        machines::get(db, "m2")
            .await
            .unwrap()
            .unwrap()
            .process_server,
        None
    );
    let left: Vec<String> = process_servers::list(db, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(left, ["psb", "psold"]);
    // Its revoked certificate's heartbeat does not bring it back; a new one's does.
    assert!(
        !process_servers::heartbeat(db, &ps_beat("psa", 50), now + 1)
            .await
            .unwrap()
    );
    assert!(!ps_listed(db, "psa").await);
    let ps_a = Owner {
        kind: "process-server",
        name: "psa",
        names: &[],
    };
    store::record_cert(db, &leaf("4009", now + 3600), &ps_a, now)
        .await
        .unwrap();
    assert!(process_servers::heartbeat(db, &ps_beat("psa", 50), now + 2)
        .await
        .unwrap());
    assert!(ps_listed(db, "psa").await);
    assert!(process_servers::remove(db, "psa").await.unwrap());

    // Events: numbered in order, paged by id.
    let base = events::list(db, 0, 1000).await.unwrap().len() as i64;
    for i in 0..3 {
        events::add(db, "test", "machine m1", &format!("e{i}"), now)
            .await
            .unwrap();
    }
    let got = events::list(db, base, 2).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].id, got[0].message.as_str()), (base + 1, "e0"));
    let rest = events::list(db, got[1].id, 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].message, "e2");

    // A fenced disk in a heartbeat is an event about its machine.
    let mut hb = ps_beat("psa", 50);
    hb.fenced = vec![FencedDisk {
        machine: "m1".into(),
        disk: "d0".into(),
        epoch: 4,
        new_writer: "psb".into(),
        dropped_bytes: 8192,
        time: "2026-01-01T00:00:00.000Z".into(),
    }];
    assert_eq!(
        process_servers::record_fencings(db, &hb, now)
            .await
            .unwrap(),
        1
    );
    let fenced = events::list(db, rest[0].id, 10).await.unwrap();
    assert_eq!(fenced.len(), 1);
    let f = &fenced[0];
    assert_eq!(
        (f.kind.as_str(), f.subject.as_str()),
        ("fencing", "machine m1")
    );
    for part in [
        "process server psa",
        "disk d0",
        "process server psb",
        "epoch 4",
        "8192 bytes",
    ] {
        assert!(f.message.contains(part), "{part:?} not in {}", f.message);
    }
    let rest = fenced;

    // The sweep: psb and psold not seen long after `now`; an event each, once.
    let later = now as f64 + 60.0;
    let changed = crate::health::sweep(db, later).await.unwrap();
    assert!(changed >= 2, "{changed}");
    assert_eq!(
        crate::health::sweep(db, later).await.unwrap(),
        0,
        "no change, no event"
    );
    let evs = events::list(db, rest[0].id, 100).await.unwrap();
    let psb = evs
        .iter()
        .find(|e| e.subject == "process-server psb")
        .unwrap();
    assert_eq!(psb.kind, "health");
    assert!(
        psb.message
            .starts_with("health normal -> critical: not seen for"),
        "{}",
        psb.message
    );

    // Old events go, but the newest stays, so that ids keep growing.
    let old = events::add(db, "test", "machine m1", "old", now - 10)
        .await
        .unwrap();
    assert_eq!(
        events::prune(db, now - 5).await.unwrap(),
        0,
        "the newest stays"
    );
    let fresh = events::add(db, "test", "machine m1", "fresh", now)
        .await
        .unwrap();
    assert_eq!(events::prune(db, now - 5).await.unwrap(), 1);
    let left = events::list(db, 0, 1000).await.unwrap();
    assert!(left.iter().all(|e| e.id != old), "{left:?}");
    assert!(left.iter().any(|e| e.id == fresh), "{left:?}");
    assert!(events::prune(db, now + 1_000_000).await.unwrap() >= 1);
    let left = events::list(db, 0, 1000).await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].id, fresh);
    let next = events::add(db, "test", "machine m1", "next", now)
        .await
        .unwrap();
    assert_eq!(next, fresh + 1, "ids go on from the newest");

    // A check of what heartbeats carry.
    let ok = agent_beat("m3", "protected", Some("2026-01-01T00:00:01.5Z"));
    let t = super::check_agent_heartbeat(&ok).unwrap().unwrap();
    assert_eq!(t, 1_767_225_601.5);
    let bad = agent_beat("m3", "sleeping", None);
    assert!(super::check_agent_heartbeat(&bad)
        .unwrap_err()
        .contains("sleeping"));
    let bad = agent_beat("m3", "resync", Some("yesterday"));
    assert!(super::check_agent_heartbeat(&bad)
        .unwrap_err()
        .contains("RFC 3339"));
    assert_eq!(super::machine_state(&bad.disks), "resync");
    let mut bad = ps_beat("psc", 10);
    bad.address = "nowhere".into();
    assert!(super::check_process_server_heartbeat(&bad).is_err());

    // Heartbeats with no uploaded point and with one, one after the other (so on the
    // same pooled connection and its cached statements): on PostgreSQL a NULL bound
    // first made every later time fail.
    for i in 0..20 {
        let uploaded = (i % 2 == 1).then_some(1_800_000_000.25 + f64::from(i));
        let hb = agent_beat("m9", "protected", None);
        super::agent_heartbeat(db, &hb, uploaded, now + i64::from(i))
            .await
            .unwrap_or_else(|e| panic!("heartbeat {i} ({uploaded:?}): {e}"));
        let m = machines::get(db, "m9").await.unwrap().unwrap();
        assert_eq!(m.newest_uploaded_at, uploaded, "heartbeat {i}");
    }
    // Groups: the first member seen coordinates; only its orders list the members,
    // with their group-listen addresses; one without is left out.
    let beat_in = |name: &str, listen: Option<&str>| {
        let mut hb = agent_beat(name, "protected", None);
        hb.group_listen = listen.map(str::to_string);
        hb
    };
    let ga = beat_in("ga", Some("10.0.0.1:20004"));
    let gb = beat_in("gb", Some("10.0.0.2:20004"));
    let gc = beat_in("gc", None);
    for hb in [&ga, &gb, &gc] {
        let o = super::agent_heartbeat(db, hb, None, now).await.unwrap();
        assert_eq!((o.group, o.group_coordinator), (None, None));
        assert!(machines::patch(db, &hb.machine, None, Some(Some("grp")))
            .await
            .unwrap());
    }
    let o = super::agent_heartbeat(db, &ga, None, now).await.unwrap();
    assert_eq!(o.group.as_deref(), Some("grp"));
    assert_eq!(o.group_coordinator.as_deref(), Some("ga"));
    assert_eq!(
        o.group_members,
        [ferry_link::control::wire::GroupMemberRef {
            name: "gb".into(),
            address: "10.0.0.2:20004".into()
        }],
        "gc reports no group-listen address"
    );
    for hb in [&gb, &gc] {
        let o = super::agent_heartbeat(db, hb, None, now).await.unwrap();
        assert_eq!(
            (o.group.as_deref(), o.group_coordinator.as_deref()),
            (Some("grp"), Some("ga"))
        );
        assert!(
            o.group_members.is_empty(),
            "only the coordinator's list them"
        );
    }
    assert_eq!(
        machines::get(db, "gb")
            .await
            .unwrap()
            .unwrap()
            .group_listen
            .as_deref(),
        Some("10.0.0.2:20004")
    );
    // ga goes quiet: the role moves to gb, which leaves ga out of its cuts.
    let later = now + 3 * crate::health::NOT_SEEN_S;
    super::agent_heartbeat(db, &gc, None, later).await.unwrap();
    let o = super::agent_heartbeat(db, &gb, None, later).await.unwrap();
    assert_eq!(o.group_coordinator.as_deref(), Some("gb"));
    assert!(o.group_members.is_empty(), "ga unseen, gc unreachable");
    let mut bad = beat_in("gb", Some("nowhere"));
    assert!(super::check_agent_heartbeat(&bad)
        .unwrap_err()
        .contains("group_listen"));
    bad.group_listen = None;
    assert!(super::check_agent_heartbeat(&bad).is_ok());
}

/// Eight writers at once, fifty heartbeats each (agents' and process servers' mixed,
/// each a read then a write in one transaction): none fails. On SQLite, with
/// deferred transactions, some did with "database is locked" (SQLITE_BUSY on the
/// upgrade from reader to writer), which the busy timeout does not cover.
async fn concurrent_heartbeats_all_succeed(db: &Db) {
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let db = db.clone();
        writers.spawn(async move {
            for i in 0..50 {
                let now = 1_800_000_000 + i;
                if w % 2 == 0 {
                    // With and without an uploaded point, as agents send them.
                    let uploaded = (i % 2 == 0).then_some(now as f64 - 0.5);
                    let hb = agent_beat(&format!("m{w}"), "protected", None);
                    super::agent_heartbeat(&db, &hb, uploaded, now)
                        .await
                        .map(|_| ())
                } else {
                    process_servers::heartbeat(&db, &ps_beat(&format!("ps{w}"), 50), now)
                        .await
                        .map(|_| ())
                }
                .unwrap_or_else(|e| panic!("writer {w}, heartbeat {i}: {e}"));
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let seen = machines::list(db, None, 100).await.unwrap();
    assert_eq!(seen.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_heartbeats_on_sqlite_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
    concurrent_heartbeats_all_succeed(&db).await;
}

/// The same on PostgreSQL when FERRY_TEST_DATABASE names one (its tables are
/// dropped first, as `db::tests` does).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_heartbeats_on_the_test_database_all_succeed() {
    let Ok(url) = std::env::var("FERRY_TEST_DATABASE") else {
        if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
            panic!("FERRY_TEST_DATABASE is not set but FERRY_TEST_REQUIRE_REMOTE=1");
        }
        eprintln!("FERRY_TEST_DATABASE not set: concurrent heartbeats not tested on PostgreSQL");
        return;
    };
    let _only = crate::db::tests::drop_all(&url).await;
    let db = Db::open(&url).await.unwrap();
    concurrent_heartbeats_all_succeed(&db).await;
}

/// Every string and list a heartbeat carries is bounded before it reaches the
/// database; one over its bound is refused naming the field, one at it passes.
#[test]
fn heartbeat_fields_over_their_bounds_are_refused() {
    use ferry_link::control::limits::{
        MAX_CONNECTED, MAX_FENCED, MAX_POINT_ID_BYTES, MAX_REASONS, MAX_TEXT_BYTES,
    };
    let check = super::check_agent_heartbeat;
    let mut hb = agent_beat("m1", "protected", Some("2026-01-01T00:00:00Z"));
    hb.last_error = Some("x".repeat(MAX_TEXT_BYTES));
    check(&hb).unwrap();
    hb.last_error = Some("x".repeat(MAX_TEXT_BYTES + 1));
    let e = check(&hb).unwrap_err();
    assert!(e.contains("last_error") && e.contains("1025 bytes"), "{e}");

    let mut hb = agent_beat("m1", "protected", Some("2026-01-01T00:00:00Z"));
    if let Some(p) = hb.disks[0].newest_uploaded_point.as_mut() {
        p.id = "p".repeat(MAX_POINT_ID_BYTES + 1);
    }
    let e = check(&hb).unwrap_err();
    assert!(e.contains("newest_uploaded_point id"), "{e}");
    let mut hb = agent_beat("m1", "protected", None);
    hb.disks[0].newest_point = Some(PointRef {
        id: "p1".into(),
        kind: "k".repeat(MAX_POINT_ID_BYTES + 1),
        time: "2026-01-01T00:00:00Z".into(),
    });
    let e = check(&hb).unwrap_err();
    assert!(e.contains("disk d0 newest_point kind"), "{e}");

    let check = super::check_process_server_heartbeat;
    let mut hb = ps_beat("ps1", 50);
    hb.machines = (0..MAX_CONNECTED).map(|i| format!("m{i}")).collect();
    hb.health_reasons = vec!["r".repeat(MAX_TEXT_BYTES); MAX_REASONS];
    check(&hb).unwrap();
    hb.machines.push("one-more".into());
    let e = check(&hb).unwrap_err();
    assert!(e.contains("513 machines"), "{e}");
    hb.machines.pop();
    hb.health_reasons.push("one more".into());
    let e = check(&hb).unwrap_err();
    assert!(e.contains("health_reasons"), "{e}");
    hb.health_reasons = vec!["r".repeat(MAX_TEXT_BYTES + 1)];
    let e = check(&hb).unwrap_err();
    assert!(e.contains("health reason"), "{e}");
    hb.health_reasons.clear();
    let fenced = FencedDisk {
        machine: "m1".into(),
        disk: "d0".into(),
        epoch: 2,
        new_writer: String::new(),
        dropped_bytes: 0,
        time: "2026-01-01T00:00:00Z".into(),
    };
    hb.fenced = vec![fenced.clone(); MAX_FENCED];
    check(&hb).unwrap();
    hb.fenced.push(fenced.clone());
    let e = check(&hb).unwrap_err();
    assert!(e.contains("33 fenced disks"), "{e}");
    hb.fenced = vec![FencedDisk {
        disk: "../d".into(),
        ..fenced
    }];
    assert!(check(&hb).is_err());
}

/// Heartbeats of one part landing on several control planes at once: the first
/// ones register it once (one `registered` event), and one older than the recorded
/// one (held up on a control plane while a later one landed on another) changes
/// nothing.
async fn heartbeats_from_several_control_planes(db: &Db) {
    let now = 1_800_000_000;
    let mut first = tokio::task::JoinSet::new();
    for i in 0..8 {
        let db = db.clone();
        first.spawn(async move {
            if i % 2 == 0 {
                let hb = agent_beat("racer", "protected", None);
                super::agent_heartbeat(&db, &hb, None, now)
                    .await
                    .map(|_| ())
            } else {
                process_servers::heartbeat(&db, &ps_beat("ps-racer", 50), now)
                    .await
                    .map(|_| ())
            }
            .unwrap();
        });
    }
    while let Some(done) = first.join_next().await {
        done.unwrap();
    }
    let events = events::list(db, 0, 1000).await.unwrap();
    let registered = |subject: &str| {
        events
            .iter()
            .filter(|e| e.subject == subject && e.kind == "registered")
            .count()
    };
    assert_eq!(registered("machine racer"), 1, "{events:?}");

    let newer = agent_beat("racer", "resync", None);
    super::agent_heartbeat(db, &newer, Some(now as f64 + 9.0), now + 10)
        .await
        .unwrap();
    let older = agent_beat("racer", "protected", None);
    super::agent_heartbeat(db, &older, None, now + 5)
        .await
        .unwrap();
    let m = machines::get(db, "racer").await.unwrap().unwrap();
    assert_eq!(m.last_seen, now + 10, "the later heartbeat stays");
    assert_eq!(m.disks[0].state, "resync");
    assert_eq!(m.newest_uploaded_at, Some(now as f64 + 9.0));

    process_servers::heartbeat(db, &ps_beat("ps-racer", 10), now + 10)
        .await
        .unwrap();
    assert!(
        !process_servers::heartbeat(db, &ps_beat("ps-racer", 90), now + 5)
            .await
            .unwrap(),
        "not a registration"
    );
    let p = process_servers::get(db, "ps-racer").await.unwrap().unwrap();
    assert_eq!((p.last_seen, p.cache_free_bytes), (now + 10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_from_several_control_planes_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
    heartbeats_from_several_control_planes(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_from_several_control_planes_on_the_test_database() {
    let Ok(url) = std::env::var("FERRY_TEST_DATABASE") else {
        if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
            panic!("FERRY_TEST_DATABASE is not set but FERRY_TEST_REQUIRE_REMOTE=1");
        }
        eprintln!("FERRY_TEST_DATABASE not set: heartbeats on two control planes not tested on PostgreSQL");
        return;
    };
    let _only = crate::db::tests::drop_all(&url).await;
    let db = Db::open(&url).await.unwrap();
    heartbeats_from_several_control_planes(&db).await;
}

/// Heartbeats that queue while the database is busy are committed together (one
/// sync for many), and each is still answered for itself: every machine registered
/// once, each given the one process server, each with its own row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_queued_behind_a_commit_share_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
    let now = 1_800_000_000;
    process_servers::heartbeat(&db, &ps_beat("ps1", 50), now)
        .await
        .unwrap();
    // Another writer holds SQLite's write lock while the heartbeats arrive.
    let blocker = db.begin_write("holding the lock").await.unwrap();
    let mut beats = tokio::task::JoinSet::new();
    for i in 0..64 {
        let db = db.clone();
        beats.spawn(async move {
            let hb = agent_beat(&format!("m{i:02}"), "protected", None);
            super::agent_heartbeat(&db, &hb, None, now).await.unwrap()
        });
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    blocker.commit().await.unwrap();
    while let Some(o) = beats.join_next().await {
        let o = o.unwrap();
        assert_eq!(o.process_server.unwrap().name, "ps1");
        assert_eq!(o.policy.name, crate::policy::DEFAULT_NAME);
    }
    let commits = db.beats().commits();
    assert!(
        (1..=8).contains(&commits),
        "64 heartbeats behind one lock took {commits} commits"
    );
    let seen = machines::list(&db, None, 100).await.unwrap();
    assert_eq!(seen.len(), 64);
    let registered = events::list(&db, 0, 200).await.unwrap();
    let n = registered
        .iter()
        .filter(|e| e.kind == "registered" && e.subject.starts_with("machine "))
        .count();
    assert_eq!(n, 64, "each registered once");
    // A second round: none registers again.
    let hb = agent_beat("m00", "resync", None);
    super::agent_heartbeat(&db, &hb, None, now + 5)
        .await
        .unwrap();
    let m = machines::get(&db, "m00").await.unwrap().unwrap();
    assert_eq!((m.state.as_str(), m.last_seen), ("resync", now + 5));
}
