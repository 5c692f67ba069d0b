//! The OIDC issuers Keyless serves for managed clusters (issue 15): a cluster with
//! `oidcIssuerProfile.enabled` has the issuer `{base_url}/oidc/{issuer id}/`, whose discovery
//! document and JWKS are served here from the keys the cluster's add-on published
//! (`managedClusters/publishServiceAccountKeys`). Federation resolves these issuers from the
//! store, never over HTTP.
//!
//! An issuer is served while the cluster that made it exists and still names it (its
//! `oidcIssuerProfile` keeps the issuer id): an unknown id, or one whose cluster is gone, is
//! 404. Both documents are public (as AKS's, which relying parties fetch without credentials)
//! and cacheable for a minute.

use crate::error::ServerError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use keyless_core::aks;
use serde_json::{json, Value};
use std::sync::Arc;

/// `Cache-Control` of the discovery document and the JWKS: a relying party refetches on an
/// unknown `kid` anyway, and a rotation publishes the new key before the API server signs
/// with it.
const CACHE_CONTROL: &str = "public, max-age=60";

/// The issuer id when `iss` is one of this server's cluster issuers (`{base_url}/oidc/{id}/`).
pub(crate) fn issuer_id_of(s: &AppState, iss: &str) -> Option<String> {
    let rest = iss
        .strip_prefix(s.base_url.as_str())?
        .strip_prefix("/oidc/")?;
    let id = rest.strip_suffix('/')?;
    (!id.is_empty() && !id.contains('/')).then(|| id.to_string())
}

/// The issuer URL of the issuer id `id`: `{base_url}/oidc/{id}/` (with the trailing slash).
pub(crate) fn issuer_url(s: &AppState, id: &str) -> String {
    format!("{}/oidc/{id}/", s.base_url)
}

/// Forget what this server's federation cache holds of the issuer `iss` (its keys were just
/// published): the next exchange reads them again. Other servers re-read within their
/// re-fetch interval of an issuer of theirs (a second).
pub(crate) fn forget_cached_keys(s: &AppState, iss: &str) {
    let entry = s.jwks.entry(iss);
    let mut st = entry.state.lock().unwrap_or_else(|p| p.into_inner());
    st.fetched = None;
}

/// What the store says of the issuer `id`.
enum Issuer {
    /// No such issuer, its cluster is gone, or the cluster no longer names it.
    Unknown,
    /// Served; the keys published so far (`None`: none yet).
    Served(Option<Vec<Value>>),
}

async fn lookup(s: &AppState, id: &str) -> Result<Issuer, keyless_store::StoreError> {
    let mut tx = s.store.read("oidc_issuer").await?;
    let Some(rec) = tx.get_oidc_issuer(id).await? else {
        return Ok(Issuer::Unknown);
    };
    let Some(cluster) = tx.get_cluster(&rec.cluster_key).await? else {
        return Ok(Issuer::Unknown);
    };
    if aks::stored_issuer_id(&cluster.properties) != Some(id) {
        return Ok(Issuer::Unknown);
    }
    Ok(Issuer::Served(rec.keys))
}

/// The keys published for the issuer `id`; `Err` carries the reason (as a fetch failure of an
/// external issuer would).
pub(crate) async fn published_keys(s: &AppState, id: &str) -> Result<Vec<Value>, String> {
    match lookup(s, id).await {
        Err(e) => Err(format!("the issuer's keys could not be read: {e}")),
        Ok(Issuer::Unknown) => Err("the issuer is not known or not enabled".into()),
        Ok(Issuer::Served(None)) => Err("no keys published".into()),
        Ok(Issuer::Served(Some(keys))) => Ok(keys),
    }
}

/// 404 in ARM's shape, as for any path not served: an issuer id that is unknown, or whose
/// cluster is gone, is no path of this server.
fn not_found(id: &str, tail: &str) -> Response {
    ServerError::InvalidPath(format!("/oidc/{id}/{tail}")).into_response()
}

fn cacheable(v: Value) -> Response {
    ([(header::CACHE_CONTROL, CACHE_CONTROL)], Json(v)).into_response()
}

/// `GET /oidc/{id}/.well-known/openid-configuration`.
async fn discovery(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match lookup(&s, &id).await {
        Err(e) => ServerError::from(e).into_response(),
        Ok(Issuer::Unknown) => not_found(&id, ".well-known/openid-configuration"),
        Ok(Issuer::Served(_)) => {
            let iss = issuer_url(&s, &id);
            cacheable(json!({
                "issuer": iss,
                "jwks_uri": format!("{iss}openid/v1/jwks"),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }))
        }
    }
}

/// `GET /oidc/{id}/openid/v1/jwks`: `{"keys": [...]}` (empty before the first publish).
async fn jwks(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match lookup(&s, &id).await {
        Err(e) => ServerError::from(e).into_response(),
        Ok(Issuer::Unknown) => not_found(&id, "openid/v1/jwks"),
        Ok(Issuer::Served(keys)) => cacheable(json!({"keys": keys.unwrap_or_default()})),
    }
}

/// `GET /oidc/{id}/.well-known/openid-configuration` and `GET /oidc/{id}/openid/v1/jwks`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/oidc/{id}/.well-known/openid-configuration",
            get(discovery),
        )
        .route("/oidc/{id}/openid/v1/jwks", get(jwks))
}
