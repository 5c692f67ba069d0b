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


def admin_secret(data_dir):
    """The bootstrap admin's secret from the 0600 file the first start writes into the data dir
    (stdout carries it only with --print-secret)."""
    try:
        text = (pathlib.Path(data_dir) / "bootstrap-admin.secret").read_text()
    except FileNotFoundError:
        return None
    m = re.search(r"^KEYLESS_CLIENT_SECRET=(\S+)$", text, re.M)
    if m:
        remember_secret(m.group(1))
    return m.group(1) if m else None


class Up:
    """A running `keyless up` (optionally inside a network namespace)."""

    def __init__(self, data_dir, proc, info, stdout_lines):
        self.data_dir = data_dir
        self.proc = proc
        self.info = info
        self.stdout = stdout_lines
        self.admin_secret = admin_secret(data_dir)

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


def _spawn_up(data_dir, extra, prefix, listen, env=None):
    cmd = [*prefix, keyless_bin(), "up", "--data-dir", str(data_dir), "--listen", listen, *extra]
    if "--imds-listen" not in extra:
        cmd += ["--imds-listen", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
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


_PG_DB_COUNTER = [0]


def _migrated_database(data_dir, extra, prefix, listen):
    """With KEYLESS_CONFORMANCE_PG_ADMIN_URL (scripts/test's second conformance pass): the data
    dir is first populated by `keyless up` on SQLite, stopped, moved with `keyless admin
    migrate` into a new PostgreSQL database, and served from there; the URL is kept beside the
    data dir so a restart finds it."""
    admin = os.environ.get("KEYLESS_CONFORMANCE_PG_ADMIN_URL")
    if not admin or prefix:
        # a server inside a network namespace cannot reach the database on the host's loopback
        return None
    marker = pathlib.Path(str(data_dir) + ".pg-url")
    if marker.exists():
        return marker.read_text().strip()
    first = _spawn_up(data_dir, extra, prefix, listen)
    first.stop()
    _PG_DB_COUNTER[0] += 1
    name = f"conf{os.getpid()}_{_PG_DB_COUNTER[0]}"
    base = admin.rsplit("/", 1)[0]
    createdb = pathlib.Path(os.environ["KEYLESS_PG_BIN"]) / "createdb"
    host_port = base.split("@", 1)[1]
    host, port = host_port.rsplit(":", 1)
    subprocess.run([str(createdb), "-h", host, "-p", port, "-U", "keyless", name], check=True)
    url = f"{base}/{name}"
    out = subprocess.run(
        [keyless_bin(), "admin", "migrate", "--from", str(data_dir), "--to", url],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"keyless admin migrate failed: {out.stderr}")
    marker.write_text(url)
    return url


def start_up(data_dir, extra=(), prefix=(), listen="127.0.0.1:0"):
    """Start `keyless up` and wait until it has printed its endpoints."""
    url = _migrated_database(data_dir, extra, prefix, listen)
    if url is None:
        return _spawn_up(data_dir, extra, prefix, listen)
    env = dict(os.environ, KEYLESS_DATABASE_URL=url)
    return _spawn_up(data_dir, extra, prefix, listen, env=env)


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
    _remember_secrets_in(args)
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


def audit_records(path):
    """The records of an audit file (one JSON object a line), in order."""
    p = pathlib.Path(path)
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def wait_audit(path, what, want, count=1, timeout=10):
    """The records of the audit file at `path` that `want` accepts, once there are `count` of
    them (the writer appends within a batch of the answer); fails listing the records otherwise."""
    deadline = time.time() + timeout
    while True:
        recs = audit_records(path)
        found = [r for r in recs if want(r)]
        if len(found) >= count:
            return found
        if time.time() > deadline:
            pytest.fail(f"{len(found)} of {count} audit records for {what} in {path}:\n"
                        + "\n".join(json.dumps(r) for r in recs))
        time.sleep(0.05)


# ---------------------------------------------------------------- no secret in a debug log
#
# Every `keyless` process the suite starts (through keyless_bin()) runs with RUST_LOG=debug
# and its stderr (the logs) teed into LOG_DIR/keyless-<pid>.log, its stdout into .out. At the
# end of the session every log is searched for any JWT, any PEM private key, and every secret
# the suite handled (bootstrap admin secrets, app passwords printed by `keyless app`, Key Vault
# values and client secrets passed to clients): one found fails the run.

LOG_DIR = pathlib.Path(tempfile.mkdtemp(prefix="keyless-conf-logs-"))
SECRETS = set()
LOG_LEVEL = os.environ.get("KEYLESS_CONFORMANCE_RUST_LOG", "debug")
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")
SECRET_KEYS = re.compile(r"(secret|password|value|client_secret|clientSecret)$", re.I)


def remember_secret(v):
    """A secret value the logs must never contain (short values are too common to search)."""
    if isinstance(v, str) and len(v) >= 6:
        SECRETS.add(v)


def _remember_secrets_in(obj, key=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _remember_secrets_in(v, str(k))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _remember_secrets_in(v, key)
    elif isinstance(obj, str) and SECRET_KEYS.search(key):
        remember_secret(obj)


def _wrap_keyless_bin():
    real = keyless_bin()
    wrapper = LOG_DIR / "keyless"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        f"export RUST_LOG=\"{LOG_LEVEL}\"\n"
        # ops listeners on free ports (the defaults are fixed ports; tests run side by side)
        "export KEYLESS_METRICS_LISTEN=\"${KEYLESS_METRICS_LISTEN:-127.0.0.1:0}\"\n"
        f"exec \"{real}\" \"$@\" 2> >(tee -a \"{LOG_DIR}/keyless-$$.log\" >&2) "
        f"> >(tee -a \"{LOG_DIR}/keyless-$$.out\")\n")
    wrapper.chmod(0o755)
    LOG_DIR.chmod(0o755)
    os.environ["KEYLESS_BIN"] = str(wrapper)


if os.environ.get("KEYLESS_CONFORMANCE_NO_LOG_CHECK") != "1" and os.path.exists(keyless_bin()):
    _wrap_keyless_bin()


def _secrets_from_outputs():
    """App passwords and secrets the admin verbs printed (JSON on stdout)."""
    for f in LOG_DIR.glob("*.out"):
        for m in re.finditer(r'"(password|secret|clientSecret|client_secret|value)"\s*:\s*"([^"]+)"',
                             f.read_text(errors="replace")):
            remember_secret(m.group(2))
        for m in re.finditer(r"KEYLESS_CLIENT_SECRET=(\S+)", f.read_text(errors="replace")):
            remember_secret(m.group(1))


def leaks_in_logs():
    """(file, what) for every secret found in a log of the session."""
    _secrets_from_outputs()
    found = []
    for f in sorted(LOG_DIR.glob("*.log")):
        text = f.read_text(errors="replace")
        for m in JWT.finditer(text):
            found.append((f.name, f"a JWT {m.group(0)[:24]}…"))
        if "PRIVATE KEY" in text:
            found.append((f.name, "a PEM private key"))
        for s in SECRETS:
            if s in text:
                found.append((f.name, f"the secret {s[:4]}… ({len(s)} chars)"))
    return found


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("KEYLESS_BIN") != str(LOG_DIR / "keyless"):
        return
    logs = list(LOG_DIR.glob("*.log"))
    leaks = leaks_in_logs()
    rep = session.config.pluginmanager.get_plugin("terminalreporter")
    say = rep.write_line if rep else print
    if leaks:
        say(f"SECRETS IN THE DEBUG LOGS ({LOG_DIR}):")
        for f, what in leaks[:50]:
            say(f"  {f}: {what}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        say(f"no secret in {len(logs)} debug logs of keyless processes "
            f"({len(SECRETS)} secret values, JWTs and private keys searched)")
        shutil.rmtree(LOG_DIR, ignore_errors=True)
