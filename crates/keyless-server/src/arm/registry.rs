//! The resource types the control plane serves: one table of the providers' entries (each
//! declared in its own module, next to its handlers), and [`lookup`] by namespace and type.
//! Serving a new type is one entry here; the router ([`crate::arm`]) needs no change.

use crate::arm::batch;
use crate::arm::clusters;
use crate::arm::compute;
use crate::arm::deployments;
use crate::arm::identities;
use crate::arm::vaults;
use crate::error::Result;

pub use crate::arm::provider::{
    Access, Action, Call, Child, ChildId, ChildResource, Collection, Exists, Handler, Methods,
    Provider, Reply,
};

/// Every resource type served.
pub static PROVIDERS: &[&Provider] = &[
    &identities::PROVIDER,
    &compute::VIRTUAL_MACHINES,
    &compute::SCALE_SETS,
    &vaults::PROVIDER,
    &batch::PROVIDER,
    &clusters::PROVIDER,
    &deployments::PROVIDER,
];

/// The provider of resource type `namespace/type_name` (both case-insensitive);
/// `InvalidResourceType` when none serves it.
pub fn lookup(namespace: &str, type_name: &str) -> Result<&'static Provider> {
    crate::arm::provider::find(PROVIDERS, namespace, type_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ServerError;
    use keyless_core::resource_id::KNOWN_TYPES;

    #[test]
    fn every_type_has_an_api_version_and_is_one_the_core_knows() {
        for p in PROVIDERS {
            assert!(
                !p.api_versions.is_empty(),
                "{}/{}",
                p.namespace,
                p.type_name
            );
            // the newest listed version is accepted (also where a range decides)
            let newest = p.api_versions.last().unwrap();
            assert!(p.check_version(newest).is_ok(), "{}/{newest}", p.type_name);
            assert!(KNOWN_TYPES.contains(&p.resource_type()), "{}", p.type_name);
        }
        // and every type the core knows (activity log, ids) is served, once
        for t in KNOWN_TYPES {
            let n = PROVIDERS.iter().filter(|p| p.resource_type() == *t).count();
            assert_eq!(n, 1, "{t:?}");
        }
    }

    #[test]
    fn lookup_is_case_insensitive_and_refuses_an_unknown_type() {
        let p = lookup("microsoft.keyvault", "VAULTS").unwrap();
        assert_eq!(p.resource_type(), ("Microsoft.KeyVault", "vaults"));
        let e = lookup("Microsoft.Storage", "storageAccounts").unwrap_err();
        assert!(
            matches!(
                &e,
                ServerError::InvalidResourceType { namespace, type_name }
                    if namespace == "Microsoft.Storage" && type_name == "storageAccounts"
            ),
            "{e:?}"
        );
        // a child type is not a resource type
        assert!(lookup("Microsoft.Batch", "pools").is_err());
    }

    #[test]
    fn a_version_not_served_names_the_type_and_the_versions_served() {
        let p = lookup("Microsoft.Batch", "batchAccounts").unwrap();
        match p.check_version("2001-01-01").unwrap_err() {
            ServerError::NoRegisteredProviderFound {
                location,
                version,
                type_name,
                supported,
            } => {
                assert_eq!(
                    (location.as_str(), version.as_str(), type_name.as_str()),
                    ("local", "2001-01-01", "batchAccounts")
                );
                assert_eq!(supported, p.api_versions.join(", "));
            }
            e => panic!("{e:?}"),
        }
    }
}
