//! Strict OData `$filter` parsing for the few forms the lists accept. A filter is tokenized and
//! parsed into clauses (`name(…)` calls, `field eq '…'` comparisons and the one lambda form
//! `collection/any(x:x eq '…')`, joined by `and`), then
//! typed per list; anything else — an unknown field, `or`, `not`, numbers, unbalanced
//! parentheses, trailing text — is an error the surface answers with 400.
//!
//! Case rules follow ARM, which matches names and keywords case-insensitively (`atscope()`,
//! `PrincipalId EQ '…'`); string values keep their case and `''` inside quotes is one `'`.

/// Longest `$filter` accepted.
pub const MAX_FILTER_LEN: usize = 2048;

/// A `$filter` this list does not understand (the surface shapes the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    /// The filter as given (truncated for echoing).
    pub filter: String,
}

impl FilterError {
    fn new(f: &str) -> Self {
        Self {
            filter: f.chars().take(200).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Str(String),
    Open,
    Close,
    /// `/` of a path (`collection/any`): no space on either side.
    Slash,
    /// `:` of a lambda (`any(c:…)`).
    Colon,
}

fn tokenize(f: &str) -> Option<Vec<Token>> {
    let mut out = vec![];
    let mut chars = f.chars().peekable();
    let mut after_space = false;
    while let Some(&c) = chars.peek() {
        let space = c == ' ' || c == '\t';
        match c {
            ' ' | '\t' => {
                chars.next();
            }
            '/' => {
                chars.next();
                // a path step joins two names: `a/b`, never `a /b`, `a/ b` or `'x'/b`
                let joined = !after_space
                    && matches!(out.last(), Some(Token::Ident(_)))
                    && chars.peek().is_some_and(|c| c.is_ascii_alphabetic());
                if !joined {
                    return None;
                }
                out.push(Token::Slash);
            }
            ':' => {
                chars.next();
                out.push(Token::Colon);
            }
            '(' => {
                chars.next();
                out.push(Token::Open);
            }
            ')' => {
                chars.next();
                out.push(Token::Close);
            }
            '\'' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next()? {
                        '\'' if chars.peek() == Some(&'\'') => {
                            chars.next();
                            s.push('\'');
                        }
                        '\'' => break,
                        c if c.is_control() => return None,
                        c => s.push(c),
                    }
                }
                out.push(Token::Str(s));
            }
            c if c.is_ascii_alphabetic() => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        s.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Token::Ident(s));
            }
            _ => return None,
        }
        after_space = space;
    }
    Some(out)
}

/// One clause of a filter, names lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clause {
    /// `name()` or `name('arg')`.
    Call { name: String, arg: Option<String> },
    /// `field eq 'value'`.
    Eq { field: String, value: String },
    /// `field/any(x:x eq 'value')`: some member of the collection `field` is `value`.
    Any { field: String, value: String },
}

/// Parse `clause (and clause)*`; `None` if the text is not of that form.
pub fn parse_clauses(f: &str) -> Option<Vec<Clause>> {
    if f.len() > MAX_FILTER_LEN {
        return None;
    }
    let toks = tokenize(f)?;
    let mut i = 0;
    let mut out = vec![];
    loop {
        let Some(Token::Ident(name)) = toks.get(i) else {
            return None;
        };
        let name = name.to_ascii_lowercase();
        if let Some((value, len)) = any_eq(&toks[i + 1..]) {
            out.push(Clause::Any { field: name, value });
            i += 1 + len;
        } else {
            match (toks.get(i + 1), toks.get(i + 2), toks.get(i + 3)) {
                (Some(Token::Open), Some(Token::Close), _) => {
                    out.push(Clause::Call { name, arg: None });
                    i += 3;
                }
                (Some(Token::Open), Some(Token::Str(a)), Some(Token::Close)) => {
                    out.push(Clause::Call {
                        name,
                        arg: Some(a.clone()),
                    });
                    i += 4;
                }
                (Some(Token::Ident(op)), Some(Token::Str(v)), _)
                    if op.eq_ignore_ascii_case("eq") =>
                {
                    out.push(Clause::Eq {
                        field: name,
                        value: v.clone(),
                    });
                    i += 3;
                }
                _ => return None,
            }
        }
        match toks.get(i) {
            None => return Some(out),
            Some(Token::Ident(k)) if k.eq_ignore_ascii_case("and") => i += 1,
            _ => return None,
        }
    }
}

/// After a collection's name: `/any(x:x eq 'value')` — the lambda variable named the same on
/// both sides, keywords in any case. The value and the number of tokens read.
fn any_eq(toks: &[Token]) -> Option<(String, usize)> {
    match toks {
        [Token::Slash, Token::Ident(any), Token::Open, Token::Ident(x), Token::Colon, Token::Ident(y), Token::Ident(eq), Token::Str(v), Token::Close, ..]
            if any.eq_ignore_ascii_case("any") && x == y && eq.eq_ignore_ascii_case("eq") =>
        {
            Some((v.clone(), 9))
        }
        _ => None,
    }
}

