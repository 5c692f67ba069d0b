//! The local token endpoints besides IMDS, each in the shape its clients expect (rules in
//! `keyless_core::local_endpoints`), all ending in the agent's one decision point:
//!
//! - the legacy VM-extension endpoint, listening on `localhost:<port>` while the VM (or scale
//!   set) carries the `Microsoft.ManagedIdentity` extension — started and stopped with it;
//! - App Service (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`): the header secret is generated at
//!   start and written to a file only root can read;
//! - Azure Arc (`IDENTITY_ENDPOINT` + `IMDS_ENDPOINT`): each request without a key is answered
//!   401 with a fresh key file in the token directory, readable by root and one configured
//!   group; the file's content, presented once within a minute, gets the token.

use crate::serve::{fair_share, Shape};
use crate::{Agent, CallerKind, TokenFailure};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use keyless_core::imds::{ImdsError, TokenRequest};
use keyless_core::local_endpoints as le;
use keyless_ops::audit::{Surface, TokenEvent, TokenKind};
use keyless_ops::limits::Peer;
use keyless_ops::metrics::surface::{APPSERVICE, ARC, EXTENSION};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Which local endpoints a node serves, and where.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Serve the VM-extension endpoint while the extension is attached.
    pub extension: bool,
    /// App Service endpoint (`/MSI/token`).
    pub app_service: Option<SocketAddr>,
    /// Arc endpoint (`/metadata/identity/oauth2/token`).
    pub arc: Option<SocketAddr>,
    /// Where Arc key files are written (clients insist on `/var/opt/azcmagent/tokens`).
    pub arc_token_dir: PathBuf,
    /// The group (besides root) that may read Arc key files.
    pub arc_group: Option<u32>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            extension: false,
            app_service: None,
            arc: None,
            arc_token_dir: PathBuf::from(le::ARC_TOKEN_DIR),
            arc_group: None,
        }
    }
}

fn err(e: ImdsError) -> Response {
    (
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
        Json(e.body),
    )
        .into_response()
}

/// Record `ev` with the outcome of `r` and answer it.
async fn recorded(agent: &Agent, ev: TokenEvent, r: Result<Response, ImdsError>) -> Response {
    match r {
        Ok(resp) => {
            agent.cfg.audit.token(ev.issued()).await;
            resp
        }
        Err(e) => {
            let reason = crate::reason_of(&e);
            agent.cfg.audit.token(ev.refused(e.status, reason)).await;
            err(e)
        }
    }
}

fn failure(f: TokenFailure, app_service: bool) -> ImdsError {
    let (status, m) = match f {
        TokenFailure::IdentityNotFound | TokenFailure::Refused => {
            (400, "Identity not found".to_string())
        }
        TokenFailure::Ambiguous => (
            400,
            keyless_core::selection::SelectionError::Ambiguous.to_string(),
        ),
        TokenFailure::Upstream(m) => {
            tracing::warn!(error = %m, "token request failed upstream");
            (
                500,
                format!("Failed to retrieve token from the Active directory. {m}"),
            )
        }
    };
    if app_service {
        le::app_service_error(status, &m)
    } else {
        let error = if status == 500 {
            "unknown"
        } else {
            "invalid_request"
        };
        ImdsError {
            status,
            body: json!({"error": error, "error_description": m}),
        }
    }
}

fn metadata(h: &HeaderMap) -> Option<&str> {
    h.get("metadata").and_then(|v| v.to_str().ok())
}

fn pairs(raw: &str) -> Result<Vec<(String, String)>, ImdsError> {
    serde_urlencoded::from_str(raw).map_err(|_| ImdsError {
        status: 400,
        body: json!({"error": "invalid_request", "error_description": "The request could not be parsed"}),
    })
}

// ------------------------------------------------------------------ VM extension

