//! The rebalancing rules, one scenario each, on rows made by hand.

use super::*;

const NOW: f64 = 100_000.0;
/// Long enough ago that the start-up grace does not apply.
const LONG_AGO: f64 = 0.0;

fn ps(name: &str) -> Server {
    Server {
        row: PsRow {
            name: name.into(),
            address: format!("{name}.example:7000"),
            cache_used_bytes: 10,
            cache_free_bytes: 90,
            ingest_bytes_per_s: 0.0,
            upload_lag_s: 0.0,
            cpu_percent: 0.0,
            reported_health: "normal".into(),
            reported_reasons: vec![],
            connected: vec![],
            health: "normal".into(),
            registered_at: 0,
            last_seen: NOW as i64 - 2,
            removed: false,
        },
        normal_since: Some(0),
    }
}

fn lost(name: &str, quiet_s: i64) -> Server {
    let mut s = ps(name);
    s.row.last_seen = NOW as i64 - quiet_s;
    s.normal_since = None;
    s
}

fn on(ps: &str, names: &[&str]) -> Vec<Candidate> {
    names
        .iter()
        .map(|n| Candidate {
            name: n.to_string(),
            process_server: ps.into(),
            moved_at: None,
        })
        .collect()
}

fn loads(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
    pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

fn run(servers: &[Server], l: &[(&str, i64)], cands: &[Candidate], now: f64) -> Vec<Move> {
    plan(&Fleet {
        servers,
        loads: &loads(l),
        candidates: cands,
        now,
        watching_since: LONG_AGO,
    })
}

/// (machine, from, to) of each move.
fn short(moves: &[Move]) -> Vec<(&str, &str, &str)> {
    moves
        .iter()
        .map(|m| (m.machine.as_str(), m.from.as_str(), m.to.as_str()))
        .collect()
}

#[test]
fn a_lost_servers_machines_go_to_the_least_loaded_counting_those_just_given() {
    let servers = [lost("ps-a", 17), ps("ps-b"), ps("ps-c")];
    let cands = on("ps-a", &["m1", "m2", "m3", "m4"]);
    let moves = run(&servers, &[("ps-a", 4), ("ps-b", 1)], &cands, NOW);
    assert_eq!(
        short(&moves),
        [
            ("m1", "ps-a", "ps-c"),
            ("m2", "ps-a", "ps-b"),
            ("m3", "ps-a", "ps-c"),
            ("m4", "ps-a", "ps-b"),
        ]
    );
    assert_eq!(
        moves[0].message(),
        "process server ps-a not seen for 17 s: moved to ps-c"
    );
}

#[test]
fn three_heartbeats_of_silence_is_not_yet_lost() {
    let servers = [lost("ps-a", NOT_SEEN_S), ps("ps-b")];
    let cands = on("ps-a", &["m1"]);
    assert_eq!(run(&servers, &[("ps-a", 1)], &cands, NOW), []);
    let servers = [lost("ps-a", NOT_SEEN_S + 1), ps("ps-b")];
    assert_eq!(run(&servers, &[("ps-a", 1)], &cands, NOW).len(), 1);
}

#[test]
fn a_control_plane_just_started_waits_three_heartbeats_before_calling_a_server_lost() {
    // Down for a minute, the control plane has heard nobody since it started: their
    // last heartbeats are old but not their fault.
    let servers = [lost("ps-a", 60), lost("ps-b", 58)];
    let cands = on("ps-a", &["m1"]);
    let f = |since: f64| {
        plan(&Fleet {
            servers: &servers,
            loads: &loads(&[("ps-a", 1)]),
            candidates: &cands,
            now: NOW,
            watching_since: since,
        })
    };
    assert_eq!(f(NOW - 5.0), []);
    // Once it has listened long enough, silence is loss (and with both lost, there
    // is nowhere to go).
    assert_eq!(f(NOW - 16.0), []);
    let servers = [lost("ps-a", 60), ps("ps-b")];
    let moves = plan(&Fleet {
        servers: &servers,
        loads: &loads(&[("ps-a", 1)]),
        candidates: &cands,
        now: NOW,
        watching_since: NOW - 16.0,
    });
    assert_eq!(short(&moves), [("m1", "ps-a", "ps-b")]);
}

#[test]
fn a_critical_servers_machines_move_and_the_event_says_why() {
    let mut full = ps("ps-a");
    full.row.cache_used_bytes = 80;
    full.row.cache_free_bytes = 20;
    let mut lagging = ps("ps-b");
    lagging.row.reported_health = "critical".into();
    lagging.row.reported_reasons = vec!["upload lag 2800 s over 2700 s".into()];
    let servers = [full, lagging, ps("ps-c")];
    let mut cands = on("ps-a", &["m1"]);
    cands.extend(on("ps-b", &["m2"]));
    let moves = run(&servers, &[("ps-a", 1), ("ps-b", 1)], &cands, NOW);
    assert_eq!(
        short(&moves),
        [("m1", "ps-a", "ps-c"), ("m2", "ps-b", "ps-c")]
    );
    assert_eq!(
        moves[0].message(),
        "process server ps-a is critical (cache 20.0 % free (under 25 %)): moved to ps-c"
    );
    assert_eq!(
        moves[1].why,
        "process server ps-b is critical (reports: upload lag 2800 s over 2700 s)"
    );
}

#[test]
fn a_warning_server_keeps_its_machines_and_takes_others_after_the_normal_ones() {
    let mut warm = ps("ps-a");
    warm.row.cache_used_bytes = 72;
    warm.row.cache_free_bytes = 28;
    warm.normal_since = None;
    let servers = [warm, lost("ps-b", 30), ps("ps-c")];
    let mut cands = on("ps-a", &["m1"]);
    cands.extend(on("ps-b", &["m2", "m3"]));
    let moves = run(
        &servers,
        &[("ps-a", 1), ("ps-b", 2), ("ps-c", 1)],
        &cands,
        NOW,
    );
    // Equal load: the normal one first; then ps-a, now the least loaded.
    assert_eq!(
        short(&moves),
        [("m2", "ps-b", "ps-c"), ("m3", "ps-b", "ps-a")]
    );
}

#[test]
fn with_no_healthy_target_nothing_moves() {
    let mut critical = ps("ps-b");
    critical.row.reported_health = "critical".into();
    let servers = [lost("ps-a", 40), critical];
    let cands = on("ps-a", &["m1", "m2"]);
    assert_eq!(run(&servers, &[("ps-a", 2)], &cands, NOW), []);
    assert_eq!(run(&[lost("ps-a", 40)], &[("ps-a", 2)], &cands, NOW), []);
}

#[test]
fn machines_of_a_removed_server_move() {
    // ps-gone has no row (removed servers are not listed).
    let servers = [ps("ps-b"), ps("ps-c")];
    let cands = on("ps-gone", &["m1", "m2"]);
    let moves = run(&servers, &[("ps-gone", 2), ("ps-c", 1)], &cands, NOW);
    assert_eq!(
        short(&moves),
        [("m1", "ps-gone", "ps-b"), ("m2", "ps-gone", "ps-b")]
    );
    assert_eq!(
        moves[0].message(),
        "process server ps-gone is removed: moved to ps-b"
    );
}

#[test]
fn an_overloaded_server_sheds_until_the_difference_is_under_the_margin() {
    let servers = [ps("ps-a"), ps("ps-b"), ps("ps-c")];
    let cands = on("ps-a", &["m1", "m2", "m3", "m4", "m5", "m6"]);
    let moves = run(
        &servers,
        &[("ps-a", 6), ("ps-b", 1), ("ps-c", 0)],
        &cands,
        NOW,
    );
    // 6/1/0 -> 5/1/1 -> 4/2/1 -> 3/2/2: then 3 - 2 < 2.
    assert_eq!(
        short(&moves),
        [
            ("m1", "ps-a", "ps-c"),
            ("m2", "ps-a", "ps-b"),
            ("m3", "ps-a", "ps-c"),
        ]
    );
    assert_eq!(
        moves[0].message(),
        "process server ps-a is overloaded (6 machines; ps-c has 0): moved to ps-c"
    );
    // One machine over is balanced enough: nothing moves (no ping-pong).
    assert_eq!(
        run(&servers[..2], &[("ps-a", 2), ("ps-b", 1)], &cands, NOW),
        []
    );
}

#[test]
fn a_server_back_from_the_dead_takes_shed_machines_only_once_settled() {
    // ps-a came back 2 minutes ago, empty; ps-b took all its machines.
    let mut back = ps("ps-a");
    back.normal_since = Some(NOW as i64 - 120);
    let cands = on("ps-b", &["m1", "m2", "m3", "m4"]);
    let l = [("ps-b", 4)];
    assert_eq!(run(&[back.clone(), ps("ps-b")], &l, &cands, NOW), []);
    // Settled (normal for SETTLE_S): it gets its share back.
    back.normal_since = Some(NOW as i64 - SETTLE_S);
    let moves = run(&[back, ps("ps-b")], &l, &cands, NOW);
    assert_eq!(
        short(&moves),
        [("m1", "ps-b", "ps-a"), ("m2", "ps-b", "ps-a")]
    );
}

#[test]
fn a_flapping_server_does_not_bounce_machines() {
    // The machines left ps-a a minute ago when it was lost; it is back and settled
    // (a bad clock or a long-normal flap), but they stay inside the rate window.
    let moved = NOW as i64 - 60;
    let cands: Vec<Candidate> = on("ps-b", &["m1", "m2", "m3", "m4"])
        .into_iter()
        .map(|c| Candidate {
            moved_at: Some(moved),
            ..c
        })
        .collect();
    let servers = [ps("ps-a"), ps("ps-b")];
    assert_eq!(run(&servers, &[("ps-b", 4)], &cands, NOW), []);
    // And if ps-b is lost now, they wait out the window too rather than bounce.
    let servers = [ps("ps-a"), lost("ps-b", 20)];
    assert_eq!(run(&servers, &[("ps-b", 4)], &cands, NOW), []);
    // After the window they may move again.
    let later = moved as f64 + COOLDOWN_S as f64;
    let mut servers = [ps("ps-a"), ps("ps-b")];
    for s in &mut servers {
        s.row.last_seen = later as i64 - 1;
    }
    let moves = run(&servers, &[("ps-b", 4)], &cands, later);
    assert_eq!(moves.len(), 2);
}

#[test]
fn an_operators_move_is_not_undone_within_the_window() {
    // The operator put m1 on ps-a, already the busiest.
    let mut cands = on("ps-a", &["m0", "m1"]);
    cands[1].moved_at = Some(NOW as i64 - COOLDOWN_S + 1);
    let servers = [ps("ps-a"), ps("ps-b")];
    let moves = run(&servers, &[("ps-a", 4), ("ps-b", 0)], &cands, NOW);
    // m0 may go (and does, once: 4/0 -> 3/1); m1 stays.
    assert_eq!(short(&moves), [("m0", "ps-a", "ps-b")]);
    assert!(!may_move(cands[1].moved_at, NOW));
    assert!(may_move(cands[1].moved_at, NOW + 1.0));
}

#[test]
fn at_most_the_cap_moves_per_sweep_evacuations_first() {
    let names: Vec<String> = (0..40).map(|i| format!("m{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut cands = on("ps-a", &refs);
    cands.extend(on("ps-c", &["x1", "x2", "x3"]));
    let servers = [lost("ps-a", 30), ps("ps-b"), ps("ps-c")];
    let moves = run(&servers, &[("ps-a", 40), ("ps-c", 3)], &cands, NOW);
    assert_eq!(moves.len(), MOVES_PER_SWEEP);
    assert!(moves.iter().all(|m| m.from == "ps-a"), "{moves:?}");
}

#[test]
fn normal_since_starts_at_the_first_normal_sweep_and_breaks_on_any_other() {
    assert_eq!(normal_since(None, Health::Normal, 50.5), Some(50));
    assert_eq!(normal_since(Some(10), Health::Normal, 50.0), Some(10));
    assert_eq!(normal_since(Some(10), Health::Warning, 50.0), None);
    assert_eq!(normal_since(Some(10), Health::Critical, 50.0), None);
}
