//! A managed cluster's OIDC issuer served by Keyless (issue 15, contracts C1–C3), in process
//! like `tests/routes.rs` (its harness: a real server state on its own SQLite file, requests
//! handed to the router, no TCP): enabling the issuer on the cluster resource (and the rules
//! AKS has for it), the discovery document and JWKS before and after the add-on publishes
//! the API server's keys, who may publish what, the webhook serving certificate, and a
//! federated exchange end to end with a service-account token signed by a published key —
//! including a key rotation.

#[allow(dead_code)]
#[path = "routes/harness.rs"]
mod harness;

use harness::*;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{json, Value};
use std::sync::Arc;

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

const PUT_GROUP: &str = "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}";
const PUT_CLUSTER: &str = rg!(
    "PUT",
    "Microsoft.ContainerService/managedClusters/{cluster}"
);
const GET_CLUSTER: &str = rg!(
    "GET",
    "Microsoft.ContainerService/managedClusters/{cluster}"
);
const DELETE_CLUSTER: &str = rg!(
    "DELETE",
    "Microsoft.ContainerService/managedClusters/{cluster}"
);
const JOIN_TOKEN: &str = rg!(
    "POST",
    "Microsoft.ContainerService/managedClusters/{cluster}/agentPools/{pool}/generateJoinToken"
);
const PUBLISH: &str = rg!(
    "POST",
    "Microsoft.ContainerService/managedClusters/{cluster}/publishServiceAccountKeys"
);
const WEBHOOK_CERT: &str = rg!(
    "POST",
    "Microsoft.ContainerService/managedClusters/{cluster}/issueWebhookCertificate"
);
const PUT_IDENTITY: &str = rg!(
    "PUT",
    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
);
const PUT_FIC: &str = rg!(
    "PUT",
    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
);
const DISCOVERY: &str = "OIDC GET /oidc/{id}/.well-known/openid-configuration";
const JWKS: &str = "OIDC GET /oidc/{id}/openid/v1/jwks";
const TOKEN: &str = "STS POST /{tenant}/oauth2/v2.0/token";

const ROUTES: &[&str] = &[
    PUT_GROUP,
    PUT_CLUSTER,
    GET_CLUSTER,
    DELETE_CLUSTER,
    JOIN_TOKEN,
    PUBLISH,
    WEBHOOK_CERT,
    PUT_IDENTITY,
    PUT_FIC,
    DISCOVERY,
    JWKS,
    TOKEN,
    "GRAPH POST /v1.0/applications",
    "HOST POST /keyless/host/v1/join",
    "HOST POST /keyless/host/v1/token",
];

const AKS: &str = "api-version=2026-08-01";
const MSI: &str = "api-version=2023-01-31";
const RES: &str = "api-version=2022-12-01";
const EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
const SUBJECT: &str = "system:serviceaccount:app:web";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A caller: its ARM token and its object id.
struct Who {
    token: String,
    oid: String,
}

async fn admin(srv: &Srv) -> Who {
    let token = srv.admin_token(ARM_SCOPE).await;
    let oid = s(&claims(&token)["oid"]);
    Who { token, oid }
}

async fn stranger(srv: &Srv) -> Who {
    let (id, oid, secret) = srv.roleless_app("stranger").await;
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
        .call(PUT_GROUP, format!("{}?{RES}", group(srv, rg)))
        .bearer(&who.token)
        .json(&json!({"location": "local"}));
    srv.expect(c, 201).await;
}

/// `/subscriptions/…/resourceGroups/rg1/providers/Microsoft.ContainerService/managedClusters/{name}`.
fn cluster_id(srv: &Srv, name: &str) -> String {
    format!(
        "{}/providers/Microsoft.ContainerService/managedClusters/{name}",
        group(srv, "rg1")
    )
}

fn cluster_body(properties: Value) -> Value {
    let mut props = json!({"dnsPrefix": "c", "agentPoolProfiles": [{"name": "np1", "count": 1, "mode": "System"}]});
    for (k, v) in properties.as_object().unwrap() {
        props[k] = v.clone();
    }
    json!({"location": "local", "identity": {"type": "SystemAssigned"}, "properties": props})
}

async fn put_cluster(srv: &Srv, who: &Who, name: &str, body: &Value) -> harness::Resp {
    srv.send(
        srv.call(PUT_CLUSTER, format!("{}?{AKS}", cluster_id(srv, name)))
            .bearer(&who.token)
            .json(body),
    )
    .await
}

async fn get_cluster(srv: &Srv, who: &Who, name: &str) -> Value {
    srv.expect(
        srv.call(GET_CLUSTER, format!("{}?{AKS}", cluster_id(srv, name)))
            .bearer(&who.token),
        200,
    )
    .await
}

