//! End-to-end tests with real processes: `keyless up`, `keyless server`, `keyless node`.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const MSI: &str = "2023-01-31";
const RG_API: &str = "2024-11-01";
const COMPUTE: &str = "2024-11-01";

struct Admin {
    c: reqwest::Client,
    server: String,
    token: String,
    sub: String,
}

impl Admin {
    async fn new(up: &Up) -> Admin {
        let c = https(&up.s("/caFile"));
        let (st, tok) = sp_token(
            &c,
            &up.s("/serverUrl"),
            &up.s("/tenantId"),
            &up.s("/adminClientId"),
            &up.secret().expect("secret printed at first start"),
            "https://management.azure.com/.default",
        )
        .await;
        assert_eq!(st, 200, "{tok}");
        Admin {
            c,
            server: up.s("/serverUrl"),
            token: tok["access_token"].as_str().unwrap().to_string(),
            sub: up.s("/subscriptionId"),
        }
    }

    async fn req(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .c
            .request(method, format!("{}{}", self.server, path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request");
        let st = resp.status().as_u16();
        (st, resp.json().await.unwrap_or(Value::Null))
    }

    fn id_path(&self, rg: &str, name: &str) -> String {
        format!("/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}?api-version={MSI}", self.sub)
    }

    fn vm_path(&self, rg: &str, name: &str) -> String {
        format!("/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}?api-version={COMPUTE}", self.sub)
    }

    fn rg_path(&self, rg: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{rg}?api-version={RG_API}",
            self.sub
        )
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

use reqwest::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_refuses_bad_callers_and_bad_input_without_changing_state() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]).unwrap();
    let a = Admin::new(&up).await;
    let c = https(&up.s("/caFile"));
    let list = format!(
        "{}/subscriptions/{}/resourcegroups?api-version={RG_API}",
        a.server, a.sub
    );

