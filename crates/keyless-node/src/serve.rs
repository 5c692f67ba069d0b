//! The plain-HTTP listeners of the agent that local callers (and, through NMI's redirect, pods)
//! reach: the node's IMDS, NMI and the local endpoints (VM extension, App Service, Arc). They
//! are served by [`keyless_ops::limits::serve`] under the process's connection governor
//! (timeouts, header size, the connection budget derived from `RLIMIT_NOFILE`, per-caller caps,
//! eviction of idle connections), and their token requests are counted per caller by the
//! agent's fair share ([`crate::Agent::fair_share`]): a caller over its share gets 429 +
//! `Retry-After` in the surface's own error shape ([`Shape`]).

use crate::Agent;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
pub use keyless_ops::limits::defaults::{HEADER_READ_TIMEOUT, MAX_HEADER_BYTES, REQUEST_TIMEOUT};
pub use keyless_ops::limits::is_own_address;
use keyless_ops::limits::{is_token_path, retry_after_value, Peer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
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

/// Accept on `listener` until the task is aborted (bounded as the module doc says), answering
/// each request with `handler(peer, request)`; token requests over the caller's fair share are
/// answered 429 in the shape `shape(peer)` says.
pub(crate) fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    what: &'static str,
    shape: fn(&Agent, SocketAddr) -> Shape,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(SocketAddr, Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let gov = keyless_ops::limits::governor();
    keyless_ops::limits::serve(listener, gov, what, move |peer: Peer, req| {
        let agent = agent.clone();
        let handler = handler.clone();
        async move {
            let _permit = if is_token_path(req.uri().path()) {
                match agent.fair_share.acquire(peer.caller) {
                    Ok(p) => Some(p),
                    Err(wait) => return throttled(shape(&agent, peer.addr), wait),
                }
            } else {
                None
            };
            handler(peer.addr, req).await
        }
    })
}

/// Serve an axum router the same way (the local endpoints).
pub(crate) fn serve_router(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    what: &'static str,
    shape: Shape,
    app: axum::Router,
) -> tokio::task::JoinHandle<()> {
    use tower::ServiceExt;
    let shape_of: fn(&Agent, SocketAddr) -> Shape = match shape {
        Shape::Imds => |_, _| Shape::Imds,
        Shape::AppService => |_, _| Shape::AppService,
        Shape::Nmi => |_, _| Shape::Nmi,
    };
    serve(listener, agent, what, shape_of, move |_, req| {
        let app = app.clone();
        async move {
            match app.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        }
    })
}
