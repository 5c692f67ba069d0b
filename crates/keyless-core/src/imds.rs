//! The IMDS managed-identity contract (`GET /metadata/identity/oauth2/token`), parsed and
//! validated without IO. See `../shared/spec/identity-protocols.md` §1.

use crate::api_version;
use crate::audience::{self, AudienceError};
use crate::selection::Selector;
use serde_json::{json, Value};

/// A valid token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub api_version: String,
    pub resource: String,
    pub selector: Selector,
    pub bypass_cache: bool,
}

/// An IMDS error: status and the flat JSON body IMDS returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsError {
    pub status: u16,
    pub body: Value,
}

impl ImdsError {
    fn invalid(desc: &str) -> Self {
        Self {
            status: 400,
            body: json!({"error": "invalid_request", "error_description": desc}),
        }
    }

    /// 400 for a `resource` that is missing (`invalid_request`, IMDS's text) or is not an
    /// audience (`invalid_resource`, the code Entra gives a resource it cannot resolve).
    pub fn bad_audience(e: AudienceError) -> Self {
        match e {
            AudienceError::Invalid => Self {
                status: 400,
                body: json!({"error": "invalid_resource", "error_description": e.describe()}),
            },
            _ => Self::invalid(e.describe()),
        }
    }

    /// 400 "Identity not found", the answer for any identity the caller does not hold.
    pub fn identity_not_found() -> Self {
        Self::invalid("Identity not found")
    }

    /// 400 for a request that selects no identity the caller holds (`reason` is IMDS's text).
    pub fn not_selected(reason: &str) -> Self {
        Self::invalid(reason)
    }

    /// 400 for a missing `Metadata: true` header on the identity endpoint.
    pub fn missing_metadata() -> Self {
        Self::invalid("Required metadata header not specified")
    }

    /// The body non-identity IMDS paths return for a bad or missing api-version.
    pub fn bad_api_version() -> Self {
        Self {
            status: 400,
            body: json!({
                "error": "Bad request. api-version is invalid or was not specified in the request. For more information refer to aka.ms/azureimds",
                "newest-versions": api_version::imds_newest(),
            }),
        }
    }
}

/// Request headers that matter to IMDS.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestHeaders<'a> {
    /// Value of the `Metadata` header, if any.
    pub metadata: Option<&'a str>,
    /// Whether an `X-Forwarded-For` header was present.
    pub forwarded: bool,
}

/// Check the headers every IMDS path requires: no `X-Forwarded-For` (IMDS must not be reached
/// through a proxy) and `Metadata: true` (lowercase value, as IMDS requires).
pub fn check_headers(h: RequestHeaders<'_>) -> Result<(), ImdsError> {
    if h.forwarded {
        return Err(ImdsError::invalid(
            "Requests with the X-Forwarded-For header are not accepted by the metadata endpoint",
        ));
    }
    if h.metadata != Some("true") {
        return Err(ImdsError::missing_metadata());
    }
    Ok(())
}

/// Decode a raw query string into pairs, refusing duplicate names (IMDS does).
pub fn parse_query(raw: &str) -> Result<Vec<(String, String)>, ImdsError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|_| ImdsError::invalid("The query string could not be parsed"))?;
    for (i, (k, _)) in pairs.iter().enumerate() {
        if pairs[..i].iter().any(|(k2, _)| k2 == k) {
            return Err(ImdsError::invalid(&format!(
                "Duplicate query parameter '{k}' is not allowed"
            )));
        }
    }
    Ok(pairs)
}

/// Longest `resource` / selector value accepted.
pub const MAX_PARAM_LEN: usize = 2048;

/// Validate a token request (headers already checked) from its decoded query.
pub fn parse_token_request(query: &[(String, String)]) -> Result<TokenRequest, ImdsError> {
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let api_version = get("api-version").unwrap_or("");
    if !api_version::imds_identity_supported(api_version) {
        return Err(ImdsError::bad_api_version());
    }
    let resource = get("resource").unwrap_or("").trim();
    audience::check(resource).map_err(ImdsError::bad_audience)?;
    let mut selectors = Vec::new();
    for (name, make) in [
        ("client_id", Selector::ClientId as fn(String) -> Selector),
        ("object_id", Selector::ObjectId),
        ("msi_res_id", Selector::ResourceId),
        // App Service spelling, tolerated as an alias.
        ("mi_res_id", Selector::ResourceId),
    ] {
        if let Some(v) = get(name) {
            if v.is_empty() || v.len() > MAX_PARAM_LEN {
                return Err(ImdsError::invalid(&format!(
                    "The {name} parameter is invalid"
                )));
            }
            selectors.push(make(v.to_string()));
        }
    }
    if selectors.len() > 1 {
        return Err(ImdsError::invalid(
            "Only one of client_id, object_id or msi_res_id may be specified",
        ));
    }
    let bypass_cache = match get("bypass_cache") {
        None => false,
        Some("true") => true,
        Some(_) => {
            return Err(ImdsError::invalid(
                "bypass_cache must be 'true' when present",
            ))
        }
    };
    Ok(TokenRequest {
        api_version: api_version.to_string(),
        resource: resource.to_string(),
        selector: selectors.pop().unwrap_or(Selector::SystemAssigned),
        bypass_cache,
    })
}

