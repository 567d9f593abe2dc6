//! The JSON bodies agents and process servers exchange with the control plane
//! (docs/control-plane.md, "Enrollment and heartbeats"). Both ends use these types,
//! so a field renamed on one side is a compile error on the other. Unknown fields are
//! refused on the way in, as everywhere in the API; times are RFC 3339 in UTC.

use serde::{Deserialize, Serialize};

/// How often agents and process servers heartbeat, unless the control plane says
/// otherwise in its answer; three missed in a row make a part "not seen".
pub const HEARTBEAT_INTERVAL_S: f64 = 5.0;

/// What enrolls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Agent,
    ProcessServer,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::ProcessServer => "process-server",
        }
    }
}

/// `POST /v1/enroll`, without a bearer token or client certificate: the one-time
/// enrollment token is the credential. The key stays with the caller: only its CSR
/// travels.
/// Its `Debug` leaves the token out: a request printed into a log or an error must
/// not hand the one-time secret to whoever reads it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    pub kind: Kind,
    /// The machine name (agent) or process-server name; the store's name rule.
    pub name: String,
    /// PKCS#10, PEM. Its subject and extensions are ignored: the control plane
    /// decides what the certificate names.
    pub csr_pem: String,
    /// A process server's `--advertise` HOST:PORT, whose host its certificate also
    /// names (agents connect to it there). Absent for agents.
    #[serde(default)]
    pub advertise: Option<String>,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("token", &"(secret)")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_enroll_request_printed_for_debugging_does_not_show_its_token() {
        let r = EnrollRequest {
            token: "ferry_enroll_0123456789abcdef".into(),
            kind: Kind::Agent,
            name: "web1".into(),
            csr_pem: String::new(),
            advertise: None,
        };
        let shown = format!("{r:?}");
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(shown.contains("web1"), "{shown}");
    }
}

/// The answer to enrollment and to renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Issued {
    pub certificate_pem: String,
    /// The site CA, for the caller to keep beside its certificate.
    pub ca_pem: String,
    /// RFC 3339; the holder renews once two thirds of its life has passed.
    pub not_after: String,
}

/// `POST /v1/renew`, over mutual TLS with the certificate being renewed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr_pem: String,
}

/// A recovery point as an agent knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointRef {
    pub id: String,
    /// `crash` or `app`.
    pub kind: String,
    /// RFC 3339.
    pub time: String,
}

/// One protected disk in an agent's heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskReport {
    pub name: String,
    pub size_bytes: u64,
    /// `initial-copy`, `resync` or `protected`.
    pub state: String,
    pub initial_copy_percent: f64,
    pub journal_bytes: u64,
    /// Written to the journal, not yet acknowledged by the process server.
    pub unacked_bytes: u64,
    pub newest_point: Option<PointRef>,
    /// The newest point the process server reported uploaded (durable in the store).
    pub newest_uploaded_point: Option<PointRef>,
}

/// `POST /v1/heartbeat/agent`, over mutual TLS: the certificate names `machine`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentHeartbeat {
    pub machine: String,
    pub disks: Vec<DiskReport>,
    /// The process server it is connected to now (its name), if any.
    pub process_server: Option<String>,
    /// The last refusal or connection error, once, as the agent's status shows it.
    pub last_error: Option<String>,
    /// Where this agent accepts its group coordinator's cuts (HOST:PORT, as it
    /// advertises its `--group-listen`); absent when it listens for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_listen: Option<String>,
}

/// A policy as agents apply it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPolicy {
    pub name: String,
    /// Fractional seconds, 0.5 at least.
    pub crash_point_interval_s: f64,
    /// 0: no app-consistent points.
    pub app_point_interval_s: u64,
}

/// Where a process server accepts agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessServerRef {
    pub name: String,
    /// HOST:PORT, as the process server advertised it.
    pub address: String,
}

/// The control plane's answer to an agent's heartbeat: what the agent is to do now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentOrders {
    /// None while no process server is available: the agent keeps journaling.
    pub process_server: Option<ProcessServerRef>,
    pub policy: AgentPolicy,
    pub group: Option<String>,
    pub heartbeat_interval_s: f64,
    /// The machine that cuts the group's points (the first member by name seen
    /// lately); when it names this machine, this agent coordinates. None without a
    /// group, or while no member is seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_coordinator: Option<String>,
    /// To the coordinator only: the other members that report a group-listen
    /// address, by name, with it. Members without one are left out of the cuts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_members: Vec<GroupMemberRef>,
}

/// A member of a group as its coordinator reaches it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupMemberRef {
    /// The machine name its certificate carries.
    pub name: String,
    /// HOST:PORT, the group-listen address it reported.
    pub address: String,
}

/// `POST /v1/heartbeat/process-server`, over mutual TLS: the certificate names `name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessServerHeartbeat {
    pub name: String,
    /// HOST:PORT agents use.
    pub address: String,
    pub cache_used_bytes: u64,
    pub cache_free_bytes: u64,
    /// Bytes taken from agents per second, over the last interval.
    pub ingest_bytes_per_s: f64,
    /// Age of the oldest cached write not yet in the store, seconds.
    pub upload_lag_s: f64,
    /// The process's CPU use over the last interval, percent of one core.
    pub cpu_percent: f64,
    /// Its own verdict (`normal`, `warning`, `critical`) and why.
    pub health: String,
    pub health_reasons: Vec<String>,
    /// Agents connected now, by machine name.
    pub machines: Vec<String>,
    /// Disks this process server was fenced from since its last answered heartbeat
    /// (another one claimed them): each is sent until a heartbeat carrying it is
    /// answered, at most `limits::MAX_FENCED` at a time. Absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fenced: Vec<FencedDisk>,
}

/// A disk a process server may no longer commit to: the replica's writer epoch went
/// past its claim (docs/storage-format.md 3, "Fencing"). It dropped the disk's cached
/// writes that were not in the replica; the agent's journal or a resync refills them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FencedDisk {
    pub machine: String,
    pub disk: String,
    /// The replica's writer epoch that fenced it.
    pub epoch: u64,
    /// The process server that holds that epoch ("" where the record names none).
    pub new_writer: String,
    /// Payload bytes of cached writes dropped so far (never uploaded).
    pub dropped_bytes: u64,
    /// When it found out, RFC 3339.
    pub time: String,
}

/// The answer to a process server's heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessServerOrders {
    /// Serial numbers (lowercase hex, no separators) of certificates that were issued
    /// to removed machines and process servers and have not expired: refuse them.
    pub revoked_serials: Vec<String>,
    pub heartbeat_interval_s: f64,
}
