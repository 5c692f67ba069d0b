//! Request helpers every surface shares: who the caller is (a bearer token of our token
//! service) and a JSON body read strictly. A leaf: it imports no context.

use crate::error::{Result, ServerError};
use crate::state::AppState;
use crate::tokens;
use axum::http::header;
use keyless_core::claims::JwtError;
use serde_json::Value;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub object_id: String,
    pub client_id: String,
}

/// Authenticate a bearer token from our token service for one of `audiences`.
pub fn authenticate_with(
    s: &AppState,
    headers: &axum::http::HeaderMap,
    audiences: &[String],
) -> Result<Caller> {
    let tenant_uri = format!("{}/{}", s.base_url, s.tenant_id);
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ServerError::AuthenticationMissing { tenant: tenant_uri });
    };
    let invalid = |m: &str| ServerError::InvalidAuthenticationToken {
        tenant: tenant_uri.clone(),
        message: m.to_string(),
    };
    let token =
        bearer(value).ok_or_else(|| invalid("The authentication scheme of Bearer is required."))?;
    let claims = tokens::verify(s, token, audiences).map_err(|e| match e {
        JwtError::Expired => ServerError::ExpiredAuthenticationToken(
            "The access token has expired. Acquire a new token and retry.".into(),
        ),
        JwtError::Audience(a) => invalid(&format!(
            "The access token has been obtained for wrong audience or resource '{a}'. It should exactly match with one of the allowed audiences '{}'.",
            s.management_audiences().join("','")
        )),
        JwtError::Issuer(i) => invalid(&format!(
            "The access token is from the wrong issuer '{i}'. It must match the tenant '{}' associated with this subscription.",
            s.issuer_v1()
        )),
        _ => invalid("The access token is invalid."),
    })?;
    let str_claim = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (object_id, client_id) = (str_claim("oid"), str_claim("appid"));
    if object_id.is_empty() {
        return Err(invalid(
            "The received access token is not valid: at least one of the claims 'puid' or 'altsecid' or 'oid' should be present.",
        ));
    }
    Ok(Caller {
        object_id,
        client_id,
    })
}

/// A JSON object body, refused in ARM's shape when empty, not JSON or not an object.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    if body.is_empty() {
        return Err(ServerError::InvalidRequestContent(
            "The request content is empty.".into(),
        ));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ServerError::InvalidRequestContent(e.to_string()))?;
    if !v.is_object() {
        return Err(ServerError::InvalidRequestContent(
            "The request content must be a JSON object.".into(),
        ));
    }
    serde_json::from_value(v).map_err(|e| ServerError::InvalidRequestContent(e.to_string()))
}

/// The token of an `Authorization: Bearer …` value (either case of the scheme), trimmed.
pub fn bearer(value: &axum::http::HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}
