//! `cargo bench -p keyless --bench workload_identity`: the two hot paths of workload identity,
//! each beside a baseline measured in the same run (these machines are noisy, so the ratios are
//! the figures to compare across runs):
//!
//! - token exchanges/s at the token service (a service-account token of a cluster whose OIDC
//!   issuer Keyless serves, as `client_assertion`; its issuer's keys cached, so each exchange is
//!   one RS256 verify and one RS256 sign over HTTPS keep-alive), vs raw RS256 signatures/s with
//!   aws-lc-rs on as many threads as the server has — with 1 and with 1,000 federated credentials
//!   and credential patterns on other identities (the hot path must not grow with the data);
//! - admissions/s and p99 of `keyless wi-webhook`'s handler (a pod CREATE AdmissionReview, the
//!   service account from its cache, the JSON Patch answer) over HTTPS keep-alive, vs a no-op
//!   HTTPS webhook (bare hyper + rustls, same certificate type) answering a fixed AdmissionReview.
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

/// Raw RS256 signatures/s on `threads` threads.
fn raw_rs256(threads: usize, secs: u64) -> f64 {
    let (ca, _) = keyless_pki::Ca::generate("bench", now()).unwrap();
    let (key, der) = keyless_pki::SigningKey::generate(&ca, now(), 86_400).unwrap();
    let cert = key.cert_der().to_vec();
    let input = vec![b'a'; 700];
    let total = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (der, cert, input, total) = (&der, &cert, &input, total.clone());
            s.spawn(move || {
                let k = keyless_pki::SigningKey::load(der, cert).unwrap();
                let mut n = 0;
                while Instant::now() < stop {
                    k.sign(input).unwrap();
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    total.load(Ordering::Relaxed) as f64 / secs as f64
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

        let (raw, one, ratios) = paired(
            || async move { tokio::task::spawn_blocking(move || raw_rs256(threads, secs)).await.unwrap() },
            || exchanges(&client, &token_url, &client_id, &assertion, conns, secs),
        )
        .await;
        // 1,000 other identities with a credential and a pattern each on the same issuer
        for n in 0..1000 {
            arm.call(
                reqwest::Method::PUT,
                &format!("{uami}/other-{n}?{MSI_API}"),
                Some(json!({"location": "local"})),
            )
            .await;
            arm.call(
                reqwest::Method::PUT,
                &format!("{uami}/other-{n}/federatedIdentityCredentials/f?{MSI_API}"),
                Some(json!({"properties": {"issuer": issuer, "subject": format!("system:serviceaccount:ns-{n}:sa"),
                                           "audiences": [EXCHANGE_AUDIENCE]}})),
            )
            .await;
            arm.call(
                reqwest::Method::PUT,
                &format!("{uami}/other-{n}/federatedIdentityCredentialPatterns/p?{MSI_API}"),
                Some(json!({"properties": {"issuer": issuer, "subjectPattern": format!("system:serviceaccount:ns-{n}:*"),
                                           "audiences": [EXCHANGE_AUDIENCE]}})),
            )
            .await;
        }
        let (raw_many, many, ratios_many) = paired(
            || async move { tokio::task::spawn_blocking(move || raw_rs256(threads, secs)).await.unwrap() },
            || exchanges(&client, &token_url, &client_id, &assertion, conns, secs),
        )
        .await;
        println!("workload identity ({threads} threads, {conns} connections, {secs} s)");
        println!(
            "  token exchanges (issuer keys cached):        {one:>9.0}/s  raw RS256 signs {raw:>9.0}/s  ratio {:.3}{}",
            one / raw,
            rounds_note(&ratios)
        );
        println!(
            "  same, 1,000 other identities' FICs + patterns: {many:>9.0}/s  raw RS256 signs {raw_many:>9.0}/s  ratio {:.3}{}",
            many / raw_many,
            rounds_note(&ratios_many)
        );
        srv.shutdown().await;
    });
}
