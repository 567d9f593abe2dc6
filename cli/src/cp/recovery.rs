//! The recovery verbs of `ferry cp machines`: test failover and its cleanup, planned
//! and unplanned failover, change-point, commit, cancel, and the `actions.start`
//! template. Each POSTs to `/v1/machines/{name}/...` (docs/recovery.md), prints the
//! job it queued and, with `--wait`, follows that job until it waits for input or
//! ends, then prints the disks it brought up.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use ferry_replica::layout::check_name;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::{cell, print_json, Conn};
use super::jobs::{task_line, work_lines};
use super::print_table;

/// Where a recovered machine's disks go.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Target {
    /// Served at once from the replica over NBD (instant recovery); writes go to an
    /// overlay on the recovery host, the replica is never changed
    Nbd,
    /// Raw image files rebuilt on the recovery host
    Raw,
    /// VHD image files rebuilt on the recovery host
    Vhd,
}

impl Target {
    /// The API's `target` object.
    pub fn json(self) -> Value {
        match self {
            Target::Nbd => json!({"kind": "nbd"}),
            Target::Raw => json!({"kind": "dir", "format": "raw"}),
            Target::Vhd => json!({"kind": "dir", "format": "vhd"}),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Verdict {
    /// The machine came up and worked as it should
    Passed,
    /// It did not: say why in --notes
    Failed,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Failed => "failed",
        }
    }
}

/// `--wait` and how often to look.
#[derive(clap::Args, Debug)]
pub struct Wait {
    /// Follow the job: print each task's progress until the job waits for input or
    /// ends, then the disks it brought up, one line each: MACHINE DISK POINT
    /// NBD_URL|PATH. Exit 1 if the job failed or was cancelled. With --json, print
    /// only the job as it is then
    #[arg(long)]
    pub wait: bool,
    /// Milliseconds between two looks at the job (with --wait)
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub interval_ms: u64,
}

/// Where to bring a machine up: the target and the recovery host.
#[derive(clap::Args, Debug)]
pub struct Place {
    /// Where its disks go: nbd (served at once from the replica, no rebuild), raw or
    /// vhd (image files rebuilt on the recovery host)
    #[arg(long, value_enum, default_value = "nbd")]
    pub target: Target,
    /// The recovery host to use (`ferry cp recovery-hosts list`); default: the least
    /// loaded one that is live
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct TestFailover {
    /// The machine
    pub name: String,
    /// The point to bring up: latest, latest-app (application-consistent),
    /// latest-group (consistent across its replication group), a point id (`ferry cp
    /// machines points M`) or an RFC 3339 time (the newest point at or before it)
    #[arg(long, value_name = "POINT", default_value = "latest")]
    pub point: String,
    #[command(flatten)]
    pub place: Place,
    #[command(flatten)]
    pub wait: Wait,
}

#[derive(clap::Args, Debug)]
pub struct Cleanup {
    /// The machine whose test failover waits for its cleanup
    pub name: String,
    /// Whether the test machine worked: recorded with the job
    #[arg(long, value_enum)]
    pub verdict: Verdict,
    /// What was checked, or what went wrong: recorded with the verdict
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub notes: String,
    #[command(flatten)]
    pub wait: Wait,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("how").required(true).args(["planned", "unplanned"])))]
pub struct Failover {
    /// The machine
    pub name: String,
    /// The source is up: it stops accepting writes, takes a final point, and the
    /// failover waits until that point is uploaded, so no acknowledged write is lost
    #[arg(long)]
    pub planned: bool,
    /// The source may be gone: it is fenced first (refused from then on), and the
    /// machine comes up from what the replica holds, at --point
    #[arg(long)]
    pub unplanned: bool,
    /// With --unplanned: the point (latest, latest-app, latest-group, a point id or
    /// an RFC 3339 time); default latest
    #[arg(long, value_name = "POINT", conflicts_with = "planned")]
    pub point: Option<String>,
    #[command(flatten)]
    pub place: Place,
    #[command(flatten)]
    pub wait: Wait,
}