/// A token as the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IssuedToken {
    pub access_token: String,
    pub expires_on: u64,
    pub not_before: u64,
    pub resource: String,
    pub client_id: String,
    pub object_id: String,
    pub msi_res_id: String,
}

/// The 200 body of the IMDS token endpoint: every value a string; `expires_in` counted from
/// `now`; the selector echoed.
pub fn token_response(t: &IssuedToken, selector: &Selector, now: u64) -> Value {
    let expires_in = t.expires_on.saturating_sub(now).to_string();
    let mut body = json!({
        "access_token": t.access_token,
        "refresh_token": "",
        "expires_in": expires_in,
        "expires_on": t.expires_on.to_string(),
        "ext_expires_in": expires_in,
        "not_before": t.not_before.to_string(),
        "resource": t.resource,
        "token_type": "Bearer",
        "client_id": t.client_id,
    });
    if let Some((k, v)) = selector.echo() {
        body[k] = Value::String(v.to_string());
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Vec<(String, String)> {
        parse_query(s).unwrap()
    }

    #[test]
    fn headers() {
        assert!(check_headers(RequestHeaders {
            metadata: Some("true"),
            forwarded: false
        })
        .is_ok());
        for m in [None, Some("True"), Some("false"), Some("")] {
            let e = check_headers(RequestHeaders {
                metadata: m,
                forwarded: false,
            })
            .unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(
                e.body["error_description"],
                "Required metadata header not specified"
            );
        }
        let e = check_headers(RequestHeaders {
            metadata: Some("true"),
            forwarded: true,
        })
        .unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn parses_the_client_forms() {
        // python: unencoded resource; node: encoded
        let r = parse_token_request(&q(
            "api-version=2018-02-01&resource=https://vault.azure.net",
        ))
        .unwrap();
        assert_eq!(r.resource, "https://vault.azure.net");
        assert_eq!(r.selector, Selector::SystemAssigned);
        let r = parse_token_request(&q(
            "api-version=2019-08-01&resource=https%3A%2F%2Fmanagement.azure.com%2F&client_id=abc",
        ))
        .unwrap();
        assert_eq!(r.resource, "https://management.azure.com/");
        assert_eq!(r.selector, Selector::ClientId("abc".into()));
        let r = parse_token_request(&q(
            "api-version=2018-02-01&resource=https://x&mi_res_id=/sub/x&bypass_cache=true",
        ))
        .unwrap();
        assert_eq!(r.selector, Selector::ResourceId("/sub/x".into()));
        assert!(r.bypass_cache);
    }

    #[test]
    fn refuses_bad_requests() {
        for s in [
            "resource=x",
            "api-version=2017-12-01&resource=x",
            "api-version=nope&resource=x",
            "api-version=2018-02-01",
            "api-version=2018-02-01&resource=",
            "api-version=2018-02-01&resource=https://x&client_id=a&object_id=b",
            "api-version=2018-02-01&resource=https://x&client_id=",
            "api-version=2018-02-01&resource=https://x&bypass_cache=yes",
        ] {
            let e = parse_token_request(&q(s)).unwrap_err();
            assert_eq!(e.status, 400, "{s}");
        }
        assert!(parse_query("a=1&a=2").is_err());
        let long = format!("api-version=2018-02-01&resource={}", "x".repeat(3000));
        assert!(parse_token_request(&q(&long)).is_err());
    }

    #[test]
    fn refuses_resources_that_are_not_audiences() {
        for (raw, error) in [
            ("resource=%25ZZ", "invalid_resource"),
            ("resource=https%3A%2F%2Fx%2Fa%0D%0Ab", "invalid_resource"),
            ("resource=https://x/a%20b", "invalid_resource"),
            ("resource=x", "invalid_resource"),
            ("resource=", "invalid_request"),
        ] {
            let e = parse_token_request(&q(&format!("api-version=2018-02-01&{raw}"))).unwrap_err();
            assert_eq!(
                (e.status, e.body["error"].as_str()),
                (400, Some(error)),
                "{raw}"
            );
        }
        let long = format!(
            "api-version=2018-02-01&resource=https://{}",
            "a".repeat(600)
        );
        let e = parse_token_request(&q(&long)).unwrap_err();
        assert_eq!(
            e.body["error_description"],
            "The resource parameter is too long"
        );
        for ok in [
            "api://AzureADTokenExchange",
            "6dae42f8-4368-4678-94ff-3960e28e3630",
        ] {
            let r =
                parse_token_request(&q(&format!("api-version=2018-02-01&resource={ok}"))).unwrap();
            assert_eq!(r.resource, ok);
        }
    }

    #[test]
    fn response_fields_are_strings_and_echo_selector() {
        let t = IssuedToken {
            access_token: "tok".into(),
            expires_on: 2000,
            not_before: 900,
            resource: "r".into(),
            client_id: "c".into(),
            object_id: "o".into(),
            msi_res_id: "/x".into(),
        };
        let b = token_response(&t, &Selector::ObjectId("o".into()), 1000);
        for k in [
            "access_token",
            "refresh_token",
            "expires_in",
            "expires_on",
            "ext_expires_in",
            "not_before",
            "resource",
            "token_type",
            "client_id",
            "object_id",
        ] {
            assert!(b[k].is_string(), "{k}");
        }
        assert_eq!(b["expires_in"], "1000");
        assert_eq!(b["expires_on"], "2000");
        assert!(b.get("msi_res_id").is_none());
    }
}
