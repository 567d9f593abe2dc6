//! `ferry cp plans create|replace|list|show|delete` and the plan jobs: `test-failover`,
//! `test-failover-cleanup`, `failover`, `commit`, `cancel` (docs/recovery-plans.md),
//! `reprotect` and `failback` (docs/failback.md).
//! An admin token changes plans, an operator's runs them, a viewer's reads them.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use ferry_replica::layout::check_name;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::{cell, print_json, Conn};
use super::print_table;

/// Where a test or a failover brings the disks up.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TargetArg {
    /// Served over NBD from the replica at once (instant recovery)
    Nbd,
    /// Rebuilt into raw image files on the recovery host
    Raw,
    /// Rebuilt into fixed VHD files on the recovery host
    Vhd,
}

impl TargetArg {
    fn json(self) -> Value {
        match self {
            TargetArg::Nbd => json!({"kind": "nbd"}),
            TargetArg::Raw => json!({"kind": "dir", "format": "raw"}),
            TargetArg::Vhd => json!({"kind": "dir", "format": "vhd"}),
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Verdict {
    Passed,
    Failed,
}

#[derive(clap::Subcommand)]
pub enum Verb {
    /// A new plan from a JSON file (its name, groups, actions, max_parallel)
    Create {
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Replace a plan with the one in a JSON file (same name); a running plan job keeps
    /// the plan it started with
    Replace {
        name: String,
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Every plan
    List,
    /// One plan: its groups, machines and actions
    Show { name: String },
    /// Delete a plan (refused while one of its jobs is active)
    Delete { name: String },
    /// Test-fail over every machine of the plan, group by group; the job then waits
    /// for `test-failover-cleanup`
    TestFailover {
        name: String,
        /// latest, latest-app, latest-group, a point id or an RFC 3339 time
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long, value_enum, default_value = "nbd")]
        target: TargetArg,
        /// A recovery host; default: the least loaded live one
        #[arg(long)]
        host: Option<String>,
    },
    /// Clean up the plan's test failover and record its verdict
    TestFailoverCleanup {
        name: String,
        #[arg(long, value_enum)]
        verdict: Verdict,
        #[arg(long)]
        notes: Option<String>,
    },
    /// Fail every machine of the plan over, group by group
    Failover {
        name: String,
        /// Each source stops writing and takes a final point first (the default)
        #[arg(long, conflicts_with = "unplanned")]
        planned: bool,
        /// From what the replica holds: the sources may be gone
        #[arg(long)]
        unplanned: bool,
        /// Unplanned only: latest, latest-app, latest-group, a point id or a time
        #[arg(long, requires = "unplanned")]
        point: Option<String>,
        #[arg(long, value_enum, default_value = "nbd")]
        target: TargetArg,
        #[arg(long)]
        host: Option<String>,
    },
    /// Reprotect every machine of the plan, group by group (docs/failback.md)
    Reprotect {
        name: String,
        /// The recovery host at the home site that writes the home disks
        #[arg(long, value_name = "HOST")]
        master_target: String,
        /// A machine's disk and its home disk on the master target, as
        /// MACHINE:DISK=PATH; one for every disk of every machine
        #[arg(long = "disk", value_name = "MACHINE:DISK=PATH")]
        disks: Vec<String>,
    },
    /// Fail every reprotected machine of the plan back home, group by group; the
    /// actions whose directions hold reverse run (FERRY_DIRECTION=reverse)
    Failback {
        name: String,
        /// The recovery site is lost: each machine gets the newest reverse point
        #[arg(long)]
        unplanned: bool,
    },
    /// Commit the plan's failover (or failback)
    Commit { name: String },
    /// Cancel the plan's failover: the sources resume
    Cancel { name: String },
}

const HEADER: [&str; 5] = ["NAME", "GROUPS", "MACHINES", "MAX_PARALLEL", "ACTIVE_JOB"];

fn groups(p: &Value) -> &[Value] {
    p.get("groups")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn names(v: &Value, key: &str, field: &str) -> String {
    let list: Vec<String> = v
        .get(key)
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|x| match x {
            Value::String(s) => s.clone(),
            other => cell(other, field),
        })
        .collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(",")
    }
}

fn row(p: &Value) -> Vec<String> {
    let machines: usize = groups(p)
        .iter()
        .map(|g| {
            g.get("machines")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        })
        .sum();
    vec![
        cell(p, "name"),
        groups(p).len().to_string(),
        machines.to_string(),
        cell(p, "max_parallel"),
        cell(p, "active_job"),
    ]
}

fn show(conn: &Conn, p: &Value) -> Result<()> {
    if conn.json {
        return print_json(p);
    }
    print_table(&HEADER, &[row(p)]);
    println!();
    let rows: Vec<Vec<String>> = groups(p)
        .iter()
        .enumerate()
        .map(|(i, g)| {
            vec![
                (i + 1).to_string(),
                cell(g, "name"),
                names(g, "machines", ""),
                names(g, "before", "name"),
                names(g, "after", "name"),
            ]
        })
        .collect();
    print_table(&["ORDER", "GROUP", "MACHINES", "BEFORE", "AFTER"], &rows);
    Ok(())
}

/// A plan job as queued: one line, or its JSON.
fn show_job(conn: &Conn, job: &Value) -> Result<()> {
    if conn.json {
        return print_json(job);
    }
    println!(
        "job {} ({} of plan {}): {}; follow it with `ferry cp jobs watch {}`",
        cell(job, "id"),
        cell(job, "kind"),
        cell(job, "subject"),
        cell(job, "state"),
        cell(job, "id")
    );
    Ok(())
}

fn path(name: &str) -> Result<String> {
    check_name("plan", name)?;
    Ok(format!("/v1/recovery-plans/{name}"))
}

fn read_plan(file: &PathBuf) -> Result<Value> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("plan file {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("plan file {}: not JSON", file.display()))
}

fn post_job(conn: &Conn, name: &str, what: &str, body: Option<Value>) -> Result<()> {
    let url = format!("{}/{what}", path(name)?);
    let job = conn
        .call(Method::POST, &url, body.as_ref())?
        .ok_or_else(|| anyhow!("POST {url}: empty answer"))?;
    show_job(conn, &job)
}

/// `MACHINE:DISK=PATH` arguments as `{machine: {disk: path}}`.
fn plan_disks(args: &[String]) -> Result<Value> {
    let mut out = serde_json::Map::new();
    const SHAPE: &str = "MACHINE:DISK=PATH";
    for a in args {
        let (md, path) = super::failback::home_disk_arg(a, SHAPE)?;
        let Some((m, d)) = md.split_once(':') else {
            anyhow::bail!("--disk {a:?} must be {SHAPE}");
        };
        check_name("machine", m)?;
        check_name("disk", d)?;
        let disks = out.entry(m.to_string()).or_insert_with(|| json!({}));
        if disks.get(d).is_some() {
            anyhow::bail!("--disk {m}:{d} is given twice");
        }
        disks[d] = json!(path);
    }
    Ok(Value::Object(out))
}

fn with_host(mut v: Value, host: Option<String>) -> Result<Value> {
    if let Some(h) = host {
        check_name("recovery host", &h)?;
        v["host"] = json!(h);
    }
    Ok(v)
}

pub fn run(conn: &Conn, verb: Verb) -> Result<()> {
    match verb {
        Verb::Create { file } => {
            let plan = read_plan(&file)?;
            let created = conn
                .call(Method::POST, "/v1/recovery-plans", Some(&plan))?
                .ok_or_else(|| anyhow!("POST /v1/recovery-plans: empty answer"))?;
            show(conn, &created)
        }
        Verb::Replace { name, file } => {
            let plan = read_plan(&file)?;
            let p = path(&name)?;
            let replaced = conn
                .call(Method::PATCH, &p, Some(&plan))?
                .ok_or_else(|| anyhow!("PATCH {p}: empty answer"))?;
            show(conn, &replaced)
        }
        Verb::List => {
            let items = conn.list_all("/v1/recovery-plans")?;
            if conn.json {
                print_json(&Value::Array(items))
            } else {
                print_table(&HEADER, &items.iter().map(row).collect::<Vec<_>>());
                Ok(())
            }
        }
        Verb::Show { name } => {
            let p = path(&name)?;
            let plan = conn
                .call(Method::GET, &p, None)?
                .ok_or_else(|| anyhow!("GET {p}: empty answer"))?;
            show(conn, &plan)
        }
        Verb::Delete { name } => {
            conn.call(Method::DELETE, &path(&name)?, None)?;
            if !conn.json {
                println!("plan {name} deleted");
            }
            Ok(())
        }
        Verb::TestFailover {
            name,
            point,
            target,
            host,
        } => {
            let body = with_host(json!({"point": point, "target": target.json()}), host)?;
            post_job(conn, &name, "test-failover", Some(body))
        }
        Verb::TestFailoverCleanup {
            name,
            verdict,
            notes,
        } => {
            let verdict = match verdict {
                Verdict::Passed => "passed",
                Verdict::Failed => "failed",
            };
            let mut body = json!({"verdict": verdict});
            if let Some(n) = notes {
                body["notes"] = json!(n);
            }
            post_job(conn, &name, "test-failover-cleanup", Some(body))
        }
        Verb::Failover {
            name,
            planned: _,
            unplanned,
            point,
            target,
            host,
        } => {
            let mut body = json!({"planned": !unplanned, "target": target.json()});
            if let Some(p) = point {
                body["point"] = json!(p);
            }
            post_job(conn, &name, "failover", Some(with_host(body, host)?))
        }
        Verb::Reprotect {
            name,
            master_target,
            disks,
        } => {
            check_name("master target", &master_target)?;
            let body = json!({"master_target": master_target, "disks": plan_disks(&disks)?});
            post_job(conn, &name, "reprotect", Some(body))
        }
        Verb::Failback { name, unplanned } => {
            let body = json!({"direction": "home", "planned": !unplanned});
            post_job(conn, &name, "failover", Some(body))
        }
        Verb::Commit { name } => post_job(conn, &name, "commit", None),
        Verb::Cancel { name } => post_job(conn, &name, "cancel", None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_disks_nest_by_machine_and_bad_ones_are_refused() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            plan_disks(&args(&["m1:sda=/h/a", "m1:sdb=/h/b", "m2:sda=/dev/sdc"])).unwrap(),
            json!({"m1": {"sda": "/h/a", "sdb": "/h/b"}, "m2": {"sda": "/dev/sdc"}})
        );
        for (bad, says) in [
            ("m1=/h/a", "MACHINE:DISK=PATH"),
            ("m1:sda", "MACHINE:DISK=PATH"),
            ("m1:sda=rel", "absolute"),
            ("../m:sda=/a", "machine"),
        ] {
            let e = plan_disks(&args(&[bad])).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{bad}: {e:#}");
        }
        let e = plan_disks(&args(&["m1:sda=/a", "m1:sda=/b"])).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
