//! "Why does my pod get no identity?" (`keyless aks pod-identity explain`, and NMI's local
//! `/explain`): the same rules NMI applies ([`pod_identity::decide_in`], the trust, MIC's
//! assigned identities in standard mode), walked step by step over plain data, so the agent of
//! the pod's node and the CLI (from the API server's objects) give one answer.
//!
//! The answer is a list of [`Step`]s (what was looked at, whether it lets the pod through, why)
//! and a [`Verdict`] with a stable code: `served`, `pod_not_found`, `not_on_this_node`,
//! `pod_not_running`, `host_network`, `excepted`, `no_label`, `no_binding`,
//! `binding_in_other_namespace`, `identity_missing`, `identity_not_served`,
//! `identity_not_trusted`, `not_assigned`, `assignment_failed`, `not_on_node`,
//! `identity_not_bound`.

use crate::mic::{AssignedState, Existing};
use crate::pod_identity::{
    self as pi, AzureIdentity, Binding, Exception, Namespacing, PodDecision, Trust, BINDING_LABEL,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// The pod as the explainer needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub pod: pi::Pod,
    pub node: String,
    pub phase: String,
    pub ips: Vec<String>,
    pub host_network: bool,
}

/// Which rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rules {
    Managed,
    Standard(Namespacing),
}

/// Everything one explanation reads.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// None: no such pod.
    pub pod: Option<&'a PodFacts>,
    /// The node whose agent answers (None: the CLI, from the API server).
    pub agent_node: Option<&'a str>,
    pub rules: Rules,
    pub trust: &'a Trust,
    pub bindings: &'a [Binding],
    pub identities: &'a [AzureIdentity],
    pub exceptions: &'a [Exception],
    /// Standard mode: the pod's `AzureAssignedIdentity` objects.
    pub assigned: &'a [Existing],
    /// The client ids (lowercase) the node holds (None: not known here).
    pub node_identities: Option<&'a HashSet<String>>,
    /// The client id the request names, if any.
    pub requested: Option<&'a str>,
}

/// One thing looked at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

/// The outcome: a stable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub code: String,
    pub message: String,
    /// The client ids the pod is served (in NMI's order: the first is what a request without
    /// a selector gets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

/// A refusal NMI answered this pod lately.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentRefusal {
    /// RFC 3339.
    pub time: String,
    pub status: u16,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// The whole answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub namespace: String,
    pub pod: String,
    /// Who answers: `agent of node <n>` or `API server (no agent asked)`.
    pub source: String,
    pub mode: String,
    pub steps: Vec<Step>,
    pub verdict: Verdict,
    /// The agent's last refusals of this pod, newest last (absent when no agent answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusals: Option<Vec<RecentRefusal>>,
}

struct Walk {
    steps: Vec<Step>,
}

impl Walk {
    fn step(&mut self, check: &str, ok: bool, detail: impl Into<String>) {
        self.steps.push(Step {
            check: check.into(),
            ok,
            detail: detail.into(),
        });
    }
}

fn verdict(code: &str, message: impl Into<String>) -> Verdict {
    Verdict {
        code: code.into(),
        message: message.into(),
        identities: vec![],
    }
}

/// Explain what NMI does with the pod's requests.
pub fn explain(f: &Facts<'_>) -> Explanation {
    let mut w = Walk { steps: vec![] };
    let v = walk(f, &mut w);
    Explanation {
        namespace: f.namespace.to_string(),
        pod: f.name.to_string(),
        source: match f.agent_node {
            Some(n) => format!("agent of node {n}"),
            None => "API server (no agent asked)".to_string(),
        },
        mode: match f.rules {
            Rules::Managed => "managed".into(),
            Rules::Standard(Namespacing::Always) => "standard (forceNamespaced)".into(),
            Rules::Standard(Namespacing::ByIdentity) => "standard".into(),
        },
        steps: w.steps,
        verdict: v,
        refusals: None,
    }
}

