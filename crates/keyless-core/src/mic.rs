//! MIC, aad-pod-identity's Managed Identity Controller (standard mode,
//! `../shared/spec/pod-identity.md` §1.4), as plain data: which `AzureAssignedIdentity`
//! objects the cluster should hold ([`desired`]), and what one sync does about the difference
//! ([`plan`]): objects to create or rewrite, and per VM or scale set one identity write adding
//! and removing every user-assigned identity that changed (truncated to what one request may
//! assign), then the objects to mark `Assigned` or to delete.
//!
//! The rules:
//! - a pod counts once it is scheduled (`spec.nodeName`) and not finished; its identities are
//!   [`pod_identity::matches`]'s (the same rule NMI applies);
//! - an assigned identity is named `<pod>-<podNamespace>-<identity>` and lives in the
//!   identity's namespace when the binding is namespaced, else in `default` (upstream);
//! - an identity is attached to the node's VM or scale set when a pod of that target needs it
//!   and it is not there yet; it is detached when the last object using it there goes, unless
//!   it is immutable (the kubelet identity, `--immutable-user-msis`) or still needed there;
//! - a target whose write fails keeps its objects as they are (created ones stay `Created`
//!   with the error, removed ones stay until the detach succeeds): the next sync retries.

use crate::identity_type::{IdentityType, MAX_ASSIGN_PER_REQUEST};
use crate::pod_identity::{self as pi, AzureIdentity, Binding, Namespacing, Pod};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// The annotation MIC writes on each `AzureAssignedIdentity`: the ARM id of the VM / scale
/// set its identity is attached to.
pub const TARGET_ANNOTATION: &str = "keyless.dev/target";

/// `status.status` of an `AzureAssignedIdentity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignedState {
    /// Written by MIC before the identity is on the node's VM / scale set.
    Created,
    /// The identity is on the node's VM / scale set: NMI serves it.
    Assigned,
    /// Detached (or no longer wanted): about to be deleted.
    Unassigned,
}

impl AssignedState {
    pub fn parse(s: Option<&str>) -> AssignedState {
        match s {
            Some("Created") => AssignedState::Created,
            Some("Assigned") => AssignedState::Assigned,
            Some("Unassigned") => AssignedState::Unassigned,
            // no status: just created (a MIC older than 1.5 wrote none; not honoured, as the
            // status write follows the create and nothing may be served in between)
            _ => AssignedState::Created,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AssignedState::Created => "Created",
            AssignedState::Assigned => "Assigned",
            AssignedState::Unassigned => "Unassigned",
        }
    }

    /// Whether NMI may serve the identity.
    pub fn servable(self) -> bool {
        self == AssignedState::Assigned
    }
}

/// (namespace, name) of an `AzureAssignedIdentity`.
pub type Key = (String, String);

/// What an `AzureAssignedIdentity` says (its spec, flattened, and status).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    pub pod: String,
    pub pod_namespace: String,
    pub node: String,
    pub identity: AzureIdentity,
    /// (namespace, name) of the binding.
    pub binding: (String, String),
}

impl Assignment {
    /// The object's (namespace, name): `<pod>-<podNamespace>-<identity>`, in the identity's
    /// namespace when it is namespaced (`mode` or its annotation), else `default`.
    pub fn key(&self, mode: Namespacing) -> Key {
        let ns = if mode == Namespacing::Always || self.identity.namespaced {
            self.identity.namespace.clone()
        } else {
            "default".to_string()
        };
        (
            ns,
            format!("{}-{}-{}", self.pod, self.pod_namespace, self.identity.name),
        )
    }

    /// The identity's resource id, compared ignoring case.
    fn resource_key(&self) -> String {
        self.identity.resource_id.to_ascii_lowercase()
    }
}

/// An existing `AzureAssignedIdentity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub assignment: Assignment,
    /// The VM / scale set MIC attached it to ([`TARGET_ANNOTATION`]), so it is detached from
    /// there even when its node is gone (scale-in) or the object now wants another one.
    pub target: Option<String>,
    pub state: AssignedState,
    /// The error MIC reported on it (`status.error`: code, message), if any.
    pub error: Option<(String, String)>,
}

/// A pod as MIC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledPod {
    pub pod: Pod,
    /// `spec.nodeName` (empty: not scheduled).
    pub node: String,
    /// Succeeded or Failed: its identities are no longer wanted.
    pub finished: bool,
}

