//! ARM template evaluation (pure, no IO): JSONC parsing, parameters, variables, resources with
//! copy loops and nested children, `dependsOn` (explicit and implicit via `reference()`),
//! conditions, outputs, and the template functions.
//!
//! Errors carry ARM's codes and sentences:
//! - `InvalidTemplate`, "Deployment template parse failed: '…'." — the JSON(C) does not parse.
//! - `InvalidTemplate`, "Deployment template validation failed: '…'." — template structure, parameters
//!   (not provided, wrong type "Template parameter JToken type is not valid. Expected 'Integer'.
//!   Actual 'String'.", allowedValues, min/max length and value, unknown parameters "The template
//!   parameters 'x' in the parameters file are not valid; …", Key Vault references), resources
//!   ("… has incorrect segment lengths …", "The resource '…' is not defined in the template.",
//!   "Circular dependency detected on resource: '…'.", "… is defined multiple times in a template.",
//!   nested copy), outputs (type).
//! - `InvalidTemplate`, "Deployment template language expression evaluation failed: '…'." — an
//!   expression: syntax, unknown function ("The template function 'foo' is not valid."), arity
//!   ("Unable to evaluate template language function 'x': function requires 1 argument(s) while 2
//!   were provided."), argument types, a function outside its place (utcNow/newGuid outside a
//!   parameter default, reference/list* outside resource properties and outputs, copyIndex outside a
//!   loop: "The template function 'x' is not expected at this location."), missing
//!   parameters/variables/properties, reference() to a resource that does not exist
//!   ("The Resource '<id>' was not found."), list* functions (not served by Keyless).
//!
//! Levels ([`Level`]): at resource-group level a resource's id is in the group; at subscription
//! level (`az deployment sub create`) it is the subscription's (`/subscriptions/{s}/providers/…`,
//! a `Microsoft.Resources/resourceGroups` one `/subscriptions/{s}/resourceGroups/{name}`),
//! `resourceId()` without a group names the subscription's resource, `deployment()` has the
//! deployment's `location`, and `resourceGroup()` is refused ("The template function
//! 'RESOURCEGROUP' is not expected at this location.", as ARM words it).
//!
//! Nested deployments (`Microsoft.Resources/deployments`): `resourceGroup`/`subscriptionId` name
//! where they deploy (the id; the subscription must be this one) and are left out of the body;
//! with `expressionEvaluationOptions.scope` "inner" the body keeps `properties.template` as
//! written (its expressions are the nested template's) and evaluates the rest (`parameters`) in
//! this template; otherwise ("outer", ARM's default) the nested template is evaluated here too.
//!
//! `target` is the failing place when known: "parameters.p", "variables.v", "outputs.o", a
//! resource's id, or "resources[i]" before the id is known.
//!
//! Limits (one request must not be able to exhaust the server through the evaluator), each an
//! `InvalidTemplate`:
//! - ARM's template limits: 256 parameters, 512 variables (a variable `copy` entry counts once;
//!   its count is at most 800, as every copy count), 64 outputs, 800 resources after copy
//!   expansion, nested children included — "The number of template resources limit exceeded.
//!   Limit: '800' and actual: '1279'. Please see https://aka.ms/arm-template/#resources for usage
//!   details." — and one expression at most 24,576 characters ("The language expression length
//!   limit exceeded. Limit: '24576' and actual: '…'."); child resources nest at most 16 levels;
//! - the evaluator's own (see `eval`'s module doc): nesting depth (64 levels of calls and indexes
//!   in one expression, 160 levels of evaluation in all, chains of 32 variables), a byte budget of
//!   16 MiB per `prepare()`, `body()` and `outputs()` call, values at most 64 levels deep,
//!   `padLeft` and `format` widths at most 16,384, format precisions at most 99, and integer
//!   arithmetic that fails on overflow instead of wrapping.
//!
//! Dependencies are resolved in O(resources + edges): each distinct `dependsOn` entry once, each
//! edge kept once.
//!
//! Secure values: every expression that reads a secure parameter, or a variable computed from
//! one, is marked while it is evaluated. Where it fails, its message is withheld (it could quote
//! what it computed from the value); where a body is shown rather than used
//! ([`Plan::body_shown`], a what-if), its value is [`SECURE_MASK`].
//!
//! Nested deployments with outer expression scope: the nested template is evaluated here, and
//! what it evaluates to is data — every string of it (keys too) that starts with `[` is escaped
//! (`[[`) so that the nested deployment reads it back as the same literal and does not evaluate
//! it again.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use serde_json::{json, Map, Value};

mod eval;
mod expr;
mod functions;
mod hash;
mod jsonc;
pub mod what_if;

pub use eval::SECURE_MASK;
use eval::{
    eval_count, eval_loop, eval_value, Binding, Ctx, Def, Env, Lazy, LoopKind, Meter, Names, Phase,
    Secure, Src,
};
use std::cell::Cell;

/// ARM's limit on a template's parameters.
const MAX_PARAMETERS: usize = 256;
/// ARM's limit on a template's variables (learn.microsoft.com's template limits: 512).
const MAX_VARIABLES: usize = 512;
/// ARM's limit on a template's outputs.
const MAX_OUTPUTS: usize = 64;
/// ARM's limit on a template's resources after copy expansion, nested children included.
const MAX_RESOURCES: usize = 800;

/// ARM's sentence for a template limit: what ("resources"), the limit, the count, the doc anchor.
fn limit_exceeded(what: &str, limit: usize, actual: usize, anchor: &str) -> TemplateError {
    TemplateError::validation(
        format!("The number of template {what} limit exceeded. Limit: '{limit}' and actual: '{actual}'. Please see https://aka.ms/arm-template/#{anchor} for usage details."),
        None,
    )
}

pub use jsonc::parse_jsonc;

/// The level a deployment runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    ResourceGroup,
    Subscription,
}

/// Where a deployment runs (see the module doc for what the level changes).
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    pub level: Level,
    pub subscription_id: String,
    pub tenant_id: String,
    /// Name as stored (echo case); empty at `Level::Subscription`.
    pub resource_group: String,
    /// Empty at `Level::Subscription`.
    pub resource_group_location: String,
    pub deployment_name: String,
    /// A subscription-level deployment's own `location` (required there); None at resource-group level.
    pub location: Option<String>,
    /// What `environment()` answers: the cloud's endpoints and suffixes, in ARM's shape.
    pub environment: Value,
}

/// A template error with ARM's code and sentence.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateError {
    pub code: &'static str,
    pub message: String,
    pub target: Option<String>,
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for TemplateError {}

impl TemplateError {
    fn validation(msg: impl std::fmt::Display, target: Option<String>) -> Self {
        TemplateError {
            code: "InvalidTemplate",
            message: format!("Deployment template validation failed: '{msg}'."),
            target,
        }
    }

    fn expression(msg: impl std::fmt::Display, target: Option<String>) -> Self {
        TemplateError {
            code: "InvalidTemplate",
            message: format!("Deployment template language expression evaluation failed: '{msg}'."),
            target,
        }
    }
}

/// Answers `reference()` for resources deployed so far or existing ones.
pub trait References {
    /// The resource `id` as its GET answers it (the full resource object), or None.
    fn get(&self, id: &str) -> Option<Value>;
}

/// No resources: every `reference()` fails.
pub struct NoReferences;

impl References for NoReferences {
    fn get(&self, _id: &str) -> Option<Value> {
        None
    }
}

