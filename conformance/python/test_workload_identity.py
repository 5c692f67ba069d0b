"""Workload identity end to end on a real Kubernetes API server (issue 15): a cluster resource with
the OIDC issuer and workload identity enabled (`keyless aks create --enable-oidc-issuer
--enable-workload-identity`), kube-apiserver started with the issuer URL Keyless serves, a node
(a network namespace with its host agent, so in-cluster processes get the kubelet identity from
IMDS), the cluster add-on publishing the API server's service-account keys to Keyless and setting
readiness conditions, and `keyless wi-webhook` registered as the cluster's mutating webhook.

The test plays kubelet: it reads the projected token volume the webhook put in the stored pod,
mints that token with the TokenRequest API exactly as the kubelet would (audience, expiry, bound
to the pod), writes it at the volume's path inside the pod's mount namespace, and runs the
unmodified SDKs in the pod's network namespace with the pod's environment."""
import base64
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import keyless_bin, run_client, wait_for
from k8s_fabric import ControlPlane, PodNs, Proc
from test_pod_identity import running_fabric

ARM = "https://management.azure.com"
EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
HERE = pathlib.Path(__file__).resolve().parent
READY = "keyless.dev/workload-identity-ready"


def b64url_json(part):
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


class Wi:
    """The running cluster and the helpers the tests share."""

    def __init__(self, fab, cluster, issuer, kubelet, node):
        self.fab, self.cluster, self.issuer, self.kubelet, self.node = fab, cluster, issuer, kubelet, node
        self.cp = fab.cp
        self.identities = {}
        self.pods = {}

    def identity(self, name, subject=None):
        """A user-assigned identity, with a federated credential for `subject` on this cluster's
        issuer (the seed-003 command, as written)."""
        ident = self.fab.cli("identity", "create", "-g", "wiIdentities", "-n", name)
        if subject:
            self.fab.cli("identity", "federated-credential", "create", "--name", f"{name}-fic",
                         "--identity-name", name, "--resource-group", "wiIdentities",
                         "--issuer", self.issuer, "--subject", subject, "--audience", EXCHANGE_AUDIENCE)
        self.identities[name] = ident
        return ident

    def service_account(self, namespace, name, client_id, annotations=None):
        self.cp.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        ann = {"azure.workload.identity/client-id": client_id, **(annotations or {})}
        self.cp.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": {"name": name, "namespace": namespace, "annotations": ann}})

    def create_pod(self, namespace, name, sa, labels=None, annotations=None, containers=None, host_network=False):
        """Create the pod (the webhook answers the API server's admission call) and return the
        object as stored."""
        spec = {"nodeName": "aks-nodepool1-0", "serviceAccountName": sa,
                "containers": containers or [{"name": "app", "image": "python:3-slim"}]}
        if host_network:
            spec["hostNetwork"] = True
        obj = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": namespace, "labels": labels or {},
                            "annotations": annotations or {}},
               "spec": spec}
        out = self.cp.kubectl("create", "-f", "-", input=json.dumps(obj), check=False)
        if out.returncode != 0:
            return {"refused": out.stderr}
        return self.cp.get("pod", name, "-n", namespace)

    def projected_token(self, pod):
        """What the kubelet does for the pod's `azure-identity-token` volume: a TokenRequest for
        the pod's service account, with the volume's audience and expiry, bound to the pod."""
        vol = next(v for v in pod["spec"]["volumes"] if v["name"] == "azure-identity-token")
        src = vol["projected"]["sources"][0]["serviceAccountToken"]
        md = pod["metadata"]
        req = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"audiences": [src["audience"]], "expirationSeconds": src["expirationSeconds"],
                        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": md["name"], "uid": md["uid"]}}}
        out = self.cp.request("POST", f"/api/v1/namespaces/{md['namespace']}/serviceaccounts/"
                                      f"{pod['spec']['serviceAccountName']}/token", req)
        return src["path"], out["status"]["token"]

    def run_pod(self, pod, name):
        """The pod's network namespace (its IP reported in its status, as a CNI plugin and the
        kubelet would) and a directory for its token volume."""
        ns = PodNs(self.node, self.fab.uid)
        self.fab.pods.append(ns)
        md = pod["metadata"]
        status = {"status": {"phase": "Running", "podIP": ns.ip, "podIPs": [{"ip": ns.ip}]}}
        self.cp.kubectl("patch", "pod", md["name"], "-n", md["namespace"], "--subresource=status", "--type=merge",
                        "-p", json.dumps(status))
        tokens = pathlib.Path(self.fab.root) / f"tokens-{name}"
        tokens.mkdir(exist_ok=True)
        return ns, tokens

    def container_env(self, pod, container="app"):
        c = next(c for c in pod["spec"]["containers"] if c["name"] == container)
        return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}

    def in_pod(self, ns, tokens, mount_path="/var/run/secrets/azure/tokens"):
        """A command prefix: the pod's network namespace and a mount namespace in which the
        token volume is at its path (a tmpfs on /run, so nothing is made on the host's)."""
        return (*ns.prefix(), "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs tmpfs /run && mkdir -p "$1" && mount --bind "$0" "$1" && shift && exec "$@"',
                str(tokens), mount_path)

    def python(self, prefix, env, args):
        """client.py in the pod with exactly the pod's environment (and the CA, which the
        platform team distributes)."""
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(),
                "REQUESTS_CA_BUNDLE": self.fab.up.info["caFile"], **env}
        cmd = [*prefix, "env", "-i", *[f"{k}={v}" for k, v in full.items()], sys.executable,
               str(HERE / "client.py"), json.dumps(args)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])

    def node_client(self, prefix, env, args):
        from test_node_identity import NODE_CLIENT, node_modules
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(),
                "KEYLESS_NODE_MODULES": node_modules(), "NODE_EXTRA_CA_CERTS": self.fab.up.info["caFile"], **env}
        cmd = [*prefix, "env", "-i", *[f"{k}={v}" for k, v in full.items()], shutil.which("node") or "node",
               str(NODE_CLIENT), json.dumps(args)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def exchange(self, client_id, assertion):
        """The token endpoint, asked directly (for refusals: the AADSTS code of the answer)."""
        import ssl
        import urllib.error
        import urllib.parse
        import urllib.request
        up = self.fab.up
        form = urllib.parse.urlencode({
            "grant_type": "client_credentials", "client_id": client_id, "scope": ARM + "/.default",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}).encode()
        ctx = ssl.create_default_context(cafile=up.info["caFile"])
        req = urllib.request.Request(f"{up.info['serverUrl']}/{up.info['tenantId']}/oauth2/v2.0/token", data=form)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def arm(self, method, path, body=None):
        """One control-plane call as the admin (client credentials at the token endpoint)."""
        import ssl
        import urllib.parse
        import urllib.request
        up = self.fab.up
        ctx = ssl.create_default_context(cafile=up.info["caFile"])
        form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": up.info["adminClientId"],
                                       "client_secret": up.admin_secret, "scope": ARM + "/.default"}).encode()
        req = urllib.request.Request(f"{up.info['serverUrl']}/{up.info['tenantId']}/oauth2/v2.0/token", data=form)
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            token = json.load(r)["access_token"]
        req = urllib.request.Request(up.info["serverUrl"] + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return json.load(r)

    def condition(self, namespace, name):
        pod = self.cp.get("pod", name, "-n", namespace) or {}
        for c in pod.get("status", {}).get("conditions", []):
            if c["type"] == READY:
                return c
        return None


@pytest.fixture(scope="module")
def wi():
    with running_fabric("keyless-wi-", control_plane=False, public_on_node=True) as fab:
        cli = fab.cli
        cli("group", "create", "--name", "wiRG", "--location", "eastus")
        cli("group", "create", "--name", "wiIdentities", "--location", "eastus")
        cluster = cli("aks", "create", "-g", "wiRG", "-n", "wiCluster", "--node-count", "1",
                      "--enable-oidc-issuer", "--enable-workload-identity")
        # seed 003's form
        issuer = cli("aks", "show", "-g", "wiRG", "-n", "wiCluster", "--query", "oidcIssuerProfile.issuerUrl",
                     "-o", "tsv").strip()
        assert issuer.startswith(fab.server_for(fab.nodes[0]) + "/oidc/") and issuer.endswith("/"), issuer
        assert cluster["properties"]["securityProfile"]["workloadIdentity"]["enabled"] is True
        # the API server signs service-account tokens as Keyless's issuer for this cluster
        fab.cp = ControlPlane(fab.root, extra_args=[f"--service-account-issuer={issuer}",
                                                     f"--service-account-jwks-uri={issuer}openid/v1/jwks"])
        kubelet = cluster["properties"]["identityProfile"]["kubeletidentity"]
        node = fab.nodes[0]
        token = cli("aks", "nodepool", "join-token", "-g", "wiRG", "--cluster-name", "wiCluster",
                    "-n", "nodepool1")["joinToken"]
        state = pathlib.Path(fab.root) / "state-node0"
        fab.procs.append(Proc([*node.prefix(), keyless_bin(), "node", "--server", fab.server_for(node),
                               "--ca-file", fab.up.info["caFile"], "--state-dir", str(state),
                               "--imds-listen", "169.254.169.254:80", "--sync-interval", "1"],
                              "IMDS endpoint:", pathlib.Path(fab.root) / "node0.log",
                              env=dict(os.environ, KEYLESS_JOIN_TOKEN=token)))
        kubeconfig = fab.cp.node_kubeconfig(pathlib.Path(fab.root) / "kubeconfig-node0")
        # the add-on proves its publishes with tokens the API server mints for its own service
        # account (what the install manifests create)
        fab.cp.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                      "metadata": {"name": "keyless-pod-identity-addon", "namespace": "kube-system"}})
        common = ["--cluster-id", cluster["id"], "--server", fab.server_for(node), "--ca-file",
                  fab.up.info["caFile"], "--client-id", kubelet["clientId"], "--kubeconfig", kubeconfig]
        fab.procs.append(Proc([*node.prefix(), keyless_bin(), "cluster-addon", *common,
                               "--profile-poll", "1", "--jwks-sync-interval", "1", "--readiness-poll", "1"],
                              "workload identity: caches listed", pathlib.Path(fab.root) / "addon.log"))
        port = 9443
        fab.procs.append(Proc([*node.prefix(), keyless_bin(), "wi-webhook", *common,
                               "--listen", f"{node.ns_ip}:{port}", "--tls-san", node.ns_ip,
                               "--tenant-id", fab.up.info["tenantId"],
                               "--authority-host", fab.server_for(node) + "/",
                               "--proxy-image", "keyless:test", "--metrics-listen", "off"],
                              "Workload identity webhook listening on", pathlib.Path(fab.root) / "webhook.log"))
        # the registration the install manifests make, with a URL (no Service without a kubelet);
        # the webhook fills caBundle with its CA from Keyless
        fab.cp.apply({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "azure-wi-webhook-mutating-webhook-configuration"},
            "webhooks": [{
                "name": "mutation.azure-workload-identity.io",
                "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
                "reinvocationPolicy": "IfNeeded", "timeoutSeconds": 10,
                "clientConfig": {"url": f"https://{node.ns_ip}:{port}/mutate-v1-pod"},
                "objectSelector": {"matchLabels": {"azure.workload.identity/use": "true"}},
                "namespaceSelector": {"matchExpressions": [
                    {"key": "admission.keyless.dev/ignore", "operator": "DoesNotExist"}]},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                           "resources": ["pods"], "scope": "*"}],
            }],
        })

        def ca_bundle():
            cfg = fab.cp.get("mutatingwebhookconfiguration", "azure-wi-webhook-mutating-webhook-configuration")
            return cfg and cfg["webhooks"][0]["clientConfig"].get("caBundle")
        wait_for(ca_bundle, what="the webhook's CA in its configuration")
        w = Wi(fab, cluster, issuer, kubelet, node)
        # the add-on published the API server's keys: Keyless serves them at the issuer
        wait_for(lambda: w.jwks_matches_api_server(), what="the API server's keys at Keyless's issuer")
        yield w


