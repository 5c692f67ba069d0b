//! Key Vault, as pure rules: names, api-versions, object ids, the data-plane routes, what each
//! operation needs (access-policy permission or RBAC data action), certificate policies and
//! their renewal points, and list paging. The server does the IO around these.

pub mod access;
pub mod paging;
pub mod policy;
pub mod route;

/// Data-plane api-versions the current SDKs send (python secrets/certificates 4.12 send
/// `2026-04-01`, python keys 4.11 and the node packages `2025-07-01`, older clients `7.x`).
pub const DATA_API_VERSIONS: &[&str] = &[
    "7.0",
    "7.1",
    "7.2",
    "7.3",
    "7.4",
    "7.5",
    "7.6",
    "7.6-preview.2",
    "2025-07-01",
    "2026-04-01",
];

/// The newest data-plane api-version (named in the unknown-version error).
pub const LATEST_DATA_API_VERSION: &str = "2026-04-01";

/// Whether the data plane accepts `v` (the listed ones and any `*-preview*`).
pub fn data_api_version_ok(v: &str) -> bool {
    DATA_API_VERSIONS.contains(&v)
        || (v.contains("-preview") && v.chars().next().is_some_and(|c| c.is_ascii_digit()))
}

/// `Microsoft.KeyVault` control-plane api-versions.
pub const ARM_API_VERSIONS: &[&str] = &[
    "2015-06-01",
    "2016-10-01",
    "2018-02-14",
    "2019-09-01",
    "2021-04-01-preview",
    "2021-06-01-preview",
    "2021-10-01",
    "2021-11-01-preview",
    "2022-02-01-preview",
    "2022-07-01",
    "2022-11-01",
    "2023-02-01",
    "2023-07-01",
    "2023-08-01-preview",
    "2024-04-01-preview",
    "2024-11-01",
    "2024-12-01-preview",
    "2025-05-01",
    // az 2.91 `keyvault create|show|list`
    "2026-02-01",
];

/// Vault name: 3–24 characters of `[0-9a-zA-Z-]`, starting with a letter, ending with a letter
/// or digit, no `--`.
pub fn validate_vault_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = (3..=24).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0].is_ascii_alphabetic()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "The vault name '{name}' is invalid. A vault's name must be between 3-24 alphanumeric characters. The name must begin with a letter, end with a letter or digit, and not contain consecutive hyphens."
        ))
    }
}

/// Object (secret, key, certificate) name: 1–127 characters of `[0-9a-zA-Z-]`.
pub fn valid_object_name(name: &str) -> bool {
    (1..=127).contains(&name.len()) && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

/// Object version: 32 lowercase hex digits.
pub fn valid_version(v: &str) -> bool {
    v.len() == 32
        && v.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Why a secret's version may not be read at `now` (`get`): (error code, Key Vault's sentence).
/// A disabled version never; a plain secret outside its `nbf`..`exp` window neither (a
/// certificate's own secret, `managed`, stays readable so an expired certificate can still be
/// downloaded). The data plane's GET and a deployment's Key Vault reference both ask this.
pub fn secret_unreadable(
    enabled: bool,
    managed: bool,
    nbf: Option<u64>,
    exp: Option<u64>,
    now: u64,
) -> Option<(&'static str, &'static str)> {
    if !enabled {
        return Some((
            "SecretDisabled",
            "Operation get is not allowed on a disabled secret.",
        ));
    }
    if managed {
        return None;
    }
    if nbf.is_some_and(|n| now < n) {
        return Some((
            "SecretNotYetValid",
            "Operation get is not allowed on a secret that is not yet valid (nbf).",
        ));
    }
    if exp.is_some_and(|e| now >= e) {
        return Some((
            "SecretExpired",
            "Operation get is not allowed on an expired secret.",
        ));
    }
    None
}

/// The three object collections of a vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coll {
    Secrets,
    Keys,
    Certificates,
}

impl Coll {
    pub const ALL: [Coll; 3] = [Coll::Secrets, Coll::Keys, Coll::Certificates];

    /// Path segment (`secrets`), also the store's collection name.
    pub fn path(self) -> &'static str {
        match self {
            Coll::Secrets => "secrets",
            Coll::Keys => "keys",
            Coll::Certificates => "certificates",
        }
    }
    /// Path segment of the deleted collection (`deletedsecrets`).
    pub fn deleted_path(self) -> &'static str {
        match self {
            Coll::Secrets => "deletedsecrets",
            Coll::Keys => "deletedkeys",
            Coll::Certificates => "deletedcertificates",
        }
    }
    /// `Secret`, `Key`, `Certificate` (messages and error codes).
    pub fn noun(self) -> &'static str {
        match self {
            Coll::Secrets => "Secret",
            Coll::Keys => "Key",
            Coll::Certificates => "Certificate",
        }
    }
    pub fn from_path(seg: &str) -> Option<(Coll, bool)> {
        Coll::ALL.into_iter().find_map(|c| {
            if seg.eq_ignore_ascii_case(c.path()) {
                Some((c, false))
            } else if seg.eq_ignore_ascii_case(c.deleted_path()) {
                Some((c, true))
            } else {
                None
            }
        })
    }
    /// 404 code, e.g. `SecretNotFound`.
    pub fn not_found_code(self) -> String {
        format!("{}NotFound", self.noun())
    }
}

