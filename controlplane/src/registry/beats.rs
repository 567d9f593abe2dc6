//! Agents' heartbeats, committed together. Each heartbeat is one upsert of its
//! machine's row, but each commit is a sync to disk (SQLite's WAL fsync, PostgreSQL's
//! WAL flush), and at thousands of agents a sync per heartbeat is what limited the
//! control plane (docs/benchmarks.md, "The control plane under heartbeats"): p99 grew
//! with the queue for the write lock long before the CPU was busy.
//!
//! One writer task per database takes the heartbeats that queued while its last
//! commit was syncing, up to `MAX_BATCH`, and writes them in one transaction. Nothing
//! waits for a timer: on a quiet site each heartbeat commits alone, as before; on a
//! busy one each sync is shared by many. A heartbeat is still answered only after
//! the commit that holds it. If a batch fails, its heartbeats are written one by one,
//! so that each gets its own answer (one bad row cannot fail its neighbours).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use ferry_link::control::wire::DiskReport;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use crate::db::{q, Db, Error, Result};
use crate::enroll::store::live_cert;

/// Heartbeats written in one transaction at most: bounds how long one commit holds
/// the write lock.
pub const MAX_BATCH: usize = 256;
/// Heartbeats waiting for the writer at most; more wait to enqueue (each request
/// holds a connection slot, so this is bounded by them anyway).
const QUEUE: usize = 1024;

/// A heartbeat's row, owned, for the writer task.
#[derive(Debug, Clone)]
pub struct BeatRow {
    pub name: String,
    pub state: String,
    /// The disks as stored (JSON).
    pub disks: String,
    pub last_error: Option<String>,
    pub newest_uploaded_at: Option<f64>,
    pub group_listen: Option<String>,
    pub now: i64,
}

impl BeatRow {
    pub fn new(
        name: &str,
        state: &str,
        disks: &[DiskReport],
        last_error: Option<&str>,
        newest_uploaded_at: Option<f64>,
        group_listen: Option<&str>,
        now: i64,
    ) -> Result<BeatRow> {
        let disks = serde_json::to_string(disks).map_err(|e| Error::Query {
            op: "writing a machine's disks",
            source: sqlx::Error::Decode(Box::new(e)),
        })?;
        Ok(BeatRow {
            name: name.to_string(),
            state: state.to_string(),
            disks,
            last_error: last_error.map(str::to_string),
            newest_uploaded_at,
            group_listen: group_listen.map(str::to_string),
            now,
        })
    }
}

/// What writing a heartbeat found: whether it registered the machine (or brought back
/// a removed one), and the row's assignments, which the heartbeat does not change.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub registered: bool,
    pub process_server: Option<String>,
    pub policy: String,
    pub group: Option<String>,
}

type Job = (BeatRow, oneshot::Sender<Result<Written>>);

/// The writer of one database, started by the first heartbeat.
#[derive(Default)]
pub struct Writer {
    queue: OnceLock<mpsc::Sender<Job>>,
    /// Transactions the writer committed: how many heartbeats shared each (tests).
    commits: Arc<AtomicU64>,
}

