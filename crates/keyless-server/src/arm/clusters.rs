//! `Microsoft.ContainerService/managedClusters` in the control plane (seed 000).
//!
//! A cluster owns a node resource group (`MC_{group}_{cluster}_{location}` unless named on
//! create) holding one scale set per agent pool (`aks-{pool}-{suffix}-vmss`) and the kubelet
//! identity (`{cluster}-agentpool`). Nodes are host agents that join a pool's scale set with
//! its join token. As AKS's managed mode does, every pod identity's user-assigned identity is
//! attached to every pool's scale set (with the kubelet identity), so the nodes' host agents
//! hold them; which pod may use which is NMI's decision on the node.
//!
//! Every write runs in the request's write transaction: the cluster's row is locked before it is
//! read, the write is computed from that read, and the store writes it only if the cluster is
//! still at the version read (else it is recomputed: a concurrent create can win between the
//! read and the write, as there is no row to lock yet). Keyless-specific actions serve the
//! in-cluster add-on: `readPodIdentityProfile` and `reportPodIdentityStatus` (pod identity),
//! `publishServiceAccountKeys` and `issueWebhookCertificate` (workload identity, issue 15).
//!
//! Workload identity (issue 15): `oidcIssuerProfile.enabled` gives the cluster an OIDC issuer
//! served by Keyless (`crate::oidc`) at `{base_url}/oidc/{issuer id}/`, the id a GUID made the
//! first time it is enabled and kept in the stored profile (`{"enabled", "issuerId"}`; GET shows
//! `issuerURL`); it cannot be disabled, and `securityProfile.workloadIdentity` needs it
//! (`keyless_core::aks`). The add-on publishes the API server's service-account keys to it, and
//! the webhook gets its serving certificate from the cluster's own webhook CA; both go with the
//! cluster.

use crate::arm::provider::{handler, Action, Call, Child, ChildId, Collection, Methods, Provider};
use crate::arm::reply::{self, created_or_ok};
use crate::arm::resources::{get_resource_group, location, tags, LinkCheck};
use crate::authz;
use crate::error::{Result, ServerError};
use crate::request::{parse_body, Caller};
use crate::state::AppState;
use crate::sts::federation;
use crate::util::new_guid;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::aks::{
    self, AksError, NetworkPlugin, PodIdentityProfile, DEFAULT_KUBERNETES_VERSION,
};
use keyless_core::api_version;
use keyless_core::names;
use keyless_core::resource_id::{ResourceId, MANAGED_CLUSTER, UAMI, VMSS};
use keyless_store::{
    ClusterPut, ClusterRecord, ClusterWrite, Conflict, IdentityRecord, ResourceGroupRecord,
    StoreError, Tx, VmRecord, WebhookCaRecord,
};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

pub const CLUSTER_TYPE: &str = "Microsoft.ContainerService/managedClusters";
const WRITE: &str = "Microsoft.ContainerService/managedClusters/write";
const READ: &str = "Microsoft.ContainerService/managedClusters/read";
/// How often a write is recomputed (in the same transaction) when the cluster changed between
/// its read and its write.
const ATTEMPTS: usize = 5;

pub static PROVIDER: Provider = Provider {
    namespace: MANAGED_CLUSTER.0,
    type_name: MANAGED_CLUSTER.1,
    api_versions: api_version::CONTAINER_SERVICE,
    // any date in a range, as AKS publishes about one a month
    accepts: Some(api_version::container_service_supported),
    list: handler!(list_handler),
    resource: Methods {
        get: Some(handler!(get)),
        put: Some(handler!(put)),
        patch: Some(handler!(patch)),
        delete: Some(handler!(delete)),
        ..Methods::NONE
    },
    children: &[Child {
        type_name: "agentPools",
        // a pool is a part of the cluster's body, not a resource of its own here
        resource: None,
        actions: &[Action {
            name: "generateJoinToken",
            method: Method::POST,
            authorize: Some(
                "Microsoft.ContainerService/managedClusters/agentPools/generateJoinToken/action",
            ),
            lockdown: false,
            handler: handler!(pool_join),
        }],
    }],
    actions: &[
        Action {
            name: "readPodIdentityProfile",
            method: Method::POST,
            // the cluster's kubelet identity may, without a role: see authorize_addon
            authorize: None,
            lockdown: false,
            handler: handler!(read_profile),
        },
        Action {
            name: "reportPodIdentityStatus",
            method: Method::POST,
            authorize: None,
            lockdown: false,
            handler: handler!(report_status),
        },
        Action {
            // C2: the add-on (kubelet identity) or …/write; see publish_service_account_keys
            name: "publishServiceAccountKeys",
            method: Method::POST,
            authorize: None,
            lockdown: false,
            handler: handler!(publish_keys),
        },
        Action {
            // C3: the webhook (kubelet identity) or …/write; see issue_webhook_certificate
            name: "issueWebhookCertificate",
            method: Method::POST,
            authorize: None,
            lockdown: false,
            handler: handler!(webhook_certificate),
        },
        Action {
            // C4: the add-on (kubelet identity) or …/read; the check is arm::wi_check, handed
            // the cluster and its issuer URL (it imports nothing of this module)
            name: "checkWorkloadIdentity",
            method: Method::POST,
            authorize: None,
            lockdown: false,
            handler: handler!(check_workload_identity),
        },
    ],
    row: Some("clusters"),
    etag_in_body_since: None,
    role_scope: Some(handler!(exists)),
};

/// `POST {cluster}/checkWorkloadIdentity` (the add-on's readiness conditions): the caller is
/// authorized here, the answer is `wi_check`'s (which imports nothing of this module).
async fn check_workload_identity(
    s: &AppState,
    tx: &mut Tx,
    c: &Call<'_, ResourceId>,
) -> Result<Response> {
    let cluster = authorize_addon(s, tx, c.caller, c.target, READ).await?;
    let issuer = oidc_issuer_url(s, &cluster);
    crate::arm::wi_check::check(s, tx, c, &cluster, issuer).await
}

