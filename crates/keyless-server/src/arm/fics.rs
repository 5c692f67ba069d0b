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

use crate::arm::provider::Call;
use crate::arm::reply::{self, created_or_ok, deleted};
use crate::arm::resources as res;
use crate::authz;
use crate::error::{Result, ServerError};
use crate::request::{parse_body, Caller};
use crate::state::AppState;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::fic::{self, Fic, FicPattern};
use keyless_core::resource_id::ResourceId;
use keyless_store::{Claim, FicPatternRecord, FicPut, FicRecord, Result as StoreResult, Tx};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// The first api-version that has federated identity credentials.
const FIRST_VERSION: &str = "2022-01-31-preview";

/// The resource type of a federated identity credential.
const FIC_TYPE: &str =
    "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials";

/// The resource type of a credential pattern.
pub const PATTERN_TYPE: &str =
    "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentialPatterns";

fn bad(message: impl Into<String>) -> ServerError {
    ServerError::InvalidParameter {
        message: message.into(),
        target: None,
    }
}

/// A PUT's body.
#[derive(serde::Deserialize)]
struct Body<P> {
    properties: Option<P>,
}

#[derive(serde::Deserialize)]
struct Props {
    issuer: Option<String>,
    subject: Option<String>,
    audiences: Option<Vec<String>>,
    description: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PatternProps {
    issuer: Option<String>,
    subject_pattern: Option<String>,
    audiences: Option<Vec<String>>,
    description: Option<String>,
}

/// A PUT as [`route`] hands it to [`Kind::put`]: authorized, its name valid, its body read.
struct Put<'a, P> {
    identity_key: String,
    name: &'a str,
    props: P,
}

/// What an identity's credentials ([`FicRecord`]) and its credential patterns
/// ([`FicPatternRecord`]) differ in as ARM children; [`route`] and the helpers below serve
/// the rest alike.
trait Kind: Sized {
    /// The child's type under the identity.
    const CHILD: &'static str;
    /// Its resource type (also the prefix of its RBAC actions).
    const TYPE: &'static str;
    /// What one is called in messages.
    const WHAT: &'static str;
    /// How many one identity may have.
    const MAX: usize;
    /// The refusal of a second one with the same issuer and subject (pattern).
    const DUPLICATE: &'static str;
    /// A PUT's `properties`.
    type Props: DeserializeOwned;
    fn name(&self) -> &str;
    fn description(&self) -> Option<&str>;
    /// Its `properties` in JSON but the description.
    fn properties(&self) -> Value;
    async fn list(tx: &mut Tx, key: &str) -> StoreResult<Vec<Self>>;
    async fn get(tx: &mut Tx, key: &str, name: &str) -> StoreResult<Option<Self>>;
    async fn delete(tx: &mut Tx, key: &str, name: &str) -> StoreResult<bool>;
    /// Validate and write a PUT; `claimed`: whether the request holds the identity's write
    /// claim ([`claim_writes`]).
    async fn put(
        s: &AppState,
        tx: &mut Tx,
        identity: &ResourceId,
        put: Put<'_, Self::Props>,
        claimed: bool,
    ) -> Result<Response>;
}

impl Kind for FicRecord {
    const CHILD: &'static str = "federatedIdentityCredentials";
    const TYPE: &'static str = FIC_TYPE;
    const WHAT: &'static str = "federated identity credential";
    const MAX: usize = fic::MAX_PER_IDENTITY;
    const DUPLICATE: &'static str =
        "Issuer and subject combination already exists for this Managed Identity.";
    type Props = Props;
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }
    fn properties(&self) -> Value {
        json!({"issuer": self.issuer, "subject": self.subject, "audiences": self.audiences})
    }
    async fn list(tx: &mut Tx, key: &str) -> StoreResult<Vec<Self>> {
        tx.list_fics(key).await
    }
    async fn get(tx: &mut Tx, key: &str, name: &str) -> StoreResult<Option<Self>> {
        tx.get_fic(key, name).await
    }
    async fn delete(tx: &mut Tx, key: &str, name: &str) -> StoreResult<bool> {
        tx.delete_fic(key, name).await
    }
    async fn put(
        s: &AppState,
        tx: &mut Tx,
        identity: &ResourceId,
        put: Put<'_, Self::Props>,
        claimed: bool,
    ) -> Result<Response> {
        let (n, p) = (put.name, put.props);
        let candidate = Fic {
            name: n.to_string(),
            issuer: p.issuer.unwrap_or_default(),
            subject: p.subject.unwrap_or_default(),
            audiences: p.audiences.unwrap_or_default(),
        };
        fic::validate(&candidate).map_err(|e| bad(e.to_string()))?;
        check_description::<FicRecord>(p.description.as_deref())?;
        // one write at a time per identity, as Entra enforces (409 for concurrent writes)
        if !claimed {
            return Err(ServerError::ConcurrentFicWrites(identity.canonical()));
        }
        // and, whatever holds the claim, the count below is read under the identity's row
        tx.lock_row("identities", "key", &put.identity_key).await?;
        let rec = FicRecord {
            name: stored_name::<FicRecord>(tx, &put.identity_key, n).await?,
            identity_key: put.identity_key,
            issuer: candidate.issuer,
            subject: candidate.subject,
            audiences: candidate.audiences,
            description: p.description,
            created: s.now(),
        };
        let outcome = tx.put_fic(&rec, FicRecord::MAX).await?;
        put_answer(identity, &rec, outcome)
    }
}

