//! The edge every HTTP request of every surface passes: a request id, a `request` span, the
//! request-id headers the real service answers with, the request metrics and one access-log
//! line.
//!
//! Use [`edge`] as an axum middleware (`axum::middleware::from_fn_with_state(Edge::fixed(…),
//! edge)`, added with `Router::layer` so the matched route template is known) or [`observe`]
//! around a handler function. Labels and log fields are bounded and never secret: the route
//! *template* (axum's `MatchedPath`, or a [`RouteTemplate`] a handler or an inner layer put on
//! the response, or one the [`Edge`]'s `route` function derives from the path), never the raw
//! path or the query string, and no header value except the client's own correlation ids.

use crate::logging::ACCESS_TARGET;
use crate::metrics::{HTTP_REQUESTS, HTTP_REQUESTS_IN_FLIGHT, HTTP_REQUEST_DURATION};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Key, Label, Metadata};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::Instrument;

/// Which request-id headers a surface answers with, each as the real service does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdHeaders {
    /// None on the wire (IMDS, NMI and the local endpoints): the id is in the logs only.
    None,
    /// ARM: `x-ms-request-id` (new) and `x-ms-correlation-request-id` (the client's, else the
    /// new id).
    Arm,
    /// Key Vault: `x-ms-request-id` (new), the client's `x-ms-client-request-id` echoed (and
    /// its `x-ms-correlation-request-id`, when sent).
    KeyVault,
    /// The Entra token endpoint: `x-ms-request-id` (new), the client's `client-request-id`
    /// echoed.
    Aad,
    /// Graph: `request-id` (new), `client-request-id` (the client's, else the request id).
    Graph,
    /// Keyless's own APIs (the host API): `x-ms-request-id`.
    Own,
}

/// The request's id, put in the request's extensions for handlers (error bodies, audit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub String);

/// A route template for the metrics and the access log, set on a response's extensions by a
/// handler or an inner layer ([`matched_route`]) when the edge cannot see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTemplate(pub Cow<'static, str>);

/// The peer of the connection, put in the request's extensions by the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// A surface's name and headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Surface {
    pub name: &'static str,
    pub ids: IdHeaders,
}

