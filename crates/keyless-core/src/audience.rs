//! What a token audience may be: an absolute URI (RFC 3986 characters only — no whitespace,
//! control or non-ASCII characters, `%` always followed by two hex digits) or a GUID, at most
//! [`MAX_AUDIENCE_LEN`] characters. Every surface that takes a `resource` or `scope` (IMDS, the
//! VM-extension / App Service / Arc endpoints, NMI, the token endpoint) checks it here and
//! answers a failure in its own shape.
//!
//! Entra's application ID URIs are far shorter (identifier URIs are limited to a few hundred
//! characters), so the bound refuses nothing a real resource uses.

/// Longest audience accepted.
pub const MAX_AUDIENCE_LEN: usize = 512;
/// Longest `scope` parameter accepted by the token endpoint (the resource's `/.default` plus
/// the OpenID scopes MSAL adds).
pub const MAX_SCOPE_LEN: usize = MAX_AUDIENCE_LEN + 64;

/// Why an audience was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudienceError {
    Empty,
    TooLong,
    /// Neither an absolute URI nor a GUID.
    Invalid,
}

impl AudienceError {
    /// A description surfaces may use.
    pub fn describe(self) -> &'static str {
        match self {
            AudienceError::Empty => "Required audience parameter not specified",
            AudienceError::TooLong => "The resource parameter is too long",
            AudienceError::Invalid => "The resource parameter must be an absolute URI or a GUID",
        }
    }
}

/// `8-4-4-4-12` hex digits.
pub fn is_guid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn uri_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&c)
}

/// An absolute URI: `scheme ":" rest`, RFC 3986 characters, well-formed percent-encoding, and a
/// non-empty authority when `rest` starts with `//`.
pub fn is_absolute_uri(s: &str) -> bool {
    let b = s.as_bytes();
    if !b.iter().all(|c| uri_char(*c)) {
        return false;
    }
    for (i, c) in b.iter().enumerate() {
        if *c == b'%'
            && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return false;
        }
    }
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut sc = scheme.bytes();
    if !sc.next().is_some_and(|c| c.is_ascii_alphabetic())
        || !sc.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
        || rest.is_empty()
    {
        return false;
    }
    match rest.strip_prefix("//") {
        Some(after) => {
            let authority = after.split(['/', '?', '#']).next().unwrap_or("");
            !authority.is_empty()
        }
        None => true,
    }
}

/// A token endpoint `scope` parameter before it is split into scopes: bounded, and no control
/// characters (scopes are separated by spaces; a CR / LF is not a separator but an injection).
pub fn scope_well_formed(scope: &str) -> bool {
    scope.len() <= MAX_SCOPE_LEN && !scope.chars().any(char::is_control)
}

/// Check a token audience (`resource`, or a scope without its `/.default`).
pub fn check(resource: &str) -> Result<(), AudienceError> {
    if resource.is_empty() {
        return Err(AudienceError::Empty);
    }
    if resource.len() > MAX_AUDIENCE_LEN {
        return Err(AudienceError::TooLong);
    }
    if is_guid(resource) || is_absolute_uri(resource) {
        Ok(())
    } else {
        Err(AudienceError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_audiences_pass() {
        for r in [
            "https://management.azure.com/",
            "https://management.azure.com",
            "https://management.core.windows.net/",
            "https://vault.azure.net",
            "https://storage.azure.com/",
            "https://ossrdbms-aad.database.windows.net",
            "https://localhost:8443",
            "https://kv1.vault.localhost:8443",
            "api://AzureADTokenExchange",
            "api://9f2a1c3e-0000-4000-8000-000000000001/access",
            "6dae42f8-4368-4678-94ff-3960e28e3630",
            "00000003-0000-0000-C000-000000000000",
            "urn:ms-drs:enterpriseregistration.windows.net",
            "https://x/path%20with%2Fescapes?q=1&r=a+b#frag",
            "https://[::1]:8443/",
        ] {
            assert_eq!(check(r), Ok(()), "{r}");
        }
        assert_eq!(check(&format!("https://{}", "a".repeat(504))), Ok(()));
    }

    #[test]
    fn malformed_audiences_are_refused() {
        for r in [
            "%ZZ",
            "https://x/%ZZ",
            "https://x/%4",
            "https://x/%",
            "https://x/a\r\nSet-Cookie: y",
            "https://x/a\nb",
            "https://x/a b",
            "https://x/\u{7f}",
            "https://x/é",
            "https://x/<script>",
            "https://x/\"",
            "https://x/{a}",
            "x",
            "vault.azure.net",
            "/relative/path",
            ":nothing",
            "1http://x",
            "https:",
            "https://",
            "https:///path",
            "6dae42f8-4368-4678-94ff-3960e28e363",
            "6dae42f8_4368_4678_94ff_3960e28e3630",
        ] {
            assert_eq!(check(r), Err(AudienceError::Invalid), "{r:?}");
        }
        assert_eq!(check(""), Err(AudienceError::Empty));
        assert_eq!(
            check(&format!("https://{}", "a".repeat(60_000))),
            Err(AudienceError::TooLong)
        );
        assert_eq!(
            check(&format!("https://{}", "a".repeat(505))),
            Err(AudienceError::TooLong)
        );
    }

    #[test]
    fn scope_parameters() {
        assert!(scope_well_formed(
            "https://vault.azure.net/.default offline_access openid profile"
        ));
        assert!(!scope_well_formed("https://x/a\r\nb/.default"));
        assert!(!scope_well_formed("https://x/.default\topenid"));
        assert!(!scope_well_formed(&format!(
            "https://{}/.default",
            "a".repeat(60_000)
        )));
    }
}