async fn exists(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<()> {
    get_cluster(s, tx, rid).await.map(drop)
}

async fn list_handler(s: &AppState, tx: &mut Tx, c: &Call<'_, Collection>) -> Result<Vec<Value>> {
    list(
        s,
        tx,
        &c.target.subscription,
        c.target.resource_group.as_deref(),
    )
    .await
}

async fn put(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let rid = c.target;
    let b: Value = parse_body(c.body)?;
    let scope = rid.canonical();
    let may_assign = LinkCheck::Caller {
        principal: &c.caller.object_id,
        action: WRITE,
        scope: &scope,
    };
    // done when answered: 201/200 with provisioningState Succeeded and no async header, which
    // the SDK's ARM poller takes as finished
    let (rec, created) = put_cluster(s, tx, rid, &b, &may_assign).await?;
    Ok(created_or_ok(created, cluster_json(s, tx, &rec).await?))
}

async fn patch(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let b: Value = parse_body(c.body)?;
    let rec = patch_tags(s, tx, c.target, &b).await?;
    Ok(Json(cluster_json(s, tx, &rec).await?).into_response())
}

async fn get(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let rec = get_cluster(s, tx, c.target).await?;
    Ok(Json(cluster_json(s, tx, &rec).await?).into_response())
}

/// Deleted before the answer; the SDK's delete poller takes 202 or 204 (not 200).
async fn delete(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    delete_cluster(s, tx, c.target).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST {cluster}/agentPools/{pool}/generateJoinToken`.
async fn pool_join(s: &AppState, tx: &mut Tx, c: &Call<'_, ChildId>) -> Result<Response> {
    let ttl = reply::join_ttl(c.body)?;
    let (token, expires, scale_set) =
        pool_join_token(s, tx, &c.target.parent, &c.target.name, ttl).await?;
    Ok(reply::join_token(&token, expires, &scale_set))
}

/// `POST {cluster}/readPodIdentityProfile`.
async fn read_profile(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let v = read_pod_identity_profile(s, tx, c.caller, c.target).await?;
    Ok(Json(v).into_response())
}

/// `POST {cluster}/reportPodIdentityStatus`.
async fn report_status(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    let b: Value = parse_body(c.body)?;
    report_pod_identity_status(s, tx, c.caller, c.target, &b).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST {cluster}/publishServiceAccountKeys`.
async fn publish_keys(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    publish_service_account_keys(s, tx, c.caller, c.target, c.body).await
}

/// `POST {cluster}/issueWebhookCertificate`.
async fn webhook_certificate(
    s: &AppState,
    tx: &mut Tx,
    c: &Call<'_, ResourceId>,
) -> Result<Response> {
    let b: Value = parse_body(c.body)?;
    let v = issue_webhook_certificate(s, tx, c.caller, c.target, &b).await?;
    Ok(Json(v).into_response())
}

fn not_found(rid: &ResourceId) -> ServerError {
    ServerError::ResourceNotFound {
        type_name: CLUSTER_TYPE.into(),
        name: rid.name.clone(),
        group: rid.resource_group.clone(),
    }
}

fn busy() -> ServerError {
    ServerError::Conflict {
        code: "OperationNotAllowed",
        message: "The managed cluster is being changed by another operation; retry.".into(),
    }
}

fn invalid(message: impl Into<String>, target: &str) -> ServerError {
    AksError::invalid(message, target).into()
}

pub async fn get_cluster(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<ClusterRecord> {
    get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    tx.get_cluster(&rid.key())
        .await?
        .ok_or_else(|| not_found(rid))
}

/// [`get_cluster`] for a read-modify-write: the cluster's row is locked (until the request's
/// transaction ends) before it is read.
async fn lock_cluster(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<ClusterRecord> {
    get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    tx.lock_row("clusters", "key", &rid.key()).await?;
    tx.get_cluster(&rid.key())
        .await?
        .ok_or_else(|| not_found(rid))
}

/// The scale set of pool `pool`.
fn scale_set_id(c: &ClusterRecord, pool: &str) -> ResourceId {
    ResourceId::new(
        &c.subscription,
        &c.node_resource_group,
        VMSS,
        &aks::scale_set_name(pool, &c.suffix),
    )
}

/// The stored pools' names.
fn pool_names(c: &ClusterRecord) -> Vec<String> {
    c.properties["agentPoolProfiles"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn stored_profile(c: &ClusterRecord) -> Option<PodIdentityProfile> {
    c.properties
        .get("podIdentityProfile")
        .filter(|v| v.is_object())
        .and_then(|v| PodIdentityProfile::parse(v).ok())
}

fn plugin_of(c: &ClusterRecord) -> NetworkPlugin {
    NetworkPlugin::parse(c.properties.pointer("/networkProfile/networkPlugin"))
        .unwrap_or(NetworkPlugin::Azure)
}

/// A user-assigned identity of this subscription by resource id.
async fn find_identity(s: &AppState, tx: &mut Tx, id: &str) -> Result<Option<IdentityRecord>> {
    let Some(rid) = ResourceId::parse(id).ok().filter(|r| r.is_type(UAMI)) else {
        return Ok(None);
    };
    if !rid.subscription.eq_ignore_ascii_case(&s.subscription_id) {
        return Ok(None);
    }
    Ok(tx
        .get_identity(&rid.key())
        .await?
        .filter(|i| i.system_vm.is_none()))
}

fn random_suffix() -> String {
    let mut b = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut b);
    format!("{:08}", u32::from_le_bytes(b) % 100_000_000)
}

/// The cluster's `identity` in a request: `(type, user-assigned identity)`.
async fn parse_identity(
    s: &AppState,
    tx: &mut Tx,
    body: &Value,
    existing: Option<&ClusterRecord>,
    may_assign: &LinkCheck<'_>,
) -> Result<(String, Option<IdentityRecord>)> {
    let Some(idn) = body.get("identity").filter(|v| !v.is_null()) else {
        return Ok(match existing {
            Some(e) => (
                e.identity_type.clone(),
                match &e.user_identity {
                    Some(k) => tx.get_identity(k).await?,
                    None => None,
                },
            ),
            None => ("SystemAssigned".into(), None),
        });
    };
    let kind = idn["type"].as_str().unwrap_or("SystemAssigned");
    if kind.eq_ignore_ascii_case("SystemAssigned") {
        return Ok(("SystemAssigned".into(), None));
    }
    if !kind.eq_ignore_ascii_case("UserAssigned") {
        return Err(invalid(
            format!("The identity type '{kind}' is not supported for a managed cluster: SystemAssigned or UserAssigned."),
            "identity.type",
        ));
    }
    let ids: Vec<&String> = idn["userAssignedIdentities"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    let [id] = ids.as_slice() else {
        return Err(invalid(
            "A UserAssigned cluster identity needs exactly one entry in userAssignedIdentities.",
            "identity.userAssignedIdentities",
        ));
    };
    let Some(rec) = find_identity(s, tx, id).await? else {
        // whether it exists is told only to a caller that may assign it
        may_assign.check(tx, id).await?;
        return Err(invalid(
            format!("The user-assigned identity '{id}' was not found."),
            "identity.userAssignedIdentities",
        ));
    };
    Ok(("UserAssigned".into(), Some(rec)))
}

/// Remove the read-only and Keyless-computed fields from request `properties`.
fn request_properties(body: &Value) -> Result<Map<String, Value>> {
    let mut props = match body.get("properties") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(ServerError::InvalidRequestContent(
                "properties must be an object".into(),
            ))
        }
    };
    for read_only in [
        "provisioningState",
        "powerState",
        "fqdn",
        "azurePortalFQDN",
        "privateFQDN",
        "maxAgentPools",
        "currentKubernetesVersion",
        "resourceUID",
    ] {
        props.remove(read_only);
    }
    Ok(props)
}

/// Whether a property name carries a credential: `secret`, `adminPassword`, `password`,
/// `serverAppSecret`, `clientSecret` and any other `…secret` / `…password` (case-insensitive).
fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    k.ends_with("secret") || k.ends_with("password")
}

fn drop_secrets(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !is_secret_key(k));
            m.values_mut().for_each(drop_secrets);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_secrets),
        _ => {}
    }
}

/// Drop every secret-bearing field from `properties` (at any depth), as ARM never returns
/// them: `servicePrincipalProfile.secret`, `windowsProfile.adminPassword`,
/// `aadProfile.serverAppSecret`, … Keyless never uses them, so they are neither stored nor
/// shown (as Batch pools never store `protectedSettings`). `podIdentityProfile` is Keyless's
/// own (rebuilt from its parsed form, and its pod labels are data, not fields).
fn drop_secret_properties(props: &mut Map<String, Value>) {
    props.retain(|k, _| !is_secret_key(k));
    for (k, v) in props.iter_mut() {
        if k != "podIdentityProfile" {
            drop_secrets(v);
        }
    }
}

