//! The token service: OIDC discovery (v1 and v2), JWKS, and the token endpoints
//! (`/{tenant}/oauth2/v2.0/token`, `/{tenant}/oauth2/token`) for service principals.

pub mod client_assertion;
pub mod federation;

use self::federation::Client;
use crate::error::{Aadsts, Result, ServerError};
use crate::state::AppState;
use crate::tokens;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keyless_core::audience;
use keyless_core::claims::{resource_from_scope, Principal};
use keyless_ops::audit;
use serde_json::json;
use std::sync::Arc;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(discovery_v2),
        )
        .route(
            "/{tenant}/.well-known/openid-configuration",
            get(discovery_v1),
        )
        .route("/{tenant}/discovery/v2.0/keys", get(jwks))
        .route("/{tenant}/discovery/keys", get(jwks))
        .route("/{tenant}/oauth2/v2.0/token", post(audited_v2))
        .route("/{tenant}/oauth2/token", post(audited_v1))
        .route("/common/discovery/instance", get(instance_discovery))
}

/// Accept our tenant id (any case) and the `common`/`organizations` aliases for discovery.
fn check_tenant(state: &AppState, tenant: &str, allow_alias: bool) -> Result<()> {
    if tenant.eq_ignore_ascii_case(&state.tenant_id)
        || (allow_alias && matches!(tenant, "common" | "organizations"))
    {
        Ok(())
    } else {
        Err(ServerError::sts(Aadsts::InvalidRequestFormat,
            format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."),
        ))
    }
}

