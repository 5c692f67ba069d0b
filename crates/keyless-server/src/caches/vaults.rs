//! The vaults of the Key Vault data plane, cached by name ([`VaultCache`], a [`FeedCache`]:
//! see there for the staleness bound).
//!
//! Every data-plane request needs its vault: the record and the settings parsed from it
//! (access policies, RBAC or not, soft delete). The cache keeps them by vault name, so a
//! request that finds its vault here makes no vault lookup and parses no JSON. A vault write
//! (create, update — access policies included — or delete) is a `vault` change of the feed.

use super::feed::{Cached, FeedCache};
use keyless_core::vault::access::AccessPolicy;
use keyless_store::{change_kind, VaultRecord};

/// Settings of a vault the data plane needs.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    pub rbac: bool,
    pub soft_delete: bool,
    pub retention_days: u32,
    pub purge_protection: bool,
    pub policies: Vec<AccessPolicy>,
}

impl VaultSettings {
    pub fn of(v: &VaultRecord) -> Self {
        let p = &v.properties;
        Self {
            rbac: p["enableRbacAuthorization"].as_bool().unwrap_or(false),
            soft_delete: p["enableSoftDelete"].as_bool().unwrap_or(true),
            retention_days: p["softDeleteRetentionInDays"].as_u64().unwrap_or(90) as u32,
            purge_protection: p["enablePurgeProtection"].as_bool().unwrap_or(false),
            policies: serde_json::from_value(p["accessPolicies"].clone()).unwrap_or_default(),
        }
    }
}

/// A vault as the data plane uses it.
#[derive(Debug)]
pub struct CachedVault {
    pub record: VaultRecord,
    pub settings: VaultSettings,
    /// The vault's name, lowercase (the store's key of its objects).
    pub name: String,
}

impl CachedVault {
    pub fn new(record: VaultRecord) -> Self {
        Self {
            settings: VaultSettings::of(&record),
            name: record.name.to_ascii_lowercase(),
            record,
        }
    }
}

impl Cached for CachedVault {
    const KIND: &'static str = change_kind::VAULT;
    fn key(&self) -> &str {
        &self.name
    }
}

/// Vaults by lowercase name.
pub type VaultCache = FeedCache<CachedVault>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn vault(name: &str, rbac: bool) -> Arc<CachedVault> {
        Arc::new(CachedVault::new(VaultRecord {
            key: format!("/x/{name}"),
            resource_id: format!("/x/{name}"),
            name: name.into(),
            subscription: "s".into(),
            resource_group: "rg".into(),
            location: "local".into(),
            tags: Default::default(),
            properties: serde_json::json!({"enableRbacAuthorization": rbac}),
            created: 1,
        }))
    }

    fn in_step(c: &VaultCache) {
        c.apply(&Default::default(), Instant::now());
    }

    #[test]
    fn serves_only_in_step_with_the_feed() {
        let c = VaultCache::new(Duration::from_millis(50));
        let t = c.ticket();
        c.insert(t, vault("KV", true));
        assert_eq!(c.len(), 1);
        assert!(c.get("kv").is_none(), "not before a first poll");
        in_step(&c);
        let v = c.get("kv").expect("cached");
        assert!(v.settings.rbac);
        assert_eq!(v.name, "kv");
        // no successful poll for over twice the interval: bypassed
        std::thread::sleep(Duration::from_millis(120));
        assert!(c.get("kv").is_none());
        in_step(&c);
        assert!(c.get("kv").is_some());
    }

    #[test]
    fn a_load_that_raced_an_eviction_is_not_kept() {
        let c = VaultCache::new(Duration::from_secs(60));
        in_step(&c);
        let before = c.ticket();
        // the vault changes (here or on another server) while a request loads the old one
        c.evict("kv");
        c.insert(before, vault("kv", false));
        assert!(c.get("kv").is_none(), "the old value is refused");
        let after = c.ticket();
        c.insert(after, vault("kv", true));
        assert!(c.get("kv").unwrap().settings.rbac);
        // the feed names it: gone; a reset: everything gone
        c.apply(
            &keyless_store::ChangeBatch {
                changes: vec![keyless_store::Change {
                    seq: 1,
                    ts: 1,
                    kind: change_kind::VAULT.into(),
                    key: "kv".into(),
                }],
                reset: false,
            },
            Instant::now(),
        );
        assert!(c.get("kv").is_none());
        let t = c.ticket();
        c.insert(t, vault("a", false));
        c.insert(t, vault("b", false));
        assert_eq!(c.len(), 2);
        c.apply(
            &keyless_store::ChangeBatch {
                changes: vec![],
                reset: true,
            },
            Instant::now(),
        );
        assert!(c.is_empty());
    }
}
