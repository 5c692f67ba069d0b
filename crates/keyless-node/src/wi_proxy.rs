//! Workload identity's IMDS proxy (`keyless wi-proxy`), the azure-workload-identity sidecar
//! for code that only speaks IMDS: in a pod whose webhook injected it, `init` redirects the
//! pod's own traffic for `169.254.169.254:80` to the proxy's port (iptables nat `OUTPUT` in the
//! pod's network namespace), and `serve` answers IMDS token requests by exchanging the pod's
//! projected service-account token at Keyless's token endpoint (a federated credential's
//! `client_credentials` + `client_assertion`).
//!
//! - [`Redirect`] (`init`): a chain [`CHAIN`] jumped to from `OUTPUT` for tcp to
//!   `169.254.169.254:80`, holding "from uid `proxy_uid` → ACCEPT" (the proxy's own calls to
//!   IMDS: the requests it forwards) and "everything else → REDIRECT to the proxy port".
//!   Idempotent: a drifted chain is replaced in one `iptables-restore --noflush` transaction,
//!   duplicate jumps are removed.
//! - [`Proxy`] (`serve`): `GET /metadata/identity/oauth2/token` (path case-insensitive) with
//!   `resource` and optional `client_id` (else `AZURE_CLIENT_ID`); `msi_res_id` / `mi_res_id` /
//!   `object_id` are refused (a workload identity is selected by client id only). The token
//!   file is read at each exchange (the kubelet rotates it); tokens are cached per (client id,
//!   resource) until half their life (`keyless_core::refresh`), one exchange at a time per
//!   key. Answers in IMDS's shape (every value a string); a refused exchange is answered with
//!   the token endpoint's status and its `error` / `error_description`. `/readyz` → `ok`.
//!   Every other path is forwarded to the real IMDS (`--imds-upstream`, default
//!   `http://169.254.169.254`), as upstream's proxy does, for code that reads
//!   `/metadata/instance` and the like: method, path and query, headers (the `Metadata` one
//!   included; hop-by-hop ones and `Host` not) and a body of at most
//!   [`defaults::MAX_FORWARD_BODY`]; IMDS's status, headers and body (at most
//!   [`defaults::MAX_FORWARD_ANSWER`]) come back as they are; IMDS not reachable within
//!   [`defaults::FORWARD_TIMEOUT`] → 502 in IMDS's error shape. The proxy's connection is
//!   not redirected back to it because its UID is exempt (`init --proxy-uid`); should it be
//!   (the proxy not running as that UID), the request comes back marked with
//!   [`FORWARDED_HEADER`] and is answered 508 instead of looping. Exceptions: other paths
//!   under `/metadata/identity` (however spelled: case, `//`, `.`/`..`, `%xx`) are not
//!   forwarded (404) — the node's identity is not the pod's. Served by
//!   `keyless_ops::limits::serve` on `127.0.0.1:<port>` (and `[::1]:<port>` when the
//!   namespace has IPv6 loopback).

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::imds::{self, ImdsError, IssuedToken};
use keyless_core::selection::Selector;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The chain `init` owns in the nat table.
pub const CHAIN: &str = "AZWI-PROXY";
/// The token path (compared case-insensitively, as IMDS does).
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
/// The header a forwarded request carries: one that comes back to the proxy is a loop.
pub const FORWARDED_HEADER: &str = "x-keyless-wi-proxy-forwarded";

/// The proxy's port and UID are workload identity's (the webhook writes them into the pod):
/// `keyless_core::workload_identity::{DEFAULT_PROXY_PORT, PROXY_UID}`.
pub mod defaults {
    use std::time::Duration;
    /// Where requests other than the token route go (`--imds-upstream`): the real IMDS.
    pub const IMDS_UPSTREAM: &str = "http://169.254.169.254";
    /// One forwarded request at most this long, connection included (inside the listener's
    /// 30 s answer bound).
    pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(20);
    /// The connection to IMDS at most this long.
    pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// A forwarded request's body at most this big (IMDS's are a few hundred bytes).
    pub const MAX_FORWARD_BODY: usize = 64 * 1024;
    /// IMDS's answer at most this big (instance metadata with `userData` is well under it).
    pub const MAX_FORWARD_ANSWER: usize = 4 * 1024 * 1024;
    /// `AZURE_AUTHORITY_HOST` when unset (azidentity's default).
    pub const AUTHORITY_HOST: &str = "https://login.microsoftonline.com/";
    /// One exchange at most this long (inside the listener's 30 s answer bound).
    pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
    /// Cached (client id, resource) pairs kept at most.
    pub const MAX_CACHED: usize = 1024;
}

