//! Versions of ARM resources: the `ETag` of a single resource and the conditional writes
//! (`If-Match` / `If-None-Match`) checked against it, as the ARM resource provider contract
//! describes them ("ETags for Resources" in its addendum):
//!
//! | request | resource missing | resource exists |
//! |---|---|---|
//! | PUT `If-Match: *` | 412 | written |
//! | PUT `If-Match: "x"` | 412 | written when `"x"` is the current ETag, else 412 |
//! | PUT `If-None-Match: *` | created | 412 |
//! | PATCH `If-Match: *` or `"x"` | 404 (the handler's) | as PUT |
//! | DELETE `If-Match: *` or `"x"` | 204 (the handler's) | as PUT |
//!
//! `If-None-Match` with ETags (not `*`) refuses a write when the current ETag is one of them
//! (RFC 9110 §13.1.2). A refusal is `412` with ARM's error body, code `PreconditionFailed`
//! (the code and the mismatch wording of Microsoft.Compute, an RP that honours `If-Match`).
//!
//! The ETag is derived from the resource's stored state: a digest of its GET representation
//! (every object's keys in order), so nothing in the store carries a version and every
//! resource type has one. Two consequences: a write that leaves the representation as it was
//! keeps the ETag (nothing another writer read has changed), and the ETag of a resource is the
//! same on every replica. The ARM edge ([`crate::arm`]) computes it by running the resource's
//! own GET in the request's unit of work, after [`lock`] has locked the resource's row (or its
//! parent's): on PostgreSQL a second conditional writer waits there and then reads what the
//! first committed, so of two writers holding the same ETag only one passes.
//!
//! Besides the header, the body of a virtual machine or scale set carries the ETag as its
//! read-only `etag` property from api-version 2023-09-01 (Microsoft.Compute added it then:
//! [`registry::Provider::etag_in_body_since`]); the other types Keyless serves answer the
//! header only.

use crate::arm::registry;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::resource_id::{ArmPath, ResourceId};
use keyless_store::Tx;
use serde_json::{json, Value};

/// ARM's error code for a refused condition.
pub const PRECONDITION_FAILED: &str = "PreconditionFailed";
/// The message of a refused condition other than an ETag mismatch.
const NOT_MET: &str = "The condition specified using HTTP conditional header(s) is not met.";

/// One of `If-Match` / `If-None-Match`: `*`, or a list of entity tags as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tags {
    Any,
    List(Vec<String>),
}

impl Tags {
    /// Every value of header `name` (repeated headers and comma-separated lists), if sent.
    fn parse(headers: &HeaderMap, name: header::HeaderName) -> Option<Tags> {
        let mut list = vec![];
        let mut any = false;
        for v in headers.get_all(name) {
            for t in String::from_utf8_lossy(v.as_bytes()).split(',') {
                match t.trim() {
                    "" => {}
                    "*" => any = true,
                    t => list.push(t.to_string()),
                }
            }
        }
        if any {
            Some(Tags::Any)
        } else if list.is_empty() {
            None
        } else {
            Some(Tags::List(list))
        }
    }

    /// Whether `current` is one of the tags; `weak` compares without a `W/` prefix
    /// (If-None-Match), otherwise a weak tag never matches (If-Match, RFC 9110 §8.8.3.2).
    fn matches(&self, current: &str, weak: bool) -> bool {
        match self {
            Tags::Any => true,
            Tags::List(l) => l.iter().any(|t| {
                let (is_weak, opaque) = match t.strip_prefix("W/") {
                    Some(rest) => (true, rest),
                    None => (false, t.as_str()),
                };
                (weak || !is_weak) && unquote(opaque) == unquote(current)
            }),
        }
    }
}

/// An entity tag without its quotes (clients differ in whether they keep them).
fn unquote(t: &str) -> &str {
    let t = t.trim();
    t.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(t)
}

/// The conditions of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conditions {
    if_match: Option<Tags>,
    if_none_match: Option<Tags>,
}

impl Conditions {
    pub fn from_headers(headers: &HeaderMap) -> Conditions {
        Conditions {
            if_match: Tags::parse(headers, header::IF_MATCH),
            if_none_match: Tags::parse(headers, header::IF_NONE_MATCH),
        }
    }

    /// Whether the request carries no condition.
    pub fn is_empty(&self) -> bool {
        self.if_match.is_none() && self.if_none_match.is_none()
    }

    /// Whether the request wants the resource created only if it does not exist yet.
    fn creates_only(&self) -> bool {
        self.if_none_match.is_some()
    }

