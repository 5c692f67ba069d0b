//! Caches kept in step across servers by the store's change feed (the vault records of the
//! Key Vault data plane, the hosts of the host API).
//!
//! Staleness bound: a write made through this server evicts what it changed when its unit of
//! work commits, before the write is answered (the store's commit hook). A write made through
//! another server sharing the database is seen here within the poll interval
//! ([`ServerConfig::vault_cache_poll`], default 500 ms) plus the time of one read of the feed:
//! every server polls [`keyless_store::Store::changes_since`] at that interval and evicts what
//! changed. Whatever happens to the poller (database unreachable, a starved task), a cache
//! serves nothing once its last successful poll started more than twice the interval ago:
//! requests then read the store as without a cache. So a request never sees a value older
//! than 2 × the interval (1 s by default).
//!
//! A request that misses loads the value in its own unit of work and offers it back
//! ([`FeedCache::insert`]) with the ticket it took before that unit of work began: if anything
//! was evicted meanwhile the offer is refused, so a load that raced a change never puts the
//! old value back.
//!
//! [`ServerConfig::vault_cache_poll`]: crate::state::ServerConfig::vault_cache_poll

use keyless_store::{ChangeCursor, Store};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

/// A value a [`FeedCache`] holds: its key, and the kind of change that evicts it.
pub trait Cached: Send + Sync + 'static {
    /// The change kind (`keyless_store::change_kind`) whose key is this value's key (`*`:
    /// every value).
    const KIND: &'static str;
    fn key(&self) -> &str;
}

/// How often a server removes old rows of the change feed.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How long rows of the change feed are kept (far above any poll interval: a server whose
/// polls stop for longer starts over with an empty cache).
const RETENTION: Duration = Duration::from_secs(600);

/// Values by key, kept in step with the change feed; see the module's doc for when an entry
/// is served.
pub struct FeedCache<V: Cached> {
    entries: RwLock<HashMap<String, Arc<V>>>,
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

impl<V: Cached> FeedCache<V> {
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<V>>> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<V>>> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the last successful poll is recent enough for entries to be served.
    fn in_step(&self) -> bool {
        let synced = self.synced.load(Ordering::Acquire);
        synced != 0
            && (self.epoch.elapsed().as_millis() as u64 + 1).saturating_sub(synced)
                <= self.max_age.as_millis() as u64
    }

    /// The value of `key`, if cached and the cache is in step with the feed.
    pub fn get(&self, key: &str) -> Option<Arc<V>> {
        if !self.in_step() {
            return None;
        }
        self.read().get(key).cloned()
    }

    /// Take a ticket before the unit of work that loads a value begins.
    pub fn ticket(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Offer a value loaded in a unit of work begun after `ticket`; kept unless something was
    /// evicted since the ticket was taken.
    pub fn insert(&self, ticket: u64, value: Arc<V>) {
        let mut map = self.write();
        if self.generation.load(Ordering::Acquire) == ticket {
            map.insert(value.key().to_string(), value);
        }
    }

    /// Forget `key`.
    pub fn evict(&self, key: &str) {
        let mut map = self.write();
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.remove(key);
    }

    /// What a change of `kind` to `key` does here: `V::KIND` evicts `key`, or everything for
    /// `*`; other kinds nothing.
    pub fn changed(&self, kind: &str, key: &str) {
        if kind == V::KIND {
            if key == "*" {
                self.clear();
            } else {
                self.evict(key);
            }
        }
    }

    /// Forget every value.
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

    /// Values cached now (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Apply one read of the feed that began at `started`.
    pub(crate) fn apply(&self, batch: &keyless_store::ChangeBatch, started: Instant) {
        if batch.reset {
            self.clear();
        }
        for c in &batch.changes {
            self.changed(&c.kind, &c.key);
        }
        self.synced_at(started);
    }
}

/// A cache the feed keeps in step (a [`FeedCache`] of any value).
pub trait Follower: Send + Sync {
    fn changed(&self, kind: &str, key: &str);
    fn apply(&self, batch: &keyless_store::ChangeBatch, started: Instant);
    fn poll_interval(&self) -> Duration;
}

impl<V: Cached> Follower for FeedCache<V> {
    fn changed(&self, kind: &str, key: &str) {
        FeedCache::changed(self, kind, key)
    }
    fn apply(&self, batch: &keyless_store::ChangeBatch, started: Instant) {
        FeedCache::apply(self, batch, started)
    }
    fn poll_interval(&self) -> Duration {
        FeedCache::poll_interval(self)
    }
}

/// Keep the caches `caches(owner)` in step: this server's own writes evict at commit (the
/// store's commit hook), and one task polls the change feed at the shortest of their poll
/// intervals for the writes of other servers (and removes old rows of the feed every minute).
/// The task ends when `owner` (the server's state) is dropped.
pub fn follow<S: Send + Sync + 'static>(
    owner: &Arc<S>,
    store: &Store,
    caches: for<'a> fn(&'a S) -> Vec<&'a dyn Follower>,
) {
    let weak: Weak<S> = Arc::downgrade(owner);
    store.on_commit({
        let weak = weak.clone();
        move |kind, key| {
            if let Some(s) = weak.upgrade() {
                for c in caches(&s) {
                    c.changed(kind, key);
                }
            }
        }
    });
    let store: Store = store.clone();
    let poll = caches(owner)
        .iter()
        .map(|c| c.poll_interval())
        .min()
        .unwrap_or(Duration::from_millis(500));
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
                    for c in caches(&s) {
                        c.apply(&batch, started);
                    }
                    if failing {
                        tracing::info!("the change feed is read again; the caches are in step");
                        failing = false;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "reading the change feed failed; the caches are bypassed until it is read again");
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
