//! Workload identity's IMDS proxy (`keyless wi-proxy`, contract C7) with real processes:
//!
//! 1. `wi-proxy serve` against a real `keyless up`: a cluster with Keyless's own OIDC issuer
//!    (the test publishes its own RSA key there, as the add-on would the API server's, and signs
//!    the service-account token itself), a user-assigned identity whose federated credential
//!    trusts that issuer; an IMDS request gets the identity's token, refusals are IMDS-shaped.
//! 2. `wi-proxy serve --imds-upstream` a stub IMDS: requests other than the token route reach
//!    it as sent (method, path, query, headers, body) and its answer comes back; the node's
//!    identity endpoints are not forwarded; an unreachable IMDS is a 502.
//! 3. `wi-proxy init` in a fresh network namespace: a TCP connection to 169.254.169.254:80
//!    inside reaches the proxy's port; the proxy's own UID is not redirected (root); a proxy
//!    not running as that UID answers 508 instead of forwarding to itself forever.

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::sync::{Arc, Mutex};

const AKS_API: &str = "api-version=2026-08-01";
const MSI_API: &str = "api-version=2023-01-31";
const RG_API: &str = "api-version=2024-11-01";
const AUDIENCE: &str = "api://AzureADTokenExchange";

/// ARM as the bootstrap admin of a `keyless up`.
struct Arm {
    c: reqwest::Client,
    url: String,
    token: String,
}