/// Create or replace (PUT) a cluster, in the request's write transaction. `may_assign` asks
/// whether the caller may attach a user-assigned identity (the cluster's own, and each newly
/// added pod identity).
pub async fn put_cluster(
    s: &AppState,
    tx: &mut Tx,
    rid: &ResourceId,
    body: &Value,
    may_assign: &LinkCheck<'_>,
) -> Result<(ClusterRecord, bool)> {
    if !body.is_object() {
        return Err(ServerError::InvalidRequestContent(
            "The request content must be a JSON object.".into(),
        ));
    }
    for _ in 0..ATTEMPTS {
        if let Some(done) = try_put(s, tx, rid, body, may_assign).await? {
            return Ok(done);
        }
    }
    Err(busy())
}

/// One attempt of [`put_cluster`]; `None` when the cluster changed since it was read (nothing
/// written: the transaction goes on).
async fn try_put(
    s: &AppState,
    tx: &mut Tx,
    rid: &ResourceId,
    body: &Value,
    may_assign: &LinkCheck<'_>,
) -> Result<Option<(ClusterRecord, bool)>> {
    let rg = get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    aks::validate_cluster_name(&rid.name)?;
    let canonical = ResourceId::new(&s.subscription_id, &rg.name, MANAGED_CLUSTER, &rid.name);
    let key = canonical.key();
    tx.lock_row("clusters", "key", &key).await?;
    let existing = tx.get_cluster(&key).await?;
    let ex = existing.as_ref();
    let name = ex
        .map(|e| e.name.clone())
        .unwrap_or_else(|| rid.name.clone());
    let resource_id = ex
        .map(|e| e.resource_id.clone())
        .unwrap_or_else(|| canonical.canonical());

    // location, tags
    let loc = match (ex, body.get("location").and_then(Value::as_str)) {
        (Some(e), None) => e.location.clone(),
        (_, l) => location(l)?,
    };
    if let Some(e) = ex {
        if e.location != loc {
            return Err(ServerError::InvalidResourceLocation(format!(
                "The resource '{}' already exists in location '{}' in resource group '{}'. A resource with the same name cannot be created in location '{loc}'. Please select a new resource name.",
                e.name, e.location, e.resource_group
            )));
        }
    }
    let t: Option<BTreeMap<String, String>> = match body.get("tags") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value(v.clone())
                .map_err(|_| invalid("tags must be an object of strings.", "tags"))?,
        ),
    };
    let tags = tags(t)?;

    // the cluster's identity
    let (identity_type, user_identity) = parse_identity(s, tx, body, ex, may_assign).await?;
    if let Some(u) = &user_identity {
        if ex.and_then(|e| e.user_identity.as_deref()) != Some(u.key.as_str()) {
            may_assign.check(tx, &u.resource_id).await?;
        }
    }

    let mut props = request_properties(body)?;

    // network plugin: fixed at creation
    let given_plugin = props
        .get("networkProfile")
        .and_then(|n| n.get("networkPlugin"))
        .filter(|v| !v.is_null());
    let plugin = match (ex, given_plugin) {
        (Some(e), None) => plugin_of(e),
        (_, p) => NetworkPlugin::parse(p)?,
    };
    if let Some(e) = ex {
        if plugin != plugin_of(e) {
            return Err(
                AksError::change_not_allowed("properties.networkProfile.networkPlugin").into(),
            );
        }
    }
    let mut network = match props.remove("networkProfile") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => ex
            .and_then(|e| e.properties["networkProfile"].as_object().cloned())
            .unwrap_or_default(),
        Some(_) => {
            return Err(invalid(
                "networkProfile must be an object.",
                "properties.networkProfile",
            ))
        }
    };
    network.insert("networkPlugin".into(), json!(plugin.as_str()));

    // node resource group: named on create (or the default), fixed afterwards
    let given_node = match props.remove("nodeResourceGroup") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) if !n.is_empty() => Some(n),
        Some(_) => {
            return Err(invalid(
                "nodeResourceGroup must be a string.",
                "properties.nodeResourceGroup",
            ))
        }
    };
    let node_rg = match (ex, given_node) {
        (Some(e), Some(n)) if !n.eq_ignore_ascii_case(&e.node_resource_group) => {
            return Err(AksError::change_not_allowed("properties.nodeResourceGroup").into())
        }
        (Some(e), _) => e.node_resource_group.clone(),
        (None, Some(n)) => n,
        (None, None) => aks::node_resource_group(&rg.name, &name, &loc),
    };
    if ex.is_none() {
        names::validate_resource_group(&node_rg)
            .map_err(|_| ServerError::InvalidResourceGroup(node_rg.clone()))?;
        if node_rg.eq_ignore_ascii_case(&rg.name) {
            return Err(invalid(
                "The node resource group must not be the cluster's own resource group.",
                "properties.nodeResourceGroup",
            ));
        }
        if tx
            .get_resource_group(&s.subscription_id, &node_rg)
            .await?
            .is_some()
        {
            // a concurrent create of this very cluster may have committed since it was read
            // (there was no row to lock): then recompute, as an update
            if tx.get_cluster(&key).await?.is_some() {
                return Ok(None);
            }
            return Err(node_group_exists(&node_rg));
        }
    }

    // dnsPrefix, kubernetesVersion
    let dns_prefix = match (props.remove("dnsPrefix"), ex) {
        (Some(Value::String(d)), _) => {
            if !aks::is_dns_prefix(&d) {
                return Err(invalid(
                    format!("The dnsPrefix '{d}' is invalid: 1 to 54 letters, numbers and hyphens, starting and ending with a letter or number."),
                    "properties.dnsPrefix",
                ));
            }
            if let Some(e) = ex {
                if e.properties["dnsPrefix"].as_str() != Some(d.as_str()) {
                    return Err(AksError::change_not_allowed("properties.dnsPrefix").into());
                }
            }
            d
        }
        (None | Some(Value::Null), Some(e)) => e.properties["dnsPrefix"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        (None | Some(Value::Null), None) => {
            aks::default_dns_prefix(&name, &rg.name, &s.subscription_id)
        }
        (Some(_), _) => {
            return Err(invalid(
                "dnsPrefix must be a string.",
                "properties.dnsPrefix",
            ))
        }
    };
    let k8s_version = match props.remove("kubernetesVersion") {
        Some(Value::String(v)) if !v.is_empty() => v,
        _ => ex
            .and_then(|e| e.properties["kubernetesVersion"].as_str())
            .unwrap_or(DEFAULT_KUBERNETES_VERSION)
            .to_string(),
    };

    // the kubelet identity is Keyless's: a request may only name the current one
    if let Some(ip) = props.remove("identityProfile").filter(|v| !v.is_null()) {
        let given = ip
            .pointer("/kubeletidentity/resourceId")
            .and_then(Value::as_str);
        match (ex, given) {
            (None, Some(_)) => {
                return Err(invalid(
                    "Bringing your own kubelet identity is not supported: Keyless creates it in the node resource group.",
                    "properties.identityProfile.kubeletidentity",
                ))
            }
            (Some(e), Some(g)) if !g.eq_ignore_ascii_case(&e.kubelet_identity) => {
                return Err(AksError::change_not_allowed(
                    "properties.identityProfile.kubeletidentity",
                )
                .into())
            }
            _ => {}
        }
    }

    // agent pools
    let pools = match props.remove("agentPoolProfiles") {
        Some(v) if !v.is_null() => aks::parse_agent_pools(&v)?,
        _ => match ex {
            Some(e) => aks::parse_agent_pools(&e.properties["agentPoolProfiles"])?,
            None => return Err(invalid(
                "agentPoolProfiles is required: a managed cluster needs at least one agent pool.",
                "properties.agentPoolProfiles",
            )),
        },
    };

    // the pod identity profile
    let old_profile = ex.and_then(stored_profile);
    let profile = match props.remove("podIdentityProfile") {
        Some(v) if !v.is_null() => {
            let mut p = PodIdentityProfile::parse(&v)?;
            for i in &mut p.identities {
                // read-only in requests
                i.state = None;
                i.error = None;
            }
            Some(p)
        }
        _ => old_profile.clone(),
    };
    let mut pod_keys: Vec<String> = vec![];
    let mut newly: Vec<IdentityRecord> = vec![];
    let profile = match profile {
        None => None,
        Some(mut p) => {
            p.validate(plugin)?;
            let old_entries: Vec<&aks::PodIdentity> = old_profile
                .iter()
                .flat_map(|o| o.identities.iter())
                .collect();
            for (i, entry) in p.identities.iter_mut().enumerate() {
                // whether an identity exists, and its ids, are told only to a caller that may
                // assign it: its linked check runs before those refusals
                let Some(rec) = find_identity(s, tx, &entry.resource_id).await? else {
                    may_assign.check(tx, &entry.resource_id).await?;
                    return Err(invalid(
                        format!(
                            "The user-assigned identity '{}' of pod identity {}/{} was not found.",
                            entry.resource_id, entry.namespace, entry.name
                        ),
                        &format!(
                            "properties.podIdentityProfile.userAssignedIdentities[{i}].identity.resourceId"
                        ),
                    ));
                };
                let ids = aks::check_identity_id(
                    entry.client_id.as_deref(),
                    &rec.client_id,
                    i,
                    "clientId",
                )
                .and_then(|_| {
                    aks::check_identity_id(
                        entry.object_id.as_deref(),
                        &rec.principal_id,
                        i,
                        "objectId",
                    )
                });
                if let Err(e) = ids {
                    may_assign.check(tx, &rec.resource_id).await?;
                    return Err(e.into());
                }
                entry.resource_id = rec.resource_id.clone();
                entry.client_id = Some(rec.client_id.clone());
                entry.object_id = Some(rec.principal_id.clone());
                if !pod_keys.contains(&rec.key) {
                    pod_keys.push(rec.key.clone());
                    // authorized before only if the stored entry names this very identity: one
                    // deleted and re-created under the same id is a new identity
                    let authorized_before = old_entries.iter().any(|o| {
                        o.resource_id.eq_ignore_ascii_case(&rec.resource_id)
                            && o.client_id
                                .as_deref()
                                .is_some_and(|c| c.eq_ignore_ascii_case(&rec.client_id))
                            && o.object_id
                                .as_deref()
                                .is_some_and(|c| c.eq_ignore_ascii_case(&rec.principal_id))
                    });
                    if !authorized_before {
                        newly.push(rec);
                    }
                }
            }
            p.carry_states(old_profile.as_ref());
            Some(p)
        }
    };

    // the OIDC issuer and workload identity: what the request does not name stays; the
    // issuer id is the server's, made the first time the issuer is enabled and kept for the
    // cluster's life (a request's `issuerURL` is read-only, an `issuerId` is never read)
    let requested_oidc = aks::requested_oidc_issuer(props.remove("oidcIssuerProfile").as_ref())?;
    let stored_issuer = ex
        .and_then(|e| aks::stored_issuer_id(&e.properties))
        .map(str::to_string);
    let stored_wi = ex.is_some_and(|e| aks::stored_workload_identity(&e.properties));
    let mut security = match props.remove("securityProfile") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => ex
            .and_then(|e| e.properties["securityProfile"].as_object().cloned())
            .unwrap_or_default(),
        Some(_) => {
            return Err(invalid(
                "securityProfile must be an object.",
                "properties.securityProfile",
            ))
        }
    };
    let requested_wi = aks::requested_workload_identity(Some(&Value::Object(security.clone())))?;
    let issuer = aks::resolve_issuer_settings(
        requested_oidc,
        requested_wi,
        stored_issuer.is_some(),
        stored_wi,
    )?;
    let issuer_id = match (issuer.oidc_issuer, &stored_issuer) {
        (false, _) => None,
        (true, Some(id)) => Some(id.clone()),
        (true, None) => Some(new_guid()),
    };
    if issuer.workload_identity || security.contains_key("workloadIdentity") {
        security.insert(
            "workloadIdentity".into(),
            json!({"enabled": issuer.workload_identity}),
        );
    }

    // what the cluster acts as, and what it is made of
    let system = if identity_type == "SystemAssigned" {
        Some(match tx.get_identity(&format!("{key}#system")).await? {
            Some(sys) => sys,
            None => IdentityRecord {
                key: format!("{key}#system"),
                resource_id: resource_id.clone(),
                name: name.clone(),
                subscription: s.subscription_id.clone(),
                resource_group: rg.name.clone(),
                location: loc.clone(),
                tags: BTreeMap::new(),
                tenant_id: s.tenant_id.clone(),
                principal_id: new_guid(),
                client_id: new_guid(),
                system_vm: Some(key.clone()),
                created: s.now(),
            },
        })
    } else {
        None
    };
    let principal = match (&system, &user_identity) {
        (Some(sys), _) => sys.principal_id.clone(),
        (None, Some(u)) => u.principal_id.clone(),
        (None, None) => String::new(),
    };

    // linked authorization: the caller and the cluster's identity may assign each identity the
    // write newly attaches to the pools
    for rec in &newly {
        may_assign.check(tx, &rec.resource_id).await?;
        authz::check_assign(tx, &principal, WRITE, &resource_id, &rec.resource_id).await?;
    }

    let kubelet_rid = ResourceId::new(
        &s.subscription_id,
        &node_rg,
        UAMI,
        &aks::kubelet_identity_name(&name),
    );
    let kubelet = match tx.get_identity(&kubelet_rid.key()).await? {
        Some(k) => k,
        None => IdentityRecord {
            key: kubelet_rid.key(),
            resource_id: kubelet_rid.canonical(),
            name: kubelet_rid.name.clone(),
            subscription: s.subscription_id.clone(),
            resource_group: node_rg.clone(),
            location: loc.clone(),
            tags: BTreeMap::new(),
            tenant_id: s.tenant_id.clone(),
            principal_id: new_guid(),
            client_id: new_guid(),
            system_vm: None,
            created: s.now(),
        },
    };
    let suffix = ex.map(|e| e.suffix.clone()).unwrap_or_else(random_suffix);

    let mut pool_bodies = vec![];
    for p in &pools {
        let mut b = p.body.clone();
        b.insert("name".into(), json!(p.name));
        b.insert("count".into(), json!(p.count));
        b.insert("vmSize".into(), json!(p.vm_size));
        b.insert("mode".into(), json!(p.mode));
        b.insert("osType".into(), json!("Linux"));
        b.insert("type".into(), json!("VirtualMachineScaleSets"));
        pool_bodies.push(Value::Object(b));
    }
    props.insert("kubernetesVersion".into(), json!(k8s_version));
    props.insert("dnsPrefix".into(), json!(dns_prefix));
    props.insert("networkProfile".into(), Value::Object(network));
    props.insert("agentPoolProfiles".into(), Value::Array(pool_bodies));
    if let Some(p) = &profile {
        props.insert("podIdentityProfile".into(), p.to_json());
    }
    props.insert(
        "oidcIssuerProfile".into(),
        aks::stored_oidc_issuer_profile(issuer_id.as_deref()),
    );
    if !security.is_empty() {
        props.insert("securityProfile".into(), Value::Object(security));
    }
    drop_secret_properties(&mut props);

    let now = s.now();
    let rec = ClusterRecord {
        key: key.clone(),
        resource_id: resource_id.clone(),
        name: name.clone(),
        subscription: s.subscription_id.clone(),
        resource_group: rg.name.clone(),
        location: loc.clone(),
        tags,
        node_resource_group: node_rg.clone(),
        identity_type,
        user_identity: user_identity.as_ref().map(|u| u.key.clone()),
        kubelet_identity: kubelet.key.clone(),
        suffix,
        properties: Value::Object(props),
        version: ex.map(|e| e.version + 1).unwrap_or(1),
        created: ex.map(|e| e.created).unwrap_or(now),
    };

    // one scale set per pool, holding the kubelet identity and every pod identity
    let mut held = vec![kubelet.key.clone()];
    held.extend(pod_keys.iter().cloned());
    let old_pools = ex.map(pool_names).unwrap_or_default();
    let mut sets = vec![];
    let mut new_sets = vec![];
    for p in &pools {
        let ss = scale_set_id(&rec, &p.name);
        // a pool new to the cluster gets a new scale set: whatever is stored under its key
        // (not the cluster's) is replaced in the same transaction, never adopted with its nodes
        let current = if old_pools.iter().any(|n| n == &p.name) {
            tx.get_vm(&ss.key()).await?
        } else {
            new_sets.push(ss.key());
            None
        };
        let mut tags = BTreeMap::new();
        tags.insert("aks-managed-poolName".to_string(), p.name.clone());
        tags.insert(
            "aks-managed-resourceNameSuffix".to_string(),
            rec.suffix.clone(),
        );
        tags.insert(
            "aks-managed-kubeletIdentityClientID".to_string(),
            kubelet.client_id.clone(),
        );
        let vm = VmRecord {
            key: ss.key(),
            resource_id: ss.canonical(),
            name: ss.name.clone(),
            subscription: s.subscription_id.clone(),
            resource_group: node_rg.clone(),
            location: loc.clone(),
            tags,
            vm_id: current
                .as_ref()
                .map(|c| c.vm_id.clone())
                .unwrap_or_else(new_guid),
            identity_type: "UserAssigned".into(),
            properties: json!({
                "orchestrationMode": "Uniform",
                "upgradePolicy": {"mode": "Manual"},
                "virtualMachineProfile": {
                    "osProfile": {"computerNamePrefix": format!("{}-", ss.name)},
                    "hardwareProfile": {"vmSize": p.vm_size},
                },
            }),
            created: current.as_ref().map(|c| c.created).unwrap_or(now),
        };
        sets.push((vm, held.clone()));
    }
    let removed: Vec<String> = old_pools
        .iter()
        .filter(|n| !pools.iter().any(|p| &p.name == *n))
        .map(|n| scale_set_id(&rec, n).key())
        .collect();

    let node_group = ResourceGroupRecord {
        subscription: s.subscription_id.clone(),
        name: node_rg.clone(),
        location: loc.clone(),
        tags: BTreeMap::from([
            ("aks-managed-cluster-name".to_string(), name.clone()),
            ("aks-managed-cluster-rg".to_string(), rg.name.clone()),
        ]),
    };
    let outcome = tx
        .put_cluster(&ClusterWrite {
            cluster: &rec,
            expect_version: ex.map(|e| e.version),
            node_group: &node_group,
            system_identity: system.as_ref(),
            kubelet_identity: &kubelet,
            scale_sets: &sets,
            removed_scale_sets: &removed,
            new_scale_sets: &new_sets,
        })
        .await
        .map_err(|e| match e {
            // an identity deleted between the checks and the write
            StoreError::Conflict(Conflict::MissingReference(m)) => invalid(
                format!("An identity of the cluster no longer exists ({m})."),
                "properties.podIdentityProfile",
            ),
            // a concurrent write of this cluster (or of its node resource group) won: the
            // statement failed, so the transaction cannot recompute; the caller retries
            StoreError::Conflict(
                Conflict::StaleVersion | Conflict::Unique(_) | Conflict::Busy(_),
            ) => busy(),
            other => other.into(),
        })?;
    let created = match outcome {
        ClusterPut::Created => true,
        ClusterPut::Updated => false,
        ClusterPut::Stale => return Ok(None),
        ClusterPut::NodeGroupExists => return Err(node_group_exists(&node_rg)),
    };
    if created {
        // what an earlier cluster of this name left (deleted with its resource group) is not
        // this one's: its issuers and its webhook CA
        tx.delete_cluster_oidc(&key).await?;
    }
    if let Some(id) = issuer_id
        .as_deref()
        .filter(|id| created || stored_issuer.as_deref() != Some(*id))
    {
        tx.put_oidc_issuer(id, &key, s.now()).await?;
    }
    Ok(Some((rec, created)))
}

