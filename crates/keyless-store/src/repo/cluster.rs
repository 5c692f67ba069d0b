//! Managed clusters and their node resource groups.
//!
//! A cluster write names the version it read: an update locks the cluster row before reading
//! it, so of two writers from the same version one writes and the other finds `Stale`; a
//! create claims the node resource group and the cluster key with `ON CONFLICT DO NOTHING`,
//! so of two creates one writes and the other finds `Stale` or `NodeGroupExists`.

use crate::repo::vault::locking;
use crate::store::{json, lower, parse};
use crate::*;

impl Tx {
    async fn stored_cluster(&mut self, key: &str) -> Result<Option<ClusterRecord>> {
        let row = self
            .query_opt("SELECT body FROM clusters WHERE key = $1", &params![key])
            .await?;
        row.map(|r| parse(r.str(0)?)).transpose()
    }

    /// Insert or replace the cluster row.
    async fn write_cluster_row(&mut self, c: &ClusterRecord) -> Result<()> {
        self.execute(
            "INSERT INTO clusters(key, subscription, rg_key, node_rg_key, body) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT(key) DO UPDATE SET body = excluded.body",
            &params![
                &c.key,
                &lower(&c.subscription),
                &lower(&c.resource_group),
                &lower(&c.node_resource_group),
                &json(c)?
            ],
        )
        .await?;
        Ok(())
    }

    /// What a create that lost a race finds: the cluster exists (`Stale`) or only its node
    /// resource group does.
    async fn lost_create(&mut self, key: &str) -> Result<ClusterPut> {
        Ok(if self.stored_cluster(key).await?.is_some() {
            ClusterPut::Stale
        } else {
            ClusterPut::NodeGroupExists
        })
    }

    /// Whether `key` is a user-assigned identity; on PostgreSQL its row is then held (`FOR KEY
    /// SHARE`) until the transaction ends, so it cannot be deleted under the assignment.
    async fn user_identity_held(&mut self, key: &str) -> Result<bool> {
        let sql = locking(
            self.backend(),
            "SELECT system_vm FROM identities WHERE key = $1",
            "FOR KEY SHARE",
        );
        let row = self.query_opt(&sql, &params![key]).await?;
        Ok(match row {
            Some(r) => r.opt_text(0)?.is_none(),
            None => false,
        })
    }

    pub async fn put_cluster(&mut self, w: &ClusterWrite<'_>) -> Result<ClusterPut> {
        let c = w.cluster;
        let create = w.expect_version.is_none();
        if !create {
            self.lock_row("clusters", "key", &c.key).await?;
        }
        let current = self.stored_cluster(&c.key).await?;
        match (&current, w.expect_version) {
            (None, None) => {}
            (Some(cur), Some(v)) if cur.version == v => {}
            _ => return Ok(ClusterPut::Stale),
        }
        let (sub, node_rg) = (lower(&c.subscription), lower(&w.node_group.name));
        let group_exists = self
            .query_opt(
                "SELECT 1 FROM resource_groups WHERE subscription = $1 AND name_key = $2",
                &params![&sub, &node_rg],
            )
            .await?
            .is_some();
        if create && group_exists {
            // on PostgreSQL a create of this cluster may have committed since it was read
            return self.lost_create(&c.key).await;
        }
        if !group_exists {
            // a concurrent create of the same group makes this wait for it, then do nothing
            let n = self
                .execute(
                    "INSERT INTO resource_groups(subscription, name_key, body) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                    &params![&sub, &node_rg, &json(w.node_group)?],
                )
                .await?;
            if create && n == 0 {
                return self.lost_create(&c.key).await;
            }
        }
        if create {
            // claim the key (and the node group, unique per subscription) before anything else
            let n = self
                .execute(
                    "INSERT INTO clusters(key, subscription, rg_key, node_rg_key, body) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT DO NOTHING",
                    &params![
                        &c.key,
                        &sub,
                        &lower(&c.resource_group),
                        &lower(&c.node_resource_group),
                        &json(c)?
                    ],
                )
                .await?;
            if n == 0 {
                // the group row is this write's: take it back, write nothing
                self.execute(
                    "DELETE FROM resource_groups WHERE subscription = $1 AND name_key = $2",
                    &params![&sub, &node_rg],
                )
                .await?;
                return self.lost_create(&c.key).await;
            }
        }
        match w.system_identity {
            Some(sys) => {
                if !self.lock_row("identities", "key", &sys.key).await? {
                    self.put_identity_row(sys).await?;
                }
            }
            None => {
                self.delete_identity_rows(&format!("{}#system", c.key))
                    .await?;
            }
        }
        let k = w.kubelet_identity;
        if !self.lock_row("identities", "key", &k.key).await? {
            self.put_identity_row(k).await?;
        }
        for key in w.removed_scale_sets.iter().chain(w.new_scale_sets) {
            self.delete_vm_rows(key).await?;
        }
        for (vm, identities) in w.scale_sets {
            self.execute(
                "INSERT INTO vms(key, subscription, rg_key, body) VALUES ($1, $2, $3, $4)
                 ON CONFLICT(key) DO UPDATE SET body = excluded.body",
                &params![
                    &vm.key,
                    &lower(&vm.subscription),
                    &lower(&vm.resource_group),
                    &json(vm)?
                ],
            )
            .await?;
            self.execute(
                "DELETE FROM vm_identities WHERE vm_key = $1",
                &params![&vm.key],
            )
            .await?;
            for id in identities {
                if !self.user_identity_held(id).await? {
                    // an error: the caller rolls back what this write did
                    return Err(StoreError::Conflict(Conflict::MissingReference(format!(
                        "identity {id} does not exist"
                    ))));
                }
                self.execute(
                    "INSERT INTO vm_identities(vm_key, identity_key) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    &params![&vm.key, id],
                )
                .await?;
            }
        }
        if create {
            return Ok(ClusterPut::Created);
        }
        self.write_cluster_row(c).await?;
        Ok(ClusterPut::Updated)
    }

