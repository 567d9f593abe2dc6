//! The deliverer: a tokio task of `ferry control-plane` that reads new events by id
//! and POSTs each to the webhooks that asked for its kind, signed, retried with
//! exponential backoff. Nothing else waits for it: handlers and the health sweep only
//! write events, and each webhook has its own worker, so a receiver that hangs holds
//! up its own deliveries and nobody else's.
//!
//! Several control planes on one database: each webhook's worker first takes the
//! webhook's lease (`store::claim`), renews it before every try, and advances the
//! cursor with a conditional UPDATE that also checks the lease; so one control plane
//! delivers for a webhook at a time. An event in flight when its deliverer dies is
//! sent again by the next one once the lease runs out: at least once, never by two at
//! once; receivers drop duplicates by the `Ferry-Delivery` header (the event's id).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ring::hmac;
use serde::Serialize;

use super::store::{self, ForDelivery, Outcome};
use crate::db::{now_s, Db};
use crate::registry::events::{self, Event};

/// The deliverer's settings.
#[derive(Debug, Clone)]
pub struct DelivererConfig {
    /// Names this control plane in `lease_owner`: unique per process.
    pub owner: String,
    /// How long a webhook's lease holds unless renewed; renewed before each try, so it
    /// must exceed the longest try (`attempt_timeout`) and the longest backoff.
    pub lease: Duration,
    /// How often a worker looks for new events, and the supervisor for new webhooks.
    pub poll: Duration,
    /// Tries per event before it is given up on (logged, counted, skipped).
    pub max_tries: u32,
    /// The wait after the first failed try, doubled after each, up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// One POST, connection included.
    pub attempt_timeout: Duration,
    /// Webhooks delivered for at once by this control plane (one worker each).
    pub max_webhooks: usize,
}

impl DelivererConfig {
    pub fn new(owner: String) -> DelivererConfig {
        DelivererConfig {
            owner,
            lease: Duration::from_secs(60),
            poll: Duration::from_secs(1),
            max_tries: 6,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            max_webhooks: 256,
        }
    }

    /// The wait after failed try `n` (1-based).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.first_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Events read per round: the deliverer holds at most this many at once per webhook.
const BATCH: u32 = 100;

/// What the receiver is sent: the event as `/v1/events` shows it, the webhook's name,
/// and when it was sent (the same as `Ferry-Timestamp`, but under the signature).
#[derive(Serialize)]
struct Payload<'a> {
    webhook: &'a str,
    sent_at: i64,
    event: crate::api::events::Event,
}

/// `sha256=` and the lowercase hex HMAC-SHA256 of `body` keyed with the secret's bytes.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()))
}

/// The HTTP client: no redirects followed (a receiver is told exactly where to
/// answer), HTTPS verified against the system's roots.
pub fn http_client(attempt_timeout: Duration) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        // One unreadable system certificate should not stop the rest.
        let _ = roots.add(cert);
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("webhook client TLS versions: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    // This reqwest speaks HTTP/1.1 only (no http2 feature).
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(attempt_timeout)
        .connect_timeout(attempt_timeout)
        .user_agent(concat!("ferry-control-plane/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("building the webhook client: {e}"))
}

struct Shared {
    db: Db,
    cfg: DelivererConfig,
    http: reqwest::Client,
}

/// Runs until the process ends: every `poll`, starts a worker for each webhook that
/// has none (up to `max_webhooks`); a worker ends when its webhook is deleted.
pub async fn run(db: Db, cfg: DelivererConfig) {
    let http = match http_client(cfg.attempt_timeout) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("webhooks are not delivered: {e}");
            return;
        }
    };
    let shared = Arc::new(Shared { db, cfg, http });
    let mut workers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(shared.cfg.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        workers.retain(|_, w| !w.is_finished());
        let mut after: Option<String> = None;
        loop {
            let page = match store::list(&shared.db, after.as_deref(), crate::api::PAGE_MAX).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("webhooks: listing them: {e}");
                    break;
                }
            };
            for w in &page {
                if workers.contains_key(&w.name) {
                    continue;
                }
                if workers.len() >= shared.cfg.max_webhooks {
                    tracing::warn!(
                        "webhook {}: not delivered by this control plane, which already \
                         delivers for {} webhooks",
                        w.name,
                        shared.cfg.max_webhooks
                    );
                    continue;
                }
                let (s, name) = (shared.clone(), w.name.clone());
                workers.insert(w.name.clone(), tokio::spawn(worker(s, name)));
            }
            if page.len() < crate::api::PAGE_MAX as usize {
                break;
            }
            after = page.last().map(|w| w.name.clone());
        }
    }
}

/// Where a round left the worker.
enum Round {
    /// Delivered up to the newest event.
    Idle,
    /// More events may wait.
    Busy,
    /// Another control plane holds the lease.
    NotOurs,
    /// The webhook was deleted.
    Gone,
}

