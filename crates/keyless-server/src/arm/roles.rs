//! `Microsoft.Authorization/roleDefinitions` (built-in roles, read-only) and
//! `Microsoft.Authorization/roleAssignments` at any scope.

use crate::arm::registry;
use crate::arm::resources as res;
use crate::authz;
use crate::error::{Result, ServerError};
use crate::request::Caller;
use crate::state::AppState;
use crate::util::format_iso;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::rbac::{self, RoleDefinition, BUILT_IN_ROLES};
use keyless_core::resource_id::{AuthorizationKind, Scope};
use keyless_store::{PrincipalKind, RoleAssignmentInsert, RoleAssignmentRecord, Tx};
use serde_json::{json, Value};

/// The `{scope}` prefix of an extension resource id (empty for the root scope).
fn prefix(scope: &str) -> &str {
    if scope == "/" {
        ""
    } else {
        scope
    }
}

fn definition_id(s: &AppState, role: &RoleDefinition) -> String {
    format!(
        "/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{}",
        s.subscription_id, role.id
    )
}

pub fn definition_json(s: &AppState, role: &RoleDefinition) -> Value {
    json!({
        "id": definition_id(s, role),
        "name": role.id,
        "type": "Microsoft.Authorization/roleDefinitions",
        "properties": {
            "roleName": role.role_name,
            "type": "BuiltInRole",
            "description": role.description,
            "assignableScopes": ["/"],
            "permissions": [{
                "actions": role.actions,
                "notActions": role.not_actions,
                "dataActions": role.data_actions,
                "notDataActions": role.not_data_actions,
            }],
            "createdOn": "2015-02-02T21:55:09.8806423Z",
            "updatedOn": "2025-01-01T00:00:00.0000000Z",
            "createdBy": null,
            "updatedBy": null,
        },
    })
}

pub fn assignment_json(ra: &RoleAssignmentRecord) -> Value {
    json!({
        "properties": {
            "roleDefinitionId": ra.role_definition_id,
            "principalId": ra.principal_id,
            "principalType": ra.principal_type,
            "scope": ra.scope,
            "condition": null,
            "conditionVersion": null,
            "createdOn": format_iso(ra.created),
            "updatedOn": format_iso(ra.created),
            "createdBy": ra.created_by,
            "updatedBy": ra.created_by,
            "delegatedManagedIdentityResourceId": null,
            "description": ra.description,
        },
        "id": format!("{}/providers/Microsoft.Authorization/roleAssignments/{}", prefix(&ra.scope), ra.name),
        "type": "Microsoft.Authorization/roleAssignments",
        "name": ra.name,
    })
}

/// The scope must be in our subscription and exist.
async fn check_scope(s: &AppState, tx: &mut Tx, scope: &Scope) -> Result<()> {
    if let Some(sub) = scope.subscription() {
        res::check_subscription(s, sub)?;
    }
    match scope {
        Scope::ResourceGroup {
            subscription,
            resource_group,
        } => {
            res::get_resource_group(s, tx, subscription, resource_group).await?;
        }
        // a resource of a type that may be a scope, found as its GET finds it
        Scope::Resource(r) => match registry::lookup(&r.namespace, &r.type_name)?.role_scope {
            Some(exists) => exists(s, tx, r).await?,
            None => {
                return Err(ServerError::InvalidResourceType {
                    namespace: r.namespace.clone(),
                    type_name: r.type_name.clone(),
                })
            }
        },
        Scope::Root | Scope::Subscription(_) => {}
    }
    Ok(())
}

pub use keyless_core::odata::AssignmentFilter;
use keyless_core::odata::{RoleDefinitionFilter, RoleType};

/// ARM's answer to a role assignment `$filter` it does not support.
fn unsupported_assignment_filter(f: &str) -> ServerError {
    ServerError::UnsupportedQuery(format!("The filter '{f}' is not supported. Supported filters are either 'atScope()' or 'principalId eq '{{value}}' or assignedTo('{{value}}')'."))
}

/// The same for role definitions.
fn unsupported_definition_filter(f: &str) -> ServerError {
    ServerError::UnsupportedQuery(format!("The filter '{f}' is not supported. Supported filters are either 'roleName eq '{{value}}'' or 'type eq 'BuiltInRole|CustomRole''."))
}

