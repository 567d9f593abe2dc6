//! The HTTP API: `/v1`, JSON, one module per resource, one error type
//! (`error::ApiError`, RFC 9457 bodies), bearer tokens with roles (`auth`). Request
//! bodies are bounded (`BODY_LIMIT_BYTES`), unknown JSON fields refused, lists paged
//! with `?limit=&after=`. The OpenAPI document is generated from the handlers'
//! annotations, and the router is built through `Routes`, which records every route
//! it serves so that a test can hold the document to it.

pub mod auth;
pub mod enrollment;
pub mod error;
pub mod events;
pub mod heartbeats;
pub mod jobs;
pub mod machines;
pub mod meta;
pub mod peer;
pub mod plans;
pub mod points;
pub mod policies;
pub mod process_servers;
pub mod recovery;
pub mod recovery_hosts;
pub mod tokens;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::{on, MethodFilter};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};

use crate::db::Db;
use crate::enroll::ca::SiteCa;
use error::ApiError;

/// The largest request body taken: policies and tokens are a few hundred bytes.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;
/// Page size when `limit` is not given, and the most it may ask for.
pub const PAGE_DEFAULT: u32 = 100;
pub const PAGE_MAX: u32 = 1000;

/// The longest one request may take, its body included: a client that sends its
/// body a byte at a time (the header timeout ends once the headers are in), or a
/// database that hangs, holds one of the server's connections no longer. The slowest
/// thing a request does, a page of points from the store, takes far less.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Answers 503 for any request not served within `limit`, dropping its handler.
fn with_deadline<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    limit: Duration,
) -> Router<S> {
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: axum::middleware::Next| async move {
            match tokio::time::timeout(limit, next.run(req)).await {
                Ok(resp) => resp,
                Err(_) => ApiError::Unavailable(format!(
                    "the request was not served within {} s (its body came too slowly, or \
                     the control plane is overloaded)",
                    limit.as_secs_f64()
                ))
                .into_response(),
            }
        },
    ))
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    /// Signs enrolled agents' and process servers' certificates.
    pub ca: Arc<SiteCa>,
    pub metrics: Arc<meta::Metrics>,
    /// The OpenAPI document, rendered once.
    pub openapi: axum::body::Bytes,
    /// The job runner's wake-up and the store (`--store`), for jobs and points.
    pub jobs: crate::jobs::runner::Context,
}

/// A JSON body; its rejections (unknown field, syntax, size) become `ApiError`s.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(v) = axum::Json::<T>::from_request(req, state).await?;
        Ok(Body(v))
    }
}

/// A query string; its rejections become `ApiError`s.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(v) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Query(v))
    }
}

/// `?limit=&after=`: up to `limit` items whose key sorts after `after`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// 1 to 1000; default 100.
    pub limit: Option<u32>,
    /// The `next_after` of the previous page.
    pub after: Option<String>,
}

impl Page {
    pub fn limit(&self) -> Result<u32, ApiError> {
        match self.limit {
            None => Ok(PAGE_DEFAULT),
            Some(n) if (1..=PAGE_MAX).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::BadRequest(format!(
                "limit {n} must be from 1 to {PAGE_MAX}"
            ))),
        }
    }

    /// The key to pass as `after` for the next page: none once a page comes back short.
    pub fn next_after<T>(
        &self,
        items: &[T],
        key: impl Fn(&T) -> &String,
        limit: u32,
    ) -> Option<String> {
        if items.len() < limit as usize {
            return None;
        }
        items.last().map(|i| key(i).clone())
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Ferry control plane", description = "Policies, tokens, enrollment and the fleet of a Ferry site."),
    paths(
        policies::list, policies::create, policies::get, policies::update, policies::delete,
        tokens::list, tokens::create, tokens::delete,
        enrollment::create_token, enrollment::enroll, enrollment::renew,
        heartbeats::agent, heartbeats::process_server,
        machines::list, machines::get, machines::move_to, machines::update, machines::delete,
        machines::groups,
        process_servers::list, process_servers::get, process_servers::delete,
        recovery_hosts::heartbeat, recovery_hosts::list, recovery_hosts::delete,
        events::list,
        meta::healthz, meta::metrics, meta::openapi,
        jobs::list, jobs::get, jobs::cancel, jobs::resume, jobs::restart,
        points::list,
        webhooks::list, webhooks::create, webhooks::get, webhooks::delete,
        recovery::test_failover, recovery::test_failover_cleanup, recovery::failover,
        recovery::change_point, recovery::commit, recovery::cancel, recovery::reprotect,
        recovery::re_enable,
        plans::list, plans::create, plans::get, plans::replace, plans::delete,
        plans::test_failover, plans::test_failover_cleanup, plans::failover, plans::commit,
        plans::cancel, plans::reprotect,
    ),
    components(schemas(
        error::Problem,
        crate::recovery::jobs::enqueue::FailbackRequest
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Patch,
    Delete,
}

impl Verb {
    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Patch => MethodFilter::PATCH,
            Verb::Delete => MethodFilter::DELETE,
        }
    }
}

