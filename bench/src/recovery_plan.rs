//! A recovery plan's drill at fleet scale: `machines` protected machines (real agents
//! of small disks, one process server, one recovery host, one control plane, all real
//! processes on this host) in one plan of two groups, test-failed-over to NBD and
//! cleaned up. It prints the wall time of each half (from the POST to the plan job
//! waiting for its cleanup; from the cleanup's POST to the plan job's success) and
//! checks, outside the timing, that every test disk equals its source and that the
//! recovery host holds nothing after the cleanup.
//!
//! The same-run baseline is one machine's test failover and cleanup through the
//! machine API on the same processes, once before the plan and once after it: the
//! plan's time against one such drill says what running its machines in parallel
//! (bounded by the plan's `max_parallel`) buys over running them one after another.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ferry_testkit::control::{process_server, recovery_host, Agent, Cp};
use ferry_testkit::net::free_addr;
use ferry_testkit::process::run_ok;
use rand::SeedableRng;
use serde_json::{json, Value};

/// Machine names are `m00` to `m99`; a plan holds at most 100 machines.
const MAX_MACHINES: usize = 100;
/// How long one half of a drill may take before the run gives up on it.
const JOB_DEADLINE: Duration = Duration::from_secs(900);
/// How long the recovery host may take to drop the folders of its finished remove
/// items once the jobs succeeded (it learns of it from its next heartbeat answers).
const HOST_EMPTY_DEADLINE: Duration = Duration::from_secs(30);

pub struct Options {
    pub ferry: PathBuf,
    pub work: PathBuf,
    pub machines: usize,
    pub disk_mib: u64,
    /// The plan's `max_parallel` (the API's default is 4): set explicitly so that the
    /// figure says what it was measured with.
    pub max_parallel: u32,
}

impl Options {
    /// The control plane runs the plan job, up to `max_parallel` machine jobs and its
    /// own scheduled jobs (retention) at once: with fewer slots the machine jobs
    /// would queue behind each other and the plan's figure would measure the runner.
    pub fn jobs_at_once(&self) -> u32 {
        self.max_parallel + 4
    }
}

/// One machine's drill: its test failover up, then cleaned up.
#[derive(Debug, Clone, Copy)]
pub struct Drill {
    pub up_s: f64,
    pub cleanup_s: f64,
}

impl Drill {
    pub fn total_s(&self) -> f64 {
        self.up_s + self.cleanup_s
    }
}

/// What one run measured.
#[derive(Debug)]
pub struct Figures {
    pub machines: usize,
    pub disk_mib: u64,
    pub max_parallel: u32,
    pub jobs_at_once: u32,
    pub before: Drill,
    pub plan: Drill,
    pub after: Drill,
    /// Seconds after the plan's success until the recovery host held no item.
    pub host_empty_s: f64,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn get_job(cp: &Cp, id: &str) -> Result<Value> {
    let (st, v) = cp.api("GET", &format!("/v1/jobs/{id}"), None);
    ensure!(st == 200, "GET /v1/jobs/{id}: {st} {v}");
    Ok(v)
}

fn post(cp: &Cp, path: &str, body: Value) -> Result<Value> {
    let (st, v) = cp.api("POST", path, Some(body));
    ensure!((200..300).contains(&st), "POST {path}: {st} {v}");
    Ok(v)
}

fn job_id(answer: &Value, what: &str) -> Result<String> {
    answer["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{what}: no job id in {answer}"))
}

