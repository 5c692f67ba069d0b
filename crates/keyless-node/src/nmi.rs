//! NMI (aad-pod-identity's Node Managed Identity, managed mode) as a caller kind of this agent:
//! pods of this node ask `169.254.169.254:80`, iptables ([`crate::iptables`]) sends them here,
//! the source IP finds the pod in the watch-fed index ([`crate::pods`]), and
//! [`Agent::decide`](crate::Agent::decide) picks the identity like for any other caller
//! ([`CallerKind::Pod`], [`CallerKind::ExceptedPod`]). Requests and answers follow NMI
//! (`../shared/spec/pod-identity.md` §1.3):
//!
//! | path | answer |
//! |---|---|
//! | `/metadata/identity/oauth2/token…` (`/metadata` in any case) | `Metadata: true` required (400 JSON); no `resource` → 400; source IP matches no single pod → 500 `failed to match pod IP …`; excepted pod → exactly the node's IMDS answer for [`CallerKind::ExceptedPod`]; no (matching) identity → 404 `no azure identity found for request clientID …`; token failure → 403; else 200, the IMDS JSON |
//! | other paths with `/metadata/identity…oauth2…token` | 400 `Invalid request` |
//! | `/host/token…` | headers `podname` + `podns` (400), only from 127.0.0.1 (500), then as above for that pod; 200 `{"token": {…}, "clientid": …}` |
//! | `/metadata/instance…` with `--block-instance-metadata` | 403 `Request blocked by AAD Pod Identity NMI` |
//! | anything else | `Metadata: true` required, then what the node's IMDS answers (in process) |
//!
//! Error texts are plain text with a newline, as Go's `http.Error` writes them.
//!
//! Listening: pods reach NMI through a DNAT, which cannot target a loopback address from
//! `PREROUTING`, so NMI listens on a non-loopback address of the node — `--nmi-listen`, by
//! default the node's private IP (`--private-ip`, else the address it reaches the server
//! from) on port [`DEFAULT_PORT`] — and, for `/host/token`, also on `127.0.0.1` at the same
//! port. Connections are bounded as the node's IMDS listener's are ([`crate::serve`]).
//!
//! The redirect is not the security boundary. The node's IMDS listener answers NMI's way
//! ([`handle`]) every peer that is not the node itself, so a pod that reaches
//! `169.254.169.254` without the DNAT — before the chain is installed, across a repair, over a
//! conntrack entry or keep-alive connection older than the rule — gets the same answer as
//! through NMI (or a 503 while NMI is not serving), never the host's. Start order: the redirect
//! is installed and NMI serves (pods get 503 `Retry-After` until the watches have listed)
//! before NMI waits for the watches; a failed initial list does not stop the agent (the node's
//! IMDS keeps serving the node, pods keep getting 503 while the watches retry). Shutdown
//! order: the node's IMDS listener stops accepting, NMI stops answering pods, then the
//! redirect goes.
//!
//! `/host/token` is served on loopback only and trusts its caller as upstream does: whoever
//! can connect from the node's `127.0.0.1` (root, host-network pods) may name any pod of the
//! node.

use crate::iptables::Redirect;
use crate::pods::{self, Grant, IpMatch, PodEntry, PodIndex};
use crate::serve::{fair_share, text, Shape};
pub use crate::serve::{HEADER_READ_TIMEOUT, MAX_HEADER_BYTES, REQUEST_TIMEOUT};
use crate::{imds, Agent, CallerKind, NodeError, Result, TokenFailure};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use keyless_core::pod_explain as pe;
use keyless_core::pod_identity::{self as pi, Route};
use keyless_core::selection::Selector;
use keyless_ops::audit::{self, Surface, TokenEvent, TokenKind};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;

/// NMI's port (upstream's default).
pub const DEFAULT_PORT: u16 = 2579;
/// How often the iptables redirect is checked and repaired (upstream's 60 s).
pub const IPTABLES_RECONCILE_INTERVAL: Duration = Duration::from_secs(60);
/// How long a request from an IP the index does not know waits for the index to change.
pub const UNKNOWN_IP_WAIT: Duration = Duration::from_secs(1);
/// Standard mode's wait for MIC (upstream's defaults: 16 × 5 s, then 4 × 5 s).
pub const RETRY_ATTEMPTS_FOR_CREATED: u32 = 16;
pub const RETRY_ATTEMPTS_FOR_ASSIGNED: u32 = 4;
pub const FIND_IDENTITY_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// The `Retry-After` of standard mode's 503 (upstream's).
pub const NOT_ASSIGNED_RETRY_AFTER: &str = "20";
/// Where the kubelet's cgroups are found.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// MIC's error codes that end standard mode's wait at once (they do not clear by themselves).
pub const PERMANENT_MIC_ERRORS: [&str; 3] = [
    "AuthorizationFailed",
    "LinkedAuthorizationFailed",
    "NodeNotPlaced",
];
/// How long standard mode may wait at most: the answer must leave before the listener's
/// request timeout ([`REQUEST_TIMEOUT`]) cuts the request off with a bare 504.
pub fn max_wait() -> Duration {
    REQUEST_TIMEOUT.saturating_sub(Duration::from_secs(2))
}

