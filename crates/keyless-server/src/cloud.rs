//! ARM's cloud metadata, `GET /metadata/endpoints?api-version=…` (unauthenticated, as on
//! `management.azure.com`): the endpoints a client needs to treat this Keyless as a cloud.
//! `az cloud register --endpoint-resource-manager <server>` reads it to fill in the login
//! endpoint, the management audience, Graph and the Key Vault DNS suffix.

use crate::state::AppState;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/metadata/endpoints", get(endpoints))
        // `az cloud register --endpoint-resource-manager https://host/` (with its trailing
        // slash, as the seeds write it) asks for `//metadata/endpoints`
        .route("//metadata/endpoints", get(endpoints))
}

/// The 2022-09-01 (single cloud) shape; every api-version gets it, as clients only read
/// fields they know.
async fn endpoints(State(s): State<Arc<AppState>>) -> Json<Value> {
    let base = &s.base_url;
    Json(json!({
        "name": "Keyless",
        "portal": base,
        "authentication": {
            "loginEndpoint": base,
            "audiences": [format!("{base}/"), "https://management.core.windows.net/"],
            "tenant": s.tenant_id,
            "identityProvider": "AAD",
        },
        "resourceManager": format!("{base}/"),
        "microsoftGraphResourceId": format!("{base}/"),
        "graph": format!("{base}/"),
        "graphAudience": format!("{base}/"),
        "suffixes": {
            "keyVaultDns": format!("vault.{}", s.cfg.vault_domain),
        },
    }))
}
