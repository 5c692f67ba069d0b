//! The pod-identity add-on (what AKS runs for `podIdentityProfile` in managed mode): a
//! controller in the cluster that authenticates to Keyless with a managed identity through its
//! node's IMDS, reads its cluster's `podIdentityProfile`, and keeps the `aadpodidentity.k8s.io`
//! objects in step:
//!
//! - per pod identity `<name>` in `<namespace>`: `AzureIdentity <name>` (type 0, resourceID,
//!   clientID) and `AzureIdentityBinding <name>-binding` (selector = `bindingSelector`, or the
//!   name), the namespace created when missing;
//! - per exception: `AzurePodIdentityException <name>` with its `podLabels`; and while the
//!   add-on is enabled `aks-addon-exception` in `kube-system` for pods labelled
//!   `kubernetes.azure.com/managedby: aks`;
//! - every object labelled `addonmanager.kubernetes.io/mode: Reconcile` and
//!   `kubernetes.azure.com/managedby: aks`; edits to them are reverted and objects carrying those
//!   labels that the profile no longer names are deleted.
//!
//! It reports each pod identity's `provisioningState` back (`Assigned`, or `Failed` with the
//! error). Each pass is a reconcile with an error policy (back-off), triggered by a change to a
//! managed object or by the profile poll; only the holder of the `keyless-pod-identity-addon`
//! Lease in `kube-system` reconciles, so several replicas can run.

use crate::crd::{
    AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec,
    AzurePodIdentityException, AzurePodIdentityExceptionSpec,
};
use crate::K8sError;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::watcher;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

/// The add-on's defaults, in one place.
pub mod defaults {
    use std::time::Duration;
    /// How often the cluster's profile is read when nothing else triggers a pass.
    pub const PROFILE_POLL: Duration = Duration::from_secs(5);
    /// Back-off after a failed pass: from `RETRY_MIN`, doubling to `RETRY_MAX`.
    pub const RETRY_MIN: Duration = Duration::from_millis(500);
    pub const RETRY_MAX: Duration = Duration::from_secs(30);
    /// The Lease: its name and namespace, how long it holds, how often the holder renews.
    pub const LEASE_NAME: &str = "keyless-pod-identity-addon";
    pub const LEASE_NAMESPACE: &str = "kube-system";
    pub const LEASE_SECONDS: i32 = 15;
    pub const LEASE_RENEW: Duration = Duration::from_secs(5);
    /// The containerservice api-version of the add-on's calls.
    pub const API_VERSION: &str = "2024-02-01";
    /// Field manager of the server-side applies.
    pub const FIELD_MANAGER: &str = "keyless-pod-identity-addon";
}

/// The labels AKS puts on what the add-on manages.
pub const MANAGED_LABELS: [(&str, &str); 2] = [
    ("addonmanager.kubernetes.io/mode", "Reconcile"),
    ("kubernetes.azure.com/managedby", "aks"),
];
/// The exception AKS creates so its own add-ons keep reaching IMDS.
pub const ADDON_EXCEPTION: &str = "aks-addon-exception";

fn managed_selector() -> String {
    MANAGED_LABELS
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Errors of one reconcile pass.
#[derive(Debug, thiserror::Error)]
pub enum AddonError {
    #[error(transparent)]
    Arm(#[from] crate::arm::ArmError),
    #[error("the cluster's podIdentityProfile is unusable: {0}")]
    Profile(String),
    #[error(transparent)]
    K8s(#[from] K8sError),
}

impl From<kube::Error> for AddonError {
    fn from(e: kube::Error) -> Self {
        AddonError::K8s(K8sError::Api(e))
    }
}

/// Settings of `keyless pod-identity-addon`.
#[derive(Debug, Clone)]
pub struct AddonConfig {
    /// ARM id of the managed cluster.
    pub cluster_id: String,
    /// Keyless server (ARM endpoint) base URLs: replicas, tried in order when one cannot
    /// answer (`keyless_ops::failover`).
    pub server_urls: Vec<String>,
    /// PEM of the Keyless CA.
    pub ca_pem: String,
    /// IMDS token endpoint of the node (`http://169.254.169.254/metadata/identity/oauth2/token`).
    pub imds_token_endpoint: String,
    /// The identity to authenticate as (the cluster's kubelet identity).
    pub client_id: Option<String>,
    pub profile_poll: Duration,
    /// This replica's name in the Lease.
    pub holder: String,
}

/// One pod identity of the profile, as the add-on needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub name: String,
    pub namespace: String,
    pub selector: String,
    pub resource_id: String,
    pub client_id: String,
    pub provisioning_state: Option<String>,
    pub error_message: Option<String>,
}

/// One exception of the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodException {
    pub name: String,
    pub namespace: String,
    pub pod_labels: BTreeMap<String, String>,
}

/// What the add-on reads of `podIdentityProfile`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub enabled: bool,
    pub identities: Vec<PodIdentity>,
    pub exceptions: Vec<PodException>,
}

