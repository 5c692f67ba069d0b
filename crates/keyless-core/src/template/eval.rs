//! Evaluation of JSON values and expressions in a context (what is visible where).
//!
//! Every evaluation runs under a [`Meter`] (one per `prepare()`, `body()` and `outputs()` call)
//! that bounds what one request can make the evaluator do:
//! - depth: function calls, member chains, JSON objects and arrays being evaluated and parameter or
//!   variable definitions being resolved nest at most [`MAX_DEPTH`] levels in all (so a 2 MiB
//!   thread stack suffices, debug builds included), and a chain of variables (or parameter
//!   defaults) each reading the next is at most [`MAX_CHAIN`] long;
//! - size: every value produced (literals, function results, the copies parameters() and
//!   variables() hand out, each JSON node at 32 bytes) and every expression parsed is charged
//!   against [`MAX_BYTES`]; functions whose result can outgrow their arguments check the room left
//!   before they allocate; no produced value nests deeper than [`MAX_VALUE_DEPTH`].
//!
//! Each limit fails with an `InvalidTemplate` expression error naming it.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use serde_json::{Map, Value};

use super::expr::{self, classify, Access, Expr, StrKind};
use super::{functions, References, Scope};

/// Nesting levels of evaluation: calls, member chains, JSON containers, definitions resolved.
pub(crate) const MAX_DEPTH: usize = 160;

/// Variables (or parameter defaults) being resolved at once, each reading the next.
pub(crate) const MAX_CHAIN: usize = 32;

/// Bytes charged per `prepare()`, `body()` or `outputs()` call.
pub(crate) const MAX_BYTES: usize = 16 << 20;

/// Nesting levels of a value a function or a parameter or variable reference produces.
pub(crate) const MAX_VALUE_DEPTH: usize = 64;

/// The charge of one JSON node (a value, an array element, an object member) besides its text.
const NODE: usize = 32;

/// The limits of one evaluation (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Meter {
    depth: Cell<usize>,
    spent: Cell<usize>,
}

/// One level of [`Meter`] depth, given back when dropped.
pub(crate) struct Level<'m>(&'m Meter);

impl Drop for Level<'_> {
    fn drop(&mut self) {
        self.0.depth.set(self.0.depth.get() - 1);
    }
}

impl Meter {
    /// One level deeper, or the error past [`MAX_DEPTH`].
    pub fn enter(&self) -> Result<Level<'_>, String> {
        let d = self.depth.get();
        if d >= MAX_DEPTH {
            return Err(format!(
                "The template is nested too deeply: its function calls, member accesses, objects, arrays and parameter or variable references exceed the limit of '{MAX_DEPTH}' levels. Please see https://aka.ms/arm-template-expressions for usage details."
            ));
        }
        self.depth.set(d + 1);
        Ok(Level(self))
    }

    /// Whether `bytes` more fit; nothing is charged.
    pub fn room(&self, bytes: usize) -> Result<(), String> {
        if self.spent.get().saturating_add(bytes) > MAX_BYTES {
            return Err(format!(
                "The template's evaluated values exceed the limit of '{MAX_BYTES}' bytes. Please see https://aka.ms/arm-template/#template-limits for usage details."
            ));
        }
        Ok(())
    }

    /// Charge `bytes`.
    pub fn charge(&self, bytes: usize) -> Result<(), String> {
        self.room(bytes)?;
        self.spent.set(self.spent.get() + bytes);
        Ok(())
    }

    /// Charge a produced value (its text and nodes); refuse one nested too deeply.
    pub fn charge_value(&self, v: &Value) -> Result<(), String> {
        let (bytes, depth) = weight(v);
        if depth > MAX_VALUE_DEPTH {
            return Err(format!(
                "The template language expression produced a value nested more than '{MAX_VALUE_DEPTH}' levels deep. Please see https://aka.ms/arm-template-expressions for usage details."
            ));
        }
        self.charge(bytes)
    }
}

