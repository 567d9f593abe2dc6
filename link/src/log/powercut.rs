//! Power cuts, modelled. The cache log reports every change it makes to its files
//! (`note!` in log.rs, in tests only); a model follows them and knows, for each file,
//! what a sync made durable and what is only in the page cache, and which names the
//! last directory sync made durable. After every operation the test builds states a
//! power cut at that moment could leave — the durable part, plus any subset of the
//! writes and size changes since each file's last sync (a write whole, any part of it
//! or not at all: page writeback has no order), plus a prefix of the name changes since the
//! last directory sync (a journalling file system commits them in order) — recovers a
//! log from each and checks that every acknowledged record not yet released is there,
//! in order, and that nothing else is but records really appended.
//!
//! Seeded and replayable: `FERRY_SEED=n` runs one seed.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{DurableLog, LogError, Position};

/// A change the log made to its directory.
pub(crate) enum Op<'a> {
    /// A new, empty file.
    Create(&'a Path),
    /// `a` then `b` written at an offset.
    Write(&'a File, u64, &'a [u8], &'a [u8]),
    SetLen(&'a File, u64),
    /// fsync or fdatasync of a file: its data and size are durable.
    Sync(&'a File),
    /// fsync of the directory: its names are durable.
    SyncDir,
    Rename(&'a Path, &'a Path),
    Remove(&'a Path),
}

/// A file change not yet synced.
#[derive(Clone)]
enum Change {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Change>,
}

/// A name change not yet made durable by a directory sync.
enum Meta {
    Link(String, u64),
    Rename(String, String),
    Unlink(String),
}

fn write_at(data: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let end = offset as usize + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset as usize..end].copy_from_slice(bytes);
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn ino(f: &File) -> u64 {
    f.metadata().unwrap().ino()
}

impl Inode {
    /// The file's content after a power cut: its durable part and some of the rest.
    fn after_cut(&self, rng: &mut StdRng) -> Vec<u8> {
        let mut data = self.durable.clone();
        for c in &self.pending {
            match (c, rng.gen_range(0..3)) {
                (_, 0) => {}
                (Change::Write(off, bytes), 1) => write_at(&mut data, *off, bytes),
                (Change::Write(off, bytes), _) => {
                    // Pages reach the disk in any order: any part of the write.
                    let from = rng.gen_range(0..=bytes.len());
                    let to = rng.gen_range(from..=bytes.len());
                    write_at(&mut data, *off + from as u64, &bytes[from..to]);
                }
                (Change::SetLen(len), _) => data.resize(*len as usize, 0),
            }
        }
        data
    }
}

#[derive(Default)]
struct Model {
    dir: PathBuf,
    /// Files by the model's own number: a file system may give a new file the inode
    /// number of one removed whose name a cut could still bring back.
    inodes: HashMap<u64, Inode>,
    /// The inode number a live file has now -> the model's number for it.
    ids: HashMap<u64, u64>,
    live: BTreeMap<String, u64>,
    durable: BTreeMap<String, u64>,
    pending: Vec<Meta>,
}

impl Model {
    fn apply(&mut self, op: &Op<'_>) {
        match op {
            Op::Create(p) => {
                let i = self.inodes.len() as u64;
                self.ids.insert(fs::metadata(p).unwrap().ino(), i);
                self.inodes.insert(i, Inode::default());
                self.live.insert(name(p), i);
                self.pending.push(Meta::Link(name(p), i));
            }
            Op::Write(f, off, a, b) => {
                let bytes = [*a, *b].concat();
                let node = self.node(f);
                write_at(&mut node.live, *off, &bytes);
                node.pending.push(Change::Write(*off, bytes));
            }
            Op::SetLen(f, len) => {
                let node = self.node(f);
                node.live.resize(*len as usize, 0);
                node.pending.push(Change::SetLen(*len));
            }
            Op::Sync(f) => {
                let node = self.node(f);
                node.durable = node.live.clone();
                node.pending.clear();
            }
            Op::SyncDir => {
                self.durable = self.live.clone();
                self.pending.clear();
            }
            Op::Rename(from, to) => {
                let i = self
                    .live
                    .remove(&name(from))
                    .expect("renaming a known name");
                self.live.insert(name(to), i);
                self.pending.push(Meta::Rename(name(from), name(to)));
            }
            Op::Remove(p) => {
                self.live.remove(&name(p)).expect("removing a known name");
                self.pending.push(Meta::Unlink(name(p)));
            }
        }
    }

    fn node(&mut self, f: &File) -> &mut Inode {
        let i = self.ids[&ino(f)];
        self.inodes.get_mut(&i).expect("a file the model knows")
    }

    fn describe(&self, op: &Op<'_>) -> String {
        let of = |f: &File| {
            let i = self.ids.get(&ino(f)).copied().unwrap_or(u64::MAX);
            let n: Vec<&String> = self
                .live
                .iter()
                .filter(|(_, j)| **j == i)
                .map(|(n, _)| n)
                .collect();
            format!("{n:?}")
        };
        match op {
            Op::Create(p) => format!("create {}", name(p)),
            Op::Write(f, off, a, b) => {
                format!("write {} at {off}, {} bytes", of(f), a.len() + b.len())
            }
            Op::SetLen(f, len) => format!("set_len {} {len}", of(f)),
            Op::Sync(f) => format!("sync {}", of(f)),
            Op::SyncDir => "sync dir".into(),
            Op::Rename(a, b) => format!("rename {} {}", name(a), name(b)),
            Op::Remove(p) => format!("remove {}", name(p)),
        }
    }

    /// The model must see every change: its live files are the directory's.
    fn matches_disk(&self) {
        let mut real = BTreeMap::new();
        for e in fs::read_dir(&self.dir).unwrap() {
            let e = e.unwrap();
            real.insert(
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            );
        }
        let model: BTreeMap<String, Vec<u8>> = self
            .live
            .iter()
            .map(|(n, i)| (n.clone(), self.inodes[i].live.clone()))
            .collect();
        assert!(
            real == model,
            "the model missed a change: names {:?} on disk, {:?} in the model",
            real.keys().collect::<Vec<_>>(),
            model.keys().collect::<Vec<_>>()
        );
    }

    /// One state a power cut now could leave: file name -> content.
    fn after_cut(&self, rng: &mut StdRng) -> BTreeMap<String, Vec<u8>> {
        let mut names = self.durable.clone();
        let done = rng.gen_range(0..=self.pending.len());
        for m in &self.pending[..done] {
            match m {
                Meta::Link(n, i) => {
                    names.insert(n.clone(), *i);
                }
                Meta::Rename(from, to) => {
                    if let Some(i) = names.remove(from) {
                        names.insert(to.clone(), i);
                    }
                }
                Meta::Unlink(n) => {
                    names.remove(n);
                }
            }
        }
        names
            .into_iter()
            .map(|(n, i)| (n, self.inodes[&i].after_cut(rng)))
            .collect()
    }
}

/// What the test has appended and what the log has promised.
#[derive(Default)]
struct Expect {
    /// Every record appended (id = index; the payload starts with it), where it went.
    records: Vec<(String, Vec<u8>, Position)>,
    /// The record being appended, which a cut may or may not keep.
    appending: Option<(String, Vec<u8>)>,
    /// Records below this index were acknowledged: a sync returned after them.
    acked: usize,
    /// Records in files numbered below this may be gone: released (uploaded).
    kept_from: u64,
    /// Records a restart did not read back (never acknowledged: a kill before their
    /// sync): the agent sends them again, they are not this log's any more.
    forgotten: std::collections::HashSet<usize>,
}

impl Expect {
    fn id(payload: &[u8]) -> usize {
        u64::from_le_bytes(payload[..8].try_into().unwrap()) as usize
    }

    /// Checks what a recovery read back.
    fn check(&self, got: &Records) -> Result<(), String> {
        let mut last = None;
        for (disk, payload) in got {
            let id = Self::id(payload);
            let real = match self.records.get(id) {
                Some((d, p, _)) => (d, p),
                None => match &self.appending {
                    Some((d, p)) if id == self.records.len() => (d, p),
                    _ => return Err(format!("record {id} was never appended")),
                },
            };
            if (real.0, real.1) != (disk, payload) {
                return Err(format!("record {id} reads back different"));
            }
            if last.is_some_and(|l| l >= id) {
                return Err(format!("record {id} comes after {last:?}"));
            }
            last = Some(id);
        }
        let found: std::collections::HashSet<usize> =
            got.iter().map(|(_, p)| Self::id(p)).collect();
        for (id, (_, _, at)) in self.records[..self.acked].iter().enumerate() {
            if at.file >= self.kept_from && !found.contains(&id) && !self.forgotten.contains(&id) {
                return Err(format!(
                    "acknowledged record {id} (file {}, offset {}) is lost",
                    at.file, at.offset
                ));
            }
        }
        Ok(())
    }
}

const FILE_BYTES: u64 = 4096;
const TOTAL_BYTES: u64 = 6 * FILE_BYTES;
const CUTS_PER_OP: usize = 2;

struct Tracer {
    model: Model,
    rng: StdRng,
    expect: Rc<RefCell<Expect>>,
    scratch: PathBuf,
    recycle: bool,
    cuts: usize,
    /// The latest operations, for the report of a failure.
    history: std::collections::VecDeque<String>,
}

thread_local! {
    static TRACER: RefCell<Option<Tracer>> = const { RefCell::new(None) };
}

/// Called by the log after each change (tests only).
pub(crate) fn note(op: Op<'_>) {
    // Out of its cell while it works: the recoveries it runs must not be traced.
    let Some(mut t) = TRACER.with(|c| c.borrow_mut().take()) else {
        return;
    };
    if t.history.len() == 40 {
        t.history.pop_front();
    }
    t.history.push_back(t.model.describe(&op));
    t.model.apply(&op);
    t.model.matches_disk();
    for _ in 0..CUTS_PER_OP {
        t.cut();
    }
    TRACER.with(|c| *c.borrow_mut() = Some(t));
}

/// Records read back: (disk, payload).
type Records = Vec<(String, Vec<u8>)>;

/// Opens a log in `dir`, returning what it read back.
fn recover(dir: &Path, recycle: bool) -> Result<(DurableLog, Records), LogError> {
    let mut got = Vec::new();
    let (log, _) = DurableLog::open_each(dir, FILE_BYTES, TOTAL_BYTES, recycle, |r| {
        got.push((r.disk.to_string(), r.payload.to_vec()))
    })?;
    Ok((log, got))
}

impl Tracer {
    fn cut(&mut self) {
        let files = self.model.after_cut(&mut self.rng);
        let _ = fs::remove_dir_all(&self.scratch);
        fs::create_dir_all(&self.scratch).unwrap();
        for (n, data) in &files {
            fs::write(self.scratch.join(n), data).unwrap();
        }
        self.cuts += 1;
        let verdict = recover(&self.scratch, self.recycle)
            .map_err(|e| format!("recovery refused: {e}"))
            .and_then(|(_, got)| self.expect.borrow().check(&got));
        if let Err(e) = verdict {
            let listing: Vec<(&String, usize)> = files.iter().map(|(n, d)| (n, d.len())).collect();
            panic!(
                "after a power cut ({} cuts in): {e}; files {listing:?}; durable names {:?}; the latest operations:\n{}",
                self.cuts,
                self.model.durable.keys().collect::<Vec<_>>(),
                self.history.iter().cloned().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

fn scratch_base() -> tempfile::TempDir {
    // tmpfs when there is one: the recoveries sync every file they open.
    match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").unwrap(),
        false => tempfile::tempdir().unwrap(),
    }
}

/// A random run of appends, group commits, releases and restarts (kill -9: the page
/// cache survives), cut by power at every operation.
fn run(seed: u64, recycle: bool, steps: usize) {
    eprintln!("FERRY_SEED={seed} recycle={recycle}");
    let base = scratch_base();
    let dir = base.path().join("live");
    fs::create_dir_all(&dir).unwrap();
    let expect = Rc::new(RefCell::new(Expect::default()));
    TRACER.with(|c| {
        *c.borrow_mut() = Some(Tracer {
            model: Model {
                dir: dir.clone(),
                ..Model::default()
            },
            rng: StdRng::seed_from_u64(seed ^ 0x9e37_79b9),
            expect: expect.clone(),
            scratch: base.path().join("cut"),
            recycle,
            cuts: 0,
            history: Default::default(),
        })
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let reopen = |expect: &RefCell<Expect>| {
        let (log, got) = recover(&dir, recycle).unwrap();
        let mut e = expect.borrow_mut();
        e.check(&got).unwrap();
        // Recovery synced what it read: all of it is durable now; what it did not
        // read was never acknowledged, and is gone.
        let found: std::collections::HashSet<usize> =
            got.iter().map(|(_, p)| Expect::id(p)).collect();
        for id in 0..e.records.len() {
            if !found.contains(&id) {
                e.forgotten.insert(id);
            }
        }
        e.acked = e.records.len();
        log
    };
    let mut log = reopen(&expect);
    let disks = ["m1/a", "m1/b", "m2/a"];
    for _ in 0..steps {
        match rng.gen_range(0..20) {
            0..=10 => {
                let id = expect.borrow().records.len() as u64;
                let mut payload = id.to_le_bytes().to_vec();
                let more = rng.gen_range(0..900);
                payload.extend((0..more).map(|_| rng.gen::<u8>()));
                let disk = disks[rng.gen_range(0..disks.len())].to_string();
                expect.borrow_mut().appending = Some((disk.clone(), payload.clone()));
                let done = log.append(&disk, &payload);
                let mut e = expect.borrow_mut();
                e.appending = None;
                match done {
                    Ok(at) => e.records.push((disk, payload, at)),
                    Err(LogError::Full { .. }) => {}
                    Err(err) => panic!("append: {err}"),
                }
            }
            11..=15 => {
                log.sync().unwrap();
                let mut e = expect.borrow_mut();
                e.acked = e.records.len();
            }
            16..=18 => {
                // The process server's upload stage releases up to a record it read
                // behind the synced end. The agent's sender reads appends before they
                // are synced, so the process server may acknowledge them (and the
                // agent release them) first: without recycling, up to any record.
                let e = expect.borrow();
                let (end, appended) = (log.end_position(), e.records.len());
                let may = if recycle { e.acked } else { appended };
                let upto = match may {
                    0 => continue,
                    n if n == appended && rng.gen_bool(0.3) => end,
                    n => e.records[rng.gen_range(0..n)].2,
                };
                drop(e);
                // During the release, whatever it may free may vanish.
                expect.borrow_mut().kept_from = match upto >= end {
                    true => u64::MAX,
                    false => upto.file,
                };
                log.release_before(upto).unwrap();
                expect.borrow_mut().kept_from = log.first_position().file;
            }
            _ => {
                drop(log);
                log = reopen(&expect);
            }
        }
    }
    TRACER.with(|c| c.borrow_mut().take());
}

fn seeds() -> Vec<u64> {
    match std::env::var("FERRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => (0..8).map(|i| 0x5eed_0000 + i).collect(),
    }
}

#[test]
fn a_power_cut_at_any_moment_loses_no_acknowledged_record_recycling() {
    for seed in seeds() {
        run(seed, true, 400);
    }
}

#[test]
fn a_power_cut_at_any_moment_loses_no_acknowledged_record_without_recycling() {
    for seed in seeds() {
        run(seed, false, 400);
    }
}
