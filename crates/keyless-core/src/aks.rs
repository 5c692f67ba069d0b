//! Managed clusters (seed 000): the rules of `podIdentityProfile` (names, selectors, limits,
//! kubenet), the agent pools, and the names of what a cluster owns (node resource group,
//! pool scale sets, kubelet identity). Pure: the server looks identities up and writes.

use crate::resource_id::{ResourceId, UAMI};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Pod identities per cluster (AKS limit).
pub const MAX_POD_IDENTITIES: usize = 200;
/// Pod identity exceptions per cluster (AKS limit).
pub const MAX_POD_IDENTITY_EXCEPTIONS: usize = 200;
/// Agent pools per cluster (AKS limit).
pub const MAX_AGENT_POOLS: usize = 100;
/// Nodes per pool (AKS limit).
pub const MAX_POOL_COUNT: u64 = 1000;
/// The suffix the add-on gives an `AzureIdentityBinding` (`<name>-binding`).
pub const BINDING_SUFFIX: &str = "-binding";
/// The `AzurePodIdentityException` the add-on writes for its own pods; reserved in
/// [`RESERVED_EXCEPTION_NAMESPACE`], where a profile entry of that name would fight the add-on.
pub const RESERVED_EXCEPTION_NAME: &str = "aks-addon-exception";
/// The namespace of [`RESERVED_EXCEPTION_NAME`].
pub const RESERVED_EXCEPTION_NAMESPACE: &str = "kube-system";
/// Entries in one `reportPodIdentityStatus` (a profile holds at most [`MAX_POD_IDENTITIES`]).
pub const MAX_STATUS_REPORT_ENTRIES: usize = MAX_POD_IDENTITIES;
/// Longest `error.code` of a status report entry.
pub const MAX_STATUS_ERROR_CODE: usize = 128;
/// Longest `error.message` of a status report entry.
pub const MAX_STATUS_ERROR_MESSAGE: usize = 1024;
/// Kubernetes version shown when a create names none.
pub const DEFAULT_KUBERNETES_VERSION: &str = "1.33.0";
/// VM size of a pool that names none.
pub const DEFAULT_VM_SIZE: &str = "Standard_DS2_v2";

/// What kind of refusal an [`AksError`] is; the server maps each to one ARM error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AksErrorKind {
    /// A field's value is invalid (400 `InvalidParameter`, with its target).
    InvalidParameter,
    /// A rule of the add-on that the request breaks as a whole (400 `BadRequest`), e.g. pod
    /// identity on kubenet without `allowNetworkPluginKubenet`.
    BadRequest,
    /// A property fixed at creation changed (400 `PropertyChangeNotAllowed`).
    PropertyChangeNotAllowed,
    /// An action that needs the cluster's OIDC issuer while it is off (400
    /// `OIDCIssuerNotEnabled`; the add-on idles on it until the issuer is enabled).
    OidcIssuerNotEnabled,
    /// A kubelet-identity publish whose proof of the API server does not verify: not signed by
    /// a key it may be signed by, or another issuer, audience, subject or time (403
    /// `PublishProofRejected`).
    PublishProofRejected,
}

/// A refusal of a managed-cluster write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AksError {
    pub kind: AksErrorKind,
    pub message: String,
    /// The JSON path of the offending field, as ARM's `target`.
    pub target: Option<String>,
}

impl AksError {
    pub fn invalid(message: impl Into<String>, target: impl Into<String>) -> Self {
        AksError {
            kind: AksErrorKind::InvalidParameter,
            message: message.into(),
            target: Some(target.into()),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        AksError {
            kind: AksErrorKind::BadRequest,
            message: message.into(),
            target: None,
        }
    }
    pub fn issuer_not_enabled(cluster: &str) -> Self {
        AksError {
            kind: AksErrorKind::OidcIssuerNotEnabled,
            message: format!(
                "The OIDC issuer of the managed cluster '{cluster}' is not enabled: enable it first (oidcIssuerProfile.enabled, az aks update --enable-oidc-issuer)."
            ),
            target: None,
        }
    }
    pub fn proof_rejected(message: impl Into<String>) -> Self {
        AksError {
            kind: AksErrorKind::PublishProofRejected,
            message: message.into(),
            target: Some("proof".into()),
        }
    }
    pub fn change_not_allowed(property: &str) -> Self {
        AksError {
            kind: AksErrorKind::PropertyChangeNotAllowed,
            message: format!("Changing property '{property}' is not allowed."),
            target: Some(property.to_string()),
        }
    }
}

type R<T> = Result<T, AksError>;

// ---------------------------------------------------------------- names

fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// An RFC 1123 DNS label (Kubernetes `IsDNS1123Label`): 1–63 of lowercase letters, digits and
/// `-`, starting and ending with a letter or digit.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && alnum(b[0])
        && alnum(b[b.len() - 1])
}

/// An RFC 1123 DNS subdomain (Kubernetes `IsDNS1123Subdomain`): at most 253 characters,
/// dot-separated labels of lowercase letters, digits and `-`, each starting and ending with a
/// letter or digit.
pub fn is_dns_subdomain(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && alnum(b[0])
                && alnum(b[b.len() - 1])
        })
}

/// A Kubernetes label value: empty, or at most 63 of letters, digits, `-`, `_`, `.`, starting
/// and ending with a letter or digit.
pub fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.is_empty()
        || (b.len() <= 63
            && b.iter().all(|&c| alnum(c) || b"-_.".contains(&c))
            && alnum(b[0])
            && alnum(b[b.len() - 1]))
}

/// A Kubernetes label key: `[prefix/]name`, the prefix a DNS subdomain, the name a non-empty
/// label value.
pub fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

/// Managed cluster names: 1–63 of letters, digits, `-` and `_`, starting and ending with a
/// letter or digit.
pub fn validate_cluster_name(name: &str) -> R<()> {
    let b = name.as_bytes();
    if (1..=63).contains(&b.len())
        && b.iter().all(|&c| alnum(c) || c == b'-' || c == b'_')
        && alnum(b[0])
        && alnum(b[b.len() - 1])
    {
        Ok(())
    } else {
        Err(AksError::invalid(
            format!("The managed cluster name '{name}' is invalid. It may contain 1 to 63 letters, numbers, underscores and hyphens, and must start and end with a letter or number."),
            "name",
        ))
    }
}

/// Agent pool names (Linux): a lowercase letter, then up to 11 lowercase letters or digits.
pub fn is_pool_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=12).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// `dnsPrefix`: 1–54 of letters, digits and `-`, starting and ending with a letter or digit.
pub fn is_dns_prefix(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=54).contains(&b.len())
        && b.iter().all(|&c| alnum(c) || c == b'-')
        && alnum(b[0])
        && alnum(b[b.len() - 1])
}

/// The `dnsPrefix` az computes when none is given: `{name[..10]}-{group[..16]}-{sub[..6]}`,
/// keeping letters, digits and `-`, and starting with a letter.
pub fn default_dns_prefix(cluster: &str, group: &str, subscription: &str) -> String {
    let clean = |s: &str, n: usize| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(n)
            .collect()
    };
    let mut name = clean(cluster, 10);
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name = format!("a{name}").chars().take(10).collect();
    }
    let sub: String = subscription.chars().take(6).collect();
    format!("{name}-{}-{sub}", clean(group, 16))
}

/// The default node resource group: `MC_{group}_{cluster}_{location}` (cut to 80 characters,
/// as AKS does).
pub fn node_resource_group(group: &str, cluster: &str, location: &str) -> String {
    format!("MC_{group}_{cluster}_{location}")
        .chars()
        .take(80)
        .collect()
}

/// The scale set of a pool: `aks-{pool}-{suffix}-vmss` (the suffix is 8 digits, one per cluster).
pub fn scale_set_name(pool: &str, suffix: &str) -> String {
    format!("aks-{pool}-{suffix}-vmss")
}

/// The kubelet identity's name: `{cluster}-agentpool`, in the node resource group.
pub fn kubelet_identity_name(cluster: &str) -> String {
    format!("{cluster}-agentpool")
}

// ---------------------------------------------------------------- network plugin

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkPlugin {
    Azure,
    Kubenet,
    None,
}

impl NetworkPlugin {
    /// The plugin of `networkProfile.networkPlugin` (case-insensitive). Absent means `azure`:
    /// AKS's default for new clusters (Azure CNI); AKS once defaulted to kubenet.
    pub fn parse(v: Option<&Value>) -> R<Self> {
        const T: &str = "properties.networkProfile.networkPlugin";
        match v {
            None | Some(Value::Null) => Ok(NetworkPlugin::Azure),
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "azure" => Ok(NetworkPlugin::Azure),
                "kubenet" => Ok(NetworkPlugin::Kubenet),
                "none" => Ok(NetworkPlugin::None),
                _ => Err(AksError::invalid(
                    format!("The network plugin '{s}' is invalid. Allowed values are 'azure', 'kubenet' and 'none'."),
                    T,
                )),
            },
            Some(_) => Err(AksError::invalid("networkPlugin must be a string.", T)),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NetworkPlugin::Azure => "azure",
            NetworkPlugin::Kubenet => "kubenet",
            NetworkPlugin::None => "none",
        }
    }
}

// ---------------------------------------------------------------- pod identity profile

/// `provisioningState` of a pod identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodIdentityState {
    /// Written; the in-cluster add-on has not reported it yet.
    Updating,
    /// The add-on created its objects.
    Assigned,
    /// The add-on could not create its objects (`provisioningInfo` says why).
    Failed,
}

