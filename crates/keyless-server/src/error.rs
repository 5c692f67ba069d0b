//! The server's error type, and the one place it becomes an HTTP response in the service's
//! own error shape: ARM (`{"error":{"code","message"}}`), the STS (AADSTS JSON) or IMDS-style
//! flat errors for the host API.
//!
//! Most variants belong to one surface and carry its shape. A store error does not: it answers
//! in the shape of the surface serving the request, which [`crate::app`] sets for the request
//! with [`in_surface`] (ARM's when none is set). The database being unavailable answers 503
//! with `Retry-After` on every surface, never 500.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keyless_core::aks::AksErrorKind;
use keyless_store::{Conflict as StoreConflict, StoreError};
use serde_json::json;
use std::future::Future;

/// Seconds a client is told to wait after a 503 for an unavailable database.
pub const RETRY_AFTER_SECS: u64 = 5;

/// The error shape of the surface serving a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `{"error":{"code","message"}}` (also Microsoft Graph's).
    Arm,
    /// AADSTS JSON.
    Sts,
    /// Flat `{"error","error_description"}`.
    Host,
    /// `{"error":{"code","message"}}` of the Key Vault data plane.
    KeyVault,
}

tokio::task_local! {
    static SHAPE: Shape;
}

/// Run `f` (a request's handling) answering store errors in `shape`.
pub async fn in_surface<F: Future>(shape: Shape, f: F) -> F::Output {
    SHAPE.scope(shape, f).await
}

