//! `keyless node`: the host agent. It holds the host credential (a client certificate bound to
//! one VM, issued at join from a CSR so the private key never leaves the host, rotated at two
//! thirds of its life) and serves the IMDS contract on plain HTTP to local workloads.
//!
//! Every token request ends in one decision, [`Agent::decide`]: which identities may this
//! caller use ([`CallerKind`]: the host, a client of the VM-extension endpoint, a pod through
//! NMI, an excepted pod), and which one does the request name. The identity sets are built
//! once per sync (hash-indexed, behind `Arc`s), so a decision costs the same with 1 or 1,000
//! identities on the host.
//!
//! With `--nmi` the agent is also aad-pod-identity's NMI for the pods of its node ([`nmi`]):
//! pods are found by source IP in a watch-fed index ([`pods`]) and decided here like any other
//! caller.

pub mod attest;
pub mod credential;
pub mod extensions;
pub mod imds;
pub mod iptables;
pub mod local;
pub mod nmi;
pub mod ops;
pub mod pods;
pub mod serve;
pub mod upstream;
pub mod wi_proxy;

pub use keyless_ops::limits::FairShareConfig;

use keyless_core::clock::Clock;
use keyless_core::imds::IssuedToken;
use keyless_core::pod_identity::{self, BoundIdentity, ClusterView};
use keyless_core::refresh;
use keyless_core::selection::{
    CallerIdentities, IdentityIndex, IdentityRef, SelectionError, Selector,
};
use keyless_ops::audit;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
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
    #[error("NMI: {0}")]
    Nmi(String),
}

pub type Result<T> = std::result::Result<T, NodeError>;

/// Settings of `keyless node`.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Base URLs of the server's replicas, e.g. `https://10.0.0.1:8443`, in the order they are
    /// tried: every call goes to the current one and fails over to the next on no answer or a
    /// 502/503/504 ([`upstream`]). At least one.
    pub server_urls: Vec<String>,
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
    /// Serve pods as aad-pod-identity's NMI (managed mode) on this node.
    pub nmi: Option<nmi::NmiConfig>,
    /// Where every token issuance and refusal of this node is recorded.
    pub audit: Arc<keyless_ops::audit::Audit>,
    /// Per-caller fair share of the token endpoints (IMDS, NMI per pod, local endpoints).
    pub fair_share: FairShareConfig,
}

/// What the server told us about our VM.
#[derive(Debug, Clone, Default)]
pub struct HostView {
    pub tenant_id: String,
    pub vm: Value,
    pub identities: CallerIdentities,
    /// The VM extensions the host carries (`{name, publisher, type, settings}`).
    pub extensions: Vec<Value>,
    /// The managed cluster whose node pool this host is in (`cluster` in the host view;
    /// absent for other hosts).
    pub cluster: Option<ClusterView>,
}

#[derive(Debug, Clone)]
struct Cached {
    /// Shared with the requests it answers (nothing of the token is copied per request).
    token: Arc<IssuedToken>,
    iat: u64,
}

/// Cached tokens by client id (lowercase), then resource: looked up without making a key.
type TokenCache = HashMap<String, HashMap<String, Cached>>;

/// Who is asking.
///
/// On a node of a managed cluster with pod identity enabled (the host view's
/// `cluster.podIdentity.enabled`), `Host` and `Extension` get the excepted set
/// ([`CallerKind::ExceptedPod`]'s): the node's processes and host-network pods are what
/// upstream calls the node, and they get the kubelet identity, never a pod identity — so an
/// excepted pod gets exactly what the node's IMDS answers. Elsewhere `Host` is every identity
/// of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerKind {
    /// The host's processes (IMDS, App Service, Arc): every identity of the VM (see above on a
    /// pod-identity node). Only peers that are the node itself (loopback or one of its
    /// addresses) are this kind when NMI runs ([`imds::serve`]).
    Host,
    /// A client of the legacy VM-extension endpoint: at most 32 user-assigned identities (of
    /// the excepted set on a pod-identity node).
    Extension,
    /// A pod through NMI, with the identities its bindings grant (sorted by AzureIdentity
    /// name): of those, the ones the host holds (matched by client id), picked by
    /// [`pod_identity::select`].
    Pod(Arc<[BoundIdentity]>),
    /// A pod an `AzurePodIdentityException` excepts: the node's identities minus every pod
    /// identity of the cluster ([`pod_identity::excluded_from_excepted`]: the host view's
    /// `cluster.podIdentity.clientIds`; on a plain scale set, the client ids of the
    /// `AzureIdentity` objects the watches have seen) — so the kubelet identity, never a pod
    /// identity.
    ExceptedPod,
}

