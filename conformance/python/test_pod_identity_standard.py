"""Pod identity in standard mode (aad-pod-identity's Helm chart default), with no cluster
resource: a scale set with a kubelet identity, two nodes (network namespaces, each with a host
agent joined to the scale set and running NMI with --operation-mode standard), two MIC replicas
(`keyless mic`, acting as the kubelet identity through their node's IMDS, one holding the
Lease), Node objects naming the scale set in spec.providerID, and pods (network namespaces +
kubelet-style cgroups) whose unmodified SDKs get tokens once MIC has attached their identity.

The user writes AzureIdentity / AzureIdentityBinding with kubectl; MIC creates
AzureAssignedIdentity objects (Created -> Assigned), attaches the identity through Keyless ARM
(one PATCH per scale set per sync, counted from the server's audit trail), detaches it after the
last pod, never detaches the kubelet identity, reports ARM's refusal on the object when it lacks
its roles, and fails over to the other replica when the leader dies."""
import json
import os
import pathlib
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import keyless_bin, run_client, wait_for
from k8s_fabric import PodNs, Proc
from test_node_identity import run_node
from test_pod_identity import running_fabric

ARM = "https://management.azure.com"
MC = "MC_std_cluster_eastus"
IDS = "std-identities"
TOKEN_Q = f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={ARM}"


class Kube:
    """The API server over REST with the admin token (kubectl per object is too slow for 200
    pods)."""

    def __init__(self, cp):
        self.base = cp.env["K8S_API_URL"]
        self.token = pathlib.Path(cp.env["K8S_ADMIN_TOKEN_FILE"]).read_text().strip()
        self.ctx = ssl.create_default_context(cafile=cp.env["K8S_CA_FILE"])

    def call(self, method, path, body=None, content_type="application/json", ok=(200, 201)):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        if ok and status not in ok:
            raise AssertionError(f"{method} {path}: {status} {text}")
        return status, (json.loads(text) if text else None)

    def get(self, path):
        status, body = self.call("GET", path, ok=None)
        return body if status == 200 else None

    def assigned(self, ns, name):
        return self.get(f"/apis/aadpodidentity.k8s.io/v1/namespaces/{ns}/azureassignedidentities/{name}")

    def all_assigned(self):
        return self.get("/apis/aadpodidentity.k8s.io/v1/azureassignedidentities")["items"]


DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "base"


def service_account_kubeconfig(fab, component):
    """The install manifests' ServiceAccount and RBAC of `component` (nmi, mic) applied, and a
    kubeconfig with that service account's token: the processes run with exactly the
    permissions the manifests give them."""
    for f in ("serviceaccount.yaml", "rbac.yaml"):
        fab.cp.kubectl("apply", "-f", str(DEPLOY / component / f))
    token = fab.cp.kubectl("create", "token", f"keyless-{component}", "-n", "kube-system",
                           "--duration", "3600s").stdout.strip()
    path = fab.root / f"kubeconfig-sa-{component}"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "k", "cluster": {"server": f"https://kubernetes:{fab.cp.port}",
                                                "certificate-authority": fab.cp.env["K8S_CA_FILE"]}}],
        "users": [{"name": component, "user": {"token": token}}],
        "contexts": [{"name": "k", "context": {"cluster": "k", "user": component}}],
        "current-context": "k",
    }))
    return str(path)


