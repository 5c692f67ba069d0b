//! The IMDS HTTP surface: `/metadata/identity/oauth2/token` (with and without the trailing
//! slash node's SDK sends), `/metadata/instance[/...]`, `/metadata/versions`,
//! `/metadata/identity/info`. Validation rules live in `keyless_core::imds`.
//!
//! [`serve`] is the listener: it knows each request's peer. Without NMI every peer is the host
//! ([`CallerKind::Host`]), as on a VM. With NMI only the node itself is: a peer that is
//! loopback or one of the node's own addresses ([`crate::serve::is_own_address`]); any other
//! peer is a pod that reached `169.254.169.254` without the redirect, and gets NMI's answer
//! for its source IP ([`crate::nmi`]) — or 503 `Retry-After` while NMI is not serving —
//! never the host's.

use crate::{Agent, CallerKind, TokenFailure};
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use keyless_core::api_version;
use keyless_core::imds::{self, ImdsError, IssuedToken, RequestHeaders};
use keyless_core::selection::Selector;
use keyless_ops::audit::{self, Surface, TokenEvent, TokenKind};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use tower::ServiceExt;

/// Serve the node's IMDS on `listener` (bounded as [`crate::serve`] describes), deciding who
/// asks by the peer address (see the module doc).
pub fn serve(listener: tokio::net::TcpListener, agent: Arc<Agent>) -> tokio::task::JoinHandle<()> {
    let app = router(agent.clone());
    crate::serve::serve(listener, "IMDS", move |peer, req| {
        let (agent, app) = (agent.clone(), app.clone());
        // request id, span, metrics and access log, as the surface the peer gets
        let surface = match shape(&agent, peer) {
            crate::serve::Shape::Nmi => keyless_ops::request::NMI,
            _ => keyless_ops::request::IMDS,
        };
        let route = if surface == keyless_ops::request::NMI {
            Some(crate::nmi::route_template(req.uri().path()).into())
        } else {
            token_route(&req).map(Into::into)
        };
        keyless_ops::request::observe(surface, Some(peer.ip()), route, req, move |req| {
            dispatch(agent, app, peer, req)
        })
    })
}

/// The surface a peer gets: a pod NMI's, the node's own callers IMDS's.
fn shape(agent: &Agent, peer: SocketAddr) -> crate::serve::Shape {
    if agent.cfg.nmi.is_some() && !crate::serve::is_own_address(peer.ip()) {
        crate::serve::Shape::Nmi
    } else {
        crate::serve::Shape::Imds
    }
}

async fn dispatch(
    agent: Arc<Agent>,
    app: Router,
    peer: SocketAddr,
    req: Request<Body>,
) -> Response {
    if agent.cfg.nmi.is_some() && !crate::serve::is_own_address(peer.ip()) {
        return match agent.nmi_state() {
            Some(st) => crate::nmi::handle(st, peer, req).await,
            None => crate::nmi::not_ready(),
        };
    }
    // the token route, as the router would route it (exact path, GET), without the router's
    // per-request machinery; everything else (HEAD, other methods, other paths) goes through it
    // (its route template is known to the edge up front: [`token_route`])
    if token_route(&req).is_some() {
        return token(State(agent), req).await;
    }
    match app.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// The route template of a request the token route answers: its exact path, `GET` (as the
/// router routes it; `HEAD` and other methods go through the router).
fn token_route(req: &Request<Body>) -> Option<&'static str> {
    if req.method() != Method::GET {
        return None;
    }
    [TOKEN_PATH, TOKEN_PATH_SLASH]
        .into_iter()
        .find(|p| *p == req.uri().path())
}

const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
const TOKEN_PATH_SLASH: &str = "/metadata/identity/oauth2/token/";

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(TOKEN_PATH, get(token))
        .route(TOKEN_PATH_SLASH, get(token))
        .route("/metadata/identity/info", get(info))
        .route("/metadata/versions", get(versions))
        .route("/metadata/instance", get(instance))
        .route("/metadata/instance/", get(instance))
        .route("/metadata/instance/{*path}", get(instance))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"error": "Not found"}))) })
        .with_state(agent)
        // the route template for the edge around this router (`serve`, NMI)
        .layer(axum::middleware::from_fn(
            keyless_ops::request::matched_route,
        ))
}

fn err(e: ImdsError) -> Response {
    (
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
        Json(e.body),
    )
        .into_response()
}