/// The identity set of each caller kind, built once per sync (and again when the cluster's pod
/// identities change): a request clones one `Arc` and selects by hash lookup.
#[derive(Default)]
struct Synced {
    view: Arc<HostView>,
    /// Every identity of the VM (what pod identities are picked from).
    all: Arc<IdentityIndex>,
    host: Arc<IdentityIndex>,
    extension: Arc<IdentityIndex>,
    excepted: Arc<IdentityIndex>,
}

impl Synced {
    /// `keep`: the node's own identities (lowercase client ids, NMI's `--immutable-user-msis`),
    /// never taken from the node's processes even when an `AzureIdentity` binds pods to one.
    fn build(
        view: Arc<HostView>,
        k8s_pod_ids: &HashSet<String>,
        standard_nmi: bool,
        keep: &HashSet<String>,
    ) -> Self {
        let ids = &view.identities;
        let mut excluded = pod_identity::excluded_from_excepted(view.cluster.as_ref(), k8s_pod_ids);
        excluded.retain(|c| !keep.contains(c));
        let is_pod_identity =
            |i: &IdentityRef| excluded.contains(&i.client_id.to_ascii_lowercase());
        let excepted = CallerIdentities {
            system: ids.system.clone().filter(|i| !is_pod_identity(i)),
            user: ids
                .user
                .iter()
                .filter(|i| !is_pod_identity(i))
                .cloned()
                .collect(),
        };
        // a node of a pod-identity cluster, or one where NMI runs in standard mode (MIC
        // attaches pod identities to its scale set): the node itself is not a pod
        let pod_identity_node = standard_nmi
            || view
                .cluster
                .as_ref()
                .is_some_and(|c| c.pod_identity.enabled);
        let all = Arc::new(IdentityIndex::new(ids.clone()));
        let excepted = Arc::new(IdentityIndex::new(excepted));
        let host = if pod_identity_node {
            excepted.clone()
        } else {
            all.clone()
        };
        let mut extension = host.identities().clone();
        extension
            .user
            .truncate(keyless_core::local_endpoints::EXTENSION_MAX_USER_IDENTITIES);
        Synced {
            host,
            all,
            extension: Arc::new(IdentityIndex::new(extension)),
            excepted,
            view,
        }
    }
}

/// The identities a caller may use, as [`Agent::allowed`] hands them to the decision.
enum Allowed {
    Set(Arc<IdentityIndex>),
    /// The host's identities and the pod's bound ones.
    Pod(Arc<IdentityIndex>, Arc<[BoundIdentity]>),
}

impl Allowed {
    /// The identity `selector` names among these (borrowed from the set).
    fn select(&self, selector: &Selector) -> std::result::Result<&IdentityRef, SelectionError> {
        match self {
            Allowed::Set(ids) => ids.select(selector),
            Allowed::Pod(host, bound) => pod_identity::select(host, bound, selector),
        }
    }
}

