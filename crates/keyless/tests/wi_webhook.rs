//! `keyless wi-webhook` end to end against a real kube-apiserver (`../shared/k8s`): a Keyless
//! server with a managed cluster whose one node is a `keyless node` (its IMDS hands the node's
//! own processes the kubelet identity), the webhook acting as that identity for its serving
//! certificate (`issueWebhookCertificate`), and a MutatingWebhookConfiguration as upstream's
//! chart writes it (failurePolicy Fail, the label as objectSelector, a namespaceSelector,
//! sideEffects None) pointing at `https://127.0.0.1:<port>/mutate-v1-pod` with no caBundle: the
//! webhook fills it in. Pods are created through the API server (no kubelet: they are only
//! stored) and the stored objects are checked.
//!
//! Needs etcd and the control plane script (`KEYLESS_K8S_DIR`, default
//! `<workspace>/../shared/k8s`); without them the test is skipped with a message, unless `CI`
//! is set.

mod common;
#[path = "common/fabric.rs"]
mod fabric;

use common::*;
use fabric::create;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use keyless_k8s::testing::ControlPlane;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const CONFIG: &str = "azure-wi-webhook-mutating-webhook-configuration";
const CLIENT_ID: &str = "0b4a1c61-7c3e-4f55-9d2b-3f1e2d4c5a6b";
const FRESH_CLIENT_ID: &str = "5d6e7f80-1a2b-4c3d-8e9f-0a1b2c3d4e5f";
const PROXY_IMAGE: &str = "registry.example/keyless:test";

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Poll `f` every 200 ms until it returns Some, at most `secs`.
async fn wait<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The configuration as upstream's chart writes it, at `url`, without a caBundle.
fn webhook_configuration(url: &str) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIG},
        "webhooks": [{
            "name": "mutation.azure-workload-identity.io",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"url": url},
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "objectSelector": {"matchLabels": {"azure.workload.identity/use": "true"}},
            // namespaces can opt out; kube-system is not excluded here, so the webhook's own
            // rule is what leaves it alone
            "namespaceSelector": {"matchExpressions": [
                {"key": "keyless.dev/wi-webhook", "operator": "NotIn", "values": ["disabled"]}]},
            "reinvocationPolicy": "IfNeeded",
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "*"}],
            "sideEffects": "None",
            "timeoutSeconds": 10
        }]
    })
}

/// The caBundle of every webhook of the configuration (PEM text; empty when unset).
async fn ca_bundles(api: &Api<MutatingWebhookConfiguration>) -> Vec<String> {
    let c = api.get(CONFIG).await.expect("the configuration");
    c.webhooks
        .unwrap_or_default()
        .iter()
        .map(|w| {
            w.client_config
                .ca_bundle
                .as_ref()
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .unwrap_or_default()
        })
        .collect()
}

/// The leaf certificate the webhook serves (DER), verified against `ca_pem` for 127.0.0.1.
async fn served_leaf(port: u16, ca_pem: &str) -> Result<Vec<u8>, String> {
    let ca = keyless_pki::pem_blocks(ca_pem, "CERTIFICATE").remove(0);
    let cfg = keyless_pki::client_tls_config(&ca, None).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(
        std::net::IpAddr::from([127, 0, 0, 1]).into(),
    );
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no certificate")?;
    Ok(certs[0].to_vec())
}

/// The status of the answer to `head` (a raw HTTP/1.1 request head) over TLS.
async fn raw_status(port: u16, ca_pem: &str, head: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = keyless_pki::pem_blocks(ca_pem, "CERTIFICATE").remove(0);
    let cfg = keyless_pki::client_tls_config(&ca, None).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(
        std::net::IpAddr::from([127, 0, 0, 1]).into(),
    );
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tls.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"))
}

