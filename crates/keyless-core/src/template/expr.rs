//! The template expression language: `"[fn(arg, 'str', 1).prop[0]]"`.

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Str(String),
    Int(i64),
    Call(String, Vec<Expr>),
    /// `x.name`
    Prop(Box<Expr>, String),
    /// `x[i]` / `x['name']`
    Index(Box<Expr>, Box<Expr>),
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
    let mut p = Parser {
        s: src.as_bytes(),
        src,
        i: 0,
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

    fn expr(&mut self) -> Result<Expr, String> {
        self.ws();
        let mut e = match self.peek() {
            Some(b'\'') => self.string()?,
            Some(c) if c == b'-' || c.is_ascii_digit() => self.int()?,
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => self.call()?,
            _ => return Err(self.unexpected()),
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
                    e = Expr::Prop(Box::new(e), self.src[start..self.i].to_string());
                }
                Some(b'[') => {
                    self.i += 1;
                    let idx = self.expr()?;
                    self.ws();
                    if self.peek() != Some(b']') {
                        return Err(self.unexpected());
                    }
                    self.i += 1;
                    e = Expr::Index(Box::new(e), Box::new(idx));
                }
                _ => return Ok(e),
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
            args.push(self.expr()?);
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
            Expr::Index(
                Box::new(Expr::Index(
                    Box::new(Expr::Prop(
                        Box::new(call("reference", vec![Expr::Str("x".into())])),
                        "outputs".into()
                    )),
                    Box::new(Expr::Int(0))
                )),
                Box::new(Expr::Str("k".into()))
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

    #[test]
    fn classify_escapes() {
        assert!(matches!(classify("[[x]"), StrKind::Literal(s) if s == "[x]"));
        assert!(matches!(classify("[f()]"), StrKind::Expression("f()")));
        assert!(matches!(classify("[x"), StrKind::Literal(s) if s == "[x"));
        assert!(matches!(classify("plain"), StrKind::Literal(s) if s == "plain"));
    }
}
