//! Every route of the server, in process: a real server state on its own SQLite file, each
//! request handed to the router (`keyless_server::app(state).oneshot(request)`), no TCP and no
//! spawned process. Tokens are asked of the token service the way clients ask (client
//! credentials of the bootstrap admin, or of an application registered through Graph); host
//! API requests carry the client-certificate fingerprint the TLS layer would
//! (`keyless_server::PeerCert`), of a certificate got through the join flow.
//!
//! [`ROUTES`] enumerates the routes (method and path template) read from the route tables:
//! the routers of the token service, control plane, host API, Graph, cloud metadata and the
//! admin vault clock in `app()`, the control plane's dispatch behind its catch-all, and the
//! Key Vault data plane's (`{vault}.vault.{domain}` hosts). Each test exercises the routes of
//! one area — for each route one accepted request (status and the key fields of the body in
//! Azure's wire shape) and the callers who must be refused (no token, a token for another
//! audience, a principal without the right, an unknown host certificate), asserting the
//! status and the error shape of that surface — and ends by checking that every route of its
//! area was both accepted and refused. `every_route_is_enumerated_and_tested` checks that the
//! areas together are exactly [`ROUTES`]: a route added to [`ROUTES`] without a test fails it.

#[path = "routes/harness.rs"]
mod harness;

use harness::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use tower::ServiceExt;

// ------------------------------------------------------------------ the routes

/// `ARM {method} /subscriptions/{sub}/resourceGroups/{rg}/providers/{tail}`.
macro_rules! rg {
    ($m:literal, $tail:literal) => {
        concat!(
            "ARM ",
            $m,
            " /subscriptions/{sub}/resourceGroups/{rg}/providers/",
            $tail
        )
    };
}

/// `ARM {method} /subscriptions/{sub}/providers/{tail}`.
macro_rules! sub {
    ($m:literal, $tail:literal) => {
        concat!("ARM ", $m, " /subscriptions/{sub}/providers/", $tail)
    };
}

/// Every route the server serves: `SURFACE METHOD template`. `{x}` is one path segment, a
/// leading `{scope}` the scope of an extension resource (`/`, a subscription, a group, a
/// resource). Key Vault routes are served on `{vault}.vault.{domain}` hosts.
const ROUTES: &[&str] = &[
    // token service (`sts::routes`)
    "STS GET /{tenant}/v2.0/.well-known/openid-configuration",
    "STS GET /{tenant}/.well-known/openid-configuration",
    "STS GET /{tenant}/discovery/v2.0/keys",
    "STS GET /{tenant}/discovery/keys",
    "STS POST /{tenant}/oauth2/v2.0/token",
    "STS POST /{tenant}/oauth2/token",
    "STS GET /common/discovery/instance",
    // cloud metadata (`cloud::routes`) and the admin vault clock (`app`)
    "CLOUD GET /metadata/endpoints",
    // `az cloud register --endpoint-resource-manager https://host/` (a trailing slash)
    "CLOUD GET //metadata/endpoints",
    // the clusters' OIDC issuers (`oidc::routes`)
    "OIDC GET /oidc/{id}/.well-known/openid-configuration",
    "OIDC GET /oidc/{id}/openid/v1/jwks",
    "ADMIN POST /keyless/admin/v1/vault-clock",
    // Microsoft Graph (`graph::routes`)
    "GRAPH GET /v1.0/servicePrincipals",
    "GRAPH GET /v1.0/servicePrincipals/{id}",
    "GRAPH POST /v1.0/applications",
    "GRAPH POST /v1.0/directoryObjects/getByIds",
    "GRAPH GET /v1.0/me",
    // host API (`host::routes`)
    "HOST POST /keyless/host/v1/join",
    "HOST GET /keyless/host/v1/identities",
    "HOST POST /keyless/host/v1/token",
    "HOST POST /keyless/host/v1/rotate",
    // control plane (`arm::routes`: `/subscriptions[/…]` and `/providers/…`, then its dispatch)
    "ARM GET /subscriptions",
    "ARM GET /subscriptions/{sub}",
    "ARM GET /subscriptions/{sub}/resourceGroups",
    "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}",
    "ARM PATCH /subscriptions/{sub}/resourceGroups/{rg}",
    "ARM GET /subscriptions/{sub}/resourceGroups/{rg}",
    "ARM HEAD /subscriptions/{sub}/resourceGroups/{rg}",
    "ARM DELETE /subscriptions/{sub}/resourceGroups/{rg}",
    // ARM's generic list (`arm::generic`)
    "ARM GET /subscriptions/{sub}/resources",
    "ARM GET /subscriptions/{sub}/resourceGroups/{rg}/resources",
    sub!("GET", "Microsoft.ManagedIdentity/userAssignedIdentities"),
    rg!("GET", "Microsoft.ManagedIdentity/userAssignedIdentities"),
    rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    ),
    rg!(
        "PATCH",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    ),
    rg!(
        "DELETE",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials"
    ),
    rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
    ),
    rg!(
        "DELETE",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns"
    ),
    rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{pattern}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{pattern}"
    ),
    rg!(
        "DELETE",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{pattern}"
    ),
    sub!("GET", "Microsoft.Compute/virtualMachines"),
    rg!("GET", "Microsoft.Compute/virtualMachines"),
    rg!("PUT", "Microsoft.Compute/virtualMachines/{vm}"),
    rg!("PATCH", "Microsoft.Compute/virtualMachines/{vm}"),
    rg!("GET", "Microsoft.Compute/virtualMachines/{vm}"),
    rg!("DELETE", "Microsoft.Compute/virtualMachines/{vm}"),
    rg!(
        "POST",
        "Microsoft.Compute/virtualMachines/{vm}/generateJoinToken"
    ),
    rg!("GET", "Microsoft.Compute/virtualMachines/{vm}/extensions"),
    rg!(
        "PUT",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    ),
    rg!(
        "PATCH",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    ),
    rg!(
        "GET",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    ),
    rg!(
        "DELETE",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    ),
    sub!("GET", "Microsoft.Compute/virtualMachineScaleSets"),
    rg!("GET", "Microsoft.Compute/virtualMachineScaleSets"),
    rg!("PUT", "Microsoft.Compute/virtualMachineScaleSets/{ss}"),
    rg!("PATCH", "Microsoft.Compute/virtualMachineScaleSets/{ss}"),
    rg!("GET", "Microsoft.Compute/virtualMachineScaleSets/{ss}"),
    rg!("DELETE", "Microsoft.Compute/virtualMachineScaleSets/{ss}"),
    rg!(
        "POST",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/generateJoinToken"
    ),
    rg!(
        "GET",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/virtualMachines"
    ),
    rg!(
        "GET",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/virtualMachines/{instance}"
    ),
    rg!(
        "DELETE",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/virtualMachines/{instance}"
    ),
    sub!("GET", "Microsoft.KeyVault/vaults"),
    rg!("GET", "Microsoft.KeyVault/vaults"),
    rg!("PUT", "Microsoft.KeyVault/vaults/{vault}"),
    rg!("PATCH", "Microsoft.KeyVault/vaults/{vault}"),
    rg!("GET", "Microsoft.KeyVault/vaults/{vault}"),
    rg!("DELETE", "Microsoft.KeyVault/vaults/{vault}"),
    rg!(
        "PUT",
        "Microsoft.KeyVault/vaults/{vault}/accessPolicies/{operation}"
    ),
    rg!(
        "PUT",
        "Microsoft.KeyVault/vaults/{vault}/secrets/{name}"
    ),
    rg!(
        "PATCH",
        "Microsoft.KeyVault/vaults/{vault}/secrets/{name}"
    ),
    rg!(
        "GET",
        "Microsoft.KeyVault/vaults/{vault}/secrets/{name}"
    ),
    rg!("GET", "Microsoft.KeyVault/vaults/{vault}/secrets"),
    sub!("GET", "Microsoft.Batch/batchAccounts"),
    rg!("GET", "Microsoft.Batch/batchAccounts"),
    rg!("PUT", "Microsoft.Batch/batchAccounts/{account}"),
    rg!("PATCH", "Microsoft.Batch/batchAccounts/{account}"),
    rg!("GET", "Microsoft.Batch/batchAccounts/{account}"),
    rg!("DELETE", "Microsoft.Batch/batchAccounts/{account}"),
    rg!("GET", "Microsoft.Batch/batchAccounts/{account}/pools"),
    rg!(
        "PUT",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    ),
    rg!(
        "PATCH",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    ),
    rg!(
        "GET",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    ),
    rg!(
        "DELETE",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    ),
    rg!(
        "POST",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}/generateJoinToken"
    ),
    sub!("GET", "Microsoft.ContainerService/managedClusters"),
    rg!("GET", "Microsoft.ContainerService/managedClusters"),
    rg!(
        "PUT",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    ),
    rg!(
        "PATCH",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    ),
    rg!(
        "GET",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    ),
    rg!(
        "DELETE",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/agentPools/{pool}/generateJoinToken"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/readPodIdentityProfile"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/reportPodIdentityStatus"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/publishServiceAccountKeys"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/issueWebhookCertificate"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/checkWorkloadIdentity"
    ),
    "ARM GET {scope}/providers/Microsoft.Authorization/roleDefinitions",
    "ARM GET {scope}/providers/Microsoft.Authorization/roleDefinitions/{id}",
    "ARM GET {scope}/providers/Microsoft.Authorization/roleAssignments",
    "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
    "ARM GET {scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
    "ARM DELETE {scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
    sub!("GET", "Microsoft.Insights/eventtypes/management/values"),
    // template deployments (`arm::deployments`), in a group
    rg!("GET", "Microsoft.Resources/deployments"),
    // `az deployment group list` (the SDK's path ends with a slash)
    rg!("GET", "Microsoft.Resources/deployments/"),
    rg!("PUT", "Microsoft.Resources/deployments/{name}"),
    rg!("GET", "Microsoft.Resources/deployments/{name}"),
    rg!("HEAD", "Microsoft.Resources/deployments/{name}"),
    rg!("DELETE", "Microsoft.Resources/deployments/{name}"),
    rg!("POST", "Microsoft.Resources/deployments/{name}/validate"),
    rg!("POST", "Microsoft.Resources/deployments/{name}/whatIf"),
    rg!("POST", "Microsoft.Resources/deployments/{name}/exportTemplate"),
    rg!("POST", "Microsoft.Resources/deployments/{name}/cancel"),
    rg!("GET", "Microsoft.Resources/deployments/{name}/operations"),
    rg!("GET", "Microsoft.Resources/deployments/{name}/operations/{id}"),
    rg!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operationStatuses/{id}"
    ),
    // a deployment's operations as az and the SDKs ask for them (no `providers/`)
    "ARM GET /subscriptions/{sub}/resourcegroups/{rg}/deployments/{name}/operations",
    "ARM GET /subscriptions/{sub}/resourcegroups/{rg}/deployments/{name}/operations/{id}",
    // template deployments at subscription scope (`az deployment sub …`)
    sub!("GET", "Microsoft.Resources/deployments"),
    // `az deployment sub list`
    sub!("GET", "Microsoft.Resources/deployments/"),
    sub!("PUT", "Microsoft.Resources/deployments/{name}"),
    sub!("GET", "Microsoft.Resources/deployments/{name}"),
    sub!("HEAD", "Microsoft.Resources/deployments/{name}"),
    sub!("DELETE", "Microsoft.Resources/deployments/{name}"),
    sub!("POST", "Microsoft.Resources/deployments/{name}/validate"),
    sub!("POST", "Microsoft.Resources/deployments/{name}/whatIf"),
    sub!("POST", "Microsoft.Resources/deployments/{name}/exportTemplate"),
    sub!("POST", "Microsoft.Resources/deployments/{name}/cancel"),
    sub!("GET", "Microsoft.Resources/deployments/{name}/operations"),
    sub!("GET", "Microsoft.Resources/deployments/{name}/operations/{id}"),
    sub!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operationStatuses/{id}"
    ),
    // Key Vault data plane (`kv::handle`, paths of `keyless_core::vault::route`)
    "KV PUT /secrets/{name}",
    "KV GET /secrets/{name}",
    "KV GET /secrets/{name}/{version}",
    "KV PATCH /secrets/{name}/{version}",
    "KV DELETE /secrets/{name}",
    "KV GET /secrets",
    "KV GET /secrets/{name}/versions",
    "KV POST /secrets/{name}/backup",
    "KV POST /secrets/restore",
    "KV GET /deletedsecrets",
    "KV GET /deletedsecrets/{name}",
    "KV DELETE /deletedsecrets/{name}",
    "KV POST /deletedsecrets/{name}/recover",
    "KV POST /keys/{name}/create",
    "KV POST /keys/{name}/rotate",
    "KV PUT /keys/{name}",
    "KV GET /keys/{name}",
    "KV GET /keys/{name}/{version}",
    "KV PATCH /keys/{name}/{version}",
    "KV DELETE /keys/{name}",
    "KV GET /keys",
    "KV GET /keys/{name}/versions",
    "KV POST /keys/{name}/{version}/sign",
    "KV POST /keys/{name}/{version}/verify",
    "KV POST /keys/{name}/{version}/encrypt",
    "KV POST /keys/{name}/{version}/decrypt",
    "KV POST /keys/{name}/{version}/wrapkey",
    "KV POST /keys/{name}/{version}/unwrapkey",
    "KV GET /keys/{name}/rotationpolicy",
    "KV POST /keys/{name}/backup",
    "KV POST /keys/restore",
    "KV GET /deletedkeys",
    "KV GET /deletedkeys/{name}",
    "KV DELETE /deletedkeys/{name}",
    "KV POST /deletedkeys/{name}/recover",
    "KV POST /certificates/{name}/create",
    "KV GET /certificates/{name}/pending",
    "KV PATCH /certificates/{name}/pending",
    "KV DELETE /certificates/{name}/pending",
    "KV POST /certificates/{name}/pending/merge",
    "KV POST /certificates/{name}/import",
    "KV GET /certificates/{name}/policy",
    "KV PATCH /certificates/{name}/policy",
    "KV GET /certificates/{name}",
    "KV GET /certificates/{name}/{version}",
    "KV PATCH /certificates/{name}/{version}",
    "KV DELETE /certificates/{name}",
    "KV GET /certificates",
    "KV GET /certificates/{name}/versions",
    "KV GET /certificates/contacts",
    "KV PUT /certificates/contacts",
    "KV DELETE /certificates/contacts",
    "KV GET /certificates/issuers",
    "KV GET /certificates/issuers/{name}",
    "KV POST /certificates/{name}/backup",
    "KV POST /certificates/restore",
    "KV GET /deletedcertificates",
    "KV GET /deletedcertificates/{name}",
    "KV DELETE /deletedcertificates/{name}",
    "KV POST /deletedcertificates/{name}/recover",
];

/// Routes with no caller to refuse: ARM's cloud metadata is public, as on
/// `management.azure.com`.
const PUBLIC: &[&str] = &[
    "CLOUD GET /metadata/endpoints",
    "CLOUD GET //metadata/endpoints",
    "OIDC GET /oidc/{id}/.well-known/openid-configuration",
    "OIDC GET /oidc/{id}/openid/v1/jwks",
];

/// Routes served only to refuse (what they address is not supported): nothing to accept.
const NEVER_ACCEPTED: &[&str] = &[
    // every Keyless token is an application's: Graph's `/me` is for signed-in users
    "GRAPH GET /v1.0/me",
    "KV GET /keys/{name}/rotationpolicy",
    "KV GET /certificates/issuers/{name}",
];

// the areas, one test each

const STS: &[&str] = &[
    "STS GET /{tenant}/v2.0/.well-known/openid-configuration",
    "STS GET /{tenant}/.well-known/openid-configuration",
    "STS GET /{tenant}/discovery/v2.0/keys",
    "STS GET /{tenant}/discovery/keys",
    "STS POST /{tenant}/oauth2/v2.0/token",
    "STS POST /{tenant}/oauth2/token",
    "STS GET /common/discovery/instance",
];

const CLOUD_AND_ADMIN: &[&str] = &[
    "CLOUD GET /metadata/endpoints",
    "CLOUD GET //metadata/endpoints",
    "ADMIN POST /keyless/admin/v1/vault-clock",
];

const OIDC: &[&str] = &[
    "OIDC GET /oidc/{id}/.well-known/openid-configuration",
    "OIDC GET /oidc/{id}/openid/v1/jwks",
];

const GRAPH: &[&str] = &[
    "GRAPH GET /v1.0/servicePrincipals",
    "GRAPH GET /v1.0/servicePrincipals/{id}",
    "GRAPH POST /v1.0/applications",
    "GRAPH POST /v1.0/directoryObjects/getByIds",
    "GRAPH GET /v1.0/me",
];

const HOST: &[&str] = &[
    "HOST POST /keyless/host/v1/join",
    "HOST GET /keyless/host/v1/identities",
    "HOST POST /keyless/host/v1/token",
    "HOST POST /keyless/host/v1/rotate",
];

const ARM_GROUPS: &[&str] = &[
    "ARM GET /subscriptions",
    "ARM GET /subscriptions/{sub}",
    "ARM GET /subscriptions/{sub}/resourceGroups",
    "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}",
    "ARM PATCH /subscriptions/{sub}/resourceGroups/{rg}",
    "ARM GET /subscriptions/{sub}/resourceGroups/{rg}",
    "ARM HEAD /subscriptions/{sub}/resourceGroups/{rg}",
    "ARM DELETE /subscriptions/{sub}/resourceGroups/{rg}",
];

const ARM_GENERIC: &[&str] = &[
    "ARM GET /subscriptions/{sub}/resources",
    "ARM GET /subscriptions/{sub}/resourceGroups/{rg}/resources",
];

const ARM_IDENTITIES: &[&str] = &[
    sub!("GET", "Microsoft.ManagedIdentity/userAssignedIdentities"),
    rg!("GET", "Microsoft.ManagedIdentity/userAssignedIdentities"),
    rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    ),
    rg!(
        "PATCH",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    ),
    rg!(
        "DELETE",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials"
    ),
    rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
    ),
    rg!(
        "DELETE",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns"
    ),
    rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{pattern}"
    ),
    rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{pattern}"
    ),
    rg!(
        "DELETE",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{pattern}"
    ),
];

const ARM_COMPUTE: &[&str] = &[
    sub!("GET", "Microsoft.Compute/virtualMachines"),
    rg!("GET", "Microsoft.Compute/virtualMachines"),
    rg!("PUT", "Microsoft.Compute/virtualMachines/{vm}"),
    rg!("PATCH", "Microsoft.Compute/virtualMachines/{vm}"),
    rg!("GET", "Microsoft.Compute/virtualMachines/{vm}"),
    rg!("DELETE", "Microsoft.Compute/virtualMachines/{vm}"),
    rg!(
        "POST",
        "Microsoft.Compute/virtualMachines/{vm}/generateJoinToken"
    ),
    rg!("GET", "Microsoft.Compute/virtualMachines/{vm}/extensions"),
    rg!(
        "PUT",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    ),
    rg!(
        "PATCH",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    ),
    rg!(
        "GET",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    ),
    rg!(
        "DELETE",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    ),
    sub!("GET", "Microsoft.Compute/virtualMachineScaleSets"),
    rg!("GET", "Microsoft.Compute/virtualMachineScaleSets"),
    rg!("PUT", "Microsoft.Compute/virtualMachineScaleSets/{ss}"),
    rg!("PATCH", "Microsoft.Compute/virtualMachineScaleSets/{ss}"),
    rg!("GET", "Microsoft.Compute/virtualMachineScaleSets/{ss}"),
    rg!("DELETE", "Microsoft.Compute/virtualMachineScaleSets/{ss}"),
    rg!(
        "POST",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/generateJoinToken"
    ),
    rg!(
        "GET",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/virtualMachines"
    ),
    rg!(
        "GET",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/virtualMachines/{instance}"
    ),
    rg!(
        "DELETE",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/virtualMachines/{instance}"
    ),
];

const ARM_VAULTS: &[&str] = &[
    sub!("GET", "Microsoft.KeyVault/vaults"),
    rg!("GET", "Microsoft.KeyVault/vaults"),
    rg!("PUT", "Microsoft.KeyVault/vaults/{vault}"),
    rg!("PATCH", "Microsoft.KeyVault/vaults/{vault}"),
    rg!("GET", "Microsoft.KeyVault/vaults/{vault}"),
    rg!("DELETE", "Microsoft.KeyVault/vaults/{vault}"),
    rg!(
        "PUT",
        "Microsoft.KeyVault/vaults/{vault}/accessPolicies/{operation}"
    ),
    rg!("PUT", "Microsoft.KeyVault/vaults/{vault}/secrets/{name}"),
    rg!("PATCH", "Microsoft.KeyVault/vaults/{vault}/secrets/{name}"),
    rg!("GET", "Microsoft.KeyVault/vaults/{vault}/secrets/{name}"),
    rg!("GET", "Microsoft.KeyVault/vaults/{vault}/secrets"),
];

const ARM_BATCH: &[&str] = &[
    sub!("GET", "Microsoft.Batch/batchAccounts"),
    rg!("GET", "Microsoft.Batch/batchAccounts"),
    rg!("PUT", "Microsoft.Batch/batchAccounts/{account}"),
    rg!("PATCH", "Microsoft.Batch/batchAccounts/{account}"),
    rg!("GET", "Microsoft.Batch/batchAccounts/{account}"),
    rg!("DELETE", "Microsoft.Batch/batchAccounts/{account}"),
    rg!("GET", "Microsoft.Batch/batchAccounts/{account}/pools"),
    rg!(
        "PUT",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    ),
    rg!(
        "PATCH",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    ),
    rg!(
        "GET",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    ),
    rg!(
        "DELETE",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    ),
    rg!(
        "POST",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}/generateJoinToken"
    ),
];

const ARM_CLUSTERS: &[&str] = &[
    sub!("GET", "Microsoft.ContainerService/managedClusters"),
    rg!("GET", "Microsoft.ContainerService/managedClusters"),
    rg!(
        "PUT",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    ),
    rg!(
        "PATCH",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    ),
    rg!(
        "GET",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    ),
    rg!(
        "DELETE",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/agentPools/{pool}/generateJoinToken"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/readPodIdentityProfile"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/reportPodIdentityStatus"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/publishServiceAccountKeys"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/issueWebhookCertificate"
    ),
    rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/checkWorkloadIdentity"
    ),
];

const ARM_AUTHORIZATION: &[&str] = &[
    "ARM GET {scope}/providers/Microsoft.Authorization/roleDefinitions",
    "ARM GET {scope}/providers/Microsoft.Authorization/roleDefinitions/{id}",
    "ARM GET {scope}/providers/Microsoft.Authorization/roleAssignments",
    "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
    "ARM GET {scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
    "ARM DELETE {scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
];

const ARM_ACTIVITY: &[&str] = &[sub!(
    "GET",
    "Microsoft.Insights/eventtypes/management/values"
)];

const ARM_DEPLOYMENTS: &[&str] = &[
    rg!("GET", "Microsoft.Resources/deployments"),
    // `az deployment group list` (the SDK's path ends with a slash)
    rg!("GET", "Microsoft.Resources/deployments/"),
    rg!("PUT", "Microsoft.Resources/deployments/{name}"),
    rg!("GET", "Microsoft.Resources/deployments/{name}"),
    rg!("HEAD", "Microsoft.Resources/deployments/{name}"),
    rg!("DELETE", "Microsoft.Resources/deployments/{name}"),
    rg!("POST", "Microsoft.Resources/deployments/{name}/validate"),
    rg!("POST", "Microsoft.Resources/deployments/{name}/whatIf"),
    rg!(
        "POST",
        "Microsoft.Resources/deployments/{name}/exportTemplate"
    ),
    rg!("POST", "Microsoft.Resources/deployments/{name}/cancel"),
    rg!("GET", "Microsoft.Resources/deployments/{name}/operations"),
    rg!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operations/{id}"
    ),
    rg!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operationStatuses/{id}"
    ),
    // a deployment's operations as az and the SDKs ask for them (no `providers/`)
    "ARM GET /subscriptions/{sub}/resourcegroups/{rg}/deployments/{name}/operations",
    "ARM GET /subscriptions/{sub}/resourcegroups/{rg}/deployments/{name}/operations/{id}",
];

