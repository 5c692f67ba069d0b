//! `keyless up`, `keyless server`, `keyless node`.

use crate::CliError;
use clap::Args;
use keyless_core::clock::{Clock, SystemClock};
use keyless_core::resource_id::{ResourceId, UAMI, VM};
use keyless_server::resources::{self, IdentityBody, VmBody};
use keyless_server::state::ServerConfig;
use keyless_store::{Kek, Store};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Clone)]
pub struct ServerArgs {
    /// Data directory (SQLite file, key-encryption key, CA certificate).
    #[arg(long, default_value = ".keyless", env = "KEYLESS_DATA_DIR")]
    pub data_dir: PathBuf,
    /// HTTPS listen address of the server [default: 0.0.0.0:8443 for `server`,
    /// 127.0.0.1:8443 for `up`].
    #[arg(long, env = "KEYLESS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Base URL clients use to reach the server (the token issuer); default https://localhost:<port>.
    #[arg(long)]
    pub public_url: Option<String>,
    /// Extra subject alternative names for the TLS certificate (repeatable).
    #[arg(long = "tls-san")]
    pub tls_san: Vec<String>,
    /// Key-encryption key (base64 of 32 bytes); default: generated into <data-dir>/kek. Every
    /// replica on one database needs the same key.
    #[arg(long, env = "KEYLESS_KEK", hide_env_values = true)]
    pub kek: Option<String>,
    /// The database: `postgres://user@host:port/db[?sslmode=require]` to share one PostgreSQL
    /// between replicas; default: the SQLite file <data-dir>/keyless.db.
    #[arg(long, env = "KEYLESS_DATABASE_URL", hide_env_values = true)]
    pub database: Option<String>,
    /// PEM file of the CA(s) that sign the PostgreSQL server's certificate (with
    /// `sslmode=require`); default: the system roots.
    #[arg(long, env = "KEYLESS_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
    /// PostgreSQL connections per server.
    #[arg(long, default_value_t = 16, env = "KEYLESS_DATABASE_POOL_SIZE")]
    pub database_pool_size: usize,
    /// Managed-identity token lifetime in seconds (Azure: 24 h 5 min).
    #[arg(long, default_value_t = 86_700)]
    pub token_lifetime: u64,
    /// Signing key rotation period in seconds.
    #[arg(long, default_value_t = 30 * 86_400)]
    pub key_rotation: u64,
    /// How long a new signing key is published before it signs, in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub key_prepublish: u64,
    /// How often the rotation plan is checked, in seconds.
    #[arg(long, default_value_t = 60)]
    pub key_check_interval: u64,
    /// Host credential lifetime in seconds.
    #[arg(long, default_value_t = 7 * 86_400)]
    pub host_cert_lifetime: u64,
    /// PEM file of the CA(s) to trust for external OIDC issuers of federated credentials
    /// (default: the system roots).
    #[arg(long, env = "KEYLESS_ISSUER_CA_FILE")]
    pub issuer_ca_file: Option<PathBuf>,
    /// Key Vault data-plane host names are `{vault}.vault.{domain}` (they must resolve to this
    /// server: `*.localhost` does with systemd-resolved; otherwise add a hosts entry).
    #[arg(long, default_value = "localhost", env = "KEYLESS_VAULT_DOMAIN")]
    pub vault_domain: String,
    /// Allow an Owner to move the Key Vault clock forward (`keyless keyvault advance-clock`),
    /// to see certificate lifetime actions without waiting. Not for production.
    #[arg(long, env = "KEYLESS_DEV_CLOCK")]
    pub dev_clock: bool,
    /// How often certificate lifetime actions and purges are checked, in seconds.
    #[arg(long, default_value_t = 60)]
    pub vault_check_interval: u64,
    /// Also print the bootstrap admin's secret (created at first start) on stdout; by default
    /// it is only written to <data-dir>/bootstrap-admin.secret (0600).
    #[arg(long)]
    pub print_secret: bool,
    #[command(flatten)]
    pub audit: AuditArgs,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

/// The audit trail (token issuances and refusals, control-plane writes, Key Vault
/// operations): a hash-chained JSON-lines file; check it with `keyless audit verify`.
#[derive(Args, Clone)]
pub struct AuditArgs {
    /// Audit file [default: <data-dir>/audit.log for `server` and `up` (one file for the
    /// server and its embedded agent), <state-dir>/audit.log for `node`].
    #[arg(long, env = "KEYLESS_AUDIT_FILE")]
    pub audit_file: Option<PathBuf>,
    /// Record nothing (benchmarks); the token and Key Vault metrics are still counted.
    #[arg(long, conflicts_with = "audit_file")]
    pub no_audit: bool,
}

impl AuditArgs {
    /// The sink these flags ask for; `dir` holds the default file.
    pub fn open(&self, dir: &Path) -> Result<Arc<keyless_ops::audit::Audit>, CliError> {
        if self.no_audit {
            return Ok(keyless_ops::audit::Audit::disabled());
        }
        let path = self
            .audit_file
            .clone()
            .unwrap_or_else(|| keyless_ops::audit::default_path(dir));
        keyless_ops::audit::Audit::open(&path).map_err(io_err(&path))
    }
}

#[derive(Args, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// IMDS listen address of the embedded host agent. On a real host use
    /// 169.254.169.254:80 (after `ip addr add 169.254.169.254/32 dev lo`).
    #[arg(long, default_value = "127.0.0.1:8444", env = "KEYLESS_IMDS_LISTEN")]
    pub imds_listen: SocketAddr,
    /// How often the agent refreshes its identity set, in seconds.
    #[arg(long, default_value_t = 30)]
    pub sync_interval: u64,
    #[command(flatten)]
    pub fair_share: FairShareArgs,
}