    /// The 412 answer when a write `method` must not run on a resource whose ETag is
    /// `current` (`None`: it does not exist); `None` when the write may go on (to the
    /// handler's own answer, e.g. 404 for a PATCH of nothing).
    pub fn refusal(&self, method: &Method, current: Option<&str>) -> Option<Response> {
        if let Some(want) = &self.if_match {
            match current {
                // PATCH and DELETE of nothing answer as without a condition (404 / 204)
                None if *method == Method::PUT => return Some(refused(NOT_MET.into())),
                None => {}
                Some(cur) if !want.matches(cur, false) => {
                    let sent = match want {
                        Tags::List(l) => l.join(", "),
                        Tags::Any => "*".into(),
                    };
                    return Some(refused(format!(
                        "Etag provided in if-match header {sent} does not match etag {cur} of resource."
                    )));
                }
                Some(_) => {}
            }
        }
        if let (Some(not), Some(cur)) = (&self.if_none_match, current) {
            if not.matches(cur, true) {
                return Some(refused(NOT_MET.into()));
            }
        }
        None
    }
}

fn refused(message: String) -> Response {
    (
        StatusCode::PRECONDITION_FAILED,
        Json(json!({"error": {"code": PRECONDITION_FAILED, "message": message}})),
    )
        .into_response()
}

/// Whether `path` names one resource that has a version: a resource group, a resource, or a
/// child resource (a scale set's instance, a federated credential, a pool, an extension) —
/// not a vault's `accessPolicies/{add|replace|remove}`, which is an operation.
pub fn versioned(path: &ArmPath) -> bool {
    match path {
        ArmPath::ResourceGroup { .. } | ArmPath::Resource(_) => true,
        ArmPath::Child { child_type, .. } => !child_type.eq_ignore_ascii_case("accessPolicies"),
        _ => false,
    }
}

/// The ETag (quoted) of a resource whose GET representation is `body`.
pub fn of(body: &Value) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    feed(&mut ctx, body);
    let digest = ctx.finish();
    format!("\"{}\"", hex::encode(&digest.as_ref()[..16]))
}

/// `v` in a canonical form: objects with their keys in order, whatever the map type.
fn feed(ctx: &mut aws_lc_rs::digest::Context, v: &Value) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            ctx.update(b"{");
            for k in keys {
                ctx.update(Value::String(k.clone()).to_string().as_bytes());
                ctx.update(b":");
                feed(ctx, &m[k]);
                ctx.update(b",");
            }
            ctx.update(b"}");
        }
        Value::Array(a) => {
            ctx.update(b"[");
            for i in a {
                feed(ctx, i);
                ctx.update(b",");
            }
            ctx.update(b"]");
        }
        scalar => ctx.update(scalar.to_string().as_bytes()),
    }
}

/// The table of the row (by `key`) whose lock serializes the writes of resource `rid` (and of
/// its children): its provider's [`registry::Provider::row`].
fn row_of(rid: &ResourceId) -> Option<&'static str> {
    registry::lookup(&rid.namespace, &rid.type_name).ok()?.row
}

