"""The real Azure CLI (azure-cli 2.91.0) against `keyless up` as a custom cloud: cloud
registration from the server's ARM metadata, service-principal and managed-identity login,
the seeds' commands (identities, federated credentials, role assignments, Key Vault secrets,
groups), ARM lists paged with `nextLink`, and `az monitor activity-log list` showing the writes
(Microsoft.Insights event list)."""
import base64
import json
import os
import pathlib
import shutil
import subprocess
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests

from az_cli import AzError, az_bin, new_az
from conftest import can_remap_hosts, remember_secret


@pytest.fixture(scope="module")
def az(up):
    if not pathlib.Path(az_bin()).exists():
        if os.environ.get("CI"):
            pytest.fail(f"the Azure CLI is missing at {az_bin()} (scripts/test installs it)")
        pytest.skip(f"the Azure CLI is not installed at {az_bin()}")
    cli = new_az(up)
    try:
        yield cli
    finally:
        shutil.rmtree(cli.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def logged_in(az, up):
    subs = az.login()
    return az, subs


def test_cloud_registered_from_metadata_and_login(logged_in, up):
    az, subs = logged_in
    base = up.info["serverUrl"]
    cloud = az("cloud", "show", "-n", "Keyless")
    ep = cloud["endpoints"]
    assert ep["resourceManager"].rstrip("/") == base
    assert ep["activeDirectory"].rstrip("/") == base
    assert ep["activeDirectoryResourceId"] == f"{base}/"
    # the vaults' URLs carry the server's port: so does the suffix az appends to a vault's name
    port = base.rsplit(":", 1)[1]
    assert cloud["suffixes"]["keyvaultDns"] == f".vault.{up.info['vaultDomain']}:{port}"
    assert up.info["vaultUriTemplate"] == f"https://{{vault}}{cloud['suffixes']['keyvaultDns']}/"
    assert [s["id"] for s in subs] == [up.info["subscriptionId"]]
    account = az("account", "show")
    assert account["id"] == up.info["subscriptionId"]
    assert account["tenantId"] == up.info["tenantId"]
    assert account["user"] == {"name": up.info["adminClientId"], "type": "servicePrincipal"}


def events(az, *args):
    return az("monitor", "activity-log", "list", "--offset", "1h", "--max-events", "500", *args)


def test_activity_log_shows_the_writes(logged_in, up):
    az, _ = logged_in
    rg = f"az-act-{uuid.uuid4().hex[:8]}"
    group = az("group", "create", "-n", rg, "-l", "westeurope")
    ident = az("identity", "create", "-g", rg, "-n", "act-id")
    az("identity", "delete", "-g", rg, "-n", "act-id")
    # a write that fails: the group does not exist (with -l, az PUTs without reading the group)
    missing = f"{rg}-missing"
    with pytest.raises(AzError):
        az("identity", "create", "-g", missing, "-n", "nope", "-l", "westeurope")

    got = events(az, "--resource-group", rg)
    ops = [(e["operationName"]["value"], e["status"]["value"]) for e in got]
    # newest first
    assert ops == [
        ("Microsoft.ManagedIdentity/userAssignedIdentities/delete", "Succeeded"),
        ("Microsoft.ManagedIdentity/userAssignedIdentities/write", "Succeeded"),
        ("Microsoft.Resources/subscriptions/resourceGroups/write", "Succeeded"),
    ], ops
    write = got[1]
    assert write["resourceId"] == ident["id"]
    assert write["resourceGroupName"] == rg
    assert write["resourceProviderName"]["value"] == "Microsoft.ManagedIdentity"
    assert write["resourceType"]["value"] == "Microsoft.ManagedIdentity/userAssignedIdentities"
    assert write["category"]["value"] == "Administrative"
    assert write["subStatus"]["value"] == "Created"
    assert write["subscriptionId"] == up.info["subscriptionId"]
    assert write["tenantId"] == up.info["tenantId"]
    assert write["authorization"] == {"action": write["operationName"]["value"], "scope": ident["id"]}
    assert write["httpRequest"]["method"] == "PUT"
    assert got[2]["resourceId"] == group["id"]
    assert got[0]["subStatus"]["value"] == "OK"
    # the caller is the admin service principal's object id; its app id is in the claims
    caller = write["caller"]
    assert all(e["caller"] == caller for e in got)
    assert write["claims"]["appid"] == up.info["adminClientId"]
    assert write["claims"]["http://schemas.microsoft.com/identity/claims/objectidentifier"] == caller
    # az sends its own x-ms-correlation-request-id per command: the three writes differ
    assert len({e["correlationId"] for e in got}) == 3
    for e in got:
        assert e["eventTimestamp"].endswith("Z") and e["eventDataId"] and e["id"].startswith(e["resourceId"])

    failed = events(az, "--resource-group", missing)
    assert [(e["operationName"]["value"], e["status"]["value"], e["subStatus"]["value"]) for e in failed] == [
        ("Microsoft.ManagedIdentity/userAssignedIdentities/write", "Failed", "NotFound")]

    # --correlation-id, --resource-id, --caller, --status narrow the list
    by_corr = events(az, "--correlation-id", write["correlationId"])
    assert [e["eventDataId"] for e in by_corr] == [write["eventDataId"]]
    by_id = events(az, "--resource-id", ident["id"])
    assert [e["operationName"]["value"] for e in by_id] == [
        "Microsoft.ManagedIdentity/userAssignedIdentities/delete",
        "Microsoft.ManagedIdentity/userAssignedIdentities/write"]
    assert events(az, "--resource-group", rg, "--caller", caller) == got
    assert events(az, "--resource-group", rg, "--caller", str(uuid.uuid4())) == []
    assert events(az, "--resource-group", missing, "--status", "Succeeded") == []
    by_ns = events(az, "--namespace", "Microsoft.ManagedIdentity")
    assert {e["eventDataId"] for e in got[:2]} <= {e["eventDataId"] for e in by_ns}
    assert all(e["resourceProviderName"]["value"] == "Microsoft.ManagedIdentity" for e in by_ns)
    # $select
    sel = events(az, "--resource-group", rg, "--select", "operationName", "status")
    assert [sorted(k for k, v in e.items() if v is not None) for e in sel] == [["operationName", "status"]] * 3
    # a window before the writes is empty
    assert az("monitor", "activity-log", "list", "-g", rg, "--start-time", "2000-01-01T00:00:00Z",
              "--end-time", "2000-01-01T01:00:00Z", check=False) in (None, [])


def test_activity_log_filter_is_strict(logged_in, up):
    """The documented quoted form works through `az rest`; anything else is 400 BadRequest."""
    az, _ = logged_in
    url = (f"{up.info['serverUrl']}/subscriptions/{up.info['subscriptionId']}"
           "/providers/Microsoft.Insights/eventtypes/management/values?api-version=2015-04-01")
    now = datetime.now(timezone.utc)
    start = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    ok = az("rest", "--method", "get", "--url",
            url + f"&$filter=eventTimestamp ge '{start}' and resourceProvider eq 'Microsoft.Resources'")
    assert ok["value"] and all(e["resourceProviderName"]["value"] == "Microsoft.Resources" for e in ok["value"])
    for bad in [
        "",
        "resourceGroupName eq 'x'",
        f"eventTimestamp ge '{start}' or 1 eq 1",
        f"eventTimestamp ge '{start}' and resourceGroupNam eq 'x'",
        f"eventTimestamp ge '{start}' and (caller eq 'x'",
        f"eventTimestamp ge '{start}' and eventTimestamp ge '{start}'",
        # more than the 90 days events are kept
        f"eventTimestamp ge '{(now - timedelta(days=91)).strftime('%Y-%m-%dT%H:%M:%SZ')}'",
    ]:
        proc = az.run("rest", "--method", "get", "--url", url + (f"&$filter={bad}" if bad else ""), check=False)
        assert proc.returncode != 0, bad
        assert "Bad Request" in proc.stderr and '"code":"BadRequest"' in proc.stderr.replace(" ", ""), \
            proc.stderr[-2000:]


def test_role_assignment_by_client_id(logged_in, up):
    """`--assignee <client id>`: az 2.91 resolves it through Graph
    (`servicePrincipalNames/any(c:c eq '…')`, then `directoryObjects/getByIds`), and `-o table`
    of the lists names the principals through `getByIds`."""
    az, _ = logged_in
    rg = f"az-ra-{uuid.uuid4().hex[:8]}"
    group = az("group", "create", "-n", rg, "-l", "westeurope")
    ident = az("identity", "create", "-g", rg, "-n", "ra-id")
    client_id, principal_id = ident["clientId"], ident["principalId"]

    ra = az("role", "assignment", "create", "--assignee", client_id, "--role", "Reader",
            "--scope", group["id"])
    assert ra["principalId"] == principal_id, ra
    assert ra["principalType"] == "ServicePrincipal", ra
    assert ra["scope"] == group["id"]
    assert ra["roleDefinitionId"].endswith("/acdd72a7-3385-48ef-bd42-f606fba81ae7"), ra
    # again: the same assignment (az answers the existing one)
    again = az("role", "assignment", "create", "--assignee", client_id, "--role", "Reader",
               "--scope", group["id"])
    assert again["id"] == ra["id"], again

    listed = az("role", "assignment", "list", "--assignee", client_id, "--all")
    assert [(a["principalId"], a["roleDefinitionName"], a["scope"]) for a in listed] == [
        (principal_id, "Reader", group["id"])], listed
    # the principal's name is its first servicePrincipalName: the client id
    assert listed[0]["principalName"] == client_id, listed

    table = az.run("role", "assignment", "list", "--assignee", client_id, "--all",
                   "-o", "table").stdout
    rows = [line.split() for line in table.splitlines()]
    assert rows[0][:3] == ["Principal", "Role", "Scope"], table
    assert [r for r in rows[2:] if r] == [[client_id, "Reader", group["id"]]], table

    table = az.run("role", "assignment", "list", "--scope", group["id"], "-o", "table").stdout
    rows = [line.split() for line in table.splitlines()]
    assert [client_id, "Reader", group["id"]] in rows, table

    # an unknown client id: az says it cannot find it (no Graph error, no PUT)
    unknown = str(uuid.uuid4())
    proc = az.run("role", "assignment", "create", "--assignee", unknown, "--role", "Reader",
                  "--scope", group["id"], check=False)
    assert proc.returncode != 0
    assert f"Cannot find user or service principal in graph database for '{unknown}'" in proc.stderr, \
        proc.stderr[-2000:]


# ---------------------------------------------------------------- the seeds' commands

def arm(up, method, path, body=None, api_version="2023-01-31"):
    """A control-plane request as the bootstrap admin (set-up the test does not measure)."""
    info = up.info
    token = requests.post(
        f"{info['serverUrl']}/{info['tenantId']}/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "client_id": info["adminClientId"],
              "client_secret": up.admin_secret, "scope": f"{info['serverUrl']}/.default"},
        verify=info["caFile"], timeout=30).json()["access_token"]
    sep = "&" if "?" in path else "?"
    r = requests.request(method, f"{info['serverUrl']}{path}{sep}api-version={api_version}",
                         json=body, headers={"Authorization": f"Bearer {token}"},
                         verify=info["caFile"], timeout=30)
    assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
    return r.json() if r.text else None, token