#[derive(clap::Subcommand, Clone)]
pub enum AuditCmd {
    /// Check the hash chain of an audit file: prints the record count and the last record's
    /// seq and hash, or the first broken line (exit status 1). The hash is unkeyed — whoever
    /// can write the file can rewrite it with a valid chain — so keep the printed anchor (or the
    /// records themselves) off the machine and check later that the file still holds it.
    Verify {
        /// The audit file (e.g. <data-dir>/audit.log).
        file: PathBuf,
    },
}

pub fn audit(c: AuditCmd) -> Result<(), CliError> {
    match c {
        AuditCmd::Verify { file } => match keyless_ops::audit::verify(&file) {
            Ok(v) => {
                say!(
                    "{}: chain intact, {} records, last hash {}",
                    file.display(),
                    v.records,
                    if v.last_hash.is_empty() {
                        "-"
                    } else {
                        &v.last_hash
                    }
                );
                if v.records > 0 {
                    // the hash is unkeyed: only a copy kept elsewhere shows a rewritten file
                    say!(
                        "anchor: seq {} hash {} (keep this line where the file's writers cannot change it; a later verify must find that record)",
                        v.records, v.last_hash
                    );
                }
                Ok(())
            }
            Err(e @ keyless_ops::audit::VerifyError::Broken { .. }) => Err(CliError::Usage(
                format!("{}: chain broken at {e}", file.display()),
            )),
            Err(e) => Err(CliError::Usage(e.to_string())),
        },
    }
}

/// Per-caller fair share of the node's token endpoints (a caller: a pod's IP, or a local
/// user — address and UID); over it, 429 with `Retry-After`.
#[derive(Args, Clone)]
pub struct FairShareArgs {
    /// Token requests per second per caller (Azure IMDS: 20 per VM); 0 = no limit.
    #[arg(long, default_value_t = keyless_node::FairShareConfig::default().rate, env = "KEYLESS_CALLER_RPS")]
    pub caller_rps: u32,
    /// Concurrent token requests per caller (Azure IMDS: 5 per VM); 0 = no limit.
    #[arg(long, default_value_t = keyless_node::FairShareConfig::default().concurrency, env = "KEYLESS_CALLER_CONCURRENCY")]
    pub caller_concurrency: u32,
}

impl FairShareArgs {
    fn config(&self) -> keyless_node::FairShareConfig {
        keyless_node::FairShareConfig {
            rate: self.caller_rps,
            concurrency: self.caller_concurrency,
            ..Default::default()
        }
    }
}

