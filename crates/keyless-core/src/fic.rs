//! Federated identity credentials (seed 003, `../shared/spec/identity-protocols.md` §7): the
//! rules a FIC must satisfy, and how an external assertion's `iss` / `sub` / `aud` are matched
//! against an identity's FICs (exact, case-sensitive, trailing slash significant).

use serde::{Deserialize, Serialize};

/// A federated identity credential's matching fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fic {
    pub name: String,
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
}

/// At most this many FICs per identity.
pub const MAX_PER_IDENTITY: usize = 20;
const MAX_FIELD: usize = 600;

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
    if !f.issuer.starts_with("https://") || f.issuer.len() <= "https://".len() {
        return Err(FicError::Issuer(f.issuer.clone()));
    }
    if f.audiences.len() != 1 {
        return Err(FicError::Audiences);
    }
    let aud = &f.audiences[0];
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

/// The outcome of matching an assertion against an identity's FICs, in Entra's order
/// (issuer, then subject, then audience).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match<'a> {
    Matched(&'a Fic),
    /// No FIC has this issuer (AADSTS700211).
    NoIssuer,
    /// Issuer known, no FIC with this subject (AADSTS700213).
    NoSubject,
    /// Issuer and subject match, audience does not (AADSTS700212).
    NoAudience,
}

/// Match `iss`, `sub` and the token's audiences against `fics`.
pub fn find<'a>(fics: &'a [Fic], iss: &str, sub: &str, auds: &[&str]) -> Match<'a> {
    let by_issuer: Vec<&Fic> = fics.iter().filter(|f| f.issuer == iss).collect();
    if by_issuer.is_empty() {
        return Match::NoIssuer;
    }
    let by_subject: Vec<&Fic> = by_issuer.into_iter().filter(|f| f.subject == sub).collect();
    if by_subject.is_empty() {
        return Match::NoSubject;
    }
    by_subject
        .into_iter()
        .find(|f| f.audiences.iter().any(|a| auds.contains(&a.as_str())))
        .map(Match::Matched)
        .unwrap_or(Match::NoAudience)
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
                "https://oidc.example/cluster",
                "system:serviceaccount:ns:sa",
                &aud
            ),
            Match::NoIssuer
        );
        assert_eq!(
            find(
                &fics,
                "https://oidc.example/cluster/",
                "system:serviceaccount:NS:sa",
                &aud
            ),
            Match::NoSubject
        );
        assert_eq!(
            find(
                &fics,
                "https://oidc.example/cluster/",
                "system:serviceaccount:ns:sa",
                &["api://other"]
            ),
            Match::NoAudience
        );
        assert_eq!(find(&[], "x", "y", &aud), Match::NoIssuer);
    }
}