impl Arm {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut r = self
            .c
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(b);
        }
        let r = r.send().await.unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }

    async fn put(&self, path: &str, body: &Value) -> Value {
        let (st, v) = self.call(reqwest::Method::PUT, path, Some(body)).await;
        assert!(st == 200 || st == 201, "PUT {path}: {st} {v}");
        v
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A service-account-like token signed with `key`.
fn sign(key: &keyless_pki::SigningKey, iss: &str, sub: &str, aud: &str) -> String {
    let header = keyless_core::claims::JwtHeader {
        typ: Some("JWT".into()),
        alg: "RS256".into(),
        x5t: None,
        kid: Some(key.kid().to_string()),
        x5t_s256: None,
    };
    let t = now();
    let claims = json!({"iss": iss, "sub": sub, "aud": [aud], "iat": t, "nbf": t, "exp": t + 3600});
    let input = keyless_core::claims::signing_input(&header, &claims);
    let sig = key.sign(input.as_bytes()).unwrap();
    keyless_core::claims::assemble(&input, &sig)
}

async fn proxy_get(port: u16, query: &str) -> (u16, Value) {
    let r = http()
        .get(format!(
            "http://127.0.0.1:{port}/metadata/identity/oauth2/token?{query}"
        ))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_imds_with_the_workload_identity_token() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]).expect("keyless up");
    let server = up.s("/serverUrl");
    let tenant = up.s("/tenantId");
    let ca = up.s("/caFile");
    let sub = up.s("/subscriptionId");
    let c = https(&ca);
    let (st, t) = sp_token(
        &c,
        &server,
        &tenant,
        &up.s("/adminClientId"),
        &up.secret().unwrap(),
        "https://management.azure.com/.default",
    )
    .await;
    assert_eq!(st, 200, "{t}");
    let arm = Arm {
        c: c.clone(),
        url: server.clone(),
        token: t["access_token"].as_str().unwrap().to_string(),
    };
    let rg = format!("/subscriptions/{sub}/resourceGroups/wi");
    arm.put(&format!("{rg}?{RG_API}"), &json!({"location": "local"}))
        .await;

    // a cluster with Keyless's OIDC issuer; our own key published there
    let cluster_path = format!("{rg}/providers/Microsoft.ContainerService/managedClusters/c1");
    let cluster = arm
        .put(
            &format!("{cluster_path}?{AKS_API}"),
            &json!({"location": "local", "identity": {"type": "SystemAssigned"}, "properties": {
                "agentPoolProfiles": [{"name": "np1", "count": 1}],
                "oidcIssuerProfile": {"enabled": true}}}),
        )
        .await;
    let issuer = cluster["properties"]["oidcIssuerProfile"]["issuerURL"]
        .as_str()
        .unwrap_or_else(|| panic!("no issuerURL: {cluster}"))
        .to_string();
    let (ca_obj, _) = keyless_pki::Ca::generate("test issuer", now()).unwrap();
    let (key, _) = keyless_pki::SigningKey::generate(&ca_obj, now(), 86_400).unwrap();
    let jwk = key.jwk();
    let published =
        json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": jwk.kid, "n": jwk.n, "e": jwk.e});
    let (st, v) = arm
        .call(
            reqwest::Method::POST,
            &format!("{cluster_path}/publishServiceAccountKeys?{AKS_API}"),
            Some(&json!({"keys": [published]})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["issuerURL"], issuer.as_str());

    // an identity trusting the issuer for one service account; another trusting nothing
    let ids = format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities");
    let app = arm
        .put(
            &format!("{ids}/app?{MSI_API}"),
            &json!({"location": "local"}),
        )
        .await;
    let other = arm
        .put(
            &format!("{ids}/other?{MSI_API}"),
            &json!({"location": "local"}),
        )
        .await;
    let app_cid = app["properties"]["clientId"].as_str().unwrap().to_string();
    let app_oid = app["properties"]["principalId"]
        .as_str()
        .unwrap()
        .to_string();
    let other_cid = other["properties"]["clientId"]
        .as_str()
        .unwrap()
        .to_string();
    let subject = "system:serviceaccount:app:web";
    arm.put(
        &format!("{ids}/app/federatedIdentityCredentials/web?{MSI_API}"),
        &json!({"properties": {"issuer": issuer, "subject": subject, "audiences": [AUDIENCE]}}),
    )
    .await;

    // the pod's projected token, and the proxy with the pod's environment
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, sign(&key, &issuer, subject, AUDIENCE)).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["wi-proxy", "serve", "--port", "0"])
        .env("AZURE_CLIENT_ID", &app_cid)
        .env("AZURE_TENANT_ID", &tenant)
        .env("AZURE_AUTHORITY_HOST", format!("{server}/"))
        .env("AZURE_FEDERATED_TOKEN_FILE", &token_file)
        .env("KEYLESS_CA_FILE", &ca);
    let proxy = spawn_command_until(cmd, "wi-proxy: listening on http://127.0.0.1:", dir.path())
        .expect("wi-proxy serve");
    let port: u16 = proxy
        .find("wi-proxy: listening on http://127.0.0.1:")
        .unwrap()
        .parse()
        .unwrap();

    let r = http()
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await.unwrap().trim(), "ok");

    // the identity's token, IMDS's shape (every value a string)
    let resource = "https://vault.azure.net";
    let (st, body) = proxy_get(port, &format!("api-version=2018-02-01&resource={resource}")).await;
    assert_eq!(st, 200, "{body}");
    for k in [
        "access_token",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    ] {
        assert!(body[k].is_string(), "{k} is not a string: {body}");
    }
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["resource"], resource);
    let expires_in: u64 = body["expires_in"].as_str().unwrap().parse().unwrap();
    assert!(expires_in > 0);
    let access = body["access_token"].as_str().unwrap().to_string();
    let cl = claims(&access);
    assert_eq!(cl["oid"], app_oid.as_str(), "{cl}");
    assert_eq!(cl["appid"], app_cid.as_str(), "{cl}");
    assert_eq!(cl["aud"], resource, "{cl}");
    let jwks: Value = c
        .get(format!("{server}/{tenant}/discovery/v2.0/keys"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(verifies(&access, &jwks), "signed by Keyless");
    // cached: the same token again (path spelled as IMDS clients may)
    let r = http()
        .get(format!(
            "http://127.0.0.1:{port}/METADATA/identity/oauth2/TOKEN?api-version=2018-02-01&resource={resource}&client_id={app_cid}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["access_token"], access.as_str());

    // refusals before any exchange
    let (st, body) = proxy_get(port, "api-version=2018-02-01").await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"], "invalid_request");
    let (st, body) = proxy_get(
        port,
        &format!("api-version=2018-02-01&resource={resource}&msi_res_id={ids}/app"),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("msi_res_id"));
    let (st, body) = proxy_get(
        port,
        &format!("api-version=2018-02-01&resource={resource}&object_id={app_oid}"),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    // the node's identity endpoints are not forwarded to IMDS
    let r = http()
        .get(format!(
            "http://127.0.0.1:{port}/metadata/identity/info?api-version=2018-02-01"
        ))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // an exchange Keyless refuses (no credential of `other` trusts the token) comes back with
    // the token endpoint's own status and error
    let assertion = std::fs::read_to_string(&token_file).unwrap();
    let direct = c
        .post(format!("{server}/{tenant}/oauth2/v2.0/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", other_cid.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
            ("scope", &format!("{resource}/.default")),
        ])
        .send()
        .await
        .unwrap();
    let direct_status = direct.status().as_u16();
    let direct_body: Value = direct.json().await.unwrap();
    assert!((400..500).contains(&direct_status), "{direct_body}");
    let (st, body) = proxy_get(
        port,
        &format!("api-version=2018-02-01&resource={resource}&client_id={other_cid}"),
    )
    .await;
    assert_eq!(st, direct_status, "{body}");
    assert_eq!(body["error"], direct_body["error"], "{body}");
    assert_eq!(body["error_codes"], direct_body["error_codes"], "{body}");
    // the same text up to its trace / correlation ids
    let head = |v: &Value| {
        v["error_description"]
            .as_str()
            .unwrap_or_default()
            .split(" Trace ID")
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(head(&body), head(&direct_body));
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("AADSTS7002"),
        "{body}"
    );

    // the token file is read at each exchange: a token for another service account is
    // refused for a resource not cached yet, the right one works again
    std::fs::write(
        &token_file,
        sign(&key, &issuer, "system:serviceaccount:app:other", AUDIENCE),
    )
    .unwrap();
    let (st, body) = proxy_get(
        port,
        "api-version=2018-02-01&resource=https://management.azure.com/",
    )
    .await;
    assert!((400..500).contains(&st), "{st} {body}");
    assert!(body["error"].is_string(), "{body}");
    std::fs::write(&token_file, sign(&key, &issuer, subject, AUDIENCE)).unwrap();
    let (st, body) = proxy_get(
        port,
        "api-version=2018-02-01&resource=https://management.azure.com/",
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        claims(body["access_token"].as_str().unwrap())["aud"],
        "https://management.azure.com/"
    );
    drop(proxy);
}

// ------------------------------------------------------------------ forwarding to IMDS

/// One request as the stub IMDS read it off the wire.
#[derive(Debug, Clone)]
struct Seen {
    request_line: String,
    /// (lower-cased name, value), in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The stub IMDS's answer to `path`: `/metadata/instance…` → 200 with a compute document,
/// `/metadata/scheduledevents…` → 200 echoing the body, anything else → IMDS's 400.
fn stub_answer(path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    if path.starts_with("/metadata/instance") {
        let doc = json!({"compute": {"vmId": "00000000-0000-0000-0000-00000000abcd",
            "location": "local", "name": "stub-vm"}});
        (200, doc.to_string().into_bytes())
    } else if path.starts_with("/metadata/scheduledevents") {
        (200, body.to_vec())
    } else {
        let e = json!({"error": "Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds",
            "newest-versions": ["2023-07-01"]});
        (400, e.to_string().into_bytes())
    }
}

/// A stub IMDS on 127.0.0.1:0: records each request, answers [`stub_answer`], one request per
/// connection. Stops with the returned task.
async fn stub_imds() -> (u16, Arc<Mutex<Vec<Seen>>>, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(vec![]));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = vec![];
                let mut chunk = [0u8; 4096];
                let end = loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let mut lines = head.split("\r\n");
                let request_line = lines.next().unwrap_or_default().to_string();
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < end + len {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = buf[end..end + len].to_vec();
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let (status, answer) = stub_answer(&path, &body);
                record.lock().unwrap().push(Seen {
                    request_line,
                    headers,
                    body,
                });
                let reason = if status == 200 { "OK" } else { "Bad Request" };
                let mut out = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\nX-Stub: imds\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    answer.len()
                )
                .into_bytes();
                out.extend_from_slice(&answer);
                let _ = s.write_all(&out).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (port, seen, task)
}

/// `wi-proxy serve --port 0 --imds-upstream UPSTREAM` whose token endpoint is unreachable;
/// (the process, its port).
fn proxy_to(upstream: &str, dir: &std::path::Path) -> (Proc, u16) {
    let token = dir.join("token");
    std::fs::write(&token, "a.b.c").unwrap();
    let mut cmd = Command::new(bin());
    cmd.args([
        "wi-proxy",
        "serve",
        "--port",
        "0",
        "--imds-upstream",
        upstream,
    ])
    .env("AZURE_CLIENT_ID", "00000000-0000-0000-0000-000000000001")
    .env("AZURE_TENANT_ID", "t")
    .env("AZURE_AUTHORITY_HOST", "http://127.0.0.1:1/")
    .env("AZURE_FEDERATED_TOKEN_FILE", &token)
    .env_remove("KEYLESS_CA_FILE");
    let marker = "wi-proxy: listening on http://127.0.0.1:";
    let proc = spawn_command_until(cmd, marker, dir).expect("wi-proxy serve");
    let port = proc.find(marker).unwrap().parse().unwrap();
    (proc, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_forwards_other_paths_to_imds() {
    let dir = tempfile::tempdir().unwrap();
    let (imds_port, seen, stub) = stub_imds().await;
    let (proxy, port) = proxy_to(&format!("http://127.0.0.1:{imds_port}"), dir.path());
    let base = format!("http://127.0.0.1:{port}");
    let count = || seen.lock().unwrap().len();

    // GET with a query and IMDS's headers: reaches IMDS as sent; IMDS's answer comes back
    let r = http()
        .get(format!(
            "{base}/metadata/instance/compute?api-version=2021-02-01&format=json"
        ))
        .header("Metadata", "true")
        .header("x-ms-client-request-id", "req-1")
        .header("Connection", "keep-alive, x-hop")
        .header("x-hop", "not forwarded")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers().get("x-stub").and_then(|v| v.to_str().ok()),
        Some("imds")
    );
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json; charset=utf-8")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["compute"]["name"], "stub-vm", "{body}");
    assert_eq!(count(), 1);
    let got = seen.lock().unwrap()[0].clone();
    assert_eq!(
        got.request_line,
        "GET /metadata/instance/compute?api-version=2021-02-01&format=json HTTP/1.1"
    );
    assert_eq!(got.header("metadata"), ["true"], "{got:?}");
    assert_eq!(got.header("x-ms-client-request-id"), ["req-1"], "{got:?}");
    assert_eq!(
        got.header("host"),
        [format!("127.0.0.1:{imds_port}").as_str()],
        "{got:?}"
    );
    assert!(got.header("x-hop").is_empty(), "{got:?}");
    assert_eq!(got.header("x-keyless-wi-proxy-forwarded"), ["1"], "{got:?}");
    assert!(got.header("x-forwarded-for").is_empty(), "IMDS refuses it");

    // POST with a body: method and body as sent
    let events = json!({"StartRequests": [{"EventId": "e-1"}]});
    let r = http()
        .post(format!(
            "{base}/metadata/scheduledevents?api-version=2020-07-01"
        ))
        .header("Metadata", "true")
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), events);
    let got = seen.lock().unwrap()[1].clone();
    assert_eq!(
        got.request_line,
        "POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1"
    );
    assert_eq!(serde_json::from_slice::<Value>(&got.body).unwrap(), events);
    assert_eq!(got.header("content-type"), ["application/json"]);

    // IMDS's refusal comes back as it is
    let r = http()
        .get(format!("{base}/metadata/versions"))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::from_slice::<Value>(&stub_answer("/x", b"").1).unwrap()
    );
    assert_eq!(count(), 3);

    // not forwarded: the token route, /readyz, the node's identity endpoints
    let (st, body) = proxy_get(port, "api-version=2018-02-01").await;
    assert_eq!(st, 400, "{body}");
    let r = http().get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    for path in [
        "/metadata/identity/info?api-version=2018-02-01",
        "/Metadata/Identity/oauth2/token/?resource=https://vault.azure.net",
        "/metadata//identity/oauth2/token?resource=https://vault.azure.net",
        "/metadata/%69dentity/oauth2/token?resource=https://vault.azure.net",
    ] {
        let r = http()
            .get(format!("{base}{path}"))
            .header("Metadata", "true")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404, "{path}");
    }
    assert_eq!(count(), 3, "nothing more reached IMDS");

    // IMDS not reachable: 502, IMDS's error shape
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (dead, dead_port) = proxy_to(&format!("http://127.0.0.1:{closed}"), dir.path());
    let r = http()
        .get(format!(
            "http://127.0.0.1:{dead_port}/metadata/instance?api-version=2021-02-01"
        ))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "bad_gateway", "{body}");
    assert!(body["error_description"].is_string(), "{body}");
    drop((dead, proxy));
    stub.abort();
}

