//! A recovery plan as operators write it (`/v1/recovery-plans`), and the rules it must
//! keep: ordered groups of machines, each with actions before and after it. The whole
//! plan is checked when it is created or replaced, so that a job never meets a plan it
//! cannot run; only whether its machines still exist is checked again when a job
//! starts (`api::plans`).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The most machines in one plan (issue 15), so that a plan job's children and its
/// params stay small.
pub const MAX_MACHINES: usize = 100;
/// The most groups in one plan.
pub const MAX_GROUPS: usize = 10;
/// The most actions before, and after, one group.
pub const MAX_ACTIONS: usize = 20;
/// A script's timeout: 1 s to a day.
pub const MAX_TIMEOUT_S: u64 = 86_400;
/// The longest script command and manual text.
pub const MAX_COMMAND_BYTES: usize = 8 * 1024;
pub const MAX_TEXT_BYTES: usize = 4 * 1024;
/// Children running at once by default, and at most.
pub const DEFAULT_MAX_PARALLEL: u32 = 4;
pub const MAX_PARALLEL: u32 = 100;

/// Where a script runs: the control plane, or `recovery-host:NAME`.
pub const RUN_ON_CONTROL_PLANE: &str = "control-plane";
pub const RUN_ON_HOST_PREFIX: &str = "recovery-host:";

/// The failover a plan job performs, which decides the actions that run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverType {
    Test,
    Planned,
    Unplanned,
}

impl FailoverType {
    pub const ALL: [FailoverType; 3] = [
        FailoverType::Test,
        FailoverType::Planned,
        FailoverType::Unplanned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailoverType::Test => "test",
            FailoverType::Planned => "planned",
            FailoverType::Unplanned => "unplanned",
        }
    }
}

/// Forward: home to recovery site. Reverse: failback (docs/failback.md): a plan's
/// failback runs the actions whose directions hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    Forward,
    Reverse,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Reverse => "reverse",
        }
    }
}

fn all_types() -> Vec<FailoverType> {
    FailoverType::ALL.to_vec()
}

fn all_directions() -> Vec<Direction> {
    vec![Direction::Forward, Direction::Reverse]
}

fn control_plane() -> String {
    RUN_ON_CONTROL_PLANE.to_string()
}

fn default_max_parallel() -> u32 {
    DEFAULT_MAX_PARALLEL
}

/// One step before or after a group's machines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Action {
    /// `sh -c command`; exit 0 is success, anything else (or the timeout) fails the
    /// plan job, which shows its exit code and output.
    Script {
        name: String,
        command: String,
        timeout_s: u64,
        /// `control-plane` (default) or `recovery-host:NAME`.
        #[serde(default = "control_plane")]
        run_on: String,
        /// Default: every type.
        #[serde(default = "all_types")]
        failover_types: Vec<FailoverType>,
        /// Default: both.
        #[serde(default = "all_directions")]
        directions: Vec<Direction>,
    },
    /// The plan job waits (`waiting-for-input`, showing `text`) until resumed.
    Manual {
        name: String,
        text: String,
        #[serde(default = "all_types")]
        failover_types: Vec<FailoverType>,
        #[serde(default = "all_directions")]
        directions: Vec<Direction>,
    },
}

impl Action {
    pub fn name(&self) -> &str {
        match self {
            Action::Script { name, .. } | Action::Manual { name, .. } => name,
        }
    }

    /// Whether it runs in a job of this type and direction.
    pub fn runs_for(&self, t: FailoverType, d: Direction) -> bool {
        let (types, dirs) = match self {
            Action::Script {
                failover_types,
                directions,
                ..
            }
            | Action::Manual {
                failover_types,
                directions,
                ..
            } => (failover_types, directions),
        };
        types.contains(&t) && dirs.contains(&d)
    }
}

/// One group: its machines fail over together (in parallel, bounded by the plan's
/// `max_parallel`), after the previous group's `after` actions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub machines: Vec<String>,
    #[serde(default)]
    pub before: Vec<Action>,
    #[serde(default)]
    pub after: Vec<Action>,
}

/// A recovery plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: String,
    /// Run in this order.
    pub groups: Vec<Group>,
    /// Machine jobs of one group in progress at once: 1 to 100, default 4.
    #[serde(default = "default_max_parallel")]
    pub max_parallel: u32,
}

