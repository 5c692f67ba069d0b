//! The Key Vault data plane: one HTTPS listener serves every vault by host name
//! (`{vault}.vault.{domain}`). Order of checks, as the SDKs need it: authentication (401 with
//! the challenge before anything else), api-version, path, vault, authorization (access
//! policies or RBAC data actions), then the body.
//!
//! Each request is one unit of work of the store, opened after authentication: a read for
//! `GET`/`HEAD` and the cryptographic key operations, a write otherwise. The handlers take it
//! as `tx: &mut Tx`; it is committed when the handler answered with a success and rolled back
//! otherwise. New keys are generated outside it ([`Ctx::key`]) and certificate issuance runs
//! in the background in units of work of its own, started after the commit.
//!
//! A read finds its vault (record, access policies and settings parsed) in the vault cache
//! (`crate::cache`, kept in step across servers by the store's change feed; see there for the
//! staleness bound); a write, or a read that misses, reads it in its unit of work. A secret GET
//! with its vault cached is one indexed statement (`Tx::kv_live_version`).

pub mod arm_secrets;
pub mod backup;
pub mod certs;
pub mod keys;
pub mod renew;
pub mod secrets;

use crate::caches::vaults::CachedVault;
use crate::caches::vaults::VaultSettings;
use crate::error::{KvKind, Result, ServerError, Shape};
use crate::request::Caller;
use crate::state::AppState;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::claims::JwtError;
use keyless_core::vault::access::{self, Op};
use keyless_core::vault::route::{self, Target};
use keyless_core::vault::{self as kvrules, paging, Coll};
use keyless_pki::kv::{KeyType, KvKey};
use keyless_store::{KvVersionRecord, KvWrite, KvWriteOutcome, Tx, VaultRecord};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex, OnceLock};

/// Largest data-plane request body (an imported PFX in base64 fits many times over).
const MAX_BODY: usize = 1024 * 1024;
/// Largest secret value (Azure: 25 KB).
pub const MAX_SECRET_VALUE: usize = 25 * 1024;

/// The vault a request's `Host` names, if it is a data-plane host.
pub fn vault_host(s: &AppState, headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    kvrules::vault_from_host(host, &s.cfg.vault_domain).map(|v| v.to_ascii_lowercase())
}

/// Serve one data-plane request. Store errors answer in the Key Vault's shape (503 with
/// `Retry-After` when the database is unavailable).
pub async fn handle(s: Arc<AppState>, vault: String, req: Request) -> Response {
    crate::error::in_surface(Shape::KeyVault, handle_in_surface(s, vault, req)).await
}

async fn handle_in_surface(s: Arc<AppState>, vault: String, req: Request) -> Response {
    // the request edge's id (it answers with it); a request driven without the edge gets one
    let request_id = match req.extensions().get::<keyless_ops::request::RequestId>() {
        Some(id) => id.0.clone(),
        None => keyless_ops::request::new_request_id(),
    };
    let client_request_id = req.headers().get("x-ms-client-request-id").cloned();
    let method = req.method().clone();
    let mut seen = Seen::default();
    let (mut resp, reason) = match serve(&s, &vault, req, &mut seen).await {
        Ok(r) => (r, None),
        Err(e) => {
            let (_, code) = e.status_and_code();
            (e.into_response(), Some(code))
        }
    };
    let ev = seen.event(&vault, &method, resp.status().as_u16(), reason);
    s.cfg.audit.key_vault(ev).await;
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert("x-ms-request-id", v);
    }
    h.insert(
        "x-ms-keyvault-service-version",
        HeaderValue::from_static("1.9.0.0"),
    );
    h.insert("x-ms-keyvault-region", HeaderValue::from_static("local"));
    if let Some(c) = client_request_id {
        h.insert("x-ms-client-request-id", c);
    }
    resp
}

/// Context of one authenticated, authorized-to-enter request.
pub struct Ctx<'a> {
    pub s: &'a AppState,
    /// The vault (from the vault cache, or read in the request's unit of work).
    pub vault: &'a VaultRecord,
    pub settings: &'a VaultSettings,
    /// Vault name, lowercase (the store's key).
    pub vname: &'a str,
    /// `https://{host}[:port]` as the client addressed us.
    pub base: &'a str,
    pub caller: &'a Caller,
    pub now: u64,
    pub query: &'a [(String, String)],
    pub api_version: &'a str,
    pub path: &'a str,
    /// The first operation [`Ctx::authorize`] was asked about (the audit record's).
    pub authorized: OnceLock<(Coll, Op)>,
    /// Keys generated outside the unit of work ([`Ctx::key`]).
    keygen: &'a KeyGen,
    /// Issuance to start after the commit ([`Ctx::start_issuance`]).
    issuance: OnceLock<Issuance>,
}

