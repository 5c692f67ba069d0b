"""Seed 000 end to end on a real Kubernetes API server: a cluster resource with pod identity,
two nodes (network namespaces, each with its own host agent joined to the node pool and running
NMI), the pod-identity add-on keeping the aadpodidentity.k8s.io objects in step, and pods
(network namespaces with their pod IPs) whose unmodified SDKs — python and node
`ManagedIdentityCredential`, the Rust `azure_identity` crate — get tokens from
169.254.169.254 with no environment at all."""
import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from conftest import keyless_bin, run_client, start_up, wait_for
from k8s_fabric import ControlPlane, NodeNs, PodNs, Proc, can_run_fabric, pod_manifest
from test_node_identity import run_node

ARM = "https://management.azure.com"
HERE = pathlib.Path(__file__).resolve().parent


class Fabric:
    def __init__(self, root, uid):
        self.root = pathlib.Path(root)
        self.uid = uid
        self.nodes, self.pods, self.procs = [], [], []
        self.up = None
        self.cp = None

    def admin_env(self):
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "KEYLESS_SERVER": self.up.info["serverUrl"],
            "KEYLESS_TENANT_ID": self.up.info["tenantId"],
            "KEYLESS_CA_FILE": self.up.info["caFile"],
            "KEYLESS_CLIENT_ID": self.up.info["adminClientId"],
            "KEYLESS_CLIENT_SECRET": self.up.admin_secret,
        }

    def cli(self, *args, check=True):
        out = subprocess.run([keyless_bin(), *args], env=self.admin_env(), capture_output=True, text=True, timeout=60)
        if check:
            assert out.returncode == 0, f"keyless {' '.join(args)}: {out.stderr}"
        try:
            return json.loads(out.stdout) if out.stdout.strip() else None
        except json.JSONDecodeError:
            return out.stdout if check else (out.returncode, out.stdout, out.stderr)

    def server_for(self, node):
        port = self.up.info["serverUrl"].rsplit(":", 1)[1]
        return f"https://{node.host_ip}:{port}"

    def start_node(self, node, name, join_token):
        state = self.root / f"state-{name}"
        kubeconfig = self.cp.node_kubeconfig(self.root / f"kubeconfig-{name}")
        cmd = [*node.prefix(), keyless_bin(), "node", "--server", self.server_for(node),
               "--ca-file", self.up.info["caFile"], "--state-dir", str(state),
               "--imds-listen", "169.254.169.254:80", "--sync-interval", "1",
               "--nmi", "--node-name", name, "--kubeconfig", kubeconfig, "--nmi-listen", f"{node.ns_ip}:2579"]
        # the join token in the environment, not on the command line (ps shows argv)
        env = dict(os.environ, KEYLESS_JOIN_TOKEN=join_token)
        p = Proc(cmd, "NMI endpoint:", self.root / f"node-{name}.log", env=env)
        self.procs.append(p)
        return p

    def start_addon(self, node, cluster_id, kubelet_client_id):
        kubeconfig = self.cp.node_kubeconfig(self.root / "kubeconfig-addon")
        cmd = [*node.prefix(), keyless_bin(), "pod-identity-addon", "--cluster-id", cluster_id,
               "--server", self.server_for(node), "--ca-file", self.up.info["caFile"],
               "--client-id", kubelet_client_id, "--kubeconfig", kubeconfig, "--profile-poll", "1"]
        p = Proc(cmd, "pod-identity add-on: in step", self.root / "addon.log")
        self.procs.append(p)
        return p

    def pod(self, node_index, name, namespace, labels=None, ip_override=None, k8s_node=None):
        """Create the pod object on a node, then (as a kubelet and a CNI plugin would) its cgroup,
        named after the uid the API server gave it, and its network namespace, then report its IP."""
        node = self.nodes[node_index]
        self.cp.apply(pod_manifest(name, namespace, k8s_node or f"aks-nodepool1-{node_index}", labels))
        pod_uid = self.cp.get("pod", name, "-n", namespace)["metadata"]["uid"]
        pod = PodNs(node, self.uid, ip_override=ip_override, pod_uid=pod_uid)
        self.pods.append(pod)
        status = {"status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}}
        self.cp.kubectl("patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge",
                        "-p", json.dumps(status))
        pod.k8s_name, pod.k8s_namespace = name, namespace
        return pod

    def verify(self, token):
        v = {"authority": self.up.authority, "ca": self.up.info["caFile"], "audience": ARM}
        return run_client({"verify_token": token, "verify": v})["claims"]

    def close(self):
        for p in reversed(self.procs):
            p.stop()
        for p in self.pods:
            p.destroy()
        for n in self.nodes:
            n.destroy()
        if self.up:
            self.up.stop()
        if self.cp:
            self.cp.stop()


@contextlib.contextmanager
def running_fabric(prefix, control_plane=True, public_on_node=False):
    """A control plane (unless the caller starts it later, e.g. with an issuer known only once a
    cluster exists), two node namespaces and `keyless up` reachable from them (its certificate
    names the nodes' side of their veths), torn down afterwards; skipped (failed under CI) where
    the machine cannot run it."""
    if not can_run_fabric():
        if os.environ.get("CI"):
            pytest.fail("CI must run as root with iproute2, iptables, etcd, kubectl and ../shared/k8s "
                        "(or KEYLESS_K8S_DIR) for the pod-identity tests")
        pytest.skip("needs root, iproute2, iptables, etcd, kubectl and a kube-apiserver (KEYLESS_K8S_DIR)")
    uid = uuid.uuid4().hex[:4]
    root = tempfile.mkdtemp(prefix=prefix)
    f = Fabric(root, uid)
    try:
        if control_plane:
            f.cp = ControlPlane(root)
        f.nodes = [NodeNs(i, uid) for i in (0, 1)]
        extra = ["--sync-interval", "1"]
        for n in f.nodes:
            extra += ["--tls-san", n.host_ip]
        listen = "0.0.0.0:0"
        if public_on_node:
            # the server's public URL (its token issuer) is the address pods reach it at, as in
            # a real cluster: MSAL (node) refuses a discovery document whose issuer is on
            # another origin than the authority it was given
            with socket.socket() as sock:
                sock.bind(("0.0.0.0", 0))
                port = sock.getsockname()[1]
            listen = f"0.0.0.0:{port}"
            extra += ["--public-url", f"https://{f.nodes[0].host_ip}:{port}"]
        f.up = start_up(pathlib.Path(root) / "data", extra=extra, listen=listen)
        f.up.data_dir = pathlib.Path(root) / "data"
        yield f
    finally:
        f.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fab():
    with running_fabric("keyless-podid-") as f:
        yield f


@pytest.fixture(scope="module")
def seed(fab):
    """The seed's commands, as written, with `keyless` in place of `az`."""
    cli = fab.cli
    cli("group", "create", "--name", "myResourceGroup", "--location", "eastus")
    cluster = cli("aks", "create", "-g", "myResourceGroup", "-n", "myAKSCluster", "--enable-pod-identity",
                  "--network-plugin", "azure", "--node-count", "2")
    assert cluster["properties"]["podIdentityProfile"]["enabled"] is True
    cli("group", "create", "--name", "myIdentityResourceGroup", "--location", "eastus")
    ids = [cli("identity", "create", "--resource-group", "myIdentityResourceGroup", "--name", f"application-identity_{i}")
           for i in (1, 2)]
    # the seed's --query / -o tsv forms
    client_ids = [cli("identity", "show", "-g", "myIdentityResourceGroup", "-n", f"application-identity_{i}",
                      "--query", "clientId", "-otsv").strip() for i in (1, 2)]
    assert client_ids == [i["properties"]["clientId"] for i in ids]
    node_group = cli("aks", "show", "-g", "myResourceGroup", "-n", "myAKSCluster", "--query", "nodeResourceGroup",
                     "-o", "tsv").strip()
    assert node_group == "MC_myResourceGroup_myAKSCluster_eastus"
    nodes_id = cli("group", "show", "-n", node_group, "-o", "tsv", "--query", "id").strip()
    assert nodes_id.endswith("/resourceGroups/" + node_group), nodes_id
    cli("role", "assignment", "create", "--role", "Virtual Machine Contributor",
        "--assignee", client_ids[0], "--scope", nodes_id)
    cli("role", "assignment", "create", "--role", "Reader", "--assignee", client_ids[1], "--scope", nodes_id)
    base = ["--resource-group", "myResourceGroup", "--cluster-name", "myAKSCluster", "--namespace", "my-app"]
    cli("aks", "pod-identity", "add", *base, "--name", "my-pod-identity", "--identity-resource-id", ids[0]["id"])
    cli("aks", "pod-identity", "add", *base, "--name", "my-pod-identity-1", "--identity-resource-id", ids[0]["id"],
        "--binding-selector", "foo")
    cli("aks", "pod-identity", "add", *base, "--name", "my-pod-identity-2", "--identity-resource-id", ids[1]["id"],
        "--binding-selector", "foo")
    cluster = cli("aks", "show", "-g", "myResourceGroup", "-n", "myAKSCluster")
    kubelet = cluster["properties"]["identityProfile"]["kubeletidentity"]
    assert cli("aks", "show", "-g", "myResourceGroup", "-n", "myAKSCluster", "--query",
               "identityProfile.kubeletidentity.clientId", "-o", "tsv").strip() == kubelet["clientId"]
    # the CRDs first (NMI watches them), as the README's install step does
    crds = subprocess.run([keyless_bin(), "pod-identity-addon", "--print-crds"], capture_output=True, text=True, check=True)
    fab.cp.kubectl("apply", "-f", "-", input=crds.stdout)
    agents = []
    for i, node in enumerate(fab.nodes):
        token = cli("aks", "nodepool", "join-token", "-g", "myResourceGroup", "--cluster-name", "myAKSCluster",
                    "-n", "nodepool1")["joinToken"]
        agents.append(fab.start_node(node, f"aks-nodepool1-{i}", token))
    fab.start_addon(fab.nodes[0], cluster["id"], kubelet["clientId"])
    # the add-on created the namespace; there is no controller-manager to create its default
    # service account, which pods need
    wait_for(lambda: fab.cp.get("namespace", "my-app"), what="namespace my-app")
    fab.cp.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "my-app"}})
    wait_for(lambda: fab.cp.get("azureidentitybinding", "my-pod-identity-2-binding", "-n", "my-app"),
             what="the add-on's bindings")
    return {"ids": ids, "cluster": cluster, "kubelet": kubelet, "node_group": node_group, "agents": agents}


