//! The `ferry` binary as a child process. Only the `ferry` crate's tests have its path
//! (CARGO_BIN_EXE_ferry, which also makes Cargo build it first), so every function
//! takes the path: looking next to the test executable would find a stale or missing
//! binary when another crate's tests run alone.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// Runs `ferry args` to completion and returns its stdout; panics with its stderr if
/// it fails.
pub fn run_ok(bin: &Path, args: &[&str]) -> String {
    let out = run(bin, args);
    assert!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs `ferry args` to completion.
pub fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

/// A child killed when dropped, so a failing test leaves no process behind (one
/// holding the test's stderr would hang the run).
pub struct Killed(pub Child);

impl Killed {
    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `ferry args` (stderr shared with the test) and returns it with the first
/// line it prints: servers print their address once they listen, so the caller may
/// use it at once.
pub fn spawn<S: AsRef<std::ffi::OsStr>>(bin: &Path, args: &[S]) -> (Killed, String) {
    spawn_logging(bin, args, Stdio::inherit())
}

/// As `spawn`, with the child's log (stderr) sent to `log`.
pub fn spawn_logging<S: AsRef<std::ffi::OsStr>>(
    bin: &Path,
    args: &[S],
    log: Stdio,
) -> (Killed, String) {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    let stdout = child.stdout.take().expect("stdout is piped");
    // Wrapped before reading: a panic below still kills the child.
    let child = Killed(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading the child's first line");
    (child, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_returns_the_first_line_and_drop_kills_the_child() {
        let sh = Path::new("/bin/sh");
        let (child, line) = spawn(sh, &["-c", "echo ready; exec sleep 600"]);
        assert_eq!(line, "ready\n");
        let pid = child.0.id() as i32;
        drop(child);
        // Reaped by the drop: no such process any more.
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        assert!(!alive, "the child outlived its handle");
    }
}