fn s(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

impl Profile {
    /// Parse `podIdentityProfile` (absent → disabled).
    pub fn parse(p: &Value) -> Result<Profile, AddonError> {
        if p.is_null() {
            return Ok(Profile::default());
        }
        let bad = |what: &str| AddonError::Profile(what.to_string());
        let identities = p
            .get("userAssignedIdentities")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|e| {
                let name = s(e, "name").ok_or_else(|| bad("a pod identity without a name"))?;
                let id = e.get("identity").cloned().unwrap_or(Value::Null);
                Ok(PodIdentity {
                    selector: s(e, "bindingSelector")
                        .filter(|b| !b.is_empty())
                        .unwrap_or_else(|| name.clone()),
                    namespace: s(e, "namespace")
                        .ok_or_else(|| bad("a pod identity without a namespace"))?,
                    resource_id: s(&id, "resourceId")
                        .ok_or_else(|| bad("a pod identity without identity.resourceId"))?,
                    client_id: s(&id, "clientId")
                        .ok_or_else(|| bad("a pod identity without identity.clientId"))?,
                    provisioning_state: s(e, "provisioningState"),
                    error_message: e
                        .pointer("/provisioningInfo/error/error/message")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    name,
                })
            })
            .collect::<Result<Vec<_>, AddonError>>()?;
        let exceptions = p
            .get("userAssignedIdentityExceptions")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|e| {
                Ok(PodException {
                    name: s(e, "name").ok_or_else(|| bad("an exception without a name"))?,
                    namespace: s(e, "namespace")
                        .ok_or_else(|| bad("an exception without a namespace"))?,
                    pod_labels: e
                        .get("podLabels")
                        .and_then(Value::as_object)
                        .map(|m| {
                            m.iter()
                                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect::<Result<Vec<_>, AddonError>>()?;
        Ok(Profile {
            enabled: p.get("enabled").and_then(Value::as_bool).unwrap_or(false),
            identities,
            exceptions,
        })
    }
}

/// The objects the profile asks for.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub namespaces: BTreeSet<String>,
    pub identities: Vec<AzureIdentity>,
    pub bindings: Vec<AzureIdentityBinding>,
    pub exceptions: Vec<AzurePodIdentityException>,
}

fn meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(
            MANAGED_LABELS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

/// The binding's name for pod identity `name` (AKS: `<name>-binding`).
pub fn binding_name(name: &str) -> String {
    format!("{name}-binding")
}

/// The objects `profile` asks for (none when the add-on is disabled).
pub fn desired(profile: &Profile) -> Desired {
    let mut d = Desired::default();
    if !profile.enabled {
        return d;
    }
    for p in &profile.identities {
        d.namespaces.insert(p.namespace.clone());
        d.identities.push(AzureIdentity {
            metadata: meta(&p.name, &p.namespace),
            spec: AzureIdentitySpec {
                type_: 0,
                resource_id: Some(p.resource_id.clone()),
                client_id: Some(p.client_id.clone()),
                ..Default::default()
            },
            status: None,
        });
        d.bindings.push(AzureIdentityBinding {
            metadata: meta(&binding_name(&p.name), &p.namespace),
            spec: AzureIdentityBindingSpec {
                azure_identity: p.name.clone(),
                selector: p.selector.clone(),
                weight: None,
            },
            status: None,
        });
    }
    let addon = PodException {
        name: ADDON_EXCEPTION.to_string(),
        namespace: "kube-system".to_string(),
        pod_labels: [(
            "kubernetes.azure.com/managedby".to_string(),
            "aks".to_string(),
        )]
        .into(),
    };
    for e in std::iter::once(&addon).chain(profile.exceptions.iter()) {
        d.namespaces.insert(e.namespace.clone());
        d.exceptions.push(AzurePodIdentityException {
            metadata: meta(&e.name, &e.namespace),
            spec: AzurePodIdentityExceptionSpec {
                pod_labels: e.pod_labels.clone(),
            },
            status: None,
        });
    }
    d
}

/// True when the live object already has the desired spec and labels.
fn in_step<K: Resource + Serialize>(live: &K, want: &K) -> bool {
    let spec = |k: &K| serde_json::to_value(k).ok().map(|v| v["spec"].clone());
    let labels_ok = want.meta().labels.iter().flatten().all(|(k, v)| {
        live.meta()
            .labels
            .as_ref()
            .and_then(|l| l.get(k))
            .is_some_and(|lv| lv == v)
    });
    labels_ok && spec(live) == spec(want)
}

fn key<K: Resource>(k: &K) -> (String, String) {
    (
        k.meta().namespace.clone().unwrap_or_default(),
        k.meta().name.clone().unwrap_or_default(),
    )
}

/// `d` as a `K`, or None (with a warning) when it does not read as one.
pub fn typed_item<K: Resource<DynamicType = ()> + DeserializeOwned>(
    d: &DynamicObject,
) -> Option<K> {
    let v = serde_json::to_value(d).ok()?;
    match serde_json::from_value::<K>(v) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(
                kind = %K::kind(&()),
                namespace = d.metadata.namespace.as_deref().unwrap_or(""),
                name = d.metadata.name.as_deref().unwrap_or(""),
                error = %e,
                "object does not read as its kind; treated as out of step"
            );
            None
        }
    }
}

/// Apply what is out of step, delete managed objects no longer wanted. Returns the error of
/// each `(namespace, name)` that could not be applied.
async fn sync_kind<K>(
    client: &kube::Client,
    want: &[K],
) -> Result<BTreeMap<(String, String), String>, AddonError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    // listed untyped and read item by item: one object the typed list cannot read (an
    // out-of-range integer the API server stored) is out of step, not a failed list
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<K>(&()));
    let live = all
        .list(&ListParams::default().labels(&managed_selector()))
        .await?;
    let live: BTreeMap<_, Option<K>> = live
        .items
        .into_iter()
        .map(|d| {
            let k = key(&d);
            let typed = typed_item::<K>(&d);
            (k, typed)
        })
        .collect();
    let mut failed = BTreeMap::new();
    let pp = PatchParams::apply(defaults::FIELD_MANAGER).force();
    for w in want {
        let k = key(w);
        if live
            .get(&k)
            .is_some_and(|l| l.as_ref().is_some_and(|l| in_step(l, w)))
        {
            continue;
        }
        let api: Api<K> = Api::namespaced(client.clone(), &k.0);
        let mut body = serde_json::to_value(w).map_err(|e| AddonError::Profile(e.to_string()))?;
        if let Some(o) = body.as_object_mut() {
            o.remove("status");
        }
        match api.patch(&k.1, &pp, &Patch::Apply(&body)).await {
            Ok(_) => tracing::info!(namespace = %k.0, name = %k.1, kind = %K::kind(&()), "applied"),
            Err(e) => {
                tracing::warn!(namespace = %k.0, name = %k.1, error = %e, "apply failed");
                failed.insert(k, e.to_string());
            }
        }
    }
    let wanted: BTreeSet<_> = want.iter().map(key).collect();
    for k in live.keys().filter(|k| !wanted.contains(*k)) {
        let api: Api<K> = Api::namespaced(client.clone(), &k.0);
        match api.delete(&k.1, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(namespace = %k.0, name = %k.1, kind = %K::kind(&()), "deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(failed)
}

async fn ensure_namespaces(
    client: &kube::Client,
    names: &BTreeSet<String>,
) -> BTreeMap<String, String> {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut failed = BTreeMap::new();
    for n in names {
        match api.get_opt(n).await {
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(e) => {
                failed.insert(n.clone(), e.to_string());
                continue;
            }
        }
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(n.clone()),
                labels: Some(
                    [(
                        MANAGED_LABELS[1].0.to_string(),
                        MANAGED_LABELS[1].1.to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => tracing::info!(namespace = %n, "namespace created"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                failed.insert(n.clone(), e.to_string());
            }
        }
    }
    failed
}

/// The add-on's calls to its cluster's actions, with its managed identity.
struct Arm {
    arm: crate::arm::Arm,
    cluster_id: String,
}

impl Arm {
    fn new(cfg: &AddonConfig) -> Result<Arm, AddonError> {
        let arm = crate::arm::Arm::new(&crate::arm::ArmConfig {
            server_urls: cfg.server_urls.clone(),
            ca_pem: cfg.ca_pem.clone(),
            imds_token_endpoint: cfg.imds_token_endpoint.clone(),
            client_id: cfg.client_id.clone(),
        })?;
        Ok(Arm {
            arm,
            cluster_id: cfg.cluster_id.clone(),
        })
    }

    async fn post(&self, action: &str, body: &Value) -> Result<Value, AddonError> {
        Ok(self
            .arm
            .action(&self.cluster_id, action, defaults::API_VERSION, body)
            .await?)
    }
}

/// The reports for entries whose state differs from what the profile already says.
pub fn reports(profile: &Profile, failed: &BTreeMap<(String, String), String>) -> Vec<Value> {
    profile
        .identities
        .iter()
        .filter_map(|p| {
            let err = failed.get(&(p.namespace.clone(), p.name.clone()));
            let state = if err.is_some() { "Failed" } else { "Assigned" };
            if p.provisioning_state.as_deref() == Some(state) && p.error_message.as_ref() == err {
                return None;
            }
            let mut r =
                json!({"name": p.name, "namespace": p.namespace, "provisioningState": state});
            if let Some(m) = err {
                r["error"] = json!({"code": "PodIdentityAddonError", "message": m});
            }
            Some(r)
        })
        .collect()
}

/// Bring the cluster to `want`: namespaces, then the three kinds (apply what is out of step,
/// delete managed objects no longer wanted). Returns the error of each pod identity
/// `(namespace, name)` whose objects could not be applied.
pub async fn apply_desired(
    client: &kube::Client,
    want: &Desired,
) -> Result<BTreeMap<(String, String), String>, AddonError> {
    let ns_failed = ensure_namespaces(client, &want.namespaces).await;
    let mut failed = sync_kind(client, &want.identities).await?;
    for ((ns, name), e) in sync_kind(client, &want.bindings).await? {
        // a binding failure is its pod identity's failure
        let id = name.strip_suffix("-binding").unwrap_or(&name).to_string();
        failed.entry((ns, id)).or_insert(e);
    }
    sync_kind(client, &want.exceptions).await?;
    for i in &want.identities {
        let (ns, name) = key(i);
        if let Some(e) = ns_failed.get(&ns) {
            failed
                .entry((ns.clone(), name))
                .or_insert_with(|| format!("namespace {ns}: {e}"));
        }
    }
    Ok(failed)
}

/// One reconcile pass.
async fn reconcile(client: &kube::Client, arm: &Arm) -> Result<(), AddonError> {
    let read = arm.post("readPodIdentityProfile", &json!({})).await?;
    let profile = Profile::parse(&read["podIdentityProfile"])?;
    let failed = apply_desired(client, &desired(&profile)).await?;
    let reports = reports(&profile, &failed);
    if !reports.is_empty() {
        arm.post(
            "reportPodIdentityStatus",
            &json!({"userAssignedIdentities": reports}),
        )
        .await?;
        tracing::info!(count = reports.len(), "reported provisioning states");
    }
    Ok(())
}

/// The add-on's Lease.
fn lease(holder: &str) -> crate::lease::LeaseConfig {
    crate::lease::LeaseConfig {
        name: defaults::LEASE_NAME.to_string(),
        namespace: defaults::LEASE_NAMESPACE.to_string(),
        seconds: defaults::LEASE_SECONDS,
        holder: holder.to_string(),
    }
}

/// A change to any managed object wakes the reconciler.
fn watch_managed<K>(client: &kube::Client, wake: Arc<tokio::sync::Notify>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    // untyped: one object that does not read as K cannot stop the watch
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<K>(&()));
    let cfg = watcher::Config::default().labels(&managed_selector());
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(api, cfg));
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => wake.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "watch of managed objects interrupted");
                    tokio::time::sleep(defaults::RETRY_MIN).await;
                }
            }
        }
    });
}

