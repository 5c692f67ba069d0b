//! Key Vault: vaults and their objects (names, versions, soft delete, purge).
//!
//! Three tables: `vaults` (the ARM resource; `name_key` is unique, vault names are global),
//! `kv_names` (one row per object name of a collection: its soft-delete state and per-object
//! state) and `kv_versions` (one row per version, `seq` ordering the versions of a name, the
//! private part sealed with the key-encryption key). A write of versions locks the name rows
//! it writes under first, so on PostgreSQL two writers of one name take turns: `seq` is
//! computed under the lock and a renewal's `expect_latest` is checked under it.
//!
//! Servers cache vaults (the data plane reads one on every request): every write of a vault row
//! (create, update, delete, a resource group's delete) appends a `vault` change to the feed in
//! its transaction (`repo::changes`).

use crate::db::{Backend, Param, Row};
use crate::store::{json, lower};
use crate::*;
use std::borrow::Cow;

/// The associated data a version's private part is sealed with (unchanged from the first
/// store, so existing data still opens).
fn aad(v: &KvVersionRecord) -> String {
    format!("kv:{}/{}/{}/{}", v.vault, v.coll, lower(&v.name), v.version)
}

const NAME_COLS: &str = "vault, coll, name, deleted_at, purge_at, extra";

fn to_name(r: &Row) -> Result<KvNameRecord> {
    let deleted = r.opt_int(3)?;
    let purge = r.opt_int(4)?;
    Ok(KvNameRecord {
        vault: r.text(0)?,
        coll: r.text(1)?,
        name: r.text(2)?,
        deleted: deleted.map(|d| (d as u64, purge.unwrap_or(0) as u64)),
        extra: r.json(5)?,
    })
}

/// `sql` (a `SELECT`) made to lock the rows it returns until the transaction ends: on
/// PostgreSQL followed by the clause `lock` (`FOR UPDATE`, `FOR KEY SHARE`, ...); on SQLite a
/// write transaction already excludes every other writer, so the statement stays as it is.
pub(crate) fn locking<'a>(backend: Backend, sql: &'a str, lock: &str) -> Cow<'a, str> {
    match backend {
        Backend::Sqlite => Cow::Borrowed(sql),
        Backend::Postgres => Cow::Owned(format!("{sql} {lock}")),
    }
}

impl Tx {
    fn unseal(&self, mut v: KvVersionRecord, sealed: Option<Vec<u8>>) -> Result<KvVersionRecord> {
        v.private = match sealed {
            Some(s) => Some(self.kek.open(&aad(&v), &s)?),
            None => None,
        };
        Ok(v)
    }

    /// Lock a name row; `None` when it does not exist, else its `deleted_at`.
    async fn lock_kv_name(
        &mut self,
        vault: &str,
        coll: &str,
        key: &str,
    ) -> Result<Option<Option<i64>>> {
        let sql = locking(
            self.backend(),
            "SELECT deleted_at FROM kv_names WHERE vault = $1 AND coll = $2 AND name_key = $3",
            "FOR UPDATE",
        );
        let row = self.query_opt(&sql, &params![vault, coll, key]).await?;
        row.map(|r| r.opt_int(0)).transpose()
    }

    /// Lock a name row, creating it (live, no per-object state) when absent. Returns its
    /// `deleted_at` and whether this call created it.
    async fn ensure_kv_name(
        &mut self,
        vault: &str,
        coll: &str,
        key: &str,
        name: &str,
    ) -> Result<(Option<i64>, bool)> {
        if let Some(deleted) = self.lock_kv_name(vault, coll, key).await? {
            return Ok((deleted, false));
        }
        // A concurrent first write of the same name makes this wait for it (PostgreSQL), then
        // do nothing: the row is theirs, and locking it below waits for nobody.
        let n = self
            .execute(
                "INSERT INTO kv_names(vault, coll, name_key, name, extra) VALUES ($1, $2, $3, $4, '{}')
                 ON CONFLICT DO NOTHING",
                &params![vault, coll, key, name],
            )
            .await?;
        if n == 1 {
            return Ok((None, true));
        }
        match self.lock_kv_name(vault, coll, key).await? {
            Some(deleted) => Ok((deleted, false)),
            None => Err(StoreError::Conflict(Conflict::Busy(format!(
                "{vault}/{coll}/{key}"
            )))),
        }
    }

