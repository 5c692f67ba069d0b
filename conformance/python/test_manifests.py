"""The install manifests under deploy/kubernetes against a real Kubernetes 1.20 API server.

- The checked-in CRDs are byte for byte what `keyless pod-identity-addon --print-crds` prints.
- Each overlay builds with `kubectl kustomize`, and after the CRDs (applied and established, as
  the README says) applies with `kubectl apply --dry-run=server` (kubectl validates against the
  server's OpenAPI: a field 1.20 does not know is refused, shown on a copy with one added).
- The objects the server would store: the NMI DaemonSet (host network, NET_ADMIN and no more
  capabilities than iptables, port 80 and caller attestation need, never privileged; host PID
  namespace and cgroups for attestation; the xtables lock; probes that run `keyless status`
  against the agent's own ops listener), MIC (2 replicas, covered by mic-exception), the add-on
  (covered by aks-addon-exception), images, resources, priority classes that exist on the
  server; every flag and environment variable the containers pass is one the binary documents in
  its --help.
- RBAC, applied for real: `kubectl auth can-i --as system:serviceaccount:<ns>:<sa>` for a
  table of allowed and refused requests per component, and `can-i --list` minus what every
  service account may do equals exactly the component's rules (nothing more).
- The add-on run with its own service account's token: it takes and renews its Lease, its
  /healthz is 200 and its /readyz 503 while it cannot reconcile (as the readiness probe sees it),
  and the NMI probe's command exits non-zero on such a report; run with NMI's token it is
  refused the Lease.
- Workload identity (overlays/workload-identity) on a second API server that has no CRDs and no
  default binding of system:service-account-issuer-discovery: the overlay dry-runs and applies
  there; the webhook Deployment (2 replicas, PodDisruptionBudget, non-root, read-only root, no
  capabilities, probes on its ops listener, its Service the name its certificate carries), the
  MutatingWebhookConfiguration (Fail, CREATE pods labelled azure.workload.identity/use: "true",
  kube-system and the webhook's namespace kept out by an opt-out label) shown on the server: a
  labelled pod is refused while no webhook answers, the others are created; RBAC tables for the
  webhook and the add-on; the README's own-overlay recipe (image, proxy image, policy/v1 PDB,
  which 1.20 refuses). The add-on (--no-pod-identity) and the webhook run with their own
  service accounts' tokens against a stand-in for Keyless and their node's IMDS: the add-on
  holds its Lease, publishes exactly the API server's keys and writes a pod's readiness
  condition, ready; the webhook gets a certificate for the Service's names, serves it, and sets
  the configuration's caBundle to its CA, ready; neither is refused anything."""
import base64
import contextlib
import http.server
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import keyless_bin, remember_secret, wait_for
from k8s_fabric import ControlPlane, Proc, k8s_script

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
CRDS = DEPLOY / "base" / "crds" / "crds.json"
PI_OVERLAYS = ("standard", "managed")
WI_OVERLAYS = ("workload-identity",)
OVERLAYS = PI_OVERLAYS + WI_OVERLAYS
IMAGE = "ghcr.io/keyless-dev/keyless:latest"
NS = "kube-system"
# workload identity's webhook: upstream azure-workload-identity's namespace, Service and configuration
WI_NS = "azure-workload-identity-system"
WEBHOOK_SERVICE = "azure-wi-webhook-webhook-service"
WEBHOOK_CONFIG = "azure-wi-webhook-mutating-webhook-configuration"
MWC = "mutatingwebhookconfigurations.admissionregistration.k8s.io"
USE_LABEL = "azure.workload.identity/use"
IGNORE_LABEL = "admission.keyless.dev/ignore"
READY_CONDITION = "keyless.dev/workload-identity-ready"
# the namespace of each service account (kube-system unless named here)
SA_NS = {"keyless-wi-webhook": WI_NS}
PIA = "aadpodidentity.k8s.io"
KINDS = ("azureidentities", "azureidentitybindings", "azurepodidentityexceptions", "azureassignedidentities")
# the components of each overlay: (workload kind, name, service account, keyless subcommand)
COMPONENTS = {
    "standard": [("DaemonSet", "keyless-nmi", "keyless-nmi", "node"),
                 ("Deployment", "keyless-mic", "keyless-mic", "mic")],
    "managed": [("DaemonSet", "keyless-nmi", "keyless-nmi", "node"),
                ("Deployment", "keyless-pod-identity-addon", "keyless-pod-identity-addon", "pod-identity-addon")],
    "workload-identity": [
        ("Deployment", "keyless-pod-identity-addon", "keyless-pod-identity-addon", "pod-identity-addon"),
        ("Deployment", "keyless-wi-webhook", "keyless-wi-webhook", "wi-webhook")],
}


def user(sa):
    return f"system:serviceaccount:{SA_NS.get(sa, NS)}:{sa}"


def can_run():
    return bool(shutil.which("etcd") and shutil.which("kubectl") and k8s_script() is not None)


@contextlib.contextmanager
def control_plane(prefix):
    if not can_run():
        if os.environ.get("CI"):
            pytest.fail("CI must have etcd, kubectl and ../shared/k8s (or KEYLESS_K8S_DIR) for the manifest tests")
        pytest.skip("needs etcd, kubectl and a kube-apiserver (KEYLESS_K8S_DIR)")
    root = tempfile.mkdtemp(prefix=prefix)
    c = None
    try:
        c = ControlPlane(root)
        c.root = pathlib.Path(root)
        yield c
    finally:
        if c is not None:
            c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cp():
    """The pod-identity overlays' API server."""
    with control_plane("keyless-manifests-") as c:
        # the README's first two steps: the CRDs, established, before anything typed by them
        c.kubectl("apply", "-k", str(DEPLOY / "base" / "crds"))
        c.kubectl("wait", "--for", "condition=established", "--timeout=60s", "-f", str(CRDS))
        yield c


@pytest.fixture(scope="module")
def cp_wi():
    """Workload identity's API server: no CRDs (the overlay must not need them), and without the
    bindings of system:service-account-issuer-discovery (1.20 binds it to every service account,
    the control-plane script to everyone; a cluster need not), so the add-on reads the API
    server's keys by the overlay's own rule. Then the README's first step: the namespaces."""
    with control_plane("keyless-manifests-wi-") as c:
        c.kubectl("delete", "clusterrolebinding", "--ignore-not-found", "system:service-account-issuer-discovery",
                  "service-account-issuer-discovery-anonymous")
        c.kubectl("apply", "-f", str(DEPLOY / "base" / "wi-webhook" / "namespace.yaml"))
        yield c


def cluster_of(overlay, cp, cp_wi):
    return cp_wi if overlay in WI_OVERLAYS else cp


@pytest.fixture(scope="module")
def rendered(cp, cp_wi):
    """Per overlay, the objects as the server would store them (`apply --dry-run=server -o json`)."""
    out = {}
    for o in OVERLAYS:
        r = cluster_of(o, cp, cp_wi).kubectl("apply", "--dry-run=server", "-o", "json", "-k",
                                             str(DEPLOY / "overlays" / o))
        doc = json.loads(r.stdout)
        out[o] = doc["items"] if doc.get("kind") == "List" else [doc]
    return out


@pytest.fixture(scope="module")
def applied(cp, rendered):
    """The pod-identity overlays applied for real (no kubelet, no controllers: nothing runs; the
    RBAC objects are real). NMI's DaemonSet is the same object in both, the managed one is
    applied last."""
    for o in PI_OVERLAYS:
        cp.kubectl("apply", "-k", str(DEPLOY / "overlays" / o))
    return cp


@pytest.fixture(scope="module")
def applied_wi(cp_wi, rendered):
    """The workload-identity overlay applied for real on its own API server."""
    for o in WI_OVERLAYS:
        cp_wi.kubectl("apply", "-k", str(DEPLOY / "overlays" / o))
    return cp_wi


def find(objs, kind, name):
    got = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(got) == 1, f"{kind}/{name}: {[(o['kind'], o['metadata']['name']) for o in objs]}"
    return got[0]


