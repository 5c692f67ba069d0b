//! The template functions.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::eval::{eval_expr, Ctx, LoopKind, Meter, Phase};
use super::expr::{Access, Expr};
use super::hash;
use super::Level;

mod lambdas;
mod time;
mod values;

/// ARM's name for a JSON value's type (Newtonsoft's JTokenType).
pub(crate) fn jtype(v: &Value) -> &'static str {
    match v {
        Value::Null => "Null",
        Value::Bool(_) => "Boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "Integer",
        Value::Number(_) => "Float",
        Value::String(_) => "String",
        Value::Array(_) => "Array",
        Value::Object(_) => "Object",
    }
}

/// How ARM turns a value into text (concat, format, string()).
pub(crate) fn to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => String::new(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

fn unknown(name: &str) -> String {
    format!("The template function '{name}' is not valid. Please see https://aka.ms/arm-functions for usage details.")
}

fn not_here(name: &str, why: &str) -> String {
    format!("The template function '{name}' is not expected at this location.{why} Please see https://aka.ms/arm-template-expressions for usage details.")
}

fn arity(name: &str, n: usize, min: usize, max: usize) -> Result<(), String> {
    if n >= min && n <= max {
        return Ok(());
    }
    let req = if min == max {
        min.to_string()
    } else if max == usize::MAX {
        format!("at least {min}")
    } else {
        format!("{min} to {max}")
    };
    Err(format!(
        "Unable to evaluate template language function '{name}': function requires {req} argument(s) while {n} were provided. Please see https://aka.ms/arm-functions for usage details."
    ))
}

fn wrong_type(name: &str, want: &str, got: &Value) -> String {
    format!(
        "The template language function '{name}' expects its parameter to be of type '{want}'. The provided value is of type '{}'. Please see https://aka.ms/arm-functions for usage details.",
        jtype(got)
    )
}

fn s<'v>(name: &str, v: &'v Value) -> Result<&'v str, String> {
    v.as_str().ok_or_else(|| wrong_type(name, "String", v))
}

fn int(name: &str, v: &Value) -> Result<i64, String> {
    v.as_i64().ok_or_else(|| wrong_type(name, "Integer", v))
}

fn boolean(name: &str, v: &Value) -> Result<bool, String> {
    v.as_bool().ok_or_else(|| wrong_type(name, "Boolean", v))
}

fn arr<'v>(name: &str, v: &'v Value) -> Result<&'v Vec<Value>, String> {
    v.as_array().ok_or_else(|| wrong_type(name, "Array", v))
}

/// Every function [`call`] serves (lower-case); `list*` are recognised by prefix.
const KNOWN: &[&str] = &[
    "if",
    "and",
    "or",
    "parameters",
    "variables",
    "resourcegroup",
    "subscription",
    "tenant",
    "environment",
    "deployment",
    "copyindex",
    "reference",
    "utcnow",
    "newguid",
    "resourceid",
    "subscriptionresourceid",
    "tenantresourceid",
    "extensionresourceid",
    "uniquestring",
    "guid",
    "concat",
    "format",
    "string",
    "tolower",
    "toupper",
    "trim",
    "replace",
    "substring",
    "split",
    "join",
    "startswith",
    "endswith",
    "indexof",
    "lastindexof",
    "padleft",
    "base64",
    "base64tostring",
    "json",
    "int",
    "bool",
    "true",
    "false",
    "null",
    "createarray",
    "createobject",
    "equals",
    "not",
    "greater",
    "greaterorequals",
    "less",
    "lessorequals",
    "coalesce",
    "empty",
    "length",
    "contains",
    "first",
    "last",
    "take",
    "skip",
    "range",
    "union",
    "intersection",
    "min",
    "max",
    "add",
    "sub",
    "mul",
    "div",
    "mod",
    "items",
];

/// The first function in `e` that is not a template function, if any.
pub(crate) fn first_unknown(e: &Expr) -> Option<String> {
    match e {
        Expr::Call(name, args) => {
            let l = name.to_ascii_lowercase();
            let known = [KNOWN, lambdas::NAMES, time::NAMES, values::NAMES]
                .iter()
                .any(|names| names.contains(&l.as_str()));
            if !known && !l.starts_with("list") {
                return Some(unknown(name));
            }
            args.iter().find_map(first_unknown)
        }
        Expr::Member(b, path) => first_unknown(b).or_else(|| {
            path.iter().find_map(|a| match a {
                Access::Index(i) => first_unknown(i),
                Access::Prop(_) => None,
            })
        }),
        _ => None,
    }
}

/// The longest `padLeft` result and `format` alignment.
pub(crate) const MAX_PAD_WIDTH: usize = 16_384;

/// The largest precision of a numeric format (`D`, `X`, `N`, `F`), as .NET Framework's.
const MAX_PRECISION: usize = 99;

fn overflow(name: &str) -> String {
    format!("The template language function '{name}' failed: the result is outside the range of a 64-bit integer. Please see https://aka.ms/arm-functions for usage details.")
}

/// `parameters` and `variables`: functions [`lookup`] can read in place.
pub(crate) fn is_lookup(name: &str) -> bool {
    name.eq_ignore_ascii_case("parameters") || name.eq_ignore_ascii_case("variables")
}

