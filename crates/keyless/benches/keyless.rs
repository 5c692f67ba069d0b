//! `cargo bench -p keyless --bench keyless`: throughput of the hot paths, each beside a
//! baseline measured in the same run on the same machine (these machines are noisy, so the
//! ratios are the figures to compare across runs):
//!
//! - cached managed-identity tokens at each of the host agent's local endpoint styles — IMDS,
//!   App Service (`/MSI/token` with `X-IDENTITY-HEADER`) and the legacy VM-extension endpoint
//!   (`/oauth2/token`, served while the VM carries the `Microsoft.ManagedIdentity` extension) —
//!   each vs a bare hyper server answering that style's response body (same load generator,
//!   same connections);
//! - Arc token round trips with the token cached: a request without a key (401 naming a fresh
//!   key file, written and fsynced), a read of the file, and the keyed request, sequentially on
//!   each connection — two requests, a file write + fsync and an unlink per token — vs the same
//!   kind of bare server, with the time per round trip split by phase;
//! - fresh RS256 tokens at the token service (client-credentials grant over HTTPS keep-alive),
//!   vs raw RS256 signatures/s with aws-lc-rs on as many threads as the server has;
//! - user-assigned identities created per second through the HTTPS control plane (each an
//!   authorized ARM PUT), vs direct inserts into the same embedded store;
//! - the cost of one authorization check with 10,000 role assignments stored;
//! - Key Vault secret GETs/s through the HTTPS listener (token verified, access policy checked,
//!   value unsealed), vs a bare hyper + rustls server answering a same-size body with the same
//!   certificate type (same load generator, same connections);
//! - Key Vault certificates created per second (Self issuer, RSA-2048; each a key generation,
//!   a self-signed certificate, a PFX and three sealed rows; done when the pending operation
//!   says `completed`), vs raw RSA-2048 key generations/s on as many threads as the server has.
//!
//! The two goal rows (cached IMDS vs bare hyper, Key Vault GETs vs bare HTTPS) are measured in
//! `BENCH_ROUNDS` alternating pairs (3) and report the median pair. `BENCH_IMDS_ONLY=1`
//! measures the first row alone, for profiling.
//!
//! - the identity and secret GET rows again on a real PostgreSQL (`keyless_store::testing`),
//!   each as a ratio to its SQLite row: one server in this process as the SQLite one, then
//!   `keyless server` processes on one database — replica A alone, and A and B together with
//!   half the connections each ("two replicas / one"); see `postgres/mod.rs`.
//!
//! Environment: BENCH_SECS (default 5), BENCH_CONNS (default 16), BENCH_VM_USER_IDENTITIES
//! (user-assigned identities on the bench VM besides its system-assigned one, default 0),
//! BENCH_POSTGRES (0 skips the PostgreSQL rows; they are skipped too when PostgreSQL is not
//! installed — KEYLESS_PG_BIN names its bin directory).

mod common;
mod postgres;

use common::*;
use keyless_core::clock::SystemClock;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Time spent per phase of the Arc round trips, in nanoseconds summed over all connections.
#[derive(Default)]
struct ArcPhases {
    challenge: AtomicU64,
    key_read: AtomicU64,
    keyed: AtomicU64,
}

