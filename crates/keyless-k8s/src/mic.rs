//! MIC, the standard-mode controller (`keyless mic`): keeps one `AzureAssignedIdentity` per
//! pod × identity its bindings select, and the user-assigned identities those need attached to
//! the nodes' VMs / scale sets through Keyless ARM, with its own managed identity (from its
//! node's IMDS; it needs Virtual Machine Contributor on the node resource group and Managed
//! Identity Operator on the identities, and reports ARM's refusal on the objects otherwise).
//!
//! Caches: reflectors over pods, nodes and the four kinds (the CRD kinds untyped, read field by
//! field, `crate::crd::read`). Any event wakes the loop; events arriving within
//! [`defaults::DEBOUNCE`] make one sync, and a sync runs at least every `resync` (self-healing:
//! an identity removed from a scale set by hand is attached again). A sync is the plan of
//! `keyless_core::mic::plan` carried out: objects written (`Created`), then per VM / scale set
//! one GET and at most one PATCH (If-Match its ETag) adding and removing every identity that
//! changed, then the objects marked `Assigned`, or `Unassigned` and deleted. A failed sync
//! backs off (`RETRY_MIN` doubling to `RETRY_MAX`). Only the holder of the Lease syncs; other
//! replicas keep their caches warm and take over when the holder stops renewing.

use crate::arm::{Arm, ArmConfig, ArmError};
use crate::crd::{read, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding};
use crate::lease::{self, LeaseConfig};
use crate::reflect::reflect;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use keyless_core::mic::{self as core, Assignment, Existing, Key, Plan};
use keyless_core::pod_identity::{self as pi, Namespacing};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::Resource;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// MIC's defaults, in one place.
pub mod defaults {
    use std::time::Duration;
    /// Upstream's Lease name; namespace: `$POD_NAMESPACE`, else `default` (upstream).
    pub const LEASE_NAME: &str = "aad-pod-identity-mic";
    pub const LEASE_NAMESPACE: &str = "default";
    pub const LEASE_SECONDS: i32 = 15;
    pub const LEASE_RENEW: Duration = Duration::from_secs(5);
    /// Events within this window after the first make one sync.
    pub const DEBOUNCE: Duration = Duration::from_millis(200);
    /// A full sync at least this often (re-attaches identities removed by hand).
    pub const RESYNC: Duration = Duration::from_secs(60);
    pub const RETRY_MIN: Duration = Duration::from_millis(500);
    pub const RETRY_MAX: Duration = Duration::from_secs(30);
    /// Object writes in flight at once (upstream `--createDeleteBatch`).
    pub const WRITES_IN_FLIGHT: usize = 20;
    /// The compute api-version of the VM / scale set calls.
    pub const COMPUTE_API_VERSION: &str = "2023-09-01";
}

/// Settings of `keyless mic`.
#[derive(Debug, Clone)]
pub struct MicConfig {
    pub arm: ArmConfig,
    pub lease: LeaseConfig,
    /// Client ids never detached (`--immutable-user-msis`; MIC's own identity is added).
    pub immutable: Vec<String>,
    pub namespacing: Namespacing,
    pub resync: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum MicError {
    #[error(transparent)]
    Arm(#[from] ArmError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The caches could not list.
    #[error("caches: {0}")]
    Caches(String),
    /// Writes of this sync that failed (objects, VM / scale-set identity writes).
    #[error("{}", .0.join("; "))]
    Writes(Vec<String>),
}

/// The caches a sync reads.
#[derive(Clone)]
struct Caches {
    pods: Store<Pod>,
    nodes: Store<Node>,
    identities: Store<DynamicObject>,
    bindings: Store<DynamicObject>,
    assigned: Store<DynamicObject>,
}

fn erased<K: Resource<DynamicType = ()>>() -> ApiResource {
    ApiResource::erase::<K>(&())
}

/// The pods as MIC's rules see them.
fn scheduled(p: &Pod) -> Option<core::ScheduledPod> {
    let f = read::pod(p)?;
    Some(core::ScheduledPod {
        finished: matches!(f.phase.as_str(), "Succeeded" | "Failed"),
        pod: f.pod,
        node: f.node,
    })
}

/// The object MIC writes for `a` (spec only; the status follows), annotated with the VM /
/// scale set its identity goes to.
fn object(key: &Key, a: &Assignment, target: Option<&str>) -> Value {
    let id = &a.identity;
    let mut id_meta = json!({"name": id.name, "namespace": id.namespace});
    if id.namespaced {
        id_meta["annotations"] = json!({crate::crd::BEHAVIOR_ANNOTATION: "namespaced"});
    }
    json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureAssignedIdentity",
        "metadata": {
            "name": key.1, "namespace": key.0, "labels": {"nodename": a.node},
            "annotations": target.map(|t| json!({core::TARGET_ANNOTATION: t})).unwrap_or(json!({})),
        },
        "spec": {
            "azureIdentityRef": {"metadata": id_meta, "spec": {"type": id.type_, "clientID": id.client_id, "resourceID": id.resource_id}},
            "azureBindingRef": {"metadata": {"name": a.binding.1, "namespace": a.binding.0}},
            "pod": a.pod,
            "podNamespace": a.pod_namespace,
            "nodename": a.node,
        }
    })
}

