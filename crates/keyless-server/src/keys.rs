//! The signing key ring: loaded from the store, rotated by the pure plan in
//! `keyless_core::rotation`, published as JWKS.

use crate::error::Result;
use keyless_core::rotation::{self, KeyState, RotationAction, RotationPolicy};
use keyless_pki::{Ca, Jwk, SigningKey};
use keyless_store::{SigningKeyRecord, Store};
use std::sync::{Arc, RwLock};

pub struct LoadedKey {
    pub state: KeyState,
    pub key: SigningKey,
}

#[derive(Default)]
pub struct KeyRing {
    keys: RwLock<Vec<Arc<LoadedKey>>>,
}

impl KeyRing {
    /// Reload every key from the store.
    pub fn reload(&self, store: &dyn Store) -> Result<()> {
        let mut loaded = Vec::new();
        for r in store.list_signing_keys()? {
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

    /// Apply the rotation plan at `now`; returns whether anything changed.
    pub fn rotate(
        &self,
        store: &dyn Store,
        ca: &Ca,
        now: u64,
        policy: &RotationPolicy,
    ) -> Result<bool> {
        let states: Vec<KeyState> = self.snapshot().iter().map(|k| k.state.clone()).collect();
        let actions = rotation::plan(&states, now, policy);
        for a in &actions {
            match a {
                RotationAction::Create { activate_at } => {
                    // The key's certificate outlives every token it can sign.
                    let lifetime = policy.rotate_every
                        + policy.prepublish
                        + policy.max_token_lifetime
                        + 86_400;
                    let (key, der) = SigningKey::generate(ca, now, lifetime)?;
                    store.insert_signing_key(&SigningKeyRecord {
                        kid: key.kid().to_string(),
                        created: now,
                        activate_at: *activate_at,
                        cert_der: key.cert_der().to_vec(),
                        key_pkcs8: der,
                    })?;
                    tracing::info!(kid = key.kid(), activate_at, "created signing key");
                }
                RotationAction::Remove { kid } => {
                    store.delete_signing_key(kid)?;
                    tracing::info!(kid, "removed retired signing key");
                }
            }
        }
        if !actions.is_empty() {
            self.reload(store)?;
        }
        Ok(!actions.is_empty())
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
        self.snapshot().into_iter().find(|k| k.state.kid == kid)
    }

    /// Every published key, newest first.
    pub fn jwks(&self) -> Vec<Jwk> {
        let mut keys = self.snapshot();
        keys.sort_by_key(|k| std::cmp::Reverse(k.state.activate_at));
        keys.iter().map(|k| k.key.jwk()).collect()
    }
}