/// Settings of NMI on this node.
#[derive(Debug, Clone)]
pub struct NmiConfig {
    /// This node's name (`spec.nodeName` of its pods).
    pub node_name: String,
    /// Kubeconfig file; None: `KUBECONFIG` or the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Listen address (the DNAT target; not loopback). None: the node's private IP,
    /// port [`DEFAULT_PORT`].
    pub listen: Option<SocketAddr>,
    /// Answer `/metadata/instance…` with 403.
    pub block_instance_metadata: bool,
    /// Run on a kubenet cluster even if the cluster does not allow it.
    pub allow_network_plugin_kubenet: bool,
    /// Require `Metadata: true` (upstream default since 1.8.4).
    pub metadata_header_required: bool,
    /// How often the iptables redirect is reconciled.
    pub iptables_interval: Duration,
    /// Managed (the bindings decide) or standard (MIC's assigned identities too).
    pub mode: pods::Mode,
    /// Standard mode: a pod whose identity is not `Assigned` after the wait gets 503 +
    /// `Retry-After` instead of 404.
    pub set_retry_after_header: bool,
    /// Standard mode's wait: up to `retry_attempts_for_created` × `find_identity_retry_interval`
    /// for MIC to write the pod's assigned identity, then up to
    /// `retry_attempts_for_assigned` × the interval for it to become `Assigned`.
    pub retry_attempts_for_created: u32,
    pub retry_attempts_for_assigned: u32,
    pub find_identity_retry_interval: Duration,
    /// Prove each pod's connection by the kernel (its socket in the pod's network namespace,
    /// held by a process of the pod's cgroup) before answering it.
    pub caller_attestation: bool,
    /// Where the cgroup file system is mounted (the kubelet's `kubepods` tree).
    pub cgroup_root: PathBuf,
    /// The node's own identities (client ids; MIC's `--immutable-user-msis` and its own, the
    /// kubelet identity): the node's processes keep them even when an `AzureIdentity` binds
    /// pods to one.
    pub immutable_user_msis: Vec<String>,
}

impl NmiConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        NmiConfig {
            node_name: node_name.into(),
            kubeconfig: None,
            listen: None,
            block_instance_metadata: false,
            allow_network_plugin_kubenet: false,
            metadata_header_required: true,
            iptables_interval: IPTABLES_RECONCILE_INTERVAL,
            mode: pods::Mode::Managed,
            set_retry_after_header: false,
            retry_attempts_for_created: RETRY_ATTEMPTS_FOR_CREATED,
            retry_attempts_for_assigned: RETRY_ATTEMPTS_FOR_ASSIGNED,
            find_identity_retry_interval: FIND_IDENTITY_RETRY_INTERVAL,
            caller_attestation: true,
            cgroup_root: PathBuf::from(CGROUP_ROOT),
            immutable_user_msis: vec![],
        }
    }
}

/// A running NMI: listeners, watches, the redirect and its reconcile loop.
pub struct Nmi {
    /// Where pods' redirected connections arrive (the DNAT target).
    pub addr: SocketAddr,
    /// The loopback listener (for `/host/token`), if separate.
    pub loopback_addr: Option<SocketAddr>,
    pub index: Arc<PodIndex>,
    /// The DNAT this NMI keeps in place (the readiness check compares the chain with it).
    pub redirect: Redirect,
    agent: Arc<Agent>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    _watches: pods::Watches,
    stopped: AtomicBool,
}

impl Nmi {
    fn stop_tasks(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    /// Stop serving and remove the iptables redirect (the reconcile loop first, so it cannot
    /// put it back). The node's IMDS answers pods 503 from here on.
    pub async fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        self.agent.set_nmi(None);
        self.stop_tasks();
        match tokio::task::spawn_blocking(Redirect::remove).await {
            Ok(Ok(())) => tracing::info!("iptables redirect removed"),
            Ok(Err(e)) => tracing::error!(error = %e, "cannot remove the iptables redirect"),
            Err(e) => tracing::error!(error = %e, "cannot remove the iptables redirect"),
        }
    }
}