    /// Remove the name rows this write created (before answering that it wrote nothing).
    async fn forget_kv_names(&mut self, created: &[(String, String, String)]) -> Result<()> {
        for (vault, coll, key) in created {
            self.execute(
                "DELETE FROM kv_names WHERE vault = $1 AND coll = $2 AND name_key = $3",
                &params![vault, coll, key],
            )
            .await?;
        }
        Ok(())
    }

    async fn latest_version(
        &mut self,
        vault: &str,
        coll: &str,
        key: &str,
    ) -> Result<Option<String>> {
        let row = self
            .query_opt(
                "SELECT version FROM kv_versions WHERE vault = $1 AND coll = $2 AND name_key = $3
                 ORDER BY seq DESC LIMIT 1",
                &params![vault, coll, key],
            )
            .await?;
        row.map(|r| r.text(0)).transpose()
    }

    /// Delete a name with its versions; the number of name rows removed.
    async fn delete_kv_rows(&mut self, vault: &str, coll: &str, key: &str) -> Result<u64> {
        self.execute(
            "DELETE FROM kv_versions WHERE vault = $1 AND coll = $2 AND name_key = $3",
            &params![vault, coll, key],
        )
        .await?;
        self.execute(
            "DELETE FROM kv_names WHERE vault = $1 AND coll = $2 AND name_key = $3",
            &params![vault, coll, key],
        )
        .await
    }

    /// Delete every object of a vault (by lowercase name).
    async fn delete_vault_objects(&mut self, vault: &str) -> Result<()> {
        self.execute("DELETE FROM kv_versions WHERE vault = $1", &params![vault])
            .await?;
        self.execute("DELETE FROM kv_names WHERE vault = $1", &params![vault])
            .await?;
        Ok(())
    }

    /// Insert or replace a vault; true when created. Fails with
    /// `Conflict(NameTaken)` when another vault has the name (vault names are global). A
    /// `vault` change is recorded.
    pub async fn put_vault(&mut self, v: &VaultRecord) -> Result<bool> {
        let body = json(v)?;
        let name_key = lower(&v.name);
        // Conflicts on the key (an update) and on the name alike do nothing; a concurrent
        // create of the name makes this wait for it (PostgreSQL) and then do nothing.
        let n = self
            .execute(
                "INSERT INTO vaults(key, name_key, subscription, rg_key, body) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
                &params![
                    &v.key,
                    &name_key,
                    &lower(&v.subscription),
                    &lower(&v.resource_group),
                    &body
                ],
            )
            .await?;
        if n == 1 {
            self.record_change(change_kind::VAULT, &name_key).await?;
            return Ok(true);
        }
        let holder = self
            .query_opt(
                "SELECT key FROM vaults WHERE name_key = $1",
                &params![&name_key],
            )
            .await?;
        if let Some(r) = holder {
            if r.str(0)? != v.key {
                return Err(StoreError::Conflict(Conflict::NameTaken(format!(
                    "vault name {} is taken",
                    v.name
                ))));
            }
        }
        self.execute(
            "UPDATE vaults SET body = $2 WHERE key = $1",
            &params![&v.key, &body],
        )
        .await?;
        self.record_change(change_kind::VAULT, &name_key).await?;
        Ok(false)
    }

    pub async fn get_vault(&mut self, key: &str) -> Result<Option<VaultRecord>> {
        let row = self
            .query_opt(
                "SELECT body FROM vaults WHERE key = $1",
                &params![&lower(key)],
            )
            .await?;
        row.map(|r| r.json(0)).transpose()
    }

    pub async fn get_vault_by_name(&mut self, name: &str) -> Result<Option<VaultRecord>> {
        let row = self
            .query_opt(
                "SELECT body FROM vaults WHERE name_key = $1",
                &params![&lower(name)],
            )
            .await?;
        row.map(|r| r.json(0)).transpose()
    }

    pub async fn list_vaults(
        &mut self,
        subscription: &str,
        rg: Option<&str>,
    ) -> Result<Vec<VaultRecord>> {
        let rg = rg.map(lower);
        let rows = self
            .query(
                "SELECT body FROM vaults WHERE subscription = $1
                 AND (CAST($2 AS TEXT) IS NULL OR rg_key = $2) ORDER BY name_key",
                &params![&lower(subscription), rg.as_ref()],
            )
            .await?;
        rows.iter().map(|r| r.json(0)).collect()
    }

