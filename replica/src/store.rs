//! Blob storage access. object_store runs on a runtime of its own (one tokio thread,
//! "ferry-store"): its HTTP clients and retries need tokio, while Ferry's callers are
//! plain threads today and compio shards later. Every call hands its future to that
//! runtime and awaits the join handle, which any executor (or a plain thread, through
//! `block`) can poll. A semaphore bounds the requests in flight: callers wait for a
//! permit before their work is queued, so memory stays bounded under load.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};

/// Requests in flight per store handle unless the caller chooses otherwise.
pub const DEFAULT_IN_FLIGHT: usize = 16;

/// Metadata of one listed object.
#[derive(Debug, Clone)]
pub struct Listed {
    pub path: String,
    pub size: u64,
    pub modified: DateTime<Utc>,
}

/// The outcome of a create-if-absent put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Created,
    AlreadyExists,
}

struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        // Dropping a runtime inside async code panics; background shutdown never does.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    _rt: Arc<Runtime>,
    handle: tokio::runtime::Handle,
    name: Arc<str>,
    permits: Arc<Semaphore>,
    /// Bytes of object bodies this handle (and its clones) got: what a sync or a
    /// restore reports as fetched from the store.
    fetched: Arc<AtomicU64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.name)
    }
}

fn store_url_error(url: &str, reason: impl Into<String>) -> Error {
    Error::StoreUrl {
        url: url.to_string(),
        reason: reason.into(),
    }
}

fn retry_config() -> object_store::RetryConfig {
    // The default retries for three minutes; a command line should say "unreachable"
    // sooner than that, and a process server keeps its data in its cache meanwhile.
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig::default(),
        max_retries: 4,
        retry_timeout: Duration::from_secs(20),
    }
}

const AZURE_CREDENTIALS: &[&str] = &[
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_SECRET",
];
const S3_CREDENTIALS: &[&str] = &["AWS_ACCESS_KEY_ID"];

/// Without explicit credentials object_store falls back to the cloud's instance
/// metadata service; Ferry does not, so a missing setting is one clear error instead of
/// a request to a link-local address.
fn require_credentials(url: &str, vars: &[&str], wanted: &str) -> Result<()> {
    let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
    let emulator = url.starts_with("az")
        && std::env::var("AZURE_STORAGE_USE_EMULATOR").is_ok_and(|v| v == "true" || v == "1");
    if emulator || vars.iter().any(|v| set(v)) {
        return Ok(());
    }
    Err(store_url_error(
        url,
        format!("no credentials: set {wanted}"),
    ))
}

/// Builds the object_store for a `--store` URL.
pub fn build(url: &str) -> Result<Arc<dyn ObjectStore>> {
    install_tls_provider();
    use object_store::ClientConfigKey::ConnectTimeout;
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        store_url_error(url, "expected file:///path, az://container or s3://bucket")
    })?;
    match scheme {
        "file" => {
            let path = std::path::Path::new(rest);
            if !path.is_absolute() || rest.is_empty() {
                return Err(store_url_error(
                    url,
                    "a file:// store needs an absolute path: file:///abs/path",
                ));
            }
            std::fs::create_dir_all(path).map_err(|e| {
                store_url_error(url, format!("cannot create {}: {e}", path.display()))
            })?;
            // A put that returns is durable, as in a cloud store: the process server
            // frees its cache and the agent its journal on the strength of it. Without
            // fsync a power cut could leave a commit naming a segment that never
            // reached the disk.
            let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
                .map_err(|e| store_url_error(url, e.to_string()))?
                .with_automatic_cleanup(true)
                .with_fsync(true);
            Ok(Arc::new(fs))
        }
        "az" | "azure" => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            if rest.is_empty() || rest.contains('/') {
                return Err(store_url_error(url, "expected az://container"));
            }
            require_credentials(url, AZURE_CREDENTIALS, "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or a SAS, or AZURE_STORAGE_USE_EMULATOR=true")?;
            let s = MicrosoftAzureBuilder::from_env()
                .with_container_name(rest)
                .with_retry(retry_config())
                .with_config(AzureConfigKey::Client(ConnectTimeout), "5s")
                .build()
                .map_err(|e| store_url_error(url, e.to_string()))?;
            Ok(Arc::new(s))
        }
        "s3" => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            if rest.is_empty() || rest.contains('/') {
                return Err(store_url_error(url, "expected s3://bucket"));
            }
            require_credentials(
                url,
                S3_CREDENTIALS,
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            )?;
            let s = AmazonS3Builder::from_env()
                .with_bucket_name(rest)
                .with_retry(retry_config())
                .with_config(AmazonS3ConfigKey::Client(ConnectTimeout), "5s")
                .build()
                .map_err(|e| store_url_error(url, e.to_string()))?;
            Ok(Arc::new(s))
        }
        other => Err(store_url_error(
            url,
            format!("unknown scheme {other:?}; expected file, az or s3"),
        )),
    }
}

/// HTTPS through rustls needs a process-wide crypto provider; Ferry uses ring for TLS
/// as for sealing (docs/decisions/0001-crypto-ring.md).
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Puts the calling thread at SCHED_IDLE, for good: it runs only on CPU time nothing
/// else wants. For bulk work (sealing, uploading) beside latency-bound threads; failure
/// only leaves the default policy.
pub fn idle_thread() {
    // SAFETY: sched_setscheduler on this thread (0) with a valid parameter.
    unsafe {
        let p = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &p);
    }
}

