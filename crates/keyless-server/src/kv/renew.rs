//! The Key Vault scheduler: certificate lifetime actions (`AutoRenew` issues a new version
//! from the current policy; `EmailContacts` records a near-expiry event), resuming issuance
//! interrupted by a restart, and purging soft-deleted objects past their purge date.
//!
//! Exactly one renewal per due version: the new version is written only if the due version
//! is still the latest (one store transaction), so a second pass — concurrent, repeated or
//! after a restart — finds nothing due.

use super::certs::{self, CertState, Pending};
use crate::error::Result;
use crate::state::AppState;
use keyless_core::vault::policy::{ActionKind, ISSUER_UNKNOWN};
use keyless_pki::kv::KvKey;
use serde_json::json;
use std::sync::Arc;

#[derive(Debug, Default, Clone, Copy)]
pub struct Report {
    pub renewed: usize,
    /// Renewals that failed (logged; the pass went on with the other certificates).
    pub failed: usize,
    pub notified: usize,
    pub purged: usize,
}

/// Issuance older than this (server time) without completing is resumed.
const RESUME_AFTER: u64 = 60;

/// One pass of the scheduler.
pub async fn run_once(s: &Arc<AppState>) -> Result<Report> {
    let now = s.vault_clock.now();
    let mut report = Report {
        purged: s.store.kv_purge_expired(now)?,
        ..Default::default()
    };
    for n in s.store.kv_all_names("certificates")? {
        let st: CertState = serde_json::from_value(n.extra.clone()).unwrap_or_default();
        let Some(policy) = st.policy.clone() else {
            continue;
        };
        if let Some(pe) = st.pending.as_ref().filter(|p| p.status == "inProgress") {
            if pe.issuer != ISSUER_UNKNOWN
                && !pe.cancellation_requested
                && s.now() > pe.started + RESUME_AFTER
            {
                tracing::info!(vault = %n.vault, certificate = %n.name, "resuming certificate issuance");
                certs::complete(
                    s.clone(),
                    n.vault.clone(),
                    n.name.clone(),
                    pe.request_id.clone(),
                )
                .await;
            }
            continue;
        }
        let Some(latest) = s
            .store
            .kv_version(&n.vault, "certificates", &n.name, None)?
        else {
            continue;
        };
        let (Some(nbf), Some(exp)) = (latest.nbf, latest.exp) else {
            continue;
        };
        keyless_ops::metrics::certificate_expiry(
            "keyvault", &n.vault, &n.name, exp as i64, now as i64,
        );
        let Some((due, kind)) = policy.due(nbf, exp) else {
            continue;
        };
        if now < due {
            continue;
        }
        let renewable = kind == ActionKind::AutoRenew && policy.issuer_name() != ISSUER_UNKNOWN;
        if renewable {
            // a reused key keeps its exportability: a policy turned exportable later must not
            // export a key that was created non-exportable
            let mut policy = policy.clone();
            let reuse = if policy.key_props.as_ref().and_then(|k| k.reuse_key) == Some(true) {
                let old = s
                    .store
                    .kv_version(&n.vault, "keys", &n.name, Some(&latest.version))?;
                if old.as_ref().and_then(|k| k.public["exportable"].as_bool()) == Some(false) {
                    if let Some(kp) = policy.key_props.as_mut() {
                        kp.exportable = Some(false);
                    }
                }
                old.and_then(|k| k.private)
                    .and_then(|der| KvKey::from_pkcs8(&der).ok())
            } else {
                None
            };
            let mut st2 = st.clone();
            st2.pending = Some(Pending {
                request_id: uuid::Uuid::new_v4().simple().to_string(),
                status: "inProgress".into(),
                issuer: policy.issuer_name().to_string(),
                base_version: Some(latest.version.clone()),
                started: s.now(),
                ..Default::default()
            });
            st2.events.push(json!({"type": "CertificateNewVersionCreated", "renewedVersion": latest.version, "at": now}));
            let written = match certs::issue(
                s,
                certs::Issue {
                    vault: &n.vault,
                    name: &n.name,
                    policy: &policy,
                    enabled: true,
                    tags: latest.tags.clone(),
                    base_version: Some(latest.version.clone()),
                    state: st2,
                    reuse,
                },
            )
            .await
            {
                Ok(w) => w,
                Err(e) => {
                    // one certificate that cannot be issued must not stop the others
                    tracing::error!(vault = %n.vault, certificate = %n.name, error = %e, "certificate renewal failed");
                    report.failed += 1;
                    renewal("error");
                    continue;
                }
            };
            if let Some(v) = written {
                report.renewed += 1;
                renewal("ok");
                tracing::info!(vault = %n.vault, certificate = %n.name, version = %v, "certificate renewed by its lifetime action");
            }
        } else {
            let seen = st.events.iter().any(|e| {
                e["type"] == "CertificateNearExpiry" && e["version"] == json!(latest.version)
            });
            if !seen {
                let mut st2 = st.clone();
                st2.events.push(json!({"type": "CertificateNearExpiry", "version": latest.version, "expires": exp, "at": now}));
                s.store
                    .kv_set_extra(&n.vault, "certificates", &n.name, &json!(st2))?;
                report.notified += 1;
                tracing::info!(vault = %n.vault, certificate = %n.name, expires = exp, "certificate near expiry: contacts notified");
            }
        }
    }
    Ok(report)
}

/// Count a certificate renewal by the scheduler.
fn renewal(result: &'static str) {
    keyless_ops::metrics::certificate_renewal("keyvault", result);
}
