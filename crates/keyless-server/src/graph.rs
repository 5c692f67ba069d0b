//! A small Microsoft Graph-shaped directory read: `GET /v1.0/servicePrincipals/{id}` and
//! `GET /v1.0/servicePrincipals?$filter=appId eq '…'` (or `id eq '…'`), so tools can resolve an
//! assignee given by client id to its object id, as `az role assignment create --assignee` does.

use crate::arm::authenticate_with;
use crate::error::{Result, ServerError};
use crate::state::AppState;
use axum::extract::{Path, Request, State};
use axum::routing::get;
use axum::{Json, Router};
use keyless_store::{DirectoryEntry, PrincipalKind};
use serde_json::{json, Value};
use std::sync::Arc;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1.0/servicePrincipals", get(list))
        .route("/v1.0/servicePrincipals/{id}", get(one))
}

fn audiences(s: &AppState) -> Vec<String> {
    let mut a = s.management_audiences();
    a.extend([
        "https://graph.microsoft.com".to_string(),
        "https://graph.microsoft.com/".to_string(),
    ]);
    a
}

fn entry_json(e: &DirectoryEntry) -> Value {
    json!({
        "id": e.object_id,
        "appId": e.app_id,
        "displayName": e.display_name,
        "servicePrincipalType": match e.kind { PrincipalKind::ManagedIdentity => "ManagedIdentity", PrincipalKind::ServicePrincipal => "Application" },
        "alternativeNames": e.resource_id.iter().collect::<Vec<_>>(),
        "accountEnabled": true,
    })
}

fn not_found(id: &str) -> ServerError {
    ServerError::host(404, "Request_ResourceNotFound", format!("Resource '{id}' does not exist or one of its queried reference-property objects are not present."))
}

async fn one(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Json<Value>> {
    authenticate_with(&s, req.headers(), &audiences(&s))?;
    let e = s
        .store
        .directory_lookup(&id)?
        .filter(|e| e.object_id.eq_ignore_ascii_case(&id))
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(entry_json(&e)))
}

async fn list(State(s): State<Arc<AppState>>, req: Request) -> Result<Json<Value>> {
    authenticate_with(&s, req.headers(), &audiences(&s))?;
    let q: Vec<(String, String)> =
        serde_urlencoded::from_str(req.uri().query().unwrap_or("")).unwrap_or_default();
    let filter = q
        .iter()
        .find(|(k, _)| k == "$filter")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let lower = filter.to_ascii_lowercase();
    let quoted = || {
        let a = filter.find('\'')? + 1;
        let b = filter[a..].find('\'')? + a;
        Some(filter[a..b].to_string())
    };
    let value = match (
        lower.starts_with("appid eq") || lower.starts_with("id eq"),
        quoted(),
    ) {
        (true, Some(v)) => {
            let by_app = lower.starts_with("appid");
            s.store
                .directory_lookup(&v)?
                .filter(|e| {
                    if by_app {
                        e.app_id.eq_ignore_ascii_case(&v)
                    } else {
                        e.object_id.eq_ignore_ascii_case(&v)
                    }
                })
                .map(|e| vec![entry_json(&e)])
                .unwrap_or_default()
        }
        _ => {
            return Err(ServerError::host(
                400,
                "Request_UnsupportedQuery",
                "Only $filter=appId eq '…' or id eq '…' is supported.",
            ));
        }
    };
    Ok(Json(json!({ "value": value })))
}
