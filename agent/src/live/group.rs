//! Multi-machine consistency: the agents of a group cut points together. One agent,
//! the coordinator (it has `--group-peer NAME@ADDR`, or a control plane's orders
//! name it and list the members: `group_role.rs`), runs a two-phase cut over lines
//! on mutual TLS (port 20004 by default). Both ends present their agent certificates,
//! checked against the CA, and each checks that the other's names the machine it was
//! told of: the coordinator each member's NAME, a member its `--group-coordinator`.
//! So only the group's own machines can hold a member's writes, not any agent of the
//! deployment.
//!
//! ```text
//! coordinator -> member   prepare GROUP ID
//! member                  holds write completions on every disk (takes the capture locks)
//! member -> coordinator   ready            (or: no REASON)
//! coordinator             holds its own, journals its points, then
//! coordinator -> member   commit ID        (or: abort)
//! member                  journals the point on every disk, releases
//! member -> coordinator   done PAUSE_MICROS
//! ```
//!
//! Every wait is bounded: a member not ready within the prepare timeout makes the
//! coordinator abort (the point is skipped); a member that hears nothing within its
//! hold limit releases on its own. A point some member lacks is never used: failover
//! takes the newest group point that every member of the group holds. Lines are
//! bounded too (`LINE_MAX_BYTES`): a peer that sends an endless line is cut off.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_link::tls::certs::{cert_names, peer_client_config, server_config};
use rustls::{ClientConnection, ServerConnection, StreamOwned};

use super::group_line::{self, Message};
use crate::error::{Error, MachineNameError, Result};

/// What the group channel needs of the agent it runs in, on either end of a cut:
/// whether a point may be taken now, and a point journaled on every disk while their
/// writes are held. The agent implements it (`live/mod.rs`); nothing else of the
/// agent is reached from here.
pub trait GroupSide: Send + Sync {
    /// Why no point may be taken now (an initial copy, a resync), if so.
    fn can_point(&self) -> Result<()>;
    /// Phase one: holds write completions on every disk until the hold is dropped.
    fn hold_writes(&self) -> Box<dyn HeldWrites + '_>;
    /// Records how long writes were held for one cut (reported by the agent).
    fn record_pause(&self, pause: Duration);
    /// The group this agent is a member of now, and its coordinator; None while it
    /// is in none (or coordinates). A control plane's orders may change it at any
    /// heartbeat: it is read at every connection and every cut.
    fn membership(&self) -> Option<Membership>;
    /// The member's end of the group channel's TLS, as loaded now (a renewed
    /// certificate applies to the next connection).
    fn member_tls(&self) -> Option<Arc<rustls::ServerConfig>>;
}

/// A member's place: its group and the machine name its coordinator's certificate
/// must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub group: String,
    pub coordinator: String,
}

/// Every disk's writes, held (see `GroupSide::hold_writes`); dropped, they resume.
pub trait HeldWrites {
    /// Phase two: journals group point `id` of `group` on every disk, still held.
    fn journal_point(&mut self, group: &str, id: &str) -> Result<()>;
}

/// TLS for the group channel, from the agent's own certificate and the CA.
#[derive(Clone)]
pub struct GroupTls {
    pub member: Arc<rustls::ServerConfig>,
    pub coordinator: Arc<rustls::ClientConfig>,
}

impl GroupTls {
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<GroupTls> {
        let certs = |source| Error::GroupCerts { source };
        Ok(GroupTls {
            member: Arc::new(server_config(cert, key, ca).map_err(certs)?),
            coordinator: Arc::new(peer_client_config(cert, key, ca).map_err(certs)?),
        })
    }
}

/// A member as the coordinator knows it: the machine name its certificate must
/// carry and where it listens (`NAME@ADDR` on the command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPeer {
    pub name: String,
    pub addr: SocketAddr,
}

impl GroupPeer {
    /// Parses `NAME@ADDR`, e.g. `db1@10.0.0.7:20004`.
    pub fn parse(s: &str) -> Result<GroupPeer> {
        let (name, addr) = s
            .split_once('@')
            .ok_or_else(|| Error::GroupPeerForm { peer: s.into() })?;
        check_machine_name(name).map_err(|source| Error::GroupPeerName {
            peer: s.into(),
            source,
        })?;
        let addr = addr.parse().map_err(|source| Error::GroupPeerAddr {
            peer: s.into(),
            addr: addr.into(),
            source,
        })?;
        Ok(GroupPeer {
            name: name.to_string(),
            addr,
        })
    }
}