fn headers(h: &HeaderMap) -> RequestHeaders<'_> {
    RequestHeaders {
        metadata: h.get("metadata").and_then(|v| v.to_str().ok()),
        forwarded: h.contains_key("x-forwarded-for"),
    }
}

async fn token(State(agent): State<Arc<Agent>>, req: Request<Body>) -> Response {
    // headers and query read in place (extractors would copy them)
    let peer = req.extensions().get::<keyless_ops::limits::Peer>();
    // the node's own callers (pods are NMI's, which counts its own token routes)
    let _permit = match crate::serve::fair_share(
        &agent,
        peer,
        keyless_ops::metrics::surface::IMDS,
        crate::serve::Shape::Imds,
    ) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let who = crate::local_caller(peer);
    token_for(
        &agent,
        CallerKind::Host,
        Surface::Imds,
        who,
        req.headers(),
        req.uri().query(),
    )
    .await
}

/// The IMDS token endpoint's answer for `caller` (the host here; NMI answers excepted pods
/// with it, so they get exactly what this handler gives), recorded in the audit trail as
/// `surface` / `who` asked.
pub async fn token_for(
    agent: &Agent,
    caller: CallerKind,
    surface: Surface,
    who: audit::Caller,
    h: &HeaderMap,
    query: Option<&str>,
) -> Response {
    let mut ev = TokenEvent::new(surface, TokenKind::ManagedIdentity, who);
    let (resp, ev) = match answer(agent, caller, h, query, &mut ev).await {
        Ok(body) => (json_body(body), ev.issued()),
        Err(e) => {
            let ev = ev.refused(e.status, crate::reason_of(&e));
            (err(e), ev)
        }
    };
    agent.cfg.audit.token(ev).await;
    resp
}

async fn answer(
    agent: &Agent,
    caller: CallerKind,
    h: &HeaderMap,
    query: Option<&str>,
    ev: &mut TokenEvent,
) -> Result<axum::body::Bytes, ImdsError> {
    imds::check_headers(headers(h))?;
    let req = imds::parse_query(query.unwrap_or("")).and_then(|q| imds::parse_token_request(&q))?;
    match agent
        .token(caller, &req.selector, &req.resource, req.bypass_cache, ev)
        .await
    {
        Ok(t) => Ok(agent.bodies.get(&t, &req.selector, agent.clock.now())),
        Err(TokenFailure::IdentityNotFound | TokenFailure::Refused) => {
            Err(ImdsError::identity_not_found())
        }
        Err(TokenFailure::Ambiguous) => Err(ImdsError::not_selected(
            &keyless_core::selection::SelectionError::Ambiguous.to_string(),
        )),
        Err(TokenFailure::Upstream(m)) => {
            tracing::warn!(error = %m, "token request failed upstream");
            Err(ImdsError {
                status: 500,
                body: json!({"error": "unknown", "error_description": format!("Failed to retrieve token from the Active directory. {m}")}),
            })
        }
    }
}

/// A 200 with a JSON body already serialized (as `Json` answers).
pub(crate) fn json_body(body: axum::body::Bytes) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// [`imds::token_response`]'s body, serialized straight from the token: the same bytes as
/// serializing that `Value` (its object keeps keys sorted; fields here are declared in that
/// order), without building it.
pub(crate) fn token_body(t: &IssuedToken, selector: &Selector, now: u64) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        access_token: &'a str,
        client_id: &'a str,
        expires_in: &'a str,
        expires_on: &'a str,
        ext_expires_in: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        msi_res_id: Option<&'a str>,
        not_before: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        object_id: Option<&'a str>,
        refresh_token: &'a str,
        resource: &'a str,
        token_type: &'a str,
    }
    let expires_in = t.expires_on.saturating_sub(now).to_string();
    let (expires_on, not_before) = (t.expires_on.to_string(), t.not_before.to_string());
    let mut b = Body {
        access_token: &t.access_token,
        client_id: &t.client_id,
        expires_in: &expires_in,
        expires_on: &expires_on,
        ext_expires_in: &expires_in,
        msi_res_id: None,
        not_before: &not_before,
        object_id: None,
        refresh_token: "",
        resource: &t.resource,
        token_type: "Bearer",
    };
    match selector {
        Selector::SystemAssigned => {}
        Selector::ClientId(v) => b.client_id = v,
        Selector::ObjectId(v) => b.object_id = Some(v),
        Selector::ResourceId(v) => b.msi_res_id = Some(v),
    }
    let mut out = Vec::with_capacity(t.access_token.len() + 512);
    // serializing borrowed strings into a Vec cannot fail
    let _ = serde_json::to_writer(&mut out, &b);
    out
}

