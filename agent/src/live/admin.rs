//! The admin socket: `bookmark [--app] [--label L]`, `resync [--disk D]` and
//! `status [--json]`, one request
//! per connection, one answer; `ferry agent ctl` is its client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use super::Agent;

pub fn serve(path: &Path, agent: Arc<Agent>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("ferry-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Err(e) = answer(conn, &agent) {
                    tracing::warn!(error = %e, "admin request failed");
                }
            }
        })?;
    Ok(())
}

fn answer(conn: UnixStream, agent: &Agent) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut w = conn;
    let flag = |name: &str| words.contains(&name);
    let value = |name: &str| {
        words
            .iter()
            .position(|x| *x == name)
            .and_then(|i| words.get(i + 1))
            .map(|s| s.to_string())
    };
    match words.first().copied() {
        Some("bookmark") => match agent.bookmark(flag("--app"), value("--label").as_deref()) {
            Ok(id) => writeln!(w, "ok {id}"),
            Err(e) => writeln!(w, "error {e}"),
        },
        Some("resync") => match agent.resync(value("--disk").as_deref()) {
            Ok(disks) => writeln!(w, "ok checksum resync started: {}", disks.join(" ")),
            Err(e) => writeln!(w, "error {e}"),
        },
        Some("status") => {
            let s = agent.status();
            if flag("--json") {
                writeln!(w, "ok {}", serde_json::to_string(&s).unwrap_or_default())
            } else {
                writeln!(w, "ok")?;
                for d in &s {
                    writeln!(
                        w,
                        "{}: {} mode, journal {} bytes, next {} durable {} uploaded {}, lag {:.1} s, last point {}, {}{}{}",
                        d["disk"].as_str().unwrap_or(""),
                        d["mode"].as_str().unwrap_or(""),
                        d["journal_bytes"],
                        d["next_seq"],
                        d["durable"],
                        d["uploaded"],
                        d["lag_s"].as_f64().unwrap_or(0.0),
                        d["last_point"].as_str().unwrap_or("none"),
                        if d["connected"].as_bool().unwrap_or(false) { "connected" } else { "disconnected" },
                        progress("initial copy", &d["copy"]),
                        progress("checksum resync", &d["resync"]),
                    )?;
                    // Why a disk is disconnected, where a person looks: a refusal by
                    // the process server would otherwise show as "disconnected" only.
                    if let (false, Some(e)) = (
                        d["connected"].as_bool().unwrap_or(false),
                        d["last_error"].as_str(),
                    ) {
                        writeln!(w, "  {}: {e}", d["disk"].as_str().unwrap_or(""))?;
                    }
                }
                Ok(())
            }
        }
        _ => writeln!(
            w,
            "error unknown request {:?}: try bookmark, resync or status",
            line.trim()
        ),
    }
}

/// ", initial copy 42.0 % at 120 MB/s, 8 s left" for a running copy or resync.
fn progress(what: &str, p: &serde_json::Value) -> String {
    if p.is_null() {
        return String::new();
    }
    let left = p["left_s"]
        .as_f64()
        .map_or("time left unknown".to_string(), |s| {
            format!("{s:.0} s left")
        });
    let sent = p["sent_bytes"]
        .as_u64()
        .map_or(String::new(), |b| format!(", {b} bytes sent"));
    format!(
        ", {what} {:.1} % at {:.0} MB/s, {left}{sent}",
        p["percent"].as_f64().unwrap_or(0.0),
        p["mb_per_s"].as_f64().unwrap_or(0.0)
    )
}

/// Sends one request to an agent's admin socket; returns the answer's lines.
pub fn request(path: &Path, req: &str) -> Result<Vec<String>, String> {
    let mut c =
        UnixStream::connect(path).map_err(|e| format!("admin socket {}: {e}", path.display()))?;
    writeln!(c, "{req}").map_err(|e| e.to_string())?;
    let lines: Vec<String> = BufReader::new(c).lines().map_while(Result::ok).collect();
    match lines.first() {
        Some(l) if l.starts_with("ok") => Ok(lines),
        Some(l) => Err(l.trim_start_matches("error ").to_string()),
        None => Err("the agent closed the admin connection without an answer".into()),
    }
}
