//! NMI end to end against a real kube-apiserver (`../shared/k8s`): the test plays kubelet and
//! CNI. Two nodes are network namespaces with a veth to the root namespace, each running
//! `keyless node --nmi` joined to one scale set (three user-assigned identities: a
//! kubelet-like one and two pod identities). Pods are network namespaces with a veth into
//! their node and the pod IP on it; their Pod objects carry `spec.nodeName` and get
//! `status.podIP` through the status subresource; each pod has a cgroup named after its UID as
//! the kubelet names it (`common/fabric.rs`). Requests are `curl` in the pod's cgroup and
//! network namespace to `http://169.254.169.254`, which the node's iptables rules send to NMI.
//! The agents start with `nsenter --net` (not `ip netns exec`, which hides `/sys/fs/cgroup`) so
//! caller attestation can read the pods' cgroups.
//!
//! Needs root, `ip`, `iptables`, `curl`, `nsenter`, `unshare`, a writable cgroup hierarchy, etcd
//! and the control plane script
//! (`KEYLESS_K8S_DIR`, default `<workspace>/../shared/k8s`; `keyless_k8s::testing`). Without
//! them the test is skipped with a message, unless `CI` is set, where a missing piece is a
//! failure.

mod common;
#[path = "common/fabric.rs"]
mod fabric;

use common::*;
use fabric::{create, obj, prerequisites_met, sh, sh_out, Namespaces};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use keyless_k8s::crd::{AzureIdentity, AzureIdentityBinding, AzurePodIdentityException};
use keyless_k8s::testing::ControlPlane;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// A pod of `node` (see [`Namespaces::pod`]): a /30 veth into the node (node side `gw`, pod
/// side `ip`), default route via the node; with the Pod's `uid`, its cgroup (where [`curl`]
/// runs in this namespace).
fn pod(net: &mut Namespaces, node: &str, name: &str, gw: &str, ip: &str, uid: Option<&str>) {
    let node_if = net.pod(node, name, uid);
    sh(&[
        "ip",
        "-n",
        node,
        "addr",
        "add",
        &format!("{gw}/30"),
        "dev",
        &node_if,
    ]);
    sh(&["ip", "-n", node, "link", "set", &node_if, "up"]);
    fabric::pod_address(name, &format!("{ip}/30"), gw);
}

/// `curl` inside network namespace `ns` (and, for a pod's, in the pod's cgroup) with
/// `headers`: (status, body).
fn curl(net: &Namespaces, ns: &str, url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let headers: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let args: Vec<&str> = headers.iter().flat_map(|h| ["-H", h.as_str()]).collect();
    fabric::curl(&net.prefix(ns), &args, url)
}

const MD: (&str, &str) = ("Metadata", "true");

fn token_url(query: &str) -> String {
    format!("http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&{query}")
}