/// One resource instance to deploy.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedResource {
    /// "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials"
    pub full_type: String,
    /// The full name: "FIC_UA/testCredential".
    pub name: String,
    pub id: String,
    pub api_version: String,
    /// Indices into [`Plan::resources`] this one waits for.
    pub depends_on: Vec<usize>,
    /// (loop name, index) for an instance of a copy loop.
    pub copy: Option<(String, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamType {
    String,
    SecureString,
    Int,
    Bool,
    Object,
    SecureObject,
    Array,
}

impl ParamType {
    fn parse(t: &str) -> Option<Self> {
        Some(match t.to_ascii_lowercase().as_str() {
            "string" => ParamType::String,
            "securestring" => ParamType::SecureString,
            "int" => ParamType::Int,
            "bool" => ParamType::Bool,
            "object" => ParamType::Object,
            "secureobject" => ParamType::SecureObject,
            "array" => ParamType::Array,
            _ => return None,
        })
    }

    /// As ARM echoes it.
    fn echo(self) -> &'static str {
        match self {
            ParamType::String => "String",
            ParamType::SecureString => "SecureString",
            ParamType::Int => "Int",
            ParamType::Bool => "Bool",
            ParamType::Object => "Object",
            ParamType::SecureObject => "SecureObject",
            ParamType::Array => "Array",
        }
    }

    /// The JToken type a value must have.
    fn jtoken(self) -> &'static str {
        match self {
            ParamType::String | ParamType::SecureString => "String",
            ParamType::Int => "Integer",
            ParamType::Bool => "Boolean",
            ParamType::Object | ParamType::SecureObject => "Object",
            ParamType::Array => "Array",
        }
    }

    fn secure(self) -> bool {
        matches!(self, ParamType::SecureString | ParamType::SecureObject)
    }
}

/// A resource instance's evaluation context.
#[derive(Debug, Clone)]
struct Instance {
    def: usize,
    bindings: Vec<Binding>,
    /// A nested deployment (`Microsoft.Resources/deployments`): Some(inner expression scope).
    nested: Option<bool>,
}

const DEPLOYMENTS: &str = "Microsoft.Resources/deployments";

/// Members of a nested deployment that are the template's (where it deploys to).
const DEPLOYMENT_ONLY: &[&str] = &["resourceGroup", "subscriptionId"];

/// A validated template with its parameters, ready to deploy. Its `Debug` shows the resources
/// only: the parameters may hold secure values.
#[derive(Clone)]
pub struct Plan {
    pub resources: Vec<PlannedResource>,
    instances: Vec<Instance>,
    defs: Vec<Value>,
    template: Value,
    scope: Scope,
    params: HashMap<String, Value>,
    echo: Vec<(String, ParamType, Value)>,
    vars: HashMap<String, Value>,
    names: Names,
    /// The template's hash (`deployment()`), computed at most once.
    template_hash: OnceLock<String>,
    /// The secure parameters and the variables computed from them.
    secure: Secure,
    /// [`Plan::dependency_order`].
    order: Vec<usize>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("resources", &self.resources)
            .finish_non_exhaustive()
    }
}

/// Members of a resource that are the template's, not the resource's.
const TEMPLATE_ONLY: &[&str] = &[
    "type",
    "name",
    "apiVersion",
    "dependsOn",
    "copy",
    "condition",
    "comments",
    "resources",
    "scope",
    "metadata",
    "existing",
];

/// An instance before conditions and dependencies are settled.
struct Pending {
    inst: Instance,
    full_type: String,
    name: String,
    id: String,
    api_version: String,
    condition: bool,
    depends_raw: Vec<String>,
    copy: Option<(String, usize)>,
    /// Extra dependencies (serial copy batches), as pending indices.
    serial: Vec<usize>,
}

impl Plan {
    /// Validate and plan (see the module doc). `utcNow()` and `newGuid()` in parameter defaults
    /// use the wall clock and fresh randomness; [`Plan::prepare_at`] takes them as inputs.
    pub fn prepare(
        template: &Value,
        parameters: &Value,
        scope: &Scope,
    ) -> Result<Plan, TemplateError> {
        use crate::clock::Clock as _;
        let now = crate::clock::SystemClock.now();
        Self::prepare_at(
            template,
            parameters,
            scope,
            now,
            uuid::Uuid::new_v4().as_u128(),
        )
    }

