//! Workload identity's two loops in the cluster add-on (`keyless pod-identity-addon`, also
//! spelled `keyless cluster-addon`), beside the pod-identity reconcile and under a Lease of
//! their own (`keyless-workload-identity` in `kube-system`):
//!
//! - **JWKS publisher.** Every `jwks_interval` (and at once when this replica starts leading)
//!   it reads the API server's service-account keys (`GET /openid/v1/jwks`, with the add-on's
//!   own kube credentials; the `system:service-account-issuer-discovery` ClusterRole grants it)
//!   and, when they differ from what it last published, posts them to the cluster's
//!   `publishServiceAccountKeys` action. A 400 `OIDCIssuerNotEnabled` is not an error: the
//!   loop idles until the next interval. Each pass also compares the API server's discovery
//!   `issuer` (`/.well-known/openid-configuration`) with the `issuerURL` Keyless answered and
//!   reports a mismatch (log, [`metric::ISSUER_MISMATCH`], the readiness check): tokens of such
//!   an API server never exchange.
//!
//!   **The proof.** Each publish carries `"proof"`: a token the API server minted (TokenRequest)
//!   for the add-on's own service account, audience `{issuer}publishServiceAccountKeys` (the
//!   issuer of the API server's discovery document). Keyless checks it against the key set it
//!   already stores (on the first publish, against the set being published), so a node's
//!   kubelet identity alone cannot publish a key of its own. The loop keeps a proof minted while
//!   the API server's keys equal the set last published, minting it again when older than
//!   [`defaults::PROOF_REMINT`] — only while they are equal —, and publishes a changed set (a
//!   rotation that switched the signing key at once) with the proof it kept, which a published
//!   key signed. A refused proof (403 `PublishProofRejected`, 400 about `proof`) is logged,
//!   counted (`result="proof_rejected"`) and retried after the back-off.
//! - **Readiness.** Pods (all namespaces) whose `spec.readinessGates` name
//!   [`CONDITION_TYPE`] are checked against `checkWorkloadIdentity` — client id from their
//!   service account's `azure.workload.identity/client-id` annotation, subject
//!   `system:serviceaccount:NS:SA`, the audience of the webhook's tokens —, deduplicated and
//!   batched (≤ [`defaults::BATCH`] subjects a call), and their condition is written to
//!   `pods/status` (a strategic merge patch keyed by the condition's `type`, so the kubelet's
//!   conditions are untouched) only when it changed. A pod is checked again every
//!   `not_ready_every` while not ready and every `ready_every` once ready, and at once when it
//!   is new, recreated, or its service account's client id changes.
//!
//! Both are reconciles with an error policy: a failed pass is retried after a back-off
//! (`RETRY_MIN` doubling to `RETRY_MAX`), and nothing is written by a replica that does not hold
//! the Lease.