/// Polls job `id` every 50 ms (the timing's resolution) until `done` says so; a job
/// that fails or is cancelled ends the run with its error.
fn until(cp: &Cp, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + JOB_DEADLINE;
    loop {
        let j = get_job(cp, id)?;
        if done(&j) {
            return Ok(j);
        }
        if matches!(j["state"].as_str(), Some("failed" | "cancelled")) {
            bail!("job {id} ({what}) ended {}: {}", j["state"], j["error"]);
        }
        if Instant::now() > deadline {
            bail!("job {id} ({what}) not there after {JOB_DEADLINE:?}: {j}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Up: the job waits for its cleanup's verdict (a machine's test failover and a
/// plan's both name the cleanup call in their prompt).
fn waits_for_cleanup(j: &Value) -> bool {
    j["state"] == "waiting-for-input"
        && j["prompt"]
            .as_str()
            .is_some_and(|p| p.contains("test-failover-cleanup"))
}

fn succeeded(j: &Value) -> bool {
    j["state"] == "succeeded"
}

/// Each test disk of machine job `job` (up, waiting for its cleanup) read through its
/// NBD URL equals its source's disk file: `qemu-img compare`. The sources take no
/// writes after their points were uploaded, so the file is the point's content.
/// Returns how many disks it compared.
fn check_disks(cp: &Cp, job: &str, agents: &[Agent]) -> Result<usize> {
    let j = get_job(cp, job)?;
    let disks = j["disks"].as_array().cloned().unwrap_or_default();
    ensure!(!disks.is_empty(), "job {job} is up with no disk: {j}");
    for disk in &disks {
        let m = disk["machine"].as_str().unwrap_or("");
        let a = agents
            .iter()
            .find(|a| a.name == m)
            .with_context(|| format!("job {job}: a test disk of unknown machine {m:?}"))?;
        let url = disk["nbd_url"]
            .as_str()
            .with_context(|| format!("job {job}: no nbd_url in {disk}"))?;
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", url, &s(&a.disk)])
            .output()
            .context("running qemu-img compare (package qemu-utils)")?;
        ensure!(
            out.status.success(),
            "test disk {url} of machine {m} differs from its source {}: {}{}",
            a.disk.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(disks.len())
}

/// Waits until the recovery host holds no item; how long that took. Outside the
/// timing: the jobs' own remove items verified their folders gone, this checks that
/// nothing at all is left, the remove items' own folders included.
fn wait_host_empty(rh_dir: &Path) -> Result<f64> {
    let t = Instant::now();
    loop {
        let left = ferry_testkit::control::items_left(rh_dir);
        if left.is_empty() {
            return Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed() > HOST_EMPTY_DEADLINE {
            bail!(
                "the recovery host still holds {} items {HOST_EMPTY_DEADLINE:?} after the \
                 cleanup: {left:?}",
                left.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One machine's test failover to NBD and its cleanup through the machine API, its
/// disk checked between the two halves (outside their timing).
fn one_machine(cp: &Cp, agents: &[Agent], machine: &str, rh_dir: &Path) -> Result<Drill> {
    let what = format!("test failover of {machine}");
    let t = Instant::now();
    let answer = post(
        cp,
        &format!("/v1/machines/{machine}/test-failover"),
        json!({"point": "latest", "target": {"kind": "nbd"}}),
    )?;
    let id = job_id(&answer, &what)?;
    until(cp, &id, &what, waits_for_cleanup)?;
    let up_s = t.elapsed().as_secs_f64();
    check_disks(cp, &id, agents)?;
    let t = Instant::now();
    post(
        cp,
        &format!("/v1/machines/{machine}/test-failover-cleanup"),
        json!({"verdict": "passed", "notes": "ferry-bench recovery-plan baseline"}),
    )?;
    until(cp, &id, &what, succeeded)?;
    let cleanup_s = t.elapsed().as_secs_f64();
    wait_host_empty(rh_dir)?;
    Ok(Drill { up_s, cleanup_s })
}

pub fn run(o: &Options) -> Result<Figures> {
    ensure!(
        (2..=MAX_MACHINES).contains(&o.machines),
        "--machines {} must be from 2 (one per group) to {MAX_MACHINES}",
        o.machines
    );
    ensure!(
        o.disk_mib >= 4,
        "--disk-mib {} must be 4 at least (2 MiB of it are written first)",
        o.disk_mib
    );
    ensure!(
        (1..=100).contains(&o.max_parallel),
        "--max-parallel {} must be from 1 to 100",
        o.max_parallel
    );
    std::fs::create_dir_all(&o.work).with_context(|| format!("creating {}", o.work.display()))?;
    // Removed when the run ends, after every process below (declared later, dropped
    // first) is killed.
    let tmp = tempfile::tempdir_in(&o.work)
        .with_context(|| format!("a temporary directory in {}", o.work.display()))?;
    let d = tmp.path();
    let ferry = o.ferry.as_path();
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let store_dir = d.join("store");
    std::fs::create_dir_all(&store_dir)
        .with_context(|| format!("creating {}", store_dir.display()))?;
    let store_url = format!("file://{}", s(&store_dir));
    let key = d.join("vault.key");
    run_ok(ferry, &["keygen", "--out", &s(&key)]);
    let jobs_at_once = o.jobs_at_once().to_string();
    let key_s = s(&key);
    let flags = [
        "--store",
        store_url.as_str(),
        "--key-file",
        key_s.as_str(),
        "--jobs-at-once",
        jobs_at_once.as_str(),
    ];
    let cp = Cp::start_with(ferry, &d.join("cp"), &free_addr().to_string(), None, &flags);
    let (_ps, _) = process_server(&cp, d, "ps1", &store_url, None);
    let rh_dir = d.join("rh1");
    let (_rh, _) = recovery_host(&cp, &rh_dir, "rh1", &store_url, &key, None);

    eprintln!(
        "recovery-plan: enrolling {} agents of {} MiB disks",
        o.machines, o.disk_mib
    );
    let mut agents = Vec::with_capacity(o.machines);
    for i in 0..o.machines {
        let name = format!("m{i:02}");
        agents.push(Agent::enroll(&cp, d, &name, o.disk_mib << 20, &mut rng));
    }
    for a in &mut agents {
        a.write_and_point(ferry, &mut rng, "drill");
    }
    for a in &agents {
        ferry_testkit::cli::wait_uploaded(ferry, &a.sock);
    }
    // Twenty agents taking a crash point every 5 s (the default) would load the two
    // cores the drill is timed on: once each holds an uploaded point, they idle.
    let (st, v) = cp.api(
        "PATCH",
        "/v1/policies/default",
        Some(json!({"crash_point_interval_s": 3600.0})),
    );
    ensure!(st == 200, "PATCH /v1/policies/default: {st} {v}");

    eprintln!("recovery-plan: one machine's drill alone (before the plan)");
    let before = one_machine(&cp, &agents, "m00", &rh_dir)?;

    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let (first, second) = names.split_at(names.len() / 2);
    let plan = json!({
        "name": "drill",
        "max_parallel": o.max_parallel,
        "groups": [
            {"name": "first", "machines": first},
            {"name": "second", "machines": second},
        ],
    });
    post(&cp, "/v1/recovery-plans", plan)?;

    eprintln!("recovery-plan: the plan's test failover");
    let what = "the plan's test failover";
    let t = Instant::now();
    let answer = post(
        &cp,
        "/v1/recovery-plans/drill/test-failover",
        json!({"point": "latest", "target": {"kind": "nbd"}}),
    )?;
    let plan_job = job_id(&answer, what)?;
    let up = until(&cp, &plan_job, what, waits_for_cleanup)?;
    let plan_up_s = t.elapsed().as_secs_f64();
    // Outside the timing: every machine's test disk is its source.
    let children = up["params"]["children"]
        .as_object()
        .with_context(|| format!("plan job {plan_job} records no machine jobs: {up}"))?;
    ensure!(
        children.len() == o.machines,
        "plan job {plan_job} ran {} machine jobs for {} machines",
        children.len(),
        o.machines
    );
    let mut checked = 0;
    for (machine, child) in children {
        let child = child
            .as_str()
            .with_context(|| format!("machine {machine}'s job id is {child}"))?;
        checked += check_disks(&cp, child, &agents)?;
    }
    ensure!(
        checked == o.machines,
        "{checked} test disks for {} machines of one disk",
        o.machines
    );

    eprintln!("recovery-plan: the plan's cleanup");
    let t = Instant::now();
    post(
        &cp,
        "/v1/recovery-plans/drill/test-failover-cleanup",
        json!({"verdict": "passed", "notes": "ferry-bench recovery-plan"}),
    )?;
    until(&cp, &plan_job, what, succeeded)?;
    let plan_cleanup_s = t.elapsed().as_secs_f64();
    let host_empty_s = wait_host_empty(&rh_dir)?;

    eprintln!("recovery-plan: one machine's drill alone (after the plan)");
    let last = names.last().context("no machines")?;
    let after = one_machine(&cp, &agents, last, &rh_dir)?;

    Ok(Figures {
        machines: o.machines,
        disk_mib: o.disk_mib,
        max_parallel: o.max_parallel,
        jobs_at_once: o.jobs_at_once(),
        before,
        plan: Drill {
            up_s: plan_up_s,
            cleanup_s: plan_cleanup_s,
        },
        after,
        host_empty_s,
    })
}

pub fn print(f: &Figures) {
    let one = (f.before.total_s() + f.after.total_s()) / 2.0;
    let n = f.machines as f64;
    println!(
        "recovery-plan: {} machines of {} MiB in 2 groups, max_parallel {}, control plane \
         --jobs-at-once {}",
        f.machines, f.disk_mib, f.max_parallel, f.jobs_at_once
    );
    println!(
        "  plan: test failover {:.2} s, cleanup {:.2} s, total {:.2} s ({:.2} s per machine; \
         the recovery host empty {:.2} s after)",
        f.plan.up_s,
        f.plan.cleanup_s,
        f.plan.total_s(),
        f.plan.total_s() / n,
        f.host_empty_s
    );
    for (when, d) in [("before", &f.before), ("after", &f.after)] {
        println!(
            "  one machine alone, {when} the plan: test failover {:.2} s, cleanup {:.2} s, \
             total {:.2} s",
            d.up_s,
            d.cleanup_s,
            d.total_s()
        );
    }
    println!(
        "recovery-plan: {} machines took {:.2}x one machine's drill ({:.2} s, mean of both); \
         {} drills in a row would be {:.0} s: the plan took {:.2} of that",
        f.machines,
        f.plan.total_s() / one.max(1e-9),
        one,
        f.machines,
        one * n,
        f.plan.total_s() / (one * n).max(1e-9)
    );
}
