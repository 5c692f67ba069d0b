//! Cluster OIDC issuers and webhook CAs (issue 15).
//!
//! `oidc_issuers`: an issuer id (a GUID the server made when the cluster's OIDC issuer was first
//! enabled) → the cluster's key, and the service-account keys the cluster's add-on last
//! published (the JWKS `keys` array, as JSON; NULL until the first publish), and the publisher:
//! the service account (`system:serviceaccount:NS:NAME`) whose proof a publish by the kubelet
//! identity must carry (NULL until a first such publish records it, or after an admin reset
//! it). A row outlives
//! nothing: the cluster's `oidcIssuerProfile` names its issuer id, and a reader checks that
//! the cluster still names it.
//!
//! `webhook_cas`: each cluster's webhook serving CA, its certificate and its PKCS#8 key sealed
//! with the key-encryption key (bound to `webhook_ca:{cluster key}`).

use crate::*;
use serde_json::Value;

/// An issuer of a cluster, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct OidcIssuerRecord {
    pub issuer_id: String,
    pub cluster_key: String,
    /// The published keys (a JWKS `keys` array); `None` before the first publish.
    pub keys: Option<Vec<Value>>,
    /// When the row was made or its keys last changed (Unix seconds).
    pub updated: u64,
    /// The service account whose proof a kubelet-identity publish must carry; `None` until a
    /// first publish records it (or after an admin's `resetPublisher`).
    pub publisher: Option<String>,
}

/// A cluster's webhook CA: certificate DER and PKCS#8 key DER (unsealed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookCaRecord {
    pub cert_der: Vec<u8>,
    pub key_pkcs8: Vec<u8>,
    pub created: u64,
}

fn ca_aad(cluster_key: &str) -> String {
    format!("webhook_ca:{cluster_key}")
}

impl Tx {
    /// Record the issuer `issuer_id` of the cluster `cluster_key` (no keys yet); nothing when
    /// it exists.
    pub async fn put_oidc_issuer(
        &mut self,
        issuer_id: &str,
        cluster_key: &str,
        now: u64,
    ) -> Result<()> {
        self.execute(
            "INSERT INTO oidc_issuers(issuer_id, cluster_key, jwks, updated) VALUES ($1, $2, NULL, $3)
             ON CONFLICT(issuer_id) DO NOTHING",
            &params![issuer_id, cluster_key, now],
        )
        .await?;
        Ok(())
    }

