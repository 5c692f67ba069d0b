//! The Key Vault scheduler: certificate lifetime actions (`AutoRenew` issues a new version
//! from the current policy; `EmailContacts` records a near-expiry event), resuming issuance
//! interrupted by a restart, and purging soft-deleted objects past their purge date.
//!
//! One process acts at a time: a pass runs only while this process holds the lease
//! [`LEASE`] (taken or renewed at the start of the pass and kept while it runs); a process
//! without it skips the pass. Each object's work is a unit of work of its own, opened after
//! any key generation.
//!
//! Exactly one renewal per due version, even when two actors race (two passes of one
//! process, or a process that lost the lease mid-pass): the new version is written only if
//! the due version is still the latest (`expect_latest`, checked in the writing unit of
//! work), so a second pass — concurrent, repeated or after a restart — finds nothing due.

use super::certs::{self, CertState, Pending};
use crate::error::{Result, ServerError};
use crate::state::AppState;
use keyless_core::vault::policy::{ActionKind, Policy, ISSUER_UNKNOWN};
use keyless_pki::kv::KvKey;
use keyless_store::{KvVersionRecord, StoreError};
use serde_json::json;

/// The lease that makes the scheduler a singleton across server processes.
pub const LEASE: &str = "keyvault-scheduler";

#[derive(Debug, Default, Clone, Copy)]
pub struct Report {
    pub renewed: usize,
    /// Renewals that failed (logged; the pass went on with the other certificates).
    pub failed: usize,
    pub notified: usize,
    pub purged: usize,
    /// Another process holds [`LEASE`]: this pass did nothing.
    pub skipped: bool,
}

/// Issuance older than this (server time) without completing is resumed.
const RESUME_AFTER: u64 = 60;

/// The scheduler's lease for one pass, held by this process (`s.replica_id`). Its times are
/// the server clock's (`s.now()`), not the Key Vault clock, which `--dev-clock` moves forward.
struct Lease<'a> {
    s: &'a AppState,
    /// Seconds: three scheduler intervals, at least 30.
    ttl: u64,
    /// When it was last taken or renewed.
    at: u64,
}

