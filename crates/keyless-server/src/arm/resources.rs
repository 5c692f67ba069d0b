//! Control-plane operations on resources, independent of HTTP: the ARM handlers and
//! `keyless up`'s bootstrap both call these, so every rule is applied in one place. Each runs in
//! the caller's unit of work (`tx`); none commits it.

use crate::authz;
use crate::error::{Result, ServerError};
use crate::state::AppState;
use crate::util::new_guid;
use keyless_core::identity_type::{self, HostIdentity, IdentityType};
use keyless_core::names;
use keyless_core::resource_id::{ResourceId, UAMI, VM, VMSS};
use keyless_core::CoreError;
use keyless_store::{Conflict, IdentityRecord, ResourceGroupRecord, StoreError, Tx, VmRecord};
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn name_err(e: CoreError) -> ServerError {
    ServerError::InvalidResourceName(e.to_string())
}

pub(crate) fn location(loc: Option<&str>) -> Result<String> {
    let loc = loc.ok_or_else(|| {
        ServerError::LocationRequired(
            "The location property is required for this definition.".into(),
        )
    })?;
    names::normalize_location(loc).map_err(|e| ServerError::InvalidParameter {
        message: e.to_string(),
        target: Some("location".into()),
    })
}

pub(crate) fn tags(t: Option<BTreeMap<String, String>>) -> Result<BTreeMap<String, String>> {
    let t = t.unwrap_or_default();
    names::validate_tags(&t).map_err(|e| ServerError::InvalidParameter {
        message: e.to_string(),
        target: Some("tags".into()),
    })?;
    Ok(t)
}

pub fn check_subscription(s: &AppState, sub: &str) -> Result<()> {
    if sub.eq_ignore_ascii_case(&s.subscription_id) {
        Ok(())
    } else {
        Err(ServerError::SubscriptionNotFound(sub.to_string()))
    }
}

// ---------------------------------------------------------------- resource groups

pub async fn put_resource_group(
    s: &AppState,
    tx: &mut Tx,
    sub: &str,
    name: &str,
    loc: Option<&str>,
    t: Option<BTreeMap<String, String>>,
) -> Result<(ResourceGroupRecord, bool)> {
    check_subscription(s, sub)?;
    names::validate_resource_group(name)
        .map_err(|_| ServerError::InvalidResourceGroup(name.to_string()))?;
    let loc = location(loc)?;
    if let Some(existing) = tx.get_resource_group(sub, name).await? {
        if existing.location != loc {
            return Err(ServerError::InvalidResourceLocation(format!(
                "Invalid resource group location '{loc}'. The Resource group already exists in location '{}'.",
                existing.location
            )));
        }
    }
    let rec = ResourceGroupRecord {
        subscription: s.subscription_id.clone(),
        name: name.to_string(),
        location: loc,
        tags: tags(t)?,
    };
    let created = tx.put_resource_group(&rec).await?;
    let stored = tx.get_resource_group(sub, name).await?.unwrap_or(rec);
    Ok((stored, created))
}

pub async fn get_resource_group(
    s: &AppState,
    tx: &mut Tx,
    sub: &str,
    name: &str,
) -> Result<ResourceGroupRecord> {
    check_subscription(s, sub)?;
    tx.get_resource_group(sub, name)
        .await?
        .ok_or_else(|| ServerError::ResourceGroupNotFound(name.to_string()))
}

pub fn rg_json(rg: &ResourceGroupRecord) -> Value {
    json!({
        "id": format!("/subscriptions/{}/resourceGroups/{}", rg.subscription, rg.name),
        "name": rg.name,
        "type": "Microsoft.Resources/resourceGroups",
        "location": rg.location,
        "tags": rg.tags,
        "properties": {"provisioningState": "Succeeded"},
    })
}

// ---------------------------------------------------------------- user-assigned identities

pub async fn put_identity(
    s: &AppState,
    tx: &mut Tx,
    rid: &ResourceId,
    loc: Option<&str>,
    t: Option<BTreeMap<String, String>>,
) -> Result<(IdentityRecord, bool)> {
    let rg = get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    names::validate_identity_name(&rid.name).map_err(name_err)?;
    let loc = location(loc)?;
    let tags = tags(t)?;
    let rec = match tx.get_identity(&rid.key()).await? {
        Some(mut existing) => {
            if existing.location != loc {
                return Err(ServerError::InvalidResourceLocation(format!(
                    "The resource '{}' already exists in location '{}' in resource group '{}'. A resource with the same name cannot be created in location '{loc}'. Please select a new resource name.",
                    existing.name, existing.location, existing.resource_group
                )));
            }
            existing.tags = tags;
            existing
        }
        None => {
            let canonical = ResourceId::new(&s.subscription_id, &rg.name, UAMI, &rid.name);
            IdentityRecord {
                key: canonical.key(),
                resource_id: canonical.canonical(),
                name: rid.name.clone(),
                subscription: s.subscription_id.clone(),
                resource_group: rg.name.clone(),
                location: loc,
                tags,
                tenant_id: s.tenant_id.clone(),
                principal_id: new_guid(),
                client_id: new_guid(),
                system_vm: None,
                created: s.now(),
            }
        }
    };
    let created = tx.put_identity(&rec).await?;
    Ok((rec, created))
}

