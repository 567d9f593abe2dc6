//! The group channel accepts only the group's own machines: certificates of the
//! deployment's CA that name another machine are refused by the coordinator (a
//! member that is not the one it was told of) and by a member (a coordinator that is
//! not its own), and a line past the bound is cut off. No process server is needed:
//! a cut journals its points whether or not the journal drains.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_agent::live::group::{
    Coordinator, GroupPeer, GroupTls, LINE_MAX_BYTES, MEMBER_CONNECTIONS_MAX,
};
use ferry_agent::live::{Agent, DiskSpec, Options};
use ferry_link::client::Target;
use ferry_link::tls::certs::{client_config, generate_loopback, server_name};

const SIZE: u64 = 1 << 20;

struct Site {
    dir: tempfile::TempDir,
    /// Where no process server listens: the agents journal and retry.
    nowhere: SocketAddr,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        // agent-0 coordinates, agent-1 is its member, agent-2 an agent of the same CA
        // outside the group.
        generate_loopback(&dir.path().join("pki"), 3).unwrap();
        let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        Site { dir, nowhere }
    }

    fn pki(&self, f: &str) -> std::path::PathBuf {
        self.dir.path().join("pki").join(f)
    }

    fn tls(&self, i: usize) -> GroupTls {
        GroupTls::load(
            &self.pki(&format!("agent-{i}.pem")),
            &self.pki(&format!("agent-{i}.key")),
            &self.pki("ca.pem"),
        )
        .unwrap()
    }

    /// Agent `i` in group g1: a member of agent-0 when `listen` is given.
    fn agent(&self, i: usize, listen: Option<SocketAddr>) -> Arc<Agent> {
        let disk = self.dir.path().join(format!("disk{i}.img"));
        std::fs::write(&disk, vec![0u8; SIZE as usize]).unwrap();
        Agent::start(Options {
            machine: format!("agent-{i}"),
            disks: vec![DiskSpec {
                name: "sda".into(),
                path: disk,
            }],
            target: Target {
                addr: self.nowhere,
                server_name: server_name("127.0.0.1").unwrap(),
                tls: Arc::new(
                    client_config(
                        &self.pki(&format!("agent-{i}.pem")),
                        &self.pki(&format!("agent-{i}.key")),
                        &self.pki("ca.pem"),
                    )
                    .unwrap(),
                ),
                timeout: Duration::from_secs(1),
            },
            nbd_listen: "127.0.0.1:0".parse().unwrap(),
            journal_dir: self.dir.path().join(format!("journal{i}")),
            journal_bytes: 16 << 20,
            crash_point_interval: None,
            freeze_hook: None,
            admin_socket: None,
            initial_copy: false,
            group: Some("g1".into()),
            group_listen: listen,
            group_coordinator: listen.map(|_| "agent-0".into()),
            group_peers: Vec::new(),
            group_tls: Some(self.tls(i)),
        })
        .unwrap()
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A cut from a coordinator with certificate `cert_of` that believes the member at
/// `addr` is machine `name`.
fn cut(
    w: &Site,
    coord: &Agent,
    cert_of: usize,
    name: &str,
    addr: SocketAddr,
) -> Result<String, String> {
    let peer = GroupPeer {
        name: name.into(),
        addr,
    };
    let mut c = Coordinator::new("g1".into(), vec![peer], w.tls(cert_of).coordinator);
    c.cut(coord).map(|(id, _)| id)
}

#[test]
fn only_the_machines_named_on_each_side_may_cut() {
    let w = Site::new();
    let member_addr = free_addr();
    let member = w.agent(1, Some(member_addr));
    let coord = w.agent(0, None);
    let last = || member.status()[0]["last_point"].clone();

    // The group as configured cuts.
    let id = cut(&w, &coord, 0, "agent-1", member_addr).unwrap();
    assert_eq!(last(), id.as_str(), "the member journaled the group point");

    // agent-2 has a certificate of the same CA but is not the member's coordinator:
    // the member refuses it, names why, and holds nothing.
    let e = cut(&w, &coord, 2, "agent-1", member_addr).unwrap_err();
    assert!(
        e.contains("refused: the certificate does not name this group's coordinator agent-0"),
        "{e}"
    );
    assert_eq!(last(), id.as_str(), "a stranger of the same CA cut a point");

    // The coordinator told the member at that address is agent-2 refuses agent-1's
    // certificate there: it is not the machine it meant.
    let e = cut(&w, &coord, 0, "agent-2", member_addr).unwrap_err();
    assert!(e.contains("does not name agent-2"), "{e}");
    assert_eq!(last(), id.as_str());

    // And the right pair still cuts afterwards.
    let id2 = cut(&w, &coord, 0, "agent-1", member_addr).unwrap();
    assert_eq!(last(), id2.as_str());
    coord.stop();
    member.stop();
}

#[test]
fn a_member_cuts_off_a_line_past_the_bound() {
    let w = Site::new();
    let member_addr = free_addr();
    let member = w.agent(1, Some(member_addr));
    let coord = w.agent(0, None);

    // Even the coordinator itself: a line without end is not buffered without end.
    let name = rustls_pki_types::ServerName::try_from("agent-1").unwrap();
    let conn = rustls::ClientConnection::new(w.tls(0).coordinator, name).unwrap();
    let sock = TcpStream::connect(member_addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let started = Instant::now();
    let endless = vec![b'x'; 1024];
    let mut sent = 0;
    let cut_off = loop {
        // The member closes once it has read past the bound; a write into a closed
        // connection fails a little later.
        if let Err(e) = tls.write_all(&endless).and_then(|_| tls.flush()) {
            break e;
        }
        sent += endless.len();
        if sent > 4 * LINE_MAX_BYTES {
            let mut b = [0u8; 64];
            match tls.read(&mut b) {
                Ok(0) => break std::io::Error::other("closed"),
                Ok(n) => panic!("the member answered an unfinished line: {:?}", &b[..n]),
                Err(e) => break e,
            }
        }
        assert!(sent < 64 << 20, "the member took 64 MiB of one line");
    };
    assert!(
        !matches!(
            cut_off.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "the member kept reading a line of {sent} bytes: {cut_off}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // The member goes on serving its coordinator.
    let id = cut(&w, &coord, 0, "agent-1", member_addr).unwrap();
    assert_eq!(member.status()[0]["last_point"], id.as_str());
    coord.stop();
    member.stop();
}

/// Strangers that connect and never finish their handshake hold at most
/// MEMBER_CONNECTIONS_MAX of a member's threads: one more connection is closed at
/// once, and when they go the coordinator cuts again.
#[test]
fn a_member_serves_a_bounded_number_of_connections() {
    let w = Site::new();
    let member_addr = free_addr();
    let member = w.agent(1, Some(member_addr));
    let coord = w.agent(0, None);
    let idle: Vec<TcpStream> = (0..MEMBER_CONNECTIONS_MAX)
        .map(|_| TcpStream::connect(member_addr).unwrap())
        .collect();
    let mut extra = TcpStream::connect(member_addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let asked = Instant::now();
    let mut b = [0u8; 16];
    match extra.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("one connection past the bound was kept: {other:?}"),
    }
    assert!(asked.elapsed() < Duration::from_secs(2));
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        match cut(&w, &coord, 0, "agent-1", member_addr) {
            Ok(id) => break id,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(member.status()[0]["last_point"], id.as_str());
    coord.stop();
    member.stop();
}

#[test]
fn a_member_must_be_told_its_coordinator() {
    let w = Site::new();
    let disk = w.dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; SIZE as usize]).unwrap();
    let peer = GroupPeer::parse("agent-1@127.0.0.1:20004").unwrap();
    assert_eq!(peer.name, "agent-1");
    assert_eq!(peer.addr, "127.0.0.1:20004".parse().unwrap());
    for bad in ["127.0.0.1:20004", "agent-1@nowhere", "bad name@127.0.0.1:1"] {
        let e = GroupPeer::parse(bad).unwrap_err();
        assert!(e.contains(bad), "{e}");
    }
    let o = Options {
        machine: "agent-1".into(),
        disks: vec![DiskSpec {
            name: "sda".into(),
            path: disk,
        }],
        target: Target {
            addr: w.nowhere,
            server_name: server_name("127.0.0.1").unwrap(),
            tls: Arc::new(
                client_config(
                    &w.pki("agent-1.pem"),
                    &w.pki("agent-1.key"),
                    &w.pki("ca.pem"),
                )
                .unwrap(),
            ),
            timeout: Duration::from_secs(1),
        },
        nbd_listen: "127.0.0.1:0".parse().unwrap(),
        journal_dir: w.dir.path().join("journal"),
        journal_bytes: 16 << 20,
        crash_point_interval: None,
        freeze_hook: None,
        admin_socket: None,
        initial_copy: false,
        group: Some("g1".into()),
        group_listen: Some(free_addr()),
        group_coordinator: None,
        group_peers: Vec::new(),
        group_tls: Some(w.tls(1)),
    };
    let e = Agent::start(o).err().unwrap();
    assert!(e.to_string().contains("--group-coordinator"), "{e}");
}
