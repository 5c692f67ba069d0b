//! The hosts of the host API, cached by the fingerprint of their credential ([`HostCache`], a
//! [`FeedCache`]: see there for the staleness bound): what a token request of a host needs —
//! which VM or scale set instance it is, until when its credential is valid, and the
//! identities it holds — read once instead of four to six lookups per request.
//!
//! Every write to a table those are read from is a `hosts` change of the feed
//! (`keyless_store::change_kind::HOSTS`, recorded by the store for every write statement on
//! those tables), which empties the cache: a credential revoked, a VM deleted, an identity
//! removed from a host is seen at once on this server and within the bound on the others.

use super::feed::{Cached, FeedCache};
use keyless_core::selection::CallerIdentities;
use keyless_store::{change_kind, InstanceRecord, VmRecord};

/// A host: a VM, or an instance of a scale set (whose identities are the scale set's).
pub struct Host {
    /// The resource whose identities the host holds (the VM or the scale set).
    pub owner: VmRecord,
    pub instance: Option<InstanceRecord>,
}

impl Host {
    /// The key host credentials are bound to.
    pub fn key(&self) -> &str {
        self.instance
            .as_ref()
            .map(|i| i.key.as_str())
            .unwrap_or(&self.owner.key)
    }
    pub fn resource_id(&self) -> &str {
        self.instance
            .as_ref()
            .map(|i| i.resource_id.as_str())
            .unwrap_or(&self.owner.resource_id)
    }
    pub fn name(&self) -> String {
        match &self.instance {
            Some(i) => format!("{}_{}", self.owner.name, i.instance_id),
            None => self.owner.name.clone(),
        }
    }
    pub fn vm_id(&self) -> &str {
        self.instance
            .as_ref()
            .map(|i| i.vm_id.as_str())
            .unwrap_or(&self.owner.vm_id)
    }
}

/// A host as a token request finds it.
pub struct CachedHost {
    /// SHA-256 (hex) of the host's client certificate.
    pub fingerprint: String,
    pub host: Host,
    /// When the credential stops being valid.
    pub not_after: u64,
    /// The identities the host holds (the VM's, or the scale set's).
    pub identities: CallerIdentities,
}

impl Cached for CachedHost {
    const KIND: &'static str = change_kind::HOSTS;
    fn key(&self) -> &str {
        &self.fingerprint
    }
}

/// Hosts by credential fingerprint.
pub type HostCache = FeedCache<CachedHost>;
