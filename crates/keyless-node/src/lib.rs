//! `keyless node`: the host agent. It holds the host credential (a client certificate bound to
//! one VM, issued at join from a CSR so the private key never leaves the host, rotated at two
//! thirds of its life) and serves the IMDS contract on plain HTTP to local workloads.
//!
//! Every token request ends in one decision, [`Agent::decide`]: which identities may this
//! caller use, and which one does the request name. Today the caller is the host itself; pods
//! and local users plug in there.

pub mod credential;
pub mod extensions;
pub mod imds;
pub mod local;

use keyless_core::clock::Clock;
use keyless_core::imds::IssuedToken;
use keyless_core::refresh;
use keyless_core::selection::{CallerIdentities, IdentityRef, SelectionError, Selector};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot reach the Keyless server at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("the server refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("no host credential in {0} and no join token given (pass --join-token)")]
    NotJoined(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("state directory {path}: {source}")]
    State {
        path: String,
        source: std::io::Error,
    },
    #[error("pki: {0}")]
    Pki(#[from] keyless_pki::PkiError),
    #[error("http client: {0}")]
    Client(String),
}

pub type Result<T> = std::result::Result<T, NodeError>;

/// Settings of `keyless node`.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Base URL of the server, e.g. `https://10.0.0.1:8443`.
    pub server_url: String,
    /// PEM of the Keyless CA (trusted for the server's certificate).
    pub ca_pem: String,
    /// Where the host key and certificate live.
    pub state_dir: PathBuf,
    pub join_token: Option<String>,
    /// IMDS listen address (on a real host 169.254.169.254:80).
    pub imds_listen: SocketAddr,
    /// How often the VM's identity set is refreshed from the server.
    pub sync_interval: Duration,
    /// Private IP reported by `/metadata/instance` (detected when absent).
    pub private_ip: Option<String>,
    /// Command run (`sh -c`) after an extension installed a new certificate version. Set on
    /// the host, never from the control plane.
    pub extension_reload_hook: Option<String>,
    /// The local endpoints besides IMDS (VM extension, App Service, Arc).
    pub local: local::LocalConfig,
    /// Certificate stores of VM extensions must lie under this directory.
    pub extension_store_root: PathBuf,
}

/// What the server told us about our VM.
#[derive(Debug, Clone, Default)]
pub struct HostView {
    pub tenant_id: String,
    pub vm: Value,
    pub identities: CallerIdentities,
    /// The VM extensions the host carries (`{name, publisher, type, settings}`).
    pub extensions: Vec<Value>,
}

#[derive(Debug, Clone)]
struct Cached {
    token: IssuedToken,
    iat: u64,
}

/// Who is asking: the host's processes (IMDS, App Service, Arc), or a client of the legacy
/// VM-extension endpoint (which reaches at most 32 user-assigned identities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerKind {
    Host,
    Extension,
}

/// The running agent's shared state.
pub struct Agent {
    pub cfg: NodeConfig,
    pub clock: Arc<dyn Clock>,
    cred: credential::CredentialHolder,
    view: RwLock<Option<HostView>>,
    cache: Mutex<HashMap<(String, String), Cached>>,
    /// The VM extensions this host runs (the Key Vault certificate sync).
    pub extensions: extensions::ExtensionRunner,
    /// The legacy VM-extension endpoint, while the extension is attached.
    pub extension_endpoint: local::ExtensionEndpoint,
}

/// Why a token could not be served.
#[derive(Debug)]
pub enum TokenFailure {
    IdentityNotFound,
    /// The request names no single identity (e.g. several user-assigned and no selector).
    Ambiguous,
    Upstream(String),
}

