//! Pod identity through NMI (seed 000): which identities a pod may use.
//!
//! The rules of aad-pod-identity's NMI in managed mode (`../shared/spec/pod-identity.md` §1.2,
//! §1.3), on plain data (no Kubernetes types, no IO), so the host agent's NMI surface and its
//! watch-fed index only feed objects in and act on the answer:
//!
//! - [`decide`]: is a pod excepted, bound to identities (which, in which order), or neither;
//! - [`select`]: which of a pod's identities a request names, among those the host holds;
//! - [`parse_token_request`], [`route`], and NMI's error texts ([`no_identity_message`]);
//! - [`ClusterView`] (the `cluster` object of the host view), which objects count ([`Trust`]:
//!   the cluster's profile, not whoever may write the CRDs), and the kubenet guard
//!   ([`kubenet_refusal`]).
//!
//! Managed mode is namespaced: bindings, identities and exceptions only count in the pod's own
//! namespace. Only user-assigned managed identities (`type: 0`) are served.

use crate::selection::{IdentityIndex, IdentityRef, SelectionError, Selector};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The pod label a binding's `selector` is matched against (exact string equality).
pub const BINDING_LABEL: &str = "aadpodidbinding";

/// A pod, as far as the rules care.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// An `AzureIdentity` (upstream field names: `type`, `clientID`, `resourceID`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AzureIdentity {
    pub namespace: String,
    pub name: String,
    /// 0 user-assigned managed identity, 1 / 2 service principal (not served).
    pub type_: i32,
    pub client_id: String,
    pub resource_id: String,
    /// The `aadpodidentity.k8s.io/Behavior: namespaced` annotation: only pods of its own
    /// namespace may use it, whatever the mode.
    pub namespaced: bool,
}

/// An `AzureIdentityBinding`: pods whose `aadpodidbinding` label equals `selector` may use the
/// AzureIdentity named `azure_identity` (in the binding's namespace).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Binding {
    pub namespace: String,
    pub name: String,
    pub azure_identity: String,
    pub selector: String,
}

/// An `AzurePodIdentityException`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exception {
    pub namespace: String,
    pub name: String,
    pub pod_labels: BTreeMap<String, String>,
}

/// One identity a pod is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundIdentity {
    /// The AzureIdentity's namespace.
    pub namespace: String,
    /// The AzureIdentity's name (the order of a pod's identities).
    pub name: String,
    pub client_id: String,
    pub resource_id: String,
}

/// What NMI does with a pod's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodDecision {
    /// Not intercepted: the pod gets what the node's own IMDS answers (never a pod identity).
    Excepted,
    /// The pod's identities, sorted by AzureIdentity name, each once.
    Bound(Vec<BoundIdentity>),
    /// No binding in the pod's namespace selects it.
    NoBinding,
}

/// Whether `exception` excepts `pod`: same namespace, and any one of its `podLabels` is on the
/// pod with the same key and a value equal ignoring case (upstream `strings.EqualFold`).
pub fn excepts(exception: &Exception, pod: &Pod) -> bool {
    exception.namespace == pod.namespace
        && exception.pod_labels.iter().any(|(k, v)| {
            pod.labels
                .get(k)
                .is_some_and(|pv| pv.to_lowercase() == v.to_lowercase())
        })
}

/// Which namespaces a pod's bindings may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Namespacing {
    /// Binding, identity and pod share a namespace (managed mode, and standard mode with
    /// `--forceNamespaced`).
    #[default]
    Always,
    /// Standard mode's default (upstream): a binding of any namespace selects pods of every
    /// namespace by their label, unless its identity carries the
    /// `aadpodidentity.k8s.io/Behavior: namespaced` annotation ([`AzureIdentity::namespaced`]).
    ByIdentity,
}

/// The (binding, identity) pairs that bind `pod`: bindings whose `selector` equals the pod's
/// `aadpodidbinding` label exactly, each naming an AzureIdentity of the binding's own namespace
/// (a reference is namespace-local); under [`Namespacing::Always`], or for a namespaced
/// identity, binding and identity must be in the pod's namespace. Identities of `type` other
/// than 0 or without a client id are skipped. Sorted by identity (name, namespace), then
/// binding (namespace, name); one entry per identity (its first binding). The one rule NMI
/// ([`decide_in`]) and MIC (`crate::mic::desired`) both apply.
pub fn matches<'a>(
    mode: Namespacing,
    pod: &Pod,
    bindings: impl IntoIterator<Item = &'a Binding>,
    identities: impl IntoIterator<Item = &'a AzureIdentity>,
) -> Vec<(&'a Binding, &'a AzureIdentity)> {
    let Some(label) = pod.labels.get(BINDING_LABEL) else {
        return vec![];
    };
    let same_ns = |ns: &str| ns == pod.namespace;
    let wanted: Vec<&Binding> = bindings
        .into_iter()
        .filter(|b| &b.selector == label)
        .filter(|b| mode == Namespacing::ByIdentity || same_ns(&b.namespace))
        .collect();
    if wanted.is_empty() {
        return vec![];
    }
    let mut by_ref: BTreeMap<(&str, &str), &AzureIdentity> = BTreeMap::new();
    for id in identities {
        by_ref
            .entry((id.namespace.as_str(), id.name.as_str()))
            .or_insert(id);
    }
    let mut found: BTreeMap<(&str, &str), (&Binding, &AzureIdentity)> = BTreeMap::new();
    let mut sorted = wanted;
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for b in sorted {
        let Some(id) = by_ref.get(&(b.namespace.as_str(), b.azure_identity.as_str())) else {
            continue;
        };
        let scoped = mode == Namespacing::Always || id.namespaced;
        if id.type_ != 0 || id.client_id.is_empty() || (scoped && !same_ns(&id.namespace)) {
            continue;
        }
        found
            .entry((id.name.as_str(), id.namespace.as_str()))
            .or_insert((b, id));
    }
    found.into_values().collect()
}

