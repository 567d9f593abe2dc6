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
    /// `ferry recovery-host`: builds and serves recovered disks (docs/recovery.md).
    RecoveryHost,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::ProcessServer => "process-server",
            Kind::RecoveryHost => "recovery-host",
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

    #[test]
    fn a_work_report_without_disks_still_reads_and_one_with_disks_round_trips() {
        // What a recovery host from before per-disk progress sends.
        let old: WorkReport =
            serde_json::from_str(r#"{"id":"i1","state":"running","progress":0.5,"bytes_per_s":9}"#)
                .unwrap();
        assert!(old.disks.is_empty());
        assert!(!serde_json::to_string(&old).unwrap().contains("disks"));
        let new = WorkReport {
            disks: vec![DiskProgress {
                disk: "d0".into(),
                progress: 0.25,
                bytes_per_s: 100.0,
                bytes_done: 1,
                bytes: 4,
            }],
            ..old
        };
        let text = serde_json::to_string(&new).unwrap();
        assert_eq!(serde_json::from_str::<WorkReport>(&text).unwrap(), new);
        let unknown = text.replace("\"bytes\":4", "\"bytes\":4,\"eta\":1");
        assert!(serde_json::from_str::<WorkReport>(&unknown).is_err());
    }

    #[test]
    fn reverse_and_apply_items_and_their_results_round_trip() {
        let reverse = WorkOp::Reverse {
            disks: vec![ReverseDisk {
                disk: "d0".into(),
                over: "p1".into(),
                source: "item:s1".into(),
            }],
            interval_s: 5,
            last: true,
        };
        let text = serde_json::to_string(&reverse).unwrap();
        assert!(text.contains(r#""kind":"reverse""#), "{text}");
        assert_eq!(serde_json::from_str::<WorkOp>(&text).unwrap(), reverse);
        assert_eq!(reverse.kind(), "reverse");
        // `last` may be left out.
        let plain: WorkOp = serde_json::from_str(
            r#"{"kind":"reverse","disks":[{"disk":"d0","over":"p1","source":"/w/d0.raw"}],"interval_s":1}"#,
        )
        .unwrap();
        assert!(matches!(plain, WorkOp::Reverse { last: false, .. }));

        let apply = WorkOp::Apply {
            disks: vec![ApplyDisk {
                disk: "d0".into(),
                over: "p1".into(),
                target: "/dev/sdb".into(),
            }],
            interval_s: 1,
            until: Vec::new(),
            verify: false,
        };
        let text = serde_json::to_string(&apply).unwrap();
        assert!(!text.contains("until"), "{text}");
        assert_eq!(serde_json::from_str::<WorkOp>(&text).unwrap(), apply);
        assert_eq!(apply.kind(), "apply");
        let last = WorkOp::Apply {
            disks: Vec::new(),
            interval_s: 1,
            until: vec![DiskPoint {
                disk: "d0".into(),
                point: "r9".into(),
            }],
            verify: true,
        };
        let text = serde_json::to_string(&last).unwrap();
        assert_eq!(serde_json::from_str::<WorkOp>(&text).unwrap(), last);

        let result = WorkResult {
            rounds: vec![RoundDisk {
                disk: "d0".into(),
                point: "r2".into(),
                at: 1_700_000_000,
                bytes_data: 4096,
                bytes_sent: 4200,
                total_bytes_sent: 9000,
            }],
            applied: vec![AppliedDisk {
                disk: "d0".into(),
                point: "r2".into(),
                at: 1_700_000_000,
                bytes_written: 4096,
                bytes_fetched: 4200,
                total_bytes_written: 8192,
                verified: Some(true),
            }],
            ..WorkResult::default()
        };
        let text = serde_json::to_string(&result).unwrap();
        assert_eq!(serde_json::from_str::<WorkResult>(&text).unwrap(), result);
        // Results without them (every other op) leave them out and read back.
        let empty = serde_json::to_string(&WorkResult::default()).unwrap();
        assert!(
            !empty.contains("rounds") && !empty.contains("applied"),
            "{empty}"
        );
        let older: AppliedDisk = serde_json::from_str(
            r#"{"disk":"d0","point":"r2","at":1,"bytes_written":0,"bytes_fetched":0,"total_bytes_written":0}"#,
        )
        .unwrap();
        assert_eq!(older.verified, None);
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
    /// The checksum resync under way, else the last one done since the agent started;
    /// absent when none ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncReport>,
}

/// A disk's checksum resync against its replica (docs/architecture.md, "Checksum
/// resync"), in an agent's heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncReport {
    /// `re-enable`: the failover was lifted, the journal from before it dropped, and
    /// the disk compared (a re-enable waits for it, `phase` `done`, on every disk);
    /// `other`: lost state, a host that went down, an operator's request, a replica
    /// that already held the disk.
    pub reason: String,
    /// `wanted` (waiting for the process server's checksums), `asked`, `comparing`,
    /// or `done`.
    pub phase: String,
    /// Bytes of the disk compared so far, of `total_bytes` (known once the checksums
    /// arrived).
    pub compared_bytes: u64,
    pub total_bytes: u64,
    /// Bytes journaled to be sent because they differed.
    pub sent_bytes: u64,
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
    /// Where the agent is with a failover order (`AgentOrders::failover`); absent
    /// while it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverReport>,
}

/// The control plane's failover order to a machine's source agent
/// (docs/recovery.md, "No split brain").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverOrder {
    /// The failover's id: the agent's report answers to it.
    pub id: String,
    /// `prepare` (planned failover: stop accepting writes, flush, take a final point
    /// on every disk and report it once acknowledged) or `failed-over` (the machine
    /// runs at the recovery site: stop replicating, serve the disks read-only).
    pub state: String,
}

/// A source agent's answer to a `FailoverOrder`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverReport {
    /// The order's id.
    pub id: String,
    /// `preparing`, `prepared` (every final point acknowledged by the process server),
    /// `read-only` (failed over: nothing is replicated), or `failed` (`error` says why).
    pub state: String,
    /// The final point of each disk, once prepared.
    #[serde(default)]
    pub points: Vec<DiskPoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A disk and a point id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskPoint {
    pub disk: String,
    pub point: String,
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
    /// Set while the machine is being failed over or has failed over: the source must
    /// not write any more (docs/recovery.md, "No split brain").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverOrder>,
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
    /// Machines that failed over to the recovery site: their agents' sessions and
    /// writes are refused (no split brain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_over: Vec<String>,
}

/// `POST /v1/heartbeat/recovery-host`, over mutual TLS: the certificate names `name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryHostHeartbeat {
    pub name: String,
    /// HOST:PORT of its NBD listener, as clients reach it.
    pub nbd_address: String,
    /// Free bytes on its work directory's file system.
    pub work_dir_free_bytes: u64,
    /// Why its last look at the store failed (at most `limits::MAX_TEXT_BYTES`);
    /// absent while it reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// The state of items of its last orders (at most `limits::MAX_WORK_ITEMS`), the
    /// ones that changed since its last answered heartbeat first; the body stays under
    /// the API's limit (outputs are cut to `limits::MAX_WORK_OUTPUT_BYTES`).
    #[serde(default)]
    pub reports: Vec<WorkReport>,
}