def served_jwks(w):
    import ssl
    import urllib.request
    ctx = ssl.create_default_context(cafile=w.fab.up.info["caFile"])
    with urllib.request.urlopen(w.issuer + ".well-known/openid-configuration", context=ctx) as r:
        doc = json.load(r)
    assert doc["issuer"] == w.issuer
    with urllib.request.urlopen(doc["jwks_uri"], context=ctx) as r:
        return json.load(r)


def _jwks_matches(self):
    api = self.cp.request("GET", "/openid/v1/jwks")
    mine = served_jwks(self)
    return sorted(k["kid"] for k in api["keys"]) == sorted(k["kid"] for k in mine["keys"])


Wi.jwks_matches_api_server = _jwks_matches


def test_labelled_pod_is_mutated_and_every_sdk_exchanges_its_projected_token(wi):
    ident = wi.identity("web-identity", "system:serviceaccount:app:web")
    wi.service_account("app", "web", ident["properties"]["clientId"])
    pod = wi.create_pod("app", "web-0", "web", labels={"azure.workload.identity/use": "true"})
    env = wi.container_env(pod)
    assert env["AZURE_CLIENT_ID"] == ident["properties"]["clientId"]
    assert env["AZURE_TENANT_ID"] == wi.fab.up.info["tenantId"]
    assert env["AZURE_FEDERATED_TOKEN_FILE"] == "/var/run/secrets/azure/tokens/azure-identity-token"
    assert env["AZURE_AUTHORITY_HOST"] == wi.fab.server_for(wi.node) + "/"
    vol = next(v for v in pod["spec"]["volumes"] if v["name"] == "azure-identity-token")
    src = vol["projected"]["sources"][0]["serviceAccountToken"]
    assert src == {"audience": EXCHANGE_AUDIENCE, "expirationSeconds": 3600, "path": "azure-identity-token"}
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "azure-identity-token", "mountPath": "/var/run/secrets/azure/tokens", "readOnly": True} in mounts

    ns, tokens = wi.run_pod(pod, "web-0")
    path, token = wi.projected_token(pod)
    (tokens / path).write_text(token)
    claims = b64url_json(token.split(".")[1])
    assert claims["iss"] == wi.issuer and claims["sub"] == "system:serviceaccount:app:web"
    assert claims["aud"] == [EXCHANGE_AUDIENCE]
    assert claims["kubernetes.io"]["pod"]["uid"] == pod["metadata"]["uid"]
    prefix = wi.in_pod(ns, tokens)
    for credential in ("wi", "dac"):
        got = wi.python(prefix, env, {"credential": credential, "scope": ARM + "/.default"})
        assert "token" in got, got
        verified = wi.fab.verify(got["token"])
        assert verified["oid"] == ident["properties"]["principalId"], verified
        assert verified["appid"] == ident["properties"]["clientId"]
    # node @azure/identity (instance discovery off: it would ask login.microsoftonline.com)
    for credential in ("wi", "dac"):
        got = wi.node_client(prefix, env, {"credential": credential, "scope": ARM + "/.default",
                                           "options": {"disableInstanceDiscovery": True}})
        assert got.get("token"), got
        assert wi.fab.verify(got["token"])["oid"] == ident["properties"]["principalId"]
    wi.pods["web-0"] = (pod, ns, tokens, env)


