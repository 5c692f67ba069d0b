//! External OIDC issuers' keys as last fetched, per issuer (the cache of workload identity
//! federation; fetching and verifying are in [`crate::sts::federation`]).

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
/// bounded by them). An issuer is fetched again at most once per
/// `ServerConfig::issuer_refetch_interval`, however many unknown `kid`s arrive.
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
}

impl IssuerEntry {
    pub(crate) fn snapshot(&self) -> IssuerKeys {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
