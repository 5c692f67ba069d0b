//! When a cached token is renewed and when it may still be handed out.
//!
//! Clients treat a token with less than 5 minutes left as expired (MSAL-Python, azure-identity,
//! the Rust crate), so the agent renews at half life and never serves a token with less than
//! `min(10 min, lifetime / 4)` left.

/// Whether a token issued at `iat` and expiring at `exp` should be renewed at `now`.
pub fn refresh_due(iat: u64, exp: u64, now: u64) -> bool {
    let lifetime = exp.saturating_sub(iat);
    now >= iat + lifetime / 2
}

/// Whether the token may still be served at `now`.
pub fn servable(iat: u64, exp: u64, now: u64) -> bool {
    let lifetime = exp.saturating_sub(iat);
    let margin = (lifetime / 4).min(600);
    exp > now + margin
}

/// When a host credential (client certificate) valid from `not_before` to `not_after` should be
/// rotated: at two thirds of its lifetime.
pub fn rotate_credential_at(not_before: u64, not_after: u64) -> u64 {
    not_before + not_after.saturating_sub(not_before) * 2 / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life_and_stops_serving_near_expiry() {
        let (iat, exp) = (1000, 1000 + 86_400);
        assert!(!refresh_due(iat, exp, 1000 + 43_199));
        assert!(refresh_due(iat, exp, 1000 + 43_200));
        assert!(servable(iat, exp, exp - 601));
        assert!(!servable(iat, exp, exp - 600));
        // short lifetimes: margin is a quarter
        assert!(servable(0, 100, 74));
        assert!(!servable(0, 100, 75));
    }

    #[test]
    fn credential_rotation_point() {
        assert_eq!(rotate_credential_at(0, 300), 200);
        assert_eq!(rotate_credential_at(10, 10), 10);
    }
}
