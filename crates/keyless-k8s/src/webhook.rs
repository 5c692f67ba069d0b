//! `keyless wi-webhook`: workload identity's mutating admission webhook (issue 15, contract C6),
//! the rules of `keyless_core::workload_identity` served as `admission.k8s.io/v1` over HTTPS.
//!
//! - **Serving**: `POST /mutate-v1-pod` (an `AdmissionReview`, at most [`defaults::MAX_BODY`]),
//!   `/healthz`, `/readyz`, under `keyless_ops::limits::serve_with` (the process's connection
//!   governor, the TLS handshake bounded there) and the request edge (access log, HTTP metrics).
//! - **Its certificate** comes from Keyless (`POST {cluster}/issueWebhookCertificate`, C3) with
//!   the kubelet identity's token from its node's IMDS (`crate::arm`): a fresh P-256 key and a CSR
//!   naming `--tls-san` at start and again at 2/3 of each certificate's life; rustls asks a
//!   [`CertSlot`] for the certificate on every handshake, so a renewal needs no restart. A failed
//!   renewal is retried (1 s doubling to 60 s) while the current certificate keeps serving.
//! - **The CA bundle**: every webhook of the MutatingWebhookConfiguration `--webhook-config-name`
//!   gets `clientConfig.caBundle` = the cluster's webhook CA (a strategic merge patch by webhook
//!   name, conditional on the `resourceVersion` read), at each new CA, on every watch event of
//!   that configuration (an `apply` that resets it is undone at once) and every
//!   [`defaults::CA_BUNDLE_RESYNC`].
//! - **Service accounts**: a metadata-only reflector over every ServiceAccount (annotations are
//!   all the rules read); a miss is read from the API server (a service account created just
//!   before its pod may not be in the cache yet). Only a pod the rules would mutate
//!   (`workload_identity::service_account_ref`: labelled, created, outside `kube-system`) is
//!   looked up. A service account that does not exist refuses the pod (400, naming it and its
//!   namespace, as upstream's `admission.Errored(400, …)` on a failed lookup: the API server's
//!   ServiceAccount admission plugin usually refuses such a pod first, but the webhook may be
//!   called before it); a failed read refuses it (500). A pod is never admitted without the
//!   identity its service account names.
//! - **Readiness**: a certificate that has not expired, and the service-account cache listed.
//! - **Metrics** ([`metric`]): admissions by result and their duration, certificate renewals,
//!   CA-bundle updates.

use crate::arm::{Arm, ArmConfig, ArmError};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::TryStreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::ServiceAccount;
use keyless_core::workload_identity::{self as wi, Defaults};
use keyless_ops::health::Health;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod defaults {
    use std::time::Duration;

    /// `--listen`.
    pub const LISTEN: &str = "0.0.0.0:9443";
    /// The admission path (upstream's).
    pub const PATH: &str = "/mutate-v1-pod";
    /// `--webhook-config-name` (upstream's chart).
    pub const CONFIG_NAME: &str = "azure-wi-webhook-mutating-webhook-configuration";
    /// `--tls-san`: the webhook Service of upstream's chart.
    pub const TLS_SANS: [&str; 2] = [
        "azure-wi-webhook-webhook-service.azure-workload-identity-system.svc",
        "azure-wi-webhook-webhook-service.azure-workload-identity-system.svc.cluster.local",
    ];
    /// An `AdmissionReview` body at most this big (the API server's own request limit, 3 MiB:
    /// no pod it admits is larger).
    pub const MAX_BODY: usize = 3 * 1024 * 1024;
    /// A failed certificate request is retried after this, doubling up to
    /// [`RENEW_RETRY_MAX`].
    pub const RENEW_RETRY_MIN: Duration = Duration::from_secs(1);
    pub const RENEW_RETRY_MAX: Duration = Duration::from_secs(60);
    /// The CA bundle is checked this often even without an event.
    pub const CA_BUNDLE_RESYNC: Duration = Duration::from_secs(60);
    /// The containerservice api-version of the certificate request.
    pub const API_VERSION: &str = crate::addon::defaults::API_VERSION;
    /// The request edge's surface name (the `surface` label of the HTTP metrics).
    pub const SURFACE: &str = "wi_webhook";
}

