//! `keyless pod-identity-addon` (also `keyless cluster-addon`): the in-cluster controller of
//! the AKS pod-identity add-on (`keyless_k8s::addon`) and, in the same process, workload
//! identity's loops (`keyless_k8s::wi_addon`: the API server's keys published to the cluster's
//! OIDC issuer, pods' readiness gate); and `keyless pod-identity-addon --print-crds`.

use crate::run::{io_err, wait_for_signal};
use crate::CliError;
use keyless_k8s::addon::{self, AddonConfig};
use keyless_k8s::wi_addon::{self, WiConfig, WiStatus};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct AddonArgs {
    /// Print the four aadpodidentity.k8s.io CRDs (for `kubectl apply -f -`) and exit.
    #[arg(long)]
    pub print_crds: bool,
    /// ARM id of the managed cluster (`keyless aks show --query id`).
    #[arg(
        long,
        env = "KEYLESS_CLUSTER_ID",
        required_unless_present = "print_crds"
    )]
    pub cluster_id: Option<String>,
    /// Keyless server base URL; several (comma-separated or repeated) are replicas, tried in
    /// order when one cannot answer.
    #[arg(long, env = "KEYLESS_SERVER", required_unless_present = "print_crds")]
    pub server: Vec<String>,
    /// PEM file of the Keyless CA.
    #[arg(long, env = "KEYLESS_CA_FILE", required_unless_present = "print_crds")]
    pub ca_file: Option<PathBuf>,
    /// The node's IMDS token endpoint.
    #[arg(
        long,
        default_value = "http://169.254.169.254/metadata/identity/oauth2/token"
    )]
    pub imds_endpoint: String,
    /// Client id of the identity to act as (the cluster's kubelet identity).
    #[arg(long, env = "AZURE_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Kubeconfig (default: KUBECONFIG, then the in-cluster service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Seconds between reads of the cluster's podIdentityProfile.
    #[arg(long, default_value_t = addon::defaults::PROFILE_POLL.as_secs())]
    pub profile_poll: u64,
    /// Do not apply the CRDs at start (they are managed elsewhere).
    #[arg(long)]
    pub skip_crds: bool,
    /// This replica's name in the Leases (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub holder: Option<String>,
    /// Seconds between reads of the API server's service-account keys (published to the
    /// cluster's OIDC issuer when they change; idle while the issuer is not enabled).
    #[arg(long, default_value_t = wi_addon::defaults::JWKS_SYNC_INTERVAL.as_secs())]
    pub jwks_sync_interval: u64,
    /// Seconds between checks of a pod whose workload-identity readiness condition is False.
    #[arg(long, default_value_t = wi_addon::defaults::NOT_READY_EVERY.as_secs())]
    pub readiness_poll: u64,
    /// Seconds between checks of a pod whose workload-identity readiness condition is True.
    #[arg(long, default_value_t = wi_addon::defaults::READY_EVERY.as_secs())]
    pub readiness_recheck: u64,
    /// Audience of the pods' projected service-account tokens (the webhook's --audience).
    #[arg(long, default_value = wi_addon::defaults::AUDIENCE)]
    pub wi_audience: String,
    /// The add-on's own service account: each publish of the API server's keys carries a token
    /// the API server minted for it (TokenRequest; RBAC `create` on `serviceaccounts/token`).
    #[arg(long, default_value = wi_addon::defaults::SERVICE_ACCOUNT_NAME)]
    pub service_account_name: String,
    /// Its namespace (env POD_NAMESPACE, the Downward API's, wins when set).
    #[arg(long, default_value = wi_addon::defaults::SERVICE_ACCOUNT_NAMESPACE)]
    pub service_account_namespace: String,
    /// Do not run the workload-identity loops (key publishing, readiness gate).
    #[arg(long)]
    pub no_workload_identity: bool,
    /// Do not run the pod-identity reconcile (workload identity only): the aadpodidentity.k8s.io
    /// CRDs are neither installed nor read, so none need exist and no permission on them is
    /// needed.
    #[arg(long, conflicts_with = "no_workload_identity")]
    pub no_pod_identity: bool,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

