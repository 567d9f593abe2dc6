//! The deliverer against a receiver in the test: signatures, retries, a receiver
//! that hangs, two control planes on one database.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use ring::hmac;

use super::deliver::{run, signature, DelivererConfig};
use super::store;
use crate::db::Db;
use crate::registry::events;

/// What the receiver got: each request's headers and body.
type Got = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A receiver answering the statuses in `script` in turn, then 200.
async fn receiver(script: Vec<u16>) -> (SocketAddr, Got) {
    let got: Got = Arc::default();
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let (g, sc) = (got.clone(), script.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let (g, sc) = (g.clone(), sc.clone());
            async move {
                g.lock().unwrap().push((headers, body));
                let code = sc.lock().unwrap().pop_front().unwrap_or(200);
                StatusCode::from_u16(code).unwrap()
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (addr, got)
}

fn fast(owner: &str) -> DelivererConfig {
    DelivererConfig {
        poll: Duration::from_millis(50),
        first_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_tries: 3,
        attempt_timeout: Duration::from_secs(2),
        ..DelivererConfig::new(owner.to_string())
    }
}

async fn db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
    (dir, db)
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < until, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The webhook's row once its cursor reached `id`; panics after 20 s.
async fn cursor_at(db: &Db, name: &str, id: i64) -> store::WebhookRow {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let row = store::get(db, name).await.unwrap().unwrap();
        if row.cursor == id {
            return row;
        }
        assert!(
            std::time::Instant::now() < until,
            "cursor stuck at {}",
            row.cursor
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).unwrap().to_str().unwrap()
}

#[tokio::test]
async fn events_of_its_kinds_are_posted_signed_the_others_passed_over() {
    let (_dir, db) = db().await;
    // An event from before the webhook: not sent.
    events::add(&db, "health", "machine old", "before", 1)
        .await
        .unwrap();
    let (addr, got) = receiver(vec![]).await;
    let secret = "ferry_whsec_test";
    let url = format!("http://{addr}/hook");
    assert!(store::create(&db, "ops", &url, &["health".into()], secret)
        .await
        .unwrap());
    assert!(!store::create(&db, "ops", &url, &["health".into()], "x")
        .await
        .unwrap());
    events::add(&db, "registered", "machine m1", "first heartbeat", 2)
        .await
        .unwrap();
    let id = events::add(&db, "health", "machine m1", "health normal -> critical", 3)
        .await
        .unwrap();
    tokio::spawn(run(db.clone(), fast("cp-a")));
    wait_for("one delivery", || !got.lock().unwrap().is_empty()).await;
    // Nothing more comes: the older and the other kind's events are not sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let (h, body) = &got[0];
    let sig = header(h, "ferry-signature");
    let hex_mac = sig.strip_prefix("sha256=").unwrap();
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(&key, body, &hex::decode(hex_mac).unwrap()).expect("the signature verifies");
    assert_eq!(sig, signature(secret, body));
    assert_eq!(header(h, "ferry-event"), "health");
    assert_eq!(header(h, "ferry-delivery"), id.to_string());
    assert_eq!(header(h, "content-type"), "application/json");
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["webhook"], "ops");
    assert_eq!(v["sent_at"].to_string(), header(h, "ferry-timestamp"));
    assert_eq!(v["event"]["id"], id);
    assert_eq!(v["event"]["subject"], "machine m1");
    assert_eq!(v["event"]["message"], "health normal -> critical");
    // The cursor moves once the answer is in, after the receiver saw the request.
    let row = cursor_at(&db, "ops", id).await;
    assert_eq!((row.cursor, row.delivered, row.given_up), (id, 1, 0));
    // A body changed in flight fails the check.
    let mut forged = body.to_vec();
    forged[0] = b' ';
    assert!(hmac::verify(&key, &forged, &hex::decode(hex_mac).unwrap()).is_err());
}

#[tokio::test]
async fn a_receiver_answering_500_is_tried_again_then_given_up_on() {
    let (_dir, db) = db().await;
    // First event: 500, 500, then 200 on the third try. Second: 500 three times.
    let (addr, got) = receiver(vec![500, 500, 200, 500, 503, 500]).await;
    let url = format!("http://{addr}/hook");
    let kinds = ["job-failed".to_string()];
    assert!(store::create(&db, "ci", &url, &kinds, "s").await.unwrap());
    let first = events::add(&db, "job-failed", "job j1", "retention failed", 1)
        .await
        .unwrap();
    let second = events::add(&db, "job-failed", "job j2", "retention failed", 2)
        .await
        .unwrap();
    let third = events::add(&db, "job-failed", "job j3", "retention failed", 3)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    tokio::spawn(run(db.clone(), fast("cp-a")));
    wait_for("seven tries", || got.lock().unwrap().len() >= 7).await;
    let ids: Vec<String> = got
        .lock()
        .unwrap()
        .iter()
        .map(|(h, _)| header(h, "ferry-delivery").to_string())
        .collect();
    let (f, s, t) = (first.to_string(), second.to_string(), third.to_string());
    assert_eq!(ids, [&f, &f, &f, &s, &s, &s, &t].map(String::clone));
    // Backoff: 50 + 100 ms for the first, 50 + 100 for the second.
    assert!(started.elapsed() >= Duration::from_millis(300));
    let row = cursor_at(&db, "ci", third).await;
    assert_eq!((row.delivered, row.given_up), (2, 1));
    let err = row.last_error.unwrap();
    assert!(
        err.contains(&format!("event {second}")) && err.contains("500"),
        "{err}"
    );
    assert!(err.contains("try 3 of 3"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_holds_up_nobody_else() {
    let (_dir, db) = db().await;
    // Accepts connections and never reads or answers them.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = dead.accept().await {
            held.push(c);
        }
    });
    let (addr, got) = receiver(vec![]).await;
    let kinds = ["health".to_string()];
    let dead_url = format!("http://{dead_addr}/hook");
    assert!(store::create(&db, "a-dead", &dead_url, &kinds, "s1")
        .await
        .unwrap());
    let live_url = format!("http://{addr}/hook");
    assert!(store::create(&db, "b-live", &live_url, &kinds, "s2")
        .await
        .unwrap());
    let cfg = DelivererConfig {
        attempt_timeout: Duration::from_secs(30),
        ..fast("cp-a")
    };
    tokio::spawn(run(db.clone(), cfg));
    let started = std::time::Instant::now();
    for i in 0..3 {
        events::add(&db, "health", "machine m1", &format!("change {i}"), i)
            .await
            .unwrap();
    }
    wait_for("three deliveries to the live one", || {
        got.lock().unwrap().len() == 3
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the live receiver waited {:?} behind the dead one",
        started.elapsed()
    );
    // Writing events (what heartbeats and the sweep do) never waits for a delivery.
    let t = std::time::Instant::now();
    for i in 0..20 {
        events::add(&db, "health", "machine m2", "x", 10 + i)
            .await
            .unwrap();
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let dead_row = store::get(&db, "a-dead").await.unwrap().unwrap();
    assert_eq!(dead_row.delivered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_on_one_database_send_each_event_once() {
    let (_dir, db) = db().await;
    let (addr, got) = receiver(vec![]).await;
    let url = format!("http://{addr}/hook");
    assert!(store::create(&db, "ops", &url, &["health".into()], "s")
        .await
        .unwrap());
    tokio::spawn(run(db.clone(), fast("cp-a")));
    tokio::spawn(run(db.clone(), fast("cp-b")));
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(
            events::add(&db, "health", "machine m", &format!("{i}"), i)
                .await
                .unwrap(),
        );
        if i % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
    wait_for("thirty deliveries", || got.lock().unwrap().len() >= 30).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent: Vec<i64> = got
        .lock()
        .unwrap()
        .iter()
        .map(|(h, _)| header(h, "ferry-delivery").parse().unwrap())
        .collect();
    assert_eq!(sent, ids, "each once, in order");
    // The lease is one control plane's; the other's claim fails while it holds.
    let now = chrono::Utc::now().timestamp_millis();
    let a = store::claim(&db, "ops", "cp-a", now, 60_000).await.unwrap();
    let b = store::claim(&db, "ops", "cp-b", now, 60_000).await.unwrap();
    assert!(a != b, "exactly one holds it: a {a}, b {b}");
    // Once it runs out, the other takes it over.
    let later = now + 120_000;
    assert!(store::claim(&db, "ops", "cp-c", later, 60_000)
        .await
        .unwrap());
}

#[tokio::test]
async fn a_deleted_webhook_stops_being_sent() {
    let (_dir, db) = db().await;
    let (addr, got) = receiver(vec![]).await;
    let url = format!("http://{addr}/hook");
    assert!(store::create(&db, "ops", &url, &["fencing".into()], "s")
        .await
        .unwrap());
    tokio::spawn(run(db.clone(), fast("cp-a")));
    events::add(&db, "fencing", "machine m", "fenced", 1)
        .await
        .unwrap();
    wait_for("one delivery", || got.lock().unwrap().len() == 1).await;
    assert!(store::delete(&db, "ops").await.unwrap());
    assert!(!store::delete(&db, "ops").await.unwrap());
    events::add(&db, "fencing", "machine m", "fenced again", 2)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(got.lock().unwrap().len(), 1);
}

/// With nothing new to send, a worker only reads: it takes no lease (no write).
#[tokio::test]
async fn an_idle_webhook_costs_no_write() {
    let (_dir, db) = db().await;
    events::add(&db, "health", "machine m", "old", 1)
        .await
        .unwrap();
    let (addr, got) = receiver(vec![]).await;
    let url = format!("http://{addr}/hook");
    assert!(store::create(&db, "ops", &url, &["health".into()], "s")
        .await
        .unwrap());
    tokio::spawn(run(db.clone(), fast("cp-a")));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(store::for_delivery(&db, "ops", "cp-a")
        .await
        .unwrap()
        .is_none());
    // Something new: now it claims and sends.
    events::add(&db, "health", "machine m", "new", 2)
        .await
        .unwrap();
    wait_for("one delivery", || got.lock().unwrap().len() == 1).await;
    assert!(store::for_delivery(&db, "ops", "cp-a")
        .await
        .unwrap()
        .is_some());
}

#[test]
fn backoff_doubles_up_to_its_cap() {
    let cfg = DelivererConfig::new("x".into());
    let secs: Vec<u64> = (1..=7).map(|n| cfg.backoff(n).as_secs()).collect();
    assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30]);
    assert_eq!(cfg.backoff(200), cfg.max_backoff);
}

/// Every query of the webhooks' store and of the dashboard's sessions, on one backend
/// (`db::tests::every_query` runs it on SQLite and on the test PostgreSQL).
pub(crate) async fn every_query(db: &Db) {
    use crate::dashboard::session;
    // The cursor starts at the newest event.
    let before = events::add(db, "health", "machine w", "before", 1)
        .await
        .unwrap();
    assert_eq!(events::newest_id(db).await.unwrap(), before);
    let kinds = ["health".to_string(), "fencing".to_string()];
    assert!(
        store::create(db, "w1", "https://h.example/x", &kinds, "sec")
            .await
            .unwrap()
    );
    assert!(!store::create(db, "w1", "https://other", &kinds, "s2")
        .await
        .unwrap());
    assert!(
        store::create(db, "w2", "https://h.example/y", &kinds[..1], "s3")
            .await
            .unwrap()
    );
    let w1 = store::get(db, "w1").await.unwrap().unwrap();
    assert_eq!((w1.cursor, w1.events.clone()), (before, kinds.to_vec()));
    let names: Vec<String> = store::list(db, None, 1)
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, ["w1"]);
    let names: Vec<String> = store::list(db, Some("w1"), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(names, ["w2"]);
    // The lease: one holder until it runs out.
    assert!(store::for_delivery(db, "w1", "a").await.unwrap().is_none());
    assert!(store::claim(db, "w1", "a", 1_000, 500).await.unwrap());
    assert!(!store::claim(db, "w1", "b", 1_200, 500).await.unwrap());
    assert!(store::claim(db, "w1", "a", 1_200, 500).await.unwrap());
    let fd = store::for_delivery(db, "w1", "a").await.unwrap().unwrap();
    assert_eq!(fd.secret, "sec");
    assert!(store::for_delivery(db, "w1", "b").await.unwrap().is_none());
    // The cursor moves only from where it is, under the lease.
    let to = before + 5;
    assert!(
        !store::advance(db, "w1", "b", before, to, store::Outcome::Delivered)
            .await
            .unwrap()
    );
    assert!(
        !store::advance(db, "w1", "a", before - 1, to, store::Outcome::Delivered)
            .await
            .unwrap()
    );
    assert!(
        store::advance(db, "w1", "a", before, to, store::Outcome::Delivered)
            .await
            .unwrap()
    );
    assert!(
        store::advance(db, "w1", "a", to, to + 1, store::Outcome::GivenUp)
            .await
            .unwrap()
    );
    assert!(
        store::advance(db, "w1", "a", to + 1, to + 2, store::Outcome::Skipped)
            .await
            .unwrap()
    );
    store::set_error(db, "w1", "event 7 to h.example: answered 500", 99)
        .await
        .unwrap();
    let w1 = store::get(db, "w1").await.unwrap().unwrap();
    assert_eq!((w1.cursor, w1.delivered, w1.given_up), (to + 2, 1, 1));
    assert_eq!(w1.last_error_at, Some(99));
    // Past the lease another takes over.
    assert!(store::claim(db, "w1", "b", 1_701, 500).await.unwrap());
    assert!(store::delete(db, "w1").await.unwrap());
    assert!(!store::delete(db, "w1").await.unwrap());
    assert!(!store::claim(db, "w1", "b", 2_000, 500).await.unwrap());
    assert!(store::delete(db, "w2").await.unwrap());

    // Sessions: signed in by a live token only, bounded per token, ended with it.
    let secret = crate::enroll::tokens::new_secret();
    let h = crate::enroll::tokens::hash(&secret);
    assert!(crate::db::tokens::create(db, "dash", "viewer", &h)
        .await
        .unwrap());
    assert!(session::sign_in(db, "ferry_unknown")
        .await
        .unwrap()
        .is_none());
    let mut values = Vec::new();
    for _ in 0..session::SESSIONS_PER_TOKEN + 2 {
        let (v, who) = session::sign_in(db, &secret).await.unwrap().unwrap();
        assert_eq!(
            (who.token_name.as_str(), who.role.as_str()),
            ("dash", "viewer")
        );
        values.push(v);
    }
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM dashboard_sessions")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(n, session::SESSIONS_PER_TOKEN);
    let last = values.last().unwrap();
    assert_eq!(
        session::find(db, last).await.unwrap().unwrap().token_name,
        "dash"
    );
    session::end(db, last).await.unwrap();
    assert!(session::find(db, last).await.unwrap().is_none());
    let other = &values[values.len() - 2];
    assert!(session::find(db, other).await.unwrap().is_some());
    assert!(crate::db::tokens::delete(db, "dash").await.unwrap());
    assert!(session::find(db, other).await.unwrap().is_none());
}
