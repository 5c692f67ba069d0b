"""The same SDK code with no environment at all: inside a network namespace where the agent
listens on 169.254.169.254:80, exactly where the SDKs look by default."""
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import uuid

import pytest

from conftest import run_client, start_up

ARM = "https://management.azure.com"


def can_netns():
    return os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.fixture(scope="module")
def netns_up():
    if not can_netns():
        if os.environ.get("CI"):
            pytest.fail("CI must run as root with iproute2 for the network-namespace tests")
        pytest.skip("needs root and `ip` (network namespaces)")
    ns = f"kl-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    d = tempfile.mkdtemp(prefix="keyless-netns-")
    up = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "169.254.169.254/32", "dev", "lo"], check=True)
        prefix = ("ip", "netns", "exec", ns)
        up = start_up(os.path.join(d, "data"), extra=("--imds-listen", "169.254.169.254:80"), prefix=prefix)
        yield up, prefix
    finally:
        if up:
            up.stop()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)


def verify(up):
    return {"authority": up.authority, "ca": up.info["caFile"], "audience": ARM}


def test_managed_identity_credential_with_no_environment(netns_up):
    up, prefix = netns_up
    assert up.info["imdsUrl"] == "http://169.254.169.254:80"
    out = run_client({"credential": "mi", "scope": ARM + "/.default", "verify": verify(up)}, prefix=prefix, clean_env=True)
    assert "error" not in out, out
    assert out["claims"]["oid"] == up.info["systemIdentity"]["principalId"]
    assert out["claims"]["xms_mirid"] == up.info["vm"]["resourceId"].replace("/resourceGroups/", "/resourcegroups/", 1)


def test_user_assigned_with_no_environment(netns_up):
    up, prefix = netns_up
    demo = up.info["demoIdentity"]
    out = run_client(
        {"credential": "mi", "kwargs": {"client_id": demo["clientId"]}, "scope": ARM + "/.default", "verify": verify(up)},
        prefix=prefix,
        clean_env=True,
    )
    assert "error" not in out, out
    assert out["claims"]["oid"] == demo["principalId"]


def test_default_azure_credential_with_no_environment(netns_up):
    # DAC probes IMDS without the Metadata header first (a 400 means "present"), then asks
    up, prefix = netns_up
    out = run_client({"credential": "dac", "scope": ARM + "/.default", "verify": verify(up)}, prefix=prefix, clean_env=True)
    assert "error" not in out, out
    assert out["claims"]["oid"] == up.info["systemIdentity"]["principalId"]


def rust_client():
    b = os.environ.get("KEYLESS_RUST_CLIENT")
    if not b:
        target = os.environ.get("CARGO_TARGET_DIR", str(pathlib.Path(__file__).resolve().parents[2] / "target"))
        b = str(pathlib.Path(target) / "debug" / "keyless-conformance-rust")
    if not os.path.exists(b):
        pytest.fail(f"{b} is missing: build it with `cargo build -p keyless-conformance-rust`")
    return b


@pytest.mark.parametrize("kind", ["system", "client_id", "object_id", "resource_id"])
def test_rust_azure_identity(netns_up, kind):
    # The Rust crate always calls 169.254.169.254 with api-version 2019-08-01 and needs
    # expires_on as a JSON string, token_type and resource.
    up, prefix = netns_up
    demo = up.info["demoIdentity"]
    value = {"system": "-", "client_id": demo["clientId"], "object_id": demo["principalId"], "resource_id": demo["resourceId"]}[kind]
    out = subprocess.run([*prefix, "env", "-i", rust_client(), kind, value, ARM + "/.default"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "error" not in got, got
    assert got["second_token_same"]
    checked = run_client({"verify_token": got["token"], "verify": verify(up)}, prefix=prefix, clean_env=True)
    want = up.info["systemIdentity"]["principalId"] if kind == "system" else demo["principalId"]
    assert checked["claims"]["oid"] == want
    assert checked["claims"]["exp"] == got["expires_on"]


@pytest.mark.parametrize("credential", ["mi", "dac"])
def test_node_azure_identity_with_no_azure_environment(netns_up, credential):
    # @azure/identity's DAC probes IMDS with a bare GET (no query, no Metadata header) first
    from test_node_identity import run_node

    up, prefix = netns_up
    out = run_node(up, {"credential": credential, "scope": ARM + "/.default", "verify": verify(up)},
                   prefix=prefix, imds_env=False)
    assert out.get("verified"), out
    assert out["claims"]["oid"] == up.info["systemIdentity"]["principalId"]


def test_key_vault_secret_read_with_no_azure_environment(netns_up):
    # seed 002 end to end on a "VM": an identity, an access policy, a token from the default
    # IMDS address, a secret read by the unmodified SDK. The only configuration the workload
    # has is trust in the Keyless CA; `ip netns exec` binds /etc/netns/<ns>/hosts over
    # /etc/hosts, which names the vault.
    up, prefix = netns_up
    ns = prefix[3]
    vault = f"seed-{uuid.uuid4().hex[:8]}"
    os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
    with open(f"/etc/netns/{ns}/hosts", "w") as f:
        f.write(f"127.0.0.1 localhost\n127.0.0.1 {vault}.vault.localhost\n")
    from conftest import keyless_bin
    admin = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KEYLESS_SERVER": up.info["serverUrl"],
             "KEYLESS_TENANT_ID": up.info["tenantId"], "KEYLESS_CA_FILE": up.info["caFile"],
             "KEYLESS_CLIENT_ID": up.info["adminClientId"], "KEYLESS_CLIENT_SECRET": up.admin_secret}

    def cli(*args):
        out = subprocess.run([*prefix, keyless_bin(), *args], env=admin, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr

    cli("keyvault", "create", "-n", vault, "-g", "keyless")
    system, demo = up.info["systemIdentity"]["principalId"], up.info["demoIdentity"]
    cli("keyvault", "set-policy", "-n", vault, "--object-id", system, "--secret-permissions", "get")
    cli("keyvault", "set-policy", "-n", vault, "--object-id", demo["principalId"], "--secret-permissions", "set")
    port = up.info["serverUrl"].rsplit(":", 1)[1]
    url = f"https://{vault}.vault.localhost:{port}"
    script = str(pathlib.Path(__file__).resolve().parent / "kv_client.py")
    env = ["env", "-i", f"REQUESTS_CA_BUNDLE={up.info['caFile']}"]

    def run(args):
        out = subprocess.run([*prefix, *env, __import__("sys").executable, script, json.dumps({"url": url, **args})],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert run({"scenario": "set_secret", "name": "db", "value": "from-imds", "client_id": demo["clientId"]}) == {"ok": "from-imds"}
    assert run({"scenario": "read_secret", "name": "db"}) == {"ok": "from-imds"}
