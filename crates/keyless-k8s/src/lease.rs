//! Leader election on a `coordination.k8s.io/v1` Lease: several replicas of a controller run,
//! the holder acts. A replica takes the Lease when it is absent or its holder has not renewed
//! it within its duration; the holder renews it well inside that. Writes are conditional on
//! the Lease's `resourceVersion`, so two replicas cannot both take it.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use std::time::Duration;

/// Which Lease, for how long.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub seconds: i32,
    /// This replica's name in the Lease.
    pub holder: String,
}

/// Hold the Lease from a task of its own, for a controller that acts only while it leads (MIC,
/// the workload-identity loops): the task renews it every `renew` while held, however long
/// the controller's work takes; otherwise tries again when the holder's Lease runs out, or
/// after `retry` when the API server cannot be asked (logged as `what`'s); never waiting
/// longer than the Lease's duration. The receiver says whether this replica holds it;
/// `on_change` is called from the task each time that changes.
pub fn keep(
    client: kube::Client,
    cfg: LeaseConfig,
    renew: Duration,
    retry: Duration,
    what: &'static str,
    mut on_change: impl FnMut(bool) + Send + 'static,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<bool>,
) {
    let (lead_tx, lead_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let (leading, next) = match hold_or_wait(&client, &cfg).await {
                Ok(None) => (true, renew),
                Ok(Some(left)) => (false, left + Duration::from_millis(20)),
                Err(e) => {
                    tracing::warn!(error = %e, "{what} lease: cannot renew; not acting until it can");
                    (false, retry)
                }
            };
            if lead_tx.send_if_modified(|l| std::mem::replace(l, leading) != leading) {
                on_change(leading);
            }
            tokio::time::sleep(next.min(Duration::from_secs(cfg.seconds.max(1) as u64))).await;
        }
    });
    (task, lead_rx)
}

/// Try to take or renew the Lease; true while this replica holds it.
pub async fn hold(client: &kube::Client, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    hold_or_wait(client, cfg).await.map(|h| h.is_none())
}

/// Try to take or renew the Lease: None while this replica holds it, else how long until the
/// current holder's Lease runs out (the moment to try again, so a standby takes over within
/// the lease duration of the holder's last renewal).
pub async fn hold_or_wait(
    client: &kube::Client,
    cfg: &LeaseConfig,
) -> Result<Option<std::time::Duration>, kube::Error> {
    let taken = |ok: bool| {
        if ok {
            None
        } else {
            Some(std::time::Duration::ZERO)
        }
    };
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let now = k8s_openapi::jiff::Timestamp::now();
    let fresh = |rv: Option<String>, acquire: Option<MicroTime>, transitions: Option<i32>| Lease {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            namespace: Some(cfg.namespace.clone()),
            resource_version: rv,
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(cfg.holder.clone()),
            lease_duration_seconds: Some(cfg.seconds),
            acquire_time: Some(acquire.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: transitions,
            ..Default::default()
        }),
    };
    let current = match api.get_opt(&cfg.name).await? {
        None => {
            return match api
                .create(&PostParams::default(), &fresh(None, None, Some(0)))
                .await
            {
                Ok(_) => Ok(taken(true)),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(taken(false)),
                Err(e) => Err(e),
            };
        }
        Some(l) => l,
    };
    let spec = current.spec.clone().unwrap_or_default();
    let mine = spec.holder_identity.as_deref() == Some(cfg.holder.as_str());
    // milliseconds left on the holder's Lease (≤ 0: expired)
    let left_ms = spec.renew_time.as_ref().map_or(0, |t| {
        let secs = i64::from(spec.lease_duration_seconds.unwrap_or(cfg.seconds));
        t.0.as_millisecond() + secs * 1000 - now.as_millisecond()
    });
    if !mine && left_ms > 0 {
        return Ok(Some(std::time::Duration::from_millis(left_ms as u64)));
    }
    let (acquire, transitions) = if mine {
        (spec.acquire_time, spec.lease_transitions)
    } else {
        (None, Some(spec.lease_transitions.unwrap_or(0) + 1))
    };
    match api
        .replace(
            &cfg.name,
            &PostParams::default(),
            &fresh(
                current.metadata.resource_version.clone(),
                acquire,
                transitions,
            ),
        )
        .await
    {
        Ok(_) => Ok(taken(true)),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(taken(false)),
        Err(e) => Err(e),
    }
}