impl PodIdentityState {
    pub fn as_str(self) -> &'static str {
        match self {
            PodIdentityState::Updating => "Updating",
            PodIdentityState::Assigned => "Assigned",
            PodIdentityState::Failed => "Failed",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "updating" => Some(Self::Updating),
            "assigned" => Some(Self::Assigned),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// `provisioningInfo.error.error` of a failed pod identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisioningError {
    pub code: String,
    pub message: String,
}

/// One `userAssignedIdentities[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub name: String,
    pub namespace: String,
    /// As given (`None` when absent or empty: the name is the selector).
    pub binding_selector: Option<String>,
    pub resource_id: String,
    pub client_id: Option<String>,
    pub object_id: Option<String>,
    /// Read-only: ignored in requests, carried or set by the server.
    pub state: Option<PodIdentityState>,
    pub error: Option<ProvisioningError>,
}

impl PodIdentity {
    /// The value of the `aadpodidbinding` label that selects this identity.
    pub fn selector(&self) -> &str {
        self.binding_selector.as_deref().unwrap_or(&self.name)
    }
}

/// One `userAssignedIdentityExceptions[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentityException {
    pub name: String,
    pub namespace: String,
    pub pod_labels: BTreeMap<String, String>,
}

/// `properties.podIdentityProfile`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodIdentityProfile {
    pub enabled: bool,
    pub allow_network_plugin_kubenet: bool,
    pub identities: Vec<PodIdentity>,
    pub exceptions: Vec<PodIdentityException>,
}

const PROFILE: &str = "properties.podIdentityProfile";

fn opt_str(v: &Value, key: &str, target: &str) -> R<Option<String>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(AksError::invalid(
            format!("{target}.{key} must be a string."),
            format!("{target}.{key}"),
        )),
    }
}

fn req_str(v: &Value, key: &str, target: &str) -> R<String> {
    opt_str(v, key, target)?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            AksError::invalid(
                format!("{target}.{key} is required."),
                format!("{target}.{key}"),
            )
        })
}

fn opt_bool(v: &Value, key: &str, target: &str) -> R<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(AksError::invalid(
            format!("{target}.{key} must be a boolean."),
            format!("{target}.{key}"),
        )),
    }
}

fn opt_array<'a>(v: &'a Value, key: &str, target: &str) -> R<&'a [Value]> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(AksError::invalid(
            format!("{target}.{key} must be an array."),
            format!("{target}.{key}"),
        )),
    }
}

