//! The template expression language: `"[fn(arg, 'str', 1).prop[0]]"`.
//!
//! Limits (a request's template must not be able to exhaust the parser's or evaluator's stack):
//! an expression is at most [`MAX_EXPRESSION_CHARS`] characters (ARM's documented limit) and
//! nests at most [`MAX_NESTING`] levels of function calls and `[…]` indexes; a member chain
//! `x.a.b[0]…` is parsed in a loop and kept flat ([`Expr::Member`]), so its length costs no depth.

/// ARM's limit on one template expression ("24,576 characters in a template expression").
pub(crate) const MAX_EXPRESSION_CHARS: usize = 24_576;

/// Nesting levels of function calls and indexes in one expression.
pub(crate) const MAX_NESTING: usize = 64;

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Str(String),
    Int(i64),
    Call(String, Vec<Expr>),
    /// `x.name[i]['name']…`: the base and its accesses in order (never empty).
    Member(Box<Expr>, Vec<Access>),
}

/// One step of a member chain.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Access {
    /// `.name`
    Prop(String),
    /// `[i]` / `['name']`
    Index(Expr),
}

/// What a JSON string is: a literal (with `[[` unescaped) or an expression to evaluate.
pub(crate) enum StrKind<'a> {
    Literal(std::borrow::Cow<'a, str>),
    Expression(&'a str),
}

/// ARM's rule: a string that starts with `[` and ends with `]` is an expression, unless it starts
/// with `[[` (then one `[` is dropped and the rest is literal).
pub(crate) fn classify(s: &str) -> StrKind<'_> {
    if let Some(rest) = s.strip_prefix("[[") {
        let mut lit = String::with_capacity(s.len() - 1);
        lit.push('[');
        lit.push_str(rest);
        return StrKind::Literal(lit.into());
    }
    if s.len() >= 2 && s.starts_with('[') && s.ends_with(']') {
        return StrKind::Expression(&s[1..s.len() - 1]);
    }
    StrKind::Literal(s.into())
}

/// Parse the inside of `[...]`. The error is ARM's inner sentence.
pub(crate) fn parse(src: &str) -> Result<Expr, String> {
    // `[` and `]` count: the limit is on the expression string as written.
    let chars = src.len() + 2;
    if chars > MAX_EXPRESSION_CHARS {
        let chars = src.chars().count() + 2;
        if chars > MAX_EXPRESSION_CHARS {
            return Err(format!(
                "The language expression length limit exceeded. Limit: '{MAX_EXPRESSION_CHARS}' and actual: '{chars}'. Please see https://aka.ms/arm-template-expressions for usage details."
            ));
        }
    }
    let mut p = Parser {
        s: src.as_bytes(),
        src,
        i: 0,
        depth: 0,
    };
    p.ws();
    let e = p.expr()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.unexpected());
    }
    Ok(e)
}

