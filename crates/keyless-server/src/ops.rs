//! What the server tells its operator: which surface a request is for and its route template
//! (for `keyless_ops::request`'s edge), the readiness checks, the signing-key gauges.

use crate::state::AppState;
use axum::extract::Request;
use keyless_ops::health::Health;
use keyless_ops::metrics::{SIGNING_KEY_AGE, SIGNING_KEY_NEXT_ROTATION};
use keyless_ops::request::{self as edge, word_in, Edge, Surface};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The request edge of [`crate::app`]: surface by host name (Key Vault) and path.
pub fn edge(state: Arc<AppState>) -> Edge {
    Edge::classify(move |req| surface(&state, req)).with_route(route)
}

/// The surface `req` is for.
pub fn surface(s: &AppState, req: &Request) -> Surface {
    if crate::kv::vault_host(s, req.headers()).is_some() {
        return edge::KEYVAULT;
    }
    let p = req.uri().path();
    let starts =
        |prefix: &str| p.len() >= prefix.len() && p[..prefix.len()].eq_ignore_ascii_case(prefix);
    if starts("/keyless/host/") {
        edge::HOST
    } else if starts("/v1.0/") || p.eq_ignore_ascii_case("/v1.0") {
        edge::GRAPH
    } else if starts("/subscriptions")
        || starts("/providers")
        || starts("/metadata/")
        || starts("/keyless/admin/")
        // the clusters' OIDC issuers: their errors in ARM's shape
        || starts("/oidc/")
    {
        edge::ARM
    } else {
        edge::STS
    }
}

/// Path segments kept in ARM route templates (every other segment is a name: `{}`).
const ARM_WORDS: &[&str] = &[
    "subscriptions",
    "resourceGroups",
    "providers",
    "Microsoft.ManagedIdentity",
    "userAssignedIdentities",
    "federatedIdentityCredentials",
    "identities",
    "Microsoft.Compute",
    "virtualMachines",
    "virtualMachineScaleSets",
    "extensions",
    "joinToken",
    "generateJoinToken",
    "Microsoft.KeyVault",
    "vaults",
    "accessPolicies",
    "add",
    "replace",
    "remove",
    "Microsoft.Batch",
    "batchAccounts",
    "pools",
    "Microsoft.ContainerService",
    "managedClusters",
    "agentPools",
    "readPodIdentityProfile",
    "reportPodIdentityStatus",
    "Microsoft.Authorization",
    "roleAssignments",
    "roleDefinitions",
    "Microsoft.Insights",
    "eventtypes",
    "management",
    "values",
    "Microsoft.Resources",
    "locations",
    "operations",
    "default",
];

/// Path segments kept in Key Vault data-plane route templates.
const KV_WORDS: &[&str] = &[
    "secrets",
    "keys",
    "certificates",
    "deletedsecrets",
    "deletedkeys",
    "deletedcertificates",
    "versions",
    "backup",
    "restore",
    "recover",
    "create",
    "import",
    "pending",
    "merge",
    "policy",
    "issuers",
    "contacts",
    "sign",
    "verify",
    "encrypt",
    "decrypt",
    "wrapkey",
    "unwrapkey",
    "rotate",
    "rotationpolicy",
    "release",
];

/// The route template of an ARM or Key Vault request (their routers are catch-alls); other
/// surfaces use the matched route.
pub fn route(surface: &'static str, path: &str) -> Option<String> {
    match surface {
        "arm" if !path.starts_with("/keyless/") && !path.starts_with("/metadata/") => {
            Some(edge::template(path, |w| word_in(ARM_WORDS, w)))
        }
        "keyvault" => Some(edge::template(path, |w| word_in(KV_WORDS, w))),
        _ => None,
    }
}

/// How often the store is probed for readiness.
const STORE_PROBE_EVERY: Duration = Duration::from_secs(5);
/// How long one probe may take before the store counts as not answering.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A successful probe older than this no longer counts (the probe itself is stuck).
const STORE_PROBE_STALE: Duration = Duration::from_secs(15);

