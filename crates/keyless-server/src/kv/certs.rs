//! Certificates: create with a policy (issuers `Self`, `Keyless` — the Keyless CA — and
//! `Unknown` with CSR + merge), the pending operation, get / list / versions, policy get and
//! update, import (PFX or PEM), attribute updates, contacts, and the shared soft-delete
//! operations. Each version owns a key and a secret of the same name and version.

use super::keys::{generate, public_of};
use super::{bad, check_tags, common, method_not_allowed, parse_body, AttrsIn, Ctx, Render};
use crate::error::{KvKind, Result, ServerError};
use crate::state::AppState;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use keyless_core::vault::access::Op;
use keyless_core::vault::policy::{
    self, KeySpec, Policy, ISSUER_KEYLESS, ISSUER_SELF, ISSUER_UNKNOWN,
};
use keyless_core::vault::route::Target;
use keyless_core::vault::Coll;
use keyless_pki::kv::{CertSpec, Curve, KeyType, KvKey};
use keyless_store::{KvVersionRecord, KvWrite, KvWriteOutcome, Tx};
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub struct Certs;

impl Render for Certs {
    const COLL: Coll = Coll::Certificates;

    fn bundle(ctx: &Ctx<'_>, v: &KvVersionRecord, _value: bool) -> Value {
        let mut out = json!({
            "id": ctx.id(Coll::Certificates, &v.name, Some(&v.version)),
            "kid": ctx.id(Coll::Keys, &v.name, Some(&v.version)),
            "sid": ctx.id(Coll::Secrets, &v.name, Some(&v.version)),
            "x5t": v.public["x5t"],
            "cer": v.public["cer"],
            "attributes": ctx.attributes(v),
            "preserveCertOrder": false,
        });
        if !v.tags.is_empty() {
            out["tags"] = json!(v.tags);
        }
        out
    }

    fn item(ctx: &Ctx<'_>, v: &KvVersionRecord, versioned: bool) -> Value {
        let mut out = json!({
            "id": ctx.id(Coll::Certificates, &v.name, versioned.then_some(v.version.as_str())),
            "x5t": v.public["x5t"],
            "attributes": ctx.attributes(v),
        });
        if !v.tags.is_empty() {
            out["tags"] = json!(v.tags);
        }
        out
    }
}

/// Per-certificate state kept with the name: the policy and the pending operation.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CertState {
    pub policy: Option<Policy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// Lifetime-action events (EmailContacts notifications, renewals), newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Value>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    pub request_id: String,
    pub status: String,
    pub issuer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
    #[serde(default)]
    pub cancellation_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    /// Attributes and tags of the version being created.
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The latest version when the operation started (the write expects it still is).
    #[serde(default)]
    pub base_version: Option<String>,
    /// Server time the operation started (for resuming after a restart).
    #[serde(default)]
    pub started: u64,
}

const IN_PROGRESS: &str = "inProgress";

/// The state of a live certificate (`None`: no such certificate, or soft-deleted).
pub async fn load_state(tx: &mut Tx, vault: &str, name: &str) -> Result<Option<CertState>> {
    Ok(match tx.kv_name(vault, "certificates", name).await? {
        Some(n) if n.deleted.is_none() => Some(serde_json::from_value(n.extra).unwrap_or_default()),
        _ => None,
    })
}

async fn save_state(tx: &mut Tx, vault: &str, name: &str, st: &CertState) -> Result<()> {
    tx.kv_set_extra(vault, "certificates", name, &json!(st))
        .await?;
    Ok(())
}

fn pending_key_name(vault: &str, name: &str) -> String {
    format!("kvpending:{vault}/{}", name.to_ascii_lowercase())
}

fn op_json(base: &str, name: &str, p: &Pending) -> Value {
    let mut out = json!({
        "id": format!("{base}/certificates/{name}/pending"),
        "issuer": {"name": p.issuer},
        "cancellation_requested": p.cancellation_requested,
        "status": p.status,
        "request_id": p.request_id,
    });
    if let Some(c) = &p.csr {
        out["csr"] = json!(c);
    }
    match p.status.as_str() {
        IN_PROGRESS => {
            out["status_details"] = json!("Pending certificate created. Certificate request is in progress. This may take some time based on the issuer provider. Please check again later.");
        }
        "completed" => out["target"] = json!(format!("{base}/certificates/{name}")),
        _ => {}
    }
    if let Some(e) = &p.error {
        out["error"] = e.clone();
        out["status_details"] = e["message"].clone();
    }
    out
}

