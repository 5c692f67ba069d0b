"""ARM template deployments (`Microsoft.Resources/deployments`) against `keyless up`, driven by
the real clients: the Azure CLI (`az deployment group create` with seed 003's template as
written) and python `azure-mgmt-resource` (validate, create, operations, delete)."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from az_cli import az_bin, new_az
from conftest import ROOT

HERE = pathlib.Path(__file__).resolve().parent
SEED_003 = ROOT.parent / "shared" / "seeds" / "003_de762688557c05ac.txt"
UAMI = "Microsoft.ManagedIdentity/userAssignedIdentities"
FIC = f"{UAMI}/federatedIdentityCredentials"
SCHEMA = "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#"


@pytest.fixture(scope="module")
def logged_in(up):
    if not pathlib.Path(az_bin()).exists():
        if os.environ.get("CI"):
            pytest.fail(f"the Azure CLI is missing at {az_bin()} (scripts/test installs it)")
        pytest.skip(f"the Azure CLI is not installed at {az_bin()}")
    cli = new_az(up)
    try:
        yield cli, cli.login()
    finally:
        shutil.rmtree(cli.dir, ignore_errors=True)


def seed_003_template():
    """Seed 003's template exactly as the seed gives it, its U+202F indentation made spaces (az
    refuses the file otherwise, before sending anything)."""
    lines = SEED_003.read_text().splitlines()
    schema = next(i for i, l in enumerate(lines) if '"$schema"' in l and "deploymentTemplate" in l)
    start = max(i for i in range(schema) if lines[i].strip() == "{")
    assert all(not l.strip() for l in lines[start + 1:schema])
    end = next(i for i in range(start + 1, len(lines)) if lines[i] == "}")
    text = "\n".join(lines[start:end + 1])
    return re.sub(r"[\u202f\u00a0\u2009]", " ", text)


def deploy(up, rg, name, ops, template=None, parameters=None, mode="Incremental"):
    args = {"server": up.info["serverUrl"], "tenant": up.info["tenantId"],
            "client_id": up.info["adminClientId"], "secret": up.admin_secret,
            "subscription": up.info["subscriptionId"], "resource_group": rg, "name": name,
            "template": template, "parameters": parameters or {}, "mode": mode, "ops": ops}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(),
           "REQUESTS_CA_BUNDLE": up.info["caFile"]}
    out = subprocess.run([sys.executable, str(HERE / "deploy_client.py"), json.dumps(args)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def template(resources, parameters=None, outputs=None, variables=None):
    t = {"$schema": SCHEMA, "contentVersion": "1.0.0.0", "parameters": parameters or {},
         "variables": variables or {}, "resources": resources}
    if outputs:
        t["outputs"] = outputs
    return t


def identity(name, **extra):
    return {"type": UAMI, "apiVersion": "2023-01-31", "name": name, "location": "local", **extra}


def fic(parent, name, subject, depends_on):
    return {"type": FIC, "apiVersion": "2023-01-31", "name": f"{parent}/{name}", "dependsOn": depends_on,
            "properties": {"issuer": "https://issuer.example", "subject": subject,
                           "audiences": ["api://AzureADTokenExchange"]}}


def rg_name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def ops_by_name(operations):
    return {o["properties"]["target_resource"]["resource_name"]: o["properties"] for o in operations}


def test_seed_003_template_as_written_with_az(logged_in, up):
    az, _ = logged_in
    rg = rg_name("seed3")
    az("group", "create", "-n", rg, "-l", "local")
    path = az.dir / "seed003.json"
    path.write_text(seed_003_template())
    issuer = "https://oidc.keyless.example/issuer-1"
    d = az("deployment", "group", "create", "-g", rg, "-n", "seed003", "--template-file", str(path),
           "--parameters", "location=local", "userAssignedIdentityName=FIC_UA",
           "federatedIdentityCredential=testCredential", f"federatedIdentityCredentialIssuer={issuer}",
           "federatedIdentityCredentialSubject=system:serviceaccount:ns:svcaccount",
           "federatedIdentityCredentialAudience=api://AzureADTokenExchange")
    assert d["properties"]["provisioningState"] == "Succeeded", d
    assert d["properties"]["mode"] == "Incremental"
    assert d["properties"]["parameters"]["userAssignedIdentityName"] == {"type": "String", "value": "FIC_UA"}
    created = az("identity", "federated-credential", "show", "-g", rg, "--identity-name", "FIC_UA", "-n", "testCredential")
    assert created["issuer"] == issuer
    assert created["subject"] == "system:serviceaccount:ns:svcaccount"
    assert created["audiences"] == ["api://AzureADTokenExchange"]
    ident = az("identity", "show", "-g", rg, "-n", "FIC_UA")
    assert ident["tags"] == {"firstTag": "ficTest"}
    shown = az("deployment", "group", "show", "-g", rg, "-n", "seed003")
    assert shown["properties"]["provisioningState"] == "Succeeded"
    assert shown["properties"]["correlationId"] == d["properties"]["correlationId"]
    outputs = {r["id"].lower() for r in shown["properties"]["outputResources"]}
    assert ident["id"].lower() in outputs
    ops = az("deployment", "operation", "group", "list", "-g", rg, "-n", "seed003")
    by_type = {o["properties"]["targetResource"]["resourceType"]: o["properties"] for o in ops}
    assert set(by_type) == {UAMI, FIC}, ops
    assert all(p["provisioningState"] == "Succeeded" for p in by_type.values())
    assert by_type[FIC]["targetResource"]["resourceName"] == "FIC_UA/testCredential"
    listed = az("deployment", "group", "list", "-g", rg)
    assert [x["name"] for x in listed] == ["seed003"]


def test_parallel_fics_fail_without_depends_on_and_succeed_chained(up):
    rg = rg_name("fic")
    parent = f"[resourceId('{UAMI}', 'parent')]"
    unchained = template([identity("parent"), fic("parent", "one", "s1", [parent]), fic("parent", "two", "s2", [parent])])
    out = deploy(up, rg, "unchained", ["group", "create", "operations"], unchained)
    err = out["create"]["error"]
    assert err["code"] == "DeploymentFailed", out
    codes = [d["code"] for d in err["details"]]
    assert codes == ["ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity"], err
    ops = ops_by_name(out["operations"])
    states = sorted(ops[n]["provisioning_state"] for n in ("parent/one", "parent/two"))
    assert states == ["Failed", "Succeeded"], ops
    failed = next(p for n, p in ops.items() if p["provisioning_state"] == "Failed")
    assert failed["status_code"] == "Conflict"
    chained = template([identity("parent"), fic("parent", "one", "s1", [parent]),
                        fic("parent", "two", "s2", [parent, f"[resourceId('{FIC}', 'parent', 'one')]"])])
    out = deploy(up, rg, "chained", ["create", "operations"], chained)
    assert out["create"]["properties"]["provisioning_state"] == "Succeeded", out
    ops = ops_by_name(out["operations"])
    assert {n: p["provisioning_state"] for n, p in ops.items()} == {
        "parent": "Succeeded", "parent/one": "Succeeded", "parent/two": "Succeeded"}


def test_copy_loop_of_50_identities_and_outputs(up):
    rg = rg_name("copy")
    t = template(
        [{**identity("[format('id-{0}', copyIndex())]"), "copy": {"name": "ids", "count": "[parameters('n')]"}}],
        parameters={"n": {"type": "int", "defaultValue": 50, "maxValue": 50}},
        outputs={"first": {"type": "string", "value": f"[reference(resourceId('{UAMI}', 'id-0')).clientId]"},
                 "count": {"type": "int", "value": "[parameters('n')]"}})
    out = deploy(up, rg, "copy50", ["group", "create", "operations", "resources"], t)
    d = out["create"]
    assert d["properties"]["provisioning_state"] == "Succeeded", out
    assert len(out["operations"]) == 50
    names = sorted(r.rsplit("/", 1)[1] for r in out["resources"])
    assert names == sorted(f"id-{i}" for i in range(50))
    assert d["properties"]["outputs"]["count"] == {"type": "Int", "value": 50}
    assert re.fullmatch(r"[0-9a-f-]{36}", d["properties"]["outputs"]["first"]["value"])


BAD = {
    "unknown function": (template([identity("[nosuchfunction('x')]")]), {}, "nosuchfunction"),
    "cycle": (template([identity("a", dependsOn=[f"[resourceId('{UAMI}', 'b')]"]),
                        identity("b", dependsOn=[f"[resourceId('{UAMI}', 'a')]"])]), {}, "Circular dependency"),
    "missing parameter": (template([identity("[parameters('name')]")], parameters={"name": {"type": "string"}}), {},
                          "name"),
    "wrong type": (template([identity("[string(parameters('count'))]")], parameters={"count": {"type": "int"}}),
                   {"count": {"value": "three"}}, "Expected 'Integer'. Actual 'String'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_template_is_refused_and_nothing_is_deployed(up, case):
    t, params, mentioned = BAD[case]
    rg = rg_name("bad")
    out = deploy(up, rg, "bad", ["group", "validate", "create", "exists", "resources"], t, params)
    # the SDK reads a refused validation as a result carrying the error (400)
    assert out["validate"]["error"]["code"] == "InvalidTemplate", out
    assert mentioned.lower() in out["validate"]["error"]["message"].lower(), out
    if case in ("missing parameter", "wrong type"):
        assert out["validate"]["error"]["target"].startswith("parameters."), out
    assert out["create"]["error"]["status"] == 400 and out["create"]["error"]["code"] == "InvalidTemplate", out
    assert out["exists"] is False
    assert out["resources"] == []


def test_a_failed_resource_is_reported_per_resource(up):
    rg = rg_name("fail")
    bad = fic("okay", "bad", "s1", [f"[resourceId('{UAMI}', 'okay')]"])
    bad["properties"]["issuer"] = "http://not-https.example"
    t = template([identity("okay"), bad, identity("after-bad", dependsOn=[f"[resourceId('{FIC}', 'okay', 'bad')]"]),
                  identity("independent")])
    out = deploy(up, rg, "partial", ["group", "create", "operations", "get", "resources"], t)
    err = out["create"]["error"]
    assert err["code"] == "DeploymentFailed", out
    assert len(err["details"]) == 1 and err["details"][0]["target"].endswith("/federatedIdentityCredentials/bad"), err
    ops = ops_by_name(out["operations"])
    assert ops["okay"]["provisioning_state"] == "Succeeded"
    assert ops["independent"]["provisioning_state"] == "Succeeded"
    assert ops["okay/bad"]["provisioning_state"] == "Failed"
    assert ops["okay/bad"]["status_code"] == "BadRequest"
    assert ops["okay/bad"]["status_message"]["error"]["code"] == err["details"][0]["code"]
    assert "after-bad" not in ops, "a resource whose dependency failed is not started"
    assert out["get"]["properties"]["provisioning_state"] == "Failed"
    assert sorted(r.rsplit("/", 1)[1] for r in out["resources"]) == ["independent", "okay"]


def test_complete_mode_deletes_what_the_template_no_longer_names(up):
    rg = rg_name("complete")
    out = deploy(up, rg, "first", ["group", "create"], template([identity("keep"), identity("drop")]))
    assert out["create"]["properties"]["provisioning_state"] == "Succeeded", out
    out = deploy(up, rg, "second", ["create", "operations", "resources"], template([identity("keep")]), mode="Complete")
    assert out["create"]["properties"]["provisioning_state"] == "Succeeded", out
    assert [r.rsplit("/", 1)[1] for r in out["resources"]] == ["keep"]
    deleted = [o["properties"] for o in out["operations"] if o["properties"]["provisioning_operation"] == "Delete"]
    assert [d["target_resource"]["resource_name"] for d in deleted] == ["drop"]


def test_delete_export_and_list(up):
    rg = rg_name("life")
    t = template([identity("[parameters('n')]")], parameters={"n": {"type": "string", "defaultValue": "one"}})
    out = deploy(up, rg, "life", ["group", "create", "export", "list", "exists", "delete", "exists", "resources"], t)
    assert out["export"] == t
    assert out["list"] == ["life"]
    assert out["delete"] == "deleted"
    assert out["exists"] is False
    # deleting a deployment keeps what it deployed
    assert [r.rsplit("/", 1)[1] for r in out["resources"]] == ["one"]
