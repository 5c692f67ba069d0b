//! The four `aadpodidentity.k8s.io/v1` kinds of aad-pod-identity, with the upstream field names
//! (`../shared/spec/pod-identity.md` §1.2), so manifests written for aad-pod-identity apply
//! unchanged. All four are namespaced.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const GROUP: &str = "aadpodidentity.k8s.io";
/// The pod label NMI matches against a binding's `selector`.
pub const BINDING_LABEL: &str = "aadpodidbinding";
/// Annotation that makes one AzureIdentity namespace-scoped (upstream `Behavior`).
pub const BEHAVIOR_ANNOTATION: &str = "aadpodidentity.k8s.io/Behavior";

fn preserve_unknown(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// A Kubernetes Secret reference (`clientPassword` of service-principal identities).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `AzureIdentity`: an identity pods may be bound to. `type` 0 is a user-assigned managed
/// identity (the only kind the AKS add-on writes); 1 and 2 are service principals.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentity",
    plural = "azureidentities",
    namespaced,
    status = "ReplicaStatus"
)]
pub struct AzureIdentitySpec {
    #[serde(rename = "type", default)]
    pub type_: i32,
    #[serde(
        rename = "resourceID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub resource_id: Option<String>,
    #[serde(rename = "clientID", default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(
        rename = "clientPassword",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub client_password: Option<SecretReference>,
    #[serde(rename = "tenantID", default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(
        rename = "auxiliaryTenantIDs",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auxiliary_tenant_ids: Option<Vec<String>>,
    #[serde(
        rename = "adEndpoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ad_endpoint: Option<String>,
    #[serde(
        rename = "adResourceID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ad_resource_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
}

/// The upstream status of every kind (`availableReplicas`, unused).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReplicaStatus {
    #[serde(
        rename = "availableReplicas",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub available_replicas: Option<i32>,
}

/// `AzureIdentityBinding`: pods whose `aadpodidbinding` label equals `selector` may use
/// `azureIdentity` (the name of an AzureIdentity).
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentityBinding",
    plural = "azureidentitybindings",
    namespaced,
    status = "ReplicaStatus"
)]
pub struct AzureIdentityBindingSpec {
    #[serde(rename = "azureIdentity", default)]
    pub azure_identity: String,
    #[serde(default)]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

/// `AzureAssignedIdentity`: written by MIC in standard mode (one per pod × identity); kept for
/// manifest compatibility. The embedded identity and binding are whole objects.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureAssignedIdentity",
    plural = "azureassignedidentities",
    namespaced,
    status = "AssignedIdentityStatus"
)]
pub struct AzureAssignedIdentitySpec {
    #[serde(
        rename = "azureIdentityRef",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "preserve_unknown")]
    pub azure_identity_ref: Option<serde_json::Value>,
    #[serde(
        rename = "azureBindingRef",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "preserve_unknown")]
    pub azure_binding_ref: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(
        rename = "podNamespace",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
}

/// `Created` | `Assigned` | `Unassigned`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AssignedIdentityStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(
        rename = "availableReplicas",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub available_replicas: Option<i32>,
}

/// `AzurePodIdentityException`: pods in this namespace carrying any one of `podLabels` (value
/// compared case-insensitively) are not intercepted; they get what the node's IMDS answers.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzurePodIdentityException",
    plural = "azurepodidentityexceptions",
    namespaced,
    status = "ReplicaStatus"
)]
pub struct AzurePodIdentityExceptionSpec {
    #[serde(rename = "podLabels", default)]
    pub pod_labels: BTreeMap<String, String>,
}

