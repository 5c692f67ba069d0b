"""Drive the real azure-mgmt-containerservice SDK against Keyless: a managed cluster with a
podIdentityProfile, round-tripped the way az aks pod-identity does it (get, edit, PUT).

Usage: aks_client.py '<json args>' with server, tenant, client_id, secret, subscription,
resource_group, cluster; prints JSON of what the SDKs returned (REST shapes, as_dict()).
REQUESTS_CA_BUNDLE must point at the Keyless CA.
"""
import json
import sys
import time
import uuid

MANAGED_IDENTITY_OPERATOR = "f1a07417-d97a-45cb-824c-7a7467783830"


def main():
    a = json.loads(sys.argv[1])
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
    from azure.identity import ClientSecretCredential
    from azure.mgmt.authorization import AuthorizationManagementClient
    from azure.mgmt.containerservice import ContainerServiceClient
    from azure.mgmt.containerservice import models as m
    from azure.mgmt.msi import ManagedServiceIdentityClient

    cred = ClientSecretCredential(a["tenant"], a["client_id"], a["secret"], authority=a["server"],
                                  disable_instance_discovery=True)
    scopes = ["https://management.azure.com/.default"]
    kw = dict(base_url=a["server"], credential_scopes=scopes)
    cs = ContainerServiceClient(cred, a["subscription"], **kw)
    msi = ManagedServiceIdentityClient(cred, a["subscription"], **kw)
    auth = AuthorizationManagementClient(cred, a["subscription"], **kw)
    rg, name = a["resource_group"], a["cluster"]
    out = {"api_version": cs._config.api_version}

    ident = msi.user_assigned_identities.create_or_update(rg, "aks-sdk-pod-id", {"location": "local"})
    out["identity"] = {"id": ident.id, "client_id": ident.client_id, "principal_id": ident.principal_id}

    # create: the poller must finish on the first answer (a poll would wait 30 s)
    cluster = m.ManagedCluster(
        location="local",
        tags={"team": "sdk"},
        identity=m.ManagedClusterIdentity(type="SystemAssigned"),
        dns_prefix="sdkaks",
        kubernetes_version="1.33.0",
        agent_pool_profiles=[m.ManagedClusterAgentPoolProfile(
            name="nodepool1", count=2, vm_size="Standard_DS2_v2", mode="System", os_type="Linux",
            type="VirtualMachineScaleSets")],
        network_profile=m.ContainerServiceNetworkProfile(network_plugin="azure"),
        pod_identity_profile=m.ManagedClusterPodIdentityProfile(enabled=True),
    )
    t0 = time.monotonic()
    created = cs.managed_clusters.begin_create_or_update(rg, name, cluster).result()
    out["create_seconds"] = time.monotonic() - t0
    out["created"] = created.as_dict()

    # adding a pod identity before the cluster identity holds Managed Identity Operator on it
    got = cs.managed_clusters.get(rg, name)
    got.pod_identity_profile.user_assigned_identities = [m.ManagedClusterPodIdentity(
        name="sdk-pod-identity", namespace="sdk-app", binding_selector="sdk-selector",
        identity=m.UserAssignedIdentity(resource_id=ident.id))]
    try:
        cs.managed_clusters.begin_create_or_update(rg, name, got).result()
        out["refused"] = None
    except HttpResponseError as e:
        out["refused"] = {"status": e.status_code, "code": e.error.code if e.error else None}

    # grant it, as az aks pod-identity add does, then read-modify-write the whole cluster
    role = f"/subscriptions/{a['subscription']}/providers/Microsoft.Authorization/roleDefinitions/{MANAGED_IDENTITY_OPERATOR}"
    auth.role_assignments.create(ident.id, str(uuid.uuid4()), {
        "role_definition_id": role, "principal_id": created.identity.principal_id,
        "principal_type": "ServicePrincipal"})
    got = cs.managed_clusters.get(rg, name)
    profile = got.pod_identity_profile
    profile.user_assigned_identities = (profile.user_assigned_identities or []) + [m.ManagedClusterPodIdentity(
        name="sdk-pod-identity", namespace="sdk-app", binding_selector="sdk-selector",
        identity=m.UserAssignedIdentity(resource_id=ident.id))]
    profile.user_assigned_identity_exceptions = (profile.user_assigned_identity_exceptions or []) + [
        m.ManagedClusterPodIdentityException(name="sdk-exception", namespace="kube-system",
                                             pod_labels={"app": "sdk-agent"})]
    t0 = time.monotonic()
    updated = cs.managed_clusters.begin_create_or_update(rg, name, got).result()
    out["update_seconds"] = time.monotonic() - t0
    out["updated"] = updated.as_dict()

    # the same object again (a no-op write keeps everything)
    again = cs.managed_clusters.begin_create_or_update(rg, name, cs.managed_clusters.get(rg, name)).result()
    out["again"] = again.as_dict()

    fetched = cs.managed_clusters.get(rg, name)
    out["fetched"] = fetched.as_dict()
    out["typed"] = {
        "node_resource_group": fetched.node_resource_group,
        "pod_identity_state": fetched.pod_identity_profile.user_assigned_identities[0].provisioning_state,
        "pod_identity_client_id": fetched.pod_identity_profile.user_assigned_identities[0].identity.client_id,
        "exception_labels": dict(fetched.pod_identity_profile.user_assigned_identity_exceptions[0].pod_labels),
        "kubelet_client_id": fetched.identity_profile["kubeletidentity"].client_id,
        "pool_state": fetched.agent_pool_profiles[0].provisioning_state,
        "provisioning_state": fetched.provisioning_state,
    }
    out["list_rg"] = [c.name for c in cs.managed_clusters.list_by_resource_group(rg)]
    out["list_sub"] = [c.name for c in cs.managed_clusters.list()]
    tagged = cs.managed_clusters.begin_update_tags(rg, name, m.TagsObject(tags={"team": "sdk", "k": "v"})).result()
    out["tags"] = tagged.tags

    # workload identity as az aks update --enable-oidc-issuer --enable-workload-identity writes it
    got = cs.managed_clusters.get(rg, name)
    got.oidc_issuer_profile = m.ManagedClusterOIDCIssuerProfile(enabled=True)
    got.security_profile = m.ManagedClusterSecurityProfile(
        workload_identity=m.ManagedClusterSecurityProfileWorkloadIdentity(enabled=True))
    wi = cs.managed_clusters.begin_create_or_update(rg, name, got).result()
    out["oidc"] = {"issuer_url": wi.oidc_issuer_profile.issuer_url, "enabled": wi.oidc_issuer_profile.enabled,
                   "workload_identity": wi.security_profile.workload_identity.enabled}
    again = cs.managed_clusters.get(rg, name)
    out["oidc"]["issuer_url_again"] = again.oidc_issuer_profile.issuer_url
    again.oidc_issuer_profile = m.ManagedClusterOIDCIssuerProfile(enabled=False)
    try:
        cs.managed_clusters.begin_create_or_update(rg, name, again).result()
        out["oidc"]["disable"] = None
    except HttpResponseError as e:
        out["oidc"]["disable"] = {"status": e.status_code, "code": e.error.code if e.error else None}

    t0 = time.monotonic()
    cs.managed_clusters.begin_delete(rg, name).result()
    out["delete_seconds"] = time.monotonic() - t0
    try:
        cs.managed_clusters.get(rg, name)
        out["get_after_delete"] = "found"
    except ResourceNotFoundError as e:
        out["get_after_delete"] = type(e).__name__
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
