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
- RBAC, applied for real: `kubectl auth can-i --as system:serviceaccount:kube-system:<sa>` for a
  table of allowed and refused requests per component, and `can-i --list` minus what every
  service account may do equals exactly the component's rules (nothing more).
- The add-on run with its own service account's token: it takes and renews its Lease, its
  /healthz is 200 and its /readyz 503 while it cannot reconcile (as the readiness probe sees it),
  and the NMI probe's command exits non-zero on such a report; run with NMI's token it is
  refused the Lease."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request

import pytest

from conftest import keyless_bin, remember_secret, wait_for
from k8s_fabric import ControlPlane, Proc, k8s_script

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
CRDS = DEPLOY / "base" / "crds" / "crds.json"
OVERLAYS = ("standard", "managed")
IMAGE = "ghcr.io/keyless-dev/keyless:latest"
NS = "kube-system"
SA = f"system:serviceaccount:{NS}:"
PIA = "aadpodidentity.k8s.io"
KINDS = ("azureidentities", "azureidentitybindings", "azurepodidentityexceptions", "azureassignedidentities")
# the components of each overlay: (workload kind, name, service account, keyless subcommand)
COMPONENTS = {
    "standard": [("DaemonSet", "keyless-nmi", "keyless-nmi", "node"),
                 ("Deployment", "keyless-mic", "keyless-mic", "mic")],
    "managed": [("DaemonSet", "keyless-nmi", "keyless-nmi", "node"),
                ("Deployment", "keyless-pod-identity-addon", "keyless-pod-identity-addon", "pod-identity-addon")],
}


def can_run():
    return bool(shutil.which("etcd") and shutil.which("kubectl") and k8s_script() is not None)


@pytest.fixture(scope="module")
def cp():
    if not can_run():
        if os.environ.get("CI"):
            pytest.fail("CI must have etcd, kubectl and ../shared/k8s (or KEYLESS_K8S_DIR) for the manifest tests")
        pytest.skip("needs etcd, kubectl and a kube-apiserver (KEYLESS_K8S_DIR)")
    root = tempfile.mkdtemp(prefix="keyless-manifests-")
    c = None
    try:
        c = ControlPlane(root)
        c.root = pathlib.Path(root)
        # the README's first two steps: the CRDs, established, before anything typed by them
        c.kubectl("apply", "-k", str(DEPLOY / "base" / "crds"))
        c.kubectl("wait", "--for", "condition=established", "--timeout=60s", "-f", str(CRDS))
        yield c
    finally:
        if c is not None:
            c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def rendered(cp):
    """Per overlay, the objects as the server would store them (`apply --dry-run=server -o json`)."""
    out = {}
    for o in OVERLAYS:
        r = cp.kubectl("apply", "--dry-run=server", "-o", "json", "-k", str(DEPLOY / "overlays" / o))
        doc = json.loads(r.stdout)
        out[o] = doc["items"] if doc.get("kind") == "List" else [doc]
    return out


@pytest.fixture(scope="module")
def applied(cp, rendered):
    """Both overlays applied for real (no kubelet, no controllers: nothing runs; the RBAC objects
    are real). NMI's DaemonSet is the same object in both, the managed one is applied last."""
    for o in OVERLAYS:
        cp.kubectl("apply", "-k", str(DEPLOY / "overlays" / o))
    return cp


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
    assert kinds.count("CustomResourceDefinition") == 4, kinds
    assert {"DaemonSet", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
            "AzurePodIdentityException"} <= set(kinds), kinds
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
    }[overlay]
    crds = sorted(("CustomResourceDefinition", f"{k}.{PIA}") for k in KINDS)
    assert names == sorted(want + crds)
    for o in objs:
        if o["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == NS, o["metadata"]


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


@pytest.mark.parametrize("overlay", OVERLAYS)
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
    args = ["auth", "can-i", "--as", SA + sa, verb, resource]
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


@pytest.mark.parametrize("sa", sorted(ALLOWED))
def test_service_account_can_do_what_it_needs(applied, sa):
    refused = [c for c in ALLOWED[sa] if not can_i(applied, sa, *c)]
    assert refused == [], f"{sa} is refused {refused}"


@pytest.mark.parametrize("sa", sorted(REFUSED))
def test_service_account_can_do_nothing_more(applied, sa):
    allowed = [c for c in REFUSED[sa] if can_i(applied, sa, *c)]
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


def expected_rules(sa, ns):
    r = lambda v: set(v.split())
    read = r("get list watch")
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


@pytest.mark.parametrize("ns", [NS, "default"])
@pytest.mark.parametrize("sa", sorted(ALLOWED))
def test_service_account_rules_are_exactly_the_plan(applied, sa, ns):
    """Everything the account may do, minus what any service account may do (discovery, self
    reviews), is exactly its component's rules: in kube-system with its Lease, elsewhere
    without."""
    baseline = rules_list(applied, SA + "keyless-manifest-test-nobody", ns)
    got = {}
    for k, verbs in rules_list(applied, SA + sa, ns).items():
        extra = verbs - baseline.get(k, set())
        if extra:
            got[k] = extra
    want = expected_rules(sa, ns)
    more = {k: sorted(v - want.get(k, set())) for k, v in got.items() if v - want.get(k, set())}
    less = {k: sorted(v - got.get(k, set())) for k, v in want.items() if v - got.get(k, set())}
    assert (more, less) == ({}, {}), f"{sa} in {ns}: granted beyond the plan {more}, missing {less}"


# ------------------------------------------------------------- the add-on as its own account

def sa_kubeconfig(cp, sa, path):
    token = cp.kubectl("create", "token", sa, "-n", NS, "--duration", "1h").stdout.strip()
    assert token.count(".") == 2, token[:20]
    remember_secret(token)
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "k", "cluster": {"server": cp.env["K8S_API_URL"],
                                               "certificate-authority": cp.env["K8S_CA_FILE"]}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "k", "user": sa, "namespace": NS}}],
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


def find_workload_args(cp):
    r = cp.kubectl("get", "deployment", "keyless-pod-identity-addon", "-n", NS, "-o", "json")
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
