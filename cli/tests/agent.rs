//! `ferry agent` and `ferry process-server` as real processes, with qemu-io writing
//! through the agent's NBD export. The agent is killed with SIGKILL in the middle of a
//! batch and restarted: it does not copy the disk again, sends only what its journal
//! had not delivered (counted at the process server), and every point, before and
//! after the kill, fails over to exactly the disk as it was when the point was taken.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::cli;
use ferry_testkit::process::{run_ok, spawn, spawn_logging, Killed};
use ferry_testkit::qemu::random_writes;
use ferry_testkit::wait_ok;
use rand::{Rng, SeedableRng};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const SIZE: u64 = 16 << 20;

fn ferry(args: &[&str]) -> String {
    run_ok(Path::new(FERRY), args)
}

/// The server's received-bytes counter. Shards publish their counters every 250 ms:
/// wait past that first (the interval is the server's behaviour; no condition tells
/// that the counter caught up).
fn bytes_in(metrics: &str) -> u64 {
    std::thread::sleep(Duration::from_millis(600));
    let mut c = std::net::TcpStream::connect(metrics).unwrap();
    write!(c, "GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("ferry_bytes_in_total "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn status(sock: &Path) -> serde_json::Value {
    cli::status(Path::new(FERRY), sock)
}

/// `n` random pattern writes of 4 KiB to 128 KiB through qemu-io.
fn qemu_io(url: &str, rng: &mut impl Rng, n: usize) {
    ferry_testkit::qemu::qemu_io(url, &random_writes(rng, SIZE, n, 1..=32));
}

fn wait_uploaded(sock: &Path) {
    cli::wait_uploaded(Path::new(FERRY), sock)
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// `dir` and every directory under it are 0700, every log file (the journal's and the
/// cache's, which hold disk data) 0600; it holds some.
fn assert_private(dir: &Path) {
    let mut files = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "log") {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
                files += 1;
            }
        }
    }
    assert!(files > 0, "nothing in {}", dir.display());
}

/// A process server's arguments for the PKI, key and store under `d`.
fn server_args(d: &Path, listen: &str) -> Vec<String> {
    cli::server_args(d, listen, "0.5")
}

/// An agent whose certificate does not name its machine is refused by the process
/// server at every retry: the text status says why, and the log says it once.
#[test]
fn a_refused_agent_says_why_in_status_and_once_in_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cli::site(Path::new(FERRY), d, 1);
    let (_server, line) = spawn(Path::new(FERRY), &server_args(d, "127.0.0.1:0"));
    let addr = cli::server_addr(&line);

    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = d.join("admin.sock");
    let log = d.join("agent.log");
    // agent-0's certificate names agent-0, not web1.
    let mut args = cli::agent_args(
        d,
        &addr,
        "web1",
        "agent-0",
        &format!("sda={}", disk.display()),
        "127.0.0.1:0",
    );
    args.extend(["--admin-socket".to_string(), sock.display().to_string()]);
    let started = std::time::Instant::now();
    let (agent, line) = spawn_logging(
        Path::new(FERRY),
        &args,
        std::fs::File::create(&log).unwrap().into(),
    );
    assert!(line.contains("serving NBD"), "{line}");
    let why = "refused by the process server: the client certificate does not name machine web1";
    let sock_arg = sock.display().to_string();
    let text = wait_ok("status says why", Duration::from_secs(30), || {
        let text = ferry(&["agent", "ctl", "--admin-socket", &sock_arg, "status"]);
        if text.contains(why) {
            Ok(text)
        } else {
            Err(text)
        }
    });
    // Under the disk's line, which says "disconnected" and no more.
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("disconnected") && lines[1].starts_with("  sda: refused"),
        "{text}"
    );
    // Retries back off from 50 ms to 2 s: by 4 s the agent has been refused at least
    // five times (the passing of time is what is tested).
    std::thread::sleep(Duration::from_secs(4).saturating_sub(started.elapsed()));
    let s = status(&sock);
    assert_eq!(s["connected"], false, "{s}");
    drop(agent);
    let logged = std::fs::read_to_string(&log).unwrap();
    let refusals: Vec<&str> = logged.lines().filter(|l| l.contains(why)).collect();
    assert_eq!(refusals.len(), 1, "the refusal is logged once: {logged}");
    assert!(refusals[0].contains("WARN"), "{logged}");
}