fn walk(f: &Facts<'_>, w: &mut Walk) -> Verdict {
    let who = format!("{}/{}", f.namespace, f.name);
    let Some(p) = f.pod else {
        let detail = match f.agent_node {
            Some(n) => format!("no pod {who} is scheduled on node {n} (or it is gone)"),
            None => format!("the API server has no pod {who}"),
        };
        w.step("pod", false, detail.clone());
        return verdict(
            if f.agent_node.is_some() {
                "not_on_this_node"
            } else {
                "pod_not_found"
            },
            detail,
        );
    };
    let ips = if p.ips.is_empty() {
        "no IP".to_string()
    } else {
        p.ips.join(", ")
    };
    w.step(
        "pod",
        true,
        format!(
            "{who} on node {}, phase {}, {ips}",
            if p.node.is_empty() {
                "(unscheduled)"
            } else {
                &p.node
            },
            if p.phase.is_empty() {
                "(none)"
            } else {
                &p.phase
            }
        ),
    );
    if let Some(n) = f.agent_node {
        if p.node != n {
            let m = format!(
                "the pod runs on node {}, not on this agent's node {n}: ask that node's agent",
                p.node
            );
            w.step("node", false, m.clone());
            return verdict("not_on_this_node", m);
        }
    }
    if p.host_network {
        let m = "the pod uses the host network: its traffic is the node's, NMI never sees it (it gets what the node's own IMDS gives the node)";
        w.step("network", false, m);
        return verdict("host_network", m);
    }
    if !matches!(p.phase.as_str(), "Pending" | "Running") || p.ips.is_empty() {
        let m = "NMI answers a pod by its IP while it is Pending or Running with an IP reported";
        w.step("network", false, m);
        return verdict("pod_not_running", m);
    }
    // exceptions (only those of the pod's namespace count; the trust decides which objects)
    let mut excepted_by = None;
    for e in f
        .exceptions
        .iter()
        .filter(|e| e.namespace == p.pod.namespace)
    {
        if pi::excepts(e, &p.pod) {
            if f.trust.exception(e) {
                excepted_by = Some(e.name.clone());
                break;
            }
            w.step(
                "exception",
                true,
                format!(
                    "exception {}/{} matches the pod's labels but is not the cluster's (not in its podIdentityProfile): ignored",
                    e.namespace, e.name
                ),
            );
        }
    }
    if let Some(e) = excepted_by {
        let m = format!(
            "excepted by AzurePodIdentityException {}/{e}: the pod gets what the node's IMDS gives the node (the kubelet identity), never a pod identity",
            p.pod.namespace
        );
        w.step("exception", false, m.clone());
        return verdict("excepted", m);
    }
    w.step(
        "exception",
        true,
        format!("no exception of namespace {} matches", p.pod.namespace),
    );
    let Some(label) = p.pod.labels.get(BINDING_LABEL) else {
        let m = format!("the pod has no {BINDING_LABEL} label: no binding can select it");
        w.step("label", false, m.clone());
        return verdict("no_label", m);
    };
    w.step("label", true, format!("{BINDING_LABEL}={label}"));
    let namespacing = match f.rules {
        Rules::Managed => Namespacing::Always,
        Rules::Standard(n) => n,
    };
    // bindings with the pod's selector, and why each counts or not
    let by_ref: BTreeMap<(&str, &str), &AzureIdentity> = f
        .identities
        .iter()
        .map(|i| ((i.namespace.as_str(), i.name.as_str()), i))
        .collect();
    let mut counted = 0;
    let mut elsewhere = 0;
    let mut missing = 0;
    let mut refused_identity: Option<(String, &'static str)> = None;
    for b in f.bindings.iter().filter(|b| &b.selector == label) {
        let bname = format!("{}/{}", b.namespace, b.name);
        let id = by_ref.get(&(b.namespace.as_str(), b.azure_identity.as_str()));
        let cross = b.namespace != p.pod.namespace;
        let scoped = namespacing == Namespacing::Always || id.is_some_and(|i| i.namespaced);
        if cross && scoped {
            elsewhere += 1;
            w.step(
                "binding",
                false,
                format!(
                    "{bname} has selector {label} but is in another namespace: {}",
                    if namespacing == Namespacing::Always {
                        "bindings count in the pod's own namespace only"
                    } else {
                        "its identity is namespaced (aadpodidentity.k8s.io/Behavior)"
                    }
                ),
            );
            continue;
        }
        let Some(id) = id else {
            missing += 1;
            w.step(
                "binding",
                false,
                format!(
                    "{bname} names AzureIdentity {}/{}, which does not exist",
                    b.namespace, b.azure_identity
                ),
            );
            continue;
        };
        let iname = format!("{}/{}", id.namespace, id.name);
        if id.type_ != 0 || id.client_id.is_empty() {
            w.step(
                "identity",
                false,
                format!("{bname} → {iname}: type {} without a client id is not served (only user-assigned managed identities, type 0)", id.type_),
            );
            refused_identity.get_or_insert((iname, "identity_not_served"));
            continue;
        }
        if !f.trust.identity(id) {
            w.step(
                "identity",
                false,
                format!("{bname} → {iname} (client id {}): not a pod identity of the cluster's podIdentityProfile, so NMI ignores it", id.client_id),
            );
            refused_identity.get_or_insert((iname, "identity_not_trusted"));
            continue;
        }
        counted += 1;
        w.step(
            "binding",
            true,
            format!("{bname} → {iname} (client id {})", id.client_id),
        );
    }
    let decision = pi::decide_in(
        namespacing,
        &p.pod,
        f.bindings,
        f.identities.iter().filter(|i| f.trust.identity(i)),
        [],
    );
    let PodDecision::Bound(bound) = decision else {
        let (code, m) = if let Some((iname, code)) = refused_identity {
            (
                code,
                format!("the only identity selected, {iname}, is not served"),
            )
        } else if missing > 0 {
            (
                "identity_missing",
                format!(
                    "the binding with selector {label} names an AzureIdentity that does not exist"
                ),
            )
        } else if elsewhere > 0 {
            (
                "binding_in_other_namespace",
                format!("the bindings with selector {label} are in other namespaces"),
            )
        } else {
            let m = match namespacing {
                Namespacing::Always => format!("no AzureIdentityBinding in namespace {} has selector {label} (deleted, or never created)", p.pod.namespace),
                Namespacing::ByIdentity => format!("no AzureIdentityBinding has selector {label} (deleted, or never created)"),
            };
            ("no_binding", m)
        };
        if counted == 0 && missing == 0 && elsewhere == 0 && code == "no_binding" {
            w.step("binding", false, m.clone());
        }
        return verdict(code, m);
    };
    // standard mode: MIC's assigned identities
    let mut served: Vec<&pi::BoundIdentity> = bound.iter().collect();
    let mut waiting: Vec<String> = vec![];
    let mut failed: Vec<String> = vec![];
    if let Rules::Standard(_) = f.rules {
        served.clear();
        for b in &bound {
            let iname = format!("{}/{}", b.namespace, b.name);
            if b.resource_id.is_empty() {
                failed.push(format!("{iname}: no resourceID"));
                w.step("assignment", false, format!("{iname}: the AzureIdentity has no resourceID: MIC cannot attach it to the node's VM / scale set"));
                continue;
            }
            let obj = f.assigned.iter().find(|e| {
                e.assignment.identity.namespace == b.namespace
                    && e.assignment.identity.name == b.name
            });
            match obj {
                Some(e) if e.state == AssignedState::Assigned => {
                    w.step(
                        "assignment",
                        true,
                        format!(
                            "{iname}: AzureAssignedIdentity Assigned on node {}",
                            e.assignment.node
                        ),
                    );
                    served.push(b);
                }
                Some(e) => {
                    let why = match &e.error {
                        Some((code, msg)) => {
                            failed.push(format!("{iname}: {code}: {msg}"));
                            format!("MIC could not attach it to the node's VM / scale set: {code}: {msg}")
                        }
                        None => {
                            waiting.push(iname.clone());
                            "MIC has not attached it yet".into()
                        }
                    };
                    w.step(
                        "assignment",
                        false,
                        format!("{iname}: AzureAssignedIdentity {}: {why}", e.state.as_str()),
                    );
                }
                None => {
                    waiting.push(iname.clone());
                    w.step("assignment", false, format!("{iname}: no AzureAssignedIdentity yet: MIC has not seen the pod (is MIC running, and does it hold its Lease?)"));
                }
            }
        }
    }
    // the node holds the identity?
    if let Some(held) = f.node_identities {
        let mut on_node = vec![];
        for b in served {
            if held.contains(&b.client_id.to_ascii_lowercase()) {
                on_node.push(b);
            } else {
                w.step(
                    "node",
                    false,
                    format!(
                        "{}/{} (client id {}): this node's VM / scale set does not hold it",
                        b.namespace, b.name, b.client_id
                    ),
                );
            }
        }
        served = on_node;
    }
    let ids: Vec<String> = served.iter().map(|b| b.client_id.clone()).collect();
    if ids.is_empty() {
        if !failed.is_empty() {
            return verdict(
                "assignment_failed",
                format!("not assigned: {}", failed.join("; ")),
            );
        }
        if !waiting.is_empty() {
            return verdict(
                "not_assigned",
                format!("waiting for MIC to assign {}", waiting.join(", ")),
            );
        }
        return verdict(
            "not_on_node",
            "the pod's identities are not on its node's VM / scale set",
        );
    }
    if let Some(r) = f.requested {
        // one of the pod's identities that is not served yet: what it waits for
        let pending_named = bound.iter().find(|b| {
            b.client_id.eq_ignore_ascii_case(r) && !ids.iter().any(|c| c.eq_ignore_ascii_case(r))
        });
        if let Some(b) = pending_named {
            let iname = format!("{}/{}", b.namespace, b.name);
            let m = format!("client id {r} is the pod's {iname}, not served yet");
            w.step("request", false, m);
            if let Some(f) = failed.iter().find(|x| x.starts_with(&format!("{iname}:"))) {
                return verdict("assignment_failed", format!("not assigned: {f}"));
            }
            if waiting.contains(&iname) {
                return verdict("not_assigned", format!("waiting for MIC to assign {iname}"));
            }
            return verdict(
                "not_on_node",
                format!("{iname} is not on the node's VM / scale set"),
            );
        }
        if !ids.iter().any(|c| c.eq_ignore_ascii_case(r)) {
            let m = format!(
                "client id {r} is not one the pod may use here (it may use {})",
                ids.join(", ")
            );
            w.step("request", false, m.clone());
            let mut v = verdict("identity_not_bound", m);
            v.identities = ids;
            return v;
        }
        w.step(
            "request",
            true,
            format!("client id {r} is one of the pod's"),
        );
    }
    Verdict {
        code: "served".into(),
        message: format!(
            "served: {} (a request without client_id gets {})",
            ids.join(", "),
            ids[0]
        ),
        identities: ids,
    }
}

/// The explanation as plain text, one step a line.
pub fn render_text(e: &Explanation) -> String {
    let mut s = format!(
        "pod {}/{} — {} — mode {}\n",
        e.namespace, e.pod, e.source, e.mode
    );
    for st in &e.steps {
        s.push_str(&format!(
            "  [{}] {:<10} {}\n",
            if st.ok { "ok" } else { "no" },
            st.check,
            st.detail
        ));
    }
    s.push_str(&format!(
        "verdict: {} — {}\n",
        e.verdict.code, e.verdict.message
    ));
    match &e.refusals {
        None => s.push_str("recent refusals: (ask the agent of the pod's node: --agent)\n"),
        Some(v) if v.is_empty() => s.push_str("recent refusals: none\n"),
        Some(v) => {
            s.push_str("recent refusals (newest last):\n");
            for r in v {
                s.push_str(&format!(
                    "  {} {} {}{}\n",
                    r.time,
                    r.status,
                    r.reason,
                    r.identity
                        .as_deref()
                        .map(|i| format!(" (asked for {i})"))
                        .unwrap_or_default()
                ));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mic::Assignment;

    fn pod(ns: &str, labels: &[(&str, &str)]) -> PodFacts {
        PodFacts {
            pod: pi::Pod {
                namespace: ns.into(),
                name: "p".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
            node: "n1".into(),
            phase: "Running".into(),
            ips: vec!["10.0.0.2".into()],
            host_network: false,
        }
    }

    fn ident(ns: &str, name: &str) -> AzureIdentity {
        AzureIdentity {
            namespace: ns.into(),
            name: name.into(),
            type_: 0,
            client_id: format!("c-{name}"),
            resource_id: format!("/r/{name}"),
            namespaced: false,
        }
    }

    fn binding(ns: &str, id: &str, sel: &str) -> Binding {
        Binding {
            namespace: ns.into(),
            name: format!("{id}-binding"),
            azure_identity: id.into(),
            selector: sel.into(),
        }
    }

    struct World {
        bindings: Vec<Binding>,
        identities: Vec<AzureIdentity>,
        exceptions: Vec<Exception>,
        assigned: Vec<Existing>,
        trust: Trust,
    }

    impl World {
        fn new() -> World {
            World {
                bindings: vec![binding("apps", "id-a", "foo")],
                identities: vec![ident("apps", "id-a")],
                exceptions: vec![],
                assigned: vec![],
                trust: Trust::Operator,
            }
        }

        fn code(&self, p: Option<&PodFacts>, rules: Rules, agent: Option<&str>) -> Explanation {
            explain(&Facts {
                namespace: "apps",
                name: "p",
                pod: p,
                agent_node: agent,
                rules,
                trust: &self.trust,
                bindings: &self.bindings,
                identities: &self.identities,
                exceptions: &self.exceptions,
                assigned: &self.assigned,
                node_identities: None,
                requested: None,
            })
        }
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let mut w = World::new();
        let bound = pod("apps", &[(BINDING_LABEL, "foo")]);
        let e = w.code(Some(&bound), Rules::Managed, Some("n1"));
        assert_eq!(e.verdict.code, "served", "{e:?}");
        assert_eq!(e.verdict.identities, ["c-id-a"]);
        // no label
        assert_eq!(
            w.code(Some(&pod("apps", &[])), Rules::Managed, None)
                .verdict
                .code,
            "no_label"
        );
        // other namespace: the label matches a binding of another namespace only
        let other = PodFacts {
            pod: pi::Pod {
                namespace: "other".into(),
                ..bound.pod.clone()
            },
            ..bound.clone()
        };
        let e = w.code(Some(&other), Rules::Managed, None);
        assert_eq!(e.verdict.code, "binding_in_other_namespace", "{e:?}");
        // other node: the agent of another node
        assert_eq!(
            w.code(Some(&bound), Rules::Managed, Some("n2"))
                .verdict
                .code,
            "not_on_this_node"
        );
        assert_eq!(
            w.code(None, Rules::Managed, Some("n2")).verdict.code,
            "not_on_this_node"
        );
        assert_eq!(
            w.code(None, Rules::Managed, None).verdict.code,
            "pod_not_found"
        );
        // exception
        w.exceptions.push(Exception {
            namespace: "apps".into(),
            name: "probe".into(),
            pod_labels: [(BINDING_LABEL.to_string(), "FOO".to_string())].into(),
        });
        let e = w.code(Some(&bound), Rules::Managed, None);
        assert_eq!(e.verdict.code, "excepted");
        assert!(e.verdict.message.contains("apps/probe"), "{e:?}");
        w.exceptions.clear();
        // deleted binding
        let saved = std::mem::take(&mut w.bindings);
        let e = w.code(Some(&bound), Rules::Managed, None);
        assert_eq!(e.verdict.code, "no_binding");
        assert!(e.verdict.message.contains("selector foo"), "{e:?}");
        w.bindings = saved;
        // standard mode, not yet assigned, then failed, then assigned
        let std = Rules::Standard(Namespacing::ByIdentity);
        assert_eq!(w.code(Some(&bound), std, None).verdict.code, "not_assigned");
        let mut e = Existing {
            assignment: Assignment {
                pod: "p".into(),
                pod_namespace: "apps".into(),
                node: "n1".into(),
                identity: ident("apps", "id-a"),
                binding: ("apps".into(), "id-a-binding".into()),
            },
            target: None,
            state: AssignedState::Created,
            error: Some(("AuthorizationFailed".into(), "no".into())),
        };
        w.assigned.push(e.clone());
        let x = w.code(Some(&bound), std, None);
        assert_eq!(x.verdict.code, "assignment_failed");
        assert!(x.verdict.message.contains("AuthorizationFailed"));
        e.state = AssignedState::Assigned;
        e.error = None;
        w.assigned = vec![e];
        assert_eq!(w.code(Some(&bound), std, None).verdict.code, "served");
        // the identity deleted: the binding names a missing one
        w.identities.clear();
        assert_eq!(
            w.code(Some(&bound), Rules::Managed, None).verdict.code,
            "identity_missing"
        );
    }

    #[test]
    fn the_text_names_every_step() {
        let w = World::new();
        let bound = pod("apps", &[(BINDING_LABEL, "foo")]);
        let mut e = w.code(Some(&bound), Rules::Managed, Some("n1"));
        e.refusals = Some(vec![RecentRefusal {
            time: "2026-12-05T09:00:00Z".into(),
            status: 404,
            reason: "identity_not_found".into(),
            identity: Some("c-x".into()),
        }]);
        let t = render_text(&e);
        assert!(t.contains("[ok] label"), "{t}");
        assert!(t.contains("verdict: served"), "{t}");
        assert!(t.contains("404 identity_not_found (asked for c-x)"), "{t}");
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["verdict"]["code"], "served");
        assert_eq!(j["refusals"][0]["status"], 404);
    }
}
