//! The ingest benchmark's load: simulated agents spread over threads, each thread with
//! its own compio runtime and, when asked, its own CPUs, so that the load generator is
//! not what limits a server with many shards. Each thread drives its agents through
//! three phases the bench's main thread paces: load (writes at the asked rate), drain
//! (every write uploaded), and, once the server's figures are taken, verification of
//! each disk against its model.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_link::client::Target;
use ferry_replica::{Store, VaultKey};
use ferry_testkit::sim::{verify, SimDisk};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

use crate::sample::CHUNK;

#[derive(Clone, Copy)]
pub struct Load {
    pub agents: usize,
    pub disk_bytes: usize,
    pub block: usize,
    /// Total MB/s to offer; None: as fast as the server takes it.
    pub rate: Option<f64>,
    pub seconds: f64,
    pub shards: usize,
    /// Threads of the load generator, agents dealt round-robin.
    pub threads: usize,
    /// Every agent takes a crash-consistent point this often.
    pub point_interval_s: f64,
}

/// CPUs for the server and for the load generator's threads (thread t on
/// `load[t % len]`), so that they do not take time from each other.
#[derive(Clone, Debug)]
pub struct Pin {
    pub server: Vec<usize>,
    pub load: Vec<usize>,
}

/// Binds the calling thread, or a child between fork and exec, to `cpus`. Allocates
/// nothing, so it is safe between fork and exec.
pub fn bind(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data, zeroed is its empty set; CPU_SET stays inside
    // it for any CPU below CPU_SETSIZE (checked); sched_setaffinity reads it only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if c >= libc::CPU_SETSIZE as usize {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it; CPU_ISSET reads
    // within it for indices below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

enum Report {
    Loaded {
        bytes: u64,
        hist: Histogram<u64>,
        rpo: Histogram<u64>,
    },
    Drained,
    Failed(String),
}

/// The load threads, between phases.
pub struct Drive {
    /// When the load began.
    pub start: Instant,
    reports: mpsc::Receiver<Report>,
    /// Set once the main thread has its figures: true to verify, false to give up.
    go: Arc<(Mutex<Option<bool>>, Condvar)>,
    threads: Vec<JoinHandle<Result<usize, String>>>,
}

/// What the agents sent, the ack latency they saw, and the RPO: the age of each
/// disk's newest uploaded point at random moments (microseconds).
pub struct Loaded {
    pub bytes: u64,
    pub hist: Histogram<u64>,
    pub rpo: Histogram<u64>,
}

impl Drive {
    /// Starts `load.threads` threads (at least one, at most one per agent), each with
    /// its share of the agents. Their load starts at once, at `Drive::start`.
    pub fn start(
        load: Load,
        target: &Target,
        sample: Arc<Vec<Vec<u8>>>,
        cpus: Option<&[usize]>,
        store: Arc<Store>,
        vault: Arc<VaultKey>,
    ) -> Result<Drive> {
        let mut noise = vec![0u8; 8 << 20];
        rand::thread_rng().fill(&mut noise[..]);
        let noise = Arc::new(noise);
        let start = Instant::now();
        let (tx, reports) = mpsc::channel();
        let go = Arc::new((Mutex::new(None), Condvar::new()));
        let n = load.threads.clamp(1, load.agents.max(1));
        let mut threads = Vec::new();
        for t in 0..n {
            let mine: Vec<usize> = (t..load.agents).step_by(n).collect();
            let cpu = cpus.filter(|c| !c.is_empty()).map(|c| c[t % c.len()]);
            let (target, sample, noise) = (target.clone(), sample.clone(), noise.clone());
            let (tx, go, store, vault) = (tx.clone(), go.clone(), store.clone(), vault.clone());
            let h = std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || {
                    if let Some(c) = cpu {
                        bind(&[c]).map_err(|e| format!("bind a load thread to CPU {c}: {e}"))?;
                    }
                    let rt = compio::runtime::Runtime::new().map_err(|e| e.to_string())?;
                    let run = rt.block_on(agents(&mine, &target, sample, noise, load, start, &tx));
                    let sims = match run {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Report::Failed(e.clone()));
                            return Err(e);
                        }
                    };
                    let (lock, cv) = &*go;
                    let mut verdict = lock.lock().expect("go lock");
                    while verdict.is_none() {
                        verdict = cv.wait(verdict).expect("go lock");
                    }
                    if *verdict != Some(true) {
                        return Ok(0);
                    }
                    drop(verdict);
                    for s in &sims {
                        verify(&store, &vault, s).map_err(|e| format!("verify: {e}"))?;
                    }
                    Ok(sims.len())
                })
                .context("start a load thread")?;
            threads.push(h);
        }
        Ok(Drive {
            start,
            reports,
            go,
            threads,
        })
    }

    fn next(&self) -> Result<Report> {
        match self.reports.recv() {
            Ok(Report::Failed(e)) => bail!("{e}"),
            Ok(r) => Ok(r),
            Err(_) => bail!("a load thread ended without a report"),
        }
    }

    /// Waits until every agent has sent its share and seen it acknowledged.
    pub fn loaded(&self) -> Result<Loaded> {
        let mut all = Loaded {
            bytes: 0,
            hist: histogram(),
            rpo: histogram(),
        };
        for _ in 0..self.threads.len() {
            match self.next()? {
                Report::Loaded { bytes, hist, rpo } => {
                    all.bytes += bytes;
                    all.hist.add(&hist).context("merge latency histograms")?;
                    all.rpo.add(&rpo).context("merge RPO histograms")?;
                }
                _ => bail!("a load thread reported out of order"),
            }
        }
        Ok(all)
    }

    /// Waits until every write of every agent is uploaded.
    pub fn drained(&self) -> Result<()> {
        for _ in 0..self.threads.len() {
            if !matches!(self.next()?, Report::Drained) {
                bail!("a load thread reported out of order");
            }
        }
        Ok(())
    }

    /// Lets the threads check their disks against the store; the number checked.
    pub fn verify(mut self) -> Result<usize> {
        self.release(true);
        let mut disks = 0;
        for h in std::mem::take(&mut self.threads) {
            match h.join() {
                Ok(Ok(n)) => disks += n,
                Ok(Err(e)) => bail!("{e}"),
                Err(_) => bail!("a load thread panicked"),
            }
        }
        Ok(disks)
    }

    fn release(&self, verify: bool) {
        let (lock, cv) = &*self.go;
        lock.lock().expect("go lock").get_or_insert(verify);
        cv.notify_all();
    }
}