def principal(identity):
    return identity["properties"]["principalId"]


def client_id(identity):
    return identity["properties"]["clientId"]


def test_add_on_materializes_the_profile_as_aks_does(fab, seed):
    cp = fab.cp
    ident = cp.get("azureidentity", "my-pod-identity", "-n", "my-app")
    assert ident["spec"] == {"type": 0, "resourceID": seed["ids"][0]["id"], "clientID": client_id(seed["ids"][0])}
    assert ident["metadata"]["labels"]["kubernetes.azure.com/managedby"] == "aks"
    assert ident["metadata"]["labels"]["addonmanager.kubernetes.io/mode"] == "Reconcile"
    b = cp.get("azureidentitybinding", "my-pod-identity-binding", "-n", "my-app")
    assert b["spec"]["selector"] == "my-pod-identity" and b["spec"]["azureIdentity"] == "my-pod-identity"
    assert cp.get("azureidentitybinding", "my-pod-identity-1-binding", "-n", "my-app")["spec"]["selector"] == "foo"
    ex = cp.get("azurepodidentityexception", "aks-addon-exception", "-n", "kube-system")
    assert ex["spec"]["podLabels"] == {"kubernetes.azure.com/managedby": "aks"}

    # provisioningState reported back
    def assigned():
        prof = fab.cli("aks", "show", "-g", "myResourceGroup", "-n", "myAKSCluster")["properties"]["podIdentityProfile"]
        states = {p["name"]: p.get("provisioningState") for p in prof["userAssignedIdentities"]}
        return states if set(states.values()) == {"Assigned"} else None
    wait_for(assigned, what="provisioningState Assigned")

    # a manual edit is reverted
    cp.kubectl("patch", "azureidentitybinding", "my-pod-identity-1-binding", "-n", "my-app", "--type=merge",
               "-p", json.dumps({"spec": {"selector": "hijacked"}}))
    wait_for(lambda: cp.get("azureidentitybinding", "my-pod-identity-1-binding", "-n", "my-app")["spec"]["selector"] == "foo",
             what="the edit reverted")