fn cached_json(body: serde_json::Value) -> Response {
    (
        [
            (header::CACHE_CONTROL, "max-age=86400, private"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        Json(body),
    )
        .into_response()
}

async fn discovery_v2(
    State(s): State<Arc<AppState>>,
    Path(tenant): Path<String>,
) -> Result<Response> {
    check_tenant(&s, &tenant, true)?;
    let (b, t) = (&s.base_url, &s.tenant_id);
    Ok(cached_json(json!({
        "token_endpoint": format!("{b}/{t}/oauth2/v2.0/token"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": format!("{b}/{t}/discovery/v2.0/keys"),
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": s.issuer_v2(),
        "request_uri_parameter_supported": false,
        "authorization_endpoint": format!("{b}/{t}/oauth2/v2.0/authorize"),
        "device_authorization_endpoint": format!("{b}/{t}/oauth2/v2.0/devicecode"),
        "end_session_endpoint": format!("{b}/{t}/oauth2/v2.0/logout"),
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "tid", "ver", "oid", "appid", "xms_mirid"],
        "tenant_region_scope": "WW",
        "cloud_instance_name": "keyless",
    })))
}

async fn discovery_v1(
    State(s): State<Arc<AppState>>,
    Path(tenant): Path<String>,
) -> Result<Response> {
    check_tenant(&s, &tenant, true)?;
    let (b, t) = (&s.base_url, &s.tenant_id);
    Ok(cached_json(json!({
        "token_endpoint": format!("{b}/{t}/oauth2/token"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": format!("{b}/{t}/discovery/keys"),
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
        "scopes_supported": ["openid"],
        "issuer": s.issuer_v1(),
        "authorization_endpoint": format!("{b}/{t}/oauth2/authorize"),
        "end_session_endpoint": format!("{b}/{t}/oauth2/logout"),
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "tid", "ver", "oid", "appid", "xms_mirid"],
        "microsoft_multi_refresh_token": true,
        "cloud_instance_name": "keyless",
    })))
}

/// MSAL's instance discovery, answered for our own host (MSAL asks Microsoft's host by default;
/// this serves clients pointed at Keyless for discovery).
async fn instance_discovery(
    State(s): State<Arc<AppState>>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<Response> {
    let q: Vec<(String, String)> =
        serde_urlencoded::from_str(q.as_deref().unwrap_or("")).unwrap_or_default();
    let endpoint = q
        .iter()
        .find(|(k, _)| k == "authorization_endpoint")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let host = s
        .base_url
        .split("://")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let Some(rest) = endpoint.strip_prefix(&s.base_url) else {
        return Err(ServerError::sts(
            Aadsts::UnknownInstance,
            "Unknown or invalid instance.",
        ));
    };
    let tenant = rest
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("common");
    Ok(Json(json!({
        "tenant_discovery_endpoint": format!("{}/{tenant}/v2.0/.well-known/openid-configuration", s.base_url),
        "api-version": "1.1",
        "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
    }))
    .into_response())
}

async fn jwks(State(s): State<Arc<AppState>>, Path(tenant): Path<String>) -> Result<Response> {
    check_tenant(&s, &tenant, true)?;
    Ok(cached_json(json!({ "keys": s.keys.jwks() })))
}

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Largest token request body accepted.
const MAX_FORM: usize = 64 * 1024;

fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>> {
    if body.len() > MAX_FORM {
        return Err(ServerError::sts(
            Aadsts::MissingParameter,
            "The request body is too large.",
        ));
    }
    serde_urlencoded::from_bytes(body).map_err(|_| {
        ServerError::sts(
            Aadsts::MissingParameter,
            "The request body must be application/x-www-form-urlencoded.",
        )
    })
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn require<'a>(form: &'a [(String, String)], name: &str) -> Result<&'a str> {
    field(form, name).ok_or_else(|| {
        ServerError::sts(
            Aadsts::MissingParameter,
            format!("The request body must contain the following parameter: '{name}'."),
        )
    })
}

/// Look `client_id` up, in one read of the store (ended before anything is fetched from an
/// external issuer): [`federation::find_client`], the lookup the readiness check shares.
async fn lookup_client(s: &AppState, client_id: &str) -> Result<Client> {
    let mut tx = s.store.read("sts_client").await?;
    federation::find_client(&mut tx, client_id).await
}

/// The client id a request names: HTTP Basic's, else the form's `client_id`.
fn client_id_of(form: &[(String, String)], basic: &Option<(String, String)>) -> Option<String> {
    match basic {
        Some((id, _)) => Some(id.clone()),
        None => field(form, "client_id").map(str::to_string),
    }
}

/// Look up the client the request names (one read, before anything else of the request is
/// checked, so the audit record `ev` tells an application's certificate assertion from a
/// federated one whatever the answer).
async fn resolve_client(
    s: &AppState,
    form: &[(String, String)],
    basic: &Option<(String, String)>,
    ev: &mut audit::TokenEvent,
) -> Result<Client> {
    let Some(id) = client_id_of(form, basic) else {
        return Ok(Client::Unknown);
    };
    let client = lookup_client(s, &id).await?;
    if matches!(client, Client::App(_)) && ev.kind == audit::TokenKind::Federated {
        // an application's certificate credential, not a federated assertion
        ev.kind = audit::TokenKind::ClientAssertion;
        ev.caller.assertion_verified = None;
    }
    Ok(client)
}

/// Authenticate the client of a client-credentials request (`client`, as
/// [`resolve_client`] found it); returns the principal. A federated assertion's issuer and
/// subject go into the audit record `ev` once its signature verified.
async fn authenticate_client(
    s: &AppState,
    form: &[(String, String)],
    basic: Option<(String, String)>,
    client: Client,
    ev: &mut audit::TokenEvent,
) -> Result<Principal> {
    let grant = require(form, "grant_type")?;
    if grant != "client_credentials" {
        return Err(ServerError::sts(
            Aadsts::UnsupportedGrantType,
            format!("The app requested an unsupported grant type '{grant}'."),
        ));
    }
    let (client_id, secret) = match (field(form, "client_id"), basic) {
        (_, Some((id, secret))) => (id, Some(secret)),
        (Some(id), None) => (
            id.to_string(),
            field(form, "client_secret").map(str::to_string),
        ),
        (None, None) => (require(form, "client_id")?.to_string(), None),
    };
    let not_found = || {
        ServerError::sts(
            Aadsts::UnknownClient,
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{}'.",
                s.tenant_id
            ),
        )
    };
    let assertion = field(form, "client_assertion");
    let sp = match client {
        Client::App(sp) => sp,
        Client::Unknown => return Err(not_found()),
        Client::Identity(identity, fics, patterns) => {
            let Some(assertion) = assertion else {
                return Err(ServerError::sts(Aadsts::CredentialRequired,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                ));
            };
            if field(form, "client_assertion_type") != Some(JWT_BEARER) {
                return Err(ServerError::sts(Aadsts::MissingParameter,
                    format!("The request body must contain the following parameter: 'client_assertion_type' with the value '{JWT_BEARER}'."),
                ));
            }
            return crate::sts::federation::exchange(
                s,
                &identity,
                &fics,
                &patterns,
                assertion,
                &mut ev.caller,
            )
            .await;
        }
    };
    match secret {
        Some(secret) => {
            let presented = keyless_pki::sha256(secret.as_bytes());
            let stored = hex_decode(&sp.secret_sha256);
            if aws_lc_rs::constant_time::verify_slices_are_equal(&presented, &stored).is_err() {
                return Err(ServerError::sts(Aadsts::InvalidClientSecret,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                ));
            }
        }
        None if assertion.is_some() => {
            if field(form, "client_assertion_type") != Some(JWT_BEARER) {
                return Err(ServerError::sts(Aadsts::MissingParameter,
                    format!("The request body must contain the following parameter: 'client_assertion_type' with the value '{JWT_BEARER}'."),
                ));
            }
            let (b, t) = (&s.base_url, &s.tenant_id);
            let urls = [
                format!("{b}/{t}/oauth2/v2.0/token"),
                format!("{b}/{t}/oauth2/token"),
            ];
            crate::sts::client_assertion::verify(s, &sp, assertion.unwrap_or_default(), &urls)?;
        }
        None => {
            return Err(ServerError::sts(Aadsts::CredentialRequired,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            ));
        }
    }
    Ok(Principal::ServicePrincipal {
        object_id: sp.object_id,
        client_id: sp.client_id,
    })
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

fn basic_auth(headers: &axum::http::HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v.strip_prefix("Basic ")?;
    let dec = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(dec).ok()?;
    let (id, secret) = s.split_once(':')?;
    let unesc = |x: &str| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("v={x}"))
            .ok()
            .and_then(|mut v| v.pop())
            .map(|(_, v)| v)
            .unwrap_or_else(|| x.to_string())
    };
    Some((unesc(id), unesc(secret)))
}

