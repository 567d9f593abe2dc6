//! `ferry cp jobs list|show|watch|cancel|resume|restart`.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use reqwest::Method;
use serde_json::Value;

use super::client::{cell, print_json, Conn};
use super::print_table;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum State {
    Queued,
    Running,
    WaitingForInput,
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::WaitingForInput => "waiting-for-input",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

#[derive(clap::Subcommand)]
pub enum Verb {
    /// Every job, oldest first
    List {
        /// Only jobs in this state
        #[arg(long, value_enum)]
        state: Option<State>,
    },
    /// One job and its tasks
    Show { id: String },
    /// Print each task's progress until the job ends; exit 0 only if it succeeded
    Watch {
        id: String,
        /// Milliseconds between two looks
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
        interval_ms: u64,
    },
    /// Stop a job: at once if queued or waiting, before its next task if running
    Cancel { id: String },
    /// Run a failed, cancelled or waiting job again from its first unfinished task
    Resume { id: String },
    /// Run an ended job again from its first task
    Restart { id: String },
}

const HEADER: [&str; 7] = [
    "ID", "KIND", "SUBJECT", "STATE", "TASKS", "CREATED", "ERROR",
];

/// Unix seconds as RFC 3339, or `-`.
fn time(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_i64)
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(
            || "-".to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
}

fn tasks(job: &Value) -> &[Value] {
    job.get("tasks")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn row(job: &Value) -> Vec<String> {
    let all = tasks(job);
    let done = all
        .iter()
        .filter(|t| cell(t, "state") == "succeeded")
        .count();
    let mut state = cell(job, "state");
    if job.get("cancel_requested") == Some(&Value::Bool(true)) {
        state.push_str(" (cancelling)");
    }
    vec![
        cell(job, "id"),
        cell(job, "kind"),
        cell(job, "subject"),
        state,
        format!("{done}/{}", all.len()),
        time(job, "created_at"),
        cell(job, "error"),
    ]
}

pub(super) fn task_line(seq: usize, t: &Value) -> String {
    let progress = t.get("progress").and_then(Value::as_f64).unwrap_or(0.0);
    let error = match cell(t, "error").as_str() {
        "-" => String::new(),
        e => format!(": {e}"),
    };
    format!(
        "task {seq} {}: {} {:.0}%{error}",
        cell(t, "name"),
        cell(t, "state"),
        progress * 100.0
    )
}

/// A recovery job's work items, each followed by its disks, one line each:
/// `  m1/d0  42.0 %  118 MB/s`.
pub(super) fn work_lines(job: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let items = job
        .get("work")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for w in items {
        let progress = w.get("progress").and_then(Value::as_f64).unwrap_or(0.0);
        let error = match cell(w, "error").as_str() {
            "-" => String::new(),
            e => format!(": {e}"),
        };
        out.push(format!(
            "work {} {} on {}: {} {:.0}%{error}",
            cell(w, "kind"),
            cell(w, "id"),
            cell(w, "host"),
            cell(w, "state"),
            progress * 100.0
        ));
        let disks = w
            .get("disks")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        for d in disks {
            let figure = |k: &str| d.get(k).and_then(Value::as_f64).unwrap_or(0.0);
            out.push(format!(
                "  {}/{}  {:.1} %  {:.0} MB/s",
                cell(w, "machine"),
                cell(d, "disk"),
                figure("percent"),
                figure("mb_per_s")
            ));
        }
    }
    out
}

fn show(conn: &Conn, job: &Value) -> Result<()> {
    if conn.json {
        return print_json(job);
    }
    print_table(&HEADER, &[row(job)]);
    let actions = job
        .get("actions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!(
        "started {}, ended {}, lease {}; actions: {}",
        time(job, "started_at"),
        time(job, "ended_at"),
        cell(job, "lease_owner"),
        if actions.is_empty() { "none" } else { &actions }
    );
    let rows: Vec<Vec<String>> = tasks(job)
        .iter()
        .enumerate()
        .map(|(seq, t)| {
            let progress = t.get("progress").and_then(Value::as_f64).unwrap_or(0.0);
            vec![
                seq.to_string(),
                cell(t, "name"),
                cell(t, "state"),
                format!("{:.0}%", progress * 100.0),
                time(t, "started_at"),
                time(t, "ended_at"),
                cell(t, "error"),
            ]
        })
        .collect();
    print_table(
        &[
            "SEQ", "TASK", "STATE", "PROGRESS", "STARTED", "ENDED", "ERROR",
        ],
        &rows,
    );
    for line in work_lines(job) {
        println!("{line}");
    }
    Ok(())
}

/// Job ids are letters, digits and '-': checked here so a typo is not a path.
fn path(id: &str) -> Result<String> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        bail!("job id {id:?} must be 1 to 64 letters, digits or '-'");
    }
    Ok(format!("/v1/jobs/{id}"))
}

