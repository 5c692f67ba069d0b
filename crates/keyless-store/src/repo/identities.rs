//! Identities (user- and system-assigned) and their federated identity credentials.

#[allow(unused_imports)]
use crate::store::{json, lower, parse};
#[allow(unused_imports)]
use crate::*;

impl Tx {
    /// Insert or replace; returns true when created.
    pub async fn put_identity(&mut self, id: &IdentityRecord) -> Result<bool> {
        todo!("port put_identity")
    }

    pub async fn get_identity(&mut self, key: &str) -> Result<Option<IdentityRecord>> {
        todo!("port get_identity")
    }

    pub async fn list_identities(
        &mut self,
        subscription: &str,
        rg: Option<&str>,
    ) -> Result<Vec<IdentityRecord>> {
        todo!("port list_identities")
    }

    /// Delete a user-assigned identity, remove it from every VM, and delete the role
    /// assignments it holds or that are scoped to it.
    pub async fn delete_identity(&mut self, key: &str) -> Result<bool> {
        todo!("port delete_identity")
    }

    /// Insert or update a FIC, enforcing `max` per identity and unique issuer+subject.
    pub async fn put_fic(&mut self, fic: &FicRecord, max: usize) -> Result<FicPut> {
        todo!("port put_fic")
    }

    pub async fn get_fic(&mut self, identity_key: &str, name: &str) -> Result<Option<FicRecord>> {
        todo!("port get_fic")
    }

    pub async fn list_fics(&mut self, identity_key: &str) -> Result<Vec<FicRecord>> {
        todo!("port list_fics")
    }

    pub async fn delete_fic(&mut self, identity_key: &str, name: &str) -> Result<bool> {
        todo!("port delete_fic")
    }

    /// Remove an identity and what refers to it (host assignments, role assignments it holds
    /// or on its scope, its federated credentials).
    pub(crate) async fn delete_identity_rows(&mut self, key: &str) -> Result<usize> {
        todo!("port delete_identity_rows {key}")
    }

    /// Insert or update an identity row; true when created.
    pub(crate) async fn put_identity_row(&mut self, id: &IdentityRecord) -> Result<bool> {
        todo!("port put_identity_tx {}", id.key)
    }
}
