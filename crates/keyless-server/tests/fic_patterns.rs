//! Federated identity credential patterns (issue 15, contract C5) and the add-on's readiness
//! check (C4), in process as `tests/routes.rs` does (its harness, `#[path]`-included): the
//! pattern resource's routes and RBAC (Managed Identity Contributor may write credentials but
//! not patterns), validation, more than 20 patterns beside Entra's 20 exact credentials, the
//! node resource group lockdown; the token exchange matched by a pattern against a local HTTPS
//! OIDC issuer (a server of its own trusting that issuer's CA); the readiness check's answers;
//! and the pattern rows of the store on SQLite and PostgreSQL.

#[allow(dead_code)]
#[path = "routes/harness.rs"]
mod harness;

use axum::body::Body;
use axum::http::{header, Method, Request};
use harness::*;
use keyless_store::{FicPatternRecord, FicPut, IdentityRecord, Store};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

/// `ARM {method} /subscriptions/{sub}/resourceGroups/{rg}/providers/{tail}`.
macro_rules! rg {
    ($m:literal, $tail:literal) => {
        concat!(
            "ARM ",
            $m,
            " /subscriptions/{sub}/resourceGroups/{rg}/providers/",
            $tail
        )
    };
}

const ROUTES: &[&str] = &[
    "STS POST /{tenant}/oauth2/v2.0/token",
    "GRAPH POST /v1.0/applications",
    "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}",
    "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
    rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    ),
    rg!(
        "DELETE",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    ),
    rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
    ),
    rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{name}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{name}"
    ),
    rg!(
        "DELETE",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{name}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns"
    ),
    rg!(
        "PUT",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    ),
    rg!(
        "GET",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/checkWorkloadIdentity"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/publishServiceAccountKeys"
    ),
];

const PUT_ID: &str = rg!(
    "PUT",
    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
);
const PUT_FIC: &str = rg!(
    "PUT",
    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
);
const PUT_PATTERN: &str = rg!(
    "PUT",
    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{name}"
);
const GET_PATTERN: &str = rg!(
    "GET",
    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{name}"
);
const DELETE_PATTERN: &str = rg!(
    "DELETE",
    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{name}"
);
const LIST_PATTERNS: &str = rg!(
    "GET",
    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns"
);
const PUT_CLUSTER: &str = rg!(
    "PUT",
    "Microsoft.ContainerService/managedClusters/{cluster}"
);
const GET_CLUSTER: &str = rg!(
    "GET",
    "Microsoft.ContainerService/managedClusters/{cluster}"
);
const CHECK: &str = rg!(
    "POST",
    "Microsoft.ContainerService/managedClusters/{cluster}/checkWorkloadIdentity"
);
const PUBLISH: &str = rg!(
    "POST",
    "Microsoft.ContainerService/managedClusters/{cluster}/publishServiceAccountKeys"
);

const MSI: &str = "api-version=2023-01-31";
const RES: &str = "api-version=2022-12-01";
const AKS: &str = "api-version=2026-08-01";
const AUTHZ: &str = "api-version=2022-04-01";
const AUD: &str = "api://AzureADTokenExchange";
const PATTERN_TYPE: &str =
    "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentialPatterns";
const MANAGED_IDENTITY_CONTRIBUTOR: &str = "e40ec5ca-96e0-45a2-b4ff-59039f2c2b59";
const READER: &str = "acdd72a7-3385-48ef-bd42-f606fba81ae7";

/// A caller: its token and its object id.
struct Who {
    token: String,
    oid: String,
}

async fn admin(srv: &Srv) -> Who {
    let token = srv.admin_token(ARM_SCOPE).await;
    let oid = s(&claims(&token)["oid"]);
    Who { token, oid }
}

async fn nobody(srv: &Srv, name: &str) -> Who {
    let (id, oid, secret) = srv.roleless_app(name).await;
    Who {
        token: srv.token(&id, &secret, ARM_SCOPE).await,
        oid,
    }
}

fn group(srv: &Srv, rg: &str) -> String {
    format!("/subscriptions/{}/resourceGroups/{rg}", srv.sub)
}

async fn put_group(srv: &Srv, who: &Who, rg: &str) {
    let c = srv
        .call(
            "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}",
            format!("{}?{RES}", group(srv, rg)),
        )
        .bearer(&who.token)
        .json(&json!({"location": "local"}));
    srv.expect(c, 201).await;
}

/// Create identity `name` in `rg`: its id and body.
async fn put_identity(srv: &Srv, who: &Who, rg: &str, name: &str) -> (String, Value) {
    let id = format!(
        "{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}",
        group(srv, rg)
    );
    let c = srv
        .call(PUT_ID, format!("{id}?{MSI}"))
        .bearer(&who.token)
        .json(&json!({"location": "local"}));
    let v = srv.expect(c, 201).await;
    (id, v)
}

/// Assign the built-in role `role` (a GUID) on `scope` to `principal`.
async fn assign(srv: &Srv, adm: &Who, scope: &str, role: &str, principal: &str) {
    let ra = format!(
        "{scope}/providers/Microsoft.Authorization/roleAssignments/{}?{AUTHZ}",
        uuid::Uuid::new_v4()
    );
    let def = format!(
        "/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{role}",
        srv.sub
    );
    let c = srv
        .call(
            "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
            ra,
        )
        .bearer(&adm.token)
        .json(&json!({"properties": {"roleDefinitionId": def, "principalId": principal}}));
    srv.expect(c, 201).await;
}

fn pattern_body(issuer: &str, pattern: &str) -> Value {
    json!({"properties": {"issuer": issuer, "subjectPattern": pattern, "audiences": [AUD]}})
}

