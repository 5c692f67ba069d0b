//! `cargo bench -p keyless --bench workload_identity`: the two hot paths of workload identity,
//! each beside a baseline measured in the same run (these machines are noisy, so the ratios are
//! the figures to compare across runs):
//!
//! - token exchanges/s at the token service (a service-account token of a cluster whose OIDC
//!   issuer Keyless serves, as `client_assertion`; its issuer's keys cached, so each exchange is
//!   one RS256 verify and one RS256 sign over HTTPS keep-alive), vs raw RS256 signatures/s with
//!   aws-lc-rs on as many threads as the server has — with 1 and with 1,000 federated credentials
//!   and credential patterns on other identities (the hot path must not grow with the data);
//! - admissions/s and p50/p99 of `keyless wi-webhook`'s handler (a labelled pod CREATE
//!   AdmissionReview, the service account from its cache, the JSON Patch answer) over HTTPS
//!   keep-alive — the production listener, TLS and router (`keyless_k8s::webhook::
//!   serve_prefilled`), its P-256 certificate issued by the cluster's webhook CA
//!   (`issueWebhookCertificate`) — vs a no-op HTTPS webhook (bare hyper + rustls, the same
//!   certificate and key) answering the same AdmissionReview bytes, same load generator and
//!   connections; with 1 and with 10,000 service accounts in the cache (must not grow; the
//!   rounds interleave: no-op, 1, no-op, 10,000); and the rules alone on one thread (the
//!   review parsed, answered and serialized, no HTTP), to tell the handler's share.
//!
//! The process's Prometheus recorder is installed, as in `keyless server` / `wi-webhook`.
//!
//! Environment: BENCH_SECS (default 5), BENCH_CONNS (default 16), BENCH_ROUNDS (3).

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ARM: &str = "https://management.azure.com/";
const AKS_API: &str = "api-version=2026-08-01";
const MSI_API: &str = "api-version=2023-01-31";
const EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWT signed by `key` (what the API server's TokenRequest makes for a pod).
fn sign(key: &keyless_pki::SigningKey, claims: &Value) -> String {
    let header = json!({"alg": "RS256", "kid": key.kid(), "typ": "JWT"});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key.sign(input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

struct Arm {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Arm {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v
    }
}

/// Exchanges/s of `assertion` for `client_id` on `conns` keep-alive connections.
async fn exchanges(
    client: &reqwest::Client,
    url: &str,
    client_id: &str,
    assertion: &str,
    conns: usize,
    secs: u64,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = vec![];
    for _ in 0..conns {
        let (client, url, done) = (client.clone(), url.to_string(), done.clone());
        let form = [
            ("grant_type", "client_credentials".to_string()),
            ("client_id", client_id.to_string()),
            ("scope", format!("{ARM}.default")),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string(),
            ),
            ("client_assertion", assertion.to_string()),
        ];
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let r = client.post(&url).form(&form).send().await.unwrap();
                assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
                let _ = r.bytes().await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

/// The raw HTTP/1.1 POST of `review` to the webhook path.
fn admission_request(review: &Value) -> String {
    let body = review.to_string();
    format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        keyless_k8s::webhook::defaults::PATH,
        body.len()
    )
}

/// A pod CREATE AdmissionReview as the API server sends it: a labelled pod of `ns` running as
/// service account `sa`, two containers.
fn pod_review(ns: &str, sa: &str) -> Value {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-7d4b9c8f6-", "namespace": ns,
            "labels": {"app": "web", "pod-template-hash": "7d4b9c8f6",
                       "azure.workload.identity/use": "true"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c8f6",
                "uid": "0b1c9f4e-6a8d-4f0e-9a51-3d2f7c1b8e90", "controller": true, "blockOwnerDeletion": true}]},
        "spec": {
            "serviceAccountName": sa,
            "containers": [
                {"name": "web", "image": "registry.example/web:1.4.2", "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                 "env": [{"name": "LOG_LEVEL", "value": "info"}],
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                 "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                 "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"},
                {"name": "metrics", "image": "registry.example/exporter:0.9", "ports": [{"containerPort": 9100, "protocol": "TCP"}],
                 "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                 "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}
            ],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "securityContext": {}, "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}]
        }
    });
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": ns, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "3e1f2a77-2b1c-4c5e-8f0d-9b6a5c4d3e2f",
                         "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]},
            "object": pod, "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// A service account's metadata with the workload-identity client id.
fn service_account(ns: &str, name: &str, client_id: &str) -> kube::api::ObjectMeta {
    kube::api::ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(ns.to_string()),
        uid: Some(uuid::Uuid::new_v4().to_string()),
        resource_version: Some("1".into()),
        annotations: Some(
            [(
                keyless_core::workload_identity::CLIENT_ID_ANNOTATION.to_string(),
                client_id.to_string(),
            )]
            .into(),
        ),
        ..Default::default()
    }
}

