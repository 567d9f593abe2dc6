//! Multi-machine consistency: the agents of a group cut points together. One agent,
//! the coordinator (it has --group-peer addresses), runs a two-phase cut over lines
//! on mutual TLS (port 20004 by default; both ends present their agent certificates,
//! checked against the CA, so only agents of the deployment can hold writes):
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
//! takes the newest group point that every member of the group holds.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_dataplane::protocol::PointKindWire;
use ferry_dataplane::tls::certs::{peer_client_config, server_config};
use rustls::{ClientConnection, ServerConnection, StreamOwned};

use super::group_line::{self, Message};
use super::Agent;

/// TLS for the group channel, from the agent's own certificate and the CA.
#[derive(Clone)]
pub struct GroupTls {
    pub member: Arc<rustls::ServerConfig>,
    pub coordinator: Arc<rustls::ClientConfig>,
}

impl GroupTls {
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<GroupTls, String> {
        Ok(GroupTls {
            member: Arc::new(server_config(cert, key, ca).map_err(|e| e.to_string())?),
            coordinator: Arc::new(peer_client_config(cert, key, ca).map_err(|e| e.to_string())?),
        })
    }
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

fn read_line<S: Line>(r: &mut BufReader<S>, limit: Duration) -> std::io::Result<String> {
    r.get_ref().tcp().set_read_timeout(Some(limit))?;
    let line = group_line::read_line(r)?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"))?;
    Ok(line.trim().to_string())
}

/// A member: answers the coordinator's cuts.
pub fn serve(listener: TcpListener, agent: Arc<Agent>, group: String, tls: GroupTls) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (agent, group, tls) = (agent.clone(), group.clone(), tls.member.clone());
        let _ = std::thread::Builder::new()
            .name("ferry-group".into())
            .spawn(move || {
                let peer = conn
                    .peer_addr()
                    .map_or_else(|_| "unknown".into(), |a| a.to_string());
                if let Err(e) = member(conn, &agent, &group, tls) {
                    tracing::warn!(%peer, error = %e, "group coordinator connection ended");
                }
            });
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
    agent: &Agent,
    group: &str,
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
    let mut r = BufReader::new(StreamOwned::new(tls, sock));
    let w = &mut r;
    loop {
        let line = read_line(w, Duration::from_secs(3600))?;
        let Some(Message::Prepare { group: g, id }) = group_line::parse(&line) else {
            say!(w, "no unexpected request {line:?}")?;
            continue;
        };
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
        let mut guards: Vec<_> = agent.disks.iter().map(|d| (d, d.capture.state())).collect();
        say!(w, "ready")?;
        let answer = read_line(w, HOLD_LIMIT);
        match answer.as_deref() {
            Ok(a) if group_line::parse(a) == Some(Message::Commit(id)) => {
                let mut result = Ok(());
                for (d, st) in &mut guards {
                    if let Err(e) =
                        d.capture
                            .bookmark_locked(st, PointKindWire::Group, "", group, id)
                    {
                        result = Err(e);
                        break;
                    }
                }
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
    pub peers: Vec<SocketAddr>,
    tls: Arc<rustls::ClientConfig>,
    conns: Vec<Option<ToMember>>,
}

impl Coordinator {
    pub fn new(
        group: String,
        peers: Vec<SocketAddr>,
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
            let addr = self.peers[i];
            let mut sock = TcpStream::connect_timeout(&addr, PREPARE_TIMEOUT)?;
            sock.set_nodelay(true)?;
            // A member that does not finish the handshake in time misses this cut.
            sock.set_read_timeout(Some(PREPARE_TIMEOUT))?;
            sock.set_write_timeout(Some(Duration::from_secs(2)))?;
            // Members are known by address; the verifier checks that the peer is an
            // agent of the CA, not a name.
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let mut tls =
                ClientConnection::new(self.tls.clone(), name).map_err(std::io::Error::other)?;
            while tls.is_handshaking() {
                tls.complete_io(&mut sock).map_err(|e| {
                    std::io::Error::other(format!("TLS handshake with member {addr}: {e}"))
                })?;
            }
            self.conns[i] = Some(BufReader::new(StreamOwned::new(tls, sock)));
        }
        Ok(self.conns[i].as_mut().expect("connected above"))
    }

    /// Cuts one group point; returns its id and the longest pause any member (or
    /// this agent) held writes for.
    // `ready`, `conns` and `peers` are parallel arrays indexed by member.
    #[allow(clippy::needless_range_loop)]
    pub fn cut(&mut self, agent: &Agent) -> Result<(String, Duration), String> {
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
            if let Err(e) = sent {
                self.conns[i] = None;
                failure.get_or_insert(format!("member {}: {e}", self.peers[i]));
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
                    failure = Some(format!(
                        "member {}: {}",
                        self.peers[i],
                        l.trim_start_matches("no ")
                    ))
                }
                Err(e) => {
                    self.conns[i] = None;
                    failure = Some(format!("member {} not ready in time: {e}", self.peers[i]));
                }
            }
        }
        if let Some(why) = failure {
            for i in (0..n).filter(|&i| ready[i]) {
                if let Some(r) = self.conns[i].as_mut() {
                    let _ = send(r, "abort");
                }
            }
            return Err(format!("group point skipped: {why}"));
        }
        // Every member holds; hold here too, journal, then release everyone.
        let held = Instant::now();
        {
            let mut guards: Vec<_> = agent.disks.iter().map(|d| (d, d.capture.state())).collect();
            for (d, st) in &mut guards {
                d.capture
                    .bookmark_locked(st, PointKindWire::Group, "", &self.group, &id)
                    .map_err(|e| format!("disk {}: {e}", d.capture.disk))?;
            }
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