fn node_group_exists(node_rg: &str) -> ServerError {
    invalid(
        format!("The node resource group '{node_rg}' already exists; a managed cluster creates its own node resource group."),
        "properties.nodeResourceGroup",
    )
}

/// PATCH: tags only (`updateTags`), in the request's write transaction.
pub async fn patch_tags(
    s: &AppState,
    tx: &mut Tx,
    rid: &ResourceId,
    body: &Value,
) -> Result<ClusterRecord> {
    let t: Option<BTreeMap<String, String>> = match body.get("tags") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value(v.clone())
                .map_err(|_| invalid("tags must be an object of strings.", "tags"))?,
        ),
    };
    for _ in 0..ATTEMPTS {
        let cur = lock_cluster(s, tx, rid).await?;
        let Some(t) = t.clone() else {
            return Ok(cur);
        };
        let mut next = cur.clone();
        next.tags = tags(Some(t))?;
        next.version += 1;
        if update(tx, &next, cur.version).await? {
            return Ok(next);
        }
    }
    Err(busy())
}

/// Write the cluster row only (tags, pod identity states) if it is still at `expect_version`:
/// false when it is not (nothing written).
async fn update(tx: &mut Tx, next: &ClusterRecord, expect_version: u64) -> Result<bool> {
    match tx.update_cluster(next, expect_version).await {
        Ok(outcome) => Ok(outcome == ClusterPut::Updated),
        // the statement failed, so the transaction cannot recompute; the caller retries
        Err(StoreError::Conflict(Conflict::StaleVersion | Conflict::Busy(_))) => Err(busy()),
        Err(e) => Err(e.into()),
    }
}