    // unauthenticated: 401 with ARM's body and challenge
    let r = c.get(&list).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge.starts_with("Bearer authorization_uri="),
        "{challenge}"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v), "AuthenticationFailed");

    // garbage and forged bearer tokens
    for bad in ["garbage", "a.b.c", &format!("{}x", a.token)] {
        let r = c.get(&list).bearer_auth(bad).send().await.unwrap();
        assert_eq!(r.status(), 401, "{bad}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(code(&v), "InvalidAuthenticationToken");
    }
    // a token for another audience
    let (_, vault) = sp_token(
        &c,
        &a.server,
        &up.s("/tenantId"),
        &up.s("/adminClientId"),
        &up.secret().unwrap(),
        "https://vault.azure.net/.default",
    )
    .await;
    let r = c
        .get(&list)
        .bearer_auth(vault["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // a managed identity token for ARM is authenticated but not authorized
    let (st, mi) = imds_token(&up.s("/imdsUrl"), "resource=https://management.azure.com/").await;
    assert_eq!(st, 200);
    let mi_token = mi["access_token"].as_str().unwrap();
    // lists show only what the caller may read: nothing
    let r = c.get(&list).bearer_auth(mi_token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["value"], json!([]));
    let r = c
        .get(format!("{}{}", a.server, a.rg_path("keyless")))
        .bearer_auth(mi_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v), "AuthorizationFailed");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains(up.s("/systemIdentity/principalId").as_str()));

    // api-version
    let (st, v) = a
        .req(
            Method::GET,
            &format!("/subscriptions/{}/resourcegroups", a.sub),
            None,
        )
        .await;
    assert_eq!((st, code(&v)), (400, "MissingApiVersionParameter"));
    let (st, v) = a
        .req(
            Method::GET,
            &format!(
                "/subscriptions/{}/resourcegroups?api-version=2001-01-01",
                a.sub
            ),
            None,
        )
        .await;
    assert_eq!((st, code(&v)), (400, "InvalidApiVersionParameter"));
    let (st, v) = a
        .req(
            Method::GET,
            &a.id_path("keyless", "keyless-demo")
                .replace(MSI, "2001-01-01"),
            None,
        )
        .await;
    assert_eq!((st, code(&v)), (400, "NoRegisteredProviderFound"));

    // names
    let (st, v) = a
        .req(
            Method::PUT,
            &a.id_path("keyless", "a"),
            Some(json!({"location": "local"})),
        )
        .await;
    assert_eq!((st, code(&v)), (400, "InvalidResourceName"));
    let (st, v) = a
        .req(
            Method::PUT,
            &a.rg_path("bad.rg."),
            Some(json!({"location": "local"})),
        )
        .await;
    assert_eq!((st, code(&v)), (400, "InvalidResourceGroup"));
    let (st, v) = a
        .req(
            Method::PUT,
            &a.vm_path("keyless", "_vm"),
            Some(json!({"location": "local"})),
        )
        .await;
    assert_eq!((st, code(&v)), (400, "InvalidResourceName"));

    // an identity with tags, then bad updates that must not change it
    let (st, _) = a
        .req(
            Method::PUT,
            &a.id_path("keyless", "stable"),
            Some(json!({"location": "local", "tags": {"k": "v"}})),
        )
        .await;
    assert_eq!(st, 201);
    let (_, before) = a
        .req(Method::GET, &a.id_path("keyless", "stable"), None)
        .await;
    let r = c
        .put(format!("{}{}", a.server, a.id_path("keyless", "stable")))
        .bearer_auth(&a.token)
        .header("content-type", "application/json")
        .body("{\"location\": \"local\", \"tags\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        code(&r.json::<Value>().await.unwrap()),
        "InvalidRequestContent"
    );
    let big = json!({"location": "local", "tags": {"k": "x".repeat(2 * 1024 * 1024)}});
    let (st, v) = a
        .req(Method::PUT, &a.id_path("keyless", "stable"), Some(big))
        .await;
    assert_eq!((st, code(&v)), (413, "RequestEntityTooLarge"));
    let (st, v) = a
        .req(
            Method::PUT,
            &a.id_path("keyless", "stable"),
            Some(json!({"location": "elsewhere"})),
        )
        .await;
    assert_eq!((st, code(&v)), (409, "InvalidResourceLocation"));
    // each write, applied or refused, is in the audit trail with its caller and result
    let audit = up.dir.join("audit.log");
    for (status, result) in [
        (201, "Succeeded"),
        (400, "Failed"),
        (413, "Failed"),
        (409, "Failed"),
    ] {
        wait_audit(&audit, &format!("the write answered {status}"), |r| {
            r["type"] == "controlPlane"
                && r["operation"] == "Microsoft.ManagedIdentity/userAssignedIdentities/write"
                && r["resourceId"]
                    .as_str()
                    .is_some_and(|id| id.ends_with("/userAssignedIdentities/stable"))
                && r["status"] == status
                && r["result"] == result
                && r["caller"]["clientId"] == up.s("/adminClientId").as_str()
                && r["correlationId"].is_string()
        });
    }
    let (st, v) = a
        .req(
            Method::PUT,
            &a.id_path("keyless", "stable"),
            Some(json!({"tags": {}})),
        )
        .await;
    assert_eq!((st, code(&v)), (400, "LocationRequired"));
    let (_, after) = a
        .req(Method::GET, &a.id_path("keyless", "stable"), None)
        .await;
    assert_eq!(before, after);

    // a VM referencing a missing identity is refused and the VM is untouched
    let (st, _) = a
        .req(
            Method::PUT,
            &a.vm_path("keyless", "vmx"),
            Some(json!({"location": "local", "identity": {"type": "SystemAssigned"}})),
        )
        .await;
    assert_eq!(st, 201);
    let (_, vm_before) = a.req(Method::GET, &a.vm_path("keyless", "vmx"), None).await;
    let missing = format!("/subscriptions/{}/resourceGroups/keyless/providers/Microsoft.ManagedIdentity/userAssignedIdentities/missing", a.sub);
    let (st, v) = a
        .req(Method::PUT, &a.vm_path("keyless", "vmx"), Some(json!({"location": "local", "identity": {"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {missing: {}}}})))
        .await;
    assert_eq!((st, code(&v)), (400, "FailedIdentityOperation"));
    let (st, v) = a
        .req(
            Method::PUT,
            &a.vm_path("keyless", "vmx"),
            Some(json!({"location": "local", "identity": {"type": "Both"}})),
        )
        .await;
    assert_eq!((st, code(&v)), (400, "InvalidParameter"));
    let (_, vm_after) = a.req(Method::GET, &a.vm_path("keyless", "vmx"), None).await;
    assert_eq!(vm_before, vm_after);

    // not found shapes
    let (st, v) = a.req(Method::GET, &a.id_path("nogroup", "x12"), None).await;
    assert_eq!((st, code(&v)), (404, "ResourceGroupNotFound"));
    let (st, v) = a.req(Method::GET, &a.id_path("keyless", "x12"), None).await;
    assert_eq!((st, code(&v)), (404, "ResourceNotFound"));
    let (st, v) = a.req(Method::GET, &format!("/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups?api-version={RG_API}"), None).await;
    assert_eq!((st, code(&v)), (404, "SubscriptionNotFound"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refusals_are_aadsts_shaped() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]).unwrap();
    let c = https(&up.s("/caFile"));
    let (server, tenant, id, secret) = (
        up.s("/serverUrl"),
        up.s("/tenantId"),
        up.s("/adminClientId"),
        up.secret().unwrap(),
    );
    let arm = "https://management.azure.com/.default";
    let cases: Vec<(String, String, String, String, u16, i64)> = vec![
        (
            tenant.clone(),
            id.clone(),
            "wrong-secret".into(),
            arm.into(),
            401,
            7000215,
        ),
        (
            tenant.clone(),
            "00000000-0000-0000-0000-000000000001".into(),
            secret.clone(),
            arm.into(),
            400,
            700016,
        ),
        (
            "11111111-1111-1111-1111-111111111111".into(),
            id.clone(),
            secret.clone(),
            arm.into(),
            400,
            90002,
        ),
        (
            tenant.clone(),
            id.clone(),
            secret.clone(),
            "https://management.azure.com/user_impersonation".into(),
            400,
            1002012,
        ),
        (
            tenant.clone(),
            id.clone(),
            secret.clone(),
            "".into(),
            400,
            900144,
        ),
    ];
    let audit = up.dir.join("audit.log");
    for (t, cid, sec, scope, status, aadsts) in &cases {
        let (st, v) = sp_token(&c, &server, t, cid, sec, scope).await;
        assert_eq!(st, *status, "{v}");
        assert_eq!(v["error_codes"][0].as_i64(), Some(*aadsts), "{v}");
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .starts_with(&format!("AADSTS{aadsts}:")));
        assert!(v["error"].is_string());
    }
    // every refusal is in the audit trail with its caller and the code the answer carried
    for (_, cid, _, _, status, aadsts) in &cases {
        let reason = format!("AADSTS{aadsts}");
        wait_audit(&audit, &reason, |r| {
            r["type"] == "token"
                && r["surface"] == "sts"
                && r["kind"] == "client_credentials"
                && r["outcome"] == "refused"
                && r["status"] == *status
                && r["reason"] == reason.as_str()
                && r["caller"]["clientId"] == cid.as_str()
        });
    }
    // no secret and no assertion
    let r = c
        .post(format!("{server}/{tenant}/oauth2/v2.0/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id.as_str()),
            ("scope", arm),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    wait_audit(&audit, "no secret", |r| {
        r["reason"] == "AADSTS7000218" && r["caller"]["clientId"] == id.as_str()
    });
    // garbage body
    let r = c
        .post(format!("{server}/{tenant}/oauth2/v2.0/token"))
        .body("%%%")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    wait_audit(&audit, "garbage body", |r| {
        r["reason"] == "AADSTS900144" && r["caller"].get("clientId").is_none()
    });
    // success: integer expires_in, token verifies as ours
    let (st, v) = sp_token(&c, &server, &tenant, &id, &secret, arm).await;
    assert_eq!(st, 200);
    wait_audit(&audit, "the issuance", |r| {
        r["surface"] == "sts"
            && r["outcome"] == "issued"
            && r["caller"]["clientId"] == id.as_str()
            && r["audience"]
                .as_str()
                .is_some_and(|a| a.starts_with("https://management.azure.com"))
    });
    assert!(v["expires_in"].is_u64());
    let cl = claims(v["access_token"].as_str().unwrap());
    assert_eq!(cl["aud"], "https://management.azure.com");
    assert_eq!(cl["appid"], id.as_str());
    assert_eq!(cl["idtyp"], "app");
    // discovery documents point at our host, JWKS has kid/x5t/n/e/x5c
    let d: Value = c
        .get(format!(
            "{server}/{tenant}/v2.0/.well-known/openid-configuration"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d["issuer"], format!("{server}/{tenant}/v2.0"));
    let d1: Value = c
        .get(format!(
            "{server}/{tenant}/.well-known/openid-configuration"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d1["issuer"], format!("{server}/{tenant}/"));
    let jwks: Value = c
        .get(d["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let k = &jwks["keys"][0];
    for f in ["kid", "x5t", "n", "e"] {
        assert!(k[f].is_string(), "{f}");
    }
    assert_eq!(k["kid"], header(v["access_token"].as_str().unwrap())["kid"]);
    assert!(k["x5c"][0].is_string());

    // the trail holds no secret and no token; its chain checks out, and a record edited in
    // place is named by `keyless audit verify`
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(
        !text.contains(secret.as_str()),
        "the client secret in the audit file"
    );
    assert!(!text.contains(v["access_token"].as_str().unwrap()));
    let file = audit.to_string_lossy().to_string();
    let out = run(&["audit", "verify", &file], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("chain intact"));
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let i = lines
        .iter()
        .position(|l| l.contains("\"AADSTS7000215\""))
        .unwrap();
    lines[i] = lines[i].replace("\"refused\"", "\"issued\"");
    std::fs::write(&audit, lines.join("\n") + "\n").unwrap();
    let out = run(&["audit", "verify", &file], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("line {}:", i + 1)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_identity_lifecycle_follows_seed_002() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]).unwrap();
    let a = Admin::new(&up).await;
    let (st, _) = a
        .req(
            Method::PUT,
            &a.rg_path("life"),
            Some(json!({"location": "local"})),
        )
        .await;
    assert_eq!(st, 201);
    let (_, u1) = a
        .req(
            Method::PUT,
            &a.id_path("life", "uid1"),
            Some(json!({"location": "local"})),
        )
        .await;
    let u1_id = u1["id"].as_str().unwrap().to_string();
    let (st, vm) = a
        .req(Method::PUT, &a.vm_path("life", "vm1"), Some(json!({"location": "local", "identity": {"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {u1_id.clone(): {}}}})))
        .await;
    assert_eq!(st, 201, "{vm}");
    let sys1 = vm["identity"]["principalId"].as_str().unwrap().to_string();
    assert_eq!(
        vm["identity"]["userAssignedIdentities"][&u1_id]["clientId"],
        u1["properties"]["clientId"]
    );
    // PATCH: drop the system identity
    let (st, vm) = a
        .req(
            Method::PATCH,
            &a.vm_path("life", "vm1"),
            Some(json!({"identity": {"type": "UserAssigned"}})),
        )
        .await;
    assert_eq!(st, 200);
    assert!(vm["identity"]["principalId"].is_null());
    // re-adding it creates a new principal
    let (_, vm) = a
        .req(
            Method::PATCH,
            &a.vm_path("life", "vm1"),
            Some(json!({"identity": {"type": "SystemAssigned, UserAssigned"}})),
        )
        .await;
    let sys2 = vm["identity"]["principalId"].as_str().unwrap().to_string();
    assert_ne!(sys1, sys2);
    // deleting the user identity removes it from the VM
    let (st, _) = a
        .req(Method::DELETE, &a.id_path("life", "uid1"), None)
        .await;
    assert_eq!(st, 200);
    let (_, vm) = a.req(Method::GET, &a.vm_path("life", "vm1"), None).await;
    assert!(
        vm["identity"]["userAssignedIdentities"]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "{vm}"
    );
    let (st, _) = a
        .req(Method::DELETE, &a.id_path("life", "uid1"), None)
        .await;
    assert_eq!(st, 204);
    // lists
    let (_, l) = a.req(Method::GET, &format!("/subscriptions/{}/providers/Microsoft.Compute/virtualMachines?api-version={COMPUTE}", a.sub), None).await;
    assert!(l["value"].as_array().unwrap().len() >= 2);
    // deleting the group deletes its VMs
    let (st, _) = a.req(Method::DELETE, &a.rg_path("life"), None).await;
    assert_eq!(st, 200);
    let (st, _) = a.req(Method::GET, &a.rg_path("life"), None).await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_only_get_their_own_identities() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProc::start(dir.path(), &[]);
    let (url, ca) = (server.url.clone(), server.ca.clone());
    let cli = |args: &[&str]| server.cli(args);
    cli(&["group", "create", "-n", "hosts"]);
    let x = cli(&["identity", "create", "-g", "hosts", "-n", "ident-x"]);
    let y = cli(&["identity", "create", "-g", "hosts", "-n", "ident-y"]);
    let vm_a = cli(&[
        "vm",
        "create",
        "-g",
        "hosts",
        "-n",
        "vm-a",
        "--assign-identity",
        "[system]",
        "ident-x",
    ]);
    cli(&[
        "vm",
        "create",
        "-g",
        "hosts",
        "-n",
        "vm-b",
        "--assign-identity",
        "ident-y",
    ]);
    let tok_a = cli(&["vm", "join-token", "-g", "hosts", "-n", "vm-a"])["joinToken"]
        .as_str()
        .unwrap()
        .to_string();
    let tok_b = cli(&["vm", "join-token", "-g", "hosts", "-n", "vm-b"])["joinToken"]
        .as_str()
        .unwrap()
        .to_string();

    // wrong, expired and replayed join tokens are refused, nothing is joined
    let bad_state = dir.path().join("bad").to_string_lossy().to_string();
    let out = run(
        &server.node_args(&bad_state, Some("kljt1.not-a-token")),
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("join token is not valid"));
    let short = cli(&[
        "vm",
        "join-token",
        "-g",
        "hosts",
        "-n",
        "vm-a",
        "--expires-in",
        "1",
    ])["joinToken"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let out = run(&server.node_args(&bad_state, Some(&short)), &[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("bad/host-cert.pem").exists());

    let state_a = dir.path().join("a").to_string_lossy().to_string();
    let state_b = dir.path().join("b").to_string_lossy().to_string();
    let node_a = spawn_until(
        &server.node_args(&state_a, Some(&tok_a)),
        "IMDS endpoint:",
        dir.path(),
    )
    .unwrap();
    let node_b = spawn_until(
        &server.node_args(&state_b, Some(&tok_b)),
        "IMDS endpoint:",
        dir.path(),
    )
    .unwrap();
    let replay = run(
        &server.node_args(&dir.path().join("c").to_string_lossy(), Some(&tok_a)),
        &[],
    );
    assert!(String::from_utf8_lossy(&replay.stderr).contains("already been used"));
    let imds_a = node_a.find("IMDS endpoint:").unwrap();
    let imds_b = node_b.find("IMDS endpoint:").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("a/host-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let x_cid = x["properties"]["clientId"].as_str().unwrap();
    let y_cid = y["properties"]["clientId"].as_str().unwrap();
    let (st, t) = imds_token(
        &imds_a,
        &format!("resource=https://vault.azure.net&client_id={x_cid}"),
    )
    .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        claims(t["access_token"].as_str().unwrap())["oid"],
        x["properties"]["principalId"]
    );
    assert_eq!(t["client_id"], x_cid);
    // the same again: the agent's cache answers, still an issuance to this caller
    let (st, _) = imds_token(
        &imds_a,
        &format!("resource=https://vault.azure.net&client_id={x_cid}"),
    )
    .await;
    assert_eq!(st, 200);
    let node_audit = dir.path().join("a/audit.log");
    let server_audit = dir.path().join("server/audit.log");
    let vm_a_id = vm_a["id"].as_str().unwrap();
    for cached in [false, true] {
        wait_audit(&node_audit, "x issued", |r| {
            r["surface"] == "imds"
                && r["outcome"] == "issued"
                && r["cached"] == cached
                && r["identity"]["clientId"] == x_cid
                && r["audience"] == "https://vault.azure.net"
                && r["caller"]["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("127.0.0.1:"))
        });
    }
    // the server saw the host behind it: the VM of its certificate
    wait_audit(&server_audit, "host issued", |r| {
        r["surface"] == "host"
            && r["outcome"] == "issued"
            && r["caller"]["host"].as_str().map(str::to_ascii_lowercase)
                == Some(vm_a_id.to_ascii_lowercase())
            && r["identity"]["clientId"] == x_cid
    });
    // A may not use B's identity, by any selector
    let y_oid = y["properties"]["principalId"].as_str().unwrap();
    let y_rid = y["id"].as_str().unwrap();
    for (q, field, value) in [
        (format!("client_id={y_cid}"), "clientId", y_cid),
        (format!("object_id={y_oid}"), "objectId", y_oid),
        (format!("msi_res_id={y_rid}"), "resourceId", y_rid),
    ] {
        let (st, v) = imds_token(&imds_a, &format!("resource=https://vault.azure.net&{q}")).await;
        assert_eq!(st, 400, "{q}");
        assert_eq!(v["error_description"], "Identity not found");
        wait_audit(&node_audit, &q, |r| {
            r["surface"] == "imds"
                && r["outcome"] == "refused"
                && r["status"] == 400
                && r["reason"] == "identity_not_found"
                && r["identity"][field] == value
                && r["caller"]["peer"].is_string()
        });
    }
    // a request without the Metadata header: refused, with the code the answer carries
    let r = http()
        .get(format!(
            "{imds_a}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    wait_audit(&node_audit, "no Metadata header", |r| {
        r["outcome"] == "refused" && r["reason"] == "invalid_request" && r.get("audience").is_none()
    });
    // B has only a user-assigned identity: a default request gets it (as IMDS does)
    let (st, t) = imds_token(&imds_b, "resource=https://vault.azure.net").await;
    assert_eq!(st, 200);
    assert_eq!(
        claims(t["access_token"].as_str().unwrap())["oid"],
        y["properties"]["principalId"]
    );
    // A's system identity, then the VM is deleted: its system identity is refused
    let (st, t) = imds_token(&imds_a, "resource=https://management.azure.com/").await;
    assert_eq!(st, 200);
    assert_eq!(
        claims(t["access_token"].as_str().unwrap())["oid"],
        vm_a["identity"]["principalId"]
    );
    // the host API without a client certificate gets nothing
    let r = https(&ca)
        .post(format!("{url}/keyless/host/v1/token"))
        .json(&json!({"resource": "x", "selector": {"kind": "system_assigned"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    wait_audit(&server_audit, "host API without a certificate", |r| {
        r["surface"] == "host"
            && r["outcome"] == "refused"
            && r["status"] == 401
            && r["reason"] == "host_credential_required"
    });
    cli(&["vm", "delete", "-g", "hosts", "-n", "vm-a"]);
    let (st, v) = imds_token(&imds_a, "resource=https://storage.azure.com/").await;
    assert_eq!(
        (st, v["error_description"].as_str()),
        (400, Some("Identity not found"))
    );
    wait_audit(&node_audit, "after the VM is gone", |r| {
        r["outcome"] == "refused"
            && r["reason"] == "identity_not_found"
            && r["audience"] == "https://storage.azure.com/"
    });
    std::thread::sleep(Duration::from_millis(1500));
    // after the next sync the cached token is gone too
    let (st, _) = imds_token(&imds_a, "resource=https://management.azure.com/").await;
    assert_eq!(st, 400);
    // B is unaffected
    let (st, _) = imds_token(&imds_b, "resource=https://vault.azure.net").await;
    assert_eq!(st, 200);
    server.proc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_state_and_busy_ports_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path(), &[]).unwrap();
    let secret = up.secret().unwrap();
    let (st, t1) = imds_token(&up.s("/imdsUrl"), "resource=https://management.azure.com/").await;
    assert_eq!(st, 200);
    let kid1 = header(t1["access_token"].as_str().unwrap())["kid"].clone();
    let info1 = up.info.clone();

    // a second `up` on the same data dir, or on a busy port, fails with a clear message
    let port = info1["serverUrl"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let other = dir.path().join("other").to_string_lossy().to_string();
    let out = run(
        &[
            "up",
            "--data-dir",
            &other,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--imds-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on") && err.contains("--listen"),
        "{err}"
    );
    let same = up.dir.to_string_lossy().to_string();
    let out = run(
        &[
            "up",
            "--data-dir",
            &same,
            "--listen",
            "127.0.0.1:0",
            "--imds-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another keyless process"));

    up.proc.stop();
    let up2 = Up::start(dir.path(), &[]).unwrap();
    // the secret stays in the 0600 file of the first start and is printed by neither start
    assert_eq!(up2.secret().as_deref(), Some(secret.as_str()));
    assert!(!up2.proc.lines.join("\n").contains(&secret));
    for k in [
        "/tenantId",
        "/subscriptionId",
        "/adminClientId",
        "/vm/resourceId",
        "/systemIdentity/principalId",
        "/demoIdentity/clientId",
    ] {
        assert_eq!(info1.pointer(k), up2.info.pointer(k), "{k}");
    }
    let (st, t2) = imds_token(&up2.s("/imdsUrl"), "resource=https://management.azure.com/").await;
    assert_eq!(st, 200);
    assert_eq!(
        header(t2["access_token"].as_str().unwrap())["kid"],
        kid1,
        "signing key survives restart"
    );
    // the admin credential from the first start still works
    let c = https(&up2.s("/caFile"));
    let (st, _) = sp_token(
        &c,
        &up2.s("/serverUrl"),
        &up2.s("/tenantId"),
        &up2.s("/adminClientId"),
        &secret,
        "https://management.azure.com/.default",
    )
    .await;
    assert_eq!(st, 200);
}

fn has(hay: &[u8], w: &[u8]) -> bool {
    hay.windows(w.len()).any(|h| h == w)
}

/// Whether any 16-byte piece of `secret` that is not also public (a certificate carries the
/// public half of a key) occurs in `hay`.
fn leaks(hay: &[u8], secret: &[u8], public: &[u8]) -> bool {
    secret
        .windows(16)
        .step_by(4)
        .any(|w| has(hay, w) && !has(public, w))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keys_are_encrypted_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path(), &[]).unwrap();
    let secret = up.secret().unwrap();
    up.proc.stop();
    let data = up.dir.clone();
    let kek = keyless_store::Kek::load_or_create(&data.join("kek")).unwrap();
    let pg_url = keyless_store::testing::shared_admin_url().map(|admin| {
        keyless_store::testing::ensure_database(
            &admin,
            &keyless_store::testing::database_for_dir(&data),
        )
    });
    let store = match &pg_url {
        Some(url) => keyless_store::Store::postgres(
            &keyless_store::postgres::PgOptions::new(url.clone()),
            kek,
        )
        .await
        .unwrap(),
        None => keyless_store::Store::sqlite(&data.join("keyless.db"), kek).unwrap(),
    };
    use base64::Engine;
    let mut tx = store.read("test").await.unwrap();
    let mut plaintexts: Vec<Vec<u8>> = vec![];
    let mut public: Vec<u8> = vec![];
    for name in ["ca_key", "tls_key"] {
        plaintexts.push(tx.get_secret(name).await.unwrap().expect(name));
    }
    for name in ["ca_cert", "tls_cert"] {
        let b64 = tx.get_meta(name).await.unwrap().expect(name);
        public.extend(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        );
    }
    for k in tx.list_signing_keys().await.unwrap() {
        plaintexts.push(k.key_pkcs8);
        public.extend(k.cert_der);
    }
    drop(tx);
    assert!(plaintexts.len() >= 3);
    // everything stored: the database files, or on PostgreSQL every value of a full backup
    drop(store);
    let db = stored_bytes(&data).await;
    assert!(db.len() > 4096);
    for pt in &plaintexts {
        // the detector finds a key that is stored in the clear
        assert!(leaks(&[b"row".as_slice(), pt].concat(), pt, &public));
        assert!(
            !leaks(&db, pt, &public),
            "private key bytes found in the database file"
        );
    }
    for text in [&b"PRIVATE KEY"[..], &b"BEGIN"[..], secret.as_bytes()] {
        assert!(
            !db.windows(text.len()).any(|w| w == text),
            "{}",
            String::from_utf8_lossy(text)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_are_published_before_they_sign_and_kept_after() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(
        dir.path(),
        &[
            "--key-rotation",
            "4",
            "--key-prepublish",
            "2",
            "--key-check-interval",
            "1",
        ],
    )
    .unwrap();
    let c = https(&up.s("/caFile"));
    let (server, tenant, id, secret) = (
        up.s("/serverUrl"),
        up.s("/tenantId"),
        up.s("/adminClientId"),
        up.secret().unwrap(),
    );
    let jwks_url = format!("{server}/{tenant}/discovery/v2.0/keys");
    let mut seen_signers: Vec<String> = vec![];
    let mut prepublished = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline && (seen_signers.len() < 3 || !prepublished) {
        let jwks: Value = c.get(&jwks_url).send().await.unwrap().json().await.unwrap();
        let kids: Vec<String> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect();
        let (_, t) = sp_token(&c, &server, &tenant, &id, &secret, "api://x/.default").await;
        let kid = header(t["access_token"].as_str().unwrap())["kid"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            kids.contains(&kid),
            "a token is signed by a key not in JWKS"
        );
        // every key that signed (its tokens are still valid) is still published
        for s in &seen_signers {
            assert!(
                kids.contains(s),
                "signer {s} removed while its tokens are valid"
            );
        }
        if kids.len() > 1 && kids.iter().any(|k| k != &kid && !seen_signers.contains(k)) {
            prepublished = true;
        }
        if !seen_signers.contains(&kid) {
            // a new signer must have been published before (seen in an earlier JWKS)
            seen_signers.push(kid);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(prepublished, "never saw a key published ahead of signing");
    assert!(
        seen_signers.len() >= 3,
        "keys did not rotate: {seen_signers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_credential_rotates_before_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProc::start(dir.path(), &["--host-cert-lifetime", "6"]);
    let cli = |args: &[&str]| server.cli(args);
    cli(&["group", "create", "-n", "rot"]);
    cli(&[
        "vm",
        "create",
        "-g",
        "rot",
        "-n",
        "vm-r",
        "--assign-identity",
    ]);
    let tok = cli(&["vm", "join-token", "-g", "rot", "-n", "vm-r"])["joinToken"]
        .as_str()
        .unwrap()
        .to_string();
    let state = dir.path().join("n").to_string_lossy().to_string();
    let node = spawn_until(
        &server.node_args(&state, Some(&tok)),
        "IMDS endpoint:",
        dir.path(),
    )
    .unwrap();
    let imds = node.find("IMDS endpoint:").unwrap();
    let first = std::fs::read_to_string(dir.path().join("n/host-cert.pem")).unwrap();
    // past the first certificate's expiry the host still gets fresh tokens
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (st, v) = imds_token(&imds, "resource=https://fresh.example/").await;
    assert_eq!(st, 200, "{v}");
    assert_ne!(
        first,
        std::fs::read_to_string(dir.path().join("n/host-cert.pem")).unwrap()
    );
    server.proc.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_negative_matrix_for_a_managed_identity_caller() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]).unwrap();
    let a = Admin::new(&up).await;
    let data = up.dir.to_string_lossy().to_string();
    let secret = up.secret().unwrap();
    let env = [
        ("KEYLESS_DATA_DIR", data.as_str()),
        ("KEYLESS_CLIENT_SECRET", secret.as_str()),
    ];
    let cli = |args: &[&str]| run(args, &env);
    let ok = |args: &[&str]| -> Value {
        let out = cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let rg_scope = format!("/subscriptions/{}/resourceGroups/keyless", a.sub);
    let demo_id = up.s("/demoIdentity/resourceId");
    // the caller: this VM's system-assigned identity, with a token from IMDS
    let me = up.s("/systemIdentity/principalId");
    let (_, t) = imds_token(&up.s("/imdsUrl"), "resource=https://management.azure.com/").await;
    let mi = Admin {
        c: a.c.clone(),
        server: a.server.clone(),
        token: t["access_token"].as_str().unwrap().to_string(),
        sub: a.sub.clone(),
    };
    let vm_body = |ids: &[&str]| {
        let map: serde_json::Map<String, Value> =
            ids.iter().map(|i| (i.to_string(), json!({}))).collect();
        json!({"location": "local", "identity": {"type": "UserAssigned", "userAssignedIdentities": map}})
    };

    // Reader: can read, cannot create an identity
    let reader = ok(&[
        "role",
        "assignment",
        "create",
        "--assignee",
        &me,
        "--role",
        "Reader",
        "--scope",
        &rg_scope,
    ]);
    assert_eq!(reader["properties"]["principalId"], me.as_str());
    let (st, _) = mi
        .req(Method::GET, &mi.id_path("keyless", "keyless-demo"), None)
        .await;
    assert_eq!(st, 200);
    let (st, v) = mi
        .req(
            Method::PUT,
            &mi.id_path("keyless", "by-reader"),
            Some(json!({"location": "local"})),
        )
        .await;
    assert_eq!((st, code(&v)), (403, "AuthorizationFailed"), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&me) && msg.contains("Microsoft.ManagedIdentity/userAssignedIdentities/write"),
        "{msg}"
    );

    // Contributor on its own group, without Managed Identity Operator on the identity (which
    // lives in another group where it is only Reader): cannot attach it
    let (st, _) = a
        .req(
            Method::PUT,
            &a.rg_path("workloads"),
            Some(json!({"location": "local"})),
        )
        .await;
    assert_eq!(st, 201);
    ok(&[
        "role",
        "assignment",
        "create",
        "--assignee",
        &me,
        "--role",
        "Contributor",
        "-g",
        "workloads",
    ]);
    let (st, _) = mi
        .req(
            Method::PUT,
            &mi.id_path("workloads", "by-contrib"),
            Some(json!({"location": "local"})),
        )
        .await;
    assert_eq!(st, 201);
    let (st, v) = mi
        .req(
            Method::PUT,
            &mi.vm_path("workloads", "mi-vm"),
            Some(vm_body(&[&demo_id])),
        )
        .await;
    assert_eq!((st, code(&v)), (403, "LinkedAuthorizationFailed"), "{v}");
    let (st, _) = mi
        .req(Method::GET, &mi.vm_path("workloads", "mi-vm"), None)
        .await;
    assert_eq!(st, 404, "nothing written");
    // ... but it may not grant itself the role either (Contributor's notActions)
    let (st, v) = mi
        .req(
            Method::PUT,
            &format!("{demo_id}/providers/Microsoft.Authorization/roleAssignments/{}?api-version=2022-04-01", uuid::Uuid::new_v4()),
            Some(json!({"properties": {"roleDefinitionId": "/providers/Microsoft.Authorization/roleDefinitions/f1a07417-d97a-45cb-824c-7a7467783830", "principalId": me}})),
        )
        .await;
    assert_eq!((st, code(&v)), (403, "AuthorizationFailed"));

    // granted Managed Identity Operator on the identity: it can
    let mio = ok(&[
        "role",
        "assignment",
        "create",
        "--assignee",
        &up.s("/systemIdentity/clientId"),
        "--role",
        "Managed Identity Operator",
        "--scope",
        &demo_id,
    ]);
    let (st, v) = mi
        .req(
            Method::PUT,
            &mi.vm_path("workloads", "mi-vm"),
            Some(vm_body(&[&demo_id])),
        )
        .await;
    assert_eq!(st, 201, "{v}");

    // the assignment deleted: it cannot again
    ok(&[
        "role",
        "assignment",
        "delete",
        "--ids",
        mio["id"].as_str().unwrap(),
    ]);
    let (st, v) = mi
        .req(
            Method::PUT,
            &mi.vm_path("workloads", "mi-vm2"),
            Some(vm_body(&[&demo_id])),
        )
        .await;
    assert_eq!((st, code(&v)), (403, "LinkedAuthorizationFailed"));

    // lists and filters
    let mine = ok(&["role", "assignment", "list", "--assignee", &me, "--all"]);
    assert_eq!(mine.as_array().unwrap().len(), 2, "{mine}");
    let at_group = ok(&[
        "role",
        "assignment",
        "list",
        "--assignee",
        &me,
        "-g",
        "keyless",
    ]);
    assert_eq!(at_group.as_array().unwrap().len(), 1, "{at_group}");
    let defs = ok(&[
        "role",
        "definition",
        "list",
        "--name",
        "managed identity operator",
    ]);
    assert_eq!(defs[0]["name"], "f1a07417-d97a-45cb-824c-7a7467783830");

    // bad input
    let out = cli(&[
        "role",
        "assignment",
        "create",
        "--assignee",
        &me,
        "--role",
        "Nope",
        "-g",
        "keyless",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Role 'Nope' doesn't exist."));
    let out = cli(&[
        "role",
        "assignment",
        "create",
        "--assignee",
        "00000000-0000-0000-0000-00000000dead",
        "--role",
        "Reader",
        "-g",
        "keyless",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Cannot find user or service principal"));
    let out = cli(&[
        "role",
        "assignment",
        "create",
        "--assignee",
        &me,
        "--role",
        "Reader",
        "--scope",
        "/subscriptions",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid scope"));
    let out = cli(&[
        "role",
        "assignment",
        "create",
        "--assignee",
        &me,
        "--role",
        "Reader",
        "-g",
        "keyless",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("(RoleAssignmentExists)"));
    let ra = |scope: &str, name: &str, role: &str, principal: &str| {
        (
            format!("{scope}/providers/Microsoft.Authorization/roleAssignments/{name}?api-version=2022-04-01"),
            json!({"properties": {"roleDefinitionId": format!("/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{role}", a.sub), "principalId": principal}}),
        )
    };
    let reader_id = "acdd72a7-3385-48ef-bd42-f606fba81ae7";
    for (scope, name, role, principal, status, want) in [
        (
            rg_scope.clone(),
            "not-a-guid".to_string(),
            reader_id,
            me.clone(),
            400,
            "InvalidRoleAssignmentId",
        ),
        (
            rg_scope.clone(),
            uuid::Uuid::new_v4().to_string(),
            "00000000-0000-0000-0000-000000000000",
            me.clone(),
            400,
            "RoleDefinitionDoesNotExist",
        ),
        (
            rg_scope.clone(),
            uuid::Uuid::new_v4().to_string(),
            reader_id,
            uuid::Uuid::new_v4().to_string(),
            400,
            "PrincipalNotFound",
        ),
        (
            format!("/subscriptions/{}/resourceGroups/nope", a.sub),
            uuid::Uuid::new_v4().to_string(),
            reader_id,
            me.clone(),
            404,
            "ResourceGroupNotFound",
        ),
    ] {
        let (path, body) = ra(&scope, &name, role, &principal);
        let (st, v) = a.req(Method::PUT, &path, Some(body)).await;
        assert_eq!((st, code(&v)), (status, want), "{v}");
    }
    let (st, v) = a
        .req(Method::DELETE, &a.rg_path("does-not-exist"), None)
        .await;
    assert_eq!((st, code(&v)), (404, "ResourceGroupNotFound"));

    // deleting a group deletes the assignments at its scope
    let (st, _) = a.req(Method::DELETE, &a.rg_path("workloads"), None).await;
    assert_eq!(st, 200);
    let left = ok(&["role", "assignment", "list", "--assignee", &me, "--all"]);
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["properties"]["scope"], rg_scope.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_set_instances_share_the_scale_set_identities() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]);
    let cli = |args: &[&str]| server.cli(args);
    cli(&["group", "create", "-n", "pool"]);
    let x = cli(&["identity", "create", "-g", "pool", "-n", "pool-id"]);
    let ss = cli(&[
        "vmss",
        "create",
        "-g",
        "pool",
        "-n",
        "nodes",
        "--assign-identity",
        "[system]",
        "pool-id",
    ]);
    assert_eq!(ss["type"], "Microsoft.Compute/virtualMachineScaleSets");
    let sys = ss["identity"]["principalId"].as_str().unwrap().to_string();
    let mut imds = vec![];
    let mut nodes = vec![];
    for i in 0..2 {
        let tok = cli(&["vmss", "join-token", "-g", "pool", "-n", "nodes"])["joinToken"]
            .as_str()
            .unwrap()
            .to_string();
        let state = dir
            .path()
            .join(format!("n{i}"))
            .to_string_lossy()
            .to_string();
        let node = spawn_until(
            &server.node_args(&state, Some(&tok)),
            "IMDS endpoint:",
            dir.path(),
        )
        .unwrap();
        imds.push(node.find("IMDS endpoint:").unwrap());
        nodes.push(node);
    }
    let instances = cli(&["vmss", "list-instances", "-g", "pool", "-n", "nodes"]);
    assert_eq!(instances.as_array().unwrap().len(), 2, "{instances}");
    assert_eq!(instances[1]["name"], "nodes_1");
    let x_cid = x["properties"]["clientId"].as_str().unwrap();
    for (i, endpoint) in imds.iter().enumerate() {
        let (st, t) = imds_token(
            endpoint,
            &format!("resource=https://vault.azure.net&client_id={x_cid}"),
        )
        .await;
        assert_eq!(st, 200, "{t}");
        assert_eq!(
            claims(t["access_token"].as_str().unwrap())["oid"],
            x["properties"]["principalId"]
        );
        let (st, t) = imds_token(endpoint, "resource=https://vault.azure.net").await;
        assert_eq!(st, 200);
        let c = claims(t["access_token"].as_str().unwrap());
        assert_eq!(
            c["oid"],
            sys.as_str(),
            "one system identity for the whole scale set"
        );
        assert!(c["xms_az_rid"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/virtualMachines/{i}")));
        let doc: Value = http()
            .get(format!(
                "{endpoint}/metadata/instance/compute?api-version=2021-02-01"
            ))
            .header("Metadata", "true")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(doc["vmScaleSetName"], "nodes");
        assert_eq!(doc["name"], format!("nodes_{i}"));
    }
    // removing an instance revokes that host only
    let (admin, token) = server.admin().await;
    let id0 = instances[0]["id"].as_str().unwrap();
    let r = admin
        .delete(format!("{}{id0}?api-version=2024-11-01", server.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (st, _) = imds_token(&imds[0], "resource=https://after-delete.example/").await;
    assert_eq!(st, 400);
    let (st, _) = imds_token(&imds[1], "resource=https://after-delete.example/").await;
    assert_eq!(st, 200);
    // an identity removed from the scale set is no longer issued to its instances
    cli(&[
        "vmss",
        "identity",
        "remove",
        "-g",
        "pool",
        "-n",
        "nodes",
        "--identities",
        "pool-id",
    ]);
    let (st, _) = imds_token(
        &imds[1],
        &format!("resource=https://storage.azure.com/&client_id={x_cid}"),
    )
    .await;
    assert_eq!(st, 400);
    // deleting the scale set revokes every instance
    cli(&["vmss", "delete", "-g", "pool", "-n", "nodes"]);
    let (st, _) = imds_token(&imds[1], "resource=https://other.example/").await;
    assert_eq!(st, 400);

    // a 1,001st user-assigned identity is refused, and nothing is written
    let sub_prefix = ss["id"]
        .as_str()
        .unwrap()
        .split("/resourceGroups")
        .next()
        .unwrap()
        .to_string();
    let many: serde_json::Map<String, Value> = (0..=1000)
        .map(|i| (format!("{sub_prefix}/resourceGroups/pool/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u{i}"), json!({})))
        .collect();
    let body = json!({"location": "local", "identity": {"type": "UserAssigned", "userAssignedIdentities": many.clone()}});
    let url = format!("{}{sub_prefix}/resourceGroups/pool/providers/Microsoft.Compute/virtualMachineScaleSets/big?api-version=2024-11-01", server.url);
    let r = admin
        .put(&url)
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v), "FailedIdentityOperation");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("User Assigned Identities Number '1001' exceed limit '1000'"),
        "{msg}"
    );
    // and, as Azure does, more than 150 newly assigned in one request
    let some: serde_json::Map<String, Value> = many
        .iter()
        .take(151)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let body = json!({"location": "local", "identity": {"type": "UserAssigned", "userAssignedIdentities": some}});
    let r = admin
        .put(&url)
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v), "FailedIdentityOperation");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Assign exceed limit '150' in one request"));
    let r = admin.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fic_writes_under_one_identity_never_half_apply() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]).unwrap();
    let a = Admin::new(&up).await;
    let base = format!(
        "{}/federatedIdentityCredentials",
        up.s("/demoIdentity/resourceId")
    );
    let mut tasks = vec![];
    for i in 0..12 {
        let (c, url, token) = (
            a.c.clone(),
            format!("{}{base}/fic-{i}?api-version=2023-01-31", a.server),
            a.token.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let body = json!({"properties": {"issuer": "https://issuer.example", "subject": format!("s{i}"), "audiences": ["api://AzureADTokenExchange"]}});
            let r = c.put(url).bearer_auth(token).json(&body).send().await.unwrap();
            let st = r.status().as_u16();
            (i, st, r.json::<Value>().await.unwrap_or(Value::Null))
        }));
    }
    let mut created = vec![];
    for t in tasks {
        let (i, st, v) = t.await.unwrap();
        match st {
            201 => created.push(format!("fic-{i}")),
            409 => assert_eq!(
                code(&v),
                "ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity"
            ),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    let (_, list) = a
        .req(Method::GET, &format!("{base}?api-version=2023-01-31"), None)
        .await;
    let mut names: Vec<String> = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    created.sort();
    assert_eq!(
        names, created,
        "exactly the writes that answered 201 are stored"
    );
    // MSAL instance discovery answered for our host
    let r: Value = a
        .c
        .get(format!("{}/common/discovery/instance?api-version=1.1&authorization_endpoint={}/{}/oauth2/v2.0/authorize", a.server, a.server, up.s("/tenantId")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        r["tenant_discovery_endpoint"],
        format!(
            "{}/{}/v2.0/.well-known/openid-configuration",
            a.server,
            up.s("/tenantId")
        )
    );
}

/// A daemon keeps serving when its stdout goes away: the reader of `keyless up`'s output closes
/// the pipe before the first line, and the host agent still answers (`println!` would have
/// panicked at the first line on EPIPE).
#[tokio::test]
async fn a_closed_stdout_does_not_stop_keyless_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = std::process::Command::new(bin())
        .args(["up", "--data-dir"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--imds-listen", "127.0.0.1:0"])
        .env("KEYLESS_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let info_path = data.join("endpoints.json");
    let mut info = Value::Null;
    for _ in 0..600 {
        if let Ok(b) = std::fs::read(&info_path) {
            info = serde_json::from_slice(&b).unwrap_or(Value::Null);
            if info["imdsUrl"].is_string() {
                break;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "keyless up exited with its stdout closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // the lines after endpoints.json are printed by now; the agent still answers
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(child.try_wait().unwrap().is_none(), "keyless up died");
    let (st, body) = imds_token(
        info["imdsUrl"]
            .as_str()
            .expect("endpoints.json names the IMDS"),
        "resource=https://management.azure.com/",
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A node whose join answer was lost (a server dying after the commit) retries the same join:
/// the same key gets a certificate for the same host — the same scale set instance, not a new
/// one — while the token has not expired; any other key finds the token used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_join_with_the_same_key_gets_the_same_host() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]);
    let cli = |args: &[&str]| server.cli(args);
    cli(&["group", "create", "-n", "pool"]);
    cli(&["vmss", "create", "-g", "pool", "-n", "nodes"]);
    let tok = cli(&["vmss", "join-token", "-g", "pool", "-n", "nodes"])["joinToken"]
        .as_str()
        .unwrap()
        .to_string();
    let c = https(&server.ca);
    let join = |csr: String| {
        let (c, url, tok) = (c.clone(), server.url.clone(), tok.clone());
        async move {
            let r = c
                .post(format!("{url}/keyless/host/v1/join"))
                .json(&json!({"joinToken": tok, "csr": csr}))
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap())
        }
    };
    let (csr, _key) = keyless_pki::generate_csr("keyless-node").unwrap();
    let (st, first) = join(csr.clone()).await;
    assert_eq!(st, 200, "{first}");
    let (st, again) = join(csr.clone()).await;
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["vmResourceId"], first["vmResourceId"]);
    assert!(
        first["vmResourceId"]
            .as_str()
            .unwrap()
            .ends_with("/virtualMachineScaleSets/nodes/virtualMachines/0"),
        "{first}"
    );
    assert_ne!(
        again["certificate"], first["certificate"],
        "a new certificate"
    );
    let instances = cli(&["vmss", "list-instances", "-g", "pool", "-n", "nodes"]);
    assert_eq!(instances.as_array().unwrap().len(), 1, "{instances}");
    // another key: the token is used
    let (other, _key) = keyless_pki::generate_csr("keyless-node").unwrap();
    let (st, v) = join(other).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("invalid_join_token")),
        "{v}"
    );
    assert!(v["error_description"]
        .as_str()
        .unwrap()
        .contains("already been used"));
}

/// `keyless up --listen <an address localhost does not name>`: the embedded agent joins the
/// server where it listens (it used to join https://localhost:<port> and fail at start).
#[test]
fn up_listens_on_a_specific_address_and_its_agent_joins_there() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_string_lossy().to_string();
    let args = [
        "up",
        "--data-dir",
        &data_s,
        "--listen",
        "127.0.0.2:0",
        "--imds-listen",
        "127.0.0.1:0",
        "--sync-interval",
        "1",
    ];
    let proc = spawn_until(&args, "Stop with Ctrl-C", dir.path()).expect("keyless up starts");
    let info: Value =
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (st, t) = rt.block_on(imds_token(
        info["imdsUrl"].as_str().unwrap(),
        "resource=https://management.azure.com/",
    ));
    assert_eq!(st, 200, "{t}");
    drop(proc);
}
