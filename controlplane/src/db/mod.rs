//! The control plane's state in SQL: SQLite under the state directory by default,
//! PostgreSQL with `--database postgres://...`. One query layer for both through
//! sqlx's `Any` driver; the queries keep to SQL both accept (`$N` parameters, which
//! SQLite also binds; `ON CONFLICT`; TEXT, BIGINT, DOUBLE PRECISION). See
//! docs/decisions/0014-control-plane-store.md.

pub mod leases;
pub mod policies;
pub mod site;
pub mod tokens;

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Any, AnyPool, Transaction};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening database {url}: {source}")]
    Open {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database {url}: migrating the schema: {source}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("database: {op}: {source}")]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("database URL {url}: {why}")]
    BadUrl { url: String, why: &'static str },
}

/// An error-mapping closure naming the operation.
pub(crate) fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Query { op, source }
}

/// The migrations, embedded so that the binary carries its schema. Each file must
/// run unchanged on SQLite and PostgreSQL.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "policies tokens",
        include_str!("../../migrations/0001_policies_tokens.sql"),
    ),
    (
        2,
        "registry",
        include_str!("../../migrations/0002_registry.sql"),
    ),
    (3, "jobs", include_str!("../../migrations/0003_jobs.sql")),
    (
        4,
        "group listen",
        include_str!("../../migrations/0004_group_listen.sql"),
    ),
    (
        5,
        "rebalancing",
        include_str!("../../migrations/0005_rebalancing.sql"),
    ),
    (
        6,
        "leases site",
        include_str!("../../migrations/0006_leases_site.sql"),
    ),
    (
        7,
        "webhooks dashboard",
        include_str!("../../migrations/0007_webhooks_dashboard.sql"),
    ),
    (
        8,
        "recovery",
        include_str!("../../migrations/0008_recovery.sql"),
    ),
    (
        9,
        "work disk progress",
        include_str!("../../migrations/0009_work_disk_progress.sql"),
    ),
    (
        10,
        "failback",
        include_str!("../../migrations/0010_failback.sql"),
    ),
    (
        11,
        "host store error",
        include_str!("../../migrations/0011_host_store_error.sql"),
    ),
];

fn migrator() -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect::<Vec<_>>();
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

/// The URL without its password, for messages.
pub(crate) fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// How long an SQLite writer waits for the write lock (ms): far longer than any
/// of the control plane's transactions holds it.
const SQLITE_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 5000";

/// The connection pool, shared by every request.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    /// On SQLite, the heartbeat writer's own connection (`begin_beats`); on PostgreSQL
    /// the same pool.
    beats_pool: AnyPool,
    sqlite: bool,
    /// Agents' heartbeats are committed in batches by one writer (`registry::beats`).
    beats: Arc<crate::registry::beats::Writer>,
}

impl Db {
    /// The default database: SQLite in `dir/ferry.db`.
    pub fn default_url(dir: &Path) -> String {
        format!("sqlite://{}?mode=rwc", dir.join("ferry.db").display())
    }

