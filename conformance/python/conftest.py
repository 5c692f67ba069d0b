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


def start_up(data_dir, extra=(), prefix=()):
    """Start `keyless up` and wait until it has printed its endpoints."""
    cmd = [*prefix, keyless_bin(), "up", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", *extra]
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
