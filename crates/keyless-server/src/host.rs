//! The host API used by `keyless node`: join with a one-time token (CSR → client
//! certificate bound to one VM), then, authenticated by that certificate over mTLS, read the
//! VM's identities, get managed-identity tokens for them, and rotate the certificate.
//!
//! Each request is one unit of work: reads (identities, token) one read transaction, ended
//! before a token is signed; join and rotate one write transaction, committed before the
//! certificate is answered (a refused join consumes nothing).

use crate::caches::hosts::{CachedHost, Host};
use crate::error::{HostKind, Result, ServerError};
use crate::state::AppState;
use crate::tokens;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use keyless_core::claims::Principal;
use keyless_core::imds::IssuedToken;
use keyless_core::resource_id::ResourceId;
use keyless_core::selection::{CallerIdentities, IdentityRef, Selector};
use keyless_ops::audit;
use keyless_store::{Conflict, HostCredentialRecord, JoinTokenOutcome, StoreError, Tx, VmRecord};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;

/// SHA-256 fingerprint of the TLS client certificate of the connection, if one was presented.
#[derive(Debug, Clone, Default)]
pub struct PeerCert(pub Option<String>);

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/keyless/host/v1/join", post(join))
        .route("/keyless/host/v1/identities", get(identities))
        .route("/keyless/host/v1/token", post(token))
        .route("/keyless/host/v1/rotate", post(rotate))
}

