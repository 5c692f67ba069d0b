//! A deployment's what-if (`POST {deployment}/whatIf`, `az deployment group what-if`): the
//! changes the deployment would make, nothing written.
//!
//! Each resource the template names is read as the caller through its own route, in the
//! request's unit of work ([`Reads::get`], at the template's api-version); its body is evaluated
//! as the run would evaluate it, in dependency order, with `reference()` answered by the
//! predicted state of the resources before it (those that exist) — and the change is the pure
//! [`keyless_core::template::what_if::change`]. A resource whose body needs a value only known
//! once something is deployed (`reference()` of a resource the deployment creates), a type that
//! has no GET (a vault's `accessPolicies`) and one the caller may not read are `Unsupported`,
//! with the reason. A nested deployment (a Bicep module) is looked into: its template's changes
//! at its own scope (up to 8 deep), as the run would deploy it. In a resource
//! group, the group's other resources are `Ignore` (incremental mode) or `Delete` (complete).

use crate::arm::provider::{Read, Reads};
use crate::error::Result;
use crate::request::Caller;
use crate::state::AppState;
use keyless_core::resource_id::ArmPath;
use keyless_core::template::what_if;
use keyless_core::template::{Level, Plan, References, Scope};
use keyless_store::Tx;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

const NESTED: &str = "Microsoft.Resources/deployments";

/// The predicted states so far, by lower-case id, for `reference()`.
struct Predicted<'a>(&'a HashMap<String, Value>);

impl References for Predicted<'_> {
    fn get(&self, id: &str) -> Option<Value> {
        self.0.get(&id.to_ascii_lowercase()).cloned()
    }
}

/// Where the deployment deploys.
pub struct At<'a> {
    pub subscription: &'a str,
    /// Its resource group (None: subscription scope).
    pub resource_group: Option<&'a str>,
    /// Complete mode: the group's resources the template does not name are deleted.
    pub complete: bool,
}

/// How deep what-if looks into nested deployments.
const MAX_NESTING: usize = 8;

/// The `changes` of `plan`'s deployment `at`, as `caller` would make them.
pub async fn changes(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    reads: &Reads,
    plan: &Plan,
    at: &At<'_>,
) -> Result<Vec<Value>> {
    let mut predicted = HashMap::new();
    let rd = Reader { s, caller, reads };
    let all = changes_at(&rd, tx, plan, at, 0, &mut predicted).await?;
    // a resource named (here or in a nested deployment) is not also "left as it is", and a
    // group reached twice lists its other resources once
    let named: HashSet<String> = all
        .iter()
        .filter(|c| c["changeType"] != "Ignore")
        .filter_map(|c| c["resourceId"].as_str())
        .map(str::to_ascii_lowercase)
        .collect();
    let mut seen = HashSet::new();
    Ok(all
        .into_iter()
        .filter(|c| {
            let id = c["resourceId"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase();
            c["changeType"] != "Ignore" || (!named.contains(&id) && seen.insert(id))
        })
        .collect())
}

/// Whose reads: the server, the caller, the router's reads.
struct Reader<'a> {
    s: &'a AppState,
    caller: &'a Caller,
    reads: &'a Reads,
}

impl Reader<'_> {
    /// Resource `id` at `version` as its GET answers the caller.
    async fn get(&self, tx: &mut Tx, id: &str, version: &str) -> Result<Read> {
        (self.reads.get)(self.s, tx, self.caller, id, version).await
    }
}

/// [`changes`] of one template, `depth` deployments deep; `predicted` holds the states the
/// deployment's resources will have, for `reference()` (and the groups it creates).
async fn changes_at(
    rd: &Reader<'_>,
    tx: &mut Tx,
    plan: &Plan,
    at: &At<'_>,
    depth: usize,
    predicted: &mut HashMap<String, Value>,
) -> Result<Vec<Value>> {
    let n = plan.resources.len();
    let mut now: Vec<Read> = Vec::with_capacity(n);
    for r in &plan.resources {
        now.push(if r.full_type.eq_ignore_ascii_case(NESTED) {
            Read::Missing
        } else {
            rd.get(tx, &r.id, &r.api_version).await?
        });
    }
    for (r, read) in plan.resources.iter().zip(&now) {
        if let Read::Found(v) = read {
            predicted.insert(r.id.to_ascii_lowercase(), v.clone());
        }
    }
    let mut out: Vec<Vec<Value>> = vec![Vec::new(); n];
    for &i in plan.dependency_order() {
        let r = &plan.resources[i];
        let before = match &now[i] {
            _ if r.full_type.eq_ignore_ascii_case(NESTED) => {
                out[i] = nested(rd, tx, plan, i, depth, predicted).await?;
                continue;
            }
            Read::Refused(405, _) => {
                out[i].push(what_if::unsupported(
                    &r.id,
                    "This resource type has no GET (it is applied to its parent, as a vault's accessPolicies), so its change cannot be told.",
                ));
                continue;
            }
            Read::Refused(status, code) => {
                out[i].push(what_if::unsupported(
                    &r.id,
                    &format!("Reading the resource as the caller was refused ({status} {code}), so its change cannot be told."),
                ));
                continue;
            }
            Read::Found(v) => Some(v),
            Read::Missing => None,
        };
        let change = match plan.body_shown(i, &Predicted(predicted)) {
            Ok(body) => {
                what_if::change(&r.id, &r.full_type, &r.name, &r.api_version, before, &body)
            }
            Err(e) => what_if::unsupported(&r.id, &needs_the_run(&e.message)),
        };
        if let Some(after) = change.get("after") {
            predicted.insert(r.id.to_ascii_lowercase(), after.clone());
        }
        out[i].push(change);
    }
    let mut changes: Vec<Value> = out.into_iter().flatten().collect();
    if let Some(group) = at.resource_group {
        // only what the caller may read: a deployer is shown no resource it could not GET
        let grants = crate::authz::grants(tx, &rd.caller.object_id).await?;
        let named: HashSet<String> = plan
            .resources
            .iter()
            .map(|r| r.id.to_ascii_lowercase())
            .collect();
        for item in (rd.reads.in_group)(rd.s, tx, at.subscription, group).await? {
            let Some(id) = item["id"].as_str() else {
                continue;
            };
            let read = format!("{}/read", item["type"].as_str().unwrap_or_default());
            if keyless_core::rbac::authorize(&grants, &read, id).is_none() {
                continue;
            }
            if !named.contains(&id.to_ascii_lowercase()) {
                changes.push(what_if::untouched(id, &item, at.complete));
            }
        }
    }
    Ok(changes)
}

