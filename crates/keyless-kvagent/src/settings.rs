//! The extension settings (`properties.settings` of a KeyVaultForLinux extension), in every
//! shape they reach a host: the bare settings object, the ARM form wrapped in `settings`, and
//! the guest agent's handler file (`{"runtimeSettings":[{"handlerSettings":{"publicSettings":…}}]}`).
//! Pure: no IO.

use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default certificate store directory (Linux v3).
pub const DEFAULT_STORE: &str = "/var/lib/waagent/Microsoft.Azure.KeyVault.Store";
/// Default IMDS identity endpoint.
pub const DEFAULT_MSI_ENDPOINT: &str = "http://169.254.169.254/metadata/identity";
/// Default polling interval, seconds.
pub const DEFAULT_POLLING_INTERVAL_S: u64 = 3600;
/// Prefix of the agent's temporary files in a store (removed at start; never a link name).
pub const TEMP_PREFIX: &str = ".kvagent-tmp.";

/// Parsed, validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub polling_interval: Duration,
    /// The global `certificateStoreLocation` (default for every certificate).
    pub certificate_store_location: PathBuf,
    pub require_initial_sync: bool,
    pub acl_enabled: bool,
    pub observed_certificates: Vec<ObservedCertificate>,
    pub authentication: Authentication,
}

/// `authenticationSettings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authentication {
    /// The IMDS token endpoint: `msiEndpoint`, with `/oauth2/token` appended unless it ends so.
    pub token_endpoint: String,
    /// `msiClientId`: sent as `client_id` (a user-assigned identity) when set.
    pub client_id: Option<String>,
}

/// One ACL entry of an observed certificate (`user` and/or `group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclEntry {
    pub user: Option<String>,
    pub group: Option<String>,
}

/// One element of `observedCertificates`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedCertificate {
    /// The URL as configured (the status `substatus[].name`).
    pub url: String,
    /// The vault host as configured (case kept).
    pub host: String,
    /// The port when not 443.
    pub port: Option<u16>,
    /// First DNS label of the host, case as configured.
    pub vault_name: String,
    /// The secret (certificate) name.
    pub name: String,
    /// A pinned version (`…/secrets/<name>/<version>`); `None` follows the latest.
    pub version: Option<String>,
    /// Store directory of this certificate.
    pub store: PathBuf,
    /// `customSymbolicLinkName` (a file name in `store`), written besides the default link.
    pub custom_symlink: Option<String>,
    /// `acls` (honoured only when `aclEnabled`).
    pub acls: Vec<AclEntry>,
}

impl ObservedCertificate {
    fn port_suffix(&self) -> String {
        self.port.map(|p| format!(":{p}")).unwrap_or_default()
    }

    /// `https://<host>[:port]` (host lowercased).
    pub fn vault_url(&self) -> String {
        format!(
            "https://{}{}",
            self.host.to_ascii_lowercase(),
            self.port_suffix()
        )
    }

    /// The secret URL to GET (without the query).
    pub fn secret_url(&self) -> String {
        match &self.version {
            Some(v) => format!("{}/secrets/{}/{v}", self.vault_url(), self.name),
            None => format!("{}/secrets/{}", self.vault_url(), self.name),
        }
    }

    /// The token resource of the vault: `https://<host without its first label>[:port]`
    /// (`https://kv.vault.azure.net` → `https://vault.azure.net`).
    pub fn resource(&self) -> String {
        vault_resource(&self.host, self.port)
    }

    /// `<VaultName>.<CertName>`: the default link name and the versioned files' prefix.
    pub fn file_prefix(&self) -> String {
        format!("{}.{}", self.vault_name, self.name)
    }

    /// `<store>/<VaultName>.<CertName>.<version>`.
    pub fn version_path(&self, version: &str) -> PathBuf {
        self.store.join(format!("{}.{version}", self.file_prefix()))
    }

    /// The stable symlink `<store>/<VaultName>.<CertName>`.
    pub fn link_path(&self) -> PathBuf {
        self.store.join(self.file_prefix())
    }