fn fic_body(issuer: &str, subject: &str) -> Value {
    json!({"properties": {"issuer": issuer, "subject": subject, "audiences": [AUD]}})
}

async fn put_pattern(srv: &Srv, who: &Who, id: &str, name: &str, body: &Value) -> Resp {
    srv.send(
        srv.call(
            PUT_PATTERN,
            format!("{id}/federatedIdentityCredentialPatterns/{name}?{MSI}"),
        )
        .bearer(&who.token)
        .json(body),
    )
    .await
}

async fn put_fic(srv: &Srv, who: &Who, id: &str, name: &str, body: &Value) -> Resp {
    srv.send(
        srv.call(
            PUT_FIC,
            format!("{id}/federatedIdentityCredentials/{name}?{MSI}"),
        )
        .bearer(&who.token)
        .json(body),
    )
    .await
}

/// An ARM 403 `AuthorizationFailed` naming the caller and the action.
fn forbidden(r: &Resp, oid: &str, action: &str) {
    arm_forbidden(r, oid);
    let m = s(&r.body["error"]["message"]);
    assert!(m.contains(action), "{action} in {m}");
}

const ISSUER: &str = "https://oidc.example/cluster/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_routes_rbac_validation_and_the_cap() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger").await;
    let mic = nobody(&srv, "mi-contributor").await;
    put_group(&srv, &adm, "rg1").await;
    let (id, _) = put_identity(&srv, &adm, "rg1", "id1").await;
    assign(&srv, &adm, &id, MANAGED_IDENTITY_CONTRIBUTOR, &mic.oid).await;

    // create, update, show, list
    let one = format!("{id}/federatedIdentityCredentialPatterns/team-a");
    let body = pattern_body(ISSUER, "system:serviceaccount:team-a:*");
    let r = put_pattern(&srv, &adm, &id, "team-a", &body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        r.body,
        json!({
            "id": one,
            "name": "team-a",
            "type": PATTERN_TYPE,
            "properties": {"issuer": ISSUER, "subjectPattern": "system:serviceaccount:team-a:*", "audiences": [AUD]},
        })
    );
    let mut described = body.clone();
    described["properties"]["description"] = json!("namespace self-service");
    let r = put_pattern(&srv, &adm, &id, "TEAM-A", &described).await;
    assert_eq!(r.status, 200, "an update: {}", r.text);
    assert_eq!(r.body["name"], "team-a", "the name keeps its case");
    let r = srv
        .send(
            srv.call(GET_PATTERN, format!("{one}?{MSI}"))
                .bearer(&adm.token),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["properties"]["description"],
        "namespace self-service"
    );
    assert!(r.header("etag").is_some(), "{:?}", r.headers);
    let list = format!("{id}/federatedIdentityCredentialPatterns?{MSI}");
    let v = srv
        .expect(
            srv.call(LIST_PATTERNS, list.clone()).bearer(&adm.token),
            200,
        )
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["value"][0]["id"], one.as_str());

    // refusals: no token, no role, and Managed Identity Contributor (credentials, not patterns)
    let write = "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentialPatterns/write";
    let read =
        "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentialPatterns/read";
    let delete = "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentialPatterns/delete";
    let r = srv
        .send(
            srv.call(
                PUT_PATTERN,
                format!("{id}/federatedIdentityCredentialPatterns/x1?{MSI}"),
            )
            .json(&body),
        )
        .await;
    arm_unauthenticated(&srv, &r);
    for who in [&stranger, &mic] {
        let b = pattern_body(ISSUER, "system:serviceaccount:team-z:*");
        let r = put_pattern(&srv, who, &id, "team-z", &b).await;
        forbidden(&r, &who.oid, write);
        let r = srv
            .send(
                srv.call(GET_PATTERN, format!("{one}?{MSI}"))
                    .bearer(&who.token),
            )
            .await;
        forbidden(&r, &who.oid, read);
        let r = srv
            .send(srv.call(LIST_PATTERNS, list.clone()).bearer(&who.token))
            .await;
        forbidden(&r, &who.oid, read);
        let r = srv
            .send(
                srv.call(DELETE_PATTERN, format!("{one}?{MSI}"))
                    .bearer(&who.token),
            )
            .await;
        forbidden(&r, &who.oid, delete);
    }
    // ... while the Managed Identity Contributor may write an exact credential
    let r = put_fic(
        &srv,
        &mic,
        &id,
        "fic-00",
        &fic_body(ISSUER, "system:serviceaccount:team-a:sa-00"),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = put_fic(
        &srv,
        &stranger,
        &id,
        "fic-xx",
        &fic_body(ISSUER, "system:serviceaccount:team-a:sa-xx"),
    )
    .await;
    forbidden(
        &r,
        &stranger.oid,
        "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/write",
    );

    // validation: 400 InvalidParameter, nothing stored
    let long = format!("a{}", "*a".repeat(300));
    let bad = [
        ("star-only", pattern_body(ISSUER, "*")),
        ("colons-and-stars", pattern_body(ISSUER, "*:*")),
        (
            "double-star",
            pattern_body(ISSUER, "system:serviceaccount:team-a:**"),
        ),
        ("too-long", pattern_body(ISSUER, &long)),
        ("empty", pattern_body(ISSUER, "")),
        ("http-issuer", pattern_body("http://oidc.example/", "x:*")),
        ("star-issuer", pattern_body("https://oidc.example/*", "x:*")),
        (
            "two-audiences",
            json!({"properties": {"issuer": ISSUER, "subjectPattern": "x:*", "audiences": [AUD, "api://other"]}}),
        ),
        (
            "star-audience",
            json!({"properties": {"issuer": ISSUER, "subjectPattern": "x:*", "audiences": ["api://*"]}}),
        ),
        (
            "subject-not-pattern",
            json!({"properties": {"issuer": ISSUER, "subject": "x:y", "audiences": [AUD]}}),
        ),
        ("no-properties", json!({})),
    ];
    for (name, b) in &bad {
        let r = put_pattern(&srv, &adm, &id, name, b).await;
        arm_error(&r, 400, "InvalidParameter");
    }
    let r = put_pattern(&srv, &adm, &id, "a.b", &pattern_body(ISSUER, "x:*")).await;
    arm_error(&r, 400, "InvalidParameter");
    let r = put_pattern(&srv, &adm, &id, "dupe", &body).await;
    arm_error(&r, 400, "InvalidParameter");
    assert!(r.text.contains("already exists"), "{}", r.text);
    let r = srv
        .send(
            srv.call(
                PUT_PATTERN,
                format!("{id}/federatedIdentityCredentialPatterns/old?api-version=2018-11-30"),
            )
            .bearer(&adm.token)
            .json(&pattern_body(ISSUER, "x:*")),
        )
        .await;
    arm_error(&r, 404, "InvalidResourceType");
    let v = srv
        .expect(
            srv.call(LIST_PATTERNS, list.clone()).bearer(&adm.token),
            200,
        )
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");

    // beyond the cap: 25 patterns, while the 21st exact credential is refused
    for i in 1..25 {
        let b = pattern_body(ISSUER, &format!("system:serviceaccount:ns-{i:02}:*"));
        let r = put_pattern(&srv, &adm, &id, &format!("p-{i:02}"), &b).await;
        assert_eq!(r.status, 201, "pattern {i}: {}", r.text);
    }
    let v = srv
        .expect(
            srv.call(LIST_PATTERNS, list.clone()).bearer(&adm.token),
            200,
        )
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(25), "{v}");
    for i in 1..20 {
        let b = fic_body(ISSUER, &format!("system:serviceaccount:team-a:sa-{i:02}"));
        let r = put_fic(&srv, &adm, &id, &format!("fic-{i:02}"), &b).await;
        assert_eq!(r.status, 201, "credential {i}: {}", r.text);
    }
    let r = put_fic(
        &srv,
        &adm,
        &id,
        "fic-20",
        &fic_body(ISSUER, "system:serviceaccount:team-a:sa-20"),
    )
    .await;
    arm_error(&r, 400, "InvalidParameter");
    assert!(r.text.contains("at most 20"), "{}", r.text);
    let r = put_pattern(
        &srv,
        &adm,
        &id,
        "p-25",
        &pattern_body(ISSUER, "system:serviceaccount:ns-25:*"),
    )
    .await;
    assert_eq!(r.status, 201, "a 26th pattern: {}", r.text);

    // delete: 200, then 204; then 404
    let del = || {
        srv.call(DELETE_PATTERN, format!("{one}?{MSI}"))
            .bearer(&adm.token)
    };
    srv.expect(del(), 200).await;
    srv.expect(del(), 204).await;
    let r = srv
        .send(
            srv.call(GET_PATTERN, format!("{one}?{MSI}"))
                .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "ResourceNotFound");

    // the patterns go with their identity
    let c = srv
        .call(
            rg!(
                "DELETE",
                "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
            ),
            format!("{id}?{MSI}"),
        )
        .bearer(&adm.token);
    srv.expect(c, 200).await;
    let r = srv
        .send(srv.call(LIST_PATTERNS, list.clone()).bearer(&adm.token))
        .await;
    arm_error(&r, 404, "ResourceNotFound");
    put_identity(&srv, &adm, "rg1", "id1").await;
    let v = srv
        .expect(
            srv.call(LIST_PATTERNS, list.clone()).bearer(&adm.token),
            200,
        )
        .await;
    assert_eq!(
        v["value"],
        json!([]),
        "a new identity of the same name has none"
    );

    // the node resource group's identities are the cluster's: no pattern written there
    let cluster = format!(
        "{}/providers/Microsoft.ContainerService/managedClusters/c1",
        group(&srv, "rg1")
    );
    let v = srv
        .expect(
            srv.call(PUT_CLUSTER, format!("{cluster}?{AKS}"))
                .bearer(&adm.token)
                .json(&cluster_body()),
            201,
        )
        .await;
    let kubelet = s(&v["properties"]["identityProfile"]["kubeletidentity"]["resourceId"]);
    assert!(!kubelet.is_empty(), "{v}");
    let r = put_pattern(&srv, &adm, &kubelet, "team-a", &body).await;
    arm_error(&r, 409, "OperationNotAllowed");
    let r = put_fic(
        &srv,
        &adm,
        &kubelet,
        "team-a",
        &fic_body(ISSUER, "system:serviceaccount:team-a:web"),
    )
    .await;
    arm_error(&r, 409, "OperationNotAllowed");
}

