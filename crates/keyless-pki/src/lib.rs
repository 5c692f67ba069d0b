//! Keyless PKI and signing, on aws-lc-rs:
//! - [`Ca`]: the root CA generated at first start; issues the TLS server certificate and host
//!   client certificates (from CSRs, so a host's private key never leaves the host).
//! - [`SigningKey`]: RS256 token-signing keys with a CA-issued certificate (for `x5c`/`x5t`).
//! - [`verify_rs256`]: signature check for our own tokens.
//! - TLS configurations for the server (optional client auth) and the agent (client auth).
//! - [`kv`]: Key Vault key and certificate cryptography (JWS/JWE-style key operations,
//!   certificates from a policy, PFX and PEM bundles).

pub mod kv;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{self, KeyPair as _, RsaKeyPair};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid key material")]
    InvalidKey,
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    #[error("invalid certificate signing request")]
    InvalidCsr,
    #[error("signing failed")]
    Sign,
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("PKCS#12: {0}")]
    Pkcs12(String),
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

type Result<T> = std::result::Result<T, PkiError>;

fn at(unix: u64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(unix as i64)
        .map_err(|e| PkiError::InvalidCertificate(e.to_string()))
}

/// Lowercase hex SHA-256 of DER bytes (host credential fingerprint).
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, der))
}

/// SHA-256 digest.
pub fn sha256(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, data).as_ref().to_vec()
}

/// base64url SHA-1 thumbprint of a certificate (`x5t`, and our `kid`).
pub fn x5t(cert_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, cert_der))
}

/// Encode DER as PEM with the given label.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Decode every PEM block with `label` from `text`.
pub fn pem_blocks(text: &str, label: &str) -> Vec<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(b) = rest.find(&begin) {
        let after = &rest[b + begin.len()..];
        let Some(e) = after.find(&end) else { break };
        let body: String = after[..e].chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = STANDARD.decode(body) {
            out.push(der);
        }
        rest = &after[e + end.len()..];
    }
    out
}

/// The DER of the first certificate signing request in a PEM text.
fn csr_der(csr_pem: &str) -> Result<Vec<u8>> {
    pem_blocks(csr_pem, "CERTIFICATE REQUEST")
        .into_iter()
        .next()
        .ok_or(PkiError::InvalidCsr)
}

/// A certificate signing request parsed (its signature not checked).
fn parse_csr(der: &[u8]) -> Result<X509CertificationRequest<'_>> {
    use x509_parser::prelude::FromDer;
    let (_, csr) = X509CertificationRequest::from_der(der).map_err(|_| PkiError::InvalidCsr)?;
    Ok(csr)
}

/// SHA-256 (hex) of the public key a PEM certificate signing request carries (its
/// SubjectPublicKeyInfo). The request's signature is not checked here: signing it does that.
pub fn csr_key_sha256(csr_pem: &str) -> Result<String> {
    let der = csr_der(csr_pem)?;
    let csr = parse_csr(&der)?;
    Ok(sha256_hex(csr.certification_request_info.subject_pki.raw))
}

