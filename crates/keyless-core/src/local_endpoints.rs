//! The other local token endpoints SDKs know besides IMDS (see
//! `../shared/spec/identity-protocols.md` §2–3), parsed and answered without IO:
//!
//! - the legacy VM-extension endpoint (`http://localhost:50342/oauth2/token`, seed 001): no
//!   api-version, `Metadata: true`, GET query or POST form, IMDS's response with
//!   `refresh_token: ""`, at most [`EXTENSION_MAX_USER_IDENTITIES`] user-assigned identities;
//! - App Service (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`, api-version 2019-08-01): the
//!   `X-IDENTITY-HEADER` secret, `client_id` / `object_id` / `principal_id` / `mi_res_id`;
//! - Azure Arc (`IDENTITY_ENDPOINT` + `IMDS_ENDPOINT`): a 401 challenge naming a key file only
//!   privileged local users can read, then the file's content as `Authorization: Basic`.

use crate::imds::{ImdsError, IssuedToken, TokenRequest, MAX_PARAM_LEN};
use crate::selection::Selector;
use serde_json::{json, Value};

/// The endpoint styles a host agent can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Style {
    Imds,
    Extension,
    AppService,
    Arc,
}

/// Parse `--endpoints imds,extension,appservice,arc`.
pub fn parse_styles(list: &str) -> Result<Vec<Style>, String> {
    let mut out = vec![];
    for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let st = match s.to_ascii_lowercase().as_str() {
            "imds" => Style::Imds,
            "extension" | "vm-extension" => Style::Extension,
            "appservice" | "app-service" => Style::AppService,
            "arc" => Style::Arc,
            other => {
                return Err(format!(
                    "unknown endpoint style '{other}': use imds, extension, appservice, arc"
                ))
            }
        };
        if !out.contains(&st) {
            out.push(st);
        }
    }
    Ok(out)
}

/// User-assigned identities reachable through the VM-extension endpoint (seed 001).
pub const EXTENSION_MAX_USER_IDENTITIES: usize = 32;

/// Default port of the VM-extension endpoint.
pub const EXTENSION_DEFAULT_PORT: u16 = 50342;

/// Whether a host-view extension entry is the managed-identity VM extension; its port.
pub fn managed_identity_extension_port(e: &Value) -> Option<u16> {
    let s = |k: &str| e[k].as_str().unwrap_or_default().to_ascii_lowercase();
    let ok = s("publisher") == "microsoft.managedidentity"
        && matches!(
            s("type").as_str(),
            "managedidentityextensionforlinux" | "managedidentityextensionforwindows"
        );
    if !ok {
        return None;
    }
    let port = &e["settings"]["port"];
    Some(
        port.as_u64()
            .or_else(|| port.as_str().and_then(|p| p.parse().ok()))
            .and_then(|p| u16::try_from(p).ok())
            // an unprivileged port: control-plane settings must not claim system ports
            .filter(|p| *p >= 1024)
            .unwrap_or(EXTENSION_DEFAULT_PORT),
    )
}

/// A selector parameter's name and how it selects.
type SelectorParam<'a> = (&'a str, fn(String) -> Selector);

fn selector_of(
    get: &dyn Fn(&str) -> Option<String>,
    names: &[SelectorParam<'_>],
) -> Result<Selector, String> {
    let mut found = vec![];
    for (name, make) in names {
        if let Some(v) = get(name) {
            if v.is_empty() || v.len() > MAX_PARAM_LEN {
                return Err(format!("The {name} parameter is invalid"));
            }
            found.push(make(v));
        }
    }
    if found.len() > 1 {
        return Err("Only one identity selector may be specified".into());
    }
    Ok(found.pop().unwrap_or(Selector::SystemAssigned))
}

fn resource_of(get: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let r = get("resource").unwrap_or_default().trim().to_string();
    crate::audience::check(&r).map_err(|e| e.describe().to_string())?;
    Ok(r)
}

fn lookup(pairs: &[(String, String)]) -> impl Fn(&str) -> Option<String> + '_ {
    move |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    }
}

// ------------------------------------------------------------------ VM extension

/// A request to the VM-extension endpoint: `pairs` from the query (GET) or form body (POST).
pub fn extension_request(
    pairs: &[(String, String)],
    metadata: Option<&str>,
) -> Result<TokenRequest, ImdsError> {
    if !metadata.is_some_and(|m| m.eq_ignore_ascii_case("true")) {
        return Err(ImdsError {
            status: 400,
            body: json!({"error": "bad_request_102", "error_description": "Required metadata header not specified"}),
        });
    }
    let get = lookup(pairs);
    let bad = |m: String| ImdsError {
        status: 400,
        body: json!({"error": "invalid_request", "error_description": m}),
    };
    let resource = resource_of(&get).map_err(bad)?;
    let selector = selector_of(
        &get,
        &[
            ("client_id", Selector::ClientId),
            ("object_id", Selector::ObjectId),
            ("msi_res_id", Selector::ResourceId),
        ],
    )
    .map_err(bad)?;
    Ok(TokenRequest {
        api_version: String::new(),
        resource,
        selector,
        bypass_cache: false,
    })
}