    /// Connects, switches SQLite to write-ahead logging, and migrates the schema.
    pub async fn open(url: &str) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let shown = redacted(url);
        let sqlite = if url.starts_with("sqlite:") {
            true
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            false
        } else {
            return Err(Error::BadUrl {
                url: shown,
                why: "must start with sqlite:// or postgres://",
            });
        };
        // SQLite takes one writer at a time; a few connections serve readers beside it.
        let max = if sqlite { 4 } else { 16 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // A writer waits this long for another's lock before
                        // SQLITE_BUSY. sqlx sets the same by default; said here since
                        // `begin_write` depends on it.
                        sqlx::query(SQLITE_BUSY_TIMEOUT).execute(conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(|source| Error::Open {
                url: shown.clone(),
                source,
            })?;
        if sqlite {
            // WAL: readers never wait for the writer, and a commit is one append and
            // fsync. The mode is kept in the database file, so setting it once holds
            // for every later connection.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .map_err(q("setting journal_mode WAL"))?;
        }
        migrator()
            .run(&pool)
            .await
            .map_err(|source| Error::Migrate {
                url: shown.clone(),
                source,
            })?;
        // Heartbeats are soft state: each agent sends its whole report again every
        // interval. Their batches commit on a connection of their own with
        // `synchronous = NORMAL`: in WAL mode that is still atomic, consistent and
        // durable across a kill of the process (the WAL is written at commit), and it
        // skips the commit's fsync, which a power loss may cost only the last batches
        // (the next heartbeats write them again; any later full commit syncs them with
        // it). Enrollment, tokens, jobs and everything else keep a sync per commit. On
        // this host the fsync was the heartbeat's p99 (docs/benchmarks.md).
        let beats_pool = if sqlite {
            AnyPoolOptions::new()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::query(SQLITE_BUSY_TIMEOUT).execute(&mut *conn).await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        Ok(())
                    })
                })
                .connect(url)
                .await
                .map_err(|source| Error::Open { url: shown, source })?
        } else {
            pool.clone()
        };
        Ok(Db {
            pool,
            beats_pool,
            sqlite,
            beats: Arc::default(),
        })
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The heartbeat writer of this database.
    pub(crate) fn beats(&self) -> &crate::registry::beats::Writer {
        &self.beats
    }

    /// The same pool with a writer of its own that is never started: the writer
    /// task's handle, which must not keep its own queue open.
    pub(crate) fn without_writer(&self) -> Db {
        Db {
            pool: self.pool.clone(),
            beats_pool: self.beats_pool.clone(),
            sqlite: self.sqlite,
            beats: Arc::default(),
        }
    }

    /// A transaction that writes. On SQLite it takes the write lock at BEGIN
    /// (`BEGIN IMMEDIATE`), waiting for it up to the busy timeout: a plain (deferred)
    /// BEGIN reads under a snapshot first, and when another connection commits before
    /// this one's first write, the upgrade fails at once with SQLITE_BUSY_SNAPSHOT
    /// (517, "database is locked") without waiting, since the snapshot is stale. Two
    /// heartbeats at once did that. PostgreSQL's row locks need nothing of the sort.
    pub(crate) async fn begin_write(&self, op: &'static str) -> Result<Transaction<'static, Any>> {
        let tx = if self.sqlite {
            self.pool.begin_with("BEGIN IMMEDIATE").await
        } else {
            self.pool.begin().await
        };
        tx.map_err(q(op))
    }

    /// A transaction of the heartbeat writer: `begin_write` on its own connection,
    /// which on SQLite commits without an fsync (see `open`).
    pub(crate) async fn begin_beats(&self, op: &'static str) -> Result<Transaction<'static, Any>> {
        let tx = if self.sqlite {
            self.beats_pool.begin_with("BEGIN IMMEDIATE").await
        } else {
            self.beats_pool.begin().await
        };
        tx.map_err(q(op))
    }

    /// A trivial query: is the database answering?
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(q("ping"))
    }
}

