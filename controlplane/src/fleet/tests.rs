//! The rebalancer against a real database: what it reads, the conditional move, the
//! event, and the rate window an operator's move starts. SQLite always; PostgreSQL
//! when FERRY_TEST_DATABASE names one.

use ferry_link::control::wire::{AgentHeartbeat, ProcessServerHeartbeat};

use super::*;
use crate::registry;

fn ps_beat(name: &str) -> ProcessServerHeartbeat {
    ProcessServerHeartbeat {
        name: name.into(),
        address: format!("{name}.example:7000"),
        cache_used_bytes: 10,
        cache_free_bytes: 90,
        ingest_bytes_per_s: 0.0,
        upload_lag_s: 0.0,
        cpu_percent: 1.0,
        health: "normal".into(),
        health_reasons: vec![],
        machines: vec![],
        fenced: vec![],
    }
}

fn agent_beat(machine: &str) -> AgentHeartbeat {
    AgentHeartbeat {
        machine: machine.into(),
        disks: vec![],
        process_server: None,
        last_error: None,
        group_listen: None,
        failover: None,
    }
}

async fn ps_of(db: &Db, machine: &str) -> Option<String> {
    machines::get(db, machine)
        .await
        .unwrap()
        .and_then(|m| m.process_server)
}

async fn scenario(db: &Db) {
    let t0: i64 = 1_800_000_000;
    // ps-a registers first and takes all three machines.
    process_servers::heartbeat(db, &ps_beat("ps-a"), t0)
        .await
        .unwrap();
    for m in ["m1", "m2", "m3"] {
        registry::agent_heartbeat(db, &agent_beat(m), None, t0)
            .await
            .unwrap();
        assert_eq!(ps_of(db, m).await.as_deref(), Some("ps-a"));
    }
    process_servers::heartbeat(db, &ps_beat("ps-b"), t0)
        .await
        .unwrap();
    registry::agent_heartbeat(db, &agent_beat("m4"), None, t0)
        .await
        .unwrap();
    assert_eq!(ps_of(db, "m4").await.as_deref(), Some("ps-b"));
    // An operator puts m4 on ps-a too: that starts its rate window.
    assert!(machines::set_process_server(db, "m4", "ps-a", t0)
        .await
        .unwrap());

    // All seen: nothing moves (4 vs 0 is no overload while ps-b has not settled),
    // and each server is normal from now on.
    let t = t0 as f64 + 1.0;
    assert_eq!(rebalance(db, t, 0.0).await.unwrap(), []);
    let since = normal_since(db).await.unwrap();
    assert_eq!(since["ps-a"], Some(t0 + 1));
    assert_eq!(since["ps-b"], Some(t0 + 1));

    // ps-a falls silent; ps-b goes on. 20 s later ps-a is lost: its machines move,
    // but the operator's m4, inside its window, stays.
    let t = t0 as f64 + 20.0;
    process_servers::heartbeat(db, &ps_beat("ps-b"), t as i64)
        .await
        .unwrap();
    let moves = rebalance(db, t, 0.0).await.unwrap();
    assert_eq!(
        moves
            .iter()
            .map(|m| (m.machine.as_str(), m.to.as_str()))
            .collect::<Vec<_>>(),
        [("m1", "ps-b"), ("m2", "ps-b"), ("m3", "ps-b")]
    );
    assert_eq!(ps_of(db, "m1").await.as_deref(), Some("ps-b"));
    assert_eq!(ps_of(db, "m4").await.as_deref(), Some("ps-a"));
    let since = normal_since(db).await.unwrap();
    assert_eq!(since["ps-a"], None, "a lost server is not normal");
    let evs = events::list(db, 0, 100).await.unwrap();
    let moved: Vec<_> = evs.iter().filter(|e| e.kind == "move").collect();
    assert_eq!(moved.len(), 3, "{evs:?}");
    assert_eq!(moved[0].subject, "machine m1");
    assert_eq!(
        moved[0].message,
        "process server ps-a not seen for 20 s: moved to ps-b"
    );

    // ps-a comes back at once and settles; ps-b, holding three to its one, is
    // overloaded, but every machine is inside its rate window: nothing moves back.
    let t = t0 as f64 + 21.0 + SETTLE_S_F;
    for name in ["ps-a", "ps-b"] {
        process_servers::heartbeat(db, &ps_beat(name), t0 + 21)
            .await
            .unwrap();
    }
    rebalance(db, t0 as f64 + 21.0, 0.0).await.unwrap();
    for name in ["ps-a", "ps-b"] {
        process_servers::heartbeat(db, &ps_beat(name), t as i64)
            .await
            .unwrap();
    }
    assert_eq!(rebalance(db, t, 0.0).await.unwrap(), []);

    // After the window, one machine goes back to ps-a (3 vs 1 -> 2 vs 2).
    let t = t0 as f64 + 20.0 + COOLDOWN_S as f64;
    for name in ["ps-a", "ps-b"] {
        process_servers::heartbeat(db, &ps_beat(name), t as i64)
            .await
            .unwrap();
    }
    let moves = rebalance(db, t, 0.0).await.unwrap();
    assert_eq!(moves.len(), 1, "{moves:?}");
    assert_eq!(
        (moves[0].from.as_str(), moves[0].to.as_str()),
        ("ps-b", "ps-a")
    );
    assert!(moves[0].why.contains("overloaded"), "{moves:?}");

    // The conditional move: a machine no longer where the plan found it stays put.
    assert!(
        !machines::move_if(db, "m1", "ps-x", "ps-a", t as i64, COOLDOWN_S)
            .await
            .unwrap()
    );
    // Nor one moved within the window.
    let moved_one = &moves[0].machine;
    assert!(
        !machines::move_if(db, moved_one, "ps-a", "ps-b", t as i64 + 1, COOLDOWN_S)
            .await
            .unwrap()
    );
}

const SETTLE_S_F: f64 = rebalance::SETTLE_S as f64;

#[tokio::test]
async fn rebalancing_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
    scenario(&db).await;
}

#[tokio::test]
async fn rebalancing_on_the_test_database() {
    let Ok(url) = std::env::var("FERRY_TEST_DATABASE") else {
        if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
            panic!("FERRY_TEST_DATABASE is not set but FERRY_TEST_REQUIRE_REMOTE=1");
        }
        eprintln!("FERRY_TEST_DATABASE not set: PostgreSQL not tested");
        return;
    };
    let _only = crate::db::tests::drop_all(&url).await;
    let db = Db::open(&url).await.unwrap();
    scenario(&db).await;
}
