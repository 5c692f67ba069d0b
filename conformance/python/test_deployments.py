"""ARM template deployments (`Microsoft.Resources/deployments`) against `keyless up`, driven by
the real clients: the Azure CLI (`az deployment group create` with seed 003's template as
written) and python `azure-mgmt-resource` (validate, create, operations, delete)."""
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import uuid

import pytest

from conftest import ROOT
from az_cli import AzError
from test_az_cli import az, logged_in  # noqa: F401  (the az fixtures: a registered cloud, logged in)

HERE = pathlib.Path(__file__).resolve().parent
SEED_003 = ROOT.parent / "shared" / "seeds" / "003_de762688557c05ac.txt"
UAMI = "Microsoft.ManagedIdentity/userAssignedIdentities"
FIC = f"{UAMI}/federatedIdentityCredentials"
SCHEMA = "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#"


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
    # the writes the deployment made carry its correlation id in the Activity Log, as ARM's do
    acts = az("monitor", "activity-log", "list", "--offset", "1h", "--correlation-id",
              d["properties"]["correlationId"])
    made = {(e["operationName"]["value"], e["status"]["value"]) for e in acts}
    assert {(f"{UAMI}/write", "Succeeded"), (f"{FIC}/write", "Succeeded")} <= made, made


def seed_003_parameters(subject):
    return ["--parameters", "location=local", "userAssignedIdentityName=FIC_UA",
            "federatedIdentityCredential=testCredential",
            "federatedIdentityCredentialIssuer=https://oidc.keyless.example/issuer-1",
            f"federatedIdentityCredentialSubject={subject}",
            "federatedIdentityCredentialAudience=api://AzureADTokenExchange"]


def test_what_if_with_az(logged_in, up):
    """`az deployment group what-if` (and `create --what-if`): before a deployment everything is
    Create; after it the same template is NoChange; a changed parameter is a Modify of that
    property; the group's other resources are Ignore, or Delete in complete mode. Nothing is
    written by a what-if."""
    az, _ = logged_in
    rg = rg_name("whatif")
    az("group", "create", "-n", rg, "-l", "local")
    path = az.dir / "seed003-whatif.json"
    path.write_text(seed_003_template())
    sub = "system:serviceaccount:ns:svcaccount"

    def what_if(subject, *extra):
        r = az("deployment", "group", "what-if", "-g", rg, "-n", "w", "--template-file", str(path),
               *seed_003_parameters(subject), "--no-pretty-print", *extra)
        assert r["status"] == "Succeeded", r
        return {c["resourceId"].rsplit("/", 1)[1]: c for c in r["changes"]}

    first = what_if(sub)
    assert {k: c["changeType"] for k, c in first.items()} == {"FIC_UA": "Create", "testCredential": "Create"}
    assert first["testCredential"]["after"]["properties"]["subject"] == sub
    assert az("identity", "list", "-g", rg) == [], "a what-if writes nothing"
    # the pretty form az prints by default reads the same result
    pretty = az.run("deployment", "group", "what-if", "-g", rg, "-n", "w", "--template-file", str(path),
                    *seed_003_parameters(sub)).stdout
    assert "Resource changes: 2 to create." in pretty, pretty
    az("deployment", "group", "create", "-g", rg, "-n", "seed003", "--template-file", str(path),
       *seed_003_parameters(sub))
    az("identity", "create", "-g", rg, "-n", "bystander")
    same = what_if(sub)
    assert {k: c["changeType"] for k, c in same.items()} == {
        "FIC_UA": "NoChange", "testCredential": "NoChange", "bystander": "Ignore"}, same
    # the provider's own members are in the predicted state, not reported as changes
    assert same["FIC_UA"]["after"]["properties"]["principalId"]
    changed = what_if("system:serviceaccount:ns:other")
    assert changed["testCredential"]["changeType"] == "Modify"
    assert changed["testCredential"]["delta"] == [{
        "path": "properties.subject", "propertyChangeType": "Modify", "before": sub,
        "after": "system:serviceaccount:ns:other", "children": None}], changed
    complete = what_if(sub, "--mode", "Complete")
    assert complete["bystander"]["changeType"] == "Delete"
    assert az("identity", "show", "-g", rg, "-n", "bystander")["name"] == "bystander"
    fic = az("identity", "federated-credential", "show", "-g", rg, "--identity-name", "FIC_UA", "-n", "testCredential")
    assert fic["subject"] == sub, "a what-if writes nothing"