pub async fn delete_cluster(s: &AppState, tx: &mut Tx, rid: &ResourceId) -> Result<bool> {
    get_resource_group(s, tx, &rid.subscription, &rid.resource_group).await?;
    let issuer = match tx.get_cluster(&rid.key()).await? {
        Some(c) => oidc_issuer_url(s, &c),
        None => None,
    };
    // its published keys and its webhook CA go with it (the store's rule, also for a group's
    // delete)
    let deleted = tx.delete_cluster(&rid.key()).await?;
    if let Some(url) = issuer {
        // this server's federation forgets its keys now (other servers, and a group's delete,
        // within the second their cached keys of an issuer of theirs may answer)
        crate::oidc::forget_cached_keys(s, &url);
    }
    Ok(deleted)
}

pub async fn list(
    s: &AppState,
    tx: &mut Tx,
    subscription: &str,
    rg: Option<&str>,
) -> Result<Vec<Value>> {
    let mut out = vec![];
    for c in tx.list_clusters(subscription, rg).await? {
        out.push(cluster_json(s, tx, &c).await?);
    }
    Ok(out)
}

/// `{resourceId, clientId, objectId}` of the kubelet identity.
async fn kubelet_json(tx: &mut Tx, c: &ClusterRecord) -> Result<Value> {
    let k = tx.get_identity(&c.kubelet_identity).await?;
    Ok(json!({
        "resourceId": k.as_ref().map(|k| k.resource_id.clone()).unwrap_or_else(|| c.kubelet_identity.clone()),
        "clientId": k.as_ref().map(|k| k.client_id.clone()),
        "objectId": k.as_ref().map(|k| k.principal_id.clone()),
    }))
}