/// Arc token round trips: on each of `conns` keep-alive connections, for `secs`, a request
/// without a key (401 naming a fresh key file), a read of that file, and the same request
/// with `Authorization: Basic <content>` (200). `request(extra)` renders the request with
/// extra header lines. Returns round trips/s and where their time went.
async fn arc_round_trips(
    addr: SocketAddr,
    request: impl Fn(&str) -> String,
    conns: usize,
    secs: u64,
) -> (f64, Arc<ArcPhases>) {
    let done = Arc::new(AtomicU64::new(0));
    let phases = Arc::new(ArcPhases::default());
    let stop = Instant::now() + Duration::from_secs(secs);
    let challenge = request("");
    let mut tasks = vec![];
    for _ in 0..conns {
        let (done, phases, challenge) = (done.clone(), phases.clone(), challenge.clone());
        let keyed = request("Authorization: Basic {key}\r\n");
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).ok();
            let mut buf = vec![0u8; 64 * 1024];
            while Instant::now() < stop {
                let t0 = Instant::now();
                s.write_all(challenge.as_bytes()).await.expect("write");
                let (head, _) = read_response(&mut s, &mut buf).await;
                assert!(head.starts_with("HTTP/1.1 401"), "{head}");
                let path = header(&head, "www-authenticate")
                    .and_then(|v| v.strip_prefix("Basic realm="))
                    .expect("WWW-Authenticate: Basic realm=<key file>")
                    .to_string();
                let t1 = Instant::now();
                // as a client does: a plain blocking read of a small file
                let key = std::fs::read_to_string(&path).expect("key file");
                let t2 = Instant::now();
                s.write_all(keyed.replace("{key}", &key).as_bytes())
                    .await
                    .expect("write");
                let (head, _) = read_response(&mut s, &mut buf).await;
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                let t3 = Instant::now();
                let ns = |a: Instant, b: Instant| (b - a).as_nanos() as u64;
                phases.challenge.fetch_add(ns(t0, t1), Ordering::Relaxed);
                phases.key_read.fetch_add(ns(t1, t2), Ordering::Relaxed);
                phases.keyed.fetch_add(ns(t2, t3), Ordering::Relaxed);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("Arc load task");
    }
    (done.load(Ordering::Relaxed) as f64 / secs as f64, phases)
}

/// A client-credentials token request for the bootstrap admin (`scope`: `{resource}/.default`).
fn token_request(
    client: &reqwest::Client,
    url: &str,
    admin: &keyless_server::AdminCredential,
    scope: &str,
) -> reqwest::RequestBuilder {
    client.post(url).form(&[
        ("grant_type", "client_credentials"),
        ("client_id", admin.client_id.as_str()),
        ("client_secret", admin.client_secret.as_str()),
        ("scope", scope),
    ])
}

const ARM_SCOPE: &str = "https://management.azure.com/.default";