fn unauthorized(challenge: &str, message: impl Into<String>) -> ServerError {
    ServerError::kv_unauthorized(challenge, message)
}

pub fn bad(message: impl Into<String>) -> ServerError {
    ServerError::kv(KvKind::BadParameter, message)
}

/// The audiences a vault accepts: the advertised resource (with and without its port), and
/// Azure's Key Vault audiences.
fn audience_list(resource: &str, domain: &str) -> Vec<String> {
    let bare = format!("https://vault.{domain}");
    vec![
        resource.to_string(),
        format!("{resource}/"),
        bare.clone(),
        format!("{bare}/"),
        "https://vault.azure.net".into(),
        "https://vault.azure.net/".into(),
        "cfa8b339-82a2-471a-a3c9-0fc0be7a4093".into(),
    ]
}

/// Lists of audiences made per resource, kept for the next requests (a server sees one or two
/// resources — its port — so this stays tiny; past [`AUDIENCE_LISTS`] a list is made each
/// time, so `Host` headers cannot grow it).
static AUDIENCES: std::sync::RwLock<Vec<(String, Arc<[String]>)>> =
    std::sync::RwLock::new(Vec::new());
const AUDIENCE_LISTS: usize = 8;

/// [`audience_list`] for `resource` (which names `domain`), made once.
fn audiences(resource: &str, domain: &str) -> Arc<[String]> {
    let cached = AUDIENCES
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(r, _)| r == resource)
        .map(|(_, l)| l.clone());
    if let Some(l) = cached {
        return l;
    }
    let list: Arc<[String]> = audience_list(resource, domain).into();
    let mut all = AUDIENCES.write().unwrap_or_else(|p| p.into_inner());
    if all.len() < AUDIENCE_LISTS && !all.iter().any(|(r, _)| r == resource) {
        all.push((resource.to_string(), list.clone()));
    }
    list
}

fn authenticate(s: &AppState, headers: &HeaderMap, resource: &str) -> Result<Caller> {
    // the challenge of a 401 (built only for one)
    let challenge = || kvrules::challenge(&s.base_url, &s.tenant_id, resource);
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            &challenge(),
            "AKV10000: Request is missing a Bearer or PoP token.",
        ));
    };
    let token = crate::request::bearer(value).ok_or_else(|| {
        unauthorized(
            &challenge(),
            "AKV10000: Request is missing a Bearer or PoP token.",
        )
    })?;
    let claims = crate::tokens::verify(s, token, &audiences(resource, &s.cfg.vault_domain))
        .map_err(|e| {
            let m = match e {
                JwtError::Audience(a) => {
                    format!("AKV10022: Invalid audience. Expected {resource}, found: {a}.")
                }
                JwtError::Expired => "AKV10013: The token has expired.".to_string(),
                JwtError::Issuer(i) => format!(
                    "AKV10032: Invalid issuer. Expected one of {}, found: {i}.",
                    s.issuer_v1()
                ),
                _ => "AKV10000: The token is invalid: its signature could not be verified.".into(),
            };
            unauthorized(&challenge(), m)
        })?;
    let str_claim = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let object_id = claims
        .get("oid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    if object_id.is_empty() {
        return Err(unauthorized(
            &challenge(),
            "AKV10000: The token has no oid claim.",
        ));
    }
    Ok(Caller {
        object_id,
        client_id: str_claim("appid"),
    })
}

/// What the audit record of a data-plane request learns while it is served (never a value).
#[derive(Default)]
struct Seen {
    caller: Option<Caller>,
    target: Option<Target>,
    /// The operation authorized (or refused) by [`Ctx::authorize`].
    op: Option<(Coll, Op)>,
}

