//! Keys: create (RSA 2048/3072/4096, EC P-256/384/521), import, get, update, list, versions,
//! rotate, the shared soft-delete operations, and the cryptographic operations. Private key
//! material is sealed by the store and never returned.

use super::{
    apply_attrs, bad, check_tags, common, method_not_allowed, parse_body, AttrsIn, Ctx, Render,
};
use crate::error::{KvKind, Result, ServerError};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use keyless_core::vault::access::Op;
use keyless_core::vault::route::{KeyOp, Target};
use keyless_core::vault::Coll;
use keyless_pki::kv::{Curve, KeyType, KvKey};
use keyless_store::{KvVersionRecord, KvWrite, Tx};
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub struct Keys;

const KEY_OPS: &[&str] = &[
    "encrypt",
    "decrypt",
    "sign",
    "verify",
    "wrapKey",
    "unwrapKey",
    "import",
    "export",
];

impl Render for Keys {
    const COLL: Coll = Coll::Keys;

    fn bundle(ctx: &Ctx<'_>, v: &KvVersionRecord, _value: bool) -> Value {
        let mut key = v.public["jwk"].clone();
        key["kid"] = json!(ctx.id(Coll::Keys, &v.name, Some(&v.version)));
        key["key_ops"] = v.public["key_ops"].clone();
        let mut out = json!({"key": key, "attributes": attributes(ctx, v)});
        extra_fields(v, &mut out);
        out
    }

    fn item(ctx: &Ctx<'_>, v: &KvVersionRecord, versioned: bool) -> Value {
        let mut out = json!({
            "kid": ctx.id(Coll::Keys, &v.name, versioned.then_some(v.version.as_str())),
            "attributes": attributes(ctx, v),
        });
        extra_fields(v, &mut out);
        out
    }
}

fn attributes(ctx: &Ctx<'_>, v: &KvVersionRecord) -> Value {
    let mut a = ctx.attributes(v);
    if let Some(e) = v.public["exportable"].as_bool() {
        a["exportable"] = json!(e);
    }
    a
}

fn extra_fields(v: &KvVersionRecord, out: &mut Value) {
    if !v.tags.is_empty() {
        out["tags"] = json!(v.tags);
    }
    if v.managed {
        out["managed"] = json!(true);
    }
}

/// The public part of a key version: JWK (with the requested `kty` spelling), operations.
pub fn public_of(key: &KvKey, kty: &str, key_ops: &[String], exportable: bool) -> Value {
    let mut jwk = Value::Object(key.public_jwk());
    jwk["kty"] = json!(kty);
    json!({"jwk": jwk, "key_ops": key_ops, "exportable": exportable})
}

fn default_ops(t: KeyType) -> Vec<String> {
    let ops: &[&str] = match t {
        KeyType::Rsa { .. } => &[
            "encrypt",
            "decrypt",
            "sign",
            "verify",
            "wrapKey",
            "unwrapKey",
        ],
        KeyType::Ec { .. } => &["sign", "verify"],
    };
    ops.iter().map(|s| s.to_string()).collect()
}

fn check_ops(ops: &[String]) -> Result<Vec<String>> {
    ops.iter()
        .map(|o| {
            KEY_OPS
                .iter()
                .find(|k| k.eq_ignore_ascii_case(o))
                .map(|k| k.to_string())
                .ok_or_else(|| bad(format!("The key operation '{o}' is invalid.")))
        })
        .collect()
}

/// The key type a create request asks for.
fn key_type(
    kty: &str,
    size: Option<u32>,
    crv: Option<&str>,
    exponent: Option<u64>,
) -> Result<KeyType> {
    match kty {
        "RSA" | "RSA-HSM" => {
            let bits = size.unwrap_or(2048);
            if ![2048, 3072, 4096].contains(&bits) {
                return Err(bad(format!(
                    "The key size {bits} is not supported; use 2048, 3072 or 4096."
                )));
            }
            if exponent.is_some_and(|e| e != 65537) {
                return Err(bad("Only the public exponent 65537 is supported."));
            }
            Ok(KeyType::Rsa { bits })
        }
        "EC" | "EC-HSM" => {
            let c = crv.unwrap_or("P-256");
            let curve = Curve::parse(c).ok_or_else(|| {
                bad(format!(
                    "The curve '{c}' is not supported; use P-256, P-384 or P-521."
                ))
            })?;
            Ok(KeyType::Ec { curve })
        }
        "oct" | "oct-HSM" => Err(bad(
            "Symmetric (oct) keys are only supported by Managed HSM.",
        )),
        other => Err(bad(format!("The key type '{other}' is invalid."))),
    }
}

