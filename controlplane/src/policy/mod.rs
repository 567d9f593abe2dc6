//! Replication policies: how often an agent takes points, how long they are kept, and
//! the RPO thresholds that set a machine's health. The rules live here, apart from the
//! HTTP layer and the store, so that every way in (API, CLI, a later file import)
//! checks them the same way.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The policy every machine gets unless told otherwise; it cannot be deleted.
pub const DEFAULT_NAME: &str = "default";

/// Crash-consistent points are cut at most this often: below it the per-point cost
/// (a record and a seal per disk) outweighs the RPO gained.
pub const MIN_CRASH_INTERVAL_S: f64 = 0.5;
/// One day: a longer interval is a typo, not a policy.
pub const MAX_INTERVAL_S: f64 = 86_400.0;
/// Ten years of retention.
pub const MAX_RETENTION_HOURS: u32 = 87_600;

/// A replication policy as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Follows the store's name rule (1 to 64 of letters, digits, '.', '_', '-').
    pub name: String,
    /// Seconds between crash-consistent points; fractional, at least 0.5.
    pub crash_point_interval_s: f64,
    /// Seconds between application-consistent points; 0: none.
    pub app_point_interval_s: u32,
    /// Points older than this are compacted away (the newest point is always kept).
    pub retention_hours: u32,
    /// RPO above this many seconds makes a machine's health `warning`.
    pub rpo_warning_s: u32,
    /// RPO above this many seconds makes a machine's health `critical`.
    pub rpo_critical_s: u32,
}

/// The fields a `PATCH` may change; those absent keep their value.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyPatch {
    pub crash_point_interval_s: Option<f64>,
    pub app_point_interval_s: Option<u32>,
    pub retention_hours: Option<u32>,
    pub rpo_warning_s: Option<u32>,
    pub rpo_critical_s: Option<u32>,
}

impl Policy {
    /// The `default` policy as the first start creates it (and migration 0001 inserts).
    pub fn default_policy() -> Policy {
        Policy {
            name: DEFAULT_NAME.to_string(),
            crash_point_interval_s: 5.0,
            app_point_interval_s: 0,
            retention_hours: 24,
            rpo_warning_s: 30,
            rpo_critical_s: 120,
        }
    }

    /// The policy with the patch's fields applied.
    pub fn patched(&self, patch: &PolicyPatch) -> Policy {
        Policy {
            name: self.name.clone(),
            crash_point_interval_s: patch
                .crash_point_interval_s
                .unwrap_or(self.crash_point_interval_s),
            app_point_interval_s: patch
                .app_point_interval_s
                .unwrap_or(self.app_point_interval_s),
            retention_hours: patch.retention_hours.unwrap_or(self.retention_hours),
            rpo_warning_s: patch.rpo_warning_s.unwrap_or(self.rpo_warning_s),
            rpo_critical_s: patch.rpo_critical_s.unwrap_or(self.rpo_critical_s),
        }
    }

    /// Checks the name and every field; the message names the field and its bound.
    pub fn check(&self) -> Result<(), String> {
        ferry_replica::layout::check_name("policy", &self.name).map_err(|e| e.to_string())?;
        let crash = self.crash_point_interval_s;
        if !crash.is_finite() || !(MIN_CRASH_INTERVAL_S..=MAX_INTERVAL_S).contains(&crash) {
            return Err(format!(
                "crash_point_interval_s {crash} must be from {MIN_CRASH_INTERVAL_S} to {MAX_INTERVAL_S}"
            ));
        }
        if f64::from(self.app_point_interval_s) > MAX_INTERVAL_S {
            return Err(format!(
                "app_point_interval_s {} must be 0 (none) or at most {MAX_INTERVAL_S}",
                self.app_point_interval_s
            ));
        }
        if self.retention_hours == 0 || self.retention_hours > MAX_RETENTION_HOURS {
            return Err(format!(
                "retention_hours {} must be from 1 to {MAX_RETENTION_HOURS}",
                self.retention_hours
            ));
        }
        if self.rpo_warning_s == 0 {
            return Err("rpo_warning_s must be at least 1".to_string());
        }
        if self.rpo_critical_s < self.rpo_warning_s {
            return Err(format!(
                "rpo_critical_s {} must be at least rpo_warning_s {}",
                self.rpo_critical_s, self.rpo_warning_s
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_passes_and_bounds_are_named() {
        let p = Policy::default_policy();
        assert_eq!(p.check(), Ok(()));
        let fast = p.patched(&PolicyPatch {
            crash_point_interval_s: Some(0.5),
            ..Default::default()
        });
        assert_eq!(fast.check(), Ok(()));
        assert_eq!(fast.rpo_critical_s, 120, "unnamed fields keep their value");
        let too_fast = p.patched(&PolicyPatch {
            crash_point_interval_s: Some(0.4),
            ..Default::default()
        });
        assert!(too_fast
            .check()
            .unwrap_err()
            .contains("crash_point_interval_s"));
        let nan = p.patched(&PolicyPatch {
            crash_point_interval_s: Some(f64::NAN),
            ..Default::default()
        });
        assert!(nan.check().is_err());
        let inverted = p.patched(&PolicyPatch {
            rpo_critical_s: Some(10),
            ..Default::default()
        });
        assert!(inverted.check().unwrap_err().contains("rpo_critical_s"));
        let bad_name = Policy {
            name: "../x".into(),
            ..p
        };
        assert!(bad_name.check().unwrap_err().contains("policy"));
    }
}