impl Seen {
    fn event(
        self,
        vault: &str,
        m: &Method,
        status: u16,
        reason: Option<String>,
    ) -> keyless_ops::audit::KeyVaultEvent {
        use keyless_ops::audit::{Caller as Who, KeyVaultEvent};
        let (coll, name, version) = match &self.target {
            Some(Target::Object {
                coll,
                name,
                version,
                ..
            }) => (Some(*coll), Some(name.clone()), version.clone()),
            Some(Target::KeyOperation { name, version, .. }) => {
                (Some(Coll::Keys), Some(name.clone()), version.clone())
            }
            Some(
                Target::DeletedItem(c, n)
                | Target::Recover(c, n)
                | Target::Versions(c, n)
                | Target::Backup(c, n),
            ) => (Some(*c), Some(n.clone()), None),
            Some(Target::List(c) | Target::Deleted(c) | Target::Restore(c)) => {
                (Some(*c), None, None)
            }
            Some(Target::KeyCreate(n) | Target::KeyRotate(n) | Target::KeyRotationPolicy(n)) => {
                (Some(Coll::Keys), Some(n.clone()), None)
            }
            Some(
                Target::CertCreate(n)
                | Target::CertImport(n)
                | Target::CertPending(n)
                | Target::CertMerge(n)
                | Target::CertPolicy(n)
                | Target::Issuer(n),
            ) => (Some(Coll::Certificates), Some(n.clone()), None),
            Some(Target::Contacts | Target::Issuers) => (Some(Coll::Certificates), None, None),
            None => (None, None, None),
        };
        // Key Vault's AuditEvent names: SecretGet, KeySign, CertificateCreate, …; before
        // authorization, the collection and the method
        let operation = match (self.op, coll) {
            (Some((c, op)), _) => format!("{}{op:?}", c.noun()),
            (None, c) => format!(
                "{}{}",
                c.map(Coll::noun).unwrap_or("Vault"),
                match *m {
                    Method::GET => "Get",
                    Method::PUT => "Set",
                    Method::PATCH => "Update",
                    Method::DELETE => "Delete",
                    _ => "Action",
                }
            ),
        };
        KeyVaultEvent {
            caller: self
                .caller
                .map(|c| Who {
                    object_id: Some(c.object_id),
                    client_id: Some(c.client_id).filter(|a| !a.is_empty()),
                    ..Default::default()
                })
                .unwrap_or_default(),
            vault: vault.to_string(),
            collection: coll.map(|c| c.path().to_string()),
            name,
            version: version.filter(|v| !v.is_empty()),
            operation,
            status,
            reason,
        }
    }
}

/// The unit of work a request runs in: reads (`GET`, `HEAD`, and the cryptographic key
/// operations, which only read the key) share one snapshot; everything else is one write.
fn unit_of_work(m: &Method, target: &Target) -> (&'static str, bool) {
    match (m, target) {
        (_, Target::KeyOperation { .. }) => ("kv_key_operation", false),
        (&Method::GET | &Method::HEAD, _) => ("kv_read", false),
        _ => ("kv_write", true),
    }
}

/// Passes of a handler that asks for a new key ([`Ctx::key`]); the last one generates the key
/// in place (only reached when the key type changed between passes).
const KEYGEN_PASSES: u32 = 3;

/// A key a handler needs, generated between two passes of the handler while no unit of work
/// is open (an RSA 4096 key takes long enough to stall every other writer of the database).
#[derive(Default)]
struct KeyGen(Mutex<KeyGenState>);

#[derive(Default)]
struct KeyGenState {
    /// The key type the last pass asked for.
    wanted: Option<KeyType>,
    /// The key generated for the next pass.
    ready: Option<KvKey>,
    /// Generate in the handler (the last pass).
    in_place: bool,
}