#[derive(Args, Clone)]
pub struct NodeArgs {
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
    /// Server base URL, e.g. https://10.0.0.1:8443. Several replicas: repeat the flag or
    /// separate URLs with commas; calls go to the one that answered last and fail over to the
    /// next, in order, when it cannot answer (no connection, a timeout, 502/503/504).
    #[arg(long, env = "KEYLESS_SERVER", required = true, value_delimiter = ',')]
    pub server: Vec<String>,
    /// PEM file of the Keyless CA.
    #[arg(long, env = "KEYLESS_CA_FILE")]
    pub ca_file: PathBuf,
    /// Where the host credential is kept.
    #[arg(long, default_value = "/var/lib/keyless/node")]
    pub state_dir: PathBuf,
    /// One-time join token (from `keyless vm join-token`); needed only for the first start.
    #[arg(long, env = "KEYLESS_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// A file holding this node's one-time join token (written when the node is provisioned;
    /// a DaemonSet reads it from the host). Read only when --join-token is not given; a
    /// missing file is no token.
    #[arg(long, env = "KEYLESS_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// IMDS listen address.
    #[arg(
        long,
        default_value = "169.254.169.254:80",
        env = "KEYLESS_IMDS_LISTEN"
    )]
    pub imds_listen: SocketAddr,
    /// How often the agent refreshes its identity set, in seconds.
    #[arg(long, default_value_t = 30)]
    pub sync_interval: u64,
    /// Private IP reported in /metadata/instance.
    #[arg(long)]
    pub private_ip: Option<String>,
    /// Command run (`sh -c`) after a VM extension installed a new certificate version (env
    /// `KEYLESS_KV_CHANGED` = the changed certificate links).
    #[arg(long, env = "KEYLESS_EXTENSION_RELOAD_HOOK")]
    pub extension_reload_hook: Option<String>,
    /// VM extensions may only keep certificate stores under this directory (their settings come
    /// from the control plane; the agent writes there as root).
    #[arg(long, default_value = "/var/lib/waagent")]
    pub extension_store_root: PathBuf,
    /// Token endpoint styles to serve: imds (always served), extension (the legacy
    /// localhost:50342 endpoint, while the VM carries the Microsoft.ManagedIdentity
    /// extension), appservice (IDENTITY_ENDPOINT + IDENTITY_HEADER), arc (the Azure Arc
    /// challenge-file flow).
    #[arg(long, default_value = "imds", env = "KEYLESS_ENDPOINTS")]
    pub endpoints: String,
    /// App Service endpoint address.
    #[arg(long, default_value = "127.0.0.1:4141")]
    pub appservice_listen: SocketAddr,
    #[command(flatten)]
    pub fair_share: FairShareArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
    /// Arc endpoint address.
    #[arg(long, default_value = "127.0.0.1:40342")]
    pub arc_listen: SocketAddr,
    /// Directory of the Arc key files (the SDKs only accept /var/opt/azcmagent/tokens).
    #[arg(long, default_value = "/var/opt/azcmagent/tokens")]
    pub arc_token_dir: PathBuf,
    /// Group (name or gid) whose members, besides root, may read Arc key files and so use the
    /// host's identities through the Arc endpoint.
    #[arg(long)]
    pub arc_group: Option<String>,
    /// Serve the pods of this Kubernetes node as aad-pod-identity's NMI (managed mode): watch
    /// its pods and the aadpodidentity.k8s.io objects, redirect pod traffic for
    /// 169.254.169.254:80 here with iptables (chain aad-metadata), answer by source IP.
    #[arg(long)]
    pub nmi: bool,
    /// The Kubernetes node this agent runs on (required with --nmi).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubeconfig for the watches [default: KUBECONFIG, else the in-cluster service account].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// NMI listen address, the target of the DNAT; not a loopback address (a DNAT from
    /// PREROUTING cannot reach one) [default: the --private-ip (or the address this node
    /// reaches the server from), port 2579; /host/token is also served on 127.0.0.1 there].
    #[arg(long)]
    pub nmi_listen: Option<SocketAddr>,
    /// Answer /metadata/instance with 403 "Request blocked by AAD Pod Identity NMI".
    #[arg(long)]
    pub block_instance_metadata: bool,
    /// Run NMI on a kubenet cluster even if the cluster does not allow it (pods with NET_RAW
    /// can spoof each other's IP there, CVE-2021-1677).
    #[arg(long)]
    pub allow_network_plugin_kubenet: bool,
    /// Require `Metadata: true` on NMI requests.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub metadata_header_required: bool,
    /// How often NMI's iptables rules are checked and repaired, in seconds.
    #[arg(long, default_value_t = keyless_node::nmi::IPTABLES_RECONCILE_INTERVAL.as_secs())]
    pub ipt_update_interval_sec: u64,
    /// NMI's mode: `managed` (the bindings decide; the AKS add-on's mode) or `standard` (MIC
    /// attaches identities on demand; a pod is served once its AzureAssignedIdentity is
    /// Assigned).
    #[arg(long, value_enum, default_value_t = OperationMode::Managed)]
    pub operation_mode: OperationMode,
    /// Standard mode: bindings select pods of their own namespace only (must match MIC's).
    #[arg(
        long = "forceNamespaced",
        visible_alias = "force-namespaced",
        env = "FORCENAMESPACED"
    )]
    pub force_namespaced: bool,
    /// Standard mode: answer 503 + `Retry-After: 20` instead of 404 when the identity is not
    /// assigned after the wait.
    #[arg(long)]
    pub set_retry_after_header: bool,
    /// Standard mode: wait up to this many intervals for MIC to create the assigned identity.
    #[arg(long, default_value_t = keyless_node::nmi::RETRY_ATTEMPTS_FOR_CREATED)]
    pub retry_attempts_for_created: u32,
    /// Standard mode: then up to this many intervals for it to become Assigned.
    #[arg(long, default_value_t = keyless_node::nmi::RETRY_ATTEMPTS_FOR_ASSIGNED)]
    pub retry_attempts_for_assigned: u32,
    /// Standard mode: the interval of those waits, in seconds.
    #[arg(long, default_value_t = keyless_node::nmi::FIND_IDENTITY_RETRY_INTERVAL.as_secs())]
    pub find_identity_retry_interval: u64,
    /// Prove each pod connection by the kernel (its socket lives in the pod's network
    /// namespace, held by a process of the pod's cgroup) before answering; false only where
    /// that cannot work (pods are then told apart by source IP alone).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub caller_attestation: bool,
    /// Where the host's cgroup file system is mounted (the kubelet's kubepods tree).
    #[arg(long, default_value = keyless_node::nmi::CGROUP_ROOT)]
    pub cgroup_root: PathBuf,
    /// The node's own identities (client ids, comma-separated: the kubelet identity, as given
    /// to MIC): the node's processes keep them even when an AzureIdentity binds pods to one
    /// (otherwise an identity an AzureIdentity names is a pod identity, not the node's).
    #[arg(long, value_delimiter = ',')]
    pub immutable_user_msis: Vec<String>,
}

