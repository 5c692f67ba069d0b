"""One host agent, every local endpoint style the SDKs know (issue 7, seed 001):

* the legacy VM-extension endpoint (`localhost:<port>/oauth2/token`), served while the VM carries
  the `Microsoft.ManagedIdentity` extension and stopped when it is removed, with seed 001's
  request (GET query or POST form, `Metadata: true`) and response (`refresh_token: ""`); at most
  32 user-assigned identities are reachable there while IMDS serves all of them;
* App Service (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`): python and node `ManagedIdentityCredential`,
  and the refusals for a missing or wrong `X-IDENTITY-HEADER`;
* Azure Arc (`IDENTITY_ENDPOINT` + `IMDS_ENDPOINT`): python and node `ManagedIdentityCredential`
  as root, as a user in the configured group, and refused for a user outside it.

Every token is verified against the tenant's JWKS."""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid

import pytest

from conftest import KvEnv, keyless_bin, run_client, start_up, wait_audit
from test_node_identity import node_modules

ARM = "https://management.azure.com"
NODE_CLIENT = pathlib.Path(__file__).resolve().parents[1] / "node" / "client.mjs"
ARC_GROUP = 100  # "users" on Debian


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class LegacyHost:
    def __init__(self, up, workdir):
        self.up = up
        self.kv = KvEnv(up, workdir)  # admin CLI helpers
        self.dir = pathlib.Path(workdir)
        self.vm = f"legacy-{uuid.uuid4().hex[:6]}"
        self.ids = []
        self.proc = None
        self.lines = []

    def start(self):
        kv = self.kv
        self.ua = kv.cli("identity", "create", "-g", "keyless", "-n", f"ua-{self.vm}")
        kv.cli("vm", "create", "-g", "keyless", "-n", self.vm, "--assign-identity", "[system]", f"ua-{self.vm}")
        token = kv.cli("vm", "join-token", "-g", "keyless", "-n", self.vm)["joinToken"]
        cmd = [keyless_bin(), "node", "--server", self.up.info["serverUrl"], "--ca-file", self.up.info["caFile"],
               "--state-dir", str(self.dir / "node"), "--join-token", token,
               "--imds-listen", "127.0.0.1:0", "--sync-interval", "1",
               "--endpoints", "imds,extension,appservice,arc",
               "--appservice-listen", "127.0.0.1:0", "--arc-listen", "127.0.0.1:0", "--arc-group", str(ARC_GROUP)]
        self.log = open(self.dir / "node.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not any(l.startswith("Arc endpoint") for l in self.lines):
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {self.lines}")
            if line:
                self.lines.append(line.strip())
        out = {}
        for l in self.lines:
            if l.startswith("IMDS endpoint:"):
                out["imds"] = l.split(": ", 1)[1]
            for kind in ("App Service endpoint:", "Arc endpoint:"):
                if l.startswith(kind):
                    for part in l.split("export ", 1)[1].split(" "):
                        k, _, v = part.partition("=")
                        out.setdefault(kind, {})[k] = v
        self.imds = out["imds"]
        app = out["App Service endpoint:"]
        self.app_endpoint = app["IDENTITY_ENDPOINT"]
        self.app_header = (self.dir / "node" / "identity-header").read_text()
        self.arc = out["Arc endpoint:"]
        self.system = kv.cli("vm", "show", "-g", "keyless", "-n", self.vm)["identity"]["principalId"]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def host():
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run as root (Arc key files live in /var/opt/azcmagent/tokens)")
        pytest.skip("needs root")
    d = tempfile.mkdtemp(prefix="keyless-local-")
    started = time.time()
    up = start_up(pathlib.Path(d) / "data", extra=("--sync-interval", "1"))
    h = LegacyHost(up, d)
    try:
        h.start()
        yield h
    finally:
        h.stop()
        up.stop()
        shutil.rmtree(d, ignore_errors=True)
        # the agent removes unused key files when it stops; anything left is a leak
        tokens = pathlib.Path("/var/opt/azcmagent/tokens")
        leaked = [p for p in tokens.glob("*.key") if p.stat().st_mtime >= started - 1] if tokens.is_dir() else []
        for p in leaked:
            p.unlink()
        assert not leaked, f"Arc key files left behind: {leaked}"


def verify(up):
    return {"authority": up.authority, "ca": up.info["caFile"], "audience": ARM}


def py_client(host, env, kwargs=None, user=None):
    args = {"credential": "mi", "kwargs": kwargs or {}, "scope": ARM + "/.default", "verify": verify(host.up)}
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(), **env}
    prefix = []
    python = sys.executable
    if user:
        prefix = ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}",
                  f"--groups={','.join(map(str, user[2]))}" if user[2] else "--clear-groups"]
        # the venv's interpreter may sit under /root; an unprivileged user runs the system
        # interpreter of the same version with the venv's packages
        python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        if not os.path.exists(python):
            pytest.skip(f"{python} is needed to run the SDK as another user")
        base["PYTHONPATH"] = next(p for p in sys.path if p.endswith("site-packages"))
    cmd = [*prefix, "env", "-i", *[f"{k}={v}" for k, v in base.items()], python,
           str(pathlib.Path(__file__).resolve().parent / "client.py"), json.dumps(args)]
    if user:
        # the CA lives in a root-only data dir: verify the token here instead
        cmd[-1] = json.dumps({k: v for k, v in args.items() if k != "verify"})
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    assert lines, f"no JSON: {out.stdout} {out.stderr}"
    got = json.loads(lines[-1])
    if user and "token" in got:
        got["claims"] = run_client({"verify_token": got["token"], "verify": verify(host.up)})["claims"]
    return got


