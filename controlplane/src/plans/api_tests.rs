//! `/v1/recovery-plans` over HTTP: the statuses and details of its bad inputs. No job
//! runner: a plan job queued stays queued (active), which is what the conflicts need.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::db::Db;
use crate::enroll::tokens::{hash, new_secret};
use crate::jobs::queue;

struct Site {
    _dir: tempfile::TempDir,
    db: Db,
    url: String,
    http: reqwest::Client,
    admin: String,
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
    let http = crate::webhooks::deliver::http_client(Duration::from_secs(10)).unwrap();
    let s = Site {
        _dir: dir,
        db,
        url,
        http,
        admin: String::new(),
    };
    let admin = s.token("admin", "admin").await;
    Site { admin, ..s }
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

    async fn call_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(&self.admin, method, path, body).await
    }
}

/// `(status, detail)` must be `want` with `needle` in the detail.
fn expect(got: (u16, Value), want: u16, needle: &str) -> Value {
    let detail = got.1["detail"].as_str().unwrap_or("").to_string();
    assert_eq!(got.0, want, "{}", got.1);
    assert!(detail.contains(needle), "{detail:?} lacks {needle:?}");
    got.1
}

#[tokio::test]
async fn plans_are_created_listed_replaced_and_deleted_and_bad_input_is_refused() {
    let s = site().await;
    for m in ["m1", "m2"] {
        sqlx::query(
            "INSERT INTO machines (name, state, disks, registered_at, last_seen) \
             VALUES ($1, 'protected', '[]', 1, 1)",
        )
        .bind(m)
        .execute(s.db.pool())
        .await
        .unwrap();
    }
    let plan = json!({"name": "shop", "groups": [{"name": "db", "machines": ["m1", "m2"],
        "before": [{"kind": "script", "name": "s", "command": "true", "timeout_s": 5}]}]});
    let mut ghost = plan.clone();
    ghost["groups"][0]["machines"] = json!(["m1", "ghost"]);
    expect(
        s.call("POST", "/v1/recovery-plans", Some(ghost)).await,
        400,
        "no machine ghost",
    );
    let mut odd = plan.clone();
    odd["colour"] = json!("red");
    expect(
        s.call("POST", "/v1/recovery-plans", Some(odd)).await,
        400,
        "unknown field",
    );
    let viewer = s.token("v", "viewer").await;
    expect(
        s.call_as(&viewer, "POST", "/v1/recovery-plans", Some(plan.clone()))
            .await,
        403,
        "",
    );
    let (st, created) = s
        .call("POST", "/v1/recovery-plans", Some(plan.clone()))
        .await;
    assert_eq!(st, 201, "{created}");
    assert_eq!(created["max_parallel"], 4);
    assert_eq!(created["groups"][0]["before"][0]["run_on"], "control-plane");
    assert_eq!(created["active_job"], Value::Null);
    expect(
        s.call("POST", "/v1/recovery-plans", Some(plan.clone()))
            .await,
        409,
        "exists",
    );
    let (st, list) = s.call_as(&viewer, "GET", "/v1/recovery-plans", None).await;
    assert_eq!(st, 200);
    assert_eq!(list["items"][0]["name"], "shop");
    expect(
        s.call("GET", "/v1/recovery-plans/nope", None).await,
        404,
        "no recovery plan nope",
    );
    let mut renamed = plan.clone();
    renamed["name"] = json!("other");
    expect(
        s.call("PATCH", "/v1/recovery-plans/shop", Some(renamed))
            .await,
        400,
        "cannot be renamed",
    );
    let mut wider = plan.clone();
    wider["max_parallel"] = json!(8);
    let (st, replaced) = s
        .call("PATCH", "/v1/recovery-plans/shop", Some(wider))
        .await;
    assert_eq!(
        (st, &replaced["max_parallel"]),
        (200, &json!(8)),
        "{replaced}"
    );

    let test = json!({"target": {"kind": "nbd"}});
    expect(
        s.call(
            "POST",
            "/v1/recovery-plans/nope/test-failover",
            Some(test.clone()),
        )
        .await,
        404,
        "no recovery plan nope",
    );
    expect(
        s.call(
            "POST",
            "/v1/recovery-plans/shop/test-failover",
            Some(json!({"target": {"kind": "dir", "format": "qcow2"}})),
        )
        .await,
        400,
        "",
    );
    expect(
        s.call(
            "POST",
            "/v1/recovery-plans/shop/failover",
            Some(json!({"planned": true, "point": "latest", "target": {"kind": "nbd"}})),
        )
        .await,
        400,
        "takes no point",
    );
    expect(
        s.call(
            "POST",
            "/v1/recovery-plans/shop/test-failover-cleanup",
            Some(json!({"verdict": "passed"})),
        )
        .await,
        409,
        "no test failover waiting",
    );
    // Failback's direction, and its own body; reprotect needs every machine's disks.
    expect(
        s.call(
            "POST",
            "/v1/recovery-plans/shop/failover",
            Some(json!({"direction": "sideways", "planned": true, "target": {"kind": "nbd"}})),
        )
        .await,
        400,
        "must be recovery (a failover) or home",
    );
    expect(
        s.call(
            "POST",
            "/v1/recovery-plans/shop/failover",
            Some(json!({"direction": "home", "target": {"kind": "nbd"}})),
        )
        .await,
        400,
        "unknown field",
    );
    expect(
        s.call(
            "POST",
            "/v1/recovery-plans/shop/reprotect",
            Some(json!({"master_target": "rh1", "disks": {"m1": {"sda": "/h/a"}}})),
        )
        .await,
        400,
        "has no home disks",
    );
    let (st, job) = s
        .call(
            "POST",
            "/v1/recovery-plans/shop/failover",
            Some(json!({"direction": "home", "planned": false})),
        )
        .await;
    assert_eq!((st, &job["kind"]), (202, &json!("plan-failback")), "{job}");
    assert_eq!(job["params"]["direction"], "reverse");
    queue::cancel(&s.db, job["id"].as_str().unwrap())
        .await
        .unwrap();
    let (st, job) = s
        .call(
            "POST",
            "/v1/recovery-plans/shop/test-failover",
            Some(test.clone()),
        )
        .await;
    assert_eq!(st, 202, "{job}");
    assert_eq!(job["kind"], "plan-test-failover");
    assert_eq!(job["subject"], "shop");
    let id = job["id"].as_str().unwrap().to_string();
    expect(
        s.call("POST", "/v1/recovery-plans/shop/commit", None).await,
        409,
        &format!("plan shop has a plan-test-failover job active: {id}"),
    );
    let (_, shown) = s.call("GET", "/v1/recovery-plans/shop", None).await;
    assert_eq!(shown["active_job"], json!(id));
    expect(
        s.call("DELETE", "/v1/recovery-plans/shop", None).await,
        409,
        &id,
    );
    // A machine of the plan busy with its own recovery job: refused, named.
    queue::cancel(&s.db, &id).await.unwrap();
    queue::enqueue_keyed(
        &s.db,
        "failover",
        "m2",
        Some("recovery/m2"),
        &json!({}),
        &[],
    )
    .await
    .unwrap()
    .unwrap();
    expect(
        s.call("POST", "/v1/recovery-plans/shop/cancel", None).await,
        409,
        "machine m2 of plan shop has a failover job active",
    );
    let (st, _) = s.call("DELETE", "/v1/recovery-plans/shop", None).await;
    assert_eq!(st, 204);
    expect(
        s.call("GET", "/v1/recovery-plans/shop", None).await,
        404,
        "",
    );
}
