//! Federated identity credentials (seed 003, `../shared/spec/identity-protocols.md` §7): the
//! rules a FIC must satisfy, and how an external assertion's `iss` / `sub` / `aud` are matched
//! against an identity's FICs (exact, case-sensitive, trailing slash significant).
//!
//! Credential patterns (issue 15, a Keyless extension): an identity's
//! `federatedIdentityCredentialPatterns` match the subject with a pattern in which `*` stands
//! for one or more characters other than `:` (`system:serviceaccount:team-a:*` is every service
//! account of the namespace `team-a`); issuer and audience stay exact. They are bounded by
//! [`MAX_PATTERNS_PER_IDENTITY`], not by Entra's 20. [`find`] is the one matching rule, used by
//! the token exchange and by the readiness check alike: exact credentials first (Entra's rules
//! unchanged), then patterns.

use serde::{Deserialize, Serialize};

/// A federated identity credential's matching fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fic {
    pub name: String,
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
}

/// A federated identity credential pattern's matching fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FicPattern {
    pub name: String,
    pub issuer: String,
    /// `*` = one or more characters other than `:`; every other character is literal.
    pub subject_pattern: String,
    pub audiences: Vec<String>,
}

/// At most this many FICs per identity.
pub const MAX_PER_IDENTITY: usize = 20;
/// At most this many credential patterns per identity.
pub const MAX_PATTERNS_PER_IDENTITY: usize = 1000;
const MAX_FIELD: usize = 600;
/// The longest assertion subject matched, in characters: no credential's subject and no
/// pattern is longer than [`MAX_FIELD`] (600), and a longer `sub` — an unverified claim, up to
/// the size of a form — is refused as no subject match before any pattern sees it
/// ([`find`]), so matching costs at most 600 × 600 per pattern.
pub const MAX_SUBJECT: usize = MAX_FIELD;

/// Whether an assertion's `sub` is longer than [`MAX_SUBJECT`] characters (counted only when
/// its bytes could exceed the bound).
pub fn subject_too_long(sub: &str) -> bool {
    sub.len() > MAX_SUBJECT && sub.chars().count() > MAX_SUBJECT
}

/// Why a FIC is invalid (ARM 400 messages as Entra words them where known).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FicError {
    #[error("Federated Identity Credential name '{0}' is invalid.")]
    Name(String),
    #[error("Federated identity credentials must have exactly one audience.")]
    Audiences,
    #[error("The {0} of a federated identity credential is required.")]
    Missing(&'static str),
    #[error("The {0} of a federated identity credential must be at most 600 characters.")]
    TooLong(&'static str),
    #[error("The issuer '{0}' of a federated identity credential must be an https URL.")]
    Issuer(String),
    #[error("Wildcards are not supported in federated identity credential {0}.")]
    Wildcard(&'static str),
    #[error("The subject pattern '{0}' must not contain '**': '*' already stands for one or more characters other than ':'.")]
    DoubleWildcard(String),
    #[error(
        "The subject pattern '{0}' must contain at least one character other than '*' and ':'."
    )]
    NoLiteral(String),
}

/// Name: 3–120 characters, alphanumeric first, then alphanumerics, `-`, `_`.
pub fn validate_name(name: &str) -> Result<(), FicError> {
    let b = name.as_bytes();
    let ok = (3..=120).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(FicError::Name(name.to_string()))
    }
}

/// Validate a FIC's fields.
pub fn validate(f: &Fic) -> Result<(), FicError> {
    validate_name(&f.name)?;
    for (what, v) in [("issuer", &f.issuer), ("subject", &f.subject)] {
        if v.trim().is_empty() {
            return Err(FicError::Missing(what));
        }
        if v.chars().count() > MAX_FIELD {
            return Err(FicError::TooLong(what));
        }
        if v.contains('*') {
            return Err(FicError::Wildcard(what));
        }
    }
    validate_issuer_and_audiences(&f.issuer, &f.audiences)
}

