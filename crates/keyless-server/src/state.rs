//! Server configuration, shared state, and first-start bootstrap (tenant, subscription, CA,
//! TLS certificate, signing key, bootstrap admin).

use crate::error::{Result, ServerError};
use crate::keys::KeyRing;
use crate::util::{new_guid, random_b64url};
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
    pub keys: KeyRing,
    pub ca: Ca,
    /// Signs certificates of the Key Vault `Keyless` issuer (not trusted by the platform).
    pub kv_ca: Ca,
    /// Client for external OIDC issuers (federated credentials).
    pub http: reqwest::Client,
    pub jwks: crate::federation::JwksCache,
    /// Time of the Key Vault (certificate validity, lifetime actions, soft delete).
    pub vault_clock: crate::kv::VaultClock,
    /// Tokens whose signature was already checked.
    pub verified: crate::tokens::VerifiedTokens,
}

impl AppState {
    pub fn now(&self) -> u64 {
        self.clock.now()
    }
    /// `iss` of v1 tokens (the form managed-identity tokens carry).
    pub fn issuer_v1(&self) -> String {
        format!("{}/{}/", self.base_url, self.tenant_id)
    }
    pub fn issuer_v2(&self) -> String {
        format!("{}/{}/v2.0", self.base_url, self.tenant_id)
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

/// The host name of this machine.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Load a CA kept as `<prefix>_cert` (meta, public) and `<prefix>_key` (sealed), or create it.
fn load_or_create_ca(store: &dyn Store, prefix: &str, common_name: &str, now: u64) -> Result<Ca> {
    let (cert_meta, key_name) = (format!("{prefix}_cert"), format!("{prefix}_key"));
    Ok(
        match (store.get_meta(&cert_meta)?, store.get_secret(&key_name)?) {
            (Some(cert_b64), Some(key)) => {
                let cert = STANDARD
                    .decode(cert_b64)
                    .map_err(|e| keyless_store::StoreError::Corrupt(e.to_string()))?;
                Ca::load(&cert, &key)?
            }
            _ => {
                let (ca, key) = Ca::generate(common_name, now)?;
                store.put_secret(&key_name, &key)?;
                store.set_meta(&cert_meta, &STANDARD.encode(ca.cert_der()))?;
                ca
            }
        },
    )
}

/// Create (first start) or load the tenant, subscription, CA and admin.
pub fn bootstrap(store: &dyn Store, cfg: &ServerConfig, now: u64) -> Result<(Bootstrap, Ca, Ca)> {
    let tenant_id = match store.get_meta("tenant_id")? {
        Some(t) => t,
        None => {
            let t = new_guid();
            store.set_meta("tenant_id", &t)?;
            store.set_meta("tenant_created", &now.to_string())?;
            store.set_meta("subscription_id", &new_guid())?;
            t
        }
    };
    let subscription_id = store.get_meta("subscription_id")?.unwrap_or_default();
    let tenant_created = store
        .get_meta("tenant_created")?
        .and_then(|s| s.parse().ok())
        .unwrap_or(now);

    // CA: certificate in meta (public), key encrypted.
    let ca = load_or_create_ca(
        store,
        "ca",
        &format!("Keyless Root CA {}", &tenant_id[..8]),
        now,
    )?;
    // Key Vault's "Keyless" issuer signs with a CA of its own: nothing in the platform trusts
    // it for its TLS, so a certificate a vault user obtains cannot impersonate the server.
    let kv_ca = load_or_create_ca(
        store,
        "kv_ca",
        &format!("Keyless Key Vault CA {}", &tenant_id[..8]),
        now,
    )?;
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

    let (new_admin, admin_client_id) = match store.get_meta("admin_client_id")? {
        Some(id) => (None, id),
        None => {
            let client_id = new_guid();
            let secret = random_b64url(32);
            store.put_service_principal(&ServicePrincipalRecord {
                client_id: client_id.clone(),
                object_id: new_guid(),
                display_name: "keyless-bootstrap-admin".into(),
                secret_sha256: keyless_pki::sha256_hex(secret.as_bytes()),
                certificates: vec![],
                created: now,
            })?;
            store.set_meta("admin_client_id", &client_id)?;
            (
                Some(AdminCredential {
                    client_id: client_id.clone(),
                    client_secret: secret,
                }),
                client_id,
            )
        }
    };
    // The bootstrap admin is Owner of the subscription (once: a later removal is respected).
    if store.get_meta("admin_owner_assigned")?.is_none() {
        if let Some(sp) = store.get_service_principal(&admin_client_id)? {
            let role = keyless_core::rbac::role_by_id(keyless_core::rbac::OWNER)
                .map(|r| r.id)
                .unwrap_or_default();
            store.insert_role_assignment(&keyless_store::RoleAssignmentRecord {
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
            })?;
        }
        store.set_meta("admin_owner_assigned", "1")?;
    }
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

/// Load or (re)issue the TLS server certificate for `sans`; returns (chain DER, key DER).
pub fn tls_identity(
    store: &dyn Store,
    ca: &Ca,
    sans: &[String],
    now: u64,
) -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
    let wanted = sans.join(",");
    if let (Some(have), Some(cert_b64), Some(key)) = (
        store.get_meta("tls_sans")?,
        store.get_meta("tls_cert")?,
        store.get_secret("tls_key")?,
    ) {
        let cert = STANDARD
            .decode(cert_b64)
            .map_err(|e| keyless_store::StoreError::Corrupt(e.to_string()))?;
        let fresh = keyless_pki::cert_validity(&cert)
            .map(|(_, na)| na > now + 30 * 86_400)
            .unwrap_or(false);
        if have == wanted && fresh {
            return Ok((vec![cert, ca.cert_der().to_vec()], key));
        }
    }
    let (cert, key) = ca.issue_server_cert(sans, now, 365 * 86_400)?;
    store.put_secret("tls_key", &key)?;
    store.set_meta("tls_cert", &STANDARD.encode(&cert))?;
    store.set_meta("tls_sans", &wanted)?;
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