def test_seed_pod_gets_its_identity_from_every_sdk(fab, seed):
    pod = fab.pod(0, "demo", "my-app", {"aadpodidbinding": "my-pod-identity"})
    want = principal(seed["ids"][0])
    # python azure-identity, no environment at all
    out = run_client({"credential": "mi", "scope": ARM + "/.default"}, prefix=pod.prefix(), clean_env=True)
    assert "error" not in out, out
    assert fab.verify(out["token"])["oid"] == want
    # node @azure/identity
    out = run_node(fab.up, {"credential": "mi", "scope": ARM + "/.default"}, prefix=pod.prefix(), imds_env=False)
    assert "error" not in out, out
    assert fab.verify(out["token"])["oid"] == want
    # the Rust azure_identity crate
    from test_netns import rust_client
    r = subprocess.run([*pod.prefix(), "env", "-i", rust_client(), "system", "-", ARM + "/.default"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error" not in got, got
    assert fab.verify(got["token"])["oid"] == want


def test_two_identities_under_one_selector_by_client_id(fab, seed):
    pod = fab.pod(1, "demo-foo", "my-app", {"aadpodidbinding": "foo"})
    for ident in seed["ids"]:
        out = run_client({"credential": "mi", "kwargs": {"client_id": client_id(ident)}, "scope": ARM + "/.default"},
                         prefix=pod.prefix(), clean_env=True)
        assert "error" not in out, out
        assert fab.verify(out["token"])["oid"] == principal(ident)
    out = run_node(fab.up, {"credential": "mi", "options": {"clientId": client_id(seed["ids"][1])}, "scope": ARM + "/.default"},
                   prefix=pod.prefix(), imds_env=False)
    assert fab.verify(out["token"])["oid"] == principal(seed["ids"][1])
    from test_netns import rust_client
    r = subprocess.run([*pod.prefix(), "env", "-i", rust_client(), "client_id", client_id(seed["ids"][1]), ARM + "/.default"],
                       capture_output=True, text=True, timeout=120)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert fab.verify(got["token"])["oid"] == principal(seed["ids"][1])
    # an identity the pod is not bound to (the kubelet identity is on the node) is refused
    status, body = pod.curl(f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={ARM}/"
                            f"&client_id={seed['kubelet']['clientId']}")
    assert status == 404, body


def test_demo_lists_vms_in_the_node_group_and_reads_instance_metadata(fab, seed):
    pod = fab.pod(0, "demo-arm", "my-app", {"aadpodidbinding": "my-pod-identity"})
    args = {"server": fab.server_for(fab.nodes[0]), "ca": fab.up.info["caFile"],
            "subscription": fab.up.info["subscriptionId"], "resource_group": seed["node_group"],
            "client_id": client_id(seed["ids"][0])}
    r = subprocess.run([*pod.prefix(), "env", "-i", sys.executable, str(HERE / "pod_demo.py"), json.dumps(args)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error" not in out, out
    # the node group holds scale sets, no VMs: the demo prints "vm count 0"
    assert out["vm_count"] == 0
    assert out["vmss_count"] >= 1
    assert out["instance"]["compute"]["resourceGroupName"] == seed["node_group"]


def test_refusals(fab, seed):
    q = f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={ARM}/"
    bare = fab.pod(0, "no-label", "my-app")
    status, body = bare.curl(q)
    assert status == 404, body
    # the label in another namespace
    fab.cp.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    fab.cp.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "other"}})
    squatter = fab.pod(1, "squatter", "other", {"aadpodidbinding": "my-pod-identity"})
    status, body = squatter.curl(q)
    assert status == 404, body
    # no Metadata header
    demo = next(p for p in fab.pods if p.k8s_name == "demo")
    status, body = demo.curl(q, headers=())
    assert status == 400 and json.loads(body)["error"] == "invalid_request", body


def test_a_tenants_own_objects_grant_nothing(fab, seed):
    """A tenant who may write the aadpodidentity.k8s.io kinds in their namespace: an
    AzureIdentity naming another namespace's pod identity or the kubelet identity, bound to
    their pod, and an exception of their own, are not in the cluster's profile, so NMI ignores
    them."""
    cp = fab.cp
    cp.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "evil"}})
    cp.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "evil"}})
    kubelet_cid = seed["kubelet"]["clientId"]
    for name, cid, rid in [("steal", client_id(seed["ids"][0]), seed["ids"][0]["id"]),
                           ("kubelet", kubelet_cid, seed["kubelet"]["resourceId"])]:
        cp.apply({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
                  "metadata": {"name": name, "namespace": "evil"},
                  "spec": {"type": 0, "clientID": cid, "resourceID": rid}})
        cp.apply({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
                  "metadata": {"name": f"{name}-binding", "namespace": "evil"},
                  "spec": {"azureIdentity": name, "selector": name}})
    cp.apply({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzurePodIdentityException",
              "metadata": {"name": "aks-addon-exception", "namespace": "evil"},
              "spec": {"podLabels": {"app": "evil-probe"}}})
    q = f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={ARM}/"
    thief = fab.pod(0, "thief", "evil", {"aadpodidbinding": "steal"})
    status, body = thief.curl(q)
    assert status == 404, body
    status, body = thief.curl(q + f"&client_id={client_id(seed['ids'][0])}")
    assert status == 404, body
    kthief = fab.pod(1, "kubelet-thief", "evil", {"aadpodidbinding": "kubelet"})
    status, body = kthief.curl(q + f"&client_id={kubelet_cid}")
    assert status == 404, body
    # the tenant's exception does not except: no node identity
    probe = fab.pod(0, "evil-probe", "evil", {"app": "evil-probe"})
    status, body = probe.curl(q + f"&client_id={kubelet_cid}")
    assert status == 404, (status, body)
    # the profile's own objects still work
    demo = next(p for p in fab.pods if p.k8s_name == "demo")
    status, body = demo.curl(q)
    assert status == 200, body


