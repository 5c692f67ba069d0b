//! The signing key ring: loaded from the store, rotated by the pure plan in
//! `keyless_core::rotation`, published as JWKS.
//!
//! Servers sharing one database share its keys. Rotation is a singleton: only the holder of the
//! lease [`ROTATION_LEASE`] mints and removes keys (the lease is renewed at every check, and
//! lapses [`lease_ttl`] after its holder stops, when another server takes it over). Every
//! server reloads the ring at every check (`ServerConfig::key_check_interval`), so:
//!
//! - **Staleness bound.** A key minted or removed by another server is in this server's JWKS
//!   (and accepted in tokens it verifies) at most one check interval (plus the time of one
//!   reload) after it was written. Rotation publishes a new key `prepublish` seconds before it
//!   signs, so as long as the check interval is shorter than `prepublish`, every server
//!   publishes a key before any server signs with it; the JWKS of two servers agree within one
//!   interval.
//! - **The first key.** On an empty database the server holding the lease mints it; the others
//!   wait at start until it is in the store ([`KeyRing::start`]), so two first keys are never
//!   minted and no server starts without the key the others sign with.

use crate::error::{Result, ServerError};
use keyless_core::clock::Clock;
use keyless_core::rotation::{self, KeyState, RotationAction, RotationPolicy};
use keyless_ops::metrics::SIGNING_KEY_ROTATIONS;
use keyless_pki::{Ca, Jwk, SigningKey};
use keyless_store::{SigningKeyRecord, Store};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The lease whose holder rotates the signing keys of every server on the database.
pub const ROTATION_LEASE: &str = "signing-key-rotation";

/// Seconds the rotation lease is held for: three check intervals, at least 30 s (a holder
/// renews it at every check, so it lapses only when its holder stopped checking).
pub fn lease_ttl(check_interval: Duration) -> u64 {
    check_interval.as_secs().saturating_mul(3).max(30)
}

pub struct LoadedKey {
    pub state: KeyState,
    pub key: SigningKey,
}

#[derive(Default)]
pub struct KeyRing {
    keys: RwLock<Vec<Arc<LoadedKey>>>,
    /// Clock time of the last successful reload (0: never).
    reloaded_at: AtomicU64,
    /// Why the last check failed, until a check succeeds.
    last_error: Mutex<Option<String>>,
}

