//! Key Vault data-plane cryptography, as pure functions over bytes (no IO, no clock reads;
//! times are Unix seconds):
//! - [`KvKey`]: RSA and EC keys with JWA-named sign/verify over caller-computed digests and
//!   RSA encrypt/decrypt; public JWK export and private JWK import.
//! - Certificates from a policy-like [`CertSpec`]: [`self_signed`], [`Ca::issue_for_spec`],
//!   [`csr`]; inspection with [`cert_info`] and [`cert_matches_key`].
//! - Bundles: [`build_pfx`] / [`parse_pfx`] (PKCS#12) and [`build_pem`] / [`parse_pem`].
//!
//! Distinguished names use the .NET / Key Vault string form: `TYPE=value` pairs separated by
//! `", "`, most specific first (`"CN=app, O=Contoso, C=US"`), i.e. the reverse of the DER
//! RDN order, as RFC 4514 does. Types written out: CN, O, OU, L, S (state), C, E (email),
//! DC, STREET, SERIALNUMBER, T, G, SN, UID, else `OID.n.n.n`.

use crate::{at, pem, pem_blocks, x5t, Ca, PkiError, Result};
use aws_lc_rs::digest::{self, Digest};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    self, KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, Pkcs1PrivateDecryptingKey,
    Pkcs1PublicEncryptingKey, PrivateDecryptingKey, PublicEncryptingKey,
};
use aws_lc_rs::signature::{
    self, EcdsaKeyPair, EcdsaSigningAlgorithm, EcdsaVerificationAlgorithm, KeyPair as _,
    RsaKeyPair, RsaPublicKeyComponents, UnparsedPublicKey, VerificationAlgorithm,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p12_keystore::{
    EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, Pkcs12Archive, PrivateKeyChain,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
};
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde_json::{Map, Value};
use std::fmt;
use std::net::IpAddr;
use x509_parser::der_parser::asn1_rs::{self, Any, FromDer, Oid, Tag, TaggedExplicit};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;
use x509_parser::x509::{SubjectPublicKeyInfo, X509Name};

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// Key type: RSA with its modulus size, or EC with its curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa { bits: u32 },
    Ec { curve: Curve },
}

/// NIST curves supported for EC keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    P256,
    P384,
    P521,
}

const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_UPN: &str = "1.3.6.1.4.1.311.20.2.3";
const OID_UPN_ARCS: [u64; 10] = [1, 3, 6, 1, 4, 1, 311, 20, 2, 3];
const OID_EKU: &str = "2.5.29.37";

impl Curve {
    const ALL: [Curve; 3] = [Curve::P256, Curve::P384, Curve::P521];

    /// JWK / Key Vault curve name: `"P-256"`, `"P-384"` or `"P-521"`.
    pub fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
            Curve::P521 => "P-521",
        }
    }

    /// Parse a JWK / Key Vault curve name.
    pub fn parse(s: &str) -> Option<Curve> {
        Curve::ALL.into_iter().find(|c| c.name() == s)
    }

    /// Field element length in bytes (JWK `x`/`y`/`d` length; half an ES* signature).
    fn coord_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
            Curve::P521 => 66,
        }
    }

    /// The JWS algorithm bound to this curve.
    fn jws_alg(self) -> &'static str {
        match self {
            Curve::P256 => "ES256",
            Curve::P384 => "ES384",
            Curve::P521 => "ES512",
        }
    }

    fn digest_alg(self) -> &'static digest::Algorithm {
        match self {
            Curve::P256 => &digest::SHA256,
            Curve::P384 => &digest::SHA384,
            Curve::P521 => &digest::SHA512,
        }
    }

    fn signing_alg(self) -> &'static EcdsaSigningAlgorithm {
        match self {
            Curve::P256 => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            Curve::P384 => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            Curve::P521 => &signature::ECDSA_P521_SHA512_FIXED_SIGNING,
        }
    }

    fn verification_alg(self) -> &'static EcdsaVerificationAlgorithm {
        match self {
            Curve::P256 => &signature::ECDSA_P256_SHA256_FIXED,
            Curve::P384 => &signature::ECDSA_P384_SHA384_FIXED,
            Curve::P521 => &signature::ECDSA_P521_SHA512_FIXED,
        }
    }

    fn rcgen_alg(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Curve::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Curve::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Curve::P521 => &rcgen::PKCS_ECDSA_P521_SHA512,
        }
    }

    fn from_oid(oid: &str) -> Option<Curve> {
        match oid {
            "1.2.840.10045.3.1.7" => Some(Curve::P256),
            "1.3.132.0.34" => Some(Curve::P384),
            "1.3.132.0.35" => Some(Curve::P521),
            _ => None,
        }
    }
}

/// RSA signature parameters for a JWS algorithm: (signing encoding, verification, digest).
fn rsa_sig_alg(
    alg: &str,
) -> Option<(
    &'static dyn signature::RsaEncoding,
    &'static dyn VerificationAlgorithm,
    &'static digest::Algorithm,
)> {
    Some(match alg {
        "RS256" => (
            &signature::RSA_PKCS1_SHA256,
            &signature::RSA_PKCS1_2048_8192_SHA256,
            &digest::SHA256,
        ),
        "RS384" => (
            &signature::RSA_PKCS1_SHA384,
            &signature::RSA_PKCS1_2048_8192_SHA384,
            &digest::SHA384,
        ),
        "RS512" => (
            &signature::RSA_PKCS1_SHA512,
            &signature::RSA_PKCS1_2048_8192_SHA512,
            &digest::SHA512,
        ),
        "PS256" => (
            &signature::RSA_PSS_SHA256,
            &signature::RSA_PSS_2048_8192_SHA256,
            &digest::SHA256,
        ),
        "PS384" => (
            &signature::RSA_PSS_SHA384,
            &signature::RSA_PSS_2048_8192_SHA384,
            &digest::SHA384,
        ),
        "PS512" => (
            &signature::RSA_PSS_SHA512,
            &signature::RSA_PSS_2048_8192_SHA512,
            &digest::SHA512,
        ),
        _ => return None,
    })
}

fn is_ec_alg(alg: &str) -> bool {
    Curve::ALL.iter().any(|c| c.jws_alg() == alg)
}

fn import_digest(bytes: &[u8], alg: &'static digest::Algorithm) -> Result<Digest> {
    Digest::import_less_safe(bytes, alg).map_err(|_| {
        PkiError::InvalidInput(format!(
            "digest must be {} bytes, got {}",
            alg.output_len(),
            bytes.len()
        ))
    })
}

fn wrong_alg(alg: &str, what: &str) -> PkiError {
    if rsa_sig_alg(alg).is_some() || is_ec_alg(alg) {
        PkiError::InvalidInput(format!("algorithm {alg} does not fit {what}"))
    } else {
        PkiError::Unsupported(format!("signature algorithm {alg}"))
    }
}

#[derive(Clone)]
enum Inner {
    Rsa(RsaKeyPair),
    Ec(Curve, EcdsaKeyPair),
}

/// A Key Vault key: RSA (2048..8192 bits; 2048/3072/4096 generated) or EC (P-256/384/521),
/// held as PKCS#8 DER plus the parsed key pair.
#[derive(Clone)]
pub struct KvKey {
    pkcs8: Vec<u8>,
    spki: Vec<u8>,
    inner: Inner,
}

impl fmt::Debug for KvKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvKey")
            .field("key_type", &self.key_type())
            .finish_non_exhaustive()
    }
}