def node_client(host, env, options=None):
    proc_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(),
                "KEYLESS_NODE_MODULES": node_modules(), "NODE_EXTRA_CA_CERTS": host.up.info["caFile"], **env}
    args = {"credential": "mi", "options": options or {}, "scope": ARM + "/.default",
            "verify": {"authority": host.up.authority, "audience": ARM}}
    cmd = ["env", "-i", *[f"{k}={v}" for k, v in proc_env.items()], shutil.which("node") or "node",
           str(NODE_CLIENT), json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def http(url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null"), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), {k.lower(): v for k, v in e.headers.items()}


# ---------------------------------------------------------------- App Service

def test_app_service_python_and_node(host):
    env = {"IDENTITY_ENDPOINT": host.app_endpoint, "IDENTITY_HEADER": host.app_header}
    out = py_client(host, env)
    assert "error" not in out, out
    assert out["claims"]["oid"] == host.system
    out = node_client(host, env)
    assert out.get("verified"), out
    assert out["claims"]["oid"] == host.system
    # user-assigned, by client id and by resource id (mi_res_id)
    ua = host.ua["properties"]
    out = py_client(host, env, {"client_id": ua["clientId"]})
    assert out["claims"]["oid"] == ua["principalId"], out
    out = node_client(host, env, {"resourceId": host.ua["id"]})
    assert out.get("verified") and out["claims"]["oid"] == ua["principalId"], out


def test_app_service_refuses_a_missing_or_wrong_header(host):
    url = f"{host.app_endpoint}?api-version=2019-08-01&resource={urllib.parse.quote(ARM)}"
    st, body, _ = http(url)
    assert st == 401 and body["statusCode"] == 401, body
    st, body, _ = http(url, headers={"X-IDENTITY-HEADER": "not-the-secret"})
    assert st == 401, body
    st, body, _ = http(url, headers={"X-IDENTITY-HEADER": host.app_header})
    assert st == 200 and "expires_in" not in body and body["expires_on"].isdigit(), body
    # both refusals and the issuance are in the node's audit trail, with the local caller
    audit = host.dir / "node" / "audit.log"

    def app(outcome, status, reason):
        return lambda r: (r.get("surface") == "appservice" and r["outcome"] == outcome and r["status"] == status
                          and r.get("reason") == reason and r["caller"]["peer"].startswith("127.0.0.1:")
                          and r["caller"].get("uid") == os.geteuid())
    wait_audit(audit, "App Service refusals", app("refused", 401, "unauthorized"), count=2)
    wait_audit(audit, "App Service issuance", app("issued", 200, None))
    # the secret file is for root only
    assert oct((host.dir / "node" / "identity-header").stat().st_mode & 0o777) == "0o600"


# ---------------------------------------------------------------- Arc

def test_arc_python_and_node_as_root(host):
    env = dict(host.arc)
    out = py_client(host, env)
    assert "error" not in out, out
    assert out["claims"]["oid"] == host.system
    out = node_client(host, env)
    assert out.get("verified"), out
    ua = host.ua["properties"]
    out = py_client(host, env, {"client_id": ua["clientId"]})
    assert out["claims"]["oid"] == ua["principalId"], out
    out = node_client(host, env, {"clientId": ua["clientId"]})
    assert out.get("verified") and out["claims"]["oid"] == ua["principalId"], out


def test_arc_member_of_the_group_gets_a_token_and_others_do_not(host):
    env = dict(host.arc)
    member = py_client(host, env, user=(65534, 65534, [ARC_GROUP]))
    assert "error" not in member, member
    assert member["claims"]["oid"] == host.system
    outsider = py_client(host, env, user=(65534, 65534, []))
    assert "error" in outsider, outsider
    # the member's token is recorded with the uid that asked
    audit = host.dir / "node" / "audit.log"
    wait_audit(audit, "the Arc member's issuance", lambda r: r.get("surface") == "arc" and r["outcome"] == "issued"
               and r["caller"].get("uid") == 65534)
    # the challenge names a key file in the tokens directory, 0640, and a used key is gone
    st, _, headers = http(f"{env['IDENTITY_ENDPOINT']}?api-version=2020-06-01&resource={urllib.parse.quote(ARM)}",
                          headers={"Metadata": "true"})
    assert st == 401
    realm = headers["www-authenticate"].split("=", 1)[1]
    assert realm.startswith("/var/opt/azcmagent/tokens/") and realm.endswith(".key")
    key = pathlib.Path(realm)
    assert oct(key.stat().st_mode & 0o777) == "0o640" and key.stat().st_gid == ARC_GROUP
    content = key.read_text()
    url = f"{env['IDENTITY_ENDPOINT']}?api-version=2020-06-01&resource={urllib.parse.quote(ARM)}"
    st, body, _ = http(url, headers={"Metadata": "true", "Authorization": f"Basic {content}"})
    assert st == 200 and body["access_token"], body
    assert not key.exists()
    st, _, _ = http(url, headers={"Metadata": "true", "Authorization": f"Basic {content}"})
    assert st == 401, "a key is good once"
    wait_audit(audit, "a used Arc key", lambda r: r.get("surface") == "arc" and r["outcome"] == "refused"
               and r["status"] == 401 and r["reason"] == "unauthorized")


# ---------------------------------------------------------------- VM extension

def test_vm_extension_endpoint_follows_the_extension(host):
    kv = host.kv
    port = free_port()
    url = f"http://localhost:{port}/oauth2/token"

    def listening():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    assert not listening()
    kv.cli("vm", "extension", "set", "-g", "keyless", "--vm-name", host.vm, "-n", "ManagedIdentityExtensionForLinux",
           "--publisher", "Microsoft.ManagedIdentity", "--version", "1.0", "--settings", json.dumps({"port": port}))
    deadline = time.time() + 20
    while not listening():
        assert time.time() < deadline, "the extension endpoint never came up"
        time.sleep(0.2)
    # seed 001: GET with the resource in the query and Metadata: true
    st, body, _ = http(f"{url}?resource={urllib.parse.quote(ARM + '/')}", headers={"Metadata": "true"})
    assert st == 200, body
    assert body["refresh_token"] == "" and body["token_type"] == "Bearer" and body["resource"] == ARM + "/"
    assert all(isinstance(body[k], str) for k in ("expires_in", "expires_on", "not_before"))
    checked = run_client({"verify_token": body["access_token"], "verify": {**verify(host.up), "audience": ARM + "/"}})
    assert checked["claims"]["oid"] == host.system
    # the form-encoded POST of the docs' curl example
    st, body, _ = http(url, data=f"resource={urllib.parse.quote(ARM)}".encode(),
                       headers={"Metadata": "true", "Content-Type": "application/x-www-form-urlencoded"})
    assert st == 200, body
    st, body, _ = http(f"{url}?resource={urllib.parse.quote(ARM)}")
    assert st == 400 and body["error"] == "bad_request_102", body
    wait_audit(host.dir / "node" / "audit.log", "no Metadata header at the extension endpoint",
               lambda r: r.get("surface") == "extension" and r["outcome"] == "refused" and r["reason"] == "bad_request_102")
    # removing the extension stops the listener, the agent keeps running
    kv.cli("vm", "extension", "delete", "-g", "keyless", "--vm-name", host.vm, "-n", "ManagedIdentityExtensionForLinux")
    deadline = time.time() + 20
    while listening():
        assert time.time() < deadline, "the extension endpoint did not stop"
        time.sleep(0.2)
    assert host.proc.poll() is None
    st, _, _ = http(f"{host.imds}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={urllib.parse.quote(ARM)}",
                    headers={"Metadata": "true"})
    assert st == 200


def test_extension_endpoint_reaches_32_user_assigned_identities(host):
    kv = host.kv
    names = [f"u{i:02d}-{host.vm}" for i in range(33)]
    for n in names:
        kv.cli("identity", "create", "-g", "keyless", "-n", n)
    kv.cli("vm", "identity", "assign", "-g", "keyless", "-n", host.vm, "--identities", "[system]", *names)
    port = free_port()
    kv.cli("vm", "extension", "set", "-g", "keyless", "--vm-name", host.vm, "-n", "ManagedIdentityExtensionForLinux",
           "--publisher", "Microsoft.ManagedIdentity", "--version", "1.0", "--settings", json.dumps({"port": port}))
    clients = [kv.cli("identity", "show", "-g", "keyless", "-n", n)["properties"]["clientId"] for n in names]
    time.sleep(2.5)  # two syncs: the agent sees the identities and the extension
    ext_ok, imds_ok = 0, 0
    refused = []
    for cid in clients:
        q = f"resource={urllib.parse.quote(ARM)}&client_id={cid}"
        st, _, _ = http(f"http://127.0.0.1:{port}/oauth2/token?{q}", headers={"Metadata": "true"})
        ext_ok += st == 200
        if st != 200:
            refused.append(cid)
        st, _, _ = http(f"{host.imds}/metadata/identity/oauth2/token?api-version=2018-02-01&{q}", headers={"Metadata": "true"})
        imds_ok += st == 200
        time.sleep(0.1)  # two token requests per 0.1 s: within one caller's share (20/s)
    assert (ext_ok, imds_ok) == (32, 33), (ext_ok, imds_ok)
    assert len(refused) == 1
    wait_audit(host.dir / "node" / "audit.log", "the 33rd identity at the extension endpoint",
               lambda r: r.get("surface") == "extension" and r["outcome"] == "refused"
               and r["reason"] == "identity_not_found" and r.get("identity", {}).get("clientId") == refused[0])
