//! A simulated agent for tests and benchmarks: a model of one disk, a journal of
//! frames not yet acknowledged durable, and recovery points with the model's content
//! at each. `pump` drives the journal through a `Link`, reconnecting and resending from
//! the server's durable watermark after any failure, exactly as the agent must.
//! `verify` rebuilds every point from the store and compares it with the model.
//!
//! Errors are text: a test prints them, and a failed link call maps through its
//! Display whatever the link's error type.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_replica::rebuild::{rebuild, rebuild_point, DiskSink};
use ferry_replica::{Disk, Store, VaultKey};

use ferry_link::client::{connect, credit_cost, Link, Target};
use ferry_link::protocol::{encode, Bookmark, Frame, Hello, PointKindWire, VERSION};

/// Frames gathered into one send.
const BATCH_BYTES: usize = 256 << 10;

pub struct SimDisk {
    pub machine: String,
    pub disk: String,
    pub model: Vec<u8>,
    /// Point id -> the model when it was taken (kept only if `keep_points`).
    pub points: BTreeMap<String, Vec<u8>>,
    pub keep_points: bool,
    /// (sequence, encoded frame, credit it costs), oldest first.
    journal: VecDeque<(u64, Vec<u8>, u64)>,
    /// Journal frames before this index have been sent on the current link.
    sent: usize,
    pub next_seq: u64,
    session: [u8; 16],
    link: Option<Link>,
    /// Connections made (the first and every reconnect).
    pub connects: u64,
    /// Payload bytes of writes pushed.
    pub bytes: u64,
    /// Encoded bytes in the journal.
    journal_bytes: usize,
    /// (last sequence of a sent batch, when it was sent), for ack latency.
    in_flight: VecDeque<(u64, Instant)>,
    /// Microseconds from sending a batch to its durable acknowledgement, if wanted.
    pub latency: Option<hdrhistogram::Histogram<u64>>,
}

impl SimDisk {
    pub fn new(machine: &str, disk: &str, size: usize, keep_points: bool) -> SimDisk {
        SimDisk {
            machine: machine.into(),
            disk: disk.into(),
            model: vec![0; size],
            points: BTreeMap::new(),
            keep_points,
            journal: VecDeque::new(),
            sent: 0,
            next_seq: 0,
            session: rand::random(),
            link: None,
            connects: 0,
            bytes: 0,
            journal_bytes: 0,
            in_flight: VecDeque::new(),
            latency: None,
        }
    }

    fn push(&mut self, f: &Frame<'_>) {
        let mut buf = Vec::new();
        encode(f, &mut buf);
        self.journal_bytes += buf.len();
        self.journal.push_back((self.next_seq, buf, credit_cost(f)));
        self.next_seq += 1;
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.model[o..o + data.len()].copy_from_slice(data);
        self.bytes += data.len() as u64;
        let seq = self.next_seq;
        self.push(&Frame::Write { seq, offset, data });
    }

    pub fn zero(&mut self, offset: u64, len: u64) {
        self.model[offset as usize..(offset + len) as usize].fill(0);
        let seq = self.next_seq;
        self.push(&Frame::Zero { seq, offset, len });
    }

    /// The disk grows (or shrinks) to `bytes`, as across an agent restart: the next
    /// session's Hello announces the new size.
    pub fn resize(&mut self, bytes: usize) {
        self.model.resize(bytes, 0);
        self.link = None;
    }

    /// Takes a crash-consistent point; returns its id.
    pub fn bookmark(&mut self, time_ms: i64) -> String {
        let seq = self.next_seq;
        let id = format!("p{seq:08}");
        if self.keep_points {
            self.points.insert(id.clone(), self.model.clone());
        } else {
            self.points.insert(id.clone(), Vec::new());
        }
        self.push(&Frame::Bookmark(Bookmark {
            seq,
            kind: PointKindWire::Crash,
            time_ms,
            id: &id,
            group: "",
            label: "",
            disk_bytes: Some(self.model.len() as u64),
        }));
        id
    }

    /// Every frame below this sequence number is in the store, as the process server
    /// last said on the current link (0 without one).
    pub fn uploaded(&self) -> u64 {
        self.link.as_ref().map_or(0, |l| l.uploaded())
    }

    /// Bytes of frames waiting for an acknowledgement.
    pub fn journal_bytes(&self) -> usize {
        self.journal_bytes
    }

