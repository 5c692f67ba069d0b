"""What the seed's demo pod does (mcr.microsoft.com/oss/azure/aad-pod-identity/demo): get a token
with the managed identity through 169.254.169.254, list the VMs of a resource group through ARM
with it, and read the instance metadata. Runs with no environment inside a pod's network
namespace.

Usage: pod_demo.py '{"server", "ca", "subscription", "resource_group", "client_id"}'
"""
import json
import sys
import urllib.request


def main():
    a = json.loads(sys.argv[1])
    from azure.identity import ManagedIdentityCredential
    from azure.mgmt.compute import ComputeManagementClient

    out = {}
    try:
        cred = ManagedIdentityCredential(client_id=a["client_id"])
        compute = ComputeManagementClient(cred, a["subscription"], base_url=a["server"],
                                          credential_scopes=["https://management.azure.com/.default"],
                                          connection_verify=a["ca"])
        out["vm_count"] = len(list(compute.virtual_machines.list(a["resource_group"])))
        out["vmss_count"] = len(list(compute.virtual_machine_scale_sets.list(a["resource_group"])))
        req = urllib.request.Request("http://169.254.169.254/metadata/instance?api-version=2021-02-01",
                                     headers={"Metadata": "true"})
        with urllib.request.urlopen(req, timeout=10) as r:
            out["instance"] = json.loads(r.read())
    except Exception as e:  # the test asserts on it
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