/// The root CA.
pub struct Ca {
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Generate a new ECDSA P-256 root CA valid from `now` for 10 years.
    pub fn generate(common_name: &str, now: u64) -> Result<(Self, Vec<u8>)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Keyless");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = at(now.saturating_sub(3600))?;
        params.not_after = at(now + 10 * 365 * 86_400)?;
        let cert = params.self_signed(&key)?;
        let key_der = key.serialize_der();
        let cert_der = cert.der().to_vec();
        Ok((Self::load(&cert_der, &key_der)?, key_der))
    }

    /// Load from the certificate DER and the PKCS#8 key DER.
    pub fn load(cert_der: &[u8], key_pkcs8: &[u8]) -> Result<Self> {
        let key = KeyPair::try_from(key_pkcs8).map_err(|_| PkiError::InvalidKey)?;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert_der.to_vec()), key)?;
        Ok(Self {
            cert_der: cert_der.to_vec(),
            issuer,
        })
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> String {
        pem("CERTIFICATE", &self.cert_der)
    }

    /// Issue an ECDSA P-256 TLS server certificate for `sans` (DNS names or IP addresses).
    /// Returns (certificate DER, PKCS#8 key DER).
    pub fn issue_server_cert(
        &self,
        sans: &[String],
        now: u64,
        lifetime: u64,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = server_params(sans)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = at(now.saturating_sub(300))?;
        params.not_after = at(now + lifetime)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.der().to_vec(), key.serialize_der()))
    }

    /// Issue a client certificate for the public key in `csr_pem`. Only the key is taken from
    /// the CSR; the subject is ours: CN = `subject`, URI SAN = `uri`.
    pub fn sign_client_csr(
        &self,
        csr_pem: &str,
        subject: &str,
        uri: &str,
        now: u64,
        lifetime: u64,
    ) -> Result<Vec<u8>> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|_| PkiError::InvalidCsr)?;
        let mut params = params_for(subject)?;
        params.subject_alt_names =
            vec![SanType::URI(uri.to_string().try_into().map_err(|_| {
                PkiError::InvalidCertificate("bad URI SAN".into())
            })?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = at(now.saturating_sub(300))?;
        params.not_after = at(now + lifetime)?;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.der().to_vec())
    }

    /// Issue a TLS server certificate for the public key in `csr_pem` (its signature checked):
    /// only the key is taken from the request; the names are `sans` (DNS names or IP addresses,
    /// the first also the subject's CN), key usage digitalSignature + keyEncipherment, EKU
    /// serverAuth, valid from `not_before` to `not_after` (Unix seconds), a random serial.
    pub fn sign_server_csr(
        &self,
        csr_pem: &str,
        sans: &[String],
        not_before: u64,
        not_after: u64,
    ) -> Result<Vec<u8>> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|_| PkiError::InvalidCsr)?;
        let mut params = server_params(sans)?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = at(not_before)?;
        params.not_after = at(not_after)?;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.der().to_vec())
    }

    /// Issue a certificate for a token-signing key (so JWKS can carry `x5c`).
    fn issue_for_key(&self, key: &KeyPair, cn: &str, now: u64, lifetime: u64) -> Result<Vec<u8>> {
        let mut params = params_for(cn)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = at(now.saturating_sub(300))?;
        params.not_after = at(now + lifetime)?;
        Ok(params.signed_by(key, &self.issuer)?.der().to_vec())
    }
}

/// Certificate parameters with the subject `CN={cn}` and nothing else set.
fn params_for(cn: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    Ok(params)
}

/// Certificate parameters naming a TLS server: `sans` (DNS names or IP addresses), the first
/// also the subject's CN.
fn server_params(sans: &[String]) -> Result<CertificateParams> {
    let mut params = params_for(sans.first().map_or("", String::as_str))?;
    for s in sans {
        params.subject_alt_names.push(san_of(s)?);
    }
    Ok(params)
}

/// A random positive 128-bit serial number.
fn random_serial() -> Result<rcgen::SerialNumber> {
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(|_| PkiError::Sign)?;
    serial[0] &= 0x7f;
    Ok(serial.to_vec().into())
}

/// A fresh ECDSA P-256 key and a CSR of `params` for it: (CSR PEM, PKCS#8 key DER).
fn csr_for_new_key(params: &CertificateParams) -> Result<(String, Vec<u8>)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_der()))
}

/// A DNS name or IP address as a SAN.
fn san_of(s: &str) -> Result<SanType> {
    Ok(match s.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(
            s.to_string()
                .try_into()
                .map_err(|_| PkiError::InvalidCertificate(format!("bad SAN {s}")))?,
        ),
    })
}

/// The subject alternative names a PEM certificate signing request asks for (its requested
/// extensions), DNS names and IP addresses as text, in order. Any other kind of name (URI,
/// e-mail, …) is refused, as is a request that cannot be parsed; its signature is checked when
/// it is signed ([`Ca::sign_server_csr`]).
pub fn csr_sans(csr_pem: &str) -> Result<Vec<String>> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let der = csr_der(csr_pem)?;
    let csr = parse_csr(&der)?;
    let mut out = vec![];
    for ext in csr.requested_extensions().into_iter().flatten() {
        let ParsedExtension::SubjectAlternativeName(san) = ext else {
            continue;
        };
        for name in &san.general_names {
            out.push(match name {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                        .to_string(),
                    16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                        .to_string(),
                    _ => {
                        return Err(PkiError::InvalidInput(
                            "an IP address SAN of a bad length".into(),
                        ))
                    }
                },
                other => {
                    return Err(PkiError::InvalidInput(format!(
                    "unsupported subject alternative name {other}: DNS names and IP addresses only"
                )))
                }
            });
        }
    }
    Ok(out)
}

/// A fresh ECDSA P-256 key and a CSR for it (the agent's side of joining).
/// Returns (CSR PEM, PKCS#8 key DER).
pub fn generate_csr(common_name: &str) -> Result<(String, Vec<u8>)> {
    csr_for_new_key(&params_for(common_name)?)
}

