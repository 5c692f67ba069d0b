//! A small Microsoft Graph-shaped directory read: `GET /v1.0/servicePrincipals/{id}`, `GET
//! /v1.0/me` (refused as Graph refuses an application's token),
//! `GET /v1.0/servicePrincipals?$filter=appId eq '…'` (or `id eq '…'`, or
//! `servicePrincipalNames/any(c:c eq '…')`) and `POST /v1.0/directoryObjects/getByIds`, so tools
//! can resolve an assignee given by client id to its object id and an object id to its kind and
//! name, as `az role assignment create --assignee` and `az role assignment list` do.

use crate::error::{GraphKind, Result, ServerError};
use crate::request::{authenticate_with, Caller};
use crate::state::AppState;
use axum::extract::{Path, Request, State};
use axum::routing::get;
use axum::{Json, Router};
use keyless_core::odata::DirectoryFilter;
use keyless_store::{DirectoryEntry, PrincipalKind};
use serde_json::{json, Value};
use std::sync::Arc;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1.0/servicePrincipals", get(list))
        .route("/v1.0/servicePrincipals/{id}", get(one))
        .route("/v1.0/me", get(me))
        .route("/v1.0/applications", axum::routing::post(create_app))
        .route(
            "/v1.0/directoryObjects/getByIds",
            axum::routing::post(get_by_ids),
        )
}

fn audiences(s: &AppState) -> Vec<String> {
    let mut a = s.management_audiences();
    a.extend([
        "https://graph.microsoft.com".to_string(),
        "https://graph.microsoft.com/".to_string(),
    ]);
    a
}

/// A service principal as Graph shows it. `servicePrincipalNames` starts with the app id (what
/// `az role assignment list` shows as the principal's name); a managed identity's also holds
/// its resource id.
fn entry_json(e: &DirectoryEntry) -> Value {
    let names: Vec<&str> = std::iter::once(e.app_id.as_str())
        .chain(e.resource_id.as_deref())
        .collect();
    json!({
        "id": e.object_id,
        "appId": e.app_id,
        "servicePrincipalNames": names,
        "displayName": e.display_name,
        "servicePrincipalType": match e.kind { PrincipalKind::ManagedIdentity => "ManagedIdentity", PrincipalKind::ServicePrincipal => "Application" },
        "alternativeNames": e.resource_id.iter().collect::<Vec<_>>(),
        "accountEnabled": true,
    })
}

/// The caller of a Graph request: a token of ours for Graph, else Graph's 401
/// `InvalidAuthenticationToken` in Graph's words.
fn caller(s: &AppState, headers: &axum::http::HeaderMap) -> Result<Caller> {
    authenticate_with(s, headers, &audiences(s)).map_err(|e| match e {
        ServerError::AuthenticationMissing { .. } => {
            ServerError::graph(GraphKind::Unauthorized, "Access token is empty.")
        }
        ServerError::ExpiredAuthenticationToken(_) => ServerError::graph(
            GraphKind::Unauthorized,
            "Lifetime validation failed, the token is expired.",
        ),
        ServerError::InvalidAuthenticationToken { message, .. } => ServerError::graph(
            GraphKind::Unauthorized,
            format!("Access token validation failure. {message}"),
        ),
        e => e,
    })
}

/// `GET /v1.0/me`: the signed-in user. Every Keyless token is an application's (a service
/// principal's or a managed identity's), so Graph's answer to an app-only token, once the
/// token is known good.
async fn me(State(s): State<Arc<AppState>>, req: Request) -> Result<Json<Value>> {
    caller(&s, req.headers())?;
    Err(ServerError::graph(
        GraphKind::DelegatedOnly,
        "/me request is only valid with delegated authentication flow.",
    ))
}

fn not_found(id: &str) -> ServerError {
    ServerError::graph(GraphKind::NotFound, format!("Resource '{id}' does not exist or one of its queried reference-property objects are not present."))
}

async fn one(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Json<Value>> {
    caller(&s, req.headers())?;
    let mut tx = s.store.read("graph_service_principal").await?;
    let e = tx
        .directory_lookup(&id)
        .await?
        .filter(|e| e.object_id.eq_ignore_ascii_case(&id))
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(entry_json(&e)))
}

