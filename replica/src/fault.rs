//! A store wrapper that injects faults, for tests of the promise that a committed point
//! survives anything: an operation can fail before it reaches the store, or reach it and
//! then report failure (the reply was lost), or the process can "crash" so that every
//! later operation fails until the store is reopened without the wrapper. Time-outs are
//! modelled as a delay before the failure; a slow store as puts whose reply is late.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The operation fails without reaching the store.
    FailBefore,
    /// The operation takes effect, then its reply is lost.
    FailAfter,
    /// Like FailBefore, and every later operation fails too (the writer died).
    CrashBefore,
    /// Like FailAfter, and every later operation fails too.
    CrashAfter,
}

/// A rule: which operation number gets which fault.
#[derive(Debug, Clone)]
pub struct Plan {
    pub at: u64,
    pub fault: Fault,
    /// Delay before reporting the failure (a time-out).
    pub delay: Duration,
}

/// Puts under `under` take effect at once but answer only after `delay`, for the next
/// `count` of them: the writer learns late that its object landed (and was stamped).
#[derive(Debug, Clone)]
pub struct SlowPuts {
    pub under: String,
    pub count: u64,
    pub delay: Duration,
}

pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    ops: AtomicU64,
    crashed: AtomicBool,
    plans: Mutex<Vec<Plan>>,
    /// Every operation fails while this is set (an outage), without counting as a crash.
    pub outage: AtomicBool,
    /// Every operation on a path under this prefix fails (one disk's objects, say).
    pub outage_under: Mutex<Option<String>>,
    /// Paths of operations that failed, in order.
    pub log: Mutex<Vec<String>>,
    /// A slow store: see `SlowPuts`.
    pub slow_puts: Mutex<Option<SlowPuts>>,
    /// Paths of the puts that were slowed, in order.
    pub slowed: Mutex<Vec<String>>,
}

impl fmt::Debug for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

fn injected(path: &str, what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultStore",
        source: format!("injected fault: {what} at {path}").into(),
    }
}

enum Decision {
    Run,
    Before,
    After,
}

impl FaultStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<FaultStore> {
        Arc::new(FaultStore {
            inner,
            ops: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
            plans: Mutex::new(Vec::new()),
            outage: AtomicBool::new(false),
            outage_under: Mutex::new(None),
            log: Mutex::new(Vec::new()),
            slow_puts: Mutex::new(None),
            slowed: Mutex::new(Vec::new()),
        })
    }

    /// How long the reply of a put to `path` that just took effect is held back.
    fn slow_reply(&self, path: &str) -> Duration {
        let mut rule = self.slow_puts.lock().unwrap_or_else(|e| e.into_inner());
        match rule.as_mut() {
            Some(r) if r.count > 0 && path.starts_with(&r.under) => {
                r.count -= 1;
                self.slowed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(path.to_string());
                r.delay
            }
            _ => Duration::ZERO,
        }
    }

    pub fn plan(&self, p: Plan) {
        self.plans.lock().unwrap_or_else(|e| e.into_inner()).push(p);
    }

    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// Counts one operation and decides its fate; the delay models a time-out.
    fn check(&self, path: &str) -> (Decision, Duration) {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if self.crashed() || self.outage.load(Ordering::SeqCst) {
            return (Decision::Before, Duration::ZERO);
        }
        let under = self.outage_under.lock().unwrap_or_else(|e| e.into_inner());
        if under.as_deref().is_some_and(|p| path.starts_with(p)) {
            return (Decision::Before, Duration::ZERO);
        }
        drop(under);
        let plan = {
            let plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
            plans.iter().find(|p| p.at == n).cloned()
        };
        let Some(plan) = plan else {
            return (Decision::Run, Duration::ZERO);
        };
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_string());
        let d = match plan.fault {
            Fault::FailBefore => Decision::Before,
            Fault::FailAfter => Decision::After,
            Fault::CrashBefore => {
                self.crashed.store(true, Ordering::SeqCst);
                Decision::Before
            }
            Fault::CrashAfter => {
                self.crashed.store(true, Ordering::SeqCst);
                Decision::After
            }
        };
        (d, plan.delay)
    }

    async fn decide(&self, path: &str) -> Decision {
        let (d, delay) = self.check(path);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        d
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        match self.decide(location.as_ref()).await {
            Decision::Run => {
                let r = self.inner.put_opts(location, payload, opts).await?;
                let late = self.slow_reply(location.as_ref());
                if !late.is_zero() {
                    tokio::time::sleep(late).await;
                }
                Ok(r)
            }
            Decision::Before => Err(injected(location.as_ref(), "put failed")),
            Decision::After => {
                self.inner.put_opts(location, payload, opts).await?;
                Err(injected(location.as_ref(), "put reply lost"))
            }
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        match self.decide(location.as_ref()).await {
            Decision::Run => self.inner.put_multipart_opts(location, opts).await,
            _ => Err(injected(location.as_ref(), "multipart put failed")),
        }
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        match self.decide(location.as_ref()).await {
            Decision::Run => self.inner.get_opts(location, options).await,
            _ => Err(injected(location.as_ref(), "get failed")),
        }
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        match self.decide(location.as_ref()).await {
            Decision::Run => self.inner.get_ranges(location, ranges).await,
            _ => Err(injected(location.as_ref(), "get failed")),
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        // One decision for the whole batch: Ferry deletes one object per call. A delete
        // that "takes effect, then fails" is the same as one that fails for the caller
        // except that the object is gone; both are covered by Before and After.
        match self.check("(delete)").0 {
            Decision::Run => self.inner.delete_stream(locations),
            Decision::Before => locations
                .map(|p| p.and_then(|p| Err(injected(p.as_ref(), "delete failed"))))
                .boxed(),
            Decision::After => {
                let inner = self.inner.clone();
                locations
                    .then(move |p| {
                        let inner = inner.clone();
                        async move {
                            let p = p?;
                            let _ = inner.delete(&p).await;
                            Err(injected(p.as_ref(), "delete reply lost"))
                        }
                    })
                    .boxed()
            }
        }
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let shown = prefix.map(|p| p.to_string()).unwrap_or_default();
        match self.check(&shown).0 {
            Decision::Run => self.inner.list(prefix),
            _ => futures::stream::once(async move { Err(injected(&shown, "list failed")) }).boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let shown = prefix.map(|p| p.to_string()).unwrap_or_default();
        match self.decide(&shown).await {
            Decision::Run => self.inner.list_with_delimiter(prefix).await,
            _ => Err(injected(&shown, "list failed")),
        }
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        match self.decide(to.as_ref()).await {
            Decision::Run => self.inner.copy_opts(from, to, options).await,
            Decision::Before => Err(injected(to.as_ref(), "copy failed")),
            Decision::After => {
                self.inner.copy_opts(from, to, options).await?;
                Err(injected(to.as_ref(), "copy reply lost"))
            }
        }
    }
}