const ARM_SUBSCRIPTION_DEPLOYMENTS: &[&str] = &[
    sub!("GET", "Microsoft.Resources/deployments"),
    // `az deployment sub list`
    sub!("GET", "Microsoft.Resources/deployments/"),
    sub!("PUT", "Microsoft.Resources/deployments/{name}"),
    sub!("GET", "Microsoft.Resources/deployments/{name}"),
    sub!("HEAD", "Microsoft.Resources/deployments/{name}"),
    sub!("DELETE", "Microsoft.Resources/deployments/{name}"),
    sub!("POST", "Microsoft.Resources/deployments/{name}/validate"),
    sub!("POST", "Microsoft.Resources/deployments/{name}/whatIf"),
    sub!(
        "POST",
        "Microsoft.Resources/deployments/{name}/exportTemplate"
    ),
    sub!("POST", "Microsoft.Resources/deployments/{name}/cancel"),
    sub!("GET", "Microsoft.Resources/deployments/{name}/operations"),
    sub!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operations/{id}"
    ),
    sub!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operationStatuses/{id}"
    ),
];

const KV_SECRETS: &[&str] = &[
    "KV PUT /secrets/{name}",
    "KV GET /secrets/{name}",
    "KV GET /secrets/{name}/{version}",
    "KV PATCH /secrets/{name}/{version}",
    "KV DELETE /secrets/{name}",
    "KV GET /secrets",
    "KV GET /secrets/{name}/versions",
    "KV POST /secrets/{name}/backup",
    "KV POST /secrets/restore",
    "KV GET /deletedsecrets",
    "KV GET /deletedsecrets/{name}",
    "KV DELETE /deletedsecrets/{name}",
    "KV POST /deletedsecrets/{name}/recover",
];

const KV_KEYS: &[&str] = &[
    "KV POST /keys/{name}/create",
    "KV POST /keys/{name}/rotate",
    "KV PUT /keys/{name}",
    "KV GET /keys/{name}",
    "KV GET /keys/{name}/{version}",
    "KV PATCH /keys/{name}/{version}",
    "KV DELETE /keys/{name}",
    "KV GET /keys",
    "KV GET /keys/{name}/versions",
    "KV POST /keys/{name}/{version}/sign",
    "KV POST /keys/{name}/{version}/verify",
    "KV POST /keys/{name}/{version}/encrypt",
    "KV POST /keys/{name}/{version}/decrypt",
    "KV POST /keys/{name}/{version}/wrapkey",
    "KV POST /keys/{name}/{version}/unwrapkey",
    "KV GET /keys/{name}/rotationpolicy",
    "KV POST /keys/{name}/backup",
    "KV POST /keys/restore",
    "KV GET /deletedkeys",
    "KV GET /deletedkeys/{name}",
    "KV DELETE /deletedkeys/{name}",
    "KV POST /deletedkeys/{name}/recover",
];

const KV_CERTIFICATES: &[&str] = &[
    "KV POST /certificates/{name}/create",
    "KV GET /certificates/{name}/pending",
    "KV PATCH /certificates/{name}/pending",
    "KV DELETE /certificates/{name}/pending",
    "KV POST /certificates/{name}/pending/merge",
    "KV POST /certificates/{name}/import",
    "KV GET /certificates/{name}/policy",
    "KV PATCH /certificates/{name}/policy",
    "KV GET /certificates/{name}",
    "KV GET /certificates/{name}/{version}",
    "KV PATCH /certificates/{name}/{version}",
    "KV DELETE /certificates/{name}",
    "KV GET /certificates",
    "KV GET /certificates/{name}/versions",
    "KV GET /certificates/contacts",
    "KV PUT /certificates/contacts",
    "KV DELETE /certificates/contacts",
    "KV GET /certificates/issuers",
    "KV GET /certificates/issuers/{name}",
    "KV POST /certificates/{name}/backup",
    "KV POST /certificates/restore",
    "KV GET /deletedcertificates",
    "KV GET /deletedcertificates/{name}",
    "KV DELETE /deletedcertificates/{name}",
    "KV POST /deletedcertificates/{name}/recover",
];

/// Every area and the test that exercises it.
const AREAS: &[(&str, &[&str])] = &[
    ("token_service_routes", STS),
    ("cloud_metadata_and_vault_clock_routes", CLOUD_AND_ADMIN),
    ("graph_routes", GRAPH),
    (
        "arm_managed_cluster_routes (the cluster's OIDC issuer)",
        OIDC,
    ),
    ("host_api_routes", HOST),
    ("arm_subscription_and_resource_group_routes", ARM_GROUPS),
    ("arm_generic_resource_routes", ARM_GENERIC),
    (
        "arm_identity_and_federated_credential_routes",
        ARM_IDENTITIES,
    ),
    ("arm_compute_routes", ARM_COMPUTE),
    ("arm_vault_routes", ARM_VAULTS),
    ("arm_batch_routes", ARM_BATCH),
    ("arm_managed_cluster_routes", ARM_CLUSTERS),
    ("arm_authorization_routes", ARM_AUTHORIZATION),
    ("arm_activity_log_route", ARM_ACTIVITY),
    ("arm_deployment_routes", ARM_DEPLOYMENTS),
    (
        "arm_subscription_deployment_routes",
        ARM_SUBSCRIPTION_DEPLOYMENTS,
    ),
    ("key_vault_secret_routes", KV_SECRETS),
    ("key_vault_key_routes", KV_KEYS),
    ("key_vault_certificate_routes", KV_CERTIFICATES),
];

#[test]
fn every_route_is_enumerated_and_tested() {
    let enumerated: BTreeSet<&str> = ROUTES.iter().copied().collect();
    assert_eq!(enumerated.len(), ROUTES.len(), "a route is listed twice");
    for r in ROUTES {
        let mut it = r.splitn(3, ' ');
        let (surface, method, template) = (it.next(), it.next(), it.next());
        assert!(
            matches!(
                surface,
                Some("STS" | "CLOUD" | "ADMIN" | "GRAPH" | "HOST" | "ARM" | "KV" | "OIDC")
            ),
            "{r}"
        );
        assert!(
            matches!(
                method,
                Some("GET" | "HEAD" | "PUT" | "PATCH" | "POST" | "DELETE")
            ),
            "{r}"
        );
        let t = template.unwrap_or_default();
        assert!(t.starts_with('/') || t.starts_with("{scope}/"), "{r}");
    }
    let mut tested = BTreeSet::new();
    for (test, area) in AREAS {
        for r in *area {
            assert!(tested.insert(*r), "{r} is in two areas (again in {test})");
        }
    }
    let untested: Vec<_> = enumerated.difference(&tested).collect();
    let unknown: Vec<_> = tested.difference(&enumerated).collect();
    assert!(untested.is_empty(), "routes without a test: {untested:#?}");
    assert!(
        unknown.is_empty(),
        "tested routes not in ROUTES: {unknown:#?}"
    );
    for r in PUBLIC.iter().chain(NEVER_ACCEPTED) {
        assert!(enumerated.contains(r), "{r}");
    }
}

#[test]
fn route_templates_fit_only_their_paths() {
    assert!(fits("/secrets/{name}", "/secrets/db"));
    assert!(!fits("/secrets/{name}", "/secrets/db/v1"));
    assert!(fits("/subscriptions/{sub}", "/SUBSCRIPTIONS/abc"));
    assert!(fits(
        "{scope}/providers/Microsoft.Authorization/roleDefinitions",
        "/providers/Microsoft.Authorization/roleDefinitions"
    ));
    assert!(fits(
        "{scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
        "/subscriptions/s/resourceGroups/g/providers/Microsoft.Authorization/roleAssignments/x"
    ));
    assert!(!fits(
        "{scope}/providers/Microsoft.Authorization/roleAssignments",
        "/subscriptions/s/providers/Microsoft.Authorization/roleDefinitions"
    ));
    // a list with its trailing slash is its own route, never a resource with an empty name
    let deps = "/subscriptions/s/resourcegroups/g/providers/Microsoft.Resources/deployments";
    let list = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Resources/deployments";
    let one = format!("{list}/{{name}}");
    assert!(fits(&format!("{list}/"), &format!("{deps}/")));
    assert!(!fits(list, &format!("{deps}/")));
    assert!(!fits(&one, &format!("{deps}/")));
    assert!(!fits(&format!("{list}/"), &format!("{deps}/d1")));
    assert!(fits(&one, &format!("{deps}/d1")));
    // an empty segment inside a path does name something: a key's latest version
    assert!(fits("/keys/{name}/{version}/encrypt", "/keys/k//encrypt"));
    // a deployment's operations without `providers/` (az, the SDKs) fit only their own form
    let legacy = "/subscriptions/{sub}/resourcegroups/{rg}/deployments/{name}/operations";
    let ops = "/subscriptions/s/resourceGroups/g/deployments/d1/operations";
    assert!(fits(legacy, ops));
    assert!(fits(&format!("{legacy}/{{id}}"), &format!("{ops}/ABC")));
    assert!(!fits(&format!("{one}/operations"), ops));
    assert!(!fits(legacy, &format!("{deps}/d1/operations")));
}

// ------------------------------------------------------------------ helpers

const RES: &str = "api-version=2022-12-01";
const MSI: &str = "api-version=2023-01-31";
const COMPUTE: &str = "api-version=2024-07-01";
const KV_ARM: &str = "api-version=2023-07-01";
const BATCH: &str = "api-version=2024-07-01";
const AKS: &str = "api-version=2026-08-01";
const AUTHZ: &str = "api-version=2022-04-01";
const INSIGHTS: &str = "api-version=2015-04-01";
const KV: &str = "api-version=7.5";

/// A caller: its token and its object id.
struct Who {
    token: String,
    oid: String,
}

/// An application with no role at all, with a token for `scope`.
async fn nobody(srv: &Srv, name: &str, scope: &str) -> Who {
    let (id, oid, secret) = srv.roleless_app(name).await;
    Who {
        token: srv.token(&id, &secret, scope).await,
        oid,
    }
}

/// The admin with an ARM token.
async fn admin(srv: &Srv) -> Who {
    let token = srv.admin_token(ARM_SCOPE).await;
    let oid = s(&claims(&token)["oid"]);
    Who { token, oid }
}

/// `/subscriptions/{sub}/resourceGroups/{rg}`.
fn group(srv: &Srv, rg: &str) -> String {
    format!("/subscriptions/{}/resourceGroups/{rg}", srv.sub)
}

/// Create resource group `rg` as `who`.
async fn put_group(srv: &Srv, who: &Who, rg: &str) {
    let c = srv
        .call(
            "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}",
            format!("{}?{RES}", group(srv, rg)),
        )
        .bearer(&who.token)
        .json(&json!({"location": "local"}));
    srv.expect(c, 201).await;
}

/// The callers ARM refuses on `route`: no token (401 with its challenge) and a principal
/// without a role (403 naming it).
async fn arm_refused(
    srv: &Srv,
    no_role: &Who,
    route: &'static str,
    path: &str,
    body: Option<&Value>,
) {
    let call = || {
        let c = srv.call(route, path);
        match body {
            Some(b) => c.json(b),
            None => c,
        }
    };
    let r = srv.send(call()).await;
    arm_unauthenticated(srv, &r);
    let r = srv.send(call().bearer(&no_role.token)).await;
    arm_forbidden(&r, &no_role.oid);
}

/// A list ARM filters by what the caller may read: no token is refused (401), a principal
/// without a role sees nothing.
async fn arm_filtered(srv: &Srv, no_role: &Who, route: &'static str, path: &str) {
    let r = srv.send(srv.call(route, path)).await;
    arm_unauthenticated(srv, &r);
    let v = srv
        .expect(srv.call(route, path).bearer(&no_role.token), 200)
        .await;
    assert_eq!(v["value"], json!([]), "{route}: {v}");
}

/// Whether `list` (a `value` array) has an item whose `id` is `id` (ARM ids compare without
/// case).
fn lists(list: &Value, id: &str) -> bool {
    list["value"]
        .as_array()
        .unwrap_or(&vec![])
        .iter()
        .any(|i| s(&i["id"]).eq_ignore_ascii_case(id))
}

/// The callers the Key Vault refuses on `route`: no token (401 with the challenge the SDKs
/// read) and a principal the access policies do not name (403 `ForbiddenByPolicy`).
async fn kv_refused(
    srv: &Srv,
    no_access: &Who,
    route: &'static str,
    path: &str,
    body: Option<&Value>,
) {
    let call = || {
        let c = srv.call(route, path);
        match body {
            Some(b) => c.json(b),
            None => c,
        }
    };
    let r = srv.send(call()).await;
    kv_unauthenticated(srv, &r);
    let r = srv.send(call().bearer(&no_access.token)).await;
    kv_error(&r, 403, "Forbidden", Some("ForbiddenByPolicy"));
    assert!(
        s(&r.body["error"]["message"]).contains(&no_access.oid),
        "{}",
        r.text
    );
}

/// A server with vault `kv1` whose access policy gives the admin everything; the admin's and
/// a stranger's Key Vault tokens.
async fn vault_server() -> (Srv, Who, Who) {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    put_group(&srv, &adm, "rg1").await;
    let all = json!(["all"]);
    let body = json!({"location": "local", "properties": {
        "tenantId": srv.tenant,
        "sku": {"family": "A", "name": "standard"},
        "accessPolicies": [{"tenantId": srv.tenant, "objectId": adm.oid,
            "permissions": {"secrets": all, "keys": all, "certificates": all}}],
    }});
    let c = srv
        .call(
            rg!("PUT", "Microsoft.KeyVault/vaults/{vault}"),
            format!(
                "{}/providers/Microsoft.KeyVault/vaults/{VAULT}?{KV_ARM}",
                group(&srv, "rg1")
            ),
        )
        .bearer(&adm.token)
        .json(&body);
    srv.expect(c, 201).await;
    let kv_admin = Who {
        token: srv.admin_token(KV_SCOPE).await,
        oid: adm.oid,
    };
    let stranger = nobody(&srv, "stranger", KV_SCOPE).await;
    (srv, kv_admin, stranger)
}

/// `https://kv1.vault.localhost` (the data plane's ids, as the client addressed it).
fn kv_base() -> String {
    format!("https://{KV_HOST}")
}