/// The issuer (an https URL) and the audiences (exactly one) of a FIC or a pattern.
fn validate_issuer_and_audiences(issuer: &str, audiences: &[String]) -> Result<(), FicError> {
    if !issuer.starts_with("https://") || issuer.len() <= "https://".len() {
        return Err(FicError::Issuer(issuer.to_string()));
    }
    if audiences.len() != 1 {
        return Err(FicError::Audiences);
    }
    let aud = &audiences[0];
    if aud.trim().is_empty() {
        return Err(FicError::Missing("audience"));
    }
    if aud.chars().count() > MAX_FIELD {
        return Err(FicError::TooLong("audience"));
    }
    if aud.contains('*') {
        return Err(FicError::Wildcard("audience"));
    }
    Ok(())
}

/// Validate a credential pattern: the name, issuer and audience as a FIC's; the subject
/// pattern non-empty, at most 600 characters, no `**`, and at least one character other than
/// `*` and `:` (so neither `*` nor `*:*` matches everything).
pub fn validate_pattern(p: &FicPattern) -> Result<(), FicError> {
    validate_name(&p.name)?;
    if p.issuer.trim().is_empty() {
        return Err(FicError::Missing("issuer"));
    }
    if p.issuer.chars().count() > MAX_FIELD {
        return Err(FicError::TooLong("issuer"));
    }
    if p.issuer.contains('*') {
        return Err(FicError::Wildcard("issuer"));
    }
    let sp = &p.subject_pattern;
    if sp.trim().is_empty() {
        return Err(FicError::Missing("subject pattern"));
    }
    if sp.chars().count() > MAX_FIELD {
        return Err(FicError::TooLong("subject pattern"));
    }
    if sp.contains("**") {
        return Err(FicError::DoubleWildcard(sp.clone()));
    }
    if sp.chars().all(|c| c == '*' || c == ':') {
        return Err(FicError::NoLiteral(sp.clone()));
    }
    validate_issuer_and_audiences(&p.issuer, &p.audiences)
}

/// Whether `subject` fits `pattern`: `*` matches one or more characters other than `:`, every
/// other character itself (case-sensitive). As no `*` crosses a `:`, both split into the same
/// number of `:`-separated segments, matched pairwise.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut ps = pattern.split(':');
    let mut ss = subject.split(':');
    loop {
        match (ps.next(), ss.next()) {
            (None, None) => return true,
            (Some(p), Some(s)) if segment_matches(p.as_bytes(), s.as_bytes()) => {}
            _ => return false,
        }
    }
}

/// One `:`-free segment: `*` matches one or more bytes (a `*` is never followed by a
/// continuation byte of UTF-8 in a valid pattern, so it always ends on a character boundary).
/// Greedy with backtracking to the last `*` (a `*` is `?` followed by a classic `*`), linear in
/// the usual case and at most |p|·|s|.
fn segment_matches(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    // (pattern index after the last `*`, subject index where that `*`'s match ends)
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            // the `*` takes s[si] (at least one character), then possibly more on backtracking
            star = Some((pi + 1, si + 1));
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((after, end)) = star {
            // let the last `*` take one more character
            star = Some((after, end + 1));
            pi = after;
            si = end + 1;
            if si > s.len() {
                return false;
            }
        } else {
            return false;
        }
    }
    // what is left of the pattern must match the empty string: nothing (a `*` needs a character)
    pi == p.len()
}

