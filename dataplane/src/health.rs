//! Health of a process server, judged like the reference process server and stated
//! more plainly: every non-ok level comes with the reasons, in words and numbers.
//!
//! Cache: warning below 30 % free, critical below 25 %, and below 20 % the server
//! throttles agents by withholding credit (never by dropping data). Upload lag: warning
//! past 30 minutes of data waiting for blob storage, critical past 45.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok = 0,
    Warning = 1,
    Critical = 2,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }
}

/// Thresholds, in percent of the cache free and seconds of upload lag.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub cache_warning_free_pct: f64,
    pub cache_critical_free_pct: f64,
    pub cache_throttle_free_pct: f64,
    pub upload_lag_warning_s: f64,
    pub upload_lag_critical_s: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            cache_warning_free_pct: 30.0,
            cache_critical_free_pct: 25.0,
            cache_throttle_free_pct: 20.0,
            upload_lag_warning_s: 30.0 * 60.0,
            upload_lag_critical_s: 45.0 * 60.0,
        }
    }
}

/// What health is judged on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inputs {
    pub cache_used_bytes: u64,
    pub cache_max_bytes: u64,
    /// Age of the oldest cached write not yet in blob storage.
    pub upload_lag_s: f64,
    /// The last request to blob storage failed; uploads are being retried.
    pub store_failing: bool,
    /// Of which this many disks are held back, each retried on its own.
    pub failing_disks: u64,
    /// Bytes free on the cache's file system, where known.
    pub cache_fs_free_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub level: Level,
    /// Withhold credit from agents until the cache drains.
    pub throttle: bool,
    pub reasons: Vec<String>,
}

pub fn assess(p: &Policy, i: &Inputs) -> Health {
    let mut level = Level::Ok;
    let mut reasons = Vec::new();
    let free_pct = if i.cache_max_bytes == 0 {
        0.0
    } else {
        100.0 * (i.cache_max_bytes.saturating_sub(i.cache_used_bytes)) as f64
            / i.cache_max_bytes as f64
    };
    let mut raise = |l: Level, why: String| {
        level = level.max(l);
        reasons.push(why);
    };
    if free_pct < p.cache_critical_free_pct {
        raise(
            Level::Critical,
            format!(
                "cache {free_pct:.1} % free (critical below {} %)",
                p.cache_critical_free_pct
            ),
        );
    } else if free_pct < p.cache_warning_free_pct {
        raise(
            Level::Warning,
            format!(
                "cache {free_pct:.1} % free (warning below {} %)",
                p.cache_warning_free_pct
            ),
        );
    }
    // Room promised by the bound that the file system no longer has (something else
    // filled it): appends would fail before the cache throttles anyone.
    let room = i.cache_max_bytes.saturating_sub(i.cache_used_bytes);
    if let Some(free) = i.cache_fs_free_bytes.filter(|f| *f < room) {
        use crate::cache::gib;
        raise(
            Level::Warning,
            format!(
                "the cache's file system has {:.2} GiB free, less than the {:.2} GiB the cache may still grow: appends will fail before agents are throttled",
                gib(free),
                gib(room)
            ),
        );
    }
    if i.upload_lag_s > p.upload_lag_critical_s {
        raise(
            Level::Critical,
            format!(
                "{:.0} s of data waiting for blob storage (critical past {:.0} s)",
                i.upload_lag_s, p.upload_lag_critical_s
            ),
        );
    } else if i.upload_lag_s > p.upload_lag_warning_s {
        raise(
            Level::Warning,
            format!(
                "{:.0} s of data waiting for blob storage (warning past {:.0} s)",
                i.upload_lag_s, p.upload_lag_warning_s
            ),
        );
    }
    if i.store_failing {
        raise(
            Level::Warning,
            match i.failing_disks {
                0 => "uploads are failing; they are retried with backoff and the cache holds the data".into(),
                n => format!("blob storage is failing for {n} disk(s); their uploads are retried with backoff, the cache holds their data and other disks go on"),
            },
        );
    }
    let throttle = free_pct < p.cache_throttle_free_pct;
    if throttle {
        reasons.push(format!(
            "throttling agents: cache below {} % free",
            p.cache_throttle_free_pct
        ));
    }
    Health {
        level,
        throttle,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(used_pct: u64, lag: f64) -> Health {
        assess(
            &Policy::default(),
            &Inputs {
                cache_used_bytes: used_pct,
                cache_max_bytes: 100,
                upload_lag_s: lag,
                ..Default::default()
            },
        )
    }

    #[test]
    fn thresholds() {
        assert_eq!(
            at(50, 0.0),
            Health {
                level: Level::Ok,
                throttle: false,
                reasons: vec![]
            }
        );
        assert_eq!(at(71, 0.0).level, Level::Warning);
        let h = at(76, 0.0);
        assert_eq!((h.level, h.throttle), (Level::Critical, false));
        let h = at(81, 0.0);
        assert!(h.throttle && h.reasons.iter().any(|r| r.contains("throttling")));
        assert_eq!(at(10, 1801.0).level, Level::Warning);
        let h = at(10, 2701.0);
        assert_eq!(h.level, Level::Critical);
        assert!(
            h.reasons[0].contains("2701 s of data waiting"),
            "{:?}",
            h.reasons
        );
    }

    #[test]
    fn a_file_system_with_less_room_than_the_bound_promises_is_a_warning() {
        let judge = |free: u64| {
            assess(
                &Policy::default(),
                &Inputs {
                    cache_used_bytes: 2 << 30,
                    cache_max_bytes: 10 << 30,
                    cache_fs_free_bytes: Some(free),
                    ..Default::default()
                },
            )
        };
        assert_eq!(judge(9 << 30).level, Level::Ok);
        let h = judge(1 << 30);
        assert_eq!(h.level, Level::Warning);
        assert!(
            h.reasons[0].contains("1.00 GiB free, less than the 8.00 GiB"),
            "{:?}",
            h.reasons
        );
    }
}
