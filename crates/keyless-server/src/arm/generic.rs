//! ARM's generic resource list, `GET /subscriptions/{s}[/resourceGroups/{rg}]/resources`: every
//! resource of every type served, in the generic shape (`id`, `name`, `type`, `location`,
//! `tags`, …), narrowed by `$filter` and to what the caller may read. The types are the
//! [`PROVIDERS`]' own lists, so a new type is listed without change here; child resources
//! (federated credentials, pools, extensions) and deployments are not, as in ARM.

use crate::arm::registry::{Call, Collection, PROVIDERS};
use crate::arm::reply;
use crate::arm::resources as res;
use crate::arm::ArmRequest;
use crate::authz;
use crate::error::{Result, ServerError};
use crate::request::Caller;
use crate::state::AppState;
use axum::http::Method;
use axum::response::Response;
use keyless_core::api_version;
use keyless_core::resource_id::{ResourceId, DEPLOYMENT};
use keyless_store::Tx;
use serde_json::{Map, Value};

/// The api-version of Key Vault's `Vaults_List`, which the Key Vault SDKs (and `az keyvault
/// list` / `show` without a group) send to this path, besides the Resources versions.
const KEY_VAULT_LIST_VERSION: &str = "2015-11-01";

/// The fields of a resource the generic list shows.
const GENERIC_FIELDS: &[&str] = &[
    "id",
    "name",
    "type",
    "kind",
    "location",
    "managedBy",
    "sku",
    "plan",
    "identity",
    "tags",
];

/// Every resource of a subscription (or of one of its groups) in the generic list's shape,
/// whoever may read it: every type served except deployments, each through its provider's own
/// list.
pub(crate) async fn resources_in(
    s: &AppState,
    tx: &mut Tx,
    subscription: &str,
    resource_group: Option<&str>,
) -> Result<Vec<Value>> {
    // the providers' lists answer every resource and consult no caller (the route keeps what
    // its caller may read)
    let nobody = Caller {
        object_id: String::new(),
        client_id: String::new(),
    };
    let target = Collection {
        subscription: subscription.to_string(),
        resource_group: resource_group.map(str::to_string),
    };
    let mut out = vec![];
    for p in PROVIDERS.iter().copied() {
        if p.resource_type() == DEPLOYMENT {
            continue;
        }
        let call = Call {
            provider: p,
            target: &target,
            caller: &nobody,
            method: &Method::GET,
            version: p.api_versions.last().copied().unwrap_or_default(),
            query: &[],
            body: &[],
            write_claimed: false,
            providers: PROVIDERS,
            reads: None,
        };
        out.extend((p.list)(s, tx, &call).await?.iter().map(generic));
    }
    Ok(out)
}

/// A resource as the generic list shows it.
fn generic(v: &Value) -> Value {
    let mut out = Map::new();
    for f in GENERIC_FIELDS {
        if let Some(x) = v.get(*f).filter(|x| !x.is_null()) {
            out.insert((*f).to_string(), x.clone());
        }
    }
    Value::Object(out)
}

/// `GET /subscriptions/{s}[/resourceGroups/{rg}]/resources`, in the request's unit of work.
pub(crate) async fn list(
    s: &AppState,
    tx: &mut Tx,
    req: &ArmRequest<'_>,
    subscription: &str,
    resource_group: Option<&str>,
) -> Result<Response> {
    let (caller, m, version, query) = (req.caller, req.method, req.version, req.query);
    if version != KEY_VAULT_LIST_VERSION {
        crate::arm::check_version(api_version::RESOURCES, version)?;
    }
    res::check_subscription(s, subscription)?;
    if let Some(rg) = resource_group {
        let scope = format!("/subscriptions/{subscription}/resourceGroups/{rg}");
        authz::check(
            tx,
            &caller.object_id,
            "Microsoft.Resources/subscriptions/resourceGroups/resources/read",
            &scope,
        )
        .await?;
    }
    if *m != Method::GET {
        return Err(ServerError::MethodNotAllowed(m.to_string()));
    }
    let raw = query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("$filter"))
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let filter = Filter::parse(raw)
        .ok_or_else(|| ServerError::InvalidFilterInQueryString(raw.to_string()))?;
    if let Some(rg) = resource_group {
        res::get_resource_group(s, tx, subscription, rg).await?;
    }
    let grants = authz::grants(tx, &caller.object_id).await?;
    let items = resources_in(s, tx, subscription, resource_group).await?;
    Ok(reply::list(
        items
            .into_iter()
            .filter(|v| {
                let read = format!("{}/read", v["type"].as_str().unwrap_or_default());
                crate::arm::readable(&grants, &read, v) && filter.matches(v)
            })
            .map(|mut v| {
                // ARM leaves the tags out when it filters by a tag's value
                if matches!(filter.tag, Some((_, Some(_)))) {
                    if let Value::Object(m) = &mut v {
                        m.remove("tags");
                    }
                }
                v
            })
            .collect(),
    ))
}