/// The shape of the surface serving the current request (ARM's outside [`in_surface`]).
pub fn current_shape() -> Shape {
    SHAPE.try_with(|s| *s).unwrap_or(Shape::Arm)
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    // ---- ARM (control plane)
    #[error("Authentication failed. The 'Authorization' header is missing.")]
    AuthenticationMissing { tenant: String },
    #[error("{message}")]
    InvalidAuthenticationToken { tenant: String, message: String },
    #[error("{0}")]
    ExpiredAuthenticationToken(String),
    #[error("The client '{principal}' does not have authorization to perform action '{action}' over scope '{scope}' or the scope is invalid.")]
    AuthorizationFailed {
        principal: String,
        action: String,
        scope: String,
    },
    #[error("The api-version query parameter (?api-version=) is required for all requests.")]
    MissingApiVersion,
    #[error("The api-version '{version}' is invalid. The supported versions are '{supported}'.")]
    InvalidApiVersion { version: String, supported: String },
    #[error("No registered resource provider found for location '{location}' and API version '{version}' for type '{type_name}'. The supported api-versions are '{supported}'.")]
    NoRegisteredProviderFound {
        location: String,
        version: String,
        type_name: String,
        supported: String,
    },
    #[error("The resource type '{type_name}' could not be found in the namespace '{namespace}'.")]
    InvalidResourceType {
        namespace: String,
        type_name: String,
    },
    #[error("The request path '{0}' is not a valid resource path.")]
    InvalidPath(String),
    #[error("The subscription '{0}' could not be found.")]
    SubscriptionNotFound(String),
    #[error("Resource group '{0}' could not be found.")]
    ResourceGroupNotFound(String),
    #[error("The Resource '{type_name}/{name}' under resource group '{group}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix")]
    ResourceNotFound {
        type_name: String,
        name: String,
        group: String,
    },
    #[error("The request content was invalid and could not be deserialized: '{0}'.")]
    InvalidRequestContent(String),
    #[error("The request content size exceeds the maximum size of {0} bytes.")]
    RequestTooLarge(usize),
    #[error("{0}")]
    InvalidResourceName(String),
    #[error("The provided resource group name '{0}' has invalid characters. The name can only be a letter, digit, '-', '.', '(', ')' or '_', up to 90 characters, and must not end with '.'.")]
    InvalidResourceGroup(String),
    #[error("{0}")]
    LocationRequired(String),
    #[error("{0}")]
    InvalidResourceLocation(String),
    #[error("{message}")]
    InvalidParameter {
        message: String,
        target: Option<String>,
    },
    #[error("{0}")]
    FailedIdentityOperation(String),
    #[error("The client '{principal}' with object id '{principal}' has permission to perform action '{action}' on scope '{scope}'; however, it does not have permission to perform action '{linked_action}' on the linked scope(s) '{linked_scope}' or the linked scope(s) are invalid.")]
    LinkedAuthorizationFailed {
        principal: String,
        action: String,
        scope: String,
        linked_action: String,
        linked_scope: String,
    },
    #[error("The specified role definition with ID '{0}' does not exist.")]
    RoleDefinitionDoesNotExist(String),
    #[error("Principal {principal} does not exist in the directory {tenant}. Check that you have the correct principal ID. If you are creating this principal and then immediately assigning a role, this error might be related to a replication delay.")]
    PrincipalNotFound { principal: String, tenant: String },
    #[error("The role assignment ID '{0}' is not valid. The role assignment ID must be a GUID.")]
    InvalidRoleAssignmentId(String),
    /// A `$filter` the list does not understand (message names the supported forms).
    #[error("{0}")]
    UnsupportedQuery(String),
    #[error("Too many Federated Identity Credentials are written concurrently for the managed identity '{0}'. Concurrent writes to Federated Identity Credentials under the same managed identity are not supported.")]
    ConcurrentFicWrites(String),
    /// A `$filter` / `$select` the Activity Log list refuses: 400 in Microsoft.Insights' flat
    /// `{"code":"BadRequest","message"}` shape.
    #[error("{0}")]
    InsightsBadRequest(String),
    /// A `$filter` an ARM list does not take (the generic resource list's).
    #[error("Invalid $filter '{0}' specified in the query string.")]
    InvalidFilterInQueryString(String),
    #[error("The role assignment '{0}' is not found.")]
    RoleAssignmentNotFound(String),
    #[error("The role assignment already exists.")]
    RoleAssignmentExists,
    #[error("Tenant ID, application ID, principal ID, and scope are not allowed to be updated.")]
    RoleAssignmentUpdateNotPermitted,
    #[error("The role definition '{0}' is not assignable at this scope, or the scope is invalid.")]
    InvalidRoleAssignmentScope(String),
    #[error("The HTTP method '{0}' is not supported for this resource.")]
    MethodNotAllowed(String),
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// A template deployment refused or failed, with ARM's code (`InvalidTemplate`,
    /// `InvalidTemplateDeployment`, `DeploymentFailed`, `DeploymentNotFound`,
    /// `DeploymentActive`, …), sentence, target and per-resource details.
    #[error("{message}")]
    Deployment {
        code: &'static str,
        message: String,
        target: Option<String>,
        details: Vec<serde_json::Value>,
    },
    /// A managed-cluster rule (`keyless_core::aks`), mapped by its kind.
    #[error(transparent)]
    Cluster(#[from] keyless_core::aks::AksError),

    // ---- Key Vault data plane (`{"error":{"code","message","innererror"}}`)
    #[error("{message}")]
    Vault {
        kind: KvKind,
        message: String,
        /// `WWW-Authenticate` value of a 401.
        challenge: Option<String>,
    },

    // ---- STS (OAuth / AADSTS)
    #[error("AADSTS{}: {description}", *code as u32)]
    Sts { code: Aadsts, description: String },

    // ---- host API (flat IMDS-like)
    #[error("{}: {description}", kind.error())]
    Host { kind: HostKind, description: String },

    // ---- Microsoft Graph (`{"error":{"code","message"}}` with Graph's codes)
    #[error("{message}")]
    Graph { kind: GraphKind, message: String },

    // ---- internal
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("no signing key is active")]
    NoSigningKey,
    #[error("storage: {0}")]
    Store(#[from] keyless_store::StoreError),
    #[error("pki: {0}")]
    Pki(#[from] keyless_pki::PkiError),
}

/// What went wrong on the Key Vault data plane. A raise site names the kind; its status and
/// `code` are chosen here only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvKind {
    /// 400 `BadParameter`.
    BadParameter,
    /// 401 `Unauthorized` (with a challenge: [`ServerError::kv_unauthorized`]).
    Unauthorized,
    /// 403 `Forbidden`, with an inner code (`ForbiddenByPolicy`, `SecretDisabled`, …).
    Forbidden(Option<&'static str>),
    /// 404 with the object's own code (`SecretNotFound`, `VaultNotFound`, …).
    NotFound(&'static str),
    /// 405 `MethodNotAllowed`.
    MethodNotAllowed,
    /// 409 `Conflict`, with an inner code (`ObjectIsDeletedButRecoverable`, …).
    Conflict(Option<&'static str>),
    /// 413 `RequestTooLarge`.
    TooLarge,
    /// 500 `InternalServerError`.
    Internal,
}

impl KvKind {
    pub fn status(self) -> StatusCode {
        match self {
            KvKind::BadParameter => StatusCode::BAD_REQUEST,
            KvKind::Unauthorized => StatusCode::UNAUTHORIZED,
            KvKind::Forbidden(_) => StatusCode::FORBIDDEN,
            KvKind::NotFound(_) => StatusCode::NOT_FOUND,
            KvKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            KvKind::Conflict(_) => StatusCode::CONFLICT,
            KvKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            KvKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
    pub fn code(self) -> &'static str {
        match self {
            KvKind::BadParameter => "BadParameter",
            KvKind::Unauthorized => "Unauthorized",
            KvKind::Forbidden(_) => "Forbidden",
            KvKind::NotFound(code) => code,
            KvKind::MethodNotAllowed => "MethodNotAllowed",
            KvKind::Conflict(_) => "Conflict",
            KvKind::TooLarge => "RequestTooLarge",
            KvKind::Internal => "InternalServerError",
        }
    }
    pub fn inner(self) -> Option<&'static str> {
        match self {
            KvKind::Forbidden(i) | KvKind::Conflict(i) => i,
            _ => None,
        }
    }
}

/// The token service's errors, by their AADSTS number: a raise site names one; the OAuth
/// `error` and the HTTP status Entra answers with are chosen in [`Aadsts::answer`] only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Aadsts {
    /// An unexpected error (500 `server_error`).
    Internal = 50000,
    /// A malformed JWT.
    MalformedJwt = 50027,
    /// Instance discovery for an authority that is not this one.
    UnknownInstance = 50049,
    /// The issuer's discovery document or JWKS could not be fetched.
    IssuerDiscoveryFailed = 50166,
    /// `grant_type` not supported.
    UnsupportedGrantType = 70003,
    /// A scope that is not `{resource}/.default`.
    InvalidScope = 70011,
    /// A transient error: retry (503 `temporarily_unavailable`).
    TemporarilyUnavailable = 90033,
    /// A request the token service cannot parse.
    InvalidRequestFormat = 90002,
    /// A scope naming a resource principal that does not exist.
    InvalidResource = 500011,
    /// The application (client id) is not found in the tenant.
    UnknownClient = 700016,
    /// The client assertion's issuer, subject or audience is wrong.
    InvalidClientAssertion = 700021,
    /// The assertion is not within its valid time range.
    AssertionOutOfTime = 700024,
    /// The assertion's signature does not verify.
    AssertionSignature = 700027,
    /// No federated credential matches the assertion's issuer.
    FicIssuerMismatch = 700211,
    /// No federated credential matches the assertion's audience.
    FicAudienceMismatch = 700212,
    /// No federated credential matches the assertion's subject.
    FicSubjectMismatch = 700213,
    /// A token of this authority presented as a federated assertion.
    OwnTokenAsAssertion = 700222,
    /// A required parameter is missing.
    MissingParameter = 900144,
    /// The `resource` parameter of a v1 request is invalid.
    InvalidResourceParameter = 901002,
    /// An invalid scope (e.g. several resources).
    InvalidScopeValue = 1002012,
    /// The client secret is wrong.
    InvalidClientSecret = 7000215,
    /// Neither a client secret nor a client assertion was sent.
    CredentialRequired = 7000218,
}

impl Aadsts {
    /// The status and the OAuth `error` Entra answers this error with.
    pub fn answer(self) -> (StatusCode, &'static str) {
        use Aadsts::*;
        match self {
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            TemporarilyUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable"),
            MalformedJwt
            | IssuerDiscoveryFailed
            | InvalidRequestFormat
            | MissingParameter
            | InvalidResourceParameter => (StatusCode::BAD_REQUEST, "invalid_request"),
            UnsupportedGrantType => (StatusCode::BAD_REQUEST, "unsupported_grant_type"),
            UnknownInstance => (StatusCode::BAD_REQUEST, "invalid_instance"),
            InvalidScope | InvalidScopeValue => (StatusCode::BAD_REQUEST, "invalid_scope"),
            InvalidResource => (StatusCode::BAD_REQUEST, "invalid_resource"),
            UnknownClient => (StatusCode::BAD_REQUEST, "unauthorized_client"),
            OwnTokenAsAssertion => (StatusCode::BAD_REQUEST, "invalid_client"),
            InvalidClientAssertion
            | AssertionOutOfTime
            | AssertionSignature
            | FicIssuerMismatch
            | FicAudienceMismatch
            | FicSubjectMismatch
            | InvalidClientSecret
            | CredentialRequired => (StatusCode::UNAUTHORIZED, "invalid_client"),
        }
    }
}

/// The host API's errors (flat `{"error","error_description"}`): a raise site names the kind;
/// its `error` and status are chosen here only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// 400: a request this API does not understand.
    InvalidRequest,
    /// 400: an audience / resource the token rules refuse.
    InvalidResource,
    /// 401: no host client certificate on the connection.
    CredentialRequired,
    /// 401: a client certificate that is no host's current credential.
    InvalidCredential,
    /// 401: an unknown, used or expired join token.
    InvalidJoinToken,
    /// 404: the host's VM no longer exists.
    VmNotFound,
    /// 409: the pool has no room for another node.
    PoolFull,
    /// 413.
    TooLarge,
}

impl HostKind {
    pub fn status(self) -> StatusCode {
        match self {
            HostKind::InvalidRequest | HostKind::InvalidResource => StatusCode::BAD_REQUEST,
            HostKind::CredentialRequired
            | HostKind::InvalidCredential
            | HostKind::InvalidJoinToken => StatusCode::UNAUTHORIZED,
            HostKind::VmNotFound => StatusCode::NOT_FOUND,
            HostKind::PoolFull => StatusCode::CONFLICT,
            HostKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
    pub fn error(self) -> &'static str {
        match self {
            HostKind::InvalidRequest => "invalid_request",
            HostKind::InvalidResource => "invalid_resource",
            HostKind::CredentialRequired => "host_credential_required",
            HostKind::InvalidCredential => "invalid_host_credential",
            HostKind::InvalidJoinToken => "invalid_join_token",
            HostKind::VmNotFound => "vm_not_found",
            HostKind::PoolFull => "pool_full",
            HostKind::TooLarge => "request_too_large",
        }
    }
}

/// Microsoft Graph's errors: a raise site names the kind; status and `code` (Graph's own
/// codes) are chosen here only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphKind {
    /// 400 `Request_BadRequest`.
    BadRequest,
    /// 400 `Request_UnsupportedQuery`.
    UnsupportedQuery,
    /// 400 `BadRequest`: a request only a signed-in user may make (`/me`) with an
    /// application's token.
    DelegatedOnly,
    /// 401 `InvalidAuthenticationToken`.
    Unauthorized,
    /// 403 `Authorization_RequestDenied`.
    Forbidden,
    /// 404 `Request_ResourceNotFound`.
    NotFound,
    /// 413 `Request_EntityTooLarge`.
    TooLarge,
}

impl GraphKind {
    pub fn answer(self) -> (StatusCode, &'static str) {
        match self {
            GraphKind::BadRequest => (StatusCode::BAD_REQUEST, "Request_BadRequest"),
            GraphKind::UnsupportedQuery => (StatusCode::BAD_REQUEST, "Request_UnsupportedQuery"),
            GraphKind::DelegatedOnly => (StatusCode::BAD_REQUEST, "BadRequest"),
            GraphKind::Unauthorized => (StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken"),
            GraphKind::Forbidden => (StatusCode::FORBIDDEN, "Authorization_RequestDenied"),
            GraphKind::NotFound => (StatusCode::NOT_FOUND, "Request_ResourceNotFound"),
            GraphKind::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "Request_EntityTooLarge"),
        }
    }
}

pub type Result<T> = std::result::Result<T, ServerError>;

impl ServerError {
    /// A token-service error, named by its AADSTS number.
    pub fn sts(code: Aadsts, description: impl Into<String>) -> Self {
        ServerError::Sts {
            code,
            description: description.into(),
        }
    }

    /// A Key Vault data-plane error.
    pub fn kv(kind: KvKind, message: impl Into<String>) -> Self {
        ServerError::Vault {
            kind,
            message: message.into(),
            challenge: None,
        }
    }

    /// A Key Vault 401 with its `WWW-Authenticate` challenge.
    pub fn kv_unauthorized(challenge: impl Into<String>, message: impl Into<String>) -> Self {
        ServerError::Vault {
            kind: KvKind::Unauthorized,
            message: message.into(),
            challenge: Some(challenge.into()),
        }
    }

    /// A host API error.
    pub fn host(kind: HostKind, description: impl Into<String>) -> Self {
        ServerError::Host {
            kind,
            description: description.into(),
        }
    }

    /// A Microsoft Graph error.
    pub fn graph(kind: GraphKind, message: impl Into<String>) -> Self {
        ServerError::Graph {
            kind,
            message: message.into(),
        }
    }

    fn arm_code(&self) -> (StatusCode, &'static str) {
        use ServerError::*;
        match self {
            AuthenticationMissing { .. } => (StatusCode::UNAUTHORIZED, "AuthenticationFailed"),
            InvalidAuthenticationToken { .. } => {
                (StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken")
            }
            ExpiredAuthenticationToken(_) => {
                (StatusCode::UNAUTHORIZED, "ExpiredAuthenticationToken")
            }
            AuthorizationFailed { .. } => (StatusCode::FORBIDDEN, "AuthorizationFailed"),
            MissingApiVersion => (StatusCode::BAD_REQUEST, "MissingApiVersionParameter"),
            InvalidApiVersion { .. } => (StatusCode::BAD_REQUEST, "InvalidApiVersionParameter"),
            NoRegisteredProviderFound { .. } => {
                (StatusCode::BAD_REQUEST, "NoRegisteredProviderFound")
            }
            InvalidResourceType { .. } => (StatusCode::NOT_FOUND, "InvalidResourceType"),
            InvalidPath(_) => (StatusCode::NOT_FOUND, "InvalidResourceId"),
            SubscriptionNotFound(_) => (StatusCode::NOT_FOUND, "SubscriptionNotFound"),
            ResourceGroupNotFound(_) => (StatusCode::NOT_FOUND, "ResourceGroupNotFound"),
            ResourceNotFound { .. } => (StatusCode::NOT_FOUND, "ResourceNotFound"),
            InvalidRequestContent(_) => (StatusCode::BAD_REQUEST, "InvalidRequestContent"),
            RequestTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge"),
            InvalidResourceName(_) => (StatusCode::BAD_REQUEST, "InvalidResourceName"),
            InvalidResourceGroup(_) => (StatusCode::BAD_REQUEST, "InvalidResourceGroup"),
            LocationRequired(_) => (StatusCode::BAD_REQUEST, "LocationRequired"),
            InvalidResourceLocation(_) => (StatusCode::CONFLICT, "InvalidResourceLocation"),
            InvalidParameter { .. } => (StatusCode::BAD_REQUEST, "InvalidParameter"),
            FailedIdentityOperation(_) => (StatusCode::BAD_REQUEST, "FailedIdentityOperation"),
            LinkedAuthorizationFailed { .. } => {
                (StatusCode::FORBIDDEN, "LinkedAuthorizationFailed")
            }
            RoleDefinitionDoesNotExist(_) => {
                (StatusCode::BAD_REQUEST, "RoleDefinitionDoesNotExist")
            }
            PrincipalNotFound { .. } => (StatusCode::BAD_REQUEST, "PrincipalNotFound"),
            InvalidRoleAssignmentId(_) => (StatusCode::BAD_REQUEST, "InvalidRoleAssignmentId"),
            UnsupportedQuery(_) => (StatusCode::BAD_REQUEST, "UnsupportedQuery"),
            RoleAssignmentExists => (StatusCode::CONFLICT, "RoleAssignmentExists"),
            RoleAssignmentNotFound(_) => (StatusCode::NOT_FOUND, "RoleAssignmentNotFound"),
            InsightsBadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            InvalidFilterInQueryString(_) => {
                (StatusCode::BAD_REQUEST, "InvalidFilterInQueryString")
            }
            ConcurrentFicWrites(_) => (
                StatusCode::CONFLICT,
                "ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity",
            ),
            RoleAssignmentUpdateNotPermitted => {
                (StatusCode::CONFLICT, "RoleAssignmentUpdateNotPermitted")
            }
            InvalidRoleAssignmentScope(_) => {
                (StatusCode::BAD_REQUEST, "InvalidRoleAssignmentScope")
            }
            MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
            Conflict { code, .. } => (StatusCode::CONFLICT, code),
            Deployment { code, .. } => match *code {
                "DeploymentNotFound" | "DeploymentOperationNotFound" => {
                    (StatusCode::NOT_FOUND, code)
                }
                "DeploymentActive" => (StatusCode::CONFLICT, code),
                _ => (StatusCode::BAD_REQUEST, code),
            },
            Cluster(e) => match e.kind {
                AksErrorKind::InvalidParameter => (StatusCode::BAD_REQUEST, "InvalidParameter"),
                AksErrorKind::BadRequest => (StatusCode::BAD_REQUEST, "BadRequest"),
                AksErrorKind::PropertyChangeNotAllowed => {
                    (StatusCode::BAD_REQUEST, "PropertyChangeNotAllowed")
                }
                AksErrorKind::OidcIssuerNotEnabled => {
                    (StatusCode::BAD_REQUEST, "OIDCIssuerNotEnabled")
                }
                AksErrorKind::PublishProofRejected => {
                    (StatusCode::FORBIDDEN, "PublishProofRejected")
                }
            },
            Store(StoreError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
            }
            Store(StoreError::Conflict(StoreConflict::Busy(_))) => {
                (StatusCode::CONFLICT, "Conflict")
            }
            Sts { .. }
            | Vault { .. }
            | Host { .. }
            | Graph { .. }
            | Store(_)
            | Pki(_)
            | Bind { .. }
            | DataDir { .. }
            | NoSigningKey => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError"),
        }
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        match &self {
            ServerError::Sts { code, description } => {
                let (status, error) = code.answer();
                sts_body(status, error, *code as u32, description)
            }
            ServerError::Host { kind, description } => (
                kind.status(),
                axum::Json(json!({"error": kind.error(), "error_description": description})),
            )
                .into_response(),
            ServerError::Vault {
                kind,
                message,
                challenge,
            } => {
                let mut err = json!({"code": kind.code(), "message": message});
                if let Some(i) = kind.inner() {
                    err["innererror"] = json!({"code": i});
                }
                let mut resp = (kind.status(), axum::Json(json!({ "error": err }))).into_response();
                if let Some(c) = challenge
                    .as_deref()
                    .and_then(|c| HeaderValue::from_str(c).ok())
                {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, c);
                }
                resp
            }
            ServerError::Graph { kind, message } => {
                let (status, code) = kind.answer();
                arm_body(status, code, message, None)
            }
            ServerError::InsightsBadRequest(message) => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"code": "BadRequest", "message": message})),
            )
                .into_response(),
            ServerError::Deployment {
                message,
                target,
                details,
                ..
            } => {
                let (status, code) = self.arm_code();
                let mut err = json!({"code": code, "message": message});
                if let Some(t) = target {
                    err["target"] = json!(t);
                }
                if !details.is_empty() {
                    err["details"] = json!(details);
                }
                (status, axum::Json(json!({ "error": err }))).into_response()
            }
            ServerError::Store(e) => store_response(e, current_shape()),
            ServerError::Pki(e) => {
                tracing::error!(error = %e, "pki failure");
                arm_body(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                    "An internal error occurred.",
                    None,
                )
            }
            _ => {
                let (status, code) = self.arm_code();
                let target = match &self {
                    ServerError::InvalidParameter { target, .. } => target.clone(),
                    ServerError::Cluster(e) => e.target.clone(),
                    _ => None,
                };
                let mut resp = arm_body(status, code, &self.to_string(), target);
                if let ServerError::AuthenticationMissing { tenant }
                | ServerError::InvalidAuthenticationToken { tenant, .. } = &self
                {
                    let desc = if matches!(self, ServerError::AuthenticationMissing { .. }) {
                        "The authentication failed because of missing 'Authorization' header."
                    } else {
                        "The access token is invalid."
                    };
                    let v = format!(
                        "Bearer authorization_uri=\"{}\", error=\"invalid_token\", error_description=\"{desc}\"",
                        tenant
                    );
                    if let Ok(h) = HeaderValue::from_str(&v) {
                        resp.headers_mut().insert(header::WWW_AUTHENTICATE, h);
                    }
                }
                resp
            }
        }
    }
}