fn policy_json(base: &str, name: &str, p: &Policy) -> Value {
    let mut v = json!(p);
    v["id"] = json!(format!("{base}/certificates/{name}/policy"));
    v
}

fn curve_of(name: &str) -> Curve {
    Curve::parse(name).unwrap_or(Curve::P256)
}

fn key_type_of(p: &Policy) -> KeyType {
    match p.key_spec() {
        KeySpec::Rsa(bits) => KeyType::Rsa { bits },
        KeySpec::Ec(c) => KeyType::Ec { curve: curve_of(c) },
    }
}

fn spec_of(p: &Policy, not_before: u64) -> CertSpec {
    let x = p.x509_props.clone().unwrap_or_default();
    let sans = x.sans.unwrap_or_default();
    CertSpec {
        subject: x.subject.unwrap_or_default(),
        dns_names: sans.dns_names,
        emails: sans.emails,
        upns: sans.upns,
        uris: sans.uris,
        ip_addresses: sans.ip_addresses,
        ekus: x.ekus.unwrap_or_default(),
        key_usage: x.key_usage.unwrap_or_default(),
        not_before,
        not_after: policy::add_months(not_before, p.validity_months()),
        is_ca: x.basic_constraints.is_some_and(|b| b.ca),
    }
}

/// The three versions (certificate, key, secret) of one certificate version.
#[allow(clippy::too_many_arguments)]
fn triple(
    vault: &str,
    name: &str,
    version: &str,
    now: u64,
    p: &Policy,
    key: &KvKey,
    chain: &[Vec<u8>],
    enabled: bool,
    tags: BTreeMap<String, String>,
) -> Result<Vec<KvVersionRecord>> {
    let info = keyless_pki::kv::cert_info(&chain[0])?;
    let exportable = p.exportable();
    let kty = p
        .key_props
        .as_ref()
        .and_then(|k| k.kty.clone())
        .unwrap_or_else(|| match key.key_type() {
            KeyType::Rsa { .. } => "RSA".into(),
            KeyType::Ec { .. } => "EC".into(),
        });
    let usage = p
        .x509_props
        .as_ref()
        .and_then(|x| x.key_usage.clone())
        .unwrap_or_default();
    let ops: Vec<String> = policy::key_ops(&usage)
        .into_iter()
        .map(str::to_string)
        .collect();
    let exported = exportable.then_some(key);
    let content_type = p.content_type().to_string();
    let secret_value = if content_type == policy::PEM {
        keyless_pki::kv::build_pem(exported, chain)
    } else {
        STANDARD.encode(keyless_pki::kv::build_pfx(exported, chain)?)
    };
    let base = |coll: &str| KvVersionRecord {
        vault: vault.to_string(),
        coll: coll.to_string(),
        name: name.to_string(),
        version: version.to_string(),
        created: now,
        updated: now,
        enabled,
        nbf: Some(info.not_before),
        exp: Some(info.not_after),
        content_type: None,
        tags: tags.clone(),
        managed: coll != "certificates",
        public: json!({}),
        private: None,
    };
    let mut cert = base("certificates");
    cert.public = json!({
        "cer": STANDARD.encode(&chain[0]),
        "x5t": info.x5t,
        "chain": chain[1..].iter().map(|c| STANDARD.encode(c)).collect::<Vec<_>>(),
    });
    let mut k = base("keys");
    k.tags = BTreeMap::new();
    k.public = public_of(key, &kty, &ops, exportable);
    k.private = Some(key.pkcs8().to_vec());
    let mut sec = base("secrets");
    sec.tags = BTreeMap::new();
    sec.content_type = Some(content_type);
    sec.private = Some(secret_value.into_bytes());
    Ok(vec![cert, k, sec])
}

async fn latest_version(tx: &mut Tx, vault: &str, name: &str) -> Result<Option<String>> {
    Ok(tx
        .kv_version(vault, "certificates", name, None)
        .await?
        .map(|v| v.version))
}

/// What [`issue`] needs.
pub struct Issue<'a> {
    pub vault: &'a str,
    pub name: &'a str,
    pub policy: &'a Policy,
    pub enabled: bool,
    pub tags: BTreeMap<String, String>,
    /// Write only if this is still the latest version.
    pub base_version: Option<String>,
    /// The certificate state to store with the new version (its pending op is completed).
    pub state: CertState,
    /// Reuse this key (policy `reuse_key`) instead of generating one.
    pub reuse: Option<KvKey>,
}

