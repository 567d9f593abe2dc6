//! `ferry control-plane`: initialise or reopen the state directory, open the
//! database, and serve the API over HTTPS (rustls with ring, TLS 1.2 and 1.3,
//! HTTP/1.1 and HTTP/2 by ALPN). Client certificates are optional on the one port
//! (operators use bearer tokens) and, when given, must chain to the site CA: agents
//! and process servers heartbeat with the ones they enrolled for, which handlers see
//! through `api::peer::ClientCert`.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::api::peer::ClientCert;
use crate::db::{self, Db};
use crate::enroll::{self, ca::SiteCa};
use crate::jobs::retention;
use crate::jobs::runner::{self, Context, RunnerConfig, StoreAccess};
use crate::jobs::singleton::{self, Singleton};

/// Connections served at once; more wait in the kernel's accept queue. Every agent
/// and process server keeps one open between its heartbeats (5 s apart, well inside
/// the idle timeout), so this is the fleet one control plane can serve: at 1,024,
/// the 10,000-agent benchmark saw every agent past the first thousand time out
/// (docs/benchmarks.md). A kept-alive connection costs about 70 KiB of RSS (TLS and
/// HTTP buffers: 750 MiB at 10,000 agents), so this bounds that memory near 1.1 GiB;
/// the process needs a descriptor limit (LimitNOFILE) above it.
pub const MAX_CONNECTIONS: usize = 16_384;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Nor may a client take longer to send a request's headers: a connection slot held
/// by a client that trickles bytes is a slot nobody else can use.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection older than this is closed once its request in flight is answered (an
/// HTTP/2 client is sent GOAWAY): clients reconnect at their next call, and an idle
/// HTTP/2 connection, which no header timeout covers, cannot keep its slot for good.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(600);

/// How long a connection may do what, so that no client holds one of the
/// `MAX_CONNECTIONS` slots as long as it likes.
#[derive(Debug, Clone, Copy)]
struct ConnLimits {
    /// From the end of the TLS handshake to the first bytes of a request.
    first_bytes: Duration,
    /// HTTP/1.1: to read a request's headers, and to wait idle between requests.
    header_read: Duration,
    max_age: Duration,
    /// After `max_age`, to finish the request in flight (the API's own deadline).
    drain: Duration,
}

const CONN_LIMITS: ConnLimits = ConnLimits {
    first_bytes: HEADER_READ_TIMEOUT,
    header_read: HEADER_READ_TIMEOUT,
    max_age: MAX_CONNECTION_AGE,
    drain: crate::api::REQUEST_TIMEOUT,
};