def test_a_pod_bypassing_the_redirect_is_not_the_host(fab, seed):
    """The node's IMDS (169.254.169.254:80 on the node) answers a pod that reaches it without
    the DNAT (untracked here, as for a connection older than the rule) as NMI would."""
    pod = fab.pod(1, "bypass", "my-app", {"aadpodidbinding": "my-pod-identity-2"})
    node = pod.node
    q = (f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={ARM}/"
         f"&client_id={seed['kubelet']['clientId']}")
    rules = [("PREROUTING", "-s"), ("OUTPUT", "-d")]
    for chain, d in rules:
        node.run("iptables", "-t", "raw", "-I", chain, d, pod.ip, "-j", "NOTRACK")
    try:
        status, body = pod.curl(q)
        assert status == 404, (status, body)
    finally:
        for chain, d in rules:
            node.run("iptables", "-t", "raw", "-D", chain, d, pod.ip, "-j", "NOTRACK", check=False)
    # the node itself is the host: the kubelet identity (never a pod identity, item 3)
    out = node.run("curl", "-s", "-H", "Metadata: true", f"http://169.254.169.254{q}")
    assert "access_token" in out.stdout, out.stdout
    out = node.run("curl", "-s", "-H", "Metadata: true",
                   f"http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01"
                   f"&resource={ARM}/&client_id={client_id(seed['ids'][0])}")
    assert "Identity not found" in out.stdout, out.stdout