/// Which stored assignments a list at `scope` shows: those at, above (inherited) and, unless
/// `atScope()`, below the scope.
pub fn visible(ra: &RoleAssignmentRecord, scope: &str, filter: &AssignmentFilter) -> bool {
    let above_or_at = rbac::scope_covers(&ra.scope, scope);
    let below = rbac::scope_covers(scope, &ra.scope);
    let in_scope = above_or_at || (!filter.at_scope && below);
    in_scope
        && filter
            .principal
            .as_deref()
            .is_none_or(|p| p.eq_ignore_ascii_case(&ra.principal_id))
}

#[derive(serde::Deserialize)]
struct AssignmentBody {
    properties: AssignmentProps,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AssignmentProps {
    role_definition_id: String,
    principal_id: String,
    principal_type: Option<String>,
    description: Option<String>,
}

/// One `Microsoft.Authorization` request, in the request's unit of work `tx`.
#[allow(clippy::too_many_arguments)]
pub async fn handle(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    m: &Method,
    scope: &Scope,
    kind: AuthorizationKind,
    name: Option<String>,
    query: &[(String, String)],
    body: &[u8],
) -> Result<Response> {
    let scope_s = scope.canonical();
    let filter = query
        .iter()
        .find(|(k, _)| k == "$filter")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    match (kind, m.clone(), name) {
        // role definitions are no secret: any signed-in caller reads them, at any scope
        // (Azure lists no prerequisite for `az role definition list`)
        (AuthorizationKind::RoleDefinitions, Method::GET, None) => {
            let f = RoleDefinitionFilter::parse(filter)
                .map_err(|e| unsupported_definition_filter(&e.filter))?;
            check_scope(s, tx, scope).await?;
            let roles: Vec<Value> = BUILT_IN_ROLES
                .iter()
                .filter(|r| {
                    f.role_name
                        .as_deref()
                        .is_none_or(|w| r.role_name.eq_ignore_ascii_case(w))
                })
                // every role here is built in
                .filter(|_| f.role_type != Some(RoleType::Custom))
                .map(|r| definition_json(s, r))
                .collect();
            Ok(crate::arm::reply::list(roles))
        }
        (AuthorizationKind::RoleDefinitions, Method::GET, Some(id)) => {
            check_scope(s, tx, scope).await?;
            let role = rbac::role_by_id(&id).ok_or(ServerError::RoleDefinitionDoesNotExist(id))?;
            Ok(Json(definition_json(s, role)).into_response())
        }
        (AuthorizationKind::RoleDefinitions, m, _) => {
            Err(ServerError::MethodNotAllowed(m.to_string()))
        }

        (AuthorizationKind::RoleAssignments, Method::GET, None) => {
            authz::check(
                tx,
                &caller.object_id,
                "Microsoft.Authorization/roleAssignments/read",
                &scope_s,
            )
            .await?;
            let f = AssignmentFilter::parse(filter)
                .map_err(|e| unsupported_assignment_filter(&e.filter))?;
            check_scope(s, tx, scope).await?;
            let list: Vec<Value> = tx
                .list_role_assignments()
                .await?
                .iter()
                .filter(|ra| visible(ra, &scope_s, &f))
                .map(assignment_json)
                .collect();
            Ok(crate::arm::reply::list(list))
        }
        (AuthorizationKind::RoleAssignments, Method::GET, Some(n)) => {
            authz::check(
                tx,
                &caller.object_id,
                "Microsoft.Authorization/roleAssignments/read",
                &scope_s,
            )
            .await?;
            let ra = tx
                .get_role_assignment(&n)
                .await?
                .filter(|ra| ra.scope.eq_ignore_ascii_case(&scope_s))
                .ok_or(ServerError::RoleAssignmentNotFound(n))?;
            Ok(Json(assignment_json(&ra)).into_response())
        }
        (AuthorizationKind::RoleAssignments, Method::PUT, Some(n)) => {
            let guid = uuid::Uuid::parse_str(&n)
                .map_err(|_| ServerError::InvalidRoleAssignmentId(n.clone()))?;
            authz::check(
                tx,
                &caller.object_id,
                "Microsoft.Authorization/roleAssignments/write",
                &scope_s,
            )
            .await?;
            let b: AssignmentBody = crate::request::parse_body(body)?;
            // the scope and the principal are held until the assignment commits (a delete of
            // either on another replica waits, then takes the assignment with it), and checked
            // after the hold, so one deleted meanwhile is seen gone
            tx.hold_scope(&scope_s.to_ascii_lowercase()).await?;
            tx.hold_principal(&b.properties.principal_id.trim().to_ascii_lowercase())
                .await?;
            check_scope(s, tx, scope).await?;
            let role = rbac::role_by_id(&b.properties.role_definition_id).ok_or_else(|| {
                ServerError::RoleDefinitionDoesNotExist(
                    b.properties
                        .role_definition_id
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                )
            })?;
            let principal = b.properties.principal_id.trim().to_ascii_lowercase();
            let kind = tx.principal_kind(&principal).await?.ok_or_else(|| {
                ServerError::PrincipalNotFound {
                    principal: b.properties.principal_id.clone(),
                    tenant: s.tenant_id.clone(),
                }
            })?;
            let principal_type = b.properties.principal_type.unwrap_or_else(|| match kind {
                PrincipalKind::ServicePrincipal | PrincipalKind::ManagedIdentity => {
                    "ServicePrincipal".into()
                }
            });
            let rec = RoleAssignmentRecord {
                name: guid.to_string(),
                scope: scope_s.clone(),
                role_definition_id: definition_id(s, role),
                principal_id: principal,
                principal_type,
                description: b.properties.description,
                created: s.now(),
                created_by: caller.object_id.clone(),
            };
            match tx.insert_role_assignment(&rec).await? {
                RoleAssignmentInsert::Created => {
                    Ok((StatusCode::CREATED, Json(assignment_json(&rec))).into_response())
                }
                RoleAssignmentInsert::NameTaken(existing) => {
                    let same = existing.scope.eq_ignore_ascii_case(&rec.scope)
                        && existing.principal_id == rec.principal_id
                        && rbac::role_by_id(&existing.role_definition_id).map(|r| r.id)
                            == Some(role.id);
                    if same {
                        Ok((StatusCode::CREATED, Json(assignment_json(&existing))).into_response())
                    } else {
                        Err(ServerError::RoleAssignmentUpdateNotPermitted)
                    }
                }
                RoleAssignmentInsert::Duplicate => Err(ServerError::RoleAssignmentExists),
            }
        }
        (AuthorizationKind::RoleAssignments, Method::DELETE, Some(n)) => {
            authz::check(
                tx,
                &caller.object_id,
                "Microsoft.Authorization/roleAssignments/delete",
                &scope_s,
            )
            .await?;
            match tx.get_role_assignment(&n).await? {
                Some(ra) if ra.scope.eq_ignore_ascii_case(&scope_s) => {
                    tx.delete_role_assignment(&n).await?;
                    Ok(Json(assignment_json(&ra)).into_response())
                }
                _ => Ok(StatusCode::NO_CONTENT.into_response()),
            }
        }
        (AuthorizationKind::RoleAssignments, m, _) => {
            Err(ServerError::MethodNotAllowed(m.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ra(scope: &str, principal: &str) -> RoleAssignmentRecord {
        RoleAssignmentRecord {
            name: "n".into(),
            scope: scope.into(),
            role_definition_id: "x".into(),
            principal_id: principal.into(),
            principal_type: "ServicePrincipal".into(),
            description: None,
            created: 0,
            created_by: "c".into(),
        }
    }

    #[test]
    fn unsupported_filter_messages() {
        let e = unsupported_assignment_filter("principalld eq 'x'");
        assert!(e
            .to_string()
            .starts_with("The filter 'principalld eq 'x'' is not supported."));
        assert!(e
            .to_string()
            .ends_with("'atScope()' or 'principalId eq '{value}' or assignedTo('{value}')'."));
    }

    #[test]
    fn visibility_at_above_below() {
        let rg = "/subscriptions/s/resourceGroups/rg";
        let below = format!("{rg}/providers/Microsoft.Compute/virtualMachines/v");
        let all = AssignmentFilter::default();
        let at = AssignmentFilter {
            at_scope: true,
            principal: None,
        };
        assert!(visible(&ra("/subscriptions/s", "p"), rg, &all));
        assert!(visible(&ra(rg, "p"), rg, &at));
        assert!(visible(&ra(&below, "p"), rg, &all));
        assert!(!visible(&ra(&below, "p"), rg, &at));
        assert!(!visible(
            &ra("/subscriptions/s/resourceGroups/other", "p"),
            rg,
            &all
        ));
        let who = AssignmentFilter {
            at_scope: false,
            principal: Some("P".into()),
        };
        assert!(visible(&ra(rg, "p"), rg, &who));
        assert!(!visible(&ra(rg, "q"), rg, &who));
    }
}