/// `--operation-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OperationMode {
    Standard,
    Managed,
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Open the data dir: lock it (one process per data dir), load the KEK, open the store (the
/// SQLite file in the data dir, or `--database postgres://…`).
async fn open_store(a: &ServerArgs) -> Result<(Store, std::fs::File), CliError> {
    // 0700 / 0600 for everything in it, including what an older version left more open
    keyless_store::files::private_dir(&a.data_dir).map_err(io_err(&a.data_dir))?;
    keyless_store::files::tighten(&a.data_dir).map_err(io_err(&a.data_dir))?;
    let lock_path = a.data_dir.join("lock");
    let lock = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(keyless_store::files::FILE_MODE)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?
    };
    if lock.try_lock().is_err() {
        return Err(CliError::Usage(format!(
            "the data directory {} is in use by another keyless process; stop it or use --data-dir",
            a.data_dir.display()
        )));
    }
    let kek = match &a.kek {
        Some(k) => Kek::from_base64(k)?,
        None => Kek::load_or_create(&a.data_dir.join("kek"))?,
    };
    let store = match &a.database {
        Some(url) if keyless_store::postgres::is_url(url) => {
            let mut opts = keyless_store::postgres::PgOptions::new(url.clone());
            opts.ca_file = a.database_ca_file.clone();
            opts.pool_size = a.database_pool_size.max(1);
            Store::postgres(&opts, kek).await.map_err(|e| {
                CliError::Usage(format!(
                    "cannot open the database {}: {e}",
                    keyless_store::postgres::redact(url)
                ))
            })?
        }
        Some(other) => {
            return Err(CliError::Usage(format!(
                "--database must be a postgres:// URL (got {:?}); without it the SQLite file in --data-dir is used",
                keyless_store::postgres::redact(other)
            )))
        }
        None => {
            let db = a.data_dir.join("keyless.db");
            if !db.exists() {
                // SQLite gives its -wal / -shm files the database file's mode: create it 0600 first
                keyless_store::files::create_new_private(&db, b"").map_err(io_err(&db))?;
            }
            Store::sqlite(&db, kek)?
        }
    };
    store.verify_kek().await?;
    keyless_store::files::tighten(&a.data_dir).map_err(io_err(&a.data_dir))?;
    Ok((store, lock))
}

/// A join token (10 minutes) for the embedded agent.
async fn new_join_token(
    s: &keyless_server::state::AppState,
    vm: &ResourceId,
) -> Result<String, CliError> {
    let mut tx = s.store.write("up_join_token").await?;
    let (token, _) = resources::create_join_token(s, &mut tx, vm, 600).await?;
    tx.commit().await?;
    Ok(token)
}

fn server_config(a: &ServerArgs, default_listen: &str) -> Result<ServerConfig, CliError> {
    let listen = a
        .listen
        .unwrap_or_else(|| default_listen.parse().expect("valid default address"));
    let mut cfg = ServerConfig::new(a.data_dir.clone(), listen);
    cfg.audit = a.audit.open(&a.data_dir)?;
    cfg.public_url = a.public_url.clone();
    cfg.tls_sans = a.tls_san.clone();
    cfg.mi_token_lifetime = a.token_lifetime;
    cfg.rotation.rotate_every = a.key_rotation;
    cfg.rotation.prepublish = a.key_prepublish;
    cfg.rotation.max_token_lifetime = a.token_lifetime.max(cfg.sp_token_lifetime);
    cfg.key_check_interval = Duration::from_secs(a.key_check_interval.max(1));
    cfg.host_cert_lifetime = a.host_cert_lifetime;
    cfg.vault_domain = a.vault_domain.trim_matches('.').to_ascii_lowercase();
    cfg.dev_clock = a.dev_clock;
    cfg.vault_check_interval = Duration::from_secs(a.vault_check_interval.max(1));
    if let Some(p) = &a.issuer_ca_file {
        cfg.issuer_ca_pem = Some(std::fs::read_to_string(p).map_err(io_err(p))?);
    }
    Ok(cfg)
}

fn bind_hint(e: keyless_server::error::ServerError) -> CliError {
    match e {
        keyless_server::error::ServerError::Bind { addr, source } => CliError::Usage(format!(
            "cannot listen on {addr}: {source}. Is another `keyless up` or server running? Pick another address with --listen."
        )),
        other => other.into(),
    }
}

pub(crate) async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub async fn server(a: ServerArgs) -> Result<(), CliError> {
    let (store, _lock) = open_store(&a).await?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let srv = keyless_server::start(server_config(&a, "0.0.0.0:8443")?, store, clock)
        .await
        .map_err(bind_hint)?;
    let b = &srv.bootstrap;
    save_admin(b, &a.data_dir)?;
    say!(
        "Keyless server listening on https://{} (issuer {})",
        srv.local_addr,
        srv.state.base_url
    );
    say!("Tenant:        {}", b.tenant_id);
    say!("Subscription:  {}", b.subscription_id);
    say!("CA certificate: {}", b.ca_path.display());
    print_admin(b, &a.data_dir, a.print_secret);
    let health = keyless_ops::health::Health::new();
    keyless_server::ops::register_checks(&srv.state, &health);
    let _ops = a
        .ops
        .start("server", keyless_ops::listener::defaults::SERVER, health)
        .await?;
    wait_for_signal().await;
    // stop listening, release this replica's leases, flush the audit trail
    srv.shutdown().await;
    Ok(())
}

/// Where the first start leaves the bootstrap admin's credentials (0600, env-file form:
/// `KEYLESS_CLIENT_ID=…` / `KEYLESS_CLIENT_SECRET=…`); the admin verbs read it when no secret
/// is given.
pub const BOOTSTRAP_SECRET_FILE: &str = "bootstrap-admin.secret";

