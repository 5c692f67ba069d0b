//! Tokens from IMDS and certificate secrets from the vault, and the PEM the agent writes.

use crate::settings::{Authentication, ObservedCertificate};
use crate::{Error, Result};
use base64::Engine;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Data-plane api-version the agent speaks.
pub const API_VERSION: &str = "7.4";
/// IMDS token api-version.
pub const IMDS_API_VERSION: &str = "2018-02-01";
/// A cached token is renewed this long before it expires.
const TOKEN_MARGIN: u64 = 300;
/// PKCS#12 content type.
pub const PKCS12: &str = "application/x-pkcs12";
/// PEM content type.
pub const PEM: &str = "application/x-pem-file";

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An error with its sources, for reqwest's terse top-level messages.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn network(url: &str, e: reqwest::Error) -> Error {
    Error::Network {
        url: url.to_string(),
        message: chain(&e),
    }
}

/// A certificate's secret as the vault returned it. `Debug` leaves the value out.
pub struct SecretBundle {
    /// The secret id, `https://<vault>/secrets/<name>/<version>`.
    pub id: String,
    /// The version segment of `id`.
    pub version: String,
    pub content_type: Option<String>,
    pub value: String,
}

impl std::fmt::Debug for SecretBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBundle")
            .field("id", &self.id)
            .field("version", &self.version)
            .field("content_type", &self.content_type)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// The version segment of a secret id: the segment after `/secrets/<name>/`.
pub fn version_of_id(id: &str) -> Option<String> {
    let path = id.split_once("://").map(|(_, r)| r).unwrap_or(id);
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match segs.as_slice() {
        [_, s, _, v] if s.eq_ignore_ascii_case("secrets") && !v.is_empty() => Some(v.to_string()),
        _ => None,
    }
}

/// The `resource` (or `scope` without `/.default`) a `WWW-Authenticate: Bearer …` challenge names.
pub fn challenge_resource(header: &str) -> Option<String> {
    let param = |name: &str| -> Option<String> {
        let lower = header.to_ascii_lowercase();
        let mut from = 0;
        while let Some(i) = lower[from..].find(name) {
            let at = from + i;
            let before_ok =
                at == 0 || lower.as_bytes()[at - 1] == b' ' || lower.as_bytes()[at - 1] == b',';
            let rest = &header[at + name.len()..];
            if before_ok {
                if let Some(rest) = rest.trim_start().strip_prefix('=') {
                    let rest = rest.trim_start();
                    let v = match rest.strip_prefix('"') {
                        Some(q) => q.split('"').next().unwrap_or_default(),
                        None => rest.split([',', ' ']).next().unwrap_or_default(),
                    };
                    if !v.is_empty() {
                        return Some(v.to_string());
                    }
                }
            }
            from = at + name.len();
        }
        None
    };
    param("resource")
        .or_else(|| param("scope").map(|s| s.strip_suffix("/.default").unwrap_or(&s).to_string()))
}

/// True when `resource` (an https URL) names `host` or one of its parent domains, as the
/// Azure SDKs' challenge-resource verification requires.
fn resource_fits_host(resource: &str, host: &str) -> bool {
    let Some(rest) = resource
        .get(..8)
        .filter(|s| s.eq_ignore_ascii_case("https://"))
        .map(|_| &resource[8..])
    else {
        return false;
    };
    let rhost = rest
        .split(['/', ':'])
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    !rhost.is_empty() && (host == rhost || host.ends_with(&format!(".{rhost}")))
}

struct CachedToken {
    token: String,
    /// Unix time after which the token is fetched again.
    refresh_at: u64,
}

/// Managed-identity tokens from an IMDS endpoint, cached per resource until 5 minutes before
/// they expire. Used by the certificate sync agent and by the pod-identity add-on.
pub struct ImdsTokens {
    client: reqwest::Client,
    auth: Authentication,
    tokens: HashMap<String, CachedToken>,
}