async fn extension_token(
    State(agent): State<Arc<Agent>>,
    peer: Option<axum::Extension<Peer>>,
    method: Method,
    h: HeaderMap,
    RawQuery(q): RawQuery,
    body: axum::body::Bytes,
) -> Response {
    let _permit = match fair_share(&agent, peer.as_deref(), EXTENSION, Shape::Imds) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let who = crate::local_caller(peer.as_deref());
    let mut ev = TokenEvent::new(Surface::Extension, TokenKind::ManagedIdentity, who);
    let r = extension_answer(&agent, &method, &h, q, &body, &mut ev).await;
    recorded(&agent, ev, r).await
}

async fn extension_answer(
    agent: &Agent,
    method: &Method,
    h: &HeaderMap,
    q: Option<String>,
    body: &[u8],
    ev: &mut TokenEvent,
) -> Result<Response, ImdsError> {
    if h.contains_key("x-forwarded-for") {
        return Err(ImdsError {
            status: 400,
            body: json!({"error": "invalid_request", "error_description": "Requests with the X-Forwarded-For header are not accepted"}),
        });
    }
    // GET with a query, or POST with a form body (seed 001's curl --data)
    let raw = if method == Method::POST && !body.is_empty() {
        String::from_utf8_lossy(body).to_string()
    } else {
        q.unwrap_or_default()
    };
    let req = pairs(&raw).and_then(|p| le::extension_request(&p, metadata(h)))?;
    match agent
        .token(
            CallerKind::Extension,
            &req.selector,
            &req.resource,
            false,
            ev,
        )
        .await
    {
        Ok(t) => Ok(crate::imds::json_body(agent.bodies.get(
            &t,
            &req.selector,
            agent.clock.now(),
        ))),
        Err(f) => Err(failure(f, false)),
    }
}

pub fn extension_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/oauth2/token", any(extension_token))
        .route("/oauth2/token/", any(extension_token))
        .fallback(|| async {
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "unknown_source", "error_description": "Unknown Source"})),
            )
        })
        .with_state(agent)
        .layer(axum::middleware::from_fn_with_state(
            keyless_ops::request::Edge::fixed(keyless_ops::request::EXTENSION),
            keyless_ops::request::edge,
        ))
}

/// The VM-extension listener, following the host view (attached extension and its port).
#[derive(Default)]
pub struct ExtensionEndpoint {
    current: Mutex<Option<(u16, SocketAddr, oneshot::Sender<()>)>>,
}

impl ExtensionEndpoint {
    /// Where it listens now, if it does.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.1)
    }

    /// Start, move or stop the listener to match `port` (None: the extension is gone).
    pub async fn reconcile(&self, agent: &Arc<Agent>, port: Option<u16>) {
        let running = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.0);
        if running == port {
            return;
        }
        if let Some((p, _, stop)) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            tracing::info!(port = p, "VM-extension endpoint stopped");
            let _ = stop.send(());
        }
        let Some(port) = port else { return };
        let listener = match keyless_ops::limits::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(port, error = %e, "cannot listen for the VM-extension endpoint");
                return;
            }
        };
        let addr = listener
            .local_addr()
            .unwrap_or(([127, 0, 0, 1], port).into());
        let (tx, rx) = oneshot::channel::<()>();
        let app = extension_router(agent.clone());
        let task = crate::serve::serve_router(listener, "VM-extension", app);
        tokio::spawn(async move {
            let _ = rx.await;
            // stop accepting; connections in flight finish on their own
            task.abort();
        });
        tracing::info!(%addr, "VM-extension endpoint listening");
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((port, addr, tx));
    }
}

// ------------------------------------------------------------------ App Service

#[derive(Clone)]
struct AppServiceState {
    agent: Arc<Agent>,
    secret: Arc<String>,
}

async fn app_service_token(
    State(st): State<AppServiceState>,
    peer: Option<axum::Extension<Peer>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let _permit = match fair_share(&st.agent, peer.as_deref(), APPSERVICE, Shape::AppService) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let who = crate::local_caller(peer.as_deref());
    let mut ev = TokenEvent::new(Surface::AppService, TokenKind::ManagedIdentity, who);
    let r = app_service_answer(&st, &h, q, &mut ev).await;
    recorded(&st.agent, ev, r).await
}