/// Now, in Unix seconds.
pub(crate) fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sqlx::Row;

    #[tokio::test]
    async fn sqlite_is_wal_and_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = Db::default_url(dir.path());
        let db = Db::open(&url).await.unwrap();
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(db.pool())
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(mode, "wal");
        drop(db);
        // A second open finds the schema there and the default policy once.
        let db = Db::open(&url).await.unwrap();
        let all = policies::list(&db, None, 100).await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0], crate::policy::Policy::default_policy());
    }

    /// Every query of the store, on one backend.
    async fn every_query(url: &str) {
        use crate::policy::Policy;
        let db = Db::open(url).await.unwrap();
        // Idempotent: a second open migrates nothing and finds the default once.
        let db2 = Db::open(url).await.unwrap();
        db2.ping().await.unwrap();
        let gold = Policy {
            name: "gold".into(),
            crash_point_interval_s: 0.5,
            app_point_interval_s: 60,
            retention_hours: 72,
            rpo_warning_s: 10,
            rpo_critical_s: 4_000_000_000,
        };
        assert!(policies::create(&db, &gold).await.unwrap());
        assert!(
            !policies::create(&db, &gold).await.unwrap(),
            "a name is taken once"
        );
        assert_eq!(
            policies::get(&db, "gold").await.unwrap(),
            Some(gold.clone())
        );
        let faster = Policy {
            crash_point_interval_s: 0.75,
            ..gold.clone()
        };
        assert!(policies::update(&db, &faster).await.unwrap());
        assert_eq!(policies::get(&db, "gold").await.unwrap(), Some(faster));
        let names = |ps: Vec<Policy>| ps.into_iter().map(|p| p.name).collect::<Vec<_>>();
        assert_eq!(
            names(policies::list(&db, None, 1).await.unwrap()),
            ["default"]
        );
        assert_eq!(
            names(policies::list(&db, Some("default"), 5).await.unwrap()),
            ["gold"]
        );
        assert!(policies::delete(&db, "gold").await.unwrap());
        assert!(!policies::delete(&db, "gold").await.unwrap());
        assert_eq!(policies::get(&db, "gold").await.unwrap(), None);

        tokens::set_admin(&db, "aa").await.unwrap();
        tokens::set_admin(&db, "bb").await.unwrap();
        assert_eq!(
            tokens::find(&db, "aa").await.unwrap(),
            None,
            "the old secret is gone"
        );
        assert_eq!(
            tokens::find(&db, "bb").await.unwrap(),
            Some(("admin".to_string(), "admin".to_string()))
        );
        assert!(tokens::create(&db, "ci", "viewer", "cc").await.unwrap());
        assert!(!tokens::create(&db, "ci", "admin", "dd").await.unwrap());
        let listed = tokens::list(&db, Some("admin"), 10).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].name.as_str(), listed[0].role.as_str()),
            ("ci", "viewer")
        );
        assert!(listed[0].created_at > 1_700_000_000);
        assert!(tokens::delete(&db, "ci").await.unwrap());
        assert_eq!(tokens::find(&db, "cc").await.unwrap(), None);

        crate::registry::tests::every_query(&db).await;
        crate::webhooks::tests::every_query(&db).await;
    }

    #[tokio::test]
    async fn every_query_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        every_query(&Db::default_url(dir.path())).await;
    }

    /// PostgreSQL when FERRY_TEST_DATABASE names one: a throwaway database, since the
    /// test drops the control plane's tables first. Skipped (and says so) without it.
    #[tokio::test]
    async fn every_query_on_the_test_database() {
        let Ok(url) = std::env::var("FERRY_TEST_DATABASE") else {
            // CI starts PostgreSQL (scripts/test-services.sh): there, a missing database
            // is a broken set-up, not a reason to skip.
            if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
                panic!("FERRY_TEST_DATABASE is not set but FERRY_TEST_REQUIRE_REMOTE=1");
            }
            eprintln!("FERRY_TEST_DATABASE not set: PostgreSQL not tested");
            return;
        };
        let _only = drop_all(&url).await;
        every_query(&url).await;
    }

    /// Tests on the one test database take turns: each starts by dropping the tables.
    static TEST_DATABASE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Drops every table of the control plane (children first) in the test database
    /// and holds it for the caller until the guard drops.
    pub(crate) async fn drop_all(url: &str) -> tokio::sync::MutexGuard<'static, ()> {
        let guard = TEST_DATABASE.lock().await;
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new().connect(url).await.unwrap();
        for table in [
            "policies",
            "api_tokens",
            "enrollment_tokens",
            "issued_certs",
            "machines",
            "process_servers",
            "events",
            "_sqlx_migrations",
        ] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                .execute(&pool)
                .await
                .unwrap();
        }
        // Migration 0003's, 0006's, 0007's and 0008's.
        for table in [
            "job_tasks",
            "jobs",
            "singleton_leases",
            "site",
            "webhooks",
            "dashboard_sessions",
            "recovery_hosts",
            "recovery_work",
            "machine_recovery",
            "recovery_plans",
        ] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                .execute(&pool)
                .await
                .unwrap();
        }
        pool.close().await;
        guard
    }

    #[tokio::test]
    async fn other_schemes_are_refused() {
        let err = Db::open("mysql://u:secret@h/db").await.err().unwrap();
        let text = err.to_string();
        assert!(text.contains("sqlite:// or postgres://"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
}