/// `f` of the value `parameters(a[0])` / `variables(a[0])` names, read in place.
pub(crate) fn lookup<R>(
    name: &str,
    a: &[Value],
    cx: &Ctx,
    f: impl FnOnce(&Value) -> R,
) -> Result<R, String> {
    arity(name, a.len(), 1, 1)?;
    let vars = name.eq_ignore_ascii_case("variables");
    if vars && cx.phase == Phase::Default {
        return Err(not_here(name, ""));
    }
    let p = s(name, &a[0])?;
    cx.env.lookup(vars, p, f)?.ok_or_else(|| {
        if vars {
            format!("The template variable '{p}' is not found. Please see https://aka.ms/arm-template/#variables for usage details.")
        } else {
            format!("The template parameter '{p}' is not found. Please see https://aka.ms/arm-template/#parameters for usage details.")
        }
    })
}

/// Call `name` (case-insensitive) with unevaluated `args`. Only what evaluates further
/// (if/and/or, parameters, variables) is handled here, so that each nesting level of an
/// expression costs this small frame; the other functions are [`apply`]'s.
pub(crate) fn call(name: &str, args: &[Expr], cx: &Ctx) -> Result<Value, String> {
    if let Some(r) = call_lazy(name, args, cx) {
        return r;
    }
    // A plain loop: in debug builds every iterator adapter is a frame of its own.
    let mut a = Vec::with_capacity(args.len());
    for x in args {
        a.push(eval_expr(x, cx)?);
    }
    call_with(name, a, cx)
}

/// Functions that evaluate their arguments lazily: if, and, or, and the ones taking lambdas.
#[inline(never)]
fn call_lazy(name: &str, args: &[Expr], cx: &Ctx) -> Option<Result<Value, String>> {
    if let Some(r) = lambdas::call(name, args, cx) {
        return Some(r);
    }
    let or = if name.eq_ignore_ascii_case("if") {
        let r = arity(name, args.len(), 3, 3)
            .and_then(|()| eval_expr(&args[0], cx))
            .and_then(|c| boolean(name, &c))
            .and_then(|c| eval_expr(&args[if c { 1 } else { 2 }], cx));
        return Some(r);
    } else if name.eq_ignore_ascii_case("or") {
        true
    } else if name.eq_ignore_ascii_case("and") {
        false
    } else {
        return None;
    };
    Some((|| {
        arity(name, args.len(), 2, usize::MAX)?;
        for a in args {
            let v = eval_expr(a, cx)?;
            if boolean(name, &v)? == or {
                return Ok(Value::Bool(or));
            }
        }
        Ok(Value::Bool(!or))
    })())
}

/// A function on its evaluated arguments, the result charged.
#[inline(never)]
fn call_with(name: &str, a: Vec<Value>, cx: &Ctx) -> Result<Value, String> {
    let v = if is_lookup(name) {
        lookup(name, &a, cx, Value::clone)?
    } else {
        apply(name, &name.to_ascii_lowercase(), a, cx)?
    };
    cx.env.meter.charge_value(&v)?;
    Ok(v)
}

