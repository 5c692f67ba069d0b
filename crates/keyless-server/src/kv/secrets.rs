//! Secrets: set, get (latest / version), update, list, versions, and the shared soft-delete
//! operations. Values are sealed by the store; a certificate's secret is read-only here.

use super::{
    apply_attrs, bad, check_tags, common, json_response, method_not_allowed, parse_body,
    Attributes, AttrsIn, Ctx, Render, MAX_SECRET_VALUE,
};
use crate::error::{KvKind, Result, ServerError};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyless_core::vault::access::Op;
use keyless_core::vault::route::Target;
use keyless_core::vault::{self as kvrules, Coll};
use keyless_store::{KvVersionRecord, KvWrite, Tx};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;

pub struct Secrets;

/// A `SecretBundle`, typed: a GET writes it straight into the response body. Fields are
/// declared in the order of their JSON names' bytes — the order a `serde_json::Value` object
/// keeps — so the body is the same as the [`Render::bundle`] `Value`'s.
#[derive(serde::Serialize)]
struct Bundle<'a> {
    attributes: Attributes,
    #[serde(rename = "contentType", skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    id: String,
    /// A certificate's secret names the certificate's key.
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    managed: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tags: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Cow<'a, str>>,
}

impl<'a> Bundle<'a> {
    fn of(ctx: &Ctx<'_>, v: &'a KvVersionRecord, value: bool) -> Self {
        Bundle {
            attributes: ctx.attrs(v),
            content_type: v.content_type.as_deref(),
            id: ctx.id(Coll::Secrets, &v.name, Some(&v.version)),
            kid: v
                .managed
                .then(|| ctx.id(Coll::Keys, &v.name, Some(&v.version))),
            managed: v.managed,
            tags: &v.tags,
            value: value.then(|| String::from_utf8_lossy(v.private.as_deref().unwrap_or_default())),
        }
    }
}

impl Render for Secrets {
    const COLL: Coll = Coll::Secrets;

    fn bundle(ctx: &Ctx<'_>, v: &KvVersionRecord, value: bool) -> Value {
        serde_json::to_value(Bundle::of(ctx, v, value)).unwrap_or_default()
    }

    fn item(ctx: &Ctx<'_>, v: &KvVersionRecord, versioned: bool) -> Value {
        let mut out = json!({
            "id": ctx.id(Coll::Secrets, &v.name, versioned.then_some(v.version.as_str())),
            "attributes": ctx.attributes(v),
        });
        common_fields(ctx, v, &mut out);
        out.as_object_mut().map(|o| o.remove("kid"));
        out
    }
}

fn common_fields(ctx: &Ctx<'_>, v: &KvVersionRecord, out: &mut Value) {
    if let Some(ct) = &v.content_type {
        out["contentType"] = json!(ct);
    }
    if !v.tags.is_empty() {
        out["tags"] = json!(v.tags);
    }
    if v.managed {
        out["managed"] = json!(true);
        out["kid"] = json!(ctx.id(Coll::Keys, &v.name, Some(&v.version)));
    }
}

/// A new version's parameters (`SecretSetParameters`).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SetBody {
    pub(super) value: Option<String>,
    pub(super) content_type: Option<String>,
    pub(super) attributes: Option<AttrsIn>,
    pub(super) tags: Option<BTreeMap<String, String>>,
}

/// A version's updatable fields (`SecretUpdateParameters`).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Patch {
    pub(super) content_type: Option<String>,
    pub(super) attributes: Option<AttrsIn>,
    pub(super) tags: Option<BTreeMap<String, String>>,
}

fn check_content_type(ct: &Option<String>) -> Result<()> {
    if ct.as_ref().is_some_and(|c| c.len() > 255) {
        return Err(bad("The content type must be at most 255 characters."));
    }
    Ok(())
}

pub async fn handle(
    ctx: &Ctx<'_>,
    tx: &mut Tx,
    m: &Method,
    target: Target,
    body: &[u8],
) -> Result<Response> {
    if let Some(r) = common::<Secrets>(ctx, tx, m, &target, body).await? {
        return Ok(r);
    }
    match (m, target) {
        (
            &Method::PUT,
            Target::Object {
                name,
                version: None,
                slash: false,
                ..
            },
        ) => {
            ctx.name(Coll::Secrets, &name)?;
            ctx.authorize(tx, Coll::Secrets, Op::Set, Some(&name))
                .await?;
            let b: SetBody = parse_body(body)?;
            let (v, _) = set(ctx, tx, &name, b).await?;
            Ok(Json(Secrets::bundle(ctx, &v, true)).into_response())
        }
        (&Method::GET, Target::Object { name, version, .. }) => {
            ctx.name(Coll::Secrets, &name)?;
            ctx.authorize(tx, Coll::Secrets, Op::Get, Some(&name))
                .await?;
            let v = ctx
                .live_version(tx, Coll::Secrets, &name, version.as_deref())
                .await?;
            if let Some((code, message)) =
                kvrules::secret_unreadable(v.enabled, v.managed, v.nbf, v.exp, ctx.now)
            {
                return Err(ServerError::kv(KvKind::Forbidden(Some(code)), message));
            }
            Ok(json_response(&Bundle::of(ctx, &v, true)))
        }
        (&Method::PATCH, Target::Object { name, version, .. }) => {
            ctx.name(Coll::Secrets, &name)?;
            ctx.authorize(tx, Coll::Secrets, Op::Update, Some(&name))
                .await?;
            let b: Patch = parse_body(body)?;
            let v = update(ctx, tx, &name, version.as_deref(), b).await?;
            Ok(Json(Secrets::bundle(ctx, &v, false)).into_response())
        }
        (m, _) => Err(method_not_allowed(m)),
    }
}

