//! `POST {cluster id}/checkWorkloadIdentity` (issue 15, contract C4): whether a pod's token
//! exchange would succeed, for the add-on's readiness gate. Body
//! `{"subjects": [{"clientId", "subject", "audience"?}]}` (1..=500 entries, audience
//! `api://AzureADTokenExchange` when absent); answer
//! `{"results": [{"clientId", "subject", "ready", "reason", "message"}]}` in the same order.
//!
//! `reason`, first that applies: `issuer_not_enabled` (the cluster has no OIDC issuer),
//! `no_keys_published` (its add-on published no service-account keys yet), `identity_not_found`
//! (no user-assigned identity has that client id, found as the token endpoint finds it:
//! `sts::federation::find_client`), `no_matching_credential` (no exact federated credential
//! and no credential pattern for issuer = the cluster's issuer URL, that subject and that
//! audience — [`keyless_core::fic::find`], the exchange's own rule), else `ready`.
//!
//! The caller is authorized by the cluster's action entry (the kubelet identity, or
//! `Microsoft.ContainerService/managedClusters/read` on the cluster), which hands over the
//! cluster and its issuer URL: this module imports nothing of the cluster provider. The
//! caller may name any client id of the directory, so a message names no identity, credential
//! or pattern — only whether an exact credential or a pattern matched. Everything is read in
//! the request's unit of work (the issuer's keys too).

use crate::arm::provider::Call;
use crate::error::{Result, ServerError};
use crate::request::parse_body;
use crate::state::AppState;
use crate::sts::federation::{self, Client};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::fic::{self, Fic, FicPattern, Match, Matched};
use keyless_core::resource_id::ResourceId;
use keyless_store::{ClusterRecord, Tx};
use serde_json::{json, Value};
use std::collections::HashMap;

/// At most this many subjects per request.
pub const MAX_SUBJECTS: usize = 500;
/// The audience of a subject that names none (the webhook's projected token's).
pub const DEFAULT_AUDIENCE: &str = "api://AzureADTokenExchange";

#[derive(serde::Deserialize)]
struct Body {
    subjects: Option<Vec<Value>>,
}

/// One entry of the request.
struct Subject {
    client_id: String,
    subject: String,
    audience: String,
}

fn bad(message: impl Into<String>) -> ServerError {
    ServerError::InvalidParameter {
        message: message.into(),
        target: Some("subjects".into()),
    }
}