def test_metadata_2015_shape_is_what_msrestazure_reads(up):
    """msrestazure's `get_cloud_from_metadata_endpoint` asks api-version 2015-01-01 (az asks
    2022-09-01 only, so no az command reads this shape): it reads `galleryEndpoint`,
    `graphEndpoint`, `authentication.loginEndpoint` and `audiences[0]`, as here."""
    base = up.info["serverUrl"]
    r = requests.get(f"{base}/metadata/endpoints?api-version=2015-01-01", verify=up.info["caFile"], timeout=30)
    assert r.status_code == 200, r.text
    m = r.json()
    assert set(m) == {"galleryEndpoint", "graphEndpoint", "portalEndpoint", "authentication"}, m
    assert m["galleryEndpoint"] == m["graphEndpoint"] == m["portalEndpoint"] == f"{base}/"
    assert m["authentication"]["loginEndpoint"] == base
    assert m["authentication"]["audiences"][0] == f"{base}/"
    # the authority msrestazure builds from it (`{loginEndpoint}/{tenant}`) is the token service's
    tenant = up.info["tenantId"]
    oidc = requests.get(f"{m['authentication']['loginEndpoint']}/{tenant}/v2.0/.well-known/openid-configuration",
                        verify=up.info["caFile"], timeout=30)
    assert oidc.status_code == 200 and oidc.json()["issuer"].startswith(base), oidc.text