/// The outcome of the last store probe.
struct StoreProbe {
    last_ok: Option<Instant>,
    error: Option<String>,
}

/// One read of the store, as a request would make.
async fn probe_store(store: &keyless_store::Store) -> keyless_store::Result<()> {
    let mut tx = store.read("readiness").await?;
    tx.get_meta("tenant_id").await?;
    Ok(())
}

/// The server's readiness checks: the store answers a read (the database is reachable), and a
/// key signs now.
///
/// Readiness checks are synchronous, a store read is not: a task (started here, in the
/// caller's runtime, ending with the server's state) reads the store every 5 s, each read
/// bounded to 3 s, and the check reports its last outcome; it fails until the first read
/// answered, when the last one failed or timed out, and when none succeeded for 15 s.
pub fn register_checks(state: &Arc<AppState>, health: &Health) {
    let probe = Arc::new(Mutex::new(StoreProbe {
        last_ok: None,
        error: Some("the store has not answered yet".into()),
    }));
    let weak = Arc::downgrade(state);
    let p = probe.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STORE_PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(store) = weak.upgrade().map(|s| s.store.clone()) else {
                return;
            };
            let r = tokio::time::timeout(STORE_PROBE_TIMEOUT, probe_store(&store)).await;
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            match r {
                Ok(Ok(())) => {
                    p.last_ok = Some(Instant::now());
                    p.error = None;
                }
                Ok(Err(e)) => p.error = Some(format!("the store does not answer: {e}")),
                Err(_) => {
                    p.error = Some(format!(
                        "the store did not answer within {} s",
                        STORE_PROBE_TIMEOUT.as_secs()
                    ))
                }
            }
        }
    });
    health.register("store", move || {
        let p = probe.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &p.error {
            return Err(e.clone());
        }
        match p.last_ok {
            Some(t) if t.elapsed() <= STORE_PROBE_STALE => Ok(()),
            _ => Err(format!(
                "the store has not answered for {} s",
                STORE_PROBE_STALE.as_secs()
            )),
        }
    });
    let s = state.clone();
    health.register("signing key", move || {
        if s.keys.signer(s.now()).is_some() {
            Ok(())
        } else {
            Err(match s.keys.last_error() {
                Some(e) => format!("no signing key is active (last key check: {e})"),
                None => "no signing key is active".into(),
            })
        }
    });
}

/// Update the signing-key gauges (at start and after each rotation check).
pub fn record_signing_key(s: &AppState) {
    let now = s.now();
    let Some(signer) = s.keys.signer(now) else {
        return;
    };
    metrics::gauge!(SIGNING_KEY_AGE).set(now.saturating_sub(signer.state.created) as f64);
    let next = s
        .keys
        .states()
        .iter()
        .filter(|k| k.activate_at > now)
        .map(|k| k.activate_at)
        .min()
        .unwrap_or(signer.state.activate_at + s.cfg.rotation.rotate_every);
    metrics::gauge!(SIGNING_KEY_NEXT_ROTATION).set(next.saturating_sub(now) as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_and_key_vault_templates_hide_names() {
        assert_eq!(
            route("arm", "/subscriptions/5f1c/resourcegroups/prod/providers/Microsoft.ManagedIdentity/userAssignedIdentities/db-reader/federatedIdentityCredentials/gh").as_deref(),
            Some("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{}/federatedIdentityCredentials/{}")
        );
        assert_eq!(
            route("keyvault", "/secrets/db-password/0123abcd").as_deref(),
            Some("/secrets/{}/{}")
        );
        assert_eq!(
            route("keyvault", "/keys/k1/3f/sign").as_deref(),
            Some("/keys/{}/{}/sign")
        );
        assert_eq!(route("sts", "/t/oauth2/v2.0/token"), None);
        assert_eq!(route("arm", "/keyless/admin/v1/vault-clock"), None);
    }
}