/// The cluster as `az aks show` shows it.
pub async fn cluster_json(s: &AppState, tx: &mut Tx, c: &ClusterRecord) -> Result<Value> {
    let mut props = c.properties.clone();
    // (a record written before secrets were dropped on write shows none either)
    if let Value::Object(m) = &mut props {
        drop_secret_properties(m);
    }
    let version = props["kubernetesVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let dns = props["dnsPrefix"].as_str().unwrap_or_default().to_string();
    let fqdn = format!("{dns}-{}.hcp.{}.azmk8s.io", c.suffix, c.location);
    props["provisioningState"] = json!("Succeeded");
    props["powerState"] = json!({"code": "Running"});
    props["currentKubernetesVersion"] = json!(version);
    props["fqdn"] = json!(fqdn);
    props["azurePortalFQDN"] = json!(fqdn);
    props["nodeResourceGroup"] = json!(c.node_resource_group);
    props["maxAgentPools"] = json!(aks::MAX_AGENT_POOLS);
    props["identityProfile"] = json!({"kubeletidentity": kubelet_json(tx, c).await?});
    props["oidcIssuerProfile"] = aks::shown_oidc_issuer_profile(oidc_issuer_url(s, c).as_deref());
    if let Some(pools) = props["agentPoolProfiles"].as_array_mut() {
        for p in pools {
            p["provisioningState"] = json!("Succeeded");
            p["powerState"] = json!({"code": "Running"});
            if p.get("orchestratorVersion").is_none_or(Value::is_null) {
                p["orchestratorVersion"] = json!(version);
            }
            p["currentOrchestratorVersion"] = p["orchestratorVersion"].clone();
        }
    }
    let identity = match &c.user_identity {
        None => {
            let sys = tx.get_identity(&format!("{}#system", c.key)).await?;
            json!({
                "type": "SystemAssigned",
                "principalId": sys.as_ref().map(|i| i.principal_id.clone()),
                "tenantId": s.tenant_id,
            })
        }
        Some(k) => {
            let mut m = Map::new();
            if let Some(u) = tx.get_identity(k).await? {
                m.insert(
                    u.resource_id,
                    json!({"principalId": u.principal_id, "clientId": u.client_id}),
                );
            }
            json!({"type": "UserAssigned", "userAssignedIdentities": m})
        }
    };
    Ok(json!({
        "id": c.resource_id,
        "name": c.name,
        "type": CLUSTER_TYPE,
        "location": c.location,
        "tags": c.tags,
        "sku": {"name": "Base", "tier": "Free"},
        "identity": identity,
        "properties": props,
    }))
}

// ---------------------------------------------------------------- node pools

/// A one-time join token for a node of pool `pool`: the host agent that joins with it becomes
/// an instance of the pool's scale set. Returns (token, expiry, scale set id).
pub async fn pool_join_token(
    s: &AppState,
    tx: &mut Tx,
    rid: &ResourceId,
    pool: &str,
    ttl: u64,
) -> Result<(String, u64, String)> {
    let c = get_cluster(s, tx, rid).await?;
    let name = pool_names(&c)
        .into_iter()
        .find(|n| n.eq_ignore_ascii_case(pool))
        .ok_or_else(|| ServerError::ResourceNotFound {
            type_name: format!("{CLUSTER_TYPE}/agentPools"),
            name: format!("{}/{pool}", c.name),
            group: c.resource_group.clone(),
        })?;
    let ss = scale_set_id(&c, &name);
    let token = format!("kljt1.{}", crate::util::random_b64url(32));
    let expires = s.now() + ttl;
    tx.insert_join_token(
        &keyless_pki::sha256_hex(token.as_bytes()),
        &ss.key(),
        expires,
    )
    .await?;
    Ok((token, expires, ss.canonical()))
}

// ---------------------------------------------------------------- the add-on's actions

/// The cluster's OIDC issuer URL (`{base_url}/oidc/{issuer id}/`) while
/// `oidcIssuerProfile.enabled`.
pub(crate) fn oidc_issuer_url(s: &AppState, c: &ClusterRecord) -> Option<String> {
    aks::stored_issuer_id(&c.properties).map(|id| crate::oidc::issuer_url(s, id))
}

/// How a caller of the add-on's actions got in ([`authorize_addon_as`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddonCaller {
    /// It holds the action on the cluster through RBAC.
    Rbac,
    /// It is the cluster's kubelet identity (held by every node, and through a node's IMDS by
    /// its pods), with no role that grants the action.
    Kubelet,
}

/// 403 unless the caller is the cluster's kubelet identity or holds `action` on the cluster.
/// The cluster is read only after RBAC said no, so a stranger learns nothing of it.
pub(crate) async fn authorize_addon(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    rid: &ResourceId,
    action: &str,
) -> Result<ClusterRecord> {
    Ok(authorize_addon_as(s, tx, caller, rid, action).await?.0)
}

/// [`authorize_addon`], also telling how the caller got in: RBAC first (a kubelet identity
/// that also holds the action is [`AddonCaller::Rbac`]), else as the kubelet identity.
pub(crate) async fn authorize_addon_as(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    rid: &ResourceId,
    action: &str,
) -> Result<(ClusterRecord, AddonCaller)> {
    let scope = rid.canonical();
    if authz::permitted(tx, &caller.object_id, action, &scope).await? {
        return Ok((get_cluster(s, tx, rid).await?, AddonCaller::Rbac));
    }
    let denied = || ServerError::AuthorizationFailed {
        principal: caller.object_id.clone(),
        action: action.to_string(),
        scope: scope.clone(),
    };
    let c = match tx.get_cluster(&rid.key()).await? {
        Some(c) => c,
        None => return Err(denied()),
    };
    let kubelet = tx.get_identity(&c.kubelet_identity).await?;
    match kubelet {
        Some(k) if k.principal_id.eq_ignore_ascii_case(&caller.object_id) => {
            Ok((c, AddonCaller::Kubelet))
        }
        _ => Err(denied()),
    }
}

