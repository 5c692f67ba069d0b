//! NMI's view of the cluster: a watch-fed index source IP → pod → what the pod may use.
//!
//! Four watches (kube-rs `watcher`, with its back-off): the Pods with `spec.nodeName=<node>`,
//! and `AzureIdentity`, `AzureIdentityBinding`, `AzurePodIdentityException` in all namespaces.
//! Every event updates the index in place: a pod event recomputes that pod; a CRD event
//! recomputes the pods of its namespace (managed mode is namespaced: nothing else can change);
//! a relist (`Init … InitDone`) replaces that kind's objects and recomputes every pod. The
//! rules are `keyless_core::pod_identity::decide`'s. The token path reads the index under a
//! read lock and makes no API-server call.
//!
//! Which objects count is [`pi::Trust`]'s: on a managed cluster's node only those the cluster's
//! `podIdentityProfile` names (the host view's `cluster.podIdentity`, set with
//! [`PodIndex::set_trust`] at every sync; a change recomputes every pod), on a plain scale set
//! every object (the operator owns the CRDs).
//!
//! The CRD kinds are watched untyped (`DynamicObject`) and read field by field: one object the
//! typed client could not read (an out-of-range integer the API server stored before the
//! schema bounded it) neither stops the watch nor the index; a field NMI does not use cannot
//! matter, and an unreadable `type` is not served.
//!
//! A pod counts for its IPs (`status.podIP` and `status.podIPs`) while its phase is Pending or
//! Running and it is not on the host network (a host-network pod shares the node's IP, and its
//! traffic never reaches NMI). A terminating pod (`metadata.deletionTimestamp` set) keeps its
//! IPs while its phase is still Pending or Running — its containers may still run and ask, as
//! upstream NMI answers them — and loses them once the kubelet reports it Succeeded or Failed
//! or the object is gone. An IP two pods claim matches nothing. A request from an IP the
//! index does not know waits for the index to change ([`PodIndex::lookup_ip`], a
//! `tokio::sync::watch`, no polling) for a bounded time, so a pod that starts right after its
//! status patch is not refused while the event is on its way.

use crate::{NodeError, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod as K8sPod;
use keyless_core::mic::{AssignedState, Existing};
use keyless_core::pod_identity::{self as pi, BoundIdentity, Namespacing, PodDecision};
use keyless_k8s::crd::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// (namespace, name).
pub type PodKey = (String, String);

/// What a pod may use, as NMI acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Excepted,
    /// Its identities, sorted by AzureIdentity name.
    Bound(Arc<[BoundIdentity]>),
    NoBinding,
}

impl From<PodDecision> for Grant {
    fn from(d: PodDecision) -> Self {
        match d {
            PodDecision::Excepted => Grant::Excepted,
            PodDecision::Bound(v) => Grant::Bound(v.into()),
            PodDecision::NoBinding => Grant::NoBinding,
        }
    }
}

/// One pod of this node, with its current grant.
#[derive(Debug, PartialEq, Eq)]
pub struct PodEntry {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid` (names the pod's cgroup; empty when the object had none).
    pub uid: String,
    /// What NMI serves now (in standard mode: the bound identities MIC has `Assigned`).
    pub grant: Grant,
    /// Standard mode: the bound identities not `Assigned` yet, and what their
    /// `AzureAssignedIdentity` says (empty in managed mode).
    pub pending: Arc<[Pending]>,
}

/// What [`PodIndex::explain_facts`] hands the explainer.
#[derive(Debug, Clone)]
pub struct ExplainFacts {
    pub pod: keyless_core::pod_explain::PodFacts,
    pub bindings: Vec<pi::Binding>,
    pub identities: Vec<pi::AzureIdentity>,
    pub exceptions: Vec<pi::Exception>,
    pub assigned: Vec<Existing>,
    pub trust: pi::Trust,
    pub mode: Mode,
}

/// A bound identity NMI waits for (standard mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub identity: BoundIdentity,
    /// The object's state; None while MIC has not written one.
    pub state: Option<AssignedState>,
    /// The error MIC reported on it (code, message).
    pub error: Option<(String, String)>,
}

/// How NMI decides (`--operation-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The bindings decide (the AKS add-on's mode; always namespaced).
    #[default]
    Managed,
    /// MIC's `AzureAssignedIdentity` objects must say `Assigned` too.
    Standard(Namespacing),
}

/// The pods a source IP matches.
#[derive(Debug)]
pub enum IpMatch {
    One(Arc<PodEntry>),
    None,
    /// Several pods claim the IP: it matches none of them.
    Many(Vec<Arc<PodEntry>>),
}

/// A pod as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub pod: pi::Pod,
    /// `metadata.uid`.
    pub uid: String,
    /// `status.phase` and `spec.hostNetwork` (for explanations).
    pub phase: String,
    pub host_network: bool,
    /// The IPs it answers for (empty unless Pending/Running and not on the host network).
    pub ips: Vec<IpAddr>,
}