impl KeyGen {
    fn state(&self) -> std::sync::MutexGuard<'_, KeyGenState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A certificate issuance to start once the request's unit of work is committed (so the
/// background task finds the pending operation).
struct Issuance {
    vault: String,
    name: String,
    request_id: String,
}

async fn serve(s: &Arc<AppState>, vault: &str, req: Request, seen: &mut Seen) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let host = host.strip_suffix(":443").unwrap_or(&host);
    let resource = match host.rsplit_once(':') {
        Some((_, p)) => format!("https://vault.{}:{p}", s.cfg.vault_domain),
        None => format!("https://vault.{}", s.cfg.vault_domain),
    };
    // the audit record keeps the caller; the request borrows it from there
    let caller: &Caller = seen
        .caller
        .insert(authenticate(s, &parts.headers, &resource)?);

    let query: Vec<(String, String)> = serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
        .map_err(|_| bad("The query string is malformed."))?;
    let api_version: &str = query
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("api-version"))
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| bad("The api-version query parameter is required."))?;
    if !kvrules::data_api_version_ok(api_version) {
        return Err(bad(format!(
            "The specified version ({api_version}) is not recognized. Consider using the latest supported version ({}).",
            kvrules::LATEST_DATA_API_VERSION
        )));
    }
    let path = parts.uri.path();
    let target = route::parse(path).ok_or_else(|| {
        ServerError::kv(
            KvKind::NotFound("NotFound"),
            format!("The path '{path}' is not served by this vault."),
        )
    })?;
    seen.target = Some(target.clone());
    // the body is read before the unit of work opens (a slow client holds no transaction); a
    // body too large is still answered after the vault lookup
    let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| ());
    let m = parts.method;
    let (operation, write) = unit_of_work(&m, &target);
    let base = format!("https://{host}");
    let keygen = KeyGen::default();
    let mut pass = 0;
    loop {
        pass += 1;
        keygen.state().in_place = pass >= KEYGEN_PASSES;
        // the vault: a read takes it from the cache (no lookup, nothing parsed); a write, or a
        // read that misses, reads it in its unit of work (so a write never acts on a vault
        // changed or deleted through another server) and offers it to the cache with a ticket
        // taken before the unit of work began
        let cached = if write { None } else { s.vaults.get(vault) };
        let ticket = s.vaults.ticket();
        let mut tx = if write {
            s.store.write(operation).await?
        } else {
            s.store.read(operation).await?
        };
        let entry = match cached {
            Some(v) => v,
            None => {
                let rec = tx.get_vault_by_name(vault).await?.ok_or_else(|| {
                    ServerError::kv(
                        KvKind::NotFound("VaultNotFound"),
                        format!("The vault '{vault}' does not exist."),
                    )
                })?;
                let v = Arc::new(CachedVault::new(rec));
                s.vaults.insert(ticket, v.clone());
                v
            }
        };
        let body = body.as_ref().map_err(|_| {
            ServerError::kv(
                KvKind::TooLarge,
                format!("The request body exceeds {MAX_BODY} bytes."),
            )
        })?;
        let ctx = Ctx {
            s,
            vault: &entry.record,
            settings: &entry.settings,
            vname: &entry.name,
            base: &base,
            caller,
            now: s.vault_clock.now(),
            query: &query,
            api_version,
            path,
            authorized: Default::default(),
            keygen: &keygen,
            issuance: Default::default(),
        };
        let r = dispatch(&ctx, &mut tx, &m, target.clone(), body).await;
        seen.op = ctx.authorized.get().copied();
        let wanted = keygen.state().wanted.take();
        if let Some(t) = wanted {
            // the handler needs a new key and wrote nothing yet: end the unit of work,
            // generate the key outside any transaction, and run the handler again with it
            drop(tx);
            let key = keys::generate(t).await?;
            keygen.state().ready = Some(key);
            continue;
        }
        let resp = r?;
        tx.commit().await?;
        if let Some(i) = ctx.issuance.into_inner() {
            let s = s.clone();
            tokio::spawn(async move {
                certs::complete(&s, &i.vault, &i.name, &i.request_id).await;
            });
        }
        return Ok(resp);
    }
}

async fn dispatch(
    ctx: &Ctx<'_>,
    tx: &mut Tx,
    m: &Method,
    target: Target,
    body: &[u8],
) -> Result<Response> {
    match &target {
        Target::List(c)
        | Target::Deleted(c)
        | Target::DeletedItem(c, _)
        | Target::Recover(c, _)
        | Target::Restore(c)
        | Target::Versions(c, _)
        | Target::Backup(c, _)
        | Target::Object { coll: c, .. } => match c {
            Coll::Secrets => secrets::handle(ctx, tx, m, target, body).await,
            Coll::Keys => keys::handle(ctx, tx, m, target, body).await,
            Coll::Certificates => certs::handle(ctx, tx, m, target, body).await,
        },
        Target::KeyCreate(_)
        | Target::KeyRotate(_)
        | Target::KeyRotationPolicy(_)
        | Target::KeyOperation { .. } => keys::handle(ctx, tx, m, target, body).await,
        _ => certs::handle(ctx, tx, m, target, body).await,
    }
}

pub fn method_not_allowed(m: &Method) -> ServerError {
    ServerError::kv(
        KvKind::MethodNotAllowed,
        format!("The method {m} is not allowed on this path."),
    )
}

/// Parse a JSON object body; 400 `BadParameter` otherwise.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("The request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("The request body must be a JSON object."));
    }
    serde_json::from_value(v).map_err(|e| bad(format!("The request body is invalid: {e}")))
}

/// Attributes as sent in requests.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct AttrsIn {
    pub enabled: Option<bool>,
    pub nbf: Option<u64>,
    pub exp: Option<u64>,
    pub exportable: Option<bool>,
}

pub fn check_tags(tags: &Option<std::collections::BTreeMap<String, String>>) -> Result<()> {
    if let Some(t) = tags {
        if t.len() > 15 {
            return Err(bad("An object can have at most 15 tags."));
        }
        if t.iter()
            .any(|(k, v)| k.is_empty() || k.len() > 512 || v.len() > 256)
        {
            return Err(bad(
                "Tag names must be 1-512 characters and tag values at most 256 characters.",
            ));
        }
    }
    Ok(())
}

