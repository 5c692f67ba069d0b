//! Workload identity's add-on loops (contract C8) with real processes: a `keyless server`, a
//! node of the cluster's pool (its IMDS gives the add-on the kubelet identity's token), a real
//! kube-apiserver started with the cluster's Keyless issuer URL as `--service-account-issuer`,
//! and `keyless cluster-addon`:
//!
//! - the add-on publishes the API server's keys with the proof of the API server (a
//!   TokenRequest token of its own service account `kube-system/keyless-pod-identity-addon`,
//!   created here: there is no controller-manager): the JWKS Keyless serves at the issuer
//!   equals the API server's, and a TokenRequest token of the API server exchanges at Keyless;
//! - without its service account it cannot mint the proof and publishes nothing; an API server
//!   whose issuer is not the cluster's has its proof refused (`proof_rejected`) until an
//!   administrator publishes the keys, then the mismatch is reported;
//! - a pod with the readiness gate whose service account has no matching credential gets the
//!   condition False with the reason (`NoMatchingCredential`; `NoClientId` for a service
//!   account without the annotation); after the federated credential is created it turns True;
//!   a pod without the gate is never touched.

mod common;

use common::*;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, GetParams, PostParams};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const AKS_API: &str = "api-version=2026-08-01";
const MSI_API: &str = "api-version=2023-01-31";
const CONDITION: &str = "keyless.dev/workload-identity-ready";
const AUDIENCE: &str = "api://AzureADTokenExchange";

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

