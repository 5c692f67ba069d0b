//! Running a committed deployment ([`Job`]): a reconcile of the template's resources in
//! dependency order. A resource starts as soon as everything it depends on has succeeded —
//! independent resources at once, as ARM runs them — and is deployed through the control
//! plane's own front door ([`Front`], handed in by the router: this module never imports it)
//! as the deployment's caller: the same authorization, validation, write claims and Activity
//! Log as a direct PUT. Each outcome is stored as a deployment operation in its own unit of
//! work; a resource whose dependency failed is not started. The run ends by evaluating the
//! outputs, deleting (in complete mode) what the template no longer names, and storing the
//! final state. Error policy: a failed resource fails the deployment, never the run; a store
//! error ends the run and is logged (the deployment then shows `Failed` if it can be written).
//!
//! A deployment runs in the process that accepted it, under its run lease; a run stopped by
//! the process's end is taken over, once the lease lapses, by a server of the same store
//! ([`crate::arm::resume_deployments`]). A run that finds its lease taken (it could not renew it
//! in time) stops at once: the server now holding it runs the deployment.

use crate::arm::deployments::{
    duration, iso_micros, operation_key, run_lease, Job, Mode, OPERATION_TYPE, RUN_LEASE_TTL,
};
use crate::arm::registry;
use crate::error::Result;
use crate::request::Caller;
use crate::state::AppState;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use keyless_core::api_version;
use keyless_core::resource_id::ArmPath;
use keyless_core::template::{PlannedResource, References, TemplateError};
use keyless_store::TrackedRecord;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The control plane's entry for an authenticated request: `(caller, method, path and query,
/// body)` → the answer, exactly as if the caller had sent it.
pub type Front = Arc<
    dyn Fn(Caller, Method, String, Vec<u8>) -> Pin<Box<dyn Future<Output = Response> + Send>>
        + Send
        + Sync,
>;

/// How long a resource whose PUT answered a non-terminal `provisioningState` is polled.
const PROVISIONING_WAIT: Duration = Duration::from_secs(600);
const PROVISIONING_POLL: Duration = Duration::from_millis(250);

/// The resources deployed so far (and existing ones looked up), by lowercase id, for
/// `reference()`. `None`: looked up and not found.
#[derive(Default)]
struct Refs(HashMap<String, Option<Value>>);

impl References for Refs {
    fn get(&self, id: &str) -> Option<Value> {
        self.0.get(&id.to_ascii_lowercase()).cloned().flatten()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Not started: something it depends on failed (or the run was canceled).
    Skipped,
}

/// One resource's deployment as its operation records it.
struct Outcome {
    operation: &'static str,
    status: u16,
    /// The resource as its GET answers it (success), or the error (failure).
    body: Value,
    ok: bool,
    started: i64,
    ended: i64,
}

/// A holder of a deployment's run lease, unique to this run in this process.
pub fn new_holder(job: &Job) -> String {
    format!("run:{}:{}", job.correlation_id, crate::util::new_guid())
}

/// Run `job` to its end, holding its lease as `holder` ([`new_holder`]). Never fails: what
/// goes wrong is the deployment's state.
pub async fn run(s: Arc<AppState>, job: Arc<Job>, front: Front, holder: String) {
    // the run's lease, renewed while it runs: readers tell a run whose server stopped by it,
    // and another server takes over a run whose lease lapsed
    let lease = run_lease(&job.key);
    match s
        .store
        .try_lease(&lease, &holder, s.now(), RUN_LEASE_TTL)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(deployment = %job.id, "another server holds this deployment's run; it is left to that one");
            return;
        }
        Err(e) => {
            // without the lease another server could run it too: left to the resumer
            tracing::warn!(deployment = %job.id, error = %e, "taking a deployment run's lease failed; a server resumes it when the store answers");
            return;
        }
    }
    let lost = Arc::new(tokio::sync::Notify::new());
    let renew = AbortOnDrop(tokio::spawn({
        let (s, lease, holder, lost) = (s.clone(), lease.clone(), holder.clone(), lost.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(RUN_LEASE_TTL / 3)).await;
                match s
                    .store
                    .try_lease(&lease, &holder, s.now(), RUN_LEASE_TTL)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        lost.notify_one();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing a deployment run's lease failed")
                    }
                }
            }
        }
    }));
    tokio::select! {
        () = drive_or_fail(&s, &job, &front) => {}
        () = lost.notified() => {
            tracing::error!(deployment = %job.id, "this deployment's run lease was taken over (it lapsed before it was renewed); this run stops, the server holding it goes on");
            return;
        }
    }
    drop(renew);
    if let Err(e) = s.store.release_lease(&lease, &holder).await {
        tracing::warn!(deployment = %job.id, error = %e, "releasing a deployment run's lease failed; it expires by itself");
    }
}

