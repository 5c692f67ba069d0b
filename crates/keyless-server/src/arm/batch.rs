//! `Microsoft.Batch` in the control plane: batch accounts, and their pools. A pool is a group
//! of hosts like a scale set: a host agent that joins with the pool's join token becomes a
//! node (an instance) holding the pool's user-assigned identities, and runs the pool's VM
//! extensions (`deploymentConfiguration.virtualMachineConfiguration.extensions`, e.g.
//! KeyVaultForLinux). `scaleSettings.fixedScale.targetDedicatedNodes` bounds how many nodes may
//! join; lowering it removes the newest nodes (their host credentials stop working at once).
//!
//! Also VM extensions (`Microsoft.Compute/virtualMachines/{vm}/extensions/{name}`), which a
//! VM's host agent runs the same way (served by [`crate::arm::compute`]).

use crate::arm::provider::{
    handler, Access, Action, Call, Child, ChildId, ChildResource, Collection, Methods, Provider,
};
use crate::arm::reply::{self, created_or_ok, deleted};
use crate::arm::resources::{self as res, get_resource_group, location, tags, LinkCheck};
use crate::error::{Result, ServerError};
use crate::request::parse_body;
use crate::state::AppState;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::api_version;
use keyless_core::resource_id::{ResourceId, BATCH_ACCOUNT, UAMI};
use keyless_store::{TrackedRecord, Tx, VmRecord};
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub const ACCOUNT_TYPE: &str = "Microsoft.Batch/batchAccounts";
pub const POOL_TYPE: &str = "Microsoft.Batch/batchAccounts/pools";
pub const VM_EXTENSION_TYPE: &str = "Microsoft.Compute/virtualMachines/extensions";

pub static PROVIDER: Provider = Provider {
    namespace: BATCH_ACCOUNT.0,
    type_name: BATCH_ACCOUNT.1,
    api_versions: api_version::BATCH,
    accepts: None,
    list: handler!(list),
    resource: Methods {
        get: Some(handler!(get)),
        put: Some(handler!(put)),
        patch: Some(handler!(put)),
        delete: Some(handler!(delete)),
        ..Methods::NONE
    },
    children: &[Child {
        type_name: "pools",
        resource: Some(ChildResource {
            access: Access::Child,
            lockdown: true,
            handler: handler!(pool),
        }),
        actions: &[Action {
            name: "generateJoinToken",
            method: Method::POST,
            authorize: Some("Microsoft.Batch/batchAccounts/pools/generateJoinToken/action"),
            lockdown: true,
            handler: handler!(pool_join),
        }],
    }],
    actions: &[Action {
        name: "pools",
        method: Method::GET,
        authorize: Some("Microsoft.Batch/batchAccounts/pools/read"),
        lockdown: false,
        handler: handler!(pools),
    }],
    row: Some("tracked"),
    etag_in_body_since: None,
    // not a scope of role assignments
    role_scope: None,
};

async fn list(_: &AppState, tx: &mut Tx, c: &Call<'_, Collection>) -> Result<Vec<Value>> {
    let accounts = tx
        .list_tracked(
            ACCOUNT_TYPE,
            &c.target.subscription,
            c.target.resource_group.as_deref(),
        )
        .await?;
    Ok(accounts.into_iter().map(|a| a.body).collect())
}

/// PUT (create or replace) or PATCH (merge) of an account.
async fn put(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let b: Value = parse_body(c.body)?;
    let (v, created) = put_account(s, tx, c.target, &b, *c.method == Method::PATCH).await?;
    Ok(created_or_ok(created, v))
}

async fn get(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    Ok(Json(get_account(s, tx, c.target).await?.body).into_response())
}

async fn delete(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    Ok(deleted(delete_account(s, tx, c.target).await?))
}

