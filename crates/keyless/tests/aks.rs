//! Managed clusters with real processes (seed 000's control plane): the cluster resource and
//! its node resource group, pools as scale sets whose nodes are host agents, the pod identity
//! profile's rules (each refusal leaves nothing written), the add-on's two actions, the host
//! view's `cluster` object, and the cascades.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;

const API: &str = "api-version=2026-08-01";

/// The admin CLI environment of a [`ServerProc`], for runs whose output is not JSON or that
/// must fail.
fn cli_env(server: &ServerProc, dir: &Path) -> Vec<(&'static str, String)> {
    let find = |p: &str| server.proc.find(p).unwrap();
    vec![
        ("KEYLESS_SERVER", server.url.clone()),
        ("KEYLESS_TENANT_ID", find("Tenant:")),
        ("KEYLESS_CA_FILE", server.ca.clone()),
        ("KEYLESS_CLIENT_ID", find("export KEYLESS_CLIENT_ID=")),
        (
            "KEYLESS_CLIENT_SECRET",
            find("export KEYLESS_CLIENT_SECRET="),
        ),
        (
            "KEYLESS_DATA_DIR",
            dir.join("server").to_string_lossy().to_string(),
        ),
    ]
}

fn run_cli(env: &[(&'static str, String)], args: &[&str]) -> std::process::Output {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run(args, &env)
}

/// stdout of a CLI run that must succeed.
fn raw(env: &[(&'static str, String)], args: &[&str]) -> String {
    let out = run_cli(env, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// stderr of a CLI run that must fail.
fn fails(env: &[(&'static str, String)], args: &[&str]) -> String {
    let out = run_cli(env, args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Calls to ARM with one bearer token.
#[derive(Clone)]
struct Arm {
    c: reqwest::Client,
    url: String,
    token: String,
}

impl Arm {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut r = self
            .c
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(b);
        }
        let r = r.send().await.unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }
    async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
    fn with_token(&self, token: &str) -> Arm {
        Arm {
            token: token.to_string(),
            ..self.clone()
        }
    }
}

fn cluster_path(sub: &str, rg: &str, name: &str) -> String {
    format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ContainerService/managedClusters/{name}")
}

/// The host view of a node, read with its own host credential.
async fn host_view(server: &ServerProc, state: &Path) -> Value {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let ca = keyless_pki::pem_blocks(&read(Path::new(&server.ca)), "CERTIFICATE").remove(0);
    let cert =
        keyless_pki::pem_blocks(&read(&state.join("host-cert.pem")), "CERTIFICATE").remove(0);
    let key = keyless_pki::pem_blocks(&read(&state.join("host-key.pem")), "PRIVATE KEY").remove(0);
    let tls = keyless_pki::client_tls_config(&ca, Some((&cert, &key))).unwrap();
    let c = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .build()
        .unwrap();
    let r = c
        .get(format!("{}/keyless/host/v1/identities", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

/// A token from the node's IMDS, for the identity with `client_id`.
async fn node_token(imds: &str, resource: &str, client_id: &str) -> (u16, Value) {
    imds_token(imds, &format!("resource={resource}&client_id={client_id}")).await
}

/// The status of a node token request, retried until it is `want` (at most 10 s: the agent
/// syncs its view every second).
async fn eventually(imds: &str, resource: &str, client_id: &str, want: u16) -> u16 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let st = node_token(imds, resource, client_id).await.0;
        if st == want || std::time::Instant::now() > deadline {
            return st;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_its_nodes_and_pod_identities() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]);
    let env = cli_env(&server, dir.path());
    let cli = |args: &[&str]| server.cli(args);
    let (c, admin_token) = server.admin().await;
    let arm = Arm {
        c,
        url: server.url.clone(),
        token: admin_token,
    };

    // the seed's commands, with keyless in place of az
    cli(&[
        "group",
        "create",
        "--name",
        "myResourceGroup",
        "--location",
        "eastus",
    ]);
    let cluster = cli(&[
        "aks",
        "create",
        "-g",
        "myResourceGroup",
        "-n",
        "myAKSCluster",
        "--enable-pod-identity",
        "--network-plugin",
        "azure",
        "--node-count",
        "2",
    ]);
    assert_eq!(
        cluster["type"],
        "Microsoft.ContainerService/managedClusters"
    );
    assert_eq!(cluster["name"], "myAKSCluster");
    assert_eq!(cluster["location"], "eastus");
    assert_eq!(cluster["identity"]["type"], "SystemAssigned");
    let cluster_principal = s(&cluster["identity"]["principalId"]);
    assert!(!cluster_principal.is_empty());
    let p = &cluster["properties"];
    assert_eq!(p["provisioningState"], "Succeeded");
    assert_eq!(
        p["nodeResourceGroup"],
        "MC_myResourceGroup_myAKSCluster_eastus"
    );
    assert_eq!(p["networkProfile"]["networkPlugin"], "azure");
    assert_eq!(p["podIdentityProfile"]["enabled"], true);
    assert_eq!(p["podIdentityProfile"]["allowNetworkPluginKubenet"], false);
    let pool = &p["agentPoolProfiles"][0];
    assert_eq!(
        (
            &pool["name"],
            &pool["count"],
            &pool["mode"],
            &pool["osType"],
            &pool["type"],
            &pool["provisioningState"]
        ),
        (
            &json!("nodepool1"),
            &json!(2),
            &json!("System"),
            &json!("Linux"),
            &json!("VirtualMachineScaleSets"),
            &json!("Succeeded")
        )
    );
    let kubelet = p["identityProfile"]["kubeletidentity"].clone();
    assert!(s(&kubelet["resourceId"]).ends_with(
        "/resourceGroups/MC_myResourceGroup_myAKSCluster_eastus/providers/Microsoft.ManagedIdentity/userAssignedIdentities/myAKSCluster-agentpool"
    ));
    let sub = s(&cluster["id"]).split('/').nth(2).unwrap().to_string();
    let cpath = cluster_path(&sub, "myResourceGroup", "myAKSCluster");

    let node_group = raw(
        &env,
        &[
            "aks",
            "show",
            "-g",
            "myResourceGroup",
            "-n",
            "myAKSCluster",
            "--query",
            "nodeResourceGroup",
            "-o",
            "tsv",
        ],
    );
    assert_eq!(node_group, "MC_myResourceGroup_myAKSCluster_eastus");
    let nodes_id = raw(
        &env,
        &[
            "group",
            "show",
            "-n",
            &node_group,
            "-o",
            "tsv",
            "--query",
            "id",
        ],
    );
    assert_eq!(
        nodes_id,
        format!("/subscriptions/{sub}/resourceGroups/{node_group}")
    );
    assert_eq!(
        cli(&["aks", "list", "-g", "myResourceGroup"])[0]["id"],
        cluster["id"]
    );
    assert_eq!(cli(&["aks", "list"]).as_array().unwrap().len(), 1);
    // the SDK's api-version, a preview, and one out of range
    assert_eq!(
        arm.get(&format!("{cpath}?api-version=2021-03-01")).await.0,
        200
    );
    assert_eq!(
        arm.get(&format!("{cpath}?api-version=2024-06-02-preview"))
            .await
            .0,
        200
    );
    let (st, v) = arm.get(&format!("{cpath}?api-version=2018-03-31")).await;
    assert_eq!(
        (st, s(&v["error"]["code"])),
        (400, "NoRegisteredProviderFound".into())
    );

    // the identities, and the seed's role assignment on the node resource group
    cli(&[
        "group",
        "create",
        "--name",
        "myIdentityResourceGroup",
        "--location",
        "eastus",
    ]);
    let id1 = cli(&[
        "identity",
        "create",
        "-g",
        "myIdentityResourceGroup",
        "-n",
        "application-identity_1",
    ]);
    let id2 = cli(&[
        "identity",
        "create",
        "-g",
        "myIdentityResourceGroup",
        "-n",
        "application-identity_2",
    ]);
    let (id1_res, id1_cid, id1_oid) = (
        s(&id1["id"]),
        s(&id1["properties"]["clientId"]),
        s(&id1["properties"]["principalId"]),
    );
    let (id2_res, id2_cid) = (s(&id2["id"]), s(&id2["properties"]["clientId"]));
    assert_eq!(
        raw(
            &env,
            &[
                "identity",
                "show",
                "-g",
                "myIdentityResourceGroup",
                "-n",
                "application-identity_1",
                "--query",
                "clientId",
                "-otsv"
            ]
        ),
        id1_cid
    );
    let ra = cli(&[
        "role",
        "assignment",
        "create",
        "--role",
        "Virtual Machine Contributor",
        "--assignee",
        &id1_cid,
        "--scope",
        &nodes_id,
    ]);
    assert_eq!(ra["properties"]["principalId"], id1_oid.as_str());

    // pod-identity add grants the cluster identity Managed Identity Operator first
    let after = cli(&[
        "aks",
        "pod-identity",
        "add",
        "--resource-group",
        "myResourceGroup",
        "--cluster-name",
        "myAKSCluster",
        "--namespace",
        "my-app",
        "--name",
        "my-pod-identity",
        "--identity-resource-id",
        &id1_res,
    ]);
    let entry = &after["properties"]["podIdentityProfile"]["userAssignedIdentities"][0];
    assert_eq!(entry["name"], "my-pod-identity");
    assert_eq!(entry["namespace"], "my-app");
    assert_eq!(entry["identity"]["clientId"], id1_cid.as_str());
    assert_eq!(entry["identity"]["objectId"], id1_oid.as_str());
    assert_eq!(entry["provisioningState"], "Updating");
    let grants = cli(&[
        "role",
        "assignment",
        "list",
        "--scope",
        &id1_res,
        "--assignee",
        &cluster_principal,
    ]);
    assert!(grants
        .as_array()
        .unwrap()
        .iter()
        .any(|a| s(&a["properties"]["roleDefinitionId"])
            .ends_with("f1a07417-d97a-45cb-824c-7a7467783830")));

    // one scale set per pool in the node group, holding the kubelet identity and the pod identity
    let sets = cli(&["vmss", "list", "-g", &node_group]);
    let sets = sets.as_array().unwrap();
    assert_eq!(sets.len(), 1);
    let ss_name = s(&sets[0]["name"]);
    assert!(
        ss_name.starts_with("aks-nodepool1-")
            && ss_name.ends_with("-vmss")
            && ss_name.len() == "aks-nodepool1-12345678-vmss".len(),
        "{ss_name}"
    );
    let held = sets[0]["identity"]["userAssignedIdentities"]
        .as_object()
        .unwrap();
    assert!(held.contains_key(&id1_res) && held.contains_key(&s(&kubelet["resourceId"])));

    // a host agent joins as a node of the pool
    let join = cli(&[
        "aks",
        "nodepool",
        "join-token",
        "-g",
        "myResourceGroup",
        "--cluster-name",
        "myAKSCluster",
        "-n",
        "nodepool1",
    ]);
    assert!(s(&join["vmResourceId"]).ends_with(&format!("/virtualMachineScaleSets/{ss_name}")));
    let state = dir.path().join("node1");
    let node = spawn_until(
        &server.node_args(
            &state.to_string_lossy(),
            Some(join["joinToken"].as_str().unwrap()),
        ),
        "IMDS endpoint:",
        dir.path(),
    )
    .expect("the node joins");
    let imds = node.find("IMDS endpoint:").unwrap();
    let (st, t) = node_token(&imds, "https://vault.azure.net", &id1_cid).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        claims(t["access_token"].as_str().unwrap())["oid"],
        id1_oid.as_str()
    );
    let (st, kt) = node_token(
        &imds,
        "https://management.azure.com/",
        &s(&kubelet["clientId"]),
    )
    .await;
    assert_eq!(st, 200, "{kt}");
    let kubelet_token = s(&kt["access_token"]);
    assert_eq!(claims(&kubelet_token)["oid"], kubelet["objectId"]);

    // the host view says which cluster the node belongs to
    let view = host_view(&server, &state).await;
    assert_eq!(
        view["cluster"],
        json!({
            "id": cluster["id"],
            "networkPlugin": "azure",
            "podIdentity": {"enabled": true, "allowNetworkPluginKubenet": false, "clientIds": [id1_cid]},
            "kubeletIdentity": kubelet,
        })
    );

    // the add-on's actions, as the kubelet identity
    let kubelet_arm = arm.with_token(&kubelet_token);
    let (st, prof) = kubelet_arm
        .post(&format!("{cpath}/readPodIdentityProfile?{API}"), &json!({}))
        .await;
    assert_eq!(st, 200, "{prof}");
    assert_eq!(prof["kubeletIdentity"], kubelet);
    assert_eq!(
        prof["podIdentityProfile"]["userAssignedIdentities"][0]["identity"]["clientId"],
        id1_cid.as_str()
    );
    let report = json!({"userAssignedIdentities": [
        {"name": "my-pod-identity", "namespace": "my-app", "provisioningState": "Failed", "error": {"code": "AzureIdentityConflict", "message": "an object of that name exists"}},
        {"name": "unknown", "namespace": "my-app", "provisioningState": "Assigned"},
    ]});
    let (st, v) = kubelet_arm
        .post(&format!("{cpath}/reportPodIdentityStatus?{API}"), &report)
        .await;
    assert_eq!(st, 204, "{v}");
    let shown = cli(&["aks", "show", "-g", "myResourceGroup", "-n", "myAKSCluster"]);
    let e = &shown["properties"]["podIdentityProfile"]["userAssignedIdentities"][0];
    assert_eq!(e["provisioningState"], "Failed");
    assert_eq!(
        e["provisioningInfo"]["error"]["error"]["code"],
        "AzureIdentityConflict"
    );
    let ok = json!({"userAssignedIdentities": [{"name": "my-pod-identity", "namespace": "my-app", "provisioningState": "Assigned"}]});
    assert_eq!(
        kubelet_arm
            .post(&format!("{cpath}/reportPodIdentityStatus?{API}"), &ok)
            .await
            .0,
        204
    );
    let shown = cli(&["aks", "show", "-g", "myResourceGroup", "-n", "myAKSCluster"]);
    let e = &shown["properties"]["podIdentityProfile"]["userAssignedIdentities"][0];
    assert_eq!(e["provisioningState"], "Assigned");
    assert!(e.get("provisioningInfo").is_none(), "{e}");
    let bad = json!({"userAssignedIdentities": [{"name": "my-pod-identity", "namespace": "my-app", "provisioningState": "Succeeded"}]});
    assert_eq!(
        kubelet_arm
            .post(&format!("{cpath}/reportPodIdentityStatus?{API}"), &bad)
            .await
            .0,
        400
    );

    // refused callers: a pod identity's token, and a service principal without roles; a
    // Reader of the cluster may read the profile, not report
    let pod_arm = arm.with_token(&s(&node_token(
        &imds,
        "https://management.azure.com/",
        &id1_cid,
    )
    .await
    .1["access_token"]));
    for action in ["readPodIdentityProfile", "reportPodIdentityStatus"] {
        let (st, v) = pod_arm.post(&format!("{cpath}/{action}?{API}"), &ok).await;
        assert_eq!(
            (st, s(&v["error"]["code"])),
            (403, "AuthorizationFailed".to_string()),
            "{action}: {v}"
        );
    }
    let app = cli(&["app", "create", "--display-name", "reader"]);
    let (st, t) = sp_token(
        &https(&server.ca),
        &server.url,
        &s(&app["tenant"]),
        &s(&app["appId"]),
        &s(&app["password"]),
        "https://management.azure.com/.default",
    )
    .await;
    assert_eq!(st, 200, "{t}");
    let sp_arm = arm.with_token(&s(&t["access_token"]));
    let (st, v) = sp_arm
        .post(&format!("{cpath}/readPodIdentityProfile?{API}"), &json!({}))
        .await;
    assert_eq!(
        (st, s(&v["error"]["code"])),
        (403, "AuthorizationFailed".to_string()),
        "{v}"
    );
    // a stranger learns nothing of clusters that do not exist either
    let (st, _) = sp_arm
        .post(
            &format!(
                "{}/readPodIdentityProfile?{API}",
                cluster_path(&sub, "myResourceGroup", "nope")
            ),
            &json!({}),
        )
        .await;
    assert_eq!(st, 403);
    cli(&[
        "role",
        "assignment",
        "create",
        "--role",
        "Reader",
        "--assignee",
        &s(&app["appId"]),
        "--scope",
        &s(&cluster["id"]),
    ]);
    assert_eq!(
        sp_arm
            .post(&format!("{cpath}/readPodIdentityProfile?{API}"), &json!({}))
            .await
            .0,
        200
    );
    assert_eq!(
        sp_arm
            .post(&format!("{cpath}/reportPodIdentityStatus?{API}"), &ok)
            .await
            .0,
        403
    );

    // a second pod identity: the first keeps its reported state, the new one is Updating
    let after = cli(&[
        "aks",
        "pod-identity",
        "add",
        "-g",
        "myResourceGroup",
        "--cluster-name",
        "myAKSCluster",
        "--namespace",
        "my-app",
        "-n",
        "my-pod-identity-2",
        "--identity-resource-id",
        &id2_res,
        "--binding-selector",
        "foo",
    ]);
    let ids = &after["properties"]["podIdentityProfile"]["userAssignedIdentities"];
    assert_eq!(ids[0]["provisioningState"], "Assigned");
    assert_eq!(
        (&ids[1]["provisioningState"], &ids[1]["bindingSelector"]),
        (&json!("Updating"), &json!("foo"))
    );
    // the agent sees the new identity at its next sync
    assert_eq!(
        eventually(&imds, "https://vault.azure.net", &id2_cid, 200).await,
        200
    );

    // exceptions
    let after = cli(&[
        "aks",
        "pod-identity",
        "exception",
        "add",
        "-g",
        "myResourceGroup",
        "--cluster-name",
        "myAKSCluster",
        "--namespace",
        "kube-system",
        "-n",
        "mic-exception",
        "--pod-labels",
        "app=mic",
        "component=mic",
    ]);
    assert_eq!(
        after["properties"]["podIdentityProfile"]["userAssignedIdentityExceptions"][0]["podLabels"],
        json!({"app": "mic", "component": "mic"})
    );
    let after = cli(&[
        "aks",
        "pod-identity",
        "exception",
        "update",
        "-g",
        "myResourceGroup",
        "--cluster-name",
        "myAKSCluster",
        "--namespace",
        "kube-system",
        "-n",
        "mic-exception",
        "--pod-labels",
        "app=mic2",
    ]);
    assert_eq!(
        after["properties"]["podIdentityProfile"]["userAssignedIdentityExceptions"][0]["podLabels"],
        json!({"app": "mic2"})
    );
    let err = fails(
        &env,
        &[
            "aks",
            "pod-identity",
            "exception",
            "update",
            "-g",
            "myResourceGroup",
            "--cluster-name",
            "myAKSCluster",
            "--namespace",
            "default",
            "-n",
            "nope",
            "--pod-labels",
            "a=b",
        ],
    );
    assert!(
        err.contains("pod identity exception default/nope not found"),
        "{err}"
    );
    let listed = cli(&[
        "aks",
        "pod-identity",
        "exception",
        "list",
        "-g",
        "myResourceGroup",
        "--cluster-name",
        "myAKSCluster",
    ]);
    assert_eq!(
        listed["properties"]["podIdentityProfile"]["userAssignedIdentityExceptions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let after = cli(&[
        "aks",
        "pod-identity",
        "exception",
        "delete",
        "-g",
        "myResourceGroup",
        "--cluster-name",
        "myAKSCluster",
        "--namespace",
        "kube-system",
        "-n",
        "mic-exception",
    ]);
    assert_eq!(
        after["properties"]["podIdentityProfile"]["userAssignedIdentityExceptions"],
        json!([])
    );

    // pod-identity delete detaches the identity: the node gets no new token for it
    cli(&[
        "aks",
        "pod-identity",
        "delete",
        "-g",
        "myResourceGroup",
        "--cluster-name",
        "myAKSCluster",
        "--namespace",
        "my-app",
        "-n",
        "my-pod-identity",
    ]);
    let listed = cli(&[
        "aks",
        "pod-identity",
        "list",
        "-g",
        "myResourceGroup",
        "--cluster-name",
        "myAKSCluster",
    ]);
    assert_eq!(
        listed["properties"]["podIdentityProfile"]["userAssignedIdentities"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (st, v) = node_token(&imds, "https://after-delete.example/", &id1_cid).await;
    assert_ne!(st, 200, "{v}");
    assert_eq!(
        node_token(
            &imds,
            "https://after-delete.example/",
            &s(&kubelet["clientId"])
        )
        .await
        .0,
        200
    );
    let view = host_view(&server, &state).await;
    assert_eq!(
        view["cluster"]["podIdentity"]["clientIds"],
        json!([id2_cid])
    );

    // turning the add-on off drops every pod identity from the pools
    let after = cli(&[
        "aks",
        "update",
        "-g",
        "myResourceGroup",
        "-n",
        "myAKSCluster",
        "--disable-pod-identity",
    ]);
    assert_eq!(
        after["properties"]["podIdentityProfile"],
        json!({"enabled": false, "allowNetworkPluginKubenet": false, "userAssignedIdentities": [], "userAssignedIdentityExceptions": []})
    );
    assert_ne!(
        node_token(&imds, "https://after-disable.example/", &id2_cid)
            .await
            .0,
        200
    );
    let after = cli(&[
        "aks",
        "update",
        "-g",
        "myResourceGroup",
        "-n",
        "myAKSCluster",
        "--enable-pod-identity",
    ]);
    assert_eq!(after["properties"]["podIdentityProfile"]["enabled"], true);

    // pools by name: a new pool is a new scale set, a removed pool's scale set goes
    let mut body = cli(&["aks", "show", "-g", "myResourceGroup", "-n", "myAKSCluster"]);
    body["properties"]["agentPoolProfiles"] =
        json!([{"name": "user1", "count": 1, "mode": "System"}]);
    let (st, v) = arm.put(&format!("{cpath}?{API}"), &body).await;
    assert_eq!(st, 200, "{v}");
    let sets = cli(&["vmss", "list", "-g", &node_group]);
    assert_eq!(sets.as_array().unwrap().len(), 1);
    assert!(s(&sets[0]["name"]).starts_with("aks-user1-"));
    assert_ne!(
        node_token(
            &imds,
            "https://after-pool-delete.example/",
            &s(&kubelet["clientId"])
        )
        .await
        .0,
        200
    );

    // deleting the cluster removes its node resource group and everything in it
    let (st, _) = arm
        .call(reqwest::Method::DELETE, &format!("{cpath}?{API}"), None)
        .await;
    assert_eq!(st, 204);
    let (st, v) = arm.get(&format!("{cpath}?{API}")).await;
    assert_eq!(
        (st, s(&v["error"]["code"])),
        (404, "ResourceNotFound".to_string())
    );
    let err = fails(&env, &["group", "show", "-n", &node_group]);
    assert!(err.contains("ResourceGroupNotFound"), "{err}");
    let (st, _) = arm
        .get(&format!(
            "{}?api-version=2023-01-31",
            s(&kubelet["resourceId"])
        ))
        .await;
    assert_eq!(st, 404);
    let left = cli(&["role", "assignment", "list", "--all"]);
    assert!(
        !left.to_string().contains(&cluster_principal),
        "the cluster's grants go with it"
    );
    assert!(
        !left.to_string().contains(&node_group),
        "assignments on the node group go with it"
    );
    // the pod identities themselves stay
    cli(&[
        "identity",
        "show",
        "-g",
        "myIdentityResourceGroup",
        "-n",
        "application-identity_1",
    ]);
    // deleting again is a no-op
    assert_eq!(
        arm.call(reqwest::Method::DELETE, &format!("{cpath}?{API}"), None)
            .await
            .0,
        204
    );
    drop(node);
}

/// A body for PUT: the cluster as GET shows it, with another pod identity profile.
fn with_profile(cluster: &Value, profile: Value) -> Value {
    let mut b = cluster.clone();
    b["properties"]["podIdentityProfile"] = profile;
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_leave_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]);
    let env = cli_env(&server, dir.path());
    let cli = |args: &[&str]| server.cli(args);
    let (c, admin_token) = server.admin().await;
    let arm = Arm {
        c,
        url: server.url.clone(),
        token: admin_token,
    };
    cli(&["group", "create", "-n", "rg"]);
    cli(&["group", "create", "-n", "ids"]);
    let id = cli(&["identity", "create", "-g", "ids", "-n", "app"]);
    let (id_res, id_cid) = (s(&id["id"]), s(&id["properties"]["clientId"]));
    let cluster = cli(&[
        "aks",
        "create",
        "-g",
        "rg",
        "-n",
        "c1",
        "--enable-pod-identity",
        "--node-count",
        "1",
    ]);
    assert_eq!(
        cluster["properties"]["networkProfile"]["networkPlugin"], "azure",
        "azure when not named"
    );
    let sub = s(&cluster["id"]).split('/').nth(2).unwrap().to_string();
    let cpath = format!("{}?{API}", cluster_path(&sub, "rg", "c1"));
    let principal = s(&cluster["identity"]["principalId"]);
    let node_group = s(&cluster["properties"]["nodeResourceGroup"]);

    // the cluster identity lacks Managed Identity Operator on the identity
    let entry = |name: &str, ns: &str| json!({"name": name, "namespace": ns, "identity": {"resourceId": id_res}});
    let profile = |ids: Vec<Value>, exs: Vec<Value>| json!({"enabled": true, "userAssignedIdentities": ids, "userAssignedIdentityExceptions": exs});
    let (st, v) = arm
        .put(
            &cpath,
            &with_profile(&cluster, profile(vec![entry("a", "ns")], vec![])),
        )
        .await;
    assert_eq!(
        (st, s(&v["error"]["code"])),
        (403, "LinkedAuthorizationFailed".to_string()),
        "{v}"
    );
    assert!(s(&v["error"]["message"]).contains(&principal), "{v}");
    cli(&[
        "role",
        "assignment",
        "create",
        "--role",
        "Managed Identity Operator",
        "--assignee-object-id",
        &principal,
        "--scope",
        &id_res,
    ]);

    let baseline = arm.get(&cpath).await.1;
    let sets_before = cli(&["vmss", "list", "-g", &node_group]);
    let many = |n: usize| {
        (0..n)
            .map(|i| entry(&format!("p{i}"), "ns"))
            .collect::<Vec<_>>()
    };
    let many_ex = |n: usize| {
        (0..n)
            .map(|i| json!({"name": format!("e{i}"), "namespace": "ns", "podLabels": {"a": "b"}}))
            .collect::<Vec<_>>()
    };
    let mut bad_selector = entry("ok", "ns");
    bad_selector["bindingSelector"] = json!("not a label");
    let mut wrong_client = entry("ok", "ns");
    wrong_client["identity"]["clientId"] = json!("00000000-0000-0000-0000-000000000000");
    let unknown = json!({"name": "ok", "namespace": "ns", "identity": {"resourceId": id_res.replace("/app", "/nope")}});
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "201st pod identity",
            profile(many(201), vec![]),
            400,
            "InvalidParameter",
        ),
        (
            "201st exception",
            profile(vec![], many_ex(201)),
            400,
            "InvalidParameter",
        ),
        (
            "bad name",
            profile(vec![entry("Bad_Name", "ns")], vec![]),
            400,
            "InvalidParameter",
        ),
        (
            "bad namespace",
            profile(vec![entry("ok", "My.NS")], vec![]),
            400,
            "InvalidParameter",
        ),
        (
            "bad selector",
            profile(vec![bad_selector], vec![]),
            400,
            "InvalidParameter",
        ),
        (
            "duplicate",
            profile(vec![entry("a", "ns"), entry("a", "ns")], vec![]),
            400,
            "InvalidParameter",
        ),
        (
            "unknown identity",
            profile(vec![unknown], vec![]),
            400,
            "InvalidParameter",
        ),
        (
            "someone else's client id",
            profile(vec![wrong_client], vec![]),
            400,
            "InvalidParameter",
        ),
        (
            "disabled with identities",
            json!({"enabled": false, "userAssignedIdentities": [entry("a", "ns")]}),
            400,
            "InvalidParameter",
        ),
    ];
    for (what, p, status, code) in cases {
        let (st, v) = arm.put(&cpath, &with_profile(&cluster, p)).await;
        assert_eq!(
            (st, s(&v["error"]["code"])),
            (status, code.to_string()),
            "{what}: {v}"
        );
        assert_eq!(arm.get(&cpath).await.1, baseline, "{what}: nothing written");
    }
    assert_eq!(cli(&["vmss", "list", "-g", &node_group]), sets_before);
    // exactly 200 of each is fine
    let (st, v) = arm
        .put(
            &cpath,
            &with_profile(&cluster, profile(many(200), many_ex(200))),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["properties"]["podIdentityProfile"]["userAssignedIdentities"]
            .as_array()
            .unwrap()
            .len(),
        200
    );
    let (st, _) = arm
        .put(&cpath, &with_profile(&cluster, profile(vec![], vec![])))
        .await;
    assert_eq!(st, 200);

    // fixed at creation
    let mut b = arm.get(&cpath).await.1;
    b["properties"]["networkProfile"]["networkPlugin"] = json!("kubenet");
    let (st, v) = arm.put(&cpath, &b).await;
    assert_eq!(
        (st, s(&v["error"]["code"])),
        (400, "PropertyChangeNotAllowed".to_string()),
        "{v}"
    );
    let mut b = arm.get(&cpath).await.1;
    b["properties"]["nodeResourceGroup"] = json!("elsewhere");
    assert_eq!(arm.put(&cpath, &b).await.0, 400);

    // the node resource group goes with its cluster only
    let err = fails(&env, &["group", "delete", "-n", &node_group]);
    assert!(err.contains("OperationNotAllowed"), "{err}");

    // the caller must be allowed to assign the identity too (Contributor on the cluster's
    // group only)
    let app = cli(&["app", "create", "--display-name", "contrib"]);
    cli(&[
        "role",
        "assignment",
        "create",
        "--role",
        "Contributor",
        "--assignee",
        &s(&app["appId"]),
        "-g",
        "rg",
    ]);
    let (st, t) = sp_token(
        &https(&server.ca),
        &server.url,
        &s(&app["tenant"]),
        &s(&app["appId"]),
        &s(&app["password"]),
        "https://management.azure.com/.default",
    )
    .await;
    assert_eq!(st, 200);
    let contrib = arm.with_token(&s(&t["access_token"]));
    let (st, v) = contrib
        .put(
            &cpath,
            &with_profile(&cluster, profile(vec![entry("a", "ns")], vec![])),
        )
        .await;
    assert_eq!(
        (st, s(&v["error"]["code"])),
        (403, "LinkedAuthorizationFailed".to_string()),
        "{v}"
    );
    assert!(
        s(&v["error"]["message"]).contains(&s(&app["objectId"])),
        "{v}"
    );
    assert_eq!(
        arm.get(&cpath).await.1["properties"]["podIdentityProfile"]["userAssignedIdentities"],
        json!([])
    );
    // a write that adds no identity is the caller's to make
    let (st, v) = contrib
        .put(&cpath, &with_profile(&cluster, profile(vec![], vec![])))
        .await;
    assert_eq!(st, 200, "{v}");
    let _ = id_cid;

    // kubenet: pod identity only with allowNetworkPluginKubenet; a refused create leaves no
    // cluster and no node group
    let err = fails(
        &env,
        &[
            "aks",
            "create",
            "-g",
            "rg",
            "-n",
            "k1",
            "--network-plugin",
            "kubenet",
            "--enable-pod-identity",
        ],
    );
    assert!(
        err.contains("BadRequest") && err.contains("kubenet"),
        "{err}"
    );
    let k1 = format!("{}?{API}", cluster_path(&sub, "rg", "k1"));
    assert_eq!(arm.get(&k1).await.0, 404);
    assert!(
        fails(&env, &["group", "show", "-n", "MC_rg_k1_local"]).contains("ResourceGroupNotFound")
    );
    let k = cli(&[
        "aks",
        "create",
        "-g",
        "rg",
        "-n",
        "k1",
        "--network-plugin",
        "kubenet",
    ]);
    assert_eq!(
        k["properties"]["networkProfile"]["networkPlugin"],
        "kubenet"
    );
    let err = fails(
        &env,
        &[
            "aks",
            "update",
            "-g",
            "rg",
            "-n",
            "k1",
            "--enable-pod-identity",
        ],
    );
    assert!(err.contains("kubenet"), "{err}");
    assert!(arm.get(&k1).await.1["properties"]
        .get("podIdentityProfile")
        .is_none());
    let k = cli(&[
        "aks",
        "update",
        "-g",
        "rg",
        "-n",
        "k1",
        "--enable-pod-identity",
        "--enable-pod-identity-with-kubenet",
    ]);
    assert_eq!(
        k["properties"]["podIdentityProfile"]["allowNetworkPluginKubenet"],
        true
    );
    // az's kubenet create: no --network-plugin, --enable-pod-identity-with-kubenet
    let k2 = cli(&[
        "aks",
        "create",
        "-g",
        "rg",
        "-n",
        "k2",
        "--enable-pod-identity",
        "--enable-pod-identity-with-kubenet",
    ]);
    assert_eq!(
        k2["properties"]["networkProfile"]["networkPlugin"],
        "kubenet"
    );

    // a cluster created with a pod identity cannot have the role yet
    let mut body = json!({"location": "local", "identity": {"type": "SystemAssigned"}, "properties": {
        "agentPoolProfiles": [{"name": "np1", "count": 1}],
        "podIdentityProfile": profile(vec![entry("a", "ns")], vec![])}});
    let c2 = format!("{}?{API}", cluster_path(&sub, "rg", "c2"));
    let (st, v) = arm.put(&c2, &body).await;
    assert_eq!(
        (st, s(&v["error"]["code"])),
        (403, "LinkedAuthorizationFailed".to_string()),
        "{v}"
    );
    assert_eq!(arm.get(&c2).await.0, 404);
    assert!(
        fails(&env, &["group", "show", "-n", "MC_rg_c2_local"]).contains("ResourceGroupNotFound")
    );
    // other bad creates
    body["properties"]["podIdentityProfile"] = json!({"enabled": true});
    for (what, mutate) in [
        ("no pools", json!({"agentPoolProfiles": []})),
        (
            "bad pool name",
            json!({"agentPoolProfiles": [{"name": "Pool_1"}]}),
        ),
        (
            "windows pool",
            json!({"agentPoolProfiles": [{"name": "np1", "osType": "Windows"}]}),
        ),
        (
            "unknown plugin",
            json!({"networkProfile": {"networkPlugin": "calico"}}),
        ),
        (
            "own kubelet identity",
            json!({"identityProfile": {"kubeletidentity": {"resourceId": id_res}}}),
        ),
        ("node group exists", json!({"nodeResourceGroup": "ids"})),
    ] {
        let mut b = body.clone();
        for (k, v) in mutate.as_object().unwrap() {
            b["properties"][k] = v.clone();
        }
        let (st, v) = arm.put(&c2, &b).await;
        assert_eq!(st, 400, "{what}: {v}");
        assert_eq!(arm.get(&c2).await.0, 404, "{what}");
    }
    let (st, v) = arm
        .put(
            &format!("{}?{API}", cluster_path(&sub, "rg", "bad.name")),
            &body,
        )
        .await;
    assert_eq!(st, 400, "{v}");
    // a user-assigned cluster identity that holds the role may create with pod identities
    let cid = cli(&["identity", "create", "-g", "ids", "-n", "cluster-id"]);
    cli(&[
        "role",
        "assignment",
        "create",
        "--role",
        "Managed Identity Operator",
        "--assignee",
        &s(&cid["properties"]["clientId"]),
        "--scope",
        &id_res,
    ]);
    body["identity"] =
        json!({"type": "UserAssigned", "userAssignedIdentities": {s(&cid["id"]): {}}});
    body["properties"]["podIdentityProfile"] = profile(vec![entry("a", "ns")], vec![]);
    let (st, v) = arm.put(&c2, &body).await;
    assert_eq!(st, 201, "{v}");
    assert!(
        v["identity"]["userAssignedIdentities"]
            .get(s(&cid["id"]))
            .is_some(),
        "{v}"
    );
    // tags by PATCH
    let (st, v) = arm
        .call(
            reqwest::Method::PATCH,
            &c2,
            Some(&json!({"tags": {"env": "test"}})),
        )
        .await;
    assert_eq!((st, &v["tags"]), (200, &json!({"env": "test"})), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_group_deletes_its_clusters_and_their_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]);
    let env = cli_env(&server, dir.path());
    let cli = |args: &[&str]| server.cli(args);
    cli(&["group", "create", "-n", "team"]);
    let cluster = cli(&[
        "aks",
        "create",
        "-g",
        "team",
        "-n",
        "c1",
        "--node-count",
        "1",
        "--node-resource-group",
        "team-nodes",
    ]);
    assert_eq!(cluster["properties"]["nodeResourceGroup"], "team-nodes");
    let kubelet_cid = s(&cluster["properties"]["identityProfile"]["kubeletidentity"]["clientId"]);
    let join = cli(&[
        "aks",
        "nodepool",
        "join-token",
        "-g",
        "team",
        "--cluster-name",
        "c1",
        "-n",
        "nodepool1",
        "--ttl",
        "60",
    ]);
    let state = dir.path().join("n1");
    let node = spawn_until(
        &server.node_args(
            &state.to_string_lossy(),
            Some(join["joinToken"].as_str().unwrap()),
        ),
        "IMDS endpoint:",
        dir.path(),
    )
    .unwrap();
    let imds = node.find("IMDS endpoint:").unwrap();
    assert_eq!(
        node_token(&imds, "https://vault.azure.net", &kubelet_cid)
            .await
            .0,
        200
    );
    // a node of a plain scale set has no cluster in its view
    cli(&[
        "vmss",
        "create",
        "-g",
        "team",
        "-n",
        "plain",
        "--assign-identity",
    ]);
    let plain = cli(&["vmss", "join-token", "-g", "team", "-n", "plain"]);
    let state2 = dir.path().join("n2");
    let node2 = spawn_until(
        &server.node_args(
            &state2.to_string_lossy(),
            Some(plain["joinToken"].as_str().unwrap()),
        ),
        "IMDS endpoint:",
        dir.path(),
    )
    .unwrap();
    assert!(host_view(&server, &state2).await.get("cluster").is_none());
    assert!(host_view(&server, &state).await.get("cluster").is_some());

    cli(&["group", "delete", "-n", "team"]);
    assert!(fails(&env, &["group", "show", "-n", "team-nodes"]).contains("ResourceGroupNotFound"));
    assert_eq!(cli(&["aks", "list"]), json!([]));
    assert_ne!(
        node_token(&imds, "https://after-group-delete.example/", &kubelet_cid)
            .await
            .0,
        200
    );
    drop((node, node2));
}
