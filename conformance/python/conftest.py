"""Fixtures: a real `keyless up` process per module, and a runner for SDK client processes."""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLIENT = pathlib.Path(__file__).resolve().parent / "client.py"


def keyless_bin():
    b = os.environ.get("KEYLESS_BIN")
    if b:
        return b
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return str(pathlib.Path(target) / "debug" / "keyless")


class Up:
    """A running `keyless up` (optionally inside a network namespace)."""

    def __init__(self, data_dir, proc, info, stdout_lines):
        self.data_dir = data_dir
        self.proc = proc
        self.info = info
        self.stdout = stdout_lines
        m = re.search(r"KEYLESS_CLIENT_SECRET=(\S+)", "\n".join(stdout_lines))
        self.admin_secret = m.group(1) if m else None

    @property
    def authority(self):
        return f"{self.info['serverUrl']}/{self.info['tenantId']}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_up(data_dir, extra=(), prefix=(), listen="127.0.0.1:0"):
    """Start `keyless up` and wait until it has printed its endpoints."""
    cmd = [*prefix, keyless_bin(), "up", "--data-dir", str(data_dir), "--listen", listen, *extra]
    if "--imds-listen" not in extra:
        cmd += ["--imds-listen", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"keyless up exited {proc.returncode}: {lines}")
            continue
        lines.append(line.rstrip("\n"))
        if "Stop with Ctrl-C" in line:
            info = json.loads((pathlib.Path(data_dir) / "endpoints.json").read_text())
            return Up(data_dir, proc, info, lines)
    proc.kill()
    raise RuntimeError(f"keyless up did not start: {lines}")


@pytest.fixture(scope="module")
def up():
    d = tempfile.mkdtemp(prefix="keyless-conf-")
    u = start_up(pathlib.Path(d) / "data", extra=("--sync-interval", "1"))
    yield u
    u.stop()
    shutil.rmtree(d, ignore_errors=True)


def wait_for(check, timeout=60, step=0.5, what="condition"):
    """Poll `check` until it returns something truthy; errors of a not-yet-ready state (a missing
    file, a partial JSON document, a key not there yet, a failed assertion) count as "not yet"."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = check()
            if last:
                return last
        except (AssertionError, FileNotFoundError, ValueError, KeyError, IndexError, TypeError) as e:
            last = e
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def run_client(args, env=None, prefix=(), clean_env=False):
    """Run client.py with `args` in a fresh process; returns its JSON output."""
    if clean_env:
        cmd = [*prefix, "env", "-i", sys.executable, str(CLIENT), json.dumps(args)]
        proc_env = None
    else:
        cmd = [*prefix, sys.executable, str(CLIENT), json.dumps(args)]
        proc_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(), **(env or {})}
    out = subprocess.run(cmd, env=proc_env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    assert lines, f"no JSON from client: {out.stdout!r} {out.stderr!r}"
    return json.loads(lines[-1])


# ---------------------------------------------------------------- Key Vault

def can_remap_hosts():
    """Vault host names ({vault}.vault.localhost) resolve through a private /etc/hosts bound
    into a mount namespace of the client process (needs root)."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None


class KvEnv:
    """A `keyless up --dev-clock` with vaults, and a runner for Key Vault SDK clients that
    resolve `{vault}.vault.localhost` to the server and trust the Keyless CA."""

    def __init__(self, up, workdir):
        self.up = up
        self.workdir = pathlib.Path(workdir)
        self.hosts = self.workdir / "hosts"
        self.vaults = []
        self.port = up.info["serverUrl"].rsplit(":", 1)[1]
        self.ca = up.info["caFile"]
        # the "Keyless" certificate issuer's CA (not the platform's TLS CA)
        self.kv_ca = up.info["keyVaultCaFile"]
        self._write_hosts()

    def _write_hosts(self):
        lines = ["127.0.0.1 localhost", "::1 localhost"] + [f"127.0.0.1 {v}.vault.localhost" for v in self.vaults]
        self.hosts.write_text("\n".join(lines) + "\n")

    def admin_env(self):
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tempfile.gettempdir(),
            "KEYLESS_SERVER": self.up.info["serverUrl"],
            "KEYLESS_TENANT_ID": self.up.info["tenantId"],
            "KEYLESS_CA_FILE": self.ca,
            "KEYLESS_CLIENT_ID": self.up.info["adminClientId"],
            "KEYLESS_CLIENT_SECRET": self.up.admin_secret,
        }

    def cli(self, *args, check=True):
        out = subprocess.run([keyless_bin(), *args], env=self.admin_env(), capture_output=True, text=True, timeout=60)
        if check:
            assert out.returncode == 0, out.stderr
        try:
            return json.loads(out.stdout) if out.stdout.strip() else None
        except json.JSONDecodeError:
            return out.stdout

    def create_vault(self, name, *extra, principals=(), secret=("all",), key=("all",), cert=("all",)):
        v = self.cli("keyvault", "create", "-n", name, "-g", "keyless", *extra)
        for p in principals:
            self.cli("keyvault", "set-policy", "-n", name, "--object-id", p,
                     "--secret-permissions", *secret, "--key-permissions", *key, "--certificate-permissions", *cert)
        self.vaults.append(name)
        self._write_hosts()
        return v

    def url(self, vault):
        return f"https://{vault}.vault.localhost:{self.port}"

    def client_env(self, extra=None):
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tempfile.gettempdir(),
            "AZURE_POD_IDENTITY_AUTHORITY_HOST": self.up.info["imdsUrl"],
            "REQUESTS_CA_BUNDLE": self.ca,
            "SSL_CERT_FILE": self.ca,
            "NODE_EXTRA_CA_CERTS": self.ca,
            "KEYLESS_NODE_MODULES": os.environ.get("KEYLESS_NODE_MODULES", str(ROOT / ".cache" / "node" / "node_modules")),
        }
        env.update(extra or {})
        return env

    def prefix(self):
        # a private mount namespace whose /etc/hosts names the vaults
        return ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"', str(self.hosts))

    def run(self, cmd, env=None, timeout=300):
        out = subprocess.run([*self.prefix(), *cmd], env=self.client_env(env), capture_output=True, text=True, timeout=timeout)
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        assert out.returncode == 0 and lines, f"client failed ({out.returncode}): {out.stdout[-3000:]} {out.stderr[-3000:]}"
        return json.loads(lines[-1])

    def py(self, scenario, vault, **args):
        script = pathlib.Path(__file__).resolve().parent / "kv_client.py"
        return self.run([sys.executable, str(script), json.dumps({"scenario": scenario, "url": self.url(vault), **args})])

    def node(self, scenario, vault, **args):
        script = ROOT / "conformance" / "node" / "keyvault.mjs"
        return self.run(["node", str(script), json.dumps({"scenario": scenario, "url": self.url(vault), **args})])


@pytest.fixture(scope="module")
def kv():
    if not can_remap_hosts():
        if os.environ.get("CI"):
            pytest.fail("CI must run as root (unshare) for the Key Vault host-name tests")
        pytest.skip("needs root and unshare to resolve {vault}.vault.localhost")
    d = tempfile.mkdtemp(prefix="keyless-kv-")
    u = start_up(pathlib.Path(d) / "data", extra=("--sync-interval", "1", "--dev-clock"))
    try:
        yield KvEnv(u, d)
    finally:
        u.stop()
        shutil.rmtree(d, ignore_errors=True)