#[derive(Debug, Clone)]
pub struct Options {
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// Names for the service certificate; empty: `ca::default_server_names()`.
    pub server_names: Vec<String>,
    /// `sqlite://...` or `postgres://...`; None: SQLite in the state directory.
    pub database: Option<String>,
    /// The blob store and vault key file the jobs (retention) and the points API
    /// use; None: no retention jobs are scheduled and points are not served.
    pub store: Option<(String, PathBuf)>,
    /// The job runner's settings; its lease is also the singleton lease's.
    pub runner: RunnerConfig,
    /// `--join DIR`: another control plane of the site, on the same database, whose
    /// site CA and admin token this one copies into its state directory.
    pub join: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("state directory: {0}")]
    State(#[from] enroll::Error),
    #[error(transparent)]
    Db(#[from] db::Error),
    #[error("{op}: {source}")]
    Tls {
        op: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("{op} {addr}: {source}")]
    Net {
        op: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rendering the OpenAPI document: {0}")]
    OpenApi(#[from] serde_json::Error),
    /// The state directory's CA is not the site's the database recorded, or it has
    /// none while the database serves a site already.
    #[error("{0}")]
    Site(String),
    #[error("{op}: {source}")]
    Replica {
        op: String,
        #[source]
        source: ferry_replica::Error,
    },
}

/// A control plane bound to its address, its state opened.
pub struct Bound {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: axum::Router,
    db: Db,
    jobs: Context,
    runner: RunnerConfig,
    pub url: String,
}

/// Initialises the state directory on the first start (CA, service certificate,
/// admin token, database) and reopens it on later ones, then binds `listen`.
pub async fn bind(opts: &Options) -> Result<Bound, Error> {
    let dir = &opts.state_dir;
    // Owner only: it holds the CA key and the admin token.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Dir {
            path: dir.clone(),
            source,
        })?;
    let url = opts
        .database
        .clone()
        .unwrap_or_else(|| Db::default_url(dir));
    let db = Db::open(&url).await?;
    let ca = site_ca(&db, &url, dir, opts.join.as_deref()).await?;
    let names = if opts.server_names.is_empty() {
        enroll::ca::default_server_names()
    } else {
        opts.server_names.clone()
    };
    let (cert_pem, key_pem) = ca.service_cert(dir, &names)?;
    let admin = enroll::tokens::admin_token(dir)?;
    db::tokens::set_admin(&db, &enroll::tokens::hash(&admin)).await?;
    let store = match &opts.store {
        None => None,
        Some((url, key_file)) => {
            let vault =
                ferry_replica::VaultKey::load(key_file).map_err(|source| Error::Replica {
                    op: format!("vault key {}", key_file.display()),
                    source,
                })?;
            let store = ferry_replica::Store::open(url).map_err(|source| Error::Replica {
                op: format!("store {url}"),
                source,
            })?;
            Some(Arc::new(StoreAccess { store, vault }))
        }
    };
    let jobs = Context {
        db: db.clone(),
        store,
        wake: Arc::new(tokio::sync::Notify::new()),
    };

    let tls = server_config(&cert_pem, &key_pem, &ca.pem)?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| Error::Net {
            op: "listening on",
            addr: opts.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Net {
        op: "reading the address of",
        addr: opts.listen,
        source,
    })?;
    Ok(Bound {
        listener,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
        app: crate::api::router(db.clone(), Arc::new(ca), jobs.clone())?,
        db,
        jobs,
        runner: opts.runner.clone(),
        url: format!("https://{addr}"),
    })
}

/// The site CA: the state directory's (copied from `join` first, when given), which
/// must be the one the database recorded. On a database that serves no site yet,
/// the CA is made (unless the directory has one) and recorded; of two first starts
/// at once, the one whose record lost removes the CA it just made and refuses.
async fn site_ca(
    db: &Db,
    url: &str,
    dir: &std::path::Path,
    join: Option<&std::path::Path>,
) -> Result<SiteCa, Error> {
    use enroll::join;
    if let Some(from) = join {
        join::copy_shared(from, dir)?;
    }
    let recorded = db::site::recorded_ca(db).await?;
    let lacking = join::missing_shared(dir);
    let copy_hint = |what: String| {
        format!(
            "{what}: copy ca.pem, ca.key and admin.token from the state directory of a \
             control plane of that site into {}, or start with --join THAT_DIR",
            dir.display()
        )
    };
    if recorded.is_some() && !lacking.is_empty() {
        let names: Vec<String> = lacking.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::Site(copy_hint(format!(
            "database {} already serves a site and this control plane lacks {}",
            db::redacted(url),
            names.join(", ")
        ))));
    }
    let made_here = !dir.join("ca.key").exists();
    let ca = SiteCa::open_or_create(dir)?;
    let site = db::site::record_ca(db, &ca.pem).await?;
    if !join::same_certificate(&site, &ca.pem) {
        if made_here {
            // Nobody has trusted it yet: leave the directory as it was, so that a
            // retry with the site's files is not refused for this one.
            for f in ["ca.key", "ca.pem"] {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
        return Err(Error::Site(copy_hint(format!(
            "the site CA that database {} recorded is not {}/ca.pem",
            db::redacted(url),
            dir.display()
        ))));
    }
    Ok(ca)
}

fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<rustls::ServerConfig, Error> {
    let pem_err = |op| {
        move |e: rustls_pki_types::pem::Error| Error::Tls {
            op,
            source: rustls::Error::General(e.to_string()),
        }
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err("reading server.pem"))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err("reading server.key"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(pem_err("reading ca.pem"))?;
        roots.add(cert).map_err(|source| Error::Tls {
            op: "the site CA",
            source,
        })?;
    }
    // Optional: a client without a certificate goes on to bearer tokens; one with a
    // certificate of another CA fails the handshake.
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| Error::Tls {
        op: "the client certificate verifier",
        source: rustls::Error::General(e.to_string()),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| Error::Tls {
            op: "TLS versions",
            source,
        })?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)
        .map_err(|source| Error::Tls {
            op: "the service certificate",
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

impl Bound {
    /// Serves until the process ends. Each connection is its own task; at most
    /// `MAX_CONNECTIONS` at once. The job runner, the retention schedule and the
    /// webhooks' deliverer run beside it.
    pub async fn serve(self) {
        // Of several control planes on one database, the holder of this lease alone
        // sweeps health, schedules retention and prunes; it is the jobs' lease long.
        let scheduler = Singleton::start(
            self.db.clone(),
            singleton::SCHEDULER,
            &self.runner.owner,
            self.runner.lease,
        )
        .await;
        crate::health::spawn_sweeper(self.db.clone(), scheduler.clone());
        tokio::spawn(runner::run(
            self.jobs.clone(),
            self.runner.clone(),
            scheduler.clone(),
        ));
        tokio::spawn(retention::schedule_loop(
            self.jobs.clone(),
            retention::EVERY,
            scheduler,
        ));
        tokio::spawn(crate::webhooks::deliver::run(
            self.db.clone(),
            crate::webhooks::deliver::DelivererConfig::new(self.runner.owner.clone()),
        ));
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, mostly: wait rather than spin.
                    tracing::warn!("accepting a connection on {}: {e}", self.url);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = self.acceptor.clone();
            let app = self.app.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!("TLS handshake with {peer}: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake with {peer}: timed out");
                        return;
                    }
                };
                // The verified client certificate, for every request of this connection.
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|c| Arc::new(c.as_ref().to_vec()));
                let app = app.layer(axum::Extension(ClientCert(cert)));
                if let Err(e) = serve_connection(tls, app, CONN_LIMITS).await {
                    tracing::debug!("connection from {peer}: {e}");
                }
            });
        }
    }
}