fn not_found(rid: &ResourceId) -> ServerError {
    ServerError::ResourceNotFound {
        type_name: rid.full_type(),
        name: rid.name.clone(),
        group: rid.resource_group.clone(),
    }
}

pub async fn get_identity(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<IdentityRecord> {
    get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    tx.get_identity(&rid.key())
        .await?
        .ok_or_else(|| not_found(rid))
}

pub async fn patch_identity(
    s: &AppState,
    tx: &mut Tx,
    rid: &ResourceId,
    t: Option<BTreeMap<String, String>>,
) -> Result<IdentityRecord> {
    let mut rec = get_identity(s, tx, rid).await?;
    if let Some(t) = t {
        rec.tags = tags(Some(t))?;
        tx.put_identity(&rec).await?;
    }
    Ok(rec)
}

pub fn identity_json(rec: &IdentityRecord) -> Value {
    json!({
        "id": rec.resource_id,
        "name": rec.name,
        "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
        "location": rec.location,
        "tags": rec.tags,
        "properties": {
            "tenantId": rec.tenant_id,
            "principalId": rec.principal_id,
            "clientId": rec.client_id,
        },
    })
}

// ---------------------------------------------------------------- virtual machines

/// The body fields of a VM PUT / PATCH that we act on.
#[derive(Debug, Default, serde::Deserialize)]
pub struct VmBody {
    pub location: Option<String>,
    pub tags: Option<BTreeMap<String, String>>,
    pub identity: Option<IdentityBody>,
    pub properties: Option<Value>,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct IdentityBody {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(rename = "userAssignedIdentities")]
    pub user_assigned: Option<BTreeMap<String, Value>>,
}

fn identity_err(e: CoreError) -> ServerError {
    ServerError::InvalidParameter {
        message: e.to_string(),
        target: Some("identity".into()),
    }
}

/// Azure wraps identity-service refusals in `FailedIdentityOperation`.
fn failed_identity_operation(resource: &str, code: &str, message: &str) -> ServerError {
    ServerError::FailedIdentityOperation(format!(
        "Identity operation for resource '{resource}' failed with error 'Failed to perform resource identity operation. Status: 'BadRequest'. Response: '{{\"error\":{{\"code\":\"{code}\",\"message\":\"{message}\"}}}}'.'."
    ))
}

async fn current_host_identity(tx: &mut Tx, vm: &VmRecord) -> Result<HostIdentity> {
    let user = tx
        .vm_user_identities(&vm.key)
        .await?
        .iter()
        .filter_map(|i| ResourceId::parse(&i.resource_id).ok())
        .collect();
    Ok(HostIdentity {
        kind: IdentityType::parse(&vm.identity_type).unwrap_or(IdentityType::None),
        user,
    })
}

/// Whether the writer of a host (a VM, a scale set, a pool, a cluster) may attach a
/// user-assigned identity (by its canonical id) to it: asked, by [`LinkCheck::check`], for every
/// identity the write adds.
#[derive(Debug, Clone, Copy)]
pub enum LinkCheck<'a> {
    /// Trusted internal callers (bootstrap): every link is allowed.
    Trusted,
    /// An ARM caller writing `scope` with `action`: the caller needs the identity's
    /// `assign/action` ([`authz::check_assign`], 403 `LinkedAuthorizationFailed` otherwise).
    Caller {
        principal: &'a str,
        action: &'a str,
        scope: &'a str,
    },
}

impl LinkCheck<'_> {
    /// Ok when `identity` may be attached, in the request's unit of work.
    pub async fn check(&self, tx: &mut Tx, identity: &str) -> Result<()> {
        match *self {
            LinkCheck::Trusted => Ok(()),
            LinkCheck::Caller {
                principal,
                action,
                scope,
            } => authz::check_assign(tx, principal, action, scope, identity).await,
        }
    }
}

