//! Key Vault: vaults and their objects (names, versions, soft delete, purge).

#[allow(unused_imports)]
use crate::store::{json, lower, parse};
#[allow(unused_imports)]
use crate::*;

impl Tx {
    /// Insert or replace a vault. Fails with `Conflict` when another vault has the name.
    pub async fn put_vault(&mut self, v: &VaultRecord) -> Result<bool> {
        todo!("port put_vault")
    }

    pub async fn get_vault(&mut self, key: &str) -> Result<Option<VaultRecord>> {
        todo!("port get_vault")
    }

    pub async fn get_vault_by_name(&mut self, name: &str) -> Result<Option<VaultRecord>> {
        todo!("port get_vault_by_name")
    }

    pub async fn list_vaults(
        &mut self,
        subscription: &str,
        rg: Option<&str>,
    ) -> Result<Vec<VaultRecord>> {
        todo!("port list_vaults")
    }

    /// Delete a vault and everything in it.
    pub async fn delete_vault(&mut self, key: &str) -> Result<bool> {
        todo!("port delete_vault")
    }

    pub async fn kv_name(
        &mut self,
        vault: &str,
        coll: &str,
        name: &str,
    ) -> Result<Option<KvNameRecord>> {
        todo!("port kv_name")
    }

    /// Names of a collection, sorted by lowercase name; `deleted` picks the soft-deleted ones.
    pub async fn kv_names(
        &mut self,
        vault: &str,
        coll: &str,
        deleted: bool,
    ) -> Result<Vec<KvNameRecord>> {
        todo!("port kv_names")
    }

    /// Every live name of a collection across vaults (for the renewal scheduler).
    pub async fn kv_all_names(&mut self, coll: &str) -> Result<Vec<KvNameRecord>> {
        todo!("port kv_all_names")
    }

    /// Versions of one object, oldest first, without private material.
    pub async fn kv_versions(
        &mut self,
        vault: &str,
        coll: &str,
        name: &str,
    ) -> Result<Vec<KvVersionRecord>> {
        todo!("port kv_versions")
    }

    /// One version (`None`: the latest), with its private material unsealed.
    pub async fn kv_version(
        &mut self,
        vault: &str,
        coll: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<KvVersionRecord>> {
        todo!("port kv_version")
    }

    /// The latest version of every name of a collection (live or deleted), by lowercase name.
    pub async fn kv_latest(
        &mut self,
        vault: &str,
        coll: &str,
        deleted: bool,
    ) -> Result<Vec<KvVersionRecord>> {
        todo!("port kv_latest")
    }

    /// Write new versions atomically.
    pub async fn kv_write(&mut self, w: &KvWrite) -> Result<KvWriteOutcome> {
        todo!("port kv_write")
    }

    /// Update the attributes, tags and public part of an existing version.
    pub async fn kv_update_version(&mut self, v: &KvVersionRecord) -> Result<bool> {
        todo!("port kv_update_version")
    }

    /// Set the per-object state of a name (creating the name if needed).
    pub async fn kv_set_extra(
        &mut self,
        vault: &str,
        coll: &str,
        name: &str,
        extra: &serde_json::Value,
    ) -> Result<bool> {
        todo!("port kv_set_extra")
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
        todo!("port kv_delete")
    }

    /// Bring a soft-deleted name back in each of `colls`.
    pub async fn kv_recover(&mut self, vault: &str, colls: &[&str], name: &str) -> Result<bool> {
        todo!("port kv_recover")
    }

    /// Remove a soft-deleted name for good in each of `colls`.
    pub async fn kv_purge(&mut self, vault: &str, colls: &[&str], name: &str) -> Result<bool> {
        todo!("port kv_purge")
    }

    /// Purge every soft-deleted name whose scheduled purge date has passed.
    pub async fn kv_purge_expired(&mut self, now: u64) -> Result<usize> {
        todo!("port kv_purge_expired")
    }

    /// Remove the vaults of a resource group with their objects (inside a group delete).
    pub(crate) async fn delete_vaults_in_group(&mut self, sub: &str, rg: &str) -> Result<()> {
        todo!("port delete_vaults_in_group {sub} {rg}")
    }
}