/// The API's routes alone, with their state: what the dashboard's forms call
/// in-process (`crate::dashboard::actions`), so that a button runs the very handler
/// `ferry cp` does.
pub(crate) fn api_routes(state: AppState) -> Router {
    routes().router.with_state(state)
}

/// A router that remembers what it serves.
struct Routes {
    router: Router<AppState>,
    served: Vec<(Verb, &'static str)>,
}

impl Routes {
    fn add<H, T>(mut self, verb: Verb, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.router = self.router.route(path, on(verb.filter(), handler));
        self.served.push((verb, path));
        self
    }
}

fn routes() -> Routes {
    use Verb::*;
    Routes {
        router: Router::new(),
        served: Vec::new(),
    }
    .add(Get, "/v1/policies", policies::list)
    .add(Post, "/v1/policies", policies::create)
    .add(Get, "/v1/policies/{name}", policies::get)
    .add(Patch, "/v1/policies/{name}", policies::update)
    .add(Delete, "/v1/policies/{name}", policies::delete)
    .add(Get, "/v1/tokens", tokens::list)
    .add(Post, "/v1/tokens", tokens::create)
    .add(Delete, "/v1/tokens/{name}", tokens::delete)
    .add(Post, "/v1/enrollment-tokens", enrollment::create_token)
    .add(Post, "/v1/enroll", enrollment::enroll)
    .add(Post, "/v1/renew", enrollment::renew)
    .add(Post, "/v1/heartbeat/agent", heartbeats::agent)
    .add(
        Post,
        "/v1/heartbeat/process-server",
        heartbeats::process_server,
    )
    .add(Get, "/v1/machines", machines::list)
    .add(Get, "/v1/machines/{name}", machines::get)
    .add(Patch, "/v1/machines/{name}", machines::update)
    .add(Delete, "/v1/machines/{name}", machines::delete)
    .add(Post, "/v1/machines/{name}/move", machines::move_to)
    .add(Get, "/v1/groups", machines::groups)
    .add(Get, "/v1/process-servers", process_servers::list)
    .add(Get, "/v1/process-servers/{name}", process_servers::get)
    .add(
        Delete,
        "/v1/process-servers/{name}",
        process_servers::delete,
    )
    .add(
        Post,
        "/v1/heartbeat/recovery-host",
        recovery_hosts::heartbeat,
    )
    .add(Get, "/v1/recovery-hosts", recovery_hosts::list)
    .add(Delete, "/v1/recovery-hosts/{name}", recovery_hosts::delete)
    .add(Get, "/v1/events", events::list)
    .add(Get, "/v1/openapi.json", meta::openapi)
    .add(Get, "/healthz", meta::healthz)
    .add(Get, "/metrics", meta::metrics)
    // Jobs, and the points the store holds (H2).
    .add(Get, "/v1/jobs", jobs::list)
    .add(Get, "/v1/jobs/{id}", jobs::get)
    .add(Post, "/v1/jobs/{id}/cancel", jobs::cancel)
    .add(Post, "/v1/jobs/{id}/resume", jobs::resume)
    .add(Post, "/v1/jobs/{id}/restart", jobs::restart)
    .add(Get, "/v1/machines/{name}/points", points::list)
    .add(Get, "/v1/webhooks", webhooks::list)
    .add(Post, "/v1/webhooks", webhooks::create)
    .add(Get, "/v1/webhooks/{name}", webhooks::get)
    .add(Delete, "/v1/webhooks/{name}", webhooks::delete)
    // The recovery jobs of one machine (issue 15, docs/recovery.md, "Jobs on machines").
    .add(
        Post,
        "/v1/machines/{name}/test-failover",
        recovery::test_failover,
    )
    .add(
        Post,
        "/v1/machines/{name}/test-failover-cleanup",
        recovery::test_failover_cleanup,
    )
    .add(Post, "/v1/machines/{name}/failover", recovery::failover)
    .add(
        Post,
        "/v1/machines/{name}/change-point",
        recovery::change_point,
    )
    .add(Post, "/v1/machines/{name}/commit", recovery::commit)
    .add(Post, "/v1/machines/{name}/cancel", recovery::cancel)
    .add(Post, "/v1/machines/{name}/reprotect", recovery::reprotect)
    .add(Post, "/v1/machines/{name}/re-enable", recovery::re_enable)
    .add(Get, "/v1/recovery-plans", plans::list)
    .add(Post, "/v1/recovery-plans", plans::create)
    .add(Get, "/v1/recovery-plans/{name}", plans::get)
    .add(Patch, "/v1/recovery-plans/{name}", plans::replace)
    .add(Delete, "/v1/recovery-plans/{name}", plans::delete)
    .add(
        Post,
        "/v1/recovery-plans/{name}/test-failover",
        plans::test_failover,
    )
    .add(
        Post,
        "/v1/recovery-plans/{name}/test-failover-cleanup",
        plans::test_failover_cleanup,
    )
    .add(Post, "/v1/recovery-plans/{name}/failover", plans::failover)
    .add(
        Post,
        "/v1/recovery-plans/{name}/reprotect",
        plans::reprotect,
    )
    .add(Post, "/v1/recovery-plans/{name}/commit", plans::commit)
    .add(Post, "/v1/recovery-plans/{name}/cancel", plans::cancel)
}

/// The whole service, ready to serve.
pub fn router(
    db: Db,
    ca: Arc<SiteCa>,
    jobs: crate::jobs::runner::Context,
) -> Result<Router, serde_json::Error> {
    let openapi = axum::body::Bytes::from(ApiDoc::openapi().to_json()?);
    let state = AppState {
        db,
        ca,
        metrics: Arc::new(meta::Metrics::default()),
        openapi,
        jobs,
    };
    let router = routes()
        .router
        // The dashboard's HTML pages: beside the API, not in its OpenAPI document.
        .merge(crate::dashboard::routes())
        .fallback(meta::not_found)
        .method_not_allowed_fallback(meta::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES));
    Ok(with_deadline(router, REQUEST_TIMEOUT)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            meta::track,
        ))
        .with_state(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that sends its headers, then its body too slowly, gets a 503 once the
    /// deadline passes instead of holding the connection as long as it likes.
    #[tokio::test]
    async fn a_body_sent_too_slowly_is_answered_503_at_the_deadline() {
        use std::io::{Read, Write};
        let app = Router::new().route(
            "/v1/echo",
            axum::routing::post(|Body(v): Body<serde_json::Value>| async move { axum::Json(v) }),
        );
        let app = with_deadline(app, Duration::from_millis(300));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let started = std::time::Instant::now();
        let answer = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // 100 bytes promised, 2 sent, the rest never.
            s.write_all(
                b"POST /v1/echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                  content-length: 100\r\n\r\n{\"",
            )
            .unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).to_string()
        })
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("not served within"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn every_served_route_is_in_the_openapi_document() {
        let doc = ApiDoc::openapi();
        let served = routes().served;
        assert!(served.len() >= 32);
        for (verb, path) in served {
            let item = doc
                .paths
                .paths
                .get(path)
                .unwrap_or_else(|| panic!("{path} is served but not in the OpenAPI document"));
            let op = match verb {
                Verb::Get => &item.get,
                Verb::Post => &item.post,
                Verb::Patch => &item.patch,
                Verb::Delete => &item.delete,
            };
            assert!(op.is_some(), "{verb:?} {path} is served but not documented");
        }
        let json = doc.to_json().unwrap();
        assert!(json.contains("\"openapi\":\"3.1.0\""), "{}", &json[..60]);
    }
}