impl PodIdentityProfile {
    /// Parse a request's (or the stored) profile. Shapes only; [`Self::validate`] checks the
    /// rules. Read-only fields (`provisioningState`, `provisioningInfo`) are read too, so the
    /// stored form parses back; the server drops them from requests.
    pub fn parse(v: &Value) -> R<Self> {
        if !v.is_object() {
            return Err(AksError::invalid(
                "podIdentityProfile must be an object.",
                PROFILE,
            ));
        }
        let mut p = PodIdentityProfile {
            enabled: opt_bool(v, "enabled", PROFILE)?,
            allow_network_plugin_kubenet: opt_bool(v, "allowNetworkPluginKubenet", PROFILE)?,
            ..Default::default()
        };
        let ids = opt_array(v, "userAssignedIdentities", PROFILE)?;
        let exs = opt_array(v, "userAssignedIdentityExceptions", PROFILE)?;
        // the limits first: nothing else of an oversized list matters
        if ids.len() > MAX_POD_IDENTITIES {
            return Err(AksError::invalid(
                format!(
                    "A cluster can have at most {MAX_POD_IDENTITIES} pod identities; the request has {}.",
                    ids.len()
                ),
                format!("{PROFILE}.userAssignedIdentities"),
            ));
        }
        if exs.len() > MAX_POD_IDENTITY_EXCEPTIONS {
            return Err(AksError::invalid(
                format!(
                    "A cluster can have at most {MAX_POD_IDENTITY_EXCEPTIONS} pod identity exceptions; the request has {}.",
                    exs.len()
                ),
                format!("{PROFILE}.userAssignedIdentityExceptions"),
            ));
        }
        for (i, e) in ids.iter().enumerate() {
            let t = format!("{PROFILE}.userAssignedIdentities[{i}]");
            if !e.is_object() {
                return Err(AksError::invalid(format!("{t} must be an object."), t));
            }
            let ident = e.get("identity").filter(|v| v.is_object()).ok_or_else(|| {
                AksError::invalid(
                    format!("{t}.identity is required."),
                    format!("{t}.identity"),
                )
            })?;
            let it = format!("{t}.identity");
            let state = opt_str(e, "provisioningState", &t)?
                .as_deref()
                .and_then(PodIdentityState::parse);
            let error = e
                .pointer("/provisioningInfo/error/error")
                .filter(|v| v.is_object())
                .map(|er| ProvisioningError {
                    code: er["code"].as_str().unwrap_or_default().to_string(),
                    message: er["message"].as_str().unwrap_or_default().to_string(),
                });
            p.identities.push(PodIdentity {
                name: req_str(e, "name", &t)?,
                namespace: req_str(e, "namespace", &t)?,
                binding_selector: opt_str(e, "bindingSelector", &t)?.filter(|s| !s.is_empty()),
                resource_id: req_str(ident, "resourceId", &it)?,
                client_id: opt_str(ident, "clientId", &it)?.filter(|s| !s.is_empty()),
                object_id: opt_str(ident, "objectId", &it)?.filter(|s| !s.is_empty()),
                state,
                error,
            });
        }
        for (i, e) in exs.iter().enumerate() {
            let t = format!("{PROFILE}.userAssignedIdentityExceptions[{i}]");
            if !e.is_object() {
                return Err(AksError::invalid(format!("{t} must be an object."), t));
            }
            let labels = match e.get("podLabels") {
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => Ok((k.clone(), s.clone())),
                        _ => Err(AksError::invalid(
                            format!("{t}.podLabels['{k}'] must be a string."),
                            format!("{t}.podLabels"),
                        )),
                    })
                    .collect::<R<BTreeMap<_, _>>>()?,
                None | Some(Value::Null) => BTreeMap::new(),
                Some(_) => {
                    return Err(AksError::invalid(
                        format!("{t}.podLabels must be an object."),
                        format!("{t}.podLabels"),
                    ))
                }
            };
            p.exceptions.push(PodIdentityException {
                name: req_str(e, "name", &t)?,
                namespace: req_str(e, "namespace", &t)?,
                pod_labels: labels,
            });
        }
        Ok(p)
    }

    /// The rules of the add-on, on the whole profile, for a cluster with `plugin`.
    pub fn validate(&self, plugin: NetworkPlugin) -> R<()> {
        if !self.enabled && (!self.identities.is_empty() || !self.exceptions.is_empty()) {
            return Err(AksError::invalid(
                "Pod identities and pod identity exceptions need podIdentityProfile.enabled to be true.",
                format!("{PROFILE}.enabled"),
            ));
        }
        if self.enabled && plugin == NetworkPlugin::Kubenet && !self.allow_network_plugin_kubenet {
            return Err(AksError::bad_request(
                "Network plugin kubenet is not supported to use with PodIdentity addon: pods on kubenet can spoof each other's IP address (CVE-2021-1677). Set podIdentityProfile.allowNetworkPluginKubenet to true (az aks: --enable-pod-identity-with-kubenet) to run it anyway.",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.identities.iter().enumerate() {
            let t = format!("{PROFILE}.userAssignedIdentities[{i}]");
            check_object_name(&p.name, &format!("{t}.name"), "pod identity name")?;
            check_namespace(&p.namespace, &format!("{t}.namespace"))?;
            if !is_label_value(p.selector()) {
                let (msg, target) = match &p.binding_selector {
                    Some(s) => (
                        format!("The binding selector '{s}' is not a valid label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit."),
                        format!("{t}.bindingSelector"),
                    ),
                    None => (
                        format!("The pod identity name '{}' is its binding selector when bindingSelector is not set, and is not a valid label value (at most 63 characters); set bindingSelector.", p.name),
                        format!("{t}.bindingSelector"),
                    ),
                };
                return Err(AksError::invalid(msg, target));
            }
            if !ResourceId::parse(&p.resource_id).is_ok_and(|r| r.is_type(UAMI)) {
                return Err(AksError::invalid(
                    format!(
                        "'{}' is not a user-assigned identity resource id.",
                        p.resource_id
                    ),
                    format!("{t}.identity.resourceId"),
                ));
            }
            if !seen.insert((p.namespace.as_str(), p.name.as_str())) {
                return Err(AksError::invalid(
                    format!(
                        "The pod identity {}/{} appears more than once; a name can be used once per namespace.",
                        p.namespace, p.name
                    ),
                    format!("{t}.name"),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, e) in self.exceptions.iter().enumerate() {
            let t = format!("{PROFILE}.userAssignedIdentityExceptions[{i}]");
            check_object_name(&e.name, &format!("{t}.name"), "pod identity exception name")?;
            check_namespace(&e.namespace, &format!("{t}.namespace"))?;
            if e.name == RESERVED_EXCEPTION_NAME && e.namespace == RESERVED_EXCEPTION_NAMESPACE {
                return Err(AksError::invalid(
                    format!("The pod identity exception name '{RESERVED_EXCEPTION_NAME}' is reserved in namespace '{RESERVED_EXCEPTION_NAMESPACE}': the pod identity add-on writes its own exception there. Choose another name."),
                    format!("{t}.name"),
                ));
            }
            if e.pod_labels.is_empty() {
                return Err(AksError::invalid(
                    format!("{t}.podLabels needs at least one label."),
                    format!("{t}.podLabels"),
                ));
            }
            for (k, v) in &e.pod_labels {
                if !is_label_key(k) {
                    return Err(AksError::invalid(
                        format!("The pod label key '{k}' is invalid: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit."),
                        format!("{t}.podLabels"),
                    ));
                }
                if !is_label_value(v) {
                    return Err(AksError::invalid(
                        format!("The value '{v}' of pod label '{k}' is not a valid label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit."),
                        format!("{t}.podLabels"),
                    ));
                }
            }
            if !seen.insert((e.namespace.as_str(), e.name.as_str())) {
                return Err(AksError::invalid(
                    format!(
                        "The pod identity exception {}/{} appears more than once.",
                        e.namespace, e.name
                    ),
                    format!("{t}.name"),
                ));
            }
        }
        Ok(())
    }

    /// Give each entry its state after a write: an entry with the same name, namespace,
    /// identity and selector as before keeps the state the add-on reported; a new or changed
    /// one is `Updating` until the add-on reports it.
    pub fn carry_states(&mut self, old: Option<&PodIdentityProfile>) {
        for p in &mut self.identities {
            let prev = old.and_then(|o| {
                o.identities
                    .iter()
                    .find(|q| q.name == p.name && q.namespace == p.namespace)
            });
            match prev {
                Some(q)
                    if q.resource_id.eq_ignore_ascii_case(&p.resource_id)
                        && q.selector() == p.selector() =>
                {
                    p.state = q.state.or(Some(PodIdentityState::Updating));
                    p.error = q.error.clone();
                }
                _ => {
                    p.state = Some(PodIdentityState::Updating);
                    p.error = None;
                }
            }
        }
    }

    /// Apply the add-on's report to the matching entries (by name and namespace); unknown
    /// entries are ignored. Returns whether anything changed.
    pub fn apply_report(&mut self, report: &[StatusReport]) -> bool {
        let mut changed = false;
        for r in report {
            if let Some(p) = self
                .identities
                .iter_mut()
                .find(|p| p.name == r.name && p.namespace == r.namespace)
            {
                let error = match r.state {
                    PodIdentityState::Failed => {
                        Some(r.error.clone().unwrap_or(ProvisioningError {
                            code: "Failed".into(),
                            message: String::new(),
                        }))
                    }
                    _ => None,
                };
                if p.state != Some(r.state) || p.error != error {
                    p.state = Some(r.state);
                    p.error = error;
                    changed = true;
                }
            }
        }
        changed
    }

    /// The profile as ARM shows it (and as it is stored).
    pub fn to_json(&self) -> Value {
        let ids: Vec<Value> = self
            .identities
            .iter()
            .map(|p| {
                let mut e = json!({
                    "name": p.name,
                    "namespace": p.namespace,
                    "identity": {
                        "resourceId": p.resource_id,
                        "clientId": p.client_id,
                        "objectId": p.object_id,
                    },
                    "provisioningState": p.state.unwrap_or(PodIdentityState::Updating).as_str(),
                });
                if let Some(s) = &p.binding_selector {
                    e["bindingSelector"] = json!(s);
                }
                if let Some(er) = &p.error {
                    e["provisioningInfo"] =
                        json!({"error": {"error": {"code": er.code, "message": er.message}}});
                }
                e
            })
            .collect();
        let exs: Vec<Value> = self
            .exceptions
            .iter()
            .map(|e| json!({"name": e.name, "namespace": e.namespace, "podLabels": e.pod_labels}))
            .collect();
        json!({
            "enabled": self.enabled,
            "allowNetworkPluginKubenet": self.allow_network_plugin_kubenet,
            "userAssignedIdentities": ids,
            "userAssignedIdentityExceptions": exs,
        })
    }
}

/// A pod identity's name becomes the `AzureIdentity` name and, with [`BINDING_SUFFIX`], the
/// `AzureIdentityBinding` name: both must be DNS subdomains.
fn check_object_name(name: &str, target: &str, what: &str) -> R<()> {
    if is_dns_subdomain(name) && name.len() + BINDING_SUFFIX.len() <= 253 {
        Ok(())
    } else {
        Err(AksError::invalid(
            format!("The {what} '{name}' is invalid: it must be a DNS subdomain name as defined in RFC 1123 (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most {} characters).", 253 - BINDING_SUFFIX.len()),
            target,
        ))
    }
}

fn check_namespace(ns: &str, target: &str) -> R<()> {
    if is_dns_label(ns) {
        Ok(())
    } else {
        Err(AksError::invalid(
            format!("The namespace '{ns}' is invalid: it must be a DNS label as defined in RFC 1123 (at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit)."),
            target,
        ))
    }
}

/// Whether `given` (a client or object id sent with a pod identity) is absent or names the
/// identity's `actual` id.
pub fn check_identity_id(given: Option<&str>, actual: &str, index: usize, field: &str) -> R<()> {
    match given {
        Some(g) if !g.eq_ignore_ascii_case(actual) => Err(AksError::invalid(
            // the actual id is not echoed: the caller may not be allowed to read the identity
            format!("The {field} '{g}' does not belong to the identity of pod identity {index}; omit it, or give the identity's current {field}."),
            format!("{PROFILE}.userAssignedIdentities[{index}].identity.{field}"),
        )),
        _ => Ok(()),
    }
}

/// One entry of the add-on's `reportPodIdentityStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub name: String,
    pub namespace: String,
    pub state: PodIdentityState,
    pub error: Option<ProvisioningError>,
}

/// Parse `{"userAssignedIdentities": [{name, namespace, provisioningState, error?}]}`.
pub fn parse_status_report(v: &Value) -> R<Vec<StatusReport>> {
    const T: &str = "userAssignedIdentities";
    let list = match v.get(T) {
        Some(Value::Array(a)) => a,
        _ => {
            return Err(AksError::invalid(
                "userAssignedIdentities must be an array.",
                T,
            ))
        }
    };
    if list.len() > MAX_STATUS_REPORT_ENTRIES {
        return Err(AksError::invalid(
            format!(
                "A status report can have at most {MAX_STATUS_REPORT_ENTRIES} entries; it has {}.",
                list.len()
            ),
            T,
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            let t = format!("{T}[{i}]");
            let state = req_str(e, "provisioningState", &t)?;
            let state = match PodIdentityState::parse(&state) {
                Some(s @ (PodIdentityState::Assigned | PodIdentityState::Failed)) => s,
                _ => {
                    return Err(AksError::invalid(
                        format!("provisioningState '{state}' is invalid: 'Assigned' or 'Failed'."),
                        format!("{t}.provisioningState"),
                    ))
                }
            };
            let error = match e.get("error") {
                Some(er) if er.is_object() => {
                    let et = format!("{t}.error");
                    let capped = |key: &str, max: usize| -> R<String> {
                        let v = opt_str(er, key, &et)?.unwrap_or_default();
                        if v.chars().count() > max {
                            return Err(AksError::invalid(
                                format!("{et}.{key} is longer than {max} characters."),
                                format!("{et}.{key}"),
                            ));
                        }
                        Ok(v)
                    };
                    Some(ProvisioningError {
                        code: capped("code", MAX_STATUS_ERROR_CODE)?,
                        message: capped("message", MAX_STATUS_ERROR_MESSAGE)?,
                    })
                }
                None | Some(Value::Null) => None,
                Some(_) => {
                    return Err(AksError::invalid(
                        "error must be an object.",
                        format!("{t}.error"),
                    ))
                }
            };
            Ok(StatusReport {
                name: req_str(e, "name", &t)?,
                namespace: req_str(e, "namespace", &t)?,
                state,
                error,
            })
        })
        .collect()
}

// ---------------------------------------------------------------- agent pools

/// One `agentPoolProfiles[]` entry: the fields Keyless acts on, and the rest as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentPool {
    pub name: String,
    pub count: u64,
    pub vm_size: String,
    pub mode: String,
    /// The entry as sent, without read-only fields.
    pub body: Map<String, Value>,
}

const POOLS: &str = "properties.agentPoolProfiles";

/// Parse and check `agentPoolProfiles`: at least one pool, unique valid names, Linux scale-set
/// pools only, counts within limits, and one `System` pool (the first pool without a mode
/// becomes the System pool when none is named).
pub fn parse_agent_pools(v: &Value) -> R<Vec<AgentPool>> {
    let list = v
        .as_array()
        .ok_or_else(|| AksError::invalid("agentPoolProfiles must be an array.", POOLS))?;
    if list.is_empty() {
        return Err(AksError::invalid(
            "A managed cluster needs at least one agent pool.",
            POOLS,
        ));
    }
    if list.len() > MAX_AGENT_POOLS {
        return Err(AksError::invalid(
            format!("A managed cluster can have at most {MAX_AGENT_POOLS} agent pools."),
            POOLS,
        ));
    }
    let mut pools: Vec<AgentPool> = vec![];
    let mut modes: Vec<Option<String>> = vec![];
    for (i, e) in list.iter().enumerate() {
        let t = format!("{POOLS}[{i}]");
        let mut body = e
            .as_object()
            .cloned()
            .ok_or_else(|| AksError::invalid(format!("{t} must be an object."), t.clone()))?;
        let name = req_str(e, "name", &t)?;
        if !is_pool_name(&name) {
            return Err(AksError::invalid(
                format!("The agent pool name '{name}' is invalid: a lowercase letter, then up to 11 lowercase letters or digits."),
                format!("{t}.name"),
            ));
        }
        if pools.iter().any(|p| p.name == name) {
            return Err(AksError::invalid(
                format!("The agent pool name '{name}' is used more than once."),
                format!("{t}.name"),
            ));
        }
        let count = match e.get("count") {
            None | Some(Value::Null) => 1,
            Some(c) => c.as_u64().filter(|c| *c <= MAX_POOL_COUNT).ok_or_else(|| {
                AksError::invalid(
                    format!("{t}.count must be an integer between 0 and {MAX_POOL_COUNT}."),
                    format!("{t}.count"),
                )
            })?,
        };
        if let Some(os) = opt_str(e, "osType", &t)? {
            if !os.eq_ignore_ascii_case("Linux") {
                return Err(AksError::invalid(
                    format!("The OS type '{os}' is not supported: Keyless node pools are Linux (pod identity runs on Linux pools only)."),
                    format!("{t}.osType"),
                ));
            }
        }
        if let Some(ty) = opt_str(e, "type", &t)? {
            if !ty.eq_ignore_ascii_case("VirtualMachineScaleSets") {
                return Err(AksError::invalid(
                    format!("The agent pool type '{ty}' is not supported: only VirtualMachineScaleSets."),
                    format!("{t}.type"),
                ));
            }
        }
        let mode = match opt_str(e, "mode", &t)? {
            None => None,
            Some(m) if m.eq_ignore_ascii_case("System") => Some("System".to_string()),
            Some(m) if m.eq_ignore_ascii_case("User") => Some("User".to_string()),
            Some(m) => {
                return Err(AksError::invalid(
                    format!("The agent pool mode '{m}' is invalid: 'System' or 'User'."),
                    format!("{t}.mode"),
                ))
            }
        };
        let vm_size = opt_str(e, "vmSize", &t)?.unwrap_or_else(|| DEFAULT_VM_SIZE.to_string());
        for read_only in [
            "provisioningState",
            "powerState",
            "nodeImageVersion",
            "currentOrchestratorVersion",
        ] {
            body.remove(read_only);
        }
        modes.push(mode);
        pools.push(AgentPool {
            name,
            count,
            vm_size,
            mode: String::new(),
            body,
        });
    }
    let has_system = modes.iter().any(|m| m.as_deref() == Some("System"));
    let first_unset = modes.iter().position(Option::is_none);
    if !has_system && first_unset.is_none() {
        return Err(AksError::invalid(
            "A managed cluster needs at least one agent pool in System mode.",
            POOLS,
        ));
    }
    for (i, (p, m)) in pools.iter_mut().zip(modes).enumerate() {
        p.mode = m.unwrap_or_else(|| {
            if !has_system && Some(i) == first_unset {
                "System".into()
            } else {
                "User".into()
            }
        });
    }
    Ok(pools)
}

// ---------------------------------------------------------------- OIDC issuer and workload identity (issue 15)

/// Keys one `publishServiceAccountKeys` may carry (Entra considers only an issuer's first 100).
pub const MAX_PUBLISHED_KEYS: usize = 100;
/// Largest `publishServiceAccountKeys` body.
pub const MAX_PUBLISH_BODY: usize = 64 * 1024;
/// SANs of one webhook serving certificate.
pub const MAX_WEBHOOK_SANS: usize = 20;
/// Webhook serving certificate validity when the request names none (7 days).
pub const DEFAULT_WEBHOOK_VALIDITY: u64 = 7 * 86_400;
/// Shortest webhook serving certificate validity.
pub const MIN_WEBHOOK_VALIDITY: u64 = 60;
/// Longest webhook serving certificate validity (30 days).
pub const MAX_WEBHOOK_VALIDITY: u64 = 30 * 86_400;
/// Members of a JWK that carry private key material (RFC 7518 §6.2.2, §6.3.2, §6.4).
pub const PRIVATE_JWK_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "k", "oth"];

const OIDC: &str = "properties.oidcIssuerProfile";
const WORKLOAD_IDENTITY: &str = "properties.securityProfile.workloadIdentity";

/// The `enabled` a request's `oidcIssuerProfile` asks for: `None` keeps what is stored (the
/// profile absent or null, or without `enabled`). `issuerURL` is read-only and ignored (az
/// sends back what GET showed).
pub fn requested_oidc_issuer(v: Option<&Value>) -> R<Option<bool>> {
    requested_enabled(v, OIDC)
}

/// The `enabled` a request's `securityProfile.workloadIdentity` asks for (`None`: keep).
pub fn requested_workload_identity(security_profile: Option<&Value>) -> R<Option<bool>> {
    match security_profile {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => requested_enabled(m.get("workloadIdentity"), WORKLOAD_IDENTITY),
        Some(_) => Err(AksError::invalid(
            "securityProfile must be an object.",
            "properties.securityProfile",
        )),
    }
}

fn requested_enabled(v: Option<&Value>, target: &str) -> R<Option<bool>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => match m.get("enabled") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(AksError::invalid(
                format!("{target}.enabled must be true or false."),
                format!("{target}.enabled"),
            )),
        },
        Some(_) => Err(AksError::invalid(
            format!("{target} must be an object."),
            target,
        )),
    }
}

