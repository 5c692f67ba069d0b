//! The functions that take lambdas — `filter`, `map`, `reduce`, `sort`, `toObject`,
//! `mapValues`, `groupBy` — and `lambdaVariables`. A lambda is `lambda('x'[, 'y'…], <body>)`,
//! written only as such a function's argument; its body is evaluated once per item, with its
//! variables bound to the item (and, where ARM gives one, the index or the accumulator), and
//! read with `lambdaVariables('x')` (an inner lambda's variables hide an outer one's of the same
//! name). Every evaluation is charged to the evaluation's budget like any other.

use super::{arity, boolean, not_here, to_text, wrong_type};
use crate::template::eval::{eval_expr, Ctx};
use crate::template::expr::Expr;
use serde_json::{Map, Value};

/// A lambda argument: its variables and its body.
struct Lambda<'e> {
    vars: Vec<String>,
    body: &'e Expr,
}

impl Lambda<'_> {
    /// The body with the variables bound to `values` (extra values are dropped: a lambda may
    /// leave out an optional index).
    fn apply(&self, cx: &Ctx, values: Vec<Value>) -> Result<Value, String> {
        // the variables in scope are copied into the body's context: charged as any copy
        for (_, v) in &cx.lambda {
            cx.env.meter.charge_value(v)?;
        }
        let cx = cx.with_lambda(self.vars.iter().cloned().zip(values));
        eval_expr(self.body, &cx)
    }
}

/// `e` as the lambda argument of `fname`, with `min`..=`max` variables.
fn lambda<'e>(fname: &str, e: &'e Expr, min: usize, max: usize) -> Result<Lambda<'e>, String> {
    let Expr::Call(n, args) = e else {
        return Err(format!("The template language function '{fname}' expects a lambda function ('lambda(…)') as its argument. Please see https://aka.ms/arm-template-lambda for usage details."));
    };
    if !n.eq_ignore_ascii_case("lambda") {
        return Err(format!("The template language function '{fname}' expects a lambda function ('lambda(…)') as its argument. Please see https://aka.ms/arm-template-lambda for usage details."));
    }
    arity(n, args.len(), 2, usize::MAX)?;
    let (vars, body) = args.split_at(args.len() - 1);
    let mut names = Vec::with_capacity(vars.len());
    for v in vars {
        match v {
            Expr::Str(s) if !s.is_empty() => names.push(s.clone()),
            _ => return Err(format!("The variables of a lambda function must be non-empty string literals ('{fname}'). Please see https://aka.ms/arm-template-lambda for usage details.")),
        }
    }
    if names.len() < min || names.len() > max {
        let want = if min == max {
            min.to_string()
        } else {
            format!("{min} to {max}")
        };
        return Err(format!("The lambda function of the template language function '{fname}' must take {want} variable(s) while {} were provided. Please see https://aka.ms/arm-template-lambda for usage details.", names.len()));
    }
    Ok(Lambda {
        vars: names,
        body: &body[0],
    })
}

/// The functions here (lower-case).
pub(super) const NAMES: &[&str] = &[
    "lambda",
    "lambdavariables",
    "filter",
    "map",
    "reduce",
    "sort",
    "toobject",
    "mapvalues",
    "groupby",
];

/// The functions here, if `name` is one.
pub(super) fn call(name: &str, args: &[Expr], cx: &Ctx) -> Option<Result<Value, String>> {
    let r = match name.to_ascii_lowercase().as_str() {
        "lambdavariables" => variables(name, args, cx),
        "lambda" => Err(not_here(
            name,
            " A lambda function is an argument of filter, map, reduce, sort, toObject, mapValues or groupBy.",
        )),
        "filter" => filter(name, args, cx),
        "map" => map(name, args, cx),
        "reduce" => reduce(name, args, cx),
        "sort" => sort(name, args, cx),
        "toobject" => to_object(name, args, cx),
        "mapvalues" => map_values(name, args, cx),
        "groupby" => group_by(name, args, cx),
        _ => return None,
    };
    // what a lambda function builds is charged like any function's result
    Some(r.and_then(|v| {
        cx.env.meter.charge_value(&v)?;
        Ok(v)
    }))
}

fn array_arg(name: &str, e: &Expr, cx: &Ctx) -> Result<Vec<Value>, String> {
    match eval_expr(e, cx)? {
        Value::Array(a) => Ok(a),
        other => Err(wrong_type(name, "Array", &other)),
    }
}

fn variables(name: &str, args: &[Expr], cx: &Ctx) -> Result<Value, String> {
    arity(name, args.len(), 1, 1)?;
    let v = eval_expr(&args[0], cx)?;
    let key = v.as_str().ok_or_else(|| wrong_type(name, "String", &v))?;
    cx.lambda
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| format!("The lambda variable '{key}' is not found: 'lambdaVariables' reads a variable of a lambda function it is inside. Please see https://aka.ms/arm-template-lambda for usage details."))
}