async fn list(State(s): State<Arc<AppState>>, req: Request) -> Result<Json<Value>> {
    caller(&s, req.headers())?;
    let q: Vec<(String, String)> =
        serde_urlencoded::from_str(req.uri().query().unwrap_or("")).unwrap_or_default();
    let filter = q
        .iter()
        .find(|(k, _)| k == "$filter")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let wanted = DirectoryFilter::parse(filter).map_err(|_| {
        ServerError::graph(
            GraphKind::UnsupportedQuery,
            "Only $filter=appId eq '…', id eq '…' or servicePrincipalNames/any(c:c eq '…') is supported.",
        )
    })?;
    let mut tx = s.store.read("graph_service_principals").await?;
    let found = match &wanted {
        DirectoryFilter::AppId(v) => tx
            .directory_lookup(v)
            .await?
            .filter(|e| e.app_id.eq_ignore_ascii_case(v)),
        DirectoryFilter::Id(v) => tx
            .directory_lookup(v)
            .await?
            .filter(|e| e.object_id.eq_ignore_ascii_case(v)),
        DirectoryFilter::Name(v) => by_service_principal_name(&mut tx, v).await?,
    };
    let value: Vec<Value> = found.iter().map(entry_json).collect();
    Ok(Json(json!({ "value": value })))
}

/// The service principal whose `servicePrincipalNames` holds `name`: its app id (client id), or
/// a managed identity's resource id (a user-assigned identity's, or the resource of a
/// system-assigned one).
async fn by_service_principal_name(
    tx: &mut keyless_store::Tx,
    name: &str,
) -> Result<Option<DirectoryEntry>> {
    if name.starts_with('/') {
        let Ok(rid) = keyless_core::resource_id::ResourceId::parse(name) else {
            return Ok(None);
        };
        let key = rid.key();
        for k in [key.clone(), format!("{key}#system")] {
            if let Some(i) = tx.get_identity(&k).await? {
                if i.resource_id.eq_ignore_ascii_case(name) {
                    return Ok(Some(DirectoryEntry {
                        object_id: i.principal_id,
                        app_id: i.client_id,
                        display_name: i.name,
                        kind: PrincipalKind::ManagedIdentity,
                        resource_id: Some(i.resource_id),
                    }));
                }
            }
        }
        return Ok(None);
    }
    Ok(tx
        .directory_lookup(name)
        .await?
        .filter(|e| e.app_id.eq_ignore_ascii_case(name)))
}

/// Most ids one `getByIds` takes (Graph's documented limit).
const MAX_IDS: usize = 1000;

/// The directory object types `getByIds` knows (case-insensitive); Keyless's directory holds
/// service principals only, found when the request names `servicePrincipal` or
/// `directoryObject` (or no types at all).
const OBJECT_TYPES: &[&str] = &[
    "directoryObject",
    "user",
    "group",
    "servicePrincipal",
    "application",
    "device",
    "orgContact",
    "directoryObjectPartnerReference",
    "directoryRole",
    "administrativeUnit",
];

#[derive(serde::Deserialize)]
struct GetByIds {
    ids: Option<Vec<String>>,
    #[serde(default)]
    types: Option<Vec<String>>,
}

