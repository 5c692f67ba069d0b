//! Backup and restore of one object with all its versions (a certificate with its key and
//! secret). The blob is opaque: JSON sealed (AES-256-GCM) under a backup key that is itself
//! kept encrypted in the store, bound to this tenant — it restores into any vault of the same
//! Keyless instance, like Azure's restore within a subscription's geography.

use super::{bad, Ctx, Render};
use crate::error::{KvKind, Result, ServerError};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use keyless_core::vault::access::Op;
use keyless_core::vault::Coll;
use keyless_store::{Kek, KvVersionRecord, KvWrite, Tx};
use serde_json::{json, Value};

const MAGIC: &str = "keyless-kv-backup-1";

/// The backup key, made on first use (in the request's write unit of work).
async fn backup_key(tx: &mut Tx) -> Result<Kek> {
    let bytes = match tx.get_secret("kv_backup_key").await? {
        Some(k) => k,
        None => {
            let mut k = [0u8; 32];
            aws_lc_rs::rand::fill(&mut k)
                .map_err(|_| ServerError::kv(KvKind::Internal, "No randomness."))?;
            // the first writer wins; everyone uses what is stored
            tx.put_secret_if_absent("kv_backup_key", &k).await?;
            tx.get_secret("kv_backup_key")
                .await?
                .unwrap_or_else(|| k.to_vec())
        }
    };
    Ok(Kek::from_bytes(&bytes)?)
}

fn aad(ctx: &Ctx<'_>, coll: Coll) -> String {
    format!("{MAGIC}:{}:{}", ctx.s.tenant_id, coll.path())
}

fn colls(coll: Coll) -> Vec<Coll> {
    match coll {
        Coll::Certificates => vec![Coll::Certificates, Coll::Keys, Coll::Secrets],
        c => vec![c],
    }
}

/// `POST /{coll}/{name}/backup`.
pub async fn backup<R: Render>(ctx: &Ctx<'_>, tx: &mut Tx, name: &str) -> Result<Response> {
    let coll = R::COLL;
    ctx.name(coll, name)?;
    ctx.authorize(tx, coll, Op::Backup, Some(name)).await?;
    let latest = ctx.live_version(tx, coll, name, None).await?;
    if latest.managed {
        return Err(ServerError::kv(
            KvKind::Forbidden(None),
            format!(
                "{} {name} is managed by a certificate; back up the certificate.",
                coll.noun()
            ),
        ));
    }
    let mut objects = vec![];
    for c in colls(coll) {
        let mut versions = vec![];
        for v in tx.kv_versions(ctx.vname, c.path(), name).await? {
            let full = tx
                .kv_version(ctx.vname, c.path(), name, Some(&v.version))
                .await?
                .ok_or_else(|| ctx.not_found(coll, name, None))?;
            let private = full.private.as_deref().map(|p| STANDARD.encode(p));
            versions.push(json!({"record": full, "private": private}));
        }
        let extra = tx
            .kv_name(ctx.vname, c.path(), name)
            .await?
            .map(|n| n.extra);
        objects.push(json!({"coll": c.path(), "versions": versions, "extra": extra}));
    }
    let plain = serde_json::to_vec(&json!({"name": latest.name, "objects": objects}))
        .map_err(|e| ServerError::kv(KvKind::Internal, e.to_string()))?;
    let sealed = backup_key(tx).await?.seal(&aad(ctx, coll), &plain)?;
    Ok(Json(json!({"value": URL_SAFE_NO_PAD.encode(sealed)})).into_response())
}

/// `POST /{coll}/restore`: returns the restored latest version.
pub async fn restore<R: Render>(ctx: &Ctx<'_>, tx: &mut Tx, body: &[u8]) -> Result<Response> {
    let coll = R::COLL;
    ctx.authorize(tx, coll, Op::Restore, None).await?;
    let b: Value = super::parse_body(body)?;
    let blob = b["value"]
        .as_str()
        .ok_or_else(|| bad("The parameter 'value' is required."))?;
    let invalid = || {
        bad("The backup blob is invalid, corrupt, or was made by another Keyless instance or for another object type.")
    };
    let sealed = URL_SAFE_NO_PAD
        .decode(blob.trim_end_matches('='))
        .map_err(|_| invalid())?;
    let plain = backup_key(tx)
        .await?
        .open(&aad(ctx, coll), &sealed)
        .map_err(|_| invalid())?;
    let doc: Value = serde_json::from_slice(&plain).map_err(|_| invalid())?;
    let name = doc["name"].as_str().ok_or_else(invalid)?.to_string();
    // a secret or key may not land on a certificate's name (even one still pending)
    if coll != Coll::Certificates
        && tx
            .kv_name(ctx.vname, "certificates", &name)
            .await?
            .is_some()
    {
        return Err(ServerError::kv(KvKind::Conflict(None),
            format!("{name} is the name of a certificate in this vault; restore needs the name to be free."),
        ));
    }
    for c in colls(coll) {
        if let Some(n) = tx.kv_name(ctx.vname, c.path(), &name).await? {
            if n.deleted.is_some() {
                return Err(ctx.is_deleted_conflict(coll, &name));
            }
            let has_versions = !tx.kv_versions(ctx.vname, c.path(), &name).await?.is_empty();
            if has_versions {
                return Err(ServerError::kv(KvKind::Conflict(None), format!("{} {name} already exists in this vault; restore needs the name to be free.", c.noun())));
            }
        }
    }
    let mut versions: Vec<KvVersionRecord> = vec![];
    let mut extra = None;
    for o in doc["objects"].as_array().ok_or_else(invalid)? {
        for v in o["versions"].as_array().ok_or_else(invalid)? {
            let mut rec: KvVersionRecord =
                serde_json::from_value(v["record"].clone()).map_err(|_| invalid())?;
            rec.vault = ctx.vname.to_string();
            rec.private = match v["private"].as_str() {
                Some(p) => Some(STANDARD.decode(p).map_err(|_| invalid())?),
                None => None,
            };
            versions.push(rec);
        }
        if o["coll"] == json!(coll.path()) {
            extra = o["extra"]
                .as_object()
                .map(|e| (coll.path().to_string(), Value::Object(e.clone())));
        }
    }
    // the object's own collection first: the write attaches `extra` to its name
    versions.sort_by_key(|v| v.coll != coll.path());
    let latest = versions
        .iter()
        .rev()
        .find(|v| v.coll == coll.path())
        .cloned()
        .ok_or_else(invalid)?;
    let policy = extra
        .as_ref()
        .map(|(_, e)| e["policy"].clone())
        .filter(Value::is_object);
    ctx.write(
        tx,
        coll,
        &name,
        &KvWrite {
            versions,
            extra,
            expect_latest: None,
        },
    )
    .await?;
    let mut out = R::bundle(ctx, &latest, false);
    if let Some(mut p) = policy {
        p["id"] = json!(format!("{}/certificates/{name}/policy", ctx.base));
        out["policy"] = p;
    }
    Ok(Json(out).into_response())
}