/// Echo at most this much of a refused scope / resource.
const ECHO_MAX: usize = 128;

fn echo(v: &str) -> String {
    let t: String = v.chars().take(ECHO_MAX).collect();
    if t.len() < v.len() {
        format!("{t}…")
    } else {
        t
    }
}

/// Entra's answer to a scope that is not `<absolute URI or GUID>/.default` of bounded length.
fn invalid_scope(scope: &str) -> ServerError {
    ServerError::sts(Aadsts::InvalidScope,
        format!(
            "The provided value for the input parameter 'scope' is not valid. The scope {} is not valid.",
            echo(scope)
        ),
    )
}

/// Entra's answer to a v1 `resource` it cannot resolve (here: one that is not an audience).
fn invalid_resource(resource: &str) -> ServerError {
    ServerError::sts(
        Aadsts::InvalidResource,
        format!(
            "The resource principal named {} was not found in the tenant named {}.",
            echo(resource),
            "this tenant"
        ),
    )
}

async fn token_v2(
    State(s): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
    ev: &mut audit::TokenEvent,
) -> Result<Response> {
    check_tenant(&s, &tenant, false)?;
    let form = parse_form(&body)?;
    let basic = basic_auth(&headers);
    let client = resolve_client(&s, &form, &basic, ev).await?;
    if field(&form, "resource").is_some() {
        return Err(ServerError::sts(
            Aadsts::InvalidResourceParameter,
            "The 'resource' request parameter is not supported.",
        ));
    }
    let scope = require(&form, "scope")?;
    // the audience rule first: nothing of a malformed scope reaches authentication
    if !audience::scope_well_formed(scope) {
        return Err(invalid_scope(scope));
    }
    let resource = resource_from_scope(scope).ok_or_else(|| {
        ServerError::sts(Aadsts::InvalidScopeValue,
            format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
        )
    })?;
    audience::check(resource).map_err(|_| invalid_scope(scope))?;
    let principal = authenticate_client(&s, &form, basic, client, ev).await?;
    let t = tokens::mint(&s, &principal, resource, s.cfg.sp_token_lifetime)?;
    let expires_in = t.expires_on.saturating_sub(s.now());
    Ok(Json(json!({
        "token_type": "Bearer",
        "expires_in": expires_in,
        "ext_expires_in": expires_in,
        "access_token": t.access_token,
    }))
    .into_response())
}