impl Drop for Nmi {
    fn drop(&mut self) {
        if !self.stopped.swap(true, Ordering::SeqCst) {
            self.agent.set_nmi(None);
            self.stop_tasks();
            if let Err(e) = Redirect::remove() {
                tracing::error!(error = %e, "cannot remove the iptables redirect");
            }
        }
    }
}

fn nmi_err(m: impl std::fmt::Display) -> NodeError {
    NodeError::Nmi(m.to_string())
}

/// Start NMI for `agent` (already synced): watches with their initial lists, listeners, the
/// iptables redirect. Returns once all are in place.
pub async fn start(agent: Arc<Agent>, cfg: NmiConfig) -> Result<Nmi> {
    let listen = match cfg.listen {
        Some(a) => a,
        None => {
            let ip = imds::private_ip(&agent);
            let ip: IpAddr = ip.parse().map_err(|_| {
                nmi_err(format!(
                    "cannot tell this node's IP (got '{ip}'); pass --private-ip or --nmi-listen"
                ))
            })?;
            SocketAddr::new(ip, DEFAULT_PORT)
        }
    };
    if listen.ip().is_loopback() {
        return Err(nmi_err(format!(
            "--nmi-listen {listen}: pods are redirected with a DNAT, which cannot reach a loopback address; use an address of this node"
        )));
    }
    let attestor = if cfg.caller_attestation {
        let a = crate::attest::Attestor::new(cfg.cgroup_root.clone());
        a.check().map_err(|why| {
            nmi_err(format!(
                "caller attestation cannot work on this node: {why} (pass --caller-attestation=false to run without it: pods are then told apart by their source IP only)"
            ))
        })?;
        tracing::info!(cgroup_root = %cfg.cgroup_root.display(), "caller attestation on: each pod connection is proven by its socket and cgroup");
        Some(Arc::new(a))
    } else {
        tracing::warn!("caller attestation is off (--caller-attestation=false): NMI tells pods apart by their source IP only, so a pod that takes another pod's IP gets its tokens");
        None
    };
    let client = keyless_k8s::client(cfg.kubeconfig.as_deref())
        .await
        .map_err(nmi_err)?;
    let on_ids = agent.clone();
    let index = Arc::new(PodIndex::new(move |ids| {
        on_ids.set_cluster_pod_identities(ids)
    }));
    index.set_trust(pi::Trust::of(
        agent.view().and_then(|v| v.cluster.clone()).as_ref(),
    ));
    index.set_mode(cfg.mode);
    if matches!(cfg.mode, pods::Mode::Standard(_)) {
        let budget = cfg.find_identity_retry_interval
            * (cfg.retry_attempts_for_created + cfg.retry_attempts_for_assigned);
        if budget > max_wait() {
            tracing::warn!(
                budget_s = budget.as_secs(),
                max_s = max_wait().as_secs(),
                "the standard-mode wait (retry attempts × interval) exceeds the request timeout: a request waits at most the shorter"
            );
        }
    }

    let bind = |a: SocketAddr| async move {
        keyless_ops::limits::bind(a)
            .await
            .map_err(|source| NodeError::Bind {
                addr: a.to_string(),
                source,
            })
    };
    let main = bind(listen).await?;
    let addr = main.local_addr().unwrap_or(listen);
    let loopback = if addr.ip().is_unspecified() {
        None
    } else {
        Some(bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())).await?)
    };
    let loopback_addr = loopback.as_ref().and_then(|l| l.local_addr().ok());

    let target = if addr.ip().is_unspecified() {
        let ip: IpAddr = imds::private_ip(&agent).parse().map_err(|_| {
            nmi_err("cannot tell this node's IP for the DNAT target; pass --private-ip")
        })?;
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    };

    // serve first (pods get 503 until the watches have listed), then redirect, then wait
    let st = Arc::new(NmiState {
        imds: imds::router(agent.clone()),
        agent: agent.clone(),
        index: index.clone(),
        cfg: cfg.clone(),
        attestor,
        refusals: Mutex::new(HashMap::new()),
    });
    let handler = {
        let st = st.clone();
        move |peer: SocketAddr, req: Request<Body>| {
            let st = st.clone();
            let route = Some(route_template(req.uri().path()).into());
            keyless_ops::request::observe(
                keyless_ops::request::NMI,
                Some(peer.ip()),
                route,
                req,
                move |req| handle(st, peer, req),
            )
        }
    };
    let mut tasks = vec![serve_attested(main, handler.clone())];
    if let Some(l) = loopback {
        tasks.push(serve_attested(l, handler));
    }
    agent.set_nmi(Some(st));
    let mut nmi = Nmi {
        addr,
        loopback_addr,
        index: index.clone(),
        redirect: Redirect { target },
        agent: agent.clone(),
        tasks: Mutex::new(tasks),
        _watches: pods::Watches::default(),
        stopped: AtomicBool::new(false),
    };

    let redirect = Redirect { target };
    let r = redirect.clone();
    tokio::task::spawn_blocking(move || r.ensure())
        .await
        .map_err(nmi_err)?
        .map_err(nmi_err)?;
    tracing::info!(%target, "iptables redirect of 169.254.169.254:80 in place");
    let every = cfg.iptables_interval.max(Duration::from_secs(1));
    nmi.push_task(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let r = redirect.clone();
            match tokio::task::spawn_blocking(move || r.ensure()).await {
                Ok(Ok(true)) => tracing::warn!("iptables redirect repaired"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "iptables reconcile failed"),
                Err(e) => tracing::error!(error = %e, "iptables reconcile failed"),
            }
        }
    }));

    let (watches, listed) = pods::watch(
        client,
        &cfg.node_name,
        index.clone(),
        pods::INITIAL_SYNC_TIMEOUT,
    )
    .await;
    nmi._watches = watches;
    match listed {
        Ok(()) => tracing::info!(pods = index.len(), node = %cfg.node_name, "NMI watches listed"),
        // the node's IMDS keeps serving the node; pods get 503 until the watches list
        Err(e) => tracing::error!(error = %e, "NMI serves pods 503 until its watches have listed"),
    }
    tracing::info!(%addr, "NMI endpoint listening");
    Ok(nmi)
}

