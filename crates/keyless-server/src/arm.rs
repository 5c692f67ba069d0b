//! The control plane over HTTPS in ARM's shapes. Order of checks follows ARM: authentication,
//! then `api-version`, then the path, then authorization, then the body.

use crate::authz;
use crate::error::{Result, ServerError};
use crate::resources::{self as res, VmBody};
use crate::state::AppState;
use crate::tokens;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use keyless_core::api_version;
use keyless_core::claims::JwtError;
use keyless_core::resource_id::{
    canonical_type, ArmPath, ResourceId, BATCH_ACCOUNT, MANAGED_CLUSTER, UAMI, VAULT, VM, VMSS,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest control-plane request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Bodies up to this size are read to the end before a 413, so the client, still sending,
/// sees the answer instead of a reset connection.
const DRAIN_LIMIT: usize = 8 * MAX_BODY;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/subscriptions", any(handle))
        .route("/subscriptions/{*rest}", any(handle))
        .route("/providers/{*rest}", any(handle))
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub object_id: String,
    pub client_id: String,
}

fn authenticate(s: &AppState, headers: &axum::http::HeaderMap) -> Result<Caller> {
    authenticate_with(s, headers, &s.management_audiences())
}

/// Authenticate a bearer token from our token service for one of `audiences`.
pub fn authenticate_with(
    s: &AppState,
    headers: &axum::http::HeaderMap,
    audiences: &[String],
) -> Result<Caller> {
    let tenant_uri = format!("{}/{}", s.base_url, s.tenant_id);
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ServerError::AuthenticationMissing { tenant: tenant_uri });
    };
    let invalid = |m: &str| ServerError::InvalidAuthenticationToken {
        tenant: tenant_uri.clone(),
        message: m.to_string(),
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(|| invalid("The authentication scheme of Bearer is required."))?;
    let claims = tokens::verify(s, token, audiences).map_err(|e| match e {
        JwtError::Expired => ServerError::ExpiredAuthenticationToken(
            "The access token has expired. Acquire a new token and retry.".into(),
        ),
        JwtError::Audience(a) => invalid(&format!(
            "The access token has been obtained for wrong audience or resource '{a}'. It should exactly match with one of the allowed audiences '{}'.",
            s.management_audiences().join("','")
        )),
        JwtError::Issuer(i) => invalid(&format!(
            "The access token is from the wrong issuer '{i}'. It must match the tenant '{}' associated with this subscription.",
            s.issuer_v1()
        )),
        _ => invalid("The access token is invalid."),
    })?;
    let str_claim = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (object_id, client_id) = (str_claim("oid"), str_claim("appid"));
    if object_id.is_empty() {
        return Err(invalid(
            "The received access token is not valid: at least one of the claims 'puid' or 'altsecid' or 'oid' should be present.",
        ));
    }
    Ok(Caller {
        object_id,
        client_id,
    })
}

fn authorize(s: &AppState, caller: &Caller, action: &str, scope: &str) -> Result<()> {
    authz::check(s, &caller.object_id, action, scope)
}

/// Whether `grants` allow `action` on the resource whose JSON is `item` (its `id`).
fn readable(grants: &[keyless_core::rbac::Grant], action: &str, item: &Value) -> bool {
    let id = item["id"].as_str().unwrap_or_default();
    keyless_core::rbac::authorize(grants, action, id).is_some()
}

/// Whether a method only reads.
fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// A write into a managed cluster's node resource group is refused (see
/// [`crate::clusters::check_not_node_group`]); reads pass.
fn node_group_lockdown(s: &AppState, m: &Method, sub: &str, rg: &str) -> Result<()> {
    if is_read(m) {
        return Ok(());
    }
    crate::clusters::check_not_node_group(s, sub, rg)
}

fn verb(method: &Method) -> &'static str {
    match *method {
        Method::GET | Method::HEAD => "read",
        Method::DELETE => "delete",
        Method::POST => "action",
        _ => "write",
    }
}

pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    if body.is_empty() {
        return Err(ServerError::InvalidRequestContent(
            "The request content is empty.".into(),
        ));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ServerError::InvalidRequestContent(e.to_string()))?;
    if !v.is_object() {
        return Err(ServerError::InvalidRequestContent(
            "The request content must be a JSON object.".into(),
        ));
    }
    serde_json::from_value(v).map_err(|e| ServerError::InvalidRequestContent(e.to_string()))
}

