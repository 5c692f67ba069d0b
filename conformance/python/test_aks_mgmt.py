"""The real azure-mgmt-containerservice SDK (41.8.0) against `keyless up`: a managed cluster with
a podIdentityProfile created, a pod identity and an exception added read-modify-write (get,
edit, begin_create_or_update) as az aks pod-identity does, read back, tagged and deleted. Every
poller finishes on the first answer."""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent


def run_aks(up, args):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(),
           "REQUESTS_CA_BUNDLE": up.info["caFile"]}
    out = subprocess.run([sys.executable, str(HERE / "aks_client.py"), json.dumps(args)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_managed_cluster_round_trip_with_pod_identity(up):
    args = {"server": up.info["serverUrl"], "tenant": up.info["tenantId"], "client_id": up.info["adminClientId"],
            "secret": up.admin_secret, "subscription": up.info["subscriptionId"], "resource_group": "keyless",
            "cluster": "sdk-aks"}
    out = run_aks(up, args)
    sub = up.info["subscriptionId"]
    cluster_id = f"/subscriptions/{sub}/resourceGroups/keyless/providers/Microsoft.ContainerService/managedClusters/sdk-aks"
    ident = out["identity"]
    assert out["api_version"] == "2026-08-01"

    created = out["created"]
    assert created["id"] == cluster_id
    assert created["name"] == "sdk-aks"
    assert created["type"] == "Microsoft.ContainerService/managedClusters"
    assert created["tags"] == {"team": "sdk"}
    assert created["identity"]["type"] == "SystemAssigned"
    assert created["identity"]["principalId"] and created["identity"]["tenantId"] == up.info["tenantId"]
    p = created["properties"]
    assert p["provisioningState"] == "Succeeded"
    assert p["dnsPrefix"] == "sdkaks"
    assert p["kubernetesVersion"] == "1.33.0"
    assert p["nodeResourceGroup"] == "MC_keyless_sdk-aks_local"
    assert p["networkProfile"]["networkPlugin"] == "azure"
    assert p["podIdentityProfile"]["enabled"] is True
    pool = p["agentPoolProfiles"][0]
    assert {k: pool[k] for k in ("name", "count", "vmSize", "mode", "osType", "type", "provisioningState")} == {
        "name": "nodepool1", "count": 2, "vmSize": "Standard_DS2_v2", "mode": "System", "osType": "Linux",
        "type": "VirtualMachineScaleSets", "provisioningState": "Succeeded"}
    kubelet = p["identityProfile"]["kubeletidentity"]
    assert kubelet["resourceId"].endswith(
        "/resourceGroups/MC_keyless_sdk-aks_local/providers/Microsoft.ManagedIdentity/userAssignedIdentities/sdk-aks-agentpool")
    assert kubelet["clientId"] and kubelet["objectId"]

    # the OIDC issuer and workload identity, read by the SDK's own models (issuerURL on the wire)
    oidc = out["oidc"]
    assert oidc["enabled"] is True and oidc["workload_identity"] is True
    assert oidc["issuer_url"].startswith(up.info["serverUrl"] + "/oidc/") and oidc["issuer_url"].endswith("/"), oidc
    assert oidc["issuer_url_again"] == oidc["issuer_url"]
    # the issuer cannot be turned off again (AKS's rule)
    assert oidc["disable"] == {"status": 400, "code": "BadRequest"}, oidc

    # the cluster identity did not hold Managed Identity Operator yet
    assert out["refused"] == {"status": 403, "code": "LinkedAuthorizationFailed"}

    updated = out["updated"]["properties"]["podIdentityProfile"]
    assert updated["enabled"] is True
    assert updated["userAssignedIdentities"] == [{
        "name": "sdk-pod-identity", "namespace": "sdk-app", "bindingSelector": "sdk-selector",
        "identity": {"resourceId": ident["id"], "clientId": ident["client_id"], "objectId": ident["principal_id"]},
        "provisioningState": "Updating"}]
    assert updated["userAssignedIdentityExceptions"] == [
        {"name": "sdk-exception", "namespace": "kube-system", "podLabels": {"app": "sdk-agent"}}]
    # a second write of what GET showed changes nothing
    assert out["again"] == out["updated"]
    assert out["fetched"] == out["updated"]
    assert out["typed"] == {
        "node_resource_group": "MC_keyless_sdk-aks_local",
        "pod_identity_state": "Updating",
        "pod_identity_client_id": ident["client_id"],
        "exception_labels": {"app": "sdk-agent"},
        "kubelet_client_id": kubelet["clientId"],
        "pool_state": "Succeeded",
        "provisioning_state": "Succeeded",
    }
    assert "sdk-aks" in out["list_rg"] and "sdk-aks" in out["list_sub"]
    assert out["tags"] == {"team": "sdk", "k": "v"}
    assert out["get_after_delete"] == "ResourceNotFoundError"
    # no poller waited for a poll interval (30 s by default)
    assert max(out["create_seconds"], out["update_seconds"], out["delete_seconds"]) < 10, out