impl KvKey {
    fn from_rsa(kp: RsaKeyPair) -> Result<Self> {
        let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp)
            .map_err(|_| PkiError::InvalidKey)?
            .as_ref()
            .to_vec();
        let spki = kp
            .public_key()
            .as_der()
            .map_err(|_| PkiError::InvalidKey)?
            .as_ref()
            .to_vec();
        Ok(Self {
            pkcs8,
            spki,
            inner: Inner::Rsa(kp),
        })
    }

    fn from_ec(curve: Curve, kp: EcdsaKeyPair) -> Result<Self> {
        let pkcs8 = kp
            .to_pkcs8v1()
            .map_err(|_| PkiError::InvalidKey)?
            .as_ref()
            .to_vec();
        let spki = kp
            .public_key()
            .as_der()
            .map_err(|_| PkiError::InvalidKey)?
            .as_ref()
            .to_vec();
        Ok(Self {
            pkcs8,
            spki,
            inner: Inner::Ec(curve, kp),
        })
    }

    /// Generate a key. RSA sizes 2048, 3072 and 4096 only.
    pub fn generate(t: KeyType) -> Result<Self> {
        match t {
            KeyType::Rsa { bits } => {
                let size = match bits {
                    2048 => KeySize::Rsa2048,
                    3072 => KeySize::Rsa3072,
                    4096 => KeySize::Rsa4096,
                    _ => return Err(PkiError::Unsupported(format!("RSA key size {bits}"))),
                };
                let kp = RsaKeyPair::generate(size)
                    .map_err(|_| PkiError::Crypto("RSA key generation"))?;
                Self::from_rsa(kp)
            }
            KeyType::Ec { curve } => {
                let kp = EcdsaKeyPair::generate(curve.signing_alg())
                    .map_err(|_| PkiError::Crypto("EC key generation"))?;
                Self::from_ec(curve, kp)
            }
        }
    }

    /// Load an unencrypted PKCS#8 private key (RSA or EC on a supported curve).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self> {
        if let Ok(kp) = RsaKeyPair::from_pkcs8(der) {
            return Self::from_rsa(kp);
        }
        for curve in Curve::ALL {
            if let Ok(kp) = EcdsaKeyPair::from_pkcs8(curve.signing_alg(), der) {
                return Self::from_ec(curve, kp);
            }
        }
        Err(PkiError::InvalidKey)
    }

    /// Load a PKCS#1 `RSAPrivateKey` (PEM "RSA PRIVATE KEY").
    fn from_pkcs1(der: &[u8]) -> Result<Self> {
        Self::from_rsa(RsaKeyPair::from_der(der).map_err(|_| PkiError::InvalidKey)?)
    }

    /// Load a SEC1 `ECPrivateKey` (PEM "EC PRIVATE KEY").
    fn from_sec1(der: &[u8]) -> Result<Self> {
        for curve in Curve::ALL {
            if let Ok(kp) = EcdsaKeyPair::from_private_key_der(curve.signing_alg(), der) {
                return Self::from_ec(curve, kp);
            }
        }
        Err(PkiError::InvalidKey)
    }

    /// Import a private JWK: RSA (`n`, `e`, `d`, `p`, `q`, `dp`, `dq`, `qi`) or EC (`crv`,
    /// `x`, `y`, `d`); members base64url. `kty` `RSA-HSM` / `EC-HSM` are accepted as RSA / EC.
    pub fn from_jwk(jwk: &Value) -> Result<Self> {
        let obj = jwk
            .as_object()
            .ok_or_else(|| PkiError::InvalidInput("JWK must be a JSON object".into()))?;
        let kty = obj
            .get("kty")
            .and_then(Value::as_str)
            .ok_or_else(|| PkiError::InvalidInput("JWK member 'kty' missing".into()))?;
        match kty {
            "RSA" | "RSA-HSM" => {
                let f = |name: &str| jwk_bytes(obj, name);
                let (n, e) = (f("n")?, f("e")?);
                let (d, p, q) = (f("d")?, f("p")?, f("q")?);
                let (dp, dq, qi) = (f("dp")?, f("dq")?, f("qi")?);
                let comps = rsa::KeyPairComponents {
                    public_key: rsa::PublicKeyComponents {
                        n: trim_zeros(&n),
                        e: trim_zeros(&e),
                    },
                    d: d.as_slice(),
                    p: p.as_slice(),
                    q: q.as_slice(),
                    dP: dp.as_slice(),
                    dQ: dq.as_slice(),
                    qInv: qi.as_slice(),
                };
                let kp = RsaKeyPair::from_components(&comps).map_err(|_| PkiError::InvalidKey)?;
                Self::from_rsa(kp)
            }
            "EC" | "EC-HSM" => {
                let crv = obj
                    .get("crv")
                    .and_then(Value::as_str)
                    .ok_or_else(|| PkiError::InvalidInput("JWK member 'crv' missing".into()))?;
                let curve = Curve::parse(crv)
                    .ok_or_else(|| PkiError::Unsupported(format!("curve {crv}")))?;
                let l = curve.coord_len();
                let x = left_pad(&jwk_bytes(obj, "x")?, l)?;
                let y = left_pad(&jwk_bytes(obj, "y")?, l)?;
                let d = left_pad(&jwk_bytes(obj, "d")?, l)?;
                let mut point = Vec::with_capacity(1 + 2 * l);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                let kp =
                    EcdsaKeyPair::from_private_key_and_public_key(curve.signing_alg(), &d, &point)
                        .map_err(|_| PkiError::InvalidKey)?;
                Self::from_ec(curve, kp)
            }
            other => Err(PkiError::Unsupported(format!("JWK kty {other}"))),
        }
    }

    /// The key type (RSA with modulus bits, or EC curve).
    pub fn key_type(&self) -> KeyType {
        match &self.inner {
            Inner::Rsa(kp) => KeyType::Rsa {
                bits: (kp.public_modulus_len() * 8) as u32,
            },
            Inner::Ec(curve, _) => KeyType::Ec { curve: *curve },
        }
    }

    /// The private key as PKCS#8 DER.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key as a JWK: RSA `{kty, n, e}`, EC `{kty, crv, x, y}` (base64url, no
    /// padding). No private members, no `kid` / `key_ops`.
    pub fn public_jwk(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match &self.inner {
            Inner::Rsa(kp) => {
                let c: RsaPublicKeyComponents<Vec<u8>> = kp.public_key().into();
                m.insert("kty".into(), "RSA".into());
                m.insert("n".into(), b64(trim_zeros(&c.n)).into());
                m.insert("e".into(), b64(trim_zeros(&c.e)).into());
            }
            Inner::Ec(curve, kp) => {
                let (x, y) = split_point(*curve, kp.public_key().as_ref());
                m.insert("kty".into(), "EC".into());
                m.insert("crv".into(), curve.name().into());
                m.insert("x".into(), b64(x).into());
                m.insert("y".into(), b64(y).into());
            }
        }
        m
    }

    /// The public key as X.509 `SubjectPublicKeyInfo` DER.
    pub fn spki_der(&self) -> Vec<u8> {
        self.spki.clone()
    }

    /// The raw public key as it appears in a certificate's SPKI bit string
    /// (RSA: PKCS#1 `RSAPublicKey`; EC: uncompressed point).
    fn public_raw(&self) -> &[u8] {
        match &self.inner {
            Inner::Rsa(kp) => kp.public_key().as_ref(),
            Inner::Ec(_, kp) => kp.public_key().as_ref(),
        }
    }

    fn public(&self) -> Public<'_> {
        match &self.inner {
            Inner::Rsa(_) => Public::Rsa(&self.spki),
            Inner::Ec(curve, _) => Public::Ec(*curve, &self.spki),
        }
    }

    /// Sign a digest the caller already computed. RSA: `RS256/384/512` (PKCS#1 v1.5),
    /// `PS256/384/512` (PSS, salt = hash length). EC: `ES256` (P-256), `ES384` (P-384),
    /// `ES512` (P-521), output raw `r||s` (JWS form).
    pub fn sign(&self, alg: &str, digest: &[u8]) -> Result<Vec<u8>> {
        match &self.inner {
            Inner::Rsa(kp) => {
                let (enc, _, dalg) =
                    rsa_sig_alg(alg).ok_or_else(|| wrong_alg(alg, "an RSA key"))?;
                let d = import_digest(digest, dalg)?;
                let mut sig = vec![0u8; kp.public_modulus_len()];
                kp.sign_digest(enc, &d, &mut sig)
                    .map_err(|_| PkiError::Sign)?;
                Ok(sig)
            }
            Inner::Ec(curve, kp) => {
                if alg != curve.jws_alg() {
                    return Err(wrong_alg(alg, &format!("a {} key", curve.name())));
                }
                let d = import_digest(digest, curve.digest_alg())?;
                let sig = kp.sign_digest(&d).map_err(|_| PkiError::Sign)?;
                Ok(sig.as_ref().to_vec())
            }
        }
    }

    /// Verify a signature over a digest (algorithms as for [`KvKey::sign`]). `Ok(false)` for
    /// a signature that does not verify; an error for an algorithm that does not fit the key
    /// or a digest of the wrong length.
    pub fn verify(&self, alg: &str, digest: &[u8], sig: &[u8]) -> Result<bool> {
        verify_public(self.public(), alg, digest, sig)
    }

    /// Encrypt with the public key: `RSA1_5`, `RSA-OAEP` (SHA-1) or `RSA-OAEP-256`.
    pub fn encrypt(&self, alg: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        self.require_rsa()?;
        let public = PublicEncryptingKey::from_der(&self.spki).map_err(|_| PkiError::InvalidKey)?;
        match alg {
            "RSA-OAEP" | "RSA-OAEP-256" => {
                let oaep = oaep_alg(alg);
                let key = OaepPublicEncryptingKey::new(public)
                    .map_err(|_| PkiError::Crypto("RSA-OAEP key"))?;
                if plaintext.len() > key.max_plaintext_size(oaep) {
                    return Err(PkiError::InvalidInput("plaintext too long".into()));
                }
                let mut out = vec![0u8; key.ciphertext_size()];
                let n = key
                    .encrypt(oaep, plaintext, &mut out, None)
                    .map_err(|_| PkiError::Crypto("RSA-OAEP encryption"))?
                    .len();
                out.truncate(n);
                Ok(out)
            }
            "RSA1_5" => {
                let key = Pkcs1PublicEncryptingKey::new(public)
                    .map_err(|_| PkiError::Crypto("RSA1_5 key"))?;
                if plaintext.len() > key.max_plaintext_size() {
                    return Err(PkiError::InvalidInput("plaintext too long".into()));
                }
                let mut out = vec![0u8; key.ciphertext_size()];
                let n = key
                    .encrypt(plaintext, &mut out)
                    .map_err(|_| PkiError::Crypto("RSA1_5 encryption"))?
                    .len();
                out.truncate(n);
                Ok(out)
            }
            other => Err(PkiError::Unsupported(format!(
                "encryption algorithm {other}"
            ))),
        }
    }

    /// Decrypt with the private key (algorithms as for [`KvKey::encrypt`]). Malformed or
    /// wrong ciphertext is an `InvalidInput` error.
    pub fn decrypt(&self, alg: &str, ciphertext: &[u8]) -> Result<Vec<u8>> {
        self.require_rsa()?;
        if !matches!(alg, "RSA-OAEP" | "RSA-OAEP-256" | "RSA1_5") {
            return Err(PkiError::Unsupported(format!("encryption algorithm {alg}")));
        }
        let private =
            PrivateDecryptingKey::from_pkcs8(&self.pkcs8).map_err(|_| PkiError::InvalidKey)?;
        if ciphertext.len() != private.key_size_bytes() {
            return Err(PkiError::InvalidInput(format!(
                "ciphertext must be {} bytes",
                private.key_size_bytes()
            )));
        }
        let failed = || PkiError::InvalidInput("decryption failed".into());
        if alg == "RSA1_5" {
            let key = Pkcs1PrivateDecryptingKey::new(private)
                .map_err(|_| PkiError::Crypto("RSA1_5 key"))?;
            let mut out = vec![0u8; key.min_output_size()];
            let n = key
                .decrypt(ciphertext, &mut out)
                .map_err(|_| failed())?
                .len();
            out.truncate(n);
            Ok(out)
        } else {
            let key = OaepPrivateDecryptingKey::new(private)
                .map_err(|_| PkiError::Crypto("RSA-OAEP key"))?;
            let mut out = vec![0u8; key.min_output_size()];
            let n = key
                .decrypt(oaep_alg(alg), ciphertext, &mut out, None)
                .map_err(|_| failed())?
                .len();
            out.truncate(n);
            Ok(out)
        }
    }

    fn require_rsa(&self) -> Result<()> {
        match self.inner {
            Inner::Rsa(_) => Ok(()),
            Inner::Ec(..) => Err(PkiError::InvalidInput(
                "encryption requires an RSA key".into(),
            )),
        }
    }

    /// An rcgen key pair for certificate and CSR signing (RSA: sha256WithRSAEncryption;
    /// EC: ECDSA with the curve's hash).
    fn rcgen_key(&self) -> Result<rcgen::KeyPair> {
        let alg = match &self.inner {
            Inner::Rsa(_) => &rcgen::PKCS_RSA_SHA256,
            Inner::Ec(curve, _) => curve.rcgen_alg(),
        };
        Ok(rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(self.pkcs8.as_slice()),
            alg,
        )?)
    }
}