def test_a_key_vault_reference_in_a_parameters_file_with_az(logged_in, up):
    """`az deployment group create --parameters @file` whose file passes a secret by Key Vault
    reference: the value reaches the template and is echoed by nothing az shows; a vault that
    does not allow template deployments refuses with ARM's code."""
    from conftest import remember_secret
    from test_az_cli import arm
    az, _ = logged_in
    sub = up.info["subscriptionId"]
    rg = rg_name("kvref")
    az("group", "create", "-n", rg, "-l", "local")
    vault_name = f"ref{uuid.uuid4().hex[:8]}"
    vault = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/{KV}/{vault_name}"

    def put_vault(enabled):
        arm(up, "PUT", vault, {"location": "local", "properties": {
            "tenantId": up.info["tenantId"], "sku": {"family": "A", "name": "standard"},
            "accessPolicies": [], "enabledForTemplateDeployment": enabled}}, api_version="2023-07-01")

    put_vault(False)
    value = f"kvref-{uuid.uuid4().hex}"
    remember_secret(value)
    arm(up, "PUT", f"{vault}/secrets/app-password", {"properties": {"value": value}}, api_version="2023-07-01")
    # the tag carries base64 of the value, so that the test can check the exact value arrived
    # without putting the raw secret into a field that is no secret (the store's debug log of
    # statement parameters shows tags, and the suite searches every log for the raw value)
    t = template([identity("kvref-id", tags={"seen": "[base64(parameters('password'))]"})],
                 parameters={"password": {"type": "securestring"}})
    (az.dir / "kvref.json").write_text(json.dumps(t))
    (az.dir / "kvref.parameters.json").write_text(json.dumps({
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {"password": {"reference": {"keyVault": {"id": vault}, "secretName": "app-password"}}}}))
    args = ["deployment", "group", "create", "-g", rg, "-n", "kvref", "--template-file",
            str(az.dir / "kvref.json"), "--parameters", f"@{az.dir / 'kvref.parameters.json'}"]
    with pytest.raises(AzError) as e:
        az(*args)
    assert "KeyVaultParameterReferenceSecretRetrieveFailed" in e.value.stderr, e.value.stderr[-2000:]
    assert value not in e.value.stderr
    put_vault(True)
    d = az(*args)
    assert d["properties"]["provisioningState"] == "Succeeded", d
    assert d["properties"]["parameters"]["password"] == {"type": "SecureString"}
    assert value not in json.dumps(d)
    import base64
    assert az("identity", "show", "-g", rg, "-n", "kvref-id")["tags"] == {
        "seen": base64.b64encode(value.encode()).decode()}