struct Parser<'a> {
    s: &'a [u8],
    src: &'a str,
    i: usize,
    /// Calls and indexes open around the current position.
    depth: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn unexpected(&self) -> String {
        let found = match self.peek() {
            None => "end of expression".to_string(),
            Some(_) => format!("'{}'", &self.src[self.i..].chars().next().unwrap_or(' ')),
        };
        format!(
            "The language expression '{}' is not valid: the string character {} at position '{}' is not expected. Please see https://aka.ms/arm-template-expressions for usage details.",
            self.src, found, self.i
        )
    }

    /// An expression one nesting level deeper (a call's argument, an index).
    fn nested(&mut self) -> Result<Expr, String> {
        if self.depth >= MAX_NESTING {
            return Err(format!(
                "The language expression is not valid: it nests function calls and indexes more than '{MAX_NESTING}' levels deep. Please see https://aka.ms/arm-template-expressions for usage details."
            ));
        }
        self.depth += 1;
        let e = self.expr();
        self.depth -= 1;
        e
    }

    fn expr(&mut self) -> Result<Expr, String> {
        self.ws();
        let base = match self.peek() {
            Some(b'\'') => self.string()?,
            Some(c) if c == b'-' || c.is_ascii_digit() => self.int()?,
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => self.call()?,
            _ => return Err(self.unexpected()),
        };
        let mut path = Vec::new();
        let done = |base: Expr, path: Vec<Access>| {
            if path.is_empty() {
                base
            } else {
                Expr::Member(Box::new(base), path)
            }
        };
        loop {
            self.ws();
            match self.peek() {
                Some(b'.') => {
                    self.i += 1;
                    self.ws();
                    let start = self.i;
                    while self
                        .peek()
                        .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'$')
                    {
                        self.i += 1;
                    }
                    if start == self.i {
                        return Err(self.unexpected());
                    }
                    path.push(Access::Prop(self.src[start..self.i].to_string()));
                }
                Some(b'[') => {
                    self.i += 1;
                    let idx = self.nested()?;
                    self.ws();
                    if self.peek() != Some(b']') {
                        return Err(self.unexpected());
                    }
                    self.i += 1;
                    path.push(Access::Index(idx));
                }
                _ => return Ok(done(base, path)),
            }
        }
    }

    fn string(&mut self) -> Result<Expr, String> {
        self.i += 1;
        let mut out = String::new();
        let mut start = self.i;
        loop {
            match self.peek() {
                None => return Err(self.unexpected()),
                Some(b'\'') => {
                    out.push_str(&self.src[start..self.i]);
                    if self.s.get(self.i + 1) == Some(&b'\'') {
                        out.push('\'');
                        self.i += 2;
                        start = self.i;
                    } else {
                        self.i += 1;
                        return Ok(Expr::Str(out));
                    }
                }
                Some(_) => self.i += 1,
            }
        }
    }

    fn int(&mut self) -> Result<Expr, String> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        self.src[start..self.i]
            .parse::<i64>()
            .map(Expr::Int)
            .map_err(|_| self.unexpected())
    }

    fn call(&mut self) -> Result<Expr, String> {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
        {
            self.i += 1;
        }
        let name = self.src[start..self.i].to_string();
        self.ws();
        if self.peek() != Some(b'(') {
            return Err(self.unexpected());
        }
        self.i += 1;
        let mut args = Vec::new();
        self.ws();
        if self.peek() == Some(b')') {
            self.i += 1;
            return Ok(Expr::Call(name, args));
        }
        loop {
            args.push(self.nested()?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b')') => {
                    self.i += 1;
                    return Ok(Expr::Call(name, args));
                }
                _ => return Err(self.unexpected()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(n: &str, a: Vec<Expr>) -> Expr {
        Expr::Call(n.into(), a)
    }

    #[test]
    fn parses_calls_strings_ints_members() {
        assert_eq!(
            parse("concat(parameters('a'), '/', 'it''s', -3)").unwrap(),
            call(
                "concat",
                vec![
                    call("parameters", vec![Expr::Str("a".into())]),
                    Expr::Str("/".into()),
                    Expr::Str("it's".into()),
                    Expr::Int(-3)
                ]
            )
        );
        assert_eq!(
            parse(" reference('x').outputs[0]['k'] ").unwrap(),
            Expr::Member(
                Box::new(call("reference", vec![Expr::Str("x".into())])),
                vec![
                    Access::Prop("outputs".into()),
                    Access::Index(Expr::Int(0)),
                    Access::Index(Expr::Str("k".into())),
                ]
            )
        );
        assert_eq!(parse("utcNow()").unwrap(), call("utcNow", vec![]));
    }

    #[test]
    fn rejects_bad_syntax() {
        for bad in ["concat('a'", "'open", "f(1,)", "a b", "", "1 2", "x.", "f)"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    /// Runs `f` on a thread with a tokio worker's stack (2 MiB).
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn nesting_is_limited_without_overflowing_the_stack() {
        on_small_stack(|| {
            let deep = |n: usize| format!("{}'x'{}", "concat(".repeat(n), ")".repeat(n));
            assert!(parse(&deep(MAX_NESTING)).is_ok());
            let e = parse(&deep(MAX_NESTING + 1)).unwrap_err();
            assert!(e.contains("more than '64' levels deep"), "{e}");
            // Far beyond the limit (24 KB): an error, not a stack overflow.
            assert!(parse(&deep(3_000)).unwrap_err().contains("levels deep"));
            let idx = format!("{}0{}", "createArray(1)[".repeat(65), "]".repeat(65));
            assert!(parse(&idx).unwrap_err().contains("levels deep"));
        });
    }

    #[test]
    fn member_chains_are_flat() {
        on_small_stack(|| {
            // 10,000 members: parsed in a loop, stored flat, dropped without recursion.
            let src = format!("json('{{}}'){}", ".b".repeat(10_000));
            match parse(&src).unwrap() {
                Expr::Member(_, path) => assert_eq!(path.len(), 10_000),
                other => panic!("{other:?}"),
            }
        });
    }

    #[test]
    fn expression_length_is_limited() {
        // 24,576 characters with the brackets is allowed; one more is not.
        let ok = format!("'{}'", "a".repeat(MAX_EXPRESSION_CHARS - 4));
        assert!(parse(&ok).is_ok());
        let long = format!("'{}'", "a".repeat(MAX_EXPRESSION_CHARS - 3));
        assert_eq!(
            parse(&long).unwrap_err(),
            "The language expression length limit exceeded. Limit: '24576' and actual: '24577'. Please see https://aka.ms/arm-template-expressions for usage details."
        );
    }

    #[test]
    fn classify_escapes() {
        assert!(matches!(classify("[[x]"), StrKind::Literal(s) if s == "[x]"));
        assert!(matches!(classify("[f()]"), StrKind::Expression("f()")));
        assert!(matches!(classify("[x"), StrKind::Literal(s) if s == "[x"));
        assert!(matches!(classify("plain"), StrKind::Literal(s) if s == "plain"));
    }
}
