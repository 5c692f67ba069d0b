//! Certificate policies: the wire shape (snake_case, as the service speaks it), the service's
//! defaults for sparse policies, validation, partial updates, the policy of an imported
//! certificate, and when a lifetime action falls due.

use serde::{Deserialize, Serialize};

/// Server-auth and client-auth EKUs (the default).
pub const EKU_SERVER_AUTH: &str = "1.3.6.1.5.5.7.3.1";
pub const EKU_CLIENT_AUTH: &str = "1.3.6.1.5.5.7.3.2";
pub const PKCS12: &str = "application/x-pkcs12";
pub const PEM: &str = "application/x-pem-file";
/// Issuer names with a meaning of their own: `Self` (self-signed), `Unknown` (CSR + merge),
/// and `Keyless` (signed by the Keyless CA, like an integrated CA).
pub const ISSUER_SELF: &str = "Self";
pub const ISSUER_UNKNOWN: &str = "Unknown";
pub const ISSUER_KEYLESS: &str = "Keyless";

const KEY_USAGES: &[&str] = &[
    "digitalSignature",
    "nonRepudiation",
    "keyEncipherment",
    "dataEncipherment",
    "keyAgreement",
    "keyCertSign",
    "cRLSign",
    "encipherOnly",
    "decipherOnly",
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_props: Option<KeyProps>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_props: Option<SecretProps>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509_props: Option<X509Props>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifetime_actions: Option<Vec<LifetimeAction>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<IssuerParams>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<PolicyAttributes>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyProps {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exportable: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kty: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reuse_key: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecretProps {
    #[serde(rename = "contentType", skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct X509Props {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sans: Option<Sans>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ekus: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_usage: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validity_months: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basic_constraints: Option<BasicConstraints>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sans {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emails: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upns: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uris: Vec<String>,
    #[serde(rename = "ipAddresses", default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
}

impl Sans {
    fn is_empty(&self) -> bool {
        self.dns_names.is_empty()
            && self.emails.is_empty()
            && self.upns.is_empty()
            && self.uris.is_empty()
            && self.ip_addresses.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BasicConstraints {
    #[serde(default)]
    pub ca: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LifetimeAction {
    #[serde(default)]
    pub trigger: Trigger,
    #[serde(default)]
    pub action: ActionSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifetime_percentage: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub days_before_expiry: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActionSpec {
    #[serde(default)]
    pub action_type: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IssuerParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cty: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_transparency: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyAttributes {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated: Option<u64>,
}

/// What a lifetime action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    AutoRenew,
    EmailContacts,
}

/// The key a (normalized) policy asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySpec {
    Rsa(u32),
    Ec(&'static str),
}

fn bad(m: impl Into<String>) -> String {
    m.into()
}

/// Canonical key-usage spelling (input is matched case-insensitively).
fn canonical_usage(u: &str) -> Option<&'static str> {
    KEY_USAGES
        .iter()
        .copied()
        .find(|k| k.eq_ignore_ascii_case(u))
}

fn canonical_curve(c: &str) -> Option<&'static str> {
    ["P-256", "P-384", "P-521"]
        .into_iter()
        .find(|k| k.eq_ignore_ascii_case(c))
}

impl Policy {
    /// The issuer name (`Self` when none is set).
    pub fn issuer_name(&self) -> &str {
        self.issuer
            .as_ref()
            .and_then(|i| i.name.as_deref())
            .unwrap_or(ISSUER_SELF)
    }

    /// The key of a normalized policy.
    pub fn key_spec(&self) -> KeySpec {
        let kp = self.key_props.clone().unwrap_or_default();
        match kp.kty.as_deref() {
            Some(k) if k.starts_with("EC") => KeySpec::Ec(
                kp.crv
                    .as_deref()
                    .and_then(canonical_curve)
                    .unwrap_or("P-256"),
            ),
            _ => KeySpec::Rsa(kp.key_size.unwrap_or(2048)),
        }
    }

    pub fn exportable(&self) -> bool {
        self.key_props
            .as_ref()
            .and_then(|k| k.exportable)
            .unwrap_or(true)
    }

    pub fn content_type(&self) -> &str {
        self.secret_props
            .as_ref()
            .and_then(|s| s.content_type.as_deref())
            .unwrap_or(PKCS12)
    }

    pub fn validity_months(&self) -> u32 {
        self.x509_props
            .as_ref()
            .and_then(|x| x.validity_months)
            .unwrap_or(12)
    }

    /// The first lifetime action, with when it falls due for a certificate valid
    /// `nbf..exp` (Unix seconds).
    pub fn due(&self, nbf: u64, exp: u64) -> Option<(u64, ActionKind)> {
        let a = self.lifetime_actions.as_ref()?.first()?;
        let kind = if a.action.action_type.eq_ignore_ascii_case("AutoRenew") {
            ActionKind::AutoRenew
        } else {
            ActionKind::EmailContacts
        };
        let at = if let Some(p) = a.trigger.lifetime_percentage {
            nbf + exp.saturating_sub(nbf) * u64::from(p) / 100
        } else {
            exp.saturating_sub(u64::from(a.trigger.days_before_expiry?) * 86_400)
        };
        Some((at, kind))
    }

    /// Apply the service's defaults and validate. `for_create`: a policy a certificate is
    /// created from (needs a subject or a SAN).
    pub fn normalize(mut self, for_create: bool) -> Result<Policy, String> {
        // issuer
        let mut issuer = self.issuer.take().unwrap_or_default();
        let name = issuer
            .name
            .take()
            .unwrap_or_else(|| ISSUER_SELF.to_string());
        if name.trim().is_empty() {
            return Err(bad("The issuer name must not be empty."));
        }
        issuer.name = Some(
            [ISSUER_SELF, ISSUER_UNKNOWN, ISSUER_KEYLESS]
                .into_iter()
                .find(|k| k.eq_ignore_ascii_case(&name))
                .map(str::to_string)
                .unwrap_or(name),
        );
        let unknown = issuer.name.as_deref() == Some(ISSUER_UNKNOWN);
        self.issuer = Some(issuer);

        // key
        let mut kp = self.key_props.take().unwrap_or_default();
        let kty = match kp.kty.as_deref() {
            None if kp.crv.is_some() => "EC".to_string(),
            None => "RSA".to_string(),
            Some(k) => ["RSA", "RSA-HSM", "EC", "EC-HSM"]
                .into_iter()
                .find(|c| c.eq_ignore_ascii_case(k))
                .ok_or_else(|| bad(format!("Key type '{k}' is not supported for certificates; use RSA, RSA-HSM, EC or EC-HSM.")))?
                .to_string(),
        };
        if kty.starts_with("EC") {
            let crv = kp.crv.as_deref().unwrap_or("P-256");
            kp.crv = Some(
                canonical_curve(crv)
                    .ok_or_else(|| {
                        bad(format!(
                            "Curve '{crv}' is not supported; use P-256, P-384 or P-521."
                        ))
                    })?
                    .to_string(),
            );
            kp.key_size = None;
        } else {
            let size = kp.key_size.unwrap_or(2048);
            if ![2048, 3072, 4096].contains(&size) {
                return Err(bad(format!(
                    "Key size {size} is not supported; use 2048, 3072 or 4096."
                )));
            }
            kp.key_size = Some(size);
            kp.crv = None;
        }
        if kty.ends_with("-HSM") && kp.exportable == Some(true) {
            return Err(bad("HSM-protected keys cannot be exportable."));
        }
        kp.exportable = Some(kp.exportable.unwrap_or(!kty.ends_with("-HSM")));
        kp.reuse_key = Some(kp.reuse_key.unwrap_or(false));
        kp.kty = Some(kty.clone());
        self.key_props = Some(kp);

        // secret
        let mut sp = self.secret_props.take().unwrap_or_default();
        let ct = sp
            .content_type
            .clone()
            .unwrap_or_else(|| PKCS12.to_string());
        sp.content_type = Some(
            [PKCS12, PEM]
                .into_iter()
                .find(|c| c.eq_ignore_ascii_case(&ct))
                .ok_or_else(|| {
                    bad(format!(
                        "Content type '{ct}' is not supported; use {PKCS12} or {PEM}."
                    ))
                })?
                .to_string(),
        );
        self.secret_props = Some(sp);

        // x509
        let mut x = self.x509_props.take().unwrap_or_default();
        let sans = x.sans.take().unwrap_or_default();
        let subject = x.subject.clone().unwrap_or_default();
        if for_create && subject.trim().is_empty() && sans.is_empty() {
            return Err(bad(
                "The policy must name a subject or at least one subject alternative name.",
            ));
        }
        if !subject.is_empty() && !subject.contains('=') {
            return Err(bad(format!("The subject '{subject}' is not a valid X.500 distinguished name (e.g. CN=example.com).")));
        }
        x.sans = Some(sans);
        x.ekus = Some(
            x.ekus
                .take()
                .unwrap_or_else(|| vec![EKU_SERVER_AUTH.to_string(), EKU_CLIENT_AUTH.to_string()]),
        );
        for e in x.ekus.iter().flatten() {
            if e.is_empty()
                || !e
                    .split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(bad(format!(
                    "The EKU '{e}' is not a dotted object identifier."
                )));
            }
        }
        let usage = match x.key_usage.take() {
            Some(u) => u
                .iter()
                .map(|k| {
                    canonical_usage(k)
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("Key usage '{k}' is not valid.")))
                })
                .collect::<Result<Vec<_>, _>>()?,
            None if kty.starts_with("EC") => vec!["digitalSignature".to_string()],
            None => vec![
                "digitalSignature".to_string(),
                "keyEncipherment".to_string(),
            ],
        };
        x.key_usage = Some(usage);
        let months = x.validity_months.unwrap_or(12);
        if !(1..=1200).contains(&months) {
            return Err(bad(format!(
                "validity_months {months} is out of range (1-1200)."
            )));
        }
        x.validity_months = Some(months);
        x.basic_constraints = Some(x.basic_constraints.take().unwrap_or_default());
        if x.basic_constraints.as_ref().is_some_and(|b| b.ca)
            && self.issuer.as_ref().and_then(|i| i.name.as_deref()) != Some(ISSUER_SELF)
        {
            return Err(bad(
                "Only self-signed (issuer Self) certificates may be CA certificates.",
            ));
        }
        self.x509_props = Some(x);

        // lifetime actions
        let actions = match self.lifetime_actions.take() {
            Some(a) => a,
            None => vec![LifetimeAction {
                trigger: Trigger {
                    lifetime_percentage: Some(80),
                    days_before_expiry: None,
                },
                action: ActionSpec {
                    action_type: if unknown {
                        "EmailContacts"
                    } else {
                        "AutoRenew"
                    }
                    .to_string(),
                },
            }],
        };
        if actions.len() > 1 {
            return Err(bad("Only one lifetime action is supported."));
        }
        let mut out = Vec::with_capacity(actions.len());
        for mut a in actions {
            let t = &a.trigger;
            match (t.lifetime_percentage, t.days_before_expiry) {
                (Some(p), None) if (1..=99).contains(&p) => {}
                (None, Some(d)) if d >= 1 && d <= months * 27 => {}
                (Some(_), Some(_)) => {
                    return Err(bad("A lifetime action trigger takes lifetime_percentage or days_before_expiry, not both."))
                }
                (None, None) => return Err(bad("A lifetime action needs a trigger.")),
                (Some(p), None) => {
                    return Err(bad(format!("lifetime_percentage {p} is out of range (1-99).")))
                }
                (None, Some(d)) => {
                    return Err(bad(format!(
                        "days_before_expiry {d} is out of range (1-{}).",
                        months * 27
                    )))
                }
            }
            let at = a.action.action_type.clone();
            a.action.action_type = if at.eq_ignore_ascii_case("AutoRenew") {
                if unknown {
                    return Err(bad(
                        "AutoRenew is not supported for certificates of issuer Unknown.",
                    ));
                }
                "AutoRenew".to_string()
            } else if at.eq_ignore_ascii_case("EmailContacts") {
                "EmailContacts".to_string()
            } else {
                return Err(bad(format!(
                    "Action type '{at}' is not valid; use AutoRenew or EmailContacts."
                )));
            };
            out.push(a);
        }
        self.lifetime_actions = Some(out);
        let mut attrs = self.attributes.take().unwrap_or_default();
        attrs.enabled = Some(attrs.enabled.unwrap_or(true));
        self.attributes = Some(attrs);
        self.id = None;
        Ok(self)
    }

    /// A partial update: every part the patch names replaces the stored one field by field.
    pub fn merged(&self, patch: Policy) -> Policy {
        let mut p = self.clone();
        if let Some(k) = patch.key_props {
            let cur = p.key_props.get_or_insert_with(Default::default);
            merge_opt(&mut cur.exportable, k.exportable);
            merge_opt(&mut cur.kty, k.kty);
            merge_opt(&mut cur.key_size, k.key_size);
            merge_opt(&mut cur.reuse_key, k.reuse_key);
            merge_opt(&mut cur.crv, k.crv);
        }
        if let Some(s) = patch.secret_props {
            merge_opt(
                &mut p
                    .secret_props
                    .get_or_insert_with(Default::default)
                    .content_type,
                s.content_type,
            );
        }
        if let Some(x) = patch.x509_props {
            let cur = p.x509_props.get_or_insert_with(Default::default);
            merge_opt(&mut cur.subject, x.subject);
            merge_opt(&mut cur.sans, x.sans);
            merge_opt(&mut cur.ekus, x.ekus);
            merge_opt(&mut cur.key_usage, x.key_usage);
            merge_opt(&mut cur.validity_months, x.validity_months);
            merge_opt(&mut cur.basic_constraints, x.basic_constraints);
        }
        merge_opt(&mut p.lifetime_actions, patch.lifetime_actions);
        if let Some(i) = patch.issuer {
            let cur = p.issuer.get_or_insert_with(Default::default);
            merge_opt(&mut cur.name, i.name);
            merge_opt(&mut cur.cty, i.cty);
            merge_opt(&mut cur.cert_transparency, i.cert_transparency);
        }
        if let Some(a) = patch.attributes {
            merge_opt(
                &mut p.attributes.get_or_insert_with(Default::default).enabled,
                a.enabled,
            );
        }
        p
    }
}

fn merge_opt<T>(cur: &mut Option<T>, new: Option<T>) {
    if new.is_some() {
        *cur = new;
    }
}

/// What an imported certificate shows of itself, for the policy derived from it.
#[derive(Debug, Clone, Default)]
pub struct ImportedCert {
    pub subject: String,
    pub sans: Sans,
    pub ekus: Vec<String>,
    pub key_usage: Vec<String>,
    pub not_before: u64,
    pub not_after: u64,
    pub key: Option<KeySpec>,
    pub exportable: bool,
    pub content_type: String,
}

/// The policy of an imported certificate: derived from the X.509 (issuer `Unknown`, e-mail
/// contacts at 80 %), overlaid by whatever policy the import request carried.
pub fn imported_policy(c: &ImportedCert, given: Option<Policy>) -> Result<Policy, String> {
    let months =
        (c.not_after.saturating_sub(c.not_before) as f64 / (30.4375 * 86_400.0)).round() as u32;
    let (kty, key_size, crv) = match c.key {
        Some(KeySpec::Ec(crv)) => ("EC", None, Some(crv.to_string())),
        Some(KeySpec::Rsa(bits)) => ("RSA", Some(bits), None),
        None => ("RSA", Some(2048), None),
    };
    let derived = Policy {
        key_props: Some(KeyProps {
            exportable: Some(c.exportable),
            kty: Some(kty.into()),
            key_size,
            reuse_key: Some(false),
            crv,
        }),
        secret_props: Some(SecretProps {
            content_type: Some(c.content_type.clone()),
        }),
        x509_props: Some(X509Props {
            subject: Some(c.subject.clone()),
            sans: Some(c.sans.clone()),
            ekus: Some(c.ekus.clone()),
            key_usage: Some(c.key_usage.clone()),
            validity_months: Some(months.clamp(1, 1200)),
            basic_constraints: None,
        }),
        lifetime_actions: Some(vec![LifetimeAction {
            trigger: Trigger {
                lifetime_percentage: Some(80),
                days_before_expiry: None,
            },
            action: ActionSpec {
                action_type: "EmailContacts".into(),
            },
        }]),
        issuer: Some(IssuerParams {
            name: Some(ISSUER_UNKNOWN.into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let p = match given {
        Some(g) => derived.merged(Policy {
            key_props: None,
            x509_props: None,
            ..g
        }),
        None => derived,
    };
    p.normalize(false)
}

/// Key operations of a certificate's key, from its key usage.
pub fn key_ops(key_usage: &[String]) -> Vec<&'static str> {
    let mut ops: Vec<&'static str> = vec![];
    let mut add = |o: &[&'static str]| {
        for x in o {
            if !ops.contains(x) {
                ops.push(x);
            }
        }
    };
    if key_usage.is_empty() {
        add(&["sign", "verify", "wrapKey", "unwrapKey"]);
    }
    for u in key_usage {
        match canonical_usage(u) {
            Some("digitalSignature" | "nonRepudiation" | "keyCertSign" | "cRLSign") => {
                add(&["sign", "verify"])
            }
            Some("keyEncipherment") => add(&["wrapKey", "unwrapKey"]),
            Some("dataEncipherment") => add(&["encrypt", "decrypt"]),
            Some("encipherOnly") => add(&["encrypt"]),
            Some("decipherOnly") => add(&["decrypt"]),
            _ => {}
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Policy {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn sparse_policy_gets_service_defaults() {
        let p = parse(json!({"issuer": {"name": "self"}, "x509_props": {"subject": "CN=a"}}))
            .normalize(true)
            .unwrap();
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v["key_props"],
            json!({"exportable": true, "kty": "RSA", "key_size": 2048, "reuse_key": false})
        );
        assert_eq!(
            v["secret_props"],
            json!({"contentType": "application/x-pkcs12"})
        );
        assert_eq!(
            v["x509_props"]["ekus"],
            json!([EKU_SERVER_AUTH, EKU_CLIENT_AUTH])
        );
        assert_eq!(
            v["x509_props"]["key_usage"],
            json!(["digitalSignature", "keyEncipherment"])
        );
        assert_eq!(v["x509_props"]["validity_months"], 12);
        assert_eq!(v["x509_props"]["basic_constraints"], json!({"ca": false}));
        assert_eq!(v["x509_props"]["sans"], json!({}));
        assert_eq!(
            v["lifetime_actions"],
            json!([{"trigger": {"lifetime_percentage": 80}, "action": {"action_type": "AutoRenew"}}])
        );
        assert_eq!(v["issuer"]["name"], "Self");
        assert_eq!(p.key_spec(), KeySpec::Rsa(2048));
    }

    #[test]
    fn ec_and_validation() {
        let p = parse(json!({"key_props": {"kty": "EC", "crv": "p-384"}, "x509_props": {"sans": {"dns_names": ["a.example"]}}}))
            .normalize(true)
            .unwrap();
        assert_eq!(p.key_spec(), KeySpec::Ec("P-384"));
        assert_eq!(
            p.x509_props.unwrap().key_usage.unwrap(),
            vec!["digitalSignature"]
        );
        for bad in [
            json!({"x509_props": {}}),
            json!({"x509_props": {"subject": "nodn"}}),
            json!({"x509_props": {"subject": "CN=a"}, "key_props": {"key_size": 1024}}),
            json!({"x509_props": {"subject": "CN=a"}, "key_props": {"kty": "oct"}}),
            json!({"x509_props": {"subject": "CN=a"}, "key_props": {"kty": "EC", "crv": "P-256K"}}),
            json!({"x509_props": {"subject": "CN=a"}, "secret_props": {"contentType": "text/plain"}}),
            json!({"x509_props": {"subject": "CN=a", "key_usage": ["sign"]}}),
            json!({"x509_props": {"subject": "CN=a", "validity_months": 0}}),
            json!({"x509_props": {"subject": "CN=a"}, "lifetime_actions": [{"trigger": {"lifetime_percentage": 100}, "action": {"action_type": "AutoRenew"}}]}),
            json!({"x509_props": {"subject": "CN=a", "validity_months": 1}, "lifetime_actions": [{"trigger": {"days_before_expiry": 28}, "action": {"action_type": "AutoRenew"}}]}),
            json!({"x509_props": {"subject": "CN=a"}, "lifetime_actions": [{"trigger": {}, "action": {"action_type": "AutoRenew"}}]}),
            json!({"x509_props": {"subject": "CN=a"}, "lifetime_actions": [{"trigger": {"lifetime_percentage": 50}, "action": {"action_type": "Explode"}}]}),
            json!({"issuer": {"name": "Unknown"}, "x509_props": {"subject": "CN=a"}, "lifetime_actions": [{"trigger": {"lifetime_percentage": 50}, "action": {"action_type": "AutoRenew"}}]}),
        ] {
            assert!(parse(bad.clone()).normalize(true).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_issuer_defaults_to_email_contacts() {
        let p = parse(json!({"issuer": {"name": "unknown"}, "x509_props": {"subject": "CN=a"}}))
            .normalize(true)
            .unwrap();
        assert_eq!(p.issuer_name(), "Unknown");
        assert_eq!(p.due(0, 100).unwrap().1, ActionKind::EmailContacts);
    }

    #[test]
    fn due_points() {
        let month = 30 * 86_400;
        let p = parse(json!({"x509_props": {"subject": "CN=a", "validity_months": 1}, "lifetime_actions": [{"trigger": {"days_before_expiry": 7}, "action": {"action_type": "autorenew"}}]}))
            .normalize(true)
            .unwrap();
        assert_eq!(
            p.due(1000, 1000 + month),
            Some((1000 + month - 7 * 86_400, ActionKind::AutoRenew))
        );
        let p = parse(json!({"x509_props": {"subject": "CN=a"}}))
            .normalize(true)
            .unwrap();
        assert_eq!(p.due(0, 1000), Some((800, ActionKind::AutoRenew)));
        let mut none = p.clone();
        none.lifetime_actions = Some(vec![]);
        assert_eq!(none.due(0, 1000), None);
    }

    #[test]
    fn partial_update_keeps_the_rest() {
        let p = parse(json!({"x509_props": {"subject": "CN=a", "validity_months": 6}}))
            .normalize(true)
            .unwrap();
        let patch = parse(
            json!({"lifetime_actions": [{"trigger": {"days_before_expiry": 10}, "action": {"action_type": "AutoRenew"}}], "x509_props": {"subject": "CN=b"}}),
        );
        let m = p.merged(patch).normalize(true).unwrap();
        let x = m.x509_props.clone().unwrap();
        assert_eq!(x.subject.as_deref(), Some("CN=b"));
        assert_eq!(x.validity_months, Some(6));
        assert_eq!(
            m.lifetime_actions.unwrap()[0].trigger.days_before_expiry,
            Some(10)
        );
        assert_eq!(m.key_props, p.key_props);
    }

    #[test]
    fn imported() {
        let c = ImportedCert {
            subject: "CN=x".into(),
            not_before: 0,
            not_after: 365 * 86_400,
            key: Some(KeySpec::Ec("P-256")),
            exportable: true,
            content_type: PEM.into(),
            ..Default::default()
        };
        let p = imported_policy(&c, None).unwrap();
        assert_eq!(p.issuer_name(), "Unknown");
        assert_eq!(p.validity_months(), 12);
        assert_eq!(p.content_type(), PEM);
        assert_eq!(p.key_spec(), KeySpec::Ec("P-256"));
        assert_eq!(p.due(0, 100).unwrap().1, ActionKind::EmailContacts);
    }

    #[test]
    fn ops_from_usage() {
        assert_eq!(
            key_ops(&["digitalSignature".into(), "keyEncipherment".into()]),
            vec!["sign", "verify", "wrapKey", "unwrapKey"]
        );
        assert_eq!(key_ops(&[]), vec!["sign", "verify", "wrapKey", "unwrapKey"]);
        assert_eq!(
            key_ops(&["dataEncipherment".into()]),
            vec!["encrypt", "decrypt"]
        );
    }
}

/// `t` (Unix seconds) plus `months` calendar months (the day clamped to the month's length),
/// the validity end of a certificate issued at `t`.
pub fn add_months(t: u64, months: u32) -> u64 {
    use crate::clock::{civil_from_days, days_from_civil};
    let (days, secs) = ((t / 86_400) as i64, t % 86_400);
    let (y, m, d) = civil_from_days(days);
    let total = y * 12 + i64::from(m - 1) + i64::from(months);
    let (ny, nm) = (total.div_euclid(12), (total.rem_euclid(12) + 1) as u32);
    let leap = (ny % 4 == 0 && ny % 100 != 0) || ny % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let nd = d.min(month_days[(nm - 1) as usize]);
    days_from_civil(ny, nm, nd) as u64 * 86_400 + secs
}

#[cfg(test)]
mod month_tests {
    use super::add_months;

    #[test]
    fn calendar_months() {
        // 2026-01-31T12:00:00Z + 1 month = 2026-02-28T12:00:00Z
        assert_eq!(add_months(1_769_860_800, 1), 1_772_280_000);
        // 2024-02-29 + 12 months = 2025-02-28
        assert_eq!(add_months(1_709_164_800, 12), 1_740_700_800);
        // 2026-11-22T00:00:00Z + 12 = 2027-11-22
        assert_eq!(add_months(1_795_305_600, 12), 1_826_841_600);
        assert_eq!(add_months(1_795_305_600, 0), 1_795_305_600);
    }
}