def container(workload, name=None):
    cs = workload["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1 or name, cs
    return next(c for c in cs if name is None or c["name"] == name)


def arg_value(args, flag):
    """The value of `--flag=v` or `--flag v` in args (None when absent)."""
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


# ------------------------------------------------------------------------------- CRDs, build

def test_checked_in_crds_are_what_the_binary_prints():
    out = subprocess.run([keyless_bin(), "pod-identity-addon", "--print-crds"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert CRDS.read_text() == out.stdout, (
        f"{CRDS.relative_to(ROOT)} differs from `keyless pod-identity-addon --print-crds`; regenerate it with\n"
        f"  keyless pod-identity-addon --print-crds > {CRDS.relative_to(ROOT)}")
    doc = json.loads(out.stdout)
    assert sorted(i["metadata"]["name"] for i in doc["items"]) == sorted(f"{k}.{PIA}" for k in KINDS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds(overlay):
    if not shutil.which("kubectl"):
        if os.environ.get("CI"):
            pytest.fail("CI must have kubectl")
        pytest.skip("needs kubectl")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = re.findall(r"^kind: (\S+)$", out.stdout, re.M)
    if overlay in WI_OVERLAYS:
        # no CRDs and nothing of aad-pod-identity: it applies on a cluster without them
        assert "aadpodidentity" not in out.stdout
        assert {"Namespace", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                "Service", "PodDisruptionBudget", "MutatingWebhookConfiguration"} <= set(kinds), kinds
    else:
        assert kinds.count("CustomResourceDefinition") == 4, kinds
        assert {"DaemonSet", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                "RoleBinding", "AzurePodIdentityException"} <= set(kinds), kinds
    # the placeholder image, overridable with kustomize's `images:`
    assert set(re.findall(r"^\s+image: (\S+)$", out.stdout, re.M)) == {IMAGE}


# ------------------------------------------------------------------------ server dry run

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_dry_runs_on_the_server(cp, rendered, overlay):
    objs = rendered[overlay]
    names = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    want = {
        "standard": [("AzurePodIdentityException", "mic-exception"), ("ClusterRole", "keyless-mic"),
                     ("ClusterRole", "keyless-nmi"), ("ClusterRoleBinding", "keyless-mic"),
                     ("ClusterRoleBinding", "keyless-nmi"), ("DaemonSet", "keyless-nmi"),
                     ("Deployment", "keyless-mic"), ("Role", "keyless-mic-lease"),
                     ("RoleBinding", "keyless-mic-lease"), ("ServiceAccount", "keyless-mic"),
                     ("ServiceAccount", "keyless-nmi")],
        "managed": [("AzurePodIdentityException", "aks-addon-exception"),
                    ("ClusterRole", "keyless-nmi"), ("ClusterRole", "keyless-pod-identity-addon"),
                    ("ClusterRoleBinding", "keyless-nmi"), ("ClusterRoleBinding", "keyless-pod-identity-addon"),
                    ("DaemonSet", "keyless-nmi"), ("Deployment", "keyless-pod-identity-addon"),
                    ("Role", "keyless-pod-identity-addon-lease"), ("RoleBinding", "keyless-pod-identity-addon-lease"),
                    ("ServiceAccount", "keyless-nmi"), ("ServiceAccount", "keyless-pod-identity-addon")],
        "workload-identity": [
            ("ClusterRole", "keyless-wi-webhook"), ("ClusterRole", "keyless-workload-identity"),
            ("ClusterRoleBinding", "keyless-wi-webhook"), ("ClusterRoleBinding", "keyless-workload-identity"),
            ("Deployment", "keyless-pod-identity-addon"), ("Deployment", "keyless-wi-webhook"),
            ("MutatingWebhookConfiguration", WEBHOOK_CONFIG), ("Namespace", WI_NS), ("Namespace", NS),
            ("PodDisruptionBudget", "keyless-wi-webhook"), ("Role", "keyless-workload-identity-lease"),
            ("Role", "keyless-workload-identity-proof"), ("RoleBinding", "keyless-workload-identity-lease"),
            ("RoleBinding", "keyless-workload-identity-proof"), ("Service", WEBHOOK_SERVICE),
            ("ServiceAccount", "keyless-pod-identity-addon"), ("ServiceAccount", "keyless-wi-webhook")],
    }[overlay]
    crds = sorted(("CustomResourceDefinition", f"{k}.{PIA}") for k in KINDS) if overlay in PI_OVERLAYS else []
    assert names == sorted(want + crds)
    cluster_scoped = ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Namespace",
                      "MutatingWebhookConfiguration")
    for o in objs:
        if o["kind"] not in cluster_scoped:
            # the webhook's objects in its namespace, everything else in kube-system
            webhook = o["metadata"].get("labels", {}).get("app") == "keyless-wi-webhook"
            assert o["metadata"]["namespace"] == (WI_NS if webhook else NS), o["metadata"]


def test_dry_run_refuses_a_field_the_server_does_not_know(cp, rendered):
    """The positive dry runs mean something: the same DaemonSet with `spec.os` (Kubernetes 1.23+)
    is refused by kubectl's validation against this server's OpenAPI."""
    ds = json.loads(json.dumps(find(rendered["managed"], "DaemonSet", "keyless-nmi")))
    ds.pop("status", None)
    for k in ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields", "annotations"):
        ds["metadata"].pop(k, None)
    ok = cp.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(ds), check=False)
    assert ok.returncode == 0, ok.stderr
    ds["spec"]["template"]["spec"]["os"] = {"name": "linux"}
    bad = cp.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(ds), check=False)
    assert bad.returncode != 0 and 'unknown field "os"' in bad.stderr, (bad.returncode, bad.stderr)


@pytest.mark.parametrize("overlay", PI_OVERLAYS)
def test_nmi_daemonset(rendered, overlay):
    ds = find(rendered[overlay], "DaemonSet", "keyless-nmi")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["serviceAccountName"] == "keyless-nmi"
    assert pod["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    c = container(ds)
    args = c["args"]
    assert c["image"] == IMAGE and c["command"] == ["keyless"]
    assert args[0] == "node" and "--nmi" in args
    assert arg_value(args, "--operation-mode") == overlay
    assert arg_value(args, "--node-name") == "$(NODE_NAME)"
    assert env_of(c)["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    host_ip = env_of(c)["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert host_ip == "status.hostIP" and arg_value(args, "--nmi-listen") == "$(HOST_IP):2579"
    # the node's own one-time token, from the host (not a Secret every node would share)
    assert env_of(c)["KEYLESS_JOIN_TOKEN_FILE"]["value"] == "/etc/keyless-node/join-token"
    assert "KEYLESS_JOIN_TOKEN" not in env_of(c)
    assert "--join-token" not in " ".join(args), "the join token belongs in the environment, not in argv"

    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["runAsUser"] == 0 and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    caps = {"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"}
    attest = arg_value(args, "--caller-attestation") != "false"
    if attest:
        # /proc/<pid>/fd and ns/net of pod processes, setns into a pod's network namespace
        caps |= {"SYS_PTRACE", "SYS_ADMIN"}
    assert set(sc["capabilities"]["add"]) == caps
    assert pod.get("hostPID", False) is attest
    init = pod["initContainers"]
    assert [i["command"] for i in init] == [["ip", "addr", "replace", "169.254.169.254/32", "dev", "lo"]]
    assert init[0]["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert arg_value(args, "--imds-listen") == "169.254.169.254:80"

    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}

    def host_path(mount_path):
        v = vols[mounts[mount_path]["name"]]
        return v["hostPath"]["path"], v["hostPath"].get("type")

    assert host_path("/run/xtables.lock") == ("/run/xtables.lock", "FileOrCreate")
    state = arg_value(args, "--state-dir")
    assert host_path(state) == ("/var/lib/keyless/node", "DirectoryOrCreate")
    if attest:
        cgroup = arg_value(args, "--cgroup-root")
        assert host_path(cgroup) == ("/sys/fs/cgroup", "Directory") and mounts[cgroup]["readOnly"] is True
    ca = env_of(c)["KEYLESS_CA_FILE"]["value"]
    assert vols[mounts[os.path.dirname(ca)]["name"]]["configMap"]["name"] == "keyless"
    assert env_of(c)["KEYLESS_SERVER"]["valueFrom"]["configMapKeyRef"] == {"name": "keyless", "key": "server"}

    # the probes ask the agent's own ops listener (`keyless status` exits non-zero unless its
    # /readyz is 200: that includes the iptables redirect check); never an always-200 endpoint
    ops = arg_value(args, "--metrics-listen")
    assert ops.startswith("127.0.0.1:")
    for p in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[p]
        assert set(probe) & {"httpGet", "tcpSocket", "grpc"} == set(), probe
        assert probe["exec"]["command"] == ["keyless", "status", "--node-metrics", ops], probe
    budget = lambda p: c[p]["periodSeconds"] * c[p]["failureThreshold"]
    assert budget("livenessProbe") > budget("readinessProbe")
    assert c["livenessProbe"]["timeoutSeconds"] > 5, "keyless status waits up to 5 s for /readyz"


def test_mic_deployment_and_exception(rendered):
    objs = rendered["standard"]
    d = find(objs, "Deployment", "keyless-mic")
    pod = d["spec"]["template"]
    assert d["spec"]["replicas"] == 2
    assert pod["spec"]["serviceAccountName"] == "keyless-mic"
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"].get("hostNetwork") is not True
    c = container(d)
    assert c["image"] == IMAGE and c["command"] == ["keyless"] and c["args"][0] == "mic"
    env = env_of(c)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["AZURE_CLIENT_ID"]["valueFrom"]["configMapKeyRef"] == {"name": "keyless", "key": "client-id"}
    http_probes(c, 9468)
    ex = find(objs, "AzurePodIdentityException", "mic-exception")
    assert ex["metadata"]["namespace"] == NS
    assert ex["spec"]["podLabels"] == {"app": "keyless-mic"}
    assert ex["spec"]["podLabels"].items() <= pod["metadata"]["labels"].items()
    # the Lease the Role names is MIC's default
    role = find(objs, "Role", "keyless-mic-lease")
    assert ["aad-pod-identity-mic"] in [r.get("resourceNames") for r in role["rules"]]


def test_addon_deployment_and_exception(rendered):
    objs = rendered["managed"]
    d = find(objs, "Deployment", "keyless-pod-identity-addon")
    pod = d["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == "keyless-pod-identity-addon"
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    # one replica, stopped before its successor starts (only the Lease holder becomes ready)
    assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
    c = container(d)
    assert c["image"] == IMAGE and c["args"][0] == "pod-identity-addon"
    assert "--skip-crds" in c["args"], "the add-on would need CRD write access without it"
    env = env_of(c)
    assert env["KEYLESS_CLUSTER_ID"]["valueFrom"]["configMapKeyRef"] == {"name": "keyless", "key": "cluster-id"}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    http_probes(c, 9467)
    ex = find(objs, "AzurePodIdentityException", "aks-addon-exception")
    # exactly what the add-on applies itself (keyless_k8s::addon::desired), so the two agree
    assert ex["metadata"]["namespace"] == NS
    assert ex["spec"]["podLabels"] == {"kubernetes.azure.com/managedby": "aks"}
    assert {"addonmanager.kubernetes.io/mode": "Reconcile", "kubernetes.azure.com/managedby": "aks"}.items() \
        <= ex["metadata"]["labels"].items()
    assert ex["spec"]["podLabels"].items() <= pod["metadata"]["labels"].items()
    role = find(objs, "Role", "keyless-pod-identity-addon-lease")
    assert ["keyless-pod-identity-addon"] in [r.get("resourceNames") for r in role["rules"]]


def test_addon_runs_the_loops_its_overlay_installs(rendered):
    """One add-on Deployment, switched by a flag: pod identity only in managed (workload
    identity's permissions are not there), workload identity only in workload-identity (no CRDs,
    no pod-identity permissions there)."""
    managed = find(rendered["managed"], "Deployment", "keyless-pod-identity-addon")
    wi = find(rendered["workload-identity"], "Deployment", "keyless-pod-identity-addon")
    m_args, w_args = container(managed)["args"], container(wi)["args"]
    assert "--no-workload-identity" in m_args and "--no-pod-identity" not in m_args
    assert "--no-pod-identity" in w_args and "--no-workload-identity" not in w_args
    switches = ("--no-pod-identity", "--no-workload-identity")
    assert [a for a in m_args if a not in switches] == [a for a in w_args if a not in switches]
    assert managed["spec"]["template"] != wi["spec"]["template"]
    assert wi["spec"]["replicas"] == 1 and wi["spec"]["strategy"]["type"] == "Recreate"
    http_probes(container(wi), 9467)
    # the loops' Lease (keyless_k8s::wi_addon::defaults::LEASE_NAME) is the one the Role names
    role = find(rendered["workload-identity"], "Role", "keyless-workload-identity-lease")
    assert ["keyless-workload-identity"] in [r.get("resourceNames") for r in role["rules"]]
    # the API server's keys and issuer, granted by the overlay itself
    cr = find(rendered["workload-identity"], "ClusterRole", "keyless-workload-identity")
    urls = {u for r in cr["rules"] for u in r.get("nonResourceURLs", [])}
    assert urls == {"/openid/v1/jwks", "/.well-known/openid-configuration"}
    # the publish proof: tokens of the Deployment's own service account only
    # (keyless_k8s::wi_addon::defaults::SERVICE_ACCOUNT_NAME, the add-on's default)
    sa = wi["spec"]["template"]["spec"]["serviceAccountName"]
    assert sa == "keyless-pod-identity-addon" and wi["metadata"]["namespace"] == NS
    proof = find(rendered["workload-identity"], "Role", "keyless-workload-identity-proof")
    assert proof["rules"] == [{"apiGroups": [""], "resources": ["serviceaccounts/token"],
                               "resourceNames": [sa], "verbs": ["create"]}]
    binding = find(rendered["workload-identity"], "RoleBinding", "keyless-workload-identity-proof")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NS}]


def test_wi_webhook_deployment_service_and_budget(rendered):
    objs = rendered["workload-identity"]
    d = find(objs, "Deployment", "keyless-wi-webhook")
    pod = d["spec"]["template"]
    spec = pod["spec"]
    assert d["metadata"]["namespace"] == WI_NS
    # stateless: two replicas on different nodes where possible, never fewer than two serving
    # during a rollout, at least one through a drain
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["strategy"]["type"] == "RollingUpdate"
    assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert anti["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    pdb = find(objs, "PodDisruptionBudget", "keyless-wi-webhook")
    assert pdb["apiVersion"] == "policy/v1beta1", "the version Kubernetes 1.20 serves"
    assert pdb["spec"]["minAvailable"] == 1 < d["spec"]["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert spec["serviceAccountName"] == "keyless-wi-webhook"
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0 and psc["seccompProfile"]["type"] == "RuntimeDefault"
    c = container(d)
    assert c["image"] == IMAGE and c["command"] == ["keyless"] and c["args"][0] == "wi-webhook"
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc.get("privileged") is not True
    assert sc.get("runAsUser", psc["runAsUser"]) != 0
    # the kubelet probes the ops listener (9469, wi-webhook's ops port): /readyz needs a
    # certificate from Keyless and the service-account cache listed
    http_probes(c, 9469)
    assert c["readinessProbe"]["httpGet"].get("scheme", "HTTP") == "HTTP"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert arg_value(c["args"], "--listen") == f"0.0.0.0:{ports['webhook']}"
    env = env_of(c)
    for var, key in (("KEYLESS_CLUSTER_ID", "cluster-id"), ("KEYLESS_SERVER", "server"),
                     ("AZURE_CLIENT_ID", "client-id"), ("AZURE_TENANT_ID", "tenant-id")):
        assert env[var]["valueFrom"]["configMapKeyRef"] == {"name": "keyless", "key": key}, var
    assert env["AZURE_AUTHORITY_HOST"]["valueFrom"]["configMapKeyRef"] == {
        "name": "keyless", "key": "authority-host", "optional": True}
    # the proxy sidecar it injects runs its own image
    assert env["KEYLESS_PROXY_IMAGE"]["value"] == c["image"]
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    ca = env["KEYLESS_CA_FILE"]["value"]
    assert vols[mounts[os.path.dirname(ca)]["name"]]["configMap"]["name"] == "keyless"
    # its certificate names the Service and it keeps this configuration's caBundle: both by
    # the binary's defaults, which are these objects' names
    assert arg_value(c["args"], "--tls-san") is None and arg_value(c["args"], "--webhook-config-name") is None
    svc = find(objs, "Service", WEBHOOK_SERVICE)
    text = help_text("wi-webhook")
    assert f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc" in text
    assert f"[default: {WEBHOOK_CONFIG}]" in text
    assert svc["metadata"]["namespace"] == WI_NS and svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 443 and ports[port["targetPort"]] == 9443


def test_wi_mutating_webhook_configuration(rendered):
    objs = rendered["workload-identity"]
    cfg = find(objs, "MutatingWebhookConfiguration", WEBHOOK_CONFIG)
    assert cfg["apiVersion"] == "admissionregistration.k8s.io/v1"
    (w,) = cfg["webhooks"]
    assert w["name"] == "mutation.azure-workload-identity.io"
    # through the Service, on the webhook's path; no caBundle: the webhook sets it
    assert w["clientConfig"] == {"service": {"name": WEBHOOK_SERVICE, "namespace": WI_NS,
                                             "path": "/mutate-v1-pod", "port": 443}}
    assert w["failurePolicy"] == "Fail"
    assert w["sideEffects"] == "None" and w["reinvocationPolicy"] == "IfNeeded"
    assert w["admissionReviewVersions"] == ["v1"] and w["timeoutSeconds"] <= 30
    assert w["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                           "resources": ["pods"], "scope": "Namespaced"}]
    assert w["objectSelector"] == {"matchLabels": {USE_LABEL: "true"}}
    exprs = sorted(w["namespaceSelector"]["matchExpressions"], key=lambda e: e["key"])
    assert exprs == [{"key": IGNORE_LABEL, "operator": "DoesNotExist"},
                     {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NS, WI_NS]}]
    assert "matchLabels" not in w["namespaceSelector"]
    # 1.20 has no kubernetes.io/metadata.name: the manifests label the two namespaces out
    for ns in (NS, WI_NS):
        assert find(objs, "Namespace", ns)["metadata"]["labels"][IGNORE_LABEL] == "true"
    # the webhook's own pods: not labelled for it (and their namespace is out)
    pod = find(objs, "Deployment", "keyless-wi-webhook")["spec"]["template"]
    assert USE_LABEL not in pod["metadata"]["labels"]
    # the one configuration the webhook may change is this one
    role = find(objs, "ClusterRole", "keyless-wi-webhook")
    (rule,) = [r for r in role["rules"] if "mutatingwebhookconfigurations" in r["resources"]]
    assert rule["resourceNames"] == [WEBHOOK_CONFIG]


def test_wi_registration_selects_pods_on_the_server(applied_wi):
    """The configuration as applied, on 1.20: no webhook answers here (no kubelet, no endpoints),
    so with failurePolicy Fail every pod the API server sends to it is refused, naming it, and
    every pod it must not see is created."""
    cp = applied_wi
    ns = "wi-selectors"
    cp.kubectl("create", "namespace", ns)
    for n in (ns, NS, WI_NS):
        cp.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "selector-test", "namespace": n}})

    def create(n, name, labels):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": n, "labels": labels},
               "spec": {"serviceAccountName": "selector-test", "automountServiceAccountToken": False,
                        "containers": [{"name": "app", "image": "app:1"}]}}
        return cp.kubectl("create", "-f", "-", input=json.dumps(pod), check=False)

    r = create(ns, "labelled", {USE_LABEL: "true"})
    assert r.returncode != 0 and 'failed calling webhook "mutation.azure-workload-identity.io"' in r.stderr, r.stderr
    for n, name, labels in ((ns, "unlabelled", {}), (ns, "use-false", {USE_LABEL: "false"}),
                            (NS, "labelled", {USE_LABEL: "true"}), (WI_NS, "labelled", {USE_LABEL: "true"})):
        r = create(n, name, labels)
        assert r.returncode == 0, (n, name, r.stderr)
    # it is the opt-out label that keeps a namespace out: 1.20 labels no namespace with its name
    assert "kubernetes.io/metadata.name" not in (cp.get("namespace", NS)["metadata"].get("labels") or {})
    cp.kubectl("label", "namespace", ns, f"{IGNORE_LABEL}=true")
    r = create(ns, "labelled-opted-out", {USE_LABEL: "true"})
    assert r.returncode == 0, r.stderr