/// Run the add-on until `shutdown` resolves. `ready` is called after the first successful pass.
pub async fn run(
    cfg: AddonConfig,
    client: kube::Client,
    shutdown: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(),
) -> Result<(), AddonError> {
    let arm = Arm::new(&cfg)?;
    let lease = lease(&cfg.holder);
    let wake = Arc::new(tokio::sync::Notify::new());
    watch_managed::<AzureIdentity>(&client, wake.clone());
    watch_managed::<AzureIdentityBinding>(&client, wake.clone());
    watch_managed::<AzurePodIdentityException>(&client, wake.clone());
    let mut ready = Some(ready);
    let mut backoff = defaults::RETRY_MIN;
    let mut lease_checked = tokio::time::Instant::now() - defaults::LEASE_RENEW;
    let mut leader = false;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let mut wait = cfg.profile_poll;
        if lease_checked.elapsed() >= defaults::LEASE_RENEW || !leader {
            match crate::lease::hold(&client, &lease).await {
                Ok(l) => {
                    if l != leader {
                        tracing::info!(leader = l, "pod-identity add-on lease");
                    }
                    leader = l;
                    lease_checked = tokio::time::Instant::now();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease");
                    leader = false;
                }
            }
        }
        if leader {
            match reconcile(&client, &arm).await {
                Ok(()) => {
                    backoff = defaults::RETRY_MIN;
                    if let Some(r) = ready.take() {
                        r();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "pod-identity reconcile failed");
                    wait = backoff;
                    backoff = (backoff * 2).min(defaults::RETRY_MAX);
                }
            }
        } else {
            wait = wait.min(defaults::LEASE_RENEW);
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = wake.notified() => {},
            _ = tokio::time::sleep(wait) => {},
        }
    }
}