/// `POST {cluster}/readPodIdentityProfile`:
/// `{"podIdentityProfile": <as GET shows it>, "kubeletIdentity": {resourceId, clientId, objectId}}`.
pub async fn read_pod_identity_profile(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    rid: &ResourceId,
) -> Result<Value> {
    let c = authorize_addon(s, tx, caller, rid, READ).await?;
    let profile = stored_profile(&c).unwrap_or_default();
    Ok(json!({
        "podIdentityProfile": profile.to_json(),
        "kubeletIdentity": kubelet_json(tx, &c).await?,
    }))
}

/// `POST {cluster}/reportPodIdentityStatus` with
/// `{"userAssignedIdentities": [{name, namespace, provisioningState: Assigned|Failed, error?}]}`.
pub async fn report_pod_identity_status(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    rid: &ResourceId,
    body: &Value,
) -> Result<()> {
    authorize_addon(s, tx, caller, rid, WRITE).await?;
    let report = aks::parse_status_report(body)?;
    for _ in 0..ATTEMPTS {
        let cur = lock_cluster(s, tx, rid).await?;
        let Some(mut profile) = stored_profile(&cur) else {
            return Ok(());
        };
        if !profile.apply_report(&report) {
            return Ok(());
        }
        let mut next = cur.clone();
        next.properties["podIdentityProfile"] = profile.to_json();
        next.version += 1;
        if update(tx, &next, cur.version).await? {
            return Ok(());
        }
    }
    Err(busy())
}

/// `POST {cluster}/publishServiceAccountKeys` with `{"keys": [<JWK>, …]}` (the API server's
/// `/openid/v1/jwks` as it is): the keys the cluster's issuer serves from now on, in the
/// request's unit of work. Caller: the kubelet identity or `managedClusters/write`. Answers
/// `{"issuerURL", "keys": <count>, "changed": <whether the stored set differed>}`.
///
/// The proof of the API server (contract P): every node holds the kubelet identity, so a
/// publish by it that changes the set must carry `"proof"`, a service-account token the
/// cluster's API server minted for the add-on's service account, audience
/// `{issuerURL}publishServiceAccountKeys`, signed by a key of the set stored now (the issuer's
/// row locked first: what the proof is checked against is what the publish replaces) and
/// naming the recorded publisher; when none is recorded (the first publish, or after
/// `resetPublisher`) a key of the set being published may sign it too and its subject becomes
/// the publisher ([`aks::ProofTrust`]). A caller holding `managedClusters/write` through RBAC
/// needs no proof; it keeps the publisher, or clears it with `"resetPublisher": true` (the
/// kubelet identity may not: 403 `AuthorizationFailed`). An unchanged set answers
/// `changed: false` whoever calls, without a proof.
pub async fn publish_service_account_keys(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    rid: &ResourceId,
    body: &[u8],
) -> Result<Response> {
    let (c, via) = authorize_addon_as(s, tx, caller, rid, WRITE).await?;
    if body.len() > aks::MAX_PUBLISH_BODY {
        return Err(ServerError::RequestTooLarge(aks::MAX_PUBLISH_BODY));
    }
    let (Some(id), Some(url)) = (aks::stored_issuer_id(&c.properties), oidc_issuer_url(s, &c))
    else {
        return Err(AksError::issuer_not_enabled(&c.name).into());
    };
    let b: Value = parse_body(body)?;
    let keys = aks::validate_published_keys(&b)?;
    let opts = aks::publish_options(&b)?;
    if opts.reset_publisher && via == AddonCaller::Kubelet {
        return Err(ServerError::AuthorizationFailed {
            principal: caller.object_id.clone(),
            action: WRITE.to_string(),
            scope: rid.canonical(),
        });
    }
    // the row locked before it is read: the set a proof verifies against is the one replaced
    let stored = match tx.lock_oidc_issuer(id).await? {
        // the id is another cluster's (never so through this server): nothing of it is ours
        Some(r) if r.cluster_key != c.key => {
            return Err(AksError::issuer_not_enabled(&c.name).into())
        }
        Some(r) => r,
        // an issuer enabled before its row was kept (never so through this server): kept now
        None => {
            tx.put_oidc_issuer(id, &c.key, s.now()).await?;
            tx.lock_oidc_issuer(id)
                .await?
                .ok_or(ServerError::Store(StoreError::NotFound))?
        }
    };
    let unchanged = stored.keys.as_deref() == Some(&keys[..]);
    let publisher = match via {
        AddonCaller::Rbac => aks::next_publisher(
            stored.publisher.as_deref(),
            aks::PublishCaller::Writer {
                reset: opts.reset_publisher,
            },
        ),
        // idempotent: the set the add-on last published, again, needs nothing but the caller
        AddonCaller::Kubelet if unchanged => stored.publisher.clone(),
        AddonCaller::Kubelet => {
            let proven = check_publish_proof(s, &url, &stored, &keys, opts.proof.as_deref())?;
            aks::next_publisher(
                stored.publisher.as_deref(),
                aks::PublishCaller::Kubelet { proven: &proven },
            )
        }
    };
    let changed = tx.set_oidc_issuer_keys(id, &keys, s.now()).await?;
    if publisher != stored.publisher {
        tx.set_oidc_issuer_publisher(id, publisher.as_deref())
            .await?;
    }
    if changed {
        crate::oidc::forget_cached_keys(s, &url);
    }
    Ok(Json(json!({"issuerURL": url, "keys": keys.len(), "changed": changed})).into_response())
}

/// The proof of a kubelet-identity publish of `published` to the issuer `url` whose row is
/// `stored`: its signature by a key [`aks::ProofTrust`] allows (the stored set; on a first use
/// with nothing published yet also the set being published), then its claims ([`aks::check_proof_claims`]). Returns its
/// subject. 400 `InvalidParameter` (target `proof`) when it is missing or no JWT, 403
/// `PublishProofRejected` when it does not verify.
fn check_publish_proof(
    s: &AppState,
    url: &str,
    stored: &keyless_store::OidcIssuerRecord,
    published: &[Value],
    proof: Option<&str>,
) -> Result<String> {
    let Some(proof) = proof else {
        return Err(aks::proof_missing(false).into());
    };
    let d = keyless_core::claims::decode(proof.trim()).map_err(|_| aks::proof_missing(true))?;
    let trust = aks::ProofTrust::of(stored.publisher.as_deref());
    let stored_keys = stored.keys.as_deref().unwrap_or_default();
    // trust on first use only while nothing is published: once keys are (an administrator's
    // publish, or a reset publisher), a proof is signed by one of them
    let self_signed_ok = trust.published_set_may_sign() && stored_keys.is_empty();
    let signed = federation::signed_by_one_of(stored_keys, &d)
        || (self_signed_ok && federation::signed_by_one_of(published, &d));
    if !signed {
        let by = if self_signed_ok {
            "a key of the issuer's published set or of the set being published"
        } else {
            "a key of the issuer's published set (a key only of the set being published never signs a proof)"
        };
        return Err(AksError::proof_rejected(format!(
            "The publish proof is rejected: its signature (key '{}', algorithm '{}') does not verify with {by}.",
            d.header.kid.as_deref().unwrap_or_default(),
            d.header.alg
        ))
        .into());
    }
    Ok(aks::check_proof_claims(&d.claims, url, trust, s.now())?)
}