async fn worker(s: Arc<Shared>, name: String) {
    loop {
        match round(&s, &name).await {
            Ok(Round::Busy) => continue,
            Ok(Round::Gone) => return,
            Ok(Round::Idle | Round::NotOurs) => {}
            Err(e) => tracing::warn!("webhook {name}: {e}"),
        }
        tokio::time::sleep(s.cfg.poll).await;
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn lost_or_gone(s: &Shared, name: &str) -> crate::db::Result<Round> {
    Ok(match store::get(&s.db, name).await? {
        None => Round::Gone,
        Some(_) => Round::NotOurs,
    })
}

/// Claims the webhook, reads up to `BATCH` events after its cursor, and delivers
/// those of its kinds in order, advancing the cursor past each.
async fn round(s: &Shared, name: &str) -> crate::db::Result<Round> {
    let owner = s.cfg.owner.as_str();
    let lease_ms = s.cfg.lease.as_millis() as i64;
    // Two reads first: an idle webhook costs no write (on SQLite every write takes
    // the one write lock that heartbeats need too).
    let Some(row) = store::get(&s.db, name).await? else {
        return Ok(Round::Gone);
    };
    if events::newest_id(&s.db).await? <= row.cursor {
        return Ok(Round::Idle);
    }
    if !store::claim(&s.db, name, owner, now_ms(), lease_ms).await? {
        return lost_or_gone(s, name).await;
    }
    let Some(hook) = store::for_delivery(&s.db, name, owner).await? else {
        return lost_or_gone(s, name).await;
    };
    let batch = events::list(&s.db, hook.row.cursor, BATCH).await?;
    if batch.is_empty() {
        return Ok(Round::Idle);
    }
    let mut cursor = hook.row.cursor;
    // The id of the newest event passed over since the cursor last moved: skipped
    // events move it once, with the next delivery or at the end of the batch.
    let mut skipped_to = None;
    for e in &batch {
        if !hook.row.events.contains(&e.kind) {
            skipped_to = Some(e.id);
            continue;
        }
        if let Some(to) = skipped_to.take() {
            if !store::advance(&s.db, name, owner, cursor, to, Outcome::Skipped).await? {
                return lost_or_gone(s, name).await;
            }
            cursor = to;
        }
        let Some(outcome) = send(s, &hook, e).await? else {
            return lost_or_gone(s, name).await;
        };
        if !store::advance(&s.db, name, owner, cursor, e.id, outcome).await? {
            return lost_or_gone(s, name).await;
        }
        cursor = e.id;
    }
    if let Some(to) = skipped_to {
        if !store::advance(&s.db, name, owner, cursor, to, Outcome::Skipped).await? {
            return lost_or_gone(s, name).await;
        }
    }
    Ok(if batch.len() < BATCH as usize {
        Round::Idle
    } else {
        Round::Busy
    })
}

/// Sends one event, trying up to `max_tries` times; None once the lease is lost
/// (another control plane took over: it sends the event instead).
async fn send(s: &Shared, hook: &ForDelivery, e: &Event) -> crate::db::Result<Option<Outcome>> {
    let name = hook.row.name.as_str();
    let lease_ms = s.cfg.lease.as_millis() as i64;
    for n in 1..=s.cfg.max_tries {
        if !store::claim(&s.db, name, &s.cfg.owner, now_ms(), lease_ms).await? {
            return Ok(None);
        }
        let sent_at = now_s();
        let payload = Payload {
            webhook: name,
            sent_at,
            event: crate::api::events::Event::from(e.clone()),
        };
        let body = serde_json::to_vec(&payload).map_err(|err| crate::db::Error::Query {
            op: "encoding a webhook's payload",
            source: sqlx::Error::Encode(Box::new(err)),
        })?;
        let req = s
            .http
            .post(&hook.row.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Ferry-Signature", signature(&hook.secret, &body))
            .header("Ferry-Timestamp", sent_at.to_string())
            .header("Ferry-Event", e.kind.as_str())
            .header("Ferry-Delivery", e.id.to_string())
            .body(body);
        let failure = match req.send().await {
            Ok(resp) if resp.status().is_success() => return Ok(Some(Outcome::Delivered)),
            Ok(resp) => format!("answered {}", resp.status()),
            // Without the URL: it may hold a receiver's own secret in its path.
            Err(err) => format!("not answered: {}", err.without_url()),
        };
        let host = reqwest::Url::parse(&hook.row.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        let what = format!(
            "event {} to {host}: {failure} (try {n} of {})",
            e.id, s.cfg.max_tries
        );
        tracing::warn!("webhook {name}: {what}");
        store::set_error(&s.db, name, &what, now_s()).await?;
        if n < s.cfg.max_tries {
            tokio::time::sleep(s.cfg.backoff(n)).await;
        }
    }
    tracing::warn!(
        "webhook {name}: event {} given up after {} tries",
        e.id,
        s.cfg.max_tries
    );
    Ok(Some(Outcome::GivenUp))
}
