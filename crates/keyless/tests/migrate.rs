//! Moving off the embedded default, with real processes: `keyless up` on a SQLite data dir,
//! `keyless admin migrate` into PostgreSQL, `keyless up --database …` on the same data dir
//! finding everything (tenant, identities, credentials, role assignments, vault secrets,
//! host credentials, signing keys); online backups of running servers restored into empty
//! databases of either backend; restores that must leave the target untouched (not empty,
//! truncated file, another key). Skipped with a message when PostgreSQL is not installed
//! (required when CI=true).

mod common;

use common::*;
use keyless_store::testing::PgServer;
use keyless_store::{Kek, Store};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const KV_API: &str = "api-version=7.4";
const ARM: &str = "https://management.azure.com/";

fn pg() -> Option<PgServer> {
    let pg = PgServer::start();
    if pg.is_none() {
        eprintln!("skipping: PostgreSQL is not installed");
    }
    pg
}

/// `keyless args…` to completion, with none of the database / key variables of the
/// environment (each test names what it means).
fn keyless(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("KEYLESS_DATABASE_URL")
        .env_remove("KEYLESS_KEK")
        .env_remove("KEYLESS_DATA_DIR")
        .envs(env.iter().copied())
        .output()
        .expect("run keyless")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `keyless up` on `data_dir` (its SQLite file unless `database` is given — also when the
/// suite runs its servers on PostgreSQL), server on `listen`.
fn start_up(log_dir: &Path, data_dir: &Path, listen: &str, database: Option<&str>) -> Up {
    let data_s = data_dir.to_string_lossy().to_string();
    let mut cmd = Command::new(bin());
    cmd.args([
        "up",
        "--data-dir",
        &data_s,
        "--listen",
        listen,
        "--imds-listen",
        "127.0.0.1:0",
        "--sync-interval",
        "1",
    ]);
    match database {
        Some(url) => {
            cmd.args(["--database", url]);
        }
        None => {
            // named (as removed), so the harness does not put this server on PostgreSQL
            cmd.env_remove("KEYLESS_DATABASE_URL");
        }
    }
    cmd.env_remove("KEYLESS_KEK");
    let proc = spawn_command_until(cmd, "Stop with Ctrl-C", log_dir).unwrap();
    let info: Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("endpoints.json")).unwrap()).unwrap();
    Up {
        proc,
        info,
        dir: data_dir.to_path_buf(),
    }
}

/// The admin verbs against a running `up`: their JSON output.
struct Cli {
    env: Vec<(&'static str, String)>,
}

impl Cli {
    fn new(up: &Up) -> Cli {
        Cli {
            env: vec![
                ("KEYLESS_DATA_DIR", up.dir.to_string_lossy().to_string()),
                ("KEYLESS_CLIENT_SECRET", up.secret().expect("admin secret")),
            ],
        }
    }
    fn run(&self, args: &[&str]) -> Value {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = keyless(args, &env);
        serde_json::from_str(&ok(&out, &format!("{args:?}"))).unwrap_or(Value::Null)
    }
}

/// The data plane of vault `name` on the server of `up`, with a bearer token.
struct Vault {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Vault {
    async fn new(up: &Up, name: &str, client_id: &str) -> Vault {
        let port: u16 = up
            .s("/serverUrl")
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let (st, tok) = imds_token(
            &up.s("/imdsUrl"),
            &format!("resource=https://vault.localhost:{port}&client_id={client_id}"),
        )
        .await;
        assert_eq!(st, 200, "{tok}");
        let host = format!("{name}.vault.localhost");
        let pem = std::fs::read(up.s("/caFile")).unwrap();
        Vault {
            client: reqwest::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
                .resolve(&host, SocketAddr::from(([127, 0, 0, 1], port)))
                .build()
                .unwrap(),
            base: format!("https://{host}:{port}"),
            token: tok["access_token"].as_str().unwrap().to_string(),
        }
    }
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}?{KV_API}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("vault request");
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }
}