/// Drive the run; a store error or a panic (anywhere in it: the handlers run in this task)
/// ends it `Failed`.
async fn drive_or_fail(s: &AppState, job: &Job, front: &Front) {
    let stopped = match std::panic::AssertUnwindSafe(drive(s, job, front))
        .catch_unwind()
        .await
    {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "a panic".to_string(),
    };
    tracing::error!(deployment = %job.id, error = %stopped, "a deployment run stopped");
    let error = json!({"code": "InternalServerError", "message": "The deployment stopped because of an internal error."});
    if let Err(e) = finish(s, job, "Failed", None, Vec::new(), Some(error)).await {
        tracing::error!(deployment = %job.id, error = %e, "recording a stopped deployment failed");
    }
}

/// A task aborted when this is dropped (also by a panic's unwinding).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn drive(s: &AppState, job: &Job, front: &Front) -> Result<()> {
    let running = update(s, job, |d| {
        d["deployment"]["properties"]["provisioningState"] = json!("Running");
    })
    .await?;
    if !running {
        return Ok(()); // replaced or deleted before it started
    }
    let resources = &job.plan.resources;
    let mut schedule = Schedule::new(resources);
    let refs = RwLock::new(Refs::default());
    // The resources being deployed, polled together in this task: every one ready at the same
    // time starts at once, as ARM sends them, and they interleave at their awaits (a write
    // claim taken by one is met by another started with it — see `arm::dispatch`). While any
    // is in flight this task awaits nothing but them: one of them may hold the store's writer
    // at an await, so a write of this task's own would wait for it forever. Each therefore
    // checks for a cancel, evaluates its body and stores its operation itself.
    let mut running: FuturesUnordered<Pin<Box<dyn Future<Output = Result<Step>> + Send + '_>>> =
        FuturesUnordered::new();
    let mut failures = Vec::new();
    let mut canceled = false;
    loop {
        for i in schedule.take_ready() {
            running.push(Box::pin(step(s, job, front, &refs, i)));
        }
        let Some(done) = running.next().await else {
            break;
        };
        let (i, outcome) = match done? {
            Step::Gone => return Ok(()), // the deployment is gone (its group deleted)
            Step::Canceled(i) => {
                canceled = true;
                schedule.cancel(i);
                continue;
            }
            Step::Done(i, outcome) => (i, outcome),
        };
        let r = &resources[i];
        if outcome.ok {
            schedule.succeeded(i);
            refs.write()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .insert(r.id.to_ascii_lowercase(), Some(outcome.body));
        } else {
            schedule.failed(i);
            failures.push(detail(&r.id, &outcome.body));
        }
    }
    drop(running);
    let refs = refs.into_inner().unwrap_or_else(|e| e.into_inner());
    let deployed: Vec<Value> = resources
        .iter()
        .zip(&schedule.state)
        .filter(|(_, st)| **st == State::Succeeded)
        .map(|(r, _)| json!({"id": r.id}))
        .collect();
    if canceled {
        finish(s, job, "Canceled", None, deployed, None).await?;
        return Ok(());
    }
    if !failures.is_empty() {
        let error = deployment_failed(job, failures);
        finish(s, job, "Failed", None, deployed, Some(error)).await?;
        return Ok(());
    }
    let outputs = match job.plan.outputs(&refs) {
        Ok(o) => o,
        Err(e) => {
            let error = json!({"code": e.code, "message": e.message});
            finish(s, job, "Failed", None, deployed, Some(error)).await?;
            return Ok(());
        }
    };
    if job.mode == Mode::Complete {
        let failures = complete_mode(s, job, front).await?;
        if !failures.is_empty() {
            let error = deployment_failed(job, failures);
            finish(s, job, "Failed", Some(outputs), deployed, Some(error)).await?;
            return Ok(());
        }
    }
    finish(s, job, "Succeeded", Some(outputs), deployed, None).await
}