def test_what_if_looks_into_a_nested_deployment_as_bicep_modules_compile(up):
    """A Bicep module compiles to a nested deployment with inner expression scope: what-if
    shows the module's resources (not the deployment) at the module's group, with its own
    parameters; after the deployment the same template is NoChange throughout."""
    rg = rg_name("nested")
    module = {"type": "Microsoft.Resources/deployments", "apiVersion": "2022-09-01", "name": "idModule",
              "properties": {"mode": "Incremental", "expressionEvaluationOptions": {"scope": "inner"},
                             "parameters": {"name": {"value": "[concat(parameters('prefix'), '-mod')]"},
                                            "label": {"value": "[parameters('pw')]"}},
                             "template": template(
                                 [identity("[parameters('name')]", tags={"label": "[parameters('label')]"}),
                                  {**fic("x", "fic", "system:serviceaccount:ns:mod",
                                         ["[resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', parameters('name'))]"]),
                                   "name": "[concat(parameters('name'), '/fic')]"}],
                                 parameters={"name": {"type": "string"}, "label": {"type": "string"}})}}
    t = template([identity("[concat(parameters('prefix'), '-top')]"), module],
                 parameters={"prefix": {"type": "string", "defaultValue": "app"},
                             "pw": {"type": "securestring"}})
    secret = f"nested-{uuid.uuid4().hex}"

    def kinds(result):
        return {c["resource_id"].split("/providers/", 1)[1]: c["change_type"] for c in result["changes"]}

    params = {"pw": {"value": secret}}
    out = deploy(up, rg, "nested", ["group", "whatif"], t, params)
    # a secure value handed to a module's plain parameter is still shown as none
    assert secret not in json.dumps(out["whatif"]), out["whatif"]
    assert kinds(out["whatif"]) == {
        f"{UAMI}/app-top": "Create", f"{UAMI}/app-mod": "Create",
        f"{UAMI}/app-mod/federatedIdentityCredentials/fic": "Create"}, out
    out = deploy(up, rg, "nested", ["create", "whatif"], t, params)
    assert out["create"]["properties"]["provisioning_state"] == "Succeeded", out
    assert set(kinds(out["whatif"]).values()) == {"NoChange"}, out["whatif"]


def test_what_if_with_the_sdk_never_shows_a_secure_value(kv):
    value = f"whatif-{uuid.uuid4().hex}"
    from conftest import remember_secret
    remember_secret(value)
    demo = kv.up.info["demoIdentity"]
    name = f"wi-{uuid.uuid4().hex[:8]}"
    params = {"vaultName": {"value": name}, "objectId": {"value": demo["principalId"]},
              "secretValue": {"value": value}}
    rg = rg_name("kvwhatif")

    def kinds(result):
        return {c["resource_id"].split("/providers/", 1)[1]: c["change_type"] for c in result["changes"]}

    out = deploy(kv.up, rg, "vault", ["group", "whatif"], vault_template(), params)
    assert value not in json.dumps(out)
    assert kinds(out["whatif"]) == {
        f"{KV}/{name}": "Create", f"{KV}/{name}/secrets/app-secret": "Create",
        # a type without a GET (it is applied to its vault): its change cannot be told
        f"{KV}/{name}/accessPolicies/add": "Unsupported"}, out
    out = deploy(kv.up, rg, "vault", ["create", "whatif"], vault_template(), params)
    assert out["create"]["properties"]["provisioning_state"] == "Succeeded", out
    assert value not in json.dumps(out)
    got = kinds(out["whatif"])
    assert got[f"{KV}/{name}/secrets/app-secret"] == "NoChange", out["whatif"]
    # redeploying would set the vault's access policies back to the template's empty list (as
    # ARM would), the access-policy resource adding its policy again
    vault = next(c for c in out["whatif"]["changes"] if c["resource_id"].endswith(f"{KV}/{name}"))
    assert vault["change_type"] == "Modify", vault
    assert [d["path"] for d in vault["delta"]] == ["properties.accessPolicies"], vault


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


KV = "Microsoft.KeyVault/vaults"


