//! `ferry cp tokens create|list|delete` (an admin token is needed for all three).

use anyhow::Result;
use ferry_replica::layout::check_name;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::{cell, print_json, Conn};
use super::print_table;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Role {
    /// Reads only
    Viewer,
    /// Reads and runs jobs
    Operator,
    /// Everything
    Admin,
}

#[derive(clap::Subcommand)]
pub enum Verb {
    /// A new API token; its secret is printed once, on the last line
    Create {
        name: String,
        #[arg(long, value_enum)]
        role: Role,
    },
    /// Every token (names and roles; secrets are never shown again)
    List,
    /// Delete a token: it is refused from then on
    Delete { name: String },
}

pub fn run(conn: &Conn, verb: Verb) -> Result<()> {
    match verb {
        Verb::Create { name, role } => {
            check_name("token", &name)?;
            let role = match role {
                Role::Viewer => "viewer",
                Role::Operator => "operator",
                Role::Admin => "admin",
            };
            let body = json!({ "name": name, "role": role });
            if let Some(t) = conn.call(Method::POST, "/v1/tokens", Some(&body))? {
                if conn.json {
                    print_json(&t)?;
                } else {
                    println!(
                        "token {} with role {} (shown only now):",
                        cell(&t, "name"),
                        cell(&t, "role")
                    );
                    println!("{}", cell(&t, "token"));
                }
            }
        }
        Verb::List => {
            let items = conn.list_all("/v1/tokens")?;
            if conn.json {
                print_json(&Value::Array(items))?;
            } else {
                let rows = items
                    .iter()
                    .map(|t| {
                        let created = t
                            .get("created_at")
                            .and_then(Value::as_i64)
                            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
                            .map_or_else(|| "-".to_string(), |d| d.to_rfc3339());
                        vec![cell(t, "name"), cell(t, "role"), created]
                    })
                    .collect::<Vec<_>>();
                print_table(&["NAME", "ROLE", "CREATED"], &rows);
            }
        }
        Verb::Delete { name } => {
            check_name("token", &name)?;
            conn.call(Method::DELETE, &format!("/v1/tokens/{name}"), None)?;
            if !conn.json {
                println!("deleted token {name}");
            }
        }
    }
    Ok(())
}