    /// Delete a vault and everything in it, and the role assignments on its scope (a `vault`
    /// change is recorded).
    pub async fn delete_vault(&mut self, key: &str) -> Result<bool> {
        let key = lower(key);
        let row = self
            .query_opt(
                "DELETE FROM vaults WHERE key = $1 RETURNING name_key",
                &params![&key],
            )
            .await?;
        let Some(row) = row else { return Ok(false) };
        self.delete_vault_objects(row.str(0)?).await?;
        self.delete_assignments_under(&key).await?;
        self.record_change(change_kind::VAULT, row.str(0)?).await?;
        Ok(true)
    }

    pub async fn kv_name(
        &mut self,
        vault: &str,
        coll: &str,
        name: &str,
    ) -> Result<Option<KvNameRecord>> {
        let row = self
            .query_opt(
                &format!(
                    "SELECT {NAME_COLS} FROM kv_names WHERE vault = $1 AND coll = $2 AND name_key = $3"
                ),
                &params![vault, coll, &lower(name)],
            )
            .await?;
        row.as_ref().map(to_name).transpose()
    }

    /// Names of a collection, sorted by lowercase name; `deleted` picks the soft-deleted ones.
    pub async fn kv_names(
        &mut self,
        vault: &str,
        coll: &str,
        deleted: bool,
    ) -> Result<Vec<KvNameRecord>> {
        let rows = self
            .query(
                &format!(
                    "SELECT {NAME_COLS} FROM kv_names WHERE vault = $1 AND coll = $2
                     AND (deleted_at IS NOT NULL) = $3 ORDER BY name_key"
                ),
                &params![vault, coll, deleted],
            )
            .await?;
        rows.iter().map(to_name).collect()
    }

    /// Every live name of a collection across vaults (for the renewal scheduler).
    pub async fn kv_all_names(&mut self, coll: &str) -> Result<Vec<KvNameRecord>> {
        let rows = self
            .query(
                &format!(
                    "SELECT {NAME_COLS} FROM kv_names WHERE coll = $1 AND deleted_at IS NULL
                     ORDER BY vault, name_key"
                ),
                &params![coll],
            )
            .await?;
        rows.iter().map(to_name).collect()
    }

    /// Versions of one object, oldest first, without private material.
    pub async fn kv_versions(
        &mut self,
        vault: &str,
        coll: &str,
        name: &str,
    ) -> Result<Vec<KvVersionRecord>> {
        let rows = self
            .query(
                "SELECT body FROM kv_versions WHERE vault = $1 AND coll = $2 AND name_key = $3
                 ORDER BY seq",
                &params![vault, coll, &lower(name)],
            )
            .await?;
        rows.iter().map(|r| r.json(0)).collect()
    }