/// The assigned identities the cluster should hold, by key.
pub fn desired<'a>(
    mode: Namespacing,
    pods: impl IntoIterator<Item = &'a ScheduledPod>,
    bindings: &[Binding],
    identities: &[AzureIdentity],
) -> BTreeMap<Key, Assignment> {
    let mut out: BTreeMap<Key, Assignment> = BTreeMap::new();
    // sorted, so that when two pods' names collide (`a-b` in `c` and `a` in `b-c` both make
    // `a-b-c-<identity>`) the same one wins every sync instead of the object flapping
    let mut pods: Vec<&ScheduledPod> = pods.into_iter().collect();
    pods.sort_by(|a, b| (&a.pod.namespace, &a.pod.name).cmp(&(&b.pod.namespace, &b.pod.name)));
    for p in pods {
        if p.node.is_empty() || p.finished {
            continue;
        }
        for (b, id) in pi::matches(mode, &p.pod, bindings, identities) {
            if id.resource_id.is_empty() {
                continue;
            }
            let a = Assignment {
                pod: p.pod.name.clone(),
                pod_namespace: p.pod.namespace.clone(),
                node: p.node.clone(),
                identity: id.clone(),
                binding: (b.namespace.clone(), b.name.clone()),
            };
            out.entry(a.key(mode)).or_insert(a);
        }
    }
    out
}

/// The VM or scale set a node's `spec.providerID` names, as an ARM id:
/// `azure:///subscriptions/…/virtualMachineScaleSets/<ss>/virtualMachines/<i>` → the scale set,
/// `azure:///subscriptions/…/virtualMachines/<vm>` → the VM (upstream consolidates VMs of a
/// scale set to the scale set the same way). None for anything else.
pub fn target_of_provider_id(provider_id: &str) -> Option<String> {
    let path = provider_id.strip_prefix("azure://")?;
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let lower: Vec<String> = parts.iter().map(|p| p.to_ascii_lowercase()).collect();
    let at = |i: usize, want: &str| lower.get(i).map(String::as_str) == Some(want);
    if parts.len() < 8
        || !at(0, "subscriptions")
        || !at(2, "resourcegroups")
        || !at(4, "providers")
        || !at(5, "microsoft.compute")
    {
        return None;
    }
    match lower[6].as_str() {
        "virtualmachinescalesets" if parts.len() >= 8 => Some(format!("/{}", parts[..8].join("/"))),
        "virtualmachines" if parts.len() == 8 => Some(format!("/{}", parts[..8].join("/"))),
        _ => None,
    }
}

/// One VM's or scale set's part of a sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetChange {
    /// Resource ids to attach (as the objects spell them), at most [`MAX_ASSIGN_PER_REQUEST`].
    pub add: BTreeSet<String>,
    /// Resource ids to detach (as the target spells them).
    pub remove: BTreeSet<String>,
    /// Objects to mark `Assigned` once the write succeeded (or at once when there is none).
    pub assign: Vec<Key>,
    /// Objects to mark `Unassigned` and delete once the write succeeded.
    pub delete: Vec<Key>,
}

impl TargetChange {
    pub fn needs_write(&self) -> bool {
        !self.add.is_empty() || !self.remove.is_empty()
    }
}

/// What one sync does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Objects to create, or whose spec to rewrite (status back to `Created`).
    pub write: Vec<(Key, Assignment)>,
    /// By target id (lowercase).
    pub targets: BTreeMap<String, TargetChange>,
    /// Objects whose node names no VM or scale set: created (or kept) with this error.
    pub unplaced: Vec<Key>,
    /// Objects no longer wanted on a node that names no target: deleted at once.
    pub orphaned: Vec<Key>,
    /// Objects left `Created` because the target's write was full (the next sync takes them).
    pub deferred: Vec<Key>,
}