def vault_template():
    vault_id = f"resourceId('{KV}', parameters('vaultName'))"
    vault = f"[{vault_id}]"
    return template(
        [{"type": KV, "apiVersion": "2023-07-01", "name": "[parameters('vaultName')]",
          "location": "[resourceGroup().location]",
          "properties": {"tenantId": "[subscription().tenantId]", "sku": {"family": "A", "name": "standard"},
                         "accessPolicies": []}},
         {"type": f"{KV}/accessPolicies", "apiVersion": "2023-07-01", "name": "[concat(parameters('vaultName'), '/add')]",
          "dependsOn": [vault],
          "properties": {"accessPolicies": [{"tenantId": "[subscription().tenantId]", "objectId": "[parameters('objectId')]",
                                             "permissions": {"secrets": ["get"]}}]}},
         {"type": f"{KV}/secrets", "apiVersion": "2023-07-01", "name": "[format('{0}/{1}', parameters('vaultName'), 'app-secret')]",
          "dependsOn": [vault], "properties": {"value": "[parameters('secretValue')]"}}],
        parameters={"vaultName": {"type": "string", "minLength": 3, "maxLength": 24},
                    "objectId": {"type": "string"}, "secretValue": {"type": "securestring"}},
        outputs={"vaultUri": {"type": "string", "value": f"[reference({vault_id}).vaultUri]"},
                 # a vault's URL as templates build it from the cloud's suffix
                 "builtUri": {"type": "string",
                              "value": "[concat('https://', parameters('vaultName'), environment().suffixes.keyvaultDns, '/')]"}})


def test_vault_access_policy_and_secret_then_the_identity_reads_it(kv):
    from conftest import remember_secret
    name = f"dep-{uuid.uuid4().hex[:8]}"
    value = f"deployed-{uuid.uuid4().hex}"
    remember_secret(value)
    demo = kv.up.info["demoIdentity"]
    params = {"vaultName": {"value": name}, "objectId": {"value": demo["principalId"]},
              "secretValue": {"value": value}}
    rg = rg_name("kv")
    out = deploy(kv.up, rg, "vault", ["group", "validate", "create", "get", "operations", "export"],
                 vault_template(), params)
    assert out["create"]["properties"]["provisioning_state"] == "Succeeded", out
    outputs = out["create"]["properties"]["outputs"]
    assert outputs["vaultUri"]["value"].startswith(f"https://{name}.vault.")
    assert outputs["builtUri"]["value"] == outputs["vaultUri"]["value"]
    # a secure parameter is never echoed: not by validate, the deployment, its operations or export
    assert out["get"]["properties"]["parameters"]["secretValue"] == {"type": "SecureString"}
    assert value not in json.dumps(out)
    kinds = sorted(o["properties"]["target_resource"]["resource_type"] for o in out["operations"])
    assert kinds == [KV, f"{KV}/accessPolicies", f"{KV}/secrets"]
    # the identity, given "get" by the template's access policy, reads the template's secret
    kv.vaults.append(name)
    kv._write_hosts()
    got = kv.py("read_secret", name, name="app-secret", client_id=demo["clientId"])
    assert got == {"ok": value}, got
    # the host's system identity got no policy: refused by the vault
    denied = kv.py("read_secret", name, name="app-secret")
    assert denied["error"]["status"] == 403, denied