impl<'a> Lease<'a> {
    /// Take or renew the lease; `None` when another process holds it.
    async fn take(s: &'a AppState) -> Result<Option<Lease<'a>>> {
        let ttl = (3 * s.cfg.vault_check_interval.as_secs()).max(30);
        let at = s.now();
        Ok(s.store
            .try_lease(LEASE, &s.replica_id, at, ttl)
            .await?
            .then_some(Lease { s, ttl, at }))
    }

    /// Renew the lease once a third of it has passed; false when another process took it
    /// meanwhile (the pass stops).
    async fn keep(&mut self) -> Result<bool> {
        let now = self.s.now();
        if now < self.at + self.ttl / 3 {
            return Ok(true);
        }
        if self
            .s
            .store
            .try_lease(LEASE, &self.s.replica_id, now, self.ttl)
            .await?
        {
            self.at = now;
            return Ok(true);
        }
        Ok(false)
    }
}

/// What the scan found to do for one certificate.
enum Work {
    /// Finish issuance `request_id`, interrupted by a restart.
    Resume {
        vault: String,
        name: String,
        request_id: String,
    },
    /// `AutoRenew` is due for `latest`.
    Renew {
        vault: String,
        name: String,
        latest: Box<KvVersionRecord>,
        policy: Box<Policy>,
    },
    /// `EmailContacts` (or `AutoRenew` with the `Unknown` issuer) is due for `version`.
    Notify {
        vault: String,
        name: String,
        version: String,
        expires: u64,
    },
}

/// One pass of the scheduler (nothing when another process holds [`LEASE`]).
pub async fn run_once(s: &AppState) -> Result<Report> {
    let Some(mut lease) = Lease::take(s).await? else {
        tracing::debug!(
            lease = LEASE,
            "another server holds the Key Vault scheduler's lease; skipping this pass"
        );
        return Ok(Report {
            skipped: true,
            ..Default::default()
        });
    };
    let now = s.vault_clock.now();
    let mut report = Report::default();
    {
        let mut tx = s.store.write("kv_purge_expired").await?;
        report.purged = tx.kv_purge_expired(now).await?;
        tx.commit().await?;
    }
    for work in scan(s, now).await? {
        if !lease.keep().await? {
            tracing::warn!(
                lease = LEASE,
                "the Key Vault scheduler's lease was taken by another server; stopping this pass"
            );
            break;
        }
        match work {
            Work::Resume {
                vault,
                name,
                request_id,
            } => {
                tracing::info!(vault = %vault, certificate = %name, "resuming certificate issuance");
                certs::complete(s, &vault, &name, &request_id).await;
            }
            Work::Renew {
                vault,
                name,
                latest,
                policy,
            } => match renew(s, &vault, &name, &latest, *policy, now).await {
                Ok(Some(v)) => {
                    report.renewed += 1;
                    renewal("ok");
                    tracing::info!(vault = %vault, certificate = %name, version = %v, "certificate renewed by its lifetime action");
                }
                // renewed by another actor, or changed since the scan
                Ok(None) => {}
                // the database is down: the rest of the pass would fail the same way
                Err(e @ ServerError::Store(StoreError::Unavailable(_))) => return Err(e),
                Err(e) => {
                    // one certificate that cannot be issued must not stop the others
                    tracing::error!(vault = %vault, certificate = %name, error = %e, "certificate renewal failed");
                    report.failed += 1;
                    renewal("error");
                }
            },
            Work::Notify {
                vault,
                name,
                version,
                expires,
            } => {
                if notify(s, &vault, &name, &version, expires, now).await? {
                    report.notified += 1;
                    tracing::info!(vault = %vault, certificate = %name, expires, "certificate near expiry: contacts notified");
                }
            }
        }
    }
    Ok(report)
}

/// Whether `st` holds a near-expiry event for `version`.
fn notified(st: &CertState, version: &str) -> bool {
    st.events
        .iter()
        .any(|e| e["type"] == "CertificateNearExpiry" && e["version"] == json!(version))
}

/// Every certificate's due work, read in one snapshot.
async fn scan(s: &AppState, now: u64) -> Result<Vec<Work>> {
    let mut tx = s.store.read("kv_scheduler_scan").await?;
    let mut work = vec![];
    for n in tx.kv_all_names("certificates").await? {
        let st: CertState = serde_json::from_value(n.extra.clone()).unwrap_or_default();
        let Some(policy) = st.policy.clone() else {
            continue;
        };
        if let Some(pe) = st.pending.as_ref().filter(|p| p.status == "inProgress") {
            if pe.issuer != ISSUER_UNKNOWN
                && !pe.cancellation_requested
                && s.now() > pe.started + RESUME_AFTER
            {
                work.push(Work::Resume {
                    vault: n.vault.clone(),
                    name: n.name.clone(),
                    request_id: pe.request_id.clone(),
                });
            }
            continue;
        }
        let Some(latest) = tx
            .kv_version(&n.vault, "certificates", &n.name, None)
            .await?
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
        if kind == ActionKind::AutoRenew && policy.issuer_name() != ISSUER_UNKNOWN {
            work.push(Work::Renew {
                vault: n.vault,
                name: n.name,
                latest: Box::new(latest),
                policy: Box::new(policy),
            });
        } else if !notified(&st, &latest.version) {
            work.push(Work::Notify {
                vault: n.vault,
                name: n.name,
                version: latest.version,
                expires: exp,
            });
        }
    }
    Ok(work)
}

/// Issue the next version of a certificate whose `AutoRenew` is due for `latest`. The key is
/// generated first; the write's unit of work then checks that the certificate is still live,
/// that no operation was started on it meanwhile and that `latest` is still the latest
/// version. `None`: nothing written.
async fn renew(
    s: &AppState,
    vault: &str,
    name: &str,
    latest: &KvVersionRecord,
    policy: Policy,
    now: u64,
) -> Result<Option<String>> {
    // a reused key keeps its exportability: a policy turned exportable later must not
    // export a key that was created non-exportable
    let mut policy = policy;
    let reuse = if policy.key_props.as_ref().and_then(|k| k.reuse_key) == Some(true) {
        let old = {
            let mut tx = s.store.read("kv_certificate_reuse_key").await?;
            tx.kv_version(vault, "keys", name, Some(&latest.version))
                .await?
        };
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
    let issued = certs::prepare(s, &policy, reuse).await?;
    let mut tx = s.store.write("kv_certificate_renew").await?;
    let Some(mut st) = certs::load_state(&mut tx, vault, name).await? else {
        return Ok(None);
    };
    if st
        .pending
        .as_ref()
        .is_some_and(|p| p.status == "inProgress")
    {
        // a create or another renewal started since the scan: its own write decides
        return Ok(None);
    }
    st.pending = Some(Pending {
        request_id: uuid::Uuid::new_v4().simple().to_string(),
        status: "inProgress".into(),
        issuer: policy.issuer_name().to_string(),
        base_version: Some(latest.version.clone()),
        started: s.now(),
        ..Default::default()
    });
    st.events.push(json!({"type": "CertificateNewVersionCreated", "renewedVersion": latest.version, "at": now}));
    let written = certs::write_issued(
        &mut tx,
        vault,
        name,
        &policy,
        issued,
        true,
        latest.tags.clone(),
        Some(latest.version.clone()),
        st,
    )
    .await?;
    if written.is_some() {
        tx.commit().await?;
    }
    Ok(written)
}

/// Record the near-expiry event of `version`, once, if it is still the latest version.
async fn notify(
    s: &AppState,
    vault: &str,
    name: &str,
    version: &str,
    expires: u64,
    now: u64,
) -> Result<bool> {
    let mut tx = s.store.write("kv_certificate_notify").await?;
    let Some(mut st) = certs::load_state(&mut tx, vault, name).await? else {
        return Ok(false);
    };
    let latest = tx.kv_version(vault, "certificates", name, None).await?;
    if latest.is_none_or(|l| l.version != version) || notified(&st, version) {
        return Ok(false);
    }
    st.events.push(
        json!({"type": "CertificateNearExpiry", "version": version, "expires": expires, "at": now}),
    );
    tx.kv_set_extra(vault, "certificates", name, &json!(st))
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Count a certificate renewal by the scheduler.
fn renewal(result: &'static str) {
    keyless_ops::metrics::certificate_renewal("keyvault", result);
}
