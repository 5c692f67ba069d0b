//! Data-plane paths → what they address. The method decides the operation; this only parses.
//! Fixed segments are matched case-insensitively; names are returned as sent.

use super::Coll;

/// A cryptographic operation on a key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOp {
    Sign,
    Verify,
    Encrypt,
    Decrypt,
    WrapKey,
    UnwrapKey,
}

impl KeyOp {
    fn parse(s: &str) -> Option<KeyOp> {
        Some(match s.to_ascii_lowercase().as_str() {
            "sign" => KeyOp::Sign,
            "verify" => KeyOp::Verify,
            "encrypt" => KeyOp::Encrypt,
            "decrypt" => KeyOp::Decrypt,
            "wrapkey" => KeyOp::WrapKey,
            "unwrapkey" => KeyOp::UnwrapKey,
            _ => return None,
        })
    }
}

/// What a data-plane path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `/{coll}`
    List(Coll),
    /// `/deleted{coll}`
    Deleted(Coll),
    /// `/deleted{coll}/{name}`
    DeletedItem(Coll, String),
    /// `/deleted{coll}/{name}/recover`
    Recover(Coll, String),
    /// `/{coll}/restore`
    Restore(Coll),
    /// `/{coll}/{name}` (version None, `slash` false), `/{coll}/{name}/` (latest, `slash`
    /// true) or `/{coll}/{name}/{version}`.
    Object {
        coll: Coll,
        name: String,
        version: Option<String>,
        slash: bool,
    },
    /// `/{coll}/{name}/versions`
    Versions(Coll, String),
    /// `/{coll}/{name}/backup`
    Backup(Coll, String),
    /// `/keys/{name}/create`
    KeyCreate(String),
    /// `/keys/{name}/rotate`
    KeyRotate(String),
    /// `/keys/{name}/rotationpolicy`
    KeyRotationPolicy(String),
    /// `/keys/{name}/{version}/{op}` (an empty version means the latest)
    KeyOperation {
        name: String,
        version: Option<String>,
        op: KeyOp,
    },
    /// `/certificates/{name}/create`
    CertCreate(String),
    /// `/certificates/{name}/import`
    CertImport(String),
    /// `/certificates/{name}/pending`
    CertPending(String),
    /// `/certificates/{name}/pending/merge`
    CertMerge(String),
    /// `/certificates/{name}/policy`
    CertPolicy(String),
    /// `/certificates/contacts`
    Contacts,
    /// `/certificates/issuers`
    Issuers,
    /// `/certificates/issuers/{name}`
    Issuer(String),
}

