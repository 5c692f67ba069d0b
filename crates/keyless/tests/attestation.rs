//! Caller attestation end to end: a pod that takes another pod's IP gets nothing from NMI.
//!
//! The node is kubenet-like: a network namespace with a Linux bridge (`cbr0`) holding the pods'
//! veths, so pods are L2 neighbours on one /24, the bridge's address their gateway; the node's
//! own veth leads to the root namespace, where the Keyless server and a real kube-apiserver
//! (`../shared/k8s`) listen. `keyless node --nmi` runs in the node namespace (started with
//! `nsenter --net`, so it sees `/sys/fs/cgroup`). Pod A is bound to a pod identity; pod B has
//! none. Each pod has a cgroup named after its Pod's UID as the kubelet names it, and every
//! process of the pod runs in it (`common/fabric.rs`).
//!
//! The attack (CVE-2021-1677): B's process adds A's IP to its interface and asks
//! `169.254.169.254` with A's IP as its source. For the answers to reach B, the node's
//! neighbour entry for A's IP must point at B's MAC: an attacker with `NET_RAW` gets that by
//! spoofing ARP replies; the test writes the poisoned entry directly (`ip neigh replace … nud
//! permanent` on the bridge), which is what the poisoning achieves. A stays up, as a victim
//! does (its own traffic is what the poisoning steals); once the entry is restored, A is
//! served again.
//!
//! - `--caller-attestation false`: B gets A's token (the attack is real), and so does a
//!   process outside A's cgroup that joined A's network namespace.
//! - attestation on (the default): both get 403 `caller_not_attested`, recorded in the audit
//!   trail with pod A as the caller the address claimed; A itself still gets its token.
//!
//! Needs root, `ip` (with bridge support), `iptables`, `curl`, `nsenter`, `unshare`, a
//! writable cgroup hierarchy, etcd and the control plane script (`KEYLESS_K8S_DIR`). Without
//! them the test is skipped with a message, unless `CI` is set.

mod common;
#[path = "common/fabric.rs"]
mod fabric;

use common::*;
use fabric::{create, curl, prerequisites_met, sh, sh_out, Namespaces};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use keyless_k8s::crd::{AzureIdentity, AzureIdentityBinding};
use keyless_k8s::testing::ControlPlane;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};
use std::path::Path;

/// The kubenet-like node: [`Namespaces::node`] and bridge `cbr0` with `gw/24`.
fn kubenet_node(net: &mut Namespaces, name: &str, root_ip: &str, node_ip: &str, gw: &str) {
    net.node(name, root_ip, node_ip);
    sh(&["ip", "-n", name, "link", "add", "cbr0", "type", "bridge"]);
    let gw = format!("{gw}/24");
    sh(&["ip", "-n", name, "addr", "add", &gw, "dev", "cbr0"]);
    sh(&["ip", "-n", name, "link", "set", "cbr0", "up"]);
}

/// A pod on `node`'s bridge: its namespace, a veth whose node side is a port of `cbr0`,
/// `ip/24` on its `eth0`, default route via the bridge; its cgroup (Pod `uid`). Returns its
/// MAC.
fn bridged_pod(
    net: &mut Namespaces,
    node: &str,
    name: &str,
    ip: &str,
    gw: &str,
    uid: &str,
) -> String {
    let port = net.pod(node, name, Some(uid));
    sh(&["ip", "-n", node, "link", "set", &port, "master", "cbr0"]);
    sh(&["ip", "-n", node, "link", "set", &port, "up"]);
    fabric::pod_address(name, &format!("{ip}/24"), gw);
    mac(name)
}

/// The MAC of `eth0` in namespace `ns`.
fn mac(ns: &str) -> String {
    let out = sh_out(&["ip", "-n", ns, "-o", "link", "show", "eth0"]);
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {out}"))
        .to_string()
}

/// curl's arguments for the `Metadata: true` header.
const MD: [&str; 2] = ["-H", "Metadata: true"];

const URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";