impl Nmi {
    fn push_task(&self, t: tokio::task::JoinHandle<()>) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(t);
    }
}

/// What NMI's handlers share (also reached from the node's IMDS listener for peers that are
/// not the node).
pub(crate) struct NmiState {
    agent: Arc<Agent>,
    pub(crate) index: Arc<PodIndex>,
    cfg: NmiConfig,
    imds: axum::Router,
    attestor: Option<Arc<crate::attest::Attestor>>,
    /// The last refusals of each pod, for explanations.
    refusals: Mutex<HashMap<(String, String), VecDeque<pe::RecentRefusal>>>,
}

/// Refusals kept per pod, and pods kept, for explanations.
pub const REFUSALS_PER_POD: usize = 10;
pub const REFUSAL_PODS: usize = 10_000;

/// A connection's attestation, made once (the 4-tuple is the connection's for its lifetime):
/// the pod uid it was proven for, or why it was not.
#[derive(Clone, Default)]
pub(crate) struct ConnAttestation(Arc<Mutex<Option<Attested>>>);

/// The pod uid a connection was attested for, and the verdict (why not, and its reason code).
type Attested = (String, std::result::Result<(), (String, &'static str)>);

/// [`serve`] with a [`ConnAttestation`] in every request of a connection.
fn serve_attested<F, Fut>(
    listener: tokio::net::TcpListener,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(SocketAddr, Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send + 'static,
{
    keyless_ops::limits::serve_with(
        listener,
        keyless_ops::limits::governor(),
        "NMI",
        |tcp| async move { Some((tcp, ConnAttestation::default())) },
        move |peer: keyless_ops::limits::Peer, req| handler.clone()(peer.addr, req),
    )
}

/// Whether `peer`'s connection comes from `pod` (always, with attestation off): proven once
/// per connection when the request carries its [`ConnAttestation`], else per request.
fn attest(
    st: &NmiState,
    conn: Option<&ConnAttestation>,
    pod: &PodEntry,
    peer: SocketAddr,
) -> std::result::Result<(), (String, &'static str)> {
    let Some(a) = &st.attestor else {
        return Ok(());
    };
    if let Some(c) = conn {
        let memo = c.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((uid, verdict)) = memo.as_ref() {
            if uid == &pod.uid {
                return verdict.clone();
            }
        }
    }
    let verdict = a
        .verify(&pod.uid, peer)
        .map_err(|e| (e.to_string(), e.reason()));
    if let Some(c) = conn {
        *c.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((pod.uid.clone(), verdict.clone()));
    }
    verdict
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// NMI's 400 for a missing `Metadata: true`.
fn metadata_missing() -> Response {
    let body = serde_json::json!({"error": "invalid_request", "error_description": "Required metadata header not specified"});
    let mut r = (StatusCode::BAD_REQUEST, format!("{body}\n")).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// NMI's 503 while it cannot tell pods apart yet (its watches have not listed, or it stopped).
pub(crate) fn not_ready() -> Response {
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "NMI is not ready to serve pod identities yet",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// The route template of an NMI request for metrics and the access log (paths NMI hands to
/// the node's IMDS get that router's template instead).
pub(crate) fn route_template(path: &str) -> String {
    match pi::route(path, true) {
        Route::Token => "/metadata/identity/oauth2/token",
        Route::InvalidTokenPath => "invalid token path",
        Route::HostToken => "/host/token",
        Route::BlockedInstance => "/metadata/instance",
        Route::Other => "other",
    }
    .to_string()
}

/// NMI's answer to `req` from `peer`.
pub(crate) async fn handle(st: Arc<NmiState>, peer: SocketAddr, req: Request<Body>) -> Response {
    if req.uri().path() == EXPLAIN_PATH {
        return explain(&st, peer, req.uri().query());
    }
    let route = pi::route(req.uri().path(), st.cfg.block_instance_metadata);
    // the fair share counts exactly what is routed as a token request
    let _permit = if route.is_token() {
        let p = req.extensions().get::<keyless_ops::limits::Peer>();
        match fair_share(&st.agent, p, keyless_ops::metrics::surface::NMI, Shape::Nmi) {
            Ok(p) => p,
            Err(r) => return *r,
        }
    } else {
        None
    };
    match route {
        Route::Token => {
            let query = req.uri().query().map(str::to_string);
            let conn = req.extensions().get::<ConnAttestation>().cloned();
            pod_token(&st, peer, conn.as_ref(), req.headers(), query.as_deref()).await
        }
        Route::InvalidTokenPath => text(StatusCode::BAD_REQUEST, "Invalid request"),
        Route::HostToken => {
            let query = req.uri().query().map(str::to_string);
            host_token(&st, peer, req.headers(), query.as_deref()).await
        }
        Route::BlockedInstance => text(
            StatusCode::FORBIDDEN,
            "Request blocked by AAD Pod Identity NMI",
        ),
        Route::Other => {
            if st.cfg.metadata_header_required
                && header_str(req.headers(), "metadata") != Some("true")
            {
                return metadata_missing();
            }
            // the agent is the node's IMDS: answer in process
            match st.imds.clone().oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        }
    }
}

/// NMI's local explanation endpoint (`keyless aks pod-identity explain --agent`).
pub const EXPLAIN_PATH: &str = "/explain";

/// `GET /explain?namespace=NS&pod=NAME[&identity=CLIENT_ID]`, from the node itself only (its
/// loopback): what NMI sees of the pod and why it is served or refused
/// (`keyless_core::pod_explain`), with its last refusals.
fn explain(st: &NmiState, peer: SocketAddr, query: Option<&str>) -> Response {
    if !peer.ip().to_canonical().is_loopback() {
        return text(
            StatusCode::FORBIDDEN,
            "explanations are served to the node itself only (127.0.0.1)",
        );
    }
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).unwrap_or_default();
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let (Some(ns), Some(name)) = (get("namespace"), get("pod")) else {
        return text(
            StatusCode::BAD_REQUEST,
            "parameters namespace and pod are required",
        );
    };
    let node = st.cfg.node_name.as_str();
    let facts = st.index.explain_facts(ns, name, node);
    let held: Option<std::collections::HashSet<String>> = st.agent.view().map(|v| {
        v.identities
            .system
            .iter()
            .chain(v.identities.user.iter())
            .map(|i| i.client_id.to_ascii_lowercase())
            .collect()
    });
    let rules = match st.cfg.mode {
        pods::Mode::Managed => pe::Rules::Managed,
        pods::Mode::Standard(n) => pe::Rules::Standard(n),
    };
    let empty = pods::ExplainFacts {
        pod: Default::default(),
        bindings: vec![],
        identities: vec![],
        exceptions: vec![],
        assigned: vec![],
        trust: pi::Trust::Operator,
        mode: st.cfg.mode,
    };
    let f = facts.as_ref().unwrap_or(&empty);
    let mut e = pe::explain(&pe::Facts {
        namespace: ns,
        name,
        pod: facts.as_ref().map(|f| &f.pod),
        agent_node: Some(node),
        rules,
        trust: &f.trust,
        bindings: &f.bindings,
        identities: &f.identities,
        exceptions: &f.exceptions,
        assigned: &f.assigned,
        node_identities: held.as_ref(),
        requested: get("identity"),
    });
    e.refusals = Some(
        st.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(ns.to_string(), name.to_string()))
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default(),
    );
    json(
        StatusCode::OK,
        &serde_json::to_value(&e).unwrap_or_default(),
    )
}

/// An NMI refusal: status, plain-text message, and the reason code its audit record carries.
struct Refusal(StatusCode, String, &'static str);

impl Refusal {
    fn response(&self) -> Response {
        text(self.0, &self.1)
    }
}

fn parse_request(query: Option<&str>) -> std::result::Result<pi::PodTokenRequest, Refusal> {
    // Go's URL.Query(): lenient, first value wins
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).unwrap_or_default();
    pi::parse_token_request(&pairs)
        .map_err(|m| Refusal(StatusCode::BAD_REQUEST, m.into(), "invalid_request"))
}

/// Record `ev` as refused with `resp`'s status and `reason`, and answer `resp`.
async fn refused(st: &NmiState, ev: TokenEvent, reason: &str, resp: Response) -> Response {
    if let (Some(ns), Some(name)) = (&ev.caller.pod_namespace, &ev.caller.pod_name) {
        let mut all = st.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() >= REFUSAL_PODS && !all.contains_key(&(ns.clone(), name.clone())) {
            // bounded: forget some pod's history (the pods of a node are far fewer)
            if let Some(k) = all.keys().next().cloned() {
                all.remove(&k);
            }
        }
        let ring = all.entry((ns.clone(), name.clone())).or_default();
        if ring.len() >= REFUSALS_PER_POD {
            ring.pop_front();
        }
        ring.push_back(pe::RecentRefusal {
            time: keyless_ops::audit::rfc3339_now(),
            status: resp.status().as_u16(),
            reason: reason.to_string(),
            identity: ev
                .identity
                .client_id
                .clone()
                .or_else(|| ev.identity.resource_id.clone())
                .or_else(|| ev.identity.object_id.clone()),
        });
    }
    st.agent
        .cfg
        .audit
        .token(ev.refused(resp.status().as_u16(), reason))
        .await;
    resp
}

fn pod_caller(pod: &PodEntry, ip: Option<IpAddr>, mut who: audit::Caller) -> audit::Caller {
    who.pod_namespace = Some(pod.namespace.clone());
    who.pod_name = Some(pod.name.clone());
    if let Some(ip) = ip {
        who.pod_ip = Some(ip.to_string());
    }
    who
}

async fn pod_token(
    st: &NmiState,
    peer: SocketAddr,
    conn: Option<&ConnAttestation>,
    h: &HeaderMap,
    query: Option<&str>,
) -> Response {
    let ip = peer.ip().to_canonical();
    let who = audit::Caller {
        peer: Some(peer.to_string()),
        pod_ip: Some(ip.to_string()),
        ..Default::default()
    };
    let ev = TokenEvent::new(Surface::Nmi, TokenKind::ManagedIdentity, who.clone());
    if st.cfg.metadata_header_required && header_str(h, "metadata") != Some("true") {
        return refused(st, ev, "invalid_request", metadata_missing()).await;
    }
    let req = match parse_request(query) {
        Ok(r) => r,
        Err(r) => return refused(st, ev, r.2, r.response()).await,
    };
    if !st.index.is_synced() {
        return refused(st, ev, "not_ready", not_ready()).await;
    }
    let pod = match st.index.lookup_ip(ip, UNKNOWN_IP_WAIT).await {
        IpMatch::One(p) => p,
        IpMatch::None => {
            tracing::info!(%ip, "no pod of this node has this IP");
            let r = text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("failed to match pod IP {ip} with []"),
            );
            return refused(st, ev, "pod_not_found", r).await;
        }
        IpMatch::Many(v) => {
            let names: Vec<String> = v
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            tracing::warn!(%ip, pods = ?names, "several pods claim this IP");
            let r = text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("failed to match pod IP {ip} with [{}]", names.join(" ")),
            );
            return refused(st, ev, "pod_ambiguous", r).await;
        }
    };
    let who = pod_caller(&pod, Some(ip), who);
    if let Err((why, reason)) = attest(st, conn, &pod, peer) {
        tracing::warn!(%peer, pod = %format!("{}/{}", pod.namespace, pod.name), %why, "caller not attested: refused");
        let ev = TokenEvent::new(Surface::Nmi, TokenKind::ManagedIdentity, who);
        let r = text(
            StatusCode::FORBIDDEN,
            &format!(
                "the connection from {peer} does not come from pod {}/{}: {why}",
                pod.namespace, pod.name
            ),
        );
        return refused(st, ev, reason, r).await;
    }
    let pod = match wait_assigned(st, ip, pod, &req.selector).await {
        Ok(p) => p,
        Err((pod, refusal)) => {
            let who = pod_caller(
                &pod,
                Some(ip),
                audit::Caller {
                    peer: Some(peer.to_string()),
                    ..Default::default()
                },
            );
            let mut ev = TokenEvent::new(Surface::Nmi, TokenKind::ManagedIdentity, who);
            ev.audience = Some(req.resource.clone());
            ev.identity = crate::requested_identity(&req.selector);
            let mut r = refusal.response();
            if refusal.0 == StatusCode::SERVICE_UNAVAILABLE {
                r.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(NOT_ASSIGNED_RETRY_AFTER),
                );
            }
            return refused(st, ev, refusal.2, r).await;
        }
    };
    if pod.grant == Grant::Excepted {
        // exactly what the node's IMDS answers, for the excepted caller kind
        return imds::token_for(
            &st.agent,
            CallerKind::ExceptedPod,
            Surface::Nmi,
            who,
            h,
            query,
        )
        .await;
    }
    let mut ev = TokenEvent::new(Surface::Nmi, TokenKind::ManagedIdentity, who);
    match pod_identity_token(st, &pod, &req, &mut ev).await {
        Ok((body, _)) => {
            st.agent.cfg.audit.token(ev.issued()).await;
            json(StatusCode::OK, &body)
        }
        Err(r) => refused(st, ev, r.2, r.response()).await,
    }
}

/// The pending identities of `pod` that `selector` waits for (standard mode): the one it names,
/// or — with no selector and nothing assigned yet — all of them.
fn awaited<'a>(pod: &'a PodEntry, selector: &Selector) -> Vec<&'a pods::Pending> {
    let names = |p: &pods::Pending| match selector {
        Selector::ClientId(c) => p.identity.client_id.eq_ignore_ascii_case(c),
        Selector::ResourceId(r) => {
            keyless_core::resource_id::ResourceId::parse(r)
                .ok()
                .map(|x| x.key())
                == keyless_core::resource_id::ResourceId::parse(&p.identity.resource_id)
                    .ok()
                    .map(|x| x.key())
        }
        // an object id is not in the AzureIdentity: wait for all of them
        Selector::ObjectId(_) => true,
        Selector::SystemAssigned => true,
    };
    let nothing_ready = matches!(&pod.grant, Grant::Bound(v) if v.is_empty());
    match selector {
        Selector::SystemAssigned | Selector::ObjectId(_) if !nothing_ready => vec![],
        _ => pod.pending.iter().filter(|p| names(p)).collect(),
    }
}

