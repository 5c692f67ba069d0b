//! Strict input (issue 12): OData `$filter` refusals, token audiences checked on every surface,
//! the bootstrap admin secret kept out of stdout, and the data dir's file modes.

mod common;

use common::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const AUTHZ: &str = "api-version=2022-04-01";

async fn admin_token(up: &Up, c: &reqwest::Client, scope: &str) -> String {
    let (st, v) = sp_token(
        c,
        &up.s("/serverUrl"),
        &up.s("/tenantId"),
        &up.s("/adminClientId"),
        &up.secret().expect("bootstrap admin secret file"),
        scope,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    v["access_token"].as_str().unwrap().to_string()
}

async fn get(c: &reqwest::Client, token: &str, url: &str, filter: &str) -> (u16, Value) {
    let q = serde_urlencoded::to_string([("$filter", filter)]).unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let r = c
        .get(format!("{url}{sep}{q}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_not_understood_are_400() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]).unwrap();
    let c = https(&up.s("/caFile"));
    let arm = admin_token(&up, &c, "https://management.azure.com/.default").await;
    let sub = format!(
        "{}/subscriptions/{}",
        up.s("/serverUrl"),
        up.s("/subscriptionId")
    );
    let assignments = format!("{sub}/providers/Microsoft.Authorization/roleAssignments?{AUTHZ}");
    let definitions = format!("{sub}/providers/Microsoft.Authorization/roleDefinitions?{AUTHZ}");
    let admin = up.s("/adminClientId");

    // the forms real clients send still filter
    let (st, all) = get(&c, &arm, &assignments, "").await;
    assert_eq!(st, 200, "{all}");
    let (st, v) = get(&c, &arm, &assignments, "principalId eq 'no-such-principal'").await;
    assert_eq!(
        (st, v["value"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );
    for f in ["atScope()", "atScope() and assignedTo('x')"] {
        let (st, v) = get(&c, &arm, &assignments, f).await;
        assert_eq!(st, 200, "{f}: {v}");
    }
    let (st, v) = get(&c, &arm, &definitions, "roleName eq 'Reader'").await;
    assert_eq!(
        (st, v["value"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{v}"
    );

    // anything else: 400 UnsupportedQuery in ARM's shape, never the unfiltered list
    for f in [
        "principalId eq 'x' or 1=1 ((((",
        "principalld eq 'x'",
        "principalId eq 'x' and roleDefinitionId eq 'y'",
        "principalId eq x",
    ] {
        let (st, v) = get(&c, &arm, &assignments, f).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("UnsupportedQuery")),
            "{f}: {v}"
        );
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with(&format!("The filter '{f}' is not supported.")),
            "{msg}"
        );
        assert!(v.get("value").is_none(), "{v}");
    }
    for f in [
        "roleNam eq 'Reader'",
        "roleName eq 'Reader' or 1 eq 1",
        "type eq 'Other'",
    ] {
        let (st, v) = get(&c, &arm, &definitions, f).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("UnsupportedQuery")),
            "{f}: {v}"
        );
    }

    // the directory list the CLI resolves assignees with
    let graph = admin_token(&up, &c, "https://graph.microsoft.com/.default").await;
    let sps = format!("{}/v1.0/servicePrincipals", up.s("/serverUrl"));
    let (st, v) = get(&c, &graph, &sps, &format!("appId eq '{admin}'")).await;
    assert_eq!(
        (st, v["value"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{v}"
    );
    for f in [
        format!("appId eq '{admin}' or 1 eq 1"),
        format!("appld eq '{admin}'"),
    ] {
        let (st, v) = get(&c, &graph, &sps, &f).await;
        // Graph's own error shape and code
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("Request_UnsupportedQuery")),
            "{f}: {v}"
        );
    }
}

async fn imds(up: &Up, raw_query: &str) -> (u16, Value) {
    let r = http()
        .get(format!(
            "{}/metadata/identity/oauth2/token?api-version=2018-02-01&{raw_query}",
            up.s("/imdsUrl")
        ))
        .header("Metadata", "true")
        .send()
        .await
        .expect("imds");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audiences_are_uris_or_guids_of_bounded_length() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]).unwrap();

    // IMDS: what clients send works, the rest is 400 in IMDS's flat shape
    for ok in [
        "resource=https%3A%2F%2Fmanagement.azure.com%2F",
        "resource=https://vault.azure.net",
        "resource=api://AzureADTokenExchange",
        "resource=6dae42f8-4368-4678-94ff-3960e28e3630",
        "resource=https%3A%2F%2Fkv1.vault.localhost%3A8443",
    ] {
        let (st, v) = imds(&up, ok).await;
        assert_eq!(st, 200, "{ok}: {v}");
    }
    for bad in [
        "resource=%25ZZ",
        "resource=https%3A%2F%2Fmanagement.azure.com%2F%0D%0AX-Injected%3A%201",
        "resource=https%3A%2F%2Fx%2Fa%20b",
        "resource=not-a-uri",
    ] {
        let (st, v) = imds(&up, bad).await;
        assert_eq!(
            (st, v["error"].as_str()),
            (400, Some("invalid_resource")),
            "{bad}: {v}"
        );
    }
    let long = format!("resource=https://{}", "a".repeat(60_000));
    let (st, v) = imds(&up, &long).await;
    assert_eq!(st, 400, "{v}");

    // token endpoint (client credentials): AADSTS70011 invalid_scope
    let c = https(&up.s("/caFile"));
    let (server, tenant, id) = (
        up.s("/serverUrl"),
        up.s("/tenantId"),
        up.s("/adminClientId"),
    );
    let secret = up.secret().unwrap();
    for ok in [
        "https://management.azure.com/.default",
        "https://vault.azure.net/.default",
        "https://x/.default",
        "api://AzureADTokenExchange/.default",
        "6dae42f8-4368-4678-94ff-3960e28e3630/.default",
        "https://management.azure.com//.default offline_access openid profile",
    ] {
        let (st, v) = sp_token(&c, &server, &tenant, &id, &secret, ok).await;
        assert_eq!(st, 200, "{ok}: {v}");
    }
    let huge = format!("https://{}/.default", "a".repeat(60_000));
    for bad in [
        "%ZZ/.default",
        "https://x/a\r\nb/.default",
        "https://x/%4/.default",
        huge.as_str(),
    ] {
        let (st, v) = sp_token(&c, &server, &tenant, &id, &secret, bad).await;
        assert_eq!(
            (st, v["error"].as_str(), v["error_codes"][0].as_i64()),
            (400, Some("invalid_scope"), Some(70011)),
            "{v}"
        );
        assert!(
            v.to_string().len() < 2_000,
            "the refusal echoes a bounded part of the scope"
        );
    }
    // v1 endpoint: `resource`
    let r = c
        .post(format!("{server}/{tenant}/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id.as_str()),
            ("client_secret", secret.as_str()),
            ("resource", "%ZZ"),
        ])
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (st, v["error_codes"][0].as_i64()),
        (400, Some(500011)),
        "{v}"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every file and directory under `dir` with a group / other bit, or not 0600 / 0700.
fn loose(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if mode(&d) != 0o700 {
            out.push(format!("{} {:o}", d.display(), mode(&d)));
        }
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() && mode(&p) != 0o600 {
                out.push(format!("{} {:o}", p.display(), mode(&p)));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_secret_in_a_private_file_and_data_dir_private() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path(), &[]).unwrap();
    let data = up.dir.clone();
    let file = data.join("bootstrap-admin.secret");
    let secret = up.secret().expect("secret file");
    assert_eq!(mode(&file), 0o600);
    let stdout = up.proc.lines.join("\n");
    assert!(!stdout.contains(&secret), "the secret is not on stdout");
    assert!(!stdout.contains("KEYLESS_CLIENT_SECRET"), "{stdout}");
    assert!(stdout.contains(&file.display().to_string()), "{stdout}");

    // `keyless up` then an admin verb with no exports: the CLI reads the file
    let data_s = data.to_string_lossy().to_string();
    let out = run(
        &["identity", "create", "-g", "keyless", "-n", "no-exports"],
        &[("KEYLESS_DATA_DIR", data_s.as_str())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // modes: the db and its -wal / -shm, kek, pki/*, node/*, the secret, all 0600 in 0700 dirs
    for p in [
        "keyless.db",
        "keyless.db-wal",
        "kek",
        "pki/ca.pem",
        "node/host-key.pem",
    ] {
        assert!(data.join(p).exists(), "{p}");
    }
    assert_eq!(loose(&data), Vec::<String>::new());

    // a restart tightens what was loosened, keeps the file, prints no secret
    up.proc.stop();
    for (p, m) in [
        ("keyless.db", 0o644),
        ("pki/ca.pem", 0o644),
        ("pki", 0o755),
        ("node", 0o755),
    ] {
        std::fs::set_permissions(data.join(p), std::fs::Permissions::from_mode(m)).unwrap();
    }
    let up2 = Up::start(dir.path(), &[]).unwrap();
    assert_eq!(up2.secret().as_deref(), Some(secret.as_str()));
    let stdout = up2.proc.lines.join("\n");
    assert!(!stdout.contains(&secret));
    assert!(stdout.contains("its secret was written to"), "{stdout}");
    assert_eq!(loose(&data), Vec::<String>::new());
    drop(up2);

    // --print-secret prints it (a fresh data dir: the admin is created there)
    let dir2 = tempfile::tempdir().unwrap();
    let up3 = Up::start(dir2.path(), &["--print-secret"]).unwrap();
    let printed = up3.proc.find("export KEYLESS_CLIENT_SECRET=");
    assert_eq!(printed, up3.secret());
}