/// The webhook's metric names (its own: `keyless_ops::metrics` lists the shared ones).
pub mod metric {
    /// Counter: admission reviews answered. Label `result`: `mutated` (a patch), `allowed`
    /// (unchanged), `refused` (`allowed: false` by the rules, a missing service account
    /// included), `error` (refused: the service account could not be read), `invalid` (not an
    /// AdmissionReview: HTTP 4xx).
    pub const ADMISSIONS: &str = "keyless_wi_webhook_admissions_total";
    /// Histogram (seconds): time to answer an admission review, label `result` as above.
    pub const ADMISSION_DURATION: &str = "keyless_wi_webhook_admission_duration_seconds";
    /// Counter: serving-certificate requests to Keyless. Label `result` (`ok` | `error`).
    pub const CERTIFICATE_RENEWALS: &str = "keyless_wi_webhook_certificate_renewals_total";
    /// Gauge (Unix seconds): when the serving certificate expires.
    pub const CERTIFICATE_NOT_AFTER: &str = "keyless_wi_webhook_certificate_not_after_seconds";
    /// Counter: patches of the configuration's `caBundle`. Label `result` (`ok` | `error`).
    pub const CA_BUNDLE_UPDATES: &str = "keyless_wi_webhook_ca_bundle_updates_total";

    /// Help texts (shown as `# HELP`).
    pub fn describe() {
        use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
        describe_counter!(
            ADMISSIONS,
            "Admission reviews answered by the workload-identity webhook, by result."
        );
        describe_histogram!(
            ADMISSION_DURATION,
            Unit::Seconds,
            "Time to answer an admission review, by result."
        );
        describe_counter!(
            CERTIFICATE_RENEWALS,
            "Serving-certificate requests to Keyless, by result."
        );
        describe_gauge!(
            CERTIFICATE_NOT_AFTER,
            Unit::Seconds,
            "When the webhook's serving certificate expires (Unix time)."
        );
        describe_counter!(
            CA_BUNDLE_UPDATES,
            "Patches of the MutatingWebhookConfiguration's caBundle, by result."
        );
    }
}

/// Why the webhook cannot start or get a certificate.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Arm(#[from] ArmError),
    #[error("--tls-san {0}: {1}")]
    San(String, String),
    #[error("the certificate request: {0}")]
    Csr(String),
    #[error("the certificate Keyless answered: {0}")]
    Certificate(String),
}

/// What `keyless wi-webhook` is configured with.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Keyless ARM, as the kubelet identity.
    pub arm: ArmConfig,
    /// ARM id of the managed cluster.
    pub cluster_id: String,
    pub listen: SocketAddr,
    /// The certificate's DNS names and IP addresses.
    pub tls_sans: Vec<String>,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept.
    pub webhook_config_name: String,
    /// The mutation's settings (tenant, authority host, audience, readiness gate, proxy).
    pub defaults: Defaults,
    /// The certificate lifetime asked for (None: Keyless's default, 7 days).
    pub certificate_validity: Option<u64>,
}

// ------------------------------------------------------------------ the certificate

/// The serving certificate rustls reads on every handshake; replaced whole on renewal.
#[derive(Debug, Default)]
pub struct CertSlot {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    not_after: AtomicU64,
}

