//! JSON with comments and trailing commas, as az sends templates (its `JsonCTemplatePolicy`
//! splices the template file raw into the request body).

use serde_json::Value;

use super::TemplateError;

/// Parse JSON that may contain `//` and `/* */` comments, trailing commas, unquoted property
/// names, a byte-order mark
/// and non-ASCII whitespace (e.g. U+00A0, U+202F) between tokens. Strict JSON parses exactly as
/// `serde_json` parses it. Errors: `InvalidTemplate`, "Deployment template parse failed: '…'.".
pub fn parse_jsonc(text: &str) -> Result<Value, TemplateError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Ok(v) = serde_json::from_str(text) {
        return Ok(v);
    }
    let cleaned = strip(text)?;
    serde_json::from_str(&cleaned).map_err(|e| parse_failed(&e.to_string()))
}

fn parse_failed(detail: &str) -> TemplateError {
    TemplateError {
        code: "InvalidTemplate",
        message: format!("Deployment template parse failed: '{detail}'."),
        target: None,
    }
}

/// Comments and odd whitespace become spaces; commas before `}` / `]` are dropped; an
/// unquoted property name (`template:`, as az's splice writes it — Json.NET reads it) is
/// quoted. Strings are copied untouched.
fn strip(text: &str) -> Result<String, TemplateError> {
    // Pass 1: comments, whitespace and unquoted property names.
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    // the last bare identifier written (its byte range in `out`), while only whitespace follows
    let mut bare: Option<(usize, usize)> = None;
    while let Some(c) = chars.next() {
        if !c.is_whitespace() && c != ':' && !(c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            bare = None;
        }
        match c {
            ':' => {
                if let Some((start, end)) = bare.take() {
                    out.insert(end, '"');
                    out.insert(start, '"');
                }
                out.push(c);
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == '$' => {
                let start = out.len();
                out.push(c);
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '_' || n == '$' {
                        out.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                bare = Some((start, out.len()));
            }
            '"' => {
                out.push(c);
                let mut escaped = false;
                for s in chars.by_ref() {
                    out.push(s);
                    if escaped {
                        escaped = false;
                    } else if s == '\\' {
                        escaped = true;
                    } else if s == '"' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                for s in chars.by_ref() {
                    if s == '\n' {
                        out.push('\n');
                        line += 1;
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = '\0';
                let mut closed = false;
                for s in chars.by_ref() {
                    if s == '\n' {
                        out.push('\n');
                        line += 1;
                    }
                    if prev == '*' && s == '/' {
                        closed = true;
                        break;
                    }
                    prev = s;
                }
                if !closed {
                    return Err(parse_failed(&format!(
                        "Unterminated comment starting before line {line}"
                    )));
                }
                out.push(' ');
            }
            '\n' => {
                line += 1;
                out.push(c);
            }
            c if !c.is_ascii() && c.is_whitespace() => out.push(' '),
            '\u{feff}' | '\u{200b}' => out.push(' '),
            c => out.push(c),
        }
    }
    // Pass 2: trailing commas.
    let bytes = out.as_bytes();
    let mut res = String::with_capacity(out.len());
    let mut i = 0;
    let mut start = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b',' => {
                let mut j = i + 1;
                while j < bytes.len() && matches!(bytes[j], b' ' | b'\t' | b'\n' | b'\r') {
                    j += 1;
                }
                if j < bytes.len() && matches!(bytes[j], b'}' | b']') {
                    res.push_str(&out[start..i]);
                    start = i + 1;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    res.push_str(&out[start.min(out.len())..]);
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_json_parses_as_serde_does() {
        let t = r#"{"a": [1, 2.5, "x//y", "/*z*/"], "b": {"c": null, "d": true}}"#;
        assert_eq!(
            parse_jsonc(t).unwrap(),
            serde_json::from_str::<Value>(t).unwrap()
        );
    }

    #[test]
    fn comments_trailing_commas_and_odd_whitespace() {
        let t = "\u{feff}{\n  // a comment\n  \"a\": [1, 2, ], /* block\n comment */\n\u{202f}\u{202f}\"b\": \"keep // this, ]\",\n  \"c\": {\"d\": 1,},\n}";
        assert_eq!(
            parse_jsonc(t).unwrap(),
            json!({"a": [1, 2], "b": "keep // this, ]", "c": {"d": 1}})
        );
    }

    #[test]
    fn az_splices_the_template_under_an_unquoted_key() {
        // azure-cli's JsonCTemplatePolicy: `json.dumps(rest)[:-2] + ", template:" + file + "}}"`
        let t = "{\"properties\": {\"mode\": \"Incremental\", \"parameters\": {\"a\": {\"value\": \"x: y\"}}, template:{\r\n  // c\n  \"$schema\": \"s\", \"n\": 1e5, \"t\": true,\n}}}";
        assert_eq!(
            parse_jsonc(t).unwrap(),
            json!({"properties": {"mode": "Incremental", "parameters": {"a": {"value": "x: y"}},
                "template": {"$schema": "s", "n": 1e5, "t": true}}})
        );
    }

    #[test]
    fn escaped_quotes_in_strings_are_kept() {
        let t = r#"{"a": "x\"//,}", /* c */ "b": 1,}"#;
        assert_eq!(parse_jsonc(t).unwrap(), json!({"a": "x\"//,}", "b": 1}));
    }

    #[test]
    fn broken_json_is_invalid_template() {
        let e = parse_jsonc("{\"a\": }").unwrap_err();
        assert_eq!(e.code, "InvalidTemplate");
        assert!(
            e.message.starts_with("Deployment template parse failed: '"),
            "{}",
            e.message
        );
        let e = parse_jsonc("{\"a\": 1 /* open").unwrap_err();
        assert_eq!(e.code, "InvalidTemplate");
    }
}