// ------------------------------------------------------------------ init (iptables)

/// The redirect of a pod's IMDS traffic to its proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    pub port: u16,
    pub proxy_uid: u32,
}

impl Redirect {
    /// The jump from `OUTPUT`, as `iptables -S OUTPUT` prints it.
    pub fn jump() -> String {
        format!(
            "-A OUTPUT -d {}/32 -p tcp -m tcp --dport {} -j {CHAIN}",
            crate::iptables::METADATA_IP,
            crate::iptables::METADATA_PORT
        )
    }

    /// The chain's rules as `iptables -S AZWI-PROXY` prints them when it is right.
    pub fn expected(&self) -> Vec<String> {
        vec![
            format!("-N {CHAIN}"),
            format!(
                "-A {CHAIN} -p tcp -m owner --uid-owner {} -j ACCEPT",
                self.proxy_uid
            ),
            format!("-A {CHAIN} -p tcp -j REDIRECT --to-ports {}", self.port),
        ]
    }

    fn lines(listing: &str) -> Vec<&str> {
        listing
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Whether a listing of the chain is exactly the expected one.
    pub fn chain_ok(&self, listing: &str) -> bool {
        Self::lines(listing) == self.expected()
    }

    /// The rule numbers (1-based) of `OUTPUT`'s rules that jump to the chain.
    pub fn jump_positions(listing: &str) -> Vec<usize> {
        Self::lines(listing)
            .into_iter()
            .filter(|l| l.starts_with("-A "))
            .enumerate()
            .filter(|(_, r)| r.split_whitespace().any(|w| w == CHAIN))
            .map(|(i, _)| i + 1)
            .collect()
    }

    /// Whether `OUTPUT` jumps to the chain exactly once, with the expected match.
    pub fn output_ok(listing: &str) -> bool {
        let jumps: Vec<&str> = Self::lines(listing)
            .into_iter()
            .filter(|l| l.starts_with("-A ") && l.split_whitespace().any(|w| w == CHAIN))
            .collect();
        jumps == [Self::jump().as_str()]
    }

    /// The `iptables-restore --noflush` input that creates or replaces the chain atomically.
    pub fn restore_input(&self) -> String {
        format!(
            "*nat\n:{CHAIN} - [0:0]\n{}\nCOMMIT\n",
            self.expected()[1..].join("\n")
        )
    }

    /// Create or repair the chain and the jump in the current network namespace. Returns
    /// whether anything had to change.
    pub fn ensure(&self) -> Result<bool, String> {
        let mut changed = false;
        match crate::iptables::iptables(&["-S", CHAIN]) {
            Ok(l) if self.chain_ok(&l) => {}
            _ => {
                crate::iptables::restore(&self.restore_input())?;
                changed = true;
            }
        }
        let out = crate::iptables::iptables(&["-S", "OUTPUT"])?;
        if !Self::output_ok(&out) {
            for n in Self::jump_positions(&out).iter().rev() {
                crate::iptables::iptables(&["-D", "OUTPUT", &n.to_string()])?;
            }
            let port = crate::iptables::METADATA_PORT.to_string();
            let dst = format!("{}/32", crate::iptables::METADATA_IP);
            crate::iptables::iptables(&[
                "-I", "OUTPUT", "1", "-d", &dst, "-p", "tcp", "-m", "tcp", "--dport", &port, "-j",
                CHAIN,
            ])?;
            changed = true;
        }
        Ok(changed)
    }
}

// ------------------------------------------------------------------ serve

/// Settings of `wi-proxy serve` (the pod's workload-identity environment).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// 0: any free port (tests).
    pub port: u16,
    /// `AZURE_CLIENT_ID`: the identity when the request names none.
    pub client_id: Option<String>,
    /// `AZURE_TENANT_ID`.
    pub tenant_id: String,
    /// `AZURE_AUTHORITY_HOST` (a trailing `/` is added when missing).
    pub authority_host: String,
    /// `AZURE_FEDERATED_TOKEN_FILE`.
    pub token_file: PathBuf,
    /// PEM of the CA the token endpoint's certificate chains to (None: the system roots).
    pub ca_pem: Option<String>,
    /// Base URL requests other than the token route are forwarded to
    /// ([`defaults::IMDS_UPSTREAM`]; `http://` only, as IMDS).
    pub imds_upstream: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why an exchange gave no token.
#[derive(Debug, Clone, PartialEq)]
enum ExchangeError {
    /// The token file could not be read.
    File(String),
    /// The token endpoint could not be reached or answered something unreadable.
    Unreachable(String),
    /// The token endpoint refused: its status and error body.
    Refused { status: u16, body: Value },
}

impl ExchangeError {
    fn response(&self) -> Response {
        match self {
            ExchangeError::File(m) => imds_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                &format!("cannot read the federated token file: {m}"),
            ),
            ExchangeError::Unreachable(m) => imds_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                &format!("the token endpoint could not answer: {m}"),
            ),
            ExchangeError::Refused { status, body } => {
                let status = StatusCode::from_u16(*status)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                let mut out = json!({
                    "error": body["error"].as_str().unwrap_or("invalid_request"),
                    "error_description": body["error_description"]
                        .as_str()
                        .unwrap_or("the token endpoint refused the exchange"),
                });
                for k in ["error_codes", "trace_id", "correlation_id"] {
                    if let Some(v) = body.get(k) {
                        out[k] = v.clone();
                    }
                }
                (status, Json(out)).into_response()
            }
        }
    }
}

