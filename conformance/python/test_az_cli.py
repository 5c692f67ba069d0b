"""The real Azure CLI (azure-cli 2.91.0) against `keyless up` as a custom cloud: cloud
registration from the server's ARM metadata, service-principal login, resource writes, and
`az monitor activity-log list` showing those writes (Microsoft.Insights event list)."""
import os
import pathlib
import shutil
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from az_cli import AzError, az_bin, new_az


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
    assert cloud["suffixes"]["keyvaultDns"] == f".vault.{up.info['vaultDomain']}"
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
