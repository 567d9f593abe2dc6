//! The agent's and process server's client of the control plane: its identity in a
//! state directory (a key that never leaves the host, the certificate issued for it,
//! the site CA), enrollment with a one-time token, renewal once two thirds of the
//! certificate's life has passed, and heartbeats over mutual TLS.
//!
//! It runs on its own thread with its own small tokio runtime (`Heartbeats`), so the
//! compio data path never waits on it; the control plane being down only delays new
//! orders: the caller keeps the last ones and replication goes on.
//!
//! A site may run several control planes on one database (docs/control-plane.md,
//! "Running it highly available"): the client is given all their URLs and sends each
//! request to the one that answered last; a request that fails or is refused there
//! goes to the next, in the order given, and the client stays with the first that
//! answers. Enrollment, renewal and heartbeats alike.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rcgen::{CertificateParams, KeyPair};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::limits::MAX_ANSWER_BYTES;
use super::wire::{EnrollRequest, Issued, Kind, RenewRequest, HEARTBEAT_INTERVAL_S};
use crate::tls::certs::{anonymous_client_config, client_config, CertError};

/// Every call gives up after this: a control plane that hangs is one that is down.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeat intervals the control plane may ask for are kept within this range, so a
/// bad answer can neither flood it nor silence a part for minutes.
const MIN_INTERVAL_S: f64 = 0.5;
const MAX_INTERVAL_S: f64 = 60.0;
/// Control planes one client is given at most: a site runs a few, and a request
/// tries each in turn before it fails.
pub const MAX_CONTROL_PLANES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("making a key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("{what}: {source}")]
    Http {
        what: String,
        source: reqwest::Error,
    },
    /// The control plane answered with an RFC 9457 problem (or another error status).
    #[error("{what}: {status} {detail}")]
    Refused {
        what: String,
        status: u16,
        detail: String,
    },
    #[error("{what}: the answer is not what was expected: {why}")]
    BadAnswer { what: String, why: String },
    #[error("{dir}: no certificate yet and no enrollment token (--enroll-token) to get one")]
    NotEnrolled { dir: String },
    #[error("control plane URL {0} must start with https://")]
    Url(String),
    #[error("control plane URLs: {0}")]
    Urls(String),
    /// Every control plane given failed or refused the request: each one's error,
    /// in the order tried (each names its URL).
    #[error("every control plane failed: {}", list(.0))]
    Every(Vec<ControlError>),
    #[error("starting the control plane client's runtime: {0}")]
    Runtime(std::io::Error),
}

pub type Result<T> = std::result::Result<T, ControlError>;

fn list(errors: &[ControlError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ControlError + 'a {
    move |source| ControlError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// Who enrolls, where, and where its identity is kept.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// https://HOST:PORT of each control plane of the site (at least one): the
    /// client uses whichever answers.
    pub urls: Vec<String>,
    /// The site CA the control plane's certificate chains to (`--ca`).
    pub ca: PathBuf,
    pub kind: Kind,
    pub name: String,
    /// A process server's `--advertise` HOST:PORT.
    pub advertise: Option<String>,
    /// Holds `key.pem` (0600), `cert.pem`, `ca.pem` and `issued.json`.
    pub dir: PathBuf,
}

/// The files of an enrolled identity in its state directory.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub key: PathBuf,
    pub cert: PathBuf,
    /// The site CA as the control plane sent it: agents check process servers with it
    /// and process servers check agents.
    pub ca: PathBuf,
    /// When the certificate was received and when it expires (`Validity`).
    pub issued: PathBuf,
}

impl IdentityFiles {
    pub fn in_dir(dir: &Path) -> IdentityFiles {
        IdentityFiles {
            key: dir.join("key.pem"),
            cert: dir.join("cert.pem"),
            ca: dir.join("ca.pem"),
            issued: dir.join("issued.json"),
        }
    }

    /// Whether this directory holds an enrolled identity (a restart needs no token).
    pub fn present(&self) -> bool {
        self.key.is_file() && self.cert.is_file() && self.ca.is_file() && self.issued.is_file()
    }
}

/// A certificate's life as the holder saw it: renewal is due at two thirds of it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validity {
    pub issued_at: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

impl Validity {
    /// When to renew: two thirds of the way from issue to expiry.
    pub fn renew_at(&self) -> DateTime<Utc> {
        let life = self.not_after - self.issued_at;
        self.issued_at + life * 2 / 3
    }

    pub fn due(&self, now: DateTime<Utc>) -> bool {
        now >= self.renew_at()
    }
}