/// A fresh ECDSA P-256 key and a CSR for it asking for `sans` (DNS names or IP addresses; the
/// first is also the CN): a TLS server's side of [`Ca::sign_server_csr`]. Returns (CSR PEM,
/// PKCS#8 key DER).
pub fn generate_server_csr(sans: &[String]) -> Result<(String, Vec<u8>)> {
    csr_for_new_key(&server_params(sans)?)
}

/// Validity of a certificate as Unix seconds (not_before, not_after).
pub fn cert_validity(cert_der: &[u8]) -> Result<(u64, u64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
    let v = cert.validity();
    Ok((
        v.not_before.timestamp().max(0) as u64,
        v.not_after.timestamp().max(0) as u64,
    ))
}

/// An RS256 token-signing key.
pub struct SigningKey {
    kid: String,
    key: RsaKeyPair,
    cert_der: Vec<u8>,
}

/// A JWKS entry (`../shared/spec/identity-protocols.md` §5.4).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Jwk {
    pub kty: String,
    #[serde(rename = "use")]
    pub use_: String,
    pub kid: String,
    pub x5t: String,
    pub n: String,
    pub e: String,
    pub x5c: Vec<String>,
}

impl SigningKey {
    /// Generate a new RSA-2048 key with a CA-issued certificate valid for `cert_lifetime`.
    /// Returns the key and its PKCS#8 DER (to be stored encrypted).
    pub fn generate(ca: &Ca, now: u64, cert_lifetime: u64) -> Result<(Self, Vec<u8>)> {
        let key = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?;
        let cert_der = ca.issue_for_key(&key, "Keyless token signing", now, cert_lifetime)?;
        let der = key.serialize_der();
        Ok((Self::load(&der, &cert_der)?, der))
    }

    pub fn load(key_pkcs8: &[u8], cert_der: &[u8]) -> Result<Self> {
        let key = RsaKeyPair::from_pkcs8(key_pkcs8).map_err(|_| PkiError::InvalidKey)?;
        Ok(Self {
            kid: x5t(cert_der),
            key,
            cert_der: cert_der.to_vec(),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// RS256 (RSASSA-PKCS1-v1_5 with SHA-256) over `input`.
    pub fn sign(&self, input: &[u8]) -> Result<Vec<u8>> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(&signature::RSA_PKCS1_SHA256, &rng, input, &mut sig)
            .map_err(|_| PkiError::Sign)?;
        Ok(sig)
    }

    /// The public key as a JWK with the certificate chain.
    pub fn jwk(&self) -> Jwk {
        let pk = self.key.public_key();
        let comps: signature::RsaPublicKeyComponents<Vec<u8>> = pk.into();
        Jwk {
            kty: "RSA".into(),
            use_: "sig".into(),
            kid: self.kid.clone(),
            x5t: self.kid.clone(),
            n: URL_SAFE_NO_PAD.encode(trim_zeros(&comps.n)),
            e: URL_SAFE_NO_PAD.encode(trim_zeros(&comps.e)),
            x5c: vec![STANDARD.encode(&self.cert_der)],
        }
    }

    /// Public key material for verification.
    pub fn public(&self) -> RsaPublic {
        let comps: signature::RsaPublicKeyComponents<Vec<u8>> = self.key.public_key().into();
        RsaPublic {
            n: comps.n,
            e: comps.e,
        }
    }
}

fn trim_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[i..]
}

/// An RSA public key (modulus and exponent, big-endian).
#[derive(Debug, Clone)]
pub struct RsaPublic {
    pub n: Vec<u8>,
    pub e: Vec<u8>,
}

/// Verify an RS256 signature.
pub fn verify_rs256(key: &RsaPublic, input: &[u8], sig: &[u8]) -> bool {
    let comps = signature::RsaPublicKeyComponents {
        n: &key.n,
        e: &key.e,
    };
    comps
        .verify(&signature::RSA_PKCS1_2048_8192_SHA256, input, sig)
        .is_ok()
}

/// The RSA public key of a certificate, if it has one.
pub fn cert_rsa_public(cert_der: &[u8]) -> Option<RsaPublic> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    match cert.public_key().parsed().ok()? {
        x509_parser::public_key::PublicKey::RSA(k) => Some(RsaPublic {
            n: trim_zeros(k.modulus).to_vec(),
            e: trim_zeros(k.exponent).to_vec(),
        }),
        _ => None,
    }
}

/// SHA-1 digest (certificate thumbprints, `x5t`).
pub fn sha1(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, data)
        .as_ref()
        .to_vec()
}