fn cluster_body() -> Value {
    json!({"location": "local", "identity": {"type": "SystemAssigned"},
        "properties": {"dnsPrefix": "c1", "agentPoolProfiles": [{"name": "np1", "count": 1, "mode": "System"}]}})
}

// ------------------------------------------------------------------ a local OIDC issuer

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An RS256 signer of JWTs: its key and `kid`.
struct Signer {
    key: keyless_pki::SigningKey,
}

impl Signer {
    fn new(ca: &keyless_pki::Ca) -> Signer {
        let (key, _) = keyless_pki::SigningKey::generate(ca, now(), 3600).unwrap();
        Signer { key }
    }

    /// The public JWK (RSA: kty, use, alg, kid, n, e).
    fn jwk(&self) -> Value {
        let j = self.key.jwk();
        json!({"kty": j.kty, "use": "sig", "alg": "RS256", "kid": j.kid, "n": j.n, "e": j.e})
    }

    /// A token as a Kubernetes API server mints one for a service account.
    fn token(&self, iss: &str, sub: &str, aud: &str) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.key.kid()});
        let t = now();
        let claims =
            json!({"iss": iss, "sub": sub, "aud": [aud], "iat": t, "nbf": t - 5, "exp": t + 600});
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = self.key.sign(input.as_bytes()).unwrap();
        format!("{input}.{}", b64url(&sig))
    }
}