/// Write the new admin's credentials to [`BOOTSTRAP_SECRET_FILE`], right after the bootstrap
/// that created them (a file left from an earlier data dir holds a dead secret and is replaced).
fn save_admin(b: &keyless_server::state::Bootstrap, data_dir: &Path) -> Result<(), CliError> {
    if let Some(admin) = &b.new_admin {
        let path = data_dir.join(BOOTSTRAP_SECRET_FILE);
        let _ = std::fs::remove_file(&path);
        let body = format!(
            "# Keyless bootstrap admin. Only a hash of the secret is stored in the server.\nKEYLESS_CLIENT_ID={}\nKEYLESS_CLIENT_SECRET={}\n",
            admin.client_id, admin.client_secret
        );
        keyless_store::files::create_new_private(&path, body.as_bytes()).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Where the admin's secret is; the secret itself only with `--print-secret`.
fn print_admin(b: &keyless_server::state::Bootstrap, data_dir: &Path, print_secret: bool) {
    let path = data_dir.join(BOOTSTRAP_SECRET_FILE);
    match &b.new_admin {
        Some(admin) => {
            say!();
            say!(
                "Bootstrap admin created; its secret is in {} (mode 0600).",
                path.display()
            );
            say!("  export KEYLESS_CLIENT_ID={}", admin.client_id);
            if print_secret {
                say!("  export KEYLESS_CLIENT_SECRET={}", admin.client_secret);
            }
        }
        None => say!(
            "Bootstrap admin client id: {} (its secret was written to {} at first start)",
            b.admin_client_id,
            path.display()
        ),
    }
}

pub async fn node(a: NodeArgs) -> Result<(), CliError> {
    keyless_store::files::private_dir(&a.state_dir).map_err(io_err(&a.state_dir))?;
    keyless_store::files::tighten(&a.state_dir).map_err(io_err(&a.state_dir))?;
    let ca_pem = std::fs::read_to_string(&a.ca_file).map_err(io_err(&a.ca_file))?;
    let cfg = keyless_node::NodeConfig {
        server_urls: keyless_ops::failover::parse_urls(&a.server),
        ca_pem,
        state_dir: a.state_dir.clone(),
        join_token: match (&a.join_token, &a.join_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => match std::fs::read_to_string(f) {
                Ok(t) => Some(t.trim().to_string()).filter(|t| !t.is_empty()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err(f)(e)),
            },
            (None, None) => None,
        },
        imds_listen: a.imds_listen,
        sync_interval: Duration::from_secs(a.sync_interval.max(1)),
        private_ip: a.private_ip.clone(),
        extension_reload_hook: a.extension_reload_hook.clone(),
        local: local_config(&a)?,
        extension_store_root: a.extension_store_root.clone(),
        nmi: nmi_config(&a)?,
        fair_share: a.fair_share.config(),
        audit: a.audit.open(&a.state_dir)?,
    };
    let node = keyless_node::start(cfg, Arc::new(SystemClock::new())).await?;
    say!("IMDS endpoint: http://{}", node.imds_addr);
    if let (Some(addr), Some(file)) = (node.app_service_addr, &node.identity_header_file) {
        say!(
            "App Service endpoint: export IDENTITY_ENDPOINT=http://{addr}/MSI/token IDENTITY_HEADER=$(cat {})",
            file.display()
        );
    }
    if let Some(addr) = node.arc_addr {
        say!(
            "Arc endpoint: export IDENTITY_ENDPOINT=http://localhost:{}/metadata/identity/oauth2/token IMDS_ENDPOINT=http://localhost:{}",
            addr.port(),
            addr.port()
        );
    }
    if let Some(v) = node.agent.view() {
        say!("VM: {}", v.vm["resourceId"].as_str().unwrap_or(""));
    }
    if let Some(n) = &node.nmi {
        // printed once the watches have listed and the iptables redirect is in place
        say!("NMI endpoint: http://{}", n.addr);
        say!(
            "NMI caller attestation: {}",
            if a.caller_attestation {
                "on (each pod connection proven by its socket and cgroup)"
            } else {
                "OFF (--caller-attestation=false): pods are told apart by source IP only"
            }
        );
    }
    let health = keyless_ops::health::Health::new();
    keyless_node::ops::register_checks(&node, &health);
    let _ops = a
        .ops
        .start("node", keyless_ops::listener::defaults::NODE, health)
        .await?;
    wait_for_signal().await;
    node.shutdown().await;
    Ok(())
}

/// NMI's settings from the flags (None without --nmi).
fn nmi_config(a: &NodeArgs) -> Result<Option<keyless_node::nmi::NmiConfig>, CliError> {
    if !a.nmi {
        return Ok(None);
    }
    let node_name = a
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| CliError::Usage("--nmi needs --node-name (or NODE_NAME)".into()))?;
    if let Some(l) = a.nmi_listen {
        if l.ip().is_loopback() {
            return Err(CliError::Usage(format!(
                "--nmi-listen {l}: pods are redirected with a DNAT, which cannot reach a loopback address; use an address of this node"
            )));
        }
    }
    let mut c = keyless_node::nmi::NmiConfig::new(node_name);
    c.kubeconfig = a.kubeconfig.clone();
    c.listen = a.nmi_listen;
    c.block_instance_metadata = a.block_instance_metadata;
    c.allow_network_plugin_kubenet = a.allow_network_plugin_kubenet;
    c.metadata_header_required = a.metadata_header_required;
    c.iptables_interval = Duration::from_secs(a.ipt_update_interval_sec.max(1));
    c.mode = match a.operation_mode {
        OperationMode::Managed => keyless_node::pods::Mode::Managed,
        OperationMode::Standard => keyless_node::pods::Mode::Standard(if a.force_namespaced {
            keyless_core::pod_identity::Namespacing::Always
        } else {
            keyless_core::pod_identity::Namespacing::ByIdentity
        }),
    };
    c.set_retry_after_header = a.set_retry_after_header;
    c.retry_attempts_for_created = a.retry_attempts_for_created;
    c.retry_attempts_for_assigned = a.retry_attempts_for_assigned;
    c.find_identity_retry_interval = Duration::from_secs(a.find_identity_retry_interval);
    c.caller_attestation = a.caller_attestation;
    c.cgroup_root = a.cgroup_root.clone();
    c.immutable_user_msis = a
        .immutable_user_msis
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    Ok(Some(c))
}

/// The local endpoints `keyless node` serves besides IMDS.
fn local_config(a: &NodeArgs) -> Result<keyless_node::local::LocalConfig, CliError> {
    use keyless_core::local_endpoints::{parse_styles, Style};
    let styles = parse_styles(&a.endpoints).map_err(CliError::Usage)?;
    let arc_group = match &a.arc_group {
        None => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_id(g).ok_or_else(|| CliError::Usage(format!("unknown group '{g}'")))?,
        }),
    };
    Ok(keyless_node::local::LocalConfig {
        extension: styles.contains(&Style::Extension),
        app_service: styles
            .contains(&Style::AppService)
            .then_some(a.appservice_listen),
        arc: styles.contains(&Style::Arc).then_some(a.arc_listen),
        arc_token_dir: a.arc_token_dir.clone(),
        arc_group,
    })
}