impl PodInfo {
    /// From the Kubernetes object (None without namespace or name).
    pub fn from_k8s(p: &K8sPod) -> Option<PodInfo> {
        let f = keyless_k8s::crd::read::pod(p)?;
        // NMI answers for a pod's IPs while it is Pending or Running off the host network
        let active = matches!(f.phase.as_str(), "Pending" | "Running") && !f.host_network;
        let ips = if active {
            f.ips
                .iter()
                .filter_map(|s| s.parse::<IpAddr>().ok())
                .fold(vec![], |mut v, ip| {
                    if !v.contains(&ip) {
                        v.push(ip);
                    }
                    v
                })
        } else {
            vec![]
        };
        Some(PodInfo {
            pod: f.pod,
            uid: p.metadata.uid.clone().unwrap_or_default(),
            phase: f.phase,
            host_network: f.host_network,
            ips,
        })
    }

    fn key(&self) -> PodKey {
        (self.pod.namespace.clone(), self.pod.name.clone())
    }
}

pub use keyless_k8s::crd::read::{
    assigned as assigned_of, binding as binding_of, exception as exception_of,
    identity as identity_of,
};

struct PodRec {
    info: PodInfo,
    entry: Arc<PodEntry>,
}

#[derive(Default)]
struct NsObjects {
    bindings: BTreeMap<String, pi::Binding>,
    identities: BTreeMap<String, pi::AzureIdentity>,
    exceptions: BTreeMap<String, pi::Exception>,
}

/// What the `AzureAssignedIdentity` objects of one pod say, by identity (namespace, name).
type AssignedOfPod = BTreeMap<(String, String), (AssignedState, Option<(String, String)>)>;

#[derive(Default)]
struct Inner {
    pods: HashMap<PodKey, PodRec>,
    ns_pods: HashMap<String, BTreeSet<String>>,
    by_ip: HashMap<IpAddr, Vec<Arc<PodEntry>>>,
    ns: HashMap<String, NsObjects>,
    trust: pi::Trust,
    mode: Mode,
    /// Standard mode: assigned identities of this node's pods, by pod, and each object's key
    /// to its pod and identity (to undo it on delete).
    assigned: HashMap<PodKey, AssignedOfPod>,
    assigned_objects: HashMap<PodKey, (PodKey, (String, String))>,
}

impl Inner {
    /// The grant and the pending identities of `info`.
    fn grant(&self, info: &PodInfo) -> (Grant, Arc<[Pending]>) {
        let namespacing = match self.mode {
            Mode::Managed => Namespacing::Always,
            Mode::Standard(n) => n,
        };
        let d = match namespacing {
            Namespacing::Always => match self.ns.get(&info.pod.namespace) {
                Some(o) => pi::decide_trusted(
                    namespacing,
                    &self.trust,
                    &info.pod,
                    o.bindings.values(),
                    o.identities.values(),
                    o.exceptions.values(),
                ),
                None => pi::decide(&info.pod, [], [], []),
            },
            // a binding of any namespace may select the pod
            Namespacing::ByIdentity => pi::decide_trusted(
                namespacing,
                &self.trust,
                &info.pod,
                self.ns.values().flat_map(|o| o.bindings.values()),
                self.ns.values().flat_map(|o| o.identities.values()),
                self.ns
                    .get(&info.pod.namespace)
                    .into_iter()
                    .flat_map(|o| o.exceptions.values()),
            ),
        };
        let (Mode::Standard(_), PodDecision::Bound(all)) = (self.mode, &d) else {
            return (d.into(), Arc::from([]));
        };
        let objects = self.assigned.get(&info.key());
        let mut ready = vec![];
        let mut pending = vec![];
        // an identity without a resourceID is never attached by MIC: not served, not awaited
        for b in all.iter().filter(|b| !b.resource_id.is_empty()) {
            let seen = objects.and_then(|m| m.get(&(b.namespace.clone(), b.name.clone())));
            match seen {
                Some((state, _)) if state.servable() => ready.push(b.clone()),
                _ => pending.push(Pending {
                    identity: b.clone(),
                    state: seen.map(|s| s.0),
                    error: seen.and_then(|s| s.1.clone()),
                }),
            }
        }
        (Grant::Bound(ready.into()), pending.into())
    }

