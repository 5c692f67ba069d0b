//! `keyless kv-agent` end to end with real processes: `keyless up --dev-clock`, a vault with a
//! Keyless-issued AutoRenew certificate, the agent keeping it on disk through a renewal, a
//! refusal (403) and a crash.

mod common;

use common::{imds_token, run, spawn_until, Proc, Up};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const API: &str = "api-version=7.4";

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn read_json(p: &Path) -> Value {
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn hook_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Poll `f` every 100 ms until it is true or `secs` pass.
async fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn target(link: &Path) -> PathBuf {
    std::fs::read_link(link).unwrap()
}

/// The PEM behind `link`: leaf, issuer, private key last, the key matching the leaf.
fn check_pem(link: &Path) {
    let text = std::fs::read_to_string(link).unwrap();
    let labels: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("-----BEGIN "))
        .collect();
    assert_eq!(
        labels,
        ["CERTIFICATE-----", "CERTIFICATE-----", "PRIVATE KEY-----"],
        "{text}"
    );
    assert!(text.ends_with("-----END PRIVATE KEY-----\n"));
    let (key, certs) = keyless_pki::kv::parse_pem(&text).unwrap();
    let key = key.expect("a private key");
    let written = keyless_pki::pem_blocks(&text, "CERTIFICATE");
    assert_eq!(written, certs, "the file is in chain order already");
    assert!(keyless_pki::kv::cert_matches_key(&written[0], &key));
    assert!(!keyless_pki::kv::cert_matches_key(&written[1], &key));
}

fn temp_files(store: &Path) -> Vec<String> {
    std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".kvagent-tmp."))
        .collect()
}

