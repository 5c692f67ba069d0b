//! The store and replica rows of the `keyless` bench: identities created/s (authorized ARM
//! PUTs over HTTPS) and Key Vault secret GETs/s (token verified, access policy checked, value
//! unsealed; raw HTTP/1.1 keep-alive over TLS) on a real PostgreSQL
//! (`keyless_store::testing::PgServer`: Debian's PostgreSQL in a temp dir, fsync off as in the
//! tests), each measured as the SQLite rows are, in the same run:
//!
//! - one server in this process on PostgreSQL (`Store::postgres`, as `keyless server
//!   --database postgres://…` opens it) — the SQLite server of the main bench also runs in
//!   this process, so "PostgreSQL / SQLite" compares stores and nothing else;
//! - two `keyless server` processes on one other PostgreSQL database (same key-encryption key,
//!   same `--public-url`, as `tests/replicas.rs` starts them; audit and access log off, as the
//!   in-process servers have none), measured alone on replica A with every connection, then
//!   with half the connections on each replica at once: "two replicas / one" is the combined
//!   rate over A's alone.
//!
//! Load generator, server processes and PostgreSQL share the machine's cores: on a small
//! machine two replicas cannot add CPU, the row shows what a second process costs or buys.

use crate::common::*;
use keyless_core::clock::SystemClock;
use rustls::pki_types::ServerName;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ARM_SCOPE: &str = "https://management.azure.com/.default";
const VAULT_SCOPE: &str = "https://vault.azure.net/.default";
const RESOURCES_API: &str = "2024-11-01";
const KEYVAULT_API: &str = "2023-07-01";
pub const VAULT: &str = "bench-kv";
pub const SECRET_PATH: &str = "/secrets/bench/?api-version=7.5";

/// The secret every server stores: 100 bytes, as the SQLite row's.
pub fn secret_value() -> String {
    (0..100)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect()
}

/// The raw secret GET the load sends to the server on `port` (the vault host names the port
/// the client addressed, as an SDK's does).
pub fn secret_request(port: u16, token: &str) -> String {
    format!(
        "GET {SECRET_PATH} HTTP/1.1\r\nHost: {VAULT}.vault.localhost:{port}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
}

/// A rustls connector trusting `ca_der`, and the name the servers' certificates carry.
pub fn tls_to(ca_der: &[u8]) -> (tokio_rustls::TlsConnector, ServerName<'static>) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        ServerName::try_from("localhost").unwrap(),
    )
}

