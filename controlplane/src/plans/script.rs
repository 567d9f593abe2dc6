//! A plan's script action run on the control plane: `sh -c COMMAND` in its own process
//! group, its output (stdout and stderr, interleaved as they come) kept to the last
//! `MAX_OUTPUT_BYTES`, and at its timeout the whole group killed, so that a hung
//! script's children go too.
//!
//! A script that exits on its own leaves the processes it started in the background
//! alone (`nohup app &` is a way to start something); their hold on its output pipes
//! is given up `DRAIN` after it exits.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// The end of a script's output that is kept.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;
/// How long the output is read after the script ended.
const DRAIN: Duration = Duration::from_secs(1);

/// How a script ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// None when a signal ended it (the timeout's included).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// The last `MAX_OUTPUT_BYTES` of its output.
    pub output: String,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        !self.timed_out && self.exit_code == Some(0)
    }
}

/// The last `max` bytes written to it.
struct Tail {
    buf: Vec<u8>,
    max: usize,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.max {
            let cut = self.buf.len() - self.max;
            self.buf.drain(..cut);
        }
    }
}

fn reader<R>(mut from: R, tail: Arc<Mutex<Tail>>) -> tokio::task::JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut chunk = vec![0u8; 8192];
        loop {
            match from.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // A poisoned lock only means another reader panicked: keep going.
                    let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                    t.push(&chunk[..n]);
                }
            }
        }
    })
}

/// Kills every process of group `pgid`.
fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: killpg takes plain integers; a group already gone is ESRCH, ignored.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

/// Runs `command` with `env` added to the control plane's environment, for at most
/// `timeout`. The error is for a script that could not be started at all.
pub async fn run(
    command: &str,
    env: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<Outcome, String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that the timeout reaches what it started.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting sh -c for the script: {e}"))?;
    let pgid = child.id();
    let tail = Arc::new(Mutex::new(Tail {
        buf: Vec::new(),
        max: MAX_OUTPUT_BYTES,
    }));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(reader(out, tail.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(reader(err, tail.clone()));
    }
    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (Some(status), false),
        Err(_) => {
            if let Some(pgid) = pgid {
                kill_group(pgid);
            }
            (Some(child.wait().await), true)
        }
    };
    let status = status
        .transpose()
        .map_err(|e| format!("waiting for the script: {e}"))?;
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout(DRAIN, r).await.is_err() {
            abort.abort();
        }
    }
    let output = {
        let t = tail.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&t.buf).into_owned()
    };
    Ok(Outcome {
        exit_code: if timed_out {
            None
        } else {
            status.and_then(|s| s.code())
        },
        timed_out,
        output,
    })
}

/// The last `max` bytes of `s` (at a character boundary), `…` marking a cut.
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    const MARK: &str = "…";
    let mut start = s.len() - max.saturating_sub(MARK.len());
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("{MARK}{}", &s[start..])
}

/// `FERRY_DISK_<MACHINE>_<DISK>`: upper-cased, anything but letters and digits `_`.
pub fn disk_var(machine: &str, disk: &str) -> String {
    let up = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("FERRY_DISK_{}_{}", up(machine), up(disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_and_exit_code_are_kept_and_a_hung_script_is_killed_with_its_children() {
        let env = BTreeMap::from([("FERRY_PLAN".to_string(), "app".to_string())]);
        let ok = run(
            "echo out $FERRY_PLAN; echo err >&2",
            &env,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert!(ok.succeeded(), "{ok:?}");
        assert!(ok.output.contains("out app") && ok.output.contains("err"));

        let failed = run("echo nope; exit 3", &env, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(failed.exit_code, Some(3));
        assert!(!failed.succeeded());

        // 200 KiB of output: only the end is kept.
        let big = run(
            "head -c 204800 /dev/zero | tr '\\0' a; echo END",
            &env,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(big.output.len(), MAX_OUTPUT_BYTES);
        assert!(big.output.ends_with("aEND\n"));

        // A script whose child hangs: both killed at the timeout.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cmd = format!(
            "sleep 300 & echo $! > {}; echo started; wait",
            pidfile.display()
        );
        let t0 = std::time::Instant::now();
        let hung = run(&cmd, &env, Duration::from_millis(800)).await.unwrap();
        assert!(hung.timed_out && !hung.succeeded(), "{hung:?}");
        assert_eq!(hung.exit_code, None);
        assert!(hung.output.contains("started"));
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The sleep was in the script's group: gone (a zombie at most for a moment).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let gone = stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z");
            if gone {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sleep {pid} still runs"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn a_tail_keeps_the_end_within_its_bound() {
        assert_eq!(tail("short", 10), "short");
        let t = tail(&"é".repeat(100), 11);
        assert!(
            t.len() <= 11 && t.starts_with('…') && t.ends_with('é'),
            "{t}"
        );
    }

    #[test]
    fn disk_variables_are_upper_case_letters_digits_and_underscores() {
        assert_eq!(disk_var("web-1", "sda"), "FERRY_DISK_WEB_1_SDA");
        assert_eq!(disk_var("db.x", "disk_0"), "FERRY_DISK_DB_X_DISK_0");
    }
}