/// PUT / PATCH / GET / DELETE of one pool.
async fn pool(s: &AppState, tx: &mut Tx, c: &Call<'_, ChildId>) -> Result<Response> {
    let ChildId {
        parent: account,
        name,
    } = c.target;
    match *c.method {
        Method::PUT | Method::PATCH => {
            let b: Value = parse_body(c.body)?;
            let scope = format!("{}/pools/{name}", account.canonical());
            let may_assign = LinkCheck::Caller {
                principal: &c.caller.object_id,
                action: "Microsoft.Batch/batchAccounts/pools/write",
                scope: &scope,
            };
            let patch = *c.method == Method::PATCH;
            let (rec, _created) = put_pool(s, tx, account, name, &b, patch, &may_assign).await?;
            // Batch answers 200 for both create and update
            Ok(Json(pool_json(tx, &rec).await?).into_response())
        }
        Method::GET => {
            let rec = get_pool(s, tx, account, name).await?;
            Ok(Json(pool_json(tx, &rec).await?).into_response())
        }
        Method::DELETE => {
            get_account(s, tx, account).await?;
            let key = format!("{}/pools/{}", account.key(), name.to_ascii_lowercase());
            Ok(deleted(tx.delete_vm(&key).await?))
        }
        _ => Err(ServerError::MethodNotAllowed(c.method.to_string())),
    }
}

/// `GET {account}/pools`.
async fn pools(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let pools = pools_of(tx, c.target).await?;
    get_account(s, tx, c.target).await?;
    let mut items = Vec::with_capacity(pools.len());
    for p in &pools {
        items.push(pool_json(tx, p).await?);
    }
    Ok(reply::list(items))
}

/// `POST {account}/pools/{pool}/generateJoinToken`.
async fn pool_join(s: &AppState, tx: &mut Tx, c: &Call<'_, ChildId>) -> Result<Response> {
    let ttl = reply::join_ttl(c.body)?;
    let (token, expires, pool) =
        pool_join_token(s, tx, &c.target.parent, &c.target.name, ttl).await?;
    Ok(reply::join_token(&token, expires, &pool))
}

fn bad(message: impl Into<String>, target: &str) -> ServerError {
    ServerError::InvalidParameter {
        message: message.into(),
        target: Some(target.into()),
    }
}

fn account_not_found(rid: &ResourceId) -> ServerError {
    ServerError::ResourceNotFound {
        type_name: ACCOUNT_TYPE.into(),
        name: rid.name.clone(),
        group: rid.resource_group.clone(),
    }
}

/// Batch account names: 3–24 lowercase letters and digits.
fn validate_account_name(n: &str) -> Result<()> {
    if (3..=24).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(())
    } else {
        Err(ServerError::InvalidResourceName(format!(
            "Account name '{n}' is invalid. Batch account names must be 3 to 24 characters long and contain only lowercase letters and numbers."
        )))
    }
}

/// Pool ids: 1–64 characters of letters, digits, `-` and `_`.
fn validate_pool_name(n: &str) -> Result<()> {
    if (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(ServerError::InvalidResourceName(format!(
            "The pool name '{n}' is invalid. It may contain letters, digits, hyphens and underscores, up to 64 characters."
        )))
    }
}

