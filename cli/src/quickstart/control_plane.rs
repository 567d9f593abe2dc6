//! The quickstart's control plane: the same service `ferry control-plane` runs
//! (`server::bind` + `serve`), embedded, with its state directory under the
//! quickstart's; and what the quickstart asks of its API (enrollment tokens, the
//! registry, a machine's health and RPO) through the client `ferry cp` uses.
//!
//! Embedded rather than a child `ferry control-plane`: it lives and dies with the
//! quickstart, so a failed step or a Ctrl-C leaves no process behind to find and
//! reap, and it runs as it is, with nothing installed and no path to a binary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_controlplane::jobs::runner::RunnerConfig;
use ferry_controlplane::server::{bind, Options};
use reqwest::Method;
use serde_json::{json, Value};

use crate::cp::client::Conn;

/// A running embedded control plane and an admin connection to its API.
pub struct Embedded {
    pub url: String,
    pub state_dir: PathBuf,
    pub ca: PathBuf,
    pub token_file: PathBuf,
    conn: Conn,
    /// Serves the API until the quickstart drops it.
    rt: Option<tokio::runtime::Runtime>,
}

/// What the API says of a machine once it is healthy and has an RPO.
pub struct MachineView {
    pub health: String,
    pub rpo_seconds: f64,
    pub process_server: String,
    pub policy: String,
}

impl Embedded {
    /// Initialises `state_dir` (site CA, service certificate, admin token, SQLite)
    /// and serves HTTPS on a free loopback port. With the store and its key the
    /// points API and retention jobs work as on a real site.
    pub fn start(state_dir: &Path, store_url: &str, key_file: &Path) -> Result<Embedded> {
        let opts = Options {
            state_dir: state_dir.to_path_buf(),
            listen: "127.0.0.1:0".parse()?,
            // As `ferry control-plane` names itself: localhost, 127.0.0.1, the host.
            server_names: Vec::new(),
            database: None,
            store: Some((store_url.to_string(), key_file.to_path_buf())),
            runner: RunnerConfig::default(),
            join: None,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-cp")
            .enable_all()
            .build()
            .context("starting the control plane's runtime")?;
        let bound = rt
            .block_on(bind(&opts))
            .with_context(|| format!("control plane in {}", state_dir.display()))?;
        let url = bound.url.clone();
        rt.spawn(bound.serve());
        let ca = state_dir.join("ca.pem");
        let token_file = state_dir.join("admin.token");
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("admin token {}", token_file.display()))?;
        let conn = Conn::connect(&url, &token, &ca, true)?;
        Ok(Embedded {
            url,
            state_dir: state_dir.to_path_buf(),
            ca,
            token_file,
            conn,
            rt: Some(rt),
        })
    }

    /// A one-time enrollment token for an `agent` or a `process-server`, as
    /// `ferry cp tokens create --for KIND` makes it.
    pub fn enrollment_token(&self, kind: &str) -> Result<String> {
        let answer = self
            .conn
            .call(
                Method::POST,
                "/v1/enrollment-tokens",
                Some(&json!({ "for": kind })),
            )?
            .ok_or_else(|| anyhow!("POST /v1/enrollment-tokens: empty answer"))?;
        answer
            .get("token")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("POST /v1/enrollment-tokens: no token in {answer}"))
    }

    /// Waits until process server `name` is in the registry (its first heartbeat
    /// registers it), so that the agent's first orders can name it.
    pub fn wait_process_server(&self, name: &str, within: Duration) -> Result<Value> {
        let path = format!("/v1/process-servers/{name}");
        let deadline = Instant::now() + within;
        loop {
            match self.conn.call(Method::GET, &path, None) {
                Ok(Some(ps)) => return Ok(ps),
                Ok(None) => bail!("GET {path}: empty answer"),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "process server {name} did not heartbeat within {} s",
                        within.as_secs()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Waits until the API shows machine `name` with a numeric `rpo_seconds` and
    /// health `normal` (its heartbeat every 5 s reports the newest uploaded point);
    /// after `within`, fails with what the API said last.
    pub fn wait_machine_healthy(&self, name: &str, within: Duration) -> Result<MachineView> {
        let path = format!("/v1/machines/{name}");
        let deadline = Instant::now() + within;
        loop {
            let last = match self.conn.call(Method::GET, &path, None) {
                Ok(Some(m)) => match healthy(&m) {
                    Some(view) => return Ok(view),
                    None => format!(
                        "health {}, reasons {}, rpo_seconds {}",
                        m["health"], m["health_reasons"], m["rpo_seconds"]
                    ),
                },
                Ok(None) => format!("GET {path}: empty answer"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "machine {name} at the control plane is not healthy with an RPO after {} s: {last}",
                    within.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Embedded {
    /// Stops serving, on success or on a failed step alike.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Open connections and the job runner end with it; a task stuck in I/O
            // is not waited for past this.
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// The view of `m` once it is healthy and has an RPO; None before.
fn healthy(m: &Value) -> Option<MachineView> {
    let rpo_seconds = m.get("rpo_seconds")?.as_f64()?;
    let health = m.get("health")?.as_str()?;
    (health == "normal").then(|| MachineView {
        health: health.to_string(),
        rpo_seconds,
        process_server: crate::cp::client::cell(m, "process_server"),
        policy: crate::cp::client::cell(m, "policy"),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_machine_is_shown_once_normal_with_a_numeric_rpo() {
        let base = json!({
            "name": "agent-0", "health": "normal", "health_reasons": [],
            "rpo_seconds": 2.5, "process_server": "ps-0", "policy": "default"
        });
        let v = super::healthy(&base).unwrap();
        assert_eq!(
            (v.health.as_str(), v.rpo_seconds, v.process_server.as_str()),
            ("normal", 2.5, "ps-0")
        );
        let mut before_first_point = base.clone();
        before_first_point["rpo_seconds"] = json!(null);
        assert!(super::healthy(&before_first_point).is_none());
        let mut warning = base.clone();
        warning["health"] = json!("warning");
        assert!(super::healthy(&warning).is_none());
    }
}
