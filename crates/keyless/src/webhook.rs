//! `keyless wi-webhook`: workload identity's mutating admission webhook
//! (`keyless_k8s::webhook`).

use crate::run::{io_err, wait_for_signal};
use crate::CliError;
use keyless_core::workload_identity::{self as wi, ReadinessGate};
use keyless_k8s::webhook::{self, defaults, WebhookConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct WebhookArgs {
    /// HTTPS address of the webhook (`POST /mutate-v1-pod`, `/healthz`, `/readyz`).
    #[arg(long, default_value = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// ARM id of the managed cluster (`keyless aks show --query id`): its webhook CA issues the
    /// serving certificate.
    #[arg(long, env = "KEYLESS_CLUSTER_ID", required = true)]
    pub cluster_id: String,
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
    /// Client id of the identity to act as (the cluster's kubelet identity) [default: the
    /// node's only identity].
    #[arg(long, env = "AZURE_CLIENT_ID")]
    pub client_id: Option<String>,
    /// `AZURE_TENANT_ID` of pods whose service account names no tenant.
    #[arg(long, env = "AZURE_TENANT_ID", required = true)]
    pub tenant_id: String,
    /// `AZURE_AUTHORITY_HOST` of the pods [default: the first --server URL with a trailing /].
    #[arg(long, env = "AZURE_AUTHORITY_HOST")]
    pub authority_host: Option<String>,
    /// Audience of the projected service-account token.
    #[arg(long, default_value = wi::DEFAULT_AUDIENCE)]
    pub audience: String,
    /// DNS name or IP address of the serving certificate (repeatable, comma-separated)
    /// [default: the webhook Service's names,
    /// azure-wi-webhook-webhook-service.azure-workload-identity-system.svc[.cluster.local]].
    #[arg(long, value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// The MutatingWebhookConfiguration whose webhooks' caBundle is kept equal to the CA.
    #[arg(long, default_value = defaults::CONFIG_NAME)]
    pub webhook_config_name: String,
    /// Kubeconfig (default: KUBECONFIG, then the in-cluster service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// When a mutated pod gets the readiness gate keyless.dev/workload-identity-ready:
    /// `annotated` (the pod's keyless.dev/identity-readiness-gate: "true"), `always`, `never`.
    #[arg(long, default_value_t = ReadinessGate::default())]
    pub readiness_gate: ReadinessGate,
    /// Image of the proxy sidecar's containers (azwi-proxy-init, azwi-proxy).
    #[arg(long, env = "KEYLESS_PROXY_IMAGE", default_value = wi::DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,
    /// The proxy's port when the pod's azure.workload.identity/proxy-sidecar-port names none.
    #[arg(long, default_value_t = wi::DEFAULT_PROXY_PORT)]
    pub proxy_port: u16,
    /// Lifetime to ask for the serving certificate, in seconds (Keyless keeps it within
    /// 60 s..30 days) [default: Keyless's, 7 days]. Renewed at 2/3 of its life.
    #[arg(long, value_name = "SECONDS")]
    pub certificate_validity: Option<u64>,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

pub async fn run(a: WebhookArgs) -> Result<(), CliError> {
    let ca_pem = std::fs::read_to_string(&a.ca_file).map_err(io_err(&a.ca_file))?;
    let server_urls = keyless_ops::failover::parse_urls(&a.server);
    let Some(first) = server_urls.first() else {
        return Err(CliError::Usage("--server is required".into()));
    };
    let authority_host = a
        .authority_host
        .clone()
        .unwrap_or_else(|| format!("{}/", first.trim_end_matches('/')));
    if a.proxy_port == 0 {
        return Err(CliError::Usage("--proxy-port must be 1-65535".into()));
    }
    let tls_sans: Vec<String> = if a.tls_san.is_empty() {
        defaults::TLS_SANS.iter().map(|s| s.to_string()).collect()
    } else {
        a.tls_san
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let cfg = WebhookConfig {
        arm: keyless_k8s::arm::ArmConfig {
            server_urls,
            ca_pem,
            imds_token_endpoint: a.imds_endpoint,
            client_id: a.client_id,
        },
        cluster_id: a.cluster_id,
        listen: a.listen,
        tls_sans,
        webhook_config_name: a.webhook_config_name,
        defaults: wi::Defaults {
            audience: a.audience,
            readiness_gate: a.readiness_gate,
            proxy_image: a.proxy_image,
            proxy_port: a.proxy_port,
            ..wi::Defaults::new(a.tenant_id, authority_host)
        },
        certificate_validity: a.certificate_validity,
    };
    let client = keyless_k8s::client(a.kubeconfig.as_deref())
        .await
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let health = keyless_ops::health::Health::new();
    let _ops = a
        .ops
        .start(
            "wi-webhook",
            keyless_ops::listener::defaults::WI_WEBHOOK,
            health.clone(),
        )
        .await?;
    let hook = webhook::start(cfg, client, health)
        .await
        .map_err(|e| CliError::Usage(e.to_string()))?;
    say!(
        "Workload identity webhook listening on https://{}{}",
        hook.addr,
        defaults::PATH
    );
    wait_for_signal().await;
    drop(hook);
    Ok(())
}
