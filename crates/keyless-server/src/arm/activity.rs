//! The Activity Log: the one hook every control-plane write passes through ([`record`], called
//! by [`crate::arm`] once per PUT/PATCH/DELETE/POST with the answer's status), and the ARM list
//! `GET /subscriptions/{s}/providers/Microsoft.Insights/eventtypes/management/values` in
//! EventData shapes. The operation names and the `$filter` grammar are
//! `keyless_core::activity_log`.

use crate::authz;
use crate::error::{Result, ServerError};
use crate::request::Caller;
use crate::state::AppState;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::activity_log::{self as al, Operation};
use keyless_store::{ActivityQuery, ActivityRecord, Tx};
use serde_json::{json, Map, Value};

/// One control-plane write, as answered. Holds no token, secret or request body.
#[derive(Debug, Clone)]
pub struct WriteEvent {
    /// Object id of the authenticated caller.
    pub caller_object_id: String,
    /// Application (client) id of the caller (`appid`), empty when the token has none.
    pub caller_app_id: String,
    /// The authorization action and the resource it is on.
    pub operation: Operation,
    /// `PUT`, `PATCH`, `DELETE` or `POST`.
    pub method: String,
    /// Status of the answer sent to the client.
    pub http_status: u16,
    /// `x-ms-correlation-request-id` (the client's, or the one generated for the request).
    pub correlation_id: String,
    /// The client's `x-ms-client-request-id`, when sent.
    pub client_request_id: Option<String>,
    /// When the write was answered, microseconds since the epoch.
    pub timestamp: i64,
}

impl WriteEvent {
    /// The event of a write by `caller` answered with `http_status`, stamped now; `request_id`
    /// is the id the request layer gave the request (`keyless_ops::request::RequestId`).
    pub fn new(
        caller: &Caller,
        operation: Operation,
        method: &str,
        http_status: u16,
        headers: &HeaderMap,
        request_id: Option<&str>,
    ) -> Self {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && v.len() <= 200)
                .map(str::to_string)
        };
        Self {
            caller_object_id: caller.object_id.clone(),
            caller_app_id: caller.client_id.clone(),
            operation,
            method: method.to_string(),
            http_status,
            correlation_id: correlation_id(headers, request_id),
            client_request_id: header("x-ms-client-request-id"),
            timestamp: now_micros(),
        }
    }
}

/// The request's correlation id, the one its answer carries in `x-ms-correlation-request-id`:
/// the client's (a short printable id, the rule of `keyless_ops::request`), else the request id.
pub fn correlation_id(headers: &HeaderMap, request_id: Option<&str>) -> String {
    headers
        .get("x-ms-correlation-request-id")
        .map(|v| v.as_bytes())
        .filter(|b| !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()))
        .and_then(|b| std::str::from_utf8(b).ok())
        .or(request_id)
        .map(str::to_string)
        .unwrap_or_else(crate::util::new_guid)
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The hook: record one control-plane write. A failure to record is logged, never turned into
/// an answer (the write itself already happened). The record is appended in a unit of work of
/// its own, after the request's has ended, so a write that failed (and rolled back) is recorded
/// too. Awaited by the request before its answer leaves, like every audit record: nothing is
/// left to a detached task the runtime may drop.
pub async fn record(s: &AppState, e: &WriteEvent) {
    let (status, _, _) = al::outcome(e.http_status);
    let op = &e.operation;
    let rec = ActivityRecord {
        seq: 0,
        event_id: crate::util::new_guid(),
        timestamp: e.timestamp,
        subscription: op.subscription.clone(),
        resource_group: op.resource_group.clone(),
        resource_id: op.resource_id.clone(),
        resource_provider: op.provider.clone(),
        resource_type: op.resource_type.clone(),
        operation: op.name.clone(),
        status: status.to_string(),
        http_status: e.http_status,
        correlation_id: e.correlation_id.clone(),
        caller: e.caller_object_id.clone(),
        caller_app_id: e.caller_app_id.clone(),
        method: e.method.clone(),
        client_request_id: e.client_request_id.clone(),
        client_ip: None,
    };
    let purge_before = e.timestamp - al::RETENTION_DAYS * al::DAY_MICROS;
    let appended = async {
        let mut tx = s.store.write("activity_append").await?;
        tx.append_activity(&rec, purge_before).await?;
        tx.commit().await
    };
    if let Err(err) = appended.await {
        tracing::warn!(error = %err, operation = %op.name, "activity log append failed");
    }
    // the same write in the audit trail (the writer appends it; see keyless_ops::audit)
    let ev = keyless_ops::audit::ControlPlaneEvent {
        caller: keyless_ops::audit::Caller {
            object_id: Some(e.caller_object_id.clone()),
            client_id: Some(e.caller_app_id.clone()).filter(|a| !a.is_empty()),
            ..Default::default()
        },
        operation: op.name.clone(),
        resource_id: op.resource_id.clone(),
        status: e.http_status,
        result: status.to_string(),
        correlation_id: Some(e.correlation_id.clone()),
        reason: None,
    };
    s.cfg.audit.control_plane(ev, &op.metric_label()).await;
}

/// A `$filter` / `$select` / `$skipToken` the list refuses: 400 in the service's flat
/// `{"code","message"}` shape.
fn bad_request(message: String) -> ServerError {
    ServerError::InsightsBadRequest(message)
}