    /// Every link this certificate maintains: the default one, then the custom one.
    pub fn links(&self) -> Vec<PathBuf> {
        let mut v = vec![self.link_path()];
        if let Some(c) = &self.custom_symlink {
            let p = self.store.join(c);
            if !v.contains(&p) {
                v.push(p);
            }
        }
        v
    }
}

/// The token resource for a vault host: the host without its first label, the port kept
/// unless it is 443.
pub fn vault_resource(host: &str, port: Option<u16>) -> String {
    let host = host.to_ascii_lowercase();
    let parent = host.split_once('.').map(|(_, p)| p).unwrap_or(&host);
    match port {
        Some(p) if p != 443 => format!("https://{parent}:{p}"),
        _ => format!("https://{parent}"),
    }
}

fn err(m: impl Into<String>) -> Error {
    Error::Settings(m.into())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parse settings text (JSON).
pub fn parse_text(text: &str) -> Result<Settings> {
    let v: Value = serde_json::from_str(text).map_err(|e| err(format!("not valid JSON ({e})")))?;
    parse(&v)
}

/// Parse settings in any of the accepted shapes.
pub fn parse(v: &Value) -> Result<Settings> {
    parse_level(v, 0)
}

fn parse_level(v: &Value, depth: u8) -> Result<Settings> {
    let Some(obj) = v.as_object() else {
        let hint = if v.is_string() {
            " (a JSON string: the settings were probably encoded twice)"
        } else {
            ""
        };
        return Err(err(format!("not an object{hint}.")));
    };
    if depth > 4 {
        return Err(err("the settings are nested too deeply."));
    }
    if let Some(rs) = obj.get("runtimeSettings") {
        let public = rs
            .as_array()
            .and_then(|a| a.first())
            .and_then(|r| r.get("handlerSettings"))
            .and_then(|h| h.get("publicSettings"))
            .ok_or_else(|| err("runtimeSettings[0].handlerSettings.publicSettings is missing."))?;
        return parse_level(public, depth + 1);
    }
    if obj.contains_key("secretsManagementSettings") {
        return parse_settings(obj);
    }
    if let Some(inner) = obj.get("settings") {
        if obj.contains_key("authenticationSettings") {
            return Err(err(
                "Attempt to get non-existent AuthConfig: authenticationSettings must be inside settings, next to secretsManagementSettings.",
            ));
        }
        return parse_level(inner, depth + 1);
    }
    if let Some(props) = obj
        .get("properties")
        .filter(|p| p.get("settings").is_some())
    {
        return parse_level(props, depth + 1);
    }
    Err(err("secretsManagementSettings is missing."))
}

fn get_bool(obj: &Map<String, Value>, key: &str) -> Result<bool> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err(err(format!(
            "{key} must be a boolean, not {}.",
            kind(other)
        ))),
    }
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str, ctx: &str) -> Result<Option<&'a str>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim())),
        Some(other) => Err(err(format!(
            "{ctx}{key} must be a string, not {}.",
            kind(other)
        ))),
    }
}

fn interval(v: Option<&Value>) -> Result<u64> {
    let secs = match v {
        None | Some(Value::Null) => return Ok(DEFAULT_POLLING_INTERVAL_S),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        Some(other) => {
            return Err(err(format!(
                "pollingIntervalInS must be a number of seconds (a string or a number), not {}.",
                kind(other)
            )))
        }
    };
    match secs {
        Some(s) if s >= 1 => Ok(s),
        _ => Err(err(format!(
            "pollingIntervalInS must be a whole number of seconds >= 1, not {}.",
            v.map(Value::to_string).unwrap_or_default()
        ))),
    }
}

fn store_path(s: &str, ctx: &str) -> Result<PathBuf> {
    let p = Path::new(s);
    if s.is_empty() || !p.is_absolute() {
        return Err(err(format!(
            "{ctx}certificateStoreLocation must be an absolute directory path, not '{s}'."
        )));
    }
    Ok(p.to_path_buf())
}

