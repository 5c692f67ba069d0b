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
use keyless_store::Tx;
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
/// published, or its cluster deleted): the next exchange reads the store again. Other servers
/// never answer from keys of an issuer of theirs read more than a second ago
/// (`sts::federation`), so a key removed from the set, or a deleted cluster, stops verifying
/// there within that second.
pub(crate) fn forget_cached_keys(s: &AppState, iss: &str) {
    s.jwks.forget(iss);
}

/// What the store says of the issuer `id`.
enum Issuer {
    /// No such issuer, its cluster is gone, or the cluster no longer names it.
    Unknown,
    /// Served; the keys published so far (`None`: none yet).
    Served(Option<Vec<Value>>),
}

/// [`lookup_in`] in a read unit of work of its own (no other may be open in this task).
async fn lookup(s: &AppState, id: &str) -> Result<Issuer, keyless_store::StoreError> {
    let mut tx = s.store.read("oidc_issuer").await?;
    lookup_in(&mut tx, id).await
}

/// What the store says of the issuer `id`, read in `tx`: its row, and its cluster still naming it.
async fn lookup_in(tx: &mut Tx, id: &str) -> Result<Issuer, keyless_store::StoreError> {
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

/// The keys published for the issuer `id`, read in a unit of work of its own (for federation,
/// which holds none); `Err` carries the reason (as a fetch failure of an external issuer
/// would).
pub(crate) async fn published_keys(s: &AppState, id: &str) -> Result<Vec<Value>, String> {
    keys_of(lookup(s, id).await)
}

/// [`published_keys`] read in the caller's unit of work `tx` (a request that already holds
/// one, as an ARM action does: a second would take another connection from the pool). A store
/// error is the outer `Err` (the caller's unit of work failed with it, and its request
/// answers as any store error does), not a reason.
pub(crate) async fn published_keys_in(
    tx: &mut Tx,
    id: &str,
) -> Result<Result<Vec<Value>, String>, keyless_store::StoreError> {
    Ok(keys_of(Ok(lookup_in(tx, id).await?)))
}

fn keys_of(found: Result<Issuer, keyless_store::StoreError>) -> Result<Vec<Value>, String> {
    match found {
        Err(e) => Err(format!("the issuer's keys could not be read: {e}")),
        Ok(Issuer::Unknown) => Err("the issuer is not known or not enabled".into()),
        Ok(Issuer::Served(None)) => Err("no keys published".into()),
        Ok(Issuer::Served(Some(keys))) => Ok(keys),
    }
}

/// `id_token_signing_alg_values_supported` of the issuer whose keys are `keys`: RS256 for an
/// RSA key, ES256 for an EC P-256 key (the kinds a publish accepts and federation verifies),
/// in that order; RS256 when there are none (the API server's default).
fn signing_algs(keys: &[Value]) -> Vec<&'static str> {
    let rsa = keys.iter().any(|k| k["kty"] == "RSA");
    let ec = keys.iter().any(|k| k["kty"] == "EC" && k["crv"] == "P-256");
    match (rsa, ec) {
        (_, false) => vec!["RS256"],
        (false, true) => vec!["ES256"],
        (true, true) => vec!["RS256", "ES256"],
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
        Ok(Issuer::Served(keys)) => {
            let algs = signing_algs(keys.as_deref().unwrap_or_default());
            let iss = issuer_url(&s, &id);
            cacheable(json!({
                "issuer": iss,
                "jwks_uri": format!("{iss}openid/v1/jwks"),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": algs,
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
