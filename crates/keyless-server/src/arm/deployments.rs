//! `Microsoft.Resources/deployments` at resource-group scope: template deployments.
//!
//! A PUT validates the template and its parameters ([`keyless_core::template::Plan::prepare`],
//! pure), checks every resource it names is a type served at its api-version and that the caller
//! may write it (ARM's preflight), stores the deployment as `Accepted` and answers 201 with
//! `Azure-AsyncOperation`; nothing is deployed by a request that fails validation. Once that
//! unit of work has committed, the router takes the [`Started`] job from the answer and runs it
//! ([`crate::arm::deployment_run`]): every resource is deployed through the control plane's
//! own front door as the caller, independent resources in parallel as ARM does (so two
//! federated credentials of one identity without `dependsOn` meet the identity's write claim,
//! and one fails 409). Each resource's outcome is a deployment operation; the deployment ends
//! `Succeeded` or `Failed` with the failures per resource in `properties.error.details`.
//!
//! Stored in the `tracked` table: the deployment (its public form, its template, whether a cancel
//! was asked) under the deployment's key, and its operations below it, so deleting a deployment
//! or its resource group deletes them too.

use crate::arm::provider::{
    handler, Access, Action, Call, Child, ChildId, ChildResource, Collection, Methods, Provider,
};
use crate::arm::reply;
use crate::arm::resources::get_resource_group;
use crate::authz;
use crate::error::{Result, ServerError};
use crate::request::Caller;
use crate::state::AppState;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use keyless_core::api_version;
use keyless_core::resource_id::{ArmPath, ResourceId, DEPLOYMENT};
use keyless_core::template::{Level, Plan, Scope};
use keyless_store::{TrackedRecord, Tx};
use serde_json::{json, Value};
use std::sync::Arc;

pub const DEPLOYMENT_TYPE: &str = "Microsoft.Resources/deployments";
pub const OPERATION_TYPE: &str = "Microsoft.Resources/deployments/operations";

pub static PROVIDER: Provider = Provider {
    namespace: DEPLOYMENT.0,
    type_name: DEPLOYMENT.1,
    api_versions: api_version::RESOURCES,
    accepts: None,
    list: handler!(list),
    resource: Methods {
        get: Some(handler!(get)),
        head: Some(handler!(head)),
        put: Some(handler!(put)),
        delete: Some(handler!(delete)),
        ..Methods::NONE
    },
    children: &[
        Child {
            type_name: "operations",
            resource: Some(ChildResource {
                access: Access::Child,
                lockdown: false,
                handler: handler!(operation),
            }),
            actions: &[],
        },
        Child {
            type_name: "operationStatuses",
            resource: Some(ChildResource {
                access: Access::Child,
                lockdown: false,
                handler: handler!(status),
            }),
            actions: &[],
        },
    ],
    actions: &[
        Action {
            name: "validate",
            method: Method::POST,
            authorize: Some("Microsoft.Resources/deployments/validate/action"),
            lockdown: false,
            handler: handler!(validate),
        },
        Action {
            name: "whatIf",
            method: Method::POST,
            authorize: Some("Microsoft.Resources/deployments/whatIf/action"),
            lockdown: false,
            handler: handler!(what_if),
        },
        Action {
            name: "exportTemplate",
            method: Method::POST,
            authorize: Some("Microsoft.Resources/deployments/exportTemplate/action"),
            lockdown: false,
            handler: handler!(export_template),
        },
        Action {
            name: "cancel",
            method: Method::POST,
            authorize: Some("Microsoft.Resources/deployments/cancel/action"),
            lockdown: false,
            handler: handler!(cancel),
        },
        Action {
            name: "operations",
            method: Method::GET,
            authorize: Some("Microsoft.Resources/deployments/operations/read"),
            lockdown: false,
            handler: handler!(operations),
        },
    ],
    row: Some("tracked"),
    etag_in_body_since: None,
    role_scope: None,
};

/// At most this many dependencies are listed in a deployment's `dependencies`.
const DEPENDENCIES_SHOWN: usize = 2_000;

/// How a deployment treats what its template does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Leave it.
    Incremental,
    /// Delete it (the resource group's resources the template no longer names).
    Complete,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Incremental => "Incremental",
            Mode::Complete => "Complete",
        }
    }
}

/// A deployment accepted and committed, to be run by [`crate::arm::deployment_run::run`].
pub struct Job {
    /// The deployment's store key.
    pub key: String,
    /// Its canonical id.
    pub id: String,
    pub correlation_id: String,
    pub subscription: String,
    pub resource_group: String,
    pub plan: Plan,
    pub mode: Mode,
    /// Who deployed it: every resource is written as this caller.
    pub caller: Caller,
}

/// The answer's extension that carries a PUT's [`Job`] to the router, which starts it once the
/// PUT's unit of work has committed (never before: the job reads what the PUT stored).
#[derive(Clone)]
pub struct Started(pub Arc<Job>);

/// A deployment: in a resource group, or at subscription scope (`resource_group` None).
#[derive(Debug, Clone)]
pub struct Target {
    pub subscription: String,
    pub resource_group: Option<String>,
    pub name: String,
}

impl Target {
    /// A deployment in a resource group, named by its path.
    pub fn of(rid: &ResourceId) -> Self {
        Target {
            subscription: rid.subscription.clone(),
            resource_group: Some(rid.resource_group.clone()),
            name: rid.name.clone(),
        }
    }

