//! Virtual machines and scale sets as hosts: VMs with their identity sets, join tokens, host credentials, scale-set instances.

#[allow(unused_imports)]
use crate::store::{json, lower, parse};
#[allow(unused_imports)]
use crate::*;

impl Tx {
    /// Write a VM, its system identity (created, kept or deleted as `system` says) and its
    /// user-assigned identity set, in one transaction. Returns true when created.
    pub async fn put_vm(
        &mut self,
        vm: &VmRecord,
        system: Option<&IdentityRecord>,
        user_keys: &[String],
    ) -> Result<bool> {
        todo!("port put_vm")
    }

    pub async fn get_vm(&mut self, key: &str) -> Result<Option<VmRecord>> {
        todo!("port get_vm")
    }

    pub async fn list_vms(
        &mut self,
        subscription: &str,
        rg: Option<&str>,
    ) -> Result<Vec<VmRecord>> {
        todo!("port list_vms")
    }

    /// Delete a VM, its system identity, its assignments, join tokens and host credentials.
    pub async fn delete_vm(&mut self, key: &str) -> Result<bool> {
        todo!("port delete_vm")
    }

    /// Keys of the user-assigned identities assigned to a VM.
    pub async fn vm_user_identities(&mut self, vm_key: &str) -> Result<Vec<IdentityRecord>> {
        todo!("port vm_user_identities")
    }

    /// The system-assigned identity of a VM.
    pub async fn vm_system_identity(&mut self, vm_key: &str) -> Result<Option<IdentityRecord>> {
        todo!("port vm_system_identity")
    }

    pub async fn insert_join_token(
        &mut self,
        hash: &str,
        vm_key: &str,
        expires_at: u64,
    ) -> Result<()> {
        todo!("port insert_join_token")
    }

    pub async fn consume_join_token(&mut self, hash: &str, now: u64) -> Result<JoinTokenOutcome> {
        todo!("port consume_join_token")
    }

    pub async fn insert_host_credential(&mut self, cred: &HostCredentialRecord) -> Result<()> {
        todo!("port insert_host_credential")
    }

    pub async fn get_host_credential(
        &mut self,
        fingerprint: &str,
    ) -> Result<Option<HostCredentialRecord>> {
        todo!("port get_host_credential")
    }

    /// Allocate the next instance of a scale set or pool (ids are never reused); with `limit`,
    /// fail with `Conflict(sqlite::GROUP_FULL)` when the group already has that many.
    pub async fn create_instance(
        &mut self,
        vmss_key: &str,
        vmss_resource_id: &str,
        now: u64,
        limit: Option<u64>,
    ) -> Result<InstanceRecord> {
        todo!("port create_instance")
    }

    pub async fn get_instance(&mut self, key: &str) -> Result<Option<InstanceRecord>> {
        todo!("port get_instance")
    }

    pub async fn list_instances(&mut self, vmss_key: &str) -> Result<Vec<InstanceRecord>> {
        todo!("port list_instances")
    }

    /// Delete an instance and revoke its host credentials.
    pub async fn delete_instance(&mut self, key: &str) -> Result<bool> {
        todo!("port delete_instance")
    }

    /// Delete a VM or scale set and what it owns (system identity, instances, credentials,
    /// join tokens, extensions, assignments on its scope).
    pub(crate) async fn delete_vm_rows(&mut self, key: &str) -> Result<bool> {
        todo!("port delete_vm_tx {key}")
    }
}