    /// [`Plan::prepare`] with the time (Unix seconds) for `utcNow()` and a seed for `newGuid()`.
    pub fn prepare_at(
        template: &Value,
        parameters: &Value,
        scope: &Scope,
        now: u64,
        guid_seed: u128,
    ) -> Result<Plan, TemplateError> {
        let t = template.as_object().ok_or_else(|| {
            TemplateError::validation("The template must be a JSON object.", None)
        })?;
        if !t.contains_key("$schema") {
            return Err(TemplateError::validation(
                "Required property '$schema' not found in JSON. Path 'properties.template'.",
                None,
            ));
        }
        let resources = match t.get("resources") {
            Some(Value::Array(a)) => a,
            None => {
                return Err(TemplateError::validation(
                    "Required property 'resources' not found in JSON. Path 'properties.template'.",
                    None,
                ))
            }
            Some(_) => {
                return Err(TemplateError::validation(
                    "The template property 'resources' must be an array. Please see https://aka.ms/arm-syntax-resources for usage details.",
                    Some("resources".into()),
                ))
            }
        };

        if let Some(Value::Object(o)) = t.get("outputs") {
            if o.len() > MAX_OUTPUTS {
                return Err(limit_exceeded("outputs", MAX_OUTPUTS, o.len(), "outputs"));
            }
        }

        let meter = Meter::default();
        let template_hash = OnceLock::new();
        let (params, echo, secure_params) = resolve_parameters(
            template,
            parameters,
            scope,
            now,
            guid_seed,
            &meter,
            &template_hash,
        )?;
        let mut secure = Secure {
            params: secure_params,
            vars: Default::default(),
        };
        let vars;
        (vars, secure.vars) =
            resolve_variables(template, scope, &params, &secure, &meter, &template_hash)?;

        let mut env = Env {
            scope,
            template,
            params: Src::Done(&params),
            vars: Src::Done(&vars),
            names: None,
            now,
            guid_seed,
            guid_counter: Cell::new(0),
            meter: &meter,
            template_hash: &template_hash,
            secure: Some(&secure),
            tainted: Cell::new(false),
            mask: false,
        };

        // ARM's resource limit, counted before anything is expanded.
        let total = resources
            .iter()
            .map(|r| instance_count(r, &env, true))
            .fold(0usize, usize::saturating_add);
        if total > MAX_RESOURCES {
            return Err(limit_exceeded(
                "resources",
                MAX_RESOURCES,
                total,
                "resources",
            ));
        }

        // Expand resources: copy loops and nested children.
        let mut defs = Defs::default();
        let mut pending: Vec<Pending> = Vec::new();
        for (i, r) in resources.iter().enumerate() {
            expand(
                r,
                None,
                &[],
                &env,
                &mut defs,
                &mut pending,
                &format!("resources[{i}]"),
            )?;
        }
        let defs = defs.list;

        // Index once: ids, type/name, names, copy loop names.
        let mut by_id: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_tn: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_loop: HashMap<String, Vec<usize>> = HashMap::new();
        let mut names = Names::default();
        for (i, p) in pending.iter().enumerate() {
            let id = p.id.to_ascii_lowercase();
            if p.condition
                && by_id
                    .get(&id)
                    .is_some_and(|v| v.iter().any(|&j| pending[j].condition))
            {
                return Err(TemplateError::validation(
                    format!("The resource '{}' at line '1' and column '1' is defined multiple times in a template. Please see https://aka.ms/arm-syntax-resources for usage details.", p.id),
                    Some(p.id.clone()),
                ));
            }
            by_id.entry(id.clone()).or_default().push(i);
            by_tn
                .entry(format!("{}/{}", p.full_type, p.name).to_ascii_lowercase())
                .or_default()
                .push(i);
            let lname = p.name.to_ascii_lowercase();
            by_name.entry(lname.clone()).or_default().push(i);
            if let Some((l, _)) = &p.copy {
                by_loop.entry(l.to_ascii_lowercase()).or_default().push(i);
            }
            names.by_name.entry(lname).or_insert_with(|| p.id.clone());
            names.by_id.entry(id).or_insert_with(|| p.id.clone());
        }

        // Dependencies: explicit, implicit (reference()/list* to a template resource), serial copies.
        // Each distinct entry is resolved once and each edge kept once (`mark`), so the work is
        // O(resources + edges) however often an entry repeats.
        let mut deps: Vec<Vec<usize>> = Vec::with_capacity(pending.len());
        let mut mark = vec![usize::MAX; pending.len()];
        for (i, p) in pending.iter().enumerate() {
            let mut d: Vec<usize> = Vec::new();
            let mut add = |d: &mut Vec<usize>, j: usize| {
                if mark[j] != i {
                    mark[j] = i;
                    d.push(j);
                }
            };
            for &j in &p.serial {
                add(&mut d, j);
            }
            let mut seen = HashSet::new();
            for raw in &p.depends_raw {
                let key = raw.to_ascii_lowercase();
                if !seen.insert(key.clone()) {
                    continue;
                }
                let hit = if raw.starts_with('/') {
                    by_id.get(&key)
                } else {
                    by_tn
                        .get(&key)
                        .or_else(|| by_name.get(&key))
                        .or_else(|| by_loop.get(&key))
                };
                match hit {
                    Some(v) => v.iter().for_each(|&j| add(&mut d, j)),
                    None => {
                        return Err(TemplateError::validation(
                            format!("The resource '{raw}' is not defined in the template. Please see https://aka.ms/arm-syntax for usage details."),
                            Some(p.id.clone()),
                        ))
                    }
                }
            }
            let cx = Ctx {
                env: &env,
                phase: Phase::Static,
                bindings: p.inst.bindings.clone(),
                refs: None,
                validate: false,
                lambda: Vec::new(),
            };
            let mut targets = Vec::new();
            scan_body(&defs[p.inst.def], p.inst.nested, &cx, &mut targets)
                .map_err(|e| TemplateError::expression(e, Some(p.id.clone())))?;
            for t in targets {
                let key = t.to_ascii_lowercase();
                if !seen.insert(key.clone()) {
                    continue;
                }
                let hit = if t.starts_with('/') {
                    by_id.get(&key)
                } else {
                    by_name.get(&key)
                };
                if let Some(v) = hit {
                    v.iter().filter(|&&j| j != i).for_each(|&j| add(&mut d, j));
                }
            }
            deps.push(d);
        }

        // Drop resources whose condition is false, and dependencies on them.
        let mut new_index = vec![usize::MAX; pending.len()];
        let mut kept = 0;
        for (i, p) in pending.iter().enumerate() {
            if p.condition {
                new_index[i] = kept;
                kept += 1;
            }
        }
        let mut planned = Vec::with_capacity(kept);
        let mut instances = Vec::with_capacity(kept);
        for (i, p) in pending.into_iter().enumerate() {
            if !p.condition {
                continue;
            }
            let mut d: Vec<usize> = deps[i]
                .iter()
                .map(|&j| new_index[j])
                .filter(|&j| j != usize::MAX)
                .collect();
            d.sort_unstable();
            d.dedup();
            planned.push(PlannedResource {
                full_type: p.full_type,
                name: p.name,
                id: p.id,
                api_version: p.api_version,
                depends_on: d,
                copy: p.copy,
            });
            instances.push(p.inst);
        }
        let order = dependency_order(&planned)?;

        // Validate what can be evaluated now (reference() waits for the deployment).
        env.names = Some(&names);
        for (r, inst) in planned.iter().zip(&instances) {
            let cx = Ctx {
                env: &env,
                phase: Phase::Body,
                bindings: inst.bindings.clone(),
                refs: None,
                validate: true,
                lambda: Vec::new(),
            };
            eval_body(&defs[inst.def], inst.nested, &cx)
                .map_err(|e| TemplateError::expression(e, Some(r.id.clone())))?;
        }
        evaluate_outputs(&env, None, true)?;

        Ok(Plan {
            resources: planned,
            instances,
            defs,
            template: template.clone(),
            scope: scope.clone(),
            params,
            echo,
            vars,
            names,
            template_hash,
            secure,
            order,
        })
    }

    /// The resources' indices, each after those it depends on.
    pub fn dependency_order(&self) -> &[usize] {
        &self.order
    }

    fn env<'a>(&'a self, meter: &'a Meter) -> Env<'a> {
        Env {
            scope: &self.scope,
            template: &self.template,
            params: Src::Done(&self.params),
            vars: Src::Done(&self.vars),
            names: Some(&self.names),
            now: 0,
            guid_seed: 0,
            guid_counter: Cell::new(0),
            meter,
            template_hash: &self.template_hash,
            secure: Some(&self.secure),
            tainted: Cell::new(false),
            mask: false,
        }
    }

    /// Where this deployment runs.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The body to PUT for resource `i` (template-only members removed, expressions evaluated).
    pub fn body(&self, i: usize, refs: &dyn References) -> Result<Value, TemplateError> {
        self.body_as(i, refs, false)
    }

    /// [`Plan::body`] to be shown (a what-if): every expression that reads a secure value —
    /// a secure parameter, or a variable computed from one, whatever it makes of it — is
    /// [`SECURE_MASK`] instead.
    pub fn body_shown(&self, i: usize, refs: &dyn References) -> Result<Value, TemplateError> {
        self.body_as(i, refs, true)
    }

    fn body_as(&self, i: usize, refs: &dyn References, mask: bool) -> Result<Value, TemplateError> {
        let (r, inst) = match (self.resources.get(i), self.instances.get(i)) {
            (Some(r), Some(inst)) => (r, inst),
            _ => {
                return Err(TemplateError::validation(
                    format!("The template has no resource at index '{i}'."),
                    None,
                ))
            }
        };
        let meter = Meter::default();
        let env = Env {
            mask,
            ..self.env(&meter)
        };
        let cx = Ctx {
            env: &env,
            phase: Phase::Body,
            bindings: inst.bindings.clone(),
            refs: Some(refs),
            validate: false,
            lambda: Vec::new(),
        };
        eval_body(&self.defs[inst.def], inst.nested, &cx)
            .map_err(|e| TemplateError::expression(e, Some(r.id.clone())))
    }

    /// The outputs as ARM returns them: {"name": {"type": "String", "value": …}}; secure ones left out.
    pub fn outputs(&self, refs: &dyn References) -> Result<Value, TemplateError> {
        let meter = Meter::default();
        let env = self.env(&meter);
        evaluate_outputs(&env, Some(refs), false)
    }