/// Token bodies answered lately, each by token, selector and second: a body is a function of
/// those three ([`token_body`]), so one made for a request is the answer to every request
/// with the same three — a token the decision already chose for that caller — until the
/// second changes (`expires_in`) or the cache hands out another token.
#[derive(Default)]
pub(crate) struct BodyMemo(std::sync::Mutex<Vec<Memo>>);

struct Memo {
    token: Arc<IssuedToken>,
    selector: Selector,
    now: u64,
    body: axum::body::Bytes,
}

/// Bodies kept at most (the callers of one host ask for a few identities and resources).
const BODY_MEMO: usize = 16;

impl BodyMemo {
    /// The body of `t` for `selector` at `now`.
    pub(crate) fn get(
        &self,
        t: &Arc<IssuedToken>,
        selector: &Selector,
        now: u64,
    ) -> axum::body::Bytes {
        let found = |m: &Memo| Arc::ptr_eq(&m.token, t) && m.now == now && m.selector == *selector;
        if let Some(m) = self.lock().iter().find(|m| found(m)) {
            return m.body.clone();
        }
        let body = axum::body::Bytes::from(token_body(t, selector, now));
        let mut memo = self.lock();
        memo.retain(|m| m.now == now);
        if memo.len() >= BODY_MEMO {
            memo.remove(0);
        }
        memo.push(Memo {
            token: t.clone(),
            selector: selector.clone(),
            now,
            body: body.clone(),
        });
        body
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Memo>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Header and api-version checks of the non-identity paths (their error bodies differ).
fn check_plain(h: &HeaderMap, q: &[(String, String)]) -> Result<(), ImdsError> {
    let hd = headers(h);
    if hd.forwarded || hd.metadata != Some("true") {
        return Err(ImdsError {
            status: 400,
            body: json!({"error": "Bad request. Required metadata header not specified"}),
        });
    }
    let v = q
        .iter()
        .find(|(k, _)| k == "api-version")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    if !api_version::is_supported(api_version::IMDS, v) {
        return Err(ImdsError::bad_api_version());
    }
    Ok(())
}

async fn versions(h: HeaderMap) -> Response {
    if headers(&h).metadata != Some("true") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Bad request. Required metadata header not specified"})),
        )
            .into_response();
    }
    Json(json!({"apiVersions": api_version::IMDS})).into_response()
}

async fn info(State(agent): State<Arc<Agent>>, h: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let q = match imds::parse_query(q.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return err(e),
    };
    if let Err(e) = check_plain(&h, &q) {
        return err(e);
    }
    Json(json!({"tenantId": agent.view().map(|v| v.tenant_id.clone()).unwrap_or_default()}))
        .into_response()
}

pub(crate) fn private_ip(agent: &Agent) -> String {
    if let Some(ip) = &agent.cfg.private_ip {
        return ip.clone();
    }
    // The address this host uses to reach the server (no packet is sent).
    let host = agent
        .current_server()
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("127.0.0.1:443")
        .to_string();
    std::net::ToSocketAddrs::to_socket_addrs(&host)
        .ok()
        .and_then(|mut a| a.next())
        .and_then(|addr| {
            let sock = std::net::UdpSocket::bind(if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            })
            .ok()?;
            sock.connect(addr).ok()?;
            sock.local_addr().ok().map(|a| a.ip().to_string())
        })
        .unwrap_or_default()
}