type ClassifyFn = Arc<dyn Fn(&Request) -> Surface + Send + Sync>;
type RouteFn = Arc<dyn Fn(&'static str, &str) -> Option<String> + Send + Sync>;

/// What the [`edge`] middleware needs: how to tell the surface of a request and, where the
/// router only has catch-all routes, a route template from the path.
#[derive(Clone)]
pub struct Edge {
    classify: ClassifyFn,
    route: Option<RouteFn>,
}

impl Edge {
    /// One surface for every request.
    pub fn fixed(surface: Surface) -> Self {
        Edge {
            classify: Arc::new(move |_| surface),
            route: None,
        }
    }

    /// The surface of each request from `f`.
    pub fn classify(f: impl Fn(&Request) -> Surface + Send + Sync + 'static) -> Self {
        Edge {
            classify: Arc::new(f),
            route: None,
        }
    }

    /// A route template from `(surface, path)`, preferred to the matched route (for routers
    /// with catch-all routes).
    pub fn with_route(
        mut self,
        f: impl Fn(&'static str, &str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.route = Some(Arc::new(f));
        self
    }
}

use crate::metrics::surface as s;
pub const IMDS: Surface = Surface {
    name: s::IMDS,
    ids: IdHeaders::None,
};
pub const NMI: Surface = Surface {
    name: s::NMI,
    ids: IdHeaders::None,
};
pub const APPSERVICE: Surface = Surface {
    name: s::APPSERVICE,
    ids: IdHeaders::None,
};
pub const ARC: Surface = Surface {
    name: s::ARC,
    ids: IdHeaders::None,
};
pub const EXTENSION: Surface = Surface {
    name: s::EXTENSION,
    ids: IdHeaders::None,
};
pub const OPS: Surface = Surface {
    name: s::OPS,
    ids: IdHeaders::None,
};
pub const ARM: Surface = Surface {
    name: s::ARM,
    ids: IdHeaders::Arm,
};
pub const STS: Surface = Surface {
    name: s::STS,
    ids: IdHeaders::Aad,
};
pub const HOST: Surface = Surface {
    name: s::HOST,
    ids: IdHeaders::Own,
};
pub const GRAPH: Surface = Surface {
    name: s::GRAPH,
    ids: IdHeaders::Graph,
};
pub const KEYVAULT: Surface = Surface {
    name: s::KEYVAULT,
    ids: IdHeaders::KeyVault,
};

/// The axum middleware: [`observe`] with the surface `edge` tells.
pub async fn edge(State(edge): State<Edge>, req: Request, next: Next) -> Response {
    let surface = (edge.classify)(&req);
    let route = edge
        .route
        .as_ref()
        .and_then(|f| f(surface.name, req.uri().path()));
    observe(surface, None, route.map(Cow::Owned), req, |r| next.run(r)).await
}

/// An inner axum middleware for routers served behind [`observe`]: puts the matched route
/// template on the response (the edge outside the router cannot see it).
pub async fn matched_route(req: Request, next: Next) -> Response {
    let m = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let mut resp = next.run(req).await;
    if let Some(m) = m {
        if resp.extensions().get::<RouteTemplate>().is_none() {
            resp.extensions_mut().insert(RouteTemplate(Cow::Owned(m)));
        }
    }
    resp
}

/// Answer `req` with `handler` as `surface`: see the module doc. `peer` (else a [`PeerAddr`]
/// extension) is the caller's address for the access log; `route` a template known up front.
pub async fn observe<F, Fut>(
    surface: Surface,
    peer: Option<IpAddr>,
    route: Option<Cow<'static, str>>,
    mut req: Request,
    handler: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let start = Instant::now();
    let id = new_request_id();
    let method = method_label(req.method());
    let peer = peer
        .or_else(|| req.extensions().get::<PeerAddr>().map(|p| p.0.ip()))
        .or_else(|| {
            req.extensions()
                .get::<crate::limits::Peer>()
                .map(|p| p.addr.ip())
        });
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let echo = Echo::of(req.headers());
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", surface = surface.name, request_id = %id);
    let in_flight = InFlight::new(surface.name);
    let mut resp = if span.is_disabled() {
        handler(req).await
    } else {
        handler(req).instrument(span.clone()).await
    };
    drop(in_flight);
    let route: &'static str = match resp.extensions().get::<RouteTemplate>() {
        Some(r) => bounded_route(surface.name, &r.0),
        None => bounded_route(
            surface.name,
            route
                .as_deref()
                .or(matched.as_deref())
                .unwrap_or("unmatched"),
        ),
    };
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    // the labels made once per series: recording allocates nothing
    let labels = request_labels(surface.name, method, route, status_label(status));
    ::metrics::with_recorder(|r| {
        r.register_counter(&Key::from_static_parts(HTTP_REQUESTS, labels), &META)
            .increment(1);
        r.register_histogram(
            &Key::from_static_parts(HTTP_REQUEST_DURATION, labels),
            &META,
        )
        .record(elapsed.as_secs_f64());
    });
    set_id_headers(resp.headers_mut(), surface.ids, &id, &echo);
    let _g = span.enter();
    tracing::info!(
        target: ACCESS_TARGET,
        surface = surface.name,
        method,
        route = %route,
        status,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        request_id = %id,
        peer = %peer.map(|p| p.to_canonical().to_string()).unwrap_or_default(),
        "request"
    );
    resp
}

/// A new request id: a random (version 4) UUID, hyphenated, lowercase. The random bytes come
/// from AWS-LC's DRBG, drawn 1 KiB at a time into a per-thread pool (one generator call per 64
/// ids; the process never forks without exec, so no two processes share a pool), else from
/// the system's generator.
pub fn new_request_id() -> String {
    const POOL: usize = 1024;
    thread_local! {
        static RANDOM: std::cell::RefCell<([u8; POOL], usize)> =
            const { std::cell::RefCell::new(([0; POOL], POOL)) };
    }
    // (`try_with`: a thread being torn down has no pool, and draws from the system)
    let drawn = RANDOM
        .try_with(|r| {
            let (pool, used) = &mut *r.borrow_mut();
            if *used + 16 > POOL {
                aws_lc_rs::rand::fill(pool).ok()?;
                *used = 0;
            }
            let mut b = [0u8; 16];
            b.copy_from_slice(&pool[*used..*used + 16]);
            // each drawn id's bytes are not kept
            pool[*used..*used + 16].fill(0);
            *used += 16;
            Some(b)
        })
        .ok()
        .flatten();
    let id = match drawn {
        Some(b) => uuid::Builder::from_random_bytes(b).into_uuid(),
        None => uuid::Uuid::new_v4(),
    };
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf).to_string()
}