/// The decision for `pod` given the cluster's bindings, identities and exceptions, in managed
/// mode ([`Namespacing::Always`]; objects of other namespaces may be passed, they never count).
pub fn decide<'a>(
    pod: &Pod,
    bindings: impl IntoIterator<Item = &'a Binding>,
    identities: impl IntoIterator<Item = &'a AzureIdentity>,
    exceptions: impl IntoIterator<Item = &'a Exception>,
) -> PodDecision {
    decide_in(Namespacing::Always, pod, bindings, identities, exceptions)
}

/// The decision for `pod`: exceptions first (as in NMI; only those of the pod's namespace
/// count), then the identities [`matches`] finds. The list is sorted by AzureIdentity name, so
/// "the first identity" — what a request without `client_id` / `object_id` / `msi_res_id`
/// gets — is deterministic (upstream's choice depended on informer order).
pub fn decide_in<'a>(
    mode: Namespacing,
    pod: &Pod,
    bindings: impl IntoIterator<Item = &'a Binding>,
    identities: impl IntoIterator<Item = &'a AzureIdentity>,
    exceptions: impl IntoIterator<Item = &'a Exception>,
) -> PodDecision {
    if exceptions.into_iter().any(|e| excepts(e, pod)) {
        return PodDecision::Excepted;
    }
    let found: Vec<BoundIdentity> = matches(mode, pod, bindings, identities)
        .into_iter()
        .map(|(_, id)| BoundIdentity {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
            client_id: id.client_id.clone(),
            resource_id: id.resource_id.clone(),
        })
        .collect();
    if found.is_empty() {
        PodDecision::NoBinding
    } else {
        PodDecision::Bound(found)
    }
}

/// Which of a pod's identities a request names, among those the host holds (`host`, matched by
/// client id; the host's system-assigned identity is never a pod identity).
///
/// `client_id`, `object_id` or `msi_res_id` (`mi_res_id`) pick that identity if it is one of
/// the pod's and on the host; no selector picks the first of the pod's identities (by
/// AzureIdentity name) that the host holds — deterministic, where NMI took whichever its
/// informer listed first. Every step is a hash lookup or a walk over the pod's own (few)
/// identities: the cost does not grow with the host's identities.
pub fn select<'a>(
    host: &'a IdentityIndex,
    bound: &[BoundIdentity],
    selector: &Selector,
) -> Result<&'a IdentityRef, SelectionError> {
    let held = |id: &IdentityRef| {
        !id.system_assigned
            && bound
                .iter()
                .any(|b| b.client_id.eq_ignore_ascii_case(&id.client_id))
    };
    let found = match selector {
        Selector::SystemAssigned => bound
            .iter()
            .filter_map(|b| host.by_client_id(&b.client_id))
            .find(|id| !id.system_assigned),
        Selector::ClientId(c) => host.by_client_id(c).filter(|id| held(id)),
        Selector::ObjectId(o) => host.by_object_id(o).filter(|id| held(id)),
        Selector::ResourceId(r) => host.by_resource_id(r).filter(|id| held(id)),
    };
    found.ok_or(SelectionError::NotFound)
}

/// A token request as NMI reads it: `resource` required, `api-version` ignored, one selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTokenRequest {
    pub resource: String,
    pub selector: Selector,
}

/// NMI's error for a request without `resource` (400, plain text); a `resource` that is not an
/// audience (`audience::check`) gets that rule's text, also 400.
pub const RESOURCE_EMPTY: &str = "parameter resource cannot be empty";

/// Read a token request from the decoded query the way NMI does: the first value of each name
/// counts, empty values are absent. The selector is `client_id`, else `object_id`, else
/// `msi_res_id`, else `mi_res_id`; none → [`Selector::SystemAssigned`] ("the first identity").
pub fn parse_token_request(query: &[(String, String)]) -> Result<PodTokenRequest, &'static str> {
    let get = |k: &str| {
        query
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let resource = get("resource").ok_or(RESOURCE_EMPTY)?.to_string();
    crate::audience::check(&resource).map_err(crate::audience::AudienceError::describe)?;
    let selector = if let Some(c) = get("client_id") {
        Selector::ClientId(c.to_string())
    } else if let Some(o) = get("object_id") {
        Selector::ObjectId(o.to_string())
    } else if let Some(r) = get("msi_res_id").or_else(|| get("mi_res_id")) {
        Selector::ResourceId(r.to_string())
    } else {
        Selector::SystemAssigned
    };
    Ok(PodTokenRequest { resource, selector })
}