struct Vault {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Vault {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut req = self
            .client
            .request(method, format!("{}{path}{sep}{API}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("vault request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn latest_version(&self, name: &str) -> String {
        let (st, v) = self
            .call(reqwest::Method::GET, &format!("/certificates/{name}"), None)
            .await;
        assert_eq!(st, 200, "{v}");
        v["id"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_agent_keeps_a_renewing_certificate_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Up::start(tmp.path(), &["--dev-clock"]).unwrap();
    let secret = up.secret().expect("admin secret");
    let data = up.dir.to_string_lossy().to_string();
    let env = [
        ("KEYLESS_DATA_DIR", data.as_str()),
        ("KEYLESS_CLIENT_SECRET", secret.as_str()),
    ];
    let cli = |args: &[&str]| -> Value {
        let out = run(args, &env);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let server = up.s("/serverUrl");
    let port: u16 = server.rsplit(':').next().unwrap().parse().unwrap();
    let imds = up.s("/imdsUrl");
    let ca = up.s("/caFile");
    let system = up.s("/systemIdentity/principalId");
    let demo_principal = up.s("/demoIdentity/principalId");
    let demo_client = up.s("/demoIdentity/clientId");
    assert!(!system.is_empty() && !demo_client.is_empty(), "{}", up.info);

    // A vault; the system identity (the agent's) may read secrets, the demo identity (same
    // VM) manages certificates.
    let vault = format!("kva{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let host = format!("{vault}.vault.localhost");
    cli(&["keyvault", "create", "-n", &vault, "-g", "keyless"]);
    cli(&[
        "keyvault",
        "set-policy",
        "-n",
        &vault,
        "--object-id",
        &system,
        "--secret-permissions",
        "get",
        "list",
    ]);
    cli(&[
        "keyvault",
        "set-policy",
        "-n",
        &vault,
        "--object-id",
        &demo_principal,
        "--certificate-permissions",
        "create",
        "get",
        "list",
    ]);

    // A Keyless-issued certificate: 1 month, AutoRenew 7 days before expiry, PKCS#12.
    let resource = format!("https://vault.localhost:{port}");
    let (st, tok) = imds_token(
        &imds,
        &format!("resource={resource}&client_id={demo_client}"),
    )
    .await;
    assert_eq!(st, 200, "{tok}");
    let pem = std::fs::read(&ca).unwrap();
    let v = Vault {
        client: reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
            .resolve(&host, SocketAddr::from(([127, 0, 0, 1], port)))
            .build()
            .unwrap(),
        base: format!("https://{host}:{port}"),
        token: tok["access_token"].as_str().unwrap().to_string(),
    };
    let name = "web-cert";
    let (st, body) = v
        .call(
            reqwest::Method::POST,
            &format!("/certificates/{name}/create"),
            Some(json!({"policy": {
                "issuer": {"name": "Keyless"},
                "key_props": {"exportable": true, "kty": "RSA", "key_size": 2048, "reuse_key": false},
                "secret_props": {"contentType": "application/x-pkcs12"},
                "x509_props": {"subject": "CN=app.example", "sans": {"dns_names": ["app.example"]}, "validity_months": 1},
                "lifetime_actions": [{"trigger": {"days_before_expiry": 7}, "action": {"action_type": "AutoRenew"}}]
            }})),
        )
        .await;
    assert_eq!(st, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, p) = v
            .call(
                reqwest::Method::GET,
                &format!("/certificates/{name}/pending"),
                None,
            )
            .await;
        assert_eq!(st, 200, "{p}");
        if p["status"] == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "issuance did not complete: {p}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v1 = v.latest_version(name).await;

    // The agent, from a guest-agent handler settings file.
    let store = tmp.path().join("store/certs");
    let status_dir = tmp.path().join("status");
    let hook_file = tmp.path().join("hook.log");
    let url = format!("https://{host}:{port}/secrets/{name}");
    let settings = json!({"runtimeSettings": [{"handlerSettings": {"publicSettings": {
        "secretsManagementSettings": {
            "pollingIntervalInS": "1",
            "certificateStoreLocation": store,
            "requireInitialSync": true,
            "observedCertificates": [url]
        },
        "authenticationSettings": {"msiEndpoint": format!("{imds}/metadata/identity")}
    }}}]});
    let settings_file = tmp.path().join("0.settings");
    std::fs::write(
        &settings_file,
        serde_json::to_vec_pretty(&settings).unwrap(),
    )
    .unwrap();
    let settings_s = settings_file.to_string_lossy().to_string();
    let status_s = status_dir.to_string_lossy().to_string();
    let hook = format!("echo \"$KEYLESS_KV_CHANGED\" >> '{}'", hook_file.display());
    let resolve = format!("{host}=127.0.0.1:{port}");
    let agent_args: Vec<&str> = vec![
        "kv-agent",
        "--settings",
        &settings_s,
        "--status-dir",
        &status_s,
        "--reload-hook",
        &hook,
        "--ca-file",
        &ca,
        "--resolve",
        &resolve,
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let started = Instant::now();
    let mut agent: Proc = spawn_until(&agent_args, "kv-agent: initial sync done", tmp.path())
        .unwrap_or_else(|e| panic!("kv-agent: {e}"));
    eprintln!("initial sync in {:?}", started.elapsed());

    // 1. Installed: symlink → 0600 file in a 0700 dir; leaf, CA, key last; status success.
    let link = store.join(format!("{vault}.{name}"));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let first = target(&link);
    assert_eq!(first, PathBuf::from(format!("{vault}.{name}.{v1}")));
    assert_eq!(mode(&store), 0o700);
    assert_eq!(mode(&store.join(&first)), 0o600);
    check_pem(&link);
    let status_path = status_dir.join("0.status");
    let doc = read_json(&status_path);
    eprintln!("status after the initial sync: {doc}");
    assert_eq!(doc[0]["version"], "1.0", "{doc}");
    assert!(doc[0]["timestampUTC"].as_str().unwrap().ends_with('Z'));
    let s = &doc[0]["status"];
    assert_eq!(s["name"], "KeyVaultForLinux");
    assert_eq!(s["status"], "success", "{doc}");
    assert_eq!(s["code"], 0);
    assert_eq!(s["formattedMessage"]["lang"], "en");
    assert_eq!(s["substatus"][0]["name"], url.as_str());
    assert_eq!(s["substatus"][0]["status"], "success");
    assert_eq!(hook_lines(&hook_file), [link.display().to_string()]);

    // 2. Renewal: the Key Vault clock moves 25 days; AutoRenew issues a new version and the
    //    agent switches the link; the old file stays; the hook runs once more.
    cli(&["keyvault", "advance-clock", "--days", "25"]);
    let v2 = v.latest_version(name).await;
    assert_ne!(v1, v2);
    let renewed = Instant::now();
    wait_for(30, "the renewed version on disk", || {
        std::fs::read_link(&link).is_ok_and(|t| t != first)
    })
    .await;
    eprintln!("renewal picked up in {:?}", renewed.elapsed());
    let second = target(&link);
    assert_eq!(second, PathBuf::from(format!("{vault}.{name}.{v2}")));
    assert!(store.join(&first).is_file(), "old versions are kept");
    assert_eq!(mode(&store.join(&second)), 0o600);
    check_pem(&link);
    wait_for(10, "the second hook run", || {
        hook_lines(&hook_file).len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(hook_lines(&hook_file).len(), 2, "initial + renewal only");

    // the agent's metrics: two versions installed, and the days left of the one on disk
    let ops = agent
        .find("Ops endpoint: http://")
        .expect("the kv-agent's ops endpoint");
    let ops = ops.split_whitespace().next().unwrap();
    let text = reqwest::get(format!("http://{ops}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sample = |name: &str, labels: &[&str]| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        sample(
            "keyless_certificate_renewals_total",
            &["source=\"kvagent\"", "result=\"ok\""]
        ),
        2.0
    );
    let certificate = format!("certificate=\"{name}\"");
    let days = sample(
        "keyless_certificate_days_to_expiry",
        &["source=\"kvagent\"", &certificate],
    );
    // the renewed version: one month of validity from the Key Vault clock moved 25 days ahead,
    // counted from the real time (28..31 + 25 days)
    assert!((52.0..=57.0).contains(&days), "{days}");

    // 3. The identity loses access, then a renewal happens: the status reports the vault's
    //    403 ForbiddenByPolicy; the link keeps pointing at the previous complete file.
    cli(&[
        "keyvault",
        "delete-policy",
        "-n",
        &vault,
        "--object-id",
        &system,
    ]);
    cli(&["keyvault", "advance-clock", "--days", "30"]);
    let v3 = v.latest_version(name).await;
    assert_ne!(v3, v2);
    let mut last = Value::Null;
    wait_for(30, "a 403 in the status", || {
        last = read_json(&status_path);
        let sub = &last[0]["status"]["substatus"][0];
        sub["status"] == "error"
            && sub["formattedMessage"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("ForbiddenByPolicy") && m.contains("403"))
    })
    .await;
    eprintln!("status with the refusal: {last}");
    assert_eq!(last[0]["status"]["substatus"][0]["code"], 403);
    assert_eq!(last[0]["status"]["status"], "warning");
    assert!(last[0]["status"]["formattedMessage"]["message"]
        .as_str()
        .unwrap()
        .contains("ForbiddenByPolicy"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(target(&link), second, "nothing replaced on a refusal");
    check_pem(&link);
    assert_eq!(hook_lines(&hook_file).len(), 2);

    // 4. Access back: the agent catches up (v3). Then a renewal (v4) and SIGKILL right
    //    after it; leftovers of an interrupted write are planted too. The restarted agent
    //    cleans them and the link resolves to a complete PEM of the latest version.
    cli(&[
        "keyvault",
        "set-policy",
        "-n",
        &vault,
        "--object-id",
        &system,
        "--secret-permissions",
        "get",
        "list",
    ]);
    wait_for(30, "v3 on disk", || {
        std::fs::read_link(&link).is_ok_and(|t| t.to_string_lossy().ends_with(&v3))
    })
    .await;
    check_pem(&link);
    cli(&["keyvault", "advance-clock", "--days", "30"]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let v4 = v.latest_version(name).await;
    assert_ne!(v4, v3);
    check_pem(&link);
    std::fs::write(
        store.join(".kvagent-tmp.file.99999.0.1"),
        b"-----BEGIN CERTIFICATE-----\nMIIB",
    )
    .unwrap();
    std::os::unix::fs::symlink(
        format!("{vault}.{name}.{v4}"),
        store.join(".kvagent-tmp.link.99999.1.2"),
    )
    .unwrap();
    let mut agent = spawn_until(&agent_args, "kv-agent: initial sync done", tmp.path())
        .unwrap_or_else(|e| panic!("kv-agent restart: {e}"));
    assert!(temp_files(&store).is_empty(), "{:?}", temp_files(&store));
    assert_eq!(target(&link), PathBuf::from(format!("{vault}.{name}.{v4}")));
    assert_eq!(mode(&store.join(target(&link))), 0o600);
    check_pem(&link);
    wait_for(10, "success after the restart", || {
        read_json(&status_path)[0]["status"]["status"] == "success"
    })
    .await;
    for v in [&v1, &v2, &v3, &v4] {
        assert!(
            store.join(format!("{vault}.{name}.{v}")).is_file(),
            "{v} kept"
        );
    }
    agent.stop();
}