impl Agent {
    /// The identities `caller` may use.
    fn allowed(&self, caller: CallerKind) -> Option<CallerIdentities> {
        let all = self
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|v| v.identities.clone())?;
        Some(match caller {
            CallerKind::Host => all,
            CallerKind::Extension => {
                let mut ids = all;
                ids.user
                    .truncate(keyless_core::local_endpoints::EXTENSION_MAX_USER_IDENTITIES);
                ids
            }
        })
    }

    /// The one decision point: the identity `selector` names among those `caller` may use.
    pub fn decide(
        &self,
        caller: CallerKind,
        selector: &Selector,
    ) -> std::result::Result<IdentityRef, SelectionError> {
        let allowed = self.allowed(caller).ok_or(SelectionError::NotFound)?;
        allowed.select(selector).cloned()
    }

    pub fn view(&self) -> Option<HostView> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fetch the VM and its identities; drop cached tokens of identities no longer assigned.
    pub async fn sync(&self) -> Result<()> {
        let client = self.cred.client();
        let url = format!("{}/keyless/host/v1/identities", self.cfg.server_url);
        let resp = client
            .get(&url)
            .send()
            .await
            .map_err(|source| NodeError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status == 401 || status == 403 {
            // Credential revoked or VM deleted: this host may use nothing.
            *self.view.write().unwrap_or_else(|p| p.into_inner()) = Some(HostView::default());
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
            self.extensions.reconcile(&[]);
            return Err(NodeError::Refused {
                status,
                message: body.to_string(),
            });
        }
        if status != 200 {
            return Err(NodeError::Refused {
                status,
                message: body.to_string(),
            });
        }
        let identities: CallerIdentities =
            serde_json::from_value(body["identities"].clone()).unwrap_or_default();
        let view = HostView {
            tenant_id: body["tenantId"].as_str().unwrap_or_default().to_string(),
            vm: body["vm"].clone(),
            identities,
            extensions: body["extensions"].as_array().cloned().unwrap_or_default(),
        };
        let allowed: Vec<String> = view
            .identities
            .system
            .iter()
            .chain(view.identities.user.iter())
            .map(|i| i.client_id.to_ascii_lowercase())
            .collect();
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(cid, _), _| allowed.contains(cid));
        let wanted = view.extensions.clone();
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Some(view);
        self.extensions.reconcile(&wanted);
        Ok(())
    }

    /// A token for `resource` as `caller`, from the cache when it is fresh enough.
    pub async fn token(
        &self,
        caller: CallerKind,
        selector: &Selector,
        resource: &str,
        bypass_cache: bool,
    ) -> std::result::Result<IssuedToken, TokenFailure> {
        if self.view().is_none() {
            let _ = self.sync().await;
        }
        let chosen = self.decide(caller, selector).map_err(|e| match e {
            SelectionError::Ambiguous => TokenFailure::Ambiguous,
            SelectionError::NotFound => TokenFailure::IdentityNotFound,
        })?;
        let key = (chosen.client_id.to_ascii_lowercase(), resource.to_string());
        let now = self.clock.now();
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        if let Some(c) = &cached {
            if !bypass_cache && !refresh::refresh_due(c.iat, c.token.expires_on, now) {
                return Ok(c.token.clone());
            }
        }
        match self.fetch(&chosen, resource).await {
            Ok(token) => {
                self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    key,
                    Cached {
                        token: token.clone(),
                        iat: now,
                    },
                );
                Ok(token)
            }
            Err(TokenFailure::IdentityNotFound) => {
                self.cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
                let _ = self.sync().await;
                Err(TokenFailure::IdentityNotFound)
            }
            Err(e) => match cached {
                // The server is unreachable: a cached token that is still good is served.
                Some(c) if refresh::servable(c.iat, c.token.expires_on, now) => Ok(c.token),
                _ => Err(e),
            },
        }
    }

    async fn fetch(
        &self,
        id: &IdentityRef,
        resource: &str,
    ) -> std::result::Result<IssuedToken, TokenFailure> {
        let url = format!("{}/keyless/host/v1/token", self.cfg.server_url);
        let body = serde_json::json!({"resource": resource, "selector": Selector::ClientId(id.client_id.clone())});
        let resp = self
            .cred
            .client()
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| TokenFailure::Upstream(format!("cannot reach the Keyless server: {e}")))?;
        let status = resp.status().as_u16();
        match status {
            200 => resp
                .json::<IssuedToken>()
                .await
                .map_err(|e| TokenFailure::Upstream(format!("bad token response: {e}"))),
            // The server refused this host the identity (not assigned, VM or credential gone);
            // the caller drops the cached token and re-syncs.
            400 | 401 | 403 | 404 => Err(TokenFailure::IdentityNotFound),
            _ => Err(TokenFailure::Upstream(format!(
                "the Keyless server answered {status}"
            ))),
        }
    }
}