pub async fn run(a: AddonArgs) -> Result<(), CliError> {
    if a.print_crds {
        let manifest = keyless_k8s::crd::crds_manifest();
        say!(
            "{}",
            serde_json::to_string_pretty(&manifest).unwrap_or_default()
        );
        return Ok(());
    }
    let required = |v: Option<String>, flag: &str| {
        v.ok_or_else(|| CliError::Usage(format!("{flag} is required")))
    };
    let ca_file = a
        .ca_file
        .ok_or_else(|| CliError::Usage("--ca-file is required".into()))?;
    let ca_pem = std::fs::read_to_string(&ca_file).map_err(io_err(&ca_file))?;
    let holder = a.holder.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "addon".into());
        format!("{host}-{}", std::process::id())
    });
    let cfg = AddonConfig {
        cluster_id: required(a.cluster_id, "--cluster-id")?,
        server_urls: match keyless_ops::failover::parse_urls(&a.server) {
            urls if urls.is_empty() => return Err(CliError::Usage("--server is required".into())),
            urls => urls,
        },
        ca_pem,
        imds_token_endpoint: a.imds_endpoint,
        client_id: a.client_id,
        profile_poll: Duration::from_secs(a.profile_poll.max(1)),
        holder,
    };
    let client = keyless_k8s::client(a.kubeconfig.as_deref())
        .await
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if !a.skip_crds && !a.no_pod_identity {
        addon::install_crds(&client)
            .await
            .map_err(|e| CliError::Usage(format!("installing the CRDs: {e}")))?;
    }
    let health = keyless_ops::health::Health::new();
    let in_step = (!a.no_pod_identity)
        .then(|| health.flag("in step", "the objects have not been reconciled yet"));
    let wi = (!a.no_workload_identity).then(|| {
        let mut w = WiConfig::new(
            cfg.cluster_id.clone(),
            keyless_k8s::arm::ArmConfig {
                server_urls: cfg.server_urls.clone(),
                ca_pem: cfg.ca_pem.clone(),
                imds_token_endpoint: cfg.imds_token_endpoint.clone(),
                client_id: cfg.client_id.clone(),
            },
            cfg.holder.clone(),
        );
        w.jwks_interval = Duration::from_secs(a.jwks_sync_interval.max(1));
        w.not_ready_every = Duration::from_secs(a.readiness_poll.max(1));
        w.ready_every = Duration::from_secs(a.readiness_recheck.max(1));
        w.audience = a.wi_audience.clone();
        w.service_account_name = a.service_account_name.clone();
        w.service_account_namespace = std::env::var("POD_NAMESPACE")
            .ok()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| a.service_account_namespace.clone());
        w
    });
    let wi_status = WiStatus::new();
    if wi.is_some() {
        let s = wi_status.clone();
        health.register("workload identity", move || s.check());
    }
    let _ops = a
        .ops
        .start(
            "pod-identity-addon",
            keyless_ops::listener::defaults::POD_IDENTITY_ADDON,
            health,
        )
        .await?;
    // one signal stops both controllers
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let wi_task = wi.map(|w| {
        let client = client.clone();
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move {
            let r = wi_addon::run(w, client, stop, wi_status, || {
                say!("workload identity: caches listed");
            })
            .await;
            if let Err(e) = &r {
                tracing::error!(error = %e, "workload-identity loops stopped");
            }
            r
        })
    });
    let signal = async move {
        wait_for_signal().await;
        let _ = stop_tx.send(true);
    };
    let Some(in_step) = in_step else {
        // workload identity alone: its loops until a signal (or until they stop)
        let Some(mut t) = wi_task else {
            return Err(CliError::Usage(
                "--no-pod-identity and --no-workload-identity leave nothing to run".into(),
            ));
        };
        let ended = tokio::select! {
            _ = signal => None,
            r = &mut t => Some(r),
        };
        let r = match ended {
            Some(r) => r,
            None => t.await,
        };
        return match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CliError::Usage(format!("workload identity: {e}"))),
            Err(e) => Err(CliError::Usage(format!("workload identity: {e}"))),
        };
    };
    let r = addon::run(cfg, client, signal, move || {
        in_step.set();
        say!("pod-identity add-on: in step");
    })
    .await
    .map_err(|e| CliError::Usage(e.to_string()));
    if let Some(t) = wi_task {
        if r.is_err() {
            t.abort();
        } else if let Ok(Err(e)) = t.await {
            return Err(CliError::Usage(format!("workload identity: {e}")));
        }
    }
    r
}