impl CertSlot {
    fn set(&self, key: Arc<CertifiedKey>, not_after: u64) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
        self.not_after.store(not_after, Ordering::Release);
    }

    /// When the current certificate expires (Unix seconds; 0: none yet).
    pub fn not_after(&self) -> u64 {
        self.not_after.load(Ordering::Acquire)
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether `s` is a DNS name a certificate can carry (labels of letters, digits and `-`, at
/// most 253 characters; a leading `*.` wildcard).
fn dns_name_ok(s: &str) -> bool {
    let body = s.strip_prefix("*.").unwrap_or(s);
    !body.is_empty()
        && s.len() <= 253
        && body.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// A fresh P-256 key and a PEM CSR naming `sans` (IP addresses as IP SANs, the rest as DNS
/// names; the first is the subject's common name). Returns (CSR PEM, PKCS#8 DER).
pub fn csr(sans: &[String]) -> Result<(String, Vec<u8>), WebhookError> {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
    let bad = |s: &str, e: &dyn std::fmt::Display| WebhookError::San(s.to_string(), e.to_string());
    if sans.is_empty() {
        return Err(WebhookError::Csr("no --tls-san".into()));
    }
    let mut names = vec![];
    for s in sans {
        let s = s.trim();
        names.push(match s.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) if !dns_name_ok(s) => return Err(bad(s, &"not a DNS name or IP address")),
            Err(_) => SanType::DnsName(s.to_string().try_into().map_err(|e| bad(s, &e))?),
        });
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| WebhookError::Csr(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, sans[0].trim());
    params.distinguished_name = dn;
    params.subject_alt_names = names;
    let pem = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| WebhookError::Csr(e.to_string()))?;
    Ok((pem, key.serialize_der()))
}

/// A certificate Keyless issued, ready to serve.
struct Issued {
    key: Arc<CertifiedKey>,
    ca_pem: String,
    not_before: u64,
    not_after: u64,
}

/// The leaf of `answer` (C3's) with `key_der`: checked to be for that key.
fn certified(answer: &Value, key_der: Vec<u8>) -> Result<Issued, WebhookError> {
    let bad = |m: &str| WebhookError::Certificate(m.to_string());
    let cert_pem = answer["certificate"]
        .as_str()
        .ok_or_else(|| bad("no certificate"))?;
    let ca_pem = answer["caBundle"]
        .as_str()
        .filter(|s| !keyless_pki::pem_blocks(s, "CERTIFICATE").is_empty())
        .ok_or_else(|| bad("no caBundle"))?;
    let leaf = keyless_pki::pem_blocks(cert_pem, "CERTIFICATE")
        .into_iter()
        .next()
        .ok_or_else(|| bad("the certificate is not PEM"))?;
    let (not_before, not_after) =
        keyless_pki::cert_validity(&leaf).map_err(|e| bad(&e.to_string()))?;
    let key = CertifiedKey::from_der(
        vec![CertificateDer::from(leaf)],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        &rustls::crypto::aws_lc_rs::default_provider(),
    )
    .map_err(|e| bad(&format!("not for the key of the request: {e}")))?;
    Ok(Issued {
        key: Arc::new(key),
        ca_pem: ca_pem.to_string(),
        not_before,
        not_after,
    })
}

async fn issue(arm: &Arm, cfg: &WebhookConfig) -> Result<Issued, WebhookError> {
    let (csr_pem, key_der) = csr(&cfg.tls_sans)?;
    let mut body = json!({ "csr": csr_pem });
    if let Some(v) = cfg.certificate_validity {
        body["validityInSeconds"] = json!(v);
    }
    let answer = arm
        .action(
            &cfg.cluster_id,
            "issueWebhookCertificate",
            defaults::API_VERSION,
            &body,
        )
        .await?;
    certified(&answer, key_der)
}

/// When a certificate valid over [not_before, not_after] is renewed: at 2/3 of its life.
pub fn renew_at(not_before: u64, not_after: u64) -> u64 {
    not_before + not_after.saturating_sub(not_before) * 2 / 3
}

/// Get a certificate, then renew it at 2/3 of its life, forever; each new CA goes to `ca_tx`.
async fn keep_certificate(
    arm: Arm,
    cfg: Arc<WebhookConfig>,
    slot: Arc<CertSlot>,
    ca_tx: tokio::sync::watch::Sender<Option<String>>,
) {
    let mut backoff = defaults::RENEW_RETRY_MIN;
    loop {
        match issue(&arm, &cfg).await {
            Ok(c) => {
                ::metrics::counter!(metric::CERTIFICATE_RENEWALS, "result" => "ok").increment(1);
                ::metrics::gauge!(metric::CERTIFICATE_NOT_AFTER).set(c.not_after as f64);
                let first = slot.not_after() == 0;
                slot.set(c.key, c.not_after);
                ca_tx.send_if_modified(|ca| {
                    let changed = ca.as_deref() != Some(c.ca_pem.as_str());
                    *ca = Some(c.ca_pem.clone());
                    changed
                });
                let at = renew_at(c.not_before, c.not_after);
                tracing::info!(
                    not_after = c.not_after,
                    renew_at = at,
                    "wi-webhook: {} serving certificate",
                    if first { "got its" } else { "renewed its" }
                );
                backoff = defaults::RENEW_RETRY_MIN;
                let wait = at.saturating_sub(unix_now()).max(1);
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            Err(e) => {
                ::metrics::counter!(metric::CERTIFICATE_RENEWALS, "result" => "error").increment(1);
                tracing::warn!(error = %e, retry_in = ?backoff, "wi-webhook: no serving certificate from Keyless");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(defaults::RENEW_RETRY_MAX);
            }
        }
    }
}

// ------------------------------------------------------------------ the CA bundle

/// The strategic merge patch that sets every webhook's `clientConfig.caBundle` of `config` to
/// `ca_pem` (by webhook name, conditional on the `resourceVersion` read), or None when all
/// already carry it.
pub fn ca_bundle_patch(config: &MutatingWebhookConfiguration, ca_pem: &str) -> Option<Value> {
    use base64::Engine;
    let webhooks = config.webhooks.as_deref().unwrap_or_default();
    let stale: Vec<&str> = webhooks
        .iter()
        .filter(|w| {
            w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca_pem.as_bytes())
        })
        .map(|w| w.name.as_str())
        .collect();
    if stale.is_empty() {
        return None;
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let items: Vec<Value> = stale
        .iter()
        .map(|n| json!({"name": n, "clientConfig": {"caBundle": b64}}))
        .collect();
    let mut p = json!({ "webhooks": items });
    if let Some(rv) = &config.metadata.resource_version {
        p["metadata"] = json!({ "resourceVersion": rv });
    }
    Some(p)
}

/// Outcome of one check of the configuration.
#[derive(Debug, PartialEq, Eq)]
enum Bundle {
    InStep,
    Patched,
    Missing,
}

async fn ensure_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca_pem: &str,
) -> Result<Bundle, kube::Error> {
    let Some(config) = api.get_opt(name).await? else {
        return Ok(Bundle::Missing);
    };
    let Some(p) = ca_bundle_patch(&config, ca_pem) else {
        return Ok(Bundle::InStep);
    };
    let r = api
        .patch(name, &PatchParams::default(), &Patch::Strategic::<Value>(p))
        .await;
    let result = if r.is_ok() { "ok" } else { "error" };
    ::metrics::counter!(metric::CA_BUNDLE_UPDATES, "result" => result).increment(1);
    r.map(|_| Bundle::Patched)
}

/// Keep the configuration's `caBundle` equal to the CA `ca_rx` holds.
async fn keep_ca_bundle(
    client: kube::Client,
    name: String,
    mut ca_rx: tokio::sync::watch::Receiver<Option<String>>,
) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let fields = format!("metadata.name={name}");
    let events = watcher(api.clone(), watcher::Config::default().fields(&fields))
        .default_backoff()
        .touched_objects();
    let mut events = std::pin::pin!(events);
    let mut tick = tokio::time::interval(defaults::CA_BUNDLE_RESYNC);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Bundle> = None;
    loop {
        tokio::select! {
            ev = events.try_next() => match ev {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "wi-webhook: watch of {name} failed; retrying");
                    continue;
                }
            },
            r = ca_rx.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let Some(ca) = ca_rx.borrow_and_update().clone() else {
            continue;
        };
        match ensure_ca_bundle(&api, &name, &ca).await {
            Ok(b) => {
                match b {
                    Bundle::Patched => {
                        tracing::info!("wi-webhook: caBundle of {name} set to the webhook CA")
                    }
                    Bundle::Missing if last != Some(Bundle::Missing) => tracing::warn!(
                        "wi-webhook: MutatingWebhookConfiguration {name} not found; its caBundle is set once it exists"
                    ),
                    _ => {}
                }
                last = Some(b);
            }
            // a conflict (someone wrote it meanwhile) comes back as a watch event: checked again
            Err(e) => tracing::warn!(error = %e, "wi-webhook: cannot set the caBundle of {name}"),
        }
    }
}