/// How one resource's deployment ended.
enum Step {
    /// Deployed or failed, its operation stored.
    Done(usize, Outcome),
    /// Not started: a cancel was asked.
    Canceled(usize),
    /// The deployment is gone or replaced: the run stops.
    Gone,
}

/// Deploy resource `i`: unless a cancel was asked, evaluate its body (with what is deployed so
/// far), PUT it as the caller, and store the outcome as an operation.
async fn step(
    s: &AppState,
    job: &Job,
    front: &Front,
    refs: &RwLock<Refs>,
    i: usize,
) -> Result<Step> {
    if cancel_requested(s, job).await? {
        return Ok(Step::Canceled(i));
    }
    let r = &job.plan.resources[i];
    let started = crate::arm::activity::now_micros();
    let outcome = match evaluate(front, job, i, refs).await {
        Ok(body) => deploy(front, &job.caller, r, body, started).await,
        Err(e) => Outcome {
            operation: "Create",
            status: 400,
            body: json!({"error": {"code": e.code, "message": e.message}}),
            ok: false,
            started,
            ended: crate::arm::activity::now_micros(),
        },
    };
    if !record(s, job, r, &outcome).await? {
        return Ok(Step::Gone);
    }
    Ok(Step::Done(i, outcome))
}

/// Which resources may start, as the run goes: each waits until everything it depends on has
/// succeeded; one that fails (or is skipped) skips everything that depends on it, transitively.
/// Linear in resources + dependencies over a whole run (a template may have 800 resources each
/// depending on a loop of 800).
struct Schedule {
    state: Vec<State>,
    /// How many of its dependencies have not succeeded yet.
    waiting: Vec<usize>,
    /// Who depends on each resource.
    dependents: Vec<Vec<usize>>,
    ready: Vec<usize>,
}

impl Schedule {
    fn new(resources: &[PlannedResource]) -> Self {
        let n = resources.len();
        let mut waiting = vec![0; n];
        let mut dependents = vec![Vec::new(); n];
        for (i, r) in resources.iter().enumerate() {
            let mut deps: Vec<usize> = r.depends_on.iter().copied().filter(|&d| d < n).collect();
            deps.sort_unstable();
            deps.dedup();
            waiting[i] = deps.len();
            for d in deps {
                dependents[d].push(i);
            }
        }
        let ready = (0..n).filter(|&i| waiting[i] == 0).collect();
        Schedule {
            state: vec![State::Pending; n],
            waiting,
            dependents,
            ready,
        }
    }

    /// The resources that may start now (each marked running).
    fn take_ready(&mut self) -> Vec<usize> {
        let ready = std::mem::take(&mut self.ready);
        for &i in &ready {
            self.state[i] = State::Running;
        }
        ready
    }

    fn succeeded(&mut self, i: usize) {
        self.state[i] = State::Succeeded;
        for k in 0..self.dependents[i].len() {
            let d = self.dependents[i][k];
            self.waiting[d] -= 1;
            if self.waiting[d] == 0 && self.state[d] == State::Pending {
                self.ready.push(d);
            }
        }
    }

    fn failed(&mut self, i: usize) {
        self.state[i] = State::Failed;
        self.skip_dependents(i);
    }

    /// A cancel was asked (seen by resource `i`, not started): nothing more starts.
    fn cancel(&mut self, i: usize) {
        self.state[i] = State::Skipped;
        self.ready.clear();
        for st in &mut self.state {
            if *st == State::Pending {
                *st = State::Skipped;
            }
        }
    }

