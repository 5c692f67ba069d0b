//! Two `keyless server` replicas on one PostgreSQL database; host agents and the CLI given
//! both URLs (`--server A,B`) keep working when replica A is killed (SIGKILL): token requests
//! the agent's cache cannot answer, a new host's join, and control-plane writes go to B.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// The port in a "Keyless server listening on https://127.0.0.1:PORT (issuer …)" line.
fn listen_port(p: &Proc) -> String {
    let listen = p.find("Keyless server listening on https://").unwrap();
    let addr = listen.split_whitespace().next().unwrap();
    addr.rsplit(':').next().unwrap().to_string()
}

/// `keyless server` on `db` with data in `<dir>/server`, for a database another replica has
/// already bootstrapped (it prints the admin's client id, not a new secret); its base URL.
fn second_replica(dir: &Path, db: &str, kek: &str) -> (Proc, String) {
    std::fs::create_dir_all(dir).unwrap();
    let data = dir.join("server").to_string_lossy().to_string();
    let p = spawn_until(
        &[
            "server",
            "--data-dir",
            &data,
            "--listen",
            "127.0.0.1:0",
            "--database",
            db,
            "--kek",
            kek,
        ],
        "Bootstrap admin client id",
        dir,
    )
    .unwrap();
    let url = format!("https://localhost:{}", listen_port(&p));
    (p, url)
}

