//! A plan's script actions: run on the control plane (`script`) or given to a named
//! recovery host as a `script` work item, with the plan's environment.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_link::control::limits::MAX_WORK_OUTPUT_BYTES;
use ferry_link::control::wire::WorkOp;

use super::job::Params;
use super::script::{self, disk_var, tail};
use super::spec::{Action, RUN_ON_HOST_PREFIX};
use crate::jobs::runner::Context;
use crate::jobs::Job;
use crate::recovery::work;

/// A recovery host not heard from this long fails the script it was given.
const HOST_LOST_S: i64 = 60;
/// How long past its timeout a host's script may go unreported.
const HOST_GRACE_S: u64 = 120;
const POLL: Duration = Duration::from_millis(300);

/// The environment of a script before or after group `group`: the plan, the group,
/// its machines, the point, the direction and type, and every disk the plan's machine
/// jobs have made ready so far (`FERRY_DISK_<MACHINE>_<DISK>`: path or NBD URL).
pub async fn env(
    ctx: &Context,
    params: &Params,
    group: usize,
) -> Result<BTreeMap<String, String>, String> {
    let g = &params.plan.groups[group];
    let mut env = BTreeMap::new();
    env.insert("FERRY_PLAN".into(), params.plan.name.clone());
    env.insert("FERRY_GROUP".into(), g.name.clone());
    env.insert("FERRY_MACHINE".into(), g.machines.join(" "));
    // The group's point when its machines share one, else the point asked for.
    let mut points: Vec<&String> = g
        .machines
        .iter()
        .filter_map(|m| params.points.get(m))
        .collect();
    points.dedup();
    let point = match (points.as_slice(), &params.operation) {
        ([one], _) => one.to_string(),
        (_, super::job::Operation::Failover { planned: true, .. }) => "final".into(),
        (_, super::job::Operation::TestFailover { point, .. }) => point.clone(),
        (_, super::job::Operation::Failover { point, .. }) => {
            point.clone().unwrap_or_else(|| "latest".into())
        }
        _ => String::new(),
    };
    env.insert("FERRY_POINT".into(), point);
    env.insert("FERRY_DIRECTION".into(), params.direction.as_str().into());
    if let Some(t) = params.operation.failover_type() {
        env.insert("FERRY_FAILOVER_TYPE".into(), t.as_str().into());
    }
    for child in params.children.values() {
        let disks = work::ready_disks(&ctx.db, child)
            .await
            .map_err(|e| e.to_string())?;
        for (machine, d) in disks {
            if let Some(at) = d.nbd_url.or(d.path) {
                env.insert(disk_var(&machine, &d.disk), at);
            }
        }
    }
    Ok(env)
}

/// How a script ended, as its task's error says it.
fn how(timed_out: Option<u64>, code: Option<i32>, other: Option<&str>) -> String {
    match (timed_out, code, other) {
        (Some(t), _, _) => format!("timed out after {t} s (its process group was killed)"),
        (None, Some(c), _) => format!("exited with {c}"),
        (None, None, Some(e)) => format!("failed: {e}"),
        (None, None, None) => "was killed by a signal".to_string(),
    }
}

fn failure(name: &str, on: &str, how: &str, out: &str) -> String {
    format!(
        "script {name} on {on} {how}; resume to run it again, or resume with \
         {{\"skip\": true}} to skip it; its output ends: {}",
        tail(out.trim_end(), MAX_WORK_OUTPUT_BYTES)
    )
}

