//! The NBD export against real clients: qemu-nbd lists it, qemu-io writes, zeroes,
//! discards and reads patterns through it (with and without FUA), qemu-img reads its
//! size and compares its content with a reference built here, and a recording device
//! sees every write in the order the client issued them. Bad requests get error replies, not a crash.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ferry_agent::nbd::{serve, Device, Exports, FileDevice};
use ferry_testkit::qemu::qemu_io;

const SIZE: u64 = 8 << 20;

/// A file device that records what it was asked to do.
struct Recording {
    inner: FileDevice,
    log: Mutex<Vec<String>>,
}

impl Device for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, o: u64, b: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(o, b)
    }
    fn write(&self, o: u64, d: &[u8], fua: bool) -> std::io::Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("write {o} {} fua={fua}", d.len()));
        self.inner.write(o, d, fua)
    }
    fn zero(&self, o: u64, l: u64, fua: bool) -> std::io::Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("zero {o} {l} fua={fua}"));
        self.inner.zero(o, l, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.log.lock().unwrap().push("flush".into());
        self.inner.flush()
    }
}

fn disk(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
}

#[test]
fn qemu_clients_read_and_write_through_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    disk(&path);
    let rec = Arc::new(Recording {
        inner: FileDevice::open(&path).unwrap(),
        log: Mutex::new(Vec::new()),
    });
    let mut exports = Exports::default();
    exports.add("disk0", rec.clone());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    std::thread::spawn(move || serve(listener, Arc::new(exports), s2));
    let url = format!("nbd://127.0.0.1:{port}/disk0");

    let out = Command::new("qemu-img")
        .args(["info", "-f", "raw", &url])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{info} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(info.contains("8 MiB"), "{info}");

    // qemu-nbd lists the exports (NBD_OPT_LIST, then NBD_OPT_INFO for each).
    let out = Command::new("qemu-nbd")
        .args(["--list", "--bind", "127.0.0.1", "--port", &port.to_string()])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{list} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        list.contains("export: 'disk0'") && list.contains(&format!("size:  {SIZE}")),
        "{list}"
    );

    qemu_io(
        &url,
        &[
            "write -P 0xab 0 1M",
            "write -f -P 0xcd 1M 64k",
            "write -z 512k 64k",
            "discard 2M 128k",
            "write -P 0x11 3M 4k",
            "flush",
        ],
    );
    qemu_io(
        &url,
        &[
            "read -P 0xab 0 512k",
            "read -P 0 512k 64k",
            "read -P 0xab 576k 448k",
            "read -P 0xcd 1M 64k",
            "read -P 0 2M 128k",
            "read -P 0x11 3M 4k",
        ],
    );
    // The file holds exactly that.
    let mut want = vec![0u8; SIZE as usize];
    want[..1 << 20].fill(0xab);
    want[512 << 10..576 << 10].fill(0);
    want[1 << 20..(1 << 20) + (64 << 10)].fill(0xcd);
    want[3 << 20..(3 << 20) + 4096].fill(0x11);
    let mut got = Vec::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == want, "the disk file differs from what was written");
    let reference = dir.path().join("want.img");
    std::fs::write(&reference, &want).unwrap();
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &url])
        .arg(&reference)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    let log = rec.log.lock().unwrap().clone();
    let writes: Vec<&String> = log.iter().filter(|l| !l.starts_with("flush")).collect();
    assert_eq!(writes[0], "write 0 1048576 fua=false");
    assert_eq!(writes[1], "write 1048576 65536 fua=true");
    assert!(writes[2].starts_with("zero 524288 65536"), "{log:?}");
    assert!(writes[3].starts_with("zero 2097152 131072"), "{log:?}");
    assert_eq!(writes[4], "write 3145728 4096 fua=false");
    assert!(log.iter().any(|l| l == "flush"), "{log:?}");
}

