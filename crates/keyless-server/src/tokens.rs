//! Minting and checking our own access tokens.

use crate::error::{Result, ServerError};
use crate::state::AppState;
use keyless_core::claims::{self, IssueContext, JwtError, JwtHeader, Principal};
use std::sync::Arc;

/// A minted token.
pub struct Minted {
    pub access_token: String,
    pub not_before: u64,
    pub expires_on: u64,
}

/// Sign an access token for `principal` with audience `audience`.
pub fn mint(
    state: &AppState,
    principal: &Principal,
    audience: &str,
    lifetime: u64,
) -> Result<Minted> {
    let now = state.now();
    let signer = state.keys.signer(now).ok_or(ServerError::NoSigningKey)?;
    let issuer = state.issuer_v1();
    let uti = crate::util::random_b64url(16);
    let ctx = IssueContext {
        issuer,
        tenant_id: &state.tenant_id,
        tenant_created: state.tenant_created,
        audience,
        now,
        lifetime_secs: lifetime,
        uti: &uti,
    };
    let c = claims::access_token_claims(&ctx, principal);
    let input = claims::signing_input(&JwtHeader::rs256(&signer.state.kid), &c);
    let sig = signer.key.sign(input.as_bytes())?;
    Ok(Minted {
        access_token: claims::assemble(&input, &sig),
        not_before: c.nbf,
        expires_on: c.exp,
    })
}

/// Verify one of our tokens (signature with a published key, time, issuer, audience) and
/// return its claims (shared with the verification cache: nothing is copied per request).
pub fn verify(
    state: &AppState,
    token: &str,
    audiences: &[String],
) -> std::result::Result<Arc<serde_json::Value>, JwtError> {
    let digest = keyless_pki::sha256(token.as_bytes());
    let claims = match state.verified.get(&digest) {
        Some((kid, c)) if state.keys.by_kid(&kid).is_some() => c,
        _ => {
            let (kid, c) = verify_signature(state, token)?;
            let c = Arc::new(c);
            state.verified.put(digest, kid, c.clone());
            c
        }
    };
    let (v1, v2) = (state.issuer_v1(), state.issuer_v2());
    let auds: Vec<&str> = audiences.iter().map(String::as_str).collect();
    claims::validate_claims(&claims, state.now(), 300, &[v1, v2], &auds)?;
    Ok(claims)
}

/// The signature check: RS256 with a published key. Returns the kid and the claims.
fn verify_signature(
    state: &AppState,
    token: &str,
) -> std::result::Result<(String, serde_json::Value), JwtError> {
    let d = claims::decode(token)?;
    if d.header.alg != "RS256" {
        return Err(JwtError::Algorithm(d.header.alg));
    }
    let kid = d
        .header
        .kid
        .as_deref()
        .or(d.header.x5t.as_deref())
        .ok_or(JwtError::Signature)?;
    let key = state.keys.by_kid(kid).ok_or(JwtError::Signature)?;
    if !keyless_pki::verify_rs256(&key.key.public(), d.signing_input.as_bytes(), &d.signature) {
        return Err(JwtError::Signature);
    }
    Ok((kid.to_string(), d.claims))
}