/// Raw RSA-2048 key generations/s on `threads` threads (what a certificate creation starts with).
fn raw_rsa_keygens(threads: usize, secs: u64) -> f64 {
    use keyless_pki::kv::{KeyType, KvKey};
    let total = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let stop = t0 + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let total = total.clone();
            s.spawn(move || {
                while Instant::now() < stop {
                    KvKey::generate(KeyType::Rsa { bits: 2048 }).unwrap();
                    total.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    // the last generation on each thread overruns `stop`: divide by the time actually taken
    total.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

/// Raw Arc-style key files/s on `threads` threads in `dir`: create (0640), write 64 hex bytes,
/// fsync when `sync`, unlink — the file work of one Arc token without the HTTP.
fn raw_key_files(dir: &std::path::Path, threads: usize, secs: u64, sync: bool) -> f64 {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let total = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let stop = t0 + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for t in 0..threads {
            let total = total.clone();
            s.spawn(move || {
                let mut n = 0u64;
                while Instant::now() < stop {
                    let path = dir.join(format!("raw-{t}-{n}.key"));
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o640)
                        .open(&path)
                        .unwrap();
                    f.write_all(&[b'a'; 64]).unwrap();
                    if sync {
                        f.sync_all().unwrap();
                    }
                    drop(f);
                    std::fs::remove_file(&path).unwrap();
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    total.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
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
        let clock = Arc::new(SystemClock::new());
        // A second Keyless stands in for an external OIDC issuer (its own tenant, keys and CA).
        let (issuer_dir, issuer) = start_server(None).await;
        let (dir, srv) = start_server(Some(issuer.state.ca.cert_pem())).await;
        let _keep = issuer_dir;
        let s = srv.state.clone();
        let admin = srv.bootstrap.new_admin.clone().unwrap();
        // a VM with a system identity, and an agent joined to it
        use keyless_core::resource_id::{ResourceId, VM};
        use keyless_server::resources;
        let mut tx = s.store.write("bench_setup").await.unwrap();
        resources::put_resource_group(&s, &mut tx, &s.subscription_id, "bench", Some("local"), None).await.unwrap();
        let vm = ResourceId::new(&s.subscription_id, "bench", VM, "bench-vm");
        // BENCH_VM_USER_IDENTITIES user-assigned identities on the VM besides its system one
        // (the decision point must cost the same with 1 or 1,000), assigned 150 per request
        let vm_user_ids = env_u64("BENCH_VM_USER_IDENTITIES", 0);
        let mut user_assigned = vec![];
        for n in 0..vm_user_ids {
            let id = ResourceId::new(&s.subscription_id, "bench", keyless_core::resource_id::UAMI, &format!("vm-user-{n}"));
            let (rec, _) = resources::put_identity(&s, &mut tx, &id, Some("local"), None).await.unwrap();
            user_assigned.push(rec.resource_id);
        }
        let mut batches: Vec<Option<std::collections::BTreeMap<String, serde_json::Value>>> =
            user_assigned.chunks(150).map(|c| Some(c.iter().map(|r| (r.clone(), serde_json::json!({}))).collect())).collect();
        if batches.is_empty() {
            batches.push(None);
        }
        for (i, user_assigned) in batches.into_iter().enumerate() {
            let kind = if user_assigned.is_some() { "SystemAssigned, UserAssigned" } else { "SystemAssigned" };
            resources::write_vm(
                &s,
                &mut tx,
                &vm,
                resources::VmBody {
                    location: Some("local".into()),
                    identity: Some(resources::IdentityBody { kind: Some(kind.into()), user_assigned }),
                    ..Default::default()
                },
                i > 0,
                &resources::LinkCheck::Trusted,
            )
            .await
            .unwrap();
        }
        // the managed-identity VM extension on a free port, so the agent serves the legacy
        // VM-extension endpoint from its first sync
        let extension_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        keyless_server::batch::put_vm_extension(
            &s,
            &mut tx,
            &vm,
            "ManagedIdentityExtensionForLinux",
            &serde_json::json!({"properties": {
                "publisher": "Microsoft.ManagedIdentity",
                "type": "ManagedIdentityExtensionForLinux",
                "typeHandlerVersion": "1.0",
                "settings": {"port": extension_port},
            }}),
        )
        .await
        .unwrap();
        let arc_dir = tempfile::tempdir().unwrap();
        let (join, _) = resources::create_join_token(&s, &mut tx, &vm, 60).await.unwrap();
        tx.commit().await.unwrap();
        let server_url = format!("https://localhost:{}", srv.local_addr.port());
        let node = keyless_node::start(
            keyless_node::NodeConfig {
                server_urls: vec![server_url.clone()],
                ca_pem: s.ca.cert_pem(),
                state_dir: dir.path().join("node"),
                join_token: Some(join),
                imds_listen: "127.0.0.1:0".parse().unwrap(),
                sync_interval: Duration::from_secs(30),
                private_ip: None,
                extension_reload_hook: None,
                local: keyless_node::local::LocalConfig {
                    extension: true,
                    app_service: Some("127.0.0.1:0".parse().unwrap()),
                    arc: Some("127.0.0.1:0".parse().unwrap()),
                    arc_token_dir: arc_dir.path().join("tokens"),
                    arc_group: None,
                },
                extension_store_root: std::path::PathBuf::from("/var/lib/waagent"),
                nmi: None,
                // the bench hammers IMDS from one caller
                fair_share: keyless_node::FairShareConfig::off(),
                // every token recorded, as in production; KEYLESS_BENCH_NO_AUDIT=1 to compare
                audit: if std::env::var_os("KEYLESS_BENCH_NO_AUDIT").is_some() {
                    keyless_ops::audit::Audit::disabled()
                } else {
                    keyless_ops::audit::Audit::open(&dir.path().join("audit.log")).unwrap()
                },
            },
            clock,
        )
        .await
        .unwrap();

        // ---- cached tokens at the agent vs a bare hyper server with the same body
        let path = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/";
        let warm = reqwest::Client::builder().no_proxy().build().unwrap();
        let body = warm
            .get(format!("http://{}{}", node.imds_addr, path))
            .header("Metadata", "true")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(body.contains("access_token"), "{body}");
        let bare = bare_server(body.clone(), None).await;
        let req = |host: SocketAddr| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nMetadata: true\r\n\r\n");
        let (bare_rps, agent_rps, imds_ratios) = paired(
            || load_get(bare, req(bare), conns, secs, None),
            || load_get(node.imds_addr, req(node.imds_addr), conns, secs, None),
        )
        .await;
        if std::env::var_os("BENCH_IMDS_ONLY").is_some() {
            // the first row alone, for profiling it
            println!("  bare hyper server, same {} B body:  {bare_rps:>10.0} req/s", body.len());
            println!("  agent IMDS, cached token:           {agent_rps:>10.0} req/s   ratio to bare {:.2}{}", agent_rps / bare_rps, rounds_note(&imds_ratios));
            return;
        }

        // ---- the same at the other local endpoint styles, each beside a bare hyper server
        // answering that style's response body
        let style_vs_bare = |addr: SocketAddr, request: String| async move {
            // warm-up (the cache is the one IMDS filled: same identity, same resource), and the
            // style's real response body
            let (head, body) = get_once(addr, &request).await;
            assert!(head.starts_with("HTTP/1.1 200") && body.contains("access_token"), "{head}\n{body}");
            let bare = bare_server(body.clone(), None).await;
            let bare_rps = load_get(bare, request.clone(), conns, secs, None).await;
            let rps = load_get(addr, request, conns, secs, None).await;
            (body.len(), bare_rps, rps)
        };
        let app_service = node.app_service_addr.unwrap();
        let identity_header = std::fs::read_to_string(node.identity_header_file.as_ref().unwrap()).unwrap();
        let (app_len, app_bare_rps, app_rps) = style_vs_bare(
            app_service,
            format!(
                "GET /MSI/token?api-version=2019-08-01&resource=https://management.azure.com/ HTTP/1.1\r\nHost: {app_service}\r\nX-IDENTITY-HEADER: {identity_header}\r\n\r\n"
            ),
        )
        .await;
        let extension = node.agent.extension_endpoint.addr().expect("VM-extension endpoint listening");
        assert_eq!(extension.port(), extension_port);
        let (ext_len, ext_bare_rps, ext_rps) = style_vs_bare(
            extension,
            format!("GET /oauth2/token?resource=https://management.azure.com/ HTTP/1.1\r\nHost: {extension}\r\nMetadata: true\r\n\r\n"),
        )
        .await;
        // Arc: every token costs a challenge (401 and a fresh key file, written and fsynced)
        // and a keyed request, whatever the cache holds
        let arc = node.arc_addr.unwrap();
        let arc_request = move |extra: &str| {
            format!(
                "GET /metadata/identity/oauth2/token?api-version=2020-06-01&resource=https://management.azure.com/ HTTP/1.1\r\nHost: {arc}\r\nMetadata: true\r\n{extra}\r\n"
            )
        };
        let arc_body = {
            let (head, _) = get_once(arc, &arc_request("")).await;
            let path = header(&head, "www-authenticate").and_then(|v| v.strip_prefix("Basic realm=")).expect(&head).to_string();
            assert!(path.starts_with(&arc_dir.path().display().to_string()), "{path}");
            let key = std::fs::read_to_string(&path).unwrap();
            let (head, body) = get_once(arc, &arc_request(&format!("Authorization: Basic {key}\r\n"))).await;
            assert!(head.starts_with("HTTP/1.1 200") && body.contains("access_token"), "{head}\n{body}");
            body
        };
        let arc_bare = bare_server(arc_body.clone(), None).await;
        let arc_bare_rps = load_get(arc_bare, arc_request(""), conns, secs, None).await;
        let (arc_rps, arc_phases) = arc_round_trips(arc, arc_request, conns, secs).await;
        let arc_us = |t: &AtomicU64| t.load(Ordering::Relaxed) as f64 / 1e3 / (arc_rps * secs as f64);
        let (arc_challenge_us, arc_read_us, arc_keyed_us) =
            (arc_us(&arc_phases.challenge), arc_us(&arc_phases.key_read), arc_us(&arc_phases.keyed));
        // each keyed request removed its key file
        assert_eq!(std::fs::read_dir(arc_dir.path().join("tokens")).unwrap().count(), 0);
        // where an Arc token's time goes: the same file work without HTTP, in the same directory
        let raw_dir = arc_dir.path().join("tokens");
        let (raw_keys_sync, raw_keys_nosync) = tokio::task::spawn_blocking(move || {
            (raw_key_files(&raw_dir, threads, secs, true), raw_key_files(&raw_dir, threads, secs, false))
        })
        .await
        .unwrap();

        // ---- fresh RS256 tokens at the token service vs raw signatures
        let raw = tokio::task::spawn_blocking(move || raw_rs256(threads, secs)).await.unwrap();
        let pem = s.ca.cert_pem();
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()])
            .build()
            .unwrap();
        let url = format!("{server_url}/{}/oauth2/v2.0/token", s.tenant_id);
        let done = Arc::new(AtomicU64::new(0));
        let stop = Instant::now() + Duration::from_secs(secs);
        let mut tasks = vec![];
        for _ in 0..conns {
            let (client, url, done, admin) = (client.clone(), url.clone(), done.clone(), admin.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    let r = token_request(&client, &url, &admin, ARM_SCOPE)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    let _ = r.bytes().await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let sts = done.load(Ordering::Relaxed) as f64 / secs as f64;

        // ---- identities created per second through the control plane vs direct store inserts
        let arm_token = {
            let r = token_request(&client, &url, &admin, ARM_SCOPE)
                .send()
                .await
                .unwrap();
            r.json::<serde_json::Value>().await.unwrap()["access_token"].as_str().unwrap().to_string()
        };
        let http_ids =
            postgres::create_identities(&client, std::slice::from_ref(&server_url), &s.subscription_id, &arm_token, "id", conns, secs).await;
        let store_ids = {
            let st = s.clone();
            let stop = Instant::now() + Duration::from_secs(secs);
            let mut n = 0u64;
            while Instant::now() < stop {
                let rid = format!("/subscriptions/{}/resourceGroups/bench/providers/Microsoft.ManagedIdentity/userAssignedIdentities/direct-{n}", st.subscription_id);
                let mut tx = st.store.write("bench_put_identity").await.unwrap();
                tx.put_identity(&keyless_store::IdentityRecord {
                    key: rid.to_lowercase(),
                    resource_id: rid,
                    name: format!("direct-{n}"),
                    subscription: st.subscription_id.clone(),
                    resource_group: "bench".into(),
                    location: "local".into(),
                    tags: Default::default(),
                    tenant_id: st.tenant_id.clone(),
                    principal_id: uuid::Uuid::new_v4().to_string(),
                    client_id: uuid::Uuid::new_v4().to_string(),
                    system_vm: None,
                    created: 0,
                })
                .await
                .unwrap();
                tx.commit().await.unwrap();
                n += 1;
            }
            n as f64 / secs as f64
        };

        // ---- one authorization check with 10,000 role assignments stored
        let admin_oid = {
            let mut tx = s.store.read("bench").await.unwrap();
            tx.get_service_principal(&admin.client_id).await.unwrap().unwrap().object_id
        };
        let reader = keyless_core::rbac::role_by_name("Reader").unwrap().id;
        let st = s.clone();
        let (check_us, checks_per_s) = {
            let mut tx = st.store.write("bench_role_assignments").await.unwrap();
            for i in 0..10_000u32 {
                // most belong to other principals; 20 to the caller, at other groups
                let principal = if i % 500 == 0 { admin_oid.clone() } else { uuid::Uuid::new_v4().to_string() };
                tx.insert_role_assignment(&keyless_store::RoleAssignmentRecord {
                    name: uuid::Uuid::new_v4().to_string(),
                    scope: format!("/subscriptions/{}/resourceGroups/g{i}", st.subscription_id),
                    role_definition_id: format!("/providers/Microsoft.Authorization/roleDefinitions/{reader}"),
                    principal_id: principal,
                    principal_type: "ServicePrincipal".into(),
                    description: None,
                    created: 0,
                    created_by: "bench".into(),
                })
                .await
                .unwrap();
            }
            tx.commit().await.unwrap();
            let scope = format!("/subscriptions/{}/resourceGroups/bench/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x", st.subscription_id);
            let n = 20_000u32;
            // one read unit of work per check, as a request does
            let t0 = Instant::now();
            for _ in 0..n {
                let mut tx = st.store.read("bench_authz").await.unwrap();
                assert!(keyless_server::authz::permitted(&mut tx, &admin_oid, "Microsoft.ManagedIdentity/userAssignedIdentities/write", &scope).await.unwrap());
            }
            let el = t0.elapsed().as_secs_f64();
            (el / n as f64 * 1e6, n as f64 / el)
        };

        // ---- workload identity federation: exchanges/s with the issuer's JWKS cached
        let issuer_url = format!("https://localhost:{}", issuer.local_addr.port());
        let issuer_admin = issuer.bootstrap.new_admin.clone().unwrap();
        let issuer_client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(issuer.state.ca.cert_pem().as_bytes()).unwrap()])
            .build()
            .unwrap();
        let assertion: serde_json::Value = issuer_client
            .post(format!("{issuer_url}/{}/oauth2/v2.0/token", issuer.state.tenant_id))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", issuer_admin.client_id.as_str()),
                ("client_secret", issuer_admin.client_secret.as_str()),
                ("scope", "api://AzureADTokenExchange/.default"),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let assertion = assertion["access_token"].as_str().unwrap().to_string();
        let issuer_oid = {
            let mut tx = issuer.state.store.read("bench").await.unwrap();
            tx.get_service_principal(&issuer_admin.client_id).await.unwrap().unwrap().object_id
        };
        let fed_id = ResourceId::new(&s.subscription_id, "bench", keyless_core::resource_id::UAMI, "federated");
        let mut tx = s.store.write("bench").await.unwrap();
        let (fed, _) = resources::put_identity(&s, &mut tx, &fed_id, Some("local"), None).await.unwrap();
        tx.lock_row("identities", "key", &fed.key).await.unwrap();
        tx
            .put_fic(
                &keyless_store::FicRecord {
                    identity_key: fed.key.clone(),
                    name: "bench-issuer".into(),
                    issuer: issuer.state.issuer_v1().to_string(),
                    subject: issuer_oid,
                    audiences: vec!["api://AzureADTokenExchange".into()],
                    description: None,
                    created: 0,
                },
                20,
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let (fed_url, fed_cid) = (url.clone(), fed.client_id.clone());
        let exchange = move |client: reqwest::Client| {
            let (url, assertion, cid) = (fed_url.clone(), assertion.clone(), fed_cid.clone());
            async move {
                let r = client
                    .post(&url)
                    .form(&[
                        ("grant_type", "client_credentials"),
                        ("client_id", cid.as_str()),
                        ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                        ("client_assertion", assertion.as_str()),
                        ("scope", "https://management.azure.com/.default"),
                    ])
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                let body = r.bytes().await.unwrap_or_default();
                assert_eq!(status, 200, "{body:?}");
            }
        };
        exchange(client.clone()).await; // fills the JWKS cache

        let exchanged = Arc::new(AtomicU64::new(0));
        let stop = Instant::now() + Duration::from_secs(secs);
        let mut tasks = vec![];
        for _ in 0..conns {
            let (client, exchanged, exchange) = (client.clone(), exchanged.clone(), exchange.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    exchange(client.clone()).await;
                    exchanged.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let fed_rate = exchanged.load(Ordering::Relaxed) as f64 / secs as f64;

        // ---- Key Vault: a vault whose access policy lets the bootstrap admin get and set
        // secrets and create and get certificates; a token for the vault audience
        use keyless_core::vault::access::{AccessPolicy, Permissions};
        use keyless_server::vaults::{put_vault, VaultBody, VaultProps};
        let port = srv.local_addr.port();
        let vault_host = format!("bench-kv.vault.localhost:{port}");
        let mut tx = s.store.write("bench_vault").await.unwrap();
        let kv_oid = tx.get_service_principal(&admin.client_id).await.unwrap().unwrap().object_id;
        let vault_id = ResourceId::new(&s.subscription_id, "bench", keyless_core::resource_id::VAULT, "bench-kv");
        put_vault(
            &s,
            &mut tx,
            &vault_id,
            VaultBody {
                location: Some("local".into()),
                properties: Some(VaultProps {
                    access_policies: Some(vec![AccessPolicy {
                        tenant_id: s.tenant_id.clone(),
                        object_id: kv_oid,
                        application_id: None,
                        permissions: Permissions {
                            secrets: vec!["get".into(), "set".into()],
                            certificates: vec!["create".into(), "get".into()],
                            ..Default::default()
                        },
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
            false,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let vault_token = {
            let scope = format!("https://vault.localhost:{port}/.default");
            let r = token_request(&client, &url, &admin, &scope).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["access_token"].as_str().unwrap().to_string()
        };
        // vault host names resolve to the server here (the certificate covers *.vault.localhost)
        let kv = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()])
            .resolve("bench-kv.vault.localhost", srv.local_addr)
            .build()
            .unwrap();
        let kv_base = format!("https://{vault_host}");

        // ---- secret GETs (authenticated, authorized by access policy, decrypted) vs a bare
        // HTTPS server with the same certificate type, body size and load generator
        let value = postgres::secret_value();
        let r = kv
            .put(format!("{kv_base}/secrets/bench?api-version=7.5"))
            .bearer_auth(&vault_token)
            .json(&serde_json::json!({ "value": value }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        let secret_path = postgres::SECRET_PATH;
        let bundle = kv.get(format!("{kv_base}{secret_path}")).bearer_auth(&vault_token).send().await.unwrap();
        assert_eq!(bundle.status(), 200);
        let bundle = bundle.text().await.unwrap();
        assert!(bundle.contains(&value), "{bundle}");
        let get_secret = format!("GET {secret_path} HTTP/1.1\r\nHost: {vault_host}\r\nAuthorization: Bearer {vault_token}\r\n\r\n");
        let client_tls = {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(rustls::pki_types::CertificateDer::from(s.ca.cert_der().to_vec())).unwrap();
            let cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            (tokio_rustls::TlsConnector::from(Arc::new(cfg)), ServerName::try_from("localhost").unwrap())
        };
        let bare_tls = {
            // an ECDSA P-256 leaf from the same CA, as the Keyless listener's, same server config
            let now = s.now();
            let (cert, key) = s.ca.issue_server_cert(&["localhost".into()], now, 86_400).unwrap();
            let cfg = keyless_pki::server_tls_config(vec![cert, s.ca.cert_der().to_vec()], &key, s.ca.cert_der()).unwrap();
            bare_server(bundle.clone(), Some(tokio_rustls::TlsAcceptor::from(cfg))).await
        };
        let (bare_https_rps, secret_rps, kv_ratios) = paired(
            || load_get(bare_tls, get_secret.clone(), conns, secs, Some(client_tls.clone())),
            || {
                // (a marker on stderr for a profiler to start at)
                eprintln!("bench phase: Key Vault secret GETs");
                load_get(srv.local_addr, get_secret.clone(), conns, secs, Some(client_tls.clone()))
            },
        )
        .await;

        // ---- certificate creations (Self issuer, RSA-2048: keygen + self-signed certificate +
        // PFX + three sealed rows), completion seen through the pending operation, vs raw keygens
        let keygens = tokio::task::spawn_blocking(move || raw_rsa_keygens(threads, secs)).await.unwrap();
        let cert_clients = 2 * threads;
        let certs_done = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let stop = t0 + Duration::from_secs(secs);
        let mut tasks = vec![];
        for t in 0..cert_clients {
            let (kv, base, token, certs_done) = (kv.clone(), kv_base.clone(), vault_token.clone(), certs_done.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0;
                while Instant::now() < stop {
                    let r = kv
                        .post(format!("{base}/certificates/c{t}-{i}/create?api-version=7.5"))
                        .bearer_auth(&token)
                        .json(&serde_json::json!({"policy": {"issuer": {"name": "Self"}, "x509_props": {"subject": "CN=bench"}}}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 202, "{:?}", r.text().await);
                    let _ = r.bytes().await;
                    loop {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let op: serde_json::Value = kv
                            .get(format!("{base}/certificates/c{t}-{i}/pending?api-version=7.5"))
                            .bearer_auth(&token)
                            .send()
                            .await
                            .unwrap()
                            .json()
                            .await
                            .unwrap();
                        match op["status"].as_str() {
                            Some("completed") => break,
                            Some("inProgress") => continue,
                            _ => panic!("certificate creation failed: {op}"),
                        }
                    }
                    certs_done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // every client finishes the creation it started before `stop`: count the time taken
        let cert_rate = certs_done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
        let stored = {
            let mut tx = s.store.read("bench").await.unwrap();
            tx.kv_names("bench-kv", "certificates", false).await.unwrap().len() as u64
        };
        assert_eq!(stored, certs_done.load(Ordering::Relaxed));

        // ---- the same two rows on PostgreSQL: one server in process, then one vs two replica
        // processes on one database (BENCH_POSTGRES=0 skips them)
        let pg = if env_u64("BENCH_POSTGRES", 1) == 0 {
            None
        } else {
            postgres::run(conns, secs).await
        };

        println!("keyless bench ({secs} s per run, {conns} connections, {threads} cores; load generator in the same process; {vm_user_ids} user-assigned identities on the VM)");
        println!("  bare hyper server, same {} B body:    {bare_rps:>10.0} req/s", body.len());
        println!("  agent IMDS, cached token:              {agent_rps:>10.0} req/s   ratio to bare {:.2}{}", agent_rps / bare_rps, rounds_note(&imds_ratios));
        println!("  bare hyper server, same {app_len} B body:    {app_bare_rps:>10.0} req/s");
        println!("  agent App Service, cached token:       {app_rps:>10.0} req/s   ratio to bare {:.2}", app_rps / app_bare_rps);
        println!("  bare hyper server, same {ext_len} B body:    {ext_bare_rps:>10.0} req/s");
        println!("  agent VM extension, cached token:      {ext_rps:>10.0} req/s   ratio to bare {:.2}", ext_rps / ext_bare_rps);
        println!("  bare hyper server, same {} B body:    {arc_bare_rps:>10.0} req/s", arc_body.len());
        println!("  agent Arc token round trips, cached:   {arc_rps:>10.0} /s       ratio to bare {:.2} (each 2 requests + a key file write + fsync)", arc_rps / arc_bare_rps);
        println!("    per round trip: challenge (401, key file written + fsynced) {arc_challenge_us:.0} µs, key file read {arc_read_us:.0} µs, keyed request {arc_keyed_us:.0} µs");
        println!("    raw key files in the same directory ({threads} threads; create, write, fsync, unlink): {raw_keys_sync:.0} /s; without fsync: {raw_keys_nosync:.0} /s");
        println!("  raw RS256 signs (aws-lc-rs, {threads} threads): {raw:>10.0} /s");
        println!("  token service, fresh RS256 tokens:     {sts:>10.0} tokens/s ratio to raw signs {:.2}", sts / raw);
        println!("  federated token exchanges (JWKS cached): {fed_rate:>8.0} /s       ratio to fresh client-credentials tokens {:.2}", fed_rate / sts);
        println!("  direct store inserts of identities:    {store_ids:>10.0} /s");
        println!("  identities created via HTTPS ARM PUT:  {http_ids:>10.0} /s       ratio to direct inserts {:.2}", http_ids / store_ids);
        println!("  bare HTTPS server (rustls), same {} B body: {bare_https_rps:>7.0} req/s", bundle.len());
        println!("  Key Vault secret GETs (authorized, decrypted): {secret_rps:>6.0} req/s   ratio to bare HTTPS {:.2}{}", secret_rps / bare_https_rps, rounds_note(&kv_ratios));
        match &pg {
            None => println!("  PostgreSQL rows skipped (BENCH_POSTGRES=0, or no PostgreSQL installed: set KEYLESS_PG_BIN)"),
            Some(pg) => {
                let half = (conns / 2).max(1);
                let row = |label: String, rate: f64, unit: &str, ratios: String| {
                    println!("    {label:<58}{rate:>8.0} {unit:<7}{ratios}");
                };
                let one = format!("  one replica process ({conns} connections)");
                let two = format!("  two replica processes ({half} connections each), combined");
                println!("  on PostgreSQL (a local server, fsync off; each ratio to its SQLite row above, same run):");
                row("identities created via HTTPS ARM PUT, one server in process".into(), pg.ids, "/s", format!("PostgreSQL / SQLite: {:.2}x", pg.ids / http_ids));
                row(one.clone(), pg.one_ids, "/s", format!("PostgreSQL / SQLite: {:.2}x", pg.one_ids / http_ids));
                row(two.clone(), pg.two_ids, "/s", format!("PostgreSQL / SQLite: {:.2}x   two replicas / one: {:.2}x", pg.two_ids / http_ids, pg.two_ids / pg.one_ids));
                row("Key Vault secret GETs, one server in process".into(), pg.gets, "req/s", format!("PostgreSQL / SQLite: {:.2}x", pg.gets / secret_rps));
                row(one, pg.one_gets, "req/s", format!("PostgreSQL / SQLite: {:.2}x", pg.one_gets / secret_rps));
                row(two, pg.two_gets, "req/s", format!("PostgreSQL / SQLite: {:.2}x   two replicas / one: {:.2}x", pg.two_gets / secret_rps, pg.two_gets / pg.one_gets));
            }
        }
        println!("  raw RSA-2048 key generations ({threads} threads): {keygens:>7.1} /s");
        println!("  certificates created (Self, RSA-2048, {cert_clients} clients): {cert_rate:>5.1} /s       ratio to raw keygens {:.2}", cert_rate / keygens);
        println!("  authorization check, 10,000 role assignments stored: {check_us:.1} µs each ({checks_per_s:.0}/s)");
    });
}
