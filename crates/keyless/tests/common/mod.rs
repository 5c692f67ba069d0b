//! Helpers for end-to-end tests: real `keyless` processes on port 0 with their own temp data
//! dirs, killed (by PID) when dropped.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keyless")
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub lines: Vec<String>,
    pub stderr_path: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn stop(&mut self) {
        // SIGTERM for a clean stop, then make sure.
        unsafe_free_kill(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn find(&self, prefix: &str) -> Option<String> {
        self.lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|s| s.trim().to_string()))
    }
}

fn unsafe_free_kill(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

/// Spawn `keyless args...` and read stdout until a line contains `marker`.
pub fn spawn_until(args: &[&str], marker: &str, log_dir: &Path) -> Result<Proc, String> {
    spawn_program_until(bin(), args, marker, log_dir)
}

/// Spawn `program args...` (e.g. `ip netns exec <ns> keyless ...`) and read stdout until a
/// line contains `marker`.
pub fn spawn_program_until(
    program: &str,
    args: &[&str],
    marker: &str,
    log_dir: &Path,
) -> Result<Proc, String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    spawn_command_until(cmd, marker, log_dir)
}

/// Spawn `cmd` (stderr to a file in `log_dir`) and read its stdout until a line contains
/// `marker`.
pub fn spawn_command_until(mut cmd: Command, marker: &str, log_dir: &Path) -> Result<Proc, String> {
    on_test_database(&mut cmd);
    let stderr_path = log_dir.join(format!("stderr-{}.log", uuid::Uuid::new_v4()));
    let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
    let mut child = cmd
        // ops listeners on free ports (the defaults are fixed; tests run side by side)
        .env("KEYLESS_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // keep draining after the marker: a process whose stdout is closed dies at its
            // next line (Rust's println! panics on EPIPE)
            let _ = tx.send(line);
        }
    });
    let mut lines = vec![];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut proc = Proc {
        child,
        lines: vec![],
        stderr_path,
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => {
                let done = l.contains(marker);
                lines.push(l);
                if done {
                    proc.lines = lines;
                    return Ok(proc);
                }
            }
            Err(_) => {
                if let Ok(Some(status)) = proc.child.try_wait() {
                    let err = std::fs::read_to_string(&proc.stderr_path).unwrap_or_default();
                    return Err(format!("exited {status}: stdout {lines:?} stderr {err}"));
                }
                if Instant::now() > deadline {
                    return Err(format!("timed out waiting for {marker:?}: {lines:?}"));
                }
            }
        }
    }
}

/// When the suite runs on PostgreSQL (`KEYLESS_TEST_PG_ADMIN_URL`, set by scripts/test), a
/// `keyless up` / `keyless server` without `--database` gets a database of its own, keyed by
/// its data dir (a restart on the same dir finds its data).
fn on_test_database(cmd: &mut Command) {
    let Some(admin) = keyless_store::testing::shared_admin_url() else {
        return;
    };
    let args: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let Some(at) = args.iter().position(|a| a.ends_with("keyless")) else {
        return;
    };
    let rest = &args[at + 1..];
    if !matches!(rest.first().map(String::as_str), Some("up" | "server"))
        || rest.iter().any(|a| a == "--database")
        || cmd.get_envs().any(|(k, _)| k == "KEYLESS_DATABASE_URL")
    {
        return;
    }
    let dir = rest
        .iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| rest.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".keyless"));
    let _ = std::fs::create_dir_all(&dir);
    let name = keyless_store::testing::database_for_dir(&dir);
    cmd.env(
        "KEYLESS_DATABASE_URL",
        keyless_store::testing::ensure_database(&admin, &name),
    );
}

/// Whether this run's servers use PostgreSQL (tests that open the SQLite file skip that part).
#[allow(dead_code)]
pub fn on_postgres() -> bool {
    keyless_store::testing::shared_admin_url().is_some()
}

