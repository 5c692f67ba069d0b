//! ARM's what-if, the pure part: from a resource as it is (its GET, if it exists) and the body a
//! deployment would PUT, the change ARM's `whatIf` reports (`WhatIfChange`: `changeType`,
//! `before`, `after`, `delta` of `WhatIfPropertyChange`s).
//!
//! The predicted state is the resource as it is with what the template names laid over it
//! (objects member by member, anything else replaced; `tags` replaced whole, as a PUT replaces
//! them): members a provider sets itself (`principalId`, `clientId`, timestamps) are not
//! reported as deleted, as they would be by comparing against the body alone. Resource ids are
//! compared without case and locations without case and spaces ("East US" is "eastus"), as ARM
//! reads them. Values of secure parameters are never put into `after` or `delta`: a member that
//! carries one is left out of the body before it is compared (so a secret's new value is not
//! reported — it could not be anyway: no GET answers it).

use serde_json::{json, Map, Value};

/// ARM's `changeType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Create,
    Delete,
    Ignore,
    NoChange,
    Modify,
    Unsupported,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Create => "Create",
            ChangeType::Delete => "Delete",
            ChangeType::Ignore => "Ignore",
            ChangeType::NoChange => "NoChange",
            ChangeType::Modify => "Modify",
            ChangeType::Unsupported => "Unsupported",
        }
    }
}

/// The members of a resource's JSON that are its identity, not its state.
const IDENTITY: &[&str] = &["id", "name", "type"];

/// The change a PUT of `body` (the template's resource, template-only members removed) makes to
/// the resource `id` whose GET answered `before` (None: it does not exist). `secrets` are the
/// deployment's secure values.
pub fn change(
    id: &str,
    full_type: &str,
    name: &str,
    api_version: &str,
    before: Option<&Value>,
    body: &Value,
    secrets: &[String],
) -> Value {
    let mut body = body.clone();
    redact(&mut body, secrets);
    let mut after = match before {
        Some(b) => overlay(b, &body),
        None => body,
    };
    if let Value::Object(m) = &mut after {
        if before.is_none() {
            m.insert("id".into(), json!(id));
            m.insert("name".into(), json!(name));
            m.insert("type".into(), json!(full_type));
        }
        m.insert("apiVersion".into(), json!(api_version));
    }
    let Some(before) = before else {
        return json!({"resourceId": id, "changeType": ChangeType::Create.as_str(), "after": after});
    };
    let mut before = before.clone();
    if let Value::Object(m) = &mut before {
        m.insert("apiVersion".into(), json!(api_version));
    }
    let delta = delta(&before, &after);
    let kind = if delta.is_empty() {
        ChangeType::NoChange
    } else {
        ChangeType::Modify
    };
    let mut c =
        json!({"resourceId": id, "changeType": kind.as_str(), "before": before, "after": after});
    if !delta.is_empty() {
        c["delta"] = Value::Array(delta);
    }
    c
}

/// A resource the deployment leaves as it is (incremental mode: not in the template) or deletes
/// (complete mode).
pub fn untouched(id: &str, before: &Value, deleted: bool) -> Value {
    let kind = if deleted {
        ChangeType::Delete
    } else {
        ChangeType::Ignore
    };
    json!({"resourceId": id, "changeType": kind.as_str(), "before": before})
}

/// A resource whose change cannot be told before it is deployed, and why.
pub fn unsupported(id: &str, reason: &str) -> Value {
    json!({"resourceId": id, "changeType": ChangeType::Unsupported.as_str(), "unsupportedReason": reason})
}

