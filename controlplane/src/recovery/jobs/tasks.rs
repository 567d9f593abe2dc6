//! What each task of a machine job does. Every task may run again (a control plane
//! killed with -9 in it, a job resumed after it failed): a work item it gave is
//! found by its id, and each write to the failover row moves it only from the state
//! the task expects.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_link::control::wire::{DiskPoint, ReadyDisk, WorkOp};

use crate::jobs::runner::Context;
use crate::jobs::{Job, Step};
use crate::recovery::points::open_machine;
use crate::recovery::work;

use super::state::{self, Begin, FAILED_OVER, PREPARING};
use super::wait::Waiter;
use super::*;
use super::{failback, failed_back};

/// How often the store is read while waiting for the final points.
const STORE_POLL: Duration = Duration::from_secs(1);

/// Runs task `seq` of `job` (one of `KINDS`).
pub async fn run_task(ctx: &Context, job: &Job, seq: usize) -> Result<Step, String> {
    let p: Params = serde_json::from_value(job.params.clone())
        .map_err(|e| format!("job {}: its params: {e}", job.id))?;
    let name = job
        .tasks
        .get(seq)
        .map(|t| t.name.clone())
        .ok_or_else(|| format!("job {} has no task {seq}", job.id))?;
    let mut w = Waiter::new(ctx, job, seq);
    let done = |r: Result<(), String>| r.map(|()| Step::Done);
    match (job.kind.as_str(), name.as_str()) {
        (_, BRING_UP) => done(bring_up(&mut w, &p).await),
        (_, START) => done(start(&mut w, &p).await),
        (TEST_FAILOVER, WAIT_CLEANUP) => wait_for_cleanup(&w, &p).await,
        (TEST_FAILOVER, CLEAN_UP) => done(clean_up(&mut w, &p).await),
        (TEST_FAILOVER, RECORD_VERDICT) => done(record_verdict(&w, &p).await),
        (FAILOVER, STOP_WRITES) => done(stop_source_writes(&mut w, &p).await),
        (FAILOVER, FINAL_UPLOAD) => done(final_upload(&mut w, &p).await),
        (FAILOVER, MARK_FAILED_OVER) => done(mark_failed_over(&w, &p).await),
        (FAILOVER, FENCE) => done(fence(&w, &p).await),
        (CHANGE_POINT, REMOVE_PREVIOUS) => done(remove_failover_items(&mut w, &p, false).await),
        (COMMIT, MARK_COMMITTED) => done(commit(&w, &p).await),
        (CANCEL_FAILOVER, REMOVE_RECOVERY) => done(remove_failover_items(&mut w, &p, true).await),
        (CANCEL_FAILOVER, RESUME_SOURCE) => done(resume_source(&w, &p).await),
        (REPROTECT, CHECK_REPROTECT) => done(super::reprotect::check(&w, &p).await),
        (REPROTECT, SYNC_HOME) => done(super::reprotect::sync_home(&mut w, &p).await),
        (REPROTECT, START_REVERSE) => done(super::reverse::start_reverse(&mut w, &p).await),
        (REPROTECT, START_APPLY) => done(super::reverse::start_apply(&mut w, &p).await),
        (REPROTECT, MARK_REVERSE) => done(super::reprotect::mark_reverse(&w, &p).await),
        (FAILBACK, CHECK_FAILBACK) => done(failback::check(&w, &p).await),
        (FAILBACK, STOP_REVERSE) => done(failback::stop_reverse(&mut w, &p).await),
        (FAILBACK, FINAL_ROUND) => done(failback::final_round(&mut w, &p).await),
        (FAILBACK, STOP_APPLY) => done(failback::stop_apply(&mut w, &p).await),
        (FAILBACK, APPLY_FINAL) => done(failback::apply_final(&mut w, &p).await),
        (FAILBACK, MARK_HOME) => done(failback::mark_home(&w, &p).await),
        (FAILBACK, WAIT_COMMIT) => Ok(failback::wait_commit(&w, &p)),
        (COMMIT | FAILBACK, REMOVE_SITE) => done(failed_back::remove_site(&mut w, &p).await),
        (COMMIT | FAILBACK, REMOVE_APPLY) => done(failed_back::remove_apply(&mut w, &p).await),
        (COMMIT | FAILBACK, DELETE_REVERSE) => done(failed_back::delete_reverse(&mut w, &p).await),
        (COMMIT | FAILBACK, MARK_FAILED_BACK) => done(failed_back::mark_failed_back(&w, &p).await),
        (RE_ENABLE, RESUME_HOME) => done(failed_back::resume_home(&w, &p).await),
        (RE_ENABLE, WAIT_RESYNC) => done(failed_back::wait_resync(&mut w, &p).await),
        (kind, task) => Err(format!("a {kind} job has no task {task:?}")),
    }
}