use crate::arm::{Arm, ArmConfig, ArmError};
use crate::lease::{self, LeaseConfig};
use crate::reflect::reflect;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, PodCondition, ServiceAccount};
use kube::api::{Api, GetParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The condition type of the readiness gate (the webhook adds it to `spec.readinessGates`).
pub const CONDITION_TYPE: &str = "keyless.dev/workload-identity-ready";
/// The service-account annotation naming the identity (azure-workload-identity's).
pub const CLIENT_ID_ANNOTATION: &str = keyless_core::workload_identity::CLIENT_ID_ANNOTATION;

/// The loops' defaults, in one place.
pub mod defaults {
    use std::time::Duration;
    /// How often the API server's JWKS is read.
    pub const JWKS_SYNC_INTERVAL: Duration = Duration::from_secs(10);
    /// An unchanged key set is posted again this often (Keyless's copy restored from a backup
    /// or overwritten by hand is repaired).
    pub const REPUBLISH_EVERY: Duration = Duration::from_secs(300);
    /// How often a pod whose condition is False is checked again.
    pub const NOT_READY_EVERY: Duration = Duration::from_secs(5);
    /// How often a pod whose condition is True is checked again.
    pub const READY_EVERY: Duration = Duration::from_secs(60);
    /// Back-off after a failed pass: from `RETRY_MIN`, doubling to `RETRY_MAX`.
    pub const RETRY_MIN: Duration = Duration::from_millis(500);
    pub const RETRY_MAX: Duration = Duration::from_secs(30);
    /// Watch events within this window after the first make one pass.
    pub const DEBOUNCE: Duration = Duration::from_millis(200);
    /// The Lease of the workload-identity loops.
    pub const LEASE_NAME: &str = "keyless-workload-identity";
    pub const LEASE_NAMESPACE: &str = "kube-system";
    pub const LEASE_SECONDS: i32 = 15;
    pub const LEASE_RENEW: Duration = Duration::from_secs(5);
    /// Subjects in one `checkWorkloadIdentity` call (the action's bound).
    pub const BATCH: usize = 500;
    /// Condition writes in flight at once.
    pub const WRITES_IN_FLIGHT: usize = 20;
    /// Field manager of the condition writes.
    pub const FIELD_MANAGER: &str = "keyless-workload-identity";
    /// The audience of the projected tokens (the webhook's default).
    pub const AUDIENCE: &str = keyless_core::workload_identity::DEFAULT_AUDIENCE;
    /// The containerservice api-version of the calls (the add-on's).
    pub const API_VERSION: &str = crate::addon::defaults::API_VERSION;
    /// The add-on's own service account, whose TokenRequest token is the publish proof.
    pub const SERVICE_ACCOUNT_NAME: &str = "keyless-pod-identity-addon";
    pub const SERVICE_ACCOUNT_NAMESPACE: &str = "kube-system";
    /// The proof's audience is the issuer URL followed by this.
    pub const PROOF_AUDIENCE_SUFFIX: &str = "publishServiceAccountKeys";
    /// `expirationSeconds` of the proof's TokenRequest.
    pub const PROOF_SECONDS: i64 = 3600;
    /// A kept proof is minted again when older than this (only while the API server's keys
    /// equal the set last published).
    pub const PROOF_REMINT: Duration = Duration::from_secs(600);
}

/// The metric names of the loops (labels are bounded sets).
pub mod metric {
    /// Counter: JWKS passes that reached Keyless or found nothing to do. Label `result`:
    /// `changed` (Keyless stored a new key set), `unchanged` (published, Keyless already had
    /// it), `not_enabled` (the cluster's issuer is off), `proof_rejected` (Keyless refused the
    /// proof of the API server: 403 `PublishProofRejected` or 400 about `proof`), `error`.
    pub const JWKS_PUBLISHES: &str = "keyless_wi_jwks_publishes_total";
    /// Gauge: keys in the key set last published.
    pub const JWKS_KEYS: &str = "keyless_wi_jwks_keys";
    /// Gauge: 1 while the API server's discovery `issuer` differs from the cluster's issuer
    /// URL, else 0.
    pub const ISSUER_MISMATCH: &str = "keyless_wi_issuer_mismatch";
    /// Counter: pods checked. Label `result`: a `checkWorkloadIdentity` code (`ready`,
    /// `issuer_not_enabled`, `no_keys_published`, `identity_not_found`,
    /// `no_matching_credential`, `other`), or `service_account_not_found` / `no_client_id`
    /// (decided in the cluster), or `error` (the call failed).
    pub const READINESS_CHECKS: &str = "keyless_wi_readiness_checks_total";
    /// Counter: condition writes (`pods/status`). Label `result` (`ok` | `error`).
    pub const CONDITION_WRITES: &str = "keyless_wi_condition_writes_total";
    /// Gauge: 1 while this replica holds the workload-identity Lease.
    pub const LEADER: &str = "keyless_wi_leader";
}

/// Settings of the loops.
#[derive(Debug, Clone)]
pub struct WiConfig {
    /// ARM id of the managed cluster.
    pub cluster_id: String,
    /// Keyless ARM, as the kubelet identity (the add-on's).
    pub arm: ArmConfig,
    pub lease: LeaseConfig,
    pub jwks_interval: Duration,
    pub not_ready_every: Duration,
    pub ready_every: Duration,
    /// The audience of the pods' projected tokens.
    pub audience: String,
    /// The add-on's own service account (namespace, name): its TokenRequest token proves a
    /// publish came through the API server.
    pub service_account_namespace: String,
    pub service_account_name: String,
}

impl WiConfig {
    /// The defaults for `cluster_id` with `arm`, this replica named `holder`.
    pub fn new(cluster_id: String, arm: ArmConfig, holder: String) -> WiConfig {
        WiConfig {
            cluster_id,
            arm,
            lease: LeaseConfig {
                name: defaults::LEASE_NAME.into(),
                namespace: defaults::LEASE_NAMESPACE.into(),
                seconds: defaults::LEASE_SECONDS,
                holder,
            },
            jwks_interval: defaults::JWKS_SYNC_INTERVAL,
            not_ready_every: defaults::NOT_READY_EVERY,
            ready_every: defaults::READY_EVERY,
            audience: defaults::AUDIENCE.into(),
            service_account_namespace: defaults::SERVICE_ACCOUNT_NAMESPACE.into(),
            service_account_name: defaults::SERVICE_ACCOUNT_NAME.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WiError {
    #[error(transparent)]
    Arm(#[from] ArmError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("caches: {0}")]
    Caches(String),
    #[error("{0}")]
    Invalid(String),
    /// Condition writes of this pass that failed.
    #[error("{}", .0.join("; "))]
    Writes(Vec<String>),
    /// The publish proof could not be minted (TokenRequest).
    #[error("minting the publish proof: {0}")]
    Proof(String),
    /// Keyless refused the publish proof.
    #[error("Keyless refused the proof of the API server: {0}")]
    ProofRejected(String),
}

// ------------------------------------------------------------------ status (readiness)

/// What the loops last saw, for the ops listener's readiness check and the tests.
#[derive(Debug, Clone, Default)]
pub struct WiState {
    pub leader: bool,
    /// The cluster's issuer is enabled (None: not known yet).
    pub issuer_enabled: Option<bool>,
    /// The issuer URL Keyless answered.
    pub issuer_url: Option<String>,
    /// The API server's discovery `issuer`, when it differs from `issuer_url`.
    pub issuer_mismatch: Option<String>,
    /// The last JWKS pass: Ok, or why it failed.
    pub jwks: Option<Result<(), String>>,
    /// Keys in the set last published.
    pub published_keys: usize,
    /// The last readiness pass: Ok, or why it failed.
    pub readiness: Option<Result<(), String>>,
    /// Why the loops stopped (they do not restart).
    pub stopped: Option<String>,
}

/// Shared view of [`WiState`].
#[derive(Debug, Clone, Default)]
pub struct WiStatus(Arc<Mutex<WiState>>);

impl WiStatus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self) -> WiState {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut WiState)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The readiness check: a standby replica is ready; the holder once its first JWKS pass
    /// succeeded (or found the issuer off) and while the last passes did, and while the API
    /// server's issuer is the cluster's.
    pub fn check(&self) -> Result<(), String> {
        let s = self.get();
        if let Some(e) = &s.stopped {
            return Err(format!("stopped: {e}"));
        }
        if !s.leader {
            return Ok(());
        }
        match &s.jwks {
            None => return Err("the API server's keys have not been read yet".into()),
            Some(Err(e)) => return Err(format!("publishing the API server's keys: {e}")),
            Some(Ok(())) => {}
        }
        if let Some(other) = &s.issuer_mismatch {
            return Err(format!(
                "the API server's issuer {other} is not the cluster's issuer {}",
                s.issuer_url.as_deref().unwrap_or("?")
            ));
        }
        if let Some(Err(e)) = &s.readiness {
            return Err(format!("readiness checks: {e}"));
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ pure rules

/// `no_matching_credential` → `NoMatchingCredential` (a condition's `reason` is CamelCase).
pub fn camel_reason(code: &str) -> String {
    code.split(['_', '-'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// The metric label of a `checkWorkloadIdentity` code (a bounded set).
fn code_label(code: &str) -> &'static str {
    match code {
        "ready" => "ready",
        "issuer_not_enabled" => "issuer_not_enabled",
        "no_keys_published" => "no_keys_published",
        "identity_not_found" => "identity_not_found",
        "no_matching_credential" => "no_matching_credential",
        "service_account_not_found" => "service_account_not_found",
        "no_client_id" => "no_client_id",
        _ => "other",
    }
}

/// Whether `pod` carries the readiness gate.
pub fn gated(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.condition_type == CONDITION_TYPE))
}

/// Whether the pod is still worth checking (not finished, not being deleted).
fn live(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The pod's service account name (`default` when unset).
pub fn service_account_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| {
            s.service_account_name
                .clone()
                .or_else(|| s.service_account.clone())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// What one pod's condition should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ready: bool,
    /// The snake_case code (`checkWorkloadIdentity`'s, or one decided here).
    pub code: String,
    pub message: String,
}

impl Verdict {
    fn local(code: &str, message: String) -> Verdict {
        Verdict {
            ready: false,
            code: code.into(),
            message,
        }
    }

    /// The condition's `status`.
    pub fn status(&self) -> &'static str {
        if self.ready {
            "True"
        } else {
            "False"
        }
    }
}

/// The pod's current condition of [`CONDITION_TYPE`], if any.
pub fn current_condition(pod: &Pod) -> Option<&PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_TYPE)
}

/// Whether the pod's condition already says `v` (status, reason and message).
pub fn condition_says(pod: &Pod, v: &Verdict) -> bool {
    current_condition(pod).is_some_and(|c| {
        c.status == v.status()
            && c.reason.as_deref() == Some(camel_reason(&v.code).as_str())
            && c.message.as_deref().unwrap_or("") == v.message
    })
}

/// The strategic merge patch of `pods/status` that sets the condition to `v` (only this
/// condition: the list merges by `type`). `lastTransitionTime` moves only when the status
/// changes (`now`, RFC 3339).
pub fn condition_patch(pod: &Pod, v: &Verdict, now: &str) -> Value {
    let mut c = json!({
        "type": CONDITION_TYPE,
        "status": v.status(),
        "reason": camel_reason(&v.code),
        "message": v.message,
    });
    if current_condition(pod).is_none_or(|c| c.status != v.status()) {
        c["lastTransitionTime"] = json!(now);
    }
    json!({"status": {"conditions": [c]}})
}

/// One `checkWorkloadIdentity` subject.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subject {
    pub client_id: String,
    pub subject: String,
    pub audience: String,
}

impl Subject {
    pub fn body(&self) -> Value {
        json!({"clientId": self.client_id, "subject": self.subject, "audience": self.audience})
    }
}

/// The results of one `checkWorkloadIdentity` answer for `asked`, in order; an answer that does
/// not match what was asked is refused.
pub fn read_results(asked: &[Subject], answer: &Value) -> Result<Vec<Verdict>, WiError> {
    let results = answer["results"]
        .as_array()
        .ok_or_else(|| WiError::Invalid("checkWorkloadIdentity answered no results".into()))?;
    if results.len() != asked.len() {
        return Err(WiError::Invalid(format!(
            "checkWorkloadIdentity answered {} results for {} subjects",
            results.len(),
            asked.len()
        )));
    }
    asked
        .iter()
        .zip(results)
        .map(|(s, r)| {
            let same = r["clientId"]
                .as_str()
                .is_none_or(|c| c.eq_ignore_ascii_case(&s.client_id))
                && r["subject"].as_str().is_none_or(|x| x == s.subject);
            if !same {
                return Err(WiError::Invalid(
                    "checkWorkloadIdentity answered results out of order".into(),
                ));
            }
            let ready = r["ready"].as_bool().unwrap_or(false);
            let code = r["reason"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| if ready { "ready" } else { "not_ready" }.into());
            Ok(Verdict {
                ready,
                code,
                message: r["message"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// When a pod checked at `at` with `ready` is due again.
fn due_at(at: Instant, ready: bool, cfg: &WiConfig) -> Instant {
    at + if ready {
        cfg.ready_every
    } else {
        cfg.not_ready_every
    }
}

/// The audience of the publish proof: the issuer URL (with its trailing slash) followed by
/// `publishServiceAccountKeys`.
pub fn proof_audience(issuer: &str) -> String {
    format!("{issuer}{}", defaults::PROOF_AUDIENCE_SUFFIX)
}

/// The `kid` of a JWT's header, if it has one.
pub fn token_kid(jwt: &str) -> Option<String> {
    use base64::Engine;
    let head = jwt.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("kid").and_then(Value::as_str).map(str::to_string)
}

/// Whether a token whose header names `kid` may be kept as the proof for the published `keys`:
/// a key of theirs signed it (a token without a `kid` is taken as theirs).
pub fn signed_by_one_of(kid: Option<&str>, keys: &[Value]) -> bool {
    kid.is_none_or(|kid| keys.iter().any(|k| k["kid"].as_str() == Some(kid)))
}

/// Whether Keyless refused the publish for its proof: 403 `PublishProofRejected`, or a 400
/// about `proof` (missing or malformed).
pub fn proof_refused(e: &ArmError) -> bool {
    match e {
        ArmError::Refused {
            status,
            code,
            message,
            ..
        } => {
            code == "PublishProofRejected"
                || (*status == 400
                    && code != "OIDCIssuerNotEnabled"
                    && message.to_ascii_lowercase().contains("proof"))
        }
        _ => false,
    }
}

/// A proof the API server minted for the add-on's service account.
#[derive(Debug, Clone)]
struct Proof {
    token: String,
    audience: String,
    minted: Instant,
}

impl Proof {
    /// Still worth sending: minted less than its lifetime (less a minute) ago.
    fn usable(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.minted)
            < Duration::from_secs(defaults::PROOF_SECONDS as u64 - 60)
    }

    /// Due to be minted again (only asked while the API server's keys equal the published set).
    fn stale(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.minted) >= defaults::PROOF_REMINT
    }
}

// ------------------------------------------------------------------ IO

/// The loops' calls to Keyless.
struct Keyless {
    arm: Arm,
    cluster_id: String,
}

impl Keyless {
    async fn post(&self, action: &str, body: &Value) -> Result<Value, ArmError> {
        self.arm
            .action(&self.cluster_id, action, defaults::API_VERSION, body)
            .await
    }
}

/// `GET {dir}/{name}` of the API server as JSON (a path outside the resource API, with the
/// client's credentials).
async fn get_raw(client: &kube::Client, dir: &str, name: &str) -> Result<Value, kube::Error> {
    let req = kube::core::Request::new(dir)
        .get(name, &GetParams::default())
        .map_err(kube::Error::BuildRequest)?;
    client.request::<Value>(req).await
}

/// The API server's service-account keys (`/openid/v1/jwks`'s `keys`).
pub async fn api_server_keys(client: &kube::Client) -> Result<Vec<Value>, WiError> {
    let jwks = get_raw(client, "/openid/v1", "jwks").await?;
    match jwks.get("keys").and_then(Value::as_array) {
        Some(k) if !k.is_empty() => Ok(k.clone()),
        _ => Err(WiError::Invalid(
            "the API server's /openid/v1/jwks has no keys".into(),
        )),
    }
}

/// The API server's discovery `issuer`.
pub async fn api_server_issuer(client: &kube::Client) -> Result<String, WiError> {
    let doc = get_raw(client, "/.well-known", "openid-configuration").await?;
    doc.get("issuer")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| WiError::Invalid("the API server's discovery document has no issuer".into()))
}

/// A TokenRequest token of the service account `ns/name` for `audience` (the publish proof).
pub async fn mint_proof(
    client: &kube::Client,
    ns: &str,
    name: &str,
    audience: &str,
) -> Result<String, WiError> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let req: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": [audience], "expirationSeconds": defaults::PROOF_SECONDS},
    }))
    .map_err(|e| WiError::Proof(e.to_string()))?;
    let tr = api
        .create_token_request(name, &PostParams::default(), &req)
        .await
        .map_err(|e| {
            WiError::Proof(format!("TokenRequest for service account {ns}/{name}: {e}"))
        })?;
    tr.status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            WiError::Proof(format!(
                "TokenRequest for service account {ns}/{name} answered no token"
            ))
        })
}