def test_signing_key_rotation_is_republished_and_new_tokens_exchange(wi):
    if "web-0" not in wi.pods:
        pytest.skip("needs the first test's pod")
    pod, ns, tokens, env = wi.pods["web-0"]
    before = {k["kid"] for k in served_jwks(wi)["keys"]}
    wi.cp.rotate_signing_key()
    wait_for(lambda: wi.jwks_matches_api_server() and {k["kid"] for k in served_jwks(wi)["keys"]} != before,
             what="the rotated key published")
    path, token = wi.projected_token(pod)
    header = b64url_json(token.split(".")[0])
    assert header["kid"] not in before, "the new token must be signed with the new key"
    (tokens / path).write_text(token)
    got = wi.python(wi.in_pod(ns, tokens), env, {"credential": "wi", "scope": ARM + "/.default"})
    assert wi.fab.verify(got["token"])["oid"] == wi.identities["web-identity"]["properties"]["principalId"]


def sign_rs256(key_path, claims, kid):
    """A JWT signed with an RSA key file (what a stolen or foreign key would make)."""
    header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": kid, "typ": "JWT"}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    signing_input = header + b"." + body
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key_path)], input=signing_input,
                         capture_output=True, check=True).stdout
    return (signing_input + b"." + base64.urlsafe_b64encode(sig).rstrip(b"=")).decode()


