//! Certificate client credentials: a `client_assertion` JWT signed with a certificate registered
//! on a service principal. Accepts what the SDKs send (§4.2 of the protocol notes): RS256 with
//! `x5t` or PS256 with `x5t#S256`, thumbprints in base64url or standard base64, padded or not,
//! padded JWT segments, float `exp`/`iat`, missing `iat`/`nbf`; `aud` = our v2 or v1 token URL.

use crate::error::{Aadsts, Result, ServerError};
use crate::state::AppState;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use keyless_core::claims;
use keyless_store::ServicePrincipalRecord;

const SKEW: u64 = 300;

fn lenient_b64(s: &str) -> Option<Vec<u8>> {
    let t = s.trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(t)
        .ok()
        .or_else(|| STANDARD.decode(s).ok())
        .or_else(|| {
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(t)
                .ok()
        })
}

fn invalid(code: Aadsts, msg: impl Into<String>) -> ServerError {
    ServerError::sts(code, msg)
}

/// Verify `assertion` as a certificate credential of `sp`; `token_urls` are the audiences
/// accepted (the endpoint the client posted to, in its v2 and v1 forms).
pub fn verify(
    s: &AppState,
    sp: &ServicePrincipalRecord,
    assertion: &str,
    token_urls: &[String],
) -> Result<()> {
    let d = claims::decode(assertion.trim()).map_err(|_| {
        ServerError::sts(
            Aadsts::MalformedJwt,
            "Invalid JWT token. The token is malformed.",
        )
    })?;
    let alg = d.header.alg.as_str();
    let thumb = |t: &Option<String>| t.as_deref().and_then(lenient_b64);
    let (s256, s1) = (thumb(&d.header.x5t_s256), thumb(&d.header.x5t));
    let cert = sp.certificates.iter().find(|c| {
        s256.as_ref().is_some_and(|t| *t == keyless_pki::sha256(c))
            || s1.as_ref().is_some_and(|t| *t == keyless_pki::sha1(c))
    });
    let Some(cert) = cert else {
        return Err(invalid(Aadsts::AssertionSignature, "Client assertion failed signature validation: the certificate thumbprint does not match a certificate registered for this application."));
    };
    let key = keyless_pki::cert_rsa_public(cert).ok_or_else(|| {
        invalid(
            Aadsts::AssertionSignature,
            "The registered certificate has no RSA key.",
        )
    })?;
    if !keyless_pki::verify_rsa(&key, alg, d.signing_input.as_bytes(), &d.signature) {
        return Err(invalid(
            Aadsts::AssertionSignature,
            format!("Client assertion failed signature validation (algorithm '{alg}')."),
        ));
    }
    let c = &d.claims;
    let text = |k: &str| c[k].as_str().unwrap_or("").to_string();
    if !text("iss").eq_ignore_ascii_case(&sp.client_id)
        || !text("sub").eq_ignore_ascii_case(&sp.client_id)
    {
        return Err(invalid(
            Aadsts::InvalidClientAssertion,
            "Client assertion application identifier doesn't match 'client_id' parameter.",
        ));
    }
    let auds: Vec<String> = claims::audiences(c)
        .into_iter()
        .map(str::to_string)
        .collect();
    if !auds.iter().any(|a| {
        token_urls
            .iter()
            .any(|u| u.eq_ignore_ascii_case(a.trim_end_matches('/')))
    }) {
        return Err(invalid(Aadsts::InvalidClientAssertion, format!("Client assertion audience claim does not match Realm issuer. Review the documentation at https://aka.ms/certCreds . Audience: '{}'.", auds.join(","))));
    }
    let now = s.now();
    let num = |k: &str| c[k].as_f64().map(|f| f as u64);
    let exp = num("exp").ok_or_else(|| {
        invalid(
            Aadsts::AssertionOutOfTime,
            "Client assertion has no expiry.",
        )
    })?;
    let nbf = num("nbf").or(num("iat")).unwrap_or(0);
    if exp + SKEW <= now || nbf > now + SKEW {
        return Err(invalid(
            Aadsts::AssertionOutOfTime,
            "Client assertion is not within its valid time range.",
        ));
    }
    Ok(())
}
