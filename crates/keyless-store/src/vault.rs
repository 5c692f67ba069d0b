//! Key Vault persistence: vault resources, and the versions of each vault's secrets, keys and
//! certificates. Secret values and private keys are sealed with the key-encryption key; the
//! rest (attributes, tags, public key, certificate) is stored as JSON.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A `Microsoft.KeyVault/vaults` resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaultRecord {
    /// Lookup key (lowercase canonical id).
    pub key: String,
    pub resource_id: String,
    pub name: String,
    pub subscription: String,
    pub resource_group: String,
    pub location: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// `properties` as ARM shows them (tenantId, sku, accessPolicies, vaultUri, ...).
    pub properties: serde_json::Value,
    pub created: u64,
}

/// One version of a secret, key or certificate. `Debug` never shows the private part.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct KvVersionRecord {
    /// Vault name, lowercase.
    pub vault: String,
    /// `secrets`, `keys` or `certificates`.
    pub coll: String,
    /// The object name as first created.
    pub name: String,
    pub version: String,
    pub created: u64,
    pub updated: u64,
    pub enabled: bool,
    pub nbf: Option<u64>,
    pub exp: Option<u64>,
    pub content_type: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Owned by a certificate (its key and secret).
    #[serde(default)]
    pub managed: bool,
    /// Public material (a key's public JWK, a certificate's DER, ...).
    #[serde(default)]
    pub public: serde_json::Value,
    /// The secret value or private key. Never written unsealed.
    #[serde(skip)]
    pub private: Option<Vec<u8>>,
}

impl std::fmt::Debug for KvVersionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvVersionRecord")
            .field("vault", &self.vault)
            .field("coll", &self.coll)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("enabled", &self.enabled)
            .field("managed", &self.managed)
            .field(
                "private",
                &self
                    .private
                    .as_ref()
                    .map(|p| format!("<{} bytes>", p.len())),
            )
            .finish_non_exhaustive()
    }
}

/// An object name in a vault: whether it is soft-deleted, and per-object state (a
/// certificate's policy and pending operation).
#[derive(Debug, Clone, PartialEq)]
pub struct KvNameRecord {
    pub vault: String,
    pub coll: String,
    pub name: String,
    /// (deleted date, scheduled purge date) while soft-deleted.
    pub deleted: Option<(u64, u64)>,
    pub extra: serde_json::Value,
}

/// A write of new versions (one object, or a certificate's certificate + key + secret).
#[derive(Debug, Clone)]
pub struct KvWrite {
    pub versions: Vec<KvVersionRecord>,
    /// Per-object state to set, by collection.
    pub extra: Option<(String, serde_json::Value)>,
    /// Only write if the latest version of (collection, name) is this one (renewals).
    pub expect_latest: Option<(String, Option<String>)>,
}

/// Outcome of a [`KvWrite`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvWriteOutcome {
    Written,
    /// The name is soft-deleted in one of the collections (collection given).
    Deleted,
    /// `expect_latest` did not hold; nothing written.
    Stale,
}