/// An HTTPS OIDC issuer on 127.0.0.1 (`https://localhost:{port}/cluster/`, a trailing slash as
/// AKS's issuers have): discovery and JWKS, its certificate from a CA of its own.
struct Issuer {
    url: String,
    ca_pem: String,
    signer: Signer,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_issuer() -> Issuer {
    let (ca, _) = keyless_pki::Ca::generate("test OIDC issuer CA", now()).unwrap();
    let (cert, key) = ca
        .issue_server_cert(&["localhost".into(), "127.0.0.1".into()], now(), 3600)
        .unwrap();
    let tls =
        keyless_pki::server_tls_config(vec![cert, ca.cert_der().to_vec()], &key, ca.cert_der())
            .unwrap();
    let signer = Signer::new(&ca);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let url = format!("{base}/cluster/");
    let discovery = json!({"issuer": url, "jwks_uri": format!("{base}/cluster/openid/v1/jwks"),
        "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"]})
    .to_string();
    let jwks = json!({"keys": [signer.jwk()]}).to_string();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, discovery, jwks) = (acceptor.clone(), discovery.clone(), jwks.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let (status, body) = match req.uri().path() {
                        "/cluster/.well-known/openid-configuration" => (200, discovery.clone()),
                        "/cluster/openid/v1/jwks" => (200, jwks.clone()),
                        _ => (404, String::new()),
                    };
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Issuer {
        url,
        ca_pem: ca.cert_pem(),
        signer,
        task,
    }
}

/// A server of its own trusting `issuer_ca` for federation (the harness's trusts the system
/// roots only), driven in process as the harness does.
struct Fed {
    run: keyless_server::RunningServer,
    admin_token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Fed {
    fn drop(&mut self) {
        self.run.task.abort();
        for t in &self.run.background {
            t.abort();
        }
    }
}

impl Fed {
    async fn start(issuer_ca: &str) -> Fed {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg =
            keyless_server::Config::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
        cfg.issuer_ca_pem = Some(issuer_ca.to_string());
        cfg.vault_check_interval = std::time::Duration::from_secs(3600);
        let store = Store::sqlite(
            &dir.path().join("k.db"),
            keyless_store::Kek::from_bytes(&[9u8; 32]).unwrap(),
        )
        .unwrap();
        Fed::on(dir, cfg, store).await
    }

    /// A server on `store` (configured by `cfg`, its data under `dir`) whose first start this
    /// is: the bootstrap admin's token.
    async fn on(dir: tempfile::TempDir, cfg: keyless_server::Config, store: Store) -> Fed {
        let run = keyless_server::start(
            cfg,
            store,
            Arc::new(keyless_core::clock::SystemClock::new()),
        )
        .await
        .unwrap();
        let a = run.bootstrap.new_admin.clone().unwrap();
        let mut fed = Fed {
            run,
            admin_token: String::new(),
            _dir: dir,
        };
        let (st, v) = fed
            .token(&[
                ("grant_type", "client_credentials"),
                ("client_id", &a.client_id),
                ("client_secret", &a.client_secret),
                ("scope", ARM_SCOPE),
            ])
            .await;
        assert_eq!(st, 200, "{v}");
        fed.admin_token = s(&v["access_token"]);
        fed
    }

    async fn send(&self, m: Method, path: &str, ctype: &str, body: Vec<u8>) -> (u16, Value) {
        let req = Request::builder()
            .method(m)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, ctype)
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.admin_token),
            )
            .body(Body::from(body))
            .unwrap();
        let resp = keyless_server::app(self.run.state.clone())
            .oneshot(req)
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn arm(&self, m: Method, path: &str, body: &Value) -> Value {
        let (st, v) = self
            .send(
                m.clone(),
                path,
                "application/json",
                serde_json::to_vec(body).unwrap(),
            )
            .await;
        assert!((200..300).contains(&st), "{m} {path}: {st} {v}");
        v
    }

    async fn token(&self, form: &[(&str, &str)]) -> (u16, Value) {
        let path = format!("/{}/oauth2/v2.0/token", self.run.state.tenant_id);
        let body = serde_urlencoded::to_string(form).unwrap().into_bytes();
        self.send(
            Method::POST,
            &path,
            "application/x-www-form-urlencoded",
            body,
        )
        .await
    }

    /// Exchange `assertion` for `client_id`'s token, as `WorkloadIdentityCredential` asks.
    async fn exchange(&self, client_id: &str, assertion: &str) -> (u16, Value) {
        self.token(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", ARM_SCOPE),
        ])
        .await
    }
}

