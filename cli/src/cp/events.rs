//! `ferry cp events list`.

use anyhow::{anyhow, Result};
use reqwest::Method;
use serde_json::Value;

use super::client::{cell, print_json, Conn};
use super::print_table;

#[derive(clap::Subcommand)]
pub enum Verb {
    /// Events, oldest first
    List {
        /// Only events after this id
        #[arg(long, value_name = "ID")]
        after: Option<u64>,
        /// At most this many, the newest
        #[arg(long, value_name = "N", default_value_t = 1000)]
        last: usize,
    },
}

pub fn run(conn: &Conn, verb: Verb) -> Result<()> {
    let Verb::List { after, last } = verb;
    let mut items = Vec::new();
    let mut after = after.map(|a| a.to_string());
    loop {
        let path = match &after {
            Some(a) => format!("/v1/events?limit=1000&after={a}"),
            None => "/v1/events?limit=1000".to_string(),
        };
        let page = conn
            .call(Method::GET, &path, None)?
            .ok_or_else(|| anyhow!("GET /v1/events: empty answer"))?;
        if let Some(Value::Array(got)) = page.get("items") {
            items.extend(got.iter().cloned());
        }
        match page.get("next_after").and_then(Value::as_str) {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
        // Only the newest are wanted: the buffer stays bounded while paging.
        let excess = items.len().saturating_sub(last);
        items.drain(..excess);
    }
    let excess = items.len().saturating_sub(last);
    items.drain(..excess);
    if conn.json {
        return print_json(&Value::Array(items));
    }
    let rows = items
        .iter()
        .map(|e| {
            vec![
                cell(e, "id"),
                cell(e, "time"),
                cell(e, "kind"),
                cell(e, "subject"),
                cell(e, "message"),
            ]
        })
        .collect::<Vec<_>>();
    print_table(&["ID", "TIME", "KIND", "SUBJECT", "MESSAGE"], &rows);
    Ok(())
}
