//! A shard: one thread with its own compio runtime (its own io_uring), its own cache
//! log and its own connections. Nothing on the hot path is shared with other shards;
//! the upload stage and the metrics endpoint read what the shard publishes.
//!
//! Group commit: connections append frames to the log as they arrive and wake the
//! committer; the committer syncs the log (on a blocking thread, so the shard keeps
//! receiving meanwhile) and publishes the durable position; every connection then
//! acknowledges what lies before it. One fdatasync covers every append since the last.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::health::{assess, Inputs, Policy};
use crate::metrics::ShardMetrics;
use ferry_link::log::{DurableLog, Position};

use super::options::Options;
use super::registry::Registry;

/// What a shard publishes for the other threads.
pub struct ShardShared {
    pub id: usize,
    pub dir: PathBuf,
    /// Everything before this is synced.
    pub durable: Mutex<Position>,
    /// Everything before this is uploaded (set by the upload stage).
    pub released: Mutex<Position>,
    /// Where the log started when the server started: the upload stage reads from here.
    pub first: Position,
    pub connections: AtomicUsize,
    pub cache_used: AtomicU64,
    pub cache_max: u64,
    pub metrics: Mutex<ShardMetrics>,
    /// A sync failed: this shard takes no more data until restarted.
    pub failed: AtomicBool,
    /// Pokes the upload stage when much is waiting.
    pub backlog: AtomicU64,
}

/// The committer's verdict, watched by every connection of the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    pub pos: Position,
    pub throttled: bool,
    pub failed: bool,
}

/// The shard's state on its own thread.
pub struct Shard {
    pub shared: Arc<ShardShared>,
    pub log: RefCell<DurableLog>,
    pub durable: watch::Sender<Durable>,
    pub commit: Notify,
    pub metrics: RefCell<ShardMetrics>,
    pub registry: Arc<Registry>,
    pub opts: Arc<Options>,
    pub tls: Arc<rustls::ServerConfig>,
    next_conn: Cell<u64>,
}

impl Shard {
    pub fn new(
        shared: Arc<ShardShared>,
        log: DurableLog,
        registry: Arc<Registry>,
        opts: Arc<Options>,
        tls: Arc<rustls::ServerConfig>,
    ) -> Shard {
        let pos = log.end_position();
        let (durable, _) = watch::channel(Durable {
            pos,
            throttled: false,
            failed: false,
        });
        Shard {
            shared,
            log: RefCell::new(log),
            durable,
            commit: Notify::new(),
            metrics: RefCell::new(ShardMetrics::default()),
            registry,
            opts,
            tls,
            next_conn: Cell::new(0),
        }
    }

    /// A number for a connection, unique across shards.
    pub fn conn_id(&self) -> u64 {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        (n << 8) | self.shared.id as u64
    }

    /// Starts the committer on the shard's runtime. The connections that feed it are
    /// started by `conn::run_shard`, so that this module needs none of theirs.
    pub fn start_committer(self: &Rc<Self>) {
        compio::runtime::spawn(commit_loop(self.clone())).detach();
    }
}

async fn commit_loop(shard: Rc<Shard>) {
    let policy = Policy::default();
    let mut last_snapshot = Instant::now();
    loop {
        {
            let woken = pin!(shard.commit.notified());
            let tick = pin!(compio::time::sleep(Duration::from_millis(50)));
            futures::future::select(woken, tick).await;
        }
        let released = *shard.shared.released.lock().expect("released lock");
        let (end, handle, used) = {
            let mut log = shard.log.borrow_mut();
            if let Err(e) = log.release_before(released) {
                tracing::warn!(shard = shard.shared.id, error = %e, "could not free uploaded cache files");
            }
            (log.end_position(), log.take_sync(), log.used_bytes())
        };
        shard.shared.cache_used.store(used, Ordering::Relaxed);
        let health = assess(
            &policy,
            &Inputs {
                cache_used_bytes: used,
                cache_max_bytes: shard.shared.cache_max,
                ..Default::default()
            },
        );
        let mut failed = shard.shared.failed.load(Ordering::Relaxed);
        match handle {
            Ok(job) if !job.is_empty() => {
                let r = compio::runtime::spawn_blocking(move || {
                    let t = Instant::now();
                    job.run().map(|()| t.elapsed())
                })
                .await;
                let err = match r {
                    Ok(Ok(took)) => {
                        shard.log.borrow_mut().sync_done();
                        shard
                            .metrics
                            .borrow_mut()
                            .cache_sync(took.as_micros() as u64);
                        None
                    }
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("the sync thread panicked".to_string()),
                };
                if let Some(e) = err {
                    shard.log.borrow_mut().sync_failed();
                    tracing::error!(shard = shard.shared.id, error = %e, "cache sync failed: this shard takes no more writes until restarted");
                    shard.metrics.borrow_mut().error("cache");
                    failed = true;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if !failed {
                    tracing::error!(shard = shard.shared.id, error = %e, "cache unusable");
                }
                failed = true;
            }
        }
        shard.shared.failed.store(failed, Ordering::Relaxed);
        let prev = *shard.durable.borrow();
        let next = Durable {
            pos: if failed { prev.pos } else { end },
            throttled: health.throttle,
            failed,
        };
        if next != prev {
            if next.throttled != prev.throttled {
                tracing::warn!(
                    shard = shard.shared.id,
                    throttled = next.throttled,
                    used,
                    max = shard.shared.cache_max,
                    "cache throttling changed"
                );
            }
            *shard.shared.durable.lock().expect("durable lock") = next.pos;
            shard.durable.send_replace(next);
        }
        if last_snapshot.elapsed() >= Duration::from_millis(250) {
            last_snapshot = Instant::now();
            let mut m = shard.metrics.borrow().clone();
            m.connections = shard.shared.connections.load(Ordering::Relaxed) as u64;
            *shard.shared.metrics.lock().expect("metrics lock") = m;
        }
    }
}
