//! `ferry cp machines list|show|move|set-policy|remove`.

use anyhow::{bail, Result};
use ferry_replica::layout::check_name;
use reqwest::Method;
use serde_json::{json, Map, Value};

use super::client::{cell, print_json, Conn};
use super::print_table;

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
}

const HEADER: [&str; 7] = [
    "NAME",
    "PROCESS_SERVER",
    "POLICY",
    "GROUP",
    "STATE",
    "HEALTH",
    "RPO_S",
];

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
        Verb::Remove { name } => {
            conn.call(Method::DELETE, &path(&name)?, None)?;
            if !conn.json {
                println!("removed machine {name}; its certificates are revoked");
            }
        }
    }
    Ok(())
}
