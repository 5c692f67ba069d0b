//! The vault cache of the Key Vault data plane, kept in step across servers by the store's
//! change feed.
//!
//! Every data-plane request needs its vault: the record and the settings parsed from it
//! (access policies, RBAC or not, soft delete). [`VaultCache`] keeps them by vault name, so a
//! request that finds its vault here makes no vault lookup and parses no JSON.
//!
//! Staleness bound: a vault write (create, update — access policies included — or delete)
//! made through this server evicts the vault when its unit of work commits, before the write is
//! answered (the store's commit hook). A write made through another server sharing the
//! database is seen here within [`ServerConfig::vault_cache_poll`] (default 500 ms) plus the
//! time of one read of the feed: every server polls [`keyless_store::Store::changes_since`]
//! at that interval and evicts what changed. Whatever happens to the poller (database
//! unreachable, a starved task), the cache serves nothing once its last successful poll started
//! more than twice the interval ago: requests then read the store as without a cache. So a
//! request never sees a vault older than 2 × the interval (1 s by default).
//!
//! A request that misses loads the vault in its own unit of work and offers it back
//! ([`VaultCache::insert`]) with the ticket it took before that unit of work began: if anything
//! was evicted meanwhile the offer is refused, so a load that raced a change never puts the
//! old value back.
//!
//! [`ServerConfig::vault_cache_poll`]: crate::state::ServerConfig::vault_cache_poll

use keyless_core::vault::access::AccessPolicy;
use keyless_store::{change_kind, ChangeCursor, Store, VaultRecord};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

/// How often a server removes old rows of the change feed.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How long rows of the change feed are kept (far above any poll interval: a server whose
/// polls stop for longer starts over with an empty cache).
const RETENTION: Duration = Duration::from_secs(600);

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

/// Vaults by lowercase name; see the module's doc for when an entry is served.
pub struct VaultCache {
    entries: RwLock<HashMap<String, Arc<CachedVault>>>,
    /// Bumped by every eviction (under the write lock): an offer made with an older ticket is
    /// refused.
    generation: AtomicU64,
    /// Start of the last successful poll of the feed, in ms since `epoch` plus one (0: none
    /// yet).
    synced: AtomicU64,
    epoch: Instant,
    /// Entries are served only while the last successful poll started at most this long ago.
    max_age: Duration,
    poll: Duration,
}

impl VaultCache {
    /// A cache kept in step by a poll of the feed every `poll` ([`follow`]).
    pub fn new(poll: Duration) -> Self {
        Self {
            entries: Default::default(),
            generation: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            epoch: Instant::now(),
            max_age: poll * 2,
            poll,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<CachedVault>>> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<CachedVault>>> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the last successful poll is recent enough for entries to be served.
    fn in_step(&self) -> bool {
        let synced = self.synced.load(Ordering::Acquire);
        synced != 0
            && (self.epoch.elapsed().as_millis() as u64 + 1).saturating_sub(synced)
                <= self.max_age.as_millis() as u64
    }

    /// The cached vault `name` (lowercase), if cached and the cache is in step with the feed.
    pub fn get(&self, name: &str) -> Option<Arc<CachedVault>> {
        if !self.in_step() {
            return None;
        }
        self.read().get(name).cloned()
    }

    /// Take a ticket before the unit of work that loads a vault begins.
    pub fn ticket(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Offer a vault loaded in a unit of work begun after `ticket`; kept unless something was
    /// evicted since the ticket was taken.
    pub fn insert(&self, ticket: u64, vault: Arc<CachedVault>) {
        let mut map = self.write();
        if self.generation.load(Ordering::Acquire) == ticket {
            map.insert(vault.name.clone(), vault);
        }
    }

    /// Forget vault `name` (lowercase).
    pub fn evict(&self, name: &str) {
        let mut map = self.write();
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.remove(name);
    }

    /// Forget every vault.
    pub fn clear(&self) {
        let mut map = self.write();
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.clear();
    }

    /// Record a successful poll that began at `started`.
    fn synced_at(&self, started: Instant) {
        let ms = started.saturating_duration_since(self.epoch).as_millis() as u64 + 1;
        self.synced.fetch_max(ms, Ordering::AcqRel);
    }

    /// The interval of the poll that keeps this cache in step.
    pub fn poll_interval(&self) -> Duration {
        self.poll
    }

    /// Vaults cached now (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Apply one read of the feed that began at `started`.
    fn apply(&self, batch: &keyless_store::ChangeBatch, started: Instant) {
        if batch.reset {
            self.clear();
        }
        for c in &batch.changes {
            if c.kind == change_kind::VAULT {
                self.evict(&c.key);
            }
        }
        self.synced_at(started);
    }
}

/// Keep the vault cache `cache(owner)` in step: this server's own vault writes evict at commit
/// (the store's commit hook), and a task polls the change feed every poll interval for the
/// writes of other servers (and removes old rows of the feed every minute). The task ends when
/// `owner` (the server's state) is dropped.
pub fn follow<S: Send + Sync + 'static>(
    owner: &Arc<S>,
    store: &Store,
    cache: fn(&S) -> &VaultCache,
) {
    let weak: Weak<S> = Arc::downgrade(owner);
    store.on_commit({
        let weak = weak.clone();
        move |kind, key| {
            if kind == change_kind::VAULT {
                if let Some(s) = weak.upgrade() {
                    cache(&s).evict(key);
                }
            }
        }
    });
    let store: Store = store.clone();
    let poll = cache(owner).poll_interval();
    tokio::spawn(async move {
        let mut cursor = ChangeCursor::default();
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut purged = Instant::now();
        let mut failing = false;
        loop {
            tick.tick().await;
            let started = Instant::now();
            let r = store.changes_since(&mut cursor).await;
            let Some(s) = weak.upgrade() else { return };
            match r {
                Ok(batch) => {
                    cache(&s).apply(&batch, started);
                    if failing {
                        tracing::info!("the change feed is read again; the vault cache is in step");
                        failing = false;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "reading the change feed failed; the vault cache is bypassed until it is read again");
                        failing = true;
                    }
                }
            }
            drop(s);
            if purged.elapsed() >= PURGE_EVERY {
                purged = Instant::now();
                let before = std::time::SystemTime::now()
                    .checked_sub(RETENTION)
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                if let Err(e) = store.purge_changes(before).await {
                    tracing::debug!(error = %e, "purging the change feed failed; the next purge tries again");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

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
