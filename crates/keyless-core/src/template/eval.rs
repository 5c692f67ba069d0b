//! Evaluation of JSON values and expressions in a context (what is visible where).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use serde_json::{Map, Value};

use super::expr::{self, classify, Expr, StrKind};
use super::{functions, References, Scope};

/// Where an expression sits; decides which functions it may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A parameter's `defaultValue`: parameters(), utcNow(), newGuid(); no variables().
    Default,
    /// A variable's value.
    Variables,
    /// A resource's name, type, condition, copy count, dependsOn (no reference()).
    Static,
    /// A resource's body: reference() and list*() allowed.
    Body,
    /// Outputs.
    Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoopKind {
    Resource,
    Property,
    Variable,
    Output,
}

/// One copy-loop iteration in scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Binding {
    pub name: String,
    pub index: usize,
    pub kind: LoopKind,
}

/// A value definition evaluated on first use (parameter defaults, variables).
pub(crate) enum Def<'a> {
    Value(&'a Value),
    /// A variable `copy` entry: {name, count, input}.
    Loop(&'a Value),
}

pub(crate) struct Lazy<'a> {
    pub defs: HashMap<String, Def<'a>>,
    pub done: RefCell<HashMap<String, Value>>,
    pub active: RefCell<Vec<String>>,
    pub phase: Phase,
}

impl<'a> Lazy<'a> {
    pub fn new(phase: Phase) -> Self {
        Lazy {
            defs: HashMap::new(),
            done: RefCell::new(HashMap::new()),
            active: RefCell::new(Vec::new()),
            phase,
        }
    }

    /// The value of `name` (lower-case), evaluating its definition once.
    pub fn get(&self, name: &str, env: &Env) -> Result<Option<Value>, String> {
        if let Some(v) = self.done.borrow().get(name) {
            return Ok(Some(v.clone()));
        }
        let Some(def) = self.defs.get(name) else {
            return Ok(None);
        };
        if self.active.borrow().iter().any(|a| a == name) {
            let what = if self.phase == Phase::Default {
                "parameter"
            } else {
                "variable"
            };
            return Err(format!(
                "The template {what} '{name}' is not valid: circular reference detected. Please see https://aka.ms/arm-template-expressions for usage details."
            ));
        }
        self.active.borrow_mut().push(name.to_string());
        let cx = Ctx::new(env, self.phase);
        let r = match def {
            Def::Value(v) => eval_value(v, &cx),
            Def::Loop(entry) => eval_loop(entry, &cx, LoopKind::Variable, "input"),
        };
        self.active.borrow_mut().pop();
        let v = r?;
        self.done.borrow_mut().insert(name.to_string(), v.clone());
        Ok(Some(v))
    }
}

pub(crate) enum Src<'a> {
    Done(&'a HashMap<String, Value>),
    Lazy(&'a Lazy<'a>),
    Empty,
}

/// The template resources `reference()` can name: lower-case full name / id → id.
#[derive(Debug, Clone, Default)]
pub(crate) struct Names {
    pub by_name: HashMap<String, String>,
    pub by_id: HashMap<String, String>,
}

/// Everything an expression can see.
pub(crate) struct Env<'a> {
    pub scope: &'a Scope,
    pub template: &'a Value,
    pub params: Src<'a>,
    pub vars: Src<'a>,
    pub names: Option<&'a Names>,
    pub now: u64,
    pub guid_seed: u128,
    pub guid_counter: Cell<u64>,
}

impl Env<'_> {
    pub fn param(&self, name: &str) -> Result<Option<Value>, String> {
        let key = name.to_ascii_lowercase();
        match &self.params {
            Src::Done(m) => Ok(m.get(&key).cloned()),
            Src::Lazy(l) => l.get(&key, self),
            Src::Empty => Ok(None),
        }
    }

    pub fn var(&self, name: &str) -> Result<Option<Value>, String> {
        let key = name.to_ascii_lowercase();
        match &self.vars {
            Src::Done(m) => Ok(m.get(&key).cloned()),
            Src::Lazy(l) => l.get(&key, self),
            Src::Empty => Ok(None),
        }
    }
}

/// The context of one evaluation.
pub(crate) struct Ctx<'a> {
    pub env: &'a Env<'a>,
    pub phase: Phase,
    pub bindings: Vec<Binding>,
    pub refs: Option<&'a dyn References>,
    /// Validation before deployment: an expression that needs reference() evaluates to null.
    pub validate: bool,
}

/// reference() during validation: not an error, the value is not known yet.
pub(crate) const DEFER: &str = "\u{0}deferred";

impl<'a> Ctx<'a> {
    pub fn new(env: &'a Env<'a>, phase: Phase) -> Self {
        Ctx {
            env,
            phase,
            bindings: Vec::new(),
            refs: None,
            validate: false,
        }
    }

    fn with(&self, b: Binding) -> Ctx<'a> {
        let mut bindings = self.bindings.clone();
        bindings.push(b);
        Ctx {
            env: self.env,
            phase: self.phase,
            bindings,
            refs: self.refs,
            validate: self.validate,
        }
    }
}