/// The running agent's shared state.
pub struct Agent {
    pub cfg: NodeConfig,
    pub clock: Arc<dyn Clock>,
    /// The server's URLs and which one is current ([`upstream`]).
    servers: keyless_ops::failover::Endpoints,
    cred: credential::CredentialHolder,
    synced: RwLock<Option<Arc<Synced>>>,
    /// Client ids (lowercase) of every `AzureIdentity` in the cluster, fed by NMI's watches
    /// (used without a cluster profile only).
    k8s_pod_ids: RwLock<Arc<HashSet<String>>>,
    /// NMI while it serves: the node's IMDS hands it the requests of peers that are not the
    /// node ([`imds::serve`]).
    nmi: RwLock<Option<Arc<nmi::NmiState>>>,
    /// Tokens by (client id, resource), shared by every caller that may use the identity (the
    /// token is the same). Nothing is served from here without a decision: [`Agent::token`]
    /// runs [`Agent::decide`] on every request before looking here, so whatever takes an
    /// identity away from a caller — a deleted binding, a relabelled pod, an exception added
    /// (seen by NMI's watches within milliseconds), the identity leaving the host (next sync)
    /// — refuses that caller's very next request. That is how "a change drops that pod's cached
    /// tokens at once" holds without evicting entries other callers still use.
    cache: Mutex<TokenCache>,
    /// The VM extensions this host runs (the Key Vault certificate sync).
    pub extensions: extensions::ExtensionRunner,
    /// The legacy VM-extension endpoint, while the extension is attached.
    pub extension_endpoint: local::ExtensionEndpoint,
    /// Token requests per caller ([`serve`]), shared by every surface of the node.
    pub fair_share: Arc<keyless_ops::limits::CallerLimiter>,
    /// Token response bodies made lately ([`imds::BodyMemo`]).
    bodies: imds::BodyMemo,
    /// When the last completed on-demand resync started ([`Agent::sync_after`]).
    resynced: tokio::sync::Mutex<Option<std::time::Instant>>,
}

/// The identity a request names, for its audit record.
pub(crate) fn requested_identity(selector: &Selector) -> audit::Identity {
    let mut id = audit::Identity::default();
    match selector {
        Selector::SystemAssigned => {}
        Selector::ClientId(c) => id.client_id = Some(c.clone()),
        Selector::ObjectId(o) => id.object_id = Some(o.clone()),
        Selector::ResourceId(r) => id.resource_id = Some(r.clone()),
    }
    id
}

/// The reason code of an error answer for its audit record: the code the body carries
/// (`invalid_request`, `invalid_resource`, …), except "Identity not found", which IMDS sends
/// as `invalid_request` and the record names `identity_not_found`.
pub(crate) fn reason_of(e: &keyless_core::imds::ImdsError) -> String {
    let text = e.body["error_description"]
        .as_str()
        .or_else(|| e.body["message"].as_str());
    if text == Some("Identity not found") {
        return "identity_not_found".into();
    }
    if let Some(code) = e.body["error"].as_str() {
        return code.to_string();
    }
    match e.status {
        400 => "invalid_request",
        401 => "unauthorized",
        _ => "unknown",
    }
    .to_string()
}

/// A local caller for the audit record: the peer the listener saw (and the uid owning its
/// socket, when the listener could tell).
pub(crate) fn local_caller(peer: Option<&keyless_ops::limits::Peer>) -> audit::Caller {
    match peer {
        Some(p) => audit::Caller {
            peer: Some(p.addr.to_string()),
            uid: p.caller.uid(),
            ..Default::default()
        },
        None => audit::Caller::default(),
    }
}

/// Why a token could not be served.
#[derive(Debug)]
pub enum TokenFailure {
    /// The decision found no identity of the caller's that the request names.
    IdentityNotFound,
    /// The request names no single identity (e.g. several user-assigned and no selector).
    Ambiguous,
    /// The server refused this host the identity (no longer assigned, VM or credential gone).
    Refused,
    Upstream(String),
}

