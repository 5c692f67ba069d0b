//! The plain-HTTP listeners of the agent that local callers (and, through NMI's redirect, pods)
//! reach: the node's IMDS, NMI and the local endpoints (VM extension, App Service, Arc). They
//! are served by [`keyless_ops::limits::serve`] under the process's connection governor
//! (timeouts, header size, the connection budget derived from `RLIMIT_NOFILE`, per-caller caps,
//! eviction of idle connections). Their token requests are counted per caller by the agent's
//! fair share ([`crate::Agent::fair_share`]) in the token handlers themselves ([`fair_share`]):
//! what is counted is exactly what each surface routes as a token request. A caller over its
//! share gets 429 + `Retry-After` in the surface's own error shape ([`Shape`]), answered
//! through the surface's request edge (access log, HTTP metrics) and counted as a
//! `too_many_requests` refusal.

use crate::Agent;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
pub use keyless_ops::limits::defaults::{HEADER_READ_TIMEOUT, MAX_HEADER_BYTES, REQUEST_TIMEOUT};
pub use keyless_ops::limits::is_own_address;
use keyless_ops::limits::{retry_after_value, Peer, Permit};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// A plain-text error as Go's `http.Error` writes it.
pub(crate) fn text(status: StatusCode, msg: &str) -> Response {
    keyless_ops::limits::plain_text(status, msg)
}

/// The error shape of a surface, for its 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// IMDS, Arc and the VM extension: `{"error": "...", "error_description": "..."}`.
    Imds,
    /// App Service: `{"statusCode": 429, "message": "..."}`.
    AppService,
    /// NMI (aad-pod-identity, Go `http.Error`): plain text.
    Nmi,
}

/// The 429 a caller over its fair share gets, as `shape` writes errors.
pub(crate) fn throttled(shape: Shape, retry_after: Duration) -> Response {
    let secs = retry_after.as_secs().max(1);
    let msg = format!("Too many requests from this caller. Retry after {secs} seconds.");
    let mut r = match shape {
        Shape::Imds => (
            StatusCode::TOO_MANY_REQUESTS,
            Json(serde_json::json!({"error": "too_many_requests", "error_description": msg})),
        )
            .into_response(),
        Shape::AppService => {
            let e = keyless_core::local_endpoints::app_service_error(429, &msg);
            (StatusCode::TOO_MANY_REQUESTS, Json(e.body)).into_response()
        }
        Shape::Nmi => text(StatusCode::TOO_MANY_REQUESTS, &msg),
    };
    r.headers_mut()
        .insert(header::RETRY_AFTER, retry_after_value(retry_after));
    r
}

/// Count a token request against its caller's fair share; every token handler calls this
/// first, for the surface (`keyless_ops::metrics::surface`) it routed the request to. Over the
/// share: `Err` with the 429 in `shape`, counted as a `too_many_requests` refusal (no audit
/// record: a flood would fill the audit file). No peer (a router driven without a listener):
/// not counted.
pub(crate) fn fair_share(
    agent: &Agent,
    peer: Option<&Peer>,
    surface: &'static str,
    shape: Shape,
) -> Result<Option<Permit>, Box<Response>> {
    let Some(peer) = peer else { return Ok(None) };
    match agent.fair_share.acquire(peer.caller) {
        Ok(p) => Ok(Some(p)),
        Err(wait) => {
            keyless_ops::metrics::token_throttled(surface);
            Err(Box::new(throttled(shape, wait)))
        }
    }
}

/// Accept on `listener` until the task is aborted (bounded as the module doc says), answering
/// each request with `handler(peer, request)`.
pub(crate) fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(SocketAddr, Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let gov = keyless_ops::limits::governor();
    keyless_ops::limits::serve(listener, gov, what, move |peer: Peer, req| {
        handler.clone()(peer.addr, req)
    })
}

/// Serve an axum router the same way (the local endpoints).
pub(crate) fn serve_router(
    listener: tokio::net::TcpListener,
    what: &'static str,
    app: axum::Router,
) -> tokio::task::JoinHandle<()> {
    use tower::ServiceExt;
    serve(listener, what, move |_, req| {
        let app = app.clone();
        async move {
            match app.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        }
    })
}