fn token_endpoint(msi: &str) -> Result<String> {
    let e = msi.trim().trim_end_matches('/');
    let lower = e.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(err(format!(
            "authenticationSettings.msiEndpoint must be an http(s) URL, not '{msi}'."
        )));
    }
    if e.contains('?') || e.contains('#') {
        return Err(err(
            "authenticationSettings.msiEndpoint must not carry a query.",
        ));
    }
    if lower.ends_with("/oauth2/token") {
        Ok(e.to_string())
    } else {
        Ok(format!("{e}/oauth2/token"))
    }
}

fn parse_settings(obj: &Map<String, Value>) -> Result<Settings> {
    let sms = match obj.get("secretsManagementSettings") {
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(err(format!(
                "secretsManagementSettings must be an object, not {}.",
                kind(other)
            )))
        }
        None => return Err(err("secretsManagementSettings is missing.")),
    };
    let polling = interval(sms.get("pollingIntervalInS"))?;
    let store = match get_str(sms, "certificateStoreLocation", "")? {
        Some(s) => store_path(s, "")?,
        None => PathBuf::from(DEFAULT_STORE),
    };
    let require_initial_sync = get_bool(sms, "requireInitialSync")?;
    let acl_enabled = get_bool(sms, "aclEnabled")?;

    let auth = match obj.get("authenticationSettings") {
        None | Some(Value::Null) => Authentication {
            token_endpoint: token_endpoint(DEFAULT_MSI_ENDPOINT)?,
            client_id: None,
        },
        Some(Value::Object(a)) => {
            let ctx = "authenticationSettings.";
            let endpoint = get_str(a, "msiEndpoint", ctx)?
                .filter(|s| !s.is_empty())
                .unwrap_or(DEFAULT_MSI_ENDPOINT);
            Authentication {
                token_endpoint: token_endpoint(endpoint)?,
                client_id: get_str(a, "msiClientId", ctx)?
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            }
        }
        Some(other) => {
            return Err(err(format!(
                "authenticationSettings must be an object, not {}.",
                kind(other)
            )))
        }
    };

    let list = match sms.get("observedCertificates") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => {
            return Err(err(format!(
                "observedCertificates must be an array, not {}.",
                kind(other)
            )))
        }
    };
    let mut certs: Vec<ObservedCertificate> = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let c = observed(item, i, &store)?;
        for link in c.links() {
            if certs.iter().any(|o| o.links().contains(&link)) {
                return Err(err(format!(
                    "observedCertificates[{i}]: the link {} is already used by another certificate.",
                    link.display()
                )));
            }
        }
        certs.push(c);
    }
    Ok(Settings {
        polling_interval: Duration::from_secs(polling),
        certificate_store_location: store,
        require_initial_sync,
        acl_enabled,
        observed_certificates: certs,
        authentication: auth,
    })
}

fn valid_acl_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.len() <= 256
        && s.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != ':' && c != ',')
}

