//! `ferry cp process-servers list|show|remove`.

use anyhow::Result;
use ferry_replica::layout::check_name;
use reqwest::Method;
use serde_json::Value;

use super::client::{cell, print_json, Conn};
use super::print_table;

#[derive(clap::Subcommand)]
pub enum Verb {
    /// Every process server, with its load and health
    List,
    /// One process server, with the reasons for its health
    Show { name: String },
    /// Remove a process server: its certificates are revoked and its machines given
    /// another at their next heartbeat
    Remove { name: String },
}

const HEADER: [&str; 7] = [
    "NAME",
    "ADDRESS",
    "MACHINES",
    "CACHE_FREE",
    "UPLOAD_LAG_S",
    "HEALTH",
    "LAST_SEEN",
];

fn row(p: &Value) -> Vec<String> {
    [
        "name",
        "address",
        "machines_assigned",
        "cache_free_bytes",
        "upload_lag_s",
        "health",
        "last_seen",
    ]
    .iter()
    .map(|k| cell(p, k))
    .collect()
}

fn path(name: &str) -> Result<String> {
    check_name("process server", name)?;
    Ok(format!("/v1/process-servers/{name}"))
}

pub fn run(conn: &Conn, verb: Verb) -> Result<()> {
    match verb {
        Verb::List => {
            let items = conn.list_all("/v1/process-servers")?;
            if conn.json {
                print_json(&Value::Array(items))?;
            } else {
                print_table(&HEADER, &items.iter().map(row).collect::<Vec<_>>());
            }
        }
        Verb::Show { name } => {
            if let Some(p) = conn.call(Method::GET, &path(&name)?, None)? {
                if conn.json {
                    print_json(&p)?;
                } else {
                    print_table(&HEADER, &[row(&p)]);
                    if let Some(Value::Array(reasons)) = p.get("health_reasons") {
                        for r in reasons {
                            println!("health: {}", r.as_str().unwrap_or("-"));
                        }
                    }
                }
            }
        }
        Verb::Remove { name } => {
            conn.call(Method::DELETE, &path(&name)?, None)?;
            if !conn.json {
                println!("removed process server {name}; its certificates are revoked");
            }
        }
    }
    Ok(())
}