/// A certificate made from a policy (Self or Keyless issuer), not yet written.
pub struct Issued {
    key: KvKey,
    chain: Vec<Vec<u8>>,
    /// Key Vault time it was made (its `created` and `nbf`).
    now: u64,
}

/// Make a certificate from policy `p` with a new key (or `reuse`). Runs with no unit of work
/// open: generating an RSA key takes long enough to stall every other writer.
pub async fn prepare(s: &AppState, p: &Policy, reuse: Option<KvKey>) -> Result<Issued> {
    let now = s.vault_clock.now();
    let key = match reuse {
        Some(k) => k,
        None => generate(key_type_of(p)).await?,
    };
    let spec = spec_of(p, now);
    let chain = if p.issuer_name() == ISSUER_KEYLESS {
        vec![
            s.kv_ca.issue_for_spec(&spec, &key)?,
            s.kv_ca.cert_der().to_vec(),
        ]
    } else {
        vec![keyless_pki::kv::self_signed(&spec, &key)?]
    };
    Ok(Issued { key, chain, now })
}

/// Write a prepared certificate as a new version (certificate, key and secret) with `state`
/// (its pending operation marked completed), in `tx`, provided the latest version is still
/// `base_version`. Returns the new version, or `None` when another version was written first
/// or the certificate is deleted (nothing written; the caller need not commit).
#[allow(clippy::too_many_arguments)]
pub async fn write_issued(
    tx: &mut Tx,
    vault: &str,
    name: &str,
    p: &Policy,
    issued: Issued,
    enabled: bool,
    tags: BTreeMap<String, String>,
    base_version: Option<String>,
    mut state: CertState,
) -> Result<Option<String>> {
    let version = uuid::Uuid::new_v4().simple().to_string();
    let display = tx
        .kv_name(vault, "certificates", name)
        .await?
        .map(|n| n.name)
        .unwrap_or_else(|| name.to_string());
    let versions = triple(
        vault,
        &display,
        &version,
        issued.now,
        p,
        &issued.key,
        &issued.chain,
        enabled,
        tags,
    )?;
    if let Some(pe) = state.pending.as_mut() {
        pe.status = "completed".into();
        pe.target_version = Some(version.clone());
    }
    let w = KvWrite {
        versions,
        extra: Some(("certificates".into(), json!(state))),
        expect_latest: Some(("certificates".into(), base_version)),
    };
    match tx.kv_write(&w).await? {
        KvWriteOutcome::Written => Ok(Some(version)),
        _ => Ok(None),
    }
}

/// Issue a new version of a certificate from its policy (Self or Keyless issuer) and write
/// it in a unit of work of its own (opened once the key is generated), provided the latest
/// version is still `base_version`. Returns the new version, or `None` when someone else
/// wrote first.
pub async fn issue(s: &AppState, req: Issue<'_>) -> Result<Option<String>> {
    let Issue {
        vault,
        name,
        policy: p,
        enabled,
        tags,
        base_version,
        state,
        reuse,
    } = req;
    let issued = prepare(s, p, reuse).await?;
    let mut tx = s.store.write("kv_certificate_issue").await?;
    let written = write_issued(
        &mut tx,
        vault,
        name,
        p,
        issued,
        enabled,
        tags,
        base_version,
        state,
    )
    .await?;
    if written.is_some() {
        tx.commit().await?;
    }
    Ok(written)
}

/// Whether `st` still has operation `request_id` in progress.
fn in_progress(st: &CertState, request_id: &str) -> bool {
    st.pending
        .as_ref()
        .is_some_and(|c| c.request_id == request_id && c.status == IN_PROGRESS)
}

/// Finish a pending Self / Keyless operation: in the background after a create (started
/// once the create is committed), or by the scheduler resuming one a restart interrupted.
/// The key is generated with no unit of work open; the write then checks, in its own unit of
/// work, that the operation is still in progress (not cancelled, deleted or replaced) and
/// that no other version was written since it started.
pub async fn complete(s: &AppState, vault: &str, name: &str, request_id: &str) {
    if let Err(e) = finish(s, vault, name, request_id).await {
        tracing::error!(error = %e, vault = %vault, certificate = %name, "certificate issuance failed");
        let failed =
            json!({"code": "InternalError", "message": "The certificate could not be issued."});
        if let Err(e) = fail(s, vault, name, request_id, failed).await {
            tracing::warn!(error = %e, vault = %vault, certificate = %name, "recording a failed certificate issuance failed");
        }
    }
}