fn imds_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

fn imds_refusal(e: ImdsError) -> Response {
    (
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
        Json(e.body),
    )
        .into_response()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A cached token and when it was fetched.
#[derive(Debug, Clone)]
struct Cached {
    token: IssuedToken,
    fetched: u64,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// The proxy's state: the HTTPS client, the token cache and the client to IMDS.
pub struct Proxy {
    cfg: ProxyConfig,
    http: reqwest::Client,
    token_url: String,
    cache: Mutex<HashMap<(String, String), Slot>>,
    imds: reqwest::Client,
    /// `imds_upstream` without a trailing `/`.
    imds_base: String,
}

/// Headers that belong to one connection (RFC 9110 §7.6.1), never forwarded either way; with
/// `Host` (the upstream's own) and `Content-Length` (recomputed).
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// `from` without the hop-by-hop headers (and those its `Connection` names) and
/// `Content-Length`.
fn end_to_end(from: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let mut out = HeaderMap::new();
    for (k, v) in from {
        let n = k.as_str();
        if HOP_BY_HOP.contains(&n) || k == header::CONTENT_LENGTH || named.iter().any(|t| t == n) {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

/// Whether `path` names something under `/metadata/identity` however it is spelled (case,
/// empty and `.` segments, `..`, `\`, percent-encoding once or twice), as a server that
/// normalizes it might read it.
pub fn identity_path(path: &str) -> bool {
    fn decode(s: &str) -> String {
        String::from_utf8_lossy(&keyless_core::percent::decode(s)).into_owned()
    }
    let mut p = path.to_string();
    for _ in 0..3 {
        let d = decode(&p);
        if d == p {
            break;
        }
        p = d;
    }
    let mut segs: Vec<String> = vec![];
    for s in p.split(['/', '\\']) {
        match s.trim() {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s.to_ascii_lowercase()),
        }
    }
    segs.len() >= 2 && segs[0] == "metadata" && segs[1] == "identity"
}

impl Proxy {
    pub fn new(cfg: ProxyConfig) -> Result<Arc<Proxy>, ProxyError> {
        if cfg.tenant_id.trim().is_empty() {
            return Err(ProxyError::Config(
                "AZURE_TENANT_ID (--tenant-id) is required".into(),
            ));
        }
        let mut b = reqwest::Client::builder()
            .timeout(defaults::EXCHANGE_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .no_proxy();
        if let Some(pem) = &cfg.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| ProxyError::Config(format!("the CA file: {e}")))?;
            if certs.is_empty() {
                return Err(ProxyError::Config(
                    "the CA file holds no certificate".into(),
                ));
            }
            b = b.tls_certs_only(certs);
        }
        let http = b
            .build()
            .map_err(|e| ProxyError::Config(format!("HTTPS client: {e}")))?;
        let host = cfg.authority_host.trim();
        if !(host.starts_with("https://") || host.starts_with("http://")) {
            return Err(ProxyError::Config(format!(
                "AZURE_AUTHORITY_HOST {host:?} is not an http(s) URL"
            )));
        }
        let host = if host.ends_with('/') {
            host.to_string()
        } else {
            format!("{host}/")
        };
        let token_url = format!("{host}{}/oauth2/v2.0/token", cfg.tenant_id.trim());
        let upstream = cfg.imds_upstream.trim();
        let parsed = reqwest::Url::parse(upstream)
            .map_err(|e| ProxyError::Config(format!("--imds-upstream {upstream:?}: {e}")))?;
        if parsed.scheme() != "http"
            || parsed.host().is_none()
            || parsed.query().is_some()
            || !parsed.path().trim_end_matches('/').is_empty()
        {
            return Err(ProxyError::Config(format!(
                "--imds-upstream {upstream:?}: expected http://HOST[:PORT]"
            )));
        }
        let imds_base = upstream.trim_end_matches('/').to_string();
        let imds = reqwest::Client::builder()
            .timeout(defaults::FORWARD_TIMEOUT)
            .connect_timeout(defaults::FORWARD_CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .http1_only()
            .no_proxy()
            .build()
            .map_err(|e| ProxyError::Config(format!("HTTP client: {e}")))?;
        Ok(Arc::new(Proxy {
            cfg,
            http,
            token_url,
            cache: Mutex::new(HashMap::new()),
            imds,
            imds_base,
        }))
    }

    /// Where exchanges go (`{authority host}{tenant}/oauth2/v2.0/token`).
    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    /// Answer one request.
    pub async fn handle(&self, req: Request<Body>) -> Response {
        let path = req.uri().path().to_ascii_lowercase();
        if path == "/readyz" {
            return keyless_ops::limits::plain_text(StatusCode::OK, "ok");
        }
        if path != TOKEN_PATH {
            if identity_path(req.uri().path()) {
                return imds_error(
                    StatusCode::NOT_FOUND,
                    "invalid_request",
                    "Under workload identity only /metadata/identity/oauth2/token is served; the node's identity endpoints are not forwarded",
                );
            }
            return self.forward(req).await;
        }
        if req.method() != Method::GET {
            return imds_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "The token endpoint answers GET only",
            );
        }
        let query = match imds::parse_query(req.uri().query().unwrap_or("")) {
            Ok(q) => q,
            Err(e) => return imds_refusal(e),
        };
        let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        for k in ["msi_res_id", "mi_res_id", "object_id"] {
            if get(k).is_some() {
                return imds_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &format!(
                        "The {k} parameter is not supported under workload identity: select the identity with client_id"
                    ),
                );
            }
        }
        let resource = get("resource").unwrap_or("").trim().to_string();
        if let Err(e) = keyless_core::audience::check(&resource) {
            return imds_refusal(ImdsError::bad_audience(e));
        }
        let client_id = match get("client_id")
            .map(str::to_string)
            .or_else(|| self.cfg.client_id.clone())
            .filter(|c| !c.trim().is_empty())
        {
            Some(c) if c.len() <= imds::MAX_PARAM_LEN => c,
            Some(_) => {
                return imds_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "The client_id parameter is invalid",
                )
            }
            None => {
                return imds_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "No client_id in the request and AZURE_CLIENT_ID is not set",
                )
            }
        };
        let bypass = match get("bypass_cache") {
            None => false,
            Some("true") => true,
            Some(_) => {
                return imds_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "bypass_cache must be 'true' when present",
                )
            }
        };
        match self.token(&client_id, &resource, bypass).await {
            Ok(t) => {
                let body = imds::token_response(&t, &Selector::SystemAssigned, now());
                (StatusCode::OK, Json(body)).into_response()
            }
            Err(e) => {
                tracing::warn!(client_id = %client_id, resource = %resource, error = ?e, "workload identity exchange failed");
                e.response()
            }
        }
    }

    /// `req` sent on to IMDS and its answer given back (see the module's documentation).
    async fn forward(&self, req: Request<Body>) -> Response {
        if req.headers().contains_key(FORWARDED_HEADER) {
            tracing::warn!(uri = %req.uri(), "a request the proxy forwarded came back to it: its UID is not exempt from the redirect");
            return imds_error(
                StatusCode::LOOP_DETECTED,
                "loop_detected",
                "The request the workload identity proxy forwarded to IMDS came back to it: the proxy must run as the UID wi-proxy init exempts (--proxy-uid)",
            );
        }
        let too_big = || {
            imds_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                &format!(
                    "A request body forwarded to IMDS is at most {} bytes",
                    defaults::MAX_FORWARD_BODY
                ),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > defaults::MAX_FORWARD_BODY as u64) {
            return too_big();
        }
        let (parts, body) = req.into_parts();
        let Ok(body) = axum::body::to_bytes(body, defaults::MAX_FORWARD_BODY).await else {
            return too_big();
        };
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let url = format!("{}{path_and_query}", self.imds_base);
        let mut headers = end_to_end(&parts.headers);
        headers.insert(
            HeaderName::from_static(FORWARDED_HEADER),
            HeaderValue::from_static("1"),
        );
        let head = parts.method == Method::HEAD;
        let sent = self
            .imds
            .request(parts.method.clone(), &url)
            .headers(headers)
            .body(body)
            .send()
            .await;
        let unreachable = |m: String| {
            tracing::warn!(method = %parts.method, url = %url, error = %m, "wi-proxy: IMDS could not answer a forwarded request");
            imds_error(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                &format!("IMDS ({}) could not answer: {m}", self.imds_base),
            )
        };
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => return unreachable(keyless_ops::failover::error_chain(&e)),
        };
        let status = resp.status();
        let mut answer_headers = end_to_end(resp.headers());
        if head {
            // no body follows: the length IMDS announced is the answer's
            if let Some(v) = resp.headers().get(header::CONTENT_LENGTH) {
                answer_headers.insert(header::CONTENT_LENGTH, v.clone());
            }
        }
        let mut bytes: Vec<u8> = vec![];
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if bytes.len() + c.len() > defaults::MAX_FORWARD_ANSWER {
                        return unreachable(format!(
                            "its answer is larger than {} bytes",
                            defaults::MAX_FORWARD_ANSWER
                        ));
                    }
                    bytes.extend_from_slice(&c);
                }
                Ok(None) => break,
                Err(e) => return unreachable(keyless_ops::failover::error_chain(&e)),
            }
        }
        tracing::debug!(method = %parts.method, url = %url, status = status.as_u16(), "wi-proxy: forwarded to IMDS");
        let mut out = Response::new(Body::from(bytes));
        *out.status_mut() = status;
        *out.headers_mut() = answer_headers;
        out
    }

    fn slot(&self, client_id: &str, resource: &str) -> Slot {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let key = (client_id.to_ascii_lowercase(), resource.to_string());
        if !cache.contains_key(&key) && cache.len() >= defaults::MAX_CACHED {
            cache.clear();
        }
        cache.entry(key).or_default().clone()
    }

    /// The token for (client id, resource): cached until half its life, else exchanged (one
    /// exchange at a time per key; a failed renewal serves the cached token while it is
    /// still servable).
    async fn token(
        &self,
        client_id: &str,
        resource: &str,
        bypass: bool,
    ) -> Result<IssuedToken, ExchangeError> {
        let slot = self.slot(client_id, resource);
        let mut held = slot.lock().await;
        let t = now();
        if let Some(c) = held.as_ref() {
            if !bypass && !keyless_core::refresh::refresh_due(c.fetched, c.token.expires_on, t) {
                return Ok(c.token.clone());
            }
        }
        match self.exchange(client_id, resource).await {
            Ok(tok) => {
                *held = Some(Cached {
                    token: tok.clone(),
                    fetched: t,
                });
                Ok(tok)
            }
            Err(e) => match held.as_ref() {
                Some(c)
                    if !bypass
                        && !matches!(e, ExchangeError::Refused { .. })
                        && keyless_core::refresh::servable(c.fetched, c.token.expires_on, t) =>
                {
                    Ok(c.token.clone())
                }
                _ => Err(e),
            },
        }
    }

    async fn exchange(
        &self,
        client_id: &str,
        resource: &str,
    ) -> Result<IssuedToken, ExchangeError> {
        let assertion = tokio::fs::read_to_string(&self.cfg.token_file)
            .await
            .map_err(|e| ExchangeError::File(format!("{}: {e}", self.cfg.token_file.display())))?;
        let assertion = assertion.trim();
        if assertion.is_empty() {
            return Err(ExchangeError::File(format!(
                "{} is empty",
                self.cfg.token_file.display()
            )));
        }
        let scope = format!("{resource}/.default");
        let resp = self
            .http
            .post(&self.token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion),
                ("scope", scope.as_str()),
            ])
            .send()
            .await
            .map_err(|e| ExchangeError::Unreachable(keyless_ops::failover::error_chain(&e)))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ExchangeError::Unreachable(e.to_string()))?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            let body = if body.is_object() {
                body
            } else {
                json!({"error": "invalid_request",
                       "error_description": text.chars().take(512).collect::<String>()})
            };
            return Err(ExchangeError::Refused { status, body });
        }
        let access_token = body["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ExchangeError::Unreachable("the answer has no access_token".into()))?
            .to_string();
        let num = |v: &Value| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        };
        let t = now();
        let expires_on = num(&body["expires_on"])
            .or_else(|| num(&body["expires_in"]).map(|s| t + s))
            .ok_or_else(|| ExchangeError::Unreachable("the answer has no expires_in".into()))?;
        let not_before = keyless_core::claims::decode(&access_token)
            .ok()
            .and_then(|d| d.claims["nbf"].as_u64())
            .unwrap_or(t);
        tracing::info!(client_id = %client_id, resource = %resource, expires_on, "workload identity token exchanged");
        Ok(IssuedToken {
            access_token,
            expires_on,
            not_before,
            resource: resource.to_string(),
            client_id: client_id.to_string(),
            object_id: String::new(),
            msi_res_id: String::new(),
        })
    }
}