/// Standard mode: wait (on the index, no polling) until the identities the request needs are
/// `Assigned` — for MIC to write the object within the created budget, then for `Assigned`
/// within the assigned budget. MIC reporting an error ends the wait at once. Not assigned by
/// then: 404 (503 + `Retry-After` with `--set-retry-after-header`) naming what is missing.
async fn wait_assigned(
    st: &NmiState,
    ip: IpAddr,
    mut pod: Arc<PodEntry>,
    selector: &Selector,
) -> std::result::Result<Arc<PodEntry>, (Arc<PodEntry>, Refusal)> {
    if awaited(&pod, selector).is_empty() {
        return Ok(pod);
    }
    let step = st.cfg.find_identity_retry_interval;
    let t0 = tokio::time::Instant::now();
    // the answer must leave before the listener's request timeout cuts the request off
    let cut = t0 + max_wait();
    let created_by = (t0 + step * st.cfg.retry_attempts_for_created).min(cut);
    let mut assigned_by: Option<tokio::time::Instant> = None;
    let mut changed = st.index.subscribe();
    loop {
        let waiting = awaited(&pod, selector);
        if waiting.is_empty() {
            return Ok(pod);
        }
        let failed = waiting.iter().find_map(|p| p.error.clone().map(|e| (p, e)));
        let seen = waiting.iter().any(|p| p.state.is_some());
        if seen && assigned_by.is_none() {
            assigned_by =
                Some(tokio::time::Instant::now() + step * st.cfg.retry_attempts_for_assigned);
        }
        let deadline = assigned_by.unwrap_or(created_by);
        if failed.is_some() || tokio::time::Instant::now() >= deadline {
            let what: Vec<String> = waiting
                .iter()
                .map(|p| {
                    let state = match (&p.state, &p.error) {
                        (_, Some((code, msg))) => format!("MIC could not assign it: {code}: {msg}"),
                        (Some(s), None) => format!("its AzureAssignedIdentity is {}", s.as_str()),
                        (None, None) => "MIC has not created its AzureAssignedIdentity".to_string(),
                    };
                    format!("{}/{} ({state})", p.identity.namespace, p.identity.name)
                })
                .collect();
            tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), waited_ms = t0.elapsed().as_millis() as u64, identities = ?what, "identity not assigned");
            let status = if st.cfg.set_retry_after_header {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::NOT_FOUND
            };
            let msg = format!(
                "{}: not assigned to pod {}/{} yet: {}",
                pi::no_identity_message(selector),
                pod.namespace,
                pod.name,
                what.join("; ")
            );
            return Err((pod, Refusal(status, msg, "identity_not_assigned")));
        }
        let _ = tokio::time::timeout_at(deadline, changed.changed()).await;
        match st.index.by_ip(ip) {
            // the same pod (not a new one under its name: attestation was for this uid)
            IpMatch::One(p)
                if p.uid == pod.uid && p.namespace == pod.namespace && p.name == pod.name =>
            {
                pod = p
            }
            _ => {}
        }
    }
}