    /// One version (`None`: the latest), with its private material unsealed. One indexed
    /// statement (the primary key, or `kv_versions_seq` for the latest).
    pub async fn kv_version(
        &mut self,
        vault: &str,
        coll: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<KvVersionRecord>> {
        let key = lower(name);
        let row = match version {
            Some(v) => {
                self.query_opt(
                    "SELECT body, sealed FROM kv_versions
                     WHERE vault = $1 AND coll = $2 AND name_key = $3 AND version = $4",
                    &params![vault, coll, &key, v],
                )
                .await?
            }
            None => {
                self.query_opt(
                    "SELECT body, sealed FROM kv_versions WHERE vault = $1 AND coll = $2 AND name_key = $3
                     ORDER BY seq DESC LIMIT 1",
                    &params![vault, coll, &key],
                )
                .await?
            }
        };
        match row {
            Some(r) => Ok(Some(self.unseal(r.json(0)?, r.opt_bytes(1)?)?)),
            None => Ok(None),
        }
    }

    /// A version (`None`: the latest) of a live object — `None` when the name does not exist,
    /// is soft-deleted, or has no such version — with its private material unsealed. One
    /// statement: the name row by its primary key, the version by its primary key (or
    /// `kv_versions_seq` for the latest).
    pub async fn kv_live_version(
        &mut self,
        vault: &str,
        coll: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<KvVersionRecord>> {
        let key = lower(name);
        let row = match version {
            Some(v) => {
                self.query_opt(
                    "SELECT v.body, v.sealed FROM kv_names n JOIN kv_versions v
                       ON v.vault = n.vault AND v.coll = n.coll AND v.name_key = n.name_key
                     WHERE n.vault = $1 AND n.coll = $2 AND n.name_key = $3 AND n.deleted_at IS NULL
                       AND v.version = $4",
                    &params![vault, coll, &key, v],
                )
                .await?
            }
            None => {
                self.query_opt(
                    "SELECT v.body, v.sealed FROM kv_names n JOIN kv_versions v
                       ON v.vault = n.vault AND v.coll = n.coll AND v.name_key = n.name_key
                     WHERE n.vault = $1 AND n.coll = $2 AND n.name_key = $3 AND n.deleted_at IS NULL
                     ORDER BY v.seq DESC LIMIT 1",
                    &params![vault, coll, &key],
                )
                .await?
            }
        };
        match row {
            Some(r) => Ok(Some(self.unseal(r.json(0)?, r.opt_bytes(1)?)?)),
            None => Ok(None),
        }
    }

    /// The latest version of every name of a collection (live or deleted), by lowercase name,
    /// without private material.
    pub async fn kv_latest(
        &mut self,
        vault: &str,
        coll: &str,
        deleted: bool,
    ) -> Result<Vec<KvVersionRecord>> {
        let rows = self
            .query(
                "SELECT v.body FROM kv_versions v JOIN kv_names n
                   ON n.vault = v.vault AND n.coll = v.coll AND n.name_key = v.name_key
                 WHERE v.vault = $1 AND v.coll = $2 AND (n.deleted_at IS NOT NULL) = $3
                   AND v.seq = (SELECT max(seq) FROM kv_versions m
                                WHERE m.vault = v.vault AND m.coll = v.coll AND m.name_key = v.name_key)
                 ORDER BY v.name_key",
                &params![vault, coll, deleted],
            )
            .await?;
        rows.iter().map(|r| r.json(0)).collect()
    }

    /// Write new versions atomically. With `expect_latest`, only when the latest version of
    /// (collection, first version's name) is still the expected one (`Stale` otherwise); when
    /// a name is soft-deleted in one of the collections, `Deleted`. Either way nothing is
    /// written. The name rows are locked first, so concurrent writers of a name take turns
    /// and exactly one of two renewals from the same latest version writes.
    pub async fn kv_write(&mut self, w: &KvWrite) -> Result<KvWriteOutcome> {
        let mut sealed = Vec::with_capacity(w.versions.len());
        for v in &w.versions {
            sealed.push(match &v.private {
                Some(p) => Some(self.kek.seal(&aad(v), p)?),
                None => None,
            });
        }
        let Some(first) = w.versions.first() else {
            return Ok(KvWriteOutcome::Written);
        };
        // the vault must exist, and stay until this write ends: a vault delete racing this
        // write (another replica) waits for it and then removes what it wrote, instead of
        // leaving objects behind for the next vault of that name
        for vault in w.versions.iter().map(|v| lower(&v.vault)) {
            let sql = locking(
                self.backend(),
                "SELECT 1 FROM vaults WHERE name_key = $1",
                "FOR KEY SHARE",
            );
            if self.query_opt(&sql, &params![&vault]).await?.is_none() {
                return Err(StoreError::Conflict(Conflict::MissingReference(format!(
                    "vault {vault} does not exist"
                ))));
            }
        }
        // name rows this write created: removed again when it ends up writing nothing
        let mut created: Vec<(String, String, String)> = Vec::new();
        if let Some((coll, expect)) = &w.expect_latest {
            let key = lower(&first.name);
            if self.lock_kv_name(&first.vault, coll, &key).await?.is_none() {
                if expect.is_some() {
                    return Ok(KvWriteOutcome::Stale);
                }
                // a first version: hold the new name so a concurrent first write waits
                if self
                    .ensure_kv_name(&first.vault, coll, &key, &first.name)
                    .await?
                    .1
                {
                    created.push((first.vault.clone(), coll.clone(), key.clone()));
                }
            }
            if self.latest_version(&first.vault, coll, &key).await? != *expect {
                self.forget_kv_names(&created).await?;
                return Ok(KvWriteOutcome::Stale);
            }
        }
        let mut deleted = false;
        for v in &w.versions {
            let key = lower(&v.name);
            let (deleted_at, new) = self
                .ensure_kv_name(&v.vault, &v.coll, &key, &v.name)
                .await?;
            if new {
                created.push((v.vault.clone(), v.coll.clone(), key));
            }
            deleted |= deleted_at.is_some();
        }
        if deleted {
            self.forget_kv_names(&created).await?;
            return Ok(KvWriteOutcome::Deleted);
        }
        for (v, s) in w.versions.iter().zip(&sealed) {
            let key = lower(&v.name);
            // under the name's lock: no other writer takes this seq
            let seq = self
                .query_one(
                    "SELECT coalesce(max(seq), 0) + 1 FROM kv_versions
                     WHERE vault = $1 AND coll = $2 AND name_key = $3",
                    &params![&v.vault, &v.coll, &key],
                )
                .await?
                .int(0)?;
            self.execute(
                "INSERT INTO kv_versions(vault, coll, name_key, version, seq, body, sealed)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &params![
                    &v.vault,
                    &v.coll,
                    &key,
                    &v.version,
                    seq,
                    &json(v)?,
                    s.as_ref()
                ],
            )
            .await?;
        }
        if let Some((coll, extra)) = &w.extra {
            self.execute(
                "UPDATE kv_names SET extra = $4 WHERE vault = $1 AND coll = $2 AND name_key = $3",
                &params![&first.vault, coll, &lower(&first.name), &json(extra)?],
            )
            .await?;
        }
        Ok(KvWriteOutcome::Written)
    }

    /// Update the attributes, tags and public part of an existing version.
    pub async fn kv_update_version(&mut self, v: &KvVersionRecord) -> Result<bool> {
        let n = self
            .execute(
                "UPDATE kv_versions SET body = $5
                 WHERE vault = $1 AND coll = $2 AND name_key = $3 AND version = $4",
                &params![&v.vault, &v.coll, &lower(&v.name), &v.version, &json(v)?],
            )
            .await?;
        Ok(n > 0)
    }

    /// Set the per-object state of a name (creating the name if needed).
    pub async fn kv_set_extra(
        &mut self,
        vault: &str,
        coll: &str,
        name: &str,
        extra: &serde_json::Value,
    ) -> Result<bool> {
        let n = self
            .execute(
                "INSERT INTO kv_names(vault, coll, name_key, name, extra) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT(vault, coll, name_key) DO UPDATE SET extra = excluded.extra",
                &params![vault, coll, &lower(name), name, &json(extra)?],
            )
            .await?;
        Ok(n > 0)
    }

    /// Soft-delete (`purge_at` Some) or delete outright the name in each of `colls`.
    pub async fn kv_delete(
        &mut self,
        vault: &str,
        colls: &[&str],
        name: &str,
        deleted_at: u64,
        purge_at: Option<u64>,
    ) -> Result<bool> {
        let key = lower(name);
        let mut any = false;
        for c in colls {
            let n = match purge_at {
                Some(p) => {
                    self.execute(
                        "UPDATE kv_names SET deleted_at = $4, purge_at = $5
                         WHERE vault = $1 AND coll = $2 AND name_key = $3 AND deleted_at IS NULL",
                        &params![vault, *c, &key, deleted_at, p],
                    )
                    .await?
                }
                None => self.delete_kv_rows(vault, c, &key).await?,
            };
            any |= n > 0;
        }
        Ok(any)
    }

    /// Bring a soft-deleted name back in each of `colls`.
    pub async fn kv_recover(&mut self, vault: &str, colls: &[&str], name: &str) -> Result<bool> {
        let key = lower(name);
        let mut any = false;
        for c in colls {
            any |= self
                .execute(
                    "UPDATE kv_names SET deleted_at = NULL, purge_at = NULL
                     WHERE vault = $1 AND coll = $2 AND name_key = $3 AND deleted_at IS NOT NULL",
                    &params![vault, *c, &key],
                )
                .await?
                > 0;
        }
        Ok(any)
    }

    /// Remove a soft-deleted name for good in each of `colls`.
    pub async fn kv_purge(&mut self, vault: &str, colls: &[&str], name: &str) -> Result<bool> {
        let key = lower(name);
        let mut any = false;
        for c in colls {
            // the name row goes only while deleted (a concurrent recover is waited for and
            // then re-checked); its versions follow it
            let n = self
                .execute(
                    "DELETE FROM kv_names
                     WHERE vault = $1 AND coll = $2 AND name_key = $3 AND deleted_at IS NOT NULL",
                    &params![vault, *c, &key],
                )
                .await?;
            if n > 0 {
                self.execute(
                    "DELETE FROM kv_versions WHERE vault = $1 AND coll = $2 AND name_key = $3",
                    &params![vault, *c, &key],
                )
                .await?;
                any = true;
            }
        }
        Ok(any)
    }

    /// Purge every soft-deleted name whose scheduled purge date has passed.
    pub async fn kv_purge_expired(&mut self, now: u64) -> Result<usize> {
        let due = self
            .query(
                "DELETE FROM kv_names WHERE deleted_at IS NOT NULL AND purge_at <= $1
                 RETURNING vault, coll, name_key",
                &params![now],
            )
            .await?;
        for r in &due {
            self.execute(
                "DELETE FROM kv_versions WHERE vault = $1 AND coll = $2 AND name_key = $3",
                &[
                    Param::Text(r.str(0)?),
                    Param::Text(r.str(1)?),
                    Param::Text(r.str(2)?),
                ],
            )
            .await?;
        }
        Ok(due.len())
    }

    /// Remove the vaults of a resource group with their objects (inside a group delete).
    pub(crate) async fn delete_vaults_in_group(&mut self, sub: &str, rg: &str) -> Result<()> {
        let names = self
            .query(
                "DELETE FROM vaults WHERE subscription = $1 AND rg_key = $2 RETURNING name_key",
                &params![sub, rg],
            )
            .await?;
        for r in &names {
            self.delete_vault_objects(r.str(0)?).await?;
            self.record_change(change_kind::VAULT, r.str(0)?).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::*;

    fn ver(value: &[u8]) -> KvVersionRecord {
        KvVersionRecord {
            vault: "kv1".into(),
            coll: "secrets".into(),
            name: "Pw".into(),
            version: "a1".into(),
            created: 1,
            updated: 1,
            enabled: true,
            nbf: None,
            exp: None,
            content_type: None,
            tags: Default::default(),
            managed: false,
            public: serde_json::json!({}),
            private: Some(value.to_vec()),
        }
    }

    const MARKER: &[u8] = b"PLAINTEXT-MARKER-93f1";

    /// Write a secret, check its stored row holds no plaintext, and that the value opens
    /// with the store's key only.
    async fn sealed_in_its_row(s: &Store, other: &Store) {
        let mut tx = s.write("test").await.unwrap();
        // the vault the version belongs to (kv_write requires it)
        tx.execute(
            "INSERT INTO vaults(key, name_key, subscription, rg_key, body) VALUES ('v', 'kv1', 's', 'g', '{}')",
            &params![],
        )
        .await
        .unwrap();
        let w = KvWrite {
            versions: vec![ver(MARKER)],
            extra: None,
            expect_latest: None,
        };
        assert_eq!(tx.kv_write(&w).await.unwrap(), KvWriteOutcome::Written);
        tx.commit().await.unwrap();
        let mut tx = s.read("test").await.unwrap();
        let rows = tx
            .query("SELECT body, sealed FROM kv_versions", &params![])
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        let sealed = rows[0].bytes(1).unwrap();
        assert!(!sealed.windows(MARKER.len()).any(|w| w == MARKER));
        assert!(!rows[0].str(0).unwrap().contains("PLAINTEXT"));
        let v = tx.kv_version("kv1", "secrets", "pw", None).await.unwrap();
        assert_eq!(v.unwrap().private.as_deref(), Some(MARKER));
        // another key-encryption key does not open it
        let mut tx = other.read("test").await.unwrap();
        assert!(matches!(
            tx.kv_version("kv1", "secrets", "pw", Some("a1")).await,
            Err(StoreError::Decrypt)
        ));
    }

    fn kek(b: u8) -> Kek {
        Kek::from_bytes(&[b; 32]).unwrap()
    }

    #[test]
    fn values_are_sealed_at_rest() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("k.db");
        rt.block_on(async {
            let s = Store::sqlite(&path, kek(7)).unwrap();
            let other = Store::sqlite(&path, kek(8)).unwrap();
            sealed_in_its_row(&s, &other).await;
        });
        // not in the file or its write-ahead log either
        let mut raw = std::fs::read(&path).unwrap();
        if let Ok(w) = std::fs::read(d.path().join("k.db-wal")) {
            raw.extend(w);
        }
        assert!(!raw.windows(MARKER.len()).any(|w| w == MARKER));
        let Some(pg) = crate::testing::PgServer::start() else {
            return;
        };
        rt.block_on(async {
            let url = pg.database().await;
            let opts = crate::postgres::PgOptions::new(url);
            let s = Store::postgres(&opts, kek(7)).await.unwrap();
            let other = Store::postgres(&opts, kek(8)).await.unwrap();
            sealed_in_its_row(&s, &other).await;
        });
    }
}