const MAX_BODY: usize = 64 * 1024;

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    if body.len() > MAX_BODY {
        return Err(ServerError::host(
            HostKind::TooLarge,
            "The request body is too large.",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ServerError::host(
            HostKind::InvalidRequest,
            format!("Malformed request body: {e}"),
        )
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinRequest {
    pub join_token: String,
    pub csr: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    pub certificate: String,
    pub ca: String,
    pub vm_resource_id: String,
    pub not_after: u64,
}

/// Sign the host's CSR and record the credential in `tx` (the caller commits).
async fn issue_cert(
    s: &AppState,
    tx: &mut Tx,
    host: &Host,
    csr: &str,
) -> Result<CertificateResponse> {
    let now = s.now();
    let der =
        s.ca.sign_client_csr(
            csr,
            &host.name(),
            &format!("keyless:host:{}", host.vm_id()),
            now,
            s.cfg.host_cert_lifetime,
        )
        .map_err(|_| invalid_csr())?;
    let (_, not_after) = keyless_pki::cert_validity(&der)?;
    tx.insert_host_credential(&HostCredentialRecord {
        fingerprint: keyless_pki::sha256_hex(&der),
        vm_key: host.key().to_string(),
        not_after,
        issued: now,
    })
    .await?;
    Ok(CertificateResponse {
        certificate: keyless_pki::pem("CERTIFICATE", &der),
        ca: s.ca.cert_pem(),
        vm_resource_id: host.resource_id().to_string(),
        not_after,
    })
}

async fn join(
    State(s): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<CertificateResponse>> {
    let req: JoinRequest = parse(&body)?;
    if req.join_token.len() > 256 || req.csr.len() > 16 * 1024 {
        return Err(ServerError::host(
            HostKind::InvalidRequest,
            "The join request is too large.",
        ));
    }
    let hash = keyless_pki::sha256_hex(req.join_token.as_bytes());
    let spender = keyless_pki::csr_key_sha256(&req.csr).map_err(|_| invalid_csr())?;
    let mut tx = s.store.write("host_join").await?;
    let vm_key = match tx.consume_join_token(&hash, s.now(), &spender).await? {
        JoinTokenOutcome::Accepted { vm_key } => vm_key,
        JoinTokenOutcome::Replayed { vm_key, host_key } => {
            // the same key joins again with its token (its first answer was lost): the same
            // host, a new certificate
            let host = replayed_host(&mut tx, &vm_key, &host_key).await?;
            let resp = issue_cert(&s, &mut tx, &host, &req.csr).await?;
            tx.commit().await?;
            tracing::info!(host = %host.resource_id(), "host joined again with its join token (a retried join)");
            return Ok(Json(resp));
        }
        JoinTokenOutcome::Unknown => {
            return Err(ServerError::host(
                HostKind::InvalidJoinToken,
                "The join token is not valid.",
            ))
        }
        JoinTokenOutcome::Expired => {
            return Err(ServerError::host(
                HostKind::InvalidJoinToken,
                "The join token has expired.",
            ))
        }
        JoinTokenOutcome::AlreadyUsed => return Err(already_used()),
    };
    let vm = tx.get_vm(&vm_key).await?.ok_or_else(vm_gone)?;
    // joining a scale set makes the host a new instance of it
    let instance = if keyless_core::resource_id::is_host_group(&vm.resource_id) {
        let target = crate::arm::batch::target_nodes(&vm);
        match tx
            .create_instance(&vm.key, &vm.resource_id, s.now(), target)
            .await
        {
            Ok(i) => Some(i),
            Err(StoreError::Conflict(Conflict::GroupFull)) => {
                return Err(ServerError::host(HostKind::PoolFull,
                    format!(
                        "The pool {} already has its target of {} dedicated nodes; resize it to add nodes.",
                        vm.name,
                        target.unwrap_or(0)
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let host = Host {
        owner: vm,
        instance,
    };
    tx.record_join(&hash, host.key()).await?;
    let resp = issue_cert(&s, &mut tx, &host, &req.csr).await?;
    tx.commit().await?;
    tracing::info!(host = %host.resource_id(), "host joined");
    Ok(Json(resp))
}

fn invalid_csr() -> ServerError {
    ServerError::host(
        HostKind::InvalidRequest,
        "The certificate signing request is invalid.",
    )
}

fn already_used() -> ServerError {
    ServerError::host(
        HostKind::InvalidJoinToken,
        "The join token has already been used.",
    )
}

fn vm_gone() -> ServerError {
    ServerError::host(
        HostKind::VmNotFound,
        "The virtual machine of this join token no longer exists.",
    )
}

/// The host a retried join made the first time: the VM, or the scale set instance it became
/// (a deleted instance is not made again: the token is used).
async fn replayed_host(tx: &mut Tx, vm_key: &str, host_key: &str) -> Result<Host> {
    let owner = tx.get_vm(vm_key).await?.ok_or_else(vm_gone)?;
    let instance = if host_key == owner.key {
        None
    } else {
        Some(tx.get_instance(host_key).await?.ok_or_else(already_used)?)
    };
    Ok(Host { owner, instance })
}

/// The host whose credential the connection presented, with its identities: from the cache
/// (`caches::hosts`), or read in a unit of work of its own and offered to the cache.
async fn cached_host(s: &AppState, peer: &PeerCert) -> Result<Arc<CachedHost>> {
    let fp = fingerprint(peer)?;
    if let Some(h) = s.hosts.get(fp) {
        return if h.not_after > s.now() {
            Ok(h)
        } else {
            Err(invalid_credential())
        };
    }
    let ticket = s.hosts.ticket();
    let mut tx = s.store.read("host_token").await?;
    let (host, not_after) = host_vm(s, &mut tx, peer).await?;
    let identities = host_identities(&mut tx, &host.owner).await?;
    drop(tx);
    let entry = Arc::new(CachedHost {
        fingerprint: fp.to_string(),
        host,
        not_after,
        identities,
    });
    s.hosts.insert(ticket, entry.clone());
    Ok(entry)
}

fn fingerprint(peer: &PeerCert) -> Result<&str> {
    peer.0.as_deref().ok_or_else(|| {
        ServerError::host(
            HostKind::CredentialRequired,
            "A host client certificate is required.",
        )
    })
}

fn invalid_credential() -> ServerError {
    ServerError::host(
        HostKind::InvalidCredential,
        "The host credential is unknown, revoked or expired.",
    )
}

/// The host whose credential the connection presented, and until when that credential is
/// valid.
async fn host_vm(s: &AppState, tx: &mut Tx, peer: &PeerCert) -> Result<(Host, u64)> {
    let fp = fingerprint(peer)?;
    let cred = tx
        .get_host_credential(fp)
        .await?
        .filter(|c| c.not_after > s.now())
        .ok_or_else(invalid_credential)?;
    let gone = || {
        ServerError::host(
            HostKind::InvalidCredential,
            "The host credential's virtual machine no longer exists.",
        )
    };
    if let Some(vm) = tx.get_vm(&cred.vm_key).await? {
        let host = Host {
            owner: vm,
            instance: None,
        };
        return Ok((host, cred.not_after));
    }
    let instance = tx.get_instance(&cred.vm_key).await?.ok_or_else(gone)?;
    let owner = tx.get_vm(&instance.vmss_key).await?.ok_or_else(gone)?;
    let host = Host {
        owner,
        instance: Some(instance),
    };
    Ok((host, cred.not_after))
}

/// The identities a host may use: those assigned to its VM, nothing else.
pub async fn host_identities(tx: &mut Tx, vm: &VmRecord) -> Result<CallerIdentities> {
    let system = tx.vm_system_identity(&vm.key).await?.map(|i| IdentityRef {
        principal_id: i.principal_id,
        client_id: i.client_id,
        resource_id: vm.resource_id.clone(),
        system_assigned: true,
    });
    let user = tx
        .vm_user_identities(&vm.key)
        .await?
        .into_iter()
        .map(|i| IdentityRef {
            principal_id: i.principal_id,
            client_id: i.client_id,
            resource_id: i.resource_id,
            system_assigned: false,
        })
        .collect();
    Ok(CallerIdentities { system, user })
}

async fn identities(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<PeerCert>,
) -> Result<Json<Value>> {
    let mut tx = s.store.read("host_identities").await?;
    let (host, _) = host_vm(&s, &mut tx, &peer).await?;
    let ids = host_identities(&mut tx, &host.owner).await?;
    let extensions = crate::arm::batch::host_extensions(&mut tx, &host.owner).await?;
    // a node of a managed cluster's pool: what NMI needs besides the identities
    let cluster = crate::arm::clusters::host_cluster(&mut tx, &host.owner).await?;
    drop(tx);
    let vm = &host.owner;
    let scale_set = if host.instance.is_some() {
        vm.name.as_str()
    } else {
        ""
    };
    let mut view = json!({
        "tenantId": s.tenant_id,
        "vm": {
            "resourceId": host.resource_id(),
            "name": host.name(),
            "vmId": host.vm_id(),
            "vmScaleSetName": scale_set,
            "location": vm.location,
            "subscriptionId": vm.subscription,
            "resourceGroupName": vm.resource_group,
            "tags": vm.tags,
            "vmSize": vm.properties.pointer("/hardwareProfile/vmSize").cloned().unwrap_or(json!("")),
        },
        "identities": ids,
        "extensions": extensions,
    });
    if let Some(c) = cluster {
        view["cluster"] = c;
    }
    Ok(Json(view))
}

#[derive(Debug, Deserialize)]
pub struct HostTokenRequest {
    pub resource: String,
    pub selector: Selector,
}

/// A managed-identity token for the host's VM, recorded in the audit trail either way.
async fn token(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<PeerCert>,
    body: axum::body::Bytes,
) -> Result<Json<IssuedToken>> {
    let who = audit::Caller {
        certificate: peer.0.clone(),
        ..Default::default()
    };
    let mut ev =
        audit::TokenEvent::new(audit::Surface::Host, audit::TokenKind::ManagedIdentity, who);
    let r = host_token(&s, &peer, &body, &mut ev).await;
    let ev = match &r {
        Ok(t) => {
            ev.identity = audit::Identity {
                client_id: Some(t.client_id.clone()),
                object_id: Some(t.object_id.clone()),
                resource_id: Some(t.msi_res_id.clone()),
            };
            ev.issued()
        }
        Err(e) => {
            let (status, code) = e.status_and_code();
            ev.refused(status, code)
        }
    };
    s.cfg.audit.token(ev).await;
    r.map(Json)
}

async fn host_token(
    s: &AppState,
    peer: &PeerCert,
    body: &[u8],
    ev: &mut audit::TokenEvent,
) -> Result<IssuedToken> {
    let entry = cached_host(s, peer).await?;
    let host = &entry.host;
    ev.caller.host = Some(host.resource_id().to_string());
    let req: HostTokenRequest = parse(body)?;
    let resource = req.resource.trim();
    // recorded as asked, refused or not (the audit sink caps its length)
    ev.audience = Some(resource.to_string());
    ev.identity = selector_identity(&req.selector);
    // the audience rule of every token surface (`keyless_core::audience`), in this API's shape
    keyless_core::audience::check(resource).map_err(|e| {
        let kind = match e {
            keyless_core::audience::AudienceError::Invalid => HostKind::InvalidResource,
            _ => HostKind::InvalidRequest,
        };
        ServerError::host(kind, e.describe())
    })?;
    let chosen = entry
        .identities
        .select(&req.selector)
        .map_err(|e| ServerError::host(HostKind::InvalidRequest, e.to_string()))?;
    let mirid = ResourceId::parse(&chosen.resource_id)
        .map(|r| r.mirid())
        .unwrap_or_else(|_| chosen.resource_id.clone());
    let principal = Principal::ManagedIdentity {
        principal_id: chosen.principal_id.clone(),
        client_id: chosen.client_id.clone(),
        mirid,
        host_resource: Some(host.resource_id().to_string()),
    };
    let t = tokens::mint(s, &principal, resource, s.cfg.mi_token_lifetime)?;
    tracing::debug!(host = %host.resource_id(), identity = %chosen.client_id, resource, "issued managed identity token");
    Ok(IssuedToken {
        access_token: t.access_token,
        expires_on: t.expires_on,
        not_before: t.not_before,
        resource: resource.to_string(),
        client_id: chosen.client_id.clone(),
        object_id: chosen.principal_id.clone(),
        msi_res_id: chosen.resource_id.clone(),
    })
}

/// The identity a selector names, for an audit record.
fn selector_identity(sel: &Selector) -> audit::Identity {
    let mut id = audit::Identity::default();
    match sel {
        Selector::SystemAssigned => {}
        Selector::ClientId(c) => id.client_id = Some(c.clone()),
        Selector::ObjectId(o) => id.object_id = Some(o.clone()),
        Selector::ResourceId(r) => id.resource_id = Some(r.clone()),
    }
    id
}

#[derive(Debug, Deserialize)]
struct RotateRequest {
    csr: String,
}

async fn rotate(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<PeerCert>,
    body: axum::body::Bytes,
) -> Result<Json<CertificateResponse>> {
    let mut tx = s.store.write("host_rotate").await?;
    let (host, _) = host_vm(&s, &mut tx, &peer).await?;
    let req: RotateRequest = parse(&body)?;
    let resp = issue_cert(&s, &mut tx, &host, &req.csr).await?;
    tx.commit().await?;
    tracing::info!(host = %host.resource_id(), "host credential rotated");
    Ok(Json(resp))
}
