//! The process server's core without sockets: an agent model sends writes, zeroes and
//! bookmarks through the protocol codec; the server judges them (session), caches them
//! durably (cache log with group commit), acknowledges, uploads them to the replica, and
//! is killed at random moments — losing everything in memory — then restarts from its
//! cache while the agent reconnects and resends what was not acknowledged. In the end,
//! every recovery point rebuilds byte-identical to the agent's model and nothing
//! acknowledged is missing. Seeded: FERRY_SEED=N replays a case.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use ferry_dataplane::server::{Action, Limits, Progress, Session};
use ferry_dataplane::upload::DiskUploader;
use ferry_link::log::{DurableLog, Position};
use ferry_link::protocol::{
    decode, encode, Bookmark, Decoded, Frame, Hello, PointKindWire, VERSION,
};
use ferry_replica::rebuild::{rebuild_point, DiskSink};
use ferry_replica::{Disk, Store, VaultKey};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 2 << 20;
const DISK: &str = "m/d";

struct Agent {
    next_seq: u64,
    /// Frames not yet acknowledged durable, oldest first.
    journal: VecDeque<(u64, Vec<u8>)>,
    model: Vec<u8>,
    points: BTreeMap<String, Vec<u8>>,
    acked: u64,
}

impl Agent {
    fn op(&mut self, rng: &mut impl Rng) {
        let seq = self.next_seq;
        let mut buf = Vec::new();
        match rng.gen_range(0..10) {
            0..=6 => {
                let len = rng.gen_range(1..=32_768u64);
                let off = rng.gen_range(0..SIZE - len);
                let data: Vec<u8> = if rng.gen_bool(0.5) {
                    (0..len).map(|_| rng.gen()).collect()
                } else {
                    vec![rng.gen(); len as usize]
                };
                self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
                encode(
                    &Frame::Write {
                        seq,
                        offset: off,
                        data: &data,
                    },
                    &mut buf,
                );
            }
            7 => {
                let len = rng.gen_range(1..=65_536u64);
                let off = rng.gen_range(0..SIZE - len);
                self.model[off as usize..(off + len) as usize].fill(0);
                encode(
                    &Frame::Zero {
                        seq,
                        offset: off,
                        len,
                    },
                    &mut buf,
                );
            }
            _ => {
                let id = format!("p{seq}");
                self.points.insert(id.clone(), self.model.clone());
                let b = Bookmark {
                    seq,
                    kind: PointKindWire::Crash,
                    time_ms: seq as i64,
                    id: &id,
                    group: "",
                    label: "",
                    disk_bytes: Some(self.model.len() as u64),
                };
                encode(&Frame::Bookmark(b), &mut buf);
            }
        }
        self.journal.push_back((seq, buf));
        self.next_seq += 1;
    }
}

struct Server {
    log: DurableLog,
    uploader: DiskUploader,
    session: Option<Session>,
    /// Cached frames not yet uploaded: (seq, where, bytes).
    cached: Vec<(u64, Position, Vec<u8>)>,
    durable: u64,
}

fn seq_of(f: &Frame<'_>) -> Option<u64> {
    match f {
        Frame::Write { seq, .. } | Frame::Zero { seq, .. } => Some(*seq),
        Frame::Bookmark(b) => Some(b.seq),
        _ => None,
    }
}

impl Server {
    /// Starts (or restarts) from the cache directory and the store.
    fn start(dir: &std::path::Path, store: &Store, vault: &VaultKey) -> Server {
        let (log, recovered) = DurableLog::open(dir, 64 << 10, 64 << 20, true).unwrap();
        let mut uploader = DiskUploader::open(store, vault, "m", "d", None).unwrap();
        uploader.set_disk_bytes(SIZE);
        let mut cached = Vec::new();
        for e in recovered.entries {
            let Ok(Decoded::Frame(f, _)) = decode(&e.payload, 1 << 22) else {
                panic!("cached frame does not decode")
            };
            if let Some(seq) = seq_of(&f) {
                cached.push((seq, e.at, e.payload.clone()));
            }
        }
        let durable = cached
            .last()
            .map_or(0, |c| c.0 + 1)
            .max(uploader.uploaded());
        let mut s = Server {
            log,
            uploader,
            session: None,
            cached,
            durable,
        };
        s.upload();
        s
    }

    fn upload(&mut self) {
        let frames: Vec<Frame<'_>> = self
            .cached
            .iter()
            .map(|(_, _, b)| match decode(b, 1 << 22).unwrap() {
                Decoded::Frame(f, _) => f,
                Decoded::Incomplete(_) => panic!("incomplete cached frame"),
            })
            .collect();
        let uploaded = self.uploader.upload(&frames).unwrap();
        self.cached.retain(|(seq, _, _)| *seq >= uploaded);
        if let Some((_, at, _)) = self.cached.first() {
            self.log.release_before(*at).unwrap();
        }
    }
}

struct Mem(std::sync::Mutex<Vec<u8>>);
impl DiskSink for Mem {
    fn write_at(&self, d: &[u8], o: u64) -> std::io::Result<()> {
        self.0.lock().unwrap()[o as usize..o as usize + d.len()].copy_from_slice(d);
        Ok(())
    }
    fn zero(&self, o: u64, l: u64) -> std::io::Result<()> {
        self.0.lock().unwrap()[o as usize..(o + l) as usize].fill(0);
        Ok(())
    }
}