#[test]
fn bad_requests_get_errors_and_the_server_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    disk(&path);
    let mut exports = Exports::default();
    exports.add("d", Arc::new(FileDevice::open(&path).unwrap()));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        serve(
            listener,
            Arc::new(exports),
            Arc::new(AtomicBool::new(false)),
        )
    });

    // A raw client: handshake, GO for an unknown export (error), then for "d".
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    assert_eq!(&greet[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let go = |c: &mut std::net::TcpStream, name: &str| {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&7u32.to_be_bytes());
        m.extend_from_slice(&(d.len() as u32).to_be_bytes());
        m.extend_from_slice(&d);
        c.write_all(&m).unwrap();
    };
    let reply = |c: &mut std::net::TcpStream| -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        c.read_exact(&mut d).unwrap();
        (kind, d)
    };
    go(&mut c, "nope");
    let (kind, msg) = reply(&mut c);
    assert_eq!(kind, (1 << 31) | 6, "unknown export is an error reply");
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    go(&mut c, "d");
    loop {
        let (kind, _) = reply(&mut c);
        if kind == 1 {
            break;
        }
        assert_eq!(kind, 3, "info replies, then ack");
    }
    // A read beyond the end: EINVAL, and the connection goes on.
    let req = |kind: u16, handle: u64, off: u64, len: u32| {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&off.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    };
    c.write_all(&req(0, 1, SIZE - 10, 4096)).unwrap();
    let mut rep = [0u8; 16];
    c.read_exact(&mut rep).unwrap();
    assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 22);
    c.write_all(&req(0, 2, 0, 4096)).unwrap();
    c.read_exact(&mut rep).unwrap();
    assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 0);
    let mut data = vec![0u8; 4096];
    c.read_exact(&mut data).unwrap();
    // A write far beyond the request limit: an error reply, then the server closes.
    c.write_all(&req(1, 3, 0, u32::MAX)).unwrap();
    c.read_exact(&mut rep).unwrap();
    assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 75);
    assert_eq!(c.read(&mut rep).unwrap_or(0), 0, "closed");
    // The server still serves others.
    let url = format!("nbd://{addr}/d");
    qemu_io(&url, &["write -P 0x5a 0 4k", "read -P 0x5a 0 4k"]);
}

/// A server that is already serving gains and loses exports (the recovery host's one
/// listener): a new export answers at once, a removed one is refused to new clients,
/// and the others are untouched.
#[test]
fn exports_come_and_go_while_the_server_serves() {
    use ferry_agent::nbd::client::Client;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    disk(&a);
    disk(&b);
    let mut exports = Exports::default();
    exports.add("m1/a", Arc::new(FileDevice::open(&a).unwrap()));
    let exports = Arc::new(exports);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (e2, s2) = (exports.clone(), stop.clone());
    std::thread::spawn(move || serve(listener, e2, s2));

    assert!(
        Client::connect(addr, "m2/b").is_err(),
        "m2/b before it exists"
    );
    assert!(exports.insert("m2/b", Arc::new(FileDevice::open(&b).unwrap())));
    // A name taken is not replaced behind its clients' backs.
    assert!(!exports.insert("m2/b", Arc::new(FileDevice::open(&a).unwrap())));
    let mut c = Client::connect(addr, "m2/b").unwrap();
    c.write(4096, &[0x5a; 512]).unwrap();
    let mut back = [0u8; 512];
    c.read(4096, &mut back).unwrap();
    assert_eq!(back, [0x5a; 512]);
    c.disconnect().unwrap();
    assert_eq!(
        exports.names(),
        vec!["m1/a".to_string(), "m2/b".to_string()]
    );

    assert!(exports.remove("m2/b"));
    assert!(!exports.remove("m2/b"));
    assert!(!exports.contains("m2/b"));
    assert!(Client::connect(addr, "m2/b").is_err(), "m2/b after removal");
    let mut c = Client::connect(addr, "m1/a").unwrap();
    c.read(0, &mut back).unwrap();
    c.disconnect().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// A device that refuses every write as a failed-over disk does (read-only), every
/// zeroing as a preparing one does (held), and fails every read.
struct Refusing;

impl Device for Refusing {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("the disk is gone"))
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::ReadOnlyFilesystem,
            "disk sda is read-only: the machine failed over",
        ))
    }
    fn zero(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::ResourceBusy,
            "disk sda: writes are held",
        ))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log lines written through one `tracing` subscriber, kept in memory.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A guest retrying writes on a read-only or held disk gets an error reply every
