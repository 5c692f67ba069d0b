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

/// `Created` | `Assigned` | `Unassigned`, and (a Keyless addition) why MIC could not attach
/// the identity yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AssignedIdentityStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The last error of attaching the identity (ARM's code and message), cleared once
    /// `Assigned`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StatusError>,
    #[serde(
        rename = "availableReplicas",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub available_replicas: Option<i32>,
}

/// An error reported on an object's status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StatusError {
    pub code: String,
    pub message: String,
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

/// Reading the kinds field by field from untyped objects (`DynamicObject`): one object a typed
/// client could not read (an out-of-range integer an API server stored before the schema
/// bounded it) must stop neither a watch nor a controller; a field that is not read cannot
/// matter, and an unreadable `type` reads as -1, which is never served.
pub mod read {
    use keyless_core::mic::{AssignedState, Assignment, Existing, Key};
    use keyless_core::pod_identity as pi;
    use kube::api::DynamicObject;
    use serde_json::Value;

    fn str_at(v: &Value, field: &str) -> String {
        v[field].as_str().unwrap_or_default().to_string()
    }

    /// An AzureIdentity from its JSON (`metadata` + `spec`).
    fn identity_from(v: &Value) -> Option<pi::AzureIdentity> {
        let spec = &v["spec"];
        let type_ = match &spec["type"] {
            Value::Null => 0,
            t => t.as_i64().and_then(|t| i32::try_from(t).ok()).unwrap_or(-1),
        };
        let meta = &v["metadata"];
        Some(pi::AzureIdentity {
            namespace: meta["namespace"].as_str()?.to_string(),
            name: meta["name"].as_str()?.to_string(),
            type_,
            client_id: str_at(spec, "clientID"),
            resource_id: str_at(spec, "resourceID"),
            namespaced: meta["annotations"][super::BEHAVIOR_ANNOTATION]
                .as_str()
                .is_some_and(|b| b.eq_ignore_ascii_case("namespaced")),
        })
    }

    fn whole(o: &DynamicObject) -> Value {
        let mut v = o.data.clone();
        if let Value::Object(m) = &mut v {
            m.insert(
                "metadata".into(),
                serde_json::to_value(&o.metadata).unwrap_or_default(),
            );
        }
        v
    }

    /// A pod as the pod-identity rules read it (NMI's index, MIC, explanations): namespace,
    /// name and labels, `spec.nodeName`, `status.phase`, `spec.hostNetwork`, and every IP its
    /// status reports (`podIP`, then `podIPs`, each once) whatever the phase.
    pub fn pod(p: &k8s_openapi::api::core::v1::Pod) -> Option<keyless_core::pod_explain::PodFacts> {
        let st = p.status.as_ref();
        let mut ips: Vec<String> = vec![];
        let reported = st.and_then(|s| s.pod_ip.as_ref()).into_iter().chain(
            st.and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .map(|i| &i.ip),
        );
        for ip in reported {
            if !ips.contains(ip) {
                ips.push(ip.clone());
            }
        }
        let spec = p.spec.as_ref();
        Some(keyless_core::pod_explain::PodFacts {
            pod: pi::Pod {
                namespace: p.metadata.namespace.clone()?,
                name: p.metadata.name.clone()?,
                labels: p.metadata.labels.clone().unwrap_or_default(),
            },
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            phase: st.and_then(|s| s.phase.clone()).unwrap_or_default(),
            ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        })
    }

    pub fn identity(o: &DynamicObject) -> Option<pi::AzureIdentity> {
        identity_from(&whole(o))
    }

    pub fn binding(o: &DynamicObject) -> Option<pi::Binding> {
        Some(pi::Binding {
            namespace: o.metadata.namespace.clone()?,
            name: o.metadata.name.clone()?,
            azure_identity: str_at(&o.data["spec"], "azureIdentity"),
            selector: str_at(&o.data["spec"], "selector"),
        })
    }

    /// An exception: labels whose value is not a string are left out.
    pub fn exception(o: &DynamicObject) -> Option<pi::Exception> {
        let pod_labels = o.data["spec"]["podLabels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Some(pi::Exception {
            namespace: o.metadata.namespace.clone()?,
            name: o.metadata.name.clone()?,
            pod_labels,
        })
    }

    /// An `AzureAssignedIdentity`: its key, what it assigns, its state.
    pub fn assigned(o: &DynamicObject) -> Option<(Key, Existing)> {
        let key = (o.metadata.namespace.clone()?, o.metadata.name.clone()?);
        let spec = &o.data["spec"];
        let identity = identity_from(&spec["azureIdentityRef"]).unwrap_or_default();
        let b = &spec["azureBindingRef"]["metadata"];
        let status = &o.data["status"];
        let existing = Existing {
            assignment: Assignment {
                pod: str_at(spec, "pod"),
                pod_namespace: str_at(spec, "podNamespace"),
                node: str_at(spec, "nodename"),
                identity,
                binding: (str_at(b, "namespace"), str_at(b, "name")),
            },
            target: o
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(keyless_core::mic::TARGET_ANNOTATION))
                .cloned(),
            state: AssignedState::parse(status["status"].as_str()),
            error: status["error"]["code"]
                .as_str()
                .map(|c| (c.to_string(), str_at(&status["error"], "message"))),
        };
        Some((key, existing))
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
