//! `Microsoft.Compute/virtualMachines` and `virtualMachineScaleSets` in the control plane: the
//! provider entries and their HTTP handlers over the operations of [`crate::arm::resources`] —
//! a VM's extensions ([`crate::arm::batch`] keeps them with the pools' extensions), a scale
//! set's instances, and the join tokens of both.

use crate::arm::batch::{
    delete_vm_extension, get_vm_extension, list_vm_extensions, put_vm_extension,
};
use crate::arm::provider::{
    handler, Access, Action, Call, Child, ChildId, ChildResource, Collection, Methods, Provider,
};
use crate::arm::reply::{self, created_or_ok, deleted};
use crate::arm::resources::{self as res, LinkCheck, VmBody};
use crate::error::{Result, ServerError};
use crate::request::parse_body;
use crate::state::AppState;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::api_version;
use keyless_core::resource_id::{ResourceId, VM, VMSS};
use keyless_store::Tx;
use serde_json::{json, Value};

/// The first api-version whose VM / scale set body has `etag` (Microsoft.Compute added it then).
const ETAG_IN_BODY_SINCE: &str = "2023-09-01";

/// The handlers of a VM or a scale set itself.
const VM_METHODS: Methods = Methods {
    get: Some(handler!(get)),
    put: Some(handler!(write)),
    patch: Some(handler!(write)),
    delete: Some(handler!(delete)),
    ..Methods::NONE
};

pub static VIRTUAL_MACHINES: Provider = Provider {
    namespace: VM.0,
    type_name: VM.1,
    api_versions: api_version::COMPUTE,
    accepts: None,
    list: handler!(list),
    resource: VM_METHODS,
    children: &[Child {
        type_name: "extensions",
        resource: Some(ChildResource {
            access: Access::Child,
            lockdown: true,
            handler: handler!(extension),
        }),
        actions: &[],
    }],
    actions: &[
        Action {
            name: "extensions",
            method: Method::GET,
            authorize: Some("Microsoft.Compute/virtualMachines/extensions/read"),
            lockdown: false,
            handler: handler!(extensions),
        },
        Action {
            name: "generateJoinToken",
            method: Method::POST,
            authorize: Some("Microsoft.Compute/virtualMachines/generateJoinToken/action"),
            lockdown: true,
            handler: handler!(join_token),
        },
    ],
    row: Some("vms"),
    etag_in_body_since: Some(ETAG_IN_BODY_SINCE),
    role_scope: Some(handler!(exists)),
};

pub static SCALE_SETS: Provider = Provider {
    namespace: VMSS.0,
    type_name: VMSS.1,
    api_versions: api_version::COMPUTE,
    accepts: None,
    list: handler!(list),
    resource: VM_METHODS,
    children: &[Child {
        type_name: "virtualMachines",
        resource: Some(ChildResource {
            access: Access::Child,
            lockdown: false,
            handler: handler!(instance),
        }),
        actions: &[],
    }],
    actions: &[
        Action {
            name: "virtualMachines",
            method: Method::GET,
            authorize: Some("Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read"),
            lockdown: false,
            handler: handler!(instances),
        },
        Action {
            name: "generateJoinToken",
            method: Method::POST,
            authorize: Some("Microsoft.Compute/virtualMachineScaleSets/generateJoinToken/action"),
            // a node of a cluster pool joins with the pool's token, never the scale set's
            lockdown: true,
            handler: handler!(join_token),
        },
    ],
    row: Some("vms"),
    etag_in_body_since: Some(ETAG_IN_BODY_SINCE),
    role_scope: Some(handler!(exists)),
};

async fn exists(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<()> {
    res::get_vm(s, tx, rid).await.map(drop)
}

/// The VMs or the scale sets (whichever `c.provider` is) of a collection.
async fn list(_: &AppState, tx: &mut Tx, c: &Call<'_, Collection>) -> Result<Vec<Value>> {
    let vms = tx
        .list_vms(&c.target.subscription, c.target.resource_group.as_deref())
        .await?;
    let t = c.provider.resource_type();
    let mut items = Vec::with_capacity(vms.len());
    for v in vms
        .iter()
        .filter(|v| ResourceId::parse(&v.resource_id).is_ok_and(|r| r.is_type(t)))
    {
        items.push(res::vm_json(tx, v).await?);
    }
    Ok(items)
}

/// PUT (create or replace) or PATCH (merge).
async fn write(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let rid = c.target;
    let b: VmBody = parse_body(c.body)?;
    let scope = rid.canonical();
    let action = if rid.is_type(VMSS) {
        "Microsoft.Compute/virtualMachineScaleSets/write"
    } else {
        "Microsoft.Compute/virtualMachines/write"
    };
    let may_assign = LinkCheck::Caller {
        principal: &c.caller.object_id,
        action,
        scope: &scope,
    };
    let patch = *c.method == Method::PATCH;
    let (rec, created) = res::write_vm(s, tx, rid, b, patch, &may_assign).await?;
    Ok(created_or_ok(created, res::vm_json(tx, &rec).await?))
}

async fn get(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let rec = res::get_vm(s, tx, c.target).await?;
    Ok(Json(res::vm_json(tx, &rec).await?).into_response())
}

async fn delete(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let rid = c.target;
    res::get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    Ok(deleted(tx.delete_vm(&rid.key()).await?))
}

/// `POST {vm or scale set}/generateJoinToken`.
async fn join_token(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let ttl = reply::join_ttl(c.body)?;
    let (token, expires) = res::create_join_token(s, tx, c.target, ttl).await?;
    let vm = res::get_vm(s, tx, c.target).await?;
    Ok(reply::join_token(&token, expires, &vm.resource_id))
}

/// PUT / PATCH / GET / DELETE of one VM extension.
async fn extension(s: &AppState, tx: &mut Tx, c: &Call<'_, ChildId>) -> Result<Response> {
    let ChildId { parent: vm, name } = c.target;
    match *c.method {
        Method::PUT | Method::PATCH => {
            let b: Value = parse_body(c.body)?;
            let (v, created) = put_vm_extension(s, tx, vm, name, &b).await?;
            Ok(created_or_ok(created, v))
        }
        Method::GET => Ok(Json(get_vm_extension(s, tx, vm, name).await?).into_response()),
        Method::DELETE => Ok(deleted(delete_vm_extension(s, tx, vm, name).await?)),
        _ => Err(ServerError::MethodNotAllowed(c.method.to_string())),
    }
}

/// `GET {vm}/extensions`.
async fn extensions(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let vm = res::get_vm(s, tx, c.target).await?;
    Ok(reply::list(list_vm_extensions(tx, &vm).await?))
}

/// GET / DELETE of one scale set instance.
async fn instance(s: &AppState, tx: &mut Tx, c: &Call<'_, ChildId>) -> Result<Response> {
    let ChildId { parent, name } = c.target;
    let ss = res::get_vm(s, tx, parent).await?;
    let key = format!("{}/virtualmachines/{}", ss.key, name.to_ascii_lowercase());
    let instance = tx.get_instance(&key).await?;
    match (c.method.clone(), instance) {
        (Method::GET, Some(i)) => Ok(Json(res::instance_json(&ss, &i)).into_response()),
        (Method::DELETE, Some(i)) => {
            tx.delete_instance(&i.key).await?;
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

/// `GET {scale set}/virtualMachines`.
async fn instances(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let ss = res::get_vm(s, tx, c.target).await?;
    let list = tx.list_instances(&ss.key).await?;
    Ok(
        Json(json!({"value": list.iter().map(|i| res::instance_json(&ss, i)).collect::<Vec<_>>()}))
            .into_response(),
    )
}