def test_refusals(wi):
    ident = wi.identity("strict-identity", "system:serviceaccount:app:strict")
    client_id = ident["properties"]["clientId"]
    wi.service_account("app", "strict", client_id)
    wi.service_account("app", "other", client_id)
    # a service account the credential does not name: its genuine token is refused
    pod = wi.create_pod("app", "other-0", "other", labels={"azure.workload.identity/use": "true"})
    _, token = wi.projected_token(pod)
    status, body = wi.exchange(client_id, token)
    assert (status, body.get("error_codes")) == (401, [700213]), body
    # a token for another audience (the API server's own)
    md = pod["metadata"]
    req = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
           "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600,
                    "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": md["name"], "uid": md["uid"]}}}
    strict = wi.create_pod("app", "strict-0", "strict", labels={"azure.workload.identity/use": "true"})
    smd = strict["metadata"]
    req["spec"]["boundObjectRef"].update(name=smd["name"], uid=smd["uid"])
    other_aud = wi.cp.request("POST", "/api/v1/namespaces/app/serviceaccounts/strict/token", req)["status"]["token"]
    status, body = wi.exchange(client_id, other_aud)
    assert (status, body.get("error_codes")) == (401, [700212]), body
    # an expired token, signed by the API server's own current key
    key = sorted(pathlib.Path(wi.cp.dir).glob("sa-rotated-*.key")) or [pathlib.Path(wi.cp.dir) / "sa.key"]
    kid = b64url_json(wi.projected_token(strict)[1].split(".")[0])["kid"]
    now = int(time.time())
    expired = sign_rs256(key[-1], {"iss": wi.issuer, "sub": "system:serviceaccount:app:strict",
                                   "aud": [EXCHANGE_AUDIENCE], "iat": now - 7200, "nbf": now - 7200,
                                   "exp": now - 3600}, kid)
    status, body = wi.exchange(client_id, expired)
    assert (status, body.get("error_codes")) == (401, [700024]), body
    # the genuine token of the right service account works (the refusals above are not noise)
    status, body = wi.exchange(client_id, wi.projected_token(strict)[1])
    assert status == 200, body
    # another cluster's token: its own issuer, its own key, the same namespace and name
    other = wi.fab.cli("aks", "create", "-g", "wiRG", "-n", "otherCluster", "--node-count", "1",
                       "--enable-oidc-issuer")
    other_issuer = other["properties"]["oidcIssuerProfile"]["issuerUrl"]
    # the other cluster is real: its API server's key published for its own issuer, and an
    # identity federated to its `app:strict` exchanges that cluster's token (the positive control)
    foreign_key = pathlib.Path(wi.fab.root) / "foreign.key"
    subprocess.run(["openssl", "genrsa", "-out", str(foreign_key), "2048"], check=True, capture_output=True)
    wi.arm("POST", f"{other['id']}/publishServiceAccountKeys?api-version=2026-08-01",
           {"keys": [rsa_jwk(foreign_key, "foreign")]})
    theirs = wi.fab.cli("identity", "create", "-g", "wiIdentities", "-n", "other-cluster-identity")
    wi.fab.cli("identity", "federated-credential", "create", "--name", "other-fic", "--identity-name",
               "other-cluster-identity", "--resource-group", "wiIdentities", "--issuer", other_issuer,
               "--subject", "system:serviceaccount:app:strict")
    foreign = sign_rs256(foreign_key, {"iss": other_issuer, "sub": "system:serviceaccount:app:strict",
                                       "aud": [EXCHANGE_AUDIENCE], "iat": now, "nbf": now, "exp": now + 600}, "foreign")
    status, body = wi.exchange(theirs["properties"]["clientId"], foreign)
    assert status == 200, body
    # the same namespace and name from the other cluster: not this identity's (its issuer differs)
    status, body = wi.exchange(client_id, foreign)
    assert (status, body.get("error_codes")) == (401, [700211]), body
    # the other cluster's key does not verify this cluster's issuer, even with this issuer's kid
    # or its own: each issuer's tokens verify only against the keys published for it
    for k in (kid, "foreign"):
        forged = sign_rs256(foreign_key, {"iss": wi.issuer, "sub": "system:serviceaccount:app:strict",
                                          "aud": [EXCHANGE_AUDIENCE], "iat": now, "nbf": now, "exp": now + 600}, k)
        status, body = wi.exchange(client_id, forged)
        assert (status, body.get("error_codes")) == (401, [700027]), body