fn sts_body(status: StatusCode, error: &str, code: u32, description: &str) -> Response {
    let trace = uuid::Uuid::new_v4();
    let corr = uuid::Uuid::new_v4();
    let ts = crate::util::utc_timestamp();
    let body = json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {corr} Timestamp: {ts}"),
        "error_codes": [code],
        "timestamp": ts,
        "trace_id": trace,
        "correlation_id": corr,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (status, axum::Json(body)).into_response()
}

/// How a store error answers on a surface. Nothing of the error itself is shown to the client.
struct StoreAnswer {
    status: StatusCode,
    /// ARM / Key Vault `code`, host API `error`, STS `error`.
    code: &'static str,
    /// The AADSTS number (STS only).
    aadsts: u32,
    message: &'static str,
}

/// 503 for an unavailable database, 409 for a busy row (503 on the STS, which has no 409),
/// 500 for anything else.
fn store_answer(e: &StoreError, shape: Shape) -> StoreAnswer {
    const UNAVAILABLE: &str = "The service is temporarily unavailable. Retry the request later.";
    const BUSY: &str = "Another operation on this resource is in progress. Retry the request.";
    const INTERNAL: &str = "An internal storage error occurred.";
    let unavailable = matches!(e, StoreError::Unavailable(_));
    let busy = matches!(e, StoreError::Conflict(StoreConflict::Busy(_)));
    let (status, message) = match (unavailable, busy, shape) {
        (true, _, _) | (_, true, Shape::Sts) => (StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE),
        (_, true, _) => (StatusCode::CONFLICT, BUSY),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, INTERNAL),
    };
    let code = match (shape, status) {
        (Shape::Arm | Shape::KeyVault, StatusCode::SERVICE_UNAVAILABLE) => "ServiceUnavailable",
        (Shape::Arm | Shape::KeyVault, StatusCode::CONFLICT) => "Conflict",
        (Shape::Arm | Shape::KeyVault, _) => "InternalServerError",
        (Shape::Host, StatusCode::SERVICE_UNAVAILABLE) => "temporarily_unavailable",
        (Shape::Host, StatusCode::CONFLICT) => "conflict",
        (Shape::Host, _) => "internal_error",
        (Shape::Sts, StatusCode::SERVICE_UNAVAILABLE) => "temporarily_unavailable",
        (Shape::Sts, _) => "server_error",
    };
    StoreAnswer {
        status,
        code,
        // Entra's "a transient error has occurred" / "an issue with the sign-in service"
        aadsts: if status == StatusCode::SERVICE_UNAVAILABLE {
            90033
        } else {
            50000
        },
        message,
    }
}