class Std:
    def __init__(self, fab):
        self.fab = fab
        self.kube = Kube(fab.cp)
        self.mics = {}
        self.agents = []
        self.vm_ids = []

    def start_node(self, i, join_token, extra=()):
        # the node's own identity stays the node's (MIC acts as it) even if pods are bound to it
        extra = (*extra, "--immutable-user-msis", self.kubelet["properties"]["clientId"])
        node = self.fab.nodes[i]
        name = f"std-node-{i}"
        kubeconfig = self.nmi_kubeconfig
        cmd = [*node.prefix(), keyless_bin(), "node", "--server", self.fab.server_for(node),
               "--ca-file", self.fab.up.info["caFile"], "--state-dir", str(self.fab.root / f"state-{name}"),
               "--imds-listen", "169.254.169.254:80", "--sync-interval", "5",
               "--nmi", "--operation-mode", "standard", "--node-name", name, "--kubeconfig", kubeconfig,
               "--nmi-listen", f"{node.ns_ip}:2579",
               # the ops listener at its default address (the node's own loopback): the probe's
               "--metrics-listen", "127.0.0.1:9465", *extra]
        # node 0 reads its token from a file (what the DaemonSet does), node 1 from the env
        if i == 0:
            tf = self.fab.root / "join-token-0"
            tf.write_text(join_token + "\n")
            tf.chmod(0o600)
            cmd += ["--join-token-file", str(tf)]
            env = dict(os.environ)
        else:
            env = dict(os.environ, KEYLESS_JOIN_TOKEN=join_token)
        p = Proc(cmd, "NMI caller attestation:", self.fab.root / f"node-{name}.log", env=env)
        self.fab.procs.append(p)
        self.agents.append(p)
        vm = p.find("VM:")
        assert vm and "/virtualMachineScaleSets/pool/virtualMachines/" in vm, p.lines
        self.vm_ids.append(vm)
        return p

    def start_mic(self, holder, kubelet_client_id):
        node = self.fab.nodes[0]
        kubeconfig = self.mic_kubeconfig
        port = 19468 + len(self.mics)
        cmd = [*node.prefix(), keyless_bin(), "mic", "--server", self.fab.server_for(node),
               "--ca-file", self.fab.up.info["caFile"], "--client-id", kubelet_client_id,
               "--kubeconfig", kubeconfig, "--lease-namespace", "kube-system", "--holder", holder,
               "--metrics-listen", f"{node.ns_ip}:{port}"]
        p = Proc(cmd, "MIC: caches listed", self.fab.root / f"mic-{holder}.log")
        p.metrics = f"http://{node.ns_ip}:{port}/metrics"
        self.fab.procs.append(p)
        self.mics[holder] = p
        return p

    def leader(self):
        lease = self.kube.get("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/aad-pod-identity-mic")
        return lease and lease["spec"].get("holderIdentity")

    def metric(self, holder, name):
        """Sum of the samples of `name` on a MIC replica's ops listener."""
        text = urllib.request.urlopen(self.mics[holder].metrics, timeout=10).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def pod(self, node_index, name, ns, labels):
        """The Pod object (its uid), then the pod's network namespace and cgroup, then the
        kubelet's status patch."""
        _, obj = self.kube.call("POST", f"/api/v1/namespaces/{ns}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": f"std-node-{node_index}", "containers": [{"name": "app", "image": "app"}]},
        })
        pod = PodNs(self.fab.nodes[node_index], self.fab.uid, pod_uid=obj["metadata"]["uid"])
        self.fab.pods.append(pod)
        pod.k8s_name, pod.k8s_namespace = name, ns
        self.kube.call("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status",
                       {"status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}},
                       content_type="application/merge-patch+json")
        return pod

    def delete_pod(self, ns, name):
        self.kube.call("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", {"gracePeriodSeconds": 0}, ok=(200, 202, 404))

    def scale_set_identities(self):
        v = self.fab.cli("vmss", "show", "-g", MC, "-n", "pool")
        return {k.lower() for k in (v.get("identity", {}).get("userAssignedIdentities") or {})}

    def scale_set_writes(self):
        """PATCH / PUT of the scale set as the audit trail records them (successful ones)."""
        path = pathlib.Path(self.fab.up.data_dir) / "audit.log"
        n = 0
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if (r.get("operation", "").lower() == "microsoft.compute/virtualmachinescalesets/write"
                    and r.get("resourceId", "").lower().endswith("/virtualmachinescalesets/pool")
                    and r.get("result") == "Succeeded"):
                n += 1
        return n


def identity_obj(name, identity, ns="apps"):
    return {"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"type": 0, "resourceID": identity["id"], "clientID": identity["properties"]["clientId"]}}


def binding_obj(name, identity_name, selector, ns="apps"):
    return {"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"azureIdentity": identity_name, "selector": selector}}


@pytest.fixture(scope="module")
def std():
    with running_fabric("keyless-std-") as fab:
        s = Std(fab)
        cli = fab.cli
        cli("group", "create", "-n", MC, "--location", "eastus")
        cli("group", "create", "-n", IDS, "--location", "eastus")
        s.kubelet = cli("identity", "create", "-g", MC, "-n", "kubelet-identity")
        s.ids = [cli("identity", "create", "-g", IDS, "-n", f"app-{i}") for i in (1, 2, 3)]
        cli("vmss", "create", "-g", MC, "-n", "pool", "--assign-identity", "kubelet-identity")
        crds = subprocess.run([keyless_bin(), "pod-identity-addon", "--print-crds"], capture_output=True, text=True, check=True)
        fab.cp.kubectl("apply", "-f", "-", input=crds.stdout)
        for ns in ("apps", "kube-system"):
            fab.cp.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            fab.cp.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}})
        # NMI and MIC run as the install manifests' service accounts (least privilege)
        s.nmi_kubeconfig = service_account_kubeconfig(fab, "nmi")
        s.mic_kubeconfig = service_account_kubeconfig(fab, "mic")
        for i in (0, 1):
            token = cli("vmss", "join-token", "-g", MC, "-n", "pool")["joinToken"]
            extra = ("--set-retry-after-header",) if i == 1 else ()
            s.start_node(i, token, extra)
            s.kube.call("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                  "metadata": {"name": f"std-node-{i}"},
                                                  "spec": {"providerID": "azure://" + s.vm_ids[i]}})
        kcid = s.kubelet["properties"]["clientId"]
        s.start_mic("mic-a", kcid)
        s.start_mic("mic-b", kcid)
        wait_for(lambda: s.leader() in ("mic-a", "mic-b"), what="a MIC leader")
        yield s


