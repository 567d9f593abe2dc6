//! `/v1/machines` and `/v1/groups`: the machines that heartbeat, with their health
//! and RPO computed at read time; moving one to another process server (operator),
//! setting its policy or group and removing it (admin). Reading needs a viewer.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::{AppState, Body, Page, Query};
use crate::db;
use crate::health::{self, Health};
use crate::policy::Policy;
use crate::recovery::jobs::state::{self as recovery_state, RecoveryRow};
use crate::registry::machines::{self, MachineRow};
use crate::registry::{events, process_servers};

/// A machine as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Machine {
    pub name: String,
    /// The process server it is to use; null while none is available.
    pub process_server: Option<String>,
    pub policy: String,
    pub group: Option<String>,
    /// `initial-copy`, `resync`, `protected` (the least advanced disk's), or `no-disks`.
    pub state: String,
    pub health: Health,
    pub health_reasons: Vec<String>,
    /// Now minus the time of the newest point uploaded (the oldest such of its
    /// disks); null before the first.
    pub rpo_seconds: Option<f64>,
    /// RFC 3339.
    pub last_seen: String,
    /// The disks of its last heartbeat (`wire::DiskReport`).
    #[schema(value_type = Vec<Object>)]
    pub disks: Vec<ferry_link::control::wire::DiskReport>,
    pub last_error: Option<String>,
    /// `home` or `recovery`: where it runs (its failover's; `home` without one).
    pub active_site: String,
    /// `forward` (home -> recovery site) or `reverse` (once reprotected:
    /// docs/failback.md); `forward` without a failover.
    pub direction: String,
    /// Its failover; null while it is protected at home with nothing failed over.
    pub recovery: Option<MachineRecovery>,
    pub actions: Actions,
}

/// A machine's failover (docs/recovery.md, "Jobs on machines").
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MachineRecovery {
    /// `preparing`, `failed-over` or `committed`.
    pub state: String,
    /// `home` or `recovery`.
    pub active_site: String,
    pub planned: bool,
    /// The point of each disk it failed over to, once its disks are up.
    pub point: Option<std::collections::BTreeMap<String, String>>,
    /// The recovery host its disks are on.
    pub host: Option<String>,
    /// The job that last worked on it.
    pub job: Option<String>,
    /// `forward` or `reverse` (reprotected).
    pub direction: String,
    /// Reprotect: the recovery host that wrote its home disks.
    pub master_target: Option<String>,
    /// Reprotect: `{disk: path on the master target}`.
    pub home_disks: std::collections::BTreeMap<String, String>,
    /// In direction reverse: the reverse replication as the master target's apply
    /// item last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse: Option<ReverseReplication>,
}

/// A reprotected machine's reverse replication (docs/failback.md).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReverseReplication {
    /// The newest reverse point applied at home, per disk (`wire::AppliedDisk`).
    #[schema(value_type = Vec<Object>)]
    pub applied: Vec<ferry_link::control::wire::AppliedDisk>,
    /// Now minus the time of the oldest of those points (the reverse RPO); null
    /// before every disk has one.
    pub rpo_seconds: Option<f64>,
}

impl ReverseReplication {
    /// `applied` as the apply item reported it, over the machine's `disks`.
    pub fn of(
        applied: Vec<ferry_link::control::wire::AppliedDisk>,
        disks: usize,
        now: f64,
    ) -> Self {
        let rpo_seconds = (disks > 0 && applied.len() >= disks)
            .then(|| applied.iter().map(|a| a.at).min())
            .flatten()
            .map(|oldest| (now - oldest as f64).max(0.0));
        ReverseReplication {
            applied,
            rpo_seconds,
        }
    }
}

/// What the control plane runs for a machine.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Actions {
    /// The command template run on the recovery host once its disks are up
    /// (placeholders `{nbd_url}`, `{disk_path}`, `{nbd_url:DISK}`,
    /// `{disk_path:DISK}`, `{machine}`, `{point}`); null: none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub start: Option<Option<String>>,
}

#[derive(Serialize, ToSchema)]
pub struct MachineList {
    pub items: Vec<Machine>,
    pub next_after: Option<String>,
}

pub(crate) fn rfc3339(s: i64) -> String {
    chrono::DateTime::from_timestamp(s, 0).map_or_else(|| s.to_string(), |d| d.to_rfc3339())
}

/// The failovers and start actions of the machines of a page, by name.
struct Extras {
    recovery: HashMap<String, RecoveryRow>,
    start: std::collections::BTreeMap<String, String>,
    /// Reverse machines: what their running apply item last reported.
    applied: HashMap<String, Vec<ferry_link::control::wire::AppliedDisk>>,
}