/// The `status` label of a status code: the common ones spelled out, any other made once
/// (status codes are 100–999, so at most 900 strings are ever made).
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => {
            static MADE: Mutex<Option<HashMap<u16, &'static str>>> = Mutex::new(None);
            let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
            made.get_or_insert_with(HashMap::new)
                .entry(status)
                .or_insert_with(|| Box::leak(status.to_string().into_boxed_str()))
        }
    }
}

/// What the metric macros would record as (this module, info).
static META: Metadata<'static> =
    Metadata::new(module_path!(), ::metrics::Level::INFO, Some(module_path!()));

type Labels = &'static [Label];

/// The labels of one series of [`HTTP_REQUESTS`] / [`HTTP_REQUEST_DURATION`], made once: every
/// part is a bounded `'static` label ([`bounded_route`], [`status_label`]), so the series made
/// here are the series the recorder keeps anyway.
fn request_labels(
    surface: &'static str,
    method: &'static str,
    route: &'static str,
    status: &'static str,
) -> Labels {
    type Made = HashMap<[&'static str; 4], Labels>;
    static MADE: Mutex<Option<Made>> = Mutex::new(None);
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    made.get_or_insert_with(HashMap::new)
        .entry([surface, method, route, status])
        .or_insert_with(|| {
            Box::leak(Box::new([
                Label::from_static_parts("surface", surface),
                Label::from_static_parts("method", method),
                Label::from_static_parts("route", route),
                Label::from_static_parts("status", status),
            ]))
        })
}

/// The labels of [`HTTP_REQUESTS_IN_FLIGHT`] for a surface, made once per surface.
fn surface_labels(surface: &'static str) -> Labels {
    static MADE: Mutex<Option<HashMap<&'static str, Labels>>> = Mutex::new(None);
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    made.get_or_insert_with(HashMap::new)
        .entry(surface)
        .or_insert_with(|| Box::leak(Box::new([Label::from_static_parts("surface", surface)])))
}

struct InFlight(Labels);
impl InFlight {
    fn new(surface: &'static str) -> Self {
        let labels = surface_labels(surface);
        in_flight(labels, 1.0);
        InFlight(labels)
    }
}
impl Drop for InFlight {
    fn drop(&mut self) {
        in_flight(self.0, -1.0);
    }
}

fn in_flight(labels: Labels, delta: f64) {
    ::metrics::with_recorder(|r| {
        r.register_gauge(
            &Key::from_static_parts(HTTP_REQUESTS_IN_FLIGHT, labels),
            &META,
        )
        .increment(delta)
    });
}

/// The client's ids a response echoes.
#[derive(Default)]
struct Echo {
    correlation: Option<HeaderValue>,
    client_request_id: Option<HeaderValue>,
    aad_client_request_id: Option<HeaderValue>,
}

impl Echo {
    fn of(h: &HeaderMap) -> Self {
        // only short, printable ids are echoed (they are the client's own values)
        let get = |name: &str| {
            h.get(name)
                .filter(|v| {
                    let b = v.as_bytes();
                    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
                })
                .cloned()
        };
        Echo {
            correlation: get("x-ms-correlation-request-id"),
            client_request_id: get("x-ms-client-request-id"),
            aad_client_request_id: get("client-request-id"),
        }
    }
}

fn set_id_headers(h: &mut HeaderMap, ids: IdHeaders, id: &str, echo: &Echo) {
    if ids == IdHeaders::None {
        return;
    }
    let Ok(idv) = HeaderValue::from_str(id) else {
        return;
    };
    let mut set = |name: &'static str, v: HeaderValue| {
        h.insert(HeaderName::from_static(name), v);
    };
    match ids {
        IdHeaders::None => {}
        IdHeaders::Arm => {
            set("x-ms-request-id", idv.clone());
            set(
                "x-ms-correlation-request-id",
                echo.correlation.clone().unwrap_or(idv),
            );
        }
        IdHeaders::KeyVault => {
            set("x-ms-request-id", idv);
            if let Some(v) = &echo.client_request_id {
                set("x-ms-client-request-id", v.clone());
            }
            if let Some(v) = &echo.correlation {
                set("x-ms-correlation-request-id", v.clone());
            }
        }
        IdHeaders::Aad => {
            set("x-ms-request-id", idv);
            if let Some(v) = &echo.aad_client_request_id {
                set("client-request-id", v.clone());
            }
        }
        IdHeaders::Graph => {
            set("request-id", idv.clone());
            set(
                "client-request-id",
                echo.aad_client_request_id.clone().unwrap_or(idv),
            );
        }
        IdHeaders::Own => set("x-ms-request-id", idv),
    }
}