    /// Replace only the cluster row (its `properties`, e.g. pod identity states), if the stored
    /// version is `expect_version`; `Stale` (nothing written) otherwise. The row is locked
    /// before it is read, so of two updates from the same version exactly one writes.
    pub async fn update_cluster(
        &mut self,
        c: &ClusterRecord,
        expect_version: u64,
    ) -> Result<ClusterPut> {
        self.lock_row("clusters", "key", &c.key).await?;
        match self.stored_cluster(&c.key).await? {
            Some(cur) if cur.version == expect_version => {
                self.write_cluster_row(c).await?;
                Ok(ClusterPut::Updated)
            }
            _ => Ok(ClusterPut::Stale),
        }
    }

    pub async fn get_cluster(&mut self, key: &str) -> Result<Option<ClusterRecord>> {
        self.stored_cluster(key).await
    }

    pub async fn list_clusters(
        &mut self,
        subscription: &str,
        rg: Option<&str>,
    ) -> Result<Vec<ClusterRecord>> {
        let rg = rg.map(lower);
        let rows = self
            .query(
                "SELECT body FROM clusters WHERE subscription = $1
                 AND (CAST($2 AS TEXT) IS NULL OR rg_key = $2) ORDER BY key",
                &params![&lower(subscription), rg.as_ref()],
            )
            .await?;
        rows.iter().map(|r| r.json(0)).collect()
    }

    /// The cluster whose node resource group is `rg`.
    pub async fn cluster_of_node_group(
        &mut self,
        subscription: &str,
        rg: &str,
    ) -> Result<Option<ClusterRecord>> {
        let row = self
            .query_opt(
                "SELECT body FROM clusters WHERE subscription = $1 AND node_rg_key = $2",
                &params![&lower(subscription), &lower(rg)],
            )
            .await?;
        row.map(|r| r.json(0)).transpose()
    }

    /// Delete a cluster with its system identity, its node resource group and everything in it
    /// (scale sets, instances, host credentials, the kubelet identity, role assignments at
    /// those scopes or held by those identities).
    pub async fn delete_cluster(&mut self, key: &str) -> Result<bool> {
        self.delete_cluster_rows(key).await
    }

    /// Delete a cluster and what it owns, its node resource group included.
    pub(crate) async fn delete_cluster_rows(&mut self, key: &str) -> Result<bool> {
        self.lock_row("clusters", "key", key).await?;
        let Some(c) = self.stored_cluster(key).await? else {
            return Ok(false);
        };
        self.execute("DELETE FROM clusters WHERE key = $1", &params![key])
            .await?;
        // its OIDC issuer (published keys) and webhook CA go with it
        self.delete_cluster_oidc(key).await?;
        self.delete_identity_rows(&format!("{key}#system")).await?;
        self.delete_assignments_under(key).await?;
        self.execute(
            "DELETE FROM tracked WHERE substr(key, 1, length(CAST($1 AS TEXT)) + 1) = CAST($1 AS TEXT) || '/'",
            &params![key],
        )
        .await?;
        self.delete_group_rows(&lower(&c.subscription), &lower(&c.node_resource_group))
            .await?;
        Ok(true)
    }
}
