//! Activity Log persistence: one row per control-plane write, listed newest first by
//! subscription and time window, kept for a bounded time.

use serde::{Deserialize, Serialize};

/// One control-plane write as the Activity Log keeps it. Never holds a token, secret or body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityRecord {
    /// Append order (assigned by the store; 0 when appending).
    #[serde(skip)]
    pub seq: u64,
    /// `eventDataId` (a GUID).
    pub event_id: String,
    /// When the write was answered, microseconds since the epoch.
    pub timestamp: i64,
    pub subscription: String,
    /// Resource group of the resource, when it is in one (as the request spelled it).
    pub resource_group: Option<String>,
    /// Canonical resource id.
    pub resource_id: String,
    /// `Microsoft.ManagedIdentity`.
    pub resource_provider: String,
    /// `Microsoft.ManagedIdentity/userAssignedIdentities`.
    pub resource_type: String,
    /// The authorization action, e.g. `Microsoft.ManagedIdentity/userAssignedIdentities/write`.
    pub operation: String,
    /// `Succeeded`, `Accepted` or `Failed`.
    pub status: String,
    pub http_status: u16,
    pub correlation_id: String,
    /// Object id of the caller.
    pub caller: String,
    /// Application (client) id of the caller, when it has one.
    pub caller_app_id: String,
    /// HTTP method of the request.
    pub method: String,
    /// The client's `x-ms-client-request-id`, when it sent one.
    pub client_request_id: Option<String>,
    /// Peer address of the request, when known.
    pub client_ip: Option<String>,
}

/// Which events to list: a subscription's events matching the parsed `$filter`
/// (`keyless_core::activity_log::EventFilter`: times in microseconds since the epoch, both ends
/// inclusive; string filters compare case-insensitively).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivityQuery {
    pub subscription: String,
    pub filter: keyless_core::activity_log::EventFilter,
    /// Continue after this `seq` (the last one of the previous page).
    pub after: Option<u64>,
    /// Page size.
    pub limit: usize,
}
