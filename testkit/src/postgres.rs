//! A throwaway PostgreSQL database per test, beside FERRY_TEST_DATABASE's (which the
//! test services start), so that a test shares no tables with the others.

/// A database of one test, dropped with this value, pass or fail. Declare it before
/// whatever connects to it (processes, pools), so that those drop first.
pub struct TestDatabase {
    base: String,
    pub name: String,
    pub url: String,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        run_on(
            &self.base,
            &format!("DROP DATABASE IF EXISTS {}", self.name),
        );
    }
}

/// A new empty database named `PREFIX_PID_RANDOM`. None, and a word saying `what`
/// was not tested, without FERRY_TEST_DATABASE; a failure when
/// FERRY_TEST_REQUIRE_REMOTE=1 (CI, where its absence is a broken set-up).
pub fn fresh(prefix: &str, what: &str) -> Option<TestDatabase> {
    let Ok(base) = std::env::var("FERRY_TEST_DATABASE") else {
        if std::env::var("FERRY_TEST_REQUIRE_REMOTE").is_ok_and(|v| v == "1") {
            panic!("FERRY_TEST_DATABASE is not set but FERRY_TEST_REQUIRE_REMOTE=1");
        }
        eprintln!("FERRY_TEST_DATABASE not set: {what} not tested on PostgreSQL");
        return None;
    };
    let name = format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    run_on(&base, &format!("CREATE DATABASE {name}"));
    let (head, _) = base
        .split('?')
        .next()
        .and_then(|b| b.rsplit_once('/'))
        .expect("FERRY_TEST_DATABASE is a postgres://.../DB URL");
    Some(TestDatabase {
        url: format!("{head}/{name}"),
        name,
        base,
    })
}

/// Runs one statement on the database at `url`.
fn run_on(url: &str, sql: &str) {
    on(url, |pool| async move {
        sqlx::query(sql).execute(&pool).await.unwrap();
    });
}

/// The text column `column` of the first row `sql` finds on the database at `url`,
/// if any.
pub fn text(url: &str, sql: &str, column: &str) -> Option<String> {
    use sqlx::Row;
    on(url, |pool| async move {
        sqlx::query(sql)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .map(|r| r.get::<String, _>(column))
    })
}

/// `f` with a one-connection pool on the database at `url`, on a runtime of its own;
/// the pool closed after.
fn on<T, F, Fut>(url: &str, f: F) -> T
where
    F: FnOnce(sqlx::AnyPool) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .unwrap();
        let out = f(pool.clone()).await;
        pool.close().await;
        out
    })
}