async fn token_v1(
    State(s): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
    ev: &mut audit::TokenEvent,
) -> Result<Response> {
    check_tenant(&s, &tenant, false)?;
    let form = parse_form(&body)?;
    let basic = basic_auth(&headers);
    let client = resolve_client(&s, &form, &basic, ev).await?;
    let resource = require(&form, "resource")?.to_string();
    audience::check(&resource).map_err(|_| invalid_resource(&resource))?;
    let principal = authenticate_client(&s, &form, basic, client, ev).await?;
    let t = tokens::mint(&s, &principal, &resource, s.cfg.sp_token_lifetime)?;
    let expires_in = t.expires_on.saturating_sub(s.now());
    Ok(Json(json!({
        "token_type": "Bearer",
        "expires_in": expires_in.to_string(),
        "ext_expires_in": expires_in.to_string(),
        "expires_on": t.expires_on.to_string(),
        "not_before": t.not_before.to_string(),
        "resource": resource,
        "access_token": t.access_token,
    }))
    .into_response())
}

// ------------------------------------------------------------------ audit

async fn audited_v2(
    State(s): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response> {
    let mut ev = token_event(&headers, &body, "scope");
    let r = token_v2(State(s.clone()), Path(tenant), headers, body, &mut ev).await;
    s.cfg.audit.token(finish(ev, &r)).await;
    r
}

async fn audited_v1(
    State(s): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response> {
    let mut ev = token_event(&headers, &body, "resource");
    let r = token_v1(State(s.clone()), Path(tenant), headers, body, &mut ev).await;
    s.cfg.audit.token(finish(ev, &r)).await;
    r
}

fn finish(ev: audit::TokenEvent, r: &Result<Response>) -> audit::TokenEvent {
    match r {
        Ok(_) => ev.issued(),
        Err(e) => {
            let (status, code) = e.status_and_code();
            ev.refused(status, code)
        }
    }
}

/// The audit record of a token request, from what it presents: the client id, the grant, the
/// audience (every string capped by the audit sink). Never the secret or the assertion; a
/// federated assertion's issuer and subject only once its signature verified
/// ([`crate::sts::federation::exchange`] fills them in). An assertion counts as federated until the
/// client turns out to be an application ([`resolve_client`] says so). A body over
/// [`MAX_FORM`] is not parsed (the request is refused as too large).
fn token_event(
    headers: &axum::http::HeaderMap,
    body: &[u8],
    audience_field: &str,
) -> audit::TokenEvent {
    let form: Vec<(String, String)> = if body.len() > MAX_FORM {
        Vec::new()
    } else {
        serde_urlencoded::from_bytes(body).unwrap_or_default()
    };
    let client_id = basic_auth(headers)
        .map(|(id, _)| id)
        .or_else(|| field(&form, "client_id").map(str::to_string));
    let assertion = field(&form, "client_assertion");
    let mut who = audit::Caller {
        client_id: client_id.clone(),
        ..Default::default()
    };
    let kind = match (assertion, &client_id) {
        (None, _) => audit::TokenKind::ClientCredentials,
        (Some(_), Some(_)) => {
            // a managed identity presenting an external token, unless the client is an
            // application: not verified until `federation::exchange` checked its signature
            // (then who vouched for whom)
            who.assertion_verified = Some(false);
            audit::TokenKind::Federated
        }
        (Some(_), None) => audit::TokenKind::ClientAssertion,
    };
    let mut ev = audit::TokenEvent::new(audit::Surface::Sts, kind, who);
    ev.identity.client_id = client_id;
    ev.audience = field(&form, audience_field).map(|a| {
        if audience_field == "scope" {
            resource_from_scope(a).unwrap_or(a).to_string()
        } else {
            a.to_string()
        }
    });
    ev
}
