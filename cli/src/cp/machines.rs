//! `ferry cp machines list|show|move|set-policy|remove|points`, and the recovery verbs
//! (`recovery`): test-failover, test-failover-cleanup, failover, change-point,
//! commit, cancel, set-start.

use anyhow::{bail, Result};
use ferry_replica::layout::check_name;
use reqwest::Method;
use serde_json::{json, Map, Value};

use super::client::{cell, print_json, Conn};
use super::print_table;
use super::recovery;

#[derive(clap::Subcommand)]
pub enum Verb {
    /// Every machine, with its health and RPO
    List,
    /// One machine, with its disks and the reasons for its health
    Show { name: String },
    /// Send a machine to another process server (at its next heartbeat)
    Move {
        name: String,
        /// The process server's name
        #[arg(long, value_name = "PS")]
        to: String,
    },
    /// Set a machine's policy and/or replication group
    SetPolicy {
        name: String,
        /// A policy that exists
        #[arg(long, value_name = "POLICY")]
        policy: Option<String>,
        /// A group name; `--no-group` takes it out of its group
        #[arg(long, value_name = "GROUP", conflicts_with = "no_group")]
        group: Option<String>,
        #[arg(long)]
        no_group: bool,
    },
    /// Remove a machine: its certificates are revoked, it is refused from then on
    Remove { name: String },
    /// A machine's recovery points in the store, newest first
    Points { name: String },
    /// Test failover: bring the machine up on a recovery host from a point, while
    /// replication goes on
    ///
    /// The job brings its disks up (served over NBD, or rebuilt as image files), runs
    /// the machine's start command if it has one (`set-start`), then waits for
    /// `test-failover-cleanup`, which deletes everything the test made. Its disks'
    /// NBD URLs or paths are in the job (`--wait` prints them).
    TestFailover(recovery::TestFailover),
    /// End a test failover: delete everything it made and record the verdict
    ///
    /// Resumes the machine's waiting test-failover job. The job fails if anything it
    /// made is left on the recovery host; a test counts as successful only once its
    /// cleanup succeeded.
    TestFailoverCleanup(recovery::Cleanup),
    /// Fail the machine over to a recovery host: --planned or --unplanned
    ///
    /// Planned: the source stops accepting writes and takes a final point; once it
    /// is uploaded, the machine comes up from it. Unplanned: the source is fenced
    /// (refused by the control plane and the process servers from then on), and the
    /// machine comes up from --point. Then its active site is the recovery site;
    /// `commit` makes that final, `cancel` goes back.
    Failover(recovery::Failover),
    /// Fail a failed-over machine over again to another point, discarding the first
    ChangePoint(recovery::ChangePoint),
    /// Make a failover final: the machine runs at the recovery site from now on
    Commit(recovery::Simple),
    /// Undo a failover that is not committed: its recovery disks are removed and the
    /// source resumes replicating
    Cancel(recovery::Simple),
    /// Set or clear the command that starts the machine once a failover brought its
    /// disks up (its `actions.start`)
    SetStart(recovery::SetStart),
    /// Reprotect a failed-over, committed machine: replication goes home, in reverse
    ///
    /// The master target (a recovery host at the home site) makes each home disk
    /// equal to the failover point by checksum, writing only the blocks that differ
    /// (the original disk keeps nearly all of them; a new, empty one gets a full
    /// copy). It hashes the home disks; the recovery-site host compares with the
    /// point and stores the blocks that differ, so only checksums and those blocks
    /// cross the sites. Then the machine's direction is reverse. Nothing of the home
    /// disks is ever deleted. See docs/failback.md.
    Reprotect(super::failback::Reprotect),
    /// Fail a reprotected machine back home (planned unless --unplanned)
    ///
    /// Planned: the machine at the recovery site is frozen (its start command
    /// stopped, its exports read-only), a final point is sent and applied on the
    /// master target, which checks every block of the home disks against it; then
    /// the machine is active at home. `commit` then removes the recovery-site copies
    /// and the reverse replica. See docs/failback.md.
    Failback(super::failback::Failback),
    /// Resume forward protection of a failed-back, committed machine
    ///
    /// Its agent resyncs by checksum (only what differs is sent); the job waits until
    /// the agent uploaded a point.
    ReEnable(recovery::Simple),
}

const HEADER: [&str; 8] = [
    "NAME",
    "PROCESS_SERVER",
    "POLICY",
    "GROUP",
    "STATE",
    "HEALTH",
    "RPO_S",
    "RECOVERY",
];

/// `failed-over (recovery site)`, or `-` for a machine protected at home.
fn recovery_cell(m: &Value) -> String {
    match m.get("recovery") {
        Some(r) if r.is_object() => {
            format!(
                "{} ({} site), {}",
                cell(r, "state"),
                cell(r, "active_site"),
                cell(r, "direction")
            )
        }
        _ => "-".to_string(),
    }
}

fn row(m: &Value) -> Vec<String> {
    let rpo = m
        .get("rpo_seconds")
        .and_then(Value::as_f64)
        .map_or_else(|| "-".to_string(), |r| format!("{r:.1}"));
    vec![
        cell(m, "name"),
        cell(m, "process_server"),
        cell(m, "policy"),
        cell(m, "group"),
        cell(m, "state"),
        cell(m, "health"),
        rpo,
        recovery_cell(m),
    ]
}