def http_probes(c, port):
    """The ops listener on the pod network (the kubelet probes the pod IP), /readyz for
    readiness, /healthz for liveness, on the listener's port."""
    ops = arg_value(c["args"], "--metrics-listen")
    assert ops == f"0.0.0.0:{port}", ops
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for p, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        g = c[p]["httpGet"]
        assert g["path"] == path
        assert (ports.get(g["port"]) if isinstance(g["port"], str) else g["port"]) == port, (p, g, ports)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_resources_and_priority_classes(cp, rendered, overlay):
    objs = rendered[overlay]
    sas = {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"}
    for kind, name, sa, _ in COMPONENTS[overlay]:
        w = find(objs, kind, name)
        pod = w["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == sa and sa in sas
        # the classes exist on a bare API server (it creates them at start)
        assert cp.get("priorityclass", pod["priorityClassName"]) is not None, pod["priorityClassName"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["image"] == IMAGE
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), (c["name"], c["resources"])
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"].get("privileged") is not True
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()


def help_text(sub):
    """`keyless <sub> --help`, or None when there is no such verb."""
    out = subprocess.run([keyless_bin(), sub, "--help"], capture_output=True, text=True, timeout=60)
    return out.stdout if out.returncode == 0 else None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_flags_and_environment_are_the_binarys(rendered, overlay):
    """Every flag a container passes is in `keyless <verb> --help`, and every environment variable
    it sets is either expanded in its args ($(VAR)) or named by that help (clap's [env: …]), so a
    renamed flag or variable fails here rather than in a cluster."""
    missing = []
    for kind, name, _, sub in COMPONENTS[overlay]:
        c = container(find(rendered[overlay], kind, name))
        assert c["args"][0] == sub
        text = help_text(sub)
        if text is None:
            missing.append(f"keyless {sub} (no such command)")
            continue
        for a in c["args"][1:]:
            assert a.startswith("--"), a
            flag = a.split("=", 1)[0]
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                missing.append(f"keyless {sub} {flag}")
        expanded = set(re.findall(r"\$\((\w+)\)", " ".join(c["args"])))
        for e in env_of(c):
            if e not in expanded and not re.search(rf"\b{e}\b", text):
                missing.append(f"keyless {sub}: env {e}")
        for p in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = c.get(p, {}).get("exec", {}).get("command")
            if cmd:
                assert cmd[:2] == ["keyless", "status"], cmd
                st = help_text("status")
                missing += [f"keyless status {f}" for f in cmd[2:]
                            if f.startswith("--") and not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", st)]
    assert missing == [], f"not in the binary's --help: {sorted(set(missing))}"


# -------------------------------------------------------------------------------- RBAC

def can_i(cp, sa, verb, resource, ns=None, sub=None):
    args = ["auth", "can-i", "--as", user(sa), verb, resource]
    args += ["-n", ns] if ns else ["--all-namespaces"]
    if sub:
        args += ["--subresource", sub]
    r = cp.kubectl(*args, check=False)
    answer = r.stdout.strip()
    assert (r.returncode, answer) in ((0, "yes"), (1, "no")), (args, r.returncode, r.stdout, r.stderr)
    return answer == "yes"


def pia(kind):
    return f"{kind}.{PIA}"


# (verb, resource, namespace or None for "in every namespace", subresource)
ALLOWED = {
    "keyless-nmi": [
        ("list", "pods", None, None), ("watch", "pods", None, None), ("get", "pods", "app", None),
        *[(v, pia(k), None, None) for k in KINDS for v in ("get", "list", "watch")],
    ],
    "keyless-mic": [
        ("list", "pods", None, None), ("watch", "pods", None, None), ("get", "nodes", None, None),
        ("list", "nodes", None, None), ("watch", "nodes", None, None),
        *[(v, pia(k), None, None) for k in (KINDS[0], KINDS[1], KINDS[3]) for v in ("get", "list", "watch")],
        *[(v, pia("azureassignedidentities"), None, None) for v in ("create", "patch", "delete")],
        ("delete", pia("azureassignedidentities"), "app", None),
        ("patch", pia("azureassignedidentities"), None, "status"),
        ("create", "leases.coordination.k8s.io", NS, None),
        ("get", "leases.coordination.k8s.io/aad-pod-identity-mic", NS, None),
        ("update", "leases.coordination.k8s.io/aad-pod-identity-mic", NS, None),
    ],
    "keyless-pod-identity-addon": [
        *[(v, pia(k), None, None) for k in KINDS[:3]
          for v in ("get", "list", "watch", "create", "update", "patch", "delete")],
        ("create", pia("azureidentitybindings"), "app", None),
        ("get", "namespaces", None, None), ("create", "namespaces", None, None),
        ("create", "leases.coordination.k8s.io", NS, None),
        ("get", "leases.coordination.k8s.io/keyless-pod-identity-addon", NS, None),
        ("update", "leases.coordination.k8s.io/keyless-pod-identity-addon", NS, None),
    ],
}
REFUSED = {
    "keyless-nmi": [
        ("create", pia("azureassignedidentities"), None, None), ("delete", pia("azureassignedidentities"), "app", None),
        ("create", pia("azureidentities"), "app", None), ("patch", pia("azureidentitybindings"), None, None),
        ("update", pia("azureassignedidentities"), None, "status"),
        ("get", "secrets", NS, None), ("list", "secrets", None, None), ("get", "configmaps", NS, None),
        ("patch", "pods", None, None), ("delete", "pods", "app", None), ("create", "pods", "app", None),
        ("create", "pods", "app", "exec"), ("list", "nodes", None, None), ("create", "events", None, None),
        ("get", "leases.coordination.k8s.io", NS, None), ("create", "serviceaccounts", NS, "token"),
        ("get", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    ],
    "keyless-mic": [
        ("create", pia("azureidentities"), "app", None), ("update", pia("azureidentitybindings"), None, None),
        ("delete", pia("azurepodidentityexceptions"), NS, None), ("patch", pia("azureidentities"), None, None),
        ("get", "secrets", NS, None), ("list", "secrets", None, None), ("get", "configmaps", NS, None),
        ("patch", "pods", None, None), ("update", "nodes", None, None), ("patch", "nodes", None, "status"),
        ("create", "namespaces", None, None), ("delete", "events", "app", None),
        ("create", "events", None, None), ("list", pia("azurepodidentityexceptions"), None, None),
        ("update", pia("azureassignedidentities"), None, None),
        ("create", "leases.coordination.k8s.io", "default", None),
        ("update", "leases.coordination.k8s.io", "default", None),
        ("update", "leases.coordination.k8s.io/keyless-pod-identity-addon", NS, None),
        ("delete", "leases.coordination.k8s.io/aad-pod-identity-mic", NS, None),
        ("list", "leases.coordination.k8s.io", NS, None),
        ("create", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    ],
    "keyless-pod-identity-addon": [
        ("create", pia("azureassignedidentities"), "app", None), ("list", pia("azureassignedidentities"), None, None),
        ("get", "secrets", NS, None), ("list", "secrets", None, None), ("get", "configmaps", NS, None),
        ("list", "pods", None, None), ("patch", "pods", None, None), ("list", "nodes", None, None),
        ("delete", "namespaces", None, None), ("update", "namespaces", None, None), ("list", "namespaces", None, None),
        ("create", "customresourcedefinitions.apiextensions.k8s.io", None, None),
        ("patch", "customresourcedefinitions.apiextensions.k8s.io", None, None),
        ("create", "leases.coordination.k8s.io", "default", None),
        ("update", "leases.coordination.k8s.io/aad-pod-identity-mic", NS, None),
        ("create", "events", None, None), ("create", "rolebindings.rbac.authorization.k8s.io", NS, None),
    ],
}


# workload identity's API server (overlays/workload-identity): the add-on's workload-identity
# loops and the webhook
ALLOWED_WI = {
    "keyless-pod-identity-addon": [
        ("list", "pods", None, None), ("watch", "pods", None, None),
        ("list", "serviceaccounts", None, None), ("watch", "serviceaccounts", None, None),
        ("patch", "pods", None, "status"), ("patch", "pods", "app", "status"),
        ("get", "/openid/v1/jwks", None, None), ("get", "/.well-known/openid-configuration", None, None),
        ("create", "leases.coordination.k8s.io", NS, None),
        ("get", "leases.coordination.k8s.io/keyless-workload-identity", NS, None),
        ("update", "leases.coordination.k8s.io/keyless-workload-identity", NS, None),
        # the publish proof: a token of its own account
        ("create", "serviceaccounts/keyless-pod-identity-addon", NS, "token"),
    ],
    "keyless-wi-webhook": [
        ("get", "serviceaccounts", "app", None), ("list", "serviceaccounts", None, None),
        ("watch", "serviceaccounts", None, None),
        # its own configuration only, list and watch included (by the field selector
        # metadata.name=<name>, which the API server authorizes as a request for that name)
        *[(v, f"{MWC}/{WEBHOOK_CONFIG}", None, None) for v in ("get", "list", "watch", "patch")],
    ],
}
REFUSED_WI = {
    "keyless-pod-identity-addon": [
        ("get", "pods", "app", None), ("patch", "pods", None, None), ("update", "pods", None, "status"),
        ("create", "pods", "app", None), ("delete", "pods", "app", None), ("create", "pods", "app", "exec"),
        ("get", "serviceaccounts", "app", None), ("patch", "serviceaccounts", None, None),
        ("create", "serviceaccounts", "app", "token"), ("create", "serviceaccounts", NS, "token"),
        ("create", "serviceaccounts/keyless-wi-webhook", NS, "token"),
        ("create", "serviceaccounts/keyless-wi-webhook", WI_NS, "token"),
        ("create", "serviceaccounts/keyless-pod-identity-addon", "default", "token"),
        ("get", "serviceaccounts/keyless-pod-identity-addon", NS, None),
        ("get", "secrets", NS, None), ("list", "secrets", None, None), ("get", "configmaps", NS, None),
        ("list", "nodes", None, None), ("create", "namespaces", None, None), ("get", "namespaces", None, None),
        ("create", "events", None, None),
        ("get", f"{MWC}/{WEBHOOK_CONFIG}", None, None), ("patch", f"{MWC}/{WEBHOOK_CONFIG}", None, None),
        # the pod-identity reconcile's Lease and objects: not in this overlay
        ("update", "leases.coordination.k8s.io/keyless-pod-identity-addon", NS, None),
        ("update", "leases.coordination.k8s.io/aad-pod-identity-mic", NS, None),
        ("delete", "leases.coordination.k8s.io/keyless-workload-identity", NS, None),
        ("list", "leases.coordination.k8s.io", NS, None),
        ("create", "leases.coordination.k8s.io", "default", None),
        ("create", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    ],
    "keyless-wi-webhook": [
        ("list", MWC, None, None), ("watch", MWC, None, None), ("create", MWC, None, None),
        ("get", f"{MWC}/other", None, None), ("patch", f"{MWC}/other", None, None),
        ("update", f"{MWC}/{WEBHOOK_CONFIG}", None, None), ("delete", f"{MWC}/{WEBHOOK_CONFIG}", None, None),
        ("patch", "validatingwebhookconfigurations.admissionregistration.k8s.io", None, None),
        ("patch", "serviceaccounts", "app", None), ("create", "serviceaccounts", "app", "token"),
        ("get", "pods", "app", None), ("list", "pods", None, None), ("patch", "pods", None, "status"),
        ("get", "secrets", WI_NS, None), ("list", "secrets", None, None), ("get", "configmaps", WI_NS, None),
        ("create", "leases.coordination.k8s.io", WI_NS, None), ("create", "events", None, None),
        ("get", "/openid/v1/jwks", None, None),
    ],
}
# (API server, service account) pairs
PLANS = [("pod-identity", sa) for sa in sorted(ALLOWED)] + [("workload-identity", sa) for sa in sorted(ALLOWED_WI)]


def applied_cluster(request, plan):
    return request.getfixturevalue("applied_wi" if plan == "workload-identity" else "applied")


@pytest.mark.parametrize("plan,sa", PLANS)
def test_service_account_can_do_what_it_needs(request, plan, sa):
    cluster = applied_cluster(request, plan)
    table = ALLOWED_WI if plan == "workload-identity" else ALLOWED
    refused = [c for c in table[sa] if not can_i(cluster, sa, *c)]
    assert refused == [], f"{sa} is refused {refused}"


@pytest.mark.parametrize("plan,sa", PLANS)
def test_service_account_can_do_nothing_more(request, plan, sa):
    cluster = applied_cluster(request, plan)
    table = REFUSED_WI if plan == "workload-identity" else REFUSED
    allowed = [c for c in table[sa] if can_i(cluster, sa, *c)]
    assert allowed == [], f"{sa} may {allowed}"


def rules_list(cp, user, ns):
    """`kubectl auth can-i --list` as a dict (resource, non-resource URLs, names) -> verbs."""
    out = cp.kubectl("auth", "can-i", "--list", "--as", user, "-n", ns).stdout.splitlines()
    head = out[0]
    cols = [head.index(h) for h in ("Resources", "Non-Resource URLs", "Resource Names", "Verbs")]
    rules = {}
    for line in out[1:]:
        if not line.strip():
            continue
        cells = [line[a:b].strip() for a, b in zip(cols, cols[1:] + [None])]
        verbs = set(cells[3].strip("[]").split())
        key = (cells[0], cells[1], tuple(cells[2].strip("[]").split()))
        rules.setdefault(key, set()).update(verbs)
    return rules


def expected_rules(plan, sa, ns):
    r = lambda v: set(v.split())
    read = r("get list watch")
    if plan == "workload-identity":
        return expected_rules_wi(sa, ns)
    want = {
        "keyless-nmi": {"pods": read, **{pia(k): read for k in KINDS}},
        "keyless-mic": {
            "pods": read, "nodes": read, **{pia(k): read for k in KINDS[:2]},
            pia("azureassignedidentities"): r("get list watch create patch delete"),
            pia("azureassignedidentities") + "/status": r("patch"),
        },
        "keyless-pod-identity-addon": {
            **{pia(k): r("get list watch create update patch delete") for k in KINDS[:3]},
            "namespaces": r("get create"),
        },
    }[sa]
    rules = {(res, "[]", ()): verbs for res, verbs in want.items()}
    lease = {"keyless-mic": "aad-pod-identity-mic", "keyless-pod-identity-addon": "keyless-pod-identity-addon"}
    if ns == NS and sa in lease:
        rules[("leases.coordination.k8s.io", "[]", ())] = r("create")
        rules[("leases.coordination.k8s.io", "[]", (lease[sa],))] = r("get update")
    return rules


def expected_rules_wi(sa, ns):
    r = lambda v: set(v.split())
    if sa == "keyless-wi-webhook":
        return {("serviceaccounts", "[]", ()): r("get list watch"),
                (MWC, "[]", (WEBHOOK_CONFIG,)): r("get list watch patch")}
    rules = {
        ("pods", "[]", ()): r("list watch"), ("serviceaccounts", "[]", ()): r("list watch"),
        ("pods/status", "[]", ()): r("patch"),
        # no default binding of system:service-account-issuer-discovery on this API server: the
        # overlay's own grant
        ("", "[/openid/v1/jwks]", ()): r("get"), ("", "[/.well-known/openid-configuration]", ()): r("get"),
    }
    if ns == NS:
        rules[("leases.coordination.k8s.io", "[]", ())] = r("create")
        rules[("leases.coordination.k8s.io", "[]", ("keyless-workload-identity",))] = r("get update")
        rules[("serviceaccounts/token", "[]", ("keyless-pod-identity-addon",))] = r("create")
    return rules


@pytest.mark.parametrize("ns", [NS, "default", WI_NS])
@pytest.mark.parametrize("plan,sa", PLANS)
def test_service_account_rules_are_exactly_the_plan(request, plan, sa, ns):
    """Everything the account may do, minus what any service account may do (discovery, self
    reviews), is exactly its component's rules: in kube-system with its Lease, elsewhere
    without."""
    applied = applied_cluster(request, plan)
    baseline = rules_list(applied, user("keyless-manifest-test-nobody"), ns)
    got = {}
    for k, verbs in rules_list(applied, user(sa), ns).items():
        extra = verbs - baseline.get(k, set())
        if extra:
            got[k] = extra
    want = expected_rules(plan, sa, ns)
    more = {k: sorted(v - want.get(k, set())) for k, v in got.items() if v - want.get(k, set())}
    less = {k: sorted(v - got.get(k, set())) for k, v in want.items() if v - got.get(k, set())}
    assert (more, less) == ({}, {}), f"{sa} in {ns}: granted beyond the plan {more}, missing {less}"


# ------------------------------------------------------------- the add-on as its own account

def sa_kubeconfig(cp, sa, path):
    token = cp.kubectl("create", "token", sa, "-n", SA_NS.get(sa, NS), "--duration", "1h").stdout.strip()
    assert token.count(".") == 2, token[:20]
    remember_secret(token)
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "k", "cluster": {"server": cp.env["K8S_API_URL"],
                                               "certificate-authority": cp.env["K8S_CA_FILE"]}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "k", "user": sa, "namespace": SA_NS.get(sa, NS)}}],
    }
    pathlib.Path(path).write_text(json.dumps(cfg))
    os.chmod(path, 0o600)
    return str(path)


def start_addon(cp, sa, holder):
    """`keyless pod-identity-addon` with the add-on Deployment's own flags, as service account
    `sa`, with a Keyless server and an IMDS that do not answer (so it never gets a token and
    never reconciles)."""
    d = find_workload_args(cp)
    kubeconfig = sa_kubeconfig(cp, sa, cp.root / f"kubeconfig-{sa}")
    args = [a for a in d if not a.startswith("--metrics-listen")]
    cmd = [keyless_bin(), *args, "--metrics-listen", "127.0.0.1:0", "--kubeconfig", kubeconfig,
           "--cluster-id", "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/"
                           "Microsoft.ContainerService/managedClusters/manifests",
           "--server", "https://127.0.0.1:9", "--ca-file", cp.env["K8S_CA_FILE"],
           "--client-id", "00000000-0000-0000-0000-000000000001",
           "--imds-endpoint", "http://127.0.0.1:9/metadata/identity/oauth2/token", "--holder", holder]
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KEYLESS_SERVER", "KEYLESS_CA_FILE")}
    return Proc(cmd, "Ops endpoint:", cp.root / f"addon-{holder}.log", env=env)


def find_workload_args(cp, name="keyless-pod-identity-addon", ns=NS):
    r = cp.kubectl("get", "deployment", name, "-n", ns, "-o", "json")
    return container(json.loads(r.stdout))["args"]


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def lease(cp, name):
    return cp.get("lease", name, "-n", NS)


def test_addon_runs_as_its_service_account(applied):
    cp = applied
    p = start_addon(cp, "keyless-pod-identity-addon", "manifest-test-addon")
    try:
        ops = p.find("Ops endpoint:").split()[0]
        # it takes the Lease (get, create) and renews it (update) with only its own RBAC
        def held():
            l = lease(cp, "keyless-pod-identity-addon")
            return l and l["spec"]["holderIdentity"] == "manifest-test-addon" and l["spec"]["renewTime"]

        first = wait_for(held, timeout=60, what="the add-on's Lease")
        wait_for(lambda: lease(cp, "keyless-pod-identity-addon")["spec"]["renewTime"] != first,
                 timeout=60, what="the Lease renewed")
        # the Deployment's probes as the kubelet sees them: alive, not ready (no pass yet)
        assert http_get(f"{ops}/healthz")[0] == 200
        status, body = http_get(f"{ops}/readyz")
        assert status == 503, (status, body)
        assert json.loads(body)["failing"] == ["in step"], body
        # NMI's probe command on a listener that answers 503: non-zero, naming the check
        port = ops.rsplit(":", 1)[1]
        st = subprocess.run([keyless_bin(), "status", "--node-metrics", f"127.0.0.1:{port}"], capture_output=True,
                            text=True, timeout=60)
        assert st.returncode != 0 and "in step" in st.stdout and "FAILING" in st.stdout, (st.stdout, st.stderr)
    finally:
        p.stop()
    log = (cp.root / "addon-manifest-test-addon.log").read_text(errors="replace")
    refused = [l for l in log.splitlines() if re.search(r"forbidden|code: 403", l, re.I)]
    assert refused == [], refused[:5]
    # nothing listens any more: the probe command fails on a listener that is gone as well
    st = subprocess.run([keyless_bin(), "status", "--node-metrics", f"127.0.0.1:{port}"], capture_output=True,
                        text=True, timeout=60)
    assert st.returncode != 0 and "DOWN" in st.stdout, (st.stdout, st.stderr)


def test_addon_as_nmi_is_refused_its_lease(applied):
    """The same process with NMI's account (reads only): the Lease is refused."""
    cp = applied
    p = start_addon(cp, "keyless-nmi", "manifest-test-as-nmi")
    log_path = cp.root / "addon-manifest-test-as-nmi.log"
    try:
        wait_for(lambda: [l for l in log_path.read_text(errors="replace").splitlines()
                          if "lease" in l.lower() and "forbidden" in l.lower()], timeout=60, what="a refused Lease")
    finally:
        p.stop()
    l = lease(cp, "keyless-pod-identity-addon")
    assert l is None or l["spec"]["holderIdentity"] != "manifest-test-as-nmi"


# ------------------------------------------------- workload identity's processes as their accounts

def openssl(*args):
    out = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


class FakeKeyless:
    """What the add-on and the webhook call, standing in for Keyless and their node's IMDS (the
    processes are the real ones; only their peers are stand-ins, so that what is tested is the
    manifests' RBAC): an IMDS token endpoint (plain HTTP) and, over HTTPS with its own CA,
    `publishServiceAccountKeys` (answers the API server's own issuer as the cluster's; refuses a
    publish without the proof of the API server, as Keyless's `PublishProofRejected`),
    `checkWorkloadIdentity` (every subject ready) and `issueWebhookCertificate` (signs the CSR
    with a webhook CA). Each call is recorded with its bearer token."""

    def __init__(self, root, issuer):
        self.dir = pathlib.Path(root) / "fake-keyless"
        self.dir.mkdir()
        self.issuer = issuer
        self.token = "fake-imds-token-" + secrets.token_hex(16)
        remember_secret(self.token)
        self.calls = []
        self.csrs = []
        self.lock = threading.Lock()
        self.ca = self._ca("ca", "Keyless test CA")
        self.webhook_ca = self._ca("webhook-ca", "Keyless test cluster webhook CA")
        key, csr = self.dir / "server.key", self.dir / "server.csr"
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
                "-out", csr, "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1")
        crt = self._sign(csr, self.ca, "server")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # IMDS
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                if self.headers.get("Metadata") != "true":
                    return self.answer(400, {"error": "invalid_request"})
                now = int(time.time())
                self.answer(200, {"access_token": fake.token, "expires_in": "3600", "expires_on": str(now + 3600),
                                  "resource": q.get("resource", [""])[0], "token_type": "Bearer"})

            def do_POST(self):  # ARM
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"null")
                path = urllib.parse.urlsplit(self.path).path
                action = path.rsplit("/", 1)[-1]
                with fake.lock:
                    fake.calls.append({"action": action, "path": path, "body": body,
                                       "authorization": self.headers.get("Authorization")})
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    return self.answer(401, {"error": {"code": "InvalidAuthenticationToken", "message": "no"}})
                if action == "publishServiceAccountKeys":
                    why = fake.proof_problem(body.get("proof"))
                    if why:
                        return self.answer(403, {"error": {"code": "PublishProofRejected", "message": why}})
                    return self.answer(200, {"issuerURL": fake.issuer, "keys": len(body["keys"]), "changed": True})
                if action == "checkWorkloadIdentity":
                    return self.answer(200, {"results": [{**s, "ready": True, "reason": "ready", "message": "ok"}
                                                         for s in body["subjects"]]})
                if action == "issueWebhookCertificate":
                    with fake.lock:
                        n = len(fake.csrs) + 1
                        csr_path = fake.dir / f"webhook-{n}.csr"
                        fake.csrs.append(csr_path)
                    csr_path.write_text(body["csr"])
                    leaf = fake._sign(csr_path, fake.webhook_ca, f"webhook-{n}")
                    return self.answer(200, {"certificate": pathlib.Path(leaf).read_text(),
                                             "caBundle": pathlib.Path(fake.webhook_ca[1]).read_text()})
                self.answer(404, {"error": {"code": "NotFound", "message": action}})

        self.arm = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.arm.socket = ctx.wrap_socket(self.arm.socket, server_side=True)
        self.imds = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        for srv in (self.arm, self.imds):
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.arm.server_address[1]}"
        self.imds_endpoint = f"http://127.0.0.1:{self.imds.server_address[1]}/metadata/identity/oauth2/token"
        self.ca_file = str(self.ca[1])

    def _ca(self, name, cn):
        key, crt = self.dir / f"{name}.key", self.dir / f"{name}.pem"
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
                "-out", crt, "-days", "2", "-subj", f"/CN={cn}")
        return key, crt

    def _sign(self, csr, ca, name):
        ext, crt = self.dir / f"{name}.ext", self.dir / f"{name}.pem"
        ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                       "extendedKeyUsage=serverAuth\n")
        openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-set_serial", secrets.randbits(62),
                "-days", "1", "-copy_extensions", "copy", "-extfile", ext, "-out", crt)
        return str(crt)

    PUBLISHER = "system:serviceaccount:kube-system:keyless-pod-identity-addon"

    def proof_problem(self, proof):
        """Why `proof` is not a token of the add-on's service account for the publish audience
        (None when it is). Its claims only: the signature is the API server's business here."""
        if not isinstance(proof, str) or proof.count(".") != 2:
            return f"no proof, or not a JWT: {str(proof)[:20]!r}"
        try:
            claims = json.loads(base64.urlsafe_b64decode(proof.split(".")[1] + "=="))
        except ValueError as e:
            return f"the proof's claims: {e}"
        aud = claims.get("aud")
        aud = aud if isinstance(aud, list) else [aud]
        want = f"{self.issuer}publishServiceAccountKeys"
        if claims.get("sub") != self.PUBLISHER or want not in aud or claims.get("iss") != self.issuer:
            return f"sub/aud/iss {claims.get('sub')}/{aud}/{claims.get('iss')}, not {self.PUBLISHER}/{want}/{self.issuer}"
        if not claims.get("exp", 0) > time.time():
            return "the proof has expired"
        return None

    def calls_to(self, action):
        with self.lock:
            return [c for c in self.calls if c["action"] == action]

    def stop(self):
        for srv in (self.arm, self.imds):
            srv.shutdown()
            srv.server_close()