/// A store error in `shape` (see [`store_answer`]); a 503 carries `Retry-After`.
fn store_response(e: &StoreError, shape: Shape) -> Response {
    // logged for the operator (the database's own message); the client sees none of it
    match e {
        StoreError::Unavailable(_) => tracing::warn!(error = %e, "the database is unavailable"),
        StoreError::Conflict(StoreConflict::Busy(_)) => {
            tracing::info!(error = %e, "a store write was refused as busy")
        }
        _ => tracing::error!(error = %e, "storage failure"),
    }
    let a = store_answer(e, shape);
    let mut resp = match shape {
        Shape::Arm | Shape::KeyVault => arm_body(a.status, a.code, a.message, None),
        Shape::Sts => sts_body(a.status, a.code, a.aadsts, a.message),
        Shape::Host => (
            a.status,
            axum::Json(json!({"error": a.code, "error_description": a.message})),
        )
            .into_response(),
    };
    if a.status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    resp
}

fn arm_body(status: StatusCode, code: &str, message: &str, target: Option<String>) -> Response {
    let mut err = json!({"code": code, "message": message});
    if let Some(t) = target {
        err["target"] = json!(t);
    }
    (status, axum::Json(json!({ "error": err }))).into_response()
}

impl ServerError {
    /// The status and the code this error answers with (`AADSTS7000215`, a host API `error`,
    /// a Key Vault `innererror` code or else `code`, an ARM `code`): the reason an audit
    /// record carries.
    pub fn status_and_code(&self) -> (u16, String) {
        match self {
            ServerError::Sts { code, .. } => {
                (code.answer().0.as_u16(), format!("AADSTS{}", *code as u32))
            }
            ServerError::Host { kind, .. } => (kind.status().as_u16(), kind.error().to_string()),
            // the inner code when there is one (`ForbiddenByPolicy` says more than `Forbidden`)
            ServerError::Vault { kind, .. } => (
                kind.status().as_u16(),
                kind.inner().unwrap_or(kind.code()).to_string(),
            ),
            ServerError::Graph { kind, .. } => {
                let (status, code) = kind.answer();
                (status.as_u16(), code.to_string())
            }
            ServerError::Store(e) => {
                let shape = current_shape();
                let a = store_answer(e, shape);
                let code = match shape {
                    Shape::Sts => format!("AADSTS{}", a.aadsts),
                    _ => a.code.to_string(),
                };
                (a.status.as_u16(), code)
            }
            _ => {
                let (status, code) = self.arm_code();
                (status.as_u16(), code.to_string())
            }
        }
    }
}