/// A cluster `name` in rg1 with its OIDC issuer enabled: (its GET body, its issuer URL).
async fn cluster_with_issuer(srv: &Srv, who: &Who, name: &str) -> (Value, String) {
    let body = cluster_body(json!({"oidcIssuerProfile": {"enabled": true}}));
    let r = put_cluster(srv, who, name, &body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let url = s(&r.body["properties"]["oidcIssuerProfile"]["issuerURL"]);
    (r.body, url)
}

/// The issuer id of an issuer URL (`{base}/oidc/{id}/`).
fn issuer_id(srv: &Srv, url: &str) -> String {
    url.strip_prefix(&format!("{}/oidc/", srv.base))
        .and_then(|r| r.strip_suffix('/'))
        .unwrap_or_else(|| panic!("{url} is no issuer URL of {}", srv.base))
        .to_string()
}

async fn publish(srv: &Srv, token: &str, cluster: &str, body: &Value) -> harness::Resp {
    srv.send(
        srv.call(
            PUBLISH,
            format!(
                "{}/publishServiceAccountKeys?{AKS}",
                cluster_id(srv, cluster)
            ),
        )
        .bearer(token)
        .json(body),
    )
    .await
}

async fn webhook_cert(srv: &Srv, token: &str, cluster: &str, body: &Value) -> harness::Resp {
    srv.send(
        srv.call(
            WEBHOOK_CERT,
            format!("{}/issueWebhookCertificate?{AKS}", cluster_id(srv, cluster)),
        )
        .bearer(token)
        .json(body),
    )
    .await
}

async fn discovery(srv: &Srv, id: &str) -> harness::Resp {
    srv.send(srv.call(
        DISCOVERY,
        format!("/oidc/{id}/.well-known/openid-configuration"),
    ))
    .await
}

async fn jwks(srv: &Srv, id: &str) -> harness::Resp {
    srv.send(srv.call(JWKS, format!("/oidc/{id}/openid/v1/jwks")))
        .await
}

/// An RS256 key as the API server's signing key: the key and its public JWK as
/// `/openid/v1/jwks` shows it.
fn sa_key(now: u64) -> (keyless_pki::SigningKey, Value) {
    let (ca, _) = keyless_pki::Ca::generate("test", now).unwrap();
    let (key, _) = keyless_pki::SigningKey::generate(&ca, now, 86_400).unwrap();
    let j = key.jwk();
    let jwk = json!({"use": "sig", "kty": "RSA", "kid": j.kid, "alg": "RS256", "n": j.n, "e": j.e});
    (key, jwk)
}

/// A service-account token signed by `key` (its `kid` in the header).
fn sa_token(key: &keyless_pki::SigningKey, iss: &str, sub: &str, aud: &str, now: u64) -> String {
    let header = json!({"alg": "RS256", "kid": key.kid(), "typ": "JWT"});
    let claims = json!({"iss": iss, "sub": sub, "aud": [aud], "iat": now, "nbf": now,
                        "exp": now + 3600,
                        "kubernetes.io": {"namespace": "app", "serviceaccount": {"name": "web"}}});
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = key.sign(input.as_bytes()).unwrap();
    format!("{input}.{}", b64url(&sig))
}

/// The add-on's service account, as its proof's `sub`.
const ADDON_SA: &str = "system:serviceaccount:kube-system:keyless-pod-identity-addon";

/// A compact JWT of `claims` signed by `key` (RS256, its `kid` in the header).
fn signed(key: &keyless_pki::SigningKey, claims: &Value) -> String {
    let header = json!({"alg": "RS256", "kid": key.kid(), "typ": "JWT"});
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = key.sign(input.as_bytes()).unwrap();
    format!("{input}.{}", b64url(&sig))
}

/// The claims of a publish proof as the API server mints them (TokenRequest) for `sub`:
/// issuer the cluster's, audience `{issuerURL}publishServiceAccountKeys`, an hour.
fn proof_claims(url: &str, sub: &str, now: u64) -> Value {
    json!({"iss": url, "sub": sub, "aud": [format!("{url}publishServiceAccountKeys")],
           "iat": now, "nbf": now, "exp": now + 3600,
           "kubernetes.io": {"namespace": "kube-system",
                             "serviceaccount": {"name": "keyless-pod-identity-addon"}}})
}

/// Exchange `assertion` for a token of the identity `client_id` at the v2 endpoint.
async fn exchange(srv: &Srv, client_id: &str, assertion: &str) -> harness::Resp {
    srv.send(
        srv.call(TOKEN, format!("/{}/oauth2/v2.0/token", srv.tenant))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", assertion),
                ("scope", "https://management.azure.com/.default"),
            ]),
    )
    .await
}

/// Join a node to pool np1 of `cluster` and get an ARM token of the cluster's kubelet identity
/// through the host API (as the add-on on a node gets it from IMDS).
async fn kubelet_token(srv: &Srv, adm: &Who, cluster: &str, kubelet_client_id: &str) -> String {
    let jt = srv
        .expect(
            srv.call(
                JOIN_TOKEN,
                format!(
                    "{}/agentPools/np1/generateJoinToken?{AKS}",
                    cluster_id(srv, cluster)
                ),
            )
            .bearer(&adm.token),
            200,
        )
        .await;
    let (csr, _key) = keyless_pki::generate_csr("keyless-node").unwrap();
    let v = srv
        .expect(
            srv.call("HOST POST /keyless/host/v1/join", "/keyless/host/v1/join")
                .json(&json!({"joinToken": jt["joinToken"], "csr": csr})),
            200,
        )
        .await;
    let cert = keyless_pki::pem_blocks(&s(&v["certificate"]), "CERTIFICATE");
    let fp = keyless_pki::sha256_hex(&cert[0]);
    let v = srv
        .expect(
            srv.call("HOST POST /keyless/host/v1/token", "/keyless/host/v1/token")
                .peer(Some(&fp))
                .json(&json!({"resource": "https://management.azure.com/",
                    "selector": {"kind": "client_id", "value": kubelet_client_id}})),
            200,
        )
        .await;
    s(&v["access_token"])
}

