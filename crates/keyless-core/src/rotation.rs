//! Signing-key rotation, as a pure plan over the keys that exist.
//!
//! A key is *published* (in JWKS) from its creation, *signs* from `activate_at` until a newer
//! key activates, and is *removed* once every token it could have signed has expired
//! (`superseded_at + max_token_lifetime + skew`). A new key is created `prepublish` seconds
//! before it starts signing, so relying parties that cache JWKS see it first.

/// What the store knows of a signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    pub kid: String,
    pub created: u64,
    pub activate_at: u64,
}

/// Rotation settings (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    pub rotate_every: u64,
    pub prepublish: u64,
    pub max_token_lifetime: u64,
    pub skew: u64,
}

/// A step the caller must carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationAction {
    Create { activate_at: u64 },
    Remove { kid: String },
}

/// The key that signs at `now`: the newest one already active.
pub fn signing_key(keys: &[KeyState], now: u64) -> Option<&KeyState> {
    keys.iter()
        .filter(|k| k.activate_at <= now)
        .max_by(|a, b| (a.activate_at, a.created).cmp(&(b.activate_at, b.created)))
}

/// When `key` stopped signing (the activation of the next newer key), if it has.
pub fn superseded_at(keys: &[KeyState], key: &KeyState, now: u64) -> Option<u64> {
    keys.iter()
        .filter(|k| k.kid != key.kid && k.activate_at <= now)
        .filter(|k| (k.activate_at, k.created) > (key.activate_at, key.created))
        .map(|k| k.activate_at)
        .min()
}

/// The steps to take at `now`.
pub fn plan(keys: &[KeyState], now: u64, p: &RotationPolicy) -> Vec<RotationAction> {
    let mut actions = Vec::new();
    let Some(active) = signing_key(keys, now) else {
        // Nothing signs yet: if a pending key exists, wait for it; else create one now.
        if !keys.iter().any(|k| k.activate_at > now) {
            actions.push(RotationAction::Create { activate_at: now });
        }
        return actions;
    };
    let pending = keys.iter().any(|k| k.activate_at > now);
    let due = active.activate_at + p.rotate_every;
    if !pending && now + p.prepublish >= due {
        actions.push(RotationAction::Create {
            activate_at: due.max(now + p.prepublish),
        });
    }
    for k in keys {
        if let Some(s) = superseded_at(keys, k, now) {
            if now >= s + p.max_token_lifetime + p.skew {
                actions.push(RotationAction::Remove { kid: k.kid.clone() });
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: RotationPolicy = RotationPolicy {
        rotate_every: 1000,
        prepublish: 100,
        max_token_lifetime: 500,
        skew: 10,
    };

    fn k(kid: &str, created: u64, activate_at: u64) -> KeyState {
        KeyState {
            kid: kid.into(),
            created,
            activate_at,
        }
    }

    /// Apply the plan step by step over time and check the invariants.
    #[test]
    fn full_rotation_cycle() {
        let mut keys: Vec<KeyState> = vec![];
        let mut n = 0;
        let mut signed_by: Vec<(String, u64)> = vec![];
        for now in (0..5000).step_by(5) {
            for a in plan(&keys, now, &P) {
                match a {
                    RotationAction::Create { activate_at } => {
                        n += 1;
                        assert!(activate_at >= now);
                        keys.push(k(&format!("k{n}"), now, activate_at));
                    }
                    RotationAction::Remove { kid } => keys.retain(|x| x.kid != kid),
                }
            }
            let s = signing_key(&keys, now).expect("always a signing key");
            signed_by.push((s.kid.clone(), now));
            // Every key that signed a still-valid token is still published.
            for (kid, at) in &signed_by {
                if at + P.max_token_lifetime > now {
                    assert!(
                        keys.iter().any(|x| &x.kid == kid),
                        "{kid} removed too early at {now}"
                    );
                }
            }
            // A key signs only after it was published for `prepublish` (except the first).
            if s.kid != "k1" {
                assert!(now >= s.created + P.prepublish);
            }
            assert!(keys.len() <= 3);
        }
        assert!(n >= 5, "rotated {n} times");
    }

    #[test]
    fn creates_first_key_immediately() {
        assert_eq!(
            plan(&[], 7, &P),
            vec![RotationAction::Create { activate_at: 7 }]
        );
        // a pending key exists: nothing to do
        assert_eq!(plan(&[k("a", 0, 10)], 7, &P), vec![]);
    }

    #[test]
    fn prepublishes_before_due() {
        let keys = [k("a", 0, 0)];
        assert_eq!(plan(&keys, 899, &P), vec![]);
        assert_eq!(
            plan(&keys, 900, &P),
            vec![RotationAction::Create { activate_at: 1000 }]
        );
        // overdue (server was down): new key still prepublished
        assert_eq!(
            plan(&keys, 5000, &P),
            vec![RotationAction::Create { activate_at: 5100 }]
        );
    }
}
