//! Two `keyless server` replicas on one real PostgreSQL, a host agent and SDK-like clients
//! pointed at both, mixed load (IMDS cache misses, ARM writes, Key Vault writes and reads,
//! federated-credential writes under one identity) for `KEYLESS_REPLICA_LOAD_SECS` (60 in CI):
//! one replica is killed with SIGKILL at a random moment and restarted; later PostgreSQL is
//! stopped for 10 s. Clients retry as the Azure SDKs do (connection errors, 408/429/5xx, with
//! exponential back-off, a retry may land on the other replica as behind a load balancer).
//!
//! Checked: under 1 % of client requests fail after retries; no answer is wrong (a 500, a 404
//! for what exists, another value than the one written); every acknowledged write is there at
//! the end; exactly one signing key per rotation; exactly one renewal per due certificate; both
//! replicas publish the same JWKS within the key check interval; during the outage the
//! servers answer 503 and recover without a restart.

mod common;

use common::*;
use keyless_store::testing::PgServer;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Outcomes of the load's client requests.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// failed after the SDK's retries
    failed: AtomicU64,
    /// answers that must never happen (500, 404 for what exists, a wrong value)
    wrong: Mutex<Vec<String>>,
    /// 503s seen (each retried)
    unavailable: AtomicU64,
    retried: AtomicU64,
}

impl Tally {
    fn wrong(&self, what: String) {
        eprintln!("WRONG: {what}");
        self.wrong.lock().unwrap().push(what);
    }
}