/// `POST /v1.0/directoryObjects/getByIds`: the service principals among `ids` (object ids),
/// each with its `@odata.type`; ids not in the directory are left out, as Graph does.
async fn get_by_ids(State(s): State<Arc<AppState>>, req: Request) -> Result<Json<Value>> {
    caller(&s, req.headers())?;
    let body = axum::body::to_bytes(req.into_body(), 256 * 1024)
        .await
        .map_err(|_| {
            ServerError::graph(
                GraphKind::TooLarge,
                "The request body is larger than 256 KiB.",
            )
        })?;
    let bad = |m: String| ServerError::graph(GraphKind::BadRequest, m);
    let q: GetByIds = crate::request::parse_body(&body).map_err(|e| match e {
        ServerError::InvalidRequestContent(m) => bad(m),
        e => e,
    })?;
    let ids = q
        .ids
        .filter(|i| !i.is_empty())
        .ok_or_else(|| bad("Invalid request: 'ids' must list at least one id.".into()))?;
    if ids.len() > MAX_IDS {
        return Err(bad(format!(
            "Invalid request: at most {MAX_IDS} ids are accepted, {} were given.",
            ids.len()
        )));
    }
    if let Some(id) = ids.iter().find(|i| uuid::Uuid::parse_str(i).is_err()) {
        return Err(bad(format!(
            "Invalid object identifier '{}'.",
            id.chars().take(100).collect::<String>()
        )));
    }
    let mut wanted = q.types.is_none();
    for t in q.types.iter().flatten() {
        if !OBJECT_TYPES.iter().any(|k| k.eq_ignore_ascii_case(t)) {
            return Err(bad(format!(
                "Invalid request: unknown type '{}'.",
                t.chars().take(100).collect::<String>()
            )));
        }
        wanted |=
            t.eq_ignore_ascii_case("servicePrincipal") || t.eq_ignore_ascii_case("directoryObject");
    }
    let mut value = vec![];
    if wanted {
        let mut seen = std::collections::HashSet::new();
        let mut tx = s.store.read("graph_get_by_ids").await?;
        for id in &ids {
            if !seen.insert(id.to_ascii_lowercase()) {
                continue;
            }
            if let Some(e) = tx
                .directory_lookup(id)
                .await?
                .filter(|e| e.object_id.eq_ignore_ascii_case(id))
            {
                let mut v = entry_json(&e);
                v["@odata.type"] = json!("#microsoft.graph.servicePrincipal");
                value.push(v);
            }
        }
    }
    Ok(Json(json!({
        "@odata.context": format!("{}/v1.0/$metadata#directoryObjects", s.base_url),
        "value": value,
    })))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewApp {
    display_name: String,
    #[serde(default)]
    key_credentials: Vec<KeyCredential>,
}

#[derive(serde::Deserialize)]
struct KeyCredential {
    /// base64 DER (or PEM text) of an X.509 certificate
    key: String,
}

/// `POST /v1.0/applications`: register an application (service principal) with a generated
/// client secret (returned once) and optional certificates. Needs the right to assign roles at
/// the subscription (directory administration stands in for Entra's app-registration rights).
async fn create_app(
    State(s): State<Arc<AppState>>,
    req: Request,
) -> Result<(axum::http::StatusCode, Json<Value>)> {
    let caller = caller(&s, req.headers())?;
    let scope = format!("/subscriptions/{}", s.subscription_id);
    // the caller's right is checked before the body is read (a read that ends before it: no
    // transaction waits on the client's upload)
    let mut tx = s.store.read("graph_authorize").await?;
    if !crate::authz::permitted(
        &mut tx,
        &caller.object_id,
        "Microsoft.Authorization/roleAssignments/write",
        &scope,
    )
    .await?
    {
        return Err(ServerError::graph(
            GraphKind::Forbidden,
            format!(
                "Insufficient privileges to complete the operation. The caller '{}' may not create applications: that needs 'Microsoft.Authorization/roleAssignments/write' on '{scope}'.",
                caller.object_id
            ),
        ));
    }
    drop(tx);
    let body = axum::body::to_bytes(req.into_body(), 256 * 1024)
        .await
        .map_err(|_| {
            ServerError::graph(
                GraphKind::TooLarge,
                "The request body is larger than 256 KiB.",
            )
        })?;
    let app: NewApp = crate::request::parse_body(&body).map_err(|e| match e {
        ServerError::InvalidRequestContent(m) => ServerError::graph(GraphKind::BadRequest, m),
        e => e,
    })?;
    let name = app.display_name.trim();
    if name.is_empty() || name.chars().count() > 256 {
        return Err(ServerError::graph(
            GraphKind::BadRequest,
            "displayName must be 1-256 characters.",
        ));
    }
    let mut certificates = vec![];
    for k in &app.key_credentials {
        let der = keyless_pki::pem_blocks(&k.key, "CERTIFICATE")
            .into_iter()
            .next()
            .or_else(|| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, k.key.trim()).ok())
            .filter(|d| keyless_pki::cert_rsa_public(d).is_some())
            .ok_or_else(|| ServerError::graph(
                GraphKind::BadRequest,
                "keyCredentials[].key must be an X.509 certificate with an RSA key (base64 DER or PEM).",
            ))?;
        certificates.push(der);
    }
    let secret = crate::util::new_client_secret();
    let sp = keyless_store::ServicePrincipalRecord {
        client_id: crate::util::new_guid(),
        object_id: crate::util::new_guid(),
        display_name: name.to_string(),
        secret_sha256: keyless_pki::sha256_hex(secret.as_bytes()),
        created: s.now(),
        certificates,
    };
    let mut tx = s.store.write("graph_create_application").await?;
    tx.put_service_principal(&sp).await?;
    tx.commit().await?;
    let keys: Vec<Value> = sp
        .certificates
        .iter()
        .map(|c| json!({"type": "AsymmetricX509Cert", "usage": "Verify", "customKeyIdentifier": hex::encode_upper(keyless_pki::sha1(c))}))
        .collect();
    Ok((
        axum::http::StatusCode::CREATED,
        Json(json!({
            "id": sp.object_id,
            "appId": sp.client_id,
            "displayName": sp.display_name,
            "passwordCredentials": [{"secretText": secret, "keyId": crate::util::new_guid()}],
            "keyCredentials": keys,
        })),
    ))
}