/// Lock, for the rest of the write unit of work `tx`, the row that a conditional write of
/// `path` must hold before it reads the current ETag: the resource's own (a resource group's,
/// or a resource's), or for a child resource its parent's. When a resource's row does not
/// exist yet and the request creates only (`If-None-Match`), its resource group's row is
/// locked instead, so two such creations are one after the other. (Creating a resource
/// group itself has nothing to lock: two `If-None-Match: *` creations of one group racing on
/// PostgreSQL may both succeed.)
pub async fn lock(tx: &mut Tx, path: &ArmPath, c: &Conditions) -> keyless_store::Result<()> {
    let rg_row = |rg: &str| rg.to_ascii_lowercase();
    match path {
        ArmPath::ResourceGroup { resource_group, .. } => {
            tx.lock_row("resource_groups", "name_key", &rg_row(resource_group))
                .await?;
        }
        ArmPath::Resource(rid) => {
            if let Some(table) = row_of(rid) {
                let exists = tx.lock_row(table, "key", &rid.key()).await?;
                if !exists && c.creates_only() {
                    tx.lock_row("resource_groups", "name_key", &rg_row(&rid.resource_group))
                        .await?;
                }
            }
        }
        ArmPath::Child { parent, .. } => {
            if let Some(table) = row_of(parent) {
                tx.lock_row(table, "key", &parent.key()).await?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The body property that carries the ETag for `path` at api-version `version`, if any.
pub fn body_property(path: &ArmPath, version: &str) -> Option<&'static str> {
    let ArmPath::Resource(rid) = path else {
        return None;
    };
    let since = registry::lookup(&rid.namespace, &rid.type_name)
        .ok()?
        .etag_in_body_since?;
    (version >= since).then_some("etag")
}

/// `resp` (a success whose body is the resource as JSON) with its `ETag` header, and with the
/// ETag in the body when `property` says where.
pub async fn stamp(resp: Response, etag: &str, property: Option<&str>) -> Response {
    let (mut parts, body) = resp.into_parts();
    if let Ok(v) = HeaderValue::from_str(etag) {
        parts.headers.insert(header::ETAG, v);
    }
    let Some(property) = property else {
        return Response::from_parts(parts, body);
    };
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(_) => return Response::from_parts(parts, axum::body::Body::empty()),
    };
    let bytes = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(mut m)) => {
            m.insert(property.to_string(), Value::String(etag.to_string()));
            parts.headers.remove(header::CONTENT_LENGTH);
            serde_json::to_vec(&Value::Object(m)).map_or(bytes, Into::into)
        }
        _ => bytes,
    };
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conditions(pairs: &[(&str, &str)]) -> Conditions {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        Conditions::from_headers(&h)
    }

    fn status(r: Option<Response>) -> Option<u16> {
        r.map(|r| r.status().as_u16())
    }

    #[test]
    fn the_etag_follows_the_representation_not_its_key_order() {
        let a = json!({"id": "x", "tags": {"a": "1", "b": "2"}, "list": [1, 2]});
        let b: Value =
            serde_json::from_str(r#"{"list":[1,2],"tags":{"b":"2","a":"1"},"id":"x"}"#).unwrap();
        assert_eq!(of(&a), of(&b));
        assert_ne!(
            of(&a),
            of(&json!({"id": "x", "tags": {"a": "1"}, "list": [1, 2]}))
        );
        assert_ne!(
            of(&a),
            of(&json!({"id": "x", "tags": {"a": "1", "b": "2"}, "list": [2, 1]}))
        );
        // a string that looks like a nested object is not that object
        assert_ne!(of(&json!({"a": {"b": 1}})), of(&json!({"a": "{\"b\":1,}"})));
        let e = of(&a);
        assert!(
            e.starts_with('"') && e.ends_with('"') && e.len() == 34,
            "{e}"
        );
    }

    #[test]
    fn arm_semantics_of_if_match_and_if_none_match() {
        let cur = "\"abc\"";
        let (put, patch, delete) = (Method::PUT, Method::PATCH, Method::DELETE);
        let none = Conditions::default();
        assert!(none.is_empty());
        assert_eq!(status(none.refusal(&put, Some(cur))), None);
        // If-Match: * — any existing version; a PUT of nothing is refused, PATCH/DELETE go on
        let any = conditions(&[("if-match", "*")]);
        assert_eq!(status(any.refusal(&put, Some(cur))), None);
        assert_eq!(status(any.refusal(&put, None)), Some(412));
        assert_eq!(status(any.refusal(&patch, None)), None);
        assert_eq!(status(any.refusal(&delete, None)), None);
        // If-Match: "x" — only the current version, quoted or not, among others
        for ok in ["\"abc\"", "abc", "\"zzz\", \"abc\""] {
            let c = conditions(&[("if-match", ok)]);
            assert_eq!(status(c.refusal(&put, Some(cur))), None, "{ok}");
        }
        let split = conditions(&[("if-match", "\"zzz\""), ("if-match", "\"abc\"")]);
        assert_eq!(status(split.refusal(&patch, Some(cur))), None);
        for bad in ["\"abd\"", "W/\"abc\""] {
            let c = conditions(&[("if-match", bad)]);
            for m in [&put, &patch, &delete] {
                assert_eq!(status(c.refusal(m, Some(cur))), Some(412), "{bad} {m}");
            }
        }
        let stale = conditions(&[("if-match", "\"abd\"")]);
        assert_eq!(status(stale.refusal(&put, None)), Some(412));
        assert_eq!(status(stale.refusal(&delete, None)), None);
        // If-None-Match: * — create only
        let create = conditions(&[("if-none-match", "*")]);
        assert_eq!(status(create.refusal(&put, None)), None);
        assert_eq!(status(create.refusal(&put, Some(cur))), Some(412));
        // If-None-Match: "x" — anything but that version (weak comparison)
        let not = conditions(&[("if-none-match", "W/\"abc\"")]);
        assert_eq!(status(not.refusal(&put, Some(cur))), Some(412));
        assert_eq!(status(not.refusal(&put, Some("\"other\""))), None);
    }

    #[tokio::test]
    async fn a_refusal_is_arms_error_body() {
        let c = conditions(&[("if-match", "\"old\"")]);
        let r = c.refusal(&Method::PUT, Some("\"new\"")).unwrap();
        assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
        let b = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["code"], "PreconditionFailed");
        assert_eq!(
            v["error"]["message"],
            "Etag provided in if-match header \"old\" does not match etag \"new\" of resource."
        );
    }

    #[tokio::test]
    async fn a_vm_body_carries_the_etag_from_2023_09_01() {
        let vm = ArmPath::parse(
            "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/v",
        )
        .unwrap();
        let id = ArmPath::parse(
            "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/i",
        )
        .unwrap();
        assert_eq!(body_property(&vm, "2023-07-01"), None);
        assert_eq!(body_property(&vm, "2023-09-01"), Some("etag"));
        assert_eq!(body_property(&vm, "2024-11-01"), Some("etag"));
        assert_eq!(body_property(&id, "2023-01-31"), None);
        let resp = (StatusCode::CREATED, Json(json!({"name": "v"}))).into_response();
        let out = stamp(resp, "\"e1\"", Some("etag")).await;
        assert_eq!(out.status(), StatusCode::CREATED);
        assert_eq!(out.headers()[header::ETAG], "\"e1\"");
        let b = axum::body::to_bytes(out.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v, json!({"name": "v", "etag": "\"e1\""}));
    }
}