#[derive(clap::Args, Debug)]
pub struct ChangePoint {
    /// The failed-over machine (not yet committed)
    pub name: String,
    /// The point to fail over to instead (latest, latest-app, latest-group, a point
    /// id or an RFC 3339 time)
    #[arg(long, value_name = "POINT")]
    pub point: String,
    /// Where its disks go this time (nbd, raw or vhd); default: as the failover
    #[arg(long, value_enum)]
    pub target: Option<Target>,
    #[command(flatten)]
    pub wait: Wait,
}

/// `commit` and `cancel`: a machine and `--wait`.
#[derive(clap::Args, Debug)]
pub struct Simple {
    /// The machine
    pub name: String,
    #[command(flatten)]
    pub wait: Wait,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["command", "clear"])))]
pub struct SetStart {
    /// The machine
    pub name: String,
    /// The command run (sh -c, on the recovery host) once its disks are up. These
    /// are replaced first: {nbd_url} and {disk_path} (its first disk by name),
    /// {nbd_url:DISK}, {disk_path:DISK}, {machine}, {point}; its environment holds
    /// FERRY_MACHINE, FERRY_POINT and FERRY_DISKS (DISK=url-or-path, space
    /// separated). E.g. 'qemu-system-x86_64 -m 1G -nographic -drive
    /// file={nbd_url},format=raw'
    #[arg(long, value_name = "TEMPLATE")]
    pub command: Option<String>,
    /// Remove the command: a failover then only brings the disks up
    #[arg(long)]
    pub clear: bool,
}

fn machine_path(name: &str, action: &str) -> Result<String> {
    check_name("machine", name)?;
    Ok(format!("/v1/machines/{name}/{action}"))
}

fn check_point(point: &str) -> Result<()> {
    let ok = !point.is_empty()
        && point.len() <= 128
        && point
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/".contains(&b));
    if ok {
        Ok(())
    } else {
        bail!(
            "point {point:?} must be latest, latest-app, latest-group, a point id or an \
             RFC 3339 time"
        )
    }
}

fn place_body(body: &mut Value, place: &Place) -> Result<()> {
    body["target"] = place.target.json();
    if let Some(h) = &place.host {
        check_name("recovery host", h)?;
        body["host"] = json!(h);
    }
    Ok(())
}

/// The request a verb makes: its path and JSON body. Checked here so that a typo is
/// an error before anything is sent.
pub fn test_failover(a: &TestFailover) -> Result<(String, Value)> {
    check_point(&a.point)?;
    let mut body = json!({"point": a.point});
    place_body(&mut body, &a.place)?;
    Ok((machine_path(&a.name, "test-failover")?, body))
}

pub fn cleanup(a: &Cleanup) -> Result<(String, Value)> {
    let body = json!({"verdict": a.verdict.as_str(), "notes": a.notes});
    Ok((machine_path(&a.name, "test-failover-cleanup")?, body))
}

pub fn failover(a: &Failover) -> Result<(String, Value)> {
    let mut body = json!({"planned": a.planned});
    if let Some(p) = &a.point {
        check_point(p)?;
        body["point"] = json!(p);
    }
    place_body(&mut body, &a.place)?;
    Ok((machine_path(&a.name, "failover")?, body))
}

pub fn change_point(a: &ChangePoint) -> Result<(String, Value)> {
    check_point(&a.point)?;
    let mut body = json!({"point": a.point});
    if let Some(t) = a.target {
        body["target"] = t.json();
    }
    Ok((machine_path(&a.name, "change-point")?, body))
}

/// POSTs a recovery request, prints the job it answers with, and follows it with
/// `--wait`.
pub fn submit(conn: &Conn, (path, body): (String, Value), wait: &Wait) -> Result<()> {
    let job = conn
        .call(Method::POST, &path, Some(&body))?
        .ok_or_else(|| anyhow!("POST {path}: empty answer, no job"))?;
    if wait.wait {
        return follow(conn, &job, Duration::from_millis(wait.interval_ms));
    }
    if conn.json {
        return print_json(&job);
    }
    print_job(&job);
    Ok(())
}

