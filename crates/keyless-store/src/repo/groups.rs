//! Resource groups, and the cascade of a group delete.

#[allow(unused_imports)]
use crate::store::{json, lower, parse};
#[allow(unused_imports)]
use crate::*;

impl Tx {
    pub async fn put_resource_group(&mut self, rg: &ResourceGroupRecord) -> Result<bool> {
        todo!("port put_resource_group")
    }

    pub async fn get_resource_group(
        &mut self,
        subscription: &str,
        name: &str,
    ) -> Result<Option<ResourceGroupRecord>> {
        todo!("port get_resource_group")
    }

    pub async fn list_resource_groups(
        &mut self,
        subscription: &str,
    ) -> Result<Vec<ResourceGroupRecord>> {
        todo!("port list_resource_groups")
    }

    /// Delete a group and everything in it (identities, VMs with their system identities,
    /// assignments, join tokens; host credentials of its VMs are revoked).
    pub async fn delete_resource_group(&mut self, subscription: &str, name: &str) -> Result<bool> {
        todo!("port delete_resource_group")
    }

    /// Delete a group and everything in it (cascade shared with cluster deletes; boxed because
    /// a cluster delete deletes its node group). `sub` and `rg` are lowercase.
    pub(crate) fn delete_group_rows<'a>(
        &'a mut self,
        sub: &'a str,
        rg: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool>> + Send + 'a>> {
        Box::pin(async move { todo!("port delete_group_tx {sub} {rg}") })
    }
}