    fn skip_dependents(&mut self, i: usize) {
        let mut stack = vec![i];
        while let Some(j) = stack.pop() {
            for k in 0..self.dependents[j].len() {
                let d = self.dependents[j][k];
                if self.state[d] == State::Pending {
                    self.state[d] = State::Skipped;
                    stack.push(d);
                }
            }
        }
    }
}

/// The body of resource `i`, looking up (as the caller) any existing resource outside the
/// template that it references.
async fn evaluate(
    front: &Front,
    job: &Job,
    i: usize,
    refs: &RwLock<Refs>,
) -> std::result::Result<Value, TemplateError> {
    loop {
        let missing = {
            let known = refs.read().unwrap_or_else(|e| e.into_inner());
            match job.plan.body(i, &*known) {
                Ok(b) => return Ok(b),
                Err(e) => match missing_reference(&e)
                    .filter(|id| !known.0.contains_key(&id.to_ascii_lowercase()))
                {
                    Some(id) => id,
                    None => return Err(e),
                },
            }
        };
        let found = get(front, &job.caller, &missing).await;
        refs.write()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .insert(missing.to_ascii_lowercase(), found);
    }
}

/// The resource id a `reference()` could not find, if that is what `e` says (the evaluator's
/// sentence, ARM's: "The Resource '<id>' was not found.").
fn missing_reference(e: &TemplateError) -> Option<String> {
    const START: &str = "The Resource '";
    let at = e.message.find(START)? + START.len();
    let rest = &e.message[at..];
    let id = &rest[..rest.find("' was not found.")?];
    id.starts_with('/').then(|| id.to_string())
}

/// The api-version to read a resource of the type `id` names with.
fn read_version(id: &str) -> Option<&'static str> {
    match ArmPath::parse(id).ok()? {
        ArmPath::Resource(r) => registry::lookup(&r.namespace, &r.type_name)
            .ok()?
            .api_versions
            .last()
            .copied(),
        ArmPath::Child { parent, .. }
        | ArmPath::Action {
            resource: parent, ..
        } => registry::lookup(&parent.namespace, &parent.type_name)
            .ok()?
            .api_versions
            .last()
            .copied(),
        ArmPath::Authorization { .. } => api_version::AUTHORIZATION.last().copied(),
        ArmPath::ResourceGroup { .. } | ArmPath::AtSubscription { .. } => {
            api_version::RESOURCES.last().copied()
        }
        _ => None,
    }
}