/// A value's charge (text plus [`NODE`] per node) and nesting depth, without recursion.
pub(crate) fn weight(v: &Value) -> (usize, usize) {
    let mut bytes = 0usize;
    let mut deepest = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        bytes = bytes.saturating_add(NODE);
        match v {
            Value::String(s) => bytes = bytes.saturating_add(s.len()),
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            Value::Object(m) => {
                for (k, x) in m {
                    bytes = bytes.saturating_add(k.len());
                    stack.push((x, d + 1));
                }
            }
            _ => {}
        }
    }
    (bytes, deepest)
}

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
    /// The names whose evaluation read a secure value.
    pub tainted: RefCell<HashSet<String>>,
}

/// The names whose values are secure (lower-case): the secure parameters, and the variables
/// computed from one. Reading one marks the expression being evaluated (see [`Env::tainted`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Secure {
    pub params: HashSet<String>,
    pub vars: HashSet<String>,
}

/// An expression that read a secure value and failed: its message is not shown (it could
/// quote what it computed from the value).
pub(crate) const WITHHELD: &str = "An expression that uses a secure value failed; its message is withheld so as not to show the value.";

/// What an expression that read a secure value evaluates to where values are shown rather
/// than used ([`Env::mask`]: a what-if).
pub const SECURE_MASK: &str = "[secure value]";

impl<'a> Lazy<'a> {
    pub fn new(phase: Phase) -> Self {
        Lazy {
            defs: HashMap::new(),
            done: RefCell::new(HashMap::new()),
            active: RefCell::new(Vec::new()),
            phase,
            tainted: RefCell::new(HashSet::new()),
        }
    }

    /// Evaluate the definition of `name` (lower-case) once; false when there is none.
    pub fn resolve(&self, name: &str, env: &Env) -> Result<bool, String> {
        if self.done.borrow().contains_key(name) {
            return Ok(true);
        }
        let Some(def) = self.defs.get(name) else {
            return Ok(false);
        };
        let what = if self.phase == Phase::Default {
            "parameter"
        } else {
            "variable"
        };
        if self.active.borrow().iter().any(|a| a == name) {
            return Err(format!(
                "The template {what} '{name}' is not valid: circular reference detected. Please see https://aka.ms/arm-template-expressions for usage details."
            ));
        }
        if self.active.borrow().len() >= MAX_CHAIN {
            return Err(format!(
                "The template {what} '{name}' is not valid: it is reached through a chain of more than '{MAX_CHAIN}' {what}s each referencing the next. Please see https://aka.ms/arm-template-expressions for usage details."
            ));
        }
        let _level = env.meter.enter()?;
        self.active.borrow_mut().push(name.to_string());
        let cx = Ctx::new(env, self.phase);
        let (r, tainted) = env.watch_secure(|| match def {
            Def::Value(v) => eval_value(v, &cx),
            Def::Loop(entry) => eval_loop(entry, &cx, LoopKind::Variable, "input"),
        });
        if tainted {
            self.tainted.borrow_mut().insert(name.to_string());
        }
        self.active.borrow_mut().pop();
        let v = r?;
        self.done.borrow_mut().insert(name.to_string(), v);
        Ok(true)
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
    /// The limits of this evaluation.
    pub meter: &'a Meter,
    /// The template's hash (`deployment()`), computed once.
    pub template_hash: &'a OnceLock<String>,
    /// The secure names, where they are known.
    pub secure: Option<&'a Secure>,
    /// Whether the expression being evaluated has read a secure value.
    pub tainted: Cell<bool>,
    /// Show, rather than use: an expression that read a secure value evaluates to
    /// [`SECURE_MASK`].
    pub mask: bool,
}

impl Env<'_> {
    /// `f` of parameter (or variable, `vars`) `name`, read in place; None when not defined.
    pub fn lookup<R>(
        &self,
        vars: bool,
        name: &str,
        f: impl FnOnce(&Value) -> R,
    ) -> Result<Option<R>, String> {
        let key = name.to_ascii_lowercase();
        if let Some(sec) = self.secure {
            if (if vars { &sec.vars } else { &sec.params }).contains(&key) {
                self.tainted.set(true);
            }
        }
        match if vars { &self.vars } else { &self.params } {
            Src::Done(m) => Ok(m.get(&key).map(f)),
            Src::Lazy(l) => {
                if !l.resolve(&key, self)? {
                    return Ok(None);
                }
                if l.tainted.borrow().contains(&key) {
                    self.tainted.set(true);
                }
                Ok(l.done.borrow().get(&key).map(f))
            }
            Src::Empty => Ok(None),
        }
    }

