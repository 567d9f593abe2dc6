//! The `site` table: the site CA's certificate, recorded by the first control plane
//! that starts on the database, so that a later one on the same database can tell
//! whether it holds the same CA (docs/control-plane.md, "Running it highly
//! available").

use sqlx::Row;

use super::{now_s, q, Db, Result};

const CA_ROW: &str = "ca";

/// Records `ca_pem` as the site CA unless one is recorded already; returns the one
/// recorded now (ours, or the one that was there first: of two first starts at once,
/// one wins and the other sees the winner's).
pub async fn record_ca(db: &Db, ca_pem: &str) -> Result<String> {
    sqlx::query(
        "INSERT INTO site (name, ca_pem, recorded_at) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(CA_ROW.to_string())
    .bind(ca_pem.to_string())
    .bind(now_s())
    .execute(db.pool())
    .await
    .map_err(q("recording the site CA"))?;
    recorded_ca(db).await?.ok_or(super::Error::Query {
        op: "reading the site CA back",
        source: sqlx::Error::RowNotFound,
    })
}

/// The site CA's certificate, if a control plane recorded one.
pub async fn recorded_ca(db: &Db) -> Result<Option<String>> {
    let row = sqlx::query("SELECT ca_pem FROM site WHERE name = $1")
        .bind(CA_ROW.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(q("reading the site CA"))?;
    row.map(|r| r.try_get("ca_pem").map_err(q("reading the site CA")))
        .transpose()
}