fn oaep_alg(alg: &str) -> &'static rsa::OaepAlgorithm {
    if alg == "RSA-OAEP-256" {
        &rsa::OAEP_SHA256_MGF1SHA256
    } else {
        &rsa::OAEP_SHA1_MGF1SHA1
    }
}

/// A public key for verification: RSA (SPKI or PKCS#1 DER) or EC (SPKI or uncompressed point).
enum Public<'a> {
    Rsa(&'a [u8]),
    Ec(Curve, &'a [u8]),
}

fn verify_public(key: Public<'_>, alg: &str, digest: &[u8], sig: &[u8]) -> Result<bool> {
    let (valg, d, bytes): (&'static dyn VerificationAlgorithm, Digest, &[u8]) = match key {
        Public::Rsa(bytes) => {
            let (_, valg, dalg) = rsa_sig_alg(alg).ok_or_else(|| wrong_alg(alg, "an RSA key"))?;
            (valg, import_digest(digest, dalg)?, bytes)
        }
        Public::Ec(curve, bytes) => {
            if alg != curve.jws_alg() {
                return Err(wrong_alg(alg, &format!("a {} key", curve.name())));
            }
            (
                curve.verification_alg(),
                import_digest(digest, curve.digest_alg())?,
                bytes,
            )
        }
    };
    Ok(UnparsedPublicKey::new(valg, bytes)
        .verify_digest(&d, sig)
        .is_ok())
}

/// Verify a signature over a digest with a public JWK (RSA `n`/`e` or EC `crv`/`x`/`y`);
/// algorithms and errors as for [`KvKey::verify`].
pub fn verify_with_public_jwk(jwk: &Value, alg: &str, digest: &[u8], sig: &[u8]) -> Result<bool> {
    let obj = jwk
        .as_object()
        .ok_or_else(|| PkiError::InvalidInput("JWK must be a JSON object".into()))?;
    let kty = obj.get("kty").and_then(Value::as_str).unwrap_or_default();
    match kty {
        "RSA" | "RSA-HSM" => {
            let (n, e) = (jwk_bytes(obj, "n")?, jwk_bytes(obj, "e")?);
            let spki = RsaPublicKeyComponents {
                n: trim_zeros(&n),
                e: trim_zeros(&e),
            }
            .as_der()
            .map_err(|_| PkiError::InvalidKey)?;
            verify_public(Public::Rsa(spki.as_ref()), alg, digest, sig)
        }
        "EC" | "EC-HSM" => {
            let crv = obj.get("crv").and_then(Value::as_str).unwrap_or_default();
            let curve =
                Curve::parse(crv).ok_or_else(|| PkiError::Unsupported(format!("curve {crv}")))?;
            let l = curve.coord_len();
            let mut point = vec![4u8];
            point.extend(left_pad(&jwk_bytes(obj, "x")?, l)?);
            point.extend(left_pad(&jwk_bytes(obj, "y")?, l)?);
            verify_public(Public::Ec(curve, &point), alg, digest, sig)
        }
        other => Err(PkiError::Unsupported(format!("JWK kty {other:?}"))),
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A base64url JWK member (padding tolerated).
fn jwk_bytes(obj: &Map<String, Value>, name: &str) -> Result<Vec<u8>> {
    let s = obj
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| PkiError::InvalidInput(format!("JWK member '{name}' missing")))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| PkiError::InvalidInput(format!("JWK member '{name}' is not base64url")))
}

fn trim_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[i..]
}

/// Left-pad a big-endian value to `len` bytes (leading zero bytes beyond `len` are dropped).
fn left_pad(b: &[u8], len: usize) -> Result<Vec<u8>> {
    let b = if b.len() > len { trim_zeros(b) } else { b };
    if b.len() > len {
        return Err(PkiError::InvalidInput("EC coordinate too long".into()));
    }
    let mut out = vec![0u8; len - b.len()];
    out.extend_from_slice(b);
    Ok(out)
}

fn split_point(curve: Curve, point: &[u8]) -> (&[u8], &[u8]) {
    let l = curve.coord_len();
    (&point[1..1 + l], &point[1 + l..1 + 2 * l])
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// What to put in a certificate or CSR (Key Vault `x509_props` plus validity).
#[derive(Debug, Clone, Default)]
pub struct CertSpec {
    /// X.500 DN as Key Vault writes it, e.g. `"CN=app.example.com, O=Contoso"`.
    pub subject: String,
    pub dns_names: Vec<String>,
    pub emails: Vec<String>,
    /// User principal names (otherName 1.3.6.1.4.1.311.20.2.3).
    pub upns: Vec<String>,
    pub uris: Vec<String>,
    pub ip_addresses: Vec<String>,
    /// Extended key usages as dotted OIDs.
    pub ekus: Vec<String>,
    /// Key usages by Key Vault name (`digitalSignature`, `keyEncipherment`, ...).
    pub key_usage: Vec<String>,
    pub not_before: u64,
    pub not_after: u64,
    pub is_ca: bool,
}

/// What [`cert_info`] reads out of a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// Subject in the Key Vault string form (see the module documentation).
    pub subject: String,
    pub dns_names: Vec<String>,
    pub emails: Vec<String>,
    pub upns: Vec<String>,
    pub uris: Vec<String>,
    pub ip_addresses: Vec<String>,
    /// Extended key usages as dotted OIDs, in certificate order.
    pub ekus: Vec<String>,
    /// Key usages by Key Vault name, in bit order.
    pub key_usage: Vec<String>,
    pub not_before: u64,
    pub not_after: u64,
    pub is_ca: bool,
    /// The subject key: RSA with modulus bits, or EC curve; `None` for other key types.
    pub key_type: Option<KeyType>,
    /// base64url (no padding) SHA-1 of the DER.
    pub x5t: String,
    /// The subject's `SubjectPublicKeyInfo` DER.
    pub spki_der: Vec<u8>,
}

const KEY_USAGES: [(&str, KeyUsagePurpose); 9] = [
    ("digitalSignature", KeyUsagePurpose::DigitalSignature),
    ("nonRepudiation", KeyUsagePurpose::ContentCommitment),
    ("keyEncipherment", KeyUsagePurpose::KeyEncipherment),
    ("dataEncipherment", KeyUsagePurpose::DataEncipherment),
    ("keyAgreement", KeyUsagePurpose::KeyAgreement),
    ("keyCertSign", KeyUsagePurpose::KeyCertSign),
    ("cRLSign", KeyUsagePurpose::CrlSign),
    ("encipherOnly", KeyUsagePurpose::EncipherOnly),
    ("decipherOnly", KeyUsagePurpose::DecipherOnly),
];

/// DN attribute types: (names accepted, name written, OID).
const DN_TYPES: [(&[&str], &str, &str); 14] = [
    (&["CN"], "CN", "2.5.4.3"),
    (&["O"], "O", "2.5.4.10"),
    (&["OU"], "OU", "2.5.4.11"),
    (&["L"], "L", "2.5.4.7"),
    (&["S", "ST"], "S", "2.5.4.8"),
    (&["C"], "C", "2.5.4.6"),
    (&["E", "EMAIL", "EMAILADDRESS"], "E", "1.2.840.113549.1.9.1"),
    (&["DC"], "DC", "0.9.2342.19200300.100.1.25"),
    (&["STREET"], "STREET", "2.5.4.9"),
    (&["SERIALNUMBER"], "SERIALNUMBER", "2.5.4.5"),
    (&["T", "TITLE"], "T", "2.5.4.12"),
    (&["G", "GN", "GIVENNAME"], "G", "2.5.4.42"),
    (&["SN"], "SN", "2.5.4.4"),
    (&["UID"], "UID", "0.9.2342.19200300.100.1.1"),
];

fn parse_oid(s: &str) -> Result<Vec<u64>> {
    let arcs: Option<Vec<u64>> = s.split('.').map(|a| a.parse().ok()).collect();
    match arcs {
        Some(a) if a.len() >= 2 => Ok(a),
        _ => Err(PkiError::InvalidInput(format!("not a dotted OID: {s}"))),
    }
}

/// Split a DN string into (type, value) pairs in string order. Values may be quoted
/// (`"a, b"`, with `""` for a quote) or use backslash escapes (`\,`, `\2C`).
fn split_dn(s: &str) -> Result<Vec<(String, String)>> {
    let bad = || PkiError::InvalidInput(format!("malformed subject: {s}"));
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut ty = String::new();
        loop {
            match chars.next() {
                Some('=') => break,
                Some(c) => ty.push(c),
                None => return Err(bad()),
            }
        }
        let ty = ty.trim().to_string();
        if ty.is_empty() {
            return Err(bad());
        }
        while chars.peek().is_some_and(|c| *c == ' ') {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        value.push('"');
                    }
                    Some('"') => break,
                    Some('\\') => value.push(chars.next().ok_or_else(bad)?),
                    Some(c) => value.push(c),
                    None => return Err(bad()),
                }
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            match chars.next() {
                None | Some(',') | Some(';') => {}
                Some(_) => return Err(bad()),
            }
        } else {
            let mut trailing = 0usize; // unescaped trailing spaces to trim
            let mut bytes: Vec<u8> = Vec::new();
            loop {
                match chars.next() {
                    None | Some(',') | Some(';') => break,
                    Some('\\') => {
                        let c = chars.next().ok_or_else(bad)?;
                        if c.is_ascii_hexdigit()
                            && chars.peek().is_some_and(char::is_ascii_hexdigit)
                        {
                            let h = chars.next().unwrap_or('0');
                            let v =
                                u8::from_str_radix(&format!("{c}{h}"), 16).map_err(|_| bad())?;
                            bytes.push(v);
                        } else {
                            let mut buf = [0u8; 4];
                            bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                        trailing = 0;
                    }
                    Some(c) => {
                        let mut buf = [0u8; 4];
                        bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        trailing = if c == ' ' { trailing + 1 } else { 0 };
                    }
                }
            }
            bytes.truncate(bytes.len() - trailing);
            value = String::from_utf8(bytes).map_err(|_| bad())?;
        }
        out.push((ty, value));
    }
    Ok(out)
}

