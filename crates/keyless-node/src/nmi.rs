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
use crate::serve::{fair_share, serve, text, Shape};
pub use crate::serve::{HEADER_READ_TIMEOUT, MAX_HEADER_BYTES, REQUEST_TIMEOUT};
use crate::{imds, Agent, CallerKind, NodeError, Result, TokenFailure};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use keyless_core::pod_identity::{self as pi, Route};
use keyless_core::selection::Selector;
use keyless_ops::audit::{self, Surface, TokenEvent, TokenKind};
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
    let mut tasks = vec![serve(main, "NMI", handler.clone())];
    if let Some(l) = loopback {
        tasks.push(serve(l, "NMI", handler));
    }
    agent.set_nmi(Some(st));
    let mut nmi = Nmi {
        addr,
        loopback_addr,
        index: index.clone(),
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
            pod_token(&st, peer, req.headers(), query.as_deref()).await
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
    match st
        .agent
        .token(
            CallerKind::Pod(bound.clone()),
            &req.selector,
            &req.resource,
            false,
            ev,
        )
        .await
    {
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
