//! The ops listener every Keyless process runs beside its service listeners (`--metrics-listen`):
//! `GET /metrics` (the Prometheus text exposition of the process's recorder), `GET /healthz`
//! (200 `ok` while the process runs) and `GET /readyz` (200 when every readiness check passes,
//! else 503; a JSON [`crate::health::Report`] either way). Plain HTTP on loopback by default,
//! under the same connection limits and timeouts as every other listener
//! ([`crate::limits::serve`]).

use crate::health::Health;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use tower::ServiceExt;

/// Default ops listener addresses, in one place (loopback only: metrics and readiness are for
/// the operator's scraper on the machine, or a port-forward).
pub mod defaults {
    /// `keyless server` and `keyless up` (one process: one listener).
    pub const SERVER: &str = "127.0.0.1:9464";
    /// `keyless node` (NMI runs inside it).
    pub const NODE: &str = "127.0.0.1:9465";
    /// `keyless kv-agent`.
    pub const KV_AGENT: &str = "127.0.0.1:9466";
    /// `keyless pod-identity-addon`.
    pub const POD_IDENTITY_ADDON: &str = "127.0.0.1:9467";
    /// `keyless mic`.
    pub const MIC: &str = "127.0.0.1:9468";
    /// `keyless wi-webhook`.
    pub const WI_WEBHOOK: &str = "127.0.0.1:9469";
}

/// Content type of the text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the ops routes serve.
#[derive(Clone)]
struct Ops {
    metrics: Option<PrometheusHandle>,
    health: Health,
}

/// The ops routes (for the listener and for tests).
pub fn router(metrics: Option<PrometheusHandle>, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
        .with_state(Ops { metrics, health })
}

async fn render_metrics(State(ops): State<Ops>) -> Response {
    let text = match &ops.metrics {
        Some(h) => {
            let h = h.clone();
            tokio::task::spawn_blocking(move || {
                h.run_upkeep();
                h.render()
            })
            .await
            .unwrap_or_default()
        }
        None => String::new(),
    };
    let mut r = text.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(METRICS_CONTENT_TYPE),
    );
    r
}

async fn readyz(State(ops): State<Ops>) -> Response {
    // checks may touch the store: off the async threads
    let health = ops.health.clone();
    let report = match tokio::task::spawn_blocking(move || health.report()).await {
        Ok(r) => r,
        Err(_) => return (StatusCode::INTERNAL_SERVER_ERROR, "readiness failed").into_response(),
    };
    let status = if report.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

/// A running ops listener.
pub struct OpsListener {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for OpsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bind `addr` and serve the ops routes there until the returned listener is dropped.
pub async fn start(
    addr: SocketAddr,
    metrics: Option<PrometheusHandle>,
    health: Health,
) -> std::io::Result<OpsListener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(metrics, health);
    let task = crate::limits::serve(
        listener,
        crate::limits::governor(),
        "ops",
        move |_peer, req: Request<Body>| {
            let app = app.clone();
            async move {
                match app.oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            }
        },
    );
    tracing::info!(%bound, "ops listener (metrics, health) listening");
    Ok(OpsListener { addr: bound, task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let recorder = crate::metrics::builder().build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            ::metrics::counter!(crate::metrics::TOKENS_ISSUED, "surface" => "imds", "kind" => "managed_identity")
                .increment(3)
        });
        let health = Health::new();
        let synced = health.flag("first sync", "not yet");
        let ops = start("127.0.0.1:0".parse().unwrap(), Some(handle), health)
            .await
            .unwrap();
        assert_eq!(get(ops.addr, "/healthz").await, (200, "ok".into()));
        let (status, body) = get(ops.addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains(
                r#"keyless_tokens_issued_total{surface="imds",kind="managed_identity"} 3"#
            ),
            "{body}"
        );
        let (status, body) = get(ops.addr, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        let report: crate::health::Report = serde_json::from_str(&body).unwrap();
        assert_eq!(report.failing, ["first sync"]);
        synced.set();
        let (status, body) = get(ops.addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(get(ops.addr, "/nope").await.0, 404);
    }
}