fn oid(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    claims(v["access_token"].as_str().unwrap_or_default())["oid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_takes_another_pods_ip_gets_nothing() {
    let test = "a_pod_that_takes_another_pods_ip_gets_nothing";
    if !prerequisites_met(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(cp) = ControlPlane::start(&dir.path().join("k8s"), "--bind-address=0.0.0.0") else {
        return;
    };

    // ---- the node and its bridge, unique names and addresses per run
    let pid = std::process::id();
    let tag = format!("ka{:04x}", pid & 0xffff);
    let k = 20 + pid % 200;
    let (root_ip, node_ip) = (format!("10.217.{k}.1"), format!("10.217.{k}.2"));
    let gw = format!("10.218.{k}.1");
    let (ip_a, ip_b) = (format!("10.218.{k}.10"), format!("10.218.{k}.11"));
    let node = format!("{tag}n");
    let mut net = Namespaces::default();
    kubenet_node(&mut net, &node, &root_ip, &node_ip, &gw);

    // ---- Keyless: a scale set holding a pod identity (and a kubelet-like one)
    let server = ServerProc::start_on(dir.path(), "0.0.0.0:0", &["--tls-san", &root_ip]);
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let cli = |args: &[&str]| server.cli(args);
    cli(&["group", "create", "-n", "nodes"]);
    cli(&["identity", "create", "-g", "nodes", "-n", "kubelet-id"]);
    let id_a = cli(&["identity", "create", "-g", "nodes", "-n", "pod-a-id"]);
    cli(&[
        "vmss",
        "create",
        "-g",
        "nodes",
        "-n",
        "pool",
        "--assign-identity",
        "kubelet-id",
        "pod-a-id",
    ]);
    let a_oid = id_a["properties"]["principalId"]
        .as_str()
        .unwrap()
        .to_string();

    // ---- Kubernetes: the CRDs, pod A's identity and binding, the two pods
    let kube = cp.client().await;
    keyless_k8s::addon::install_crds(&kube).await.expect("CRDs");
    create(
        &Api::<Namespace>::all(kube.clone()),
        json!({"metadata": {"name": "apps"}}),
    )
    .await;
    create(
        &Api::<ServiceAccount>::namespaced(kube.clone(), "apps"),
        json!({"metadata": {"name": "default"}}),
    )
    .await;
    create(
        &Api::<AzureIdentity>::namespaced(kube.clone(), "apps"),
        json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
               "metadata": {"name": "pod-a-id"},
               "spec": {"type": 0, "resourceID": id_a["id"], "clientID": id_a["properties"]["clientId"]}}),
    )
    .await;
    create(
        &Api::<AzureIdentityBinding>::namespaced(kube.clone(), "apps"),
        json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
               "metadata": {"name": "pod-a-binding"},
               "spec": {"azureIdentity": "pod-a-id", "selector": "a"}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "apps");
    let mut uids = vec![];
    let (ns_a, ns_b) = (format!("{tag}a"), format!("{tag}b"));
    let mut macs = vec![];
    for (name, labels, netns, ip) in [
        ("pod-a", json!({"aadpodidbinding": "a"}), &ns_a, &ip_a),
        ("pod-b", json!({"app": "b"}), &ns_b, &ip_b),
    ] {
        let p = create(
            &pods,
            json!({"metadata": {"name": name, "labels": labels},
                   "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]}}),
        )
        .await;
        let uid = p.metadata.uid.expect("uid");
        macs.push(bridged_pod(&mut net, &node, netns, ip, &gw, &uid));
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}),
            ),
        )
        .await
        .unwrap();
        uids.push(uid);
    }
    let (mac_a, mac_b) = (macs[0].clone(), macs[1].clone());
    let a_pod = net.prefix(&ns_a);
    let b_pod = net.prefix(&ns_b);
    // a process outside pod A's cgroup (this test's) in A's network namespace
    let a_netns_only: Vec<String> = ["ip", "netns", "exec", &ns_a]
        .iter()
        .map(|s| s.to_string())
        .collect();

    // the admin kubeconfig, for the node namespace (`kubernetes` names the root side)
    let kubeconfig = dir.path().join("node-kubeconfig");
    fabric::node_kubeconfig(&cp, &kubeconfig);
    let kc = kubeconfig.to_string_lossy().to_string();
    let ca = server.ca.clone();
    let server_url = format!("https://{root_ip}:{port}");
    let start_node = |state: &Path, extra: &[&str]| {
        let token = cli(&["vmss", "join-token", "-g", "nodes", "-n", "pool"])["joinToken"]
            .as_str()
            .unwrap()
            .to_string();
        let state = state.to_string_lossy().to_string();
        let agent = fabric::NmiAgent {
            server_url: &server_url,
            ca_file: &ca,
            state_dir: &state,
            join_token: &token,
            node_name: "node-1",
            kubeconfig: &kc,
        };
        let mut all = vec!["--private-ip", node_ip.as_str()];
        all.extend(extra);
        let cmd = agent.command(&node, bin(), &all);
        let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
        spawn_program_until(&cmd[0], &args, "NMI endpoint:", dir.path()).expect("keyless node")
    };

    // the attack's two halves: B takes A's IP (and the node's neighbour entry for it); undone
    // afterwards, B's address first (else both pods would answer ARP for it)
    let neigh = |mac: &str, nud: &str| {
        sh(&[
            "ip", "-n", &node, "neigh", "replace", &ip_a, "lladdr", mac, "dev", "cbr0", "nud", nud,
        ])
    };
    let poison = || {
        // as a process of pod B (its cgroup, its namespace)
        let add_ip = format!("{ip_a}/32");
        let mut args: Vec<&str> = b_pod.iter().map(String::as_str).collect();
        args.extend(["ip", "addr", "add", &add_ip, "dev", "eth0"]);
        sh(&args);
        neigh(&mac_b, "permanent");
    };
    let restore = || {
        sh(&[
            "ip",
            "-n",
            &ns_b,
            "addr",
            "del",
            &format!("{ip_a}/32"),
            "dev",
            "eth0",
        ]);
        neigh(&mac_a, "reachable");
    };
    let spoofed = || curl(&b_pod, &[MD[0], MD[1], "--interface", &ip_a], URL);

    // ---- attestation off: the attack works
    let state_off = dir.path().join("node-off");
    let mut agent = start_node(&state_off, &["--caller-attestation", "false"]);
    let (st, body) = curl(&a_pod, &MD, URL);
    assert_eq!((st, oid(&body)), (200, a_oid.clone()), "pod A: {body}");
    let (st, body) = curl(&b_pod, &MD, URL);
    assert_eq!(st, 404, "pod B has no identity of its own: {body}");
    poison();
    let (st, body) = spoofed();
    assert_eq!(
        (st, oid(&body)),
        (200, a_oid.clone()),
        "without attestation B, with A's IP, gets A's token: {body}"
    );
    restore();
    let (st, body) = curl(&a_netns_only, &MD, URL);
    assert_eq!(
        (st, oid(&body)),
        (200, a_oid.clone()),
        "without attestation a process in A's namespace but not in A's cgroup is A: {body}"
    );
    agent.stop();

    // ---- attestation on (the default): refused, and recorded
    let state_on = dir.path().join("node-on");
    let agent = start_node(&state_on, &[]);
    let (st, body) = curl(&a_pod, &MD, URL);
    assert_eq!((st, oid(&body)), (200, a_oid.clone()), "pod A: {body}");
    poison();
    let (st, body) = spoofed();
    assert_eq!(st, 403, "B with A's IP: {body}");
    assert!(body.contains("does not come from pod apps/pod-a"), "{body}");
    assert!(!body.contains("access_token"), "{body}");
    restore();
    let (st, body) = curl(&a_netns_only, &MD, URL);
    assert_eq!(st, 403, "in A's namespace, not in A's cgroup: {body}");
    // A itself, once its neighbour entry is its own again
    let (st, body) = curl(&a_pod, &MD, URL);
    assert_eq!(
        (st, oid(&body)),
        (200, a_oid.clone()),
        "pod A after the attack: {body}"
    );

    let audit = state_on.join("audit.log");
    // the two refusals (the spoofed request, the namespace joiner) name pod A, the pod the
    // source address claimed
    let not_attested = |r: &Value| {
        r["surface"] == "nmi"
            && r["outcome"] == "refused"
            && r["status"] == 403
            && r["reason"] == "caller_not_attested"
            && r["caller"]["podNamespace"] == "apps"
            && r["caller"]["podName"] == "pod-a"
            && r["caller"]["podIp"] == ip_a.as_str()
    };
    wait_audit(&audit, "the spoofed request refused", not_attested);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let n = audit_records(&audit)
            .iter()
            .filter(|r| not_attested(r))
            .count();
        if n == 2 {
            break;
        }
        assert!(
            n < 2 && std::time::Instant::now() < deadline,
            "{n} caller_not_attested records, want 2: {:#?}",
            audit_records(&audit)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    wait_audit(&audit, "pod A's issuance", |r| {
        r["surface"] == "nmi"
            && r["outcome"] == "issued"
            && r["caller"]["podName"] == "pod-a"
            && r["identity"]["objectId"] == a_oid.as_str()
    });
    drop(agent);
    drop(net);
}
