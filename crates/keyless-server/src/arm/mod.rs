//! The control plane over HTTPS in ARM's shapes. Order of checks follows ARM: authentication,
//! then `api-version`, then the path, then authorization, then the body.
//!
//! Each request is one unit of work in the store, opened by `dispatch` once the request is
//! authenticated and its body read (a read for GET / HEAD, a write otherwise): every handler
//! below works in it, and it is committed only when the answer is a success (2xx); an error
//! rolls everything back. The Activity Log record of a write is appended afterwards, in a unit
//! of work of its own ([`crate::arm::activity::record`]). Single resources carry a version (`ETag`,
//! `If-Match` / `If-None-Match`), checked in the same unit of work ([`crate::arm::etag`]).
//!
//! The resource types are the [`registry`]'s: each provider module declares its entry (api-
//! versions, the handlers of its collection, its resources, their children and actions) next
//! to its handlers. [`route`] does the generic part once — api-version, subscription,
//! authorization of the entry's action, the node-resource-group lockdown — and then calls the
//! entry's handler; only the paths that are no resource type (subscriptions, resource groups,
//! role assignments and definitions, the Activity Log) are routed here by shape.

pub mod activity;
pub mod batch;
pub mod clusters;
pub mod compute;
mod deployment_run;
pub mod deployments;
mod etag;
pub mod fics;
mod generic;
pub mod identities;
mod kv_references;
mod provider;
pub mod registry;
mod reply;
pub mod resources;
pub mod roles;
pub mod vaults;
mod what_if;
pub mod wi_check;

use crate::arm::registry::{Access, Call, ChildId, Collection, Provider};
use crate::arm::reply::{created_or_ok, is_read, list, verb, TrackedBody};
use crate::arm::resources as res;
use crate::authz;
use crate::error::{Result, ServerError};
use crate::request::{authenticate_with, parse_body, Caller};
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use keyless_core::api_version;
use keyless_core::resource_id::{canonical_type, ArmPath, ResourceId, DEPLOYMENT, UAMI};
use keyless_store::Tx;
use serde_json::{json, Value};
use std::sync::Arc;

/// Largest control-plane request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest body of a deployment's request (ARM's limit on a template and its parameters).
pub const MAX_TEMPLATE_BODY: usize = 4 * 1024 * 1024;
/// Bodies up to this size are read to the end before a 413, so the client, still sending,
/// sees the answer instead of a reset connection.
const DRAIN_LIMIT: usize = 8 * MAX_BODY;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/subscriptions", any(handle))
        .route("/subscriptions/{*rest}", any(handle))
        .route("/providers/{*rest}", any(handle))
}

fn authenticate(s: &AppState, headers: &axum::http::HeaderMap) -> Result<Caller> {
    authenticate_with(s, headers, &s.management_audiences())
}

async fn authorize(tx: &mut Tx, caller: &Caller, action: &str, scope: &str) -> Result<()> {
    authz::check(tx, &caller.object_id, action, scope).await
}

/// Whether `grants` allow `action` on the resource whose JSON is `item` (its `id`).
fn readable(grants: &[keyless_core::rbac::Grant], action: &str, item: &Value) -> bool {
    let id = item["id"].as_str().unwrap_or_default();
    keyless_core::rbac::authorize(grants, action, id).is_some()
}

/// A write into a managed cluster's node resource group is refused (see
/// [`crate::arm::clusters::check_not_node_group`]); reads pass.
async fn node_group_lockdown(tx: &mut Tx, m: &Method, sub: &str, rg: &str) -> Result<()> {
    if is_read(m) {
        return Ok(());
    }
    crate::arm::clusters::check_not_node_group(tx, sub, rg).await
}

/// The api-version check of a path that is not a provider's resource type (subscriptions,
/// resource groups, role assignments, the Activity Log); a type's own is
/// [`Provider::check_version`].
fn check_version(supported: &[&str], v: &str) -> Result<()> {
    if api_version::is_supported(supported, v) {
        return Ok(());
    }
    Err(ServerError::InvalidApiVersion {
        version: v.to_string(),
        supported: supported
            .iter()
            .rev()
            .copied()
            .collect::<Vec<_>>()
            .join(","),
    })
}

/// Every ARM request: authenticate, dispatch, and hand each write with its answer to the
/// Activity Log hook ([`crate::arm::activity::record`]) — once, whatever the outcome.
async fn handle(State(s): State<Arc<AppState>>, req: Request) -> Result<Response> {
    let caller = authenticate(&s, req.headers())?;
    serve(&s, &caller, req).await
}

/// An authenticated request (a client's, or one a deployment makes as its caller through
/// [`front`]).
async fn serve(s: &Arc<AppState>, caller: &Caller, req: Request) -> Result<Response> {
    let (s, caller) = (s.clone(), caller.clone());
    let op = ArmPath::parse(req.uri().path())
        .ok()
        .and_then(|p| keyless_core::activity_log::operation(req.method().as_str(), &p));
    let Some(op) = op else {
        return dispatch(&s, &caller, req).await;
    };
    let (method, headers) = (req.method().to_string(), req.headers().clone());
    let request_id = req
        .extensions()
        .get::<keyless_ops::request::RequestId>()
        .map(|r| r.0.clone());
    let resp = dispatch(&s, &caller, req)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    let event = crate::arm::activity::WriteEvent::new(
        &caller,
        op,
        &method,
        resp.status().as_u16(),
        &headers,
        request_id.as_deref(),
    );
    crate::arm::activity::record(&s, &event).await;
    Ok(resp)
}