    /// Its id.
    pub fn canonical(&self) -> String {
        match &self.resource_group {
            Some(rg) => ResourceId::new(&self.subscription, rg, DEPLOYMENT, &self.name).canonical(),
            None => format!(
                "/subscriptions/{}/providers/{}/{}/{}",
                self.subscription, DEPLOYMENT.0, DEPLOYMENT.1, self.name
            ),
        }
    }

    /// Its store key.
    pub fn key(&self) -> String {
        self.canonical().to_ascii_lowercase()
    }
}

/// What a deployment's request names, checked and evaluated.
struct Prepared {
    target: Target,
    template: Value,
    plan: Plan,
    mode: Mode,
    /// A subscription-scope deployment's `location`.
    location: Option<String>,
    /// A what-if's `whatIfSettings.resultFormat` is `ResourceIdOnly`: the changes without their
    /// payloads.
    ids_only: bool,
    /// The parameters as evaluated (Key Vault references resolved: secure values, stored
    /// sealed only — [`RUN_TYPE`]), and the time and seed of `utcNow()` / `newGuid()`: what
    /// evaluates the template again as this request did (a resumed run).
    parameters: Value,
    now: u64,
    seed: u128,
}

/// The resource group a deployment is in (echo case), after checking it exists; None at
/// subscription scope (its subscription checked).
async fn scope_of(
    s: &AppState,
    tx: &mut Tx,
    t: &Target,
) -> Result<Option<keyless_store::ResourceGroupRecord>> {
    match &t.resource_group {
        Some(rg) => Ok(Some(get_resource_group(s, tx, &t.subscription, rg).await?)),
        None => {
            crate::arm::resources::check_subscription(s, &t.subscription)?;
            Ok(None)
        }
    }
}

fn not_found(name: &str) -> ServerError {
    ServerError::Deployment {
        code: "DeploymentNotFound",
        message: format!("Deployment '{name}' could not be found."),
        target: None,
        details: Vec::new(),
    }
}

fn invalid_content(message: impl Into<String>) -> ServerError {
    ServerError::InvalidRequestContent(message.into())
}

/// Deployment names: 1–64 characters of letters, digits, `_`, `(`, `)`, `-` and `.`.
fn check_name(name: &str) -> Result<()> {
    let ok = (1..=64).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '(' | ')' | '-' | '.'));
    if ok {
        return Ok(());
    }
    Err(ServerError::Deployment {
        code: "InvalidDeploymentName",
        message: format!("The deployment name '{name}' is invalid. It can contain only alphanumeric characters, underscores, parentheses, hyphens and periods, and be at most 64 characters long."),
        target: None,
        details: Vec::new(),
    })
}

/// The ISO-8601 time of `micros` with ARM's fractional seconds.
pub fn iso_micros(micros: i64) -> String {
    let secs = (micros.max(0) / 1_000_000) as u64;
    let frac = micros.max(0) % 1_000_000;
    crate::util::format_iso(secs).replacen('Z', &format!(".{frac:06}0Z"), 1)
}

/// An ISO-8601 duration (`PT1.234S`) of `micros`.
pub fn duration(micros: i64) -> String {
    let m = micros.max(0);
    format!("PT{}.{:06}S", m / 1_000_000, m % 1_000_000)
}

/// Parse the request's body (az splices the template file raw into it: comments and all) and
/// evaluate everything that needs no deployed resource.
async fn prepare<T: Sync>(
    s: &AppState,
    tx: &mut Tx,
    c: &Call<'_, T>,
    t: &Target,
) -> Result<Prepared> {
    check_name(&t.name)?;
    let rg = scope_of(s, tx, t).await?;
    let text = std::str::from_utf8(c.body)
        .map_err(|_| invalid_content("The request content is not valid UTF-8."))?;
    if text.trim().is_empty() {
        return Err(invalid_content("the body is empty"));
    }
    let body = keyless_core::template::parse_jsonc(text).map_err(|e| invalid_content(e.message))?;
    let props = &body["properties"];
    if !props.is_object() {
        return Err(invalid_content("'properties' is required"));
    }
    if !props["templateLink"].is_null() || !props["parametersLink"].is_null() {
        return Err(invalid_content("Keyless cannot fetch a template or parameters by link ('templateLink', 'parametersLink'): send them inline ('az deployment group create --template-file', 'properties.template')."));
    }
    let template = props["template"].clone();
    if !template.is_object() {
        return Err(ServerError::Deployment {
            code: "InvalidRequestContent",
            message: "The request content was invalid and could not be deserialized: 'properties.template' must be a JSON object.".into(),
            target: None,
            details: Vec::new(),
        });
    }
    let mode = match props["mode"].as_str() {
        None => Mode::Incremental,
        Some(m) if m.eq_ignore_ascii_case("incremental") => Mode::Incremental,
        Some(m) if m.eq_ignore_ascii_case("complete") => Mode::Complete,
        Some(m) => {
            return Err(invalid_content(format!(
                "The deployment mode '{m}' is not valid: it must be 'Incremental' or 'Complete'."
            )))
        }
    };
    let mut parameters = match &props["parameters"] {
        Value::Null => json!({}),
        p @ Value::Object(_) => p.clone(),
        _ => {
            return Err(invalid_content(
                "'properties.parameters' must be a JSON object",
            ))
        }
    };
    let location = match (&rg, body["location"].as_str()) {
        (Some(_), _) => None,
        (None, Some(l)) if !l.trim().is_empty() => Some(l.to_string()),
        (None, _) => {
            return Err(ServerError::Deployment {
                code: "LocationRequired",
                message: "The location property is required for this definition: a subscription-scope deployment needs a 'location' (az deployment sub create --location).".into(),
                target: None,
                details: Vec::new(),
            })
        }
    };
    if rg.is_none() && mode == Mode::Complete {
        return Err(ServerError::Deployment {
            code: "InvalidDeploymentMode",
            message: "The deployment mode 'Complete' is not supported for deployments at subscription scope; use 'Incremental'.".into(),
            target: None,
            details: Vec::new(),
        });
    }
    let scope = scope_of_run(s, t, rg.as_ref(), location.clone());
    // secrets the parameters take from key vaults, read as the caller may read them
    crate::arm::kv_references::resolve(s, tx, c.caller, &template, &mut parameters).await?;
    // the time and seed of `utcNow()` / `newGuid()`, kept so that a resumed run evaluates the
    // same values
    let (now, seed) = (s.now(), uuid::Uuid::new_v4().as_u128());
    let plan = Plan::prepare_at(&template, &parameters, &scope, now, seed)?;
    preflight(tx, c.caller, c.providers, &plan).await?;
    let target = Target {
        subscription: t.subscription.clone(),
        resource_group: rg.map(|g| g.name),
        name: t.name.clone(),
    };
    let ids_only = props["whatIfSettings"]["resultFormat"]
        .as_str()
        .is_some_and(|f| f.eq_ignore_ascii_case("ResourceIdOnly"));
    Ok(Prepared {
        target,
        template,
        plan,
        mode,
        location,
        ids_only,
        parameters,
        now,
        seed,
    })
}

