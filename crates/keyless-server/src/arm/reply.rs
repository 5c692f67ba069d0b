//! Small answers and request facts every part of the control plane shares (a leaf).

use crate::error::{Result, ServerError};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use keyless_core::resource_id::ArmPath;
use serde_json::{json, Value};

/// ARM's list shape: `{"value": [...], "nextLink"?}`. The answer leaves the unit of work
/// unpaged; [`Page::answer`] (once, at the edge, where the request's URL is known) cuts the
/// page the request asks for.
pub fn list(values: Vec<Value>) -> Response {
    let mut resp = StatusCode::OK.into_response();
    resp.extensions_mut().insert(Unpaged(values));
    resp
}

/// Every item of a list answer, before paging.
#[derive(Clone)]
struct Unpaged(Vec<Value>);

/// Page sizes of the control plane's lists: how many items a page holds before `nextLink`.
pub mod page_size {
    /// `/subscriptions/{s}[/resourceGroups/{rg}]/resources`: ARM's own list, 1,000 a page (the
    /// most `$top` gives too).
    pub const GENERIC_RESOURCES: usize = 1000;
    /// `/subscriptions/{s}/resourcegroups` and `/subscriptions`: ARM's own lists, as the
    /// generic one.
    pub const RESOURCE_GROUPS: usize = 1000;
    /// Every other list (a provider's collection, a resource's children, role assignments and
    /// definitions): the providers do not publish theirs.
    pub const DEFAULT: usize = 100;
}

/// The page of a list request: where the client called (for `nextLink`), its query
/// (`$skiptoken`, `$top`) and the list's page size.
pub struct Page {
    origin: String,
    path: String,
    query: Vec<(String, String)>,
    size: usize,
}

impl Page {
    /// The page a request for `path` asks for. `origin` is `https://{host}` as the client
    /// called (its `Host`), or `fallback` (the server's public URL) when that is no host name.
    pub fn of(
        host: Option<&str>,
        fallback: &str,
        path: &str,
        query: &[(String, String)],
        arm: &ArmPath,
    ) -> Page {
        let origin = match host.filter(|h| is_authority(h)) {
            Some(h) => format!("https://{h}"),
            None => fallback.trim_end_matches('/').to_string(),
        };
        let size = match arm {
            ArmPath::GenericResources { .. } => page_size::GENERIC_RESOURCES,
            ArmPath::ResourceGroups { .. } | ArmPath::Subscriptions => page_size::RESOURCE_GROUPS,
            _ => page_size::DEFAULT,
        };
        Page {
            origin,
            path: path.to_string(),
            query: query.to_vec(),
            size,
        }
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `resp` itself, or, for a [`list`] answer, its page: the items in the order of their ids
    /// (case-insensitive) after the `$skiptoken`'s, at most the page size (or `$top`), with a
    /// `nextLink` to the rest (the request's own query, the token replaced).
    pub fn answer(&self, mut resp: Response) -> Result<Response> {
        let Some(Unpaged(mut items)) = resp.extensions_mut().remove::<Unpaged>() else {
            return Ok(resp);
        };
        let bad = |name: &str, v: &str| ServerError::InvalidParameter {
            message: format!("The value '{v}' of '{name}' is not valid."),
            target: Some(name.to_string()),
        };
        let size = match self.param("$top") {
            None => self.size,
            Some(t) => match t.parse::<usize>() {
                Ok(n) if n >= 1 => n.min(self.size),
                _ => return Err(bad("$top", t)),
            },
        };
        let after = match self.param("$skiptoken") {
            None => None,
            Some(t) => Some(
                URL_SAFE_NO_PAD
                    .decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| bad("$skiptoken", t))?,
            ),
        };
        let key = |v: &Value| v["id"].as_str().unwrap_or_default().to_ascii_lowercase();
        items.sort_by_cached_key(key);
        if let Some(after) = &after {
            let first = items.partition_point(|v| key(v) <= *after);
            items.drain(..first);
        }
        let mut body = json!({});
        if items.len() > size {
            items.truncate(size);
            let token = URL_SAFE_NO_PAD.encode(key(&items[size - 1]));
            let mut params: Vec<(&str, String)> = self
                .query
                .iter()
                .filter(|(k, _)| !k.eq_ignore_ascii_case("$skiptoken"))
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            params.push(("$skiptoken", token));
            body["nextLink"] = json!(next_link(&self.origin, &self.path, &params));
        }
        body["value"] = Value::Array(items);
        Ok(Json(body).into_response())
    }
}

/// The `nextLink` of a list: `{origin}{path}?{params}` (the Activity Log's too).
pub fn next_link(origin: &str, path: &str, params: &[(&str, String)]) -> String {
    let qs = serde_urlencoded::to_string(params).unwrap_or_default();
    format!("{origin}{path}?{qs}")
}

/// Whether `h` is a host name or address with an optional port, nothing else (no user
/// information, path or spaces), so it can be written into a URL.
fn is_authority(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 261
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
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
pub fn join_ttl(body: &[u8]) -> Result<u64> {
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
        return Err(ServerError::InvalidParameter {
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