/// `before` with `body` laid over it: objects member by member, `tags` and anything else
/// replaced by the body's; members of `before` the body does not name stay, except `tags`
/// (a PUT without tags clears them).
fn overlay(before: &Value, body: &Value) -> Value {
    fn merge(b: &Value, o: &Value) -> Value {
        match (b, o) {
            (Value::Object(bm), Value::Object(om)) => {
                let mut out = bm.clone();
                for (k, v) in om {
                    let merged = match bm.get(k) {
                        Some(bv) => merge(bv, v),
                        None => v.clone(),
                    };
                    out.insert(k.clone(), merged);
                }
                Value::Object(out)
            }
            _ => o.clone(),
        }
    }
    let mut out = merge(before, body);
    if let Value::Object(m) = &mut out {
        match body.get("tags") {
            Some(t) => {
                m.insert("tags".into(), t.clone());
            }
            // the provider answers no tags as `{}`
            None if before.get("tags").is_some() => {
                m.insert("tags".into(), Value::Object(Map::new()));
            }
            None => {}
        }
        // what names the resource is the provider's spelling (the template's may differ in case)
        for k in IDENTITY {
            if let Some(v) = before.get(*k) {
                m.insert((*k).into(), v.clone());
            }
        }
    }
    out
}

/// Leave out of `v` every member and item whose value is, or contains, a secure value.
fn redact(v: &mut Value, secrets: &[String]) {
    fn carries(v: &Value, secrets: &[String]) -> bool {
        match v {
            Value::String(s) => secrets
                .iter()
                .any(|x| !x.is_empty() && s.contains(x.as_str())),
            _ => false,
        }
    }
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !carries(x, secrets));
            for x in m.values_mut() {
                redact(x, secrets);
            }
        }
        Value::Array(a) => {
            a.retain(|x| !carries(x, secrets));
            for x in a.iter_mut() {
                redact(x, secrets);
            }
        }
        _ => {}
    }
}

/// Whether two values are the same state (ids without case; `location` without case and spaces).
fn same(path: &str, a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => {
            if x == y {
                return true;
            }
            if path == "location" {
                let norm = |s: &str| {
                    s.chars()
                        .filter(|c| !c.is_whitespace())
                        .collect::<String>()
                        .to_ascii_lowercase()
                };
                return norm(x) == norm(y);
            }
            x.starts_with('/') && x.eq_ignore_ascii_case(y)
        }
        (Value::Object(x), Value::Object(y)) => {
            let member = |m: &Map<String, Value>, k: &str| m.get(k).filter(|v| !empty(v)).cloned();
            x.keys()
                .chain(y.keys())
                .all(|k| match (member(x, k), member(y, k)) {
                    (None, None) => true,
                    (Some(v), Some(w)) => same(&join(path, k), &v, &w),
                    _ => false,
                })
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(path, v, w))
        }
        _ => a == b,
    }
}

/// A value a provider answers for a member nobody set (`[]`, `{}`, `null`): the same as the
/// member left out.
fn empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// ARM's `delta`: the property changes from `before` to `after`, objects by member (dotted
/// paths), arrays as one `Array` change whose `children` are its items' changes by index.
pub fn delta(before: &Value, after: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    diff_members(
        "",
        before.as_object().unwrap_or(&Map::new()),
        after.as_object().unwrap_or(&Map::new()),
        &mut out,
    );
    out
}

fn diff_members(path: &str, b: &Map<String, Value>, a: &Map<String, Value>, out: &mut Vec<Value>) {
    let mut keys: Vec<&String> = b
        .keys()
        .chain(a.keys().filter(|k| !b.contains_key(*k)))
        .collect();
    keys.sort();
    for k in keys {
        diff(&join(path, k), b.get(k), a.get(k), out);
    }
}

