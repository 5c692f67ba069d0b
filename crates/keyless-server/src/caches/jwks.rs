//! OIDC issuers' keys as last fetched, per issuer (the cache of workload identity federation;
//! fetching and verifying, and how long an entry may answer, are in
//! [`crate::sts::federation`]): external issuers' over HTTPS, this server's cluster issuers'
//! from the store.

use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What is known of one issuer's keys: the last fetch's result and when it was tried.
#[derive(Default, Clone)]
pub(crate) struct IssuerKeys {
    pub(crate) keys: Option<Vec<Value>>,
    /// Why the last fetch failed (answered again until the next fetch is allowed).
    pub(crate) error: Option<String>,
    pub(crate) fetched: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct IssuerEntry {
    pub(crate) state: Mutex<IssuerKeys>,
    /// Held while fetching: concurrent requests for the same issuer share one fetch.
    pub(crate) fetch: tokio::sync::Mutex<()>,
}

/// Issuer keys, cached per issuer (issuers come from federated credentials, so the map is
/// bounded by them). An external issuer is fetched again at most once per
/// `ServerConfig::issuer_refetch_interval`, however many unknown `kid`s arrive; a cluster
/// issuer of this server is read from the store again once its entry is a second old.
#[derive(Default)]
pub struct JwksCache {
    issuers: Mutex<HashMap<String, Arc<IssuerEntry>>>,
}

impl JwksCache {
    pub(crate) fn entry(&self, iss: &str) -> Arc<IssuerEntry> {
        self.issuers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(iss.to_string())
            .or_default()
            .clone()
    }

    /// Drop what is known of `iss`: the next lookup reads its keys again. A read under way
    /// (which may have seen the keys before the change that made them stale) fills the entry
    /// dropped here, not the one the next lookup makes.
    pub(crate) fn forget(&self, iss: &str) {
        self.issuers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(iss);
    }
}

impl IssuerEntry {
    pub(crate) fn snapshot(&self) -> IssuerKeys {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