def test_without_its_roles_mic_reports_the_refusal_and_attaches_nothing(std):
    cp = std.fab.cp
    cp.apply(identity_obj("app-1", std.ids[0]))
    cp.apply(binding_obj("app-1-binding", "app-1", "app1"))
    pod = std.pod(0, "first", "apps", {"aadpodidbinding": "app1"})
    # not namespaced (standard mode's default): the object lives in `default`
    obj = wait_for(lambda: (lambda o: o if o and o.get("status", {}).get("error") else None)(
        std.kube.assigned("default", "first-apps-app-1")), what="MIC's refusal on the object")
    assert obj["status"]["status"] == "Created", obj["status"]
    assert obj["status"]["error"]["code"] in ("AuthorizationFailed", "LinkedAuthorizationFailed"), obj["status"]
    assert obj["metadata"]["labels"]["nodename"] == "std-node-0"
    assert obj["spec"]["azureIdentityRef"]["spec"]["clientID"] == std.ids[0]["properties"]["clientId"]
    assert obj["spec"]["pod"] == "first" and obj["spec"]["podNamespace"] == "apps"
    assert std.scale_set_identities() == {std.kubelet["id"].lower()}, "nothing attached"
    # the pod is told why at once (no 100 s wait): 404 with MIC's reason
    t0 = time.time()
    status, body = pod.curl(TOKEN_Q)
    assert status == 404, (status, body)
    assert "AuthorizationFailed" in body and "not assigned" in body, body
    assert time.time() - t0 < 10
    # explain says the same: from the agent of the pod's node (with the refusal just answered)
    # and from the API server
    out = std.fab.nodes[0].run(keyless_bin(), "aks", "pod-identity", "explain", "--namespace", "apps", "--pod", "first",
                               "--agent", "http://127.0.0.1:2579", "-o", "json", check=False)
    assert out.returncode == 0, out.stderr
    e = json.loads(out.stdout)
    assert e["mode"] == "standard" and e["verdict"]["code"] == "assignment_failed", e
    assert "AuthorizationFailed" in e["verdict"]["message"], e
    assert e["refusals"][-1]["reason"] == "identity_not_assigned" and e["refusals"][-1]["status"] == 404, e
    out = subprocess.run([keyless_bin(), "aks", "pod-identity", "explain", "--namespace", "apps", "--pod", "first",
                          "--operation-mode", "standard", "--kubeconfig", std.fab.cp.kubeconfig],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "verdict: assignment_failed" in out.stdout and "[no] assignment" in out.stdout, out.stdout
    # the seed's roles: Virtual Machine Contributor on the node resource group, then Managed
    # Identity Operator on the identities (without it: LinkedAuthorizationFailed)
    kcid = std.kubelet["properties"]["clientId"]
    mc_id = std.fab.cli("group", "show", "-n", MC, "--query", "id", "-o", "tsv").strip()
    ids_id = std.fab.cli("group", "show", "-n", IDS, "--query", "id", "-o", "tsv").strip()
    std.fab.cli("role", "assignment", "create", "--role", "Virtual Machine Contributor", "--assignee", kcid, "--scope", mc_id)
    obj = wait_for(lambda: (lambda o: o if o and o["status"].get("error", {}).get("code") == "LinkedAuthorizationFailed" else None)(
        std.kube.assigned("default", "first-apps-app-1")), timeout=90, what="LinkedAuthorizationFailed without Managed Identity Operator")
    assert std.scale_set_identities() == {std.kubelet["id"].lower()}
    std.fab.cli("role", "assignment", "create", "--role", "Managed Identity Operator", "--assignee", kcid, "--scope", ids_id)
    obj = wait_for(lambda: (lambda o: o if o and o["status"].get("status") == "Assigned" else None)(
        std.kube.assigned("default", "first-apps-app-1")), timeout=90, what="Assigned once MIC has its roles")
    assert "error" not in obj["status"], obj["status"]
    assert std.scale_set_identities() == {std.kubelet["id"].lower(), std.ids[0]["id"].lower()}
    status, body = pod.curl(TOKEN_Q)
    assert status == 200, body


def test_the_sdks_in_the_pod_get_its_identity(std):
    pod = next(p for p in std.fab.pods if p.k8s_name == "first")
    want = std.ids[0]["properties"]["principalId"]
    out = run_client({"credential": "mi", "scope": ARM + "/.default"}, prefix=pod.prefix(), clean_env=True)
    assert "error" not in out, out
    assert std.fab.verify(out["token"])["oid"] == want
    out = run_node(std.fab.up, {"credential": "mi", "scope": ARM + "/.default"}, prefix=pod.prefix(), imds_env=False)
    assert "error" not in out, out
    assert std.fab.verify(out["token"])["oid"] == want
    # the Rust azure_identity crate (only ever calls 169.254.169.254)
    from test_netns import rust_client
    r = subprocess.run([*pod.prefix(), "env", "-i", rust_client(), "system", "-", ARM + "/.default"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error" not in got, got
    assert std.fab.verify(got["token"])["oid"] == want
    # the kubelet identity is the node's, never the pod's
    status, body = pod.curl(TOKEN_Q + f"&client_id={std.kubelet['properties']['clientId']}")
    assert status == 404, body


def test_a_new_pod_waits_for_assigned_then_is_served(std):
    """A pod asking right after its status patch: NMI waits (on its watch) until MIC's object
    says Assigned, then serves; the node where --set-retry-after-header is set answers an
    identity that will never be assigned with 503 + Retry-After."""
    pod = std.pod(1, "second", "apps", {"aadpodidbinding": "app1"})
    t0 = time.time()
    status, body = pod.curl(TOKEN_Q)
    assert status == 200, body
    print(f"standard mode, status patch -> first token (already attached): {1000 * (time.time() - t0):.0f} ms")
    # an identity MIC may not attach (no Managed Identity Operator on its group): the pod is
    # told why at once; node 1 runs with --set-retry-after-header: 503 + Retry-After
    std.fab.cli("group", "create", "-n", "std-other", "--location", "eastus")
    other = std.fab.cli("identity", "create", "-g", "std-other", "-n", "not-mine")
    std.fab.cp.apply(identity_obj("not-mine", other))
    std.fab.cp.apply(binding_obj("not-mine-binding", "not-mine", "nope"))
    stuck = std.pod(1, "stuck", "apps", {"aadpodidbinding": "nope"})
    out = stuck.run("curl", "-s", "-i", "-m", "30", "-H", "Metadata: true", f"http://169.254.169.254{TOKEN_Q}", check=False).stdout
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 503"), out
    assert "retry-after: 20" in head.lower(), head
    assert "LinkedAuthorizationFailed" in body and "not-mine" in body, out
    # the other identities of the scale set are not held back by it
    assert std.ids[0]["id"].lower() in std.scale_set_identities()
    assert other["id"].lower() not in std.scale_set_identities()
    std.delete_pod("apps", "stuck")
    wait_for(lambda: std.kube.assigned("default", "stuck-apps-not-mine") is None, what="stuck's object deleted")


def test_the_last_pod_gone_detaches_and_the_kubelet_identity_stays(std):
    kubelet = std.kubelet["id"].lower()
    app1 = std.ids[0]["id"].lower()
    # a pod bound to the kubelet identity itself (MIC's own, immutable): assigned, and never
    # detached when it goes
    std.fab.cp.apply(identity_obj("kubelet-as-pod", std.kubelet))
    std.fab.cp.apply(binding_obj("kubelet-as-pod-binding", "kubelet-as-pod", "kubelet"))
    kpod = std.pod(0, "uses-kubelet", "apps", {"aadpodidbinding": "kubelet"})
    wait_for(lambda: (std.kube.assigned("default", "uses-kubelet-apps-kubelet-as-pod") or {}).get("status", {}).get("status") == "Assigned",
             what="the kubelet identity assigned to a pod")
    status, body = kpod.curl(TOKEN_Q)
    assert status == 200, body
    std.delete_pod("apps", "uses-kubelet")
    wait_for(lambda: std.kube.assigned("default", "uses-kubelet-apps-kubelet-as-pod") is None, what="its object deleted")
    assert kubelet in std.scale_set_identities(), "the kubelet identity is never detached"
    std.delete_pod("apps", "first")
    wait_for(lambda: std.kube.assigned("default", "first-apps-app-1") is None, what="first's object deleted")
    assert std.scale_set_identities() == {kubelet, app1}, "second still uses it on the same scale set"
    std.delete_pod("apps", "second")
    wait_for(lambda: std.scale_set_identities() == {kubelet}, what="app-1 detached after the last pod")
    assert std.kube.assigned("default", "second-apps-app-1") is None


def test_the_other_replica_takes_over_when_the_leader_dies(std):
    leader = std.leader()
    other = "mic-b" if leader == "mic-a" else "mic-a"
    std.mics[leader].proc.send_signal(signal.SIGKILL)
    std.mics[leader].proc.wait()
    t0 = time.time()
    std.fab.cp.apply(identity_obj("app-3", std.ids[2]))
    std.fab.cp.apply(binding_obj("app-3-binding", "app-3", "app3"))
    pod = std.pod(0, "after-failover", "apps", {"aadpodidbinding": "app3"})
    # no MIC acts until the Lease runs out (≥ 10 s after the kill): not yet assigned
    e = agent_explain(std, 0, "apps", "after-failover")
    assert e["verdict"]["code"] == "not_assigned", e
    wait_for(lambda: std.leader() == other, timeout=60, step=0.2, what="the standby takes the Lease")
    took = time.time() - t0
    try:
        wait_for(lambda: (lambda o: o if o and o["status"].get("status") == "Assigned" else None)(
            std.kube.assigned("default", "after-failover-apps-app-3")), timeout=60, what="reconciled by the new leader")
    except AssertionError:
        log = (std.fab.root / f"mic-{other}.log").read_text()
        lines = [l for l in log.splitlines() if " DEBUG " not in l and " TRACE " not in l]
        raise AssertionError(f"{other} did not reconcile; its log:\n" + "\n".join(lines[-40:]))
    done = time.time() - t0
    print(f"MIC leader killed -> standby holds the Lease after {took:.1f} s (lease 15 s), pod assigned after {done:.1f} s")
    # the standby wakes when the holder's Lease runs out (15 s after its last renewal, which was
    # before the kill): the lease time, plus this test's polling and a loaded machine's slack
    assert took <= 15 + 2, took
    status, body = pod.curl(TOKEN_Q)
    assert status == 200, body
    # the binding deleted: refused at once, and explain says why
    std.fab.cp.kubectl("delete", "azureidentitybinding", "app-3-binding", "-n", "apps")
    wait_for(lambda: pod.curl(TOKEN_Q)[0] == 404, timeout=30, step=0.1, what="refused after the binding's deletion")
    e = agent_explain(std, 0, "apps", "after-failover")
    assert e["verdict"]["code"] == "no_binding" and "app3" in e["verdict"]["message"], e
    assert e["refusals"][-1]["status"] == 404, e


def agent_explain(std, node, namespace, pod):
    out = std.fab.nodes[node].run(keyless_bin(), "aks", "pod-identity", "explain", "--namespace", namespace,
                                  "--pod", pod, "--agent", "http://127.0.0.1:2579", "-o", "json", check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_200_pods_at_once_one_scale_set_write_per_sync(std):
    """200 pods across the two nodes, created at once: every pod gets its token; the scale
    set is written at most once per MIC sync (the server's audit trail counts the writes,
    the acting MIC's metrics count its syncs)."""
    leader = std.leader()
    std.fab.cp.apply(identity_obj("app-2", std.ids[1]))
    std.fab.cp.apply(binding_obj("app-2-binding", "app-2", "app2"))
    writes0 = std.scale_set_writes()
    syncs0 = std.metric(leader, "keyless_mic_syncs_total")
    n = 200
    names = [f"burst-{i}" for i in range(n)]
    t0 = time.time()
    objs = []
    for i, name in enumerate(names):
        _, o = std.kube.call("POST", "/api/v1/namespaces/apps/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "apps", "labels": {"aadpodidbinding": "app2"}},
            "spec": {"nodeName": f"std-node-{i % 2}", "containers": [{"name": "app", "image": "app"}]},
        })
        objs.append(o)
    pods = []
    for i, (name, o) in enumerate(zip(names, objs)):
        p = PodNs(std.fab.nodes[i % 2], std.fab.uid, pod_uid=o["metadata"]["uid"])
        std.fab.pods.append(p)
        p.k8s_name, p.k8s_namespace = name, "apps"
        pods.append(p)
    for p in pods:
        std.kube.call("PATCH", f"/api/v1/namespaces/apps/pods/{p.k8s_name}/status",
                      {"status": {"phase": "Running", "podIP": p.ip, "podIPs": [{"ip": p.ip}]}},
                      content_type="application/merge-patch+json")
    created = time.time() - t0

    def ask(p):
        t = time.time()
        status, body = p.curl(TOKEN_Q)
        return p.k8s_name, status, body, time.time() - t

    with ThreadPoolExecutor(max_workers=16) as ex:
        results = list(ex.map(ask, pods))
    failed = [(n, s, b[:200]) for n, s, b, _ in results if s != 200]
    assert not failed, failed[:5]
    oid = std.ids[1]["properties"]["principalId"]
    for _, _, body, _ in results[:5]:
        assert std.fab.verify(json.loads(body)["access_token"])["oid"] == oid
    writes = std.scale_set_writes() - writes0
    syncs = std.metric(leader, "keyless_mic_syncs_total") - syncs0
    waits = sorted(r[3] for r in results)
    print(f"200 pods (objects + netns + status patches in {created:.1f} s): every pod served; "
          f"token wait p50 {1000 * waits[n // 2]:.0f} ms, p99 {1000 * waits[int(n * 0.99) - 1]:.0f} ms; "
          f"scale-set writes {writes} over {syncs:.0f} MIC syncs")
    # one identity for all 200 pods: one write, whatever the number of syncs the burst spans
    assert writes == 1, (writes, syncs)
    assigned = [o for o in std.kube.all_assigned() if o["spec"]["pod"].startswith("burst-")]
    assert len(assigned) == n and all(o["status"]["status"] == "Assigned" for o in assigned)
    # all gone at once: detached in as few writes
    writes0 = std.scale_set_writes()
    syncs0 = std.metric(leader, "keyless_mic_syncs_total")
    for name in names:
        std.delete_pod("apps", name)
    wait_for(lambda: std.ids[1]["id"].lower() not in std.scale_set_identities(), timeout=120, what="app-2 detached")
    wait_for(lambda: not [o for o in std.kube.all_assigned() if o["spec"]["pod"].startswith("burst-")],
             timeout=120, what="the burst's objects deleted")
    writes = std.scale_set_writes() - writes0
    syncs = std.metric(leader, "keyless_mic_syncs_total") - syncs0
    print(f"200 pods deleted: scale-set writes {writes} over {syncs:.0f} MIC syncs")
    assert writes == 1, (writes, syncs)
    assert std.kubelet["id"].lower() in std.scale_set_identities()


def test_the_probe_fails_while_the_redirect_is_missing(std):
    """The install manifests' NMI probe (`keyless status --node-metrics 127.0.0.1:9465`) fails
    while pods would reach the node's IMDS unredirected: the chain's DNAT gone (the jump
    left in place) or the jump gone; it passes again once the rules are back."""
    node = std.fab.nodes[1]
    probe = lambda: node.run(keyless_bin(), "status", "--node-metrics", "127.0.0.1:9465", check=False)
    ok = probe()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    chain = node.run("iptables", "-t", "nat", "-S", "aad-metadata").stdout.splitlines()
    dnat = next(l for l in chain if "DNAT" in l)
    node.run("iptables", "-t", "nat", "-D", *dnat.split()[1:])
    try:
        bad = probe()
        assert bad.returncode != 0, bad.stdout
        assert "nmi iptables redirect" in bad.stdout and "DNAT" in bad.stdout, bad.stdout
    finally:
        node.run("iptables", "-t", "nat", "-I", *dnat.split()[1:2], "1", *dnat.split()[2:], check=False)
    assert probe().returncode == 0
    node.run("iptables", "-t", "nat", "-D", "PREROUTING", "-j", "aad-metadata")
    try:
        bad = probe()
        assert bad.returncode != 0 and "PREROUTING" in bad.stdout, bad.stdout
    finally:
        node.run("iptables", "-t", "nat", "-I", "PREROUTING", "1", "-j", "aad-metadata", check=False)
    assert probe().returncode == 0
