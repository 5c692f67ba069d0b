//! Tracked resources without a table of their own (Batch accounts, VM extensions).

#[allow(unused_imports)]
use crate::store::{json, lower, parse};
#[allow(unused_imports)]
use crate::*;

impl Tx {
    /// Insert or replace; returns true when created.
    pub async fn put_tracked(&mut self, r: &TrackedRecord) -> Result<bool> {
        todo!("port put_tracked")
    }

    pub async fn get_tracked(&mut self, key: &str) -> Result<Option<TrackedRecord>> {
        todo!("port get_tracked")
    }

    pub async fn list_tracked(
        &mut self,
        type_name: &str,
        subscription: &str,
        rg: Option<&str>,
    ) -> Result<Vec<TrackedRecord>> {
        todo!("port list_tracked")
    }

    /// Tracked resources of `type_name` below `parent_key` (e.g. a VM's extensions).
    pub async fn list_tracked_under(
        &mut self,
        parent_key: &str,
        type_name: &str,
    ) -> Result<Vec<TrackedRecord>> {
        todo!("port list_tracked_under")
    }

    /// Delete a resource and the tracked resources below it.
    pub async fn delete_tracked(&mut self, key: &str) -> Result<bool> {
        todo!("port delete_tracked")
    }
}