/// The newest applied points the apply item among `items` reported (the item keeps
/// its figures while it runs).
fn applied_of(
    r: &RecoveryRow,
    items: &HashMap<String, crate::recovery::work::WorkRow>,
) -> Vec<ferry_link::control::wire::AppliedDisk> {
    r.items
        .iter()
        .filter_map(|id| items.get(id))
        .find(|i| i.op.kind() == "apply" && i.state != "removed")
        .and_then(|i| i.result.as_ref())
        .map(|x| x.applied.clone())
        .unwrap_or_default()
}

async fn extras(state: &AppState, rows: &[MachineRow]) -> Result<Extras, ApiError> {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Ok(Extras {
            recovery: HashMap::new(),
            start: Default::default(),
            applied: HashMap::new(),
        });
    };
    let recovery: HashMap<String, RecoveryRow> =
        recovery_state::in_range(&state.db, &first.name, &last.name)
            .await?
            .into_iter()
            .map(|r| (r.machine.clone(), r))
            .collect();
    let start = recovery_state::start_actions_in_range(&state.db, &first.name, &last.name).await?;
    // The reverse machines' items, read at once.
    let reverse: Vec<&RecoveryRow> = recovery
        .values()
        .filter(|r| r.direction == recovery_state::REVERSE)
        .collect();
    let ids: Vec<String> = reverse.iter().flat_map(|r| r.items.clone()).collect();
    let items = crate::recovery::work::get_by_id(&state.db, &ids).await?;
    let mut applied = HashMap::new();
    for r in reverse {
        applied.insert(r.machine.clone(), applied_of(r, &items));
    }
    Ok(Extras {
        recovery,
        start,
        applied,
    })
}

fn view(m: MachineRow, policies: &HashMap<String, Policy>, now: f64, x: &mut Extras) -> Machine {
    let reverse = x
        .applied
        .remove(&m.name)
        .map(|a| (a, x.recovery.get(&m.name).map_or(0, |r| r.home_disks.len())))
        .map(|(a, disks)| ReverseReplication::of(a, disks, now));
    let recovery = x.recovery.remove(&m.name).map(|r| MachineRecovery {
        state: r.state,
        active_site: r.active_site,
        planned: r.planned,
        point: r.point,
        host: r.host,
        job: r.job_id,
        direction: r.direction,
        master_target: r.master_target,
        home_disks: r.home_disks,
        reverse,
    });
    let (active_site, direction) = recovery.as_ref().map_or_else(
        || ("home".to_string(), recovery_state::FORWARD.to_string()),
        |r| (r.active_site.clone(), r.direction.clone()),
    );
    let actions = Actions {
        start: Some(x.start.remove(&m.name)),
    };
    let (health, health_reasons) = match health::policy_of(policies, &m.policy) {
        Some(p) => {
            let v = health::machine(&m, p, now);
            (v.health, v.reasons)
        }
        None => (
            Health::Warning,
            vec![format!("policy {} does not exist", m.policy)],
        ),
    };
    Machine {
        rpo_seconds: health::rpo_seconds(&m, now),
        name: m.name,
        process_server: m.process_server,
        policy: m.policy,
        group: m.group,
        state: m.state,
        health,
        health_reasons,
        last_seen: rfc3339(m.last_seen),
        disks: m.disks,
        last_error: m.last_error,
        active_site,
        direction,
        recovery,
        actions,
    }
}

pub(crate) fn checked(what: &'static str, name: &str) -> Result<(), ApiError> {
    ferry_replica::layout::check_name(what, name).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("no machine {name}"))
}

/// The machine, not removed.
async fn existing(state: &AppState, name: &str) -> Result<MachineRow, ApiError> {
    checked("machine", name)?;
    machines::get(&state.db, name)
        .await?
        .filter(|m| !m.removed)
        .ok_or_else(|| not_found(name))
}