#[derive(Debug, Default, serde::Deserialize)]
struct TrackedBody {
    location: Option<String>,
    tags: Option<BTreeMap<String, String>>,
}

fn list(values: Vec<Value>) -> Response {
    Json(json!({ "value": values })).into_response()
}

/// ARM's answer to a DELETE: 200 when something was deleted, 204 when there was nothing.
fn deleted(found: bool) -> Response {
    if found {
        StatusCode::OK.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

fn created_or_ok(created: bool, body: Value) -> Response {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

fn check_version(supported: &[&str], v: &str, provider: Option<(&str, &str)>) -> Result<()> {
    let ok = match provider {
        Some(t) if t == MANAGED_CLUSTER => api_version::container_service_supported(v),
        _ => api_version::is_supported(supported, v),
    };
    if ok {
        return Ok(());
    }
    Err(match provider {
        None => ServerError::InvalidApiVersion {
            version: v.to_string(),
            supported: supported
                .iter()
                .rev()
                .copied()
                .collect::<Vec<_>>()
                .join(","),
        },
        Some((_, ty)) => ServerError::NoRegisteredProviderFound {
            location: "local".into(),
            version: v.to_string(),
            type_name: ty.to_string(),
            supported: supported.join(", "),
        },
    })
}

fn type_versions(
    ns: &str,
    ty: &str,
) -> Result<(&'static [&'static str], (&'static str, &'static str))> {
    match canonical_type(ns, ty) {
        Some(t) if t == UAMI => Ok((api_version::MSI, t)),
        Some(t) if t == VM || t == VMSS => Ok((api_version::COMPUTE, t)),
        Some(t) if t == VAULT => Ok((keyless_core::vault::ARM_API_VERSIONS, t)),
        Some(t) if t == BATCH_ACCOUNT => Ok((api_version::BATCH, t)),
        Some(t) if t == MANAGED_CLUSTER => Ok((api_version::CONTAINER_SERVICE, t)),
        _ => Err(ServerError::InvalidResourceType {
            namespace: ns.to_string(),
            type_name: ty.to_string(),
        }),
    }
}

/// Every ARM request: authenticate, dispatch, and hand each write with its answer to the
/// Activity Log hook ([`crate::activity::record`]) — once, whatever the outcome.
async fn handle(State(s): State<Arc<AppState>>, req: Request) -> Result<Response> {
    let caller = authenticate(&s, req.headers())?;
    let op = ArmPath::parse(req.uri().path())
        .ok()
        .and_then(|p| keyless_core::activity_log::operation(req.method().as_str(), &p));
    let Some(op) = op else {
        return dispatch(&s, &caller, req).await;
    };
    let (method, headers) = (req.method().to_string(), req.headers().clone());
    let request_id = req
        .extensions()
        .get::<keyless_ops::request::RequestId>()
        .map(|r| r.0.clone());
    let resp = dispatch(&s, &caller, req)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    let event = crate::activity::WriteEvent::new(
        &caller,
        op,
        &method,
        resp.status().as_u16(),
        &headers,
        request_id.as_deref(),
    );
    crate::activity::record(&s, &event).await;
    Ok(resp)
}

async fn dispatch(s: &Arc<AppState>, caller: &Caller, req: Request) -> Result<Response> {
    let (s, caller) = (s.clone(), caller.clone());
    let (parts, body) = req.into_parts();
    let query: Vec<(String, String)> = serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
        .map_err(|_| ServerError::InvalidRequestContent("The query string is malformed.".into()))?;
    let version = query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("api-version"))
        .map(|(_, v)| v.clone())
        .ok_or(ServerError::MissingApiVersion)?;
    if let Some(sub) = keyless_core::activity_log::events_path(parts.uri.path()) {
        check_version(keyless_core::activity_log::API_VERSIONS, &version, None)?;
        if parts.method != Method::GET {
            return Err(ServerError::MethodNotAllowed(parts.method.to_string()));
        }
        return crate::activity::list(&s, &caller, &sub, &query);
    }
    let path = ArmPath::parse(parts.uri.path())
        .map_err(|_| ServerError::InvalidPath(parts.uri.path().to_string()))?;
    let body = axum::body::to_bytes(body, DRAIN_LIMIT)
        .await
        .ok()
        .filter(|b| b.len() <= MAX_BODY)
        .ok_or(ServerError::RequestTooLarge(MAX_BODY))?;
    let m = &parts.method;
    let sub_scope = |sub: &str| format!("/subscriptions/{sub}");

    match path {
        ArmPath::Authorization { scope, kind, name } => {
            check_version(api_version::AUTHORIZATION, &version, None)?;
            crate::roles::handle(&s, &caller, m, &scope, kind, name, &query, &body)
        }
        ArmPath::Subscriptions => {
            check_version(api_version::RESOURCES, &version, None)?;
            // the subscriptions the caller can read
            let scope = sub_scope(&s.subscription_id);
            let readable = authz::permitted(
                &s,
                &caller.object_id,
                "Microsoft.Resources/subscriptions/read",
                &scope,
            )?;
            Ok(list(if readable {
                vec![subscription_json(&s)]
            } else {
                vec![]
            }))
        }
        ArmPath::Subscription { subscription } => {
            check_version(api_version::RESOURCES, &version, None)?;
            res::check_subscription(&s, &subscription)?;
            authorize(
                &s,
                &caller,
                "Microsoft.Resources/subscriptions/read",
                &sub_scope(&subscription),
            )?;
            match *m {
                Method::GET => Ok(Json(subscription_json(&s)).into_response()),
                _ => Err(ServerError::MethodNotAllowed(m.to_string())),
            }
        }
        ArmPath::ResourceGroups { subscription } => {
            check_version(api_version::RESOURCES, &version, None)?;
            res::check_subscription(&s, &subscription)?;
            if *m != Method::GET {
                return Err(ServerError::MethodNotAllowed(m.to_string()));
            }
            // the groups the caller can read
            let grants = authz::grants(&s, &caller.object_id)?;
            let groups = s.store.list_resource_groups(&subscription)?;
            Ok(list(
                groups
                    .iter()
                    .map(res::rg_json)
                    .filter(|g| {
                        readable(
                            &grants,
                            "Microsoft.Resources/subscriptions/resourceGroups/read",
                            g,
                        )
                    })
                    .collect(),
            ))
        }
        ArmPath::ResourceGroup {
            subscription,
            resource_group,
        } => {
            check_version(api_version::RESOURCES, &version, None)?;
            res::check_subscription(&s, &subscription)?;
            let scope = format!("/subscriptions/{subscription}/resourceGroups/{resource_group}");
            authorize(
                &s,
                &caller,
                &format!(
                    "Microsoft.Resources/subscriptions/resourceGroups/{}",
                    verb(m)
                ),
                &scope,
            )?;
            match *m {
                Method::PUT => {
                    let b: TrackedBody = parse_body(&body)?;
                    let (rg, created) = res::put_resource_group(
                        &s,
                        &subscription,
                        &resource_group,
                        b.location.as_deref(),
                        b.tags,
                    )?;
                    Ok(created_or_ok(created, res::rg_json(&rg)))
                }
                Method::PATCH => {
                    let b: TrackedBody = parse_body(&body)?;
                    let cur = res::get_resource_group(&s, &subscription, &resource_group)?;
                    let (rg, _) = res::put_resource_group(
                        &s,
                        &subscription,
                        &resource_group,
                        Some(&cur.location),
                        b.tags.or(Some(cur.tags)),
                    )?;
                    Ok(Json(res::rg_json(&rg)).into_response())
                }
                Method::GET => Ok(Json(res::rg_json(&res::get_resource_group(
                    &s,
                    &subscription,
                    &resource_group,
                )?))
                .into_response()),
                Method::HEAD => Ok(
                    match s.store.get_resource_group(&subscription, &resource_group)? {
                        Some(_) => StatusCode::NO_CONTENT.into_response(),
                        None => StatusCode::NOT_FOUND.into_response(),
                    },
                ),
                Method::DELETE => {
                    if let Some(cluster) =
                        crate::clusters::owner_of_node_group(&s, &subscription, &resource_group)?
                    {
                        return Err(ServerError::Conflict {
                            code: "OperationNotAllowed",
                            message: format!("The resource group '{resource_group}' is the node resource group of the managed cluster '{cluster}'; it is deleted with the cluster."),
                        });
                    }
                    if s.store
                        .delete_resource_group(&subscription, &resource_group)?
                    {
                        Ok(StatusCode::OK.into_response())
                    } else {
                        Err(ServerError::ResourceGroupNotFound(resource_group))
                    }
                }
                _ => Err(ServerError::MethodNotAllowed(m.to_string())),
            }
        }
        ArmPath::Collection {
            subscription,
            resource_group,
            namespace,
            type_name,
        } => {
            let (versions, t) = type_versions(&namespace, &type_name)?;
            check_version(versions, &version, Some(t))?;
            res::check_subscription(&s, &subscription)?;
            let scope = match &resource_group {
                Some(rg) => format!("/subscriptions/{subscription}/resourceGroups/{rg}"),
                None => sub_scope(&subscription),
            };
            let read = format!("{}/{}/read", t.0, t.1);
            if resource_group.is_some() {
                authorize(&s, &caller, &read, &scope)?;
            }
            if *m != Method::GET {
                return Err(ServerError::MethodNotAllowed(m.to_string()));
            }
            if let Some(rg) = &resource_group {
                res::get_resource_group(&s, &subscription, rg)?;
            }
            // a subscription-wide list shows what the caller can read
            let grants = authz::grants(&s, &caller.object_id)?;
            if t == MANAGED_CLUSTER {
                let items = crate::clusters::list(&s, &subscription, resource_group.as_deref())?;
                Ok(list(
                    items
                        .into_iter()
                        .filter(|v| readable(&grants, &read, v))
                        .collect(),
                ))
            } else if t == BATCH_ACCOUNT {
                let accounts = s.store.list_tracked(
                    crate::batch::ACCOUNT_TYPE,
                    &subscription,
                    resource_group.as_deref(),
                )?;
                let items = accounts.into_iter().map(|a| a.body);
                Ok(list(
                    items.filter(|v| readable(&grants, &read, v)).collect(),
                ))
            } else if t == VAULT {
                let vaults = s
                    .store
                    .list_vaults(&subscription, resource_group.as_deref())?;
                let items = vaults.iter().map(crate::vaults::vault_json);
                Ok(list(
                    items.filter(|v| readable(&grants, &read, v)).collect(),
                ))
            } else if t == UAMI {
                let ids = s
                    .store
                    .list_identities(&subscription, resource_group.as_deref())?;
                let items = ids.iter().map(res::identity_json);
                Ok(list(
                    items.filter(|v| readable(&grants, &read, v)).collect(),
                ))
            } else {
                let vms = s.store.list_vms(&subscription, resource_group.as_deref())?;
                let items = vms
                    .iter()
                    .filter(|v| ResourceId::parse(&v.resource_id).is_ok_and(|r| r.is_type(t)))
                    .map(|v| res::vm_json(&s, v))
                    .collect::<Result<Vec<_>>>()?;
                Ok(list(
                    items
                        .into_iter()
                        .filter(|v| readable(&grants, &read, v))
                        .collect(),
                ))
            }
        }
        ArmPath::Resource(rid) => {
            let (versions, t) = type_versions(&rid.namespace, &rid.type_name)?;
            check_version(versions, &version, Some(t))?;
            res::check_subscription(&s, &rid.subscription)?;
            authorize(
                &s,
                &caller,
                &format!("{}/{}/{}", t.0, t.1, verb(m)),
                &rid.canonical(),
            )?;
            node_group_lockdown(&s, m, &rid.subscription, &rid.resource_group)?;
            if t == UAMI {
                identity(&s, m, &rid, &body)
            } else if t == VAULT {
                vault(&s, m, &rid, &body)
            } else if t == BATCH_ACCOUNT {
                batch_account(&s, m, &rid, &body)
            } else if t == MANAGED_CLUSTER {
                cluster(&s, &caller, m, &rid, &body)
            } else {
                vm(&s, &caller, m, &rid, &body)
            }
        }
        ArmPath::Child {
            parent,
            child_type,
            name,
        } => {
            let (versions, t) = type_versions(&parent.namespace, &parent.type_name)?;
            check_version(versions, &version, Some(t))?;
            res::check_subscription(&s, &parent.subscription)?;
            // fics::handle authorizes first; the lockdown answers only callers that may write
            let lockdown =
                || node_group_lockdown(&s, m, &parent.subscription, &parent.resource_group);
            if t == UAMI && child_type.eq_ignore_ascii_case("federatedIdentityCredentials") {
                if !is_read(m) {
                    authorize(
                        &s,
                        &caller,
                        &format!(
                            "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/{}",
                            verb(m)
                        ),
                        &parent.canonical(),
                    )?;
                    lockdown()?;
                }
                return crate::fics::handle(&s, &caller, m, &parent, Some(&name), &version, &body);
            }
            if t == BATCH_ACCOUNT && child_type.eq_ignore_ascii_case("pools") {
                authorize(
                    &s,
                    &caller,
                    &format!("Microsoft.Batch/batchAccounts/pools/{}", verb(m)),
                    &format!("{}/pools/{name}", parent.canonical()),
                )?;
                lockdown()?;
                return pool(&s, &caller, m, &parent, &name, &body);
            }
            if t == VM && child_type.eq_ignore_ascii_case("extensions") {
                authorize(
                    &s,
                    &caller,
                    &format!("Microsoft.Compute/virtualMachines/extensions/{}", verb(m)),
                    &format!("{}/extensions/{name}", parent.canonical()),
                )?;
                lockdown()?;
                return vm_extension(&s, m, &parent, &name, &body);
            }
            if t == VAULT && child_type.eq_ignore_ascii_case("accessPolicies") {
                authorize(
                    &s,
                    &caller,
                    "Microsoft.KeyVault/vaults/accessPolicies/write",
                    &parent.canonical(),
                )?;
                lockdown()?;
                if *m != Method::PUT {
                    return Err(ServerError::MethodNotAllowed(m.to_string()));
                }
                let b: Value = parse_body(&body)?;
                return Ok(Json(crate::vaults::update_access_policies(
                    &s, &parent, &name, b,
                )?)
                .into_response());
            }
            if t != VMSS || !child_type.eq_ignore_ascii_case("virtualMachines") {
                return Err(ServerError::InvalidPath(parts.uri.path().to_string()));
            }
            let scope = format!("{}/virtualMachines/{name}", parent.canonical());
            authorize(
                &s,
                &caller,
                &format!(
                    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/{}",
                    verb(m)
                ),
                &scope,
            )?;
            let ss = res::get_vm(&s, &parent)?;
            let key = format!("{}/virtualmachines/{}", ss.key, name.to_ascii_lowercase());
            let instance = s.store.get_instance(&key)?;
            match (m.clone(), instance) {
                (Method::GET, Some(i)) => Ok(Json(res::instance_json(&ss, &i)).into_response()),
                (Method::DELETE, Some(i)) => {
                    s.store.delete_instance(&i.key)?;
                    Ok(StatusCode::OK.into_response())
                }
                (Method::DELETE, None) => Ok(StatusCode::NO_CONTENT.into_response()),
                (Method::GET, None) => Err(ServerError::ResourceNotFound {
                    type_name: "Microsoft.Compute/virtualMachineScaleSets/virtualMachines".into(),
                    name: format!("{}/{name}", ss.name),
                    group: ss.resource_group.clone(),
                }),
                (m, _) => Err(ServerError::MethodNotAllowed(m.to_string())),
            }
        }
        ArmPath::ChildAction {
            parent,
            child_type,
            name,
            action,
        } => {
            let (versions, t) = type_versions(&parent.namespace, &parent.type_name)?;
            check_version(versions, &version, Some(t))?;
            res::check_subscription(&s, &parent.subscription)?;
            // join tokens of a host group that is a child: a cluster's node pool, a Batch pool
            let group = if t == MANAGED_CLUSTER {
                Some((
                    "agentPools",
                    crate::clusters::pool_join_token as JoinTokenFn,
                ))
            } else if t == BATCH_ACCOUNT {
                Some(("pools", crate::batch::pool_join_token as JoinTokenFn))
            } else {
                None
            };
            if let Some((child, issue)) = group.filter(|(c, _)| {
                child_type.eq_ignore_ascii_case(c)
                    && action.eq_ignore_ascii_case("generateJoinToken")
                    && *m == Method::POST
            }) {
                authorize(
                    &s,
                    &caller,
                    &format!("{}/{}/{child}/generateJoinToken/action", t.0, t.1),
                    &format!("{}/{child}/{name}", parent.canonical()),
                )?;
                if t == BATCH_ACCOUNT {
                    node_group_lockdown(&s, m, &parent.subscription, &parent.resource_group)?;
                }
                let ttl = join_ttl(&body)?;
                let (token, expires, group_id) = issue(&s, &parent, &name, ttl)?;
                return Ok(Json(
                    json!({"joinToken": token, "expiresOn": expires, "vmResourceId": group_id}),
                )
                .into_response());
            }
            Err(ServerError::InvalidPath(parts.uri.path().to_string()))
        }
        ArmPath::Action { resource, action } => {
            let (versions, t) = type_versions(&resource.namespace, &resource.type_name)?;
            check_version(versions, &version, Some(t))?;
            res::check_subscription(&s, &resource.subscription)?;
            if t == UAMI
                && action.eq_ignore_ascii_case("federatedIdentityCredentials")
                && *m == Method::GET
            {
                return crate::fics::handle(&s, &caller, m, &resource, None, &version, &body);
            }
            if t == MANAGED_CLUSTER && *m == Method::POST {
                if action.eq_ignore_ascii_case("readPodIdentityProfile") {
                    let v = crate::clusters::read_pod_identity_profile(&s, &caller, &resource)?;
                    return Ok(Json(v).into_response());
                }
                if action.eq_ignore_ascii_case("reportPodIdentityStatus") {
                    let b: Value = parse_body(&body)?;
                    crate::clusters::report_pod_identity_status(&s, &caller, &resource, &b)?;
                    return Ok(StatusCode::NO_CONTENT.into_response());
                }
            }
            if t == BATCH_ACCOUNT && action.eq_ignore_ascii_case("pools") && *m == Method::GET {
                authorize(
                    &s,
                    &caller,
                    "Microsoft.Batch/batchAccounts/pools/read",
                    &resource.canonical(),
                )?;
                let pools = crate::batch::pools_of(&s, &resource)?;
                crate::batch::get_account(&s, &resource)?;
                let items = pools
                    .iter()
                    .map(|p| crate::batch::pool_json(&s, p))
                    .collect::<Result<Vec<_>>>()?;
                return Ok(list(items));
            }
            if t == VM && action.eq_ignore_ascii_case("extensions") && *m == Method::GET {
                authorize(
                    &s,
                    &caller,
                    "Microsoft.Compute/virtualMachines/extensions/read",
                    &resource.canonical(),
                )?;
                let vm = res::get_vm(&s, &resource)?;
                return Ok(list(crate::batch::list_vm_extensions(&s, &vm)?));
            }
            if t == VMSS && action.eq_ignore_ascii_case("virtualMachines") && *m == Method::GET {
                authorize(
                    &s,
                    &caller,
                    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read",
                    &resource.canonical(),
                )?;
                let ss = res::get_vm(&s, &resource)?;
                let list = s.store.list_instances(&ss.key)?;
                return Ok(Json(json!({"value": list.iter().map(|i| res::instance_json(&ss, i)).collect::<Vec<_>>()})).into_response());
            }
            if (t == VM || t == VMSS)
                && action.eq_ignore_ascii_case("generateJoinToken")
                && *m == Method::POST
            {
                authorize(
                    &s,
                    &caller,
                    &format!("{}/{}/generateJoinToken/action", t.0, t.1),
                    &resource.canonical(),
                )?;
                // a node of a cluster pool joins with the pool's token, never the scale set's
                node_group_lockdown(&s, m, &resource.subscription, &resource.resource_group)?;
                let ttl = join_ttl(&body)?;
                let (token, expires) = res::create_join_token(&s, &resource, ttl)?;
                let vm = res::get_vm(&s, &resource)?;
                Ok(Json(json!({"joinToken": token, "expiresOn": expires, "vmResourceId": vm.resource_id})).into_response())
            } else {
                Err(ServerError::InvalidPath(parts.uri.path().to_string()))
            }
        }
    }
}

/// `expiresInSeconds` of a join-token request (default one hour, at most a week).
/// Issues a join token for a child host group: `(token, expires on, host group resource id)`.
type JoinTokenFn = fn(&AppState, &ResourceId, &str, u64) -> Result<(String, u64, String)>;

fn join_ttl(body: &[u8]) -> Result<u64> {
    #[derive(Default, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct JoinBody {
        expires_in_seconds: Option<u64>,
    }
    let b: JoinBody = if body.is_empty() {
        JoinBody::default()
    } else {
        parse_body(body)?
    };
    let ttl = b.expires_in_seconds.unwrap_or(3600);
    if !(1..=7 * 86_400).contains(&ttl) {
        return Err(ServerError::InvalidParameter {
            message: "expiresInSeconds must be between 1 and 604800.".into(),
            target: Some("expiresInSeconds".into()),
        });
    }
    Ok(ttl)
}