/// The functions that evaluate nothing further, on evaluated arguments.
#[inline(never)]
fn apply(name: &str, lname: &str, a: Vec<Value>, cx: &Ctx) -> Result<Value, String> {
    let n = a.len();
    if let Some(r) = time::apply(name, lname, &a).or_else(|| values::apply(name, lname, &a)) {
        return r;
    }
    let env = cx.env;
    let meter = env.meter;
    let scope = env.scope;
    let v = match lname {
        // Deployment values.
        "resourcegroup" => {
            arity(name, n, 0, 0)?;
            if scope.level == Level::Subscription {
                // ARM names the function in capitals here.
                return Err(not_here("RESOURCEGROUP", ""));
            }
            json!({
                "id": format!("/subscriptions/{}/resourceGroups/{}", scope.subscription_id, scope.resource_group),
                "name": scope.resource_group,
                "type": "Microsoft.Resources/resourceGroups",
                "location": scope.resource_group_location,
                "properties": {"provisioningState": "Succeeded"},
            })
        }
        "environment" => {
            arity(name, n, 0, 0)?;
            scope.environment.clone()
        }
        "subscription" => {
            arity(name, n, 0, 0)?;
            json!({
                "id": format!("/subscriptions/{}", scope.subscription_id),
                "subscriptionId": scope.subscription_id,
                "tenantId": scope.tenant_id,
                "displayName": "Keyless",
            })
        }
        "tenant" => {
            arity(name, n, 0, 0)?;
            json!({
                "id": format!("/tenants/{}", scope.tenant_id),
                "tenantId": scope.tenant_id,
                "countryCode": "US",
                "displayName": "Keyless",
            })
        }
        "deployment" => {
            arity(name, n, 0, 0)?;
            let t = env.template;
            let mut d = json!({
                "name": scope.deployment_name,
                "properties": {
                    "template": {
                        "$schema": t.get("$schema").cloned().unwrap_or(Value::Null),
                        "contentVersion": t.get("contentVersion").cloned().unwrap_or(Value::Null),
                    },
                    "templateHash": env.template_hash.get_or_init(|| super::Plan::template_hash(t)),
                    "mode": "Incremental",
                    "provisioningState": "Accepted",
                },
            });
            if let Some(l) = &scope.location {
                d["location"] = Value::String(l.clone());
            }
            d
        }
        "copyindex" => {
            arity(name, n, 0, 2)?;
            let (loop_name, offset) = match n {
                0 => (None, 0),
                1 if a[0].is_string() => (a[0].as_str(), 0),
                1 => (None, int(name, &a[0])?),
                _ => (Some(s(name, &a[0])?), int(name, &a[1])?),
            };
            let b = match loop_name {
                Some(l) => cx.bindings.iter().rev().find(|b| b.name.eq_ignore_ascii_case(l)).ok_or_else(|| {
                    format!("The template function 'copyIndex' has an invalid copy loop name '{l}'. The copy loop name must be one of the copy loops the expression is within. Please see https://aka.ms/arm-copy for usage details.")
                })?,
                None => cx
                    .bindings
                    .iter()
                    .rev()
                    .find(|b| matches!(b.kind, LoopKind::Resource | LoopKind::Output))
                    .or(cx.bindings.last())
                    .ok_or_else(|| {
                        not_here("copyIndex", " The function can only be used in a resource with copy specified.")
                    })?,
            };
            Value::from(
                i64::try_from(b.index)
                    .ok()
                    .and_then(|i| i.checked_add(offset))
                    .ok_or_else(|| overflow(name))?,
            )
        }
        "reference" => {
            arity(name, n, 1, 3)?;
            if !matches!(cx.phase, Phase::Body | Phase::Output) {
                return Err(not_here(
                    name,
                    " The function can only be used in the properties of a resource or in outputs.",
                ));
            }
            let target = s(name, &a[0])?;
            let id = resolve_reference(target, cx)?;
            let full = n == 3
                && a[2]
                    .as_str()
                    .is_some_and(|x| x.eq_ignore_ascii_case("full"));
            let found = match cx.refs {
                None if cx.validate => return Err(super::eval::DEFER.to_string()),
                refs => refs
                    .and_then(|r| r.get(&id))
                    .ok_or_else(|| format!("The Resource '{id}' was not found."))?,
            };
            if full {
                found
            } else {
                found
                    .get("properties")
                    .cloned()
                    .unwrap_or_else(|| json!({}))
            }
        }
        "utcnow" => {
            arity(name, n, 0, 1)?;
            if cx.phase != Phase::Default {
                return Err(not_here(
                    name,
                    " The function can only be used with parameter default values.",
                ));
            }
            let f = if n == 1 {
                s(name, &a[0])?
            } else {
                "yyyyMMddTHHmmssZ"
            };
            Value::String(format_time(env.now, f))
        }
        "newguid" => {
            arity(name, n, 0, 0)?;
            if cx.phase != Phase::Default {
                return Err(not_here(
                    name,
                    " The function can only be used with parameter default values.",
                ));
            }
            let c = env.guid_counter.get();
            env.guid_counter.set(c + 1);
            let derived =
                uuid::Uuid::new_v5(&uuid::Uuid::from_u128(env.guid_seed), &c.to_le_bytes());
            Value::String(
                uuid::Builder::from_random_bytes(*derived.as_bytes())
                    .into_uuid()
                    .to_string(),
            )
        }
        // Resource ids.
        "resourceid" => {
            arity(name, n, 2, usize::MAX)?;
            let strs = all_strings(name, &a)?;
            let t = strs.iter().position(|x| is_type(x)).ok_or_else(|| {
                "Unable to evaluate template language function 'resourceId': the resource type must be given as 'Namespace/type'. Please see https://aka.ms/arm-resourceid for usage details.".to_string()
            })?;
            let (sub, rg) = match t {
                0 => (
                    scope.subscription_id.as_str(),
                    scope.resource_group.as_str(),
                ),
                1 => (scope.subscription_id.as_str(), strs[0]),
                2 => (strs[0], strs[1]),
                _ => return Err(arity(name, n, 2, t + 2).unwrap_err()),
            };
            let tail = type_and_names(name, strs[t], &strs[t + 1..])?;
            Value::String(if t == 0 && scope.level == Level::Subscription {
                // No group at subscription level: ARM names the subscription's resource.
                subscription_id_of(sub, &tail)
            } else {
                format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/{tail}")
            })
        }
        "subscriptionresourceid" => {
            arity(name, n, 2, usize::MAX)?;
            let strs = all_strings(name, &a)?;
            let (sub, t) = if is_type(strs[0]) {
                (scope.subscription_id.as_str(), 0)
            } else {
                (strs[0], 1)
            };
            if t >= n {
                return Err(arity(name, n, 3, usize::MAX).unwrap_err());
            }
            let tail = type_and_names(name, strs[t], &strs[t + 1..])?;
            Value::String(subscription_id_of(sub, &tail))
        }
        "tenantresourceid" => {
            arity(name, n, 2, usize::MAX)?;
            let strs = all_strings(name, &a)?;
            let tail = type_and_names(name, strs[0], &strs[1..])?;
            Value::String(format!("/providers/{tail}"))
        }
        "extensionresourceid" => {
            arity(name, n, 3, usize::MAX)?;
            let strs = all_strings(name, &a)?;
            let tail = type_and_names(name, strs[1], &strs[2..])?;
            Value::String(format!(
                "{}/providers/{tail}",
                strs[0].trim_end_matches('/')
            ))
        }
        // Hashes.
        "uniquestring" | "guid" => {
            arity(name, n, 1, usize::MAX)?;
            let strs = all_strings(name, &a)?;
            Value::String(if lname == "guid" {
                hash::guid(&strs)
            } else {
                hash::unique_string(&strs)
            })
        }
        // Strings.
        "concat" => {
            arity(name, n, 1, usize::MAX)?;
            if a[0].is_array() {
                let mut out = Vec::new();
                for x in &a {
                    out.extend(arr(name, x)?.iter().cloned());
                }
                Value::Array(out)
            } else {
                Value::String(a.iter().map(to_text).collect())
            }
        }
        "format" => {
            arity(name, n, 1, usize::MAX)?;
            Value::String(format_dotnet(s(name, &a[0])?, &a[1..], meter)?)
        }
        "string" => {
            arity(name, n, 1, 1)?;
            Value::String(to_text(&a[0]))
        }
        "tolower" => {
            arity(name, n, 1, 1)?;
            Value::String(s(name, &a[0])?.to_lowercase())
        }
        "toupper" => {
            arity(name, n, 1, 1)?;
            Value::String(s(name, &a[0])?.to_uppercase())
        }
        "trim" => {
            arity(name, n, 1, 1)?;
            Value::String(s(name, &a[0])?.trim().to_string())
        }
        "replace" => {
            arity(name, n, 3, 3)?;
            let (text, old, new) = (s(name, &a[0])?, s(name, &a[1])?, s(name, &a[2])?);
            if old.is_empty() {
                return Err(format!("The template language function '{name}' cannot replace an empty string. Please see https://aka.ms/arm-functions for usage details."));
            }
            let hits = text.matches(old).count();
            meter.room(hits.saturating_mul(new.len()).saturating_add(text.len()))?;
            Value::String(text.replace(old, new))
        }
        "substring" => {
            arity(name, n, 2, 3)?;
            let chars: Vec<char> = s(name, &a[0])?.chars().collect();
            let start = int(name, &a[1])?;
            let len = if n == 3 {
                int(name, &a[2])?
            } else {
                chars.len() as i64 - start
            };
            if start < 0
                || len < 0
                || start
                    .checked_add(len)
                    .is_none_or(|end| end > chars.len() as i64)
            {
                return Err(format!(
                    "The index and length parameters must refer to a location within the string. The index parameter: '{start}', the length parameter: '{len}', the length of the string parameter: '{}'. Please see https://aka.ms/arm-functions for usage details.",
                    chars.len()
                ));
            }
            Value::String(
                chars[start as usize..(start + len) as usize]
                    .iter()
                    .collect(),
            )
        }
        "split" => {
            arity(name, n, 2, 2)?;
            let text = s(name, &a[0])?;
            let delims: Vec<String> = match &a[1] {
                Value::Array(d) => d
                    .iter()
                    .map(|x| s(name, x).map(str::to_string))
                    .collect::<Result<_, _>>()?,
                other => vec![s(name, other)?.to_string()],
            };
            let mut parts = vec![text.to_string()];
            for d in delims.iter().filter(|d| !d.is_empty()) {
                let more: usize = parts.iter().map(|p| p.matches(d.as_str()).count()).sum();
                meter.room(more.saturating_mul(64))?;
                parts = parts
                    .iter()
                    .flat_map(|p| p.split(d.as_str()).map(str::to_string).collect::<Vec<_>>())
                    .collect();
            }
            Value::Array(parts.into_iter().map(Value::String).collect())
        }
        "join" => {
            arity(name, n, 2, 2)?;
            let items = arr(name, &a[0])?;
            let d = s(name, &a[1])?;
            let texts: Vec<String> = items.iter().map(to_text).collect();
            let total = texts.iter().map(String::len).sum::<usize>();
            meter.room(
                d.len()
                    .saturating_mul(texts.len().saturating_sub(1))
                    .saturating_add(total),
            )?;
            Value::String(texts.join(d))
        }
        "startswith" | "endswith" | "indexof" | "lastindexof" => {
            arity(name, n, 2, 2)?;
            let h = s(name, &a[0])?.to_lowercase();
            let nd = s(name, &a[1])?.to_lowercase();
            match lname {
                "startswith" => Value::Bool(h.starts_with(&nd)),
                "endswith" => Value::Bool(h.ends_with(&nd)),
                "indexof" => Value::from(
                    h.find(&nd)
                        .map(|i| h[..i].chars().count() as i64)
                        .unwrap_or(-1),
                ),
                _ => Value::from(
                    h.rfind(&nd)
                        .map(|i| h[..i].chars().count() as i64)
                        .unwrap_or(-1),
                ),
            }
        }
        "padleft" => {
            arity(name, n, 2, 3)?;
            let text = to_text(&a[0]);
            let width = int(name, &a[1])?;
            if width > MAX_PAD_WIDTH as i64 {
                return Err(format!("The template language function '{name}' was given a total width '{width}' beyond the limit of '{MAX_PAD_WIDTH}'. Please see https://aka.ms/arm-functions for usage details."));
            }
            let total = width.max(0) as usize;
            let pad = if n == 3 {
                s(name, &a[2])?.chars().next().unwrap_or(' ')
            } else {
                ' '
            };
            let len = text.chars().count();
            let mut out: String = std::iter::repeat_n(pad, total.saturating_sub(len)).collect();
            out.push_str(&text);
            Value::String(out)
        }
        "base64" => {
            arity(name, n, 1, 1)?;
            Value::String(base64::engine::general_purpose::STANDARD.encode(s(name, &a[0])?))
        }
        "base64tostring" => {
            arity(name, n, 1, 1)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s(name, &a[0])?)
                .map_err(|_| format!("The template language function '{name}' was given a value that is not valid base64."))?;
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        }
        "json" => {
            arity(name, n, 1, 1)?;
            serde_json::from_str(s(name, &a[0])?).map_err(|_| {
                "Unable to evaluate the template language function 'json'. The argument provided is not a valid JSON string.".to_string()
            })?
        }
        // Conversions and literals.
        "int" => {
            arity(name, n, 1, 1)?;
            match &a[0] {
                // The value is not repeated: it may be a secure parameter's.
                Value::String(t) => Value::from(t.trim().parse::<i64>().map_err(|_| {
                    "The template language function 'int' was given a string value that cannot be converted to an integer.".to_string()
                })?),
                Value::Number(x) if x.is_i64() => a[0].clone(),
                Value::Number(x) => Value::from(x.as_f64().unwrap_or(0.0).trunc() as i64),
                other => return Err(wrong_type(name, "Integer", other)),
            }
        }
        "bool" => {
            arity(name, n, 1, 1)?;
            match &a[0] {
                Value::Bool(_) => a[0].clone(),
                Value::String(t) if t.eq_ignore_ascii_case("true") => Value::Bool(true),
                Value::String(t) if t.eq_ignore_ascii_case("false") => Value::Bool(false),
                Value::Number(x) if x.is_i64() => Value::Bool(x.as_i64() != Some(0)),
                other => return Err(wrong_type(name, "Boolean", other)),
            }
        }
        "true" | "false" => {
            arity(name, n, 0, 0)?;
            Value::Bool(lname == "true")
        }
        "null" => {
            arity(name, n, 0, 0)?;
            Value::Null
        }
        "createarray" => Value::Array(a),
        "createobject" => {
            if !n.is_multiple_of(2) {
                return Err(format!("Unable to evaluate template language function '{name}': the function requires an even number of arguments (key and value pairs) while {n} were provided. Please see https://aka.ms/arm-functions for usage details."));
            }
            let mut m = Map::new();
            for kv in a.chunks(2) {
                m.insert(s(name, &kv[0])?.to_string(), kv[1].clone());
            }
            Value::Object(m)
        }
        // Logic and comparison.
        "equals" => {
            arity(name, n, 2, 2)?;
            Value::Bool(a[0] == a[1])
        }
        "not" => {
            arity(name, n, 1, 1)?;
            Value::Bool(!boolean(name, &a[0])?)
        }
        "greater" | "greaterorequals" | "less" | "lessorequals" => {
            arity(name, n, 2, 2)?;
            let ord = match (&a[0], &a[1]) {
                (Value::Number(x), Value::Number(y)) => x
                    .as_f64()
                    .partial_cmp(&y.as_f64())
                    .unwrap_or(std::cmp::Ordering::Equal),
                (Value::String(x), Value::String(y)) => x.cmp(y),
                (x, _) => return Err(wrong_type(name, "Integer", x)),
            };
            use std::cmp::Ordering::*;
            Value::Bool(match lname {
                "greater" => ord == Greater,
                "greaterorequals" => ord != Less,
                "less" => ord == Less,
                _ => ord != Greater,
            })
        }
        "coalesce" => {
            arity(name, n, 1, usize::MAX)?;
            a.into_iter().find(|x| !x.is_null()).unwrap_or(Value::Null)
        }
        // Collections.
        "empty" => {
            arity(name, n, 1, 1)?;
            Value::Bool(match &a[0] {
                Value::Null => true,
                Value::String(t) => t.is_empty(),
                Value::Array(x) => x.is_empty(),
                Value::Object(o) => o.is_empty(),
                _ => false,
            })
        }
        "items" => {
            arity(name, n, 1, 1)?;
            let o = a[0]
                .as_object()
                .ok_or_else(|| wrong_type(name, "Object", &a[0]))?;
            // ARM sorts the entries by key
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort_by_key(|k| k.to_ascii_lowercase());
            Value::Array(
                keys.into_iter()
                    .map(|k| json!({"key": k, "value": o[k]}))
                    .collect(),
            )
        }
        "length" => {
            arity(name, n, 1, 1)?;
            Value::from(match &a[0] {
                Value::String(t) => t.chars().count(),
                Value::Array(x) => x.len(),
                Value::Object(o) => o.len(),
                other => return Err(wrong_type(name, "Array", other)),
            } as i64)
        }
        "contains" => {
            arity(name, n, 2, 2)?;
            Value::Bool(match &a[0] {
                Value::String(t) => t.contains(to_text(&a[1]).as_str()),
                Value::Array(x) => x.contains(&a[1]),
                Value::Object(o) => {
                    let k = to_text(&a[1]);
                    o.keys().any(|key| key.eq_ignore_ascii_case(&k))
                }
                other => return Err(wrong_type(name, "Array", other)),
            })
        }
        "first" | "last" => {
            arity(name, n, 1, 1)?;
            let first = lname == "first";
            match &a[0] {
                Value::String(t) => {
                    let c = if first {
                        t.chars().next()
                    } else {
                        t.chars().last()
                    };
                    Value::String(c.map(String::from).unwrap_or_default())
                }
                Value::Array(x) => (if first { x.first() } else { x.last() })
                    .cloned()
                    .unwrap_or(Value::Null),
                other => return Err(wrong_type(name, "Array", other)),
            }
        }
        "take" | "skip" => {
            arity(name, n, 2, 2)?;
            let k = int(name, &a[1])?.max(0) as usize;
            let take = lname == "take";
            match &a[0] {
                Value::String(t) => Value::String(if take {
                    t.chars().take(k).collect()
                } else {
                    t.chars().skip(k).collect()
                }),
                Value::Array(x) => Value::Array(if take {
                    x.iter().take(k).cloned().collect()
                } else {
                    x.iter().skip(k).cloned().collect()
                }),
                other => return Err(wrong_type(name, "Array", other)),
            }
        }
        "range" => {
            arity(name, n, 2, 2)?;
            let start = int(name, &a[0])?;
            let count = int(name, &a[1])?;
            if !(0..=10_000).contains(&count) {
                return Err(format!("The template language function 'range' count '{count}' must be between 0 and 10000."));
            }
            let end = start.checked_add(count).ok_or_else(|| overflow(name))?;
            Value::Array((start..end).map(Value::from).collect())
        }
        "union" => {
            arity(name, n, 1, usize::MAX)?;
            if a[0].is_array() {
                let mut out: Vec<Value> = Vec::new();
                for x in &a {
                    for item in arr(name, x)? {
                        // Each comparison is charged: union is quadratic.
                        meter.charge(out.len())?;
                        if !out.contains(item) {
                            out.push(item.clone());
                        }
                    }
                }
                Value::Array(out)
            } else {
                let mut out = Value::Object(Map::new());
                for x in &a {
                    if !x.is_object() {
                        return Err(wrong_type(name, "Object", x));
                    }
                    deep_merge(&mut out, x);
                }
                out
            }
        }
        "intersection" => {
            arity(name, n, 2, usize::MAX)?;
            let others: usize = a[1..]
                .iter()
                .map(|o| o.as_array().map_or(1, Vec::len))
                .sum();
            if let Value::Array(first) = &a[0] {
                meter.charge(first.len().saturating_mul(others))?;
            }
            match &a[0] {
                Value::Array(first) => Value::Array(
                    first
                        .iter()
                        .filter(|i| {
                            a[1..]
                                .iter()
                                .all(|o| o.as_array().is_some_and(|o| o.contains(i)))
                        })
                        .cloned()
                        .collect(),
                ),
                Value::Object(first) => Value::Object(
                    first
                        .iter()
                        .filter(|(k, v)| a[1..].iter().all(|o| o.get(k.as_str()) == Some(v)))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ),
                other => return Err(wrong_type(name, "Array", other)),
            }
        }
        "min" | "max" => {
            arity(name, n, 1, usize::MAX)?;
            let items: Vec<Value> = if n == 1 && a[0].is_array() {
                arr(name, &a[0])?.clone()
            } else {
                a.clone()
            };
            let nums = items
                .iter()
                .map(|x| int(name, x))
                .collect::<Result<Vec<_>, _>>()?;
            let r = if lname == "min" {
                nums.iter().min()
            } else {
                nums.iter().max()
            };
            r.map(|x| Value::from(*x)).ok_or_else(|| {
                format!("The template language function '{name}' requires at least one value.")
            })?
        }
        // Numbers.
        "add" | "sub" | "mul" | "div" | "mod" => {
            arity(name, n, 2, 2)?;
            let (x, y) = (int(name, &a[0])?, int(name, &a[1])?);
            if matches!(lname, "div" | "mod") && y == 0 {
                return Err(format!(
                    "The template language function '{name}' cannot divide by zero."
                ));
            }
            Value::from(
                match lname {
                    "add" => x.checked_add(y),
                    "sub" => x.checked_sub(y),
                    "mul" => x.checked_mul(y),
                    "div" => x.checked_div(y),
                    _ => x.checked_rem(y),
                }
                .ok_or_else(|| overflow(name))?,
            )
        }
        l if l.starts_with("list") => {
            if !matches!(cx.phase, Phase::Body | Phase::Output) {
                return Err(not_here(
                    name,
                    " The function can only be used in the properties of a resource or in outputs.",
                ));
            }
            return Err(format!(
                "The template function '{name}' is not supported by Keyless: list* functions (secrets of a deployed resource) are not served in templates. Please see https://aka.ms/arm-functions for usage details."
            ));
        }
        _ => return Err(unknown(name)),
    };
    Ok(v)
}