fn parse_subjects(body: &[u8]) -> Result<Vec<Subject>> {
    let b: Body = parse_body(body)?;
    let list = b
        .subjects
        .ok_or_else(|| bad("The request must name 'subjects'."))?;
    if list.is_empty() || list.len() > MAX_SUBJECTS {
        return Err(bad(format!(
            "'subjects' must have 1 to {MAX_SUBJECTS} entries; it has {}.",
            list.len()
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let field = |k: &str| -> Result<Option<String>> {
                match &v[k] {
                    Value::Null => Ok(None),
                    Value::String(s) if !s.trim().is_empty() => Ok(Some(s.clone())),
                    _ => Err(bad(format!(
                        "subjects[{i}].{k} must be a non-empty string."
                    ))),
                }
            };
            if !v.is_object() {
                return Err(bad(format!("subjects[{i}] must be an object.")));
            }
            let required =
                |k: &str| field(k)?.ok_or_else(|| bad(format!("subjects[{i}].{k} is required.")));
            Ok(Subject {
                client_id: required("clientId")?,
                subject: required("subject")?,
                audience: field("audience")?.unwrap_or_else(|| DEFAULT_AUDIENCE.to_string()),
            })
        })
        .collect()
}

/// What the exchange matches a user-assigned identity's assertions against.
struct Federation {
    fics: Vec<Fic>,
    patterns: Vec<FicPattern>,
}

/// The user-assigned identity whose client id is `client_id`, found as the token endpoint
/// finds it ([`federation::find_client`]: an application's client id, or a system identity's,
/// is no identity that federates), with its credentials and patterns; `None` when there is
/// none.
async fn federation_of(tx: &mut Tx, client_id: &str) -> Result<Option<Federation>> {
    Ok(match federation::find_client(tx, client_id).await? {
        Client::Identity(_, fics, patterns) => Some(Federation {
            fics: federation::to_fics(&fics),
            patterns: federation::to_patterns(&patterns),
        }),
        Client::App(_) | Client::Unknown => None,
    })
}

/// A subject as a message shows it: at most [`fic::MAX_SUBJECT`] characters (a longer one
/// matches nothing).
fn shown(sub: &str) -> String {
    let cut: String = sub.chars().take(fic::MAX_SUBJECT).collect();
    if cut.len() < sub.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

fn result(e: &Subject, ready: bool, reason: &str, message: String) -> Value {
    json!({
        "clientId": e.client_id,
        "subject": e.subject,
        "ready": ready,
        "reason": reason,
        "message": message,
    })
}

/// Answer the check for `cluster` (authorized by the caller), whose OIDC issuer URL is `issuer`
/// while enabled.
pub async fn check(
    s: &AppState,
    tx: &mut Tx,
    c: &Call<'_, ResourceId>,
    cluster: &ClusterRecord,
    issuer: Option<String>,
) -> Result<Response> {
    let subjects = parse_subjects(c.body)?;
    // what holds for every subject of this cluster
    let issuer: std::result::Result<String, (&str, String)> = match issuer {
        None => Err((
            "issuer_not_enabled",
            format!(
                "The OIDC issuer of the managed cluster '{}' is not enabled.",
                cluster.name
            ),
        )),
        Some(url) => {
            // in the request's unit of work (a second one would hold another connection)
            let keys = match crate::oidc::issuer_id_of(s, &url) {
                Some(id) => crate::oidc::published_keys_in(tx, &id).await?,
                None => Err("the issuer is not served by this server".to_string()),
            };
            match keys {
                Ok(k) if !k.is_empty() => Ok(url),
                Ok(_) => Err((
                    "no_keys_published",
                    format!("The OIDC issuer '{url}' has no service account keys published."),
                )),
                Err(why) => Err((
                    "no_keys_published",
                    format!(
                        "The OIDC issuer '{url}' has no service account keys published: {why}."
                    ),
                )),
            }
        }
    };
    let mut identities: HashMap<String, Option<Federation>> = HashMap::new();
    let mut results = Vec::with_capacity(subjects.len());
    for e in &subjects {
        let iss = match &issuer {
            Ok(iss) => iss,
            Err((reason, message)) => {
                results.push(result(e, false, reason, message.clone()));
                continue;
            }
        };
        let key = e.client_id.to_ascii_lowercase();
        if !identities.contains_key(&key) {
            let f = federation_of(tx, &e.client_id).await?;
            identities.insert(key.clone(), f);
        }
        let Some(f) = &identities[&key] else {
            results.push(result(
                e,
                false,
                "identity_not_found",
                format!(
                    "No user-assigned identity has the client id '{}'.",
                    e.client_id
                ),
            ));
            continue;
        };
        // what matched, or not, is said without naming the identity, its credentials or its
        // patterns: the caller is any cluster's add-on, the identity anyone's
        let (sub, aud) = (&e.subject, e.audience.as_str());
        results.push(match fic::find(&f.fics, &f.patterns, iss, sub, &[aud]) {
            Match::Matched(Matched::Exact(_)) => result(
                e,
                true,
                "ready",
                "An exact federated identity credential matches.".to_string(),
            ),
            Match::Matched(Matched::Pattern(_)) => result(
                e,
                true,
                "ready",
                "A federated identity credential pattern matches.".to_string(),
            ),
            _ => result(
                e,
                false,
                "no_matching_credential",
                format!(
                    "No federated identity credential or credential pattern of this identity federates '{}' for '{iss}' (audience '{aud}').",
                    shown(sub)
                ),
            ),
        });
    }
    Ok(Json(json!({ "results": results })).into_response())
}
