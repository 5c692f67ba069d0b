//! `keyless`: one binary for the server, the host agent, the all-in-one `up`, and az-like
//! admin verbs.

/// `println!` that does not panic when stdout is closed (a daemon whose log reader went away
/// must keep serving; `println!` panics on EPIPE).
macro_rules! say {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod addon;
mod admin;
mod dbadmin;
mod explain;
mod mic;
mod ops;
mod query;
mod run;
mod webhook;
mod wi_proxy;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "keyless",
    version,
    about = "Self-hosted managed identities, wire-compatible with Azure"
)]
struct Cli {
    /// Log line format on stderr: text or json (one object per line); filter with RUST_LOG.
    #[arg(long, global = true, env = keyless_ops::logging::FORMAT_ENV, default_value = "text")]
    log_format: keyless_ops::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on this machine: server + host agent + a VM for this machine with a
    /// system-assigned identity and a demo user-assigned identity.
    Up(run::UpArgs),
    /// Run the server (token service, control plane, host API).
    Server(run::ServerArgs),
    /// Run the host agent (IMDS endpoint) on this host.
    Node(run::NodeArgs),
    /// Manage user-assigned identities.
    Identity(admin::IdentityCmd),
    /// Manage virtual machines (hosts).
    Vm(admin::VmCmd),
    /// Manage virtual machine scale sets (hosts join as instances and share its identities).
    Vmss(admin::VmCmd),
    /// Manage resource groups.
    Group(admin::GroupCmd),
    /// Register applications (service principals with a secret and/or certificates).
    App(admin::AppCmd),
    /// Role definitions and role assignments.
    Role(admin::RoleCmd),
    /// Manage key vaults (`Microsoft.KeyVault/vaults`) and their access policies.
    Keyvault(admin::KeyVaultCmd),
    /// Batch accounts and pools (groups of hosts sharing identities and extensions).
    Batch(admin::BatchCmd),
    /// Managed clusters (`Microsoft.ContainerService/managedClusters`): node pools whose nodes
    /// are host agents, and the pod identity add-on's profile.
    Aks(admin::AksCmd),
    /// Get a managed-identity token from the local IMDS endpoint.
    GetToken(admin::GetTokenArgs),
    /// Keep Key Vault certificates on disk as PEM files (the KeyVaultForLinux VM extension).
    KvAgent(run::KvAgentArgs),
    /// The AKS pod-identity add-on: keeps the aadpodidentity.k8s.io objects of a cluster in step
    /// with its podIdentityProfile (runs in the cluster, authenticates through its node's IMDS),
    /// and publishes the API server's service-account keys to the cluster's OIDC issuer and
    /// sets pods' workload-identity readiness gate.
    #[command(visible_alias = "cluster-addon")]
    PodIdentityAddon(addon::AddonArgs),
    /// Workload identity's IMDS proxy sidecar: `init` redirects the pod's 169.254.169.254:80
    /// traffic to it, `serve` answers IMDS token requests with the pod's federated token.
    #[command(subcommand)]
    WiProxy(wi_proxy::WiProxyCmd),
    /// aad-pod-identity's Managed Identity Controller (standard mode): one AzureAssignedIdentity
    /// per pod and identity its bindings select, the identities attached to the nodes' scale
    /// sets / VMs through Keyless ARM (runs in the cluster, authenticates through its node's
    /// IMDS; several replicas, one acts under a Lease).
    Mic(mic::MicArgs),
    /// Workload identity's mutating admission webhook: pods labelled
    /// azure.workload.identity/use get the AZURE_* environment and the projected token (its
    /// serving certificate from Keyless, renewed without a restart; runs in the cluster,
    /// authenticates through its node's IMDS).
    #[command(name = "wi-webhook")]
    WiWebhook(webhook::WebhookArgs),
    /// Readiness of the local server and host agent (their /readyz): a table, and a non-zero
    /// exit status when one is not ready.
    Status(ops::StatusArgs),
    /// The audit trail: check a file's hash chain.
    #[command(subcommand)]
    Audit(run::AuditCmd),
    /// The database: migrate a SQLite data dir into PostgreSQL, online backup, restore into
    /// an empty database.
    #[command(subcommand, visible_alias = "db")]
    Admin(dbadmin::AdminCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    keyless_ops::logging::init(cli.log_format);
    // the metrics recorder before anything records (the ops listener serves it)
    let process = match &cli.command {
        Command::Up(_) => Some("up"),
        Command::Server(_) => Some("server"),
        Command::Node(_) => Some("node"),
        Command::KvAgent(_) => Some("kv-agent"),
        Command::PodIdentityAddon(_) => Some("pod-identity-addon"),
        Command::Mic(_) => Some("mic"),
        Command::WiWebhook(_) => Some("wi-webhook"),
        _ => None,
    };
    if let Some(p) = process {
        keyless_ops::metrics::install(p);
    }
    if matches!(
        cli.command,
        Command::Up(_) | Command::Server(_) | Command::Node(_) | Command::Admin(_)
    ) {
        // before any thread: everything these write in their data / state dirs is private,
        // including files libraries create (SQLite's -wal / -shm)
        keyless_store::files::private_umask();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ERROR: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Up(a) => run::up(a).await,
            Command::Server(a) => run::server(a).await,
            Command::Node(a) => run::node(a).await,
            Command::Identity(c) => admin::identity(c).await,
            Command::Vm(c) => admin::vm(c, admin::VM_TYPE).await,
            Command::Vmss(c) => admin::vm(c, admin::VMSS_TYPE).await,
            Command::Group(c) => admin::group(c).await,
            Command::Role(c) => admin::role(c).await,
            Command::App(c) => admin::app(c).await,
            Command::Keyvault(c) => admin::keyvault(c).await,
            Command::Batch(c) => admin::batch(c).await,
            Command::Aks(c) => admin::aks(c).await,
            Command::GetToken(a) => admin::get_token(a).await,
            Command::KvAgent(a) => run::kv_agent(a).await,
            Command::PodIdentityAddon(a) => addon::run(a).await,
            Command::WiProxy(c) => wi_proxy::run(c).await,
            Command::Mic(a) => mic::run(a).await,
            Command::WiWebhook(a) => webhook::run(a).await,
            Command::Audit(c) => run::audit(c),
            Command::Status(a) => ops::status(a).await,
            Command::Admin(c) => dbadmin::run(c).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ERROR: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Errors surfaced to the command line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Server(#[from] keyless_server::error::ServerError),
    #[error(transparent)]
    Node(#[from] keyless_node::NodeError),
    #[error(transparent)]
    Store(#[from] keyless_store::StoreError),
    #[error("{0}")]
    Usage(String),
    #[error("({code}) {message}")]
    Remote { code: String, message: String },
    #[error("cannot reach {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}