fn db_err(what: &str) -> impl Fn(crate::db::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn host_of(p: &Params) -> Result<&str, String> {
    p.host
        .as_deref()
        .ok_or_else(|| format!("machine {}: no recovery host was chosen", p.machine))
}

/// The failover states in which the items of this job's kind belong to the
/// machine's failover: None for a test failover (its items are its job's).
fn failover_states(job: &Job, p: &Params, task: &str) -> Option<&'static [&'static str]> {
    match job.kind.as_str() {
        FAILOVER if p.planned == Some(true) && task == BRING_UP => Some(&[PREPARING]),
        FAILOVER | CHANGE_POINT => Some(&[FAILED_OVER]),
        _ => None,
    }
}

fn point_map(points: &[DiskPoint]) -> BTreeMap<String, String> {
    points
        .iter()
        .map(|d| (d.disk.clone(), d.point.clone()))
        .collect()
}

async fn recovery_row(w: &Waiter<'_>, machine: &str) -> Result<Option<state::RecoveryRow>, String> {
    state::get(&w.ctx.db, machine)
        .await
        .map_err(db_err(&format!("reading machine {machine}'s failover")))
}

/// `bring up disks`: a build or serve item for every disk at the job's points (a
/// planned failover's: the final points the source reported), waited for.
async fn bring_up(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    let points = if w.job.kind == FAILOVER && p.planned == Some(true) {
        let row = recovery_row(w, m).await?;
        row.and_then(|r| r.prepared)
            .map(|r| r.points)
            .filter(|ps| !ps.is_empty())
            .ok_or_else(|| format!("machine {m}: its source reported no final point"))?
    } else {
        p.points.clone()
    };
    let target = p
        .target
        .clone()
        .ok_or_else(|| format!("machine {m}: the job names no target"))?;
    let host = host_of(p)?.to_string();
    let states = failover_states(w.job, p, BRING_UP);
    w.submit_and_wait(&host, m, &target.op(points.clone()), states)
        .await?;
    if states.is_some() {
        let job_id = w.job.id.clone();
        let set = state::set_point(&w.ctx.db, m, &job_id, &point_map(&points))
            .await
            .map_err(db_err(&format!("recording machine {m}'s point")))?;
        if !set {
            return Err(format!(
                "machine {m} is no longer failing over: its disks are up but not recorded"
            ));
        }
    }
    Ok(())
}

/// `start machine`: the machine's start action, expanded with its disks, run
/// detached on the recovery host; done at once without one.
async fn start(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    let db = w.ctx.db.clone();
    let Some(template) = state::start_action(&db, m)
        .await
        .map_err(db_err(&format!("reading machine {m}'s start action")))?
    else {
        return Ok(());
    };
    let disks: Vec<ReadyDisk> = work::ready_disks(&db, &w.job.id)
        .await
        .map_err(db_err(&format!("reading the disks of job {}", w.job.id)))?
        .into_iter()
        .filter(|(machine, _)| machine == m)
        .map(|(_, d)| d)
        .collect();
    let point = disks
        .iter()
        .min_by(|a, b| a.disk.cmp(&b.disk))
        .map(|d| d.point.clone())
        .unwrap_or_default();
    let (command, env) = template::expand(&template, m, &point, &disks)?;
    let host = host_of(p)?.to_string();
    let states = failover_states(w.job, p, START);
    w.submit_and_wait(&host, m, &WorkOp::Start { command, env }, states)
        .await?;
    Ok(())
}

/// `wait for cleanup`: the test stays up until an operator gives its verdict; the
/// verdict goes into the job's params (its input is cleared once this task ends).
async fn wait_for_cleanup(w: &Waiter<'_>, p: &Params) -> Result<Step, String> {
    let m = &p.machine;
    let Some(input) = &w.job.input else {
        return Ok(Step::Wait(format!(
            "the test failover of machine {m} is up: test it, then clean up with \
             POST /v1/machines/{m}/test-failover-cleanup {{\"verdict\": \"passed\"|\"failed\", \
             \"notes\": \"...\"}} (`ferry cp machines test-failover-cleanup {m}`)"
        )));
    };
    let v = Verdict::parse(input)?;
    let mut params = p.clone();
    params.verdict = Some(v.verdict);
    params.notes = Some(v.notes);
    params.verdict_at = Some(crate::db::now_s());
    let json = serde_json::to_value(&params).map_err(|e| e.to_string())?;
    let owner = w.job.lease_owner.clone().unwrap_or_default();
    if !state::record_params(&w.ctx.db, &w.job.id, &owner, &json)
        .await
        .map_err(db_err("recording the verdict"))?
    {
        return Err(format!("job {} is no longer held by {owner}", w.job.id));
    }
    Ok(Step::Done)
}