/// The plan of one sync.
///
/// `target_of` maps a node name to its VM / scale set id; `attached` gives the user-assigned
/// identities a target holds now (lowercase resource ids; None: unknown, e.g. the GET failed —
/// then that target is left alone this sync); `immutable` holds lowercase client ids never
/// detached.
pub fn plan(
    want: &BTreeMap<Key, Assignment>,
    existing: &BTreeMap<Key, Existing>,
    target_of: &dyn Fn(&str) -> Option<String>,
    attached: &dyn Fn(&str) -> Option<BTreeSet<String>>,
    immutable: &HashSet<String>,
) -> Plan {
    let mut p = Plan::default();
    // targets' current identities, fetched once each
    let mut cache: BTreeMap<String, Option<BTreeSet<String>>> = BTreeMap::new();
    let mut on = |t: &str| -> Option<BTreeSet<String>> {
        cache
            .entry(t.to_string())
            .or_insert_with(|| attached(t))
            .clone()
    };
    // resource ids (lowercase) still needed per target
    let mut needed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (key, a) in want {
        let _ = key;
        if let Some(t) = target_of(&a.node) {
            needed
                .entry(t.to_ascii_lowercase())
                .or_default()
                .insert(a.resource_key());
        }
    }
    for (key, a) in want {
        let current = existing.get(key);
        let same = current.is_some_and(|e| &e.assignment == a);
        if !same {
            p.write.push((key.clone(), a.clone()));
        }
        let Some(t) = target_of(&a.node) else {
            p.unplaced.push(key.clone());
            continue;
        };
        let tl = t.to_ascii_lowercase();
        let Some(held) = on(&t) else { continue };
        let servable = same && current.is_some_and(|e| e.state.servable());
        let change = p.targets.entry(tl).or_default();
        if held.contains(&a.resource_key()) {
            if !servable {
                change.assign.push(key.clone());
            }
        } else if change.add.contains(&a.identity.resource_id)
            || change.add.len() < MAX_ASSIGN_PER_REQUEST
        {
            // not on the target (new, or removed by hand since): attach it
            change.add.insert(a.identity.resource_id.clone());
            if !servable {
                change.assign.push(key.clone());
            }
        } else {
            p.deferred.push(key.clone());
        }
    }
    for (key, e) in existing {
        let a = &e.assignment;
        // where it was attached: the annotation, else its node's VM / scale set
        let Some(t) = e.target.clone().or_else(|| target_of(&a.node)) else {
            if !want.contains_key(key) {
                p.orphaned.push(key.clone());
            }
            continue;
        };
        let tl = t.to_ascii_lowercase();
        let rk = a.resource_key();
        let rewritten = want.get(key);
        if rewritten.is_some_and(|w| {
            w.resource_key() == rk
                && target_of(&w.node).is_some_and(|wt| wt.eq_ignore_ascii_case(&t))
        }) {
            continue; // still wanted there
        }
        // gone, or now wanted elsewhere / for another identity: the old one may go
        let Some(held) = on(&t) else { continue };
        let still = needed.get(&tl).is_some_and(|n| n.contains(&rk));
        let change = p.targets.entry(tl).or_default();
        let keep = still || immutable.contains(&a.identity.client_id.to_ascii_lowercase());
        if !keep && held.contains(&rk) {
            change.remove.insert(a.identity.resource_id.clone());
        }
        if rewritten.is_none() {
            change.delete.push(key.clone());
        }
    }
    p.targets
        .retain(|_, c| c.needs_write() || !c.assign.is_empty() || !c.delete.is_empty());
    p
}

