//! The fleet's self-healing: process servers that are lost, critical or overloaded
//! give their machines to the others, without an operator. `rebalance` decides from
//! the rows alone; this module reads those rows, applies the moves (each only if the
//! machine is still where the plan found it) and records an event for each. The
//! health sweeper calls `tick` once per heartbeat interval, after judging health.
//!
//! A moved agent learns its new process server from its next heartbeat's orders and
//! reconnects; its journal, or a checksum resync, fills the gap.

pub mod rebalance;

use std::collections::HashMap;
use std::sync::OnceLock;

use sqlx::Row;

use crate::db::{self, q, Db};
use crate::health;
use crate::registry::{events, machines, process_servers};
use rebalance::{Candidate, Fleet, Move, Server, COOLDOWN_S, MOVES_PER_SWEEP};

/// The most process servers the rebalancer plans over at once. A site has a handful
/// to a few dozen; over this, it refuses (the log says why) rather than hold an
/// unbounded list.
pub const SERVERS_MAX: usize = 4096;

/// One rebalancing pass at `now`, this control plane having listened for heartbeats
/// since `watching_since`: brings each server's `normal_since` up to date, plans, and
/// applies the plan. The moves made.
pub async fn rebalance(db: &Db, now: f64, watching_since: f64) -> db::Result<Vec<Move>> {
    let servers = servers(db, now).await?;
    let loads = process_servers::loads(db).await?;
    let candidates = candidates(db, now).await?;
    let plan = rebalance::plan(&Fleet {
        servers: &servers,
        loads: &loads,
        candidates: &candidates,
        now,
        watching_since,
    });
    let mut done = Vec::with_capacity(plan.len());
    for mv in plan {
        // Conditional: an operator's move or another control plane's since the rows
        // were read wins, and this one is dropped.
        if machines::move_if(db, &mv.machine, &mv.from, &mv.to, now as i64, COOLDOWN_S).await? {
            let subject = format!("machine {}", mv.machine);
            events::add(db, "move", &subject, &mv.message(), now as i64).await?;
            tracing::info!("{subject}: {}", mv.message());
            done.push(mv);
        }
    }
    Ok(done)
}

/// `rebalance` at `now` from the sweeper's loop; a failure is logged and the next
/// tick tries again. The first call marks when this process began to listen.
pub async fn tick(db: &Db, now: f64) {
    static WATCHING_SINCE: OnceLock<f64> = OnceLock::new();
    let since = *WATCHING_SINCE.get_or_init(|| now);
    if let Err(e) = rebalance(db, now, since).await {
        tracing::warn!("rebalancing: {e}");
    }
}

/// Every process server not removed, with `normal_since` brought up to date for its
/// health at `now`.
async fn servers(db: &Db, now: f64) -> db::Result<Vec<Server>> {
    let mut rows = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = process_servers::list(db, after.as_deref(), crate::api::PAGE_MAX).await?;
        let short = page.len() < crate::api::PAGE_MAX as usize;
        after = page.last().map(|p| p.name.clone());
        rows.extend(page);
        if rows.len() > SERVERS_MAX {
            return Err(db::Error::Query {
                op: "listing process servers to rebalance",
                source: sqlx::Error::Protocol(format!(
                    "over {SERVERS_MAX} process servers: automatic rebalancing is off"
                )),
            });
        }
        if short {
            break;
        }
    }
    let mut since = normal_since(db).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let was = since.remove(&row.name).flatten();
        let health = health::process_server(&row, now).health;
        let is = rebalance::normal_since(was, health, now);
        if is != was {
            set_normal_since(db, &row.name, is).await?;
        }
        out.push(Server {
            row,
            normal_since: is,
        });
    }
    Ok(out)
}

/// Each process server's `normal_since`.
async fn normal_since(db: &Db) -> db::Result<HashMap<String, Option<i64>>> {
    let limit = i64::try_from(SERVERS_MAX + 1).unwrap_or(i64::MAX);
    let rows = sqlx::query(
        "SELECT name, normal_since FROM process_servers WHERE removed = 0 ORDER BY name \
         LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db.pool())
    .await
    .map_err(q("reading since when process servers are normal"))?;
    rows.iter()
        .map(|r| {
            let get = |e| q("reading since when a process server is normal")(e);
            Ok((
                r.try_get("name").map_err(get)?,
                r.try_get("normal_since").map_err(get)?,
            ))
        })
        .collect()
}

async fn set_normal_since(db: &Db, name: &str, since: Option<i64>) -> db::Result<()> {
    // NULL as a literal, never a bound None (see machines::heartbeat).
    let query = match since {
        Some(t) => sqlx::query("UPDATE process_servers SET normal_since = $2 WHERE name = $1")
            .bind(name.to_string())
            .bind(t),
        None => sqlx::query("UPDATE process_servers SET normal_since = NULL WHERE name = $1")
            .bind(name.to_string()),
    };
    query
        .execute(db.pool())
        .await
        .map_err(q("writing since when a process server is normal"))?;
    Ok(())
}

/// The machines that may move now, at most `MOVES_PER_SWEEP` per process server
/// (a plan moves no more than that in all): those with a process server, out of the
/// rate window. Bounded by the number of servers, not of machines.
async fn candidates(db: &Db, now: f64) -> db::Result<Vec<Candidate>> {
    let per_server = i64::try_from(MOVES_PER_SWEEP).unwrap_or(i64::MAX);
    let rows = sqlx::query(
        "SELECT name, process_server, moved_at FROM ( \
           SELECT name, process_server, moved_at, \
                  ROW_NUMBER() OVER (PARTITION BY process_server ORDER BY name) AS n \
           FROM machines \
           WHERE removed = 0 AND process_server IS NOT NULL \
             AND (moved_at IS NULL OR moved_at <= $1)) t \
         WHERE n <= $2 ORDER BY process_server, name LIMIT $3",
    )
    .bind(now as i64 - COOLDOWN_S)
    .bind(per_server)
    .bind(per_server.saturating_mul(i64::try_from(SERVERS_MAX).unwrap_or(i64::MAX)))
    .fetch_all(db.pool())
    .await
    .map_err(q("listing the machines that may move"))?;
    rows.iter()
        .map(|r| {
            let get = |e| q("reading a machine that may move")(e);
            Ok(Candidate {
                name: r.try_get("name").map_err(get)?,
                process_server: r.try_get("process_server").map_err(get)?,
                moved_at: r.try_get("moved_at").map_err(get)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