/// Everything a server with data dir `data_dir` has stored, as bytes to search: the SQLite
/// file with its WAL and journal, or on PostgreSQL every value of a full backup (text as is,
/// bytes decoded). The server should be stopped (or idle) first.
#[allow(dead_code)]
pub async fn stored_bytes(data_dir: &Path) -> Vec<u8> {
    let mut out = vec![];
    let Some(admin) = keyless_store::testing::shared_admin_url() else {
        for e in std::fs::read_dir(data_dir).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().starts_with("keyless.db") {
                out.extend(std::fs::read(e.path()).unwrap());
            }
        }
        return out;
    };
    use base64::Engine as _;
    let url = keyless_store::testing::ensure_database(
        &admin,
        &keyless_store::testing::database_for_dir(data_dir),
    );
    let kek = keyless_store::Kek::load_or_create(&data_dir.join("kek")).unwrap();
    let store = keyless_store::Store::postgres(&keyless_store::postgres::PgOptions::new(url), kek)
        .await
        .unwrap();
    let mut dump = vec![];
    store.backup(&mut dump).await.unwrap();
    for line in dump.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line).unwrap();
        for cell in v.as_array().into_iter().flatten() {
            match cell {
                Value::String(t) => out.extend(t.as_bytes()),
                Value::Object(o) => out.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(o["b64"].as_str().unwrap())
                        .unwrap(),
                ),
                _ => {}
            }
        }
    }
    out
}

/// Run `keyless args...` to completion.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run keyless")
}

/// A running `keyless up`.
pub struct Up {
    pub proc: Proc,
    pub info: Value,
    pub dir: PathBuf,
}

/// `keyless up` on port 0 with its data in `data_dir`, syncing every second.
pub fn up_args(data_dir: &str) -> Vec<&str> {
    vec![
        "up",
        "--data-dir",
        data_dir,
        "--listen",
        "127.0.0.1:0",
        "--imds-listen",
        "127.0.0.1:0",
        "--sync-interval",
        "1",
    ]
}

impl Up {
    pub fn start(dir: &Path, extra: &[&str]) -> Result<Up, String> {
        let data = dir.join("data");
        let data_s = data.to_string_lossy().to_string();
        let mut args = up_args(&data_s);
        args.extend_from_slice(extra);
        let proc = spawn_until(&args, "Stop with Ctrl-C", dir)?;
        let info: Value = serde_json::from_slice(
            &std::fs::read(data.join("endpoints.json")).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        Ok(Up {
            proc,
            info,
            dir: data,
        })
    }

    pub fn s(&self, ptr: &str) -> String {
        self.info
            .pointer(ptr)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }

    /// The bootstrap admin's secret, from the 0600 file the first start writes (stdout never
    /// carries it without `--print-secret`).
    pub fn secret(&self) -> Option<String> {
        admin_secret(&self.dir)
    }
}

/// `KEYLESS_CLIENT_SECRET` of `<data-dir>/bootstrap-admin.secret`.
pub fn admin_secret(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("bootstrap-admin.secret")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("KEYLESS_CLIENT_SECRET="))
        .map(str::to_string)
}