#[utoipa::path(get, path = "/v1/machines", tag = "machines", params(Page),
    security(("bearer" = [])),
    responses((status = 200, body = MachineList), (status = 401, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Json<MachineList>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = page.limit()?;
    let rows = machines::list(&state.db, page.after.as_deref(), limit).await?;
    let policies = health::policies(&state.db).await?;
    let now = health::now_f();
    let mut x = extras(&state, &rows).await?;
    let items: Vec<Machine> = rows
        .into_iter()
        .map(|m| view(m, &policies, now, &mut x))
        .collect();
    let next_after = page.next_after(&items, |m| &m.name, limit);
    Ok(Json(MachineList { items, next_after }))
}

#[utoipa::path(get, path = "/v1/machines/{name}", tag = "machines",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = Machine), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Machine>, ApiError> {
    caller.require(Role::Viewer)?;
    let m = existing(&state, &name).await?;
    let policies = health::policies(&state.db).await?;
    let mut x = extras(&state, std::slice::from_ref(&m)).await?;
    Ok(Json(view(m, &policies, health::now_f(), &mut x)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Move {
    /// The process server's name.
    pub to: String,
}

#[utoipa::path(post, path = "/v1/machines/{name}/move", tag = "machines",
    params(("name" = String, Path)), request_body = Move, security(("bearer" = [])),
    responses((status = 200, body = Machine), (status = 400, body = Problem),
        (status = 404, body = Problem)))]
pub async fn move_to(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(mv): Body<Move>,
) -> Result<Json<Machine>, ApiError> {
    caller.require(Role::Operator)?;
    let m = existing(&state, &name).await?;
    checked("process server", &mv.to)?;
    if process_servers::get(&state.db, &mv.to)
        .await?
        .filter(|p| !p.removed)
        .is_none()
    {
        return Err(ApiError::BadRequest(format!("no process server {}", mv.to)));
    }
    if !machines::set_process_server(&state.db, &name, &mv.to, db::now_s()).await? {
        return Err(not_found(&name));
    }
    let from = m.process_server.as_deref().unwrap_or("none");
    let msg = format!(
        "moved from process server {from} to {} by {}",
        mv.to, caller.token
    );
    events::add(
        &state.db,
        "moved",
        &format!("machine {name}"),
        &msg,
        db::now_s(),
    )
    .await?;
    get(State(state), caller, Path(name)).await
}

/// `Some(v)` for a field given, even as null: `None` only when it is absent.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachinePatch {
    /// A policy that exists.
    pub policy: Option<String>,
    /// A group name, or null for none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub group: Option<Option<String>>,
    /// `{"start": "..."}` sets the start action, `{"start": null}` removes it.
    pub actions: Option<Actions>,
}

#[utoipa::path(patch, path = "/v1/machines/{name}", tag = "machines",
    params(("name" = String, Path)), request_body = MachinePatch, security(("bearer" = [])),
    responses((status = 200, body = Machine), (status = 400, body = Problem),
        (status = 404, body = Problem)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(patch): Body<MachinePatch>,
) -> Result<Json<Machine>, ApiError> {
    caller.require(Role::Admin)?;
    existing(&state, &name).await?;
    if let Some(p) = &patch.policy {
        checked("policy", p)?;
        if db::policies::get(&state.db, p).await?.is_none() {
            return Err(ApiError::BadRequest(format!("no policy {p}")));
        }
    }
    if let Some(Some(g)) = &patch.group {
        checked("group", g)?;
    }
    // Absent: unchanged; null: removed; a string: checked, so that a template that
    // cannot expand is refused now rather than at failover.
    let start = patch.actions.as_ref().and_then(|a| a.start.as_ref());
    if let Some(Some(t)) = start {
        crate::recovery::jobs::template::check(t).map_err(ApiError::BadRequest)?;
    }
    let group = patch.group.as_ref().map(|g| g.as_deref());
    if !machines::patch(&state.db, &name, patch.policy.as_deref(), group).await? {
        return Err(not_found(&name));
    }
    if let Some(t) = start {
        if !recovery_state::set_start_action(&state.db, &name, t.as_deref()).await? {
            return Err(not_found(&name));
        }
    }
    let mut said = Vec::new();
    if let Some(p) = &patch.policy {
        said.push(format!("policy {p}"));
    }
    if let Some(g) = &patch.group {
        said.push(format!("group {}", g.as_deref().unwrap_or("none")));
    }
    if let Some(t) = start {
        said.push(match t {
            Some(t) => format!("start action {t:?}"),
            None => "no start action".to_string(),
        });
    }
    if !said.is_empty() {
        let msg = format!("{} set by {}", said.join(", "), caller.token);
        events::add(
            &state.db,
            "changed",
            &format!("machine {name}"),
            &msg,
            db::now_s(),
        )
        .await?;
    }
    get(State(state), caller, Path(name)).await
}

#[utoipa::path(delete, path = "/v1/machines/{name}", tag = "machines",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 404, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    checked("machine", &name)?;
    if !machines::remove(&state.db, &name).await? {
        return Err(not_found(&name));
    }
    let msg = format!("removed by {}; its certificates are revoked", caller.token);
    events::add(
        &state.db,
        "removed",
        &format!("machine {name}"),
        &msg,
        db::now_s(),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A replication group and its machines.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Group {
    pub name: String,
    pub machines: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct GroupList {
    pub items: Vec<Group>,
    pub next_after: Option<String>,
}

#[utoipa::path(get, path = "/v1/groups", tag = "machines", params(Page),
    security(("bearer" = [])),
    responses((status = 200, body = GroupList), (status = 401, body = Problem)))]
pub async fn groups(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Json<GroupList>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = page.limit()?;
    let pairs = machines::groups(&state.db, page.after.as_deref(), limit).await?;
    let mut items: Vec<Group> = Vec::new();
    for (group, machine) in pairs {
        match items.last_mut() {
            Some(g) if g.name == group => g.machines.push(machine),
            _ => items.push(Group {
                name: group,
                machines: vec![machine],
            }),
        }
    }
    let next_after = page.next_after(&items, |g| &g.name, limit);
    Ok(Json(GroupList { items, next_after }))
}
