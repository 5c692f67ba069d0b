//! Resource groups, and the cascade of a group delete.

use crate::store::{json, lower, parse};
use crate::*;

impl Tx {
    /// Insert or replace; returns true when created. The group keeps the name (case) it was
    /// created with.
    pub async fn put_resource_group(&mut self, rg: &ResourceGroupRecord) -> Result<bool> {
        let (sub, name_key) = (lower(&rg.subscription), lower(&rg.name));
        let created = self
            .execute(
                "INSERT INTO resource_groups(subscription, name_key, body) VALUES ($1, $2, $3)
                 ON CONFLICT(subscription, name_key) DO NOTHING",
                &params![&sub, &name_key, &json(rg)?],
            )
            .await?
            == 1;
        if created {
            return Ok(true);
        }
        let row = self
            .query_one(
                "SELECT body FROM resource_groups WHERE subscription = $1 AND name_key = $2",
                &params![&sub, &name_key],
            )
            .await?;
        let old: ResourceGroupRecord = row.json(0)?;
        let rec = ResourceGroupRecord {
            name: old.name,
            ..rg.clone()
        };
        self.execute(
            "UPDATE resource_groups SET body = $3 WHERE subscription = $1 AND name_key = $2",
            &params![&sub, &name_key, &json(&rec)?],
        )
        .await?;
        Ok(false)
    }

    pub async fn get_resource_group(
        &mut self,
        subscription: &str,
        name: &str,
    ) -> Result<Option<ResourceGroupRecord>> {
        self.query_opt(
            "SELECT body FROM resource_groups WHERE subscription = $1 AND name_key = $2",
            &params![&lower(subscription), &lower(name)],
        )
        .await?
        .map(|r| r.json(0))
        .transpose()
    }

    pub async fn list_resource_groups(
        &mut self,
        subscription: &str,
    ) -> Result<Vec<ResourceGroupRecord>> {
        self.query(
            "SELECT body FROM resource_groups WHERE subscription = $1 ORDER BY name_key",
            &params![&lower(subscription)],
        )
        .await?
        .iter()
        .map(|r| parse(r.str(0)?))
        .collect()
    }

    /// Delete a group and everything in it (clusters with their node groups, VMs and scale
    /// sets with their system identities, instances and join tokens, identities, vaults,
    /// tracked resources, the role assignments at those scopes or held by those identities;
    /// host credentials of its hosts are revoked). True when the group existed.
    pub async fn delete_resource_group(&mut self, subscription: &str, name: &str) -> Result<bool> {
        let (sub, rg) = (lower(subscription), lower(name));
        self.delete_group_rows(&sub, &rg).await
    }

    /// Delete a group and everything in it: its clusters (with their node groups), VMs with
    /// their system identities, instances and credentials, identities, vaults, tracked
    /// resources and the role assignments at those scopes (cascade shared with cluster
    /// deletes; boxed because a cluster delete deletes its node group). `sub` and `rg` are
    /// lowercase.
    pub(crate) fn delete_group_rows<'a>(
        &'a mut self,
        sub: &'a str,
        rg: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool>> + Send + 'a>> {
        Box::pin(async move {
            let scope = params![sub, rg];
            let clusters = keys(
                self,
                "SELECT key FROM clusters WHERE subscription = $1 AND rg_key = $2 ORDER BY key",
                &scope,
            )
            .await?;
            for c in &clusters {
                self.delete_cluster_rows(c).await?;
            }
            let vms = keys(
                self,
                "SELECT key FROM vms WHERE subscription = $1 AND rg_key = $2 ORDER BY key",
                &scope,
            )
            .await?;
            for vm in &vms {
                self.delete_vm_rows(vm).await?;
            }
            let ids = keys(
                self,
                "SELECT key FROM identities WHERE subscription = $1 AND rg_key = $2 ORDER BY key",
                &scope,
            )
            .await?;
            for id in &ids {
                self.delete_identity_rows(id).await?;
            }
            self.delete_vaults_in_group(sub, rg).await?;
            self.execute(
                "DELETE FROM tracked WHERE subscription = $1 AND rg_key = $2",
                &scope,
            )
            .await?;
            self.delete_assignments_under(&format!("/subscriptions/{sub}/resourcegroups/{rg}"))
                .await?;
            let n = self
                .execute(
                    "DELETE FROM resource_groups WHERE subscription = $1 AND name_key = $2",
                    &scope,
                )
                .await?;
            Ok(n > 0)
        })
    }
}

/// The first column of every row, as text (the keys a cascade walks).
pub(crate) async fn keys(tx: &mut Tx, sql: &str, params: &[db::Param<'_>]) -> Result<Vec<String>> {
    tx.query(sql, params)
        .await?
        .iter()
        .map(|r| r.text(0))
        .collect()
}