pub fn https(ca_file: &str) -> reqwest::Client {
    let pem = std::fs::read(ca_file).expect("ca");
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("pem")])
        .build()
        .expect("client")
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// Client-credentials token from the STS.
pub async fn sp_token(
    c: &reqwest::Client,
    server: &str,
    tenant: &str,
    id: &str,
    secret: &str,
    scope: &str,
) -> (u16, Value) {
    let r = c
        .post(format!("{server}/{tenant}/oauth2/v2.0/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", secret),
            ("scope", scope),
        ])
        .send()
        .await
        .expect("token request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// GET the IMDS token endpoint.
pub async fn imds_token(imds: &str, query: &str) -> (u16, Value) {
    let r = http()
        .get(format!(
            "{imds}/metadata/identity/oauth2/token?api-version=2018-02-01&{query}"
        ))
        .header("Metadata", "true")
        .send()
        .await
        .expect("imds");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Decode a JWT's claims (no verification; signatures are verified by the python suite with
/// PyJWT and by `verify_with_jwks`).
pub fn claims(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

pub fn header(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

/// A running `keyless server`, with the admin environment for the CLI verbs.
pub struct ServerProc {
    pub proc: Proc,
    pub url: String,
    pub ca: String,
    env: Vec<(&'static str, String)>,
}

impl ServerProc {
    pub fn start(dir: &Path, extra: &[&str]) -> ServerProc {
        Self::start_on(dir, "127.0.0.1:0", extra)
    }

    /// [`ServerProc::start`] listening on `listen` (the CLI still uses https://localhost).
    pub fn start_on(dir: &Path, listen: &str, extra: &[&str]) -> ServerProc {
        let data = dir.join("server");
        let data_s = data.to_string_lossy().to_string();
        let mut args = vec!["server", "--data-dir", &data_s, "--listen", listen];
        args.extend_from_slice(extra);
        let proc = spawn_until(&args, "export KEYLESS_CLIENT_ID=", dir).unwrap();
        let listen = proc.find("Keyless server listening on https://").unwrap();
        let port = listen
            .split_whitespace()
            .next()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_string();
        let url = format!("https://localhost:{port}");
        let ca = data.join("pki/ca.pem").to_string_lossy().to_string();
        let env = vec![
            ("KEYLESS_SERVER", url.clone()),
            ("KEYLESS_TENANT_ID", proc.find("Tenant:").unwrap()),
            ("KEYLESS_CA_FILE", ca.clone()),
            (
                "KEYLESS_CLIENT_ID",
                proc.find("export KEYLESS_CLIENT_ID=").unwrap(),
            ),
            (
                "KEYLESS_CLIENT_SECRET",
                admin_secret(&data).expect("bootstrap admin secret file"),
            ),
            ("KEYLESS_DATA_DIR", data_s),
        ];
        ServerProc { proc, url, ca, env }
    }

    /// An HTTPS client trusting the server, and an admin bearer token for ARM.
    pub async fn admin(&self) -> (reqwest::Client, String) {
        let get = |k: &str| {
            self.env
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let c = https(&self.ca);
        let (st, v) = sp_token(
            &c,
            &self.url,
            &get("KEYLESS_TENANT_ID"),
            &get("KEYLESS_CLIENT_ID"),
            &get("KEYLESS_CLIENT_SECRET"),
            "https://management.azure.com/.default",
        )
        .await;
        assert_eq!(st, 200, "{v}");
        (
            c,
            v["access_token"].as_str().unwrap_or_default().to_string(),
        )
    }

    /// Run an admin verb that must succeed; its JSON output.
    pub fn cli(&self, args: &[&str]) -> Value {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = run(args, &env);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// `keyless node` arguments for a node of this server.
    pub fn node_args<'a>(&'a self, state: &'a str, token: Option<&'a str>) -> Vec<&'a str> {
        let mut v = vec![
            "node",
            "--server",
            &self.url,
            "--ca-file",
            &self.ca,
            "--state-dir",
            state,
            "--imds-listen",
            "127.0.0.1:0",
            "--sync-interval",
            "1",
        ];
        if let Some(t) = token {
            v.extend(["--join-token", t]);
        }
        v
    }
}

/// The records of an audit file (each line's JSON), in order.
pub fn audit_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
        .collect()
}

/// Wait (up to 10 s: the writer appends within a batch of the answer) until the audit file at
/// `path` has a record `want` accepts; that record. Panics listing the records otherwise.
pub fn wait_audit(path: &Path, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let recs = audit_records(path);
        if let Some(r) = recs.iter().find(|r| want(r)) {
            return r.clone();
        }
        if std::time::Instant::now() > deadline {
            let all: Vec<String> = recs.iter().map(Value::to_string).collect();
            panic!(
                "no audit record for {what} in {}:\n{}",
                path.display(),
                all.join("\n")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Whether `token`'s RS256 signature verifies with the key of `jwks` its `kid` names.
pub fn verifies(token: &str, jwks: &Value) -> bool {
    use base64::Engine;
    let b64 = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .unwrap()
    };
    let kid = header(token)["kid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let Some(key) = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
    else {
        return false;
    };
    let (input, sig) = token.rsplit_once('.').unwrap();
    let public = keyless_pki::RsaPublic {
        n: b64(key["n"].as_str().unwrap()),
        e: b64(key["e"].as_str().unwrap()),
    };
    keyless_pki::verify_rs256(&public, input.as_bytes(), &b64(sig))
}