// ------------------------------------------------------------------ token service

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_service_routes() {
    let srv = Srv::start(ROUTES).await;
    let (t, b) = (srv.tenant.clone(), srv.base.clone());
    let other = "00000000-0000-0000-0000-00000000beef";

    // OIDC discovery, v2 and v1: our tenant and the `common` alias; another tenant is refused
    let route = "STS GET /{tenant}/v2.0/.well-known/openid-configuration";
    let v = srv
        .expect(
            srv.call(route, format!("/{t}/v2.0/.well-known/openid-configuration")),
            200,
        )
        .await;
    assert_eq!(v["issuer"], format!("{b}/{t}/v2.0"));
    assert_eq!(v["token_endpoint"], format!("{b}/{t}/oauth2/v2.0/token"));
    assert_eq!(v["jwks_uri"], format!("{b}/{t}/discovery/v2.0/keys"));
    assert_eq!(v["id_token_signing_alg_values_supported"], json!(["RS256"]));
    let v = srv
        .expect(
            srv.call(route, "/common/v2.0/.well-known/openid-configuration"),
            200,
        )
        .await;
    assert_eq!(v["issuer"], format!("{b}/{t}/v2.0"));
    let r = srv
        .send(srv.call(
            route,
            format!("/{other}/v2.0/.well-known/openid-configuration"),
        ))
        .await;
    sts_error(&r, 400, "invalid_request", 90002);

    let route = "STS GET /{tenant}/.well-known/openid-configuration";
    let v = srv
        .expect(
            srv.call(route, format!("/{t}/.well-known/openid-configuration")),
            200,
        )
        .await;
    assert_eq!(v["issuer"], format!("{b}/{t}/"));
    assert_eq!(v["token_endpoint"], format!("{b}/{t}/oauth2/token"));
    assert_eq!(v["jwks_uri"], format!("{b}/{t}/discovery/keys"));
    let r = srv
        .send(srv.call(route, format!("/{other}/.well-known/openid-configuration")))
        .await;
    sts_error(&r, 400, "invalid_request", 90002);

    // a token (the v2 endpoint), then the keys that verify it
    let route = "STS POST /{tenant}/oauth2/v2.0/token";
    let path = format!("/{t}/oauth2/v2.0/token");
    let (id, secret) = (srv.admin_id.clone(), srv.admin_secret.clone());
    let ask = |client: &str, secret: &str, path: &str| {
        srv.call(route, path.to_string()).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client),
            ("client_secret", secret),
            ("scope", ARM_SCOPE),
        ])
    };
    let v = srv.expect(ask(&id, &secret, &path), 200).await;
    assert_eq!(v["token_type"], "Bearer");
    assert!(v["expires_in"].as_u64().is_some_and(|e| e > 3000), "{v}");
    assert_eq!(v["ext_expires_in"], v["expires_in"]);
    let token = s(&v["access_token"]);
    let c = claims(&token);
    assert_eq!(c["aud"], "https://management.azure.com");
    assert_eq!(c["tid"], t.as_str());
    assert_eq!(c["appid"], id.as_str());
    assert!(c["oid"].is_string());
    let r = srv.send(ask(&id, "not-the-secret", &path)).await;
    sts_error(&r, 401, "invalid_client", 7000215);
    let r = srv
        .send(ask("11111111-2222-3333-4444-555555555555", &secret, &path))
        .await;
    sts_error(&r, 400, "unauthorized_client", 700016);
    let r = srv
        .send(ask(&id, &secret, &format!("/{other}/oauth2/v2.0/token")))
        .await;
    sts_error(&r, 400, "invalid_request", 90002);

    let header: Value = {
        use base64::Engine;
        let h = token.split('.').next().unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(header["alg"], "RS256");
    for (route, tail) in [
        (
            "STS GET /{tenant}/discovery/v2.0/keys",
            "discovery/v2.0/keys",
        ),
        ("STS GET /{tenant}/discovery/keys", "discovery/keys"),
    ] {
        let v = srv
            .expect(srv.call(route, format!("/{t}/{tail}")), 200)
            .await;
        let keys = v["keys"].as_array().expect("keys");
        let signer = keys
            .iter()
            .find(|k| k["kid"] == header["kid"])
            .unwrap_or_else(|| panic!("the token's kid is published: {v}"));
        assert_eq!(signer["kty"], "RSA");
        assert_eq!(signer["use"], "sig");
        assert!(
            signer["n"].is_string() && signer["e"].is_string(),
            "{signer}"
        );
        let r = srv.send(srv.call(route, format!("/{other}/{tail}"))).await;
        sts_error(&r, 400, "invalid_request", 90002);
    }

    // the v1 endpoint: `resource`, every number a string
    let route = "STS POST /{tenant}/oauth2/token";
    let ask = |secret: &str| {
        srv.call(route, format!("/{t}/oauth2/token")).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &id),
            ("client_secret", secret),
            ("resource", "https://management.azure.com/"),
        ])
    };
    let v = srv.expect(ask(&secret), 200).await;
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["resource"], "https://management.azure.com/");
    for k in ["expires_in", "ext_expires_in", "expires_on", "not_before"] {
        assert!(
            s(&v[k]).parse::<u64>().is_ok(),
            "{k} is a number in a string: {v}"
        );
    }
    assert_eq!(
        claims(&s(&v["access_token"]))["aud"],
        "https://management.azure.com/"
    );
    let r = srv.send(ask("not-the-secret")).await;
    sts_error(&r, 401, "invalid_client", 7000215);

    // MSAL's instance discovery, for our own host only
    let route = "STS GET /common/discovery/instance";
    let q = |endpoint: &str| {
        format!(
            "/common/discovery/instance?{}",
            serde_urlencoded::to_string([
                ("api-version", "1.1"),
                ("authorization_endpoint", endpoint),
            ])
            .unwrap()
        )
    };
    let v = srv
        .expect(
            srv.call(route, q(&format!("{b}/{t}/oauth2/v2.0/authorize"))),
            200,
        )
        .await;
    assert_eq!(
        v["tenant_discovery_endpoint"],
        format!("{b}/{t}/v2.0/.well-known/openid-configuration")
    );
    let host = b.trim_start_matches("https://");
    assert_eq!(v["metadata"][0]["preferred_network"], host);
    assert_eq!(v["metadata"][0]["aliases"], json!([host]));
    let r = srv
        .send(srv.call(
            route,
            q("https://login.microsoftonline.com/common/oauth2/v2.0/authorize"),
        ))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.body["error"], "invalid_instance");
    assert!(s(&r.body["error_description"]).starts_with("AADSTS50049:"));

    srv.finish(STS, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ cloud metadata, vault clock

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_metadata_and_vault_clock_routes() {
    let srv = Srv::start(ROUTES).await;
    let b = srv.base.clone();
    // public: what `az cloud register --endpoint-resource-manager` reads
    let v = srv
        .expect(
            srv.call(
                "CLOUD GET /metadata/endpoints",
                "/metadata/endpoints?api-version=2022-09-01",
            ),
            200,
        )
        .await;
    assert_eq!(v["authentication"]["loginEndpoint"], b.as_str());
    assert_eq!(v["authentication"]["tenant"], srv.tenant.as_str());
    assert_eq!(v["authentication"]["audiences"][0], format!("{b}/"));
    assert_eq!(v["resourceManager"], format!("{b}/"));
    // `az keyvault … --vault-name v` builds `https://v.{keyVaultDns}`: the vault's own URL,
    // port included (az has no other way to learn it)
    let dns = s(&v["suffixes"]["keyVaultDns"]);
    assert_eq!(format!("https://kv1.{dns}/"), srv.s.vault_uri("kv1"), "{v}");
    let port = b.rsplit(':').next().unwrap();
    assert_eq!(dns, format!("vault.localhost:{port}"), "{v}");
    // older api-versions get ARM's older shapes: 2015-01-01 (msrestazure) and `1.0` (Azure
    // Stack, go-autorest) the first one; 2019-05-01 … 2022-08 an array of clouds
    for version in ["2015-01-01", "1.0"] {
        let old = srv
            .expect(
                srv.call(
                    "CLOUD GET /metadata/endpoints",
                    format!("/metadata/endpoints?api-version={version}"),
                ),
                200,
            )
            .await;
        assert_eq!(
            old,
            json!({
                "galleryEndpoint": format!("{b}/"),
                "graphEndpoint": format!("{b}/"),
                "portalEndpoint": format!("{b}/"),
                "authentication": {
                    "loginEndpoint": b,
                    "audiences": [format!("{b}/"), "https://management.core.windows.net/"],
                },
            }),
            "{version}"
        );
    }
    for version in ["2019-05-01", "2020-06-01"] {
        let clouds = srv
            .expect(
                srv.call(
                    "CLOUD GET /metadata/endpoints",
                    format!("/metadata/endpoints?api-version={version}"),
                ),
                200,
            )
            .await;
        assert_eq!(clouds, json!([v.clone()]), "{version}");
    }
    // az asks `//metadata/endpoints` when the registered URL ends with `/`: the same document
    let again = srv
        .expect(
            srv.call(
                "CLOUD GET //metadata/endpoints",
                "//metadata/endpoints?api-version=2022-09-01",
            ),
            200,
        )
        .await;
    assert_eq!(again, v);
    // a path nothing serves: 404 naming that path (not a sentence in place of it)
    let r = keyless_server::app(srv.s.clone())
        .oneshot(
            axum::http::Request::builder()
                .uri("/no/such/path")
                .header("host", "localhost")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "InvalidResourceId", "{body}");
    assert_eq!(
        body["error"]["message"], "The request path '/no/such/path' is not a valid resource path.",
        "{body}"
    );

    // the Key Vault clock moves for an Owner of the subscription only
    let route = "ADMIN POST /keyless/admin/v1/vault-clock";
    let adm = admin(&srv).await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let body = json!({"advanceSeconds": 86_400});
    let v = srv
        .expect(
            srv.call(route, "/keyless/admin/v1/vault-clock")
                .bearer(&adm.token)
                .json(&body),
            200,
        )
        .await;
    assert!(
        v["now"].as_u64().is_some_and(|n| n >= before + 86_400),
        "{v}"
    );
    for k in ["renewed", "notified", "purged"] {
        assert_eq!(v[k], 0, "{v}");
    }
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    arm_refused(
        &srv,
        &stranger,
        route,
        "/keyless/admin/v1/vault-clock",
        Some(&body),
    )
    .await;

    srv.finish(CLOUD_AND_ADMIN, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ Graph

/// Graph's 401 without a token: `InvalidAuthenticationToken`, "Access token is empty."
fn graph_unauthenticated(r: &Resp) {
    arm_error(r, 401, "InvalidAuthenticationToken");
    assert_eq!(
        r.body["error"]["message"], "Access token is empty.",
        "{}",
        r.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_routes() {
    let srv = Srv::start(ROUTES).await;
    let graph = srv.admin_token(GRAPH_SCOPE).await;

    // register an application: 201 with its secret, once
    let route = "GRAPH POST /v1.0/applications";
    let body = json!({"displayName": "ci-deployer"});
    let app = srv
        .expect(
            srv.call(route, "/v1.0/applications")
                .bearer(&graph)
                .json(&body),
            201,
        )
        .await;
    assert_eq!(app["displayName"], "ci-deployer");
    let (app_id, object_id) = (s(&app["appId"]), s(&app["id"]));
    let secret = s(&app["passwordCredentials"][0]["secretText"]);
    assert!(
        !app_id.is_empty() && !object_id.is_empty() && !secret.is_empty(),
        "{app}"
    );
    assert_eq!(app["keyCredentials"], json!([]));
    // the secret works at the token service; the new application has no role, so it may not
    // register applications itself
    let app_graph = srv.token(&app_id, &secret, GRAPH_SCOPE).await;
    let r = srv
        .send(srv.call(route, "/v1.0/applications").json(&body))
        .await;
    graph_unauthenticated(&r);
    let r = srv
        .send(
            srv.call(route, "/v1.0/applications")
                .bearer(&app_graph)
                .json(&body),
        )
        .await;
    // Graph's own refusal of a caller without the right
    arm_error(&r, 403, "Authorization_RequestDenied");
    assert!(
        s(&r.body["error"]["message"]).contains(&object_id),
        "{}",
        r.text
    );

    // resolve it by client id ($filter) and by object id, as `az role assignment create
    // --assignee` does; any authenticated caller may read the directory
    let route = "GRAPH GET /v1.0/servicePrincipals";
    let q = format!(
        "/v1.0/servicePrincipals?{}",
        serde_urlencoded::to_string([("$filter", format!("appId eq '{app_id}'"))]).unwrap()
    );
    let v = srv
        .expect(srv.call(route, q.clone()).bearer(&app_graph), 200)
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["value"][0]["id"], object_id.as_str());
    assert_eq!(v["value"][0]["appId"], app_id.as_str());
    assert_eq!(v["value"][0]["servicePrincipalType"], "Application");
    let r = srv.send(srv.call(route, q.clone())).await;
    graph_unauthenticated(&r);
    // a Key Vault token is not a Graph token
    let kv_token = srv.token(&app_id, &secret, KV_SCOPE).await;
    let r = srv.send(srv.call(route, q).bearer(&kv_token)).await;
    arm_error(&r, 401, "InvalidAuthenticationToken");

    let route = "GRAPH GET /v1.0/servicePrincipals/{id}";
    let path = format!("/v1.0/servicePrincipals/{object_id}");
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&graph), 200)
        .await;
    assert_eq!(v["appId"], app_id.as_str());
    assert_eq!(v["displayName"], "ci-deployer");
    assert_eq!(v["accountEnabled"], true);
    let r = srv.send(srv.call(route, path.clone())).await;
    graph_unauthenticated(&r);
    let r = srv.send(srv.call(route, path).bearer(&kv_token)).await;
    arm_error(&r, 401, "InvalidAuthenticationToken");
    let r = srv
        .send(
            srv.call(
                route,
                "/v1.0/servicePrincipals/00000000-0000-0000-0000-000000000000",
            )
            .bearer(&graph),
        )
        .await;
    // Graph's error shape: `{"error":{"code","message"}}`
    arm_error(&r, 404, "Request_ResourceNotFound");

    // `az role assignment create --assignee <guid>` (az 2.91) asks by servicePrincipalNames:
    // an application's holds its app id; a managed identity's its client id and resource id
    let adm = admin(&srv).await;
    put_group(&srv, &adm, "graph-rg").await;
    let mi_id = format!(
        "{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/graph-mi",
        group(&srv, "graph-rg")
    );
    let mi = srv
        .expect(
            srv.call(
                rg!(
                    "PUT",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
                ),
                format!("{mi_id}?{MSI}"),
            )
            .bearer(&adm.token)
            .json(&json!({"location": "local"})),
            201,
        )
        .await;
    let (mi_client, mi_principal) = (
        s(&mi["properties"]["clientId"]),
        s(&mi["properties"]["principalId"]),
    );
    let route = "GRAPH GET /v1.0/servicePrincipals";
    let by_name = |name: &str| {
        format!(
            "/v1.0/servicePrincipals?{}",
            serde_urlencoded::to_string([(
                "$filter",
                format!("servicePrincipalNames/any(c:c eq '{name}')")
            )])
            .unwrap()
        )
    };
    let v = srv
        .expect(srv.call(route, by_name(&app_id)).bearer(&graph), 200)
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["value"][0]["id"], object_id.as_str());
    assert_eq!(v["value"][0]["servicePrincipalNames"], json!([app_id]));
    for name in [mi_client.clone(), mi_id.clone(), mi_id.to_uppercase()] {
        let v = srv
            .expect(srv.call(route, by_name(&name)).bearer(&graph), 200)
            .await;
        assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{name}: {v}");
        assert_eq!(v["value"][0]["id"], mi_principal.as_str(), "{v}");
        assert_eq!(v["value"][0]["servicePrincipalType"], "ManagedIdentity");
        assert_eq!(
            v["value"][0]["servicePrincipalNames"],
            json!([mi_client, mi_id])
        );
    }
    // an object id is not a service principal name; nor is an unknown name
    for name in [
        mi_principal.as_str(),
        "00000000-0000-0000-0000-000000000000",
    ] {
        let v = srv
            .expect(srv.call(route, by_name(name)).bearer(&graph), 200)
            .await;
        assert_eq!(v["value"], json!([]), "{name}");
    }
    let r = srv.send(srv.call(route, by_name(&app_id))).await;
    graph_unauthenticated(&r);
    // any other filter stays refused
    for f in [
        format!("servicePrincipalNames/any(c:c eq '{app_id}') or 1 eq 1"),
        format!("servicePrincipalNames/any(c:d eq '{app_id}')"),
        "displayName eq 'ci-deployer'".to_string(),
    ] {
        let q = format!(
            "/v1.0/servicePrincipals?{}",
            serde_urlencoded::to_string([("$filter", f.as_str())]).unwrap()
        );
        let r = srv.send(srv.call(route, q).bearer(&graph)).await;
        arm_error(&r, 400, "Request_UnsupportedQuery");
    }

    // object ids to objects, each with its @odata.type (az's fallback for a guid assignee and
    // `az role assignment list`'s principal names); unknown and repeated ids left out
    let route = "GRAPH POST /v1.0/directoryObjects/getByIds";
    let path = "/v1.0/directoryObjects/getByIds";
    let az_types = json!([
        "user",
        "group",
        "servicePrincipal",
        "directoryObjectPartnerReference"
    ]);
    let v = srv
        .expect(
            srv.call(route, path).bearer(&app_graph).json(&json!({
                "ids": [object_id, mi_principal, "00000000-0000-0000-0000-000000000000", object_id.to_uppercase()],
                "types": az_types,
            })),
            200,
        )
        .await;
    let got = v["value"].as_array().cloned().unwrap_or_default();
    assert_eq!(got.len(), 2, "{v}");
    assert_eq!(got[0]["id"], object_id.as_str());
    assert_eq!(got[0]["@odata.type"], "#microsoft.graph.servicePrincipal");
    assert_eq!(got[0]["servicePrincipalNames"][0], app_id.as_str());
    assert_eq!(got[0]["displayName"], "ci-deployer");
    assert_eq!(got[1]["id"], mi_principal.as_str());
    assert_eq!(got[1]["@odata.type"], "#microsoft.graph.servicePrincipal");
    assert_eq!(got[1]["servicePrincipalNames"][0], mi_client.as_str());
    // without types, every kind; with types that exclude service principals (any case), none
    let v = srv
        .expect(
            srv.call(route, path)
                .bearer(&graph)
                .json(&json!({"ids": [mi_principal]})),
            200,
        )
        .await;
    assert_eq!(v["value"][0]["id"], mi_principal.as_str(), "{v}");
    let v = srv
        .expect(
            srv.call(route, path)
                .bearer(&graph)
                .json(&json!({"ids": [mi_principal], "types": ["USER", "Group"]})),
            200,
        )
        .await;
    assert_eq!(v["value"], json!([]));
    let body = json!({"ids": [object_id]});
    let r = srv.send(srv.call(route, path).json(&body)).await;
    graph_unauthenticated(&r);
    let r = srv
        .send(srv.call(route, path).bearer(&kv_token).json(&body))
        .await;
    arm_error(&r, 401, "InvalidAuthenticationToken");
    // bad bodies in Graph's error shape
    let many: Vec<String> = (0..1001)
        .map(|i| format!("00000000-0000-0000-0000-{i:012}"))
        .collect();
    for bad in [
        json!({}),
        json!({"ids": []}),
        json!({"ids": "x"}),
        json!({"ids": [1]}),
        json!({"ids": ["not-a-guid"]}),
        json!({"ids": [object_id], "types": ["servicePrincipals"]}),
        json!({"ids": many}),
        json!([object_id]),
    ] {
        let r = srv
            .send(srv.call(route, path).bearer(&graph).json(&bad))
            .await;
        arm_error(&r, 400, "Request_BadRequest");
    }
    let r = srv.send(srv.call(route, path).bearer(&graph)).await;
    arm_error(&r, 400, "Request_BadRequest");

    // `/me` with an application's token: Graph's own refusal (every Keyless token is one)
    let route = "GRAPH GET /v1.0/me";
    for token in [&graph, &app_graph] {
        let r = srv.send(srv.call(route, "/v1.0/me").bearer(token)).await;
        arm_error(&r, 400, "BadRequest");
        assert_eq!(
            r.body["error"]["message"],
            "/me request is only valid with delegated authentication flow.",
            "{}",
            r.text
        );
    }
    graph_unauthenticated(&srv.send(srv.call(route, "/v1.0/me")).await);
    let r = srv
        .send(srv.call(route, "/v1.0/me").bearer(&kv_token))
        .await;
    arm_error(&r, 401, "InvalidAuthenticationToken");

    srv.finish(GRAPH, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ host API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_api_routes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    put_group(&srv, &adm, "rg1").await;
    let rgp = group(&srv, "rg1");
    let id_path = format!("{rgp}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app");
    let ident = srv
        .expect(
            srv.call(
                rg!(
                    "PUT",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
                ),
                format!("{id_path}?{MSI}"),
            )
            .bearer(&adm.token)
            .json(&json!({"location": "local"})),
            201,
        )
        .await;
    let vm_path = format!("{rgp}/providers/Microsoft.Compute/virtualMachines/vm1");
    let vm = srv
        .expect(
            srv.call(
                rg!("PUT", "Microsoft.Compute/virtualMachines/{vm}"),
                format!("{vm_path}?{COMPUTE}"),
            )
            .bearer(&adm.token)
            .json(&json!({"location": "local", "identity": {
                    "type": "SystemAssigned, UserAssigned",
                    "userAssignedIdentities": {s(&ident["id"]): {}}}})),
            201,
        )
        .await;
    let token = s(&srv
        .expect(
            srv.call(
                rg!(
                    "POST",
                    "Microsoft.Compute/virtualMachines/{vm}/generateJoinToken"
                ),
                format!("{vm_path}/generateJoinToken?{COMPUTE}"),
            )
            .bearer(&adm.token),
            200,
        )
        .await["joinToken"]);

    // join: a one-time token and a CSR make a client certificate bound to the VM
    let route = "HOST POST /keyless/host/v1/join";
    let (csr, _key) = keyless_pki::generate_csr("keyless-node").unwrap();
    let body = json!({"joinToken": token, "csr": csr});
    let v = srv
        .expect(srv.call(route, "/keyless/host/v1/join").json(&body), 200)
        .await;
    assert!(s(&v["vmResourceId"]).eq_ignore_ascii_case(&vm_path), "{v}");
    assert!(
        s(&v["ca"]).starts_with("-----BEGIN CERTIFICATE-----"),
        "{v}"
    );
    assert!(
        v["notAfter"].as_u64().is_some_and(|n| n > srv.s.now()),
        "{v}"
    );
    let cert = keyless_pki::pem_blocks(&s(&v["certificate"]), "CERTIFICATE");
    let fp = keyless_pki::sha256_hex(&cert[0]);
    // a retry of the same join (same key) is the same host again; another key may not spend
    // the token, and a made-up one was never valid
    let v = srv
        .expect(srv.call(route, "/keyless/host/v1/join").json(&body), 200)
        .await;
    assert!(s(&v["vmResourceId"]).eq_ignore_ascii_case(&vm_path), "{v}");
    let (other_csr, _) = keyless_pki::generate_csr("keyless-node").unwrap();
    let r = srv
        .send(
            srv.call(route, "/keyless/host/v1/join")
                .json(&json!({"joinToken": token, "csr": other_csr})),
        )
        .await;
    host_error(&r, 401, "invalid_join_token");
    assert!(
        s(&r.body["error_description"]).contains("already been used"),
        "{}",
        r.text
    );
    let r = srv
        .send(
            srv.call(route, "/keyless/host/v1/join")
                .json(&json!({"joinToken": "made-up", "csr": csr})),
        )
        .await;
    host_error(&r, 401, "invalid_join_token");
    let unknown = "ab".repeat(32);

    // the VM's view: its identities, and nobody else's
    let route = "HOST GET /keyless/host/v1/identities";
    let v = srv
        .expect(
            srv.call(route, "/keyless/host/v1/identities")
                .peer(Some(&fp)),
            200,
        )
        .await;
    assert_eq!(v["tenantId"], srv.tenant.as_str());
    assert!(
        s(&v["vm"]["resourceId"]).eq_ignore_ascii_case(&vm_path),
        "{v}"
    );
    assert_eq!(v["vm"]["name"], "vm1");
    assert_eq!(v["vm"]["vmId"], vm["properties"]["vmId"]);
    assert_eq!(
        v["identities"]["system"]["principal_id"],
        vm["identity"]["principalId"]
    );
    assert_eq!(
        v["identities"]["user"][0]["client_id"],
        ident["properties"]["clientId"]
    );
    let r = srv
        .send(srv.call(route, "/keyless/host/v1/identities").peer(None))
        .await;
    host_error(&r, 401, "host_credential_required");
    let r = srv
        .send(
            srv.call(route, "/keyless/host/v1/identities")
                .peer(Some(&unknown)),
        )
        .await;
    host_error(&r, 401, "invalid_host_credential");

    // tokens for the VM's identities
    let route = "HOST POST /keyless/host/v1/token";
    let user = json!({"resource": "https://vault.azure.net",
        "selector": {"kind": "client_id", "value": ident["properties"]["clientId"]}});
    let v = srv
        .expect(
            srv.call(route, "/keyless/host/v1/token")
                .peer(Some(&fp))
                .json(&user),
            200,
        )
        .await;
    assert_eq!(v["client_id"], ident["properties"]["clientId"]);
    assert_eq!(v["object_id"], ident["properties"]["principalId"]);
    assert!(s(&v["msi_res_id"]).eq_ignore_ascii_case(&id_path), "{v}");
    assert_eq!(v["resource"], "https://vault.azure.net");
    let c = claims(&s(&v["access_token"]));
    assert_eq!(c["aud"], "https://vault.azure.net");
    assert_eq!(c["oid"], ident["properties"]["principalId"]);
    let system = json!({"resource": "https://management.azure.com/", "selector": {"kind": "system_assigned"}});
    let v = srv
        .expect(
            srv.call(route, "/keyless/host/v1/token")
                .peer(Some(&fp))
                .json(&system),
            200,
        )
        .await;
    assert_eq!(v["object_id"], vm["identity"]["principalId"]);
    let r = srv
        .send(
            srv.call(route, "/keyless/host/v1/token")
                .peer(None)
                .json(&user),
        )
        .await;
    host_error(&r, 401, "host_credential_required");
    let r = srv
        .send(
            srv.call(route, "/keyless/host/v1/token")
                .peer(Some(&unknown))
                .json(&user),
        )
        .await;
    host_error(&r, 401, "invalid_host_credential");

    // rotate: a new certificate for the same VM; the new one is a host credential too
    let route = "HOST POST /keyless/host/v1/rotate";
    let (csr2, _key2) = keyless_pki::generate_csr("keyless-node").unwrap();
    let body = json!({"csr": csr2});
    let r = srv
        .send(
            srv.call(route, "/keyless/host/v1/rotate")
                .peer(None)
                .json(&body),
        )
        .await;
    host_error(&r, 401, "host_credential_required");
    let r = srv
        .send(
            srv.call(route, "/keyless/host/v1/rotate")
                .peer(Some(&unknown))
                .json(&body),
        )
        .await;
    host_error(&r, 401, "invalid_host_credential");
    let v = srv
        .expect(
            srv.call(route, "/keyless/host/v1/rotate")
                .peer(Some(&fp))
                .json(&body),
            200,
        )
        .await;
    assert!(s(&v["vmResourceId"]).eq_ignore_ascii_case(&vm_path), "{v}");
    let cert2 = keyless_pki::pem_blocks(&s(&v["certificate"]), "CERTIFICATE");
    let fp2 = keyless_pki::sha256_hex(&cert2[0]);
    assert_ne!(fp2, fp);
    let v = srv
        .expect(
            srv.call(
                "HOST GET /keyless/host/v1/identities",
                "/keyless/host/v1/identities",
            )
            .peer(Some(&fp2)),
            200,
        )
        .await;
    assert_eq!(v["vm"]["name"], "vm1");

    // the host cache answers a token request, and forgets the host when what it read changes:
    // an identity taken off the VM is refused at once, a deleted VM's credential too
    let route = "HOST POST /keyless/host/v1/token";
    let token = |selector: &Value| {
        srv.call(route, "/keyless/host/v1/token")
            .peer(Some(&fp2))
            .json(selector)
    };
    srv.expect(token(&user), 200).await;
    srv.expect(token(&user), 200).await;
    srv.expect(
        srv.call(
            rg!("PUT", "Microsoft.Compute/virtualMachines/{vm}"),
            format!("{vm_path}?{COMPUTE}"),
        )
        .bearer(&adm.token)
        .json(&json!({"location": "local", "identity": {"type": "SystemAssigned"}})),
        200,
    )
    .await;
    let r = srv.send(token(&user)).await;
    host_error(&r, 400, "invalid_request");
    srv.expect(token(&system), 200).await;
    srv.expect(
        srv.call(
            rg!("DELETE", "Microsoft.Compute/virtualMachines/{vm}"),
            format!("{vm_path}?{COMPUTE}"),
        )
        .bearer(&adm.token),
        200,
    )
    .await;
    let r = srv.send(token(&system)).await;
    host_error(&r, 401, "invalid_host_credential");

    srv.finish(HOST, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ ARM: subscription, groups

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_subscription_and_resource_group_routes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    let sub = srv.sub.clone();

    let route = "ARM GET /subscriptions";
    let path = format!("/subscriptions?{RES}");
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["value"][0]["subscriptionId"], sub.as_str());
    assert_eq!(v["value"][0]["tenantId"], srv.tenant.as_str());
    assert_eq!(v["value"][0]["state"], "Enabled");
    arm_filtered(&srv, &stranger, route, &path).await;

    let route = "ARM GET /subscriptions/{sub}";
    let path = format!("/subscriptions/{sub}?{RES}");
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["id"], format!("/subscriptions/{sub}"));
    assert_eq!(v["subscriptionId"], sub.as_str());
    assert_eq!(v["authorizationSource"], "RoleBased");
    arm_refused(&srv, &stranger, route, &path, None).await;

    let rg = group(&srv, "rg1");
    let path = format!("{rg}?{RES}");
    let route = "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}";
    let body = json!({"location": "local", "tags": {"env": "test"}});
    arm_refused(&srv, &stranger, route, &path, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, path.clone()).bearer(&adm.token).json(&body),
            201,
        )
        .await;
    assert_eq!(v["id"], rg.as_str());
    assert_eq!(v["name"], "rg1");
    assert_eq!(v["type"], "Microsoft.Resources/resourceGroups");
    assert_eq!(v["location"], "local");
    assert_eq!(v["properties"]["provisioningState"], "Succeeded");
    srv.expect(
        srv.call(route, path.clone()).bearer(&adm.token).json(&body),
        200,
    )
    .await;

    let route = "ARM PATCH /subscriptions/{sub}/resourceGroups/{rg}";
    let patch = json!({"tags": {"env": "prod"}});
    let v = srv
        .expect(
            srv.call(route, path.clone())
                .bearer(&adm.token)
                .json(&patch),
            200,
        )
        .await;
    assert_eq!(v["tags"], json!({"env": "prod"}));
    arm_refused(&srv, &stranger, route, &path, Some(&patch)).await;

    let route = "ARM GET /subscriptions/{sub}/resourceGroups/{rg}";
    let r = srv
        .send(srv.call(route, path.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["tags"], json!({"env": "prod"}));
    assert!(
        r.header("etag").is_some_and(|e| e.starts_with('"')),
        "{:?}",
        r.headers
    );
    arm_refused(&srv, &stranger, route, &path, None).await;

    let route = "ARM HEAD /subscriptions/{sub}/resourceGroups/{rg}";
    let r = srv
        .send(srv.call(route, path.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let r = srv
        .send(
            srv.call(route, format!("{}?{RES}", group(&srv, "nope")))
                .bearer(&adm.token),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = srv.send(srv.call(route, path.clone())).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some());
    let r = srv
        .send(srv.call(route, path.clone()).bearer(&stranger.token))
        .await;
    assert_eq!(r.status, 403);

    let route = "ARM GET /subscriptions/{sub}/resourceGroups";
    let list = format!("/subscriptions/{sub}/resourcegroups?{RES}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &rg), "{v}");
    arm_filtered(&srv, &stranger, route, &list).await;

    let route = "ARM DELETE /subscriptions/{sub}/resourceGroups/{rg}";
    arm_refused(&srv, &stranger, route, &path, None).await;
    srv.expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    let r = srv
        .send(
            srv.call(
                "ARM GET /subscriptions/{sub}/resourceGroups/{rg}",
                path.clone(),
            )
            .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "ResourceGroupNotFound");

    srv.finish(ARM_GROUPS, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ ARM: the generic list, paging

/// `path` with `$filter=f` added.
fn filtered(path: &str, f: &str) -> String {
    format!(
        "{path}&{}",
        serde_urlencoded::to_string([("$filter", f)]).unwrap()
    )
}

/// The ids of a list, lowercased and sorted.
fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v["value"]
        .as_array()
        .unwrap_or(&vec![])
        .iter()
        .map(|i| s(&i["id"]).to_ascii_lowercase())
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_generic_resource_routes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    let reader = nobody(&srv, "reader", ARM_SCOPE).await;
    let sub = srv.sub.clone();
    put_group(&srv, &adm, "gen-a").await;
    put_group(&srv, &adm, "gen-b").await;
    let put = |route: &'static str, path: String, body: Value| {
        let c = srv.call(route, path).bearer(&adm.token).json(&body);
        srv.expect(c, 201)
    };
    let identity = |rg: &str, name: &str| {
        format!(
            "{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}",
            group(&srv, rg)
        )
    };
    let (id_a, id_b) = (identity("gen-a", "id-a"), identity("gen-b", "id-b"));
    let uami = rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    );
    put(
        uami,
        format!("{id_a}?{MSI}"),
        json!({"location": "westeurope", "tags": {"Env": "prod"}}),
    )
    .await;
    put(uami, format!("{id_b}?{MSI}"), json!({"location": "local"})).await;
    // a child resource: not in the generic list
    put(
        rg!(
            "PUT",
            "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
        ),
        format!("{id_a}/federatedIdentityCredentials/fic1?{MSI}"),
        json!({"properties": {"issuer": "https://issuer.example", "subject": "s",
                              "audiences": ["api://AzureADTokenExchange"]}}),
    )
    .await;
    let vault = format!(
        "{}/providers/Microsoft.KeyVault/vaults/gen-kv",
        group(&srv, "gen-b")
    );
    put(
        rg!("PUT", "Microsoft.KeyVault/vaults/{vault}"),
        format!("{vault}?{KV_ARM}"),
        json!({"location": "local", "properties": {"tenantId": srv.tenant,
               "sku": {"family": "A", "name": "standard"}, "accessPolicies": []}}),
    )
    .await;

    // the subscription's: every type, in the generic shape (no properties)
    let route = "ARM GET /subscriptions/{sub}/resources";
    let all = format!("/subscriptions/{sub}/resources?{RES}");
    let v = srv
        .expect(srv.call(route, all.clone()).bearer(&adm.token), 200)
        .await;
    for id in [&id_a, &id_b, &vault] {
        assert!(lists(&v, id), "{id}: {v}");
    }
    assert!(
        !v["value"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| s(&i["type"]).contains("federatedIdentityCredentials")),
        "{v}"
    );
    let a = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| s(&i["id"]).eq_ignore_ascii_case(&id_a))
        .unwrap();
    assert_eq!(a["name"], "id-a");
    assert_eq!(
        a["type"],
        "Microsoft.ManagedIdentity/userAssignedIdentities"
    );
    assert_eq!(a["location"], "westeurope");
    assert_eq!(a["tags"], json!({"Env": "prod"}));
    assert!(a.get("properties").is_none(), "{a}");
    assert!(v.get("nextLink").is_none(), "{v}");

    // $filter: a type, a tag (its value: the tags are left out, as ARM does), name / group
    let v = srv
        .expect(
            srv.call(
                route,
                filtered(&all, "resourceType eq 'Microsoft.KeyVault/vaults'"),
            )
            .bearer(&adm.token),
            200,
        )
        .await;
    assert_eq!(ids(&v), vec![vault.to_ascii_lowercase()], "{v}");
    let v = srv
        .expect(
            srv.call(
                route,
                filtered(&all, "tagName eq 'env' and tagValue eq 'prod'"),
            )
            .bearer(&adm.token),
            200,
        )
        .await;
    assert_eq!(ids(&v), vec![id_a.to_ascii_lowercase()], "{v}");
    assert!(v["value"][0].get("tags").is_none(), "{v}");
    let v = srv
        .expect(
            srv.call(
                route,
                filtered(&all, "resourceGroup eq 'GEN-B' and name eq 'id-b'"),
            )
            .bearer(&adm.token),
            200,
        )
        .await;
    assert_eq!(ids(&v), vec![id_b.to_ascii_lowercase()], "{v}");
    // the Key Vault SDK's Vaults_List sends its own api-version to this path
    let kv_list = filtered(
        &format!("/subscriptions/{sub}/resources?api-version=2015-11-01"),
        "resourceType eq 'Microsoft.KeyVault/vaults'",
    );
    let v = srv
        .expect(srv.call(route, kv_list).bearer(&adm.token), 200)
        .await;
    assert_eq!(ids(&v), vec![vault.to_ascii_lowercase()], "{v}");
    for bad in [
        "resourceType eq 'Microsoft.KeyVault/vaults' or name eq 'x'",
        "tagName eq 'env' and resourceType eq 'Microsoft.KeyVault/vaults'",
        "tagValue eq 'prod'",
        "identity eq 'x'",
    ] {
        let r = srv
            .send(srv.call(route, filtered(&all, bad)).bearer(&adm.token))
            .await;
        arm_error(&r, 400, "InvalidFilterInQueryString");
        assert_eq!(
            s(&r.body["error"]["message"]),
            format!("Invalid $filter '{bad}' specified in the query string.")
        );
    }
    let r = srv
        .send(
            srv.call(
                route,
                format!("/subscriptions/{sub}/resources?api-version=2001-01-01"),
            )
            .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 400, "InvalidApiVersionParameter");
    // only what the caller may read: nothing for a stranger, one identity for its reader
    arm_filtered(&srv, &stranger, route, &all).await;
    let reader_role =
        format!("/subscriptions/{sub}/providers/Microsoft.Authorization/roleDefinitions/acdd72a7-3385-48ef-bd42-f606fba81ae7");
    let ra = format!(
        "{id_b}/providers/Microsoft.Authorization/roleAssignments/{}",
        uuid::Uuid::new_v4()
    );
    put(
        "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
        format!("{ra}?{AUTHZ}"),
        json!({"properties": {"roleDefinitionId": reader_role, "principalId": reader.oid}}),
    )
    .await;
    let v = srv
        .expect(srv.call(route, all.clone()).bearer(&reader.token), 200)
        .await;
    assert_eq!(ids(&v), vec![id_b.to_ascii_lowercase()], "{v}");

    // a group's: its resources only; a group the caller may not read, or none, is refused
    let route = "ARM GET /subscriptions/{sub}/resourceGroups/{rg}/resources";
    let in_b = format!("{}/resources?{RES}", group(&srv, "gen-b"));
    let v = srv
        .expect(srv.call(route, in_b.clone()).bearer(&adm.token), 200)
        .await;
    let mut want = vec![id_b.to_ascii_lowercase(), vault.to_ascii_lowercase()];
    want.sort();
    assert_eq!(ids(&v), want, "{v}");
    let v = srv
        .expect(
            srv.call(
                route,
                filtered(
                    &in_b,
                    "resourceType eq 'Microsoft.ManagedIdentity/userAssignedIdentities'",
                ),
            )
            .bearer(&adm.token),
            200,
        )
        .await;
    assert_eq!(ids(&v), vec![id_b.to_ascii_lowercase()], "{v}");
    arm_refused(&srv, &stranger, route, &in_b, None).await;
    let r = srv
        .send(
            srv.call(
                route,
                format!("{}/resources?{RES}", group(&srv, "gen-none")),
            )
            .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "ResourceGroupNotFound");

    srv.finish(ARM_GENERIC, PUBLIC, NEVER_ACCEPTED);
}

/// A list longer than its page answers the page and a `nextLink` to where the client called
/// (its `Host`), with the request's query and a `$skiptoken`; following the links lists every
/// item once; `$top` makes the pages smaller; a token that is none is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_lists_page_with_next_links() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    put_group(&srv, &adm, "many").await;
    let n = 105;
    let mut want = vec![];
    for i in 0..n {
        let id = format!(
            "{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-{i:03}",
            group(&srv, "many")
        );
        let c = srv
            .call(
                rg!(
                    "PUT",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
                ),
                format!("{id}?{MSI}"),
            )
            .bearer(&adm.token)
            .json(&json!({"location": "local"}));
        srv.expect(c, 201).await;
        want.push(id.to_ascii_lowercase());
    }
    want.sort();
    let route = rg!("GET", "Microsoft.ManagedIdentity/userAssignedIdentities");
    let first = format!(
        "{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities?{MSI}",
        group(&srv, "many")
    );
    // all pages, following nextLink as the SDKs do; the links name the host called
    let pages = |host: &'static str, start: String| {
        let srv = &srv;
        let token = adm.token.clone();
        async move {
            let mut got = vec![];
            let mut sizes = vec![];
            let mut next = Some(start);
            while let Some(path) = next.take() {
                let v = srv
                    .expect(srv.call(route, path).bearer(&token).host(host), 200)
                    .await;
                sizes.push(v["value"].as_array().unwrap().len());
                got.extend(ids(&v));
                if let Some(link) = v["nextLink"].as_str() {
                    let origin = format!("https://{host}");
                    assert!(link.starts_with(&origin), "{link}");
                    next = Some(link[origin.len()..].to_string());
                }
                assert!(sizes.len() <= n, "the links never end");
            }
            got.sort();
            (got, sizes)
        }
    };
    let (got, sizes) = pages("localhost", first.clone()).await;
    assert_eq!(sizes, vec![100, 5]);
    assert_eq!(got, want);
    let (got, sizes) = pages("127.0.0.2:8443", format!("{first}&$top=40")).await;
    assert_eq!(sizes, vec![40, 40, 25]);
    assert_eq!(got, want);
    for bad in ["$skiptoken=%%%", "$top=0", "$top=x"] {
        let r = srv
            .send(srv.call(route, format!("{first}&{bad}")).bearer(&adm.token))
            .await;
        arm_error(&r, 400, "InvalidParameter");
    }
}