fn needs_the_run(message: &str) -> String {
    format!("Its properties need values known only once the deployment runs: {message}")
}

/// The changes of nested deployment `plan.resources[i]`: its template's, at its scope (its
/// resource group as this deployment predicts it or as it is), as the run would deploy it.
async fn nested(
    rd: &Reader<'_>,
    tx: &mut Tx,
    plan: &Plan,
    i: usize,
    depth: usize,
    predicted: &mut HashMap<String, Value>,
) -> Result<Vec<Value>> {
    let r = &plan.resources[i];
    let unsupported = |why: &str| Ok(vec![what_if::unsupported(&r.id, why)]);
    if depth >= MAX_NESTING {
        return unsupported(&format!(
            "Deployments nested more than {MAX_NESTING} deep are not looked into."
        ));
    }
    // the values the run would give it, secure ones masked (an outer-scope nested template
    // inlines this template's values; an inner one may take a secure value as a plain
    // parameter): a template that cannot be evaluated masked is Unsupported
    let body = match plan.body_shown(i, &Predicted(predicted)) {
        Ok(b) => b,
        Err(e) => return unsupported(&needs_the_run(&e.message)),
    };
    let props = &body["properties"];
    if !props["template"].is_object() {
        return unsupported("Its template is given by link, which Keyless does not fetch.");
    }
    let outer = plan.scope();
    let (level, group, group_location) = match ArmPath::parse(&r.id) {
        Ok(ArmPath::Resource(rid)) => {
            let gid = format!(
                "/subscriptions/{}/resourceGroups/{}",
                rid.subscription, rid.resource_group
            );
            let version = keyless_core::api_version::RESOURCES
                .last()
                .copied()
                .unwrap_or_default();
            let group = match predicted.get(&gid.to_ascii_lowercase()) {
                Some(g) => Some(g.clone()),
                None => match rd.get(tx, &gid, version).await? {
                    Read::Found(g) => Some(g),
                    _ => None,
                },
            };
            let Some(group) = group else {
                return unsupported(&format!(
                    "Its resource group '{}' does not exist.",
                    rid.resource_group
                ));
            };
            let name = group["name"]
                .as_str()
                .unwrap_or(&rid.resource_group)
                .to_string();
            let location = group["location"].as_str().unwrap_or_default().to_string();
            (Level::ResourceGroup, Some(name), location)
        }
        Ok(ArmPath::AtSubscription { .. }) => (Level::Subscription, None, String::new()),
        _ => return unsupported("Its scope is not one Keyless deploys to."),
    };
    let scope = Scope {
        level,
        subscription_id: outer.subscription_id.clone(),
        tenant_id: outer.tenant_id.clone(),
        resource_group: group.clone().unwrap_or_default(),
        resource_group_location: group_location,
        deployment_name: r.name.rsplit('/').next().unwrap_or(&r.name).to_string(),
        location: body["location"].as_str().map(str::to_string),
        environment: outer.environment.clone(),
    };
    let parameters = match &props["parameters"] {
        Value::Null => Value::Object(Default::default()),
        p => p.clone(),
    };
    let inner = match Plan::prepare(&props["template"], &parameters, &scope) {
        Ok(p) => p,
        Err(e) => {
            return unsupported(&format!(
                "Its template is not valid: {} ({})",
                e.message, e.code
            ))
        }
    };
    let complete = props["mode"]
        .as_str()
        .is_some_and(|m| m.eq_ignore_ascii_case("complete"));
    let at = At {
        subscription: &outer.subscription_id,
        resource_group: group.as_deref(),
        complete,
    };
    Box::pin(changes_at(rd, tx, &inner, &at, depth + 1, predicted)).await
}