impl Store {
    /// Opens the store a `--store` URL names.
    pub fn open(url: &str) -> Result<Store> {
        Ok(Self::with_object_store(build(url)?, url))
    }

    /// Like `open`, with the store's threads at SCHED_IDLE: for a process whose store
    /// traffic is bulk work that must never take CPU from latency-bound threads (the
    /// process server's uploads, whose sealing threads are SCHED_IDLE too).
    pub fn open_idle(url: &str) -> Result<Store> {
        Ok(Self::build_with(build(url)?, url, true))
    }

    /// Wraps any object_store (tests wrap one that injects faults).
    pub fn with_object_store(inner: Arc<dyn ObjectStore>, name: &str) -> Store {
        Self::build_with(inner, name, false)
    }

    fn build_with(inner: Arc<dyn ObjectStore>, name: &str, idle: bool) -> Store {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferry-store")
            .on_thread_start(move || {
                if idle {
                    idle_thread();
                }
            })
            .enable_all()
            .build()
            .expect("a one-thread tokio runtime for the store");
        let handle = rt.handle().clone();
        Store {
            inner,
            _rt: Arc::new(Runtime(Some(rt))),
            handle,
            name: name.into(),
            permits: Arc::new(Semaphore::new(DEFAULT_IN_FLIGHT)),
            fetched: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A handle on the same store (runtime, request bound) whose fetched-bytes count
    /// starts at zero and is its own: one operation's figure, exact even while other
    /// users of the store fetch beside it.
    pub fn counted(&self) -> Store {
        Store {
            fetched: Arc::new(AtomicU64::new(0)),
            ..self.clone()
        }
    }

    /// Bytes of object bodies fetched through this handle and its clones.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, op: &'static str, path: &str, source: object_store::Error) -> Error {
        match source {
            object_store::Error::NotFound { .. } => Error::Missing {
                store: self.name.to_string(),
                path: path.to_string(),
            },
            source => Error::Store {
                store: self.name.to_string(),
                op,
                path: path.to_string(),
                source: Box::new(source),
            },
        }
    }

    /// Runs `f` on the store runtime under a permit.
    async fn run<T, F>(&self, f: impl FnOnce(Arc<dyn ObjectStore>) -> F) -> T
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the store semaphore is never closed");
        let fut = f(self.inner.clone());
        let joined = self.handle.spawn(async move {
            let out = fut.await;
            drop(permit);
            out
        });
        match joined.await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Blocks the calling (non-async) thread on a store future.
    pub fn block<T>(&self, fut: impl Future<Output = T>) -> T {
        futures::executor::block_on(fut)
    }

    pub async fn get(&self, path: &str) -> Result<Bytes> {
        let p = Path::from(path);
        let r = self
            .run(|s| async move {
                match s.get(&p).await {
                    Ok(g) => g.bytes().await,
                    Err(e) => Err(e),
                }
            })
            .await;
        let bytes = r.map_err(|e| self.err("get", path, e))?;
        self.fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Like `get`, but a missing object is `None`.
    pub async fn get_opt(&self, path: &str) -> Result<Option<Bytes>> {
        match self.get(path).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.is_missing() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Create-if-absent put: the primitive every commit rests on.
    pub async fn put_new(&self, path: &str, bytes: Bytes) -> Result<Created> {
        let p = Path::from(path);
        let r = self
            .run(|s| async move {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                s.put_opts(&p, PutPayload::from_bytes(bytes), opts).await
            })
            .await;
        match r {
            Ok(_) => Ok(Created::Created),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::AlreadyExists),
            Err(e) => Err(self.err("put", path, e)),
        }
    }

    /// Deletes; an object already gone is not an error.
    pub async fn delete(&self, path: &str) -> Result<()> {
        let p = Path::from(path);
        match self.run(|s| async move { s.delete(&p).await }).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", path, e)),
        }
    }

    /// Every object under `prefix` (recursively), sorted by path.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let p = Path::from(prefix.trim_end_matches('/'));
        let r = self
            .run(|s| async move { s.list(Some(&p)).try_collect::<Vec<_>>().await })
            .await;
        let mut out: Vec<Listed> = r
            .map_err(|e| self.err("list", prefix, e))?
            .into_iter()
            .map(|m| Listed {
                path: m.location.to_string(),
                size: m.size,
                modified: m.last_modified,
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// The names of the "directories" directly under `prefix`, sorted.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let p = Path::from(prefix.trim_end_matches('/'));
        let r = self
            .run(|s| async move { s.list_with_delimiter(Some(&p)).await })
            .await
            .map_err(|e| self.err("list", prefix, e))?;
        let mut out: Vec<String> = r
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of bodies got, counted per handle family: a `counted` handle starts
    /// at zero and counts only its own gets; missing objects and puts count nothing.
    #[test]
    fn fetched_bytes_count_the_bodies_got_through_a_handle() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", dir.path().display())).unwrap();
        store
            .block(store.put_new("a", Bytes::from(vec![1u8; 1000])))
            .unwrap();
        assert_eq!(store.fetched_bytes(), 0);
        store.block(store.get("a")).unwrap();
        let own = store.counted();
        let clone = own.clone();
        clone.block(clone.get("a")).unwrap();
        assert_eq!(own.block(own.get_opt("missing")).unwrap(), None);
        assert_eq!(store.fetched_bytes(), 1000);
        assert_eq!((own.fetched_bytes(), clone.fetched_bytes()), (1000, 1000));
    }
}