/// `PATCH /v1/machines/{name}` with `actions.start`; prints the machine.
pub fn set_start(conn: &Conn, a: &SetStart) -> Result<Option<Value>> {
    check_name("machine", &a.name)?;
    let start = match (&a.command, a.clear) {
        (Some(c), false) if !c.trim().is_empty() => json!(c),
        (Some(_), false) => bail!("machines set-start {}: the command is empty", a.name),
        _ => Value::Null,
    };
    let body = json!({"actions": {"start": start}});
    conn.call(
        Method::PATCH,
        &format!("/v1/machines/{}", a.name),
        Some(&body),
    )
}

fn print_job(job: &Value) {
    print_table(
        &["JOB", "KIND", "MACHINE", "STATE"],
        &[vec![
            cell(job, "id"),
            cell(job, "kind"),
            cell(job, "subject"),
            cell(job, "state"),
        ]],
    );
    if let Some(p) = job.get("prompt").and_then(Value::as_str) {
        println!("waiting for: {p}");
    }
    if let Some(e) = job.get("error").and_then(Value::as_str) {
        println!("error: {e}");
    }
    for line in disk_lines(job) {
        println!("{line}");
    }
    for line in super::failback::lines(job) {
        println!("{line}");
    }
}

/// `MACHINE DISK POINT NBD_URL|PATH`, one per disk of the job's `disks`.
pub fn disk_lines(job: &Value) -> Vec<String> {
    job.get("disks")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|d| {
            let at = d
                .get("nbd_url")
                .and_then(Value::as_str)
                .or_else(|| d.get("path").and_then(Value::as_str))
                .unwrap_or("-");
            format!(
                "{} {} {} {at}",
                cell(d, "machine"),
                cell(d, "disk"),
                cell(d, "point")
            )
        })
        .collect()
}