/// The change at `path` (a dotted path, or an array item's index).
fn diff(path: &str, b: Option<&Value>, a: Option<&Value>, out: &mut Vec<Value>) {
    match (b.filter(|v| !empty(v)), a.filter(|v| !empty(v))) {
        (None, None) => {}
        (None, Some(a)) => {
            out.push(json!({"path": path, "propertyChangeType": "Create", "after": a}))
        }
        (Some(b), None) => {
            out.push(json!({"path": path, "propertyChangeType": "Delete", "before": b}))
        }
        (Some(b), Some(a)) if same(path, b, a) => {}
        (Some(Value::Object(bm)), Some(Value::Object(am))) => diff_members(path, bm, am, out),
        (Some(Value::Array(bv)), Some(Value::Array(av))) => {
            let mut children = Vec::new();
            for i in 0..bv.len().max(av.len()) {
                let (bi, ai) = (bv.get(i), av.get(i));
                let item = i.to_string();
                match (bi, ai) {
                    (Some(x), Some(y)) if same(path, x, y) => {}
                    (Some(Value::Object(xm)), Some(Value::Object(ym))) => {
                        let mut inner = Vec::new();
                        diff_members("", xm, ym, &mut inner);
                        children.push(json!({"path": item, "propertyChangeType": "Modify", "children": inner}));
                    }
                    _ => diff(&item, bi, ai, &mut children),
                }
            }
            out.push(json!({"path": path, "propertyChangeType": "Array", "children": children}));
        }
        (Some(b), Some(a)) => {
            out.push(json!({"path": path, "propertyChangeType": "Modify", "before": b, "after": a}))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1";
    const TYPE: &str = "Microsoft.ManagedIdentity/userAssignedIdentities";

    fn identity() -> Value {
        json!({"id": ID, "name": "id1", "type": TYPE, "location": "eastus", "tags": {"team": "a"},
            "properties": {"clientId": "c", "principalId": "p", "tenantId": "t"}})
    }

    #[test]
    fn a_resource_that_does_not_exist_is_created_with_what_the_template_names() {
        let c = change(
            ID,
            TYPE,
            "id1",
            "2023-01-31",
            None,
            &json!({"location": "eastus"}),
            &[],
        );
        assert_eq!(c["changeType"], "Create");
        assert_eq!(c["after"]["id"], ID);
        assert_eq!(c["after"]["location"], "eastus");
        assert_eq!(c["after"]["apiVersion"], "2023-01-31");
        assert!(c.get("before").is_none() && c.get("delta").is_none(), "{c}");
    }

    #[test]
    fn what_the_provider_sets_is_no_change_and_ids_and_locations_compare_as_arm_reads_them() {
        // the provider's own members (clientId, principalId) are not deletions; "East US" is
        // eastus; the template's type spelled in another case names the same resource
        let body = json!({"location": "East US", "tags": {"team": "a"}});
        let c = change(
            ID,
            &TYPE.to_uppercase(),
            "ID1",
            "2023-01-31",
            Some(&identity()),
            &body,
            &[],
        );
        assert_eq!(c["changeType"], "NoChange", "{c}");
        assert_eq!(c["after"]["properties"]["principalId"], "p");
        assert_eq!(c["after"]["type"], TYPE);
        let mut b = identity();
        b["properties"]["scope"] = json!(ID.to_uppercase());
        let body =
            json!({"location": "eastus", "tags": {"team": "a"}, "properties": {"scope": ID}});
        assert_eq!(
            change(ID, TYPE, "id1", "v", Some(&b), &body, &[])["changeType"],
            "NoChange"
        );
    }

    #[test]
    fn changed_members_are_modify_create_and_delete_by_dotted_path() {
        let body = json!({"location": "eastus", "tags": {"team": "b", "env": "dev"},
            "properties": {"isolationScope": "Regional"}});
        let c = change(ID, TYPE, "id1", "v", Some(&identity()), &body, &[]);
        assert_eq!(c["changeType"], "Modify");
        let d = c["delta"].as_array().unwrap();
        let by = |p: &str| {
            d.iter()
                .find(|x| x["path"] == p)
                .cloned()
                .unwrap_or(Value::Null)
        };
        assert_eq!(by("tags.team")["propertyChangeType"], "Modify");
        assert_eq!(
            (
                by("tags.team")["before"].clone(),
                by("tags.team")["after"].clone()
            ),
            (json!("a"), json!("b"))
        );
        assert_eq!(by("tags.env")["propertyChangeType"], "Create");
        assert_eq!(
            by("properties.isolationScope")["propertyChangeType"],
            "Create"
        );
        assert_eq!(d.len(), 3, "{c}");
        // a PUT without tags clears them
        let c = change(
            ID,
            TYPE,
            "id1",
            "v",
            Some(&identity()),
            &json!({"location": "eastus"}),
            &[],
        );
        assert_eq!(
            c["delta"],
            json!([{"path": "tags", "propertyChangeType": "Delete", "before": {"team": "a"}}])
        );
        let mut untagged = identity();
        untagged["tags"] = json!({});
        let c = change(
            ID,
            TYPE,
            "id1",
            "v",
            Some(&untagged),
            &json!({"location": "eastus"}),
            &[],
        );
        assert_eq!(c["changeType"], "NoChange", "{c}");
    }

    #[test]
    fn members_a_provider_answers_empty_are_the_same_as_left_out() {
        let vault = json!({"id": "/v", "name": "v", "type": "t", "tags": {}, "properties": {
            "accessPolicies": [{"objectId": "o", "permissions": {"secrets": ["get"], "keys": [], "storage": []}}],
            "networkAcls": null}});
        let body = json!({"properties": {"accessPolicies": [{"objectId": "o", "permissions": {"secrets": ["get"]}}]}});
        let c = change("/v", "t", "v", "x", Some(&vault), &body, &[]);
        assert_eq!(c["changeType"], "NoChange", "{c}");
        let body = json!({"properties": {"accessPolicies": [{"objectId": "o", "permissions": {"secrets": ["get", "list"]}}]}});
        let c = change("/v", "t", "v", "x", Some(&vault), &body, &[]);
        assert_eq!(c["delta"][0]["path"], "properties.accessPolicies", "{c}");
        assert_eq!(
            c["delta"][0]["children"][0]["children"][0]["path"], "permissions.secrets",
            "{c}"
        );
    }

    #[test]
    fn arrays_change_as_one_array_change_with_their_items_by_index() {
        let fic = json!({"id": "/x/f", "name": "f", "type": "t", "properties": {"issuer": "https://i", "subject": "s",
            "audiences": ["api://AzureADTokenExchange"]}});
        let body = json!({"properties": {"issuer": "https://i", "subject": "s", "audiences": ["api://AzureADTokenExchange", "api://other"]}});
        let c = change("/x/f", "t", "f", "v", Some(&fic), &body, &[]);
        assert_eq!(
            c["delta"],
            json!([{"path": "properties.audiences", "propertyChangeType": "Array",
            "children": [{"path": "1", "propertyChangeType": "Create", "after": "api://other"}]}])
        );
    }

    #[test]
    fn secure_values_are_never_in_the_change() {
        let secret = "hunter2-very-secret".to_string();
        let body = json!({"properties": {"value": secret, "contentType": "text/plain",
            "attributes": {"enabled": true}, "list": ["a", format!("x{secret}x")]}});
        for before in [
            None,
            Some(
                json!({"id": "/s", "name": "s", "type": "t", "properties": {"contentType": "text/plain"}}),
            ),
        ] {
            let c = change(
                "/s",
                "t",
                "s",
                "v",
                before.as_ref(),
                &body,
                std::slice::from_ref(&secret),
            );
            assert!(!c.to_string().contains(&secret), "{c}");
            assert_eq!(c["after"]["properties"]["contentType"], "text/plain");
        }
    }

    #[test]
    fn untouched_resources_are_ignored_or_deleted_and_unsupported_says_why() {
        assert_eq!(untouched(ID, &identity(), false)["changeType"], "Ignore");
        let d = untouched(ID, &identity(), true);
        assert_eq!(
            (d["changeType"].as_str(), d["before"]["name"].as_str()),
            (Some("Delete"), Some("id1"))
        );
        let u = unsupported(ID, "why");
        assert_eq!(
            (u["changeType"].as_str(), u["unsupportedReason"].as_str()),
            (Some("Unsupported"), Some("why"))
        );
    }
}
