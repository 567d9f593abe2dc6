//! `ferry cp policies list|show|create|update`.

use anyhow::{bail, Result};
use ferry_replica::layout::check_name;
use reqwest::Method;
use serde_json::{json, Map, Value};

use super::client::{cell, print_json, Conn};
use super::print_table;

#[derive(clap::Args)]
pub struct Fields {
    /// Seconds between crash-consistent points (fractional, at least 0.5)
    #[arg(long, value_name = "S")]
    crash_point_interval_s: Option<f64>,
    /// Seconds between application-consistent points (0: none)
    #[arg(long, value_name = "S")]
    app_point_interval_s: Option<u32>,
    /// Hours of points kept
    #[arg(long, value_name = "H")]
    retention_hours: Option<u32>,
    /// RPO in seconds above which a machine's health is warning
    #[arg(long, value_name = "S")]
    rpo_warning_s: Option<u32>,
    /// RPO in seconds above which a machine's health is critical
    #[arg(long, value_name = "S")]
    rpo_critical_s: Option<u32>,
}

impl Fields {
    /// The fields given, as a JSON object.
    fn given(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put(
            "crash_point_interval_s",
            self.crash_point_interval_s.map(|v| json!(v)),
        );
        put(
            "app_point_interval_s",
            self.app_point_interval_s.map(|v| json!(v)),
        );
        put("retention_hours", self.retention_hours.map(|v| json!(v)));
        put("rpo_warning_s", self.rpo_warning_s.map(|v| json!(v)));
        put("rpo_critical_s", self.rpo_critical_s.map(|v| json!(v)));
        m
    }
}

#[derive(clap::Subcommand)]
pub enum Verb {
    /// Every policy
    List,
    /// One policy
    Show { name: String },
    /// A new policy; fields not given take the built-in default's values (5 s, 0, 24 h,
    /// 30 s, 120 s)
    Create {
        name: String,
        #[command(flatten)]
        fields: Fields,
    },
    /// Change the fields given; the others keep their value
    Update {
        name: String,
        #[command(flatten)]
        fields: Fields,
    },
}

const HEADER: [&str; 6] = [
    "NAME",
    "CRASH_POINT_S",
    "APP_POINT_S",
    "RETENTION_H",
    "RPO_WARNING_S",
    "RPO_CRITICAL_S",
];

fn row(p: &Value) -> Vec<String> {
    [
        "name",
        "crash_point_interval_s",
        "app_point_interval_s",
        "retention_hours",
        "rpo_warning_s",
        "rpo_critical_s",
    ]
    .iter()
    .map(|k| cell(p, k))
    .collect()
}

fn show(conn: &Conn, p: &Value) -> Result<()> {
    if conn.json {
        print_json(p)
    } else {
        print_table(&HEADER, &[row(p)]);
        Ok(())
    }
}

fn path(name: &str) -> Result<String> {
    check_name("policy", name)?;
    Ok(format!("/v1/policies/{name}"))
}

pub fn run(conn: &Conn, verb: Verb) -> Result<()> {
    match verb {
        Verb::List => {
            let items = conn.list_all("/v1/policies")?;
            if conn.json {
                print_json(&Value::Array(items))?;
            } else {
                print_table(&HEADER, &items.iter().map(row).collect::<Vec<_>>());
            }
        }
        Verb::Show { name } => {
            if let Some(p) = conn.call(Method::GET, &path(&name)?, None)? {
                show(conn, &p)?;
            }
        }
        Verb::Create { name, fields } => {
            check_name("policy", &name)?;
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            body.insert("crash_point_interval_s".into(), json!(5.0));
            body.insert("app_point_interval_s".into(), json!(0));
            body.insert("retention_hours".into(), json!(24));
            body.insert("rpo_warning_s".into(), json!(30));
            body.insert("rpo_critical_s".into(), json!(120));
            body.extend(fields.given());
            if let Some(p) = conn.call(Method::POST, "/v1/policies", Some(&Value::Object(body)))? {
                show(conn, &p)?;
            }
        }
        Verb::Update { name, fields } => {
            let patch = fields.given();
            if patch.is_empty() {
                bail!("policies update {name}: give at least one field to change");
            }
            if let Some(p) = conn.call(Method::PATCH, &path(&name)?, Some(&Value::Object(patch)))? {
                show(conn, &p)?;
            }
        }
    }
    Ok(())
}