/// Verify an RSA signature: `RS256` (PKCS#1 v1.5) or `PS256` (PSS), SHA-256.
pub fn verify_rsa(key: &RsaPublic, alg: &str, input: &[u8], sig: &[u8]) -> bool {
    let params: &signature::RsaParameters = match alg {
        "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
        "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
        _ => return false,
    };
    signature::RsaPublicKeyComponents {
        n: &key.n,
        e: &key.e,
    }
    .verify(params, input, sig)
    .is_ok()
}

/// Install aws-lc-rs as rustls' process-wide provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Server TLS configuration: our certificate chain, and client certificates optionally
/// accepted when issued by `client_ca` (hosts authenticate with them).
pub fn server_tls_config(
    chain: Vec<Vec<u8>>,
    key_pkcs8: &[u8],
    client_ca: &[u8],
) -> Result<Arc<rustls::ServerConfig>> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(client_ca.to_vec()))
        .map_err(PkiError::Tls)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
    let certs = chain.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
    let mut cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client TLS configuration trusting only `ca_der`, optionally presenting a client
/// certificate (the host credential).
pub fn client_tls_config(
    ca_der: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => builder.with_client_auth_cert(
            vec![CertificateDer::from(cert.to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        )?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issues_server_and_client_certs() {
        let now = 1_800_000_000;
        let (ca, key_der) = Ca::generate("Keyless test CA", now).unwrap();
        let ca2 = Ca::load(ca.cert_der(), &key_der).unwrap();
        let (cert, _k) = ca2
            .issue_server_cert(
                &["localhost".into(), "127.0.0.1".into(), "::1".into()],
                now,
                86_400,
            )
            .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 3);
        let (csr, _key) = generate_csr("host").unwrap();
        let client = ca
            .sign_client_csr(&csr, "vm1", "keyless:host:vm1", now, 600)
            .unwrap();
        let (nb, na) = cert_validity(&client).unwrap();
        assert_eq!(na - nb, 900);
        assert!(ca
            .sign_client_csr("garbage", "x", "keyless:x", now, 1)
            .is_err());
        assert_eq!(
            pem_blocks(&ca.cert_pem(), "CERTIFICATE"),
            vec![ca.cert_der().to_vec()]
        );
    }

    #[test]
    fn server_csrs_are_signed_with_their_sans_and_server_auth() {
        let now = 1_800_000_000;
        let (ca, _) = Ca::generate("webhook CA", now).unwrap();
        let sans: Vec<String> = ["svc.ns.svc", "10.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (csr, _key) = generate_server_csr(&sans).unwrap();
        assert_eq!(csr_sans(&csr).unwrap(), sans);
        let cert = ca
            .sign_server_csr(&csr, &sans[..2], now - 60, now + 600)
            .unwrap();
        assert_eq!(cert_validity(&cert).unwrap(), (now - 60, now + 600));
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 2);
        let eku = parsed.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && !eku.value.client_auth);
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        parsed.verify_signature(Some(ca_cert.public_key())).unwrap();
        // a request without names asks for none; garbage is no request
        let (plain, _) = generate_csr("x").unwrap();
        assert!(csr_sans(&plain).unwrap().is_empty());
        assert!(csr_sans("garbage").is_err());
        assert!(ca.sign_server_csr("garbage", &sans, now, now + 60).is_err());
        // a tampered request (another key's signature) is refused when signed
        let (other, _) = generate_server_csr(&["other.svc".to_string()]).unwrap();
        let mut der = pem_blocks(&csr, "CERTIFICATE REQUEST").remove(0);
        let other_der = pem_blocks(&other, "CERTIFICATE REQUEST").remove(0);
        let n = der.len();
        der[n - 8..].copy_from_slice(&other_der[other_der.len() - 8..]);
        let tampered = pem("CERTIFICATE REQUEST", &der);
        assert!(ca.sign_server_csr(&tampered, &sans, now, now + 60).is_err());
    }

    #[test]
    fn rs256_sign_verify_and_jwk() {
        let now = 1_800_000_000;
        let (ca, _) = Ca::generate("ca", now).unwrap();
        let (key, der) = SigningKey::generate(&ca, now, 86_400).unwrap();
        let again = SigningKey::load(&der, key.cert_der()).unwrap();
        assert_eq!(again.kid(), key.kid());
        let sig = key.sign(b"hello").unwrap();
        assert_eq!(sig.len(), 256);
        assert!(verify_rs256(&key.public(), b"hello", &sig));
        assert!(!verify_rs256(&key.public(), b"hellO", &sig));
        let jwk = key.jwk();
        assert_eq!(jwk.e, "AQAB");
        assert_eq!(jwk.kid, jwk.x5t);
        assert_eq!(URL_SAFE_NO_PAD.decode(&jwk.n).unwrap().len(), 256);
    }
}
