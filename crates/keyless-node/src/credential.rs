//! The host credential: key pair generated here, certificate issued by the server at join,
//! kept in the state directory (key 0600), rotated at two thirds of its lifetime.

use crate::upstream::{self, FAILOVER_CONNECT_TIMEOUT};
use crate::{NodeConfig, NodeError, Result};
use keyless_core::clock::Clock;
use keyless_ops::failover::Endpoints;
use keyless_store::crypto::write_private;
use serde_json::Value;
use std::path::Path;
use std::sync::RwLock;

struct Current {
    client: reqwest::Client,
    /// When this host received the certificate (its not_before is backdated for clock skew).
    received: u64,
    not_after: u64,
}

pub struct CredentialHolder {
    current: RwLock<Current>,
}

fn state_err(path: &Path, source: std::io::Error) -> NodeError {
    NodeError::State {
        path: path.display().to_string(),
        source,
    }
}

/// An HTTPS client trusting the Keyless CA (every replica serves the same one), presenting the
/// host credential when given. Each attempt connects within 5 s, or
/// [`FAILOVER_CONNECT_TIMEOUT`] when there are several server URLs to fail over to; a request
/// takes at most 15 s.
fn build_client(
    ca_pem: &str,
    client: Option<(&[u8], &[u8])>,
    servers: &Endpoints,
) -> Result<reqwest::Client> {
    let ca = keyless_pki::pem_blocks(ca_pem, "CERTIFICATE")
        .into_iter()
        .next()
        .ok_or_else(|| NodeError::Client("the CA file holds no certificate".into()))?;
    let tls = keyless_pki::client_tls_config(&ca, client)?;
    let connect_timeout = if servers.urls().len() > 1 {
        FAILOVER_CONNECT_TIMEOUT
    } else {
        std::time::Duration::from_secs(5)
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(std::time::Duration::from_secs(15))
        .connect_timeout(connect_timeout)
        .no_proxy()
        .build()
        .map_err(|e| NodeError::Client(e.to_string()))
}

/// POST `body` to `path` of the server (failing over between its URLs); the JSON of a 200.
async fn post_json(
    client: &reqwest::Client,
    servers: &Endpoints,
    path: &str,
    body: &Value,
) -> Result<Value> {
    let (url, resp) = upstream::send(servers, path, |url| client.post(url).json(body)).await;
    let resp = resp.map_err(|source| NodeError::Unreachable { url, source })?;
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if status != 200 {
        let message = v["error_description"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string());
        return Err(NodeError::Refused { status, message });
    }
    Ok(v)
}

impl CredentialHolder {
    /// The stored credential when it is still valid, else join with `cfg.join_token` (at the
    /// current server URL, failing over to the others).
    pub async fn load_or_join(
        cfg: &NodeConfig,
        servers: &Endpoints,
        clock: &dyn Clock,
    ) -> Result<Self> {
        let dir = &cfg.state_dir;
        keyless_store::files::private_dir(dir).map_err(|e| state_err(dir, e))?;
        let (key_path, cert_path) = (dir.join("host-key.pem"), dir.join("host-cert.pem"));
        let now = clock.now();
        if let (Ok(key), Ok(cert)) = (
            std::fs::read_to_string(&key_path),
            std::fs::read_to_string(&cert_path),
        ) {
            let key_der = keyless_pki::pem_blocks(&key, "PRIVATE KEY")
                .into_iter()
                .next();
            let cert_der = keyless_pki::pem_blocks(&cert, "CERTIFICATE")
                .into_iter()
                .next();
            if let (Some(k), Some(c)) = (key_der, cert_der) {
                let (nb, na) = keyless_pki::cert_validity(&c)?;
                if na > now + 60 {
                    let client = build_client(&cfg.ca_pem, Some((&c, &k)), servers)?;
                    let received = std::fs::metadata(&cert_path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs().clamp(nb, na))
                        .unwrap_or(nb);
                    return Ok(Self {
                        current: RwLock::new(Current {
                            client,
                            received,
                            not_after: na,
                        }),
                    });
                }
                tracing::warn!("stored host credential has expired; joining again");
            }
        }
        let token = cfg
            .join_token
            .as_deref()
            .ok_or_else(|| NodeError::NotJoined(dir.display().to_string()))?;
        let anon = build_client(&cfg.ca_pem, None, servers)?;
        let (csr, key) = keyless_pki::generate_csr("keyless-node")?;
        let resp = post_json(
            &anon,
            servers,
            "/keyless/host/v1/join",
            &serde_json::json!({"joinToken": token, "csr": csr}),
        )
        .await?;
        let current = Self::save(cfg, servers, &resp, &key, now)?;
        tracing::info!(vm = resp["vmResourceId"].as_str().unwrap_or(""), "joined");
        Ok(Self {
            current: RwLock::new(current),
        })
    }

    fn save(
        cfg: &NodeConfig,
        servers: &Endpoints,
        resp: &Value,
        key_der: &[u8],
        now: u64,
    ) -> Result<Current> {
        let dir = &cfg.state_dir;
        let cert_pem = resp["certificate"].as_str().unwrap_or_default();
        let cert = keyless_pki::pem_blocks(cert_pem, "CERTIFICATE")
            .into_iter()
            .next()
            .ok_or_else(|| NodeError::Client("the server returned no certificate".into()))?;
        let (_, na) = keyless_pki::cert_validity(&cert)?;
        let key_path = dir.join("host-key.pem");
        write_private(
            &key_path,
            keyless_pki::pem("PRIVATE KEY", key_der).as_bytes(),
        )
        .map_err(|e| NodeError::Client(format!("cannot write {}: {e}", key_path.display())))?;
        let cert_path = dir.join("host-cert.pem");
        write_private(&cert_path, cert_pem.as_bytes())
            .map_err(|e| NodeError::Client(format!("cannot write {}: {e}", cert_path.display())))?;
        let client = build_client(&cfg.ca_pem, Some((&cert, key_der)), servers)?;
        Ok(Current {
            client,
            received: now,
            not_after: na,
        })
    }

    /// The HTTPS client presenting the current credential.
    pub fn client(&self) -> reqwest::Client {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .client
            .clone()
    }

    /// When the current credential expires (Unix seconds).
    pub fn not_after(&self) -> u64 {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .not_after
    }

    /// Rotate when two thirds of the credential's lifetime have passed.
    pub async fn rotate_if_due(
        &self,
        cfg: &NodeConfig,
        servers: &Endpoints,
        clock: &dyn Clock,
    ) -> Result<bool> {
        let (received, na, client) = {
            let c = self.current.read().unwrap_or_else(|p| p.into_inner());
            (c.received, c.not_after, c.client.clone())
        };
        let now = clock.now();
        if now < keyless_core::refresh::rotate_credential_at(received, na) {
            return Ok(false);
        }
        let (csr, key) = keyless_pki::generate_csr("keyless-node")?;
        let resp = post_json(
            &client,
            servers,
            "/keyless/host/v1/rotate",
            &serde_json::json!({"csr": csr}),
        )
        .await?;
        let next = Self::save(cfg, servers, &resp, &key, now)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        tracing::info!("host credential rotated");
        Ok(true)
    }
}
