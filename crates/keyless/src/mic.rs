//! `keyless mic`: aad-pod-identity's Managed Identity Controller for standard mode
//! (`keyless_k8s::mic`).

use crate::run::{io_err, wait_for_signal};
use crate::CliError;
use keyless_core::pod_identity::Namespacing;
use keyless_k8s::mic::{self, defaults, MicConfig};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct MicArgs {
    /// Keyless server base URL; several (comma-separated or repeated) are replicas, tried in
    /// order when one cannot answer.
    #[arg(long, env = "KEYLESS_SERVER", required = true)]
    pub server: Vec<String>,
    /// PEM file of the Keyless CA.
    #[arg(long, env = "KEYLESS_CA_FILE")]
    pub ca_file: PathBuf,
    /// The node's IMDS token endpoint.
    #[arg(
        long,
        default_value = "http://169.254.169.254/metadata/identity/oauth2/token"
    )]
    pub imds_endpoint: String,
    /// Client id of the identity to act as (the cluster's kubelet identity); never detached
    /// (required: without it MIC could detach its own identity from a scale set).
    #[arg(long, env = "AZURE_CLIENT_ID")]
    pub client_id: String,
    /// Kubeconfig (default: KUBECONFIG, then the in-cluster service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This replica's name in the Lease (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub holder: Option<String>,
    /// The Lease that elects the acting replica.
    #[arg(long, default_value = defaults::LEASE_NAME)]
    pub lease_name: String,
    /// Its namespace [default: POD_NAMESPACE, else `default`].
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Client ids never detached from a VM / scale set (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub immutable_user_msis: Vec<String>,
    /// Bindings select pods of their own namespace only (as the Behavior annotation does for
    /// one identity); must match NMI's --forceNamespaced.
    #[arg(
        long = "forceNamespaced",
        visible_alias = "force-namespaced",
        env = "FORCENAMESPACED"
    )]
    pub force_namespaced: bool,
    /// Seconds between full syncs when nothing changes (identities removed by hand are
    /// attached again).
    #[arg(long, default_value_t = defaults::RESYNC.as_secs())]
    pub sync_interval_sec: u64,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

pub async fn run(a: MicArgs) -> Result<(), CliError> {
    let ca_pem = std::fs::read_to_string(&a.ca_file).map_err(io_err(&a.ca_file))?;
    let holder = a.holder.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "mic".into());
        format!("{host}-{}", std::process::id())
    });
    let server_urls = keyless_ops::failover::parse_urls(&a.server);
    if server_urls.is_empty() {
        return Err(CliError::Usage("--server is required".into()));
    }
    let cfg = MicConfig {
        arm: keyless_k8s::arm::ArmConfig {
            server_urls,
            ca_pem,
            imds_token_endpoint: a.imds_endpoint,
            client_id: Some(a.client_id),
        },
        lease: keyless_k8s::lease::LeaseConfig {
            name: a.lease_name,
            namespace: a
                .lease_namespace
                .unwrap_or_else(|| defaults::LEASE_NAMESPACE.to_string()),
            seconds: defaults::LEASE_SECONDS,
            holder: holder.clone(),
        },
        immutable: a
            .immutable_user_msis
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        namespacing: if a.force_namespaced {
            Namespacing::Always
        } else {
            Namespacing::ByIdentity
        },
        resync: Duration::from_secs(a.sync_interval_sec.max(1)),
    };
    let client = keyless_k8s::client(a.kubeconfig.as_deref())
        .await
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let health = keyless_ops::health::Health::new();
    let listed = health.flag("caches listed", "the watches have not listed yet");
    let _ops = a
        .ops
        .start("mic", keyless_ops::listener::defaults::MIC, health)
        .await?;
    mic::run(
        cfg,
        client,
        wait_for_signal(),
        move || {
            listed.set();
            say!("MIC: caches listed ({holder})");
        },
        |leader| {
            if leader {
                say!("MIC: leading");
            } else {
                say!("MIC: standing by");
            }
        },
    )
    .await
    .map_err(|e| CliError::Usage(e.to_string()))
}
