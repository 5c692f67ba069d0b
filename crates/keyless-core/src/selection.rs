//! Which identity a token request selects. Every local endpoint style (IMDS, the legacy
//! extension port, App Service, Arc, pods through NMI) ends in this one question, fed with the
//! identities the caller may use; the caller kind decides the set, this module decides the pick.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

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

/// A caller's identities with hash indexes by client id, object id and resource id, built once
/// (the agent builds one per sync) so that picking an identity costs the same with 1 or 1,000
/// identities. [`IdentityIndex::select`] follows exactly the rules of
/// [`CallerIdentities::select`]; ids compare ASCII case-insensitively, a resource id also
/// without a trailing `/`, and when two identities share an id the first one (system, then
/// user-assigned in order) wins, as the linear search does.
#[derive(Debug, Clone, Default)]
pub struct IdentityIndex {
    ids: CallerIdentities,
    /// Position 0 is the system-assigned identity, `1 + i` the i-th user-assigned one.
    by_client: HashMap<String, usize>,
    by_object: HashMap<String, usize>,
    /// User-assigned identities only (`msi_res_id` never names the VM).
    by_resource: HashMap<String, usize>,
}

impl IdentityIndex {
    pub fn new(ids: CallerIdentities) -> Self {
        let mut ix = IdentityIndex {
            by_client: HashMap::with_capacity(ids.user.len() + 1),
            by_object: HashMap::with_capacity(ids.user.len() + 1),
            by_resource: HashMap::with_capacity(ids.user.len()),
            ids,
        };
        let entries: Vec<(usize, &IdentityRef)> = ix
            .ids
            .system
            .iter()
            .map(|i| (0, i))
            .chain(ix.ids.user.iter().enumerate().map(|(n, i)| (n + 1, i)))
            .collect();
        for (pos, i) in entries {
            ix.by_client
                .entry(i.client_id.to_ascii_lowercase())
                .or_insert(pos);
            ix.by_object
                .entry(i.principal_id.to_ascii_lowercase())
                .or_insert(pos);
            if pos > 0 {
                ix.by_resource
                    .entry(i.resource_id.to_ascii_lowercase())
                    .or_insert(pos);
            }
        }
        ix
    }

    /// The identities, in their original order.
    pub fn identities(&self) -> &CallerIdentities {
        &self.ids
    }

    /// How many identities (system-assigned included).
    pub fn len(&self) -> usize {
        self.ids.user.len() + usize::from(self.ids.system.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn at(&self, pos: usize) -> Option<&IdentityRef> {
        if pos == 0 {
            self.ids.system.as_ref()
        } else {
            self.ids.user.get(pos - 1)
        }
    }

    /// The identity with this client id (system- or user-assigned).
    pub fn by_client_id(&self, client_id: &str) -> Option<&IdentityRef> {
        self.by_client
            .get(&client_id.to_ascii_lowercase())
            .and_then(|p| self.at(*p))
    }

    /// The identity with this object (principal) id.
    pub fn by_object_id(&self, object_id: &str) -> Option<&IdentityRef> {
        self.by_object
            .get(&object_id.to_ascii_lowercase())
            .and_then(|p| self.at(*p))
    }

    /// The user-assigned identity with this ARM id (a trailing `/` ignored).
    pub fn by_resource_id(&self, resource_id: &str) -> Option<&IdentityRef> {
        self.by_resource
            .get(&resource_id.trim_end_matches('/').to_ascii_lowercase())
            .and_then(|p| self.at(*p))
    }

    /// [`CallerIdentities::select`], by hash lookups.
    pub fn select(&self, selector: &Selector) -> Result<&IdentityRef, SelectionError> {
        let found = match selector {
            Selector::SystemAssigned => {
                if self.ids.system.is_none() && self.ids.user.len() > 1 {
                    return Err(SelectionError::Ambiguous);
                }
                self.ids.system.as_ref().or(self.ids.user.first())
            }
            Selector::ClientId(c) => self.by_client_id(c),
            Selector::ObjectId(o) => self.by_object_id(o),
            Selector::ResourceId(r) => self.by_resource_id(r),
        };
        found.ok_or(SelectionError::NotFound)
    }
}

impl From<CallerIdentities> for IdentityIndex {
    fn from(ids: CallerIdentities) -> Self {
        IdentityIndex::new(ids)
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
    fn the_index_selects_exactly_as_the_linear_rules() {
        let mut many = host();
        for n in 0..50 {
            many.user.push(id(
                &format!("P{n}"),
                &format!("C{n}"),
                &format!("/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x{n}"),
                false,
            ));
        }
        // a duplicate client id: the first one wins in both forms
        many.user.push(id("dup", "u1c", "/dup", false));
        let mut no_system = many.clone();
        no_system.system = None;
        let mut one_user = host();
        one_user.system = None;
        one_user.user.truncate(1);
        for ids in [
            host(),
            many,
            no_system,
            one_user,
            CallerIdentities::default(),
        ] {
            let ix = IdentityIndex::new(ids.clone());
            let mut selectors = vec![
                Selector::SystemAssigned,
                Selector::ClientId("nope".into()),
                Selector::ObjectId("nope".into()),
                Selector::ResourceId("/nope".into()),
            ];
            for i in ids.system.iter().chain(ids.user.iter()) {
                selectors.push(Selector::ClientId(i.client_id.to_ascii_uppercase()));
                selectors.push(Selector::ObjectId(i.principal_id.to_ascii_lowercase()));
                selectors.push(Selector::ResourceId(i.resource_id.clone()));
                selectors.push(Selector::ResourceId(format!(
                    "{}/",
                    i.resource_id.to_ascii_lowercase()
                )));
            }
            for s in &selectors {
                assert_eq!(ix.select(s), ids.select(s), "{s:?}");
            }
            assert_eq!(ix.identities(), &ids);
        }
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