// ------------------------------------------------------------------ C1 + C2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issuer_is_enabled_on_the_cluster_and_serves_what_the_add_on_publishes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let other = stranger(&srv).await;
    put_group(&srv, &adm, "rg1").await;

    // a cluster without the issuer: GET says so, workload identity alone is refused, and
    // there is nothing to publish to
    let r = put_cluster(&srv, &adm, "c1", &cluster_body(json!({}))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        r.body["properties"]["oidcIssuerProfile"],
        json!({"enabled": false})
    );
    let (sk, jwk) = sa_key(srv.s.now());
    let r = publish(&srv, &adm.token, "c1", &json!({"keys": [jwk.clone()]})).await;
    arm_error(&r, 400, "OIDCIssuerNotEnabled");
    let mut c = get_cluster(&srv, &adm, "c1").await;
    c["properties"]["securityProfile"] = json!({"workloadIdentity": {"enabled": true}});
    let r = put_cluster(&srv, &adm, "c1", &c).await;
    arm_error(&r, 400, "BadRequest");
    assert!(
        s(&r.body["error"]["message"]).contains("requires enabling OIDC issuer"),
        "{}",
        r.text
    );

    // az aks update --enable-oidc-issuer --enable-workload-identity: GET, modify, PUT; the
    // issuer id is the server's (a caller's is not read)
    c["properties"]["oidcIssuerProfile"] = json!({"enabled": true, "issuerId": "mine"});
    let r = put_cluster(&srv, &adm, "c1", &c).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let url = s(&r.body["properties"]["oidcIssuerProfile"]["issuerURL"]);
    let id = issuer_id(&srv, &url);
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{url}");
    assert_eq!(
        r.body["properties"]["oidcIssuerProfile"],
        json!({"enabled": true, "issuerURL": url})
    );
    assert_eq!(
        r.body["properties"]["securityProfile"]["workloadIdentity"],
        json!({"enabled": true})
    );
    // kept for the cluster's life: another write (the GET body sent back) keeps it, one that
    // names neither profile keeps both
    let c = get_cluster(&srv, &adm, "c1").await;
    assert_eq!(
        c["properties"]["oidcIssuerProfile"]["issuerURL"],
        url.as_str()
    );
    let r = put_cluster(&srv, &adm, "c1", &c).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = put_cluster(&srv, &adm, "c1", &cluster_body(json!({}))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["properties"]["oidcIssuerProfile"]["issuerURL"],
        url.as_str()
    );
    assert_eq!(
        r.body["properties"]["securityProfile"]["workloadIdentity"]["enabled"],
        true
    );
    // and it cannot be disabled
    let mut off = c.clone();
    off["properties"]["oidcIssuerProfile"] = json!({"enabled": false});
    let r = put_cluster(&srv, &adm, "c1", &off).await;
    arm_error(&r, 400, "BadRequest");
    assert!(
        s(&r.body["error"]["message"]).contains("cannot be disabled"),
        "{}",
        r.text
    );
    let c = get_cluster(&srv, &adm, "c1").await;
    assert_eq!(
        c["properties"]["oidcIssuerProfile"]["issuerURL"],
        url.as_str()
    );

    // served, unauthenticated, before any publish: discovery, and an empty key set
    let r = discovery(&srv, &id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"issuer": url, "jwks_uri": format!("{url}openid/v1/jwks"),
               "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
               "id_token_signing_alg_values_supported": ["RS256"]})
    );
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"));
    let r = jwks(&srv, &id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!({"keys": []}));
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"));
    // an unknown issuer is 404 in ARM's shape
    for unknown in [uuid::Uuid::new_v4().to_string(), "x".into()] {
        arm_error(&discovery(&srv, &unknown).await, 404, "InvalidResourceId");
        arm_error(&jwks(&srv, &unknown).await, 404, "InvalidResourceId");
    }

    // publish refusals: a stranger (the cluster is not told of), a private key, too many keys,
    // a body too large
    let r = publish(&srv, &other.token, "c1", &json!({"keys": [jwk.clone()]})).await;
    arm_forbidden(&r, &other.oid);
    let mut private = jwk.clone();
    private["d"] = json!("AQAB");
    let r = publish(&srv, &adm.token, "c1", &json!({"keys": [private]})).await;
    arm_error(&r, 400, "InvalidParameter");
    assert_eq!(r.body["error"]["target"], "keys[0]", "{}", r.text);
    assert!(
        s(&r.body["error"]["message"]).contains(&format!("'{}'", sk.kid())),
        "{}",
        r.text
    );
    let many: Vec<Value> = (0..101)
        .map(|i| {
            let mut k = jwk.clone();
            k["kid"] = json!(format!("k{i}"));
            k
        })
        .collect();
    let r = publish(&srv, &adm.token, "c1", &json!({ "keys": many })).await;
    arm_error(&r, 400, "InvalidParameter");
    let r = publish(
        &srv,
        &adm.token,
        "c1",
        &json!({"keys": [], "pad": "x".repeat(70_000)}),
    )
    .await;
    arm_error(&r, 413, "RequestEntityTooLarge");
    let r = publish(&srv, &adm.token, "c1", &json!({"keys": "none"})).await;
    arm_error(&r, 400, "InvalidParameter");
    assert_eq!(jwks(&srv, &id).await.body, json!({"keys": []}));

    // a publish: served at once; the same set again changes nothing
    let set = json!({"keys": [jwk.clone()]});
    let r = publish(&srv, &adm.token, "c1", &set).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"issuerURL": url, "keys": 1, "changed": true})
    );
    assert_eq!(jwks(&srv, &id).await.body, set);
    let r = publish(&srv, &adm.token, "c1", &set).await;
    assert_eq!(
        r.body,
        json!({"issuerURL": url, "keys": 1, "changed": false})
    );

    // the kubelet identity (the add-on on a node) may publish without any role, with a proof
    // of the API server (a token signed by a published key)
    let kubelet = c["properties"]["identityProfile"]["kubeletidentity"].clone();
    let kt = kubelet_token(&srv, &adm, "c1", &s(&kubelet["clientId"])).await;
    assert_eq!(claims(&kt)["oid"], kubelet["objectId"]);
    let (_, jwk2) = sa_key(srv.s.now());
    let set2 = json!({"keys": [jwk.clone(), jwk2]});
    let mut with_proof = set2.clone();
    with_proof["proof"] = json!(signed(&sk, &proof_claims(&url, ADDON_SA, srv.s.now())));
    let r = publish(&srv, &kt, "c1", &with_proof).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"issuerURL": url, "keys": 2, "changed": true})
    );
    assert_eq!(jwks(&srv, &id).await.body, set2);
    // … but not to another cluster
    cluster_with_issuer(&srv, &adm, "c2").await;
    let r = publish(&srv, &kt, "c2", &set2).await;
    arm_forbidden(&r, &s(&kubelet["objectId"]));

    // the issuer and its keys go with the cluster; a new cluster of the same name has an
    // issuer of its own
    srv.expect(
        srv.call(DELETE_CLUSTER, format!("{}?{AKS}", cluster_id(&srv, "c1")))
            .bearer(&adm.token),
        204,
    )
    .await;
    arm_error(&discovery(&srv, &id).await, 404, "InvalidResourceId");
    arm_error(&jwks(&srv, &id).await, 404, "InvalidResourceId");
    let (_, url2) = cluster_with_issuer(&srv, &adm, "c1").await;
    assert_ne!(url2, url);
    let id2 = issuer_id(&srv, &url2);
    assert_eq!(jwks(&srv, &id2).await.body, json!({"keys": []}));
    arm_error(&jwks(&srv, &id).await, 404, "InvalidResourceId");
}

