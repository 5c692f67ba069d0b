"""Real python management SDKs (azure-mgmt-msi, azure-mgmt-authorization) against `keyless up`,
with a schema check of the msi responses against the OpenAPI document in shared/openapi."""
import json
import pathlib

import pytest

from conftest import ROOT, run_client  # noqa: F401  (run_client: same process conventions)

import os
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
OPENAPI = ROOT.parent / "shared" / "openapi" / "msi-2023-01-31.json"


def run_mgmt(up, args):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(),
           "REQUESTS_CA_BUNDLE": up.info["caFile"]}
    out = subprocess.run([sys.executable, str(HERE / "mgmt_client.py"), json.dumps(args)], env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def identity_schema():
    if not OPENAPI.exists():
        pytest.fail(f"{OPENAPI} is missing")
    doc = json.loads(OPENAPI.read_text())
    # resolve local refs into a self-contained JSON schema
    defs = doc["definitions"]

    # common-types v4 TrackedResource (referenced from outside this document)
    tracked = {
        "type": "object",
        "required": ["location"],
        "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "type": {"type": "string"},
            "location": {"type": "string"},
            "tags": {"type": "object", "additionalProperties": {"type": "string"}},
            "systemData": {"type": "object"},
        },
    }

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node and node["$ref"].startswith("#/definitions/"):
                return resolve(defs[node["$ref"].split("/")[-1]])
            if "$ref" in node and node["$ref"].endswith("#/definitions/TrackedResource"):
                return tracked
            return {k: resolve(v) for k, v in node.items() if not k.startswith("x-ms-")}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(defs["Identity"])


def test_msi_and_authorization_clients(up):
    args = {"server": up.info["serverUrl"], "tenant": up.info["tenantId"], "client_id": up.info["adminClientId"],
            "secret": up.admin_secret, "subscription": up.info["subscriptionId"], "resource_group": "keyless",
            "identity": "mgmt-sdk-id"}
    out = run_mgmt(up, args)
    created = out["created"]
    assert created["name"] == "mgmt-sdk-id"
    assert created["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities"
    assert created["tenant_id"] == up.info["tenantId"]
    assert created["principal_id"] and created["client_id"]
    assert out["updated"]["tags"] == {"k": "v2"}
    assert "mgmt-sdk-id" in out["list_rg"] and "mgmt-sdk-id" in out["list_sub"]
    assert out["reader"]["name"] == "Reader"
    assert out["reader"]["id"].endswith("acdd72a7-3385-48ef-bd42-f606fba81ae7")
    assert out["assignment"]["principal_id"] == created["principal_id"]
    assert out["assignment_get"] in out["assignments_for"]
    assert out["assignment_get"] not in out["after_delete"]
    assert out["get_after_delete"] == "ResourceNotFoundError"


def test_msi_responses_validate_against_openapi(up):
    import jsonschema
    import urllib.request
    import ssl

    schema = identity_schema()
    # a raw GET of the demo identity, as the service returns it
    from azure.identity import ClientSecretCredential

    cred = ClientSecretCredential(up.info["tenantId"], up.info["adminClientId"], up.admin_secret,
                                  authority=up.info["serverUrl"], disable_instance_discovery=True,
                                  connection_verify=up.info["caFile"])
    token = cred.get_token("https://management.azure.com/.default").token
    ctx = ssl.create_default_context(cafile=up.info["caFile"])
    for version in ("2023-01-31", "2018-11-30", "2024-11-30"):
        req = urllib.request.Request(up.info["serverUrl"] + up.info["demoIdentity"]["resourceId"] + f"?api-version={version}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, context=ctx) as r:
            body = json.load(r)
        jsonschema.validate(body, schema, format_checker=jsonschema.FormatChecker())
        # read-only properties the schema marks are all present
        for k in ("tenantId", "principalId", "clientId"):
            assert body["properties"][k]
    # the check itself can fail
    broken = json.loads(json.dumps(body))
    broken["properties"]["principalId"] = 5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    lst = urllib.request.Request(up.info["serverUrl"] + f"/subscriptions/{up.info['subscriptionId']}/providers/Microsoft.ManagedIdentity/userAssignedIdentities?api-version=2023-01-31",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(lst, context=ctx) as r:
        for item in json.load(r)["value"]:
            jsonschema.validate(item, schema, format_checker=jsonschema.FormatChecker())