impl KeyRing {
    /// Reload every key from the store (one read; the keys are parsed after it ended).
    pub async fn reload(&self, store: &Store) -> Result<()> {
        let records = {
            let mut tx = store.read("load_signing_keys").await?;
            tx.list_signing_keys().await?
        };
        let mut loaded = Vec::new();
        for r in records {
            let key = SigningKey::load(&r.key_pkcs8, &r.cert_der)?;
            loaded.push(Arc::new(LoadedKey {
                state: KeyState {
                    kid: r.kid,
                    created: r.created,
                    activate_at: r.activate_at,
                },
                key,
            }));
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(())
    }

    fn snapshot(&self) -> Vec<Arc<LoadedKey>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Apply the rotation plan at `now` to the keys the store holds now (reloaded first, so a
    /// key another server minted counts); returns whether anything changed. Only the holder of
    /// [`ROTATION_LEASE`] calls this ([`KeyRing::check`] does). New keys are generated outside
    /// any transaction; each insert or removal is its own unit of work.
    pub async fn rotate(
        &self,
        store: &Store,
        ca: &Ca,
        now: u64,
        policy: &RotationPolicy,
    ) -> Result<bool> {
        self.reload(store).await?;
        let actions = rotation::plan(&self.states(), now, policy);
        for a in &actions {
            match a {
                RotationAction::Create { activate_at } => {
                    // The key's certificate outlives every token it can sign.
                    let lifetime = policy.rotate_every
                        + policy.prepublish
                        + policy.max_token_lifetime
                        + 86_400;
                    let (key, der) = SigningKey::generate(ca, now, lifetime)?;
                    let mut tx = store.write("insert_signing_key").await?;
                    tx.insert_signing_key(&SigningKeyRecord {
                        kid: key.kid().to_string(),
                        created: now,
                        activate_at: *activate_at,
                        cert_der: key.cert_der().to_vec(),
                        key_pkcs8: der,
                    })
                    .await?;
                    tx.commit().await?;
                    metrics::counter!(SIGNING_KEY_ROTATIONS, "step" => "publish").increment(1);
                    tracing::info!(kid = key.kid(), activate_at, "created signing key");
                }
                RotationAction::Remove { kid } => {
                    let mut tx = store.write("delete_signing_key").await?;
                    tx.delete_signing_key(kid).await?;
                    tx.commit().await?;
                    metrics::counter!(SIGNING_KEY_ROTATIONS, "step" => "retire").increment(1);
                    tracing::info!(kid, "removed retired signing key");
                }
            }
        }
        if !actions.is_empty() {
            self.reload(store).await?;
        }
        Ok(!actions.is_empty())
    }

    /// One check of a server: take or renew [`ROTATION_LEASE`] for `holder`; its holder
    /// rotates, every other server reloads what the holder wrote. Returns whether this call
    /// changed the keys. The outcome is recorded ([`KeyRing::last_error`],
    /// [`KeyRing::reloaded_at`]).
    pub async fn check(
        &self,
        store: &Store,
        ca: &Ca,
        now: u64,
        policy: &RotationPolicy,
        holder: &str,
        lease_ttl: u64,
    ) -> Result<bool> {
        let r = async {
            if store
                .try_lease(ROTATION_LEASE, holder, now, lease_ttl)
                .await?
            {
                self.rotate(store, ca, now, policy).await
            } else {
                self.reload(store).await.map(|_| false)
            }
        }
        .await;
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        match &r {
            Ok(_) => {
                self.reloaded_at.store(now, Ordering::Relaxed);
                *last = None;
            }
            Err(e) => *last = Some(e.to_string()),
        }
        r
    }

    /// The first check of a starting server: checks until a key is in the ring. On an empty
    /// database the lease holder mints the first key; a server that does not hold the lease
    /// waits for it (and takes the lease over if its holder stops), at most `lease_ttl` + 30
    /// seconds before failing with [`ServerError::NoSigningKey`].
    pub async fn start(
        &self,
        store: &Store,
        ca: &Ca,
        clock: &dyn Clock,
        policy: &RotationPolicy,
        holder: &str,
        lease_ttl: u64,
    ) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(lease_ttl + 30);
        loop {
            self.check(store, ca, clock.now(), policy, holder, lease_ttl)
                .await?;
            if !self.snapshot().is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(ServerError::NoSigningKey);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Why the last check failed, if it did (cleared by the next successful one).
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Clock time of the last successful check (0: none yet).
    pub fn reloaded_at(&self) -> u64 {
        self.reloaded_at.load(Ordering::Relaxed)
    }

    /// The state of every loaded key.
    pub fn states(&self) -> Vec<KeyState> {
        self.snapshot().iter().map(|k| k.state.clone()).collect()
    }

    /// The key that signs at `now`.
    pub fn signer(&self, now: u64) -> Option<Arc<LoadedKey>> {
        let keys = self.snapshot();
        let states: Vec<KeyState> = keys.iter().map(|k| k.state.clone()).collect();
        let kid = rotation::signing_key(&states, now)?.kid.clone();
        keys.into_iter().find(|k| k.state.kid == kid)
    }

    /// A published key by `kid`.
    pub fn by_kid(&self, kid: &str) -> Option<Arc<LoadedKey>> {
        // looked up under the read lock: every verified token asks, so nothing is copied
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|k| k.state.kid == kid)
            .cloned()
    }

    /// Every published key, newest first.
    pub fn jwks(&self) -> Vec<Jwk> {
        let mut keys = self.snapshot();
        keys.sort_by_key(|k| std::cmp::Reverse(k.state.activate_at));
        keys.iter().map(|k| k.key.jwk()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyless_core::clock::SystemClock;

    const POLICY: RotationPolicy = RotationPolicy {
        rotate_every: 30 * 86_400,
        prepublish: 86_400,
        max_token_lifetime: 86_700,
        skew: 300,
    };

    fn kids(ring: &KeyRing) -> Vec<String> {
        let mut k: Vec<String> = ring.states().into_iter().map(|s| s.kid).collect();
        k.sort();
        k
    }

    async fn stored(store: &Store) -> usize {
        let mut tx = store.read("test").await.unwrap();
        tx.list_signing_keys().await.unwrap().len()
    }

    async fn one_rotator_every_server_serves_its_keys(a: Store, b: Store) {
        let clock = SystemClock;
        let now = clock.now();
        let ca = Arc::new(Ca::generate("test CA", now).unwrap().0);
        let (ra, rb) = (Arc::new(KeyRing::default()), Arc::new(KeyRing::default()));
        let ttl = lease_ttl(Duration::from_secs(1));
        assert_eq!(ttl, 30);
        // two servers start together on an empty database: one first key
        let (ta, tb) = (
            tokio::spawn({
                let (ring, store, ca) = (ra.clone(), a.clone(), ca.clone());
                async move {
                    ring.start(&store, &ca, &SystemClock, &POLICY, "a", ttl)
                        .await
                }
            }),
            tokio::spawn({
                let (ring, store, ca) = (rb.clone(), b.clone(), ca.clone());
                async move {
                    ring.start(&store, &ca, &SystemClock, &POLICY, "b", ttl)
                        .await
                }
            }),
        );
        ta.await.unwrap().unwrap();
        tb.await.unwrap().unwrap();
        assert_eq!(stored(&a).await, 1);
        assert_eq!(kids(&ra), kids(&rb));
        assert!(ra.signer(now).is_some() && rb.signer(now).is_some());
        let (holder, _) = a
            .lease_holder(ROTATION_LEASE, now)
            .await
            .unwrap()
            .expect("held");
        let (h, other, hs, os) = if holder == "a" {
            (&ra, &rb, &a, &b)
        } else {
            (&rb, &ra, &b, &a)
        };
        let other_name = if holder == "a" { "b" } else { "a" };

        // rotation due: only the holder mints; the other serves the new key after its check
        let later = now + POLICY.rotate_every - POLICY.prepublish + 10;
        assert!(h
            .check(hs, &ca, later, &POLICY, &holder, ttl)
            .await
            .unwrap());
        assert_eq!(stored(&a).await, 2);
        assert_eq!(kids(h).len(), 2);
        assert_eq!(kids(other).len(), 1, "stale until its next check");
        assert!(!other
            .check(os, &ca, later + 1, &POLICY, other_name, ttl)
            .await
            .unwrap());
        assert_eq!(stored(&a).await, 2, "the other server minted nothing");
        assert_eq!(kids(h), kids(other));
        assert_eq!(h.jwks(), other.jwks());
        assert_eq!(other.reloaded_at(), later + 1);
        assert!(other.last_error().is_none());

        // the holder stops checking: its lease lapses and the other takes rotation over
        let lapsed = later + ttl + 1;
        other
            .check(os, &ca, lapsed, &POLICY, other_name, ttl)
            .await
            .unwrap();
        let (now_holder, _) = a
            .lease_holder(ROTATION_LEASE, lapsed)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(now_holder, other_name);
        assert_eq!(stored(&a).await, 2, "nothing new was due");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_rotator_on_sqlite() {
        keyless_pki::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = crate::state::tests::replicas(dir.path(), None).await;
        one_rotator_every_server_serves_its_keys(a, b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_rotator_on_postgres() {
        let Some(pg) = keyless_store::testing::PgServer::start() else {
            return;
        };
        keyless_pki::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let url = pg.database().await;
        let (a, b) = crate::state::tests::replicas(dir.path(), Some(&url)).await;
        one_rotator_every_server_serves_its_keys(a, b).await;
    }
}