CLUSTER_ID = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/"
              "Microsoft.ContainerService/managedClusters/manifests")


@pytest.fixture(scope="module")
def fake_keyless(applied_wi):
    f = FakeKeyless(applied_wi.root, applied_wi.env["K8S_SA_ISSUER"])
    yield f
    f.stop()


def run_as(cp, sa, args, name, marker):
    """`keyless <args>` as service account `sa` (its token, nothing else), talking to the fake."""
    kubeconfig = sa_kubeconfig(cp, sa, cp.root / f"kubeconfig-{name}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("KUBECONFIG", "KEYLESS_SERVER", "KEYLESS_CA_FILE", "KEYLESS_CLUSTER_ID", "AZURE_CLIENT_ID",
                        "AZURE_TENANT_ID", "AZURE_AUTHORITY_HOST", "KEYLESS_PROXY_IMAGE")}
    return Proc([keyless_bin(), *args, "--kubeconfig", kubeconfig], marker, cp.root / f"{name}.log", env=env)


def refusals_in(cp, name):
    log = (cp.root / f"{name}.log").read_text(errors="replace")
    return [l for l in log.splitlines() if re.search(r"forbidden|code: 403", l, re.I)]


def without_listeners(args):
    return [a for a in args if not a.startswith(("--metrics-listen", "--listen"))]