/// Create or replace (PUT) or merge (PATCH) a VM, applying the identity lifecycle of seed 002:
/// a system-assigned identity is created with the VM and deleted when the type drops it.
/// `may_assign` is asked for every user-assigned identity the write adds to the VM.
pub async fn write_vm(
    s: &AppState,
    tx: &mut Tx,
    rid: &ResourceId,
    body: VmBody,
    patch: bool,
    may_assign: &LinkCheck<'_>,
) -> Result<(VmRecord, bool)> {
    let rg = get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    names::validate_vm_name(&rid.name).map_err(name_err)?;
    // read-modify-write of the VM's identity set: the row stays locked until the unit of work
    // ends, so a concurrent write on another replica cannot undo a removal or slip an
    // identity past the assign check
    tx.lock_row("vms", "key", &rid.key()).await?;
    let existing = tx.get_vm(&rid.key()).await?;
    if patch && existing.is_none() {
        return Err(not_found(rid));
    }
    let loc = match (&existing, body.location.as_deref()) {
        (Some(e), None) if patch => e.location.clone(),
        (_, l) => location(l)?,
    };
    if let Some(e) = &existing {
        if e.location != loc {
            return Err(ServerError::InvalidResourceLocation(format!(
                "The resource '{}' already exists in location '{}' in resource group '{}'. A resource with the same name cannot be created in location '{loc}'. Please select a new resource name.",
                e.name, e.location, e.resource_group
            )));
        }
    }
    let tags = match (&existing, body.tags) {
        (Some(e), None) if patch => e.tags.clone(),
        (_, t) => tags(t)?,
    };
    let ident = match (&existing, &body.identity) {
        (Some(e), Some(i)) if patch => identity_type::apply_patch(
            &current_host_identity(tx, e).await?,
            i.kind.as_deref(),
            i.user_assigned.as_ref(),
        ),
        (Some(e), None) if patch => Ok(current_host_identity(tx, e).await?),
        (_, Some(i)) => identity_type::apply_put(
            i.kind.as_deref(),
            &i.user_assigned.clone().unwrap_or_default(),
        ),
        (_, None) => identity_type::apply_put(None, &BTreeMap::new()),
    }
    .map_err(|e| match e {
        CoreError::IdentityLimit(m) => {
            failed_identity_operation(&rid.canonical(), "BadRequest", &m)
        }
        other => identity_err(other),
    })?;

    let current_keys: Vec<String> = match &existing {
        Some(e) => tx
            .vm_user_identities(&e.key)
            .await?
            .into_iter()
            .map(|i| i.key)
            .collect(),
        None => vec![],
    };
    let newly = ident
        .user
        .iter()
        .filter(|u| !current_keys.contains(&u.key()))
        .count();
    identity_type::check_assign_batch(newly)
        .map_err(|e| failed_identity_operation(&rid.canonical(), "BadRequest", &e.to_string()))?;
    // Every user-assigned identity must exist in this subscription.
    let mut user_keys = Vec::with_capacity(ident.user.len());
    for u in &ident.user {
        let found = if u.subscription.eq_ignore_ascii_case(&s.subscription_id) {
            tx.get_identity(&u.key())
                .await?
                .filter(|i| i.system_vm.is_none())
        } else {
            None
        };
        match found {
            Some(i) => {
                if !current_keys.contains(&i.key) {
                    may_assign.check(tx, &i.resource_id).await?;
                }
                user_keys.push(i.key)
            }
            None => {
                return Err(failed_identity_operation(
                    &rid.canonical(),
                    "BadRequest",
                    &format!(
                        "Resource '{}' was not found.",
                        u.mirid().to_ascii_lowercase()
                    ),
                ))
            }
        }
    }

    let kind = if rid.is_type(VMSS) { VMSS } else { VM };
    let canonical = ResourceId::new(&s.subscription_id, &rg.name, kind, &rid.name);
    let mut properties = match (&existing, body.properties) {
        (Some(e), None) => e.properties.clone(),
        (Some(e), Some(p)) if patch => merge(e.properties.clone(), p),
        (_, Some(p)) if p.is_object() => p,
        (_, Some(_)) => {
            return Err(ServerError::InvalidRequestContent(
                "properties must be an object".into(),
            ));
        }
        (None, None) => json!({}),
    };
    if let Some(o) = properties.as_object_mut() {
        // read-only fields are ours
        o.remove("vmId");
        o.remove("provisioningState");
    }
    let vm = VmRecord {
        key: canonical.key(),
        resource_id: canonical.canonical(),
        name: existing
            .as_ref()
            .map(|e| e.name.clone())
            .unwrap_or_else(|| rid.name.clone()),
        subscription: s.subscription_id.clone(),
        resource_group: rg.name.clone(),
        location: loc,
        tags,
        vm_id: existing
            .as_ref()
            .map(|e| e.vm_id.clone())
            .unwrap_or_else(new_guid),
        identity_type: ident.kind.as_str().to_string(),
        properties,
        created: existing
            .as_ref()
            .map(|e| e.created)
            .unwrap_or_else(|| s.now()),
    };
    let system = if ident.kind.has_system() {
        Some(match tx.vm_system_identity(&vm.key).await? {
            Some(sys) => sys,
            None => IdentityRecord {
                key: format!("{}#system", vm.key),
                resource_id: vm.resource_id.clone(),
                name: vm.name.clone(),
                subscription: vm.subscription.clone(),
                resource_group: vm.resource_group.clone(),
                location: vm.location.clone(),
                tags: BTreeMap::new(),
                tenant_id: s.tenant_id.clone(),
                principal_id: new_guid(),
                client_id: new_guid(),
                system_vm: Some(vm.key.clone()),
                created: s.now(),
            },
        })
    } else {
        None
    };
    let created = tx
        .put_vm(&vm, system.as_ref(), &user_keys)
        .await
        .map_err(|e| match e {
            StoreError::Conflict(Conflict::MissingReference(m)) => {
                ServerError::FailedIdentityOperation(m)
            }
            other => other.into(),
        })?;
    Ok((vm, created))
}