fn filter(name: &str, args: &[Expr], cx: &Ctx) -> Result<Value, String> {
    arity(name, args.len(), 2, 2)?;
    let items = array_arg(name, &args[0], cx)?;
    let f = lambda(name, &args[1], 1, 2)?;
    let mut out = Vec::new();
    for (i, x) in items.into_iter().enumerate() {
        let keep = f.apply(cx, vec![x.clone(), Value::from(i as u64)])?;
        if boolean(name, &keep)? {
            out.push(x);
        }
    }
    Ok(Value::Array(out))
}

fn map(name: &str, args: &[Expr], cx: &Ctx) -> Result<Value, String> {
    arity(name, args.len(), 2, 2)?;
    let items = array_arg(name, &args[0], cx)?;
    let f = lambda(name, &args[1], 1, 2)?;
    let mut out = Vec::with_capacity(items.len());
    for (i, x) in items.into_iter().enumerate() {
        out.push(f.apply(cx, vec![x, Value::from(i as u64)])?);
    }
    Ok(Value::Array(out))
}

fn reduce(name: &str, args: &[Expr], cx: &Ctx) -> Result<Value, String> {
    arity(name, args.len(), 3, 3)?;
    let items = array_arg(name, &args[0], cx)?;
    let mut acc = eval_expr(&args[1], cx)?;
    let f = lambda(name, &args[2], 2, 3)?;
    for (i, x) in items.into_iter().enumerate() {
        acc = f.apply(cx, vec![acc, x, Value::from(i as u64)])?;
    }
    Ok(acc)
}

/// `sort(array, lambda('a', 'b', <a before b>))`: stable. A merge sort of its own: the lambda is
/// the template author's, and need not be a consistent order (the standard library's sort may
/// panic on one that is not).
fn sort(name: &str, args: &[Expr], cx: &Ctx) -> Result<Value, String> {
    arity(name, args.len(), 2, 2)?;
    let items = array_arg(name, &args[0], cx)?;
    let f = lambda(name, &args[1], 2, 2)?;
    let before = |a: &Value, b: &Value| -> Result<bool, String> {
        boolean(name, &f.apply(cx, vec![a.clone(), b.clone()])?)
    };
    Ok(Value::Array(merge_sort(items, &before)?))
}

fn merge_sort(
    mut v: Vec<Value>,
    before: &dyn Fn(&Value, &Value) -> Result<bool, String>,
) -> Result<Vec<Value>, String> {
    if v.len() < 2 {
        return Ok(v);
    }
    let right = v.split_off(v.len() / 2);
    let (left, right) = (merge_sort(v, before)?, merge_sort(right, before)?);
    let mut out = Vec::with_capacity(left.len() + right.len());
    let (mut l, mut r) = (left.into_iter().peekable(), right.into_iter().peekable());
    while let (Some(a), Some(b)) = (l.peek(), r.peek()) {
        // take from the right only when it comes strictly before: stable
        if before(b, a)? {
            out.extend(r.next());
        } else {
            out.extend(l.next());
        }
    }
    out.extend(l);
    out.extend(r);
    Ok(out)
}

/// An object's key from a lambda's result.
fn key(name: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(_) | Value::Bool(_) => Ok(to_text(v)),
        other => Err(wrong_type(name, "String", other)),
    }
}

fn to_object(name: &str, args: &[Expr], cx: &Ctx) -> Result<Value, String> {
    arity(name, args.len(), 2, 3)?;
    let items = array_arg(name, &args[0], cx)?;
    let k = lambda(name, &args[1], 1, 1)?;
    let v = args.get(2).map(|e| lambda(name, e, 1, 1)).transpose()?;
    let mut out = Map::new();
    for x in items {
        let name_of = key(name, &k.apply(cx, vec![x.clone()])?)?;
        let value = match &v {
            Some(v) => v.apply(cx, vec![x])?,
            None => x,
        };
        out.insert(name_of, value);
    }
    Ok(Value::Object(out))
}

fn map_values(name: &str, args: &[Expr], cx: &Ctx) -> Result<Value, String> {
    arity(name, args.len(), 2, 2)?;
    let o = match eval_expr(&args[0], cx)? {
        Value::Object(o) => o,
        other => return Err(wrong_type(name, "Object", &other)),
    };
    let f = lambda(name, &args[1], 1, 1)?;
    let mut out = Map::new();
    for (k, v) in o {
        out.insert(k, f.apply(cx, vec![v])?);
    }
    Ok(Value::Object(out))
}

fn group_by(name: &str, args: &[Expr], cx: &Ctx) -> Result<Value, String> {
    arity(name, args.len(), 2, 2)?;
    let items = array_arg(name, &args[0], cx)?;
    let f = lambda(name, &args[1], 1, 1)?;
    let mut out = Map::new();
    for x in items {
        let k = key(name, &f.apply(cx, vec![x.clone()])?)?;
        if let Value::Array(a) = out.entry(k).or_insert_with(|| Value::Array(Vec::new())) {
            a.push(x);
        }
    }
    Ok(Value::Object(out))
}