/// `id` with every segment percent-encoded, and `?api-version=`.
fn request_path(id: &str, version: &str) -> String {
    let mut out = String::with_capacity(id.len() + 32);
    for b in id.bytes() {
        match b {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'.'
            | b'_'
            | b'~'
            | b'/'
            | b'('
            | b')' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    format!("{out}?api-version={version}")
}

/// The answer's status and JSON body.
async fn answer(resp: Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), crate::arm::MAX_BODY * 8)
        .await
        .unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// GET `id` as `caller`: the resource, or None.
async fn get(front: &Front, caller: &Caller, id: &str) -> Option<Value> {
    let version = read_version(id)?;
    let resp = front(
        caller.clone(),
        Method::GET,
        request_path(id, version),
        Vec::new(),
    )
    .await;
    match answer(resp).await {
        (200, v) => Some(v),
        _ => None,
    }
}

/// PUT resource `r` with `body` as `caller`, wait for a terminal provisioning state, and read
/// it back.
async fn deploy(
    front: &Front,
    caller: &Caller,
    r: &PlannedResource,
    body: Value,
    started: i64,
) -> Outcome {
    let path = request_path(&r.id, &r.api_version);
    let resp = front(
        caller.clone(),
        Method::PUT,
        path.clone(),
        body.to_string().into_bytes(),
    )
    .await;
    let (status, mut current) = answer(resp).await;
    let done = |ok: bool, body: Value| Outcome {
        operation: "Create",
        status,
        body,
        ok,
        started,
        ended: crate::arm::activity::now_micros(),
    };
    if !(200..300).contains(&status) {
        return done(false, current);
    }
    let deadline = tokio::time::Instant::now() + PROVISIONING_WAIT;
    loop {
        match current["properties"]["provisioningState"].as_str() {
            Some("Failed" | "Canceled") => {
                let mut error = json!({"code": "ResourceDeploymentFailure", "message": format!("The resource write operation failed to complete successfully, because it reached terminal provisioning state '{}'.", current["properties"]["provisioningState"].as_str().unwrap_or_default())});
                // a nested deployment's own error says which of its resources failed
                if current["properties"]["error"].is_object() {
                    error["details"] = json!([current["properties"]["error"]]);
                }
                return done(false, json!({ "error": error }));
            }
            Some(p) if !p.eq_ignore_ascii_case("Succeeded") => {
                if tokio::time::Instant::now() > deadline {
                    let error = json!({"code": "ResourceDeploymentFailure", "message": format!("The resource did not reach a terminal provisioning state within {} seconds (last: '{p}').", PROVISIONING_WAIT.as_secs())});
                    return done(false, json!({ "error": error }));
                }
                tokio::time::sleep(PROVISIONING_POLL).await;
                let resp = front(caller.clone(), Method::GET, path.clone(), Vec::new()).await;
                if let (200, v) = answer(resp).await {
                    current = v;
                }
            }
            _ => break,
        }
    }
    // the resource for `reference()`: the write's answer is the resource as a GET shows it;
    // read it back only when the answer is not one (no `id`)
    if current["id"].is_string() {
        return done(true, current);
    }
    let resp = front(caller.clone(), Method::GET, path, Vec::new()).await;
    let resource = match answer(resp).await {
        (200, v) => v,
        _ => current,
    };
    done(true, resource)
}

/// The deployment's error when resources failed: ARM's `DeploymentFailed`, one detail each.
fn deployment_failed(job: &Job, failures: Vec<Value>) -> Value {
    json!({
        "code": "DeploymentFailed",
        "target": job.id,
        "message": "At least one resource deployment operation failed. Please list deployment operations for details. Please see https://aka.ms/arm-deployment-operations for usage details.",
        "details": failures,
    })
}

/// A failed resource as the deployment's error lists it.
fn detail(id: &str, body: &Value) -> Value {
    let e = &body["error"];
    json!({
        "code": e["code"].as_str().unwrap_or("ResourceDeploymentFailure"),
        "target": id,
        "message": e["message"].as_str().unwrap_or("The resource deployment failed."),
    })
}

/// ARM's `statusCode` of an operation: the HTTP status's name.
fn status_name(status: u16) -> String {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map(|r| r.replace([' ', '-'], ""))
        .unwrap_or_else(|| status.to_string())
}

/// Store `outcome` as an operation of the deployment; false when the deployment is gone or
/// replaced (the run stops).
async fn record(s: &AppState, job: &Job, r: &PlannedResource, outcome: &Outcome) -> Result<bool> {
    let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_ascii_uppercase();
    let message = if outcome.ok {
        json!({"status": "Succeeded"})
    } else {
        json!({"status": "Failed", "error": outcome.body["error"]})
    };
    let body = json!({
        "id": format!("{}/operations/{id}", job.id),
        "operationId": id,
        "properties": {
            "provisioningOperation": outcome.operation,
            "provisioningState": if outcome.ok { "Succeeded" } else { "Failed" },
            "timestamp": iso_micros(outcome.ended),
            "duration": duration(outcome.ended - outcome.started),
            "trackingId": crate::util::new_guid(),
            "serviceRequestId": crate::util::new_guid(),
            "statusCode": status_name(outcome.status),
            "statusMessage": message,
            "targetResource": {
                "id": r.id,
                "resourceType": r.full_type,
                "resourceName": r.name,
                "apiVersion": r.api_version,
            },
        },
    });
    let mut tx = s.store.write("deployment_operation").await?;
    let Some(rec) = tx.get_tracked(&job.key).await? else {
        return Ok(false);
    };
    if !same_run(&rec.body, job) {
        return Ok(false);
    }
    tx.put_tracked(&TrackedRecord {
        key: operation_key(&job.key, &id),
        type_name: OPERATION_TYPE.into(),
        subscription: job.subscription.clone(),
        resource_group: job.resource_group.clone(),
        body,
    })
    .await?;
    tx.commit().await?;
    Ok(true)
}

fn same_run(record: &Value, job: &Job) -> bool {
    crate::arm::deployments::is_run(record, &job.correlation_id)
}

/// Whether a cancel was asked for this run.
async fn cancel_requested(s: &AppState, job: &Job) -> Result<bool> {
    let mut tx = s.store.read("deployment_run").await?;
    let rec = tx.get_tracked(&job.key).await?;
    Ok(match rec {
        Some(r) if same_run(&r.body, job) => r.body["cancel"].as_bool().unwrap_or(false),
        // gone or replaced: nothing more to start
        _ => true,
    })
}

/// Read-modify-write of the deployment's record in one unit of work; false when it is gone or
/// belongs to another run.
async fn update(s: &AppState, job: &Job, f: impl FnOnce(&mut Value)) -> Result<bool> {
    update_run(s, &job.key, &job.correlation_id, false, f).await
}

/// [`update`] of deployment `key`'s run `correlation_id`; `end`: the run ends, its resumable
/// record goes in the same unit of work.
async fn update_run(
    s: &AppState,
    key: &str,
    correlation_id: &str,
    end: bool,
    f: impl FnOnce(&mut Value),
) -> Result<bool> {
    let mut tx = s.store.write("deployment_run").await?;
    tx.lock_row("tracked", "key", key).await?;
    let Some(mut rec) = tx.get_tracked(key).await? else {
        return Ok(false);
    };
    if !crate::arm::deployments::is_run(&rec.body, correlation_id) {
        return Ok(false);
    }
    f(&mut rec.body);
    tx.put_tracked(&rec).await?;
    if end {
        tx.delete_tracked(&crate::arm::deployments::run_key(key))
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// End deployment `key`'s run `correlation_id` `Failed` with `error`: a stored run that cannot
/// be run again ([`crate::arm::deployments::Resume::Stop`]).
pub async fn stop(s: &AppState, key: &str, correlation_id: &str, error: Value) -> Result<()> {
    end(
        s,
        key,
        correlation_id,
        "Failed",
        None,
        Vec::new(),
        Some(error),
    )
    .await
}

/// Store the run's end.
async fn finish(
    s: &AppState,
    job: &Job,
    state: &str,
    outputs: Option<Value>,
    deployed: Vec<Value>,
    error: Option<Value>,
) -> Result<()> {
    end(
        s,
        &job.key,
        &job.correlation_id,
        state,
        outputs,
        deployed,
        error,
    )
    .await
}

/// Store run `correlation_id`'s end in deployment `key`'s record; its resumable record goes.
async fn end(
    s: &AppState,
    key: &str,
    correlation_id: &str,
    state: &str,
    outputs: Option<Value>,
    deployed: Vec<Value>,
    error: Option<Value>,
) -> Result<()> {
    let now = crate::arm::activity::now_micros();
    update_run(s, key, correlation_id, true, |d| {
        let started = d["started"].as_i64().unwrap_or(now);
        let p = &mut d["deployment"]["properties"];
        p["provisioningState"] = json!(state);
        p["timestamp"] = json!(iso_micros(now));
        p["duration"] = json!(duration(now - started));
        p["outputResources"] = json!(deployed);
        if let Some(o) = outputs {
            p["outputs"] = o;
        }
        if let Some(e) = error {
            p["error"] = e;
        }
    })
    .await?;
    Ok(())
}

/// Complete mode: delete the resource group's resources the template does not name (as the
/// caller, each an operation `Delete`); the failures.
async fn complete_mode(s: &AppState, job: &Job, front: &Front) -> Result<Vec<Value>> {
    let named: std::collections::HashSet<String> = job
        .plan
        .resources
        .iter()
        .map(|r| r.id.to_ascii_lowercase())
        .collect();
    let existing = {
        let mut tx = s.store.read("deployment_complete").await?;
        crate::arm::generic::resources_in(s, &mut tx, &job.subscription, Some(&job.resource_group))
            .await?
    };
    let mut failures = Vec::new();
    for item in existing {
        let Some(id) = item["id"].as_str() else {
            continue;
        };
        if named.contains(&id.to_ascii_lowercase()) {
            continue;
        }
        let Some(version) = read_version(id) else {
            continue;
        };
        let started = crate::arm::activity::now_micros();
        let resp = front(
            job.caller.clone(),
            Method::DELETE,
            request_path(id, version),
            Vec::new(),
        )
        .await;
        let (status, body) = answer(resp).await;
        let ok = (200..300).contains(&status);
        let target = PlannedResource {
            full_type: item["type"].as_str().unwrap_or_default().to_string(),
            name: item["name"].as_str().unwrap_or_default().to_string(),
            id: id.to_string(),
            api_version: version.to_string(),
            depends_on: Vec::new(),
            copy: None,
        };
        let outcome = Outcome {
            operation: "Delete",
            status,
            body: if ok { json!({}) } else { body },
            ok,
            started,
            ended: crate::arm::activity::now_micros(),
        };
        if !ok {
            failures.push(detail(id, &outcome.body));
        }
        if !record(s, job, &target, &outcome).await? {
            break;
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(deps: &[&[usize]]) -> Vec<PlannedResource> {
        deps.iter()
            .enumerate()
            .map(|(i, d)| PlannedResource {
                full_type: "Microsoft.ManagedIdentity/userAssignedIdentities".into(),
                name: format!("r{i}"),
                id: format!("/r{i}"),
                api_version: "2023-01-31".into(),
                depends_on: d.to_vec(),
                copy: None,
            })
            .collect()
    }

    #[test]
    fn a_resource_starts_once_all_it_depends_on_succeeded_and_a_failure_skips_its_dependents() {
        // 0 → 1 → 3, 0 → 2 → 3, 4 independent, 5 → 1 (duplicate dependency listed twice)
        let rs = resources(&[&[], &[0], &[0], &[1, 2], &[], &[1, 1]]);
        let mut s = Schedule::new(&rs);
        assert_eq!(s.take_ready(), vec![0, 4]);
        assert!(s.take_ready().is_empty());
        s.succeeded(0);
        assert_eq!(s.take_ready(), vec![1, 2]);
        s.succeeded(1);
        assert_eq!(s.take_ready(), vec![5], "3 still waits for 2");
        s.failed(2);
        assert!(s.take_ready().is_empty());
        assert_eq!(s.state[3], State::Skipped);
        s.succeeded(4);
        s.succeeded(5);
        assert_eq!(
            s.state,
            vec![
                State::Succeeded,
                State::Succeeded,
                State::Failed,
                State::Skipped,
                State::Succeeded,
                State::Succeeded
            ]
        );
    }

    #[test]
    fn a_cancel_starts_nothing_more_and_a_long_chain_is_linear() {
        let rs = resources(&[&[], &[0], &[1]]);
        let mut s = Schedule::new(&rs);
        assert_eq!(s.take_ready(), vec![0]);
        s.cancel(0);
        assert!(s.take_ready().is_empty());
        assert!(s.state.iter().all(|st| *st == State::Skipped));
        // 800 resources in 2 loops of 400, each of the second depending on every one of the
        // first: 160,000 dependencies, each visited once
        let mut deps: Vec<Vec<usize>> = vec![Vec::new(); 400];
        deps.extend((0..400).map(|_| (0..400).collect()));
        let refs: Vec<&[usize]> = deps.iter().map(Vec::as_slice).collect();
        let mut s = Schedule::new(&resources(&refs));
        let first = s.take_ready();
        assert_eq!(first.len(), 400);
        for i in first {
            s.succeeded(i);
        }
        assert_eq!(s.take_ready().len(), 400);
    }
}
