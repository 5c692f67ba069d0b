//! `Microsoft.ManagedIdentity/userAssignedIdentities/{id}/federatedIdentityCredentials[/{name}]`.
//!
//! One write at a time per identity, as Entra enforces (409
//! `ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity` to the next): a PUT
//! holds the store claim `fic:{identity key}` ([`claim_writes`]) from before its unit of work
//! begins until after it has committed. [`crate::arm`] takes it (a claim is a write of its own,
//! which on SQLite must not wait behind the request's open write) and releases it; the write
//! itself locks the identity's row before it reads and counts the credentials.
//!
//! Also `…/federatedIdentityCredentialPatterns[/{name}]` (issue 15, a Keyless extension): the
//! same shapes with `subjectPattern` instead of `subject` ([`keyless_core::fic::FicPattern`]),
//! authorized by actions of their own (`…/federatedIdentityCredentialPatterns/{read,write,
//! delete}`: `*` grants them, a role listing the credentials' actions does not), bounded by
//! [`fic::MAX_PATTERNS_PER_IDENTITY`] instead of Entra's 20 and counted under the identity's
//! locked row (no write claim: Entra's one-write-at-a-time rule is about its credentials).

use crate::arm::resources as res;
use crate::authz;
use crate::error::{Result, ServerError};
use crate::request::{parse_body, Caller};
use crate::state::AppState;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::fic::{self, Fic, FicPattern};
use keyless_core::resource_id::ResourceId;
use keyless_store::{Claim, FicPatternRecord, FicPut, FicRecord, Tx};
use serde_json::{json, Value};

/// The first api-version that has federated identity credentials.
const FIRST_VERSION: &str = "2022-01-31-preview";

fn fic_json(identity: &ResourceId, f: &FicRecord) -> Value {
    let mut props = json!({"issuer": f.issuer, "subject": f.subject, "audiences": f.audiences});
    if let Some(d) = &f.description {
        props["description"] = json!(d);
    }
    json!({
        "id": format!("{}/federatedIdentityCredentials/{}", identity.canonical(), f.name),
        "name": f.name,
        "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
        "properties": props,
    })
}

fn bad(message: impl Into<String>) -> ServerError {
    ServerError::InvalidParameter {
        message: message.into(),
        target: None,
    }
}

#[derive(serde::Deserialize)]
struct Body {
    properties: Option<Props>,
}

#[derive(serde::Deserialize)]
struct Props {
    issuer: Option<String>,
    subject: Option<String>,
    audiences: Option<Vec<String>>,
    description: Option<String>,
}

/// How long a write claim lasts at most, should its holder die before releasing it (seconds).
const CLAIM_TTL: u64 = 30;

/// Take the write claim on `identity`'s federated credentials, for a PUT by a caller who may
/// write them: `None` when another write holds it, or when the caller may not write (the
/// handler then refuses it 403 without having held anyone up). Taken before the request's unit of work begins, released after it ends.
pub async fn claim_writes(
    s: &AppState,
    caller: &Caller,
    identity: &ResourceId,
) -> Result<Option<Claim>> {
    // only a caller who may write the credentials takes the claim: anyone else is refused
    // 403 by the handler and must not make a legitimate writer's request a 409 meanwhile
    let mut tx = s.store.read("fic_claim_authz").await?;
    let may_write = authz::permitted(
        &mut tx,
        &caller.object_id,
        "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/write",
        &identity.canonical(),
    )
    .await?;
    drop(tx);
    if !may_write {
        return Ok(None);
    }
    let name = format!("fic:{}", identity.key());
    Ok(s.store.claim(&name, s.now(), CLAIM_TTL).await?)
}