fn parsed(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

struct PodSpec {
    ns: &'static str,
    name: &'static str,
    labels: Value,
    node: &'static str,
    netns: String,
    gw: String,
    ip: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_serves_pods_of_its_node_by_source_ip() {
    if !prerequisites_met("nmi_serves_pods_of_its_node_by_source_ip") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // nodes (network namespaces) reach the API server through their veth
    let Some(cp) = ControlPlane::start(&dir.path().join("k8s"), "--bind-address=0.0.0.0") else {
        return;
    };
    let api_port = cp.env["K8S_API_PORT"].clone();
    let k8s_ca = cp.env["K8S_CA_FILE"].clone();

    // ---- network: two nodes, unique names and addresses per run
    let tag = format!("kn{:04x}", std::process::id() & 0xffff);
    let k = 20 + std::process::id() % 200;
    let (root_a, node_a_ip) = (format!("10.213.{k}.1"), format!("10.213.{k}.2"));
    let (root_b, node_b_ip) = (format!("10.213.{k}.5"), format!("10.213.{k}.6"));
    let (ns_a, ns_b) = (format!("{tag}a"), format!("{tag}b"));
    let mut net = Namespaces::default();
    net.node(&ns_a, &root_a, &node_a_ip);
    net.node(&ns_b, &root_b, &node_b_ip);

    // ---- Keyless: a scale set holding a kubelet-like identity and two pod identities
    let server = ServerProc::start_on(
        dir.path(),
        "0.0.0.0:0",
        &["--tls-san", &root_a, "--tls-san", &root_b],
    );
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let cli = |args: &[&str]| server.cli(args);
    cli(&["group", "create", "-n", "aks-nodes"]);
    let kubelet = cli(&["identity", "create", "-g", "aks-nodes", "-n", "kubelet-id"]);
    let id_a = cli(&["identity", "create", "-g", "aks-nodes", "-n", "pod-a"]);
    let id_b = cli(&["identity", "create", "-g", "aks-nodes", "-n", "pod-b"]);
    cli(&[
        "vmss",
        "create",
        "-g",
        "aks-nodes",
        "-n",
        "nodes",
        "--assign-identity",
        "kubelet-id",
        "pod-a",
        "pod-b",
    ]);
    let p = |v: &Value, k: &str| v["properties"][k].as_str().unwrap().to_string();
    let (a_cid, a_oid) = (p(&id_a, "clientId"), p(&id_a, "principalId"));
    let (b_cid, b_oid) = (p(&id_b, "clientId"), p(&id_b, "principalId"));
    let kubelet_oid = p(&kubelet, "principalId");
    let kubelet_cid = p(&kubelet, "clientId");
    let b_res = id_b["id"].as_str().unwrap().to_string();

    // ---- Kubernetes objects (as admin)
    let admin = keyless_k8s::client(Some(Path::new(&cp.env["KUBECONFIG"])))
        .await
        .expect("admin client");
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for c in keyless_k8s::crd::crds() {
        crds.create(&PostParams::default(), &c).await.expect("CRD");
    }
    // established: the kinds list
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Api::<AzureIdentity>::all(admin.clone())
            .list(&Default::default())
            .await
            .is_ok()
            && Api::<AzureIdentityBinding>::all(admin.clone())
                .list(&Default::default())
                .await
                .is_ok()
            && Api::<AzurePodIdentityException>::all(admin.clone())
                .list(&Default::default())
                .await
                .is_ok();
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "CRDs not established");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    for ns in ["apps", "other"] {
        create(&namespaces, json!({"metadata": {"name": ns}})).await;
    }
    for ns in ["apps", "other", "kube-system"] {
        let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
        create(&sas, json!({"metadata": {"name": "default"}})).await;
    }
    // NMI's own service account, with only what it reads
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "kube-system");
    create(&sas, json!({"metadata": {"name": "keyless-nmi"}})).await;
    create(
        &Api::<ClusterRole>::all(admin.clone()),
        json!({"metadata": {"name": "keyless-nmi"}, "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["aadpodidentity.k8s.io"], "resources": ["azureidentities", "azureidentitybindings", "azurepodidentityexceptions"], "verbs": ["get", "list", "watch"]}
        ]}),
    )
    .await;
    create(
        &Api::<ClusterRoleBinding>::all(admin.clone()),
        json!({"metadata": {"name": "keyless-nmi"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "keyless-nmi"},
               "subjects": [{"kind": "ServiceAccount", "name": "keyless-nmi", "namespace": "kube-system"}]}),
    )
    .await;
    let tr = sas
        .create_token_request(
            "keyless-nmi",
            &PostParams::default(),
            &obj::<TokenRequest>(json!({"spec": {"audiences": [], "expirationSeconds": 3600}})),
        )
        .await
        .expect("token request");
    let nmi_token = tr.status.expect("token").token;
    let kubeconfig = dir.path().join("node-kubeconfig");
    std::fs::write(
        &kubeconfig,
        serde_json::to_vec(&json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "k", "cluster": {"server": format!("https://kubernetes:{api_port}"), "certificate-authority": k8s_ca}}],
            "users": [{"name": "nmi", "user": {"token": nmi_token}}],
            "contexts": [{"name": "k", "context": {"cluster": "k", "user": "nmi"}}],
            "current-context": "k"
        }))
        .unwrap(),
    )
    .unwrap();

    let ids: Api<AzureIdentity> = Api::namespaced(admin.clone(), "apps");
    let binds: Api<AzureIdentityBinding> = Api::namespaced(admin.clone(), "apps");
    for (name, id) in [("pod-a", &id_a), ("pod-b", &id_b)] {
        create(
            &ids,
            json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
                   "metadata": {"name": name},
                   "spec": {"type": 0, "resourceID": id["id"], "clientID": id["properties"]["clientId"]}}),
        )
        .await;
    }
    // two bindings with one selector; one more for the deletion case
    for (name, identity, selector) in [
        ("pod-b-binding", "pod-b", "foo"),
        ("pod-a-binding", "pod-a", "foo"),
        ("del-binding", "pod-a", "del"),
    ] {
        create(
            &binds,
            json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
                   "metadata": {"name": name},
                   "spec": {"azureIdentity": identity, "selector": selector}}),
        )
        .await;
    }
    create(
        &Api::<AzurePodIdentityException>::namespaced(admin.clone(), "kube-system"),
        json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzurePodIdentityException",
               "metadata": {"name": "aks-addon-exception"},
               "spec": {"podLabels": {"kubernetes.azure.com/managedby": "aks"}}}),
    )
    .await;

    // ---- the nodes' agents, each its own NMI
    let ca = server.ca.clone();
    let kc = kubeconfig.to_string_lossy().to_string();
    let start_node = |ns: &str, node: &str, root_ip: &str, node_ip: &str| {
        let token = cli(&["vmss", "join-token", "-g", "aks-nodes", "-n", "nodes"])["joinToken"]
            .as_str()
            .unwrap()
            .to_string();
        let state = dir.path().join(node).to_string_lossy().to_string();
        let url = format!("https://{root_ip}:{port}");
        let agent = fabric::NmiAgent {
            server_url: &url,
            ca_file: &ca,
            state_dir: &state,
            join_token: &token,
            node_name: node,
            kubeconfig: &kc,
        };
        let extra = [
            "--sync-interval",
            "1",
            "--private-ip",
            node_ip,
            "--ipt-update-interval-sec",
            "1",
        ];
        let cmd = agent.command(ns, bin(), &extra);
        let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
        spawn_program_until(&cmd[0], &args, "NMI endpoint:", dir.path())
    };
    let t0 = Instant::now();
    let mut agent_a = start_node(&ns_a, "node-a", &root_a, &node_a_ip).expect("node-a agent");
    println!(
        "node-a agent ready (joined, watches listed, iptables in place) in {:?}",
        t0.elapsed()
    );
    let agent_b = start_node(&ns_b, "node-b", &root_b, &node_b_ip).expect("node-b agent");
    assert_eq!(
        agent_a.find("NMI endpoint:").unwrap(),
        format!("http://{node_a_ip}:2579"),
        "NMI listens on the node IP, port 2579, by default"
    );
    let chain = sh_out(&[
        "ip",
        "netns",
        "exec",
        &ns_a,
        "iptables",
        "-t",
        "nat",
        "-S",
        "aad-metadata",
    ]);
    assert!(
        chain.contains(&format!(
            "-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination {node_a_ip}:2579"
        )) && chain.contains("-A aad-metadata -j RETURN"),
        "{chain}"
    );
    let pre = sh_out(&[
        "ip",
        "netns",
        "exec",
        &ns_a,
        "iptables",
        "-t",
        "nat",
        "-S",
        "PREROUTING",
    ]);
    assert!(pre.contains("-A PREROUTING -j aad-metadata"), "{pre}");

    // ---- pods: the object with spec.nodeName, the namespace with the IP, the status patch
    let pod_net = |i: u32| {
        (
            format!("10.214.{k}.{}", 4 * i + 1),
            format!("10.214.{k}.{}", 4 * i + 2),
        )
    };
    let spec = |i: u32, ns: &'static str, name: &'static str, labels: Value| {
        let (gw, ip) = pod_net(i);
        PodSpec {
            ns,
            name,
            labels,
            node: "node-a",
            netns: format!("{tag}p{i}"),
            gw,
            ip,
        }
    };
    let pods = [
        spec(0, "apps", "bound", json!({"aadpodidbinding": "foo"})),
        spec(1, "apps", "nolabel", json!({"app": "x"})),
        spec(2, "other", "otherns", json!({"aadpodidbinding": "foo"})),
        spec(
            3,
            "kube-system",
            "addon",
            json!({"kubernetes.azure.com/managedby": "aks", "aadpodidbinding": "foo"}),
        ),
        spec(4, "apps", "deleted", json!({"aadpodidbinding": "del"})),
    ];
    for s in &pods {
        let api: Api<Pod> = Api::namespaced(admin.clone(), s.ns);
        let created: Pod = create(
            &api,
            json!({"metadata": {"name": s.name, "labels": s.labels},
                   "spec": {"nodeName": s.node, "containers": [{"name": "app", "image": "app"}]}}),
        )
        .await;
        let uid = created.metadata.uid.expect("the API server's uid");
        pod(&mut net, &ns_a, &s.netns, &s.gw, &s.ip, Some(&uid));
    }
    // the kubelet's status patch; the pod asks at once
    let mut first_token_ms = vec![];
    for s in &pods {
        let api: Api<Pod> = Api::namespaced(admin.clone(), s.ns);
        api.patch_status(
            s.name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Running", "podIP": s.ip, "podIPs": [{"ip": s.ip}]}}),
            ),
        )
        .await
        .expect("status patch");
        if s.name == "bound" {
            let t = Instant::now();
            let (st, body) = curl(
                &net,
                &s.netns,
                &token_url("resource=https://vault.azure.net"),
                &[MD],
            );
            first_token_ms.push(t.elapsed().as_millis());
            assert_eq!(
                st, 200,
                "a pod asking right after its status patch is served: {body}"
            );
        }
    }
    println!(
        "pod IP patched -> token in the pod: {} ms",
        first_token_ms[0]
    );

    let bound = &pods[0].netns;
    let oid_of = |body: &str| {
        let v = parsed(body);
        claims(v["access_token"].as_str().unwrap_or_default())["oid"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    // bound pod: no selector -> the first identity by AzureIdentity name (pod-a)
    let (st, body) = curl(
        &net,
        bound,
        &token_url("resource=https://vault.azure.net"),
        &[MD],
    );
    assert_eq!(st, 200, "{body}");
    let v = parsed(&body);
    let c = claims(v["access_token"].as_str().unwrap());
    assert_eq!(c["oid"], a_oid.as_str());
    assert_eq!(c["appid"], a_cid.as_str());
    for f in [
        "access_token",
        "expires_in",
        "expires_on",
        "not_before",
        "resource",
        "token_type",
    ] {
        assert!(v[f].is_string(), "{f}: {v}");
    }
    // each of the two bound identities by client id, object id, resource id
    for (selector, want) in [
        (format!("client_id={b_cid}"), &b_oid),
        (format!("client_id={a_cid}"), &a_oid),
        (format!("object_id={b_oid}"), &b_oid),
        (format!("msi_res_id={b_res}"), &b_oid),
    ] {
        let (st, body) = curl(
            &net,
            bound,
            &token_url(&format!("resource=https://vault.azure.net&{selector}")),
            &[MD],
        );
        assert_eq!(
            (st, oid_of(&body)),
            (200, want.clone()),
            "{selector}: {body}"
        );
    }
    // the node's kubelet identity is not the pod's
    let (st, body) = curl(
        &net,
        bound,
        &token_url(&format!(
            "resource=https://vault.azure.net&client_id={kubelet_cid}"
        )),
        &[MD],
    );
    assert_eq!(st, 404, "{body}");
    assert!(
        body.starts_with("no azure identity found for request clientID "),
        "{body}"
    );
    // NMI's request checks
    let (st, body) = curl(
        &net,
        bound,
        &token_url("resource=https://vault.azure.net"),
        &[],
    );
    assert_eq!(st, 400);
    assert_eq!(
        parsed(&body)["error_description"],
        "Required metadata header not specified"
    );
    let (st, body) = curl(&net, bound, &token_url("x=y"), &[MD]);
    assert_eq!(
        (st, body.trim()),
        (400, "parameter resource cannot be empty")
    );
    let (st, body) = curl(
        &net,
        bound,
        "http://169.254.169.254/metadata/identity/x/oauth2/token?resource=r",
        &[MD],
    );
    assert_eq!((st, body.trim()), (400, "Invalid request"));
    // /metadata/instance as the node's IMDS serves it
    let (st, body) = curl(
        &net,
        bound,
        "http://169.254.169.254/metadata/instance?api-version=2021-02-01",
        &[MD],
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(parsed(&body)["compute"]["vmScaleSetName"], "nodes");
    // /host/token from a pod: not a host
    let (st, body) = curl(
        &net,
        bound,
        "http://169.254.169.254/host/token/?resource=https://vault.azure.net",
        &[("podname", "bound"), ("podns", "apps")],
    );
    assert_eq!(
        (st, body.trim()),
        (500, "request remote address is not from a host")
    );

    // refusals: no label; the label in another namespace
    let (st, body) = curl(
        &net,
        &pods[1].netns,
        &token_url("resource=https://vault.azure.net"),
        &[MD],
    );
    assert_eq!(st, 404, "{body}");
    let (st, body) = curl(
        &net,
        &pods[2].netns,
        &token_url("resource=https://vault.azure.net"),
        &[MD],
    );
    assert_eq!(st, 404, "the label in another namespace: {body}");

    // the same IP asked from a node the pod is not on
    let imposter = format!("{tag}x");
    pod(&mut net, &ns_b, &imposter, &pods[0].gw, &pods[0].ip, None);
    let (st, body) = curl(
        &net,
        &imposter,
        &token_url("resource=https://vault.azure.net"),
        &[MD],
    );
    assert_eq!(st, 500, "{body}");
    assert!(
        body.starts_with(&format!("failed to match pod IP {}", pods[0].ip)),
        "{body}"
    );

    // ---- every answer above is in the node's audit trail: the pod (namespace, name, IP)
    // and the reason, as the node saw it
    let audit_a = dir.path().join("node-a/audit.log");
    let audit_b = dir.path().join("node-b/audit.log");
    let pod_is = |r: &Value, s: &PodSpec| {
        r["surface"] == "nmi"
            && r["caller"]["podNamespace"] == s.ns
            && r["caller"]["podName"] == s.name
            && r["caller"]["podIp"] == s.ip.as_str()
    };
    let refused = |r: &Value, status: u16, reason: &str| {
        r["outcome"] == "refused" && r["status"] == status && r["reason"] == reason
    };
    for (cid, oid) in [(&a_cid, &a_oid), (&b_cid, &b_oid)] {
        wait_audit(&audit_a, "a bound pod's issuance", |r| {
            pod_is(r, &pods[0])
                && r["outcome"] == "issued"
                && r["identity"]["clientId"] == cid.as_str()
                && r["identity"]["objectId"] == oid.as_str()
                && r["audience"] == "https://vault.azure.net"
        });
    }
    wait_audit(&audit_a, "the kubelet identity refused to a pod", |r| {
        pod_is(r, &pods[0])
            && refused(r, 404, "identity_not_found")
            && r["identity"]["clientId"] == kubelet_cid.as_str()
    });
    for (what, status, reason) in [
        ("no Metadata header", 400, "invalid_request"),
        ("no resource", 400, "invalid_request"),
    ] {
        // refused before the pod is looked up: the source IP names it
        wait_audit(&audit_a, what, |r| {
            r["surface"] == "nmi"
                && r["caller"]["podIp"] == pods[0].ip.as_str()
                && refused(r, status, reason)
        });
    }
    wait_audit(&audit_a, "/host/token from a pod", |r| {
        r["caller"]["podName"] == "bound"
            && r["caller"]["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with(&format!("{}:", pods[0].ip)))
            && refused(r, 500, "not_from_host")
    });
    for s in [&pods[1], &pods[2]] {
        wait_audit(&audit_a, s.name, |r| {
            pod_is(r, s) && refused(r, 404, "identity_not_found")
        });
    }
    wait_audit(&audit_b, "the imposter IP on node-b", |r| {
        r["surface"] == "nmi"
            && r["caller"]["podIp"] == pods[0].ip.as_str()
            && r["caller"].get("podName").is_none()
            && refused(r, 500, "pod_not_found")
    });

    // ---- the redirect is not the boundary: pods whose traffic reaches the node's IMDS
    // directly (no DNAT: untracked here, as for a connection older than the rule, or the
    // chain absent) are answered as NMI answers them, never as the host
    let node_imds_as_host = curl(
        &net,
        &ns_a,
        &token_url(&format!(
            "resource=https://vault.azure.net&client_id={kubelet_cid}"
        )),
        &[MD],
    );
    assert_eq!(
        node_imds_as_host.0, 200,
        "the node itself is the host: {}",
        node_imds_as_host.1
    );
    for s in [&pods[0], &pods[1]] {
        for (chain, dir) in [("PREROUTING", "-s"), ("OUTPUT", "-d")] {
            sh(&[
                "ip", "netns", "exec", &ns_a, "iptables", "-t", "raw", "-I", chain, dir, &s.ip,
                "-j", "NOTRACK",
            ]);
        }
    }
    let (st, body) = curl(
        &net,
        &pods[1].netns,
        &token_url(&format!(
            "resource=https://vault.azure.net&client_id={kubelet_cid}"
        )),
        &[MD],
    );
    assert_eq!(
        st, 404,
        "a pod bypassing the redirect is not the host: {body}"
    );
    let (st, body) = curl(
        &net,
        &pods[0].netns,
        &token_url(&format!(
            "resource=https://vault.azure.net&client_id={kubelet_cid}"
        )),
        &[MD],
    );
    assert_eq!(st, 404, "{body}");
    let (st, body) = curl(
        &net,
        bound,
        &token_url("resource=https://vault.azure.net"),
        &[MD],
    );
    assert_eq!(
        (st, oid_of(&body)),
        (200, a_oid.clone()),
        "answered as that pod: {body}"
    );
    let (st, _) = curl(
        &net,
        bound,
        "http://169.254.169.254/metadata/instance?api-version=2021-02-01",
        &[],
    );
    assert_eq!(st, 400, "NMI's Metadata check");
    for s in [&pods[0], &pods[1]] {
        for (chain, dir) in [("PREROUTING", "-s"), ("OUTPUT", "-d")] {
            sh(&[
                "ip", "netns", "exec", &ns_a, "iptables", "-t", "raw", "-D", chain, dir, &s.ip,
                "-j", "NOTRACK",
            ]);
        }
    }

    // ---- one out-of-range integer: the schema refuses it (it would stop typed lists)
    let untyped: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        "apps",
        &ApiResource::erase::<AzureIdentity>(&()),
    );
    for spec in [
        json!({"type": 0, "clientID": "x", "replicas": 5000000000u64}),
        json!({"type": 4294967296u64, "clientID": "x"}),
        json!({"type": 3, "clientID": "x"}),
    ] {
        let o: DynamicObject = obj(
            json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
                                          "metadata": {"name": "too-big"}, "spec": spec}),
        );
        let r = untyped.create(&PostParams::default(), &o).await;
        assert!(
            matches!(&r, Err(kube::Error::Api(s)) if s.code == 422),
            "{spec}: {r:?}"
        );
    }

    // the excepted pod gets what the node's IMDS answers, minus every pod identity
    let addon = &pods[3].netns;
    let (st, body) = curl(
        &net,
        addon,
        &token_url("resource=https://vault.azure.net"),
        &[MD],
    );
    assert_eq!((st, oid_of(&body)), (200, kubelet_oid.clone()), "{body}");
    for sel in [format!("client_id={a_cid}"), format!("object_id={b_oid}")] {
        let (st, body) = curl(
            &net,
            addon,
            &token_url(&format!("resource=https://vault.azure.net&{sel}")),
            &[MD],
        );
        assert_eq!(st, 400, "an excepted pod never gets a pod identity: {body}");
        assert_eq!(parsed(&body)["error_description"], "Identity not found");
    }

    // /host/token from the node's loopback
    let host_url = "http://127.0.0.1:2579/host/token/?resource=https://vault.azure.net";
    let (st, body) = curl(
        &net,
        &ns_a,
        host_url,
        &[("podname", "bound"), ("podns", "apps")],
    );
    assert_eq!(st, 200, "{body}");
    let v = parsed(&body);
    assert_eq!(v["clientid"], a_cid.as_str());
    assert_eq!(
        claims(v["token"]["access_token"].as_str().unwrap())["oid"],
        a_oid.as_str()
    );
    let (st, _) = curl(&net, &ns_a, host_url, &[("podname", "bound")]);
    assert_eq!(st, 400);
    let (st, _) = curl(
        &net,
        &ns_a,
        host_url,
        &[("podname", "nope"), ("podns", "apps")],
    );
    assert_eq!(st, 404);

    // a binding deleted while the pod holds a cached token: refused on the next request
    let del = &pods[4].netns;
    let url = token_url("resource=https://storage.azure.com/");
    let (st, body) = curl(&net, del, &url, &[MD]);
    assert_eq!((st, oid_of(&body)), (200, a_oid.clone()), "{body}");
    let (st, _) = curl(&net, del, &url, &[MD]);
    assert_eq!(st, 200, "cached");
    binds
        .delete("del-binding", &DeleteParams::default())
        .await
        .expect("delete binding");
    let deleted = Instant::now();
    let mut served_after = 0;
    let (sent_ms, refused_ms) = loop {
        let sent = deleted.elapsed().as_secs_f64() * 1000.0;
        let (st, body) = curl(&net, del, &url, &[MD]);
        if st != 200 {
            assert_eq!(st, 404, "{body}");
            break (sent, deleted.elapsed().as_secs_f64() * 1000.0);
        }
        served_after += 1;
        assert!(
            deleted.elapsed() < Duration::from_secs(10),
            "still served 10 s after the delete"
        );
    };
    println!(
        "binding DELETE returned -> first refusal: {refused_ms:.1} ms ({served_after} request(s) served in between; the refused request was sent {sent_ms:.1} ms after the DELETE returned, each request is a curl process in the pod's namespace)"
    );
    // the other pods are unaffected
    let (st, _) = curl(
        &net,
        bound,
        &token_url("resource=https://storage.azure.com/"),
        &[MD],
    );
    assert_eq!(st, 200);

    // drift is repaired (reconcile every second here)
    sh(&[
        "ip",
        "netns",
        "exec",
        &ns_a,
        "iptables",
        "-t",
        "nat",
        "-F",
        "aad-metadata",
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sh_out(&[
        "ip",
        "netns",
        "exec",
        &ns_a,
        "iptables",
        "-t",
        "nat",
        "-S",
        "aad-metadata",
    ])
    .contains("DNAT")
    {
        assert!(
            Instant::now() < deadline,
            "the flushed chain was not recreated"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (st, _) = curl(
        &net,
        bound,
        &token_url("resource=https://vault.azure.net"),
        &[MD],
    );
    assert_eq!(st, 200);

    // the agent stops: its redirect goes with it (node-b's stays)
    agent_a.stop();
    let all = sh_out(&["ip", "netns", "exec", &ns_a, "iptables", "-t", "nat", "-S"]);
    assert!(!all.contains("aad-metadata"), "{all}");
    let all_b = sh_out(&["ip", "netns", "exec", &ns_b, "iptables", "-t", "nat", "-S"]);
    assert!(all_b.contains("aad-metadata"), "{all_b}");
    drop(agent_b);
    drop(net);
}

/// The kubenet guard, with the cluster resource's host view: a node of a kubenet cluster
/// without `allowNetworkPluginKubenet` refuses to start NMI unless told
/// `--allow-network-plugin-kubenet`. No Kubernetes needed: the guard runs first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_refuses_kubenet_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]);
    let cli = |args: &[&str]| server.cli(args);
    cli(&["group", "create", "-n", "k8s"]);
    cli(&[
        "aks",
        "create",
        "-g",
        "k8s",
        "-n",
        "kube1",
        "--network-plugin",
        "kubenet",
        "--node-count",
        "2",
    ]);
    let token = |c: &dyn Fn(&[&str]) -> Value| {
        c(&[
            "aks",
            "nodepool",
            "join-token",
            "-g",
            "k8s",
            "--cluster-name",
            "kube1",
            "-n",
            "nodepool1",
        ])["joinToken"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let t1 = token(&cli);
    let state = dir.path().join("n1").to_string_lossy().to_string();
    let mut args = server.node_args(&state, Some(&t1));
    args.extend([
        "--nmi",
        "--node-name",
        "n1",
        "--nmi-listen",
        "10.255.255.1:2579",
        "--kubeconfig",
        "/nonexistent/kubeconfig",
    ]);
    let refused = spawn_until(&args, "NMI endpoint:", dir.path());
    let err = refused.err().expect("NMI must not start on kubenet");
    assert!(
        err.contains("kubenet") && err.contains("--allow-network-plugin-kubenet"),
        "{err}"
    );

    // allowed on the node: past the guard (then stopped by the missing kubeconfig)
    args.push("--allow-network-plugin-kubenet");
    let err = spawn_until(&args, "NMI endpoint:", dir.path())
        .err()
        .expect("no kubeconfig");
    assert!(
        !err.contains("CVE-2021-1677") && err.contains("kubeconfig"),
        "{err}"
    );
}
