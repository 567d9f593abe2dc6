//! The `webhooks` table: each webhook's URL, event kinds, secret, and its delivery
//! cursor with the lease that makes one control plane its only deliverer.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{now_s, q, Db, Error, Result};

/// A webhook as stored. `secret` is read only by the deliverer (`for_delivery`).
#[derive(Clone, PartialEq)]
pub struct WebhookRow {
    pub name: String,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: i64,
    pub cursor: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    pub delivered: i64,
    pub given_up: i64,
}

// No Debug derive on anything holding the secret; this one has none, but keep the
// habit explicit so that a later field cannot leak into a log by `{:?}`.
impl std::fmt::Debug for WebhookRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRow")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

const COLUMNS: &str =
    "name, url, events, created_at, cursor, last_error, last_error_at, delivered, given_up";

fn from_row(r: &AnyRow) -> Result<WebhookRow> {
    let get = |e| q("reading a webhook")(e);
    let events: String = r.try_get("events").map_err(get)?;
    Ok(WebhookRow {
        name: r.try_get("name").map_err(get)?,
        url: r.try_get("url").map_err(get)?,
        events: serde_json::from_str(&events).map_err(|e| Error::Query {
            op: "reading a webhook's event kinds",
            source: sqlx::Error::Decode(Box::new(e)),
        })?,
        created_at: r.try_get("created_at").map_err(get)?,
        cursor: r.try_get("cursor").map_err(get)?,
        last_error: r.try_get("last_error").map_err(get)?,
        last_error_at: r.try_get("last_error_at").map_err(get)?,
        delivered: r.try_get("delivered").map_err(get)?,
        given_up: r.try_get("given_up").map_err(get)?,
    })
}

/// Inserts a webhook whose cursor is the newest event now (it is sent what happens
/// from its creation on, not the past); false when the name is taken.
pub async fn create(
    db: &Db,
    name: &str,
    url: &str,
    events: &[String],
    secret: &str,
) -> Result<bool> {
    let kinds = serde_json::to_string(events).map_err(|e| Error::Query {
        op: "writing a webhook's event kinds",
        source: sqlx::Error::Encode(Box::new(e)),
    })?;
    let done = sqlx::query(
        "INSERT INTO webhooks (name, url, events, secret, created_at, cursor) \
         SELECT $1, $2, $3, $4, $5, COALESCE(MAX(id), 0) FROM events WHERE true \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name.to_string())
    .bind(url.to_string())
    .bind(kinds)
    .bind(secret.to_string())
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("creating a webhook"))?;
    Ok(done.rows_affected() == 1)
}

/// Up to `limit` webhooks in name order after `after`.
pub async fn list(db: &Db, after: Option<&str>, limit: u32) -> Result<Vec<WebhookRow>> {
    let sql = format!("SELECT {COLUMNS} FROM webhooks WHERE name > $1 ORDER BY name LIMIT $2");
    let rows = sqlx::query(&sql)
        .bind(after.unwrap_or("").to_string())
        .bind(i64::from(limit))
        .fetch_all(db.pool())
        .await
        .map_err(q("listing webhooks"))?;
    rows.iter().map(from_row).collect()
}

pub async fn get(db: &Db, name: &str) -> Result<Option<WebhookRow>> {
    let sql = format!("SELECT {COLUMNS} FROM webhooks WHERE name = $1");
    let row = sqlx::query(&sql)
        .bind(name.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("reading a webhook"))?;
    row.as_ref().map(from_row).transpose()
}

/// False when there is none of that name.
pub async fn delete(db: &Db, name: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM webhooks WHERE name = $1")
        .bind(name.to_string())
        .execute(db.pool())
        .await
        .map_err(q("deleting a webhook"))?;
    Ok(done.rows_affected() == 1)
}

/// What the deliverer needs: the row and its secret.
pub struct ForDelivery {
    pub row: WebhookRow,
    pub secret: String,
}

/// The webhook and its secret, while `owner` holds its lease; None otherwise (gone,
/// or another control plane delivers for it).
pub async fn for_delivery(db: &Db, name: &str, owner: &str) -> Result<Option<ForDelivery>> {
    let sql =
        format!("SELECT {COLUMNS}, secret FROM webhooks WHERE name = $1 AND lease_owner = $2");
    let row = sqlx::query(&sql)
        .bind(name.to_string())
        .bind(owner.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("reading a webhook to deliver"))?;
    row.map(|r| {
        Ok(ForDelivery {
            row: from_row(&r)?,
            secret: r
                .try_get("secret")
                .map_err(q("reading a webhook's secret"))?,
        })
    })
    .transpose()
}

/// Takes or renews the webhook's lease for `owner` until `now_ms + lease_ms`: granted
/// when nobody holds it, `owner` already does, or its holder's lease ran out (that
/// control plane died or stalled). One conditional UPDATE, so that of two control
/// planes trying at once one wins.
pub async fn claim(db: &Db, name: &str, owner: &str, now_ms: i64, lease_ms: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE webhooks SET lease_owner = $1, lease_until_ms = $2 WHERE name = $3 \
         AND (lease_owner IS NULL OR lease_owner = $1 OR lease_until_ms < $4)",
    )
    .bind(owner.to_string())
    .bind(now_ms + lease_ms)
    .bind(name.to_string())
    .bind(now_ms)
    .execute(db.pool())
    .await
    .map_err(q("claiming a webhook's deliveries"))?;
    Ok(done.rows_affected() == 1)
}

/// How an event's delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Every try failed; the event is skipped.
    GivenUp,
    /// Not of a kind the webhook is sent: the cursor just moves past it.
    Skipped,
}

/// Moves the cursor from `from` to `to` (an event's id) while `owner` holds the lease
/// and nobody moved it since: false when either changed (the lease was lost, the
/// webhook deleted), and the deliverer stops.
pub async fn advance(
    db: &Db,
    name: &str,
    owner: &str,
    from: i64,
    to: i64,
    outcome: Outcome,
) -> Result<bool> {
    let (delivered, given_up) = match outcome {
        Outcome::Delivered => (1i64, 0i64),
        Outcome::GivenUp => (0, 1),
        Outcome::Skipped => (0, 0),
    };
    let done = sqlx::query(
        "UPDATE webhooks SET cursor = $1, delivered = delivered + $2, given_up = given_up + $3 \
         WHERE name = $4 AND lease_owner = $5 AND cursor = $6",
    )
    .bind(to)
    .bind(delivered)
    .bind(given_up)
    .bind(name.to_string())
    .bind(owner.to_string())
    .bind(from)
    .execute(db.pool())
    .await
    .map_err(q("advancing a webhook's cursor"))?;
    Ok(done.rows_affected() == 1)
}

/// Records a failed attempt (the receiver's status or the network's error, never the
/// secret or the body).
pub async fn set_error(db: &Db, name: &str, error: &str, now: i64) -> Result<()> {
    sqlx::query("UPDATE webhooks SET last_error = $1, last_error_at = $2 WHERE name = $3")
        .bind(error.to_string())
        .bind(now)
        .bind(name.to_string())
        .execute(db.pool())
        .await
        .map_err(q("recording a webhook's failure"))?;
    Ok(())
}