/// GET the list (`name` None), or GET / PUT / DELETE one credential, in the request's unit of
/// work `tx`. `claimed`: for a PUT, whether the request holds the identity's write claim
/// ([`claim_writes`]); a PUT without it is answered 409 once validated.
#[allow(clippy::too_many_arguments)]
pub async fn handle(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    m: &Method,
    identity: &ResourceId,
    name: Option<&str>,
    version: &str,
    body: &[u8],
    claimed: bool,
) -> Result<Response> {
    if version < FIRST_VERSION {
        return Err(ServerError::InvalidResourceType {
            namespace: identity.namespace.clone(),
            type_name: format!("{}/federatedIdentityCredentials", identity.type_name),
        });
    }
    let action = |verb: &str| {
        format!(
            "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/{verb}"
        )
    };
    let scope = identity.canonical();
    let id = res::get_identity(s, tx, identity).await?;
    match (m.clone(), name) {
        (Method::GET, None) => {
            authz::check(tx, &caller.object_id, &action("read"), &scope).await?;
            let list: Vec<Value> = tx
                .list_fics(&id.key)
                .await?
                .iter()
                .map(|f| fic_json(identity, f))
                .collect();
            Ok(Json(json!({ "value": list })).into_response())
        }
        (Method::GET, Some(n)) => {
            authz::check(tx, &caller.object_id, &action("read"), &scope).await?;
            let f = tx.get_fic(&id.key, n).await?.ok_or_else(|| ServerError::ResourceNotFound {
                type_name: "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials".into(),
                name: format!("{}/{n}", identity.name),
                group: identity.resource_group.clone(),
            })?;
            Ok(Json(fic_json(identity, &f)).into_response())
        }
        (Method::DELETE, Some(n)) => {
            authz::check(tx, &caller.object_id, &action("delete"), &scope).await?;
            Ok(if tx.delete_fic(&id.key, n).await? {
                StatusCode::OK
            } else {
                StatusCode::NO_CONTENT
            }
            .into_response())
        }
        (Method::PUT, Some(n)) => {
            authz::check(tx, &caller.object_id, &action("write"), &scope).await?;
            fic::validate_name(n).map_err(|e| bad(e.to_string()))?;
            let b: Body = parse_body(body)?;
            let p = b
                .properties
                .ok_or_else(|| bad("The request properties must not be empty."))?;
            let candidate = Fic {
                name: n.to_string(),
                issuer: p.issuer.unwrap_or_default(),
                subject: p.subject.unwrap_or_default(),
                audiences: p.audiences.unwrap_or_default(),
            };
            fic::validate(&candidate).map_err(|e| bad(e.to_string()))?;
            if p.description
                .as_ref()
                .is_some_and(|d| d.chars().count() > 600)
            {
                return Err(bad("The description of a federated identity credential must be at most 600 characters."));
            }
            // one write at a time per identity, as Entra enforces (409 for concurrent writes)
            if !claimed {
                return Err(ServerError::ConcurrentFicWrites(identity.canonical()));
            }
            // and, whatever holds the claim, the count below is read under the identity's row
            tx.lock_row("identities", "key", &id.key).await?;
            // the name keeps the case it was created with (names are immutable)
            let name = tx
                .get_fic(&id.key, n)
                .await?
                .map(|f| f.name)
                .unwrap_or_else(|| n.to_string());
            let rec = FicRecord {
                identity_key: id.key.clone(),
                name,
                issuer: candidate.issuer,
                subject: candidate.subject,
                audiences: candidate.audiences,
                description: p.description,
                created: s.now(),
            };
            match tx.put_fic(&rec, fic::MAX_PER_IDENTITY).await? {
                FicPut::Created => {
                    Ok((StatusCode::CREATED, Json(fic_json(identity, &rec))).into_response())
                }
                FicPut::Updated => {
                    Ok((StatusCode::OK, Json(fic_json(identity, &rec))).into_response())
                }
                FicPut::DuplicateIssuerSubject => Err(bad(
                    "Issuer and subject combination already exists for this Managed Identity.",
                )),
                FicPut::LimitReached => Err(bad(format!(
                    "A managed identity may have at most {} federated identity credentials.",
                    fic::MAX_PER_IDENTITY
                ))),
            }
        }
        (m, _) => Err(ServerError::MethodNotAllowed(m.to_string())),
    }
}

/// The resource type of a credential pattern.
pub const PATTERN_TYPE: &str =
    "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentialPatterns";

fn pattern_json(identity: &ResourceId, p: &FicPatternRecord) -> Value {
    let mut props = json!({
        "issuer": p.issuer,
        "subjectPattern": p.subject_pattern,
        "audiences": p.audiences,
    });
    if let Some(d) = &p.description {
        props["description"] = json!(d);
    }
    json!({
        "id": format!("{}/federatedIdentityCredentialPatterns/{}", identity.canonical(), p.name),
        "name": p.name,
        "type": PATTERN_TYPE,
        "properties": props,
    })
}