impl Drop for Drive {
    fn drop(&mut self) {
        // Given up (an error): threads still waiting end without verifying.
        self.release(false);
    }
}

/// One thread's agents: load, report, drain (all at once: an agent left waiting its
/// turn would sit idle past the timeout), report.
async fn agents(
    mine: &[usize],
    target: &Target,
    sample: Arc<Vec<Vec<u8>>>,
    noise: Arc<Vec<u8>>,
    load: Load,
    start: Instant,
    tx: &mpsc::Sender<Report>,
) -> Result<Vec<SimDisk>, String> {
    let hist = Rc::new(RefCell::new(histogram()));
    let rpo = Rc::new(RefCell::new(histogram()));
    let tasks: Vec<_> = mine
        .iter()
        .map(|&i| {
            compio::runtime::spawn(agent(
                i,
                target.clone(),
                sample.clone(),
                noise.clone(),
                load,
                start,
                hist.clone(),
                rpo.clone(),
            ))
        })
        .collect();
    let sims = joined(tasks).await?;
    let bytes = sims.iter().map(|s| s.bytes).sum();
    let hist = hist.replace(histogram());
    let rpo = rpo.replace(histogram());
    let _ = tx.send(Report::Loaded { bytes, hist, rpo });
    let tasks: Vec<_> = sims
        .into_iter()
        .map(|mut s| {
            let t = target.clone();
            compio::runtime::spawn(async move {
                s.finish(&t, Duration::from_secs(300)).await.map(|_| s)
            })
        })
        .collect();
    let out = joined(tasks).await?;
    let _ = tx.send(Report::Drained);
    Ok(out)
}

/// Every agent task's result, in order; the first error ends it.
async fn joined<T, E>(
    tasks: Vec<impl std::future::Future<Output = Result<Result<T, String>, E>>>,
) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(
            t.await
                .map_err(|_| "an agent task panicked".to_string())??,
        );
    }
    Ok(out)
}