// ------------------------------------------------------------------ admission

type SaStore = Store<PartialObjectMeta<ServiceAccount>>;

struct App {
    client: kube::Client,
    service_accounts: SaStore,
    defaults: Defaults,
    health: Health,
}

fn sa_value(meta: &kube::api::ObjectMeta) -> Value {
    json!({"metadata": {
        "name": meta.name,
        "namespace": meta.namespace,
        "annotations": meta.annotations.clone().unwrap_or_default(),
    }})
}

impl App {
    /// The service account `ns/name` (its metadata): the cache, else the API server.
    async fn service_account(&self, ns: &str, name: &str) -> Result<Option<Value>, kube::Error> {
        let key = ObjectRef::<PartialObjectMeta<ServiceAccount>>::new(name).within(ns);
        if let Some(sa) = self.service_accounts.get(&key) {
            return Ok(Some(sa_value(&sa.metadata)));
        }
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        Ok(api
            .get_metadata_opt(name)
            .await?
            .map(|m| sa_value(&m.metadata)))
    }

    /// The answer to one `POST /mutate-v1-pod` and its result label.
    async fn admit(&self, req: Request<Body>) -> (&'static str, Response) {
        let invalid = |status: StatusCode, msg: &str| {
            ("invalid", keyless_ops::limits::plain_text(status, msg))
        };
        let json_body = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        if !json_body {
            return invalid(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected Content-Type: application/json",
            );
        }
        let too_big = || {
            invalid(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("an AdmissionReview is at most {} bytes", defaults::MAX_BODY),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > defaults::MAX_BODY) {
            return too_big();
        }
        let Ok(bytes) = axum::body::to_bytes(req.into_body(), defaults::MAX_BODY).await else {
            return too_big();
        };
        let review: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => return invalid(StatusCode::BAD_REQUEST, &format!("not JSON: {e}")),
        };
        let is_review = review["apiVersion"] == "admission.k8s.io/v1"
            && review["kind"] == "AdmissionReview"
            && review["request"]["uid"]
                .as_str()
                .is_some_and(|u| !u.is_empty());
        if !is_review {
            return invalid(
                StatusCode::BAD_REQUEST,
                "expected an admission.k8s.io/v1 AdmissionReview with a request uid",
            );
        }
        let answer = match wi::service_account_ref(&review) {
            None => wi::review(&review, None, &self.defaults),
            Some((ns, name)) => match self.service_account(ns, name).await {
                Ok(sa) => {
                    if sa.is_none() {
                        tracing::info!(
                            namespace = ns,
                            service_account = name,
                            "wi-webhook: pod refused: its service account does not exist"
                        );
                    }
                    // None: refused (400) by the rules
                    wi::review(&review, sa.as_ref(), &self.defaults)
                }
                Err(e) => {
                    tracing::warn!(error = %e, namespace = ns, service_account = name, "wi-webhook: cannot read the pod's service account");
                    let msg =
                        format!("workload identity: cannot read service account {ns}/{name}: {e}");
                    let a = wi::refused(&review, 500, "InternalError", &msg);
                    return ("error", axum::Json(a).into_response());
                }
            },
        };
        let r = &answer["response"];
        let result = if r["allowed"] != true {
            "refused"
        } else if r.get("patch").is_some() {
            "mutated"
        } else {
            "allowed"
        };
        (result, axum::Json(answer).into_response())
    }
}

