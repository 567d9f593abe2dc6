//! `/v1/webhooks`: where events are POSTed (`crate::webhooks`). Admin to change,
//! viewer to read. The secret that signs a webhook's deliveries is made by the
//! control plane and shown once, in the answer to its creation.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Role};
use super::error::{ApiError, Problem};
use super::machines::rfc3339;
use super::{AppState, Body, Page, Query};
use crate::webhooks::{store, EVENT_KINDS};

/// The longest URL taken.
pub const URL_MAX_BYTES: usize = 2048;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// Follows the store's name rule.
    pub name: String,
    /// `https://...` (or `http://...`); no user or password in it.
    pub url: String,
    /// The event kinds to send: `health`, `job-succeeded`, `job-failed`,
    /// `job-cancelled`, `fencing`.
    pub events: Vec<String>,
}

/// A webhook as listed: never its secret.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Webhook {
    pub name: String,
    pub url: String,
    pub events: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    /// The id of the last event delivered, given up on or passed over.
    pub last_event_id: i64,
    /// Events the receiver took (answered 2xx).
    pub delivered: i64,
    /// Events given up on after every try failed.
    pub given_up: i64,
    /// The last failed try: which event, the answer or the network's error.
    pub last_error: Option<String>,
    /// RFC 3339.
    pub last_error_at: Option<String>,
}

/// The answer to a creation: the only time the secret is shown.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedWebhook {
    #[serde(flatten)]
    pub webhook: Webhook,
    /// The HMAC-SHA256 key of `Ferry-Signature` (its UTF-8 bytes). Shown only now.
    pub secret: String,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookList {
    pub items: Vec<Webhook>,
    pub next_after: Option<String>,
}

impl From<store::WebhookRow> for Webhook {
    fn from(r: store::WebhookRow) -> Webhook {
        Webhook {
            name: r.name,
            url: r.url,
            events: r.events,
            created_at: rfc3339(r.created_at),
            last_event_id: r.cursor,
            delivered: r.delivered,
            given_up: r.given_up,
            last_error: r.last_error,
            last_error_at: r.last_error_at.map(rfc3339),
        }
    }
}

/// A new secret: `ferry_whsec_` and 64 hex digits (32 random bytes).
fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("ferry_whsec_{}", hex::encode(bytes))
}

fn check_name(name: &str) -> Result<(), ApiError> {
    ferry_replica::layout::check_name("webhook", name)
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// An absolute http(s) URL with a host, without credentials or a fragment.
pub fn check_url(raw: &str) -> Result<(), ApiError> {
    let bad = |why: &str| Err(ApiError::BadRequest(format!("webhook url: {why}")));
    if raw.len() > URL_MAX_BYTES {
        return bad(&format!("over {URL_MAX_BYTES} bytes"));
    }
    let url = match url::Url::parse(raw) {
        Ok(u) => u,
        Err(e) => return bad(&format!("{raw:?} is not a URL: {e}")),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return bad(&format!("scheme {} must be https or http", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return bad("has no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        // It would be shown to every viewer; the signature authenticates instead.
        return bad("must not hold a user or password");
    }
    if url.fragment().is_some() {
        return bad("must not have a #fragment");
    }
    Ok(())
}

/// Known kinds, each once, at least one.
fn check_events(events: &[String]) -> Result<(), ApiError> {
    if events.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "webhook events: give at least one of {}",
            EVENT_KINDS.join(", ")
        )));
    }
    for (i, e) in events.iter().enumerate() {
        if !EVENT_KINDS.contains(&e.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "webhook events: unknown kind {e:?}; the kinds are {}",
                EVENT_KINDS.join(", ")
            )));
        }
        if events[..i].contains(e) {
            return Err(ApiError::BadRequest(format!(
                "webhook events: {e} is given twice"
            )));
        }
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", params(Page),
    security(("bearer" = [])),
    responses((status = 200, body = WebhookList), (status = 400, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<Page>,
) -> Result<Json<WebhookList>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = page.limit()?;
    let rows = store::list(&state.db, page.after.as_deref(), limit).await?;
    let items: Vec<Webhook> = rows.into_iter().map(Webhook::from).collect();
    let next_after = page.next_after(&items, |w| &w.name, limit);
    Ok(Json(WebhookList { items, next_after }))
}

#[utoipa::path(get, path = "/v1/webhooks/{name}", tag = "webhooks",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = Webhook), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Webhook>, ApiError> {
    caller.require(Role::Viewer)?;
    check_name(&name)?;
    let row = store::get(&state.db, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no webhook {name}")))?;
    Ok(Json(Webhook::from(row)))
}

#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", request_body = NewWebhook,
    security(("bearer" = [])),
    responses((status = 201, body = CreatedWebhook), (status = 400, body = Problem),
        (status = 403, body = Problem), (status = 409, body = Problem)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(new): Body<NewWebhook>,
) -> Result<(StatusCode, Json<CreatedWebhook>), ApiError> {
    caller.require(Role::Admin)?;
    check_name(&new.name)?;
    check_url(&new.url)?;
    check_events(&new.events)?;
    let secret = new_secret();
    if !store::create(&state.db, &new.name, &new.url, &new.events, &secret).await? {
        return Err(ApiError::Conflict(format!("webhook {} exists", new.name)));
    }
    let row = store::get(&state.db, &new.name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("webhook {} was deleted at once", new.name)))?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedWebhook {
            webhook: Webhook::from(row),
            secret,
        }),
    ))
}

#[utoipa::path(delete, path = "/v1/webhooks/{name}", tag = "webhooks",
    params(("name" = String, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    check_name(&name)?;
    if !store::delete(&state.db, &name).await? {
        return Err(ApiError::NotFound(format!("no webhook {name}")));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        for ok in [
            "https://hooks.example.com/ferry",
            "http://127.0.0.1:8080/in?x=1",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("ftp://example.com/", "scheme ftp"),
            ("not a url", "is not a URL"),
            ("https://user:pw@example.com/", "user or password"),
            ("https://example.com/#x", "fragment"),
            ("file:///etc/passwd", "scheme file"),
        ] {
            let e = check_url(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let long = format!("https://example.com/{}", "a".repeat(URL_MAX_BYTES));
        assert!(check_url(&long).unwrap_err().to_string().contains("over"));
    }

    #[test]
    fn event_kinds_are_checked() {
        assert!(check_events(&["health".into(), "fencing".into()]).is_ok());
        let e = check_events(&[]).unwrap_err().to_string();
        assert!(e.contains("at least one"), "{e}");
        let e = check_events(&["nope".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown kind \"nope\""), "{e}");
        let e = check_events(&["health".into(), "health".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn secrets_differ_and_have_their_prefix() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert!(a.starts_with("ferry_whsec_") && a.len() == 12 + 64, "{a}");
    }
}
