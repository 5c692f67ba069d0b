"""README's first command, run verbatim from the repository root, brings up a working Keyless.
Only the data dir and the ports come from the environment, so the test does not touch ./.keyless
or the default ports."""
import os
import pathlib
import re
import signal
import subprocess
import tempfile
import time

from conftest import ROOT, Up, run_client

ARM = "https://management.azure.com"


def first_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S).group(1)
    cmd = [l for l in block.splitlines() if l.strip() and not l.startswith("#")][0].strip()
    assert "up" in cmd.split(), cmd
    return cmd


def test_readme_first_command_runs_keyless_up():
    cmd = first_command()
    d = pathlib.Path(tempfile.mkdtemp(prefix="keyless-readme-"))
    env = dict(os.environ, KEYLESS_DATA_DIR=str(d / "data"), KEYLESS_LISTEN="127.0.0.1:0", KEYLESS_IMDS_LISTEN="127.0.0.1:0")
    # its own process group: `cargo run` starts keyless as a child
    err = open(d / "stderr.log", "w")
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                            text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.time() + 1800  # includes a release build on a fresh clone
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"`{cmd}` exited {proc.returncode}: {lines} {(d / 'stderr.log').read_text()[-3000:]}")
            lines.append(line.rstrip("\n"))
            if "Stop with Ctrl-C" in line:
                break
        else:
            raise AssertionError(f"`{cmd}` did not come up: {lines}")
        import json

        up = Up(d / "data", proc, json.loads((d / "data" / "endpoints.json").read_text()), lines)
        assert up.admin_secret, "the first start writes the admin secret to the data dir"
        assert up.admin_secret not in "\n".join(lines), "the secret is not printed without --print-secret"
        out = run_client(
            {"credential": "mi", "scope": ARM + "/.default",
             "verify": {"authority": up.authority, "ca": up.info["caFile"], "audience": ARM}},
            {"AZURE_POD_IDENTITY_AUTHORITY_HOST": up.info["imdsUrl"]},
        )
        assert "error" not in out, out
        assert out["claims"]["oid"] == up.info["systemIdentity"]["principalId"]
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