/// Write a new version of secret `name` (`PUT /secrets/{name}` once its caller is authorized;
/// also the control plane's `Microsoft.KeyVault/vaults/secrets`): the value is sealed by the
/// store when written. Returns the version and whether the name was new to the vault.
pub(super) async fn set(
    ctx: &Ctx<'_>,
    tx: &mut Tx,
    name: &str,
    b: SetBody,
) -> Result<(KvVersionRecord, bool)> {
    let value = b
        .value
        .ok_or_else(|| bad("The secret value is required."))?;
    if value.len() > MAX_SECRET_VALUE {
        return Err(bad(format!(
            "The secret value exceeds the maximum size of {MAX_SECRET_VALUE} bytes."
        )));
    }
    check_content_type(&b.content_type)?;
    check_tags(&b.tags)?;
    if tx.kv_name(ctx.vname, "certificates", name).await?.is_some() {
        return Err(ServerError::kv(KvKind::Conflict(None),
            format!("Secret {name} is managed by a certificate of the same name; set a new version through the certificate."),
        ));
    }
    let mut v = ctx.new_version(Coll::Secrets, name);
    let existing = tx.kv_name(ctx.vname, "secrets", name).await?;
    let created = existing.is_none();
    if let Some(existing) = existing {
        v.name = existing.name;
    }
    v.content_type = b.content_type;
    v.tags = b.tags.unwrap_or_default();
    apply_attrs(&mut v, &b.attributes.unwrap_or_default(), true);
    v.private = Some(value.into_bytes());
    ctx.write(
        tx,
        Coll::Secrets,
        name,
        &KvWrite {
            versions: vec![v.clone()],
            extra: None,
            expect_latest: None,
        },
    )
    .await?;
    Ok((v, created))
}

/// Update the attributes, content type and tags of a version (`None`: the latest) of secret
/// `name` in place (`PATCH /secrets/{name}[/{version}]` once its caller is authorized).
pub(super) async fn update(
    ctx: &Ctx<'_>,
    tx: &mut Tx,
    name: &str,
    version: Option<&str>,
    b: Patch,
) -> Result<KvVersionRecord> {
    check_content_type(&b.content_type)?;
    check_tags(&b.tags)?;
    let mut v = ctx.live_version(tx, Coll::Secrets, name, version).await?;
    if v.managed {
        return Err(ServerError::kv(
            KvKind::Forbidden(None),
            format!("Secret {name} is managed by a certificate; update the certificate instead."),
        ));
    }
    if b.content_type.is_some() {
        v.content_type = b.content_type;
    }
    if let Some(t) = b.tags {
        v.tags = t;
    }
    apply_attrs(&mut v, &b.attributes.unwrap_or_default(), true);
    v.updated = ctx.now;
    tx.kv_update_version(&v).await?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(soft_delete: bool, times: bool) -> Attributes {
        Attributes {
            created: 10,
            enabled: true,
            exp: times.then_some(30),
            nbf: times.then_some(5),
            recoverable_days: soft_delete.then_some(90),
            recovery_level: "Recoverable+Purgeable",
            updated: 20,
        }
    }

    /// The body a GET writes from the typed bundle is, byte for byte, the one the `Value`
    /// built as before (`json!` + the optional fields) serializes to.
    #[test]
    fn typed_bundle_writes_the_value_body() {
        let tags: BTreeMap<String, String> = [("env".to_string(), "prod".to_string())].into();
        let none = BTreeMap::new();
        for (soft, times, ct, managed, tags, value) in [
            (true, false, None, false, &none, Some("s3cret")),
            (false, true, Some("text/plain"), false, &tags, Some("é\"\n")),
            (
                true,
                true,
                Some("application/x-pem-file"),
                true,
                &tags,
                Some("PEM"),
            ),
            (true, false, None, false, &none, None),
        ] {
            let b = Bundle {
                attributes: attrs(soft, times),
                content_type: ct,
                id: "https://kv.vault.localhost/secrets/n/v1".into(),
                kid: managed.then(|| "https://kv.vault.localhost/keys/n/v1".to_string()),
                managed,
                tags,
                value: value.map(Cow::Borrowed),
            };
            // as the bundle was built before: json! then the optional fields
            let mut a = json!({"enabled": true, "created": 10, "updated": 20, "recoveryLevel": "Recoverable+Purgeable"});
            if times {
                a["nbf"] = json!(5);
                a["exp"] = json!(30);
            }
            if soft {
                a["recoverableDays"] = json!(90u32);
            }
            let mut want =
                json!({"id": "https://kv.vault.localhost/secrets/n/v1", "attributes": a});
            if let Some(v) = value {
                want["value"] = json!(v);
            }
            if let Some(c) = ct {
                want["contentType"] = json!(c);
            }
            if !tags.is_empty() {
                want["tags"] = json!(tags);
            }
            if managed {
                want["managed"] = json!(true);
                want["kid"] = json!("https://kv.vault.localhost/keys/n/v1");
            }
            let direct = serde_json::to_vec(&b).unwrap();
            assert_eq!(
                String::from_utf8(direct).unwrap(),
                serde_json::to_string(&want).unwrap()
            );
            assert_eq!(serde_json::to_value(&b).unwrap(), want);
        }
    }
}