async fn finish(s: &AppState, vault: &str, name: &str, request_id: &str) -> Result<()> {
    let st = {
        let mut tx = s.store.read("kv_certificate_pending").await?;
        load_state(&mut tx, vault, name).await?
    };
    let Some(st) = st else { return Ok(()) };
    let Some(p) = st.policy.clone() else {
        return Ok(());
    };
    let Some(pe) = st.pending.clone().filter(|_| in_progress(&st, request_id)) else {
        return Ok(());
    };
    if pe.cancellation_requested {
        return Ok(());
    }
    let issued = prepare(s, &p, None).await?;
    let mut tx = s.store.write("kv_certificate_issue").await?;
    let Some(cur) = load_state(&mut tx, vault, name).await? else {
        return Ok(());
    };
    // cancelled, deleted or finished by another pass (a resumed issuance racing this one)
    // while the key was generated: nothing to do
    if !in_progress(&cur, request_id)
        || cur
            .pending
            .as_ref()
            .is_some_and(|c| c.cancellation_requested)
    {
        return Ok(());
    }
    let written = write_issued(
        &mut tx,
        vault,
        name,
        &p,
        issued,
        pe.enabled.unwrap_or(true),
        pe.tags.clone(),
        pe.base_version.clone(),
        cur.clone(),
    )
    .await?;
    if written.is_none() {
        // another version was written while this operation was in progress: it failed
        let mut cur = cur;
        if let Some(c) = cur.pending.as_mut() {
            c.status = "failed".into();
            c.error = Some(
                json!({"code": "Conflict", "message": "Another version of the certificate was created while this one was in progress; create it again."}),
            );
        }
        save_state(&mut tx, vault, name, &cur).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Mark operation `request_id` failed with `error`, if it is still in progress.
async fn fail(s: &AppState, vault: &str, name: &str, request_id: &str, error: Value) -> Result<()> {
    let mut tx = s.store.write("kv_certificate_issue_failed").await?;
    let Some(mut st) = load_state(&mut tx, vault, name).await? else {
        return Ok(());
    };
    if !in_progress(&st, request_id) {
        return Ok(());
    }
    if let Some(c) = st.pending.as_mut() {
        c.status = "failed".into();
        c.error = Some(error);
    }
    save_state(&mut tx, vault, name, &st).await?;
    tx.commit().await?;
    Ok(())
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    policy: Option<Policy>,
    attributes: Option<AttrsIn>,
    tags: Option<BTreeMap<String, String>>,
}

async fn refuse_plain_objects(ctx: &Ctx<'_>, tx: &mut Tx, name: &str) -> Result<()> {
    for coll in ["secrets", "keys"] {
        if let Some(n) = tx.kv_name(ctx.vname, coll, name).await? {
            let managed = tx
                .kv_version(ctx.vname, coll, name, None)
                .await?
                .is_some_and(|v| v.managed);
            if !managed || n.deleted.is_some() {
                return Err(ServerError::kv(
                    KvKind::Conflict(None),
                    format!(
                        "A {} named {name} already exists; certificate names cannot reuse it.",
                        &coll[..coll.len() - 1]
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    let t: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    STANDARD
        .decode(&t)
        .ok()
        .or_else(|| URL_SAFE_NO_PAD.decode(t.trim_end_matches('=')).ok())
}

pub async fn handle(
    ctx: &Ctx<'_>,
    tx: &mut Tx,
    m: &Method,
    target: Target,
    body: &[u8],
) -> Result<Response> {
    if let Some(r) = common::<Certs>(ctx, tx, m, &target, body).await? {
        return Ok(r);
    }
    let base = ctx.base;
    match (m, target) {
        (&Method::POST, Target::CertCreate(name)) => {
            ctx.name(Coll::Certificates, &name)?;
            ctx.authorize(tx, Coll::Certificates, Op::Create, Some(&name)).await?;
            let b: CreateBody = parse_body(body)?;
            check_tags(&b.tags)?;
            let n = tx.kv_name(ctx.vname, "certificates", &name).await?;
            if n.as_ref().is_some_and(|n| n.deleted.is_some()) {
                return Err(ctx.is_deleted_conflict(Coll::Certificates, &name));
            }
            let mut st: CertState = n.map(|n| serde_json::from_value(n.extra).unwrap_or_default()).unwrap_or_default();
            let p = match (b.policy, &st.policy) {
                (Some(p), _) => p,
                (None, Some(cur)) => cur.clone(),
                (None, None) => return Err(bad("A policy is required to create a certificate.")),
            };
            let mut p = p.normalize(true).map_err(bad)?;
            let issuer = p.issuer_name().to_string();
            if ![ISSUER_SELF, ISSUER_UNKNOWN, ISSUER_KEYLESS].contains(&issuer.as_str()) {
                return Err(bad(format!("The issuer '{issuer}' is not known. Use Self, Unknown, or Keyless (the Keyless CA).")));
            }
            if st.pending.as_ref().is_some_and(|pe| pe.status == IN_PROGRESS) {
                return Err(ServerError::kv(KvKind::Conflict(None), format!("Certificate {name} has a pending operation in progress; wait for it, or cancel or delete it.")));
            }
            refuse_plain_objects(ctx, tx, &name).await?;
            let attrs = p.attributes.get_or_insert_with(Default::default);
            attrs.created = Some(attrs.created.unwrap_or(ctx.now));
            attrs.updated = Some(ctx.now);
            let request_id = uuid::Uuid::new_v4().simple().to_string();
            let mut pe = Pending {
                request_id: request_id.clone(),
                status: IN_PROGRESS.into(),
                issuer: issuer.clone(),
                enabled: b.attributes.as_ref().and_then(|a| a.enabled),
                tags: b.tags.unwrap_or_default(),
                base_version: latest_version(tx, ctx.vname, &name).await?,
                started: ctx.s.now(),
                ..Default::default()
            };
            if issuer == ISSUER_UNKNOWN {
                let key = ctx.key(key_type_of(&p)).await?;
                let csr = keyless_pki::kv::csr(&spec_of(&p, ctx.now), &key)?;
                tx.put_secret(&pending_key_name(ctx.vname, &name), key.pkcs8()).await?;
                pe.csr = Some(STANDARD.encode(csr));
            }
            st.policy = Some(p);
            st.pending = Some(pe.clone());
            tx.kv_set_extra(ctx.vname, "certificates", &name, &json!(st)).await?;
            if issuer != ISSUER_UNKNOWN {
                ctx.start_issuance(&name, &request_id);
            }
            let mut resp = (StatusCode::ACCEPTED, Json(op_json(base, &name, &pe))).into_response();
            let loc = format!("{base}/certificates/{name}/pending?api-version={}&request_id={request_id}", ctx.api_version);
            if let Ok(v) = HeaderValue::from_str(&loc) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            Ok(resp)
        }
        (_, Target::CertPending(name)) => {
            ctx.name(Coll::Certificates, &name)?;
            let op = match *m {
                Method::GET => Op::Get,
                Method::PATCH => Op::Update,
                Method::DELETE => Op::Delete,
                _ => return Err(method_not_allowed(m)),
            };
            ctx.authorize(tx, Coll::Certificates, op, Some(&name)).await?;
            let not_found = || ServerError::kv(KvKind::NotFound("PendingCertificateNotFound"), format!("Pending certificate not found: {name}"));
            let mut st = load_state(tx, ctx.vname, &name).await?.ok_or_else(not_found)?;
            let mut pe = st.pending.clone().ok_or_else(not_found)?;
            match *m {
                Method::PATCH => {
                    let b: Value = parse_body(body)?;
                    if b["cancellation_requested"].as_bool() == Some(true) {
                        pe.cancellation_requested = true;
                        if pe.status == IN_PROGRESS {
                            pe.status = "cancelled".into();
                        }
                    }
                    st.pending = Some(pe.clone());
                    save_state(tx, ctx.vname, &name, &st).await?;
                }
                Method::DELETE => {
                    st.pending = None;
                    save_state(tx, ctx.vname, &name, &st).await?;
                    tx.delete_secret(&pending_key_name(ctx.vname, &name)).await?;
                }
                _ => {}
            }
            let mut resp = Json(op_json(base, &name, &pe)).into_response();
            if pe.status == IN_PROGRESS {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            }
            Ok(resp)
        }
        (&Method::POST, Target::CertMerge(name)) => {
            ctx.name(Coll::Certificates, &name)?;
            ctx.authorize(tx, Coll::Certificates, Op::Create, Some(&name)).await?;
            #[derive(serde::Deserialize)]
            struct MergeBody {
                x5c: Option<Vec<String>>,
                attributes: Option<AttrsIn>,
                tags: Option<BTreeMap<String, String>>,
            }
            let b: MergeBody = parse_body(body)?;
            check_tags(&b.tags)?;
            let not_found = || ServerError::kv(KvKind::NotFound("PendingCertificateNotFound"), format!("Pending certificate not found: {name}"));
            let st = load_state(tx, ctx.vname, &name).await?.ok_or_else(not_found)?;
            let pe = st.pending.clone().filter(|p| p.status == IN_PROGRESS && p.issuer == ISSUER_UNKNOWN).ok_or_else(not_found)?;
            let p = st.policy.clone().ok_or_else(not_found)?;
            let chain: Vec<Vec<u8>> = b
                .x5c
                .unwrap_or_default()
                .iter()
                .map(|c| decode_b64(c).ok_or_else(|| bad("x5c must hold base64 DER certificates.")))
                .collect::<Result<_>>()?;
            if chain.is_empty() {
                return Err(bad("x5c must hold at least the issued certificate."));
            }
            let key_der = tx.get_secret(&pending_key_name(ctx.vname, &name)).await?.ok_or_else(not_found)?;
            let key = KvKey::from_pkcs8(&key_der)?;
            keyless_pki::kv::cert_info(&chain[0]).map_err(|e| bad(format!("The certificate is invalid: {e}")))?;
            if !keyless_pki::kv::cert_matches_key(&chain[0], &key) {
                return Err(bad("The certificate's public key does not match the pending request's key."));
            }
            let version = uuid::Uuid::new_v4().simple().to_string();
            let display = tx.kv_name(ctx.vname, "certificates", &name).await?.map(|n| n.name).unwrap_or(name.clone());
            let enabled = b.attributes.as_ref().and_then(|a| a.enabled).or(pe.enabled).unwrap_or(true);
            let tags = b.tags.unwrap_or(pe.tags.clone());
            let versions = triple(ctx.vname, &display, &version, ctx.now, &p, &key, &chain, enabled, tags)?;
            let mut st2 = st.clone();
            if let Some(pe) = st2.pending.as_mut() {
                pe.status = "completed".into();
                pe.target_version = Some(version.clone());
            }
            ctx.write(tx, Coll::Certificates, &name, &KvWrite { versions: versions.clone(), extra: Some(("certificates".into(), json!(st2))), expect_latest: None }).await?;
            // the pending key now lives (sealed) in the key version
            tx.delete_secret(&pending_key_name(ctx.vname, &name)).await?;
            let mut out = Certs::bundle(ctx, &versions[0], false);
            out["policy"] = policy_json(base, &display, &p);
            Ok((StatusCode::CREATED, Json(out)).into_response())
        }
        (&Method::POST, Target::CertImport(name)) => {
            ctx.name(Coll::Certificates, &name)?;
            ctx.authorize(tx, Coll::Certificates, Op::Import, Some(&name)).await?;
            #[derive(serde::Deserialize)]
            struct ImportBody {
                value: Option<String>,
                pwd: Option<String>,
                policy: Option<Policy>,
                attributes: Option<AttrsIn>,
                tags: Option<BTreeMap<String, String>>,
            }
            let b: ImportBody = parse_body(body)?;
            check_tags(&b.tags)?;
            let value = b.value.ok_or_else(|| bad("The certificate value is required."))?;
            let (key, chain, format) = if value.trim_start().starts_with("-----BEGIN") {
                let (k, c) = keyless_pki::kv::parse_pem(&value).map_err(|e| bad(format!("The PEM is invalid: {e}")))?;
                (k, c, policy::PEM)
            } else {
                let raw = decode_b64(&value).ok_or_else(|| bad("The certificate value is neither PEM nor base64."))?;
                match std::str::from_utf8(&raw).ok().filter(|t| t.trim_start().starts_with("-----BEGIN")) {
                    Some(text) => {
                        let (k, c) = keyless_pki::kv::parse_pem(text).map_err(|e| bad(format!("The PEM is invalid: {e}")))?;
                        (k, c, policy::PEM)
                    }
                    None => {
                        let (k, c) = keyless_pki::kv::parse_pfx(&raw, b.pwd.as_deref().unwrap_or(""))
                            .map_err(|e| bad(format!("The PFX could not be read (wrong password?): {e}")))?;
                        (k, c, policy::PKCS12)
                    }
                }
            };
            let key = key.ok_or_else(|| bad("The imported certificate must include its private key."))?;
            if chain.is_empty() {
                return Err(bad("The import holds no certificate."));
            }
            if !keyless_pki::kv::cert_matches_key(&chain[0], &key) {
                return Err(bad("The private key does not match the certificate."));
            }
            let n = tx.kv_name(ctx.vname, "certificates", &name).await?;
            if n.as_ref().is_some_and(|n| n.deleted.is_some()) {
                return Err(ctx.is_deleted_conflict(Coll::Certificates, &name));
            }
            refuse_plain_objects(ctx, tx, &name).await?;
            let info = keyless_pki::kv::cert_info(&chain[0])?;
            let given_ct = b.policy.as_ref().and_then(|p| p.secret_props.as_ref()).and_then(|s| s.content_type.clone());
            let imported = policy::ImportedCert {
                subject: info.subject.clone(),
                sans: policy::Sans {
                    dns_names: info.dns_names.clone(),
                    emails: info.emails.clone(),
                    upns: info.upns.clone(),
                    uris: info.uris.clone(),
                    ip_addresses: info.ip_addresses.clone(),
                },
                ekus: info.ekus.clone(),
                key_usage: info.key_usage.clone(),
                not_before: info.not_before,
                not_after: info.not_after,
                key: info.key_type.map(|k| match k {
                    KeyType::Rsa { bits } => KeySpec::Rsa(bits),
                    KeyType::Ec { curve } => KeySpec::Ec(match curve {
                        Curve::P256 => "P-256",
                        Curve::P384 => "P-384",
                        Curve::P521 => "P-521",
                    }),
                }),
                exportable: b.policy.as_ref().and_then(|p| p.key_props.as_ref()).and_then(|k| k.exportable).unwrap_or(true),
                content_type: given_ct.unwrap_or_else(|| format.to_string()),
            };
            let mut p = policy::imported_policy(&imported, b.policy).map_err(bad)?;
            let attrs = p.attributes.get_or_insert_with(Default::default);
            attrs.created = Some(ctx.now);
            attrs.updated = Some(ctx.now);
            let version = uuid::Uuid::new_v4().simple().to_string();
            let display = n.map(|n| n.name).unwrap_or(name.clone());
            let enabled = b.attributes.as_ref().and_then(|a| a.enabled).unwrap_or(true);
            let versions = triple(ctx.vname, &display, &version, ctx.now, &p, &key, &chain, enabled, b.tags.unwrap_or_default())?;
            let st = CertState { policy: Some(p.clone()), pending: None, events: vec![] };
            ctx.write(tx, Coll::Certificates, &name, &KvWrite { versions: versions.clone(), extra: Some(("certificates".into(), json!(st))), expect_latest: None }).await?;
            let mut out = Certs::bundle(ctx, &versions[0], false);
            out["policy"] = policy_json(base, &display, &p);
            Ok(Json(out).into_response())
        }
        (&Method::GET, Target::CertPolicy(name)) | (&Method::PATCH, Target::CertPolicy(name)) => {
            ctx.name(Coll::Certificates, &name)?;
            let patch = *m == Method::PATCH;
            ctx.authorize(tx, Coll::Certificates, if patch { Op::Update } else { Op::Get }, Some(&name)).await?;
            let mut st = load_state(tx, ctx.vname, &name).await?.ok_or_else(|| ctx.not_found(Coll::Certificates, &name, None))?;
            let cur = st.policy.clone().ok_or_else(|| ctx.not_found(Coll::Certificates, &name, None))?;
            let p = if patch {
                let b: Policy = parse_body(body)?;
                let mut p = cur.merged(b).normalize(false).map_err(bad)?;
                let attrs = p.attributes.get_or_insert_with(Default::default);
                attrs.created = cur.attributes.as_ref().and_then(|a| a.created);
                attrs.updated = Some(ctx.now);
                st.policy = Some(p.clone());
                save_state(tx, ctx.vname, &name, &st).await?;
                p
            } else {
                cur
            };
            Ok(Json(policy_json(base, &name, &p)).into_response())
        }
        (&Method::GET, Target::Object { name, version, .. }) => {
            ctx.name(Coll::Certificates, &name)?;
            ctx.authorize(tx, Coll::Certificates, Op::Get, Some(&name)).await?;
            let v = ctx.live_version(tx, Coll::Certificates, &name, version.as_deref()).await?;
            let mut out = Certs::bundle(ctx, &v, false);
            if let Some(st) = load_state(tx, ctx.vname, &name).await? {
                if let Some(p) = &st.policy {
                    out["policy"] = policy_json(base, &v.name, p);
                }
                if st.pending.as_ref().is_some_and(|p| p.status == IN_PROGRESS) {
                    out["pending"] = json!({"id": format!("{base}/certificates/{}/pending", v.name)});
                }
            }
            Ok(Json(out).into_response())
        }
        (&Method::PATCH, Target::Object { name, version, .. }) => {
            ctx.name(Coll::Certificates, &name)?;
            ctx.authorize(tx, Coll::Certificates, Op::Update, Some(&name)).await?;
            #[derive(serde::Deserialize)]
            struct Patch {
                attributes: Option<AttrsIn>,
                tags: Option<BTreeMap<String, String>>,
                policy: Option<Policy>,
            }
            let b: Patch = parse_body(body)?;
            check_tags(&b.tags)?;
            let mut v = ctx.live_version(tx, Coll::Certificates, &name, version.as_deref()).await?;
            let enabled = b.attributes.as_ref().and_then(|a| a.enabled);
            if let Some(t) = b.tags {
                v.tags = t;
            }
            if let Some(e) = enabled {
                v.enabled = e;
                // the key and secret of this version follow
                for coll in ["keys", "secrets"] {
                    if let Some(mut o) = tx.kv_version(ctx.vname, coll, &name, Some(&v.version)).await? {
                        o.enabled = e;
                        o.updated = ctx.now;
                        tx.kv_update_version(&o).await?;
                    }
                }
            }
            v.updated = ctx.now;
            tx.kv_update_version(&v).await?;
            let mut st = load_state(tx, ctx.vname, &name).await?.unwrap_or_default();
            if let (Some(patch), Some(cur)) = (b.policy, st.policy.clone()) {
                st.policy = Some(cur.merged(patch).normalize(false).map_err(bad)?);
                save_state(tx, ctx.vname, &name, &st).await?;
            }
            let mut out = Certs::bundle(ctx, &v, false);
            if let Some(p) = &st.policy {
                out["policy"] = policy_json(base, &v.name, p);
            }
            Ok(Json(out).into_response())
        }
        (_, Target::Contacts) => {
            ctx.authorize(tx, Coll::Certificates, Op::ManageContacts, None).await?;
            let id = format!("{base}/certificates/contacts");
            let cur = tx.kv_name(ctx.vname, "settings", "contacts").await?.map(|n| n.extra).filter(|e| e.get("contacts").is_some());
            match *m {
                Method::GET => {
                    let c = cur.ok_or_else(|| ServerError::kv(KvKind::NotFound("ContactsNotFound"), "Contacts not found"))?;
                    Ok(Json(json!({"id": id, "contacts": c["contacts"]})).into_response())
                }
                Method::PUT => {
                    let b: Value = parse_body(body)?;
                    let list = b["contacts"].as_array().cloned().ok_or_else(|| bad("The parameter 'contacts' is required."))?;
                    if list.iter().any(|c| !c["email"].is_string()) {
                        return Err(bad("Every contact needs an email address."));
                    }
                    tx.kv_set_extra(ctx.vname, "settings", "contacts", &json!({"contacts": list})).await?;
                    Ok(Json(json!({"id": id, "contacts": list})).into_response())
                }
                Method::DELETE => {
                    let c = cur.ok_or_else(|| ServerError::kv(KvKind::NotFound("ContactsNotFound"), "Contacts not found"))?;
                    tx.kv_set_extra(ctx.vname, "settings", "contacts", &json!({})).await?;
                    Ok(Json(json!({"id": id, "contacts": c["contacts"]})).into_response())
                }
                _ => Err(method_not_allowed(m)),
            }
        }
        (&Method::GET, Target::Issuers) => {
            ctx.authorize(tx, Coll::Certificates, Op::ListIssuers, None).await?;
            Ok(Json(json!({"value": [], "nextLink": null})).into_response())
        }
        (_, Target::Issuer(_)) => Err(bad("Certificate issuer objects are not supported; use the issuers Self, Unknown or Keyless (the Keyless CA).")),
        (m, _) => Err(method_not_allowed(m)),
    }
}