/// One request over a fresh TLS connection: the response head and body.
async fn once_tls(
    addr: std::net::SocketAddr,
    tls: &(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    ),
    request: &str,
) -> (String, String) {
    use tokio::io::AsyncWriteExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = tls.0.connect(tls.1.clone(), tcp).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let (head, body) = read_response(&mut s, &mut buf).await;
    (head, String::from_utf8_lossy(&buf[body]).into_owned())
}

/// The webhook rows: admissions/s and p50/p99 with 1 and 10,000 service accounts cached, each
/// beside a bare hyper + rustls server answering the same bytes.
async fn webhook_rows(
    arm: &Arm,
    cluster_id: &str,
    tenant_id: &str,
    base: &str,
    conns: usize,
    secs: u64,
) -> Vec<String> {
    use keyless_k8s::webhook;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    // its serving certificate as in production: a fresh P-256 key, the cluster's webhook CA
    let (csr, key_der) = webhook::csr(&["127.0.0.1".to_string()]).unwrap();
    let issued = arm
        .call(
            reqwest::Method::POST,
            &format!("{cluster_id}/issueWebhookCertificate?{AKS_API}"),
            Some(json!({ "csr": csr })),
        )
        .await;
    let leaf =
        keyless_pki::pem_blocks(issued["certificate"].as_str().unwrap(), "CERTIFICATE").remove(0);
    let ca = keyless_pki::pem_blocks(issued["caBundle"].as_str().unwrap(), "CERTIFICATE").remove(0);
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let certified = Arc::new(
        rustls::sign::CertifiedKey::from_der(
            vec![CertificateDer::from(leaf.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.clone())),
            &provider,
        )
        .unwrap(),
    );
    let client_tls = {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca)).unwrap();
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (
            tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        )
    };

    let (ns, sa) = ("app", "web");
    let client_id = uuid::Uuid::new_v4().to_string();
    let defaults = keyless_core::workload_identity::Defaults::new(tenant_id, format!("{base}/"));
    let listen = || keyless_ops::limits::bind("127.0.0.1:0");
    let one = webhook::serve_prefilled(
        listen().await.unwrap(),
        [service_account(ns, sa, &client_id)],
        defaults.clone(),
        certified.clone(),
    )
    .await
    .unwrap();
    let mut many_sas: Vec<_> = (0..9_999)
        .map(|i| {
            service_account(
                &format!("team-{}", i % 500),
                &format!("sa-{i}"),
                &uuid::Uuid::new_v4().to_string(),
            )
        })
        .collect();
    many_sas.insert(4_321, service_account(ns, sa, &client_id));
    let many = webhook::serve_prefilled(
        listen().await.unwrap(),
        many_sas,
        defaults,
        certified.clone(),
    )
    .await
    .unwrap();

    // the answer: mutated (the client id in the patch), the uid echoed
    let request = admission_request(&pod_review(ns, sa));
    let mut answer = String::new();
    for addr in [one.addr, many.addr] {
        let (head, body) = once_tls(addr, &client_tls, &request).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let r = &v["response"];
        assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002", "{body}");
        assert_eq!(r["allowed"], true, "{body}");
        assert_eq!(r["patchType"], "JSONPatch", "{body}");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap();
        assert!(
            String::from_utf8(patch).unwrap().contains(&client_id),
            "{body}"
        );
        answer = body;
    }
    // the no-op webhook: the same certificate and key, the same answer's bytes
    let bare = {
        let mut cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(leaf)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
            )
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        bare_server(
            answer.clone(),
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))),
        )
        .await
    };
    let (head, body) = once_tls(bare, &client_tls, &request).await;
    assert!(head.starts_with("HTTP/1.1 200") && body == answer, "{head}");

    let run = |addr| load_timed(addr, request.clone(), conns, secs, Some(client_tls.clone()));
    eprintln!("bench phase: webhook admissions (1 and 10,000 service accounts cached)");
    let subjects = [one.addr, many.addr];
    let mut m = paired_each(|| run(bare), 2, |i| run(subjects[i]), |t: &Timed| t.rps).await;
    let (b2, w2, r2) = m.pop().unwrap();
    let (b1, w1, r1) = m.pop().unwrap();
    let rules = rules_alone(&request, &client_id);
    let lat = |t: &Timed| format!("p50 {:.2} ms  p99 {:.2} ms", t.pct_ms(50.0), t.pct_ms(99.0));
    let vs = |w: &Timed, b: &Timed, r: &[f64]| {
        format!(
            "{}   ratio to no-op {:.2}{}, p99 ×{:.1}",
            lat(w),
            w.rps / b.rps,
            rounds_note(r),
            w.pct_ms(99.0) / b.pct_ms(99.0)
        )
    };
    vec![
        row(
            &format!(
                "no-op HTTPS webhook (hyper + rustls, P-256), same {} B answer",
                answer.len()
            ),
            b1.rps,
            &lat(&b1),
        ),
        row(
            "wi-webhook admissions, 1 service account cached",
            w1.rps,
            &vs(&w1, &b1, &r1),
        ),
        row("no-op HTTPS webhook, same run", b2.rps, &lat(&b2)),
        row(
            "wi-webhook admissions, 10,000 service accounts cached",
            w2.rps,
            &vs(&w2, &b2, &r2),
        ),
        format!(
            "    10,000 vs 1 cached (ratio of the ratios): {:.2}; request {} B",
            (w2.rps / b2.rps) / (w1.rps / b1.rps),
            request.len()
        ),
        row(
            "  the rules alone (parse, review, serialize; 1 thread)",
            rules,
            &format!("{:.1} µs each", 1e6 / rules),
        ),
    ]
}

