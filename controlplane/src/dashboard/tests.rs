//! The dashboard served over HTTP in the test: signing in and out, sessions that end
//! with their token, what the page shows.

use std::sync::Arc;
use std::time::Duration;

use crate::db::Db;
use crate::enroll::tokens::{hash, new_secret};
use crate::jobs::queue;
use crate::registry::events;

struct Site {
    _dir: tempfile::TempDir,
    db: Db,
    url: String,
    http: reqwest::Client,
}

async fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&Db::default_url(dir.path())).await.unwrap();
    let ca = crate::enroll::ca::SiteCa::open_or_create(dir.path()).unwrap();
    let jobs = crate::jobs::runner::Context {
        db: db.clone(),
        store: None,
        wake: Arc::new(tokio::sync::Notify::new()),
    };
    let app = crate::api::router(db.clone(), Arc::new(ca), jobs).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    // No redirects followed: the test looks at the 303 itself.
    let http = crate::webhooks::deliver::http_client(Duration::from_secs(10)).unwrap();
    Site {
        _dir: dir,
        db,
        url,
        http,
    }
}

impl Site {
    async fn token(&self, name: &str, role: &str) -> String {
        let secret = new_secret();
        assert!(
            crate::db::tokens::create(&self.db, name, role, &hash(&secret))
                .await
                .unwrap()
        );
        secret
    }

    /// `POST /sign-in`: the status and the Set-Cookie header.
    async fn sign_in(&self, token: &str) -> (u16, Option<String>, String) {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .finish();
        let resp = self
            .http
            .post(format!("{}/sign-in", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let cookie = resp
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        (status, cookie, resp.text().await.unwrap())
    }

    /// `GET /` with the cookie `ferry_session=VALUE`.
    async fn page(&self, value: Option<&str>) -> (u16, reqwest::header::HeaderMap, String) {
        let mut req = self.http.get(format!("{}/", self.url));
        if let Some(v) = value {
            req = req.header("cookie", format!("theme=dark; ferry_session={v}"));
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        (status, headers, resp.text().await.unwrap())
    }
}

/// The session's value in a Set-Cookie header.
fn value_of(set_cookie: &str) -> String {
    let first = set_cookie.split(';').next().unwrap();
    first.strip_prefix("ferry_session=").unwrap().to_string()
}

#[tokio::test]
async fn a_viewer_signs_in_with_a_form_and_sees_the_fleet() {
    let s = site().await;
    // Signed out: the form, nothing of the fleet.
    events::add(
        &s.db,
        "health",
        "machine db1",
        "health normal -> critical",
        1,
    )
    .await
    .unwrap();
    let (st, headers, html) = s.page(None).await;
    assert_eq!(st, 200);
    assert!(html.contains("action=\"/sign-in\""), "{html}");
    assert!(!html.contains("machine db1"), "{html}");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    // A token in the query string signs nobody in.
    let viewer = s.token("wall", "viewer").await;
    let resp = s
        .http
        .get(format!("{}/?token={viewer}", s.url))
        .send()
        .await
        .unwrap();
    assert!(!resp.text().await.unwrap().contains("machine db1"));

    let (st, _, html) = s.sign_in("ferry_not_a_token").await;
    assert_eq!(st, 401);
    assert!(html.contains("Unknown or deleted token."), "{html}");
    let (st, _, _) = s.sign_in("").await;
    assert_eq!(st, 400);

    let (st, cookie, _) = s.sign_in(&viewer).await;
    assert_eq!(st, 303);
    let cookie = cookie.unwrap();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let value = value_of(&cookie);
    assert_eq!(value.len(), 64);
    assert!(!cookie.contains(&viewer), "the token is not the cookie");
    // The store keeps the session's hash, not its value.
    let row: (String,) = sqlx::query_as("SELECT id_sha256 FROM dashboard_sessions")
        .fetch_one(s.db.pool())
        .await
        .unwrap();
    assert_eq!(row.0, hash(&value));

    // A job half-way through its second of two tasks: 75 %.
    let tasks = ["scan".to_string(), "compact".to_string()];
    let id = queue::enqueue(&s.db, "retention", "db1", &serde_json::json!({}), &tasks)
        .await
        .unwrap()
        .unwrap();
    let now = queue::now_ms();
    assert!(queue::claim(&s.db, &id, "test", now, 600_000)
        .await
        .unwrap());
    assert!(queue::task_started(&s.db, &id, "test", 0).await.unwrap());
    assert!(queue::task_ended(&s.db, &id, "test", 0, None)
        .await
        .unwrap());
    assert!(queue::task_started(&s.db, &id, "test", 1).await.unwrap());
    assert!(queue::task_progress(&s.db, &id, "test", 1, 0.5)
        .await
        .unwrap());

    let (st, headers, html) = s.page(Some(&value)).await;
    assert_eq!(st, 200, "{html}");
    assert!(html.contains("signed in as wall"), "{html}");
    assert!(html.contains("machine db1") && html.contains("health normal -&gt; critical"));
    assert!(html.contains(&format!("data-job=\"{id}\"")), "{html}");
    assert!(
        html.contains("value=\"75\"") && html.contains("75 %"),
        "{html}"
    );
    assert!(html.contains("<td>compact</td>"), "{html}");
    assert_eq!(headers["cache-control"], "no-store");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
}

#[tokio::test]
async fn a_session_ends_with_its_token_or_on_signing_out() {
    let s = site().await;
    let ops = s.token("ops", "operator").await;
    let (_, cookie, _) = s.sign_in(&ops).await;
    let value = value_of(&cookie.unwrap());
    assert!(s.page(Some(&value)).await.2.contains("signed in as ops"));
    // Deleting the token ends its sessions at once.
    assert!(crate::db::tokens::delete(&s.db, "ops").await.unwrap());
    let (st, _, html) = s.page(Some(&value)).await;
    assert_eq!(st, 200);
    assert!(html.contains("Your session ended"), "{html}");

    let admin = s.token("boss", "admin").await;
    let (_, cookie, _) = s.sign_in(&admin).await;
    let value = value_of(&cookie.unwrap());
    assert!(s.page(Some(&value)).await.2.contains("signed in as boss"));
    let resp = s
        .http
        .post(format!("{}/sign-out", s.url))
        .header("cookie", format!("ferry_session={value}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 303);
    let cleared = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cleared.starts_with("ferry_session=;") && cleared.contains("Max-Age=0"));
    assert!(s.page(Some(&value)).await.2.contains("Your session ended"));
    // A made-up cookie signs nobody in either.
    assert!(!s
        .page(Some(&"0".repeat(64)))
        .await
        .2
        .contains("signed in as"));
}

#[tokio::test]
async fn a_token_holds_a_bounded_number_of_sessions() {
    let s = site().await;
    let t = s.token("kiosk", "viewer").await;
    let mut values = Vec::new();
    for _ in 0..super::session::SESSIONS_PER_TOKEN + 3 {
        let (st, cookie, _) = s.sign_in(&t).await;
        assert_eq!(st, 303);
        values.push(value_of(&cookie.unwrap()));
    }
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM dashboard_sessions")
        .fetch_one(s.db.pool())
        .await
        .unwrap();
    assert_eq!(n, super::session::SESSIONS_PER_TOKEN);
    // The newest still signs in.
    let newest = values.last().unwrap();
    assert!(s.page(Some(newest)).await.2.contains("signed in as kiosk"));
}