fn show(conn: &Conn, m: &Value) -> Result<()> {
    if conn.json {
        return print_json(m);
    }
    print_table(&HEADER, &[row(m)]);
    println!("last seen: {}", cell(m, "last_seen"));
    if let Some(Value::Array(reasons)) = m.get("health_reasons") {
        for r in reasons {
            println!("health: {}", r.as_str().unwrap_or("-"));
        }
    }
    if let Some(e) = m.get("last_error").and_then(Value::as_str) {
        println!("last error: {e}");
    }
    if let Some(r) = m.get("recovery").filter(|r| r.is_object()) {
        let planned = match r.get("planned") {
            Some(Value::Bool(true)) => "planned",
            Some(Value::Bool(false)) => "unplanned",
            _ => "-",
        };
        println!(
            "recovery: {}, active site {}, {planned}, direction {}, point {}, host {}, job {}",
            cell(r, "state"),
            cell(r, "active_site"),
            cell(r, "direction"),
            cell(r, "point"),
            cell(r, "host"),
            cell(r, "job")
        );
        if let Some(Value::Object(home)) = r
            .get("home_disks")
            .filter(|h| h.as_object().is_some_and(|h| !h.is_empty()))
        {
            let disks: Vec<String> = home
                .iter()
                .map(|(d, p)| format!("{d}={}", p.as_str().unwrap_or("?")))
                .collect();
            println!(
                "reprotected: master target {}, home disks {}",
                cell(r, "master_target"),
                disks.join(" ")
            );
        }
    }
    if let Some(start) = m
        .get("actions")
        .and_then(|a| a.get("start"))
        .and_then(Value::as_str)
    {
        println!("start action: {start}");
    }
    if let Some(Value::Array(disks)) = m.get("disks") {
        println!();
        let rows = disks
            .iter()
            .map(|d| {
                let uploaded = d
                    .get("newest_uploaded_point")
                    .map_or_else(|| "-".to_string(), |p| cell(p, "time"));
                vec![
                    cell(d, "name"),
                    cell(d, "state"),
                    cell(d, "size_bytes"),
                    cell(d, "unacked_bytes"),
                    uploaded,
                ]
            })
            .collect::<Vec<_>>();
        print_table(
            &["DISK", "STATE", "SIZE", "UNACKED", "NEWEST_UPLOADED"],
            &rows,
        );
    }
    Ok(())
}

fn path(name: &str) -> Result<String> {
    check_name("machine", name)?;
    Ok(format!("/v1/machines/{name}"))
}

pub fn run(conn: &Conn, verb: Verb) -> Result<()> {
    match verb {
        Verb::List => {
            let items = conn.list_all("/v1/machines")?;
            if conn.json {
                print_json(&Value::Array(items))?;
            } else {
                print_table(&HEADER, &items.iter().map(row).collect::<Vec<_>>());
            }
        }
        Verb::Show { name } => {
            if let Some(m) = conn.call(Method::GET, &path(&name)?, None)? {
                show(conn, &m)?;
            }
        }
        Verb::Move { name, to } => {
            check_name("process server", &to)?;
            let body = json!({ "to": to });
            let p = format!("{}/move", path(&name)?);
            if let Some(m) = conn.call(Method::POST, &p, Some(&body))? {
                show(conn, &m)?;
            }
        }
        Verb::SetPolicy {
            name,
            policy,
            group,
            no_group,
        } => {
            let mut body = Map::new();
            if let Some(p) = policy {
                check_name("policy", &p)?;
                body.insert("policy".into(), json!(p));
            }
            if let Some(g) = group {
                check_name("group", &g)?;
                body.insert("group".into(), json!(g));
            } else if no_group {
                body.insert("group".into(), Value::Null);
            }
            if body.is_empty() {
                bail!("machines set-policy {name}: give --policy, --group or --no-group");
            }
            if let Some(m) = conn.call(Method::PATCH, &path(&name)?, Some(&Value::Object(body)))? {
                show(conn, &m)?;
            }
        }
        Verb::Points { name } => super::points::points(conn, &name)?,
        Verb::TestFailover(a) => recovery::submit(conn, recovery::test_failover(&a)?, &a.wait)?,
        Verb::TestFailoverCleanup(a) => recovery::submit(conn, recovery::cleanup(&a)?, &a.wait)?,
        Verb::Failover(a) => recovery::submit(conn, recovery::failover(&a)?, &a.wait)?,
        Verb::ChangePoint(a) => recovery::submit(conn, recovery::change_point(&a)?, &a.wait)?,
        Verb::Commit(a) => {
            let p = format!("{}/commit", path(&a.name)?);
            recovery::submit(conn, (p, json!({})), &a.wait)?
        }
        Verb::Cancel(a) => {
            let p = format!("{}/cancel", path(&a.name)?);
            recovery::submit(conn, (p, json!({})), &a.wait)?
        }
        Verb::Reprotect(a) => recovery::submit(conn, super::failback::reprotect(&a)?, &a.wait)?,
        Verb::Failback(a) => recovery::submit(conn, super::failback::failback(&a)?, &a.wait)?,
        Verb::ReEnable(a) => {
            let p = format!("{}/re-enable", path(&a.name)?);
            recovery::submit(conn, (p, json!({})), &a.wait)?
        }
        Verb::SetStart(a) => {
            if let Some(m) = recovery::set_start(conn, &a)? {
                show(conn, &m)?;
            }
        }
        Verb::Remove { name } => {
            conn.call(Method::DELETE, &path(&name)?, None)?;
            if !conn.json {
                println!("removed machine {name}; its certificates are revoked");
            }
        }
    }
    Ok(())
}
