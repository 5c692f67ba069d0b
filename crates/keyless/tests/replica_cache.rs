//! The vault cache of the Key Vault data plane across replicas: two `keyless server`
//! processes on one real PostgreSQL. An access-policy change or a vault delete made through
//! server A is seen by server B's data plane within the documented bound (the change-feed poll
//! interval, 500 ms by default, plus one read of the feed; never more than twice the
//! interval), and by A's own data plane at once (its cache is evicted when the write commits).
//! Each change is made while both servers have just served the vault (so it is cached there).
//! The same for the host cache of the host API: an identity deleted through A stops being
//! issued by B within the bound.

mod common;

use common::*;
use keyless_store::testing::PgServer;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The default poll of the change feed (`ServerConfig::vault_cache_poll`).
const POLL: Duration = Duration::from_millis(500);
/// What a change may take to be seen by the other server, measured from before the request
/// that makes it is sent: the hard bound (2 × the poll) plus the CLI process that makes the
/// change (a token request, a GET and the PUT) and the test's own GETs on a shared 2-core
/// machine.
const SEEN_WITHIN: Duration = Duration::from_millis(2 * 500 + 2500);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Key Vault data-plane client of one server: the vault's host name resolves to it.
struct Plane {
    client: reqwest::Client,
    base: String,
}