impl Agent {
    fn synced(&self) -> Option<Arc<Synced>> {
        self.synced
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The identities `caller` may use: an `Arc` of a set built at sync, whatever its size.
    fn allowed(&self, caller: &CallerKind) -> Option<Allowed> {
        let s = self.synced()?;
        Some(match caller {
            CallerKind::Host => Allowed::Set(s.host.clone()),
            CallerKind::Extension => Allowed::Set(s.extension.clone()),
            CallerKind::ExceptedPod => Allowed::Set(s.excepted.clone()),
            CallerKind::Pod(bound) => Allowed::Pod(s.all.clone(), bound.clone()),
        })
    }

    /// The one decision point: the identity `selector` names among those `caller` may use.
    pub fn decide(
        &self,
        caller: CallerKind,
        selector: &Selector,
    ) -> std::result::Result<IdentityRef, SelectionError> {
        self.allowed(&caller)
            .ok_or(SelectionError::NotFound)?
            .select(selector)
            .cloned()
    }

    pub(crate) fn nmi_state(&self) -> Option<Arc<nmi::NmiState>> {
        self.nmi.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_nmi(&self, st: Option<Arc<nmi::NmiState>>) {
        *self.nmi.write().unwrap_or_else(|p| p.into_inner()) = st;
    }

    pub fn view(&self) -> Option<Arc<HostView>> {
        self.synced().map(|s| s.view.clone())
    }

    /// The server URL the next call goes to first (the one that answered last).
    pub fn current_server(&self) -> &str {
        self.servers.current()
    }

    /// Install a new host view (or rebuild the sets of the current one).
    fn install(&self, view: Option<HostView>) -> Arc<Synced> {
        let mut slot = self.synced.write().unwrap_or_else(|p| p.into_inner());
        let view = match view {
            Some(v) => Arc::new(v),
            None => slot.as_ref().map(|s| s.view.clone()).unwrap_or_default(),
        };
        let k8s = self
            .k8s_pod_ids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let standard = self
            .cfg
            .nmi
            .as_ref()
            .is_some_and(|n| matches!(n.mode, pods::Mode::Standard(_)));
        let keep: HashSet<String> = self
            .cfg
            .nmi
            .as_ref()
            .map(|n| {
                n.immutable_user_msis
                    .iter()
                    .map(|c| c.to_ascii_lowercase())
                    .collect()
            })
            .unwrap_or_default();
        let s = Arc::new(Synced::build(view, &k8s, standard, &keep));
        *slot = Some(s.clone());
        s
    }

    /// The client ids of every `AzureIdentity` in the cluster (NMI's watches): excepted pods
    /// never get these. Rebuilds the excepted set when they change.
    pub fn set_cluster_pod_identities(&self, client_ids: HashSet<String>) {
        let ids: HashSet<String> = client_ids
            .into_iter()
            .map(|c| c.to_ascii_lowercase())
            .collect();
        {
            let mut cur = self.k8s_pod_ids.write().unwrap_or_else(|p| p.into_inner());
            if **cur == ids {
                return;
            }
            *cur = Arc::new(ids);
        }
        if self.synced().is_some() {
            self.install(None);
        }
    }

    /// [`Agent::sync`] unless one that *started* after `seen` (the moment the caller found its
    /// view too old) has completed: concurrent callers queue and share a fetch that began
    /// after their moment, never one that began before it. True when the view is that fresh.
    pub async fn sync_after(&self, seen: std::time::Instant) -> bool {
        let mut last = self.resynced.lock().await;
        if last.is_some_and(|started| started >= seen) {
            return true;
        }
        let started = std::time::Instant::now();
        let ok = self.sync().await.is_ok();
        if ok {
            *last = Some(started);
        }
        ok
    }

    /// Fetch the VM and its identities; drop cached tokens of identities no longer assigned.
    pub async fn sync(&self) -> Result<()> {
        let r = self.sync_once().await;
        metrics::counter!(
            keyless_ops::metrics::AGENT_SYNCS,
            "result" => keyless_ops::metrics::result_label(&r)
        )
        .increment(1);
        r
    }

    async fn sync_once(&self) -> Result<()> {
        let client = self.cred.client();
        let (url, resp) = upstream::send(&self.servers, "/keyless/host/v1/identities", |url| {
            client.get(url)
        })
        .await;
        let resp = resp.map_err(|source| NodeError::Unreachable { url, source })?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status == 401 || status == 403 {
            // Credential revoked or VM deleted: this host may use nothing.
            self.install(Some(HostView::default()));
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
            cluster: body
                .get("cluster")
                .filter(|c| c.is_object())
                .and_then(|c| serde_json::from_value(c.clone()).ok()),
        };
        let wanted = view.extensions.clone();
        let s = self.install(Some(view));
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|cid, _| s.all.by_client_id(cid).is_some());
        if let Some(n) = self.nmi_state() {
            n.index
                .set_trust(pod_identity::Trust::of(s.view.cluster.as_ref()));
        }
        self.extensions.reconcile(&wanted);
        Ok(())
    }

    /// A token for `resource` as `caller`, from the cache when it is fresh enough. `ev` (the
    /// surface's audit record) learns the audience, the identity asked for or chosen, and
    /// whether the cache answered; the surface records it with its answer.
    pub async fn token(
        &self,
        caller: CallerKind,
        selector: &Selector,
        resource: &str,
        bypass_cache: bool,
        ev: &mut audit::TokenEvent,
    ) -> std::result::Result<Arc<IssuedToken>, TokenFailure> {
        ev.audience = Some(resource.to_string());
        ev.identity = requested_identity(selector);
        let r = self
            .token_inner(caller, selector, resource, bypass_cache, ev)
            .await;
        if let Ok(t) = &r {
            ev.identity = audit::Identity {
                client_id: Some(t.client_id.clone()),
                object_id: Some(t.object_id.clone()),
                resource_id: Some(t.msi_res_id.clone()).filter(|r| !r.is_empty()),
            };
        }
        r
    }

    async fn token_inner(
        &self,
        caller: CallerKind,
        selector: &Selector,
        resource: &str,
        bypass_cache: bool,
        ev: &mut audit::TokenEvent,
    ) -> std::result::Result<Arc<IssuedToken>, TokenFailure> {
        if self.synced().is_none() {
            let _ = self.sync().await;
        }
        // the decision first, on every request: the cache only ever answers for an identity
        // the caller may use at this moment ([`Agent::decide`], borrowing the chosen identity
        // from the caller's set instead of copying it)
        let allowed = self.allowed(&caller);
        let chosen = allowed
            .as_ref()
            .ok_or(SelectionError::NotFound)
            .and_then(|a| a.select(selector))
            .map_err(|e| match e {
                SelectionError::Ambiguous => TokenFailure::Ambiguous,
                SelectionError::NotFound => TokenFailure::IdentityNotFound,
            })?;
        let cid: std::borrow::Cow<'_, str> =
            if chosen.client_id.bytes().any(|b| b.is_ascii_uppercase()) {
                chosen.client_id.to_ascii_lowercase().into()
            } else {
                chosen.client_id.as_str().into()
            };
        let now = self.clock.now();
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cid.as_ref())
            .and_then(|m| m.get(resource))
            .cloned();
        if let Some(c) = &cached {
            if !bypass_cache && !refresh::refresh_due(c.iat, c.token.expires_on, now) {
                ev.cached = Some(true);
                metrics::counter!(keyless_ops::metrics::AGENT_CACHE_HITS).increment(1);
                return Ok(c.token.clone());
            }
        }
        ev.cached = Some(false);
        metrics::counter!(keyless_ops::metrics::AGENT_CACHE_MISSES).increment(1);
        let fetched = self.fetch(chosen, resource).await;
        if cached.is_some() && !bypass_cache {
            // a cached token due for refresh
            metrics::counter!(
                keyless_ops::metrics::AGENT_TOKEN_RENEWALS,
                "result" => keyless_ops::metrics::result_label(&fetched)
            )
            .increment(1);
        }
        match fetched {
            Ok(token) => {
                let token = Arc::new(token);
                self.cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(cid.into_owned())
                    .or_default()
                    .insert(
                        resource.to_string(),
                        Cached {
                            token: token.clone(),
                            iat: now,
                        },
                    );
                Ok(token)
            }
            Err(TokenFailure::Refused) => {
                {
                    let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(m) = cache.get_mut(cid.as_ref()) {
                        m.remove(resource);
                        if m.is_empty() {
                            cache.remove(cid.as_ref());
                        }
                    }
                }
                let _ = self.sync().await;
                Err(TokenFailure::Refused)
            }
            Err(e) => match cached {
                // The server is unreachable: a cached token that is still good is served.
                Some(c) if refresh::servable(c.iat, c.token.expires_on, now) => {
                    ev.cached = Some(true);
                    Ok(c.token)
                }
                _ => Err(e),
            },
        }
    }

