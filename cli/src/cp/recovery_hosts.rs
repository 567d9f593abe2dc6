//! `ferry cp recovery-hosts list`: the hosts that serve or rebuild failed-over
//! machines' disks, with their load, when they were last heard from and whether they
//! reach the store.

use anyhow::Result;
use serde_json::Value;

use super::client::{cell, print_json, Conn};
use super::print_table;

#[derive(clap::Subcommand)]
pub enum Verb {
    /// Every recovery host: its NBD address, the work items it holds, its free work
    /// space, whether it is live (heard from lately: only a live host is given new
    /// work; a failover without --host picks the least loaded live one), and why it
    /// cannot reach the store if it cannot (it is then given no new work)
    List,
}

const HEADER: [&str; 7] = [
    "NAME",
    "NBD_ADDRESS",
    "ITEMS",
    "WORK_DIR_FREE",
    "LIVE",
    "LAST_SEEN",
    "STORE",
];

fn row(h: &Value) -> Vec<String> {
    [
        "name",
        "nbd_address",
        "items",
        "work_dir_free_bytes",
        "live",
        "last_seen",
    ]
    .iter()
    .map(|k| cell(h, k))
    .chain([match h["store_error"].as_str() {
        Some(e) => format!("unreachable: {e}"),
        None => "ok".into(),
    }])
    .collect()
}

pub fn run(conn: &Conn, verb: Verb) -> Result<()> {
    match verb {
        Verb::List => {
            let hosts = conn.list_all("/v1/recovery-hosts")?;
            if conn.json {
                print_json(&Value::Array(hosts))?;
            } else {
                print_table(&HEADER, &hosts.iter().map(row).collect::<Vec<_>>());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_row_shows_what_is_known() {
        let h = json!({"name": "rh1", "nbd_address": "10.0.0.5:10809", "items": 3,
                       "live": true});
        assert_eq!(
            row(&h),
            ["rh1", "10.0.0.5:10809", "3", "-", "true", "-", "ok"]
                .map(String::from)
                .to_vec()
        );
        let h = json!({"name": "rh2", "store_error": "connection refused"});
        assert_eq!(row(&h)[6], "unreachable: connection refused");
    }
}
