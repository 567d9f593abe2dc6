//! `ferry cp machines points M`: a machine's recovery points as the control plane
//! reads them from the store.

use anyhow::Result;
use ferry_replica::layout::check_name;
use serde_json::Value;

use super::client::{cell, print_json, Conn};
use super::print_table;

pub fn points(conn: &Conn, machine: &str) -> Result<()> {
    check_name("machine", machine)?;
    let items = conn.list_all(&format!("/v1/machines/{machine}/points"))?;
    if conn.json {
        return print_json(&Value::Array(items));
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|p| {
            ["disk", "id", "kind", "time", "seq", "disk_bytes", "label"]
                .iter()
                .map(|k| cell(p, k))
                .collect()
        })
        .collect();
    print_table(
        &["DISK", "POINT", "KIND", "TIME", "SEQ", "BYTES", "LABEL"],
        &rows,
    );
    Ok(())
}