/// Parse a data-plane path (without query). `None` for paths the data plane does not serve.
pub fn parse(path: &str) -> Option<Target> {
    let rest = path.strip_prefix('/')?;
    let segs: Vec<&str> = rest.split('/').collect();
    let (coll, deleted) = Coll::from_path(segs[0])?;
    let is = |s: &str, w: &str| s.eq_ignore_ascii_case(w);
    let name = |s: &str| s.to_string();
    let t = if deleted {
        match segs[1..] {
            [] | [""] => Target::Deleted(coll),
            [n] => Target::DeletedItem(coll, name(n)),
            [n, r] if is(r, "recover") => Target::Recover(coll, name(n)),
            _ => return None,
        }
    } else {
        match (coll, &segs[1..]) {
            (_, []) | (_, [""]) => Target::List(coll),
            (_, [r]) if is(r, "restore") => Target::Restore(coll),
            (Coll::Certificates, [c]) if is(c, "contacts") => Target::Contacts,
            (Coll::Certificates, [i]) if is(i, "issuers") => Target::Issuers,
            (Coll::Certificates, [i, n]) if is(i, "issuers") && !n.is_empty() => {
                Target::Issuer(name(n))
            }
            (_, [n]) => Target::Object {
                coll,
                name: name(n),
                version: None,
                slash: false,
            },
            (_, [n, ""]) => Target::Object {
                coll,
                name: name(n),
                version: None,
                slash: true,
            },
            (_, [n, v]) if is(v, "versions") => Target::Versions(coll, name(n)),
            (_, [n, b]) if is(b, "backup") => Target::Backup(coll, name(n)),
            (Coll::Keys, [n, c]) if is(c, "create") => Target::KeyCreate(name(n)),
            (Coll::Keys, [n, r]) if is(r, "rotate") => Target::KeyRotate(name(n)),
            (Coll::Keys, [n, r]) if is(r, "rotationpolicy") => Target::KeyRotationPolicy(name(n)),
            (Coll::Keys, [n, v, op]) => Target::KeyOperation {
                name: name(n),
                version: (!v.is_empty()).then(|| v.to_string()),
                op: KeyOp::parse(op)?,
            },
            (Coll::Certificates, [n, c]) if is(c, "create") => Target::CertCreate(name(n)),
            (Coll::Certificates, [n, i]) if is(i, "import") => Target::CertImport(name(n)),
            (Coll::Certificates, [n, p]) if is(p, "pending") => Target::CertPending(name(n)),
            (Coll::Certificates, [n, p]) if is(p, "policy") => Target::CertPolicy(name(n)),
            (Coll::Certificates, [n, p, m]) if is(p, "pending") && is(m, "merge") => {
                Target::CertMerge(name(n))
            }
            (_, [n, v]) => Target::Object {
                coll,
                name: name(n),
                version: Some(v.to_string()),
                slash: false,
            },
            _ => return None,
        }
    };
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(coll: Coll, n: &str, v: Option<&str>, slash: bool) -> Target {
        Target::Object {
            coll,
            name: n.into(),
            version: v.map(str::to_string),
            slash,
        }
    }

    #[test]
    fn secrets() {
        assert_eq!(parse("/secrets"), Some(Target::List(Coll::Secrets)));
        assert_eq!(parse("/secrets/"), Some(Target::List(Coll::Secrets)));
        assert_eq!(
            parse("/secrets/a"),
            Some(obj(Coll::Secrets, "a", None, false))
        );
        assert_eq!(
            parse("/secrets/a/"),
            Some(obj(Coll::Secrets, "a", None, true))
        );
        assert_eq!(
            parse("/secrets/a/abc"),
            Some(obj(Coll::Secrets, "a", Some("abc"), false))
        );
        assert_eq!(
            parse("/secrets/a/versions"),
            Some(Target::Versions(Coll::Secrets, "a".into()))
        );
        assert_eq!(
            parse("/secrets/a/backup"),
            Some(Target::Backup(Coll::Secrets, "a".into()))
        );
        assert_eq!(
            parse("/secrets/restore"),
            Some(Target::Restore(Coll::Secrets))
        );
        assert_eq!(
            parse("/deletedsecrets"),
            Some(Target::Deleted(Coll::Secrets))
        );
        assert_eq!(
            parse("/deletedsecrets/a"),
            Some(Target::DeletedItem(Coll::Secrets, "a".into()))
        );
        assert_eq!(
            parse("/deletedsecrets/a/recover"),
            Some(Target::Recover(Coll::Secrets, "a".into()))
        );
        assert_eq!(parse("/secrets/a/b/c"), None);
        assert_eq!(parse("/other"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn keys_and_certs() {
        assert_eq!(parse("/keys/k/create"), Some(Target::KeyCreate("k".into())));
        assert_eq!(
            parse("/keys/k/0123/wrapkey"),
            Some(Target::KeyOperation {
                name: "k".into(),
                version: Some("0123".into()),
                op: KeyOp::WrapKey
            })
        );
        assert_eq!(
            parse("/keys/k//sign"),
            Some(Target::KeyOperation {
                name: "k".into(),
                version: None,
                op: KeyOp::Sign
            })
        );
        assert_eq!(parse("/keys/k/v/explode"), None);
        assert_eq!(
            parse("/certificates/c/create"),
            Some(Target::CertCreate("c".into()))
        );
        assert_eq!(
            parse("/certificates/c/pending"),
            Some(Target::CertPending("c".into()))
        );
        assert_eq!(
            parse("/certificates/c/pending/merge"),
            Some(Target::CertMerge("c".into()))
        );
        assert_eq!(
            parse("/certificates/c/policy"),
            Some(Target::CertPolicy("c".into()))
        );
        assert_eq!(parse("/certificates/contacts"), Some(Target::Contacts));
        assert_eq!(
            parse("/certificates/issuers/x"),
            Some(Target::Issuer("x".into()))
        );
        assert_eq!(
            parse("/deletedcertificates/c/recover"),
            Some(Target::Recover(Coll::Certificates, "c".into()))
        );
    }
}
