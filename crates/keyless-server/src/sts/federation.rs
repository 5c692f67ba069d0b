//! Workload identity federation: a user-assigned identity's client id plus an external JWT
//! (`client_assertion`) is exchanged for an access token when the JWT matches one of the
//! identity's federated identity credentials and verifies against its issuer's keys
//! (`{iss}/.well-known/openid-configuration` → `jwks_uri`, https only, bounded, cached, refreshed
//! on an unknown `kid` at most once per interval, one fetch shared by concurrent requests).
//! A cluster issuer of this server is read from the store instead (`crate::oidc`), and its
//! cached keys never answer once a second old: a key its add-on removed from the set, or its
//! cluster deleted, stops verifying within that second on every replica.
//! Failures are AADSTS errors with 4xx statuses, never 5xx.

use crate::caches::jwks::IssuerKeys;
use crate::error::{Aadsts, Result, ServerError};
use crate::state::AppState;
use aws_lc_rs::signature;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use keyless_core::claims::{self, Principal};
use keyless_core::fic::{self, Fic, FicPattern, Match};
use keyless_core::resource_id::ResourceId;
use keyless_store::{
    FicPatternRecord, FicRecord, IdentityRecord, PrincipalKind, ServicePrincipalRecord, Tx,
};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Largest discovery document or JWKS accepted.
const MAX_DOC: usize = 256 * 1024;
/// Entra considers only the first 100 keys of an issuer.
const MAX_KEYS: usize = 100;
/// Clock skew allowed on `exp` / `nbf`.
const SKEW: u64 = 300;
/// Shortest time between two reads of a cluster issuer's published keys (served by this
/// server, so a store read, not a fetch).
const OWN_ISSUER_REFETCH: Duration = Duration::from_secs(1);

fn discovery_failed(iss: &str, why: &str) -> ServerError {
    ServerError::sts(
        Aadsts::IssuerDiscoveryFailed,
        format!("Request to External OIDC endpoint failed. Issuer '{iss}': {why}"),
    )
}

async fn fetch_json(client: &reqwest::Client, url: &str) -> std::result::Result<Value, String> {
    if !url.starts_with("https://") {
        return Err("the endpoint must use https".into());
    }
    let resp = client
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    if resp.content_length().is_some_and(|l| l as usize > MAX_DOC) {
        return Err("document too large".into());
    }
    let body = resp.bytes().await.map_err(|e| e.to_string())?;
    if body.len() > MAX_DOC {
        return Err("document too large".into());
    }
    serde_json::from_slice(&body).map_err(|_| format!("{url} is not JSON"))
}

/// How long a cached state of the issuer `iss` may answer: an issuer of this server (`own`)
/// never past [`OWN_ISSUER_REFETCH`] — its keys are a store read, and a key removed from its
/// set or its cluster deleted (on any replica) must stop verifying —; an external issuer
/// within `issuer_refetch_interval` always, after it until a lookup asks for a refresh (an
/// unknown `kid`).
#[derive(Clone, Copy)]
struct Freshness {
    interval: Duration,
    own: bool,
}

/// The answer a cached state gives without fetching, if it may: within the re-fetch interval
/// always (keys or the last failure); after it only for an external issuer's lookup that
/// wants no refresh.
fn cached(st: &IssuerKeys, iss: &str, refresh: bool, f: Freshness) -> Option<Result<Vec<Value>>> {
    let fetched = st.fetched?;
    let answer = || match (&st.keys, &st.error) {
        (_, Some(why)) => Err(discovery_failed(iss, why)),
        (Some(k), None) => Ok(k.clone()),
        (None, None) => Ok(vec![]),
    };
    let stale_ok = !f.own && !refresh && st.keys.is_some() && st.error.is_none();
    if fetched.elapsed() < f.interval || stale_ok {
        Some(answer())
    } else {
        None
    }
}