/// Apply the four CRDs (server-side apply) and wait until the API server serves them.
pub async fn install_crds(client: &kube::Client) -> Result<(), AddonError> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply(defaults::FIELD_MANAGER).force();
    for crd in crate::crd::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &pp, &Patch::Apply(&crd)).await?;
    }
    for crd in crate::crd::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let cond = kube::runtime::conditions::is_crd_established();
        tokio::time::timeout(
            Duration::from_secs(30),
            kube::runtime::wait::await_condition(api.clone(), &name, cond),
        )
        .await
        .map_err(|_| AddonError::Profile(format!("CRD {name} not established within 30 s")))?
        .map_err(|e| AddonError::Profile(format!("CRD {name}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Value {
        json!({
            "enabled": true,
            "userAssignedIdentities": [
                {"name": "my-pod-identity", "namespace": "my-app",
                 "identity": {"resourceId": "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a", "clientId": "c1", "objectId": "o1"},
                 "provisioningState": "Updating"},
                {"name": "two", "namespace": "my-app", "bindingSelector": "foo",
                 "identity": {"resourceId": "/r2", "clientId": "c2", "objectId": "o2"},
                 "provisioningState": "Assigned"}
            ],
            "userAssignedIdentityExceptions": [
                {"name": "ex", "namespace": "my-app", "podLabels": {"app": "probe"}}
            ]
        })
    }

    #[test]
    fn desired_objects_follow_aks_names_and_labels() {
        let p = Profile::parse(&profile()).unwrap();
        let d = desired(&p);
        assert_eq!(d.identities.len(), 2);
        assert_eq!(
            d.identities[0].metadata.name.as_deref(),
            Some("my-pod-identity")
        );
        assert_eq!(d.identities[0].spec.client_id.as_deref(), Some("c1"));
        assert_eq!(d.identities[0].spec.type_, 0);
        assert_eq!(
            d.bindings[0].metadata.name.as_deref(),
            Some("my-pod-identity-binding")
        );
        // no bindingSelector: the name; otherwise the selector
        assert_eq!(d.bindings[0].spec.selector, "my-pod-identity");
        assert_eq!(d.bindings[1].spec.selector, "foo");
        assert_eq!(d.bindings[1].spec.azure_identity, "two");
        let ex: Vec<_> = d
            .exceptions
            .iter()
            .map(|e| {
                (
                    e.metadata.namespace.clone().unwrap(),
                    e.metadata.name.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ex,
            [
                ("kube-system".to_string(), ADDON_EXCEPTION.to_string()),
                ("my-app".to_string(), "ex".to_string())
            ]
        );
        assert_eq!(
            d.exceptions[0].spec.pod_labels["kubernetes.azure.com/managedby"],
            "aks"
        );
        for l in [
            &d.identities[0].metadata.labels,
            &d.bindings[0].metadata.labels,
        ] {
            let l = l.as_ref().unwrap();
            assert_eq!(l["kubernetes.azure.com/managedby"], "aks");
            assert_eq!(l["addonmanager.kubernetes.io/mode"], "Reconcile");
        }
        assert_eq!(
            d.namespaces.iter().collect::<Vec<_>>(),
            ["kube-system", "my-app"]
        );
    }

    #[test]
    fn disabled_profile_wants_nothing() {
        let mut p = profile();
        p["enabled"] = json!(false);
        for d in [
            desired(&Profile::parse(&p).unwrap()),
            desired(&Profile::parse(&Value::Null).unwrap()),
        ] {
            assert!(d.namespaces.is_empty() && d.identities.is_empty());
            assert!(d.bindings.is_empty() && d.exceptions.is_empty());
        }
    }

    #[test]
    fn reports_only_changes() {
        let p = Profile::parse(&profile()).unwrap();
        let r = reports(&p, &BTreeMap::new());
        // the Updating entry becomes Assigned; the Assigned one is not reported again
        assert_eq!(r.len(), 1);
        assert_eq!(r[0]["name"], "my-pod-identity");
        assert_eq!(r[0]["provisioningState"], "Assigned");
        let failed = [(
            ("my-app".to_string(), "two".to_string()),
            "boom".to_string(),
        )]
        .into();
        let r = reports(&p, &failed);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1]["provisioningState"], "Failed");
        assert_eq!(r[1]["error"]["message"], "boom");
    }

    #[test]
    fn in_step_compares_spec_and_labels() {
        let p = Profile::parse(&profile()).unwrap();
        let d = desired(&p);
        let want = &d.bindings[1];
        let mut live = want.clone();
        assert!(in_step(&live, want));
        live.spec.selector = "edited".into();
        assert!(!in_step(&live, want));
        let mut live = want.clone();
        live.metadata
            .labels
            .as_mut()
            .unwrap()
            .remove("kubernetes.azure.com/managedby");
        assert!(!in_step(&live, want));
        let mut live = want.clone();
        live.metadata.resource_version = Some("42".into());
        assert!(in_step(&live, want));
    }

    #[test]
    fn bad_profiles_are_refused() {
        let p =
            json!({"enabled": true, "userAssignedIdentities": [{"name": "x", "namespace": "n"}]});
        assert!(Profile::parse(&p).is_err());
    }
}