/// NMI's redaction of a client id in messages: the first and last four characters kept.
pub fn redact_client_id(client_id: &str) -> String {
    let chars: Vec<char> = client_id.chars().collect();
    let edge = |c: &[char]| c.iter().all(|c| !c.is_whitespace());
    if chars.len() >= 8 && edge(&chars[..4]) && edge(&chars[chars.len() - 4..]) {
        let head: String = chars[..4].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{head}##### REDACTED #####{tail}")
    } else {
        client_id.to_string()
    }
}

/// NMI's 404 text when a pod has no (matching) identity.
pub fn no_identity_message(selector: &Selector) -> String {
    let client_id = match selector {
        Selector::ClientId(c) => c.as_str(),
        _ => "",
    };
    format!(
        "no azure identity found for request clientID {}",
        redact_client_id(client_id)
    )
}

/// Where NMI sends a request path (in NMI's order of matching).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/metadata/identity/oauth2/token…` (`metadata` in any case; a prefix match).
    Token,
    /// Another path with `/metadata/identity…oauth2…token` in it: 400 "Invalid request".
    InvalidTokenPath,
    /// `/host/token…`.
    HostToken,
    /// `/metadata/instance…` while instance metadata is blocked: 403.
    BlockedInstance,
    /// Anything else: what the node's IMDS answers.
    Other,
}

impl Route {
    /// Whether this route answers a token (what the node's fair share counts for NMI: the
    /// same decision as the routing, so no path is answered a token uncounted).
    pub fn is_token(&self) -> bool {
        matches!(self, Route::Token | Route::HostToken)
    }
}

/// `/metadata/` (`metadata` in any case) at byte `i` of `path`.
fn metadata_at(path: &str, i: usize) -> bool {
    let b = path.as_bytes();
    b.get(i) == Some(&b'/')
        && b.get(i + 9) == Some(&b'/')
        && b.get(i + 1..i + 9)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"metadata"))
}

/// Route `path` as NMI's router does.
pub fn route(path: &str, block_instance_metadata: bool) -> Route {
    if metadata_at(path, 0) && path[9..].starts_with("/identity/oauth2/token") {
        return Route::Token;
    }
    // upstream's unanchored `/(?i:metadata)/identity(.*?)oauth2(.*?)token`: if any occurrence
    // matches, the leftmost one does (its tail contains every later one's), so only that one
    // is tried — linear in the path's length
    let invalid = (0..path.len())
        .find(|&i| metadata_at(path, i) && path[i + 9..].starts_with("/identity"))
        .is_some_and(|i| {
            path[i + 18..]
                .find("oauth2")
                .is_some_and(|j| path[i + 18 + j + 6..].contains("token"))
        });
    if invalid {
        return Route::InvalidTokenPath;
    }
    if path.starts_with("/host/token") {
        return Route::HostToken;
    }
    if block_instance_metadata && metadata_at(path, 0) && path[9..].starts_with("/instance") {
        return Route::BlockedInstance;
    }
    Route::Other
}

/// The `cluster` object of the host view, present for nodes of a managed cluster's pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterView {
    pub id: String,
    /// `azure` | `kubenet`.
    pub network_plugin: String,
    pub pod_identity: ClusterPodIdentity,
    pub kubelet_identity: Option<KubeletIdentity>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterPodIdentity {
    pub enabled: bool,
    pub allow_network_plugin_kubenet: bool,
    /// Client ids of every pod identity of the cluster (`podIdentityProfile`).
    pub client_ids: Vec<String>,
    /// The profile's pod identities: the only `AzureIdentity` objects NMI honours
    /// ([`Trust::identity`]).
    pub identities: Vec<ProfileIdentity>,
    /// The profile's exceptions: with `kube-system/aks-addon-exception`, the only
    /// `AzurePodIdentityException` objects NMI honours ([`Trust::exception`]).
    pub exceptions: Vec<ProfileException>,
}

/// One pod identity of the cluster's `podIdentityProfile`, as the host view carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProfileIdentity {
    pub namespace: String,
    pub name: String,
    pub client_id: String,
}

/// One exception of the cluster's `podIdentityProfile`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProfileException {
    pub namespace: String,
    pub name: String,
}

/// The exception the add-on keeps for its own pods (always honoured).
pub const ADDON_EXCEPTION: (&str, &str) = ("kube-system", "aks-addon-exception");