// ------------------------------------------------------------------ App Service

/// App Service's api-version.
pub const APP_SERVICE_API_VERSION: &str = "2019-08-01";

/// An App Service-style error: `{"statusCode": n, "message": "..."}`.
pub fn app_service_error(status: u16, message: &str) -> ImdsError {
    ImdsError {
        status,
        body: json!({"statusCode": status, "message": message}),
    }
}

/// Constant-time equality of two secrets.
pub fn secret_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Validate an App Service token request: the `X-IDENTITY-HEADER` secret first, then the
/// api-version, resource and one selector.
pub fn app_service_request(
    pairs: &[(String, String)],
    header: Option<&str>,
    secret: &str,
) -> Result<TokenRequest, ImdsError> {
    match header {
        Some(h) if secret_eq(h, secret) => {}
        Some(_) => {
            return Err(app_service_error(
                401,
                "The X-IDENTITY-HEADER value is not this host's identity header.",
            ))
        }
        None => {
            return Err(app_service_error(
                401,
                "The X-IDENTITY-HEADER header is required.",
            ))
        }
    }
    let get = lookup(pairs);
    let v = get("api-version").unwrap_or_default();
    if v != APP_SERVICE_API_VERSION {
        return Err(app_service_error(
            400,
            &format!("The api-version '{v}' is not supported; use {APP_SERVICE_API_VERSION}."),
        ));
    }
    let resource = resource_of(&get).map_err(|m| app_service_error(400, &m))?;
    let selector = selector_of(
        &get,
        &[
            ("client_id", Selector::ClientId),
            ("object_id", Selector::ObjectId),
            ("principal_id", Selector::ObjectId),
            ("mi_res_id", Selector::ResourceId),
            ("msi_res_id", Selector::ResourceId),
        ],
    )
    .map_err(|m| app_service_error(400, &m))?;
    Ok(TokenRequest {
        api_version: v,
        resource,
        selector,
        bypass_cache: false,
    })
}

/// App Service's 200 body: `expires_on` / `not_before` as epoch-second strings, no
/// `expires_in`.
pub fn app_service_response(t: &IssuedToken) -> Value {
    json!({
        "access_token": t.access_token,
        "expires_on": t.expires_on.to_string(),
        "not_before": t.not_before.to_string(),
        "resource": t.resource,
        "token_type": "Bearer",
        "client_id": t.client_id,
    })
}

// ------------------------------------------------------------------ Arc

/// Arc api-versions (MSAL sends 2020-06-01, older SDKs 2019-11-01).
pub const ARC_API_VERSIONS: &[&str] = &["2019-11-01", "2020-06-01"];

/// Where Arc key files live: clients refuse a realm outside this directory.
pub const ARC_TOKEN_DIR: &str = "/var/opt/azcmagent/tokens";

/// Largest key file clients read.
pub const ARC_MAX_KEY_LEN: usize = 4096;

/// Validate an Arc token request (the `Authorization` header is checked by the caller).
pub fn arc_request(
    pairs: &[(String, String)],
    metadata: Option<&str>,
) -> Result<TokenRequest, ImdsError> {
    let bad = |m: &str| ImdsError {
        status: 400,
        body: json!({"error": "invalid_request", "error_description": m}),
    };
    if !metadata.is_some_and(|m| m.eq_ignore_ascii_case("true")) {
        return Err(bad("Required metadata header not specified"));
    }
    let get = lookup(pairs);
    let v = get("api-version").unwrap_or_default();
    if !ARC_API_VERSIONS.contains(&v.as_str()) {
        return Err(bad("Invalid or missing api-version"));
    }
    let resource = resource_of(&get).map_err(|m| bad(&m))?;
    let selector = selector_of(
        &get,
        &[
            ("client_id", Selector::ClientId),
            ("object_id", Selector::ObjectId),
            ("msi_res_id", Selector::ResourceId),
            ("mi_res_id", Selector::ResourceId),
        ],
    )
    .map_err(|m| bad(&m))?;
    Ok(TokenRequest {
        api_version: v,
        resource,
        selector,
        bypass_cache: false,
    })
}

/// The challenge: `Basic realm=<path>` (unquoted, no other parameters — clients split on `=`).
pub fn arc_challenge(path: &str) -> String {
    format!("Basic realm={path}")
}

