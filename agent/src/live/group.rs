//! Multi-machine consistency: the agents of a group cut points together. One agent,
//! the coordinator (it has --group-peer addresses), runs a two-phase cut over plain
//! lines on TCP (port 20004 by default):
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

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_dataplane::protocol::PointKindWire;

use super::Agent;

/// How long the coordinator waits for every member to be ready.
pub const PREPARE_TIMEOUT: Duration = Duration::from_millis(200);
/// The longest a member holds writes waiting for commit.
pub const HOLD_LIMIT: Duration = Duration::from_millis(500);

fn read_line(r: &mut BufReader<TcpStream>, limit: Duration) -> std::io::Result<String> {
    r.get_ref().set_read_timeout(Some(limit))?;
    let mut line = String::new();
    let n = r.read_line(&mut line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed",
        ));
    }
    Ok(line.trim().to_string())
}

/// A member: answers the coordinator's cuts.
pub fn serve(listener: TcpListener, agent: Arc<Agent>, group: String) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (agent, group) = (agent.clone(), group.clone());
        let _ = std::thread::Builder::new()
            .name("ferry-group".into())
            .spawn(move || {
                if let Err(e) = member(conn, &agent, &group) {
                    tracing::debug!(error = %e, "group coordinator connection ended");
                }
            });
    }
}

fn member(conn: TcpStream, agent: &Agent, group: &str) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let line = read_line(&mut r, Duration::from_secs(3600))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(&"prepare"), Some(&g), Some(&id)) = (words.first(), words.get(1), words.get(2))
        else {
            writeln!(w, "no unexpected request {line:?}")?;
            continue;
        };
        if g != group {
            writeln!(w, "no this agent is in group {group:?}, not {g:?}")?;
            continue;
        }
        if let Err(why) = agent.can_point() {
            writeln!(w, "no {why}")?;
            continue;
        }
        // Phase one: hold every disk's writes.
        let held = Instant::now();
        let mut guards: Vec<_> = agent.disks.iter().map(|d| (d, d.capture.state())).collect();
        writeln!(w, "ready")?;
        let answer = read_line(&mut r, HOLD_LIMIT);
        match answer.as_deref() {
            Ok(a) if a == format!("commit {id}") => {
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
                    Ok(()) => writeln!(w, "done {}", pause.as_micros())?,
                    Err(e) => writeln!(w, "no {e}")?,
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
pub struct Coordinator {
    pub group: String,
    pub peers: Vec<SocketAddr>,
    conns: Vec<Option<(TcpStream, BufReader<TcpStream>)>>,
}

impl Coordinator {
    pub fn new(group: String, peers: Vec<SocketAddr>) -> Coordinator {
        let conns = peers.iter().map(|_| None).collect();
        Coordinator {
            group,
            peers,
            conns,
        }
    }

    fn conn(&mut self, i: usize) -> std::io::Result<&mut (TcpStream, BufReader<TcpStream>)> {
        if self.conns[i].is_none() {
            let c = TcpStream::connect_timeout(&self.peers[i], PREPARE_TIMEOUT)?;
            c.set_nodelay(true)?;
            let r = BufReader::new(c.try_clone()?);
            self.conns[i] = Some((c, r));
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
                .and_then(|(w, _)| writeln!(w, "prepare {group} {id}"));
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
            let Some((_, r)) = self.conns[i].as_mut() else {
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
                if let Some((w, _)) = self.conns[i].as_mut() {
                    let _ = writeln!(w, "abort");
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
                if let Some((w, _)) = self.conns[i].as_mut() {
                    let _ = writeln!(w, "commit {id}");
                }
            }
        }
        let mut pause = held.elapsed();
        for i in 0..n {
            let Some((_, r)) = self.conns[i].as_mut() else {
                continue;
            };
            match read_line(r, Duration::from_secs(2)) {
                Ok(l) if l.starts_with("done ") => {
                    let us: u64 = l[5..].trim().parse().unwrap_or(0);
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