/// Which `aadpodidentity.k8s.io` objects NMI believes.
///
/// Creating these objects is a namespace-level Kubernetes permission; the identities they name
/// are not. On a node of a managed cluster (the host view has a `cluster` object) the cluster's
/// `podIdentityProfile` is the authority: an `AzureIdentity` counts only if its (namespace,
/// name, clientID) is an entry of the profile (client id compared ignoring case), an exception
/// only if its (namespace, name) is a profile exception or [`ADDON_EXCEPTION`]. So a tenant
/// who may write these kinds in their own namespace cannot point an `AzureIdentity` at another
/// namespace's pod identity or the kubelet identity, nor except their pods into the node's
/// identities.
///
/// On a plain scale set used with `--nmi` (no `cluster` object, [`Trust::Operator`]) there is
/// no profile: every object is believed, and whoever may write the CRDs decides which of the
/// host's identities pods get. The operator owns the CRDs there and must restrict who writes
/// them (RBAC), as with upstream aad-pod-identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Trust {
    /// No profile: every object counts (the operator owns the CRDs).
    #[default]
    Operator,
    /// The cluster's profile decides.
    Profile {
        /// (namespace, name, lowercase client id).
        identities: std::collections::HashSet<(String, String, String)>,
        exceptions: std::collections::HashSet<(String, String)>,
    },
}

impl Trust {
    /// The trust a host view's `cluster` object (if any) implies.
    pub fn of(cluster: Option<&ClusterView>) -> Trust {
        match cluster {
            None => Trust::Operator,
            Some(c) => Trust::Profile {
                identities: c
                    .pod_identity
                    .identities
                    .iter()
                    .map(|i| {
                        (
                            i.namespace.clone(),
                            i.name.clone(),
                            i.client_id.to_ascii_lowercase(),
                        )
                    })
                    .collect(),
                exceptions: c
                    .pod_identity
                    .exceptions
                    .iter()
                    .map(|e| (e.namespace.clone(), e.name.clone()))
                    .collect(),
            },
        }
    }

    /// Whether NMI honours this `AzureIdentity`.
    pub fn identity(&self, id: &AzureIdentity) -> bool {
        match self {
            Trust::Operator => true,
            Trust::Profile { identities, .. } => identities.contains(&(
                id.namespace.clone(),
                id.name.clone(),
                id.client_id.to_ascii_lowercase(),
            )),
        }
    }

    /// Whether NMI honours this `AzurePodIdentityException`.
    pub fn exception(&self, e: &Exception) -> bool {
        if (e.namespace.as_str(), e.name.as_str()) == ADDON_EXCEPTION {
            return true;
        }
        match self {
            Trust::Operator => true,
            Trust::Profile { exceptions, .. } => {
                exceptions.contains(&(e.namespace.clone(), e.name.clone()))
            }
        }
    }
}

/// [`decide_in`] over the objects `trust` honours only.
pub fn decide_trusted<'a>(
    mode: Namespacing,
    trust: &Trust,
    pod: &Pod,
    bindings: impl IntoIterator<Item = &'a Binding>,
    identities: impl IntoIterator<Item = &'a AzureIdentity>,
    exceptions: impl IntoIterator<Item = &'a Exception>,
) -> PodDecision {
    decide_in(
        mode,
        pod,
        bindings,
        identities.into_iter().filter(|i| trust.identity(i)),
        exceptions.into_iter().filter(|e| trust.exception(e)),
    )
}