/// The JWKS of the server of `up`.
async fn jwks(up: &Up) -> Value {
    https(&up.s("/caFile"))
        .get(format!(
            "{}/{}/discovery/v2.0/keys",
            up.s("/serverUrl"),
            up.s("/tenantId")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn kids(jwks: &Value) -> Vec<String> {
    let mut k: Vec<String> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

type Counts = BTreeMap<String, u64>;

/// The row counts of a backup file's trailer.
fn trailer(file: &Path) -> Counts {
    let text = std::fs::read_to_string(file).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["end"], true, "a trailer: {last}");
    serde_json::from_value(last["counts"].clone()).unwrap()
}

/// What a store holds, counted by a backup of it.
async fn counts(store: &Store) -> Counts {
    let mut out = vec![];
    store.backup(&mut out).await.unwrap();
    let last: Value =
        serde_json::from_slice(out.split(|b| *b == b'\n').rfind(|l| !l.is_empty()).unwrap())
            .unwrap();
    serde_json::from_value(last["counts"].clone()).unwrap()
}

fn nonzero(c: &Counts) -> Counts {
    c.iter()
        .filter(|(_, n)| **n > 0)
        .map(|(t, n)| (t.clone(), *n))
        .collect()
}

async fn pg_store(url: &str, kek_file: &Path) -> Store {
    Store::postgres(
        &keyless_store::postgres::PgOptions::new(url.to_string()),
        Kek::load_or_create(kek_file).unwrap(),
    )
    .await
    .unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_data_dir_moves_to_postgres_with_everything() {
    let Some(pg) = pg() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut up = start_up(tmp.path(), &data, "127.0.0.1:0", None);
    assert!(data.join("keyless.db").exists());
    let cli = Cli::new(&up);
    let secret = up.secret().unwrap();
    let port = up.s("/serverUrl").rsplit(':').next().unwrap().to_string();
    let demo_client = up.s("/demoIdentity/clientId");
    let demo_principal = up.s("/demoIdentity/principalId");

    // data through the CLI: an identity with a federated credential, a VM using it, a role
    // assignment, a vault whose access policy lets the demo identity manage secrets
    let app = cli.run(&["identity", "create", "-g", "keyless", "-n", "app-id"]);
    let app_principal = app["properties"]["principalId"]
        .as_str()
        .unwrap()
        .to_string();
    cli.run(&[
        "identity",
        "federated-credential",
        "create",
        "-g",
        "keyless",
        "--identity-name",
        "app-id",
        "-n",
        "fic1",
        "--issuer",
        "https://issuer.example",
        "--subject",
        "system:serviceaccount:ns:app",
    ]);
    let vm2 = cli.run(&[
        "vm",
        "create",
        "-g",
        "keyless",
        "-n",
        "vm2",
        "--assign-identity",
        "app-id",
    ]);
    let ra = cli.run(&[
        "role",
        "assignment",
        "create",
        "--assignee-object-id",
        &app_principal,
        "--role",
        "Reader",
        "-g",
        "keyless",
    ]);
    let ra_id = ra["id"].as_str().unwrap().to_string();
    let vault = "migkv";
    cli.run(&["keyvault", "create", "-n", vault, "-g", "keyless"]);
    cli.run(&[
        "keyvault",
        "set-policy",
        "-n",
        vault,
        "--object-id",
        &demo_principal,
        "--secret-permissions",
        "get",
        "set",
        "list",
    ]);
    // a secret, written through the data plane with the demo identity's IMDS token
    let value = format!("pw-{}", uuid::Uuid::new_v4());
    let kv = Vault::new(&up, vault, &demo_client).await;
    let (st, body) = kv
        .call(
            reqwest::Method::PUT,
            "/secrets/db-password",
            Some(json!({ "value": value })),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // tokens issued before the move
    let (st, before) = imds_token(
        &up.s("/imdsUrl"),
        &format!("resource={ARM}&client_id={demo_client}"),
    )
    .await;
    assert_eq!(st, 200, "{before}");
    let before = before["access_token"].as_str().unwrap().to_string();
    let (st, admin_tok) = sp_token(
        &https(&up.s("/caFile")),
        &up.s("/serverUrl"),
        &up.s("/tenantId"),
        &up.s("/adminClientId"),
        &secret,
        "https://management.azure.com/.default",
    )
    .await;
    assert_eq!(st, 200);
    let admin_tok = admin_tok["access_token"].as_str().unwrap().to_string();
    let jwks_before = jwks(&up).await;
    assert!(verifies(&before, &jwks_before));
    let (head, rest) = before.split_once('.').unwrap();
    let tampered = format!("{head}.{}", rest.replacen('e', "f", 1));
    assert!(!verifies(&tampered, &jwks_before), "the check can fail");

    // refused while the server holds the data dir; nothing reaches the target
    let url = pg.database().await;
    let kek_file = data.join("kek");
    let err = refused(
        &keyless(
            &["admin", "migrate", "--from", &s(&data), "--to", &url],
            &[],
        ),
        "migrate while up runs",
    );
    assert!(err.contains("in use by another keyless process"), "{err}");
    up.proc.stop();
    let info1 = up.info.clone();

    let started = std::time::Instant::now();
    let out = ok(
        &keyless(
            &["admin", "migrate", "--from", &s(&data), "--to", &url],
            &[],
        ),
        "migrate",
    );
    eprintln!(
        "migrate took {:.2} s (process wall time)\n{out}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.contains(&format!("keyless server --data-dir {}", data.display())),
        "{out}"
    );
    assert!(out.contains("Row counts checked"), "{out}");
    for t in [
        "identities",
        "fics",
        "vms",
        "role_assignments",
        "vaults",
        "kv_versions",
        "signing_keys",
        "host_credentials",
    ] {
        assert!(
            out.lines().any(|l| l.split_whitespace().next() == Some(t)),
            "{t} counted: {out}"
        );
    }
    assert!(!out.contains(&value) && !out.contains(&secret));
    // the copy holds what the SQLite file holds, row for row
    let sqlite_counts = {
        let st = Store::sqlite(
            &data.join("keyless.db"),
            Kek::load_or_create(&kek_file).unwrap(),
        )
        .unwrap();
        counts(&st).await
    };
    let pg_counts = counts(&pg_store(&url, &kek_file).await).await;
    assert_eq!(pg_counts, sqlite_counts);
    assert!(nonzero(&pg_counts).len() >= 10, "{pg_counts:?}");
    // and is not a target twice
    let err = refused(
        &keyless(
            &["admin", "migrate", "--from", &s(&data), "--to", &url],
            &[],
        ),
        "migrate into a non-empty database",
    );
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(counts(&pg_store(&url, &kek_file).await).await, pg_counts);

    // the same data dir on PostgreSQL, on the same port (the issuer is the same)
    let up2 = start_up(tmp.path(), &data, &format!("127.0.0.1:{port}"), Some(&url));
    for k in [
        "/serverUrl",
        "/tenantId",
        "/subscriptionId",
        "/adminClientId",
        "/vm/resourceId",
        "/systemIdentity/principalId",
        "/demoIdentity/clientId",
    ] {
        assert_eq!(info1.pointer(k), up2.info.pointer(k), "{k}");
    }
    let cli = Cli::new(&up2);
    let shown = cli.run(&["identity", "show", "-g", "keyless", "-n", "app-id"]);
    assert_eq!(shown["properties"], app["properties"]);
    let fics = cli.run(&[
        "identity",
        "federated-credential",
        "list",
        "-g",
        "keyless",
        "--identity-name",
        "app-id",
    ]);
    assert_eq!(fics.as_array().unwrap().len(), 1, "{fics}");
    assert_eq!(
        fics[0]["properties"]["subject"],
        "system:serviceaccount:ns:app"
    );
    let vm = cli.run(&["vm", "show", "-g", "keyless", "-n", "vm2"]);
    assert_eq!(vm["identity"], vm2["identity"]);
    let ras = cli.run(&[
        "role",
        "assignment",
        "list",
        "--assignee",
        &app_principal,
        "--all",
    ]);
    assert!(
        ras.as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == ra_id.as_str()),
        "{ras}"
    );
    // the agent's host credential still works: IMDS tokens for the demo identity, and the
    // secret read through the data plane with one
    let kv = Vault::new(&up2, vault, &demo_client).await;
    let (st, got) = kv
        .call(reqwest::Method::GET, "/secrets/db-password", None)
        .await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(got["value"], value.as_str());
    let (st, after) = imds_token(
        &up2.s("/imdsUrl"),
        &format!("resource={ARM}&client_id={demo_client}"),
    )
    .await;
    assert_eq!(st, 200, "{after}");
    let after = after["access_token"].as_str().unwrap();
    // the same signing keys: the token of before verifies against the JWKS of after, and the
    // new one is signed by the same key
    let jwks_after = jwks(&up2).await;
    assert_eq!(kids(&jwks_after), kids(&jwks_before));
    assert!(verifies(&before, &jwks_after), "a token of before the move");
    assert!(verifies(after, &jwks_after));
    assert_eq!(header(after)["kid"], header(&before)["kid"]);
    // the admin's token of before is still good on the control plane
    let (st, _) = {
        let r = https(&up2.s("/caFile"))
            .get(format!(
                "{}/subscriptions/{}/resourceGroups/keyless?api-version=2024-11-01",
                up2.s("/serverUrl"),
                up2.s("/subscriptionId")
            ))
            .bearer_auth(&admin_tok)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(st, 200);

    // the server writes to PostgreSQL now, not to the SQLite file
    let moved = cli.run(&["identity", "create", "-g", "keyless", "-n", "after-move"]);
    let key = moved["id"].as_str().unwrap().to_lowercase();
    let on_pg = pg_store(&url, &kek_file).await;
    assert!(on_pg
        .read("t")
        .await
        .unwrap()
        .get_identity(&key)
        .await
        .unwrap()
        .is_some());
    let on_sqlite = Store::sqlite(
        &data.join("keyless.db"),
        Kek::load_or_create(&kek_file).unwrap(),
    )
    .unwrap();
    assert!(on_sqlite
        .read("t")
        .await
        .unwrap()
        .get_identity(&key)
        .await
        .unwrap()
        .is_none());

    // an online backup of this running server (PostgreSQL), restored into another database
    let file = tmp.path().join("pg.backup");
    let out = ok(
        &keyless(
            &[
                "admin",
                "backup",
                "--database",
                &url,
                "--to",
                &s(&file),
                "--kek-file",
                &s(&kek_file),
            ],
            &[],
        ),
        "backup of a running server on PostgreSQL",
    );
    assert!(out.contains("opens it"), "the key was checked: {out}");
    assert_eq!(mode(&file), 0o600);
    let in_file = trailer(&file);
    assert_eq!(in_file["identities"], pg_counts["identities"] + 1);
    let other = pg.database().await;
    ok(
        &keyless(
            &[
                "db",
                "restore",
                "--from",
                &s(&file),
                "--to",
                &other,
                "--kek-file",
                &s(&kek_file),
            ],
            &[],
        ),
        "restore into another database",
    );
    assert_eq!(counts(&pg_store(&other, &kek_file).await).await, in_file);
    // and back from PostgreSQL into a data dir of its own (SQLite)
    let back = tmp.path().join("back");
    ok(
        &keyless(
            &[
                "admin",
                "restore",
                "--from",
                &s(&file),
                "--to",
                &s(&back),
                "--kek-file",
                &s(&kek_file),
            ],
            &[],
        ),
        "restore a PostgreSQL backup into a data dir",
    );
    let on_sqlite = Store::sqlite(
        &back.join("keyless.db"),
        Kek::load_or_create(&kek_file).unwrap(),
    )
    .unwrap();
    assert_eq!(counts(&on_sqlite).await, in_file);
    on_sqlite.verify_kek().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_backups_restore_into_empty_databases_only() {
    let Some(pg) = pg() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let kek_file = data.join("kek");
    let up = start_up(tmp.path(), &data, "127.0.0.1:0", None);
    let cli = Cli::new(&up);
    let admin_secret = up.secret().unwrap();
    for n in ["one", "two", "three"] {
        cli.run(&["identity", "create", "-g", "keyless", "-n", n]);
    }
    cli.run(&["keyvault", "create", "-n", "bkkv", "-g", "keyless"]);
    cli.run(&[
        "keyvault",
        "set-policy",
        "-n",
        "bkkv",
        "--object-id",
        &up.s("/demoIdentity/principalId"),
        "--secret-permissions",
        "get",
        "set",
    ]);
    let value = format!("plain-{}", uuid::Uuid::new_v4());
    let kv = Vault::new(&up, "bkkv", &up.s("/demoIdentity/clientId")).await;
    let (st, body) = kv
        .call(
            reqwest::Method::PUT,
            "/secrets/s1",
            Some(json!({ "value": value })),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // enough versions of another secret that the restore inserts that table in several batches
    for i in 0..700 {
        let (st, body) = kv
            .call(
                reqwest::Method::PUT,
                "/secrets/many",
                Some(json!({ "value": format!("v{i}") })),
            )
            .await;
        assert_eq!(st, 200, "{body}");
    }

    // while the server runs (and holds the data dir's lock)
    let file = tmp.path().join("b1.backup");
    let out = ok(
        &keyless(
            &[
                "admin",
                "backup",
                "--data-dir",
                &s(&data),
                "--to",
                &s(&file),
            ],
            &[],
        ),
        "online backup",
    );
    eprintln!("{out}");
    assert!(
        out.contains("opens it"),
        "the data dir's key was checked: {out}"
    );
    let size = std::fs::metadata(&file).unwrap().len();
    eprintln!("backup of the test data: {size} bytes");
    assert_eq!(mode(&file), 0o600);
    let text = std::fs::read(&file).unwrap();
    for plain in [value.as_bytes(), admin_secret.as_bytes(), b"PRIVATE KEY"] {
        assert!(
            !text.windows(plain.len()).any(|w| w == plain),
            "{} in the backup",
            String::from_utf8_lossy(plain)
        );
    }
    let (st, _) = imds_token(&up.s("/imdsUrl"), &format!("resource={ARM}")).await;
    assert_eq!(st, 200, "the server still answers");
    let in_file = trailer(&file);
    assert_eq!(in_file["identities"], 5, "{in_file:?}"); // demo, system, one, two, three
    assert_eq!(in_file["kv_versions"], 701);
    // an existing file is not overwritten
    let err = refused(
        &keyless(
            &[
                "admin",
                "backup",
                "--data-dir",
                &s(&data),
                "--to",
                &s(&file),
            ],
            &[],
        ),
        "backup over an existing file",
    );
    assert!(err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), text);

    // into an empty PostgreSQL database and an empty data dir: the same counts
    let a = pg.database().await;
    let restore = |to: &str, from: &Path, kek: &[&str]| {
        let mut args = vec!["admin", "restore", "--from"];
        let from = s(from);
        args.push(&from);
        args.extend(["--to", to]);
        args.extend(kek);
        keyless(&args, &[])
    };
    let kf = s(&kek_file);
    let started = std::time::Instant::now();
    let out = ok(
        &restore(&a, &file, &["--kek-file", &kf]),
        "restore into PostgreSQL",
    );
    eprintln!(
        "restore into PostgreSQL: {:.2} s\n{out}",
        started.elapsed().as_secs_f64()
    );
    let store_a = pg_store(&a, &kek_file).await;
    assert_eq!(counts(&store_a).await, in_file);
    let restored_dir = tmp.path().join("restored");
    let kek_text = std::fs::read_to_string(&kek_file).unwrap();
    ok(
        &keyless(
            &[
                "admin",
                "restore",
                "--from",
                &s(&file),
                "--to",
                &s(&restored_dir),
            ],
            &[("KEYLESS_KEK", kek_text.trim())],
        ),
        "restore into a data dir",
    );
    assert_eq!(mode(&restored_dir.join("keyless.db")), 0o600);
    let store_b = Store::sqlite(
        &restored_dir.join("keyless.db"),
        Kek::load_or_create(&kek_file).unwrap(),
    )
    .unwrap();
    assert_eq!(counts(&store_b).await, in_file);
    // the secret opens in the copy with the same key
    let ver = store_b
        .read("t")
        .await
        .unwrap()
        .kv_version("bkkv", "secrets", "s1", None)
        .await
        .unwrap()
        .expect("the secret version");
    assert!(ver.private.is_some());

    // not into a database that holds data: refused, nothing written
    let err = refused(
        &restore(&a, &file, &["--kek-file", &kf]),
        "restore into a non-empty database",
    );
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(counts(&store_a).await, in_file);

    // a truncated file (mid-line, and at a line end without its trailer): refused, the
    // target stays empty
    let empty = pg.database().await;
    let cut = tmp.path().join("cut.backup");
    std::fs::write(&cut, &text[..text.len() / 2]).unwrap();
    let err = refused(
        &restore(&empty, &cut, &["--kek-file", &kf]),
        "a truncated backup",
    );
    assert!(err.contains("truncated"), "{err}");
    let without_trailer: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let mut body = without_trailer[..without_trailer.len() - 1].join(&b'\n');
    body.push(b'\n');
    std::fs::write(&cut, &body).unwrap();
    let err = refused(
        &restore(&empty, &cut, &["--kek-file", &kf]),
        "a backup without its trailer",
    );
    assert!(err.contains("truncated"), "{err}");
    // a file with a row taken out: the counts do not match
    let mut lines = without_trailer.clone();
    let row = lines.iter().position(|l| l.starts_with(b"[")).unwrap();
    lines.remove(row);
    let mut body = lines.join(&b'\n');
    body.push(b'\n');
    std::fs::write(&cut, &body).unwrap();
    let err = refused(
        &restore(&empty, &cut, &["--kek-file", &kf]),
        "a backup missing a row",
    );
    assert!(err.contains("counts differ"), "{err}");
    // another key-encryption key: refused, nothing written
    let other_key = tmp.path().join("other.kek");
    Kek::load_or_create(&other_key).unwrap();
    let err = refused(
        &restore(&empty, &file, &["--kek-file", &s(&other_key)]),
        "a restore with another key",
    );
    assert!(err.contains("different key-encryption key"), "{err}");
    let store_empty = pg_store(&empty, &kek_file).await;
    assert!(nonzero(&counts(&store_empty).await).is_empty());

    // an online backup of a database older servers run on (another schema version): refused,
    // and the database is not migrated under them
    let old = pg.database().await;
    drop(pg_store(&old, &kek_file).await);
    let current = keyless_store::migrations::MIGRATIONS.len();
    psql(
        &old,
        &format!("UPDATE keyless_schema SET version = {}", current - 1),
    );
    let err = refused(
        &keyless(
            &[
                "admin",
                "backup",
                "--database",
                &old,
                "--to",
                &s(&tmp.path().join("old.backup")),
                "--kek-file",
                &kf,
            ],
            &[],
        ),
        "an online backup of an older schema",
    );
    assert!(
        err.contains(&format!("schema version {}", current - 1)),
        "{err}"
    );
    assert_eq!(
        psql(&old, "SELECT version FROM keyless_schema"),
        (current - 1).to_string()
    );
    assert!(!tmp.path().join("old.backup").exists());
}

/// One statement through `psql` against `url`; its output, trimmed.
fn psql(url: &str, sql: &str) -> String {
    let bin = keyless_store::testing::pg_bin_dir().expect("PostgreSQL binaries");
    let out = std::process::Command::new(bin.join("psql"))
        .args(["-X", "-q", "-t", "-A", "-d", url, "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