    fn trim(&mut self, durable: u64) {
        while self.journal.front().is_some_and(|j| j.0 < durable) {
            if let Some(j) = self.journal.pop_front() {
                self.journal_bytes -= j.1.len();
            }
            self.sent = self.sent.saturating_sub(1);
        }
        while self.in_flight.front().is_some_and(|f| f.0 < durable) {
            let (_, at) = self.in_flight.pop_front().expect("checked");
            if let Some(h) = &mut self.latency {
                let _ = h.record((at.elapsed().as_micros() as u64).max(1));
            }
        }
    }

    async fn reconnect(&mut self, target: &Target) -> Result<(), String> {
        self.link = None;
        let hello = Hello {
            version: VERSION,
            machine: &self.machine,
            disk: &self.disk,
            session: self.session,
            journal_from: self.journal.front().map_or(self.next_seq, |j| j.0),
            next_seq: self.next_seq,
            disk_bytes: self.model.len() as u64,
        };
        let link = connect(target, &hello).await.map_err(|e| e.to_string())?;
        self.connects += 1;
        self.trim(link.welcome.durable);
        self.in_flight.clear();
        self.sent = 0;
        self.link = Some(link);
        Ok(())
    }

    /// Sends the journal until every frame in it is durable, reconnecting as needed
    /// for up to `patience` without progress.
    pub async fn pump(&mut self, target: &Target, patience: Duration) -> Result<(), String> {
        self.pump_until(target, patience, 0).await
    }