fn assert_sts_refused(st: u16, v: &Value, code: u32) {
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"], "invalid_client", "{v}");
    assert_eq!(v["error_codes"], json!([code]), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_is_matched_by_a_pattern_after_the_exact_credentials() {
    let issuer = start_issuer().await;
    let fed = Fed::start(&issuer.ca_pem).await;
    let sub = fed.run.state.subscription_id.clone();
    let rg = format!("/subscriptions/{sub}/resourceGroups/rg1");
    fed.arm(
        Method::PUT,
        &format!("{rg}?{RES}"),
        &json!({"location": "local"}),
    )
    .await;
    let id = format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/web");
    let v = fed
        .arm(
            Method::PUT,
            &format!("{id}?{MSI}"),
            &json!({"location": "local"}),
        )
        .await;
    let (client_id, principal_id) = (
        s(&v["properties"]["clientId"]),
        s(&v["properties"]["principalId"]),
    );
    let pattern = format!("{id}/federatedIdentityCredentialPatterns/team-a?{MSI}");
    fed.arm(
        Method::PUT,
        &pattern,
        &pattern_body(&issuer.url, "system:serviceaccount:team-a:*"),
    )
    .await;
    let token = |sub: &str| issuer.signer.token(&issuer.url, sub, AUD);

    // the pattern: any service account of team-a
    for sa in ["web", "api-2"] {
        let (st, v) = fed
            .exchange(
                &client_id,
                &token(&format!("system:serviceaccount:team-a:{sa}")),
            )
            .await;
        assert_eq!(st, 200, "{sa}: {v}");
        let c = claims(&s(&v["access_token"]));
        assert_eq!(c["oid"], principal_id.as_str(), "{c}");
    }
    // another namespace, or a subject with one more segment: Entra's subject mismatch
    for sub in [
        "system:serviceaccount:team-b:web",
        "system:serviceaccount:team-a:web:x",
        "system:serviceaccount:team-a:",
    ] {
        let (st, v) = fed.exchange(&client_id, &token(sub)).await;
        assert_sts_refused(st, &v, 700213);
    }
    // another audience: 700212; an issuer no credential or pattern names: 700211
    let other_aud = issuer.signer.token(
        &issuer.url,
        "system:serviceaccount:team-a:web",
        "api://other",
    );
    let (st, v) = fed.exchange(&client_id, &other_aud).await;
    assert_sts_refused(st, &v, 700212);
    let other_iss = issuer.signer.token(
        issuer.url.trim_end_matches('/'),
        "system:serviceaccount:team-a:web",
        AUD,
    );
    let (st, v) = fed.exchange(&client_id, &other_iss).await;
    assert_sts_refused(st, &v, 700211);

    // a subject over 600 characters is no subject match (an unverified claim is not matched
    // against every pattern however long the token allows), echoed cut short
    let long_sub = format!("system:serviceaccount:team-a:{}", "x".repeat(10_000));
    let (st, v) = fed.exchange(&client_id, &token(&long_sub)).await;
    assert_sts_refused(st, &v, 700213);
    let shown = s(&v["error_description"]);
    assert!(shown.len() < 2_000, "{} bytes", shown.len());
    let at_bound = format!("system:serviceaccount:team-a:{}", "x".repeat(600 - 29));
    assert_eq!(at_bound.len(), 600);
    let (st, v) = fed.exchange(&client_id, &token(&at_bound)).await;
    assert_eq!(st, 200, "{v}");

    // an exact credential outside the pattern is matched first (Entra's rule, unchanged)
    let fic = format!("{id}/federatedIdentityCredentials/team-b-special?{MSI}");
    fed.arm(
        Method::PUT,
        &fic,
        &fic_body(&issuer.url, "system:serviceaccount:team-b:special"),
    )
    .await;
    let (st, v) = fed
        .exchange(&client_id, &token("system:serviceaccount:team-b:special"))
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = fed
        .exchange(&client_id, &token("system:serviceaccount:team-b:web"))
        .await;
    assert_sts_refused(st, &v, 700213);

    // without the pattern, team-a's accounts are refused again, the exact one still works
    fed.arm(Method::DELETE, &pattern, &Value::Null).await;
    let (st, v) = fed
        .exchange(&client_id, &token("system:serviceaccount:team-a:web"))
        .await;
    assert_sts_refused(st, &v, 700213);
    let (st, v) = fed
        .exchange(&client_id, &token("system:serviceaccount:team-b:special"))
        .await;
    assert_eq!(st, 200, "{v}");
}

// ------------------------------------------------------------------ the readiness check (C4)

async fn check(srv: &Srv, who: &Who, cluster: &str, subjects: Value) -> Resp {
    srv.send(
        srv.call(CHECK, format!("{cluster}/checkWorkloadIdentity?{AKS}"))
            .bearer(&who.token)
            .json(&json!({ "subjects": subjects })),
    )
    .await
}

/// `(ready, reason)` of each result, after checking that each echoes its entry.
fn outcomes(r: &Resp, asked: &Value) -> Vec<(bool, String)> {
    assert_eq!(r.status, 200, "{}", r.text);
    let results = r.body["results"].as_array().expect("results");
    let asked = asked.as_array().unwrap();
    assert_eq!(results.len(), asked.len(), "{}", r.text);
    results
        .iter()
        .zip(asked)
        .map(|(got, want)| {
            assert_eq!(got["clientId"], want["clientId"], "{got}");
            assert_eq!(got["subject"], want["subject"], "{got}");
            assert!(!s(&got["message"]).is_empty(), "{got}");
            (got["ready"].as_bool().expect("ready"), s(&got["reason"]))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_check_answers_what_the_exchange_would() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger").await;
    let reader = nobody(&srv, "reader").await;
    put_group(&srv, &adm, "rg1").await;
    let cluster = format!(
        "{}/providers/Microsoft.ContainerService/managedClusters/c1",
        group(&srv, "rg1")
    );
    srv.expect(
        srv.call(PUT_CLUSTER, format!("{cluster}?{AKS}"))
            .bearer(&adm.token)
            .json(&cluster_body()),
        201,
    )
    .await;
    // names no answer may show (the caller is any cluster's add-on, the identity anyone's)
    let (ident_name, fic_name, pattern_name) = ("payroll-uami", "exact-cred-7", "pattern-cred-9");
    let (id, v) = put_identity(&srv, &adm, "rg1", ident_name).await;
    let client_id = s(&v["properties"]["clientId"]);
    let team = |ns: &str, sa: &str| json!({"clientId": client_id, "subject": format!("system:serviceaccount:{ns}:{sa}"), "audience": AUD});

    // who may ask: …/read on the cluster (or its kubelet identity); 403 otherwise
    let one = json!([team("team-a", "web")]);
    let r = check(&srv, &stranger, &cluster, one.clone()).await;
    forbidden(
        &r,
        &stranger.oid,
        "Microsoft.ContainerService/managedClusters/read",
    );
    assign(&srv, &adm, &cluster, READER, &reader.oid).await;
    let r = check(&srv, &reader, &cluster, one.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // the body: 1..=500 entries, clientId and subject strings
    let too_many = Value::Array(vec![team("team-a", "web"); 501]);
    for bad in [
        json!([]),
        too_many,
        json!([{"clientId": client_id}]),
        json!([{"subject": "system:serviceaccount:a:b"}]),
        json!([{"clientId": 7, "subject": "system:serviceaccount:a:b"}]),
        json!(["x"]),
    ] {
        let r = check(&srv, &adm, &cluster, bad).await;
        arm_error(&r, 400, "InvalidParameter");
    }
    let r = srv
        .send(
            srv.call(CHECK, format!("{cluster}/checkWorkloadIdentity?{AKS}"))
                .bearer(&adm.token)
                .json(&json!({})),
        )
        .await;
    arm_error(&r, 400, "InvalidParameter");
    let full = Value::Array(vec![team("team-a", "web"); 500]);
    let r = check(&srv, &adm, &cluster, full.clone()).await;
    assert_eq!(outcomes(&r, &full).len(), 500);

    // no OIDC issuer yet: nothing is ready, whatever the identity has
    let asked = json!([
        team("team-a", "web"),
        {"clientId": uuid::Uuid::new_v4().to_string(), "subject": "system:serviceaccount:team-a:web"},
    ]);
    let r = check(&srv, &adm, &cluster, asked.clone()).await;
    assert_eq!(
        outcomes(&r, &asked),
        vec![
            (false, "issuer_not_enabled".to_string()),
            (false, "issuer_not_enabled".to_string())
        ]
    );

    // enable the cluster's OIDC issuer (the cluster provider's part of issue 15)
    let mut enabled = cluster_body();
    enabled["properties"]["oidcIssuerProfile"] = json!({"enabled": true});
    let r = srv
        .send(
            srv.call(PUT_CLUSTER, format!("{cluster}?{AKS}"))
                .bearer(&adm.token)
                .json(&enabled),
        )
        .await;
    let issuer_url = s(&r.body["properties"]["oidcIssuerProfile"]["issuerURL"]);
    if r.status != 200 || issuer_url.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the cluster's OIDC issuer is required under CI: {} {}",
            r.status,
            r.text
        );
        eprintln!(
            "SKIPPED the readiness cases that need the cluster's OIDC issuer (not served yet): {} {}",
            r.status, r.text
        );
        return;
    }
    let v = srv
        .expect(
            srv.call(GET_CLUSTER, format!("{cluster}?{AKS}"))
                .bearer(&adm.token),
            200,
        )
        .await;
    assert_eq!(
        s(&v["properties"]["oidcIssuerProfile"]["issuerURL"]),
        issuer_url
    );

    // enabled, but the add-on has published no keys yet
    let r = check(&srv, &adm, &cluster, asked.clone()).await;
    assert_eq!(
        outcomes(&r, &asked),
        vec![
            (false, "no_keys_published".to_string()),
            (false, "no_keys_published".to_string())
        ]
    );
    let (ca, _) = keyless_pki::Ca::generate("test API server", now()).unwrap();
    let apiserver = Signer::new(&ca);
    let r = srv
        .send(
            srv.call(
                PUBLISH,
                format!("{cluster}/publishServiceAccountKeys?{AKS}"),
            )
            .bearer(&adm.token)
            .json(&json!({"keys": [apiserver.jwk()]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // published: each subject on its own
    let exact = format!("{id}/federatedIdentityCredentials/{fic_name}");
    let r = put_fic(
        &srv,
        &adm,
        &id,
        fic_name,
        &fic_body(&issuer_url, "system:serviceaccount:team-b:special"),
    )
    .await;
    assert_eq!(r.status, 201, "{exact}: {}", r.text);
    let r = put_pattern(
        &srv,
        &adm,
        &id,
        pattern_name,
        &pattern_body(&issuer_url, "system:serviceaccount:team-a:*"),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let mut other_aud = team("team-a", "web");
    other_aud["audience"] = json!("api://other");
    let mut no_aud = team("team-a", "api");
    no_aud.as_object_mut().unwrap().remove("audience");
    let asked = json!([
        team("team-a", "web"),
        team("team-b", "special"),
        team("team-b", "web"),
        {"clientId": uuid::Uuid::new_v4().to_string(), "subject": "system:serviceaccount:team-a:web"},
        other_aud,
        no_aud,
        team("team-a", "web:x"),
    ]);
    let r = check(&srv, &adm, &cluster, asked.clone()).await;
    let want: Vec<(bool, String)> = [
        (true, "ready"),
        (true, "ready"),
        (false, "no_matching_credential"),
        (false, "identity_not_found"),
        (false, "no_matching_credential"),
        (true, "ready"),
        (false, "no_matching_credential"),
    ]
    .iter()
    .map(|(b, r)| (*b, r.to_string()))
    .collect();
    assert_eq!(outcomes(&r, &asked), want, "{}", r.text);
    // what matched is said by kind, never by name: no identity, credential or pattern name
    let message = |i: usize| s(&r.body["results"][i]["message"]);
    assert_eq!(
        message(0),
        "A federated identity credential pattern matches.",
        "{}",
        r.text
    );
    assert_eq!(
        message(1),
        "An exact federated identity credential matches.",
        "{}",
        r.text
    );
    assert!(
        message(2).contains("system:serviceaccount:team-b:web") && message(2).contains(&issuer_url),
        "{}",
        r.text
    );
    for i in 0..want.len() {
        for name in [ident_name, fic_name, pattern_name] {
            assert!(
                !message(i).contains(name),
                "result {i} names '{name}': {}",
                r.text
            );
        }
    }
    // the identity is found as the token endpoint finds it: an application's client id (an
    // app registration, as the exchange answers AADSTS700016 for a federated assertion) is no
    // identity
    let (app_id, _, _) = srv.roleless_app("an-app").await;
    let asked_app = json!([{"clientId": app_id, "subject": "system:serviceaccount:team-a:web"}]);
    let r_app = check(&srv, &adm, &cluster, asked_app.clone()).await;
    assert_eq!(
        outcomes(&r_app, &asked_app),
        vec![(false, "identity_not_found".to_string())]
    );
    // a subject longer than 600 characters matches nothing, though the pattern would fit it
    // (the exchange refuses such an assertion with AADSTS700213 before matching)
    let long = json!([team("team-a", &"x".repeat(600))]);
    let r_long = check(&srv, &adm, &cluster, long.clone()).await;
    assert_eq!(
        outcomes(&r_long, &long),
        vec![(false, "no_matching_credential".to_string())]
    );

    // and the exchange agrees: a token of the API server for team-a exchanges
    let assertion = apiserver.token(&issuer_url, "system:serviceaccount:team-a:web", AUD);
    let r = srv
        .send(
            srv.call(
                "STS POST /{tenant}/oauth2/v2.0/token",
                format!("/{}/oauth2/v2.0/token", srv.tenant),
            )
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", &client_id),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion),
                ("scope", ARM_SCOPE),
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// The readiness check reads everything — the cluster's published keys too — in the request's
/// unit of work: on a server whose PostgreSQL pool has one connection it answers (a second
/// unit of work inside the first would wait for that connection until the pool gives up).
#[test]
fn the_readiness_check_holds_one_connection_on_postgresql() {
    let Some(pg) = keyless_store::testing::PgServer::start() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = pg.database().await;
        let kek = || keyless_store::Kek::from_bytes(&[5u8; 32]).unwrap();
        let config = |dir: &tempfile::TempDir| {
            let mut cfg = keyless_server::Config::new(
                dir.path().join("data"),
                "127.0.0.1:0".parse().unwrap(),
            );
            cfg.vault_check_interval = std::time::Duration::from_secs(3600);
            cfg
        };
        // the cluster, its issuer and keys, an identity with a pattern: through a server with
        // the default pool
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&dir);
        let store = Store::postgres(&keyless_store::postgres::PgOptions::new(url.clone()), kek())
            .await
            .unwrap();
        let a = Fed::on(dir, cfg, store).await;
        let base = a.run.state.base_url.clone();
        let rg = format!(
            "/subscriptions/{}/resourceGroups/rg1",
            a.run.state.subscription_id
        );
        a.arm(
            Method::PUT,
            &format!("{rg}?{RES}"),
            &json!({"location": "local"}),
        )
        .await;
        let cluster = format!("{rg}/providers/Microsoft.ContainerService/managedClusters/c1");
        let mut body = cluster_body();
        body["properties"]["oidcIssuerProfile"] = json!({"enabled": true});
        let v = a.arm(Method::PUT, &format!("{cluster}?{AKS}"), &body).await;
        let issuer_url = s(&v["properties"]["oidcIssuerProfile"]["issuerURL"]);
        assert!(issuer_url.starts_with(&base), "{v}");
        let (ca, _) = keyless_pki::Ca::generate("test API server", now()).unwrap();
        a.arm(
            Method::POST,
            &format!("{cluster}/publishServiceAccountKeys?{AKS}"),
            &json!({"keys": [Signer::new(&ca).jwk()]}),
        )
        .await;
        let id = format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/web");
        let v = a
            .arm(
                Method::PUT,
                &format!("{id}?{MSI}"),
                &json!({"location": "local"}),
            )
            .await;
        let client_id = s(&v["properties"]["clientId"]);
        a.arm(
            Method::PUT,
            &format!("{id}/federatedIdentityCredentialPatterns/team-a?{MSI}"),
            &pattern_body(&issuer_url, "system:serviceaccount:team-a:*"),
        )
        .await;

        // another replica of the same URL whose pool has one connection
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&dir);
        cfg.public_url = Some(base);
        let mut opts = keyless_store::postgres::PgOptions::new(url);
        opts.pool_size = 1;
        opts.wait_timeout = std::time::Duration::from_secs(3);
        let store = Store::postgres(&opts, kek()).await.unwrap();
        let run = keyless_server::start(
            cfg,
            store,
            Arc::new(keyless_core::clock::SystemClock::new()),
        )
        .await
        .unwrap();
        let b = Fed {
            run,
            admin_token: a.admin_token.clone(),
            _dir: dir,
        };
        let subjects = json!({"subjects": [
            {"clientId": client_id, "subject": "system:serviceaccount:team-a:web"},
            {"clientId": client_id, "subject": "system:serviceaccount:team-b:web"},
        ]});
        let (st, v) = b
            .send(
                Method::POST,
                &format!("{cluster}/checkWorkloadIdentity?{AKS}"),
                "application/json",
                serde_json::to_vec(&subjects).unwrap(),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["results"][0]["reason"], "ready", "{v}");
        assert_eq!(v["results"][1]["reason"], "no_matching_credential", "{v}");
    });
}

// ------------------------------------------------------------------ the store, both backends

fn ident(name: &str) -> IdentityRecord {
    let rid = format!("/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}");
    IdentityRecord {
        key: rid.to_lowercase(),
        resource_id: rid,
        name: name.into(),
        subscription: "s".into(),
        resource_group: "rg".into(),
        location: "local".into(),
        tags: Default::default(),
        tenant_id: "t".into(),
        principal_id: format!("p-{name}"),
        client_id: format!("c-{name}"),
        system_vm: None,
        created: 1,
    }
}

fn rec(identity: &IdentityRecord, name: &str, pattern: &str) -> FicPatternRecord {
    FicPatternRecord {
        identity_key: identity.key.clone(),
        name: name.into(),
        issuer: ISSUER.into(),
        subject_pattern: pattern.into(),
        audiences: vec![AUD.into()],
        description: None,
        created: 1,
    }
}

async fn put(s: &Store, p: &FicPatternRecord, max: usize) -> keyless_store::Result<FicPut> {
    let mut tx = s.write("test").await.unwrap();
    let out = tx.put_fic_pattern(p, max).await;
    if out.is_ok() {
        tx.commit().await.unwrap();
    }
    out
}

async fn names(s: &Store, key: &str) -> Vec<String> {
    let mut tx = s.read("test").await.unwrap();
    tx.list_fic_patterns(key)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect()
}

async fn pattern_rows(s: Store) {
    let u = ident("u1");
    let mut tx = s.write("test").await.unwrap();
    tx.put_identity(&u).await.unwrap();
    tx.commit().await.unwrap();
    // a missing identity
    let r = put(&s, &rec(&ident("ghost"), "a", "x:*"), 10).await;
    assert!(
        matches!(
            r,
            Err(keyless_store::StoreError::Conflict(
                keyless_store::Conflict::MissingReference(_)
            ))
        ),
        "{r:?}"
    );
    // the bound, updates not counted, issuer + pattern unique
    assert_eq!(
        put(&s, &rec(&u, "B", "b:*"), 2).await.unwrap(),
        FicPut::Created
    );
    assert_eq!(
        put(&s, &rec(&u, "a", "a:*"), 2).await.unwrap(),
        FicPut::Created
    );
    assert_eq!(
        put(&s, &rec(&u, "c", "c:*"), 2).await.unwrap(),
        FicPut::LimitReached
    );
    assert_eq!(
        put(&s, &rec(&u, "b", "b2:*"), 2).await.unwrap(),
        FicPut::Updated
    );
    assert_eq!(
        put(&s, &rec(&u, "c", "a:*"), 3).await.unwrap(),
        FicPut::DuplicateIssuerSubject
    );
    assert_eq!(
        put(&s, &rec(&u, "a", "a:*"), 2).await.unwrap(),
        FicPut::Updated
    );
    assert_eq!(names(&s, &u.key).await, ["a", "b"]);
    let mut tx = s.read("test").await.unwrap();
    let b = tx.get_fic_pattern(&u.key, "B").await.unwrap().unwrap();
    assert_eq!(b.subject_pattern, "b2:*");
    drop(tx);
    // the old pattern of `b` is free again
    assert_eq!(
        put(&s, &rec(&u, "c", "b:*"), 3).await.unwrap(),
        FicPut::Created
    );
    let mut tx = s.write("test").await.unwrap();
    assert!(tx.delete_fic_pattern(&u.key, "C").await.unwrap());
    assert!(!tx.delete_fic_pattern(&u.key, "c").await.unwrap());
    tx.commit().await.unwrap();

    // concurrent writers count one after the other under the identity's row
    let v = ident("v1");
    let mut tx = s.write("test").await.unwrap();
    tx.put_identity(&v).await.unwrap();
    tx.commit().await.unwrap();
    let gate = Arc::new(tokio::sync::Barrier::new(12));
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let (s, gate, p) = (
                s.clone(),
                gate.clone(),
                rec(&v, &format!("p{i:02}"), &format!("ns-{i}:*")),
            );
            tokio::spawn(async move {
                gate.wait().await;
                put(&s, &p, 5).await.unwrap()
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            FicPut::Created => created += 1,
            FicPut::LimitReached => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(created, 5);
    assert_eq!(names(&s, &v.key).await.len(), 5);

    // gone with the identity
    let mut tx = s.write("test").await.unwrap();
    assert!(tx.delete_identity(&u.key).await.unwrap());
    tx.commit().await.unwrap();
    assert!(names(&s, &u.key).await.is_empty());
    let mut tx = s.write("test").await.unwrap();
    tx.put_identity(&u).await.unwrap();
    tx.commit().await.unwrap();
    assert!(
        names(&s, &u.key).await.is_empty(),
        "a new identity starts empty"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_rows_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::sqlite(
        &dir.path().join("p.db"),
        keyless_store::Kek::from_bytes(&[3u8; 32]).unwrap(),
    )
    .unwrap();
    pattern_rows(s).await;
}

#[test]
fn pattern_rows_on_postgres() {
    let Some(pg) = keyless_store::testing::PgServer::start() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = pg.database().await;
        let s = Store::postgres(
            &keyless_store::postgres::PgOptions::new(url),
            keyless_store::Kek::from_bytes(&[3u8; 32]).unwrap(),
        )
        .await
        .unwrap();
        pattern_rows(s).await;
    });
}