/// HTTP clients for IMDS and the vaults, and the token cache (per resource).
pub struct VaultClient {
    imds: ImdsTokens,
    vault: reqwest::Client,
}

impl ImdsTokens {
    /// Tokens from `auth.token_endpoint` (plain HTTP, never through a proxy).
    /// `resolve`: host name → address overrides (the URL's port is used).
    pub fn new(auth: Authentication, resolve: &[(String, SocketAddr)]) -> Result<Self> {
        let mut client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10));
        for (host, addr) in resolve {
            client = client.resolve(&host.to_ascii_lowercase(), *addr);
        }
        Ok(Self {
            client: client.build().map_err(|e| Error::Client(chain(&e)))?,
            auth,
            tokens: HashMap::new(),
        })
    }

    /// Forget the cached token of `resource` (the resource refused it).
    pub fn forget(&mut self, resource: &str) {
        self.tokens.remove(resource);
    }

    /// A token for `resource`, from the cache until 5 minutes before it expires.
    pub async fn token(&mut self, resource: &str) -> Result<String> {
        let now = unix_now();
        if let Some(t) = self.tokens.get(resource) {
            if now < t.refresh_at {
                return Ok(t.token.clone());
            }
        }
        let endpoint = &self.auth.token_endpoint;
        let mut url = reqwest::Url::parse(endpoint).map_err(|e| Error::Token {
            endpoint: endpoint.clone(),
            message: format!("bad endpoint URL: {e}"),
        })?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("api-version", IMDS_API_VERSION);
            q.append_pair("resource", resource);
            if let Some(c) = &self.auth.client_id {
                q.append_pair("client_id", c);
            }
        }
        let resp = self
            .client
            .get(url)
            .header("Metadata", "true")
            .send()
            .await
            .map_err(|e| network(endpoint, e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| network(endpoint, e))?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = match (v["error"].as_str(), v["error_description"].as_str()) {
                (Some(e), Some(d)) => format!("HTTP {} {e}: {d}", status.as_u16()),
                (Some(e), None) => format!("HTTP {} {e}", status.as_u16()),
                _ => format!(
                    "HTTP {}: {}",
                    status.as_u16(),
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ),
            };
            return Err(Error::Token {
                endpoint: endpoint.clone(),
                message,
            });
        }
        let token = v["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Token {
                endpoint: endpoint.clone(),
                message: "the response has no access_token".into(),
            })?
            .to_string();
        let num = |k: &str| -> Option<u64> {
            match &v[k] {
                Value::String(s) => s.trim().parse().ok(),
                Value::Number(n) => n.as_u64(),
                _ => None,
            }
        };
        let expires_on = num("expires_on").or_else(|| num("expires_in").map(|s| now + s));
        let refresh_at = expires_on
            .map(|e| e.saturating_sub(TOKEN_MARGIN))
            .unwrap_or(now);
        tracing::debug!(resource, refresh_at, "got a token from IMDS");
        self.tokens.insert(
            resource.to_string(),
            CachedToken {
                token: token.clone(),
                refresh_at,
            },
        );
        Ok(token)
    }
}