def test_every_served_type_deploys(up):
    """One template with every resource type Keyless serves, wired by expressions: an
    identity with a credential and a Reader role on itself, a VM and a scale set holding it, a
    Batch account with a pool holding it, a vault with an access policy and a secret, and a
    managed cluster."""
    rg = rg_name("all")
    ident_id = f"resourceId('{UAMI}', 'app-id')"
    ident = f"[{ident_id}]"
    holds = {"type": "UserAssigned", "userAssignedIdentities": {ident: {}}}
    reader = "[subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'acdd72a7-3385-48ef-bd42-f606fba81ae7')]"
    vault = "[resourceId('Microsoft.KeyVault/vaults', variables('vault'))]"
    t = template(
        [identity("app-id"),
         fic("app-id", "github-ci", "repo:org/app:ref:refs/heads/main", [ident]),
         {"type": "Microsoft.Authorization/roleAssignments", "apiVersion": "2022-04-01",
          "name": "[guid(resourceGroup().id, 'app-id', 'reader')]", "dependsOn": [ident],
          "properties": {"roleDefinitionId": reader, "principalId": f"[reference({ident_id}).principalId]",
                         "principalType": "ServicePrincipal"}},
         {"type": "Microsoft.Compute/virtualMachines", "apiVersion": "2021-07-01", "name": "vm1", "location": "local",
          "dependsOn": [ident], "identity": holds},
         {"type": "Microsoft.Compute/virtualMachineScaleSets", "apiVersion": "2021-07-01", "name": "ss1",
          "location": "local", "dependsOn": [ident], "identity": holds},
         {"type": "Microsoft.Batch/batchAccounts", "apiVersion": "2024-07-01", "name": "[variables('batch')]",
          "location": "local"},
         {"type": "Microsoft.Batch/batchAccounts/pools", "apiVersion": "2024-07-01",
          "name": "[concat(variables('batch'), '/pool1')]", "identity": holds,
          "dependsOn": [ident, "[resourceId('Microsoft.Batch/batchAccounts', variables('batch'))]"],
          "properties": {"scaleSettings": {"fixedScale": {"targetDedicatedNodes": 1}}}},
         {"type": "Microsoft.KeyVault/vaults", "apiVersion": "2023-07-01", "name": "[variables('vault')]",
          "location": "local", "properties": {"tenantId": "[subscription().tenantId]",
                                              "sku": {"family": "A", "name": "standard"}, "accessPolicies": []}},
         {"type": "Microsoft.KeyVault/vaults/accessPolicies", "apiVersion": "2023-07-01",
          "name": "[concat(variables('vault'), '/add')]", "dependsOn": [vault, ident],
          "properties": {"accessPolicies": [{"tenantId": "[subscription().tenantId]",
                                             "objectId": f"[reference({ident_id}).principalId]",
                                             "permissions": {"secrets": ["get", "list"]}}]}},
         {"type": "Microsoft.KeyVault/vaults/secrets", "apiVersion": "2023-07-01",
          "name": "[concat(variables('vault'), '/s1')]", "dependsOn": [vault], "properties": {"value": "v1"}},
         {"type": "Microsoft.ContainerService/managedClusters", "apiVersion": "2024-07-01", "name": "aks1",
          "location": "local", "identity": {"type": "SystemAssigned"},
          "properties": {"dnsPrefix": "aks1", "agentPoolProfiles": [{"name": "np1", "count": 1, "mode": "System"}]}}],
        variables={"batch": "[concat('batch', uniqueString(resourceGroup().id))]",
                   "vault": "[concat('kv-', uniqueString(resourceGroup().id))]"},
        outputs={"principal": {"type": "string", "value": f"[reference({ident_id}).principalId]"},
                 "vmIdentities": {"type": "object", "value": "[reference(resourceId('Microsoft.Compute/virtualMachines', 'vm1'), '2021-07-01', 'Full').identity.userAssignedIdentities]"}})
    out = deploy(up, rg, "everything", ["group", "create", "operations", "resources"], t)
    assert out["create"]["properties"]["provisioning_state"] == "Succeeded", json.dumps(out)[-3000:]
    ops = out["operations"]
    assert all(o["properties"]["provisioning_state"] == "Succeeded" for o in ops)
    types = sorted({o["properties"]["target_resource"]["resource_type"] for o in ops})
    assert types == sorted([UAMI, FIC, "Microsoft.Authorization/roleAssignments", "Microsoft.Compute/virtualMachines",
                            "Microsoft.Compute/virtualMachineScaleSets", "Microsoft.Batch/batchAccounts",
                            "Microsoft.Batch/batchAccounts/pools", "Microsoft.KeyVault/vaults",
                            "Microsoft.KeyVault/vaults/accessPolicies", "Microsoft.KeyVault/vaults/secrets",
                            "Microsoft.ContainerService/managedClusters"])
    outputs = out["create"]["properties"]["outputs"]
    assert re.fullmatch(r"[0-9a-f-]{36}", outputs["principal"]["value"])
    held = {k.lower() for k in outputs["vmIdentities"]["value"]}
    assert any(k.endswith("/userassignedidentities/app-id") for k in held), outputs
    listed = {r.rsplit("/", 1)[1] for r in out["resources"]}
    assert {"app-id", "vm1", "ss1", "aks1"} <= listed, listed