    /// The parameters as ARM echoes them; secure ones have no value.
    pub fn echoed_parameters(&self) -> Value {
        let mut m = Map::new();
        for (name, ty, v) in &self.echo {
            let entry = if ty.secure() {
                json!({"type": ty.echo()})
            } else {
                json!({"type": ty.echo(), "value": v})
            };
            m.insert(name.clone(), entry);
        }
        Value::Object(m)
    }

    /// ARM's templateHash: a decimal number string, stable for the same template content.
    pub fn template_hash(template: &Value) -> String {
        hash::murmur64(template.to_string().as_bytes()).to_string()
    }
}

/// Whether `k` is a member of a resource's body: not a template-only one (for a nested
/// deployment not `resourceGroup` or `subscriptionId` either).
fn body_member(k: &str, nested: Option<bool>) -> bool {
    !(TEMPLATE_ONLY.iter().any(|t| t.eq_ignore_ascii_case(k))
        || (nested.is_some() && DEPLOYMENT_ONLY.iter().any(|t| t.eq_ignore_ascii_case(k))))
}

/// For a nested deployment with inner expression scope, the key of `properties` and of
/// `properties.template` in `o` (that template is the nested one's own, evaluated when it deploys).
fn inner_template_keys(o: &Map<String, Value>, nested: Option<bool>) -> Option<(String, String)> {
    if nested != Some(true) {
        return None;
    }
    let pk = key_of(o, "properties")?;
    let tk = key_of(o.get(&pk)?.as_object()?, "template")?;
    Some((pk, tk))
}

/// The resource object's body members ([`body_member`]), without an inner-scope nested template
/// (returned apart, as written, with its key).
fn split_body(def: &Value, nested: Option<bool>) -> (Value, Option<(String, &Value)>) {
    let mut m = Map::new();
    let mut raw = None;
    if let Some(o) = def.as_object() {
        let inner = inner_template_keys(o, nested);
        for (k, v) in o {
            if !body_member(k, nested) {
                continue;
            }
            match (&inner, v) {
                (Some((pk, tk)), Value::Object(props)) if pk == k => {
                    let rest: Map<String, Value> = props
                        .iter()
                        .filter(|(x, _)| *x != tk)
                        .map(|(x, y)| (x.clone(), y.clone()))
                        .collect();
                    raw = props.get(tk).map(|t| (tk.clone(), t));
                    m.insert(k.clone(), Value::Object(rest));
                }
                _ => {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
    }
    (Value::Object(m), raw)
}

/// Evaluate a resource's body: see [`split_body`]. The nested template of an inner scope is put
/// back as written (and charged); that of an outer scope is evaluated here and its strings that
/// start with `[` escaped ([`escape_literals`]).
fn eval_body(def: &Value, nested: Option<bool>, cx: &Ctx) -> Result<Value, String> {
    let (evaluable, raw) = split_body(def, nested);
    let mut v = eval_value(&evaluable, cx)?;
    let Value::Object(m) = &mut v else {
        return Ok(v);
    };
    let props = key_of(m, "properties").and_then(|p| m.get_mut(&p));
    match (raw, props) {
        (Some((k, t)), Some(Value::Object(props))) => {
            cx.env.meter.charge(eval::weight(t).0)?;
            if !cx.validate {
                props.insert(k, t.clone());
            }
        }
        (None, Some(Value::Object(props))) if nested == Some(false) => {
            if let Some(t) = key_of(props, "template").and_then(|k| props.get_mut(&k)) {
                escape_literals(t);
            }
        }
        _ => {}
    }
    Ok(v)
}

/// Every string in `v` (object keys too) that starts with `[` gets another `[` in front, so that
/// a template evaluation reads it back as the same literal.
fn escape_literals(v: &mut Value) {
    match v {
        Value::String(s) if s.starts_with('[') => s.insert(0, '['),
        Value::Array(a) => a.iter_mut().for_each(escape_literals),
        Value::Object(m) if m.keys().any(|k| k.starts_with('[')) => {
            for (mut k, mut x) in std::mem::take(m) {
                if k.starts_with('[') {
                    k.insert(0, '[');
                }
                escape_literals(&mut x);
                m.insert(k, x);
            }
        }
        Value::Object(m) => m.values_mut().for_each(escape_literals),
        _ => {}
    }
}

/// The key of `m` that is `name` case-insensitively (exact first).
fn key_of(m: &Map<String, Value>, name: &str) -> Option<String> {
    if m.contains_key(name) {
        return Some(name.to_string());
    }
    m.keys().find(|k| k.eq_ignore_ascii_case(name)).cloned()
}

/// `m[name]`, case-insensitively.
fn member<'v>(m: &'v Map<String, Value>, name: &str) -> Option<&'v Value> {
    m.get(&key_of(m, name)?)
}

/// A deployment parameter given as a Key Vault reference:
/// `{"reference": {"keyVault": {"id": <vault id>}, "secretName": …, "secretVersion": …}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVaultReference {
    /// The parameter's name as the request gives it.
    pub parameter: String,
    pub vault_id: String,
    pub secret_name: String,
    pub secret_version: Option<String>,
    /// The parameter is a `secureObject`: the secret's value is its JSON.
    pub object: bool,
}

/// The parameters of a deployment request given as Key Vault references, checked: each names
/// a vault id and a secret, and its parameter is declared `securestring` or `secureobject` — a
/// value taken from a vault must never be echoed, so a plain `string` parameter is refused.
/// A parameter the template does not declare is left to [`Plan::prepare`] (which refuses it).
pub fn key_vault_references(
    template: &Value,
    parameters: &Value,
) -> Result<Vec<KeyVaultReference>, TemplateError> {
    let (Some(decls), Some(given)) = (
        template.get("parameters").and_then(Value::as_object),
        parameters.as_object(),
    ) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (name, p) in given {
        let Some(r) = p.get("reference") else {
            continue;
        };
        let Some(decl) = decls
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|x| x.1)
        else {
            continue;
        };
        let shape = || {
            param_error(
                format!("The Key Vault reference of the template parameter '{name}' is not valid: it must be {{\"reference\": {{\"keyVault\": {{\"id\": \"<vault resource id>\"}}, \"secretName\": \"<name>\"}}}}, with an optional \"secretVersion\". Please see https://aka.ms/arm-keyvault-parameter for usage details."),
                name,
            )
        };
        let text = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let vault_id = text(r.get("keyVault").and_then(|k| k.get("id"))).ok_or_else(shape)?;
        let secret_name = text(r.get("secretName")).ok_or_else(shape)?;
        let secret_version = match r.get("secretVersion") {
            None | Some(Value::Null) => None,
            v => Some(text(v).ok_or_else(shape)?),
        };
        let ty = decl
            .get("type")
            .and_then(Value::as_str)
            .and_then(ParamType::parse);
        let object = match ty {
            Some(ParamType::SecureString) => false,
            Some(ParamType::SecureObject) => true,
            _ => {
                return Err(param_error(
                    format!("The template parameter '{name}' is given as a Key Vault reference, but its type is '{}': a value from a key vault may only be passed to a 'securestring' or 'secureobject' parameter, which is never echoed.", ty.map(ParamType::echo).unwrap_or("unknown")),
                    name,
                ))
            }
        };
        out.push(KeyVaultReference {
            parameter: name.clone(),
            vault_id,
            secret_name,
            secret_version,
            object,
        });
    }
    Ok(out)
}

