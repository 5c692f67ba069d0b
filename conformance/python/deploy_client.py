"""Drive python `azure-mgmt-resource` deployments against Keyless.

Usage: deploy_client.py '<json args>' with server, tenant, client_id, secret, subscription,
resource_group, name, template, parameters, mode and ops (a list of: group, validate, whatif, create, get,
operations, export, list, exists, delete); prints JSON of what the SDK returned, or for an
operation the SDK raised on, {"error": {"status", "code", "message", "details"}}.
REQUESTS_CA_BUNDLE must point at the Keyless CA.
"""
import json
import sys


def error_of(e):
    err = getattr(e, "error", None)
    details = []
    if err is not None:
        for d in getattr(err, "details", None) or []:
            details.append({"code": d.code, "target": d.target, "message": d.message})
    return {"error": {"status": e.status_code, "code": err.code if err is not None else None,
                      "target": err.target if err is not None else None,
                      "message": err.message if err is not None else str(e), "details": details}}


def main():
    a = json.loads(sys.argv[1])
    from azure.core.exceptions import HttpResponseError
    from azure.identity import ClientSecretCredential
    from azure.mgmt.resource import ResourceManagementClient

    cred = ClientSecretCredential(a["tenant"], a["client_id"], a["secret"], authority=a["server"],
                                  disable_instance_discovery=True)
    rm = ResourceManagementClient(cred, a["subscription"], base_url=a["server"],
                                  credential_scopes=["https://management.azure.com/.default"])
    rg, name = a["resource_group"], a["name"]
    body = {"properties": {"mode": a.get("mode", "Incremental"), "template": a.get("template"),
                           "parameters": a.get("parameters", {})}}
    out = {}
    for op in a["ops"]:
        try:
            if op == "group":
                out[op] = rm.resource_groups.create_or_update(rg, {"location": "local"}).name
            elif op == "validate":
                r = rm.deployments.begin_validate(rg, name, body).result()
                out[op] = r.as_dict()
            elif op == "whatif":
                r = rm.deployments.begin_what_if(rg, name, {"properties": body["properties"]}).result()
                out[op] = r.as_dict()
            elif op == "create":
                out[op] = rm.deployments.begin_create_or_update(rg, name, body).result().as_dict()
            elif op == "get":
                out[op] = rm.deployments.get(rg, name).as_dict()
            elif op == "operations":
                out[op] = [o.as_dict() for o in rm.deployment_operations.list(rg, name)]
            elif op == "export":
                out[op] = rm.deployments.export_template(rg, name).template
            elif op == "list":
                out[op] = [d.name for d in rm.deployments.list_by_resource_group(rg)]
            elif op == "exists":
                out[op] = rm.deployments.check_existence(rg, name)
            elif op == "delete":
                rm.deployments.begin_delete(rg, name).result()
                out[op] = "deleted"
            elif op == "resources":
                out[op] = sorted(r.id for r in rm.resources.list_by_resource_group(rg))
            else:
                raise ValueError(op)
        except HttpResponseError as e:
            out[op] = error_of(e)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