/// A method label from a bounded set.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Distinct route labels kept per surface and process; past that a new route is labelled
/// `other` (the series a caller can create stay bounded whatever paths it sends).
pub const MAX_ROUTES: usize = 256;

/// The route label of `route` on `surface`: the first [`MAX_ROUTES`] distinct routes of each
/// surface are kept (made `'static` once, so labels allocate nothing per request — bounded:
/// at most `MAX_ROUTES` per surface), later ones are `other`.
fn bounded_route(surface: &'static str, route: &str) -> &'static str {
    type Seen = HashMap<&'static str, HashSet<&'static str>>;
    static SEEN: Mutex<Option<Seen>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen
        .get_or_insert_with(HashMap::new)
        .entry(surface)
        .or_default();
    if let Some(r) = seen.get(route) {
        return r;
    }
    if seen.len() >= MAX_ROUTES {
        return "other";
    }
    let r: &'static str = Box::leak(route.to_string().into_boxed_str());
    seen.insert(r);
    r
}

/// Most path segments a [`template`] keeps.
pub const MAX_TEMPLATE_SEGMENTS: usize = 16;

/// A route template of `path`: each segment `word` maps to a fixed word is kept as that word,
/// any other segment becomes `{}`. E.g. with ARM's words,
/// `/subscriptions/1/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/vm` →
/// `/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}`.
pub fn template(path: &str, word: impl Fn(&str) -> Option<&'static str>) -> String {
    let mut out = String::new();
    for (i, seg) in path.split('/').skip(1).enumerate() {
        if i == MAX_TEMPLATE_SEGMENTS {
            out.push_str("/…");
            break;
        }
        out.push('/');
        if !seg.is_empty() {
            out.push_str(word(seg).unwrap_or("{}"));
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// A `word` function for [`template`] from a list (matched case-insensitively, answered in the
/// list's spelling).
pub fn word_in(list: &'static [&'static str], seg: &str) -> Option<&'static str> {
    list.iter().copied().find(|w| w.eq_ignore_ascii_case(seg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    #[test]
    fn templates_keep_words_and_hide_names() {
        const WORDS: &[&str] = &[
            "subscriptions",
            "resourceGroups",
            "providers",
            "Microsoft.Compute",
            "virtualMachines",
        ];
        let t = template(
            "/subscriptions/0000/resourcegroups/rg1/providers/microsoft.compute/virtualMachines/vm1",
            |s| word_in(WORDS, s),
        );
        assert_eq!(
            t,
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}"
        );
        assert_eq!(template("/", |s| word_in(WORDS, s)), "/");
        assert_eq!(template("/secrets/x/", |_| None), "/{}/{}/");
        let long = "/a".repeat(40);
        assert!(template(&long, |_| None).ends_with("/…"));
    }

    async fn call(app: axum::Router, req: axum::http::Request<Body>) -> Response {
        app.oneshot(req).await.unwrap()
    }

    fn arm_app() -> axum::Router {
        axum::Router::new()
            .route("/items/{id}", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(Edge::fixed(ARM), edge))
    }

    #[tokio::test]
    async fn arm_answers_request_and_correlation_ids() {
        let r = call(
            arm_app(),
            axum::http::Request::get("/items/1")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        let id = r.headers()["x-ms-request-id"].to_str().unwrap().to_string();
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(parsed.hyphenated().to_string(), id, "hyphenated, lowercase");
        assert_eq!(r.headers()["x-ms-correlation-request-id"], id.as_str());
        let r = call(
            arm_app(),
            axum::http::Request::get("/items/2")
                .header("x-ms-correlation-request-id", "corr-1")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.headers()["x-ms-correlation-request-id"], "corr-1");
        assert_ne!(r.headers()["x-ms-request-id"], "corr-1");
    }

    #[tokio::test]
    async fn key_vault_graph_and_aad_echo_the_clients_ids() {
        let mut h = HeaderMap::new();
        h.insert("x-ms-client-request-id", HeaderValue::from_static("kv-1"));
        h.insert("client-request-id", HeaderValue::from_static("aad-1"));
        let echo = Echo::of(&h);
        let mut out = HeaderMap::new();
        set_id_headers(&mut out, IdHeaders::KeyVault, "id", &echo);
        assert_eq!(out["x-ms-request-id"], "id");
        assert_eq!(out["x-ms-client-request-id"], "kv-1");
        assert!(!out.contains_key("x-ms-correlation-request-id"));
        let mut out = HeaderMap::new();
        set_id_headers(&mut out, IdHeaders::Aad, "id", &echo);
        assert_eq!(out["client-request-id"], "aad-1");
        let mut out = HeaderMap::new();
        set_id_headers(&mut out, IdHeaders::Graph, "id", &Echo::default());
        assert_eq!(out["request-id"], "id");
        assert_eq!(out["client-request-id"], "id");
        let mut out = HeaderMap::new();
        set_id_headers(&mut out, IdHeaders::None, "id", &echo);
        assert!(out.is_empty());
        // an overlong or non-printable id is not echoed
        let mut h = HeaderMap::new();
        h.insert(
            "x-ms-correlation-request-id",
            HeaderValue::from_str(&"a".repeat(200)).unwrap(),
        );
        assert!(Echo::of(&h).correlation.is_none());
    }

    #[tokio::test]
    async fn metrics_and_the_access_log_use_the_route_template() {
        let recorder = crate::metrics::builder().build_recorder();
        let handle = recorder.handle();
        let app = arm_app();
        let _guard = ::metrics::set_default_local_recorder(&recorder);
        for p in ["/items/secret-name-1", "/items/2", "/nope?sig=abc"] {
            call(
                app.clone(),
                axum::http::Request::get(p).body(Body::empty()).unwrap(),
            )
            .await;
        }
        let text = handle.render();
        assert!(
            text.contains(r#"keyless_http_requests_total{surface="arm",method="GET",route="/items/{id}",status="200"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"keyless_http_requests_total{surface="arm",method="GET",route="unmatched",status="404"} 1"#),
            "{text}"
        );
        assert!(
            !text.contains("secret-name-1") && !text.contains("sig=abc"),
            "{text}"
        );
        assert!(
            text.contains("keyless_http_request_duration_seconds_bucket"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_inner_layer_reports_the_route_to_an_outer_observe() {
        let app = axum::Router::new()
            .route("/metadata/identity/oauth2/token", get(|| async { "t" }))
            .layer(axum::middleware::from_fn(matched_route));
        let req = axum::http::Request::get("/metadata/identity/oauth2/token?resource=x")
            .body(Body::empty())
            .unwrap();
        let r = app.oneshot(req).await.unwrap();
        assert_eq!(
            r.extensions().get::<RouteTemplate>(),
            Some(&RouteTemplate("/metadata/identity/oauth2/token".into()))
        );
        // observe around a handler that is not a router
        let r = observe(
            IMDS,
            None,
            Some("/x".into()),
            Request::new(Body::empty()),
            |req| async move {
                assert!(req.extensions().get::<RequestId>().is_some());
                Response::new(Body::empty())
            },
        )
        .await;
        assert!(r.headers().is_empty(), "IMDS answers no id headers");
    }

    #[test]
    fn request_ids_are_distinct_version_4_uuids_across_pool_refills_and_threads() {
        let draw = || (0..1_000).map(|_| new_request_id()).collect::<Vec<_>>();
        let mut all: Vec<String> = draw();
        all.extend(std::thread::spawn(draw).join().unwrap());
        for id in &all {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 4, "{id}");
            assert_eq!(&u.hyphenated().to_string(), id);
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a request id repeated");
    }

    #[test]
    fn routes_past_the_cap_are_other() {
        assert_eq!(bounded_route("cap-test", "/r0"), "/r0");
        for i in 0..MAX_ROUTES + 10 {
            bounded_route("cap-test", &format!("/r{i}"));
        }
        assert_eq!(bounded_route("cap-test", "/fresh"), "other");
        assert_eq!(
            bounded_route("cap-test", "/r0"),
            "/r0",
            "a kept route stays"
        );
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(418), "418");
        assert!(std::ptr::eq(status_label(418), status_label(418)));
    }
}
