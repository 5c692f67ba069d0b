"""Seed 004 end to end with real processes: a Batch pool with a user-assigned identity and the
KeyVaultForLinux extension observing a certificate that renews itself; two host agents join the
pool as nodes, each in its own network namespace with the agent at 169.254.169.254 and its own
disk. Both nodes get the certificate on disk; when the vault's clock passes the renewal trigger
both hold the new version behind the same link, report success, and run their reload hook once
more; when the identity loses its access policy the status files report the vault's refusal and
the certificate on disk stays."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import KvEnv, can_remap_hosts, keyless_bin, start_up, wait_for


class Node:
    """`keyless node` in its own network namespace (agent at 169.254.169.254:80) and its own
    /var/lib/keyless-kv-store (a private bind mount)."""

    def __init__(self, root, i, uid, server_port, ca):
        self.ns = f"klp{i}-{uid}"
        self.host_ip = f"10.{200 + i}.{int(uid[:2], 16)}.1"
        self.ns_ip = f"10.{200 + i}.{int(uid[:2], 16)}.2"
        self.veth = (f"vh{i}{uid}"[:15], f"vn{i}{uid}"[:15])
        self.dir = pathlib.Path(root) / f"node{i}"
        self.store = self.dir / "store"
        self.state = self.dir / "state"
        self.hook_log = self.dir / "hook.log"
        self.server = f"https://{self.host_ip}:{server_port}"
        self.ca = ca
        self.proc = None
        self.store.mkdir(parents=True)
        self.store.chmod(0o700)
        sh = lambda *a: subprocess.run(a, check=True)
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        sh("ip", "link", "set", self.veth[1], "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth[0])
        sh("ip", "link", "set", self.veth[0], "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.veth[1])
        sh("ip", "-n", self.ns, "link", "set", self.veth[1], "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns, "addr", "add", "169.254.169.254/32", "dev", "lo")

    def names(self, vaults):
        os.makedirs(f"/etc/netns/{self.ns}", exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{self.host_ip} {v}.vault.localhost" for v in vaults]
        pathlib.Path(f"/etc/netns/{self.ns}/hosts").write_text("\n".join(lines) + "\n")

    def start(self, join_token, store_mount):
        script = 'mkdir -p "$1" && mount --bind "$0" "$1" && shift 2 && exec "$@"'
        cmd = ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
               "sh", "-c", script, str(self.store), store_mount, "sh",
               keyless_bin(), "node", "--server", self.server, "--ca-file", self.ca,
               "--state-dir", str(self.state), "--join-token", join_token,
               "--imds-listen", "169.254.169.254:80", "--sync-interval", "1",
               "--extension-reload-hook", f'echo "$KEYLESS_KV_CHANGED" >> {self.hook_log}',
               "--extension-store-root", store_mount]
        self.log = open(self.dir / "node.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        deadline = time.time() + 60
        seen = []
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node exited: {seen} {(self.dir / 'node.log').read_text()[-2000:]}")
                continue
            seen.append(line)
            if "IMDS endpoint" in line:
                return
        raise RuntimeError(f"node did not start: {seen}")

    def status(self):
        return json.loads((self.state / "extensions" / "KVExtensions" / "status" / "0.status").read_text())[0]["status"]

    def hooks(self):
        return self.hook_log.read_text().splitlines() if self.hook_log.exists() else []

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def destroy(self):
        self.stop()
        subprocess.run(["ip", "link", "del", self.veth[0]], check=False)
        subprocess.run(["ip", "netns", "del", self.ns], check=False)
        shutil.rmtree(f"/etc/netns/{self.ns}", ignore_errors=True)


@pytest.fixture(scope="module")
def fabric():
    if not (can_remap_hosts() and shutil.which("ip")):
        if os.environ.get("CI"):
            pytest.fail("CI must run as root with iproute2 and unshare for the pool tests")
        pytest.skip("needs root, iproute2 and unshare")
    uid = uuid.uuid4().hex[:6]
    root = tempfile.mkdtemp(prefix="keyless-pool-")
    nodes = []
    up = None
    try:
        hosts = [f"10.{200 + i}.{int(uid[:2], 16)}.1" for i in (1, 2)]
        extra = ["--imds-listen", "127.0.0.1:0", "--sync-interval", "1", "--dev-clock"]
        for h in hosts:
            extra += ["--tls-san", h]
        up = start_up(pathlib.Path(root) / "data", extra=extra, listen="0.0.0.0:0")
        port = up.info["serverUrl"].rsplit(":", 1)[1]
        for i in (1, 2):
            nodes.append(Node(root, i, uid, port, up.info["caFile"]))
        yield KvEnv(up, root), nodes, uid
    finally:
        for n in nodes:
            n.destroy()
        if up:
            up.stop()
        shutil.rmtree(root, ignore_errors=True)


def leaf_and_key(path):
    text = pathlib.Path(path).read_text()
    blocks = text.split("-----END ")
    assert "PRIVATE KEY" in blocks[-2], "the private key comes last"
    leaf = x509.load_pem_x509_certificate(text.encode())
    key = serialization.load_pem_private_key(text[text.index("-----BEGIN PRIVATE KEY-----"):].encode(), None)
    return leaf, key


def same_key(leaf, key):
    pub = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pub(leaf.public_key()) == pub(key.public_key())


def test_renewed_certificate_reaches_every_pool_node(fabric):
    kv, nodes, uid = fabric
    vault = f"pool-{uid}"
    cert = "web"
    store_mount = f"/var/lib/keyless-kv-{uid}"
    ident = kv.cli("identity", "create", "-g", "keyless", "-n", f"pool-id-{uid}")
    pid, cid = ident["properties"]["principalId"], ident["properties"]["clientId"]
    demo = kv.up.info["demoIdentity"]
    kv.create_vault(vault, principals=[demo["principalId"]])
    kv.cli("keyvault", "set-policy", "-n", vault, "--object-id", pid, "--secret-permissions", "get", "list")
    first = kv.py("create_cert", vault, name=cert, client_id=demo["clientId"])
    port = kv.port
    settings = {
        "secretsManagementSettings": {
            "pollingIntervalInS": "2",
            "certificateStoreLocation": store_mount,
            "requireInitialSync": True,
            "observedCertificates": [f"https://{vault}.vault.localhost:{port}/secrets/{cert}"],
        },
        "authenticationSettings": {"msiEndpoint": "http://169.254.169.254/metadata/identity", "msiClientId": cid},
    }
    body = {
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {ident["id"]: {}}},
        "properties": {
            "vmSize": "STANDARD_D2S_V3",
            "deploymentConfiguration": {"virtualMachineConfiguration": {
                "imageReference": {"publisher": "canonical", "offer": "ubuntuserver", "sku": "20.04-lts"},
                "nodeAgentSkuId": "batch.node.ubuntu 20.04",
                "extensions": [{"name": "KVExtensions", "type": "KeyVaultForLinux", "publisher": "Microsoft.Azure.KeyVault",
                                "typeHandlerVersion": "3.0", "autoUpgradeMinorVersion": True, "settings": settings}]}},
            "scaleSettings": {"fixedScale": {"targetDedicatedNodes": 2}},
        },
    }
    body_file = pathlib.Path(kv.workdir) / "pool.json"
    body_file.write_text(json.dumps(body))
    kv.cli("batch", "account", "create", "-n", f"acct{uid}", "-g", "keyless")
    kv.cli("batch", "pool", "create", "--account-name", f"acct{uid}", "-g", "keyless", "-n", "web", "--body", str(body_file))
    for n in nodes:
        n.names([vault])
        token = kv.cli("batch", "pool", "join-token", "--account-name", f"acct{uid}", "-g", "keyless", "-n", "web")["joinToken"]
        n.start(token, store_mount)

    link_name = f"{vault}.{cert}"
    # both nodes: the PEM on disk behind the link, 0600 in a 0700 directory, key matching
    for n in nodes:
        link = n.store / link_name
        wait_for(lambda: link.exists() and n.status()["status"] == "success", what=f"initial sync on {n.ns}")
        assert link.is_symlink()
        target = n.store / os.readlink(link)
        assert oct(target.stat().st_mode & 0o777) == "0o600"
        assert oct(n.store.stat().st_mode & 0o777) == "0o700"
        leaf, key = leaf_and_key(link)
        assert same_key(leaf, key)
        assert leaf.fingerprint(__import__("cryptography").hazmat.primitives.hashes.SHA1()).hex() == first["x5t"]
        out = subprocess.run(["openssl", "x509", "-in", str(link), "-noout", "-subject"], capture_output=True, text=True)
        assert out.returncode == 0 and f"{cert}.example" in out.stdout, out
        assert len(n.hooks()) == 1
    # the vault's clock passes the trigger: the renewal reaches both nodes
    r = kv.cli("keyvault", "advance-clock", "--days", "25")
    assert r["renewed"] >= 1
    for n in nodes:
        link = n.store / link_name
        wait_for(lambda: leaf_and_key(link)[0].fingerprint(__import__("cryptography").hazmat.primitives.hashes.SHA1()).hex() != first["x5t"],
                 timeout=30, what=f"renewed certificate on {n.ns}")
        leaf, key = leaf_and_key(link)
        assert same_key(leaf, key)
        assert len([p for p in n.store.iterdir() if p.name.startswith(link_name + ".")]) == 2, "old version kept"
        wait_for(lambda: n.status()["status"] == "success" and len(n.hooks()) == 2, timeout=15, what="status + hook")
    # the identity loses its access policy: errors reported, nothing on disk changes
    kept = {n.ns: os.readlink(n.store / link_name) for n in nodes}
    kv.cli("keyvault", "delete-policy", "-n", vault, "--object-id", pid)
    kv.cli("keyvault", "advance-clock", "--days", "30")
    for n in nodes:
        st = wait_for(lambda: n.status() if n.status()["status"] in ("error", "warning", "transitioning") and "Forbidden" in json.dumps(n.status()) else None,
                      timeout=30, what=f"refusal reported on {n.ns}")
        assert "ForbiddenByPolicy" in json.dumps(st) or "403" in json.dumps(st), st
        assert os.readlink(n.store / link_name) == kept[n.ns]
        leaf, key = leaf_and_key(n.store / link_name)
        assert same_key(leaf, key)
        assert len(n.hooks()) == 2
