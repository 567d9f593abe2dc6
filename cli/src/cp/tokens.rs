//! `ferry cp tokens create|list|delete` (an admin token is needed for all three):
//! API tokens by name and role, and one-time enrollment tokens (`create --for`).

use anyhow::{bail, Context, Result};
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

/// What an enrollment token is for.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum EnrollFor {
    Agent,
    ProcessServer,
    RecoveryHost,
}

#[derive(clap::Subcommand)]
pub enum Verb {
    /// A new API token (NAME --role), or a one-time enrollment token (--for); its
    /// secret is printed once, on the last line
    Create {
        /// The API token's name
        #[arg(required_unless_present = "for_")]
        name: Option<String>,
        #[arg(long, value_enum, required_unless_present = "for_")]
        role: Option<Role>,
        /// An enrollment token, for `--enroll-token` of an agent or process server
        #[arg(long = "for", value_enum, conflicts_with_all = ["name", "role"])]
        for_: Option<EnrollFor>,
        /// How long the enrollment token works: 90s, 30m, 1h, 2d (default 1h)
        #[arg(long, value_name = "DURATION", requires = "for_")]
        ttl: Option<String>,
    },
    /// Every token (names and roles; secrets are never shown again)
    List,
    /// Delete a token: it is refused from then on
    Delete { name: String },
}

pub fn run(conn: &Conn, verb: Verb) -> Result<()> {
    match verb {
        Verb::Create {
            for_: Some(kind),
            ttl,
            ..
        } => {
            let kind = match kind {
                EnrollFor::Agent => "agent",
                EnrollFor::ProcessServer => "process-server",
                EnrollFor::RecoveryHost => "recovery-host",
            };
            let mut body = json!({ "for": kind });
            if let Some(ttl) = ttl {
                body["ttl_s"] = json!(parse_ttl(&ttl)?);
            }
            if let Some(t) = conn.call(Method::POST, "/v1/enrollment-tokens", Some(&body))? {
                if conn.json {
                    print_json(&t)?;
                } else {
                    println!(
                        "enrollment token for a {kind}, works once until {} (shown only now):",
                        cell(&t, "expires_at")
                    );
                    println!("{}", cell(&t, "token"));
                }
            }
        }
        Verb::Create {
            name: Some(name),
            role: Some(role),
            ..
        } => {
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
        Verb::Create { .. } => bail!("tokens create: give NAME --role ROLE, or --for"),
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

/// `90s`, `30m`, `1h`, `2d` or plain seconds, in seconds.
fn parse_ttl(s: &str) -> Result<u64> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("--ttl {s:?}: a number and s, m, h or d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("--ttl {s:?}: the unit must be s, m, h or d"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("--ttl {s:?} is too long"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ttls() {
        assert_eq!(super::parse_ttl("1h").unwrap(), 3600);
        assert_eq!(super::parse_ttl("90").unwrap(), 90);
        assert_eq!(super::parse_ttl("30m").unwrap(), 1800);
        assert_eq!(super::parse_ttl("2d").unwrap(), 172_800);
        assert!(super::parse_ttl("1w").is_err());
        assert!(super::parse_ttl("h").is_err());
    }
}
