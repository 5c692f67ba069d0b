"""Real python azure-identity against `keyless up`, through AZURE_POD_IDENTITY_AUTHORITY_HOST."""
import base64
import json
import urllib.request

import pytest

from conftest import audit_records, run_client, wait_audit

ARM = "https://management.azure.com"


def mirid(resource_id):
    return resource_id.replace("/resourceGroups/", "/resourcegroups/", 1)


def env_for(up, **extra):
    return {"AZURE_POD_IDENTITY_AUTHORITY_HOST": up.info["imdsUrl"], **extra}


def verify(up, audience):
    return {"authority": up.authority, "ca": up.info["caFile"], "audience": audience}


def assert_token(out, up, audience, principal_id, resource_id):
    assert "error" not in out, out
    c = out["claims"]
    assert c["aud"] == audience
    assert c["oid"] == principal_id
    assert c["sub"] == principal_id
    assert c["tid"] == up.info["tenantId"]
    assert c["idtyp"] == "app"
    assert c["ver"] == "1.0"
    assert c["xms_mirid"] == mirid(resource_id)
    assert c["iss"] == f"{up.authority}/"
    assert c["exp"] - c["iat"] >= 24 * 3600
    assert out["second_token_same"], "repeated calls must reuse the cached token"


def test_system_assigned(up):
    out = run_client({"credential": "mi", "scope": ARM + "/.default", "verify": verify(up, ARM)}, env_for(up))
    assert_token(out, up, ARM, up.info["systemIdentity"]["principalId"], up.info["vm"]["resourceId"])
    assert out["claims"]["appid"] == up.info["systemIdentity"]["clientId"]


def test_user_assigned_by_client_id(up):
    demo = up.info["demoIdentity"]
    out = run_client(
        {"credential": "mi", "kwargs": {"client_id": demo["clientId"]}, "scope": "https://vault.azure.net/.default",
         "verify": verify(up, "https://vault.azure.net")},
        env_for(up),
    )
    assert_token(out, up, "https://vault.azure.net", demo["principalId"], demo["resourceId"])
    assert out["claims"]["appid"] == demo["clientId"]


def test_user_assigned_by_object_id(up):
    demo = up.info["demoIdentity"]
    out = run_client(
        {"credential": "mi", "kwargs": {"identity_config": {"object_id": demo["principalId"]}},
         "scope": ARM + "/.default", "verify": verify(up, ARM)},
        env_for(up),
    )
    assert_token(out, up, ARM, demo["principalId"], demo["resourceId"])


def test_user_assigned_by_resource_id(up):
    # sync azure-identity 1.27 takes the resource id as identity_config["resource_id"] and MSAL
    # sends it as `msi_res_id` on the wire
    demo = up.info["demoIdentity"]
    out = run_client(
        {"credential": "mi", "kwargs": {"identity_config": {"resource_id": demo["resourceId"]}},
         "scope": ARM + "/.default", "verify": verify(up, ARM)},
        env_for(up),
    )
    assert_token(out, up, ARM, demo["principalId"], demo["resourceId"])


def test_user_assigned_by_msi_res_id_async(up):
    # azure.identity.aio sends identity_config keys verbatim: {"msi_res_id": ...} reaches IMDS
    demo = up.info["demoIdentity"]
    out = run_client(
        {"credential": "mi_async", "kwargs": {"identity_config": {"msi_res_id": demo["resourceId"]}},
         "scope": ARM + "/.default", "verify": verify(up, ARM)},
        env_for(up),
    )
    assert_token(out, up, ARM, demo["principalId"], demo["resourceId"])


def test_sync_client_ignores_msi_res_id_key(up):
    # Client behaviour, recorded: sync azure-identity 1.27 does not know the "msi_res_id" key and
    # silently asks for the system-assigned identity. Keyless answers what was asked on the wire.
    demo = up.info["demoIdentity"]
    out = run_client(
        {"credential": "mi", "kwargs": {"identity_config": {"msi_res_id": demo["resourceId"]}},
         "scope": ARM + "/.default", "verify": verify(up, ARM)},
        env_for(up),
    )
    assert_token(out, up, ARM, up.info["systemIdentity"]["principalId"], up.info["vm"]["resourceId"])


def test_default_azure_credential(up):
    out = run_client({"credential": "dac", "scope": ARM + "/.default", "verify": verify(up, ARM)}, env_for(up))
    assert_token(out, up, ARM, up.info["systemIdentity"]["principalId"], up.info["vm"]["resourceId"])


def test_async_credentials(up):
    for kind in ("mi_async", "dac_async"):
        out = run_client({"credential": kind, "scope": ARM + "/.default", "verify": verify(up, ARM)}, env_for(up))
        assert_token(out, up, ARM, up.info["systemIdentity"]["principalId"], up.info["vm"]["resourceId"])


