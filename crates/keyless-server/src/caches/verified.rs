//! Tokens of this server whose signature has been checked (the token service's verification
//! cache; the checks themselves are in [`crate::tokens`]).

use std::sync::Arc;

/// Tokens whose signature has been checked, by SHA-256 of the token: a client reusing its
/// token pays the RS256 verification once. Time, issuer and audience are still checked on
/// every use, and the signing key must still be published.
#[derive(Default)]
pub struct VerifiedTokens {
    map: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Verified>>,
}

/// The signing key id and the claims of a verified token (both shared: a hit copies nothing).
pub(crate) type Verified = (Arc<str>, Arc<serde_json::Value>);

/// Entries kept before the cache starts over.
const VERIFIED_MAX: usize = 8192;

impl VerifiedTokens {
    pub(crate) fn get(&self, digest: &[u8]) -> Option<Verified> {
        self.map.lock().ok()?.get(digest).cloned()
    }
    pub(crate) fn put(&self, digest: Vec<u8>, kid: String, claims: Arc<serde_json::Value>) {
        if let Ok(mut m) = self.map.lock() {
            if m.len() >= VERIFIED_MAX {
                m.clear();
            }
            m.insert(digest, (kid.into(), claims));
        }
    }
}
