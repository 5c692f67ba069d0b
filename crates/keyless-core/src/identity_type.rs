//! The `identity` property of a host resource (VM, later scale sets and pools): its `type`
//! and the user-assigned set, with ARM's PUT (replace) and PATCH (merge, `null` removes) rules.

use crate::resource_id::{ResourceId, UAMI};
use crate::CoreError;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityType {
    None,
    SystemAssigned,
    UserAssigned,
    SystemAndUserAssigned,
}

impl IdentityType {
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        let norm: String = s
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        match norm.as_str() {
            "none" => Ok(Self::None),
            "systemassigned" => Ok(Self::SystemAssigned),
            "userassigned" => Ok(Self::UserAssigned),
            "systemassigned,userassigned" | "userassigned,systemassigned" => Ok(Self::SystemAndUserAssigned),
            _ => Err(CoreError::InvalidIdentityType(format!(
                "The identity type '{s}' is invalid. Allowed values are 'None', 'SystemAssigned', 'UserAssigned' and 'SystemAssigned, UserAssigned'."
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "None",
            Self::SystemAssigned => "SystemAssigned",
            Self::UserAssigned => "UserAssigned",
            Self::SystemAndUserAssigned => "SystemAssigned, UserAssigned",
        }
    }

    pub fn has_system(self) -> bool {
        matches!(self, Self::SystemAssigned | Self::SystemAndUserAssigned)
    }

    pub fn has_user(self) -> bool {
        matches!(self, Self::UserAssigned | Self::SystemAndUserAssigned)
    }
}

/// The identity state of a host: type plus canonical ids of user-assigned identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    pub kind: IdentityType,
    pub user: Vec<ResourceId>,
}

/// Maximum user-assigned identities per VM / scale set (seed 001).
pub const MAX_USER_ASSIGNED: usize = 1000;

/// Maximum user-assigned identities one request may newly assign (Azure answers
/// "User Assigned Identities Number '151' Assign exceed limit '150' in one request.").
pub const MAX_ASSIGN_PER_REQUEST: usize = 150;

/// Refuse a write that newly assigns more than [`MAX_ASSIGN_PER_REQUEST`] identities.
pub fn check_assign_batch(newly_assigned: usize) -> Result<(), CoreError> {
    if newly_assigned > MAX_ASSIGN_PER_REQUEST {
        return Err(CoreError::IdentityLimit(format!(
            "User Assigned Identities Number '{newly_assigned}' Assign exceed limit '{MAX_ASSIGN_PER_REQUEST}' in one request."
        )));
    }
    Ok(())
}

fn parse_uami(id: &str) -> Result<ResourceId, CoreError> {
    let r = ResourceId::parse(id).map_err(|_| {
        CoreError::InvalidIdentityType(format!(
            "The user-assigned identity id '{id}' is not a valid resource id."
        ))
    })?;
    if !r.is_type(UAMI) {
        return Err(CoreError::InvalidIdentityType(format!(
            "The user-assigned identity id '{id}' is not a Microsoft.ManagedIdentity/userAssignedIdentities resource."
        )));
    }
    Ok(r)
}

fn check(kind: IdentityType, user: Vec<ResourceId>) -> Result<HostIdentity, CoreError> {
    if kind.has_user() && user.is_empty() {
        return Err(CoreError::InvalidIdentityType(
            "The userAssignedIdentities property must not be empty when the identity type includes 'UserAssigned'.".into(),
        ));
    }
    if !kind.has_user() && !user.is_empty() {
        return Err(CoreError::InvalidIdentityType(format!(
            "The identity type '{}' does not allow userAssignedIdentities; use 'UserAssigned' or 'SystemAssigned, UserAssigned'.",
            kind.as_str()
        )));
    }
    if user.len() > MAX_USER_ASSIGNED {
        return Err(CoreError::IdentityLimit(format!(
            "User Assigned Identities Number '{}' exceed limit '{MAX_USER_ASSIGNED}'.",
            user.len()
        )));
    }
    Ok(HostIdentity { kind, user })
}

fn dedup(mut v: Vec<ResourceId>) -> Vec<ResourceId> {
    let mut seen = std::collections::HashSet::new();
    v.retain(|r| seen.insert(r.key()));
    v
}

/// PUT: the body's identity replaces the current one. `None` body → no identity.
pub fn apply_put(
    kind: Option<&str>,
    user: &BTreeMap<String, serde_json::Value>,
) -> Result<HostIdentity, CoreError> {
    let kind = kind
        .map(IdentityType::parse)
        .transpose()?
        .unwrap_or(IdentityType::None);
    let ids = user
        .keys()
        .map(|k| parse_uami(k))
        .collect::<Result<Vec<_>, _>>()?;
    check(kind, dedup(ids))
}

/// PATCH: `type` replaces when given; map entries with `null` remove, others add.
/// A type without `UserAssigned` drops all user-assigned identities.
pub fn apply_patch(
    current: &HostIdentity,
    kind: Option<&str>,
    user: Option<&BTreeMap<String, serde_json::Value>>,
) -> Result<HostIdentity, CoreError> {
    let kind = match kind {
        Some(k) => IdentityType::parse(k)?,
        None => current.kind,
    };
    let mut set = if kind.has_user() {
        current.user.clone()
    } else {
        vec![]
    };
    if let Some(map) = user {
        for (id, v) in map {
            let r = parse_uami(id)?;
            if v.is_null() {
                set.retain(|x| x.key() != r.key());
            } else if kind.has_user() {
                set.push(r);
            } else {
                return check(kind, vec![r]);
            }
        }
    }
    check(kind, dedup(set))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const U1: &str = "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u1";
    const U2: &str = "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u2";

    fn map(v: &[(&str, serde_json::Value)]) -> BTreeMap<String, serde_json::Value> {
        v.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn types_parse_like_arm() {
        assert_eq!(
            IdentityType::parse("SystemAssigned,UserAssigned").unwrap(),
            IdentityType::SystemAndUserAssigned
        );
        assert_eq!(
            IdentityType::parse("systemassigned, userassigned")
                .unwrap()
                .as_str(),
            "SystemAssigned, UserAssigned"
        );
        assert_eq!(IdentityType::parse("None").unwrap(), IdentityType::None);
        assert!(IdentityType::parse("Both").is_err());
    }

    #[test]
    fn put_rules() {
        let h = apply_put(
            Some("UserAssigned"),
            &map(&[
                (U1, json!({})),
                (
                    &U1.to_uppercase().replace("SUBSCRIPTIONS", "subscriptions"),
                    json!({}),
                ),
            ]),
        )
        .unwrap();
        assert_eq!(h.user.len(), 1, "case-insensitive duplicates collapse");
        assert!(apply_put(Some("UserAssigned"), &map(&[])).is_err());
        assert!(apply_put(Some("SystemAssigned"), &map(&[(U1, json!({}))])).is_err());
        assert!(apply_put(
            Some("UserAssigned"),
            &map(&[(
                "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/v",
                json!({})
            )])
        )
        .is_err());
        assert!(apply_put(Some("UserAssigned"), &map(&[("garbage", json!({}))])).is_err());
        assert_eq!(apply_put(None, &map(&[])).unwrap().kind, IdentityType::None);
    }

    #[test]
    fn patch_rules() {
        let cur = apply_put(
            Some("SystemAssigned, UserAssigned"),
            &map(&[(U1, json!({}))]),
        )
        .unwrap();
        let added = apply_patch(&cur, None, Some(&map(&[(U2, json!({}))]))).unwrap();
        assert_eq!(added.user.len(), 2);
        let removed = apply_patch(&added, None, Some(&map(&[(U1, json!(null))]))).unwrap();
        assert_eq!(removed.user.len(), 1);
        assert_eq!(removed.user[0].name, "u2");
        let sys_only = apply_patch(&added, Some("SystemAssigned"), None).unwrap();
        assert!(sys_only.user.is_empty());
        // removing the last user identity while type still says UserAssigned is refused
        assert!(apply_patch(&removed, None, Some(&map(&[(U2, json!(null))]))).is_err());
        let none = apply_patch(&added, Some("None"), None).unwrap();
        assert_eq!(none.kind, IdentityType::None);
    }

    #[test]
    fn limit() {
        let many: BTreeMap<String, serde_json::Value> = (0..=MAX_USER_ASSIGNED)
            .map(|i| (format!("/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u{i}"), json!({})))
            .collect();
        assert!(matches!(
            apply_put(Some("UserAssigned"), &many),
            Err(CoreError::IdentityLimit(_))
        ));
        assert!(check_assign_batch(150).is_ok());
        assert!(
            matches!(check_assign_batch(151), Err(CoreError::IdentityLimit(m)) if m.contains("'151'"))
        );
    }
}