/// One authenticated request: parse it, open its unit of work, route it, and commit when the
/// answer is a success. A PUT of a federated identity credential first takes its identity's
/// write claim ([`crate::arm::fics::claim_writes`]): before the unit of work begins, because taking
/// it is a write of its own (on SQLite it would wait forever behind the request's open write),
/// and released only after the unit of work has ended, so the next writer sees the committed
/// credentials.
async fn dispatch(s: &Arc<AppState>, caller: &Caller, req: Request) -> Result<Response> {
    let (s, caller) = (s.clone(), caller.clone());
    let (parts, body) = req.into_parts();
    let query: Vec<(String, String)> = serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
        .map_err(|_| ServerError::InvalidRequestContent("The query string is malformed.".into()))?;
    let version = query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("api-version"))
        // ARM reads api-versions without case (`2022-01-31-PREVIEW` in seed 003's template)
        .map(|(_, v)| v.to_ascii_lowercase())
        .ok_or(ServerError::MissingApiVersion)?;
    if let Some(sub) = keyless_core::activity_log::events_path(parts.uri.path()) {
        check_version(keyless_core::activity_log::API_VERSIONS, &version)?;
        if parts.method != Method::GET {
            return Err(ServerError::MethodNotAllowed(parts.method.to_string()));
        }
        let mut tx = s.store.read("arm_read").await?;
        let resp = crate::arm::activity::list(&s, &mut tx, &caller, &sub, &query).await?;
        tx.commit().await?;
        return Ok(resp);
    }
    let path = ArmPath::parse(parts.uri.path())
        .map_err(|_| ServerError::InvalidPath(parts.uri.path().to_string()))?;
    // read to the end before the unit of work begins: a slow client holds no transaction
    let body = axum::body::to_bytes(body, DRAIN_LIMIT)
        .await
        .ok()
        .filter(|b| b.len() <= body_limit(&path))
        .ok_or(ServerError::RequestTooLarge(body_limit(&path)))?;
    let claim = match fic_write(&parts.method, &path) {
        Some(identity) => {
            let claim = crate::arm::fics::claim_writes(&s, &caller, identity).await?;
            // the store's calls complete without yielding when nothing contends: yield once
            // with the claim held, so a write started at the same time in the same task (a
            // deployment's parallel resources, [`deployment_run`]) meets the claim, as
            // concurrent writes do at the real provider, rather than running after this one
            // has ended
            tokio::task::yield_now().await;
            Some(claim)
        }
        None => None,
    };
    // a list answers its page, with a `nextLink` to where the client called
    let host = (parts.headers.get(axum::http::header::HOST))
        .and_then(|h| h.to_str().ok())
        .or(parts.uri.authority().map(|a| a.as_str()));
    let page = reply::Page::of(host, &s.base_url, parts.uri.path(), &query, &path);
    let req = ArmRequest {
        caller: &caller,
        method: &parts.method,
        authz_method: &parts.method,
        uri_path: parts.uri.path(),
        version: &version,
        query: &query,
        body: &body,
        fic_claimed: matches!(claim, Some(Some(_))),
        conditions: etag::Conditions::from_headers(&parts.headers),
    };
    let answer = in_unit_of_work(&s, &req, path).await;
    if let Some(Some(claim)) = claim {
        if let Err(e) = claim.release().await {
            tracing::warn!(error = %e, "releasing a federated credential write claim failed; it expires by itself");
        }
    }
    let mut answer = answer?;
    // a deployment accepted and committed: run it
    if let Some(deployments::Started(job)) = answer.extensions_mut().remove() {
        let front = front(&s, &job.correlation_id);
        let holder = deployment_run::new_holder(&job);
        tokio::spawn(deployment_run::run(s.clone(), job, front, holder));
    }
    page.answer(answer)
}

/// Run again, on this server, the template deployments whose run stopped with its server —
/// every `deployment_resume_interval`: a reconcile of the stored runs whose lease lapsed. Each
/// is taken under its run lease (one server takes it; the others see it held), evaluated again
/// as its request was ([`deployments::resume`]) and run from the start: what it deployed
/// already is written again unchanged, as a redeployment would. One that cannot run again
/// ends `Failed`. A pass that fails is logged and retried at the next tick.
pub async fn resume_deployments(s: Arc<AppState>) {
    use futures::FutureExt as _;
    let mut tick = tokio::time::interval(s.cfg.deployment_resume_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // a panic in one pass is logged like an error: the loop goes on
        match std::panic::AssertUnwindSafe(resume_pass(&s))
            .catch_unwind()
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "looking for deployments to resume failed; retrying at the next tick")
            }
            Err(_) => {
                tracing::error!(
                    "looking for deployments to resume panicked; retrying at the next tick"
                )
            }
        }
    }
}

async fn resume_pass(s: &Arc<AppState>) -> Result<()> {
    let runs = {
        let mut tx = s.store.read("deployment_resume").await?;
        tx.list_tracked(deployments::RUN_TYPE, &s.subscription_id, None)
            .await?
    };
    for run in runs {
        let key = {
            let mut tx = s.store.read("deployment_resume").await?;
            deployments::waiting(s, &mut tx, &run)
                .await?
                .map(str::to_string)
        };
        let Some(key) = key else {
            continue;
        };
        // one server acts on it: the one that takes its lease
        let correlation_id = run.body["correlationId"].as_str().unwrap_or_default();
        let holder = format!("resume:{correlation_id}:{}", crate::util::new_guid());
        let lease = deployments::run_lease(&key);
        let ttl = deployments::RUN_LEASE_TTL;
        if !s.store.try_lease(&lease, &holder, s.now(), ttl).await? {
            continue;
        }
        let what = {
            let mut tx = s.store.read("deployment_resume").await?;
            deployments::resume(s, &mut tx, &key, &run).await?
        };
        match what {
            deployments::Resume::Skip => {}
            deployments::Resume::Stop(error) => {
                deployment_run::stop(s, &key, correlation_id, error).await?;
            }
            deployments::Resume::Job(job) => {
                tracing::info!(deployment = %job.id, "resuming a deployment whose server stopped");
                let mut tx = s.store.write("deployment_resume").await?;
                deployments::start_over(&mut tx, &key).await?;
                tx.commit().await?;
                let front = front(s, &job.correlation_id);
                // the run renews the lease under the same holder
                tokio::spawn(deployment_run::run(
                    s.clone(),
                    Arc::from(job),
                    front,
                    holder,
                ));
                continue;
            }
        }
        s.store.release_lease(&lease, &holder).await?;
    }
    Ok(())
}

/// The control plane's front door for requests a deployment makes as its caller, each with
/// the deployment's correlation id (its writes are found in the Activity Log by it, as ARM's).
fn front(s: &Arc<AppState>, correlation_id: &str) -> deployment_run::Front {
    let (s, correlation_id) = (s.clone(), correlation_id.to_string());
    Arc::new(move |caller, method, path, body| {
        let (s, correlation_id) = (s.clone(), correlation_id.clone());
        Box::pin(async move {
            let req = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header(axum::http::header::CONTENT_TYPE, "application/json")
                .header("x-ms-correlation-request-id", correlation_id)
                .body(axum::body::Body::from(body));
            match req {
                Ok(req) => serve(&s, &caller, req)
                    .await
                    .unwrap_or_else(IntoResponse::into_response),
                Err(_) => {
                    ServerError::InvalidPath("(a template resource id)".into()).into_response()
                }
            }
        })
    })
}