async fn mutate(State(app): State<Arc<App>>, req: Request<Body>) -> Response {
    let t0 = Instant::now();
    let (result, resp) = app.admit(req).await;
    ::metrics::counter!(metric::ADMISSIONS, "result" => result).increment(1);
    ::metrics::histogram!(metric::ADMISSION_DURATION, "result" => result)
        .record(t0.elapsed().as_secs_f64());
    resp
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let report = app.health.report();
    let status = if report.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

fn router(app: Arc<App>) -> Router {
    use keyless_ops::request::{edge, Edge, IdHeaders, Surface};
    let surface = Surface {
        name: defaults::SURFACE,
        ids: IdHeaders::None,
    };
    Router::new()
        .route(defaults::PATH, post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { keyless_ops::limits::plain_text(StatusCode::NOT_FOUND, "not found") })
        .with_state(app)
        .layer(axum::middleware::from_fn_with_state(
            Edge::fixed(surface),
            edge,
        ))
}

// ------------------------------------------------------------------ start

/// A running webhook: its tasks stop when this is dropped.
pub struct Webhook {
    /// The HTTPS listener's address.
    pub addr: SocketAddr,
    /// The serving certificate.
    pub certificate: Arc<CertSlot>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Bind `cfg.listen` and start serving, the certificate loop, the CA-bundle loop and the
/// service-account cache. Readiness checks `certificate` and `service accounts listed` are
/// registered in `health`. The listener answers at once; TLS handshakes fail until the first
/// certificate arrives.
pub async fn start(
    cfg: WebhookConfig,
    client: kube::Client,
    health: Health,
) -> Result<Webhook, WebhookError> {
    keyless_pki::install_crypto_provider();
    metric::describe();
    // the names are checked before anything starts
    csr(&cfg.tls_sans)?;
    let arm = Arm::new(&cfg.arm)?;
    let listener = keyless_ops::limits::bind(cfg.listen)
        .await
        .map_err(|source| WebhookError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| WebhookError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let slot = Arc::new(CertSlot::default());
    {
        let slot = slot.clone();
        health.register("certificate", move || match slot.not_after() {
            0 => Err("no serving certificate from Keyless yet".into()),
            t if t <= unix_now() => Err(format!(
                "the serving certificate expired (not renewed) at Unix time {t}"
            )),
            _ => Ok(()),
        });
    }
    let listed = health.flag(
        "service accounts listed",
        "the service-account cache has not listed yet",
    );
    let mut tasks = vec![];

    // the service-account cache (metadata only)
    let writer = reflector::store::Writer::<PartialObjectMeta<ServiceAccount>>::default();
    let service_accounts = writer.as_reader();
    // `Api<PartialObjectMeta<_>>` lists and watches metadata only
    let stream = watcher(
        Api::<PartialObjectMeta<ServiceAccount>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|sa| sa.metadata.managed_fields = None)
    .reflect(writer);
    tasks.push(tokio::spawn(async move {
        let mut s = std::pin::pin!(stream);
        loop {
            match s.try_next().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "wi-webhook: service-account watch failed; retrying")
                }
            }
        }
    }));
    {
        let reader = service_accounts.clone();
        tasks.push(tokio::spawn(async move {
            if reader.wait_until_ready().await.is_ok() {
                listed.set();
            }
        }));
    }

    // the certificate and the CA bundle
    let (ca_tx, ca_rx) = tokio::sync::watch::channel(None);
    let cfg = Arc::new(cfg);
    tasks.push(tokio::spawn(keep_certificate(
        arm,
        cfg.clone(),
        slot.clone(),
        ca_tx,
    )));
    tasks.push(tokio::spawn(keep_ca_bundle(
        client.clone(),
        cfg.webhook_config_name.clone(),
        ca_rx,
    )));

    // HTTPS
    tasks.push(serve_https(
        listener,
        slot.clone(),
        App {
            client,
            service_accounts,
            defaults: cfg.defaults.clone(),
            health,
        },
    ));
    Ok(Webhook {
        addr,
        certificate: slot,
        tasks,
    })
}