async fn call(
    c: &reqwest::Client,
    token: &str,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut r = c.request(method, url).bearer_auth(token);
    if let Some(b) = body {
        r = r.json(b);
    }
    let r = r.send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

/// Poll `f` until it returns Some (60 s at most); panics with `what` and the last value.
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => panic!("{what}: {last}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The pod's workload-identity condition: (status, reason, message).
async fn condition(pods: &Api<Pod>, name: &str) -> Option<(String, String, String)> {
    let p = pods.get(name).await.ok()?;
    let c = p
        .status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == CONDITION)?;
    Some((
        c.status,
        c.reason.unwrap_or_default(),
        c.message.unwrap_or_default(),
    ))
}

async fn raw(client: &kube::Client, dir: &str, name: &str) -> Value {
    let req = kube::core::Request::new(dir)
        .get(name, &GetParams::default())
        .unwrap();
    client.request::<Value>(req).await.unwrap()
}

fn obj<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// A Keyless server, a cluster `c1` in group `wi` (with the OIDC issuer when `oidc`) and a node
/// of its pool whose IMDS gives the add-on the kubelet identity.
struct Fixture {
    server: ServerProc,
    c: reqwest::Client,
    admin: String,
    rg: String,
    tenant: String,
    cluster_path: String,
    cluster: Value,
    node: Proc,
}

fn cluster_body(oidc: bool) -> Value {
    let mut props = json!({"agentPoolProfiles": [{"name": "np1", "count": 1}]});
    if oidc {
        props["oidcIssuerProfile"] = json!({"enabled": true});
        props["securityProfile"] = json!({"workloadIdentity": {"enabled": true}});
    }
    json!({"location": "local", "identity": {"type": "SystemAssigned"}, "properties": props})
}

async fn put_cluster(c: &reqwest::Client, admin: &str, url: &str, path: &str, oidc: bool) -> Value {
    let (st, cluster) = call(
        c,
        admin,
        reqwest::Method::PUT,
        &format!("{url}{path}?{AKS_API}"),
        Some(&cluster_body(oidc)),
    )
    .await;
    assert!(st == 200 || st == 201, "{st} {cluster}");
    cluster
}

impl Fixture {
    async fn start(dir: &std::path::Path, oidc: bool) -> Fixture {
        let server = ServerProc::start(dir, &[]);
        let (c, admin) = server.admin().await;
        let group = server.cli(&["group", "create", "-n", "wi"]);
        let rg = s(&group["id"]);
        let tenant = server.proc.find("Tenant:").unwrap();
        let cluster_path = format!("{rg}/providers/Microsoft.ContainerService/managedClusters/c1");
        let cluster = put_cluster(&c, &admin, &server.url, &cluster_path, oidc).await;
        let join = server.cli(&[
            "aks",
            "nodepool",
            "join-token",
            "-g",
            "wi",
            "--cluster-name",
            "c1",
            "-n",
            "np1",
        ]);
        let state = dir.join("node");
        let node = spawn_until(
            &server.node_args(&state.to_string_lossy(), join["joinToken"].as_str()),
            "IMDS endpoint:",
            dir,
        )
        .expect("the node joins");
        Fixture {
            server,
            c,
            admin,
            rg,
            tenant,
            cluster_path,
            cluster,
            node,
        }
    }

    async fn put_cluster(&mut self, oidc: bool) {
        self.cluster = put_cluster(
            &self.c,
            &self.admin,
            &self.server.url,
            &self.cluster_path,
            oidc,
        )
        .await;
    }

    fn issuer(&self) -> String {
        s(&self.cluster["properties"]["oidcIssuerProfile"]["issuerURL"])
    }

    /// `keyless cluster-addon` as the kubelet identity, passes every second.
    fn start_addon(&self, kubeconfig: &std::path::Path, dir: &std::path::Path) -> Proc {
        let imds = self.node.find("IMDS endpoint:").unwrap();
        spawn_until(
            &[
                "cluster-addon",
                "--cluster-id",
                &s(&self.cluster["id"]),
                "--server",
                &self.server.url,
                "--ca-file",
                &self.server.ca,
                "--imds-endpoint",
                &format!("{imds}/metadata/identity/oauth2/token"),
                "--client-id",
                &s(&self.cluster["properties"]["identityProfile"]["kubeletidentity"]["clientId"]),
                "--kubeconfig",
                &kubeconfig.to_string_lossy(),
                "--holder",
                "addon-test",
                "--jwks-sync-interval",
                "1",
                "--readiness-poll",
                "1",
            ],
            "workload identity: caches listed",
            dir,
        )
        .expect("the add-on starts")
    }
}

/// The add-on's ops address.
fn ops_of(addon: &Proc) -> String {
    let ops = addon.find("Ops endpoint: http://").unwrap();
    ops.split_whitespace().next().unwrap().to_string()
}

async fn metrics_of(ops: &str) -> String {
    http()
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn has_metric(metrics: &str, name: &str, label: &str) -> bool {
    metrics
        .lines()
        .any(|l| l.starts_with(name) && l.contains(label))
}

/// The add-on's `workload identity` readiness check: (ok, message).
async fn wi_check(ops: &str) -> (bool, String) {
    let report: Value = http()
        .get(format!("http://{ops}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let c = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "workload identity")
        .unwrap_or_else(|| panic!("no workload identity check: {report}"))
        .clone();
    (c["ok"] == true, s(&c["message"]))
}

/// The add-on's own service account (what the publish proof is minted for).
const ADDON_SA: &str = "keyless-pod-identity-addon";

async fn addon_service_account(client: &kube::Client) {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "kube-system");
    sas.create(
        &PostParams::default(),
        &obj(json!({"metadata": {"name": ADDON_SA}})),
    )
    .await
    .unwrap();
}

/// Namespace `app`, service accounts (name, client id), and pods (name, service account, gated).
async fn workload(
    client: &kube::Client,
    sas_: &[(&str, Option<&str>)],
    pods_: &[(&str, &str, bool)],
) {
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &obj(json!({"metadata": {"name": "app"}})),
    )
    .await
    .unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "app");
    for (name, cid) in sas_ {
        let mut sa = json!({"metadata": {"name": name}});
        if let Some(cid) = cid {
            sa["metadata"]["annotations"] = json!({"azure.workload.identity/client-id": cid});
        }
        sas.create(&PostParams::default(), &obj(sa)).await.unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    for (name, sa, gated) in pods_ {
        let mut spec = json!({"nodeName": "node-a", "serviceAccountName": sa,
            "containers": [{"name": "c", "image": "busybox"}]});
        if *gated {
            spec["readinessGates"] = json!([{"conditionType": CONDITION}]);
        }
        pods.create(
            &PostParams::default(),
            &obj::<Pod>(json!({"metadata": {"name": name}, "spec": spec})),
        )
        .await
        .unwrap();
    }
}

/// Wait until the pod's condition has `reason`; the condition.
async fn wait_reason(pods: &Api<Pod>, pod: &str, reason: &str) -> (String, String, String) {
    wait_for(&format!("{pod}: {reason}"), || async {
        match condition(pods, pod).await {
            Some(c) if c.1 == reason => Ok(c),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_the_api_server_keys_and_sets_the_readiness_gate() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::start(dir.path(), true).await;
    let (server, c, admin, rg, tenant) = (&f.server, &f.c, &f.admin, &f.rg, &f.tenant);
    let cli = |args: &[&str]| server.cli(args);
    let issuer = f.issuer();
    assert!(issuer.ends_with('/'), "{}", f.cluster);

    // the API server, its service-account issuer the cluster's issuer URL
    let Some(cp) = keyless_k8s::testing::ControlPlane::start(
        &dir.path().join("k8s"),
        &format!("--service-account-issuer={issuer}"),
    ) else {
        return;
    };
    let client = cp.client().await;
    assert_eq!(
        raw(&client, "/.well-known", "openid-configuration").await["issuer"],
        issuer.as_str()
    );

    // the workload: an identity, service accounts, gated pods
    let app = cli(&["identity", "create", "-g", "wi", "-n", "app-id"]);
    let app_cid = s(&app["properties"]["clientId"]);
    let app_oid = s(&app["properties"]["principalId"]);
    assert!(!app_cid.is_empty(), "{app}");
    workload(
        &client,
        &[("web", Some(&app_cid)), ("plain", None)],
        &[
            ("web-1", "web", true),
            ("plain-1", "plain", true),
            ("ungated", "web", false),
        ],
    )
    .await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "app");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");

    // without its service account the add-on cannot mint the proof: nothing is published
    let addon = f.start_addon(&cp.kubeconfig(), dir.path());
    let ops = ops_of(&addon);
    let msg = wait_for("the proof cannot be minted", || async {
        match wi_check(&ops).await {
            (false, m) if m.contains("publish proof") => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(msg.contains(&format!("kube-system/{ADDON_SA}")), "{msg}");
    let (st, v) = call(
        c,
        admin,
        reqwest::Method::GET,
        &format!("{issuer}openid/v1/jwks"),
        None,
    )
    .await;
    assert_eq!((st, v), (200, json!({"keys": []})), "nothing published yet");
    drop(addon);

    addon_service_account(&client).await;
    let addon = f.start_addon(&cp.kubeconfig(), dir.path());
    let ops = ops_of(&addon);

    // the keys Keyless serves at the issuer are the API server's
    let api_keys = raw(&client, "/openid/v1", "jwks").await["keys"].clone();
    assert!(api_keys.as_array().is_some_and(|k| !k.is_empty()));
    let jwks_url = format!("{issuer}openid/v1/jwks");
    wait_for("Keyless serves the API server's keys", || async {
        let r = c.get(&jwks_url).send().await.map_err(|e| e.to_string())?;
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        if v["keys"] == api_keys {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await;
    let discovery: Value = c
        .get(format!("{issuer}.well-known/openid-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], issuer.as_str());
    assert_eq!(discovery["jwks_uri"], jwks_url.as_str());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let lease = leases.get("keyless-workload-identity").await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("addon-test")
    );

    // no credential yet: False with the reason; no client id: False; no gate: untouched
    let (st, reason, msg) = wait_for("web-1 not ready", || async {
        match condition(&pods, "web-1").await {
            Some(c) if c.1 == "NoMatchingCredential" => Ok(c),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(st, "False");
    assert_eq!(reason, "NoMatchingCredential");
    assert!(!msg.is_empty());
    let (st, reason, _) = wait_for("plain-1 not ready", || async {
        condition(&pods, "plain-1")
            .await
            .ok_or_else(|| "no condition".to_string())
    })
    .await;
    assert_eq!((st.as_str(), reason.as_str()), ("False", "NoClientId"));
    assert_eq!(condition(&pods, "ungated").await, None);

    // the pod's token (TokenRequest, as the kubelet mints the projected one) does not
    // exchange yet ...
    let tr: TokenRequest = sas
        .create_token_request(
            "web",
            &PostParams::default(),
            &obj(json!({"spec": {"audiences": [AUDIENCE], "expirationSeconds": 3600}})),
        )
        .await
        .unwrap();
    let sa_token = tr.status.unwrap().token.expect("a token");
    let exchange = || {
        c.post(format!("{}/{tenant}/oauth2/v2.0/token", server.url))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", app_cid.as_str()),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", sa_token.as_str()),
                ("scope", "https://vault.azure.net/.default"),
            ])
            .send()
    };
    let r = exchange().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let refused: Value = r.json().await.unwrap();
    assert_eq!(refused["error_codes"], json!([700211]), "{refused}");

    // ... the federated credential: the gate turns True and the token exchanges
    let (st, v) = call(
        c,
        admin,
        reqwest::Method::PUT,
        &format!(
            "{}{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app-id/federatedIdentityCredentials/web?{MSI_API}",
            server.url
        ),
        Some(&json!({"properties": {"issuer": issuer, "subject": "system:serviceaccount:app:web", "audiences": [AUDIENCE]}})),
    )
    .await;
    assert!(st == 200 || st == 201, "{st} {v}");
    let (st, reason, _) = wait_for("web-1 ready", || async {
        match condition(&pods, "web-1").await {
            Some(c) if c.0 == "True" => Ok(c),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!((st.as_str(), reason.as_str()), ("True", "Ready"));
    let r = exchange().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let t: Value = r.json().await.unwrap();
    assert_eq!(
        claims(t["access_token"].as_str().unwrap())["oid"],
        app_oid.as_str()
    );
    // still no client id on the other service account, still untouched without the gate
    assert_eq!(
        condition(&pods, "plain-1").await.map(|c| c.1),
        Some("NoClientId".to_string())
    );
    assert_eq!(condition(&pods, "ungated").await, None);

    // the ops listener: counted, and ready
    let metrics = metrics_of(&ops).await;
    for (name, label) in [
        ("keyless_wi_jwks_publishes_total", "result=\"changed\""),
        ("keyless_wi_readiness_checks_total", "result=\"ready\""),
        (
            "keyless_wi_readiness_checks_total",
            "result=\"no_matching_credential\"",
        ),
        (
            "keyless_wi_readiness_checks_total",
            "result=\"no_client_id\"",
        ),
        ("keyless_wi_leader", " 1"),
        ("keyless_wi_issuer_mismatch", " 0"),
    ] {
        assert!(
            has_metric(&metrics, name, label),
            "{name} {label}:\n{metrics}"
        );
    }
    assert!(
        !has_metric(
            &metrics,
            "keyless_wi_jwks_publishes_total",
            "result=\"proof_rejected\""
        ),
        "{metrics}"
    );
    let (ok, msg) = wi_check(&ops).await;
    assert!(ok, "{msg}");
    drop(addon);
}

/// While the cluster's issuer is off the add-on publishes nothing and pods say so; once it is
/// enabled the keys are published, and an API server whose issuer is not the cluster's (the
/// control plane's default, itself) is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idles_while_the_issuer_is_off_and_reports_a_foreign_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fixture::start(dir.path(), false).await;
    assert!(f.issuer().is_empty(), "{}", f.cluster);
    let Some(cp) = keyless_k8s::testing::ControlPlane::start(&dir.path().join("k8s"), "") else {
        return;
    };
    let client = cp.client().await;
    let api_issuer = s(&raw(&client, "/.well-known", "openid-configuration").await["issuer"]);
    let app = f
        .server
        .cli(&["identity", "create", "-g", "wi", "-n", "app-id"]);
    let app_cid = s(&app["properties"]["clientId"]);
    workload(
        &client,
        &[
            ("web", Some(&app_cid)),
            ("ghost", Some("00000000-0000-0000-0000-00000000dead")),
        ],
        &[("web-1", "web", true), ("ghost-1", "ghost", true)],
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    addon_service_account(&client).await;
    let addon = f.start_addon(&cp.kubeconfig(), dir.path());
    let ops = ops_of(&addon);

    let (st, _, msg) = wait_reason(&pods, "web-1", "IssuerNotEnabled").await;
    assert_eq!(st, "False");
    assert!(msg.contains("not enabled"), "{msg}");
    wait_for("the JWKS loop idles", || async {
        let m = metrics_of(&ops).await;
        if has_metric(
            &m,
            "keyless_wi_jwks_publishes_total",
            "result=\"not_enabled\"",
        ) {
            Ok(())
        } else {
            Err(m)
        }
    })
    .await;
    let (ok, msg) = wi_check(&ops).await;
    assert!(ok, "idle is not a failure: {msg}");

    // the issuer enabled: the API server's proof names its own issuer, not the cluster's, and
    // is refused; nothing is published
    f.put_cluster(true).await;
    let issuer = f.issuer();
    assert!(!issuer.is_empty(), "{}", f.cluster);
    let msg = wait_for("the proof is refused", || async {
        match wi_check(&ops).await {
            (false, m) if m.contains("PublishProofRejected") || m.contains("proof is rejected") => {
                Ok(m)
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(msg.contains(&api_issuer) && msg.contains(&issuer), "{msg}");
    assert!(has_metric(
        &metrics_of(&ops).await,
        "keyless_wi_jwks_publishes_total",
        "result=\"proof_rejected\""
    ));
    let jwks_url = format!("{issuer}openid/v1/jwks");
    let (st, v) = call(&f.c, &f.admin, reqwest::Method::GET, &jwks_url, None).await;
    assert_eq!((st, v), (200, json!({"keys": []})), "nothing published");
    wait_reason(&pods, "web-1", "NoKeysPublished").await;

    // an administrator (managedClusters/write, no proof) publishes the API server's keys: the
    // add-on's publish of the same set is then idempotent (no proof checked) and it learns the
    // cluster's issuer URL
    let api_keys = raw(&client, "/openid/v1", "jwks").await["keys"].clone();
    let (st, v) = call(
        &f.c,
        &f.admin,
        reqwest::Method::POST,
        &format!(
            "{}{}/publishServiceAccountKeys?{AKS_API}",
            f.server.url, f.cluster_path
        ),
        Some(&json!({"keys": api_keys})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    wait_for("Keyless serves the API server's keys", || async {
        let v: Value =
            f.c.get(&jwks_url)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
        if v["keys"] == api_keys {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await;
    // ... but the API server's issuer is not the cluster's: reported
    let msg = wait_for("the mismatch is reported", || async {
        match wi_check(&ops).await {
            (false, m) if m.contains(&format!("the API server's issuer {api_issuer}")) => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(msg.contains(&issuer), "{msg}");
    assert!(!msg.contains("proof"), "published: {msg}");
    assert!(has_metric(
        &metrics_of(&ops).await,
        "keyless_wi_issuer_mismatch",
        " 1"
    ));
    // pods are checked against the issuer now: no credential, and an unknown identity
    wait_reason(&pods, "web-1", "NoMatchingCredential").await;
    let (st, _, _) = wait_reason(&pods, "ghost-1", "IdentityNotFound").await;
    assert_eq!(st, "False");
    drop(addon);
}

/// A TCP relay on loopback to the port in `to` (changed at any time: new connections go there).
async fn relay(
    to: std::sync::Arc<std::sync::atomic::AtomicU16>,
) -> (u16, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            let port = to.load(std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    (port, task)
}

/// A rotation that switches the API server's signing key at once (no overlap: the new API
/// server's JWKS has only the new key): the add-on publishes the new set with the proof it kept,
/// which the old (published) key signed, and the new key's tokens exchange.
///
/// The harness cannot restart one kube-apiserver with another key, so the rotation is a second
/// control plane with the same issuer (its own signing key) that trusts the first one's client
/// CA, behind a TCP relay the add-on's kubeconfig names; the relay moves to it and the first
/// stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_rotation_is_published_with_the_kept_proof() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::start(dir.path(), true).await;
    let issuer = f.issuer();
    let k1 = dir.path().join("k8s1");
    let Some(cp1) = keyless_k8s::testing::ControlPlane::start(
        &k1,
        &format!("--service-account-issuer={issuer}"),
    ) else {
        return;
    };
    let cp2 = keyless_k8s::testing::ControlPlane::start(
        &dir.path().join("k8s2"),
        &format!(
            "--service-account-issuer={issuer} --client-ca-file={}",
            k1.join("ca.pem").display()
        ),
    )
    .expect("the second control plane");
    let (c1, c2) = (cp1.client().await, cp2.client().await);
    for c in [&c1, &c2] {
        addon_service_account(c).await;
    }
    let keys1 = raw(&c1, "/openid/v1", "jwks").await["keys"].clone();
    let keys2 = raw(&c2, "/openid/v1", "jwks").await["keys"].clone();
    assert_ne!(keys1, keys2, "two signing keys");

    // the add-on's kubeconfig: the relay, both API servers' CAs, the first one's admin
    // certificate (which the second trusts)
    let port1: u16 = cp1.env["K8S_API_PORT"].parse().unwrap();
    let port2: u16 = cp2.env["K8S_API_PORT"].parse().unwrap();
    let to = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(port1));
    let (relay_port, relay_task) = relay(to.clone()).await;
    let b64 = |p: std::path::PathBuf| {
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap())
    };
    let mut cas = std::fs::read(k1.join("ca.pem")).unwrap();
    cas.extend(std::fs::read(dir.path().join("k8s2").join("ca.pem")).unwrap());
    let kubeconfig = dir.path().join("addon-kubeconfig");
    std::fs::write(
        &kubeconfig,
        json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "relay",
            "clusters": [{"name": "relay", "cluster": {
                "server": format!("https://127.0.0.1:{relay_port}"),
                "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(&cas)}}],
            "users": [{"name": "admin", "user": {
                "client-certificate-data": b64(k1.join("admin.pem")),
                "client-key-data": b64(k1.join("admin-key.pem"))}}],
            "contexts": [{"name": "relay", "context": {"cluster": "relay", "user": "admin"}}],
        })
        .to_string(),
    )
    .unwrap();

    let addon = f.start_addon(&kubeconfig, dir.path());
    let ops = ops_of(&addon);
    let jwks_url = format!("{issuer}openid/v1/jwks");
    let served = |want: Value| {
        let (c, url) = (f.c.clone(), jwks_url.clone());
        async move {
            let v: Value = c
                .get(&url)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            if v["keys"] == want {
                Ok(())
            } else {
                Err(v.to_string())
            }
        }
    };
    wait_for("Keyless serves the first key", || served(keys1.clone())).await;

    // the rotation: the new API server, the old one gone
    to.store(port2, std::sync::atomic::Ordering::SeqCst);
    drop(cp1);
    wait_for("Keyless serves the new key", || served(keys2.clone())).await;
    let metrics = metrics_of(&ops).await;
    assert!(
        !has_metric(
            &metrics,
            "keyless_wi_jwks_publishes_total",
            "result=\"proof_rejected\""
        ),
        "{metrics}"
    );
    assert!(has_metric(
        &metrics,
        "keyless_wi_jwks_publishes_total",
        "result=\"changed\""
    ));

    // a token of the new key exchanges (the federated credential of an identity)
    let app = f
        .server
        .cli(&["identity", "create", "-g", "wi", "-n", "app-id"]);
    let app_cid = s(&app["properties"]["clientId"]);
    let (st, v) = call(
        &f.c,
        &f.admin,
        reqwest::Method::PUT,
        &format!(
            "{}{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app-id/federatedIdentityCredentials/web?{MSI_API}",
            f.server.url, f.rg
        ),
        Some(&json!({"properties": {"issuer": issuer, "subject": "system:serviceaccount:default:default", "audiences": [AUDIENCE]}})),
    )
    .await;
    assert!(st == 200 || st == 201, "{st} {v}");
    let sas: Api<ServiceAccount> = Api::namespaced(c2.clone(), "default");
    let tr: TokenRequest = sas
        .create_token_request(
            "default",
            &PostParams::default(),
            &obj(json!({"spec": {"audiences": [AUDIENCE], "expirationSeconds": 3600}})),
        )
        .await
        .unwrap();
    let token = tr.status.unwrap().token.expect("a token");
    let r =
        f.c.post(format!("{}/{}/oauth2/v2.0/token", f.server.url, f.tenant))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", app_cid.as_str()),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", token.as_str()),
                ("scope", "https://vault.azure.net/.default"),
            ])
            .send()
            .await
            .unwrap();
    let st = r.status().as_u16();
    assert_eq!(st, 200, "{}", r.text().await.unwrap_or_default());
    drop(addon);
    relay_task.abort();
}