impl<'a> Ctx<'a> {
    pub fn q(&self, k: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.as_str())
    }

    /// Name validation (400 `BadParameter`).
    pub fn name(&self, coll: Coll, n: &str) -> Result<()> {
        if kvrules::valid_object_name(n) {
            Ok(())
        } else {
            Err(bad(format!(
                "The {} name '{n}' is invalid. It must be 1-127 characters of letters, digits and dashes.",
                coll.noun().to_ascii_lowercase()
            )))
        }
    }

    /// Authorize `op` on `coll` (object `name` when one is addressed); role assignments are
    /// read in the request's unit of work.
    pub async fn authorize(
        &self,
        tx: &mut Tx,
        coll: Coll,
        op: Op,
        name: Option<&str>,
    ) -> Result<()> {
        let _ = self.authorized.set((coll, op));
        let need = access::need(coll, op);
        // the caller as the refusal names it (built only for a refusal)
        let caller = || {
            format!(
                "appid={};oid={};iss={}",
                self.caller.client_id,
                self.caller.object_id,
                self.s.issuer_v1()
            )
        };
        if self.settings.rbac {
            let scope = match name {
                Some(n) => format!("{}/{}/{n}", self.vault.resource_id, coll.path()),
                None => self.vault.resource_id.clone(),
            };
            let grants = crate::authz::grants(tx, &self.caller.object_id).await?;
            if keyless_core::rbac::authorize_data(&grants, need.data_action, &scope).is_some() {
                return Ok(());
            }
            return Err(ServerError::kv(KvKind::Forbidden(Some("ForbiddenByRbac")),
                format!(
                    "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: {}\r\nAction: '{}'\r\nResource: '{}'\r\nAssignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: 'DeniedWithNoValidRBAC' \r\nVault: {};location={}\r\n",
                    caller(),
                    need.data_action,
                    scope.to_ascii_lowercase(),
                    self.vault.name,
                    self.vault.location
                ),
            ));
        }
        let perms = access::permissions_of(
            &self.settings.policies,
            &self.s.tenant_id,
            &self.caller.object_id,
            &self.caller.client_id,
            coll,
        );
        if access::policy_grants(&perms, need.permission) {
            return Ok(());
        }
        Err(ServerError::kv(KvKind::Forbidden(Some("ForbiddenByPolicy")),
            format!(
                "The user, group or application '{}' does not have {} {} permission on key vault '{};location={}'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287",
                caller(),
                coll.path(),
                need.permission,
                self.vault.name,
                self.vault.location
            ),
        ))
    }

    pub fn id(&self, coll: Coll, name: &str, version: Option<&str>) -> String {
        kvrules::object_id(self.base, coll, name, version)
    }

    pub fn recovery_level(&self) -> &'static str {
        kvrules::recovery_level(
            self.settings.soft_delete,
            self.settings.retention_days,
            self.settings.purge_protection,
        )
    }

    /// The `attributes` of a version.
    pub fn attributes(&self, v: &KvVersionRecord) -> Value {
        serde_json::to_value(self.attrs(v)).unwrap_or_default()
    }

    /// The `attributes` of a version, typed (serialized straight into a response body).
    pub fn attrs(&self, v: &KvVersionRecord) -> Attributes {
        Attributes {
            created: v.created,
            enabled: v.enabled,
            exp: v.exp,
            nbf: v.nbf,
            recoverable_days: self
                .settings
                .soft_delete
                .then_some(self.settings.retention_days),
            recovery_level: self.recovery_level(),
            updated: v.updated,
        }
    }

    /// Not found, in the collection's words.
    pub fn not_found(&self, coll: Coll, name: &str, version: Option<&str>) -> ServerError {
        let what = match version {
            Some(v) => format!("{name}/{v}"),
            None => name.to_string(),
        };
        ServerError::kv(
            KvKind::NotFound(not_found_code(coll)),
            format!(
                "A {} with (name/id) {what} was not found in this key vault. If you recently deleted this {} you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182",
                coll.noun().to_ascii_lowercase(),
                coll.noun().to_ascii_lowercase()
            ),
        )
    }

    pub fn deleted_not_found(&self, coll: Coll, name: &str) -> ServerError {
        ServerError::kv(
            KvKind::NotFound(not_found_code(coll)),
            format!("Deleted {} not found: {name}", coll.noun()),
        )
    }

    pub fn is_deleted_conflict(&self, coll: Coll, name: &str) -> ServerError {
        ServerError::kv(KvKind::Conflict(Some("ObjectIsDeletedButRecoverable")),
            format!(
                "{} {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the {} can only be recovered or purged.",
                coll.noun(),
                coll.noun().to_ascii_lowercase()
            ),
        )
    }

    /// A live version (`None`: latest), or 404.
    pub async fn live_version(
        &self,
        tx: &mut Tx,
        coll: Coll,
        name: &str,
        version: Option<&str>,
    ) -> Result<KvVersionRecord> {
        if version.is_some_and(|v| !kvrules::valid_version(v)) {
            return Err(self.not_found(coll, name, version));
        }
        // one statement: the name must be live, the version must exist
        tx.kv_live_version(self.vname, coll.path(), name, version)
            .await?
            .ok_or_else(|| self.not_found(coll, name, version))
    }

    /// Write versions; a soft-deleted name is a 409.
    pub async fn write(
        &self,
        tx: &mut Tx,
        coll: Coll,
        name: &str,
        w: &KvWrite,
    ) -> Result<KvWriteOutcome> {
        match tx.kv_write(w).await? {
            KvWriteOutcome::Deleted => Err(self.is_deleted_conflict(coll, name)),
            o => Ok(o),
        }
    }

    /// A new key of type `t` for this request. A handler asks for it before it writes
    /// anything: in a pass without one, the request's unit of work is ended, the key is
    /// generated outside any transaction and the handler runs again in a new one (the error
    /// returned here ends the first pass and is never answered). In the last pass (reached
    /// only if the key type changed between passes) the key is generated in place.
    pub async fn key(&self, t: KeyType) -> Result<KvKey> {
        {
            let mut g = self.keygen.state();
            if let Some(k) = g.ready.take().filter(|k| k.key_type() == t) {
                return Ok(k);
            }
            if !g.in_place {
                g.wanted = Some(t);
                return Err(ServerError::kv(
                    KvKind::Internal,
                    "The key is generated outside the transaction; the request runs again.",
                ));
            }
        }
        keys::generate(t).await
    }

    /// Start issuing certificate `name` in the background (request `request_id`) once the
    /// request's unit of work is committed.
    pub fn start_issuance(&self, name: &str, request_id: &str) {
        let _ = self.issuance.set(Issuance {
            vault: self.vname.to_string(),
            name: name.to_string(),
            request_id: request_id.to_string(),
        });
    }

    /// A page of `items` (already sorted by `key`) as `{"value":[…],"nextLink":…}`.
    pub fn page<T>(
        &self,
        items: &[T],
        key: impl Fn(&T) -> String,
        render: impl Fn(&T) -> Value,
    ) -> Result<Response> {
        let size = paging::page_size(self.q("maxresults")).map_err(bad)?;
        let after = match self.q("$skiptoken") {
            Some(t) => Some(paging::decode_token(t).map_err(bad)?),
            None => None,
        };
        let (slice, next) = paging::page(items, key, after.as_deref(), size);
        let next_link = next.map(|k| {
            let mut q = vec![
                ("api-version".to_string(), self.api_version.to_string()),
                ("$skiptoken".to_string(), paging::encode_token(&k)),
            ];
            if let Some(m) = self.q("maxresults") {
                q.push(("maxresults".into(), m.to_string()));
            }
            format!(
                "{}{}?{}",
                self.base,
                self.path,
                serde_urlencoded::to_string(q).unwrap_or_default()
            )
        });
        Ok(Json(
            json!({"value": slice.iter().map(render).collect::<Vec<_>>(), "nextLink": next_link}),
        )
        .into_response())
    }

    pub fn new_version(&self, coll: Coll, name: &str) -> KvVersionRecord {
        KvVersionRecord {
            vault: self.vname.to_string(),
            coll: coll.path().into(),
            name: name.to_string(),
            version: uuid::Uuid::new_v4().simple().to_string(),
            created: self.now,
            updated: self.now,
            enabled: true,
            nbf: None,
            exp: None,
            content_type: None,
            tags: Default::default(),
            managed: false,
            public: json!({}),
            private: None,
        }
    }

    /// Deleted-object fields (`recoveryId`, `deletedDate`, `scheduledPurgeDate`).
    pub fn deleted_fields(
        &self,
        coll: Coll,
        name: &str,
        deleted: Option<(u64, u64)>,
        out: &mut Value,
    ) {
        if let Some((d, p)) = deleted {
            out["recoveryId"] = json!(kvrules::recovery_id(self.base, coll, name));
            out["deletedDate"] = json!(d);
            out["scheduledPurgeDate"] = json!(p);
        }
    }
}