/// The `$filter` of the generic list: either conditions on the resource joined by `and`
/// (`resourceType`, `name`, `location`, `resourceGroup` `eq '…'`, `substringof('…', name)`),
/// or a tag (`tagName eq '…'` [`and tagValue eq '…'`]) alone, as ARM takes them. Pure.
#[derive(Debug, Default, PartialEq)]
struct Filter {
    resource_type: Option<String>,
    name: Option<String>,
    name_contains: Vec<String>,
    location: Option<String>,
    resource_group: Option<String>,
    /// Tag name and, optionally, value.
    tag: Option<(String, Option<String>)>,
}

impl Filter {
    /// `None` for a filter ARM refuses (or Keyless does not take).
    fn parse(f: &str) -> Option<Filter> {
        let mut out = Filter::default();
        if f.trim().is_empty() {
            return Some(out);
        }
        let mut tag_value = None;
        for clause in split_and(f)? {
            let clause = clause.trim();
            if let Some(rest) = strip_prefix_ci(clause, "substringof(") {
                let (value, rest) = quoted(rest.trim_start())?;
                let rest = rest.trim_start().strip_prefix(',')?.trim();
                let field = rest.strip_suffix(')')?.trim();
                if !field.eq_ignore_ascii_case("name") {
                    return None;
                }
                out.name_contains.push(value);
                continue;
            }
            let (field, rest) = clause.split_once(char::is_whitespace)?;
            let rest = strip_prefix_ci(rest.trim_start(), "eq")?;
            if !rest.starts_with(char::is_whitespace) {
                return None;
            }
            let (value, tail) = quoted(rest.trim_start())?;
            if !tail.trim().is_empty() {
                return None;
            }
            let slot = match field.to_ascii_lowercase().as_str() {
                "resourcetype" => &mut out.resource_type,
                "name" => &mut out.name,
                "location" => &mut out.location,
                "resourcegroup" => &mut out.resource_group,
                "tagname" => {
                    if out.tag.is_some() {
                        return None;
                    }
                    out.tag = Some((value, None));
                    continue;
                }
                "tagvalue" => &mut tag_value,
                _ => return None,
            };
            if slot.replace(value).is_some() {
                return None;
            }
        }
        match (&mut out.tag, tag_value) {
            (Some((_, v)), Some(value)) => *v = Some(value),
            (None, Some(_)) => return None,
            _ => {}
        }
        let others = out.resource_type.is_some()
            || out.name.is_some()
            || !out.name_contains.is_empty()
            || out.location.is_some()
            || out.resource_group.is_some();
        // a tag cannot be combined with anything else
        if out.tag.is_some() && others {
            return None;
        }
        Some(out)
    }

    /// Whether the generic item `v` passes.
    fn matches(&self, v: &Value) -> bool {
        let field = |k: &str| v[k].as_str().unwrap_or_default();
        let eq = |want: &Option<String>, got: &str| {
            want.as_deref().is_none_or(|w| w.eq_ignore_ascii_case(got))
        };
        let group = ResourceId::parse(field("id"))
            .map(|r| r.resource_group)
            .unwrap_or_default();
        let name = field("name").to_ascii_lowercase();
        eq(&self.resource_type, field("type"))
            && eq(&self.name, field("name"))
            && eq(&self.location, field("location"))
            && eq(&self.resource_group, &group)
            && self
                .name_contains
                .iter()
                .all(|c| name.contains(&c.to_ascii_lowercase()))
            && self.tag.as_ref().is_none_or(|(n, value)| {
                v["tags"].as_object().is_some_and(|tags| {
                    tags.iter().any(|(k, t)| {
                        k.eq_ignore_ascii_case(n)
                            && value.as_deref().is_none_or(|w| t.as_str() == Some(w))
                    })
                })
            })
    }
}

