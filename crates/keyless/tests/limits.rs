//! Listener limits of a real `keyless up` (root: the second caller runs as `nobody`):
//! - the idle-connection flood: with `RLIMIT_NOFILE` at 1,024, 2,000 idle TCP connections to
//!   the IMDS port and 2,000 to the server port do not stop another process from getting a
//!   token and a server answer within a 1 s client timeout;
//! - per-caller fair share: one caller hammering IMDS gets 429 + `Retry-After`, another local
//!   user (another UID on the same address) keeps getting tokens.

mod common;

use common::Proc;
use serde_json::Value;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions
    unsafe { libc::geteuid() == 0 }
}

/// `keyless args…` with its file limit at `nofile` (soft = hard), read until a stdout line
/// contains `marker`.
fn spawn_with_nofile(dir: &Path, args: &[&str], nofile: u64, marker: &str) -> Proc {
    // KEYLESS_LIMITS_BIN: run the test against another build (e.g. one before the limits)
    let bin = std::env::var("KEYLESS_LIMITS_BIN").unwrap_or_else(|_| common::bin().into());
    let mut cmd = Command::new(bin);
    cmd.args(args);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    common::spawn_command_until(cmd, marker, dir)
        .unwrap_or_else(|e| panic!("keyless {args:?}: {e}"))
}

/// `keyless up` with its file limit at `nofile`, on port 0, in `dir`.
fn up_with_nofile(dir: &Path, nofile: u64) -> (Proc, Value) {
    let data = dir.join("data");
    let data_s = data.to_string_lossy().to_string();
    let proc = spawn_with_nofile(dir, &common::up_args(&data_s), nofile, "Stop with Ctrl-C");
    let info: Value =
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap();
    (proc, info)
}

/// A `keyless node` joined to `up` serving the App Service and Arc endpoints, its file limit at
/// `nofile`: (process, App Service endpoint, its header secret, Arc endpoint).
fn node_with_local_endpoints(
    dir: &Path,
    up: &Proc,
    info: &Value,
    nofile: u64,
) -> (Proc, String, String, String) {
    let data = dir.join("data");
    let secret = common::admin_secret(&data)
        .or_else(|| up.find("export KEYLESS_CLIENT_SECRET="))
        .expect("the bootstrap admin secret");
    let data_s = data.to_string_lossy().to_string();
    let env = [
        ("KEYLESS_DATA_DIR", data_s.as_str()),
        ("KEYLESS_CLIENT_SECRET", secret.as_str()),
    ];
    let cli = |args: &[&str]| -> Value {
        let out = common::run(args, &env);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    cli(&[
        "vm",
        "create",
        "-g",
        "keyless",
        "-n",
        "limits-vm",
        "--assign-identity",
    ]);
    let tok = cli(&["vm", "join-token", "-g", "keyless", "-n", "limits-vm"])["joinToken"]
        .as_str()
        .unwrap()
        .to_string();
    let s = |p: &str| info.pointer(p).and_then(Value::as_str).unwrap().to_string();
    let (server, ca) = (s("/serverUrl"), s("/caFile"));
    let state = dir.join("node").to_string_lossy().to_string();
    let arc_dir = dir.join("arc").to_string_lossy().to_string();
    let args = [
        "node",
        "--server",
        &server,
        "--ca-file",
        &ca,
        "--state-dir",
        &state,
        "--join-token",
        &tok,
        "--imds-listen",
        "127.0.0.1:0",
        "--sync-interval",
        "1",
        "--endpoints",
        "imds,appservice,arc",
        "--appservice-listen",
        "127.0.0.1:0",
        "--arc-listen",
        "127.0.0.1:0",
        "--arc-token-dir",
        &arc_dir,
    ];
    let node = spawn_with_nofile(dir, &args, nofile, "Arc endpoint");
    let export = |prefix: &str| -> String {
        let line = node.find(prefix).unwrap();
        let v = line
            .split_whitespace()
            .find_map(|p| p.strip_prefix("IDENTITY_ENDPOINT="))
            .unwrap();
        v.to_string()
    };
    let app = export("App Service endpoint:");
    let arc = export("Arc endpoint:");
    let header = std::fs::read_to_string(dir.join("node/identity-header")).unwrap();
    (node, app, header.trim().to_string(), arc)
}

/// Raise this process's soft file limit to its hard limit (the flood holds thousands).
fn raise_own_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only touch the struct passed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

fn addr_of(url: &str) -> SocketAddr {
    let rest = url
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let hostport = rest.split('/').next().unwrap();
    hostport
        .to_socket_addrs()
        .unwrap()
        .find(SocketAddr::is_ipv4)
        .unwrap()
}

/// Open up to `n` idle connections to `addr`; stops at the first that cannot connect within
/// 2 s (a listener that stopped accepting leaves its backlog full; a SYN dropped while the
/// backlog is momentarily full is retried by the kernel after 1 s).
fn flood(addr: SocketAddr, n: usize, into: &mut Vec<TcpStream>) -> usize {
    for i in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => into.push(s),
            Err(_) => return i,
        }
    }
    n
}