impl Kind for FicPatternRecord {
    const CHILD: &'static str = "federatedIdentityCredentialPatterns";
    const TYPE: &'static str = PATTERN_TYPE;
    const WHAT: &'static str = "federated identity credential pattern";
    const MAX: usize = fic::MAX_PATTERNS_PER_IDENTITY;
    const DUPLICATE: &'static str =
        "Issuer and subject pattern combination already exists for this Managed Identity.";
    type Props = PatternProps;
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }
    fn properties(&self) -> Value {
        json!({
            "issuer": self.issuer,
            "subjectPattern": self.subject_pattern,
            "audiences": self.audiences,
        })
    }
    async fn list(tx: &mut Tx, key: &str) -> StoreResult<Vec<Self>> {
        tx.list_fic_patterns(key).await
    }
    async fn get(tx: &mut Tx, key: &str, name: &str) -> StoreResult<Option<Self>> {
        tx.get_fic_pattern(key, name).await
    }
    async fn delete(tx: &mut Tx, key: &str, name: &str) -> StoreResult<bool> {
        tx.delete_fic_pattern(key, name).await
    }
    async fn put(
        s: &AppState,
        tx: &mut Tx,
        identity: &ResourceId,
        put: Put<'_, Self::Props>,
        _claimed: bool,
    ) -> Result<Response> {
        let (n, p) = (put.name, put.props);
        let candidate = FicPattern {
            name: n.to_string(),
            issuer: p.issuer.unwrap_or_default(),
            subject_pattern: p.subject_pattern.unwrap_or_default(),
            audiences: p.audiences.unwrap_or_default(),
        };
        fic::validate_pattern(&candidate).map_err(|e| bad(e.to_string()))?;
        check_description::<FicPatternRecord>(p.description.as_deref())?;
        let rec = FicPatternRecord {
            name: stored_name::<FicPatternRecord>(tx, &put.identity_key, n).await?,
            identity_key: put.identity_key,
            issuer: candidate.issuer,
            subject_pattern: candidate.subject_pattern,
            audiences: candidate.audiences,
            description: p.description,
            created: s.now(),
        };
        // counted under the identity's locked row (the store locks it first)
        let outcome = tx.put_fic_pattern(&rec, FicPatternRecord::MAX).await?;
        put_answer(identity, &rec, outcome)
    }
}

/// One credential or pattern as ARM shows it.
fn to_json<K: Kind>(identity: &ResourceId, r: &K) -> Value {
    let mut props = r.properties();
    if let Some(d) = r.description() {
        props["description"] = json!(d);
    }
    json!({
        "id": format!("{}/{}/{}", identity.canonical(), K::CHILD, r.name()),
        "name": r.name(),
        "type": K::TYPE,
        "properties": props,
    })
}

