//! Secrets through the control plane: `Microsoft.KeyVault/vaults/secrets`, what ARM template
//! deployments create ([`crate::arm::vaults`] serves the requests). A version is written by the
//! data plane's own code ([`secrets::set`]: the same checks, the value sealed by the store with
//! the key-encryption key), so the data plane reads it at `{vaultUri}secrets/{name}` as soon
//! as the request's unit of work commits. No access policy or data-plane role is consulted:
//! the router has authorized the control-plane action (`Microsoft.KeyVault/vaults/secrets/…`),
//! as Azure lets a Contributor set secrets through ARM. The value never comes back this way:
//! [`SecretMeta`] has no field for it.

use super::secrets::{self, Patch, SetBody};
use super::{AttrsIn, Ctx, KeyGen};
use crate::caches::vaults::VaultSettings;
use crate::error::Result;
use crate::request::Caller;
use crate::state::AppState;
use keyless_core::vault::{self as kvrules, Coll};
use keyless_store::{KvVersionRecord, Tx, VaultRecord};
use std::collections::BTreeMap;

/// What a control-plane write of a secret carries: `properties.value`, `.contentType`,
/// `.attributes` (`enabled`, `nbf`, `exp`) and the resource's `tags`. No `Debug`: it holds
/// the value.
#[derive(Default)]
pub struct SecretInput {
    pub value: Option<String>,
    pub content_type: Option<String>,
    pub attributes: Option<AttrsIn>,
    pub tags: Option<BTreeMap<String, String>>,
}

/// The latest version of a secret as the control plane shows it: everything but the value.
#[derive(Debug, Clone)]
pub struct SecretMeta {
    /// The name as first written (a later write in another case keeps it).
    pub name: String,
    pub content_type: Option<String>,
    pub enabled: bool,
    pub nbf: Option<u64>,
    pub exp: Option<u64>,
    /// Unix seconds.
    pub created: u64,
    pub updated: u64,
    pub tags: BTreeMap<String, String>,
    /// `{vaultUri}secrets/{name}`.
    pub uri: String,
    /// `{vaultUri}secrets/{name}/{version}`.
    pub uri_with_version: String,
}

/// One vault as the data plane's handlers see it, for a request that came through the control
/// plane: its ids are based on the vault's `vaultUri`.
struct Vault<'a> {
    s: &'a AppState,
    record: &'a VaultRecord,
    settings: VaultSettings,
    /// Lowercase (the store's key of its objects).
    name: String,
    /// `https://{vault}.vault.{domain}[:port]`.
    base: String,
    keygen: KeyGen,
}

impl<'a> Vault<'a> {
    fn new(s: &'a AppState, record: &'a VaultRecord) -> Self {
        let base = match record.properties["vaultUri"].as_str() {
            Some(u) => u.to_string(),
            None => s.vault_uri(&record.name),
        };
        Vault {
            s,
            record,
            settings: VaultSettings::of(record),
            name: record.name.to_ascii_lowercase(),
            base: base.trim_end_matches('/').to_string(),
            keygen: KeyGen::default(),
        }
    }

    fn ctx<'b>(&'b self, caller: &'b Caller) -> Ctx<'b> {
        Ctx {
            s: self.s,
            vault: self.record,
            settings: &self.settings,
            vname: &self.name,
            base: &self.base,
            caller,
            now: self.s.vault_clock.now(),
            query: &[],
            api_version: kvrules::LATEST_DATA_API_VERSION,
            path: "",
            authorized: Default::default(),
            keygen: &self.keygen,
            issuance: Default::default(),
        }
    }
}

fn meta(ctx: &Ctx<'_>, v: &KvVersionRecord) -> SecretMeta {
    SecretMeta {
        name: v.name.clone(),
        content_type: v.content_type.clone(),
        enabled: v.enabled,
        nbf: v.nbf,
        exp: v.exp,
        created: v.created,
        updated: v.updated,
        tags: v.tags.clone(),
        uri: ctx.id(Coll::Secrets, &v.name, None),
        uri_with_version: ctx.id(Coll::Secrets, &v.name, Some(&v.version)),
    }
}

/// Write secret `name` of `vault` in the request's unit of work. A PUT (`patch` false) writes a
/// new version from `input` alone, as the data plane's set does (a value is required). A PATCH
/// needs the secret to exist: with a value it writes a new version keeping the content type,
/// tags and attributes it does not name; without one it updates the latest version in place.
/// Errors are the data plane's (`BadParameter`, `SecretNotFound`, 409 on a soft-deleted name
/// or a certificate's secret). Returns the secret and whether its name was new.
pub async fn put(
    s: &AppState,
    tx: &mut Tx,
    vault: &VaultRecord,
    caller: &Caller,
    name: &str,
    input: SecretInput,
    patch: bool,
) -> Result<(SecretMeta, bool)> {
    let v = Vault::new(s, vault);
    let ctx = v.ctx(caller);
    ctx.name(Coll::Secrets, name)?;
    if !patch {
        let b = SetBody {
            value: input.value,
            content_type: input.content_type,
            attributes: input.attributes,
            tags: input.tags,
        };
        let (ver, created) = secrets::set(&ctx, tx, name, b).await?;
        return Ok((meta(&ctx, &ver), created));
    }
    let Some(value) = input.value else {
        let b = Patch {
            content_type: input.content_type,
            attributes: input.attributes,
            tags: input.tags,
        };
        let ver = secrets::update(&ctx, tx, name, None, b).await?;
        return Ok((meta(&ctx, &ver), false));
    };
    let latest = ctx.live_version(tx, Coll::Secrets, name, None).await?;
    let a = input.attributes.unwrap_or_default();
    let b = SetBody {
        value: Some(value),
        content_type: input.content_type.or(latest.content_type),
        attributes: Some(AttrsIn {
            enabled: a.enabled.or(Some(latest.enabled)),
            nbf: a.nbf.or(latest.nbf),
            exp: a.exp.or(latest.exp),
            exportable: None,
        }),
        tags: Some(input.tags.unwrap_or(latest.tags)),
    };
    let (ver, _) = secrets::set(&ctx, tx, name, b).await?;
    Ok((meta(&ctx, &ver), false))
}

/// The latest version of live secret `name` of `vault` (`SecretNotFound` otherwise).
pub async fn get(
    s: &AppState,
    tx: &mut Tx,
    vault: &VaultRecord,
    caller: &Caller,
    name: &str,
) -> Result<SecretMeta> {
    let v = Vault::new(s, vault);
    let ctx = v.ctx(caller);
    ctx.name(Coll::Secrets, name)?;
    let ver = ctx.live_version(tx, Coll::Secrets, name, None).await?;
    Ok(meta(&ctx, &ver))
}

/// The live secrets of `vault` (their latest versions), by lowercase name; certificates'
/// secrets included, as the data plane lists them.
pub async fn list(
    s: &AppState,
    tx: &mut Tx,
    vault: &VaultRecord,
    caller: &Caller,
) -> Result<Vec<SecretMeta>> {
    let v = Vault::new(s, vault);
    let ctx = v.ctx(caller);
    let items = tx.kv_latest(ctx.vname, Coll::Secrets.path(), false).await?;
    Ok(items.iter().map(|i| meta(&ctx, i)).collect())
}