impl VaultClient {
    /// `ca_pem`: the only roots trusted for the vault's TLS (default: the platform's).
    /// `resolve`: host name → address overrides (the URL's port is used).
    pub fn new(
        auth: Authentication,
        ca_pem: Option<&str>,
        resolve: &[(String, SocketAddr)],
    ) -> Result<Self> {
        let mut vault = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| Error::Client(format!("the CA PEM: {}", chain(&e))))?;
            if certs.is_empty() {
                return Err(Error::Client("the CA PEM holds no certificate".into()));
            }
            vault = vault.tls_certs_only(certs);
        }
        for (host, addr) in resolve {
            vault = vault.resolve(&host.to_ascii_lowercase(), *addr);
        }
        Ok(Self {
            imds: ImdsTokens::new(auth, resolve)?,
            vault: vault.build().map_err(|e| Error::Client(chain(&e)))?,
        })
    }

    /// A token for `resource` (see [`ImdsTokens::token`]).
    pub async fn token(&mut self, resource: &str) -> Result<String> {
        self.imds.token(resource).await
    }

    /// GET the certificate's secret. A 401 with a challenge is answered once with a token
    /// for the challenge's resource (a fresh one when it is the same resource).
    pub async fn get_secret(&mut self, cert: &ObservedCertificate) -> Result<SecretBundle> {
        let url = cert.secret_url();
        let mut resource = cert.resource();
        let mut retried = false;
        loop {
            let token = self.token(&resource).await?;
            let resp = self
                .vault
                .get(format!("{url}?api-version={API_VERSION}"))
                .bearer_auth(&token)
                .send()
                .await
                .map_err(|e| network(&url, e))?;
            let status = resp.status().as_u16();
            if status == 401 && !retried {
                retried = true;
                let challenged = resp
                    .headers()
                    .get_all(reqwest::header::WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|h| h.to_str().ok())
                    .find_map(challenge_resource);
                self.imds.forget(&resource);
                if let Some(r) = challenged {
                    if !resource_fits_host(&r, &cert.host) {
                        return Err(Error::Content {
                            url,
                            message: format!(
                                "the vault's challenge names the resource '{r}', which is not a parent domain of the vault host; refusing to send it a token"
                            ),
                        });
                    }
                    tracing::debug!(url, resource = %r, "401 challenge: retrying with its resource");
                    resource = r;
                }
                continue;
            }
            let body = resp.bytes().await.map_err(|e| network(&url, e))?;
            if !(200..300).contains(&status) {
                return Err(vault_error(&url, status, &body));
            }
            let v: Value = serde_json::from_slice(&body).map_err(|_| Error::Content {
                url: url.clone(),
                message: "the response is not JSON".into(),
            })?;
            let id = v["id"].as_str().unwrap_or_default().to_string();
            let version = version_of_id(&id).ok_or_else(|| Error::Content {
                url: url.clone(),
                message: format!("the secret id '{id}' has no version"),
            })?;
            let value = v["value"]
                .as_str()
                .ok_or_else(|| Error::Content {
                    url: url.clone(),
                    message: "the secret has no value".into(),
                })?
                .to_string();
            return Ok(SecretBundle {
                id,
                version,
                content_type: v["contentType"].as_str().map(str::to_string),
                value,
            });
        }
    }
}

/// A non-2xx vault answer: `{"error":{"code","message","innererror":{"code"}}}`.
fn vault_error(url: &str, status: u16, body: &[u8]) -> Error {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let code = e["code"].as_str().unwrap_or_default().to_string();
    let inner = e["innererror"]["code"].as_str().map(str::to_string);
    let message = match e["message"].as_str() {
        Some(m) => m.to_string(),
        None => String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
    };
    Error::Vault {
        url: url.to_string(),
        status,
        code,
        inner,
        message,
    }
}

/// The PEM the agent writes, and what is in it.
pub struct CertPem {
    /// Leaf, chain (each certifying the previous), private key last.
    pub text: String,
    pub certificates: usize,
    pub has_key: bool,
    /// The leaf's `notAfter` (Unix seconds).
    pub not_after: Option<i64>,
}

impl std::fmt::Debug for CertPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPem")
            .field("certificates", &self.certificates)
            .field("has_key", &self.has_key)
            .finish_non_exhaustive()
    }
}