/// Generate a key off the async runtime (RSA 4096 takes a while). Never called with a unit of
/// work open: request handlers get their keys through [`Ctx::key`].
pub async fn generate(t: KeyType) -> Result<KvKey> {
    tokio::task::spawn_blocking(move || KvKey::generate(t))
        .await
        .map_err(|_| ServerError::kv(KvKind::Internal, "Key generation was interrupted."))?
        .map_err(ServerError::from)
}

#[derive(serde::Deserialize)]
struct CreateBody {
    kty: Option<String>,
    key_size: Option<u32>,
    crv: Option<String>,
    public_exponent: Option<u64>,
    key_ops: Option<Vec<String>>,
    attributes: Option<AttrsIn>,
    tags: Option<BTreeMap<String, String>>,
}

fn b64(v: &Value, field: &str) -> Result<Vec<u8>> {
    let s = v[field]
        .as_str()
        .ok_or_else(|| bad(format!("The parameter '{field}' is required.")))?;
    let s = s.trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(s)
        .or_else(|_| URL_SAFE.decode(s))
        .map_err(|_| bad(format!("The parameter '{field}' is not base64url.")))
}

async fn refuse_certificate_name(ctx: &Ctx<'_>, tx: &mut Tx, name: &str) -> Result<()> {
    if tx.kv_name(ctx.vname, "certificates", name).await?.is_some() {
        return Err(ServerError::kv(
            KvKind::Conflict(None),
            format!("Key {name} is managed by a certificate of the same name."),
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn write_new(
    ctx: &Ctx<'_>,
    tx: &mut Tx,
    name: &str,
    key: KvKey,
    kty: &str,
    ops: Vec<String>,
    attrs: AttrsIn,
    tags: BTreeMap<String, String>,
) -> Result<Response> {
    let mut v = ctx.new_version(Coll::Keys, name);
    if let Some(existing) = tx.kv_name(ctx.vname, "keys", name).await? {
        v.name = existing.name;
    }
    v.tags = tags;
    apply_attrs(&mut v, &attrs, true);
    v.public = public_of(&key, kty, &ops, attrs.exportable.unwrap_or(false));
    v.private = Some(key.pkcs8().to_vec());
    ctx.write(
        tx,
        Coll::Keys,
        name,
        &KvWrite {
            versions: vec![v.clone()],
            extra: None,
            expect_latest: None,
        },
    )
    .await?;
    Ok(Json(Keys::bundle(ctx, &v, false)).into_response())
}

pub async fn handle(
    ctx: &Ctx<'_>,
    tx: &mut Tx,
    m: &Method,
    target: Target,
    body: &[u8],
) -> Result<Response> {
    if let Some(r) = common::<Keys>(ctx, tx, m, &target, body).await? {
        return Ok(r);
    }
    match (m, target) {
        (&Method::POST, Target::KeyCreate(name)) => {
            ctx.name(Coll::Keys, &name)?;
            ctx.authorize(tx, Coll::Keys, Op::Create, Some(&name)).await?;
            let b: CreateBody = parse_body(body)?;
            check_tags(&b.tags)?;
            let kty = b
                .kty
                .ok_or_else(|| bad("The parameter 'kty' is required."))?;
            let t = key_type(&kty, b.key_size, b.crv.as_deref(), b.public_exponent)?;
            let ops = match b.key_ops {
                Some(o) => check_ops(&o)?,
                None => default_ops(t),
            };
            refuse_certificate_name(ctx, tx, &name).await?;
            let key = ctx.key(t).await?;
            write_new(
                ctx,
                tx,
                &name,
                key,
                &kty,
                ops,
                b.attributes.unwrap_or_default(),
                b.tags.unwrap_or_default(),
            )
            .await
        }
        (&Method::POST, Target::KeyRotate(name)) => {
            ctx.name(Coll::Keys, &name)?;
            ctx.authorize(tx, Coll::Keys, Op::Rotate, Some(&name)).await?;
            let cur = ctx.live_version(tx, Coll::Keys, &name, None).await?;
            if cur.managed {
                return Err(ServerError::kv(KvKind::Forbidden(None),
                    format!(
                        "Key {name} is managed by a certificate; renew the certificate instead."
                    ),
                ));
            }
            let t = KvKey::from_pkcs8(cur.private.as_deref().unwrap_or_default())?.key_type();
            let key = ctx.key(t).await?;
            let ops: Vec<String> =
                serde_json::from_value(cur.public["key_ops"].clone()).unwrap_or_default();
            let kty = cur.public["jwk"]["kty"]
                .as_str()
                .unwrap_or("RSA")
                .to_string();
            let attrs = AttrsIn {
                exportable: cur.public["exportable"].as_bool(),
                ..Default::default()
            };
            write_new(ctx, tx, &name, key, &kty, ops, attrs, cur.tags.clone()).await
        }
        (
            &Method::PUT,
            Target::Object {
                name,
                version: None,
                slash: false,
                ..
            },
        ) => {
            ctx.name(Coll::Keys, &name)?;
            ctx.authorize(tx, Coll::Keys, Op::Import, Some(&name)).await?;
            #[derive(serde::Deserialize)]
            struct ImportBody {
                key: Option<Value>,
                hsm: Option<bool>,
                attributes: Option<AttrsIn>,
                tags: Option<BTreeMap<String, String>>,
            }
            let b: ImportBody = parse_body(body)?;
            check_tags(&b.tags)?;
            let jwk = b
                .key
                .ok_or_else(|| bad("The parameter 'key' is required."))?;
            let key = KvKey::from_jwk(&jwk).map_err(|e| bad(format!("The key is invalid: {e}")))?;
            let base = match key.key_type() {
                KeyType::Rsa { .. } => "RSA",
                KeyType::Ec { .. } => "EC",
            };
            let kty = if b.hsm == Some(true) {
                format!("{base}-HSM")
            } else {
                base.to_string()
            };
            let ops = match jwk["key_ops"].as_array() {
                Some(a) => check_ops(
                    &a.iter()
                        .filter_map(|o| o.as_str().map(str::to_string))
                        .collect::<Vec<_>>(),
                )?,
                None => default_ops(key.key_type()),
            };
            refuse_certificate_name(ctx, tx, &name).await?;
            write_new(
                ctx,
                tx,
                &name,
                key,
                &kty,
                ops,
                b.attributes.unwrap_or_default(),
                b.tags.unwrap_or_default(),
            )
            .await
        }
        (&Method::GET, Target::Object { name, version, .. }) => {
            ctx.name(Coll::Keys, &name)?;
            ctx.authorize(tx, Coll::Keys, Op::Get, Some(&name)).await?;
            let v = ctx.live_version(tx, Coll::Keys, &name, version.as_deref()).await?;
            Ok(Json(Keys::bundle(ctx, &v, false)).into_response())
        }
        (&Method::PATCH, Target::Object { name, version, .. }) => {
            ctx.name(Coll::Keys, &name)?;
            ctx.authorize(tx, Coll::Keys, Op::Update, Some(&name)).await?;
            #[derive(serde::Deserialize)]
            struct Patch {
                key_ops: Option<Vec<String>>,
                attributes: Option<AttrsIn>,
                tags: Option<BTreeMap<String, String>>,
            }
            let b: Patch = parse_body(body)?;
            check_tags(&b.tags)?;
            let mut v = ctx.live_version(tx, Coll::Keys, &name, version.as_deref()).await?;
            if v.managed {
                return Err(ServerError::kv(KvKind::Forbidden(None),
                    format!(
                        "Key {name} is managed by a certificate; update the certificate instead."
                    ),
                ));
            }
            if let Some(o) = b.key_ops {
                v.public["key_ops"] = json!(check_ops(&o)?);
            }
            if let Some(t) = b.tags {
                v.tags = t;
            }
            apply_attrs(&mut v, &b.attributes.unwrap_or_default(), true);
            v.updated = ctx.now;
            tx.kv_update_version(&v).await?;
            Ok(Json(Keys::bundle(ctx, &v, false)).into_response())
        }
        (&Method::POST, Target::KeyOperation { name, version, op }) => {
            ctx.name(Coll::Keys, &name)?;
            let (aop, wire) = match op {
                KeyOp::Sign => (Op::Sign, "sign"),
                KeyOp::Verify => (Op::Verify, "verify"),
                KeyOp::Encrypt => (Op::Encrypt, "encrypt"),
                KeyOp::Decrypt => (Op::Decrypt, "decrypt"),
                KeyOp::WrapKey => (Op::WrapKey, "wrapKey"),
                KeyOp::UnwrapKey => (Op::UnwrapKey, "unwrapKey"),
            };
            ctx.authorize(tx, Coll::Keys, aop, Some(&name)).await?;
            let b: Value = parse_body(body)?;
            let v = ctx.live_version(tx, Coll::Keys, &name, version.as_deref()).await?;
            if !v.enabled {
                return Err(ServerError::kv(KvKind::Forbidden(Some("KeyDisabled")),
                    format!("Operation {wire} is not allowed on a disabled key."),
                ));
            }
            // date-time controlled operations: outside nbf..exp a key may still verify,
            // decrypt and unwrap what it produced, but not sign, encrypt or wrap
            if matches!(op, KeyOp::Sign | KeyOp::Encrypt | KeyOp::WrapKey) {
                if v.nbf.is_some_and(|n| ctx.now < n) {
                    return Err(ServerError::kv(KvKind::Forbidden(Some("KeyNotYetValid")),
                        format!(
                            "Operation {wire} is not allowed on a key that is not yet valid (nbf)."
                        ),
                    ));
                }
                if v.exp.is_some_and(|e| ctx.now >= e) {
                    return Err(ServerError::kv(KvKind::Forbidden(Some("KeyExpired")),
                        format!("Operation {wire} is not allowed on an expired key."),
                    ));
                }
            }
            let allowed = v.public["key_ops"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|o| o.as_str().is_some_and(|o| o.eq_ignore_ascii_case(wire)))
            });
            if !allowed {
                return Err(bad(format!(
                    "Operation {wire} is not permitted on this key (key_ops)."
                )));
            }
            let alg = b["alg"]
                .as_str()
                .ok_or_else(|| bad("The parameter 'alg' is required."))?
                .to_string();
            let key = KvKey::from_pkcs8(v.private.as_deref().unwrap_or_default())?;
            let kid = ctx.id(Coll::Keys, &v.name, Some(&v.version));
            let crypto = |r: std::result::Result<Vec<u8>, keyless_pki::PkiError>| {
                r.map_err(|e| bad(format!("The {wire} operation failed: {e}")))
            };
            let out = match op {
                KeyOp::Sign => {
                    json!({"kid": kid, "value": URL_SAFE_NO_PAD.encode(crypto(key.sign(&alg, &b64(&b, "value")?))?)})
                }
                KeyOp::Verify => {
                    let ok = key
                        .verify(&alg, &b64(&b, "digest")?, &b64(&b, "value")?)
                        .map_err(|e| bad(format!("The verify operation failed: {e}")))?;
                    json!({"value": ok})
                }
                KeyOp::Encrypt | KeyOp::WrapKey => {
                    json!({"kid": kid, "value": URL_SAFE_NO_PAD.encode(crypto(key.encrypt(&alg, &b64(&b, "value")?))?)})
                }
                KeyOp::Decrypt | KeyOp::UnwrapKey => {
                    json!({"kid": kid, "value": URL_SAFE_NO_PAD.encode(crypto(key.decrypt(&alg, &b64(&b, "value")?))?)})
                }
            };
            Ok(Json(out).into_response())
        }
        (_, Target::KeyRotationPolicy(_)) => Err(bad(
            "Key rotation policies are not supported by this Keyless version; rotate with POST /keys/{name}/rotate.",
        )),
        (m, _) => Err(method_not_allowed(m)),
    }
}