/// One request with the Azure SDK's retry policy (azure-core: retry on connection errors,
/// 408, 429, 500, 502, 503, 504; exponential back-off from 0.5 s; 6 tries in all, ~15 s),
/// each try on the next base URL. `Some((status, body))` = the final answer; `None` = failed.
async fn sdk_call(
    t: &Tally,
    bases: &[String],
    start: usize,
    send: impl Fn(&str) -> reqwest::RequestBuilder,
) -> Option<(u16, Value)> {
    let mut delay = Duration::from_millis(500);
    for attempt in 0..6 {
        let base = &bases[(start + attempt) % bases.len()];
        let retry = match send(base).timeout(Duration::from_secs(10)).send().await {
            Ok(r) => {
                let st = r.status().as_u16();
                if st == 500 && !base.starts_with("http://") {
                    // the servers answer an unavailable database 503; a 500 is a fault
                    let body = r.text().await.unwrap_or_default();
                    t.wrong(format!("500 from {base}: {body}"));
                    true
                } else if st == 500 {
                    // IMDS (the agent) answers a failed upstream as Azure's IMDS does: 500
                    // `unknown`, which the SDKs retry
                    t.unavailable.fetch_add(1, Ordering::Relaxed);
                    true
                } else if matches!(st, 408 | 429 | 502 | 503 | 504) {
                    if st == 503 {
                        t.unavailable.fetch_add(1, Ordering::Relaxed);
                    }
                    true
                } else {
                    let v = r.json().await.unwrap_or(Value::Null);
                    return Some((st, v));
                }
            }
            Err(_) => true,
        };
        if retry && attempt < 5 {
            t.retried.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    None
}

struct Replica {
    proc: Option<Proc>,
    /// a first process started elsewhere (replica A's, owned by its `ServerProc`)
    first_pid: Option<u32>,
    args: Vec<String>,
    dir: std::path::PathBuf,
    url: String,
}

impl Replica {
    fn start(dir: &std::path::Path, port: u16, extra: &[String]) -> Replica {
        let data = dir.join("server");
        let mut args: Vec<String> = vec![
            "server".into(),
            "--data-dir".into(),
            data.to_string_lossy().into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend(extra.iter().cloned());
        let mut r = Replica {
            proc: None,
            first_pid: None,
            args,
            dir: dir.to_path_buf(),
            url: format!("https://localhost:{port}"),
        };
        r.restart();
        r
    }

    fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.proc = Some(
            spawn_until(&args, "Keyless server listening on https://", &self.dir)
                .unwrap_or_else(|e| panic!("replica {}: {e}", self.url)),
        );
    }

    fn kill9(&mut self) {
        if let Some(p) = &mut self.proc {
            let _ = p.child.kill(); // SIGKILL
            let _ = p.child.wait();
        } else if let Some(pid) = self.first_pid.take() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            // its lock on the data dir goes with it; wait until the port is free
            let deadline = Instant::now() + Duration::from_secs(10);
            let port: u16 = self.url.rsplit(':').next().unwrap().parse().unwrap();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.proc = None;
    }
}

fn load_secs() -> u64 {
    std::env::var("KEYLESS_REPLICA_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_survive_a_crash_and_a_database_outage() {
    let Some(mut pg) = PgServer::start() else {
        return;
    };
    let db = pg.database().await;
    let tmp = tempfile::tempdir().unwrap();
    let kek = {
        use base64::Engine;
        let bytes: Vec<u8> = (0..32).map(|_| rand_byte()).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let (port_a, port_b) = (free_port(), free_port());
    // one name for clients, as behind a load balancer: tokens from either replica carry the
    // same issuer
    let public = format!("https://localhost:{port_a}");
    let rotation = 20u64;
    let extra: Vec<String> = [
        "--database",
        &db,
        "--kek",
        &kek,
        "--public-url",
        &public,
        "--key-rotation",
        &rotation.to_string(),
        "--key-prepublish",
        "5",
        "--key-check-interval",
        "1",
        "--vault-check-interval",
        "1",
        "--dev-clock",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    std::fs::create_dir_all(tmp.path().join("a")).unwrap();
    std::fs::create_dir_all(tmp.path().join("b")).unwrap();
    // A first: it bootstraps (tenant, CA, admin); B finds them
    let a_extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let admin_server = ServerProc::start_on(
        &tmp.path().join("a"),
        &format!("127.0.0.1:{port_a}"),
        &a_extra,
    );
    let mut a = Replica {
        proc: None,
        first_pid: Some(admin_server.proc.child.id()),
        args: {
            let data = tmp.path().join("a/server");
            let mut v: Vec<String> = vec![
                "server".into(),
                "--data-dir".into(),
                data.to_string_lossy().into(),
                "--listen".into(),
                format!("127.0.0.1:{port_a}"),
            ];
            v.extend(extra.iter().cloned());
            v
        },
        dir: tmp.path().join("a"),
        url: admin_server.url.clone(),
    };
    let mut b = Replica::start(&tmp.path().join("b"), port_b, &extra);
    let bases = vec![a.url.clone(), b.url.clone()];
    let server_list = bases.join(",");

    // ---- set-up through replica A (the CLI), read back through B
    admin_server.cli(&["group", "create", "-n", "load"]);
    let app = admin_server.cli(&["identity", "create", "-g", "load", "-n", "app"]);
    let fed = admin_server.cli(&["identity", "create", "-g", "load", "-n", "federated"]);
    let _ = fed;
    admin_server.cli(&[
        "vm",
        "create",
        "-g",
        "load",
        "-n",
        "web1",
        "--assign-identity",
        "[system]",
        "app",
    ]);
    let join = admin_server.cli(&["vm", "join-token", "-g", "load", "-n", "web1"]);
    let join = join["joinToken"]
        .as_str()
        .unwrap_or_else(|| panic!("join token: {join}"))
        .to_string();
    let app_client = app["properties"]["clientId"].as_str().unwrap().to_string();
    let app_principal = app["properties"]["principalId"]
        .as_str()
        .unwrap()
        .to_string();
    let vault = "replkv";
    admin_server.cli(&["keyvault", "create", "-n", vault, "-g", "load"]);
    admin_server.cli(&[
        "keyvault",
        "set-policy",
        "-n",
        vault,
        "--object-id",
        &app_principal,
        "--secret-permissions",
        "get",
        "set",
        "list",
        "--certificate-permissions",
        "create",
        "get",
        "list",
    ]);

    // the host agent, pointed at both replicas
    let state = tmp.path().join("node");
    let state_s = state.to_string_lossy().to_string();
    let node = spawn_until(
        &[
            "node",
            "--server",
            &server_list,
            "--ca-file",
            &admin_server.ca,
            "--state-dir",
            &state_s,
            "--imds-listen",
            "127.0.0.1:0",
            "--sync-interval",
            "1",
            "--join-token",
            &join,
            "--caller-rps",
            "0",
            "--caller-concurrency",
            "0",
        ],
        "IMDS endpoint:",
        tmp.path(),
    )
    .unwrap();
    let imds = node.find("IMDS endpoint:").unwrap();

    // Key Vault clients: the vault host resolves to each replica
    let ca_pem = std::fs::read(&admin_server.ca).unwrap();
    let kv_host = format!("{vault}.vault.localhost");
    let kv_client = |port: u16| {
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca_pem).unwrap()])
            .resolve(&kv_host, SocketAddr::from(([127, 0, 0, 1], port)))
            .build()
            .unwrap()
    };
    let kv_clients = Arc::new(vec![
        (kv_client(port_a), port_a),
        (kv_client(port_b), port_b),
    ]);
    let kv_bases: Vec<String> = [port_a, port_b]
        .iter()
        .map(|p| format!("https://{kv_host}:{p}"))
        .collect();
    let kv_token = {
        let (st, v) = imds_token(
            &imds,
            &format!("resource=https://vault.azure.net&client_id={app_client}"),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        v["access_token"].as_str().unwrap().to_string()
    };
    let (arm_client, arm_token) = admin_server.admin().await;

    // ---- certificates due for renewal: created, then both Key Vault clocks moved 25 days
    // (AutoRenew 7 days before expiry of a 1-month certificate); the scheduler's lease holder
    // renews each exactly once
    let certs = ["c1", "c2", "c3"];
    for c in certs {
        let r = kv_clients[0]
            .0
            .post(format!("{}/certificates/{c}/create?api-version=7.5", kv_bases[0]))
            .bearer_auth(&kv_token)
            .json(&json!({"policy": {
                "issuer": {"name": "Self"},
                "key_props": {"exportable": true, "kty": "RSA", "key_size": 2048, "reuse_key": false},
                "x509_props": {"subject": format!("CN={c}.example"), "validity_months": 1},
                "lifetime_actions": [{"trigger": {"days_before_expiry": 7}, "action": {"action_type": "AutoRenew"}}]
            }}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    }
    let versions = |c: &'static str| {
        let (client, base, token) = (
            kv_clients[1].0.clone(),
            kv_bases[1].clone(),
            kv_token.clone(),
        );
        async move {
            let v: Value = client
                .get(format!("{base}/certificates/{c}/versions?api-version=7.5"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["value"].as_array().map(|a| a.len()).unwrap_or(0)
        }
    };
    wait_until(60, "the first certificate versions", || async {
        for c in certs {
            if versions(c).await != 1 {
                return false;
            }
        }
        true
    })
    .await;
    for base in &bases {
        let r = arm_client
            .post(format!("{base}/keyless/admin/v1/vault-clock"))
            .bearer_auth(&arm_token)
            .json(&json!({"advanceSeconds": 25 * 86_400}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    wait_until(60, "one renewal per due certificate", || async {
        for c in certs {
            if versions(c).await < 2 {
                return false;
            }
        }
        true
    })
    .await;

    // ---- the load
    let secs = load_secs();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let acked_identities = Arc::new(Mutex::new(Vec::<String>::new()));
    let acked_secrets = Arc::new(Mutex::new(BTreeMap::<String, String>::new()));
    let fic_state = Arc::new(Mutex::new(BTreeMap::<String, bool>::new()));
    // the JWKS each replica published, sampled together
    let jwks_samples = Arc::new(Mutex::new(Vec::<JwksSample>::new()));
    let sub = admin_server.cli(&["group", "show", "-n", "load"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut tasks = vec![];

    // IMDS cache misses: a new audience each time (the agent asks a replica)
    for w in 0..2u64 {
        let (t, stop, imds, app_client) = (
            tally.clone(),
            stop.clone(),
            imds.clone(),
            app_client.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let bases = vec![imds.clone()];
                let q = format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://load{w}-{n}.example/&client_id={app_client}");
                match sdk_call(&t, &bases, 0, |b| http().get(format!("{b}{q}")).header("Metadata", "true")).await {
                    Some((200, v)) if v["access_token"].is_string() => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Some((st, v)) => t.wrong(format!("IMDS {st}: {v}")),
                    None => {
                        t.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // ARM writes: identities, alternately on each replica
    {
        let (t, stop, bases, c, tok, acked, sub) = (
            tally.clone(),
            stop.clone(),
            bases.clone(),
            arm_client.clone(),
            arm_token.clone(),
            acked_identities.clone(),
            sub.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let path = format!("{sub}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/load-{n}?api-version=2023-01-31");
                let r = sdk_call(&t, &bases, n, |b| {
                    c.put(format!("{b}{path}")).bearer_auth(&tok).json(&json!({"location": "local"}))
                })
                .await;
                match r {
                    Some((200 | 201, _)) => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                        acked.lock().unwrap().push(format!("load-{n}"));
                    }
                    Some((st, v)) => t.wrong(format!("identity PUT {st}: {v}")),
                    None => {
                        t.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Key Vault: set a secret through one replica, read it back through the other
    for w in 0..2usize {
        let (t, stop, clients, kv_bases, tok, acked) = (
            tally.clone(),
            stop.clone(),
            kv_clients.clone(),
            kv_bases.clone(),
            kv_token.clone(),
            acked_secrets.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("s{w}-{}", n % 7);
                let value = format!("v{w}-{n}");
                let i = n % 2;
                let set = sdk_call(&t, &kv_bases, i, |b| {
                    let c = &clients[kv_bases.iter().position(|x| x == b).unwrap()].0;
                    c.put(format!("{b}/secrets/{name}?api-version=7.5"))
                        .bearer_auth(&tok)
                        .json(&json!({"value": value}))
                })
                .await;
                match set {
                    Some((200, _)) => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                        acked.lock().unwrap().insert(name.clone(), value.clone());
                    }
                    Some((st, v)) => {
                        t.wrong(format!("secret set {st}: {v}"));
                        continue;
                    }
                    None => {
                        t.failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                let get = sdk_call(&t, &kv_bases, i + 1, |b| {
                    let c = &clients[kv_bases.iter().position(|x| x == b).unwrap()].0;
                    c.get(format!("{b}/secrets/{name}?api-version=7.5"))
                        .bearer_auth(&tok)
                })
                .await;
                match get {
                    Some((200, v)) if v["value"] == value.as_str() => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Some((st, v)) => t.wrong(format!("secret get {name} wanted {value}: {st} {v}")),
                    None => {
                        t.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // federated credentials under one identity from two writers: Entra's 409 for concurrent
    // writes is a right answer (the SDKs do not retry it); each writer owns its names
    for w in 0..2usize {
        let (t, stop, bases, c, tok, state, sub) = (
            tally.clone(),
            stop.clone(),
            bases.clone(),
            arm_client.clone(),
            arm_token.clone(),
            fic_state.clone(),
            sub.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("w{w}-{}", n % 5);
                let present = state.lock().unwrap().get(&name).copied().unwrap_or(false);
                let path = format!("{sub}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/federated/federatedIdentityCredentials/{name}?api-version=2023-01-31");
                let r = sdk_call(&t, &bases, n + w, |b| {
                    if present {
                        c.delete(format!("{b}{path}")).bearer_auth(&tok)
                    } else {
                        c.put(format!("{b}{path}")).bearer_auth(&tok).json(&json!({"properties": {
                            "issuer": "https://issuer.example", "subject": format!("sub-{name}"),
                            "audiences": ["api://AzureADTokenExchange"]}}))
                    }
                })
                .await;
                match r {
                    Some((200 | 201 | 204, _)) => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                        state.lock().unwrap().insert(name, !present);
                    }
                    Some((409, v)) if v["error"]["code"].as_str().is_some_and(|c| c.contains("Concurrent")) => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Some((st, v)) => t.wrong(format!("FIC {} {name}: {st} {v}", if present { "DELETE" } else { "PUT" })),
                    None => {
                        t.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // JWKS of both replicas, five times a second (fine enough to time a divergence of ~1 s)
    {
        let (stop, bases, c, tenant, mism) = (
            stop.clone(),
            bases.clone(),
            arm_client.clone(),
            admin_server.proc.find("Tenant:").unwrap(),
            jwks_samples.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut sets = vec![];
                for b in &bases {
                    let r = c
                        .get(format!("{b}/{tenant}/discovery/v2.0/keys"))
                        .send()
                        .await;
                    let kids: Option<Vec<String>> = match r {
                        Ok(r) if r.status() == 200 => r.json::<Value>().await.ok().map(|v| {
                            let mut k: Vec<String> = v["keys"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|k| k["kid"].as_str().map(str::to_string))
                                .collect();
                            k.sort();
                            k
                        }),
                        _ => None,
                    };
                    sets.push(kids);
                }
                if let [a, b] = &mut sets[..] {
                    mism.lock().unwrap().push(JwksSample {
                        at: Instant::now(),
                        a: a.take(),
                        b: b.take(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }

    // chaos: SIGKILL one replica at a random moment, restart it 2 s later; at 60 % of the
    // run stop PostgreSQL for 10 s
    let started = Instant::now();
    // (KEYLESS_REPLICA_KILL_AT_MS and KEYLESS_REPLICA_VICTIM=A|B replay a run)
    let kill_at = match std::env::var("KEYLESS_REPLICA_KILL_AT_MS") {
        Ok(ms) => Duration::from_millis(ms.parse().expect("KEYLESS_REPLICA_KILL_AT_MS")),
        Err(_) => Duration::from_millis(secs * 1000 * (15 + (rand_byte() as u64 % 25)) / 100),
    };
    tokio::time::sleep(kill_at).await;
    let victim_is_a = match std::env::var("KEYLESS_REPLICA_VICTIM").as_deref() {
        Ok("A") => true,
        Ok("B") => false,
        _ => rand_byte().is_multiple_of(2),
    };
    eprintln!(
        "kill -9 replica {} at {:?}",
        if victim_is_a { "A" } else { "B" },
        started.elapsed()
    );
    // the victim's time down: from just before the kill until it listens again
    let down = {
        let victim = if victim_is_a { &mut a } else { &mut b };
        let from = Instant::now();
        victim.kill9();
        tokio::time::sleep(Duration::from_secs(2)).await;
        victim.restart();
        Down {
            victim_is_a,
            during: from..Instant::now(),
        }
    };
    let outage_at = Duration::from_secs(secs * 60 / 100);
    if let Some(rest) = outage_at.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    eprintln!("stopping PostgreSQL at {:?}", started.elapsed());
    let before_outage = tally.unavailable.load(Ordering::Relaxed);
    pg.stop();
    // meanwhile the servers answer 503 in their shape, never another answer
    let mut outage_answers = vec![];
    for base in &bases {
        let r = arm_client
            .get(format!("{sub}?api-version=2021-04-01").replace(&sub, &format!("{base}{sub}")))
            .bearer_auth(&arm_token)
            .send()
            .await;
        if let Ok(r) = r {
            outage_answers.push(r.status().as_u16());
        }
    }
    let outage_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    pg.restart();
    let outage = outage_from..Instant::now();
    eprintln!("PostgreSQL back at {:?}", started.elapsed());
    if let Some(rest) = Duration::from_secs(secs).checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let during_outage = tally.unavailable.load(Ordering::Relaxed) - before_outage;

    // ---- the verdict
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let wrong = tally.wrong.lock().unwrap().clone();
    eprintln!(
        "load {secs} s: {ok} ok, {failed} failed after retries, {} retried, {} answered 503 ({during_outage} from the outage on), outage probes {outage_answers:?}",
        tally.retried.load(Ordering::Relaxed),
        tally.unavailable.load(Ordering::Relaxed),
    );
    assert!(wrong.is_empty(), "wrong answers: {wrong:#?}");
    assert!(ok > 100, "too little load to judge: {ok}");
    assert!(
        (failed as f64) < 0.01 * (ok + failed) as f64,
        "{failed} of {} client requests failed",
        ok + failed
    );
    assert!(
        outage_answers.iter().all(|s| *s == 503),
        "answers while the database was down: {outage_answers:?}"
    );

    // no acknowledged write lost (read through replica B, then A)
    let acked_ids = acked_identities.lock().unwrap().clone();
    for name in &acked_ids {
        let path = format!("{sub}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}?api-version=2023-01-31");
        let (st, v) = sdk_call(&tally, &bases, 1, |b| {
            arm_client.get(format!("{b}{path}")).bearer_auth(&arm_token)
        })
        .await
        .expect("read back");
        assert_eq!(st, 200, "acknowledged identity {name} lost: {v}");
    }
    let acked_values = acked_secrets.lock().unwrap().clone();
    for (name, value) in &acked_values {
        let (st, v) = sdk_call(&tally, &kv_bases, 0, |b| {
            let c = &kv_clients[kv_bases.iter().position(|x| x == b).unwrap()].0;
            c.get(format!("{b}/secrets/{name}?api-version=7.5"))
                .bearer_auth(&kv_token)
        })
        .await
        .expect("read back");
        assert_eq!(
            (st, v["value"].as_str()),
            (200, Some(value.as_str())),
            "secret {name}"
        );
    }
    let listed = {
        let path = format!("{sub}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/federated/federatedIdentityCredentials?api-version=2023-01-31");
        let (st, v) = sdk_call(&tally, &bases, 0, |b| {
            arm_client.get(format!("{b}{path}")).bearer_auth(&arm_token)
        })
        .await
        .expect("list");
        assert_eq!(st, 200, "{v}");
        let mut names: Vec<String> = v["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    let expected: Vec<String> = fic_state
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p)| **p)
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(
        listed, expected,
        "federated credentials vs acknowledged writes"
    );

    // exactly one signing key per rotation: keys are `rotation` apart, never two in one period
    let store = keyless_store::Store::postgres(
        &keyless_store::postgres::PgOptions::new(db.clone()),
        keyless_store::Kek::from_base64(&kek).unwrap(),
    )
    .await
    .unwrap();
    let mut tx = store.read("test").await.unwrap();
    let mut keys = tx.list_signing_keys().await.unwrap();
    drop(tx);
    keys.sort_by_key(|k| k.activate_at);
    eprintln!(
        "signing keys: {:?}",
        keys.iter()
            .map(|k| (k.created, k.activate_at))
            .collect::<Vec<_>>()
    );
    if secs >= 60 {
        // a rotation every 20 s (15 s once the next key is published): several in a minute,
        // even with the lease lost for its 30 s ttl after the kill
        assert!(
            keys.len() >= 2,
            "no rotation happened: {} key(s)",
            keys.len()
        );
    }
    for w in keys.windows(2) {
        assert!(
            w[1].activate_at >= w[0].activate_at + rotation / 2,
            "two signing keys for one rotation: {:?} and {:?}",
            (w[0].created, w[0].activate_at),
            (w[1].created, w[1].activate_at)
        );
    }
    // exactly one renewal per due certificate (still two versions after the whole run)
    for c in certs {
        assert_eq!(versions(c).await, 2, "certificate {c}");
    }
    // the same JWKS from both replicas, apart from at most the key check interval plus one
    // reload (the documented staleness bound, `keys.rs`) plus one sample period. A replica
    // cannot learn of a key while the database is down: a divergence that overlaps the
    // outage counts its time before and after it.
    let samples = jwks_samples.lock().unwrap().clone();
    let runs = divergences(&samples, started, &outage, &down);
    for r in &runs {
        eprintln!("JWKS differed {r}");
    }
    let longest = runs.iter().map(|r| r.upper).max().unwrap_or_default();
    eprintln!(
        "{} JWKS samples ({} with both replicas answering), {} divergences, longest {longest:?}",
        samples.len(),
        samples
            .iter()
            .filter(|s| s.a.is_some() && s.b.is_some())
            .count(),
        runs.len()
    );
    assert!(
        longest <= Duration::from_millis(2500),
        "the replicas' JWKS differed for {longest:?}: {runs:#?}"
    );
    drop(node);
}

fn rand_byte() -> u8 {
    uuid::Uuid::new_v4().as_bytes()[0]
}

async fn wait_until<F, Fut>(secs: u64, what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The key ids each replica's JWKS held at `at` (`None`: that replica did not answer).
#[derive(Clone)]
struct JwksSample {
    at: Instant,
    a: Option<Vec<String>>,
    b: Option<Vec<String>>,
}

impl JwksSample {
    fn differ(&self) -> bool {
        matches!((&self.a, &self.b), (Some(a), Some(b)) if a != b)
    }
}

/// A time the replicas answered with different JWKS: from its first differing sample to the
/// first agreeing one, or to the first in which the killed replica is down (it loads the whole
/// ring when it starts); a sample in which a replica did not answer at another time neither
/// ends nor extends it. `upper` is the bound a sampler can give.
#[derive(Debug)]
struct Divergence {
    /// seconds since the chaos clock started (negative: before it)
    from: f64,
    upper: Duration,
    /// the kids of A and of B at the first and at the last differing sample
    first: (Vec<String>, Vec<String>),
    last: (Vec<String>, Vec<String>),
}

/// The killed replica and its time down.
struct Down {
    victim_is_a: bool,
    during: std::ops::Range<Instant>,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "at {:.2}s for <= {:?}: A {:?} B {:?} .. A {:?} B {:?}",
            self.from, self.upper, self.first.0, self.first.1, self.last.0, self.last.1
        )
    }
}

/// The divergences in `samples`; one that overlaps `outage` (the database down, when no
/// replica can read a key) counts its time before and after the outage.
fn divergences(
    samples: &[JwksSample],
    clock: Instant,
    outage: &std::ops::Range<Instant>,
    down: &Down,
) -> Vec<Divergence> {
    let since = |at: Instant| match at.checked_duration_since(clock) {
        Some(d) => d.as_secs_f64(),
        None => -clock.duration_since(at).as_secs_f64(),
    };
    let kids = |s: &JwksSample| {
        (
            s.a.clone().unwrap_or_default(),
            s.b.clone().unwrap_or_default(),
        )
    };
    // the sample shows the killed replica down
    let victim_down = |s: &JwksSample| {
        let silent = if down.victim_is_a {
            s.a.is_none()
        } else {
            s.b.is_none()
        };
        silent && down.during.contains(&s.at)
    };
    let mut runs = vec![];
    let mut open: Option<(usize, usize)> = None;
    for (i, s) in samples.iter().enumerate() {
        let both = s.a.is_some() && s.b.is_some();
        let end = match open {
            None => {
                if s.differ() {
                    open = Some((i, i));
                }
                None
            }
            Some((f, _)) if s.differ() => {
                open = Some((f, i));
                None
            }
            Some((f, l)) if both || victim_down(s) => Some((f, l, s.at)),
            // one replica did not answer this sample: the run goes on
            Some(_) => None,
        };
        // still differing at the last sample: at least this long
        let end = end.or(match open {
            Some((f, l)) if i + 1 == samples.len() => Some((f, l, samples[l].at)),
            _ => None,
        });
        if let Some((f, l, until)) = end {
            let (first, last) = (&samples[f], &samples[l]);
            let upper = if first.at < outage.end && until > outage.start {
                outage.start.saturating_duration_since(first.at)
                    + until.saturating_duration_since(outage.end)
            } else {
                until.duration_since(first.at)
            };
            runs.push(Divergence {
                from: since(first.at),
                upper,
                first: kids(first),
                last: kids(last),
            });
            open = None;
        }
    }
    runs
}