/// `$filter` of role assignment lists: `atScope()`, `principalId eq '…'`, `assignedTo('…')`,
/// and `atScope()` with one of the other two joined by `and`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AssignmentFilter {
    pub at_scope: bool,
    pub principal: Option<String>,
}

impl AssignmentFilter {
    pub fn parse(f: &str) -> Result<Self, FilterError> {
        if f.trim().is_empty() {
            return Ok(Self::default());
        }
        let err = || FilterError::new(f);
        let mut out = Self::default();
        for c in parse_clauses(f).ok_or_else(err)? {
            match c {
                Clause::Call { name, arg: None } if name == "atscope" && !out.at_scope => {
                    out.at_scope = true
                }
                Clause::Call { name, arg: Some(v) }
                    if name == "assignedto" && out.principal.is_none() && !v.is_empty() =>
                {
                    out.principal = Some(v)
                }
                Clause::Eq { field, value }
                    if field == "principalid" && out.principal.is_none() && !value.is_empty() =>
                {
                    out.principal = Some(value)
                }
                _ => return Err(err()),
            }
        }
        Ok(out)
    }
}

/// Which role definitions a `type eq` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleType {
    BuiltIn,
    Custom,
}

/// `$filter` of role definition lists: `roleName eq '…'`, `type eq 'BuiltInRole|CustomRole'`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoleDefinitionFilter {
    pub role_name: Option<String>,
    pub role_type: Option<RoleType>,
}

impl RoleDefinitionFilter {
    pub fn parse(f: &str) -> Result<Self, FilterError> {
        if f.trim().is_empty() {
            return Ok(Self::default());
        }
        let err = || FilterError::new(f);
        let mut out = Self::default();
        for c in parse_clauses(f).ok_or_else(err)? {
            match c {
                Clause::Eq { field, value } if field == "rolename" && out.role_name.is_none() => {
                    out.role_name = Some(value)
                }
                Clause::Eq { field, value } if field == "type" && out.role_type.is_none() => {
                    out.role_type = Some(if value.eq_ignore_ascii_case("BuiltInRole") {
                        RoleType::BuiltIn
                    } else if value.eq_ignore_ascii_case("CustomRole") {
                        RoleType::Custom
                    } else {
                        return Err(err());
                    })
                }
                _ => return Err(err()),
            }
        }
        Ok(out)
    }
}

/// `$filter` of the directory's service principal list: exactly one `appId eq '…'`,
/// `id eq '…'` or `servicePrincipalNames/any(c:c eq '…')` (how `az role assignment create
/// --assignee` resolves an assignee).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryFilter {
    AppId(String),
    Id(String),
    /// A member of `servicePrincipalNames`.
    Name(String),
}