/// Build the rcgen DN for a Key Vault subject string (string order reversed into DER order).
/// rcgen holds one value per attribute type; a type may appear at most twice (the second
/// occurrence is written under the same OID as a custom type).
fn subject_dn(subject: &str) -> Result<DistinguishedName> {
    let mut dn = DistinguishedName::new();
    for (ty, value) in split_dn(subject)?.into_iter().rev() {
        let upper = ty.to_ascii_uppercase();
        let known = DN_TYPES
            .iter()
            .find(|(names, _, _)| names.contains(&upper.as_str()));
        let oid_str = match known {
            Some((_, _, oid)) => (*oid).to_string(),
            None => upper.strip_prefix("OID.").unwrap_or(&upper).to_string(),
        };
        let arcs = parse_oid(&oid_str)
            .map_err(|_| PkiError::InvalidInput(format!("unknown subject attribute type {ty}")))?;
        let mut dn_type = DnType::from_oid(&arcs);
        if dn.get(&dn_type).is_some() {
            dn_type = DnType::CustomDnType(arcs.clone());
            if matches!(DnType::from_oid(&arcs), DnType::CustomDnType(_))
                || dn.get(&dn_type).is_some()
            {
                return Err(PkiError::Unsupported(format!(
                    "attribute type {ty} repeated in subject"
                )));
            }
        }
        let dn_value = match oid_str.as_str() {
            "2.5.4.6" | "2.5.4.5" => value
                .clone()
                .try_into()
                .map(DnValue::PrintableString)
                .unwrap_or(DnValue::Utf8String(value)),
            "1.2.840.113549.1.9.1" | "0.9.2342.19200300.100.1.25" => value
                .clone()
                .try_into()
                .map(DnValue::Ia5String)
                .unwrap_or(DnValue::Utf8String(value)),
            _ => DnValue::Utf8String(value),
        };
        dn.push(dn_type, dn_value);
    }
    Ok(dn)
}

fn dn_value_needs_quotes(v: &str) -> bool {
    v.is_empty()
        || v.starts_with(' ')
        || v.ends_with(' ')
        || v.starts_with('#')
        || v.contains([',', '+', '=', '"', '\\', '<', '>', ';', '\n', '\r'])
}

/// Format a name in the Key Vault string form (reverse DER order, `", "` separated).
fn format_dn(name: &X509Name<'_>) -> String {
    let mut rdns = Vec::new();
    for rdn in name.iter() {
        let parts: Vec<String> = rdn
            .iter()
            .map(|atv| {
                let oid = atv.attr_type().to_id_string();
                let ty = DN_TYPES
                    .iter()
                    .find(|(_, _, o)| *o == oid)
                    .map(|(_, n, _)| (*n).to_string())
                    .unwrap_or_else(|| format!("OID.{oid}"));
                let value = attr_string(atv.attr_value());
                if dn_value_needs_quotes(&value) {
                    format!("{ty}=\"{}\"", value.replace('"', "\"\""))
                } else {
                    format!("{ty}={value}")
                }
            })
            .collect();
        rdns.push(parts.join(" + "));
    }
    rdns.reverse();
    rdns.join(", ")
}

/// A directory string's text (UTF-8, Printable, IA5, BMP, Universal or Teletex).
fn attr_string(v: &Any<'_>) -> String {
    let data = v.data;
    match v.tag() {
        Tag::BmpString => char::decode_utf16(
            data.chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]])),
        )
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect(),
        Tag::UniversalString => data
            .chunks_exact(4)
            .map(|c| {
                char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect(),
        Tag::TeletexString => data.iter().map(|b| char::from(*b)).collect(),
        _ => String::from_utf8_lossy(data).into_owned(),
    }
}

fn ia5(kind: &str, s: &str) -> Result<rcgen::string::Ia5String> {
    s.to_string()
        .try_into()
        .map_err(|_| PkiError::InvalidInput(format!("{kind} must be ASCII: {s}")))
}

/// rcgen parameters for a spec. Validity and serial only for certificates (not CSRs).
fn spec_params(spec: &CertSpec, certificate: bool) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    p.distinguished_name = subject_dn(&spec.subject)?;
    for d in &spec.dns_names {
        p.subject_alt_names
            .push(SanType::DnsName(ia5("DNS name", d)?));
    }
    for e in &spec.emails {
        p.subject_alt_names
            .push(SanType::Rfc822Name(ia5("email", e)?));
    }
    for u in &spec.upns {
        p.subject_alt_names.push(SanType::OtherName((
            OID_UPN_ARCS.to_vec(),
            u.clone().into(),
        )));
    }
    for u in &spec.uris {
        p.subject_alt_names.push(SanType::URI(ia5("URI", u)?));
    }
    for ip in &spec.ip_addresses {
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| PkiError::InvalidInput(format!("not an IP address: {ip}")))?;
        p.subject_alt_names.push(SanType::IpAddress(addr));
    }
    for eku in &spec.ekus {
        let arcs = parse_oid(eku)?;
        p.extended_key_usages.push(match eku.as_str() {
            "1.3.6.1.5.5.7.3.1" => ExtendedKeyUsagePurpose::ServerAuth,
            "1.3.6.1.5.5.7.3.2" => ExtendedKeyUsagePurpose::ClientAuth,
            "1.3.6.1.5.5.7.3.3" => ExtendedKeyUsagePurpose::CodeSigning,
            "1.3.6.1.5.5.7.3.4" => ExtendedKeyUsagePurpose::EmailProtection,
            "1.3.6.1.5.5.7.3.8" => ExtendedKeyUsagePurpose::TimeStamping,
            "1.3.6.1.5.5.7.3.9" => ExtendedKeyUsagePurpose::OcspSigning,
            "2.5.29.37.0" => ExtendedKeyUsagePurpose::Any,
            _ => ExtendedKeyUsagePurpose::Other(arcs),
        });
    }
    for ku in &spec.key_usage {
        let purpose = KEY_USAGES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(ku))
            .map(|(_, p)| *p)
            .ok_or_else(|| PkiError::InvalidInput(format!("unknown key usage {ku}")))?;
        if !p.key_usages.contains(&purpose) {
            p.key_usages.push(purpose);
        }
    }
    p.is_ca = if spec.is_ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::NoCa
    };
    if certificate {
        if spec.not_after <= spec.not_before {
            return Err(PkiError::InvalidInput(
                "not_after must be after not_before".into(),
            ));
        }
        p.not_before = at(spec.not_before)?;
        p.not_after = at(spec.not_after)?;
        let mut serial = [0u8; 16];
        aws_lc_rs::rand::fill(&mut serial).map_err(|_| PkiError::Crypto("random serial"))?;
        serial[0] = (serial[0] & 0x7f) | 0x01;
        p.serial_number = Some(serial.to_vec().into());
    }
    Ok(p)
}

/// Self-signed certificate for `key` (issuer = subject); DER. Random positive 16-byte serial.
pub fn self_signed(spec: &CertSpec, key: &KvKey) -> Result<Vec<u8>> {
    let params = spec_params(spec, true)?;
    Ok(params.self_signed(&key.rcgen_key()?)?.der().to_vec())
}

impl Ca {
    /// Certificate for `key` per `spec`, signed by this CA; DER.
    pub fn issue_for_spec(&self, spec: &CertSpec, key: &KvKey) -> Result<Vec<u8>> {
        let mut params = spec_params(spec, true)?;
        params.use_authority_key_identifier_extension = true;
        Ok(params
            .signed_by(&key.rcgen_key()?, &self.issuer)?
            .der()
            .to_vec())
    }
}

/// PKCS#10 CSR (DER) for `key` with the spec's subject, SANs, EKUs and key usage
/// (validity is not part of a CSR).
pub fn csr(spec: &CertSpec, key: &KvKey) -> Result<Vec<u8>> {
    let params = spec_params(spec, false)?;
    Ok(params.serialize_request(&key.rcgen_key()?)?.der().to_vec())
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
    Ok(cert)
}

fn bad_cert(e: impl fmt::Display) -> PkiError {
    PkiError::InvalidCertificate(e.to_string())
}

fn spki_key_type(spki: &SubjectPublicKeyInfo<'_>) -> Option<KeyType> {
    match spki.algorithm.algorithm.to_id_string().as_str() {
        OID_RSA_ENCRYPTION => match spki.parsed().ok()? {
            x509_parser::public_key::PublicKey::RSA(k) => {
                let m = trim_zeros(k.modulus);
                let first = *m.first()?;
                let bits = (m.len() as u32 - 1) * 8 + (8 - first.leading_zeros());
                Some(KeyType::Rsa { bits })
            }
            _ => None,
        },
        OID_EC_PUBLIC_KEY => {
            let oid = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
            Curve::from_oid(&oid.to_id_string()).map(|curve| KeyType::Ec { curve })
        }
        _ => None,
    }
}

fn format_ip(b: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        IpAddr::from(v4).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(b) {
        IpAddr::from(v6).to_string()
    } else {
        hex::encode(b)
    }
}