/// One agent: its mix, its pace, its model.
#[allow(clippy::too_many_arguments)]
async fn agent(
    i: usize,
    target: Target,
    sample: Arc<Vec<Vec<u8>>>,
    noise: Arc<Vec<u8>>,
    load: Load,
    start: Instant,
    hist: Rc<RefCell<Histogram<u64>>>,
    rpo: Rc<RefCell<Histogram<u64>>>,
) -> Result<SimDisk, String> {
    // Spread connection set-up over the first moments, as a fleet would.
    compio::time::sleep(Duration::from_micros(2000 * i as u64 % 2_000_000)).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
    let mut sim = SimDisk::new("agent-0", &format!("d{i}"), load.disk_bytes, false);
    sim.latency = Some(Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"));
    let blocks = load.disk_bytes / load.block;
    let sequential = i.is_multiple_of(2);
    let mut next = 0usize;
    let keep = (4 << 20).min(load.block * 16);
    let per_agent = load.rate.map(|r| r * 1e6 / load.agents as f64);
    let deadline = start + Duration::from_secs_f64(load.seconds);
    let mut last_point = Instant::now();
    let interval = Duration::from_secs_f64(load.point_interval_s);
    let mut age = PointAge::new(i as u64);
    let mut sent = 0f64;
    while Instant::now() < deadline {
        // At full load, writes go out in groups as fast as credit allows; paced, each
        // write goes out when it is due, as an application's would.
        let group = if per_agent.is_some() { 1 } else { 16 };
        for _ in 0..group {
            let b = if sequential {
                next = (next + 1) % blocks;
                next
            } else {
                rng.gen_range(0..blocks)
            };
            let off = b * load.block;
            match rng.gen_range(0..10) {
                0 => sim.write(off as u64, &vec![0; load.block]),
                1 => {
                    let at = rng.gen_range(0..noise.len() - load.block);
                    sim.write(off as u64, &noise[at..at + load.block]);
                }
                _ => {
                    let c = &sample[(off / CHUNK + i) % sample.len()];
                    let at = off % CHUNK;
                    let at = at.min(CHUNK - load.block);
                    sim.write(off as u64, &c[at..at + load.block]);
                }
            }
            sent += load.block as f64;
        }
        if let Some(r) = per_agent {
            sim.send_pending(&target).await?;
            if sim.journal_bytes() > keep {
                sim.pump_until(&target, Duration::from_secs(60), keep)
                    .await?;
            }
            sim.take_acks_until(start + Duration::from_secs_f64(sent / r))
                .await;
        }
        if last_point.elapsed() >= interval {
            last_point = Instant::now();
            age.taken(sim.next_seq, last_point);
            sim.bookmark(chrono_ms());
        }
        age.sample(sim.uploaded(), &mut rpo.borrow_mut());
        if per_agent.is_none() {
            sim.pump_until(&target, Duration::from_secs(60), keep)
                .await?;
        }
    }
    sim.bookmark(chrono_ms());
    sim.pump(&target, Duration::from_secs(60)).await?;
    if let Some(h) = sim.latency.take() {
        let _ = hist.borrow_mut().add(&h);
    }
    Ok(sim)
}

/// The age of a disk's newest uploaded point, sampled at random moments: what a
/// failover at that moment would lose, the RPO.
struct PointAge {
    /// (sequence number, when taken) of the points not superseded by a newer uploaded
    /// one, oldest first.
    points: std::collections::VecDeque<(u64, Instant)>,
    /// The highest upload watermark seen (a reconnect's new link starts lower).
    uploaded: u64,
    next_sample: Instant,
    rng: rand::rngs::StdRng,
}

impl PointAge {
    fn new(seed: u64) -> PointAge {
        PointAge {
            points: Default::default(),
            uploaded: 0,
            next_sample: Instant::now(),
            rng: rand::rngs::StdRng::seed_from_u64(seed ^ 0x0052_504f),
        }
    }

    fn taken(&mut self, seq: u64, at: Instant) {
        self.points.push_back((seq, at));
    }

    /// Records the age if a sample is due; samples are 0 to 100 ms apart, at random,
    /// so that they do not beat with the point interval. Nothing is recorded before
    /// the first point is uploaded.
    fn sample(&mut self, uploaded: u64, into: &mut Histogram<u64>) {
        self.uploaded = self.uploaded.max(uploaded);
        let now = Instant::now();
        if now < self.next_sample {
            return;
        }
        self.next_sample = now + Duration::from_micros(self.rng.gen_range(0..100_000));
        // A point is uploaded once every frame up to its bookmark is: seq < uploaded.
        while self.points.len() > 1 && self.points[1].0 < self.uploaded {
            self.points.pop_front();
        }
        if let Some(&(seq, at)) = self.points.front() {
            if seq < self.uploaded {
                let _ = into.record(now.duration_since(at).as_micros() as u64);
            }
        }
    }
}

fn chrono_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_age_is_that_of_the_newest_point_whose_bookmark_is_uploaded() {
        let mut age = PointAge::new(1);
        let mut h = histogram();
        let t0 = Instant::now() - Duration::from_secs(3);
        let t1 = Instant::now() - Duration::from_secs(1);
        age.taken(10, t0);
        age.taken(20, t1);
        // Nothing uploaded past the first bookmark: no point to recover, no sample.
        age.sample(10, &mut h);
        assert_eq!(h.len(), 0);
        age.next_sample = Instant::now();
        age.sample(15, &mut h);
        assert_eq!(h.len(), 1);
        assert!(h.max() >= 3_000_000 && h.max() < 3_500_000, "{}", h.max());
        // The second point uploaded too: the age drops to its.
        age.next_sample = Instant::now();
        h.reset();
        age.sample(21, &mut h);
        assert!(h.max() >= 1_000_000 && h.max() < 1_500_000, "{}", h.max());
        // A reconnect's link starts from a lower watermark: what was seen stands.
        age.next_sample = Instant::now();
        h.reset();
        age.sample(0, &mut h);
        assert!(h.max() >= 1_000_000, "{}", h.max());
    }
}
