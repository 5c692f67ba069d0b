//! The directory (service principals, principal lookups) and role assignments.

#[allow(unused_imports)]
use crate::store::{json, lower, parse};
#[allow(unused_imports)]
use crate::*;

impl Tx {
    pub async fn put_service_principal(&mut self, sp: &ServicePrincipalRecord) -> Result<()> {
        todo!("port put_service_principal")
    }

    pub async fn get_service_principal(
        &mut self,
        client_id: &str,
    ) -> Result<Option<ServicePrincipalRecord>> {
        todo!("port get_service_principal")
    }

    /// What kind of principal an object id names, if it exists.
    pub async fn principal_kind(&mut self, object_id: &str) -> Result<Option<PrincipalKind>> {
        todo!("port principal_kind")
    }

    /// A principal by object id or by app (client) id.
    pub async fn directory_lookup(&mut self, id: &str) -> Result<Option<DirectoryEntry>> {
        todo!("port directory_lookup")
    }

    pub async fn insert_role_assignment(
        &mut self,
        ra: &RoleAssignmentRecord,
    ) -> Result<RoleAssignmentInsert> {
        todo!("port insert_role_assignment")
    }

    pub async fn get_role_assignment(
        &mut self,
        name: &str,
    ) -> Result<Option<RoleAssignmentRecord>> {
        todo!("port get_role_assignment")
    }

    pub async fn list_role_assignments(&mut self) -> Result<Vec<RoleAssignmentRecord>> {
        todo!("port list_role_assignments")
    }

    /// The assignments a principal holds (the authorization hot path; indexed).
    pub async fn role_assignments_for_principal(
        &mut self,
        principal_id: &str,
    ) -> Result<Vec<RoleAssignmentRecord>> {
        todo!("port role_assignments_for_principal")
    }

    pub async fn delete_role_assignment(
        &mut self,
        name: &str,
    ) -> Result<Option<RoleAssignmentRecord>> {
        todo!("port delete_role_assignment")
    }

    /// Remove role assignments at or below `scope_key` (lowercase).
    pub(crate) async fn delete_assignments_under(&mut self, scope_key: &str) -> Result<()> {
        todo!("port delete_assignments_under {scope_key}")
    }
}