/// User-assigned identities created per second through the control plane: `conns` clients
/// for `secs`, client `t` on `bases[t % bases.len()]`, each PUTting `{prefix}-{t}-{i}` into
/// resource group `bench` (201 asserted) one after another.
pub async fn create_identities(
    client: &reqwest::Client,
    bases: &[String],
    sub: &str,
    token: &str,
    prefix: &str,
    conns: usize,
    secs: u64,
) -> f64 {
    let created = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = vec![];
    for t in 0..conns {
        let (client, created, token) = (client.clone(), created.clone(), token.to_string());
        let base = bases[t % bases.len()].clone();
        let (sub, prefix) = (sub.to_string(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < stop {
                let url = format!(
                    "{base}/subscriptions/{sub}/resourceGroups/bench/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{prefix}-{t}-{i}?api-version=2023-01-31"
                );
                let r = client
                    .put(&url)
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"location": "local"}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                let body = r.bytes().await.unwrap_or_default();
                assert_eq!(status, 201, "{url}: {body:?}");
                i += 1;
                created.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    created.load(Ordering::Relaxed) as f64 / secs as f64
}

/// Secret GETs/s over TLS keep-alive: `conns` connections split evenly over `targets`
/// (address, request), all loaded at once; the combined rate.
pub async fn secret_gets(
    targets: Vec<(SocketAddr, String)>,
    conns: usize,
    secs: u64,
    tls: (tokio_rustls::TlsConnector, ServerName<'static>),
) -> f64 {
    let each = (conns / targets.len()).max(1);
    let runs: Vec<_> = targets
        .into_iter()
        .map(|(addr, req)| tokio::spawn(load_get(addr, req, each, secs, Some(tls.clone()))))
        .collect();
    let mut total = 0.0;
    for r in runs {
        total += r.await.expect("secret GET load");
    }
    total
}

/// The bootstrap admin of a server and where it lives.
struct Admin {
    tenant: String,
    subscription: String,
    client_id: String,
    client_secret: String,
}

/// Tokens for the load, once a server is prepared.
struct Prepared {
    arm_token: String,
    vault_token: String,
}

/// A claim of a JWT's payload (not verified: our own server's token).
fn claim(token: &str, name: &str) -> String {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON payload");
    v[name].as_str().expect(name).to_string()
}

async fn client_credentials(
    client: &reqwest::Client,
    base: &str,
    a: &Admin,
    scope: &str,
) -> String {
    let r = client
        .post(format!("{base}/{}/oauth2/v2.0/token", a.tenant))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", a.client_id.as_str()),
            ("client_secret", a.client_secret.as_str()),
            ("scope", scope),
        ])
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 200, "token for {scope}: {v}");
    v["access_token"].as_str().unwrap().to_string()
}

/// Over HTTP only, as a client would: resource group `bench`, vault `bench-kv` whose access
/// policy lets the admin get and set secrets, secret `bench` (read back); the admin's tokens.
async fn prepare(
    client: &reqwest::Client,
    base: &str,
    addr: SocketAddr,
    ca_pem: &str,
    a: &Admin,
) -> Prepared {
    let arm_token = client_credentials(client, base, a, ARM_SCOPE).await;
    let oid = claim(&arm_token, "oid");
    let rg = format!(
        "{base}/subscriptions/{}/resourceGroups/bench",
        a.subscription
    );
    let put = |url: String, body: serde_json::Value| {
        let (client, token) = (client.clone(), arm_token.clone());
        async move {
            let r = client
                .put(&url)
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            assert!(matches!(status, 200 | 201), "PUT {url}: {status} {text}");
        }
    };
    put(
        format!("{rg}?api-version={RESOURCES_API}"),
        serde_json::json!({"location": "local"}),
    )
    .await;
    put(
        format!("{rg}/providers/Microsoft.KeyVault/vaults/{VAULT}?api-version={KEYVAULT_API}"),
        serde_json::json!({"location": "local", "properties": {
            "tenantId": a.tenant,
            "sku": {"family": "A", "name": "standard"},
            "accessPolicies": [{
                "tenantId": a.tenant,
                "objectId": oid,
                "permissions": {"secrets": ["get", "set"]},
            }],
        }}),
    )
    .await;
    let vault_token = client_credentials(client, base, a, VAULT_SCOPE).await;
    let kv = kv_client(ca_pem, addr);
    let kv_base = format!("https://{VAULT}.vault.localhost:{}", addr.port());
    let value = secret_value();
    let r = kv
        .put(format!("{kv_base}/secrets/bench?api-version=7.5"))
        .bearer_auth(&vault_token)
        .json(&serde_json::json!({ "value": value }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 200, "{:?}", r.text().await);
    check_secret(ca_pem, addr, &vault_token).await;
    Prepared {
        arm_token,
        vault_token,
    }
}

/// A client for the vault host, resolved to `addr`.
fn kv_client(ca_pem: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .resolve(&format!("{VAULT}.vault.localhost"), addr)
        .build()
        .unwrap()
}

/// One secret GET at `addr` answering the value (also warms that server's caches).
async fn check_secret(ca_pem: &str, addr: SocketAddr, token: &str) {
    let r = kv_client(ca_pem, addr)
        .get(format!(
            "https://{VAULT}.vault.localhost:{}{SECRET_PATH}",
            addr.port()
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert!(
        status == 200 && body.contains(&secret_value()),
        "secret GET at {addr}: {status} {body}"
    );
}

/// A base64 key-encryption key (32 random bytes), given to every server of a database.
fn new_kek() -> String {
    use base64::Engine;
    let bytes: Vec<u8> = (0..2)
        .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A `keyless server` process, killed (by its PID) when dropped.
struct ServerProcess {
    child: Child,
    lines: Vec<String>,
    data_dir: PathBuf,
    port: u16,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    /// `keyless server` on `127.0.0.1:port` with data dir `dir/server` and `extra` flags; waits
    /// until it has printed its bootstrap admin line (it is listening by then).
    fn start(dir: &Path, port: u16, extra: &[&str]) -> ServerProcess {
        std::fs::create_dir_all(dir).unwrap();
        let data_dir = dir.join("server");
        let stderr_path = dir.join("stderr.log");
        let listen = format!("127.0.0.1:{port}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyless"))
            .args([
                "server",
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--listen",
                &listen,
            ])
            .args(["--no-audit", "--metrics-listen", "off"])
            .args(extra)
            // no access log line per request: the in-process servers write none either
            .env("RUST_LOG", "warn")
            .env_remove("KEYLESS_DATABASE_URL")
            .env_remove("KEYLESS_KEK")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("start keyless server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            // keep draining: a process whose stdout is closed dies at its next line
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut p = ServerProcess {
            child,
            lines: vec![],
            data_dir,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => {
                    let done = l.contains("KEYLESS_CLIENT_ID=")
                        || l.contains("Bootstrap admin client id:");
                    p.lines.push(l);
                    if done {
                        return p;
                    }
                }
                Err(_) => {
                    let exited = p.child.try_wait().ok().flatten();
                    if exited.is_some() || Instant::now() > deadline {
                        panic!(
                            "keyless server on {listen} ({exited:?}): stdout {:?} stderr {}",
                            p.lines,
                            std::fs::read_to_string(&stderr_path).unwrap_or_default()
                        );
                    }
                }
            }
        }
    }

    fn find(&self, prefix: &str) -> String {
        self.lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|s| s.trim().to_string()))
            .unwrap_or_else(|| panic!("no {prefix:?} in {:?}", self.lines))
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn base(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// The bootstrap admin (this process must be the one that created it).
    fn admin(&self) -> Admin {
        let secret = std::fs::read_to_string(self.data_dir.join("bootstrap-admin.secret")).unwrap();
        Admin {
            tenant: self.find("Tenant:"),
            subscription: self.find("Subscription:"),
            client_id: self.find("export KEYLESS_CLIENT_ID="),
            client_secret: secret
                .lines()
                .find_map(|l| l.strip_prefix("KEYLESS_CLIENT_SECRET="))
                .expect("bootstrap admin secret")
                .to_string(),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The figures of the PostgreSQL section.
pub struct Rows {
    /// one server in this process
    pub ids: f64,
    pub gets: f64,
    /// replica A alone, every connection
    pub one_ids: f64,
    pub one_gets: f64,
    /// replicas A and B, half the connections each, combined
    pub two_ids: f64,
    pub two_gets: f64,
}

/// Start PostgreSQL and measure the section; `None` when PostgreSQL is not installed.
pub async fn run(conns: usize, secs: u64) -> Option<Rows> {
    let pg = tokio::task::spawn_blocking(keyless_store::testing::PgServer::start)
        .await
        .unwrap()?;
    let rows = measure(&pg, conns, secs).await;
    // stopping PostgreSQL waits for it (blocking)
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
    Some(rows)
}

async fn measure(pg: &keyless_store::testing::PgServer, conns: usize, secs: u64) -> Rows {
    // ---- one server in this process, as the SQLite one
    let (ids, gets) = {
        let url = pg.database().await;
        let dir = tempfile::tempdir().unwrap();
        let store = keyless_store::Store::postgres(
            &keyless_store::postgres::PgOptions::new(url),
            keyless_store::Kek::from_base64(&new_kek()).unwrap(),
        )
        .await
        .unwrap();
        let cfg =
            keyless_server::Config::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
        let srv = keyless_server::start(cfg, store, Arc::new(SystemClock::new()))
            .await
            .unwrap();
        let s = &srv.state;
        let admin = srv
            .bootstrap
            .new_admin
            .clone()
            .expect("a new database bootstraps an admin");
        let a = Admin {
            tenant: s.tenant_id.clone(),
            subscription: s.subscription_id.clone(),
            client_id: admin.client_id,
            client_secret: admin.client_secret,
        };
        let (ca_pem, base) = (
            s.ca.cert_pem(),
            format!("https://localhost:{}", srv.local_addr.port()),
        );
        let client = https_client(&ca_pem);
        let p = prepare(&client, &base, srv.local_addr, &ca_pem, &a).await;
        let ids = create_identities(
            &client,
            &[base],
            &a.subscription,
            &p.arm_token,
            "id",
            conns,
            secs,
        )
        .await;
        let req = secret_request(srv.local_addr.port(), &p.vault_token);
        let gets = secret_gets(
            vec![(srv.local_addr, req)],
            conns,
            secs,
            tls_to(s.ca.cert_der()),
        )
        .await;
        // stop listening (its background loops idle on until the bench ends)
        srv.task.abort();
        (ids, gets)
    };

    // ---- two replica processes on another database: A bootstraps, B finds everything there
    let url = pg.database().await;
    let kek = new_kek();
    let tmp = tempfile::tempdir().unwrap();
    let (port_a, port_b) = (free_port(), free_port());
    // one issuer for both, as behind a load balancer
    let public = format!("https://localhost:{port_a}");
    let flags = [
        "--database",
        url.as_str(),
        "--kek",
        kek.as_str(),
        "--public-url",
        public.as_str(),
    ];
    let a = ServerProcess::start(&tmp.path().join("a"), port_a, &flags);
    let b = ServerProcess::start(&tmp.path().join("b"), port_b, &flags);
    let admin = a.admin();
    let ca_pem = std::fs::read_to_string(a.data_dir.join("pki/ca.pem")).unwrap();
    let ca_der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA PEM")
    };
    let client = https_client(&ca_pem);
    let p = prepare(&client, &a.base(), a.addr(), &ca_pem, &admin).await;
    // B sees A's writes and accepts A's tokens
    check_secret(&ca_pem, b.addr(), &p.vault_token).await;
    let tls = tls_to(&ca_der);
    let sub = admin.subscription.as_str();
    let one_ids =
        create_identities(&client, &[a.base()], sub, &p.arm_token, "one", conns, secs).await;
    let two_ids = create_identities(
        &client,
        &[a.base(), b.base()],
        sub,
        &p.arm_token,
        "two",
        conns,
        secs,
    )
    .await;
    let req = |r: &ServerProcess| (r.addr(), secret_request(r.port, &p.vault_token));
    let one_gets = secret_gets(vec![req(&a)], conns, secs, tls.clone()).await;
    let two_gets = secret_gets(vec![req(&a), req(&b)], conns, secs, tls).await;
    drop((a, b));
    Rows {
        ids,
        gets,
        one_ids,
        one_gets,
        two_ids,
        two_gets,
    }
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap()
}