/// Read subject, SANs, usages, validity, CA flag, key type, `x5t` and SPKI from a DER
/// certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo> {
    let cert = parse_cert(der)?;
    let mut info = CertInfo {
        subject: format_dn(cert.subject()),
        dns_names: Vec::new(),
        emails: Vec::new(),
        upns: Vec::new(),
        uris: Vec::new(),
        ip_addresses: Vec::new(),
        ekus: Vec::new(),
        key_usage: Vec::new(),
        not_before: cert.validity().not_before.timestamp().max(0) as u64,
        not_after: cert.validity().not_after.timestamp().max(0) as u64,
        is_ca: false,
        key_type: spki_key_type(cert.public_key()),
        x5t: x5t(der),
        spki_der: cert.public_key().raw.to_vec(),
    };
    if let Some(san) = cert.subject_alternative_name().map_err(bad_cert)? {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(s) => info.dns_names.push((*s).to_string()),
                GeneralName::RFC822Name(s) => info.emails.push((*s).to_string()),
                GeneralName::URI(s) => info.uris.push((*s).to_string()),
                GeneralName::IPAddress(b) => info.ip_addresses.push(format_ip(b)),
                GeneralName::OtherName(oid, value) if oid.to_id_string() == OID_UPN => {
                    let parsed = TaggedExplicit::<Any, asn1_rs::Error, 0>::from_der(value);
                    if let Ok((_, tagged)) = parsed {
                        info.upns.push(attr_string(&tagged.into_inner()));
                    }
                }
                _ => {}
            }
        }
    }
    for ext in cert.extensions() {
        if ext.oid.to_id_string() == OID_EKU {
            let (_, oids) = <Vec<Oid>>::from_der(ext.value)
                .map_err(|e: asn1_rs::Err<asn1_rs::Error>| bad_cert(e))?;
            info.ekus = oids.iter().map(Oid::to_id_string).collect();
        }
    }
    if let Some(ku) = cert.key_usage().map_err(bad_cert)? {
        let k = &ku.value;
        let flags = [
            k.digital_signature(),
            k.non_repudiation(),
            k.key_encipherment(),
            k.data_encipherment(),
            k.key_agreement(),
            k.key_cert_sign(),
            k.crl_sign(),
            k.encipher_only(),
            k.decipher_only(),
        ];
        info.key_usage = KEY_USAGES
            .iter()
            .zip(flags)
            .filter(|(_, set)| *set)
            .map(|((name, _), _)| (*name).to_string())
            .collect();
    }
    if let Some(bc) = cert.basic_constraints().map_err(bad_cert)? {
        info.is_ca = bc.value.ca;
    }
    Ok(info)
}

/// True when the certificate's public key is `key`'s public key.
pub fn cert_matches_key(cert_der: &[u8], key: &KvKey) -> bool {
    match parse_cert(cert_der) {
        Ok(cert) => {
            let spki = cert.public_key();
            spki_key_type(spki).is_some()
                && spki.subject_public_key.data.as_ref() == key.public_raw()
        }
        Err(_) => false,
    }
}