fn run(seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cache_dir = tempfile::tempdir().unwrap();
    let store =
        Store::with_object_store(Arc::new(object_store::memory::InMemory::new()), "memory://");
    let vault = VaultKey::generate();
    let mut agent = Agent {
        next_seq: 0,
        journal: VecDeque::new(),
        model: vec![0; SIZE as usize],
        points: BTreeMap::new(),
        acked: 0,
    };
    let mut server = Server::start(cache_dir.path(), &store, &vault);
    let mut sent = 0usize; // frames of the journal sent in this session
    for step in 0..400 {
        if server.session.is_none() {
            let hello = Hello {
                version: VERSION,
                machine: "m",
                disk: "d",
                session: [7; 16],
                journal_from: agent.journal.front().map_or(agent.next_seq, |j| j.0),
                next_seq: agent.next_seq,
                disk_bytes: SIZE,
            };
            let progress = Progress {
                durable: server.durable,
                uploaded: server.uploader.uploaded(),
            };
            let (s, w) = Session::start(
                &hello,
                progress,
                Limits {
                    credit_bytes: 1 << 30,
                    max_payload: 1 << 20,
                    ..Limits::default()
                },
                |_, _| true,
            )
            .unwrap_or_else(|r| panic!("seed {seed} step {step}: {}", r.reason));
            assert!(
                w.durable >= agent.acked,
                "seed {seed}: server forgot acknowledged writes"
            );
            agent.acked = w.durable;
            while agent.journal.front().is_some_and(|j| j.0 < w.durable) {
                agent.journal.pop_front();
            }
            // Resend everything still in the journal.
            sent = 0;
            server.session = Some(s);
        }
        for _ in 0..rng.gen_range(0..4) {
            agent.op(&mut rng);
        }
        // Send what is unsent.
        let session = server.session.as_mut().unwrap();
        while sent < agent.journal.len() {
            let bytes = &agent.journal[sent].1;
            let Decoded::Frame(f, _) = decode(bytes, 1 << 22).unwrap() else {
                unreachable!()
            };
            match session
                .on_frame(&f)
                .unwrap_or_else(|r| panic!("seed {seed}: {}", r.reason))
            {
                Action::Cache { seq } => {
                    let at = server.log.append(DISK, bytes).unwrap();
                    server.cached.push((seq, at, bytes.clone()));
                }
                Action::Duplicate => {}
                other => panic!("unexpected {other:?}"),
            }
            sent += 1;
        }
        // Group commit, then acknowledge.
        if rng.gen_bool(0.5) {
            server.log.sync().unwrap();
            server.durable = session.next_seq();
            let (ack, _) = session.durable(server.durable, server.uploader.uploaded());
            if let Some(Frame::Ack { durable, .. }) = ack {
                agent.acked = durable;
                while agent.journal.front().is_some_and(|j| j.0 < durable) {
                    agent.journal.pop_front();
                    sent -= 1;
                }
            }
        }
        if rng.gen_bool(0.2) {
            server.upload();
        }
        // kill -9: memory is gone, the cache files stay (what was written reached the
        // kernel; only a synced prefix was acknowledged).
        if rng.gen_bool(0.05) {
            drop(server);
            server = Server::start(cache_dir.path(), &store, &vault);
        }
    }
    // Drain: a last bookmark, everything acknowledged and uploaded.
    agent.op(&mut rand::rngs::StdRng::seed_from_u64(0));
    let last_id = format!("p{}", agent.next_seq - 1);
    if !agent.points.contains_key(&last_id) {
        let seq = agent.next_seq;
        agent.points.insert(format!("p{seq}"), agent.model.clone());
        let mut buf = Vec::new();
        encode(
            &Frame::Bookmark(Bookmark {
                seq,
                kind: PointKindWire::Crash,
                time_ms: 0,
                id: &format!("p{seq}"),
                group: "",
                label: "",
                disk_bytes: Some(agent.model.len() as u64),
            }),
            &mut buf,
        );
        agent.journal.push_back((seq, buf));
        agent.next_seq += 1;
    }
    let session = server.session.as_mut().unwrap();
    for (i, (_, bytes)) in agent.journal.iter().enumerate() {
        if i < sent {
            continue;
        }
        let Decoded::Frame(f, _) = decode(bytes, 1 << 22).unwrap() else {
            unreachable!()
        };
        if let Action::Cache { seq } = session.on_frame(&f).unwrap() {
            let at = server.log.append(DISK, bytes).unwrap();
            server.cached.push((seq, at, bytes.clone()));
        }
    }
    server.log.sync().unwrap();
    server.upload();
    assert_eq!(
        server.uploader.uploaded(),
        agent.next_seq,
        "seed {seed}: not everything was uploaded"
    );

    let disk = store
        .block(Disk::open(&store, "m", "d", Some(&vault)))
        .unwrap();
    let state = store.block(disk.load_state()).unwrap();
    assert_eq!(
        state.points.len(),
        agent.points.len(),
        "seed {seed}: points"
    );
    for p in &state.points {
        let sink = Mem(std::sync::Mutex::new(vec![0; p.disk_bytes as usize]));
        rebuild_point(&disk, &state, p, &sink, &|_| {}).unwrap();
        assert!(
            *sink.0.lock().unwrap() == agent.points[&p.id],
            "seed {seed}: point {} differs",
            p.id
        );
    }
}

#[test]
fn acknowledged_writes_survive_kills_and_every_point_rebuilds() {
    let seeds: Vec<u64> = match std::env::var("FERRY_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (1..=12).collect(),
    };
    for seed in seeds {
        run(seed);
    }
}