/// `https://{host}/{coll}/{name}[/{version}]`.
pub fn object_id(base: &str, coll: Coll, name: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{base}/{}/{name}/{v}", coll.path()),
        None => format!("{base}/{}/{name}", coll.path()),
    }
}

/// `https://{host}/deleted{coll}/{name}`.
pub fn recovery_id(base: &str, coll: Coll, name: &str) -> String {
    format!("{base}/{}/{name}", coll.deleted_path())
}

/// The `recoveryLevel` attribute for a vault's soft-delete settings.
pub fn recovery_level(
    soft_delete: bool,
    retention_days: u32,
    purge_protection: bool,
) -> &'static str {
    match (soft_delete, retention_days < 90, purge_protection) {
        (false, _, _) => "Purgeable",
        (true, false, false) => "Recoverable+Purgeable",
        (true, false, true) => "Recoverable",
        (true, true, false) => "CustomizedRecoverable+Purgeable",
        (true, true, true) => "CustomizedRecoverable",
    }
}

/// The `WWW-Authenticate` challenge: `Bearer authorization="…", resource="…"`.
pub fn challenge(authority: &str, tenant: &str, resource: &str) -> String {
    format!("Bearer authorization=\"{authority}/{tenant}\", resource=\"{resource}\"")
}

/// The vault name a request's `Host` names under `domain` (`{vault}.vault.{domain}[:port]`).
pub fn vault_from_host<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let suffix_len = ".vault.".len() + domain.len();
    if host.len() <= suffix_len {
        return None;
    }
    let (name, suffix) = host.split_at(host.len() - suffix_len);
    let ok =
        suffix[..7].eq_ignore_ascii_case(".vault.") && suffix[7..].eq_ignore_ascii_case(domain);
    (ok && validate_vault_name(name).is_ok()).then_some(name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_secret_is_unreadable_disabled_or_outside_its_window_unless_a_certificates() {
        use super::secret_unreadable as u;
        assert_eq!(u(true, false, Some(10), Some(20), 15), None);
        assert_eq!(
            u(false, false, None, None, 15).map(|x| x.0),
            Some("SecretDisabled")
        );
        assert_eq!(
            u(false, true, None, None, 15).map(|x| x.0),
            Some("SecretDisabled")
        );
        assert_eq!(
            u(true, false, Some(16), None, 15).map(|x| x.0),
            Some("SecretNotYetValid")
        );
        assert_eq!(
            u(true, false, None, Some(15), 15).map(|x| x.0),
            Some("SecretExpired")
        );
        assert_eq!(u(true, true, Some(16), Some(15), 15), None);
    }

    use super::*;

    #[test]
    fn versions() {
        for v in [
            "7.0",
            "7.6",
            "2025-07-01",
            "2026-04-01",
            "7.6-preview.2",
            "2025-06-01-preview",
        ] {
            assert!(data_api_version_ok(v), "{v}");
        }
        for v in ["", "7.7", "2024-01-01", "latest", "-preview"] {
            assert!(!data_api_version_ok(v), "{v}");
        }
    }

    #[test]
    fn names() {
        assert!(validate_vault_name("my-vault1").is_ok());
        for bad in [
            "ab",
            "1vault",
            "vault-",
            "my--vault",
            "a234567890123456789012345",
            "vä",
        ] {
            assert!(validate_vault_name(bad).is_err(), "{bad}");
        }
        assert!(valid_object_name("a"));
        assert!(valid_object_name(&"a".repeat(127)));
        assert!(!valid_object_name(&"a".repeat(128)));
        assert!(!valid_object_name("a_b"));
        assert!(!valid_object_name(""));
        assert!(valid_version("0123456789abcdef0123456789abcdef"));
        assert!(!valid_version("0123456789ABCDEF0123456789abcdef"));
    }

    #[test]
    fn hosts() {
        assert_eq!(
            vault_from_host("kv1.vault.localhost:8443", "localhost"),
            Some("kv1")
        );
        assert_eq!(
            vault_from_host("KV1.Vault.LocalHost", "localhost"),
            Some("KV1")
        );
        assert_eq!(vault_from_host("vault.localhost:8443", "localhost"), None);
        assert_eq!(vault_from_host("a.b.vault.localhost", "localhost"), None);
        assert_eq!(vault_from_host("kv1.vault.example.com", "localhost"), None);
        assert_eq!(vault_from_host("localhost:8443", "localhost"), None);
    }

    #[test]
    fn challenge_shape() {
        assert_eq!(
            challenge("https://login.example", "t1", "https://vault.localhost:8443"),
            "Bearer authorization=\"https://login.example/t1\", resource=\"https://vault.localhost:8443\""
        );
    }

    #[test]
    fn levels() {
        assert_eq!(recovery_level(true, 90, false), "Recoverable+Purgeable");
        assert_eq!(recovery_level(true, 7, true), "CustomizedRecoverable");
        assert_eq!(recovery_level(false, 90, false), "Purgeable");
    }
}