/// Fetch the discovery document and the JWKS (first 100 keys); `Err` carries the reason.
async fn fetch_keys(s: &AppState, iss: &str) -> std::result::Result<Vec<Value>, String> {
    if let Some(id) = crate::oidc::issuer_id_of(s, iss) {
        // a cluster issuer of this server: its keys are in the store
        return crate::oidc::published_keys(s, &id).await;
    }
    let doc = fetch_json(
        &s.http,
        &format!(
            "{}/.well-known/openid-configuration",
            iss.trim_end_matches('/')
        ),
    )
    .await?;
    let jwks_uri = doc["jwks_uri"].as_str().ok_or("no jwks_uri")?;
    let jwks = fetch_json(&s.http, jwks_uri).await?;
    Ok(jwks["keys"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .take(MAX_KEYS)
        .collect())
}

/// The issuer's signing keys, from the cache unless `refresh` (or, for an issuer of this
/// server, the cached keys are older than a second); a fetch happens at most once per interval
/// per issuer, and concurrent callers share it.
async fn issuer_keys(s: &AppState, iss: &str, refresh: bool) -> Result<Vec<Value>> {
    // a cluster issuer of this server is a store read: a rotation, a key removed or the
    // cluster deleted is seen within a second, whatever replica made the change
    let f = match crate::oidc::issuer_id_of(s, iss) {
        Some(_) => Freshness {
            interval: OWN_ISSUER_REFETCH,
            own: true,
        },
        None => Freshness {
            interval: s.cfg.issuer_refetch_interval,
            own: false,
        },
    };
    let entry = s.jwks.entry(iss);
    let before = entry.snapshot();
    if let Some(r) = cached(&before, iss, refresh, f) {
        return r;
    }
    let _fetching = entry.fetch.lock().await;
    let now = entry.snapshot();
    if now.fetched != before.fetched {
        // another request fetched while this one waited: use its result
        if let Some(r) = cached(&now, iss, false, f) {
            return r;
        }
    }
    let result = fetch_keys(s, iss).await;
    let mut st = entry.state.lock().unwrap_or_else(|p| p.into_inner());
    st.fetched = Some(Instant::now());
    match result {
        Ok(keys) => {
            st.keys = Some(keys.clone());
            st.error = None;
            Ok(keys)
        }
        Err(why) => {
            st.error = Some(why.clone());
            Err(discovery_failed(iss, &why))
        }
    }
}

fn b64(v: &Value) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(v.as_str()?.trim_end_matches('='))
        .ok()
}

/// Verify `input`/`sig` with a JWK for `alg` (RS256 or ES256). Also the check of a publish's
/// proof of the API server (`arm::clusters`).
pub(crate) fn verify_with(jwk: &Value, alg: &str, input: &[u8], sig: &[u8]) -> bool {
    match (alg, jwk["kty"].as_str()) {
        ("RS256", Some("RSA")) => match (b64(&jwk["n"]), b64(&jwk["e"])) {
            (Some(n), Some(e)) => {
                keyless_pki::verify_rs256(&keyless_pki::RsaPublic { n, e }, input, sig)
            }
            _ => false,
        },
        ("ES256", Some("EC")) if jwk["crv"] == "P-256" => match (b64(&jwk["x"]), b64(&jwk["y"])) {
            (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                let mut point = vec![4u8];
                point.extend(x);
                point.extend(y);
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(input, sig)
                    .is_ok()
            }
            _ => false,
        },
        _ => false,
    }
}

/// The keys of `keys` a JWT whose header names `kid` may be signed by: those of that `kid`,
/// or all of them when the header names none.
pub(crate) fn pick_keys(keys: &[Value], kid: &str) -> Vec<Value> {
    keys.iter()
        .filter(|k| kid.is_empty() || k["kid"].as_str() == Some(kid))
        .cloned()
        .collect()
}

/// Whether a decoded JWT's signature verifies with one of `keys` ([`pick_keys`] by its `kid`,
/// [`verify_with`] by its `alg`).
pub(crate) fn signed_by_one_of(keys: &[Value], d: &claims::DecodedJwt<'_>) -> bool {
    let kid = d.header.kid.as_deref().unwrap_or_default();
    pick_keys(keys, kid)
        .iter()
        .any(|k| verify_with(k, &d.header.alg, d.signing_input.as_bytes(), &d.signature))
}

/// Who a client id is in the directory, as the token endpoint finds it.
pub(crate) enum Client {
    /// An application (service principal): it authenticates with its own credentials, never
    /// with a federated assertion.
    App(ServicePrincipalRecord),
    /// A user-assigned identity, with its federated identity credentials and credential
    /// patterns (read in the same unit of work).
    Identity(IdentityRecord, Vec<FicRecord>, Vec<FicPatternRecord>),
    Unknown,
}

/// Find the client `client_id` in `tx`: a service principal first, else a user-assigned
/// identity (a VM's or a cluster's system identity has no federated credentials: unknown)
/// with its credentials and patterns. The one lookup of the token exchange and of the
/// readiness check (`arm::wi_check`), so "ready" means what the exchange will find.
pub(crate) async fn find_client(tx: &mut Tx, client_id: &str) -> Result<Client> {
    if let Some(sp) = tx.get_service_principal(client_id).await? {
        return Ok(Client::App(sp));
    }
    let rid = match tx.directory_lookup(client_id).await? {
        Some(e)
            if e.kind == PrincipalKind::ManagedIdentity
                && e.app_id.eq_ignore_ascii_case(client_id) =>
        {
            e.resource_id
        }
        _ => None,
    };
    let Some(rid) = rid else {
        return Ok(Client::Unknown);
    };
    let identity = match tx.get_identity(&rid.to_ascii_lowercase()).await? {
        Some(i) if i.system_vm.is_none() => i,
        _ => return Ok(Client::Unknown),
    };
    let fics = tx.list_fics(&identity.key).await?;
    let patterns = tx.list_fic_patterns(&identity.key).await?;
    Ok(Client::Identity(identity, fics, patterns))
}

/// The matching fields of stored credentials.
pub(crate) fn to_fics(fics: &[FicRecord]) -> Vec<Fic> {
    fics.iter()
        .map(|f| Fic {
            name: f.name.clone(),
            issuer: f.issuer.clone(),
            subject: f.subject.clone(),
            audiences: f.audiences.clone(),
        })
        .collect()
}