/// `clean up`: one remove item for everything the test made, waited for; the host
/// checks that nothing is left, and the job fails if anything is.
async fn clean_up(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let db = w.ctx.db.clone();
    let made: Vec<String> = work::for_job(&db, &w.job.id)
        .await
        .map_err(db_err(&format!(
            "reading the work items of job {}",
            w.job.id
        )))?
        .into_iter()
        .filter(|r| r.state != "removed" && r.op.kind() != "remove")
        .map(|r| r.id)
        .collect();
    if made.is_empty() {
        return Ok(());
    }
    remove(w, p, host_of(p)?, made).await
}

/// Gives `host` a remove item for `items`, waits for it (it fails naming what is
/// left), and takes the items and itself out of the host's orders.
pub(super) async fn remove(
    w: &mut Waiter<'_>,
    p: &Params,
    host: &str,
    items: Vec<String>,
) -> Result<(), String> {
    let op = WorkOp::Remove {
        items: items.clone(),
    };
    w.submit_and_wait(host, &p.machine, &op, None).await?;
    // This remove item and the failed attempts before it leave the host's orders too.
    let mut gone = items;
    gone.extend(
        work::for_job(&w.ctx.db, &w.job.id)
            .await
            .map_err(db_err("reading the job's remove items"))?
            .into_iter()
            .filter(|r| r.op.kind() == "remove" && r.state != "removed")
            .map(|r| r.id),
    );
    work::mark_removed(&w.ctx.db, &gone, crate::db::now_s())
        .await
        .map_err(db_err("marking work items removed"))
}

/// `record verdict`: an event saying how the test went, written once: the message
/// names the job, so a run of this task again (a kill -9 between the event and the
/// task's end) finds the event its first run wrote since the verdict was taken (a
/// restarted test's new verdict is a new event). Only the job's lease holder runs
/// it, so nothing races the look and the write.
async fn record_verdict(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let verdict = p
        .verdict
        .as_deref()
        .ok_or_else(|| format!("job {}: no verdict was given", w.job.id))?;
    let mut message = format!("test failover job {}: {verdict}", w.job.id);
    if let Some(n) = p.notes.as_deref().filter(|n| !n.is_empty()) {
        message.push_str(": ");
        message.push_str(n);
    }
    let kind = format!("test-failover-{verdict}");
    let subject = format!("machine {}", p.machine);
    let db = &w.ctx.db;
    let since = p.verdict_at.unwrap_or(0);
    let events = crate::registry::events::exists(db, &kind, &subject, &message, since);
    if events.await.map_err(db_err("looking for the verdict"))? {
        return Ok(());
    }
    crate::registry::events::add(db, &kind, &subject, &message, crate::db::now_s())
        .await
        .map_err(db_err("recording the verdict"))?;
    Ok(())
}

/// `stop source writes`: the failover goes to `preparing` (the source agent is told
/// to stop writing and take a final point), then waits until the agent reports that
/// point acknowledged.
async fn stop_source_writes(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    let job_id = w.job.id.clone();
    let begin = Begin {
        machine: m,
        job_id: &job_id,
        host: host_of(p)?,
        prepare_id: Some(&job_id),
    };
    let row = state::begin_prepare(&w.ctx.db, &begin)
        .await
        .map_err(db_err(&format!("preparing machine {m}'s failover")))?;
    match &row {
        Some(r) if r.state == PREPARING && r.job_id.as_deref() == Some(job_id.as_str()) => {}
        Some(r) => {
            return Err(format!(
                "machine {m} is {} by job {}",
                r.state,
                r.job_id.as_deref().unwrap_or("?")
            ))
        }
        None => return Err(format!("machine {m}: its failover vanished")),
    }
    let what =
        format!("the source agent of machine {m} to stop writing and report its final point");
    loop {
        let Some(r) = recovery_row(w, m).await? else {
            return Err(format!("machine {m}: its failover was cancelled"));
        };
        if r.job_id.as_deref() != Some(job_id.as_str()) || r.state != PREPARING {
            return Err(format!(
                "machine {m}: its failover was taken over by job {:?}",
                r.job_id
            ));
        }
        if let Some(rep) = r.prepared.filter(|rep| rep.id == job_id) {
            match rep.state.as_str() {
                "prepared" if !rep.points.is_empty() => return Ok(()),
                "prepared" => {
                    return Err(format!(
                        "the source agent of machine {m} reported no final point"
                    ))
                }
                "failed" => {
                    return Err(format!(
                        "the source agent of machine {m} could not prepare: {}",
                        rep.error.as_deref().unwrap_or("it gave no reason")
                    ))
                }
                _ => {}
            }
        }
        w.tick(0.0, &what).await?;
    }
}

