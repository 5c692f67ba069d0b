//! The harness of `tests/routes.rs`: a real server state on its own SQLite file (started with
//! `keyless_server::start`), requests handed to the router (`keyless_server::app`) with
//! `tower::ServiceExt::oneshot` — no TCP, no spawned process — and a record of which route of
//! `ROUTES` each request exercised, accepted or refused.
//!
//! Every request names its route (`"ARM GET /subscriptions/{sub}"`); the harness checks that
//! the route is one of `ROUTES` and that the request's method, surface and path fit its
//! template, so a test cannot count a request against a route it did not call.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request};
use base64::Engine;
use keyless_core::clock::SystemClock;
use keyless_server::{AppState, PeerCert};
use keyless_store::{Kek, Store};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

/// The vault every Key Vault test creates, and the `Host` its data-plane requests carry.
pub const VAULT: &str = "kv1";
pub const KV_HOST: &str = "kv1.vault.localhost";
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";
pub const KV_SCOPE: &str = "https://vault.azure.net/.default";
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

/// How many requests of one route were accepted (2xx) and refused (4xx).
#[derive(Debug, Default, Clone, Copy)]
struct Hit {
    accepted: u32,
    refused: u32,
}

/// A started server, in process.
pub struct Srv {
    pub s: Arc<AppState>,
    pub tenant: String,
    pub sub: String,
    /// `https://localhost:<port>` (the issuer host).
    pub base: String,
    /// The bootstrap admin's client id and secret (shown on the first start).
    pub admin_id: String,
    pub admin_secret: String,
    routes: &'static [&'static str],
    hits: Mutex<BTreeMap<&'static str, Hit>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Srv {
    fn drop(&mut self) {
        // the TLS listener `start` opened (never used here)
        self.task.abort();
    }
}

/// An answer: status, headers, and the body as JSON (`Null` when empty or not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A request being built.
pub struct Call {
    route: &'static str,
    method: Method,
    path: String,
    host: String,
    headers: Vec<(HeaderName, String)>,
    body: Vec<u8>,
    peer: Option<PeerCert>,
}

impl Call {
    pub fn bearer(mut self, token: &str) -> Self {
        self.headers
            .push((header::AUTHORIZATION, format!("Bearer {token}")));
        self
    }
    pub fn json(mut self, v: &Value) -> Self {
        self.headers
            .push((header::CONTENT_TYPE, "application/json".into()));
        self.body = serde_json::to_vec(v).unwrap();
        self
    }
    pub fn form(mut self, pairs: &[(&str, &str)]) -> Self {
        self.headers.push((
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded".into(),
        ));
        self.body = serde_urlencoded::to_string(pairs).unwrap().into_bytes();
        self
    }
    /// One more request header.
    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers
            .push((HeaderName::from_static(name), value.to_string()));
        self
    }
    /// The `Host` the client called (default: `localhost`, or the vault's host).
    pub fn host(mut self, host: &str) -> Self {
        self.host = host.to_string();
        self
    }
    /// The client certificate the TLS layer saw (`None`: the connection presented none).
    pub fn peer(mut self, fingerprint: Option<&str>) -> Self {
        self.peer = Some(PeerCert(fingerprint.map(str::to_string)));
        self
    }
}

/// `surface method template` of a route key.
fn parse_key(key: &str) -> (&str, Method, &str) {
    let mut it = key.splitn(3, ' ');
    let (surface, method, template) = (
        it.next().unwrap(),
        it.next().unwrap(),
        it.next()
            .unwrap_or_else(|| panic!("malformed route key {key:?}")),
    );
    (
        surface,
        Method::from_bytes(method.as_bytes()).unwrap(),
        template,
    )
}

/// Whether `path` (no query) fits `template`: fixed segments case-insensitively, `{x}` one
/// segment, not empty when it is the last (so `…/deployments/` — a list with its trailing
/// slash — fits no `…/deployments/{name}`), a leading `{scope}` any prefix (the scope of an
/// extension resource, `/` included).
pub fn fits(template: &str, path: &str) -> bool {
    let (tail, any_prefix) = match template.strip_prefix("{scope}") {
        Some(t) => (t, true),
        None => (template, false),
    };
    let mut t: Vec<&str> = tail.split('/').collect();
    if any_prefix {
        // the scope's own segments (at least its leading empty one) come before the tail
        t.remove(0);
    }
    let p: Vec<&str> = path.split('/').collect();
    if p.len() < t.len() + usize::from(any_prefix) || (!any_prefix && p.len() != t.len()) {
        return false;
    }
    let p = &p[p.len() - t.len()..];
    let last = t.len() - 1;
    t.iter().zip(p).enumerate().all(|(i, (t, p))| {
        if t.starts_with('{') && t.ends_with('}') {
            // a trailing slash names nothing (`/keys/k//encrypt`, a key's latest version,
            // does)
            i != last || !p.is_empty()
        } else {
            t.eq_ignore_ascii_case(p)
        }
    })
}