/// A subscription-level resource's id; a resource group's is `/subscriptions/{s}/resourceGroups/{name}`.
pub(crate) fn subscription_id_of(sub: &str, tail: &str) -> String {
    const RG: &str = "Microsoft.Resources/resourceGroups/";
    match tail.get(..RG.len()) {
        Some(head) if head.eq_ignore_ascii_case(RG) && !tail[RG.len()..].contains('/') => {
            format!("/subscriptions/{sub}/resourceGroups/{}", &tail[RG.len()..])
        }
        _ => format!("/subscriptions/{sub}/providers/{tail}"),
    }
}

fn all_strings<'v>(name: &str, a: &'v [Value]) -> Result<Vec<&'v str>, String> {
    a.iter().map(|x| s(name, x)).collect()
}

/// "Microsoft.X/a" – a namespace with a dot followed by at least one type segment.
fn is_type(x: &str) -> bool {
    let mut parts = x.split('/');
    let ns = parts.next().unwrap_or("");
    ns.contains('.') && parts.next().is_some_and(|t| !t.is_empty())
}

/// "Microsoft.X/a/b" + ["n1", "n2"] → "Microsoft.X/a/n1/b/n2" (names may themselves contain '/').
pub(crate) fn type_and_names(
    func: &str,
    full_type: &str,
    names: &[&str],
) -> Result<String, String> {
    let segs: Vec<&str> = full_type.split('/').collect();
    let names: Vec<&str> = names.iter().flat_map(|n| n.split('/')).collect();
    if segs.len() < 2 || names.len() != segs.len() - 1 {
        return Err(format!(
            "Unable to evaluate template language function '{func}': the type '{full_type}' requires '{}' resource name argument(s). Please see https://aka.ms/arm-resourceid for usage details.",
            segs.len().saturating_sub(1)
        ));
    }
    let mut out = segs[0].to_string();
    for (t, n) in segs[1..].iter().zip(names) {
        out.push('/');
        out.push_str(t);
        out.push('/');
        out.push_str(n);
    }
    Ok(out)
}