/// Runs script action `action` (task `seq`) to its end: Ok when it exited 0.
pub async fn run_script(
    ctx: &Context,
    job: &Job,
    seq: usize,
    params: &Params,
    group: usize,
    action: &Action,
) -> Result<(), String> {
    let Action::Script {
        name,
        command,
        timeout_s,
        run_on,
        ..
    } = action
    else {
        return Err(format!("action {} is not a script", action.name()));
    };
    let env = env(ctx, params, group).await?;
    if let Some(host) = run_on.strip_prefix(RUN_ON_HOST_PREFIX) {
        return on_host(ctx, job, seq, params, host, name, command, *timeout_s, env).await;
    }
    let out = script::run(command, &env, Duration::from_secs(*timeout_s)).await?;
    tracing::info!(
        "job {}: script {name} ended ({:?}, timed out: {}); its output ends: {}",
        job.id,
        out.exit_code,
        out.timed_out,
        out.output
    );
    if out.succeeded() {
        return Ok(());
    }
    let how = how(out.timed_out.then_some(*timeout_s), out.exit_code, None);
    Err(failure(name, run_on, &how, &out.output))
}

/// The item id of task `seq`'s script: a new one per attempt, found again after a
/// kill -9. An attempt whose end was read is marked removed; one not removed is the
/// current attempt (still running, or ended and not read yet).
async fn attempt_id(ctx: &Context, job: &Job, seq: usize, plan: &str) -> Result<String, String> {
    let base = work::item_id(&job.id, seq, plan);
    let items = work::for_job(&ctx.db, &job.id)
        .await
        .map_err(|e| e.to_string())?;
    let mine: Vec<_> = items
        .iter()
        .filter(|w| w.id.starts_with(&format!("{base}-a")))
        .collect();
    if let Some(live) = mine.iter().find(|w| w.state != "removed") {
        return Ok(live.id.clone());
    }
    Ok(format!("{base}-a{}", mine.len()))
}

#[allow(clippy::too_many_arguments)]
async fn on_host(
    ctx: &Context,
    job: &Job,
    seq: usize,
    params: &Params,
    host: &str,
    name: &str,
    command: &str,
    timeout_s: u64,
    env: BTreeMap<String, String>,
) -> Result<(), String> {
    let on = format!("recovery host {host}");
    let seen = |hosts: &[work::HostRow]| hosts.iter().find(|h| h.name == host).map(|h| h.last_seen);
    let hosts = work::hosts(&ctx.db).await.map_err(|e| e.to_string())?;
    if seen(&hosts).is_none() {
        return Err(format!("script {name}: there is no recovery host {host}"));
    }
    let plan = &params.plan.name;
    let id = attempt_id(ctx, job, seq, plan).await?;
    let op = WorkOp::Script {
        command: command.to_string(),
        timeout_s,
        env,
    };
    let started = crate::db::now_s();
    work::submit(&ctx.db, &id, host, &job.id, plan, &op, started)
        .await
        .map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout_s + HOST_GRACE_S);
    let row = loop {
        let row = work::get(&ctx.db, &id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("script {name}: work item {id} vanished"))?;
        if row.is_ended() {
            break row;
        }
        let now = crate::db::now_s();
        let hosts = work::hosts(&ctx.db).await.map_err(|e| e.to_string())?;
        match seen(&hosts) {
            None => return Err(format!("script {name}: recovery host {host} was removed")),
            Some(last) if now - last > HOST_LOST_S && now - started > HOST_LOST_S => {
                return Err(format!(
                    "script {name}: recovery host {host} not seen for {} s (work item {id})",
                    now - last
                ))
            }
            Some(_) => {}
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "script {name}: recovery host {host} has not reported work item {id} \
                 {HOST_GRACE_S} s past its timeout"
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    // Read: a later run of this task (a retry) makes a new attempt.
    work::mark_removed(&ctx.db, std::slice::from_ref(&id), crate::db::now_s())
        .await
        .map_err(|e| e.to_string())?;
    let result = row.result.unwrap_or_default();
    if row.state == "succeeded" && result.exit_code.unwrap_or(0) == 0 {
        return Ok(());
    }
    // The host's error says why (its timeout included); the output is the script's.
    let how = how(None, result.exit_code, row.error.as_deref());
    Err(failure(name, &on, &how, &result.output))
}
