//! The OIDC issuers Keyless serves for managed clusters (issue 15): a cluster with
//! `oidcIssuerProfile.enabled` has the issuer `{base_url}/oidc/{issuer id}/`, whose discovery
//! document and JWKS are served here from the keys the cluster's add-on published
//! (`managedClusters/publishServiceAccountKeys`). Federation resolves these issuers from the
//! store, never over HTTP.

use crate::state::AppState;
use axum::Router;
use serde_json::Value;
use std::sync::Arc;

/// The issuer id when `iss` is one of this server's cluster issuers (`{base_url}/oidc/{id}/`).
pub(crate) fn issuer_id_of(s: &AppState, iss: &str) -> Option<String> {
    let rest = iss.strip_prefix(s.base_url.as_str())?.strip_prefix("/oidc/")?;
    let id = rest.strip_suffix('/')?;
    (!id.is_empty() && !id.contains('/')).then(|| id.to_string())
}

/// The keys published for the issuer `id`; `Err` carries the reason (as a fetch failure of an
/// external issuer would).
pub(crate) async fn published_keys(_s: &AppState, _id: &str) -> Result<Vec<Value>, String> {
    Err("no keys published".into())
}

/// `GET /oidc/{id}/.well-known/openid-configuration` and `GET /oidc/{id}/openid/v1/jwks`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