fn deep_merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        deep_merge(existing, v)
                    }
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// .NET composite formatting: `{0}`, `{1,5}`, `{0:D3}`, `{0:N0}`, `{0:X}`, `{{`, `}}`.
/// Alignments are at most [`MAX_PAD_WIDTH`], precisions at most [`MAX_PRECISION`]; the text is
/// checked against the meter's room as it grows.
fn format_dotnet(f: &str, args: &[Value], meter: &Meter) -> Result<String, String> {
    // The format string is not repeated: it may be a secure parameter's.
    let bad = || {
        "The template language function 'format' was given a format string that is not valid."
            .to_string()
    };
    let mut out = String::new();
    let mut it = f.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '{' if it.peek() == Some(&'{') => {
                it.next();
                out.push('{');
            }
            '}' if it.peek() == Some(&'}') => {
                it.next();
                out.push('}');
            }
            '}' => return Err(bad()),
            '{' => {
                let mut spec = String::new();
                loop {
                    match it.next() {
                        Some('}') => break,
                        Some(x) => spec.push(x),
                        None => return Err(bad()),
                    }
                }
                let (head, fmt) = match spec.split_once(':') {
                    Some((h, f)) => (h, Some(f)),
                    None => (spec.as_str(), None),
                };
                let (idx, align) = match head.split_once(',') {
                    Some((i, a)) => (i, Some(a.trim().parse::<i64>().map_err(|_| bad())?)),
                    None => (head, None),
                };
                let i: usize = idx.trim().parse().map_err(|_| bad())?;
                let v = args.get(i).ok_or_else(|| {
                    "The template language function 'format' was given an index that is greater than or equal to the number of arguments.".to_string()
                })?;
                if align.is_some_and(|w| w.unsigned_abs() > MAX_PAD_WIDTH as u64) {
                    return Err(format!("The template language function 'format' was given an alignment beyond the limit of '{MAX_PAD_WIDTH}'."));
                }
                let text = match (fmt, v.as_i64()) {
                    (Some(fs), Some(x)) => format_int(x, fs).ok_or_else(bad)?,
                    _ => to_text(v),
                };
                let width = align.map_or(0, |w| w.unsigned_abs() as usize);
                let pad = width.saturating_sub(text.chars().count());
                meter.room(out.len() + text.len() + pad)?;
                let spaces = std::iter::repeat_n(' ', pad);
                if align.is_some_and(|w| w > 0) {
                    out.extend(spaces);
                    out.push_str(&text);
                } else {
                    out.push_str(&text);
                    out.extend(spaces);
                }
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// A number in a .NET numeric format; None when the format is not valid (precision beyond
/// [`MAX_PRECISION`] included).
fn format_int(x: i64, f: &str) -> Option<String> {
    let mut chars = f.chars();
    let kind = chars.next()?;
    let rest: String = chars.collect();
    let prec: Option<usize> = if rest.is_empty() {
        None
    } else {
        rest.parse().ok()
    };
    if prec.is_some_and(|p| p > MAX_PRECISION) {
        return None;
    }
    if f.len() > MAX_PAD_WIDTH {
        return None;
    }
    if !rest.is_empty() && prec.is_none() {
        // Custom numeric format made of zeros ("000"): zero-padded width.
        if f.chars().all(|c| c == '0') {
            return Some(pad_digits(x, f.len()));
        }
        return None;
    }
    Some(match kind {
        'D' | 'd' => pad_digits(x, prec.unwrap_or(0)),
        'X' => format!("{:0w$X}", x, w = prec.unwrap_or(0)),
        'x' => format!("{:0w$x}", x, w = prec.unwrap_or(0)),
        'N' | 'n' => {
            let p = prec.unwrap_or(2);
            let digits = x.unsigned_abs().to_string();
            let mut grouped = String::new();
            for (i, ch) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i).is_multiple_of(3) {
                    grouped.push(',');
                }
                grouped.push(ch);
            }
            let sign = if x < 0 { "-" } else { "" };
            if p > 0 {
                format!("{sign}{grouped}.{}", "0".repeat(p))
            } else {
                format!("{sign}{grouped}")
            }
        }
        'F' | 'f' => {
            let p = prec.unwrap_or(2);
            if p > 0 {
                format!("{x}.{}", "0".repeat(p))
            } else {
                x.to_string()
            }
        }
        '0' => pad_digits(x, f.len()),
        _ => return None,
    })
}