async fn app_service_answer(
    st: &AppServiceState,
    h: &HeaderMap,
    q: Option<String>,
    ev: &mut TokenEvent,
) -> Result<Response, ImdsError> {
    let presented = h.get("x-identity-header").and_then(|v| v.to_str().ok());
    let req = pairs(&q.unwrap_or_default())
        .and_then(|p| le::app_service_request(&p, presented, &st.secret))?;
    match st
        .agent
        .token(CallerKind::Host, &req.selector, &req.resource, false, ev)
        .await
    {
        Ok(t) => Ok(Json(le::app_service_response(&t)).into_response()),
        Err(f) => Err(failure(f, true)),
    }
}

pub fn app_service_router(agent: Arc<Agent>, secret: Arc<String>) -> Router {
    Router::new()
        .route("/MSI/token", any(app_service_token))
        .route("/msi/token", any(app_service_token))
        .with_state(AppServiceState { agent, secret })
        .layer(axum::middleware::from_fn_with_state(
            keyless_ops::request::Edge::fixed(keyless_ops::request::APPSERVICE),
            keyless_ops::request::edge,
        ))
}

// ------------------------------------------------------------------ Arc

/// Outstanding Arc keys: content → (file, expiry).
pub struct ArcKeys {
    dir: PathBuf,
    group: Option<u32>,
    keys: Mutex<HashMap<String, (PathBuf, u64)>>,
}

/// How long a key file may be presented.
const ARC_KEY_LIFETIME: u64 = 60;
/// Key files outstanding at once (a local flood of challenges cannot fill the disk).
const ARC_MAX_OUTSTANDING: usize = 1024;

impl ArcKeys {
    pub fn new(dir: PathBuf, group: Option<u32>) -> std::io::Result<Self> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // parents this creates get 0755 explicitly: the process runs with umask 077, and group
        // members must be able to reach the key files
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .skip(1)
            .take_while(|p| !p.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(&dir)?;
        for p in missing {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
        // never follow a symlink planted where the directory should be, nor adopt a
        // directory someone else owns
        let meta = std::fs::symlink_metadata(&dir)?;
        if !meta.is_dir() || meta.uid() != 0 {
            return Err(std::io::Error::other(format!(
                "{} must be a directory owned by root",
                dir.display()
            )));
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750))?;
        if let Some(g) = group {
            std::os::unix::fs::chown(&dir, None, Some(g))?;
        }
        Ok(Self {
            dir,
            group,
            keys: Mutex::new(HashMap::new()),
        })
    }

    fn sweep(&self, now: u64) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (path, exp)| {
                let keep = *exp > now;
                if !keep {
                    let _ = std::fs::remove_file(path);
                }
                keep
            });
    }

    /// Write a fresh key file (0640, root and the group) and return its path.
    fn challenge(&self, now: u64) -> std::io::Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        self.sweep(now);
        if self.keys.lock().unwrap_or_else(|p| p.into_inner()).len() >= ARC_MAX_OUTSTANDING {
            return Err(std::io::Error::other("too many outstanding Arc challenges"));
        }
        let mut raw = [0u8; 32];
        aws_lc_rs::rand::fill(&mut raw).map_err(|_| std::io::Error::other("no randomness"))?;
        let key: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let path = self.dir.join(format!("{}.key", uuid::Uuid::new_v4()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&path)?;
        // on the open file: no path to race, and the mode regardless of umask
        if let Some(g) = self.group {
            std::os::unix::fs::fchown(&f, None, Some(g))?;
        }
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o640))?;
        // no trailing newline: clients send the content verbatim. No fsync: the key lives a
        // minute, is only valid in this process's memory, and readers see the page cache
        // (an fsync per challenge capped Arc at ~4k/s and blocked the runtime's workers)
        f.write_all(key.as_bytes())?;
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (path.clone(), now + ARC_KEY_LIFETIME));
        Ok(path)
    }

    /// Consume a presented key: valid once, within its lifetime.
    fn redeem(&self, presented: &str, now: u64) -> bool {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let found = keys.keys().find(|k| le::secret_eq(k, presented)).cloned();
        match found.and_then(|k| keys.remove(&k)) {
            Some((path, exp)) => {
                let _ = std::fs::remove_file(path);
                exp > now
            }
            None => false,
        }
    }
}