    fn unlink_ips(&mut self, key: &PodKey, ips: &[IpAddr]) {
        for ip in ips {
            if let Some(v) = self.by_ip.get_mut(ip) {
                v.retain(|e| (e.namespace.as_str(), e.name.as_str()) != (&key.0, &key.1));
                if v.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
    }

    fn link_ips(&mut self, entry: &Arc<PodEntry>, ips: &[IpAddr]) {
        for ip in ips {
            self.by_ip.entry(*ip).or_default().push(entry.clone());
        }
    }

    fn put_pod(&mut self, info: PodInfo) {
        let key = info.key();
        if let Some(old) = self.pods.get(&key) {
            if old.info == info {
                return;
            }
        }
        self.remove_pod(&key);
        let (grant, pending) = self.grant(&info);
        let entry = Arc::new(PodEntry {
            namespace: key.0.clone(),
            name: key.1.clone(),
            uid: info.uid.clone(),
            grant,
            pending,
        });
        self.link_ips(&entry, &info.ips);
        self.ns_pods
            .entry(key.0.clone())
            .or_default()
            .insert(key.1.clone());
        self.pods.insert(key, PodRec { info, entry });
    }

    fn remove_pod(&mut self, key: &PodKey) {
        if let Some(old) = self.pods.remove(key) {
            self.unlink_ips(key, &old.info.ips);
            if let Some(set) = self.ns_pods.get_mut(&key.0) {
                set.remove(&key.1);
                if set.is_empty() {
                    self.ns_pods.remove(&key.0);
                }
            }
        }
    }

    /// Recompute the grants of the pods of `namespace` (all namespaces when None, and whenever
    /// bindings may cross namespaces).
    fn recompute(&mut self, namespace: Option<&str>) {
        let namespace = namespace.filter(|_| self.mode != Mode::Standard(Namespacing::ByIdentity));
        let keys: Vec<PodKey> = match namespace {
            Some(ns) => self
                .ns_pods
                .get(ns)
                .map(|s| s.iter().map(|n| (ns.to_string(), n.clone())).collect())
                .unwrap_or_default(),
            None => self.pods.keys().cloned().collect(),
        };
        for key in keys {
            self.recompute_pod(&key);
        }
    }

    fn recompute_pod(&mut self, key: &PodKey) {
        {
            let Some(rec) = self.pods.get(key) else {
                return;
            };
            let (grant, pending) = self.grant(&rec.info);
            if grant == rec.entry.grant && pending == rec.entry.pending {
                return;
            }
            let ips = rec.info.ips.clone();
            let entry = Arc::new(PodEntry {
                namespace: key.0.clone(),
                name: key.1.clone(),
                uid: rec.info.uid.clone(),
                grant,
                pending,
            });
            let key = key.clone();
            self.unlink_ips(&key, &ips);
            self.link_ips(&entry, &ips);
            if let Some(rec) = self.pods.get_mut(&key) {
                rec.entry = entry;
            }
        }
    }

    /// Standard mode: an `AzureAssignedIdentity` of this node changed (None: deleted).
    fn put_assigned(&mut self, object: PodKey, seen: Option<Existing>) {
        if let Some((pod, id)) = self.assigned_objects.remove(&object) {
            if let Some(m) = self.assigned.get_mut(&pod) {
                m.remove(&id);
                if m.is_empty() {
                    self.assigned.remove(&pod);
                }
            }
            self.recompute_pod(&pod);
        }
        if let Some(e) = seen {
            let a = &e.assignment;
            let pod = (a.pod_namespace.clone(), a.pod.clone());
            let id = (a.identity.namespace.clone(), a.identity.name.clone());
            let error = e.error.clone();
            self.assigned
                .entry(pod.clone())
                .or_default()
                .insert(id.clone(), (e.state, error));
            self.assigned_objects.insert(object, (pod.clone(), id));
            self.recompute_pod(&pod);
        }
    }

    fn pod_client_ids(&self) -> HashSet<String> {
        self.ns
            .values()
            .flat_map(|o| o.identities.values())
            .filter(|i| !i.client_id.is_empty())
            .map(|i| i.client_id.to_ascii_lowercase())
            .collect()
    }
}

/// Which kind of object changed.
enum Change<T> {
    Put(T),
    Delete(PodKey),
    Replace(Vec<T>),
}

/// The index. Writers are the watch tasks; readers are NMI's request handlers.
pub struct PodIndex {
    inner: RwLock<Inner>,
    /// Bumped after every change (request handlers waiting for an unknown IP watch it).
    version: watch::Sender<u64>,
    /// Told the client ids of every AzureIdentity whenever they change.
    on_identities: Box<dyn Fn(HashSet<String>) + Send + Sync>,
    /// Whether each watch has delivered its first complete list.
    synced: std::sync::atomic::AtomicBool,
}

impl PodIndex {
    pub fn new(on_identities: impl Fn(HashSet<String>) + Send + Sync + 'static) -> Self {
        PodIndex {
            inner: RwLock::new(Inner::default()),
            version: watch::channel(0).0,
            on_identities: Box::new(on_identities),
            synced: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Which objects count (the host view's profile); a change recomputes every pod.
    pub fn set_trust(&self, trust: pi::Trust) {
        if self.read(|i| i.trust == trust) {
            return;
        }
        self.write(|i| {
            i.trust = trust;
            i.recompute(None);
        });
    }

    /// How NMI decides; a change recomputes every pod.
    pub fn set_mode(&self, mode: Mode) {
        self.write(|i| {
            i.mode = mode;
            i.recompute(None);
        });
    }

    pub fn mode(&self) -> Mode {
        self.read(|i| i.mode)
    }

    /// Standard mode: an `AzureAssignedIdentity` of this node, (namespace, name) and what it says.
    pub fn put_assigned(&self, key: PodKey, e: Existing) {
        self.write(|i| i.put_assigned(key, Some(e)))
    }

    pub fn delete_assigned(&self, key: PodKey) {
        self.write(|i| i.put_assigned(key, None))
    }

    pub fn replace_assigned(&self, all: Vec<(PodKey, Existing)>) {
        self.write(|i| {
            let keep: HashSet<&PodKey> = all.iter().map(|(k, _)| k).collect();
            let gone: Vec<PodKey> = i
                .assigned_objects
                .keys()
                .filter(|k| !keep.contains(k))
                .cloned()
                .collect();
            for k in gone {
                i.put_assigned(k, None);
            }
            for (k, e) in all {
                i.put_assigned(k, Some(e));
            }
        })
    }

    /// Whether every watch has listed once (before that, NMI answers pods 503).
    pub fn is_synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn mark_synced(&self) {
        self.synced
            .store(true, std::sync::atomic::Ordering::Release);
        self.version.send_modify(|v| *v += 1);
    }

    fn write<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let r = f(&mut self.inner.write().unwrap_or_else(|p| p.into_inner()));
        self.version.send_modify(|v| *v += 1);
        r
    }

    fn read<R>(&self, f: impl FnOnce(&Inner) -> R) -> R {
        f(&self.inner.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn pods(&self, c: Change<PodInfo>) {
        self.write(|i| match c {
            Change::Put(p) => i.put_pod(p),
            Change::Delete(k) => i.remove_pod(&k),
            Change::Replace(all) => {
                let keep: HashSet<PodKey> = all.iter().map(PodInfo::key).collect();
                let gone: Vec<PodKey> = i
                    .pods
                    .keys()
                    .filter(|k| !keep.contains(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    i.remove_pod(&k);
                }
                for p in all {
                    i.put_pod(p);
                }
            }
        })
    }

    /// Apply a change to one CRD kind (`slot` picks its map in a namespace), recompute the
    /// pods it can affect.
    fn objects<T: Clone>(
        &self,
        c: Change<T>,
        ns_of: impl Fn(&T) -> PodKey,
        slot: impl Fn(&mut NsObjects) -> &mut BTreeMap<String, T>,
    ) {
        let ids = self.write(|i| {
            let before = i.pod_client_ids();
            match c {
                Change::Put(o) => {
                    let (ns, name) = ns_of(&o);
                    slot(i.ns.entry(ns.clone()).or_default()).insert(name, o);
                    i.recompute(Some(&ns));
                }
                Change::Delete((ns, name)) => {
                    if let Some(o) = i.ns.get_mut(&ns) {
                        slot(o).remove(&name);
                    }
                    i.recompute(Some(&ns));
                }
                Change::Replace(all) => {
                    for o in i.ns.values_mut() {
                        slot(o).clear();
                    }
                    for o in all {
                        let (ns, name) = ns_of(&o);
                        slot(i.ns.entry(ns).or_default()).insert(name, o);
                    }
                    i.recompute(None);
                }
            }
            let after = i.pod_client_ids();
            (before != after).then_some(after)
        });
        if let Some(ids) = ids {
            (self.on_identities)(ids);
        }
    }

    pub fn put_pod(&self, p: PodInfo) {
        self.pods(Change::Put(p))
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.pods(Change::Delete((namespace.into(), name.into())))
    }

    pub fn replace_pods(&self, all: Vec<PodInfo>) {
        self.pods(Change::Replace(all))
    }

    pub fn put_identity(&self, o: pi::AzureIdentity) {
        self.identities(Change::Put(o))
    }
    pub fn delete_identity(&self, ns: &str, name: &str) {
        self.identities(Change::Delete((ns.to_string(), name.to_string())))
    }
    pub fn replace_identities(&self, all: Vec<pi::AzureIdentity>) {
        self.identities(Change::Replace(all))
    }
    fn identities(&self, c: Change<pi::AzureIdentity>) {
        self.objects(
            c,
            |o| (o.namespace.clone(), o.name.clone()),
            |n| &mut n.identities,
        )
    }

    pub fn put_binding(&self, o: pi::Binding) {
        self.bindings(Change::Put(o))
    }
    pub fn delete_binding(&self, ns: &str, name: &str) {
        self.bindings(Change::Delete((ns.to_string(), name.to_string())))
    }
    pub fn replace_bindings(&self, all: Vec<pi::Binding>) {
        self.bindings(Change::Replace(all))
    }
    fn bindings(&self, c: Change<pi::Binding>) {
        self.objects(
            c,
            |o| (o.namespace.clone(), o.name.clone()),
            |n| &mut n.bindings,
        )
    }

    pub fn put_exception(&self, o: pi::Exception) {
        self.exceptions(Change::Put(o))
    }
    pub fn delete_exception(&self, ns: &str, name: &str) {
        self.exceptions(Change::Delete((ns.to_string(), name.to_string())))
    }
    pub fn replace_exceptions(&self, all: Vec<pi::Exception>) {
        self.exceptions(Change::Replace(all))
    }
    fn exceptions(&self, c: Change<pi::Exception>) {
        self.objects(
            c,
            |o| (o.namespace.clone(), o.name.clone()),
            |n| &mut n.exceptions,
        )
    }

    /// What an explanation of pod `namespace/name` reads (None: not a pod of this node).
    pub fn explain_facts(&self, namespace: &str, name: &str, node: &str) -> Option<ExplainFacts> {
        self.read(|i| {
            let key = (namespace.to_string(), name.to_string());
            let rec = i.pods.get(&key)?;
            let info = &rec.info;
            let assigned = i
                .assigned
                .get(&key)
                .map(|m| {
                    m.iter()
                        .map(|((ins, iname), (state, error))| Existing {
                            assignment: keyless_core::mic::Assignment {
                                pod: name.to_string(),
                                pod_namespace: namespace.to_string(),
                                node: node.to_string(),
                                identity: pi::AzureIdentity {
                                    namespace: ins.clone(),
                                    name: iname.clone(),
                                    ..Default::default()
                                },
                                binding: Default::default(),
                            },
                            target: None,
                            state: *state,
                            error: error.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(ExplainFacts {
                pod: keyless_core::pod_explain::PodFacts {
                    pod: info.pod.clone(),
                    node: node.to_string(),
                    phase: info.phase.clone(),
                    ips: info.ips.iter().map(|i| i.to_string()).collect(),
                    host_network: info.host_network,
                },
                bindings: i
                    .ns
                    .values()
                    .flat_map(|o| o.bindings.values().cloned())
                    .collect(),
                identities: i
                    .ns
                    .values()
                    .flat_map(|o| o.identities.values().cloned())
                    .collect(),
                exceptions: i
                    .ns
                    .values()
                    .flat_map(|o| o.exceptions.values().cloned())
                    .collect(),
                assigned,
                trust: i.trust.clone(),
                mode: i.mode,
            })
        })
    }

    /// A receiver told of every change to the index.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The pods `ip` matches now.
    pub fn by_ip(&self, ip: IpAddr) -> IpMatch {
        self.read(|i| match i.by_ip.get(&ip).map(Vec::as_slice) {
            None | Some([]) => IpMatch::None,
            Some([one]) => IpMatch::One(one.clone()),
            Some(many) => IpMatch::Many(many.to_vec()),
        })
    }

    /// The pod `ip` matches, waiting up to `wait` for the index to change while it matches
    /// no single pod (the pod's event may still be on its way).
    pub async fn lookup_ip(&self, ip: IpAddr, wait: Duration) -> IpMatch {
        let mut changed = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let m = self.by_ip(ip);
            if matches!(m, IpMatch::One(_)) {
                return m;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => continue,
                _ => return m,
            }
        }
    }

    /// A pod of this node by namespace and name (any phase).
    pub fn by_name(&self, namespace: &str, name: &str) -> Option<Arc<PodEntry>> {
        self.read(|i| {
            i.pods
                .get(&(namespace.to_string(), name.to_string()))
                .map(|r| r.entry.clone())
        })
    }

    /// How many pods of this node the index holds.
    pub fn len(&self) -> usize {
        self.read(|i| i.pods.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long [`watch`] waits for the four initial lists before giving up.
pub const INITIAL_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The running watches (aborted on drop).
#[derive(Default)]
pub struct Watches {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a watch hands on.
enum Seen<K> {
    Apply(K),
    Delete(K),
    Listed(Vec<K>),
}

/// Run `watcher(api)` forever, buffering relists, feeding `sink`; set `bit` in `ready` after
/// the first complete list.
fn spawn_watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    what: &'static str,
    bit: u8,
    ready: watch::Sender<u8>,
    last_error: Arc<Mutex<Option<String>>>,
    sink: impl Fn(Seen<K>) + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + Debug + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, cfg).default_backoff());
        let mut buf: Vec<K> = vec![];
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Init) => buf.clear(),
                Ok(watcher::Event::InitApply(o)) => buf.push(o),
                Ok(watcher::Event::InitDone) => {
                    sink(Seen::Listed(std::mem::take(&mut buf)));
                    ready.send_modify(|m| *m |= bit);
                }
                Ok(watcher::Event::Apply(o)) => sink(Seen::Apply(o)),
                Ok(watcher::Event::Delete(o)) => sink(Seen::Delete(o)),
                Err(e) => {
                    tracing::warn!(watch = what, error = %e, "watch failed; retrying");
                    *last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("{what}: {e}"));
                }
            }
        }
    })
}

fn name_of<K: Resource>(o: &K) -> (String, String) {
    (
        o.meta().namespace.clone().unwrap_or_default(),
        o.meta().name.clone().unwrap_or_default(),
    )
}

/// Start the four watches feeding `index` and wait (up to `initial_wait`) until each has
/// delivered its initial list; then the index is marked synced. When they have not by then,
/// the watches go on retrying (the index is marked synced once they have) and the error says
/// why — the caller decides whether that stops it.
pub async fn watch(
    client: kube::Client,
    node: &str,
    index: Arc<PodIndex>,
    initial_wait: Duration,
) -> (Watches, Result<()>) {
    let (ready, mut ready_rx) = watch::channel(0u8);
    let last_error = Arc::new(Mutex::new(None));
    let mut tasks = vec![];

    let ix = index.clone();
    tasks.push(spawn_watch(
        Api::<K8sPod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        "pods",
        1,
        ready.clone(),
        last_error.clone(),
        move |s| match s {
            Seen::Apply(p) => {
                if let Some(info) = PodInfo::from_k8s(&p) {
                    ix.put_pod(info)
                }
            }
            Seen::Delete(p) => {
                let (ns, n) = name_of(&p);
                ix.delete_pod(&ns, &n)
            }
            Seen::Listed(all) => {
                ix.replace_pods(all.iter().filter_map(PodInfo::from_k8s).collect())
            }
        },
    ));
    let untyped = |r: ApiResource| Api::<DynamicObject>::all_with(client.clone(), &r);
    let ix = index.clone();
    tasks.push(spawn_watch(
        untyped(ApiResource::erase::<AzureIdentity>(&())),
        watcher::Config::default(),
        "azureidentities",
        2,
        ready.clone(),
        last_error.clone(),
        move |s| match s {
            Seen::Apply(o) => {
                if let Some(o) = identity_of(&o) {
                    ix.put_identity(o)
                }
            }
            Seen::Delete(o) => {
                let (ns, n) = name_of(&o);
                ix.delete_identity(&ns, &n)
            }
            Seen::Listed(all) => {
                ix.replace_identities(all.iter().filter_map(identity_of).collect())
            }
        },
    ));
    let ix = index.clone();
    tasks.push(spawn_watch(
        untyped(ApiResource::erase::<AzureIdentityBinding>(&())),
        watcher::Config::default(),
        "azureidentitybindings",
        4,
        ready.clone(),
        last_error.clone(),
        move |s| match s {
            Seen::Apply(o) => {
                if let Some(o) = binding_of(&o) {
                    ix.put_binding(o)
                }
            }
            Seen::Delete(o) => {
                let (ns, n) = name_of(&o);
                ix.delete_binding(&ns, &n)
            }
            Seen::Listed(all) => ix.replace_bindings(all.iter().filter_map(binding_of).collect()),
        },
    ));
    let ix = index.clone();
    tasks.push(spawn_watch(
        untyped(ApiResource::erase::<AzurePodIdentityException>(&())),
        watcher::Config::default(),
        "azurepodidentityexceptions",
        8,
        ready.clone(),
        last_error.clone(),
        move |s| match s {
            Seen::Apply(o) => {
                if let Some(o) = exception_of(&o) {
                    ix.put_exception(o)
                }
            }
            Seen::Delete(o) => {
                let (ns, n) = name_of(&o);
                ix.delete_exception(&ns, &n)
            }
            Seen::Listed(all) => {
                ix.replace_exceptions(all.iter().filter_map(exception_of).collect())
            }
        },
    ));
    // standard mode: MIC's AzureAssignedIdentity objects of this node
    let all: u8 = if matches!(index.mode(), Mode::Standard(_)) {
        let ix = index.clone();
        tasks.push(spawn_watch(
            untyped(ApiResource::erase::<AzureAssignedIdentity>(&())),
            watcher::Config::default().labels(&format!("nodename={node}")),
            "azureassignedidentities",
            16,
            ready.clone(),
            last_error.clone(),
            move |s| match s {
                Seen::Apply(o) => {
                    if let Some((k, e)) = assigned_of(&o) {
                        ix.put_assigned(k, e)
                    }
                }
                Seen::Delete(o) => ix.delete_assigned(name_of(&o)),
                Seen::Listed(all) => {
                    ix.replace_assigned(all.iter().filter_map(assigned_of).collect())
                }
            },
        ));
        31
    } else {
        15
    };
    drop(ready);
    let mut rx = ready_rx.clone();
    let ix = index.clone();
    tasks.push(tokio::spawn(async move {
        if rx.wait_for(|m| *m == all).await.is_ok() {
            ix.mark_synced();
        }
    }));
    let watches = Watches { tasks };
    let done = tokio::time::timeout(initial_wait, ready_rx.wait_for(|m| *m == all)).await;
    let r = match done {
        Ok(Ok(_)) => Ok(()),
        _ => {
            let why = last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "no answer".into());
            Err(NodeError::Nmi(format!(
                "the Kubernetes watches did not list pods and the aadpodidentity.k8s.io objects within {} s (last error: {why})",
                initial_wait.as_secs()
            )))
        }
    };
    // the marker task may not have run yet
    if r.is_ok() {
        index.mark_synced();
    }
    (watches, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ns: &str, name: &str, label: Option<&str>, ips: &[&str]) -> PodInfo {
        PodInfo {
            pod: pi::Pod {
                namespace: ns.into(),
                name: name.into(),
                labels: label
                    .map(|l| [(pi::BINDING_LABEL.to_string(), l.to_string())].into())
                    .unwrap_or_default(),
            },
            uid: format!("uid-{name}"),
            phase: "Running".into(),
            host_network: false,
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        }
    }

    fn ident(ns: &str, name: &str, cid: &str) -> pi::AzureIdentity {
        pi::AzureIdentity {
            namespace: ns.into(),
            name: name.into(),
            type_: 0,
            client_id: cid.into(),
            resource_id: String::new(),
            namespaced: false,
        }
    }

    trait WithResource {
        fn with_resource(self, r: &str) -> Self;
    }
    impl WithResource for pi::AzureIdentity {
        fn with_resource(mut self, r: &str) -> Self {
            self.resource_id = r.into();
            self
        }
    }

    fn binding(ns: &str, name: &str, id: &str, sel: &str) -> pi::Binding {
        pi::Binding {
            namespace: ns.into(),
            name: name.into(),
            azure_identity: id.into(),
            selector: sel.into(),
        }
    }

    fn grant(ix: &PodIndex, ip: &str) -> Option<Grant> {
        match ix.by_ip(ip.parse().unwrap()) {
            IpMatch::One(e) => Some(e.grant.clone()),
            _ => None,
        }
    }

    fn bound(g: Option<Grant>) -> Vec<String> {
        match g {
            Some(Grant::Bound(v)) => v.iter().map(|b| b.client_id.clone()).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn events_update_the_index_incrementally() {
        let seen = Arc::new(Mutex::new(vec![]));
        let s2 = seen.clone();
        let ix = PodIndex::new(move |ids| s2.lock().unwrap().push(ids));
        ix.replace_pods(vec![
            info("apps", "a", Some("foo"), &["10.0.0.2"]),
            info("apps", "b", None, &["10.0.0.3"]),
            info("other", "c", Some("foo"), &["10.0.0.4"]),
        ]);
        assert_eq!(grant(&ix, "10.0.0.2"), Some(Grant::NoBinding));
        ix.put_identity(ident("apps", "id-a", "CA"));
        assert_eq!(
            seen.lock().unwrap().last().unwrap(),
            &HashSet::from(["ca".to_string()])
        );
        ix.put_binding(binding("apps", "bind", "id-a", "foo"));
        assert_eq!(bound(grant(&ix, "10.0.0.2")), ["CA"]);
        assert_eq!(grant(&ix, "10.0.0.3"), Some(Grant::NoBinding));
        assert_eq!(grant(&ix, "10.0.0.4"), Some(Grant::NoBinding), "namespaced");
        // relabel the pod: no longer bound
        ix.put_pod(info("apps", "a", Some("bar"), &["10.0.0.2"]));
        assert_eq!(grant(&ix, "10.0.0.2"), Some(Grant::NoBinding));
        ix.put_pod(info("apps", "a", Some("foo"), &["10.0.0.2"]));
        // an exception in the namespace
        ix.put_exception(pi::Exception {
            namespace: "apps".into(),
            name: "e".into(),
            pod_labels: [(pi::BINDING_LABEL.to_string(), "FOO".to_string())].into(),
        });
        assert_eq!(grant(&ix, "10.0.0.2"), Some(Grant::Excepted));
        ix.delete_exception("apps", "e");
        assert_eq!(bound(grant(&ix, "10.0.0.2")), ["CA"]);
        // the binding deleted: refused at once
        ix.delete_binding("apps", "bind");
        assert_eq!(grant(&ix, "10.0.0.2"), Some(Grant::NoBinding));
        // a relist replaces a kind wholesale
        ix.replace_bindings(vec![binding("apps", "bind2", "id-a", "foo")]);
        assert_eq!(bound(grant(&ix, "10.0.0.2")), ["CA"]);
        ix.replace_identities(vec![]);
        assert_eq!(grant(&ix, "10.0.0.2"), Some(Grant::NoBinding));
        assert_eq!(seen.lock().unwrap().last().unwrap(), &HashSet::new());
        // pod deleted, IP moved
        ix.delete_pod("apps", "b");
        assert!(matches!(
            ix.by_ip("10.0.0.3".parse().unwrap()),
            IpMatch::None
        ));
        ix.put_pod(info("apps", "a", Some("foo"), &["10.0.0.9"]));
        assert!(matches!(
            ix.by_ip("10.0.0.2".parse().unwrap()),
            IpMatch::None
        ));
        assert!(ix.by_name("apps", "a").is_some());
        assert_eq!(ix.len(), 2);
    }

    #[test]
    fn an_ip_two_pods_claim_matches_nothing() {
        let ix = PodIndex::new(|_| {});
        ix.put_pod(info("apps", "a", None, &["10.0.0.2"]));
        ix.put_pod(info("apps", "b", None, &["10.0.0.2", "fd00::2"]));
        assert!(matches!(ix.by_ip("10.0.0.2".parse().unwrap()), IpMatch::Many(v) if v.len() == 2));
        assert!(matches!(
            ix.by_ip("fd00::2".parse().unwrap()),
            IpMatch::One(_)
        ));
        // the old pod finishes (no IPs counted any more): the IP is unique again
        ix.put_pod(info("apps", "a", None, &[]));
        assert!(matches!(ix.by_ip("10.0.0.2".parse().unwrap()), IpMatch::One(e) if e.name == "b"));
    }

    #[test]
    fn pods_count_while_pending_or_running_off_the_host_network() {
        let pod = |phase: &str, host_network: bool| -> K8sPod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "n", "name": "p", "labels": {"aadpodidbinding": "x"}},
                "spec": {"containers": [], "hostNetwork": host_network},
                "status": {"phase": phase, "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}
            }))
            .unwrap()
        };
        let ips = |p: K8sPod| PodInfo::from_k8s(&p).unwrap().ips;
        assert_eq!(ips(pod("Running", false)).len(), 2);
        assert_eq!(ips(pod("Pending", false)).len(), 2);
        assert!(ips(pod("Succeeded", false)).is_empty());
        assert!(ips(pod("Failed", false)).is_empty());
        assert!(ips(pod("Running", true)).is_empty());
        let p = PodInfo::from_k8s(&pod("Running", false)).unwrap();
        assert_eq!(p.pod.labels["aadpodidbinding"], "x");
    }

    fn dynamic(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn one_unreadable_object_does_not_stop_the_index() {
        // what a 1.20 API server stores without schema bounds
        let bad = serde_json::json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": "big", "namespace": "apps"},
            "spec": {"type": 4294967296u64, "clientID": "c", "replicas": 5000000000u64},
            "status": {"availableReplicas": 9999999999u64}
        });
        assert!(
            serde_json::from_value::<AzureIdentity>(bad.clone()).is_err(),
            "the typed client cannot read it"
        );
        let id = identity_of(&dynamic(bad)).unwrap();
        assert_eq!((id.type_, id.client_id.as_str()), (-1, "c"), "never served");
        // a bad field NMI does not read changes nothing
        let ok = identity_of(&dynamic(serde_json::json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": "a", "namespace": "apps"},
            "spec": {"clientID": "c", "resourceID": "/r", "replicas": 5000000000u64}
        })))
        .unwrap();
        assert_eq!(ok, ident("apps", "a", "c").with_resource("/r"));
        let scoped = identity_of(&dynamic(serde_json::json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": "a", "namespace": "apps", "annotations": {"aadpodidentity.k8s.io/Behavior": "namespaced"}},
            "spec": {"clientID": "c"}
        })))
        .unwrap();
        assert!(scoped.namespaced);
        let b = binding_of(&dynamic(serde_json::json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
            "metadata": {"name": "b", "namespace": "apps"},
            "spec": {"azureIdentity": "a", "selector": "foo", "weight": 9999999999u64}
        })))
        .unwrap();
        assert_eq!(b, binding("apps", "b", "a", "foo"));
        let e = exception_of(&dynamic(serde_json::json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzurePodIdentityException",
            "metadata": {"name": "e", "namespace": "apps"},
            "spec": {"podLabels": {"app": "x", "n": 5}}
        })))
        .unwrap();
        assert_eq!(e.pod_labels.len(), 1);
    }

    #[test]
    fn the_profile_decides_and_a_change_recomputes_every_pod() {
        let ix = PodIndex::new(|_| {});
        ix.replace_pods(vec![
            info("apps", "a", Some("foo"), &["10.0.0.2"]),
            info("evil", "e", Some("foo"), &["10.0.0.3"]),
        ]);
        // a tenant's AzureIdentity pointing at the apps identity's client id, bound
        ix.replace_identities(vec![
            ident("apps", "id-a", "CA"),
            ident("evil", "steal", "CA"),
        ]);
        ix.replace_bindings(vec![
            binding("apps", "b", "id-a", "foo"),
            binding("evil", "b", "steal", "foo"),
        ]);
        ix.put_exception(pi::Exception {
            namespace: "evil".into(),
            name: "mine".into(),
            pod_labels: [(pi::BINDING_LABEL.to_string(), "foo".to_string())].into(),
        });
        // no profile: the operator's objects count
        assert_eq!(grant(&ix, "10.0.0.3"), Some(Grant::Excepted));
        let cluster: pi::ClusterView = serde_json::from_value(serde_json::json!({"podIdentity": {
            "enabled": true, "clientIds": ["ca"],
            "identities": [{"namespace": "apps", "name": "id-a", "clientId": "ca"}],
            "exceptions": []}}))
        .unwrap();
        ix.set_trust(pi::Trust::of(Some(&cluster)));
        assert_eq!(grant(&ix, "10.0.0.3"), Some(Grant::NoBinding));
        assert_eq!(bound(grant(&ix, "10.0.0.2")), ["CA"]);
        ix.delete_exception("evil", "mine");
        assert_eq!(grant(&ix, "10.0.0.3"), Some(Grant::NoBinding));
    }

    #[test]
    fn a_terminating_pod_keeps_its_ip_while_running() {
        let pod = |phase: &str| -> K8sPod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "n", "name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"containers": []},
                "status": {"phase": phase, "podIP": "10.1.0.5"}
            }))
            .unwrap()
        };
        assert_eq!(PodInfo::from_k8s(&pod("Running")).unwrap().ips.len(), 1);
        assert!(PodInfo::from_k8s(&pod("Succeeded")).unwrap().ips.is_empty());
        assert!(PodInfo::from_k8s(&pod("Failed")).unwrap().ips.is_empty());
    }

    #[tokio::test]
    async fn an_unknown_ip_waits_for_the_index_not_for_a_poll() {
        let ix = Arc::new(PodIndex::new(|_| {}));
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let w = ix.clone();
        let t0 = std::time::Instant::now();
        let waiter = tokio::spawn(async move { w.lookup_ip(ip, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        ix.put_pod(info("apps", "late", None, &["10.0.0.7"]));
        let m = waiter.await.unwrap();
        assert!(matches!(m, IpMatch::One(e) if e.name == "late"));
        assert!(t0.elapsed() < Duration::from_secs(2));
        // nothing arrives: refused after the bound
        let t0 = std::time::Instant::now();
        let m = ix
            .lookup_ip("10.0.0.8".parse().unwrap(), Duration::from_millis(100))
            .await;
        assert!(matches!(m, IpMatch::None));
        assert!(t0.elapsed() >= Duration::from_millis(100));
    }
}