/// Polls the job until it waits for input or ends: each task's progress as it
/// changes, then the job and its disks. An error (exit 1) when it failed or was
/// cancelled.
fn follow(conn: &Conn, first: &Value, every: Duration) -> Result<()> {
    let id = cell(first, "id");
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') || id.is_empty() {
        bail!("the API answered a job without a usable id: {first}");
    }
    let mut seen: Vec<String> = Vec::new();
    let mut seen_work: Vec<String> = Vec::new();
    let mut last_state = String::new();
    let mut job = first.clone();
    loop {
        let state = cell(&job, "state");
        if !conn.json {
            let tasks = job
                .get("tasks")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice);
            for (seq, t) in tasks.iter().enumerate() {
                let line = task_line(seq, t);
                if seen.get(seq) != Some(&line) {
                    println!("{line}");
                    if seq < seen.len() {
                        seen[seq] = line;
                    } else {
                        seen.push(line);
                    }
                }
            }
            // The work items and their disks: each line as it changes.
            let work = work_lines(&job);
            for (i, line) in work.iter().enumerate() {
                if seen_work.get(i) != Some(line) {
                    println!("{line}");
                }
            }
            seen_work = work;
            if state != last_state {
                println!("job {id} ({}): {state}", cell(&job, "kind"));
                last_state = state.clone();
            }
        }
        match state.as_str() {
            "waiting-for-input" | "succeeded" | "failed" | "cancelled" => break,
            _ => {}
        }
        std::thread::sleep(every);
        job = conn
            .call(Method::GET, &format!("/v1/jobs/{id}"), None)?
            .ok_or_else(|| anyhow!("GET /v1/jobs/{id}: empty answer"))?;
    }
    let state = cell(&job, "state");
    if conn.json {
        print_json(&job)?;
    } else {
        if let Some(p) = job.get("prompt").and_then(Value::as_str) {
            println!("waiting for: {p}");
        }
        for line in disk_lines(&job) {
            println!("{line}");
        }
        for line in super::failback::lines(&job) {
            println!("{line}");
        }
    }
    match state.as_str() {
        "failed" | "cancelled" => bail!("job {id} {state}: {}", cell(&job, "error")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(target: Target, host: Option<&str>) -> Place {
        Place {
            target,
            host: host.map(str::to_string),
        }
    }

    fn no_wait() -> Wait {
        Wait {
            wait: false,
            interval_ms: 1000,
        }
    }

    #[test]
    fn bodies_follow_the_api() {
        let (path, body) = test_failover(&TestFailover {
            name: "db1".into(),
            point: "latest-app".into(),
            place: place(Target::Vhd, Some("rh1")),
            wait: no_wait(),
        })
        .unwrap();
        assert_eq!(path, "/v1/machines/db1/test-failover");
        assert_eq!(
            body,
            json!({"point": "latest-app", "target": {"kind": "dir", "format": "vhd"},
                   "host": "rh1"})
        );
        let (path, body) = failover(&Failover {
            name: "db1".into(),
            planned: true,
            unplanned: false,
            point: None,
            place: place(Target::Nbd, None),
            wait: no_wait(),
        })
        .unwrap();
        assert_eq!(path, "/v1/machines/db1/failover");
        assert_eq!(body, json!({"planned": true, "target": {"kind": "nbd"}}));
        let (_, body) = failover(&Failover {
            name: "db1".into(),
            planned: false,
            unplanned: true,
            point: Some("2026-12-06T10:00:00Z".into()),
            place: place(Target::Raw, None),
            wait: no_wait(),
        })
        .unwrap();
        assert_eq!(
            body,
            json!({"planned": false, "point": "2026-12-06T10:00:00Z",
                   "target": {"kind": "dir", "format": "raw"}})
        );
        let (path, body) = change_point(&ChangePoint {
            name: "db1".into(),
            point: "p9".into(),
            target: Some(Target::Raw),
            wait: no_wait(),
        })
        .unwrap();
        assert_eq!(path, "/v1/machines/db1/change-point");
        assert_eq!(
            body,
            json!({"point": "p9", "target": {"kind": "dir", "format": "raw"}})
        );
        assert_eq!(
            change_point(&ChangePoint {
                name: "db1".into(),
                point: "p9".into(),
                target: None,
                wait: no_wait(),
            })
            .unwrap()
            .1,
            json!({"point": "p9"})
        );
        let (path, body) = cleanup(&Cleanup {
            name: "db1".into(),
            verdict: Verdict::Failed,
            notes: "no login prompt".into(),
            wait: no_wait(),
        })
        .unwrap();
        assert_eq!(path, "/v1/machines/db1/test-failover-cleanup");
        assert_eq!(
            body,
            json!({"verdict": "failed", "notes": "no login prompt"})
        );
    }

    #[test]
    fn bad_names_and_points_are_refused_before_sending() {
        let bad_point = ChangePoint {
            name: "db1".into(),
            point: "latest; rm -rf /".into(),
            target: None,
            wait: no_wait(),
        };
        let e = change_point(&bad_point).unwrap_err().to_string();
        assert!(e.contains("point \"latest; rm -rf /\""), "{e}");
        let bad_name = TestFailover {
            name: "../db1".into(),
            point: "latest".into(),
            place: place(Target::Nbd, None),
            wait: no_wait(),
        };
        assert!(test_failover(&bad_name).is_err());
        let bad_host = TestFailover {
            name: "db1".into(),
            point: "latest".into(),
            place: place(Target::Nbd, Some("a/b")),
            wait: no_wait(),
        };
        let e = test_failover(&bad_host).unwrap_err().to_string();
        assert!(e.contains("recovery host"), "{e}");
    }

    #[test]
    fn disks_print_where_they_are() {
        let job = json!({"disks": [
            {"machine": "db1", "disk": "sda", "point": "p1", "nbd_url": "nbd://h:1/db1/sda"},
            {"machine": "db1", "disk": "sdb", "point": "p1", "path": "/w/items/x/sdb.raw"},
        ]});
        assert_eq!(
            disk_lines(&job),
            vec![
                "db1 sda p1 nbd://h:1/db1/sda".to_string(),
                "db1 sdb p1 /w/items/x/sdb.raw".to_string()
            ]
        );
        assert!(disk_lines(&json!({})).is_empty());
    }
}
