//! The processes of `start` and `script` items: each `sh -c COMMAND` in its own
//! process group (setsid), so that everything it starts is found and killed with it;
//! its output in the item's `output.log`. Liveness is asked of the group, not of the
//! leader's pid: a leader that exited may leave children behind, and a pid may be
//! reused, a process group id only while a member of the group lives.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_link::control::limits::{trimmed, MAX_WORK_OUTPUT_BYTES};

/// How long `kill_group` waits after SIGTERM before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long a group may take to vanish after SIGKILL (the kernel reaps quickly, but
/// a process in uninterruptible sleep dies only when its I/O ends).
const KILL_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// Spawns `sh -c command` with `env` added, stdin from /dev/null and stdout and stderr
/// appended to `log`, as the leader of a new session and process group.
pub fn spawn(command: &str, env: &BTreeMap<String, String>, log: &Path) -> Result<Child> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("open {}", log.display()))?;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it is
    // all that runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("spawn sh -c for {}", log.display()))
}

/// Whether any process of group `pgid` is alive (zombies do not count: they hold no
/// resources and their parent reaps them).
pub fn group_alive(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        // Without /proc, ask the kernel about the group directly.
        // SAFETY: signal 0 only checks for existence and permission.
        return unsafe { libc::kill(-pgid, 0) } == 0;
    };
    dir.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so
        // the fields are counted after its last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let mut f = rest.split_whitespace();
        let state = f.next();
        let pgrp = f.nth(1).and_then(|p| p.parse::<i32>().ok());
        pgrp == Some(pgid) && state != Some("Z") && state != Some("X")
    })
}

fn signal_group(pgid: i32, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a process group; ESRCH (already gone) is fine.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

fn wait_gone(pgid: i32, within: Duration) -> bool {
    let end = Instant::now() + within;
    loop {
        if !group_alive(pgid) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// SIGTERM to the group, SIGKILL after `grace` if any of it is left; true when the
/// group is gone. A pgid of 1 or less is never signalled (it would mean every
/// process this user may signal).
pub fn kill_group(pgid: i32, grace: Duration) -> bool {
    if pgid <= 1 {
        return true;
    }
    if !group_alive(pgid) {
        return true;
    }
    signal_group(pgid, libc::SIGTERM);
    if wait_gone(pgid, grace) {
        return true;
    }
    signal_group(pgid, libc::SIGKILL);
    wait_gone(pgid, KILL_WAIT)
}

/// The last `MAX_WORK_OUTPUT_BYTES` of `log` (lossy UTF-8, cut at a character), or
/// what went wrong reading it.
pub fn output_tail(log: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(log)?;
        let len = f.metadata()?.len();
        let keep = MAX_WORK_OUTPUT_BYTES as u64;
        f.seek(SeekFrom::Start(len.saturating_sub(keep)))?;
        let mut buf = Vec::with_capacity(keep as usize);
        f.take(keep).read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        // Lossy decoding may have grown it (a cut character becomes U+FFFD).
        Ok(s) => {
            if s.len() <= MAX_WORK_OUTPUT_BYTES {
                s
            } else {
                let cut = s.len() - MAX_WORK_OUTPUT_BYTES;
                let mut start = cut;
                while !s.is_char_boundary(start) {
                    start += 1;
                }
                s[start..].to_string()
            }
        }
        Err(e) => trimmed(
            &format!("(its output {} unreadable: {e})", log.display()),
            MAX_WORK_OUTPUT_BYTES,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_found_alive_then_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("output.log");
        let env = BTreeMap::from([("GREETING".to_string(), "hello".to_string())]);
        // The shell leaves a child behind in its group: the group outlives the shell.
        let mut child = spawn("echo $GREETING; sleep 600 & exec sleep 600", &env, &log).unwrap();
        let pgid = child.id() as i32;
        std::thread::sleep(Duration::from_millis(200));
        assert!(group_alive(pgid));
        // SIGTERM ends sleep: the group is gone well within the grace.
        let reaper = std::thread::spawn(move || child.wait());
        assert!(kill_group(pgid, Duration::from_secs(5)));
        reaper.join().unwrap().unwrap();
        assert!(!group_alive(pgid));
        assert_eq!(output_tail(&log), "hello\n");
    }

    #[test]
    fn a_group_that_ignores_sigterm_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("output.log");
        let mut child = spawn(
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
            &BTreeMap::new(),
            &log,
        )
        .unwrap();
        let pgid = child.id() as i32;
        ferry_testkit::wait_for("ready", Duration::from_secs(5), || {
            output_tail(&log) == "ready\n"
        });
        let reaper = std::thread::spawn(move || child.wait());
        let started = Instant::now();
        assert!(kill_group(pgid, Duration::from_millis(300)));
        assert!(started.elapsed() >= Duration::from_millis(300));
        reaper.join().unwrap().unwrap();
    }

    #[test]
    fn the_output_tail_is_the_end_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("output.log");
        let text = format!("{}END", "a".repeat(3 * MAX_WORK_OUTPUT_BYTES));
        std::fs::write(&log, &text).unwrap();
        let tail = output_tail(&log);
        assert_eq!(tail.len(), MAX_WORK_OUTPUT_BYTES);
        assert!(tail.ends_with("aEND"));
        assert!(output_tail(&dir.path().join("none")).contains("unreadable"));
    }
}