/// `wait for final point upload`: until the store holds every final point.
async fn final_upload(w: &mut Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = p.machine.clone();
    let row = recovery_row(w, &m).await?;
    let points = row
        .and_then(|r| r.prepared)
        .map(|r| r.points)
        .ok_or_else(|| format!("machine {m}: its source reported no final point"))?;
    let access = w.ctx.store.clone().ok_or_else(|| {
        "this control plane has no store (--store, --key-file): it cannot see the final points"
            .to_string()
    })?;
    let mut last = Instant::now() - STORE_POLL;
    let mut progress = 0.0;
    loop {
        if last.elapsed() >= STORE_POLL {
            last = Instant::now();
            let (access, machine, want) = (access.clone(), m.clone(), points.clone());
            let held = tokio::task::spawn_blocking(move || {
                let disks = open_machine(&access.store, &machine, None)?;
                Ok::<usize, crate::error::Error>(
                    want.iter()
                        .filter(|dp| {
                            disks
                                .iter()
                                .any(|d| d.name == dp.disk && d.state.point(&dp.point).is_some())
                        })
                        .count(),
                )
            })
            .await
            .map_err(|e| format!("reading the store: {e}"))?
            .map_err(|e| format!("reading machine {m}'s points in the store: {e}"))?;
            if held == points.len() {
                return Ok(());
            }
            progress = held as f64 / points.len().max(1) as f64;
        }
        let what = format!("the final points of machine {m} to reach the store");
        w.tick(progress, &what).await?;
    }
}

/// `mark failed over`: the machine runs at the recovery site from now on.
async fn mark_failed_over(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    if state::mark_failed_over(&w.ctx.db, m, &w.job.id)
        .await
        .map_err(db_err(&format!("marking machine {m} failed over")))?
    {
        return Ok(());
    }
    Err(format!(
        "machine {m} is no longer preparing a failover for job {}",
        w.job.id
    ))
}

/// `fence source` (unplanned failover): the failover is `failed-over` at once, so
/// that the source is refused from now on, before any disk is brought up.
async fn fence(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    let job_id = w.job.id.clone();
    let begin = Begin {
        machine: m,
        job_id: &job_id,
        host: host_of(p)?,
        prepare_id: None,
    };
    let row = state::fence(&w.ctx.db, &begin, &point_map(&p.points))
        .await
        .map_err(db_err(&format!("fencing machine {m}'s source")))?;
    match row {
        Some(r) if r.state == FAILED_OVER && r.job_id.as_deref() == Some(job_id.as_str()) => Ok(()),
        Some(r) => Err(format!(
            "machine {m} is already {} (job {})",
            r.state,
            r.job_id.as_deref().unwrap_or("?")
        )),
        None => Err(format!("machine {m}: its failover vanished")),
    }
}

/// `remove previous disks` (change-point) and `remove recovery disks` (cancel):
/// every live item of the failover removed, verified by its host. A cancel finding
/// no failover has nothing to remove.
async fn remove_failover_items(
    w: &mut Waiter<'_>,
    p: &Params,
    cancelling: bool,
) -> Result<(), String> {
    let m = &p.machine;
    let Some(row) = recovery_row(w, m).await? else {
        return if cancelling {
            Ok(())
        } else {
            Err(format!("machine {m} is not failed over"))
        };
    };
    if row.items.is_empty() {
        return Ok(());
    }
    let host = row
        .host
        .clone()
        .ok_or_else(|| format!("machine {m}: its failover names no recovery host"))?;
    remove(w, p, &host, row.items.clone()).await?;
    let job_id = w.job.id.clone();
    if !state::drop_items(&w.ctx.db, m, &job_id, &row.items)
        .await
        .map_err(db_err(&format!("recording machine {m}'s removed items")))?
    {
        return Err(format!(
            "machine {m}: its failover changed while its disks were removed"
        ));
    }
    Ok(())
}

/// `mark committed`.
async fn commit(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    if state::commit(&w.ctx.db, m, &w.job.id)
        .await
        .map_err(db_err(&format!("committing machine {m}")))?
    {
        return Ok(());
    }
    Err(format!("machine {m} is not failed over"))
}

/// `resume source`: the failover row goes; the source agent resumes at its next
/// heartbeat.
async fn resume_source(w: &Waiter<'_>, p: &Params) -> Result<(), String> {
    let m = &p.machine;
    if state::resume_source(&w.ctx.db, m)
        .await
        .map_err(db_err(&format!("cancelling machine {m}'s failover")))?
    {
        return Ok(());
    }
    Err(format!(
        "machine {m}'s failover is committed: it cannot be cancelled"
    ))
}