fn batch_account(s: &AppState, m: &Method, rid: &ResourceId, body: &[u8]) -> Result<Response> {
    use crate::batch::{delete_account, get_account, put_account};
    match *m {
        Method::PUT | Method::PATCH => {
            let b: Value = parse_body(body)?;
            let (v, created) = put_account(s, rid, &b, *m == Method::PATCH)?;
            Ok(created_or_ok(created, v))
        }
        Method::GET => Ok(Json(get_account(s, rid)?.body).into_response()),
        Method::DELETE => Ok(deleted(delete_account(s, rid)?)),
        _ => Err(ServerError::MethodNotAllowed(m.to_string())),
    }
}

fn cluster(
    s: &AppState,
    caller: &Caller,
    m: &Method,
    rid: &ResourceId,
    body: &[u8],
) -> Result<Response> {
    use crate::clusters::{cluster_json, delete_cluster, get_cluster, patch_tags, put_cluster};
    match *m {
        Method::PUT => {
            let b: Value = parse_body(body)?;
            let scope = rid.canonical();
            let may_assign = |identity: &str| {
                authz::check_assign(
                    s,
                    &caller.object_id,
                    "Microsoft.ContainerService/managedClusters/write",
                    &scope,
                    identity,
                )
            };
            // done when answered: 201/200 with provisioningState Succeeded and no async
            // header, which the SDK's ARM poller takes as finished
            let (rec, created) = put_cluster(s, rid, &b, &may_assign)?;
            Ok(created_or_ok(created, cluster_json(s, &rec)?))
        }
        Method::PATCH => {
            let b: Value = parse_body(body)?;
            Ok(Json(cluster_json(s, &patch_tags(s, rid, &b)?)?).into_response())
        }
        Method::GET => Ok(Json(cluster_json(s, &get_cluster(s, rid)?)?).into_response()),
        // deleted before the answer; the SDK's delete poller takes 202 or 204 (not 200)
        Method::DELETE => {
            delete_cluster(s, rid)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        _ => Err(ServerError::MethodNotAllowed(m.to_string())),
    }
}

fn pool(
    s: &AppState,
    caller: &Caller,
    m: &Method,
    account: &ResourceId,
    name: &str,
    body: &[u8],
) -> Result<Response> {
    use crate::batch::{get_pool, pool_json, put_pool};
    match *m {
        Method::PUT | Method::PATCH => {
            let b: Value = parse_body(body)?;
            let scope = format!("{}/pools/{name}", account.canonical());
            let may_assign = |identity: &str| {
                authz::check_assign(
                    s,
                    &caller.object_id,
                    "Microsoft.Batch/batchAccounts/pools/write",
                    &scope,
                    identity,
                )
            };
            let (rec, _created) = put_pool(s, account, name, &b, *m == Method::PATCH, &may_assign)?;
            // Batch answers 200 for both create and update
            Ok(Json(pool_json(s, &rec)?).into_response())
        }
        Method::GET => Ok(Json(pool_json(s, &get_pool(s, account, name)?)?).into_response()),
        Method::DELETE => {
            crate::batch::get_account(s, account)?;
            let key = format!("{}/pools/{}", account.key(), name.to_ascii_lowercase());
            Ok(deleted(s.store.delete_vm(&key)?))
        }
        _ => Err(ServerError::MethodNotAllowed(m.to_string())),
    }
}

fn vm_extension(
    s: &AppState,
    m: &Method,
    vm: &ResourceId,
    name: &str,
    body: &[u8],
) -> Result<Response> {
    use crate::batch::{delete_vm_extension, get_vm_extension, put_vm_extension};
    match *m {
        Method::PUT | Method::PATCH => {
            let b: Value = parse_body(body)?;
            let (v, created) = put_vm_extension(s, vm, name, &b)?;
            Ok(created_or_ok(created, v))
        }
        Method::GET => Ok(Json(get_vm_extension(s, vm, name)?).into_response()),
        Method::DELETE => Ok(deleted(delete_vm_extension(s, vm, name)?)),
        _ => Err(ServerError::MethodNotAllowed(m.to_string())),
    }
}

fn subscription_json(s: &AppState) -> Value {
    json!({
        "id": format!("/subscriptions/{}", s.subscription_id),
        "subscriptionId": s.subscription_id,
        "tenantId": s.tenant_id,
        "displayName": "Keyless",
        "state": "Enabled",
        "subscriptionPolicies": {"locationPlacementId": "Public_2014-09-01", "quotaId": "Keyless", "spendingLimit": "Off"},
        "authorizationSource": "RoleBased",
    })
}

fn identity(s: &AppState, m: &Method, rid: &ResourceId, body: &[u8]) -> Result<Response> {
    match *m {
        Method::PUT => {
            let b: TrackedBody = parse_body(body)?;
            let (rec, created) = res::put_identity(s, rid, b.location.as_deref(), b.tags)?;
            Ok(created_or_ok(created, res::identity_json(&rec)))
        }
        Method::PATCH => {
            let b: TrackedBody = parse_body(body)?;
            Ok(Json(res::identity_json(&res::patch_identity(s, rid, b.tags)?)).into_response())
        }
        Method::GET => Ok(Json(res::identity_json(&res::get_identity(s, rid)?)).into_response()),
        Method::DELETE => {
            res::get_resource_group(s, &rid.subscription, &rid.resource_group)?;
            Ok(deleted(s.store.delete_identity(&rid.key())?))
        }
        _ => Err(ServerError::MethodNotAllowed(m.to_string())),
    }
}

fn vault(s: &AppState, m: &Method, rid: &ResourceId, body: &[u8]) -> Result<Response> {
    use crate::vaults::{get_vault, put_vault, vault_json};
    match *m {
        Method::PUT | Method::PATCH => {
            let b = parse_body(body)?;
            let (rec, created) = put_vault(s, rid, b, *m == Method::PATCH)?;
            Ok(created_or_ok(created, vault_json(&rec)))
        }
        Method::GET => Ok(Json(vault_json(&get_vault(s, rid)?)).into_response()),
        Method::DELETE => {
            res::get_resource_group(s, &rid.subscription, &rid.resource_group)?;
            Ok(deleted(s.store.delete_vault(&rid.key())?))
        }
        _ => Err(ServerError::MethodNotAllowed(m.to_string())),
    }
}

fn vm(
    s: &AppState,
    caller: &Caller,
    m: &Method,
    rid: &ResourceId,
    body: &[u8],
) -> Result<Response> {
    match *m {
        Method::PUT | Method::PATCH => {
            let b: VmBody = parse_body(body)?;
            let scope = rid.canonical();
            let may_assign = |identity: &str| {
                authz::check_assign(
                    s,
                    &caller.object_id,
                    "Microsoft.Compute/virtualMachines/write",
                    &scope,
                    identity,
                )
            };
            let (rec, created) = res::write_vm(s, rid, b, *m == Method::PATCH, &may_assign)?;
            Ok(created_or_ok(created, res::vm_json(s, &rec)?))
        }
        Method::GET => Ok(Json(res::vm_json(s, &res::get_vm(s, rid)?)?).into_response()),
        Method::DELETE => {
            res::get_resource_group(s, &rid.subscription, &rid.resource_group)?;
            Ok(deleted(s.store.delete_vm(&rid.key())?))
        }
        _ => Err(ServerError::MethodNotAllowed(m.to_string())),
    }
}