fn param_error(msg: String, name: &str) -> TemplateError {
    TemplateError::validation(msg, Some(format!("parameters.{name}")))
}

/// The parameters' values, as echoed, and the names of the secure ones: declared secure, or
/// with a default computed from one that is.
type Resolved = (
    HashMap<String, Value>,
    Vec<(String, ParamType, Value)>,
    HashSet<String>,
);

fn resolve_parameters(
    template: &Value,
    given: &Value,
    scope: &Scope,
    now: u64,
    guid_seed: u128,
    meter: &Meter,
    template_hash: &OnceLock<String>,
) -> Result<Resolved, TemplateError> {
    let empty = Map::new();
    let decls = match template.get("parameters") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(TemplateError::validation(
                "The template property 'parameters' must be an object.",
                None,
            ))
        }
    };
    let given = match given {
        Value::Null => &empty,
        Value::Object(m) => m,
        _ => {
            return Err(TemplateError::validation(
                "The deployment parameters must be an object. Please see https://aka.ms/arm-create-parameter-file for usage details.",
                None,
            ))
        }
    };
    if decls.len() > MAX_PARAMETERS {
        return Err(limit_exceeded(
            "parameters",
            MAX_PARAMETERS,
            decls.len(),
            "parameters",
        ));
    }
    let lower: HashMap<String, &String> =
        decls.keys().map(|k| (k.to_ascii_lowercase(), k)).collect();
    let unknown: Vec<&str> = given
        .keys()
        .filter(|k| !lower.contains_key(&k.to_ascii_lowercase()))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        let supported: Vec<&str> = decls.keys().map(String::as_str).collect();
        return Err(TemplateError::validation(
            format!(
                "The template parameters '{}' in the parameters file are not valid; they are not present in the original template and can therefore not be provided at deployment time. The only supported parameters for this template are '{}'. Please see https://aka.ms/arm-pass-parameter-values for usage details.",
                unknown.join(", "),
                supported.join(", ")
            ),
            None,
        ));
    }

    let mut types = Vec::with_capacity(decls.len());
    let mut lazy = Lazy::new(Phase::Default);
    for (name, def) in decls {
        let ty = def
            .get("type")
            .and_then(Value::as_str)
            .and_then(ParamType::parse)
            .ok_or_else(|| {
                param_error(
                    format!("The template parameter '{name}' at line '1' and column '1' has an invalid type '{}'. The supported types are 'string, securestring, int, bool, object, secureobject, array'. Please see https://aka.ms/arm-template/#parameters for usage details.", def.get("type").map(functions::to_text).unwrap_or_default()),
                    name,
                )
            })?;
        types.push((name, def, ty));
        let key = name.to_ascii_lowercase();
        let provided = given
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v);
        match provided {
            Some(p) if p.get("reference").is_some() => {
                return Err(param_error(
                    format!("The value for the template parameter '{name}' is a Key Vault reference that was not resolved."),
                    name,
                ))
            }
            Some(p) if p.get("value").is_some() => {
                lazy.done.get_mut().insert(key, p["value"].clone());
            }
            _ => {
                if let Some(d) = def.get("defaultValue") {
                    lazy.defs.insert(key, Def::Value(d));
                }
            }
        }
    }
    for (name, _, _) in &types {
        let key = name.to_ascii_lowercase();
        if !lazy.done.get_mut().contains_key(&key) && !lazy.defs.contains_key(&key) {
            return Err(param_error(
                format!("The value for the template parameter '{name}' at line '1' and column '1' is not provided. Please see https://aka.ms/arm-create-parameter-file for usage details."),
                name,
            ));
        }
    }
    // a default computed from a secure parameter is marked (see `Secure`)
    let declared = Secure {
        params: types
            .iter()
            .filter(|(_, _, ty)| ty.secure())
            .map(|(n, _, _)| n.to_ascii_lowercase())
            .collect(),
        vars: HashSet::new(),
    };
    let env = Env {
        scope,
        template,
        params: Src::Lazy(&lazy),
        vars: Src::Empty,
        names: None,
        now,
        guid_seed,
        guid_counter: Cell::new(0),
        meter,
        template_hash,
        secure: Some(&declared),
        tainted: Cell::new(false),
        mask: false,
    };
    let mut values = HashMap::with_capacity(types.len());
    let mut echo = Vec::with_capacity(types.len());
    for (name, def, ty) in types {
        let key = name.to_ascii_lowercase();
        let v = env
            .param(name)
            .map_err(|e| TemplateError::expression(e, Some(format!("parameters.{name}"))))?
            .ok_or_else(|| {
                param_error(
                    format!("The value for the template parameter '{name}' at line '1' and column '1' is not provided. Please see https://aka.ms/arm-create-parameter-file for usage details."),
                    name,
                )
            })?;
        check_parameter(name, def, ty, &v)?;
        echo.push((name.clone(), ty, v.clone()));
        values.insert(key, v);
    }
    let mut secure = declared.params;
    secure.extend(lazy.tainted.borrow().iter().cloned());
    Ok((values, echo, secure))
}

fn check_parameter(name: &str, def: &Value, ty: ParamType, v: &Value) -> Result<(), TemplateError> {
    let actual = functions::jtype(v);
    if actual != ty.jtoken() {
        return Err(param_error(
            format!("Template parameter JToken type is not valid. Expected '{}'. Actual '{actual}'. Please see https://aka.ms/arm-create-parameter-file for usage details.", ty.jtoken()),
            name,
        ));
    }
    let shown = |v: &Value| {
        if ty.secure() {
            String::new()
        } else {
            format!(" '{}'", functions::to_text(v))
        }
    };
    if let Some(Value::Array(allowed)) = def.get("allowedValues") {
        let ok = match v {
            Value::Array(items) if !allowed.iter().any(Value::is_array) => {
                items.iter().all(|x| allowed.contains(x))
            }
            other => allowed.contains(other),
        };
        if !ok {
            let list: Vec<String> = allowed.iter().map(functions::to_text).collect();
            return Err(param_error(
                format!("The provided value{} for the template parameter '{name}' at line '1' and column '1' is not valid. The parameter value is not part of the allowed value(s): '{}'. Please see https://aka.ms/arm-create-parameter-file for usage details.", shown(v), list.join(",")),
                name,
            ));
        }
    }
    let len = match v {
        Value::String(s) => Some(s.chars().count() as i64),
        Value::Array(a) => Some(a.len() as i64),
        _ => None,
    };
    if let Some(len) = len {
        if let Some(min) = def.get("minLength").and_then(Value::as_i64) {
            if len < min {
                return Err(param_error(
                    format!("The provided value for the template parameter '{name}' at line '1' and column '1' is not valid. Length of the value should be greater than or equal to '{min}'. Please see https://aka.ms/arm-create-parameter-file for usage details."),
                    name,
                ));
            }
        }
        if let Some(max) = def.get("maxLength").and_then(Value::as_i64) {
            if len > max {
                return Err(param_error(
                    format!("The provided value for the template parameter '{name}' at line '1' and column '1' is not valid. Length of the value should be less than or equal to '{max}'. Please see https://aka.ms/arm-create-parameter-file for usage details."),
                    name,
                ));
            }
        }
    }
    if let Some(x) = v.as_i64() {
        if let Some(min) = def.get("minValue").and_then(Value::as_i64) {
            if x < min {
                return Err(param_error(
                    format!("The provided value '{x}' for the template parameter '{name}' at line '1' and column '1' is not valid. The value should be greater than or equal to '{min}'. Please see https://aka.ms/arm-create-parameter-file for usage details."),
                    name,
                ));
            }
        }
        if let Some(max) = def.get("maxValue").and_then(Value::as_i64) {
            if x > max {
                return Err(param_error(
                    format!("The provided value '{x}' for the template parameter '{name}' at line '1' and column '1' is not valid. The value should be less than or equal to '{max}'. Please see https://aka.ms/arm-create-parameter-file for usage details."),
                    name,
                ));
            }
        }
    }
    Ok(())
}

