//! Calls to the Keyless control plane (ARM) from a controller in the cluster, with a managed
//! identity's token from its node's IMDS: the pod-identity add-on and MIC. The token is cached
//! until due for renewal ([`ImdsTokens`]) and dropped on a 401; each call goes to the current
//! server replica and fails over to the next when one cannot answer
//! (`keyless_ops::failover`).

use keyless_kvagent::fetch::ImdsTokens;
use keyless_ops::failover::{error_chain, retry_reason, Endpoints};
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

const ARM_RESOURCE: &str = "https://management.azure.com/";

/// Why a call failed, as the controller acts on it.
#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    #[error("managed-identity token: {0}")]
    Token(String),
    /// No answer from any replica.
    #[error("Keyless control plane {url}: {message}")]
    Unreachable { url: String, message: String },
    /// ARM answered an error: its status and the `error` object's code and message.
    #[error("Keyless control plane {url}: HTTP {status} {code}: {message}")]
    Refused {
        url: String,
        status: u16,
        code: String,
        message: String,
    },
}

impl ArmError {
    /// The ARM error code (`AuthorizationFailed`, `LinkedAuthorizationFailed`, …), if ARM
    /// answered one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ArmError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The message a status report carries: ARM's own message when it answered one.
    pub fn message(&self) -> String {
        match self {
            ArmError::Refused { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

/// Where and as whom a controller calls ARM.
#[derive(Debug, Clone)]
pub struct ArmConfig {
    /// Keyless server base URLs (replicas, in order).
    pub server_urls: Vec<String>,
    /// PEM of the Keyless CA.
    pub ca_pem: String,
    /// The node's IMDS token endpoint.
    pub imds_token_endpoint: String,
    /// The identity to act as (None: the node's only identity).
    pub client_id: Option<String>,
}

pub struct Arm {
    http: reqwest::Client,
    servers: Endpoints,
    tokens: tokio::sync::Mutex<ImdsTokens>,
}

impl Arm {
    pub fn new(cfg: &ArmConfig) -> Result<Arm, ArmError> {
        let certs = reqwest::Certificate::from_pem_bundle(cfg.ca_pem.as_bytes())
            .map_err(|e| ArmError::Token(format!("the CA PEM: {e}")))?;
        let http = reqwest::Client::builder()
            .tls_certs_only(certs)
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ArmError::Token(e.to_string()))?;
        let tokens = ImdsTokens::new(
            keyless_kvagent::settings::Authentication {
                token_endpoint: cfg.imds_token_endpoint.clone(),
                client_id: cfg.client_id.clone(),
            },
            &[],
        )
        .map_err(|e| ArmError::Token(e.to_string()))?;
        let servers = Endpoints::new(cfg.server_urls.iter().cloned())
            .ok_or_else(|| ArmError::Token("no server URL".into()))?
            .counting(keyless_ops::metrics::AGENT_SERVER_FAILOVERS);
        Ok(Arm {
            http,
            servers,
            tokens: tokio::sync::Mutex::new(tokens),
        })
    }

    /// `POST {resource}/{action}?api-version={api_version}` with `body`: the answer's JSON
    /// (the cluster actions of the add-on, its workload-identity loops and the webhook).
    pub async fn action(
        &self,
        resource: &str,
        action: &str,
        api_version: &str,
        body: &Value,
    ) -> Result<Value, ArmError> {
        let path = format!(
            "{}/{action}?api-version={api_version}",
            resource.trim_end_matches('/')
        );
        Ok(self.call(Method::POST, &path, Some(body), None).await?.0)
    }

    /// `method path_and_query` with `body` as JSON (when given): the answer's JSON (`Null`
    /// for an empty body) and, when the server sent one, its `ETag`.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<(Value, Option<String>), ArmError> {
        let token = self
            .tokens
            .lock()
            .await
            .token(ARM_RESOURCE)
            .await
            .map_err(|e| ArmError::Token(e.to_string()))?;
        let (url, resp) = self
            .servers
            .call(
                |base| {
                    let url = format!("{base}{path_and_query}");
                    let mut req = self.http.request(method.clone(), &url).bearer_auth(&token);
                    if let Some(b) = body {
                        req = req.json(b);
                    }
                    if let Some(e) = if_match {
                        req = req.header("If-Match", e);
                    }
                    async move { (url, req.send().await) }
                },
                |(_, r)| retry_reason(r),
            )
            .await;
        let resp = resp.map_err(|e| ArmError::Unreachable {
            url: url.clone(),
            message: error_chain(&e),
        })?;
        let status = resp.status();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().await.map_err(|e| ArmError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        })?;
        if status.as_u16() == 401 {
            self.tokens.lock().await.forget(ARM_RESOURCE);
        }
        let json: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text.clone()))
        };
        if !status.is_success() {
            let err = &json["error"];
            return Err(ArmError::Refused {
                url,
                status: status.as_u16(),
                code: err["code"].as_str().unwrap_or("Unknown").to_string(),
                message: err["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| text.chars().take(1024).collect()),
            });
        }
        Ok((json, etag))
    }
}