/// The HTTPS listener: TLS with the certificate `slot` holds, [`router`] over `app`, under the
/// process's connection governor.
fn serve_https(
    listener: tokio::net::TcpListener,
    slot: Arc<CertSlot>,
    app: App,
) -> tokio::task::JoinHandle<()> {
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(slot);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let app = router(Arc::new(app));
    keyless_ops::limits::serve_with(
        listener,
        keyless_ops::limits::governor(),
        "wi-webhook HTTPS",
        move |tcp| {
            let acceptor = acceptor.clone();
            async move { acceptor.accept(tcp).await.ok().map(|tls| (tls, ())) }
        },
        move |_peer, req| {
            let app = app.clone();
            async move {
                use tower::ServiceExt;
                match app.oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            }
        },
    )
}

/// The admission server alone, without an API server or Keyless (benches): the HTTPS
/// listener, TLS and handler of [`start`] on `listener`, serving `key` (never renewed), with
/// `service_accounts` (their metadata) as the whole service-account cache. A service account
/// not among them is read from an API server that is not there (`https://127.0.0.1:1`): the
/// pod is refused (500), as when the API server cannot be reached.
pub async fn serve_prefilled(
    listener: tokio::net::TcpListener,
    service_accounts: impl IntoIterator<Item = kube::api::ObjectMeta>,
    defaults: Defaults,
    key: Arc<CertifiedKey>,
) -> std::io::Result<Webhook> {
    use kube::core::PartialObjectMetaExt;
    keyless_pki::install_crypto_provider();
    metric::describe();
    let addr = listener.local_addr()?;
    let mut writer = reflector::store::Writer::<PartialObjectMeta<ServiceAccount>>::default();
    writer.apply_watcher_event(&watcher::Event::Init);
    for meta in service_accounts {
        let sa = meta.into_request_partial::<ServiceAccount>();
        writer.apply_watcher_event(&watcher::Event::InitApply(sa));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let nowhere = axum::http::Uri::from_static("https://127.0.0.1:1");
    let client =
        kube::Client::try_from(kube::Config::new(nowhere)).map_err(std::io::Error::other)?;
    let slot = Arc::new(CertSlot::default());
    slot.set(key, u64::MAX);
    let task = serve_https(
        listener,
        slot.clone(),
        App {
            client,
            service_accounts: writer.as_reader(),
            defaults,
            health: Health::new(),
        },
    );
    // the store's writer is dropped: the cache stays as it was filled
    Ok(Webhook {
        addr,
        certificate: slot,
        tasks: vec![task],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_two_thirds_of_the_life() {
        assert_eq!(renew_at(1_000, 1_060), 1_040);
        assert_eq!(renew_at(0, 7 * 86_400), 2 * 7 * 86_400 / 3);
        assert_eq!(renew_at(10, 5), 10, "a backwards validity: at once");
    }

    #[test]
    fn the_csr_names_the_sans_and_a_foreign_leaf_is_refused() {
        let sans = vec![
            "svc.ns.svc".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        let (pem, key) = csr(&sans).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let der = keyless_pki::pem_blocks(&pem, "CERTIFICATE REQUEST").remove(0);
        let parsed = rcgen::CertificateSigningRequestParams::from_der(&der.into()).unwrap();
        let names: Vec<String> = parsed
            .params
            .subject_alt_names
            .iter()
            .map(|s| format!("{s:?}"))
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names[0].contains("svc.ns.svc") && names[1].contains("127.0.0.1"));
        for bad in ["bad name", "a..b", "-a.b", "a_b.c", "", "x.*"] {
            assert!(
                matches!(csr(&[bad.to_string()]), Err(WebhookError::San(..))),
                "{bad}"
            );
        }
        assert!(csr(&["*.svc.cluster.local".to_string()]).is_ok());
        assert!(csr(&[]).is_err());

        // a CA signs the CSR: the answer is taken with the key, refused with another key
        keyless_pki::install_crypto_provider();
        let (ca, _) = keyless_pki::Ca::generate("webhook CA", unix_now() - 60).unwrap();
        let (leaf, _) = ca
            .issue_server_cert(&["127.0.0.1".into()], unix_now() - 60, 3600)
            .unwrap();
        let answer = json!({"certificate": keyless_pki::pem("CERTIFICATE", &leaf),
            "caBundle": ca.cert_pem()});
        assert!(matches!(
            certified(&answer, key.clone()),
            Err(WebhookError::Certificate(m)) if m.contains("not for the key")
        ));
        assert!(certified(&json!({"certificate": "x", "caBundle": ca.cert_pem()}), key).is_err());
    }

    #[test]
    fn the_ca_bundle_patch_names_only_stale_webhooks() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let config = |a: Option<&str>, b: Option<&str>| -> MutatingWebhookConfiguration {
            let hook = |name: &str, ca: Option<&str>| {
                let mut cc = json!({"url": "https://127.0.0.1:1/mutate-v1-pod"});
                if let Some(ca) = ca {
                    cc["caBundle"] = json!(b64(ca));
                }
                json!({"name": name, "clientConfig": cc, "sideEffects": "None",
                    "admissionReviewVersions": ["v1"]})
            };
            serde_json::from_value(json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": "c", "resourceVersion": "42"},
                "webhooks": [hook("a.example", a), hook("b.example", b)]}))
            .unwrap()
        };
        let ca = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(ca_bundle_patch(&config(Some(ca), Some(ca)), ca), None);
        assert_eq!(
            ca_bundle_patch(&config(Some(ca), None), ca),
            Some(json!({"metadata": {"resourceVersion": "42"},
                "webhooks": [{"name": "b.example", "clientConfig": {"caBundle": b64(ca)}}]}))
        );
        let p = ca_bundle_patch(&config(Some("old"), Some("old")), ca).unwrap();
        assert_eq!(p["webhooks"].as_array().unwrap().len(), 2);
        let empty: MutatingWebhookConfiguration =
            serde_json::from_value(json!({"metadata": {"name": "c"}})).unwrap();
        assert_eq!(ca_bundle_patch(&empty, ca), None);
    }
}
