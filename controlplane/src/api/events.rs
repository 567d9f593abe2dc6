//! `/v1/events`: what happened to the fleet, oldest first, paged by id.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::machines::rfc3339;
use super::{AppState, Page, Query};
use crate::registry::events;

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub id: i64,
    /// RFC 3339.
    pub time: String,
    /// `enrolled`, `registered`, `assigned`, `moved`, `changed`, `removed`, `health`.
    pub kind: String,
    /// `machine NAME` or `process-server NAME`.
    pub subject: String,
    pub message: String,
}

impl From<events::Event> for Event {
    fn from(e: events::Event) -> Event {
        Event {
            id: e.id,
            time: rfc3339(e.time),
            kind: e.kind,
            subject: e.subject,
            message: e.message,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct EventList {
    pub items: Vec<Event>,
    /// The last id of this page (as text, like every `next_after`); null once a page
    /// comes back short.
    pub next_after: Option<String>,
}

/// `?limit=&after=`: `after` is an event id.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventPage {
    /// 1 to 1000; default 100.
    pub limit: Option<u32>,
    /// Events after this id (the previous page's `next_after`); default: from the first.
    pub after: Option<String>,
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventPage),
    security(("bearer" = [])),
    responses((status = 200, body = EventList), (status = 400, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<EventPage>,
) -> Result<Json<EventList>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = Page {
        limit: page.limit,
        after: None,
    }
    .limit()?;
    let after = match page.after.as_deref() {
        None => 0,
        Some(a) => a
            .parse::<i64>()
            .map_err(|_| ApiError::BadRequest(format!("after {a:?} is not an event id")))?,
    };
    let rows = events::list(&state.db, after, limit).await?;
    let next_after = if rows.len() < limit as usize {
        None
    } else {
        rows.last().map(|e| e.id.to_string())
    };
    let items = rows.into_iter().map(Event::from).collect();
    Ok(Json(EventList { items, next_after }))
}