/// The variables, and the names of those computed from a secure value.
type Variables = (HashMap<String, Value>, HashSet<String>);

fn resolve_variables(
    template: &Value,
    scope: &Scope,
    params: &HashMap<String, Value>,
    secure: &Secure,
    meter: &Meter,
    template_hash: &OnceLock<String>,
) -> Result<Variables, TemplateError> {
    let empty = Map::new();
    let decls = match template.get("variables") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(TemplateError::validation(
                "The template property 'variables' must be an object.",
                None,
            ))
        }
    };
    let mut lazy = Lazy::new(Phase::Variables);
    let mut order = Vec::new();
    for (name, v) in decls {
        if name.eq_ignore_ascii_case("copy") && v.is_array() {
            for entry in v.as_array().into_iter().flatten() {
                let n = entry.get("name").and_then(Value::as_str).ok_or_else(|| {
                    TemplateError::validation("The variable copy entry must have a 'name'. Please see https://aka.ms/arm-copy for usage details.", Some("variables.copy".into()))
                })?;
                lazy.defs.insert(n.to_ascii_lowercase(), Def::Loop(entry));
                order.push(n.to_string());
            }
            continue;
        }
        lazy.defs.insert(name.to_ascii_lowercase(), Def::Value(v));
        order.push(name.clone());
    }
    if order.len() > MAX_VARIABLES {
        return Err(limit_exceeded(
            "variables",
            MAX_VARIABLES,
            order.len(),
            "variables",
        ));
    }
    let env = Env {
        scope,
        template,
        params: Src::Done(params),
        vars: Src::Lazy(&lazy),
        names: None,
        now: 0,
        guid_seed: 0,
        guid_counter: Cell::new(0),
        meter,
        template_hash,
        secure: Some(secure),
        tainted: Cell::new(false),
        mask: false,
    };
    for name in &order {
        env.var(name)
            .map_err(|e| TemplateError::expression(e, Some(format!("variables.{name}"))))?;
    }
    Ok((lazy.done.into_inner(), lazy.tainted.into_inner()))
}

fn static_string(
    v: Option<&Value>,
    cx: &Ctx,
    what: &str,
    path: &str,
) -> Result<String, TemplateError> {
    let Some(v) = v else {
        return Err(TemplateError::validation(
            format!("Required property '{what}' not found in JSON. Path '{path}'."),
            Some(path.to_string()),
        ));
    };
    match eval_value(v, cx).map_err(|e| TemplateError::expression(e, Some(path.to_string())))? {
        Value::String(s) => Ok(s),
        other => Err(TemplateError::validation(
            format!("The template resource property '{what}' at '{path}' must be a string. The provided value is of type '{}'.", functions::jtype(&other)),
            Some(path.to_string()),
        )),
    }
}

struct Parent<'p> {
    full_type: &'p str,
    name: &'p str,
    /// 1 for a top-level resource, 2 for its children, …
    level: usize,
}

/// Levels of nested child resources (`resources` in a resource); real resource types have far
/// fewer segments. Bounds the expansion's recursion.
const MAX_CHILD_LEVELS: usize = 16;

fn segment_error(name: &str, ty: &str, path: &str) -> TemplateError {
    TemplateError::validation(
        format!("The template resource '{name}' for type '{ty}' at line '1' and column '1' has incorrect segment lengths. A nested resource type must have identical number of segments as its resource name. A root resource type must have segment length one greater than its resource name. Please see https://aka.ms/arm-syntax-resources for usage details."),
        Some(path.to_string()),
    )
}

/// The resource definitions (without their nested `resources`), one per template resource
/// however many instances it has.
#[derive(Default)]
struct Defs {
    list: Vec<Value>,
    /// The template resource's address → its index in `list`.
    by_source: HashMap<*const Value, usize>,
}

/// How many instances the template resource `r` expands to, nested children included (copy count
/// × (1 + children)), as far as it can be told before expanding: what does not evaluate counts
/// once (expansion reports it).
fn instance_count(r: &Value, env: &Env, top: bool) -> usize {
    let Some(obj) = r.as_object() else {
        return 1;
    };
    let copies = match obj.get("copy") {
        Some(copy) if top => {
            let cx = Ctx::new(env, Phase::Static);
            eval_count(copy.get("count").unwrap_or(&Value::Null), &cx).unwrap_or(1)
        }
        _ => 1,
    };
    let kids = match obj.get("resources") {
        Some(Value::Array(kids)) => kids
            .iter()
            .map(|k| instance_count(k, env, false))
            .fold(0usize, usize::saturating_add),
        _ => 0,
    };
    copies.saturating_mul(kids.saturating_add(1))
}