impl From<keyless_core::template::TemplateError> for ServerError {
    fn from(e: keyless_core::template::TemplateError) -> Self {
        ServerError::Deployment {
            code: e.code,
            message: e.message,
            target: e.target,
            details: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer(shape: Shape, e: StoreError) -> (u16, Option<String>, serde_json::Value) {
        let resp = in_surface(shape, async { ServerError::Store(e).into_response() }).await;
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, retry, serde_json::from_slice(&body).unwrap())
    }

    fn down() -> StoreError {
        StoreError::Unavailable("connection refused by db.internal:5432".into())
    }

    #[tokio::test]
    async fn an_unavailable_database_answers_503_in_each_surfaces_shape() {
        for shape in [Shape::Arm, Shape::KeyVault] {
            let (status, retry, body) = answer(shape, down()).await;
            assert_eq!((status, retry.as_deref()), (503, Some("5")));
            assert_eq!(body["error"]["code"], "ServiceUnavailable");
            assert!(body["error"]["message"].is_string());
        }
        let (status, retry, body) = answer(Shape::Sts, down()).await;
        assert_eq!((status, retry.as_deref()), (503, Some("5")));
        assert_eq!(body["error"], "temporarily_unavailable");
        assert_eq!(body["error_codes"], json!([90033]));
        assert!(body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS90033: "));
        let (status, retry, body) = answer(Shape::Host, down()).await;
        assert_eq!((status, retry.as_deref()), (503, Some("5")));
        assert_eq!(body["error"], "temporarily_unavailable");
        assert!(body["error_description"].is_string());
        // nothing of the database's message reaches the client
        for shape in [Shape::Arm, Shape::Sts, Shape::Host, Shape::KeyVault] {
            let (_, _, body) = answer(shape, down()).await;
            assert!(!body.to_string().contains("db.internal"), "{body}");
        }
    }

    #[tokio::test]
    async fn a_busy_row_is_a_409_on_arm_and_other_store_errors_a_bare_500() {
        let busy = || StoreError::Conflict(StoreConflict::Busy("could not obtain lock".into()));
        let (status, retry, body) = answer(Shape::Arm, busy()).await;
        assert_eq!((status, retry), (409, None));
        assert_eq!(body["error"]["code"], "Conflict");
        // the STS has no 409: a transient error the client retries
        let (status, retry, _) = answer(Shape::Sts, busy()).await;
        assert_eq!((status, retry.as_deref()), (503, Some("5")));
        let (status, retry, body) =
            answer(Shape::Arm, StoreError::Backend("42P01: relation x".into())).await;
        assert_eq!((status, retry), (500, None));
        assert_eq!(body["error"]["code"], "InternalServerError");
        assert!(!body.to_string().contains("42P01"));
        let (status, _, body) = answer(Shape::Host, StoreError::Corrupt("row".into())).await;
        assert_eq!(status, 500);
        assert_eq!(body["error"], "internal_error");
    }

    async fn render(e: ServerError) -> (u16, Option<String>, serde_json::Value) {
        let resp = e.into_response();
        let status = resp.status().as_u16();
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .map(|v| v.to_str().unwrap().to_string());
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, challenge, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn each_surface_renders_its_kinds_in_its_own_shape() {
        // Key Vault: the kind gives status, code and inner code
        let (st, _, v) = render(ServerError::kv(
            KvKind::Forbidden(Some("ForbiddenByPolicy")),
            "no get permission",
        ))
        .await;
        assert_eq!(st, 403);
        assert_eq!(v["error"]["code"], "Forbidden");
        assert_eq!(v["error"]["innererror"]["code"], "ForbiddenByPolicy");
        let (st, challenge, v) = render(ServerError::kv_unauthorized(
            "Bearer authorization=\"x\"",
            "no token",
        ))
        .await;
        assert_eq!(
            (st, challenge.as_deref()),
            (401, Some("Bearer authorization=\"x\""))
        );
        assert_eq!(v["error"]["code"], "Unauthorized");
        let (st, _, v) = render(ServerError::kv(KvKind::NotFound("SecretNotFound"), "gone")).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (404, Some("SecretNotFound"))
        );
        assert!(v["error"].get("innererror").is_none());
        // STS: the AADSTS number gives the OAuth error and Entra's status
        let (st, _, v) = render(ServerError::sts(Aadsts::InvalidClientSecret, "bad secret")).await;
        assert_eq!((st, v["error"].as_str()), (401, Some("invalid_client")));
        assert_eq!(v["error_codes"], json!([7000215]));
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215: bad secret"));
        let (st, _, v) = render(ServerError::sts(Aadsts::OwnTokenAsAssertion, "no")).await;
        assert_eq!((st, v["error"].as_str()), (400, Some("invalid_client")));
        // host API: flat
        let (st, _, v) = render(ServerError::host(HostKind::PoolFull, "full")).await;
        assert_eq!(st, 409);
        assert_eq!(
            v,
            json!({"error": "pool_full", "error_description": "full"})
        );
        // Graph: Graph's codes in `{"error":{"code","message"}}`
        let (st, _, v) = render(ServerError::graph(GraphKind::Forbidden, "no")).await;
        assert_eq!(st, 403);
        assert_eq!(v["error"]["code"], "Authorization_RequestDenied");
        assert_eq!(v["error"]["message"], "no");
    }

    #[test]
    fn every_aadsts_kind_answers_4xx_except_the_server_side_ones() {
        use Aadsts::*;
        for k in [
            MalformedJwt,
            UnknownInstance,
            IssuerDiscoveryFailed,
            UnsupportedGrantType,
            InvalidScope,
            InvalidRequestFormat,
            InvalidResource,
            UnknownClient,
            InvalidClientAssertion,
            AssertionOutOfTime,
            AssertionSignature,
            FicIssuerMismatch,
            FicAudienceMismatch,
            FicSubjectMismatch,
            OwnTokenAsAssertion,
            MissingParameter,
            InvalidResourceParameter,
            InvalidScopeValue,
            InvalidClientSecret,
            CredentialRequired,
        ] {
            assert!(k.answer().0.is_client_error(), "{k:?}");
        }
        assert_eq!(Internal.answer().0, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            TemporarilyUnavailable.answer().0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn the_audit_reason_follows_the_shape() {
        let e = ServerError::Store(down());
        assert_eq!(e.status_and_code(), (503, "ServiceUnavailable".into()));
        let sts = in_surface(Shape::Sts, async { e.status_and_code() }).await;
        assert_eq!(sts, (503, "AADSTS90033".into()));
        let host = in_surface(Shape::Host, async { e.status_and_code() }).await;
        assert_eq!(host, (503, "temporarily_unavailable".into()));
    }
}