def test_wi_addon_runs_as_its_service_account(applied_wi, fake_keyless):
    """The add-on with the overlay's own flags (--no-pod-identity) and only its account: it holds
    its Lease, reads the API server's keys and issuer (the overlay's non-resource rule: no
    default binding here), publishes exactly those keys, and writes a gated pod's readiness
    condition; its /readyz is 200 (the issuer Keyless answered is the API server's); no CRD,
    no pod-identity Lease, nothing refused."""
    cp, fake = applied_wi, fake_keyless
    ns = "wi-app"
    cp.kubectl("create", "namespace", ns)
    client_id = "11111111-2222-3333-4444-555555555555"
    cp.apply({"apiVersion": "v1", "kind": "ServiceAccount",
              "metadata": {"name": "web", "namespace": ns,
                           "annotations": {"azure.workload.identity/client-id": client_id}}})
    cp.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": ns},
              "spec": {"serviceAccountName": "web", "automountServiceAccountToken": False,
                       "readinessGates": [{"conditionType": READY_CONDITION}],
                       "containers": [{"name": "app", "image": "app:1"}]}})
    args = find_workload_args(cp)
    assert "--no-pod-identity" in args
    name, holder = "wi-addon", "manifest-test-wi-addon"
    p = run_as(cp, "keyless-pod-identity-addon",
               [*without_listeners(args), "--metrics-listen", "127.0.0.1:0", "--cluster-id", CLUSTER_ID,
                "--server", fake.url, "--ca-file", fake.ca_file, "--client-id", "00000000-0000-0000-0000-000000000001",
                "--imds-endpoint", fake.imds_endpoint, "--holder", holder,
                "--jwks-sync-interval", "1", "--readiness-poll", "1"], name, "Ops endpoint:")
    try:
        ops = p.find("Ops endpoint:").split()[0]
        wait_for(lambda: (lease(cp, "keyless-workload-identity") or {}).get("spec", {}).get("holderIdentity") == holder,
                 timeout=60, what="the workload-identity Lease")
        api_keys = cp.request("GET", "/openid/v1/jwks")["keys"]
        published = wait_for(lambda: fake.calls_to("publishServiceAccountKeys"), what="the keys published")
        assert published[0]["body"]["keys"] == api_keys
        assert sorted(published[0]["body"]) == ["keys", "proof"]
        # the proof: minted by the API server for the add-on's own account (TokenRequest, which
        # its Role allows for that account only), for the publish audience
        assert [fake.proof_problem(c["body"].get("proof")) for c in published] == [None] * len(published)
        assert published[0]["path"] == f"{CLUSTER_ID}/publishServiceAccountKeys"

        def condition():
            pod = cp.get("pod", "web-1", "-n", ns)
            return next((c for c in pod["status"].get("conditions", []) if c["type"] == READY_CONDITION), None)

        c = wait_for(condition, timeout=60, what="the pod's readiness condition")
        assert (c["status"], c["reason"]) == ("True", "Ready"), c
        asked = [s for call in fake.calls_to("checkWorkloadIdentity") for s in call["body"]["subjects"]]
        assert {"clientId": client_id, "subject": f"system:serviceaccount:{ns}:web",
                "audience": "api://AzureADTokenExchange"} in asked
        wait_for(lambda: http_get(f"{ops}/readyz")[0] == 200, timeout=60, what="the add-on ready")
        assert "in step" not in http_get(f"{ops}/readyz")[1], "the pod-identity reconcile does not run"
    finally:
        p.stop()
    assert refusals_in(cp, name) == []
    assert lease(cp, "keyless-pod-identity-addon") is None
    assert cp.kubectl("get", "crd", "-o", "name").stdout.strip() == ""


