"""Drive the real management SDKs (azure-mgmt-msi, azure-mgmt-authorization) against Keyless.

Usage: mgmt_client.py '<json args>' with server, tenant, client_id, secret, subscription,
resource_group, identity; prints JSON of what the SDKs returned. REQUESTS_CA_BUNDLE must point at
the Keyless CA. The credential is the SDK's ClientSecretCredential with a custom authority; MSAL
needs `disable_instance_discovery=True` for a non-Microsoft authority host.
"""
import json
import sys
import uuid


def main():
    a = json.loads(sys.argv[1])
    from azure.identity import ClientSecretCredential
    from azure.mgmt.authorization import AuthorizationManagementClient
    from azure.mgmt.msi import ManagedServiceIdentityClient

    cred = ClientSecretCredential(a["tenant"], a["client_id"], a["secret"], authority=a["server"],
                                  disable_instance_discovery=True)
    scopes = ["https://management.azure.com/.default"]
    msi = ManagedServiceIdentityClient(cred, a["subscription"], base_url=a["server"], credential_scopes=scopes)
    rg, name = a["resource_group"], a["identity"]
    out = {}
    created = msi.user_assigned_identities.create_or_update(rg, name, {"location": "local", "tags": {"k": "v"}})
    out["created"] = created.as_dict()
    out["raw_get"] = msi.user_assigned_identities.get(rg, name).serialize(keep_readonly=True)
    out["updated"] = msi.user_assigned_identities.update(rg, name, {"tags": {"k": "v2"}}).as_dict()
    out["list_rg"] = [i.name for i in msi.user_assigned_identities.list_by_resource_group(rg)]
    out["list_sub"] = [i.name for i in msi.user_assigned_identities.list_by_subscription()]

    auth = AuthorizationManagementClient(cred, a["subscription"], base_url=a["server"], credential_scopes=scopes)
    scope = f"/subscriptions/{a['subscription']}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    reader = next(iter(auth.role_definitions.list(scope, filter="roleName eq 'Reader'")))
    out["reader"] = {"id": reader.id, "name": reader.role_name}
    ra_name = str(uuid.uuid4())
    ra = auth.role_assignments.create(scope, ra_name, {
        "role_definition_id": reader.id, "principal_id": created.principal_id, "principal_type": "ServicePrincipal"})
    out["assignment"] = ra.as_dict()
    out["assignments_for"] = [x.name for x in auth.role_assignments.list_for_scope(
        scope, filter=f"principalId eq '{created.principal_id}'")]
    out["assignment_get"] = auth.role_assignments.get(scope, ra_name).name
    auth.role_assignments.delete(scope, ra_name)
    out["after_delete"] = [x.name for x in auth.role_assignments.list_for_scope(scope, filter="atScope()")]
    msi.user_assigned_identities.delete(rg, name)
    try:
        msi.user_assigned_identities.get(rg, name)
        out["get_after_delete"] = "found"
    except Exception as e:  # ResourceNotFoundError
        out["get_after_delete"] = type(e).__name__
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