/// Order certificates leaf first: with a key, the certificate matching it, then its issuers
/// by name, then the rest as given; without a matching key, as given. Duplicates dropped.
fn order_chain(key: Option<&KvKey>, certs: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
    let mut rest: Vec<Vec<u8>> = Vec::with_capacity(certs.len());
    for c in certs {
        parse_cert(&c)?;
        if !rest.contains(&c) {
            rest.push(c);
        }
    }
    let Some(leaf) = key.and_then(|k| rest.iter().position(|c| cert_matches_key(c, k))) else {
        return Ok(rest);
    };
    let names = |der: &[u8]| -> (Vec<u8>, Vec<u8>) {
        match parse_cert(der) {
            Ok(c) => (c.subject().as_raw().to_vec(), c.issuer().as_raw().to_vec()),
            Err(_) => (Vec::new(), Vec::new()),
        }
    };
    let mut out = vec![rest.remove(leaf)];
    loop {
        let (subject, issuer) = names(out.last().map(Vec::as_slice).unwrap_or_default());
        if subject == issuer {
            break;
        }
        match rest.iter().position(|c| names(c).0 == issuer) {
            Some(i) => out.push(rest.remove(i)),
            None => break,
        }
    }
    out.extend(rest);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// PFX / PEM
// ---------------------------------------------------------------------------------------------

fn p12_err(e: p12_keystore::error::Error) -> PkiError {
    PkiError::Pkcs12(e.to_string())
}

/// PKCS#12 with an empty password: PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) for the key and
/// the certificates, HMAC-SHA256 MAC; readable by OpenSSL 3 without the legacy provider.
/// `chain[0]` is the leaf and must hold `key`'s public key. `key` `None` gives a
/// certificates-only PFX.
pub fn build_pfx(key: Option<&KvKey>, chain: &[Vec<u8>]) -> Result<Vec<u8>> {
    if let (Some(key), Some(leaf)) = (key, chain.first()) {
        if !cert_matches_key(leaf, key) {
            return Err(PkiError::InvalidInput(
                "the first certificate does not hold the key's public key".into(),
            ));
        }
    }
    let certs = chain
        .iter()
        .map(|c| p12_keystore::Certificate::from_der(c).map_err(p12_err))
        .collect::<Result<Vec<_>>>()?;
    let mut store = KeyStore::new();
    match key {
        Some(key) => {
            let local_key_id = crate::sha1(chain.first().unwrap_or(&key.spki));
            let private = p12_keystore::PrivateKey::from_der(key.pkcs8()).map_err(p12_err)?;
            let entry = PrivateKeyChain::new(local_key_id, private, certs);
            store.add_entry("keyless", KeyStoreEntry::PrivateKeyChain(entry));
        }
        None => {
            // Aliases sort in the keystore map: zero-padded indexes keep the chain order.
            for (i, cert) in certs.into_iter().enumerate() {
                store.add_entry(&format!("cert{i:04}"), KeyStoreEntry::Certificate(cert));
            }
        }
    }
    store
        .writer("")
        .encryption_algorithm(EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .encryption_iterations(2048)
        .mac_algorithm(MacAlgorithm::HmacSha256)
        .mac_iterations(2048)
        .write()
        .map_err(p12_err)
}

/// Parse a PFX with `password` (may be empty). Returns the first private key, if any, and
/// the certificates, leaf first (the one matching the key, then its issuers, then the rest).
pub fn parse_pfx(data: &[u8], password: &str) -> Result<(Option<KvKey>, Vec<Vec<u8>>)> {
    let archive = Pkcs12Archive::from_pkcs12(data, password).map_err(p12_err)?;
    let key = archive
        .keys
        .first()
        .map(|k| KvKey::from_pkcs8(k.key.as_der()))
        .transpose()?;
    let certs = archive
        .certs
        .iter()
        .map(|c| c.cert.as_der().to_vec())
        .collect();
    let certs = order_chain(key.as_ref(), certs)?;
    Ok((key, certs))
}

/// PEM bundle: a PKCS#8 `PRIVATE KEY` block first when `key` is given, then each
/// `CERTIFICATE`, leaf first.
pub fn build_pem(key: Option<&KvKey>, chain: &[Vec<u8>]) -> String {
    let mut out = String::new();
    if let Some(key) = key {
        out.push_str(&pem("PRIVATE KEY", key.pkcs8()));
    }
    for cert in chain {
        out.push_str(&pem("CERTIFICATE", cert));
    }
    out
}

/// Parse a PEM bundle: the first private key (`PRIVATE KEY` PKCS#8, `RSA PRIVATE KEY`
/// PKCS#1 or `EC PRIVATE KEY` SEC1; encrypted keys are unsupported) and the `CERTIFICATE`
/// blocks, leaf first (the one matching the key, then its issuers, then the rest; as given
/// without a key).
pub fn parse_pem(text: &str) -> Result<(Option<KvKey>, Vec<Vec<u8>>)> {
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(PkiError::Unsupported("encrypted PEM private key".into()));
    }
    let key = if let Some(der) = pem_blocks(text, "PRIVATE KEY").first() {
        Some(KvKey::from_pkcs8(der)?)
    } else if let Some(der) = pem_blocks(text, "RSA PRIVATE KEY").first() {
        Some(KvKey::from_pkcs1(der)?)
    } else if let Some(der) = pem_blocks(text, "EC PRIVATE KEY").first() {
        Some(KvKey::from_sec1(der)?)
    } else {
        None
    };
    let certs = pem_blocks(text, "CERTIFICATE");
    if key.is_none() && certs.is_empty() {
        return Err(PkiError::InvalidInput(
            "no private key or certificate in PEM".into(),
        ));
    }
    let certs = order_chain(key.as_ref(), certs)?;
    Ok((key, certs))
}

/// The EC private scalar (big-endian, fixed length); tests build private JWKs from it.
#[cfg(test)]
fn ec_private_scalar(key: &KvKey) -> Option<Vec<u8>> {
    match &key.inner {
        Inner::Ec(_, kp) => {
            use aws_lc_rs::encoding::{AsBigEndian, EcPrivateKeyBin};
            let bin: EcPrivateKeyBin<'static> = kp.private_key().as_be_bytes().ok()?;
            Some(bin.as_ref().to_vec())
        }
        Inner::Rsa(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::der_parser::ber::BerObjectContent;
    use x509_parser::der_parser::parse_der;

    const NOW: u64 = 1_800_000_000;

    /// `openssl genrsa -traditional 2048` (PKCS#1).
    const RSA_PKCS1_PEM: &str = "\
-----BEGIN RSA PRIVATE KEY-----\n\
MIIEpAIBAAKCAQEAtB7wT2yu20MJCvsqXcc1eZ/IqRZPqmBppyn9w200zOGpUiv9\n\
TxitJj1vrZ1A7RuRz/oaQ6LS3Rjduwp482WDx4YmB4OC0Cf0+YY5qDUi5FzmkKN7\n\
5i1irSLTZDZjV19xXaMjoDTb2dQgZl4ogczBGYyquRM5484jSIuEiEiqLd0H//+r\n\
LcOaRUZkn2m7VX3URedP8Y9rwR973KKRbYaLIhylYUh1aSeG8ySM77IlxuvxmcvO\n\
Q0XxQxa4761WyFzI+jhBSXS2danWRvjQGi2AtpYR9wJtsyb+oHBrN1ftzkDrDVCg\n\
USpnIewugAIl4tKQHZTZEeXnFkaT2oFQbxvtaQIDAQABAoIBABx5VJt1rqm2TfBo\n\
trCW/JbiwcWrI4JnVeRpcLaLZcCqvsng7t0pZTvpk+VB+gDRrioO20aMb6Gom+rE\n\
08yEZIHu7MWczlnqKyGkDKrQ5ZhssD02vvArBhGhMwJBT9CA48q97rSVjpi/njSY\n\
l3Y3gGIx2M5Dog/nZzABcDzcIdz4c12L1YkXxgiZg66s89pB27OVPxbkeyPuDH6P\n\
I3TjTKsK+avqmLsgwrE9kp2DueyaUUVOTcbD3PyKITaiRGdnZKl7+eZI4LjqEHi9\n\
bJRtZnH2N0wPpubm1PQZ+v6vQZIZZm7/LF53Go96zBva4OBcmTu96FTI9YsgbHzD\n\
ZIrv++UCgYEA4nIfCkohELOy6a6QfQkmFroQZIOQWSbh2MnFbl8cm631JbqmNp3N\n\
dsB/eJEPE0Qk2HAQ7e+q0UsP+f7gEfvYifKob+xIdzOCbqRgMwUQunwoOn7N1GRq\n\
zpZ8yzY/uspszK/x6AggTKPMmUi1BbIo3MbCZqVYvxSE6nlfxtOW+S0CgYEAy6EI\n\
9YWsoNLgdoHDIi+DdZSQOgv27hI7svvxMdtZzfz4FNOqv31sY9pZnot9P87lhOtl\n\
yTPhmnuKom5rwB8VVA3wj0b5/97YHrcQjBX1joq4PJAeofq42vutXDicft2HcXXS\n\
69BxnlYJAh1Zn4nicCnKhP0b6+qnUwa7qehN8q0CgYEAxbD59mK3MTygwrA6xl45\n\
WXgBHa9aUurGGxwz9+KjOCqLre+gcmgb20O9RYXmklxYinhz3zXwfB27CfcAqdKj\n\
vfMSJ/wxW5ellHB+56vRae1AtajEi1tLf6YTttlak/lrONuWJosJn78UvPGj0CA0\n\
2mHPkAtkShVg4M8r1Yod8NUCgYEAx16FzQ3yNQwC5USrbz8h8O9iPtMUE4gal2WB\n\
g5UGWl5B7vJHDXGZvDI+6LIeEWla40cuw05epsgqtlpyeQp18XQsgbu2bkUbSQdn\n\
1iBx6fv74qAgvesjLpSX6eErqDLxt67qsiPF+oa2DzH5W/C+mZ7xQEApJFT9Opcv\n\
Cm3+U4kCgYAmd0Ri5/8COZT6xh7k8zttSLEgVCORd+R4dtfn105KMSnx/i2peab5\n\
oc21niNu7CWnGpEJ3nRg/FheWFj6qLWfjOYbuHi53exokQFbEua00iiIIjHl1Fz+\n\
yqd5CWegI5Cse6f9JC6h3nKXSYJn41VI2y/OSzb0HA/ldKqZgRHRIQ==\n\
-----END RSA PRIVATE KEY-----\n\
";
    const RSA_PKCS1_N_PREFIX: &str = "tB7wT2yu20MJCvsqXcc1";

    /// `openssl ecparam -genkey -name prime256v1 -noout` (SEC1).
    const EC_P256_SEC1_PEM: &str = "\
-----BEGIN EC PRIVATE KEY-----\n\
MHcCAQEEIAqFUMIaf9fGjqkqF9wQngpn7rhSZf/xNjH5aJtCtYIzoAoGCCqGSM49\n\
AwEHoUQDQgAERSCwXEspeLo8xWc7zTBfgyXEGJKWWvNVn3QcqzCe62lWeirryWcl\n\
GzGEpgbTOpaVziFkYm7pJSXZzGSE+zbdYA==\n\
-----END EC PRIVATE KEY-----\n\
";
    const EC_P256_SEC1_X: &str = "RSCwXEspeLo8xWc7zTBfgyXEGJKWWvNVn3QcqzCe62k";

    /// `openssl ecparam -genkey -name secp384r1` (SEC1, with an EC PARAMETERS block).
    const EC_P384_SEC1_PEM: &str = "\
-----BEGIN EC PARAMETERS-----\n\
BgUrgQQAIg==\n\
-----END EC PARAMETERS-----\n\
-----BEGIN EC PRIVATE KEY-----\n\
MIGkAgEBBDAsgwmSRAIGaaT/6/KFL2Y0UYRaFsKXk9yg6vWAzEYwrmhB1ifyGNec\n\
QboM/HOJ3WmgBwYFK4EEACKhZANiAAS6X2dYR2cUV/0G/xPdDm65reBrkR/NRc5g\n\
90veoXgSofFp1uvo58TXown02HBafAanFjXNIOFR5QCLLHyUqaWmyewptu1iMHru\n\
thiDQNZOyxQ1T1/B91jy9/3JOOYE+iQ=\n\
-----END EC PRIVATE KEY-----\n\
";
    const EC_P384_SEC1_X: &str = "ul9nWEdnFFf9Bv8T3Q5uua3ga5EfzUXOYPdL3qF4EqHxadbr6OfE16MJ9NhwWnwG";

    /// Check an X.509 / PKCS#10 signature with aws-lc (x509-parser cannot verify P-521), and
    /// that the signature algorithm is the one expected for the key.
    fn verify_x509_sig(tbs: &[u8], sig_alg: &Oid<'_>, sig: &[u8], spki: &SubjectPublicKeyInfo) {
        let valg: &'static dyn VerificationAlgorithm =
            match (sig_alg.to_id_string().as_str(), spki_key_type(spki)) {
                ("1.2.840.113549.1.1.11", Some(KeyType::Rsa { .. })) => {
                    &signature::RSA_PKCS1_2048_8192_SHA256
                }
                ("1.2.840.10045.4.3.2", Some(KeyType::Ec { curve: Curve::P256 })) => {
                    &signature::ECDSA_P256_SHA256_ASN1
                }
                ("1.2.840.10045.4.3.3", Some(KeyType::Ec { curve: Curve::P384 })) => {
                    &signature::ECDSA_P384_SHA384_ASN1
                }
                ("1.2.840.10045.4.3.4", Some(KeyType::Ec { curve: Curve::P521 })) => {
                    &signature::ECDSA_P521_SHA512_ASN1
                }
                other => panic!("unexpected signature algorithm {other:?}"),
            };
        UnparsedPublicKey::new(valg, spki.raw)
            .verify(tbs, sig)
            .unwrap();
    }

    fn digest_for(alg: &str, msg: &[u8]) -> Vec<u8> {
        let d = match &alg[2..] {
            "256" => &digest::SHA256,
            "384" => &digest::SHA384,
            _ => &digest::SHA512,
        };
        digest::digest(d, msg).as_ref().to_vec()
    }

    fn check_sign_verify(key: &KvKey, alg: &str, sig_len: usize) {
        let d = digest_for(alg, b"payload");
        let sig = key.sign(alg, &d).unwrap();
        assert_eq!(sig.len(), sig_len, "{alg}");
        assert!(key.verify(alg, &d, &sig).unwrap(), "{alg}");
        let jwk = Value::Object(key.public_jwk());
        assert!(
            verify_with_public_jwk(&jwk, alg, &d, &sig).unwrap(),
            "{alg}"
        );
        let mut tampered = d.clone();
        tampered[0] ^= 1;
        assert!(!key.verify(alg, &tampered, &sig).unwrap(), "{alg}");
        assert!(!verify_with_public_jwk(&jwk, alg, &tampered, &sig).unwrap());
        let mut bad_sig = sig.clone();
        bad_sig[sig_len / 2] ^= 1;
        assert!(!key.verify(alg, &d, &bad_sig).unwrap(), "{alg}");
        assert!(!key.verify(alg, &d, &sig[1..]).unwrap(), "{alg}");
    }

    #[test]
    fn rsa_generate_sign_verify() {
        let key = KvKey::generate(KeyType::Rsa { bits: 2048 }).unwrap();
        assert_eq!(key.key_type(), KeyType::Rsa { bits: 2048 });
        for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
            check_sign_verify(&key, alg, 256);
        }
        for bits in [3072, 4096] {
            let key = KvKey::generate(KeyType::Rsa { bits }).unwrap();
            assert_eq!(key.key_type(), KeyType::Rsa { bits });
            check_sign_verify(&key, "PS256", bits as usize / 8);
        }
        assert!(matches!(
            KvKey::generate(KeyType::Rsa { bits: 1024 }),
            Err(PkiError::Unsupported(_))
        ));
        let d = digest_for("RS256", b"x");
        assert!(matches!(
            key.sign("ES256", &d),
            Err(PkiError::InvalidInput(_))
        ));
        assert!(matches!(
            key.sign("HS256", &d),
            Err(PkiError::Unsupported(_))
        ));
        assert!(matches!(
            key.sign("RS384", &d),
            Err(PkiError::InvalidInput(_))
        ));
        assert!(matches!(
            key.verify("RS512", &d, &[0; 256]),
            Err(PkiError::InvalidInput(_))
        ));
        assert!(matches!(
            key.verify("ES256", &d, &[0; 64]),
            Err(PkiError::InvalidInput(_))
        ));
    }

    #[test]
    fn ec_generate_sign_verify() {
        for (curve, alg, len) in [
            (Curve::P256, "ES256", 64),
            (Curve::P384, "ES384", 96),
            (Curve::P521, "ES512", 132),
        ] {
            let key = KvKey::generate(KeyType::Ec { curve }).unwrap();
            assert_eq!(key.key_type(), KeyType::Ec { curve });
            check_sign_verify(&key, alg, len);
            let d = digest_for(alg, b"x");
            assert!(matches!(
                key.sign("RS256", &d),
                Err(PkiError::InvalidInput(_))
            ));
            let other = if alg == "ES256" { "ES384" } else { "ES256" };
            assert!(matches!(
                key.sign(other, &d),
                Err(PkiError::InvalidInput(_))
            ));
            assert!(matches!(
                key.sign(alg, &d[1..]),
                Err(PkiError::InvalidInput(_))
            ));
            // Reloading from PKCS#8 keeps the curve and the key.
            let again = KvKey::from_pkcs8(key.pkcs8()).unwrap();
            assert_eq!(again.key_type(), key.key_type());
            assert_eq!(again.public_jwk(), key.public_jwk());
        }
        assert_eq!(Curve::parse("P-521"), Some(Curve::P521));
        assert_eq!(Curve::parse("P-256K"), None);
        assert_eq!(Curve::P384.name(), "P-384");
    }

    #[test]
    fn rsa_encrypt_decrypt() {
        let key = KvKey::generate(KeyType::Rsa { bits: 2048 }).unwrap();
        for alg in ["RSA1_5", "RSA-OAEP", "RSA-OAEP-256"] {
            let ct = key
                .encrypt(alg, b"a 32 byte content encryption key")
                .unwrap();
            assert_eq!(ct.len(), 256);
            assert_eq!(
                key.decrypt(alg, &ct).unwrap(),
                b"a 32 byte content encryption key"
            );
            assert!(key.decrypt(alg, &[0u8; 256]).is_err());
            assert!(key.decrypt(alg, &[7u8; 256]).is_err());
            assert!(matches!(
                key.decrypt(alg, b"short"),
                Err(PkiError::InvalidInput(_))
            ));
            assert!(matches!(
                key.encrypt(alg, &[1u8; 300]),
                Err(PkiError::InvalidInput(_))
            ));
        }
        let ct = key.encrypt("RSA-OAEP-256", b"x").unwrap();
        assert!(key.decrypt("RSA-OAEP", &ct).is_err());
        assert!(matches!(
            key.encrypt("A128KW", b"x"),
            Err(PkiError::Unsupported(_))
        ));
        let ec = KvKey::generate(KeyType::Ec { curve: Curve::P256 }).unwrap();
        assert!(matches!(
            ec.encrypt("RSA-OAEP", b"x"),
            Err(PkiError::InvalidInput(_))
        ));
        assert!(matches!(
            ec.decrypt("RSA-OAEP", &[0; 256]),
            Err(PkiError::InvalidInput(_))
        ));
    }

    fn decode(v: &Value) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(v.as_str().unwrap()).unwrap()
    }

    /// A private RSA JWK from the key's PKCS#8 (PrivateKeyInfo -> RSAPrivateKey integers).
    fn rsa_private_jwk(key: &KvKey) -> Value {
        let (_, info) = parse_der(key.pkcs8()).unwrap();
        let inner = info.as_sequence().unwrap()[2].as_slice().unwrap();
        let (_, rsa) = parse_der(inner).unwrap();
        let ints: Vec<String> = rsa
            .as_sequence()
            .unwrap()
            .iter()
            .map(|o| match o.content {
                BerObjectContent::Integer(b) => b64(trim_zeros(b)),
                _ => panic!("not an integer"),
            })
            .collect();
        let mut jwk = key.public_jwk();
        for (i, name) in ["n", "e", "d", "p", "q", "dp", "dq", "qi"]
            .iter()
            .enumerate()
        {
            jwk.insert((*name).into(), ints[i + 1].clone().into());
        }
        Value::Object(jwk)
    }

    #[test]
    fn public_jwk_shapes_and_private_jwk_import() {
        let rsa = KvKey::generate(KeyType::Rsa { bits: 2048 }).unwrap();
        let jwk = rsa.public_jwk();
        let mut names: Vec<&str> = jwk.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["e", "kty", "n"]);
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["e"], "AQAB");
        assert_eq!(decode(&jwk["n"]).len(), 256);

        let private = rsa_private_jwk(&rsa);
        let imported = KvKey::from_jwk(&private).unwrap();
        assert_eq!(imported.public_jwk(), rsa.public_jwk());
        assert_eq!(imported.pkcs8(), rsa.pkcs8());
        let d = digest_for("RS256", b"jwk");
        let sig = imported.sign("RS256", &d).unwrap();
        assert!(rsa.verify("RS256", &d, &sig).unwrap());
        let mut missing = private.clone();
        missing.as_object_mut().unwrap().remove("qi");
        assert!(matches!(
            KvKey::from_jwk(&missing),
            Err(PkiError::InvalidInput(_))
        ));
        let mut wrong = private.clone();
        wrong["d"] = private["p"].clone();
        assert!(KvKey::from_jwk(&wrong).is_err());

        for (curve, len) in [(Curve::P256, 32), (Curve::P384, 48), (Curve::P521, 66)] {
            let ec = KvKey::generate(KeyType::Ec { curve }).unwrap();
            let jwk = ec.public_jwk();
            let mut names: Vec<&str> = jwk.keys().map(String::as_str).collect();
            names.sort();
            assert_eq!(names, ["crv", "kty", "x", "y"]);
            assert_eq!(jwk["kty"], "EC");
            assert_eq!(jwk["crv"], curve.name());
            assert_eq!(decode(&jwk["x"]).len(), len);
            assert_eq!(decode(&jwk["y"]).len(), len);

            let mut private = jwk.clone();
            private.insert("d".into(), b64(&ec_private_scalar(&ec).unwrap()).into());
            let private = Value::Object(private);
            let imported = KvKey::from_jwk(&private).unwrap();
            assert_eq!(imported.key_type(), KeyType::Ec { curve });
            assert_eq!(imported.public_jwk(), jwk);
            let alg = curve.jws_alg();
            let d = digest_for(alg, b"jwk");
            let sig = imported.sign(alg, &d).unwrap();
            assert!(ec.verify(alg, &d, &sig).unwrap());
            // A public point that does not belong to d is rejected.
            let other = KvKey::generate(KeyType::Ec { curve }).unwrap().public_jwk();
            let mut wrong = private.clone();
            wrong["x"] = other["x"].clone();
            wrong["y"] = other["y"].clone();
            assert!(KvKey::from_jwk(&wrong).is_err());
        }
        assert!(matches!(
            KvKey::from_jwk(&json!({"kty": "oct", "k": "AAAA"})),
            Err(PkiError::Unsupported(_))
        ));
        assert!(matches!(
            KvKey::from_jwk(&json!({"kty": "EC", "crv": "P-256K", "x": "", "y": "", "d": ""})),
            Err(PkiError::Unsupported(_))
        ));
    }

    fn full_spec() -> CertSpec {
        CertSpec {
            subject: "CN=app.example.com, O=Contoso, OU=Eng, L=Redmond, ST=WA, C=US".into(),
            dns_names: vec!["app.example.com".into(), "www.example.com".into()],
            emails: vec!["admin@example.com".into()],
            upns: vec!["user@contoso.com".into()],
            uris: vec!["https://app.example.com/id".into()],
            ip_addresses: vec!["10.0.0.1".into(), "::1".into()],
            ekus: vec![
                "1.3.6.1.5.5.7.3.1".into(),
                "1.3.6.1.5.5.7.3.2".into(),
                "1.3.6.1.4.1.311.10.3.12".into(),
            ],
            key_usage: vec!["digitalSignature".into(), "keyEncipherment".into()],
            not_before: NOW,
            not_after: NOW + 365 * 86_400,
            is_ca: false,
        }
    }

    fn check_info(info: &CertInfo, spec: &CertSpec) {
        assert_eq!(
            info.subject,
            "CN=app.example.com, O=Contoso, OU=Eng, L=Redmond, S=WA, C=US"
        );
        assert_eq!(info.dns_names, spec.dns_names);
        assert_eq!(info.emails, spec.emails);
        assert_eq!(info.upns, spec.upns);
        assert_eq!(info.uris, spec.uris);
        assert_eq!(info.ip_addresses, spec.ip_addresses);
        assert_eq!(info.ekus, spec.ekus);
        assert_eq!(info.key_usage, spec.key_usage);
        assert_eq!(info.not_before, spec.not_before);
        assert_eq!(info.not_after, spec.not_after);
        assert_eq!(info.is_ca, spec.is_ca);
    }

    #[test]
    fn self_signed_and_cert_info() {
        let spec = full_spec();
        let other = KvKey::generate(KeyType::Ec { curve: Curve::P256 }).unwrap();
        for t in [
            KeyType::Rsa { bits: 2048 },
            KeyType::Ec { curve: Curve::P256 },
            KeyType::Ec { curve: Curve::P384 },
            KeyType::Ec { curve: Curve::P521 },
        ] {
            let key = KvKey::generate(t).unwrap();
            let der = self_signed(&spec, &key).unwrap();
            let info = cert_info(&der).unwrap();
            check_info(&info, &spec);
            assert_eq!(info.key_type, Some(t));
            assert_eq!(info.x5t, URL_SAFE_NO_PAD.encode(crate::sha1(&der)));
            assert_eq!(info.spki_der, key.spki_der());
            assert!(cert_matches_key(&der, &key));
            assert!(!cert_matches_key(&der, &other));
            assert!(!cert_matches_key(b"junk", &key));

            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert_eq!(cert.issuer().as_raw(), cert.subject().as_raw());
            let sig = &cert.signature_value.data;
            let spki = cert.public_key();
            verify_x509_sig(
                cert.tbs_certificate.as_ref(),
                &cert.signature_algorithm.algorithm,
                sig,
                spki,
            );
            // DER order is the reverse of the string: C first, CN last.
            let first = cert.subject().iter().next().unwrap().iter().next().unwrap();
            assert_eq!(first.attr_type().to_id_string(), "2.5.4.6");
            assert_eq!(cert.raw_serial().len(), 16);
            assert!(cert.raw_serial()[0] < 0x80);
        }
    }

    #[test]
    fn subject_strings() {
        let key = KvKey::generate(KeyType::Ec { curve: Curve::P256 }).unwrap();
        let subject_of = |s: &str| {
            let spec = CertSpec {
                subject: s.into(),
                not_before: NOW,
                not_after: NOW + 60,
                is_ca: true,
                ..Default::default()
            };
            let info = cert_info(&self_signed(&spec, &key).unwrap()).unwrap();
            assert!(info.is_ca);
            assert!(info.ekus.is_empty() && info.key_usage.is_empty());
            info.subject
        };
        assert_eq!(subject_of("CN=a,O=b"), "CN=a, O=b");
        assert_eq!(subject_of("cn = a ;o=b"), "CN=a, O=b");
        assert_eq!(
            subject_of("CN=\"Contoso, Ltd\", O=x\\, y, E=a@b.c, S=WA"),
            "CN=\"Contoso, Ltd\", O=\"x, y\", E=a@b.c, S=WA"
        );
        assert_eq!(subject_of("CN=a, OU=x, OU=y"), "CN=a, OU=x, OU=y");
        assert_eq!(
            subject_of("OID.2.5.4.97=VATDE-1, CN=a"),
            "OID.2.5.4.97=VATDE-1, CN=a"
        );
        let spec = |s: &str| CertSpec {
            subject: s.into(),
            not_before: NOW,
            not_after: NOW + 60,
            ..Default::default()
        };
        assert!(self_signed(&spec("CN"), &key).is_err());
        assert!(self_signed(&spec("XX=1"), &key).is_err());
        assert!(self_signed(&spec("CN=\"open"), &key).is_err());
        let mut bad = spec("CN=a");
        bad.not_after = NOW;
        assert!(matches!(
            self_signed(&bad, &key),
            Err(PkiError::InvalidInput(_))
        ));
        bad = spec("CN=a");
        bad.key_usage = vec!["signEverything".into()];
        assert!(matches!(
            self_signed(&bad, &key),
            Err(PkiError::InvalidInput(_))
        ));
        bad = spec("CN=a");
        bad.ip_addresses = vec!["10.0.0".into()];
        assert!(matches!(
            self_signed(&bad, &key),
            Err(PkiError::InvalidInput(_))
        ));
        bad = spec("CN=a");
        bad.ekus = vec!["serverAuth".into()];
        assert!(matches!(
            self_signed(&bad, &key),
            Err(PkiError::InvalidInput(_))
        ));
    }

    #[test]
    fn ca_issues_for_spec() {
        let (ca, _) = Ca::generate("Keyless test CA", NOW).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        let spec = full_spec();
        for t in [
            KeyType::Rsa { bits: 2048 },
            KeyType::Ec { curve: Curve::P384 },
        ] {
            let key = KvKey::generate(t).unwrap();
            let der = ca.issue_for_spec(&spec, &key).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
            cert.verify_signature(Some(ca_cert.public_key())).unwrap();
            let sig = &cert.signature_value.data;
            let alg = &cert.signature_algorithm.algorithm;
            verify_x509_sig(
                cert.tbs_certificate.as_ref(),
                alg,
                sig,
                ca_cert.public_key(),
            );
            assert!(cert.verify_signature(None).is_err());
            let info = cert_info(&der).unwrap();
            check_info(&info, &spec);
            assert_eq!(info.key_type, Some(t));
            assert!(cert_matches_key(&der, &key));
        }
    }

    #[test]
    fn csr_carries_subject_and_verifies() {
        let spec = full_spec();
        for t in [
            KeyType::Rsa { bits: 2048 },
            KeyType::Ec { curve: Curve::P521 },
        ] {
            let key = KvKey::generate(t).unwrap();
            let der = csr(&spec, &key).unwrap();
            let (_, req) = X509CertificationRequest::from_der(&der).unwrap();
            let info = &req.certification_request_info;
            let sig = &req.signature_value.data;
            let alg = &req.signature_algorithm.algorithm;
            verify_x509_sig(info.raw, alg, sig, &info.subject_pki);
            if t == (KeyType::Rsa { bits: 2048 }) {
                req.verify_signature().unwrap();
            }
            assert_eq!(
                format_dn(&info.subject),
                "CN=app.example.com, O=Contoso, OU=Eng, L=Redmond, S=WA, C=US"
            );
            assert_eq!(info.subject_pki.raw, key.spki_der().as_slice());
            let exts: Vec<_> = req.requested_extensions().unwrap().collect();
            assert!(exts.iter().any(|e| matches!(
                e,
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(s)
                    if s.general_names.len() == 7
            )));
        }
    }

    /// A CA certificate and a leaf it issued for `key`.
    fn chain_for(key: &KvKey) -> Vec<Vec<u8>> {
        let (ca, _) = Ca::generate("Keyless test CA", NOW).unwrap();
        let leaf = ca.issue_for_spec(&full_spec(), key).unwrap();
        vec![leaf, ca.cert_der().to_vec()]
    }

    #[test]
    fn pfx_round_trip() {
        for t in [
            KeyType::Rsa { bits: 2048 },
            KeyType::Ec { curve: Curve::P256 },
        ] {
            let key = KvKey::generate(t).unwrap();
            let chain = chain_for(&key);
            let pfx = build_pfx(Some(&key), &chain).unwrap();
            let (parsed, certs) = parse_pfx(&pfx, "").unwrap();
            let parsed = parsed.unwrap();
            assert_eq!(parsed.key_type(), t);
            assert_eq!(parsed.public_jwk(), key.public_jwk());
            assert_eq!(certs, chain);
            assert!(matches!(parse_pfx(&pfx, "wrong"), Err(PkiError::Pkcs12(_))));

            let certs_only = build_pfx(None, &chain).unwrap();
            let (none, certs) = parse_pfx(&certs_only, "").unwrap();
            assert!(none.is_none());
            assert_eq!(certs, chain);
        }
        assert!(matches!(
            parse_pfx(b"not a pfx", ""),
            Err(PkiError::Pkcs12(_))
        ));
        let key = KvKey::generate(KeyType::Ec { curve: Curve::P256 }).unwrap();
        assert!(build_pfx(Some(&key), &[b"junk".to_vec()]).is_err());
        assert!(build_pfx(None, &[b"junk".to_vec()]).is_err());
        let chain = chain_for(&key);
        let swapped = [chain[1].clone(), chain[0].clone()];
        assert!(matches!(
            build_pfx(Some(&key), &swapped),
            Err(PkiError::InvalidInput(_))
        ));
        // A key-only PFX.
        let (only, certs) = parse_pfx(&build_pfx(Some(&key), &[]).unwrap(), "").unwrap();
        assert_eq!(only.unwrap().pkcs8(), key.pkcs8());
        assert!(certs.is_empty());
    }

    #[test]
    fn pem_round_trip_and_ordering() {
        let key = KvKey::generate(KeyType::Ec { curve: Curve::P384 }).unwrap();
        let chain = chain_for(&key);
        let text = build_pem(Some(&key), &chain);
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert_eq!(text.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        let (parsed, certs) = parse_pem(&text).unwrap();
        assert_eq!(parsed.unwrap().pkcs8(), key.pkcs8());
        assert_eq!(certs, chain);

        // CA first and key last in the file: the leaf still comes first.
        let shuffled = build_pem(None, &[chain[1].clone(), chain[0].clone()])
            + &pem("PRIVATE KEY", key.pkcs8());
        let (parsed, certs) = parse_pem(&shuffled).unwrap();
        assert!(parsed.is_some());
        assert_eq!(certs, chain);
        // Without a key, as given.
        let (none, certs) =
            parse_pem(&build_pem(None, &[chain[1].clone(), chain[0].clone()])).unwrap();
        assert!(none.is_none());
        assert_eq!(certs, [chain[1].clone(), chain[0].clone()]);

        assert!(matches!(
            parse_pem("nothing here"),
            Err(PkiError::InvalidInput(_))
        ));
        assert!(matches!(
            parse_pem("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"),
            Err(PkiError::Unsupported(_))
        ));
        assert!(parse_pem(&pem("CERTIFICATE", b"junk")).is_err());
    }

    #[test]
    fn pem_pkcs1_and_sec1_keys() {
        let (rsa, certs) = parse_pem(RSA_PKCS1_PEM).unwrap();
        let rsa = rsa.unwrap();
        assert!(certs.is_empty());
        assert_eq!(rsa.key_type(), KeyType::Rsa { bits: 2048 });
        assert!(rsa.public_jwk()["n"]
            .as_str()
            .unwrap()
            .starts_with(RSA_PKCS1_N_PREFIX));
        check_sign_verify(&rsa, "RS256", 256);
        // Normalised to PKCS#8, which loads again.
        assert_eq!(
            KvKey::from_pkcs8(rsa.pkcs8()).unwrap().public_jwk(),
            rsa.public_jwk()
        );

        let (ec, _) = parse_pem(EC_P256_SEC1_PEM).unwrap();
        let ec = ec.unwrap();
        assert_eq!(ec.key_type(), KeyType::Ec { curve: Curve::P256 });
        assert_eq!(ec.public_jwk()["x"], EC_P256_SEC1_X);
        check_sign_verify(&ec, "ES256", 64);

        // With a certificate for the key ahead of it in the bundle.
        let cert = self_signed(&full_spec(), &ec).unwrap();
        let bundle = pem("CERTIFICATE", &cert) + EC_P384_SEC1_PEM;
        let (ec384, certs) = parse_pem(&bundle).unwrap();
        let ec384 = ec384.unwrap();
        assert_eq!(ec384.key_type(), KeyType::Ec { curve: Curve::P384 });
        assert_eq!(ec384.public_jwk()["x"], EC_P384_SEC1_X);
        assert_eq!(certs, vec![cert.clone()]);
        assert!(!cert_matches_key(&cert, &ec384));
        let (_, certs) = parse_pem(&(pem("CERTIFICATE", &cert) + EC_P256_SEC1_PEM)).unwrap();
        assert_eq!(certs, vec![cert]);
    }
}