/// `curl` in its own process (optionally as `uid`) with a 1 s timeout: (status, headers, body).
fn curl(uid: Option<u32>, args: &[&str]) -> (u16, String, String) {
    let mut c = Command::new("curl");
    c.args(["-q", "-s", "-m", "1", "-D", "-", "-w", "\n%{http_code}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY");
    if let Some(u) = uid {
        c.uid(u).gid(u).current_dir("/");
    }
    let out = c.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (rest, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (
        code.trim().parse().unwrap_or(0),
        head.to_string(),
        body.to_string(),
    )
}

fn token_url(imds: &str, resource: &str) -> String {
    format!("{imds}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}")
}

#[test]
fn an_idle_connection_flood_does_not_starve_other_callers() {
    if !is_root() {
        eprintln!("skipped: needs root (a second caller runs as nobody)");
        return;
    }
    raise_own_nofile();
    let dir = tempfile::tempdir().unwrap();
    let (mut up, info) = up_with_nofile(dir.path(), 1024);
    let (mut node, app, app_header, arc) = node_with_local_endpoints(dir.path(), &up, &info, 1024);
    let s = |p: &str| info.pointer(p).and_then(Value::as_str).unwrap().to_string();
    let (imds, server, ca, tenant) = (s("/imdsUrl"), s("/serverUrl"), s("/caFile"), s("/tenantId"));
    let discovery = format!(
        "https://localhost:{}/{tenant}/v2.0/.well-known/openid-configuration",
        addr_of(&server).port()
    );
    let resolve = format!("localhost:{}:127.0.0.1", addr_of(&server).port());
    let arm = token_url(&imds, "https://management.azure.com/");
    let (st, _, body) = curl(None, &["-H", "Metadata: true", &arm]);
    assert_eq!(st, 200, "{body}");

    let mut held = vec![];
    let t = Instant::now();
    let to_imds = flood(addr_of(&imds), 2000, &mut held);
    let to_server = flood(addr_of(&server), 2000, &mut held);
    let to_app = flood(addr_of(&app), 2000, &mut held);
    let to_arc = flood(addr_of(&arc), 2000, &mut held);
    eprintln!("flood of {} connections took {:?}", held.len(), t.elapsed());
    // a cached token, a fresh one (the agent asks the flooded server), a server request
    let (st, _, body) = curl(None, &["-H", "Metadata: true", &arm]);
    assert_eq!(st, 200, "cached IMDS token during the flood: {body}");
    let vault = token_url(&imds, "https://vault.azure.net");
    let (st, _, body) = curl(None, &["-H", "Metadata: true", &vault]);
    assert_eq!(st, 200, "fresh IMDS token during the flood: {body}");
    let (st, _, body) = curl(None, &["--cacert", &ca, "--resolve", &resolve, &discovery]);
    assert_eq!(st, 200, "server during the flood: {body}");
    // the App Service endpoint, and the Arc endpoint's challenge and answer
    let app_url = format!("{app}?api-version=2019-08-01&resource=https://management.azure.com/");
    let app_hdr = format!("X-IDENTITY-HEADER: {app_header}");
    let (st, _, body) = curl(None, &["-H", &app_hdr, &app_url]);
    assert_eq!(st, 200, "App Service token during the flood: {body}");
    let arc_url = format!("{arc}?api-version=2020-06-01&resource=https://management.azure.com/");
    let (st, head, body) = curl(None, &["-H", "Metadata: true", &arc_url]);
    assert_eq!(st, 401, "Arc challenge during the flood: {body}");
    let key_file = head
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("www-authenticate: basic realm=")
        })
        .and_then(|l| l.split_once('='))
        .expect("challenge")
        .1
        .trim()
        .to_string();
    let key = std::fs::read_to_string(&key_file).unwrap();
    let auth = format!("Authorization: Basic {}", key.trim());
    let (st, _, body) = curl(None, &["-H", "Metadata: true", "-H", &auth, &arc_url]);
    assert_eq!(st, 200, "Arc token during the flood: {body}");
    // another local user, too
    let (st, _, body) = curl(Some(NOBODY), &["-H", "Metadata: true", &arm]);
    assert_eq!(st, 200, "nobody's token during the flood: {body}");
    assert_eq!(
        (to_imds, to_server, to_app, to_arc),
        (2000, 2000, 2000, 2000),
        "the listeners stopped accepting"
    );
    drop(held);

    // fair share: root hammers the token endpoint, nobody keeps getting tokens
    let hammer = {
        let arm = arm.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let c = common::http();
                let (mut ok, mut limited, mut retry_after) = (0, 0, None);
                let until = Instant::now() + Duration::from_millis(1500);
                while Instant::now() < until {
                    let r = c.get(&arm).header("Metadata", "true").send().await.unwrap();
                    match r.status().as_u16() {
                        200 => ok += 1,
                        429 => {
                            limited += 1;
                            retry_after = r
                                .headers()
                                .get("retry-after")
                                .map(|v| v.to_str().unwrap().to_string());
                            let v: Value = r.json().await.unwrap();
                            assert_eq!(v["error"], "too_many_requests", "{v}");
                        }
                        other => panic!("unexpected {other}"),
                    }
                }
                (ok, limited, retry_after)
            })
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let (st, _, body) = curl(Some(NOBODY), &["-H", "Metadata: true", &arm]);
        assert_eq!(st, 200, "nobody while root floods: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, limited, retry_after) = hammer.join().unwrap();
    assert!(ok >= 20, "the flooding caller still gets its share: {ok}");
    assert!(
        limited > 0,
        "the flooding caller was never limited ({ok} ok)"
    );
    let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=5).contains(&secs), "{secs}");
    node.stop();
    up.stop();
}
