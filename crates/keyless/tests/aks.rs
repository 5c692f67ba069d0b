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
            admin_secret(&dir.join("server")).unwrap(),
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
    /// ARM calls as the bootstrap admin.
    async fn admin(server: &ServerProc) -> Arm {
        let (c, token) = server.admin().await;
        Arm {
            c,
            url: server.url.clone(),
            token,
        }
    }

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
/// A client of the host API with the node's credential (mTLS, its host certificate).
fn host_client(server: &ServerProc, state: &Path) -> reqwest::Client {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let ca = keyless_pki::pem_blocks(&read(Path::new(&server.ca)), "CERTIFICATE").remove(0);
    let cert =
        keyless_pki::pem_blocks(&read(&state.join("host-cert.pem")), "CERTIFICATE").remove(0);
    let key = keyless_pki::pem_blocks(&read(&state.join("host-key.pem")), "PRIVATE KEY").remove(0);
    let tls = keyless_pki::client_tls_config(&ca, Some((&cert, &key))).unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .build()
        .unwrap()
}

async fn host_view(server: &ServerProc, state: &Path) -> Value {
    let r = host_client(server, state)
        .get(format!("{}/keyless/host/v1/identities", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

/// What the server issues the node itself (the host API, the server's rule: identities
/// assigned to its scale set), bypassing the agent's narrower per-caller decision.
async fn host_token(
    server: &ServerProc,
    state: &Path,
    resource: &str,
    client_id: &str,
) -> (u16, Value) {
    let r = host_client(server, state)
        .post(format!("{}/keyless/host/v1/token", server.url))
        .json(&json!({"resource": resource, "selector": {"kind": "client_id", "value": client_id}}))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

/// A token from the node's IMDS, for the identity with `client_id`.
async fn node_token(imds: &str, resource: &str, client_id: &str) -> (u16, Value) {
    imds_token(imds, &format!("resource={resource}&client_id={client_id}")).await
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
    let arm = Arm::admin(&server).await;

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
    // the server issues the node the pod identity (it is on the pool's scale set) ...
    let (st, t) = host_token(&server, &state, "https://vault.azure.net", &id1_cid).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        claims(t["access_token"].as_str().unwrap())["oid"],
        id1_oid.as_str()
    );
    // ... but on a pod-identity cluster the node's own processes never get a pod identity
    // through its IMDS: only NMI hands them out, to the pods bound to them
    let (st, t) = node_token(&imds, "https://vault.azure.net", &id1_cid).await;
    assert_eq!(st, 400, "{t}");
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
            "podIdentity": {
                "enabled": true,
                "allowNetworkPluginKubenet": false,
                "clientIds": [id1_cid],
                "identities": [{"namespace": "my-app", "name": "my-pod-identity", "clientId": id1_cid}],
                "exceptions": [],
            },
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
    let pod_arm = arm.with_token(&s(&host_token(
        &server,
        &state,
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
    // the pool's scale set holds the new identity at once (the server issues the node its
    // token), while the node's own IMDS still never hands it out
    assert_eq!(
        host_token(&server, &state, "https://vault.azure.net", &id2_cid)
            .await
            .0,
        200
    );
    assert_eq!(
        node_token(&imds, "https://vault.azure.net", &id2_cid)
            .await
            .0,
        400
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
    let view = host_view(&server, &state).await;
    assert_eq!(
        view["cluster"]["podIdentity"]["exceptions"],
        json!([{"namespace": "kube-system", "name": "mic-exception"}])
    );
    assert_eq!(
        view["cluster"]["podIdentity"]["identities"],
        json!([
            {"namespace": "my-app", "name": "my-pod-identity", "clientId": id1_cid},
            {"namespace": "my-app", "name": "my-pod-identity-2", "clientId": id2_cid},
        ])
    );
    // the add-on's own exception is reserved
    let err = fails(
        &env,
        &[
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
            "aks-addon-exception",
            "--pod-labels",
            "app=x",
        ],
    );
    assert!(err.contains("reserved"), "{err}");
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
    let (st, v) = host_token(&server, &state, "https://after-delete.example/", &id1_cid).await;
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
    assert_eq!(
        view["cluster"]["podIdentity"]["identities"],
        json!([{"namespace": "my-app", "name": "my-pod-identity-2", "clientId": id2_cid}])
    );
    assert_eq!(view["cluster"]["podIdentity"]["exceptions"], json!([]));

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
        host_token(&server, &state, "https://after-disable.example/", &id2_cid)
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
    let arm = Arm::admin(&server).await;
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
            "the add-on's own exception",
            profile(
                vec![],
                vec![
                    json!({"name": "aks-addon-exception", "namespace": "kube-system", "podLabels": {"a": "b"}}),
                ],
            ),
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
        // a mismatch names neither of the identity's actual ids
        assert!(!v.to_string().contains(&id_cid), "{what}: {v}");
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
    // nor does it learn whether an identity it may not assign exists, or its ids
    let mut wrong_client = entry("a", "ns");
    wrong_client["identity"]["clientId"] = json!("00000000-0000-0000-0000-000000000000");
    let unknown = json!({"name": "a", "namespace": "ns", "identity": {"resourceId": id_res.replace("/app", "/nope")}});
    for (what, e) in [
        ("wrong client id", wrong_client),
        ("unknown identity", unknown),
    ] {
        let (st, v) = contrib
            .put(&cpath, &with_profile(&cluster, profile(vec![e], vec![])))
            .await;
        assert_eq!(
            (st, s(&v["error"]["code"])),
            (403, "LinkedAuthorizationFailed".to_string()),
            "{what}: {v}"
        );
        assert!(!v.to_string().contains(&id_cid), "{what}: {v}");
    }
    // a write that adds no identity is the caller's to make
    let (st, v) = contrib
        .put(&cpath, &with_profile(&cluster, profile(vec![], vec![])))
        .await;
    assert_eq!(st, 200, "{v}");

    // an identity deleted and re-created under the same id is a new identity: the entry that
    // named the old one does not carry its authorization over, for the caller nor the cluster
    let (st, v) = arm
        .put(
            &cpath,
            &with_profile(&cluster, profile(vec![entry("a", "ns")], vec![])),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    cli(&["identity", "delete", "-g", "ids", "-n", "app"]);
    let again = cli(&["identity", "create", "-g", "ids", "-n", "app"]);
    let new_cid = s(&again["properties"]["clientId"]);
    assert_eq!(s(&again["id"]), id_res);
    assert_ne!(new_cid, id_cid);
    let stored = arm.get(&cpath).await.1;
    assert_eq!(
        stored["properties"]["podIdentityProfile"]["userAssignedIdentities"][0]["identity"]
            ["clientId"],
        id_cid.as_str()
    );
    let (st, v) = contrib
        .put(
            &cpath,
            &with_profile(&cluster, profile(vec![entry("a", "ns")], vec![])),
        )
        .await;
    assert_eq!(
        (st, s(&v["error"]["code"])),
        (403, "LinkedAuthorizationFailed".to_string()),
        "the caller: {v}"
    );
    assert!(
        s(&v["error"]["message"]).contains(&s(&app["objectId"])),
        "{v}"
    );
    // the admin may assign it, the cluster identity lost its role with the old identity
    let (st, v) = arm
        .put(
            &cpath,
            &with_profile(&cluster, profile(vec![entry("a", "ns")], vec![])),
        )
        .await;
    assert_eq!(
        (st, s(&v["error"]["code"])),
        (403, "LinkedAuthorizationFailed".to_string()),
        "the cluster identity: {v}"
    );
    assert!(s(&v["error"]["message"]).contains(&principal), "{v}");
    assert_eq!(arm.get(&cpath).await.1, stored, "nothing written");
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
    let (st, v) = arm
        .put(
            &cpath,
            &with_profile(&cluster, profile(vec![entry("a", "ns")], vec![])),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let e = &v["properties"]["podIdentityProfile"]["userAssignedIdentities"][0]["identity"];
    assert_eq!(e["clientId"], new_cid.as_str());
    assert_eq!(e["objectId"], again["properties"]["principalId"]);
    let (st, v) = contrib
        .put(&cpath, &with_profile(&cluster, profile(vec![], vec![])))
        .await;
    assert_eq!(st, 200, "{v}");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_a_cluster_are_never_stored_or_shown() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]);
    let cli = |args: &[&str]| server.cli(args);
    let arm = Arm::admin(&server).await;
    cli(&["group", "create", "-n", "rg"]);
    let secrets = [
        "sp-secret-6f1d2c",
        "windows-password-83aa0e",
        "server-app-secret-1b7c44",
        "addon-client-secret-9e0f31",
        "pool-password-52d8ab",
    ];
    let body = json!({"location": "local", "identity": {"type": "SystemAssigned"}, "properties": {
        "agentPoolProfiles": [{"name": "np1", "count": 1, "linuxProfile": {"password": secrets[4]}}],
        "servicePrincipalProfile": {"clientId": "msi", "secret": secrets[0]},
        "windowsProfile": {"adminUsername": "azureuser", "adminPassword": secrets[1]},
        "aadProfile": {"serverAppID": "server-app", "serverAppSecret": secrets[2], "clientAppID": "client-app"},
        "addonProfiles": {"ingress": {"enabled": true, "config": {"clientSecret": secrets[3]}}},
    }});
    let sub = {
        let g = cli(&["group", "show", "-n", "rg"]);
        s(&g["id"]).split('/').nth(2).unwrap().to_string()
    };
    let path = cluster_path(&sub, "rg", "c1");
    let (st, created) = arm.put(&format!("{path}?{API}"), &body).await;
    assert_eq!(st, 201, "{created}");
    let (st, got) = arm.get(&format!("{path}?{API}")).await;
    assert_eq!(st, 200);
    let (st, in_group) = arm
        .get(&format!(
            "/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.ContainerService/managedClusters?{API}"
        ))
        .await;
    assert_eq!(st, 200);
    let (st, in_sub) = arm
        .get(&format!(
            "/subscriptions/{sub}/providers/Microsoft.ContainerService/managedClusters?{API}"
        ))
        .await;
    assert_eq!(st, 200);
    let shown = cli(&["aks", "show", "-g", "rg", "-n", "c1"]);
    for (what, v) in [
        ("PUT", &created),
        ("GET", &got),
        ("list in group", &in_group),
        ("list in subscription", &in_sub),
        ("aks show", &shown),
    ] {
        let text = v.to_string();
        for sec in secrets {
            assert!(!text.contains(sec), "{what} shows {sec}: {text}");
        }
    }
    // what is not a secret stays
    let p = &got["properties"];
    assert_eq!(p["servicePrincipalProfile"], json!({"clientId": "msi"}));
    assert_eq!(p["windowsProfile"], json!({"adminUsername": "azureuser"}));
    assert_eq!(p["aadProfile"]["serverAppID"], "server-app");
    assert_eq!(p["addonProfiles"]["ingress"]["enabled"], true);
    assert_eq!(in_group["value"][0]["id"], got["id"]);
    // a read-modify-write keeps it so
    let (st, v) = arm.put(&format!("{path}?{API}"), &got).await;
    assert_eq!(st, 200, "{v}");
    // and the database never held them (the file, its WAL and journal)
    let blob = stored_bytes(&dir.path().join("server")).await;
    assert!(
        blob.windows(b"servicePrincipalProfile".len())
            .any(|w| w == b"servicePrincipalProfile"),
        "the cluster is in the files read"
    );
    for sec in secrets {
        assert!(
            !blob.windows(sec.len()).any(|w| w == sec.as_bytes()),
            "the database holds {sec}"
        );
    }
}

/// AKS's node resource group lockdown: a principal with "Virtual Machine Contributor" on the
/// node resource group (the seed grants exactly that to a pod identity) may not join a rogue
/// node through the pool scale set's generic join token, change the scale set's identities, or
/// create anything there; neither may an Owner. Reads and role assignments stay allowed, the
/// cluster's own paths (`aks nodepool join-token`, pod identities) keep working. Also the host
/// view's pod identity entries and exceptions, and the add-on's report limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_resource_group_is_locked_down() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]);
    let cli = |args: &[&str]| server.cli(args);
    let arm = Arm::admin(&server).await;
    cli(&["group", "create", "-n", "rg"]);
    cli(&["group", "create", "-n", "ids"]);
    let id1 = cli(&["identity", "create", "-g", "ids", "-n", "app"]);
    let (id1_res, id1_cid) = (s(&id1["id"]), s(&id1["properties"]["clientId"]));
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
    let sub = s(&cluster["id"]).split('/').nth(2).unwrap().to_string();
    let cpath = cluster_path(&sub, "rg", "c1");
    let node_group = s(&cluster["properties"]["nodeResourceGroup"]);
    let kubelet = cluster["properties"]["identityProfile"]["kubeletidentity"].clone();
    let node_rg_id = format!("/subscriptions/{sub}/resourceGroups/{node_group}");
    cli(&[
        "aks",
        "pod-identity",
        "add",
        "-g",
        "rg",
        "--cluster-name",
        "c1",
        "--namespace",
        "my-app",
        "-n",
        "my-pod-identity",
        "--identity-resource-id",
        &id1_res,
    ]);
    cli(&[
        "aks",
        "pod-identity",
        "exception",
        "add",
        "-g",
        "rg",
        "--cluster-name",
        "c1",
        "--namespace",
        "kube-system",
        "-n",
        "mic-exception",
        "--pod-labels",
        "app=mic",
    ]);
    let sets = cli(&["vmss", "list", "-g", &node_group]);
    let ss_id = s(&sets[0]["id"]);

    // the seed's grant at the node group is allowed (a role assignment), to a principal of
    // its own here: the node IMDS's answers to pod identities are NMI's business
    let app = cli(&["app", "create", "--display-name", "vm-contributor"]);
    cli(&[
        "role",
        "assignment",
        "create",
        "--role",
        "Virtual Machine Contributor",
        "--assignee",
        &s(&app["appId"]),
        "--scope",
        &node_rg_id,
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
    assert_eq!(st, 200, "{t}");
    let vmc = arm.with_token(&s(&t["access_token"]));

    // the node resource group is the cluster's: the pod identity holds Virtual Machine
    // Contributor there (the seed's grant) yet may not mint a join token for the pool's scale
    // set (a rogue node would hold every pod identity and the kubelet identity), nor change
    // the scale set's identities, nor create anything there; neither may the admin (Owner)
    const COMPUTE: &str = "api-version=2024-11-01";
    const MSI: &str = "api-version=2023-01-31";
    let lockdown = |what: &str, (st, v): (u16, Value)| {
        assert_eq!(
            (st, s(&v["error"]["code"])),
            (409, "OperationNotAllowed".to_string()),
            "{what}: {v}"
        );
        let m = s(&v["error"]["message"]);
        assert!(
            m.contains("managed by the cluster") && m.contains("aks nodepool join-token"),
            "{what}: {m}"
        );
    };
    let vmss_patch = json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {id1_res.clone(): {}}}});
    let new_vm = json!({"location": "local", "identity": {"type": "SystemAssigned"}});
    for who in [&vmc, &arm] {
        lockdown(
            "scale-set join token",
            who.post(&format!("{ss_id}/generateJoinToken?{COMPUTE}"), &json!({}))
                .await,
        );
        lockdown(
            "scale-set identity assign",
            who.call(
                reqwest::Method::PATCH,
                &format!("{ss_id}?{COMPUTE}"),
                Some(&vmss_patch),
            )
            .await,
        );
        lockdown(
            "scale-set replace",
            who.put(&format!("{ss_id}?{COMPUTE}"), &vmss_patch).await,
        );
        lockdown(
            "scale-set delete",
            who.call(reqwest::Method::DELETE, &format!("{ss_id}?{COMPUTE}"), None)
                .await,
        );
        lockdown(
            "new VM",
            who.put(
                &format!(
                    "{node_rg_id}/providers/Microsoft.Compute/virtualMachines/rogue?{COMPUTE}"
                ),
                &new_vm,
            )
            .await,
        );
        lockdown(
            "new scale set",
            who.put(
                &format!("{node_rg_id}/providers/Microsoft.Compute/virtualMachineScaleSets/aks-rogue-1-vmss?{COMPUTE}"),
                &new_vm,
            )
            .await,
        );
    }
    lockdown(
        "new identity",
        arm.put(
            &format!("{node_rg_id}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/rogue?{MSI}"),
            &json!({"location": "local"}),
        )
        .await,
    );
    lockdown(
        "kubelet identity delete",
        arm.call(
            reqwest::Method::DELETE,
            &format!("{}?{MSI}", s(&kubelet["resourceId"])),
            None,
        )
        .await,
    );
    lockdown(
        "federated credential on the kubelet identity",
        arm.put(
            &format!(
                "{}/federatedIdentityCredentials/rogue?{MSI}",
                s(&kubelet["resourceId"])
            ),
            &json!({"properties": {"issuer": "https://issuer.example", "subject": "x", "audiences": ["api://AzureADTokenExchange"]}}),
        )
        .await,
    );
    // reads stay allowed (the seed's demo lists the VMs), the scale set is unchanged
    let (st, v) = vmc
        .get(&format!(
            "{node_rg_id}/providers/Microsoft.Compute/virtualMachineScaleSets?{COMPUTE}"
        ))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["value"][0]["identity"], sets[0]["identity"]);
    assert_eq!(arm.get(&format!("{ss_id}?{COMPUTE}")).await.0, 200);
    let (st, v) = arm
        .get(&format!(
            "{node_rg_id}/providers/Microsoft.Compute/virtualMachines/rogue?{COMPUTE}"
        ))
        .await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(
        cli(&["vmss", "list", "-g", &node_group])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // a stranger is told it may not write, not that the group is a cluster's
    let other = cli(&["app", "create", "--display-name", "stranger"]);
    let (_, t) = sp_token(
        &https(&server.ca),
        &server.url,
        &s(&other["tenant"]),
        &s(&other["appId"]),
        &s(&other["password"]),
        "https://management.azure.com/.default",
    )
    .await;
    let (st, v) = arm
        .with_token(&s(&t["access_token"]))
        .post(&format!("{ss_id}/generateJoinToken?{COMPUTE}"), &json!({}))
        .await;
    assert_eq!(
        (st, s(&v["error"]["code"])),
        (403, "AuthorizationFailed".to_string()),
        "{v}"
    );

    // the cluster's own path: a node joins with the pool's token
    let join = cli(&[
        "aks",
        "nodepool",
        "join-token",
        "-g",
        "rg",
        "--cluster-name",
        "c1",
        "-n",
        "nodepool1",
    ]);
    assert_eq!(s(&join["vmResourceId"]), ss_id);
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

    // the host view lists the profile's pod identities and exceptions
    let view = host_view(&server, &state).await;
    assert_eq!(
        view["cluster"]["podIdentity"],
        json!({
            "enabled": true,
            "allowNetworkPluginKubenet": false,
            "clientIds": [id1_cid],
            "identities": [{"namespace": "my-app", "name": "my-pod-identity", "clientId": id1_cid}],
            "exceptions": [{"namespace": "kube-system", "name": "mic-exception"}],
        })
    );
    assert_eq!(view["cluster"]["kubeletIdentity"], kubelet);

    // the add-on's report (the admin holds write on the cluster)
    let ok = json!({"userAssignedIdentities": [{"name": "my-pod-identity", "namespace": "my-app", "provisioningState": "Assigned"}]});
    assert_eq!(
        arm.post(&format!("{cpath}/reportPodIdentityStatus?{API}"), &ok)
            .await
            .0,
        204
    );
    // a report's error code, message and entries are capped: longer is refused, nothing kept
    let failed = |code: String, message: String| {
        json!({"userAssignedIdentities": [{"name": "my-pod-identity", "namespace": "my-app",
            "provisioningState": "Failed", "error": {"code": code, "message": message}}]})
    };
    let too_many = json!({"userAssignedIdentities": (0..201)
        .map(|i| json!({"name": format!("p{i}"), "namespace": "my-app", "provisioningState": "Assigned"}))
        .collect::<Vec<_>>()});
    for (what, report) in [
        ("129-char code", failed("c".repeat(129), "m".into())),
        ("1025-char message", failed("c".into(), "m".repeat(1025))),
        ("201 entries", too_many),
    ] {
        let (st, v) = arm
            .post(&format!("{cpath}/reportPodIdentityStatus?{API}"), &report)
            .await;
        assert_eq!(
            (st, s(&v["error"]["code"])),
            (400, "InvalidParameter".to_string()),
            "{what}: {v}"
        );
    }
    let shown = cli(&["aks", "show", "-g", "rg", "-n", "c1"]);
    assert_eq!(
        shown["properties"]["podIdentityProfile"]["userAssignedIdentities"][0]["provisioningState"],
        "Assigned"
    );
    assert_eq!(
        arm.post(
            &format!("{cpath}/reportPodIdentityStatus?{API}"),
            &failed("c".repeat(128), "m".repeat(1024))
        )
        .await
        .0,
        204
    );
    assert_eq!(
        arm.post(&format!("{cpath}/reportPodIdentityStatus?{API}"), &ok)
            .await
            .0,
        204
    );

    // turning the add-on off empties both lists
    cli(&[
        "aks",
        "update",
        "-g",
        "rg",
        "-n",
        "c1",
        "--disable-pod-identity",
    ]);
    let view = host_view(&server, &state).await;
    assert_eq!(view["cluster"]["podIdentity"]["identities"], json!([]));
    assert_eq!(view["cluster"]["podIdentity"]["exceptions"], json!([]));
    drop(node);
}
