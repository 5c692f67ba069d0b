//! Managed clusters and their node resource groups.

#[allow(unused_imports)]
use crate::store::{json, lower, parse};
#[allow(unused_imports)]
use crate::*;

impl Tx {
    pub async fn put_cluster(&mut self, w: &ClusterWrite<'_>) -> Result<ClusterPut> {
        todo!("port put_cluster")
    }

    /// Replace only the cluster row (its `properties`, e.g. pod identity states), if the stored
    /// version is `expect_version`.
    pub async fn update_cluster(
        &mut self,
        c: &ClusterRecord,
        expect_version: u64,
    ) -> Result<ClusterPut> {
        todo!("port update_cluster")
    }

    pub async fn get_cluster(&mut self, key: &str) -> Result<Option<ClusterRecord>> {
        todo!("port get_cluster")
    }

    pub async fn list_clusters(
        &mut self,
        subscription: &str,
        rg: Option<&str>,
    ) -> Result<Vec<ClusterRecord>> {
        todo!("port list_clusters")
    }

    /// The cluster whose node resource group is `rg`.
    pub async fn cluster_of_node_group(
        &mut self,
        subscription: &str,
        rg: &str,
    ) -> Result<Option<ClusterRecord>> {
        todo!("port cluster_of_node_group")
    }

    /// Delete a cluster with its system identity, its node resource group and everything in it
    /// (scale sets, instances, host credentials, the kubelet identity, role assignments at
    /// those scopes or held by those identities).
    pub async fn delete_cluster(&mut self, key: &str) -> Result<bool> {
        todo!("port delete_cluster")
    }

    /// Delete a cluster and what it owns, its node resource group included.
    pub(crate) async fn delete_cluster_rows(&mut self, key: &str) -> Result<bool> {
        todo!("port delete_cluster_tx {key}")
    }
}