struct Mic {
    client: kube::Client,
    arm: Arm,
    cfg: MicConfig,
    immutable: HashSet<String>,
    /// Whether this replica holds the Lease now (the lease task's view).
    lead: tokio::sync::watch::Receiver<bool>,
}

/// What a target's GET said.
struct TargetState {
    identity: Value,
    etag: Option<String>,
    attached: BTreeSet<String>,
}

impl Mic {
    fn leading(&self) -> bool {
        *self.lead.borrow()
    }

    fn assigned_api(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &erased::<AzureAssignedIdentity>())
    }

    async fn get_target(&self, id: &str) -> Result<TargetState, ArmError> {
        let path = format!("{id}?api-version={}", defaults::COMPUTE_API_VERSION);
        let (v, etag) = self
            .arm
            .call(reqwest::Method::GET, &path, None, None)
            .await?;
        let identity = v["identity"].clone();
        let attached = identity["userAssignedIdentities"]
            .as_object()
            .map(|m| m.keys().map(|k| k.to_ascii_lowercase()).collect())
            .unwrap_or_default();
        let etag = etag.or_else(|| v["etag"].as_str().map(str::to_string));
        Ok(TargetState {
            identity,
            etag,
            attached,
        })
    }

    async fn set_status(
        &self,
        key: &Key,
        state: &str,
        error: Option<(&str, &str)>,
    ) -> Result<(), kube::Error> {
        let err = match error {
            Some((code, message)) => json!({"code": code, "message": message}),
            None => Value::Null,
        };
        let patch = json!({"status": {"status": state, "error": err}});
        self.assigned_api(&key.0)
            .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
    }

    /// Create the object, or rewrite it (status back to `Created` first, so it never says
    /// `Assigned` with a spec not yet attached); then status `Created` (with `error`).
    async fn write(
        &self,
        key: &Key,
        a: &Assignment,
        target: Option<&str>,
        error: Option<(&str, &str)>,
    ) -> Result<(), kube::Error> {
        let api = self.assigned_api(&key.0);
        let body = object(key, a, target);
        let obj: DynamicObject =
            serde_json::from_value(body.clone()).map_err(kube::Error::SerdeError)?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.set_status(key, "Created", error).await?;
                let patch = json!({"metadata": body["metadata"], "spec": body["spec"]});
                api.patch(&key.1, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        self.set_status(key, "Created", error).await
    }

    async fn remove(&self, key: &Key) -> Result<(), kube::Error> {
        match self.set_status(key, "Unassigned", None).await {
            Ok(()) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(e),
        }
        match self
            .assigned_api(&key.0)
            .delete(&key.1, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Run `f` over `items`, [`defaults::WRITES_IN_FLIGHT`] at a time: the errors, each
    /// naming its object (one object the API server refuses does not stop the others).
    async fn each<T, F, Fut>(&self, items: Vec<T>, f: F) -> Vec<String>
    where
        F: Fn(T) -> Fut,
        Fut: std::future::Future<Output = Result<(), kube::Error>>,
    {
        let results: Vec<Result<(), kube::Error>> = futures::stream::iter(items.into_iter().map(f))
            .buffer_unordered(defaults::WRITES_IN_FLIGHT)
            .collect()
            .await;
        results
            .into_iter()
            .filter_map(|r| r.err())
            .map(|e| {
                tracing::warn!(error = %e, "AzureAssignedIdentity write failed");
                e.to_string()
            })
            .collect()
    }

    /// One sync.
    async fn sync(&self, c: &Caches) -> Result<Outcome, MicError> {
        let mode = self.cfg.namespacing;
        let pods: Vec<core::ScheduledPod> =
            c.pods.state().iter().filter_map(|p| scheduled(p)).collect();
        let bindings: Vec<pi::Binding> = c
            .bindings
            .state()
            .iter()
            .filter_map(|o| read::binding(o))
            .collect();
        let identities: Vec<pi::AzureIdentity> = c
            .identities
            .state()
            .iter()
            .filter_map(|o| read::identity(o))
            .collect();
        let want = core::desired(mode, &pods, &bindings, &identities);
        let existing: BTreeMap<Key, Existing> = c
            .assigned
            .state()
            .iter()
            .filter_map(|o| read::assigned(o))
            .collect();
        let targets: BTreeMap<String, String> = c
            .nodes
            .state()
            .iter()
            .filter_map(|n| {
                let name = n.metadata.name.clone()?;
                let pid = n.spec.as_ref()?.provider_id.clone()?;
                Some((name, core::target_of_provider_id(&pid)?))
            })
            .collect();
        let target_of = |node: &str| targets.get(node).cloned();
        // one GET per VM / scale set involved
        let involved: BTreeSet<String> = want
            .values()
            .map(|a| &a.node)
            .chain(existing.values().map(|e| &e.assignment.node))
            .filter_map(|n| target_of(n))
            .chain(existing.values().filter_map(|e| e.target.clone()))
            .collect();
        let mut states: BTreeMap<String, TargetState> = BTreeMap::new();
        let mut get_errors: BTreeMap<String, ArmError> = BTreeMap::new();
        for t in &involved {
            match self.get_target(t).await {
                Ok(s) => {
                    states.insert(t.to_ascii_lowercase(), s);
                }
                Err(e) => {
                    tracing::warn!(target = %t, error = %e, "cannot read the VM / scale set");
                    get_errors.insert(t.to_ascii_lowercase(), e);
                }
            }
        }
        let attached = |t: &str| {
            states
                .get(&t.to_ascii_lowercase())
                .map(|s| s.attached.clone())
        };
        let plan: Plan = core::plan(&want, &existing, &target_of, &attached, &self.immutable);

        // objects first (status Created)
        let unplaced: HashSet<&Key> = plan.unplaced.iter().collect();
        let no_target = (
            "NodeNotPlaced",
            "the node's spec.providerID names no VM or scale set",
        );
        let unplaced = &unplaced;
        let target_of = &target_of;
        let mut failed = self
            .each(plan.write.iter().collect(), |(k, a)| async move {
                let err = unplaced.contains(k).then_some(no_target);
                self.write(k, a, target_of(&a.node).as_deref(), err).await
            })
            .await;
        // wants not assigned yet whose target could not be read carry that error (an
        // Assigned one stays served: its identity is attached, a failed read changes nothing)
        for (k, a) in &want {
            if existing.get(k).is_some_and(|x| x.state.servable()) {
                continue;
            }
            if let Some(e) =
                target_of(&a.node).and_then(|t| get_errors.get(&t.to_ascii_lowercase()))
            {
                let code = e.code().unwrap_or("TargetUnreadable").to_string();
                if existing
                    .get(k)
                    .and_then(|x| x.error.as_ref())
                    .map(|e| e.0.as_str())
                    != Some(code.as_str())
                {
                    if let Err(e) = self
                        .set_status(k, "Created", Some((&code, &e.message())))
                        .await
                    {
                        failed.push(format!("{}/{}: {e}", k.0, k.1));
                    }
                }
            }
        }
        let mut outcome = Outcome {
            again: !plan.deferred.is_empty(),
            failed,
            ..Outcome::default()
        };
        for (t, change) in &plan.targets {
            if !self.leading() {
                outcome
                    .failed
                    .push("lost the Lease: this sync stops before its next write".into());
                return Ok(outcome);
            }
            let state = &states[t];
            let id = involved
                .iter()
                .find(|x| x.eq_ignore_ascii_case(t))
                .cloned()
                .unwrap_or_else(|| t.clone());
            let (written, refused) = self.write_target(&id, state, change).await;
            outcome.refused |= !refused.is_empty();
            // what each object waiting for this write is told
            let verdict = |k: &Key| -> Option<(String, String)> {
                let rid = want
                    .get(k)
                    .map(|a| a.identity.resource_id.to_ascii_lowercase())?;
                if let Some(e) = refused.get(&rid) {
                    return Some((e.code().unwrap_or("WriteFailed").to_string(), e.message()));
                }
                written
                    .as_ref()
                    .err()
                    .map(|e| (e.code().unwrap_or("WriteFailed").to_string(), e.message()))
            };
            let verdicts: Vec<(&Key, Option<(String, String)>)> =
                change.assign.iter().map(|k| (k, verdict(k))).collect();
            let errs = self
                .each(verdicts, |(k, v)| async move {
                    match &v {
                        None => self.set_status(k, "Assigned", None).await,
                        Some((code, msg)) => self.set_status(k, "Created", Some((code, msg))).await,
                    }
                })
                .await;
            outcome.failed.extend(errs);
            match written {
                // removed objects go once their detach is written; else they stay for the retry
                Ok(()) => {
                    let errs = self
                        .each(change.delete.iter().collect(), |k| self.remove(k))
                        .await;
                    outcome.failed.extend(errs);
                }
                Err(e) => outcome.failed.push(format!("{id}: {e}")),
            }
        }
        let errs = self
            .each(plan.orphaned.iter().collect(), |k| self.remove(k))
            .await;
        outcome.failed.extend(errs);
        Ok(outcome)
    }

    /// The one identity write of a VM / scale set for `change`: Ok when written (or nothing to
    /// write). An identity ARM refuses MIC by name (`LinkedAuthorizationFailed`: no assign
    /// permission on it) is dropped and the rest written (upstream does the same), so one
    /// identity MIC may not attach does not hold back every other pod of the scale set; the
    /// refused ones are returned by lowercase resource id.
    async fn write_target(
        &self,
        id: &str,
        state: &TargetState,
        change: &core::TargetChange,
    ) -> (Result<(), ArmError>, BTreeMap<String, ArmError>) {
        let mut add = change.add.clone();
        let mut refused = BTreeMap::new();
        loop {
            let Some(body) = core::identity_patch(&state.identity, &add, &change.remove) else {
                return (Ok(()), refused);
            };
            let path = format!("{id}?api-version={}", defaults::COMPUTE_API_VERSION);
            let r = self
                .arm
                .call(
                    reqwest::Method::PATCH,
                    &path,
                    Some(&body),
                    state.etag.as_deref(),
                )
                .await
                .map(drop);
            metrics::counter!(
                keyless_ops::metrics::MIC_TARGET_WRITES,
                "result" => keyless_ops::metrics::result_label(&r)
            )
            .increment(1);
            let e = match r {
                Ok(()) => {
                    tracing::info!(
                        target = %id,
                        added = add.len(),
                        removed = change.remove.len(),
                        "identities written"
                    );
                    return (Ok(()), refused);
                }
                Err(e) => e,
            };
            tracing::warn!(target = %id, error = %e, "identity write refused");
            let named: Vec<String> = if e.code() == Some("LinkedAuthorizationFailed") {
                let msg = e.message().to_ascii_lowercase();
                add.iter()
                    .filter(|r| msg.contains(&r.to_ascii_lowercase()))
                    .cloned()
                    .collect()
            } else {
                vec![]
            };
            if named.is_empty() {
                return (Err(e), refused);
            }
            for r in named {
                add.remove(&r);
                let again = ArmError::Refused {
                    url: String::new(),
                    status: 403,
                    code: e.code().unwrap_or_default().to_string(),
                    message: e.message(),
                };
                refused.insert(r.to_ascii_lowercase(), again);
            }
        }
    }
}

/// What a sync left to do.
#[derive(Debug, Default)]
struct Outcome {
    /// Work deferred to the next sync (a write was full).
    again: bool,
    /// Identities ARM refused MIC: retried with back-off.
    refused: bool,
    /// VM / scale-set writes that failed: the sync counts as failed.
    failed: Vec<String>,
}

/// Run MIC until `shutdown` resolves. `ready` is called once the caches have listed.
pub async fn run(
    cfg: MicConfig,
    client: kube::Client,
    shutdown: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(),
    mut on_leader: impl FnMut(bool),
) -> Result<(), MicError> {
    let arm = Arm::new(&cfg.arm)?;
    let mut immutable: HashSet<String> = cfg
        .immutable
        .iter()
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if let Some(own) = &cfg.arm.client_id {
        immutable.insert(own.to_ascii_lowercase());
    }
    let wake = Arc::new(tokio::sync::Notify::new());
    let mut tasks = vec![];
    let untyped = |r: ApiResource| Api::<DynamicObject>::all_with(client.clone(), &r);
    let caches = Caches {
        pods: reflect(
            Api::<Pod>::all(client.clone()),
            (),
            wake.clone(),
            &mut tasks,
            "MIC",
        ),
        nodes: reflect(
            Api::<Node>::all(client.clone()),
            (),
            wake.clone(),
            &mut tasks,
            "MIC",
        ),
        identities: reflect(
            untyped(erased::<AzureIdentity>()),
            erased::<AzureIdentity>(),
            wake.clone(),
            &mut tasks,
            "MIC",
        ),
        bindings: reflect(
            untyped(erased::<AzureIdentityBinding>()),
            erased::<AzureIdentityBinding>(),
            wake.clone(),
            &mut tasks,
            "MIC",
        ),
        assigned: reflect(
            untyped(erased::<AzureAssignedIdentity>()),
            erased::<AzureAssignedIdentity>(),
            wake.clone(),
            &mut tasks,
            "MIC",
        ),
    };
    struct Abort(Vec<tokio::task::JoinHandle<()>>);
    impl Drop for Abort {
        fn drop(&mut self) {
            for t in &self.0 {
                t.abort();
            }
        }
    }
    let _tasks = Abort(tasks);
    let mut shutdown = std::pin::pin!(shutdown);
    let listed = async {
        caches.pods.wait_until_ready().await?;
        caches.nodes.wait_until_ready().await?;
        caches.identities.wait_until_ready().await?;
        caches.bindings.wait_until_ready().await?;
        caches.assigned.wait_until_ready().await
    };
    tokio::select! {
        _ = &mut shutdown => return Ok(()),
        r = listed => r.map_err(|e| MicError::Caches(e.to_string()))?,
    }
    ready();
    // the Lease in its own task: renewed every LEASE_RENEW however long a sync takes; a
    // standby tries again when the holder's Lease runs out; the sync loop acts only while
    // this says so, and a sync checks it before each VM / scale-set write
    let (lease_task, mut lead_rx) = lease::keep(
        client.clone(),
        cfg.lease.clone(),
        defaults::LEASE_RENEW,
        defaults::RETRY_MIN * 2,
        "MIC",
        |_| {},
    );
    let _lease_task = Abort(vec![lease_task]);
    let mic = Mic {
        client: client.clone(),
        arm,
        immutable,
        cfg,
        lead: lead_rx.clone(),
    };
    let mut leader = false;
    let mut backoff = defaults::RETRY_MIN;
    let mut last_sync = tokio::time::Instant::now() - mic.cfg.resync;
    // the error policy: after a failed sync, none before this
    let mut not_before = tokio::time::Instant::now();
    // an identity ARM refused: sync again then
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut pending = true;
    loop {
        let now_leading = *lead_rx.borrow_and_update();
        if now_leading != leader {
            leader = now_leading;
            tracing::info!(leader, holder = %mic.cfg.lease.holder, "MIC lease");
            metrics::gauge!(keyless_ops::metrics::MIC_LEADER).set(if leader { 1.0 } else { 0.0 });
            on_leader(leader);
            pending = true;
        }
        if last_sync.elapsed() >= mic.cfg.resync
            || retry_at.is_some_and(|t| tokio::time::Instant::now() >= t)
        {
            pending = true;
        }
        let mut wait = mic.cfg.resync.saturating_sub(last_sync.elapsed());
        if leader && pending && tokio::time::Instant::now() >= not_before {
            let r = mic.sync(&caches).await.and_then(|o| {
                if o.failed.is_empty() {
                    Ok(o)
                } else {
                    Err(MicError::Writes(o.failed))
                }
            });
            metrics::counter!(
                keyless_ops::metrics::MIC_SYNCS,
                "result" => keyless_ops::metrics::result_label(&r)
            )
            .increment(1);
            last_sync = tokio::time::Instant::now();
            match r {
                Ok(o) => {
                    pending = o.again;
                    wait = if o.again {
                        defaults::DEBOUNCE
                    } else {
                        mic.cfg.resync
                    };
                    if o.refused {
                        // an identity ARM refused: look again after the back-off (a role may
                        // be granted meanwhile); events still sync at once
                        retry_at = Some(tokio::time::Instant::now() + backoff);
                        wait = wait.min(backoff);
                        backoff = (backoff * 2).min(defaults::RETRY_MAX);
                    } else {
                        retry_at = None;
                        backoff = defaults::RETRY_MIN;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "MIC sync failed");
                    pending = true;
                    wait = backoff;
                    not_before = tokio::time::Instant::now() + backoff;
                    backoff = (backoff * 2).min(defaults::RETRY_MAX);
                }
            }
        }
        if let Some(t) = retry_at {
            wait = wait.min(t.saturating_duration_since(tokio::time::Instant::now()));
        }
        if pending {
            wait = wait.max(not_before.saturating_duration_since(tokio::time::Instant::now()));
        }
        let wait = wait.max(Duration::from_millis(10));
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = wake.notified() => {
                // a burst of events makes one sync
                tokio::time::sleep(defaults::DEBOUNCE).await;
                pending = true;
            },
            _ = lead_rx.changed() => {},
            _ = tokio::time::sleep(wait) => {},
        }
    }
}