/// A new private key and a CSR for it; the key stays in memory until its certificate
/// arrives, then `store` writes it 0600. The control plane ignores the CSR's subject:
/// it names the certificate.
fn key_and_csr(name: &str) -> Result<(KeyPair, String)> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::new(vec![name.to_string()])?
        .serialize_request(&key)?
        .pem()?;
    Ok((key, csr))
}

/// Writes `text` to `path` through a temporary file and a rename, so a crash leaves the
/// old file or the new one, never half of one; `private` files are 0600 from the start.
fn write_atomic(path: &Path, text: &str, private: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // A temporary file left by a crash keeps the mode it was made with (`mode` applies
    // only to a file this call creates): remove it, so a key is never written into a
    // file others can read.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err("removing the stale", &tmp)(e))
        }
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io_err("writing", &tmp))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("renaming into", path))
}

/// Stores a newly issued certificate with its key: the key first, so a cert on disk
/// always has its key beside it.
fn store(files: &IdentityFiles, key: &KeyPair, issued: &Issued, now: DateTime<Utc>) -> Result<()> {
    let not_after = DateTime::parse_from_rfc3339(&issued.not_after)
        .map_err(|e| ControlError::BadAnswer {
            what: "the issued certificate".into(),
            why: format!("not_after {:?}: {e}", issued.not_after),
        })?
        .with_timezone(&Utc);
    let validity = Validity {
        issued_at: now,
        not_after,
    };
    let json = serde_json::to_string_pretty(&validity).map_err(|e| ControlError::BadAnswer {
        what: "the issued certificate".into(),
        why: e.to_string(),
    })?;
    check_pair(&issued.certificate_pem, key).map_err(|why| ControlError::BadAnswer {
        what: "the issued certificate".into(),
        why,
    })?;
    write_atomic(&files.key, &key.serialize_pem(), true)?;
    write_atomic(&files.cert, &issued.certificate_pem, false)?;
    write_atomic(&files.ca, &issued.ca_pem, false)?;
    write_atomic(&files.issued, &json, false)
}

/// Whether `cert_pem` is a certificate for `key`: a wrong answer must never replace a
/// working identity.
fn check_pair(cert_pem: &str, key: &KeyPair) -> std::result::Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| format!("our key: {e}"))?;
    rustls::sign::CertifiedKey::from_der(certs, der, &rustls::crypto::ring::default_provider())
        .map(|_| ())
        .map_err(|e| format!("not a certificate for the key this host made: {e}"))
}

fn read_validity(path: &Path) -> Result<Validity> {
    let text = std::fs::read_to_string(path).map_err(io_err("reading", path))?;
    serde_json::from_str(&text).map_err(|e| ControlError::BadAnswer {
        what: path.display().to_string(),
        why: e.to_string(),
    })
}

/// How long an idle connection is kept for the next call.
const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(20);

/// HTTPS to the control plane, with or without the client certificate.
fn http_client(tls: rustls::ClientConfig) -> Result<reqwest::Client> {
    let mut tls = tls;
    // This reqwest speaks HTTP/1.1 only (no http2 feature).
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(CALL_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        // Below the control plane's 30 s idle close (its header timeout): a pooled
        // connection reused just as the server closes it fails the call.
        .pool_idle_timeout(POOL_IDLE)
        .build()
        .map_err(|source| ControlError::Http {
            what: "building the HTTPS client".into(),
            source,
        })
}

/// The control planes of a site, in the order given, and the one that answered
/// last: where the next request goes first.
#[derive(Debug)]
pub struct ControlPlanes {
    urls: Vec<String>,
    current: AtomicUsize,
}

impl ControlPlanes {
    /// Checks the URLs: one at least, at most `MAX_CONTROL_PLANES`, each https://;
    /// a trailing `/` is dropped and a repeated URL kept once.
    pub fn new(urls: &[String]) -> Result<ControlPlanes> {
        let mut kept: Vec<String> = Vec::new();
        for u in urls {
            let u = u.trim().trim_end_matches('/').to_string();
            if !u.starts_with("https://") {
                return Err(ControlError::Url(u));
            }
            if !kept.contains(&u) {
                kept.push(u);
            }
        }
        if kept.is_empty() {
            return Err(ControlError::Urls("none given".into()));
        }
        if kept.len() > MAX_CONTROL_PLANES {
            return Err(ControlError::Urls(format!(
                "{} given; at most {MAX_CONTROL_PLANES}",
                kept.len()
            )));
        }
        Ok(ControlPlanes {
            urls: kept,
            current: AtomicUsize::new(0),
        })
    }

    /// The URL the next request goes to first.
    pub fn current(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// POSTs to the current control plane, then to each next one while they fail or
    /// refuse; stays with the first that answers. With one URL, its error as it is;
    /// with several, every one's.
    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        http: &reqwest::Client,
        path: &str,
        body: &B,
    ) -> Result<R> {
        let n = self.urls.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut errors = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            match post(http, &self.urls[i], path, body).await {
                Ok(answer) => {
                    if i != first {
                        self.current.store(i, Ordering::Relaxed);
                        tracing::warn!(from = %self.urls[first], to = %self.urls[i], "switched to another control plane: the one used so far failed or refused");
                    }
                    return Ok(answer);
                }
                Err(e) => {
                    if n > 1 {
                        tracing::debug!(error = %e, "trying the next control plane");
                    }
                    errors.push(e);
                }
            }
        }
        if errors.len() == 1 {
            return Err(errors.remove(0));
        }
        Err(ControlError::Every(errors))
    }
}

