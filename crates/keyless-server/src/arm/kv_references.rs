//! Deployment parameters given as Key Vault references (`{"reference": {"keyVault": {"id"},
//! "secretName", "secretVersion"}}`, ARM's way to pass a secret without putting it in a
//! parameter file): resolved in the deployment request's unit of work, before the template is
//! evaluated, into the secret's value.
//!
//! ARM's rules: the parameter is secure (`securestring` / `secureobject`: checked by
//! [`keyless_core::template::key_vault_references`], so the value is never echoed); the caller
//! holds `Microsoft.KeyVault/vaults/deploy/action` on the vault (Owner and Contributor do; no
//! access policy or data-plane role is needed) — checked first, so a caller without it learns
//! nothing of the vault; the vault allows it (`enabledForTemplateDeployment`); the secret's
//! version is readable as the data plane's GET would read it (enabled, within `nbf`..`exp`).
//! A failure is ARM's `KeyVaultParameterReferenceNotFound` (no such vault) or
//! `KeyVaultParameterReferenceSecretRetrieveFailed` (400), naming the parameter, the vault and
//! the secret — never a value. The value lives only in the request's
//! memory and the deployment's run; nothing stores it again.

use crate::authz;
use crate::error::{Result, ServerError};
use crate::request::Caller;
use crate::state::AppState;
use keyless_core::resource_id::{ResourceId, VAULT};
use keyless_core::template::KeyVaultReference;
use keyless_store::Tx;
use serde_json::{json, Value};

/// The action a deployer needs on a vault whose secrets its parameters reference.
pub const DEPLOY_ACTION: &str = "Microsoft.KeyVault/vaults/deploy/action";

fn failed(r: &KeyVaultReference, why: &str) -> ServerError {
    ServerError::Deployment {
        code: "KeyVaultParameterReferenceSecretRetrieveFailed",
        message: format!(
            "Unable to retrieve secret '{}' from the key vault '{}' for the deployment parameter '{}': {why} Please see https://aka.ms/arm-keyvault-parameter for usage details.",
            r.secret_name, r.vault_id, r.parameter
        ),
        target: Some(format!("parameters.{}", r.parameter)),
        details: Vec::new(),
    }
}

/// Replace every Key Vault reference among `parameters` (checked against `template`) by
/// `{"value": <the secret's value>}`.
pub async fn resolve(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    template: &Value,
    parameters: &mut Value,
) -> Result<()> {
    for r in keyless_core::template::key_vault_references(template, parameters)? {
        let value = secret(s, tx, caller, &r).await?;
        parameters[r.parameter.as_str()] = json!({ "value": value });
    }
    Ok(())
}

/// The value `r` references.
async fn secret(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    r: &KeyVaultReference,
) -> Result<Value> {
    let rid = ResourceId::parse(&r.vault_id)
        .ok()
        .filter(|rid| rid.is_type(VAULT))
        .ok_or_else(|| failed(r, "the id is not a key vault's resource id."))?;
    authz::check(tx, &caller.object_id, DEPLOY_ACTION, &rid.canonical()).await?;
    let vault = if rid.subscription.eq_ignore_ascii_case(&s.subscription_id) {
        tx.get_vault(&rid.key()).await?
    } else {
        None
    }
    .ok_or_else(|| ServerError::Deployment {
        code: "KeyVaultParameterReferenceNotFound",
        message: format!(
            "The specified KeyVault '{}' could not be found (deployment parameter '{}'). Please see https://aka.ms/arm-keyvault-parameter for usage details.",
            r.vault_id, r.parameter
        ),
        target: Some(format!("parameters.{}", r.parameter)),
        details: Vec::new(),
    })?;
    if vault.properties["enabledForTemplateDeployment"] != json!(true) {
        return Err(failed(r, "the key vault does not allow template deployments to read its secrets (set 'enabledForTemplateDeployment': az keyvault update --enabled-for-template-deployment true)."));
    }
    let version = match &r.secret_version {
        Some(v) if !keyless_core::vault::valid_version(v) => None,
        v => {
            tx.kv_live_version(
                &vault.name.to_ascii_lowercase(),
                keyless_core::vault::Coll::Secrets.path(),
                &r.secret_name,
                v.as_deref(),
            )
            .await?
        }
    }
    .ok_or_else(|| failed(r, "the secret (or that version of it) was not found."))?;
    // the data plane's clock (the dev clock moves it in tests)
    let now = s.vault_clock.now();
    if let Some((_, why)) = keyless_core::vault::secret_unreadable(
        version.enabled,
        version.managed,
        version.nbf,
        version.exp,
        now,
    ) {
        return Err(failed(r, why));
    }
    let text = String::from_utf8(version.private.clone().unwrap_or_default())
        .map_err(|_| failed(r, "the secret's value is not text."))?;
    if !r.object {
        return Ok(Value::String(text));
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(failed(
            r,
            "the parameter is a 'secureobject', and the secret's value is not a JSON object.",
        )),
    }
}
