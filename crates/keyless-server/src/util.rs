//! Small helpers: random values, time formatting.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// `n` random bytes, base64url without padding.
pub fn random_b64url(n: usize) -> String {
    let mut b = vec![0u8; n];
    // aws-lc's RNG does not fail in practice; an all-zero value would still be unique per uuid use.
    let _ = aws_lc_rs::rand::fill(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// A new client secret: 32 random bytes, base64url — never starting with `-`, which command
/// lines read as an option (`az login -p <secret>` refuses one; Entra's secrets never start
/// with it either).
pub fn new_client_secret() -> String {
    loop {
        let s = random_b64url(32);
        if !s.starts_with('-') {
            return s;
        }
    }
}

pub fn new_guid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `YYYY-MM-DD hh:mm:ssZ` (the STS error `timestamp` form).
pub fn format_utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let (y, m, d) = keyless_core::clock::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// ISO-8601 `YYYY-MM-DDThh:mm:ssZ`.
pub fn format_iso(unix: u64) -> String {
    format_utc(unix).replacen(' ', "T", 1)
}

pub fn utc_timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_secrets_never_start_with_a_dash() {
        // one in 64 draws starts with '-': 2,000 draws would show it
        let all: Vec<String> = (0..2_000).map(|_| new_client_secret()).collect();
        assert!(all.iter().all(|s| !s.starts_with('-') && s.len() == 43));
        assert!(all.iter().any(|s| s.contains('-')), "still base64url");
    }

    #[test]
    fn formats_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_utc(1_768_695_376), "2026-01-18 00:16:16Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00Z");
    }
}