/// The four CRDs, ready to apply. `*.k8s.io` groups are protected, so each carries
/// `api-approved.kubernetes.io: unapproved` as the upstream manifests do.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut all = vec![
        AzureIdentity::crd(),
        AzureIdentityBinding::crd(),
        AzureAssignedIdentity::crd(),
        AzurePodIdentityException::crd(),
    ];
    for c in &mut all {
        for v in &mut c.spec.versions {
            if let Some(schema) = v
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                strip_empty_defaults(schema);
                bound_integers(schema, "");
            }
        }
        c.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                "api-approved.kubernetes.io".to_string(),
                "unapproved".to_string(),
            );
    }
    all
}

/// Kubernetes 1.20 reads a `default: ""` as null and refuses the CRD ("must be of type
/// string"); an empty default adds nothing, so drop it.
fn strip_empty_defaults(
    schema: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
) {
    if matches!(&schema.default, Some(d) if d.0 == serde_json::json!("")) {
        schema.default = None;
    }
    for p in schema.properties.iter_mut().flat_map(|m| m.values_mut()) {
        strip_empty_defaults(p);
    }
}

/// Bound every integer the API server would otherwise take at any size: 1.20 ignores
/// `format: int32`, so `replicas: 5000000000` is stored and then fails every typed list of the
/// kind (NMI's watches, the add-on). `type` is 0..=2 (upstream's three identity kinds), the
/// int32 fields (`replicas`, `weight`, `availableReplicas`) are int32.
fn bound_integers(
    schema: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
    name: &str,
) {
    if schema.type_.as_deref() == Some("integer") {
        let (min, max) = if name == "type" {
            (0.0, 2.0)
        } else {
            (f64::from(i32::MIN), f64::from(i32::MAX))
        };
        schema.minimum = Some(min);
        schema.maximum = Some(max);
    }
    for (n, p) in schema.properties.iter_mut().flat_map(|m| m.iter_mut()) {
        bound_integers(p, n);
    }
}

/// The CRDs as one `v1/List` JSON document (`kubectl apply -f -` takes it).
pub fn crds_manifest() -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": crds()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_use_the_upstream_names_and_the_approval_annotation() {
        let all = crds();
        let names: Vec<_> = all
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "azureidentities.aadpodidentity.k8s.io",
                "azureidentitybindings.aadpodidentity.k8s.io",
                "azureassignedidentities.aadpodidentity.k8s.io",
                "azurepodidentityexceptions.aadpodidentity.k8s.io"
            ]
        );
        for c in &all {
            assert_eq!(c.spec.scope, "Namespaced");
            assert_eq!(
                c.metadata.annotations.as_ref().unwrap()["api-approved.kubernetes.io"],
                "unapproved"
            );
        }
        let id: AzureIdentity = serde_json::from_value(serde_json::json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": "a", "namespace": "n"},
            "spec": {"type": 0, "resourceID": "/subscriptions/s/x", "clientID": "c"}
        }))
        .unwrap();
        assert_eq!(id.spec.client_id.as_deref(), Some("c"));
        let back = serde_json::to_value(&id.spec).unwrap();
        assert_eq!(back["resourceID"], "/subscriptions/s/x");
        assert_eq!(back["type"], 0);
    }

    #[test]
    fn integers_are_bounded_in_the_schema() {
        let all = serde_json::to_value(crds()).unwrap();
        let props = |i: usize, path: &[&str]| {
            let mut v = &all[i]["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            for p in path {
                v = &v["properties"][p];
            }
            v.clone()
        };
        let t = props(0, &["spec", "type"]);
        assert_eq!(
            (t["minimum"].as_f64(), t["maximum"].as_f64()),
            (Some(0.0), Some(2.0))
        );
        for (i, path) in [
            (0, ["spec", "replicas"]),
            (0, ["status", "availableReplicas"]),
            (1, ["spec", "weight"]),
            (1, ["status", "availableReplicas"]),
            (2, ["spec", "replicas"]),
        ] {
            let v = props(i, &path);
            assert_eq!(v["maximum"].as_f64(), Some(2147483647.0), "{path:?}");
            assert_eq!(v["minimum"].as_f64(), Some(-2147483648.0), "{path:?}");
        }
    }
}