/// One template resource → its instances (copy loop) and, recursively, its nested children.
fn expand(
    r: &Value,
    parent: Option<&Parent>,
    bindings: &[Binding],
    env: &Env,
    defs: &mut Defs,
    out: &mut Vec<Pending>,
    path: &str,
) -> Result<(), TemplateError> {
    let obj = r.as_object().ok_or_else(|| {
        TemplateError::validation(
            format!("The template resource at '{path}' must be an object."),
            Some(path.to_string()),
        )
    })?;
    let base = Ctx {
        env,
        phase: Phase::Static,
        bindings: bindings.to_vec(),
        refs: None,
        validate: false,
        lambda: Vec::new(),
    };
    let ex = |e: String| TemplateError::expression(e, Some(path.to_string()));

    // Copy loop.
    let mut iterations: Vec<Option<(String, usize)>> = vec![None];
    let mut batch = 0usize;
    if let Some(copy) = obj.get("copy") {
        if parent.is_some() {
            return Err(TemplateError::validation(
                "Copying nested resources is not supported. Please see https://aka.ms/arm-copy/#looping-on-a-nested-resource for usage details.",
                Some(path.to_string()),
            ));
        }
        let name = static_string(copy.get("name"), &base, "name", &format!("{path}.copy"))?;
        let count = eval_count(copy.get("count").unwrap_or(&Value::Null), &base).map_err(ex)?;
        let serial = match copy.get("mode") {
            Some(m) => eval_value(m, &base)
                .map_err(ex)?
                .as_str()
                .is_some_and(|m| m.eq_ignore_ascii_case("serial")),
            None => false,
        };
        if serial {
            batch = match copy.get("batchSize") {
                Some(b) => eval_value(b, &base).map_err(ex)?.as_i64().filter(|b| *b >= 1).ok_or_else(|| {
                    TemplateError::validation(
                        "The copy 'batchSize' must be a positive integer. Please see https://aka.ms/arm-copy for usage details.",
                        Some(path.to_string()),
                    )
                })? as usize,
                None => 1,
            };
        }
        iterations = (0..count).map(|i| Some((name.clone(), i))).collect();
    }

    let children = obj.get("resources");
    let def_index = *defs.by_source.entry(r as *const Value).or_insert_with(|| {
        let def: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| *k != "resources")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        defs.list.push(Value::Object(def));
        defs.list.len() - 1
    });

    let first = out.len();
    for (k, it) in iterations.into_iter().enumerate() {
        let mut b = bindings.to_vec();
        if let Some((l, i)) = &it {
            b.push(Binding {
                name: l.clone(),
                index: *i,
                kind: LoopKind::Resource,
            });
        }
        let cx = Ctx {
            env,
            phase: Phase::Static,
            bindings: b.clone(),
            refs: None,
            validate: false,
            lambda: Vec::new(),
        };
        let ty = static_string(obj.get("type"), &cx, "type", path)?;
        let name = static_string(obj.get("name"), &cx, "name", path)?;
        let api_version = static_string(obj.get("apiVersion"), &cx, "apiVersion", path)?;
        let condition = match obj.get("condition") {
            None => true,
            Some(c) => match eval_value(c, &cx).map_err(ex)? {
                Value::Bool(b) => b,
                other => {
                    return Err(TemplateError::validation(
                        format!("The template resource '{name}' condition must evaluate to a boolean. The provided value is of type '{}'.", functions::jtype(&other)),
                        Some(path.to_string()),
                    ))
                }
            },
        };
        let tsegs = ty.split('/').count();
        let nsegs = name.split('/').count();
        let (full_type, full_name) = match parent {
            None => {
                if tsegs < 2 || tsegs != nsegs + 1 {
                    return Err(segment_error(&name, &ty, path));
                }
                (ty.clone(), name.clone())
            }
            Some(_) if ty.contains('/') => {
                if tsegs != nsegs + 1 {
                    return Err(segment_error(&name, &ty, path));
                }
                (ty.clone(), name.clone())
            }
            Some(p) => {
                if nsegs != 1 {
                    return Err(segment_error(&name, &ty, path));
                }
                (
                    format!("{}/{}", p.full_type, ty),
                    format!("{}/{}", p.name, name),
                )
            }
        };
        let names: Vec<&str> = full_name.split('/').collect();
        let tail = functions::type_and_names("resourceId", &full_type, &names)
            .map_err(|_| segment_error(&full_name, &full_type, path))?;
        let nested = if full_type.eq_ignore_ascii_case(DEPLOYMENTS) {
            Some(inner_scope(obj, &cx, &name, path)?)
        } else {
            None
        };
        let sub = env.scope.subscription_id.as_str();
        let id = match obj.get("scope") {
            Some(s) => {
                let s = static_string(Some(s), &cx, "scope", path)?;
                format!("{}/providers/{tail}", s.trim_end_matches('/'))
            }
            None if nested.is_some() => match deployment_group(obj, &cx, &name, path)? {
                Some(rg) => format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/{tail}"),
                None if env.scope.level == Level::Subscription => {
                    format!("/subscriptions/{sub}/providers/{tail}")
                }
                None => format!(
                    "/subscriptions/{sub}/resourceGroups/{}/providers/{tail}",
                    env.scope.resource_group
                ),
            },
            None if env.scope.level == Level::Subscription => {
                functions::subscription_id_of(sub, &tail)
            }
            None => format!(
                "/subscriptions/{sub}/resourceGroups/{}/providers/{tail}",
                env.scope.resource_group
            ),
        };
        let mut depends_raw = Vec::new();
        match obj.get("dependsOn") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for d in a {
                    match eval_value(d, &cx).map_err(ex)? {
                        Value::String(s) => depends_raw.push(s),
                        Value::Array(items) => {
                            depends_raw.extend(items.iter().filter_map(|x| x.as_str().map(str::to_string)))
                        }
                        other => {
                            return Err(TemplateError::validation(
                                format!("The template resource '{name}' dependsOn entries must be strings. The provided value is of type '{}'.", functions::jtype(&other)),
                                Some(path.to_string()),
                            ))
                        }
                    }
                }
            }
            Some(_) => {
                return Err(TemplateError::validation(
                    format!("The template resource '{name}' property 'dependsOn' must be an array. Please see https://aka.ms/arm-syntax-resources for usage details."),
                    Some(path.to_string()),
                ))
            }
        }
        if out.len() >= MAX_RESOURCES {
            // instance_count() counted fewer (a count it could not evaluate): refuse here.
            return Err(limit_exceeded(
                "resources",
                MAX_RESOURCES,
                out.len() + 1,
                "resources",
            ));
        }
        let serial = if batch > 0 && k >= batch {
            let prev = (k / batch - 1) * batch;
            (prev..prev + batch).map(|j| first + j).collect()
        } else {
            Vec::new()
        };
        out.push(Pending {
            inst: Instance {
                def: def_index,
                bindings: b.clone(),
                nested,
            },
            full_type: full_type.clone(),
            name: full_name.clone(),
            id,
            api_version,
            condition,
            depends_raw,
            copy: it.clone(),
            serial,
        });
        if let Some(Value::Array(kids)) = children {
            if batch > 0 {
                return Err(TemplateError::validation(
                    "Nested child resources of a serial copy loop are not supported. Please see https://aka.ms/arm-copy for usage details.",
                    Some(path.to_string()),
                ));
            }
            let level = parent.map_or(1, |p| p.level + 1);
            if level >= MAX_CHILD_LEVELS && !kids.is_empty() {
                return Err(TemplateError::validation(
                    format!("The template resource '{full_name}' nests child resources more than '{MAX_CHILD_LEVELS}' levels deep. Please see https://aka.ms/arm-syntax-resources for usage details."),
                    Some(path.to_string()),
                ));
            }
            let p = Parent {
                full_type: &full_type,
                name: &full_name,
                level,
            };
            for (ci, kid) in kids.iter().enumerate() {
                expand(
                    kid,
                    Some(&p),
                    &b,
                    env,
                    defs,
                    out,
                    &format!("{path}.resources[{ci}]"),
                )?;
            }
        }
    }
    Ok(())
}

/// A nested deployment's `properties.expressionEvaluationOptions.scope`: true for "inner",
/// false for "outer" or none.
fn inner_scope(
    obj: &Map<String, Value>,
    cx: &Ctx,
    name: &str,
    path: &str,
) -> Result<bool, TemplateError> {
    let Some(v) = member(obj, "properties")
        .and_then(Value::as_object)
        .and_then(|p| member(p, "expressionEvaluationOptions"))
        .and_then(Value::as_object)
        .and_then(|o| member(o, "scope"))
    else {
        return Ok(false);
    };
    let at = format!("{path}.properties.expressionEvaluationOptions.scope");
    let s = static_string(Some(v), cx, "scope", &at)?;
    if s.eq_ignore_ascii_case("inner") {
        Ok(true)
    } else if s.eq_ignore_ascii_case("outer") {
        Ok(false)
    } else {
        Err(TemplateError::validation(
            format!("The template resource '{name}' has an invalid expression evaluation scope '{s}'. The supported values are 'inner, outer'. Please see https://aka.ms/arm-nested-templates for usage details."),
            Some(at),
        ))
    }
}