/// The requests on `identity`'s children of kind `K` that both kinds answer alike, in the
/// request's unit of work `tx`: the api-version check, GET of the list (`name` None) and of
/// one, DELETE, 405 to other methods, and a PUT's authorization, name and body.
async fn route<K: Kind, T>(
    s: &AppState,
    tx: &mut Tx,
    c: &Call<'_, T>,
    identity: &ResourceId,
    name: Option<&str>,
) -> Result<Response> {
    if c.version < FIRST_VERSION {
        return Err(ServerError::InvalidResourceType {
            namespace: identity.namespace.clone(),
            type_name: format!("{}/{}", identity.type_name, K::CHILD),
        });
    }
    let action = |verb: &str| format!("{}/{verb}", K::TYPE);
    let scope = identity.canonical();
    let id = res::get_identity(s, tx, identity).await?;
    match (c.method.clone(), name) {
        (Method::GET, None) => {
            authz::check(tx, &c.caller.object_id, &action("read"), &scope).await?;
            let list = K::list(tx, &id.key).await?;
            Ok(reply::list(
                list.iter().map(|r| to_json(identity, r)).collect(),
            ))
        }
        (Method::GET, Some(n)) => {
            authz::check(tx, &c.caller.object_id, &action("read"), &scope).await?;
            let r = K::get(tx, &id.key, n)
                .await?
                .ok_or_else(|| ServerError::ResourceNotFound {
                    type_name: K::TYPE.into(),
                    name: format!("{}/{n}", identity.name),
                    group: identity.resource_group.clone(),
                })?;
            Ok(Json(to_json(identity, &r)).into_response())
        }
        (Method::DELETE, Some(n)) => {
            authz::check(tx, &c.caller.object_id, &action("delete"), &scope).await?;
            Ok(deleted(K::delete(tx, &id.key, n).await?))
        }
        (Method::PUT, Some(n)) => {
            authz::check(tx, &c.caller.object_id, &action("write"), &scope).await?;
            fic::validate_name(n).map_err(|e| bad(e.to_string()))?;
            let b: Body<K::Props> = parse_body(c.body)?;
            let props = b
                .properties
                .ok_or_else(|| bad("The request properties must not be empty."))?;
            let put = Put {
                identity_key: id.key,
                name: n,
                props,
            };
            K::put(s, tx, identity, put, c.write_claimed).await
        }
        (m, _) => Err(ServerError::MethodNotAllowed(m.to_string())),
    }
}

/// A PUT's description: at most 600 characters.
fn check_description<K: Kind>(description: Option<&str>) -> Result<()> {
    if description.is_some_and(|d| d.chars().count() > 600) {
        return Err(bad(format!(
            "The description of a {} must be at most 600 characters.",
            K::WHAT
        )));
    }
    Ok(())
}

/// The name a PUT of `name` writes: the stored one's, if any (a name keeps the case it was
/// created with: names are immutable).
async fn stored_name<K: Kind>(tx: &mut Tx, identity_key: &str, name: &str) -> Result<String> {
    Ok(K::get(tx, identity_key, name)
        .await?
        .map_or_else(|| name.to_string(), |r| r.name().to_string()))
}

/// The answer to a PUT of `rec` the store answered `outcome` to.
fn put_answer<K: Kind>(identity: &ResourceId, rec: &K, outcome: FicPut) -> Result<Response> {
    match outcome {
        FicPut::Created => Ok(created_or_ok(true, to_json(identity, rec))),
        FicPut::Updated => Ok(created_or_ok(false, to_json(identity, rec))),
        FicPut::DuplicateIssuerSubject => Err(bad(K::DUPLICATE)),
        FicPut::LimitReached => Err(bad(format!(
            "A managed identity may have at most {} {}s.",
            K::MAX,
            K::WHAT
        ))),
    }
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
        &format!("{FIC_TYPE}/write"),
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
/// work `tx`. `c.write_claimed`: for a PUT, whether the request holds the identity's write
/// claim ([`claim_writes`]); a PUT without it is answered 409 once validated.
pub async fn handle<T>(
    s: &AppState,
    tx: &mut Tx,
    c: &Call<'_, T>,
    identity: &ResourceId,
    name: Option<&str>,
) -> Result<Response> {
    route::<FicRecord, T>(s, tx, c, identity, name).await
}

/// GET the list of `identity`'s credential patterns (`name` None), or GET / PUT / DELETE one,
/// in the request's unit of work `tx`.
pub async fn handle_patterns<T>(
    s: &AppState,
    tx: &mut Tx,
    c: &Call<'_, T>,
    identity: &ResourceId,
    name: Option<&str>,
) -> Result<Response> {
    route::<FicPatternRecord, T>(s, tx, c, identity, name).await
}