/// What a JWKS pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Published {
    /// The key set is the one last published: nothing posted.
    Same,
    /// Posted; whether Keyless's stored set changed.
    Posted { changed: bool },
    /// The cluster's issuer is not enabled.
    NotEnabled,
}

struct Jwks {
    /// The key set last accepted by Keyless and when (None: publish at the next pass).
    last: Option<(Vec<Value>, Instant)>,
    issuer_url: Option<String>,
    mismatch: Option<String>,
    /// The proof minted while the API server's keys equalled `last` (a published key signed it).
    proof: Option<Proof>,
    /// The add-on's service account (namespace, name).
    service_account: (String, String),
}

impl Jwks {
    fn new(cfg: &WiConfig) -> Jwks {
        Jwks {
            last: None,
            issuer_url: None,
            mismatch: None,
            proof: None,
            service_account: (
                cfg.service_account_namespace.clone(),
                cfg.service_account_name.clone(),
            ),
        }
    }

    /// The API server's discovery `issuer`, read at most once a pass (`seen`).
    async fn api_issuer(
        client: &kube::Client,
        seen: &mut Option<String>,
    ) -> Result<String, WiError> {
        if let Some(i) = seen {
            return Ok(i.clone());
        }
        let i = api_server_issuer(client).await?;
        *seen = Some(i.clone());
        Ok(i)
    }

