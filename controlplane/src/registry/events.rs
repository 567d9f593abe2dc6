//! The `events` table: what happened to the fleet (enrollments, registrations,
//! moves, removals, changes of health), numbered in order.

use sqlx::Row;

use crate::db::{q, Db, Result};

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: i64,
    /// Unix seconds.
    pub time: i64,
    pub kind: String,
    /// What it is about: `machine NAME` or `process-server NAME`.
    pub subject: String,
    pub message: String,
}

/// Ids are the greatest + 1 (neither backend's autoincrement works on the other);
/// a writer that loses a race for an id tries the next.
const ID_TRIES: usize = 8;

/// Appends an event; its id.
pub async fn add(db: &Db, kind: &str, subject: &str, message: &str, now: i64) -> Result<i64> {
    for _ in 0..ID_TRIES {
        let row = sqlx::query(
            "INSERT INTO events (id, time, kind, subject, message) \
             SELECT COALESCE(MAX(id), 0) + 1, $1, $2, $3, $4 FROM events WHERE true \
             ON CONFLICT (id) DO NOTHING RETURNING id",
        )
        .bind(now)
        .bind(kind.to_string())
        .bind(subject.to_string())
        .bind(message.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("writing an event"))?;
        if let Some(row) = row {
            return row.try_get("id").map_err(q("writing an event"));
        }
    }
    Err(crate::db::Error::Query {
        op: "writing an event",
        source: sqlx::Error::Protocol(format!(
            "no free event id after {ID_TRIES} tries (too many writers at once)"
        )),
    })
}

/// Whether an event of `kind` about `subject` saying exactly `message` was written
/// at `since` (Unix seconds) or later: how a task run again after a kill -9 finds
/// the event its first run wrote.
pub async fn exists(db: &Db, kind: &str, subject: &str, message: &str, since: i64) -> Result<bool> {
    let row = sqlx::query(
        "SELECT id FROM events WHERE kind = $1 AND subject = $2 AND message = $3 \
         AND time >= $4 LIMIT 1",
    )
    .bind(kind.to_string())
    .bind(subject.to_string())
    .bind(message.to_string())
    .bind(since)
    .fetch_optional(db.pool())
    .await
    .map_err(q("looking for an event"))?;
    Ok(row.is_some())
}

/// How long events are kept: a machine whose health flaps writes two every sweep, and
/// nothing else would ever delete them.
pub const KEPT_S: i64 = 30 * 86_400;

/// Deletes the events from before `before` (Unix seconds) but the newest, whatever
/// its age: ids are the greatest + 1, so keeping it keeps them growing, and a reader
/// paging with `after` never sees an id again. How many were deleted.
pub async fn prune(db: &Db, before: i64) -> Result<u64> {
    let done =
        sqlx::query("DELETE FROM events WHERE time < $1 AND id < (SELECT MAX(id) FROM events)")
            .bind(before)
            .execute(db.pool())
            .await
            .map_err(q("deleting old events"))?;
    Ok(done.rows_affected())
}

/// Up to `limit` events after id `after`, oldest first.
pub async fn list(db: &Db, after: i64, limit: u32) -> Result<Vec<Event>> {
    let rows = sqlx::query(
        "SELECT id, time, kind, subject, message FROM events WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(q("listing events"))?;
    rows.iter().map(event_from_row).collect()
}

fn event_from_row(r: &sqlx::any::AnyRow) -> Result<Event> {
    let get = |e| q("reading an event")(e);
    Ok(Event {
        id: r.try_get("id").map_err(get)?,
        time: r.try_get("time").map_err(get)?,
        kind: r.try_get("kind").map_err(get)?,
        subject: r.try_get("subject").map_err(get)?,
        message: r.try_get("message").map_err(get)?,
    })
}

/// The newest `limit` events, newest first (the dashboard's "recent events").
pub async fn latest(db: &Db, limit: u32) -> Result<Vec<Event>> {
    let rows = sqlx::query(
        "SELECT id, time, kind, subject, message FROM events ORDER BY id DESC LIMIT $1",
    )
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(q("listing the latest events"))?;
    rows.iter().map(event_from_row).collect()
}

/// The newest event's id; 0 when there is none.
pub async fn newest_id(db: &Db) -> Result<i64> {
    let row = sqlx::query("SELECT COALESCE(MAX(id), 0) AS id FROM events")
        .fetch_one(db.pool())
        .await
        .map_err(q("reading the newest event's id"))?;
    row.try_get("id")
        .map_err(q("reading the newest event's id"))
}
