//! Waiting for a condition instead of sleeping a fixed time: a fixed sleep is either
//! too short on a busy machine (a flaky test) or longer than needed everywhere.

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// How often a condition is looked at again: at first soon, then less often, since
/// many conditions start a process (`ferry agent ctl`, qemu-io) to look, and polling
/// those every 10 ms takes a core from what is being waited on.
const POLL_FIRST: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(100);

/// The pause before the next look: doubling from `POLL_FIRST` up to `POLL_MAX`.
fn backoff(poll: &mut Duration) -> Duration {
    let now = *poll;
    *poll = (*poll * 2).min(POLL_MAX);
    now
}

/// Polls `cond` until it holds; panics naming `what` if it does not within `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut poll = POLL_FIRST;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(backoff(&mut poll));
    }
}

/// Calls `f` until it succeeds and returns its value; panics naming `what` and the
/// last error if it does not succeed within `timeout`.
pub fn wait_ok<T, E: Debug>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut poll = POLL_FIRST;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}: {e:?}"
            ),
        }
        std::thread::sleep(backoff(&mut poll));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn wait_for_returns_once_the_condition_holds() {
        let n = Cell::new(0);
        wait_for("three looks", Duration::from_secs(5), || {
            n.set(n.get() + 1);
            n.get() >= 3
        });
        assert_eq!(n.get(), 3);
    }

    #[test]
    #[should_panic(expected = "waiting for the impossible")]
    fn wait_for_names_what_timed_out() {
        wait_for("the impossible", Duration::from_millis(30), || false);
    }

    #[test]
    fn wait_ok_returns_the_first_success() {
        let n = Cell::new(0);
        let v = wait_ok("a value", Duration::from_secs(5), || {
            n.set(n.get() + 1);
            if n.get() < 2 {
                Err("not yet")
            } else {
                Ok(n.get())
            }
        });
        assert_eq!(v, 2);
    }

    #[test]
    #[should_panic(expected = "waiting for a value: \"never\"")]
    fn wait_ok_names_the_last_error() {
        wait_ok::<(), _>("a value", Duration::from_millis(30), || Err("never"));
    }
}