def rsa_jwk(key_path, kid):
    """The public JWK of an RSA key file (what an API server's /openid/v1/jwks lists)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    pub = load_pem_private_key(pathlib.Path(key_path).read_bytes(), password=None).public_key().public_numbers()

    def b64(n):
        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()
    return {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": b64(pub.n), "e": b64(pub.e)}


def test_kube_system_and_unlabelled_pods_are_never_mutated(wi):
    ident = wi.identity("sys-identity")
    wi.service_account("kube-system", "sys", ident["properties"]["clientId"])
    wi.service_account("app", "plain", ident["properties"]["clientId"])
    sys_pod = wi.create_pod("kube-system", "sys-0", "sys", labels={"azure.workload.identity/use": "true"})
    plain = wi.create_pod("app", "plain-0", "plain")
    for pod in (sys_pod, plain):
        assert "refused" not in pod, pod
        assert not any(v["name"] == "azure-identity-token" for v in pod["spec"].get("volumes", []))
        assert not any(e["name"].startswith("AZURE_") for c in pod["spec"]["containers"] for e in c.get("env", []))


def test_readiness_gate_goes_true_only_once_the_exchange_would_succeed(wi):
    ident = wi.identity("late-identity")
    wi.service_account("team-a", "late", ident["properties"]["clientId"])
    pod = wi.create_pod("team-a", "late-0", "late", labels={"azure.workload.identity/use": "true"},
                        annotations={"keyless.dev/identity-readiness-gate": "true"})
    assert {"conditionType": READY} in pod["spec"]["readinessGates"]
    cond = wait_for(lambda: wi.condition("team-a", "late-0"), what="the readiness condition")
    assert cond["status"] == "False", cond
    _, token = wi.projected_token(pod)
    status, body = wi.exchange(ident["properties"]["clientId"], token)
    assert (status, body.get("error_codes")) == (401, [700211]), body
    time.sleep(3)
    assert wi.condition("team-a", "late-0")["status"] == "False"
    # a namespace-wide pattern (beyond the 20-credential cap) federates every account of team-a
    wi.fab.cli("identity", "federated-credential-pattern", "create", "--name", "team-a-all",
               "--identity-name", "late-identity", "--resource-group", "wiIdentities", "--issuer", wi.issuer,
               "--subject-pattern", "system:serviceaccount:team-a:*")
    wait_for(lambda: (wi.condition("team-a", "late-0") or {}).get("status") == "True", what="the condition True")
    status, body = wi.exchange(ident["properties"]["clientId"], token)
    assert status == 200, body


def test_pattern_needs_its_own_action_and_stays_in_its_namespace(wi):
    ident = wi.identity("pattern-identity")
    client_id = ident["properties"]["clientId"]
    wi.fab.cli("identity", "federated-credential-pattern", "create", "--name", "team-b-all",
               "--identity-name", "pattern-identity", "--resource-group", "wiIdentities", "--issuer", wi.issuer,
               "--subject-pattern", "system:serviceaccount:team-b:*")
    wi.service_account("team-b", "any", client_id)
    wi.service_account("team-c", "any", client_id)
    ok = wi.create_pod("team-b", "any-0", "any", labels={"azure.workload.identity/use": "true"})
    no = wi.create_pod("team-c", "any-0", "any", labels={"azure.workload.identity/use": "true"})
    assert wi.exchange(client_id, wi.projected_token(ok)[1])[0] == 200
    status, body = wi.exchange(client_id, wi.projected_token(no)[1])
    assert (status, body.get("error_codes")) == (401, [700213]), body
    # a Managed Identity Contributor may add exact credentials, not patterns
    app = wi.fab.cli("app", "create", "--display-name", "wi-contributor")
    wi.fab.cli("role", "assignment", "create", "--role", "Managed Identity Contributor", "--assignee",
               app["appId"], "--scope", ident["id"])
    env = {**wi.fab.admin_env(), "KEYLESS_CLIENT_ID": app["appId"], "KEYLESS_CLIENT_SECRET": app["password"],
           "KEYLESS_SUBSCRIPTION_ID": ident["id"].split("/")[2]}
    base = ["--identity-name", "pattern-identity", "--resource-group", "wiIdentities", "--issuer", wi.issuer]
    out = subprocess.run([keyless_bin(), "identity", "federated-credential", "create", "--name", "exact-one",
                          *base, "--subject", "system:serviceaccount:team-c:any"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([keyless_bin(), "identity", "federated-credential-pattern", "create", "--name", "team-c-all",
                          *base, "--subject-pattern", "system:serviceaccount:team-c:*"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "AuthorizationFailed" in out.stderr, out.stderr


def test_proxy_sidecar_answers_imds_from_the_projected_token(wi):
    ident = wi.identity("legacy-identity", "system:serviceaccount:legacy:old")
    wi.service_account("legacy", "old", ident["properties"]["clientId"])
    ann = {"azure.workload.identity/inject-proxy-sidecar": "true"}
    refused = wi.create_pod("legacy", "old-host", "old", labels={"azure.workload.identity/use": "true"},
                            annotations=ann, host_network=True)
    assert "refused" in refused and "hostNetwork" in refused["refused"], refused
    pod = wi.create_pod("legacy", "old-0", "old", labels={"azure.workload.identity/use": "true"}, annotations=ann)
    init = pod["spec"]["initContainers"][0]
    sidecar = pod["spec"]["containers"][0]
    assert init["name"] == "azwi-proxy-init" and sidecar["name"] == "azwi-proxy", pod["spec"]
    ns, tokens = wi.run_pod(pod, "old-0")
    path, token = wi.projected_token(pod)
    (tokens / path).write_text(token)
    # as the kubelet: the init container to completion, then the sidecar, in the pod
    def command(c):
        cmd = [*c.get("command", []), *c.get("args", [])]
        assert cmd[0] == "keyless", cmd
        return [keyless_bin(), *cmd[1:]]
    out = subprocess.run([*ns.prefix(), *command(init)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    sidecar_env = {**wi.container_env(pod, "azwi-proxy"), "KEYLESS_CA_FILE": wi.fab.up.info["caFile"]}
    proxy = Proc([*wi.in_pod(ns, tokens), "env", "-i", *[f"{k}={v}" for k, v in sidecar_env.items()],
                  *command(sidecar)], "wi-proxy: listening on", pathlib.Path(wi.fab.root) / "proxy.log")
    wi.fab.procs.append(proxy)
    # the old code: ManagedIdentityCredential with no environment at all
    got = run_client({"credential": "mi", "scope": ARM + "/.default"}, prefix=ns.prefix(), clean_env=True)
    assert "token" in got, got
    assert wi.fab.verify(got["token"])["oid"] == ident["properties"]["principalId"]