/// The matching fields of stored credential patterns.
pub(crate) fn to_patterns(patterns: &[FicPatternRecord]) -> Vec<FicPattern> {
    patterns
        .iter()
        .map(|p| FicPattern {
            name: p.name.clone(),
            issuer: p.issuer.clone(),
            subject_pattern: p.subject_pattern.clone(),
            audiences: p.audiences.clone(),
        })
        .collect()
}

/// Exchange `assertion` for the identity `id`, whose federated identity credentials are `fics`
/// and credential patterns `patterns` (read by the caller in one unit of work, which has ended:
/// the issuer's keys may be fetched here); matched by [`fic::find`] — exact credentials first,
/// then patterns, Entra's errors when neither matches, a `sub` over [`fic::MAX_SUBJECT`]
/// characters refused as no subject match (AADSTS700213) before any pattern sees it;
/// returns the principal to issue a token to. Once the signature verified (never before: an
/// unsigned `iss` is anyone's), the assertion's issuer and subject go into `who`, the caller of
/// the audit record.
pub async fn exchange(
    s: &AppState,
    id: &IdentityRecord,
    fics: &[FicRecord],
    patterns: &[FicPatternRecord],
    assertion: &str,
    who: &mut keyless_ops::audit::Caller,
) -> Result<Principal> {
    let malformed = || {
        ServerError::sts(
            Aadsts::MalformedJwt,
            "Invalid JWT token. The token is malformed.",
        )
    };
    let d = claims::decode(assertion.trim()).map_err(|_| malformed())?;
    let c = &d.claims;
    let iss = c["iss"].as_str().ok_or_else(malformed)?.to_string();
    let sub = c["sub"].as_str().unwrap_or("").to_string();
    let auds: Vec<String> = claims::audiences(c)
        .into_iter()
        .map(str::to_string)
        .collect();
    if iss == s.issuer_v1() || iss == s.issuer_v2() {
        return Err(ServerError::sts(
            Aadsts::OwnTokenAsAssertion,
            "Tokens issued by this authority may not be used for federated identity flows.",
        ));
    }
    let (fics, patterns) = (to_fics(fics), to_patterns(patterns));
    let aud_refs: Vec<&str> = auds.iter().map(String::as_str).collect();
    match fic::find(&fics, &patterns, &iss, &sub, &aud_refs) {
        Match::Matched(_) => {}
        Match::NoIssuer => {
            return Err(ServerError::sts(Aadsts::FicIssuerMismatch, format!("No matching federated identity record found for presented assertion issuer '{iss}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion.")))
        }
        Match::NoSubject => {
            // (a subject over fic::MAX_SUBJECT characters matches nothing: echoed cut short)
            let shown: String = sub.chars().take(fic::MAX_SUBJECT).collect();
            let more = if shown.len() < sub.len() { "…" } else { "" };
            return Err(ServerError::sts(Aadsts::FicSubjectMismatch, format!("No matching federated identity record found for presented assertion subject '{shown}{more}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion.")))
        }
        Match::NoAudience => {
            return Err(ServerError::sts(Aadsts::FicAudienceMismatch, format!("No matching federated identity record found for presented assertion audience '{}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion.", auds.join(","))))
        }
    }
    let now = s.now();
    let num = |k: &str| c[k].as_f64().map(|f| f as u64);
    let exp = num("exp").ok_or_else(malformed)?;
    let nbf = num("nbf").or(num("iat")).unwrap_or(0);
    if exp + SKEW <= now || nbf > now + SKEW {
        return Err(ServerError::sts(Aadsts::AssertionOutOfTime, format!(
            "Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}.",
            crate::util::format_iso(now), crate::util::format_iso(nbf), crate::util::format_iso(exp)
        )));
    }
    let alg = d.header.alg.as_str();
    let kid = d.header.kid.clone().unwrap_or_default();
    let pick = |keys: &[Value]| pick_keys(keys, &kid);
    let mut candidates = pick(&issuer_keys(s, &iss, false).await?);
    if candidates.is_empty() {
        // a key we have not seen: the issuer may have rotated
        candidates = pick(&issuer_keys(s, &iss, true).await?);
    }
    let input = d.signing_input.as_bytes();
    if !candidates
        .iter()
        .any(|k| verify_with(k, alg, input, &d.signature))
    {
        return Err(ServerError::sts(
            Aadsts::AssertionSignature,
            format!(
                "Client assertion failed signature validation. (key '{kid}', algorithm '{alg}')"
            ),
        ));
    }
    who.issuer = Some(iss);
    who.subject = Some(sub);
    who.assertion_verified = Some(true);
    let rid = ResourceId::parse(&id.resource_id)
        .map(|r| r.mirid())
        .unwrap_or_else(|_| id.resource_id.clone());
    Ok(Principal::ManagedIdentity {
        principal_id: id.principal_id.clone(),
        client_id: id.client_id.clone(),
        mirid: rid,
        host_resource: None,
    })
}
