//! Conversions and collection functions: `uri`, `uriComponent`, `uriComponentToString`,
//! `dataUri`, `dataUriToString`, `base64ToJson`, `array`, `flatten`, `shallowMerge`, `tryGet`,
//! `objectKeys`, `indexFromEnd`, `tryIndexFromEnd`.

use super::{arity, arr, s, wrong_type};
use base64::Engine as _;
use serde_json::{Map, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `uri(base, relative)` as ARM combines them: after a trailing slash of `base` (one slash
/// between them); else, when `base` has a path, after its last slash; else after `base`.
fn combine(base: &str, relative: &str) -> String {
    if let Some(b) = base.strip_suffix('/') {
        return format!("{b}/{}", relative.trim_start_matches('/'));
    }
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    match base[after_scheme..].rfind('/') {
        Some(i) => format!(
            "{}/{}",
            &base[..after_scheme + i],
            relative.trim_start_matches('/')
        ),
        None => format!("{base}/{}", relative.trim_start_matches('/')),
    }
}

/// RFC 3986 escaping of everything but the unreserved characters (.NET's `EscapeDataString`).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `%XX` sequences decoded; None if the result is not UTF-8.
fn unescape(text: &str) -> Option<String> {
    String::from_utf8(crate::percent::decode(text)).ok()
}

/// The functions here (lower-case).
pub(super) const NAMES: &[&str] = &[
    "uri",
    "uricomponent",
    "uricomponenttostring",
    "datauri",
    "datauritostring",
    "base64tojson",
    "array",
    "flatten",
    "shallowmerge",
    "tryget",
    "objectkeys",
    "indexfromend",
    "tryindexfromend",
];

/// The functions here, if `lname` (lower-case) is one.
pub(super) fn apply(name: &str, lname: &str, a: &[Value]) -> Option<Result<Value, String>> {
    if !NAMES.contains(&lname) {
        return None;
    }
    let n = a.len();
    let r = (|| match lname {
        "uri" => {
            arity(name, n, 2, 2)?;
            Ok(Value::String(combine(s(name, &a[0])?, s(name, &a[1])?)))
        }
        "uricomponent" => {
            arity(name, n, 1, 1)?;
            Ok(Value::String(escape(s(name, &a[0])?)))
        }
        "uricomponenttostring" => {
            arity(name, n, 1, 1)?;
            unescape(s(name, &a[0])?).map(Value::String).ok_or_else(|| {
                format!("The template language function '{name}' could not decode its parameter: it is not an escaped UTF-8 string.")
            })
        }
        "datauri" => {
            arity(name, n, 1, 1)?;
            let text = match &a[0] {
                Value::String(t) => t.clone(),
                other => other.to_string(),
            };
            Ok(Value::String(format!(
                "data:text/plain;charset=utf8;base64,{}",
                B64.encode(text.as_bytes())
            )))
        }
        "datauritostring" => {
            arity(name, n, 1, 1)?;
            let d = s(name, &a[0])?;
            let bad = || {
                format!("The template language function '{name}' expects a data URI ('data:[<media type>][;base64],<data>'); the provided value is not one.")
            };
            let (head, data) = d
                .strip_prefix("data:")
                .and_then(|r| r.split_once(','))
                .ok_or_else(bad)?;
            let bytes = if head.ends_with(";base64") {
                B64.decode(data).map_err(|_| bad())?
            } else {
                unescape(data).ok_or_else(bad)?.into_bytes()
            };
            String::from_utf8(bytes)
                .map(Value::String)
                .map_err(|_| bad())
        }
        "base64tojson" => {
            arity(name, n, 1, 1)?;
            let bad = || {
                format!("The template language function '{name}' expects base64 of a JSON value.")
            };
            let bytes = B64.decode(s(name, &a[0])?).map_err(|_| bad())?;
            serde_json::from_slice(&bytes).map_err(|_| bad())
        }
        "array" => {
            arity(name, n, 1, 1)?;
            Ok(match &a[0] {
                Value::Array(x) => Value::Array(x.clone()),
                other => Value::Array(vec![other.clone()]),
            })
        }
        "flatten" => {
            arity(name, n, 1, 1)?;
            let mut out = Vec::new();
            for x in arr(name, &a[0])? {
                out.extend(arr(name, x)?.iter().cloned());
            }
            Ok(Value::Array(out))
        }
        "shallowmerge" => {
            arity(name, n, 1, 1)?;
            let mut out = Map::new();
            for x in arr(name, &a[0])? {
                let o = x.as_object().ok_or_else(|| wrong_type(name, "Object", x))?;
                out.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            Ok(Value::Object(out))
        }
        "tryget" => {
            arity(name, n, 2, usize::MAX)?;
            let mut v = &a[0];
            for k in &a[1..] {
                let next = match (v, k) {
                    (Value::Object(o), Value::String(key)) => o
                        .iter()
                        .find(|(x, _)| x.eq_ignore_ascii_case(key))
                        .map(|(_, x)| x),
                    (Value::Array(x), Value::Number(i)) => {
                        i.as_u64().and_then(|i| x.get(i as usize))
                    }
                    _ => None,
                };
                match next {
                    Some(x) => v = x,
                    None => return Ok(Value::Null),
                }
            }
            Ok(v.clone())
        }
        "objectkeys" => {
            arity(name, n, 1, 1)?;
            let o = a[0]
                .as_object()
                .ok_or_else(|| wrong_type(name, "Object", &a[0]))?;
            Ok(Value::Array(o.keys().cloned().map(Value::String).collect()))
        }
        "indexfromend" | "tryindexfromend" => {
            arity(name, n, 2, 2)?;
            let items = arr(name, &a[0])?;
            let back = super::int(name, &a[1])?;
            let item = usize::try_from(back)
                .ok()
                .filter(|&b| b >= 1 && b <= items.len())
                .map(|b| items[items.len() - b].clone());
            match item {
                Some(v) => Ok(v),
                None if lname == "tryindexfromend" => Ok(Value::Null),
                None => Err(format!("The template language function '{name}' cannot find the item {back} from the end of an array of {} item(s): the index is from 1 to the array's length. Please see https://aka.ms/arm-functions for usage details.", items.len())),
            }
        }
        // not reached: NAMES
        _ => Ok(Value::Null),
    })();
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_combine_and_escape_as_arm_does() {
        assert_eq!(
            combine("http://contoso.com/resources/", "nested/azuredeploy.json"),
            "http://contoso.com/resources/nested/azuredeploy.json"
        );
        assert_eq!(
            combine("http://contoso.com/resources/", "/nested/a.json"),
            "http://contoso.com/resources/nested/a.json"
        );
        assert_eq!(
            combine(
                "http://contoso.com/resources/azuredeploy.json",
                "nested/a.json"
            ),
            "http://contoso.com/resources/nested/a.json"
        );
        assert_eq!(
            combine("http://contoso.com", "a.json"),
            "http://contoso.com/a.json"
        );
        assert_eq!(
            escape("http://contoso.com/resources/nested/azuredeploy.json"),
            "http%3A%2F%2Fcontoso.com%2Fresources%2Fnested%2Fazuredeploy.json"
        );
        assert_eq!(
            unescape("http%3A%2F%2Fcontoso.com").as_deref(),
            Some("http://contoso.com")
        );
        assert_eq!(unescape("100%").as_deref(), Some("100%"));
        assert_eq!(unescape("%C3%A9%2").as_deref(), Some("é%2"));
    }
}
