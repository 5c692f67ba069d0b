//! ARM's cloud metadata, `GET /metadata/endpoints?api-version=…` (unauthenticated, as on
//! `management.azure.com`): the endpoints a client needs to treat this Keyless as a cloud.
//! `az cloud register --endpoint-resource-manager <server>` reads it (2022-09-01) to fill in
//! the login endpoint, the management audience, Graph and the Key Vault DNS suffix; older
//! clients ask older versions and get ARM's older shapes ([`shape`]).

use crate::state::AppState;
use axum::extract::{RawQuery, State};
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

/// The document shapes ARM answers, by api-version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `1.0` and dates before 2019-05-01 (msrestazure's 2015-01-01, go-autorest's and Azure
    /// Stack's `1.0`): `galleryEndpoint`, `graphEndpoint`, `portalEndpoint`,
    /// `authentication {loginEndpoint, audiences}`.
    Legacy,
    /// 2019-05-01 up to 2022-09-01 (`ARM_CLOUD_METADATA_URL`, the JavaScript samples'
    /// 2019-10-01, go-azure-helpers' 2020-06-01): an array of clouds, this one alone.
    Clouds,
    /// 2022-09-01 and later (az's), or none: this cloud alone.
    Single,
}

/// The shape of the document ARM answers to api-version `v` (dates compare as text).
fn shape(v: Option<&str>) -> Shape {
    match v {
        Some("1.0") => Shape::Legacy,
        Some(d) if d < "2019-05-01" => Shape::Legacy,
        Some(d) if d < "2022-09-01" => Shape::Clouds,
        _ => Shape::Single,
    }
}

async fn endpoints(State(s): State<Arc<AppState>>, RawQuery(q): RawQuery) -> Json<Value> {
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(q.as_deref().unwrap_or("")).unwrap_or_default();
    let version = query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("api-version"))
        .map(|(_, v)| v.as_str());
    Json(match shape(version) {
        Shape::Legacy => legacy(&s),
        Shape::Clouds => json!([cloud(&s)]),
        Shape::Single => cloud(&s),
    })
}

/// `https://{host}[:port]/`, the management audience clients ask tokens for.
fn audiences(s: &AppState) -> Value {
    json!([
        format!("{}/", s.base_url),
        "https://management.core.windows.net/"
    ])
}

/// The Key Vault DNS suffix clients append to a vault's name (`https://{vault}.{suffix}`):
/// the host part of [`AppState::vault_uri`] after the name, with the port when it is not
/// 443 — `az keyvault … --vault-name` builds its URL from it alone.
fn key_vault_dns(s: &AppState) -> String {
    let uri = s.vault_uri("v");
    uri.trim_start_matches("https://v.")
        .trim_end_matches('/')
        .to_string()
}

/// The 2022-09-01 document (one cloud).
fn cloud(s: &AppState) -> Value {
    let base = &s.base_url;
    json!({
        "name": "Keyless",
        "portal": base,
        "authentication": {
            "loginEndpoint": base,
            "audiences": audiences(s),
            "tenant": s.tenant_id,
            "identityProvider": "AAD",
        },
        "resourceManager": format!("{base}/"),
        "microsoftGraphResourceId": format!("{base}/"),
        "graph": format!("{base}/"),
        "graphAudience": format!("{base}/"),
        "gallery": format!("{base}/"),
        "suffixes": {
            "keyVaultDns": key_vault_dns(s),
        },
    })
}

/// What a template's `environment()` answers on this server: ARM's shape (`name`,
/// `resourceManager`, `authentication`, `suffixes.keyvaultDns` with its leading dot, so that
/// `concat('https://', name, environment().suffixes.keyvaultDns)` is a vault's URL here).
pub fn template_environment(s: &AppState) -> Value {
    let base = &s.base_url;
    json!({
        "name": "Keyless",
        "portal": base,
        "gallery": format!("{base}/"),
        "graph": format!("{base}/"),
        "graphAudience": format!("{base}/"),
        "resourceManager": format!("{base}/"),
        "authentication": {
            "loginEndpoint": format!("{base}/"),
            "audiences": audiences(s),
            "tenant": "common",
            "identityProvider": "AAD",
        },
        "suffixes": {
            "keyvaultDns": format!(".{}", key_vault_dns(s)),
        },
    })
}

/// The 2015-01-01 document. `loginEndpoint` without a trailing slash: msrestazure joins the
/// tenant to it with one.
fn legacy(s: &AppState) -> Value {
    let base = &s.base_url;
    json!({
        "galleryEndpoint": format!("{base}/"),
        "graphEndpoint": format!("{base}/"),
        "portalEndpoint": format!("{base}/"),
        "authentication": {
            "loginEndpoint": base,
            "audiences": audiences(s),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_api_version_gets_the_shape_arm_answers_it() {
        for (v, want) in [
            (Some("2015-01-01"), Shape::Legacy),
            (Some("1.0"), Shape::Legacy),
            (Some("2018-01-01"), Shape::Legacy),
            (Some("2019-05-01"), Shape::Clouds),
            (Some("2020-06-01"), Shape::Clouds),
            (Some("2022-09-01"), Shape::Single),
            (Some("2023-11-01"), Shape::Single),
            (None, Shape::Single),
        ] {
            assert_eq!(shape(v), want, "{v:?}");
        }
    }
}