/// `s` without its prefix `p` (ASCII case-insensitive).
fn strip_prefix_ci<'a>(s: &'a str, p: &str) -> Option<&'a str> {
    let head = s.get(..p.len())?;
    head.eq_ignore_ascii_case(p).then(|| &s[p.len()..])
}

/// A leading OData string literal (`'…'`, `''` for a quote) and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut rest = s.strip_prefix('\'')?;
    let mut out = String::new();
    loop {
        let i = rest.find('\'')?;
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        match rest.strip_prefix('\'') {
            Some(r) => {
                out.push('\'');
                rest = r;
            }
            None => return Some((out, rest)),
        }
    }
}

/// The clauses of `f` between ` and ` (case-insensitive) outside string literals; `None` when a
/// literal is not closed or the filter uses `or` / `not` / `ne` (not taken).
fn split_and(f: &str) -> Option<Vec<String>> {
    let mut clauses = vec![];
    let mut cur = String::new();
    let mut in_str = false;
    let mut words = String::new();
    for c in f.chars() {
        if c == '\'' {
            in_str = !in_str;
        }
        cur.push(c);
        if in_str {
            continue;
        }
        words.push(if c == '\'' { ' ' } else { c });
        let lower = cur.to_ascii_lowercase();
        if lower.ends_with(" and ") {
            clauses.push(cur[..cur.len() - 5].to_string());
            cur.clear();
        }
    }
    if in_str {
        return None;
    }
    clauses.push(cur);
    let refused = words.split_whitespace().any(|w| {
        ["or", "not", "ne"]
            .iter()
            .any(|r| w.eq_ignore_ascii_case(r))
    });
    if refused || clauses.iter().any(|c| c.trim().is_empty()) {
        return None;
    }
    Some(clauses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item() -> Value {
        json!({
            "id": "/subscriptions/s/resourceGroups/App-RG/providers/Microsoft.KeyVault/vaults/App-KV",
            "name": "App-KV",
            "type": "Microsoft.KeyVault/vaults",
            "location": "westeurope",
            "tags": {"Env": "prod"},
        })
    }

    #[test]
    fn the_forms_clients_send_parse_and_match() {
        let ok = |f: &str| {
            Filter::parse(f)
                .unwrap_or_else(|| panic!("{f}"))
                .matches(&item())
        };
        assert!(ok(""));
        // azure-mgmt-keyvault's Vaults_List, `az resource list --resource-type`
        assert!(ok("resourceType eq 'Microsoft.KeyVault/vaults'"));
        assert!(!ok("resourceType eq 'Microsoft.Compute/virtualMachines'"));
        // `az resource list -g … -n … --resource-type … -l …`
        assert!(ok("resourceGroup eq 'app-rg' and name eq 'app-kv' and resourceType eq 'microsoft.keyvault/vaults' and location eq 'westeurope'"));
        assert!(!ok("resourceGroup eq 'other' and name eq 'app-kv'"));
        assert!(ok("substringof('kv', name)"));
        assert!(!ok("substringof('nope', name)"));
        // `az resource list --tag Env=prod` / `--tag Env`
        assert!(ok("tagName eq 'env' and tagValue eq 'prod'"));
        assert!(!ok("tagName eq 'env' and tagValue eq 'PROD'"));
        assert!(ok("tagName eq 'Env'"));
        assert!(!ok("tagName eq 'team'"));
        // quotes in a literal
        let f = Filter::parse("name eq 'it''s and more'").unwrap();
        assert_eq!(f.name.as_deref(), Some("it's and more"));
    }

    #[test]
    fn what_arm_refuses_is_refused() {
        for f in [
            "name eq 'a' or name eq 'b'",
            "name ne 'a'",
            "tagValue eq 'x'",
            "tagName eq 'a' and resourceType eq 'Microsoft.KeyVault/vaults'",
            "tagName eq 'a' and tagName eq 'b'",
            "name eq 'a' and name eq 'b'",
            "name eq 'unclosed",
            "name eq a",
            "identity eq 'x'",
            "name eq 'a' and",
            "nameeq 'a'",
            "substringof('a', location)",
        ] {
            assert_eq!(Filter::parse(f), None, "{f}");
        }
    }

    #[test]
    fn the_generic_shape_keeps_only_its_fields() {
        let v = json!({"id": "i", "name": "n", "type": "t", "location": "l", "tags": {},
                       "properties": {"secret": 1}, "sku": null});
        assert_eq!(
            generic(&v),
            json!({"id": "i", "name": "n", "type": "t", "location": "l", "tags": {}})
        );
    }
}