def test_default_azure_credential_with_client_id_env(up):
    # DAC passes AZURE_CLIENT_ID as the IMDS client_id
    demo = up.info["demoIdentity"]
    out = run_client(
        {"credential": "dac", "scope": ARM + "/.default", "verify": verify(up, ARM)},
        env_for(up, AZURE_CLIENT_ID=demo["clientId"]),
    )
    assert_token(out, up, ARM, demo["principalId"], demo["resourceId"])


def test_unknown_client_id_is_refused(up):
    out = run_client(
        {"credential": "mi", "kwargs": {"client_id": "00000000-0000-0000-0000-000000000000"}, "scope": ARM + "/.default"},
        env_for(up),
    )
    assert out.get("error") in ("CredentialUnavailableError", "ClientAuthenticationError"), out
    assert "Identity not found" in out["message"]


def test_node_style_request_with_trailing_slash_and_encoded_resource(up):
    # msal-node asks for .../token/ with an encoded resource and a Content-Type on a GET
    url = up.info["imdsUrl"] + "/metadata/identity/oauth2/token/?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net"
    req = urllib.request.Request(url, headers={"Metadata": "true", "Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req) as r:
        body = json.load(r)
    for k in ["access_token", "expires_in", "expires_on", "ext_expires_in", "not_before", "resource", "token_type", "client_id"]:
        assert isinstance(body[k], str), k
    assert body["resource"] == "https://vault.azure.net"
    assert body["refresh_token"] == ""
    payload = json.loads(base64.urlsafe_b64decode(body["access_token"].split(".")[1] + "=="))
    assert payload["aud"] == "https://vault.azure.net"


@pytest.mark.parametrize(
    "headers,query,status,fragment",
    [
        ({}, "api-version=2018-02-01&resource=x", 400, "Required metadata header not specified"),
        ({"Metadata": "false"}, "api-version=2018-02-01&resource=x", 400, "Required metadata header"),
        ({"Metadata": "true", "X-Forwarded-For": "10.0.0.1"}, "api-version=2018-02-01&resource=x", 400, "X-Forwarded-For"),
        ({"Metadata": "true"}, "api-version=2018-02-01", 400, "Required audience parameter not specified"),
        ({"Metadata": "true"}, "api-version=1999-01-01&resource=x", 400, "api-version is invalid"),
        ({"Metadata": "true"}, "api-version=2018-02-01&resource=x&resource=y", 400, "Duplicate"),
        ({"Metadata": "true"}, "api-version=2018-02-01&resource=https://x&client_id=nope", 400, "Identity not found"),
        # the audience must be an absolute URI or a GUID, bounded (keyless_core::audience)
        ({"Metadata": "true"}, "api-version=2018-02-01&resource=%ZZ", 400, "invalid_resource"),
        ({"Metadata": "true"}, "api-version=2018-02-01&resource=https://x/%0D%0Ay", 400, "invalid_resource"),
    ],
)
def test_imds_refusals(up, headers, query, status, fragment):
    audit = up.data_dir / "audit.log"
    before = len(audit_records(audit))
    req = urllib.request.Request(up.info["imdsUrl"] + "/metadata/identity/oauth2/token?" + query, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == status
    body = e.value.read().decode()
    assert fragment in body
    # recorded with the local caller and the code the answer carries ("Identity not found",
    # sent as invalid_request, is recorded as identity_not_found)
    v = json.loads(body)
    reason = "identity_not_found" if v.get("error_description") == "Identity not found" else v["error"]
    wait_audit(audit, query, lambda r: r["seq"] > before and r.get("surface") == "imds" and r["outcome"] == "refused"
               and r["status"] == status and r["reason"] == reason and r["caller"]["peer"].startswith("127.0.0.1:"))


def test_instance_metadata(up):
    req = urllib.request.Request(up.info["imdsUrl"] + "/metadata/instance?api-version=2021-02-01", headers={"Metadata": "true"})
    with urllib.request.urlopen(req) as r:
        doc = json.load(r)
    assert doc["compute"]["resourceId"] == up.info["vm"]["resourceId"]
    assert doc["compute"]["vmId"] == up.info["vm"]["vmId"]
    assert doc["compute"]["subscriptionId"] == up.info["subscriptionId"]
    req = urllib.request.Request(
        up.info["imdsUrl"] + "/metadata/instance/compute/name?api-version=2021-02-01&format=text", headers={"Metadata": "true"}
    )
    with urllib.request.urlopen(req) as r:
        assert r.read().decode() == up.info["vm"]["resourceId"].rsplit("/", 1)[1]