impl DirectoryFilter {
    pub fn parse(f: &str) -> Result<Self, FilterError> {
        let err = || FilterError::new(f);
        match parse_clauses(f).ok_or_else(err)?.as_slice() {
            [Clause::Eq { field, value }] if field == "appid" => Ok(Self::AppId(value.clone())),
            [Clause::Eq { field, value }] if field == "id" => Ok(Self::Id(value.clone())),
            [Clause::Any { field, value }] if field == "serviceprincipalnames" => {
                Ok(Self::Name(value.clone()))
            }
            _ => Err(err()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(f: &str) -> Result<AssignmentFilter, FilterError> {
        AssignmentFilter::parse(f)
    }

    #[test]
    fn assignment_filters_of_real_clients() {
        assert_eq!(a("").unwrap(), AssignmentFilter::default());
        assert!(a("atScope()").unwrap().at_scope);
        assert_eq!(
            a("principalId eq 'ABC'").unwrap(),
            AssignmentFilter {
                at_scope: false,
                principal: Some("ABC".into())
            }
        );
        assert_eq!(
            a("atScope() and assignedTo('x')").unwrap(),
            AssignmentFilter {
                at_scope: true,
                principal: Some("x".into())
            }
        );
        // ARM matches names and keywords case-insensitively
        assert_eq!(
            a("ATSCOPE() AND PrincipalID EQ 'p'").unwrap().principal,
            Some("p".into())
        );
        // quotes inside values are doubled
        assert_eq!(
            a("principalId eq 'o''brien'").unwrap().principal,
            Some("o'brien".into())
        );
        assert!(a("  principalId   eq   'p'  ").is_ok());
    }

    #[test]
    fn assignment_filters_not_understood() {
        for f in [
            "principalId eq 'x' or 1=1 ((((",
            "principalId eq 'x' or 1=1",
            "principalld eq 'x'",
            "principalId eq x",
            "principalId eq 'x",
            "principalId ne 'x'",
            "principalId eq 'x' and roleDefinitionId eq 'y'",
            "principalId eq 'x' and principalId eq 'y'",
            "atScope() and atScope()",
            "atScope('x')",
            "assignedTo()",
            "assignedTo('')",
            "principalId eq ''",
            "not atScope()",
            "atScope() and",
            "and atScope()",
            "atScope",
            "(atScope())",
            "atScope();",
            "principalId eq 'x'\n",
            "principalId eq 'a\u{0}b'",
            "principalId eq 1",
        ] {
            let e = a(f).expect_err(f);
            assert_eq!(e.filter, f);
        }
        assert!(a(&format!("principalId eq '{}'", "x".repeat(MAX_FILTER_LEN))).is_err());
    }

    #[test]
    fn role_definition_filters() {
        let r = |f: &str| RoleDefinitionFilter::parse(f);
        assert_eq!(r("").unwrap(), RoleDefinitionFilter::default());
        assert_eq!(
            r("roleName eq 'Key Vault Secrets User'").unwrap().role_name,
            Some("Key Vault Secrets User".into())
        );
        assert_eq!(
            r("type eq 'CustomRole'").unwrap().role_type,
            Some(RoleType::Custom)
        );
        assert_eq!(
            r("roleName eq 'Reader' and type eq 'BuiltInRole'")
                .unwrap()
                .role_type,
            Some(RoleType::BuiltIn)
        );
        for f in [
            "roleNam eq 'Reader'",
            "type eq 'Other'",
            "roleName eq 'Reader' or type eq 'CustomRole'",
            "atScope()",
        ] {
            assert!(r(f).is_err(), "{f}");
        }
    }

    #[test]
    fn directory_filters() {
        let d = |f: &str| DirectoryFilter::parse(f);
        assert_eq!(
            d("appId eq 'a'").unwrap(),
            DirectoryFilter::AppId("a".into())
        );
        assert_eq!(d("id eq 'b'").unwrap(), DirectoryFilter::Id("b".into()));
        for f in [
            "",
            "appId eq 'a' or 1 eq 1",
            "appid eq 'a' and id eq 'b'",
            "displayName eq 'x'",
        ] {
            assert!(d(f).is_err(), "{f}");
        }
    }

    #[test]
    fn service_principal_name_filters() {
        let d = |f: &str| DirectoryFilter::parse(f);
        // as az 2.91 sends it
        assert_eq!(
            d("servicePrincipalNames/any(c:c eq '8f0c5e2a-0000-4000-8000-000000000001')").unwrap(),
            DirectoryFilter::Name("8f0c5e2a-0000-4000-8000-000000000001".into())
        );
        // names and keywords in any case, spaces inside the parentheses, doubled quotes
        assert_eq!(
            d("ServicePrincipalNames/ANY( x : x EQ 'o''brien' )").unwrap(),
            DirectoryFilter::Name("o'brien".into())
        );
        assert_eq!(
            d("servicePrincipalNames/any(c:c eq '/subscriptions/s/resourceGroups/g')").unwrap(),
            DirectoryFilter::Name("/subscriptions/s/resourceGroups/g".into())
        );
        for f in [
            "servicePrincipalNames/any(c:d eq 'a')",
            "servicePrincipalNames/all(c:c eq 'a')",
            "servicePrincipalNames/any(c:c ne 'a')",
            "servicePrincipalNames/any(c:c eq 'a'",
            "servicePrincipalNames/any(c:c eq a)",
            "servicePrincipalNames/any(c c eq 'a')",
            "servicePrincipalNames/any(c:c eq 'a' or c eq 'b')",
            "servicePrincipalNames/any(c:c eq 'a') or 1 eq 1",
            "servicePrincipalNames/any(c:c eq 'a') and appId eq 'b'",
            "servicePrincipalNames /any(c:c eq 'a')",
            "servicePrincipalNames/ any(c:c eq 'a')",
            "servicePrincipalNames//any(c:c eq 'a')",
            "/any(c:c eq 'a')",
            "servicePrincipalNames/any()",
            "servicePrincipalNames/any(c:c eq 'a')/x",
            "tags/any(c:c eq 'a')",
            "servicePrincipalNames eq 'a'",
            "appId/any(c:c eq 'a')",
        ] {
            assert!(d(f).is_err(), "{f}");
        }
        // other lists do not take the lambda
        assert!(a("principalId/any(c:c eq 'a')").is_err());
        assert!(RoleDefinitionFilter::parse("roleName/any(c:c eq 'a')").is_err());
    }
}
