//! Server configuration, shared state, and first-start bootstrap (tenant, subscription, CA,
//! TLS certificate, signing key, bootstrap admin).

use crate::error::{Result, ServerError};
use crate::keys::KeyRing;
use crate::util::new_guid;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use keyless_core::clock::Clock;
use keyless_core::rotation::RotationPolicy;
use keyless_pki::Ca;
use keyless_store::{ServicePrincipalRecord, Store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Settings of `keyless server` (and of the server half of `keyless up`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Base URL clients use (issuer host). Default `https://localhost:<port>`.
    pub public_url: Option<String>,
    /// Extra TLS SANs besides localhost, 127.0.0.1, ::1 and the host name.
    pub tls_sans: Vec<String>,
    /// Managed-identity token lifetime (Azure: 24 h).
    pub mi_token_lifetime: u64,
    /// Service-principal token lifetime (Entra: ~1 h).
    pub sp_token_lifetime: u64,
    pub rotation: RotationPolicy,
    /// How often the rotation plan is checked.
    pub key_check_interval: std::time::Duration,
    /// Host credential (client certificate) lifetime.
    pub host_cert_lifetime: u64,
    /// Location given to resources created by bootstrap.
    pub location: String,
    /// PEM of the CA(s) trusted for external OIDC issuers (federation); default: system roots.
    pub issuer_ca_pem: Option<String>,
    /// Key Vault host names are `{vault}.vault.{vault_domain}`.
    pub vault_domain: String,
    /// Let an Owner move the Key Vault clock forward (tests, demos of certificate renewal).
    pub dev_clock: bool,
    /// How often certificate lifetime actions and purges are checked.
    pub vault_check_interval: std::time::Duration,
    /// How often a server looks for template deployments whose run stopped with its server
    /// (their lease lapsed) to run them on.
    pub deployment_resume_interval: std::time::Duration,
    /// How often the vault cache of the Key Vault data plane reads the store's change feed
    /// (`cache`): a vault changed through another server is seen here within this interval
    /// plus one read of the feed, and never later than twice this interval.
    pub vault_cache_poll: std::time::Duration,
    /// Shortest time between two fetches of one federation issuer's discovery document and
    /// JWKS (an assertion with an unknown `kid` asks for one).
    pub issuer_refetch_interval: std::time::Duration,
    /// Where token issuances and refusals, control-plane writes and Key Vault operations are
    /// recorded (default: nothing recorded, as for tests; `keyless server` opens the file).
    pub audit: Arc<keyless_ops::audit::Audit>,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        let mi = 86_400 + 300;
        Self {
            data_dir,
            listen,
            public_url: None,
            tls_sans: vec![],
            mi_token_lifetime: mi,
            sp_token_lifetime: 3_600 + 300,
            rotation: RotationPolicy {
                rotate_every: 30 * 86_400,
                prepublish: 86_400,
                max_token_lifetime: mi,
                skew: 300,
            },
            key_check_interval: std::time::Duration::from_secs(60),
            host_cert_lifetime: 7 * 86_400,
            location: "local".into(),
            issuer_ca_pem: None,
            vault_domain: "localhost".into(),
            dev_clock: false,
            vault_check_interval: std::time::Duration::from_secs(60),
            deployment_resume_interval: std::time::Duration::from_secs(10),
            vault_cache_poll: std::time::Duration::from_millis(500),
            issuer_refetch_interval: std::time::Duration::from_secs(60),
            audit: keyless_ops::audit::Audit::disabled(),
        }
    }
}

/// Shared state of a running server.
pub struct AppState {
    /// The store handle: `store.read(op)` / `store.write(op)` open a unit of work.
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub cfg: ServerConfig,
    pub tenant_id: String,
    pub subscription_id: String,
    pub tenant_created: u64,
    pub base_url: String,
    /// `iss` of v1 and v2 tokens, made once from `base_url` and `tenant_id` ([`issuers`]).
    pub issuers: (String, String),
    pub keys: KeyRing,
    pub ca: Ca,
    /// Signs certificates of the Key Vault `Keyless` issuer (not trusted by the platform).
    pub kv_ca: Ca,
    /// Client for external OIDC issuers (federated credentials).
    pub http: reqwest::Client,
    pub jwks: crate::caches::jwks::JwksCache,
    /// Time of the Key Vault (certificate validity, lifetime actions, soft delete).
    pub vault_clock: crate::clock::VaultClock,
    /// Tokens whose signature was already checked.
    pub verified: crate::caches::verified::VerifiedTokens,
    /// This process among the servers sharing the database: the holder of its leases
    /// (signing-key rotation, the Key Vault scheduler), a uuid made at start.
    pub replica_id: String,
    /// Vaults with their parsed settings for the Key Vault data plane, kept in step with the
    /// other servers by the store's change feed (`caches::vaults::follow`).
    pub vaults: crate::caches::vaults::VaultCache,
    /// Hosts by credential fingerprint, with their identities, for token requests; kept in step
    /// like `vaults` (`caches::hosts`).
    pub hosts: crate::caches::hosts::HostCache,
}