/// Serves one connection (TLS already done) within `limits`.
async fn serve_connection<IO>(
    mut io: IO,
    app: axum::Router,
    limits: ConnLimits,
) -> Result<(), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::AsyncReadExt;
    // hyper-util reads the first bytes to tell HTTP/1.1 from HTTP/2 with no timer of
    // its own: a client that sends nothing after its handshake would keep its slot
    // forever. Read them here, against a deadline, and hand them back in front.
    let mut first = vec![0u8; 4096];
    let n = tokio::time::timeout(limits.first_bytes, io.read(&mut first))
        .await
        .map_err(|_| format!("sent nothing for {} s", limits.first_bytes.as_secs_f64()))?
        .map_err(|e| format!("reading: {e}"))?;
    if n == 0 {
        return Ok(());
    }
    first.truncate(n);
    let (r, w) = tokio::io::split(io);
    let io = tokio::io::join(std::io::Cursor::new(first).chain(r), w);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => return served.map_err(|e| e.to_string()),
        _ = tokio::time::sleep(limits.max_age) => {}
    }
    conn.as_mut().graceful_shutdown();
    match tokio::time::timeout(limits.drain, conn).await {
        Ok(served) => served.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "closed: over {} s old and its request not done {} s later",
            limits.max_age.as_secs_f64(),
            limits.drain.as_secs_f64()
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    const SHORT: ConnLimits = ConnLimits {
        first_bytes: Duration::from_millis(200),
        header_read: Duration::from_secs(30),
        max_age: Duration::from_millis(300),
        drain: Duration::from_secs(5),
    };

    /// A listener serving `app` within `limits`, plain TCP (TLS is not what is tested).
    async fn listen(limits: ConnLimits) -> SocketAddr {
        let app = axum::Router::new().route("/ok", axum::routing::get(|| async { "ok" }));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                tokio::spawn(serve_connection(tcp, app.clone(), limits));
            }
        });
        addr
    }

    /// Reads until the server closes; None if it has not within `wait`.
    fn closed_within(s: &mut std::net::TcpStream, wait: Duration) -> Option<String> {
        s.set_read_timeout(Some(wait)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Some(String::from_utf8_lossy(&got).to_string()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => return None,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_client_that_sends_nothing_is_dropped_at_the_first_bytes_deadline() {
        let addr = listen(SHORT).await;
        let closed = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            closed_within(&mut s, Duration::from_secs(5))
        })
        .await
        .unwrap();
        assert_eq!(
            closed.as_deref(),
            Some(""),
            "closed, having answered nothing"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_kept_alive_connection_is_closed_once_old_after_its_answer() {
        let addr = listen(SHORT).await;
        let closed = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            closed_within(&mut s, Duration::from_secs(5))
        })
        .await
        .unwrap()
        .expect("closed, not kept alive past its age");
        assert!(closed.starts_with("HTTP/1.1 200"), "{closed}");
        assert!(closed.ends_with("ok"), "{closed}");
    }
}