/// The body of the one PATCH that adds `add` and removes `remove` from a VM's or scale set's
/// `identity` (`current`, as a GET shows it), or None when nothing would change. ARM's PATCH
/// merge: an id mapped to `{}` is added, to `null` removed; the type keeps a system-assigned
/// identity and drops `UserAssigned` with the last user-assigned one.
pub fn identity_patch(
    current: &Value,
    add: &BTreeSet<String>,
    remove: &BTreeSet<String>,
) -> Option<Value> {
    let kind = current["type"]
        .as_str()
        .and_then(|t| IdentityType::parse(t).ok())
        .unwrap_or(IdentityType::None);
    let held: BTreeMap<String, String> = current["userAssignedIdentities"]
        .as_object()
        .map(|m| {
            m.keys()
                .map(|k| (k.to_ascii_lowercase(), k.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut entries = Map::new();
    for r in add {
        if !held.contains_key(&r.to_ascii_lowercase()) {
            entries.insert(r.clone(), json!({}));
        }
    }
    for r in remove {
        if let Some(spelled) = held.get(&r.to_ascii_lowercase()) {
            if !add.iter().any(|a| a.eq_ignore_ascii_case(r)) {
                entries.insert(spelled.clone(), Value::Null);
            }
        }
    }
    if entries.is_empty() {
        return None;
    }
    let removed = entries.values().filter(|v| v.is_null()).count();
    let users_left = held.len() + (entries.len() - removed) - removed;
    let new_kind = match (kind.has_system(), users_left > 0) {
        (true, true) => IdentityType::SystemAndUserAssigned,
        (true, false) => IdentityType::SystemAssigned,
        (false, true) => IdentityType::UserAssigned,
        (false, false) => IdentityType::None,
    };
    let mut identity = json!({"type": new_kind.as_str()});
    if new_kind.has_user() {
        identity["userAssignedIdentities"] = Value::Object(entries);
    }
    Some(json!({"identity": identity}))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SS: &str = "/subscriptions/s/resourceGroups/MC_g/providers/Microsoft.Compute/virtualMachineScaleSets/pool";
    const SS2: &str = "/subscriptions/s/resourceGroups/MC_g/providers/Microsoft.Compute/virtualMachineScaleSets/pool2";

    fn rid(n: &str) -> String {
        format!("/subscriptions/s/resourceGroups/ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{n}")
    }

    fn ident(ns: &str, name: &str) -> AzureIdentity {
        AzureIdentity {
            namespace: ns.into(),
            name: name.into(),
            type_: 0,
            client_id: format!("c-{name}"),
            resource_id: rid(name),
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

    fn pod(ns: &str, name: &str, node: &str, label: &str) -> ScheduledPod {
        ScheduledPod {
            pod: Pod {
                namespace: ns.into(),
                name: name.into(),
                labels: [(pi::BINDING_LABEL.to_string(), label.to_string())].into(),
            },
            node: node.into(),
            finished: false,
        }
    }

    fn nodes(n: &str) -> Option<String> {
        match n {
            "n1" | "n2" => Some(SS.to_string()),
            "n3" => Some(SS2.to_string()),
            _ => None,
        }
    }

    fn existing(want: &BTreeMap<Key, Assignment>, state: AssignedState) -> BTreeMap<Key, Existing> {
        want.iter()
            .map(|(k, a)| {
                (
                    k.clone(),
                    Existing {
                        assignment: a.clone(),
                        target: None,
                        state,
                        error: None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn desired_objects_follow_upstream_names() {
        let ids = [ident("apps", "id-a")];
        let bs = [binding("apps", "b", "id-a", "foo")];
        let pods = [
            pod("apps", "p1", "n1", "foo"),
            pod("apps", "unscheduled", "", "foo"),
            ScheduledPod {
                finished: true,
                ..pod("apps", "done", "n1", "foo")
            },
            pod("apps", "other", "n1", "bar"),
        ];
        let d = desired(Namespacing::ByIdentity, &pods, &bs, &ids);
        let keys: Vec<_> = d.keys().cloned().collect();
        assert_eq!(keys, [("default".to_string(), "p1-apps-id-a".to_string())]);
        let d = desired(Namespacing::Always, &pods, &bs, &ids);
        assert!(d.contains_key(&("apps".to_string(), "p1-apps-id-a".to_string())));
        let a = d.values().next().unwrap();
        assert_eq!((a.node.as_str(), a.binding.1.as_str()), ("n1", "b"));
    }

    #[test]
    fn colliding_names_resolve_the_same_way_every_time() {
        let ids = [ident("c", "x"), ident("b-c", "x")];
        let bs = [binding("c", "bc", "x", "l"), binding("b-c", "bb", "x", "l")];
        let p1 = pod("c", "a-b", "n1", "l");
        let p2 = pod("b-c", "a", "n1", "l");
        let one = desired(Namespacing::ByIdentity, [&p1, &p2], &bs, &ids);
        let two = desired(Namespacing::ByIdentity, [&p2, &p1], &bs, &ids);
        assert_eq!(one, two);
        assert_eq!(one.len(), 1);
        assert_eq!(one.values().next().unwrap().pod_namespace, "b-c");
    }

    #[test]
    fn provider_ids_name_the_scale_set_or_the_vm() {
        assert_eq!(
            target_of_provider_id(&format!("azure://{SS}/virtualMachines/3")).as_deref(),
            Some(SS)
        );
        let vm =
            "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/vm1";
        assert_eq!(
            target_of_provider_id(&format!("azure://{vm}")).as_deref(),
            Some(vm)
        );
        for bad in [
            "",
            "aws:///i-1",
            "azure:///subscriptions/s",
            "azure:///subscriptions/s/resourceGroups/g/providers/Microsoft.Network/x/y",
        ] {
            assert_eq!(target_of_provider_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn one_write_per_target_for_every_new_pod() {
        let ids = [ident("apps", "id-a"), ident("apps", "id-b")];
        let bs = [
            binding("apps", "ba", "id-a", "a"),
            binding("apps", "bb", "id-b", "b"),
        ];
        let mut pods = vec![];
        for i in 0..100 {
            pods.push(pod(
                "apps",
                &format!("a{i}"),
                if i % 2 == 0 { "n1" } else { "n3" },
                "a",
            ));
            pods.push(pod("apps", &format!("b{i}"), "n2", "b"));
        }
        let want = desired(Namespacing::Always, &pods, &bs, &ids);
        let none = BTreeMap::new();
        let p = plan(
            &want,
            &none,
            &nodes,
            &|_| Some(BTreeSet::new()),
            &HashSet::new(),
        );
        assert_eq!(p.write.len(), 200);
        assert_eq!(p.targets.len(), 2, "one change per scale set");
        let ss = &p.targets[&SS.to_ascii_lowercase()];
        assert_eq!(ss.add, [rid("id-a"), rid("id-b")].into());
        assert_eq!(ss.assign.len(), 150);
        let ss2 = &p.targets[&SS2.to_ascii_lowercase()];
        assert_eq!(ss2.add, [rid("id-a")].into());
        assert_eq!(ss2.assign.len(), 50);
        // written and attached: the next sync has nothing to do
        let have = existing(&want, AssignedState::Assigned);
        let attached = |_: &str| {
            Some(
                [rid("id-a"), rid("id-b")]
                    .iter()
                    .map(|r| r.to_ascii_lowercase())
                    .collect(),
            )
        };
        let p = plan(&want, &have, &nodes, &attached, &HashSet::new());
        assert_eq!(p, Plan::default());
        // created, already attached (by another pod's write): assigned without a write
        let have = existing(&want, AssignedState::Created);
        let p = plan(&want, &have, &nodes, &attached, &HashSet::new());
        assert!(p.write.is_empty());
        assert!(p
            .targets
            .values()
            .all(|c| !c.needs_write() && !c.assign.is_empty()));
    }

    #[test]
    fn detach_after_the_last_pod_on_the_target_unless_immutable() {
        let ids = [ident("apps", "id-a"), ident("apps", "kubelet")];
        let bs = [
            binding("apps", "ba", "id-a", "a"),
            binding("apps", "bk", "kubelet", "k"),
        ];
        let pods = [
            pod("apps", "p1", "n1", "a"),
            pod("apps", "p2", "n2", "a"),
            pod("apps", "k1", "n1", "k"),
        ];
        let full = desired(Namespacing::Always, &pods, &bs, &ids);
        let have = existing(&full, AssignedState::Assigned);
        let attached = |_: &str| {
            Some(
                [rid("id-a"), rid("kubelet")]
                    .iter()
                    .map(|r| r.to_ascii_lowercase())
                    .collect(),
            )
        };
        let immutable: HashSet<String> = ["c-kubelet".to_string()].into();
        // p1 gone: p2 (same scale set) still uses id-a: delete the object, keep the identity
        let want = desired(Namespacing::Always, &pods[1..], &bs, &ids);
        let p = plan(&want, &have, &nodes, &attached, &immutable);
        let c = &p.targets[&SS.to_ascii_lowercase()];
        assert!(c.remove.is_empty());
        assert_eq!(c.delete.len(), 1, "p1's object");
        // every pod gone: id-a detached, the kubelet identity never
        let none = BTreeMap::new();
        let p = plan(&none, &have, &nodes, &attached, &immutable);
        let c = &p.targets[&SS.to_ascii_lowercase()];
        assert_eq!(c.remove, [rid("id-a")].into());
        assert_eq!(c.delete.len(), 3);
        // the target's identities unknown (GET failed): left alone
        let p = plan(&none, &have, &nodes, &|_| None, &immutable);
        assert!(p.targets.is_empty());
        // a node that names no target: objects created with an error, removed ones deleted
        let lost = [pod("apps", "p9", "n9", "a")];
        let want = desired(Namespacing::Always, &lost, &bs, &ids);
        let p = plan(&want, &BTreeMap::new(), &nodes, &attached, &immutable);
        assert_eq!(p.unplaced.len(), 1);
        let p = plan(
            &BTreeMap::new(),
            &existing(&want, AssignedState::Created),
            &nodes,
            &attached,
            &immutable,
        );
        assert_eq!(p.orphaned.len(), 1);
    }

    #[test]
    fn a_removed_identity_is_attached_again() {
        let ids = [ident("apps", "id-a")];
        let bs = [binding("apps", "ba", "id-a", "a")];
        let want = desired(
            Namespacing::Always,
            &[pod("apps", "p1", "n1", "a")],
            &bs,
            &ids,
        );
        let have = existing(&want, AssignedState::Assigned);
        let p = plan(
            &want,
            &have,
            &nodes,
            &|_| Some(BTreeSet::new()),
            &HashSet::new(),
        );
        let c = &p.targets[&SS.to_ascii_lowercase()];
        assert_eq!(c.add, [rid("id-a")].into());
        assert!(c.assign.is_empty(), "already Assigned");
    }

    #[test]
    fn the_patch_body_merges_and_keeps_the_system_identity() {
        let a: BTreeSet<String> = [rid("a")].into();
        let b: BTreeSet<String> = [rid("b")].into();
        let none = BTreeSet::new();
        let cur = json!({"type": "SystemAssigned", "principalId": "p"});
        assert_eq!(
            identity_patch(&cur, &a, &none).unwrap(),
            json!({"identity": {"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {rid("a"): {}}}})
        );
        let cur = json!({"type": "UserAssigned", "userAssignedIdentities": {rid("a").to_uppercase(): {"clientId": "x"}}});
        assert_eq!(
            identity_patch(&cur, &a, &none),
            None,
            "already there (case-insensitive)"
        );
        assert_eq!(
            identity_patch(&cur, &b, &a).unwrap(),
            json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {rid("b"): {}, rid("a").to_uppercase(): null}}})
        );
        assert_eq!(
            identity_patch(&cur, &none, &a).unwrap(),
            json!({"identity": {"type": "None"}})
        );
        let cur = json!({"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {rid("a"): {}}});
        assert_eq!(
            identity_patch(&cur, &none, &a).unwrap(),
            json!({"identity": {"type": "SystemAssigned"}})
        );
        assert_eq!(
            identity_patch(&cur, &none, &b),
            None,
            "not there: nothing to remove"
        );
    }

    #[test]
    fn a_node_gone_or_a_pod_moved_still_detaches_from_where_it_was() {
        let ids = [ident("apps", "id-a")];
        let bs = [binding("apps", "ba", "id-a", "a")];
        let attached = |_: &str| Some([rid("id-a").to_ascii_lowercase()].into_iter().collect());
        let want = desired(
            Namespacing::Always,
            &[pod("apps", "p1", "n1", "a")],
            &bs,
            &ids,
        );
        let mut have = existing(&want, AssignedState::Assigned);
        for e in have.values_mut() {
            e.target = Some(SS.to_string());
        }
        // the node is gone (no providerID to read): detached from the annotated scale set
        let gone = |n: &str| if n == "n1" { None } else { nodes(n) };
        let p = plan(&BTreeMap::new(), &have, &gone, &attached, &HashSet::new());
        let c = &p.targets[&SS.to_ascii_lowercase()];
        assert_eq!(c.remove, [rid("id-a")].into());
        assert_eq!(c.delete.len(), 1);
        assert!(p.orphaned.is_empty());
        // the pod re-created under the same name on a node of another scale set: attached
        // there, detached from the old one, the object rewritten (not deleted)
        let moved = desired(
            Namespacing::Always,
            &[pod("apps", "p1", "n3", "a")],
            &bs,
            &ids,
        );
        let p = plan(
            &moved,
            &have,
            &nodes,
            &|_| {
                Some(BTreeSet::new()).map(|_: BTreeSet<String>| {
                    [rid("id-a").to_ascii_lowercase()].into_iter().collect()
                })
            },
            &HashSet::new(),
        );
        assert_eq!(p.write.len(), 1);
        let old = &p.targets[&SS.to_ascii_lowercase()];
        assert_eq!(old.remove, [rid("id-a")].into());
        assert!(old.delete.is_empty(), "rewritten, not deleted");
    }
}