/// An enrolled client of the control plane.
pub struct ControlClient {
    planes: ControlPlanes,
    name: String,
    pub files: IdentityFiles,
    validity: Validity,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl ControlClient {
    /// Loads the identity in `e.dir`, or enrolls with `token` when there is none yet.
    pub fn open(e: &Enrollment, token: Option<&str>) -> Result<ControlClient> {
        let planes = ControlPlanes::new(&e.urls)?;
        ferry_replica::local::create_private_dir(&e.dir).map_err(io_err("state dir", &e.dir))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ControlError::Runtime)?;
        let files = IdentityFiles::in_dir(&e.dir);
        if !files.present() {
            let token = token.ok_or_else(|| ControlError::NotEnrolled {
                dir: e.dir.display().to_string(),
            })?;
            let (key, csr_pem) = key_and_csr(&e.name)?;
            let anon = http_client(anonymous_client_config(&e.ca)?)?;
            let req = EnrollRequest {
                token: token.to_string(),
                kind: e.kind,
                name: e.name.clone(),
                csr_pem,
                advertise: e.advertise.clone(),
            };
            let issued: Issued = rt.block_on(planes.post(&anon, "/v1/enroll", &req))?;
            store(&files, &key, &issued, Utc::now())?;
            tracing::info!(name = %e.name, kind = e.kind.as_str(), not_after = %issued.not_after, dir = %e.dir.display(), "enrolled with the control plane");
        }
        let validity = read_validity(&files.issued)?;
        let http = http_client(client_config(&files.cert, &files.key, &files.ca)?)?;
        Ok(ControlClient {
            planes,
            name: e.name.clone(),
            files,
            validity,
            http,
            rt,
        })
    }

    pub fn validity(&self) -> Validity {
        self.validity
    }

    /// The control planes, and which one requests go to first now.
    pub fn planes(&self) -> &ControlPlanes {
        &self.planes
    }

    /// Renews the certificate (a new key, a new CSR, over mutual TLS with the current
    /// one) if two thirds of its life has passed. Returns whether it renewed: the
    /// caller then loads the new files where it uses them.
    pub fn renew_if_due(&mut self, now: DateTime<Utc>) -> Result<bool> {
        if !self.validity.due(now) {
            return Ok(false);
        }
        let (key, csr_pem) = key_and_csr(&self.name)?;
        let issued: Issued = self.rt.block_on(self.planes.post(
            &self.http,
            "/v1/renew",
            &RenewRequest { csr_pem },
        ))?;
        store(&self.files, &key, &issued, now)?;
        self.validity = read_validity(&self.files.issued)?;
        self.http = http_client(client_config(
            &self.files.cert,
            &self.files.key,
            &self.files.ca,
        )?)?;
        tracing::info!(name = %self.name, not_after = %issued.not_after, "renewed the certificate");
        Ok(true)
    }

    /// One POST over mutual TLS (a heartbeat).
    pub fn call<B: Serialize, R: DeserializeOwned>(&self, path: &str, body: &B) -> Result<R> {
        self.rt.block_on(self.planes.post(&self.http, path, body))
    }
}

