//! The connection to a control plane: its URL, the CA that signed it, a bearer token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::Method;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::Value;

#[derive(clap::Args)]
pub struct ConnArgs {
    /// The control plane's URL, https://HOST:PORT (or FERRY_CP_URL)
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// A file holding the API token (or the token itself in FERRY_CP_TOKEN)
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The site CA, the state directory's ca.pem (or FERRY_CP_CA)
    #[arg(long, global = true, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Print the API's JSON instead of a table
    #[arg(long, global = true)]
    pub json: bool,
}

pub struct Conn {
    url: String,
    token: String,
    pub json: bool,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Conn {
    pub fn open(a: &ConnArgs) -> Result<Conn> {
        let url = a
            .url
            .clone()
            .or_else(|| env("FERRY_CP_URL"))
            .ok_or_else(|| anyhow!("no control plane: give --url or set FERRY_CP_URL"))?;
        let token = match &a.token_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("token file {}", path.display()))?,
            None => env("FERRY_CP_TOKEN")
                .ok_or_else(|| anyhow!("no token: give --token-file or set FERRY_CP_TOKEN"))?,
        };
        let ca =
            a.ca.clone()
                .or_else(|| env("FERRY_CP_CA").map(PathBuf::from))
                .ok_or_else(|| {
                    anyhow!("no CA: give --ca (the state directory's ca.pem) or set FERRY_CP_CA")
                })?;
        Conn::connect(&url, &token, &ca, a.json)
    }

    /// A connection from its parts: `url` (https://HOST:PORT), a bearer token and
    /// the site CA's file.
    pub fn connect(url: &str, token: &str, ca: &Path, json: bool) -> Result<Conn> {
        let url = url.trim_end_matches('/').to_string();
        if !url.starts_with("https://") {
            bail!("control plane URL {url} must start with https://");
        }
        let token = token.trim().to_string();
        let pem = std::fs::read(ca).with_context(|| format!("CA {}", ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.with_context(|| format!("CA {}", ca.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("CA {}", ca.display()))?;
        }
        if roots.is_empty() {
            bail!("CA {}: no certificate in it", ca.display());
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        // This reqwest speaks HTTP/1.1 only (no http2 feature).
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(std::time::Duration::from_secs(30))
            // Below the control plane's 30 s idle close: a connection reused as the
            // server closes it fails the request.
            .pool_idle_timeout(std::time::Duration::from_secs(20))
            .build()
            .context("building the HTTPS client")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        Ok(Conn {
            url,
            token,
            json,
            http,
            rt,
        })
    }

    /// Sends one request; the JSON answer (None for 204), or an error line naming the
    /// request and the problem's title and detail.
    pub fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Option<Value>> {
        let what = format!("{method} {}{path}", self.url);
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(body)?);
        }
        let (status, bytes) = self
            .rt
            .block_on(async {
                let resp = req.send().await?;
                let status = resp.status();
                let bytes = resp.bytes().await?;
                Ok::<_, reqwest::Error>((status, bytes))
            })
            .with_context(|| what.clone())?;
        if !status.is_success() {
            let problem: Option<Value> = serde_json::from_slice(&bytes).ok();
            let field = |k: &str| {
                problem
                    .as_ref()
                    .and_then(|p| p.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            match (field("title"), field("detail")) {
                (Some(t), Some(d)) => bail!("{what}: {} {t}: {d}", status.as_u16()),
                _ => bail!("{what}: {status}"),
            }
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        let v = serde_json::from_slice(&bytes)
            .with_context(|| format!("{what}: the answer is not JSON"))?;
        Ok(Some(v))
    }

    /// Every item of a paged list, following `next_after`.
    pub fn list_all(&self, path: &str) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut after: Option<String> = None;
        loop {
            // A path may come with its own query (`/v1/jobs?state=failed`).
            let sep = if path.contains('?') { '&' } else { '?' };
            let page_path = match &after {
                Some(a) => format!("{path}{sep}limit=1000&after={a}"),
                None => format!("{path}{sep}limit=1000"),
            };
            let page = self
                .call(Method::GET, &page_path, None)?
                .ok_or_else(|| anyhow!("GET {path}: empty answer"))?;
            if let Some(Value::Array(got)) = page.get("items") {
                items.extend(got.iter().cloned());
            }
            match page.get("next_after").and_then(Value::as_str) {
                // Names follow the store's rule (letters, digits, . _ -), job ids and
                // point keys too (with '/' and ':', which a query may hold): no escaping.
                Some(next) => after = Some(next.to_string()),
                None => return Ok(items),
            }
        }
    }
}

/// A JSON value as a table cell.
pub fn cell(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_string(),
        Some(other) => other.to_string(),
    }
}

/// Prints a value as indented JSON.
pub fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