fn pad_digits(x: i64, width: usize) -> String {
    let digits = format!("{:0w$}", x.unsigned_abs(), w = width);
    if x < 0 {
        format!("-{digits}")
    } else {
        digits
    }
}

/// utcNow's .NET date formats: the standard `u`, `s`, `o`, `d` and custom yyyy MM dd HH mm ss.
fn format_time(now: u64, f: &str) -> String {
    let days = (now / 86_400) as i64;
    let secs = now % 86_400;
    let (y, mo, d) = crate::clock::civil_from_days(days);
    let (h, mi, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let f = match f {
        "u" => "yyyy-MM-dd HH:mm:ssZ",
        "s" => "yyyy-MM-ddTHH:mm:ss",
        "o" | "O" => "yyyy-MM-ddTHH:mm:ss.fffffffZ",
        "d" => "M/d/yyyy",
        other => other,
    };
    let mut out = String::new();
    let b: Vec<char> = f.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let mut run = 1;
        while i + run < b.len() && b[i + run] == c {
            run += 1;
        }
        match c {
            'y' => out.push_str(&if run >= 4 {
                format!("{y:04}")
            } else {
                format!("{:02}", y % 100)
            }),
            'M' => out.push_str(&if run >= 2 {
                format!("{mo:02}")
            } else {
                mo.to_string()
            }),
            'd' => out.push_str(&if run >= 2 {
                format!("{d:02}")
            } else {
                d.to_string()
            }),
            'H' => out.push_str(&if run >= 2 {
                format!("{h:02}")
            } else {
                h.to_string()
            }),
            'm' => out.push_str(&if run >= 2 {
                format!("{mi:02}")
            } else {
                mi.to_string()
            }),
            's' => out.push_str(&if run >= 2 {
                format!("{s:02}")
            } else {
                s.to_string()
            }),
            'f' => out.push_str(&"0".repeat(run)),
            other => (0..run).for_each(|_| out.push(other)),
        }
        i += run;
    }
    out
}