/// The answer to a recovery host's heartbeat: the work assigned to it that is not
/// removed, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryHostOrders {
    pub work: Vec<WorkItem>,
    pub heartbeat_interval_s: f64,
}

/// One unit of work for a recovery host; idempotent by `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkItem {
    pub id: String,
    pub machine: String,
    pub op: WorkOp,
}

/// What a work item does (docs/recovery.md, "Recovery hosts").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum WorkOp {
    /// Rebuild each disk at its point into `WORK_DIR/items/ID/DISK.{raw|vhd}`.
    Build {
        disks: Vec<DiskPoint>,
        /// `raw` or `vhd`.
        format: String,
    },
    /// Serve each disk at its point over NBD as export `MACHINE/DISK` (instant
    /// recovery; writes go to an overlay in `WORK_DIR/items/ID/overlay`).
    Serve { disks: Vec<DiskPoint> },
    /// `sh -c command`, detached in its own process group (a started machine).
    Start {
        command: String,
        #[serde(default)]
        env: std::collections::BTreeMap<String, String>,
    },
    /// `sh -c command`, waited for, killed after `timeout_s`.
    Script {
        command: String,
        timeout_s: u64,
        #[serde(default)]
        env: std::collections::BTreeMap<String, String>,
    },
    /// Stop and delete what these items made, then check that nothing is left.
    Remove { items: Vec<String> },
    /// Make each target (a file or block device on the host, the user's: a remove
    /// never deletes it) equal to its disk at its point by checksum, writing only the
    /// blocks that differ (failback's master target, docs/failback.md). A disk with
    /// `from` takes those blocks from what a point-diff item stored.
    Sync { disks: Vec<SyncDisk> },
    /// The first step of a sync across the sites (docs/failback.md, "Syncing the home
    /// disks"): hash each target at its point's size, store the checksum map in the
    /// reverse replica's exchange area (`exchange` in the result).
    HomeMap { disks: Vec<SyncDisk> },
    /// The second step, at the recovery site beside the store: make each disk's
    /// point's map, compare it with the home map, and store the point's map and the
    /// point's bytes of every block that differs (`exchange` in the result).
    PointDiff { disks: Vec<PointDiffDisk> },
    /// Every `interval_s`, send each disk's writes since the last round as the next
    /// point of the reverse replica `MACHINE.reverse` (failback, docs/recovery-hosts.md).
    /// `last`: first freeze the machine (its start item stopped, its exports
    /// read-only), then one round, the final checksum maps, and end.
    Reverse {
        disks: Vec<ReverseDisk>,
        interval_s: u64,
        #[serde(default)]
        last: bool,
    },
    /// Every `interval_s`, apply each disk's reverse points above the last applied
    /// onto its home target. `until`: apply exactly up to those points and end
    /// (`verify`: then check every block against the final map).
    Apply {
        disks: Vec<ApplyDisk>,
        interval_s: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        until: Vec<DiskPoint>,
        #[serde(default)]
        verify: bool,
    },
}

