//! `keyless pod-identity-addon`: the in-cluster controller of the AKS pod-identity add-on
//! (`keyless_k8s::addon`), and `keyless pod-identity-addon --print-crds`.

use crate::run::{io_err, wait_for_signal};
use crate::CliError;
use keyless_k8s::addon::{self, AddonConfig};
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
    /// This replica's name in the Lease (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub holder: Option<String>,
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
    if !a.skip_crds {
        addon::install_crds(&client)
            .await
            .map_err(|e| CliError::Usage(format!("installing the CRDs: {e}")))?;
    }
    let health = keyless_ops::health::Health::new();
    let in_step = health.flag("in step", "the objects have not been reconciled yet");
    let _ops = a
        .ops
        .start(
            "pod-identity-addon",
            keyless_ops::listener::defaults::POD_IDENTITY_ADDON,
            health,
        )
        .await?;
    addon::run(cfg, client, wait_for_signal(), move || {
        in_step.set();
        say!("pod-identity add-on: in step");
    })
    .await
    .map_err(|e| CliError::Usage(e.to_string()))
}