fn get(conn: &Conn, id: &str) -> Result<Value> {
    conn.call(Method::GET, &path(id)?, None)?
        .ok_or_else(|| anyhow!("GET /v1/jobs/{id}: empty answer"))
}

fn watch(conn: &Conn, id: &str, every: Duration) -> Result<()> {
    let mut seen: Vec<String> = Vec::new();
    let mut last_state = String::new();
    let mut last_json = String::new();
    loop {
        let job = get(conn, id)?;
        let state = cell(&job, "state");
        if conn.json {
            // One line per change: a script reads them as they come.
            let text = job.to_string();
            if text != last_json {
                println!("{text}");
                last_json = text;
            }
        } else {
            for (seq, t) in tasks(&job).iter().enumerate() {
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
            if state != last_state {
                println!("job {id}: {state}");
                last_state = state.clone();
            }
        }
        match state.as_str() {
            "succeeded" => return Ok(()),
            "failed" | "cancelled" => bail!("job {id} {state}: {}", cell(&job, "error")),
            "waiting-for-input" => bail!("job {id} is waiting for input (resume or cancel it)"),
            _ => std::thread::sleep(every),
        }
    }
}

pub fn run(conn: &Conn, verb: Verb) -> Result<()> {
    match verb {
        Verb::List { state } => {
            let path = match state {
                Some(s) => format!("/v1/jobs?state={}", s.as_str()),
                None => "/v1/jobs".to_string(),
            };
            let items = conn.list_all(&path)?;
            if conn.json {
                print_json(&Value::Array(items))?;
            } else {
                print_table(&HEADER, &items.iter().map(row).collect::<Vec<_>>());
            }
        }
        Verb::Show { id } => show(conn, &get(conn, &id)?)?,
        Verb::Watch { id, interval_ms } => watch(conn, &id, Duration::from_millis(interval_ms))?,
        Verb::Cancel { id } => act(conn, &id, "cancel")?,
        Verb::Resume { id } => act(conn, &id, "resume")?,
        Verb::Restart { id } => act(conn, &id, "restart")?,
    }
    Ok(())
}

fn act(conn: &Conn, id: &str, action: &str) -> Result<()> {
    let job = conn
        .call(Method::POST, &format!("{}/{action}", path(id)?), None)?
        .ok_or_else(|| anyhow!("POST /v1/jobs/{id}/{action}: empty answer"))?;
    show(conn, &job)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn work_items_show_one_line_per_disk_with_percent_and_rate() {
        let job = json!({"work": [
            {"id": "j1-0-m1", "host": "rh1", "machine": "m1", "kind": "build",
             "state": "running", "progress": 0.71, "bytes_per_s": 1e8, "error": null,
             "disks": [
                {"disk": "d0", "percent": 100.0, "mb_per_s": 97.4, "bytes_done": 4, "bytes": 4},
                {"disk": "d1", "percent": 42.0, "mb_per_s": 118.2, "bytes_done": 1, "bytes": 3}
             ]},
            {"id": "j1-1-m1", "host": "rh1", "machine": "m1", "kind": "start",
             "state": "pending", "progress": 0.0, "bytes_per_s": 0.0, "error": null}
        ]});
        assert_eq!(
            super::work_lines(&job),
            [
                "work build j1-0-m1 on rh1: running 71%",
                "  m1/d0  100.0 %  97 MB/s",
                "  m1/d1  42.0 %  118 MB/s",
                "work start j1-1-m1 on rh1: pending 0%",
            ]
        );
        assert!(super::work_lines(&json!({"id": "j2"})).is_empty());
    }
}
