//! Small answers and request facts every part of the control plane shares (a leaf).

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// ARM's list shape: `{"value": [...]}`.
pub fn list(values: Vec<Value>) -> Response {
    Json(json!({ "value": values })).into_response()
}

/// ARM's answer to a DELETE: 200 when something was deleted, 204 when there was nothing.
pub fn deleted(found: bool) -> Response {
    if found {
        StatusCode::OK.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

/// A PUT's answer: 201 when it created the resource, 200 when it replaced it.
pub fn created_or_ok(created: bool, body: Value) -> Response {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

/// The RBAC verb of a method: read, write, delete or action.
pub fn verb(method: &Method) -> &'static str {
    match *method {
        Method::GET | Method::HEAD => "read",
        Method::DELETE => "delete",
        Method::POST => "action",
        _ => "write",
    }
}

/// Whether a method only reads.
pub fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// The fields of a tracked resource's PUT / PATCH body that a resource group and an identity
/// keep.
#[derive(Debug, Default, serde::Deserialize)]
pub struct TrackedBody {
    pub location: Option<String>,
    pub tags: Option<std::collections::BTreeMap<String, String>>,
}

/// `expiresInSeconds` of a join-token request (default one hour, at most a week).
pub fn join_ttl(body: &[u8]) -> crate::error::Result<u64> {
    #[derive(Default, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct JoinBody {
        expires_in_seconds: Option<u64>,
    }
    let b: JoinBody = if body.is_empty() {
        JoinBody::default()
    } else {
        crate::request::parse_body(body)?
    };
    let ttl = b.expires_in_seconds.unwrap_or(3600);
    if !(1..=7 * 86_400).contains(&ttl) {
        return Err(crate::error::ServerError::InvalidParameter {
            message: "expiresInSeconds must be between 1 and 604800.".into(),
            target: Some("expiresInSeconds".into()),
        });
    }
    Ok(ttl)
}

/// The answer to `generateJoinToken`.
pub fn join_token(token: &str, expires: u64, group: &str) -> Response {
    Json(json!({"joinToken": token, "expiresOn": expires, "vmResourceId": group})).into_response()
}