#[derive(serde::Deserialize)]
struct PatternBody {
    properties: Option<PatternProps>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PatternProps {
    issuer: Option<String>,
    subject_pattern: Option<String>,
    audiences: Option<Vec<String>>,
    description: Option<String>,
}

/// GET the list of `identity`'s credential patterns (`name` None), or GET / PUT / DELETE one,
/// in the request's unit of work `tx`.
#[allow(clippy::too_many_arguments)]
pub async fn handle_patterns(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    m: &Method,
    identity: &ResourceId,
    name: Option<&str>,
    version: &str,
    body: &[u8],
) -> Result<Response> {
    if version < FIRST_VERSION {
        return Err(ServerError::InvalidResourceType {
            namespace: identity.namespace.clone(),
            type_name: format!("{}/federatedIdentityCredentialPatterns", identity.type_name),
        });
    }
    let action = |verb: &str| format!("{PATTERN_TYPE}/{verb}");
    let scope = identity.canonical();
    let id = res::get_identity(s, tx, identity).await?;
    match (m.clone(), name) {
        (Method::GET, None) => {
            authz::check(tx, &caller.object_id, &action("read"), &scope).await?;
            let list: Vec<Value> = tx
                .list_fic_patterns(&id.key)
                .await?
                .iter()
                .map(|p| pattern_json(identity, p))
                .collect();
            Ok(Json(json!({ "value": list })).into_response())
        }
        (Method::GET, Some(n)) => {
            authz::check(tx, &caller.object_id, &action("read"), &scope).await?;
            let p = tx.get_fic_pattern(&id.key, n).await?.ok_or_else(|| {
                ServerError::ResourceNotFound {
                    type_name: PATTERN_TYPE.into(),
                    name: format!("{}/{n}", identity.name),
                    group: identity.resource_group.clone(),
                }
            })?;
            Ok(Json(pattern_json(identity, &p)).into_response())
        }
        (Method::DELETE, Some(n)) => {
            authz::check(tx, &caller.object_id, &action("delete"), &scope).await?;
            Ok(if tx.delete_fic_pattern(&id.key, n).await? {
                StatusCode::OK
            } else {
                StatusCode::NO_CONTENT
            }
            .into_response())
        }
        (Method::PUT, Some(n)) => {
            authz::check(tx, &caller.object_id, &action("write"), &scope).await?;
            fic::validate_name(n).map_err(|e| bad(e.to_string()))?;
            let b: PatternBody = parse_body(body)?;
            let p = b
                .properties
                .ok_or_else(|| bad("The request properties must not be empty."))?;
            let candidate = FicPattern {
                name: n.to_string(),
                issuer: p.issuer.unwrap_or_default(),
                subject_pattern: p.subject_pattern.unwrap_or_default(),
                audiences: p.audiences.unwrap_or_default(),
            };
            fic::validate_pattern(&candidate).map_err(|e| bad(e.to_string()))?;
            if p.description
                .as_ref()
                .is_some_and(|d| d.chars().count() > 600)
            {
                return Err(bad("The description of a federated identity credential pattern must be at most 600 characters."));
            }
            // the name keeps the case it was created with (names are immutable)
            let name = tx
                .get_fic_pattern(&id.key, n)
                .await?
                .map(|p| p.name)
                .unwrap_or_else(|| n.to_string());
            let rec = FicPatternRecord {
                identity_key: id.key.clone(),
                name,
                issuer: candidate.issuer,
                subject_pattern: candidate.subject_pattern,
                audiences: candidate.audiences,
                description: p.description,
                created: s.now(),
            };
            // counted under the identity's locked row (the store locks it first)
            match tx
                .put_fic_pattern(&rec, fic::MAX_PATTERNS_PER_IDENTITY)
                .await?
            {
                FicPut::Created => {
                    Ok((StatusCode::CREATED, Json(pattern_json(identity, &rec))).into_response())
                }
                FicPut::Updated => {
                    Ok((StatusCode::OK, Json(pattern_json(identity, &rec))).into_response())
                }
                FicPut::DuplicateIssuerSubject => Err(bad(
                    "Issuer and subject pattern combination already exists for this Managed Identity.",
                )),
                FicPut::LimitReached => Err(bad(format!(
                    "A managed identity may have at most {} federated identity credential patterns.",
                    fic::MAX_PATTERNS_PER_IDENTITY
                ))),
            }
        }
        (m, _) => Err(ServerError::MethodNotAllowed(m.to_string())),
    }
}
