//! `ferry cp`: the control plane's API from the command line. Tables for people,
//! `--json` for scripts; errors as one line with the API's problem detail.

pub mod client;
mod events;
mod failback;
mod jobs;
mod machines;
mod plans;
mod points;
mod policies;
mod process_servers;
mod recovery;
mod recovery_hosts;
mod tokens;
mod webhooks;

use anyhow::Result;

pub use client::ConnArgs;

#[derive(clap::Args)]
pub struct CpArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    resource: Resource,
}

#[derive(clap::Subcommand)]
enum Resource {
    /// Replication policies: point intervals, retention, RPO thresholds
    #[command(subcommand)]
    Policies(policies::Verb),
    /// API tokens and one-time enrollment tokens (admin only)
    #[command(subcommand)]
    Tokens(tokens::Verb),
    /// Machines: health, RPO, process server, policy, group; test failover,
    /// failover, commit, cancel
    #[command(subcommand)]
    Machines(machines::Verb),
    /// Recovery hosts: where failed-over machines' disks are served or rebuilt
    #[command(subcommand)]
    RecoveryHosts(recovery_hosts::Verb),
    /// Process servers: load, cache, health
    #[command(subcommand)]
    ProcessServers(process_servers::Verb),
    /// What happened to the fleet
    #[command(subcommand)]
    Events(events::Verb),
    /// Durable jobs (retention, ...): progress, cancel, resume
    #[command(subcommand)]
    Jobs(jobs::Verb),
    /// Webhooks: events POSTed, signed, to URLs (admin to change)
    #[command(subcommand)]
    Webhooks(webhooks::Verb),
    /// Recovery plans: ordered groups of machines with actions; their test failover,
    /// cleanup, failover, commit and cancel
    #[command(subcommand)]
    Plans(plans::Verb),
}

pub fn cp(a: CpArgs) -> Result<()> {
    let conn = client::Conn::open(&a.conn)?;
    match a.resource {
        Resource::Policies(v) => policies::run(&conn, v),
        Resource::Tokens(v) => tokens::run(&conn, v),
        Resource::Machines(v) => machines::run(&conn, v),
        Resource::ProcessServers(v) => process_servers::run(&conn, v),
        Resource::RecoveryHosts(v) => recovery_hosts::run(&conn, v),
        Resource::Events(v) => events::run(&conn, v),
        Resource::Jobs(v) => jobs::run(&conn, v),
        Resource::Webhooks(v) => webhooks::run(&conn, v),
        Resource::Plans(v) => plans::run(&conn, v),
    }
}

/// Prints rows as columns padded to their widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