fn name_ok(what: &'static str, name: &str) -> Result<(), String> {
    ferry_replica::layout::check_name(what, name).map_err(|e| e.to_string())
}

impl Plan {
    /// Every machine, in plan order.
    pub fn machines(&self) -> impl Iterator<Item = &str> {
        self.groups
            .iter()
            .flat_map(|g| g.machines.iter().map(String::as_str))
    }

    /// The rules every plan keeps; the error names what breaks one. Whether its
    /// machines exist is the caller's (it needs the database).
    pub fn check(&self) -> Result<(), String> {
        name_ok("plan", &self.name)?;
        let at = |g: &Group| format!("plan {}, group {}", self.name, g.name);
        if self.groups.is_empty() {
            return Err(format!("plan {} has no groups", self.name));
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(format!(
                "plan {} has {} groups: at most {MAX_GROUPS}",
                self.name,
                self.groups.len()
            ));
        }
        if !(1..=MAX_PARALLEL).contains(&self.max_parallel) {
            return Err(format!(
                "plan {}: max_parallel {} must be from 1 to {MAX_PARALLEL}",
                self.name, self.max_parallel
            ));
        }
        let total = self.machines().count();
        if total > MAX_MACHINES {
            return Err(format!(
                "plan {} has {total} machines: at most {MAX_MACHINES}",
                self.name
            ));
        }
        let mut groups = BTreeSet::new();
        let mut machines = BTreeSet::new();
        for g in &self.groups {
            name_ok("group", &g.name)?;
            if !groups.insert(g.name.as_str()) {
                return Err(format!(
                    "plan {}: group {} is named twice",
                    self.name, g.name
                ));
            }
            for m in &g.machines {
                name_ok("machine", m)?;
                if !machines.insert(m.as_str()) {
                    return Err(format!(
                        "{}: machine {m} is already in the plan (a machine belongs to one group, once)",
                        at(g)
                    ));
                }
            }
            let mut actions = BTreeSet::new();
            for (side, list) in [("before", &g.before), ("after", &g.after)] {
                if list.len() > MAX_ACTIONS {
                    return Err(format!(
                        "{}: {} actions {side}: at most {MAX_ACTIONS}",
                        at(g),
                        list.len()
                    ));
                }
                for a in list {
                    check_action(a).map_err(|e| format!("{}, action {}: {e}", at(g), a.name()))?;
                    // Task names are `group G: before: A`: unique within a group.
                    if !actions.insert(a.name()) {
                        return Err(format!("{}: action {} is named twice", at(g), a.name()));
                    }
                }
            }
        }
        Ok(())
    }
}

fn check_action(a: &Action) -> Result<(), String> {
    name_ok("action", a.name())?;
    match a {
        Action::Script {
            command,
            timeout_s,
            run_on,
            failover_types,
            directions,
            ..
        } => {
            if command.trim().is_empty() {
                return Err("its command is empty".into());
            }
            if command.len() > MAX_COMMAND_BYTES {
                return Err(format!("its command is over {MAX_COMMAND_BYTES} bytes"));
            }
            if !(1..=MAX_TIMEOUT_S).contains(timeout_s) {
                return Err(format!(
                    "timeout_s {timeout_s} must be from 1 to {MAX_TIMEOUT_S}"
                ));
            }
            if run_on != RUN_ON_CONTROL_PLANE {
                match run_on.strip_prefix(RUN_ON_HOST_PREFIX) {
                    Some(host) => name_ok("recovery host", host)?,
                    None => {
                        return Err(format!(
                            "run_on {run_on:?} must be {RUN_ON_CONTROL_PLANE:?} or \
                             \"{RUN_ON_HOST_PREFIX}NAME\""
                        ))
                    }
                }
            }
            scope_ok(failover_types, directions)
        }
        Action::Manual {
            text,
            failover_types,
            directions,
            ..
        } => {
            if text.trim().is_empty() {
                return Err("its text is empty".into());
            }
            if text.len() > MAX_TEXT_BYTES {
                return Err(format!("its text is over {MAX_TEXT_BYTES} bytes"));
            }
            scope_ok(failover_types, directions)
        }
    }
}