    async fn fetch(
        &self,
        id: &IdentityRef,
        resource: &str,
    ) -> std::result::Result<IssuedToken, TokenFailure> {
        let body = serde_json::json!({"resource": resource, "selector": Selector::ClientId(id.client_id.clone())});
        let client = self.cred.client();
        let (_, resp) = upstream::send(&self.servers, "/keyless/host/v1/token", |url| {
            client.post(url).json(&body)
        })
        .await;
        let resp = resp.map_err(|e| {
            TokenFailure::Upstream(format!(
                "cannot reach the Keyless server: {}",
                upstream::error_chain(&e)
            ))
        })?;
        let status = resp.status().as_u16();
        match status {
            200 => resp
                .json::<IssuedToken>()
                .await
                .map_err(|e| TokenFailure::Upstream(format!("bad token response: {e}"))),
            // The server refused this host the identity (not assigned, VM or credential gone);
            // the caller drops the cached token and re-syncs.
            400 | 401 | 403 | 404 => Err(TokenFailure::Refused),
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
    /// NMI, when started with [`NodeConfig::nmi`].
    pub nmi: Option<nmi::Nmi>,
    pub agent: Arc<Agent>,
    pub task: tokio::task::JoinHandle<()>,
}

impl RunningNode {
    /// Stop what must not outlive the agent: NMI's listeners and its iptables redirect. The
    /// node's IMDS listener stops accepting first, so no moment has the redirect gone while
    /// IMDS still takes new connections. Then every audit record emitted so far is written and
    /// synced ([`keyless_ops::audit::Audit::flush`]).
    pub async fn shutdown(&self) {
        self.task.abort();
        if let Some(n) = &self.nmi {
            n.shutdown().await;
        }
        self.agent.cfg.audit.flush().await;
    }
}

/// Join (if needed), sync, and serve IMDS.
pub async fn start(cfg: NodeConfig, clock: Arc<dyn Clock>) -> Result<RunningNode> {
    let servers = keyless_ops::failover::Endpoints::new(cfg.server_urls.iter().cloned())
        .ok_or_else(|| NodeError::Client("no server URL given (pass --server)".into()))?
        .counting(keyless_ops::metrics::AGENT_SERVER_FAILOVERS);
    let listener = keyless_ops::limits::bind(cfg.imds_listen)
        .await
        .map_err(|source| NodeError::Bind {
            addr: cfg.imds_listen.to_string(),
            source,
        })?;
    let imds_addr = listener.local_addr().map_err(|source| NodeError::Bind {
        addr: cfg.imds_listen.to_string(),
        source,
    })?;
    let cred = credential::CredentialHolder::load_or_join(&cfg, &servers, clock.as_ref()).await?;
    let extensions = extensions::ExtensionRunner::new(
        cfg.state_dir.join("extensions"),
        cfg.ca_pem.clone(),
        cfg.extension_reload_hook.clone(),
        cfg.extension_store_root.clone(),
    );
    let fair_share = keyless_ops::limits::CallerLimiter::new(cfg.fair_share);
    let agent = Arc::new(Agent {
        fair_share,
        cfg,
        clock,
        servers,
        cred,
        synced: RwLock::new(None),
        k8s_pod_ids: RwLock::new(Arc::new(HashSet::new())),
        nmi: RwLock::new(None),
        cache: Mutex::new(HashMap::new()),
        extensions,
        extension_endpoint: Default::default(),
        bodies: Default::default(),
        resynced: tokio::sync::Mutex::new(None),
    });
    agent.sync().await?;
    if let Some(n) = &agent.cfg.nmi {
        let cluster = agent.view().and_then(|v| v.cluster.clone());
        if let Some(why) =
            pod_identity::kubenet_refusal(cluster.as_ref(), n.allow_network_plugin_kubenet)
        {
            return Err(NodeError::Nmi(why));
        }
    }
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
            if let Err(e) = bg
                .cred
                .rotate_if_due(&bg.cfg, &bg.servers, bg.clock.as_ref())
                .await
            {
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

    let task = imds::serve(listener, agent.clone());
    tracing::info!(%imds_addr, "IMDS endpoint listening");
    let nmi = match agent.cfg.nmi.clone() {
        Some(c) => Some(nmi::start(agent.clone(), c).await?),
        None => None,
    };
    Ok(RunningNode {
        imds_addr,
        app_service_addr,
        identity_header_file,
        arc_addr,
        nmi,
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
async fn serve_local(
    addr: SocketAddr,
    app: axum::Router,
    what: &'static str,
) -> Result<SocketAddr> {
    let l = keyless_ops::limits::bind(addr)
        .await
        .map_err(|source| NodeError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let bound = l.local_addr().unwrap_or(addr);
    serve::serve_router(l, what, app);
    tracing::info!(%bound, "{what} endpoint listening");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uref(cid: &str) -> IdentityRef {
        IdentityRef {
            principal_id: format!("o-{cid}"),
            client_id: cid.into(),
            resource_id: format!("/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{cid}"),
            system_assigned: false,
        }
    }

    fn view(cluster: Option<serde_json::Value>) -> Arc<HostView> {
        Arc::new(HostView {
            identities: CallerIdentities {
                system: None,
                user: vec![uref("kubelet"), uref("pod-a"), uref("pod-b")],
            },
            cluster: cluster.map(|c| serde_json::from_value(c).unwrap()),
            ..Default::default()
        })
    }

    fn cids(ix: &IdentityIndex) -> Vec<String> {
        ix.identities()
            .user
            .iter()
            .map(|i| i.client_id.clone())
            .collect()
    }

    #[test]
    fn the_node_of_a_pod_identity_cluster_gets_the_excepted_set() {
        let k8s: HashSet<String> = ["kubelet".to_string()].into();
        let c =
            serde_json::json!({"podIdentity": {"enabled": true, "clientIds": ["POD-A", "pod-b"]}});
        let s = Synced::build(view(Some(c)), &k8s, false, &HashSet::new());
        assert_eq!(cids(&s.host), ["kubelet"], "host: never a pod identity");
        assert_eq!(cids(&s.extension), ["kubelet"]);
        assert_eq!(
            cids(&s.excepted),
            ["kubelet"],
            "a tenant's AzureIdentity with the kubelet's client id does not take it away"
        );
        assert_eq!(cids(&s.all), ["kubelet", "pod-a", "pod-b"]);
        // pod identity not enabled: the host is every identity
        let c = serde_json::json!({"podIdentity": {"enabled": false, "clientIds": []}});
        let s = Synced::build(view(Some(c)), &k8s, false, &HashSet::new());
        assert_eq!(cids(&s.host), ["kubelet", "pod-a", "pod-b"]);
        // a plain scale set: the AzureIdentity objects seen (the operator's) are excluded
        let k8s: HashSet<String> = ["pod-a".to_string()].into();
        let s = Synced::build(view(None), &k8s, false, &HashSet::new());
        assert_eq!(cids(&s.host), ["kubelet", "pod-a", "pod-b"]);
        assert_eq!(cids(&s.excepted), ["kubelet", "pod-b"]);
        // the node's own identity stays the node's even when an AzureIdentity binds pods to it
        let k8s: HashSet<String> = ["kubelet".to_string(), "pod-a".to_string()].into();
        let keep: HashSet<String> = ["kubelet".to_string()].into();
        let s = Synced::build(view(None), &k8s, true, &keep);
        assert_eq!(cids(&s.host), ["kubelet", "pod-b"]);
        assert_eq!(cids(&s.all), ["kubelet", "pod-a", "pod-b"]);
    }
}