async fn post<B: Serialize, R: DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    path: &str,
    body: &B,
) -> Result<R> {
    let what = format!("POST {url}{path}");
    let body = serde_json::to_vec(body).map_err(|e| ControlError::BadAnswer {
        what: what.clone(),
        why: format!("encoding the request: {e}"),
    })?;
    let http_err = |source| ControlError::Http {
        what: what.clone(),
        source,
    };
    let resp = http
        .post(format!("{url}{path}"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(http_err)?;
    let status = resp.status();
    let bytes = read_bounded(resp, &what).await?;
    if !status.is_success() {
        return Err(ControlError::Refused {
            what,
            status: status.as_u16(),
            detail: problem_detail(&bytes),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| ControlError::BadAnswer {
        what,
        why: e.to_string(),
    })
}

/// The answer's body, refused once it is over `MAX_ANSWER_BYTES`: read chunk by chunk
/// so that a broken or hostile answer never fills memory.
async fn read_bounded(mut resp: reqwest::Response, what: &str) -> Result<Vec<u8>> {
    let too_big = || ControlError::BadAnswer {
        what: what.to_string(),
        why: format!("the answer is over {MAX_ANSWER_BYTES} bytes"),
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|source| ControlError::Http {
        what: what.to_string(),
        source,
    })? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The `detail` (or `title`) of an RFC 9457 problem; the start of the body otherwise.
fn problem_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Problem {
        title: Option<String>,
        detail: Option<String>,
    }
    match serde_json::from_slice::<Problem>(body) {
        Ok(Problem {
            detail: Some(d), ..
        }) => d,
        Ok(Problem { title: Some(t), .. }) => t,
        _ => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            if text.trim().is_empty() {
                "(no detail)".into()
            } else {
                text.trim().to_string()
            }
        }
    }
}

/// The part's side of the heartbeat loop: what it reports and what it does with the
/// orders.
pub trait Heartbeater: Send + 'static {
    type Report: Serialize;
    type Orders: DeserializeOwned;
    /// `/v1/heartbeat/agent` or `/v1/heartbeat/process-server`.
    const PATH: &'static str;
    fn report(&mut self) -> Self::Report;
    /// Applies new orders; returns the heartbeat interval they ask for.
    fn apply(&mut self, orders: Self::Orders) -> f64;
    /// The certificate was renewed: load the new files wherever they are used.
    fn renewed(&mut self, _files: &IdentityFiles) {}
}

/// The heartbeat thread: renews when due, heartbeats, applies the orders; the control
/// plane being down is logged once per outage and retried every interval while the
/// part goes on with its last orders.
pub struct Heartbeats {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeats {
    /// `first` is the interval until the control plane's first answer says otherwise.
    pub fn start<H: Heartbeater>(
        mut client: ControlClient,
        mut part: H,
        first: Duration,
    ) -> Result<Heartbeats> {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-control".into())
            .spawn(move || {
                let mut interval = first.as_secs_f64();
                // Apart, so that a renewal refused while heartbeats pass is logged
                // once, not at every interval.
                let (mut outage, mut renewal) = (Outage::default(), Outage::default());
                while !st.load(Ordering::Relaxed) {
                    match client.renew_if_due(Utc::now()) {
                        Ok(true) => {
                            renewal.ok();
                            part.renewed(&client.files);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            renewal.failed("renewing the certificate", &e);
                        }
                    }
                    let report = part.report();
                    match client.call::<_, H::Orders>(H::PATH, &report) {
                        Ok(orders) => {
                            outage.ok();
                            interval = clamp_interval(part.apply(orders));
                        }
                        Err(e) => {
                            outage.failed("heartbeat", &e);
                        }
                    }
                    sleep_unless(&st, Duration::from_secs_f64(interval));
                }
            })
            .map_err(|e| ControlError::Io {
                op: "starting",
                path: "the control plane thread".into(),
                source: e,
            })?;
        Ok(Heartbeats {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn clamp_interval(s: f64) -> f64 {
    if s.is_finite() {
        s.clamp(MIN_INTERVAL_S, MAX_INTERVAL_S)
    } else {
        HEARTBEAT_INTERVAL_S
    }
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = std::time::Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = std::time::Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Logs a control plane outage once, and its end once.
#[derive(Default)]
struct Outage {
    down: bool,
}

impl Outage {
    /// Returns whether this failure was logged (the first of an outage).
    fn failed(&mut self, what: &str, e: &ControlError) -> bool {
        if self.down {
            tracing::debug!(error = %e, "{what} failed again");
            return false;
        }
        tracing::warn!(error = %e, "{what} failed: the control plane is unreachable or refused; replication goes on with the last orders, retrying every interval");
        self.down = true;
        true
    }

    /// Returns whether an outage ended here (and was logged).
    fn ok(&mut self) -> bool {
        let ended = std::mem::take(&mut self.down);
        if ended {
            tracing::info!("the control plane answers again");
        }
        ended
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
