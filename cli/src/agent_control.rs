//! `ferry agent --control-plane`: enrollment (once; a restart needs no token), the
//! first orders (which process server, which policy), then the heartbeat thread that
//! applies later orders while the agent runs. Files in the state directory: key.pem
//! (0600), cert.pem, ca.pem, issued.json, orders.json (the last orders) and journal/.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_agent::live::control::{interval_of, load_orders, save_orders, target_for, Controlled};
use ferry_agent::live::{Agent, DiskSpec};
use ferry_link::control::client::{ControlClient, Enrollment, Heartbeats, IdentityFiles};
use ferry_link::control::wire::{
    AgentHeartbeat, AgentOrders, DiskReport, Kind, HEARTBEAT_INTERVAL_S,
};

use crate::agent_cmd::{Prepared, RunArgs};

/// The enrolled client and the orders the agent starts with, until it runs.
pub(crate) struct Control {
    client: ControlClient,
    machine: String,
    identity: IdentityFiles,
    orders_file: std::path::PathBuf,
    orders: AgentOrders,
    /// `--group-advertise`: where the group coordinator reaches this agent.
    group_advertise: Option<String>,
}

impl Control {
    /// Reports `addr` as the agent's group-listen address (else the listener's own).
    pub fn group_advertise(self, addr: Option<String>) -> Control {
        Control {
            group_advertise: addr,
            ..self
        }
    }

    /// Starts the heartbeat thread for the running agent (which takes the group
    /// role of its first orders here).
    pub fn start(self, agent: Arc<Agent>) -> Result<Heartbeats> {
        let first = Duration::from_secs_f64(interval_s(self.orders.heartbeat_interval_s));
        let mut part = Controlled::new(
            agent,
            self.machine,
            self.identity,
            self.orders_file,
            self.orders,
        );
        if let Some(a) = self.group_advertise {
            part.advertise_group_listen(a);
        }
        Ok(Heartbeats::start(self.client, part, first)?)
    }
}

fn interval_s(s: f64) -> f64 {
    if s.is_finite() && s >= 0.5 {
        s.min(60.0)
    } else {
        HEARTBEAT_INTERVAL_S
    }
}

pub(crate) fn prepare(
    machine: &str,
    disks: &[DiskSpec],
    urls: &[String],
    r: &RunArgs,
) -> Result<Prepared> {
    let dir = r.state_dir().context("--control-plane needs --state-dir")?;
    enroll_and_order(machine, disks, urls, r.ca(), r.enroll_token(), dir)
}

/// Enrolls (when `dir` holds no identity yet, with `token`), then waits for the first
/// orders: what `ferry agent --control-plane` does before it serves, and what
/// `ferry quickstart` does for its own agent.
pub(crate) fn enroll_and_order(
    machine: &str,
    disks: &[DiskSpec],
    urls: &[String],
    ca: &Path,
    token: Option<&str>,
    dir: &Path,
) -> Result<Prepared> {
    let dir = dir.to_path_buf();
    let client = ControlClient::open(
        &Enrollment {
            urls: urls.to_vec(),
            ca: ca.to_path_buf(),
            kind: Kind::Agent,
            name: machine.to_string(),
            advertise: None,
            dir: dir.clone(),
        },
        token,
    )
    .with_context(|| format!("enrolling machine {machine} with {}", urls.join(", ")))?;
    let identity = client.files.clone();
    let orders_file = dir.join("orders.json");
    let orders = first_orders(&client, machine, disks, &orders_file)?;
    let ps = orders
        .process_server
        .as_ref()
        .context("orders without a process server")?;
    let target = target_for(ps, &identity)?;
    tracing::info!(process_server = %ps.name, address = %ps.address, policy = %orders.policy.name, "replicating as the control plane ordered");
    Ok(Prepared {
        target,
        journal_dir: dir.join("journal"),
        crash_point_interval: interval_of(&orders),
        cert: identity.cert.clone(),
        key: identity.key.clone(),
        ca: identity.ca.clone(),
        control: Some(Control {
            client,
            machine: machine.to_string(),
            identity,
            orders_file,
            orders,
            group_advertise: None,
        }),
    })
}

/// Before the agent runs, its disks as far as the files tell: their size, and nothing
/// journaled or copied yet.
fn initial_reports(disks: &[DiskSpec]) -> Vec<DiskReport> {
    disks
        .iter()
        .map(|d| DiskReport {
            name: d.name.clone(),
            size_bytes: std::fs::metadata(&d.path).map_or(0, |m| m.len()),
            state: "initial-copy".into(),
            initial_copy_percent: 0.0,
            journal_bytes: 0,
            unacked_bytes: 0,
            newest_point: None,
            newest_uploaded_point: None,
            resync: None,
        })
        .collect()
}

/// The orders to start with: the control plane's answer to a first heartbeat once it
/// names a process server, or, while it cannot be reached, the last orders kept in the
/// state directory. With neither, waits (retrying every interval): there is nowhere
/// to replicate to yet.
fn first_orders(
    client: &ControlClient,
    machine: &str,
    disks: &[DiskSpec],
    orders_file: &Path,
) -> Result<AgentOrders> {
    let hb = AgentHeartbeat {
        machine: machine.to_string(),
        disks: initial_reports(disks),
        process_server: None,
        last_error: None,
        // Reported from the next heartbeat on, once the listener is bound.
        group_listen: None,
        failover: None,
    };
    let mut said: Option<String> = None;
    loop {
        let why = match client.call::<_, AgentOrders>("/v1/heartbeat/agent", &hb) {
            Ok(o) if o.process_server.is_some() => {
                if let Err(e) = save_orders(orders_file, &o) {
                    tracing::warn!(path = %orders_file.display(), error = %e, "cannot keep the orders for a restart");
                }
                return Ok(o);
            }
            Ok(o) => {
                if let Some(saved) = load_orders(orders_file).filter(|s| s.process_server.is_some())
                {
                    return Ok(saved);
                }
                wait_once(
                    &mut said,
                    "the control plane has no process server for this machine yet",
                );
                o.heartbeat_interval_s
            }
            Err(e) => {
                if let Some(saved) = load_orders(orders_file).filter(|s| s.process_server.is_some())
                {
                    tracing::warn!(error = %e, "the control plane is unreachable: starting with the last orders");
                    return Ok(saved);
                }
                wait_once(&mut said, &format!("no orders yet: {e}"));
                HEARTBEAT_INTERVAL_S
            }
        };
        std::thread::sleep(Duration::from_secs_f64(interval_s(why)));
    }
}

/// Logs why the agent waits, once per reason.
fn wait_once(said: &mut Option<String>, why: &str) {
    if said.as_deref() != Some(why) {
        tracing::warn!("{why}; waiting for orders before serving the disks");
        *said = Some(why.to_string());
    }
}