def test_excepted_pod_gets_the_node_identity_and_never_the_pod_identity(fab, seed):
    fab.cli("aks", "pod-identity", "exception", "add", "--resource-group", "myResourceGroup",
            "--cluster-name", "myAKSCluster", "--namespace", "my-app", "--name", "probe-exception",
            "--pod-labels", "app=probe")
    wait_for(lambda: fab.cp.get("azurepodidentityexception", "probe-exception", "-n", "my-app"), what="exception")
    pod = fab.pod(0, "probe", "my-app", {"app": "probe", "aadpodidbinding": "my-pod-identity"})
    out = run_client({"credential": "mi", "kwargs": {"client_id": seed["kubelet"]["clientId"]}, "scope": ARM + "/.default"},
                     prefix=pod.prefix(), clean_env=True)
    assert "error" not in out, out
    assert fab.verify(out["token"])["oid"] == seed["kubelet"]["objectId"]
    q = f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={ARM}/&client_id={client_id(seed['ids'][0])}"
    status, body = pod.curl(q)
    assert status == 400 and "Identity not found" in body, (status, body)


def test_removed_pod_identity_is_refused(fab, seed):
    pod = fab.pod(1, "demo-late", "my-app", {"aadpodidbinding": "my-pod-identity"})
    q = f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={ARM}/"
    status, body = pod.curl(q)
    assert status == 200, body
    t0 = time.time()
    fab.cli("aks", "pod-identity", "delete", "--resource-group", "myResourceGroup", "--cluster-name", "myAKSCluster",
            "--namespace", "my-app", "--name", "my-pod-identity")
    wait_for(lambda: pod.curl(q)[0] == 404, timeout=30, step=0.05, what="refusal after pod-identity delete")
    print(f"pod identity removed from the profile -> refused after {1000 * (time.time() - t0):.0f} ms")
    # NMI refuses as soon as its trust (the host view's profile) drops the identity; the add-on
    # deletes the object on its own next pass
    wait_for(lambda: fab.cp.get("azureidentity", "my-pod-identity", "-n", "my-app") is None, timeout=30,
             step=0.1, what="the add-on deletes the AzureIdentity")


