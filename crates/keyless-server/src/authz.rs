//! Authorization of control-plane calls: the caller's role assignments from the store,
//! evaluated by `keyless_core::rbac`.

use crate::error::{Result, ServerError};
use crate::state::AppState;
use keyless_core::rbac::{self, Grant};

/// The caller's grants.
pub fn grants(s: &AppState, principal_id: &str) -> Result<Vec<Grant>> {
    Ok(s.store
        .role_assignments_for_principal(principal_id)?
        .into_iter()
        .map(|r| Grant {
            scope: r.scope,
            role_definition_id: r.role_definition_id,
        })
        .collect())
}

/// Whether `principal_id` may perform `action` on `scope`.
pub fn permitted(s: &AppState, principal_id: &str, action: &str, scope: &str) -> Result<bool> {
    Ok(rbac::authorize(&grants(s, principal_id)?, action, scope).is_some())
}

/// 403 `AuthorizationFailed` unless `principal_id` may perform `action` on `scope`.
pub fn check(s: &AppState, principal_id: &str, action: &str, scope: &str) -> Result<()> {
    if permitted(s, principal_id, action, scope)? {
        Ok(())
    } else {
        Err(ServerError::AuthorizationFailed {
            principal: principal_id.to_string(),
            action: action.to_string(),
            scope: scope.to_string(),
        })
    }
}

/// The action that attaches a user-assigned identity to a host.
pub const ASSIGN_IDENTITY: &str = "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action";

/// 403 `LinkedAuthorizationFailed` unless `principal_id`, writing `scope` with `action`, may
/// also attach the user-assigned identity `identity` (a host's or a pool's identity link).
pub fn check_assign(
    s: &AppState,
    principal_id: &str,
    action: &str,
    scope: &str,
    identity: &str,
) -> Result<()> {
    if permitted(s, principal_id, ASSIGN_IDENTITY, identity)? {
        Ok(())
    } else {
        Err(ServerError::LinkedAuthorizationFailed {
            principal: principal_id.to_string(),
            action: action.to_string(),
            scope: scope.to_string(),
            linked_action: ASSIGN_IDENTITY.to_string(),
            linked_scope: identity.to_string(),
        })
    }
}