// ------------------------------------------------------------------ C3

fn verifier(ca_bundle: &str) -> Arc<rustls::client::WebPkiServerVerifier> {
    keyless_pki::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for der in keyless_pki::pem_blocks(ca_bundle, "CERTIFICATE") {
        roots.add(CertificateDer::from(der)).unwrap();
    }
    rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
        .build()
        .unwrap()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_gets_its_serving_certificate_from_the_clusters_own_ca() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let other = stranger(&srv).await;
    put_group(&srv, &adm, "rg1").await;
    let (c, _) = cluster_with_issuer(&srv, &adm, "c1").await;
    let svc = "azure-wi-webhook-webhook-service.azure-workload-identity-system.svc";
    let sans = names(&[
        svc,
        "azure-wi-webhook-webhook-service.azure-workload-identity-system.svc.cluster.local",
        "10.0.0.7",
    ]);
    let (csr, _key) = keyless_pki::generate_server_csr(&sans).unwrap();

    // a stranger is refused before anything is made
    let r = webhook_cert(&srv, &other.token, "c1", &json!({"csr": csr})).await;
    arm_forbidden(&r, &other.oid);

    // the default validity (7 days): the CSR's names, serverAuth, a chain to the caBundle
    let r = webhook_cert(&srv, &adm.token, "c1", &json!({"csr": csr})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let leaf = keyless_pki::pem_blocks(&s(&r.body["certificate"]), "CERTIFICATE");
    assert_eq!(leaf.len(), 1, "{}", r.text);
    let bundle = s(&r.body["caBundle"]);
    let (nb, na) = keyless_pki::cert_validity(&leaf[0]).unwrap();
    assert_eq!(na - nb, 7 * 86_400 + 60);
    let now = srv.s.now();
    assert!(
        na >= now + 7 * 86_400 - 5 && na <= now + 7 * 86_400 + 5,
        "{na} vs {now}"
    );
    let iso = |t: u64| {
        let (d, s) = ((t / 86_400) as i64, t % 86_400);
        let (y, m, dd) = keyless_core::clock::civil_from_days(d);
        format!(
            "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}Z",
            s / 3600,
            (s / 60) % 60,
            s % 60
        )
    };
    assert_eq!(r.body["notBefore"], iso(nb).as_str());
    assert_eq!(r.body["notAfter"], iso(na).as_str());
    let v = verifier(&bundle);
    for name in [svc, "10.0.0.7"] {
        v.verify_server_cert(
            &CertificateDer::from(leaf[0].clone()),
            &[],
            &ServerName::try_from(name.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // a name it was not asked for does not verify, nor does the chain to another CA
    assert!(v
        .verify_server_cert(
            &CertificateDer::from(leaf[0].clone()),
            &[],
            &ServerName::try_from("other.svc".to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .is_err());
    let (foreign, _) = keyless_pki::Ca::generate("foreign", now).unwrap();
    assert!(verifier(&foreign.cert_pem())
        .verify_server_cert(
            &CertificateDer::from(leaf[0].clone()),
            &[],
            &ServerName::try_from(svc.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .is_err());

    // validity clamped to [60 s, 30 days]; the CA is kept (the same bundle)
    for (asked, got) in [(1i64, 60u64), (3600, 3600), (1_000_000_000, 30 * 86_400)] {
        let r = webhook_cert(
            &srv,
            &adm.token,
            "c1",
            &json!({"csr": csr, "validityInSeconds": asked}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let leaf = keyless_pki::pem_blocks(&s(&r.body["certificate"]), "CERTIFICATE");
        let (nb, na) = keyless_pki::cert_validity(&leaf[0]).unwrap();
        assert_eq!(na - nb, got + 60, "asked {asked}");
        assert_eq!(s(&r.body["caBundle"]), bundle);
    }

    // refusals: no CSR, garbage, no names, a wildcard, 21 names, a bad validity
    let (no_names, _) = keyless_pki::generate_csr("webhook").unwrap();
    let (wild, _) = keyless_pki::generate_server_csr(&names(&["*.svc"])).unwrap();
    let many: Vec<String> = (0..21).map(|i| format!("s{i}.svc")).collect();
    let (too_many, _) = keyless_pki::generate_server_csr(&many).unwrap();
    for body in [
        json!({}),
        json!({"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}),
        json!({"csr": no_names}),
        json!({"csr": wild}),
        json!({"csr": too_many}),
        json!({"csr": csr, "validityInSeconds": "60"}),
    ] {
        let r = webhook_cert(&srv, &adm.token, "c1", &body).await;
        arm_error(&r, 400, "InvalidParameter");
    }

    // the kubelet identity (the webhook on a node) may ask too; another cluster has its own CA
    let kubelet = c["properties"]["identityProfile"]["kubeletidentity"].clone();
    let kt = kubelet_token(&srv, &adm, "c1", &s(&kubelet["clientId"])).await;
    let r = webhook_cert(&srv, &kt, "c1", &json!({"csr": csr})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(s(&r.body["caBundle"]), bundle);
    cluster_with_issuer(&srv, &adm, "c2").await;
    let r = webhook_cert(&srv, &kt, "c2", &json!({"csr": csr})).await;
    arm_forbidden(&r, &s(&kubelet["objectId"]));
    let r = webhook_cert(&srv, &adm.token, "c2", &json!({"csr": csr})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_ne!(s(&r.body["caBundle"]), bundle);

    // the CA goes with the cluster: a new cluster of the same name has another
    srv.expect(
        srv.call(DELETE_CLUSTER, format!("{}?{AKS}", cluster_id(&srv, "c1")))
            .bearer(&adm.token),
        204,
    )
    .await;
    cluster_with_issuer(&srv, &adm, "c1").await;
    let r = webhook_cert(&srv, &adm.token, "c1", &json!({"csr": csr})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_ne!(s(&r.body["caBundle"]), bundle);
}

// ------------------------------------------------------------------ federation end to end

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_token_signed_by_a_published_key_exchanges() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    put_group(&srv, &adm, "rg1").await;
    let (_, url) = cluster_with_issuer(&srv, &adm, "c1").await;

    // a user-assigned identity trusting the cluster's issuer for app/web
    let ident_id = format!(
        "{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/web",
        group(&srv, "rg1")
    );
    let ident = srv
        .expect(
            srv.call(PUT_IDENTITY, format!("{ident_id}?{MSI}"))
                .bearer(&adm.token)
                .json(&json!({"location": "local"})),
            201,
        )
        .await;
    let client_id = s(&ident["properties"]["clientId"]);
    srv.expect(
        srv.call(
            PUT_FIC,
            format!("{ident_id}/federatedIdentityCredentials/aks-web?{MSI}"),
        )
        .bearer(&adm.token)
        .json(&json!({"properties": {"issuer": url, "subject": SUBJECT,
                                     "audiences": [EXCHANGE_AUDIENCE]}})),
        201,
    )
    .await;

    let now = srv.s.now();
    let (k1, jwk1) = sa_key(now);
    // before any publish the issuer has no keys: refused as an issuer whose keys cannot be read
    let t1 = sa_token(&k1, &url, SUBJECT, EXCHANGE_AUDIENCE, now);
    let r = exchange(&srv, &client_id, &t1).await;
    sts_error(&r, 400, "invalid_request", 50166);

    let r = publish(&srv, &adm.token, "c1", &json!({"keys": [jwk1]})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = exchange(&srv, &client_id, &t1).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let c = claims(&s(&r.body["access_token"]));
    assert_eq!(c["oid"], ident["properties"]["principalId"]);
    assert_eq!(c["aud"], "https://management.azure.com");

    // a token signed by a key that is not published: refused on its signature, whether it
    // names an unknown kid or the published one
    let (k_other, _) = sa_key(now);
    let r = exchange(
        &srv,
        &client_id,
        &sa_token(&k_other, &url, SUBJECT, EXCHANGE_AUDIENCE, now),
    )
    .await;
    sts_error(&r, 401, "invalid_client", 700027);
    let forged = {
        let t = sa_token(&k_other, &url, SUBJECT, EXCHANGE_AUDIENCE, now);
        let parts: Vec<&str> = t.split('.').collect();
        let header = b64url(
            json!({"alg": "RS256", "kid": k1.kid(), "typ": "JWT"})
                .to_string()
                .as_bytes(),
        );
        let input = format!("{header}.{}", parts[1]);
        format!(
            "{input}.{}",
            b64url(&k_other.sign(input.as_bytes()).unwrap())
        )
    };
    let r = exchange(&srv, &client_id, &forged).await;
    sts_error(&r, 401, "invalid_client", 700027);
    // another subject and another audience are the credential's refusals
    let r = exchange(
        &srv,
        &client_id,
        &sa_token(
            &k1,
            &url,
            "system:serviceaccount:app:other",
            EXCHANGE_AUDIENCE,
            now,
        ),
    )
    .await;
    sts_error(&r, 401, "invalid_client", 700213);
    let r = exchange(
        &srv,
        &client_id,
        &sa_token(&k1, &url, SUBJECT, "api://other", now),
    )
    .await;
    sts_error(&r, 401, "invalid_client", 700212);
    // an issuer URL of this server that no cluster has: never fetched over HTTP, refused
    let ghost = format!("{}/oidc/{}/", srv.base, uuid::Uuid::new_v4());
    srv.expect(
        srv.call(
            PUT_FIC,
            format!("{ident_id}/federatedIdentityCredentials/ghost?{MSI}"),
        )
        .bearer(&adm.token)
        .json(&json!({"properties": {"issuer": ghost, "subject": SUBJECT,
                                     "audiences": [EXCHANGE_AUDIENCE]}})),
        201,
    )
    .await;
    let r = exchange(
        &srv,
        &client_id,
        &sa_token(&k1, &ghost, SUBJECT, EXCHANGE_AUDIENCE, now),
    )
    .await;
    sts_error(&r, 400, "invalid_request", 50166);

    // the API server's key rotated: the add-on publishes the new set, and a token of the new
    // key exchanges at once on this server (its cached keys of the issuer were forgotten)
    let (k2, jwk2) = sa_key(now);
    let r = publish(&srv, &adm.token, "c1", &json!({"keys": [jwk2]})).await;
    assert_eq!(r.body["changed"], true, "{}", r.text);
    let r = exchange(
        &srv,
        &client_id,
        &sa_token(&k2, &url, SUBJECT, EXCHANGE_AUDIENCE, now),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // and the retired key's tokens no longer do
    let r = exchange(&srv, &client_id, &t1).await;
    sts_error(&r, 401, "invalid_client", 700027);
}

// ------------------------------------------------------------------ what the issuer's keys say

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_discovery_document_names_the_algorithms_of_the_published_keys() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    put_group(&srv, &adm, "rg1").await;
    let (_, url) = cluster_with_issuer(&srv, &adm, "c1").await;
    let id = issuer_id(&srv, &url);
    let algs = |r: &harness::Resp| {
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["id_token_signing_alg_values_supported"].clone()
    };
    // nothing published: RS256 (the API server's default)
    assert_eq!(algs(&discovery(&srv, &id).await), json!(["RS256"]));
    let (_, rsa) = sa_key(srv.s.now());
    let ec = json!({"use": "sig", "kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256",
                    "x": "A".repeat(43), "y": format!("{}E", "A".repeat(42))});
    for (set, want) in [
        (json!([ec.clone()]), json!(["ES256"])),
        (json!([ec.clone(), rsa.clone()]), json!(["RS256", "ES256"])),
        (json!([rsa.clone()]), json!(["RS256"])),
    ] {
        let r = publish(&srv, &adm.token, "c1", &json!({ "keys": set })).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(algs(&discovery(&srv, &id).await), want, "{set}");
    }
}

/// A user-assigned identity `name` in rg1 trusting `issuer` for [`SUBJECT`]: its client id.
async fn federated_identity(srv: &Srv, adm: &Who, name: &str, issuer: &str) -> String {
    let ident_id = format!(
        "{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}",
        group(srv, "rg1")
    );
    let ident = srv
        .expect(
            srv.call(PUT_IDENTITY, format!("{ident_id}?{MSI}"))
                .bearer(&adm.token)
                .json(&json!({"location": "local"})),
            201,
        )
        .await;
    srv.expect(
        srv.call(
            PUT_FIC,
            format!("{ident_id}/federatedIdentityCredentials/aks?{MSI}"),
        )
        .bearer(&adm.token)
        .json(&json!({"properties": {"issuer": issuer, "subject": SUBJECT,
                                     "audiences": [EXCHANGE_AUDIENCE]}})),
        201,
    )
    .await;
    s(&ident["properties"]["clientId"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_clusters_tokens_no_longer_exchange() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    put_group(&srv, &adm, "rg1").await;
    let (_, url) = cluster_with_issuer(&srv, &adm, "c1").await;
    let client_id = federated_identity(&srv, &adm, "web", &url).await;
    let now = srv.s.now();
    let (k1, jwk1) = sa_key(now);
    let r = publish(&srv, &adm.token, "c1", &json!({"keys": [jwk1]})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // exchanged: the issuer's keys are now in this server's federation cache
    let t1 = sa_token(&k1, &url, SUBJECT, EXCHANGE_AUDIENCE, now);
    for _ in 0..2 {
        let r = exchange(&srv, &client_id, &t1).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // the cluster is deleted: its issuer is no more, and the same token is refused at once as a
    // token of an issuer whose keys cannot be read (the credential still names the issuer)
    srv.expect(
        srv.call(DELETE_CLUSTER, format!("{}?{AKS}", cluster_id(&srv, "c1")))
            .bearer(&adm.token),
        204,
    )
    .await;
    let r = exchange(&srv, &client_id, &t1).await;
    sts_error(&r, 400, "invalid_request", 50166);
    assert!(
        s(&r.body["error_description"]).contains("not known or not enabled"),
        "{}",
        r.text
    );
}

/// A second server on the same database (another replica behind the same URL), driven in
/// process like the harness's.
struct Replica {
    run: keyless_server::RunningServer,
    _dir: tempfile::TempDir,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.run.task.abort();
        for t in &self.run.background {
            t.abort();
        }
    }
}

impl Replica {
    async fn start(srv: &Srv) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg =
            keyless_server::Config::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
        cfg.public_url = Some(srv.base.clone());
        cfg.vault_check_interval = std::time::Duration::from_secs(3600);
        let run = keyless_server::start(
            cfg,
            srv.s.store.clone(),
            Arc::new(keyless_core::clock::SystemClock::new()),
        )
        .await
        .unwrap();
        assert!(run.bootstrap.new_admin.is_none(), "the same tenant");
        assert_eq!(run.state.base_url, srv.base);
        Replica { run, _dir: dir }
    }

    async fn publish(&self, token: &str, cluster: &str, body: &Value) -> (u16, Value) {
        use tower::ServiceExt;
        let req = axum::http::Request::builder()
            .method("POST")
            .uri(format!("{cluster}/publishServiceAccountKeys?{AKS}"))
            .header("host", "localhost")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .body(axum::body::Body::from(serde_json::to_vec(body).unwrap()))
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
}

/// Exchange `assertion` on `srv` until it is refused (or 30 s have passed): the last answer.
async fn exchange_until_refused(srv: &Srv, client_id: &str, assertion: &str) -> harness::Resp {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = exchange(srv, client_id, assertion).await;
        if r.status != 200 || std::time::Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_removed_on_another_replica_stops_verifying_here() {
    let srv = Srv::start(ROUTES).await;
    let other = Replica::start(&srv).await;
    let adm = admin(&srv).await;
    put_group(&srv, &adm, "rg1").await;
    let (_, url) = cluster_with_issuer(&srv, &adm, "c1").await;
    let client_id = federated_identity(&srv, &adm, "web", &url).await;
    let now = srv.s.now();
    let (k1, jwk1) = sa_key(now);
    let (k2, jwk2) = sa_key(now);
    let r = publish(
        &srv,
        &adm.token,
        "c1",
        &json!({"keys": [jwk1, jwk2.clone()]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let t1 = sa_token(&k1, &url, SUBJECT, EXCHANGE_AUDIENCE, now);
    let t2 = sa_token(&k2, &url, SUBJECT, EXCHANGE_AUDIENCE, now);
    // both keys verify here (and are cached here)
    for t in [&t1, &t2] {
        let r = exchange(&srv, &client_id, t).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }

    // the add-on's publish lands on the other replica: k1 is gone from the set (rotated out,
    // or compromised). This server's cache is not told; a token of k1 — whose kid its cached
    // keys still hold — is refused here within a second, k2's still exchange
    let cluster = cluster_id(&srv, "c1");
    let (st, v) = other
        .publish(&adm.token, &cluster, &json!({"keys": [jwk2]}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["changed"], true, "{v}");
    let r = exchange_until_refused(&srv, &client_id, &t1).await;
    sts_error(&r, 401, "invalid_client", 700027);
    let r = exchange(&srv, &client_id, &t2).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // the cluster is deleted (through the other replica, or with its resource group): k2's
    // tokens are refused here too, as an issuer that is no more
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .method("DELETE")
        .uri(format!("{cluster}?{AKS}"))
        .header("host", "localhost")
        .header("authorization", format!("Bearer {}", adm.token))
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = keyless_server::app(other.run.state.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    let r = exchange_until_refused(&srv, &client_id, &t2).await;
    sts_error(&r, 400, "invalid_request", 50166);
}

// ------------------------------------------------------------------ P: proof of the API server

/// `{"keys": [..], "proof": <proof>}`.
fn with_proof(keys: &[&Value], proof: &str) -> Value {
    json!({"keys": keys, "proof": proof})
}

fn proof_rejected(r: &harness::Resp, says: &str) {
    arm_error(r, 403, "PublishProofRejected");
    assert_eq!(r.body["error"]["target"], "proof", "{}", r.text);
    let m = s(&r.body["error"]["message"]);
    assert!(m.contains(says), "{m} lacks {says}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_publish_proves_the_api_server_with_a_key_already_published() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    put_group(&srv, &adm, "rg1").await;
    let (c, url) = cluster_with_issuer(&srv, &adm, "c1").await;
    let id = issuer_id(&srv, &url);
    let kubelet = c["properties"]["identityProfile"]["kubeletidentity"].clone();
    let kt = kubelet_token(&srv, &adm, "c1", &s(&kubelet["clientId"])).await;
    let client_id = federated_identity(&srv, &adm, "web", &url).await;
    let now = srv.s.now();
    let (k1, jwk1) = sa_key(now);
    let (k2, jwk2) = sa_key(now);
    let (k_stranger, _) = sa_key(now);

    // no proof, or no JWT: 400 InvalidParameter on `proof`
    for body in [
        json!({"keys": [jwk1.clone()]}),
        json!({"keys": [jwk1.clone()], "proof": null}),
        json!({"keys": [jwk1.clone()], "proof": "not-a-jwt"}),
        json!({"keys": [jwk1.clone()], "proof": 7}),
    ] {
        let r = publish(&srv, &kt, "c1", &body).await;
        arm_error(&r, 400, "InvalidParameter");
        assert_eq!(r.body["error"]["target"], "proof", "{}", r.text);
    }

    // the first publish (nothing stored): a proof signed by a key of neither set, or naming
    // no service account, is refused
    let p = signed(&k_stranger, &proof_claims(&url, ADDON_SA, now));
    proof_rejected(
        &publish(&srv, &kt, "c1", &with_proof(&[&jwk1], &p)).await,
        "signature",
    );
    let p = signed(&k1, &proof_claims(&url, "system:node:n1", now));
    proof_rejected(
        &publish(&srv, &kt, "c1", &with_proof(&[&jwk1], &p)).await,
        "service account",
    );
    assert_eq!(jwks(&srv, &id).await.body, json!({"keys": []}));
    // … a self-consistent one is trusted on first use, and its subject is the publisher
    let p1 = signed(&k1, &proof_claims(&url, ADDON_SA, now));
    let r = publish(&srv, &kt, "c1", &with_proof(&[&jwk1], &p1)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"issuerURL": url, "keys": 1, "changed": true})
    );
    assert_eq!(jwks(&srv, &id).await.body, json!({"keys": [jwk1.clone()]}));
    // the same set again: nothing checked but the caller
    let r = publish(&srv, &kt, "c1", &json!({"keys": [jwk1.clone()]})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["changed"], false, "{}", r.text);

    // a rotation proven by the key being published only (anyone's key): refused
    let p = signed(&k2, &proof_claims(&url, ADDON_SA, now));
    proof_rejected(
        &publish(&srv, &kt, "c1", &with_proof(&[&jwk2], &p)).await,
        "never signs",
    );
    // a proof that names the stored key's kid but is signed by another
    let forged = {
        let t = signed(&k2, &proof_claims(&url, ADDON_SA, now));
        let parts: Vec<&str> = t.split('.').collect();
        let header = b64url(
            json!({"alg": "RS256", "kid": k1.kid(), "typ": "JWT"})
                .to_string()
                .as_bytes(),
        );
        let input = format!("{header}.{}", parts[1]);
        format!("{input}.{}", b64url(&k2.sign(input.as_bytes()).unwrap()))
    };
    proof_rejected(
        &publish(&srv, &kt, "c1", &with_proof(&[&jwk2], &forged)).await,
        "signature",
    );
    // signed by the stored key, but another subject, audience, issuer or time
    let mut wrong: Vec<(Value, &str)> = vec![];
    wrong.push((
        proof_claims(&url, "system:serviceaccount:kube-system:other", now),
        "publisher",
    ));
    let mut v = proof_claims(&url, ADDON_SA, now);
    v["aud"] = json!([EXCHANGE_AUDIENCE]);
    wrong.push((v, "audience"));
    let mut v = proof_claims(&url, ADDON_SA, now);
    v["aud"] = json!(["publishServiceAccountKeys"]);
    wrong.push((v, "audience"));
    let mut v = proof_claims(&url, ADDON_SA, now);
    v["iss"] = json!(url.trim_end_matches('/'));
    wrong.push((v, "issuer"));
    let mut v = proof_claims(&url, ADDON_SA, now - 7200);
    v["exp"] = json!(now - 3600);
    wrong.push((v, "expired"));
    let mut v = proof_claims(&url, ADDON_SA, now);
    v["nbf"] = json!(now + 3600);
    wrong.push((v, "nbf"));
    for (claims, says) in wrong {
        let p = signed(&k1, &claims);
        proof_rejected(
            &publish(&srv, &kt, "c1", &with_proof(&[&jwk2], &p)).await,
            says,
        );
    }
    assert_eq!(jwks(&srv, &id).await.body, json!({"keys": [jwk1.clone()]}));

    // the rotation proven by the stored key (the proof the add-on kept): served at once, and
    // the new key's tokens exchange, the old one's no longer
    let r = publish(&srv, &kt, "c1", &with_proof(&[&jwk2], &p1)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["changed"], true, "{}", r.text);
    assert_eq!(jwks(&srv, &id).await.body, json!({"keys": [jwk2.clone()]}));
    let r = exchange(
        &srv,
        &client_id,
        &sa_token(&k2, &url, SUBJECT, EXCHANGE_AUDIENCE, now),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = exchange(
        &srv,
        &client_id,
        &sa_token(&k1, &url, SUBJECT, EXCHANGE_AUDIENCE, now),
    )
    .await;
    sts_error(&r, 401, "invalid_client", 700027);
    // k1 is no longer stored: its proof proves nothing now
    let (_k3, jwk3) = sa_key(now);
    proof_rejected(
        &publish(&srv, &kt, "c1", &with_proof(&[&jwk3], &p1)).await,
        "signature",
    );

    // the admin (managedClusters/write through RBAC) publishes without a proof and keeps the
    // publisher: another subject is still refused, the recorded one is not
    let r = publish(
        &srv,
        &adm.token,
        "c1",
        &json!({"keys": [jwk1.clone(), jwk2.clone()]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["changed"], true, "{}", r.text);
    let other_sa = "system:serviceaccount:kube-system:new-addon";
    let p_other = signed(&k2, &proof_claims(&url, other_sa, now));
    proof_rejected(
        &publish(&srv, &kt, "c1", &with_proof(&[&jwk2], &p_other)).await,
        "publisher",
    );
    // the kubelet identity may not reset the publisher
    let mut body = with_proof(&[&jwk2], &p_other);
    body["resetPublisher"] = json!(true);
    arm_forbidden(
        &publish(&srv, &kt, "c1", &body).await,
        &s(&kubelet["objectId"]),
    );
    let r = publish(
        &srv,
        &adm.token,
        "c1",
        &json!({"keys": [jwk1.clone()], "resetPublisher": "yes"}),
    )
    .await;
    arm_error(&r, 400, "InvalidParameter");
    assert_eq!(r.body["error"]["target"], "resetPublisher", "{}", r.text);
    // the admin resets it (the set unchanged): the next kubelet publish is a first use again,
    // and its subject the new publisher
    let r = publish(
        &srv,
        &adm.token,
        "c1",
        &json!({"keys": [jwk1.clone(), jwk2.clone()], "resetPublisher": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["changed"], false, "{}", r.text);
    let (k4, jwk4) = sa_key(now);
    // keys are published: even a first use is proven by one of them, never by the new set alone
    let p4 = signed(&k4, &proof_claims(&url, other_sa, now));
    proof_rejected(
        &publish(&srv, &kt, "c1", &with_proof(&[&jwk4], &p4)).await,
        "signature",
    );
    let p2 = signed(&k2, &proof_claims(&url, other_sa, now));
    let r = publish(&srv, &kt, "c1", &with_proof(&[&jwk4], &p2)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["changed"], true, "{}", r.text);
    let p = signed(&k4, &proof_claims(&url, ADDON_SA, now));
    proof_rejected(
        &publish(&srv, &kt, "c1", &with_proof(&[&jwk3], &p)).await,
        "publisher",
    );
    let p = signed(&k4, &proof_claims(&url, other_sa, now));
    let r = publish(&srv, &kt, "c1", &with_proof(&[&jwk3], &p)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(jwks(&srv, &id).await.body, json!({"keys": [jwk3.clone()]}));
}