impl AppState {
    pub fn now(&self) -> u64 {
        self.clock.now()
    }
    /// `iss` of v1 tokens (the form managed-identity tokens carry).
    pub fn issuer_v1(&self) -> &str {
        &self.issuers.0
    }
    pub fn issuer_v2(&self) -> &str {
        &self.issuers.1
    }
    /// The public port of this server, when not 443.
    fn port_suffix(&self) -> String {
        match self.base_url.rsplit_once(':') {
            Some((_, p)) if p.bytes().all(|b| b.is_ascii_digit()) && p != "443" => format!(":{p}"),
            _ => String::new(),
        }
    }
    /// `https://{name}.vault.{domain}[:port]/`.
    pub fn vault_uri(&self, name: &str) -> String {
        format!(
            "https://{}.vault.{}{}/",
            name.to_ascii_lowercase(),
            self.cfg.vault_domain,
            self.port_suffix()
        )
    }
    /// Audiences the control plane accepts (Azure's management audiences and our own URL).
    pub fn management_audiences(&self) -> Vec<String> {
        let mut v: Vec<String> = [
            "https://management.core.windows.net/",
            "https://management.core.windows.net",
            "https://management.azure.com/",
            "https://management.azure.com",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(self.base_url.clone());
        v.push(format!("{}/", self.base_url));
        v
    }
}

/// What bootstrap found or created.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub tenant_id: String,
    pub subscription_id: String,
    pub tenant_created: u64,
    /// Set only on the start that created the admin: the secret is shown once.
    pub new_admin: Option<AdminCredential>,
    pub admin_client_id: String,
    pub ca_path: PathBuf,
    /// The Key Vault issuing CA (`Keyless` issuer), for relying parties of vault certificates.
    pub kv_ca_path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminCredential {
    pub client_id: String,
    pub client_secret: String,
}

/// `iss` of this server's v1 and v2 tokens.
pub fn issuers(base_url: &str, tenant_id: &str) -> (String, String) {
    (
        format!("{base_url}/{tenant_id}/"),
        format!("{base_url}/{tenant_id}/v2.0"),
    )
}

/// The host name of this machine.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The lease under which one server at a time bootstraps a database.
pub const BOOTSTRAP_LEASE: &str = "bootstrap";
/// Seconds the bootstrap lease is held for (its holder finishes well within; a holder that
/// died frees it when it expires).
const BOOTSTRAP_LEASE_TTL: u64 = 60;
/// How long a server waits for another to finish bootstrapping before giving up.
const BOOTSTRAP_WAIT: std::time::Duration = std::time::Duration::from_secs(3 * BOOTSTRAP_LEASE_TTL);

fn corrupt(e: impl std::fmt::Display) -> ServerError {
    keyless_store::StoreError::Corrupt(e.to_string()).into()
}

/// The CA kept as `<prefix>_cert` (meta, public) and `<prefix>_key` (sealed), if stored.
async fn read_ca(store: &Store, cert_meta: &str, key_name: &str) -> Result<Option<Ca>> {
    let mut tx = store.read("load_ca").await?;
    let (cert, key) = (
        tx.get_meta(cert_meta).await?,
        tx.get_secret(key_name).await?,
    );
    drop(tx);
    match (cert, key) {
        (Some(cert_b64), Some(key)) => {
            let cert = STANDARD.decode(cert_b64).map_err(corrupt)?;
            Ok(Some(Ca::load(&cert, &key)?))
        }
        _ => Ok(None),
    }
}

/// Load a CA kept as `<prefix>_cert` (meta, public) and `<prefix>_key` (sealed), or create it.
/// The key is generated outside any transaction; the first writer's CA is kept (a concurrent
/// creator reads it back instead of its own).
async fn load_or_create_ca(store: &Store, prefix: &str, common_name: &str, now: u64) -> Result<Ca> {
    let (cert_meta, key_name) = (format!("{prefix}_cert"), format!("{prefix}_key"));
    if let Some(ca) = read_ca(store, &cert_meta, &key_name).await? {
        return Ok(ca);
    }
    let (ca, key) = Ca::generate(common_name, now)?;
    let mut tx = store.write("create_ca").await?;
    if tx.put_secret_if_absent(&key_name, &key).await? {
        tx.set_meta(&cert_meta, &STANDARD.encode(ca.cert_der()))
            .await?;
        tx.commit().await?;
        tracing::info!(ca = prefix, "created certificate authority");
        return Ok(ca);
    }
    drop(tx);
    read_ca(store, &cert_meta, &key_name)
        .await?
        .ok_or_else(|| corrupt(format!("{prefix}: a key is stored without its certificate")))
}

/// Create (first start) or load the tenant, subscription, CA and admin.
///
/// Servers sharing one database may start together: bootstrap runs under the lease
/// [`BOOTSTRAP_LEASE`] (held by `holder`, a per-process id; a server waits up to three minutes
/// for another holder to finish or its lease to lapse), each step a write unit of work that
/// first reads what is there, so the tenant, the subscription, the CAs, the bootstrap admin and
/// its Owner assignment are created once and every other server reads them. Only the server
/// that created the admin gets its secret ([`Bootstrap::new_admin`]).
pub async fn bootstrap(
    store: &Store,
    cfg: &ServerConfig,
    holder: &str,
    clock: &dyn Clock,
) -> Result<(Bootstrap, Ca, Ca)> {
    let deadline = std::time::Instant::now() + BOOTSTRAP_WAIT;
    while !store
        .try_lease(BOOTSTRAP_LEASE, holder, clock.now(), BOOTSTRAP_LEASE_TTL)
        .await?
    {
        if std::time::Instant::now() >= deadline {
            return Err(keyless_store::StoreError::Unavailable(format!(
                "another server has held the {BOOTSTRAP_LEASE:?} lease for over {}s",
                BOOTSTRAP_WAIT.as_secs()
            ))
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let r = bootstrap_steps(store, cfg, clock.now()).await;
    if let Err(e) = store.release_lease(BOOTSTRAP_LEASE, holder).await {
        tracing::warn!(error = %e, "releasing the bootstrap lease failed; it expires by itself");
    }
    r
}

async fn bootstrap_steps(
    store: &Store,
    cfg: &ServerConfig,
    now: u64,
) -> Result<(Bootstrap, Ca, Ca)> {
    // tenant and subscription
    let mut tx = store.write("bootstrap_tenant").await?;
    if tx.get_meta("tenant_id").await?.is_none() {
        tx.set_meta("tenant_id", &new_guid()).await?;
        tx.set_meta("tenant_created", &now.to_string()).await?;
        tx.set_meta("subscription_id", &new_guid()).await?;
    }
    let tenant_id = tx
        .get_meta("tenant_id")
        .await?
        .ok_or_else(|| corrupt("tenant_id"))?;
    let subscription_id = tx.get_meta("subscription_id").await?.unwrap_or_default();
    let tenant_created = tx
        .get_meta("tenant_created")
        .await?
        .and_then(|s| s.parse().ok())
        .unwrap_or(now);
    tx.commit().await?;

    // CA: certificate in meta (public), key encrypted.
    let ca = load_or_create_ca(
        store,
        "ca",
        &format!("Keyless Root CA {}", &tenant_id[..8.min(tenant_id.len())]),
        now,
    )
    .await?;
    // Key Vault's "Keyless" issuer signs with a CA of its own: nothing in the platform trusts
    // it for its TLS, so a certificate a vault user obtains cannot impersonate the server.
    let kv_ca = load_or_create_ca(
        store,
        "kv_ca",
        &format!(
            "Keyless Key Vault CA {}",
            &tenant_id[..8.min(tenant_id.len())]
        ),
        now,
    )
    .await?;
    let pki_dir = cfg.data_dir.join("pki");
    // 0700 / 0600 like everything in the data dir (`keyless_store::files`)
    keyless_store::files::private_dir(&pki_dir).map_err(|source| ServerError::DataDir {
        path: pki_dir.display().to_string(),
        source,
    })?;
    let kv_ca_path = pki_dir.join("kv-ca.pem");
    keyless_store::crypto::write_private(&kv_ca_path, kv_ca.cert_pem().as_bytes()).map_err(
        |e| ServerError::DataDir {
            path: kv_ca_path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        },
    )?;
    let ca_path = pki_dir.join("ca.pem");
    keyless_store::crypto::write_private(&ca_path, ca.cert_pem().as_bytes()).map_err(|e| {
        ServerError::DataDir {
            path: ca_path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;

    // the bootstrap admin
    let mut tx = store.write("bootstrap_admin").await?;
    let (new_admin, admin_client_id) = match tx.get_meta("admin_client_id").await? {
        Some(id) => (None, id),
        None => {
            let client_id = new_guid();
            let secret = crate::util::new_client_secret();
            tx.put_service_principal(&ServicePrincipalRecord {
                client_id: client_id.clone(),
                object_id: new_guid(),
                display_name: "keyless-bootstrap-admin".into(),
                secret_sha256: keyless_pki::sha256_hex(secret.as_bytes()),
                certificates: vec![],
                created: now,
            })
            .await?;
            tx.set_meta("admin_client_id", &client_id).await?;
            (
                Some(AdminCredential {
                    client_id: client_id.clone(),
                    client_secret: secret,
                }),
                client_id,
            )
        }
    };
    tx.commit().await?;

    // The bootstrap admin is Owner of the subscription (once: a later removal is respected).
    let mut tx = store.write("bootstrap_owner").await?;
    if tx.get_meta("admin_owner_assigned").await?.is_none() {
        if let Some(sp) = tx.get_service_principal(&admin_client_id).await? {
            let role = keyless_core::rbac::role_by_id(keyless_core::rbac::OWNER)
                .map(|r| r.id)
                .unwrap_or_default();
            tx.insert_role_assignment(&keyless_store::RoleAssignmentRecord {
                name: new_guid(),
                scope: format!("/subscriptions/{subscription_id}"),
                role_definition_id: format!(
                    "/subscriptions/{subscription_id}/providers/Microsoft.Authorization/roleDefinitions/{role}"
                ),
                principal_id: sp.object_id.to_ascii_lowercase(),
                principal_type: "ServicePrincipal".into(),
                description: Some("Keyless bootstrap admin".into()),
                created: now,
                created_by: "keyless".into(),
            })
            .await?;
        }
        tx.set_meta("admin_owner_assigned", "1").await?;
    }
    tx.commit().await?;
    Ok((
        Bootstrap {
            tenant_id,
            subscription_id,
            tenant_created,
            new_admin,
            admin_client_id,
            ca_path,
            kv_ca_path,
        },
        ca,
        kv_ca,
    ))
}

/// The stored TLS server certificate (chain DER, key DER) if it was issued for exactly `sans`
/// by `ca` and is valid for 30 more days.
async fn stored_tls(
    store: &Store,
    ca: &Ca,
    wanted: &str,
    now: u64,
) -> Result<Option<(Vec<Vec<u8>>, Vec<u8>)>> {
    let mut tx = store.read("load_tls_identity").await?;
    let (have, cert_b64, key) = (
        tx.get_meta("tls_sans").await?,
        tx.get_meta("tls_cert").await?,
        tx.get_secret("tls_key").await?,
    );
    drop(tx);
    let (Some(have), Some(cert_b64), Some(key)) = (have, cert_b64, key) else {
        return Ok(None);
    };
    let cert = STANDARD.decode(cert_b64).map_err(corrupt)?;
    let fresh = keyless_pki::cert_validity(&cert)
        .map(|(_, na)| na > now + 30 * 86_400)
        .unwrap_or(false);
    Ok((have == wanted && fresh).then(|| (vec![cert, ca.cert_der().to_vec()], key)))
}

/// Load or (re)issue the TLS server certificate for `sans`; returns (chain DER, key DER).
///
/// One certificate is stored (`tls_cert`, `tls_sans` in meta, `tls_key` sealed): servers with
/// the same SANs share it; a server with other SANs issues its own and stores it in its place
/// (each serves the one it loaded; certificate, key and SANs are written in one unit of work,
/// so no server ever reads a key of another certificate).
pub async fn tls_identity(
    store: &Store,
    ca: &Ca,
    sans: &[String],
    now: u64,
) -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
    let wanted = sans.join(",");
    if let Some(found) = stored_tls(store, ca, &wanted, now).await? {
        return Ok(found);
    }
    let (cert, key) = ca.issue_server_cert(sans, now, 365 * 86_400)?;
    let mut tx = store.write("store_tls_identity").await?;
    tx.put_secret("tls_key", &key).await?;
    tx.set_meta("tls_cert", &STANDARD.encode(&cert)).await?;
    tx.set_meta("tls_sans", &wanted).await?;
    tx.commit().await?;
    Ok((vec![cert, ca.cert_der().to_vec()], key))
}

/// The SANs of the server certificate.
pub fn tls_sans(extra: &[String]) -> Vec<String> {
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let hn = host_name();
    for s in std::iter::once(hn).chain(extra.iter().cloned()) {
        if !s.is_empty() && !sans.iter().any(|x| x.eq_ignore_ascii_case(&s)) {
            sans.push(s);
        }
    }
    sans
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use keyless_core::clock::SystemClock;
    use keyless_store::Kek;

    fn kek() -> Kek {
        Kek::from_bytes(&[7u8; 32]).unwrap()
    }

    /// Two handles on one database, as two servers have: the SQLite file, or a fresh
    /// PostgreSQL database when a server can be started here.
    pub(crate) async fn replicas(dir: &std::path::Path, pg: Option<&str>) -> (Store, Store) {
        match pg {
            None => {
                let path = dir.join("shared.db");
                (
                    Store::sqlite(&path, kek()).unwrap(),
                    Store::sqlite(&path, kek()).unwrap(),
                )
            }
            Some(url) => {
                let opts = keyless_store::postgres::PgOptions::new(url.to_string());
                (
                    Store::postgres(&opts, kek()).await.unwrap(),
                    Store::postgres(&opts, kek()).await.unwrap(),
                )
            }
        }
    }

    async fn two_servers_bootstrap_once(a: Store, b: Store, dir: &std::path::Path) {
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (cfg_a, cfg_b) = (
            ServerConfig::new(dir.join("a"), listen),
            ServerConfig::new(dir.join("b"), listen),
        );
        let (ta, tb) = (
            tokio::spawn({
                let (a, cfg) = (a.clone(), cfg_a.clone());
                async move { bootstrap(&a, &cfg, "server-a", &SystemClock).await }
            }),
            tokio::spawn({
                let (b, cfg) = (b.clone(), cfg_b.clone());
                async move { bootstrap(&b, &cfg, "server-b", &SystemClock).await }
            }),
        );
        let (ba, ca_a, kv_a) = ta.await.unwrap().unwrap();
        let (bb, ca_b, kv_b) = tb.await.unwrap().unwrap();
        assert_eq!(ba.tenant_id, bb.tenant_id);
        assert_eq!(ba.subscription_id, bb.subscription_id);
        assert_eq!(ba.tenant_created, bb.tenant_created);
        assert_eq!(ba.admin_client_id, bb.admin_client_id);
        assert_eq!(ca_a.cert_der(), ca_b.cert_der());
        assert_eq!(kv_a.cert_der(), kv_b.cert_der());
        assert_ne!(ca_a.cert_der(), kv_a.cert_der());
        // the admin's secret is shown by the one server that created it
        assert_eq!(
            usize::from(ba.new_admin.is_some()) + usize::from(bb.new_admin.is_some()),
            1
        );
        let mut tx = a.read("test").await.unwrap();
        let sp = tx
            .get_service_principal(&ba.admin_client_id)
            .await
            .unwrap()
            .expect("the admin");
        let owner = tx
            .role_assignments_for_principal(&sp.object_id.to_ascii_lowercase())
            .await
            .unwrap();
        assert_eq!(owner.len(), 1, "{owner:?}");
        assert_eq!(
            owner[0].scope,
            format!("/subscriptions/{}", ba.subscription_id)
        );
        drop(tx);
        // the lease was given back: a later start goes ahead at once and finds it all
        let (bc, ca_c, _) = bootstrap(&b, &cfg_b, "server-c", &SystemClock)
            .await
            .unwrap();
        assert_eq!(bc.tenant_id, ba.tenant_id);
        assert!(bc.new_admin.is_none());
        assert_eq!(ca_c.cert_der(), ca_a.cert_der());

        // the TLS certificate: servers with the same SANs share it
        let sans = tls_sans(&["vault.localhost".into()]);
        let (chain_a, key_a) = tls_identity(&a, &ca_a, &sans, SystemClock.now())
            .await
            .unwrap();
        let (chain_b, key_b) = tls_identity(&b, &ca_b, &sans, SystemClock.now())
            .await
            .unwrap();
        assert_eq!((chain_a.clone(), key_a.clone()), (chain_b, key_b));
        assert_eq!(chain_a[1], ca_a.cert_der());
        // other SANs: a certificate of their own
        let other = tls_sans(&["other.example".into()]);
        let (chain_o, _) = tls_identity(&b, &ca_b, &other, SystemClock.now())
            .await
            .unwrap();
        assert_ne!(chain_o[0], chain_a[0]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_servers_on_one_sqlite_file_bootstrap_once() {
        keyless_pki::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = replicas(dir.path(), None).await;
        two_servers_bootstrap_once(a, b, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_servers_on_one_postgres_database_bootstrap_once() {
        let Some(pg) = keyless_store::testing::PgServer::start() else {
            return;
        };
        keyless_pki::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let url = pg.database().await;
        let (a, b) = replicas(dir.path(), Some(&url)).await;
        two_servers_bootstrap_once(a, b, dir.path()).await;
    }
}