/// A nested deployment's target group (`resourceGroup`), checking `subscriptionId` is this one.
fn deployment_group(
    obj: &Map<String, Value>,
    cx: &Ctx,
    name: &str,
    path: &str,
) -> Result<Option<String>, TemplateError> {
    if let Some(v) = member(obj, "subscriptionId") {
        let sub = static_string(Some(v), cx, "subscriptionId", path)?;
        if !sub.eq_ignore_ascii_case(&cx.env.scope.subscription_id) {
            return Err(TemplateError::validation(
                format!("The template resource '{name}' targets subscription '{sub}': Keyless deploys nested deployments only into the deployment's own subscription '{}'. Please see https://aka.ms/arm-nested-templates for usage details.", cx.env.scope.subscription_id),
                Some(path.to_string()),
            ));
        }
    }
    let Some(v) = member(obj, "resourceGroup") else {
        return Ok(None);
    };
    let rg = static_string(Some(v), cx, "resourceGroup", path)?;
    if rg.is_empty() {
        return Err(TemplateError::validation(
            format!("The template resource '{name}' property 'resourceGroup' must not be empty. Please see https://aka.ms/arm-nested-templates for usage details."),
            Some(path.to_string()),
        ));
    }
    Ok(Some(rg))
}

/// The first argument of every reference()/list*() in a resource's body (as [`split_body`]
/// sees it), where it can be evaluated now. Each expression scanned is charged (by length).
fn scan_body(
    def: &Value,
    nested: Option<bool>,
    cx: &Ctx,
    out: &mut Vec<String>,
) -> Result<(), String> {
    let Some(o) = def.as_object() else {
        return Ok(());
    };
    let inner = inner_template_keys(o, nested);
    for (k, v) in o {
        if !body_member(k, nested) {
            continue;
        }
        match (&inner, v) {
            (Some((pk, tk)), Value::Object(props)) if pk == k => {
                for (x, y) in props {
                    if x != tk {
                        scan_references(y, cx, out)?;
                    }
                }
            }
            _ => scan_references(v, cx, out)?,
        }
    }
    Ok(())
}

fn scan_references(v: &Value, cx: &Ctx, out: &mut Vec<String>) -> Result<(), String> {
    match v {
        Value::String(s) => {
            if let expr::StrKind::Expression(e) = expr::classify(s) {
                cx.env.meter.charge(e.len())?;
                if let Ok(parsed) = expr::parse(e) {
                    scan_expr(&parsed, cx, out);
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                scan_references(x, cx, out)?;
            }
        }
        Value::Object(m) => {
            for x in m.values() {
                scan_references(x, cx, out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn scan_expr(e: &expr::Expr, cx: &Ctx, out: &mut Vec<String>) {
    match e {
        expr::Expr::Call(name, args) => {
            let l = name.to_ascii_lowercase();
            if (l == "reference" || l.starts_with("list")) && !args.is_empty() {
                if let Ok(Value::String(s)) = eval::eval_expr(&args[0], cx) {
                    out.push(s);
                }
            }
            args.iter().for_each(|a| scan_expr(a, cx, out));
        }
        expr::Expr::Member(b, path) => {
            scan_expr(b, cx, out);
            for a in path {
                if let expr::Access::Index(i) = a {
                    scan_expr(i, cx, out);
                }
            }
        }
        _ => {}
    }
}

/// The resources' indices, each after those it depends on (Kahn's algorithm); on a cycle, the
/// error names a resource on it.
fn dependency_order(rs: &[PlannedResource]) -> Result<Vec<usize>, TemplateError> {
    let n = rs.len();
    let mut remaining: Vec<usize> = rs.iter().map(|r| r.depends_on.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, r) in rs.iter().enumerate() {
        for &d in &r.depends_on {
            dependents[d].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| remaining[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop() {
        order.push(i);
        for &j in &dependents[i] {
            remaining[j] -= 1;
            if remaining[j] == 0 {
                ready.push(j);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk unfinished dependencies until one repeats: that one is on a cycle.
    let mut seen = HashSet::new();
    let mut at = (0..n).find(|&i| remaining[i] > 0).unwrap_or(0);
    while seen.insert(at) {
        at = rs[at]
            .depends_on
            .iter()
            .copied()
            .find(|&d| remaining[d] > 0)
            .unwrap_or(at);
    }
    Err(TemplateError::validation(
        format!(
            "Circular dependency detected on resource: '{}'. Please see https://aka.ms/arm-syntax-resources for usage details.",
            rs[at].id
        ),
        Some(rs[at].id.clone()),
    ))
}

fn output_type(t: &str) -> Option<(&'static str, &'static str, bool)> {
    // (echo, JToken type, secure)
    Some(match t.to_ascii_lowercase().as_str() {
        "string" => ("String", "String", false),
        "securestring" => ("SecureString", "String", true),
        "int" => ("Int", "Integer", false),
        "bool" => ("Bool", "Boolean", false),
        "object" => ("Object", "Object", false),
        "secureobject" => ("SecureObject", "Object", true),
        "array" => ("Array", "Array", false),
        _ => return None,
    })
}

fn evaluate_outputs(
    env: &Env,
    refs: Option<&dyn References>,
    validate: bool,
) -> Result<Value, TemplateError> {
    let mut out = Map::new();
    let defs = match env.template.get("outputs") {
        None | Some(Value::Null) => return Ok(Value::Object(out)),
        Some(Value::Object(m)) if m.len() > MAX_OUTPUTS => {
            return Err(limit_exceeded("outputs", MAX_OUTPUTS, m.len(), "outputs"))
        }
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(TemplateError::validation(
                "The template property 'outputs' must be an object.",
                None,
            ))
        }
    };
    for (name, def) in defs {
        let target = Some(format!("outputs.{name}"));
        let ty = def.get("type").and_then(Value::as_str).and_then(output_type).ok_or_else(|| {
            TemplateError::validation(
                format!("The template output '{name}' at line '1' and column '1' has an invalid type. The supported types are 'string, securestring, int, bool, object, secureobject, array'. Please see https://aka.ms/arm-outputs for usage details."),
                target.clone(),
            )
        })?;
        let cx = Ctx {
            env,
            phase: Phase::Output,
            bindings: Vec::new(),
            refs,
            validate,
            lambda: Vec::new(),
        };
        if let Some(c) = def.get("condition") {
            match eval_value(c, &cx).map_err(|e| TemplateError::expression(e, target.clone()))? {
                Value::Bool(false) => continue,
                Value::Bool(true) => {}
                Value::Null if validate => {}
                other => {
                    return Err(TemplateError::validation(
                        format!("The template output '{name}' condition must evaluate to a boolean. The provided value is of type '{}'.", functions::jtype(&other)),
                        target,
                    ))
                }
            }
        }
        if ty.2 && !validate {
            continue;
        }
        let value = match def.get("copy") {
            Some(copy) => eval_loop(copy, &cx, LoopKind::Output, "input"),
            None => eval_value(def.get("value").unwrap_or(&Value::Null), &cx),
        }
        .map_err(|e| TemplateError::expression(e, target.clone()))?;
        if validate {
            continue;
        }
        let actual = functions::jtype(&value);
        if actual != ty.1 {
            return Err(TemplateError::validation(
                format!("The template output '{name}' is not valid: Template output JToken type is not valid. Expected '{}'. Actual '{actual}'. Please see https://aka.ms/arm-outputs for usage details.", ty.1),
                target,
            ));
        }
        out.insert(name.clone(), json!({"type": ty.0, "value": value}));
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests;