impl Srv {
    /// A fresh server: own temp dir and SQLite file, dev clock on (the vault-clock route),
    /// the scheduler ticking hourly so it stays out of the way.
    pub async fn start(routes: &'static [&'static str]) -> Srv {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg =
            keyless_server::Config::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
        cfg.dev_clock = true;
        cfg.vault_check_interval = std::time::Duration::from_secs(3600);
        let store = Store::sqlite(
            &dir.path().join("k.db"),
            Kek::from_bytes(&[7u8; 32]).unwrap(),
        )
        .unwrap();
        let run = keyless_server::start(cfg, store, Arc::new(SystemClock::new()))
            .await
            .unwrap();
        let admin = run
            .bootstrap
            .new_admin
            .clone()
            .expect("a first start shows the bootstrap admin's secret");
        let s = run.state.clone();
        Srv {
            tenant: s.tenant_id.clone(),
            sub: s.subscription_id.clone(),
            base: s.base_url.clone(),
            admin_id: admin.client_id,
            admin_secret: admin.client_secret,
            s,
            routes,
            hits: Mutex::new(BTreeMap::new()),
            task: run.task,
            _dir: dir,
        }
    }

    /// A request for `route` (one of `ROUTES`) to `path` (with its query).
    pub fn call(&self, route: &'static str, path: impl Into<String>) -> Call {
        assert!(
            self.routes.contains(&route),
            "{route:?} is not in ROUTES: enumerate it there first"
        );
        let (surface, method, template) = parse_key(route);
        let path = path.into();
        let bare = path.split('?').next().unwrap();
        assert!(
            fits(template, bare),
            "{path} does not fit the route {route}"
        );
        let host = if surface == "KV" {
            KV_HOST
        } else {
            "localhost"
        };
        Call {
            route,
            method,
            path,
            host: host.to_string(),
            headers: vec![],
            body: vec![],
            peer: None,
        }
    }

    /// Send `c` to the router, in process; record it against its route.
    pub async fn send(&self, c: Call) -> Resp {
        let mut b = Request::builder()
            .method(c.method.clone())
            .uri(&c.path)
            .header(header::HOST, &c.host);
        for (k, v) in &c.headers {
            b = b.header(k, HeaderValue::from_str(v).unwrap());
        }
        let mut req = b.body(Body::from(c.body)).unwrap();
        if let Some(p) = c.peer {
            req.extensions_mut().insert(p);
        }
        let resp = keyless_server::app(self.s.clone())
            .oneshot(req)
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        {
            let mut hits = self.hits.lock().unwrap();
            let h = hits.entry(c.route).or_default();
            match status {
                200..=299 => h.accepted += 1,
                400..=499 => h.refused += 1,
                _ => {}
            }
        }
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    /// Send `c` and require status `want`; the body.
    pub async fn expect(&self, c: Call, want: u16) -> Value {
        let what = format!("{} {}", c.method, c.path);
        let r = self.send(c).await;
        assert_eq!(r.status, want, "{what}: {}", r.text);
        r.body
    }

    /// A token of a client (client credentials at the v2 endpoint, as the SDKs ask).
    pub async fn token(&self, client_id: &str, secret: &str, scope: &str) -> String {
        let c = self
            .call(
                "STS POST /{tenant}/oauth2/v2.0/token",
                format!("/{}/oauth2/v2.0/token", self.tenant),
            )
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", secret),
                ("scope", scope),
            ]);
        let v = self.expect(c, 200).await;
        v["access_token"].as_str().unwrap().to_string()
    }

    /// The bootstrap admin's token for `scope`.
    pub async fn admin_token(&self, scope: &str) -> String {
        let (id, secret) = (self.admin_id.clone(), self.admin_secret.clone());
        self.token(&id, &secret, scope).await
    }

    /// A new application (service principal) without any role: (client id, object id,
    /// secret), registered through Graph by the admin.
    pub async fn roleless_app(&self, name: &str) -> (String, String, String) {
        let t = self.admin_token(GRAPH_SCOPE).await;
        let c = self
            .call("GRAPH POST /v1.0/applications", "/v1.0/applications")
            .bearer(&t)
            .json(&json!({ "displayName": name }));
        let v = self.expect(c, 201).await;
        (
            s(&v["appId"]),
            s(&v["id"]),
            s(&v["passwordCredentials"][0]["secretText"]),
        )
    }

    /// Every route of `area` was both accepted and refused in this test (routes of `public`
    /// have no caller to refuse; routes of `never_accepted` are served only to refuse).
    /// An application without a role: (token for `scope`, object id).
    #[allow(dead_code)] // the other suites that include this harness use it
    pub async fn app(&self, name: &str, scope: &str) -> (String, String) {
        let (id, oid, secret) = self.roleless_app(name).await;
        (self.token(&id, &secret, scope).await, oid)
    }

    /// Assign built-in role `role` (a GUID) on `scope` to `principal`, as `admin` (a token).
    /// The routes must include the role-assignment PUT.
    #[allow(dead_code)] // the other suites that include this harness use it
    pub async fn assign(&self, admin: &str, scope: &str, role: &str, principal: &str) {
        let def = format!(
            "/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{role}",
            self.sub
        );
        let path = format!(
            "{scope}/providers/Microsoft.Authorization/roleAssignments/{}?api-version=2022-04-01",
            uuid::Uuid::new_v4()
        );
        let body = json!({"properties": {"roleDefinitionId": def, "principalId": principal}});
        let route = "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}";
        self.expect(self.call(route, path).bearer(admin).json(&body), 201)
            .await;
    }

    pub fn finish(&self, area: &[&str], public: &[&str], never_accepted: &[&str]) {
        let hits = self.hits.lock().unwrap();
        let mut missing = vec![];
        for r in area {
            let h = hits.get(r).copied().unwrap_or_default();
            if h.accepted == 0 && !never_accepted.contains(r) {
                missing.push(format!("no accepted request: {r}"));
            }
            if h.refused == 0 && !public.contains(r) {
                missing.push(format!("no refused request: {r}"));
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}

/// A JSON string's value (empty when not a string).
pub fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// The claims of a JWT (unverified: the tests only read them).
pub fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

// ------------------------------------------------------------------ each surface's refusal

/// ARM's error: `{"error":{"code","message"}}` with `status`.
pub fn arm_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["error"]["code"], code, "{}", r.text);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        r.text
    );
}

