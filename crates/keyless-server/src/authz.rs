//! Authorization of control-plane calls: the caller's role assignments from the store (in the
//! request's unit of work), evaluated by `keyless_core::rbac`.

use crate::error::{Result, ServerError};
use keyless_core::rbac::{self, Grant};
use keyless_store::Tx;

/// The caller's grants.
pub async fn grants(tx: &mut Tx, principal_id: &str) -> Result<Vec<Grant>> {
    Ok(tx
        .role_assignments_for_principal(principal_id)
        .await?
        .into_iter()
        .map(|r| Grant {
            scope: r.scope,
            role_definition_id: r.role_definition_id,
        })
        .collect())
}

/// Whether `principal_id` may perform `action` on `scope`.
pub async fn permitted(tx: &mut Tx, principal_id: &str, action: &str, scope: &str) -> Result<bool> {
    Ok(rbac::authorize(&grants(tx, principal_id).await?, action, scope).is_some())
}

/// 403 `AuthorizationFailed` unless `principal_id` may perform `action` on `scope`.
pub async fn check(tx: &mut Tx, principal_id: &str, action: &str, scope: &str) -> Result<()> {
    if permitted(tx, principal_id, action, scope).await? {
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
pub async fn check_assign(
    tx: &mut Tx,
    principal_id: &str,
    action: &str,
    scope: &str,
    identity: &str,
) -> Result<()> {
    if permitted(tx, principal_id, ASSIGN_IDENTITY, identity).await? {
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