/// A Prometheus sample's value from the ops listener (0 when absent).
async fn metric(ops: &str, name_and_labels: &str) -> f64 {
    let text = http()
        .get(format!("{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn env_of(c: &Value) -> BTreeMap<String, String> {
    c["env"]
        .as_array()
        .map(|a| a.iter().map(|e| (s(&e["name"]), s(&e["value"]))).collect())
        .unwrap_or_default()
}

fn mounts_token(c: &Value) -> bool {
    c["volumeMounts"].as_array().is_some_and(|a| {
        a.iter().any(|m| {
            m["name"] == "azure-identity-token"
                && m["mountPath"] == "/var/run/secrets/azure/tokens"
                && m["readOnly"] == true
        })
    })
}

fn token_volume(pod: &Value) -> Option<Value> {
    pod["spec"]["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == "azure-identity-token")
        .cloned()
}

fn pod_json(name: &str, labelled: bool, annotations: Value, spec: Value) -> Value {
    let mut labels = json!({"app": "web"});
    if labelled {
        labels["azure.workload.identity/use"] = json!("true");
    }
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": spec})
}

/// Create the pod; the stored object as JSON.
async fn stored(api: &Api<Pod>, pod: Value) -> Value {
    let p = create(api, pod).await;
    serde_json::to_value(api.get(&p.metadata.name.unwrap()).await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_mutates_labelled_pods_with_a_certificate_from_keyless() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cp) = ControlPlane::start(&dir.path().join("k8s"), "") else {
        return;
    };
    let kube = cp.client().await;

    // Keyless: a cluster whose one node is a host agent (its IMDS gives the node's own
    // processes the kubelet identity)
    let server = ServerProc::start(dir.path(), &[]);
    server.cli(&["group", "create", "-n", "wi"]);
    let cluster = server.cli(&["aks", "create", "-g", "wi", "-n", "c1", "--node-count", "1"]);
    let cluster_id = s(&cluster["id"]);
    let kubelet_cid = s(&cluster["properties"]["identityProfile"]["kubeletidentity"]["clientId"]);
    let join = server.cli(&[
        "aks",
        "nodepool",
        "join-token",
        "-g",
        "wi",
        "--cluster-name",
        "c1",
        "-n",
        "nodepool1",
    ]);
    let state = dir.path().join("node");
    let state_s = state.to_string_lossy().to_string();
    let node = spawn_until(
        &server.node_args(&state_s, Some(join["joinToken"].as_str().unwrap())),
        "IMDS endpoint:",
        dir.path(),
    )
    .expect("the node joins");
    let imds = node.find("IMDS endpoint:").unwrap();
    let tenant = server.proc.find("Tenant:").unwrap();

    // the webhook, with a 60 s certificate (renewed at 2/3 of its life)
    let imds_endpoint = format!("{imds}/metadata/identity/oauth2/token");
    let kubeconfig = cp.kubeconfig().to_string_lossy().to_string();
    let mut hook = spawn_until(
        &[
            "wi-webhook",
            "--listen",
            "127.0.0.1:0",
            "--cluster-id",
            &cluster_id,
            "--server",
            &server.url,
            "--ca-file",
            &server.ca,
            "--imds-endpoint",
            &imds_endpoint,
            "--client-id",
            &kubelet_cid,
            "--tenant-id",
            &tenant,
            "--tls-san",
            "127.0.0.1",
            "--webhook-config-name",
            CONFIG,
            "--kubeconfig",
            &kubeconfig,
            "--proxy-image",
            PROXY_IMAGE,
            "--certificate-validity",
            "60",
        ],
        "Workload identity webhook listening on https://",
        dir.path(),
    )
    .expect("the webhook starts");
    let url = hook
        .find("Workload identity webhook listening on ")
        .unwrap();
    let port: u16 = url
        .trim_start_matches("https://127.0.0.1:")
        .trim_end_matches("/mutate-v1-pod")
        .parse()
        .unwrap();
    let ops = format!("http://{}", hook.find("Ops endpoint: http://").unwrap())
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    // the configuration, without a caBundle: the webhook fills it in with the cluster's CA
    let configs: Api<MutatingWebhookConfiguration> = Api::all(kube.clone());
    create(&configs, webhook_configuration(&url)).await;
    let ca_pem = wait(30, "the caBundle set by the webhook", || async {
        let b = ca_bundles(&configs).await;
        (!b[0].is_empty()).then(|| b[0].clone())
    })
    .await;
    assert!(
        ca_pem.starts_with("-----BEGIN CERTIFICATE-----"),
        "{ca_pem}"
    );
    let first_leaf = served_leaf(port, &ca_pem)
        .await
        .expect("the served certificate verifies against the caBundle for 127.0.0.1");
    let (nb, na) = keyless_pki::cert_validity(&first_leaf).unwrap();
    assert!(na - nb <= 180, "the validity asked for: {nb}..{na}");
    // HTTPS readiness: a certificate and the service-account cache listed
    let trusting = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .no_proxy()
        .build()
        .unwrap();
    let base = format!("https://127.0.0.1:{port}");
    wait(30, "/readyz", || async {
        let r = trusting.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert_eq!(
        trusting
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // namespaces and service accounts
    let namespaces: Api<Namespace> = Api::all(kube.clone());
    create(
        &namespaces,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "app"}}),
    )
    .await;
    let sa = |ns: &str, name: &str, client_id: &str| {
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": ns,
                "annotations": {"azure.workload.identity/client-id": client_id}}})
    };
    let app_sas: Api<ServiceAccount> = Api::namespaced(kube.clone(), "app");
    create(&app_sas, sa("app", "web", CLIENT_ID)).await;
    let sys_sas: Api<ServiceAccount> = Api::namespaced(kube.clone(), "kube-system");
    create(&sys_sas, sa("kube-system", "web", CLIENT_ID)).await;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "app");
    let sys_pods: Api<Pod> = Api::namespaced(kube.clone(), "kube-system");
    let authority = format!("{}/", server.url);

    // a labelled pod: every container gets the environment and the mount, the pod the volume;
    // a value the container sets itself is kept
    let p = stored(
        &pods,
        pod_json(
            "web-1",
            true,
            json!({}),
            json!({"serviceAccountName": "web",
                "initContainers": [{"name": "init", "image": "busybox"}],
                "containers": [
                    {"name": "app", "image": "busybox",
                     "env": [{"name": "AZURE_CLIENT_ID", "value": "mine"}]},
                    {"name": "side", "image": "busybox"}]}),
        ),
    )
    .await;
    let want = BTreeMap::from([
        ("AZURE_CLIENT_ID".to_string(), CLIENT_ID.to_string()),
        ("AZURE_TENANT_ID".to_string(), tenant.clone()),
        (
            "AZURE_FEDERATED_TOKEN_FILE".to_string(),
            "/var/run/secrets/azure/tokens/azure-identity-token".to_string(),
        ),
        ("AZURE_AUTHORITY_HOST".to_string(), authority.clone()),
    ]);
    assert_eq!(env_of(&p["spec"]["containers"][1]), want, "{p}");
    assert_eq!(env_of(&p["spec"]["initContainers"][0]), want, "{p}");
    let app_env = env_of(&p["spec"]["containers"][0]);
    assert_eq!(app_env["AZURE_CLIENT_ID"], "mine", "not overwritten");
    assert_eq!(
        p["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == "AZURE_CLIENT_ID")
            .count(),
        1
    );
    assert_eq!(app_env["AZURE_TENANT_ID"], tenant);
    for c in [
        &p["spec"]["initContainers"][0],
        &p["spec"]["containers"][0],
        &p["spec"]["containers"][1],
    ] {
        assert!(mounts_token(c), "{c}");
    }
    let v = token_volume(&p).expect("the projected token volume");
    assert_eq!(
        v["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "api://AzureADTokenExchange", "expirationSeconds": 3600,
               "path": "azure-identity-token"})
    );
    assert!(p["spec"].get("readinessGates").is_none(), "not asked for");

    // an unlabelled pod: unchanged
    let p = stored(
        &pods,
        pod_json(
            "plain",
            false,
            json!({}),
            json!({"serviceAccountName": "web",
                   "containers": [{"name": "app", "image": "busybox"}]}),
        ),
    )
    .await;
    assert!(token_volume(&p).is_none(), "{p}");
    assert!(env_of(&p["spec"]["containers"][0]).is_empty());

    // a labelled pod in kube-system: the webhook is asked and answers unchanged
    let allowed0 = metric(
        &ops,
        "keyless_wi_webhook_admissions_total{result=\"allowed\"}",
    )
    .await;
    let p = stored(
        &sys_pods,
        pod_json(
            "sys",
            true,
            json!({}),
            json!({"serviceAccountName": "web",
                   "containers": [{"name": "app", "image": "busybox"}]}),
        ),
    )
    .await;
    assert!(token_volume(&p).is_none(), "{p}");
    assert!(env_of(&p["spec"]["containers"][0]).is_empty());
    assert_eq!(
        metric(
            &ops,
            "keyless_wi_webhook_admissions_total{result=\"allowed\"}"
        )
        .await,
        allowed0 + 1.0,
        "the kube-system pod went through the webhook"
    );

    // skip-containers
    let p = stored(
        &pods,
        pod_json(
            "skip",
            true,
            json!({"azure.workload.identity/skip-containers": "sidecar"}),
            json!({"serviceAccountName": "web", "containers": [
                {"name": "app", "image": "busybox"}, {"name": "sidecar", "image": "busybox"}]}),
        ),
    )
    .await;
    assert_eq!(env_of(&p["spec"]["containers"][0]), want);
    assert!(env_of(&p["spec"]["containers"][1]).is_empty(), "{p}");
    assert!(!mounts_token(&p["spec"]["containers"][1]));

    // the readiness gate, when the pod asks
    let p = stored(
        &pods,
        pod_json(
            "gated",
            true,
            json!({"keyless.dev/identity-readiness-gate": "true"}),
            json!({"serviceAccountName": "web",
                   "containers": [{"name": "app", "image": "busybox"}]}),
        ),
    )
    .await;
    assert_eq!(
        p["spec"]["readinessGates"],
        json!([{"conditionType": "keyless.dev/workload-identity-ready"}])
    );

    // the proxy sidecar: prepended, with the environment; refused on the host network
    let p = stored(
        &pods,
        pod_json(
            "proxied",
            true,
            json!({"azure.workload.identity/inject-proxy-sidecar": "true",
                   "azure.workload.identity/proxy-sidecar-port": "8123"}),
            json!({"serviceAccountName": "web",
                   "containers": [{"name": "app", "image": "busybox"}]}),
        ),
    )
    .await;
    let init = &p["spec"]["initContainers"][0];
    let proxy = &p["spec"]["containers"][0];
    assert_eq!(
        (
            s(&init["name"]),
            s(&proxy["name"]),
            s(&p["spec"]["containers"][1]["name"])
        ),
        ("azwi-proxy-init".into(), "azwi-proxy".into(), "app".into())
    );
    assert_eq!(
        init["command"],
        json!(["keyless", "wi-proxy", "init", "--proxy-port", "8123"])
    );
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN"])
    );
    assert_eq!(
        proxy["command"],
        json!(["keyless", "wi-proxy", "serve", "--port", "8123"])
    );
    assert_eq!(
        (s(&init["image"]), s(&proxy["image"])),
        (PROXY_IMAGE.into(), PROXY_IMAGE.into())
    );
    for c in [init, proxy, &p["spec"]["containers"][1]] {
        assert_eq!(env_of(c), want, "{c}");
        assert!(mounts_token(c), "{c}");
    }
    let refused = pods
        .create(
            &PostParams::default(),
            &fabric::obj(pod_json(
                "proxied-host",
                true,
                json!({"azure.workload.identity/inject-proxy-sidecar": "true"}),
                json!({"serviceAccountName": "web", "hostNetwork": true,
                       "containers": [{"name": "app", "image": "busybox"}]}),
            )),
        )
        .await;
    match refused {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 400, "{e:?}");
            assert!(e.message.contains("hostNetwork"), "{}", e.message);
        }
        other => panic!("a hostNetwork pod with the sidecar was admitted: {other:?}"),
    }
    assert!(pods.get_opt("proxied-host").await.unwrap().is_none());

    // a service account created just before its pod (maybe not in the cache yet)
    create(&app_sas, sa("app", "fresh", FRESH_CLIENT_ID)).await;
    let p = stored(
        &pods,
        pod_json(
            "fresh",
            true,
            json!({}),
            json!({"serviceAccountName": "fresh",
                   "containers": [{"name": "app", "image": "busybox"}]}),
        ),
    )
    .await;
    assert_eq!(
        env_of(&p["spec"]["containers"][0])["AZURE_CLIENT_ID"],
        FRESH_CLIENT_ID
    );

    // what is not an AdmissionReview is answered 4xx, directly
    let post = |ct: &'static str, body: Vec<u8>| {
        let (trusting, base) = (trusting.clone(), base.clone());
        async move {
            let r = trusting
                .post(format!("{base}/mutate-v1-pod"))
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.text().await.unwrap_or_default())
        }
    };
    assert_eq!(post("text/plain", b"{}".to_vec()).await.0, 415);
    assert_eq!(post("application/json", b"{not json".to_vec()).await.0, 400);
    assert_eq!(
        post(
            "application/json",
            br#"{"apiVersion": "v1", "kind": "Pod"}"#.to_vec()
        )
        .await
        .0,
        400
    );
    // over 3 MiB: refused from its Content-Length, before the body is read (a raw request:
    // an HTTP client still writing the body would see the connection closed)
    assert_eq!(
        raw_status(
            port,
            &ca_pem,
            "POST /mutate-v1-pod HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 3145729\r\n\r\n"
        )
        .await,
        413
    );
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "direct-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "namespace": "app",
            "object": {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "a"}]}}}});
    let (st, body) = post("application/json", serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(st, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer,
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "response": {"uid": "direct-1", "allowed": true}})
    );
    // a labelled pod whose service account does not exist: refused (400) naming it (the API
    // server's ServiceAccount admission plugin usually refuses it first; asked directly here)
    let missing0 = metric(
        &ops,
        "keyless_wi_webhook_admissions_total{result=\"refused\"}",
    )
    .await;
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "direct-2", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "namespace": "app",
            "object": {"metadata": {"name": "g", "labels": {"azure.workload.identity/use": "true"}},
                "spec": {"serviceAccountName": "ghost", "containers": [{"name": "a"}]}}}});
    let (st, body) = post("application/json", serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(st, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let r = &answer["response"];
    assert_eq!(
        (
            r["uid"].as_str(),
            r["allowed"].as_bool(),
            r["status"]["code"].as_u64()
        ),
        (Some("direct-2"), Some(false), Some(400)),
        "{answer}"
    );
    assert!(r.get("patch").is_none(), "{answer}");
    let msg = r["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"ghost\"") && msg.contains("namespace \"app\""),
        "{msg}"
    );
    assert_eq!(
        metric(
            &ops,
            "keyless_wi_webhook_admissions_total{result=\"refused\"}"
        )
        .await,
        missing0 + 1.0
    );
    assert_eq!(
        trusting
            .get(format!("{base}/nothing-here"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // a caBundle someone resets is put back
    let k8s_ca = std::fs::read_to_string(&cp.env["K8S_CA_FILE"]).unwrap();
    use base64::Engine;
    configs
        .patch(
            CONFIG,
            &PatchParams::default(),
            &Patch::Strategic(json!({"webhooks": [{"name": "mutation.azure-workload-identity.io",
                "clientConfig": {"caBundle": base64::engine::general_purpose::STANDARD.encode(&k8s_ca)}}]})),
        )
        .await
        .unwrap();
    wait(30, "the caBundle restored", || async {
        (ca_bundles(&configs).await == [ca_pem.clone()]).then_some(())
    })
    .await;

    // the certificate is renewed without a restart (a 60 s certificate: at 2/3 of its life),
    // and pods created after are still mutated through the API server
    let renewed = wait(120, "a renewed serving certificate", || async {
        let leaf = served_leaf(port, &ca_pem).await.ok()?;
        (leaf != first_leaf).then_some(leaf)
    })
    .await;
    let (nb2, _) = keyless_pki::cert_validity(&renewed).unwrap();
    assert!(nb2 > nb, "a newer certificate");
    assert!(
        metric(
            &ops,
            "keyless_wi_webhook_certificate_renewals_total{result=\"ok\"}"
        )
        .await
            >= 2.0
    );
    assert_eq!(
        ca_bundles(&configs).await,
        vec![ca_pem.clone()],
        "the same CA"
    );
    let p = stored(
        &pods,
        pod_json(
            "after-renewal",
            true,
            json!({}),
            json!({"serviceAccountName": "web",
                   "containers": [{"name": "app", "image": "busybox"}]}),
        ),
    )
    .await;
    assert_eq!(env_of(&p["spec"]["containers"][0]), want);
    assert!(token_volume(&p).is_some());
    assert!(
        matches!(hook.child.try_wait(), Ok(None)),
        "the same webhook process"
    );
    assert!(
        metric(
            &ops,
            "keyless_wi_webhook_admissions_total{result=\"mutated\"}"
        )
        .await
            >= 6.0
    );
    drop((hook, node, server, cp));
}