def test_identity_and_federated_credential_commands(logged_in, up):
    az, _ = logged_in
    rg = f"az-id-{uuid.uuid4().hex[:8]}"
    group = az("group", "create", "-n", rg, "-l", "westeurope")
    # `az group show --query id` (-o tsv: the bare id, as scripts use it)
    gid = az.run("group", "show", "-n", rg, "--query", "id", "-o", "tsv").stdout.strip()
    assert gid == group["id"] == f"/subscriptions/{up.info['subscriptionId']}/resourceGroups/{rg}"

    ident = az("identity", "create", "-g", rg, "-n", "app-id")
    assert ident["name"] == "app-id" and ident["resourceGroup"] == rg
    assert ident["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities"
    assert uuid.UUID(ident["clientId"]) and uuid.UUID(ident["principalId"])
    assert ident["tenantId"] == up.info["tenantId"]
    shown = az("identity", "show", "-g", rg, "-n", "app-id")
    assert (shown["id"], shown["clientId"], shown["principalId"]) == (
        ident["id"], ident["clientId"], ident["principalId"])
    client_id = az.run("identity", "show", "-g", rg, "-n", "app-id", "--query", "clientId",
                       "-o", "tsv").stdout.strip()
    assert client_id == ident["clientId"]
    az("identity", "create", "-g", rg, "-n", "other-id")
    assert sorted(i["name"] for i in az("identity", "list", "-g", rg)) == ["app-id", "other-id"]
    assert ident["id"] in [i["id"] for i in az("identity", "list")]

    # seed 003's federated credential, as written
    issuer = "https://oidc.example.com/issuer"
    fic = az("identity", "federated-credential", "create", "--name", "kubernetes-federated-credential",
             "--identity-name", "app-id", "--resource-group", rg, "--issuer", issuer,
             "--subject", "system:serviceaccount:app:web", "--audiences", "api://AzureADTokenExchange")
    assert fic["name"] == "kubernetes-federated-credential"
    assert fic["issuer"] == issuer and fic["subject"] == "system:serviceaccount:app:web"
    assert fic["audiences"] == ["api://AzureADTokenExchange"]
    assert fic["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials"
    assert fic["id"] == f"{ident['id']}/federatedIdentityCredentials/kubernetes-federated-credential"
    got = az("identity", "federated-credential", "show", "--name", "kubernetes-federated-credential",
             "--identity-name", "app-id", "-g", rg)
    assert got["id"] == fic["id"] and got["subject"] == fic["subject"]
    listed = az("identity", "federated-credential", "list", "--identity-name", "app-id", "-g", rg)
    assert [f["name"] for f in listed] == ["kubernetes-federated-credential"]
    az("identity", "federated-credential", "delete", "--name", "kubernetes-federated-credential",
       "--identity-name", "app-id", "-g", rg, "--yes")
    assert az("identity", "federated-credential", "list", "--identity-name", "app-id", "-g", rg) == []
    proc = az.run("identity", "federated-credential", "show", "--name", "kubernetes-federated-credential",
                  "--identity-name", "app-id", "-g", rg, check=False)
    assert proc.returncode != 0 and "NotFound" in proc.stderr, proc.stderr[-2000:]

    az("identity", "delete", "-g", rg, "-n", "app-id")
    assert [i["name"] for i in az("identity", "list", "-g", rg)] == ["other-id"]
    proc = az.run("identity", "show", "-g", rg, "-n", "app-id", check=False)
    assert proc.returncode != 0 and "ResourceNotFound" in proc.stderr, proc.stderr[-2000:]


def test_identity_list_follows_next_link(logged_in, up):
    """More identities than a page (100): az follows `nextLink` and lists every one; the raw
    first page shows the link, to where az called."""
    az, _ = logged_in
    rg = f"az-page-{uuid.uuid4().hex[:8]}"
    az("group", "create", "-n", rg, "-l", "westeurope")
    base = f"/subscriptions/{up.info['subscriptionId']}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities"
    names = sorted(f"id-{i:03}" for i in range(103))
    for n in names:
        arm(up, "PUT", f"{base}/{n}", {"location": "westeurope"})
    assert sorted(i["name"] for i in az("identity", "list", "-g", rg)) == names
    page = az("rest", "--method", "get", "--url", f"{up.info['serverUrl']}{base}?api-version=2023-01-31")
    assert len(page["value"]) == 100
    assert page["nextLink"].startswith(f"{up.info['serverUrl']}{base}?"), page["nextLink"]
    rest = az("rest", "--method", "get", "--url", page["nextLink"])
    assert len(rest["value"]) == 3 and "nextLink" not in rest
    assert sorted(i["name"] for i in page["value"] + rest["value"]) == names


def test_login_with_the_hosts_managed_identity(logged_in, up):
    """`az login --identity` where IMDS is Keyless's agent (MSAL's managed-identity client
    honours AZURE_POD_IDENTITY_AUTHORITY_HOST, the IMDS endpoint for azure-identity too): the
    VM's system-assigned identity, Reader on the subscription, reads a group."""
    admin, _ = logged_in
    sub = up.info["subscriptionId"]
    mi = up.info["systemIdentity"]["principalId"]
    admin("role", "assignment", "create", "--assignee-object-id", mi, "--assignee-principal-type",
          "ServicePrincipal", "--role", "Reader", "--scope", f"/subscriptions/{sub}")
    cli = new_az(up)
    try:
        cli.env["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = up.info["imdsUrl"]
        cli.run("cloud", "register", "-n", "Keyless", "--endpoint-resource-manager", up.info["serverUrl"])
        cli.run("cloud", "set", "-n", "Keyless")
        subs = cli("login", "--identity")
        assert [(s["id"], s["user"]) for s in subs] == [
            (sub, {"assignedIdentityInfo": "MSI", "name": "systemAssignedIdentity", "type": "servicePrincipal"})]
        gid = cli.run("group", "show", "-n", "keyless", "--query", "id", "-o", "tsv").stdout.strip()
        assert gid == f"/subscriptions/{sub}/resourceGroups/keyless"
        # Reader: a write is refused for the identity
        proc = cli.run("group", "create", "-n", f"mi-{uuid.uuid4().hex[:6]}", "-l", "westeurope", check=False)
        assert proc.returncode != 0 and "AuthorizationFailed" in proc.stderr, proc.stderr[-2000:]
        assert mi in proc.stderr
    finally:
        shutil.rmtree(cli.dir, ignore_errors=True)


def run_with_vault_hosts(az, up, workdir, vaults, *args):
    """`az …` in a private mount namespace whose /etc/hosts names the vaults (nothing on this
    machine resolves `{vault}.vault.localhost`), as the Key Vault SDK tests run."""
    hosts = pathlib.Path(workdir) / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n"
                     + "".join(f"127.0.0.1 {v}.vault.{up.info['vaultDomain']}\n" for v in vaults))
    prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts))
    proc = subprocess.run([*prefix, az_bin(), *args], env=az.env, capture_output=True, text=True,
                          timeout=180, cwd=az.dir)
    if proc.returncode != 0:
        raise AzError(args, proc)
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def test_keyvault_secret_set_and_show(logged_in, up):
    """`az keyvault secret set/show --vault-name`: az builds `https://{vault}{keyvaultDns}` from
    the suffix the cloud's metadata gave it (with the port); `--id` takes the secret's URL;
    `az keyvault show -n` without a group finds the vault through ARM's generic list."""
    if not can_remap_hosts():
        if os.environ.get("CI"):
            pytest.fail("CI must run as root (unshare) for the Key Vault host-name tests")
        pytest.skip("needs root and unshare to resolve {vault}.vault.localhost")
    az, _ = logged_in
    rg = f"az-kv-{uuid.uuid4().hex[:8]}"
    vault = f"azkv{uuid.uuid4().hex[:8]}"
    az("group", "create", "-n", rg, "-l", "westeurope")
    _, token = arm(up, "GET", f"/subscriptions/{up.info['subscriptionId']}", api_version="2022-12-01")
    payload = token.split(".")[1]
    admin_oid = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["oid"]
    created, _ = arm(up, "PUT", f"/subscriptions/{up.info['subscriptionId']}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{vault}",
                     {"location": "westeurope", "properties": {
                         "tenantId": up.info["tenantId"], "sku": {"family": "A", "name": "standard"},
                         "accessPolicies": [{"tenantId": up.info["tenantId"], "objectId": admin_oid,
                                             "permissions": {"secrets": ["get", "set", "list"]}}]}},
                     api_version="2023-07-01")
    assert created["properties"]["vaultUri"] == up.info["vaultUriTemplate"].replace("{vault}", vault)

    value = f"s3cret-{uuid.uuid4().hex}"
    remember_secret(value)
    kv = lambda *a: run_with_vault_hosts(az, up, az.dir, [vault], *a)
    put = kv("keyvault", "secret", "set", "--vault-name", vault, "--name", "db-password", "--value", value)
    assert put["value"] == value
    assert put["id"].startswith(f"{created['properties']['vaultUri']}secrets/db-password/"), put["id"]
    got = kv("keyvault", "secret", "show", "--vault-name", vault, "--name", "db-password")
    assert (got["id"], got["value"]) == (put["id"], value)
    assert got["attributes"]["enabled"] is True
    by_id = kv("keyvault", "secret", "show", "--id", f"{created['properties']['vaultUri']}secrets/db-password")
    assert (by_id["id"], by_id["value"]) == (put["id"], value)
    # a secret that is not there: Key Vault's own error, through az
    with pytest.raises(AzError) as e:
        kv("keyvault", "secret", "show", "--vault-name", vault, "--name", "nope")
    assert "SecretNotFound" in e.value.stderr, e.value.stderr[-2000:]

    # the vault without its group: az finds the group through GET /subscriptions/{s}/resources
    shown = az("keyvault", "show", "-n", vault)
    assert shown["id"] == created["id"] and shown["resourceGroup"] == rg
    listed = az("resource", "list", "--resource-type", "Microsoft.KeyVault/vaults")
    assert created["id"] in [r["id"] for r in listed]
    assert all(r["type"] == "Microsoft.KeyVault/vaults" for r in listed), listed