impl std::fmt::Display for GroupPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.name, self.addr)
    }
}

/// A peer's machine name must be one a certificate can name (a DNS name or an
/// address), else no certificate could ever match it.
pub fn check_machine_name(name: &str) -> Result<(), MachineNameError> {
    rustls_pki_types::ServerName::try_from(name)
        .map(|_| ())
        .map_err(|_| MachineNameError { name: name.into() })
}

/// A TLS stream whose socket timeouts can be set.
pub trait Line: Read + Write {
    fn tcp(&self) -> &TcpStream;
}

impl Line for StreamOwned<ServerConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

impl Line for StreamOwned<ClientConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

fn send<S: Line>(r: &mut BufReader<S>, line: &str) -> std::io::Result<()> {
    let s = r.get_mut();
    s.write_all(line.as_bytes())?;
    s.write_all(b"\n")?;
    s.flush()
}

/// How long the coordinator waits for every member to be ready.
pub const PREPARE_TIMEOUT: Duration = Duration::from_millis(200);
/// The longest a member holds writes waiting for commit.
pub const HOLD_LIMIT: Duration = Duration::from_millis(500);
/// The longest line either end reads. The longest legitimate one is a `no REASON`
/// naming a disk; a peer past this is cut off, so a line costs at most this memory.
pub const LINE_MAX_BYTES: usize = group_line::MAX_LINE;
/// Connections a member serves at once. One coordinator needs one (two while a
/// dropped one times out); the bound keeps handshakes from strangers from taking a
/// thread each without limit.
pub const MEMBER_CONNECTIONS_MAX: usize = 8;

/// Reads one line of at most `LINE_MAX_BYTES`, waiting at most `limit` for each read.
fn read_line<S: Line>(r: &mut BufReader<S>, limit: Duration) -> std::io::Result<String> {
    r.get_ref().tcp().set_read_timeout(Some(limit))?;
    let line = group_line::read_line(r)?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"))?;
    Ok(line.trim().to_string())
}

/// A member: answers the cuts of the coordinator its membership names (the machine
/// name its certificate must carry), until `stop` is set; while it is a member of no
/// group, connections are refused. The agent's stop sets `stop` and then connects
/// here to wake the accept; the connections still open are then shut down and their
/// threads joined, so that nothing of the group channel outlives the agent (nor
/// holds it).
pub fn serve(listener: TcpListener, agent: Arc<dyn GroupSide>, stop: Arc<AtomicBool>) {
    // At most MEMBER_CONNECTIONS_MAX: each thread with its socket, to shut it down.
    let mut open: Vec<(JoinHandle<()>, TcpStream)> = Vec::new();
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        let peer = conn
            .peer_addr()
            .map_or_else(|_| "unknown".into(), |a| a.to_string());
        open.retain(|(t, _)| !t.is_finished());
        if open.len() >= MEMBER_CONNECTIONS_MAX {
            tracing::warn!(%peer, "group channel: {MEMBER_CONNECTIONS_MAX} connections open already; closed this one");
            continue;
        }
        // One clone for the accept loop (to shut it down at stop), one for the thread
        // (to close the connection when it ends: dropping its own stream alone would
        // not, while the loop's clone is open).
        let (Ok(sock), Ok(closer)) = (conn.try_clone(), conn.try_clone()) else {
            tracing::warn!(%peer, "group channel: cannot keep the connection's socket; closed it");
            continue;
        };
        let Some(tls) = agent.member_tls() else {
            tracing::warn!(%peer, "group channel: no TLS identity loaded; closed the connection");
            continue;
        };
        let (agent, who) = (agent.clone(), peer.clone());
        let spawned = std::thread::Builder::new()
            .name("ferry-group".into())
            .spawn(move || {
                if let Err(e) = member(conn, &*agent, tls) {
                    tracing::warn!(peer = %who, error = %e, "group coordinator connection ended");
                }
                let _ = closer.shutdown(std::net::Shutdown::Both);
            });
        match spawned {
            Ok(t) => open.push((t, sock)),
            Err(e) => tracing::error!(%peer, error = %e, "cannot start a group connection thread"),
        }
    }
    // A member thread waits in a read (for the next cut, or a commit while it holds
    // writes): shut down, the read fails and the thread ends, releasing any hold.
    for (t, sock) in open {
        let _ = sock.shutdown(std::net::Shutdown::Both);
        if t.join().is_err() {
            tracing::error!("a group connection thread had panicked");
        }
    }
}