/// What matched an assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched<'a> {
    Exact(&'a Fic),
    Pattern(&'a FicPattern),
}

/// The outcome of matching an assertion against an identity's FICs and patterns, in Entra's
/// order (issuer, then subject, then audience).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match<'a> {
    Matched(Matched<'a>),
    /// No FIC and no pattern has this issuer (AADSTS700211).
    NoIssuer,
    /// Issuer known, no FIC with this subject and no pattern fitting it (AADSTS700213).
    NoSubject,
    /// Issuer and subject match, audience does not (AADSTS700212).
    NoAudience,
}

/// Match `iss`, `sub` and the token's audiences against `fics` (Entra's exact rules) and then
/// against `patterns`; when neither matches, the furthest step either kind reached names the
/// error (an issuer only a pattern has is a known issuer). A `sub` longer than
/// [`MAX_SUBJECT`] characters is [`Match::NoSubject`] at once, before anything is matched.
pub fn find<'a>(
    fics: &'a [Fic],
    patterns: &'a [FicPattern],
    iss: &str,
    sub: &str,
    auds: &[&str],
) -> Match<'a> {
    if subject_too_long(sub) {
        return Match::NoSubject;
    }
    let aud_ok = |list: &[String]| list.iter().any(|a| auds.contains(&a.as_str()));
    let exact = fics.iter().filter(|f| f.issuer == iss && f.subject == sub);
    if let Some(f) = exact.clone().find(|f| aud_ok(&f.audiences)) {
        return Match::Matched(Matched::Exact(f));
    }
    let fitting = patterns
        .iter()
        .filter(|p| p.issuer == iss && subject_matches(&p.subject_pattern, sub));
    if let Some(p) = fitting.clone().find(|p| aud_ok(&p.audiences)) {
        return Match::Matched(Matched::Pattern(p));
    }
    if exact.count() > 0 || fitting.count() > 0 {
        Match::NoAudience
    } else if fics.iter().any(|f| f.issuer == iss) || patterns.iter().any(|p| p.issuer == iss) {
        Match::NoSubject
    } else {
        Match::NoIssuer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fic(name: &str, iss: &str, sub: &str) -> Fic {
        Fic {
            name: name.into(),
            issuer: iss.into(),
            subject: sub.into(),
            audiences: vec!["api://AzureADTokenExchange".into()],
        }
    }

    #[test]
    fn names_follow_the_rules() {
        for ok in ["abc", "a-b_c", "1ab", &"a".repeat(120)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "-abc",
            "_abc",
            "a.b",
            "a b c",
            &"a".repeat(121),
            "ünï",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fields_follow_the_rules() {
        let good = fic(
            "github",
            "https://token.actions.githubusercontent.com",
            "repo:org/repo:ref:refs/heads/main",
        );
        assert_eq!(validate(&good), Ok(()));
        let mut f = good.clone();
        f.audiences = vec![];
        assert_eq!(validate(&f), Err(FicError::Audiences));
        f.audiences = vec!["a".into(), "b".into()];
        assert_eq!(validate(&f), Err(FicError::Audiences));
        let mut f = good.clone();
        f.subject = "repo:org/*".into();
        assert_eq!(validate(&f), Err(FicError::Wildcard("subject")));
        let mut f = good.clone();
        f.issuer = "http://insecure".into();
        assert!(matches!(validate(&f), Err(FicError::Issuer(_))));
        let mut f = good.clone();
        f.subject = "x".repeat(601);
        assert_eq!(validate(&f), Err(FicError::TooLong("subject")));
        let mut f = good;
        f.subject = " ".into();
        assert_eq!(validate(&f), Err(FicError::Missing("subject")));
    }

    #[test]
    fn matching_is_exact_and_ordered_like_entra() {
        let fics = vec![fic(
            "k8s",
            "https://oidc.example/cluster/",
            "system:serviceaccount:ns:sa",
        )];
        let aud = ["api://AzureADTokenExchange"];
        assert!(matches!(
            find(
                &fics,
                &[],
                "https://oidc.example/cluster/",
                "system:serviceaccount:ns:sa",
                &aud
            ),
            Match::Matched(_)
        ));
        // trailing slash is significant; case matters
        assert_eq!(
            find(
                &fics,
                &[],
                "https://oidc.example/cluster",
                "system:serviceaccount:ns:sa",
                &aud
            ),
            Match::NoIssuer
        );
        assert_eq!(
            find(
                &fics,
                &[],
                "https://oidc.example/cluster/",
                "system:serviceaccount:NS:sa",
                &aud
            ),
            Match::NoSubject
        );
        assert_eq!(
            find(
                &fics,
                &[],
                "https://oidc.example/cluster/",
                "system:serviceaccount:ns:sa",
                &["api://other"]
            ),
            Match::NoAudience
        );
        assert_eq!(find(&[], &[], "x", "y", &aud), Match::NoIssuer);
    }

    fn pattern(name: &str, iss: &str, sp: &str) -> FicPattern {
        FicPattern {
            name: name.into(),
            issuer: iss.into(),
            subject_pattern: sp.into(),
            audiences: vec!["api://AzureADTokenExchange".into()],
        }
    }

    #[test]
    fn a_star_is_one_or_more_characters_other_than_a_colon() {
        let yes = [
            (
                "system:serviceaccount:team-a:*",
                "system:serviceaccount:team-a:web",
            ),
            (
                "system:serviceaccount:team-a:*",
                "system:serviceaccount:team-a:w",
            ),
            (
                "system:serviceaccount:*:web",
                "system:serviceaccount:team-a:web",
            ),
            (
                "system:serviceaccount:team-*:*",
                "system:serviceaccount:team-b:x",
            ),
            (
                "repo:org/*:ref:refs/heads/*",
                "repo:org/app:ref:refs/heads/main",
            ),
            ("a*b*c", "aXbYc"),
            ("a*b*c", "abbbbXc"),
            ("*-prod", "web-prod"),
            ("*-prod", "web-prod-prod"),
            ("exact:no:star", "exact:no:star"),
            ("ü*", "üñï"),
        ];
        for (p, s) in yes {
            assert!(subject_matches(p, s), "{p} ~ {s}");
        }
        let no = [
            // `*` never crosses a `:`
            (
                "system:serviceaccount:team-a:*",
                "system:serviceaccount:team-a:web:x",
            ),
            (
                "system:serviceaccount:team-a:*",
                "system:serviceaccount:team-b:web",
            ),
            (
                "system:serviceaccount:*",
                "system:serviceaccount:team-a:web",
            ),
            // one or more: an empty run is no match
            (
                "system:serviceaccount:team-a:*",
                "system:serviceaccount:team-a:",
            ),
            ("a*b", "ab"),
            ("*-prod", "-prod"),
            // case-sensitive, anchored at both ends
            (
                "system:serviceaccount:Team-A:*",
                "system:serviceaccount:team-a:web",
            ),
            ("web*", "xweb1"),
            ("*web", "web1"),
            ("exact:no:star", "exact:no:star:"),
        ];
        for (p, s) in no {
            assert!(!subject_matches(p, s), "{p} !~ {s}");
        }
    }

    #[test]
    fn matching_a_long_subject_stays_cheap() {
        // the worst case of backtracking is bounded by |pattern| * |subject| (600 * 600)
        let p = format!("{}b", "a*".repeat(200));
        let s = "a".repeat(600);
        assert!(!subject_matches(&p, &s));
    }

    #[test]
    fn a_subject_longer_than_600_characters_matches_nothing() {
        let iss = "https://oidc.example/cluster/";
        let aud = ["api://AzureADTokenExchange"];
        let patterns = vec![pattern("team-a", iss, "system:serviceaccount:team-a:*")];
        let prefix = "system:serviceaccount:team-a:";
        // 600 characters: matched; 601: refused as no subject match, though the pattern fits
        let at = format!("{prefix}{}", "x".repeat(MAX_SUBJECT - prefix.len()));
        assert_eq!(at.chars().count(), 600);
        assert!(!subject_too_long(&at));
        assert!(subject_matches(&patterns[0].subject_pattern, &at));
        assert_eq!(
            find(&[], &patterns, iss, &at, &aud),
            Match::Matched(Matched::Pattern(&patterns[0]))
        );
        let over = format!("{at}x");
        assert!(subject_too_long(&over));
        assert!(subject_matches(&patterns[0].subject_pattern, &over));
        assert_eq!(find(&[], &patterns, iss, &over, &aud), Match::NoSubject);
        // an assertion's worth (48 KB): refused the same way, whatever the issuer
        let huge = format!("{prefix}{}", "x".repeat(48 * 1024));
        assert_eq!(find(&[], &patterns, iss, &huge, &aud), Match::NoSubject);
        assert_eq!(
            find(&[], &patterns, "https://other/", &huge, &aud),
            Match::NoSubject
        );
        // characters, not bytes: 600 two-byte characters are within the bound
        let wide = format!("{prefix}{}", "é".repeat(MAX_SUBJECT - prefix.len()));
        assert!(wide.len() > MAX_SUBJECT);
        assert!(!subject_too_long(&wide));
        assert_eq!(
            find(&[], &patterns, iss, &wide, &aud),
            Match::Matched(Matched::Pattern(&patterns[0]))
        );
        assert!(subject_too_long(&format!("{wide}é")));
    }

    #[test]
    fn patterns_follow_the_rules() {
        let iss = "https://oidc.example/cluster/";
        let good = pattern("team-a", iss, "system:serviceaccount:team-a:*");
        assert_eq!(validate_pattern(&good), Ok(()));
        for bad in ["*", "*:*", ":", "::*", "**:x", "a**", " "] {
            let mut p = good.clone();
            p.subject_pattern = bad.into();
            assert!(validate_pattern(&p).is_err(), "{bad:?}");
        }
        let mut p = good.clone();
        p.subject_pattern = "a**b".into();
        assert_eq!(
            validate_pattern(&p),
            Err(FicError::DoubleWildcard("a**b".into()))
        );
        p.subject_pattern = "*:*".into();
        assert_eq!(validate_pattern(&p), Err(FicError::NoLiteral("*:*".into())));
        p.subject_pattern = format!("x{}", "*x".repeat(300));
        assert_eq!(
            validate_pattern(&p),
            Err(FicError::TooLong("subject pattern"))
        );
        p.subject_pattern = format!("x{}", "*x".repeat(299));
        assert_eq!(validate_pattern(&p), Ok(()));
        let mut p = good.clone();
        p.issuer = "https://oidc.example/*".into();
        assert_eq!(validate_pattern(&p), Err(FicError::Wildcard("issuer")));
        p.issuer = "http://oidc.example/".into();
        assert!(matches!(validate_pattern(&p), Err(FicError::Issuer(_))));
        let mut p = good.clone();
        p.audiences = vec!["api://*".into()];
        assert_eq!(validate_pattern(&p), Err(FicError::Wildcard("audience")));
        p.audiences = vec![];
        assert_eq!(validate_pattern(&p), Err(FicError::Audiences));
        let mut p = good;
        p.name = "a.b".into();
        assert!(matches!(validate_pattern(&p), Err(FicError::Name(_))));
    }

    #[test]
    fn exact_credentials_first_then_patterns_with_entras_errors() {
        let iss = "https://oidc.example/cluster/";
        let aud = ["api://AzureADTokenExchange"];
        let fics = vec![fic("web", iss, "system:serviceaccount:team-a:web")];
        let patterns = vec![pattern("team-a", iss, "system:serviceaccount:team-a:*")];
        // the exact credential wins
        assert_eq!(
            find(
                &fics,
                &patterns,
                iss,
                "system:serviceaccount:team-a:web",
                &aud
            ),
            Match::Matched(Matched::Exact(&fics[0]))
        );
        // then the pattern
        assert_eq!(
            find(
                &fics,
                &patterns,
                iss,
                "system:serviceaccount:team-a:api",
                &aud
            ),
            Match::Matched(Matched::Pattern(&patterns[0]))
        );
        // an exact credential of another audience does not hide a pattern of the right one
        let mut other_aud = fics.clone();
        other_aud[0].audiences = vec!["api://other".into()];
        assert_eq!(
            find(
                &other_aud,
                &patterns,
                iss,
                "system:serviceaccount:team-a:web",
                &aud
            ),
            Match::Matched(Matched::Pattern(&patterns[0]))
        );
        // neither: Entra's codes, the issuer known through either kind
        assert_eq!(
            find(
                &fics,
                &patterns,
                iss,
                "system:serviceaccount:team-b:web",
                &aud
            ),
            Match::NoSubject
        );
        assert_eq!(
            find(
                &[],
                &patterns,
                iss,
                "system:serviceaccount:team-b:web",
                &aud
            ),
            Match::NoSubject
        );
        assert_eq!(
            find(
                &[],
                &patterns,
                "https://other/",
                "system:serviceaccount:team-a:web",
                &aud
            ),
            Match::NoIssuer
        );
        assert_eq!(
            find(
                &[],
                &patterns,
                iss,
                "system:serviceaccount:team-a:web",
                &["api://other"]
            ),
            Match::NoAudience
        );
        assert_eq!(
            find(&fics, &[], iss, "system:serviceaccount:team-a:api", &aud),
            Match::NoSubject
        );
    }
}