/// The key presented as `Authorization: Basic <content of the key file>`.
pub fn arc_presented_key(authorization: Option<&str>) -> Option<&str> {
    let v = authorization?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("basic")
        .then(|| rest.trim())
        .filter(|k| !k.is_empty() && k.len() <= ARC_MAX_KEY_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Vec<(String, String)> {
        serde_urlencoded::from_str(s).unwrap()
    }

    #[test]
    fn styles() {
        assert_eq!(
            parse_styles("imds, Extension,appservice,arc,imds").unwrap(),
            vec![Style::Imds, Style::Extension, Style::AppService, Style::Arc]
        );
        assert!(parse_styles("imds,cloudshell").is_err());
    }

    #[test]
    fn extension_port_from_settings() {
        let e = |port: Value| json!({"publisher": "Microsoft.ManagedIdentity", "type": "ManagedIdentityExtensionForLinux", "settings": {"port": port}});
        assert_eq!(
            managed_identity_extension_port(&e(json!(50343))),
            Some(50343)
        );
        assert_eq!(
            managed_identity_extension_port(&e(json!("50344"))),
            Some(50344)
        );
        assert_eq!(
            managed_identity_extension_port(&e(Value::Null)),
            Some(50342)
        );
        assert_eq!(managed_identity_extension_port(&e(json!(22))), Some(50342));
        assert_eq!(
            managed_identity_extension_port(
                &json!({"publisher": "Microsoft.Azure.KeyVault", "type": "KeyVaultForLinux"})
            ),
            None
        );
    }

    #[test]
    fn extension_requests() {
        let r = extension_request(
            &q("resource=https%3A%2F%2Fvault.azure.net&client_id=abc"),
            Some("true"),
        )
        .unwrap();
        assert_eq!(r.resource, "https://vault.azure.net");
        assert_eq!(r.selector, Selector::ClientId("abc".into()));
        let e = extension_request(&q("resource=x"), None).unwrap_err();
        assert_eq!(e.body["error"], "bad_request_102");
        assert!(extension_request(&q(""), Some("true")).is_err());
        assert!(extension_request(
            &q("resource=https://x&client_id=a&object_id=b"),
            Some("true")
        )
        .is_err());
        // every local endpoint checks the audience with the one rule (`audience::check`)
        for bad in [
            "resource=%25ZZ",
            "resource=https://x/a%0D%0Ab",
            "resource=r",
        ] {
            let e = extension_request(&q(bad), Some("true")).unwrap_err();
            assert_eq!(
                (e.status, e.body["error"].as_str()),
                (400, Some("invalid_request")),
                "{bad}"
            );
            let e =
                app_service_request(&q(&format!("api-version=2019-08-01&{bad}")), Some("k"), "k")
                    .unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
            let e = arc_request(&q(&format!("api-version=2020-06-01&{bad}")), Some("true"))
                .unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
        }
    }

    #[test]
    fn app_service_requests() {
        let ok = "api-version=2019-08-01&resource=https://r&principal_id=p1";
        let r = app_service_request(&q(ok), Some("s3cret"), "s3cret").unwrap();
        assert_eq!(r.selector, Selector::ObjectId("p1".into()));
        assert_eq!(
            app_service_request(&q(ok), Some("wrong"), "s3cret")
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            app_service_request(&q(ok), None, "s3cret")
                .unwrap_err()
                .status,
            401
        );
        let e = app_service_request(
            &q("api-version=2017-09-01&resource=https://r"),
            Some("s3cret"),
            "s3cret",
        )
        .unwrap_err();
        assert_eq!((e.status, e.body["statusCode"].clone()), (400, json!(400)));
        let r = app_service_request(
            &q("api-version=2019-08-01&resource=https://r&mi_res_id=/x"),
            Some("s3cret"),
            "s3cret",
        )
        .unwrap();
        assert_eq!(r.selector, Selector::ResourceId("/x".into()));
        assert!(secret_eq("abc", "abc") && !secret_eq("abc", "abd") && !secret_eq("abc", "ab"));
    }

    #[test]
    fn arc_requests_and_keys() {
        let r = arc_request(
            &q("api-version=2020-06-01&resource=https://r"),
            Some("true"),
        )
        .unwrap();
        assert_eq!(r.selector, Selector::SystemAssigned);
        assert!(arc_request(
            &q("api-version=2018-02-01&resource=https://r"),
            Some("true")
        )
        .is_err());
        assert!(arc_request(&q("api-version=2020-06-01&resource=https://r"), None).is_err());
        assert_eq!(
            arc_challenge("/var/opt/azcmagent/tokens/a.key"),
            "Basic realm=/var/opt/azcmagent/tokens/a.key"
        );
        assert_eq!(arc_presented_key(Some("Basic abc123")), Some("abc123"));
        assert_eq!(arc_presented_key(Some("Bearer abc")), None);
        assert_eq!(arc_presented_key(None), None);
        assert_eq!(
            arc_presented_key(Some(&format!("Basic {}", "a".repeat(4097)))),
            None
        );
    }

    #[test]
    fn app_service_body() {
        let t = IssuedToken {
            access_token: "t".into(),
            expires_on: 100,
            not_before: 10,
            resource: "r".into(),
            client_id: "c".into(),
            object_id: "o".into(),
            msi_res_id: "m".into(),
        };
        let b = app_service_response(&t);
        assert_eq!(b["expires_on"], "100");
        assert!(b.get("expires_in").is_none());
    }
}
