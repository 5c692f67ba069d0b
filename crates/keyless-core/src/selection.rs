//! Which identity a token request selects. Every local endpoint style (IMDS, the legacy
//! extension port, App Service, Arc, pods through NMI) ends in this one question, fed with the
//! identities the caller may use; the caller kind decides the set, this module decides the pick.

use serde::{Deserialize, Serialize};

/// How a request names the identity it wants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Selector {
    /// No selector: the system-assigned identity.
    SystemAssigned,
    ClientId(String),
    ObjectId(String),
    /// ARM resource id of a user-assigned identity (`msi_res_id`).
    ResourceId(String),
}

impl Selector {
    /// The query parameter name and value to echo in responses (IMDS echoes the selector).
    pub fn echo(&self) -> Option<(&'static str, &str)> {
        match self {
            Selector::SystemAssigned => None,
            Selector::ClientId(v) => Some(("client_id", v)),
            Selector::ObjectId(v) => Some(("object_id", v)),
            Selector::ResourceId(v) => Some(("msi_res_id", v)),
        }
    }
}

/// One identity a caller may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRef {
    pub principal_id: String,
    pub client_id: String,
    /// Canonical ARM id: the VM for system-assigned, the identity for user-assigned.
    pub resource_id: String,
    pub system_assigned: bool,
}

/// The identities a caller may use (for a host: those assigned to its VM).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerIdentities {
    pub system: Option<IdentityRef>,
    pub user: Vec<IdentityRef>,
}

/// Why no identity was selected. IMDS answers both with 400 "Identity not found".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    #[error("Identity not found")]
    NotFound,
    /// No selector, no system-assigned identity and several user-assigned ones (IMDS's text).
    #[error("Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request")]
    Ambiguous,
}

impl CallerIdentities {
    fn all(&self) -> impl Iterator<Item = &IdentityRef> {
        self.system.iter().chain(self.user.iter())
    }

    /// Pick the identity `selector` names. With no selector, the system-assigned identity;
    /// if there is none and exactly one user-assigned identity, that one (as IMDS does).
    pub fn select(&self, selector: &Selector) -> Result<&IdentityRef, SelectionError> {
        let found = match selector {
            Selector::SystemAssigned => {
                if self.system.is_none() && self.user.len() > 1 {
                    return Err(SelectionError::Ambiguous);
                }
                self.system.as_ref().or(self.user.first())
            }
            Selector::ClientId(c) => self.all().find(|i| i.client_id.eq_ignore_ascii_case(c)),
            Selector::ObjectId(o) => self.all().find(|i| i.principal_id.eq_ignore_ascii_case(o)),
            Selector::ResourceId(r) => {
                let r = r.trim_end_matches('/');
                self.user
                    .iter()
                    .find(|i| i.resource_id.eq_ignore_ascii_case(r))
            }
        };
        found.ok_or(SelectionError::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(p: &str, c: &str, r: &str, sys: bool) -> IdentityRef {
        IdentityRef {
            principal_id: p.into(),
            client_id: c.into(),
            resource_id: r.into(),
            system_assigned: sys,
        }
    }

    fn host() -> CallerIdentities {
        CallerIdentities {
            system: Some(id("sp", "sc", "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/vm", true)),
            user: vec![
                id("u1p", "u1c", "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u1", false),
                id("u2p", "u2c", "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u2", false),
            ],
        }
    }

    #[test]
    fn selects_by_each_selector() {
        let h = host();
        assert_eq!(
            h.select(&Selector::SystemAssigned).unwrap().principal_id,
            "sp"
        );
        assert_eq!(
            h.select(&Selector::ClientId("U1C".into()))
                .unwrap()
                .principal_id,
            "u1p"
        );
        assert_eq!(
            h.select(&Selector::ObjectId("u2p".into()))
                .unwrap()
                .client_id,
            "u2c"
        );
        assert_eq!(
            h.select(&Selector::ResourceId(
                "/subscriptions/s/resourcegroups/G/providers/microsoft.managedidentity/userassignedidentities/U2".into()
            ))
            .unwrap()
            .client_id,
            "u2c"
        );
    }

    #[test]
    fn refuses_what_the_caller_does_not_hold() {
        let h = host();
        assert_eq!(
            h.select(&Selector::ClientId("other".into())),
            Err(SelectionError::NotFound)
        );
        assert_eq!(
            h.select(&Selector::ObjectId("".into())),
            Err(SelectionError::NotFound)
        );
        // The VM id is not a user-assigned identity id.
        assert_eq!(
            h.select(&Selector::ResourceId(h.system.clone().unwrap().resource_id)),
            Err(SelectionError::NotFound)
        );
        let none = CallerIdentities::default();
        assert_eq!(
            none.select(&Selector::SystemAssigned),
            Err(SelectionError::NotFound)
        );
    }

    #[test]
    fn single_user_identity_serves_default_requests() {
        let mut h = host();
        h.system = None;
        assert_eq!(
            h.select(&Selector::SystemAssigned),
            Err(SelectionError::Ambiguous)
        );
        h.user.truncate(1);
        assert_eq!(
            h.select(&Selector::SystemAssigned).unwrap().principal_id,
            "u1p"
        );
    }
}