def explain(fab, node_index, namespace, pod, *extra):
    """`keyless aks pod-identity explain --agent` on a node (its NMI loopback endpoint): JSON."""
    out = fab.nodes[node_index].run(keyless_bin(), "aks", "pod-identity", "explain", "--namespace", namespace,
                                    "--pod", pod, "--agent", "http://127.0.0.1:2579", "-o", "json", *extra, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_explain_names_the_reason_of_each_refusal(fab, seed):
    """The refusal matrix of seed 000, each with its reason, from the agent of the pod's node;
    the agent's last refusals are listed; the CLI without --agent gives the same verdict from the
    API server's objects (with the cluster's profile: -g / --cluster-name)."""
    q = f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={ARM}/"
    # the label of a binding of another namespace (my-app's "foo" bindings)
    fab.pod(1, "squat-foo", "other", {"aadpodidbinding": "foo"})
    pods = {p.k8s_name: p for p in fab.pods}
    cases = [
        ("demo-foo", "my-app", 1, "served"),
        ("no-label", "my-app", 0, "no_label"),
        ("demo", "my-app", 0, None),  # its pod identity was deleted from the profile
        ("squat-foo", "other", 1, "binding_in_other_namespace"),
        ("probe", "my-app", 0, "excepted"),
        ("demo-late", "my-app", 1, None),  # its pod identity was deleted from the profile
        ("thief", "evil", 0, "identity_not_trusted"),
    ]
    for name, ns, node, want in cases:
        if name not in pods:
            continue
        e = explain(fab, node, ns, name)
        assert e["source"] == f"agent of node aks-nodepool1-{node}", e
        if want is None:
            assert e["verdict"]["code"] in ("no_binding", "identity_missing", "identity_not_trusted"), e
        else:
            assert e["verdict"]["code"] == want, (name, e)
        assert any(s["check"] == "pod" and s["ok"] for s in e["steps"]), e
        # the CLI from the API server, with the cluster's profile
        out = subprocess.run([keyless_bin(), "aks", "pod-identity", "explain", "--namespace", ns, "--pod", name,
                              "--kubeconfig", fab.cp.kubeconfig, "-g", "myResourceGroup", "--cluster-name", "myAKSCluster",
                              "-o", "json"], env=fab.admin_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["verdict"]["code"] == e["verdict"]["code"], (name, out.stdout, e)
    # another node's agent: the pod is not its
    e = explain(fab, 0, "my-app", "demo-foo")
    assert e["verdict"]["code"] == "not_on_this_node", e
    # the last refusals of a pod, newest last, with their reasons
    bare = pods["no-label"]
    bare.curl(q)
    e = explain(fab, 0, "my-app", "no-label")
    assert e["refusals"] and e["refusals"][-1]["status"] == 404, e
    assert e["refusals"][-1]["reason"] == "identity_not_found", e
    # plain text by default, one line per step
    out = fab.nodes[0].run(keyless_bin(), "aks", "pod-identity", "explain", "--namespace", "my-app", "--pod",
                           "no-label", "--agent", "http://127.0.0.1:2579", check=False)
    assert out.returncode == 0, out.stderr
    assert "verdict: no_label" in out.stdout and "[no] label" in out.stdout, out.stdout
    # explanations are for the node itself: a pod asking its NMI for one is refused
    status, body = pods["demo-foo"].curl("/explain?namespace=my-app&pod=no-label")
    assert status == 403, (status, body)