/// One table row: label, a rate, the rest.
fn row(label: &str, rate: f64, rest: &str) -> String {
    format!("  {label:<66}{rate:>8.0} /s   {rest}")
}

/// Admissions/s of the handler's own work on one thread, no HTTP: the body parsed, the
/// service account looked up (the pod's, prebuilt), the review answered and serialized.
fn rules_alone(request: &str, client_id: &str) -> f64 {
    use keyless_core::workload_identity as wi;
    let body = request.split_once("\r\n\r\n").unwrap().1.as_bytes();
    let sa = json!({"metadata": {"name": "web", "namespace": "app",
        "annotations": {wi::CLIENT_ID_ANNOTATION: client_id}}});
    let d = wi::Defaults::new("tenant", "https://localhost/");
    let (mut n, t0) = (0u64, Instant::now());
    while t0.elapsed() < Duration::from_secs(1) {
        for _ in 0..100 {
            let review: Value = serde_json::from_slice(body).unwrap();
            assert!(wi::service_account_ref(&review).is_some());
            let answer = wi::review(&review, Some(&sa), &d);
            std::hint::black_box(serde_json::to_vec(&answer).unwrap());
        }
        n += 100;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let secs = env_u64("BENCH_SECS", 5);
    let conns = env_u64("BENCH_CONNS", 16) as usize;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        keyless_ops::metrics::install("bench");
        let (_dir, srv) = start_server(None).await;
        let s = srv.state.clone();
        let admin = srv.bootstrap.new_admin.clone().unwrap();
        let base = format!("https://localhost:{}", srv.local_addr.port());
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(s.ca.cert_pem().as_bytes()).unwrap()])
            .build()
            .unwrap();
        let token_url = format!("{base}/{}/oauth2/v2.0/token", s.tenant_id);
        let token: Value = client
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", admin.client_id.as_str()),
                ("client_secret", admin.client_secret.as_str()),
                ("scope", &format!("{ARM}.default")),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let arm = Arm {
            client: client.clone(),
            base: base.clone(),
            token: token["access_token"].as_str().unwrap().to_string(),
        };
        let rg = format!("/subscriptions/{}/resourceGroups/wi", s.subscription_id);
        arm.call(
            reqwest::Method::PUT,
            &format!("{rg}?api-version=2022-12-01"),
            Some(json!({"location": "local"})),
        )
        .await;
        let cluster = arm
            .call(
                reqwest::Method::PUT,
                &format!("{rg}/providers/Microsoft.ContainerService/managedClusters/bench?{AKS_API}"),
                Some(json!({"location": "local", "identity": {"type": "SystemAssigned"}, "properties": {
                    "agentPoolProfiles": [{"name": "nodepool1", "count": 1, "vmSize": "Standard_DS2_v2",
                                           "mode": "System", "osType": "Linux", "type": "VirtualMachineScaleSets"}],
                    "oidcIssuerProfile": {"enabled": true},
                    "securityProfile": {"workloadIdentity": {"enabled": true}},
                }})),
            )
            .await;
        let issuer = cluster["properties"]["oidcIssuerProfile"]["issuerURL"]
            .as_str()
            .unwrap()
            .to_string();
        // the API server's signing key, published as the add-on does
        let (ca, _) = keyless_pki::Ca::generate("bench apiserver", now()).unwrap();
        let (sa_key, _) = keyless_pki::SigningKey::generate(&ca, now(), 86_400).unwrap();
        let mut jwk = serde_json::to_value(sa_key.jwk()).unwrap();
        jwk.as_object_mut().unwrap().remove("x5c");
        jwk.as_object_mut().unwrap().remove("x5t");
        arm.call(
            reqwest::Method::POST,
            &format!("{}/publishServiceAccountKeys?{AKS_API}", cluster["id"].as_str().unwrap()),
            Some(json!({"keys": [jwk]})),
        )
        .await;
        let uami = format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities");
        let ident = arm
            .call(
                reqwest::Method::PUT,
                &format!("{uami}/web?{MSI_API}"),
                Some(json!({"location": "local"})),
            )
            .await;
        let client_id = ident["properties"]["clientId"].as_str().unwrap().to_string();
        arm.call(
            reqwest::Method::PUT,
            &format!("{uami}/web/federatedIdentityCredentials/web?{MSI_API}"),
            Some(json!({"properties": {"issuer": issuer, "subject": "system:serviceaccount:app:web",
                                       "audiences": [EXCHANGE_AUDIENCE]}})),
        )
        .await;
        let t = now();
        let assertion = sign(
            &sa_key,
            &json!({"iss": issuer, "sub": "system:serviceaccount:app:web", "aud": [EXCHANGE_AUDIENCE],
                    "iat": t, "nbf": t, "exp": t + 3600}),
        );
        // warm: the issuer's keys cached
        assert!(exchanges(&client, &token_url, &client_id, &assertion, 1, 1).await > 0.0);

        eprintln!("bench phase: token exchanges");
        let (raw, one, ratios) = paired(
            || async move { tokio::task::spawn_blocking(move || raw_rs256(threads, secs)).await.unwrap() },
            || exchanges(&client, &token_url, &client_id, &assertion, conns, secs),
        )
        .await;
        // 1,000 other identities with a credential and a pattern each on the same issuer
        eprintln!("bench phase: 1,000 other identities, FICs and patterns");
        for n in 0..1000 {
            arm.call(
                reqwest::Method::PUT,
                &format!("{uami}/other-{n}?{MSI_API}"),
                Some(json!({"location": "local"})),
            )
            .await;
            arm.call(
                reqwest::Method::PUT,
                &format!("{uami}/other-{n}/federatedIdentityCredentials/fic?{MSI_API}"),
                Some(json!({"properties": {"issuer": issuer, "subject": format!("system:serviceaccount:ns-{n}:sa"),
                                           "audiences": [EXCHANGE_AUDIENCE]}})),
            )
            .await;
            arm.call(
                reqwest::Method::PUT,
                &format!("{uami}/other-{n}/federatedIdentityCredentialPatterns/pattern?{MSI_API}"),
                Some(json!({"properties": {"issuer": issuer, "subjectPattern": format!("system:serviceaccount:ns-{n}:*"),
                                           "audiences": [EXCHANGE_AUDIENCE]}})),
            )
            .await;
        }
        eprintln!("bench phase: token exchanges, 1,000 other identities");
        let (raw_many, many, ratios_many) = paired(
            || async move { tokio::task::spawn_blocking(move || raw_rs256(threads, secs)).await.unwrap() },
            || exchanges(&client, &token_url, &client_id, &assertion, conns, secs),
        )
        .await;
        let webhook = webhook_rows(
            &arm,
            cluster["id"].as_str().unwrap(),
            &s.tenant_id,
            &base,
            conns,
            secs,
        )
        .await;
        println!(
            "workload identity bench ({secs} s per run, {conns} connections, {threads} cores; load generator in the same process)"
        );
        println!("{}", row(&format!("raw RS256 signs (aws-lc-rs, {threads} threads)"), raw, ""));
        println!(
            "{}",
            row(
                "token exchanges (issuer keys cached)",
                one,
                &format!("ratio to raw signs {:.2}{}", one / raw, rounds_note(&ratios))
            )
        );
        println!("{}", row("raw RS256 signs, same run", raw_many, ""));
        println!(
            "{}",
            row(
                "token exchanges, 1,000 other identities' FICs + patterns",
                many,
                &format!(
                    "ratio to raw signs {:.2}{}",
                    many / raw_many,
                    rounds_note(&ratios_many)
                )
            )
        );
        println!(
            "    1,000 vs 1 (ratio of the ratios): {:.2}",
            (many / raw_many) / (one / raw)
        );
        for line in webhook {
            println!("{line}");
        }
        srv.shutdown().await;
    });
}