/// The token of `pod` for `req`: the IMDS JSON and the client id, or NMI's refusal.
async fn pod_identity_token(
    st: &NmiState,
    pod: &PodEntry,
    req: &pi::PodTokenRequest,
    ev: &mut TokenEvent,
) -> std::result::Result<(serde_json::Value, String), Refusal> {
    let not_found = |sel: &Selector| {
        tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), "no identity for the request");
        Refusal(
            StatusCode::NOT_FOUND,
            pi::no_identity_message(sel),
            "identity_not_found",
        )
    };
    let Grant::Bound(bound) = &pod.grant else {
        ev.audience = Some(req.resource.clone());
        ev.identity = crate::requested_identity(&req.selector);
        return Err(not_found(&req.selector));
    };
    let caller = || CallerKind::Pod(bound.clone());
    let mut r = st
        .agent
        .token(caller(), &req.selector, &req.resource, false, ev)
        .await;
    if matches!(r, Err(TokenFailure::IdentityNotFound))
        && matches!(st.cfg.mode, pods::Mode::Standard(_))
        && !bound.is_empty()
    {
        // MIC attached the identity a moment ago: this node's view of its scale set may be
        // older than that; look again once
        if st.agent.sync_after(std::time::Instant::now()).await {
            r = st
                .agent
                .token(caller(), &req.selector, &req.resource, false, ev)
                .await;
        }
    }
    match r {
        Ok(t) => {
            let body =
                keyless_core::imds::token_response(&t, &req.selector, st.agent.clock.now());
            Ok((body, t.client_id.clone()))
        }
        Err(TokenFailure::IdentityNotFound | TokenFailure::Ambiguous) => {
            Err(not_found(&req.selector))
        }
        Err(TokenFailure::Refused) => Err(Refusal(
            StatusCode::FORBIDDEN,
            format!(
                "failed to get service principal token for pod:{}/{}, error: the Keyless server refused this node the identity",
                pod.namespace, pod.name
            ),
            "identity_refused_by_server",
        )),
        Err(TokenFailure::Upstream(m)) => Err(Refusal(
            StatusCode::FORBIDDEN,
            format!(
                "failed to get service principal token for pod:{}/{}, error: {m}",
                pod.namespace, pod.name
            ),
            "upstream_error",
        )),
    }
}