/// What a write leaves enabled: the OIDC issuer and workload identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuerSettings {
    pub oidc_issuer: bool,
    pub workload_identity: bool,
}

/// AKS's rules: what a request does not name stays as stored; the OIDC issuer, once enabled,
/// cannot be disabled; workload identity needs the OIDC issuer.
pub fn resolve_issuer_settings(
    requested_oidc: Option<bool>,
    requested_workload_identity: Option<bool>,
    stored_oidc: bool,
    stored_workload_identity: bool,
) -> R<IssuerSettings> {
    if stored_oidc && requested_oidc == Some(false) {
        return Err(AksError::bad_request(
            "OIDC issuer feature cannot be disabled: once enabled, the cluster's OIDC issuer stays enabled.",
        ));
    }
    let oidc_issuer = requested_oidc.unwrap_or(stored_oidc);
    let workload_identity = requested_workload_identity.unwrap_or(stored_workload_identity);
    if workload_identity && !oidc_issuer {
        return Err(AksError::bad_request(
            "Enabling workload identity requires enabling OIDC issuer (oidcIssuerProfile.enabled, az --enable-oidc-issuer).",
        ));
    }
    Ok(IssuerSettings {
        oidc_issuer,
        workload_identity,
    })
}

/// The issuer id of a stored cluster's `properties` while its OIDC issuer is enabled (the
/// stored profile is [`stored_oidc_issuer_profile`]'s).
pub fn stored_issuer_id(properties: &Value) -> Option<&str> {
    let p = properties.get("oidcIssuerProfile")?;
    if p.get("enabled").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    p.get("issuerId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// Whether a stored cluster has workload identity enabled.
pub fn stored_workload_identity(properties: &Value) -> bool {
    properties
        .pointer("/securityProfile/workloadIdentity/enabled")
        .and_then(Value::as_bool)
        == Some(true)
}

/// The stored form of `oidcIssuerProfile`: `{"enabled", "issuerId"}` (the id is the server's;
/// GET shows `issuerURL` instead).
pub fn stored_oidc_issuer_profile(issuer_id: Option<&str>) -> Value {
    match issuer_id {
        Some(id) => json!({"enabled": true, "issuerId": id}),
        None => json!({"enabled": false}),
    }
}

/// `oidcIssuerProfile` as GET shows it.
pub fn shown_oidc_issuer_profile(issuer_url: Option<&str>) -> Value {
    match issuer_url {
        Some(u) => json!({"enabled": true, "issuerURL": u}),
        None => json!({"enabled": false}),
    }
}

fn b64url_len(v: Option<&Value>) -> Option<usize> {
    use base64::Engine;
    let s = v?.as_str()?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
        .map(|b| b.len())
        .filter(|n| *n > 0)
}

/// The keys of a `publishServiceAccountKeys` body (`{"keys": [<JWK>, …]}`, the API server's
/// `/openid/v1/jwks` as it is): 1 to [`MAX_PUBLISHED_KEYS`], each RSA (`n`, `e`) or EC P-256
/// (`x`, `y`, 32 bytes each) with a `kid` of its own and no private member. Returned as given.
pub fn validate_published_keys(body: &Value) -> R<Vec<Value>> {
    let Some(keys) = body.get("keys").and_then(Value::as_array) else {
        return Err(AksError::invalid(
            "The body must be a JSON Web Key Set: {\"keys\": [...]}.",
            "keys",
        ));
    };
    if keys.is_empty() || keys.len() > MAX_PUBLISHED_KEYS {
        return Err(AksError::invalid(
            format!(
                "A key set must have 1 to {MAX_PUBLISHED_KEYS} keys; it has {}.",
                keys.len()
            ),
            "keys",
        ));
    }
    let mut kids: Vec<&str> = vec![];
    for (i, k) in keys.iter().enumerate() {
        let target = format!("keys[{i}]");
        let bad = |why: String| {
            Err(AksError::invalid(
                format!("The key {target} {why}"),
                &target,
            ))
        };
        let Some(m) = k.as_object() else {
            return bad("is not a JSON object.".into());
        };
        let kid = match m.get("kid") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.as_str(),
            _ => return bad("has no kid (a non-empty string of at most 256 characters).".into()),
        };
        let named = format!("(kid '{kid}')");
        if let Some(p) = PRIVATE_JWK_MEMBERS.iter().find(|p| m.contains_key(**p)) {
            return bad(format!(
                "{named} has the private key member '{p}': publish public keys only."
            ));
        }
        if kids.contains(&kid) {
            return bad(format!("{named} repeats a kid of another key of the set."));
        }
        kids.push(kid);
        for member in ["use", "alg"] {
            if m.get(member).is_some_and(|v| !v.is_string()) {
                return bad(format!("{named} has a '{member}' that is not a string."));
            }
        }
        if m.get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
        {
            return bad(format!("{named} is not a signing key (use 'sig')."));
        }
        match m.get("kty").and_then(Value::as_str) {
            Some("RSA") => {
                if b64url_len(m.get("n")).is_none_or(|n| n < 128)
                    || b64url_len(m.get("e")).is_none()
                {
                    return bad(format!(
                        "{named} is an RSA key without a valid modulus 'n' (at least 1024 bits) and exponent 'e' (base64url)."
                    ));
                }
            }
            Some("EC") => {
                if m.get("crv").and_then(Value::as_str) != Some("P-256") {
                    return bad(format!("{named} is an EC key on a curve other than P-256."));
                }
                if b64url_len(m.get("x")) != Some(32) || b64url_len(m.get("y")) != Some(32) {
                    return bad(format!(
                        "{named} is an EC key without valid coordinates 'x' and 'y' (32 bytes each, base64url)."
                    ));
                }
            }
            _ => {
                return bad(format!(
                    "{named} has an unsupported key type: 'RSA' or 'EC' (P-256)."
                ))
            }
        }
    }
    Ok(keys.clone())
}

// ---------------------------------------------------------------- proof of the API server on a publish

/// Clock skew allowed on a publish proof's `exp` / `nbf` / `iat`.
pub const PROOF_SKEW: u64 = 300;
/// The prefix of a service account's subject (`system:serviceaccount:NS:NAME`).
pub const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// The audience a publish proof must carry: `{issuerURL}publishServiceAccountKeys` (the issuer
/// URL with its trailing slash).
pub fn proof_audience(issuer_url: &str) -> String {
    format!("{issuer_url}publishServiceAccountKeys")
}

/// What a `publishServiceAccountKeys` body asks beside its keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublishOptions {
    /// `proof`: a service-account token of the cluster's API server (a compact JWT).
    pub proof: Option<String>,
    /// `resetPublisher`: forget the recorded publisher (a `managedClusters/write` caller only).
    pub reset_publisher: bool,
}