def test_wi_webhook_runs_as_its_service_account(applied_wi, fake_keyless):
    """The webhook with the Deployment's flags and only its account: its certificate names the
    Service (the default --tls-san), it serves it, it sets the configuration's caBundle to the
    CA (get + patch of that one configuration, watched by name), its service-account cache
    lists; /readyz 200; nothing refused."""
    cp, fake = applied_wi, fake_keyless
    args = find_workload_args(cp, "keyless-wi-webhook", WI_NS)
    name = "wi-webhook"
    p = run_as(cp, "keyless-wi-webhook",
               [*without_listeners(args), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                "--cluster-id", CLUSTER_ID, "--server", fake.url, "--ca-file", fake.ca_file,
                "--client-id", "00000000-0000-0000-0000-000000000001", "--imds-endpoint", fake.imds_endpoint,
                "--tenant-id", "00000000-0000-0000-0000-0000000000aa"],
               name, "Workload identity webhook listening on")
    try:
        ops = p.find("Ops endpoint:").split()[0]
        hook = urllib.parse.urlsplit(p.find("Workload identity webhook listening on").split()[0])
        ca_pem = pathlib.Path(fake.webhook_ca[1]).read_text()

        def ca_bundle():
            cfg = cp.get("mutatingwebhookconfiguration", WEBHOOK_CONFIG)
            got = cfg["webhooks"][0]["clientConfig"].get("caBundle")
            return got and base64.b64decode(got).decode()

        assert wait_for(ca_bundle, timeout=60, what="the caBundle set").strip() == ca_pem.strip()
        (issued,) = fake.calls_to("issueWebhookCertificate")
        assert issued["path"] == f"{CLUSTER_ID}/issueWebhookCertificate"
        sans = openssl("req", "-in", fake.csrs[0], "-noout", "-text")
        svc = f"{WEBHOOK_SERVICE}.{WI_NS}.svc"
        assert f"DNS:{svc}," in sans and f"DNS:{svc}.cluster.local" in sans, sans
        # the API server's view: TLS to the Service's name, verified with the caBundle
        ctx = ssl.create_default_context(cafile=fake.webhook_ca[1])
        with socket.create_connection((hook.hostname, hook.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=svc) as tls:
                tls.sendall(f"GET /healthz HTTP/1.1\r\nHost: {svc}\r\nConnection: close\r\n\r\n".encode())
                assert tls.recv(64).startswith(b"HTTP/1.1 200"), "the webhook's HTTPS /healthz"
        wait_for(lambda: http_get(f"{ops}/readyz")[0] == 200, timeout=60, what="the webhook ready")
    finally:
        p.stop()
    assert refusals_in(cp, name) == []


# ----------------------------------------------------------------- the README's own overlay

def readme_block(first_line):
    """The ```yaml block of the README whose first line is `first_line` (dedented: a block in a
    list item is indented)."""
    text = (DEPLOY / "README.md").read_text()
    blocks = [textwrap.dedent(b) for _, b in re.findall(r"^( *)```yaml\n(.*?)^\1```", text, re.S | re.M)]
    got = [b for b in blocks if b.splitlines()[0] == first_line]
    assert len(got) == 1, f"README.md: one yaml block starting {first_line!r}, found {len(got)}"
    return got[0]


def own_overlay(tmp_path, overlay, *blocks):
    """The README's my-cluster/kustomization.yaml over `overlay`, built with `kubectl kustomize`."""
    d = tmp_path / "my-cluster"
    d.mkdir(exist_ok=True)
    text = "".join(blocks)
    rel = os.path.relpath(DEPLOY / "overlays" / overlay, d)
    text, n = re.subn(r"\.\./deploy/kubernetes/overlays/\S+", rel, text)
    assert n == 1, text
    (d / "kustomization.yaml").write_text(text)
    out = subprocess.run(["kubectl", "kustomize", str(d)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


OWN = "# my-cluster/kustomization.yaml"
OWN_WI = "# with overlays/workload-identity, add:"
OWN_PDB = "# on Kubernetes 1.25+ (no policy/v1beta1), add:"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_readme_own_image(tmp_path, overlay):
    """The README's overlay of your own puts your image everywhere (the overlays' placeholder is
    already a full name, so that is the name it replaces)."""
    if not shutil.which("kubectl"):
        if os.environ.get("CI"):
            pytest.fail("CI must have kubectl")
        pytest.skip("needs kubectl")
    mine = "registry.example/keyless:1.2.3"
    extra = (readme_block(OWN_WI),) if overlay in WI_OVERLAYS else ()
    out = own_overlay(tmp_path, overlay, readme_block(OWN), *extra)
    assert set(re.findall(r"^\s+image: (\S+)$", out, re.M)) == {mine}
    if overlay in WI_OVERLAYS:
        # the proxy sidecar the webhook injects follows (kustomize's images: do not reach an
        # environment variable, and the inner overlay's copy ran before this image was set)
        proxy = re.findall(r"- name: KEYLESS_PROXY_IMAGE\n\s+value: (\S+)", out)
        assert proxy == [mine], proxy
        without = own_overlay(tmp_path, overlay, readme_block(OWN))
        assert re.findall(r"- name: KEYLESS_PROXY_IMAGE\n\s+value: (\S+)", without) == [IMAGE], \
            "the README's extra block would not be needed"


def test_readme_pdb_for_newer_kubernetes(tmp_path, cp_wi):
    """The README's change for 1.25+ makes the budget policy/v1, which 1.20 does not serve: the
    dry run refuses it (as it accepts the overlay's policy/v1beta1)."""
    out = own_overlay(tmp_path, "workload-identity", readme_block(OWN), readme_block(OWN_WI), readme_block(OWN_PDB))
    docs = out.split("\n---\n")
    (pdb,) = [d for d in docs if re.search(r"^kind: PodDisruptionBudget$", d, re.M)]
    assert re.search(r"^apiVersion: policy/v1$", pdb, re.M), pdb
    r = cp_wi.kubectl("apply", "--dry-run=server", "-f", "-", input=pdb, check=False)
    assert r.returncode != 0 and "policy/v1" in r.stderr, (r.returncode, r.stderr)
    ok = cp_wi.kubectl("apply", "--dry-run=server", "-f", "-",
                       input=pdb.replace("apiVersion: policy/v1\n", "apiVersion: policy/v1beta1\n"), check=False)
    assert ok.returncode == 0, ok.stderr