/// Route the request in one unit of work: committed when the answer is a success, rolled back
/// (dropped) otherwise. A single resource's version ([`etag`]) is checked here: a write with
/// `If-Match` / `If-None-Match` first locks the resource's row and reads its current ETag in
/// the same unit of work, and is answered 412 without running when the condition does not
/// hold; a successful GET, PUT or PATCH of one resource answers its `ETag`.
async fn in_unit_of_work(s: &AppState, req: &ArmRequest<'_>, path: ArmPath) -> Result<Response> {
    let mut tx = if is_read(req.method) || writes_nothing(req.method, &path) {
        s.store.read("arm_read").await?
    } else {
        s.store.write("arm_write").await?
    };
    let versioned = etag::versioned(&path);
    if versioned && !is_read(req.method) && !req.conditions.is_empty() {
        etag::lock(&mut tx, &path, &req.conditions).await?;
        let current = match current_etag(s, &mut tx, req, &path).await? {
            Current::Etag(e) => Some(e),
            Current::Missing => None,
            Current::Refused(answer) => return Ok(answer),
        };
        if let Some(refused) = req.conditions.refusal(req.method, current.as_deref()) {
            return Ok(refused);
        }
    }
    let mut resp = route(s, &mut tx, req, path.clone()).await?;
    if versioned
        && resp.status().is_success()
        && matches!(*req.method, Method::GET | Method::PUT | Method::PATCH)
    {
        resp = with_etag(s, &mut tx, req, &path, resp).await?;
    }
    if resp.status().is_success() {
        tx.commit().await?;
    }
    Ok(resp)
}

/// A POST that writes nothing — a deployment's `validate` and `whatIf` — runs in a read unit of
/// work: it holds no writer (SQLite has one) while it evaluates a template and reads what it
/// names.
fn writes_nothing(m: &Method, path: &ArmPath) -> bool {
    if *m != Method::POST {
        return false;
    }
    let quiet = |a: &str| a.eq_ignore_ascii_case("validate") || a.eq_ignore_ascii_case("whatIf");
    match path {
        ArmPath::Action { resource, action } => resource.is_type(DEPLOYMENT) && quiet(action),
        ArmPath::AtSubscription {
            namespace,
            type_name,
            rest,
            ..
        } => {
            canonical_type(namespace, type_name) == Some(DEPLOYMENT)
                && matches!(rest.as_slice(), [a] if quiet(a))
        }
        _ => false,
    }
}

/// What a single resource's GET answers in the request's unit of work.
enum Current {
    /// It exists, with this ETag.
    Etag(String),
    /// It does not exist (a 404 other than its resource group's).
    Missing,
    /// Any other answer (not authorized to read it, its resource group missing…): the answer
    /// to the request.
    Refused(Response),
}

/// The current ETag of the single resource `path` names, by running its GET route as the
/// caller in `tx` (which therefore sees what this unit of work wrote).
async fn current_etag(
    s: &AppState,
    tx: &mut Tx,
    req: &ArmRequest<'_>,
    path: &ArmPath,
) -> Result<Current> {
    let get = ArmRequest {
        method: &Method::GET,
        authz_method: req.method,
        body: &[],
        fic_claimed: false,
        conditions: etag::Conditions::default(),
        ..*req
    };
    let resp = match route(s, tx, &get, path.clone()).await {
        Ok(r) => r,
        Err(e @ ServerError::ResourceGroupNotFound(_))
            if !matches!(path, ArmPath::ResourceGroup { .. }) =>
        {
            return Ok(Current::Refused(e.into_response()))
        }
        Err(ServerError::Store(e)) => return Err(ServerError::Store(e)),
        Err(e) => e.into_response(),
    };
    if resp.status() == StatusCode::NOT_FOUND {
        return Ok(Current::Missing);
    }
    if !resp.status().is_success() {
        return Ok(Current::Refused(resp));
    }
    Ok(match representation(resp).await {
        Some(v) => Current::Etag(etag::of(&v)),
        None => Current::Missing,
    })
}

/// The JSON body of an answer.
async fn representation(resp: Response) -> Option<Value> {
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A successful GET / PUT / PATCH answer of one resource with its ETag: a GET's from its own
/// body, a write's from the GET of what it wrote (in the same unit of work), so the ETag a
/// write answers is the one the next GET answers.
async fn with_etag(
    s: &AppState,
    tx: &mut Tx,
    req: &ArmRequest<'_>,
    path: &ArmPath,
    resp: Response,
) -> Result<Response> {
    let property = etag::body_property(path, req.version);
    if *req.method == Method::GET {
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let resp = Response::from_parts(parts, axum::body::Body::from(bytes.clone()));
        return Ok(match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => etag::stamp(resp, &etag::of(&v), property).await,
            Err(_) => resp,
        });
    }
    Ok(match current_etag(s, tx, req, path).await? {
        Current::Etag(e) => etag::stamp(resp, &e, property).await,
        // a writer that may not read what it wrote gets no version
        Current::Missing | Current::Refused(_) => resp,
    })
}

/// The largest body a request on `path` may carry: a deployment's (a template) more.
fn body_limit(path: &ArmPath) -> usize {
    let deployment = match path {
        ArmPath::Resource(r) | ArmPath::Action { resource: r, .. } => r.is_type(DEPLOYMENT),
        ArmPath::AtSubscription {
            namespace,
            type_name,
            ..
        } => canonical_type(namespace, type_name) == Some(DEPLOYMENT),
        _ => false,
    };
    if deployment {
        MAX_TEMPLATE_BODY
    } else {
        MAX_BODY
    }
}

/// The identity whose federated credentials a request writes under the write claim (a PUT of
/// one credential), if it is one.
fn fic_write<'p>(m: &Method, path: &'p ArmPath) -> Option<&'p ResourceId> {
    match path {
        ArmPath::Child {
            parent, child_type, ..
        } if *m == Method::PUT
            && child_type.eq_ignore_ascii_case("federatedIdentityCredentials")
            && canonical_type(&parent.namespace, &parent.type_name) == Some(UAMI) =>
        {
            Some(parent)
        }
        _ => None,
    }
}

/// What the routes need of a request besides its parsed path.
struct ArmRequest<'a> {
    caller: &'a Caller,
    method: &'a Method,
    /// The method whose action is authorized: the request's own, except for the GET that
    /// reads a resource's current ETag before a conditional write, which is authorized as that
    /// write (ARM authorizes the write before the provider sees its conditions: a caller who
    /// may not write is refused 403 whatever the ETag, one who may write but not read still
    /// gets its conditional write).
    authz_method: &'a Method,
    uri_path: &'a str,
    version: &'a str,
    query: &'a [(String, String)],
    body: &'a [u8],
    /// For a PUT of a federated credential: whether its identity's write claim is held.
    fic_claimed: bool,
    /// `If-Match` / `If-None-Match`.
    conditions: etag::Conditions,
}

impl<'a> ArmRequest<'a> {
    /// The request as provider `p`'s handler of `target` sees it.
    fn call<'b, T>(&'b self, p: &'static Provider, target: &'b T) -> Call<'b, T> {
        Call {
            provider: p,
            target,
            caller: self.caller,
            method: self.method,
            version: self.version,
            query: self.query,
            body: self.body,
            write_claimed: self.fic_claimed,
            providers: registry::PROVIDERS,
            reads: Some(&READS),
        }
    }
}

/// The reads a provider's handler may make of resources of other types (a deployment's
/// what-if), through the routes here.
static READS: provider::Reads = provider::Reads {
    get: |s, tx, caller, id, version| Box::pin(read_resource(s, tx, caller, id, version)),
    in_group: |s, tx, subscription, group| {
        Box::pin(generic::resources_in(s, tx, subscription, Some(group)))
    },
};