#[test]
fn sigkill_of_the_agent_resends_only_what_was_not_delivered() {
    let seed = ferry_testkit::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |s: &str| d.join(s).display().to_string();
    let store = cli::site(Path::new(FERRY), d, 1);
    // A fixed port: the server is restarted on it later in the test.
    let listen = ferry_testkit::net::free_addr().to_string();
    let server_args = server_args(d, &listen);
    let (server, line) = spawn(Path::new(FERRY), &server_args);
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = words[4].to_string();
    let metrics = line
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();

    let disk = d.join("disk.img");
    let mut content = vec![0u8; SIZE as usize];
    rng.fill(&mut content[..4 << 20]);
    std::fs::write(&disk, &content).unwrap();
    let nbd_port = ferry_testkit::net::free_port();
    let sock = d.join("admin.sock");
    let mut agent_args = cli::agent_args(
        d,
        &addr,
        "agent-0",
        "agent-0",
        &format!("sda={}", disk.display()),
        &format!("127.0.0.1:{nbd_port}"),
    );
    agent_args.extend(
        ["--crash-point-interval-s", "0", "--admin-socket"]
            .iter()
            .map(|s| s.to_string()),
    );
    agent_args.push(sock.display().to_string());
    let (mut agent, line) = spawn(Path::new(FERRY), &agent_args);
    assert!(line.contains("serving NBD"), "{line}");
    let url = format!("nbd://127.0.0.1:{nbd_port}/sda");

    wait_uploaded(&sock);
    // What holds disk data in the clear is its owner's only: the journal and the
    // cache, their directories, and the admin socket that takes points.
    assert_private(&d.join("journal"));
    assert_private(&d.join("cache"));
    assert_eq!(mode(&sock), 0o600);
    // A second agent on the same admin socket is refused before it opens a journal,
    // and the first one's socket stays.
    let second = Command::new(FERRY).args(&agent_args).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "admin socket {}: another agent is running",
            sock.display()
        )),
        "{err}"
    );
    status(&sock);
    // A client that connects and says nothing holds the admin socket (answered one
    // connection at a time) only until the read timeout, not for ever.
    let silent = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let asked = Instant::now();
    let mut ctl = Killed(
        Command::new(FERRY)
            .args(["agent", "ctl", "--admin-socket"])
            .arg(&sock)
            .arg("status")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let answered = loop {
        if let Some(st) = ctl.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "a silent admin client stalls the admin socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(answered.success(), "{answered}");
    drop(silent);
    let copied = bytes_in(&metrics);
    assert!(
        copied >= 4 << 20,
        "the initial copy sent the disk's data: {copied}"
    );
    qemu_io(&url, &mut rng, 30);
    let bm = |label: &str| cli::bookmark(Path::new(FERRY), &sock, label);
    let id1 = bm("before");
    eprintln!("point before the agent's kill: {id1}");
    let disk1 = std::fs::read(&disk).unwrap();
    wait_uploaded(&sock);
    let before_kill = bytes_in(&metrics);

    // Writes, then SIGKILL while the journal may still hold some of them.
    qemu_io(&url, &mut rng, 30);
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    drop(agent);
    let (agent, line) = spawn(Path::new(FERRY), &agent_args);
    assert!(line.contains("serving NBD"), "{line}");
    let s = status(&sock);
    assert_eq!(s["copy_total_bytes"], 0, "no second initial copy: {s}");
    qemu_io(&url, &mut rng, 30);
    let id2 = bm("after");
    eprintln!("point after the agent's restart: {id2}");
    let disk2 = std::fs::read(&disk).unwrap();
    wait_uploaded(&sock);
    let after = bytes_in(&metrics);
    // Two batches of at most 30 x 128 KiB, plus frame headers and the reconciled region.
    let resent = after - before_kill;
    eprintln!(
        "initial copy {copied} bytes; after the kill {resent} bytes for two batches of writes"
    );
    assert!(
        resent <= 2 * 30 * (128 << 10) + (1 << 20),
        "resent {resent} bytes: more than the dirty part"
    );

    // The process server is killed and restarted on the same port: the agent resumes
    // from the last acknowledged sequence, nothing lost, nothing applied twice.
    qemu_io(&url, &mut rng, 20);
    drop(server);
    qemu_io(&url, &mut rng, 20);
    let (server, line) = spawn(Path::new(FERRY), &server_args);
    assert!(line.contains("listening"), "{line}");
    let id3 = bm("server-restarted");
    eprintln!("point after the server's restart: {id3}");
    let disk3 = std::fs::read(&disk).unwrap();
    wait_uploaded(&sock);

    // Asked for, a checksum resync of a disk the replica matches sends nothing.
    let out = ferry(&[
        "agent",
        "ctl",
        "--admin-socket",
        &sock.display().to_string(),
        "resync",
    ]);
    assert!(out.contains("checksum resync started: sda"), "{out}");
    let s = wait_ok("the resync to finish", Duration::from_secs(60), || {
        let s = status(&sock);
        if s["mode"] != "checksum-resync" {
            Ok(s)
        } else {
            Err(s)
        }
    });
    assert_eq!(s["last_resync"]["compared_bytes"], SIZE, "{s}");
    assert_eq!(s["last_resync"]["sent_bytes"], 0, "{s}");

    for (id, want) in [(&id1, &disk1), (&id2, &disk2), (&id3, &disk3)] {
        let out = d.join(format!("out-{id}"));
        ferry(&[
            "failover",
            "--store",
            &store,
            "--key-file",
            &p("vault.key"),
            "--machine",
            "agent-0",
            "--point",
            id,
            "--out",
            &out.display().to_string(),
        ]);
        assert_eq!(mode(&out.join("sda.raw")), 0o600);
        let got = std::fs::read(out.join("sda.raw")).unwrap();
        let first = got.iter().zip(want.iter()).position(|(a, b)| a != b);
        assert!(
            got == *want,
            "point {id} does not rebuild the disk as it was: first difference at {first:?} of {}",
            want.len()
        );
    }
    // SIGTERM stops the agent in order: every disk flushed and its run marker removed,
    // so its next start need not compare the disk with the replica.
    assert!(
        d.join("journal/running").exists(),
        "a running agent keeps its marker"
    );
    // Not the `kill` program: a fresh machine need not have procps.
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
    let sent = unsafe { libc::kill(agent.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0, "{}", std::io::Error::last_os_error());
    let mut agent = agent;
    let exit = agent.0.wait().unwrap();
    assert!(
        exit.success(),
        "the agent stops in order on SIGTERM: {exit}"
    );
    assert!(
        !d.join("journal/running").exists(),
        "an ordered stop leaves no marker"
    );
    drop(server);
}

/// Refused at the command line, before anything is created: disk names against the
/// store's rule (one would escape --journal-dir), and an admin socket path holding
/// something that is not a stale socket.
#[test]
fn the_agent_refuses_bad_disk_names_and_foreign_files_at_its_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |s: &str| d.join(s).display().to_string();
    ferry(&["certs", "--out", &p("pki"), "--agents", "1"]);
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let journal = d.join("work/journal");
    let run = |disk_arg: &str, admin: Option<&Path>| {
        let mut args: Vec<String> = [
            "agent",
            "--process-server",
            "127.0.0.1:9",
            "--machine",
            "agent-0",
            disk_arg,
            "--nbd-listen",
            "127.0.0.1:0",
            "--journal-dir",
            &journal.display().to_string(),
            "--tls-cert",
            &p("pki/agent-0.pem"),
            "--tls-key",
            &p("pki/agent-0.key"),
            "--ca",
            &p("pki/ca.pem"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(a) = admin {
            args.extend(["--admin-socket".to_string(), a.display().to_string()]);
        }
        let out = Command::new(FERRY).args(&args).output().unwrap();
        assert!(!out.status.success(), "ferry {args:?} started");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let rule =
        "1 to 64 characters of letters, digits, '.', '_' and '-', not starting with '.' or '-'";
    for name in ["../x", "-x", ".x", "a/b", ""] {
        let err = run(&format!("--disk={name}={}", disk.display()), None);
        assert!(
            err.contains(&format!("invalid disk name {name:?}")),
            "{err}"
        );
        assert!(err.contains(rule), "{err}");
    }
    assert!(
        !d.join("work").exists(),
        "nothing is created for a refused name"
    );

    let sock = d.join("admin.sock");
    std::fs::write(&sock, b"someone's file").unwrap();
    let err = run(&format!("--disk=sda={}", disk.display()), Some(&sock));
    assert!(
        err.contains(&format!(
            "admin socket {}: a regular file is there, not a socket; refusing to remove it",
            sock.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(&sock).unwrap(), b"someone's file");
    assert!(!journal.exists(), "refused before the journal is touched");
}