/// `proof` (absent, null or a string) and `resetPublisher` (absent, null or a boolean) of a
/// publish body.
pub fn publish_options(body: &Value) -> R<PublishOptions> {
    let proof =
        match body.get("proof") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(AksError::invalid(
                "proof must be a service-account token of the cluster's API server (a JWT string).",
                "proof",
            )),
        };
    let reset_publisher = match body.get("resetPublisher") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(AksError::invalid(
                "resetPublisher must be true or false.",
                "resetPublisher",
            ))
        }
    };
    Ok(PublishOptions {
        proof,
        reset_publisher,
    })
}

/// The proof a kubelet-identity publish is missing or cannot be read: 400 `InvalidParameter`,
/// target `proof`.
pub fn proof_missing(malformed: bool) -> AksError {
    let what = if malformed {
        "The proof is not a JSON Web Token (header.claims.signature, base64url)."
    } else {
        "A publish by the cluster's kubelet identity must carry \"proof\": a service-account token of the cluster's API server (TokenRequest) for the add-on's service account."
    };
    AksError::invalid(
        format!("{what} Its audience is '{{issuerURL}}publishServiceAccountKeys'."),
        "proof",
    )
}

/// Which keys may sign a kubelet-identity publish's proof and which subject it must name,
/// from the publisher recorded for the issuer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofTrust<'a> {
    /// A publisher is recorded: signed by a key of the stored set (never of the set being
    /// published), `sub` = the publisher.
    Recorded(&'a str),
    /// None is recorded (the first publish, or the first after an admin's `resetPublisher`):
    /// signed by a key of the set being published (trust on first use) — or of the stored set,
    /// which is trusted already —, `sub` any service account, which becomes the publisher.
    FirstUse,
}

impl ProofTrust<'_> {
    pub fn of(publisher: Option<&str>) -> ProofTrust<'_> {
        match publisher {
            Some(p) => ProofTrust::Recorded(p),
            None => ProofTrust::FirstUse,
        }
    }
    /// Whether a key of the set being published may sign the proof.
    pub fn published_set_may_sign(self) -> bool {
        self == ProofTrust::FirstUse
    }
}

/// Whether `sub` is a service account's subject: `system:serviceaccount:NS:NAME`, the
/// namespace a DNS label, the name a DNS subdomain.
pub fn is_service_account_subject(sub: &str) -> bool {
    let Some(rest) = sub.strip_prefix(SERVICE_ACCOUNT_PREFIX) else {
        return false;
    };
    match rest.split_once(':') {
        Some((ns, name)) => is_dns_label(ns) && is_dns_subdomain(name),
        None => false,
    }
}

/// Check the claims of a publish proof whose signature verified (the caller checks it with the
/// keys [`ProofTrust`] allows): `iss` the cluster's issuer URL, `aud` containing
/// [`proof_audience`], `exp` not past and `nbf` / `iat` not ahead (each with [`PROOF_SKEW`]),
/// `sub` the recorded publisher — or, on a first use, a service account's subject. Returns
/// the `sub`. Each refusal is 403 `PublishProofRejected` saying which claim.
pub fn check_proof_claims(
    claims: &Value,
    issuer_url: &str,
    trust: ProofTrust<'_>,
    now: u64,
) -> R<String> {
    let reject = |why: String| {
        Err(AksError::proof_rejected(format!(
            "The publish proof is rejected: {why}"
        )))
    };
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    if iss != issuer_url {
        return reject(format!(
            "its issuer '{iss}' is not the cluster's issuer '{issuer_url}'."
        ));
    }
    let want = proof_audience(issuer_url);
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !auds.contains(&want.as_str()) {
        return reject(format!(
            "its audience '{}' does not contain '{want}'.",
            auds.join(",")
        ));
    }
    let num = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_f64)
            .map(|f| f.max(0.0) as u64)
    };
    let Some(exp) = num("exp") else {
        return reject("it has no expiry (exp).".into());
    };
    if exp.saturating_add(PROOF_SKEW) <= now {
        return reject(format!("it expired at {exp} (now {now})."));
    }
    for k in ["nbf", "iat"] {
        if let Some(t) = num(k) {
            if t > now.saturating_add(PROOF_SKEW) {
                return reject(format!("its {k} {t} is in the future (now {now})."));
            }
        }
    }
    let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
    match trust {
        ProofTrust::Recorded(p) if sub != p => reject(format!(
            "its subject '{sub}' is not the issuer's publisher '{p}' (an administrator may reset it: resetPublisher)."
        )),
        ProofTrust::FirstUse if !is_service_account_subject(sub) => reject(format!(
            "its subject '{sub}' is not a service account (system:serviceaccount:NAMESPACE:NAME)."
        )),
        _ => Ok(sub.to_string()),
    }
}

/// Who published, for [`next_publisher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishCaller<'a> {
    /// A principal holding `managedClusters/write` through RBAC (no proof); `reset` its
    /// `resetPublisher`.
    Writer { reset: bool },
    /// The cluster's kubelet identity, whose proof verified naming `proven` (its `sub`).
    Kubelet { proven: &'a str },
}

/// The publisher recorded after a publish: a writer keeps the stored one (or resets it to
/// none); the kubelet identity keeps the stored one, or — on a first use — records its
/// proof's subject.
pub fn next_publisher(stored: Option<&str>, caller: PublishCaller<'_>) -> Option<String> {
    match caller {
        PublishCaller::Writer { reset: true } => None,
        PublishCaller::Writer { reset: false } => stored.map(str::to_string),
        PublishCaller::Kubelet { proven } => Some(stored.unwrap_or(proven).to_string()),
    }
}

/// The validity of a webhook serving certificate from a request's `validityInSeconds`: the
/// default when absent or null, else clamped to [[`MIN_WEBHOOK_VALIDITY`],
/// [`MAX_WEBHOOK_VALIDITY`]].
pub fn webhook_validity(v: Option<&Value>) -> R<u64> {
    match v {
        None | Some(Value::Null) => Ok(DEFAULT_WEBHOOK_VALIDITY),
        Some(Value::Number(n)) => {
            let secs = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => i.max(0) as u64,
                (None, Some(u)) => u,
                _ => {
                    return Err(AksError::invalid(
                        "validityInSeconds must be an integer.",
                        "validityInSeconds",
                    ))
                }
            };
            Ok(secs.clamp(MIN_WEBHOOK_VALIDITY, MAX_WEBHOOK_VALIDITY))
        }
        Some(_) => Err(AksError::invalid(
            "validityInSeconds must be an integer.",
            "validityInSeconds",
        )),
    }
}