/// The instance document of `/metadata/instance` (all primitives strings).
pub fn instance_document(agent: &Agent) -> Value {
    let view = agent.view().unwrap_or_default();
    let vm = &view.vm;
    let s = |k: &str| vm.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let tags: Vec<(String, String)> = vm
        .get("tags")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "compute": {
            "azEnvironment": "Keyless",
            "location": s("location"),
            "name": s("name"),
            "osType": std::env::consts::OS.replace("linux", "Linux"),
            "resourceGroupName": s("resourceGroupName"),
            "subscriptionId": s("subscriptionId"),
            "resourceId": s("resourceId"),
            "vmId": s("vmId"),
            "vmSize": s("vmSize"),
            "zone": "",
            "vmScaleSetName": s("vmScaleSetName"),
            "tags": tags.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(";"),
            "tagsList": tags.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
            "osProfile": {"adminUsername": "", "computerName": s("name"), "disablePasswordAuthentication": "true"},
            "platformFaultDomain": "0",
            "platformUpdateDomain": "0",
            "priority": "Regular",
            "provider": "Microsoft.Compute",
            "publisher": "", "offer": "", "sku": "", "version": "",
            "userData": "", "customData": "", "evictionPolicy": "", "licenseType": "", "placementGroupId": "",
            "plan": {"name": "", "product": "", "publisher": ""},
            "publicKeys": [],
            "isHostCompatibilityLayerVm": "false",
            "extendedLocation": {"type": "", "name": ""},
            "host": {"id": ""}, "hostGroup": {"id": ""},
            "virtualMachineScaleSet": {"id": ""},
        },
        "network": {"interface": [{
            "ipv4": {"ipAddress": [{"privateIpAddress": private_ip(agent), "publicIpAddress": ""}], "subnet": []},
            "ipv6": {"ipAddress": []},
            "macAddress": "",
        }]},
    })
}

async fn instance(
    State(agent): State<Arc<Agent>>,
    path: Option<axum::extract::Path<String>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let q = match imds::parse_query(q.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return err(e),
    };
    if let Err(e) = check_plain(&h, &q) {
        return err(e);
    }
    let text = q.iter().any(|(k, v)| k == "format" && v == "text");
    let mut node = instance_document(&agent);
    for seg in path
        .map(|p| p.0)
        .unwrap_or_default()
        .split('/')
        .filter(|s| !s.is_empty())
    {
        let next = match &node {
            Value::Object(m) => m.get(seg).cloned(),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i).cloned()),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => {
                return (StatusCode::NOT_FOUND, Json(json!({"error": "Not found"}))).into_response()
            }
        }
    }
    match (&node, text) {
        (Value::String(s), true) => s.clone().into_response(),
        (Value::String(_), false) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Bad request. Leaf values require format=text"})),
        )
            .into_response(),
        (_, _) => Json(node).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memoized_body_is_for_the_same_token_selector_and_second_only() {
        let t = |a: &str| {
            Arc::new(IssuedToken {
                access_token: a.into(),
                expires_on: 2_000,
                not_before: 900,
                resource: "r".into(),
                client_id: "c".into(),
                object_id: "o".into(),
                msi_res_id: String::new(),
            })
        };
        let (a, b) = (t("token-a"), t("token-b"));
        let memo = BodyMemo::default();
        let sys = Selector::SystemAssigned;
        let by_client = Selector::ClientId("C".into());
        for _ in 0..2 {
            for tok in [&a, &b] {
                for sel in [&sys, &by_client] {
                    for now in [1_000, 1_001] {
                        assert_eq!(memo.get(tok, sel, now), token_body(tok, sel, now));
                    }
                }
            }
        }
        // the same bytes in another token are another token
        let a2 = t("token-a");
        assert_eq!(memo.get(&a2, &sys, 1_001), token_body(&a2, &sys, 1_001));
        assert!(memo.lock().len() <= BODY_MEMO);
        assert!(memo.lock().iter().all(|m| m.now == 1_001));
    }

    #[test]
    fn the_token_body_is_the_token_responses_bytes() {
        let t = IssuedToken {
            access_token: "eyJ0.x\"y\\z".into(),
            expires_on: 2_000,
            not_before: 900,
            resource: "https://management.azure.com/".into(),
            client_id: "CID".into(),
            object_id: "oid".into(),
            msi_res_id: "/subscriptions/s/x".into(),
        };
        for sel in [
            Selector::SystemAssigned,
            Selector::ClientId("cid-as-asked".into()),
            Selector::ObjectId("oid\u{1}é".into()),
            Selector::ResourceId("/subscriptions/s/x".into()),
        ] {
            for now in [1_000, 3_000] {
                let want = serde_json::to_vec(&imds::token_response(&t, &sel, now)).unwrap();
                assert_eq!(
                    String::from_utf8(token_body(&t, &sel, now)).unwrap(),
                    String::from_utf8(want).unwrap(),
                    "{sel:?}"
                );
            }
        }
    }
}
