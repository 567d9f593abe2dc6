//! `ferry cp webhooks create|list|show|delete`: where the control plane POSTs events,
//! signed. An admin token creates and deletes; a viewer's lists and shows. The secret
//! is printed once, on the last line of `create`.

use anyhow::Result;
use ferry_replica::layout::check_name;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::{cell, print_json, Conn};
use super::print_table;

/// The event kinds a webhook may be sent.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A machine's or process server's health changed
    Health,
    /// A job succeeded
    JobSucceeded,
    /// A job failed
    JobFailed,
    /// A job was cancelled
    JobCancelled,
    /// A disk was fenced off a process server
    Fencing,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Health => "health",
            Kind::JobSucceeded => "job-succeeded",
            Kind::JobFailed => "job-failed",
            Kind::JobCancelled => "job-cancelled",
            Kind::Fencing => "fencing",
        }
    }
}

#[derive(clap::Subcommand)]
pub enum Verb {
    /// A new webhook; its signing secret is printed once, on the last line
    Create {
        name: String,
        /// Where to POST: https://... (or http://...)
        #[arg(value_name = "URL")]
        target: String,
        /// The event kinds to send, comma-separated
        #[arg(long, value_enum, value_delimiter = ',', required = true)]
        events: Vec<Kind>,
    },
    /// Every webhook (never their secrets)
    List,
    /// One webhook: its kinds, deliveries and last failure
    Show { name: String },
    /// Delete a webhook: nothing more is sent to it
    Delete { name: String },
}

fn path(name: &str) -> Result<String> {
    check_name("webhook", name)?;
    Ok(format!("/v1/webhooks/{name}"))
}

fn kinds(w: &Value) -> String {
    w.get("events")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

pub fn run(conn: &Conn, verb: Verb) -> Result<()> {
    match verb {
        Verb::Create {
            name,
            target,
            events,
        } => {
            check_name("webhook", &name)?;
            let events: Vec<&str> = events.iter().map(|k| k.as_str()).collect();
            let body = json!({ "name": name, "url": target, "events": events });
            if let Some(w) = conn.call(Method::POST, "/v1/webhooks", Some(&body))? {
                if conn.json {
                    print_json(&w)?;
                } else {
                    println!(
                        "webhook {} to {} for {}; its signing secret (shown only now):",
                        cell(&w, "name"),
                        cell(&w, "url"),
                        kinds(&w)
                    );
                    println!("{}", cell(&w, "secret"));
                }
            }
        }
        Verb::List => {
            let items = conn.list_all("/v1/webhooks")?;
            if conn.json {
                print_json(&Value::Array(items))?;
            } else {
                let rows = items
                    .iter()
                    .map(|w| {
                        vec![
                            cell(w, "name"),
                            kinds(w),
                            cell(w, "delivered"),
                            cell(w, "given_up"),
                            cell(w, "url"),
                        ]
                    })
                    .collect::<Vec<_>>();
                print_table(&["NAME", "EVENTS", "DELIVERED", "GIVEN UP", "URL"], &rows);
            }
        }
        Verb::Show { name } => {
            if let Some(w) = conn.call(Method::GET, &path(&name)?, None)? {
                if conn.json {
                    print_json(&w)?;
                } else {
                    let rows = [
                        ("name", cell(&w, "name")),
                        ("url", cell(&w, "url")),
                        ("events", kinds(&w)),
                        ("created", cell(&w, "created_at")),
                        ("last event id", cell(&w, "last_event_id")),
                        ("delivered", cell(&w, "delivered")),
                        ("given up", cell(&w, "given_up")),
                        ("last error", cell(&w, "last_error")),
                        ("last error at", cell(&w, "last_error_at")),
                    ];
                    for (k, v) in rows {
                        println!("{k:<14} {v}");
                    }
                }
            }
        }
        Verb::Delete { name } => {
            conn.call(Method::DELETE, &path(&name)?, None)?;
            if !conn.json {
                println!("deleted webhook {name}");
            }
        }
    }
    Ok(())
}
