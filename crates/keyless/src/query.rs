//! `--query`: the JMESPath subset az scripts use — `a.b`, `a[0]`, `a[-1]`, `a[*].b` and
//! `a[].b` projections, `[a, b.c]` multi-select lists, `"quoted"` identifiers. Like az (whose
//! models flatten ARM's `properties`), a resource's `properties` fields are also reachable at
//! its top level: `--query clientId`, `--query nodeResourceGroup`.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(i64),
    /// `[*]` (false) or `[]` (true: flatten one level first): the rest applies to each element.
    Project(bool),
    MultiList(Vec<Vec<Step>>),
}

/// A parsed `--query` expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Query(Vec<Step>);

impl Query {
    pub fn parse(expr: &str) -> Result<Query, String> {
        let chars: Vec<char> = expr.trim().chars().collect();
        let (steps, end) = parse_path(&chars, 0)?;
        if end != chars.len() {
            return Err(format!("unsupported --query expression '{expr}'"));
        }
        if steps.is_empty() {
            return Err("empty --query expression".into());
        }
        Ok(Query(steps))
    }

    pub fn apply(&self, v: &Value) -> Value {
        eval(&self.0, &flatten(v))
    }
}

/// `properties` fields lifted to the top of a resource (and of each resource of a list),
/// without replacing a top-level field of the same name.
fn flatten(v: &Value) -> Value {
    match v {
        Value::Array(a) => Value::Array(a.iter().map(flatten_one).collect()),
        Value::Object(m) if m.get("value").is_some_and(Value::is_array) && m.len() == 1 => {
            flatten(&m["value"])
        }
        _ => flatten_one(v),
    }
}

fn flatten_one(v: &Value) -> Value {
    let mut out = v.clone();
    if let (Some(o), Some(p)) = (
        out.as_object_mut(),
        v.get("properties").and_then(Value::as_object),
    ) {
        for (k, x) in p {
            o.entry(k.clone()).or_insert_with(|| x.clone());
        }
    }
    out
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Parse a path from `i` until a `,` or `]` at this level, or the end.
fn parse_path(c: &[char], mut i: usize) -> Result<(Vec<Step>, usize), String> {
    let mut steps = vec![];
    let bad = |i: usize| format!("unsupported --query expression at position {i}");
    while i < c.len() {
        match c[i] {
            ' ' => i += 1,
            '.' if !steps.is_empty() => i += 1,
            ',' | ']' => break,
            '"' => {
                let end = c[i + 1..]
                    .iter()
                    .position(|&x| x == '"')
                    .ok_or_else(|| bad(i))?;
                steps.push(Step::Field(c[i + 1..i + 1 + end].iter().collect()));
                i += end + 2;
            }
            x if ident_char(x) => {
                let start = i;
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
                steps.push(Step::Field(c[start..i].iter().collect()));
            }
            '[' => {
                let inner: String = c[i + 1..].iter().take_while(|&&x| x != ']').collect();
                let trimmed = inner.trim();
                if trimmed.is_empty() || trimmed == "*" {
                    steps.push(Step::Project(trimmed.is_empty()));
                    i += inner.chars().count() + 2;
                } else if let Ok(n) = trimmed.parse::<i64>() {
                    steps.push(Step::Index(n));
                    i += inner.chars().count() + 2;
                } else {
                    // a multi-select list: [expr, expr, ...]
                    let mut items = vec![];
                    i += 1;
                    loop {
                        let (p, next) = parse_path(c, i)?;
                        if p.is_empty() {
                            return Err(bad(next));
                        }
                        items.push(p);
                        i = next;
                        match c.get(i) {
                            Some(',') => i += 1,
                            Some(']') => {
                                i += 1;
                                break;
                            }
                            _ => return Err(bad(i)),
                        }
                    }
                    steps.push(Step::MultiList(items));
                }
            }
            _ => return Err(bad(i)),
        }
    }
    Ok((steps, i))
}

fn eval(steps: &[Step], v: &Value) -> Value {
    let Some((first, rest)) = steps.split_first() else {
        return v.clone();
    };
    match first {
        Step::Field(f) => match v.get(f) {
            Some(x) => eval(rest, x),
            None => Value::Null,
        },
        Step::Index(n) => {
            let Some(a) = v.as_array() else {
                return Value::Null;
            };
            let idx = if *n < 0 { a.len() as i64 + n } else { *n };
            match usize::try_from(idx).ok().and_then(|i| a.get(i)) {
                Some(x) => eval(rest, x),
                None => Value::Null,
            }
        }
        Step::Project(flatten) => {
            let Some(a) = v.as_array() else {
                return Value::Null;
            };
            let items: Vec<Value> = if *flatten {
                a.iter()
                    .flat_map(|x| match x {
                        Value::Array(inner) => inner.clone(),
                        other => vec![other.clone()],
                    })
                    .collect()
            } else {
                a.clone()
            };
            Value::Array(
                items
                    .iter()
                    .map(|x| eval(rest, x))
                    .filter(|x| !x.is_null())
                    .collect(),
            )
        }
        Step::MultiList(items) => {
            if v.is_null() {
                return Value::Null;
            }
            let out = Value::Array(items.iter().map(|p| eval(p, v)).collect());
            eval(rest, &out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(expr: &str, v: &Value) -> Value {
        Query::parse(expr).unwrap().apply(v)
    }

    #[test]
    fn paths_indexes_projections_and_lists() {
        let v = json!({"id": "/x", "properties": {"nodeResourceGroup": "MC_g_c_l",
            "agentPoolProfiles": [{"name": "a", "count": 1}, {"name": "b", "count": 2}]},
            "clientId": "c"});
        assert_eq!(q("properties.nodeResourceGroup", &v), "MC_g_c_l");
        assert_eq!(q("\"id\"", &v), "/x");
        assert_eq!(q("properties.agentPoolProfiles[0].name", &v), "a");
        assert_eq!(q("properties.agentPoolProfiles[-1].count", &v), 2);
        assert_eq!(
            q("properties.agentPoolProfiles[*].name", &v),
            json!(["a", "b"])
        );
        assert_eq!(q("properties.agentPoolProfiles[].count", &v), json!([1, 2]));
        assert_eq!(q("[clientId, id]", &v), json!(["c", "/x"]));
        assert_eq!(q("missing.x", &v), Value::Null);
        assert_eq!(q("[0]", &json!([{"a": 1}])), json!({"a": 1}));
        assert!(Query::parse("a |").is_err());
        assert!(Query::parse("").is_err());
        assert!(Query::parse("{a: b}").is_err());
    }

    #[test]
    fn properties_are_flattened_as_az_does() {
        let v = json!({"id": "/x", "name": "n", "properties": {"clientId": "c", "name": "inner"}});
        assert_eq!(q("clientId", &v), "c");
        assert_eq!(q("name", &v), "n");
        assert_eq!(q("properties.name", &v), "inner");
        assert_eq!(q("[].clientId", &json!([v.clone()])), json!(["c"]));
        assert_eq!(q("[0].clientId", &json!({"value": [v]})), "c");
    }
}