pub async fn get_account(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<TrackedRecord> {
    get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    tx.get_tracked(&rid.key())
        .await?
        .ok_or_else(|| account_not_found(rid))
}

/// PUT / PATCH of a batch account.
pub async fn put_account(
    s: &AppState,
    tx: &mut Tx,
    rid: &ResourceId,
    body: &Value,
    patch: bool,
) -> Result<(Value, bool)> {
    let rg = get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    validate_account_name(&rid.name)?;
    let existing = tx.get_tracked(&rid.key()).await?;
    if patch && existing.is_none() {
        return Err(account_not_found(rid));
    }
    let loc = match (&existing, body["location"].as_str()) {
        (Some(e), _) => e.body["location"].as_str().unwrap_or("local").to_string(),
        (None, l) => location(l)?,
    };
    let t: Option<BTreeMap<String, String>> = serde_json::from_value(body["tags"].clone()).ok();
    let canonical = ResourceId::new(
        &s.subscription_id,
        &rg.name,
        keyless_core::resource_id::BATCH_ACCOUNT,
        &rid.name,
    );
    let tags = match t {
        Some(t) => tags(Some(t))?,
        None => existing
            .as_ref()
            .and_then(|e| serde_json::from_value(e.body["tags"].clone()).ok())
            .unwrap_or_default(),
    };
    let name = existing
        .as_ref()
        .and_then(|e| e.body["name"].as_str().map(str::to_string))
        .unwrap_or_else(|| rid.name.clone());
    let out = json!({
        "id": canonical.canonical(),
        "name": name,
        "type": ACCOUNT_TYPE,
        "location": loc,
        "tags": tags,
        "identity": {"type": "None"},
        "properties": {
            "accountEndpoint": format!("{}.{}.batch.keyless", name.to_ascii_lowercase(), loc),
            "provisioningState": "Succeeded",
            "poolAllocationMode": "BatchService",
            "publicNetworkAccess": "Enabled",
            "dedicatedCoreQuotaPerVMFamilyEnforced": false,
            "poolQuota": 100,
            "activeJobAndJobScheduleQuota": 300,
        },
    });
    let created = tx
        .put_tracked(&TrackedRecord {
            key: canonical.key(),
            type_name: ACCOUNT_TYPE.into(),
            subscription: s.subscription_id.clone(),
            resource_group: rg.name.clone(),
            body: out.clone(),
        })
        .await?;
    Ok((out, created))
}

/// Delete an account with its pools (and so its nodes' credentials).
pub async fn delete_account(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<bool> {
    get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    for p in pools_of(tx, rid).await? {
        tx.delete_vm(&p.key).await?;
    }
    Ok(tx.delete_tracked(&rid.key()).await?)
}

fn pool_key(account: &ResourceId, pool: &str) -> String {
    format!("{}/pools/{}", account.key(), pool.to_ascii_lowercase())
}

fn pool_not_found(account: &ResourceId, pool: &str) -> ServerError {
    ServerError::ResourceNotFound {
        type_name: POOL_TYPE.into(),
        name: format!("{}/{pool}", account.name),
        group: account.resource_group.clone(),
    }
}

pub async fn pools_of(tx: &mut Tx, account: &ResourceId) -> Result<Vec<VmRecord>> {
    let prefix = format!("{}/pools/", account.key());
    Ok(tx
        .list_vms(&account.subscription, Some(&account.resource_group))
        .await?
        .into_iter()
        .filter(|v| v.key.starts_with(&prefix))
        .collect())
}

pub async fn get_pool(
    s: &AppState,
    tx: &mut Tx,
    account: &ResourceId,
    pool: &str,
) -> Result<VmRecord> {
    get_account(s, tx, account).await?;
    tx.get_vm(&pool_key(account, pool))
        .await?
        .ok_or_else(|| pool_not_found(account, pool))
}

/// The target node count of a pool, when its scale is fixed.
pub fn target_nodes(pool: &VmRecord) -> Option<u64> {
    pool.properties
        .pointer("/scaleSettings/fixedScale/targetDedicatedNodes")
        .and_then(Value::as_u64)
}

/// PUT / PATCH of a pool.
pub async fn put_pool(
    s: &AppState,
    tx: &mut Tx,
    account: &ResourceId,
    pool: &str,
    body: &Value,
    patch: bool,
    may_assign: &LinkCheck<'_>,
) -> Result<(VmRecord, bool)> {
    let acct = get_account(s, tx, account).await?;
    validate_pool_name(pool)?;
    let key = pool_key(account, pool);
    tx.lock_row("vms", "key", &key).await?; // read-modify-write, see resources::write_vm
    let existing = tx.get_vm(&key).await?;
    if patch && existing.is_none() {
        return Err(pool_not_found(account, pool));
    }
    if !body.is_object() {
        return Err(ServerError::InvalidRequestContent(
            "The request content must be a JSON object.".into(),
        ));
    }
    // identities: PUT replaces, PATCH keeps them unless `identity` is sent
    let current: Vec<String> = match &existing {
        Some(e) => tx
            .vm_user_identities(&e.key)
            .await?
            .into_iter()
            .map(|i| i.key)
            .collect(),
        None => vec![],
    };
    let (kind, user_keys) = match body.get("identity") {
        None if patch => (
            existing
                .as_ref()
                .map(|e| e.identity_type.clone())
                .unwrap_or_else(|| "None".into()),
            current.clone(),
        ),
        None => ("None".to_string(), vec![]),
        Some(idn) => {
            let kind = idn["type"].as_str().unwrap_or("None");
            let kind = if kind.eq_ignore_ascii_case("UserAssigned") {
                "UserAssigned"
            } else if kind.eq_ignore_ascii_case("None") {
                "None"
            } else {
                return Err(bad(format!("The identity type '{kind}' is not supported by Batch pools; use UserAssigned or None."), "identity.type"));
            };
            let ids: Vec<String> = idn["userAssignedIdentities"]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            if kind == "UserAssigned" && ids.is_empty() {
                return Err(bad(
                    "A UserAssigned identity needs userAssignedIdentities.",
                    "identity.userAssignedIdentities",
                ));
            }
            if kind == "None" && !ids.is_empty() {
                return Err(bad(
                    "userAssignedIdentities must be empty when the identity type is None.",
                    "identity.userAssignedIdentities",
                ));
            }
            let mut keys = vec![];
            for id in ids {
                let rid = ResourceId::parse(&id)
                    .ok()
                    .filter(|r| r.is_type(UAMI))
                    .ok_or_else(|| {
                        bad(
                            format!("'{id}' is not a user-assigned identity resource id."),
                            "identity.userAssignedIdentities",
                        )
                    })?;
                let rec = res::get_identity(s, tx, &rid).await?;
                if !current.contains(&rec.key) {
                    may_assign.check(tx, &rec.resource_id).await?;
                }
                keys.push(rec.key);
            }
            (kind.to_string(), keys)
        }
    };
    let mut props = match (&existing, patch) {
        (Some(e), true) => e.properties.clone(),
        _ => json!({}),
    };
    if let Some(p) = body.get("properties").and_then(Value::as_object) {
        for (k, v) in p {
            props[k] = v.clone();
        }
    }
    for read_only in [
        "provisioningState",
        "allocationState",
        "currentDedicatedNodes",
        "currentLowPriorityNodes",
        "creationTime",
        "lastModified",
    ] {
        if let Some(o) = props.as_object_mut() {
            o.remove(read_only);
        }
    }
    if let Some(t) = props.pointer("/scaleSettings/fixedScale/targetDedicatedNodes") {
        if !t.is_u64() || t.as_u64().unwrap_or(0) > 1000 {
            return Err(bad(
                "targetDedicatedNodes must be an integer between 0 and 1000.",
                "properties.scaleSettings.fixedScale.targetDedicatedNodes",
            ));
        }
    }
    if let Some(exts) =
        props.pointer_mut("/deploymentConfiguration/virtualMachineConfiguration/extensions")
    {
        check_extensions(exts)?;
        // protected settings are never stored nor shown (readers of the pool would see them)
        for e in exts.as_array_mut().into_iter().flatten() {
            if let Some(o) = e.as_object_mut() {
                o.remove("protectedSettings");
            }
        }
    }
    let now = s.now();
    let rec = VmRecord {
        key: key.clone(),
        resource_id: format!(
            "{}/pools/{}",
            account.canonical(),
            existing
                .as_ref()
                .map(|e| e.name.clone())
                .unwrap_or_else(|| pool.to_string())
        ),
        name: existing
            .as_ref()
            .map(|e| e.name.clone())
            .unwrap_or_else(|| pool.to_string()),
        subscription: s.subscription_id.clone(),
        resource_group: account.resource_group.clone(),
        location: acct.body["location"]
            .as_str()
            .unwrap_or("local")
            .to_string(),
        tags: Default::default(),
        vm_id: existing
            .as_ref()
            .map(|e| e.vm_id.clone())
            .unwrap_or_else(crate::util::new_guid),
        identity_type: kind,
        properties: props,
        created: existing.as_ref().map(|e| e.created).unwrap_or(now),
    };
    let created = tx.put_vm(&rec, None, &user_keys).await?;
    // shrink to the target: the newest nodes go first
    if let Some(target) = target_nodes(&rec) {
        let mut nodes = tx.list_instances(&rec.key).await?;
        nodes.sort_by_key(|n| std::cmp::Reverse(n.instance_id));
        let excess = nodes.len().saturating_sub(target as usize);
        for n in nodes.into_iter().take(excess) {
            tx.delete_instance(&n.key).await?;
        }
    }
    Ok((rec, created))
}

/// Extension names become directory names on hosts: 1–64 of letters, digits, `.`, `_`, `-`,
/// starting with a letter or digit.
fn extension_name_ok(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && n.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Extensions must name a publisher, type and settings object.
fn check_extensions(exts: &Value) -> Result<()> {
    let list = exts
        .as_array()
        .ok_or_else(|| bad("extensions must be an array.", "extensions"))?;
    for (i, e) in list.iter().enumerate() {
        let name = e["name"].as_str().unwrap_or_default();
        if !name.is_empty() && !extension_name_ok(name) {
            return Err(bad(
                format!("extensions[{i}].name '{name}' is invalid: letters, digits, '.', '_', '-', starting with a letter or digit."),
                &format!("extensions[{i}].name"),
            ));
        }
        for f in ["name", "publisher", "type"] {
            if e[f].as_str().is_none_or(|v| v.is_empty()) {
                return Err(bad(
                    format!("extensions[{i}].{f} is required."),
                    &format!("extensions[{i}].{f}"),
                ));
            }
        }
        if !e["settings"].is_null() && !e["settings"].is_object() {
            return Err(bad(
                format!("extensions[{i}].settings must be an object."),
                &format!("extensions[{i}].settings"),
            ));
        }
    }
    Ok(())
}

pub async fn pool_json(tx: &mut Tx, pool: &VmRecord) -> Result<Value> {
    let nodes = tx.list_instances(&pool.key).await?.len();
    let mut props = pool.properties.clone();
    if !props.is_object() {
        props = json!({});
    }
    let ts = |t: u64| crate::util::format_iso(t);
    props["provisioningState"] = json!("Succeeded");
    props["allocationState"] = json!(if target_nodes(pool).is_some_and(|t| t as usize != nodes) {
        "Resizing"
    } else {
        "Steady"
    });
    props["currentDedicatedNodes"] = json!(nodes);
    props["currentLowPriorityNodes"] = json!(0);
    props["creationTime"] = json!(ts(pool.created));
    props["lastModified"] = json!(ts(pool.created));
    let users = tx.vm_user_identities(&pool.key).await?;
    let identity = if users.is_empty() {
        json!({"type": "None"})
    } else {
        let m: serde_json::Map<String, Value> = users
            .iter()
            .map(|i| {
                (
                    i.resource_id.clone(),
                    json!({"principalId": i.principal_id, "clientId": i.client_id}),
                )
            })
            .collect();
        json!({"type": "UserAssigned", "userAssignedIdentities": m})
    };
    Ok(json!({
        "id": pool.resource_id,
        "name": pool.name,
        "type": POOL_TYPE,
        "etag": format!("W/\"0x{:X}\"", pool.created),
        "identity": identity,
        "properties": props,
    }))
}

/// One-time join token for nodes of a pool.
pub async fn pool_join_token(
    s: &AppState,
    tx: &mut Tx,
    account: &ResourceId,
    pool: &str,
    ttl: u64,
) -> Result<(String, u64, String)> {
    let p = get_pool(s, tx, account, pool).await?;
    let token = format!("kljt1.{}", crate::util::random_b64url(32));
    let expires = s.now() + ttl;
    tx.insert_join_token(&keyless_pki::sha256_hex(token.as_bytes()), &p.key, expires)
        .await?;
    Ok((token, expires, p.resource_id))
}

// ------------------------------------------------------------------ VM extensions

fn extension_key(vm: &VmRecord, name: &str) -> String {
    format!("{}/extensions/{}", vm.key, name.to_ascii_lowercase())
}

/// PUT of a VM extension.
pub async fn put_vm_extension(
    s: &AppState,
    tx: &mut Tx,
    vm_rid: &ResourceId,
    name: &str,
    body: &Value,
) -> Result<(Value, bool)> {
    let vm = res::get_vm(s, tx, vm_rid).await?;
    if !extension_name_ok(name) {
        return Err(ServerError::InvalidResourceName(format!(
            "The extension name '{name}' is invalid."
        )));
    }
    let p = body.get("properties").cloned().unwrap_or(json!({}));
    let mut e = p.clone();
    e["name"] = json!(name);
    check_extensions(&json!([e]))?;
    let mut props = p;
    if let Some(o) = props.as_object_mut() {
        o.remove("protectedSettings");
        o.remove("provisioningState");
    }
    props["provisioningState"] = json!("Succeeded");
    let out = json!({
        "id": format!("{}/extensions/{name}", vm.resource_id),
        "name": name,
        "type": VM_EXTENSION_TYPE,
        "location": vm.location,
        "properties": props,
    });
    let created = tx
        .put_tracked(&TrackedRecord {
            key: extension_key(&vm, name),
            type_name: VM_EXTENSION_TYPE.into(),
            subscription: vm.subscription.clone(),
            resource_group: vm.resource_group.clone(),
            body: out.clone(),
        })
        .await?;
    Ok((out, created))
}

pub async fn get_vm_extension(
    s: &AppState,
    tx: &mut Tx,
    vm_rid: &ResourceId,
    name: &str,
) -> Result<Value> {
    let vm = res::get_vm(s, tx, vm_rid).await?;
    tx.get_tracked(&extension_key(&vm, name))
        .await?
        .map(|t| t.body)
        .ok_or_else(|| ServerError::ResourceNotFound {
            type_name: VM_EXTENSION_TYPE.into(),
            name: format!("{}/{name}", vm.name),
            group: vm.resource_group.clone(),
        })
}

pub async fn list_vm_extensions(tx: &mut Tx, vm: &VmRecord) -> Result<Vec<Value>> {
    Ok(tx
        .list_tracked_under(&vm.key, VM_EXTENSION_TYPE)
        .await?
        .into_iter()
        .map(|t| t.body)
        .collect())
}

pub async fn delete_vm_extension(
    s: &AppState,
    tx: &mut Tx,
    vm_rid: &ResourceId,
    name: &str,
) -> Result<bool> {
    let vm = res::get_vm(s, tx, vm_rid).await?;
    Ok(tx.delete_tracked(&extension_key(&vm, name)).await?)
}

/// The extensions a host runs, in the pool / extension-resource shape
/// (`{name, publisher, type, typeHandlerVersion, settings}`).
pub async fn host_extensions(tx: &mut Tx, owner: &VmRecord) -> Result<Vec<Value>> {
    // extension lists inside properties count only where they belong: a pool's deployment
    // configuration, a scale set's profile (not arbitrary properties of a plain VM)
    let is_pool = owner
        .key
        .contains("/providers/microsoft.batch/batchaccounts/");
    let is_scale_set = owner
        .key
        .contains("/providers/microsoft.compute/virtualmachinescalesets/");
    let from_props = is_pool
        .then(|| {
            owner
                .properties
                .pointer("/deploymentConfiguration/virtualMachineConfiguration/extensions")
        })
        .flatten()
        .or_else(|| {
            is_scale_set
                .then(|| {
                    owner
                        .properties
                        .pointer("/virtualMachineProfile/extensionProfile/extensions")
                })
                .flatten()
        })
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            // scale sets nest the fields in `properties`
            let p = e.get("properties").cloned().unwrap_or_else(|| e.clone());
            json!({"name": e["name"], "publisher": p["publisher"], "type": p["type"],
                   "typeHandlerVersion": p["typeHandlerVersion"], "settings": p["settings"]})
        });
    let resources = list_vm_extensions(tx, owner).await?.into_iter().map(|b| {
        let p = &b["properties"];
        json!({"name": b["name"], "publisher": p["publisher"], "type": p["type"],
               "typeHandlerVersion": p["typeHandlerVersion"], "settings": p["settings"]})
    });
    Ok(from_props.chain(resources).collect())
}