/// Writes a line to the coordinator.
macro_rules! say {
    ($r:expr, $($arg:tt)*) => {
        send($r, &format!($($arg)*))
    };
}

fn member(
    conn: TcpStream,
    agent: &dyn GroupSide,
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    // The handshake (a coordinator must present an agent certificate of the CA)
    // must finish promptly; cuts then wait as long as they like.
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = ServerConnection::new(tls).map_err(std::io::Error::other)?;
    let mut sock = conn;
    while tls.is_handshaking() {
        tls.complete_io(&mut sock)
            .map_err(|e| std::io::Error::other(format!("refused: TLS handshake failed: {e}")))?;
    }
    // The CA vouches for every agent of the deployment; only the coordinator it was
    // told of may hold this member's writes. The membership is the one of this
    // moment: a change ends the connection at its next cut (below).
    let place = agent.membership();
    let named = place.as_ref().is_some_and(|m| {
        tls.peer_certificates()
            .and_then(|c| c.first())
            .is_some_and(|c| cert_names(c, &m.coordinator))
    });
    let mut r = BufReader::new(StreamOwned::new(tls, sock));
    let w = &mut r;
    let group = match (&place, named) {
        (Some(m), true) => m.group.as_str(),
        _ => {
            let why = match &place {
                Some(m) => format!(
                    "refused: the certificate does not name this group's coordinator {}",
                    m.coordinator
                ),
                None => "refused: this agent is a member of no group now".to_string(),
            };
            // Its first request is read (bounded, briefly) before the answer, so that
            // closing does not reset the connection under the answer.
            let _ = read_line(w, Duration::from_secs(2));
            let _ = say!(w, "no {why}");
            w.get_mut().conn.send_close_notify();
            let _ = w.get_mut().flush();
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                why,
            ));
        }
    };
    loop {
        let line = read_line(w, Duration::from_secs(3600))?;
        let Some(Message::Prepare { group: g, id }) = group_line::parse(&line) else {
            say!(w, "no unexpected request {line:?}")?;
            continue;
        };
        // The control plane moved this agent to another group or coordinator since
        // the connection was accepted: refuse and close, so that whoever cuts now
        // connects again and is checked against the new membership.
        if agent.membership() != place {
            let why = "this agent's group or coordinator changed: connect again";
            let _ = say!(w, "no {why}");
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                why,
            ));
        }
        if g != group {
            say!(w, "no this agent is in group {group:?}, not {g:?}")?;
            continue;
        }
        if let Err(why) = agent.can_point() {
            say!(w, "no {why}")?;
            continue;
        }
        // Phase one: hold every disk's writes.
        let held = Instant::now();
        let mut guards = agent.hold_writes();
        say!(w, "ready")?;
        let answer = read_line(w, HOLD_LIMIT);
        match answer.as_deref() {
            Ok(a) if group_line::parse(a) == Some(Message::Commit(id)) => {
                let result = guards.journal_point(group, id);
                drop(guards);
                let pause = held.elapsed();
                agent.record_pause(pause);
                match result {
                    Ok(()) => say!(w, "done {}", pause.as_micros())?,
                    Err(e) => say!(w, "no {e}")?,
                }
            }
            _ => {
                drop(guards);
                tracing::warn!(group, id, "group point skipped: no commit in time");
            }
        }
    }
}

/// The coordinator's side: connections to the members, kept open between cuts.
type ToMember = BufReader<StreamOwned<ClientConnection, TcpStream>>;

pub struct Coordinator {
    pub group: String,
    pub peers: Vec<GroupPeer>,
    tls: Arc<rustls::ClientConfig>,
    conns: Vec<Option<ToMember>>,
}