/// Evaluate a JSON value: expression strings, property names, property-level `copy`.
pub(crate) fn eval_value(v: &Value, cx: &Ctx) -> Result<Value, String> {
    match v {
        Value::String(s) => eval_string(s, cx),
        Value::Array(a) => a
            .iter()
            .map(|x| eval_value(x, cx))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                if k.eq_ignore_ascii_case("copy") {
                    if let Some(loops) = property_loops(x) {
                        for l in loops {
                            let name = loop_name(l, cx)?;
                            let arr = eval_loop(l, cx, LoopKind::Property, "input")?;
                            out.insert(name, arr);
                        }
                        continue;
                    }
                }
                let key = match eval_string(k, cx)? {
                    Value::String(s) => s,
                    other => {
                        return Err(format!(
                            "The template property name '{k}' must evaluate to a string. The provided value is of type '{}'.",
                            functions::jtype(&other)
                        ))
                    }
                };
                out.insert(key, eval_value(x, cx)?);
            }
            Ok(Value::Object(out))
        }
        other => Ok(other.clone()),
    }
}

/// A property-level `copy`: an array of {name, count, input}.
fn property_loops(v: &Value) -> Option<&Vec<Value>> {
    let a = v.as_array()?;
    let all = !a.is_empty()
        && a.iter().all(|l| {
            l.as_object().is_some_and(|o| {
                o.contains_key("name") && o.contains_key("count") && o.contains_key("input")
            })
        });
    all.then_some(a)
}

fn loop_name(l: &Value, cx: &Ctx) -> Result<String, String> {
    match eval_value(&l["name"], cx)? {
        Value::String(s) if !s.is_empty() => Ok(s),
        _ => Err("The copy name must be a non-empty string. Please see https://aka.ms/arm-copy for usage details.".into()),
    }
}

/// Evaluate a copy count; ARM's limits (0..=800).
pub(crate) fn eval_count(v: &Value, cx: &Ctx) -> Result<usize, String> {
    let c = eval_value(v, cx)?;
    if cx.validate && c.is_null() {
        return Ok(0);
    }
    match c.as_i64() {
        Some(n) if (0..=800).contains(&n) => Ok(n as usize),
        Some(n) => Err(format!(
            "The copy count must be a non-negative integer value and cannot exceed '800'. The provided value is '{n}'. Please see https://aka.ms/arm-copy for usage details."
        )),
        None => Err(format!(
            "The copy count must be an integer. The provided value is of type '{}'. Please see https://aka.ms/arm-copy for usage details.",
            functions::jtype(&c)
        )),
    }
}

/// A {name?, count, input} loop evaluated into an array, `copyIndex(name)` bound.
pub(crate) fn eval_loop(l: &Value, cx: &Ctx, kind: LoopKind, input: &str) -> Result<Value, String> {
    let name = match l.get("name") {
        Some(_) => loop_name(l, cx)?,
        None => String::new(),
    };
    let count = eval_count(l.get("count").unwrap_or(&Value::Null), cx)?;
    let input = l.get(input).unwrap_or(&Value::Null);
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let inner = cx.with(Binding {
            name: name.clone(),
            index: i,
            kind,
        });
        out.push(eval_value(input, &inner)?);
    }
    Ok(Value::Array(out))
}

/// A JSON string: literal, `[[`-escaped literal, or expression.
pub(crate) fn eval_string(s: &str, cx: &Ctx) -> Result<Value, String> {
    match classify(s) {
        StrKind::Literal(l) => Ok(Value::String(l.into_owned())),
        StrKind::Expression(e) => {
            let parsed = expr::parse(e)?;
            if cx.validate {
                if let Some(err) = functions::first_unknown(&parsed) {
                    return Err(err);
                }
            }
            match eval_expr(&parsed, cx) {
                Err(e) if cx.validate && e == DEFER => Ok(Value::Null),
                r => r,
            }
        }
    }
}

pub(crate) fn eval_expr(e: &Expr, cx: &Ctx) -> Result<Value, String> {
    match e {
        Expr::Str(s) => Ok(Value::String(s.clone())),
        Expr::Int(i) => Ok(Value::from(*i)),
        Expr::Call(name, args) => functions::call(name, args, cx),
        Expr::Prop(base, prop) => {
            let b = eval_expr(base, cx)?;
            member(&b, prop)
        }
        Expr::Index(base, idx) => {
            let b = eval_expr(base, cx)?;
            match eval_expr(idx, cx)? {
                Value::String(p) => member(&b, &p),
                Value::Number(n) if n.is_i64() => {
                    let i = n.as_i64().unwrap_or(-1);
                    match &b {
                        Value::Array(a) => usize::try_from(i)
                            .ok()
                            .and_then(|i| a.get(i))
                            .cloned()
                            .ok_or_else(|| {
                                format!("The language expression property array index '{i}' is out of bounds.")
                            }),
                        other => Err(format!(
                            "The language expression property array index '{i}' cannot be applied to a value of type '{}'.",
                            functions::jtype(other)
                        )),
                    }
                }
                other => Err(format!(
                    "The language expression index must be an integer or a string. The provided value is of type '{}'.",
                    functions::jtype(&other)
                )),
            }
        }
    }
}

/// `x.prop`: exact name first, then case-insensitive (ARM's lookups are case-insensitive).
fn member(b: &Value, prop: &str) -> Result<Value, String> {
    match b {
        Value::Object(m) => {
            if let Some(v) = m.get(prop) {
                return Ok(v.clone());
            }
            if let Some((_, v)) = m.iter().find(|(k, _)| k.eq_ignore_ascii_case(prop)) {
                return Ok(v.clone());
            }
            let keys: Vec<&str> = m.keys().map(String::as_str).collect();
            Err(format!(
                "The language expression property '{prop}' doesn't exist, available properties are '{}'.",
                keys.join(", ")
            ))
        }
        other => Err(format!(
            "The language expression property '{prop}' can't be evaluated, property name must be a string and the value must be an object. The value is of type '{}'.",
            functions::jtype(other)
        )),
    }
}