impl Writer {
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

/// Writes `row` with whatever else is queued; answers once committed.
pub async fn write(db: &Db, row: BeatRow) -> Result<Written> {
    let w = db.beats();
    let queue = w.queue.get_or_init(|| {
        let (tx, rx) = mpsc::channel(QUEUE);
        // The task holds the pool, not `db`: the last `Db` dropped closes the queue
        // and ends it.
        tokio::spawn(run(db.without_writer(), rx, w.commits.clone()));
        tx
    });
    let (tx, rx) = oneshot::channel();
    match queue.send((row, tx)).await {
        Ok(()) => {}
        // The writer's runtime ended (a test's): write here, alone.
        Err(mpsc::error::SendError((row, _))) => return write_alone(db, &row).await,
    }
    match rx.await {
        Ok(answer) => answer,
        Err(_) => Err(Error::Query {
            op: "recording a heartbeat",
            source: sqlx::Error::WorkerCrashed,
        }),
    }
}

async fn run(db: Db, mut rx: mpsc::Receiver<Job>, commits: Arc<AtomicU64>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let rows: Vec<&BeatRow> = batch.iter().map(|(r, _)| r).collect();
        match write_batch(&db, &rows).await {
            Ok(written) => {
                commits.fetch_add(1, Ordering::Relaxed);
                for ((_, reply), w) in batch.drain(..).zip(written) {
                    let _ = reply.send(Ok(w));
                }
            }
            Err(e) => {
                tracing::debug!(
                    "a batch of {} heartbeats: {e}; writing each alone",
                    rows.len()
                );
                for (row, reply) in batch.drain(..) {
                    let answer = write_alone(&db, &row).await;
                    if answer.is_ok() {
                        commits.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = reply.send(answer);
                }
            }
        }
    }
}

async fn write_alone(db: &Db, row: &BeatRow) -> Result<Written> {
    let mut w = write_batch(db, &[row]).await?;
    w.pop().ok_or(Error::Query {
        op: "recording a heartbeat",
        source: sqlx::Error::RowNotFound,
    })
}

async fn write_batch(db: &Db, rows: &[&BeatRow]) -> Result<Vec<Written>> {
    let mut tx = db.begin_beats("starting a heartbeat").await?;
    let mut out = Vec::with_capacity(rows.len());
    for b in rows {
        out.push(write_one(&mut tx, b).await?);
    }
    tx.commit().await.map_err(q("committing a heartbeat"))?;
    Ok(out)
}

/// One heartbeat's writes, in the batch's transaction: one statement for a machine
/// already registered, the common case; more only for a first or a revived one.
///
/// Whether it registers the machine is what the writes find, not a read before them:
/// with several control planes on PostgreSQL (READ COMMITTED), two first heartbeats at
/// once both read "no row" and both recorded a registration; the INSERT's and UPDATEs'
/// row locks order them instead. A heartbeat older than the one recorded (held up on
/// one control plane while a later one landed on another) changes nothing: a newer
/// report is never lost.
async fn write_one(tx: &mut sqlx::Transaction<'static, sqlx::Any>, b: &BeatRow) -> Result<Written> {
    // A NULL is written as a literal, never bound: sqlx 0.8's Any driver binds a None
    // f64 as PostgreSQL's float4, the connection caches the statement with that
    // parameter type, and every later heartbeat on it with a time failed ("incorrect
    // binary data format in bind parameter 6"): a 500.
    let (uploaded, listen) = match b.newest_uploaded_at {
        Some(_) => ("$6", "$7"),
        None => ("NULL", "$6"),
    };
    let set = format!(
        "UPDATE machines SET state = $2, disks = $3, last_error = $4, last_seen = $5, \
         newest_uploaded_at = {uploaded}, group_listen = {listen}"
    );
    const ASSIGNED: &str = " RETURNING process_server, policy, group_name";
    let update = format!("{set} WHERE name = $1 AND removed = 0 AND last_seen <= $5{ASSIGNED}");
    let insert = format!(
        "INSERT INTO machines (name, state, disks, last_error, registered_at, last_seen, \
         newest_uploaded_at, group_listen) VALUES ($1, $2, $3, $4, $5, $5, {uploaded}, {listen}) \
         ON CONFLICT (name) DO NOTHING{ASSIGNED}"
    );
    // A removed machine comes back only through a new enrollment (the removed one's
    // certificates are revoked): that is a registration too. The certificate is
    // checked in the statement, so a heartbeat in flight while the machine was
    // removed does not bring it back.
    let live = live_cert("agent", "$1");
    let revive =
        format!("{set}, removed = 0 WHERE name = $1 AND removed <> 0 AND {live}{ASSIGNED}");
    // In order: registered and newer (the common case); new; removed and back; a first
    // heartbeat that lost the INSERT to another's and is newer; older than the one
    // recorded, which only reads the assignments.
    let steps: [(&str, bool); 4] = [
        (&update, false),
        (&insert, true),
        (&revive, true),
        (&update, false),
    ];
    let mut found = None;
    for (sql, registers) in steps {
        let row = bound(sql, b)
            .fetch_optional(&mut **tx)
            .await
            .map_err(q("recording a heartbeat"))?;
        if let Some(row) = row {
            found = Some((registers, row));
            break;
        }
    }
    let (registered, row) = match found {
        Some(f) => f,
        None => (
            false,
            sqlx::query("SELECT process_server, policy, group_name FROM machines WHERE name = $1")
                .bind(b.name.clone())
                .fetch_one(&mut **tx)
                .await
                .map_err(q("reading a machine"))?,
        ),
    };
    let get = |e| q("recording a heartbeat")(e);
    Ok(Written {
        registered,
        process_server: row.try_get("process_server").map_err(get)?,
        policy: row.try_get("policy").map_err(get)?,
        group: row.try_get("group_name").map_err(get)?,
    })
}

/// `sql` with a heartbeat's values bound: $1 name, $2 state, $3 disks, $4 last error,
/// $5 now, then the newest upload's time when there is one, then the group listen
/// address.
fn bound<'q>(
    sql: &'q str,
    b: &'q BeatRow,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let mut query = sqlx::query(sql)
        .bind(b.name.as_str())
        .bind(b.state.as_str())
        .bind(b.disks.as_str())
        .bind(b.last_error.as_deref())
        .bind(b.now);
    if let Some(t) = b.newest_uploaded_at {
        query = query.bind(t);
    }
    query.bind(b.group_listen.as_deref())
}
