//! Batch pools with real processes: a pool is a group of hosts holding the pool's identities;
//! its fixed target size bounds how many nodes may join, shrinking removes the newest nodes,
//! a node of another pool never gets this pool's identity, and deleting the pool revokes every
//! node. VM extensions as ARM resources.

mod common;

use common::*;
use serde_json::{json, Value};

fn write_body(dir: &std::path::Path, name: &str, body: &Value) -> String {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(body).unwrap()).unwrap();
    p.to_string_lossy().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_nodes_hold_the_pool_identities_within_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]);
    let cli = |args: &[&str]| server.cli(args);
    cli(&["group", "create", "-n", "batch"]);
    let id = cli(&["identity", "create", "-g", "batch", "-n", "pool-id"]);
    let id_res = id["id"].as_str().unwrap().to_string();
    let id_cid = id["properties"]["clientId"].as_str().unwrap().to_string();
    let acct = cli(&["batch", "account", "create", "-n", "acct1", "-g", "batch"]);
    assert_eq!(acct["type"], "Microsoft.Batch/batchAccounts");
    let settings = json!({
        "secretsManagementSettings": {
            "pollingIntervalInS": "300",
            "certificateStoreLocation": "/var/lib/waagent/Microsoft.Azure.KeyVault.Store",
            "requireInitialSync": true,
            "observedCertificates": ["https://kv1.vault.localhost/secrets/web"]
        },
        "authenticationSettings": {"msiEndpoint": "http://169.254.169.254/metadata/identity", "msiClientId": id_cid}
    });
    // the seed 004 request body, as the Batch management API takes it
    let body = json!({
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {id_res.clone(): {}}},
        "properties": {
            "vmSize": "STANDARD_D2S_V3",
            "deploymentConfiguration": {"virtualMachineConfiguration": {
                "imageReference": {"publisher": "canonical", "offer": "ubuntuserver", "sku": "20.04-lts"},
                "nodeAgentSkuId": "batch.node.ubuntu 20.04",
                "extensions": [{"name": "KVExtensions", "type": "KeyVaultForLinux", "publisher": "Microsoft.Azure.KeyVault",
                                "typeHandlerVersion": "3.0", "autoUpgradeMinorVersion": true, "settings": settings}]
            }},
            "scaleSettings": {"fixedScale": {"targetDedicatedNodes": 1, "resizeTimeout": "PT15M"}}
        }
    });
    let file = write_body(dir.path(), "pool.json", &body);
    let pool = cli(&[
        "batch",
        "pool",
        "create",
        "--account-name",
        "acct1",
        "-g",
        "batch",
        "-n",
        "web",
        "--body",
        &file,
    ]);
    assert_eq!(pool["type"], "Microsoft.Batch/batchAccounts/pools");
    assert_eq!(
        pool["identity"]["userAssignedIdentities"][&id_res]["clientId"],
        id_cid.as_str()
    );
    assert_eq!(pool["properties"]["currentDedicatedNodes"], 0);
    assert_eq!(
        pool["properties"]["deploymentConfiguration"]["virtualMachineConfiguration"]["extensions"]
            [0]["settings"],
        settings
    );

    let join = |pool: &str| {
        cli(&[
            "batch",
            "pool",
            "join-token",
            "--account-name",
            "acct1",
            "-g",
            "batch",
            "-n",
            pool,
        ])["joinToken"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let start_node = |name: &str, token: &str| {
        let state = dir.path().join(name).to_string_lossy().to_string();
        spawn_until(
            &server.node_args(&state, Some(token)),
            "IMDS endpoint:",
            dir.path(),
        )
    };
    let n1 = start_node("n1", &join("web")).expect("first node joins");
    let imds1 = n1.find("IMDS endpoint:").unwrap();
    let vault = format!("resource=https://vault.azure.net&client_id={id_cid}");
    let (st, t) = imds_token(&imds1, &vault).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        claims(t["access_token"].as_str().unwrap())["oid"],
        id["properties"]["principalId"]
    );

    // the pool is at its target: a second node is refused
    let refused = start_node("n2", &join("web"));
    assert!(
        refused.is_err(),
        "a node beyond the target size must not join"
    );
    // resize to 2: now it joins
    let p = cli(&[
        "batch",
        "pool",
        "resize",
        "--account-name",
        "acct1",
        "-g",
        "batch",
        "-n",
        "web",
        "--target-dedicated-nodes",
        "2",
    ]);
    assert_eq!(
        p["properties"]["scaleSettings"]["fixedScale"]["targetDedicatedNodes"],
        2
    );
    let n2 = start_node("n2b", &join("web")).expect("joins after the resize");
    let imds2 = n2.find("IMDS endpoint:").unwrap();
    assert_eq!(imds_token(&imds2, &vault).await.0, 200);
    let shown = cli(&[
        "batch",
        "pool",
        "show",
        "--account-name",
        "acct1",
        "-g",
        "batch",
        "-n",
        "web",
    ]);
    assert_eq!(shown["properties"]["currentDedicatedNodes"], 2);

    // a node of another pool cannot get this pool's identity
    let other = write_body(
        dir.path(),
        "other.json",
        &json!({"properties": {"vmSize": "STANDARD_D2S_V3"}}),
    );
    cli(&[
        "batch",
        "pool",
        "create",
        "--account-name",
        "acct1",
        "-g",
        "batch",
        "-n",
        "other",
        "--body",
        &other,
    ]);
    let n3 = start_node("n3", &join("other")).expect("joins its own pool");
    let imds3 = n3.find("IMDS endpoint:").unwrap();
    let (st, _) = imds_token(&imds3, &vault).await;
    assert_eq!(
        st, 400,
        "another pool's node must not get this pool's identity"
    );

    // shrink to 1: the newest node goes, the first stays
    cli(&[
        "batch",
        "pool",
        "resize",
        "--account-name",
        "acct1",
        "-g",
        "batch",
        "-n",
        "web",
        "--target-dedicated-nodes",
        "1",
    ]);
    let fresh = format!("resource=https://shrink.example/&client_id={id_cid}");
    assert_eq!(imds_token(&imds2, &fresh).await.0, 400);
    assert_eq!(imds_token(&imds1, &fresh).await.0, 200);
    let listed = cli(&[
        "batch",
        "pool",
        "list",
        "--account-name",
        "acct1",
        "-g",
        "batch",
    ]);
    assert_eq!(listed.as_array().unwrap().len(), 2);

    // deleting the pool revokes its nodes
    cli(&[
        "batch",
        "pool",
        "delete",
        "--account-name",
        "acct1",
        "-g",
        "batch",
        "-n",
        "web",
    ]);
    let gone = format!("resource=https://after-delete.example/&client_id={id_cid}");
    assert_eq!(imds_token(&imds1, &gone).await.0, 400);
    drop((n1, n2, n3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_and_extension_bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]);
    let cli = |args: &[&str]| server.cli(args);
    cli(&["group", "create", "-n", "batch"]);
    cli(&["batch", "account", "create", "-n", "acct2", "-g", "batch"]);
    let (admin, token) = server.admin().await;
    let sub = cli(&["group", "show", "-n", "batch"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let put = |path: String, body: Value| {
        let admin = admin.clone();
        let token = token.clone();
        let url = format!("{}{sub}{path}", server.url);
        async move {
            let r = admin
                .put(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let pools = "/providers/Microsoft.Batch/batchAccounts/acct2/pools";
    let (st, v) = put(
        format!("{pools}/bad%20name?api-version=2024-07-01"),
        json!({"properties": {}}),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("InvalidResourceName")),
        "{v}"
    );
    let (st, v) = put(
        format!("{pools}/p1?api-version=2024-07-01"),
        json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {"/subscriptions/x/nope": {}}}}),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = put(
        format!("{pools}/p1?api-version=2024-07-01"),
        json!({"properties": {"deploymentConfiguration": {"virtualMachineConfiguration": {"extensions": [{"name": "x"}]}}}}),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = put(format!("{pools}/p1?api-version=1999-01-01"), json!({})).await;
    assert_eq!(st, 400, "{v}");
    // nothing was written
    let listed = cli(&[
        "batch",
        "pool",
        "list",
        "--account-name",
        "acct2",
        "-g",
        "batch",
    ]);
    assert_eq!(listed, json!([]));
    let (st, _) = put(
        "/providers/Microsoft.Batch/batchAccounts/Bad_Name?api-version=2024-07-01".into(),
        json!({"location": "local"}),
    )
    .await;
    assert_eq!(st, 400);

    // VM extensions: set, show (protected settings never echoed), list, delete
    cli(&[
        "vm",
        "create",
        "-g",
        "batch",
        "-n",
        "vm1",
        "--assign-identity",
    ]);
    let settings =
        r#"{"secretsManagementSettings":{"pollingIntervalInS":"60","observedCertificates":[]}}"#;
    let e = cli(&[
        "vm",
        "extension",
        "set",
        "-g",
        "batch",
        "--vm-name",
        "vm1",
        "-n",
        "KeyVaultForLinux",
        "--publisher",
        "Microsoft.Azure.KeyVault",
        "--settings",
        settings,
    ]);
    assert_eq!(e["type"], "Microsoft.Compute/virtualMachines/extensions");
    assert_eq!(
        e["properties"]["settings"]["secretsManagementSettings"]["pollingIntervalInS"],
        "60"
    );
    let (st, v) = put(
        "/providers/Microsoft.Compute/virtualMachines/vm1/extensions/secret-ext?api-version=2024-07-01".into(),
        json!({"properties": {"publisher": "P", "type": "T", "protectedSettings": {"password": "hunter2"}}}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    assert!(!v.to_string().contains("hunter2"));
    let listed = cli(&["vm", "extension", "list", "-g", "batch", "--vm-name", "vm1"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    cli(&[
        "vm",
        "extension",
        "delete",
        "-g",
        "batch",
        "--vm-name",
        "vm1",
        "-n",
        "secret-ext",
    ]);
    let listed = cli(&["vm", "extension", "list", "-g", "batch", "--vm-name", "vm1"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    // deleting the VM takes its extensions along
    cli(&["vm", "delete", "-g", "batch", "-n", "vm1"]);
    cli(&["vm", "create", "-g", "batch", "-n", "vm1"]);
    assert_eq!(
        cli(&["vm", "extension", "list", "-g", "batch", "--vm-name", "vm1"]),
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_host_agent_runs_the_vm_key_vault_extension() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]);
    let cli = |args: &[&str]| server.cli(args);
    cli(&["group", "create", "-n", "hosts"]);
    cli(&[
        "vm",
        "create",
        "-g",
        "hosts",
        "-n",
        "web1",
        "--assign-identity",
    ]);
    let tok = cli(&["vm", "join-token", "-g", "hosts", "-n", "web1"])["joinToken"]
        .as_str()
        .unwrap()
        .to_string();
    let state = dir.path().join("web1").to_string_lossy().to_string();
    let root = dir.path().to_string_lossy().to_string();
    let mut args = server.node_args(&state, Some(&tok));
    args.extend(["--extension-store-root", root.as_str()]);
    let _node = spawn_until(&args, "IMDS endpoint:", dir.path()).unwrap();
    let store = dir.path().join("store");
    let settings = json!({"secretsManagementSettings": {
        "pollingIntervalInS": "60",
        "certificateStoreLocation": store,
        "observedCertificates": []
    }})
    .to_string();
    cli(&[
        "vm",
        "extension",
        "set",
        "-g",
        "hosts",
        "--vm-name",
        "web1",
        "-n",
        "KeyVaultForLinux",
        "--publisher",
        "Microsoft.Azure.KeyVault",
        "--settings",
        &settings,
    ]);
    let status = std::path::Path::new(&state).join("extensions/KeyVaultForLinux/status/0.status");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let doc = loop {
        if let Ok(text) = std::fs::read_to_string(&status) {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v[0]["status"]["status"] == "success" {
                break v;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the extension never reported"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(doc[0]["version"], "1.0");
    assert_eq!(doc[0]["status"]["code"], 0);
}