/// Where a deployment's template runs: its group (None at subscription scope), its name, a
/// subscription-scope deployment's `location`.
fn scope_of_run(
    s: &AppState,
    t: &Target,
    rg: Option<&keyless_store::ResourceGroupRecord>,
    location: Option<String>,
) -> Scope {
    Scope {
        subscription_id: s.subscription_id.clone(),
        tenant_id: s.tenant_id.clone(),
        resource_group: rg.map(|g| g.name.clone()).unwrap_or_default(),
        resource_group_location: rg.map(|g| g.location.clone()).unwrap_or_default(),
        deployment_name: t.name.clone(),
        level: if rg.is_some() {
            Level::ResourceGroup
        } else {
            Level::Subscription
        },
        location,
        environment: crate::cloud::template_environment(s),
    }
}

/// ARM's preflight: every resource is of a type served, at an api-version its provider serves,
/// and the caller may write it (wherever it is: its own route authorizes it again when it is
/// written). Nothing is deployed when one fails.
async fn preflight(
    tx: &mut Tx,
    caller: &Caller,
    providers: &'static [&'static Provider],
    plan: &Plan,
) -> Result<()> {
    let lookup = |ns: &str, ty: &str| crate::arm::provider::find(providers, ns, ty);
    let grants = authz::grants(tx, &caller.object_id).await?;
    for r in &plan.resources {
        let refused = |code: &'static str, message: String| {
            ServerError::Deployment {
            code: "InvalidTemplateDeployment",
            message: format!("The template deployment failed because of policy violation or an unsupported resource: resource '{}' of type '{}'.", r.id, r.full_type),
            target: Some(r.id.clone()),
            details: vec![json!({"code": code, "target": r.id, "message": message})],
        }
        };
        let path = ArmPath::parse(&r.id).map_err(|_| {
            refused(
                "InvalidResourceId",
                format!("The resource id '{}' is not valid.", r.id),
            )
        })?;
        let served = match &path {
            ArmPath::Resource(rid) => {
                lookup(&rid.namespace, &rid.type_name).and_then(|p| p.check_version(&r.api_version))
            }
            ArmPath::Child {
                parent, child_type, ..
            } => lookup(&parent.namespace, &parent.type_name).and_then(|p| {
                p.check_version(&r.api_version)?;
                match p.child(child_type).and_then(|c| c.resource.as_ref()) {
                    Some(_) => Ok(()),
                    None => Err(ServerError::InvalidResourceType {
                        namespace: parent.namespace.clone(),
                        type_name: format!("{}/{child_type}", parent.type_name),
                    }),
                }
            }),
            // a resource group (at subscription scope) and a nested deployment at subscription
            // scope: served by the resources provider at its api-versions
            ArmPath::ResourceGroup { .. } | ArmPath::AtSubscription { .. }
                if matches!(&path, ArmPath::ResourceGroup { .. })
                    || r.full_type.eq_ignore_ascii_case(DEPLOYMENT_TYPE) =>
            {
                if api_version::is_supported(api_version::RESOURCES, &r.api_version) {
                    Ok(())
                } else {
                    Err(ServerError::NoRegisteredProviderFound {
                        location: "local".into(),
                        version: r.api_version.clone(),
                        type_name: r.full_type.rsplit('/').next().unwrap_or_default().into(),
                        supported: api_version::RESOURCES.join(", "),
                    })
                }
            }
            ArmPath::Authorization {
                kind: keyless_core::resource_id::AuthorizationKind::RoleAssignments,
                name: Some(_),
                ..
            } => {
                if api_version::is_supported(api_version::AUTHORIZATION, &r.api_version) {
                    Ok(())
                } else {
                    Err(ServerError::NoRegisteredProviderFound {
                        location: "local".into(),
                        version: r.api_version.clone(),
                        type_name: "roleAssignments".into(),
                        supported: api_version::AUTHORIZATION.join(", "),
                    })
                }
            }
            _ => Err(ServerError::InvalidResourceType {
                namespace: r.full_type.split('/').next().unwrap_or_default().into(),
                type_name: r
                    .full_type
                    .split_once('/')
                    .map(|x| x.1)
                    .unwrap_or_default()
                    .into(),
            }),
        };
        if let Err(e) = served {
            let (_, code) = e.status_and_code();
            let code: &'static str = match code.as_str() {
                "NoRegisteredProviderFound" => "NoRegisteredProviderFound",
                _ => "InvalidResourceType",
            };
            return Err(refused(code, e.to_string()));
        }
        // the action the resource's own route authorizes
        let action = match &path {
            ArmPath::ResourceGroup { .. } => {
                "Microsoft.Resources/subscriptions/resourceGroups/write".to_string()
            }
            _ => format!("{}/write", r.full_type),
        };
        if keyless_core::rbac::authorize(&grants, &action, &r.id).is_none() {
            return Err(ServerError::AuthorizationFailed {
                principal: caller.object_id.clone(),
                action,
                scope: r.id.clone(),
            });
        }
    }
    Ok(())
}

