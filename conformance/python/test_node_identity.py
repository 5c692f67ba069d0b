"""Real node @azure/identity against `keyless up` through AZURE_POD_IDENTITY_AUTHORITY_HOST."""
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

ARM = "https://management.azure.com"
NODE_CLIENT = pathlib.Path(__file__).resolve().parents[1] / "node" / "client.mjs"


def node_modules():
    d = os.environ.get("KEYLESS_NODE_MODULES")
    if not d or not (pathlib.Path(d) / "@azure" / "identity").is_dir():
        if os.environ.get("CI"):
            pytest.fail("KEYLESS_NODE_MODULES with @azure/identity is required in CI (scripts/test installs it)")
        pytest.skip("node clients not installed (run scripts/test)")
    return d


def run_node(up, args, prefix=(), imds_env=True, **env):
    """Run client.mjs. Only the CA (to verify against our JWKS) and the module path are set, plus
    AZURE_POD_IDENTITY_AUTHORITY_HOST unless `imds_env` is false (then the SDK's default IMDS
    address is used)."""
    nm = node_modules()
    proc_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": tempfile.gettempdir(),
        "KEYLESS_NODE_MODULES": nm,
        "NODE_EXTRA_CA_CERTS": up.info["caFile"],
        **env,
    }
    if imds_env:
        proc_env["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = up.info["imdsUrl"]
    cmd = [*prefix, "env", "-i", *[f"{k}={v}" for k, v in proc_env.items()], shutil.which("node") or "node",
           str(NODE_CLIENT), json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def verify(up):
    return {"authority": up.authority, "audience": ARM}


def test_node_system_assigned(up):
    out = run_node(up, {"credential": "mi", "scope": ARM + "/.default", "verify": verify(up)})
    assert out.get("verified"), out
    assert out["claims"]["oid"] == up.info["systemIdentity"]["principalId"]
    assert out["second_token_same"]


def test_node_user_assigned_by_client_id_and_resource_id(up):
    demo = up.info["demoIdentity"]
    for options in ({"clientId": demo["clientId"]}, {"resourceId": demo["resourceId"]}, {"objectId": demo["principalId"]}):
        out = run_node(up, {"credential": "mi", "options": options, "scope": ARM + "/.default", "verify": verify(up)})
        assert out.get("verified"), (options, out)
        assert out["claims"]["oid"] == demo["principalId"], options
        assert out["claims"]["xms_mirid"] == demo["resourceId"].replace("/resourceGroups/", "/resourcegroups/", 1)


def test_node_default_azure_credential(up):
    out = run_node(up, {"credential": "dac", "scope": ARM + "/.default", "verify": verify(up)})
    assert out.get("verified"), out
    assert out["claims"]["oid"] == up.info["systemIdentity"]["principalId"]


def test_node_unknown_client_id_is_refused(up):
    out = run_node(up, {"credential": "mi", "options": {"clientId": "00000000-0000-0000-0000-000000000000"}, "scope": ARM + "/.default"})
    assert "error" in out, out


def test_node_arm_msi_client(up):
    nm = node_modules()
    args = {"server": up.info["serverUrl"], "tenant": up.info["tenantId"], "clientId": up.info["adminClientId"],
            "secret": up.admin_secret, "subscription": up.info["subscriptionId"], "resourceGroup": "keyless",
            "identity": "node-arm-msi"}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(),
           "KEYLESS_NODE_MODULES": nm, "NODE_EXTRA_CA_CERTS": up.info["caFile"]}
    script = NODE_CLIENT.parent / "arm-msi.mjs"
    out = subprocess.run([shutil.which("node") or "node", str(script), json.dumps(args)], env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["created"]["name"] == "node-arm-msi"
    assert got["created"]["principalId"] and got["created"]["clientId"]
    assert got["created"]["tenantId"] == up.info["tenantId"]
    assert got["get"]["tags"] == {"from": "node"}
    assert "node-arm-msi" in got["listRg"] and "node-arm-msi" in got["listSub"]
    assert got["afterDelete"] == 404