/// The subject alternative names a webhook certificate request may carry: 1 to
/// [`MAX_WEBHOOK_SANS`], each an IP address or a lowercase DNS name (no wildcard).
pub fn check_webhook_sans(sans: &[String]) -> R<()> {
    if sans.is_empty() || sans.len() > MAX_WEBHOOK_SANS {
        return Err(AksError::invalid(
            format!(
                "The certificate signing request must ask for 1 to {MAX_WEBHOOK_SANS} DNS names or IP addresses (subjectAltName); it asks for {}.",
                sans.len()
            ),
            "csr",
        ));
    }
    for s in sans {
        if s.parse::<std::net::IpAddr>().is_err() && !is_dns_subdomain(s) {
            return Err(AksError::invalid(
                format!("The subject alternative name '{s}' is neither an IP address nor a DNS name (lowercase letters, digits, '-' and '.', no wildcard)."),
                "csr",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UA: &str = "/subscriptions/s/resourceGroups/ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app";

    fn ident(name: &str, ns: &str) -> Value {
        json!({"name": name, "namespace": ns, "identity": {"resourceId": UA}})
    }

    fn profile(ids: Vec<Value>, exs: Vec<Value>) -> Value {
        json!({"enabled": true, "userAssignedIdentities": ids, "userAssignedIdentityExceptions": exs})
    }

    fn check(v: Value, plugin: NetworkPlugin) -> R<PodIdentityProfile> {
        let p = PodIdentityProfile::parse(&v)?;
        p.validate(plugin)?;
        Ok(p)
    }

    #[test]
    fn dns_names_and_label_values() {
        assert!(is_dns_subdomain("my-pod-identity"));
        assert!(is_dns_subdomain("a.b-c.d"));
        assert!(!is_dns_subdomain("My-Pod"));
        assert!(!is_dns_subdomain("-a"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(!is_dns_subdomain("a.-b"));
        assert!(!is_dns_subdomain("a_b"));
        assert!(!is_dns_subdomain(""));
        assert!(is_dns_subdomain(&"a".repeat(253)));
        assert!(!is_dns_subdomain(&"a".repeat(254)));
        assert!(is_dns_label("my-app"));
        assert!(!is_dns_label("my.app"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_label_value(""));
        assert!(is_label_value("Foo_bar.9"));
        assert!(!is_label_value("foo-"));
        assert!(!is_label_value("_foo"));
        assert!(!is_label_value("a b"));
        assert!(!is_label_value(&"a".repeat(64)));
        assert!(is_label_key("kubernetes.azure.com/managedby"));
        assert!(is_label_key("app"));
        assert!(!is_label_key("Bad_Prefix/app"));
        assert!(!is_label_key("a/"));
    }

    #[test]
    fn cluster_and_pool_names() {
        assert!(validate_cluster_name("myAKSCluster").is_ok());
        assert!(validate_cluster_name("a_b-c").is_ok());
        assert!(validate_cluster_name("-a").is_err());
        assert!(validate_cluster_name(&"a".repeat(64)).is_err());
        assert!(is_pool_name("nodepool1"));
        assert!(!is_pool_name("1pool"));
        assert!(!is_pool_name("NodePool"));
        assert!(!is_pool_name("nodepool12345"));
        assert_eq!(
            node_resource_group("myResourceGroup", "myAKSCluster", "eastus"),
            "MC_myResourceGroup_myAKSCluster_eastus"
        );
        assert_eq!(node_resource_group(&"g".repeat(90), "c", "l").len(), 80);
        assert_eq!(
            scale_set_name("nodepool1", "12345678"),
            "aks-nodepool1-12345678-vmss"
        );
        assert_eq!(kubelet_identity_name("c1"), "c1-agentpool");
        assert_eq!(
            default_dns_prefix("myAKSCluster", "my_group", "0123456789"),
            "myAKSClust-mygroup-012345"
        );
        assert_eq!(default_dns_prefix("9lives", "g", "s"), "a9lives-g-s");
        assert!(is_dns_prefix("myAKSClust-mygroup-012345"));
    }

    #[test]
    fn a_valid_profile_parses_and_round_trips() {
        let v = profile(
            vec![
                json!({"name": "my-pod-identity", "namespace": "my-app", "bindingSelector": "foo",
                        "identity": {"resourceId": UA, "clientId": "c", "objectId": "o"},
                        "provisioningState": "Assigned"}),
            ],
            vec![
                json!({"name": "mic-exception", "namespace": "default", "podLabels": {"app": "mic"}}),
            ],
        );
        let p = check(v, NetworkPlugin::Azure).unwrap();
        assert_eq!(p.identities[0].selector(), "foo");
        assert_eq!(p.identities[0].state, Some(PodIdentityState::Assigned));
        let out = p.to_json();
        assert_eq!(out["userAssignedIdentities"][0]["bindingSelector"], "foo");
        assert_eq!(
            out["userAssignedIdentities"][0]["provisioningState"],
            "Assigned"
        );
        assert_eq!(
            out["userAssignedIdentityExceptions"][0]["podLabels"]["app"],
            "mic"
        );
        assert_eq!(PodIdentityProfile::parse(&out).unwrap(), p);
    }

    #[test]
    fn limits_are_200_each() {
        let ids = |n: usize| {
            (0..n)
                .map(|i| ident(&format!("p{i}"), "ns"))
                .collect::<Vec<_>>()
        };
        assert!(check(profile(ids(200), vec![]), NetworkPlugin::Azure).is_ok());
        let e = check(profile(ids(201), vec![]), NetworkPlugin::Azure).unwrap_err();
        assert_eq!(e.kind, AksErrorKind::InvalidParameter);
        assert!(e.message.contains("at most 200"), "{e}");
        let exs = |n: usize| {
            (0..n)
                .map(|i| json!({"name": format!("e{i}"), "namespace": "ns", "podLabels": {"a": "b"}}))
                .collect::<Vec<_>>()
        };
        assert!(check(profile(vec![], exs(200)), NetworkPlugin::Azure).is_ok());
        assert!(check(profile(vec![], exs(201)), NetworkPlugin::Azure)
            .unwrap_err()
            .message
            .contains("at most 200"));
    }

    #[test]
    fn names_namespaces_and_selectors() {
        let bad = |v: Value| check(profile(vec![v], vec![]), NetworkPlugin::Azure).unwrap_err();
        assert!(bad(ident("Bad_Name", "ns"))
            .target
            .unwrap()
            .ends_with(".name"));
        assert!(bad(ident("ok", "my.ns"))
            .target
            .unwrap()
            .ends_with(".namespace"));
        let mut v = ident("ok", "ns");
        v["bindingSelector"] = json!("bad selector");
        assert!(bad(v).target.unwrap().ends_with(".bindingSelector"));
        // a long name is fine with a selector, not without one
        let long = "a".repeat(100);
        let mut v = ident(&long, "ns");
        assert!(bad(v.clone()).message.contains("set bindingSelector"));
        v["bindingSelector"] = json!("foo");
        assert!(check(profile(vec![v], vec![]), NetworkPlugin::Azure).is_ok());
        // the binding's name must also be a subdomain
        let mut v = ident(&"a".repeat(250), "ns");
        v["bindingSelector"] = json!("foo");
        assert!(bad(v).target.unwrap().ends_with(".name"));
        // an empty selector means the name
        let mut v = ident("ok", "ns");
        v["bindingSelector"] = json!("");
        let p = check(profile(vec![v], vec![]), NetworkPlugin::Azure).unwrap();
        assert_eq!(p.identities[0].binding_selector, None);
        assert_eq!(p.identities[0].selector(), "ok");
        // missing fields, wrong types, not an identity id
        assert!(bad(json!({"name": "a", "namespace": "n"}))
            .target
            .unwrap()
            .ends_with(".identity"));
        assert!(
            bad(json!({"name": 1, "namespace": "n", "identity": {"resourceId": UA}}))
                .message
                .contains("must be a string")
        );
        let vm = "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/v";
        assert!(
            bad(json!({"name": "a", "namespace": "n", "identity": {"resourceId": vm}}))
                .target
                .unwrap()
                .ends_with(".identity.resourceId")
        );
    }

    #[test]
    fn duplicates_are_refused_per_namespace() {
        let e = check(
            profile(vec![ident("a", "ns"), ident("a", "ns")], vec![]),
            NetworkPlugin::Azure,
        )
        .unwrap_err();
        assert!(e.message.contains("ns/a"), "{e}");
        assert!(check(
            profile(vec![ident("a", "ns"), ident("a", "other")], vec![]),
            NetworkPlugin::Azure
        )
        .is_ok());
        let ex = json!({"name": "x", "namespace": "ns", "podLabels": {"a": "b"}});
        assert!(check(profile(vec![], vec![ex.clone(), ex]), NetworkPlugin::Azure).is_err());
    }

    #[test]
    fn the_addon_exception_name_is_reserved_in_kube_system() {
        let ex = |name: &str, ns: &str| {
            check(
                profile(
                    vec![],
                    vec![json!({"name": name, "namespace": ns, "podLabels": {"a": "b"}})],
                ),
                NetworkPlugin::Azure,
            )
        };
        let e = ex("aks-addon-exception", "kube-system").unwrap_err();
        assert_eq!(e.kind, AksErrorKind::InvalidParameter);
        assert!(e.target.unwrap().ends_with("[0].name"));
        assert!(e.message.contains("reserved"), "{}", e.message);
        assert!(ex("aks-addon-exception", "default").is_ok());
        assert!(ex("mic-exception", "kube-system").is_ok());
    }

    #[test]
    fn status_reports_are_capped() {
        let entry = |code: &str, message: &str| {
            json!({"name": "a", "namespace": "ns", "provisioningState": "Failed",
                   "error": {"code": code, "message": message}})
        };
        let one = |e: Value| parse_status_report(&json!({ "userAssignedIdentities": [e] }));
        assert!(one(entry(&"c".repeat(128), &"m".repeat(1024))).is_ok());
        let e = one(entry(&"c".repeat(129), "m")).unwrap_err();
        assert!(e.target.unwrap().ends_with(".error.code"));
        let e = one(entry("c", &"m".repeat(1025))).unwrap_err();
        assert!(e.target.unwrap().ends_with(".error.message"));
        let many = |n: usize| {
            parse_status_report(&json!({"userAssignedIdentities": (0..n)
                .map(|i| json!({"name": format!("p{i}"), "namespace": "ns", "provisioningState": "Assigned"}))
                .collect::<Vec<_>>()}))
        };
        assert_eq!(many(200).unwrap().len(), 200);
        assert!(many(201).unwrap_err().message.contains("at most 200"));
    }

    #[test]
    fn exception_labels() {
        let ex = |labels: Value| {
            check(
                profile(
                    vec![],
                    vec![json!({"name": "x", "namespace": "ns", "podLabels": labels})],
                ),
                NetworkPlugin::Azure,
            )
        };
        assert!(ex(json!({"kubernetes.azure.com/managedby": "aks"})).is_ok());
        assert!(ex(json!({})).is_err());
        assert!(ex(json!({"a": "bad value"})).is_err());
        assert!(ex(json!({"bad key": "v"})).is_err());
        assert!(ex(json!({"a": 1})).is_err());
    }

    #[test]
    fn kubenet_needs_the_flag_and_disabled_profiles_hold_nothing() {
        let e = check(profile(vec![], vec![]), NetworkPlugin::Kubenet).unwrap_err();
        assert_eq!(e.kind, AksErrorKind::BadRequest);
        assert!(e.message.contains("kubenet"));
        let mut v = profile(vec![], vec![]);
        v["allowNetworkPluginKubenet"] = json!(true);
        assert!(check(v, NetworkPlugin::Kubenet).is_ok());
        // disabled on kubenet is fine
        assert!(check(json!({"enabled": false}), NetworkPlugin::Kubenet).is_ok());
        let mut v = profile(vec![ident("a", "ns")], vec![]);
        v["enabled"] = json!(false);
        let e = check(v, NetworkPlugin::Azure).unwrap_err();
        assert!(e.target.unwrap().ends_with(".enabled"));
        assert_eq!(
            NetworkPlugin::parse(Some(&json!("Kubenet"))).unwrap(),
            NetworkPlugin::Kubenet
        );
        assert_eq!(NetworkPlugin::parse(None).unwrap(), NetworkPlugin::Azure);
        assert!(NetworkPlugin::parse(Some(&json!("calico"))).is_err());
    }

    #[test]
    fn states_carry_over_unless_the_entry_changed() {
        let mut old =
            PodIdentityProfile::parse(&profile(vec![ident("a", "ns"), ident("b", "ns")], vec![]))
                .unwrap();
        old.carry_states(None);
        assert!(old
            .identities
            .iter()
            .all(|p| p.state == Some(PodIdentityState::Updating)));
        let report = parse_status_report(&json!({"userAssignedIdentities": [
            {"name": "a", "namespace": "ns", "provisioningState": "Assigned"},
            {"name": "b", "namespace": "ns", "provisioningState": "Failed", "error": {"code": "Conflict", "message": "taken"}},
            {"name": "zz", "namespace": "ns", "provisioningState": "Assigned"},
        ]}))
        .unwrap();
        assert!(old.apply_report(&report));
        assert!(
            !old.apply_report(&report),
            "the same report changes nothing"
        );
        assert_eq!(old.identities[1].error.as_ref().unwrap().code, "Conflict");
        let out = old.to_json();
        assert_eq!(
            out["userAssignedIdentities"][1]["provisioningInfo"]["error"]["error"]["message"],
            "taken"
        );
        // a request echoes a without change, changes b's selector, adds c
        let mut b = ident("b", "ns");
        b["bindingSelector"] = json!("foo");
        let mut new = PodIdentityProfile::parse(&profile(
            vec![ident("a", "ns"), b, ident("c", "ns")],
            vec![],
        ))
        .unwrap();
        new.carry_states(Some(&old));
        let states: Vec<_> = new.identities.iter().map(|p| p.state.unwrap()).collect();
        assert_eq!(
            states,
            [
                PodIdentityState::Assigned,
                PodIdentityState::Updating,
                PodIdentityState::Updating
            ]
        );
        assert!(new.identities[1].error.is_none());
        // Assigned clears a failure
        let mut p = old.clone();
        p.apply_report(&[StatusReport {
            name: "b".into(),
            namespace: "ns".into(),
            state: PodIdentityState::Assigned,
            error: None,
        }]);
        assert!(p.identities[1].error.is_none());
        assert!(p.to_json()["userAssignedIdentities"][1]
            .get("provisioningInfo")
            .is_none());
        // only Assigned / Failed may be reported
        assert!(parse_status_report(&json!({"userAssignedIdentities": [
            {"name": "a", "namespace": "ns", "provisioningState": "Updating"}]}))
        .is_err());
        assert!(parse_status_report(&json!({})).is_err());
    }

    #[test]
    fn identity_ids_must_match_when_given() {
        assert!(check_identity_id(None, "x", 0, "clientId").is_ok());
        assert!(check_identity_id(Some("X"), "x", 0, "clientId").is_ok());
        let e = check_identity_id(Some("y"), "actual-object-id", 3, "objectId").unwrap_err();
        assert!(!e.message.contains("actual-object-id"), "{e}");
        assert_eq!(
            e.target.unwrap(),
            "properties.podIdentityProfile.userAssignedIdentities[3].identity.objectId"
        );
    }

    #[test]
    fn agent_pools() {
        let p = parse_agent_pools(&json!([
            {"name": "nodepool1", "count": 3, "vmSize": "Standard_D2s_v3", "provisioningState": "Succeeded", "maxPods": 30},
            {"name": "user1"}
        ]))
        .unwrap();
        assert_eq!(p[0].mode, "System");
        assert_eq!(p[1].mode, "User");
        assert_eq!(p[1].count, 1);
        assert_eq!(p[1].vm_size, DEFAULT_VM_SIZE);
        assert!(!p[0].body.contains_key("provisioningState"));
        assert_eq!(p[0].body["maxPods"], 30);
        let p = parse_agent_pools(
            &json!([{"name": "a", "mode": "User"}, {"name": "b", "mode": "system"}]),
        )
        .unwrap();
        assert_eq!((p[0].mode.as_str(), p[1].mode.as_str()), ("User", "System"));
        for bad in [
            json!([]),
            json!([{"name": "Bad"}]),
            json!([{"name": "a"}, {"name": "a"}]),
            json!([{"name": "a", "count": -1}]),
            json!([{"name": "a", "count": 1001}]),
            json!([{"name": "a", "osType": "Windows"}]),
            json!([{"name": "a", "type": "AvailabilitySet"}]),
            json!([{"name": "a", "mode": "User"}]),
            json!({"name": "a"}),
        ] {
            assert!(parse_agent_pools(&bad).is_err(), "{bad}");
        }
    }

    // ------------------------------------------------------------ OIDC issuer, workload identity

    fn rsa_jwk(kid: &str) -> Value {
        json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
               "n": format!("w{}", "A".repeat(341)), "e": "AQAB"})
    }

    #[test]
    fn issuer_profiles_parse_and_keep_what_a_request_does_not_name() {
        assert_eq!(requested_oidc_issuer(None).unwrap(), None);
        assert_eq!(requested_oidc_issuer(Some(&json!(null))).unwrap(), None);
        assert_eq!(
            requested_oidc_issuer(Some(&json!({"issuerURL": "https://x/"}))).unwrap(),
            None
        );
        assert_eq!(
            requested_oidc_issuer(Some(&json!({"enabled": true, "issuerURL": "https://x/"})))
                .unwrap(),
            Some(true)
        );
        for bad in [json!({"enabled": "true"}), json!(true), json!([])] {
            let e = requested_oidc_issuer(Some(&bad)).unwrap_err();
            assert_eq!(e.kind, AksErrorKind::InvalidParameter, "{bad}");
        }
        assert_eq!(requested_workload_identity(Some(&json!({}))).unwrap(), None);
        assert_eq!(
            requested_workload_identity(Some(&json!({"workloadIdentity": {"enabled": false}})))
                .unwrap(),
            Some(false)
        );
        assert!(requested_workload_identity(Some(&json!({"workloadIdentity": 1}))).is_err());
        assert!(requested_workload_identity(Some(&json!("x"))).is_err());
    }

    #[test]
    fn the_issuer_cannot_be_disabled_and_workload_identity_needs_it() {
        let ok = |o, w, so, sw| resolve_issuer_settings(o, w, so, sw).unwrap();
        let on = |o, w| IssuerSettings {
            oidc_issuer: o,
            workload_identity: w,
        };
        assert_eq!(ok(None, None, false, false), on(false, false));
        assert_eq!(ok(Some(true), None, false, false), on(true, false));
        assert_eq!(ok(Some(true), Some(true), false, false), on(true, true));
        // kept when not named, and workload identity may be turned off again
        assert_eq!(ok(None, None, true, true), on(true, true));
        assert_eq!(ok(None, Some(false), true, true), on(true, false));
        assert_eq!(ok(Some(true), None, true, false), on(true, false));
        let e = resolve_issuer_settings(Some(false), None, true, false).unwrap_err();
        assert_eq!(e.kind, AksErrorKind::BadRequest);
        assert!(e.message.contains("cannot be disabled"), "{e}");
        for (o, so) in [(None, false), (Some(false), false)] {
            let e = resolve_issuer_settings(o, Some(true), so, false).unwrap_err();
            assert_eq!(e.kind, AksErrorKind::BadRequest);
            assert!(e.message.contains("requires enabling OIDC issuer"), "{e}");
        }
    }

    #[test]
    fn stored_profiles() {
        let props = json!({"oidcIssuerProfile": stored_oidc_issuer_profile(Some("abc")),
                           "securityProfile": {"workloadIdentity": {"enabled": true}}});
        assert_eq!(stored_issuer_id(&props), Some("abc"));
        assert!(stored_workload_identity(&props));
        let off = json!({"oidcIssuerProfile": stored_oidc_issuer_profile(None)});
        assert_eq!(stored_issuer_id(&off), None);
        assert!(!stored_workload_identity(&off));
        // a profile written by a caller (no id of the server's) names no issuer
        assert_eq!(
            stored_issuer_id(&json!({"oidcIssuerProfile": {"enabled": true}})),
            None
        );
        assert_eq!(
            shown_oidc_issuer_profile(Some("https://k/oidc/abc/")),
            json!({"enabled": true, "issuerURL": "https://k/oidc/abc/"})
        );
        assert_eq!(shown_oidc_issuer_profile(None), json!({"enabled": false}));
    }

    #[test]
    fn published_key_sets() {
        let ec = json!({"kty": "EC", "crv": "P-256", "kid": "e1",
                        "x": "A".repeat(43), "y": format!("{}E", "A".repeat(42))});
        let set = json!({"keys": [rsa_jwk("r1"), ec.clone()]});
        assert_eq!(validate_published_keys(&set).unwrap().len(), 2);
        let many: Vec<Value> = (0..MAX_PUBLISHED_KEYS)
            .map(|i| rsa_jwk(&format!("k{i}")))
            .collect();
        assert!(validate_published_keys(&json!({ "keys": many })).is_ok());
        let too_many: Vec<Value> = (0..=MAX_PUBLISHED_KEYS)
            .map(|i| rsa_jwk(&format!("k{i}")))
            .collect();
        let e = validate_published_keys(&json!({ "keys": too_many })).unwrap_err();
        assert_eq!(e.target.as_deref(), Some("keys"));
        for p in PRIVATE_JWK_MEMBERS {
            let mut k = rsa_jwk("priv");
            k[*p] = json!("AQAB");
            let e = validate_published_keys(&json!({"keys": [rsa_jwk("ok"), k]})).unwrap_err();
            assert_eq!(e.kind, AksErrorKind::InvalidParameter);
            assert_eq!(e.target.as_deref(), Some("keys[1]"), "{p}");
            assert!(e.message.contains("'priv'") && e.message.contains(p), "{e}");
        }
        let mut no_kid = rsa_jwk("x");
        no_kid.as_object_mut().unwrap().remove("kid");
        let mut short_n = rsa_jwk("s");
        short_n["n"] = json!("AQAB");
        let mut bad_b64 = rsa_jwk("b");
        bad_b64["n"] = json!("!!!");
        let mut enc = rsa_jwk("enc");
        enc["use"] = json!("enc");
        let mut p384 = ec.clone();
        p384["crv"] = json!("P-384");
        let mut short_x = ec.clone();
        short_x["x"] = json!("AQAB");
        for bad in [
            json!({}),
            json!({"keys": []}),
            json!({"keys": "x"}),
            json!({"keys": [1]}),
            json!({"keys": [no_kid]}),
            json!({"keys": [short_n]}),
            json!({"keys": [bad_b64]}),
            json!({"keys": [enc]}),
            json!({"keys": [p384]}),
            json!({"keys": [short_x]}),
            json!({"keys": [{"kty": "oct", "kid": "o"}]}),
            json!({"keys": [rsa_jwk("d"), rsa_jwk("d")]}),
        ] {
            let e = validate_published_keys(&bad).unwrap_err();
            assert_eq!(e.kind, AksErrorKind::InvalidParameter, "{bad}");
        }
    }

    #[test]
    fn webhook_certificate_requests() {
        assert_eq!(webhook_validity(None).unwrap(), DEFAULT_WEBHOOK_VALIDITY);
        assert_eq!(
            webhook_validity(Some(&json!(null))).unwrap(),
            DEFAULT_WEBHOOK_VALIDITY
        );
        assert_eq!(webhook_validity(Some(&json!(3600))).unwrap(), 3600);
        assert_eq!(
            webhook_validity(Some(&json!(1))).unwrap(),
            MIN_WEBHOOK_VALIDITY
        );
        assert_eq!(
            webhook_validity(Some(&json!(-5))).unwrap(),
            MIN_WEBHOOK_VALIDITY
        );
        assert_eq!(
            webhook_validity(Some(&json!(u64::MAX))).unwrap(),
            MAX_WEBHOOK_VALIDITY
        );
        assert!(webhook_validity(Some(&json!("60"))).is_err());
        assert!(webhook_validity(Some(&json!(1.5))).is_err());
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_webhook_sans(&names(&[
            "azure-wi-webhook-webhook-service.azure-workload-identity-system.svc",
            "127.0.0.1",
            "::1",
        ]))
        .is_ok());
        for bad in [
            names(&[]),
            names(&["*.svc"]),
            names(&["Upper.svc"]),
            names(&["a..b"]),
            names(&["-a"]),
            (0..=MAX_WEBHOOK_SANS).map(|i| format!("s{i}")).collect(),
        ] {
            let e = check_webhook_sans(&bad).unwrap_err();
            assert_eq!(e.target.as_deref(), Some("csr"), "{bad:?}");
        }
    }

    // ------------------------------------------------------------ publish proof

    const ISS: &str = "https://k.example/oidc/1234/";
    const SA: &str = "system:serviceaccount:kube-system:keyless-pod-identity-addon";

    fn proof(now: u64) -> Value {
        json!({"iss": ISS, "sub": SA, "aud": [format!("{ISS}publishServiceAccountKeys")],
               "exp": now + 3600, "iat": now, "nbf": now})
    }

    fn rejected(r: R<String>, says: &str) {
        let e = r.expect_err("rejected");
        assert_eq!(e.kind, AksErrorKind::PublishProofRejected, "{e}");
        assert_eq!(e.target.as_deref(), Some("proof"));
        assert!(e.message.contains(says), "{} lacks {says}", e.message);
    }

    #[test]
    fn a_proof_names_the_issuer_its_audience_a_time_and_the_publisher() {
        let now = 1_000_000;
        let rec = ProofTrust::Recorded(SA);
        assert_eq!(check_proof_claims(&proof(now), ISS, rec, now).unwrap(), SA);
        // the audience as a string, among others
        let mut p = proof(now);
        p["aud"] = json!(format!("{ISS}publishServiceAccountKeys"));
        assert_eq!(check_proof_claims(&p, ISS, rec, now).unwrap(), SA);
        p["aud"] = json!([
            "api://AzureADTokenExchange",
            format!("{ISS}publishServiceAccountKeys")
        ]);
        assert_eq!(check_proof_claims(&p, ISS, rec, now).unwrap(), SA);
        // another issuer (also without the trailing slash)
        for iss in [
            json!("https://k.example/oidc/1234"),
            json!("https://other/"),
            Value::Null,
        ] {
            let mut p = proof(now);
            p["iss"] = iss;
            rejected(check_proof_claims(&p, ISS, rec, now), "issuer");
        }
        // another audience: the exchange's, or a prefix / suffix of the right one
        for aud in [
            json!("api://AzureADTokenExchange"),
            json!([format!("{ISS}publishServiceAccountKey")]),
            json!([format!("{ISS}publishServiceAccountKeys/")]),
            json!("publishServiceAccountKeys"),
            Value::Null,
        ] {
            let mut p = proof(now);
            p["aud"] = aud;
            rejected(check_proof_claims(&p, ISS, rec, now), "audience");
        }
        // time: expired past the skew, not yet valid past the skew, no exp
        let mut p = proof(now);
        p["exp"] = json!(now - PROOF_SKEW);
        rejected(check_proof_claims(&p, ISS, rec, now), "expired");
        p["exp"] = json!(now - PROOF_SKEW + 1);
        assert!(check_proof_claims(&p, ISS, rec, now).is_ok());
        for k in ["nbf", "iat"] {
            let mut p = proof(now);
            p[k] = json!(now + PROOF_SKEW + 1);
            rejected(check_proof_claims(&p, ISS, rec, now), k);
            p[k] = json!(now + PROOF_SKEW);
            assert!(check_proof_claims(&p, ISS, rec, now).is_ok());
        }
        let mut p = proof(now);
        p.as_object_mut().unwrap().remove("exp");
        rejected(check_proof_claims(&p, ISS, rec, now), "exp");
        // the subject: the recorded publisher only
        let mut p = proof(now);
        p["sub"] = json!("system:serviceaccount:kube-system:other");
        rejected(check_proof_claims(&p, ISS, rec, now), "publisher");
        p.as_object_mut().unwrap().remove("sub");
        rejected(check_proof_claims(&p, ISS, rec, now), "publisher");
    }

    #[test]
    fn a_first_use_takes_any_service_account_and_records_it() {
        let now = 5_000;
        let first = ProofTrust::of(None);
        assert_eq!(first, ProofTrust::FirstUse);
        assert!(first.published_set_may_sign());
        assert!(!ProofTrust::of(Some(SA)).published_set_may_sign());
        let mut p = proof(now);
        p["sub"] = json!("system:serviceaccount:team-a:publisher");
        assert_eq!(
            check_proof_claims(&p, ISS, first, now).unwrap(),
            "system:serviceaccount:team-a:publisher"
        );
        for sub in [
            "admin",
            "system:serviceaccount:",
            "system:serviceaccount:ns",
            "system:serviceaccount:NS:x",
            "system:serviceaccount:ns:",
            "system:node:n1",
        ] {
            p["sub"] = json!(sub);
            rejected(check_proof_claims(&p, ISS, first, now), "service account");
        }
        assert!(is_service_account_subject(SA));
        // the publisher after a publish
        let proven = PublishCaller::Kubelet {
            proven: "system:serviceaccount:a:b",
        };
        assert_eq!(
            next_publisher(None, proven).as_deref(),
            Some("system:serviceaccount:a:b")
        );
        assert_eq!(next_publisher(Some(SA), proven).as_deref(), Some(SA));
        let keep = PublishCaller::Writer { reset: false };
        assert_eq!(next_publisher(Some(SA), keep).as_deref(), Some(SA));
        assert_eq!(next_publisher(None, keep), None);
        assert_eq!(
            next_publisher(Some(SA), PublishCaller::Writer { reset: true }),
            None
        );
    }

    #[test]
    fn publish_options_are_typed() {
        assert_eq!(
            publish_options(&json!({"keys": []})).unwrap(),
            PublishOptions::default()
        );
        assert_eq!(
            publish_options(&json!({"proof": "a.b.c", "resetPublisher": true})).unwrap(),
            PublishOptions {
                proof: Some("a.b.c".into()),
                reset_publisher: true
            }
        );
        assert_eq!(
            publish_options(&json!({"proof": null, "resetPublisher": null})).unwrap(),
            PublishOptions::default()
        );
        for (body, target) in [
            (json!({"proof": 1}), "proof"),
            (json!({"proof": {"jwt": "x"}}), "proof"),
            (json!({"resetPublisher": "true"}), "resetPublisher"),
        ] {
            let e = publish_options(&body).unwrap_err();
            assert_eq!(
                (e.kind, e.target.as_deref()),
                (AksErrorKind::InvalidParameter, Some(target))
            );
        }
        let e = proof_missing(false);
        assert_eq!(
            (e.kind, e.target.as_deref()),
            (AksErrorKind::InvalidParameter, Some("proof"))
        );
        assert_eq!(
            proof_audience(ISS),
            "https://k.example/oidc/1234/publishServiceAccountKeys"
        );
    }
}