// ------------------------------------------------------------------ init (root)

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `ip netns exec NS curl …`: (status code, body); status 0 when nothing answered.
fn curl_in(prefix: &[&str], url: &str, max_secs: &str) -> (u16, String) {
    let out = Command::new(prefix[0])
        .args(&prefix[1..])
        .args([
            "curl",
            "-s",
            "--noproxy",
            "*",
            "-m",
            max_secs,
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .expect("curl");
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = s.rsplit_once('\n').unwrap_or(("", &s));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn init_redirects_the_namespace_to_the_proxy() {
    if let Some(why) = keyless_k8s::testing::missing_prerequisite(&[
        "ip",
        "iptables",
        "iptables-restore",
        "curl",
        "setpriv",
    ]) {
        assert!(std::env::var_os("CI").is_none(), "wi-proxy init: {why}");
        eprintln!("SKIPPED wi-proxy init: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let name = format!(
        "wip-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    sh(&["ip", "netns", "add", &name]);
    let ns = Netns(name.clone());
    // a pod's plumbing: loopback and an interface with a default route (a connection to
    // 169.254.169.254 needs a route before the nat table sees it)
    let n = |args: &[&str]| {
        let mut v = vec!["ip", "-n", &ns.0];
        v.extend_from_slice(args);
        sh(&v);
    };
    n(&["link", "set", "lo", "up"]);
    n(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    n(&["addr", "add", "10.93.0.2/24", "dev", "eth0"]);
    n(&["link", "set", "eth0", "up"]);
    n(&["link", "set", "peer0", "up"]);
    n(&["route", "add", "default", "via", "10.93.0.1", "dev", "eth0"]);
    let exec = ["ip", "netns", "exec", name.as_str()];
    let port = "18123";

    // twice: the second run finds everything in place
    for _ in 0..2 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                bin(),
                "wi-proxy",
                "init",
                "--proxy-port",
                port,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listing = |chain: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &name, "iptables", "-t", "nat", "-S", chain])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let output = listing("OUTPUT");
    assert_eq!(
        output.matches("-j AZWI-PROXY").count(),
        1,
        "one jump after two runs:\n{output}"
    );
    assert!(
        output.contains("-A OUTPUT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j AZWI-PROXY"),
        "{output}"
    );
    let chain = listing("AZWI-PROXY");
    assert!(chain.contains("--uid-owner 1501 -j ACCEPT"), "{chain}");
    assert!(
        chain.contains(&format!("-j REDIRECT --to-ports {port}")),
        "{chain}"
    );

    // nothing listens yet: the redirected connection is refused (not the node's IMDS)
    let (st, _) = curl_in(&exec, "http://169.254.169.254/readyz", "5");
    assert_eq!(st, 0);

    // the proxy in the namespace; its token endpoint is unreachable on purpose
    let token = dir.path().join("token");
    std::fs::write(&token, "a.b.c").unwrap();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &name,
        bin(),
        "wi-proxy",
        "serve",
        "--port",
        port,
    ])
    .env("AZURE_CLIENT_ID", "00000000-0000-0000-0000-000000000001")
    .env("AZURE_TENANT_ID", "t")
    .env("AZURE_AUTHORITY_HOST", "http://127.0.0.1:1/")
    .env("AZURE_FEDERATED_TOKEN_FILE", &token)
    .env_remove("KEYLESS_CA_FILE");
    let proxy = spawn_command_until(cmd, "wi-proxy: listening on", dir.path()).expect("proxy");
    let (st, body) = curl_in(&exec, "http://169.254.169.254/readyz", "10");
    assert_eq!((st, body.trim()), (200, "ok"));
    // an IMDS token request reaches the proxy's token handler (which cannot exchange here)
    let (st, body) = curl_in(
        &exec,
        "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net",
        "10",
    );
    assert_eq!(st, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "service_unavailable");
    // another IMDS path is forwarded to 169.254.169.254; this proxy runs as root, not as the
    // exempt UID, so its own connection is redirected back to it: refused as a loop (508),
    // not forwarded again
    let (st, body) = curl_in(
        &exec,
        "http://169.254.169.254/metadata/instance?api-version=2021-02-01",
        "10",
    );
    assert_eq!(st, 508, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "loop_detected");
    // the proxy's own UID is not redirected: its connection goes out the (dead) route
    let as_proxy = [
        "ip",
        "netns",
        "exec",
        name.as_str(),
        "setpriv",
        "--reuid",
        "1501",
        "--regid",
        "1501",
        "--clear-groups",
    ];
    let (st, _) = curl_in(&as_proxy, "http://169.254.169.254/readyz", "2");
    assert_eq!(st, 0, "uid 1501 must not reach the proxy");
    // the root namespace is untouched
    let root = Command::new("iptables")
        .args(["-t", "nat", "-S", "OUTPUT"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&root.stdout).contains("AZWI-PROXY"));
    drop(proxy);
    drop(ns);
}