async fn host_token(
    st: &NmiState,
    peer: SocketAddr,
    h: &HeaderMap,
    query: Option<&str>,
) -> Response {
    let ns = header_str(h, "podns").filter(|s| !s.is_empty());
    let name = header_str(h, "podname").filter(|s| !s.is_empty());
    // who asked: the local peer, naming a pod
    let who = audit::Caller {
        peer: Some(peer.to_string()),
        pod_namespace: ns.map(str::to_string),
        pod_name: name.map(str::to_string),
        ..Default::default()
    };
    let ev = TokenEvent::new(Surface::Nmi, TokenKind::ManagedIdentity, who.clone());
    let (Some(ns), Some(name)) = (ns, name) else {
        let r = text(
            StatusCode::BAD_REQUEST,
            "missing 'podname' and 'podns' from request header",
        );
        return refused(st, ev, "invalid_request", r).await;
    };
    if peer.ip().to_canonical() != IpAddr::V4(Ipv4Addr::LOCALHOST) {
        let r = text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "request remote address is not from a host",
        );
        return refused(st, ev, "not_from_host", r).await;
    }
    let req = match parse_request(query) {
        Ok(r) => r,
        Err(r) => return refused(st, ev, r.2, r.response()).await,
    };
    if !st.index.is_synced() {
        return refused(st, ev, "not_ready", not_ready()).await;
    }
    let Some(pod) = st.index.by_name(ns, name) else {
        let r = text(
            StatusCode::NOT_FOUND,
            &format!("failed to get pod {ns}/{name}, error: pods \"{name}\" not found"),
        );
        return refused(st, ev, "pod_not_found", r).await;
    };
    let mut ev = TokenEvent::new(Surface::Nmi, TokenKind::ManagedIdentity, who);
    match pod_identity_token(st, &pod, &req, &mut ev).await {
        Ok((token, client_id)) => {
            st.agent.cfg.audit.token(ev.issued()).await;
            json(
                StatusCode::OK,
                &serde_json::json!({"token": token, "clientid": client_id}),
            )
        }
        Err(r) => refused(st, ev, r.2, r.response()).await,
    }
}
