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

impl Site {
    /// `POST PATH` as a form with the session cookie; status, Location and body.
    async fn post_form(
        &self,
        path: &str,
        value: &str,
        fields: &[(&str, &str)],
    ) -> (u16, String, String) {
        let mut ser = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in fields {
            ser.append_pair(k, v);
        }
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .header("cookie", format!("ferry_session={value}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(ser.finish())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (status, location, resp.text().await.unwrap())
    }

    async fn session(&self, name: &str, role: &str) -> String {
        let token = self.token(name, role).await;
        let (_, cookie, _) = self.sign_in(&token).await;
        value_of(&cookie.unwrap())
    }
}

async fn machine(db: &Db, name: &str) {
    let beat = crate::registry::machines::Beat {
        name,
        state: "protected",
        disks: &[],
        last_error: None,
        newest_uploaded_at: None,
        group_listen: None,
        now: crate::db::now_s(),
    };
    crate::registry::machines::heartbeat(db, &beat)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_operators_button_runs_the_api_as_its_session_and_a_viewers_is_refused() {
    let s = site().await;
    machine(&s.db, "m1").await;
    let id = queue::enqueue(
        &s.db,
        "retention",
        "m1",
        &serde_json::json!({}),
        &["scan".to_string()],
    )
    .await
    .unwrap()
    .unwrap();
    let ops = s.session("ops", "operator").await;
    let token = super::actions::form_token(&ops);
    let html = s.page(Some(&ops)).await.2;
    // The operator's page holds the buttons, each with the session's form token.
    assert!(
        html.contains(&format!("action=\"/act/jobs/{id}/cancel\"")),
        "{html}"
    );
    assert!(
        html.contains("action=\"/act/machines/m1/test-failover\""),
        "{html}"
    );
    assert!(html.contains(&format!("value=\"{token}\"")), "{html}");
    let cancel = format!("/act/jobs/{id}/cancel");

    // Without the form token (another site's form), or with another session's: no.
    let (st, _, html) = s.post_form(&cancel, &ops, &[("confirm", "yes")]).await;
    assert_eq!(st, 403, "{html}");
    assert!(html.contains("Nothing was done"), "{html}");
    let other = s.session("other", "operator").await;
    let (st, _, _) = s
        .post_form(
            &cancel,
            &ops,
            &[
                ("form_token", &super::actions::form_token(&other)),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(st, 403);
    // Signed out: back to the sign-in form, nothing done.
    let (st, location, _) = s
        .post_form(&cancel, &"0".repeat(64), &[("form_token", &token)])
        .await;
    assert_eq!((st, location.as_str()), (303, "/"));
    assert_eq!(
        queue::get(&s.db, &id).await.unwrap().unwrap().state,
        crate::jobs::JobState::Queued
    );

    // A viewer who forged the form gets the API's own refusal: the button runs as
    // its session's token, with that token's role.
    let viewer = s.session("wall", "viewer").await;
    let viewer_html = s.page(Some(&viewer)).await.2;
    assert!(
        !viewer_html.contains("<form class=\"act\""),
        "{viewer_html}"
    );
    let (st, _, html) = s
        .post_form(
            &cancel,
            &viewer,
            &[
                ("form_token", &super::actions::form_token(&viewer)),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(st, 403, "{html}");
    assert!(
        html.contains("token wall has role viewer; this needs operator"),
        "{html}"
    );

    // The operator: asked to confirm first, then done, and back to the dashboard.
    let (st, _, html) = s.post_form(&cancel, &ops, &[("form_token", &token)]).await;
    assert_eq!(st, 200, "{html}");
    assert!(
        html.contains("name=\"confirm\" value=\"yes\"") && html.contains(&cancel),
        "{html}"
    );
    assert_eq!(
        queue::get(&s.db, &id).await.unwrap().unwrap().state,
        crate::jobs::JobState::Queued
    );
    let (st, location, html) = s
        .post_form(&cancel, &ops, &[("form_token", &token), ("confirm", "yes")])
        .await;
    assert_eq!((st, location.as_str()), (303, "/"), "{html}");
    assert_eq!(
        queue::get(&s.db, &id).await.unwrap().unwrap().state,
        crate::jobs::JobState::Cancelled
    );
    // Cancelling it again: the API's 409, shown.
    let (st, _, html) = s
        .post_form(&cancel, &ops, &[("form_token", &token), ("confirm", "yes")])
        .await;
    assert_eq!(st, 409, "{html}");
    assert!(html.contains("cannot cancel"), "{html}");

    // A machine's button the dashboard itself refuses: a cleanup without a verdict,
    // an unknown action.
    let (st, _, html) = s
        .post_form(
            "/act/machines/m1/test-failover-cleanup",
            &ops,
            &[("form_token", &token)],
        )
        .await;
    assert_eq!(st, 400, "{html}");
    assert!(html.contains("verdict must be passed or failed"), "{html}");
    let (st, _, _) = s
        .post_form("/act/machines/m1/reboot", &ops, &[("form_token", &token)])
        .await;
    assert_eq!(st, 404);
    // A commit of a machine that never failed over is refused by the API (409 once
    // the recovery jobs are served, 404 before), and says so.
    let (st, _, html) = s
        .post_form(
            "/act/machines/m1/commit",
            &ops,
            &[("form_token", &token), ("confirm", "yes")],
        )
        .await;
    assert!((400..500).contains(&st), "{st} {html}");
    assert!(html.contains("Commit of machine m1: "), "{html}");
}

/// Disk sda of `machine` at `point`, served by recovery host rh1 for job `job` (its
/// first task's item): the item's id.
async fn served(db: &Db, job: &str, machine: &str, point: &str) -> String {
    use crate::recovery::work;
    use ferry_link::control::wire::{
        DiskPoint, DiskProgress, ReadyDisk, WorkOp, WorkReport, WorkResult,
    };
    let now = crate::db::now_s();
    let item = work::item_id(job, 0, machine);
    let op = WorkOp::Serve {
        disks: vec![DiskPoint {
            disk: "sda".into(),
            point: point.into(),
        }],
    };
    work::submit(db, &item, "rh1", job, machine, &op, now)
        .await
        .unwrap();
    let report = WorkReport {
        id: item.clone(),
        state: "succeeded".into(),
        progress: 1.0,
        bytes_per_s: 0.0,
        error: None,
        result: Some(WorkResult {
            disks: vec![ReadyDisk {
                disk: "sda".into(),
                point: point.into(),
                path: None,
                nbd_url: Some(format!("nbd://127.0.0.1:10809/{machine}/sda")),
                bytes: 1 << 20,
            }],
            ..WorkResult::default()
        }),
        disks: vec![DiskProgress {
            disk: "sda".into(),
            progress: 1.0,
            bytes_per_s: 118e6,
            bytes_done: 1 << 20,
            bytes: 1 << 20,
        }],
    };
    work::record_reports(db, "rh1", &[report], now)
        .await
        .unwrap();
    item
}

#[tokio::test]
async fn the_page_shows_a_failover_a_waiting_test_its_disks_hosts_and_plans() {
    let s = site().await;
    for m in ["m1", "m2", "m3"] {
        machine(&s.db, m).await;
    }
    let now = crate::db::now_s();
    crate::recovery::work::host_heartbeat(&s.db, "rh1", "127.0.0.1:10809", 5 << 30, now, None)
        .await
        .unwrap();
    // m1: failed over (unplanned), committed not yet; its disk served by an item of
    // its failover job, which the row lists.
    let m1_item = served(&s.db, "j0000000000009-00000001", "m1", "p7").await;
    sqlx::query(
        "INSERT INTO machine_recovery (machine, state, active_site, planned, point, host, \
         items, job_id, updated_at) VALUES ('m1', 'failed-over', 'recovery', 0, \
         '{\"sda\":\"p7\"}', 'rh1', $1, NULL, $2)",
    )
    .bind(serde_json::json!([m1_item]).to_string())
    .bind(now)
    .execute(s.db.pool())
    .await
    .unwrap();
    // m2: a test failover waiting for its cleanup, its disk served.
    let tasks: Vec<String> = [
        "bring up disks",
        "start machine",
        "wait for cleanup",
        "clean up",
        "record verdict",
    ]
    .map(String::from)
    .to_vec();
    let id = queue::enqueue_keyed(
        &s.db,
        "test-failover",
        "m2",
        Some("recovery/m2"),
        &serde_json::json!({}),
        &tasks,
    )
    .await
    .unwrap()
    .unwrap();
    let t = queue::now_ms();
    assert!(queue::claim(&s.db, &id, "test", t, 600_000).await.unwrap());
    for seq in 0..2 {
        assert!(queue::task_started(&s.db, &id, "test", seq).await.unwrap());
        assert!(queue::task_ended(&s.db, &id, "test", seq, None)
            .await
            .unwrap());
    }
    assert!(queue::task_started(&s.db, &id, "test", 2).await.unwrap());
    assert!(queue::wait_for_input(
        &s.db,
        &id,
        "test",
        2,
        "Test m2, then clean up with a verdict"
    )
    .await
    .unwrap());
    served(&s.db, &id, "m2", "p3").await;
    sqlx::query("INSERT INTO recovery_plans (name, spec, created_at, updated_at) VALUES ('erp', $1, $2, $2)")
        .bind(r#"{"name":"erp","groups":[{"name":"db","machines":["m1"]},{"name":"app","machines":["m2","m3"]}]}"#)
        .bind(now)
        .execute(s.db.pool())
        .await
        .unwrap();

    let ops = s.session("ops", "operator").await;
    let html = s.page(Some(&ops)).await.2;
    let row = |needle: &str| {
        let at = html
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} not on the page: {html}"));
        let start = html[..at].rfind("<tr").unwrap();
        html[start..at + html[at..].find("</tr>").unwrap()].to_string()
    };
    // The machines' rows: where each runs, and its buttons by its state.
    let m1 = row("data-machine=\"m1\"");
    assert!(m1.contains("failed-over (recovery site), forward"), "{m1}");
    assert!(
        m1.contains("/act/machines/m1/commit") && m1.contains("/act/machines/m1/cancel"),
        "{m1}"
    );
    assert!(!m1.contains("/act/machines/m1/test-failover\""), "{m1}");
    // Not committed yet: its point can change, the form asking which.
    assert!(
        m1.contains("action=\"/act/machines/m1/change-point\"")
            && m1.contains("name=\"point\" value=\"latest\""),
        "{m1}"
    );
    let m2 = row("data-machine=\"m2\"");
    assert!(
        m2.contains("at home; test-failover waiting-for-input")
            && m2.contains("name=\"verdict\" value=\"passed\""),
        "{m2}"
    );
    assert!(!m2.contains("failover-planned"), "{m2}");
    let m3 = row("data-machine=\"m3\"");
    for a in ["test-failover", "failover-planned", "failover-unplanned"] {
        assert!(m3.contains(&format!("/act/machines/m3/{a}\"")), "{m3}");
    }
    // The recovery section: m1's failover, m2's waiting test with its prompt and disk.
    let r1 = row("data-recovery=\"m1\"");
    assert!(r1.contains("unplanned; point sda=p7; host rh1"), "{r1}");
    assert!(
        r1.contains("sda @ p7: nbd://127.0.0.1:10809/m1/sda"),
        "{r1}"
    );
    // Each disk's progress, as the job's JSON gives it.
    assert!(
        r1.contains("<div class=\"disk-progress\">sda 100.0 % 118 MB/s</div>"),
        "{r1}"
    );
    let r2 = row("data-recovery=\"m2\"");
    assert!(
        r2.contains("waiting-for-input") && r2.contains("Test m2, then clean up"),
        "{r2}"
    );
    assert!(
        r2.contains("sda @ p3: nbd://127.0.0.1:10809/m2/sda"),
        "{r2}"
    );
    assert!(r2.contains("sda 100.0 % 118 MB/s"), "{r2}");
    assert!(r2.contains("value=\"40\""), "two of five tasks: {r2}");
    assert!(!html.contains("data-recovery=\"m3\""), "{html}");
    let h = row("data-recovery-host=\"rh1\"");
    assert!(
        h.contains(">live<") && h.contains("5.0 GiB") && h.contains("<td class=\"num\">2</td>"),
        "{h}"
    );
    let p = row("data-plan=\"erp\"");
    assert!(
        p.contains("<td class=\"num\">2</td><td class=\"num\">3</td>"),
        "{p}"
    );
    assert!(!m2.contains("change-point") && !m3.contains("change-point"));
    // The change of point: confirmed first (the point carried along), then sent
    // through the API as the session: this control plane has no store to find the
    // point in, and the API says so.
    let token = super::actions::form_token(&ops);
    let url = "/act/machines/m1/change-point";
    let point = "2026-01-01T00:00:00Z";
    let (st, _, html) = s
        .post_form(url, &ops, &[("form_token", &token), ("point", point)])
        .await;
    assert_eq!(st, 200, "{html}");
    assert!(
        html.contains(&format!("action=\"{url}\""))
            && html.contains("name=\"confirm\" value=\"yes\"")
            && html.contains(&format!("name=\"point\" value=\"{point}\"")),
        "{html}"
    );
    let confirmed = [
        ("form_token", token.as_str()),
        ("point", point),
        ("confirm", "yes"),
    ];
    let (st, _, html) = s.post_form(url, &ops, &confirmed).await;
    assert_eq!(st, 503, "{html}");
    assert!(
        html.contains("Change point of machine m1: ") && html.contains("no store"),
        "{html}"
    );
    // A machine with no failover: the API's 409.
    let (st, _, html) = s
        .post_form("/act/machines/m3/change-point", &ops, &confirmed)
        .await;
    assert_eq!(st, 409, "{html}");
    assert!(html.contains("Change point of machine m3: "), "{html}");
    // An empty point is the dashboard's own refusal.
    let (st, _, html) = s
        .post_form(url, &ops, &[("form_token", &token), ("point", " ")])
        .await;
    assert_eq!(st, 400, "{html}");
    assert!(html.contains("the point must be"), "{html}");
    // The waiting job is listed first among the jobs, with its prompt.
    let j = row(&format!("data-job=\"{id}\""));
    assert!(
        j.contains("waiting-for-input") && j.contains("class=\"prompt\""),
        "{j}"
    );
}