/// ARM's answer to a request without a token: 401 `AuthenticationFailed` and a challenge
/// naming the tenant.
pub fn arm_unauthenticated(srv: &Srv, r: &Resp) {
    arm_error(r, 401, "AuthenticationFailed");
    let c = r.header("www-authenticate").unwrap_or_default();
    assert!(
        c.starts_with(&format!(
            "Bearer authorization_uri=\"{}/{}\"",
            srv.base, srv.tenant
        )),
        "{c}"
    );
}

/// ARM's answer to a caller without the right: 403 `AuthorizationFailed` naming it.
pub fn arm_forbidden(r: &Resp, object_id: &str) {
    arm_error(r, 403, "AuthorizationFailed");
    let m = s(&r.body["error"]["message"]);
    assert!(m.contains(object_id), "{m}");
}

/// The token service's error: AADSTS JSON with `error`, `error_codes` and the description
/// starting with the code.
pub fn sts_error(r: &Resp, status: u16, error: &str, code: u32) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["error"], error, "{}", r.text);
    assert_eq!(r.body["error_codes"], json!([code]), "{}", r.text);
    assert!(
        s(&r.body["error_description"]).starts_with(&format!("AADSTS{code}: ")),
        "{}",
        r.text
    );
    for k in ["timestamp", "trace_id", "correlation_id", "error_uri"] {
        assert!(r.body[k].is_string(), "{k}: {}", r.text);
    }
}

/// The host API's flat error `{"error","error_description"}`.
pub fn host_error(r: &Resp, status: u16, error: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    let o = r.body.as_object().expect("a JSON object");
    assert_eq!(o.len(), 2, "{}", r.text);
    assert_eq!(r.body["error"], error, "{}", r.text);
    assert!(r.body["error_description"].is_string(), "{}", r.text);
}

/// The Key Vault data plane's error `{"error":{"code","message"}}` (and `innererror.code`).
pub fn kv_error(r: &Resp, status: u16, code: &str, inner: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["error"]["code"], code, "{}", r.text);
    assert!(r.body["error"]["message"].is_string(), "{}", r.text);
    if let Some(i) = inner {
        assert_eq!(r.body["error"]["innererror"]["code"], i, "{}", r.text);
    }
}

/// The Key Vault's 401: the challenge the SDKs read (authority and resource).
pub fn kv_unauthenticated(srv: &Srv, r: &Resp) {
    kv_error(r, 401, "Unauthorized", None);
    assert_eq!(
        r.header("www-authenticate"),
        Some(
            format!(
                "Bearer authorization=\"{}/{}\", resource=\"https://vault.localhost\"",
                srv.base, srv.tenant
            )
            .as_str()
        ),
        "{}",
        r.text
    );
}