/// The `attributes` of a version. Fields are declared in the order of their JSON names' bytes —
/// the order a `serde_json::Value` object keeps — so serializing this directly writes the same
/// body as serializing it as a `Value`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attributes {
    pub created: u64,
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(rename = "recoverableDays", skip_serializing_if = "Option::is_none")]
    pub recoverable_days: Option<u32>,
    #[serde(rename = "recoveryLevel")]
    pub recovery_level: &'static str,
    pub updated: u64,
}

/// A `200` JSON response written straight from `v`, as `Json(v)` answers (same body and
/// `Content-Type`), into a buffer sized for a bundle so it is not grown on the way.
pub fn json_response<T: serde::Serialize>(v: &T) -> Response {
    let mut buf = Vec::with_capacity(1024);
    match serde_json::to_writer(&mut buf, v) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            buf,
        )
            .into_response(),
        Err(e) => ServerError::kv(KvKind::Internal, e.to_string()).into_response(),
    }
}

fn not_found_code(coll: Coll) -> &'static str {
    match coll {
        Coll::Secrets => "SecretNotFound",
        Coll::Keys => "KeyNotFound",
        Coll::Certificates => "CertificateNotFound",
    }
}

/// How one collection renders its versions.
pub trait Render {
    const COLL: Coll;
    /// The full bundle (`value`: include the secret value / private parts the bundle carries).
    fn bundle(ctx: &Ctx<'_>, v: &KvVersionRecord, value: bool) -> Value;
    /// A list item (`versioned`: the id carries the version).
    fn item(ctx: &Ctx<'_>, v: &KvVersionRecord, versioned: bool) -> Value;
}

/// The collections a delete / recover / purge of `coll` touches (a certificate owns its key
/// and secret).
fn cascade(coll: Coll) -> Vec<&'static str> {
    match coll {
        Coll::Certificates => vec!["certificates", "keys", "secrets"],
        c => vec![c.path()],
    }
}

/// Refuse direct deletes of a certificate's key or secret.
async fn refuse_managed(
    ctx: &Ctx<'_>,
    tx: &mut Tx,
    coll: Coll,
    name: &str,
    op: &str,
) -> Result<()> {
    if coll != Coll::Certificates && tx.kv_name(ctx.vname, "certificates", name).await?.is_some() {
        return Err(ServerError::kv(KvKind::Forbidden(None),
            format!("Operation {op} is not allowed on a {} managed by certificate {name}; use the certificate.", coll.noun().to_ascii_lowercase()),
        ));
    }
    Ok(())
}

/// Operations every collection shares: list, versions, delete, the deleted collection,
/// recover and purge. Returns `None` for targets the collection handles itself.
pub async fn common<R: Render>(
    ctx: &Ctx<'_>,
    tx: &mut Tx,
    m: &Method,
    target: &Target,
    body: &[u8],
) -> Result<Option<Response>> {
    let coll = R::COLL;
    let r = match (m, target) {
        (&Method::GET, Target::List(_)) => {
            ctx.authorize(tx, coll, Op::List, None).await?;
            let items = tx.kv_latest(ctx.vname, coll.path(), false).await?;
            ctx.page(
                &items,
                |v| v.name.to_ascii_lowercase(),
                |v| R::item(ctx, v, false),
            )?
        }
        (&Method::GET, Target::Versions(_, name)) => {
            ctx.name(coll, name)?;
            ctx.authorize(tx, coll, Op::List, Some(name)).await?;
            ctx.live_version(tx, coll, name, None).await?;
            let items = tx.kv_versions(ctx.vname, coll.path(), name).await?;
            let indexed: Vec<(usize, KvVersionRecord)> = items.into_iter().enumerate().collect();
            ctx.page(
                &indexed,
                |(i, _)| format!("{i:010}"),
                |(_, v)| R::item(ctx, v, true),
            )?
        }
        (
            &Method::DELETE,
            Target::Object {
                name,
                version: None,
                slash: false,
                ..
            },
        ) => {
            ctx.name(coll, name)?;
            ctx.authorize(tx, coll, Op::Delete, Some(name)).await?;
            let latest = ctx.live_version(tx, coll, name, None).await?;
            refuse_managed(ctx, tx, coll, name, "delete").await?;
            let soft = ctx.settings.soft_delete;
            let purge_at = soft.then(|| ctx.now + u64::from(ctx.settings.retention_days) * 86_400);
            tx.kv_delete(ctx.vname, &cascade(coll), name, ctx.now, purge_at)
                .await?;
            let mut out = R::bundle(ctx, &latest, false);
            ctx.deleted_fields(coll, &latest.name, purge_at.map(|p| (ctx.now, p)), &mut out);
            Json(out).into_response()
        }
        (&Method::GET, Target::Deleted(_)) => {
            ctx.authorize(tx, coll, Op::List, None).await?;
            let names = tx.kv_names(ctx.vname, coll.path(), true).await?;
            let items = tx.kv_latest(ctx.vname, coll.path(), true).await?;
            ctx.page(
                &items,
                |v| v.name.to_ascii_lowercase(),
                |v| {
                    let mut out = R::item(ctx, v, false);
                    let d = names
                        .iter()
                        .find(|n| n.name.eq_ignore_ascii_case(&v.name))
                        .and_then(|n| n.deleted);
                    ctx.deleted_fields(coll, &v.name, d, &mut out);
                    out
                },
            )?
        }
        (&Method::GET, Target::DeletedItem(_, name)) => {
            ctx.name(coll, name)?;
            ctx.authorize(tx, coll, Op::GetDeleted, Some(name)).await?;
            let n = tx.kv_name(ctx.vname, coll.path(), name).await?;
            let Some(deleted) = n.and_then(|n| n.deleted) else {
                return Err(ctx.deleted_not_found(coll, name));
            };
            let v = tx
                .kv_version(ctx.vname, coll.path(), name, None)
                .await?
                .ok_or_else(|| ctx.deleted_not_found(coll, name))?;
            let mut out = R::bundle(ctx, &v, false);
            ctx.deleted_fields(coll, &v.name, Some(deleted), &mut out);
            Json(out).into_response()
        }
        (&Method::DELETE, Target::DeletedItem(_, name)) => {
            ctx.name(coll, name)?;
            ctx.authorize(tx, coll, Op::Purge, Some(name)).await?;
            if ctx.settings.purge_protection {
                return Err(ServerError::kv(KvKind::Forbidden(None),
                    format!("Operation \"purge\" is not enabled for this vault: purge protection is on. {} {name} is purged on its scheduled purge date.", coll.noun()),
                ));
            }
            refuse_managed(ctx, tx, coll, name, "purge").await?;
            if !tx.kv_purge(ctx.vname, &cascade(coll), name).await? {
                return Err(ctx.deleted_not_found(coll, name));
            }
            StatusCode::NO_CONTENT.into_response()
        }
        (&Method::POST, Target::Recover(_, name)) => {
            ctx.name(coll, name)?;
            ctx.authorize(tx, coll, Op::Recover, Some(name)).await?;
            refuse_managed(ctx, tx, coll, name, "recover").await?;
            if !tx.kv_recover(ctx.vname, &cascade(coll), name).await? {
                return Err(ctx.deleted_not_found(coll, name));
            }
            let v = ctx.live_version(tx, coll, name, None).await?;
            Json(R::bundle(ctx, &v, false)).into_response()
        }
        (&Method::POST, Target::Backup(_, name)) => backup::backup::<R>(ctx, tx, name).await?,
        (&Method::POST, Target::Restore(_)) => backup::restore::<R>(ctx, tx, body).await?,
        _ => return Ok(None),
    };
    Ok(Some(r))
}

/// Apply request attributes to a version (`nbf`/`exp` only where the collection allows).
pub fn apply_attrs(v: &mut KvVersionRecord, a: &AttrsIn, times: bool) {
    if let Some(e) = a.enabled {
        v.enabled = e;
    }
    if times {
        if a.nbf.is_some() {
            v.nbf = a.nbf;
        }
        if a.exp.is_some() {
            v.exp = a.exp;
        }
    }
}

/// `POST /keyless/admin/v1/vault-clock`: move the Key Vault clock forward (`--dev-clock`),
/// then run the lifetime-action scheduler once.
pub async fn advance_clock(
    axum::extract::State(s): axum::extract::State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response> {
    let caller = crate::request::authenticate_with(&s, &headers, &s.management_audiences())?;
    {
        // its own read, ended before the scheduler pass (which opens its own units of work)
        let mut tx = s.store.read("kv_advance_clock").await?;
        crate::authz::check(
            &mut tx,
            &caller.object_id,
            "Microsoft.KeyVault/vaults/write",
            &format!("/subscriptions/{}", s.subscription_id),
        )
        .await?;
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Advance {
        advance_seconds: u64,
    }
    let b: Advance = crate::request::parse_body(&body)?;
    let now =
        s.vault_clock
            .advance(b.advance_seconds)
            .ok_or_else(|| ServerError::InvalidParameter {
                message:
                    "The Key Vault clock is fixed; start the server with --dev-clock to move it."
                        .into(),
                target: None,
            })?;
    let report = renew::run_once(&s).await?;
    Ok(Json(json!({"now": now, "renewed": report.renewed, "notified": report.notified, "purged": report.purged})).into_response())
}