fn merge(mut base: Value, patch: Value) -> Value {
    match (base.as_object_mut(), patch) {
        (Some(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    let cur = b.remove(&k).unwrap_or(Value::Null);
                    b.insert(k, if cur.is_object() { merge(cur, v) } else { v });
                }
            }
            base
        }
        (_, p) => p,
    }
}

pub async fn get_vm(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<VmRecord> {
    get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    tx.get_vm(&rid.key()).await?.ok_or_else(|| not_found(rid))
}

/// A scale set instance as `virtualMachineScaleSets/{ss}/virtualMachines/{id}` shows it.
pub fn instance_json(ss: &VmRecord, i: &keyless_store::InstanceRecord) -> Value {
    json!({
        "id": i.resource_id,
        "name": format!("{}_{}", ss.name, i.instance_id),
        "instanceId": i.instance_id.to_string(),
        "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
        "location": ss.location,
        "properties": {"vmId": i.vm_id, "provisioningState": "Succeeded", "latestModelApplied": true},
    })
}

pub async fn vm_json(tx: &mut Tx, vm: &VmRecord) -> Result<Value> {
    let mut props = if vm.properties.is_object() {
        vm.properties.clone()
    } else {
        json!({})
    };
    if vm
        .resource_id
        .to_ascii_lowercase()
        .contains("/virtualmachinescalesets/")
    {
        props["uniqueId"] = json!(vm.vm_id);
    } else {
        props["vmId"] = json!(vm.vm_id);
    }
    props["provisioningState"] = json!("Succeeded");
    let mut out = json!({
        "id": vm.resource_id,
        "name": vm.name,
        "type": ResourceId::parse(&vm.resource_id).map(|r| r.full_type()).unwrap_or_default(),
        "location": vm.location,
        "tags": vm.tags,
        "properties": props,
    });
    let kind = IdentityType::parse(&vm.identity_type).unwrap_or(IdentityType::None);
    if kind != IdentityType::None {
        let mut ident = json!({"type": kind.as_str()});
        if let Some(sys) = tx.vm_system_identity(&vm.key).await? {
            ident["principalId"] = json!(sys.principal_id);
            ident["tenantId"] = json!(sys.tenant_id);
        }
        if kind.has_user() {
            let map: serde_json::Map<String, Value> = tx
                .vm_user_identities(&vm.key)
                .await?
                .into_iter()
                .map(|u| {
                    (
                        u.resource_id,
                        json!({"principalId": u.principal_id, "clientId": u.client_id}),
                    )
                })
                .collect();
            ident["userAssignedIdentities"] = Value::Object(map);
        }
        out["identity"] = ident;
    }
    Ok(out)
}

/// Issue a one-time join token for a VM: returned once, stored as a SHA-256 digest.
pub async fn create_join_token(
    s: &AppState,
    tx: &mut Tx,
    rid: &ResourceId,
    ttl: u64,
) -> Result<(String, u64)> {
    let vm = get_vm(s, tx, rid).await?;
    let token = format!("kljt1.{}", crate::util::random_b64url(32));
    let expires = s.now() + ttl;
    tx.insert_join_token(&keyless_pki::sha256_hex(token.as_bytes()), &vm.key, expires)
        .await?;
    Ok((token, expires))
}