/// `GET …/providers/Microsoft.Insights/eventtypes/management/values`, in the request's unit of
/// work `tx`.
pub async fn list(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    subscription: &str,
    query: &[(String, String)],
) -> Result<Response> {
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    crate::arm::resources::check_subscription(s, subscription)?;
    let now = now_micros();
    let filter =
        al::parse_filter(param("$filter").unwrap_or(""), now).map_err(|e| bad_request(e.0))?;
    let select = al::parse_select(param("$select")).map_err(|e| bad_request(e.0))?;
    let after = match param("$skipToken") {
        None => None,
        Some(t) => Some(
            t.parse::<u64>()
                .map_err(|_| bad_request(format!("The $skipToken '{t}' is not valid.")))?,
        ),
    };
    // reading a group's or a resource's events needs the right there; the subscription's, at
    // the subscription
    let scope = match (&filter.resource_id, &filter.resource_group) {
        (Some(r), _) => r.clone(),
        (None, Some(g)) => format!("/subscriptions/{subscription}/resourceGroups/{g}"),
        (None, None) => format!("/subscriptions/{subscription}"),
    };
    authz::check(
        tx,
        &caller.object_id,
        "Microsoft.Insights/eventtypes/values/read",
        &scope,
    )
    .await?;
    let q = ActivityQuery {
        subscription: subscription.to_string(),
        filter: filter.clone(),
        after,
        limit: al::PAGE_SIZE + 1,
    };
    let mut events = tx.list_activity(&q).await?;
    let more = events.len() > al::PAGE_SIZE;
    events.truncate(al::PAGE_SIZE);
    let value: Vec<Value> = events
        .iter()
        .map(|e| select_fields(event_json(s, e), select.as_deref()))
        .collect();
    let mut body = json!({ "value": value });
    if let (true, Some(last)) = (more, events.last()) {
        let mut params: Vec<(&str, String)> = vec![("api-version", al::API_VERSIONS[0].into())];
        if let Some(f) = param("$filter") {
            params.push(("$filter", f.to_string()));
        }
        if let Some(sel) = param("$select") {
            params.push(("$select", sel.to_string()));
        }
        params.push(("$skipToken", last.seq.to_string()));
        let path = format!(
            "/subscriptions/{subscription}/providers/Microsoft.Insights/eventtypes/management/values"
        );
        body["nextLink"] = json!(crate::arm::reply::next_link(&s.base_url, &path, &params));
    }
    Ok(Json(body).into_response())
}

fn localizable(v: &str) -> Value {
    json!({ "value": v, "localizedValue": v })
}

/// An event in the EventData shape.
fn event_json(s: &AppState, e: &ActivityRecord) -> Value {
    let (status, sub_status, level) = al::outcome(e.http_status);
    let ts = al::format_time(e.timestamp);
    let mut claims = Map::new();
    claims.insert(
        "http://schemas.microsoft.com/identity/claims/objectidentifier".into(),
        json!(e.caller),
    );
    claims.insert(
        "http://schemas.microsoft.com/identity/claims/tenantid".into(),
        json!(s.tenant_id),
    );
    if !e.caller_app_id.is_empty() {
        claims.insert("appid".into(), json!(e.caller_app_id));
    }
    let mut http = json!({ "method": e.method });
    if let Some(c) = &e.client_request_id {
        http["clientRequestId"] = json!(c);
    }
    if let Some(ip) = &e.client_ip {
        http["clientIpAddress"] = json!(ip);
    }
    json!({
        "authorization": { "action": e.operation, "scope": e.resource_id },
        "caller": e.caller,
        "channels": "Operation",
        "claims": claims,
        "correlationId": e.correlation_id,
        "description": "",
        "eventDataId": e.event_id,
        "eventName": { "value": "EndRequest", "localizedValue": "End request" },
        "category": { "value": "Administrative", "localizedValue": "Administrative" },
        "eventTimestamp": ts,
        "id": format!("{}/events/{}/ticks/{}", e.resource_id, e.event_id, al::ticks(e.timestamp)),
        "level": level,
        "operationId": e.correlation_id,
        "operationName": localizable(&e.operation),
        "resourceGroupName": e.resource_group.clone().unwrap_or_default(),
        "resourceProviderName": localizable(&e.resource_provider),
        "resourceType": localizable(&e.resource_type),
        "resourceId": e.resource_id,
        "status": localizable(status),
        "subStatus": {
            "value": sub_status,
            "localizedValue": if sub_status.is_empty() { String::new() } else { format!("{sub_status} (HTTP Status Code: {})", e.http_status) },
        },
        "submissionTimestamp": ts,
        "subscriptionId": e.subscription,
        "tenantId": s.tenant_id,
        "httpRequest": http,
        "properties": {
            "statusCode": sub_status,
            "eventCategory": "Administrative",
            "entity": e.resource_id,
            "message": e.operation,
            "hierarchy": format!("{}/{}", s.tenant_id, e.subscription),
        },
    })
}

fn select_fields(v: Value, select: Option<&[&str]>) -> Value {
    match (select, v) {
        (Some(names), Value::Object(mut m)) => {
            let mut out = Map::new();
            for n in names {
                if let Some(x) = m.remove(*n) {
                    out.insert((*n).to_string(), x);
                }
            }
            Value::Object(out)
        }
        (_, v) => v,
    }
}