impl Coordinator {
    pub fn new(
        group: String,
        peers: Vec<GroupPeer>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Coordinator {
        let conns = peers.iter().map(|_| None).collect();
        Coordinator {
            group,
            peers,
            tls,
            conns,
        }
    }

    /// The connection to member `i`, made (TCP and TLS handshake) if needed.
    fn conn(&mut self, i: usize) -> std::io::Result<&mut ToMember> {
        if self.conns[i].is_none() {
            let peer = &self.peers[i];
            let addr = peer.addr;
            let mut sock = TcpStream::connect_timeout(&addr, PREPARE_TIMEOUT)?;
            sock.set_nodelay(true)?;
            // A member that does not finish the handshake in time misses this cut.
            sock.set_read_timeout(Some(PREPARE_TIMEOUT))?;
            sock.set_write_timeout(Some(Duration::from_secs(2)))?;
            // The verifier checks that the peer is an agent of the CA whose
            // certificate names this member's machine.
            let name = rustls_pki_types::ServerName::try_from(peer.name.clone())
                .map_err(|e| std::io::Error::other(format!("member {peer}: {e}")))?;
            let mut tls =
                ClientConnection::new(self.tls.clone(), name).map_err(std::io::Error::other)?;
            while tls.is_handshaking() {
                tls.complete_io(&mut sock)
                    .map_err(|e| std::io::Error::other(format!("TLS handshake: {e}")))?;
            }
            self.conns[i] = Some(BufReader::new(StreamOwned::new(tls, sock)));
        }
        Ok(self.conns[i].as_mut().expect("connected above"))
    }

    /// Cuts one group point; returns its id and the longest pause any member (or
    /// this agent) held writes for.
    // `ready`, `conns` and `peers` are parallel arrays indexed by member.
    #[allow(clippy::needless_range_loop)]
    pub fn cut(&mut self, agent: &dyn GroupSide) -> Result<(String, Duration)> {
        agent.can_point()?;
        let id = format!(
            "g-{}-{:08x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            rand::random::<u32>()
        );
        let n = self.peers.len();
        let mut ready = vec![false; n];
        let mut failure = None;
        for i in 0..n {
            let group = self.group.clone();
            let sent = self
                .conn(i)
                .and_then(|r| send(r, &format!("prepare {group} {id}")));
            if let Err(source) = sent {
                self.conns[i] = None;
                failure.get_or_insert(Error::MemberUnreachable {
                    member: self.peers[i].to_string(),
                    source,
                });
            }
        }
        let deadline = Instant::now() + PREPARE_TIMEOUT;
        for i in 0..n {
            if failure.is_some() {
                break;
            }
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let Some(r) = self.conns[i].as_mut() else {
                continue;
            };
            match read_line(r, left) {
                Ok(l) if l == "ready" => ready[i] = true,
                Ok(l) => {
                    failure = Some(Error::MemberRefused {
                        member: self.peers[i].to_string(),
                        why: l.trim_start_matches("no ").to_string(),
                    })
                }
                Err(source) => {
                    self.conns[i] = None;
                    failure = Some(Error::MemberNotReady {
                        member: self.peers[i].to_string(),
                        source,
                    });
                }
            }
        }
        if let Some(e) = failure {
            for i in (0..n).filter(|&i| ready[i]) {
                if let Some(r) = self.conns[i].as_mut() {
                    let _ = send(r, "abort");
                }
            }
            return Err(e);
        }
        // Every member holds; hold here too, journal, then release everyone.
        let held = Instant::now();
        {
            let mut guards = agent.hold_writes();
            guards.journal_point(&self.group, &id)?;
            for i in 0..n {
                if let Some(r) = self.conns[i].as_mut() {
                    let _ = send(r, &format!("commit {id}"));
                }
            }
        }
        let mut pause = held.elapsed();
        for i in 0..n {
            let Some(r) = self.conns[i].as_mut() else {
                continue;
            };
            match read_line(r, Duration::from_secs(2)) {
                Ok(l) if l.starts_with("done ") => {
                    let us = match group_line::parse(&l) {
                        Some(Message::Done(us)) => us,
                        _ => 0,
                    };
                    pause = pause.max(Duration::from_micros(us));
                }
                other => {
                    self.conns[i] = None;
                    tracing::warn!(member = %self.peers[i], answer = ?other, id, "a member did not confirm the group point; failover will not use it");
                }
            }
        }
        agent.record_pause(held.elapsed());
        Ok((id, pause))
    }
}