impl Drop for ArcKeys {
    /// Keys die with the agent: remove the files of those never presented.
    fn drop(&mut self) {
        for (_, (path, _)) in self.keys.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[derive(Clone)]
struct ArcState {
    agent: Arc<Agent>,
    keys: Arc<ArcKeys>,
}

/// The Arc endpoint. The challenge (401 with a fresh key file, the first leg of every Arc
/// token request) is not recorded; every other answer is.
async fn arc_token(
    State(st): State<ArcState>,
    peer: Option<axum::Extension<Peer>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let _permit = match fair_share(&st.agent, peer.as_deref(), ARC, Shape::Imds) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let who = crate::local_caller(peer.as_deref());
    let mut ev = TokenEvent::new(Surface::Arc, TokenKind::ManagedIdentity, who);
    match arc_answer(&st, &h, q, &mut ev).await {
        Err(ArcAnswer::Challenge(r)) => r,
        Ok(r) => recorded(&st.agent, ev, Ok(r)).await,
        Err(ArcAnswer::Error(e)) => recorded(&st.agent, ev, Err(e)).await,
    }
}

enum ArcAnswer {
    Challenge(Response),
    Error(ImdsError),
}

impl From<ImdsError> for ArcAnswer {
    fn from(e: ImdsError) -> Self {
        ArcAnswer::Error(e)
    }
}

async fn arc_answer(
    st: &ArcState,
    h: &HeaderMap,
    q: Option<String>,
    ev: &mut TokenEvent,
) -> Result<Response, ArcAnswer> {
    let req: TokenRequest =
        pairs(&q.unwrap_or_default()).and_then(|p| le::arc_request(&p, metadata(h)))?;
    let now = st.agent.clock.now();
    let presented =
        le::arc_presented_key(h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
    let Some(key) = presented else {
        return Err(ArcAnswer::Challenge(match st.keys.challenge(now) {
            Ok(path) => {
                let mut r = (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": "unauthorized", "error_description": "Read the key file named in WWW-Authenticate and send its content as Authorization: Basic <content>."})),
                )
                    .into_response();
                if let Ok(v) = HeaderValue::from_str(&le::arc_challenge(&path.to_string_lossy())) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                r
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write an Arc key file");
                err(ImdsError {
                    status: 500,
                    body: json!({"error": "unknown", "error_description": "The key file could not be written."}),
                })
            }
        }));
    };
    if !st.keys.redeem(key, now) {
        return Err(ArcAnswer::Error(ImdsError {
            status: 401,
            body: json!({"error": "unauthorized", "error_description": "The key is unknown, used or expired; request a new one."}),
        }));
    }
    match st
        .agent
        .token(CallerKind::Host, &req.selector, &req.resource, false, ev)
        .await
    {
        Ok(t) => Ok(crate::imds::json_body(st.agent.bodies.get(
            &t,
            &req.selector,
            now,
        ))),
        Err(f) => Err(ArcAnswer::Error(failure(f, false))),
    }
}

pub fn arc_router(agent: Arc<Agent>, keys: Arc<ArcKeys>) -> Router {
    Router::new()
        .route("/metadata/identity/oauth2/token", any(arc_token))
        .with_state(ArcState { agent, keys })
        .layer(axum::middleware::from_fn_with_state(
            keyless_ops::request::Edge::fixed(keyless_ops::request::ARC),
            keyless_ops::request::edge,
        ))
}

/// A random App Service identity header, written to `path` (0600).
pub fn write_identity_header(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| std::io::Error::other("no randomness"))?;
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    Ok(secret)
}