/// The resource `id` as its GET route answers `caller` in `tx`.
async fn read_resource(
    s: &AppState,
    tx: &mut Tx,
    caller: &Caller,
    id: &str,
    version: &str,
) -> Result<provider::Read> {
    let Ok(path) = ArmPath::parse(id) else {
        return Ok(provider::Read::Refused(400, "InvalidResourceId".into()));
    };
    let version = version.to_ascii_lowercase();
    let get = ArmRequest {
        caller,
        method: &Method::GET,
        authz_method: &Method::GET,
        uri_path: id,
        version: &version,
        query: &[],
        body: &[],
        fic_claimed: false,
        conditions: etag::Conditions::default(),
    };
    let resp = match Box::pin(route(s, tx, &get, path)).await {
        Ok(r) => r,
        Err(ServerError::Store(e)) => return Err(ServerError::Store(e)),
        Err(e) => e.into_response(),
    };
    let status = resp.status();
    if status == StatusCode::NOT_FOUND {
        return Ok(provider::Read::Missing);
    }
    let body = representation(resp).await.unwrap_or(Value::Null);
    Ok(if status.is_success() {
        provider::Read::Found(body)
    } else {
        let code = body["error"]["code"].as_str().unwrap_or_default();
        provider::Read::Refused(status.as_u16(), code.to_string())
    })
}

/// Every ARM route, in the request's unit of work `tx` (never committed here).
async fn route(s: &AppState, tx: &mut Tx, req: &ArmRequest<'_>, path: ArmPath) -> Result<Response> {
    let (caller, m, version, query, body) =
        (req.caller, req.method, req.version, req.query, req.body);
    let sub_scope = |sub: &str| format!("/subscriptions/{sub}");

    match path {
        ArmPath::Authorization { scope, kind, name } => {
            check_version(api_version::AUTHORIZATION, version)?;
            crate::arm::roles::handle(s, tx, caller, m, &scope, kind, name, query, body).await
        }
        ArmPath::Subscriptions => {
            check_version(api_version::RESOURCES, version)?;
            // the subscriptions the caller can read
            let scope = sub_scope(&s.subscription_id);
            let readable = authz::permitted(
                tx,
                &caller.object_id,
                "Microsoft.Resources/subscriptions/read",
                &scope,
            )
            .await?;
            Ok(list(if readable {
                vec![subscription_json(s)]
            } else {
                vec![]
            }))
        }
        ArmPath::Subscription { subscription } => {
            check_version(api_version::RESOURCES, version)?;
            res::check_subscription(s, &subscription)?;
            authorize(
                tx,
                caller,
                "Microsoft.Resources/subscriptions/read",
                &sub_scope(&subscription),
            )
            .await?;
            match *m {
                Method::GET => Ok(Json(subscription_json(s)).into_response()),
                _ => Err(ServerError::MethodNotAllowed(m.to_string())),
            }
        }
        ArmPath::ResourceGroups { subscription } => {
            check_version(api_version::RESOURCES, version)?;
            res::check_subscription(s, &subscription)?;
            if *m != Method::GET {
                return Err(ServerError::MethodNotAllowed(m.to_string()));
            }
            // the groups the caller can read
            let grants = authz::grants(tx, &caller.object_id).await?;
            let groups = tx.list_resource_groups(&subscription).await?;
            Ok(list(
                groups
                    .iter()
                    .map(res::rg_json)
                    .filter(|g| {
                        readable(
                            &grants,
                            "Microsoft.Resources/subscriptions/resourceGroups/read",
                            g,
                        )
                    })
                    .collect(),
            ))
        }
        ArmPath::ResourceGroup {
            subscription,
            resource_group,
        } => {
            check_version(api_version::RESOURCES, version)?;
            res::check_subscription(s, &subscription)?;
            let scope = format!("/subscriptions/{subscription}/resourceGroups/{resource_group}");
            authorize(
                tx,
                caller,
                &format!(
                    "Microsoft.Resources/subscriptions/resourceGroups/{}",
                    verb(req.authz_method)
                ),
                &scope,
            )
            .await?;
            match *m {
                Method::PUT => {
                    let b: TrackedBody = parse_body(body)?;
                    let (rg, created) = res::put_resource_group(
                        s,
                        tx,
                        &subscription,
                        &resource_group,
                        b.location.as_deref(),
                        b.tags,
                    )
                    .await?;
                    Ok(created_or_ok(created, res::rg_json(&rg)))
                }
                Method::PATCH => {
                    let b: TrackedBody = parse_body(body)?;
                    let cur =
                        res::get_resource_group(s, tx, &subscription, &resource_group).await?;
                    let (rg, _) = res::put_resource_group(
                        s,
                        tx,
                        &subscription,
                        &resource_group,
                        Some(&cur.location),
                        b.tags.or(Some(cur.tags)),
                    )
                    .await?;
                    Ok(Json(res::rg_json(&rg)).into_response())
                }
                Method::GET => Ok(Json(res::rg_json(
                    &res::get_resource_group(s, tx, &subscription, &resource_group).await?,
                ))
                .into_response()),
                Method::HEAD => Ok(
                    match tx
                        .get_resource_group(&subscription, &resource_group)
                        .await?
                    {
                        Some(_) => StatusCode::NO_CONTENT.into_response(),
                        None => StatusCode::NOT_FOUND.into_response(),
                    },
                ),
                Method::DELETE => {
                    if let Some(cluster) = crate::arm::clusters::owner_of_node_group(
                        tx,
                        &subscription,
                        &resource_group,
                    )
                    .await?
                    {
                        return Err(ServerError::Conflict {
                            code: "OperationNotAllowed",
                            message: format!("The resource group '{resource_group}' is the node resource group of the managed cluster '{cluster}'; it is deleted with the cluster."),
                        });
                    }
                    if tx
                        .delete_resource_group(&subscription, &resource_group)
                        .await?
                    {
                        Ok(StatusCode::OK.into_response())
                    } else {
                        Err(ServerError::ResourceGroupNotFound(resource_group))
                    }
                }
                _ => Err(ServerError::MethodNotAllowed(m.to_string())),
            }
        }
        ArmPath::GenericResources {
            subscription,
            resource_group,
        } => generic::list(s, tx, req, &subscription, resource_group.as_deref()).await,
        ArmPath::AtSubscription {
            subscription,
            namespace,
            type_name,
            name,
            rest,
        } => {
            // only deployments are served at subscription scope
            let p = registry::lookup(&namespace, &type_name)?;
            let action = deployments::subscription_action(m, &rest);
            let (true, Some(action)) = (std::ptr::eq(p, &deployments::PROVIDER), action) else {
                return Err(ServerError::InvalidPath(req.uri_path.to_string()));
            };
            p.check_version(version)?;
            res::check_subscription(s, &subscription)?;
            let target = deployments::Target {
                subscription,
                resource_group: None,
                name,
            };
            authorize(tx, caller, &action, &target.canonical()).await?;
            deployments::at_subscription(s, tx, &req.call(p, &target), &rest).await
        }
        ArmPath::Collection {
            subscription,
            resource_group,
            namespace,
            type_name,
        } => {
            let p = registry::lookup(&namespace, &type_name)?;
            p.check_version(version)?;
            res::check_subscription(s, &subscription)?;
            let scope = match &resource_group {
                Some(rg) => format!("/subscriptions/{subscription}/resourceGroups/{rg}"),
                None => sub_scope(&subscription),
            };
            let read = p.action("read");
            if resource_group.is_some() {
                authorize(tx, caller, &read, &scope).await?;
            }
            if *m != Method::GET {
                return Err(ServerError::MethodNotAllowed(m.to_string()));
            }
            if let Some(rg) = &resource_group {
                res::get_resource_group(s, tx, &subscription, rg).await?;
            }
            // a subscription-wide list shows what the caller can read
            let grants = authz::grants(tx, &caller.object_id).await?;
            let target = Collection {
                subscription,
                resource_group,
            };
            let items = (p.list)(s, tx, &req.call(p, &target)).await?;
            Ok(list(
                items
                    .into_iter()
                    .filter(|v| readable(&grants, &read, v))
                    .collect(),
            ))
        }
        ArmPath::Resource(rid) => {
            let p = registry::lookup(&rid.namespace, &rid.type_name)?;
            p.check_version(version)?;
            res::check_subscription(s, &rid.subscription)?;
            authorize(
                tx,
                caller,
                &p.action(verb(req.authz_method)),
                &rid.canonical(),
            )
            .await?;
            node_group_lockdown(tx, m, &rid.subscription, &rid.resource_group).await?;
            match p.resource.of(m) {
                Some(handler) => handler(s, tx, &req.call(p, &rid)).await,
                None => Err(ServerError::MethodNotAllowed(m.to_string())),
            }
        }
        ArmPath::Child {
            parent,
            child_type,
            name,
        } => {
            let p = registry::lookup(&parent.namespace, &parent.type_name)?;
            p.check_version(version)?;
            res::check_subscription(s, &parent.subscription)?;
            let Some((child, served)) = p
                .child(&child_type)
                .and_then(|c| c.resource.as_ref().map(|r| (c, r)))
            else {
                return Err(ServerError::InvalidPath(req.uri_path.to_string()));
            };
            let action = format!("{}/{}/{}", p.namespace, p.type_name, child.type_name);
            let on_child = format!("{}/{}/{name}", parent.canonical(), child.type_name);
            match served.access {
                Access::Child => {
                    let verb = verb(req.authz_method);
                    authorize(tx, caller, &format!("{action}/{verb}"), &on_child).await?
                }
                // the handler authorizes reads (after its own checks of the request); the
                // lockdown below answers only callers that may write
                Access::ParentOnWrite if is_read(m) => {}
                Access::ParentOnWrite => {
                    let action = format!("{action}/{}", verb(m));
                    authorize(tx, caller, &action, &parent.canonical()).await?
                }
                Access::ParentWrite => {
                    let action = format!("{action}/write");
                    authorize(tx, caller, &action, &parent.canonical()).await?
                }
            }
            if served.lockdown {
                node_group_lockdown(tx, m, &parent.subscription, &parent.resource_group).await?;
            }
            let target = ChildId { parent, name };
            (served.handler)(s, tx, &req.call(p, &target)).await
        }
        ArmPath::ChildAction {
            parent,
            child_type,
            name,
            action,
        } => {
            let p = registry::lookup(&parent.namespace, &parent.type_name)?;
            p.check_version(version)?;
            res::check_subscription(s, &parent.subscription)?;
            let Some((child, a)) = p
                .child(&child_type)
                .and_then(|c| c.action_of(&action, m).map(|a| (c, a)))
            else {
                return Err(ServerError::InvalidPath(req.uri_path.to_string()));
            };
            if let Some(rbac) = a.authorize {
                let scope = format!("{}/{}/{name}", parent.canonical(), child.type_name);
                authorize(tx, caller, rbac, &scope).await?;
            }
            if a.lockdown {
                node_group_lockdown(tx, m, &parent.subscription, &parent.resource_group).await?;
            }
            let target = ChildId { parent, name };
            (a.handler)(s, tx, &req.call(p, &target)).await
        }
        ArmPath::Action { resource, action } => {
            let p = registry::lookup(&resource.namespace, &resource.type_name)?;
            p.check_version(version)?;
            res::check_subscription(s, &resource.subscription)?;
            let Some(a) = p.action_of(&action, m) else {
                return Err(ServerError::InvalidPath(req.uri_path.to_string()));
            };
            if let Some(rbac) = a.authorize {
                authorize(tx, caller, rbac, &resource.canonical()).await?;
            }
            if a.lockdown {
                node_group_lockdown(tx, m, &resource.subscription, &resource.resource_group)
                    .await?;
            }
            (a.handler)(s, tx, &req.call(p, &resource)).await
        }
    }
}