/// One disk a reverse item replicates back home.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReverseDisk {
    pub disk: String,
    /// The forward point id P the recovered disk started from.
    pub over: String,
    /// "item:ID" (the serve item ID's served disk on this host, target nbd) or an
    /// absolute file path (a built disk, target dir).
    pub source: String,
}

/// One disk an apply item keeps equal to the reverse replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyDisk {
    pub disk: String,
    /// The forward point id P the reverse points are over.
    pub over: String,
    /// The home path (a file or block device: the user's, never deleted).
    pub target: String,
}

/// One disk a sync item makes equal to a point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncDisk {
    pub disk: String,
    /// The point's id.
    pub point: String,
    /// The path of the disk on the recovery host.
    pub target: String,
    /// The point's map and differing blocks a point-diff item stored: the sync
    /// writes those and verifies; without, it reads the store for what differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<SyncFrom>,
}

/// What a sync takes from a point-diff item (objects of the reverse replica).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncFrom {
    /// The point's checksum map.
    pub map: String,
    /// How many segments of the point's bytes of the blocks that differ it stored
    /// (named after the map: `sync_exchange::segment_name`).
    #[serde(default)]
    pub segments: u64,
}

/// One disk a point-diff item compares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointDiffDisk {
    pub disk: String,
    /// The point's id.
    pub point: String,
    /// The home disk's checksum map a home-map item stored.
    pub home_map: String,
}

impl WorkOp {
    pub fn kind(&self) -> &'static str {
        match self {
            WorkOp::Build { .. } => "build",
            WorkOp::Serve { .. } => "serve",
            WorkOp::Start { .. } => "start",
            WorkOp::Script { .. } => "script",
            WorkOp::Remove { .. } => "remove",
            WorkOp::Sync { .. } => "sync",
            WorkOp::HomeMap { .. } => "home-map",
            WorkOp::PointDiff { .. } => "point-diff",
            WorkOp::Reverse { .. } => "reverse",
            WorkOp::Apply { .. } => "apply",
        }
    }
}

