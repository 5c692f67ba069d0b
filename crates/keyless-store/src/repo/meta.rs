//! Instance metadata, sealed blobs (CA and TLS keys) and token signing keys.

use crate::*;

impl Tx {
    pub async fn get_meta(&mut self, key: &str) -> Result<Option<String>> {
        self.query_opt("SELECT value FROM meta WHERE key = $1", &params![key])
            .await?
            .map(|r| r.text(0))
            .transpose()
    }

    pub async fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.execute(
            "INSERT INTO meta(key, value) VALUES ($1, $2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            &params![key, value],
        )
        .await?;
        Ok(())
    }

    pub async fn put_secret(&mut self, name: &str, plaintext: &[u8]) -> Result<()> {
        let sealed = self.kek.seal(&format!("secret:{name}"), plaintext)?;
        self.execute(
            "INSERT INTO secrets(name, sealed) VALUES ($1, $2)
             ON CONFLICT(name) DO UPDATE SET sealed = excluded.sealed",
            &params![name, &sealed],
        )
        .await?;
        Ok(())
    }

    pub async fn get_secret(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        let sealed = self
            .query_opt("SELECT sealed FROM secrets WHERE name = $1", &params![name])
            .await?
            .map(|r| r.bytes(0))
            .transpose()?;
        sealed
            .map(|s| self.kek.open(&format!("secret:{name}"), &s))
            .transpose()
    }

    /// Store a blob only if none exists under `name`; true when this call stored it.
    pub async fn put_secret_if_absent(&mut self, name: &str, plaintext: &[u8]) -> Result<bool> {
        let sealed = self.kek.seal(&format!("secret:{name}"), plaintext)?;
        let n = self
            .execute(
                "INSERT INTO secrets(name, sealed) VALUES ($1, $2) ON CONFLICT(name) DO NOTHING",
                &params![name, &sealed],
            )
            .await?;
        Ok(n > 0)
    }

    pub async fn delete_secret(&mut self, name: &str) -> Result<bool> {
        let n = self
            .execute("DELETE FROM secrets WHERE name = $1", &params![name])
            .await?;
        Ok(n > 0)
    }

    pub async fn insert_signing_key(&mut self, key: &SigningKeyRecord) -> Result<()> {
        let sealed = self
            .kek
            .seal(&format!("signing_key:{}", key.kid), &key.key_pkcs8)?;
        self.execute(
            "INSERT INTO signing_keys(kid, created, activate_at, cert_der, sealed_key)
             VALUES ($1, $2, $3, $4, $5)",
            &params![
                &key.kid,
                key.created,
                key.activate_at,
                &key.cert_der,
                &sealed
            ],
        )
        .await?;
        Ok(())
    }

    pub async fn list_signing_keys(&mut self) -> Result<Vec<SigningKeyRecord>> {
        let rows = self
            .query(
                "SELECT kid, created, activate_at, cert_der, sealed_key FROM signing_keys
                 ORDER BY activate_at, created",
                &params![],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let kid = r.text(0)?;
                let key_pkcs8 = self.kek.open(&format!("signing_key:{kid}"), &r.bytes(4)?)?;
                Ok(SigningKeyRecord {
                    kid,
                    created: r.u64(1)?,
                    activate_at: r.u64(2)?,
                    cert_der: r.bytes(3)?,
                    key_pkcs8,
                })
            })
            .collect()
    }

    pub async fn delete_signing_key(&mut self, kid: &str) -> Result<()> {
        self.execute("DELETE FROM signing_keys WHERE kid = $1", &params![kid])
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{Kek, Store, StoreError};

    fn kek(b: u8) -> Kek {
        Kek::from_bytes(&[b; 32]).unwrap()
    }

    /// What only a file can show: the schema is not migrated twice, data survives a reopen,
    /// and another key-encryption key opens nothing.
    #[tokio::test]
    async fn data_survives_reopen_and_a_wrong_kek_opens_nothing() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("k.db");
        {
            let s = Store::sqlite(&path, kek(1)).unwrap();
            let mut tx = s.write("test").await.unwrap();
            tx.set_meta("tenant", "t1").await.unwrap();
            tx.put_secret("ca", b"-----BEGIN PRIVATE KEY-----")
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        let s = Store::sqlite(&path, kek(1)).unwrap();
        let mut tx = s.read("test").await.unwrap();
        assert_eq!(tx.get_meta("tenant").await.unwrap().as_deref(), Some("t1"));
        assert_eq!(
            tx.get_secret("ca").await.unwrap().unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        drop(tx);
        drop(s);
        let wrong = Store::sqlite(&path, kek(2)).unwrap();
        let mut tx = wrong.read("test").await.unwrap();
        assert!(matches!(
            tx.get_secret("ca").await,
            Err(StoreError::Decrypt)
        ));
    }
}