/// The listeners of a running proxy.
pub struct Running {
    pub addrs: Vec<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// The port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.addrs.first().map(|a| a.port()).unwrap_or(0)
    }

    pub fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Listen on `127.0.0.1:<port>` (and `[::1]` on the same port when it can) and serve the
/// proxy there.
pub async fn serve(cfg: ProxyConfig) -> Result<Running, ProxyError> {
    let proxy = Proxy::new(cfg.clone())?;
    let v4 = SocketAddr::from(([127, 0, 0, 1], cfg.port));
    let first = keyless_ops::limits::bind(v4)
        .await
        .map_err(|source| ProxyError::Listen { addr: v4, source })?;
    let port = first.local_addr().map(|a| a.port()).unwrap_or(cfg.port);
    let mut listeners = vec![first];
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    match keyless_ops::limits::bind(v6).await {
        Ok(l) => listeners.push(l),
        Err(e) => tracing::debug!(error = %e, "no IPv6 loopback listener"),
    }
    let gov = keyless_ops::limits::governor();
    let mut addrs = vec![];
    let mut tasks = vec![];
    for l in listeners {
        if let Ok(a) = l.local_addr() {
            addrs.push(a);
        }
        let proxy = proxy.clone();
        tasks.push(keyless_ops::limits::serve(
            l,
            gov.clone(),
            "wi-proxy",
            move |_peer, req| {
                let proxy = proxy.clone();
                async move { proxy.handle(req).await }
            },
        ));
    }
    Ok(Running { addrs, tasks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_rules_are_checked_exactly() {
        let r = Redirect {
            port: 8000,
            proxy_uid: 1501,
        };
        let good = "-N AZWI-PROXY\n-A AZWI-PROXY -p tcp -m owner --uid-owner 1501 -j ACCEPT\n-A AZWI-PROXY -p tcp -j REDIRECT --to-ports 8000\n";
        assert!(r.chain_ok(good));
        assert!(!r.chain_ok(&good.replace("8000", "8001")));
        assert!(!r.chain_ok("-N AZWI-PROXY\n"));
        assert_eq!(
            r.restore_input(),
            "*nat\n:AZWI-PROXY - [0:0]\n-A AZWI-PROXY -p tcp -m owner --uid-owner 1501 -j ACCEPT\n-A AZWI-PROXY -p tcp -j REDIRECT --to-ports 8000\nCOMMIT\n"
        );
        let jump = Redirect::jump();
        assert_eq!(
            jump,
            "-A OUTPUT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j AZWI-PROXY"
        );
        let out = format!("-P OUTPUT ACCEPT\n{jump}\n-A OUTPUT -j KUBE-SERVICES\n");
        assert!(Redirect::output_ok(&out));
        assert!(!Redirect::output_ok("-P OUTPUT ACCEPT\n"));
        let twice = format!("-P OUTPUT ACCEPT\n{jump}\n-A OUTPUT -j X\n{jump}\n");
        assert!(!Redirect::output_ok(&twice));
        assert_eq!(Redirect::jump_positions(&twice), [1, 3]);
        assert!(!Redirect::output_ok(
            "-P OUTPUT ACCEPT\n-A OUTPUT -j AZWI-PROXY\n"
        ));
    }

    /// A port nothing listens on.
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn config(token_file: PathBuf, authority: &str, imds: &str) -> ProxyConfig {
        ProxyConfig {
            port: 0,
            client_id: Some("env-client".into()),
            tenant_id: "t1".into(),
            authority_host: authority.into(),
            token_file,
            ca_pem: None,
            imds_upstream: imds.into(),
        }
    }

    fn proxy(token_file: PathBuf, authority: &str) -> Arc<Proxy> {
        let imds = format!("http://127.0.0.1:{}", closed_port());
        Proxy::new(config(token_file, authority, &imds)).unwrap()
    }

    async fn call(p: &Proxy, uri: &str) -> (u16, Value, String) {
        send(p, Request::get(uri).body(Body::empty()).unwrap()).await
    }

    async fn send(p: &Proxy, req: Request<Body>) -> (u16, Value, String) {
        let r = p.handle(req).await;
        let st = r.status().as_u16();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        (st, serde_json::from_str(&text).unwrap_or(Value::Null), text)
    }

    #[test]
    fn the_token_url_gets_its_slash() {
        let p = proxy("/nonexistent".into(), "https://keyless.example:8443");
        assert_eq!(
            p.token_url(),
            "https://keyless.example:8443/t1/oauth2/v2.0/token"
        );
        let p = proxy("/nonexistent".into(), "https://keyless.example/");
        assert_eq!(
            p.token_url(),
            "https://keyless.example/t1/oauth2/v2.0/token"
        );
        assert!(Proxy::new(ProxyConfig {
            tenant_id: String::new(),
            ..config("/x".into(), "https://x/", defaults::IMDS_UPSTREAM)
        })
        .is_err());
        // the IMDS upstream: http://HOST[:PORT] only
        for ok in [
            defaults::IMDS_UPSTREAM,
            "http://169.254.169.254/",
            "http://127.0.0.1:8080",
        ] {
            let p = Proxy::new(config("/x".into(), "https://x/", ok)).unwrap();
            assert!(!p.imds_base.ends_with('/'), "{ok}");
        }
        for bad in [
            "",
            "169.254.169.254",
            "https://169.254.169.254",
            "http://169.254.169.254/metadata",
            "http://169.254.169.254/?a=b",
            "ftp://x",
        ] {
            match Proxy::new(config("/x".into(), "https://x/", bad)) {
                Err(ProxyError::Config(m)) => assert!(m.contains("--imds-upstream"), "{bad}: {m}"),
                _ => panic!("{bad:?} accepted"),
            }
        }
    }

    #[test]
    fn identity_paths_however_spelled() {
        for p in [
            "/metadata/identity/info",
            "/METADATA/Identity/oauth2/token/",
            "//metadata//identity/oauth2/token",
            "/metadata/./identity/oauth2/token",
            "/metadata/instance/../identity/oauth2/token",
            "/x/../metadata/identity",
            "/metadata\\identity\\oauth2\\token",
            "/metadata/%69dentity/oauth2/token",
            "/metadata%2Fidentity/oauth2/token",
            "/metadata/%2569dentity/oauth2/token",
            "/metadata/identity",
        ] {
            assert!(identity_path(p), "{p}");
        }
        for p in [
            "/metadata/instance",
            "/metadata/instance/compute?api-version=2021-02-01",
            "/metadata/scheduledevents",
            "/metadata/attested/document",
            "/metadata/identityx/oauth2/token",
            "/identity/metadata",
            "/",
            "/%zz",
        ] {
            assert!(!identity_path(p), "{p}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("metadata", "true"),
            ("x-ms-client-request-id", "r1"),
            ("accept", "application/json"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "p"),
            ("keep-alive", "timeout=5"),
            ("host", "169.254.169.254"),
            ("content-length", "12"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h.append("x-twice", HeaderValue::from_static("1"));
        h.append("x-twice", HeaderValue::from_static("2"));
        let out = end_to_end(&h);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            ["accept", "metadata", "x-ms-client-request-id", "x-twice"]
        );
        assert_eq!(out.get_all("x-twice").iter().count(), 2);
        assert_eq!(out["metadata"], "true");
    }

    #[tokio::test]
    async fn forwarding_refuses_loops_big_bodies_and_reports_a_dead_imds() {
        let p = proxy("/nonexistent/token".into(), "https://127.0.0.1:1/");
        // a request the proxy itself forwarded: a loop, not forwarded again
        let req = Request::get("/metadata/instance?api-version=2021-02-01")
            .header("Metadata", "true")
            .header(FORWARDED_HEADER, "1")
            .body(Body::empty())
            .unwrap();
        let (st, body, _) = send(&p, req).await;
        assert_eq!(st, 508, "{body}");
        assert_eq!(body["error"], "loop_detected");
        // a body over the bound: 413, declared or not
        let big = vec![b'x'; defaults::MAX_FORWARD_BODY + 1];
        let req = Request::post("/metadata/scheduledevents?api-version=2020-07-01")
            .header("content-length", big.len().to_string())
            .body(Body::from(big.clone()))
            .unwrap();
        assert_eq!(send(&p, req).await.0, 413);
        let stream = futures::stream::iter([Ok::<_, std::io::Error>(big)]);
        let req = Request::post("/metadata/scheduledevents?api-version=2020-07-01")
            .body(Body::from_stream(stream))
            .unwrap();
        assert_eq!(send(&p, req).await.0, 413);
        // nothing answers at the upstream: 502, IMDS's error shape
        let (st, body, _) = call(&p, "/metadata/instance?api-version=2021-02-01").await;
        assert_eq!(st, 502, "{body}");
        assert_eq!(body["error"], "bad_gateway");
        assert!(body["error_description"]
            .as_str()
            .unwrap()
            .contains("could not answer"));
        // the node's identity endpoints are not forwarded
        let (st, body, _) = call(&p, "/metadata/identity/info?api-version=2018-02-01").await;
        assert_eq!(st, 404, "{body}");
        assert_eq!(body["error"], "invalid_request");
    }

    #[tokio::test]
    async fn requests_are_checked_before_any_exchange() {
        let p = proxy("/nonexistent/token".into(), "https://127.0.0.1:1/");
        let (st, _, text) = call(&p, "/readyz").await;
        assert_eq!((st, text.trim()), (200, "ok"));
        // not the token route: forwarded (nothing answers at this upstream)
        assert_eq!(
            call(&p, "/metadata/instance?api-version=2021-02-01")
                .await
                .0,
            502
        );
        let (st, body, _) =
            call(&p, "/metadata/identity/oauth2/token?api-version=2018-02-01").await;
        assert_eq!(st, 400);
        assert_eq!(body["error"], "invalid_request");
        for sel in ["msi_res_id=/x", "object_id=abc", "mi_res_id=/x"] {
            let (st, body, _) = call(
                &p,
                &format!("/metadata/identity/oauth2/token?resource=https://vault.azure.net&{sel}"),
            )
            .await;
            assert_eq!(st, 400, "{sel}");
            assert!(body["error_description"]
                .as_str()
                .unwrap()
                .contains("not supported"));
        }
        let (st, body, _) = call(&p, "/metadata/identity/oauth2/token?resource=a&resource=b").await;
        assert_eq!(st, 400);
        assert_eq!(body["error"], "invalid_request");
        // a valid request reaches the exchange: the token file is missing → 500, IMDS's shape
        let (st, body, _) = call(
            &p,
            "/METADATA/Identity/OAuth2/Token?api-version=2018-02-01&resource=https://vault.azure.net",
        )
        .await;
        assert_eq!(st, 500, "{body}");
        assert_eq!(body["error"], "server_error");
    }

    #[tokio::test]
    async fn unreachable_token_endpoint_is_503() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "a.b.c\n").unwrap();
        let p = proxy(f, &format!("http://127.0.0.1:{}/", closed_port()));
        let (st, body, _) = call(
            &p,
            "/metadata/identity/oauth2/token?resource=https://vault.azure.net",
        )
        .await;
        assert_eq!(st, 503, "{body}");
        assert_eq!(body["error"], "service_unavailable");
    }

    #[test]
    fn refusals_keep_the_upstream_status_and_codes() {
        let e = ExchangeError::Refused {
            status: 401,
            body: json!({"error": "invalid_client", "error_description": "AADSTS700213: no match",
                         "error_codes": [700213], "other": 1}),
        };
        let r = e.response();
        assert_eq!(r.status().as_u16(), 401);
        let e = ExchangeError::Refused {
            status: 200,
            body: Value::Null,
        };
        assert_eq!(e.response().status().as_u16(), 502);
    }
}