/// Convert a certificate secret to the on-disk PEM: `application/x-pkcs12` is a base64 PFX
/// with an empty password, `application/x-pem-file` PEM text (without a content type, the
/// value is sniffed). Output: leaf, then its issuers, then any other certificate, then the
/// PKCS#8 private key. A certificate whose key is not exportable gives certificates only.
pub fn to_pem(content_type: Option<&str>, value: &str) -> std::result::Result<CertPem, String> {
    let ct = content_type.map(|c| c.trim().to_ascii_lowercase());
    let is_pem = match ct.as_deref() {
        Some(PEM) => true,
        Some(PKCS12) => false,
        Some(other) if !other.is_empty() => {
            return Err(format!(
                "the secret's content type '{other}' is not a certificate ({PKCS12} or {PEM})"
            ))
        }
        _ => value.trim_start().starts_with("-----BEGIN"),
    };
    let (key, certs) = if is_pem {
        keyless_pki::kv::parse_pem(value).map_err(|e| format!("the PEM value: {e}"))?
    } else {
        let compact: String = value.chars().filter(|c| !c.is_whitespace()).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|_| "the PKCS#12 value is not base64".to_string())?;
        keyless_pki::kv::parse_pfx(&der, "").map_err(|e| format!("the PKCS#12 value: {e}"))?
    };
    let Some(leaf) = certs.first() else {
        return Err("the secret holds no certificate".into());
    };
    if let Some(k) = &key {
        if !keyless_pki::kv::cert_matches_key(leaf, k) {
            return Err("the private key matches none of the certificates".into());
        }
    }
    let mut text = String::new();
    for c in &certs {
        text.push_str(&keyless_pki::pem("CERTIFICATE", c));
    }
    if let Some(k) = &key {
        text.push_str(&keyless_pki::pem("PRIVATE KEY", k.pkcs8()));
    }
    Ok(CertPem {
        text,
        certificates: certs.len(),
        has_key: key.is_some(),
        not_after: keyless_pki::cert_validity(leaf)
            .ok()
            .map(|(_, na)| na as i64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyless_pki::kv::{self, CertSpec, KeyType, KvKey};

    /// (leaf key, [leaf, CA]) with the leaf issued by a fresh CA.
    pub(crate) fn chain() -> (KvKey, Vec<Vec<u8>>) {
        let now = unix_now();
        let (ca, _) = keyless_pki::Ca::generate("Test CA", now - 60).unwrap();
        let key = KvKey::generate(KeyType::Rsa { bits: 2048 }).unwrap();
        let spec = CertSpec {
            subject: "CN=app.example".into(),
            dns_names: vec!["app.example".into()],
            not_before: now - 60,
            not_after: now + 30 * 86_400,
            ..Default::default()
        };
        let leaf = ca.issue_for_spec(&spec, &key).unwrap();
        (key, vec![leaf, ca.cert_der().to_vec()])
    }

    fn labels(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("-----BEGIN "))
            .map(|l| l.trim_end_matches('-').to_string())
            .collect()
    }

    fn check_order(pem: &CertPem, key: &KvKey, chain: &[Vec<u8>]) {
        assert_eq!(
            labels(&pem.text),
            ["CERTIFICATE", "CERTIFICATE", "PRIVATE KEY"]
        );
        assert!(pem.text.ends_with("-----END PRIVATE KEY-----\n"));
        let certs = keyless_pki::pem_blocks(&pem.text, "CERTIFICATE");
        assert_eq!(certs, chain, "leaf first, then its issuer");
        assert!(kv::cert_matches_key(&certs[0], key));
        let written = keyless_pki::pem_blocks(&pem.text, "PRIVATE KEY");
        assert_eq!(written, vec![key.pkcs8().to_vec()]);
        let (k, c) = kv::parse_pem(&pem.text).unwrap();
        assert!(kv::cert_matches_key(&c[0], &k.unwrap()));
        assert_eq!(pem.certificates, 2);
        assert!(pem.has_key);
    }

    #[test]
    fn pfx_becomes_leaf_chain_key() {
        let (key, chain) = chain();
        let pfx = kv::build_pfx(Some(&key), &chain).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(pfx);
        let pem = to_pem(Some(PKCS12), &b64).unwrap();
        check_order(&pem, &key, &chain);
        // Sniffed without a content type, too.
        check_order(&to_pem(None, &b64).unwrap(), &key, &chain);
    }

    #[test]
    fn pem_bundle_is_reordered_key_last() {
        let (key, chain) = chain();
        // Key Vault's PEM form: key first, then certificates; give the chain reversed too.
        let mut reversed = chain.clone();
        reversed.reverse();
        let bundle = kv::build_pem(Some(&key), &reversed);
        assert!(bundle.starts_with("-----BEGIN PRIVATE KEY-----"));
        let pem = to_pem(Some(PEM), &bundle).unwrap();
        check_order(&pem, &key, &chain);
        check_order(&to_pem(None, &bundle).unwrap(), &key, &chain);
    }

    #[test]
    fn certificates_only_and_refusals() {
        let (key, chain) = chain();
        let pfx = kv::build_pfx(None, &chain).unwrap();
        let pem = to_pem(
            Some(PKCS12),
            &base64::engine::general_purpose::STANDARD.encode(pfx),
        )
        .unwrap();
        assert!(!pem.has_key);
        assert_eq!(labels(&pem.text), ["CERTIFICATE", "CERTIFICATE"]);
        assert!(to_pem(Some("text/plain"), "hello")
            .unwrap_err()
            .contains("not a certificate"));
        assert!(to_pem(Some(PKCS12), "***").unwrap_err().contains("base64"));
        assert!(to_pem(Some(PEM), "no pem here").is_err());
        // A key that matches no certificate.
        let other = KvKey::generate(KeyType::Rsa { bits: 2048 }).unwrap();
        let mut bundle = keyless_pki::pem("PRIVATE KEY", other.pkcs8());
        bundle.push_str(&keyless_pki::pem("CERTIFICATE", &chain[0]));
        assert!(to_pem(Some(PEM), &bundle)
            .unwrap_err()
            .contains("matches none"));
        drop(key);
    }

    #[test]
    fn versions_and_challenges() {
        assert_eq!(
            version_of_id("https://kv.vault.localhost:8443/secrets/web/0123abcd").as_deref(),
            Some("0123abcd")
        );
        assert_eq!(
            version_of_id("https://kv.vault.azure.net/secrets/web"),
            None
        );
        assert_eq!(version_of_id("https://kv.vault.azure.net/keys/web/1"), None);
        assert_eq!(
            challenge_resource(
                r#"Bearer authorization="https://login.example/tenant", resource="https://vault.localhost:8443""#
            )
            .as_deref(),
            Some("https://vault.localhost:8443")
        );
        assert_eq!(
            challenge_resource(
                r#"Bearer authorization="https://login.microsoftonline.com/t", scope="https://vault.azure.net/.default""#
            )
            .as_deref(),
            Some("https://vault.azure.net")
        );
        assert_eq!(challenge_resource("Basic realm=x"), None);
        assert!(resource_fits_host(
            "https://vault.localhost:8443",
            "kv.vault.localhost"
        ));
        assert!(resource_fits_host(
            "https://vault.azure.net",
            "KV.vault.azure.net"
        ));
        assert!(!resource_fits_host(
            "https://management.azure.com",
            "kv.vault.azure.net"
        ));
        assert!(!resource_fits_host(
            "https://ault.azure.net",
            "kv.vault.azure.net"
        ));
        assert!(!resource_fits_host(
            "http://vault.azure.net",
            "kv.vault.azure.net"
        ));
    }

    #[test]
    fn vault_errors_carry_code_and_message() {
        let body = br#"{"error":{"code":"Forbidden","message":"no get permission","innererror":{"code":"ForbiddenByPolicy"}}}"#;
        let e = vault_error("https://kv.vault.azure.net/secrets/a", 403, body);
        let s = e.to_string();
        assert!(
            s.contains("403") && s.contains("ForbiddenByPolicy") && s.contains("no get permission"),
            "{s}"
        );
        assert_eq!(e.code(), 403);
        let e = vault_error("https://kv.vault.azure.net/secrets/a", 404, br#"{"error":{"code":"SecretNotFound","message":"A secret with (name/id) a was not found in this key vault."}}"#);
        assert!(e.to_string().contains("404 SecretNotFound"), "{e}");
    }
}