fn scope_ok(types: &[FailoverType], dirs: &[Direction]) -> Result<(), String> {
    if types.is_empty() {
        return Err("failover_types is empty: it would never run (leave it out for all)".into());
    }
    if dirs.is_empty() {
        return Err("directions is empty: it would never run (leave it out for both)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(v: serde_json::Value) -> Result<Plan, String> {
        let p: Plan = serde_json::from_value(v).map_err(|e| e.to_string())?;
        p.check().map(|()| p)
    }

    #[test]
    fn defaults_fill_in_and_every_rule_names_what_breaks_it() {
        let p = plan(
            json!({"name": "app", "groups": [{"name": "db", "machines": ["m1"],
            "before": [{"kind": "script", "name": "s", "command": "true", "timeout_s": 5}],
            "after": [{"kind": "manual", "name": "look", "text": "check the app",
                "failover_types": ["test"]}]}]}),
        )
        .unwrap();
        assert_eq!(p.max_parallel, DEFAULT_MAX_PARALLEL);
        let Action::Script {
            run_on,
            failover_types,
            directions,
            ..
        } = &p.groups[0].before[0]
        else {
            panic!("{p:?}")
        };
        assert_eq!(run_on, "control-plane");
        assert_eq!(failover_types, &FailoverType::ALL.to_vec());
        assert_eq!(directions.len(), 2);
        let manual = &p.groups[0].after[0];
        assert!(manual.runs_for(FailoverType::Test, Direction::Forward));
        assert!(!manual.runs_for(FailoverType::Planned, Direction::Forward));

        let bad = |v: serde_json::Value, want: &str| {
            let e = plan(v).unwrap_err();
            assert!(e.contains(want), "{e} (wanted {want})");
        };
        let group = |machines: serde_json::Value| json!({"name": "g", "machines": machines});
        bad(
            json!({"name": "p", "groups": [group(json!(["m1"])), group(json!(["m2"]))]}),
            "group g is named twice",
        );
        bad(
            json!({"name": "p", "groups": [group(json!(["m1"])),
                {"name": "h", "machines": ["m1"]}]}),
            "machine m1 is already in the plan",
        );
        let many: Vec<String> = (0..101).map(|i| format!("m{i}")).collect();
        bad(
            json!({"name": "p", "groups": [group(json!(many))]}),
            "101 machines: at most 100",
        );
        let groups: Vec<_> = (0..11)
            .map(|i| json!({"name": format!("g{i}"), "machines": []}))
            .collect();
        bad(
            json!({"name": "p", "groups": groups}),
            "11 groups: at most 10",
        );
        bad(json!({"name": "p", "groups": []}), "has no groups");
        bad(
            json!({"name": "bad name", "groups": [group(json!([]))]}),
            "plan name",
        );
        bad(
            json!({"name": "p", "groups": [group(json!([])), ], "max_parallel": 0}),
            "max_parallel 0",
        );
        let script = |extra: serde_json::Value| {
            let mut a = json!({"kind": "script", "name": "s", "command": "true", "timeout_s": 5});
            for (k, v) in extra.as_object().unwrap() {
                a[k] = v.clone();
            }
            json!({"name": "p", "groups": [{"name": "g", "machines": [], "before": [a]}]})
        };
        bad(script(json!({"timeout_s": 0})), "timeout_s 0 must be");
        bad(
            script(json!({"timeout_s": 86_401})),
            "timeout_s 86401 must be",
        );
        bad(
            script(json!({"run_on": "elsewhere"})),
            "run_on \"elsewhere\"",
        );
        bad(
            script(json!({"run_on": "recovery-host:"})),
            "recovery host name",
        );
        bad(
            script(json!({"failover_types": []})),
            "failover_types is empty",
        );
        bad(script(json!({"command": " "})), "command is empty");
        bad(script(json!({"colour": "red"})), "unknown field `colour`");
        bad(
            script(json!({"failover_types": ["drill"]})),
            "unknown variant",
        );
        assert!(plan(script(
            json!({"run_on": "recovery-host:rh1", "timeout_s": 86_400})
        ))
        .is_ok());
        bad(
            json!({"name": "p", "groups": [{"name": "g", "machines": [],
                "before": [{"kind": "manual", "name": "a", "text": "x"}],
                "after": [{"kind": "manual", "name": "a", "text": "y"}]}]}),
            "action a is named twice",
        );
    }
}