/// A recovery host's report of one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkReport {
    pub id: String,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    /// 0.0 to 1.0.
    #[serde(default)]
    pub progress: f64,
    #[serde(default)]
    pub bytes_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<WorkResult>,
    /// build, serve: each disk's own progress (`progress` above is their mean weighted
    /// by bytes). Absent from hosts that predate it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskProgress>,
}

/// One disk of a build or serve item: how far it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskProgress {
    pub disk: String,
    /// 0.0 to 1.0: 0 until the disk is started, 1 once it is built or served.
    pub progress: f64,
    /// This disk's own rate while it was worked on.
    pub bytes_per_s: f64,
    pub bytes_done: u64,
    /// What the work moves for this disk: a build, the stored bytes its point reads;
    /// a serve, the disk's size.
    pub bytes: u64,
}

/// What a succeeded item made; each field is filled by the ops it concerns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkResult {
    /// build, serve: each disk, where it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<ReadyDisk>,
    /// remove: each thing removed ("file PATH", "export M/D", "process PID").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
    /// script: its exit status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// script, start (when it failed): the end of its output.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    /// start: the process group's leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// sync: what each disk took.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub synced: Vec<SyncedDisk>,
    /// reverse: the newest round per disk (reported while running too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<RoundDisk>,
    /// apply: the newest applied point per disk (reported while running too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<AppliedDisk>,
    /// home-map, point-diff: what each disk stored for the next step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exchange: Vec<ExchangeDisk>,
}

/// What a step of a sync across the sites stored for one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeDisk {
    pub disk: String,
    /// home-map: the home disk's checksum map; point-diff: the point's.
    pub map: String,
    /// point-diff: how many segments of the point's bytes of the blocks that differ
    /// (named after the map, so that a report's size does not grow with them).
    #[serde(default)]
    pub segments: u64,
    pub blocks: u64,
    /// point-diff: blocks whose checksums differ.
    #[serde(default)]
    pub blocks_differing: u64,
    /// Bytes of objects read from the store.
    pub bytes_fetched: u64,
    /// Bytes of objects put to the store.
    pub bytes_stored: u64,
}

/// A reverse item's newest round of one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundDisk {
    pub disk: String,
    /// The reverse replica's point the round made.
    pub point: String,
    /// Unix seconds of the point.
    pub at: i64,
    /// Bytes of disk data the round carried.
    pub bytes_data: u64,
    /// Bytes the round sent to the store.
    pub bytes_sent: u64,
    /// Bytes sent by every round of this item.
    pub total_bytes_sent: u64,
}

/// An apply item's newest applied point of one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedDisk {
    pub disk: String,
    /// The reverse point the home target now equals.
    pub point: String,
    /// Unix seconds of the point.
    pub at: i64,
    pub bytes_written: u64,
    pub bytes_fetched: u64,
    /// Bytes written by every apply of this item.
    pub total_bytes_written: u64,
    /// With `verify`: whether every block matched the final map.
    #[serde(default)]
    pub verified: Option<bool>,
}

/// A disk a sync item made equal to its point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncedDisk {
    pub disk: String,
    /// Blocks compared.
    pub blocks: u64,
    /// Blocks whose checksum differed from the point's, each rewritten.
    pub blocks_differing: u64,
    pub bytes_written: u64,
    /// Bytes of objects read from the store.
    pub bytes_fetched: u64,
    /// Bytes of objects put to the store (the home disk's checksum map).
    #[serde(default)]
    pub bytes_stored: u64,
    /// The target read back equal to the point.
    pub identical: bool,
}

/// A recovered disk, ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadyDisk {
    pub disk: String,
    pub point: String,
    /// build: the image file on the recovery host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// serve: `nbd://ADDR/MACHINE/DISK`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_url: Option<String>,
    /// The disk's size.
    pub bytes: u64,
}