SUB_SCHEMA = "https://schema.management.azure.com/schemas/2018-05-01/subscriptionDeploymentTemplate.json#"


def test_subscription_scope_creates_a_group_and_deploys_into_it_with_az(logged_in, up):
    az, _ = logged_in
    rg = rg_name("subscope")
    t = {"$schema": SUB_SCHEMA, "contentVersion": "1.0.0.0",
         "parameters": {"rgName": {"type": "string"}, "identityName": {"type": "string"}},
         "resources": [
             {"type": "Microsoft.Resources/resourceGroups", "apiVersion": "2022-09-01",
              "name": "[parameters('rgName')]", "location": "[deployment().location]", "tags": {"made-by": "sub"}},
             {"type": "Microsoft.Resources/deployments", "apiVersion": "2022-09-01", "name": "inside",
              "resourceGroup": "[parameters('rgName')]",
              "dependsOn": ["[resourceId('Microsoft.Resources/resourceGroups', parameters('rgName'))]"],
              "properties": {
                  "mode": "Incremental", "expressionEvaluationOptions": {"scope": "inner"},
                  "parameters": {"name": {"value": "[parameters('identityName')]"}},
                  "template": {"$schema": SCHEMA, "contentVersion": "1.0.0.0",
                               "parameters": {"name": {"type": "string"}},
                               "resources": [identity("[parameters('name')]")],
                               "outputs": {"clientId": {"type": "string",
                                                        "value": f"[reference(resourceId('{UAMI}', parameters('name'))).clientId]"}}}}}],
         "outputs": {"clientId": {"type": "string",
                                  "value": "[reference('inside').outputs.clientId.value]"}}}
    path = az.dir / "sub.json"
    path.write_text(json.dumps(t, indent=2))
    # what-if first: the group, and inside it (a group that does not exist yet) the identity
    w = az("deployment", "sub", "what-if", "-l", "local", "-n", f"sub-{rg}", "--template-file", str(path),
           "--parameters", f"rgName={rg}", "identityName=made-inside", "--no-pretty-print")
    sub_id = up.info["subscriptionId"]
    assert {c["resourceId"].lower(): c["changeType"] for c in w["changes"]} == {
        f"/subscriptions/{sub_id}/resourcegroups/{rg}".lower(): "Create",
        f"/subscriptions/{sub_id}/resourceGroups/{rg}/providers/{UAMI}/made-inside".lower(): "Create"}, w
    with pytest.raises(AzError):
        az("group", "show", "-n", rg)
    d = az("deployment", "sub", "create", "-l", "local", "-n", f"sub-{rg}", "--template-file", str(path),
           "--parameters", f"rgName={rg}", "identityName=made-inside")
    assert d["properties"]["provisioningState"] == "Succeeded", d
    assert d["location"] == "local"
    group = az("group", "show", "-n", rg)
    assert group["tags"] == {"made-by": "sub"}
    ident = az("identity", "show", "-g", rg, "-n", "made-inside")
    assert d["properties"]["outputs"]["clientId"]["value"] == ident["clientId"]
    shown = az("deployment", "sub", "show", "-n", f"sub-{rg}")
    assert shown["id"] == f"/subscriptions/{up.info['subscriptionId']}/providers/Microsoft.Resources/deployments/sub-{rg}"
    ops = az("deployment", "operation", "sub", "list", "-n", f"sub-{rg}")
    assert sorted(o["properties"]["targetResource"]["resourceType"] for o in ops) == [
        "Microsoft.Resources/deployments", "Microsoft.Resources/resourceGroups"]
    inner = az("deployment", "group", "show", "-g", rg, "-n", "inside")
    assert inner["properties"]["provisioningState"] == "Succeeded"
    assert any(x["name"] == f"sub-{rg}" for x in az("deployment", "sub", "list"))