    /// A proof minted now (audience from the API server's issuer).
    async fn mint(
        &self,
        client: &kube::Client,
        seen: &mut Option<String>,
    ) -> Result<Proof, WiError> {
        let issuer = Self::api_issuer(client, seen).await?;
        let audience = proof_audience(&issuer);
        let (ns, name) = &self.service_account;
        let token = mint_proof(client, ns, name, &audience).await?;
        Ok(Proof {
            token,
            audience,
            minted: Instant::now(),
        })
    }

    async fn pass(
        &mut self,
        client: &kube::Client,
        keyless: &Keyless,
        status: &WiStatus,
    ) -> Result<Published, WiError> {
        let keys = api_server_keys(client).await?;
        let equal = self.last.as_ref().is_some_and(|(k, _)| *k == keys);
        let same = equal
            && self
                .last
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() < defaults::REPUBLISH_EVERY);
        let mut seen_issuer: Option<String> = None;
        let outcome = if same {
            Published::Same
        } else {
            // the proof: the one kept (a published key signed it: what a rotation that switched
            // the signing key at once needs), else one minted now (the first publish, trusted on
            // first use; or the set is the published one)
            let kept = self.proof.clone().filter(|p| p.usable(Instant::now()));
            let (proof, fresh) = match kept {
                Some(p) => (p, false),
                None => (self.mint(client, &mut seen_issuer).await?, true),
            };
            match keyless
                .post(
                    "publishServiceAccountKeys",
                    &json!({"keys": keys, "proof": proof.token}),
                )
                .await
            {
                Ok(ans) => {
                    if fresh && signed_by_one_of(token_kid(&proof.token).as_deref(), &keys) {
                        self.proof = Some(proof);
                    } else if !equal {
                        // signed by a key of the set before: minted again against this one
                        self.proof = None;
                    }
                    let changed = ans["changed"].as_bool().unwrap_or(true);
                    self.issuer_url = ans["issuerURL"].as_str().map(str::to_string);
                    if changed {
                        tracing::info!(
                            keys = keys.len(),
                            issuer = self.issuer_url.as_deref().unwrap_or(""),
                            "published the API server's service-account keys"
                        );
                    }
                    metrics::gauge!(metric::JWKS_KEYS).set(keys.len() as f64);
                    status.update(|s| {
                        s.issuer_enabled = Some(true);
                        s.issuer_url = self.issuer_url.clone();
                        s.published_keys = keys.len();
                    });
                    self.last = Some((keys.clone(), Instant::now()));
                    Published::Posted { changed }
                }
                Err(e) if e.code() == Some("OIDCIssuerNotEnabled") => {
                    if status.get().issuer_enabled != Some(false) {
                        tracing::info!(
                            "the cluster's OIDC issuer is not enabled: the keys are not published"
                        );
                    }
                    status.update(|s| {
                        s.issuer_enabled = Some(false);
                        s.issuer_url = None;
                        s.issuer_mismatch = None;
                    });
                    self.issuer_url = None;
                    self.mismatch = None;
                    if fresh {
                        // kept for the first publish (not minted again every pass while idle)
                        self.proof = Some(proof);
                    }
                    metrics::gauge!(metric::ISSUER_MISMATCH).set(0.0);
                    return Ok(Published::NotEnabled);
                }
                Err(e) if proof_refused(&e) => {
                    // not kept: the next pass mints one (which succeeds after an administrator
                    // reset the recorded publisher or published the keys)
                    self.proof = None;
                    let (ns, name) = &self.service_account;
                    return Err(WiError::ProofRejected(format!(
                        "{} (the proof: a token of service account {ns}/{name} for audience {}, {} minted {}s ago; \
                         a key set Keyless stores must have signed it and its issuer must be the cluster's — \
                         after a signing-key change with no such proof kept, a principal with \
                         managedClusters/write must publish the keys or reset the publisher)",
                        e.message(),
                        proof.audience,
                        if fresh { "newly" } else { "kept,"},
                        proof.minted.elapsed().as_secs(),
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        };
        // the kept proof: minted again, only while the API server's keys are the published ones
        let equal_now = self.last.as_ref().is_some_and(|(k, _)| *k == keys);
        if equal_now && self.proof.as_ref().is_none_or(|p| p.stale(Instant::now())) {
            let p = self.mint(client, &mut seen_issuer).await?;
            if signed_by_one_of(token_kid(&p.token).as_deref(), &keys) {
                tracing::debug!(audience = %p.audience, "minted the publish proof");
                self.proof = Some(p);
            } else {
                // the signing key changed since the keys were read: the next pass publishes
                tracing::info!("the API server's signing key changed while minting the publish proof: not kept");
            }
        }
        if let Some(ours) = self.issuer_url.clone() {
            // a discovery document the add-on may not read is not a failed pass
            match Self::api_issuer(client, &mut seen_issuer).await {
                Ok(theirs) => {
                    let mismatch = (theirs != ours).then_some(theirs);
                    if mismatch != self.mismatch {
                        match &mismatch {
                            Some(t) => tracing::warn!(
                                api_server_issuer = %t,
                                cluster_issuer = %ours,
                                "the API server's --service-account-issuer is not the cluster's issuer URL: its tokens will not exchange"
                            ),
                            None => {
                                tracing::info!(issuer = %ours, "the API server's issuer is the cluster's")
                            }
                        }
                    }
                    metrics::gauge!(metric::ISSUER_MISMATCH).set(if mismatch.is_some() {
                        1.0
                    } else {
                        0.0
                    });
                    self.mismatch = mismatch.clone();
                    status.update(|s| s.issuer_mismatch = mismatch);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the API server's discovery document")
                }
            }
        }
        Ok(outcome)
    }
}

/// A pod checked by this replica.
#[derive(Debug, Clone)]
struct Checked {
    uid: String,
    at: Instant,
    ready: bool,
    /// The client id the check used (a change to the annotation checks again at once).
    client_id: Option<String>,
}

type PodKey = (String, String);

fn pod_key(p: &Pod) -> PodKey {
    (
        p.metadata.namespace.clone().unwrap_or_default(),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

struct Readiness {
    checked: HashMap<PodKey, Checked>,
}

/// The pass's view of one due pod.
struct Due {
    pod: Arc<Pod>,
    client_id: Option<String>,
    /// Decided in the cluster (no service account, no client id); else the subject asked.
    local: Option<Verdict>,
    subject: Option<Subject>,
}

impl Readiness {
    fn client_id(sas: &Store<ServiceAccount>, ns: &str, sa: &str) -> Option<Option<String>> {
        let sa = sas.get(&ObjectRef::new(sa).within(ns))?;
        Some(
            sa.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(CLIENT_ID_ANNOTATION))
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty()),
        )
    }

    /// The gated pods due for a check now, and when the next one is due.
    fn due(
        &mut self,
        pods: &Store<Pod>,
        sas: &Store<ServiceAccount>,
        cfg: &WiConfig,
        audience: &str,
    ) -> (Vec<Due>, Option<Instant>) {
        let now = Instant::now();
        let gated: Vec<Arc<Pod>> = pods
            .state()
            .into_iter()
            .filter(|p| gated(p) && live(p))
            .collect();
        let keys: std::collections::HashSet<PodKey> = gated.iter().map(|p| pod_key(p)).collect();
        self.checked.retain(|k, _| keys.contains(k));
        let mut due = vec![];
        let mut next: Option<Instant> = None;
        for pod in gated {
            let key = pod_key(&pod);
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let sa = service_account_of(&pod);
            let cid = Self::client_id(sas, &key.0, &sa);
            let flat = cid.clone().flatten();
            if let Some(c) = self.checked.get(&key) {
                let at = due_at(c.at, c.ready, cfg);
                if c.uid == uid && c.client_id == flat && at > now {
                    next = Some(next.map_or(at, |n| n.min(at)));
                    continue;
                }
            }
            let (local, subject) = match cid {
                None => (
                    Some(Verdict::local(
                        "service_account_not_found",
                        format!("service account {}/{sa} not found", key.0),
                    )),
                    None,
                ),
                Some(None) => (
                    Some(Verdict::local(
                        "no_client_id",
                        format!(
                            "service account {}/{sa} has no {CLIENT_ID_ANNOTATION} annotation",
                            key.0
                        ),
                    )),
                    None,
                ),
                Some(Some(c)) => (
                    None,
                    Some(Subject {
                        client_id: c,
                        subject: format!("system:serviceaccount:{}:{sa}", key.0),
                        audience: audience.to_string(),
                    }),
                ),
            };
            due.push(Due {
                pod,
                client_id: flat,
                local,
                subject,
            });
        }
        (due, next)
    }

    /// Check the due pods: C4 in batches, then the conditions that changed. The error of the
    /// pass (a failed call: nothing written; failed writes: the rest written).
    async fn pass(
        &mut self,
        due: Vec<Due>,
        client: &kube::Client,
        keyless: &Keyless,
        lead: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<usize, WiError> {
        let mut subjects: Vec<Subject> = due.iter().filter_map(|d| d.subject.clone()).collect();
        subjects.sort();
        subjects.dedup();
        let mut verdicts: BTreeMap<Subject, Verdict> = BTreeMap::new();
        for chunk in subjects.chunks(defaults::BATCH) {
            let body = json!({"subjects": chunk.iter().map(Subject::body).collect::<Vec<_>>()});
            let ans = match keyless.post("checkWorkloadIdentity", &body).await {
                Ok(a) => a,
                Err(e) => {
                    metrics::counter!(metric::READINESS_CHECKS, "result" => "error")
                        .increment(chunk.len() as u64);
                    return Err(e.into());
                }
            };
            for (s, v) in chunk.iter().zip(read_results(chunk, &ans)?) {
                verdicts.insert(s.clone(), v);
            }
        }
        if !*lead.borrow() {
            return Err(WiError::Invalid(
                "lost the Lease: no condition written".into(),
            ));
        }
        let now = Instant::now();
        let stamp = k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
            .to_string();
        let mut writes = vec![];
        for d in due {
            let v = match (&d.local, &d.subject) {
                (Some(v), _) => v.clone(),
                (None, Some(s)) => match verdicts.get(s) {
                    Some(v) => v.clone(),
                    None => continue,
                },
                (None, None) => continue,
            };
            metrics::counter!(metric::READINESS_CHECKS, "result" => code_label(&v.code))
                .increment(1);
            let key = pod_key(&d.pod);
            self.checked.insert(
                key.clone(),
                Checked {
                    uid: d.pod.metadata.uid.clone().unwrap_or_default(),
                    at: now,
                    ready: v.ready,
                    client_id: d.client_id.clone(),
                },
            );
            if !condition_says(&d.pod, &v) {
                writes.push((key, condition_patch(&d.pod, &v, &stamp), v));
            }
        }
        let written = writes.len();
        let results: Vec<Result<(), (PodKey, String)>> =
            futures::stream::iter(writes.into_iter().map(|((ns, name), patch, v)| {
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                async move {
                    let r = api
                        .patch_status(
                            &name,
                            &PatchParams {
                                field_manager: Some(defaults::FIELD_MANAGER.into()),
                                ..Default::default()
                            },
                            &Patch::Strategic(&patch),
                        )
                        .await;
                    metrics::counter!(
                        metric::CONDITION_WRITES,
                        "result" => keyless_ops::metrics::result_label(&r)
                    )
                    .increment(1);
                    match r {
                        Ok(_) => {
                            tracing::info!(
                                namespace = %ns, pod = %name, ready = v.ready,
                                reason = %camel_reason(&v.code), "workload identity readiness"
                            );
                            Ok(())
                        }
                        // gone meanwhile
                        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                        Err(e) => {
                            let msg = format!("{ns}/{name}: {e}");
                            Err(((ns, name), msg))
                        }
                    }
                }
            }))
            .buffer_unordered(defaults::WRITES_IN_FLIGHT)
            .collect()
            .await;
        let mut failed = vec![];
        for (key, msg) in results.into_iter().filter_map(Result::err) {
            // checked (and written) again after the back-off
            self.checked.remove(&key);
            failed.push(msg);
        }
        if !failed.is_empty() {
            return Err(WiError::Writes(failed));
        }
        Ok(written)
    }
}

struct Abort(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Abort {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The error policy of a loop: the wait before the next pass.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(defaults::RETRY_MIN)
    }
    fn ok(&mut self) {
        self.0 = defaults::RETRY_MIN;
    }
    fn failed(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(defaults::RETRY_MAX);
        d
    }
}

async fn jwks_loop(
    cfg: &WiConfig,
    client: &kube::Client,
    keyless: &Keyless,
    status: &WiStatus,
    mut lead: tokio::sync::watch::Receiver<bool>,
) {
    let mut jwks = Jwks::new(cfg);
    let mut backoff = Backoff::new();
    loop {
        if !*lead.borrow_and_update() {
            // a new holder publishes at once
            jwks.last = None;
            if lead.changed().await.is_err() {
                return;
            }
            continue;
        }
        let r = jwks.pass(client, keyless, status).await;
        let label = match &r {
            Ok(Published::Same) | Ok(Published::Posted { changed: false }) => "unchanged",
            Ok(Published::Posted { changed: true }) => "changed",
            Ok(Published::NotEnabled) => "not_enabled",
            Err(WiError::ProofRejected(_)) => "proof_rejected",
            Err(_) => "error",
        };
        metrics::counter!(metric::JWKS_PUBLISHES, "result" => label).increment(1);
        let wait = match r {
            Ok(_) => {
                backoff.ok();
                status.update(|s| s.jwks = Some(Ok(())));
                cfg.jwks_interval
            }
            Err(e @ WiError::ProofRejected(_)) => {
                let wait = backoff.failed();
                tracing::error!(error = %e, retry_in = ?wait, "Keyless refused to publish the API server's keys: the proof did not verify");
                status.update(|s| s.jwks = Some(Err(e.to_string())));
                wait
            }
            Err(e) => {
                let wait = backoff.failed();
                tracing::warn!(error = %e, retry_in = ?wait, "publishing the API server's keys failed");
                status.update(|s| s.jwks = Some(Err(e.to_string())));
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {},
            r = lead.changed() => if r.is_err() { return },
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn readiness_loop(
    cfg: &WiConfig,
    client: &kube::Client,
    keyless: &Keyless,
    status: &WiStatus,
    pods: Store<Pod>,
    sas: Store<ServiceAccount>,
    wake: Arc<tokio::sync::Notify>,
    mut lead: tokio::sync::watch::Receiver<bool>,
) {
    let mut r = Readiness {
        checked: HashMap::new(),
    };
    let mut backoff = Backoff::new();
    let mut not_before = Instant::now();
    loop {
        if !*lead.borrow_and_update() {
            r.checked.clear();
            if lead.changed().await.is_err() {
                return;
            }
            continue;
        }
        let mut wait = cfg.ready_every;
        if Instant::now() >= not_before {
            let (due, next) = r.due(&pods, &sas, cfg, &cfg.audience);
            if let Some(n) = next {
                wait = wait.min(n.saturating_duration_since(Instant::now()));
            }
            if !due.is_empty() {
                let n = due.len();
                match r.pass(due, client, keyless, &lead).await {
                    Ok(written) => {
                        backoff.ok();
                        status.update(|s| s.readiness = Some(Ok(())));
                        tracing::debug!(checked = n, written, "readiness pass");
                        wait = wait.min(cfg.not_ready_every);
                    }
                    Err(e) => {
                        let w = backoff.failed();
                        tracing::warn!(error = %e, retry_in = ?w, "workload-identity readiness pass failed");
                        status.update(|s| s.readiness = Some(Err(e.to_string())));
                        not_before = Instant::now() + w;
                        wait = w;
                    }
                }
            }
        } else {
            wait = not_before.saturating_duration_since(Instant::now());
        }
        let wait = wait.max(Duration::from_millis(10));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {},
            _ = wake.notified() => tokio::time::sleep(defaults::DEBOUNCE).await,
            r = lead.changed() => if r.is_err() { return },
        }
    }
}

/// Run both loops until `shutdown` resolves. `ready` is called once the caches have listed.
/// An error (no ARM client, the caches could not list) is also recorded in `status`.
pub async fn run(
    cfg: WiConfig,
    client: kube::Client,
    shutdown: impl std::future::Future<Output = ()>,
    status: WiStatus,
    ready: impl FnOnce(),
) -> Result<(), WiError> {
    let r = run_loops(cfg, client, shutdown, status.clone(), ready).await;
    if let Err(e) = &r {
        status.update(|s| s.stopped = Some(e.to_string()));
    }
    r
}

async fn run_loops(
    cfg: WiConfig,
    client: kube::Client,
    shutdown: impl std::future::Future<Output = ()>,
    status: WiStatus,
    ready: impl FnOnce(),
) -> Result<(), WiError> {
    let keyless = Keyless {
        arm: Arm::new(&cfg.arm)?,
        cluster_id: cfg.cluster_id.clone(),
    };
    let wake = Arc::new(tokio::sync::Notify::new());
    let mut tasks = vec![];
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        (),
        wake.clone(),
        &mut tasks,
        "workload-identity",
    );
    let sas = reflect(
        Api::<ServiceAccount>::all(client.clone()),
        (),
        wake.clone(),
        &mut tasks,
        "workload-identity",
    );
    let _tasks = Abort(tasks);
    let mut shutdown = std::pin::pin!(shutdown);
    let listed = async {
        pods.wait_until_ready().await?;
        sas.wait_until_ready().await
    };
    tokio::select! {
        _ = &mut shutdown => return Ok(()),
        r = listed => r.map_err(|e| WiError::Caches(e.to_string()))?,
    }
    ready();
    let holder = cfg.lease.holder.clone();
    let on_change = {
        let status = status.clone();
        move |leading: bool| {
            tracing::info!(leader = leading, holder = %holder, "workload-identity lease");
            metrics::gauge!(metric::LEADER).set(if leading { 1.0 } else { 0.0 });
            status.update(|s| s.leader = leading);
        }
    };
    let (lease_task, lead_rx) = lease::keep(
        client.clone(),
        cfg.lease.clone(),
        defaults::LEASE_RENEW,
        defaults::RETRY_MIN * 2,
        "workload-identity",
        on_change,
    );
    let _lease = Abort(vec![lease_task]);
    let loops = async {
        futures::join!(
            jwks_loop(&cfg, &client, &keyless, &status, lead_rx.clone()),
            readiness_loop(
                &cfg,
                &client,
                &keyless,
                &status,
                pods.clone(),
                sas.clone(),
                wake.clone(),
                lead_rx.clone()
            ),
        )
    };
    tokio::select! {
        _ = &mut shutdown => Ok(()),
        _ = loops => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn gated_pod(conditions: Value) -> Pod {
        pod(json!({
            "metadata": {"name": "web-1", "namespace": "app", "uid": "u1"},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "c", "image": "i"}],
                     "readinessGates": [{"conditionType": CONDITION_TYPE}]},
            "status": {"phase": "Running", "conditions": conditions}
        }))
    }

    #[test]
    fn reasons_are_camel_case() {
        assert_eq!(
            camel_reason("no_matching_credential"),
            "NoMatchingCredential"
        );
        assert_eq!(camel_reason("ready"), "Ready");
        assert_eq!(camel_reason("issuer_not_enabled"), "IssuerNotEnabled");
        assert_eq!(camel_reason("no_client_id"), "NoClientId");
        assert_eq!(code_label("something_new"), "other");
        assert_eq!(code_label("identity_not_found"), "identity_not_found");
    }

    #[test]
    fn gates_and_service_accounts() {
        let p = gated_pod(json!([]));
        assert!(gated(&p) && live(&p));
        assert_eq!(service_account_of(&p), "web");
        let plain = pod(json!({"metadata": {"name": "x"}, "spec": {"containers": [],
            "readinessGates": [{"conditionType": "other"}]}}));
        assert!(!gated(&plain));
        assert_eq!(service_account_of(&plain), "default");
        let done = pod(
            json!({"metadata": {"name": "x"}, "spec": {"containers": []},
            "status": {"phase": "Succeeded"}}),
        );
        assert!(!live(&done));
    }

    #[test]
    fn the_condition_is_patched_only_when_it_changes() {
        let v = Verdict {
            ready: false,
            code: "no_matching_credential".into(),
            message: "no federated credential".into(),
        };
        let p = gated_pod(json!([{"type": "Ready", "status": "False"}]));
        assert!(!condition_says(&p, &v));
        let patch = condition_patch(&p, &v, "2026-01-01T00:00:00Z");
        assert_eq!(
            patch,
            json!({"status": {"conditions": [{
                "type": CONDITION_TYPE, "status": "False", "reason": "NoMatchingCredential",
                "message": "no federated credential", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
        );
        let p = gated_pod(json!([{"type": CONDITION_TYPE, "status": "False",
            "reason": "NoMatchingCredential", "message": "no federated credential",
            "lastTransitionTime": "2025-01-01T00:00:00Z"}]));
        assert!(condition_says(&p, &v));
        // the same status with another reason: no new transition time
        let other = Verdict {
            code: "identity_not_found".into(),
            ..v.clone()
        };
        assert!(!condition_says(&p, &other));
        let patch = condition_patch(&p, &other, "2026-01-01T00:00:00Z");
        assert!(patch["status"]["conditions"][0]
            .get("lastTransitionTime")
            .is_none());
        // True: a transition
        let ok = Verdict {
            ready: true,
            code: "ready".into(),
            message: String::new(),
        };
        let patch = condition_patch(&p, &ok, "2026-01-01T00:00:00Z");
        assert_eq!(patch["status"]["conditions"][0]["status"], "True");
        assert_eq!(patch["status"]["conditions"][0]["reason"], "Ready");
        assert_eq!(
            patch["status"]["conditions"][0]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
    }

    #[test]
    fn results_are_read_in_order_and_checked() {
        let asked = vec![
            Subject {
                client_id: "c1".into(),
                subject: "system:serviceaccount:a:x".into(),
                audience: "api://AzureADTokenExchange".into(),
            },
            Subject {
                client_id: "c2".into(),
                subject: "system:serviceaccount:a:y".into(),
                audience: "api://AzureADTokenExchange".into(),
            },
        ];
        let ans = json!({"results": [
            {"clientId": "C1", "subject": "system:serviceaccount:a:x", "ready": true, "reason": "ready", "message": "ok"},
            {"clientId": "c2", "subject": "system:serviceaccount:a:y", "ready": false, "reason": "identity_not_found", "message": "no identity"},
        ]});
        let v = read_results(&asked, &ans).unwrap();
        assert!(v[0].ready && v[0].code == "ready");
        assert_eq!(
            (v[1].ready, v[1].code.as_str(), v[1].message.as_str()),
            (false, "identity_not_found", "no identity")
        );
        let short = json!({"results": [ans["results"][0]]});
        assert!(read_results(&asked, &short).is_err());
        let swapped = json!({"results": [ans["results"][1], ans["results"][0]]});
        assert!(read_results(&asked, &swapped).is_err());
        assert!(read_results(&asked, &json!({})).is_err());
    }

    #[test]
    fn status_check_reports_the_holder_only() {
        let s = WiStatus::new();
        assert!(s.check().is_ok(), "a standby is ready");
        s.update(|x| x.leader = true);
        assert!(s.check().is_err(), "no pass yet");
        s.update(|x| x.jwks = Some(Ok(())));
        assert!(s.check().is_ok());
        s.update(|x| {
            x.issuer_url = Some("https://k/oidc/1/".into());
            x.issuer_mismatch = Some("https://127.0.0.1:6443".into());
        });
        let e = s.check().unwrap_err();
        assert!(e.contains("https://127.0.0.1:6443"), "{e}");
        s.update(|x| x.issuer_mismatch = None);
        s.update(|x| x.jwks = Some(Err("boom".into())));
        assert!(s.check().unwrap_err().contains("boom"));
    }

    #[test]
    fn the_proof_names_the_issuer_and_a_published_key() {
        use base64::Engine;
        assert_eq!(
            proof_audience("https://k/oidc/1/"),
            "https://k/oidc/1/publishServiceAccountKeys"
        );
        let b64 = |v: Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        let jwt = format!(
            "{}.{}.sig",
            b64(json!({"alg": "RS256", "kid": "k1"})),
            b64(json!({"sub": "x"}))
        );
        assert_eq!(token_kid(&jwt).as_deref(), Some("k1"));
        assert_eq!(token_kid("not a jwt"), None);
        let keys = vec![json!({"kid": "k0"}), json!({"kid": "k1"})];
        assert!(signed_by_one_of(Some("k1"), &keys));
        assert!(!signed_by_one_of(Some("k2"), &keys));
        assert!(signed_by_one_of(None, &keys));
        let refused = |status: u16, code: &str, message: &str| ArmError::Refused {
            url: "u".into(),
            status,
            code: code.into(),
            message: message.into(),
        };
        assert!(proof_refused(&refused(403, "PublishProofRejected", "no")));
        assert!(proof_refused(&refused(
            400,
            "InvalidParameter",
            "The proof is missing."
        )));
        assert!(!proof_refused(&refused(
            400,
            "InvalidParameter",
            "key 0 has no kid"
        )));
        assert!(!proof_refused(&refused(403, "AuthorizationFailed", "no")));
        assert!(!proof_refused(&refused(
            400,
            "OIDCIssuerNotEnabled",
            "proof"
        )));
        let t = Instant::now();
        let p = Proof {
            token: jwt,
            audience: "a".into(),
            minted: t,
        };
        assert!(p.usable(t) && !p.stale(t));
        assert!(p.stale(t + defaults::PROOF_REMINT));
        assert!(p.usable(t + defaults::PROOF_REMINT));
        assert!(!p.usable(t + Duration::from_secs(defaults::PROOF_SECONDS as u64)));
    }

    #[test]
    fn due_pods_follow_their_last_result() {
        let cfg = WiConfig::new(
            "/c".into(),
            ArmConfig {
                server_urls: vec!["https://x".into()],
                ca_pem: String::new(),
                imds_token_endpoint: String::new(),
                client_id: None,
            },
            "h".into(),
        );
        let t = Instant::now();
        assert_eq!(due_at(t, true, &cfg), t + defaults::READY_EVERY);
        assert_eq!(due_at(t, false, &cfg), t + defaults::NOT_READY_EVERY);
    }
}