/// time, over one connection or a new connection each time (qemu-io in a loop), but
/// the log says so once per export and kind of refusal (WARN, with the device's
/// reason, then at most once a minute); other failures are still logged at ERROR each
/// time.
#[test]
fn refused_writes_are_errors_but_logged_once() {
    let mut exports = Exports::default();
    exports.add("d", Arc::new(Refusing));
    // The client's side, all at once: flags (no zeroes), the export by name, then
    // 5 writes, 3 write-zeroes, 2 reads, and a disconnect.
    let mut input = 3u32.to_be_bytes().to_vec();
    input.extend_from_slice(b"IHAVEOPT");
    input.extend_from_slice(&1u32.to_be_bytes());
    input.extend_from_slice(&1u32.to_be_bytes());
    input.extend_from_slice(b"d");
    let req = |input: &mut Vec<u8>, kind: u16, handle: u64, len: u32| {
        input.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        input.extend_from_slice(&0u16.to_be_bytes());
        input.extend_from_slice(&kind.to_be_bytes());
        input.extend_from_slice(&handle.to_be_bytes());
        input.extend_from_slice(&0u64.to_be_bytes());
        input.extend_from_slice(&len.to_be_bytes());
    };
    let mut handle = 0;
    let mut sent = Vec::new();
    for (kind, n) in [(1u16, 5), (6, 3), (0, 2)] {
        for _ in 0..n {
            handle += 1;
            req(&mut input, kind, handle, 4096);
            if kind == 1 {
                input.extend_from_slice(&[0x5a; 4096]);
            }
            sent.push(handle);
        }
    }
    req(&mut input, 2, 99, 0);

    let log = LogBuf::default();
    let to = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || to.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // Three connections, one after the other, as a polling client makes them.
    let connections = 3;
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..connections {
            let mut output = Vec::new();
            ferry_agent::nbd::server::session(
                &mut std::io::Cursor::new(input.clone()),
                &mut output,
                &exports,
            )
            .unwrap();
            // Greeting (18 bytes), export reply (size and flags, no zeroes: 10),
            // then one simple reply of 16 bytes per request, each an error.
            // The two reads run at once (agent/src/nbd/transmit.rs), so their replies
            // may come in either order: matched by handle.
            let replies = &output[28..];
            assert_eq!(replies.len(), 16 * sent.len(), "one reply per request");
            let mut got: Vec<(u64, u32)> = replies
                .chunks(16)
                .map(|r| {
                    (
                        u64::from_be_bytes(r[8..16].try_into().unwrap()),
                        u32::from_be_bytes(r[4..8].try_into().unwrap()),
                    )
                })
                .collect();
            got.sort_unstable();
            assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), sent);
            for (h, err) in got {
                assert_ne!(err, 0, "request {h} was refused, its reply must say so");
            }
        }
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines = |what: &str| text.lines().filter(|l| l.contains(what)).count();
    assert_eq!(
        lines("NBD write refused"),
        2,
        "one per kind of refusal: {text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(" WARN ") && l.contains("read-only: the machine failed over"))
            .count(),
        1,
        "{text}"
    );
    assert_eq!(lines("writes are held"), 1, "{text}");
    assert_eq!(
        lines("NBD request failed"),
        2 * connections,
        "other errors as before: {text}"
    );
}