    /// `f`'s result and whether it read a secure value (on its own: what was read before it
    /// stays marked for the enclosing evaluation, and so does what `f` read).
    pub fn watch_secure<T>(&self, f: impl FnOnce() -> T) -> (T, bool) {
        let outer = self.tainted.replace(false);
        let r = f();
        let read = self.tainted.get();
        self.tainted.set(outer || read);
        (r, read)
    }

    pub fn param(&self, name: &str) -> Result<Option<Value>, String> {
        self.lookup(false, name, Value::clone)
    }

    pub fn var(&self, name: &str) -> Result<Option<Value>, String> {
        self.lookup(true, name, Value::clone)
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
    /// The variables of the lambdas being evaluated (`lambdaVariables('x')`), innermost last.
    pub lambda: Vec<(String, Value)>,
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
            lambda: Vec::new(),
        }
    }

    /// This context with lambda variables `vars` bound (a lambda's body).
    pub fn with_lambda(&self, vars: impl IntoIterator<Item = (String, Value)>) -> Ctx<'a> {
        let mut lambda = self.lambda.clone();
        lambda.extend(vars);
        Ctx {
            env: self.env,
            phase: self.phase,
            bindings: self.bindings.clone(),
            refs: self.refs,
            validate: self.validate,
            lambda,
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
            lambda: self.lambda.clone(),
        }
    }
}

/// Evaluate a JSON value: expression strings, property names, property-level `copy`.
pub(crate) fn eval_value(v: &Value, cx: &Ctx) -> Result<Value, String> {
    match v {
        Value::String(s) => eval_string(s, cx),
        Value::Array(a) => {
            let _level = cx.env.meter.enter()?;
            cx.env.meter.charge(NODE)?;
            // A plain loop: in debug builds every iterator adapter is a frame of its own.
            let mut out = Vec::with_capacity(a.len());
            for x in a {
                out.push(eval_value(x, cx)?);
            }
            Ok(Value::Array(out))
        }
        Value::Object(m) => {
            let _level = cx.env.meter.enter()?;
            eval_object(m, cx)
        }
        other => {
            cx.env.meter.charge(NODE)?;
            Ok(other.clone())
        }
    }
}

#[inline(never)]
fn eval_object(m: &Map<String, Value>, cx: &Ctx) -> Result<Value, String> {
    cx.env.meter.charge(NODE)?;
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
            other => return Err(key_type(k, &other)),
        };
        out.insert(key, eval_value(x, cx)?);
    }
    Ok(Value::Object(out))
}

fn key_type(k: &str, v: &Value) -> String {
    format!(
        "The template property name '{k}' must evaluate to a string. The provided value is of type '{}'.",
        functions::jtype(v)
    )
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
    let (c, secure) = cx.env.watch_secure(|| eval_value(v, cx));
    let c = c?;
    if cx.validate && c.is_null() {
        return Ok(0);
    }
    match c.as_i64() {
        Some(n) if (0..=800).contains(&n) => Ok(n as usize),
        // a count computed from a secure value is not quoted
        Some(_) if secure => Err("The copy count must be a non-negative integer value and cannot exceed '800'. Please see https://aka.ms/arm-copy for usage details.".into()),
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
        StrKind::Literal(l) => {
            cx.env.meter.charge(NODE + l.len())?;
            Ok(Value::String(l.into_owned()))
        }
        StrKind::Expression(e) => {
            cx.env.meter.charge(e.len())?;
            let parsed = expr::parse(e)?;
            if cx.validate {
                if let Some(err) = functions::first_unknown(&parsed) {
                    return Err(err);
                }
            }
            // whether this expression reads a secure value, on its own
            let (r, tainted) = cx.env.watch_secure(|| match eval_expr(&parsed, cx) {
                Err(e) if cx.validate && e == DEFER => Ok(Value::Null),
                r => r,
            });
            if !tainted {
                return r;
            }
            match r {
                Ok(_) if cx.env.mask => Ok(Value::String(SECURE_MASK.into())),
                Err(e) if e != DEFER => Err(WITHHELD.into()),
                r => r,
            }
        }
    }
}

