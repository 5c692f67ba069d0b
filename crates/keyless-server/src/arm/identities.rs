//! `Microsoft.ManagedIdentity/userAssignedIdentities` in the control plane: the provider entry
//! and its HTTP handlers over the operations of [`crate::arm::resources`], with the federated
//! identity credentials and the credential patterns ([`crate::arm::fics`]) as its children.

use crate::arm::fics;
use crate::arm::provider::{
    handler, Access, Action, Call, Child, ChildId, ChildResource, Collection, Methods, Provider,
};
use crate::arm::reply::{created_or_ok, deleted, TrackedBody};
use crate::arm::resources as res;
use crate::error::Result;
use crate::request::parse_body;
use crate::state::AppState;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::api_version;
use keyless_core::resource_id::{ResourceId, UAMI};
use keyless_store::Tx;
use serde_json::Value;

pub static PROVIDER: Provider = Provider {
    namespace: UAMI.0,
    type_name: UAMI.1,
    api_versions: api_version::MSI,
    accepts: None,
    list: handler!(list),
    resource: Methods {
        get: Some(handler!(get)),
        put: Some(handler!(put)),
        patch: Some(handler!(patch)),
        delete: Some(handler!(delete)),
        ..Methods::NONE
    },
    children: &[
        Child {
            type_name: "federatedIdentityCredentials",
            resource: Some(ChildResource {
                // reads are authorized by the handler, after the api-version check of its own
                access: Access::ParentOnWrite,
                lockdown: true,
                handler: handler!(fic),
            }),
            actions: &[],
        },
        Child {
            type_name: "federatedIdentityCredentialPatterns",
            resource: Some(ChildResource {
                // writes: `…/federatedIdentityCredentialPatterns/{write,delete}` on the identity;
                // reads are authorized by the handler, after the api-version check of its own
                access: Access::ParentOnWrite,
                lockdown: true,
                handler: handler!(fic_pattern),
            }),
            actions: &[],
        },
    ],
    actions: &[
        Action {
            name: "federatedIdentityCredentials",
            method: Method::GET,
            authorize: None,
            lockdown: false,
            handler: handler!(fic_list),
        },
        Action {
            name: "federatedIdentityCredentialPatterns",
            method: Method::GET,
            authorize: None,
            lockdown: false,
            handler: handler!(fic_pattern_list),
        },
    ],
    row: Some("identities"),
    etag_in_body_since: None,
    role_scope: Some(handler!(exists)),
};

async fn exists(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<()> {
    res::get_identity(s, tx, rid).await.map(drop)
}

async fn list(_: &AppState, tx: &mut Tx, c: &Call<'_, Collection>) -> Result<Vec<Value>> {
    let ids = tx
        .list_identities(&c.target.subscription, c.target.resource_group.as_deref())
        .await?;
    Ok(ids.iter().map(res::identity_json).collect())
}

async fn put(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let b: TrackedBody = parse_body(c.body)?;
    let (rec, created) = res::put_identity(s, tx, c.target, b.location.as_deref(), b.tags).await?;
    Ok(created_or_ok(created, res::identity_json(&rec)))
}

async fn patch(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let b: TrackedBody = parse_body(c.body)?;
    let rec = res::patch_identity(s, tx, c.target, b.tags).await?;
    Ok(Json(res::identity_json(&rec)).into_response())
}

async fn get(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let rec = res::get_identity(s, tx, c.target).await?;
    Ok(Json(res::identity_json(&rec)).into_response())
}

async fn delete(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let rid = c.target;
    res::get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    Ok(deleted(tx.delete_identity(&rid.key()).await?))
}

/// GET / PUT / DELETE of one federated identity credential.
async fn fic(s: &AppState, tx: &mut Tx, c: &Call<'_, ChildId>) -> Result<Response> {
    fics::handle(s, tx, c, &c.target.parent, Some(&c.target.name)).await
}

/// GET of the identity's federated identity credentials.
async fn fic_list(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    fics::handle(s, tx, c, c.target, None).await
}

/// GET / PUT / DELETE of one credential pattern.
async fn fic_pattern(s: &AppState, tx: &mut Tx, c: &Call<'_, ChildId>) -> Result<Response> {
    fics::handle_patterns(s, tx, c, &c.target.parent, Some(&c.target.name)).await
}

/// GET of the identity's credential patterns.
async fn fic_pattern_list(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    fics::handle_patterns(s, tx, c, c.target, None).await
}
