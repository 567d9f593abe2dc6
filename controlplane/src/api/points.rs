//! `/v1/machines/{name}/points`: a machine's recovery points, read from the store
//! (`--store`), newest first. The control plane keeps no copy: the store is the
//! truth, and retention changes it.

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, Problem};
use super::{AppState, Page, Query};
use crate::error::Error;
use crate::recovery::points::{list_points, open_machine};

/// One point of one disk.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PointInfo {
    pub disk: String,
    /// The same instant has the same id on every disk of the machine.
    pub id: String,
    /// seed, crash or app.
    pub kind: String,
    /// RFC 3339.
    pub time: String,
    pub seq: u64,
    pub disk_bytes: u64,
    pub label: Option<String>,
    pub group: Option<String>,
}

/// One page of points, newest first.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct PointList {
    pub items: Vec<PointInfo>,
    /// `ID/DISK` of the last item: pass as `after` for the next page; null once a
    /// page comes back short.
    pub next_after: Option<String>,
}

/// Points sort newest first: by id descending (ids begin with their time), then disk.
/// `after` is `ID/DISK`: the items after it in that order.
fn after_key<'a>(p: &PointInfo, after: &(&'a str, &'a str)) -> bool {
    let (id, disk) = *after;
    p.id.as_str() < id || (p.id == id && p.disk.as_str() > disk)
}

#[utoipa::path(get, path = "/v1/machines/{name}/points", tag = "machines",
    params(("name" = String, Path), Page), security(("bearer" = [])),
    responses((status = 200, body = PointList),
        (status = 404, body = Problem, description = "the store has no such machine, or the control plane has no --store")))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<PointList>, ApiError> {
    ferry_replica::layout::check_name("machine", &name)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let limit = page.limit()?;
    let after = match &page.after {
        None => None,
        Some(a) => Some(a.split_once('/').ok_or_else(|| {
            ApiError::BadRequest(format!("after {a:?} must be ID/DISK (a next_after)"))
        })?),
    };
    let access = state.jobs.store.clone().ok_or_else(|| {
        ApiError::NotFound(
            "this control plane has no store (start it with --store and --key-file)".into(),
        )
    })?;
    let machine = name.clone();
    // The store's calls block their thread.
    let listed = tokio::task::spawn_blocking(move || {
        open_machine(&access.store, &machine, None).map(|disks| list_points(&disks))
    })
    .await
    .map_err(|e| ApiError::Internal(Box::new(e)))?;
    let rows = match listed {
        Ok(rows) => rows,
        Err(Error::NoMachine { .. }) => {
            return Err(ApiError::NotFound(format!(
                "no machine {name} in the store"
            )))
        }
        Err(e) => return Err(ApiError::Internal(Box::new(e))),
    };
    let mut items: Vec<PointInfo> = rows
        .into_iter()
        .map(|r| PointInfo {
            disk: r.disk,
            id: r.point.id,
            kind: r.point.kind.to_string(),
            time: r
                .point
                .time
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            seq: r.point.seq,
            disk_bytes: r.point.disk_bytes,
            label: r.point.label,
            group: r.point.group,
        })
        .collect();
    items.sort_by(|a, b| b.id.cmp(&a.id).then_with(|| a.disk.cmp(&b.disk)));
    let items: Vec<PointInfo> = items
        .into_iter()
        .filter(|p| after.as_ref().is_none_or(|a| after_key(p, a)))
        .take(limit as usize)
        .collect();
    let next_after = (items.len() == limit as usize)
        .then(|| items.last().map(|p| format!("{}/{}", p.id, p.disk)))
        .flatten();
    Ok(Json(PointList { items, next_after }))
}