/// A started agent.
pub struct RunningNode {
    pub imds_addr: SocketAddr,
    /// App Service endpoint, and the file holding its `IDENTITY_HEADER`.
    pub app_service_addr: Option<SocketAddr>,
    pub identity_header_file: Option<PathBuf>,
    pub arc_addr: Option<SocketAddr>,
    pub agent: Arc<Agent>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Join (if needed), sync, and serve IMDS.
pub async fn start(cfg: NodeConfig, clock: Arc<dyn Clock>) -> Result<RunningNode> {
    let listener = tokio::net::TcpListener::bind(cfg.imds_listen)
        .await
        .map_err(|source| NodeError::Bind {
            addr: cfg.imds_listen.to_string(),
            source,
        })?;
    let imds_addr = listener.local_addr().map_err(|source| NodeError::Bind {
        addr: cfg.imds_listen.to_string(),
        source,
    })?;
    let cred = credential::CredentialHolder::load_or_join(&cfg, clock.as_ref()).await?;
    let extensions = extensions::ExtensionRunner::new(
        cfg.state_dir.join("extensions"),
        cfg.ca_pem.clone(),
        cfg.extension_reload_hook.clone(),
        cfg.extension_store_root.clone(),
    );
    let agent = Arc::new(Agent {
        cfg,
        clock,
        cred,
        view: RwLock::new(None),
        cache: Mutex::new(HashMap::new()),
        extensions,
        extension_endpoint: Default::default(),
    });
    agent.sync().await?;
    follow_extension_endpoint(&agent).await;

    let bg = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(bg.cfg.sync_interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = bg.sync().await {
                tracing::warn!(error = %e, "identity sync failed");
            }
            follow_extension_endpoint(&bg).await;
            if let Err(e) = bg.cred.rotate_if_due(&bg.cfg, bg.clock.as_ref()).await {
                tracing::warn!(error = %e, "host credential rotation failed");
            }
        }
    });

    let (app_service_addr, identity_header_file) = match agent.cfg.local.app_service {
        Some(addr) => {
            let path = agent.cfg.state_dir.join("identity-header");
            let secret =
                local::write_identity_header(&path).map_err(|source| NodeError::State {
                    path: path.display().to_string(),
                    source,
                })?;
            let app = local::app_service_router(agent.clone(), Arc::new(secret));
            let bound = serve_local(addr, app, "App Service").await?;
            (Some(bound), Some(path))
        }
        None => (None, None),
    };
    let arc_addr = match agent.cfg.local.arc {
        Some(addr) => {
            let dir = agent.cfg.local.arc_token_dir.clone();
            let keys =
                local::ArcKeys::new(dir.clone(), agent.cfg.local.arc_group).map_err(|source| {
                    NodeError::State {
                        path: dir.display().to_string(),
                        source,
                    }
                })?;
            let app = local::arc_router(agent.clone(), Arc::new(keys));
            Some(serve_local(addr, app, "Arc").await?)
        }
        None => None,
    };

    let app = imds::router(agent.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "IMDS listener stopped");
        }
    });
    tracing::info!(%imds_addr, "IMDS endpoint listening");
    Ok(RunningNode {
        imds_addr,
        app_service_addr,
        identity_header_file,
        arc_addr,
        agent,
        task,
    })
}

/// Start, move or stop the VM-extension endpoint to follow the host view.
async fn follow_extension_endpoint(agent: &Arc<Agent>) {
    if !agent.cfg.local.extension {
        return;
    }
    let port = agent.view().and_then(|v| {
        v.extensions
            .iter()
            .find_map(keyless_core::local_endpoints::managed_identity_extension_port)
    });
    agent.extension_endpoint.reconcile(agent, port).await;
}

/// Bind `addr` and serve `app` there in the background; returns the bound address.
async fn serve_local(addr: SocketAddr, app: axum::Router, what: &str) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let bound = l.local_addr().unwrap_or(addr);
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    tracing::info!(%bound, "{what} endpoint listening");
    Ok(bound)
}
