//! `Microsoft.KeyVault/vaults` in the control plane: create / update / get / list / delete,
//! `accessPolicies/{add|replace|remove}`, and `secrets` (create / update / get / list, as ARM
//! template deployments write them; the value is written by the data plane's code in
//! [`crate::kv::arm_secrets`] and never answered), with the provider entry ([`PROVIDER`]). The
//! data plane is in [`crate::kv`].

use crate::arm::provider::{
    handler, Access, Action, Call, Child, ChildId, ChildResource, Collection, Methods, Provider,
};
use crate::arm::reply::{self, created_or_ok, deleted};
use crate::arm::resources::{get_resource_group, location, tags};
use crate::error::{KvKind, Result, ServerError};
use crate::kv::arm_secrets::{self, SecretInput, SecretMeta};
use crate::kv::AttrsIn;
use crate::request::parse_body;
use crate::state::AppState;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::resource_id::{ResourceId, VAULT};
use keyless_core::vault::access::{self, AccessPolicy, PolicyUpdate};
use keyless_core::vault::{valid_object_name, validate_vault_name};
use keyless_store::{Conflict, StoreError, Tx, VaultRecord};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultBody {
    pub location: Option<String>,
    pub tags: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub properties: Option<VaultProps>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultProps {
    pub tenant_id: Option<String>,
    pub sku: Option<Value>,
    pub access_policies: Option<Vec<AccessPolicy>>,
    pub enable_rbac_authorization: Option<bool>,
    pub enable_soft_delete: Option<bool>,
    pub soft_delete_retention_in_days: Option<u32>,
    pub enable_purge_protection: Option<bool>,
    pub enabled_for_deployment: Option<bool>,
    pub enabled_for_disk_encryption: Option<bool>,
    pub enabled_for_template_deployment: Option<bool>,
    pub public_network_access: Option<String>,
}

pub static PROVIDER: Provider = Provider {
    namespace: VAULT.0,
    type_name: VAULT.1,
    api_versions: keyless_core::vault::ARM_API_VERSIONS,
    accepts: None,
    list: handler!(list),
    resource: Methods {
        get: Some(handler!(get)),
        put: Some(handler!(put)),
        patch: Some(handler!(put)),
        delete: Some(handler!(delete)),
        ..Methods::NONE
    },
    children: &[
        Child {
            type_name: "accessPolicies",
            resource: Some(ChildResource {
                access: Access::ParentWrite,
                lockdown: true,
                handler: handler!(access_policies),
            }),
            actions: &[],
        },
        Child {
            type_name: "secrets",
            resource: Some(ChildResource {
                access: Access::Child,
                lockdown: true,
                handler: handler!(secret),
            }),
            actions: &[],
        },
    ],
    actions: &[Action {
        name: "secrets",
        method: Method::GET,
        authorize: Some("Microsoft.KeyVault/vaults/secrets/read"),
        lockdown: false,
        handler: handler!(secrets),
    }],
    row: Some("vaults"),
    etag_in_body_since: None,
    role_scope: Some(handler!(exists)),
};

async fn exists(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<()> {
    get_vault(s, tx, rid).await.map(drop)
}

async fn list(_: &AppState, tx: &mut Tx, c: &Call<'_, Collection>) -> Result<Vec<Value>> {
    let vaults = tx
        .list_vaults(&c.target.subscription, c.target.resource_group.as_deref())
        .await?;
    Ok(vaults.iter().map(vault_json).collect())
}

/// PUT (create or replace) or PATCH (merge).
async fn put(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let b = parse_body(c.body)?;
    let (rec, created) = put_vault(s, tx, c.target, b, *c.method == Method::PATCH).await?;
    Ok(created_or_ok(created, vault_json(&rec)))
}

async fn get(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    Ok(Json(vault_json(&get_vault(s, tx, c.target).await?)).into_response())
}

async fn delete(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let rid = c.target;
    get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    Ok(deleted(tx.delete_vault(&rid.key()).await?))
}

/// `PUT {vault}/accessPolicies/{add|replace|remove}`.
async fn access_policies(s: &AppState, tx: &mut Tx, c: &Call<'_, ChildId>) -> Result<Response> {
    if *c.method != Method::PUT {
        return Err(ServerError::MethodNotAllowed(c.method.to_string()));
    }
    let b: Value = parse_body(c.body)?;
    let ChildId { parent, name } = c.target;
    Ok(Json(update_access_policies(s, tx, parent, name, b).await?).into_response())
}

/// A secret's PUT / PATCH body (`SecretCreateOrUpdateParameters`, `SecretPatchParameters`).
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretBody {
    tags: Option<BTreeMap<String, String>>,
    properties: Option<SecretProps>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretProps {
    value: Option<String>,
    content_type: Option<String>,
    /// `enabled`, `nbf`, `exp` (the read-only `created` / `updated` are ignored).
    attributes: Option<AttrsIn>,
}

/// `PUT | PATCH | GET {vault}/secrets/{name}`: 201 when a PUT creates the secret, 200 when it
/// writes a new version of one; PATCH updates it (a new version only when it carries a value).
async fn secret(s: &AppState, tx: &mut Tx, c: &Call<'_, ChildId>) -> Result<Response> {
    let ChildId { parent, name } = c.target;
    if !valid_object_name(name) {
        return Err(ServerError::InvalidResourceName(format!(
            "The secret name '{name}' is invalid. It must be 1-127 characters of letters, digits and dashes."
        )));
    }
    let vault = get_vault(s, tx, parent).await?;
    let arm = |e| secret_error(e, &vault, name);
    match *c.method {
        Method::PUT | Method::PATCH => {
            let patch = *c.method == Method::PATCH;
            let b: SecretBody = parse_body(c.body)?;
            if !patch && b.properties.is_none() {
                return Err(bad("The property 'properties' is required."));
            }
            let p = b.properties.unwrap_or_default();
            let input = SecretInput {
                value: p.value,
                content_type: p.content_type,
                attributes: p.attributes,
                tags: b.tags,
            };
            let (m, created) = arm_secrets::put(s, tx, &vault, c.caller, name, input, patch)
                .await
                .map_err(arm)?;
            Ok(created_or_ok(created, secret_json(&vault, &m)))
        }
        Method::GET => {
            let m = arm_secrets::get(s, tx, &vault, c.caller, name)
                .await
                .map_err(arm)?;
            Ok(Json(secret_json(&vault, &m)).into_response())
        }
        _ => Err(ServerError::MethodNotAllowed(c.method.to_string())),
    }
}

/// `GET {vault}/secrets`.
async fn secrets(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let vault = get_vault(s, tx, c.target).await?;
    let items = arm_secrets::list(s, tx, &vault, c.caller).await?;
    Ok(reply::list(
        items.iter().map(|m| secret_json(&vault, m)).collect(),
    ))
}

/// A data-plane refusal of a secret write or read, in ARM's kinds.
fn secret_error(e: ServerError, vault: &VaultRecord, name: &str) -> ServerError {
    let ServerError::Vault { kind, message, .. } = e else {
        return e;
    };
    match kind {
        KvKind::BadParameter | KvKind::TooLarge => bad(message),
        KvKind::NotFound(_) => ServerError::ResourceNotFound {
            type_name: "Microsoft.KeyVault/vaults/secrets".into(),
            name: format!("{}/{name}", vault.name),
            group: vault.resource_group.clone(),
        },
        KvKind::Conflict(inner) => ServerError::Conflict {
            code: inner.unwrap_or("Conflict"),
            message,
        },
        // a certificate's secret: changed through the certificate only
        KvKind::Forbidden(_) => ServerError::Conflict {
            code: "OperationNotAllowed",
            message,
        },
        kind => ServerError::kv(kind, message),
    }
}

/// A secret as ARM shows it (`Microsoft.KeyVault/vaults/secrets`): never its value.
fn secret_json(vault: &VaultRecord, m: &SecretMeta) -> Value {
    let mut attributes = json!({"enabled": m.enabled, "created": m.created, "updated": m.updated});
    if let Some(n) = m.nbf {
        attributes["nbf"] = json!(n);
    }
    if let Some(e) = m.exp {
        attributes["exp"] = json!(e);
    }
    let mut properties = json!({
        "attributes": attributes,
        "secretUri": m.uri,
        "secretUriWithVersion": m.uri_with_version,
    });
    if let Some(ct) = &m.content_type {
        properties["contentType"] = json!(ct);
    }
    json!({
        "id": format!("{}/secrets/{}", vault.resource_id, m.name),
        "name": m.name,
        "type": "Microsoft.KeyVault/vaults/secrets",
        "location": vault.location,
        "tags": m.tags,
        "properties": properties,
    })
}

fn bad(message: impl Into<String>) -> ServerError {
    ServerError::InvalidParameter {
        message: message.into(),
        target: None,
    }
}

/// Create or update (PUT) or patch (PATCH) a vault, in the request's write transaction. The
/// vault's row is locked before it is read, so concurrent updates (from any server process)
/// apply one after the other instead of undoing each other; a create that finds the vault
/// created meanwhile by another process answers 409 `OperationNotAllowed` (retry) and writes
/// nothing.
pub async fn put_vault(
    s: &AppState,
    tx: &mut Tx,
    rid: &ResourceId,
    b: VaultBody,
    patch: bool,
) -> Result<(VaultRecord, bool)> {
    let rg = get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    validate_vault_name(&rid.name).map_err(ServerError::InvalidResourceName)?;
    tx.lock_row("vaults", "key", &rid.key()).await?;
    let existing = tx.get_vault(&rid.key()).await?;
    if patch && existing.is_none() {
        return Err(not_found(rid));
    }
    let props = b.properties.unwrap_or_default();
    let cur = existing
        .as_ref()
        .map(|e| e.properties.clone())
        .unwrap_or(json!({}));
    let loc = match (&existing, b.location.as_deref()) {
        (Some(e), None) => e.location.clone(),
        (_, l) if patch => l.unwrap_or_default().to_string(),
        (_, l) => location(l)?,
    };
    if let Some(e) = &existing {
        if !e.location.eq_ignore_ascii_case(&loc) {
            return Err(ServerError::InvalidResourceLocation(format!(
                "The resource '{}' already exists in location '{}' in resource group '{}'. A resource with the same name cannot be created in location '{loc}'. Please select a new resource name.",
                e.name, e.location, e.resource_group
            )));
        }
    }
    // ARM needs tenantId and sku on create (az always sends both); missing ones default below
    let tenant = props
        .tenant_id
        .clone()
        .or_else(|| cur["tenantId"].as_str().map(str::to_string))
        .unwrap_or_else(|| s.tenant_id.clone());
    if !tenant.eq_ignore_ascii_case(&s.tenant_id) {
        return Err(bad(format!(
            "The tenant '{tenant}' is not the tenant of this subscription ('{}').",
            s.tenant_id
        )));
    }
    let sku = props.sku.clone().unwrap_or_else(|| {
        cur.get("sku")
            .cloned()
            .unwrap_or(json!({"family": "A", "name": "standard"}))
    });
    let sku_name = sku["name"].as_str().unwrap_or("");
    if !sku_name.eq_ignore_ascii_case("standard") && !sku_name.eq_ignore_ascii_case("premium") {
        return Err(bad(format!(
            "The sku name '{sku_name}' is invalid; use standard or premium."
        )));
    }
    let policies = match props.access_policies {
        Some(p) => access::validate_policies(p).map_err(bad)?,
        None => serde_json::from_value(cur["accessPolicies"].clone()).unwrap_or_default(),
    };
    let flag = |new: Option<bool>, key: &str, default: bool| {
        new.or_else(|| cur[key].as_bool()).unwrap_or(default)
    };
    let retention = props
        .soft_delete_retention_in_days
        .or_else(|| cur["softDeleteRetentionInDays"].as_u64().map(|d| d as u32))
        .unwrap_or(90);
    if !(7..=90).contains(&retention) {
        return Err(bad(format!(
            "softDeleteRetentionInDays {retention} is out of range; it must be between 7 and 90."
        )));
    }
    let purge_protection = flag(
        props.enable_purge_protection,
        "enablePurgeProtection",
        false,
    );
    if cur["enablePurgeProtection"].as_bool() == Some(true) && !purge_protection {
        return Err(bad(
            "Purge protection cannot be disabled once it has been enabled on a vault.",
        ));
    }
    let soft_delete = flag(props.enable_soft_delete, "enableSoftDelete", true);
    if purge_protection && !soft_delete {
        return Err(bad("Purge protection requires soft delete."));
    }
    // as in Azure: soft delete, once on, stays on; under purge protection the retention is fixed
    if cur["enableSoftDelete"].as_bool() == Some(true) && !soft_delete {
        return Err(bad(
            "Soft delete cannot be turned off once it is enabled on a vault.",
        ));
    }
    if cur["enablePurgeProtection"].as_bool() == Some(true)
        && cur["softDeleteRetentionInDays"].as_u64() != Some(u64::from(retention))
    {
        return Err(bad(
            "The soft-delete retention of a vault with purge protection cannot be changed.",
        ));
    }
    let canonical = ResourceId::new(&s.subscription_id, &rg.name, VAULT, &rid.name);
    let name = existing
        .as_ref()
        .map(|e| e.name.clone())
        .unwrap_or_else(|| rid.name.clone());
    let mut properties = json!({
        "tenantId": tenant,
        "sku": {"family": "A", "name": sku_name.to_ascii_lowercase()},
        "accessPolicies": policies,
        "enabledForDeployment": flag(props.enabled_for_deployment, "enabledForDeployment", false),
        "enabledForDiskEncryption": flag(props.enabled_for_disk_encryption, "enabledForDiskEncryption", false),
        "enabledForTemplateDeployment": flag(props.enabled_for_template_deployment, "enabledForTemplateDeployment", false),
        "enableSoftDelete": soft_delete,
        "softDeleteRetentionInDays": retention,
        "enableRbacAuthorization": flag(props.enable_rbac_authorization, "enableRbacAuthorization", false),
        "vaultUri": s.vault_uri(&name),
        "provisioningState": "Succeeded",
        "publicNetworkAccess": props.public_network_access.clone()
            .or_else(|| cur["publicNetworkAccess"].as_str().map(str::to_string))
            .unwrap_or_else(|| "Enabled".into()),
    });
    if purge_protection {
        properties["enablePurgeProtection"] = json!(true);
    }
    let rec = VaultRecord {
        key: canonical.key(),
        resource_id: canonical.canonical(),
        name: name.clone(),
        subscription: s.subscription_id.clone(),
        resource_group: rg.name.clone(),
        location: loc,
        tags: match b.tags {
            Some(t) => tags(Some(t))?,
            None => existing
                .as_ref()
                .map(|e| e.tags.clone())
                .unwrap_or_default(),
        },
        properties,
        created: existing
            .as_ref()
            .map(|e| e.created)
            .unwrap_or_else(|| s.now()),
    };
    match tx.put_vault(&rec).await {
        // there was no row to lock: another process created the vault after it was read, and
        // this write, computed as a create, must not replace it (the request's transaction
        // rolls back with the error)
        Ok(false) if existing.is_none() => Err(ServerError::Conflict {
            code: "OperationNotAllowed",
            message: "The vault is being changed by another operation; retry.".into(),
        }),
        Ok(created) => Ok((rec, created)),
        // another vault holds the name, or a concurrent create of this one won the race
        Err(StoreError::Conflict(Conflict::NameTaken(_) | Conflict::Unique(_))) => {
            Err(name_taken(&name))
        }
        Err(e) => Err(e.into()),
    }
}

fn name_taken(name: &str) -> ServerError {
    ServerError::Conflict {
        code: "VaultAlreadyExists",
        message: format!(
            "The vault name '{name}' is already in use. Vault names are globally unique so it is possible that the name is already taken."
        ),
    }
}

fn not_found(rid: &ResourceId) -> ServerError {
    ServerError::ResourceNotFound {
        type_name: "Microsoft.KeyVault/vaults".into(),
        name: rid.name.clone(),
        group: rid.resource_group.clone(),
    }
}

pub async fn get_vault(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<VaultRecord> {
    get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    tx.get_vault(&rid.key())
        .await?
        .ok_or_else(|| not_found(rid))
}

/// `accessPolicies/{add|replace|remove}`, in the request's write transaction: the vault's row is
/// locked before it is read, so two updates racing each other (in any server process) apply one
/// after the other and neither undoes the other.
pub async fn update_access_policies(
    s: &AppState,
    tx: &mut Tx,
    rid: &ResourceId,
    kind: &str,
    body: Value,
) -> Result<Value> {
    let kind = match kind.to_ascii_lowercase().as_str() {
        "add" => PolicyUpdate::Add,
        "replace" => PolicyUpdate::Replace,
        "remove" => PolicyUpdate::Remove,
        _ => {
            return Err(bad(format!(
                "The access policy operation '{kind}' is invalid; use add, replace or remove."
            )))
        }
    };
    get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    tx.lock_row("vaults", "key", &rid.key()).await?;
    let mut v = tx
        .get_vault(&rid.key())
        .await?
        .ok_or_else(|| not_found(rid))?;
    let changes: Vec<AccessPolicy> =
        serde_json::from_value(body["properties"]["accessPolicies"].clone()).map_err(|e| {
            ServerError::InvalidRequestContent(format!("properties.accessPolicies: {e}"))
        })?;
    let changes = access::validate_policies(changes).map_err(bad)?;
    let current: Vec<AccessPolicy> =
        serde_json::from_value(v.properties["accessPolicies"].clone()).unwrap_or_default();
    let updated =
        access::validate_policies(access::update_policies(current, kind, changes)).map_err(bad)?;
    v.properties["accessPolicies"] = json!(updated);
    tx.put_vault(&v).await?;
    Ok(json!({
        "id": format!("{}/accessPolicies/{}", v.resource_id, format!("{kind:?}").to_ascii_lowercase()),
        "type": "Microsoft.KeyVault/vaults/accessPolicies",
        "location": v.location,
        "properties": {"accessPolicies": updated},
    }))
}

pub fn vault_json(v: &VaultRecord) -> Value {
    json!({
        "id": v.resource_id,
        "name": v.name,
        "type": "Microsoft.KeyVault/vaults",
        "location": v.location,
        "tags": v.tags,
        "properties": v.properties,
    })
}