/// The client ids (lowercase) an excepted caller never gets: on a managed cluster the
/// profile's pod identities (`cluster.podIdentity.clientIds`) — never whatever
/// `AzureIdentity` objects exist, which a tenant could write to take the kubelet identity out
/// of the set; without a cluster object ([`Trust::Operator`]) the client ids of the
/// `AzureIdentity` objects seen (`k8s_client_ids`), the operator's.
pub fn excluded_from_excepted(
    cluster: Option<&ClusterView>,
    k8s_client_ids: &std::collections::HashSet<String>,
) -> std::collections::HashSet<String> {
    match cluster {
        Some(c) => c
            .pod_identity
            .client_ids
            .iter()
            .map(|c| c.to_ascii_lowercase())
            .collect(),
        None => k8s_client_ids
            .iter()
            .map(|c| c.to_ascii_lowercase())
            .collect(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KubeletIdentity {
    pub client_id: String,
    pub object_id: String,
    pub resource_id: String,
}

/// The kubenet guard (CVE-2021-1677: on kubenet a pod with `NET_RAW` can take another pod's
/// IP, and NMI trusts the source IP): why NMI must not start, if it must not. Allowed by the
/// cluster's `allowNetworkPluginKubenet` or by the node's `--allow-network-plugin-kubenet`.
pub fn kubenet_refusal(cluster: Option<&ClusterView>, allow_flag: bool) -> Option<String> {
    let c = cluster?;
    if !c.network_plugin.eq_ignore_ascii_case("kubenet")
        || allow_flag
        || c.pod_identity.allow_network_plugin_kubenet
    {
        return None;
    }
    Some(format!(
        "cluster {} uses the kubenet network plugin, where a pod can spoof another pod's IP \
         (CVE-2021-1677); NMI does not run there unless the cluster allows it \
         (podIdentityProfile.allowNetworkPluginKubenet, `aks update --enable-pod-identity-with-kubenet`) \
         or the node is started with --allow-network-plugin-kubenet",
        if c.id.is_empty() { "(unnamed)" } else { &c.id }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selection::CallerIdentities;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(ns: &str, kv: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: ns.into(),
            name: "p".into(),
            labels: labels(kv),
        }
    }

    fn ident(ns: &str, name: &str, cid: &str) -> AzureIdentity {
        AzureIdentity {
            namespace: ns.into(),
            name: name.into(),
            type_: 0,
            client_id: cid.into(),
            resource_id: format!("/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"),
            namespaced: false,
        }
    }

    fn binding(ns: &str, name: &str, id: &str, sel: &str) -> Binding {
        Binding {
            namespace: ns.into(),
            name: name.into(),
            azure_identity: id.into(),
            selector: sel.into(),
        }
    }

    fn exception(ns: &str, kv: &[(&str, &str)]) -> Exception {
        Exception {
            namespace: ns.into(),
            name: "e".into(),
            pod_labels: labels(kv),
        }
    }

    fn names(d: &PodDecision) -> Vec<String> {
        match d {
            PodDecision::Bound(v) => v.iter().map(|b| b.name.clone()).collect(),
            other => panic!("not bound: {other:?}"),
        }
    }

    #[test]
    fn bindings_select_by_exact_label_in_the_pods_namespace() {
        let ids = [
            ident("apps", "b-id", "cb"),
            ident("apps", "a-id", "ca"),
            ident("other", "c-id", "cc"),
        ];
        let bs = [
            binding("apps", "b", "b-id", "foo"),
            binding("apps", "a", "a-id", "foo"),
            binding("apps", "a2", "a-id", "foo"), // the same identity twice: listed once
            binding("other", "c", "c-id", "foo"),
            binding("apps", "x", "c-id", "foo"), // names an identity of another namespace
        ];
        let d = decide(&pod("apps", &[("aadpodidbinding", "foo")]), &bs, &ids, &[]);
        assert_eq!(names(&d), ["a-id", "b-id"], "sorted by AzureIdentity name");
        // exact: case and surrounding text matter
        for l in ["Foo", "foo ", "fo"] {
            assert_eq!(
                decide(&pod("apps", &[("aadpodidbinding", l)]), &bs, &ids, &[]),
                PodDecision::NoBinding
            );
        }
        // no label, another label, another namespace with no binding of its own
        assert_eq!(
            decide(&pod("apps", &[]), &bs, &ids, &[]),
            PodDecision::NoBinding
        );
        assert_eq!(
            decide(&pod("apps", &[("app", "foo")]), &bs, &ids, &[]),
            PodDecision::NoBinding
        );
        assert_eq!(
            decide(&pod("third", &[("aadpodidbinding", "foo")]), &bs, &ids, &[]),
            PodDecision::NoBinding
        );
        // the other namespace's binding serves that namespace's identity only
        let d = decide(&pod("other", &[("aadpodidbinding", "foo")]), &bs, &ids, &[]);
        assert_eq!(names(&d), ["c-id"]);
    }

    #[test]
    fn only_managed_identities_with_a_client_id_count() {
        let mut sp = ident("apps", "sp", "csp");
        sp.type_ = 1;
        let empty = ident("apps", "empty", "");
        let ids = [sp, empty];
        let bs = [
            binding("apps", "1", "sp", "s"),
            binding("apps", "2", "empty", "s"),
            binding("apps", "3", "missing", "s"),
        ];
        assert_eq!(
            decide(&pod("apps", &[("aadpodidbinding", "s")]), &bs, &ids, &[]),
            PodDecision::NoBinding
        );
    }

    #[test]
    fn exceptions_match_any_label_value_ignoring_case_in_the_pods_namespace() {
        let ids = [ident("kube-system", "a", "ca")];
        let bs = [binding("kube-system", "a", "a", "foo")];
        let ex = [exception(
            "kube-system",
            &[("kubernetes.azure.com/managedby", "aks"), ("app", "mic")],
        )];
        let p = pod(
            "kube-system",
            &[
                ("kubernetes.azure.com/managedby", "AKS"),
                ("aadpodidbinding", "foo"),
            ],
        );
        assert_eq!(decide(&p, &bs, &ids, &ex), PodDecision::Excepted);
        let p = pod("kube-system", &[("app", "mic"), ("other", "x")]);
        assert_eq!(decide(&p, &bs, &ids, &ex), PodDecision::Excepted);
        // key compared exactly; value must match
        let p = pod("kube-system", &[("App", "mic"), ("app", "mic2")]);
        assert_eq!(decide(&p, &bs, &ids, &ex), PodDecision::NoBinding);
        // an exception in another namespace does not count
        let p = pod("default", &[("app", "mic")]);
        assert_eq!(decide(&p, &bs, &ids, &ex), PodDecision::NoBinding);
        // an empty exception excepts nothing
        let p = pod("kube-system", &[("aadpodidbinding", "foo")]);
        let d = decide(&p, &bs, &ids, &[exception("kube-system", &[])]);
        assert_eq!(names(&d), ["a"]);
    }

    fn profile(ids: &[(&str, &str, &str)], ex: &[(&str, &str)]) -> ClusterView {
        ClusterView {
            pod_identity: ClusterPodIdentity {
                enabled: true,
                client_ids: ids.iter().map(|i| i.2.to_string()).collect(),
                identities: ids
                    .iter()
                    .map(|(ns, n, c)| ProfileIdentity {
                        namespace: ns.to_string(),
                        name: n.to_string(),
                        client_id: c.to_string(),
                    })
                    .collect(),
                exceptions: ex
                    .iter()
                    .map(|(ns, n)| ProfileException {
                        namespace: ns.to_string(),
                        name: n.to_string(),
                    })
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_profile_decides_which_objects_count() {
        let c = profile(&[("apps", "a-id", "CA-1")], &[("apps", "probe")]);
        let t = Trust::of(Some(&c));
        // the profile's own identity, client id ignoring case
        assert!(t.identity(&ident("apps", "a-id", "ca-1")));
        // a tenant's copy of another namespace's pod identity, or of the kubelet identity
        assert!(!t.identity(&ident("evil", "a-id", "ca-1")));
        assert!(!t.identity(&ident("evil", "steal", "ca-1")));
        assert!(!t.identity(&ident("apps", "kubelet", "kubelet-cid")));
        // the right name in the right namespace pointing at another client id
        assert!(!t.identity(&ident("apps", "a-id", "kubelet-cid")));
        let ex = |ns: &str, name: &str| Exception {
            namespace: ns.into(),
            name: name.into(),
            pod_labels: labels(&[("app", "x")]),
        };
        assert!(t.exception(&ex("apps", "probe")));
        assert!(t.exception(&ex("kube-system", "aks-addon-exception")));
        assert!(!t.exception(&ex("evil", "probe")));
        assert!(!t.exception(&ex("evil", "aks-addon-exception")));
        assert!(!t.exception(&ex("kube-system", "other")));

        // decisions: the tenant's objects are ignored, the profile's work
        let ids = [
            ident("evil", "steal", "ca-1"),
            ident("apps", "a-id", "CA-1"),
        ];
        let bs = [
            binding("evil", "b", "steal", "x"),
            binding("apps", "b", "a-id", "x"),
        ];
        let evil_pod = pod("evil", &[("aadpodidbinding", "x"), ("app", "x")]);
        let evil_ex = [ex("evil", "e")];
        assert_eq!(
            decide_trusted(Namespacing::Always, &t, &evil_pod, &bs, &ids, &evil_ex),
            PodDecision::NoBinding
        );
        let d = decide_trusted(
            Namespacing::Always,
            &t,
            &pod("apps", &[("aadpodidbinding", "x")]),
            &bs,
            &ids,
            &[],
        );
        assert_eq!(names(&d), ["a-id"]);
        let probe = [ex("apps", "probe")];
        assert_eq!(
            decide_trusted(
                Namespacing::Always,
                &t,
                &pod("apps", &[("app", "x")]),
                &bs,
                &ids,
                &probe
            ),
            PodDecision::Excepted
        );
        // no profile: the operator's objects all count
        let op = Trust::of(None);
        assert_eq!(op, Trust::Operator);
        assert_eq!(
            decide_trusted(Namespacing::Always, &op, &evil_pod, &bs, &ids, &evil_ex),
            PodDecision::Excepted
        );
        assert_eq!(
            names(&decide_trusted(
                Namespacing::Always,
                &op,
                &evil_pod,
                &bs,
                &ids,
                &[]
            )),
            ["steal"]
        );
        // the host view's JSON
        let c: ClusterView = serde_json::from_value(serde_json::json!({"podIdentity": {
            "enabled": true, "clientIds": ["CA-1"],
            "identities": [{"namespace": "apps", "name": "a-id", "clientId": "CA-1"}],
            "exceptions": [{"namespace": "apps", "name": "probe"}]}}))
        .unwrap();
        assert_eq!(Trust::of(Some(&c)), t);
    }

    #[test]
    fn the_excepted_exclusion_comes_from_the_profile_only() {
        let c = profile(&[("apps", "a-id", "CA-1")], &[]);
        // a tenant's AzureIdentity carrying the kubelet's client id changes nothing
        let seen: std::collections::HashSet<String> =
            ["kubelet-cid".to_string(), "ca-1".to_string()].into();
        assert_eq!(
            excluded_from_excepted(Some(&c), &seen),
            ["ca-1".to_string()].into()
        );
        assert_eq!(excluded_from_excepted(None, &seen), seen);
    }

    fn uref(cid: &str, oid: &str, name: &str) -> IdentityRef {
        IdentityRef {
            principal_id: oid.into(),
            client_id: cid.into(),
            resource_id: format!("/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"),
            system_assigned: false,
        }
    }

    #[test]
    fn selection_among_a_pods_identities_on_the_host() {
        let host = IdentityIndex::new(CallerIdentities {
            system: Some(IdentityRef {
                principal_id: "sp".into(),
                client_id: "sys".into(),
                resource_id: "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/vm".into(),
                system_assigned: true,
            }),
            user: vec![
                uref("kubelet", "ko", "kubelet"),
                uref("CB", "ob", "b-id"),
                uref("ca", "oa", "a-id"),
            ],
        });
        let bound = |v: &[(&str, &str)]| -> Vec<BoundIdentity> {
            v.iter()
                .map(|(n, c)| BoundIdentity {
                    namespace: "apps".into(),
                    name: n.to_string(),
                    client_id: c.to_string(),
                    resource_id: String::new(),
                })
                .collect()
        };
        let both = bound(&[("a-id", "CA"), ("b-id", "cb")]);
        let pick =
            |b: &[BoundIdentity], s: Selector| select(&host, b, &s).map(|i| i.principal_id.clone());
        assert_eq!(pick(&both, Selector::SystemAssigned), Ok("oa".into()));
        assert_eq!(
            pick(&both, Selector::ClientId("cb".into())),
            Ok("ob".into())
        );
        assert_eq!(
            pick(&both, Selector::ObjectId("OA".into())),
            Ok("oa".into())
        );
        assert_eq!(
            pick(
                &both,
                Selector::ResourceId("/subscriptions/s/resourcegroups/g/providers/microsoft.managedidentity/userassignedidentities/b-id/".into())
            ),
            Ok("ob".into())
        );
        // on the host, but not the pod's: the kubelet identity, the system identity
        for s in [
            Selector::ClientId("kubelet".into()),
            Selector::ObjectId("ko".into()),
            Selector::ClientId("sys".into()),
            Selector::ObjectId("sp".into()),
        ] {
            assert_eq!(pick(&both, s), Err(SelectionError::NotFound));
        }
        // the pod's first identity is not on the host: the next one it holds
        let gone_first = bound(&[("0-gone", "gone"), ("b-id", "cb")]);
        assert_eq!(pick(&gone_first, Selector::SystemAssigned), Ok("ob".into()));
        assert_eq!(
            pick(&gone_first, Selector::ClientId("gone".into())),
            Err(SelectionError::NotFound)
        );
        // a binding naming the system identity's client id never reaches it
        let sys = bound(&[("s", "sys")]);
        assert_eq!(
            pick(&sys, Selector::SystemAssigned),
            Err(SelectionError::NotFound)
        );
        assert_eq!(
            pick(&[], Selector::SystemAssigned),
            Err(SelectionError::NotFound)
        );
    }

    fn q(s: &str) -> Vec<(String, String)> {
        serde_urlencoded::from_str(s).unwrap()
    }

    #[test]
    fn token_requests_as_nmi_reads_them() {
        let r = parse_token_request(&q("resource=https://vault.azure.net")).unwrap();
        assert_eq!(r.resource, "https://vault.azure.net");
        assert_eq!(r.selector, Selector::SystemAssigned);
        // api-version ignored, duplicates tolerated (first wins)
        let r = parse_token_request(&q(
            "resource=api://r1&resource=r2&client_id=c&msi_res_id=/x",
        ))
        .unwrap();
        assert_eq!(
            (r.resource.as_str(), r.selector),
            ("api://r1", Selector::ClientId("c".into()))
        );
        let r = parse_token_request(&q("resource=api://r&object_id=o")).unwrap();
        assert_eq!(r.selector, Selector::ObjectId("o".into()));
        let r = parse_token_request(&q("resource=api://r&client_id=&mi_res_id=/m")).unwrap();
        assert_eq!(r.selector, Selector::ResourceId("/m".into()));
        let r = parse_token_request(&q("resource=api://r&msi_res_id=/a&mi_res_id=/m")).unwrap();
        assert_eq!(r.selector, Selector::ResourceId("/a".into()));
        for s in ["", "api-version=2018-02-01", "resource=", "client_id=c"] {
            assert_eq!(parse_token_request(&q(s)), Err(RESOURCE_EMPTY), "{s}");
        }
        for s in ["resource=%25ZZ", "resource=https://x/%0D%0A", "resource=r"] {
            assert!(parse_token_request(&q(s)).is_err(), "{s}");
        }
    }

    #[test]
    fn messages_redact_client_ids_like_nmi() {
        assert_eq!(
            no_identity_message(&Selector::ClientId(
                "77788899-f67e-42e1-9a78-89985f6bff3e".into()
            )),
            "no azure identity found for request clientID 7778##### REDACTED #####ff3e"
        );
        assert_eq!(
            no_identity_message(&Selector::SystemAssigned),
            "no azure identity found for request clientID "
        );
        assert_eq!(redact_client_id("short"), "short");
    }

    #[test]
    fn routes_in_nmi_order() {
        use Route::*;
        for (p, r) in [
            ("/metadata/identity/oauth2/token", Token),
            ("/METADATA/identity/oauth2/token/", Token),
            ("/Metadata/identity/oauth2/tokenx", Token),
            ("/metadata/identity/oauth2//token", InvalidTokenPath),
            ("/metadata/identity/x/oauth2/y/token", InvalidTokenPath),
            ("/foo/metadata/identityoauth2token", InvalidTokenPath),
            ("/metadata/Identity/oauth2/token", Other),
            ("/metadata/identity/info", Other),
            ("/host/token", HostToken),
            ("/host/token/", HostToken),
            ("/Host/token", Other),
            ("/metadata/instance", BlockedInstance),
            ("/MetaData/instance/compute", BlockedInstance),
            ("/metadata/versions", Other),
            ("/", Other),
            ("", Other),
            ("/metadat", Other),
        ] {
            assert_eq!(route(p, true), r, "{p}");
        }
        assert_eq!(route("/metadata/instance", false), Other);
    }

    #[test]
    fn what_nmi_answers_as_a_token_is_what_the_fair_share_counts() {
        // every path NMI answers with a token, however it is spelled past the prefix
        for p in [
            "/metadata/identity/oauth2/token",
            "/metadata/identity/oauth2/token/",
            "/metadata/identity/oauth2/tokenX",
            "/METADATA/identity/oauth2/token/anything",
            "/host/token",
            "/host/tokenfoo",
            "/host/token/x",
        ] {
            assert!(route(p, true).is_token(), "{p}");
            assert!(route(p, false).is_token(), "{p}");
        }
        for p in [
            "/metadata/identity/oauth2//token",
            "/metadata/identity/info",
            "/metadata/instance",
            "/Host/token",
            "/healthz",
        ] {
            assert!(!route(p, true).is_token(), "{p}");
        }
    }

    #[test]
    fn the_kubenet_guard() {
        let mut c: ClusterView = serde_json::from_value(serde_json::json!({
            "id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.ContainerService/managedClusters/c",
            "networkPlugin": "kubenet",
            "podIdentity": {"enabled": true, "allowNetworkPluginKubenet": false, "clientIds": ["a"]},
            "kubeletIdentity": {"clientId": "k", "objectId": "o", "resourceId": "/r"}
        }))
        .unwrap();
        assert_eq!(c.pod_identity.client_ids, ["a"]);
        assert_eq!(c.kubelet_identity.as_ref().unwrap().client_id, "k");
        let m = kubenet_refusal(Some(&c), false).unwrap();
        assert!(
            m.contains("kubenet") && m.contains("--allow-network-plugin-kubenet"),
            "{m}"
        );
        assert_eq!(kubenet_refusal(Some(&c), true), None);
        c.pod_identity.allow_network_plugin_kubenet = true;
        assert_eq!(kubenet_refusal(Some(&c), false), None);
        c.pod_identity.allow_network_plugin_kubenet = false;
        c.network_plugin = "azure".into();
        assert_eq!(kubenet_refusal(Some(&c), false), None);
        // not a cluster node: nothing to guard
        assert_eq!(kubenet_refusal(None, false), None);
        // partial objects parse with defaults
        let c: ClusterView = serde_json::from_value(serde_json::json!({"id": "x"})).unwrap();
        assert_eq!(c.kubelet_identity, None);
    }

    #[test]
    fn standard_mode_binds_across_namespaces_unless_the_identity_is_namespaced() {
        let mut scoped = ident("shared", "scoped", "cs");
        scoped.namespaced = true;
        let ids = [ident("shared", "shared-id", "cx"), scoped];
        let bs = [
            binding("shared", "b", "shared-id", "foo"),
            binding("shared", "s", "scoped", "foo"),
        ];
        let p = pod("apps", &[("aadpodidbinding", "foo")]);
        assert_eq!(
            names(&decide_in(Namespacing::ByIdentity, &p, &bs, &ids, &[])),
            ["shared-id"],
            "a binding of another namespace selects the pod; the namespaced identity does not"
        );
        assert_eq!(
            decide_in(Namespacing::Always, &p, &bs, &ids, &[]),
            PodDecision::NoBinding
        );
        let home = pod("shared", &[("aadpodidbinding", "foo")]);
        assert_eq!(
            names(&decide_in(Namespacing::ByIdentity, &home, &bs, &ids, &[])),
            ["scoped", "shared-id"]
        );
        // a binding names an identity of its own namespace only
        let bs = [binding("apps", "b", "shared-id", "foo")];
        assert_eq!(
            decide_in(Namespacing::ByIdentity, &p, &bs, &ids, &[]),
            PodDecision::NoBinding
        );
        // the pairs carry the binding
        let bs = [binding("shared", "b", "shared-id", "foo")];
        let m = matches(Namespacing::ByIdentity, &p, &bs, &ids);
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].0.name.as_str(), m[0].1.name.as_str()),
            ("b", "shared-id")
        );
    }
}
