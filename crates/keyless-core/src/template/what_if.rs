//! ARM's what-if, the pure part: from a resource as it is (its GET, if it exists) and the body a
//! deployment would PUT, the change ARM's `whatIf` reports (`WhatIfChange`: `changeType`,
//! `before`, `after`, `delta` of `WhatIfPropertyChange`s).
//!
//! The predicted state is the resource as it is with what the template names laid over it
//! (objects member by member, anything else replaced; `tags` replaced whole, as a PUT replaces
//! them): members a provider sets itself (`principalId`, `clientId`, timestamps) are not
//! reported as deleted, as they would be by comparing against the body alone. Resource ids are
//! compared without case and locations without case and spaces ("East US" is "eastus"), as ARM
//! reads them. Secure values are never put into `after` or `delta`: the body comes from
//! [`super::Plan::body_shown`], where every expression that read a secure value is
//! [`super::SECURE_MASK`]; such a member is left out of the body before it is compared (so a
//! secret's new value is not reported — it could not be anyway: no GET answers it), and an
//! array item keeps the mask (so the other items keep their indexes).

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

/// The change a PUT of `body` (the template's resource, template-only members removed, secure
/// values masked: [`super::Plan::body_shown`]) makes to the resource `id` whose GET answered
/// `before` (None: it does not exist).
pub fn change(
    id: &str,
    full_type: &str,
    name: &str,
    api_version: &str,
    before: Option<&Value>,
    body: &Value,
) -> Value {
    let mut after = match before {
        Some(b) => overlay(b, body),
        None => body.clone(),
    };
    unmask(&mut after, before);
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

/// A masked member of `after` (a secure value) as it is now (`before`'s, or left out): not
/// compared, not shown. Array items keep the mask (the others keep their indexes).
fn unmask(after: &mut Value, before: Option<&Value>) {
    match after {
        Value::Object(m) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let now = before.and_then(|b| b.get(&k));
                if m[&k].as_str() == Some(super::SECURE_MASK) {
                    match now {
                        Some(v) => {
                            m.insert(k, v.clone());
                        }
                        None => {
                            m.remove(&k);
                        }
                    }
                } else if let Some(v) = m.get_mut(&k) {
                    unmask(v, now);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| unmask(x, None)),
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
        (Value::Object(x), Value::Object(y)) => x.keys().chain(y.keys()).all(|k| {
            match (
                x.get(k).filter(|v| !empty(v)),
                y.get(k).filter(|v| !empty(v)),
            ) {
                (None, None) => true,
                (Some(v), Some(w)) => same(&join(path, k), v, w),
                _ => false,
            }
        }),
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
        );
        assert_eq!(c["changeType"], "NoChange", "{c}");
        assert_eq!(c["after"]["properties"]["principalId"], "p");
        assert_eq!(c["after"]["type"], TYPE);
        let mut b = identity();
        b["properties"]["scope"] = json!(ID.to_uppercase());
        let body =
            json!({"location": "eastus", "tags": {"team": "a"}, "properties": {"scope": ID}});
        assert_eq!(
            change(ID, TYPE, "id1", "v", Some(&b), &body)["changeType"],
            "NoChange"
        );
    }

    #[test]
    fn changed_members_are_modify_create_and_delete_by_dotted_path() {
        let body = json!({"location": "eastus", "tags": {"team": "b", "env": "dev"},
            "properties": {"isolationScope": "Regional"}});
        let c = change(ID, TYPE, "id1", "v", Some(&identity()), &body);
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
        );
        assert_eq!(c["changeType"], "NoChange", "{c}");
    }

    #[test]
    fn members_a_provider_answers_empty_are_the_same_as_left_out() {
        let vault = json!({"id": "/v", "name": "v", "type": "t", "tags": {}, "properties": {
            "accessPolicies": [{"objectId": "o", "permissions": {"secrets": ["get"], "keys": [], "storage": []}}],
            "networkAcls": null}});
        let body = json!({"properties": {"accessPolicies": [{"objectId": "o", "permissions": {"secrets": ["get"]}}]}});
        let c = change("/v", "t", "v", "x", Some(&vault), &body);
        assert_eq!(c["changeType"], "NoChange", "{c}");
        let body = json!({"properties": {"accessPolicies": [{"objectId": "o", "permissions": {"secrets": ["get", "list"]}}]}});
        let c = change("/v", "t", "v", "x", Some(&vault), &body);
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
        let c = change("/x/f", "t", "f", "v", Some(&fic), &body);
        assert_eq!(
            c["delta"],
            json!([{"path": "properties.audiences", "propertyChangeType": "Array",
            "children": [{"path": "1", "propertyChangeType": "Create", "after": "api://other"}]}])
        );
    }

    #[test]
    fn secure_values_and_what_is_made_of_them_are_never_in_the_change() {
        use crate::template::{NoReferences, Plan, Scope, SECURE_MASK};
        let scope = Scope {
            level: crate::template::Level::ResourceGroup,
            subscription_id: "s".into(),
            tenant_id: "t".into(),
            resource_group: "rg".into(),
            resource_group_location: "eastus".into(),
            deployment_name: "d".into(),
            location: None,
            environment: Value::Null,
        };
        // a secret used as is, transformed, inside a list, through a variable; a secure
        // object's number; a short secret ("e") that must not hide other values
        let t = json!({"$schema": "x", "contentVersion": "1.0.0.0",
            "parameters": {"pw": {"type": "securestring"}, "obj": {"type": "secureObject"},
                "e": {"type": "securestring"}},
            "variables": {"derived": "[concat('x', toUpper(parameters('pw')))]"},
            "resources": [{"type": "Microsoft.KeyVault/vaults/secrets", "apiVersion": "2023-07-01",
                "name": "v/s", "location": "eastus", "properties": {
                    "value": "[parameters('pw')]", "contentType": "text/plain",
                    "encoded": "[base64(parameters('pw'))]", "upper": "[toUpper(parameters('pw'))]",
                    "list": ["a", "[parameters('pw')]", "c"], "viaVariable": "[variables('derived')]",
                    "pin": "[parameters('obj').pin]", "short": "[parameters('e')]"}}]});
        let params = json!({"pw": {"value": "hunter2secret"}, "obj": {"value": {"pin": 98765}},
            "e": {"value": "e"}});
        let plan = Plan::prepare(&t, &params, &scope).unwrap();
        let used = plan.body(0, &NoReferences).unwrap();
        assert_eq!(
            used["properties"]["upper"], "HUNTER2SECRET",
            "the run uses the values"
        );
        let shown = plan.body_shown(0, &NoReferences).unwrap();
        let before = json!({"id": "/x/s", "name": "s", "type": "Microsoft.KeyVault/vaults/secrets",
            "location": "eastus", "properties": {"contentType": "text/plain", "list": ["a", "b", "c"]}});
        for before in [None, Some(&before)] {
            let c = change("/x/s", "t", "s", "v", before, &shown);
            let text = c.to_string();
            for leak in ["hunter2", "HUNTER2", "aHVudGVy", "98765"] {
                assert!(!text.contains(leak), "{leak}: {c}");
            }
            let props = &c["after"]["properties"];
            assert_eq!(props["contentType"], "text/plain", "{c}");
            assert_eq!(
                c["after"]["location"], "eastus",
                "a short secret hides nothing else"
            );
            assert_eq!(props["list"], json!(["a", SECURE_MASK, "c"]), "{c}");
        }
        // a masked member is as it is now: a tag the template sets from a secret is no change
        let tagged =
            json!({"id": "/i", "name": "i", "type": "t", "tags": {"seen": "now", "a": "1"}});
        let body = json!({"tags": {"seen": SECURE_MASK, "a": "1"}});
        let c = change("/i", "t", "i", "v", Some(&tagged), &body);
        assert_eq!(c["changeType"], "NoChange", "{c}");
        let c = change("/i", "t", "i", "v", None, &body);
        assert_eq!(c["after"]["tags"], json!({"a": "1"}), "{c}");
        // an expression that reads a secure value and fails: its message is withheld
        let mut bad = t.clone();
        bad["resources"][0]["properties"]["oops"] =
            json!("[reference(concat('/', parameters('pw')))]");
        let plan = Plan::prepare(&bad, &params, &scope).unwrap();
        let e = plan.body_shown(0, &NoReferences).unwrap_err();
        assert!(!e.message.contains("hunter2"), "{}", e.message);
        assert!(e.message.contains("withheld"), "{}", e.message);
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