impl Plane {
    fn new(ca_pem: &[u8], vault: &str, port: u16) -> Plane {
        let host = format!("{vault}.vault.localhost");
        Plane {
            client: reqwest::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(ca_pem).unwrap()])
                .resolve(&host, SocketAddr::from(([127, 0, 0, 1], port)))
                .build()
                .unwrap(),
            base: format!("https://{host}:{port}"),
        }
    }

    /// `GET /secrets/{name}`: status and Key Vault error code (if any).
    async fn get(&self, token: &str, name: &str) -> (u16, String) {
        let r = self
            .client
            .get(format!("{}/secrets/{name}?api-version=7.5", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("data-plane request");
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        let code = v["error"]["innererror"]["code"]
            .as_str()
            .or(v["error"]["code"].as_str())
            .unwrap_or_default()
            .to_string();
        (status, code)
    }

    async fn put(&self, token: &str, name: &str, value: &str) -> u16 {
        self.client
            .put(format!("{}/secrets/{name}?api-version=7.5", self.base))
            .bearer_auth(token)
            .json(&serde_json::json!({ "value": value }))
            .send()
            .await
            .expect("data-plane request")
            .status()
            .as_u16()
    }
}

fn owned(want: (u16, &str)) -> (u16, String) {
    (want.0, want.1.to_string())
}

/// Poll `plane` until `GET` answers `want` (status, code); the time it took from `since`.
async fn seen(
    plane: &Plane,
    token: &str,
    name: &str,
    want: (u16, &str),
    since: Instant,
) -> Duration {
    let mut last;
    loop {
        last = plane.get(token, name).await;
        if last.0 == want.0 && last.1 == want.1 {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(15),
            "{} never answered {want:?} (last {last:?})",
            plane.base
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_change_through_one_server_reaches_the_other_within_the_bound() {
    let Some(pg) = PgServer::start() else {
        return;
    };
    let db = pg.database().await;
    let tmp = tempfile::tempdir().unwrap();
    let kek = {
        use base64::Engine;
        let bytes: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let (port_a, port_b) = (free_port(), free_port());
    // one issuer for both, as behind a load balancer
    let public = format!("https://localhost:{port_a}");
    let extra = [
        "--database",
        db.as_str(),
        "--kek",
        kek.as_str(),
        "--public-url",
        public.as_str(),
    ];
    std::fs::create_dir_all(tmp.path().join("a")).unwrap();
    std::fs::create_dir_all(tmp.path().join("b")).unwrap();
    let a = ServerProc::start_on(
        &tmp.path().join("a"),
        &format!("127.0.0.1:{port_a}"),
        &extra,
    );
    let data_b = tmp.path().join("b/server").to_string_lossy().to_string();
    let listen_b = format!("127.0.0.1:{port_b}");
    let mut args_b = vec!["server", "--data-dir", &data_b, "--listen", &listen_b];
    args_b.extend(extra);
    let _b = spawn_until(
        &args_b,
        "Keyless server listening on https://",
        &tmp.path().join("b"),
    )
    .unwrap();

    // the bootstrap admin, with a token for the Key Vault audience (valid on both servers)
    let (st, tok) = sp_token(
        &https(&a.ca),
        &a.url,
        &a.proc.find("Tenant:").unwrap(),
        &a.proc.find("export KEYLESS_CLIENT_ID=").unwrap(),
        &admin_secret(&tmp.path().join("a/server")).unwrap(),
        "https://vault.azure.net/.default",
    )
    .await;
    assert_eq!(st, 200, "{tok}");
    let token = tok["access_token"].as_str().unwrap().to_string();
    let oid = claims(&token)["oid"].as_str().unwrap().to_string();

    let vault = "cachekv";
    a.cli(&["group", "create", "-n", "cache"]);
    a.cli(&["keyvault", "create", "-n", vault, "-g", "cache"]);
    let grant = |perms: &'static [&'static str]| {
        let mut args = vec![
            "keyvault",
            "set-policy",
            "-n",
            vault,
            "--object-id",
            &oid,
            "--secret-permissions",
        ];
        args.extend(perms.iter().copied());
        a.cli(&args);
    };
    let revoke = || {
        a.cli(&[
            "keyvault",
            "delete-policy",
            "-n",
            vault,
            "--object-id",
            &oid,
        ]);
    };
    let ca_pem = std::fs::read(&a.ca).unwrap();
    let (pa, pb) = (
        Plane::new(&ca_pem, vault, port_a),
        Plane::new(&ca_pem, vault, port_b),
    );
    let denied = (403, "ForbiddenByPolicy");
    let allowed = (200, "");

    grant(&["get", "set"]);
    assert_eq!(pa.put(&token, "db", "v1").await, 200);
    let mut delays = vec![];
    for round in 0..3 {
        // both have just served the vault: it is cached on both
        assert_eq!(pa.get(&token, "db").await, owned(allowed), "round {round}");
        seen(&pb, &token, "db", allowed, Instant::now()).await;

        // revoked through A: A refuses at once (evicted at commit), B within the bound
        let t = Instant::now();
        revoke();
        assert_eq!(
            pa.get(&token, "db").await,
            owned(denied),
            "A's own write, round {round}"
        );
        let d = seen(&pb, &token, "db", denied, t).await;
        delays.push(d);

        // granted again through A
        assert_eq!(pa.get(&token, "db").await, owned(denied));
        let t = Instant::now();
        grant(&["get", "set"]);
        assert_eq!(
            pa.get(&token, "db").await,
            owned(allowed),
            "A's own write, round {round}"
        );
        let d = seen(&pb, &token, "db", allowed, t).await;
        delays.push(d);
    }

    // deleted through A (B has the vault cached): B answers VaultNotFound within the bound
    assert_eq!(pb.get(&token, "db").await, owned(allowed));
    let t = Instant::now();
    a.cli(&["keyvault", "delete", "-n", vault, "-g", "cache"]);
    assert_eq!(pa.get(&token, "db").await.0, 404);
    let d = seen(&pb, &token, "db", (404, "VaultNotFound"), t).await;
    delays.push(d);
    eprintln!("changes seen by the other server after: {delays:?} (poll {POLL:?})");
    for d in &delays {
        assert!(
            *d <= SEEN_WITHIN,
            "a change took {d:?} to reach the other server: {delays:?}"
        );
    }

    // the host cache: a host joined and served through B (cached there), its identity
    // deleted through A: B refuses that identity within the bound
    let ident = a.cli(&["identity", "create", "-g", "cache", "-n", "host-id"]);
    let cid = ident["properties"]["clientId"]
        .as_str()
        .unwrap()
        .to_string();
    a.cli(&[
        "vm",
        "create",
        "-g",
        "cache",
        "-n",
        "cached-host",
        "--assign-identity",
        "host-id",
    ]);
    let join = a.cli(&["vm", "join-token", "-g", "cache", "-n", "cached-host"]);
    let (csr, key) = keyless_pki::generate_csr("keyless-node").unwrap();
    let b_url = format!("https://localhost:{port_b}");
    let r = https(&a.ca)
        .post(format!("{b_url}/keyless/host/v1/join"))
        .json(&serde_json::json!({"joinToken": join["joinToken"], "csr": csr}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cert: serde_json::Value = r.json().await.unwrap();
    let pem = format!(
        "{}{}",
        cert["certificate"].as_str().unwrap(),
        keyless_pki::pem("PRIVATE KEY", &key)
    );
    let host = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca_pem).unwrap()])
        .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let host_token = || async {
        host.post(format!("{b_url}/keyless/host/v1/token"))
            .json(&serde_json::json!({"resource": "https://vault.azure.net",
                "selector": {"kind": "client_id", "value": cid}}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(host_token().await, 200);
    assert_eq!(host_token().await, 200, "served from B's host cache");
    let t = Instant::now();
    a.cli(&["identity", "delete", "-g", "cache", "-n", "host-id"]);
    loop {
        if host_token().await == 400 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "B kept issuing a deleted identity's tokens"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = t.elapsed();
    eprintln!("an identity deleted through A was refused by B's host API after {d:?}");
    assert!(d <= SEEN_WITHIN, "{d:?}");
}