pub(crate) fn eval_expr(e: &Expr, cx: &Ctx) -> Result<Value, String> {
    let meter = cx.env.meter;
    match e {
        Expr::Str(s) => {
            meter.charge(NODE + s.len())?;
            Ok(Value::String(s.clone()))
        }
        Expr::Int(i) => {
            meter.charge(NODE)?;
            Ok(Value::from(*i))
        }
        Expr::Call(name, args) => {
            let _level = meter.enter()?;
            functions::call(name, args, cx)
        }
        Expr::Member(base, path) => {
            let _level = meter.enter()?;
            eval_member(base, path, cx)
        }
    }
}

/// `base.a[i]…`; parameters('p').a.b and variables('v').a.b are read in place: only what is
/// reached is copied.
#[inline(never)]
fn eval_member(base: &Expr, path: &[Access], cx: &Ctx) -> Result<Value, String> {
    let v = match base {
        Expr::Call(name, args) if functions::is_lookup(name) => {
            let mut a = Vec::with_capacity(args.len());
            for x in args {
                a.push(eval_expr(x, cx)?);
            }
            let keys = keys(path, cx)?;
            functions::lookup(name, &a, cx, |v| walk(v, &keys).cloned())??
        }
        _ => {
            let b = eval_expr(base, cx)?;
            let keys = keys(path, cx)?;
            walk(&b, &keys)?.clone()
        }
    };
    cx.env.meter.charge_value(&v)?;
    Ok(v)
}

/// One evaluated step of a member chain.
enum Key<'e> {
    /// `.name` as written.
    Name(&'e str),
    /// `['name']` computed: a value, never quoted in errors.
    Computed(String),
    Position(i64),
}

fn keys<'e>(path: &'e [Access], cx: &Ctx) -> Result<Vec<Key<'e>>, String> {
    let mut out = Vec::with_capacity(path.len());
    for a in path {
        out.push(match a {
            Access::Prop(p) | Access::Index(Expr::Str(p)) => Key::Name(p),
            Access::Index(e) => match eval_expr(e, cx)? {
                Value::String(p) => Key::Computed(p),
                Value::Number(n) if n.is_i64() => Key::Position(n.as_i64().unwrap_or(-1)),
                other => return Err(index_type(&other)),
            },
        });
    }
    Ok(out)
}

fn index_type(v: &Value) -> String {
    format!(
        "The language expression index must be an integer or a string. The provided value is of type '{}'.",
        functions::jtype(v)
    )
}

/// Follow `keys` from `v`.
fn walk<'v>(mut v: &'v Value, keys: &[Key]) -> Result<&'v Value, String> {
    for k in keys {
        v = match k {
            Key::Name(p) => member(v, p, true)?,
            Key::Computed(p) => member(v, p, false)?,
            Key::Position(i) => match v {
                Value::Array(a) => usize::try_from(*i)
                    .ok()
                    .and_then(|i| a.get(i))
                    .ok_or_else(|| {
                        format!("The language expression property array index '{i}' is out of bounds.")
                    })?,
                other => {
                    return Err(format!(
                        "The language expression property array index '{i}' cannot be applied to a value of type '{}'.",
                        functions::jtype(other)
                    ))
                }
            },
        };
    }
    Ok(v)
}

/// `x.prop`: exact name first, then case-insensitive (ARM's lookups are case-insensitive).
/// A computed name (`quote` false) may be a secure value: it is not repeated in the error.
fn member<'v>(b: &'v Value, prop: &str, quote: bool) -> Result<&'v Value, String> {
    let shown = if quote {
        format!(" '{prop}'")
    } else {
        String::new()
    };
    match b {
        Value::Object(m) => {
            if let Some(v) = m.get(prop) {
                return Ok(v);
            }
            if let Some((_, v)) = m.iter().find(|(k, _)| k.eq_ignore_ascii_case(prop)) {
                return Ok(v);
            }
            let keys: Vec<&str> = m.keys().map(String::as_str).collect();
            Err(format!(
                "The language expression property{shown} doesn't exist, available properties are '{}'.",
                keys.join(", ")
            ))
        }
        other => Err(format!(
            "The language expression property{shown} can't be evaluated, property name must be a string and the value must be an object. The value is of type '{}'.",
            functions::jtype(other)
        )),
    }
}