/// The cluster's webhook CA: made on first use (ECDSA P-256, ten years), its key sealed in
/// the store; of two concurrent first uses one is kept and both answer with it.
async fn webhook_ca(s: &AppState, tx: &mut Tx, c: &ClusterRecord) -> Result<keyless_pki::Ca> {
    let rec = match tx.get_webhook_ca(&c.key).await? {
        Some(rec) => rec,
        None => {
            let now = s.now();
            let (ca, key_pkcs8) =
                keyless_pki::Ca::generate(&format!("Keyless webhook CA {}", c.name), now)?;
            let rec = WebhookCaRecord {
                cert_der: ca.cert_der().to_vec(),
                key_pkcs8,
                created: now,
            };
            if tx.put_webhook_ca_if_absent(&c.key, &rec).await? {
                rec
            } else {
                tx.get_webhook_ca(&c.key)
                    .await?
                    .ok_or_else(|| ServerError::Store(StoreError::NotFound))?
            }
        }
    };
    Ok(keyless_pki::Ca::load(&rec.cert_der, &rec.key_pkcs8)?)
}

/// `POST {cluster}/issueWebhookCertificate` with `{"csr": "<PEM PKCS#10>",
/// "validityInSeconds": <optional>}`: a serving certificate for the CSR's key, signed by the
/// cluster's webhook CA, carrying the CSR's DNS / IP SANs (1 to 20, each checked), EKU
/// serverAuth, valid from a minute ago for the validity asked (default 7 days, clamped to
/// [60 s, 30 days]). Caller: the kubelet identity or `managedClusters/write`. Answers
/// `{"certificate", "caBundle", "notBefore", "notAfter"}` (PEM, PEM, RFC 3339, RFC 3339).
pub async fn issue_webhook_certificate(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    rid: &ResourceId,
    body: &Value,
) -> Result<Value> {
    let c = authorize_addon(s, tx, caller, rid, WRITE).await?;
    let csr = match body.get("csr") {
        Some(Value::String(p)) if p.contains("-----BEGIN CERTIFICATE REQUEST-----") => p.as_str(),
        _ => return Err(invalid(
            "csr must be a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----).",
            "csr",
        )),
    };
    let validity = aks::webhook_validity(body.get("validityInSeconds"))?;
    let sans = keyless_pki::csr_sans(csr).map_err(|e| {
        invalid(
            format!("The certificate signing request cannot be read: {e}."),
            "csr",
        )
    })?;
    aks::check_webhook_sans(&sans)?;
    let ca = webhook_ca(s, tx, &c).await?;
    let now = s.now();
    let (not_before, not_after) = (now.saturating_sub(60), now + validity);
    let der = ca
        .sign_server_csr(csr, &sans, not_before, not_after)
        .map_err(|_| {
            invalid(
                "The certificate signing request is not valid (its signature does not verify, or it asks for an extension other than names and key usages).",
                "csr",
            )
        })?;
    Ok(json!({
        "certificate": keyless_pki::pem("CERTIFICATE", &der),
        "caBundle": ca.cert_pem(),
        "notBefore": crate::util::format_iso(not_before),
        "notAfter": crate::util::format_iso(not_after),
    }))
}

// ---------------------------------------------------------------- host view

/// The `cluster` object of a host's view when the host is a node of a cluster pool:
/// `{id, networkPlugin, podIdentity: {enabled, allowNetworkPluginKubenet, clientIds,
/// identities: [{namespace, name, clientId}], exceptions: [{namespace, name}]},
/// kubeletIdentity: {clientId, objectId, resourceId}}` — `identities` is every pod identity
/// entry of the profile, `exceptions` every `userAssignedIdentityExceptions` entry (both empty
/// when the add-on is disabled: a disabled profile holds none).
pub async fn host_cluster(tx: &mut Tx, owner: &VmRecord) -> Result<Option<Value>> {
    if !ResourceId::parse(&owner.resource_id).is_ok_and(|r| r.is_type(VMSS)) {
        return Ok(None);
    }
    let Some(c) = tx
        .cluster_of_node_group(&owner.subscription, &owner.resource_group)
        .await?
    else {
        return Ok(None);
    };
    if !pool_names(&c)
        .iter()
        .any(|p| scale_set_id(&c, p).key() == owner.key)
    {
        return Ok(None);
    }
    let profile = stored_profile(&c).unwrap_or_default();
    let mut client_ids: Vec<String> = profile
        .identities
        .iter()
        .filter_map(|p| p.client_id.clone())
        .collect();
    client_ids.sort();
    client_ids.dedup();
    let (identities, exceptions): (Vec<Value>, Vec<Value>) = if profile.enabled {
        (
            profile
                .identities
                .iter()
                .map(|p| {
                    json!({"namespace": p.namespace, "name": p.name,
                           "clientId": p.client_id.clone().unwrap_or_default()})
                })
                .collect(),
            profile
                .exceptions
                .iter()
                .map(|e| json!({"namespace": e.namespace, "name": e.name}))
                .collect(),
        )
    } else {
        (vec![], vec![])
    };
    Ok(Some(json!({
        "id": c.resource_id,
        "networkPlugin": plugin_of(&c).as_str(),
        "podIdentity": {
            "enabled": profile.enabled,
            "allowNetworkPluginKubenet": profile.allow_network_plugin_kubenet,
            "clientIds": client_ids,
            "identities": identities,
            "exceptions": exceptions,
        },
        "kubeletIdentity": kubelet_json(tx, &c).await?,
    })))
}

/// AKS's node resource group lockdown: nothing in a cluster's node resource group is written
/// through ARM (no VM, scale set, identity or other resource created, changed or deleted there,
/// no scale-set identity list changed, no generic join token issued for its scale sets) — only
/// the cluster's own code paths write there (this module, and `agentPools/generateJoinToken`).
/// Reads and role assignments at the group stay allowed. 409 `OperationNotAllowed`.
pub async fn check_not_node_group(tx: &mut Tx, sub: &str, rg: &str) -> Result<()> {
    match tx.cluster_of_node_group(sub, rg).await? {
        None => Ok(()),
        Some(c) => Err(ServerError::Conflict {
            code: "OperationNotAllowed",
            message: format!(
                "The resource group '{rg}' is the node resource group of the managed cluster '{}' and is managed by the cluster: its resources cannot be created, changed or deleted directly. To add a node to a pool, use `aks nodepool join-token` (managedClusters/agentPools/generateJoinToken).",
                c.resource_id
            ),
        }),
    }
}

/// The cluster whose node resource group is `rg`, if any (a node group is deleted with its
/// cluster, not on its own).
pub async fn owner_of_node_group(tx: &mut Tx, sub: &str, rg: &str) -> Result<Option<String>> {
    Ok(tx
        .cluster_of_node_group(sub, rg)
        .await?
        .map(|c| c.resource_id))
}