/// The public form of a deployment (no template), as a GET answers it.
fn deployment_json(
    p: &Prepared,
    correlation_id: &str,
    state: &str,
    now: i64,
    extra: Value,
) -> Value {
    let mut providers: Vec<(String, Vec<String>)> = Vec::new();
    for r in &p.plan.resources {
        let (ns, ty) = r.full_type.split_once('/').unwrap_or((&r.full_type, ""));
        match providers
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(ns))
        {
            Some((_, types)) => {
                if !types.iter().any(|t| t.eq_ignore_ascii_case(ty)) {
                    types.push(ty.to_string())
                }
            }
            None => providers.push((ns.to_string(), vec![ty.to_string()])),
        }
    }
    let providers: Vec<Value> = providers
        .into_iter()
        .map(|(ns, types)| {
            json!({"namespace": ns, "resourceTypes": types.iter().map(|t| json!({"resourceType": t, "locations": ["local"]})).collect::<Vec<_>>()})
        })
        .collect();
    // ARM's list of each resource's dependencies, up to DEPENDENCIES_SHOWN of them in all (a
    // template may have 800 resources each depending on a loop of 800)
    let mut shown = 0;
    let dependencies: Vec<Value> = p
        .plan
        .resources
        .iter()
        .filter(|r| !r.depends_on.is_empty())
        .take_while(|r| {
            shown += r.depends_on.len();
            shown <= DEPENDENCIES_SHOWN
        })
        .map(|r| {
            json!({
                "id": r.id,
                "resourceType": r.full_type,
                "resourceName": r.name,
                "dependsOn": r.depends_on.iter().map(|&d| {
                    let d = &p.plan.resources[d];
                    json!({"id": d.id, "resourceType": d.full_type, "resourceName": d.name})
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut props = json!({
        "templateHash": Plan::template_hash(&p.template),
        "parameters": p.plan.echoed_parameters(),
        "mode": p.mode.as_str(),
        "provisioningState": state,
        "timestamp": iso_micros(now),
        "duration": "PT0S",
        "correlationId": correlation_id,
        "providers": providers,
        "dependencies": dependencies,
    });
    if let (Value::Object(m), Value::Object(e)) = (&mut props, extra) {
        m.extend(e);
    }
    let mut d = json!({
        "id": p.target.canonical(),
        "name": p.target.name,
        "type": DEPLOYMENT_TYPE,
        "properties": props,
    });
    if let Some(l) = &p.location {
        d["location"] = json!(l);
    }
    d
}

/// The stored deployment `t`, if any.
pub async fn load(tx: &mut Tx, t: &Target) -> Result<Option<TrackedRecord>> {
    Ok(tx.get_tracked(&t.key()).await?)
}

/// How long a run's lease lasts unless renewed (every third of it): a deployment whose
/// server stopped is shown `Failed` within this long.
pub const RUN_LEASE_TTL: u64 = 30;

/// The lease a deployment's run holds while it runs ([`crate::arm::deployment_run::run`]).
pub fn run_lease(key: &str) -> String {
    format!("deployment-run:{key}")
}

/// Whether the deployment is being run: `Accepted` or `Running`, and its run's lease held (or
/// accepted so recently that its run may not have taken it yet). A deployment whose server
/// stopped mid-run is not: it may be deployed again or deleted, and reads show it `Failed`.
async fn is_active(s: &AppState, tx: &mut Tx, rec: &TrackedRecord) -> Result<bool> {
    if !running(&rec.body) {
        return Ok(false);
    }
    // in the request's own unit of work: waiting for a second one while holding it could wait
    // for ever (a few readers, each held by such a request)
    Ok(just_started(&rec.body)
        || tx
            .lease_holder(&run_lease(&rec.key), s.now())
            .await?
            .is_some()
        // a run to resume: a server takes it on within `deployment_resume_interval`
        || tx.get_tracked(&run_key(&rec.key)).await?.is_some())
}

/// Whether a stored deployment (its record's body) has a run that has not ended.
fn running(body: &Value) -> bool {
    matches!(
        body["deployment"]["properties"]["provisioningState"].as_str(),
        Some("Accepted" | "Running")
    )
}

/// Whether its run started less than a run lease ago (it may not hold its lease yet).
fn just_started(body: &Value) -> bool {
    let started = body["started"].as_i64().unwrap_or(0);
    crate::arm::activity::now_micros() - started < RUN_LEASE_TTL as i64 * 1_000_000
}

/// Whether a stored deployment's body is run `correlation_id`'s (a later PUT replaces it).
pub fn is_run(body: &Value, correlation_id: &str) -> bool {
    body["deployment"]["properties"]["correlationId"].as_str() == Some(correlation_id)
}

/// A deployment's resumable run, stored beside it (`{key}/run`) until it ends: the
/// deployment's parameters, time, seed, mode and caller, sealed. Not an ARM type: no route
/// and no list shows it.
pub const RUN_TYPE: &str = "Microsoft.Resources/deployments/run";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The key of deployment `key`'s resumable run.
pub fn run_key(key: &str) -> String {
    format!("{key}/run")
}

/// What the sealed run is bound to: its deployment, its run and its template (a record moved,
/// replayed or given another template does not open).
fn run_aad(key: &str, correlation_id: &str, template: &Value) -> String {
    format!(
        "deployment-run:{key}:{correlation_id}:{}",
        Plan::template_hash(template)
    )
}

/// What [`resume`] makes of a stored run.
pub enum Resume {
    /// Run it (its lease is free).
    Job(Box<Job>),
    /// Nothing to do: it runs somewhere, it ended, or it is gone.
    Skip,
    /// It cannot run again: end it `Failed` with this error.
    Stop(Value),
}

/// A resumed run starts over: the operations its stopped server recorded go, so that the
/// deployment's operations are this run's.
pub async fn start_over(tx: &mut Tx, key: &str) -> Result<()> {
    for op in tx.list_tracked_under(key, OPERATION_TYPE).await? {
        tx.delete_tracked(&op.key).await?;
    }
    Ok(())
}

/// Whether stored run `run` (a [`RUN_TYPE`] record) waits for a server to take it: its lease
/// is free (checked first: it is the cheap one), its deployment is still this run's and has
/// not ended, and it did not start just now. Its deployment's key, if so.
pub async fn waiting<'r>(
    s: &AppState,
    tx: &mut Tx,
    run: &'r TrackedRecord,
) -> Result<Option<&'r str>> {
    let Some(key) = run.key.strip_suffix("/run") else {
        return Ok(None);
    };
    if tx.lease_holder(&run_lease(key), s.now()).await?.is_some() {
        return Ok(None);
    }
    let correlation_id = run.body["correlationId"].as_str().unwrap_or_default();
    Ok(match tx.get_tracked(key).await? {
        Some(rec)
            if running(&rec.body)
                && is_run(&rec.body, correlation_id)
                && !just_started(&rec.body) =>
        {
            Some(key)
        }
        _ => None,
    })
}

/// The job of stored run `run` ([`waiting`]), for the server that now holds its lease: checked
/// again (another server may have ended it meanwhile), its template evaluated again exactly as
/// its request did (same parameters, time and seed).
pub async fn resume(s: &AppState, tx: &mut Tx, key: &str, run: &TrackedRecord) -> Result<Resume> {
    let correlation_id = run.body["correlationId"].as_str().unwrap_or_default();
    let Some(rec) = tx.get_tracked(key).await? else {
        return Ok(Resume::Skip);
    };
    if !running(&rec.body) || !is_run(&rec.body, correlation_id) {
        return Ok(Resume::Skip);
    }
    let stop = |why: &str| {
        Ok(Resume::Stop(
            json!({"code": "DeploymentRunStopped", "message": format!(
                "The deployment stopped with its server and could not be run again: {why} Deploy it again; what it deployed so far stays."
            )}),
        ))
    };
    let sealed = run.body["sealed"].as_str().and_then(|b| B64.decode(b).ok());
    let aad = run_aad(key, correlation_id, &rec.body["template"]);
    let Some(saved) = sealed
        .and_then(|b| tx.open_sealed(&aad, &b).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return stop("its stored parameters cannot be read.");
    };
    let target = Target {
        subscription: rec.subscription.clone(),
        resource_group: Some(rec.resource_group.clone()).filter(|g| !g.is_empty()),
        name: rec.body["deployment"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    };
    let group = match &target.resource_group {
        Some(rg) => match get_resource_group(s, tx, &target.subscription, rg).await {
            Ok(g) => Some(g),
            Err(ServerError::Store(e)) => return Err(ServerError::Store(e)),
            Err(_) => return stop("its resource group is gone."),
        },
        None => None,
    };
    let location = saved["location"].as_str().map(str::to_string);
    let scope = scope_of_run(s, &target, group.as_ref(), location);
    let seed = saved["seed"]
        .as_str()
        .and_then(|x| x.parse::<u128>().ok())
        .unwrap_or_default();
    let plan = match Plan::prepare_at(
        &rec.body["template"],
        &saved["parameters"],
        &scope,
        saved["now"].as_u64().unwrap_or_default(),
        seed,
    ) {
        Ok(p) => p,
        Err(e) => return stop(&e.message),
    };
    let mode = if saved["mode"] == "Complete" {
        Mode::Complete
    } else {
        Mode::Incremental
    };
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    Ok(Resume::Job(Box::new(Job {
        key: key.to_string(),
        id: target.canonical(),
        correlation_id: correlation_id.to_string(),
        subscription: target.subscription.clone(),
        resource_group: target.resource_group.clone().unwrap_or_default(),
        plan,
        mode,
        caller: Caller {
            object_id: text(&saved["caller"]["objectId"]),
            client_id: text(&saved["caller"]["clientId"]),
        },
    })))
}

/// The deployment as reads show it: a run that stopped with its server is `Failed`.
async fn shown(s: &AppState, tx: &mut Tx, rec: &TrackedRecord) -> Result<Value> {
    let mut d = rec.body["deployment"].clone();
    if running(&rec.body) && !is_active(s, tx, rec).await? {
        d["properties"]["provisioningState"] = json!("Failed");
        d["properties"]["error"] = json!({
            "code": "DeploymentRunStopped",
            "message": "The deployment stopped before it finished: the Keyless server running it ended. Deploy it again; what it deployed so far stays.",
        });
    }
    Ok(d)
}

async fn list(s: &AppState, tx: &mut Tx, c: &Call<'_, Collection>) -> Result<Vec<Value>> {
    // a group's deployments, or the subscription-scope ones (stored without a group)
    let rg = match &c.target.resource_group {
        Some(rg) => {
            get_resource_group(s, tx, &c.target.subscription, rg)
                .await?
                .name
        }
        None => String::new(),
    };
    let mut out = Vec::new();
    for r in tx
        .list_tracked(DEPLOYMENT_TYPE, &c.target.subscription, Some(&rg))
        .await?
    {
        out.push(shown(s, tx, &r).await?);
    }
    Ok(out)
}

async fn get(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    get_at(s, tx, &Target::of(c.target)).await
}

async fn get_at(s: &AppState, tx: &mut Tx, rid: &Target) -> Result<Response> {
    scope_of(s, tx, rid).await?;
    let rec = load(tx, rid).await?.ok_or_else(|| not_found(&rid.name))?;
    Ok(Json(shown(s, tx, &rec).await?).into_response())
}

async fn head(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    head_at(s, tx, &Target::of(c.target)).await
}

async fn head_at(s: &AppState, tx: &mut Tx, rid: &Target) -> Result<Response> {
    scope_of(s, tx, rid).await?;
    Ok(match load(tx, rid).await? {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    })
}

/// The `Azure-AsyncOperation` URL of a deployment's run.
fn status_url(s: &AppState, rid: &Target, correlation_id: &str, version: &str) -> String {
    format!(
        "{}{}/operationStatuses/{correlation_id}?api-version={version}",
        s.base_url,
        rid.canonical()
    )
}

async fn put(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    put_at(s, tx, c, &Target::of(c.target)).await
}

async fn put_at<T: Sync>(
    s: &AppState,
    tx: &mut Tx,
    c: &Call<'_, T>,
    t: &Target,
) -> Result<Response> {
    let p = prepare(s, tx, c, t).await?;
    tx.lock_row("tracked", "key", &p.target.key()).await?;
    let existing = load(tx, &p.target).await?;
    if let Some(rec) = &existing {
        if is_active(s, tx, rec).await? {
            return Err(still_active(&p.target.name, rec));
        }
        // a new run replaces the deployment and its operations
        tx.delete_tracked(&p.target.key()).await?;
    }
    let correlation_id = crate::util::new_guid();
    let now = crate::arm::activity::now_micros();
    let public = deployment_json(&p, &correlation_id, "Accepted", now, json!({}));
    let inserted = tx
        .insert_tracked(&TrackedRecord {
            key: p.target.key(),
            type_name: DEPLOYMENT_TYPE.into(),
            subscription: p.target.subscription.clone(),
            resource_group: p.target.resource_group.clone().unwrap_or_default(),
            body: json!({"deployment": public, "template": p.template, "cancel": false, "started": now}),
        })
        .await?;
    if inserted {
        // what another server needs to run it on if this one stops (sealed: secure values)
        let resume = json!({
            "parameters": p.parameters,
            "now": p.now,
            "seed": p.seed.to_string(),
            "mode": p.mode.as_str(),
            "location": p.location,
            "caller": {"objectId": c.caller.object_id, "clientId": c.caller.client_id},
        });
        let key = p.target.key();
        let aad = run_aad(&key, &correlation_id, &p.template);
        let sealed = tx.seal(&aad, resume.to_string().as_bytes())?;
        tx.insert_tracked(&TrackedRecord {
            key: run_key(&key),
            type_name: RUN_TYPE.into(),
            subscription: p.target.subscription.clone(),
            resource_group: p.target.resource_group.clone().unwrap_or_default(),
            body: json!({"sealed": B64.encode(sealed), "correlationId": correlation_id}),
        })
        .await?;
    } else {
        // another request created it after this one read it absent (a row that did not exist
        // could not be locked): that request's run is the one that goes on
        let rec = load(tx, &p.target).await?.ok_or_else(|| {
            keyless_store::StoreError::Conflict(keyless_store::Conflict::Busy(
                "the deployment changed while it was being replaced".into(),
            ))
        })?;
        return Err(still_active(&p.target.name, &rec));
    }
    let job = Job {
        key: p.target.key(),
        id: p.target.canonical(),
        correlation_id: correlation_id.clone(),
        subscription: p.target.subscription.clone(),
        resource_group: p.target.resource_group.clone().unwrap_or_default(),
        plan: p.plan,
        mode: p.mode,
        caller: c.caller.clone(),
    };
    let status = if existing.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let mut resp = (status, Json(public)).into_response();
    if let Ok(v) = HeaderValue::from_str(&status_url(s, &p.target, &correlation_id, c.version)) {
        resp.headers_mut().insert("Azure-AsyncOperation", v);
    }
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp.extensions_mut().insert(Started(Arc::new(job)));
    Ok(resp)
}

/// ARM's refusal to replace a deployment whose run goes on.
fn still_active(name: &str, rec: &TrackedRecord) -> ServerError {
    let since = rec.body["deployment"]["properties"]["timestamp"]
        .as_str()
        .unwrap_or_default();
    ServerError::Deployment {
        code: "DeploymentActive",
        message: format!("Unable to edit or replace deployment '{name}': previous deployment from '{since}' is still active (state: Running). Please see https://aka.ms/arm-deploy for usage details."),
        target: None,
        details: Vec::new(),
    }
}

/// `POST {deployment}/validate`: everything a PUT checks, nothing stored.
async fn validate(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    validate_at(s, tx, c, &Target::of(c.target)).await
}

async fn validate_at<T: Sync>(
    s: &AppState,
    tx: &mut Tx,
    c: &Call<'_, T>,
    t: &Target,
) -> Result<Response> {
    let p = prepare(s, tx, c, t).await?;
    let now = crate::arm::activity::now_micros();
    let validated: Vec<Value> = p
        .plan
        .resources
        .iter()
        .map(|r| json!({"id": r.id}))
        .collect();
    let body = deployment_json(
        &p,
        &crate::util::new_guid(),
        "Succeeded",
        now,
        json!({"validatedResources": validated}),
    );
    Ok(Json(body).into_response())
}

/// `POST {deployment}/whatIf`: everything a PUT checks, then the changes the deployment would
/// make ([`crate::arm::what_if`]); nothing stored. Answered at once (200, the
/// `WhatIfOperationResult` a poll would end with).
async fn what_if(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    what_if_at(s, tx, c, &Target::of(c.target)).await
}

async fn what_if_at<T: Sync>(
    s: &AppState,
    tx: &mut Tx,
    c: &Call<'_, T>,
    t: &Target,
) -> Result<Response> {
    let reads = c
        .reads
        .ok_or_else(|| ServerError::MethodNotAllowed(c.method.to_string()))?;
    let p = prepare(s, tx, c, t).await?;
    let at = crate::arm::what_if::At {
        subscription: &p.target.subscription,
        resource_group: p.target.resource_group.as_deref(),
        complete: p.mode == Mode::Complete,
    };
    let mut changes = crate::arm::what_if::changes(s, tx, c.caller, reads, &p.plan, &at).await?;
    if p.ids_only {
        for c in &mut changes {
            if let Value::Object(m) = c {
                m.retain(|k, _| !matches!(k.as_str(), "before" | "after" | "delta"));
            }
        }
    }
    Ok(Json(json!({"status": "Succeeded", "properties": {"changes": changes}})).into_response())
}

async fn delete(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    delete_at(s, tx, &Target::of(c.target)).await
}

async fn delete_at(s: &AppState, tx: &mut Tx, rid: &Target) -> Result<Response> {
    scope_of(s, tx, rid).await?;
    tx.lock_row("tracked", "key", &rid.key()).await?;
    let rec = load(tx, rid).await?;
    let active = match &rec {
        Some(r) => is_active(s, tx, r).await?,
        None => false,
    };
    match rec {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(_) if active => Err(ServerError::Deployment {
            code: "DeploymentActive",
            message: format!("The deployment '{}' cannot be deleted while it is active; cancel it first. Please see https://aka.ms/arm-deploy for usage details.", rid.name),
            target: None,
            details: Vec::new(),
        }),
        Some(_) => {
            // the deployment's record and its operations; what it deployed stays
            tx.delete_tracked(&rid.key()).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

async fn export_template(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    export_at(s, tx, &Target::of(c.target)).await
}

async fn export_at(s: &AppState, tx: &mut Tx, rid: &Target) -> Result<Response> {
    scope_of(s, tx, rid).await?;
    let rec = load(tx, rid).await?.ok_or_else(|| not_found(&rid.name))?;
    Ok(Json(json!({"template": rec.body["template"]})).into_response())
}

/// `POST {deployment}/cancel`: a running deployment starts nothing more and ends `Canceled`.
async fn cancel(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    cancel_at(s, tx, &Target::of(c.target)).await
}

async fn cancel_at(s: &AppState, tx: &mut Tx, rid: &Target) -> Result<Response> {
    scope_of(s, tx, rid).await?;
    tx.lock_row("tracked", "key", &rid.key()).await?;
    let mut rec = load(tx, rid).await?.ok_or_else(|| not_found(&rid.name))?;
    if !is_active(s, tx, &rec).await? {
        return Err(ServerError::Conflict {
            code: "DeploymentCannotBeCancelled",
            message: format!(
                "The deployment '{}' cannot be cancelled: it is not running.",
                rid.name
            ),
        });
    }
    rec.body["cancel"] = json!(true);
    tx.put_tracked(&rec).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET {deployment}/operations`.
async fn operations(s: &AppState, tx: &mut Tx, c: &Call<'_, ResourceId>) -> Result<Response> {
    operations_at(s, tx, &Target::of(c.target)).await
}

async fn operations_at(s: &AppState, tx: &mut Tx, rid: &Target) -> Result<Response> {
    scope_of(s, tx, rid).await?;
    load(tx, rid).await?.ok_or_else(|| not_found(&rid.name))?;
    let ops = tx.list_tracked_under(&rid.key(), OPERATION_TYPE).await?;
    Ok(reply::list(ops.into_iter().map(|o| o.body).collect()))
}

/// `GET {deployment}/operations/{id}`.
async fn operation(s: &AppState, tx: &mut Tx, c: &Call<'_, ChildId>) -> Result<Response> {
    if *c.method != Method::GET {
        return Err(ServerError::MethodNotAllowed(c.method.to_string()));
    }
    operation_at(s, tx, &Target::of(&c.target.parent), &c.target.name).await
}

async fn operation_at(s: &AppState, tx: &mut Tx, rid: &Target, id: &str) -> Result<Response> {
    scope_of(s, tx, rid).await?;
    load(tx, rid).await?.ok_or_else(|| not_found(&rid.name))?;
    let key = operation_key(&rid.key(), id);
    match tx.get_tracked(&key).await? {
        Some(o) => Ok(Json(o.body).into_response()),
        None => Err(ServerError::Deployment {
            code: "DeploymentOperationNotFound",
            message: format!(
                "The deployment operation '{}' of deployment '{}' could not be found.",
                id, rid.name
            ),
            target: None,
            details: Vec::new(),
        }),
    }
}

/// The store key of operation `id` of the deployment whose key is `deployment_key`.
pub fn operation_key(deployment_key: &str, id: &str) -> String {
    format!("{deployment_key}/operations/{}", id.to_ascii_lowercase())
}

/// `GET {deployment}/operationStatuses/{correlation id}`: the run's status as the SDKs poll it.
async fn status(s: &AppState, tx: &mut Tx, c: &Call<'_, ChildId>) -> Result<Response> {
    if *c.method != Method::GET {
        return Err(ServerError::MethodNotAllowed(c.method.to_string()));
    }
    status_at(s, tx, &Target::of(&c.target.parent), &c.target.name).await
}

async fn status_at(s: &AppState, tx: &mut Tx, rid: &Target, id: &str) -> Result<Response> {
    scope_of(s, tx, rid).await?;
    let rec = load(tx, rid).await?.ok_or_else(|| not_found(&rid.name))?;
    let d = shown(s, tx, &rec).await?;
    let props = &d["properties"];
    if !props["correlationId"]
        .as_str()
        .is_some_and(|c| c.eq_ignore_ascii_case(id))
    {
        return Err(ServerError::Deployment {
            code: "DeploymentOperationNotFound",
            message: format!(
                "The operation '{}' of deployment '{}' could not be found.",
                id, rid.name
            ),
            target: None,
            details: Vec::new(),
        });
    }
    let state = props["provisioningState"].as_str().unwrap_or("Running");
    let running = matches!(state, "Accepted" | "Running");
    let mut body = json!({"status": if running { "Running" } else { state }});
    if !props["error"].is_null() {
        body["error"] = props["error"].clone();
    }
    let mut resp = Json(body).into_response();
    if running {
        // the SDKs poll at this pace (30 s when no answer says)
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    Ok(resp)
}

/// The RBAC action of a request on a subscription-scope deployment (`rest`: what follows its
/// name), as the resource-group routes' entries say for theirs; None: not a route.
pub fn subscription_action(m: &Method, rest: &[String]) -> Option<String> {
    let verb = crate::arm::reply::verb(m);
    let lower: Vec<String> = rest.iter().map(|r| r.to_ascii_lowercase()).collect();
    let action = match (
        m.clone(),
        lower
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
    ) {
        (Method::GET | Method::HEAD | Method::PUT | Method::DELETE, []) => {
            format!("{DEPLOYMENT_TYPE}/{verb}")
        }
        (Method::POST, ["validate"]) => format!("{DEPLOYMENT_TYPE}/validate/action"),
        (Method::POST, ["whatif"]) => format!("{DEPLOYMENT_TYPE}/whatIf/action"),
        (Method::POST, ["exporttemplate"]) => format!("{DEPLOYMENT_TYPE}/exportTemplate/action"),
        (Method::POST, ["cancel"]) => format!("{DEPLOYMENT_TYPE}/cancel/action"),
        (Method::GET, ["operations"] | ["operations", _]) => {
            format!("{DEPLOYMENT_TYPE}/operations/read")
        }
        (Method::GET, ["operationstatuses", _]) => {
            format!("{DEPLOYMENT_TYPE}/operationStatuses/read")
        }
        _ => return None,
    };
    Some(action)
}

/// A request on a subscription-scope deployment (`az deployment sub …`), authorized by the
/// router with [`subscription_action`]: the same handlers as a group's deployments.
pub async fn at_subscription(
    s: &AppState,
    tx: &mut Tx,
    c: &Call<'_, Target>,
    rest: &[String],
) -> Result<Response> {
    let t = c.target;
    let lower: Vec<String> = rest.iter().map(|r| r.to_ascii_lowercase()).collect();
    match (
        c.method.clone(),
        lower
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
    ) {
        (Method::GET, []) => get_at(s, tx, t).await,
        (Method::HEAD, []) => head_at(s, tx, t).await,
        (Method::PUT, []) => put_at(s, tx, c, t).await,
        (Method::DELETE, []) => delete_at(s, tx, t).await,
        (Method::POST, ["validate"]) => validate_at(s, tx, c, t).await,
        (Method::POST, ["whatif"]) => what_if_at(s, tx, c, t).await,
        (Method::POST, ["exporttemplate"]) => export_at(s, tx, t).await,
        (Method::POST, ["cancel"]) => cancel_at(s, tx, t).await,
        (Method::GET, ["operations"]) => operations_at(s, tx, t).await,
        (Method::GET, ["operations", _]) => operation_at(s, tx, t, &rest[1]).await,
        (Method::GET, ["operationstatuses", _]) => status_at(s, tx, t, &rest[1]).await,
        _ => Err(ServerError::MethodNotAllowed(c.method.to_string())),
    }
}