fn subscription_json(s: &AppState) -> Value {
    json!({
        "id": format!("/subscriptions/{}", s.subscription_id),
        "subscriptionId": s.subscription_id,
        "tenantId": s.tenant_id,
        "displayName": "Keyless",
        "state": "Enabled",
        "subscriptionPolicies": {"locationPlacementId": "Public_2014-09-01", "quotaId": "Keyless", "spendingLimit": "Off"},
        "authorizationSource": "RoleBased",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::header;
    use keyless_core::claims::Principal;
    use keyless_core::clock::SystemClock;
    use keyless_store::{Kek, Store};
    use tower::ServiceExt;

    /// A server on a fresh SQLite file and a management token of its bootstrap admin.
    async fn server(dir: &std::path::Path) -> (Arc<AppState>, String) {
        let store = Store::sqlite(&dir.join("k.db"), Kek::from_bytes(&[5u8; 32]).unwrap()).unwrap();
        server_on(dir, store).await
    }

    /// The store on PostgreSQL database `url`, with the key-encryption key every test server
    /// here uses.
    async fn pg_store(url: impl Into<String>) -> Store {
        Store::postgres(
            &keyless_store::postgres::PgOptions::new(url),
            Kek::from_bytes(&[5u8; 32]).unwrap(),
        )
        .await
        .unwrap()
    }

    /// A server on `store` (its first start) and a management token of its bootstrap admin.
    async fn server_on(dir: &std::path::Path, store: Store) -> (Arc<AppState>, String) {
        server_with(dir, store, |_| {}).await
    }

    /// [`server_on`] with its configuration changed by `f`.
    async fn server_with(
        dir: &std::path::Path,
        store: Store,
        f: impl FnOnce(&mut crate::state::ServerConfig),
    ) -> (Arc<AppState>, String) {
        let mut cfg =
            crate::state::ServerConfig::new(dir.join("data"), "127.0.0.1:0".parse().unwrap());
        f(&mut cfg);
        let run = crate::start(cfg, store, Arc::new(SystemClock::new()))
            .await
            .unwrap();
        let s = run.state.clone();
        let mut tx = s.store.read("test").await.unwrap();
        let admin = tx
            .get_service_principal(&run.bootstrap.admin_client_id)
            .await
            .unwrap()
            .unwrap();
        drop(tx);
        let principal = Principal::ServicePrincipal {
            object_id: admin.object_id,
            client_id: admin.client_id,
        };
        let token = crate::tokens::mint(&s, &principal, "https://management.azure.com/", 3600)
            .unwrap()
            .access_token;
        (s, token)
    }

    async fn call(
        s: &Arc<AppState>,
        token: &str,
        m: Method,
        path: &str,
        body: Value,
    ) -> (u16, Value) {
        let version = if path.contains("/virtualMachines/") {
            "2021-07-01"
        } else if path.contains("/Microsoft.Resources/deployments/") {
            "2025-04-01"
        } else if path.contains("/providers/") {
            "2023-01-31"
        } else {
            "2019-10-01"
        };
        let req = Request::builder()
            .method(m)
            .uri(format!("{path}?api-version={version}"))
            .header(header::HOST, "localhost")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(if body.is_null() {
                Body::empty()
            } else {
                Body::from(body.to_string())
            })
            .unwrap();
        let resp = crate::app(s.clone()).oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn writes_commit_and_a_refused_write_keeps_nothing_but_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let (s, token) = server(dir.path()).await;
        let sub = s.subscription_id.clone();
        let rg = format!("/subscriptions/{sub}/resourceGroups/rg1");
        let (st, _) = call(&s, &token, Method::PUT, &rg, json!({"location": "local"})).await;
        assert_eq!(st, 201);
        let id = format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1");
        let (st, v) = call(&s, &token, Method::PUT, &id, json!({"location": "local"})).await;
        assert_eq!(st, 201, "{v}");
        let (st, got) = call(&s, &token, Method::GET, &id, Value::Null).await;
        assert_eq!(
            (st, &got["properties"]["clientId"]),
            (200, &v["properties"]["clientId"])
        );
        // a VM naming an identity that does not exist: refused, nothing kept
        let vm = format!("{rg}/providers/Microsoft.Compute/virtualMachines/vm1");
        let missing =
            format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/nope");
        let body = json!({"location": "local", "identity": {"type": "UserAssigned", "userAssignedIdentities": {missing: {}}}});
        let (st, v) = call(&s, &token, Method::PUT, &vm, body).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("FailedIdentityOperation"))
        );
        let (st, _) = call(&s, &token, Method::GET, &vm, Value::Null).await;
        assert_eq!(st, 404);
        // the failed write is in the Activity Log (recorded after its unit of work rolled back)
        let since = keyless_core::activity_log::format_time(
            crate::arm::activity::now_micros() - 3_600_000_000,
        );
        let events = format!(
            "/subscriptions/{sub}/providers/Microsoft.Insights/eventtypes/management/values?api-version=2015-04-01&$filter=eventTimestamp ge '{since}'"
        );
        let req = Request::builder()
            .uri(events.replace(' ', "%20").replace('\'', "%27"))
            .header(header::HOST, "localhost")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let resp = crate::app(s.clone()).oneshot(req).await.unwrap();
        let st = resp.status();
        let v: Value = serde_json::from_slice(
            &axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(st, 200, "{v}");
        let failed: Vec<&Value> = v["value"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["resourceId"]
                    .as_str()
                    .is_some_and(|r| r.eq_ignore_ascii_case(&vm))
            })
            .collect();
        assert_eq!(failed.len(), 1, "{v}");
        assert_eq!(failed[0]["status"]["value"], "Failed");
    }

    #[tokio::test]
    async fn a_fic_put_while_another_holds_the_identity_is_409_and_the_claim_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let (s, token) = server(dir.path()).await;
        let sub = s.subscription_id.clone();
        let rg = format!("/subscriptions/{sub}/resourceGroups/rg1");
        call(&s, &token, Method::PUT, &rg, json!({"location": "local"})).await;
        let id = format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1");
        call(&s, &token, Method::PUT, &id, json!({"location": "local"})).await;
        let fic = format!("{id}/federatedIdentityCredentials/fic-one");
        let body = json!({"properties": {"issuer": "https://issuer.example", "subject": "s1", "audiences": ["api://AzureADTokenExchange"]}});
        // another writer (any process) holds the identity's claim
        let rid = ResourceId::parse(&id).unwrap();
        let claim = format!("fic:{}", rid.key());
        let other = s.store.claim(&claim, s.now(), 30).await.unwrap().unwrap();
        let (st, v) = call(&s, &token, Method::PUT, &fic, body.clone()).await;
        assert_eq!(st, 409, "{v}");
        assert_eq!(
            v["error"]["code"],
            "ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity"
        );
        let (st, _) = call(&s, &token, Method::GET, &fic, Value::Null).await;
        assert_eq!(st, 404, "the refused write kept nothing");
        other.release().await.unwrap();
        let (st, _) = call(&s, &token, Method::PUT, &fic, body.clone()).await;
        assert_eq!(st, 201);
        // released after the commit: the next write and the next claim go through
        let (st, _) = call(&s, &token, Method::PUT, &fic, body).await;
        assert_eq!(st, 200);
        assert!(s.store.claim(&claim, s.now(), 30).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_deployment_whose_server_stopped_mid_run_reads_failed_and_may_be_deployed_again() {
        let dir = tempfile::tempdir().unwrap();
        let (s, token) = server(dir.path()).await;
        let sub = s.subscription_id.clone();
        let rg = format!("/subscriptions/{sub}/resourceGroups/rg1");
        call(&s, &token, Method::PUT, &rg, json!({"location": "local"})).await;
        let dep = format!("{rg}/providers/Microsoft.Resources/deployments/d1");
        let template = json!({"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "contentVersion": "1.0.0.0", "resources": [{"type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "apiVersion": "2023-01-31", "name": "id1", "location": "local"}]});
        let body = json!({"properties": {"mode": "Incremental", "template": template}});
        let (st, v) = call(&s, &token, Method::PUT, &dep, body.clone()).await;
        assert_eq!(st, 201, "{v}");
        // the run ends (its record says so)
        for _ in 0..200 {
            let (_, v) = call(&s, &token, Method::GET, &dep, Value::Null).await;
            if v["properties"]["provisioningState"] == "Succeeded" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        // as a server that stopped mid-run leaves it: Running, accepted long ago, no run's lease
        let rid = ResourceId::new(&sub, "rg1", keyless_core::resource_id::DEPLOYMENT, "d1");
        let mut tx = s.store.write("test").await.unwrap();
        let mut rec = tx.get_tracked(&rid.key()).await.unwrap().unwrap();
        rec.body["deployment"]["properties"]["provisioningState"] = json!("Running");
        rec.body["started"] = json!(crate::arm::activity::now_micros() - 3_600_000_000);
        tx.put_tracked(&rec).await.unwrap();
        tx.commit().await.unwrap();
        let (st, v) = call(&s, &token, Method::GET, &dep, Value::Null).await;
        assert_eq!(st, 200);
        assert_eq!(v["properties"]["provisioningState"], "Failed", "{v}");
        assert_eq!(v["properties"]["error"]["code"], "DeploymentRunStopped");
        // while its run's lease is held it is active: a new PUT is refused 409
        let lease = deployments::run_lease(&rid.key());
        assert!(s
            .store
            .try_lease(&lease, "other-server", s.now(), 30)
            .await
            .unwrap());
        let (st, v) = call(&s, &token, Method::PUT, &dep, body.clone()).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (409, Some("DeploymentActive")),
            "{v}"
        );
        let (_, v) = call(&s, &token, Method::GET, &dep, Value::Null).await;
        assert_eq!(v["properties"]["provisioningState"], "Running");
        // many readers of a running deployment at once (more than the store has readers): each
        // reads the run's lease in its own unit of work, none waits for another's
        let reads = (0..24).map(|_| call(&s, &token, Method::GET, &dep, Value::Null));
        let answers = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            futures::future::join_all(reads),
        )
        .await
        .expect("concurrent reads of a running deployment never end");
        assert!(answers.iter().all(|(st, _)| *st == 200));
        // once it lapses, the deployment may be deployed again
        s.store.release_lease(&lease, "other-server").await.unwrap();
        let (st, v) = call(&s, &token, Method::PUT, &dep, body).await;
        assert_eq!(st, 200, "{v}");
    }

    /// Two first PUTs of one deployment at once on PostgreSQL (where a row that does not exist
    /// yet cannot be locked): one creates it and runs, the other is refused `DeploymentActive`
    /// (or, had the first already ended, replaces it) — never two creations, never two runs.
    #[test]
    fn simultaneous_first_puts_of_a_deployment_on_postgresql_start_one_run() {
        let Some(pg) = keyless_store::testing::PgServer::start() else {
            return;
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let url = pg.database().await;
            let store = pg_store(url).await;
            let dir = tempfile::tempdir().unwrap();
            let (s, token) = server_on(dir.path(), store).await;
            let sub = s.subscription_id.clone();
            let rg = format!("/subscriptions/{sub}/resourceGroups/rg1");
            call(&s, &token, Method::PUT, &rg, json!({"location": "local"})).await;
            let template = json!({"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
                "contentVersion": "1.0.0.0", "resources": [{"type": "Microsoft.ManagedIdentity/userAssignedIdentities",
                "apiVersion": "2023-01-31", "name": "id1", "location": "local"}]});
            let body = json!({"properties": {"mode": "Incremental", "template": template}});
            for i in 0..40 {
                let dep = format!("{rg}/providers/Microsoft.Resources/deployments/race{i}");
                let (a, b) = tokio::join!(
                    call(&s, &token, Method::PUT, &dep, body.clone()),
                    call(&s, &token, Method::PUT, &dep, body.clone()),
                );
                let mut got = [(a.0, a.1["error"]["code"].clone()), (b.0, b.1["error"]["code"].clone())];
                got.sort_by_key(|g| g.0);
                match [got[0].0, got[1].0] {
                    [201, 409] => assert_eq!(got[1].1, "DeploymentActive", "{got:?}"),
                    [200, 201] => {}
                    other => panic!("deployment race{i}: {other:?} {got:?}"),
                }
            }
        });
    }

    /// A deployment whose server stops mid-run is run on by another server of the same store
    /// once its run's lease lapses: readers see it running all along (never failed), and it ends
    /// Succeeded with everything deployed — its template evaluated again as its request had it
    /// (the secure parameter stored sealed, `utcNow()` the request's time).
    #[test]
    fn a_deployment_whose_server_stopped_is_run_on_by_another_server() {
        let Some(pg) = keyless_store::testing::PgServer::start() else {
            return;
        };
        const N: usize = 12;
        const SECRET: &str = "resume-s3cret-value";
        let template = json!({"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "contentVersion": "1.0.0.0",
            "parameters": {"pw": {"type": "securestring"}, "stamp": {"type": "string", "defaultValue": "[utcNow()]"}},
            "resources": [{"type": "Microsoft.ManagedIdentity/userAssignedIdentities", "apiVersion": "2023-01-31",
                "name": "[concat('id', copyIndex())]", "location": "local",
                "copy": {"name": "ids", "count": N, "mode": "serial", "batchSize": 1},
                "tags": {"stamp": "[parameters('stamp')]", "pw": "[uniqueString(parameters('pw'))]"}}]});
        let body = json!({"properties": {"mode": "Incremental", "template": template,
            "parameters": {"pw": {"value": SECRET}}}});
        // server A accepts the deployment and stops before its run ends (its runtime, and every
        // task of it, dropped)
        let dir_a = tempfile::tempdir().unwrap();
        let rt_a = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (url, dep) = rt_a.block_on(async {
            let url = pg.database().await;
            let store = pg_store(url.clone()).await;
            let (s, token) = server_on(dir_a.path(), store).await;
            let rg = format!("/subscriptions/{}/resourceGroups/rg1", s.subscription_id);
            call(&s, &token, Method::PUT, &rg, json!({"location": "local"})).await;
            let dep = format!("{rg}/providers/Microsoft.Resources/deployments/d1");
            let (st, v) = call(&s, &token, Method::PUT, &dep, body.clone()).await;
            assert_eq!(st, 201, "{v}");
            (url, dep)
        });
        drop(rt_a);
        // as if A had recorded an operation before it stopped
        let stale = rt_b_setup_stale(&url, &dep);
        // server B, on the same store, looks for runs to resume every 200 ms
        let dir_b = tempfile::tempdir().unwrap();
        let rt_b = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt_b.block_on(async {
            let store = pg_store(url).await;
            let (s, token) = server_with(dir_b.path(), store, |cfg| {
                cfg.deployment_resume_interval = std::time::Duration::from_millis(200);
            })
            .await;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            let (_, first) = call(&s, &token, Method::GET, &dep, Value::Null).await;
            assert_ne!(
                first["properties"]["provisioningState"], "Succeeded",
                "server A's run ended before A stopped: nothing to resume"
            );
            let shown = loop {
                let (st, v) = call(&s, &token, Method::GET, &dep, Value::Null).await;
                assert_eq!(st, 200, "{v}");
                assert!(!v.to_string().contains(SECRET), "{v}");
                let state = v["properties"]["provisioningState"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(
                    matches!(state.as_str(), "Accepted" | "Running" | "Succeeded"),
                    "a stopped run that will be resumed reads as running: {v}"
                );
                if state == "Succeeded" {
                    break v;
                }
                assert!(std::time::Instant::now() < deadline, "not resumed: {v}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            };
            let stamp = shown["properties"]["parameters"]["stamp"]["value"].clone();
            assert!(stamp.is_string(), "{shown}");
            let rg = dep.split("/providers/").next().unwrap();
            let mut pw_tags = std::collections::HashSet::new();
            for i in 0..N {
                let id = format!(
                    "{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id{i}"
                );
                let (st, v) = call(&s, &token, Method::GET, &id, Value::Null).await;
                assert_eq!(st, 200, "id{i}: {v}");
                assert_eq!(v["tags"]["stamp"], stamp, "the request's utcNow(): {v}");
                pw_tags.insert(v["tags"]["pw"].as_str().unwrap_or_default().to_string());
            }
            // the request's secure value, restored from the sealed record
            let expected = {
                let t = json!({"$schema": "x", "contentVersion": "1.0.0.0", "resources": [],
                    "outputs": {"u": {"type": "string", "value": format!("[uniqueString('{SECRET}')]")}}});
                let scope = keyless_core::template::Scope {
                    level: keyless_core::template::Level::ResourceGroup,
                    subscription_id: "s".into(),
                    tenant_id: "t".into(),
                    resource_group: "rg".into(),
                    resource_group_location: "local".into(),
                    deployment_name: "d".into(),
                    location: None,
                    environment: Value::Null,
                };
                let plan = keyless_core::template::Plan::prepare(&t, &json!({}), &scope).unwrap();
                let out = plan
                    .outputs(&keyless_core::template::NoReferences)
                    .unwrap();
                out["u"]["value"].as_str().unwrap().to_string()
            };
            assert_eq!(
                pw_tags,
                std::collections::HashSet::from([expected]),
                "the secure parameter as the request gave it"
            );
            // the run's resumable record went with its end; no stored row holds the value
            let key = dep.to_ascii_lowercase();
            let mut tx = s.store.read("test").await.unwrap();
            assert!(tx
                .get_tracked(&deployments::run_key(&key))
                .await
                .unwrap()
                .is_none());
            let rec = tx.get_tracked(&key).await.unwrap().unwrap();
            assert!(!rec.body.to_string().contains(SECRET));
            // the resumed run started over: its operations are its own, one per resource
            assert!(tx.get_tracked(&stale).await.unwrap().is_none());
            let ops = tx
                .list_tracked_under(&key, deployments::OPERATION_TYPE)
                .await
                .unwrap();
            assert_eq!(ops.len(), N, "{ops:?}");
        });
    }

    /// An operation row for deployment `dep` as a stopped run leaves it: its key.
    fn rt_b_setup_stale(url: &str, dep: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = pg_store(url).await;
            let key = dep.to_ascii_lowercase();
            let rec = {
                let mut tx = store.read("test").await.unwrap();
                tx.get_tracked(&key).await.unwrap().unwrap()
            };
            let op = keyless_store::TrackedRecord {
                key: deployments::operation_key(&key, "STALE0000000000"),
                type_name: deployments::OPERATION_TYPE.into(),
                subscription: rec.subscription.clone(),
                resource_group: rec.resource_group.clone(),
                body: json!({"id": format!("{dep}/operations/STALE0000000000"), "properties": {}}),
            };
            let mut tx = store.write("test").await.unwrap();
            tx.put_tracked(&op).await.unwrap();
            tx.commit().await.unwrap();
            op.key
        })
    }

    #[tokio::test]
    async fn validate_and_what_if_hold_no_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (s, token) = server(dir.path()).await;
        let sub = s.subscription_id.clone();
        let rg = format!("/subscriptions/{sub}/resourceGroups/rg1");
        call(&s, &token, Method::PUT, &rg, json!({"location": "local"})).await;
        let template = json!({"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "contentVersion": "1.0.0.0", "resources": [{"type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "apiVersion": "2023-01-31", "name": "id1", "location": "local"}]});
        let body = json!({"properties": {"mode": "Incremental", "template": template,
            "whatIfSettings": {"resultFormat": "ResourceIdOnly"}}});
        // another unit of work holds SQLite's writer all along; the request's own unit of work
        // (`dispatch`: the Activity Log record after it is a write of its own) needs none
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        let caller = authenticate(&s, &headers).unwrap();
        let writer = s.store.write("test").await.unwrap();
        for action in ["validate", "whatIf"] {
            let path = format!("{rg}/providers/Microsoft.Resources/deployments/d1/{action}");
            let req = Request::builder()
                .method(Method::POST)
                .uri(format!("{path}?api-version=2025-04-01"))
                .header(header::HOST, "localhost")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let resp = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                dispatch(&s, &caller, req),
            )
            .await
            .unwrap_or_else(|_| panic!("{action} waited for the writer"))
            .unwrap();
            let st = resp.status().as_u16();
            let v: Value = serde_json::from_slice(
                &axum::body::to_bytes(resp.into_body(), usize::MAX)
                    .await
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(st, 200, "{action}: {v}");
            if action == "whatIf" {
                // ResourceIdOnly: the changes without their payloads
                let c = &v["properties"]["changes"][0];
                assert_eq!(c["changeType"], "Create", "{v}");
                assert!(c.get("after").is_none(), "{v}");
            }
        }
        drop(writer);
    }

    #[tokio::test]
    async fn a_deployment_may_carry_a_template_of_up_to_4_mib_other_writes_1_mib() {
        let dir = tempfile::tempdir().unwrap();
        let (s, token) = server(dir.path()).await;
        let sub = s.subscription_id.clone();
        let rg = format!("/subscriptions/{sub}/resourceGroups/rg1");
        call(&s, &token, Method::PUT, &rg, json!({"location": "local"})).await;
        let big = "x".repeat(2 * 1024 * 1024);
        let template = json!({"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "contentVersion": "1.0.0.0", "metadata": {"notes": big},
            "resources": [{"type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "apiVersion": "2023-01-31", "name": "id1", "location": "local"}]});
        let dep = format!("{rg}/providers/Microsoft.Resources/deployments/d1/validate");
        let body = json!({"properties": {"mode": "Incremental", "template": template}});
        let (st, v) = call(&s, &token, Method::POST, &dep, body).await;
        assert_eq!(
            st,
            200,
            "{}",
            &v.to_string()[..v.to_string().len().min(500)]
        );
        let id = format!("{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1");
        let (st, v) = call(
            &s,
            &token,
            Method::PUT,
            &id,
            json!({"location": "local", "tags": {"t": big}}),
        )
        .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (413, Some("RequestEntityTooLarge"))
        );
    }
}