/// A file device that counts reads running at once, notes any write that starts
/// while a read runs, and holds each read until `gate` reads are inside together
/// (or 5 s pass: then the read fails, so a server that serialises reads fails the
/// test instead of hanging it).
struct Concurrent {
    inner: FileDevice,
    gate: usize,
    state: Mutex<(usize, usize, bool)>, // (inside now, most inside at once, a write overlapped)
    cv: std::sync::Condvar,
}

impl Concurrent {
    fn new(path: &Path, gate: usize) -> Concurrent {
        Concurrent {
            inner: FileDevice::open(path).unwrap(),
            gate,
            state: Mutex::new((0, 0, false)),
            cv: std::sync::Condvar::new(),
        }
    }
}

impl Device for Concurrent {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, o: u64, b: &mut [u8]) -> std::io::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.0 += 1;
        s.1 = s.1.max(s.0);
        self.cv.notify_all();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while s.1 < self.gate {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                s.0 -= 1;
                return Err(std::io::Error::other("reads were not served at once"));
            }
            s = self.cv.wait_timeout(s, left).unwrap().0;
        }
        drop(s);
        // Long enough that a write sent behind the reads would overlap one if the
        // server let it.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let r = self.inner.read(o, b);
        self.state.lock().unwrap().0 -= 1;
        r
    }
    fn write(&self, o: u64, d: &[u8], fua: bool) -> std::io::Result<()> {
        if self.state.lock().unwrap().0 > 0 {
            self.state.lock().unwrap().2 = true;
        }
        self.inner.write(o, d, fua)
    }
    fn zero(&self, o: u64, l: u64, fua: bool) -> std::io::Result<()> {
        self.inner.zero(o, l, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn serving(dev: Arc<dyn Device>) -> std::net::SocketAddr {
    let mut exports = Exports::default();
    exports.add("d", dev);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || serve(listener, Arc::new(exports), stop));
    addr
}

/// A client that keeps four reads in flight gets them served at once (the device
/// holds each read until four are inside), each with its own bytes; and QEMU's
/// asynchronous reads and a write sent behind them: the reads overlap each other,
/// the write never overlaps a read, and every read sees the bytes from before it.
#[test]
fn reads_in_flight_are_served_together_and_writes_wait_for_them() {
    use ferry_agent::nbd::client::Client;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    disk(&path);
    let mut pattern = vec![0u8; SIZE as usize];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (i / 4096) as u8;
    }
    std::fs::write(&path, &pattern).unwrap();

    let dev = Arc::new(Concurrent::new(&path, 4));
    let addr = serving(dev.clone());
    let mut c = Client::connect(addr, "d").unwrap();
    let offsets: Vec<u64> = (0..16).map(|i| i * (256 << 10)).collect();
    let mut seen = Vec::new();
    c.read_pipelined(&offsets, 64 << 10, 4, |o, b| {
        assert_eq!(
            b,
            &pattern[o as usize..o as usize + (64 << 10)],
            "read at {o}"
        );
        seen.push(o);
    })
    .unwrap();
    seen.sort();
    assert_eq!(seen, offsets);
    assert_eq!(
        dev.state.lock().unwrap().1,
        4,
        "four reads at once, no more"
    );
    c.disconnect().unwrap();

    // qemu-io's aio: four reads and a write of new bytes over the first one, sent
    // together; then the first range read again.
    let dev = Arc::new(Concurrent::new(&path, 2));
    let addr = serving(dev.clone());
    let url = format!("nbd://{addr}/d");
    let out = qemu_io(
        &url,
        &[
            "aio_read -P 0 0 4k",
            "aio_read -P 16 64k 4k",
            "aio_read -P 32 128k 4k",
            "aio_read -P 48 192k 4k",
            "aio_write -P 0xee 0 4k",
            "aio_flush",
            "read -P 0xee 0 4k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");
    let s = dev.state.lock().unwrap();
    assert!(s.1 >= 2, "QEMU's reads were served together: {out}");
    assert!(!s.2, "a write ran while a read did");
}