/// reference()'s first argument: a resource id, or the name of a template resource.
fn resolve_reference(target: &str, cx: &Ctx) -> Result<String, String> {
    let names = cx.env.names;
    if target.starts_with('/') {
        let key = target.to_ascii_lowercase();
        return Ok(names
            .and_then(|n| n.by_id.get(&key))
            .cloned()
            .unwrap_or_else(|| target.to_string()));
    }
    names
        .and_then(|n| n.by_name.get(&target.to_ascii_lowercase()))
        .cloned()
        .ok_or_else(|| {
            format!("The template reference '{target}' is not valid: could not find template resource or resource copy with this name. Please see https://aka.ms/arm-function-reference for usage details.")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_function_is_served() {
        for name in KNOWN
            .iter()
            .chain(lambdas::NAMES)
            .chain(time::NAMES)
            .chain(values::NAMES)
        {
            let e = Expr::Call(name.to_string(), vec![]);
            assert_eq!(first_unknown(&e), None);
        }
        assert!(first_unknown(&Expr::Call("foo".into(), vec![])).is_some());
        assert_eq!(first_unknown(&Expr::Call("listKeys".into(), vec![])), None);
    }

    #[test]
    fn dotnet_format() {
        let a = [json!(7), json!("x"), json!(true), json!(1234567)];
        let m = Meter::default();
        let format_dotnet = |f: &str, a: &[Value]| format_dotnet(f, a, &m);
        assert_eq!(format_dotnet("{0:D3}-{1}-{2}", &a).unwrap(), "007-x-True");
        assert_eq!(format_dotnet("{{{0}}}", &a).unwrap(), "{7}");
        assert_eq!(format_dotnet("{3:N0}", &a).unwrap(), "1,234,567");
        assert_eq!(
            format_dotnet("{0:000}|{0,3}|{0,-3}|", &a).unwrap(),
            "007|  7|7  |"
        );
        assert_eq!(format_dotnet("{0:X2}", &[json!(255)]).unwrap(), "FF");
        assert!(format_dotnet("{4}", &a).is_err());
        assert!(format_dotnet("{0", &a).is_err());
    }

    #[test]
    fn time_formats() {
        // 2024-02-29T13:05:09Z
        let t = 1_709_211_909;
        assert_eq!(format_time(t, "yyyyMMddTHHmmssZ"), "20240229T130509Z");
        assert_eq!(format_time(t, "u"), "2024-02-29 13:05:09Z");
        assert_eq!(format_time(t, "d"), "2/29/2024");
    }

    #[test]
    fn resource_id_tails() {
        assert_eq!(
            type_and_names("resourceId", "Microsoft.X/a/b", &["n1", "n2"]).unwrap(),
            "Microsoft.X/a/n1/b/n2"
        );
        assert_eq!(
            type_and_names("resourceId", "Microsoft.X/a/b", &["n1/n2"]).unwrap(),
            "Microsoft.X/a/n1/b/n2"
        );
        let e = type_and_names("resourceId", "Microsoft.X/a/b", &["n1"]).unwrap_err();
        assert!(e.contains("requires '2' resource name argument(s)"), "{e}");
    }
}