// ------------------------------------------------------------------ ARM: identities, FICs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_identity_and_federated_credential_routes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    put_group(&srv, &adm, "rg1").await;
    let rgp = group(&srv, "rg1");
    let id = format!("{rgp}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1");
    let path = format!("{id}?{MSI}");

    let route = rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    );
    let body = json!({"location": "local"});
    arm_refused(&srv, &stranger, route, &path, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, path.clone()).bearer(&adm.token).json(&body),
            201,
        )
        .await;
    assert_eq!(
        v["type"],
        "Microsoft.ManagedIdentity/userAssignedIdentities"
    );
    assert_eq!(v["name"], "id1");
    assert_eq!(v["properties"]["tenantId"], srv.tenant.as_str());
    let client_id = s(&v["properties"]["clientId"]);
    assert!(uuid::Uuid::parse_str(&client_id).is_ok(), "{v}");
    assert!(
        uuid::Uuid::parse_str(&s(&v["properties"]["principalId"])).is_ok(),
        "{v}"
    );

    let route = rg!(
        "PATCH",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    );
    let patch = json!({"tags": {"team": "db"}});
    let v = srv
        .expect(
            srv.call(route, path.clone())
                .bearer(&adm.token)
                .json(&patch),
            200,
        )
        .await;
    assert_eq!(v["tags"], json!({"team": "db"}));
    arm_refused(&srv, &stranger, route, &path, Some(&patch)).await;

    let route = rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    );
    let r = srv
        .send(srv.call(route, path.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["properties"]["clientId"], client_id.as_str());
    assert!(r.header("etag").is_some(), "{:?}", r.headers);
    arm_refused(&srv, &stranger, route, &path, None).await;

    let route = rg!("GET", "Microsoft.ManagedIdentity/userAssignedIdentities");
    let list = format!("{rgp}/providers/Microsoft.ManagedIdentity/userAssignedIdentities?{MSI}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &id), "{v}");
    arm_refused(&srv, &stranger, route, &list, None).await;
    let route = sub!("GET", "Microsoft.ManagedIdentity/userAssignedIdentities");
    let list = format!(
        "/subscriptions/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities?{MSI}",
        srv.sub
    );
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &id), "{v}");
    arm_filtered(&srv, &stranger, route, &list).await;

    // federated identity credentials
    let fic = format!("{id}/federatedIdentityCredentials/github-main");
    let fic_path = format!("{fic}?{MSI}");
    let route = rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
    );
    let body = json!({"properties": {
        "issuer": "https://token.actions.githubusercontent.com",
        "subject": "repo:octo/app:ref:refs/heads/main",
        "audiences": ["api://AzureADTokenExchange"]}});
    arm_refused(&srv, &stranger, route, &fic_path, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, fic_path.clone())
                .bearer(&adm.token)
                .json(&body),
            201,
        )
        .await;
    assert_eq!(v["name"], "github-main");
    assert_eq!(
        v["type"],
        "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials"
    );
    assert_eq!(
        v["properties"]["issuer"],
        "https://token.actions.githubusercontent.com"
    );
    assert_eq!(
        v["properties"]["audiences"],
        json!(["api://AzureADTokenExchange"])
    );

    let route = rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
    );
    let v = srv
        .expect(srv.call(route, fic_path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(
        v["properties"]["subject"],
        "repo:octo/app:ref:refs/heads/main"
    );
    arm_refused(&srv, &stranger, route, &fic_path, None).await;

    let route = rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials"
    );
    let list = format!("{id}/federatedIdentityCredentials?{MSI}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["value"][0]["name"], "github-main");
    arm_refused(&srv, &stranger, route, &list, None).await;

    let route = rg!(
        "DELETE",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials/{fic}"
    );
    arm_refused(&srv, &stranger, route, &fic_path, None).await;
    srv.expect(srv.call(route, fic_path.clone()).bearer(&adm.token), 200)
        .await;
    srv.expect(srv.call(route, fic_path.clone()).bearer(&adm.token), 204)
        .await;

    // federated credential patterns (Keyless's, beyond the 20-credential cap): their own action
    let pat = format!("{id}/federatedIdentityCredentialPatterns/team-a");
    let pat_path = format!("{pat}?{MSI}");
    let route = rg!(
        "PUT",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{pattern}"
    );
    let body = json!({"properties": {
        "issuer": "https://issuer.example/",
        "subjectPattern": "system:serviceaccount:team-a:*",
        "audiences": ["api://AzureADTokenExchange"]}});
    arm_refused(&srv, &stranger, route, &pat_path, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, pat_path.clone())
                .bearer(&adm.token)
                .json(&body),
            201,
        )
        .await;
    assert_eq!(v["name"], "team-a");
    assert_eq!(
        v["type"],
        "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentialPatterns"
    );
    assert_eq!(
        v["properties"]["subjectPattern"],
        "system:serviceaccount:team-a:*"
    );
    let route = rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{pattern}"
    );
    let v = srv
        .expect(srv.call(route, pat_path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["properties"]["issuer"], "https://issuer.example/");
    arm_refused(&srv, &stranger, route, &pat_path, None).await;
    let route = rg!(
        "GET",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns"
    );
    let list = format!("{id}/federatedIdentityCredentialPatterns?{MSI}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");
    arm_refused(&srv, &stranger, route, &list, None).await;
    let route = rg!(
        "DELETE",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentialPatterns/{pattern}"
    );
    arm_refused(&srv, &stranger, route, &pat_path, None).await;
    srv.expect(srv.call(route, pat_path.clone()).bearer(&adm.token), 200)
        .await;

    let route = rg!(
        "DELETE",
        "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
    );
    arm_refused(&srv, &stranger, route, &path, None).await;
    srv.expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    let r = srv
        .send(
            srv.call(
                rg!(
                    "GET",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
                ),
                path.clone(),
            )
            .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "ResourceNotFound");

    srv.finish(ARM_IDENTITIES, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ ARM: compute

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_compute_routes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    put_group(&srv, &adm, "rg1").await;
    let rgp = group(&srv, "rg1");

    // a virtual machine
    let vm = format!("{rgp}/providers/Microsoft.Compute/virtualMachines/vm1");
    let path = format!("{vm}?{COMPUTE}");
    let route = rg!("PUT", "Microsoft.Compute/virtualMachines/{vm}");
    let body = json!({"location": "local", "identity": {"type": "SystemAssigned"}});
    arm_refused(&srv, &stranger, route, &path, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, path.clone()).bearer(&adm.token).json(&body),
            201,
        )
        .await;
    assert_eq!(v["type"], "Microsoft.Compute/virtualMachines");
    assert_eq!(v["identity"]["type"], "SystemAssigned");
    assert!(
        uuid::Uuid::parse_str(&s(&v["identity"]["principalId"])).is_ok(),
        "{v}"
    );
    assert!(
        uuid::Uuid::parse_str(&s(&v["properties"]["vmId"])).is_ok(),
        "{v}"
    );

    let route = rg!("PATCH", "Microsoft.Compute/virtualMachines/{vm}");
    let patch = json!({"tags": {"role": "web"}});
    let v = srv
        .expect(
            srv.call(route, path.clone())
                .bearer(&adm.token)
                .json(&patch),
            200,
        )
        .await;
    assert_eq!(v["tags"], json!({"role": "web"}));
    assert_eq!(v["identity"]["type"], "SystemAssigned");
    arm_refused(&srv, &stranger, route, &path, Some(&patch)).await;

    let route = rg!("GET", "Microsoft.Compute/virtualMachines/{vm}");
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    assert!(s(&v["id"]).eq_ignore_ascii_case(&vm), "{v}");
    assert_eq!(v["name"], "vm1");
    arm_refused(&srv, &stranger, route, &path, None).await;

    let route = rg!("GET", "Microsoft.Compute/virtualMachines");
    let list = format!("{rgp}/providers/Microsoft.Compute/virtualMachines?{COMPUTE}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &vm), "{v}");
    arm_refused(&srv, &stranger, route, &list, None).await;
    let route = sub!("GET", "Microsoft.Compute/virtualMachines");
    let list = format!(
        "/subscriptions/{}/providers/Microsoft.Compute/virtualMachines?{COMPUTE}",
        srv.sub
    );
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &vm), "{v}");
    arm_filtered(&srv, &stranger, route, &list).await;

    // its extensions
    let ext = format!("{vm}/extensions/ext1");
    let ext_path = format!("{ext}?{COMPUTE}");
    let route = rg!(
        "PUT",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    );
    let body = json!({"properties": {"publisher": "P", "type": "T", "settings": {"a": 1},
        "protectedSettings": {"password": "hunter2"}}});
    arm_refused(&srv, &stranger, route, &ext_path, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, ext_path.clone())
                .bearer(&adm.token)
                .json(&body),
            201,
        )
        .await;
    assert_eq!(v["type"], "Microsoft.Compute/virtualMachines/extensions");
    assert_eq!(v["name"], "ext1");
    assert_eq!(v["properties"]["provisioningState"], "Succeeded");
    assert!(v["properties"].get("protectedSettings").is_none(), "{v}");
    assert!(!v.to_string().contains("hunter2"), "{v}");

    let route = rg!(
        "PATCH",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    );
    let patch = json!({"properties": {"publisher": "P", "type": "T", "settings": {"a": 2}}});
    let v = srv
        .expect(
            srv.call(route, ext_path.clone())
                .bearer(&adm.token)
                .json(&patch),
            200,
        )
        .await;
    assert_eq!(v["properties"]["settings"], json!({"a": 2}));
    arm_refused(&srv, &stranger, route, &ext_path, Some(&patch)).await;

    let route = rg!(
        "GET",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    );
    let v = srv
        .expect(srv.call(route, ext_path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["properties"]["settings"], json!({"a": 2}));
    arm_refused(&srv, &stranger, route, &ext_path, None).await;

    let route = rg!("GET", "Microsoft.Compute/virtualMachines/{vm}/extensions");
    let list = format!("{vm}/extensions?{COMPUTE}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["value"][0]["name"], "ext1");
    arm_refused(&srv, &stranger, route, &list, None).await;

    let route = rg!(
        "DELETE",
        "Microsoft.Compute/virtualMachines/{vm}/extensions/{ext}"
    );
    arm_refused(&srv, &stranger, route, &ext_path, None).await;
    srv.expect(srv.call(route, ext_path.clone()).bearer(&adm.token), 200)
        .await;
    srv.expect(srv.call(route, ext_path.clone()).bearer(&adm.token), 204)
        .await;

    // a join token for the VM
    let route = rg!(
        "POST",
        "Microsoft.Compute/virtualMachines/{vm}/generateJoinToken"
    );
    let jt = format!("{vm}/generateJoinToken?{COMPUTE}");
    let body = json!({"expiresInSeconds": 600});
    let v = srv
        .expect(
            srv.call(route, jt.clone()).bearer(&adm.token).json(&body),
            200,
        )
        .await;
    assert!(!s(&v["joinToken"]).is_empty(), "{v}");
    assert!(s(&v["vmResourceId"]).eq_ignore_ascii_case(&vm), "{v}");
    assert!(
        v["expiresOn"].as_u64().is_some_and(|e| e > srv.s.now()),
        "{v}"
    );
    arm_refused(&srv, &stranger, route, &jt, Some(&body)).await;

    // a scale set, and an instance made by a host joining it
    let ss = format!("{rgp}/providers/Microsoft.Compute/virtualMachineScaleSets/ss1");
    let ss_path = format!("{ss}?{COMPUTE}");
    let route = rg!("PUT", "Microsoft.Compute/virtualMachineScaleSets/{ss}");
    let body = json!({"location": "local", "identity": {"type": "SystemAssigned"}});
    arm_refused(&srv, &stranger, route, &ss_path, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, ss_path.clone())
                .bearer(&adm.token)
                .json(&body),
            201,
        )
        .await;
    assert_eq!(v["type"], "Microsoft.Compute/virtualMachineScaleSets");
    assert!(
        uuid::Uuid::parse_str(&s(&v["properties"]["uniqueId"])).is_ok(),
        "{v}"
    );

    let route = rg!("PATCH", "Microsoft.Compute/virtualMachineScaleSets/{ss}");
    let patch = json!({"tags": {"tier": "batch"}});
    let v = srv
        .expect(
            srv.call(route, ss_path.clone())
                .bearer(&adm.token)
                .json(&patch),
            200,
        )
        .await;
    assert_eq!(v["tags"], json!({"tier": "batch"}));
    arm_refused(&srv, &stranger, route, &ss_path, Some(&patch)).await;

    let route = rg!("GET", "Microsoft.Compute/virtualMachineScaleSets/{ss}");
    let v = srv
        .expect(srv.call(route, ss_path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["name"], "ss1");
    arm_refused(&srv, &stranger, route, &ss_path, None).await;

    let route = rg!("GET", "Microsoft.Compute/virtualMachineScaleSets");
    let list = format!("{rgp}/providers/Microsoft.Compute/virtualMachineScaleSets?{COMPUTE}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &ss), "{v}");
    assert!(!lists(&v, &vm), "a VM is not a scale set: {v}");
    arm_refused(&srv, &stranger, route, &list, None).await;
    let route = sub!("GET", "Microsoft.Compute/virtualMachineScaleSets");
    let list = format!(
        "/subscriptions/{}/providers/Microsoft.Compute/virtualMachineScaleSets?{COMPUTE}",
        srv.sub
    );
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &ss), "{v}");
    arm_filtered(&srv, &stranger, route, &list).await;

    let route = rg!(
        "POST",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/generateJoinToken"
    );
    let jt = format!("{ss}/generateJoinToken?{COMPUTE}");
    let v = srv
        .expect(srv.call(route, jt.clone()).bearer(&adm.token), 200)
        .await;
    assert!(s(&v["vmResourceId"]).eq_ignore_ascii_case(&ss), "{v}");
    arm_refused(&srv, &stranger, route, &jt, None).await;
    let (csr, _key) = keyless_pki::generate_csr("keyless-node").unwrap();
    let joined = srv
        .expect(
            srv.call("HOST POST /keyless/host/v1/join", "/keyless/host/v1/join")
                .json(&json!({"joinToken": v["joinToken"], "csr": csr})),
            200,
        )
        .await;
    let instance_id = s(&joined["vmResourceId"]);
    let instance = instance_id.rsplit('/').next().unwrap().to_string();
    assert!(
        instance_id
            .to_ascii_lowercase()
            .starts_with(&format!("{}/virtualmachines/", ss.to_ascii_lowercase())),
        "{joined}"
    );

    let route = rg!(
        "GET",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/virtualMachines"
    );
    let list = format!("{ss}/virtualMachines?{COMPUTE}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["value"][0]["instanceId"], instance.as_str());
    assert_eq!(
        v["value"][0]["type"],
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines"
    );
    arm_refused(&srv, &stranger, route, &list, None).await;

    let inst_path = format!("{ss}/virtualMachines/{instance}?{COMPUTE}");
    let route = rg!(
        "GET",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/virtualMachines/{instance}"
    );
    let v = srv
        .expect(srv.call(route, inst_path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["name"], format!("ss1_{instance}"));
    assert!(s(&v["id"]).eq_ignore_ascii_case(&instance_id), "{v}");
    arm_refused(&srv, &stranger, route, &inst_path, None).await;

    let route = rg!(
        "DELETE",
        "Microsoft.Compute/virtualMachineScaleSets/{ss}/virtualMachines/{instance}"
    );
    arm_refused(&srv, &stranger, route, &inst_path, None).await;
    srv.expect(srv.call(route, inst_path.clone()).bearer(&adm.token), 200)
        .await;
    srv.expect(srv.call(route, inst_path.clone()).bearer(&adm.token), 204)
        .await;

    for (route, path) in [
        (
            rg!("DELETE", "Microsoft.Compute/virtualMachineScaleSets/{ss}"),
            ss_path,
        ),
        (
            rg!("DELETE", "Microsoft.Compute/virtualMachines/{vm}"),
            path,
        ),
    ] {
        arm_refused(&srv, &stranger, route, &path, None).await;
        srv.expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
            .await;
        srv.expect(srv.call(route, path.clone()).bearer(&adm.token), 204)
            .await;
    }

    srv.finish(ARM_COMPUTE, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ ARM: vaults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_vault_routes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    put_group(&srv, &adm, "rg1").await;
    let rgp = group(&srv, "rg1");
    let vault = format!("{rgp}/providers/Microsoft.KeyVault/vaults/{VAULT}");
    let path = format!("{vault}?{KV_ARM}");

    let route = rg!("PUT", "Microsoft.KeyVault/vaults/{vault}");
    let body = json!({"location": "local", "properties": {
        "tenantId": srv.tenant, "sku": {"family": "A", "name": "standard"}, "accessPolicies": []}});
    arm_refused(&srv, &stranger, route, &path, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, path.clone()).bearer(&adm.token).json(&body),
            201,
        )
        .await;
    assert_eq!(v["type"], "Microsoft.KeyVault/vaults");
    assert_eq!(v["name"], VAULT);
    assert_eq!(v["properties"]["tenantId"], srv.tenant.as_str());
    let port = srv.base.rsplit(':').next().unwrap();
    assert_eq!(
        v["properties"]["vaultUri"],
        format!("https://{VAULT}.vault.localhost:{port}/")
    );

    let route = rg!("PATCH", "Microsoft.KeyVault/vaults/{vault}");
    let patch = json!({"tags": {"env": "prod"}});
    let v = srv
        .expect(
            srv.call(route, path.clone())
                .bearer(&adm.token)
                .json(&patch),
            200,
        )
        .await;
    assert_eq!(v["tags"], json!({"env": "prod"}));
    arm_refused(&srv, &stranger, route, &path, Some(&patch)).await;

    let route = rg!("GET", "Microsoft.KeyVault/vaults/{vault}");
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["properties"]["accessPolicies"], json!([]));
    assert_eq!(v["properties"]["sku"]["name"], "standard");
    arm_refused(&srv, &stranger, route, &path, None).await;

    let route = rg!("GET", "Microsoft.KeyVault/vaults");
    let list = format!("{rgp}/providers/Microsoft.KeyVault/vaults?{KV_ARM}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &vault), "{v}");
    arm_refused(&srv, &stranger, route, &list, None).await;
    let route = sub!("GET", "Microsoft.KeyVault/vaults");
    let list = format!(
        "/subscriptions/{}/providers/Microsoft.KeyVault/vaults?{KV_ARM}",
        srv.sub
    );
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &vault), "{v}");
    arm_filtered(&srv, &stranger, route, &list).await;

    let route = rg!(
        "PUT",
        "Microsoft.KeyVault/vaults/{vault}/accessPolicies/{operation}"
    );
    let ap = format!("{vault}/accessPolicies/add?{KV_ARM}");
    let body = json!({"properties": {"accessPolicies": [{"tenantId": srv.tenant, "objectId": stranger.oid,
        "permissions": {"secrets": ["get", "list"]}}]}});
    arm_refused(&srv, &stranger, route, &ap, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, ap.clone()).bearer(&adm.token).json(&body),
            200,
        )
        .await;
    assert_eq!(v["type"], "Microsoft.KeyVault/vaults/accessPolicies");
    assert!(s(&v["id"]).ends_with("/accessPolicies/add"), "{v}");
    assert_eq!(
        v["properties"]["accessPolicies"][0]["objectId"],
        stranger.oid.as_str()
    );
    assert_eq!(
        v["properties"]["accessPolicies"][0]["permissions"]["secrets"],
        json!(["get", "list"])
    );

    // secrets as ARM template deployments write them (`Microsoft.KeyVault/vaults/secrets`):
    // 201 then 200 (a new version), never the value in an answer
    let route = rg!("PUT", "Microsoft.KeyVault/vaults/{vault}/secrets/{name}");
    let secret = format!("{vault}/secrets/db");
    let sp = format!("{secret}?{KV_ARM}");
    let body = json!({"properties": {"value": "s3cret-arm", "contentType": "text/plain"}});
    arm_refused(&srv, &stranger, route, &sp, Some(&body)).await;
    let put_secret = || srv.call(route, sp.clone()).bearer(&adm.token).json(&body);
    let v = srv.expect(put_secret(), 201).await;
    assert_eq!(v["id"], secret.as_str());
    assert_eq!(v["name"], "db");
    assert_eq!(v["type"], "Microsoft.KeyVault/vaults/secrets");
    assert_eq!(
        v["properties"]["secretUri"],
        format!("https://{VAULT}.vault.localhost:{port}/secrets/db")
    );
    assert!(!v.to_string().contains("s3cret-arm"), "{v}");
    let first = s(&v["properties"]["secretUriWithVersion"]);
    let v = srv.expect(put_secret(), 200).await;
    assert_ne!(s(&v["properties"]["secretUriWithVersion"]), first);
    let route = rg!("PATCH", "Microsoft.KeyVault/vaults/{vault}/secrets/{name}");
    let patch = json!({"tags": {"env": "prod"}});
    let v = srv
        .expect(
            srv.call(route, sp.clone()).bearer(&adm.token).json(&patch),
            200,
        )
        .await;
    assert_eq!(v["tags"], json!({"env": "prod"}));
    arm_refused(&srv, &stranger, route, &sp, Some(&patch)).await;
    let route = rg!("GET", "Microsoft.KeyVault/vaults/{vault}/secrets/{name}");
    let v = srv
        .expect(srv.call(route, sp.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["properties"]["contentType"], "text/plain");
    assert!(!v.to_string().contains("s3cret-arm"), "{v}");
    arm_refused(&srv, &stranger, route, &sp, None).await;
    let route = rg!("GET", "Microsoft.KeyVault/vaults/{vault}/secrets");
    let list = format!("{vault}/secrets?{KV_ARM}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &secret), "{v}");
    assert!(!v.to_string().contains("s3cret-arm"), "{v}");
    arm_refused(&srv, &stranger, route, &list, None).await;

    let route = rg!("DELETE", "Microsoft.KeyVault/vaults/{vault}");
    arm_refused(&srv, &stranger, route, &path, None).await;
    srv.expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    srv.expect(srv.call(route, path.clone()).bearer(&adm.token), 204)
        .await;

    srv.finish(ARM_VAULTS, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ ARM: Batch

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_batch_routes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    put_group(&srv, &adm, "rg1").await;
    let rgp = group(&srv, "rg1");
    let acct = format!("{rgp}/providers/Microsoft.Batch/batchAccounts/acct1");
    let path = format!("{acct}?{BATCH}");

    let route = rg!("PUT", "Microsoft.Batch/batchAccounts/{account}");
    let body = json!({"location": "local"});
    arm_refused(&srv, &stranger, route, &path, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, path.clone()).bearer(&adm.token).json(&body),
            201,
        )
        .await;
    assert_eq!(v["type"], "Microsoft.Batch/batchAccounts");
    assert_eq!(v["name"], "acct1");
    assert_eq!(v["location"], "local");

    let route = rg!("PATCH", "Microsoft.Batch/batchAccounts/{account}");
    let patch = json!({"tags": {"env": "ci"}});
    let v = srv
        .expect(
            srv.call(route, path.clone())
                .bearer(&adm.token)
                .json(&patch),
            200,
        )
        .await;
    assert_eq!(v["tags"], json!({"env": "ci"}));
    arm_refused(&srv, &stranger, route, &path, Some(&patch)).await;

    let route = rg!("GET", "Microsoft.Batch/batchAccounts/{account}");
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    assert!(s(&v["id"]).eq_ignore_ascii_case(&acct), "{v}");
    arm_refused(&srv, &stranger, route, &path, None).await;

    let route = rg!("GET", "Microsoft.Batch/batchAccounts");
    let list = format!("{rgp}/providers/Microsoft.Batch/batchAccounts?{BATCH}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &acct), "{v}");
    arm_refused(&srv, &stranger, route, &list, None).await;
    let route = sub!("GET", "Microsoft.Batch/batchAccounts");
    let list = format!(
        "/subscriptions/{}/providers/Microsoft.Batch/batchAccounts?{BATCH}",
        srv.sub
    );
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &acct), "{v}");
    arm_filtered(&srv, &stranger, route, &list).await;

    // a pool
    let pool = format!("{acct}/pools/p1");
    let pool_path = format!("{pool}?{BATCH}");
    let route = rg!(
        "PUT",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    );
    let body = json!({"properties": {"vmSize": "STANDARD_D2S_V3",
        "scaleSettings": {"fixedScale": {"targetDedicatedNodes": 1}}}});
    arm_refused(&srv, &stranger, route, &pool_path, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, pool_path.clone())
                .bearer(&adm.token)
                .json(&body),
            200,
        )
        .await;
    assert_eq!(v["type"], "Microsoft.Batch/batchAccounts/pools");
    assert_eq!(v["name"], "p1");
    assert_eq!(v["properties"]["currentDedicatedNodes"], 0);

    let route = rg!(
        "PATCH",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    );
    let patch =
        json!({"properties": {"scaleSettings": {"fixedScale": {"targetDedicatedNodes": 2}}}});
    let v = srv
        .expect(
            srv.call(route, pool_path.clone())
                .bearer(&adm.token)
                .json(&patch),
            200,
        )
        .await;
    assert_eq!(
        v["properties"]["scaleSettings"]["fixedScale"]["targetDedicatedNodes"],
        2
    );
    arm_refused(&srv, &stranger, route, &pool_path, Some(&patch)).await;

    let route = rg!(
        "GET",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    );
    let v = srv
        .expect(srv.call(route, pool_path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["properties"]["vmSize"], "STANDARD_D2S_V3");
    arm_refused(&srv, &stranger, route, &pool_path, None).await;

    let route = rg!("GET", "Microsoft.Batch/batchAccounts/{account}/pools");
    let list = format!("{acct}/pools?{BATCH}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["value"][0]["name"], "p1");
    arm_refused(&srv, &stranger, route, &list, None).await;

    let route = rg!(
        "POST",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}/generateJoinToken"
    );
    let jt = format!("{pool}/generateJoinToken?{BATCH}");
    let v = srv
        .expect(srv.call(route, jt.clone()).bearer(&adm.token), 200)
        .await;
    assert!(!s(&v["joinToken"]).is_empty(), "{v}");
    assert!(
        s(&v["vmResourceId"])
            .to_ascii_lowercase()
            .ends_with("/pools/p1"),
        "{v}"
    );
    arm_refused(&srv, &stranger, route, &jt, None).await;

    let route = rg!(
        "DELETE",
        "Microsoft.Batch/batchAccounts/{account}/pools/{pool}"
    );
    arm_refused(&srv, &stranger, route, &pool_path, None).await;
    srv.expect(srv.call(route, pool_path.clone()).bearer(&adm.token), 200)
        .await;
    srv.expect(srv.call(route, pool_path.clone()).bearer(&adm.token), 204)
        .await;

    let route = rg!("DELETE", "Microsoft.Batch/batchAccounts/{account}");
    arm_refused(&srv, &stranger, route, &path, None).await;
    srv.expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    srv.expect(srv.call(route, path.clone()).bearer(&adm.token), 204)
        .await;

    srv.finish(ARM_BATCH, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ ARM: managed clusters

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_managed_cluster_routes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    put_group(&srv, &adm, "rg1").await;
    let rgp = group(&srv, "rg1");
    let cluster = format!("{rgp}/providers/Microsoft.ContainerService/managedClusters/c1");
    let path = format!("{cluster}?{AKS}");

    let route = rg!(
        "PUT",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    );
    let body = json!({"location": "local", "identity": {"type": "SystemAssigned"},
        "properties": {"dnsPrefix": "c1", "agentPoolProfiles": [{"name": "np1", "count": 1, "mode": "System"}]}});
    arm_refused(&srv, &stranger, route, &path, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, path.clone()).bearer(&adm.token).json(&body),
            201,
        )
        .await;
    assert_eq!(v["type"], "Microsoft.ContainerService/managedClusters");
    assert_eq!(v["properties"]["provisioningState"], "Succeeded");
    assert_eq!(v["properties"]["nodeResourceGroup"], "MC_rg1_c1_local");
    assert_eq!(v["properties"]["agentPoolProfiles"][0]["name"], "np1");
    let kubelet = v["properties"]["identityProfile"]["kubeletidentity"].clone();
    assert!(
        uuid::Uuid::parse_str(&s(&kubelet["clientId"])).is_ok(),
        "{v}"
    );

    let route = rg!(
        "PATCH",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    );
    let patch = json!({"tags": {"env": "dev"}});
    let v = srv
        .expect(
            srv.call(route, path.clone())
                .bearer(&adm.token)
                .json(&patch),
            200,
        )
        .await;
    assert_eq!(v["tags"], json!({"env": "dev"}));
    arm_refused(&srv, &stranger, route, &path, Some(&patch)).await;

    let route = rg!(
        "GET",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    );
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["name"], "c1");
    assert_eq!(
        v["properties"]["identityProfile"]["kubeletidentity"],
        kubelet
    );
    arm_refused(&srv, &stranger, route, &path, None).await;

    let route = rg!("GET", "Microsoft.ContainerService/managedClusters");
    let list = format!("{rgp}/providers/Microsoft.ContainerService/managedClusters?{AKS}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &cluster), "{v}");
    arm_refused(&srv, &stranger, route, &list, None).await;
    let route = sub!("GET", "Microsoft.ContainerService/managedClusters");
    let list = format!(
        "/subscriptions/{}/providers/Microsoft.ContainerService/managedClusters?{AKS}",
        srv.sub
    );
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &cluster), "{v}");
    arm_filtered(&srv, &stranger, route, &list).await;

    let route = rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/agentPools/{pool}/generateJoinToken"
    );
    let jt = format!("{cluster}/agentPools/np1/generateJoinToken?{AKS}");
    let v = srv
        .expect(srv.call(route, jt.clone()).bearer(&adm.token), 200)
        .await;
    assert!(!s(&v["joinToken"]).is_empty(), "{v}");
    assert!(
        s(&v["vmResourceId"])
            .to_ascii_lowercase()
            .contains("/resourcegroups/mc_rg1_c1_local/"),
        "{v}"
    );
    assert!(
        s(&v["vmResourceId"]).contains("/virtualMachineScaleSets/"),
        "{v}"
    );
    arm_refused(&srv, &stranger, route, &jt, None).await;

    // the pod-identity add-on's two actions
    let route = rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/readPodIdentityProfile"
    );
    let rp = format!("{cluster}/readPodIdentityProfile?{AKS}");
    let v = srv
        .expect(
            srv.call(route, rp.clone())
                .bearer(&adm.token)
                .json(&json!({})),
            200,
        )
        .await;
    assert_eq!(v["kubeletIdentity"]["clientId"], kubelet["clientId"]);
    assert!(v["podIdentityProfile"].is_object(), "{v}");
    arm_refused(&srv, &stranger, route, &rp, Some(&json!({}))).await;

    let route = rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/reportPodIdentityStatus"
    );
    let rs = format!("{cluster}/reportPodIdentityStatus?{AKS}");
    let report = json!({"userAssignedIdentities": []});
    let r = srv
        .send(srv.call(route, rs.clone()).bearer(&adm.token).json(&report))
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    arm_refused(&srv, &stranger, route, &rs, Some(&report)).await;

    // workload identity: the OIDC issuer (enabled by az's GET-modify-PUT), its two public
    // documents, and the add-on's and the webhook's actions
    let mut body = srv
        .expect(
            srv.call(
                rg!(
                    "GET",
                    "Microsoft.ContainerService/managedClusters/{cluster}"
                ),
                path.clone(),
            )
            .bearer(&adm.token),
            200,
        )
        .await;
    body["properties"]["oidcIssuerProfile"] = json!({"enabled": true});
    body["properties"]["securityProfile"] = json!({"workloadIdentity": {"enabled": true}});
    let v = srv
        .expect(
            srv.call(
                rg!(
                    "PUT",
                    "Microsoft.ContainerService/managedClusters/{cluster}"
                ),
                path.clone(),
            )
            .bearer(&adm.token)
            .json(&body),
            200,
        )
        .await;
    let issuer = s(&v["properties"]["oidcIssuerProfile"]["issuerURL"]);
    let issuer_path = issuer
        .strip_prefix(&srv.base)
        .expect("the issuer is served here")
        .to_string();

    let route = rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/publishServiceAccountKeys"
    );
    let pk = format!("{cluster}/publishServiceAccountKeys?{AKS}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (ca, _) = keyless_pki::Ca::generate("routes apiserver", now).unwrap();
    let (sa_key, _) = keyless_pki::SigningKey::generate(&ca, now, 3600).unwrap();
    let jwk = sa_key.jwk();
    let keys = json!({"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": jwk.kid,
                                "n": jwk.n, "e": jwk.e}]});
    let v = srv
        .expect(
            srv.call(route, pk.clone()).bearer(&adm.token).json(&keys),
            200,
        )
        .await;
    assert_eq!(v["issuerURL"], issuer.as_str());
    assert_eq!(v["keys"], 1);
    arm_refused(&srv, &stranger, route, &pk, Some(&keys)).await;

    let route = "OIDC GET /oidc/{id}/.well-known/openid-configuration";
    let v = srv
        .expect(
            srv.call(
                route,
                format!("{issuer_path}.well-known/openid-configuration"),
            ),
            200,
        )
        .await;
    assert_eq!(v["issuer"], issuer.as_str());
    assert_eq!(v["jwks_uri"], format!("{issuer}openid/v1/jwks"));
    let route = "OIDC GET /oidc/{id}/openid/v1/jwks";
    let v = srv
        .expect(srv.call(route, format!("{issuer_path}openid/v1/jwks")), 200)
        .await;
    assert_eq!(v["keys"][0]["kid"], jwk.kid.as_str());
    // an issuer no cluster has: 404 in ARM's shape
    let r = srv
        .send(srv.call(
            route,
            format!("/oidc/{}/openid/v1/jwks", uuid::Uuid::new_v4()),
        ))
        .await;
    arm_error(&r, 404, "InvalidResourceId");

    let route = rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/issueWebhookCertificate"
    );
    let wc = format!("{cluster}/issueWebhookCertificate?{AKS}");
    let sans =
        vec!["azure-wi-webhook-webhook-service.azure-workload-identity-system.svc".to_string()];
    let (csr, _) = keyless_pki::generate_server_csr(&sans).unwrap();
    let req = json!({"csr": csr});
    let v = srv
        .expect(
            srv.call(route, wc.clone()).bearer(&adm.token).json(&req),
            200,
        )
        .await;
    assert!(
        s(&v["certificate"]).starts_with("-----BEGIN CERTIFICATE-----"),
        "{v}"
    );
    assert!(
        s(&v["caBundle"]).starts_with("-----BEGIN CERTIFICATE-----"),
        "{v}"
    );
    arm_refused(&srv, &stranger, route, &wc, Some(&req)).await;

    let route = rg!(
        "POST",
        "Microsoft.ContainerService/managedClusters/{cluster}/checkWorkloadIdentity"
    );
    let cw = format!("{cluster}/checkWorkloadIdentity?{AKS}");
    let req = json!({"subjects": [{"clientId": uuid::Uuid::new_v4().to_string(),
                                   "subject": "system:serviceaccount:app:web"}]});
    let v = srv
        .expect(
            srv.call(route, cw.clone()).bearer(&adm.token).json(&req),
            200,
        )
        .await;
    assert_eq!(v["results"][0]["ready"], false, "{v}");
    assert_eq!(v["results"][0]["reason"], "identity_not_found", "{v}");
    arm_refused(&srv, &stranger, route, &cw, Some(&req)).await;

    let route = rg!(
        "DELETE",
        "Microsoft.ContainerService/managedClusters/{cluster}"
    );
    arm_refused(&srv, &stranger, route, &path, None).await;
    srv.expect(srv.call(route, path.clone()).bearer(&adm.token), 204)
        .await;
    let r = srv
        .send(
            srv.call(
                rg!(
                    "GET",
                    "Microsoft.ContainerService/managedClusters/{cluster}"
                ),
                path.clone(),
            )
            .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "ResourceNotFound");

    srv.finish(ARM_CLUSTERS, PUBLIC, NEVER_ACCEPTED);
    srv.finish(OIDC, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ ARM: authorization

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_authorization_routes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    let reader = nobody(&srv, "reader", ARM_SCOPE).await;
    put_group(&srv, &adm, "rg1").await;
    let rgp = group(&srv, "rg1");
    let sub_scope = format!("/subscriptions/{}", srv.sub);

    let route = "ARM GET {scope}/providers/Microsoft.Authorization/roleDefinitions";
    let list = format!("{sub_scope}/providers/Microsoft.Authorization/roleDefinitions?{AUTHZ}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    let names: Vec<String> = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| s(&r["properties"]["roleName"]))
        .collect();
    for want in ["Owner", "Contributor", "Reader"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    let filtered = format!(
        "{sub_scope}/providers/Microsoft.Authorization/roleDefinitions?{AUTHZ}&{}",
        serde_urlencoded::to_string([("$filter", "roleName eq 'Reader'")]).unwrap()
    );
    let v = srv
        .expect(srv.call(route, filtered).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");
    let reader_role = v["value"][0].clone();
    assert_eq!(
        reader_role["type"],
        "Microsoft.Authorization/roleDefinitions"
    );
    assert_eq!(reader_role["properties"]["type"], "BuiltInRole");
    let reader_def = s(&reader_role["id"]);
    // role definitions are no secret: any signed-in caller lists them, at any scope (the root
    // one too, the router's `/providers/…` route); only a caller without a token is refused
    let root = format!("/providers/Microsoft.Authorization/roleDefinitions?{AUTHZ}");
    for path in [&list, &root] {
        let v = srv
            .expect(srv.call(route, path.clone()).bearer(&stranger.token), 200)
            .await;
        assert!(v["value"].as_array().is_some_and(|a| a.len() >= 3), "{v}");
        arm_unauthenticated(&srv, &srv.send(srv.call(route, path.clone())).await);
    }

    let route = "ARM GET {scope}/providers/Microsoft.Authorization/roleDefinitions/{id}";
    let one = format!("{reader_def}?{AUTHZ}");
    let v = srv
        .expect(srv.call(route, one.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["properties"]["roleName"], "Reader");
    assert_eq!(v["id"], reader_def.as_str());
    srv.expect(srv.call(route, one.clone()).bearer(&stranger.token), 200)
        .await;
    arm_unauthenticated(&srv, &srv.send(srv.call(route, one.clone())).await);

    // assign Reader on the group to `reader`, which can then read it
    let name = uuid::Uuid::new_v4().to_string();
    let ra = format!("{rgp}/providers/Microsoft.Authorization/roleAssignments/{name}");
    let ra_path = format!("{ra}?{AUTHZ}");
    let route = "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}";
    let body = json!({"properties": {"roleDefinitionId": reader_def, "principalId": reader.oid}});
    arm_refused(&srv, &stranger, route, &ra_path, Some(&body)).await;
    let read_group = || {
        srv.call(
            "ARM GET /subscriptions/{sub}/resourceGroups/{rg}",
            format!("{rgp}?{RES}"),
        )
        .bearer(&reader.token)
    };
    arm_forbidden(&srv.send(read_group()).await, &reader.oid);
    let v = srv
        .expect(
            srv.call(route, ra_path.clone())
                .bearer(&adm.token)
                .json(&body),
            201,
        )
        .await;
    assert_eq!(v["id"], ra.as_str());
    assert_eq!(v["name"], name.as_str());
    assert_eq!(v["type"], "Microsoft.Authorization/roleAssignments");
    assert_eq!(v["properties"]["principalId"], reader.oid.as_str());
    assert_eq!(v["properties"]["scope"], rgp.as_str());
    assert_eq!(v["properties"]["roleDefinitionId"], reader_def.as_str());
    assert_eq!(v["properties"]["principalType"], "ServicePrincipal");
    srv.expect(read_group(), 200).await;

    let route = "ARM GET {scope}/providers/Microsoft.Authorization/roleAssignments";
    let list = format!("{rgp}/providers/Microsoft.Authorization/roleAssignments?{AUTHZ}");
    let v = srv
        .expect(srv.call(route, list.clone()).bearer(&adm.token), 200)
        .await;
    assert!(lists(&v, &ra), "{v}");
    // the admin's own assignment, at the subscription, is inherited here
    assert!(
        v["value"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["properties"]["principalId"] == adm.oid.as_str()),
        "{v}"
    );
    arm_refused(&srv, &stranger, route, &list, None).await;

    let route = "ARM GET {scope}/providers/Microsoft.Authorization/roleAssignments/{name}";
    let v = srv
        .expect(srv.call(route, ra_path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["properties"]["principalId"], reader.oid.as_str());
    arm_refused(&srv, &stranger, route, &ra_path, None).await;

    let route = "ARM DELETE {scope}/providers/Microsoft.Authorization/roleAssignments/{name}";
    arm_refused(&srv, &stranger, route, &ra_path, None).await;
    // a Reader may not delete its own assignment
    arm_forbidden(
        &srv.send(srv.call(route, ra_path.clone()).bearer(&reader.token))
            .await,
        &reader.oid,
    );
    let v = srv
        .expect(srv.call(route, ra_path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["name"], name.as_str());
    srv.expect(srv.call(route, ra_path.clone()).bearer(&adm.token), 204)
        .await;
    arm_forbidden(&srv.send(read_group()).await, &reader.oid);

    srv.finish(ARM_AUTHORIZATION, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ ARM: Activity Log

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_activity_log_route() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    put_group(&srv, &adm, "rg1").await;
    let rg = group(&srv, "rg1");
    let now_micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let since = keyless_core::activity_log::format_time(now_micros - 3_600_000_000);
    let route = sub!("GET", "Microsoft.Insights/eventtypes/management/values");
    let path = format!(
        "/subscriptions/{}/providers/Microsoft.Insights/eventtypes/management/values?{INSIGHTS}&{}",
        srv.sub,
        serde_urlencoded::to_string([("$filter", format!("eventTimestamp ge '{since}'"))]).unwrap()
    );
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    let mine: Vec<&Value> = v["value"]
        .as_array()
        .expect("value")
        .iter()
        .filter(|e| s(&e["resourceId"]).eq_ignore_ascii_case(&rg))
        .collect();
    assert!(!mine.is_empty(), "the group's write is logged: {v}");
    assert!(
        mine.iter().any(|e| e["status"]["value"] == "Succeeded"),
        "{v}"
    );
    arm_refused(&srv, &stranger, route, &path, None).await;

    srv.finish(ARM_ACTIVITY, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ ARM: template deployments

const DEPLOY: &str = "api-version=2024-11-01";
/// Managed Identity Operator: may write deployments (`Microsoft.Resources/deployments/*`),
/// not identities.
const IDENTITY_OPERATOR: &str = "f1a07417-d97a-45cb-824c-7a7467783830";

/// Poll a deployment's `Azure-AsyncOperation` URL as the SDKs do until its status is no longer
/// `Running` (bounded: the run is a spawned task); the last answer.
async fn poll_deployment(srv: &Srv, token: &str, url: &str) -> Value {
    let route = rg!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operationStatuses/{id}"
    );
    poll_deployment_at(srv, route, token, url).await
}

/// [`poll_deployment`] through `route` (a group's or a subscription's status route).
async fn poll_deployment_at(srv: &Srv, route: &'static str, token: &str, url: &str) -> Value {
    let path = url
        .strip_prefix(srv.base.as_str())
        .unwrap_or_else(|| panic!("{url} is not under {}", srv.base));
    for _ in 0..600 {
        let r = srv.send(srv.call(route, path).bearer(token)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if r.body["status"] != "Running" {
            return r.body;
        }
        assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the deployment at {url} is still running");
}

/// Make deployment `key`'s finished run look like one whose server stopped mid-run: its
/// record back to `Running`, long started, once its run has let its lease go.
async fn stop_run(srv: &Srv, key: &str) {
    let lease = keyless_server::arm::deployments::run_lease(key);
    let mut free = false;
    for _ in 0..600 {
        let holder = srv.s.store.lease_holder(&lease, srv.s.now()).await.unwrap();
        if holder.is_none() {
            free = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(free, "the run of {key} still holds its lease");
    let mut tx = srv.s.store.write("routes_test_stop_run").await.unwrap();
    let mut rec = tx
        .get_tracked(key)
        .await
        .unwrap()
        .expect("the deployment's record");
    rec.body["deployment"]["properties"]["provisioningState"] = json!("Running");
    rec.body["started"] = json!(0);
    tx.put_tracked(&rec).await.unwrap();
    tx.commit().await.unwrap();
}

/// A template that creates an identity, a vault whose access policy lets `reader` get
/// secrets, and a secret in it whose value is the `securestring` parameter `secretValue`;
/// its outputs are the identity's principal and client ids.
fn deployment_template() -> Value {
    json!({
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {
            "identityName": {"type": "string", "minLength": 3},
            "secretValue": {"type": "securestring"},
            "reader": {"type": "string"},
        },
        "variables": {"vaultName": VAULT},
        "resources": [
            {
                "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
                "apiVersion": "2023-01-31",
                "name": "[parameters('identityName')]",
                "location": "[resourceGroup().location]",
            },
            {
                "type": "Microsoft.KeyVault/vaults",
                "apiVersion": "2023-07-01",
                "name": "[variables('vaultName')]",
                "location": "[resourceGroup().location]",
                "properties": {
                    "tenantId": "[subscription().tenantId]",
                    "sku": {"family": "A", "name": "standard"},
                    "accessPolicies": [{
                        "tenantId": "[subscription().tenantId]",
                        "objectId": "[parameters('reader')]",
                        "permissions": {"secrets": ["get"]},
                    }],
                },
            },
            {
                "type": "Microsoft.KeyVault/vaults/secrets",
                "apiVersion": "2023-07-01",
                "name": "[concat(variables('vaultName'), '/db')]",
                "dependsOn": ["[resourceId('Microsoft.KeyVault/vaults', variables('vaultName'))]"],
                "properties": {"value": "[parameters('secretValue')]"},
            },
        ],
        "outputs": {
            "principalId": {
                "type": "string",
                "value": "[reference(resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', parameters('identityName'))).principalId]",
            },
            "clientId": {
                "type": "string",
                "value": "[reference(parameters('identityName')).clientId]",
            },
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_deployment_routes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    let operator = nobody(&srv, "operator", ARM_SCOPE).await;
    put_group(&srv, &adm, "dep").await;
    let rgp = group(&srv, "dep");
    // the operator may deploy in the group, but not write identities
    let ra = format!(
        "{rgp}/providers/Microsoft.Authorization/roleAssignments/{}",
        uuid::Uuid::new_v4()
    );
    let role = format!(
        "/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{IDENTITY_OPERATOR}",
        srv.sub
    );
    let c = srv
        .call(
            "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
            format!("{ra}?{AUTHZ}"),
        )
        .bearer(&adm.token)
        .json(&json!({"properties": {"roleDefinitionId": role, "principalId": operator.oid}}));
    srv.expect(c, 201).await;

    let deps = format!("{rgp}/providers/Microsoft.Resources/deployments");
    let d1 = format!("{deps}/d1");
    let p1 = format!("{d1}?{DEPLOY}");
    let identity =
        format!("{rgp}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/dep-id");
    let vault = format!("{rgp}/providers/Microsoft.KeyVault/vaults/{VAULT}");
    let secret_id = format!("{vault}/secrets/db");
    let get_identity = || {
        srv.call(
            rg!(
                "GET",
                "Microsoft.ManagedIdentity/userAssignedIdentities/{id}"
            ),
            format!("{identity}?{MSI}"),
        )
        .bearer(&adm.token)
    };
    const SECRET: &str = "n0t-echoed-S3CRET";
    let template = deployment_template();
    let body = json!({"properties": {
        "mode": "Incremental",
        "template": template,
        "parameters": {
            "identityName": {"value": "dep-id"},
            "secretValue": {"value": SECRET},
            "reader": {"value": adm.oid},
        },
    }});
    let not_found = |r: &Resp| {
        arm_error(r, 404, "DeploymentNotFound");
        assert!(
            s(&r.body["error"]["message"]).contains("'d1'"),
            "{}",
            r.text
        );
    };
    let route_get = rg!("GET", "Microsoft.Resources/deployments/{name}");

    // validate: everything a PUT checks, the secure value echoed nowhere, nothing stored
    let route = rg!("POST", "Microsoft.Resources/deployments/{name}/validate");
    let vp = format!("{d1}/validate?{DEPLOY}");
    arm_refused(&srv, &stranger, route, &vp, Some(&body)).await;
    let r = srv
        .send(
            srv.call(route, vp.clone())
                .bearer(&operator.token)
                .json(&body),
        )
        .await;
    arm_forbidden(&r, &operator.oid);
    assert!(
        s(&r.body["error"]["message"])
            .contains("Microsoft.ManagedIdentity/userAssignedIdentities/write"),
        "{}",
        r.text
    );
    let r = srv
        .send(srv.call(route, vp.clone()).bearer(&adm.token).json(&body))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    let v = r.body;
    assert_eq!(v["id"], d1.as_str());
    assert_eq!(v["name"], "d1");
    assert_eq!(v["type"], "Microsoft.Resources/deployments");
    assert_eq!(v["properties"]["provisioningState"], "Succeeded");
    assert_eq!(v["properties"]["mode"], "Incremental");
    assert_eq!(
        v["properties"]["parameters"]["identityName"],
        json!({"type": "String", "value": "dep-id"})
    );
    assert_eq!(
        v["properties"]["parameters"]["secretValue"],
        json!({"type": "SecureString"})
    );
    let mut validated: Vec<String> = v["properties"]["validatedResources"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|r| s(&r["id"]).to_ascii_lowercase())
        .collect();
    validated.sort();
    let mut want = vec![
        identity.to_ascii_lowercase(),
        vault.to_ascii_lowercase(),
        secret_id.to_ascii_lowercase(),
    ];
    want.sort();
    assert_eq!(validated, want, "{v}");
    // a secure value the template refuses is not echoed in the refusal either
    let mut refused = body.clone();
    refused["properties"]["template"]["parameters"]["secretValue"]["allowedValues"] =
        json!(["only-this"]);
    let r = srv
        .send(
            srv.call(route, vp.clone())
                .bearer(&adm.token)
                .json(&refused),
        )
        .await;
    arm_error(&r, 400, "InvalidTemplate");
    assert!(!r.text.contains(SECRET), "{}", r.text);
    // whatIf: what validate checks, then the changes (all three to create), the secure value
    // in none of them, nothing stored
    let route = rg!("POST", "Microsoft.Resources/deployments/{name}/whatIf");
    let wp = format!("{d1}/whatIf?{DEPLOY}");
    arm_refused(&srv, &stranger, route, &wp, Some(&body)).await;
    let r = srv
        .send(
            srv.call(route, wp.clone())
                .bearer(&operator.token)
                .json(&body),
        )
        .await;
    arm_forbidden(&r, &operator.oid);
    let r = srv
        .send(srv.call(route, wp.clone()).bearer(&adm.token).json(&body))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    assert_eq!(r.body["status"], "Succeeded", "{}", r.text);
    let mut changes: Vec<(String, String)> = r.body["properties"]["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", r.text))
        .iter()
        .map(|c| {
            (
                s(&c["resourceId"]).to_ascii_lowercase(),
                s(&c["changeType"]),
            )
        })
        .collect();
    changes.sort();
    let creates: Vec<(String, String)> = want
        .iter()
        .map(|id| (id.clone(), "Create".into()))
        .collect();
    assert_eq!(changes, creates, "{}", r.text);
    let r = srv
        .send(
            srv.call(route, wp.clone())
                .bearer(&adm.token)
                .json(&refused),
        )
        .await;
    arm_error(&r, 400, "InvalidTemplate");
    assert!(!r.text.contains(SECRET), "{}", r.text);
    assert_eq!(
        srv.send(get_identity()).await.status,
        404,
        "a what-if wrote nothing"
    );

    // a deployment that is none (validate and whatIf stored nothing)
    let r = srv
        .send(srv.call(route_get, p1.clone()).bearer(&adm.token))
        .await;
    not_found(&r);

    // PUT: refused callers, a bad template, and a deployer who may not write what the template
    // creates (ARM's preflight): 403 naming the resource's write action, nothing stored
    let route = rg!("PUT", "Microsoft.Resources/deployments/{name}");
    arm_refused(&srv, &stranger, route, &p1, Some(&body)).await;
    let mut bad = body.clone();
    bad["properties"]["template"]["resources"][0]["name"] = json!("[bogus('x')]");
    let r = srv
        .send(srv.call(route, p1.clone()).bearer(&adm.token).json(&bad))
        .await;
    arm_error(&r, 400, "InvalidTemplate");
    assert!(
        s(&r.body["error"]["message"]).contains("bogus"),
        "{}",
        r.text
    );
    let r = srv
        .send(
            srv.call(route, p1.clone())
                .bearer(&operator.token)
                .json(&body),
        )
        .await;
    arm_forbidden(&r, &operator.oid);
    let m = s(&r.body["error"]["message"]);
    assert!(
        m.contains("Microsoft.ManagedIdentity/userAssignedIdentities/write"),
        "{m}"
    );
    let r = srv
        .send(srv.call(route_get, p1.clone()).bearer(&adm.token))
        .await;
    not_found(&r);
    let r = srv.send(get_identity()).await;
    arm_error(&r, 404, "ResourceNotFound");

    // PUT: accepted (201, Azure-AsyncOperation), run in the background
    let r = srv
        .send(srv.call(route, p1.clone()).bearer(&adm.token).json(&body))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    assert_eq!(r.body["id"], d1.as_str());
    assert_eq!(r.body["name"], "d1");
    assert_eq!(r.body["type"], "Microsoft.Resources/deployments");
    assert_eq!(r.body["properties"]["provisioningState"], "Accepted");
    let correlation = s(&r.body["properties"]["correlationId"]);
    assert!(!correlation.is_empty(), "{}", r.text);
    let async_op = r
        .header("azure-asyncoperation")
        .unwrap_or_else(|| panic!("no Azure-AsyncOperation: {:?}", r.headers))
        .to_string();
    assert_eq!(
        async_op,
        format!(
            "{}{d1}/operationStatuses/{correlation}?api-version=2024-11-01",
            srv.base
        )
    );

    // the run's status, as the SDKs poll it
    let route = rg!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operationStatuses/{id}"
    );
    let status_path = async_op
        .strip_prefix(srv.base.as_str())
        .unwrap()
        .to_string();
    arm_refused(&srv, &stranger, route, &status_path, None).await;
    let v = poll_deployment(&srv, &adm.token, &async_op).await;
    assert_eq!(v, json!({"status": "Succeeded"}));

    // GET: Succeeded, outputs, outputResources; never the secure value
    let r = srv
        .send(srv.call(route_get, p1.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    let v = r.body;
    let props = &v["properties"];
    assert_eq!(props["provisioningState"], "Succeeded", "{v}");
    assert_eq!(props["correlationId"], correlation.as_str());
    assert!(s(&props["duration"]).starts_with("PT"), "{v}");
    assert!(props.get("error").is_none(), "{v}");
    let id = srv.expect(get_identity(), 200).await;
    // a what-if now: the same template changes nothing; to the operator (who may deploy but not
    // read vaults) an empty template shows the identity it may read as Ignore, never the vault
    let wp = format!("{d1}/whatIf?{DEPLOY}");
    let what_if = rg!("POST", "Microsoft.Resources/deployments/{name}/whatIf");
    let r = srv
        .send(srv.call(what_if, wp.clone()).bearer(&adm.token).json(&body))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    let kinds: Vec<(String, String)> = r.body["properties"]["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", r.text))
        .iter()
        .map(|c| {
            (
                s(&c["resourceId"]).to_ascii_lowercase(),
                s(&c["changeType"]),
            )
        })
        .filter(|(id, _)| want.contains(id))
        .collect();
    assert_eq!(kinds.len(), 3, "{}", r.text);
    assert!(kinds.iter().all(|(_, k)| k == "NoChange"), "{}", r.text);
    let mut empty = body.clone();
    empty["properties"]["template"]["resources"] = json!([]);
    empty["properties"]["template"]["outputs"] = json!({});
    let r = srv
        .send(
            srv.call(what_if, wp.clone())
                .bearer(&operator.token)
                .json(&empty),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let shown: Vec<String> = r.body["properties"]["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", r.text))
        .iter()
        .map(|c| {
            assert_eq!(c["changeType"], "Ignore", "{c}");
            s(&c["resourceId"]).to_ascii_lowercase()
        })
        .collect();
    assert!(shown.contains(&identity.to_ascii_lowercase()), "{}", r.text);
    assert!(
        !r.text
            .to_ascii_lowercase()
            .contains(&vault.to_ascii_lowercase()),
        "{}",
        r.text
    );
    assert_eq!(
        props["outputs"]["principalId"],
        json!({"type": "String", "value": id["properties"]["principalId"]})
    );
    assert_eq!(
        props["outputs"]["clientId"],
        json!({"type": "String", "value": id["properties"]["clientId"]})
    );
    let mut deployed: Vec<String> = props["outputResources"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|r| s(&r["id"]).to_ascii_lowercase())
        .collect();
    deployed.sort();
    assert_eq!(deployed, want, "{v}");
    assert_eq!(
        props["parameters"]["secretValue"],
        json!({"type": "SecureString"})
    );
    arm_refused(&srv, &stranger, route_get, &p1, None).await;
    // the secret was written with the parameter's value: the data plane reads it
    let kv_token = srv.admin_token(KV_SCOPE).await;
    let v = srv
        .expect(
            srv.call("KV GET /secrets/{name}", format!("/secrets/db?{KV}"))
                .bearer(&kv_token),
            200,
        )
        .await;
    assert_eq!(v["value"], SECRET);

    // the status of an operation that is none
    let r = srv
        .send(
            srv.call(
                route,
                format!("{d1}/operationStatuses/{}?{DEPLOY}", uuid::Uuid::new_v4()),
            )
            .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "DeploymentOperationNotFound");

    // HEAD
    let route = rg!("HEAD", "Microsoft.Resources/deployments/{name}");
    let r = srv
        .send(srv.call(route, p1.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let r = srv
        .send(
            srv.call(route, format!("{deps}/none?{DEPLOY}"))
                .bearer(&adm.token),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = srv.send(srv.call(route, p1.clone())).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some());
    let r = srv
        .send(srv.call(route, p1.clone()).bearer(&stranger.token))
        .await;
    assert_eq!(r.status, 403);

    // lists: the group's (with and without the trailing slash az sends); the subscription's
    // has only subscription-scope deployments
    for (route, path) in [
        (
            rg!("GET", "Microsoft.Resources/deployments"),
            format!("{deps}?{DEPLOY}"),
        ),
        (
            rg!("GET", "Microsoft.Resources/deployments/"),
            format!("{deps}/?{DEPLOY}"),
        ),
    ] {
        let r = srv
            .send(srv.call(route, path.clone()).bearer(&adm.token))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(!r.text.contains(SECRET), "{}", r.text);
        assert_eq!(ids(&r.body), vec![d1.to_ascii_lowercase()], "{}", r.text);
        assert_eq!(
            r.body["value"][0]["properties"]["provisioningState"],
            "Succeeded"
        );
        arm_refused(&srv, &stranger, route, &path, None).await;
    }
    let route = sub!("GET", "Microsoft.Resources/deployments");
    let sub_list = format!(
        "/subscriptions/{}/providers/Microsoft.Resources/deployments?{DEPLOY}",
        srv.sub
    );
    let v = srv
        .expect(srv.call(route, sub_list.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v["value"], json!([]), "{v}");
    arm_filtered(&srv, &stranger, route, &sub_list).await;

    // operations: one per resource, naming it; by id; the same without `providers/`
    let route = rg!("GET", "Microsoft.Resources/deployments/{name}/operations");
    let ops_path = format!("{d1}/operations?{DEPLOY}");
    let r = srv
        .send(srv.call(route, ops_path.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    let ops = r.body;
    let items = ops["value"].as_array().unwrap_or_else(|| panic!("{ops}"));
    let mut targets: Vec<String> = items
        .iter()
        .map(|o| s(&o["properties"]["targetResource"]["id"]).to_ascii_lowercase())
        .collect();
    targets.sort();
    assert_eq!(targets, want, "{ops}");
    for o in items {
        let p = &o["properties"];
        assert_eq!(p["provisioningOperation"], "Create", "{o}");
        assert_eq!(p["provisioningState"], "Succeeded", "{o}");
        assert_eq!(p["statusCode"], "Created", "{o}");
        assert_eq!(
            s(&o["id"]),
            format!("{d1}/operations/{}", s(&o["operationId"])),
            "{o}"
        );
        let t = &p["targetResource"];
        assert!(!s(&t["resourceName"]).is_empty(), "{o}");
        assert!(!s(&t["apiVersion"]).is_empty(), "{o}");
    }
    let vault_op = items
        .iter()
        .find(|o| o["properties"]["targetResource"]["resourceType"] == "Microsoft.KeyVault/vaults")
        .unwrap_or_else(|| panic!("{ops}"))
        .clone();
    assert_eq!(
        vault_op["properties"]["targetResource"]["resourceName"],
        VAULT
    );
    let op_id = s(&vault_op["operationId"]);
    arm_refused(&srv, &stranger, route, &ops_path, None).await;
    let r = srv
        .send(
            srv.call(route, format!("{deps}/none/operations?{DEPLOY}"))
                .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "DeploymentNotFound");

    let route = rg!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operations/{id}"
    );
    let op_path = format!("{d1}/operations/{op_id}?{DEPLOY}");
    let v = srv
        .expect(srv.call(route, op_path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v, vault_op);
    arm_refused(&srv, &stranger, route, &op_path, None).await;
    let r = srv
        .send(
            srv.call(route, format!("{d1}/operations/0000000000000000?{DEPLOY}"))
                .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "DeploymentOperationNotFound");

    let legacy = format!(
        "/subscriptions/{}/resourcegroups/dep/deployments/d1/operations",
        srv.sub
    );
    let route = "ARM GET /subscriptions/{sub}/resourcegroups/{rg}/deployments/{name}/operations";
    let path = format!("{legacy}?{DEPLOY}");
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v, ops);
    arm_refused(&srv, &stranger, route, &path, None).await;
    let route =
        "ARM GET /subscriptions/{sub}/resourcegroups/{rg}/deployments/{name}/operations/{id}";
    let path = format!("{legacy}/{op_id}?{DEPLOY}");
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v, vault_op);
    arm_refused(&srv, &stranger, route, &path, None).await;

    // exportTemplate: the template as sent (no parameter values)
    let route = rg!(
        "POST",
        "Microsoft.Resources/deployments/{name}/exportTemplate"
    );
    let path = format!("{d1}/exportTemplate?{DEPLOY}");
    let r = srv
        .send(srv.call(route, path.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    assert_eq!(r.body, json!({"template": template}));
    arm_refused(&srv, &stranger, route, &path, None).await;
    let r = srv
        .send(
            srv.call(route, format!("{deps}/none/exportTemplate?{DEPLOY}"))
                .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "DeploymentNotFound");

    // cancel: a finished deployment cannot be; a running one can (d2 below)
    let route = rg!("POST", "Microsoft.Resources/deployments/{name}/cancel");
    let path = format!("{d1}/cancel?{DEPLOY}");
    let r = srv
        .send(srv.call(route, path.clone()).bearer(&adm.token))
        .await;
    arm_error(&r, 409, "DeploymentCannotBeCancelled");
    arm_refused(&srv, &stranger, route, &path, None).await;
    let r = srv
        .send(
            srv.call(route, format!("{deps}/none/cancel?{DEPLOY}"))
                .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "DeploymentNotFound");

    // d2, made to look mid-run without timing assumptions: its record written back to
    // `Running` and its run's lease held by the test (as the run holds it while it runs) —
    // then, the lease let go, a run whose server stopped
    let d2 = format!("{deps}/d2");
    let p2 = format!("{d2}?{DEPLOY}");
    let small = json!({"properties": {"mode": "Incremental", "template": {
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "resources": [{"type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "apiVersion": "2023-01-31", "name": "dep-two", "location": "local"}],
    }}});
    let put2 = || {
        srv.call(
            rg!("PUT", "Microsoft.Resources/deployments/{name}"),
            p2.clone(),
        )
        .bearer(&adm.token)
        .json(&small)
    };
    let r = srv.send(put2()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let d2_status = r.header("azure-asyncoperation").unwrap().to_string();
    let v = poll_deployment(&srv, &adm.token, &d2_status).await;
    assert_eq!(v, json!({"status": "Succeeded"}));
    let d2_key = d2.to_ascii_lowercase();
    stop_run(&srv, &d2_key).await;
    let lease = keyless_server::arm::deployments::run_lease(&d2_key);
    let ttl = keyless_server::arm::deployments::RUN_LEASE_TTL;
    assert!(srv
        .s
        .store
        .try_lease(&lease, "routes-test", srv.s.now(), ttl)
        .await
        .unwrap());
    let status_route = rg!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operationStatuses/{id}"
    );
    let status_path = d2_status
        .strip_prefix(srv.base.as_str())
        .unwrap()
        .to_string();
    let r = srv
        .send(
            srv.call(status_route, status_path.clone())
                .bearer(&adm.token),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!({"status": "Running"}));
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    // while it runs it is neither replaced nor deleted, and may be canceled
    let r = srv.send(put2()).await;
    arm_error(&r, 409, "DeploymentActive");
    let del2 = || {
        srv.call(
            rg!("DELETE", "Microsoft.Resources/deployments/{name}"),
            p2.clone(),
        )
        .bearer(&adm.token)
    };
    let r = srv.send(del2()).await;
    arm_error(&r, 409, "DeploymentActive");
    let cancel2 = || {
        srv.call(route, format!("{d2}/cancel?{DEPLOY}"))
            .bearer(&adm.token)
    };
    let r = srv.send(cancel2()).await;
    assert_eq!(r.status, 204, "{}", r.text);
    // its server gone (no lease): reads show it Failed; it can no longer be canceled
    srv.s
        .store
        .release_lease(&lease, "routes-test")
        .await
        .unwrap();
    let r = srv
        .send(srv.call(route_get, p2.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["properties"]["provisioningState"], "Failed",
        "{}",
        r.text
    );
    assert_eq!(
        r.body["properties"]["error"]["code"], "DeploymentRunStopped",
        "{}",
        r.text
    );
    let r = srv
        .send(srv.call(status_route, status_path).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["status"], "Failed", "{}", r.text);
    assert_eq!(
        r.body["error"]["code"], "DeploymentRunStopped",
        "{}",
        r.text
    );
    let r = srv.send(cancel2()).await;
    arm_error(&r, 409, "DeploymentCannotBeCancelled");
    srv.expect(del2(), 204).await;

    // DELETE: the deployment and its operations go, what it deployed stays
    let route = rg!("DELETE", "Microsoft.Resources/deployments/{name}");
    arm_refused(&srv, &stranger, route, &p1, None).await;
    let r = srv
        .send(srv.call(route, p1.clone()).bearer(&operator.token))
        .await;
    assert_eq!(
        r.status, 204,
        "the operator may delete deployments: {}",
        r.text
    );
    let r = srv
        .send(srv.call(route_get, p1.clone()).bearer(&adm.token))
        .await;
    not_found(&r);
    let r = srv
        .send(
            srv.call(
                rg!("GET", "Microsoft.Resources/deployments/{name}/operations"),
                ops_path.clone(),
            )
            .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "DeploymentNotFound");
    srv.expect(srv.call(route, p1.clone()).bearer(&adm.token), 204)
        .await;
    srv.expect(get_identity(), 200).await;

    srv.finish(ARM_DEPLOYMENTS, PUBLIC, NEVER_ACCEPTED);
}

/// Deployments at subscription scope (`az deployment sub …`): a template that creates a
/// resource group; the same life cycle and refusals as a group's deployments, and a deployer
/// who may not create groups refused by the preflight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_subscription_deployment_routes() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let stranger = nobody(&srv, "stranger", ARM_SCOPE).await;
    let operator = nobody(&srv, "operator", ARM_SCOPE).await;
    let subp = format!("/subscriptions/{}", srv.sub);
    // the operator may deploy at the subscription, but not create resource groups
    let c = srv
        .call(
            "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}",
            format!(
                "{subp}/providers/Microsoft.Authorization/roleAssignments/{}?{AUTHZ}",
                uuid::Uuid::new_v4()
            ),
        )
        .bearer(&adm.token)
        .json(&json!({"properties": {
            "roleDefinitionId": format!("{subp}/providers/Microsoft.Authorization/roleDefinitions/{IDENTITY_OPERATOR}"),
            "principalId": operator.oid,
        }}));
    srv.expect(c, 201).await;

    let deps = format!("{subp}/providers/Microsoft.Resources/deployments");
    let d = format!("{deps}/sd1");
    let p = format!("{d}?{DEPLOY}");
    let made = format!("{subp}/resourceGroups/sub-made");
    const SECRET: &str = "sub-n0t-echoed-S3CRET";
    let template = json!({
        "$schema": "https://schema.management.azure.com/schemas/2018-05-01/subscriptionDeploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {
            "rgName": {"type": "string"},
            "token": {"type": "securestring"},
        },
        "resources": [{
            "type": "Microsoft.Resources/resourceGroups",
            "apiVersion": "2022-09-01",
            "name": "[parameters('rgName')]",
            "location": "[deployment().location]",
            "tags": {"by": "[deployment().name]"},
        }],
        "outputs": {
            "rgId": {
                "type": "string",
                "value": "[subscriptionResourceId('Microsoft.Resources/resourceGroups', parameters('rgName'))]",
            },
        },
    });
    let body = json!({"location": "local", "properties": {
        "mode": "Incremental",
        "template": template,
        "parameters": {"rgName": {"value": "sub-made"}, "token": {"value": SECRET}},
    }});
    let route_get = sub!("GET", "Microsoft.Resources/deployments/{name}");
    let get_group = || {
        srv.call(
            "ARM GET /subscriptions/{sub}/resourceGroups/{rg}",
            format!("{made}?{RES}"),
        )
        .bearer(&adm.token)
    };

    // validate
    let route = sub!("POST", "Microsoft.Resources/deployments/{name}/validate");
    let vp = format!("{d}/validate?{DEPLOY}");
    arm_refused(&srv, &stranger, route, &vp, Some(&body)).await;
    let r = srv
        .send(
            srv.call(route, vp.clone())
                .bearer(&operator.token)
                .json(&body),
        )
        .await;
    arm_forbidden(&r, &operator.oid);
    assert!(
        s(&r.body["error"]["message"])
            .contains("Microsoft.Resources/subscriptions/resourceGroups/write"),
        "{}",
        r.text
    );
    let r = srv
        .send(srv.call(route, vp.clone()).bearer(&adm.token).json(&body))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    assert_eq!(r.body["id"], d.as_str());
    assert_eq!(r.body["location"], "local");
    assert_eq!(
        r.body["properties"]["validatedResources"],
        json!([{ "id": made }])
    );
    assert_eq!(
        r.body["properties"]["parameters"]["token"],
        json!({"type": "SecureString"})
    );
    arm_error(&srv.send(get_group()).await, 404, "ResourceGroupNotFound");

    // whatIf: the group to create, nothing written; a tag carrying the secure value is in no
    // part of the answer
    let route = sub!("POST", "Microsoft.Resources/deployments/{name}/whatIf");
    let wp = format!("{d}/whatIf?{DEPLOY}");
    let mut body = body.clone();
    body["properties"]["template"]["resources"][0]["tags"]["t"] =
        json!("[concat('tok-', parameters('token'))]");
    arm_refused(&srv, &stranger, route, &wp, Some(&body)).await;
    let r = srv
        .send(
            srv.call(route, wp.clone())
                .bearer(&operator.token)
                .json(&body),
        )
        .await;
    arm_forbidden(&r, &operator.oid);
    let r = srv
        .send(srv.call(route, wp.clone()).bearer(&adm.token).json(&body))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    let changes = &r.body["properties"]["changes"];
    assert_eq!(changes.as_array().map(Vec::len), Some(1), "{}", r.text);
    assert_eq!(changes[0]["resourceId"], made.as_str());
    assert_eq!(changes[0]["changeType"], "Create");
    assert_eq!(changes[0]["after"]["tags"], json!({"by": "sd1"}));
    arm_error(&srv.send(get_group()).await, 404, "ResourceGroupNotFound");
    let body = {
        let mut b = body;
        b["properties"]["template"]["resources"][0]["tags"]
            .as_object_mut()
            .unwrap()
            .remove("t");
        b
    };

    // PUT: refused callers, no location, a deployer who may not create groups; then accepted
    let route = sub!("PUT", "Microsoft.Resources/deployments/{name}");
    arm_refused(&srv, &stranger, route, &p, Some(&body)).await;
    let mut nowhere = body.clone();
    nowhere.as_object_mut().unwrap().remove("location");
    let r = srv
        .send(srv.call(route, p.clone()).bearer(&adm.token).json(&nowhere))
        .await;
    arm_error(&r, 400, "LocationRequired");
    let r = srv
        .send(
            srv.call(route, p.clone())
                .bearer(&operator.token)
                .json(&body),
        )
        .await;
    arm_forbidden(&r, &operator.oid);
    let r = srv
        .send(srv.call(route_get, p.clone()).bearer(&adm.token))
        .await;
    arm_error(&r, 404, "DeploymentNotFound");
    arm_error(&srv.send(get_group()).await, 404, "ResourceGroupNotFound");
    let r = srv
        .send(srv.call(route, p.clone()).bearer(&adm.token).json(&body))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    assert_eq!(r.body["id"], d.as_str());
    assert_eq!(r.body["location"], "local");
    assert_eq!(r.body["properties"]["provisioningState"], "Accepted");
    let correlation = s(&r.body["properties"]["correlationId"]);
    let async_op = r.header("azure-asyncoperation").unwrap().to_string();
    assert_eq!(
        async_op,
        format!(
            "{}{d}/operationStatuses/{correlation}?api-version=2024-11-01",
            srv.base
        )
    );

    // its status, polled; then GET
    let status_route = sub!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operationStatuses/{id}"
    );
    let status_path = async_op
        .strip_prefix(srv.base.as_str())
        .unwrap()
        .to_string();
    arm_refused(&srv, &stranger, status_route, &status_path, None).await;
    let v = poll_deployment_at(&srv, status_route, &adm.token, &async_op).await;
    assert_eq!(v, json!({"status": "Succeeded"}));
    let r = srv
        .send(
            srv.call(
                status_route,
                format!("{d}/operationStatuses/{}?{DEPLOY}", uuid::Uuid::new_v4()),
            )
            .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "DeploymentOperationNotFound");
    let r = srv
        .send(srv.call(route_get, p.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    let props = &r.body["properties"];
    assert_eq!(props["provisioningState"], "Succeeded", "{}", r.text);
    assert_eq!(
        props["outputs"]["rgId"],
        json!({"type": "String", "value": made})
    );
    assert_eq!(props["outputResources"], json!([{ "id": made }]));
    arm_refused(&srv, &stranger, route_get, &p, None).await;
    let g = srv.expect(get_group(), 200).await;
    assert_eq!(g["location"], "local");
    assert_eq!(g["tags"], json!({"by": "sd1"}));

    // HEAD
    let route = sub!("HEAD", "Microsoft.Resources/deployments/{name}");
    let r = srv
        .send(srv.call(route, p.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let r = srv
        .send(
            srv.call(route, format!("{deps}/none?{DEPLOY}"))
                .bearer(&adm.token),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = srv.send(srv.call(route, p.clone())).await;
    assert_eq!(r.status, 401);
    let r = srv
        .send(srv.call(route, p.clone()).bearer(&stranger.token))
        .await;
    assert_eq!(r.status, 403);

    // lists: the subscription-scope deployments, what the caller may read
    for (route, path) in [
        (
            sub!("GET", "Microsoft.Resources/deployments"),
            format!("{deps}?{DEPLOY}"),
        ),
        (
            sub!("GET", "Microsoft.Resources/deployments/"),
            format!("{deps}/?{DEPLOY}"),
        ),
    ] {
        let r = srv
            .send(srv.call(route, path.clone()).bearer(&adm.token))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(!r.text.contains(SECRET), "{}", r.text);
        assert_eq!(ids(&r.body), vec![d.to_ascii_lowercase()], "{}", r.text);
        arm_filtered(&srv, &stranger, route, &path).await;
    }

    // operations
    let route = sub!("GET", "Microsoft.Resources/deployments/{name}/operations");
    let ops_path = format!("{d}/operations?{DEPLOY}");
    let r = srv
        .send(srv.call(route, ops_path.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    let ops = r.body;
    assert_eq!(ops["value"].as_array().map(Vec::len), Some(1), "{ops}");
    let op = ops["value"][0].clone();
    assert_eq!(
        op["properties"]["targetResource"]["id"]
            .as_str()
            .map(str::to_ascii_lowercase),
        Some(made.to_ascii_lowercase()),
        "{op}"
    );
    assert_eq!(
        op["properties"]["targetResource"]["resourceType"],
        "Microsoft.Resources/resourceGroups"
    );
    assert_eq!(op["properties"]["provisioningState"], "Succeeded");
    arm_refused(&srv, &stranger, route, &ops_path, None).await;
    let route = sub!(
        "GET",
        "Microsoft.Resources/deployments/{name}/operations/{id}"
    );
    let op_path = format!("{d}/operations/{}?{DEPLOY}", s(&op["operationId"]));
    let v = srv
        .expect(srv.call(route, op_path.clone()).bearer(&adm.token), 200)
        .await;
    assert_eq!(v, op);
    arm_refused(&srv, &stranger, route, &op_path, None).await;
    let r = srv
        .send(
            srv.call(route, format!("{d}/operations/0000000000000000?{DEPLOY}"))
                .bearer(&adm.token),
        )
        .await;
    arm_error(&r, 404, "DeploymentOperationNotFound");

    // exportTemplate
    let route = sub!(
        "POST",
        "Microsoft.Resources/deployments/{name}/exportTemplate"
    );
    let path = format!("{d}/exportTemplate?{DEPLOY}");
    let r = srv
        .send(srv.call(route, path.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(SECRET), "{}", r.text);
    assert_eq!(r.body, json!({ "template": template }));
    arm_refused(&srv, &stranger, route, &path, None).await;

    // cancel: not once finished; while it runs (its record and run's lease as in
    // `arm_deployment_routes`)
    let route = sub!("POST", "Microsoft.Resources/deployments/{name}/cancel");
    let path = format!("{d}/cancel?{DEPLOY}");
    let r = srv
        .send(srv.call(route, path.clone()).bearer(&adm.token))
        .await;
    arm_error(&r, 409, "DeploymentCannotBeCancelled");
    arm_refused(&srv, &stranger, route, &path, None).await;
    let key = d.to_ascii_lowercase();
    stop_run(&srv, &key).await;
    let lease = keyless_server::arm::deployments::run_lease(&key);
    assert!(srv
        .s
        .store
        .try_lease(
            &lease,
            "routes-test",
            srv.s.now(),
            keyless_server::arm::deployments::RUN_LEASE_TTL
        )
        .await
        .unwrap());
    let r = srv
        .send(srv.call(route, path.clone()).bearer(&adm.token))
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let route = sub!("DELETE", "Microsoft.Resources/deployments/{name}");
    let r = srv
        .send(srv.call(route, p.clone()).bearer(&adm.token))
        .await;
    arm_error(&r, 409, "DeploymentActive");
    srv.s
        .store
        .release_lease(&lease, "routes-test")
        .await
        .unwrap();

    // DELETE: the deployment goes, the group it made stays
    arm_refused(&srv, &stranger, route, &p, None).await;
    srv.expect(srv.call(route, p.clone()).bearer(&adm.token), 204)
        .await;
    let r = srv
        .send(srv.call(route_get, p.clone()).bearer(&adm.token))
        .await;
    arm_error(&r, 404, "DeploymentNotFound");
    srv.expect(get_group(), 200).await;

    srv.finish(ARM_SUBSCRIPTION_DEPLOYMENTS, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ Key Vault: secrets

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_vault_secret_routes() {
    let (srv, adm, stranger) = vault_server().await;
    let base = kv_base();
    let t = adm.token.clone();

    let route = "KV PUT /secrets/{name}";
    let path = format!("/secrets/db?{KV}");
    let body = json!({"value": "v1"});
    kv_refused(&srv, &stranger, route, &path, Some(&body)).await;
    // a token for another audience is refused too, with the challenge
    let arm_token = srv.admin_token(ARM_SCOPE).await;
    let r = srv
        .send(srv.call(route, path.clone()).bearer(&arm_token).json(&body))
        .await;
    kv_unauthenticated(&srv, &r);
    assert!(
        s(&r.body["error"]["message"]).starts_with("AKV10022"),
        "{}",
        r.text
    );
    let v1 = srv
        .expect(srv.call(route, path.clone()).bearer(&t).json(&body), 200)
        .await;
    assert_eq!(v1["value"], "v1");
    let id1 = s(&v1["id"]);
    assert!(id1.starts_with(&format!("{base}/secrets/db/")), "{v1}");
    assert_eq!(v1["attributes"]["enabled"], true);
    assert_eq!(v1["attributes"]["recoveryLevel"], "Recoverable+Purgeable");
    let ver1 = id1.rsplit('/').next().unwrap().to_string();
    let v2 = srv
        .expect(
            srv.call(route, path.clone())
                .bearer(&t)
                .json(&json!({"value": "v2"})),
            200,
        )
        .await;
    let ver2 = s(&v2["id"]).rsplit('/').next().unwrap().to_string();
    assert_ne!(ver1, ver2);

    let route = "KV GET /secrets/{name}";
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["value"], "v2");
    assert_eq!(v["id"], v2["id"]);
    kv_refused(&srv, &stranger, route, &path, None).await;

    let route = "KV GET /secrets/{name}/{version}";
    let vpath = format!("/secrets/db/{ver1}?{KV}");
    let v = srv
        .expect(srv.call(route, vpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["value"], "v1");
    kv_refused(&srv, &stranger, route, &vpath, None).await;

    let route = "KV PATCH /secrets/{name}/{version}";
    let ppath = format!("/secrets/db/{ver2}?{KV}");
    let patch = json!({"contentType": "text/plain", "tags": {"a": "b"}});
    let v = srv
        .expect(srv.call(route, ppath.clone()).bearer(&t).json(&patch), 200)
        .await;
    assert_eq!(v["contentType"], "text/plain");
    assert_eq!(v["tags"], json!({"a": "b"}));
    assert!(
        v.get("value").is_none(),
        "an update does not answer the value: {v}"
    );
    kv_refused(&srv, &stranger, route, &ppath, Some(&patch)).await;

    let route = "KV GET /secrets";
    let lpath = format!("/secrets?{KV}");
    let v = srv
        .expect(srv.call(route, lpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["value"][0]["id"], format!("{base}/secrets/db"));
    assert_eq!(v["value"][0]["contentType"], "text/plain");
    assert!(v["value"][0].get("value").is_none(), "{v}");
    assert!(v.get("nextLink").is_some(), "{v}");
    kv_refused(&srv, &stranger, route, &lpath, None).await;

    let route = "KV GET /secrets/{name}/versions";
    let vs = format!("/secrets/db/versions?{KV}");
    let v = srv
        .expect(srv.call(route, vs.clone()).bearer(&t), 200)
        .await;
    let ids: BTreeSet<String> = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| s(&i["id"]))
        .collect();
    assert_eq!(ids, BTreeSet::from([id1.clone(), s(&v2["id"])]), "{v}");
    kv_refused(&srv, &stranger, route, &vs, None).await;

    let route = "KV POST /secrets/{name}/backup";
    let bpath = format!("/secrets/db/backup?{KV}");
    let v = srv
        .expect(srv.call(route, bpath.clone()).bearer(&t), 200)
        .await;
    let blob = s(&v["value"]);
    assert!(!blob.is_empty(), "{v}");
    kv_refused(&srv, &stranger, route, &bpath, None).await;

    let route = "KV DELETE /secrets/{name}";
    kv_refused(&srv, &stranger, route, &path, None).await;
    let v = srv
        .expect(srv.call(route, path.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["recoveryId"], format!("{base}/deletedsecrets/db"));
    assert!(
        v["deletedDate"].is_u64() && v["scheduledPurgeDate"].is_u64(),
        "{v}"
    );
    let r = srv
        .send(srv.call("KV GET /secrets/{name}", path.clone()).bearer(&t))
        .await;
    kv_error(&r, 404, "SecretNotFound", None);

    let route = "KV GET /deletedsecrets";
    let dl = format!("/deletedsecrets?{KV}");
    let v = srv
        .expect(srv.call(route, dl.clone()).bearer(&t), 200)
        .await;
    assert_eq!(
        v["value"][0]["recoveryId"],
        format!("{base}/deletedsecrets/db")
    );
    kv_refused(&srv, &stranger, route, &dl, None).await;

    let route = "KV GET /deletedsecrets/{name}";
    let dpath = format!("/deletedsecrets/db?{KV}");
    let v = srv
        .expect(srv.call(route, dpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["recoveryId"], format!("{base}/deletedsecrets/db"));
    assert!(v.get("value").is_none(), "{v}");
    kv_refused(&srv, &stranger, route, &dpath, None).await;

    let route = "KV POST /deletedsecrets/{name}/recover";
    let rpath = format!("/deletedsecrets/db/recover?{KV}");
    kv_refused(&srv, &stranger, route, &rpath, None).await;
    let v = srv
        .expect(srv.call(route, rpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["id"], v2["id"]);
    let v = srv
        .expect(
            srv.call("KV GET /secrets/{name}", path.clone()).bearer(&t),
            200,
        )
        .await;
    assert_eq!(v["value"], "v2");

    let route = "KV DELETE /deletedsecrets/{name}";
    srv.expect(
        srv.call("KV DELETE /secrets/{name}", path.clone())
            .bearer(&t),
        200,
    )
    .await;
    kv_refused(&srv, &stranger, route, &dpath, None).await;
    srv.expect(srv.call(route, dpath.clone()).bearer(&t), 204)
        .await;
    let r = srv
        .send(
            srv.call("KV GET /deletedsecrets/{name}", dpath.clone())
                .bearer(&t),
        )
        .await;
    kv_error(&r, 404, "SecretNotFound", None);

    let route = "KV POST /secrets/restore";
    let rs = format!("/secrets/restore?{KV}");
    let body = json!({"value": blob});
    kv_refused(&srv, &stranger, route, &rs, Some(&body)).await;
    let v = srv
        .expect(srv.call(route, rs.clone()).bearer(&t).json(&body), 200)
        .await;
    assert!(
        s(&v["id"]).starts_with(&format!("{base}/secrets/db/")),
        "{v}"
    );
    let v = srv
        .expect(
            srv.call("KV GET /secrets/{name}", path.clone()).bearer(&t),
            200,
        )
        .await;
    assert_eq!(v["value"], "v2");

    srv.finish(KV_SECRETS, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ Key Vault: keys

/// A fresh P-256 private key as a JWK (what `az keyvault key import` sends).
fn ec_private_jwk() -> Value {
    use aws_lc_rs::encoding::AsBigEndian;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let point = kp.public_key().as_ref().to_vec();
    let d = kp.private_key().as_be_bytes().unwrap();
    json!({"kty": "EC", "crv": "P-256", "x": b64url(&point[1..33]), "y": b64url(&point[33..65]),
        "d": b64url(d.as_ref())})
}

fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// The version of a `kid` / `id` (its last segment).
fn version_of(id: &Value) -> String {
    s(id).rsplit('/').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_vault_key_routes() {
    let (srv, adm, stranger) = vault_server().await;
    let base = kv_base();
    let t = adm.token.clone();

    let route = "KV POST /keys/{name}/create";
    let cpath = format!("/keys/k1/create?{KV}");
    let body = json!({"kty": "EC", "crv": "P-256"});
    kv_refused(&srv, &stranger, route, &cpath, Some(&body)).await;
    let v = srv
        .expect(srv.call(route, cpath.clone()).bearer(&t).json(&body), 200)
        .await;
    let kid1 = s(&v["key"]["kid"]);
    assert!(kid1.starts_with(&format!("{base}/keys/k1/")), "{v}");
    assert_eq!(v["key"]["kty"], "EC");
    assert_eq!(v["key"]["crv"], "P-256");
    assert!(v["key"].get("d").is_none(), "no private part: {v}");
    assert_eq!(v["attributes"]["enabled"], true);

    let route = "KV POST /keys/{name}/rotate";
    let rpath = format!("/keys/k1/rotate?{KV}");
    kv_refused(&srv, &stranger, route, &rpath, None).await;
    let v = srv
        .expect(srv.call(route, rpath.clone()).bearer(&t), 200)
        .await;
    let kid2 = s(&v["key"]["kid"]);
    assert!(
        kid2.starts_with(&format!("{base}/keys/k1/")) && kid2 != kid1,
        "{v}"
    );
    let ver1 = version_of(&json!(kid1));
    let ver2 = version_of(&json!(kid2));

    let route = "KV PUT /keys/{name}";
    let ipath = format!("/keys/imported?{KV}");
    let jwk = ec_private_jwk();
    let body = json!({"key": jwk});
    kv_refused(&srv, &stranger, route, &ipath, Some(&body)).await;
    let v = srv
        .expect(srv.call(route, ipath.clone()).bearer(&t).json(&body), 200)
        .await;
    assert!(
        s(&v["key"]["kid"]).starts_with(&format!("{base}/keys/imported/")),
        "{v}"
    );
    assert_eq!(v["key"]["x"], jwk["x"]);
    assert!(v["key"].get("d").is_none(), "{v}");

    let route = "KV GET /keys/{name}";
    let kpath = format!("/keys/k1?{KV}");
    let v = srv
        .expect(srv.call(route, kpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["key"]["kid"], kid2.as_str());
    kv_refused(&srv, &stranger, route, &kpath, None).await;

    let route = "KV GET /keys/{name}/{version}";
    let vpath = format!("/keys/k1/{ver1}?{KV}");
    let v = srv
        .expect(srv.call(route, vpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["key"]["kid"], kid1.as_str());
    kv_refused(&srv, &stranger, route, &vpath, None).await;

    let route = "KV PATCH /keys/{name}/{version}";
    let ppath = format!("/keys/k1/{ver2}?{KV}");
    let patch = json!({"tags": {"owner": "team"}});
    let v = srv
        .expect(srv.call(route, ppath.clone()).bearer(&t).json(&patch), 200)
        .await;
    assert_eq!(v["tags"], json!({"owner": "team"}));
    assert_eq!(v["key"]["kid"], kid2.as_str());
    kv_refused(&srv, &stranger, route, &ppath, Some(&patch)).await;

    let route = "KV GET /keys";
    let lpath = format!("/keys?{KV}");
    let v = srv
        .expect(srv.call(route, lpath.clone()).bearer(&t), 200)
        .await;
    let kids: BTreeSet<String> = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| s(&i["kid"]))
        .collect();
    assert_eq!(
        kids,
        BTreeSet::from([format!("{base}/keys/imported"), format!("{base}/keys/k1")]),
        "{v}"
    );
    kv_refused(&srv, &stranger, route, &lpath, None).await;

    let route = "KV GET /keys/{name}/versions";
    let vs = format!("/keys/k1/versions?{KV}");
    let v = srv
        .expect(srv.call(route, vs.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(2), "{v}");
    kv_refused(&srv, &stranger, route, &vs, None).await;

    // sign and verify with the EC key
    let digest = b64url(&sha256(b"the message"));
    let route = "KV POST /keys/{name}/{version}/sign";
    let spath = format!("/keys/k1/{ver2}/sign?{KV}");
    let body = json!({"alg": "ES256", "value": digest});
    kv_refused(&srv, &stranger, route, &spath, Some(&body)).await;
    let v = srv
        .expect(srv.call(route, spath.clone()).bearer(&t).json(&body), 200)
        .await;
    assert_eq!(v["kid"], kid2.as_str());
    let sig = s(&v["value"]);
    assert!(!sig.is_empty(), "{v}");

    let route = "KV POST /keys/{name}/{version}/verify";
    let vfpath = format!("/keys/k1/{ver2}/verify?{KV}");
    let body = json!({"alg": "ES256", "digest": digest, "value": sig});
    kv_refused(&srv, &stranger, route, &vfpath, Some(&body)).await;
    let v = srv
        .expect(srv.call(route, vfpath.clone()).bearer(&t).json(&body), 200)
        .await;
    assert_eq!(v["value"], true);
    let other = json!({"alg": "ES256", "digest": b64url(&sha256(b"another")), "value": sig});
    let v = srv
        .expect(srv.call(route, vfpath.clone()).bearer(&t).json(&other), 200)
        .await;
    assert_eq!(v["value"], false);

    // encrypt / decrypt, wrap / unwrap with an RSA key (the latest version: empty segment)
    srv.expect(
        srv.call(
            "KV POST /keys/{name}/create",
            format!("/keys/r1/create?{KV}"),
        )
        .bearer(&t)
        .json(&json!({"kty": "RSA", "key_size": 2048})),
        200,
    )
    .await;
    for (enc, dec, plain) in [
        ("encrypt", "decrypt", b"the plaintext".as_slice()),
        ("wrapkey", "unwrapkey", [7u8; 32].as_slice()),
    ] {
        let enc_route = if enc == "encrypt" {
            "KV POST /keys/{name}/{version}/encrypt"
        } else {
            "KV POST /keys/{name}/{version}/wrapkey"
        };
        let dec_route = if dec == "decrypt" {
            "KV POST /keys/{name}/{version}/decrypt"
        } else {
            "KV POST /keys/{name}/{version}/unwrapkey"
        };
        let epath = format!("/keys/r1//{enc}?{KV}");
        let body = json!({"alg": "RSA-OAEP", "value": b64url(plain)});
        kv_refused(&srv, &stranger, enc_route, &epath, Some(&body)).await;
        let v = srv
            .expect(
                srv.call(enc_route, epath.clone()).bearer(&t).json(&body),
                200,
            )
            .await;
        assert!(s(&v["kid"]).starts_with(&format!("{base}/keys/r1/")), "{v}");
        let ct = s(&v["value"]);
        assert_ne!(ct, b64url(plain));
        let dpath = format!("/keys/r1//{dec}?{KV}");
        let body = json!({"alg": "RSA-OAEP", "value": ct});
        kv_refused(&srv, &stranger, dec_route, &dpath, Some(&body)).await;
        let v = srv
            .expect(
                srv.call(dec_route, dpath.clone()).bearer(&t).json(&body),
                200,
            )
            .await;
        assert_eq!(v["value"], b64url(plain));
    }

    // rotation policies are not supported: refused for everyone, a token first
    let route = "KV GET /keys/{name}/rotationpolicy";
    let rp = format!("/keys/k1/rotationpolicy?{KV}");
    let r = srv.send(srv.call(route, rp.clone())).await;
    kv_unauthenticated(&srv, &r);
    let r = srv.send(srv.call(route, rp.clone()).bearer(&t)).await;
    kv_error(&r, 400, "BadParameter", None);

    // backup, delete, the deleted collection, recover, purge, restore
    let route = "KV POST /keys/{name}/backup";
    let bpath = format!("/keys/k1/backup?{KV}");
    kv_refused(&srv, &stranger, route, &bpath, None).await;
    let blob = s(&srv
        .expect(srv.call(route, bpath.clone()).bearer(&t), 200)
        .await["value"]);
    assert!(!blob.is_empty());

    let route = "KV DELETE /keys/{name}";
    kv_refused(&srv, &stranger, route, &kpath, None).await;
    let v = srv
        .expect(srv.call(route, kpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["recoveryId"], format!("{base}/deletedkeys/k1"));
    assert_eq!(v["key"]["kid"], kid2.as_str());

    let route = "KV GET /deletedkeys";
    let dl = format!("/deletedkeys?{KV}");
    let v = srv
        .expect(srv.call(route, dl.clone()).bearer(&t), 200)
        .await;
    assert_eq!(
        v["value"][0]["recoveryId"],
        format!("{base}/deletedkeys/k1")
    );
    kv_refused(&srv, &stranger, route, &dl, None).await;

    let route = "KV GET /deletedkeys/{name}";
    let dpath = format!("/deletedkeys/k1?{KV}");
    let v = srv
        .expect(srv.call(route, dpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["key"]["kid"], kid2.as_str());
    assert!(v["scheduledPurgeDate"].is_u64(), "{v}");
    kv_refused(&srv, &stranger, route, &dpath, None).await;

    let route = "KV POST /deletedkeys/{name}/recover";
    let rcpath = format!("/deletedkeys/k1/recover?{KV}");
    kv_refused(&srv, &stranger, route, &rcpath, None).await;
    let v = srv
        .expect(srv.call(route, rcpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["key"]["kid"], kid2.as_str());

    let route = "KV DELETE /deletedkeys/{name}";
    srv.expect(
        srv.call("KV DELETE /keys/{name}", kpath.clone()).bearer(&t),
        200,
    )
    .await;
    kv_refused(&srv, &stranger, route, &dpath, None).await;
    srv.expect(srv.call(route, dpath.clone()).bearer(&t), 204)
        .await;

    let route = "KV POST /keys/restore";
    let rs = format!("/keys/restore?{KV}");
    let body = json!({"value": blob});
    kv_refused(&srv, &stranger, route, &rs, Some(&body)).await;
    let v = srv
        .expect(srv.call(route, rs.clone()).bearer(&t).json(&body), 200)
        .await;
    assert_eq!(v["key"]["kid"], kid2.as_str());

    srv.finish(KV_KEYS, PUBLIC, NEVER_ACCEPTED);
}

// ------------------------------------------------------------------ Key Vault: certificates

/// Poll the pending operation of certificate `name` until it is no longer in progress.
async fn wait_issued(srv: &Srv, token: &str, name: &str) -> Value {
    let path = format!("/certificates/{name}/pending?{KV}");
    for _ in 0..400 {
        let v = srv
            .expect(
                srv.call("KV GET /certificates/{name}/pending", path.clone())
                    .bearer(token),
                200,
            )
            .await;
        if v["status"] != "inProgress" {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("certificate {name} still in progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_vault_certificate_routes() {
    let (srv, adm, stranger) = vault_server().await;
    let base = kv_base();
    let t = adm.token.clone();
    let policy = |subject: &str, issuer: &str| {
        json!({"policy": {
            "key_props": {"kty": "EC", "crv": "P-256", "exportable": true},
            "secret_props": {"contentType": "application/x-pem-file"},
            "x509_props": {"subject": subject, "validity_months": 12},
            "issuer": {"name": issuer}}})
    };

    // create (self-signed, issued in the background), then its pending operation
    let route = "KV POST /certificates/{name}/create";
    let cpath = format!("/certificates/web/create?{KV}");
    let body = policy("CN=web.example", "Self");
    kv_refused(&srv, &stranger, route, &cpath, Some(&body)).await;
    let r = srv
        .send(srv.call(route, cpath.clone()).bearer(&t).json(&body))
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body["id"], format!("{base}/certificates/web/pending"));
    assert_eq!(r.body["status"], "inProgress");
    assert_eq!(r.body["issuer"]["name"], "Self");
    assert!(
        r.header("location")
            .is_some_and(|l| l.starts_with(&format!("{base}/certificates/web/pending?"))),
        "{:?}",
        r.headers
    );

    let route = "KV GET /certificates/{name}/pending";
    let pending = format!("/certificates/web/pending?{KV}");
    kv_refused(&srv, &stranger, route, &pending, None).await;
    let done = wait_issued(&srv, &t, "web").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["target"], format!("{base}/certificates/web"));

    let route = "KV GET /certificates/{name}";
    let cert_path = format!("/certificates/web?{KV}");
    let v = srv
        .expect(srv.call(route, cert_path.clone()).bearer(&t), 200)
        .await;
    let id = s(&v["id"]);
    let ver = id.rsplit('/').next().unwrap().to_string();
    assert!(id.starts_with(&format!("{base}/certificates/web/")), "{v}");
    assert_eq!(v["kid"], format!("{base}/keys/web/{ver}"));
    assert_eq!(v["sid"], format!("{base}/secrets/web/{ver}"));
    assert!(v["x5t"].is_string() && v["cer"].is_string(), "{v}");
    assert_eq!(v["policy"]["x509_props"]["subject"], "CN=web.example");
    kv_refused(&srv, &stranger, route, &cert_path, None).await;

    let route = "KV GET /certificates/{name}/{version}";
    let vpath = format!("/certificates/web/{ver}?{KV}");
    let v = srv
        .expect(srv.call(route, vpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["id"], id.as_str());
    kv_refused(&srv, &stranger, route, &vpath, None).await;

    let route = "KV PATCH /certificates/{name}/{version}";
    let patch = json!({"tags": {"svc": "web"}});
    let v = srv
        .expect(srv.call(route, vpath.clone()).bearer(&t).json(&patch), 200)
        .await;
    assert_eq!(v["tags"], json!({"svc": "web"}));
    assert_eq!(v["id"], id.as_str());
    kv_refused(&srv, &stranger, route, &vpath, Some(&patch)).await;

    let route = "KV GET /certificates/{name}/policy";
    let pol = format!("/certificates/web/policy?{KV}");
    let v = srv
        .expect(srv.call(route, pol.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["id"], format!("{base}/certificates/web/policy"));
    assert_eq!(v["issuer"]["name"], "Self");
    assert_eq!(v["key_props"]["kty"], "EC");
    kv_refused(&srv, &stranger, route, &pol, None).await;

    let route = "KV PATCH /certificates/{name}/policy";
    let patch = json!({"lifetime_actions": [{"trigger": {"lifetime_percentage": 80},
        "action": {"action_type": "AutoRenew"}}]});
    let v = srv
        .expect(srv.call(route, pol.clone()).bearer(&t).json(&patch), 200)
        .await;
    assert_eq!(
        v["lifetime_actions"][0]["trigger"]["lifetime_percentage"],
        80
    );
    assert_eq!(
        v["lifetime_actions"][0]["action"]["action_type"],
        "AutoRenew"
    );
    assert_eq!(v["x509_props"]["subject"], "CN=web.example");
    kv_refused(&srv, &stranger, route, &pol, Some(&patch)).await;

    let route = "KV PATCH /certificates/{name}/pending";
    let cancel = json!({"cancellation_requested": true});
    kv_refused(&srv, &stranger, route, &pending, Some(&cancel)).await;
    let v = srv
        .expect(
            srv.call(route, pending.clone()).bearer(&t).json(&cancel),
            200,
        )
        .await;
    assert_eq!(v["cancellation_requested"], true);
    assert_eq!(
        v["status"], "completed",
        "a finished operation stays finished: {v}"
    );

    let route = "KV DELETE /certificates/{name}/pending";
    kv_refused(&srv, &stranger, route, &pending, None).await;
    let v = srv
        .expect(srv.call(route, pending.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["id"], format!("{base}/certificates/web/pending"));
    let r = srv
        .send(
            srv.call("KV GET /certificates/{name}/pending", pending.clone())
                .bearer(&t),
        )
        .await;
    kv_error(&r, 404, "PendingCertificateNotFound", None);

    // issuer Unknown: the CSR is signed outside and merged
    let r = srv
        .send(
            srv.call(
                "KV POST /certificates/{name}/create",
                format!("/certificates/ext/create?{KV}"),
            )
            .bearer(&t)
            .json(&policy("CN=ext.example", "Unknown")),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let csr_der = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(s(&r.body["csr"]))
            .unwrap()
    };
    let now = srv.s.now();
    let (ca, _) = keyless_pki::Ca::generate("outside CA", now).unwrap();
    let issued = ca
        .sign_client_csr(
            &keyless_pki::pem("CERTIFICATE REQUEST", &csr_der),
            "ext.example",
            "https://ext.example/",
            now,
            30 * 86_400,
        )
        .unwrap();
    let route = "KV POST /certificates/{name}/pending/merge";
    let mpath = format!("/certificates/ext/pending/merge?{KV}");
    let x5c = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&issued)
    };
    let body = json!({"x5c": [x5c]});
    kv_refused(&srv, &stranger, route, &mpath, Some(&body)).await;
    let v = srv
        .expect(srv.call(route, mpath.clone()).bearer(&t).json(&body), 201)
        .await;
    assert!(
        s(&v["id"]).starts_with(&format!("{base}/certificates/ext/")),
        "{v}"
    );
    assert_eq!(v["cer"], x5c.as_str());
    assert_eq!(v["policy"]["issuer"]["name"], "Unknown");

    // import what the vault gives back for the first certificate (PEM with its key)
    let pem = s(&srv
        .expect(
            srv.call("KV GET /secrets/{name}", format!("/secrets/web?{KV}"))
                .bearer(&t),
            200,
        )
        .await["value"]);
    assert!(pem.contains("PRIVATE KEY") && pem.contains("BEGIN CERTIFICATE"));
    let route = "KV POST /certificates/{name}/import";
    let ipath = format!("/certificates/copy/import?{KV}");
    let body = json!({"value": pem});
    kv_refused(&srv, &stranger, route, &ipath, Some(&body)).await;
    let v = srv
        .expect(srv.call(route, ipath.clone()).bearer(&t).json(&body), 200)
        .await;
    assert!(
        s(&v["id"]).starts_with(&format!("{base}/certificates/copy/")),
        "{v}"
    );
    assert_eq!(
        v["policy"]["secret_props"]["contentType"],
        "application/x-pem-file"
    );
    assert_eq!(
        v["x5t"],
        srv.expect(
            srv.call("KV GET /certificates/{name}", cert_path.clone())
                .bearer(&t),
            200
        )
        .await["x5t"]
    );

    let route = "KV GET /certificates";
    let lpath = format!("/certificates?{KV}");
    let v = srv
        .expect(srv.call(route, lpath.clone()).bearer(&t), 200)
        .await;
    let ids: BTreeSet<String> = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| s(&i["id"]))
        .collect();
    assert_eq!(
        ids,
        ["copy", "ext", "web"]
            .iter()
            .map(|n| format!("{base}/certificates/{n}"))
            .collect(),
        "{v}"
    );
    kv_refused(&srv, &stranger, route, &lpath, None).await;

    let route = "KV GET /certificates/{name}/versions";
    let vs = format!("/certificates/web/versions?{KV}");
    let v = srv
        .expect(srv.call(route, vs.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["value"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["value"][0]["id"], id.as_str());
    kv_refused(&srv, &stranger, route, &vs, None).await;

    // contacts and issuers
    let contacts = format!("/certificates/contacts?{KV}");
    let route = "KV PUT /certificates/contacts";
    let body = json!({"contacts": [{"email": "ops@example.com", "name": "Ops"}]});
    kv_refused(&srv, &stranger, route, &contacts, Some(&body)).await;
    let v = srv
        .expect(
            srv.call(route, contacts.clone()).bearer(&t).json(&body),
            200,
        )
        .await;
    assert_eq!(v["id"], format!("{base}/certificates/contacts"));
    assert_eq!(v["contacts"][0]["email"], "ops@example.com");
    let route = "KV GET /certificates/contacts";
    let v = srv
        .expect(srv.call(route, contacts.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["contacts"][0]["name"], "Ops");
    kv_refused(&srv, &stranger, route, &contacts, None).await;
    let route = "KV DELETE /certificates/contacts";
    kv_refused(&srv, &stranger, route, &contacts, None).await;
    let v = srv
        .expect(srv.call(route, contacts.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["contacts"][0]["email"], "ops@example.com");
    let r = srv
        .send(
            srv.call("KV GET /certificates/contacts", contacts.clone())
                .bearer(&t),
        )
        .await;
    kv_error(&r, 404, "ContactsNotFound", None);

    let route = "KV GET /certificates/issuers";
    let ipath = format!("/certificates/issuers?{KV}");
    let v = srv
        .expect(srv.call(route, ipath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["value"], json!([]));
    kv_refused(&srv, &stranger, route, &ipath, None).await;
    // issuer objects are not supported: refused for everyone, a token first
    let route = "KV GET /certificates/issuers/{name}";
    let one = format!("/certificates/issuers/digicert?{KV}");
    let r = srv.send(srv.call(route, one.clone())).await;
    kv_unauthenticated(&srv, &r);
    let r = srv.send(srv.call(route, one.clone()).bearer(&t)).await;
    kv_error(&r, 400, "BadParameter", None);

    // backup, delete (the key and secret go with it), the deleted collection, recover, purge,
    // restore
    let route = "KV POST /certificates/{name}/backup";
    let bpath = format!("/certificates/web/backup?{KV}");
    kv_refused(&srv, &stranger, route, &bpath, None).await;
    let blob = s(&srv
        .expect(srv.call(route, bpath.clone()).bearer(&t), 200)
        .await["value"]);
    assert!(!blob.is_empty());

    let route = "KV DELETE /certificates/{name}";
    kv_refused(&srv, &stranger, route, &cert_path, None).await;
    let v = srv
        .expect(srv.call(route, cert_path.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["recoveryId"], format!("{base}/deletedcertificates/web"));
    assert_eq!(v["id"], id.as_str());
    let r = srv
        .send(
            srv.call("KV GET /secrets/{name}", format!("/secrets/web?{KV}"))
                .bearer(&t),
        )
        .await;
    kv_error(&r, 404, "SecretNotFound", None);

    let route = "KV GET /deletedcertificates";
    let dl = format!("/deletedcertificates?{KV}");
    let v = srv
        .expect(srv.call(route, dl.clone()).bearer(&t), 200)
        .await;
    assert_eq!(
        v["value"][0]["recoveryId"],
        format!("{base}/deletedcertificates/web")
    );
    kv_refused(&srv, &stranger, route, &dl, None).await;

    let route = "KV GET /deletedcertificates/{name}";
    let dpath = format!("/deletedcertificates/web?{KV}");
    let v = srv
        .expect(srv.call(route, dpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["id"], id.as_str());
    assert!(v["deletedDate"].is_u64(), "{v}");
    kv_refused(&srv, &stranger, route, &dpath, None).await;

    let route = "KV POST /deletedcertificates/{name}/recover";
    let rcpath = format!("/deletedcertificates/web/recover?{KV}");
    kv_refused(&srv, &stranger, route, &rcpath, None).await;
    let v = srv
        .expect(srv.call(route, rcpath.clone()).bearer(&t), 200)
        .await;
    assert_eq!(v["id"], id.as_str());
    srv.expect(
        srv.call("KV GET /secrets/{name}", format!("/secrets/web?{KV}"))
            .bearer(&t),
        200,
    )
    .await;

    let route = "KV DELETE /deletedcertificates/{name}";
    srv.expect(
        srv.call("KV DELETE /certificates/{name}", cert_path.clone())
            .bearer(&t),
        200,
    )
    .await;
    kv_refused(&srv, &stranger, route, &dpath, None).await;
    srv.expect(srv.call(route, dpath.clone()).bearer(&t), 204)
        .await;

    let route = "KV POST /certificates/restore";
    let rs = format!("/certificates/restore?{KV}");
    let body = json!({"value": blob});
    kv_refused(&srv, &stranger, route, &rs, Some(&body)).await;
    let v = srv
        .expect(srv.call(route, rs.clone()).bearer(&t).json(&body), 200)
        .await;
    assert_eq!(v["id"], id.as_str());
    srv.expect(
        srv.call("KV GET /secrets/{name}", format!("/secrets/web?{KV}"))
            .bearer(&t),
        200,
    )
    .await;

    srv.finish(KV_CERTIFICATES, PUBLIC, NEVER_ACCEPTED);
}

/// ARM authorizes a conditional write as the write, before it looks at the conditions: a
/// reader sending `If-Match` is refused 403 for the write (not 412, whatever the ETag), and a
/// writer's stale `If-Match` gets 412.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_are_authorized_before_their_conditions() {
    let srv = Srv::start(ROUTES).await;
    let adm = admin(&srv).await;
    let reader = nobody(&srv, "etag-reader", ARM_SCOPE).await;
    put_group(&srv, &adm, "cond").await;
    let rgp = group(&srv, "cond");
    let reader_def = format!(
        "/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/acdd72a7-3385-48ef-bd42-f606fba81ae7",
        srv.sub
    );
    let ra = format!(
        "{rgp}/providers/Microsoft.Authorization/roleAssignments/{}?{AUTHZ}",
        uuid::Uuid::new_v4()
    );
    let body = json!({"properties": {"roleDefinitionId": reader_def, "principalId": reader.oid}});
    let route = "ARM PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{name}";
    srv.expect(srv.call(route, ra).bearer(&adm.token).json(&body), 201)
        .await;

    let get = "ARM GET /subscriptions/{sub}/resourceGroups/{rg}";
    let put = "ARM PUT /subscriptions/{sub}/resourceGroups/{rg}";
    let path = format!("{rgp}?{RES}");
    let r = srv
        .send(srv.call(get, path.clone()).bearer(&reader.token))
        .await;
    assert_eq!(r.status, 200, "the reader reads: {}", r.text);
    let current = r.header("etag").expect("an ETag").to_string();
    let tags = json!({"location": "local", "tags": {"k": "v"}});
    for etag in [current.as_str(), "\"stale\"", "*"] {
        let r = srv
            .send(
                srv.call(put, path.clone())
                    .bearer(&reader.token)
                    .header("if-match", etag)
                    .json(&tags),
            )
            .await;
        arm_forbidden(&r, &reader.oid);
        assert!(
            s(&r.body["error"]["message"]).contains("resourceGroups/write"),
            "refused for the write: {}",
            r.text
        );
    }
    let r = srv
        .send(
            srv.call(put, path.clone())
                .bearer(&adm.token)
                .header("if-match", "\"stale\"")
                .json(&tags),
        )
        .await;
    arm_error(&r, 412, "PreconditionFailed");
    let r = srv
        .send(
            srv.call(put, path)
                .bearer(&adm.token)
                .header("if-match", &current)
                .json(&tags),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}