/// A group's id from /etc/group.
fn group_id(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
        })
}

/// A VM name for this machine: the host name when it is a valid VM name.
fn machine_vm_name() -> String {
    let hn = keyless_server::state::host_name();
    if keyless_core::names::validate_vm_name(&hn).is_ok() {
        hn
    } else {
        "keyless-host".to_string()
    }
}

pub async fn up(a: UpArgs) -> Result<(), CliError> {
    let (store, _lock) = open_store(&a.server).await?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let srv = keyless_server::start(
        server_config(&a.server, "127.0.0.1:8443")?,
        store,
        clock.clone(),
    )
    .await
    .map_err(bind_hint)?;
    let s = srv.state.clone();
    let b = srv.bootstrap.clone();
    save_admin(&b, &a.server.data_dir)?;

    // This machine as a VM with a system-assigned identity and the demo user-assigned identity
    // (one unit of work).
    let rg = "keyless";
    let sub = s.subscription_id.clone();
    let mut tx = s.store.write("up_setup").await?;
    if tx.get_resource_group(&sub, rg).await?.is_none() {
        resources::put_resource_group(&s, &mut tx, &sub, rg, Some(&s.cfg.location), None).await?;
    }
    let demo = ResourceId::new(&sub, rg, UAMI, "keyless-demo");
    let demo_rec = match tx.get_identity(&demo.key()).await? {
        Some(r) => r,
        None => {
            resources::put_identity(&s, &mut tx, &demo, Some(&s.cfg.location), None)
                .await?
                .0
        }
    };
    let vm_id = match tx.get_meta("up_vm").await? {
        Some(id) => ResourceId::parse(&id).map_err(|e| CliError::Usage(e.to_string()))?,
        None => {
            let id = ResourceId::new(&sub, rg, VM, &machine_vm_name());
            tx.set_meta("up_vm", &id.canonical()).await?;
            id
        }
    };
    if tx.get_vm(&vm_id.key()).await?.is_none() {
        let mut user = BTreeMap::new();
        user.insert(demo_rec.resource_id.clone(), json!({}));
        resources::write_vm(
            &s,
            &mut tx,
            &vm_id,
            VmBody {
                location: Some(s.cfg.location.clone()),
                identity: Some(IdentityBody {
                    kind: Some("SystemAssigned, UserAssigned".into()),
                    user_assigned: Some(user),
                }),
                ..Default::default()
            },
            false,
            &resources::LinkCheck::Trusted,
        )
        .await?;
    }
    let vm = resources::get_vm(&s, &mut tx, &vm_id).await?;
    let system = tx.vm_system_identity(&vm.key).await?;
    tx.commit().await?;

    // The embedded host agent joins like any other host.
    let state_dir = a.server.data_dir.join("node");
    let joined = state_dir.join("host-cert.pem").exists();
    let join_token = if joined {
        None
    } else {
        Some(new_join_token(&s, &vm_id).await?)
    };
    // where the server is reached: `localhost` when it listens on every address or on
    // 127.0.0.1 (the default issuer's host), else the address it is bound to, which
    // `localhost` need not name
    let server_url = match srv.local_addr.ip() {
        ip if ip.is_unspecified() || ip == std::net::Ipv4Addr::LOCALHOST => {
            format!("https://localhost:{}", srv.local_addr.port())
        }
        _ => format!("https://{}", srv.local_addr),
    };
    let node = keyless_node::start(
        keyless_node::NodeConfig {
            server_urls: vec![server_url.clone()],
            ca_pem: s.ca.cert_pem(),
            state_dir: state_dir.clone(),
            join_token: join_token.clone(),
            imds_listen: a.imds_listen,
            sync_interval: Duration::from_secs(a.sync_interval.max(1)),
            private_ip: None,
            extension_reload_hook: None,
            local: Default::default(),
            extension_store_root: PathBuf::from("/var/lib/waagent"),
            nmi: None,
            fair_share: a.fair_share.config(),
            audit: s.cfg.audit.clone(),
        },
        clock,
    )
    .await;
    let node = match node {
        Ok(n) => n,
        // The stored credential may be stale (VM recreated); join again once.
        Err(keyless_node::NodeError::Refused { .. }) if joined => {
            let _ = std::fs::remove_file(state_dir.join("host-cert.pem"));
            keyless_node::start(
                keyless_node::NodeConfig {
                    server_urls: vec![server_url.clone()],
                    ca_pem: s.ca.cert_pem(),
                    state_dir: state_dir.clone(),
                    join_token: Some(new_join_token(&s, &vm_id).await?),
                    imds_listen: a.imds_listen,
                    sync_interval: Duration::from_secs(a.sync_interval.max(1)),
                    private_ip: None,
                    extension_reload_hook: None,
                    local: Default::default(),
                    extension_store_root: PathBuf::from("/var/lib/waagent"),
                    nmi: None,
                    fair_share: a.fair_share.config(),
                    audit: s.cfg.audit.clone(),
                },
                Arc::new(SystemClock::new()),
            )
            .await?
        }
        Err(keyless_node::NodeError::Bind { addr, source }) => {
            return Err(CliError::Usage(format!(
                "cannot listen on {addr}: {source}. Is another `keyless up` running? Pick another address with --imds-listen."
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let imds_url = format!("http://{}", node.imds_addr);
    // one process, one ops listener: the server's checks and the embedded agent's
    let health = keyless_ops::health::Health::new();
    keyless_server::ops::register_checks(&srv.state, &health);
    keyless_node::ops::register_checks(&node, &health);
    let _ops = a
        .server
        .ops
        .start("up", keyless_ops::listener::defaults::SERVER, health)
        .await?;

    let info = json!({
        "serverUrl": server_url,
        "tenantId": b.tenant_id,
        "subscriptionId": b.subscription_id,
        "caFile": b.ca_path.canonicalize().unwrap_or(b.ca_path.clone()),
        "keyVaultCaFile": b.kv_ca_path.canonicalize().unwrap_or(b.kv_ca_path.clone()),
        "imdsUrl": imds_url,
        "adminClientId": b.admin_client_id,
        "vaultDomain": s.cfg.vault_domain,
        "vaultUriTemplate": s.vault_uri("{vault}"),
        "vm": {"resourceId": vm.resource_id, "vmId": vm.vm_id},
        "systemIdentity": system.as_ref().map(|i| json!({"principalId": i.principal_id, "clientId": i.client_id})),
        "demoIdentity": {"resourceId": demo_rec.resource_id, "principalId": demo_rec.principal_id, "clientId": demo_rec.client_id},
    });
    let info_path = a.server.data_dir.join("endpoints.json");
    keyless_store::crypto::write_private(
        &info_path,
        &serde_json::to_vec_pretty(&info).unwrap_or_default(),
    )?;

    let ca = info["caFile"].as_str().unwrap_or_default().to_string();
    say!("Keyless is up.");
    say!();
    say!("  Server (token service + control plane): {server_url}");
    say!("  IMDS endpoint (host agent):              {imds_url}");
    say!("  Tenant:       {}", b.tenant_id);
    say!("  Subscription: {}", b.subscription_id);
    say!("  VM:           {}", vm.resource_id);
    if let Some(sys) = &system {
        say!(
            "  System-assigned identity: principalId {} clientId {}",
            sys.principal_id,
            sys.client_id
        );
    }
    say!(
        "  Demo user-assigned identity: {} (clientId {})",
        demo_rec.resource_id,
        demo_rec.client_id
    );
    say!("  CA certificate: {ca}");
    say!(
        "  Key Vault:    {} (create one with `keyless keyvault create -n <vault> -g <group>`)",
        s.vault_uri("<vault>")
    );
    print_admin(&b, &a.server.data_dir, a.server.print_secret);
    say!();
    say!("For workloads (Azure SDKs) on this machine:");
    say!("  export AZURE_POD_IDENTITY_AUTHORITY_HOST={imds_url}");
    say!("  export REQUESTS_CA_BUNDLE={ca} SSL_CERT_FILE={ca} NODE_EXTRA_CA_CERTS={ca}");
    say!("For the keyless admin verbs:");
    say!(
        "  export KEYLESS_SERVER={server_url} KEYLESS_TENANT_ID={} KEYLESS_CA_FILE={ca}",
        b.tenant_id
    );
    say!();
    say!(
        "Endpoints are also written to {}. Stop with Ctrl-C.",
        info_path.display()
    );
    wait_for_signal().await;
    // stop listening (the agent, then the server), then flush the one audit file they share
    node.shutdown().await;
    srv.shutdown().await;
    Ok(())
}

#[derive(Args, Clone)]
pub struct KvAgentArgs {
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
    /// Extension settings JSON: the bare `settings` object or the guest agent's handler file
    /// (`{"runtimeSettings":[{"handlerSettings":{"publicSettings":{…}}}]}`).
    #[arg(long)]
    pub settings: PathBuf,
    /// Directory for the handler status file `<seq>.status`.
    #[arg(long)]
    pub status_dir: Option<PathBuf>,
    /// Sequence number of the status file [default: N when the settings file is `N.settings`,
    /// else 0].
    #[arg(long)]
    pub status_seq: Option<u64>,
    /// Command run with `sh -c` after a poll that changed certificates; it gets
    /// KEYLESS_KV_CHANGED = the changed symlink paths, space-separated.
    #[arg(long)]
    pub reload_hook: Option<String>,
    /// PEM file of the CA(s) to trust for the vaults' TLS (default: the system roots).
    #[arg(long, env = "KEYLESS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Resolve HOST to IP:PORT (like curl --resolve; the URL's port is used), e.g.
    /// `app-kv.vault.localhost=127.0.0.1:8443`. Repeatable.
    #[arg(long = "resolve", value_name = "HOST=IP:PORT")]
    pub resolve: Vec<String>,
}

fn parse_resolve(s: &str) -> Result<(String, SocketAddr), CliError> {
    let (host, addr) = s
        .split_once('=')
        .ok_or_else(|| CliError::Usage(format!("--resolve {s}: expected HOST=IP:PORT")))?;
    let addr: SocketAddr = addr
        .trim()
        .parse()
        .map_err(|_| CliError::Usage(format!("--resolve {s}: '{addr}' is not IP:PORT")))?;
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return Err(CliError::Usage(format!("--resolve {s}: empty host")));
    }
    Ok((host, addr))
}

/// `keyless kv-agent`: sync Key Vault certificates to PEM files until SIGTERM / Ctrl-C.
pub async fn kv_agent(a: KvAgentArgs) -> Result<(), CliError> {
    let seq = a.status_seq.unwrap_or_else(|| {
        a.settings
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".settings"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    });
    let status = keyless_kvagent::status::StatusFile::new(a.status_dir.clone(), seq);
    let settings_err = |m: String| {
        let e = keyless_kvagent::Error::Settings(m);
        let _ = status.write_simple("Enable.", keyless_kvagent::State::Error, 1, &e.to_string());
        CliError::Usage(e.to_string())
    };
    let text = std::fs::read_to_string(&a.settings)
        .map_err(|e| settings_err(format!("cannot read {}: {e}", a.settings.display())))?;
    let settings: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| settings_err(format!("{}: not valid JSON ({e})", a.settings.display())))?;
    let ca_pem = match &a.ca_file {
        Some(p) => Some(std::fs::read_to_string(p).map_err(io_err(p))?),
        None => None,
    };
    let resolve = a
        .resolve
        .iter()
        .map(|s| parse_resolve(s))
        .collect::<Result<Vec<_>, _>>()?;
    let agent = keyless_kvagent::Agent::new(keyless_kvagent::AgentConfig {
        settings,
        status_dir: a.status_dir.clone(),
        status_seq: seq,
        reload_hook: a.reload_hook.clone(),
        ca_pem,
        resolve,
    })
    .map_err(|e| CliError::Usage(e.to_string()))?;
    let s = agent.settings();
    say!(
        "kv-agent: watching {} certificate(s) every {} s{}",
        s.observed_certificates.len(),
        s.polling_interval.as_secs(),
        if s.require_initial_sync {
            " (initial sync required)"
        } else {
            ""
        }
    );
    for c in &s.observed_certificates {
        say!("  {} -> {}", c.url, c.link_path().display());
    }
    if let Some(p) = agent.status_path() {
        say!("  status: {}", p.display());
    }
    let health = keyless_ops::health::Health::new();
    let rx = agent.readiness();
    health.register("initial sync", move || match &*rx.borrow() {
        keyless_kvagent::Readiness::Ready => Ok(()),
        keyless_kvagent::Readiness::Failed(m) => Err(m.clone()),
        keyless_kvagent::Readiness::Syncing => Err("the initial sync has not completed".into()),
    });
    let _ops = a
        .ops
        .start(
            "kv-agent",
            keyless_ops::listener::defaults::KV_AGENT,
            health,
        )
        .await?;
    let mut ready = agent.readiness();
    let watcher = tokio::spawn(async move {
        let mut last = None;
        loop {
            let r = ready.borrow_and_update().clone();
            if last.as_ref() != Some(&r) {
                match &r {
                    keyless_kvagent::Readiness::Ready => say!("kv-agent: initial sync done"),
                    keyless_kvagent::Readiness::Failed(m) => say!("kv-agent: {m}"),
                    keyless_kvagent::Readiness::Syncing => {}
                }
                last = Some(r);
            }
            if ready.changed().await.is_err() {
                break;
            }
        }
    });
    agent.run(wait_for_signal()).await;
    watcher.abort();
    Ok(())
}