/// The value of the counter line `name{labels}` in a Prometheus exposition (0 when absent).
fn counter(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(ops: &str) -> String {
    http()
        .get(format!("{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The first word after `prefix` in a process's stdout (an address printed with a comment).
fn first_word(p: &Proc, prefix: &str) -> String {
    p.find(prefix)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_the_cli_fail_over_to_the_other_replica() {
    let Some(pg) = keyless_store::testing::PgServer::start() else {
        eprintln!("skipping: PostgreSQL is not installed (two replicas need one shared database)");
        return;
    };
    let db = pg.database().await;
    let kek = {
        use base64::Engine as _;
        let mut bytes = uuid::Uuid::new_v4().as_bytes().to_vec();
        bytes.extend(uuid::Uuid::new_v4().as_bytes());
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let dir = tempfile::tempdir().unwrap();
    let dir_a = dir.path().join("a");
    std::fs::create_dir_all(&dir_a).unwrap();
    let mut a = ServerProc::start(&dir_a, &["--database", &db, "--kek", &kek]);
    let (mut b_proc, b_url) = second_replica(&dir.path().join("b"), &db, &kek);
    let a_url = a.url.clone();
    let both = format!("{a_url},{b_url}");
    // one CA for every replica: it is in the shared database
    let b_ca = dir.path().join("b/server/pki/ca.pem");
    assert_eq!(
        std::fs::read_to_string(&a.ca).unwrap(),
        std::fs::read_to_string(&b_ca).unwrap(),
        "the replicas serve different CAs"
    );

    let cli = |args: &[&str]| a.cli(args);
    cli(&["group", "create", "-n", "hosts"]);
    let x = cli(&["identity", "create", "-g", "hosts", "-n", "ident-x"]);
    let x_cid = x["properties"]["clientId"].as_str().unwrap().to_string();
    for vm in ["vm-1", "vm-2"] {
        cli(&[
            "vm",
            "create",
            "-g",
            "hosts",
            "-n",
            vm,
            "--assign-identity",
            "ident-x",
        ]);
    }
    let join = |vm: &str| {
        cli(&["vm", "join-token", "-g", "hosts", "-n", vm])["joinToken"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (tok_1, tok_2) = (join("vm-1"), join("vm-2"));

    // the agent joins through A (the first URL) and serves tokens
    let state_1 = dir.path().join("node-1").to_string_lossy().to_string();
    let node = spawn_until(
        &[
            "node",
            "--server",
            &both,
            "--ca-file",
            &a.ca,
            "--state-dir",
            &state_1,
            "--imds-listen",
            "127.0.0.1:0",
            "--sync-interval",
            "1",
            "--join-token",
            &tok_1,
        ],
        "Ops endpoint:",
        dir.path(),
    )
    .unwrap();
    let imds = node.find("IMDS endpoint:").unwrap();
    let ops = first_word(&node, "Ops endpoint:");
    let (st, t) = imds_token(
        &imds,
        &format!("resource=https://before.example&client_id={x_cid}"),
    )
    .await;
    assert_eq!(st, 200, "{t}");
    let failovers = r#"keyless_agent_server_failovers_total{from="0",to="1"}"#;
    assert_eq!(counter(&metrics(&ops).await, failovers), 0.0);

    // kill -9 replica A
    a.proc.child.kill().unwrap();
    a.proc.child.wait().unwrap();

    // a token the cache cannot answer still comes back, through B
    let started = Instant::now();
    let (st, t) = imds_token(
        &imds,
        &format!("resource=https://after.example&client_id={x_cid}"),
    )
    .await;
    let token_failover = started.elapsed();
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["client_id"], x_cid);
    assert!(
        token_failover < Duration::from_secs(5),
        "the token took {token_failover:?}"
    );
    let b_audit = dir.path().join("b/server/audit.log");
    wait_audit(&b_audit, "B issued the token", |r| {
        r["surface"] == "host"
            && r["outcome"] == "issued"
            && r["audience"] == "https://after.example"
    });
    let log = std::fs::read_to_string(&node.stderr_path).unwrap();
    let warning = log
        .lines()
        .find(|l| l.contains("server failover"))
        .unwrap_or_else(|| panic!("no failover warning in the agent's log:\n{log}"));
    assert!(
        warning.contains(&a_url) && warning.contains(&b_url),
        "{warning}"
    );
    let after_first = counter(&metrics(&ops).await, failovers);
    assert!(after_first >= 1.0, "{}", metrics(&ops).await);

    // sticky: B keeps the traffic; syncs (every second) and new tokens do not try A again
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let started = Instant::now();
    let (st, t) = imds_token(
        &imds,
        &format!("resource=https://later.example&client_id={x_cid}"),
    )
    .await;
    let sticky_token = started.elapsed();
    assert_eq!(st, 200, "{t}");
    let text = metrics(&ops).await;
    assert_eq!(counter(&text, failovers), after_first, "{text}");
    assert!(
        counter(&text, r#"keyless_agent_syncs_total{result="ok"}"#) >= 3.0,
        "{text}"
    );

    // a new host joins with A down (its first URL): the join goes to B
    let state_2 = dir.path().join("node-2").to_string_lossy().to_string();
    let started = Instant::now();
    let node_2 = spawn_until(
        &[
            "node",
            "--server",
            &a_url,
            "--server",
            &b_url,
            "--ca-file",
            &a.ca,
            "--state-dir",
            &state_2,
            "--imds-listen",
            "127.0.0.1:0",
            "--sync-interval",
            "1",
            "--join-token",
            &tok_2,
        ],
        "IMDS endpoint:",
        dir.path(),
    )
    .unwrap();
    let join_with_a_down = started.elapsed();
    let (st, t) = imds_token(
        &node_2.find("IMDS endpoint:").unwrap(),
        &format!("resource=https://second.example&client_id={x_cid}"),
    )
    .await;
    assert_eq!(st, 200, "{t}");

    // the CLI: one URL (the dead one) fails; both URLs (flag or env) create and read through B
    let a_data = dir_a.join("server");
    let env = [
        ("KEYLESS_TENANT_ID", a.proc.find("Tenant:").unwrap()),
        ("KEYLESS_CA_FILE", a.ca.clone()),
        (
            "KEYLESS_CLIENT_ID",
            a.proc.find("export KEYLESS_CLIENT_ID=").unwrap(),
        ),
        ("KEYLESS_CLIENT_SECRET", admin_secret(&a_data).unwrap()),
        ("KEYLESS_DATA_DIR", a_data.to_string_lossy().to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let show = ["identity", "show", "-g", "hosts", "-n", "ident-x"];
    let mut one = show.to_vec();
    one.extend(["--server", &a_url]);
    let out = run(&one, &env);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach"), "{err}");

    let started = Instant::now();
    let out = run(
        &[
            "identity",
            "create",
            "-g",
            "hosts",
            "-n",
            "after-failover",
            "--server",
            &both,
        ],
        &env,
    );
    let cli_failover = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["name"], "after-failover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server failover") && err.contains(&a_url) && err.contains(&b_url),
        "{err}"
    );
    let mut env_both = env.clone();
    env_both.push(("KEYLESS_SERVER", &both));
    let out = run(
        &["identity", "show", "-g", "hosts", "-n", "after-failover"],
        &env_both,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["id"], created["id"]);

    eprintln!(
        "failover figures: first token after kill -9 {token_failover:?}, next token (sticky) \
         {sticky_token:?}, join with the first URL down {join_with_a_down:?}, CLI create \
         (token + ARM calls) with the first URL down {cli_failover:?}"
    );
    b_proc.stop();
}
