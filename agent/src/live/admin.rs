//! The admin socket: `bookmark [--app] [--label L]`, `resync [--disk D]` and
//! `status [--json]`, one request
//! per connection, one answer; `ferry agent ctl` is its client.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::Agent;

/// How long a client may take to send its request line, and to take the answer: the
/// socket is answered one connection at a time, so a stalled client must not hold it.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest request line read; the longest real one is a bookmark with its label.
const REQUEST_BYTES_MAX: u64 = 4096;

/// Binds the admin socket at `path`, mode 0600 (it takes points and reads status).
/// Whatever is at `path` already is removed only if it is a stale socket, one no agent
/// answers on: a live socket means another agent runs with this path, and anything
/// else (a file, a directory, a link) is not ours to delete.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
        Ok(m) if !m.file_type().is_socket() => {
            let kind = match m.file_type() {
                t if t.is_file() => "a regular file",
                t if t.is_dir() => "a directory",
                t if t.is_symlink() => "a symbolic link",
                _ => "something other than a socket",
            };
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{kind} is there, not a socket; refusing to remove it (remove it yourself, or choose another --admin-socket)"),
            ));
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another agent is running: it answers on this admin socket",
                ))
            }
            // Nobody listens: left by an agent that is gone.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)?,
            Err(e) => return Err(e),
        },
    }
    // Bound in a directory only we can enter, made 0600 there, then moved into place:
    // nobody can connect in the moment between the bind and the chmod.
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let staging = staging_dir(parent.unwrap_or(Path::new(".")), path);
    // Left by a process that had our pid and died here: ours to clear. Made anew, not
    // reused, so that nobody else's directory can be the one we bind in.
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(ferry_replica::local::PRIVATE_DIR_MODE)
        .create(&staging)?;
    let bound = (|| {
        let inner = staging.join("admin.sock");
        let l = UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    bound
}

fn staging_dir(parent: &Path, path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or("admin".into(), |n| n.to_string_lossy());
    parent.join(format!(".{name}.{}.bind", std::process::id()))
}

/// Answers requests on `listener` (from `bind`), one connection at a time.
pub fn serve(listener: UnixListener, agent: Arc<Agent>) -> io::Result<()> {
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
    conn.set_read_timeout(Some(CONNECTION_TIMEOUT))?;
    conn.set_write_timeout(Some(CONNECTION_TIMEOUT))?;
    let mut line = String::new();
    match BufReader::new(conn.try_clone()?.take(REQUEST_BYTES_MAX)).read_line(&mut line) {
        // Closed without a word: another agent's start probing whether this one runs.
        Ok(0) => return Ok(()),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(io::Error::new(
                e.kind(),
                format!("no request within {CONNECTION_TIMEOUT:?}; closed"),
            ))
        }
        Err(e) => return Err(e),
    }
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