    pub async fn get_oidc_issuer(&mut self, issuer_id: &str) -> Result<Option<OidcIssuerRecord>> {
        let row = self
            .query_opt(
                "SELECT issuer_id, cluster_key, jwks, updated, publisher FROM oidc_issuers WHERE issuer_id = $1",
                &params![issuer_id],
            )
            .await?;
        row.map(|r| {
            let keys = match r.opt_text(2)? {
                Some(t) => {
                    Some(serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(e.to_string()))?)
                }
                None => None,
            };
            Ok(OidcIssuerRecord {
                issuer_id: r.text(0)?,
                cluster_key: r.text(1)?,
                keys,
                updated: r.u64(3)?,
                publisher: r.opt_text(4)?,
            })
        })
        .transpose()
    }

    /// Lock the row of `issuer_id` for the rest of the unit of work and read it (`None` when
    /// there is no such issuer): what a publish checks its proof against is what it replaces.
    pub async fn lock_oidc_issuer(&mut self, issuer_id: &str) -> Result<Option<OidcIssuerRecord>> {
        if !self
            .lock_row("oidc_issuers", "issuer_id", issuer_id)
            .await?
        {
            return Ok(None);
        }
        self.get_oidc_issuer(issuer_id).await
    }

    /// Set (or, with `None`, clear) the publisher of `issuer_id`; true when it changed.
    /// `Err(NotFound)` when there is no such issuer.
    pub async fn set_oidc_issuer_publisher(
        &mut self,
        issuer_id: &str,
        publisher: Option<&str>,
    ) -> Result<bool> {
        let current = self
            .lock_oidc_issuer(issuer_id)
            .await?
            .ok_or(StoreError::NotFound)?;
        if current.publisher.as_deref() == publisher {
            return Ok(false);
        }
        self.execute(
            "UPDATE oidc_issuers SET publisher = $2 WHERE issuer_id = $1",
            &params![issuer_id, publisher],
        )
        .await?;
        Ok(true)
    }

    /// Replace the published keys of `issuer_id` (its row locked first); true when they differ
    /// from the stored ones (then `updated` is `now`). `Err(NotFound)` when there is no such
    /// issuer.
    pub async fn set_oidc_issuer_keys(
        &mut self,
        issuer_id: &str,
        keys: &[Value],
        now: u64,
    ) -> Result<bool> {
        if !self
            .lock_row("oidc_issuers", "issuer_id", issuer_id)
            .await?
        {
            return Err(StoreError::NotFound);
        }
        let current = self
            .get_oidc_issuer(issuer_id)
            .await?
            .ok_or(StoreError::NotFound)?;
        if current.keys.as_deref() == Some(keys) {
            return Ok(false);
        }
        let text = serde_json::to_string(keys).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.execute(
            "UPDATE oidc_issuers SET jwks = $2, updated = $3 WHERE issuer_id = $1",
            &params![issuer_id, &text, now],
        )
        .await?;
        Ok(true)
    }

    /// Delete what the cluster `cluster_key` has here: its issuers (with their keys) and its
    /// webhook CA. Called when the cluster is deleted, and when a cluster is created under a key
    /// (whatever an earlier cluster of that name left is not the new one's).
    pub async fn delete_cluster_oidc(&mut self, cluster_key: &str) -> Result<()> {
        self.execute(
            "DELETE FROM oidc_issuers WHERE cluster_key = $1",
            &params![cluster_key],
        )
        .await?;
        self.execute(
            "DELETE FROM webhook_cas WHERE cluster_key = $1",
            &params![cluster_key],
        )
        .await?;
        Ok(())
    }

    /// The webhook CA of the cluster `cluster_key`, unsealed.
    pub async fn get_webhook_ca(&mut self, cluster_key: &str) -> Result<Option<WebhookCaRecord>> {
        let row = self
            .query_opt(
                "SELECT cert_der, sealed_key, created FROM webhook_cas WHERE cluster_key = $1",
                &params![cluster_key],
            )
            .await?;
        row.map(|r| {
            Ok(WebhookCaRecord {
                cert_der: r.bytes(0)?,
                key_pkcs8: self.kek.open(&ca_aad(cluster_key), &r.bytes(1)?)?,
                created: r.u64(2)?,
            })
        })
        .transpose()
    }

    /// Store the webhook CA of `cluster_key` unless it has one; true when this call stored it
    /// (of two concurrent first uses one stores, the other reads the winner's).
    pub async fn put_webhook_ca_if_absent(
        &mut self,
        cluster_key: &str,
        ca: &WebhookCaRecord,
    ) -> Result<bool> {
        let sealed = self.kek.seal(&ca_aad(cluster_key), &ca.key_pkcs8)?;
        let n = self
            .execute(
                "INSERT INTO webhook_cas(cluster_key, cert_der, sealed_key, created) VALUES ($1, $2, $3, $4)
                 ON CONFLICT(cluster_key) DO NOTHING",
                &params![cluster_key, &ca.cert_der, &sealed, ca.created],
            )
            .await?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kek(b: u8) -> Kek {
        Kek::from_bytes(&[b; 32]).unwrap()
    }

    /// The rules, on one backend.
    async fn exercise(s: &Store) {
        let mut tx = s.write("test").await.unwrap();
        tx.put_oidc_issuer("i1", "c1", 10).await.unwrap();
        // made once: a second put keeps the row
        tx.put_oidc_issuer("i1", "other", 11).await.unwrap();
        let r = tx.get_oidc_issuer("i1").await.unwrap().unwrap();
        assert_eq!(
            (r.cluster_key.as_str(), r.keys, r.updated, r.publisher),
            ("c1", None, 10, None)
        );
        let keys = vec![json!({"kty": "RSA", "kid": "a", "n": "AQAB", "e": "AQAB"})];
        assert!(tx.set_oidc_issuer_keys("i1", &keys, 20).await.unwrap());
        assert!(!tx.set_oidc_issuer_keys("i1", &keys, 30).await.unwrap());
        let r = tx.get_oidc_issuer("i1").await.unwrap().unwrap();
        assert_eq!((r.keys.as_deref(), r.updated), (Some(&keys[..]), 20));
        assert!(matches!(
            tx.set_oidc_issuer_keys("nope", &keys, 1).await,
            Err(StoreError::NotFound)
        ));
        // the publisher: recorded, kept by a key change, cleared
        let sa = "system:serviceaccount:kube-system:addon";
        assert!(tx.set_oidc_issuer_publisher("i1", Some(sa)).await.unwrap());
        assert!(!tx.set_oidc_issuer_publisher("i1", Some(sa)).await.unwrap());
        let keys2 = vec![json!({"kty": "RSA", "kid": "b", "n": "AQAB", "e": "AQAB"})];
        assert!(tx.set_oidc_issuer_keys("i1", &keys2, 40).await.unwrap());
        let r = tx.lock_oidc_issuer("i1").await.unwrap().unwrap();
        assert_eq!(
            (r.keys.as_deref(), r.publisher.as_deref()),
            (Some(&keys2[..]), Some(sa))
        );
        assert!(tx.set_oidc_issuer_publisher("i1", None).await.unwrap());
        assert_eq!(
            tx.get_oidc_issuer("i1").await.unwrap().unwrap().publisher,
            None
        );
        assert!(tx.lock_oidc_issuer("nope").await.unwrap().is_none());
        assert!(matches!(
            tx.set_oidc_issuer_publisher("nope", Some(sa)).await,
            Err(StoreError::NotFound)
        ));
        let ca = WebhookCaRecord {
            cert_der: vec![1, 2, 3],
            key_pkcs8: b"private".to_vec(),
            created: 5,
        };
        assert!(tx.put_webhook_ca_if_absent("c1", &ca).await.unwrap());
        let other = WebhookCaRecord {
            cert_der: vec![9],
            ..ca.clone()
        };
        assert!(!tx.put_webhook_ca_if_absent("c1", &other).await.unwrap());
        tx.commit().await.unwrap();

        let mut tx = s.read("test").await.unwrap();
        assert_eq!(tx.get_webhook_ca("c1").await.unwrap(), Some(ca.clone()));
        // sealed at rest: the key is not stored in clear
        let row = tx
            .query_opt(
                "SELECT sealed_key FROM webhook_cas WHERE cluster_key = $1",
                &params!["c1"],
            )
            .await
            .unwrap()
            .unwrap();
        assert!(!row.bytes(0).unwrap().windows(7).any(|w| w == b"private"));
        drop(tx);

        let mut tx = s.write("test").await.unwrap();
        tx.put_oidc_issuer("i2", "c2", 1).await.unwrap();
        tx.delete_cluster_oidc("c1").await.unwrap();
        assert!(tx.get_oidc_issuer("i1").await.unwrap().is_none());
        assert!(tx.get_webhook_ca("c1").await.unwrap().is_none());
        assert!(tx.get_oidc_issuer("i2").await.unwrap().is_some());
        tx.commit().await.unwrap();
    }

    #[tokio::test]
    async fn issuers_keys_and_webhook_cas_sqlite() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("k.db");
        let s = Store::sqlite(&path, kek(3)).unwrap();
        exercise(&s).await;
        let mut tx = s.write("test").await.unwrap();
        let ca = WebhookCaRecord {
            cert_der: vec![7],
            key_pkcs8: b"k".to_vec(),
            created: 1,
        };
        tx.put_webhook_ca_if_absent("c9", &ca).await.unwrap();
        tx.commit().await.unwrap();
        drop(s);
        // another key-encryption key opens nothing
        let wrong = Store::sqlite(&path, kek(4)).unwrap();
        let mut tx = wrong.read("test").await.unwrap();
        assert!(matches!(
            tx.get_webhook_ca("c9").await,
            Err(StoreError::Decrypt)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn issuers_keys_and_webhook_cas_postgres() {
        let Some(pg) = crate::testing::PgServer::start() else {
            return;
        };
        let url = pg.database().await;
        let s = Store::postgres(&crate::postgres::PgOptions::new(url), kek(3))
            .await
            .unwrap();
        exercise(&s).await;
    }
}
