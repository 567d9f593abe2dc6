//! Starting a process server: recover every shard's cache, then start the shards, their
//! upload stages, the acceptor that balances connections, and the metrics endpoint.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ferry_replica::{Store, VaultKey};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::metrics::ShardMetrics;
use ferry_link::log::DurableLog;
use ferry_link::protocol::{decode, Decoded, Frame};

use super::http::View;
use super::options::Options;
use super::registry::Registry;
use super::shard::{Shard, ShardShared};
use crate::upload::UploadStatus;

/// A started server. Dropping it leaves the threads running; `stop` ends them.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub view: Arc<View>,
    /// Every disk seen and which are in a session (the control plane's heartbeat
    /// reports the machines connected).
    pub registry: Arc<Registry>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    uploaders: Vec<JoinHandle<()>>,
}

impl Running {
    /// Blocks for as long as the server runs.
    pub fn wait(mut self) {
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }

    /// Stops accepting and uploading. Shard threads keep their sockets until the
    /// process exits: a stop is for tests and shutdown, where the process ends next.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for u in self.uploaders.drain(..) {
            let _ = u.join();
        }
    }
}

pub fn start(
    opts: Options,
    tls: rustls::ServerConfig,
    store: Store,
    vault: VaultKey,
) -> Result<Running> {
    if opts.shards == 0 {
        return Err(Error::Setting("--shards must be at least 1"));
    }
    ferry_replica::local::create_private_dir(&opts.cache_dir).map_err(|source| Error::Io {
        op: "cache dir",
        path: opts.cache_dir.display().to_string(),
        source,
    })?;
    crate::cache::refuse_stray_shards(&opts.cache_dir, opts.shards)?;
    let opts = Arc::new(opts);
    let tls = Arc::new(tls);
    let claims = super::claims::Claims::new(&opts.cache_dir, &opts.name);
    let registry =
        Arc::new(Registry::new(store, vault, claims).with_orphan_grace(opts.orphan_grace));
    let per_shard = opts.cache_bytes / opts.shards as u64;
    // Files are freed whole once uploaded: keep several per shard, or a small cache
    // would throttle before its first file could roll over and be freed.
    let file_bytes = opts.cache_file_bytes.min(per_shard / 8).max(1 << 20);
    // Each shard's log may hold one file past its bound (a spare kept for reuse).
    crate::cache::check(
        &opts.cache_dir,
        opts.cache_bytes + opts.shards as u64 * file_bytes,
    )?;
    let stop = Arc::new(AtomicBool::new(false));

    let mut logs = Vec::new();
    let mut shareds = Vec::new();
    // Highest cached sequence number per disk, and which shard holds it.
    let mut newest: HashMap<String, (u64, usize)> = HashMap::new();
    for i in 0..opts.shards {
        let dir = opts.cache_dir.join(format!("shard-{i}"));
        // Records are visited one file at a time: recovering a full cache needs no
        // more memory than its largest file.
        let mut frames = 0u64;
        let mut bad = None;
        let (log, torn_bytes) = DurableLog::open_each(&dir, file_bytes, per_shard, true, |e| {
            let Ok(Decoded::Frame(f, _)) = decode(e.payload, u32::MAX) else {
                bad.get_or_insert(e.at);
                return;
            };
            let seq = match f {
                Frame::Write { seq, .. } | Frame::Zero { seq, .. } => seq,
                Frame::Bookmark(b) => b.seq,
                _ => return,
            };
            frames += 1;
            if let Some(n) = newest.get_mut(e.disk) {
                if seq >= n.0 {
                    *n = (seq, i);
                }
            } else {
                newest.insert(e.disk.to_string(), (seq, i));
            }
        })
        .map_err(|source| Error::Recover {
            dir: dir.display().to_string(),
            source,
        })?;
        if let Some(at) = bad {
            return Err(Error::NotAFrame {
                dir: dir.display().to_string(),
                file: at.file,
                offset: at.offset,
            });
        }
        if frames > 0 || torn_bytes > 0 {
            tracing::info!(shard = i, frames, torn_bytes, "recovered the cache");
        }
        let shared = Arc::new(ShardShared {
            id: i,
            dir,
            durable: Mutex::new(log.end_position()),
            released: Mutex::new(log.first_position()),
            first: log.first_position(),
            connections: AtomicUsize::new(0),
            cache_used: AtomicU64::new(log.used_bytes()),
            cache_max: per_shard,
            metrics: Mutex::new(ShardMetrics::default()),
            failed: AtomicBool::new(false),
            backlog: AtomicU64::new(log.used_bytes()),
        });
        logs.push(log);
        shareds.push(shared);
    }
    // Cached frames of a disk run without a gap up to its newest one (the cache is
    // freed only behind uploads), so everything up to it is durable.
    for (key, (seq, shard)) in newest {
        let entry = registry.entry(&key);
        entry.durable.fetch_max(seq + 1, Ordering::SeqCst);
        entry.set_home(shard);
    }

    raise_fd_limit();
    let listen_err = |addr: SocketAddr| {
        move |source| Error::Io {
            op: "listen on",
            path: addr.to_string(),
            source,
        }
    };
    let listener = TcpListener::bind(opts.listen).map_err(listen_err(opts.listen))?;
    // std listens with a backlog of 128; a fleet of agents reconnecting after a
    // restart would overflow it and wait out SYN retries.
    {
        use std::os::fd::AsRawFd;
        // SAFETY: listen(2) on a socket we own; it only changes the backlog length.
        unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    }
    let addr = listener.local_addr().map_err(listen_err(opts.listen))?;
    let metrics = match opts.metrics_listen {
        Some(a) => Some(TcpListener::bind(a).map_err(|source| Error::Io {
            op: "metrics listen on",
            path: a.to_string(),
            source,
        })?),
        None => None,
    };
    let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());

    let mut senders = Vec::new();
    let mut uploaders = Vec::new();
    let mut statuses = Vec::new();
    for (i, log) in logs.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel::<std::net::TcpStream>(256);
        senders.push(tx);
        let shared = shareds[i].clone();
        let (registry2, opts2, tls2) = (registry.clone(), opts.clone(), tls.clone());
        let pin = opts.pin;
        std::thread::Builder::new()
            .name(format!("ferry-shard-{i}"))
            .spawn(move || {
                let mut b = compio::runtime::RuntimeBuilder::new();
                if pin {
                    b.thread_affinity([i].into_iter().collect());
                }
                let rt = match b.build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(shard = i, error = %e, "cannot start the shard's io_uring runtime");
                        return;
                    }
                };
                let shard = Rc::new(Shard::new(shared, log, registry2, opts2, tls2));
                rt.block_on(super::conn::run_shard(shard, rx));
            })
            .map_err(thread_err(format!("shard thread {i}")))?;
        let status = Arc::new(UploadStatus::default());
        statuses.push(status.clone());
        let (shared, registry2, opts2, stop2) = (
            shareds[i].clone(),
            registry.clone(),
            opts.clone(),
            stop.clone(),
        );
        uploaders.push(
            std::thread::Builder::new()
                .name(format!("ferry-upload-{i}"))
                .spawn(move || crate::upload::run(shared, registry2, opts2, status, stop2))
                .map_err(thread_err(format!("upload thread {i}")))?,
        );
    }
    let view = Arc::new(View {
        shards: shareds.clone(),
        uploads: statuses,
        cache_dir: opts.cache_dir.clone(),
    });
    if let Some(l) = metrics {
        let (v, s) = (
            View {
                shards: view.shards.clone(),
                uploads: view.uploads.clone(),
                cache_dir: view.cache_dir.clone(),
            },
            stop.clone(),
        );
        std::thread::Builder::new()
            .name("ferry-metrics".into())
            .spawn(move || super::http::serve(l, v, s))
            .map_err(thread_err("the metrics thread".into()))?;
    }
    let stop2 = stop.clone();
    let acceptor = std::thread::Builder::new()
        .name("ferry-accept".into())
        .spawn(move || accept_loop(listener, senders, shareds, stop2))
        .map_err(thread_err("the acceptor".into()))?;
    Ok(Running {
        addr,
        metrics_addr,
        view,
        registry,
        stop,
        acceptor: Some(acceptor),
        uploaders,
    })
}

fn thread_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Thread { what, source }
}

/// Hands each new connection to the shard with the fewest: even spread by count,
/// which SO_REUSEPORT's hashing does not give.
fn accept_loop(
    listener: TcpListener,
    senders: Vec<mpsc::Sender<std::net::TcpStream>>,
    shards: Vec<Arc<ShardShared>>,
    stop: Arc<AtomicBool>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let tcp = match conn {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        // A shard whose cache failed takes no new connections.
        let Some((i, shard)) = shards
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.failed.load(Ordering::Relaxed))
            .min_by_key(|(_, s)| s.connections.load(Ordering::Relaxed))
        else {
            tracing::error!("every shard's cache has failed; refusing connections until restarted");
            continue;
        };
        shard.connections.fetch_add(1, Ordering::Relaxed);
        if senders[i].try_send(tcp).is_err() {
            shard.connections.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(shard = i, "shard backlog full; connection dropped");
        }
    }
}

/// Each agent connection is a descriptor: take the hard limit, not the soft default
/// of 1024.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