    /// Like `pump`, but returns once no more than `keep` bytes await acknowledgement:
    /// a load generator keeps the pipe full this way.
    pub async fn pump_until(
        &mut self,
        target: &Target,
        patience: Duration,
        keep: usize,
    ) -> Result<(), String> {
        let mut last_progress = Instant::now();
        let mut last_err = String::new();
        while !self.journal.is_empty() && self.journal_bytes > keep {
            if last_progress.elapsed() > patience {
                return Err(format!(
                    "{}/{}: no progress for {patience:?}: {last_err}",
                    self.machine, self.disk
                ));
            }
            if self.link.as_ref().is_none_or(|l| l.closed().is_some()) {
                if let Err(e) = self.reconnect(target).await {
                    last_err = e;
                    compio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
            let r = self.send_some().await;
            if let Err(e) = r {
                last_err = e;
                self.link = None;
                continue;
            }
            let before = self.journal.len();
            let link = self.link.as_ref().expect("connected above");
            // Wake on the first acknowledgement that frees enough of the journal.
            let want = match keep {
                0 => self.journal.back().map_or(0, |j| j.0 + 1),
                _ => self.journal.front().map_or(0, |j| j.0 + 1),
            };
            let _ = compio::time::timeout(Duration::from_millis(20), link.wait_durable(want)).await;
            let durable = link.durable();
            self.trim(durable);
            if self.journal.len() != before {
                last_progress = Instant::now();
            }
        }
        Ok(())
    }

    /// Sends what is not yet sent and takes in acknowledgements so far, without
    /// waiting for them: a paced agent sends each write as it happens this way.
    pub async fn send_pending(&mut self, target: &Target) -> Result<(), String> {
        if self.link.as_ref().is_none_or(|l| l.closed().is_some()) {
            self.reconnect(target).await?;
        }
        if let Err(e) = self.send_some().await {
            self.link = None;
            return Err(e);
        }
        let durable = self.link.as_ref().map_or(0, |l| l.durable());
        self.trim(durable);
        Ok(())
    }

    /// Takes in acknowledgements as they arrive until `until`: a paced agent between
    /// two writes. Latency is recorded when an ack arrives, not when the agent next
    /// looks, as a real sender's reader task would see it.
    pub async fn take_acks_until(&mut self, until: Instant) {
        loop {
            let now = Instant::now();
            let Some(&(seq, _)) = self.in_flight.front() else {
                break;
            };
            let Some(link) = self.link.as_ref().filter(|l| l.closed().is_none()) else {
                break;
            };
            if now >= until {
                return;
            }
            let _ = compio::time::timeout(until - now, link.wait_durable(seq + 1)).await;
            let durable = link.durable();
            self.trim(durable);
        }
        let now = Instant::now();
        if until > now {
            compio::time::sleep(until - now).await;
        }
    }

    /// Sends unsent journal frames in batches as credit allows.
    async fn send_some(&mut self) -> Result<(), String> {
        let link = self.link.as_mut().expect("connected");
        let mut batch = Vec::with_capacity(BATCH_BYTES);
        while self.sent < self.journal.len() {
            batch.clear();
            let mut cost = 0;
            while let Some((_, f, c)) = self.journal.get(self.sent) {
                if !batch.is_empty() && batch.len() + f.len() > BATCH_BYTES {
                    break;
                }
                batch.extend_from_slice(f);
                cost += c;
                self.sent += 1;
            }
            link.send(&batch, cost).await.map_err(|e| e.to_string())?;
            if let Some(&(seq, _, _)) = self.journal.get(self.sent - 1) {
                self.in_flight.push_back((seq, Instant::now()));
            }
        }
        Ok(())
    }

    /// Waits until everything sent is in blob storage, then says bye.
    pub async fn finish(&mut self, target: &Target, patience: Duration) -> Result<(), String> {
        self.settle(target, patience).await?;
        if let Some(l) = self.link.take() {
            let _ = l.bye().await;
        }
        Ok(())
    }

    /// Waits until everything sent is in blob storage; the session stays open.
    pub async fn settle(&mut self, target: &Target, patience: Duration) -> Result<(), String> {
        self.pump(target, patience).await?;
        let deadline = Instant::now() + patience;
        loop {
            if self.link.as_ref().is_none_or(|l| l.closed().is_some()) {
                self.reconnect(target).await?;
            }
            let link = self.link.as_mut().expect("connected");
            match compio::time::timeout(
                Duration::from_secs(1),
                link.wait_uploaded(self.next_seq, Duration::from_millis(50)),
            )
            .await
            {
                Ok(Ok(())) => break,
                Ok(Err(e)) if Instant::now() > deadline => return Err(e.to_string()),
                Err(_) if Instant::now() > deadline => {
                    return Err(format!(
                        "{}/{}: not uploaded in time",
                        self.machine, self.disk
                    ))
                }
                Ok(Err(_)) => self.link = None,
                Err(_) => {}
            }
        }
        Ok(())
    }
}

/// A disk image in memory, for rebuilds in tests.
pub struct MemSink(pub Mutex<Vec<u8>>);

impl DiskSink for MemSink {
    fn write_at(&self, d: &[u8], o: u64) -> std::io::Result<()> {
        self.0.lock().expect("sink lock")[o as usize..o as usize + d.len()].copy_from_slice(d);
        Ok(())
    }
    fn zero(&self, o: u64, l: u64) -> std::io::Result<()> {
        self.0.lock().expect("sink lock")[o as usize..(o + l) as usize].fill(0);
        Ok(())
    }
}

/// Rebuilds the disk's latest state and every kept point from the store and compares
/// them with the model. Returns the number of points checked.
pub fn verify(store: &Store, vault: &VaultKey, sim: &SimDisk) -> Result<usize, String> {
    let name = format!("{}/{}", sim.machine, sim.disk);
    let disk = store
        .block(Disk::open(store, &sim.machine, &sim.disk, Some(vault)))
        .map_err(|e| format!("{name}: {e}"))?;
    let state = store
        .block(disk.load_state())
        .map_err(|e| format!("{name}: {e}"))?;
    if state.next_seq != sim.next_seq {
        return Err(format!(
            "{name}: the replica holds writes below {}, the agent sent below {}",
            state.next_seq, sim.next_seq
        ));
    }
    let sink = MemSink(Mutex::new(vec![0; sim.model.len()]));
    rebuild(
        &disk,
        &state,
        state.next_seq,
        sim.model.len() as u64,
        &sink,
        &|_| {},
    )
    .map_err(|e| format!("{name}: {e}"))?;
    if *sink.0.lock().expect("sink lock") != sim.model {
        return Err(format!("{name}: the rebuilt disk differs from the model"));
    }
    let mut checked = 0;
    for p in &state.points {
        let Some(want) = sim.points.get(&p.id) else {
            return Err(format!("{name}: point {} was never taken", p.id));
        };
        if !sim.keep_points {
            continue;
        }
        let sink = MemSink(Mutex::new(vec![0; p.disk_bytes as usize]));
        rebuild_point(&disk, &state, p, &sink, &|_| {}).map_err(|e| format!("{name}: {e}"))?;
        if *sink.0.lock().expect("sink lock") != *want {
            return Err(format!("{name}: point {} differs from the model", p.id));
        }
        checked += 1;
    }
    if state.points.len() != sim.points.len() {
        return Err(format!(
            "{name}: {} points in the replica, {} taken",
            state.points.len(),
            sim.points.len()
        ));
    }
    Ok(checked)
}