fn observed(item: &Value, i: usize, default_store: &Path) -> Result<ObservedCertificate> {
    let ctx = format!("observedCertificates[{i}].");
    let (url, store, custom, acls) = match item {
        Value::String(s) => (
            s.trim().to_string(),
            default_store.to_path_buf(),
            None,
            vec![],
        ),
        Value::Object(o) => {
            let url = get_str(o, "url", &ctx)?
                .ok_or_else(|| err(format!("{ctx}url is required.")))?
                .to_string();
            let store = match get_str(o, "certificateStoreLocation", &ctx)? {
                Some(s) => store_path(s, &ctx)?,
                None => default_store.to_path_buf(),
            };
            let custom = match get_str(o, "customSymbolicLinkName", &ctx)? {
                None | Some("") => None,
                Some(n) => {
                    if n == "."
                        || n == ".."
                        || n.contains('/')
                        || n.contains('\0')
                        || n.starts_with(TEMP_PREFIX)
                        || n.len() > 255
                    {
                        return Err(err(format!(
                            "{ctx}customSymbolicLinkName must be a file name in the store directory, not '{n}'."
                        )));
                    }
                    Some(n.to_string())
                }
            };
            let acls = match o.get("acls") {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(a)) => a
                    .iter()
                    .enumerate()
                    .map(|(j, e)| {
                        let ectx = format!("{ctx}acls[{j}].");
                        let Some(eo) = e.as_object() else {
                            return Err(err(format!(
                                "{ectx} must be an object with user and/or group."
                            )));
                        };
                        let user = get_str(eo, "user", &ectx)?.filter(|s| !s.is_empty());
                        let group = get_str(eo, "group", &ectx)?.filter(|s| !s.is_empty());
                        if user.is_none() && group.is_none() {
                            return Err(err(format!("{ectx} needs a user or a group.")));
                        }
                        for n in user.iter().chain(group.iter()) {
                            if !valid_acl_name(n) {
                                return Err(err(format!(
                                    "{ectx} '{n}' is not a valid user or group name."
                                )));
                            }
                        }
                        Ok(AclEntry {
                            user: user.map(str::to_string),
                            group: group.map(str::to_string),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
                Some(other) => {
                    return Err(err(format!(
                        "{ctx}acls must be an array, not {}.",
                        kind(other)
                    )))
                }
            };
            (url, store, custom, acls)
        }
        other => {
            return Err(err(format!(
                "observedCertificates[{i}] must be a URL string or an object with url, not {}.",
                kind(other)
            )))
        }
    };
    let parsed =
        parse_secret_url(&url).map_err(|m| err(format!("observedCertificates[{i}]: {m}")))?;
    Ok(ObservedCertificate {
        url,
        host: parsed.host,
        port: parsed.port,
        vault_name: parsed.vault_name,
        name: parsed.name,
        version: parsed.version,
        store,
        custom_symlink: custom,
        acls,
    })
}

struct SecretUrl {
    host: String,
    port: Option<u16>,
    vault_name: String,
    name: String,
    version: Option<String>,
}

fn valid_object_name(s: &str) -> bool {
    (1..=127).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `https://<vault host>[:port]/secrets/<name>[/<version>]`, host case kept.
fn parse_secret_url(url: &str) -> std::result::Result<SecretUrl, String> {
    let bad = |why: &str| format!("'{url}' is not a Key Vault secret URL: {why}.");
    let rest = match url.get(..8) {
        Some(s) if s.eq_ignore_ascii_case("https://") => &url[8..],
        _ => return Err(bad("it must start with https://")),
    };
    if rest.contains('?') || rest.contains('#') {
        return Err(bad("it must not carry a query or fragment"));
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.contains('@') || authority.is_empty() {
        return Err(bad("bad host"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => {
            let port: u16 = p.parse().map_err(|_| bad("bad port"))?;
            if port == 0 {
                return Err(bad("bad port"));
            }
            (h, (port != 443).then_some(port))
        }
        None => (authority, None),
    };
    let labels: Vec<&str> = host.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(bad(
            "the host must be a vault DNS name like <vault>.vault.azure.net",
        ));
    }
    if labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return Err(bad("the host must be a vault DNS name, not an IP address"));
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    let segs: Vec<&str> = path.split('/').collect();
    let (name, version) = match segs.as_slice() {
        [s, n] if s.eq_ignore_ascii_case("secrets") => (*n, None),
        [s, n, v] if s.eq_ignore_ascii_case("secrets") => (*n, Some(*v)),
        _ => return Err(bad("the path must be /secrets/<name>[/<version>]")),
    };
    if !valid_object_name(name) {
        return Err(bad(
            "the secret name must be 1-127 letters, digits and dashes",
        ));
    }
    if let Some(v) = version {
        if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad("the version must be letters and digits"));
        }
    }
    Ok(SecretUrl {
        host: host.to_string(),
        port,
        vault_name: labels[0].to_string(),
        name: name.to_string(),
        version: version.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inner() -> Value {
        json!({
            "secretsManagementSettings": {
                "pollingIntervalInS": "300",
                "certificateStoreLocation": "/tmp/store",
                "requireInitialSync": true,
                "observedCertificates": ["https://MyVault.vault.azure.net/secrets/web-cert"]
            },
            "authenticationSettings": {
                "msiEndpoint": "http://169.254.169.254/metadata/identity",
                "msiClientId": "c1"
            }
        })
    }

    fn msg(r: Result<Settings>) -> String {
        match r {
            Err(Error::Settings(m)) => m,
            other => panic!("expected a settings error, got {other:?}"),
        }
    }

    #[test]
    fn bare_and_handler_file_forms_agree() {
        let bare = parse(&inner()).unwrap();
        let handler = parse(&json!({"runtimeSettings": [{"handlerSettings": {
            "protectedSettingsCertThumbprint": null, "publicSettings": inner()}}]}))
        .unwrap();
        let arm = parse(&json!({"settings": inner()})).unwrap();
        assert_eq!(bare, handler);
        assert_eq!(bare, arm);
        assert_eq!(bare.polling_interval, Duration::from_secs(300));
        assert!(bare.require_initial_sync);
        assert!(!bare.acl_enabled);
        assert_eq!(bare.certificate_store_location, PathBuf::from("/tmp/store"));
        assert_eq!(
            bare.authentication.token_endpoint,
            "http://169.254.169.254/metadata/identity/oauth2/token"
        );
        assert_eq!(bare.authentication.client_id.as_deref(), Some("c1"));
        let c = &bare.observed_certificates[0];
        assert_eq!(c.vault_name, "MyVault");
        assert_eq!(c.name, "web-cert");
        assert_eq!(c.version, None);
        assert_eq!(c.link_path(), PathBuf::from("/tmp/store/MyVault.web-cert"));
        assert_eq!(
            c.version_path("abc"),
            PathBuf::from("/tmp/store/MyVault.web-cert.abc")
        );
        assert_eq!(
            c.secret_url(),
            "https://myvault.vault.azure.net/secrets/web-cert"
        );
        assert_eq!(c.resource(), "https://vault.azure.net");
    }

    #[test]
    fn defaults() {
        let s = parse(&json!({"secretsManagementSettings": {
            "observedCertificates": ["https://kv.vault.azure.net/secrets/c"]}}))
        .unwrap();
        assert_eq!(s.polling_interval, Duration::from_secs(3600));
        assert_eq!(s.certificate_store_location, PathBuf::from(DEFAULT_STORE));
        assert!(!s.require_initial_sync);
        assert_eq!(
            s.authentication.token_endpoint,
            "http://169.254.169.254/metadata/identity/oauth2/token"
        );
        assert_eq!(s.authentication.client_id, None);
        assert_eq!(
            s.observed_certificates[0].store,
            PathBuf::from(DEFAULT_STORE)
        );
    }

    #[test]
    fn interval_as_string_or_number() {
        for (v, want) in [
            (json!("60"), 60),
            (json!(60), 60),
            (json!(" 1 "), 1),
            (json!(1), 1),
        ] {
            let s =
                parse(&json!({"secretsManagementSettings": {"pollingIntervalInS": v}})).unwrap();
            assert_eq!(s.polling_interval, Duration::from_secs(want));
        }
        for v in [
            json!("0"),
            json!(0),
            json!(-5),
            json!("1.5"),
            json!("soon"),
            json!(true),
            json!(2.5),
        ] {
            let m = msg(parse(
                &json!({"secretsManagementSettings": {"pollingIntervalInS": v}}),
            ));
            assert!(m.contains("pollingIntervalInS"), "{m}");
        }
    }

    #[test]
    fn msi_endpoint_spellings() {
        for (e, want) in [
            (
                "http://169.254.169.254/metadata/identity",
                "http://169.254.169.254/metadata/identity/oauth2/token",
            ),
            (
                "http://169.254.169.254/metadata/identity/",
                "http://169.254.169.254/metadata/identity/oauth2/token",
            ),
            (
                "http://169.254.169.254/metadata/identity/oauth2/token",
                "http://169.254.169.254/metadata/identity/oauth2/token",
            ),
            (
                "http://127.0.0.1:8444/metadata/identity/OAuth2/Token",
                "http://127.0.0.1:8444/metadata/identity/OAuth2/Token",
            ),
        ] {
            let s = parse(&json!({"secretsManagementSettings": {}, "authenticationSettings": {"msiEndpoint": e}})).unwrap();
            assert_eq!(s.authentication.token_endpoint, want);
        }
        let m = msg(parse(
            &json!({"secretsManagementSettings": {}, "authenticationSettings": {"msiEndpoint": "169.254.169.254"}}),
        ));
        assert!(m.contains("msiEndpoint"), "{m}");
    }

    #[test]
    fn string_and_object_certificates() {
        let s = parse(&json!({"secretsManagementSettings": {
        "certificateStoreLocation": "/var/store",
        "aclEnabled": true,
        "observedCertificates": [
            "https://kv1.vault.localhost:8443/secrets/a/0123abcd",
            {"url": "https://kv2.vault.azure.net:443/secrets/b/",
             "certificateStoreLocation": "/etc/ssl/app",
             "customSymbolicLinkName": "app.pem",
             "acls": [{"user": "app1", "group": "appGroup1"}, {"user": "service1"}]},
            {"url": "https://kv2.vault.azure.net/secrets/c"}
        ]}}))
        .unwrap();
        assert!(s.acl_enabled);
        let [a, b, c] = s.observed_certificates.as_slice() else {
            panic!()
        };
        assert_eq!(a.version.as_deref(), Some("0123abcd"));
        assert_eq!(a.port, Some(8443));
        assert_eq!(a.store, PathBuf::from("/var/store"));
        assert_eq!(
            a.secret_url(),
            "https://kv1.vault.localhost:8443/secrets/a/0123abcd"
        );
        assert_eq!(a.resource(), "https://vault.localhost:8443");
        assert_eq!(b.port, None);
        assert_eq!(b.name, "b");
        assert_eq!(b.store, PathBuf::from("/etc/ssl/app"));
        assert_eq!(
            b.links(),
            vec![
                PathBuf::from("/etc/ssl/app/kv2.b"),
                PathBuf::from("/etc/ssl/app/app.pem")
            ]
        );
        assert_eq!(b.acls.len(), 2);
        assert_eq!(b.acls[0].group.as_deref(), Some("appGroup1"));
        assert_eq!(
            b.acls[1],
            AclEntry {
                user: Some("service1".into()),
                group: None
            }
        );
        assert_eq!(c.store, PathBuf::from("/var/store"));
        assert_eq!(c.url, "https://kv2.vault.azure.net/secrets/c");
    }

    #[test]
    fn misplaced_authentication_settings() {
        let m = msg(parse(&json!({
            "settings": {"secretsManagementSettings": {"observedCertificates": []}},
            "authenticationSettings": {"msiClientId": "x"}
        })));
        assert!(m.contains("Attempt to get non-existent AuthConfig"), "{m}");
    }

    #[test]
    fn not_an_object() {
        for v in [
            json!("{\"secretsManagementSettings\":{}}"),
            json!([1]),
            json!(3),
            Value::Null,
        ] {
            let m = msg(parse(&v));
            assert!(m.contains("not an object"), "{m}");
        }
        let m = msg(parse_text("{not json"));
        assert!(m.contains("not valid JSON"), "{m}");
        let m = msg(parse(
            &json!({"runtimeSettings": [{"handlerSettings": {"publicSettings": "{}"}}]}),
        ));
        assert!(m.contains("not an object"), "{m}");
        assert!(Error::Settings("not an object.".into())
            .to_string()
            .starts_with("Failed to parse the configuration settings with:"));
        let m = msg(parse(&json!({"something": {}})));
        assert!(m.contains("secretsManagementSettings"), "{m}");
    }

    #[test]
    fn bad_urls() {
        for u in [
            "http://kv.vault.azure.net/secrets/a",
            "kv.vault.azure.net/secrets/a",
            "https://kv.vault.azure.net/certificates/a",
            "https://kv.vault.azure.net/keys/a",
            "https://kv.vault.azure.net/secrets",
            "https://kv.vault.azure.net/secrets/",
            "https://kv.vault.azure.net/secrets/a/b/c",
            "https://kv.vault.azure.net/secrets/a_b",
            "https://kv.vault.azure.net/secrets/a?api-version=7.4",
            "https://kv.vault.azure.net:99999/secrets/a",
            "https://user@kv.vault.azure.net/secrets/a",
            "https://127.0.0.1/secrets/a",
            "https://localhost/secrets/a",
            "https:///secrets/a",
        ] {
            let m = msg(parse(
                &json!({"secretsManagementSettings": {"observedCertificates": [u]}}),
            ));
            assert!(m.contains("observedCertificates[0]"), "{u}: {m}");
        }
        let m = msg(parse(
            &json!({"secretsManagementSettings": {"observedCertificates": [{"url": "http://kv.vault.azure.net/secrets/a"}]}}),
        ));
        assert!(m.contains("https://"), "{m}");
        let m = msg(parse(
            &json!({"secretsManagementSettings": {"observedCertificates": [{"certificateStoreLocation": "/x"}]}}),
        ));
        assert!(m.contains("url is required"), "{m}");
        let m = msg(parse(
            &json!({"secretsManagementSettings": {"observedCertificates": [42]}}),
        ));
        assert!(m.contains("URL string or an object"), "{m}");
    }

    #[test]
    fn other_refusals() {
        let cases = [
            json!({"secretsManagementSettings": {"certificateStoreLocation": "LocalMachine"}}),
            json!({"secretsManagementSettings": {"requireInitialSync": "maybe"}}),
            json!({"secretsManagementSettings": {"observedCertificates": "https://kv.vault.azure.net/secrets/a"}}),
            json!({"secretsManagementSettings": {"observedCertificates": [{"url": "https://kv.vault.azure.net/secrets/a", "customSymbolicLinkName": "../x"}]}}),
            json!({"secretsManagementSettings": {"observedCertificates": [{"url": "https://kv.vault.azure.net/secrets/a", "acls": [{}]}]}}),
            json!({"secretsManagementSettings": {"observedCertificates": [{"url": "https://kv.vault.azure.net/secrets/a", "acls": [{"user": "a:b"}]}]}}),
            json!({"secretsManagementSettings": {"observedCertificates": ["https://kv.vault.azure.net/secrets/a", "https://kv.vault.azure.net/secrets/a/abc"]}}),
            json!({"secretsManagementSettings": []}),
            json!({"secretsManagementSettings": {}, "authenticationSettings": "x"}),
        ];
        for c in cases {
            let r = parse(&c);
            assert!(matches!(r, Err(Error::Settings(_))), "{c}: {r:?}");
        }
    }

    #[test]
    fn resources() {
        assert_eq!(
            vault_resource("kv.vault.azure.net", None),
            "https://vault.azure.net"
        );
        assert_eq!(
            vault_resource("KV.Vault.Azure.Net", Some(443)),
            "https://vault.azure.net"
        );
        assert_eq!(
            vault_resource("app-kv.vault.localhost", Some(8443)),
            "https://vault.localhost:8443"
        );
        assert_eq!(
            vault_resource("kv.vault.usgovcloudapi.net", None),
            "https://vault.usgovcloudapi.net"
        );
        let s = parse(
            &json!({"secretsManagementSettings": {"observedCertificates": [
            "https://app-kv.vault.localhost:8443/secrets/a",
            "https://other.vault.azure.cn:443/secrets/a"]}}),
        )
        .unwrap();
        assert_eq!(
            s.observed_certificates[0].resource(),
            "https://vault.localhost:8443"
        );
        assert_eq!(
            s.observed_certificates[1].resource(),
            "https://vault.azure.cn"
        );
    }
}
